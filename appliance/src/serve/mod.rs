//! The peer protocol: blocks served by hash, the index hierarchy over the network.
//!
//! - [`proto`]: length-prefixed, versioned frames with request ids (pipelined),
//!   and the messages (GetBlocks, Holders, Push, …).
//! - [`auth`]: mutual challenge–response with a shared secret, before anything else.
//! - [`server`]: accept, authenticate, answer; [`server::BlockSource`] is what
//!   holds blocks (an agent's files).
//! - [`client`]: per-peer pipelined connections, concurrency limit, deadlines,
//!   blake3 verification of every block, penalties, `fetch_from_any`.
//! - [`indexer`]: the index service (pushes from children, holders with parent
//!   fallback) and the upward [`indexer::Pusher`].
//! - [`config`]: the agent's and indexer's TOML.
//!
//! See `docs/peer.md`.

pub mod auth;
pub mod client;
pub mod config;
pub mod indexer;
pub mod proto;
pub mod server;

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};

use crate::index::{BlockStore, RedbStore, StoreOptions};

/// Runs `nearblock indexer` until SIGTERM or SIGINT.
pub async fn run_indexer(cfg: config::IndexerConfig) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if let Some(dir) = cfg.db.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
    }
    let t0 = std::time::Instant::now();
    let store = Arc::new(
        RedbStore::open(
            &cfg.db,
            StoreOptions {
                log: cfg.parent.is_some(),
                ..StoreOptions::default()
            },
        )
        .with_context(|| format!("open {}", cfg.db.display()))?,
    );
    let key = cfg.key();
    let client = client::PeerClient::new(cfg.peer.client(
        &cfg.node,
        proto::Role::Indexer,
        key.clone(),
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
        .with_context(|| format!("listen on {}", cfg.listen))?;
    let push_status = Arc::new(indexer::PushStatus::default());
    let status: server::StatusFn = {
        let p = push_status.clone();
        let parent = cfg.parent;
        Arc::new(move || serde_json::json!({ "parent": parent, "push": &*p }))
    };
    let server = tokio::spawn(server::serve(
        listener,
        Arc::new(cfg.peer.server(&cfg.node, proto::Role::Indexer, key)),
        server::Services {
            blocks: None,
            index: Some(ix.clone()),
            status: Some(status),
        },
        Arc::new(server::ServerMetrics::default()),
    ));
    let pusher = parent.map(|parent| {
        let ix2 = ix.clone();
        tokio::spawn(
            indexer::Pusher {
                node: cfg.node.clone(),
                store: store.clone(),
                parent,
                addrs: Arc::new(move || ix2.addrs()),
                interval: Duration::from_millis(cfg.push_interval_ms),
                max_changes: 256,
                max_bytes: ((cfg.peer.max_frame_mib << 20) / 2) as usize,
                wake: ix.changed.clone(),
                status: push_status.clone(),
            }
            .run(),
        )
    });
    tracing::info!(node = %cfg.node, listen = %cfg.listen, parent = ?cfg.parent, seq = store.seq(),
        open_ms = t0.elapsed().as_millis() as u64, "indexer ready");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("indexer stopping");
    server.abort();
    if let Some(p) = pusher {
        p.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
