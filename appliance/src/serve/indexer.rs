//! The index service (a local or global indexer) and the upward pusher that both
//! indexers and agents run.
//!
//! - **Push** (child → parent): the child sends its logged changes after what the
//!   parent acknowledged; the parent applies the ones it has not applied yet (by
//!   the child's sequence numbers, so a retried push is applied once), records the
//!   child's acknowledged sequence number durably, and answers `Ack{seq}`; the
//!   child then trims its log. A push that does not follow the parent's record
//!   (the parent lost its state, or the child's log was trimmed for another parent)
//!   is refused with `GAP`, and the child restates everything it holds (resync).
//! - **Holders**: answered from the local store; hashes without a local holder are
//!   asked of the parent (and so on up the tree), unless `local_only`.
//! - **Manifests**: an image's manifest (in pieces, see
//!   [`super::proto::ManifestPiece`]) from the local store; an image the store
//!   lacks is asked of the parent (so a rack appliance finds the library agent's
//!   `IQN/LUN` manifests through the global index).
//! - **Addresses**: every push carries host → block service address; each level
//!   keeps the union and attaches them to holders.
//! - **Host metrics**: the latest load report of every host below, in memory
//!   ([`super::hosts`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::Notify;

use super::{
    client::{FetchError, Peer},
    error::{IoContext, Result, ServeError},
    proto::{code, Holder, ManifestPiece, Msg, PushedChange},
};
use crate::index::{BlockHash, BlockStore, Change};

/// The store behind an indexer or a pusher: any [`BlockStore`] (the embedded
/// `RedbStore` today, a distributed backend later).
pub type SharedStore = Arc<dyn BlockStore>;

/// What an indexer remembers about its children (a sidecar of its store).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChildState {
    /// Child node → the last of its sequence numbers applied here.
    pub acked: BTreeMap<String, u64>,
    /// Host → block service address (`ip:port`).
    pub addrs: BTreeMap<String, String>,
    /// Child node → the hosts its changes were about (a resync removes their
    /// sources that it does not restate).
    #[serde(default)]
    pub hosts: BTreeMap<String, BTreeSet<String>>,
}

impl ChildState {
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| ServeError::Json {
                what: format!("parse {}", path.display()),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ServeError::io(format!("read {}", path.display()), e)),
        }
    }

    /// Written to a temporary file, fsynced, renamed over, directory fsynced.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut f =
            std::fs::File::create(&tmp).io_context(|| format!("create {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            let d = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    }
}

/// (host, image, block size): one source.
type SourceKey = (String, String, u32);

/// Counters of an indexer.
#[derive(Debug, Default, serde::Serialize)]
pub struct IndexMetrics {
    pub pushes: AtomicU64,
    pub changes_applied: AtomicU64,
    /// Changes received again (a retried push) and skipped.
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    pub holder_lookups: AtomicU64,
    /// Hashes asked of the parent (no local holder).
    pub parent_lookups: AtomicU64,
    /// `GetManifest` requests answered.
    pub manifest_lookups: AtomicU64,
    /// … of them asked of the parent (the image is not in the local store).
    pub manifest_parent_lookups: AtomicU64,
}

/// Why a manifest lookup failed (not: the image is unknown, that is
/// [`ManifestPiece::Absent`]).
#[derive(Debug, thiserror::Error)]
pub enum ManifestLookupError {
    #[error("index store: {0}")]
    Store(String),
    #[error("parent: {0}")]
    Parent(#[from] FetchError),
}

pub struct IndexService {
    node: String,
    store: SharedStore,
    parent: Option<Peer>,
    state: Mutex<ChildState>,
    state_path: PathBuf,
    /// Serialises pushes (apply + state record).
    apply: tokio::sync::Mutex<()>,
    /// Child → sources restated so far by its resync in progress.
    resyncing: Mutex<HashMap<String, BTreeSet<SourceKey>>>,
    /// Notified after every applied push (wakes this indexer's own pusher).
    pub changed: Arc<Notify>,
    pub metrics: IndexMetrics,
    /// The latest load report of every host below this indexer.
    pub hosts: Arc<super::hosts::HostReports>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IndexService {
    /// `state_path`: the children sidecar (default `<db>.children.json`).
    pub fn open(
        node: &str,
        store: SharedStore,
        parent: Option<Peer>,
        state_path: PathBuf,
    ) -> Result<Self> {
        let state = ChildState::load(&state_path)?;
        Ok(Self {
            node: node.into(),
            store,
            parent,
            state: Mutex::new(state),
            state_path,
            apply: tokio::sync::Mutex::new(()),
            resyncing: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
            metrics: IndexMetrics::default(),
            hosts: Arc::default(),
        })
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Every host → address this indexer knows.
    pub fn addrs(&self) -> Vec<(String, String)> {
        lock(&self.state)
            .addrs
            .iter()
            .map(|(h, a)| (h.clone(), a.clone()))
            .collect()
    }

    pub fn child_state(&self) -> ChildState {
        lock(&self.state).clone()
    }

    /// Holders of `hashes` with addresses; hashes without a local holder are
    /// asked of the parent unless `local_only` (a parent failure leaves them empty
    /// and is logged).
    pub async fn holders(
        &self,
        hashes: &[BlockHash],
        local_only: bool,
    ) -> Result<Vec<Vec<Holder>>> {
        self.metrics
            .holder_lookups
            .fetch_add(hashes.len() as u64, Ordering::Relaxed);
        let store = self.store.clone();
        let hs = hashes.to_vec();
        let locs = tokio::task::spawn_blocking(move || store.holders_many(&hs)).await??;
        let mut out: Vec<Vec<Holder>> = {
            let st = lock(&self.state);
            locs.into_iter()
                .map(|ls| {
                    ls.into_iter()
                        .map(|l| Holder {
                            addr: st.addrs.get(&*l.host).cloned(),
                            location: l,
                        })
                        .collect()
                })
                .collect()
        };
        if local_only {
            return Ok(out);
        }
        let Some(parent) = &self.parent else {
            return Ok(out);
        };
        let missing: Vec<usize> = (0..out.len()).filter(|&i| out[i].is_empty()).collect();
        if missing.is_empty() {
            return Ok(out);
        }
        self.metrics
            .parent_lookups
            .fetch_add(missing.len() as u64, Ordering::Relaxed);
        let ask: Vec<BlockHash> = missing.iter().map(|&i| hashes[i]).collect();
        match parent.holders(&ask, false).await {
            Ok(up) => {
                for (i, hs) in missing.into_iter().zip(up) {
                    out[i] = hs;
                }
            }
            Err(e) => tracing::warn!(node = %self.node, "holders: parent lookup failed: {e}"),
        }
        Ok(out)
    }

    /// A piece of `image`'s manifest (see [`Msg::GetManifest`]): from the local
    /// store, else from the parent (which may ask its own), else
    /// [`ManifestPiece::Absent`].
    pub async fn manifest_piece(
        &self,
        image: &str,
        block_size: u32,
        known: [u8; 32],
        offset: u64,
        max_len: u32,
    ) -> Result<ManifestPiece, ManifestLookupError> {
        self.metrics
            .manifest_lookups
            .fetch_add(1, Ordering::Relaxed);
        let store = self.store.clone();
        let name = image.to_string();
        let local = tokio::task::spawn_blocking(move || {
            store
                .manifest(&name, (block_size != 0).then_some(block_size))
                .map(|m| m.map(|m| m.encode()))
        })
        .await
        .map_err(|e| ManifestLookupError::Store(e.to_string()))?
        .map_err(|e| ManifestLookupError::Store(format!("{e:#}")))?;
        if let Some(encoded) = local {
            return Ok(ManifestPiece::of(&encoded, known, offset, max_len));
        }
        let Some(parent) = &self.parent else {
            return Ok(ManifestPiece::Absent);
        };
        self.metrics
            .manifest_parent_lookups
            .fetch_add(1, Ordering::Relaxed);
        let ask = Msg::GetManifest {
            image: image.to_string(),
            block_size,
            known,
            offset,
            max_len,
        };
        match parent.request(&ask).await? {
            Msg::ManifestReply { piece } => Ok(piece),
            m => Err(ManifestLookupError::Parent(FetchError::Protocol {
                peer: parent.addr().to_string(),
                message: format!("unexpected reply {}", m.name()),
            })),
        }
    }

    /// Applies a child's push; returns `Ack` or `Error`.
    pub async fn push(
        &self,
        child: &str,
        resync: bool,
        upto: u64,
        addrs: Vec<(String, String)>,
        changes: Vec<PushedChange>,
    ) -> Msg {
        self.metrics.pushes.fetch_add(1, Ordering::Relaxed);
        if !changes.is_empty() {
            let bytes: usize = changes.iter().map(|(_, c)| c.len()).sum();
            tracing::info!(node = %self.node, %child, changes = changes.len(), bytes, resync, "receiving push");
        }
        let _g = self.apply.lock().await;
        let (acked, addrs_changed) = {
            let mut st = lock(&self.state);
            let mut changed = false;
            for (h, a) in addrs {
                if st.addrs.get(&h) != Some(&a) {
                    st.addrs.insert(h, a);
                    changed = true;
                }
            }
            (st.acked.get(child).copied().unwrap_or(0), changed)
        };
        let fresh: Vec<&PushedChange> = if resync {
            changes.iter().collect()
        } else {
            let dup = changes.iter().filter(|(s, _)| *s <= acked).count();
            self.metrics
                .duplicates
                .fetch_add(dup as u64, Ordering::Relaxed);
            changes.iter().filter(|(s, _)| *s > acked).collect()
        };
        if !resync {
            if let Some((first, _)) = fresh.first() {
                if *first != acked + 1 {
                    self.metrics.gaps.fetch_add(1, Ordering::Relaxed);
                    return Msg::Error {
                        code: code::GAP,
                        acked,
                        message: format!(
                            "{}: {child}'s changes resume at {first} but {acked} was acknowledged: resync",
                            self.node
                        ),
                    };
                }
            }
            if fresh.windows(2).any(|w| w[1].0 <= w[0].0) {
                return error(code::BAD_REQUEST, "push: sequence numbers not increasing");
            }
        }
        let mut decoded = Vec::with_capacity(fresh.len());
        for (s, c) in &fresh {
            match Change::decode(c) {
                Ok(c) => decoded.push(c),
                Err(e) => return error(code::BAD_REQUEST, format!("push: change {s}: {e}")),
            }
        }
        // The hosts this child speaks for.
        let hosts_changed = {
            let mut st = lock(&self.state);
            let set = st.hosts.entry(child.to_string()).or_default();
            let before = set.len();
            set.extend(decoded.iter().map(|c| c.host().to_string()));
            set.len() != before
        };
        if resync {
            let mut r = lock(&self.resyncing);
            let seen = r.entry(child.to_string()).or_default();
            for c in &decoded {
                if let Change::PutImage { host, manifest } = c {
                    seen.insert((host.clone(), manifest.image.clone(), manifest.block_size));
                }
            }
        }
        if resync && upto != RESYNC_MORE {
            // The last piece of a resync: sources of this child's hosts that it
            // did not restate are gone; removed in the same transaction.
            let seen = lock(&self.resyncing).remove(child).unwrap_or_default();
            let hosts = lock(&self.state)
                .hosts
                .get(child)
                .cloned()
                .unwrap_or_default();
            let store = self.store.clone();
            let gone = tokio::task::spawn_blocking(move || -> Result<Vec<Change>> {
                Ok(store
                    .images()?
                    .into_iter()
                    .filter(|i| hosts.contains(&i.host))
                    .filter(|i| !seen.contains(&(i.host.clone(), i.image.clone(), i.block_size)))
                    .map(|i| Change::RemoveImage {
                        host: i.host,
                        image: i.image,
                        block_size: i.block_size,
                    })
                    .collect())
            })
            .await;
            match gone {
                Ok(Ok(g)) => {
                    if !g.is_empty() {
                        tracing::info!(node = %self.node, %child, removed = g.len(),
                            "resync: removing sources the child no longer holds");
                    }
                    decoded.extend(g);
                }
                Ok(Err(e)) => return error(code::INTERNAL, format!("resync: {e:#}")),
                Err(e) => return error(code::INTERNAL, format!("resync: {e}")),
            }
        }
        let new_acked = if resync {
            if upto == RESYNC_MORE {
                acked
            } else {
                upto
            }
        } else {
            fresh.last().map_or(acked, |(s, _)| *s)
        };
        if !decoded.is_empty() {
            let store = self.store.clone();
            let n = decoded.len() as u64;
            match tokio::task::spawn_blocking(move || store.apply(&decoded)).await {
                Ok(Ok(_)) => {
                    self.metrics.changes_applied.fetch_add(n, Ordering::Relaxed);
                }
                Ok(Err(e)) => return error(code::INTERNAL, format!("apply: {e:#}")),
                Err(e) => return error(code::INTERNAL, format!("apply: {e}")),
            }
        }
        if new_acked != acked || addrs_changed || hosts_changed {
            let snapshot = {
                let mut st = lock(&self.state);
                st.acked.insert(child.to_string(), new_acked);
                st.clone()
            };
            let path = self.state_path.clone();
            match tokio::task::spawn_blocking(move || snapshot.save(&path)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return error(code::INTERNAL, format!("record ack: {e:#}")),
                Err(e) => return error(code::INTERNAL, format!("record ack: {e}")),
            }
        }
        if !fresh.is_empty() {
            tracing::info!(node = %self.node, %child, changes = fresh.len(), resync, acked = new_acked, "applied push");
            self.changed.notify_one();
        }
        Msg::Ack { seq: new_acked }
    }
}

/// `upto` of a resync push that is not the last one (nothing acknowledged yet).
pub const RESYNC_MORE: u64 = u64::MAX;

fn error(code: u16, message: impl Into<String>) -> Msg {
    Msg::Error {
        code,
        acked: 0,
        message: message.into(),
    }
}

/// Where a pusher stands (for status and tests).
#[derive(Debug, Default, serde::Serialize)]
pub struct PushStatus {
    /// The parent's acknowledged sequence number of ours.
    pub acked: AtomicU64,
    pub pushes: AtomicU64,
    pub failures: AtomicU64,
    pub resyncs: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// Pushes a store's change log to a parent indexer, periodically and when woken.
pub struct Pusher {
    /// The name we push as (the parent keys its record by it).
    pub node: String,
    pub store: SharedStore,
    pub parent: Peer,
    /// Host → address table sent with every push.
    pub addrs: Arc<dyn Fn() -> Vec<(String, String)> + Send + Sync>,
    pub interval: Duration,
    pub max_changes: usize,
    /// Bytes of encoded changes per push frame (one change may exceed it alone).
    pub max_bytes: usize,
    pub wake: Arc<Notify>,
    pub status: Arc<PushStatus>,
}

impl Pusher {
    /// Runs until the task is dropped.
    pub async fn run(self) {
        let mut acked: Option<u64> = None;
        loop {
            match self.round(&mut acked).await {
                Ok(()) => *lock(&self.status.last_error) = None,
                Err(e) => {
                    self.status.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = %self.node, parent = %self.parent.addr(), "push: {e:#}");
                    *lock(&self.status.last_error) = Some(format!("{e:#}"));
                    acked = None; // ask the parent where we stand
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn BlockStore) -> crate::index::Result<T> + Send + 'static,
    ) -> Result<T> {
        let s = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(&*s)).await??)
    }

    async fn round(&self, acked: &mut Option<u64>) -> Result<()> {
        let a = match *acked {
            Some(a) => a,
            None => {
                // An empty push: the parent answers what it has of ours.
                let a = self
                    .parent
                    .push(&self.node, false, 0, (self.addrs)(), Vec::new())
                    .await?;
                let ours = self.store.seq();
                if a > ours {
                    tracing::warn!(node = %self.node, parent_acked = a, ours,
                        "the parent has acknowledged more than this store holds: resync");
                    self.resync(acked).await?;
                    return Ok(());
                }
                *acked = Some(a);
                self.blocking(move |s| s.trim_log(a)).await?;
                a
            }
        };
        let mut a = a;
        let mut sent_any = false;
        loop {
            let (max_c, max_b) = (self.max_changes, self.max_bytes);
            let batch = self
                .blocking(move |s| {
                    let cs = s.changes_since(a, max_c)?;
                    let mut out: Vec<PushedChange> = Vec::new();
                    let mut bytes = 0;
                    for (seq, c) in cs {
                        let e = c.encode();
                        if !out.is_empty() && bytes + e.len() > max_b {
                            break;
                        }
                        bytes += e.len();
                        out.push((seq, Bytes::from(e)));
                    }
                    Ok(out)
                })
                .await?;
            if batch.is_empty() {
                if !sent_any {
                    // Heartbeat: keeps the parent's address table current.
                    self.parent
                        .push(&self.node, false, 0, (self.addrs)(), Vec::new())
                        .await?;
                }
                return Ok(());
            }
            let last = batch.last().map_or(a, |(s, _)| *s);
            let n = batch.len();
            match self
                .parent
                .push(&self.node, false, 0, (self.addrs)(), batch)
                .await
            {
                Ok(seq) => {
                    self.status.pushes.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(node = %self.node, changes = n, acked = seq, "pushed");
                    if seq < last {
                        return Err(ServeError::Protocol(format!(
                            "parent acknowledged {seq}, expected {last}"
                        )));
                    }
                    self.blocking(move |s| s.trim_log(seq)).await?;
                    a = seq;
                    *acked = Some(seq);
                    self.status.acked.store(seq, Ordering::Relaxed);
                    sent_any = true;
                }
                Err(FetchError::Remote { code: c, .. }) if c == code::GAP => {
                    self.resync(acked).await?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Restates everything the store holds (puts of every source), then records
    /// the store's sequence number as acknowledged.
    async fn resync(&self, acked: &mut Option<u64>) -> Result<()> {
        self.status.resyncs.fetch_add(1, Ordering::Relaxed);
        let (upto, puts) = self
            .blocking(|s| {
                let upto = s.seq();
                let mut puts = Vec::new();
                for info in s.images()? {
                    if let Some(m) = s.manifest_at(&info.host, &info.image, info.block_size)? {
                        puts.push(Change::PutImage {
                            host: info.host,
                            manifest: m,
                        });
                    }
                }
                Ok((upto, puts))
            })
            .await?;
        tracing::info!(node = %self.node, sources = puts.len(), upto, "resync to parent");
        let mut chunk: Vec<PushedChange> = Vec::new();
        let mut bytes = 0;
        let n = puts.len();
        for (i, c) in puts.into_iter().enumerate() {
            let e = c.encode();
            bytes += e.len();
            chunk.push((0, Bytes::from(e)));
            if bytes >= self.max_bytes && i + 1 < n {
                self.parent
                    .push(
                        &self.node,
                        true,
                        RESYNC_MORE,
                        (self.addrs)(),
                        std::mem::take(&mut chunk),
                    )
                    .await?;
                bytes = 0;
            }
        }
        let seq = self
            .parent
            .push(&self.node, true, upto, (self.addrs)(), chunk)
            .await?;
        let s2 = seq;
        self.blocking(move |s| s.trim_log(s2)).await?;
        *acked = Some(seq);
        self.status.acked.store(seq, Ordering::Relaxed);
        Ok(())
    }
}
