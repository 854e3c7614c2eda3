//! One LUN the splicer may serve, built from one manifest: its block length,
//! its taint, and the work on blocks a READ of it needs: the manifest blocks it
//! touches, its data assembled from zero and cached blocks
//! ([`ServedLun::assemble`]), the blocks still missing, and the read-ahead
//! after it (in the order of the LUN's access history, which it keeps).

use std::sync::{
    atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    Arc, OnceLock,
};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use crate::fetch::{zero_block, BlockCache, Provenance, SourceClass};
use crate::index::{BlockHash, Manifest};
use crate::plan::{AccessHistory, ReadAhead};
use crate::splice::scsi::ReadCommand;

use super::CatalogError;

/// How a served LUN answers READs (see `docs/splicer-protocol.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeDesign {
    /// A zero-length READ goes to the target, which stays the authority for status.
    #[default]
    Shadow,
    /// Cached READs never reach the target (split sequence numbers).
    Local,
}

/// When a served LUN's blocks are fetched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchMode {
    /// What READs touch, plus read-ahead (in the access history's order).
    #[default]
    OnDemand,
    /// The whole image into the cache at a session's login, in the background,
    /// within the per-link budget (`splicer.prefetch_budget_mbps`).
    Prefetch,
}

/// One LUN the splicer may serve.
#[derive(Debug)]
pub struct ServedLun {
    pub target: String,
    pub lun: u16,
    pub design: ServeDesign,
    /// Logical block length of the LUN (what READ LBAs count): the declared one, or
    /// the target's once it reported one (0 until then: nothing is served).
    logical_block_size: AtomicU32,
    pub manifest: Manifest,
    tainted: AtomicBool,
    /// Why it was tainted (the first reason).
    taint_reason: OnceLock<String>,
    /// Manifest block up to which read-ahead has been asked for.
    readahead_mark: AtomicU64,
    /// Which blocks past sessions (boots) read, in what order.
    history: Mutex<UsageState>,
    pub mode: FetchMode,
    /// The latest prefetch of this LUN.
    pub prefetch: Arc<parking_lot::Mutex<crate::fetch::prefetch::PrefetchStatus>>,
}

/// A LUN's access history and the read-ahead order derived from it.
#[derive(Debug)]
struct UsageState {
    history: AccessHistory,
    /// Rebuilt when the history gains a boot.
    readahead: Option<(u32, Arc<ReadAhead>)>,
}

impl ServedLun {
    pub fn new(
        target: String,
        lun: u16,
        design: ServeDesign,
        declared_block_length: Option<u32>,
        manifest: Manifest,
    ) -> Result<ServedLun, CatalogError> {
        let invalid = |message: &str| CatalogError::Invalid {
            target: target.clone(),
            lun,
            message: message.to_string(),
        };
        if declared_block_length == Some(0) || manifest.block_size == 0 {
            return Err(invalid("block sizes must be non-zero"));
        }
        if declared_block_length.is_some_and(|l| !manifest.block_size.is_multiple_of(l)) {
            return Err(invalid(
                "the manifest block size must be a multiple of the logical block size",
            ));
        }
        let logical_block_size = AtomicU32::new(declared_block_length.unwrap_or(0));
        let image = manifest.image.clone();
        Ok(ServedLun {
            target,
            lun,
            design,
            logical_block_size,
            manifest,
            tainted: AtomicBool::new(false),
            taint_reason: OnceLock::new(),
            readahead_mark: AtomicU64::new(0),
            history: Mutex::new(UsageState {
                history: AccessHistory::new(&image),
                readahead: None,
            }),
            mode: FetchMode::OnDemand,
            prefetch: Arc::default(),
        })
    }

    /// The logical block length READs are served with (0: not known yet).
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size.load(Ordering::Relaxed)
    }

    /// Take the target's block length if none was declared; a LUN keeps the first
    /// length it took (a later, different one makes it disagree: not served).
    pub(super) fn adopt_block_length(&self, block_length: u32) {
        let _ = self.logical_block_size.compare_exchange(
            0,
            block_length,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// LUN capacity in logical blocks, as the manifest describes it.
    pub fn capacity_blocks(&self) -> u64 {
        match self.logical_block_size() {
            0 => 0,
            lbs => self.manifest.size / u64::from(lbs),
        }
    }

    pub fn tainted(&self) -> bool {
        self.tainted.load(Ordering::Relaxed)
    }

    /// Why it was tainted, if it was.
    pub fn taint_reason(&self) -> Option<String> {
        self.taint_reason.get().cloned()
    }

    /// Stop serving this LUN (its content may differ from the manifest).
    pub fn taint(&self, why: &str) {
        let _ = self.taint_reason.set(why.to_string());
        if !self.tainted.swap(true, Ordering::Relaxed) {
            tracing::warn!(target = %self.target, lun = self.lun, why, "LUN no longer served locally");
        }
    }

    /// The READ's byte range on the LUN, if it lies inside the manifest.
    pub(super) fn byte_range(&self, read: &ReadCommand) -> Option<(u64, u64)> {
        let lbs = u64::from(self.logical_block_size());
        if lbs == 0 {
            return None;
        }
        let start = read.lba.checked_mul(lbs)?;
        let end = start.checked_add(u64::from(read.blocks) * lbs)?;
        (end <= self.manifest.size).then_some((start, end))
    }

    /// The manifest blocks a READ touches (`None` when it reaches past the end).
    fn block_span(&self, read: &ReadCommand) -> Option<std::ops::Range<usize>> {
        let (start, end) = self.byte_range(read)?;
        let bs = u64::from(self.manifest.block_size);
        Some((start / bs) as usize..end.div_ceil(bs) as usize)
    }

    /// The READ's data as slices of zero and cached blocks (exactly blocks × logical
    /// block size bytes), if every block it touches is available now, with where
    /// each came from (a block fetched from a peer counts as that peer's the first
    /// time it is served).
    pub fn assemble(
        &self,
        read: &ReadCommand,
        cache: &BlockCache,
    ) -> Option<(Vec<Bytes>, Provenance)> {
        let (start, end) = self.byte_range(read)?;
        let bs = u64::from(self.manifest.block_size);
        let mut pieces = Vec::new();
        let mut prov = Provenance::default();
        let mut taken = Vec::new();
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
                Some(Some(hash)) => {
                    let Some((data, origin)) = cache.take_for_serving(hash) else {
                        break false;
                    };
                    if let Some(o) = origin {
                        taken.push((*hash, o));
                    }
                    if data.len() as u64 != block_len {
                        break false;
                    }
                    match origin {
                        Some(o) => prov.add(o.class, Some(o.hops), served),
                        None => prov.add(SourceClass::Cache, None, served),
                    }
                    data
                }
            };
            pieces.push(data.slice(from..to));
            pos = block_start + to as u64;
        };
        if !complete {
            // Not served after all: the fetched blocks keep their origin.
            for (hash, origin) in taken {
                cache.retag(&hash, origin);
            }
            return None;
        }
        Some((pieces, prov))
    }

    /// The distinct non-zero blocks of a READ the cache lacks (empty when the
    /// READ reaches past the manifest: it is not served anyway).
    pub fn missing(&self, read: &ReadCommand, cache: &BlockCache) -> Vec<BlockHash> {
        let Some(span) = self.block_span(read) else {
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

    /// The blocks (manifest positions) a READ touches, for access history.
    pub fn blocks_read(&self, read: &ReadCommand) -> std::ops::Range<usize> {
        self.block_span(read).unwrap_or(0..0)
    }

    fn usage(&self) -> MutexGuard<'_, UsageState> {
        self.history.lock()
    }

    /// The access history of this LUN's image (what past sessions read).
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

    /// On-demand read-ahead after a READ: the next `window` blocks past it that
    /// are not cached — in the access history's order when the LUN has one (only
    /// blocks past sessions read, and nothing after a block none of them read),
    /// else in image order — unless the LUN's read-ahead already asked for them.
    /// It is asked for again once a READ comes within half a window of where it
    /// stopped; a READ far behind it (another reader, or a jump) restarts it from
    /// there. So a READ costs at most one window of cache lookups, and most cost
    /// none.
    pub fn readahead(
        &self,
        read: &ReadCommand,
        window: usize,
        cache: &BlockCache,
    ) -> Vec<BlockHash> {
        let Some(span) = self.block_span(read) else {
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
}

/// The blocks to read ahead after a READ ending at block `end`, advancing `mark`
/// (how far read-ahead has been asked for): `None` when the READ is more than
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
    use crate::splice::catalog::access_history::BootTrace;
    use crate::splice::catalog::fixtures::{image, read};
    use crate::splice::catalog::manifest_text::manifest_of;

    #[test]
    fn fetched_blocks_count_by_origin_once_and_missing_lists_what_is_absent() {
        use crate::fetch::Origin;
        let data = image();
        let m = manifest_of("i", &data, 4096);
        let lun = ServedLun::new("t".into(), 1, ServeDesign::Shadow, Some(512), m.clone()).unwrap();
        let cache = BlockCache::new(1 << 20);
        let whole = read(0, 34);
        let hashes: Vec<BlockHash> = m.blocks.iter().flatten().copied().collect();
        assert_eq!(lun.missing(&whole, &cache), hashes);
        let rack = Origin {
            class: SourceClass::Rack,
            hops: 1,
        };
        // Blocks 0 and 2 arrive from a rack peer; block 3 and the tail are absent.
        cache.insert_from(hashes[0], Bytes::copy_from_slice(&data[..4096]), Some(rack));
        cache.insert_from(
            hashes[1],
            Bytes::copy_from_slice(&data[8192..12288]),
            Some(rack),
        );
        assert_eq!(lun.missing(&whole, &cache), hashes[2..]);
        assert!(lun.assemble(&whole, &cache).is_none());
        // The failed assembly kept their origin: the first serve counts them as rack.
        let (_, prov) = lun.assemble(&read(0, 24), &cache).unwrap();
        assert_eq!(prov.blocks_of(SourceClass::Rack), 2);
        assert_eq!(prov.bytes_of(SourceClass::Rack), 8192);
        assert_eq!(prov.hop_bytes[1], 8192);
        let (_, prov) = lun.assemble(&read(0, 24), &cache).unwrap();
        assert_eq!(
            (
                prov.blocks_of(SourceClass::Cache),
                prov.blocks_of(SourceClass::Rack)
            ),
            (2, 0)
        );
    }

    #[test]
    fn readahead_advances_once_per_half_window_and_restarts_behind() {
        let mark = std::sync::atomic::AtomicU64::new(0);
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
    fn boots_record_first_reads_and_order_read_ahead() {
        let data = image();
        let m = manifest_of("i", &data, 4096);
        let hashes: Vec<BlockHash> = m.blocks.iter().flatten().copied().collect();
        let lun = ServedLun::new("t".into(), 1, ServeDesign::Shadow, Some(512), m).unwrap();
        let cache = BlockCache::new(1 << 20);
        // Without history: what follows, in image order.
        assert_eq!(lun.readahead(&read(0, 8), 8, &cache), hashes[1..]);
        // A boot reads block 3 (LBAs 24..32), then 0 and 3 again, then the tail.
        let mut trace = BootTrace::default();
        for r in [read(24, 8), read(0, 8), read(24, 8), read(32, 2)] {
            trace.note(lun.blocks_read(&r));
        }
        assert_eq!(trace.order(), [3, 0, 4]);
        lun.record_boot(trace.order());
        let h = lun.history();
        assert_eq!((h.boots, h.blocks.len()), (1, 3));
        // After block 3 comes 0 then the tail (4); block 2 was never read.
        assert_eq!(
            lun.readahead(&read(24, 8), 8, &cache),
            [hashes[0], hashes[3]]
        );
        assert!(
            lun.readahead(&read(24, 8), 8, &cache).is_empty(),
            "already asked for"
        );
        // Far behind the mark (another reader): asked again, cached blocks left out.
        cache.insert(hashes[0], Bytes::copy_from_slice(&data[..4096]));
        lun.readahead_mark.store(100, Ordering::Relaxed);
        assert!(
            lun.readahead(&read(24, 8), 1, &cache).is_empty(),
            "the next likely block (0) is cached"
        );
        assert_eq!(lun.readahead(&read(0, 8), 1, &cache), [hashes[3]]);
        // After a block no boot read, nothing is read ahead.
        assert!(lun.readahead(&read(16, 8), 8, &cache).is_empty());
    }
}
