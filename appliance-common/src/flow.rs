//! Flow identity and counters.
//!
//! A flow is directional: the two directions of one TCP connection are two keys, each
//! counted on the interface where its packets enter the appliance.

/// Address family tag stored in [`FlowKey::family`].
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag stored in [`FlowKey::family`].
pub const FAMILY_IPV6: u8 = 6;

/// Directional 5-tuple plus the ingress interface. Ports are in host byte order;
/// IPv4 addresses occupy the first 4 bytes of the 16-byte fields (the rest zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub ifindex: u32,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// IP protocol number (6 = TCP; only TCP is classified today).
    pub proto: u8,
    /// Outer 802.1Q VLAN id, 0 when untagged.
    pub vlan: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Counters of one directional flow: a per-CPU map value, summed by user space
/// (`first_seen_ns` is the minimum over CPUs, `last_seen_ns` the maximum).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub packets: u64,
    /// Bytes of whole frames as seen by XDP (Ethernet header included).
    pub frame_bytes: u64,
    /// TCP payload bytes that crossed the link, retransmissions included.
    pub payload_bytes: u64,
    /// `bpf_ktime_get_ns` of the first and latest packet.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// OR of every TCP flag byte seen (SYN, FIN, RST, ...).
    pub tcp_flags: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a #[repr(C)] map type: public so both sides build values as literals, never read"
    )]
    pub _pad: u32,
}

/// Sequence-space progress of one directional flow (a shared, not per-CPU, map
/// value). `new_bytes` counts only payload that moved the highest sequence number
/// seen forward, so it is the application's byte count whatever the order in which
/// CPUs see segments and however often they are retransmitted; the difference to
/// `FlowCounters::payload_bytes` is retransmitted payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSeq {
    /// Highest end sequence number seen (seq + payload length), serial arithmetic.
    pub max_end: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a #[repr(C)] map type: public so both sides build values as literals, never read"
    )]
    pub _pad: u32,
    pub new_bytes: u64,
}

/// Per-interface byte counters (a per-CPU map value; user space sums over CPUs).
/// `rx_*` are written by XDP, `tx_*` by the TC egress program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// A portal (address and port) whose new connections are steered: the key of
/// the `SERVED_PORTALS` map. The address is laid out as in [`FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortalKey {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a #[repr(C)] map type: public so both sides build values as literals, never read"
    )]
    pub _pad: u8,
    /// Host byte order.
    pub port: u16,
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<PortalKey>() == 20);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 44);
const _: () = assert!(core::mem::align_of::<FlowKey>() == 4);
const _: () = assert!(core::mem::size_of::<FlowCounters>() == 48);
const _: () = assert!(core::mem::size_of::<IfCounters>() == 32);
const _: () = assert!(core::mem::size_of::<FlowSeq>() == 16);
