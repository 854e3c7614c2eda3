//! The read-optimised "who holds this name" structure.
//!
//! A B-tree lookup per block (redb) is too slow for the planner's rate (≥ 1M random
//! lookups/s on 10M entries; see docs/index.md for the measurement), so the
//! holder index is kept as:
//!
//! - a **snapshot** file: every (16-byte name prefix, source, block) entry, sorted by
//!   prefix, behind a directory of bucket starts indexed by the top bits of the
//!   prefix (≈ 4–8 entries per bucket: one directory read + a short binary search).
//!   It is mmapped, so opening it costs nothing but a header and directory check;
//!   it is written to a temporary file, fsynced and renamed, so a crash leaves the
//!   previous one; it records the store sequence number it reflects;
//! - an in-memory **overlay** for the sources changed since: whole sources replaced
//!   or removed (their snapshot entries are masked: `dirty`) and single blocks
//!   patched in place (masked one by one: `tomb`), plus the entries they now have.
//!
//! On open, every source whose last change is newer than the snapshot is marked
//! dirty and its current entries are loaded from its manifest; when the overlay
//! grows past a threshold the store rewrites the snapshot (compaction).

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use super::{IndexError, IndexIoContext, Result};
use rayon::prelude::*;
use rustc_hash::FxBuildHasher;
use tempfile::NamedTempFile;

use super::{BlockHash, Manifest};

/// Bytes per snapshot entry: 16-byte prefix, u32 source, u32 block index.
pub const ENTRY: usize = 24;
const MAGIC: &[u8; 8] = b"NBHOLD01";
const HEADER: usize = 64;
/// Snapshots up to this size are read in whole at open (≈ 38M blocks).
pub const POPULATE_MAX: u64 = 1 << 30;

/// One holder entry: a name prefix (as a big-endian u128, so numeric order is byte
/// order) held by block `idx` of source `src`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: u128,
    pub src: u32,
    pub idx: u32,
}

/// Set in an entry's `idx` for a coarse group (the rest is the group index).
pub const COARSE_BIT: u32 = 1 << 31;

/// The coarse factor used for a source at `block_size`: groups no larger than the
/// largest block size (4 KiB × 16 = 64 KiB; none above 64 KiB leaves at factor 16).
pub fn coarse_for(block_size: u32, coarse: Option<u32>) -> Option<u32> {
    let f = coarse?;
    (f > 1 && u64::from(block_size) * u64::from(f) <= u64::from(super::chunk::MAX_BLOCK_SIZE))
        .then_some(f)
}

fn key_of(h: &super::BlockHash) -> u128 {
    u128::from_be_bytes(h.prefix())
}

/// Calls `f(key, idx)` for every entry of `m`: its non-zero blocks, then (with a
/// coarse factor) its non-zero coarse groups, `idx | COARSE_BIT`.
pub fn for_each_entry(m: &Manifest, coarse: Option<u32>, mut f: impl FnMut(u128, u32)) {
    for (i, b) in m.blocks.iter().enumerate() {
        if let Some(h) = b {
            f(key_of(h), i as u32);
        }
    }
    if let Some(c) = coarse_for(m.block_size, coarse) {
        for (g, b) in m.blocks.chunks(c as usize).enumerate() {
            if let Some(h) = super::manifest::coarse_name(b) {
                f(key_of(&h), g as u32 | COARSE_BIT);
            }
        }
    }
}

/// Appends the entries of `m` (source `src`), see [`for_each_entry`].
pub fn entries_of(src: u32, m: &Manifest, coarse: Option<u32>, out: &mut Vec<Entry>) {
    for_each_entry(m, coarse, |key, idx| out.push(Entry { key, src, idx }));
}

fn dir_bits_for(n: u64) -> u32 {
    // ≈ 4 entries per bucket, at least 2 buckets, at most 2^26 (512 MiB directory
    // would be silly; 2^26 buckets covers 256M entries at 4 per bucket).
    (64 - (n / 4).max(1).leading_zeros()).clamp(1, 26)
}

/// The snapshot file, mmapped.
pub struct Snapshot {
    map: Option<memmap2::Mmap>,
    pub seq: u64,
    pub len: u64,
    /// Coarse factor the entries were built with (0: none).
    pub coarse: u32,
    bits: u32,
}

impl Snapshot {
    /// An empty snapshot at sequence 0 (no file).
    pub fn empty() -> Self {
        Self {
            map: None,
            seq: 0,
            len: 0,
            coarse: 0,
            bits: 1,
        }
    }

    /// Writes `entries` (any order; sorted here) as the snapshot at `path` for store
    /// sequence `seq`, atomically (temporary file, fsync, rename, fsync directory).
    pub fn write(path: &Path, seq: u64, coarse: u32, entries: &mut [Entry]) -> Result<()> {
        entries.par_sort_unstable_by_key(|e| e.key);
        let n = entries.len() as u64;
        let bits = dir_bits_for(n);
        let buckets = 1usize << bits;
        let mut dir = vec![0u64; buckets + 1];
        {
            // dir[b] = index of the first entry in bucket >= b.
            let mut j = 0usize;
            for (b, d) in dir.iter_mut().enumerate().take(buckets) {
                while j < entries.len() && ((entries[j].key >> (128 - bits)) as usize) < b {
                    j += 1;
                }
                *d = j as u64;
            }
            dir[buckets] = n;
        }
        let mut dir_bytes = Vec::with_capacity(dir.len() * 8);
        for d in &dir {
            dir_bytes.extend_from_slice(&d.to_le_bytes());
        }
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&seq.to_le_bytes());
        header[16..24].copy_from_slice(&n.to_le_bytes());
        header[24..28].copy_from_slice(&bits.to_le_bytes());
        header[28..32].copy_from_slice(&crc32c::crc32c(&dir_bytes).to_le_bytes());
        header[32..36].copy_from_slice(&coarse.to_le_bytes());
        let hcrc = crc32c::crc32c(&header[..36]);
        header[36..40].copy_from_slice(&hcrc.to_le_bytes());

        let parent = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = NamedTempFile::new_in(parent)
            .io_context(|| format!("create a temporary file in {}", parent.display()))?;
        let mut w = BufWriter::with_capacity(4 << 20, tmp);
        w.write_all(&header)?;
        w.write_all(&dir_bytes)?;
        let mut buf = [0u8; ENTRY];
        for e in entries.iter() {
            buf[..16].copy_from_slice(&e.key.to_be_bytes());
            buf[16..20].copy_from_slice(&e.src.to_le_bytes());
            buf[20..24].copy_from_slice(&e.idx.to_le_bytes());
            w.write_all(&buf)?;
        }
        let tmp = w
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)?;
        tmp.as_file()
            .sync_all()
            .io_context(|| format!("sync {}", tmp.path().display()))?;
        tmp.persist(path)
            .map_err(|e| IndexError::io(format!("rename to {}", path.display()), e.error))?;
        // The rename is durable only once the directory is.
        File::open(parent)
            .and_then(|d| d.sync_all())
            .io_context(|| format!("sync {}", parent.display()))?;
        Ok(())
    }

    /// Opens and checks (header, directory checksum, length) the snapshot at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).io_context(|| format!("open {}", path.display()))?;
        // Up to POPULATE_MAX the whole file is read in at open (MAP_POPULATE: one
        // sequential read, ~0.5 s for 10M blocks from a cold page cache at 500 MB/s),
        // so lookups never wait for random page faults; above it, pages are
        // faulted in on demand with background readahead.
        let len = f.metadata()?.len();
        let mut mo = memmap2::MmapOptions::new();
        if len <= POPULATE_MAX {
            mo.populate();
        }
        // SAFETY: the file is only ever replaced by rename, never written in place,
        // so the mapping sees immutable bytes.
        let map = unsafe { mo.map(&f) }?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(IndexError::Corrupt(format!(
                "{}: not a holder snapshot",
                path.display()
            )));
        }
        let h = &map[..HEADER];
        let hcrc = u32_le(h, 36);
        if crc32c::crc32c(&h[..36]) != hcrc {
            return Err(IndexError::Corrupt(format!(
                "{}: header checksum",
                path.display()
            )));
        }
        let seq = u64_le(h, 8);
        let len = u64_le(h, 16);
        let bits = u32_le(h, 24);
        let coarse = u32_le(h, 32);
        if !(1..=26).contains(&bits) {
            return Err(IndexError::Corrupt(format!(
                "{}: directory size",
                path.display()
            )));
        }
        let dir_len = ((1usize << bits) + 1) * 8;
        // The entry count comes from the file: checked arithmetic, so a forged
        // count cannot wrap around to the file's real length.
        let expect = len
            .checked_mul(ENTRY as u64)
            .and_then(|e| e.checked_add(HEADER as u64 + dir_len as u64));
        if expect != Some(map.len() as u64) {
            return Err(IndexError::Corrupt(format!(
                "{}: length {} does not hold {len} entries",
                path.display(),
                map.len(),
            )));
        }
        let dcrc = u32_le(h, 28);
        let dir = &map[HEADER..HEADER + dir_len];
        if crc32c::crc32c(dir) != dcrc {
            return Err(IndexError::Corrupt(format!(
                "{}: directory checksum",
                path.display()
            )));
        }
        // Lookups index the entries by the directory: it must be a
        // non-decreasing list of positions ending at `len`.
        let mut prev = 0u64;
        for d in dir.chunks_exact(8) {
            let d = u64::from_le_bytes(d.try_into().expect("8 bytes"));
            if d < prev || d > len {
                return Err(IndexError::Corrupt(format!(
                    "{}: directory out of order",
                    path.display()
                )));
            }
            prev = d;
        }
        if prev != len {
            return Err(IndexError::Corrupt(format!(
                "{}: directory does not end at the entry count",
                path.display()
            )));
        }
        let _ = map.advise(memmap2::Advice::Random);
        if len > POPULATE_MAX {
            let _ = map.advise(memmap2::Advice::WillNeed);
        }
        Ok(Self {
            map: Some(map),
            seq,
            len,
            coarse,
            bits,
        })
    }

    #[inline]
    fn dir(&self, b: usize) -> usize {
        let m = self.map.as_deref().unwrap_or(&[]);
        let o = HEADER + b * 8;
        u64::from_le_bytes(m[o..o + 8].try_into().expect("8 bytes")) as usize
    }

    #[inline]
    fn entry(&self, i: usize) -> Entry {
        let m = self.map.as_deref().unwrap_or(&[]);
        let o = HEADER + ((1usize << self.bits) + 1) * 8 + i * ENTRY;
        let e = &m[o..o + ENTRY];
        Entry {
            key: u128::from_be_bytes(e[..16].try_into().expect("16 bytes")),
            src: u32::from_le_bytes(e[16..20].try_into().expect("4 bytes")),
            idx: u32::from_le_bytes(e[20..24].try_into().expect("4 bytes")),
        }
    }

    #[inline]
    fn key_at(&self, i: usize) -> u128 {
        let m = self.map.as_deref().unwrap_or(&[]);
        let o = HEADER + ((1usize << self.bits) + 1) * 8 + i * ENTRY;
        u128::from_be_bytes(m[o..o + 16].try_into().expect("16 bytes"))
    }

    /// Calls `f` for every entry with prefix `key`.
    #[inline]
    pub fn lookup(&self, key: u128, mut f: impl FnMut(Entry)) {
        if self.len == 0 {
            return;
        }
        let b = (key >> (128 - self.bits)) as usize;
        let (mut lo, mut hi) = (self.dir(b), self.dir(b + 1));
        while lo < hi {
            let mid = usize::midpoint(lo, hi);
            if self.key_at(mid) < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let end = self.len as usize;
        let mut i = lo;
        while i < end && self.key_at(i) == key {
            f(self.entry(i));
            i += 1;
        }
    }

    /// Every entry, in key order.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = Entry> + '_ {
        (0..self.len as usize).map(|i| self.entry(i))
    }

    /// Bytes of the snapshot file.
    #[cfg(feature = "testing")]
    pub fn file_bytes(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.len() as u64)
    }
}

/// The overlay's holders of one name: almost always one, stored inline.
enum Holders {
    One((u32, u32)),
    Many(Vec<(u32, u32)>),
}

impl Holders {
    fn as_slice(&self) -> &[(u32, u32)] {
        match self {
            Holders::One(x) => std::slice::from_ref(x),
            Holders::Many(v) => v,
        }
    }
}

/// Snapshot + overlay: the full holder index. Sources are dense u32 ids. The
/// overlay's maps hash with Fx (rustc-hash): their keys are blake3 prefixes and
/// (source, block) positions, neither chosen freely by anyone (see
/// docs/decisions.md, "Index records and hashers").
pub struct HolderTable {
    pub snap: Snapshot,
    coarse: Option<u32>,
    dirty: Vec<bool>,
    tomb: HashSet<u64, FxBuildHasher>,
    adds: HashMap<u128, Holders, FxBuildHasher>,
    n_adds: usize,
}

impl HolderTable {
    pub fn new(snap: Snapshot, coarse: Option<u32>) -> Self {
        Self {
            snap,
            coarse,
            dirty: Vec::new(),
            tomb: HashSet::default(),
            adds: HashMap::default(),
            n_adds: 0,
        }
    }

    /// Entries held by the overlay (the compaction trigger).
    pub fn overlay_len(&self) -> usize {
        self.n_adds + self.tomb.len()
    }

    fn is_dirty(&self, s: u32) -> bool {
        self.dirty.get(s as usize).copied().unwrap_or(false)
    }

    fn set_dirty(&mut self, s: u32) {
        let s = s as usize;
        if self.dirty.len() <= s {
            self.dirty.resize(s + 1, false);
        }
        self.dirty[s] = true;
    }

    /// Calls `f(src, idx)` for every live entry with prefix `key`.
    #[inline]
    pub fn lookup(&self, key: u128, mut f: impl FnMut(u32, u32)) {
        self.snap.lookup(key, |e| {
            if !self.is_dirty(e.src)
                && (self.tomb.is_empty() || !self.tomb.contains(&pos(e.src, e.idx)))
            {
                f(e.src, e.idx);
            }
        });
        if let Some(v) = self.adds.get(&key) {
            for &(s, i) in v.as_slice() {
                f(s, i);
            }
        }
    }

    fn add(&mut self, key: u128, src: u32, idx: u32) {
        use std::collections::hash_map::Entry as E;
        match self.adds.entry(key) {
            E::Vacant(v) => {
                v.insert(Holders::One((src, idx)));
            }
            E::Occupied(mut o) => {
                let h = o.get_mut();
                match h {
                    Holders::One(x) => *h = Holders::Many(vec![*x, (src, idx)]),
                    Holders::Many(v) => v.push((src, idx)),
                }
            }
        }
        self.n_adds += 1;
    }

    fn remove_add(&mut self, key: u128, src: u32, idx: u32) {
        let Some(h) = self.adds.get_mut(&key) else {
            return;
        };
        let empty = match h {
            Holders::One(x) if *x == (src, idx) => true,
            Holders::One(_) => return,
            Holders::Many(v) => {
                let Some(p) = v.iter().position(|&x| x == (src, idx)) else {
                    return;
                };
                v.swap_remove(p);
                if v.len() == 1 {
                    *h = Holders::One(v[0]);
                }
                false
            }
        };
        if empty {
            self.adds.remove(&key);
        }
        self.n_adds -= 1;
    }

    /// Source `s` was replaced (`old` → `new`; `None`: absent).
    pub fn replace_source(&mut self, s: u32, old: Option<&Manifest>, new: Option<&Manifest>) {
        if let Some(old) = old {
            let mut v = Vec::new();
            entries_of(s, old, self.coarse, &mut v);
            for e in v {
                self.remove_add(e.key, s, e.idx);
            }
        }
        self.set_dirty(s);
        if let Some(new) = new {
            let mut v = Vec::new();
            entries_of(s, new, self.coarse, &mut v);
            self.adds.reserve(v.len());
            for e in v {
                self.add(e.key, e.src, e.idx);
            }
        }
    }

    /// Blocks `idxs` of source `s` changed from `old` to `new` (and the blocks past
    /// the new end, if it shrank, are listed in `idxs`).
    pub fn patch_source(&mut self, s: u32, old: &Manifest, new: &Manifest, idxs: &[u32]) {
        let dirty = self.is_dirty(s);
        let replace =
            |this: &mut Self, i: u32, before: Option<BlockHash>, after: Option<BlockHash>| {
                if let Some(h) = before {
                    this.remove_add(key_of(&h), s, i);
                }
                if !dirty {
                    this.tomb.insert(pos(s, i));
                }
                if let Some(h) = after {
                    this.add(key_of(&h), s, i);
                }
            };
        for &i in idxs {
            let before = old.blocks.get(i as usize).copied().flatten();
            let after = new.blocks.get(i as usize).copied().flatten();
            replace(self, i, before, after);
        }
        if let Some(c) = coarse_for(new.block_size, self.coarse) {
            let c = c as usize;
            let mut groups: Vec<usize> = idxs.iter().map(|&i| i as usize / c).collect();
            if old.blocks.len() != new.blocks.len() {
                // The old and new last groups change length.
                groups.extend(old.blocks.len().checked_sub(1).map(|i| i / c));
                groups.extend(new.blocks.len().checked_sub(1).map(|i| i / c));
            }
            groups.sort_unstable();
            groups.dedup();
            for g in groups {
                let before = old.coarse_group(g, c);
                let after = new.coarse_group(g, c);
                if before != after {
                    replace(self, g as u32 | COARSE_BIT, before, after);
                }
            }
        }
    }
}

#[inline]
fn pos(s: u32, i: u32) -> u64 {
    (u64::from(s) << 32) | u64::from(i)
}

/// Little-endian integers at fixed offsets of the (length-checked) header.
fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8, c: u8) -> u128 {
        let mut k = [0u8; 16];
        k[0] = b;
        k[15] = c;
        u128::from_be_bytes(k)
    }

    #[test]
    fn snapshot_round_trip_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h");
        for n in [0usize, 1, 2, 3, 100, 5000] {
            let mut x = 12345u64 + n as u64;
            let mut entries: Vec<Entry> = (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    Entry {
                        // Few distinct keys when small, so duplicates occur.
                        key: u128::from(x) << 64 | (i % 3) as u128,
                        src: (i % 7) as u32,
                        idx: i as u32,
                    }
                })
                .collect();
            entries.extend((0..n.min(50)).map(|i| Entry {
                key: key(0xff, 1),
                src: 1,
                idx: i as u32,
            }));
            let want = entries.clone();
            Snapshot::write(&p, 42, 0, &mut entries).unwrap();
            let s = Snapshot::open(&p).unwrap();
            assert_eq!(s.seq, 42);
            assert_eq!(s.len, want.len() as u64);
            let sorted: Vec<u128> = s.iter().map(|e| e.key).collect();
            assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
            for e in &want {
                let mut got = vec![];
                s.lookup(e.key, |f| got.push(f));
                assert!(got.contains(e));
                assert!(got.iter().all(|f| f.key == e.key));
                let n_same = want.iter().filter(|f| f.key == e.key).count();
                assert_eq!(got.len(), n_same);
            }
            let mut none = 0;
            s.lookup(key(0x7f, 9), |_| none += 1);
            assert_eq!(none, 0);
        }
    }

    #[test]
    fn corrupt_snapshot_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h");
        let mut e = vec![Entry {
            key: 5,
            src: 1,
            idx: 2,
        }];
        Snapshot::write(&p, 1, 0, &mut e).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        b[70] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(Snapshot::open(&p).is_err());
        std::fs::write(&p, &b[..b.len() - 1]).unwrap();
        assert!(Snapshot::open(&p).is_err());
    }

    /// Rewrites the header's checksum after editing it (what damage that happens
    /// to keep the checksum right looks like).
    fn reseal(b: &mut [u8]) {
        let c = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn forged_counts_and_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h");
        let mut e: Vec<Entry> = (0..40u32)
            .map(|i| Entry {
                key: u128::from(i) << 120,
                src: 0,
                idx: i,
            })
            .collect();
        Snapshot::write(&p, 1, 0, &mut e).unwrap();
        let good = std::fs::read(&p).unwrap();
        // An entry count whose size in bytes wraps around to the file's length.
        let mut b = good.clone();
        // 2^61 entries of 24 bytes are 3 × 2^64 bytes: 0 after wrapping.
        let wrap = 40u64 + (1 << 61);
        assert_eq!(wrap.wrapping_mul(ENTRY as u64), 40 * ENTRY as u64);
        b[16..24].copy_from_slice(&wrap.to_le_bytes());
        reseal(&mut b);
        std::fs::write(&p, &b).unwrap();
        assert!(Snapshot::open(&p).is_err());
        // A directory pointing past the entries, with its checksum fixed.
        let mut b = good.clone();
        let bits = u32_le(&b, 24);
        let dir_len = ((1usize << bits) + 1) * 8;
        b[HEADER + 8..HEADER + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        let c = crc32c::crc32c(&b[HEADER..HEADER + dir_len]);
        b[28..32].copy_from_slice(&c.to_le_bytes());
        reseal(&mut b);
        std::fs::write(&p, &b).unwrap();
        assert!(Snapshot::open(&p).is_err());
        std::fs::write(&p, &good).unwrap();
        assert_eq!(Snapshot::open(&p).unwrap().len, 40);
    }
}
