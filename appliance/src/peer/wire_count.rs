//! Bytes a peer connection carried on the wire: the socket's reader and writer
//! are wrapped (`tokio_util::io::InspectReader`/`InspectWriter`) so that every
//! byte through them is counted — handshake, frame headers and sealed records
//! included, i.e. the connection's TCP payload, what the datapath's per-flow
//! counters see. A build reports them per source, so its traffic can be checked
//! against the BPF counters link by link.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::{InspectReader, InspectWriter};

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

/// `rd`, counting what it reads into `wire.received`.
pub fn counted_reader<R: AsyncRead>(rd: R, wire: &Arc<WireBytes>) -> InspectReader<R, impl FnMut(&[u8])> {
    let wire = wire.clone();
    InspectReader::new(rd, move |b: &[u8]| {
        wire.received.fetch_add(b.len() as u64, Ordering::Relaxed);
    })
}

/// `wr`, counting what it writes into `wire.sent`.
pub fn counted_writer<W: AsyncWrite>(wr: W, wire: &Arc<WireBytes>) -> InspectWriter<W, impl FnMut(&[u8])> {
    let wire = wire.clone();
    InspectWriter::new(wr, move |b: &[u8]| {
        wire.sent.fetch_add(b.len() as u64, Ordering::Relaxed);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn every_byte_through_is_counted() {
        let wire = Arc::new(WireBytes::default());
        let (a, b) = tokio::io::duplex(64);
        let (a_rd, a_wr) = tokio::io::split(a);
        let (mut a_rd, mut a_wr) = (counted_reader(a_rd, &wire), counted_writer(a_wr, &wire));
        let mut b = b;
        a_wr.write_all(b"hello world").await.unwrap();
        let mut got = [0u8; 11];
        b.read_exact(&mut got).await.unwrap();
        b.write_all(b"0123456789").await.unwrap();
        let mut back = [0u8; 10];
        a_rd.read_exact(&mut back).await.unwrap();
        assert_eq!(wire.sent.load(Ordering::Relaxed), 11);
        assert_eq!(wire.received.load(Ordering::Relaxed), 10);
        assert_eq!(wire.total(), 21);
    }
}
