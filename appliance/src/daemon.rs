//! `nearblock run`: wires the stages together in data-path order, serves the API,
//! and on shutdown drains before getting out of the way.
//!
//! Start: load programs → policy routing → listeners (accepting) → SockMap →
//! steering + classifier attached → discovery → API.
//! Clean stop: listeners leave the SockMap (new connections now go straight to the
//! library) → accept loops stop → existing flows drain (bounded) → programs
//! detach → policy routing removed. SIGKILL skips all that: the TC/XDP links are
//! this process's file descriptors, so steering vanishes with it (fail-open).

use std::{
    future::Future,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use nearblock_common::maps::{LISTENER_V4, LISTENER_V6, ROLE_CLIENT_FACING, ROLE_UPSTREAM_FACING};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{info, warn};

use crate::{
    classify::{self, DiscoveryTable},
    config::Config,
    cost::{feed, Graph, LiveCosts, Topology},
    datapath::{self, Datapath, LoadOptions},
    splice::{
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

/// Run the appliance until `shutdown` resolves, then drain and clean up.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let dpc = &config.datapath;
    // Every spliced connection holds two descriptors: take all the hard limit allows.
    let nofile = match steer::raise_fd_limit() {
        Ok(n) => {
            info!(nofile = n, "file descriptor limit");
            n
        }
        Err(e) => {
            warn!(cause = %e, "raising the file descriptor limit");
            1024
        }
    };
    // The appliance's index store, shared by the splicer (manifests of served
    // LUNs) and the planner (holders).
    let indexer_config = match &config.indexer {
        Some(e) => Some(
            crate::peer::config::IndexerConfig::load(&e.config)
                .map_err(|e| DaemonError::Indexer(e.to_string()))?,
        ),
        None => None,
    };
    let index_store = match (&indexer_config, &config.index) {
        (Some(ic), index) => {
            if let Some(i) = index {
                if i.db != ic.db {
                    return Err(DaemonError::Indexer(format!(
                        "[index] db {} differs from the indexer's db {}: they are one store",
                        i.db.display(),
                        ic.db.display()
                    )));
                }
                if i.max_image_blocks.is_some_and(|m| m != ic.max_image_blocks) {
                    return Err(DaemonError::Indexer(format!(
                        "[index] max_image_blocks {} differs from the indexer's {}: set it in the indexer's config",
                        i.max_image_blocks(),
                        ic.max_image_blocks
                    )));
                }
            }
            Some(
                crate::peer::open_indexer_store(ic)
                    .map_err(|e| DaemonError::Indexer(format!("{e:#}")))?,
            )
        }
        (None, Some(i)) => Some(Arc::new(crate::index::RedbStore::open(
            &i.db,
            crate::index::StoreOptions {
                max_image_blocks: i.max_image_blocks(),
                ..crate::index::StoreOptions::default()
            },
        )?)),
        (None, None) => None,
    };
    let mut dp = Datapath::load(&LoadOptions {
        classified_ports: config.classified_ports(),
        dscp_mark: dpc.dscp_mark,
        steer_mark: dpc.steer_mark,
    })?;
    let ring = dp.take_login_events()?;
    let kernel_log = dp.take_logger().map(|l| tokio::spawn(kernel_log_loop(l)));

    let routing = PolicyRouting {
        mark: dpc.steer_mark,
        table: dpc.route_table,
        priority: dpc.rule_priority,
        interfaces: dpc
            .client_facing
            .iter()
            .chain(&dpc.upstream_facing)
            .cloned()
            .collect(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let splicer = Arc::new(SplicerStats::default());
    let mut accept_tasks = Vec::new();
    let mut listener_slots = Vec::new();
    let mut served_catalog = None;

    if dpc.steer {
        routing.install()?;
        let catalog = Arc::new(config.splicer.catalog()?);
        // Files and the local index now (quick); the parent's answers come
        // with the refresh loop's first tick. A LUN without a manifest is
        // declared but passed through.
        let local = crate::splice::manifests::Sources {
            store: index_store
                .clone()
                .map(|s| s as crate::peer::indexer::SharedStore),
            parent: None,
        };
        crate::splice::manifests::refresh_some(&catalog, &local, &mut 0, usize::MAX).await;
        let _ = splicer.cache.set(catalog.cache.clone());
        served_catalog = Some(catalog.clone());
        let _ = splicer.catalog.set(catalog.clone());
        let upstream = UpstreamOptions {
            dscp: dpc.dscp_mark,
            connect_timeout: config.splicer.connect_timeout(),
            iscsi_ports: if config.splicer.iscsi_aware {
                config.splicer.iscsi_ports.clone()
            } else {
                Vec::new()
            },
            catalog,
            keepalive: steer::Keepalive::from(&config.splicer),
        };
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
        for iface in &dpc.client_facing {
            dp.attach_steering(iface, ROLE_CLIENT_FACING)?;
        }
        for iface in &dpc.upstream_facing {
            dp.attach_steering(iface, ROLE_UPSTREAM_FACING)?;
        }
    }
    for iface in &dpc.interfaces {
        dp.attach_classifier(iface, dpc.xdp_mode)?;
    }

    let live_costs = match &config.cost {
        Some(c) => {
            let topo = Topology::load(&c.topology)?;
            if topo.node(&config.appliance.name).is_none() {
                return Err(DaemonError::NotInTopology(config.appliance.name.clone()));
            }
            Some(Mutex::new(LiveCosts::new(
                Graph::from_topology(&topo),
                c.live,
            )?))
        }
        None => None,
    };
    let planner = match (&config.planner, &config.cost, &index_store) {
        (Some(p), Some(c), Some(store)) => {
            let metrics = match &p.metrics {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        DaemonError::Planner(format!("metrics {}: {e}", path.display()))
                    })?;
                    crate::plan::MetricsFile::parse(&text).map_err(|e| {
                        DaemonError::Planner(format!("metrics {}: {e}", path.display()))
                    })?
                }
                None => Default::default(),
            };
            Some(Planner {
                store: store.clone(),
                topology: Topology::load(&c.topology)?,
                metrics,
                reported: Default::default(),
                stale_after: Duration::from_secs(p.metrics_stale_secs),
            })
        }
        _ => None,
    };
    let app = Arc::new(Appliance {
        config: config.clone(),
        datapath: Mutex::new(dp),
        discovery: Mutex::new(DiscoveryTable::default()),
        rates: Mutex::new(Default::default()),
        live_costs,
        planner,
        splicer: splicer.clone(),
        catalog: served_catalog.clone(),
        started: Instant::now(),
    });
    let cache = splicer.cache.get().cloned();
    let indexer = match (&indexer_config, &index_store) {
        (Some(ic), Some(store)) => Some(
            crate::peer::start_indexer_on(
                ic,
                store.clone(),
                cache
                    .clone()
                    .map(|c| c as Arc<dyn crate::peer::server::BlockSource>),
            )
            .await
            .map_err(|e| DaemonError::Indexer(format!("{e:#}")))?,
        ),
        _ => None,
    };
    // Blocks the cache lacks come from the holders the index knows.
    let sourcing = match (&indexer, &indexer_config, &served_catalog) {
        (Some(ix), Some(ic), Some(catalog)) if config.splicer.fetch_from_peers => {
            let ranks = app
                .source_ranks()
                .unwrap_or_else(|| crate::fetch::SourceRanks::unranked(&config.appliance.name));
            // The daemon asks under its embedded indexer's identity (one key
            // per node, listed once in the peers file).
            let client = crate::peer::client::PeerClient::new(ic.peer.client(
                &ic.node,
                crate::peer::proto::Role::Indexer,
                ic.credentials(),
            ));
            let s = Arc::new(crate::fetch::Sourcing::new(
                Box::new(ix.service.clone()),
                Arc::new(client),
                ranks,
                catalog.cache.clone(),
                crate::fetch::SourcingOptions {
                    deadline: config.splicer.fetch_deadline(),
                    batch: config.splicer.fetch_batch_blocks.max(1),
                },
            ));
            catalog.set_sourcing(s.clone());
            let _ = splicer.sourcing.set(s.clone());
            Some(s)
        }
        _ => None,
    };
    let rerank_task = sourcing.map(|s| tokio::spawn(rerank_loop(app.clone(), s)));
    // Served LUNs' manifests stay current: files, the local index, the parent.
    let manifest_task = served_catalog
        .clone()
        .filter(|c| !c.is_empty())
        .map(|catalog| {
            let parent = indexer_config.as_ref().and_then(|ic| {
                let client = crate::peer::client::PeerClient::new(ic.peer.client(
                    &ic.node,
                    crate::peer::proto::Role::Indexer,
                    ic.credentials(),
                ));
                ic.parent.map(|p| client.peer(&p.to_string()))
            });
            let sources = crate::splice::manifests::Sources {
                store: index_store
                    .clone()
                    .map(|s| s as crate::peer::indexer::SharedStore),
                parent,
            };
            tokio::spawn(crate::splice::manifests::refresh_loop(
                catalog,
                sources,
                config.splicer.manifest_refresh(),
            ))
        });
    // The appliance's own block cache is a holder in its local index.
    let cache_index_task = match (&indexer, &index_store, cache) {
        (Some(_), Some(store), Some(cache)) => Some(tokio::spawn(publish_cache(
            config.appliance.name.clone(),
            store.clone(),
            cache,
        ))),
        _ => None,
    };
    // The planner reads the agents' host metrics from the embedded indexer.
    if let (Some(p), Some(ix)) = (&app.planner, &indexer) {
        let _ = p.reported.set(ix.service.hosts.clone());
    }
    let discovery_task = tokio::spawn(discovery_loop(app.clone(), ring));
    let sampler_task = tokio::spawn(sample_loop(app.clone()));
    let peer_poll_task = config
        .cost
        .as_ref()
        .filter(|c| !c.peers.is_empty())
        .map(|_| tokio::spawn(peer_poll_loop(app.clone())));
    let api_listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|source| DaemonError::Api {
            addr: config.api.listen,
            source,
        })?;
    let api_auth = Arc::new(config.api.auth()?);
    let api_task = tokio::spawn(crate::api::serve(api_listener, app.clone(), api_auth));
    info!(
        appliance = %config.appliance.name,
        steering = dpc.steer,
        interfaces = ?dpc.interfaces,
        api = %config.api.listen,
        "nearblock running"
    );

    shutdown.await;
    info!("shutting down: new connections now bypass the splicer");
    {
        let mut dp = app.datapath.lock().unwrap_or_else(|p| p.into_inner());
        for slot in &listener_slots {
            if let Err(e) = dp.unregister_listener(*slot) {
                warn!(cause = %e, "removing listener from the SockMap");
            }
        }
    }
    let _ = stop_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    // Existing flows keep their steering (their sockets own their tuples) while
    // they drain.
    let deadline = Instant::now() + config.splicer.drain_timeout();
    while splicer.active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = splicer.active.load(Ordering::Relaxed);
    if left > 0 {
        warn!(flows = left, "drain timeout: closing remaining flows");
    }
    api_task.abort();
    sampler_task.abort();
    if let Some(t) = rerank_task {
        t.abort();
    }
    if let Some(t) = manifest_task {
        t.abort();
    }
    if let Some(t) = cache_index_task {
        t.abort();
    }
    drop(indexer);
    if let Some(t) = peer_poll_task {
        t.abort();
    }
    discovery_task.abort();
    if let Some(t) = kernel_log {
        t.abort();
    }
    let _ = discovery_task.await;
    // Last reference: detaches every program.
    drop(app);
    if dpc.steer {
        routing.remove_quietly();
    }
    info!("stopped");
    Ok(())
}

/// Record the block cache's contents in the local index as images `cache-<size>`
/// of this appliance (so the planner and the rack's peers see it as a holder),
/// whenever they changed; checked every 2 s.
async fn publish_cache(
    node: String,
    store: Arc<crate::index::RedbStore>,
    cache: Arc<crate::fetch::BlockCache>,
) {
    use crate::index::{BlockStore, Change};
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut published = (0, 0);
    // The cache starts empty: whatever an earlier run recorded is gone.
    let mut sizes: Vec<u32> = {
        let store = store.clone();
        let node = node.clone();
        tokio::task::spawn_blocking(move || store.images())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
            .into_iter()
            .filter(|i| *i.host == *node && i.image.starts_with("cache-"))
            .map(|i| i.block_size)
            .collect()
    };
    if !sizes.is_empty() {
        published = (u64::MAX, u64::MAX);
    }
    loop {
        tick.tick().await;
        let generation = cache.generation();
        if generation == published {
            continue;
        }
        let manifests = cache.as_manifests();
        let mut changes: Vec<Change> = sizes
            .iter()
            .filter(|s| !manifests.iter().any(|m| m.block_size == **s))
            .map(|&block_size| Change::RemoveImage {
                host: node.clone(),
                image: format!("cache-{block_size}"),
                block_size,
            })
            .collect();
        sizes = manifests.iter().map(|m| m.block_size).collect();
        changes.extend(manifests.into_iter().map(|manifest| Change::PutImage {
            host: node.clone(),
            manifest,
        }));
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.apply(&changes)).await {
            Ok(Ok(_)) => published = generation,
            Ok(Err(e)) => warn!(cause = %e, "recording the cache in the index"),
            Err(e) => warn!(cause = %e, "cache index task"),
        }
    }
}

/// Keep the fetcher's holder ranking in step with the live link costs.
async fn rerank_loop(app: Arc<Appliance>, sourcing: Arc<crate::fetch::Sourcing>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seen = None;
    loop {
        tick.tick().await;
        let recomputes = app
            .live_costs
            .as_ref()
            .map(|lc| lc.lock().unwrap_or_else(|p| p.into_inner()).recomputes());
        if recomputes == seen {
            continue;
        }
        seen = recomputes;
        if let Some(ranks) = app.source_ranks() {
            sourcing.set_ranks(ranks);
        }
    }
}

/// (rx_bytes, tx_bytes) per ifindex at one instant.
type ByteSample = std::collections::BTreeMap<u32, (u64, u64)>;

/// Turn the kernel's per-interface byte counters into live rates and utilization.
async fn sample_loop(app: Arc<Appliance>) {
    let dpc = &app.config.datapath;
    let capacity: std::collections::BTreeMap<u32, f64> = dpc
        .link_capacity_mbps
        .iter()
        .filter_map(|(iface, c)| datapath::if_index(iface).ok().map(|i| (i, *c)))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(dpc.sample_interval_ms));
    let mut prev: Option<(Instant, ByteSample)> = None;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let counters = {
            let dp = app.datapath.lock().unwrap_or_else(|p| p.into_inner());
            match dp.interfaces() {
                Ok(c) => c,
                Err(e) => {
                    warn!(cause = %e, "sampling interface counters");
                    continue;
                }
            }
        };
        let cur: std::collections::BTreeMap<u32, (u64, u64)> = counters
            .iter()
            .map(|(i, c)| (*i, (c.rx_bytes, c.tx_bytes)))
            .collect();
        if let Some((t0, before)) = &prev {
            let dt = now.duration_since(*t0).as_secs_f64();
            let rates = cur
                .iter()
                .map(|(i, c)| {
                    let p = before.get(i).copied().unwrap_or((0, 0));
                    (*i, classify::link_rate(p, *c, dt, capacity.get(i).copied()))
                })
                .collect();
            *app.rates.lock().unwrap_or_else(|p| p.into_inner()) = rates;
            app.apply_link_reports(&app.own_links());
        }
        prev = Some((now, cur));
    }
}

/// Learn the utilisation of links this appliance cannot see from the other
/// appliances' `GET /links`.
async fn peer_poll_loop(app: Arc<Appliance>) {
    let Some(cost) = app.config.cost.clone() else {
        return;
    };
    let Some(token_file) = cost.peer_token_file.clone() else {
        return;
    };
    let client = feed::LinksClient::new(token_file, Duration::from_secs(2));
    let mut tick = tokio::time::interval(Duration::from_millis(cost.poll_interval_ms));
    loop {
        tick.tick().await;
        for peer in &cost.peers {
            let (client, p) = (client.clone(), peer.clone());
            let fetched = tokio::task::spawn_blocking(move || client.fetch(&p)).await;
            match fetched {
                Ok(Ok(reports)) => app.apply_link_reports(&reports),
                Ok(Err(e @ (feed::FeedError::Refused { .. } | feed::FeedError::Token(_)))) => {
                    warn!(%peer, cause = %e, "peer /links not polled: token refused or unreadable")
                }
                Ok(Err(e)) => tracing::debug!(%peer, cause = %e, "peer /links unavailable"),
                Err(e) => warn!(cause = %e, "peer poll task"),
            }
        }
    }
}

/// Forward the kernel programs' aya-log lines (rare events) to tracing.
async fn kernel_log_loop(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its fd and is moved into the AsyncFd, so the fd stays
    // open for as long as it is registered.
    let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

async fn discovery_loop(app: Arc<Appliance>, ring: aya::maps::RingBuf<aya::maps::MapData>) {
    // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, so the fd
    // stays open for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(cause = %e, "discovery disabled: cannot poll the ring buffer");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some((key, payload)) = classify::decode_event(&item) else {
                continue;
            };
            if let Some(seen) = classify::parse_login(&key, &payload) {
                info!(
                    initiator = %seen.initiator_addr,
                    iqn = %seen.initiator_iqn,
                    target = ?seen.target_iqn,
                    "login seen"
                );
                app.discovery
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(seen);
            }
        }
        guard.clear_ready();
    }
}
