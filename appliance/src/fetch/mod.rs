//! Where block contents come from when the splicer answers a READ itself.
//!
//! - [`BlockCache`]: a bounded, content-addressed memory cache (LRU by bytes). Blocks
//!   enter it only after their blake3 hash was checked against a manifest, so what it
//!   holds is correct by construction: a block is its hash.
//! - [`Sourcing`]: blocks the cache lacks, fetched by hash from the cheapest holders
//!   the index knows (peer appliances' caches, hypervisor agents, the library's
//!   agent), in path-cost order, verified by blake3, into the cache. What no holder
//!   delivers in time is left to the library (the READ passes through).
//! - [`SourceClass`] / [`Origin`] / [`Provenance`]: where served bytes came from, for
//!   the operator (zero, cache, rack, other racks, library).
//!
//! All-zero blocks are never stored nor fetched: manifests mark them and the splicer
//! generates them ([`zero_block`]).

mod cache;
pub mod prefetch;
pub mod sourcing;

use bytes::Bytes;

pub use cache::{BlockCache, CacheSnapshot, DEFAULT_PIN_SHARE};
pub use sourcing::{
    rerank_loop, RankFeed, SourceRanks, Sourcing, SourcingOptions, SourcingSnapshot,
};

/// Where the bytes of a served block came from, as an operator asks it: generated,
/// this appliance's cache, this rack, another rack, the library.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SourceClass {
    /// An all-zero block, generated.
    Zero,
    /// Already in this appliance's cache (learned or fetched earlier and served
    /// before).
    Cache,
    /// Fetched from a holder one hop from this appliance (its rack).
    Rack,
    /// Fetched from a holder farther away (another rack's appliance or host).
    OtherRack,
    /// Fetched by hash from the library host's agent.
    Library,
}

impl SourceClass {
    pub const ALL: [SourceClass; 5] = [
        SourceClass::Zero,
        SourceClass::Cache,
        SourceClass::Rack,
        SourceClass::OtherRack,
        SourceClass::Library,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            SourceClass::Zero => "zero",
            SourceClass::Cache => "cache",
            SourceClass::Rack => "rack",
            SourceClass::OtherRack => "other_rack",
            SourceClass::Library => "library",
        }
    }
}

/// Hop distances above this are counted together.
pub const MAX_HOPS: usize = 7;

/// Where a fetched block came from: its class and the hop distance of its source
/// from this appliance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub class: SourceClass,
    pub hops: u8,
}

/// A tally of served blocks by source (blocks touched and bytes sent) and, for
/// blocks fetched from peers, bytes by hop distance (index = hops, the last slot
/// counting [`MAX_HOPS`] and more).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Provenance {
    pub blocks: [u64; SourceClass::ALL.len()],
    pub bytes: [u64; SourceClass::ALL.len()],
    pub hop_bytes: [u64; MAX_HOPS + 1],
}

impl Provenance {
    /// Count one block of which `bytes` were served.
    pub fn add(&mut self, class: SourceClass, hops: Option<u8>, bytes: u64) {
        self.blocks[class.index()] += 1;
        self.bytes[class.index()] += bytes;
        if let Some(h) = hops {
            self.hop_bytes[usize::from(h).min(MAX_HOPS)] += bytes;
        }
    }

    pub fn blocks_of(&self, class: SourceClass) -> u64 {
        self.blocks[class.index()]
    }

    pub fn bytes_of(&self, class: SourceClass) -> u64 {
        self.bytes[class.index()]
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

    #[test]
    fn zero_blocks_are_zero() {
        assert_eq!(zero_block(4096).len(), 4096);
        assert!(zero_block(3 << 20).iter().all(|&b| b == 0));
        assert!(zero_block(65536).iter().all(|&b| b == 0));
    }
}
