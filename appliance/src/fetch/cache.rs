//! The memory tier: blocks by hash, least recently used evicted first, bounded by the
//! sum of block lengths.
//!
//! Blocks can be pinned by an owner (a VM's pre-staged blocks: the manager's
//! `Prestage` orders): a pinned block is out of the eviction order, so ordinary
//! traffic cannot push it out, and the pinned bytes are bounded by a share of
//! the capacity ([`DEFAULT_PIN_SHARE`]); pins beyond it are refused (the block
//! stays, evictable). An owner's pins are replaced or dropped as a whole.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

use super::Origin;
use crate::index::BlockHash;

/// The share of the capacity pinned blocks may take by default.
pub const DEFAULT_PIN_SHARE: f64 = 0.25;

/// One cached block.
#[derive(Debug)]
struct Entry {
    data: Bytes,
    /// Last-use stamp (key in `lru`).
    stamp: u64,
    /// Where it was fetched from, until it is served for the first time (then
    /// it counts as a cache hit like any other).
    origin: Option<Origin>,
    /// Owners pinning it (pinned blocks are not in the eviction order).
    pins: u32,
}

#[derive(Debug, Default)]
struct Inner {
    /// Keyed by blake3 names, already uniform: a cheap hasher will do.
    blocks: crate::index::BlockHashMap<Entry>,
    /// last-use stamp → hash (oldest first)
    lru: BTreeMap<u64, BlockHash>,
    bytes: u64,
    clock: u64,
    hits: u64,
    misses: u64,
    inserted: u64,
    evicted: u64,
    /// Owner → the blocks it pins.
    owners: HashMap<String, crate::index::BlockHashSet>,
    pinned_bytes: u64,
    pins_refused: u64,
}

/// A bounded content-addressed block cache, shared by every connection (one short
/// lock per operation).
#[derive(Debug)]
pub struct BlockCache {
    capacity: u64,
    /// Most bytes pinned blocks may take.
    pin_limit: u64,
    inner: Mutex<Inner>,
}

/// Cache counters for status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSnapshot {
    pub capacity_bytes: u64,
    pub bytes: u64,
    pub blocks: u64,
    pub hits: u64,
    pub misses: u64,
    pub inserted: u64,
    pub evicted: u64,
    #[serde(default)]
    pub pinned_bytes: u64,
    #[serde(default)]
    pub pinned_blocks: u64,
    #[serde(default)]
    pub pin_limit_bytes: u64,
    /// Pins refused because the pinned share was full.
    #[serde(default)]
    pub pins_refused: u64,
}

/// What [`BlockCache::pin`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinReport {
    /// Blocks the owner pins now.
    pub pinned: u64,
    /// Blocks not pinned: the pinned share was full.
    pub refused: u64,
    /// Blocks not in the cache (nothing to pin).
    pub absent: u64,
}

impl BlockCache {
    /// A cache holding at most `capacity` bytes of block data.
    pub fn new(capacity: u64) -> BlockCache {
        Self::with_pin_share(capacity, DEFAULT_PIN_SHARE)
    }

    /// A cache whose pinned blocks may take `share` (0..1) of `capacity`.
    pub fn with_pin_share(capacity: u64, share: f64) -> BlockCache {
        #[expect(clippy::cast_sign_loss, reason = "a share in 0..1 of a positive capacity")]
        let pin_limit = (capacity as f64 * share.clamp(0.0, 1.0)) as u64;
        BlockCache {
            capacity,
            pin_limit,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The bound, bytes of block data.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// The block named `hash`, marking it recently used.
    pub fn get(&self, hash: &BlockHash) -> Option<Bytes> {
        let mut inner = self.lock();
        let used = Self::use_entry(&mut inner, hash, false);
        if used.is_none() {
            inner.misses += 1;
        }
        used.map(|(data, _)| data)
    }

    /// The block named `hash` for serving it: also where it came from if this is
    /// its first use since it was fetched (`None`: an ordinary cache hit).
    pub fn take_for_serving(&self, hash: &BlockHash) -> Option<(Bytes, Option<Origin>)> {
        self.take_many_for_serving(std::slice::from_ref(hash))
            .pop()
            .flatten()
    }

    /// [`Self::take_for_serving`] for the blocks of one READ, in order, under one
    /// lock, stopping at the first block absent (`None` there and after it; the
    /// blocks before it count as used, as one call each would have). The
    /// entries are probed first, all of them, with nothing else in between: the
    /// table is larger than the CPU's caches and each probe misses, so
    /// independent probes let the misses overlap instead of queueing behind the
    /// use-order updates.
    pub fn take_many_for_serving(&self, hashes: &[BlockHash]) -> Vec<Option<(Bytes, Option<Origin>)>> {
        let mut inner = self.lock();
        let present = hashes
            .iter()
            .position(|h| !inner.blocks.contains_key(h))
            .unwrap_or(hashes.len());
        let mut out: Vec<Option<(Bytes, Option<Origin>)>> = hashes[..present]
            .iter()
            .map(|h| Self::use_entry(&mut inner, h, true))
            .collect();
        if present < hashes.len() {
            inner.misses += 1;
            out.resize(hashes.len(), None);
        }
        out
    }

    /// Give a block back the origin [`Self::take_for_serving`] took (it was not
    /// served after all).
    pub fn retag(&self, hash: &BlockHash, origin: Origin) {
        if let Some(entry) = self.lock().blocks.get_mut(hash) {
            entry.origin.get_or_insert(origin);
        }
    }

    /// A hit on `hash`: its data, marked as just used (and its origin, taken,
    /// if `first_use`). `None` when absent (the caller counts the miss).
    fn use_entry(
        inner: &mut Inner,
        hash: &BlockHash,
        first_use: bool,
    ) -> Option<(Bytes, Option<Origin>)> {
        inner.clock += 1;
        let now = inner.clock;
        let entry = inner.blocks.get_mut(hash)?;
        let old = std::mem::replace(&mut entry.stamp, now);
        let data = entry.data.clone();
        let origin = if first_use { entry.origin.take() } else { None };
        if entry.pins == 0 {
            inner.lru.remove(&old);
            inner.lru.insert(now, *hash);
        }
        inner.hits += 1;
        Some((data, origin))
    }

    /// Whether the block is present (does not count as a use).
    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.lock().blocks.contains_key(hash)
    }

    /// Insert a block the caller has verified to hash to `hash`. Blocks larger than
    /// the whole cache are not kept.
    pub fn insert(&self, hash: BlockHash, data: Bytes) {
        self.insert_from(hash, data, None);
    }

    /// [`Self::insert`], remembering where the block was fetched from until it is
    /// first served ([`Self::take_for_serving`]).
    pub fn insert_from(&self, hash: BlockHash, data: Bytes, origin: Option<Origin>) {
        let len = data.len() as u64;
        if len > self.capacity {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if let Some(entry) = inner.blocks.get_mut(&hash) {
            let old = std::mem::replace(&mut entry.stamp, now);
            if entry.pins == 0 {
                inner.lru.remove(&old);
                inner.lru.insert(now, hash);
            }
            return;
        }
        while inner.bytes + len > self.capacity {
            let Some((_, victim)) = inner.lru.pop_first() else {
                // Only pinned blocks left: no room.
                return;
            };
            if let Some(gone) = inner.blocks.remove(&victim) {
                inner.bytes -= gone.data.len() as u64;
                inner.evicted += 1;
            }
        }
        inner.blocks.insert(
            hash,
            Entry {
                data,
                stamp: now,
                origin,
                pins: 0,
            },
        );
        inner.lru.insert(now, hash);
        inner.bytes += len;
        inner.inserted += 1;
    }

    /// The cached blocks, as manifests for the appliance's local index: one image
    /// `cache-<size>` per block size present (a block's size is its length; short
    /// tail blocks, which are no power of two, are not listed). Ordered by hash.
    pub fn as_manifests(&self) -> Vec<crate::index::Manifest> {
        let inner = self.lock();
        let mut by_size: BTreeMap<u32, Vec<BlockHash>> = BTreeMap::new();
        for (hash, entry) in &inner.blocks {
            let len = entry.data.len();
            if len.is_power_of_two() && (4096..=(1 << 20)).contains(&len) {
                by_size.entry(len as u32).or_default().push(*hash);
            }
        }
        drop(inner);
        by_size
            .into_iter()
            .map(|(size, mut hashes)| {
                hashes.sort();
                crate::index::Manifest {
                    image: format!("cache-{size}"),
                    size: hashes.len() as u64 * u64::from(size),
                    block_size: size,
                    blocks: hashes.into_iter().map(Some).collect(),
                }
            })
            .collect()
    }

    /// Makes `hashes` the blocks `owner` pins: its earlier pins not among
    /// them are released; blocks in the cache are pinned while the pinned
    /// bytes stay within the pinned share.
    pub fn pin(&self, owner: &str, hashes: &[BlockHash]) -> PinReport {
        let mut inner = self.lock();
        let want: crate::index::BlockHashSet = hashes.iter().copied().collect();
        let had = inner.owners.remove(owner).unwrap_or_default();
        for h in had.difference(&want) {
            Self::release(&mut inner, h);
        }
        let mut report = PinReport::default();
        let mut kept = crate::index::BlockHashSet::default();
        for h in &want {
            if had.contains(h) {
                kept.insert(*h);
                report.pinned += 1;
                continue;
            }
            let Inner {
                blocks,
                lru,
                pinned_bytes,
                pins_refused,
                ..
            } = &mut *inner;
            let Some(entry) = blocks.get_mut(h) else {
                report.absent += 1;
                continue;
            };
            let len = entry.data.len() as u64;
            if entry.pins == 0 {
                if *pinned_bytes + len > self.pin_limit {
                    report.refused += 1;
                    *pins_refused += 1;
                    continue;
                }
                lru.remove(&entry.stamp);
                *pinned_bytes += len;
            }
            entry.pins += 1;
            kept.insert(*h);
            report.pinned += 1;
        }
        if !kept.is_empty() {
            inner.owners.insert(owner.to_owned(), kept);
        }
        report
    }

    /// Releases every pin of `owner`.
    pub fn unpin(&self, owner: &str) {
        let mut inner = self.lock();
        for h in inner.owners.remove(owner).unwrap_or_default() {
            Self::release(&mut inner, &h);
        }
    }

    /// One owner's pin of `hash` goes; unpinned, the block rejoins the
    /// eviction order as just used.
    fn release(inner: &mut Inner, hash: &BlockHash) {
        inner.clock += 1;
        let now = inner.clock;
        let Some(entry) = inner.blocks.get_mut(hash) else {
            return;
        };
        entry.pins = entry.pins.saturating_sub(1);
        if entry.pins == 0 {
            let len = entry.data.len() as u64;
            entry.stamp = now;
            inner.pinned_bytes = inner.pinned_bytes.saturating_sub(len);
            inner.lru.insert(now, *hash);
        }
    }

    /// Cache counters that change whenever the contents do.
    pub fn generation(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.inserted, inner.evicted)
    }

    pub fn snapshot(&self) -> CacheSnapshot {
        let inner = self.lock();
        CacheSnapshot {
            capacity_bytes: self.capacity,
            bytes: inner.bytes,
            blocks: inner.blocks.len() as u64,
            hits: inner.hits,
            misses: inner.misses,
            inserted: inner.inserted,
            evicted: inner.evicted,
            pinned_bytes: inner.pinned_bytes,
            pinned_blocks: inner.blocks.values().filter(|e| e.pins > 0).count() as u64,
            pin_limit_bytes: self.pin_limit,
            pins_refused: inner.pins_refused,
        }
    }
}

/// The appliance serves its cache to peers by hash (the receiver verifies).
impl crate::peer::server::BlockSource for BlockCache {
    fn read_blocks(
        &self,
        hashes: &[BlockHash],
        budget: usize,
    ) -> Vec<crate::peer::proto::BlockReply> {
        use crate::peer::proto::BlockReply;
        let mut used = 0usize;
        hashes
            .iter()
            .map(|h| {
                if used >= budget {
                    return BlockReply::Skipped;
                }
                match self.get(h) {
                    Some(data) => {
                        used += data.len();
                        BlockReply::Found(data)
                    }
                    None => BlockReply::NotFound,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(i: u8, len: usize) -> (BlockHash, Bytes) {
        let data = Bytes::from(vec![i; len]);
        (BlockHash::of(&data), data)
    }

    #[expect(
        clippy::many_single_char_names,
        reason = "blocks a, b, c and their data da, db, dc, as the comments name them"
    )]
    #[test]
    fn evicts_least_recently_used_within_the_byte_bound() {
        let cache = BlockCache::new(300);
        let (a, da) = block(1, 100);
        let (b, db) = block(2, 100);
        let (c, dc) = block(3, 100);
        let (d, dd) = block(4, 100);
        cache.insert(a, da.clone());
        cache.insert(b, db);
        cache.insert(c, dc);
        assert_eq!(cache.get(&a), Some(da)); // a is now the most recent
        cache.insert(d, dd);
        assert!(cache.contains(&a) && cache.contains(&c) && cache.contains(&d));
        assert!(
            !cache.contains(&b),
            "the least recently used block goes first"
        );
        let s = cache.snapshot();
        assert_eq!((s.bytes, s.blocks, s.evicted), (300, 3, 1));
    }

    #[expect(
        clippy::many_single_char_names,
        reason = "blocks a, b and their data da, db, as the comments name them"
    )]
    #[test]
    fn pinned_blocks_outlive_ordinary_traffic_within_their_share() {
        // 1000 bytes, pins up to half of it.
        let cache = BlockCache::with_pin_share(1000, 0.5);
        let (a, da) = block(1, 300);
        let (b, db) = block(2, 300);
        cache.insert(a, da.clone());
        cache.insert(b, db);
        let r = cache.pin("vm1", &[a, b, block(9, 10).0]);
        assert_eq!(r, PinReport { pinned: 1, refused: 1, absent: 1 }, "600 > 500: b not pinned");
        // Ordinary traffic fills the cache many times over: a stays.
        for i in 10..40 {
            let (h, d) = block(i, 100);
            cache.insert(h, d);
        }
        assert_eq!(cache.get(&a), Some(da), "pinned");
        assert!(!cache.contains(&b), "b was evictable");
        let s = cache.snapshot();
        assert_eq!((s.pinned_bytes, s.pinned_blocks, s.pin_limit_bytes, s.pins_refused), (300, 1, 500, 1));
        assert!(s.bytes <= 1000);
        // Two owners: the block stays pinned until both let go.
        cache.pin("vm2", &[a]);
        cache.unpin("vm1");
        assert_eq!(cache.snapshot().pinned_blocks, 1);
        cache.pin("vm2", &[]);
        assert_eq!(cache.snapshot().pinned_bytes, 0);
        for i in 40..60 {
            let (h, d) = block(i, 100);
            cache.insert(h, d);
        }
        assert!(!cache.contains(&a), "unpinned, it ages out like any block");
    }

    #[test]
    fn a_cache_of_pinned_blocks_takes_nothing_over_its_bound() {
        let cache = BlockCache::with_pin_share(200, 1.0);
        let (a, da) = block(1, 200);
        cache.insert(a, da);
        cache.pin("vm", &[a]);
        let (b, db) = block(2, 100);
        cache.insert(b, db);
        assert!(!cache.contains(&b) && cache.contains(&a));
        assert_eq!(cache.snapshot().bytes, 200);
    }

    #[test]
    fn oversized_and_duplicate_inserts() {
        let cache = BlockCache::new(100);
        let (a, da) = block(1, 101);
        cache.insert(a, da);
        assert_eq!(cache.snapshot().blocks, 0);
        let (b, db) = block(2, 60);
        cache.insert(b, db.clone());
        cache.insert(b, db);
        assert_eq!(cache.snapshot().bytes, 60);
    }

    #[test]
    fn origin_is_reported_once_at_the_first_serve() {
        let cache = BlockCache::new(1000);
        let (a, da) = block(1, 100);
        let origin = Origin {
            class: super::super::SourceClass::OtherRack,
            hops: 3,
        };
        cache.insert_from(a, da.clone(), Some(origin));
        assert_eq!(
            cache.get(&a),
            Some(da.clone()),
            "a plain get keeps the origin"
        );
        assert_eq!(cache.take_for_serving(&a), Some((da.clone(), Some(origin))));
        assert_eq!(cache.take_for_serving(&a), Some((da, None)));
    }

    #[test]
    fn a_read_takes_its_blocks_up_to_the_first_absent_one() {
        let cache = BlockCache::new(1000);
        let (a, da) = block(1, 100);
        let (b, db) = block(2, 100);
        let (c, dc) = block(3, 100);
        let (absent, _) = block(4, 100);
        let origin = Origin {
            class: super::super::SourceClass::Rack,
            hops: 1,
        };
        cache.insert_from(a, da.clone(), Some(origin));
        cache.insert(b, db.clone());
        cache.insert_from(c, dc, Some(origin));
        let got = cache.take_many_for_serving(&[a, b, absent, c]);
        assert_eq!(
            got,
            vec![Some((da, Some(origin))), Some((db, None)), None, None]
        );
        let snap = cache.snapshot();
        assert_eq!((snap.hits, snap.misses), (2, 1));
        // c was not taken: it keeps its origin for the READ that serves it.
        assert_eq!(cache.take_for_serving(&c).and_then(|(_, o)| o), Some(origin));
        // The same block twice in one READ: the origin goes with the first.
        let (d, dd) = block(5, 100);
        cache.insert_from(d, dd.clone(), Some(origin));
        assert_eq!(
            cache.take_many_for_serving(&[d, d]),
            vec![Some((dd.clone(), Some(origin))), Some((dd, None))]
        );
    }
}
