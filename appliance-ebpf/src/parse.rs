//! Bounds-checked header parsing shared by the XDP and TC programs: Ethernet with up
//! to two 802.1Q/802.1ad tags, IPv4 (non-first fragments stop here), IPv6 with up to
//! four extension headers, TCP. Every read goes through [`ptr_at`].
//!
//! Header layouts come from `network-types` (field offsets by `offset_of!`, lengths
//! by `LEN`, protocol numbers from its enums). Fields are still read one at a time,
//! each with its own bound check, rather than as whole header structs: a frame cut
//! inside a header keeps the verdict of the first field it cannot hold (a cut IPv4
//! fragment is still `Fragment`), exactly as before the crate was used.

use core::mem::{offset_of, size_of};

use aya_ebpf::programs::TcContext;
use nearblock_common::{
    flow::{FAMILY_IPV4, FAMILY_IPV6},
    Verdict,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    vlan::VlanHdr,
};

/// `network-types` stores EtherType discriminants in network byte order (so a raw
/// field compares equal); these are the host-order values `be16` returns.
const ETH_P_IP: u16 = u16::from_be(EtherType::Ipv4 as u16);
const ETH_P_IPV6: u16 = u16::from_be(EtherType::Ipv6 as u16);
const ETH_P_8021Q: u16 = u16::from_be(EtherType::Ieee8021q as u16);
const ETH_P_8021AD: u16 = u16::from_be(EtherType::Ieee8021ad as u16);
pub const IPPROTO_TCP: u8 = IpProto::Tcp as u8;
const IPPROTO_HOPOPTS: u8 = IpProto::HopOpt as u8;
const IPPROTO_ROUTING: u8 = IpProto::Ipv6Route as u8;
const IPPROTO_FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
const IPPROTO_DSTOPTS: u8 = IpProto::Ipv6Opts as u8;
/// The IPv6 fragment extension header is fixed-size: next header, reserved,
/// offset+flags, identification.
const IPV6_FRAG_HLEN: usize = 8;
/// Offset of the 13-bit fragment offset (+ flags) in that header.
const IPV6_FRAG_OFFSET_OFF: usize = 2;
/// Offset of the data-offset nibble in the TCP header (the first byte of
/// `network-types`' bitfield, which holds doff in its upper four bits).
const TCP_DOFF_OFF: usize = offset_of!(TcpHdr, _bitfield_1);
/// Offset of the flags byte in the TCP header (the bitfield's second byte).
const TCP_FLAGS_OFF: usize = TCP_DOFF_OFF + 1;
// The bitfield is the one layout `offset_of!` cannot name field by field: hold the
// crate to RFC 9293's (doff at byte 12, flags at 13, 20-byte fixed header).
const _: () = assert!(TCP_DOFF_OFF == 12 && TcpHdr::LEN == 20);

/// TCP flag bits (byte 13 of the header).
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// What the programs need from one TCP packet.
pub struct TcpPacket {
    pub family: u8,
    pub vlan: u16,
    /// DSCP codepoint (upper six bits of TOS / traffic class).
    pub dscp: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// Sequence number of the segment's first byte.
    pub seq: u32,
    /// Offset of the IP header from the start of the frame.
    pub l3_off: usize,
    /// Offset of the TCP header from the start of the frame.
    pub l4_off: usize,
    /// Offset of the TCP payload from the start of the frame.
    pub payload_off: usize,
    /// TCP payload length from the IP header (0 for BIG TCP super-packets, which
    /// the caller replaces with the frame-derived length).
    pub payload_len: usize,
    /// Whether the frame carried a VLAN tag.
    pub tagged: bool,
}

/// Enough linear bytes for Ethernet + two VLAN tags + IPv6 + 4 ext headers' worth
/// of common cases + a TCP header with options.
const PULL_LEN: u32 = 14 + 8 + 40 + 16 + 60;

/// TC: parse the skb's headers where they are, and only if they run past its
/// linear part, pull up to [`PULL_LEN`] bytes into it and parse again. Pulling
/// is not free: a forwarded TCP skb is usually a clone, and making its head
/// writable reallocates and copies it; the headers of nearly every packet are
/// already linear.
// Not inlined: its temporaries stay out of the callers' frames (the combined
// program's stack, with the handoff rewrite's on top, must stay within 512 bytes).
#[inline(never)]
pub fn parse_skb(ctx: &TcContext) -> Result<TcpPacket, Verdict> {
    let parsed = parse_tcp(ctx.data(), ctx.data_end());
    let linear = (ctx.data_end() - ctx.data()) as u32;
    match parsed {
        Err(Verdict::Truncated) if linear < PULL_LEN && ctx.len() > linear => {
            let want = if ctx.len() < PULL_LEN {
                ctx.len()
            } else {
                PULL_LEN
            };
            if ctx.pull_data(want).is_err() {
                return Err(Verdict::Truncated);
            }
            parse_tcp(ctx.data(), ctx.data_end())
        }
        other => other,
    }
}

/// Pointer to a `T` at `offset` from `start`, or `Truncated` if it does not fit
/// before `end`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Result<*const T, Verdict> {
    if start + offset + size_of::<T>() > end {
        return Err(Verdict::Truncated);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn be16(start: usize, end: usize, offset: usize) -> Result<u16, Verdict> {
    let p: *const [u8; 2] = ptr_at(start, end, offset)?;
    // SAFETY: ptr_at checked the two bytes lie inside the packet.
    Ok(u16::from_be_bytes(unsafe { *p }))
}

/// One header byte. Checked as two bytes: LLVM turns a one-byte bound check into
/// `ptr >= end`, which the verifier cannot use; every byte read here is followed
/// by at least one more header byte, so this rejects no valid packet.
#[inline(always)]
fn byte(start: usize, end: usize, offset: usize) -> Result<u8, Verdict> {
    let p: *const [u8; 2] = ptr_at(start, end, offset)?;
    // SAFETY: ptr_at checked both bytes lie inside the packet.
    Ok(unsafe { (*p)[0] })
}

/// Parse a frame held in `[start, end)` down to its TCP header.
#[inline(always)]
pub fn parse_tcp(start: usize, end: usize) -> Result<TcpPacket, Verdict> {
    let mut ethertype = be16(start, end, offset_of!(EthHdr, ether_type))?;
    let mut l3 = EthHdr::LEN;
    let mut vlan = 0u16;
    let mut tagged = false;
    // At most two tags (QinQ); bounded so the verifier sees a finite program.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        tagged = true;
        vlan = be16(start, end, l3 + offset_of!(VlanHdr, tci))? & 0x0fff;
        ethertype = be16(start, end, l3 + offset_of!(VlanHdr, ether_type))?;
        l3 += VlanHdr::LEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = be16(start, end, l3 + offset_of!(VlanHdr, ether_type))?;
            l3 += VlanHdr::LEN;
        }
    }
    let mut pkt = TcpPacket {
        family: 0,
        vlan,
        dscp: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        seq: 0,
        l3_off: l3,
        l4_off: 0,
        payload_off: 0,
        payload_len: 0,
        tagged,
    };
    let l4;
    let ip_payload_len: usize;
    match ethertype {
        ETH_P_IP => {
            let vihl = byte(start, end, l3 + offset_of!(Ipv4Hdr, vihl))?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < Ipv4Hdr::LEN {
                return Err(Verdict::Truncated);
            }
            pkt.family = FAMILY_IPV4;
            pkt.dscp = byte(start, end, l3 + offset_of!(Ipv4Hdr, tos))? >> 2;
            let total = be16(start, end, l3 + offset_of!(Ipv4Hdr, tot_len))? as usize;
            let frag = be16(start, end, l3 + offset_of!(Ipv4Hdr, frags))?;
            if frag & 0x1fff != 0 {
                return Err(Verdict::Fragment);
            }
            if byte(start, end, l3 + offset_of!(Ipv4Hdr, proto))? != IPPROTO_TCP {
                return Err(Verdict::NotTcp);
            }
            // Source and destination are adjacent: one bound check for both.
            let addrs: *const [u8; 8] = ptr_at(start, end, l3 + offset_of!(Ipv4Hdr, src_addr))?;
            // SAFETY: bounds checked by ptr_at.
            let addrs = unsafe { *addrs };
            pkt.saddr[..4].copy_from_slice(&addrs[..4]);
            pkt.daddr[..4].copy_from_slice(&addrs[4..]);
            l4 = l3 + ihl;
            ip_payload_len = total.saturating_sub(ihl);
        }
        ETH_P_IPV6 => {
            pkt.family = FAMILY_IPV6;
            let tc = be16(start, end, l3 + offset_of!(Ipv6Hdr, vcf))?;
            pkt.dscp = ((tc >> 4) as u8) >> 2;
            let plen = be16(start, end, l3 + offset_of!(Ipv6Hdr, payload_len))? as usize;
            let mut next = byte(start, end, l3 + offset_of!(Ipv6Hdr, next_hdr))?;
            // Source and destination are adjacent: one bound check for both.
            let addrs: *const [u8; 32] = ptr_at(start, end, l3 + offset_of!(Ipv6Hdr, src_addr))?;
            // SAFETY: bounds checked by ptr_at.
            let addrs = unsafe { *addrs };
            pkt.saddr.copy_from_slice(&addrs[..16]);
            pkt.daddr.copy_from_slice(&addrs[16..]);
            let mut off = l3 + Ipv6Hdr::LEN;
            let mut ext_len = 0usize;
            // Up to four extension headers before TCP.
            let mut i = 0;
            while i < 4 {
                match next {
                    IPPROTO_TCP => break,
                    // Hop-by-hop, routing, destination options.
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                        let n = byte(start, end, off)?;
                        let len = ((byte(start, end, off + 1)? as usize) + 1) * 8;
                        next = n;
                        off += len;
                        ext_len += len;
                    }
                    // Fragment header: only a first fragment has the TCP header.
                    IPPROTO_FRAGMENT => {
                        let n = byte(start, end, off)?;
                        if be16(start, end, off + IPV6_FRAG_OFFSET_OFF)? & 0xfff8 != 0 {
                            return Err(Verdict::Fragment);
                        }
                        next = n;
                        off += IPV6_FRAG_HLEN;
                        ext_len += IPV6_FRAG_HLEN;
                    }
                    _ => return Err(Verdict::NotTcp),
                }
                i += 1;
            }
            if next != IPPROTO_TCP {
                return Err(Verdict::Ipv6ExtHeader);
            }
            l4 = off;
            ip_payload_len = plen.saturating_sub(ext_len);
        }
        _ => return Err(Verdict::NotIp),
    }
    pkt.sport = be16(start, end, l4 + offset_of!(TcpHdr, source))?;
    pkt.dport = be16(start, end, l4 + offset_of!(TcpHdr, dest))?;
    let doff = ((byte(start, end, l4 + TCP_DOFF_OFF)? >> 4) as usize) * 4;
    if doff < TcpHdr::LEN {
        return Err(Verdict::Truncated);
    }
    pkt.tcp_flags = byte(start, end, l4 + TCP_FLAGS_OFF)?;
    let seq: *const [u8; 4] = ptr_at(start, end, l4 + offset_of!(TcpHdr, seq))?;
    // SAFETY: bounds checked by ptr_at.
    pkt.seq = u32::from_be_bytes(unsafe { *seq });
    pkt.l4_off = l4;
    pkt.payload_off = l4 + doff;
    pkt.payload_len = ip_payload_len.saturating_sub(doff);
    Ok(pkt)
}
