//! Kernel handoff of a relayed connection: once a session needs nothing more
//! from the splicer (no served LUN behind its target), the splicer closes its
//! two sockets silently and the steering program forwards the initiator's and
//! the target's packets itself, rewriting each into the numbering the other end
//! expects (sequence and acknowledgement numbers, SACK edges, timestamps, the
//! window's scale). These are the keys and values of the `HANDOFFS` map, one
//! entry per direction.

use core::net::SocketAddr;

use crate::flow::raw_addr;

/// One direction of a handed-off connection: the packets this key matches (by
/// their own source and destination) are rewritten with its [`HandoffRewrite`].
/// Addresses are laid out as in [`crate::FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HandoffKey {
    /// [`crate::flow::FAMILY_IPV4`] or [`crate::flow::FAMILY_IPV6`].
    pub family: u8,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a #[repr(C)] map type: public so both sides build values as literals, never read"
    )]
    pub _pad: [u8; 3],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl HandoffKey {
    /// The direction from `source` to `destination`.
    pub fn new(source: SocketAddr, destination: SocketAddr) -> Self {
        let (family, saddr) = raw_addr(source.ip());
        let (_, daddr) = raw_addr(destination.ip());
        Self {
            family,
            _pad: [0; 3],
            sport: source.port(),
            dport: destination.port(),
            saddr,
            daddr,
        }
    }

    /// The opposite direction of the same connection.
    #[must_use]
    pub fn reversed(&self) -> Self {
        Self {
            family: self.family,
            _pad: [0; 3],
            sport: self.dport,
            dport: self.sport,
            saddr: self.daddr,
            daddr: self.saddr,
        }
    }
}

/// How one direction's packets are rewritten. User space fills the numbers at
/// handoff; the kernel fills the lazily learned timestamp deltas and the flags
/// it observes. All arithmetic is modulo 2^32, as TCP's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandoffRewrite {
    /// Added to the sequence number.
    pub seq_delta: u32,
    /// Added to the acknowledgement number and to every SACK edge.
    pub ack_delta: u32,
    /// Added to `TSval` once `tsval_known` (learned from the first packet).
    pub tsval_delta: u32,
    /// Added to `TSecr` once `tsecr_known` (the opposite direction's
    /// `tsval_delta`, negated); until then `TSecr` is sent as 0 ("no echo").
    pub tsecr_delta: u32,
    /// The timestamp clock of the splicer socket that faced this direction's
    /// receiver, as an offset from `CLOCK_MONOTONIC` in milliseconds: the first
    /// packet's `TSval` is mapped to that socket's clock now, so the receiver
    /// sees timestamps continue from the last one it had.
    pub receiver_ts_offset_ms: u32,
    /// An acknowledgement at or past this (the sender's own numbering of what
    /// it receives) sets `acked`.
    pub watch_ack: u32,
    /// The window field is shifted left by this much (right when negative):
    /// the sender's window scale minus the one the receiver applies.
    pub window_shift: i8,
    /// Non-zero: both connections carry timestamps.
    pub timestamps: u8,
    /// Set by the kernel once `tsval_delta` is learned.
    pub tsval_known: u8,
    /// Set by the kernel once `tsecr_delta` is learned.
    pub tsecr_known: u8,
    /// Set by the kernel: an acknowledgement reached `watch_ack`.
    pub acked: u8,
    /// Set by the kernel: a FIN or RST passed in this direction.
    pub closing: u8,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a #[repr(C)] map type: public so both sides build values as literals, never read"
    )]
    pub _pad: [u8; 2],
    /// Set by the kernel: `CLOCK_MONOTONIC` ns of the last packet rewritten.
    pub last_seen_ns: u64,
}

/// Largest window scale TCP allows (RFC 7323 §2.3).
pub const MAX_WINDOW_SCALE: i8 = 14;

/// The window field a receiver applying its own scale must see for the window
/// a sender advertised with its scale: `field << shift` (right when negative),
/// capped at the field's width.
#[expect(
    clippy::inline_always,
    reason = "called from the kernel programs, which must not make a BPF-to-BPF call for it"
)]
#[inline(always)]
pub fn rescale_window(field: u16, shift: i8) -> u16 {
    let field = u32::from(field);
    let shift = shift.clamp(-MAX_WINDOW_SCALE, MAX_WINDOW_SCALE);
    let scaled = if shift >= 0 {
        field << shift.unsigned_abs()
    } else {
        field >> shift.unsigned_abs()
    };
    if scaled > 0xffff {
        0xffff
    } else {
        scaled as u16
    }
}

const _: () = assert!(core::mem::size_of::<HandoffKey>() == 40);
const _: () = assert!(core::mem::size_of::<HandoffRewrite>() == 40);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_keeps_its_size_across_scales() {
        assert_eq!(rescale_window(1000, 0), 1000);
        // Sender scale 7, receiver applies 9: the same bytes need a smaller field.
        assert_eq!(rescale_window(1024, -2), 256);
        assert_eq!(rescale_window(256, 2), 1024);
        assert_eq!(rescale_window(0x8000, 3), 0xffff);
        assert_eq!(rescale_window(3, -4), 0);
        assert_eq!(rescale_window(1, 100), 1 << 14);
    }

    #[test]
    fn reversed_swaps_ends() {
        let a: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:3260".parse().unwrap();
        let k = HandoffKey::new(a, b);
        assert_eq!(k.reversed(), HandoffKey::new(b, a));
        assert_eq!(k.reversed().reversed(), k);
    }
}
