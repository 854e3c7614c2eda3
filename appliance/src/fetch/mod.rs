//! Where block contents come from when the splicer answers a READ itself.
//!
//! - [`BlockCache`]: a bounded, content-addressed memory cache (LRU by bytes). Blocks
//!   enter it only after their blake3 hash was checked against a manifest, so what it
//!   holds is correct by construction: a block is its hash.
//! - [`BlockProvider`]: the asynchronous source of blocks by hash. The cache is one
//!   provider; peer fetching (a TCP block service by hash, blake3-verified, on branch
//!   `index`) is meant to plug in here.
//!
//! All-zero blocks are never stored nor fetched: manifests mark them and the splicer
//! generates them ([`zero_block`]).

mod cache;

use std::{future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;

use crate::index::BlockHash;

pub use cache::{BlockCache, CacheSnapshot};

/// Why blocks could not be provided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("block {0} is not available from this provider")]
    Missing(BlockHash),
    #[error("block {0} failed verification")]
    Corrupt(BlockHash),
    #[error("provider unavailable: {0}")]
    Unavailable(String),
}

/// The future a [`BlockProvider`] returns.
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Bytes>, FetchError>> + Send + 'a>>;

/// A source of blocks by hash. Implementations return exactly one buffer per hash, in
/// order, each of which hashes to its name (verified by the provider or the caller).
pub trait BlockProvider: Send + Sync {
    fn fetch<'a>(&'a self, hashes: &'a [BlockHash]) -> FetchFuture<'a>;
}

/// The shared cache as a provider: answers at once, from memory.
impl BlockProvider for BlockCache {
    fn fetch<'a>(&'a self, hashes: &'a [BlockHash]) -> FetchFuture<'a> {
        Box::pin(async move {
            hashes
                .iter()
                .map(|h| self.get(h).ok_or(FetchError::Missing(*h)))
                .collect()
        })
    }
}

impl<P: BlockProvider + ?Sized> BlockProvider for Arc<P> {
    fn fetch<'a>(&'a self, hashes: &'a [BlockHash]) -> FetchFuture<'a> {
        (**self).fetch(hashes)
    }
}

/// `len` zero bytes, shared: one allocation per size, sliced for every use.
pub fn zero_block(len: usize) -> Bytes {
    use std::sync::OnceLock;
    const ZERO_CHUNK: usize = 1 << 20;
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    let zeros = ZEROS.get_or_init(|| Bytes::from(vec![0u8; ZERO_CHUNK]));
    if len <= ZERO_CHUNK {
        zeros.slice(..len)
    } else {
        Bytes::from(vec![0u8; len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cache_as_provider() {
        let cache = BlockCache::new(1 << 20);
        let a = Bytes::from_static(b"aaaa");
        let ha = BlockHash::of(&a);
        cache.insert(ha, a.clone());
        assert_eq!(cache.fetch(&[ha]).await.unwrap(), vec![a]);
        let hb = BlockHash::of(b"b");
        assert_eq!(cache.fetch(&[ha, hb]).await, Err(FetchError::Missing(hb)));
    }

    #[test]
    fn zero_blocks_are_zero() {
        assert_eq!(zero_block(4096).len(), 4096);
        assert!(zero_block(3 << 20).iter().all(|&b| b == 0));
        assert!(zero_block(65536).iter().all(|&b| b == 0));
    }
}
