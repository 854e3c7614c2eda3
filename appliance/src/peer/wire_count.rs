//! Bytes a peer connection carried on the wire: a reader or writer wrapped so
//! that every byte through it is counted — handshake, frame headers and sealed
//! records included, i.e. the connection's TCP payload, what the datapath's
//! per-flow counters see. A build reports them per source, so its traffic can be
//! checked against the BPF counters link by link.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes received and sent, over every connection to one peer.
#[derive(Debug, Default)]
pub struct WireBytes {
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

impl WireBytes {
    /// Received plus sent.
    pub fn total(&self) -> u64 {
        self.received.load(Ordering::Relaxed) + self.sent.load(Ordering::Relaxed)
    }
}

/// `inner`, counting into `wire` (reads as received, writes as sent).
pub struct Counted<T> {
    inner: T,
    wire: Arc<WireBytes>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, wire: Arc<WireBytes>) -> Self {
        Self { inner, wire }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.wire.received.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.wire.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn every_byte_through_is_counted() {
        let wire = Arc::new(WireBytes::default());
        let (a, b) = tokio::io::duplex(64);
        let mut a = Counted::new(a, wire.clone());
        let mut b = b;
        a.write_all(b"hello world").await.unwrap();
        let mut got = [0u8; 11];
        b.read_exact(&mut got).await.unwrap();
        b.write_all(b"0123456789").await.unwrap();
        let mut back = [0u8; 10];
        a.read_exact(&mut back).await.unwrap();
        assert_eq!(wire.sent.load(Ordering::Relaxed), 11);
        assert_eq!(wire.received.load(Ordering::Relaxed), 10);
        assert_eq!(wire.total(), 21);
    }
}
