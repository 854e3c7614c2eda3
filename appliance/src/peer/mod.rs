//! The peer protocol: blocks served by hash, the index hierarchy over the network.
//!
//! - [`proto`]: length-prefixed, versioned frames with request ids (pipelined),
//!   and the messages (`GetBlocks`, `Holders`, `Push`, …).
//! - [`identity`]: each node's own key, and the peers file (public keys, roles,
//!   the hosts an indexer speaks for), re-read when it changes.
//! - [`auth`]: the Noise XX handshake on those keys, and the encrypted,
//!   authenticated channel every frame then travels in.
//! - [`server`]: accept, authenticate, answer; [`server::BlockSource`] is what
//!   holds blocks (an agent's files).
//! - [`client`]: per-peer pipelined connections, concurrency limit, deadlines,
//!   blake3 verification of every block, penalties, `fetch_from_any`.
//! - [`indexer`]: the index service (pushes from children, holders with parent
//!   fallback) and the upward [`indexer::Pusher`].
//! - [`hosts`]: host load reports (cpu, mem, disk) kept per host and sent up the
//!   tree.
//! - [`config`]: the agent's and indexer's TOML.
//! - [`durable_file`]: crash-safe whole-file writes (key files, the indexer's
//!   children state).
//! - [`agent`]: `nearblock agent`: index local images, push them up, serve their
//!   blocks.
//! - [`http_root`]: an HTTP origin's document root, file by file, named by
//!   the version the origin serves (the library's agent).
//! - [`hostmetrics`]: a host's cpu, mem and disk used fractions, as agents
//!   measure them.
//!
//! See `docs/peer.md`.

pub mod agent;
pub mod auth;
pub mod build_order;
pub mod builder;
pub mod cache_holder;
pub mod client;
pub mod config;
pub mod durable_file;
pub mod error;
pub mod hostmetrics;
pub mod hosts;
pub mod http_root;
pub mod identity;
pub mod indexer;
pub mod proto;
pub mod server;
pub mod wire_count;

use std::{sync::Arc, time::Duration};

use error::{AnnotateIo, Result};

use crate::index::{BlockStore, RedbStore, RedisClusterStore, StoreOptions};
use indexer::SharedStore;

/// Serialises what a lock holds (status and metrics structs that are
/// reported as JSON keep their last error behind a lock).
fn serialize_locked<T: serde::Serialize, S: serde::Serializer>(
    value: &parking_lot::Mutex<T>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    value.lock().serialize(serializer)
}

/// A running indexer (server + upward pusher); dropping it stops both. For
/// embedding in another process (e.g. the rack appliance's daemon).
pub struct IndexerHandle {
    pub service: Arc<indexer::IndexService>,
    /// Upward pushes (the tests watch them; the daemon does not report them yet).
    #[cfg(test)]
    pub push_status: Arc<indexer::PushStatus>,
    /// Forwarding of host load reports to the parent.
    #[cfg(test)]
    pub metrics_status: Arc<hosts::ReportStatus>,
    /// The address the server listens on (with port 0 resolved).
    #[cfg(test)]
    pub local_addr: std::net::SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for IndexerHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens the store, binds, and starts serving and pushing (inside a tokio
/// runtime).
pub async fn start_indexer(cfg: &config::IndexerConfig) -> Result<IndexerHandle> {
    let store = match &cfg.index {
        config::IndexBackend::Redb => open_indexer_store(cfg)? as SharedStore,
        config::IndexBackend::RedisCluster(r) => {
            let opts = r
                .options(
                    StoreOptions::default().coarse,
                    cfg.parent.is_some(),
                    cfg.max_image_blocks,
                )
                ?;
            // Connecting and finishing a pending batch are blocking I/O.
            let store = tokio::task::spawn_blocking(move || RedisClusterStore::open(opts)).await??;
            tracing::info!(nodes = ?r.nodes, prefix = %r.key_prefix, "index on redis cluster");
            Arc::new(store) as SharedStore
        }
    };
    start_indexer_on(cfg, store, None, None).await
}

/// Open the store an indexer configured by `cfg` works on (with a change log
/// when it has a parent to push to).
pub fn open_indexer_store(cfg: &config::IndexerConfig) -> Result<Arc<RedbStore>> {
    if let config::IndexBackend::RedisCluster(_) = cfg.index {
        return Err(crate::index::IndexError::Invalid(
            "[index] backend = \"redis-cluster\" is for the global indexer (`nearblock indexer`); \
             a rack appliance keeps its index in redb"
                .into(),
        )
        .into());
    }
    if let Some(dir) = cfg.db.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).io_context(|| format!("create {}", dir.display()))?;
        }
    }
    Ok(Arc::new(RedbStore::open(
        &cfg.db,
        StoreOptions {
            log: cfg.parent.is_some(),
            max_image_blocks: cfg.max_image_blocks,
            ..StoreOptions::default()
        },
    )?))
}

/// Start the index service, and the upward pusher if `cfg` has a parent, on an
/// open store (the daemon shares its store with the splicer and the planner).
/// `blocks`: what the server serves by hash besides the index (the appliance's
/// block cache); `builds`: pre-staging orders into that cache.
pub async fn start_indexer_on(
    cfg: &config::IndexerConfig,
    store: SharedStore,
    blocks: Option<Arc<dyn server::BlockSource>>,
    builds: Option<Arc<builder::Builder>>,
) -> Result<IndexerHandle> {
    let t0 = std::time::Instant::now();
    let creds = cfg.credentials();
    let client = client::PeerClient::new(cfg.peer.client(
        &cfg.node,
        proto::Role::Indexer,
        creds.clone(),
    ));
    let parent = cfg.parent.map(|p| client.peer(&p.to_string()));
    let mut state_path = cfg.db.clone().into_os_string();
    state_path.push(".children.json");
    let ix = Arc::new(indexer::IndexService::open(
        &cfg.node,
        store.clone(),
        parent.clone(),
        state_path.into(),
    )?);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .io_context(|| format!("listen on {}", cfg.listen))?;
    let local_addr = listener.local_addr()?;
    let push_status = Arc::new(indexer::PushStatus::default());
    let metrics_status = Arc::new(hosts::ReportStatus::default());
    let status: server::StatusFn = {
        let (p, m) = (push_status.clone(), metrics_status.clone());
        let parent = cfg.parent;
        Arc::new(move || serde_json::json!({ "parent": parent, "push": &*p, "metrics_push": &*m }))
    };
    let server_metrics = Arc::new(server::ServerMetrics::default());
    let server = tokio::spawn({
        let f = server::serve(
            listener,
            Arc::new(cfg.peer.server(&cfg.node, proto::Role::Indexer, creds)),
            server::Services {
                blocks,
                index: Some(ix.clone()),
                builds,
                status: Some(status),
            },
            server_metrics,
        );
        async move {
            if let Err(e) = f.await {
                tracing::error!("indexer server: {e}");
            }
        }
    });
    let mut tasks = vec![server];
    // The hosts' load reports go up the same way, on the same connection.
    if let (Some(parent), true) = (&parent, cfg.metrics_interval_ms > 0) {
        let reports = ix.hosts.clone();
        tasks.push(tokio::spawn(
            hosts::MetricsReporter {
                node: cfg.node.clone(),
                parent: parent.clone(),
                interval: Duration::from_millis(cfg.metrics_interval_ms),
                collect: Arc::new(move || reports.to_forward(std::time::Instant::now())),
                status: metrics_status.clone(),
            }
            .run(),
        ));
    }
    tasks.extend(parent.map(|parent| {
        let ix2 = ix.clone();
        // Its own address too, when it advertises one: its cache's blocks and
        // pre-staging orders are asked of it there.
        let own = cfg.advertise.map(|a| (cfg.node.clone(), a.to_string()));
        tokio::spawn(
            indexer::Pusher {
                node: cfg.node.clone(),
                store: store.clone(),
                parent,
                addrs: Arc::new(move || ix2.addrs().into_iter().chain(own.clone()).collect()),
                interval: Duration::from_millis(cfg.push_interval_ms),
                max_changes: 256,
                max_bytes: ((cfg.peer.max_frame_mib << 20) / 2) as usize,
                wake: ix.changed.clone(),
                status: push_status.clone(),
            }
            .run(),
        )
    }));
    tracing::info!(node = %cfg.node, listen = %local_addr, parent = ?cfg.parent, seq = store.seq(),
        open_ms = t0.elapsed().as_millis() as u64, "indexer ready");
    Ok(IndexerHandle {
        service: ix,
        #[cfg(test)]
        push_status,
        #[cfg(test)]
        metrics_status,
        #[cfg(test)]
        local_addr,
        tasks,
    })
}

/// Runs `nearblock indexer` until SIGTERM or SIGINT.
pub async fn run_indexer(cfg: config::IndexerConfig) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handle = start_indexer(&cfg).await?;
    let mut term = signal(SignalKind::terminate()).io_context(|| "SIGTERM handler".into())?;
    let mut int = signal(SignalKind::interrupt()).io_context(|| "SIGINT handler".into())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("indexer stopping");
    drop(handle);
    Ok(())
}

#[cfg(test)]
mod tests;
