//! The store behind the index: a small trait so that the embedded store
//! ([`super::redb_store::RedbStore`]) and a later distributed backend are
//! interchangeable, plus the types that cross it.
//!
//! Model: a *source* is one image held by one host at one block size. Its manifest
//! lists the block names; every non-zero block of it is a [`Location`] of that name.
//! Changes are applied in batches ([`BlockStore::apply`], one transaction per batch)
//! and numbered by a monotonically increasing sequence number; a store can replay
//! its changes after a given number ([`BlockStore::changes_since`]) so that a local
//! index pushes them to its parent, which applies them to its own store: the same
//! code at every level of a tree of any depth.

use std::sync::Arc;

use super::manifest::{put_bytes, put_str, DecodeError, Reader};
use super::{BlockHash, Manifest, Result};

/// Where a copy of a block is: `len` bytes at `offset` of `image` on `host`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    pub host: Arc<str>,
    pub image: Arc<str>,
    pub block_size: u32,
    pub offset: u64,
    pub len: u32,
}

/// One indexed source (image × host × block size), without its block list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub host: String,
    pub image: String,
    pub block_size: u32,
    pub size: u64,
    pub blocks: u64,
    pub zero_blocks: u64,
    /// Sequence number of the last change to this source.
    pub seq: u64,
}

/// A change to the index. Host, image and block size identify a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `host` holds `manifest.image` with exactly these blocks (replaces any earlier
    /// manifest of that host, image and block size).
    PutImage { host: String, manifest: Manifest },
    /// Some blocks of a source changed in place (the delta of a re-index): the image
    /// is now `size` bytes and block `i` is named `hash` for every `(i, hash)`.
    /// Blocks past the new end are dropped; new blocks not listed are zero.
    PatchImage {
        host: String,
        image: String,
        block_size: u32,
        size: u64,
        blocks: Vec<(u32, Option<BlockHash>)>,
    },
    /// `host` no longer holds `image` at `block_size`.
    RemoveImage {
        host: String,
        image: String,
        block_size: u32,
    },
    /// `host` is gone, with everything it held.
    RemoveHost { host: String },
}

const TAG_PUT: u8 = 1;
const TAG_PATCH: u8 = 2;
const TAG_REMOVE: u8 = 3;
const TAG_REMOVE_HOST: u8 = 4;

impl Change {
    pub fn host(&self) -> &str {
        match self {
            Change::PutImage { host, .. }
            | Change::PatchImage { host, .. }
            | Change::RemoveImage { host, .. }
            | Change::RemoveHost { host } => host,
        }
    }

    /// Compact binary encoding (for the change log and the upward push).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Change::PutImage { host, manifest } => {
                out.push(TAG_PUT);
                put_str(&mut out, host);
                put_bytes(&mut out, &manifest.encode());
            }
            Change::PatchImage {
                host,
                image,
                block_size,
                size,
                blocks,
            } => {
                out.push(TAG_PATCH);
                put_str(&mut out, host);
                put_str(&mut out, image);
                out.extend_from_slice(&block_size.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&(blocks.len() as u64).to_le_bytes());
                for (i, h) in blocks {
                    out.extend_from_slice(&i.to_le_bytes());
                    match h {
                        Some(h) => {
                            out.push(1);
                            out.extend_from_slice(&h.0);
                        }
                        None => out.push(0),
                    }
                }
            }
            Change::RemoveImage {
                host,
                image,
                block_size,
            } => {
                out.push(TAG_REMOVE);
                put_str(&mut out, host);
                put_str(&mut out, image);
                out.extend_from_slice(&block_size.to_le_bytes());
            }
            Change::RemoveHost { host } => {
                out.push(TAG_REMOVE_HOST);
                put_str(&mut out, host);
            }
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(buf);
        let c = match r.u8()? {
            TAG_PUT => Change::PutImage {
                host: r.str()?,
                manifest: Manifest::decode(r.bytes()?)?,
            },
            TAG_PATCH => {
                let host = r.str()?;
                let image = r.str()?;
                let block_size = r.u32()?;
                let size = r.u64()?;
                let n = r.u64()? as usize;
                let mut blocks = Vec::with_capacity(n.min(buf.len() / 5));
                for _ in 0..n {
                    let i = r.u32()?;
                    let h = match r.u8()? {
                        0 => None,
                        1 => Some(BlockHash(r.take(32)?.try_into().expect("32 bytes"))),
                        _ => return Err(DecodeError::Corrupt("patch flag")),
                    };
                    blocks.push((i, h));
                }
                Change::PatchImage {
                    host,
                    image,
                    block_size,
                    size,
                    blocks,
                }
            }
            TAG_REMOVE => Change::RemoveImage {
                host: r.str()?,
                image: r.str()?,
                block_size: r.u32()?,
            },
            TAG_REMOVE_HOST => Change::RemoveHost { host: r.str()? },
            _ => return Err(DecodeError::Corrupt("change tag")),
        };
        if !r.0.is_empty() {
            return Err(DecodeError::Corrupt("trailing bytes"));
        }
        Ok(c)
    }
}

/// The index store. Implementations are shared between threads (`&self`); writes
/// are serialised internally.
pub trait BlockStore: Send + Sync {
    /// Applies `changes` in order, atomically (one transaction): either all are
    /// durable when this returns, or none. Returns the sequence number of the last
    /// change (each change gets the next number), or the current one if empty.
    fn apply(&self, changes: &[Change]) -> Result<u64>;

    /// Every known copy of the block named `hash` (empty if none).
    fn holders(&self, hash: &BlockHash) -> Result<Vec<Location>>;

    /// [`Self::holders`] for many names at once (one lock / round trip).
    fn holders_many(&self, hashes: &[BlockHash]) -> Result<Vec<Vec<Location>>> {
        hashes.iter().map(|h| self.holders(h)).collect()
    }

    /// The manifest of `image` at `block_size` (`None`: the smallest size indexed),
    /// from whichever host last indexed it.
    fn manifest(&self, image: &str, block_size: Option<u32>) -> Result<Option<Manifest>>;

    /// The manifest of `image` as held by `host`.
    fn manifest_at(&self, host: &str, image: &str, block_size: u32) -> Result<Option<Manifest>>;

    /// Every indexed source.
    fn images(&self) -> Result<Vec<ImageInfo>>;

    /// Sequence number of the last applied change (0 for an empty store).
    fn seq(&self) -> u64;

    /// Up to `limit` logged changes with a sequence number greater than `after`, in
    /// order (for the upward push). Changes trimmed by [`Self::trim_log`] are gone.
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, Change)>>;

    /// Forgets logged changes up to and including `upto` (the parent acknowledged
    /// them).
    fn trim_log(&self, upto: u64) -> Result<()>;
}

/// A shared store is a store (the daemon hands one store to several users).
impl<T: BlockStore + ?Sized> BlockStore for Arc<T> {
    fn apply(&self, changes: &[Change]) -> Result<u64> {
        (**self).apply(changes)
    }
    fn holders(&self, hash: &BlockHash) -> Result<Vec<Location>> {
        (**self).holders(hash)
    }
    fn holders_many(&self, hashes: &[BlockHash]) -> Result<Vec<Vec<Location>>> {
        (**self).holders_many(hashes)
    }
    fn manifest(&self, image: &str, block_size: Option<u32>) -> Result<Option<Manifest>> {
        (**self).manifest(image, block_size)
    }
    fn manifest_at(&self, host: &str, image: &str, block_size: u32) -> Result<Option<Manifest>> {
        (**self).manifest_at(host, image, block_size)
    }
    fn images(&self) -> Result<Vec<ImageInfo>> {
        (**self).images()
    }
    fn seq(&self) -> u64 {
        (**self).seq()
    }
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, Change)>> {
        (**self).changes_since(after, limit)
    }
    fn trim_log(&self, upto: u64) -> Result<()> {
        (**self).trim_log(upto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_hash() -> impl Strategy<Value = Option<BlockHash>> {
        prop::option::of(any::<[u8; 32]>().prop_map(BlockHash))
    }

    fn arb_change() -> impl Strategy<Value = Change> {
        prop_oneof![
            ("[a-z]{0,8}", "[a-z]{0,8}", 0u64..50_000).prop_flat_map(|(host, image, size)| {
                let n = Manifest::block_count(size, 4096);
                prop::collection::vec(arb_hash(), n..=n).prop_map(move |blocks| Change::PutImage {
                    host: host.clone(),
                    manifest: Manifest {
                        image: image.clone(),
                        size,
                        block_size: 4096,
                        blocks,
                    },
                })
            }),
            (
                "[a-z]{0,8}",
                "[a-z]{0,8}",
                any::<u32>(),
                any::<u64>(),
                prop::collection::vec((any::<u32>(), arb_hash()), 0..20)
            )
                .prop_map(|(host, image, block_size, size, blocks)| {
                    Change::PatchImage {
                        host,
                        image,
                        block_size,
                        size,
                        blocks,
                    }
                }),
            ("[a-z]{0,8}", "[a-z]{0,8}", any::<u32>()).prop_map(|(host, image, block_size)| {
                Change::RemoveImage {
                    host,
                    image,
                    block_size,
                }
            }),
            "[a-z]{0,8}".prop_map(|host| Change::RemoveHost { host }),
        ]
    }

    proptest! {
        #[test]
        fn change_round_trip(c in arb_change()) {
            prop_assert_eq!(Change::decode(&c.encode()).unwrap(), c);
        }
    }
}
