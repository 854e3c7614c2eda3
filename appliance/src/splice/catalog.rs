//! Which LUNs the splicer may answer itself, and with what: the per-LUN policy
//! (`[[splicer.lun]]` in the config), the manifest each one is checked against, and the
//! two operations on blocks the relay needs per READ: assembling a READ's data from
//! zero and cached blocks ([`ServedLun::assemble`]), and learning blocks from the data
//! the library sends for a READ passed through ([`Learner`]).
//!
//! A LUN is served only if the operator declared it immutable (a `[[splicer.lun]]`
//! entry; tgt should export it `readonly=1`) and a current manifest is available.
//! Each declared LUN is a [`LunSlot`]: its declaration and the [`ServedLun`] built
//! from its current manifest, if any. Sessions capture the slots of their target
//! at login and read the slot's current LUN at every READ (one read lock and an
//! `Arc` clone), so a manifest that arrives or changes is used from the next READ.
//! Anything that suggests the content no longer matches the manifest (a write the
//! target accepted, library data that fails verification, a newer manifest)
//! *taints* that `ServedLun`: from then on it is passed through untouched; only a
//! different manifest installs a new, untainted one ([`Catalog::install`]).
//!
//! # Manifest sources
//! [`LunSource`]: a manifest *file* in the text form of [`manifest_to_text`]
//! (written by whoever indexed the image, e.g. the lab tests with
//! [`manifest_of`]), or an image in the index as one host holds it, the LUN's
//! *authority* (the appliance's own store, else its indexer's parent: see
//! `splice::manifests`, which keeps them current). The appliance never needs
//! the image itself.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex, RwLock,
    },
};

use bytes::{Bytes, BytesMut};

pub use crate::fetch::Provenance;
use crate::fetch::{zero_block, BlockCache, SourceClass};
use crate::index::{BlockHash, Manifest};

use super::scsi::ReadCommand;

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

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("LUN {target}/{lun}: {message}")]
    Invalid {
        target: String,
        lun: u16,
        message: String,
    },
}

/// The manifest text form: a header line
/// `nearblock-manifest 1 <size> <block_size> <image name>`, then one line per block:
/// its blake3 hash in hex, or `0` for an all-zero block.
pub fn manifest_to_text(manifest: &Manifest) -> String {
    let mut out = format!(
        "nearblock-manifest 1 {} {} {}\n",
        manifest.size, manifest.block_size, manifest.image
    );
    for block in &manifest.blocks {
        match block {
            Some(h) => out.push_str(&h.to_string()),
            None => out.push('0'),
        }
        out.push('\n');
    }
    out
}

/// Parse [`manifest_to_text`]; errors carry the 1-based line.
pub fn manifest_from_text(text: &str) -> Result<Manifest, (usize, String)> {
    let mut lines = text.lines();
    let header = lines.next().ok_or((1, "empty".to_string()))?;
    let mut fields = header.splitn(5, ' ');
    if fields.next() != Some("nearblock-manifest") || fields.next() != Some("1") {
        return Err((1, "not a nearblock-manifest 1 header".into()));
    }
    let size: u64 = fields
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or((1, "bad size".to_string()))?;
    let block_size: u32 = fields
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|&b| b > 0)
        .ok_or((1, "bad block size".to_string()))?;
    let image = fields.next().unwrap_or("").to_string();
    let mut blocks = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line.trim();
        if line == "0" {
            blocks.push(None);
            continue;
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(line, &mut hash).map_err(|e| (i + 2, e.to_string()))?;
        blocks.push(Some(BlockHash(hash)));
    }
    let expected = size.div_ceil(u64::from(block_size));
    if blocks.len() as u64 != expected {
        return Err((
            1,
            format!("{} block lines for {expected} blocks", blocks.len()),
        ));
    }
    Ok(Manifest {
        image,
        size,
        block_size,
        blocks,
    })
}

/// Index `data` into a manifest (blocks of `block_size`, zero blocks marked).
pub fn manifest_of(image: &str, data: &[u8], block_size: u32) -> Manifest {
    let blocks = data
        .chunks(block_size as usize)
        .map(|b| {
            if b.iter().all(|&x| x == 0) {
                None
            } else {
                Some(BlockHash::of(b))
            }
        })
        .collect();
    Manifest {
        image: image.to_string(),
        size: data.len() as u64,
        block_size,
        blocks,
    }
}

/// The LUN number of an 8-byte LUN field, if it is in the one canonical encoding
/// initiators use (SAM single-level): peripheral addressing with bus 0 below 256,
/// flat space from 256. Anything else (a peripheral bus other than 0, flat space
/// below 256, a second level, other methods) is `None` and passes through: a target
/// may map such a field to a LUN other than the one the splicer would pick, and two
/// encodings of one number must never select different LUNs here and at the target.
pub fn lun_number(field: u64) -> Option<u16> {
    let bytes = field.to_be_bytes();
    if bytes[2..].iter().any(|&b| b != 0) {
        return None;
    }
    match bytes[0] >> 6 {
        0 if bytes[0] == 0 => Some(u16::from(bytes[1])),
        1 => {
            let n = (u16::from(bytes[0] & 0x3f) << 8) | u16::from(bytes[1]);
            (n >= 256).then_some(n)
        }
        _ => None,
    }
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
    taint_reason: std::sync::OnceLock<String>,
    /// Manifest block up to which read-ahead has been asked for.
    readahead_mark: std::sync::atomic::AtomicU64,
    /// Which blocks past sessions (boots) read, in what order.
    history: std::sync::Mutex<UsageState>,
    pub mode: FetchMode,
    /// The latest prefetch of this LUN.
    pub prefetch: Arc<std::sync::Mutex<crate::fetch::prefetch::PrefetchStatus>>,
}

/// A LUN's access history and the read-ahead order derived from it.
#[derive(Debug)]
struct UsageState {
    history: crate::plan::AccessHistory,
    /// Rebuilt when the history gains a boot.
    readahead: Option<(u32, Arc<crate::plan::ReadAhead>)>,
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
            taint_reason: std::sync::OnceLock::new(),
            readahead_mark: std::sync::atomic::AtomicU64::new(0),
            history: std::sync::Mutex::new(UsageState {
                history: crate::plan::AccessHistory::new(&image),
                readahead: None,
            }),
            mode: FetchMode::OnDemand,
            prefetch: Default::default(),
        })
    }

    /// The logical block length READs are served with (0: not known yet).
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size.load(Ordering::Relaxed)
    }

    /// Take the target's block length if none was declared; a LUN keeps the first
    /// length it took (a later, different one makes it disagree: not served).
    fn adopt_block_length(&self, block_length: u32) {
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
    fn byte_range(&self, read: &ReadCommand) -> Option<(u64, u64)> {
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

    fn usage(&self) -> std::sync::MutexGuard<'_, UsageState> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The access history of this LUN's image (what past sessions read).
    pub fn history(&self) -> crate::plan::AccessHistory {
        self.usage().history.clone()
    }

    /// Start from a saved history (it must be of this image's block count).
    pub fn set_history(&self, mut history: crate::plan::AccessHistory) {
        let n = self.manifest.blocks.len() as u64;
        history.blocks.retain(|&b, _| b < n);
        history.image = self.manifest.image.clone();
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
        u.history.image = self.manifest.image.clone();
        u.history.record_boot(reads.iter().copied());
        u.readahead = None;
    }

    /// The access history's read-ahead order, rebuilt when the history gained a
    /// boot (`None` without history). A rebuild restarts the read-ahead mark: it
    /// counts positions in this order.
    fn history_order(&self) -> Option<Arc<crate::plan::ReadAhead>> {
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
        let ra = Arc::new(crate::plan::ReadAhead::new(
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

    /// Start learning from the library's answer to a READ passed through.
    pub fn learner(self: &Arc<Self>, read: &ReadCommand) -> Option<Learner> {
        let (start, end) = self.byte_range(read)?;
        Some(Learner {
            lun: self.clone(),
            start,
            end,
            next_offset: 0,
            pending: BytesMut::new(),
            pending_block: None,
        })
    }
}

/// The blocks to read ahead after a READ ending at block `end`, advancing `mark`
/// (how far read-ahead has been asked for): `None` when the READ is more than
/// half a window before the mark (already covered) and not far behind it.
fn readahead_range(
    mark: &std::sync::atomic::AtomicU64,
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

/// Load `lun`'s saved access history from `dir` (missing files are fine;
/// unreadable ones are reported and ignored: a history only orders fetches).
fn load_history(dir: &std::path::Path, lun: &ServedLun) {
    let path = history_path(dir, &lun.target, lun.lun);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(h) => lun.set_history(h),
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e, "access history ignored")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), cause = %e, "access history ignored")
        }
    }
}

/// A LUN's name for humans and file names: `TARGET/LUN`.
pub fn lun_name(target: &str, lun: u16) -> String {
    format!("{target}/{lun}")
}

/// Where a LUN's access history is kept in `dir`.
pub fn history_path(dir: &std::path::Path, target: &str, lun: u16) -> PathBuf {
    let safe: String = lun_name(target, lun)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-.:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}.history.json"))
}

/// The order in which one session first read a LUN's blocks (one boot).
#[derive(Debug, Default)]
pub struct BootTrace {
    seen: Vec<u64>,
    order: Vec<u64>,
}

impl BootTrace {
    /// Note the blocks of one READ (each block counts once, at its first read).
    pub fn note(&mut self, blocks: std::ops::Range<usize>) {
        for b in blocks {
            let (word, bit) = (b / 64, b % 64);
            if self.seen.len() <= word {
                self.seen.resize(word + 1, 0);
            }
            if self.seen[word] & (1 << bit) == 0 {
                self.seen[word] |= 1 << bit;
                self.order.push(b as u64);
            }
        }
    }

    pub fn order(&self) -> &[u64] {
        &self.order
    }
}

/// What one Data-In taught the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub inserted: u64,
    pub already: u64,
    pub mismatched: u64,
}

/// Follows the Data-In of one READ passed through to the library and inserts every
/// whole manifest block it carries into the cache once its hash checks out.
/// Data arrives in order (DataPDUInOrder=Yes is forced at login); anything else ends
/// the learning for that READ.
#[derive(Debug)]
pub struct Learner {
    lun: Arc<ServedLun>,
    /// Byte range of the READ on the LUN.
    start: u64,
    end: u64,
    /// The BufferOffset expected next.
    next_offset: u64,
    /// Bytes of the block being assembled across PDUs.
    pending: BytesMut,
    pending_block: Option<usize>,
}

impl Learner {
    /// Feed one Data-In segment at `offset` within the READ. Returns `None` when the
    /// stream is out of order (stop learning).
    pub fn feed(&mut self, offset: u64, data: &[u8], cache: &BlockCache) -> Option<Learned> {
        if offset != self.next_offset {
            return None;
        }
        self.next_offset += data.len() as u64;
        let bs = u64::from(self.lun.manifest.block_size);
        let mut learned = Learned::default();
        let mut pos = self.start + offset;
        let mut rest = data;
        while !rest.is_empty() && pos < self.end {
            let index = (pos / bs) as usize;
            let block_start = index as u64 * bs;
            let block_len = self.lun.manifest.block_len(index);
            let block_end = block_start + block_len;
            let take = ((block_end - pos) as usize).min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let wanted = match self.lun.manifest.blocks.get(index) {
                Some(Some(hash)) if !cache.contains(hash) => Some(*hash),
                Some(Some(_)) => {
                    if pos == block_start {
                        learned.already += 1;
                    }
                    None
                }
                _ => None,
            };
            if let Some(hash) = wanted {
                if pos == block_start && take as u64 == block_len {
                    // The whole block in one segment: verify in place, copy once.
                    learned.add(self.check(hash, chunk, cache));
                } else if pos == block_start {
                    self.pending.clear();
                    self.pending.extend_from_slice(chunk);
                    self.pending_block = Some(index);
                } else if self.pending_block == Some(index) {
                    self.pending.extend_from_slice(chunk);
                    if pos + take as u64 == block_end {
                        let data = std::mem::take(&mut self.pending);
                        self.pending_block = None;
                        learned.add(self.check(hash, &data, cache));
                    }
                }
            }
            pos += take as u64;
        }
        Some(learned)
    }

    fn check(&self, hash: BlockHash, data: &[u8], cache: &BlockCache) -> Result<(), ()> {
        if BlockHash::of(data) == hash {
            cache.insert(hash, Bytes::copy_from_slice(data));
            Ok(())
        } else {
            self.lun.taint("library data does not match the manifest");
            Err(())
        }
    }
}

impl Learned {
    fn add(&mut self, r: Result<(), ()>) {
        match r {
            Ok(()) => self.inserted += 1,
            Err(()) => self.mismatched += 1,
        }
    }
}

/// Where a declared LUN's manifest comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LunSource {
    /// A manifest file in the text form ([`manifest_to_text`]).
    File(PathBuf),
    /// An image in the index, as its authority holds it: the appliance's own
    /// store, else its indexer's parent (which asks up the tree). The library's
    /// agent names tgt LUNs `IQN/LUN`.
    Index {
        image: String,
        /// `None`: the smallest block size the authority indexed.
        block_size: Option<u32>,
        /// The host whose holding of `image` is the LUN's manifest (the
        /// library's agent): any other host's manifest of the same name is
        /// that host's own copy, never what this LUN serves.
        authority: String,
    },
    /// A manifest given in code ([`Catalog::add`]); never refreshed.
    Fixed,
}

impl std::fmt::Display for LunSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LunSource::File(p) => write!(f, "file {}", p.display()),
            LunSource::Index { image, .. } => write!(f, "index {image}"),
            LunSource::Fixed => f.write_str("fixed"),
        }
    }
}

/// One `[[splicer.lun]]`: how the LUN is served once it has a manifest.
#[derive(Clone, Debug)]
pub struct LunDecl {
    pub target: String,
    pub lun: u16,
    pub design: ServeDesign,
    /// Declared in config; `None`: the target's own.
    pub logical_block_size: Option<u32>,
    pub mode: FetchMode,
    pub source: LunSource,
}

/// Where the installed manifest was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManifestOrigin {
    File,
    /// The appliance's own index store.
    Index,
    /// The embedded indexer's parent (the global index).
    Parent,
    Fixed,
}

/// A manifest file's identity on disk: a change re-reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub len: u64,
    pub modified: Option<std::time::SystemTime>,
}

/// One declared LUN in `nearblock status` (`splicer.luns`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LunStatus {
    pub target: String,
    pub lun: u16,
    /// Where its manifest is looked for (`file PATH`, `index IMAGE`).
    pub source: String,
    /// READs may be answered locally now.
    pub served: bool,
    /// Why not, when not served.
    #[serde(default)]
    pub why: Option<String>,
    #[serde(default)]
    pub origin: Option<ManifestOrigin>,
    /// With an index origin: the host whose holding the installed manifest is
    /// (the LUN's authority).
    #[serde(default)]
    pub authority: Option<String>,
    /// The installed manifest: image, size, block size, blocks, digest (blake3
    /// of its encoding, hex).
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub block_size: u32,
    #[serde(default)]
    pub blocks: u64,
    #[serde(default)]
    pub digest: Option<String>,
    /// Manifests installed for this LUN so far (1: the first; each change +1).
    #[serde(default)]
    pub manifest_seq: u64,
    /// The latest failure to look the manifest up (the LUN keeps what it had).
    #[serde(default)]
    pub last_error: Option<String>,
    /// What the target reported about the LUN (READ CAPACITY, MODE SENSE).
    #[serde(default)]
    pub target_facts: super::facts::Facts,
}

#[derive(Debug, Default)]
struct SlotState {
    origin: Option<ManifestOrigin>,
    digest: Option<[u8; 32]>,
    stamp: Option<FileStamp>,
    installed: u64,
    /// Why nothing is installed (when nothing is).
    why: Option<String>,
    last_error: Option<String>,
}

/// A declared LUN and the [`ServedLun`] of its current manifest, if any.
#[derive(Debug)]
pub struct LunSlot {
    pub decl: LunDecl,
    current: RwLock<Option<Arc<ServedLun>>>,
    state: Mutex<SlotState>,
    /// What the target reports about the LUN (block length, capacity, WP).
    pub facts: super::facts::TargetFacts,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LunSlot {
    pub fn new(decl: LunDecl) -> LunSlot {
        LunSlot {
            decl,
            current: RwLock::new(None),
            state: Mutex::new(SlotState {
                why: Some("no manifest yet".into()),
                ..Default::default()
            }),
            facts: super::facts::TargetFacts::default(),
        }
    }

    /// The LUN of the current manifest (tainted or not). Per READ: a read lock
    /// held for an `Arc` clone.
    pub fn current(&self) -> Option<Arc<ServedLun>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current LUN if it may be served: not tainted, and the target's own block
    /// length and capacity are known and agree with it ([`super::facts`]).
    pub fn serving(&self) -> Option<Arc<ServedLun>> {
        let lun = self.current().filter(|l| !l.tainted())?;
        // Per READ: before the target has answered a READ CAPACITY (the common
        // not-served case) answer without building the reason string.
        self.facts.get().block_length?;
        self.disagreement(&lun).is_none().then_some(lun)
    }

    /// Why `lun` may not be served with what the target reported, if it may not.
    /// Adopts the target's block length into a LUN that declared none.
    fn disagreement(&self, lun: &ServedLun) -> Option<String> {
        let facts = self.facts.get();
        if let Some(why) = super::facts::disagreement(
            &facts,
            self.decl.logical_block_size,
            lun.manifest.size,
            lun.manifest.block_size,
        ) {
            return Some(why);
        }
        let target_length = facts.block_length?;
        lun.adopt_block_length(target_length);
        let served_length = lun.logical_block_size();
        (served_length != target_length).then(|| {
            format!(
                "served with block length {served_length}, the target now reports {target_length}"
            )
        })
    }

    /// `lun` is this slot's current LUN.
    pub fn is_current(&self, lun: &Arc<ServedLun>) -> bool {
        self.current().is_some_and(|c| Arc::ptr_eq(&c, lun))
    }

    /// Digest of the installed manifest.
    pub fn digest(&self) -> Option<[u8; 32]> {
        locked(&self.state).digest
    }

    /// The manifest file's stamp when it was last read.
    pub fn stamp(&self) -> Option<FileStamp> {
        locked(&self.state).stamp
    }

    pub fn set_stamp(&self, stamp: Option<FileStamp>) {
        locked(&self.state).stamp = stamp;
    }

    /// Record a failed lookup (what is installed stays).
    pub fn note_error(&self, error: Option<String>) {
        locked(&self.state).last_error = error;
    }

    fn swap(&self, new: Option<Arc<ServedLun>>) -> Option<Arc<ServedLun>> {
        std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            new,
        )
    }

    /// Stop serving: the current LUN (if any) is tainted and removed; `why`
    /// shows in status until a manifest is installed.
    pub fn withdraw(&self, why: &str) {
        if let Some(old) = self.swap(None) {
            old.taint(why);
        }
        let mut st = locked(&self.state);
        if st.why.as_deref() != Some(why) {
            tracing::info!(target = %self.decl.target, lun = self.decl.lun, why,
                "LUN declared but not served (pass-through)");
        }
        st.why = Some(why.to_string());
        st.digest = None;
        st.origin = None;
        st.last_error = None;
    }

    pub fn status(&self) -> LunStatus {
        let st = locked(&self.state);
        let current = self.current();
        let why = match &current {
            Some(l) if l.tainted() => {
                Some(format!("tainted: {}", l.taint_reason().unwrap_or_default()))
            }
            Some(l) => self.disagreement(l),
            None => st.why.clone(),
        };
        let served = current.is_some() && why.is_none();
        let m = current.as_ref().map(|l| &l.manifest);
        LunStatus {
            target: self.decl.target.clone(),
            lun: self.decl.lun,
            source: self.decl.source.to_string(),
            served,
            why,
            origin: current.as_ref().and(st.origin),
            authority: match (&self.decl.source, current.as_ref().and(st.origin)) {
                (
                    LunSource::Index { authority, .. },
                    Some(ManifestOrigin::Index | ManifestOrigin::Parent),
                ) => Some(authority.clone()),
                _ => None,
            },
            image: m.map(|m| m.image.clone()),
            size: m.map_or(0, |m| m.size),
            block_size: m.map_or(0, |m| m.block_size),
            blocks: m.map_or(0, |m| m.blocks.len() as u64),
            digest: current.as_ref().and(st.digest).map(hex::encode),
            manifest_seq: st.installed,
            last_error: st.last_error.clone(),
            target_facts: self.facts.get(),
        }
    }
}

/// Keep a LUN's access history across a manifest change? Only when the new
/// manifest has the same blocks count and block size (positions still mean the
/// same places on the LUN; a resized or re-blocked image starts afresh).
pub fn keeps_history(old: &Manifest, new: &Manifest) -> bool {
    old.blocks.len() == new.blocks.len() && old.block_size == new.block_size
}

/// Every declared LUN, by target name and LUN number, and the shared cache.
#[derive(Debug)]
pub struct Catalog {
    luns: HashMap<(String, u16), Arc<LunSlot>>,
    pub cache: Arc<BlockCache>,
    /// Learn from READs passed through (off: the cache is never filled here).
    pub learn: bool,
    /// READs longer than this are passed through without learning (bounds the
    /// per-task assembly buffer to one manifest block anyway; this bounds CPU).
    pub max_learn_bytes: u64,
    /// READs longer than this pass through (`splicer.max_served_read_bytes`).
    pub max_served_read_bytes: u64,
    /// A connection whose login has not reached Full Feature Phase by then is
    /// closed (`splicer.login_timeout_secs`).
    pub login_timeout: std::time::Duration,
    /// Bytes read ahead after an on-demand READ (when blocks come from peers).
    pub readahead_bytes: u64,
    /// Where missing blocks are fetched from (set once the index service runs).
    sourcing: std::sync::OnceLock<Arc<crate::fetch::Sourcing>>,
    /// Where each LUN's access history is kept (`None`: memory only).
    pub history_dir: Option<PathBuf>,
    /// Prefetch bandwidth budget per link, Mbit/s.
    pub prefetch_budget_mbps: f64,
}

impl Catalog {
    pub fn new(cache: Arc<BlockCache>, learn: bool) -> Catalog {
        Catalog {
            luns: HashMap::new(),
            cache,
            learn,
            max_learn_bytes: 64 << 20,
            max_served_read_bytes: 16 << 20,
            login_timeout: std::time::Duration::from_secs(30),
            readahead_bytes: 8 << 20,
            sourcing: std::sync::OnceLock::new(),
            history_dir: None,
            prefetch_budget_mbps: 1000.0,
        }
    }

    /// Start prefetching `lun` in the background unless it is already running
    /// or there is no one to fetch from.
    pub fn start_prefetch(&self, lun: &Arc<ServedLun>) {
        let Some(sourcing) = self.sourcing().cloned() else {
            return;
        };
        {
            let mut st = lun.prefetch.lock().unwrap_or_else(|p| p.into_inner());
            if st.running {
                return;
            }
            st.running = true;
            st.lun = lun_name(&lun.target, lun.lun);
        }
        let history = lun.history();
        let positions: Vec<u64> = if history.boots > 0 {
            history.prefetch_order(&lun.manifest)
        } else {
            (0..lun.manifest.blocks.len() as u64).collect()
        };
        let hashes = crate::fetch::prefetch::distinct_in_order(&lun.manifest.blocks, positions);
        tokio::spawn(crate::fetch::prefetch::run(
            hashes,
            lun.manifest.block_size,
            sourcing,
            self.cache.clone(),
            self.prefetch_budget_mbps,
            lun.prefetch.clone(),
        ));
    }

    /// Every LUN's latest prefetch (those that ever ran).
    pub fn prefetches(&self) -> Vec<crate::fetch::prefetch::PrefetchStatus> {
        let mut v: Vec<_> = self
            .luns
            .values()
            .filter_map(|s| s.current())
            .map(|l| l.prefetch.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .filter(|s| !s.lun.is_empty())
            .collect();
        v.sort_by(|a, b| a.lun.cmp(&b.lun));
        v
    }

    /// Load each LUN's saved access history from `dir` (missing files are fine;
    /// unreadable ones are reported and ignored: a history only orders fetches).
    /// LUNs installed later load theirs when they are installed.
    pub fn load_histories(&mut self, dir: PathBuf) {
        for lun in self.luns.values().filter_map(|s| s.current()) {
            load_history(&dir, &lun);
        }
        self.history_dir = Some(dir);
    }

    /// Record one session's reads of `lun` and save its history (atomically:
    /// a temporary file renamed over the old one).
    /// A boot of a LUN that has since been replaced goes to its successor if
    /// that keeps the history ([`keeps_history`]), else it is dropped.
    pub fn record_boot(&self, lun: &Arc<ServedLun>, reads: &[u64]) {
        let current = self
            .luns
            .get(&(lun.target.clone(), lun.lun))
            .and_then(|s| s.current());
        let lun = match current {
            Some(c) if Arc::ptr_eq(&c, lun) => c,
            Some(c) if keeps_history(&lun.manifest, &c.manifest) => c,
            _ => return,
        };
        lun.record_boot(reads);
        let Some(dir) = &self.history_dir else {
            return;
        };
        let path = history_path(dir, &lun.target, lun.lun);
        let history = lun.history();
        // A temporary name of this writer's own: two sessions ending together
        // must not interleave in one file before the rename.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let write = move || {
            let tmp = path.with_extension(format!("{}.{n}.tmp", std::process::id()));
            let r = serde_json::to_vec(&history)
                .map_err(std::io::Error::from)
                .and_then(|json| std::fs::write(&tmp, json))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = r {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(cause = %e, path = %path.display(), "saving the access history");
            }
        };
        // Serialising and writing a big image's history is file I/O: off the
        // connection's runtime thread when there is a runtime.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    /// The history of the served LUN whose manifest is image `image`.
    pub fn history_of(&self, image: &str) -> Option<crate::plan::AccessHistory> {
        self.luns
            .values()
            .filter_map(|s| s.current())
            .find(|l| l.manifest.image == image)
            .map(|l| l.history())
            .filter(|h| h.boots > 0)
    }

    /// Fetch missing blocks from peers through `sourcing` from now on (once).
    pub fn set_sourcing(&self, sourcing: Arc<crate::fetch::Sourcing>) {
        let _ = self.sourcing.set(sourcing);
    }

    pub fn sourcing(&self) -> Option<&Arc<crate::fetch::Sourcing>> {
        self.sourcing.get()
    }

    /// The read-ahead window in manifest blocks of `block_size`.
    pub fn readahead_blocks(&self, block_size: u32) -> usize {
        (self.readahead_bytes / u64::from(block_size.max(1))) as usize
    }

    pub fn empty() -> Catalog {
        Catalog::new(Arc::new(BlockCache::new(0)), false)
    }

    /// A LUN with a manifest given in code, served from now on (never refreshed).
    pub fn add(&mut self, lun: ServedLun) {
        let slot = self.declare(LunDecl {
            target: lun.target.clone(),
            lun: lun.lun,
            design: lun.design,
            logical_block_size: match lun.logical_block_size() {
                0 => None,
                declared => Some(declared),
            },
            mode: lun.mode,
            source: LunSource::Fixed,
        });
        let digest = *blake3::hash(&lun.manifest.encode()).as_bytes();
        slot.swap(Some(Arc::new(lun)));
        let mut st = locked(&slot.state);
        (st.origin, st.digest, st.installed, st.why) =
            (Some(ManifestOrigin::Fixed), Some(digest), 1, None);
    }

    /// Declare a LUN (not served until a manifest is installed).
    pub fn declare(&mut self, decl: LunDecl) -> Arc<LunSlot> {
        let key = (decl.target.clone(), decl.lun);
        let slot = Arc::new(LunSlot::new(decl));
        self.luns.insert(key, slot.clone());
        slot
    }

    pub fn is_empty(&self) -> bool {
        self.luns.is_empty()
    }

    /// Every declared LUN, in (target, LUN) order.
    pub fn slots(&self) -> Vec<Arc<LunSlot>> {
        let mut v: Vec<_> = self.luns.values().cloned().collect();
        v.sort_by(|a, b| (&a.decl.target, a.decl.lun).cmp(&(&b.decl.target, b.decl.lun)));
        v
    }

    /// Every declared LUN's state.
    pub fn statuses(&self) -> Vec<LunStatus> {
        self.slots().iter().map(|s| s.status()).collect()
    }

    /// The declared LUNs of one target, by LUN number (a session captures
    /// them at login and asks each for its current LUN per READ).
    pub fn for_target(&self, target: &str) -> HashMap<u16, Arc<LunSlot>> {
        self.luns
            .iter()
            .filter(|((t, _), _)| t == target)
            .map(|((_, l), slot)| (*l, slot.clone()))
            .collect()
    }

    /// Serve `slot` from `manifest` (whose encoding hashes to `digest`) from now
    /// on: a new [`ServedLun`] replaces the current one, which is tainted, so
    /// every session still holding it passes through. The access history is
    /// kept when [`keeps_history`] says so; a LUN installed for the first time
    /// loads its saved history.
    pub fn install(
        &self,
        slot: &LunSlot,
        manifest: Manifest,
        digest: [u8; 32],
        origin: ManifestOrigin,
    ) -> Result<Arc<ServedLun>, CatalogError> {
        let d = &slot.decl;
        let mut lun = ServedLun::new(
            d.target.clone(),
            d.lun,
            d.design,
            d.logical_block_size,
            manifest,
        )?;
        lun.mode = d.mode;
        let lun = Arc::new(lun);
        let old = slot.current();
        match &old {
            Some(o) if keeps_history(&o.manifest, &lun.manifest) => lun.set_history(o.history()),
            Some(_) => {}
            None => {
                if let Some(dir) = &self.history_dir {
                    load_history(dir, &lun);
                }
            }
        }
        let old = slot.swap(Some(lun.clone()));
        if let Some(o) = &old {
            o.taint("replaced by a newer manifest");
        }
        let mut st = locked(&slot.state);
        st.origin = Some(origin);
        st.digest = Some(digest);
        st.installed += 1;
        st.why = None;
        st.last_error = None;
        tracing::info!(target = %d.target, lun = d.lun, image = %lun.manifest.image,
            size = lun.manifest.size, blocks = lun.manifest.blocks.len(), ?origin,
            digest = %hex::encode(&digest[..8]), replaced = old.is_some(), "LUN served from a manifest");
        Ok(lun)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splice::scsi::ReadKind;

    fn read(lba: u64, blocks: u32) -> ReadCommand {
        ReadCommand {
            kind: ReadKind::Read10,
            lba,
            blocks,
            rdprotect: 0,
            dpo: false,
            fua: false,
            group: 0,
            control: 0,
        }
    }

    fn image() -> Vec<u8> {
        // 4 blocks of 4096 (+ a short tail of 1024): data, zero, data, data, tail.
        let mut data: Vec<u8> = (0..(4 * 4096 + 1024))
            .map(|i| (i % 253) as u8 | 1)
            .collect();
        data[4096..8192].fill(0);
        data
    }

    #[test]
    fn manifest_text_round_trip() {
        let m = manifest_of("img one", &image(), 4096);
        assert_eq!(m.blocks.len(), 5);
        assert_eq!(m.blocks[1], None);
        assert_eq!(manifest_from_text(&manifest_to_text(&m)), Ok(m));
        assert!(manifest_from_text("nearblock-manifest 1 10 4096 x\n").is_err());
        assert!(manifest_from_text("nonsense").is_err());
    }

    #[test]
    fn lun_numbers() {
        assert_eq!(lun_number(0x0001_0000_0000_0000), Some(1));
        assert_eq!(lun_number(0), Some(0));
        assert_eq!(lun_number(0x4101_0000_0000_0000), Some(0x101));
        assert_eq!(lun_number(0x0001_0000_0000_0001), None);
        assert_eq!(lun_number(0x8001_0000_0000_0000), None);
        // Peripheral addressing on bus 1 would read as 257 with the bus ignored.
        assert_eq!(lun_number(0x0101_0000_0000_0000), None);
        // Flat space below 256 aliases the peripheral form of the same number.
        assert_eq!(lun_number(0x4001_0000_0000_0000), None);
        assert_eq!(lun_number(0x40ff_0000_0000_0000), None);
        assert_eq!(lun_number(0x4100_0000_0000_0000), Some(256));
        assert_eq!(lun_number(0x7fff_0000_0000_0000), Some(0x3fff));
    }

    #[test]
    fn learn_then_assemble() {
        let data = image();
        let lun = Arc::new(
            ServedLun::new(
                "iqn.t".into(),
                1,
                ServeDesign::Shadow,
                Some(512),
                manifest_of("i", &data, 4096),
            )
            .unwrap(),
        );
        let cache = BlockCache::new(1 << 20);
        // Block 0 is not cached: nothing to serve yet.
        assert!(lun.assemble(&read(0, 8), &cache).is_none());
        // Zero block alone: served cold.
        let (pieces, prov) = lun.assemble(&read(8, 8), &cache).unwrap();
        assert_eq!(pieces.concat(), vec![0u8; 4096]);
        assert_eq!(prov.blocks_of(SourceClass::Zero), 1);

        // A pass-through READ of blocks 0..3 at an unaligned start (LBA 4), in
        // segments that straddle blocks: the partial first block is not learned.
        let r = read(4, 8 * 3 - 4);
        let mut learner = lun.learner(&r).unwrap();
        let bytes = &data[2048..3 * 4096];
        let mut total = Learned::default();
        for (i, seg) in bytes.chunks(3000).enumerate() {
            let l = learner.feed(i as u64 * 3000, seg, &cache).unwrap();
            total.inserted += l.inserted;
        }
        assert_eq!(total.inserted, 1, "block 2 learned; 0 partial, 1 zero");
        assert!(learner.feed(0, b"x", &cache).is_none(), "out of order");

        // Whole block 0 plus the tail block in one segment each.
        let mut learner = lun.learner(&read(0, 8)).unwrap();
        assert_eq!(learner.feed(0, &data[..4096], &cache).unwrap().inserted, 1);
        let mut learner = lun.learner(&read(32, 2)).unwrap();
        assert_eq!(learner.feed(0, &data[16384..], &cache).unwrap().inserted, 1);

        // Now blocks 0, 1 (zero), 2 and the tail can be served, across boundaries.
        let (pieces, prov) = lun.assemble(&read(2, 20), &cache).unwrap();
        assert_eq!(pieces.concat(), &data[1024..11264]);
        assert_eq!(
            (
                prov.blocks_of(SourceClass::Zero),
                prov.blocks_of(SourceClass::Cache)
            ),
            (1, 2)
        );
        assert!(
            lun.assemble(&read(24, 8), &cache).is_none(),
            "block 3 not learned"
        );
        let (pieces, _) = lun.assemble(&read(32, 2), &cache).unwrap();
        assert_eq!(pieces.concat(), &data[16384..]);
        assert!(lun.assemble(&read(33, 2), &cache).is_none(), "past the end");
        assert!(!lun.tainted());
    }

    #[test]
    fn corrupt_library_data_taints_and_is_not_cached() {
        let data = image();
        let lun = Arc::new(
            ServedLun::new(
                "t".into(),
                1,
                ServeDesign::Shadow,
                Some(512),
                manifest_of("i", &data, 4096),
            )
            .unwrap(),
        );
        let cache = BlockCache::new(1 << 20);
        let mut bad = data[..4096].to_vec();
        bad[7] ^= 1;
        let l = lun
            .learner(&read(0, 8))
            .unwrap()
            .feed(0, &bad, &cache)
            .unwrap();
        assert_eq!((l.inserted, l.mismatched), (0, 1));
        assert!(lun.tainted());
        assert_eq!(cache.snapshot().blocks, 0);
    }

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

    #[test]
    fn histories_are_saved_and_loaded() {
        let dir = std::env::temp_dir().join(format!("nb-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = image();
        let lun = || {
            ServedLun::new(
                "iqn.x:y".into(),
                2,
                ServeDesign::Shadow,
                Some(512),
                manifest_of("i", &data, 4096),
            )
            .unwrap()
        };
        let mut catalog = Catalog::new(Arc::new(BlockCache::new(0)), false);
        catalog.add(lun());
        catalog.load_histories(dir.clone());
        let served = catalog.for_target("iqn.x:y")[&2].current().unwrap();
        catalog.record_boot(&served, &[2, 0]);
        assert!(history_path(&dir, "iqn.x:y", 2).exists());
        let mut again = Catalog::new(Arc::new(BlockCache::new(0)), false);
        again.add(lun());
        again.load_histories(dir.clone());
        let h = again.history_of("i").unwrap();
        assert_eq!((h.boots, h.probability(2), h.probability(1)), (1, 1.0, 0.0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
