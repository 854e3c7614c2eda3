//! The store behind the index: a small trait so that the embedded store
//! ([`super::redb_store::RedbStore`]) and the distributed one
//! ([`super::redis_store::RedisClusterStore`]) are interchangeable, plus the
//! types that cross it.
//!
//! Model: a *source* is one image held by one host at one block size. Its manifest
//! lists the block names; every non-zero block of it is a [`Location`] of that name.
//! Changes are applied in batches ([`BlockStore::apply`], all or nothing per batch)
//! and numbered by a monotonically increasing sequence number; a store can replay
//! its changes after a given number ([`BlockStore::changes_since`]) so that a local
//! index pushes them to its parent, which applies them to its own store: the same
//! code at every level of a tree of any depth.

use std::sync::Arc;

use super::manifest::{DecodeError, DEFAULT_MAX_IMAGE_BLOCKS};
use super::record::{self, SeqError};
use super::{BlockHash, IndexError, Manifest, Result};

/// Where a copy of a block is: `len` bytes at `offset` of `image` on `host`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
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

/// A source without its block list: the row both stores keep per source
/// (redb's `sources` table, the Redis store's `{P}:src` hash). The field order
/// is the record's format.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct SourceInfo {
    pub host: Arc<str>,
    pub image: Arc<str>,
    pub block_size: u32,
    pub size: u64,
    pub blocks: u64,
    pub zero_blocks: u64,
    /// The last change to this source.
    pub seq: u64,
}

impl SourceInfo {
    pub fn of(host: &str, m: &Manifest, seq: u64) -> Self {
        Self {
            host: host.into(),
            image: m.image.as_str().into(),
            block_size: m.block_size,
            size: m.size,
            blocks: m.blocks.len() as u64,
            zero_blocks: m.zero_blocks() as u64,
            seq,
        }
    }
    pub fn encode(&self) -> Vec<u8> {
        record::encode(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        Ok(record::decode("source", b)?)
    }
    pub fn info(&self) -> ImageInfo {
        ImageInfo {
            host: self.host.to_string(),
            image: self.image.to_string(),
            block_size: self.block_size,
            size: self.size,
            blocks: self.blocks,
            zero_blocks: self.zero_blocks,
            seq: self.seq,
        }
    }
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

/// A stored change's head ([`super::record`]): the change without a patch's
/// entries, which follow it as a postcard sequence (decoded against
/// `max_image_blocks`, [`Change::decode_limited`]). A put's manifest is its own
/// checksummed encoding ([`Manifest::encode`]), kept as bytes so that it is
/// weighed ([`Manifest::peek`]) before it is expanded. The order of the
/// variants is the format (postcard's variant index): add at the end, never
/// reorder, and bump [`RECORD_VERSION`](super::record::RECORD_VERSION) on any
/// other change.
#[derive(serde::Serialize, serde::Deserialize)]
enum ChangeHead<'a> {
    PutImage {
        host: &'a str,
        #[serde(serialize_with = "record::as_bytes")]
        manifest: &'a [u8],
    },
    PatchImage {
        host: &'a str,
        image: &'a str,
        block_size: u32,
        size: u64,
    },
    RemoveImage {
        host: &'a str,
        image: &'a str,
        block_size: u32,
    },
    RemoveHost {
        host: &'a str,
    },
}

/// What a record names its changes in errors.
const CHANGE_RECORD: &str = "change";

impl Change {
    pub fn host(&self) -> &str {
        match self {
            Change::PutImage { host, .. }
            | Change::PatchImage { host, .. }
            | Change::RemoveImage { host, .. }
            | Change::RemoveHost { host } => host,
        }
    }

    /// The change as a record (for the change log and the upward push): the
    /// format version, [`ChangeHead`], then a patch's entries.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Change::PutImage { host, manifest } => record::encode(&ChangeHead::PutImage {
                host,
                manifest: &manifest.encode(),
            }),
            Change::PatchImage {
                host,
                image,
                block_size,
                size,
                blocks,
            } => {
                let mut out = record::encode(&ChangeHead::PatchImage {
                    host,
                    image,
                    block_size: *block_size,
                    size: *size,
                });
                record::append(&mut out, blocks);
                out
            }
            Change::RemoveImage {
                host,
                image,
                block_size,
            } => record::encode(&ChangeHead::RemoveImage {
                host,
                image,
                block_size: *block_size,
            }),
            Change::RemoveHost { host } => record::encode(&ChangeHead::RemoveHost { host }),
        }
    }

    /// [`Self::decode_limited`] at [`DEFAULT_MAX_IMAGE_BLOCKS`].
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_limited(buf, DEFAULT_MAX_IMAGE_BLOCKS)
    }

    /// Decodes [`Self::encode`]'s bytes (a record of another format version is
    /// refused). A `PutImage` whose manifest claims more than `max_blocks`
    /// blocks, or a `PatchImage` listing more than `max_blocks` entries, is
    /// refused before its list is allocated (a patch's size is checked by
    /// [`Self::check`]).
    pub fn decode_limited(buf: &[u8], max_blocks: u64) -> Result<Self, DecodeError> {
        let (head, rest) = record::take(CHANGE_RECORD, record::body(CHANGE_RECORD, buf)?)?;
        if let ChangeHead::PatchImage {
            host,
            image,
            block_size,
            size,
        } = head
        {
            let blocks =
                record::bounded_seq(CHANGE_RECORD, rest, max_blocks).map_err(|e| match e {
                    SeqError::TooLong { count } => DecodeError::TooLarge {
                        image: image.to_owned(),
                        block_size,
                        blocks: count,
                        max: max_blocks,
                    },
                    SeqError::Decode(e) => e,
                })?;
            return Ok(Change::PatchImage {
                host: host.to_owned(),
                image: image.to_owned(),
                block_size,
                size,
                blocks,
            });
        }
        if !rest.is_empty() {
            return Err(DecodeError::Corrupt("trailing bytes"));
        }
        Ok(match head {
            ChangeHead::PutImage { host, manifest } => Change::PutImage {
                host: host.to_owned(),
                manifest: Manifest::decode_limited(manifest, max_blocks)?,
            },
            ChangeHead::RemoveImage {
                host,
                image,
                block_size,
            } => Change::RemoveImage {
                host: host.to_owned(),
                image: image.to_owned(),
                block_size,
            },
            ChangeHead::RemoveHost { host } => Change::RemoveHost {
                host: host.to_owned(),
            },
            ChangeHead::PatchImage { .. } => unreachable!("decoded above"),
        })
    }
}

impl Change {
    /// The source (host, image, block size) a put or patch is about.
    pub fn source(&self) -> Option<(&str, &str, u32)> {
        match self {
            Change::PutImage { host, manifest } => {
                Some((host, &manifest.image, manifest.block_size))
            }
            Change::PatchImage {
                host,
                image,
                block_size,
                ..
            } => Some((host, image, *block_size)),
            Change::RemoveImage { .. } | Change::RemoveHost { .. } => None,
        }
    }

    /// What an encoded change is about, read without expanding it (to weigh it
    /// before decoding, and to name and drop the source of one that is refused).
    pub fn peek(buf: &[u8]) -> Option<Peeked> {
        let body = record::body(CHANGE_RECORD, buf).ok()?;
        let (head, _) = record::take::<ChangeHead>(CHANGE_RECORD, body).ok()?;
        let (put, host, source, blocks) = match head {
            ChangeHead::PutImage { host, manifest } => {
                let (image, block_size, blocks) = Manifest::peek(manifest).ok()?;
                (true, host, Some((image, block_size)), Some(blocks))
            }
            ChangeHead::PatchImage {
                host,
                image,
                block_size,
                size,
            } => {
                let blocks = (block_size != 0).then(|| size.div_ceil(u64::from(block_size)));
                (
                    false,
                    host,
                    Some((image.to_owned(), block_size)),
                    Some(blocks.unwrap_or(0)),
                )
            }
            ChangeHead::RemoveImage {
                host,
                image,
                block_size,
            } => (false, host, Some((image.to_owned(), block_size)), None),
            ChangeHead::RemoveHost { host } => (false, host, None, None),
        };
        Some(Peeked {
            put,
            host: host.to_owned(),
            source,
            blocks,
        })
    }

    /// What the change is, for messages: kind, image, host, block size.
    pub fn describe(&self) -> String {
        match self {
            Change::PutImage { host, manifest } => format!(
                "PutImage of `{}` held by {host} at {}-byte blocks",
                manifest.image, manifest.block_size
            ),
            Change::PatchImage {
                host,
                image,
                block_size,
                ..
            } => format!("PatchImage of `{image}` held by {host} at {block_size}-byte blocks"),
            Change::RemoveImage {
                host,
                image,
                block_size,
            } => format!("RemoveImage of `{image}` held by {host} at {block_size}-byte blocks"),
            Change::RemoveHost { host } => format!("RemoveHost {host}"),
        }
    }

    /// Checks what can be checked without the store, before anything is
    /// allocated for the change: a valid block size, at most `max_blocks` blocks
    /// (for a patch: as implied by its new size), a manifest's block list as long
    /// as its size says, a patch's blocks inside the new size. The error names
    /// the change.
    pub fn check(&self, max_blocks: u64) -> Result<()> {
        let (block_size, size) = match self {
            Change::PutImage { manifest, .. } => (manifest.block_size, manifest.size),
            Change::PatchImage {
                block_size, size, ..
            } => (*block_size, *size),
            Change::RemoveImage { .. } | Change::RemoveHost { .. } => return Ok(()),
        };
        let invalid = |why: String| IndexError::Invalid(format!("{}: {why}", self.describe()));
        super::chunk::check_block_size(block_size).map_err(|e| invalid(e.to_string()))?;
        let n = size.div_ceil(u64::from(block_size));
        if n > max_blocks {
            return Err(IndexError::TooLarge {
                change: self.describe(),
                size,
                blocks: n,
                max: max_blocks,
            });
        }
        match self {
            Change::PutImage { manifest, .. } if manifest.blocks.len() as u64 != n => {
                Err(invalid(format!(
                    "{} blocks listed for {size} bytes (want {n})",
                    manifest.blocks.len()
                )))
            }
            Change::PatchImage { blocks, .. } => {
                match blocks.iter().find(|(i, _)| u64::from(*i) >= n) {
                    Some((i, _)) => Err(invalid(format!("block {i} past the end ({n} blocks)"))),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// What replaces a refused put or patch in [`BlockStore::apply_checked`]: the
    /// removal of its source, so that the store stops answering for a state its
    /// holder has moved past.
    fn removal(&self) -> Option<Change> {
        let (host, image, block_size) = self.source()?;
        Some(Change::RemoveImage {
            host: host.into(),
            image: image.into(),
            block_size,
        })
    }
}

/// What an encoded change is about ([`Change::peek`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peeked {
    /// A `PutImage`.
    pub put: bool,
    pub host: String,
    /// Image and block size (not for `RemoveHost`).
    pub source: Option<(String, u32)>,
    /// Blocks a put or patch gives its source (a manifest's count, a patch's new
    /// size over its block size); `None` for removals.
    pub blocks: Option<u64>,
}

impl Peeked {
    /// The removal that replaces a refused put or patch (see
    /// [`BlockStore::apply_checked`]).
    pub fn removal(&self) -> Option<Change> {
        self.blocks?;
        let (image, block_size) = self.source.clone()?;
        Some(Change::RemoveImage {
            host: self.host.clone(),
            image,
            block_size,
        })
    }
}

/// What [`BlockStore::apply_checked`] did.
#[derive(Debug)]
pub struct Applied {
    /// Sequence number of the last change applied (the current one if none).
    pub seq: u64,
    /// The changes refused by [`Change::check`]: position in the batch, and why.
    pub refused: Vec<(usize, IndexError)>,
}

/// The index store. Implementations are shared between threads (`&self`); writes
/// are serialised internally.
pub trait BlockStore: Send + Sync {
    /// Applies `changes` in order as one batch. Returns the sequence number of
    /// the last change (each change gets the next number), or the current one
    /// if empty. A change that fails [`Change::check`] against
    /// [`Self::max_image_blocks`] fails the whole batch, before anything is
    /// allocated for it. The contract every backend keeps (and
    /// [`super::store_suite`] checks):
    ///
    /// - **All or nothing to readers.** A reader sees the store before the
    ///   batch or after it, never a part of it (redb: one transaction; Redis
    ///   Cluster, which has no transaction across slots: a commit point after
    ///   the writes, see [`super::redis_store`]).
    /// - **Durable once `Ok`.** The batch survives the writer's crash (redb: a
    ///   committed transaction) and the loss of any one server (Redis: `WAIT`
    ///   on every master).
    /// - **An error promises neither.** The batch was not applied, or it was
    ///   logged and the next writer finishes it, whole and before any later
    ///   batch. Callers retry: applying a batch again leaves the same state
    ///   (every change says what a source becomes, not what to add to it).
    fn apply(&self, changes: &[Change]) -> Result<u64>;

    /// The most blocks a source may have here (`max_image_blocks`): changes and
    /// stored manifests claiming more are refused before they are expanded.
    fn max_image_blocks(&self) -> u64 {
        DEFAULT_MAX_IMAGE_BLOCKS
    }

    /// Applies the changes of `changes` that pass [`Change::check`] in order, in
    /// one transaction; each one that does not is refused (listed in the result)
    /// and replaced by the removal of its source, so one bad change neither
    /// blocks the rest of a batch nor leaves a stale state of its source behind.
    fn apply_checked(&self, changes: Vec<Change>) -> Result<Applied> {
        let max = self.max_image_blocks();
        let mut refused = Vec::new();
        let mut ok = Vec::with_capacity(changes.len());
        for (i, c) in changes.into_iter().enumerate() {
            match c.check(max) {
                Ok(()) => ok.push(c),
                Err(e) => {
                    ok.extend(c.removal());
                    refused.push((i, e));
                }
            }
        }
        let seq = self.apply(&ok)?;
        Ok(Applied { seq, refused })
    }

    /// Every known copy of the block named `hash` (empty if none).
    fn holders(&self, hash: &BlockHash) -> Result<Vec<Location>>;

    /// Blocks of the manifest `host` holds for `image` at `block_size` (0 if
    /// none): what applying a change to that source decodes besides the change.
    fn source_blocks(&self, host: &str, image: &str, block_size: u32) -> Result<u64> {
        Ok(self
            .images()?
            .into_iter()
            .find(|i| i.host == host && i.image == image && i.block_size == block_size)
            .map_or(0, |i| i.blocks))
    }

    /// [`Self::holders`] for many names at once (one lock / round trip).
    fn holders_many(&self, hashes: &[BlockHash]) -> Result<Vec<Vec<Location>>> {
        hashes.iter().map(|h| self.holders(h)).collect()
    }

    /// The manifest of `image` at `block_size` (`None`: the smallest size indexed),
    /// from whichever host last indexed it.
    fn manifest(&self, image: &str, block_size: Option<u32>) -> Result<Option<Manifest>>;

    /// The manifest of `image` as held by `host`.
    fn manifest_at(&self, host: &str, image: &str, block_size: u32) -> Result<Option<Manifest>>;

    /// The manifest of `image` as held by `host` at `block_size` (`None`: the
    /// smallest size `host` indexed it at). Unlike [`Self::manifest`], no other
    /// host's holding of the same name is ever the answer: a served LUN's
    /// manifest comes from its authority only.
    fn host_manifest(
        &self,
        host: &str,
        image: &str,
        block_size: Option<u32>,
    ) -> Result<Option<Manifest>> {
        let block_size = match block_size {
            Some(bs) => Some(bs),
            None => self
                .images()?
                .into_iter()
                .filter(|i| i.host == host && i.image == image)
                .map(|i| i.block_size)
                .min(),
        };
        match block_size {
            Some(bs) => self.manifest_at(host, image, bs),
            None => Ok(None),
        }
    }

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
    fn max_image_blocks(&self) -> u64 {
        (**self).max_image_blocks()
    }
    fn apply_checked(&self, changes: Vec<Change>) -> Result<Applied> {
        (**self).apply_checked(changes)
    }
    fn source_blocks(&self, host: &str, image: &str, block_size: u32) -> Result<u64> {
        (**self).source_blocks(host, image, block_size)
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
    fn host_manifest(
        &self,
        host: &str,
        image: &str,
        block_size: Option<u32>,
    ) -> Result<Option<Manifest>> {
        (**self).host_manifest(host, image, block_size)
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

        #[test]
        fn peek_agrees_with_decode(c in arb_change()) {
            let p = Change::peek(&c.encode()).unwrap();
            prop_assert_eq!(p.host.as_str(), c.host());
            prop_assert_eq!(p.put, matches!(c, Change::PutImage { .. }));
            if let Some((h, i, b)) = c.source() {
                prop_assert_eq!(p.source.clone(), Some((i.to_string(), b)));
                prop_assert_eq!(p.removal(), Some(Change::RemoveImage {
                    host: h.into(), image: i.into(), block_size: b
                }));
            }
            match &c {
                Change::PutImage { manifest, .. } => {
                    prop_assert_eq!(p.blocks, Some(manifest.blocks.len() as u64));
                }
                Change::PatchImage { size, block_size, .. } if *block_size != 0 => {
                    prop_assert_eq!(p.blocks, Some(size.div_ceil(u64::from(*block_size))));
                }
                Change::PatchImage { .. } => prop_assert_eq!(p.blocks, Some(0)),
                _ => prop_assert_eq!(p.blocks, None),
            }
        }
    }

    fn patch(size: u64, blocks: Vec<(u32, Option<BlockHash>)>) -> Change {
        Change::PatchImage {
            host: "hv1".into(),
            image: "vm1".into(),
            block_size: 4096,
            size,
            blocks,
        }
    }

    #[test]
    fn check_refuses_oversize_and_malformed_changes_naming_them() {
        // 2^32 - 1 blocks implied by the size alone: refused on arithmetic.
        let e = patch(u64::from(u32::MAX) * 4096, vec![])
            .check(1 << 27)
            .unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, IndexError::TooLarge { blocks, .. } if blocks == u64::from(u32::MAX)));
        assert!(
            m.contains("PatchImage of `vm1` held by hv1") && m.contains("max_image_blocks"),
            "{m}"
        );
        assert!(patch(1000 * 4096, vec![]).check(1000).is_ok());
        assert!(patch(1000 * 4096 + 1, vec![]).check(1000).is_err());
        let m = patch(4096, vec![(1, None)])
            .check(1000)
            .unwrap_err()
            .to_string();
        assert!(m.contains("block 1 past the end"), "{m}");
        let bad_bs = Change::PatchImage {
            host: "hv1".into(),
            image: "vm1".into(),
            block_size: 0,
            size: 1,
            blocks: vec![],
        };
        assert!(bad_bs.check(1000).is_err(), "block size 0 must not divide");
        let put = |n: usize, listed: usize| Change::PutImage {
            host: "hv1".into(),
            manifest: Manifest {
                image: "vm1".into(),
                size: n as u64 * 4096,
                block_size: 4096,
                blocks: vec![None; listed],
            },
        };
        assert!(put(10, 10).check(10).is_ok());
        assert!(matches!(
            put(11, 11).check(10),
            Err(IndexError::TooLarge { .. })
        ));
        assert!(put(10, 9).check(10).is_err());
        assert!(Change::RemoveHost { host: "x".into() }.check(0).is_ok());
    }

    #[test]
    fn decode_limited_refuses_a_put_over_the_cap() {
        let c = Change::PutImage {
            host: "hv1".into(),
            manifest: Manifest {
                image: "vm1".into(),
                size: 11 * 4096,
                block_size: 4096,
                blocks: vec![None; 11],
            },
        };
        let enc = c.encode();
        assert!(matches!(
            Change::decode_limited(&enc, 10),
            Err(DecodeError::TooLarge {
                blocks: 11,
                max: 10,
                ..
            })
        ));
        assert_eq!(Change::decode_limited(&enc, 11).unwrap(), c);
        let p = Change::peek(&enc).unwrap();
        assert_eq!((p.host.as_str(), p.blocks), ("hv1", Some(11)));
        assert_eq!(p.source, Some(("vm1".into(), 4096)));
    }

    #[test]
    fn a_change_of_another_version_is_refused_not_misread() {
        let c = Change::RemoveHost { host: "hv1".into() };
        let mut enc = c.encode();
        assert_eq!(Change::decode(&enc).unwrap(), c);
        for v in [0u8, 1, 4, super::record::RECORD_VERSION + 1] {
            enc[0] = v;
            assert!(
                matches!(Change::decode(&enc), Err(DecodeError::Version { found, .. }) if found == v),
                "version {v}"
            );
            assert!(Change::peek(&enc).is_none());
        }
    }

    #[test]
    fn a_patch_listing_more_entries_than_the_cap_is_refused_on_its_count() {
        let c = patch(4096 * 20, (0..11).map(|i| (i, None)).collect());
        let enc = c.encode();
        assert!(matches!(
            Change::decode_limited(&enc, 10),
            Err(DecodeError::TooLarge {
                blocks: 11,
                max: 10,
                ..
            })
        ));
        assert_eq!(Change::decode_limited(&enc, 11).unwrap(), c);
        // Cut short or padded: malformed.
        assert!(Change::decode(&enc[..enc.len() - 1]).is_err());
        let mut long = enc.clone();
        long.push(0);
        assert!(Change::decode(&long).is_err());
    }
}
