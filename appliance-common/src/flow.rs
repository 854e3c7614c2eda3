//! Flow identity and counters.
//!
//! A flow is directional: the two directions of one TCP connection are two keys, each
//! counted on the interface where its packets enter the appliance.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Address family tag stored in [`FlowKey::family`].
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag stored in [`FlowKey::family`].
pub const FAMILY_IPV6: u8 = 6;

/// An address as every map key holds it: the family tag and 16 bytes, an IPv4
/// address in the first four (the rest zero).
pub fn raw_addr(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut raw = [0u8; 16];
    match ip {
        IpAddr::V4(a) => {
            raw[..4].copy_from_slice(&a.octets());
            (FAMILY_IPV4, raw)
        }
        IpAddr::V6(a) => (FAMILY_IPV6, a.octets()),
    }
}

/// The address a map key's family tag and 16 bytes hold ([`raw_addr`]'s inverse).
pub fn ip_of(family: u8, raw: &[u8; 16]) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*raw))
    }
}

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

impl From<SocketAddr> for PortalKey {
    fn from(portal: SocketAddr) -> Self {
        let (family, addr) = raw_addr(portal.ip());
        Self {
            family,
            _pad: 0,
            port: portal.port(),
            addr,
        }
    }
}

impl PortalKey {
    /// The portal this key names.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(ip_of(self.family, &self.addr), self.port)
    }
}

const _: () = assert!(core::mem::size_of::<PortalKey>() == 20);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 44);
const _: () = assert!(core::mem::align_of::<FlowKey>() == 4);
const _: () = assert!(core::mem::size_of::<FlowCounters>() == 48);
const _: () = assert!(core::mem::size_of::<IfCounters>() == 32);
const _: () = assert!(core::mem::size_of::<FlowSeq>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portal_keys_round_trip_both_families() {
        for p in ["198.18.0.1:3260", "[fd00:6e62::1]:3260"] {
            let portal: SocketAddr = p.parse().unwrap();
            assert_eq!(PortalKey::from(portal).socket_addr(), portal);
        }
        let k = PortalKey::from("198.18.0.1:3260".parse::<SocketAddr>().unwrap());
        assert_eq!((k.family, &k.addr[4..]), (FAMILY_IPV4, &[0u8; 12][..]));
    }
}
