//! One image served from one manifest, whatever protocol reads it: its taint,
//! its access history, and the work on blocks a read of a byte range needs —
//! the manifest blocks it touches, its data assembled from zero and cached
//! blocks ([`ServedImage::assemble`]), the blocks still missing, and the
//! read-ahead after it (in the order of the access history, which it keeps).

use std::ops::Range;
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc, OnceLock,
};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use crate::fetch::{zero_block, BlockCache, Provenance, SourceClass};
use crate::index::{BlockHash, Manifest};
use crate::plan::{AccessHistory, ReadAhead};

/// One image served from one manifest.
#[derive(Debug)]
pub struct ServedImage {
    pub manifest: Manifest,
    tainted: AtomicBool,
    /// Why it was tainted (the first reason).
    taint_reason: OnceLock<String>,
    /// What a taint warning names (e.g. `iqn…/1` or `http:/images/b.raw`).
    label: String,
    /// Manifest block up to which read-ahead has been asked for.
    readahead_mark: AtomicU64,
    /// Which blocks past sessions (boots) read, in what order.
    history: Mutex<UsageState>,
    /// The latest prefetch of this image.
    pub prefetch: Arc<Mutex<crate::fetch::prefetch::PrefetchStatus>>,
}

/// An image's access history and the read-ahead order derived from it.
#[derive(Debug)]
struct UsageState {
    history: AccessHistory,
    /// Rebuilt when the history gains a boot.
    readahead: Option<(u32, Arc<ReadAhead>)>,
}

impl ServedImage {
    /// Serve `manifest` (its block size must be non-zero); `label` names it in logs.
    pub fn new(label: String, manifest: Manifest) -> ServedImage {
        let image = manifest.image.clone();
        ServedImage {
            manifest,
            tainted: AtomicBool::new(false),
            taint_reason: OnceLock::new(),
            label,
            readahead_mark: AtomicU64::new(0),
            history: Mutex::new(UsageState {
                history: AccessHistory::new(&image),
                readahead: None,
            }),
            prefetch: Arc::default(),
        }
    }

    pub fn tainted(&self) -> bool {
        self.tainted.load(Ordering::Relaxed)
    }

    /// Why it was tainted, if it was.
    pub fn taint_reason(&self) -> Option<String> {
        self.taint_reason.get().cloned()
    }

    /// Stop serving this image (its content may differ from the manifest).
    pub fn taint(&self, why: &str) {
        let _ = self.taint_reason.set(why.to_string());
        if !self.tainted.swap(true, Ordering::Relaxed) {
            tracing::warn!(image = %self.label, why, "image no longer served locally");
        }
    }

    /// `range` if it lies inside the image.
    pub fn inside(&self, range: &Range<u64>) -> bool {
        range.start <= range.end && range.end <= self.manifest.size
    }

    /// The manifest blocks a byte range touches (`None` when it reaches past the end).
    fn block_span(&self, range: &Range<u64>) -> Option<Range<usize>> {
        if !self.inside(range) {
            return None;
        }
        let bs = u64::from(self.manifest.block_size);
        Some((range.start / bs) as usize..range.end.div_ceil(bs) as usize)
    }

    /// The data of `range` as slices of zero and cached blocks, if every block
    /// it touches is available now, with where each byte came from (a block
    /// fetched from a peer counts as that peer's the first time it is served).
    pub fn assemble(
        &self,
        range: &Range<u64>,
        cache: &BlockCache,
    ) -> Option<(Vec<Bytes>, Provenance)> {
        if !self.inside(range) {
            return None;
        }
        let (start, end) = (range.start, range.end);
        let bs = u64::from(self.manifest.block_size);
        // The READ's cached blocks, taken from the cache in one call (one lock,
        // the probes together), then laid out in order with the zero blocks.
        let first = (start / bs) as usize;
        let last = end.div_ceil(bs) as usize;
        let wanted: Vec<BlockHash> = self
            .manifest
            .blocks
            .get(first..last.min(self.manifest.blocks.len()))
            .unwrap_or_default()
            .iter()
            .flatten()
            .copied()
            .collect();
        let taken = cache.take_many_for_serving(&wanted);
        let mut taken_in_order = wanted.iter().zip(&taken);
        let mut pieces = Vec::new();
        let mut prov = Provenance::default();
        let mut pos = start;
        let complete = loop {
            if pos >= end {
                break true;
            }
            let index = (pos / bs) as usize;
            let block_start = index as u64 * bs;
            let block_len = self.manifest.block_len(index);
            let from = (pos - block_start) as usize;
            let to = (end.min(block_start + block_len) - block_start) as usize;
            let served = (to - from) as u64;
            let data = match self.manifest.blocks.get(index) {
                None => break false,
                Some(None) => {
                    prov.add(SourceClass::Zero, None, served);
                    zero_block(block_len as usize)
                }
                Some(Some(_)) => {
                    let Some((_, Some((data, origin)))) = taken_in_order.next() else {
                        break false;
                    };
                    if data.len() as u64 != block_len {
                        break false;
                    }
                    match origin {
                        Some(o) => prov.add(o.class, Some(o.hops), served),
                        None => prov.add(SourceClass::Cache, None, served),
                    }
                    data.clone()
                }
            };
            pieces.push(data.slice(from..to));
            pos = block_start + to as u64;
        };
        if !complete {
            // Not served after all: the fetched blocks keep their origin.
            for (hash, used) in wanted.iter().zip(taken) {
                if let Some((_, Some(origin))) = used {
                    cache.retag(hash, origin);
                }
            }
            return None;
        }
        Some((pieces, prov))
    }

    /// The distinct non-zero blocks of `range` the cache lacks (empty when the
    /// range reaches past the manifest: it is not served anyway).
    pub fn missing(&self, range: &Range<u64>, cache: &BlockCache) -> Vec<BlockHash> {
        let Some(span) = self.block_span(range) else {
            return Vec::new();
        };
        self.absent(span, cache)
    }

    /// The distinct non-zero hashes at `positions` that the cache lacks, in order.
    fn absent(
        &self,
        positions: impl IntoIterator<Item = usize>,
        cache: &BlockCache,
    ) -> Vec<BlockHash> {
        let mut seen = crate::index::BlockHashSet::default();
        positions
            .into_iter()
            .filter_map(|p| self.manifest.blocks.get(p).copied().flatten())
            .filter(|h| !cache.contains(h) && seen.insert(*h))
            .collect()
    }

    /// The blocks (manifest positions) `range` touches, for access history.
    pub fn blocks_read(&self, range: &Range<u64>) -> Range<usize> {
        self.block_span(range).unwrap_or(0..0)
    }

    fn usage(&self) -> MutexGuard<'_, UsageState> {
        self.history.lock()
    }

    /// The access history of this image (what past sessions read).
    pub fn history(&self) -> AccessHistory {
        self.usage().history.clone()
    }

    /// Start from a saved history (it must be of this image's block count).
    pub fn set_history(&self, mut history: AccessHistory) {
        let n = self.manifest.blocks.len() as u64;
        history.blocks.retain(|&b, _| b < n);
        history.image.clone_from(&self.manifest.image);
        let mut u = self.usage();
        u.history = history;
        u.readahead = None;
    }

    /// Record one session's reads (first-read order) as a boot.
    pub fn record_boot(&self, reads: &[u64]) {
        if reads.is_empty() {
            return;
        }
        let mut u = self.usage();
        u.history.image.clone_from(&self.manifest.image);
        u.history.record_boot(reads.iter().copied());
        u.readahead = None;
    }

    /// The access history's read-ahead order, rebuilt when the history gained a
    /// boot (`None` without history). A rebuild restarts the read-ahead mark: it
    /// counts positions in this order.
    fn history_order(&self) -> Option<Arc<ReadAhead>> {
        let mut u = self.usage();
        let boots = u.history.boots;
        if boots == 0 {
            return None;
        }
        if let Some((b, ra)) = &u.readahead {
            if *b == boots {
                return Some(ra.clone());
            }
        }
        let ra = Arc::new(ReadAhead::new(
            &u.history,
            &self.manifest,
            f64::MIN_POSITIVE,
        ));
        u.readahead = Some((boots, ra.clone()));
        self.readahead_mark.store(0, Ordering::Relaxed);
        Some(ra)
    }

    /// On-demand read-ahead after a read of `range`: the next `window` blocks
    /// past it that are not cached — in the access history's order when the
    /// image has one (only blocks past sessions read, and nothing after a block
    /// none of them read), else in image order — unless the image's read-ahead
    /// already asked for them. It is asked for again once a read comes within
    /// half a window of where it stopped; a read far behind it (another reader,
    /// or a jump) restarts it from there. So a read costs at most one window of
    /// cache lookups, and most cost none.
    pub fn readahead(
        &self,
        range: &Range<u64>,
        window: usize,
        cache: &BlockCache,
    ) -> Vec<BlockHash> {
        let Some(span) = self.block_span(range) else {
            return Vec::new();
        };
        let mark = &self.readahead_mark;
        match self.history_order() {
            None => {
                let blocks = self.manifest.blocks.len();
                match readahead_range(mark, span.end, window, blocks) {
                    Some(range) => self.absent(range, cache),
                    None => Vec::new(),
                }
            }
            Some(ra) => {
                let last = span.end.saturating_sub(1) as u64;
                let likely = ra.likely();
                let range = ra
                    .position(last)
                    .and_then(|p| readahead_range(mark, p + 1, window, likely.len()));
                match range {
                    Some(range) => self.absent(likely[range].iter().map(|&b| b as usize), cache),
                    None => Vec::new(),
                }
            }
        }
    }

    /// Restart read-ahead from `block` (tests: a reader far behind).
    #[cfg(test)]
    pub(crate) fn set_readahead_mark(&self, block: u64) {
        self.readahead_mark.store(block, Ordering::Relaxed);
    }
}

/// The blocks to read ahead after a read ending at block `end`, advancing `mark`
/// (how far read-ahead has been asked for): `None` when the read is more than
/// half a window before the mark (already covered) and not far behind it.
fn readahead_range(
    mark: &AtomicU64,
    end: usize,
    window: usize,
    blocks: usize,
) -> Option<std::ops::Range<usize>> {
    if window == 0 || end >= blocks {
        return None;
    }
    let (end, window, blocks) = (end as u64, window as u64, blocks as u64);
    let mut current = mark.load(Ordering::Relaxed);
    loop {
        let behind = end + 2 * window < current;
        let from = if behind { end } else { current.max(end) };
        if !behind && end + window / 2 < current {
            return None;
        }
        let to = (end + window).min(blocks);
        if from >= to {
            return None;
        }
        match mark.compare_exchange(current, to, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(from as usize..to as usize),
            Err(now) => current = now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readahead_advances_once_per_half_window_and_restarts_behind() {
        let mark = AtomicU64::new(0);
        assert_eq!(readahead_range(&mark, 8, 100, 1000), Some(8..108));
        // Within the first half of what was asked: nothing new.
        assert_eq!(readahead_range(&mark, 40, 100, 1000), None);
        // Past half: the next stretch, from where the last one stopped.
        assert_eq!(readahead_range(&mark, 60, 100, 1000), Some(108..160));
        // Clipped at the end of the image; nothing past it.
        assert_eq!(readahead_range(&mark, 950, 100, 1000), Some(950..1000));
        assert_eq!(readahead_range(&mark, 1000, 100, 1000), None);
        // Far behind the mark: restart there.
        assert_eq!(readahead_range(&mark, 10, 100, 1000), Some(10..110));
        assert_eq!(readahead_range(&mark, 10, 0, 1000), None);
    }

    #[test]
    fn a_byte_range_assembles_across_blocks_and_not_past_the_end() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 | 1).collect();
        let m = crate::index::chunk::manifest_of_bytes("i", &data, 4096);
        let image = ServedImage::new("i".into(), m.clone());
        let cache = BlockCache::new(1 << 20);
        for (i, h) in m.blocks.iter().enumerate() {
            let h = h.unwrap();
            let end = ((i + 1) * 4096).min(data.len());
            cache.insert(h, Bytes::copy_from_slice(&data[i * 4096..end]));
        }
        let (pieces, _) = image.assemble(&(100..9_000), &cache).unwrap();
        assert_eq!(pieces.concat(), &data[100..9_000]);
        let (pieces, _) = image.assemble(&(5_000..10_000), &cache).unwrap();
        assert_eq!(pieces.concat(), &data[5_000..]);
        assert!(image.assemble(&(5_000..10_001), &cache).is_none());
        assert_eq!(image.blocks_read(&(4095..4097)), 0..2);
        assert_eq!(image.blocks_read(&(0..10_001)), 0..0);
    }
}
