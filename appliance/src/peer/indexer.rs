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
//!   A change the parent cannot take (over `max_image_blocks`, undecodable,
//!   invalid) is refused on its own — named in an `Error{REFUSED, acked}` reply,
//!   logged, counted, its source dropped — and the rest of the push applies, in
//!   groups of bounded expansion ([`apply_in_groups`]); the child moves past it.
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
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::Notify;

use parking_lot::Mutex;

use super::{
    client::{FetchError, Peer},
    durable_file::{self, Existing},
    error::{AnnotateIo, PeerError, Result},
    identity::PeerEntry,
    proto::{code, Holder, ManifestPiece, Msg, PushedChange, MAX_PUSH_CHANGES},
};
use crate::index::{store::Peeked, BlockHash, BlockStore, Change};

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
            Ok(b) => serde_json::from_slice(&b).map_err(|source| PeerError::Json {
                what: format!("parse {}", path.display()),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(PeerError::io(format!("read {}", path.display()), e)),
        }
    }

    /// Replaces the file whole and durably (see [`durable_file`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        durable_file::write(path, &json, Existing::Replace)
            .io_context(|| format!("write {}", path.display()))
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
    /// Pushed changes refused (over `max_image_blocks`, undecodable, invalid);
    /// the rest of their push was applied.
    pub refused: AtomicU64,
    /// The last refusal, naming the child, its change and why.
    #[serde(serialize_with = "super::serialize_locked")]
    pub last_refused: Mutex<Option<String>>,
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
        self.state
            .lock()
            .addrs
            .iter()
            .map(|(h, a)| (h.clone(), a.clone()))
            .collect()
    }

    pub fn child_state(&self) -> ChildState {
        self.state.lock().clone()
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
            let st = self.state.lock();
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

    /// A piece of `image`'s manifest as `host` holds it (see
    /// [`Msg::GetManifest`]): from the local store, else from the parent (asked
    /// for the same host's holding; it may ask its own), else
    /// [`ManifestPiece::Absent`]. Another host's manifest of the same name is
    /// never the answer.
    pub async fn manifest_piece(
        &self,
        host: &str,
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
        let (holder, name) = (host.to_string(), image.to_string());
        let local = tokio::task::spawn_blocking(move || {
            store
                .host_manifest(&holder, &name, (block_size != 0).then_some(block_size))
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
            host: host.to_string(),
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

    /// Applies a child's push; returns `Ack` or `Error`. `child` is the pushing
    /// node as the peers file names it now: a change about a host it does not
    /// speak for ([`PeerEntry::speaks_for`]) is refused and logged, the rest
    /// apply; an address for such a host is ignored.
    #[expect(
        clippy::too_many_lines,
        reason = "one push applied under one lock: dedup, gap check, apply, record, as a single sequence"
    )]
    pub async fn push(
        &self,
        child: &PeerEntry,
        resync: bool,
        upto: u64,
        addrs: Vec<(String, String)>,
        changes: Vec<PushedChange>,
    ) -> Msg {
        let entry = child;
        let child = entry.name.as_str();
        self.metrics.pushes.fetch_add(1, Ordering::Relaxed);
        let (addrs, foreign_addrs): (Vec<_>, Vec<_>) =
            addrs.into_iter().partition(|(h, _)| entry.speaks_for(h));
        if !foreign_addrs.is_empty() {
            tracing::warn!(node = %self.node, %child, hosts = ?foreign_addrs.iter().map(|(h, _)| h).collect::<Vec<_>>(),
                "ignored addresses of hosts the child does not speak for");
        }
        if !changes.is_empty() {
            let bytes: usize = changes.iter().map(|(_, c)| c.len()).sum();
            tracing::info!(node = %self.node, %child, changes = changes.len(), bytes, resync, "receiving push");
        }
        let _g = self.apply.lock().await;
        let (acked, addrs_changed) = {
            let mut st = self.state.lock();
            let mut any_new = false;
            for (h, a) in addrs {
                if st.addrs.get(&h) != Some(&a) {
                    st.addrs.insert(h, a);
                    any_new = true;
                }
            }
            (st.acked.get(child).copied().unwrap_or(0), any_new)
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
        // What each change is about, read without expanding it: a change is
        // decoded only when its group is applied (see `apply_in_groups`).
        let max_blocks = self.store.max_image_blocks();
        let peeks: Vec<Option<Peeked>> = fresh.iter().map(|(_, c)| Change::peek(c)).collect();
        // Changes about hosts the child does not speak for: refused (by their
        // position in `fresh`), never applied, never counted as its hosts.
        let foreign: Vec<(usize, String)> = peeks
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let p = p.as_ref()?;
                (!entry.speaks_for(&p.host)).then(|| {
                    (
                        i,
                        format!(
                            "{child} ({:?}) does not speak for host {}",
                            entry.role, p.host
                        ),
                    )
                })
            })
            .collect();
        let is_foreign = |i: usize| foreign.binary_search_by_key(&i, |(j, _)| *j).is_ok();
        // The hosts this child speaks for, as its pushes show them.
        let hosts_changed = {
            let mut st = self.state.lock();
            let set = st.hosts.entry(child.to_string()).or_default();
            let before = set.len();
            set.extend(
                peeks
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !is_foreign(*i))
                    .filter_map(|(_, p)| p.as_ref())
                    .map(|p| p.host.clone()),
            );
            set.len() != before
        };
        if resync {
            let mut r = self.resyncing.lock();
            let seen = r.entry(child.to_string()).or_default();
            for (_, p) in peeks
                .iter()
                .enumerate()
                .filter(|(i, _)| !is_foreign(*i))
                .filter_map(|(i, p)| Some((i, p.as_ref()?)))
            {
                // A put over the cap is refused: its source is not restated.
                if let (true, Some((image, bs)), Some(n)) = (p.put, &p.source, p.blocks) {
                    if n <= max_blocks {
                        seen.insert((p.host.clone(), image.clone(), *bs));
                    }
                }
            }
        }
        let mut tail = Vec::new();
        if resync && upto != RESYNC_MORE {
            // The last piece of a resync: sources of this child's hosts that it
            // did not restate are gone; removed with the rest of the push.
            let seen = self.resyncing.lock().remove(child).unwrap_or_default();
            let hosts = self
                .state
                .lock()
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
                    tail = g;
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
        let mut refusals = Vec::new();
        if !fresh.is_empty() || !tail.is_empty() {
            let store = self.store.clone();
            // Position in `fresh` of each change passed on.
            let kept: Vec<usize> = (0..fresh.len()).filter(|i| !is_foreign(*i)).collect();
            let raw: Vec<Bytes> = kept.iter().map(|&i| fresh[i].1.clone()).collect();
            let mut peeks = peeks;
            let peeks: Vec<Option<Peeked>> = kept.iter().map(|&i| peeks[i].take()).collect();
            let budget = max_blocks.saturating_mul(2);
            match tokio::task::spawn_blocking(move || {
                apply_in_groups(&*store, &raw, peeks, tail, budget)
            })
            .await
            {
                Ok(Ok(done)) => {
                    self.metrics
                        .changes_applied
                        .fetch_add(done.applied, Ordering::Relaxed);
                    refusals = done
                        .refused
                        .into_iter()
                        .map(|(i, why)| (kept[i], why))
                        .chain(foreign)
                        .collect();
                    refusals.sort_by_key(|(i, _)| *i);
                }
                Ok(Err(e)) => return error(code::INTERNAL, format!("apply: {e:#}")),
                Err(e) => return error(code::INTERNAL, format!("apply: {e}")),
            }
        }
        // Name each refused change by the child's sequence number (a resync's
        // changes have none: by position).
        let refusals: Vec<String> = refusals
            .into_iter()
            .map(|(i, why)| {
                if resync {
                    format!("restated change #{} from {child}: {why}", i + 1)
                } else {
                    format!("change {} from {child}: {why}", fresh[i].0)
                }
            })
            .collect();
        if !refusals.is_empty() {
            self.metrics
                .refused
                .fetch_add(refusals.len() as u64, Ordering::Relaxed);
            for r in refusals.iter().take(MAX_REFUSALS_NAMED) {
                tracing::warn!(node = %self.node, %child, "refused {r}");
            }
            *self.metrics.last_refused.lock() = refusals.last().cloned();
        }
        if new_acked != acked || addrs_changed || hosts_changed {
            let snapshot = {
                let mut st = self.state.lock();
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
            tracing::info!(node = %self.node, %child, changes = fresh.len(), refused = refusals.len(),
                resync, acked = new_acked, "applied push");
            self.changed.notify_one();
        }
        if refusals.is_empty() {
            return Msg::Ack { seq: new_acked };
        }
        // Applied and acknowledged, but the child must hear which changes this
        // index refused: an error that carries the acknowledgement.
        let mut message = format!(
            "{}: refused {} of {} changes (the rest applied; acknowledged through {new_acked}): ",
            self.node,
            refusals.len(),
            fresh.len()
        );
        message.push_str(&refusals[..refusals.len().min(MAX_REFUSALS_NAMED)].join("; "));
        if refusals.len() > MAX_REFUSALS_NAMED {
            let more = refusals.len() - MAX_REFUSALS_NAMED;
            message.push_str("; and ");
            message.push_str(&more.to_string());
            message.push_str(" more");
        }
        Msg::Error {
            code: code::REFUSED,
            acked: new_acked,
            message,
        }
    }
}

/// Refused changes named in a reply and logged one by one (the rest counted).
const MAX_REFUSALS_NAMED: usize = 8;

/// What [`apply_in_groups`] did.
#[derive(Debug, Default)]
struct GroupsApplied {
    /// Changes applied (including the removals that replace refused ones).
    applied: u64,
    /// Refused changes: index into the pushed changes, and why.
    refused: Vec<(usize, String)>,
}

/// A change of a push on its way to the store: still encoded, or (the resync's
/// removals) already a change.
enum Pending {
    Raw(usize, Bytes, Option<Peeked>),
    Ready(Change),
}

/// Applies a push's changes (`raw`, with their [`Change::peek`]s), then `tail`,
/// in order, in transactions whose changes expand to at most `budget` blocks
/// together (a change at the cap replacing a source at the cap: 2 ×
/// `max_image_blocks`), decoding each change only when its group is applied: so
/// a push of many changes each within the cap cannot expand all of them at once.
/// A change that cannot be decoded (e.g. a manifest over the cap) or fails
/// [`Change::check`] is refused and its source dropped, as
/// [`BlockStore::apply_checked`] does; the rest apply. A failure of the store
/// stops at that group (earlier groups stay applied; the child resends the
/// push and those changes apply again, to the same result).
#[expect(
    clippy::many_single_char_names,
    reason = "index names for changes, groups and sources inside short loops"
)]
fn apply_in_groups(
    store: &dyn BlockStore,
    raw: &[Bytes],
    peeks: Vec<Option<Peeked>>,
    tail: Vec<Change>,
    budget: u64,
) -> crate::index::Result<GroupsApplied> {
    let max = store.max_image_blocks();
    let mut done = GroupsApplied::default();
    let mut group: Vec<Change> = Vec::new();
    // For each change of `group`: its index in `raw` (None: a resync removal, or
    // the removal replacing an undecodable change).
    let mut origin: Vec<Option<usize>> = Vec::new();
    let mut weight = 0u64;
    let flush = |group: &mut Vec<Change>,
                 origin: &mut Vec<Option<usize>>,
                 done: &mut GroupsApplied|
     -> crate::index::Result<()> {
        if group.is_empty() {
            return Ok(());
        }
        let n = group.len() as u64;
        let a = store.apply_checked(std::mem::take(group))?;
        for (at, e) in a.refused {
            // A refused change is replaced by a removal, which is applied.
            if let Some(i) = origin[at] {
                done.refused.push((i, e.to_string()));
            }
        }
        done.applied += n;
        origin.clear();
        Ok(())
    };
    let pending = raw
        .iter()
        .zip(peeks)
        .enumerate()
        .map(|(i, (c, p))| Pending::Raw(i, c.clone(), p))
        .chain(tail.into_iter().map(Pending::Ready));
    for item in pending {
        let w = match &item {
            Pending::Raw(_, _, p) => expansion(store, p.as_ref(), max, budget)?,
            Pending::Ready(c) => match c {
                Change::RemoveImage {
                    host,
                    image,
                    block_size,
                } => store.source_blocks(host, image, *block_size)?.min(max),
                _ => budget,
            },
        };
        if !group.is_empty() && weight.saturating_add(w) > budget {
            flush(&mut group, &mut origin, &mut done)?;
            weight = 0;
        }
        weight = weight.saturating_add(w);
        match item {
            Pending::Ready(c) => {
                group.push(c);
                origin.push(None);
            }
            Pending::Raw(i, c, p) => match Change::decode_limited(&c, max) {
                Ok(c) => {
                    group.push(c);
                    origin.push(Some(i));
                }
                Err(e) => {
                    done.refused.push((i, e.to_string()));
                    if let Some(rm) = p.as_ref().and_then(Peeked::removal) {
                        group.push(rm);
                        origin.push(None);
                    }
                }
            },
        }
    }
    flush(&mut group, &mut origin, &mut done)?;
    done.refused.sort_by_key(|(i, _)| *i);
    Ok(done)
}

/// Blocks applying a change expands: its own (a put's manifest, a patch's new
/// size) and its source's current manifest (decoded to be replaced, patched or
/// removed); each counted only within `max` (beyond it nothing is expanded: the
/// change is refused, a stored manifest treated as absent). A host removal
/// expands every source of the host: it gets a group of its own (`budget`).
fn expansion(
    store: &dyn BlockStore,
    peek: Option<&Peeked>,
    max: u64,
    budget: u64,
) -> crate::index::Result<u64> {
    let Some(p) = peek else {
        return Ok(0); // undecodable: refused, nothing expanded
    };
    let Some((image, bs)) = &p.source else {
        return Ok(budget);
    };
    let own = p.blocks.filter(|&n| n <= max).unwrap_or(0);
    let current = store.source_blocks(&p.host, image, *bs)?;
    Ok(own + if current <= max { current } else { 0 })
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
    #[serde(serialize_with = "super::serialize_locked")]
    pub last_error: Mutex<Option<String>>,
    /// Pushes of which the parent refused some changes (and applied the rest).
    pub refused: AtomicU64,
    /// The parent's last refusal (which changes, why).
    #[serde(serialize_with = "super::serialize_locked")]
    pub last_refused: Mutex<Option<String>>,
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
                Ok(()) => *self.status.last_error.lock() = None,
                Err(e) => {
                    self.status.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = %self.node, parent = %self.parent.addr(), "push: {e:#}");
                    *self.status.last_error.lock() = Some(format!("{e:#}"));
                    acked = None; // ask the parent where we stand
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// One push; a reply that some changes were refused ([`code::REFUSED`]) is
    /// logged and recorded, and counts as the acknowledgement it carries: the
    /// parent applied the rest, and resending the refused ones would be refused
    /// again.
    async fn push_once(
        &self,
        resync: bool,
        upto: u64,
        changes: Vec<PushedChange>,
    ) -> std::result::Result<u64, FetchError> {
        match self
            .parent
            .push(&self.node, resync, upto, (self.addrs)(), changes)
            .await
        {
            Err(FetchError::Remote {
                code: c,
                acked,
                message,
                ..
            }) if c == code::REFUSED => {
                self.status.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %self.node, parent = %self.parent.addr(), acked,
                    "parent refused changes: {message}");
                *self.status.last_refused.lock() = Some(message);
                Ok(acked)
            }
            r => r,
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
        let a = if let Some(a) = *acked {
            a
        } else {
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
            match self.push_once(false, 0, batch).await {
                Ok(seq) => {
                    self.status.pushes.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(node = %self.node, changes = n, acked = seq, "pushed");
                    if seq < last {
                        return Err(PeerError::Protocol(format!(
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
            let full = bytes >= self.max_bytes || chunk.len() >= MAX_PUSH_CHANGES;
            if full && i + 1 < n {
                self.push_once(true, RESYNC_MORE, std::mem::take(&mut chunk))
                    .await?;
                bytes = 0;
            }
        }
        let seq = self.push_once(true, upto, chunk).await?;
        let s2 = seq;
        self.blocking(move |s| s.trim_log(s2)).await?;
        *acked = Some(seq);
        self.status.acked.store(seq, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Manifest, RedbStore, StoreOptions};

    fn h(x: u8) -> BlockHash {
        BlockHash::of(&[x])
    }

    /// A put of `n` blocks, the first named `h(first)` and the rest zero.
    fn put(host: &str, image: &str, n: u64, first: u8) -> Change {
        let mut blocks = vec![None; n as usize];
        blocks[0] = Some(h(first));
        Change::PutImage {
            host: host.into(),
            manifest: Manifest {
                image: image.into(),
                size: n * 4096,
                block_size: 4096,
                blocks,
            },
        }
    }

    /// A patch growing `image` to 2^32 - 1 blocks (141 GB decoded): what aborted
    /// the indexer before changes were checked against `max_image_blocks`.
    fn huge_patch(host: &str, image: &str) -> Change {
        Change::PatchImage {
            host: host.into(),
            image: image.into(),
            block_size: 4096,
            size: u64::from(u32::MAX) * 4096,
            blocks: vec![],
        }
    }

    fn pushed(changes: &[Change], first_seq: u64) -> Vec<PushedChange> {
        changes
            .iter()
            .enumerate()
            .map(|(i, c)| (first_seq + i as u64, Bytes::from(c.encode())))
            .collect()
    }

    fn service(dir: &Path, max_image_blocks: u64) -> IndexService {
        let store = RedbStore::open(
            &dir.join("ix.redb"),
            StoreOptions {
                max_image_blocks,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        IndexService::open("rack1", Arc::new(store), None, dir.join("children.json")).unwrap()
    }

    /// The peers-file entry of agent `name`.
    fn agent(name: &str) -> PeerEntry {
        PeerEntry {
            name: name.into(),
            role: crate::peer::proto::Role::Agent,
            hosts: vec![],
        }
    }

    /// A child changes only the hosts it speaks for: an agent its own, an
    /// indexer those delegated to it; the rest of its push applies.
    #[tokio::test]
    async fn changes_about_hosts_the_child_does_not_speak_for_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ix = service(dir.path(), crate::index::DEFAULT_MAX_IMAGE_BLOCKS);
        // The library's own agent indexes its LUN.
        let library = agent("library");
        let lib = [put("library", "lun1", 4, 1)];
        assert_eq!(
            ix.push(&library, false, 0, vec![], pushed(&lib, 1)).await,
            Msg::Ack { seq: 1 }
        );
        // hv1 pushes as the library, removes it, re-addresses it, and also
        // puts its own copy of the image.
        let batch = [
            put("library", "lun1", 4, 9),
            Change::RemoveHost {
                host: "library".into(),
            },
            put("hv1", "lun1", 4, 9),
        ];
        let addrs = vec![
            ("library".to_string(), "198.18.9.9:7900".to_string()),
            ("hv1".to_string(), "198.18.3.2:7900".to_string()),
        ];
        let reply = ix
            .push(&agent("hv1"), false, 0, addrs, pushed(&batch, 1))
            .await;
        let Msg::Error {
            code: c,
            acked,
            message,
        } = reply
        else {
            panic!("expected a refusal, got {reply:?}");
        };
        assert_eq!((c, acked), (code::REFUSED, 3));
        assert!(
            message.contains("change 1 from hv1")
                && message.contains("change 2 from hv1")
                && message.contains("does not speak for host library")
                && !message.contains("change 3"),
            "{message}"
        );
        let store = ix.store();
        // The library's manifest is the library's; hv1's copy is hv1's holding.
        let m = store.manifest_at("library", "lun1", 4096).unwrap().unwrap();
        assert_eq!(m.blocks[0], Some(h(1)));
        let mine = store.manifest_at("hv1", "lun1", 4096).unwrap().unwrap();
        assert_eq!(mine.blocks[0], Some(h(9)));
        assert_eq!(
            ix.addrs(),
            vec![("hv1".to_string(), "198.18.3.2:7900".to_string())]
        );
        assert_eq!(ix.metrics.refused.load(Ordering::Relaxed), 2);
        // An indexer speaks for its delegated hosts only.
        let rack = PeerEntry {
            name: "rack2".into(),
            role: crate::peer::proto::Role::Indexer,
            hosts: vec!["r2-*".into()],
        };
        let batch = [put("r2-hv1", "x", 2, 5), put("library", "lun1", 4, 6)];
        match ix.push(&rack, false, 0, vec![], pushed(&batch, 1)).await {
            Msg::Error {
                code: c, message, ..
            } => {
                assert_eq!(c, code::REFUSED);
                assert!(
                    message.contains("rack2 (Indexer) does not speak for host library"),
                    "{message}"
                );
            }
            m => panic!("expected a refusal, got {m:?}"),
        }
        assert_eq!(store.holders(&h(5)).unwrap()[0].host.as_ref(), "r2-hv1");
        assert_eq!(
            store
                .manifest_at("library", "lun1", 4096)
                .unwrap()
                .unwrap()
                .blocks[0],
            Some(h(1))
        );
    }

    #[tokio::test]
    async fn a_refused_change_does_not_block_the_rest_of_the_push() {
        let dir = tempfile::tempdir().unwrap();
        let ix = service(dir.path(), crate::index::DEFAULT_MAX_IMAGE_BLOCKS);
        let batch = [
            put("hv1", "a", 4, 1),
            huge_patch("hv1", "b"),
            put("hv1", "c", 4, 3),
        ];
        let reply = ix
            .push(&agent("hv1"), false, 0, vec![], pushed(&batch, 1))
            .await;
        let Msg::Error {
            code: c,
            acked,
            message,
        } = reply
        else {
            panic!("expected a refusal, got {reply:?}");
        };
        assert_eq!((c, acked), (code::REFUSED, 3));
        assert!(
            message.contains("change 2 from hv1")
                && message.contains("PatchImage of `b` held by hv1")
                && message.contains("more than max_image_blocks"),
            "{message}"
        );
        let store = ix.store();
        assert_eq!(store.holders(&h(1)).unwrap().len(), 1);
        assert_eq!(store.holders(&h(3)).unwrap().len(), 1);
        assert_eq!(ix.metrics.refused.load(Ordering::Relaxed), 1);
        assert!(ix
            .metrics
            .last_refused
            .lock()
            .as_deref()
            .is_some_and(|m| m.contains("change 2")));
        assert_eq!(ix.child_state().acked["hv1"], 3);
        // The same push again (a child that missed the reply): acknowledged, not
        // refused forever; the next change follows.
        let again = ix
            .push(&agent("hv1"), false, 0, vec![], pushed(&batch, 1))
            .await;
        assert_eq!(again, Msg::Ack { seq: 3 });
        let next = ix
            .push(
                &agent("hv1"),
                false,
                0,
                vec![],
                pushed(&[put("hv1", "d", 2, 4)], 4),
            )
            .await;
        assert_eq!(next, Msg::Ack { seq: 4 });
        assert_eq!(store.holders(&h(4)).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_manifest_over_the_cap_is_refused_and_its_source_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ix = service(dir.path(), 16);
        let ok = ix
            .push(
                &agent("hv1"),
                false,
                0,
                vec![],
                pushed(&[put("hv1", "big", 8, 1)], 1),
            )
            .await;
        assert_eq!(ok, Msg::Ack { seq: 1 });
        // Now restated with a bitmap claiming 17 blocks: refused undecoded, and
        // the earlier state of `big` is no longer claimed.
        let batch = [put("hv1", "big", 17, 2), put("hv1", "small", 2, 3)];
        let reply = ix
            .push(&agent("hv1"), false, 0, vec![], pushed(&batch, 2))
            .await;
        match reply {
            Msg::Error {
                code: c,
                acked: 3,
                message,
            } if c == code::REFUSED => {
                assert!(
                    message.contains("change 2 from hv1")
                        && message.contains("manifest of `big`")
                        && message.contains("claims 17 blocks, more than max_image_blocks = 16"),
                    "{message}"
                );
            }
            r => panic!("expected a refusal, got {r:?}"),
        }
        let store = ix.store();
        assert!(store.holders(&h(1)).unwrap().is_empty());
        assert!(store.manifest_at("hv1", "big", 4096).unwrap().is_none());
        assert_eq!(store.holders(&h(3)).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_resync_with_a_refused_put_completes() {
        let dir = tempfile::tempdir().unwrap();
        let ix = service(dir.path(), 16);
        let batch = [put("hv1", "big", 17, 1), put("hv1", "ok", 2, 2)];
        let reply = ix
            .push(&agent("hv1"), true, 7, vec![], pushed(&batch, 0))
            .await;
        assert!(
            matches!(&reply, Msg::Error { code: c, acked: 7, message }
                if *c == code::REFUSED && message.contains("restated change #1 from hv1")),
            "{reply:?}"
        );
        assert_eq!(ix.child_state().acked["hv1"], 7);
        assert_eq!(ix.store().holders(&h(2)).unwrap().len(), 1);
    }

    /// Delegates to a store and records the size of every transaction.
    struct Recording {
        inner: RedbStore,
        batches: Mutex<Vec<usize>>,
    }

    impl BlockStore for Recording {
        fn apply(&self, changes: &[Change]) -> crate::index::Result<u64> {
            self.batches.lock().push(changes.len());
            self.inner.apply(changes)
        }
        fn max_image_blocks(&self) -> u64 {
            self.inner.max_image_blocks()
        }
        fn source_blocks(&self, host: &str, image: &str, bs: u32) -> crate::index::Result<u64> {
            self.inner.source_blocks(host, image, bs)
        }
        fn holders(&self, x: &BlockHash) -> crate::index::Result<Vec<crate::index::Location>> {
            self.inner.holders(x)
        }
        fn manifest(&self, i: &str, bs: Option<u32>) -> crate::index::Result<Option<Manifest>> {
            self.inner.manifest(i, bs)
        }
        fn manifest_at(
            &self,
            host: &str,
            i: &str,
            bs: u32,
        ) -> crate::index::Result<Option<Manifest>> {
            self.inner.manifest_at(host, i, bs)
        }
        fn images(&self) -> crate::index::Result<Vec<crate::index::store::ImageInfo>> {
            self.inner.images()
        }
        fn seq(&self) -> u64 {
            self.inner.seq()
        }
        fn changes_since(
            &self,
            after: u64,
            limit: usize,
        ) -> crate::index::Result<Vec<(u64, Change)>> {
            self.inner.changes_since(after, limit)
        }
        fn trim_log(&self, upto: u64) -> crate::index::Result<()> {
            self.inner.trim_log(upto)
        }
    }

    #[test]
    fn a_push_is_applied_in_groups_of_bounded_expansion() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            max_image_blocks: 10,
            ..StoreOptions::default()
        };
        let store = Recording {
            inner: RedbStore::open(&dir.path().join("i"), opts).unwrap(),
            batches: Mutex::new(Vec::new()),
        };
        // An existing 9-block source: replacing it expands 9 + its new blocks.
        store.apply(&[put("hv1", "x", 9, 9)]).unwrap();
        store.batches.lock().clear();
        let mut enc: Vec<Bytes> = [
            put("hv1", "a", 8, 1),
            put("hv1", "b", 8, 2),
            put("hv1", "x", 3, 3),
            huge_patch("hv1", "c"),
            put("hv1", "d", 8, 4),
        ]
        .iter()
        .map(|c| Bytes::from(c.encode()))
        .collect();
        enc.push(Bytes::from_static(b"\x09garbage"));
        let peeks = enc.iter().map(|c| Change::peek(c)).collect();
        let tail = vec![Change::RemoveImage {
            host: "hv1".into(),
            image: "a".into(),
            block_size: 4096,
        }];
        let done = apply_in_groups(&store, &enc, peeks, tail, 20).unwrap();
        // a+b = 16; x (3 + 9 current) starts a group; the refused patch expands
        // nothing; d (8) fits with x; the garbage is refused; removing a (8)
        // fits with x and d? 12 + 8 + 8 > 20: a group of its own.
        assert_eq!(*store.batches.lock(), [2, 3, 1]);
        let refused: Vec<usize> = done.refused.iter().map(|(i, _)| *i).collect();
        assert_eq!(refused, [3, 5]);
        assert!(done.refused[0]
            .1
            .contains("more than max_image_blocks = 10"));
        assert_eq!(done.applied, 6);
        assert!(
            store.holders(&h(1)).unwrap().is_empty(),
            "a removed by the tail"
        );
        for x in [2, 3, 4] {
            assert_eq!(store.holders(&h(x)).unwrap().len(), 1, "h({x})");
        }
        assert!(store.holders(&h(9)).unwrap().is_empty(), "x replaced");
    }

    /// The child's side over TCP: a parent with a lower cap refuses one of the
    /// child's changes; the child records the refusal, trims its log past it and
    /// keeps pushing.
    #[tokio::test]
    async fn the_pusher_moves_past_a_refused_change() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |node: &str, parent: Option<std::net::SocketAddr>, extra: &str| {
            crate::peer::tests::indexer_config(dir.path(), node, parent, extra)
        };
        let g = super::super::start_indexer(&cfg("g", None, "max_image_blocks = 8\n"))
            .await
            .unwrap();
        let r = super::super::start_indexer(&cfg("r", Some(g.local_addr), ""))
            .await
            .unwrap();
        r.service
            .store()
            .apply(&[put("hv1", "big", 9, 1), put("hv1", "ok", 2, 2)])
            .unwrap();
        r.service.changed.notify_one();
        let wait_acked = |want: u64| {
            let r = &r;
            async move {
                for _ in 0..250 {
                    if r.push_status.acked.load(Ordering::Relaxed) == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("child's acked never reached {want}: {:?}", r.push_status);
            }
        };
        wait_acked(2).await;
        assert_eq!(r.push_status.refused.load(Ordering::Relaxed), 1);
        let last = r
            .push_status
            .last_refused
            .lock()
            .clone()
            .unwrap_or_default();
        assert!(
            last.contains("change 1 from r") && last.contains("manifest of `big`"),
            "{last}"
        );
        let gs = g.service.store();
        assert_eq!(gs.holders(&h(2)).unwrap().len(), 1);
        assert!(gs.holders(&h(1)).unwrap().is_empty());
        assert_eq!(g.service.metrics.refused.load(Ordering::Relaxed), 1);
        assert!(
            r.service.store().changes_since(0, 10).unwrap().is_empty(),
            "log trimmed"
        );
        r.service
            .store()
            .apply(&[put("hv1", "next", 2, 3)])
            .unwrap();
        r.service.changed.notify_one();
        wait_acked(3).await;
        assert_eq!(gs.holders(&h(3)).unwrap().len(), 1);
        assert_eq!(r.push_status.refused.load(Ordering::Relaxed), 1);
    }
}
