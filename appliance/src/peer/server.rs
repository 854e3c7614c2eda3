//! The peer server: accept, authenticate, then read pipelined requests and answer
//! each as soon as it is done (a bounded number in flight per connection). A
//! malformed frame or message closes that connection with a logged error.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, Semaphore},
};
use tokio_util::codec::FramedRead;

use super::{
    auth::{server_handshake, PeerInfo},
    identity::Credentials,
    indexer::IndexService,
    proto::{code, BlockReply, FrameCodec, Msg, Role, DEFAULT_MAX_FRAME, MAX_MANIFEST_PIECE},
};
use crate::index::BlockHash;

/// Something that holds blocks and reads them by name (an agent's files, later an
/// appliance's block cache). Called on a blocking thread.
pub trait BlockSource: Send + Sync + 'static {
    /// One reply per hash, in order. Once `budget` bytes have been returned, the
    /// rest are [`BlockReply::Skipped`] (the client asks again). Unknown hashes are
    /// [`BlockReply::NotFound`]. The bytes are *not* verified here: the receiver
    /// verifies every block.
    fn read_blocks(&self, hashes: &[BlockHash], budget: usize) -> Vec<BlockReply>;
}

/// How a server runs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub node: String,
    pub role: Role,
    /// This node's key and the peers file clients are checked against.
    pub creds: Credentials,
    pub max_frame: u32,
    /// Largest request reassembled from fragments (bytes).
    pub max_message: usize,
    /// Requests handled concurrently per connection (the rest wait in the socket).
    pub max_in_flight: usize,
    pub handshake_timeout: Duration,
}

impl ServerOptions {
    pub fn new(node: &str, role: Role, creds: Credentials) -> Self {
        Self {
            node: node.into(),
            role,
            creds,
            max_frame: DEFAULT_MAX_FRAME,
            max_message: 1 << 30,
            max_in_flight: 32,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// A role's own state for `Status` replies (scan results, push position, …).
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What a server offers.
#[derive(Clone, Default)]
pub struct Services {
    pub blocks: Option<Arc<dyn BlockSource>>,
    pub index: Option<Arc<IndexService>>,
    /// Build orders from the manager (an agent with a hypervisor hook).
    pub builds: Option<Arc<super::builder::Builder>>,
    pub status: Option<StatusFn>,
}

/// Server counters.
#[derive(Debug, Default, serde::Serialize)]
pub struct ServerMetrics {
    pub connections: AtomicU64,
    pub auth_failures: AtomicU64,
    pub malformed: AtomicU64,
    pub requests: AtomicU64,
    pub blocks_served: AtomicU64,
    pub bytes_served: AtomicU64,
    pub not_found: AtomicU64,
}

/// Accepts connections until the future is dropped (which also ends every
/// connection it accepted).
pub async fn serve(
    listener: TcpListener,
    opts: Arc<ServerOptions>,
    services: Services,
    metrics: Arc<ServerMetrics>,
) -> std::io::Result<()> {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        metrics.connections.fetch_add(1, Ordering::Relaxed);
        conns.spawn(connection(
            stream,
            peer,
            opts.clone(),
            services.clone(),
            metrics.clone(),
        ));
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one connection's life: handshake, read loop, in-flight bound, writer"
)]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    opts: Arc<ServerOptions>,
    services: Services,
    metrics: Arc<ServerMetrics>,
) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let secured = match server_handshake(
        rd,
        wr,
        &opts.creds,
        opts.role,
        &opts.node,
        opts.handshake_timeout,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "peer refused: {e}");
            return;
        }
    };
    let info = secured.peer;
    tracing::debug!(%peer, node = %info.node, role = ?info.role, key = ?info.key, "peer authenticated");
    let info = Arc::new(info);
    let mut rd = FramedRead::with_capacity(
        secured.reader,
        FrameCodec::new(opts.max_frame),
        FrameCodec::READ_CHUNK,
    );
    // Encoded replies go to the record sealer as they are: no byte-stream
    // adapter copying each reply once more on its way.
    let mut records = secured.writer.into_inner().into_inner();
    let (tx, mut rx) = mpsc::channel::<Bytes>(opts.max_in_flight.max(1) * 2);
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            records.feed(b).await?;
            if rx.is_empty() {
                records.flush().await?;
            }
        }
        records.flush().await
    });
    let sem = Arc::new(Semaphore::new(opts.max_in_flight.max(1)));
    // Requests being reassembled from fragments, by request id.
    let mut assembling: HashMap<u64, BytesMut> = HashMap::new();
    let mut assembling_bytes = 0usize;
    loop {
        let frame = match rd.next().await {
            Some(Ok(f)) => f,
            None => break,
            Some(Err(e)) => {
                metrics.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, node = %info.node, "closing peer connection: {e}");
                break;
            }
        };
        let id = frame.id;
        let body = if frame.is_fragment() {
            let (last, data) = match Msg::decode(frame.body) {
                Ok(Msg::Fragment { last, data }) => (last, data),
                _ => (false, Bytes::new()),
            };
            assembling_bytes += data.len();
            if assembling_bytes > opts.max_message || data.is_empty() {
                metrics.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, node = %info.node,
                    "closing peer connection: fragmented request over {} bytes or empty fragment", opts.max_message);
                break;
            }
            assembling.entry(id).or_default().extend_from_slice(&data);
            if !last {
                continue;
            }
            let whole = assembling.remove(&id).unwrap_or_default().freeze();
            assembling_bytes -= whole.len();
            whole
        } else {
            frame.body
        };
        let msg = match Msg::decode(body) {
            Ok(m) => m,
            Err(e) => {
                metrics.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, node = %info.node, "closing peer connection: {e}");
                let _ = tx
                    .send(
                        Msg::Error {
                            code: code::BAD_REQUEST,
                            acked: 0,
                            message: e.to_string(),
                        }
                        .encode(id),
                    )
                    .await;
                break;
            }
        };
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        metrics.requests.fetch_add(1, Ordering::Relaxed);
        let (tx, services, opts, metrics, info) = (
            tx.clone(),
            services.clone(),
            opts.clone(),
            metrics.clone(),
            info.clone(),
        );
        tokio::spawn(async move {
            let reply = handle(msg, &services, &opts, &metrics, &info).await;
            let _ = tx.send(reply.encode(id)).await;
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
}

fn error(code: u16, message: impl Into<String>) -> Msg {
    Msg::Error {
        code,
        acked: 0,
        message: message.into(),
    }
}

#[expect(clippy::too_many_lines, reason = "one arm per request message")]
async fn handle(
    msg: Msg,
    services: &Services,
    opts: &ServerOptions,
    metrics: &ServerMetrics,
    info: &PeerInfo,
) -> Msg {
    match msg {
        Msg::Ping => Msg::Pong,
        Msg::Status => {
            let v = serde_json::json!({
                "node": opts.node,
                "role": opts.role,
                "server": metrics,
                "index": services.index.as_ref().map(|ix| serde_json::json!({
                    "seq": ix.store().seq(),
                    "metrics": &ix.metrics,
                    "children": ix.child_state(),
                    "hosts": ix.hosts.view(std::time::Instant::now()),
                    "hosts_dropped": ix.hosts.dropped.load(Ordering::Relaxed),
                })),
                "state": services.status.as_ref().map(|f| f()),
            });
            Msg::StatusReply {
                json: v.to_string(),
            }
        }
        Msg::GetBlocks { hashes } => {
            let Some(src) = services.blocks.clone() else {
                return error(code::UNSUPPORTED, format!("{} serves no blocks", opts.node));
            };
            // Room for the per-block framing inside the frame limit.
            let budget = (opts.max_frame as usize)
                .saturating_sub(1024 + hashes.len() * 8)
                .max(1);
            match tokio::task::spawn_blocking(move || src.read_blocks(&hashes, budget)).await {
                Ok(items) => {
                    for it in &items {
                        match it {
                            BlockReply::Found(b) => {
                                metrics.blocks_served.fetch_add(1, Ordering::Relaxed);
                                metrics
                                    .bytes_served
                                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                            }
                            BlockReply::NotFound => {
                                metrics.not_found.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                    Msg::Blocks { items }
                }
                Err(e) => error(code::INTERNAL, format!("block read failed: {e}")),
            }
        }
        Msg::Holders { local_only, hashes } => match &services.index {
            Some(ix) => match ix.holders(&hashes, local_only).await {
                Ok(items) => Msg::HoldersReply { items },
                Err(e) => error(code::INTERNAL, format!("{e:#}")),
            },
            None => error(
                code::UNSUPPORTED,
                format!("{} is not an indexer", opts.node),
            ),
        },
        Msg::GetManifest {
            host,
            image,
            block_size,
            known,
            offset,
            max_len,
        } => match &services.index {
            Some(ix) => {
                // Room for the reply's own fields inside the frame limit.
                let cap = max_len
                    .min(MAX_MANIFEST_PIECE)
                    .min(opts.max_frame.saturating_sub(1024))
                    .max(1);
                match ix
                    .manifest_piece(&host, &image, block_size, known, offset, cap)
                    .await
                {
                    Ok(piece) => Msg::ManifestReply { piece },
                    Err(e) => error(
                        code::INTERNAL,
                        format!("manifest of {image} held by {host}: {e}"),
                    ),
                }
            }
            None => error(
                code::UNSUPPORTED,
                format!("{} is not an indexer", opts.node),
            ),
        },
        Msg::Push {
            node,
            resync,
            upto,
            addrs,
            changes,
        } => match &services.index {
            Some(ix) => {
                if info.role == Role::Client {
                    return error(code::BAD_REQUEST, "clients do not push");
                }
                // A child pushes under the name it authenticated with, so one
                // child cannot move another's acknowledged position.
                if node != info.node {
                    return error(
                        code::BAD_REQUEST,
                        format!("push as {node} from a peer authenticated as {}", info.node),
                    );
                }
                // What the child may change is what the peers file says now: a
                // revoked key stops here, a changed delegation applies at once.
                let entry = match opts.creds.keyring.lookup(&info.key) {
                    Some(e) if e.name == info.node && e.role == info.role => e,
                    _ => {
                        tracing::warn!(node = %info.node, key = ?info.key,
                            "push refused: the key is no longer in the peers file");
                        return error(
                            code::AUTH,
                            format!(
                                "{}: {}'s key is no longer in the peers file",
                                opts.node, info.node
                            ),
                        );
                    }
                };
                ix.push(&entry, resync, upto, addrs, changes).await
            }
            None => error(
                code::UNSUPPORTED,
                format!("{} is not an indexer", opts.node),
            ),
        },
        Msg::HostMetrics { reports } => match &services.index {
            Some(ix) => match info.role {
                Role::Client => error(code::BAD_REQUEST, "clients do not report host metrics"),
                // An agent speaks for its own host; an indexer for the hosts
                // delegated to it in the peers file (as it says now).
                _ if !opts.creds.keyring.lookup(&info.key).is_some_and(|e| {
                    e.name == info.node && reports.iter().all(|r| e.speaks_for(&r.host))
                }) =>
                {
                    error(
                        code::BAD_REQUEST,
                        format!(
                            "{} ({:?}) reports metrics of a host it does not speak for",
                            info.node, info.role
                        ),
                    )
                }
                _ => Msg::Ack {
                    seq: ix
                        .hosts
                        .record(&info.node, &reports, std::time::Instant::now())
                        as u64,
                },
            },
            None => error(
                code::UNSUPPORTED,
                format!("{} is not an indexer", opts.node),
            ),
        },
        Msg::Build { .. }
        | Msg::BuildStatus { .. }
        | Msg::BuildCancel { .. }
        | Msg::VmAction { .. }
        | Msg::BuildRates { .. }
        | Msg::Import { .. }
        | Msg::PrefetchShare { .. }
        | Msg::Patch { .. }
        | Msg::Track { .. }
        | Msg::Untrack { .. }
        | Msg::Prestage { .. }
        | Msg::Unpin { .. } => build_request(msg, services, opts, info).await,
        m => error(code::BAD_REQUEST, format!("{} is not a request", m.name())),
    }
}

/// A manager's build order, status query or cancel: only from a node the
/// agent's `[hypervisor] managers` names, whose key the peers file still lists.
async fn build_request(msg: Msg, services: &Services, opts: &ServerOptions, info: &PeerInfo) -> Msg {
    let Some(builds) = &services.builds else {
        return error(
            code::UNSUPPORTED,
            format!("{} builds no VMs (no [hypervisor])", opts.node),
        );
    };
    let listed = opts
        .creds
        .keyring
        .lookup(&info.key)
        .is_some_and(|e| e.name == info.node && e.role == info.role);
    if !listed || info.role == Role::Agent || !builds.is_manager(&info.node) {
        tracing::warn!(node = %info.node, role = ?info.role, "build request refused: not a manager of this agent");
        return error(
            code::AUTH,
            format!("{}: {} may not order builds here", opts.node, info.node),
        );
    }
    let report = match msg {
        Msg::Build { order } => builds.order(*order),
        Msg::BuildStatus { job } => builds
            .status(job)
            .ok_or_else(|| format!("no build {job} here")),
        Msg::BuildCancel { job } => builds
            .cancel(job)
            .ok_or_else(|| format!("no build {job} here")),
        Msg::BuildRates { job, rates } => builds.set_rates(job, &rates),
        Msg::Import {
            job,
            vm,
            image,
            size,
            source,
        } => builds.import(job, vm, image, size, source),
        Msg::PrefetchShare {
            bytes_per_s,
            counted,
        } => {
            return match builds.prefetch_share(bytes_per_s, counted) {
                Ok(prefetching) => Msg::PrefetchState { prefetching },
                Err(e) => error(code::BAD_REQUEST, e),
            };
        }
        Msg::Patch { order, positions } => builds.patch(*order, positions),
        Msg::Prestage { order, owner } => builds.prestage(*order, owner),
        Msg::Unpin { owner } => {
            return match builds.unpin(&owner) {
                Ok(()) => Msg::Ack { seq: 0 },
                Err(e) => error(code::BAD_REQUEST, e),
            };
        }
        Msg::Track { vm, since } => {
            return match builds.track(vm, since).await {
                Ok(report) => Msg::Tracked {
                    report: Box::new(report),
                },
                Err(e) => error(code::BAD_REQUEST, e),
            };
        }
        Msg::Untrack { vm } => {
            return match builds.stop_tracking(vm).await {
                Ok(()) => Msg::Ack { seq: 0 },
                Err(e) => error(code::BAD_REQUEST, e),
            };
        }
        Msg::VmAction { vm, action } => {
            return match builds.vm_action(vm, action).await {
                Ok(()) => Msg::Ack { seq: 0 },
                Err(e) => error(code::BAD_REQUEST, e),
            };
        }
        _ => unreachable!("only build messages come here"),
    };
    match report {
        Ok(r) => Msg::BuildReply {
            report: Box::new(r),
        },
        Err(e) => error(code::BAD_REQUEST, e),
    }
}
