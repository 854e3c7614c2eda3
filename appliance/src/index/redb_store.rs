//! The embedded store: redb for what must survive (sources, manifests, change log,
//! file state), an mmapped snapshot + in-memory overlay ([`super::lookup`]) for
//! lookups.
//!
//! Why redb: pure Rust (no C toolchain in the appliance image), ACID with
//! copy-on-write B-trees and checksummed commit slots (a SIGKILL or power cut at any
//! point leaves the last committed state), MVCC readers that never block the writer,
//! and "quick repair" commits that make recovery after a crash nearly instant. It is
//! not fast enough for per-block random lookups at the planner's rate, so those are
//! served by the holder snapshot, which is derived data and rebuilt from redb if lost.
//!
//! Tables:
//! - `meta`: `format` ([`STORE_FORMAT`]), `seq` (last change), `next_src` (source
//!   id counter);
//! - `source_ids`: "`host\0image\0block_size`" → source id (never reused);
//! - `sources`: id → host, image, block size, size, counts, seq of last change;
//! - `manifests`: id → [`Manifest::encode`] (one value per source, so indexing an
//!   image is one insert, not one per block);
//! - `log`: seq → [`Change::encode`] (for the upward push; optional, trimmed);
//!   this and the `sources` and `file_state` rows are versioned records
//!   ([`super::record`]);
//! - `file_state`: source key → what the file looked like when last indexed.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use super::{IndexError, IndexIoContext, Result};
use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::lookup::{coarse_for, entries_of, HolderTable, Snapshot, COARSE_BIT};
use super::manifest::{check_max_image_blocks, DEFAULT_MAX_IMAGE_BLOCKS};
use super::record;
use super::store::{BlockStore, Change, ImageInfo, Location, SourceInfo};
use super::{BlockHash, DecodeError, Manifest};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SOURCE_IDS: TableDefinition<&str, u32> = TableDefinition::new("source_ids");
const SOURCES: TableDefinition<u32, &[u8]> = TableDefinition::new("sources");
const MANIFESTS: TableDefinition<u32, &[u8]> = TableDefinition::new("manifests");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const FILE_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("file_state");

/// `meta` key of the store's format.
const FORMAT_KEY: &str = "format";

/// The store's format, recorded under [`FORMAT_KEY`]. Format 2: every record
/// (`sources`, `log`, `file_state`) starts with a version byte and is postcard
/// ([`super::record`]). Format 1 (hand-written records) recorded no format; a
/// store of it is refused, not migrated (docs/decisions.md, "Index records").
pub const STORE_FORMAT: u64 = 2;

/// What [`store_format_verdict`] decided about a store being opened.
#[derive(Debug, PartialEq, Eq)]
enum FormatVerdict {
    /// Written in [`STORE_FORMAT`].
    Current,
    /// Empty and without a format: a new store, to be marked with this one.
    New,
    /// Another format, or records without a format (format 1).
    Refuse,
}

/// The verdict on a store whose recorded format is `found` and which holds
/// records (`holds_records`) or not.
fn store_format_verdict(found: Option<u64>, holds_records: bool) -> FormatVerdict {
    match found {
        Some(STORE_FORMAT) => FormatVerdict::Current,
        None if !holds_records => FormatVerdict::New,
        _ => FormatVerdict::Refuse,
    }
}

/// How to open a [`RedbStore`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Keep a change log for the upward push (a top-level index may not need one).
    pub log: bool,
    /// Rewrite the holder snapshot when the overlay holds more than
    /// `max(compact_min, snapshot entries / 4)` entries.
    pub compact_min: usize,
    /// On [`RedbStore::close`], rewrite the snapshot if the overlay holds more.
    pub close_compact_min: usize,
    /// redb page cache, bytes.
    pub cache_bytes: usize,
    /// Also index coarse names (`Manifest::coarse`) of this many leaves, for sources
    /// whose group stays within 1 MiB (16: 64 KiB groups of 4 KiB leaves). Every
    /// level of a hierarchy must use the same factor. `None`: leaves only.
    pub coarse: Option<u32>,
    /// The most blocks one source may have (`max_image_blocks`): a change that
    /// implies more is refused before anything is allocated for it, and so is a
    /// stored manifest (one stored under a higher limit is treated as absent).
    pub max_image_blocks: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            log: true,
            compact_min: 1 << 20,
            close_compact_min: 256 << 10,
            cache_bytes: 64 << 20,
            coarse: Some(16),
            max_image_blocks: DEFAULT_MAX_IMAGE_BLOCKS,
        }
    }
}

/// What the store did when it opened (for the "reopen time" figures).
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    pub redb_ms: f64,
    pub snapshot_ms: f64,
    pub overlay_ms: f64,
    /// Sources changed since the snapshot, reloaded into the overlay.
    pub replayed_sources: usize,
    /// The snapshot was missing or stale and was rebuilt from the manifests.
    pub rebuilt_snapshot: bool,
}

/// What a file looked like when last indexed (for the cheap re-index).
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct FileState {
    pub path: String,
    pub len: u64,
    pub mtime_ns: i64,
    pub ino: u64,
    pub dev: u64,
    /// Unix time of the last full rescan.
    pub full_scan_unix: u64,
}

impl FileState {
    fn encode(&self) -> Vec<u8> {
        record::encode(self)
    }
    fn decode(b: &[u8]) -> Result<Self> {
        Ok(record::decode("file state", b)?)
    }
}

fn source_key(host: &str, image: &str, block_size: u32) -> String {
    format!("{host}\0{image}\0{block_size}")
}

struct State {
    coarse: Option<u32>,
    sources: Vec<Option<SourceInfo>>,
    holders: HolderTable,
    seq: u64,
}

impl State {
    fn location(&self, src: u32, idx: u32) -> Option<Location> {
        let s = self.sources.get(src as usize)?.as_ref()?;
        let bs = if idx & COARSE_BIT != 0 {
            s.block_size * coarse_for(s.block_size, self.coarse)?
        } else {
            s.block_size
        };
        let offset = u64::from(idx & !COARSE_BIT) * u64::from(bs);
        Some(Location {
            host: s.host.clone(),
            image: s.image.clone(),
            block_size: bs,
            offset,
            len: (s.size.saturating_sub(offset)).min(u64::from(bs)) as u32,
        })
    }
}

/// What one change did to one source, for updating the in-memory index after commit.
enum Effect {
    Replace {
        src: u32,
        old: Option<Manifest>,
        new: Option<(Manifest, SourceInfo)>,
    },
    Patch {
        src: u32,
        old: Manifest,
        new: Manifest,
        info: SourceInfo,
        idxs: Vec<u32>,
    },
}

/// The embedded index store. See the module docs.
pub struct RedbStore {
    db: Database,
    snap_path: PathBuf,
    opts: StoreOptions,
    /// Serialises writers (redb has one write transaction at a time anyway;
    /// this also orders the in-memory updates after each commit).
    write: Mutex<()>,
    /// Not poisoned by a panic (`parking_lot)`: a panic mid-update leaves the
    /// in-memory index as it was before that update at worst, and it is
    /// rebuilt from redb on the next open.
    state: RwLock<State>,
    open_report: OpenReport,
}

impl RedbStore {
    /// Opens (creating if needed) the store at `path`; the holder snapshot lives
    /// next to it as `path.holders`.
    #[expect(
        clippy::too_many_lines,
        reason = "the steps of opening in order (format, sources, snapshot, overlay), each timed for the report"
    )]
    pub fn open(path: &Path, opts: StoreOptions) -> Result<Self> {
        check_max_image_blocks(opts.max_image_blocks)
            .map_err(|e| IndexError::Invalid(format!("max_image_blocks: {e}")))?;
        let t0 = Instant::now();
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).io_context(|| format!("create {}", dir.display()))?;
            }
        }
        let db = Database::builder()
            .set_cache_size(opts.cache_bytes)
            .create(path)
            .map_err(|source| IndexError::Open {
                path: path.display().to_string(),
                source,
            })?;
        {
            let mut w = db.begin_write()?;
            w.set_quick_repair(true);
            w.open_table(SOURCE_IDS)?;
            w.open_table(MANIFESTS)?;
            let holds_records = !w.open_table(SOURCES)?.is_empty()?
                || !w.open_table(LOG)?.is_empty()?
                || !w.open_table(FILE_STATE)?.is_empty()?;
            let mut meta = w.open_table(META)?;
            let found = meta.get(FORMAT_KEY)?.map(|v| v.value());
            match store_format_verdict(found, holds_records || meta.get("seq")?.is_some()) {
                FormatVerdict::Current => {}
                FormatVerdict::New => {
                    meta.insert(FORMAT_KEY, STORE_FORMAT)?;
                }
                FormatVerdict::Refuse => {
                    // Dropping the transaction uncommitted leaves the file as it was.
                    return Err(IndexError::Format {
                        path: path.display().to_string(),
                        found,
                        want: STORE_FORMAT,
                    });
                }
            }
            drop(meta);
            w.commit()?;
        }
        let mut report = OpenReport {
            redb_ms: t0.elapsed().as_secs_f64() * 1e3,
            ..Default::default()
        };
        let r = db.begin_read()?;
        let seq = r.open_table(META)?.get("seq")?.map_or(0, |v| v.value());
        // Source ids are issued densely, one per row of `source_ids`; an id
        // beyond them is damage, not a reason to allocate up to it.
        let issued = r.open_table(SOURCE_IDS)?.len()?;
        let mut sources: Vec<Option<SourceInfo>> = Vec::new();
        for row in r.open_table(SOURCES)?.iter()? {
            let (k, v) = row?;
            if u64::from(k.value()) >= issued {
                return Err(IndexError::Corrupt(format!(
                    "{}: source id {} but only {issued} ids were issued",
                    path.display(),
                    k.value()
                )));
            }
            let id = k.value() as usize;
            if sources.len() <= id {
                sources.resize(id + 1, None);
            }
            sources[id] = Some(SourceInfo::decode(v.value())?);
        }
        let mut snap_path = path.as_os_str().to_owned();
        snap_path.push(".holders");
        let snap_path = PathBuf::from(snap_path);

        let t1 = Instant::now();
        let snap = match Snapshot::open(&snap_path) {
            Ok(s) if s.seq <= seq && s.coarse == opts.coarse.unwrap_or(0) => Some(s),
            Ok(s) if s.seq <= seq => {
                tracing::info!("holder snapshot has another coarse factor; rebuilding");
                None
            }
            Ok(s) => {
                tracing::warn!(
                    "holder snapshot is newer ({}) than the index ({seq}); rebuilding",
                    s.seq
                );
                None
            }
            Err(e) if snap_path.exists() => {
                tracing::warn!("holder snapshot unusable ({e:#}); rebuilding");
                None
            }
            Err(_) => None,
        };
        let snap = match snap {
            Some(s) => s,
            None if sources.iter().any(Option::is_some) => {
                report.rebuilt_snapshot = true;
                build_snapshot(&db, &snap_path, opts.coarse, opts.max_image_blocks)?
            }
            None => Snapshot::empty(),
        };
        report.snapshot_ms = t1.elapsed().as_secs_f64() * 1e3;

        let t2 = Instant::now();
        let mut holders = HolderTable::new(snap, opts.coarse);
        let manifests = r.open_table(MANIFESTS)?;
        for (id, s) in sources.iter().enumerate() {
            if let Some(s) = s {
                if s.seq > holders.snap.seq {
                    let m = match manifests.get(id as u32)? {
                        Some(v) => decode_stored(id as u32, v.value(), opts.max_image_blocks)?,
                        None => None,
                    };
                    holders.replace_source(id as u32, None, m.as_ref());
                    report.replayed_sources += 1;
                }
            }
        }
        // Sources removed since the snapshot have no record: their entries are
        // dropped at lookup (no location).
        drop(manifests);
        drop(r);
        report.overlay_ms = t2.elapsed().as_secs_f64() * 1e3;
        let coarse = opts.coarse;
        Ok(Self {
            db,
            snap_path,
            opts,
            write: Mutex::new(()),
            state: RwLock::new(State {
                coarse,
                sources,
                holders,
                seq,
            }),
            open_report: report,
        })
    }

    /// Clean shutdown: rewrites the holder snapshot first if the overlay is larger
    /// than `StoreOptions::close_compact_min` entries, so that the next open does
    /// not have to rebuild it (keeps a clean reopen well under a second). Dropping
    /// the store without `close` is safe too (it is what a crash does).
    pub fn close(self) -> Result<()> {
        let big = self.state.read().holders.overlay_len() > self.opts.close_compact_min;
        if big {
            self.compact()?;
        }
        Ok(())
    }

    pub fn open_report(&self) -> &OpenReport {
        &self.open_report
    }

    /// Path of the holder snapshot file.
    pub fn snapshot_path(&self) -> &Path {
        &self.snap_path
    }

    /// Entries in the holder snapshot and in the overlay.
    pub fn holder_counts(&self) -> (u64, usize) {
        let st = self.state.read();
        (st.holders.snap.len, st.holders.overlay_len())
    }

    /// Rewrites the holder snapshot from the manifests and empties the overlay.
    pub fn compact(&self) -> Result<()> {
        let _w = self.write.lock();
        self.compact_locked()
    }

    fn compact_locked(&self) -> Result<()> {
        let snap = build_snapshot(
            &self.db,
            &self.snap_path,
            self.opts.coarse,
            self.opts.max_image_blocks,
        )?;
        let mut st = self.state.write();
        st.holders = HolderTable::new(snap, self.opts.coarse);
        Ok(())
    }

    /// Calls `f(location)` for every holder of `hash` (no allocation per lookup
    /// beyond what `f` does).
    pub fn for_each_holder(&self, hash: &BlockHash, mut f: impl FnMut(Location)) {
        let st = self.state.read();
        st.holders
            .lookup(u128::from_be_bytes(hash.prefix()), |s, i| {
                if let Some(l) = st.location(s, i) {
                    f(l);
                }
            });
    }

    /// Number of holders of `hash` (the cheapest lookup).
    pub fn holder_count(&self, hash: &BlockHash) -> usize {
        let st = self.state.read();
        let mut n = 0;
        st.holders
            .lookup(u128::from_be_bytes(hash.prefix()), |s, _| {
                if st.sources.get(s as usize).is_some_and(Option::is_some) {
                    n += 1;
                }
            });
        n
    }

    pub fn file_state(
        &self,
        host: &str,
        image: &str,
        block_size: u32,
    ) -> Result<Option<FileState>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(FILE_STATE)?;
        let k = source_key(host, image, block_size);
        let v = t.get(k.as_str())?;
        v.map(|v| FileState::decode(v.value())).transpose()
    }

    pub fn set_file_state(
        &self,
        host: &str,
        image: &str,
        block_size: u32,
        fs: &FileState,
    ) -> Result<()> {
        let _w = self.write.lock();
        let mut w = self.db.begin_write()?;
        w.set_quick_repair(true);
        {
            let mut t = w.open_table(FILE_STATE)?;
            let k = source_key(host, image, block_size);
            t.insert(k.as_str(), fs.encode().as_slice())?;
        }
        w.commit()?;
        Ok(())
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one write transaction: each kind of change is a few lines against the same open tables"
    )]
    fn apply_locked(&self, changes: &[Change]) -> Result<u64> {
        // Everything that can be refused without the store is refused before a
        // transaction starts or a block list is sized.
        let max = self.opts.max_image_blocks;
        for c in changes {
            c.check(max)?;
        }
        let mut w = self.db.begin_write()?;
        w.set_quick_repair(true);
        let mut effects = Vec::new();
        let seq;
        {
            let mut meta = w.open_table(META)?;
            let mut source_ids = w.open_table(SOURCE_IDS)?;
            let mut sources = w.open_table(SOURCES)?;
            let mut manifests = w.open_table(MANIFESTS)?;
            let mut log = w.open_table(LOG)?;
            let mut s = meta.get("seq")?.map_or(0, |v| v.value());
            let mut next_src = meta.get("next_src")?.map_or(0, |v| v.value());
            // The in-memory source table is indexed by id: a counter that ran
            // ahead of the ids actually issued would size it to the counter.
            let issued = source_ids.len()?;
            if next_src != issued {
                return Err(IndexError::Corrupt(format!(
                    "index meta: next source id {next_src} but {issued} ids were issued"
                )));
            }
            let mut id_for = |source_ids: &mut redb::Table<&str, u32>,
                              host: &str,
                              image: &str,
                              bs: u32,
                              create: bool|
             -> Result<Option<u32>> {
                let k = source_key(host, image, bs);
                if let Some(v) = source_ids.get(k.as_str())? {
                    return Ok(Some(v.value()));
                }
                if !create {
                    return Ok(None);
                }
                let id = u32::try_from(next_src)
                    .map_err(|_| IndexError::Invalid("source ids exhausted".into()))?;
                next_src += 1;
                source_ids.insert(k.as_str(), id)?;
                Ok(Some(id))
            };
            for c in changes {
                s += 1;
                match c {
                    Change::PutImage { host, manifest } => {
                        let src = id_for(
                            &mut source_ids,
                            host,
                            &manifest.image,
                            manifest.block_size,
                            true,
                        )?
                        .expect("created");
                        let old = match manifests.insert(src, manifest.encode().as_slice())? {
                            Some(v) => decode_stored(src, v.value(), max)?,
                            None => None,
                        };
                        let info = SourceInfo::of(host, manifest, s);
                        sources.insert(src, info.encode().as_slice())?;
                        effects.push(Effect::Replace {
                            src,
                            old,
                            new: Some((manifest.clone(), info)),
                        });
                    }
                    Change::PatchImage {
                        host,
                        image,
                        block_size,
                        size,
                        blocks,
                    } => {
                        let src = id_for(&mut source_ids, host, image, *block_size, true)?
                            .expect("created");
                        let stored = match manifests.get(src)? {
                            Some(v) => decode_stored(src, v.value(), max)?,
                            None => None,
                        };
                        // A patch that creates its source replaces it whole: the
                        // holder snapshot may still hold entries of an earlier
                        // source under this id (removed before a reopen, when
                        // nothing marks it), which only a replacement masks.
                        let created = stored.is_none();
                        let old = stored.unwrap_or_else(|| Manifest::empty(image, *block_size));
                        let mut new = old.clone();
                        // Checked above: n <= max_image_blocks, every i < n.
                        new.patch(*size, blocks);
                        let n = new.blocks.len();
                        let mut idxs: Vec<u32> = (n..old.blocks.len()).map(|i| i as u32).collect();
                        idxs.extend(blocks.iter().map(|&(i, _)| i));
                        idxs.sort_unstable();
                        idxs.dedup();
                        manifests.insert(src, new.encode().as_slice())?;
                        let info = SourceInfo::of(host, &new, s);
                        sources.insert(src, info.encode().as_slice())?;
                        effects.push(if created {
                            Effect::Replace {
                                src,
                                old: None,
                                new: Some((new, info)),
                            }
                        } else {
                            Effect::Patch {
                                src,
                                old,
                                new,
                                info,
                                idxs,
                            }
                        });
                    }
                    Change::RemoveImage {
                        host,
                        image,
                        block_size,
                    } => {
                        if let Some(src) = id_for(&mut source_ids, host, image, *block_size, false)?
                        {
                            let old = match manifests.remove(src)? {
                                Some(v) => decode_stored(src, v.value(), max)?,
                                None => None,
                            };
                            sources.remove(src)?;
                            effects.push(Effect::Replace {
                                src,
                                old,
                                new: None,
                            });
                        }
                    }
                    Change::RemoveHost { host } => {
                        let mut gone = Vec::new();
                        for row in sources.iter()? {
                            let (k, v) = row?;
                            if &*SourceInfo::decode(v.value())?.host == host.as_str() {
                                gone.push(k.value());
                            }
                        }
                        for src in gone {
                            let old = match manifests.remove(src)? {
                                Some(v) => decode_stored(src, v.value(), max)?,
                                None => None,
                            };
                            sources.remove(src)?;
                            effects.push(Effect::Replace {
                                src,
                                old,
                                new: None,
                            });
                        }
                    }
                }
                if self.opts.log {
                    log.insert(s, c.encode().as_slice())?;
                }
            }
            meta.insert("seq", s)?;
            meta.insert("next_src", next_src)?;
            seq = s;
        }
        w.commit()?;

        let mut st = self.state.write();
        for e in effects {
            match e {
                Effect::Replace { src, old, new } => {
                    st.holders
                        .replace_source(src, old.as_ref(), new.as_ref().map(|n| &n.0));
                    set_source(&mut st.sources, src, new.map(|n| n.1));
                }
                Effect::Patch {
                    src,
                    old,
                    new,
                    info,
                    idxs,
                } => {
                    st.holders.patch_source(src, &old, &new, &idxs);
                    set_source(&mut st.sources, src, Some(info));
                }
            }
        }
        st.seq = seq;
        let overlay = st.holders.overlay_len();
        let threshold = self.opts.compact_min.max(st.holders.snap.len as usize / 4);
        drop(st);
        if overlay > threshold {
            self.compact_locked()?;
        }
        Ok(seq)
    }
}

fn set_source(v: &mut Vec<Option<SourceInfo>>, src: u32, s: Option<SourceInfo>) {
    let i = src as usize;
    if v.len() <= i {
        v.resize(i + 1, None);
    }
    v[i] = s;
}

/// A stored manifest, decoded if it has at most `max` blocks. One with more was
/// stored under a higher `max_image_blocks`: it is logged and treated as absent
/// (not looked up, replaced by the next put of its source) rather than expanded.
fn decode_stored(src: u32, bytes: &[u8], max: u64) -> Result<Option<Manifest>> {
    match Manifest::decode_limited(bytes, max) {
        Ok(m) => Ok(Some(m)),
        Err(e @ DecodeError::TooLarge { .. }) => {
            tracing::warn!(
                source = src,
                "{e}: stored under a higher limit, treated as absent"
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Builds the holder snapshot from every manifest in one read transaction.
fn build_snapshot(
    db: &Database,
    path: &Path,
    coarse: Option<u32>,
    max_blocks: u64,
) -> Result<Snapshot> {
    let r = db.begin_read()?;
    let seq = r.open_table(META)?.get("seq")?.map_or(0, |v| v.value());
    let mut entries = Vec::new();
    for row in r.open_table(MANIFESTS)?.iter()? {
        let (k, v) = row?;
        if let Some(m) = decode_stored(k.value(), v.value(), max_blocks)? {
            entries_of(k.value(), &m, coarse, &mut entries);
        }
    }
    drop(r);
    Snapshot::write(path, seq, coarse.unwrap_or(0), &mut entries)?;
    drop(entries);
    Snapshot::open(path)
}

impl BlockStore for RedbStore {
    fn apply(&self, changes: &[Change]) -> Result<u64> {
        let _w = self.write.lock();
        if changes.is_empty() {
            return Ok(self.state.read().seq);
        }
        self.apply_locked(changes)
    }

    fn max_image_blocks(&self) -> u64 {
        self.opts.max_image_blocks
    }

    fn source_blocks(&self, host: &str, image: &str, block_size: u32) -> Result<u64> {
        let r = self.db.begin_read()?;
        let k = source_key(host, image, block_size);
        let Some(id) = r
            .open_table(SOURCE_IDS)?
            .get(k.as_str())?
            .map(|v| v.value())
        else {
            return Ok(0);
        };
        let st = self.state.read();
        Ok(st
            .sources
            .get(id as usize)
            .and_then(Option::as_ref)
            .map_or(0, |s| s.blocks))
    }

    fn holders(&self, hash: &BlockHash) -> Result<Vec<Location>> {
        let mut v = Vec::new();
        self.for_each_holder(hash, |l| v.push(l));
        Ok(v)
    }

    fn holders_many(&self, hashes: &[BlockHash]) -> Result<Vec<Vec<Location>>> {
        let st = self.state.read();
        Ok(hashes
            .iter()
            .map(|h| {
                let mut v = Vec::new();
                st.holders.lookup(u128::from_be_bytes(h.prefix()), |s, i| {
                    if let Some(l) = st.location(s, i) {
                        v.push(l);
                    }
                });
                v
            })
            .collect())
    }

    fn manifest(&self, image: &str, block_size: Option<u32>) -> Result<Option<Manifest>> {
        let pick = {
            let st = self.state.read();
            st.sources
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
                .filter(|(_, s)| &*s.image == image && block_size.is_none_or(|b| b == s.block_size))
                .min_by_key(|(_, s)| (s.block_size, std::cmp::Reverse(s.seq)))
                .map(|(i, _)| i as u32)
        };
        match pick {
            Some(src) => self.manifest_by_id(src),
            None => Ok(None),
        }
    }

    fn manifest_at(&self, host: &str, image: &str, block_size: u32) -> Result<Option<Manifest>> {
        let r = self.db.begin_read()?;
        let k = source_key(host, image, block_size);
        let id = r
            .open_table(SOURCE_IDS)?
            .get(k.as_str())?
            .map(|v| v.value());
        match id {
            Some(id) => r
                .open_table(MANIFESTS)?
                .get(id)?
                .map(|v| {
                    Manifest::decode_limited(v.value(), self.opts.max_image_blocks)
                        .map_err(Into::into)
                })
                .transpose(),
            None => Ok(None),
        }
    }

    fn host_manifest(
        &self,
        host: &str,
        image: &str,
        block_size: Option<u32>,
    ) -> Result<Option<Manifest>> {
        let pick = {
            let st = self.state.read();
            st.sources
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
                .filter(|(_, s)| {
                    &*s.host == host
                        && &*s.image == image
                        && block_size.is_none_or(|b| b == s.block_size)
                })
                .min_by_key(|(_, s)| s.block_size)
                .map(|(i, _)| i as u32)
        };
        match pick {
            Some(src) => self.manifest_by_id(src),
            None => Ok(None),
        }
    }

    fn images(&self) -> Result<Vec<ImageInfo>> {
        let st = self.state.read();
        let mut v: Vec<ImageInfo> = st.sources.iter().flatten().map(SourceInfo::info).collect();
        v.sort_by(|a, b| (&a.image, &a.host, a.block_size).cmp(&(&b.image, &b.host, b.block_size)));
        Ok(v)
    }

    fn seq(&self) -> u64 {
        self.state.read().seq
    }

    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, Change)>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(LOG)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = row?;
            out.push((
                k.value(),
                Change::decode_limited(v.value(), self.opts.max_image_blocks)?,
            ));
        }
        Ok(out)
    }

    fn trim_log(&self, upto: u64) -> Result<()> {
        let _w = self.write.lock();
        let mut w = self.db.begin_write()?;
        w.set_quick_repair(true);
        {
            let mut t = w.open_table(LOG)?;
            t.retain_in(..=upto, |_, _| false)?;
        }
        w.commit()?;
        Ok(())
    }
}

impl RedbStore {
    fn manifest_by_id(&self, src: u32) -> Result<Option<Manifest>> {
        let r = self.db.begin_read()?;
        let t = r.open_table(MANIFESTS)?;
        let v = t.get(src)?;
        Ok(
            v.map(|v| Manifest::decode_limited(v.value(), self.opts.max_image_blocks))
                .transpose()?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The model-based check of every query against the obvious model runs
    // for redb in `super::super::store_suite` (the suite both backends pass).
    use crate::index::store_suite::name as h;

    #[test]
    fn manifest_smallest_size_and_log_trim() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("i"), StoreOptions::default()).unwrap();
        let m = |bs: u32, b: u8| Manifest {
            image: "img".into(),
            size: 20000,
            block_size: bs,
            blocks: vec![Some(h(b)); Manifest::block_count(20000, bs)],
        };
        store
            .apply(&[
                Change::PutImage {
                    host: "x".into(),
                    manifest: m(16384, 1),
                },
                Change::PutImage {
                    host: "x".into(),
                    manifest: m(4096, 2),
                },
            ])
            .unwrap();
        assert_eq!(
            store.manifest("img", None).unwrap().unwrap().block_size,
            4096
        );
        assert_eq!(
            store.manifest("img", Some(16384)).unwrap().unwrap(),
            m(16384, 1)
        );
        assert!(store.manifest("nope", None).unwrap().is_none());
        let hs = store.holders(&h(1)).unwrap();
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[1].len, 20000 - 16384);
        store.trim_log(1).unwrap();
        let log = store.changes_since(0, 10).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].0, 2);
        assert!(store.apply(&[]).unwrap() == 2);
        let fs = FileState {
            path: "/a".into(),
            len: 3,
            mtime_ns: -5,
            ino: 1,
            dev: 2,
            full_scan_unix: 9,
        };
        store.set_file_state("x", "img", 4096, &fs).unwrap();
        assert_eq!(store.file_state("x", "img", 4096).unwrap(), Some(fs));
        assert_eq!(store.file_state("x", "img", 16384).unwrap(), None);
    }

    /// The trait's own `host_manifest` (through `images` and `manifest_at`), to
    /// check `RedbStore`'s faster one against.
    struct ByImages<'a>(&'a RedbStore);

    impl BlockStore for ByImages<'_> {
        fn apply(&self, changes: &[Change]) -> Result<u64> {
            self.0.apply(changes)
        }
        fn holders(&self, hash: &BlockHash) -> Result<Vec<Location>> {
            self.0.holders(hash)
        }
        fn manifest(&self, image: &str, bs: Option<u32>) -> Result<Option<Manifest>> {
            self.0.manifest(image, bs)
        }
        fn manifest_at(&self, host: &str, image: &str, bs: u32) -> Result<Option<Manifest>> {
            self.0.manifest_at(host, image, bs)
        }
        fn images(&self) -> Result<Vec<ImageInfo>> {
            self.0.images()
        }
        fn seq(&self) -> u64 {
            self.0.seq()
        }
        fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, Change)>> {
            self.0.changes_since(after, limit)
        }
        fn trim_log(&self, upto: u64) -> Result<()> {
            self.0.trim_log(upto)
        }
    }

    #[test]
    fn host_manifest_is_that_hosts_holding_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("i"), StoreOptions::default()).unwrap();
        let m = |bs: u32, b: u8| Manifest {
            image: "lib/1".into(),
            size: 20000,
            block_size: bs,
            blocks: vec![Some(h(b)); Manifest::block_count(20000, bs)],
        };
        let put = |host: &str, manifest: Manifest| Change::PutImage {
            host: host.into(),
            manifest,
        };
        // The library indexes the image at two sizes; later a hypervisor puts a
        // different image under the same name, at a smaller size and at one
        // the library uses: the newest and smallest of any host.
        store
            .apply(&[put("library", m(16384, 1)), put("library", m(8192, 2))])
            .unwrap();
        store
            .apply(&[put("hv1", m(8192, 9)), put("hv1", m(4096, 9))])
            .unwrap();
        assert_eq!(store.manifest("lib/1", None).unwrap(), Some(m(4096, 9)));
        assert_eq!(
            store.manifest("lib/1", Some(8192)).unwrap(),
            Some(m(8192, 9))
        );
        let fallback = ByImages(&store);
        for s in [&store as &dyn BlockStore, &fallback] {
            let at = |host: &str, bs| s.host_manifest(host, "lib/1", bs).unwrap();
            assert_eq!(at("library", None), Some(m(8192, 2)), "its smallest size");
            assert_eq!(at("library", Some(8192)), Some(m(8192, 2)));
            assert_eq!(at("library", Some(16384)), Some(m(16384, 1)));
            assert_eq!(at("library", Some(4096)), None, "only hv1 has 4096");
            assert_eq!(at("hv1", None), Some(m(4096, 9)));
            assert_eq!(at("hv2", None), None);
            assert_eq!(s.host_manifest("library", "lib/2", None).unwrap(), None);
        }
        // The library's holding goes: nothing, though hv1 still holds the name.
        store
            .apply(&[
                Change::RemoveImage {
                    host: "library".into(),
                    image: "lib/1".into(),
                    block_size: 8192,
                },
                Change::RemoveImage {
                    host: "library".into(),
                    image: "lib/1".into(),
                    block_size: 16384,
                },
            ])
            .unwrap();
        assert_eq!(store.host_manifest("library", "lib/1", None).unwrap(), None);
        assert_eq!(
            fallback.host_manifest("library", "lib/1", None).unwrap(),
            None
        );
    }

    fn put(host: &str, image: &str, blocks: Vec<Option<BlockHash>>) -> Change {
        Change::PutImage {
            host: host.into(),
            manifest: Manifest {
                image: image.into(),
                size: blocks.len() as u64 * 4096,
                block_size: 4096,
                blocks,
            },
        }
    }

    #[test]
    fn oversize_patch_is_refused_and_the_rest_of_the_batch_applies() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("i"), StoreOptions::default()).unwrap();
        store.apply(&[put("hv1", "b", vec![Some(h(2))])]).unwrap();
        // Before the fix, this patch resized b's block list to 2^32 - 1 entries
        // (141 GB) and the process aborted.
        let huge = Change::PatchImage {
            host: "hv1".into(),
            image: "b".into(),
            block_size: 4096,
            size: u64::from(u32::MAX) * 4096,
            blocks: vec![],
        };
        let e = store.apply(std::slice::from_ref(&huge)).unwrap_err();
        assert!(matches!(e, IndexError::TooLarge { .. }), "{e}");
        assert!(
            e.to_string().contains("PatchImage of `b` held by hv1"),
            "{e}"
        );
        assert_eq!(store.seq(), 1, "a refused batch changes nothing");

        let applied = store
            .apply_checked(vec![
                put("hv1", "a", vec![Some(h(1)), None]),
                huge,
                put("hv2", "c", vec![Some(h(3))]),
            ])
            .unwrap();
        assert_eq!(applied.refused.len(), 1);
        let (at, e) = &applied.refused[0];
        assert_eq!(*at, 1);
        let m = e.to_string();
        assert!(
            m.contains("PatchImage of `b` held by hv1") && m.contains("4294967295 blocks"),
            "{m}"
        );
        // a and c applied; b, whose patch was refused, is no longer claimed.
        assert_eq!(applied.seq, 4);
        assert_eq!(store.holders(&h(1)).unwrap().len(), 1);
        assert_eq!(store.holders(&h(3)).unwrap().len(), 1);
        assert!(store.holders(&h(2)).unwrap().is_empty());
        assert!(store.manifest_at("hv1", "b", 4096).unwrap().is_none());
        let logged: Vec<String> = store
            .changes_since(1, 10)
            .unwrap()
            .into_iter()
            .map(|(_, c)| c.describe())
            .collect();
        assert_eq!(
            logged,
            [
                "PutImage of `a` held by hv1 at 4096-byte blocks",
                "RemoveImage of `b` held by hv1 at 4096-byte blocks",
                "PutImage of `c` held by hv2 at 4096-byte blocks"
            ]
        );
    }

    #[test]
    fn the_configured_cap_bounds_puts_and_patches() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            max_image_blocks: 8,
            ..Default::default()
        };
        let store = RedbStore::open(&dir.path().join("i"), opts).unwrap();
        assert_eq!(store.max_image_blocks(), 8);
        store.apply(&[put("hv1", "a", vec![None; 8])]).unwrap();
        let e = store.apply(&[put("hv1", "b", vec![None; 9])]).unwrap_err();
        assert!(
            e.to_string().contains("more than max_image_blocks = 8"),
            "{e}"
        );
        let grow = |size: u64| Change::PatchImage {
            host: "hv1".into(),
            image: "a".into(),
            block_size: 4096,
            size,
            blocks: vec![],
        };
        assert!(store.apply(&[grow(9 * 4096)]).is_err());
        store.apply(&[grow(8 * 4096 - 1)]).unwrap();
        let bad = StoreOptions {
            max_image_blocks: 0,
            ..Default::default()
        };
        assert!(RedbStore::open(&dir.path().join("j"), bad).is_err());
    }

    #[test]
    fn manifests_stored_under_a_higher_cap_are_treated_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i");
        let store = RedbStore::open(&p, StoreOptions::default()).unwrap();
        store
            .apply(&[
                put("hv1", "big", vec![Some(h(1)); 20]),
                put("hv1", "small", vec![Some(h(2)); 4]),
            ])
            .unwrap();
        drop(store);
        let low = StoreOptions {
            max_image_blocks: 10,
            ..Default::default()
        };
        // Reopens (snapshot rebuilt without `big`), never expanding `big`.
        let store = RedbStore::open(&p, low).unwrap();
        assert!(store.holders(&h(1)).unwrap().is_empty());
        assert_eq!(store.holders(&h(2)).unwrap().len(), 4);
        let e = store.manifest_at("hv1", "big", 4096).unwrap_err();
        assert!(e.to_string().contains("max_image_blocks = 10"), "{e}");
        // A put within the cap replaces it.
        store.apply(&[put("hv1", "big", vec![Some(h(3))])]).unwrap();
        assert_eq!(store.holders(&h(3)).unwrap().len(), 1);
        store.compact().unwrap();
        assert_eq!(store.holders(&h(3)).unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_source_counter_is_refused_not_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i");
        let store = RedbStore::open(&p, StoreOptions::default()).unwrap();
        store.apply(&[put("hv1", "a", vec![Some(h(1))])]).unwrap();
        drop(store);
        {
            let db = Database::create(&p).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(META)
                .unwrap()
                .insert("next_src", u64::from(u32::MAX))
                .unwrap();
            w.commit().unwrap();
        }
        let store = RedbStore::open(&p, StoreOptions::default()).unwrap();
        // A new source would get id 2^32 - 1 and size the source table to it.
        let e = store
            .apply(&[put("hv1", "b", vec![Some(h(2))])])
            .unwrap_err();
        assert!(matches!(e, IndexError::Corrupt(_)), "{e}");
        assert_eq!(store.holders(&h(1)).unwrap().len(), 1);
    }

    #[test]
    fn lost_or_corrupt_snapshot_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i");
        let opts = StoreOptions {
            compact_min: 0,
            ..Default::default()
        };
        let store = RedbStore::open(&p, opts.clone()).unwrap();
        let man = Manifest {
            image: "a".into(),
            size: 8192,
            block_size: 4096,
            blocks: vec![Some(h(1)), None],
        };
        store
            .apply(&[Change::PutImage {
                host: "x".into(),
                manifest: man,
            }])
            .unwrap();
        let snap = store.snapshot_path().to_path_buf();
        drop(store);
        let mut b = std::fs::read(&snap).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xff; // entry byte: not checksummed, but the key no longer matches
        std::fs::write(&snap, &b[..10]).unwrap();
        let store = RedbStore::open(&p, opts.clone()).unwrap();
        assert!(store.open_report().rebuilt_snapshot);
        assert_eq!(store.holders(&h(1)).unwrap().len(), 1);
        drop(store);
        std::fs::remove_file(&snap).unwrap();
        let store = RedbStore::open(&p, opts).unwrap();
        assert!(store.open_report().rebuilt_snapshot);
        assert_eq!(store.holders(&h(1)).unwrap().len(), 1);
    }

    #[test]
    fn format_verdicts() {
        use FormatVerdict::{Current, New, Refuse};
        assert_eq!(store_format_verdict(Some(STORE_FORMAT), true), Current);
        assert_eq!(store_format_verdict(Some(STORE_FORMAT), false), Current);
        assert_eq!(store_format_verdict(None, false), New);
        assert_eq!(store_format_verdict(None, true), Refuse);
        assert_eq!(store_format_verdict(Some(STORE_FORMAT + 1), false), Refuse);
        assert_eq!(store_format_verdict(Some(1), true), Refuse);
    }

    /// A store as format 1 left it: rows, no `format` key.
    fn write_format_1_store(path: &Path) {
        let db = Database::create(path).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(META).unwrap().insert("seq", 3).unwrap();
        // Format 1's source row: host, image as u32-length strings, then fields.
        let mut row = Vec::new();
        for s in ["hv1", "vm1"] {
            row.extend_from_slice(&(s.len() as u32).to_le_bytes());
            row.extend_from_slice(s.as_bytes());
        }
        row.extend_from_slice(&4096u32.to_le_bytes());
        for x in [4096u64, 1, 0, 3] {
            row.extend_from_slice(&x.to_le_bytes());
        }
        w.open_table(SOURCES)
            .unwrap()
            .insert(0, row.as_slice())
            .unwrap();
        w.commit().unwrap();
    }

    #[test]
    fn a_store_of_the_old_format_is_refused_with_what_to_do_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        write_format_1_store(&path);
        let before = std::fs::read(&path).unwrap();
        let e = RedbStore::open(&path, StoreOptions::default())
            .err()
            .expect("a format 1 store must be refused");
        assert!(matches!(
            e,
            IndexError::Format {
                found: None,
                want: STORE_FORMAT,
                ..
            }
        ));
        let m = e.to_string();
        assert!(
            m.contains("index.redb") && m.contains("format 1") && m.contains("aside"),
            "{m}"
        );
        // Refused again on the next open: nothing was marked or rewritten.
        assert!(RedbStore::open(&path, StoreOptions::default()).is_err());
        assert_eq!(std::fs::read(&path).unwrap().len(), before.len());
    }

    #[test]
    fn a_store_of_a_newer_format_is_refused_and_a_new_one_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        RedbStore::open(&path, StoreOptions::default())
            .unwrap()
            .close()
            .unwrap();
        {
            let db = Database::create(&path).unwrap();
            let r = db.begin_read().unwrap();
            let meta = r.open_table(META).unwrap();
            assert_eq!(meta.get(FORMAT_KEY).unwrap().unwrap().value(), STORE_FORMAT);
            drop(meta);
            drop(r);
            let w = db.begin_write().unwrap();
            w.open_table(META)
                .unwrap()
                .insert(FORMAT_KEY, STORE_FORMAT + 1)
                .unwrap();
            w.commit().unwrap();
        }
        let m = RedbStore::open(&path, StoreOptions::default())
            .err()
            .expect("a newer format must be refused")
            .to_string();
        assert!(m.contains(&format!("format {}", STORE_FORMAT + 1)), "{m}");
    }

    proptest! {
        #[test]
        fn file_state_round_trip(
            path in ".{0,40}", len: u64, mtime_ns: i64, ino: u64, dev: u64, full_scan_unix: u64
        ) {
            let fs = FileState { path, len, mtime_ns, ino, dev, full_scan_unix };
            prop_assert_eq!(FileState::decode(&fs.encode()).unwrap(), fs);
        }

        #[test]
        fn source_row_round_trip(
            host in "[a-z]{0,12}", image in ".{0,20}", block_size: u32,
            size: u64, blocks: u64, zero_blocks: u64, seq: u64
        ) {
            let s = SourceInfo {
                host: host.as_str().into(), image: image.as_str().into(),
                block_size, size, blocks, zero_blocks, seq,
            };
            let back = SourceInfo::decode(&s.encode()).unwrap();
            prop_assert_eq!(back.info(), s.info());
        }
    }

    #[test]
    fn rows_of_another_version_are_refused() {
        let mut rec = FileState::default().encode();
        rec[0] ^= 0xff;
        assert!(matches!(
            FileState::decode(&rec),
            Err(IndexError::Decode(DecodeError::Version { .. }))
        ));
        let m = Manifest {
            image: "i".into(),
            size: 4096,
            block_size: 4096,
            blocks: vec![None],
        };
        let s = SourceInfo::of("h", &m, 1);
        let mut rec = s.encode();
        rec[0] = 1;
        assert!(matches!(
            SourceInfo::decode(&rec),
            Err(IndexError::Decode(DecodeError::Version { found: 1, .. }))
        ));
    }
}
