//! The plain byte relay: both directions copied until both end, a clean EOF
//! passed on as a half-close. For non-iSCSI ports, over-cap connections, and
//! iSCSI sessions with nothing to serve once logged in.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::stats::SplicerStats;

/// Relay buffer per direction: large enough for a whole 256 KiB iSCSI burst.
const RELAY_BUF: usize = 256 * 1024;

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
    use tokio::net::TcpListener;

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
