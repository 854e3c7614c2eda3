//! The peer client: one pipelined, authenticated connection per peer (opened on
//! first use, reopened after a failure), a bounded number of requests in flight
//! per peer, a deadline per request, and blake3 verification of every block
//! before it is returned.
//!
//! A block whose bytes do not hash to its name is never returned: the mismatch is
//! counted ([`ClientMetrics`]), the peer is penalised (deprioritised for
//! [`ClientOptions::penalty`]) and the caller moves on to the next holder —
//! [`PeerClient::fetch_from_any`] / [`PeerClient::fetch_many`] do exactly that.
//!
//! For the splicer: `client.peer(addr).fetch_blocks(&hashes).await` gives one
//! verified result per hash, in order.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::{
    io::{AsyncWriteExt, BufWriter},
    net::TcpStream,
    sync::{mpsc, oneshot, Semaphore},
    task::JoinSet,
};
use tokio_util::codec::FramedRead;

use parking_lot::Mutex;

use super::{
    auth::client_handshake,
    identity::Credentials,
    proto::{
        BlockReply, FrameCodec, Holder, HostReport, ManifestPiece, Msg, PushedChange, Role,
        DEFAULT_MAX_FRAME, MAX_MANIFEST_PIECE,
    },
};
use crate::index::{BlockHash, Manifest};

/// Largest manifest encoding a client assembles (1 GiB: 32 Mi blocks, a
/// 128 GiB image at 4 KiB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// What an indexer said about an image's manifest ([`Peer::manifest`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestAnswer {
    /// Neither the indexer nor its ancestors have the image.
    Absent,
    /// The digest the asker gave is still the manifest's.
    Unchanged,
    /// The manifest, verified against `digest` (blake3 of its encoding).
    Found {
        manifest: Manifest,
        digest: [u8; 32],
    },
}

/// Assembles a manifest from the pieces of one digest (pure; see
/// [`Peer::manifest`]).
#[derive(Debug, Default)]
struct ManifestAssembly {
    digest: Option<[u8; 32]>,
    buf: Vec<u8>,
}

/// What to do after a piece.
#[derive(Debug, PartialEq, Eq)]
enum Assembled {
    /// Ask for the bytes from this offset.
    More(u64),
    /// The pieces changed digest under us (the manifest changed): start again.
    Restart,
    Done(ManifestAnswer),
}

impl ManifestAssembly {
    fn add(&mut self, piece: ManifestPiece) -> Result<Assembled, String> {
        let (digest, total, offset, data) = match piece {
            ManifestPiece::Absent => return Ok(Assembled::Done(ManifestAnswer::Absent)),
            ManifestPiece::Unchanged => return Ok(Assembled::Done(ManifestAnswer::Unchanged)),
            ManifestPiece::Part {
                digest,
                total,
                offset,
                data,
            } => (digest, total, offset, data),
        };
        if total > MAX_MANIFEST_BYTES {
            return Err(format!("manifest of {total} bytes is over the limit"));
        }
        if self.digest.is_some_and(|d| d != digest) {
            *self = ManifestAssembly::default();
            return Ok(Assembled::Restart);
        }
        if offset != self.buf.len() as u64 {
            return Err(format!(
                "manifest piece at {offset}, expected {}",
                self.buf.len()
            ));
        }
        if data.is_empty() && offset < total {
            return Err("empty manifest piece".into());
        }
        self.digest = Some(digest);
        self.buf.extend_from_slice(&data);
        if (self.buf.len() as u64) < total {
            return Ok(Assembled::More(self.buf.len() as u64));
        }
        if *blake3::hash(&self.buf).as_bytes() != digest {
            return Err("manifest does not match its digest".into());
        }
        let manifest = Manifest::decode(&self.buf).map_err(|e| e.to_string())?;
        Ok(Assembled::Done(ManifestAnswer::Found { manifest, digest }))
    }
}

/// How a client talks to peers.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Our node name (sent in the handshake).
    pub node: String,
    pub role: Role,
    /// This node's key and the peers file servers are checked against.
    pub creds: Credentials,
    pub connect_timeout: Duration,
    /// Deadline of one request, from sending it to its reply.
    pub request_timeout: Duration,
    /// Requests in flight per peer (further callers wait).
    pub max_in_flight: usize,
    /// Hashes per `GetBlocks` request.
    pub batch: usize,
    pub max_frame: u32,
    /// How long a peer that served a corrupt block is tried last.
    pub penalty: Duration,
}

impl ClientOptions {
    pub fn new(node: &str, role: Role, creds: Credentials) -> Self {
        Self {
            node: node.into(),
            role,
            creds,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            max_in_flight: 16,
            batch: 64,
            max_frame: DEFAULT_MAX_FRAME,
            penalty: Duration::from_mins(5),
        }
    }
}

/// Why a block (or request) failed. Cloneable: one failed request fails every
/// hash it carried.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{peer}: block not found")]
    NotFound { peer: String },
    #[error("{peer}: block failed verification (blake3 mismatch)")]
    Mismatch { peer: String },
    #[error("{peer}: cannot read the block: {message}")]
    Unavailable { peer: String, message: String },
    #[error("{peer}: request timed out")]
    Timeout { peer: String },
    #[error("{peer}: connection: {message}")]
    Connection { peer: String, message: String },
    #[error("{peer}: authentication: {message}")]
    Auth { peer: String, message: String },
    #[error("{peer}: protocol: {message}")]
    Protocol { peer: String, message: String },
    #[error("{peer}: refused (code {code}): {message}")]
    Remote {
        peer: String,
        code: u16,
        acked: u64,
        message: String,
    },
    #[error("no holder to fetch from")]
    NoHolders,
}

/// Counters of a [`PeerClient`] (all peers).
#[derive(Debug, Default)]
pub struct ClientMetrics {
    pub requests: AtomicU64,
    pub connects: AtomicU64,
    pub blocks_ok: AtomicU64,
    pub bytes_ok: AtomicU64,
    pub mismatches: AtomicU64,
    pub not_found: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub penalties: AtomicU64,
}

/// A copy of [`ClientMetrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MetricsSnapshot {
    pub requests: u64,
    pub connects: u64,
    pub blocks_ok: u64,
    pub bytes_ok: u64,
    pub mismatches: u64,
    pub not_found: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub penalties: u64,
}

impl ClientMetrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            requests: g(&self.requests),
            connects: g(&self.connects),
            blocks_ok: g(&self.blocks_ok),
            bytes_ok: g(&self.bytes_ok),
            mismatches: g(&self.mismatches),
            not_found: g(&self.not_found),
            errors: g(&self.errors),
            timeouts: g(&self.timeouts),
            penalties: g(&self.penalties),
        }
    }
}

fn inc(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Msg, String>>>>>>;

/// One authenticated connection; requests pipeline on it.
struct Conn {
    tx: mpsc::Sender<Bytes>,
    /// `None` once the connection failed (nothing more will be answered).
    pending: Pending,
    next: AtomicU64,
    alive: Arc<AtomicBool>,
    tasks: Vec<tokio::task::AbortHandle>,
    /// Requests larger than this are sent as fragments.
    max_frame: u32,
    /// The role the server authenticated with (its peers-file entry).
    server_role: Role,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Requests whose answer only an indexer may give.
fn answers_for_the_index(msg: &Msg) -> bool {
    matches!(
        msg,
        Msg::GetManifest { .. } | Msg::Holders { .. } | Msg::Push { .. }
    )
}

impl Conn {
    async fn open(
        addr: &str,
        opts: &ClientOptions,
        wire: &Arc<super::wire_count::WireBytes>,
    ) -> Result<Conn, FetchError> {
        let conn_err = |message: String| FetchError::Connection {
            peer: addr.into(),
            message,
        };
        let s = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| FetchError::Timeout { peer: addr.into() })?
            .map_err(|e| conn_err(e.to_string()))?;
        let _ = s.set_nodelay(true);
        let (rd, wr) = s.into_split();
        // Counted below the handshake and the records: what crosses the wire.
        let (rd, wr) = (
            super::wire_count::counted_reader(rd, wire),
            super::wire_count::counted_writer(wr, wire),
        );
        let secured = client_handshake(
            rd,
            wr,
            &opts.creds,
            opts.role,
            &opts.node,
            opts.connect_timeout,
        )
        .await
        .map_err(|e| FetchError::Auth {
            peer: addr.into(),
            message: e.to_string(),
        })?;
        let server_role = secured.peer.role;
        let (rd, wr) = (secured.reader, secured.writer);
        let (tx, mut rx) = mpsc::channel::<Bytes>(opts.max_in_flight.max(1) * 2);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let alive = Arc::new(AtomicBool::new(true));
        let writer = tokio::spawn({
            let alive = alive.clone();
            async move {
                let mut wr = BufWriter::new(wr);
                while let Some(b) = rx.recv().await {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                    if rx.is_empty() && wr.flush().await.is_err() {
                        break;
                    }
                }
                alive.store(false, Ordering::Release);
            }
        });
        let reader = tokio::spawn({
            let (pending, alive, max_frame, peer) = (
                pending.clone(),
                alive.clone(),
                opts.max_frame,
                addr.to_string(),
            );
            async move {
                let mut rd = FramedRead::with_capacity(
                    rd,
                    FrameCodec::new(max_frame),
                    FrameCodec::READ_CHUNK,
                );
                let why = loop {
                    match rd.next().await {
                        Some(Ok(f)) => {
                            let m = Msg::decode(f.body).map_err(|e| e.to_string());
                            let bad = m.is_err();
                            let waiter = pending.lock().as_mut().and_then(|p| p.remove(&f.id));
                            if let Some(w) = waiter {
                                let _ = w.send(m);
                            }
                            if bad {
                                break "malformed reply".to_string();
                            }
                        }
                        None => break "closed by peer".to_string(),
                        Some(Err(e)) => break e.to_string(),
                    }
                };
                alive.store(false, Ordering::Release);
                tracing::debug!(%peer, "peer connection ended: {why}");
                if let Some(p) = pending.lock().take() {
                    for (_, w) in p {
                        let _ = w.send(Err(why.clone()));
                    }
                }
            }
        });
        Ok(Conn {
            tx,
            pending,
            next: AtomicU64::new(1),
            alive,
            tasks: vec![writer.abort_handle(), reader.abort_handle()],
            max_frame: opts.max_frame,
            server_role,
        })
    }

    async fn call(&self, peer: &str, msg: &Msg, timeout: Duration) -> Result<Msg, FetchError> {
        let conn_err = |message: String| FetchError::Connection {
            peer: peer.into(),
            message,
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (wtx, wrx) = oneshot::channel();
        match self.pending.lock().as_mut() {
            Some(p) => p.insert(id, wtx),
            None => return Err(conn_err("connection lost".into())),
        };
        let frames = msg.encode_frames(id, self.max_frame);
        let sent = async {
            for f in frames {
                self.tx
                    .send(f)
                    .await
                    .map_err(|_| conn_err("connection lost".into()))?;
            }
            wrx.await
                .map_err(|_| conn_err("connection lost".into()))?
                .map_err(conn_err)
        };
        if let Ok(r) = tokio::time::timeout(timeout, sent).await {
            r
        } else {
            if let Some(p) = self.pending.lock().as_mut() {
                p.remove(&id);
            }
            Err(FetchError::Timeout { peer: peer.into() })
        }
    }
}

#[derive(Default)]
struct Health {
    mismatches: u64,
    penalised_until: Option<Instant>,
}

struct PeerInner {
    addr: String,
    opts: Arc<ClientOptions>,
    metrics: Arc<ClientMetrics>,
    sem: Semaphore,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    health: Mutex<Health>,
    /// Bytes on the wire to and from this peer, every connection.
    wire: Arc<super::wire_count::WireBytes>,
}

/// One peer (an agent's or indexer's service address). Cheap to clone.
#[derive(Clone)]
pub struct Peer(Arc<PeerInner>);

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer({})", self.0.addr)
    }
}

impl Peer {
    pub fn new(addr: &str, opts: Arc<ClientOptions>, metrics: Arc<ClientMetrics>) -> Self {
        Peer(Arc::new(PeerInner {
            addr: addr.into(),
            sem: Semaphore::new(opts.max_in_flight.max(1)),
            opts,
            metrics,
            conn: tokio::sync::Mutex::new(None),
            health: Mutex::new(Health::default()),
            wire: Arc::default(),
        }))
    }

    pub fn addr(&self) -> &str {
        &self.0.addr
    }

    /// Bytes on the wire to and from this peer (TCP payload: handshakes,
    /// frames, sealed records), over every connection so far.
    pub fn wire_bytes(&self) -> u64 {
        self.0.wire.total()
    }

    /// Served a corrupt block within the penalty period.
    pub fn is_penalised(&self) -> bool {
        self.0
            .health
            .lock()
            .penalised_until
            .is_some_and(|t| t > Instant::now())
    }

    /// Corrupt blocks this peer served (since this client started).
    pub fn mismatches(&self) -> u64 {
        self.0.health.lock().mismatches
    }

    fn penalise(&self) {
        let mut h = self.0.health.lock();
        h.mismatches += 1;
        h.penalised_until = Some(Instant::now() + self.0.opts.penalty);
        inc(&self.0.metrics.mismatches, 1);
        inc(&self.0.metrics.penalties, 1);
        tracing::warn!(peer = %self.0.addr, mismatches = h.mismatches,
            "peer served a block that does not match its hash: penalised for {:?}", self.0.opts.penalty);
    }

    async fn conn(&self) -> Result<Arc<Conn>, FetchError> {
        let mut g = self.0.conn.lock().await;
        if let Some(c) = g.as_ref() {
            if c.alive.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        inc(&self.0.metrics.connects, 1);
        let c = Arc::new(Conn::open(&self.0.addr, &self.0.opts, &self.0.wire).await?);
        *g = Some(c.clone());
        Ok(c)
    }

    /// One request and its reply (an `Error` reply becomes [`FetchError::Remote`]).
    pub async fn request(&self, msg: &Msg) -> Result<Msg, FetchError> {
        let _permit = self
            .0
            .sem
            .acquire()
            .await
            .map_err(|_| FetchError::Connection {
                peer: self.0.addr.clone(),
                message: "client closed".into(),
            })?;
        inc(&self.0.metrics.requests, 1);
        let r = match self.conn().await {
            // Holders and manifests decide which bytes get served: only a node the
            // peers file lists as an indexer answers them (an agent's key at a
            // parent's address is not one).
            Ok(c) if answers_for_the_index(msg) && c.server_role != Role::Indexer => {
                Err(FetchError::Protocol {
                    peer: self.0.addr.clone(),
                    message: format!(
                        "{} asked of a node authenticated as {:?}, not an indexer",
                        msg.name(),
                        c.server_role
                    ),
                })
            }
            Ok(c) => {
                let r = c.call(&self.0.addr, msg, self.0.opts.request_timeout).await;
                if matches!(
                    r,
                    Err(FetchError::Timeout { .. } | FetchError::Connection { .. })
                ) {
                    // A hung or broken connection: the next request reconnects.
                    let mut g = self.0.conn.lock().await;
                    if g.as_ref().is_some_and(|x| Arc::ptr_eq(x, &c)) {
                        *g = None;
                    }
                }
                r
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(Msg::Error {
                code,
                acked,
                message,
            }) => {
                inc(&self.0.metrics.errors, 1);
                Err(FetchError::Remote {
                    peer: self.0.addr.clone(),
                    code,
                    acked,
                    message,
                })
            }
            Ok(m) => Ok(m),
            Err(e) => {
                inc(
                    if matches!(e, FetchError::Timeout { .. }) {
                        &self.0.metrics.timeouts
                    } else {
                        &self.0.metrics.errors
                    },
                    1,
                );
                Err(e)
            }
        }
    }

    fn protocol(&self, message: &str) -> FetchError {
        FetchError::Protocol {
            peer: self.0.addr.clone(),
            message: message.into(),
        }
    }

    /// The blocks named `hashes`, verified, one result per hash in order. Batched
    /// ([`ClientOptions::batch`] per request) and the batches pipelined.
    pub async fn fetch_blocks(&self, hashes: &[BlockHash]) -> Vec<Result<Bytes, FetchError>> {
        let mut out: Vec<Option<Result<Bytes, FetchError>>> = vec![None; hashes.len()];
        let mut todo: Vec<usize> = (0..hashes.len()).collect();
        let mut rounds = 0;
        while !todo.is_empty() {
            rounds += 1;
            let mut set = JoinSet::new();
            for chunk in todo.chunks(self.0.opts.batch.max(1)) {
                let idx = chunk.to_vec();
                let hs: Vec<BlockHash> = idx.iter().map(|&i| hashes[i]).collect();
                let me = self.clone();
                set.spawn(async move {
                    let r = me.request(&Msg::GetBlocks { hashes: hs }).await;
                    (idx, r)
                });
            }
            let mut again = Vec::new();
            while let Some(j) = set.join_next().await {
                let Ok((idx, r)) = j else {
                    continue; // a panicked task: its hashes stay unresolved, below
                };
                let items = match r {
                    Ok(Msg::Blocks { items }) if items.len() == idx.len() => items,
                    Ok(m) => {
                        let e = self.protocol(&format!("unexpected reply {}", m.name()));
                        for i in idx {
                            out[i] = Some(Err(e.clone()));
                        }
                        continue;
                    }
                    Err(e) => {
                        for i in idx {
                            out[i] = Some(Err(e.clone()));
                        }
                        continue;
                    }
                };
                // Verified a reply at a time: blocks of one size share SIMD lanes.
                let found: Vec<&[u8]> = items
                    .iter()
                    .filter_map(|it| match it {
                        BlockReply::Found(data) => Some(&data[..]),
                        _ => None,
                    })
                    .collect();
                let mut found_hashes = crate::index::hash_many(&found).into_iter();
                drop(found);
                for (i, it) in idx.into_iter().zip(items) {
                    out[i] = match it {
                        BlockReply::Found(data) => {
                            if found_hashes.next() == Some(hashes[i]) {
                                inc(&self.0.metrics.blocks_ok, 1);
                                inc(&self.0.metrics.bytes_ok, data.len() as u64);
                                Some(Ok(data))
                            } else {
                                self.penalise();
                                Some(Err(FetchError::Mismatch {
                                    peer: self.0.addr.clone(),
                                }))
                            }
                        }
                        BlockReply::NotFound => {
                            inc(&self.0.metrics.not_found, 1);
                            Some(Err(FetchError::NotFound {
                                peer: self.0.addr.clone(),
                            }))
                        }
                        BlockReply::Failed(message) => Some(Err(FetchError::Unavailable {
                            peer: self.0.addr.clone(),
                            message,
                        })),
                        BlockReply::Skipped => {
                            again.push(i);
                            None
                        }
                    };
                }
            }
            if rounds >= 8 && !again.is_empty() {
                for &i in &again {
                    out[i] = Some(Err(self.protocol("the peer kept skipping the block")));
                }
                again.clear();
            }
            todo = again;
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(self.protocol("request task failed"))))
            .collect()
    }

    /// Who holds `hashes` (an indexer; `local_only`: do not ask its parent).
    pub async fn holders(
        &self,
        hashes: &[BlockHash],
        local_only: bool,
    ) -> Result<Vec<Vec<Holder>>, FetchError> {
        let mut out = Vec::with_capacity(hashes.len());
        for chunk in hashes.chunks(super::proto::MAX_HASHES) {
            match self
                .request(&Msg::Holders {
                    local_only,
                    hashes: chunk.to_vec(),
                })
                .await?
            {
                Msg::HoldersReply { items } if items.len() == chunk.len() => out.extend(items),
                m => return Err(self.protocol(&format!("unexpected reply {}", m.name()))),
            }
        }
        Ok(out)
    }

    /// `image`'s manifest as `host` holds it, from this indexer (which asks up
    /// the tree when it lacks that holding), at `block_size` (`None`: the
    /// smallest `host` indexed), unless its digest is `known`. Other hosts'
    /// holdings of the same name are never the answer. Large manifests come in
    /// pieces; if the manifest changes between pieces the assembly starts again
    /// (at most 3 times).
    pub async fn manifest(
        &self,
        host: &str,
        image: &str,
        block_size: Option<u32>,
        known: Option<[u8; 32]>,
    ) -> Result<ManifestAnswer, FetchError> {
        let max_len = MAX_MANIFEST_PIECE.min(self.0.opts.max_frame.saturating_sub(1024));
        let mut assembly = ManifestAssembly::default();
        let (mut offset, mut restarts) = (0, 0);
        // Each round moves at least one byte forward (or restarts): bounded.
        loop {
            let reply = self
                .request(&Msg::GetManifest {
                    host: host.to_string(),
                    image: image.to_string(),
                    block_size: block_size.unwrap_or(0),
                    known: known.unwrap_or([0; 32]),
                    offset,
                    max_len,
                })
                .await?;
            let piece = match reply {
                Msg::ManifestReply { piece } => piece,
                m => return Err(self.protocol(&format!("unexpected reply {}", m.name()))),
            };
            match assembly.add(piece).map_err(|e| self.protocol(&e))? {
                Assembled::More(next) => offset = next,
                Assembled::Restart if restarts < 3 => {
                    restarts += 1;
                    offset = 0;
                }
                Assembled::Restart => {
                    return Err(self.protocol("the manifest kept changing while it was read"))
                }
                Assembled::Done(answer) => return Ok(answer),
            }
        }
    }

    /// Pushes changes of `node` to this (parent) indexer; returns the sequence
    /// number it acknowledged.
    pub async fn push(
        &self,
        node: &str,
        resync: bool,
        upto: u64,
        addrs: Vec<(String, String)>,
        changes: Vec<PushedChange>,
    ) -> Result<u64, FetchError> {
        match self
            .request(&Msg::Push {
                node: node.into(),
                resync,
                upto,
                addrs,
                changes,
            })
            .await?
        {
            Msg::Ack { seq } => Ok(seq),
            m => Err(self.protocol(&format!("unexpected reply {}", m.name()))),
        }
    }
}

impl Peer {
    /// Sends host load reports to this (parent) indexer, at most
    /// [`super::proto::MAX_REPORTS`] per request; returns how many it recorded.
    pub async fn report_metrics(&self, reports: Vec<HostReport>) -> Result<u64, FetchError> {
        let mut recorded = 0;
        for chunk in reports.chunks(super::proto::MAX_REPORTS) {
            match self
                .request(&Msg::HostMetrics {
                    reports: chunk.to_vec(),
                })
                .await?
            {
                Msg::Ack { seq } => recorded += seq,
                m => return Err(self.protocol(&format!("unexpected reply {}", m.name()))),
            }
        }
        Ok(recorded)
    }
}

/// A verified block and where it came from.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub data: Bytes,
    /// The address that served it.
    pub from: Arc<str>,
    /// Holders tried before, and why they failed.
    pub failed: Vec<FetchError>,
}

/// Peers by address, sharing options and metrics.
pub struct PeerClient {
    opts: Arc<ClientOptions>,
    metrics: Arc<ClientMetrics>,
    peers: Mutex<HashMap<String, Peer>>,
}

impl PeerClient {
    pub fn new(opts: ClientOptions) -> Self {
        Self {
            opts: Arc::new(opts),
            metrics: Arc::new(ClientMetrics::default()),
            peers: Mutex::new(HashMap::new()),
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// The peer at `addr` (`ip:port`), created on first use.
    pub fn peer(&self, addr: &str) -> Peer {
        let mut peers = self.peers.lock();
        if let Some(p) = peers.get(addr) {
            return p.clone();
        }
        peers
            .entry(addr.to_string())
            .or_insert_with(|| Peer::new(addr, self.opts.clone(), self.metrics.clone()))
            .clone()
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// `holders` (cheapest first) with penalised peers moved to the end, the
    /// order otherwise kept.
    pub fn order(&self, holders: &[String]) -> Vec<String> {
        let (mut good, bad): (Vec<String>, Vec<String>) = holders
            .iter()
            .cloned()
            .partition(|a| !self.peer(a).is_penalised());
        good.extend(bad);
        good
    }

    /// One block from the first holder (in cost order, penalised peers last) that
    /// serves it intact.
    pub async fn fetch_from_any(
        &self,
        hash: &BlockHash,
        holders_in_cost_order: &[String],
    ) -> Result<Fetched, FetchError> {
        self.fetch_many(&[(*hash, Arc::from(holders_in_cost_order))])
            .await
            .pop()
            .unwrap_or(Err(FetchError::NoHolders))
    }

    /// Many blocks, each with its holders in cost order: every round asks each
    /// block's current holder (blocks grouped per peer, peers in parallel); a block
    /// that failed moves on to its next holder. The error of a block that no holder
    /// served is the last holder's.
    pub async fn fetch_many(
        &self,
        wants: &[(BlockHash, Arc<[String]>)],
    ) -> Vec<Result<Fetched, FetchError>> {
        // Blocks of one batch mostly share their holder list (the same `Arc`):
        // order each distinct list once, not once per block.
        type Order = Arc<[Arc<str>]>;
        let mut orders: Vec<Order> = Vec::with_capacity(wants.len());
        let mut previous: Option<(&Arc<[String]>, Order)> = None;
        for (_, holders) in wants {
            let order = match &previous {
                Some((same, order)) if Arc::ptr_eq(same, holders) || same[..] == holders[..] => {
                    order.clone()
                }
                _ => self.order(holders).into_iter().map(Arc::from).collect(),
            };
            previous = Some((holders, order.clone()));
            orders.push(order);
        }
        let mut cursor = vec![0usize; wants.len()];
        let mut failed: Vec<Vec<FetchError>> = vec![Vec::new(); wants.len()];
        let mut out: Vec<Option<Result<Fetched, FetchError>>> = vec![None; wants.len()];
        loop {
            let mut groups: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
            for (i, o) in orders.iter().enumerate() {
                if out[i].is_some() {
                    continue;
                }
                match o.get(cursor[i]) {
                    Some(a) => match groups.get_mut(a) {
                        Some(g) => g.push(i),
                        None => {
                            groups.insert(a.clone(), vec![i]);
                        }
                    },
                    None => {
                        out[i] = Some(Err(failed[i]
                            .last()
                            .cloned()
                            .unwrap_or(FetchError::NoHolders)));
                    }
                }
            }
            if groups.is_empty() {
                break;
            }
            let asked: Vec<usize> = groups.values().flatten().copied().collect();
            let mut answered = vec![false; wants.len()];
            let mut set = JoinSet::new();
            for (addr, idx) in groups {
                let peer = self.peer(&addr);
                let hs: Vec<BlockHash> = idx.iter().map(|&i| wants[i].0).collect();
                set.spawn(async move { (addr, idx, peer.fetch_blocks(&hs).await) });
            }
            while let Some(j) = set.join_next().await {
                let Ok((addr, idx, rs)) = j else { continue };
                for (i, r) in idx.into_iter().zip(rs) {
                    answered[i] = true;
                    match r {
                        Ok(data) => {
                            out[i] = Some(Ok(Fetched {
                                data,
                                from: addr.clone(),
                                failed: std::mem::take(&mut failed[i]),
                            }));
                        }
                        Err(e) => {
                            failed[i].push(e);
                            cursor[i] += 1;
                        }
                    }
                }
            }
            // A failed task leaves its blocks unanswered: move them on too.
            for i in asked {
                if !answered[i] {
                    failed[i].push(FetchError::Protocol {
                        peer: orders[i][cursor[i]].to_string(),
                        message: "fetch task failed".into(),
                    });
                    cursor[i] += 1;
                }
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(FetchError::NoHolders)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            image: "iqn.t:lib/1".into(),
            size: 3 * 4096 + 10,
            block_size: 4096,
            blocks: vec![
                Some(BlockHash::of(b"a")),
                None,
                Some(BlockHash::of(b"b")),
                Some(BlockHash::of(b"c")),
            ],
        }
    }

    /// Feeds `assembly` the pieces the server would cut at `max_len`.
    fn drive(a: &mut ManifestAssembly, enc: &[u8], max_len: u32) -> Result<Assembled, String> {
        let mut offset = 0;
        loop {
            match a.add(ManifestPiece::of(enc, [0; 32], offset, max_len))? {
                Assembled::More(next) => offset = next,
                done => return Ok(done),
            }
        }
    }

    #[test]
    fn manifests_assemble_from_pieces_and_are_verified() {
        let m = manifest();
        let enc = m.encode();
        let digest = *blake3::hash(&enc).as_bytes();
        for max_len in [1, 7, 64, 1 << 20] {
            let mut a = ManifestAssembly::default();
            assert_eq!(
                drive(&mut a, &enc, max_len),
                Ok(Assembled::Done(ManifestAnswer::Found {
                    manifest: m.clone(),
                    digest
                }))
            );
        }
        let mut a = ManifestAssembly::default();
        assert_eq!(
            a.add(ManifestPiece::Absent),
            Ok(Assembled::Done(ManifestAnswer::Absent))
        );
        assert_eq!(
            a.add(ManifestPiece::Unchanged),
            Ok(Assembled::Done(ManifestAnswer::Unchanged))
        );
    }

    #[test]
    fn a_changed_digest_restarts_and_bad_pieces_are_errors() {
        let enc = manifest().encode();
        let mut a = ManifestAssembly::default();
        assert_eq!(
            a.add(ManifestPiece::of(&enc, [0; 32], 0, 10)),
            Ok(Assembled::More(10))
        );
        // The next piece is of another manifest: start again.
        let mut other = manifest();
        other.blocks[1] = Some(BlockHash::of(b"z"));
        let other = other.encode();
        assert_eq!(
            a.add(ManifestPiece::of(&other, [0; 32], 10, 10)),
            Ok(Assembled::Restart)
        );
        // A piece at the wrong offset.
        let mut a = ManifestAssembly::default();
        assert!(a.add(ManifestPiece::of(&enc, [0; 32], 5, 10)).is_err());
        // Bytes that do not hash to the digest.
        let mut a = ManifestAssembly::default();
        let forged = ManifestPiece::Part {
            digest: [1; 32],
            total: enc.len() as u64,
            offset: 0,
            data: Bytes::from(enc.clone()),
        };
        assert!(a.add(forged).is_err());
        // An empty piece before the end, and a total over the limit.
        let mut a = ManifestAssembly::default();
        let empty = ManifestPiece::Part {
            digest: [1; 32],
            total: 5,
            offset: 0,
            data: Bytes::new(),
        };
        assert!(a.add(empty).is_err());
        let huge = ManifestPiece::Part {
            digest: [1; 32],
            total: MAX_MANIFEST_BYTES + 1,
            offset: 0,
            data: Bytes::from_static(b"x"),
        };
        assert!(ManifestAssembly::default().add(huge).is_err());
    }
}
