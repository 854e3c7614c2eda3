//! `nearblock run`: builds each stage from the config, wires them together in
//! data-path order, serves the API, and on shutdown drains before getting out of
//! the way. Only wiring lives here: each background loop lives with the module
//! that owns its data, and is spawned from [`spawn_background`].
//!
//! Start: load programs → policy routing → listeners (accepting) → SockMap →
//! steering + classifier attached → index, indexer, sourcing → background loops
//! (discovery, link sampling, peer polling, …) → API.
//! Clean stop: listeners leave the SockMap (new connections now go straight to the
//! library) → accept loops stop → existing flows drain (bounded) → loops stop →
//! programs detach → policy routing removed. SIGKILL skips all that: the TC/XDP
//! links are this process's file descriptors, so steering vanishes with it
//! (fail-open).

use std::{
    future::Future,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use nearblock_common::maps::{LISTENER_V4, LISTENER_V6, ROLE_CLIENT_FACING, ROLE_UPSTREAM_FACING};
use parking_lot::Mutex;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    classify::{self, DiscoveryTable},
    config::{Config, IndexConfig, SteerPortals},
    cost::{feed, Graph, LiveCosts, Topology},
    datapath::{self, Datapath, LoadOptions},
    fetch::{BlockCache, Sourcing, SourcingOptions},
    index::{RedbStore, StoreOptions},
    peer::{
        cache_holder, client::PeerClient, config::IndexerConfig, indexer::SharedStore, proto::Role,
        server::BlockSource, IndexerHandle,
    },
    splice::{
        catalog::Catalog,
        manifests,
        relay::{self, UpstreamOptions},
        stats::SplicerStats,
    },
    state::{Appliance, Planner},
    steer::{self, PolicyRouting},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Datapath(#[from] datapath::DatapathError),
    #[error(transparent)]
    Steer(#[from] steer::SteerError),
    #[error("[cost] topology: {0}")]
    Topology(#[from] crate::cost::TopologyError),
    #[error("[cost]: {0}")]
    LiveCost(#[from] crate::cost::LiveCostError),
    #[error("[cost]: appliance `{0}` is not a node of the topology")]
    NotInTopology(String),
    #[error("[planner]: {0}")]
    Planner(String),
    #[error("[index]: {0}")]
    Index(#[from] crate::index::IndexError),
    #[error("[indexer]: {0}")]
    Indexer(String),
    #[error("[manager]: {0}")]
    Manager(String),
    #[error(transparent)]
    Catalog(#[from] crate::splice::catalog::CatalogError),
    #[error("API listen on {addr}: {source}")]
    Api {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("[api]: {0}")]
    ApiTokens(#[from] crate::api::auth::TokenError),
}

/// What the appliance keeps of the block index, by config.
enum IndexRole {
    /// Neither `[index]` nor `[indexer]`: served LUNs' manifests come from files.
    None,
    /// `[index]`: a local store the splicer and the planner read.
    Local(Arc<RedbStore>),
    /// `[indexer]`: the store is also served to the rack's peers, the block cache
    /// is published in it as a holder, and missing blocks are fetched from the
    /// holders it knows.
    Indexer {
        config: Box<IndexerConfig>,
        store: Arc<RedbStore>,
    },
}

impl IndexRole {
    fn from_config(config: &Config) -> Result<Self, DaemonError> {
        let Some(embedded) = &config.indexer else {
            let Some(index) = &config.index else {
                return Ok(Self::None);
            };
            let options = StoreOptions {
                max_image_blocks: index.max_image_blocks(),
                ..StoreOptions::default()
            };
            return Ok(Self::Local(Arc::new(RedbStore::open(&index.db, options)?)));
        };
        let indexer = IndexerConfig::load(&embedded.config)
            .map_err(|e| DaemonError::Indexer(e.to_string()))?;
        if let Some(index) = &config.index {
            check_one_store(index, &indexer)?;
        }
        let store = crate::peer::open_indexer_store(&indexer)
            .map_err(|e| DaemonError::Indexer(format!("{e:#}")))?;
        Ok(Self::Indexer {
            config: Box::new(indexer),
            store,
        })
    }

    fn store(&self) -> Option<&Arc<RedbStore>> {
        match self {
            Self::None => None,
            Self::Local(store) | Self::Indexer { store, .. } => Some(store),
        }
    }

    fn indexer_config(&self) -> Option<&IndexerConfig> {
        match self {
            Self::Indexer { config, .. } => Some(config),
            Self::None | Self::Local(_) => None,
        }
    }

    /// Where served LUNs' manifests are looked up besides their files; the
    /// parent only once `with_parent` (its answers come with the refresh loop).
    fn manifest_sources(&self, with_parent: bool) -> manifests::Sources {
        let parent = self
            .indexer_config()
            .filter(|_| with_parent)
            .and_then(|ic| ic.parent.map(|p| indexer_client(ic).peer(&p.to_string())));
        manifests::Sources {
            store: self.store().map(|s| s.clone() as SharedStore),
            parent,
        }
    }
}

/// `[index]` beside `[indexer]` names the one store the indexer opens: refuse a
/// config where the two disagree (pure).
fn check_one_store(index: &IndexConfig, indexer: &IndexerConfig) -> Result<(), DaemonError> {
    if index.db != indexer.db {
        return Err(DaemonError::Indexer(format!(
            "[index] db {} differs from the indexer's db {}: they are one store",
            index.db.display(),
            indexer.db.display()
        )));
    }
    if index
        .max_image_blocks
        .is_some_and(|m| m != indexer.max_image_blocks)
    {
        return Err(DaemonError::Indexer(format!(
            "[index] max_image_blocks {} differs from the indexer's {}: set it in the indexer's config",
            index.max_image_blocks(),
            indexer.max_image_blocks
        )));
    }
    Ok(())
}

/// The peer client the daemon asks with, under its embedded indexer's identity
/// (one key per node, listed once in the peers file).
fn indexer_client(ic: &IndexerConfig) -> PeerClient {
    PeerClient::new(ic.peer.client(&ic.node, Role::Indexer, ic.credentials()))
}

/// The manager over the embedded (global) indexer, when `[manager]` is set.
fn start_manager(
    app: &Appliance,
    index: &IndexRole,
    indexer: Option<&IndexerHandle>,
) -> Result<Option<Arc<crate::manage::Manager>>, DaemonError> {
    let Some(mc) = &app.config.manager else {
        return Ok(None);
    };
    let (Some(ic), Some(store), Some(ix)) = (index.indexer_config(), index.store(), indexer) else {
        return Err(DaemonError::Manager("[manager] needs [indexer]".into()));
    };
    let options = crate::manage::ManagerOptions {
        stale_after: Duration::from_secs(mc.stale_secs),
        index_wait: Duration::from_secs(mc.index_wait_secs),
        library_portal: mc.library_portal,
        history_dir: mc.history_dir.clone(),
        migrate_final_bytes: mc.migrate_final_mib << 20,
        migrate_max_rounds: mc.migrate_max_rounds,
        retire_grace: Duration::from_secs(mc.retire_grace_secs),
        prestage_refresh: Duration::from_secs(mc.prestage_refresh_secs.max(1)),
        prestage_when_load_above: mc.prestage_when_load_above,
        prestage_after: Duration::from_secs(mc.prestage_after_secs),
        ..crate::manage::ManagerOptions::default()
    };
    let manager = crate::manage::Manager::open(
        &mc.db,
        ix.service.clone(),
        store.clone(),
        Arc::new(indexer_client(ic)),
        options,
    )
    .map_err(|e| DaemonError::Manager(e.to_string()))?;
    info!(db = %mc.db.display(), "manager running");
    Ok(Some(manager))
}

/// Every spliced connection holds two descriptors: take all the hard limit allows.
fn raise_file_limit() -> u64 {
    match steer::raise_fd_limit() {
        Ok(n) => {
            info!(nofile = n, "file descriptor limit");
            n
        }
        Err(e) => {
            warn!(cause = %e, "raising the file descriptor limit");
            1024
        }
    }
}

fn policy_routing(config: &Config) -> PolicyRouting {
    let dpc = &config.datapath;
    PolicyRouting {
        mark: dpc.steer_mark,
        table: dpc.route_table,
        priority: dpc.rule_priority,
        interfaces: dpc
            .client_facing
            .iter()
            .chain(&dpc.upstream_facing)
            .cloned()
            .collect(),
    }
}

/// The steering role (`[datapath] steer`): listeners in the SockMap, their
/// accept loops, and the served LUNs.
struct Splicing {
    routing: PolicyRouting,
    catalog: Arc<Catalog>,
    listener_slots: Vec<u32>,
    accept_tasks: Vec<JoinHandle<()>>,
    stop_accepting: watch::Sender<bool>,
}

impl Splicing {
    /// Install policy routing, load the served LUNs, open the transparent
    /// listeners and start accepting, then attach steering.
    async fn start(
        config: &Config,
        dp: &mut Datapath,
        index: &IndexRole,
        splicer: &Arc<SplicerStats>,
        nofile: u64,
    ) -> Result<Self, DaemonError> {
        let routing = policy_routing(config);
        routing.install()?;
        // The topology's budget on this appliance's uplink supersedes
        // `splicer.prefetch_budget_mbps` (the default for links without one).
        let budget = config
            .cost
            .as_ref()
            .and_then(|c| Topology::load(&c.topology).ok())
            .and_then(|t| t.uplink_budget_mbps(&config.appliance.name));
        if let Some(budget) = budget {
            info!(budget_mbps = budget, "prefetch paced to the uplink's budget");
        }
        let catalog = config.splicer.catalog(budget)?;
        let catalog = Arc::new(catalog);
        // Files and the local index now (quick); the parent's answers come with
        // the refresh loop's first tick. A LUN without a manifest is declared but
        // passed through.
        manifests::refresh_some(&catalog, &index.manifest_sources(false), &mut 0, usize::MAX).await;
        let _ = splicer.cache.set(catalog.core.cache.clone());
        let _ = splicer.catalog.set(catalog.clone());
        let handoff = if config.splicer.kernel_handoff {
            Some(Arc::new(dp.take_handoff_map()?))
        } else {
            None
        };
        if let Some(map) = &handoff {
            let _ = splicer.handoffs.set(map.clone());
        }
        let http = http_front(config, &catalog, index, splicer);
        let upstream = upstream_options(config, catalog.clone(), handoff.clone(), http);
        let caps = steer::ConnectionCaps::within_fd_limit(
            config.splicer.max_connections,
            config.splicer.max_connections_per_source,
            nofile,
        );
        info!(
            total = caps.total,
            per_source = caps.per_source,
            "connection caps"
        );
        let fail_open = steer::FailOpen::new(dp.take_fail_open_maps()?, caps);
        let (stop_accepting, stop_rx) = watch::channel(false);
        let mut listener_slots = Vec::new();
        let mut accept_tasks = Vec::new();
        for (slot, addr) in [
            (LISTENER_V4, config.splicer.listen_v4),
            (LISTENER_V6, config.splicer.listen_v6),
        ] {
            let std_listener = match steer::transparent_listener(addr) {
                Ok(l) => l,
                Err(e) if addr.is_ipv6() => {
                    warn!(cause = %e, "no IPv6 listener; IPv6 connections are forwarded untouched");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            dp.register_listener(slot, &std_listener)?;
            listener_slots.push(slot);
            let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|source| {
                steer::SteerError::Socket {
                    what: format!("register {addr} with tokio"),
                    source,
                }
            })?;
            accept_tasks.push(tokio::spawn(relay::accept_loop(
                listener,
                upstream.clone(),
                splicer.clone(),
                stop_rx.clone(),
                relay::Listening {
                    slot,
                    fail_open: fail_open.clone(),
                },
            )));
        }
        if let Some(map) = handoff {
            accept_tasks.push(tokio::spawn(crate::splice::handoff::sweep(
                map,
                stop_rx.clone(),
            )));
        }
        for iface in &config.datapath.client_facing {
            dp.attach_steering(iface, ROLE_CLIENT_FACING)?;
        }
        for iface in &config.datapath.upstream_facing {
            dp.attach_steering(iface, ROLE_UPSTREAM_FACING)?;
        }
        Ok(Self {
            routing,
            catalog,
            listener_slots,
            accept_tasks,
            stop_accepting,
        })
    }

    /// Take the listeners out of the SockMap (new connections now bypass the
    /// splicer) and stop their accept loops.
    async fn stop_accepting(&mut self, app: &Appliance) {
        {
            let mut dp = app.datapath.lock();
            for slot in &self.listener_slots {
                if let Err(e) = dp.unregister_listener(*slot) {
                    warn!(cause = %e, "removing listener from the SockMap");
                }
            }
        }
        let _ = self.stop_accepting.send(true);
        for task in self.accept_tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// The HTTP front end, when `[splicer.http]` is configured.
fn http_front(
    config: &Config,
    catalog: &Arc<Catalog>,
    index: &IndexRole,
    splicer: &Arc<SplicerStats>,
) -> Option<Arc<crate::splice::http::HttpContext>> {
    let h = config.splicer.http.as_ref()?;
    let authority = h
        .authority
        .clone()
        .or_else(|| config.splicer.authority.clone())
        .unwrap_or_default();
    info!(ports = ?h.ports, %authority, mode = ?h.mode, "HTTP front end");
    let mut images = crate::splice::http::images::HttpImages::new(authority, index.manifest_sources(true));
    images.history_dir.clone_from(&config.splicer.history_dir);
    images.prefetch = h.mode == crate::splice::catalog::FetchMode::Prefetch;
    let images = Arc::new(images);
    let _ = splicer.http_images.set(images.clone());
    Some(Arc::new(crate::splice::http::HttpContext {
        ports: h.ports.clone(),
        core: catalog.core.clone(),
        images,
        stats: splicer.clone(),
    }))
}

fn upstream_options(
    config: &Config,
    catalog: Arc<Catalog>,
    handoff: Option<Arc<crate::datapath::HandoffMap>>,
    http: Option<Arc<crate::splice::http::HttpContext>>,
) -> UpstreamOptions {
    UpstreamOptions {
        dscp: config.datapath.dscp_mark,
        connect_timeout: config.splicer.connect_timeout(),
        iscsi_ports: if config.splicer.iscsi_aware {
            config.splicer.iscsi_ports.clone()
        } else {
            Vec::new()
        },
        catalog,
        keepalive: steer::Keepalive::from(&config.splicer),
        handoff,
        http,
    }
}

/// Live link costs over the topology, when `[cost]` is configured.
fn live_costs(config: &Config) -> Result<Option<Mutex<LiveCosts>>, DaemonError> {
    let Some(cost) = &config.cost else {
        return Ok(None);
    };
    let topology = Topology::load(&cost.topology)?;
    if topology.node(&config.appliance.name).is_none() {
        return Err(DaemonError::NotInTopology(config.appliance.name.clone()));
    }
    let live = LiveCosts::new(Graph::from_topology(&topology), cost.live)?;
    Ok(Some(Mutex::new(live)))
}

/// The planner behind `/plan/*`: needs `[planner]`, `[cost]` and an index store.
fn planner(config: &Config, index: &IndexRole) -> Result<Option<Planner>, DaemonError> {
    let Some(planner) = &config.planner else {
        return Ok(None);
    };
    let Some(cost) = &config.cost else {
        return Ok(None);
    };
    let Some(store) = index.store() else {
        return Ok(None);
    };
    let metrics = match &planner.metrics {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| {
                DaemonError::Planner(format!("metrics {}: {e}", path.display()))
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
            crate::plan::MetricsFile::parse(&text).map_err(|e| bad(&e))?
        }
        None => crate::plan::MetricsFile::default(),
    };
    Ok(Some(Planner {
        store: store.clone(),
        topology: Topology::load(&cost.topology)?,
        metrics,
        reported: std::sync::OnceLock::default(),
        stale_after: Duration::from_secs(planner.metrics_stale_secs),
    }))
}

/// Start the embedded indexer on the shared store, serving the block cache's
/// blocks besides the index, and following `[splicer] managers`' pre-staging
/// orders into the cache.
async fn start_indexer(
    app: &Arc<Appliance>,
    index: &IndexRole,
    cache: Option<&Arc<BlockCache>>,
) -> Result<Option<IndexerHandle>, DaemonError> {
    let IndexRole::Indexer { config, store } = index else {
        return Ok(None);
    };
    let blocks = cache.map(|c| c.clone() as Arc<dyn BlockSource>);
    let managers = &app.config.splicer.managers;
    let builds = cache.filter(|_| !managers.is_empty()).map(|cache| {
        let prefetch_pace: crate::peer::builder::PrefetchPaceOf = {
            let splicer = app.splicer.clone();
            Arc::new(move || splicer.catalog.get().map(|c| c.core.prefetch_pace.clone()))
        };
        let client = Arc::new(indexer_client(config));
        let parent = config.parent.map(|p| client.peer(&p.to_string()));
        // Sourcing starts after the indexer (it asks the indexer's service):
        // staged blocks are ranked through it once it is there.
        let splicer = app.splicer.clone();
        let origin_of: crate::peer::builder::OriginOf = Arc::new(move |node: &str| {
            splicer.sourcing.get().map(|s| {
                let rank = s.ranks().rank(node);
                crate::fetch::Origin {
                    class: rank.class,
                    hops: rank.hops,
                }
            })
        });
        Arc::new(crate::peer::builder::Builder::new(
            &config.node,
            crate::peer::builder::BuildTarget::Cache {
                cache: cache.clone(),
                origin_of,
                prefetch_pace,
            },
            client,
            parent,
            managers.clone(),
            Arc::new(tokio::sync::Notify::new()),
        ))
    });
    let handle = crate::peer::start_indexer_on(config, store.clone(), blocks, builds)
        .await
        .map_err(|e| DaemonError::Indexer(format!("{e:#}")))?;
    Ok(Some(handle))
}

/// Blocks the cache lacks come from the holders the embedded indexer knows
/// (`[splicer] fetch_from_peers`, with an indexer and served LUNs).
fn start_sourcing(
    app: &Appliance,
    index: &IndexRole,
    indexer: &IndexerHandle,
    catalog: &Catalog,
) -> Option<Arc<Sourcing>> {
    let config = &app.config;
    let ic = index.indexer_config()?;
    if !config.splicer.fetch_from_peers {
        return None;
    }
    let ranks = app
        .source_ranks()
        .unwrap_or_else(|| crate::fetch::SourceRanks::unranked(&config.appliance.name));
    let sourcing = Arc::new(Sourcing::new(
        Box::new(indexer.service.clone()),
        Arc::new(indexer_client(ic)),
        ranks,
        catalog.core.cache.clone(),
        SourcingOptions {
            deadline: config.splicer.fetch_deadline(),
            batch: config.splicer.fetch_batch_blocks.max(1),
        },
    ));
    catalog.core.set_sourcing(sourcing.clone());
    let _ = app.splicer.sourcing.set(sourcing.clone());
    Some(sourcing)
}

/// The background loops, each owned by the module whose data it keeps current;
/// aborted (and awaited, so their descriptors are closed) at shutdown.
#[derive(Default)]
struct Background {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Background {
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push((name, tokio::spawn(task)));
    }

    async fn stop(self) {
        for (_, task) in &self.tasks {
            task.abort();
        }
        for (name, task) in self.tasks {
            if let Err(e) = task.await {
                if !e.is_cancelled() {
                    warn!(task = name, cause = %e, "background task failed");
                }
            }
        }
    }
}

/// What the background loops start from, besides the appliance.
struct LoopInputs {
    login_events: aya::maps::RingBuf<aya::maps::MapData>,
    kernel_log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    sourcing: Option<Arc<Sourcing>>,
    /// The block cache, when the embedded indexer makes it a holder.
    published_cache: Option<Arc<BlockCache>>,
}

fn spawn_background(
    app: &Arc<Appliance>,
    index: &IndexRole,
    splicing: Option<&Splicing>,
    inputs: LoopInputs,
) -> Background {
    let config = &app.config;
    let mut loops = Background::default();
    if let Some(logger) = inputs.kernel_log {
        loops.spawn("kernel log", datapath::kernel_log_loop(logger));
    }
    loops.spawn(
        "discovery",
        classify::discovery_loop(app.discovery.clone(), inputs.login_events, {
            let app = app.clone();
            move |seen| app.learn_served_portal(seen)
        }),
    );
    let capacity = config
        .datapath
        .link_capacity_mbps
        .iter()
        .filter_map(|(iface, c)| datapath::if_index(iface).ok().map(|i| (i, *c)))
        .collect();
    loops.spawn(
        "link sampler",
        classify::sample_links_loop(
            app.clone(),
            capacity,
            Duration::from_millis(config.datapath.sample_interval_ms),
        ),
    );
    if let Some(sourcing) = inputs.sourcing {
        loops.spawn("rerank", crate::fetch::rerank_loop(sourcing, app.clone()));
    }
    // Served LUNs' manifests stay current: files, the local index, the parent.
    if let Some(splicing) = splicing.filter(|s| !s.catalog.is_empty()) {
        loops.spawn(
            "manifest refresh",
            manifests::refresh_loop(
                splicing.catalog.clone(),
                index.manifest_sources(true),
                config.splicer.manifest_refresh(),
            ),
        );
    }
    // The appliance's own block cache is a holder in its local index.
    if let Some((store, cache)) = index.store().zip(inputs.published_cache) {
        loops.spawn(
            "cache publisher",
            cache_holder::publish_cache_loop(config.appliance.name.clone(), store.clone(), cache),
        );
    }
    if let Some(cost) = config.cost.as_ref().filter(|c| !c.peers.is_empty()) {
        if let Some(token_file) = cost.peer_token_file.clone() {
            // Built once: its agent keeps connections to the peers across polls.
            let client = feed::LinksClient::new(token_file, PEER_POLL_TIMEOUT);
            let app = app.clone();
            loops.spawn(
                "peer links poll",
                feed::poll_peers_loop(
                    client,
                    cost.peers.clone(),
                    Duration::from_millis(cost.poll_interval_ms),
                    move |reports| app.apply_link_reports(reports),
                ),
            );
        }
    }
    loops
}

/// The manager's watches over the running appliance: hosts' load (pre-staging)
/// and the console's network view (the appliances polled with the token the
/// cost feed presents to them).
fn spawn_manager_watches(app: &Arc<Appliance>, manager: &Arc<crate::manage::Manager>) {
    if manager.watches_load() {
        let view: Arc<dyn crate::manage::PlanningView> = app.clone();
        tokio::spawn(crate::manage::prestage::watch_load(Arc::downgrade(manager), view));
    }
    let (client, peers) = app.config.cost.as_ref().map_or((None, Vec::new()), |c| {
        (
            c.peer_token_file
                .clone()
                .map(|t| feed::LinksClient::new(t, PEER_POLL_TIMEOUT)),
            c.peers.clone(),
        )
    });
    let view: Arc<dyn crate::manage::PlanningView> = app.clone();
    tokio::spawn(crate::manage::network::watch(
        Arc::downgrade(manager),
        view,
        client,
        peers,
    ));
}

/// How long one peer's `/links` may take.
const PEER_POLL_TIMEOUT: Duration = Duration::from_secs(2);

async fn serve_api(app: &Arc<Appliance>) -> Result<JoinHandle<()>, DaemonError> {
    let listen = app.config.api.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| DaemonError::Api {
            addr: listen,
            source,
        })?;
    let auth = Arc::new(app.config.api.auth()?);
    Ok(tokio::spawn(crate::api::serve(listener, app.clone(), auth)))
}

/// Let the spliced flows finish, up to `timeout`; returns how many were left.
/// Sessions handed to the kernel count as long as neither side has closed:
/// they need the steering program, which goes with the daemon.
async fn drain_flows(splicer: &SplicerStats, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    let left = || {
        let handed_off = splicer.handoffs.get().map_or(0, |m| m.open_connections());
        splicer.active.load(Ordering::Relaxed) + handed_off
    };
    while left() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    left()
}

/// Run the appliance until `shutdown` resolves, then drain and clean up.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    // Build each stage from the config, in data-path order.
    let nofile = raise_file_limit();
    let index = IndexRole::from_config(&config)?;
    let mut dp = Datapath::load(&LoadOptions {
        classified_ports: config.classified_ports(),
        dscp_mark: config.datapath.dscp_mark,
        steer_mark: config.datapath.steer_mark,
        steer_served_only: config.datapath.steer_portals == SteerPortals::Served,
    })?;
    let http_origins = config.splicer.http.iter().flat_map(|h| h.origins.iter());
    for &portal in config.datapath.served_portals.iter().chain(http_origins) {
        dp.serve_portal(portal)?;
    }
    let login_events = dp.take_login_events()?;
    let kernel_log = dp.take_logger();
    let splicer = Arc::new(SplicerStats::default());
    let mut splicing = if config.datapath.steer {
        Some(Splicing::start(&config, &mut dp, &index, &splicer, nofile).await?)
    } else {
        None
    };
    for iface in &config.datapath.interfaces {
        dp.attach_classifier(
            iface,
            config.datapath.classifier_of(iface),
            config.datapath.xdp_mode,
        )?;
    }
    let app = Arc::new(Appliance {
        live_costs: live_costs(&config)?,
        planner: planner(&config, &index)?,
        config,
        datapath: Mutex::new(dp),
        discovery: Arc::new(Mutex::new(DiscoveryTable::default())),
        rates: Mutex::default(),
        splicer: splicer.clone(),
        catalog: splicing.as_ref().map(|s| s.catalog.clone()),
        manager: std::sync::OnceLock::new(),
        started: Instant::now(),
    });
    let cache = splicer.cache.get().cloned();
    let indexer = start_indexer(&app, &index, cache.as_ref()).await?;
    let sourcing = indexer
        .as_ref()
        .zip(splicing.as_ref())
        .and_then(|(ix, s)| start_sourcing(&app, &index, ix, &s.catalog));
    // The planner reads the agents' host metrics from the embedded indexer.
    if let Some(planner) = &app.planner {
        if let Some(ix) = &indexer {
            let _ = planner.reported.set(ix.service.hosts.clone());
        }
    }
    if let Some(manager) = start_manager(&app, &index, indexer.as_ref())? {
        spawn_manager_watches(&app, &manager);
        let _ = app.manager.set(manager);
    }

    // Spawn the loops and the API.
    let inputs = LoopInputs {
        login_events,
        kernel_log,
        sourcing,
        published_cache: cache.filter(|_| indexer.is_some()),
    };
    let background = spawn_background(&app, &index, splicing.as_ref(), inputs);
    let api = serve_api(&app).await?;
    if let Some(period) = crate::service::watchdog() {
        if splicing.is_none() {
            tokio::spawn(crate::service::watchdog_loop(period));
        }
    }
    crate::service::ready();
    info!(
        appliance = %app.config.appliance.name,
        steering = app.config.datapath.steer,
        interfaces = ?app.config.datapath.interfaces,
        api = %app.config.api.listen,
        "nearblock running"
    );

    // Wait, then stop in the reverse order.
    shutdown.await;
    info!("shutting down: new connections now bypass the splicer");
    if let Some(s) = &mut splicing {
        s.stop_accepting(&app).await;
    }
    // Existing flows keep their steering (their sockets own their tuples, or
    // their entries in HANDOFFS) while they drain.
    let left = drain_flows(&splicer, app.config.splicer.drain_timeout()).await;
    if left > 0 {
        warn!(flows = left, "drain timeout: closing remaining flows");
    }
    api.abort();
    background.stop().await;
    drop(indexer);
    // Last reference: detaches every program.
    drop(app);
    if let Some(s) = splicing {
        s.routing.remove_quietly();
    }
    info!("stopped");
    Ok(())
}
