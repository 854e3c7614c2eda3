//! The splicer's outside: accept steered connections, connect upstream
//! transparently, then hand the pair to the iSCSI-aware inside
//! ([`super::connection::splice_iscsi`]) for iSCSI ports, or to the plain byte
//! relay ([`super::bytes::relay`]) for anything else (and when
//! `splicer.iscsi_aware = false`).
//!
//! The accept loop is also the listener's proof of life: it writes the
//! listener's heartbeat (`steer::FailOpen::beat`), so a stopped or wedged daemon
//! stops getting new connections within a second; it counts connections against
//! the caps, relays over-cap ones as bytes, and when out of file descriptors
//! stops new connections and resets the ones already waiting in its backlog.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info_span, warn, Instrument};

use nearblock_common::failopen::HEARTBEAT_INTERVAL_NS;

use super::bytes::relay;
use super::catalog::Catalog;
use super::connection::{splice_iscsi, ConnectionError, SpliceContext};
use super::stats::SplicerStats;
use crate::steer::{self, Admit, FailOpen, Keepalive};

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
    /// Where sessions with nothing to serve are handed to the kernel (`None`:
    /// they stay in the user-space relay).
    pub handoff: Option<Arc<crate::datapath::HandoffMap>>,
    /// The HTTP front end (`None`: HTTP ports are relayed as bytes).
    pub http: Option<Arc<super::http::HttpContext>>,
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
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
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
    let http = opts
        .http
        .as_ref()
        .filter(|h| admit != Admit::RelayOverCap && h.ports.contains(&target.port()));
    if let Some(http) = http {
        debug!("spliced (HTTP)");
        if let Err(e) = super::http::exchange::serve(client, upstream, http).await {
            stats.http_aborted.fetch_add(1, Ordering::Relaxed);
            debug!(cause = %e, "HTTP connection closed");
        }
        return;
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
        handoff: opts.handoff.clone(),
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
