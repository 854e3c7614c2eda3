//! The splicer's outside: accept steered connections, connect upstream
//! transparently, then hand the pair to the iSCSI-aware inside
//! ([`super::connection::splice_iscsi`]) for iSCSI ports, or to the plain byte
//! [`relay`] for anything else (and when `splicer.iscsi_aware = false`).
//!
//! The accept loop is also the listener's proof of life: it writes the
//! listener's heartbeat (`steer::FailOpen::beat`), so a stopped or wedged daemon
//! stops getting new connections within a second; it counts connections against
//! the caps, relays over-cap ones as bytes, and when out of file descriptors
//! stops new connections and resets the ones already waiting in its backlog.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info_span, warn, Instrument};

use nearblock_common::failopen::HEARTBEAT_INTERVAL_NS;

use super::catalog::Catalog;
use super::connection::{splice_iscsi, ConnectionError, SpliceContext};
use crate::steer::{self, Admit, FailOpen, Keepalive};

/// Relay buffer per direction: large enough for a whole 256 KiB iSCSI burst.
const RELAY_BUF: usize = 256 * 1024;

/// Splicer counters (exported in status and metrics).
#[derive(Debug, Default)]
pub struct SplicerStats {
    /// iSCSI connections handed to the byte relay after login (no served LUN).
    pub raw_relayed: AtomicU64,
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub bytes_to_target: AtomicU64,
    pub bytes_to_initiator: AtomicU64,
    /// Connections closed because a PDU could not be decoded or framed.
    pub protocol_errors: AtomicU64,
    /// Sessions whose login text could be read more than one way (passed through).
    pub sessions_ambiguous: AtomicU64,
    /// Served LUNs a session stopped being served (it may have written them, or
    /// overflowed a per-session bound), counted per session and LUN.
    pub sessions_tainted: AtomicU64,
    /// Connections accepted over a connection cap, relayed as bytes.
    pub over_cap_relayed: AtomicU64,
    /// Accepts and upstream sockets that failed for want of file descriptors.
    pub fd_exhausted: AtomicU64,
    /// READs of served LUNs answered locally, per design.
    pub reads_served_shadow: AtomicU64,
    pub reads_served_local: AtomicU64,
    /// READs of served LUNs passed through to the library (not all blocks at hand).
    pub reads_passed: AtomicU64,
    /// Per-block provenance of served READs (blocks touched, bytes sent), by
    /// [`crate::fetch::SourceClass`] index.
    pub served_blocks: [AtomicU64; 5],
    pub served_bytes: [AtomicU64; 5],
    /// Bytes served from blocks fetched from peers, by hop distance.
    pub hop_bytes: [AtomicU64; crate::fetch::MAX_HOPS + 1],
    /// Bytes of served LUNs' READs the library answered.
    pub library_bytes: AtomicU64,
    /// Blocks verified against the manifest and inserted into the cache.
    pub learned_blocks: AtomicU64,
    /// Library blocks whose hash did not match the manifest (the LUN is tainted).
    pub verify_failures: AtomicU64,
    /// The block cache, for its counters.
    pub cache: std::sync::OnceLock<Arc<crate::fetch::BlockCache>>,
    /// The peer fetcher, for its counters.
    pub sourcing: std::sync::OnceLock<Arc<crate::fetch::Sourcing>>,
    /// The served LUNs, for their prefetch status.
    pub catalog: std::sync::OnceLock<Arc<super::catalog::Catalog>>,
}

/// Blocks and bytes served from one source class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Served {
    pub blocks: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SplicerSnapshot {
    #[serde(default)]
    pub raw_relayed: u64,
    pub accepted: u64,
    pub active: u64,
    pub upstream_failed: u64,
    pub bytes_to_target: u64,
    pub bytes_to_initiator: u64,
    #[serde(default)]
    pub protocol_errors: u64,
    #[serde(default)]
    pub sessions_ambiguous: u64,
    #[serde(default)]
    pub sessions_tainted: u64,
    pub over_cap_relayed: u64,
    #[serde(default)]
    pub fd_exhausted: u64,
    #[serde(default)]
    pub reads_served_shadow: u64,
    #[serde(default)]
    pub reads_served_local: u64,
    #[serde(default)]
    pub reads_passed: u64,
    #[serde(default)]
    pub zero_blocks: u64,
    #[serde(default)]
    pub zero_bytes: u64,
    #[serde(default)]
    pub cache_blocks: u64,
    #[serde(default)]
    pub cache_bytes: u64,
    #[serde(default)]
    pub library_bytes: u64,
    #[serde(default)]
    pub learned_blocks: u64,
    #[serde(default)]
    pub verify_failures: u64,
    #[serde(default)]
    pub cache: Option<crate::fetch::CacheSnapshot>,
    /// Served blocks by source: zero, cache, rack, other_rack, library.
    #[serde(default)]
    pub served: std::collections::BTreeMap<crate::fetch::SourceClass, Served>,
    /// Bytes served from fetched blocks by the hop distance of their source.
    #[serde(default)]
    pub served_bytes_by_hops: std::collections::BTreeMap<u8, u64>,
    #[serde(default)]
    pub sourcing: Option<crate::fetch::SourcingSnapshot>,
    /// Prefetches of LUNs in prefetch mode (latest per LUN).
    #[serde(default)]
    pub prefetch: Vec<crate::fetch::prefetch::PrefetchStatus>,
    /// Every declared LUN: served or not and why, its manifest.
    #[serde(default)]
    pub luns: Vec<super::catalog::LunStatus>,
}

impl SplicerStats {
    /// Add one served READ's provenance.
    pub fn count_provenance(&self, prov: &crate::fetch::Provenance) {
        for (i, c) in self.served_blocks.iter().enumerate() {
            c.fetch_add(prov.blocks[i], Ordering::Relaxed);
        }
        for (i, c) in self.served_bytes.iter().enumerate() {
            c.fetch_add(prov.bytes[i], Ordering::Relaxed);
        }
        for (i, c) in self.hop_bytes.iter().enumerate() {
            if prov.hop_bytes[i] > 0 {
                c.fetch_add(prov.hop_bytes[i], Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(&self) -> SplicerSnapshot {
        use crate::fetch::SourceClass;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let served_of = |class: SourceClass| Served {
            blocks: get(&self.served_blocks[class.index()]),
            bytes: get(&self.served_bytes[class.index()]),
        };
        SplicerSnapshot {
            raw_relayed: get(&self.raw_relayed),
            accepted: get(&self.accepted),
            active: get(&self.active),
            upstream_failed: get(&self.upstream_failed),
            bytes_to_target: get(&self.bytes_to_target),
            bytes_to_initiator: get(&self.bytes_to_initiator),
            protocol_errors: get(&self.protocol_errors),
            sessions_ambiguous: get(&self.sessions_ambiguous),
            sessions_tainted: get(&self.sessions_tainted),
            over_cap_relayed: get(&self.over_cap_relayed),
            fd_exhausted: get(&self.fd_exhausted),
            reads_served_shadow: get(&self.reads_served_shadow),
            reads_served_local: get(&self.reads_served_local),
            reads_passed: get(&self.reads_passed),
            zero_blocks: served_of(SourceClass::Zero).blocks,
            zero_bytes: served_of(SourceClass::Zero).bytes,
            cache_blocks: served_of(SourceClass::Cache).blocks,
            cache_bytes: served_of(SourceClass::Cache).bytes,
            served: SourceClass::ALL
                .iter()
                .map(|&c| (c, served_of(c)))
                .collect(),
            served_bytes_by_hops: self
                .hop_bytes
                .iter()
                .enumerate()
                .map(|(h, c)| (h as u8, get(c)))
                .filter(|(_, v)| *v > 0)
                .collect(),
            sourcing: self.sourcing.get().map(|s| s.snapshot()),
            prefetch: self
                .catalog
                .get()
                .map(|c| c.prefetches())
                .unwrap_or_default(),
            luns: self.catalog.get().map(|c| c.statuses()).unwrap_or_default(),
            library_bytes: get(&self.library_bytes),
            learned_blocks: get(&self.learned_blocks),
            verify_failures: get(&self.verify_failures),
            cache: self.cache.get().map(|c| c.snapshot()),
        }
    }
}

/// How upstream connections are made.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    pub dscp: u8,
    pub connect_timeout: Duration,
    /// Destination ports spliced PDU by PDU (iSCSI); others are relayed as bytes.
    pub iscsi_ports: Vec<u16>,
    /// Served LUNs and the block cache.
    pub catalog: Arc<Catalog>,
    /// Keepalive and user timeout of both sockets of a connection.
    pub keepalive: Keepalive,
}

/// Which listener an accept loop serves, and the fail-open state it reports to.
pub struct Listening {
    /// `LISTENER_V4` or `LISTENER_V6`: the listener's SockMap and heartbeat slot.
    pub slot: u32,
    pub fail_open: Arc<FailOpen>,
}

/// After a failed accept that consumed nothing, wait this long before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Accept steered connections until `stop` turns true, writing the listener's
/// heartbeat while running.
pub async fn accept_loop(
    listener: TcpListener,
    upstream: UpstreamOptions,
    stats: Arc<SplicerStats>,
    mut stop: watch::Receiver<bool>,
    listening: Listening,
) {
    let Listening { slot, fail_open } = listening;
    // The heartbeat is written from this loop, not from a thread of its own: what
    // must be alive for a steered SYN to be answered is exactly this task being
    // polled (a separate thread would keep beating while the runtime is wedged).
    let mut heartbeat = tokio::time::interval(Duration::from_nanos(HEARTBEAT_INTERVAL_NS));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => {
                if *stop.borrow() { return; }
            }
            _ = heartbeat.tick() => fail_open.beat(slot),
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if retry_at.is_some() => retry_at = None,
            accepted = listener.accept(), if retry_at.is_none() => match accepted {
                Ok((client, peer)) => {
                    let (admit, admitted) = fail_open.admit(peer.ip());
                    if !fail_open.accepting() {
                        // At the total cap: tell the kernel now, not at the next tick.
                        fail_open.beat(slot);
                    }
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    if admit == Admit::RelayOverCap {
                        stats.over_cap_relayed.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Err(e) = steer::set_keepalive(&client, &upstream.keepalive) {
                        debug!(cause = %e, "keepalive on the initiator's socket");
                    }
                    let upstream = upstream.clone();
                    let stats = stats.clone();
                    let fail_open = fail_open.clone();
                    let target = client.local_addr().ok();
                    let span = info_span!("flow", initiator = %peer, target = ?target);
                    tokio::spawn(
                        async move {
                            stats.active.fetch_add(1, Ordering::Relaxed);
                            splice_connection(client, peer, &upstream, &stats, admit, &fail_open).await;
                            stats.active.fetch_sub(1, Ordering::Relaxed);
                            drop(admitted);
                        }
                        .instrument(span),
                    );
                }
                Err(e) if steer::is_fd_exhaustion(&e) => {
                    stats.fd_exhausted.fetch_add(1, Ordering::Relaxed);
                    fail_open.note_fd_exhaustion();
                    // Tell the kernel now, not at the next tick.
                    fail_open.beat(slot);
                    if !reset_one_pending(&listener, &fail_open) {
                        // Nothing was taken off the backlog: do not spin on it.
                        retry_at = Some(tokio::time::Instant::now() + ACCEPT_RETRY);
                    }
                }
                Err(e) => {
                    warn!(cause = %e, "accept failed");
                    retry_at = Some(tokio::time::Instant::now() + ACCEPT_RETRY);
                }
            }
        }
    }
}

/// Out of descriptors, with a connection waiting in the backlog: release the
/// spare descriptor, accept that connection and reset it, take the spare again.
/// Its initiator sees a reset and retries; the retry is forwarded untouched (the
/// heartbeat now says "not accepting"). Left in the backlog it would wait
/// unanswered. Returns whether a connection was taken off the backlog.
fn reset_one_pending(listener: &TcpListener, fail_open: &FailOpen) -> bool {
    let Some(spare) = fail_open.take_spare() else {
        return false;
    };
    drop(spare);
    let taken = match socket2::SockRef::from(listener).accept() {
        Ok((conn, peer)) => {
            // SO_LINGER 0: close with a reset, not a FIN the initiator would wait on.
            let _ = conn.set_linger(Some(Duration::ZERO));
            drop(conn);
            debug!(initiator = ?peer.as_socket(), "out of file descriptors: connection reset");
            true
        }
        Err(_) => false,
    };
    fail_open.restore_spare();
    taken
}

async fn splice_connection(
    client: TcpStream,
    initiator: SocketAddr,
    opts: &UpstreamOptions,
    stats: &Arc<SplicerStats>,
    admit: Admit,
    fail_open: &FailOpen,
) {
    // With bpf_sk_assign the accepted socket's local address is the original
    // destination (the library's portal).
    let target = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(cause = %e, "no original destination");
            return;
        }
    };
    let upstream = match steer::transparent_connect(
        initiator,
        target,
        opts.dscp,
        opts.connect_timeout,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            // The initiator sees its connection close, exactly as if the
            // library had refused it.
            stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            if e.is_fd_exhaustion() {
                stats.fd_exhausted.fetch_add(1, Ordering::Relaxed);
                fail_open.note_fd_exhaustion();
            }
            warn!(cause = %e, "upstream connect failed");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Err(e) = steer::set_keepalive(&upstream, &opts.keepalive) {
        debug!(cause = %e, "keepalive on the upstream socket");
    }
    if admit == Admit::RelayOverCap || !opts.iscsi_ports.contains(&target.port()) {
        debug!(?admit, "spliced (bytes)");
        let (to_target, to_initiator) = relay(client, upstream, stats).await;
        debug!(to_target, to_initiator, "flow ended");
        return;
    }
    debug!("spliced (iSCSI)");
    let ctx = SpliceContext {
        catalog: opts.catalog.clone(),
        stats: stats.clone(),
    };
    match splice_iscsi(client, upstream, &ctx).await {
        Ok(()) => debug!("flow ended"),
        Err(e) => {
            if matches!(
                e,
                ConnectionError::Decode { .. }
                    | ConnectionError::Encode(_)
                    | ConnectionError::TooManyTasks
                    | ConnectionError::LoginTimeout(_)
            ) {
                stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            warn!(cause = %e, "connection closed");
        }
    }
}

/// Relay both directions until both have ended; an error in one direction tears
/// down the other (a clean EOF is passed on as a half-close).
pub async fn relay(client: TcpStream, upstream: TcpStream, stats: &SplicerStats) -> (u64, u64) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, &stats.bytes_to_target);
    let down = pump(ur, cw, &stats.bytes_to_initiator);
    tokio::pin!(up, down);
    let mut up_done = None;
    let mut down_done = None;
    while up_done.is_none() || down_done.is_none() {
        tokio::select! {
            r = &mut up, if up_done.is_none() => {
                let failed = r.is_err();
                up_done = Some(r.unwrap_or_else(|(n, _)| n));
                if failed { break; }
            }
            r = &mut down, if down_done.is_none() => {
                let failed = r.is_err();
                down_done = Some(r.unwrap_or_else(|(n, _)| n));
                if failed { break; }
            }
        }
    }
    (up_done.unwrap_or(0), down_done.unwrap_or(0))
}

/// Copy until EOF, then shut the write side down. Returns the byte count, also
/// on error.
async fn pump<R, W>(mut r: R, mut w: W, counter: &AtomicU64) -> Result<u64, (u64, std::io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => {
                let _ = w.shutdown().await;
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) => return Err((total, e)),
        };
        if let Err(e) = w.write_all(&buf[..n]).await {
            return Err((total, e));
        }
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay carries both directions intact and passes a half-close on.
    #[tokio::test]
    async fn relays_both_directions_and_half_close() {
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(a_addr).await.unwrap();
            let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            back
        });
        let server = tokio::spawn(async move {
            let (mut s, _) = lb.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got.reverse();
            s.write_all(&got).await.unwrap();
        });
        let (c, _) = la.accept().await.unwrap();
        let u = TcpStream::connect(b_addr).await.unwrap();
        let stats = SplicerStats::default();
        let (up, down) = relay(c, u, &stats).await;
        let back = client.await.unwrap();
        server.await.unwrap();
        let mut expect: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        expect.reverse();
        assert_eq!(back, expect);
        assert_eq!((up, down), (1_000_000, 1_000_000));
        assert_eq!(stats.snapshot().bytes_to_target, 1_000_000);
    }
}
