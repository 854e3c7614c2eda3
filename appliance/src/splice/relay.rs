//! The splicer's outside: accept steered connections, connect upstream
//! transparently, and relay both directions with backpressure. The iSCSI-aware
//! splicer replaces [`relay`] (the inside), not the accept/connect around it.

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

use crate::steer;

/// Relay buffer per direction: large enough for a whole 256 KiB iSCSI burst.
const RELAY_BUF: usize = 256 * 1024;

/// Splicer counters (exported in status and metrics).
#[derive(Debug, Default)]
pub struct SplicerStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub bytes_to_target: AtomicU64,
    pub bytes_to_initiator: AtomicU64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SplicerSnapshot {
    pub accepted: u64,
    pub active: u64,
    pub upstream_failed: u64,
    pub bytes_to_target: u64,
    pub bytes_to_initiator: u64,
}

impl SplicerStats {
    pub fn snapshot(&self) -> SplicerSnapshot {
        SplicerSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            upstream_failed: self.upstream_failed.load(Ordering::Relaxed),
            bytes_to_target: self.bytes_to_target.load(Ordering::Relaxed),
            bytes_to_initiator: self.bytes_to_initiator.load(Ordering::Relaxed),
        }
    }
}

/// How upstream connections are made.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    pub dscp: u8,
    pub connect_timeout: Duration,
}

/// Accept steered connections until `stop` turns true.
pub async fn accept_loop(
    listener: TcpListener,
    upstream: UpstreamOptions,
    stats: Arc<SplicerStats>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => {
                if *stop.borrow() { return; }
            }
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let upstream = upstream.clone();
                    let stats = stats.clone();
                    let target = client.local_addr().ok();
                    let span = info_span!("flow", initiator = %peer, target = ?target);
                    tokio::spawn(
                        async move {
                            stats.active.fetch_add(1, Ordering::Relaxed);
                            splice_connection(client, peer, &upstream, &stats).await;
                            stats.active.fetch_sub(1, Ordering::Relaxed);
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn splice_connection(
    client: TcpStream,
    initiator: SocketAddr,
    opts: &UpstreamOptions,
    stats: &SplicerStats,
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
            warn!(cause = %e, "upstream connect failed");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    debug!("spliced");
    let (to_target, to_initiator) = relay(client, upstream, stats).await;
    debug!(to_target, to_initiator, "flow ended");
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
