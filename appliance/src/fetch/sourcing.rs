//! Blocks the cache lacks, fetched by hash from the cheapest holders.
//!
//! For each missing block: ask the appliance's index who holds it (its own store,
//! then its parent's — the global index), order the holders by path cost from this
//! appliance ([`SourceRanks`], the planner's cost matrix), and fetch with the peer
//! client, which verifies every block's blake3 against the requested hash (the
//! manifest's) and moves on to the next holder when one fails, lies or dies. Verified
//! blocks land in the [`BlockCache`] tagged with their [`Origin`], so the first READ
//! that serves them counts them by source.
//!
//! Fetches run as their own tasks: a READ waits for them only up to the deadline
//! ([`SourcingOptions::deadline`]) and then passes through to the library, while the
//! fetch completes into the cache for the next READ. A block already being fetched
//! is not asked for twice: later callers wait on the first fetch.
//!
//! When the holder lookup fails (the parent index unreachable or slow), fetching
//! backs off ([`LookupBackoff`]: 1 s, doubling to 30 s): meanwhile READs pass
//! through at once instead of each waiting out the deadline for a lookup that
//! will fail the same way.
//!
//! [`rerank_loop`] re-ranks the holders whenever the live link costs change.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{BlockCache, Origin, SourceClass, MAX_HOPS};
use crate::{
    cost::{Graph, Role},
    index::{BlockHash, BlockHashMap, BlockHashSet},
    peer::{client::PeerClient, proto::Holder},
};

/// The future a [`HolderLookup`] returns: per hash, its holders.
pub type HolderFuture = Pin<Box<dyn Future<Output = Result<Vec<Vec<Holder>>, String>> + Send>>;

/// Who holds blocks (the appliance's index service: its store, then its parent).
pub trait HolderLookup: Send + Sync {
    fn holders(&self, hashes: Vec<BlockHash>) -> HolderFuture;
}

impl HolderLookup for Arc<crate::peer::indexer::IndexService> {
    fn holders(&self, hashes: Vec<BlockHash>) -> HolderFuture {
        let ix = self.clone();
        Box::pin(async move {
            crate::peer::indexer::IndexService::holders(&ix, &hashes, false)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }
}

/// How one holder ranks from this appliance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rank {
    /// Path cost (the topology's weights as last priced).
    pub cost: f64,
    /// Links on that path.
    pub hops: u8,
    pub class: SourceClass,
}

/// Every node's [`Rank`] as seen from one appliance.
#[derive(Clone, Debug, Default)]
pub struct SourceRanks {
    node: String,
    ranks: HashMap<String, Rank>,
    /// Per host: the links (`a-b`) of the cheapest path, holder side first.
    paths: HashMap<String, Vec<String>>,
}

impl SourceRanks {
    /// Ranks from `node` over `graph` with its current weights; `None` when `node`
    /// is not in the graph. The library's node is [`SourceClass::Library`]; nodes
    /// one hop away are this appliance's rack; the rest are other racks.
    pub fn from_graph(graph: &Graph, node: &str) -> Option<SourceRanks> {
        let source = graph.node_id(node)?;
        let paths = graph.shortest_paths(source);
        let mut ranks = HashMap::new();
        let mut link_paths = HashMap::new();
        for id in 0..graph.node_count() as u32 {
            if id == source {
                continue;
            }
            let Some(cost) = paths.cost(id) else {
                continue;
            };
            let hops = paths.path_links(id).count().min(usize::from(u8::MAX)) as u8;
            let class = if graph.role(id) == Role::Library {
                SourceClass::Library
            } else if hops <= 1 {
                SourceClass::Rack
            } else {
                SourceClass::OtherRack
            };
            ranks.insert(graph.name(id).to_string(), Rank { cost, hops, class });
            let links = paths
                .path_links(id)
                .map(|l| {
                    let gl = graph.link(l);
                    format!("{}-{}", graph.name(gl.a), graph.name(gl.b))
                })
                .collect();
            link_paths.insert(graph.name(id).to_string(), links);
        }
        Some(SourceRanks {
            node: node.to_string(),
            ranks,
            paths: link_paths,
        })
    }

    /// No topology: every holder ranks alike (ordered by name).
    pub fn unranked(node: &str) -> SourceRanks {
        SourceRanks {
            node: node.to_string(),
            ..SourceRanks::default()
        }
    }

    /// The links between `host` and this appliance (empty when unknown).
    pub fn path_links(&self, host: &str) -> &[String] {
        self.paths.get(host).map_or(&[], Vec::as_slice)
    }

    /// The rank of `host`; a host the topology does not know ranks after every
    /// known one (as another rack at the farthest hop count).
    pub fn rank(&self, host: &str) -> Rank {
        self.ranks.get(host).copied().unwrap_or(Rank {
            cost: f64::INFINITY,
            hops: MAX_HOPS as u8,
            class: SourceClass::OtherRack,
        })
    }

    /// Where to ask for one block, cheapest first (ties by host name): this
    /// appliance itself and holders without a block-service address are left
    /// out, and each address is listed once.
    pub fn order(&self, holders: &[Holder]) -> Vec<Candidate> {
        let mut cands: Vec<(Rank, &str, &str)> = holders
            .iter()
            .filter(|h| *h.location.host != *self.node)
            .filter_map(|h| {
                let addr = h.addr.as_deref()?;
                Some((self.rank(&h.location.host), &*h.location.host, addr))
            })
            .collect();
        cands.sort_by(|a, b| a.0.cost.total_cmp(&b.0.cost).then(a.1.cmp(b.1)));
        let mut seen = std::collections::HashSet::new();
        cands
            .into_iter()
            .filter(|(_, _, addr)| seen.insert(*addr))
            .map(|(rank, host, addr)| Candidate {
                addr: addr.to_string(),
                host: host.to_string(),
                origin: Origin {
                    class: rank.class,
                    hops: rank.hops,
                },
            })
            .collect()
    }
}

/// Block-service addresses to ask, cheapest first, shared by the blocks of a
/// batch that have the same holders.
type Addresses = Arc<[String]>;

/// One holder to ask for a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its block service, `ip:port`.
    pub addr: String,
    pub host: String,
    pub origin: Origin,
}

/// `[splicer]` settings of the fetcher.
#[derive(Clone, Debug)]
pub struct SourcingOptions {
    /// How long a READ waits for its missing blocks before it passes through to
    /// the library.
    pub deadline: Duration,
    /// Hashes per holder lookup (and per fetch round).
    pub batch: usize,
}

impl Default for SourcingOptions {
    fn default() -> Self {
        SourcingOptions {
            deadline: Duration::from_secs(1),
            batch: 1024,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    requested: AtomicU64,
    lookups: AtomicU64,
    lookup_failures: AtomicU64,
    no_holder: AtomicU64,
    fetched_blocks: AtomicU64,
    fetched_bytes: AtomicU64,
    failed: AtomicU64,
    deadline_missed: AtomicU64,
    backed_off: AtomicU64,
}

/// After failed holder lookups, how long not to try another: the first failure
/// waits [`Self::FIRST`], each further one doubles it up to [`Self::MAX`]; a
/// lookup that works resets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookupBackoff {
    /// No lookup before this instant (`None`: lookups allowed).
    pub until: Option<Instant>,
    /// The pause after the next failure.
    pub next: Duration,
}

impl LookupBackoff {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(30);

    /// Whether a lookup may be tried at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        self.until.is_none_or(|t| now >= t)
    }

    /// A lookup failed at `now`.
    pub fn failed(&mut self, now: Instant) {
        let pause = self.next.max(Self::FIRST);
        self.until = Some(now + pause);
        self.next = (pause * 2).min(Self::MAX);
    }

    /// A lookup worked.
    pub fn succeeded(&mut self) {
        *self = LookupBackoff::default();
    }
}

/// The fetcher's counters (`nearblock status`, `/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcingSnapshot {
    /// Blocks asked for (not cached, not already being fetched).
    pub requested: u64,
    /// Holder lookups (batches) and the ones that failed.
    pub lookups: u64,
    pub lookup_failures: u64,
    /// Blocks no reachable holder (other than this appliance) has.
    pub no_holder: u64,
    /// Blocks fetched, verified and cached, and their bytes.
    pub fetched_blocks: u64,
    pub fetched_bytes: u64,
    /// Blocks every holder failed (dead, missing, corrupt).
    pub failed: u64,
    /// Blocks served by peers that did not match their hash.
    pub corrupt: u64,
    /// READs that gave up waiting and passed through to the library.
    pub deadline_missed: u64,
    /// Blocks not fetched because holder lookups were backing off after a
    /// failure (their READs passed through at once).
    #[serde(default)]
    pub backed_off: u64,
}

/// Where the holder ranking comes from (the running appliance: its live link
/// costs over the topology).
pub trait RankFeed: Send + Sync {
    /// Changes whenever the ranks may have (the live costs' recompute count);
    /// `None` while ranks are static.
    fn version(&self) -> Option<u64>;
    /// The ranks as of now; `None` without a topology.
    fn current(&self) -> Option<SourceRanks>;
}

/// Keep `sourcing`'s holder ranking in step with `feed`, checked every second.
pub async fn rerank_loop<F: RankFeed + ?Sized>(sourcing: Arc<Sourcing>, feed: Arc<F>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seen = None;
    loop {
        tick.tick().await;
        let version = feed.version();
        if version == seen {
            continue;
        }
        seen = version;
        if let Some(ranks) = feed.current() {
            sourcing.set_ranks(ranks);
        }
    }
}

/// Fetches missing blocks into the cache (see the module doc).
pub struct Sourcing {
    lookup: Box<dyn HolderLookup>,
    client: Arc<PeerClient>,
    ranks: RwLock<Arc<SourceRanks>>,
    cache: Arc<BlockCache>,
    opts: SourcingOptions,
    /// Blocks being fetched → resolves (`true`) when their fetch ended.
    inflight: Mutex<BlockHashMap<watch::Receiver<bool>>>,
    counters: Counters,
    /// Bytes fetched per holder host since start (for per-link budgets).
    by_host: Mutex<HashMap<String, u64>>,
    backoff: Mutex<LookupBackoff>,
}

impl std::fmt::Debug for Sourcing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sourcing")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Sourcing {
    pub fn new(
        lookup: Box<dyn HolderLookup>,
        client: Arc<PeerClient>,
        ranks: SourceRanks,
        cache: Arc<BlockCache>,
        opts: SourcingOptions,
    ) -> Sourcing {
        Sourcing {
            lookup,
            client,
            ranks: RwLock::new(Arc::new(ranks)),
            cache,
            opts,
            inflight: Mutex::new(BlockHashMap::default()),
            counters: Counters::default(),
            by_host: Mutex::new(HashMap::new()),
            backoff: Mutex::new(LookupBackoff::default()),
        }
    }

    pub fn deadline(&self) -> Duration {
        self.opts.deadline
    }

    /// Re-rank holders (link costs changed).
    pub fn set_ranks(&self, ranks: SourceRanks) {
        *self.ranks.write() = Arc::new(ranks);
    }

    pub fn ranks(&self) -> Arc<SourceRanks> {
        self.ranks.read().clone()
    }

    /// A READ gave up waiting for its blocks.
    pub fn note_deadline_missed(&self) {
        self.counters
            .deadline_missed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Start fetching those of `hashes` that are neither cached nor being fetched
    /// (in the background); the returned future resolves once every one of
    /// `hashes` that was missing has been fetched or given up on. Dropping it does
    /// not stop the fetch. Must be called inside a tokio runtime.
    pub fn fill(self: &Arc<Self>, hashes: &[BlockHash]) -> impl Future<Output = ()> + Send {
        let mut waits: Vec<watch::Receiver<bool>> = Vec::new();
        let lookups_allowed = self.backoff.lock().allows(Instant::now());
        let mut inflight = self.inflight.lock();
        let mut new = Vec::new();
        let mut seen = BlockHashSet::default();
        for h in hashes {
            if self.cache.contains(h) {
                continue;
            }
            match inflight.get(h) {
                Some(r) if !waits.iter().any(|w| w.same_channel(r)) => waits.push(r.clone()),
                None if seen.insert(*h) => new.push(*h),
                Some(_) | None => {}
            }
        }
        if !lookups_allowed {
            // Backing off: what is missing passes through now.
            self.counters
                .backed_off
                .fetch_add(new.len() as u64, Ordering::Relaxed);
            new.clear();
        }
        self.counters
            .requested
            .fetch_add(new.len() as u64, Ordering::Relaxed);
        // One task (and one signal) per batch: a READ waits only for the batch
        // holding its blocks, not for the read-ahead around it.
        for batch in new.chunks(self.opts.batch.max(1)) {
            let (tx, rx) = watch::channel(false);
            for h in batch {
                inflight.insert(*h, rx.clone());
            }
            waits.push(rx.clone());
            tokio::spawn(self.clone().fetch(batch.to_vec(), tx, rx));
        }
        drop(inflight);
        async move {
            for mut w in waits {
                // An error means the fetch task is gone: done either way.
                let _ = w.wait_for(|done| *done).await;
            }
        }
    }

    /// Fetch one batch (none cached or in flight elsewhere), then release it.
    async fn fetch(
        self: Arc<Self>,
        hashes: Vec<BlockHash>,
        done: watch::Sender<bool>,
        ours: watch::Receiver<bool>,
    ) {
        self.fetch_batch(&hashes).await;
        {
            let mut inflight = self.inflight.lock();
            for h in &hashes {
                if inflight.get(h).is_some_and(|r| r.same_channel(&ours)) {
                    inflight.remove(h);
                }
            }
        }
        let _ = done.send(true);
    }

    async fn fetch_batch(&self, hashes: &[BlockHash]) {
        let c = &self.counters;
        c.lookups.fetch_add(1, Ordering::Relaxed);
        // A lookup that takes longer than a READ may wait is of no use to it.
        let lookup = tokio::time::timeout(
            self.opts.deadline.max(Duration::from_secs(2)),
            self.lookup.holders(hashes.to_vec()),
        )
        .await;
        let holders = match lookup {
            Ok(Ok(h)) if h.len() == hashes.len() => h,
            Ok(Ok(_) | Err(_)) | Err(_) => {
                let mut backoff = self.backoff.lock();
                backoff.failed(Instant::now());
                let pause = backoff
                    .until
                    .map(|t| t.saturating_duration_since(Instant::now()));
                drop(backoff);
                if let Ok(Err(e)) = &lookup {
                    tracing::warn!(cause = %e, ?pause, "holder lookup failed; fetching backs off");
                } else {
                    tracing::warn!(
                        ?pause,
                        "holder lookup failed or timed out; fetching backs off"
                    );
                }
                c.lookup_failures.fetch_add(1, Ordering::Relaxed);
                c.failed.fetch_add(hashes.len() as u64, Ordering::Relaxed);
                return;
            }
        };
        self.backoff.lock().succeeded();
        let ranks = self.ranks();
        let mut wants: Vec<(BlockHash, Addresses)> = Vec::with_capacity(hashes.len());
        // Address → who answers there (the same for every block).
        let mut sources: HashMap<Arc<str>, Candidate> = HashMap::new();
        // Consecutive blocks mostly have the same holders (an image's blocks on
        // the same hosts): rank each distinct holder list once.
        let mut last: Option<(&[Holder], Option<Addresses>)> = None;
        for (hash, hs) in hashes.iter().zip(&holders) {
            let addrs = match &last {
                Some((prev, addrs)) if *prev == hs.as_slice() => addrs.clone(),
                _ => {
                    let order = ranks.order(hs);
                    let addrs: Option<Addresses> = (!order.is_empty())
                        .then(|| order.iter().map(|c| c.addr.clone()).collect());
                    for cand in order {
                        if !sources.contains_key(cand.addr.as_str()) {
                            sources.insert(Arc::from(cand.addr.as_str()), cand);
                        }
                    }
                    last = Some((hs.as_slice(), addrs.clone()));
                    addrs
                }
            };
            match addrs {
                Some(addrs) => wants.push((*hash, addrs)),
                None => {
                    c.no_holder.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if wants.is_empty() {
            return;
        }
        let results = self.client.fetch_many(&wants).await;
        // Bytes per source host, added to `by_host` once per batch.
        let mut fetched_from: HashMap<&str, u64> = HashMap::new();
        let (mut blocks, mut bytes) = (0u64, 0u64);
        for ((hash, _), r) in wants.iter().zip(results) {
            match r {
                Ok(f) => {
                    blocks += 1;
                    bytes += f.data.len() as u64;
                    let source = sources.get(&f.from);
                    if let Some(s) = source {
                        *fetched_from.entry(s.host.as_str()).or_default() += f.data.len() as u64;
                    }
                    self.cache
                        .insert_from(*hash, f.data, source.map(|s| s.origin));
                }
                Err(e) => {
                    tracing::debug!(block = %hash, cause = %e, "no holder served the block");
                    c.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        c.fetched_blocks.fetch_add(blocks, Ordering::Relaxed);
        c.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        if !fetched_from.is_empty() {
            let mut by_host = self.by_host.lock();
            for (host, n) in fetched_from {
                match by_host.get_mut(host) {
                    Some(total) => *total += n,
                    None => {
                        by_host.insert(host.to_string(), n);
                    }
                }
            }
        }
    }

    /// Bytes fetched so far per holder host.
    pub fn fetched_by_host(&self) -> HashMap<String, u64> {
        self.by_host.lock().clone()
    }

    pub fn snapshot(&self) -> SourcingSnapshot {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SourcingSnapshot {
            requested: get(&c.requested),
            lookups: get(&c.lookups),
            lookup_failures: get(&c.lookup_failures),
            no_holder: get(&c.no_holder),
            fetched_blocks: get(&c.fetched_blocks),
            fetched_bytes: get(&c.fetched_bytes),
            failed: get(&c.failed),
            corrupt: self.client.metrics().mismatches,
            deadline_missed: get(&c.deadline_missed),
            backed_off: get(&c.backed_off),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Location;

    /// library ─4─ core ─ rack1 ─ hv1, core ─ rack2 ─ hv3.
    fn ranks() -> SourceRanks {
        let mut topo = crate::cost::paths::tests::topo(
            &["library", "core", "rack1", "rack2", "hv1", "hv3"],
            &[
                ("library", "core", 4.0),
                ("core", "rack1", 1.0),
                ("core", "rack2", 1.0),
                ("rack1", "hv1", 1.0),
                ("rack2", "hv3", 1.0),
            ],
        );
        for n in &mut topo.nodes {
            if n.name == "library" {
                n.role = crate::cost::Role::Library;
            }
        }
        SourceRanks::from_graph(&Graph::from_topology(&topo), "rack1").unwrap()
    }

    fn holder(host: &str, addr: Option<&str>) -> Holder {
        Holder {
            location: Location {
                host: host.into(),
                image: "img".into(),
                block_size: 4096,
                offset: 0,
                len: 4096,
            },
            addr: addr.map(str::to_string),
        }
    }

    #[test]
    fn ranks_classify_by_role_and_hops() {
        let r = ranks();
        assert_eq!(
            r.rank("hv1"),
            Rank {
                cost: 1.0,
                hops: 1,
                class: SourceClass::Rack
            }
        );
        assert_eq!(r.rank("rack2").class, SourceClass::OtherRack);
        assert_eq!((r.rank("hv3").cost, r.rank("hv3").hops), (3.0, 3));
        assert_eq!(
            r.rank("library"),
            Rank {
                cost: 5.0,
                hops: 2,
                class: SourceClass::Library
            }
        );
        assert!(r.rank("nowhere").cost.is_infinite());
    }

    #[test]
    fn order_is_by_cost_then_name_without_self_or_addressless_holders() {
        let r = ranks();
        let order = r.order(&[
            holder("library", Some("10.0.0.1:1")),
            holder("rack1", Some("10.0.0.9:1")),
            holder("hv3", Some("10.0.0.3:1")),
            holder("unknown", Some("10.0.0.7:1")),
            holder("rack2", Some("10.0.0.2:1")),
            holder("hv1", None),
            // The same service listed for two of its images: asked once.
            holder("rack2", Some("10.0.0.2:1")),
        ]);
        let addrs: Vec<&str> = order.iter().map(|c| c.addr.as_str()).collect();
        assert_eq!(
            addrs,
            ["10.0.0.2:1", "10.0.0.3:1", "10.0.0.1:1", "10.0.0.7:1"]
        );
        assert_eq!(order[2].host, "library");
        assert_eq!(
            order[2].origin,
            Origin {
                class: SourceClass::Library,
                hops: 2
            }
        );
    }

    #[test]
    fn lookup_backoff_doubles_to_the_cap_and_resets() {
        let t0 = Instant::now();
        let mut b = LookupBackoff::default();
        assert!(b.allows(t0));
        b.failed(t0);
        assert!(!b.allows(t0 + Duration::from_millis(999)));
        assert!(b.allows(t0 + LookupBackoff::FIRST));
        let mut pauses = Vec::new();
        for _ in 0..8 {
            b.failed(t0);
            pauses.push(b.until.unwrap() - t0);
        }
        assert_eq!(pauses[0], Duration::from_secs(2));
        assert_eq!(pauses[3], Duration::from_secs(16));
        assert!(pauses[4..].iter().all(|&p| p == LookupBackoff::MAX));
        b.succeeded();
        assert!(b.allows(t0));
        b.failed(t0);
        assert_eq!(b.until.unwrap() - t0, LookupBackoff::FIRST);
    }

    /// A lookup that answers from a fixed table (a unit test may fake a peer).
    struct Table(HashMap<BlockHash, Vec<Holder>>);
    impl HolderLookup for Table {
        fn holders(&self, hashes: Vec<BlockHash>) -> HolderFuture {
            let out = hashes
                .iter()
                .map(|h| self.0.get(h).cloned().unwrap_or_default())
                .collect();
            Box::pin(async move { Ok(out) })
        }
    }

    /// A lookup that always fails (the parent index unreachable).
    struct Down(Arc<AtomicU64>);
    impl HolderLookup for Down {
        fn holders(&self, _: Vec<BlockHash>) -> HolderFuture {
            self.0.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Err("parent unreachable".to_string()) })
        }
    }

    fn test_client() -> Arc<PeerClient> {
        Arc::new(PeerClient::new(crate::peer::client::ClientOptions::new(
            "rack1",
            crate::peer::proto::Role::Client,
            crate::peer::identity::testing::creds("rack1", crate::peer::proto::Role::Client, &[]),
        )))
    }

    #[tokio::test]
    async fn a_failed_lookup_backs_off_further_fetches() {
        let calls = Arc::new(AtomicU64::new(0));
        let s = Arc::new(Sourcing::new(
            Box::new(Down(calls.clone())),
            test_client(),
            ranks(),
            Arc::new(BlockCache::new(1 << 20)),
            SourcingOptions::default(),
        ));
        let (a, b) = (BlockHash::of(b"a"), BlockHash::of(b"b"));
        tokio::time::timeout(Duration::from_secs(5), s.fill(&[a]))
            .await
            .unwrap();
        // Within the back-off: no lookup, and the fill resolves at once.
        tokio::time::timeout(Duration::from_millis(100), s.fill(&[b]))
            .await
            .unwrap();
        let snap = s.snapshot();
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(
            (snap.lookup_failures, snap.backed_off, snap.requested),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn blocks_nobody_holds_are_given_up_and_released() {
        let cache = Arc::new(BlockCache::new(1 << 20));
        let s = Arc::new(Sourcing::new(
            Box::new(Table(HashMap::new())),
            test_client(),
            ranks(),
            cache.clone(),
            SourcingOptions::default(),
        ));
        let h = BlockHash::of(b"x");
        tokio::time::timeout(Duration::from_secs(5), s.fill(&[h, h]))
            .await
            .unwrap();
        let snap = s.snapshot();
        assert_eq!((snap.requested, snap.no_holder), (1, 1));
        assert!(s.inflight.lock().is_empty());
        assert!(!cache.contains(&h));
    }
}
