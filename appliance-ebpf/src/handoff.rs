//! Forwarding of connections the splicer handed to the kernel (TC ingress, from
//! `steer`): each packet of such a connection is rewritten into the numbering
//! of the splicer socket its receiver was talking to, and forwarded. No socket
//! sees it and no user-space task copies its bytes.
//!
//! What is rewritten (`nearblock_common::handoff`): sequence and acknowledgement
//! numbers, SACK edges, TSval/TSecr (the TSval delta is learned from the first
//! packet so the receiver's clock of its peer continues; TSecr is sent as 0 —
//! "no echo" — until the opposite direction's delta is known), and the window
//! field rescaled between the two connections' window scales. The whole TCP
//! header is read once, rewritten on the stack and written back with one
//! checksum update by difference.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    cty::c_void,
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    macros::map,
    maps::HashMap,
    programs::TcContext,
    EbpfContext,
};
use nearblock_common::{
    flow::FAMILY_IPV4, handoff::rescale_window, maps::HANDOFFS_MAX, HandoffKey, HandoffRewrite,
    Verdict,
};

use crate::{
    count::bump,
    parse::{TcpPacket, TCP_ACK, TCP_SYN},
};

#[map]
pub static HANDOFFS: HashMap<HandoffKey, HandoffRewrite> =
    HashMap::with_max_entries(HANDOFFS_MAX, 0);

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;
const OPT_TIMESTAMP_LEN: usize = 10;
/// Offsets in the TCP header (RFC 9293).
const SEQ_OFF: usize = 4;
const ACK_OFF: usize = 8;
const WINDOW_OFF: usize = 14;
const CHECK_OFF: usize = 16;
const FIXED_LEN: usize = 20;
/// `last_seen_ns` is refreshed at most this often.
const LAST_SEEN_GRAIN_NS: u64 = 1_000_000_000;

/// What became of a packet.
pub enum Handoff {
    /// Not a handed-off connection's.
    NotOurs,
    /// Rewritten: the stack forwards it.
    Forward,
    /// Rewritten and routed: redirected to its egress interface.
    Redirect,
    /// A handed-off connection's packet that could not be rewritten: dropped
    /// (its sender retransmits), never forwarded in the wrong numbering.
    Drop,
    /// Dropped too: its timestamps are not where they were looked for
    /// (counted apart; `forward` returns it as `Drop`).
    Unparsed,
}

/// A TCP header, whole, on the stack, and the checksum difference of what was
/// rewritten in it (one's-complement sum of `!old + new` over each rewritten
/// 32-bit field; every field is 16-bit aligned, which is all the sum needs).
#[repr(C, align(4))]
struct Header {
    bytes: [u8; 64],
    diff: u64,
}

impl Header {
    #[inline(always)]
    fn get32(&self, off: usize) -> u32 {
        let b = &self.bytes;
        u32::from_be_bytes([
            b[off & 63],
            b[(off + 1) & 63],
            b[(off + 2) & 63],
            b[(off + 3) & 63],
        ])
    }
    /// Replace the field at `off`, returning the old value.
    #[inline(always)]
    fn set32(&mut self, off: usize, v: u32) -> u32 {
        let old = self.get32(off);
        let b = v.to_be_bytes();
        self.bytes[off & 63] = b[0];
        self.bytes[(off + 1) & 63] = b[1];
        self.bytes[(off + 2) & 63] = b[2];
        self.bytes[(off + 3) & 63] = b[3];
        // Checksums are sums of big-endian 16-bit words: sum the fields as the
        // host reads them and the fold below stays consistent as long as old
        // and new are read alike.
        self.diff +=
            u64::from(!u32::from_ne_bytes(old.to_be_bytes())) + u64::from(u32::from_ne_bytes(b));
        old
    }
    #[inline(always)]
    fn add32(&mut self, off: usize, delta: u32) -> u32 {
        let v = self.get32(off);
        self.set32(off, v.wrapping_add(delta))
    }
    /// The difference folded to the 32 bits `bpf_l4_csum_replace` takes.
    #[inline(always)]
    fn folded_diff(&self) -> u32 {
        let d = (self.diff & 0xffff_ffff) + (self.diff >> 32);
        ((d & 0xffff_ffff) + (d >> 32)) as u32
    }
}

#[inline(always)]
fn key_of(pkt: &TcpPacket) -> HandoffKey {
    HandoffKey {
        family: pkt.family,
        _pad: [0; 3],
        sport: pkt.sport,
        dport: pkt.dport,
        saddr: pkt.saddr,
        daddr: pkt.daddr,
    }
}

/// Rewrite and forward the packet if its connection was handed to the kernel;
/// a packet that cannot be rewritten is counted and dropped.
/// `now` is the clock reading of a classifier that ran in the same program,
/// or 0 (a plain `u64`: a BPF call passes scalars in registers, and an
/// `Option`'s unset half would reach the callee uninitialised).
#[inline(never)]
pub fn forward(ctx: &TcContext, pkt: &TcpPacket, now: u64) -> Handoff {
    match rewrite(ctx, pkt, now) {
        Handoff::Drop => {
            bump(Verdict::SteerHandoffDropped);
            Handoff::Drop
        }
        // Counted under its own verdict where it was found.
        Handoff::Unparsed => Handoff::Drop,
        other => other,
    }
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Offsets in the IP headers: IPv4's TTL (followed by the protocol, one
/// 16-bit word for the checksum) and header checksum, IPv6's hop limit.
const IPV4_TTL_OFF: usize = 8;
const IPV4_CHECK_OFF: usize = 10;
const IPV6_HOP_LIMIT_OFF: usize = 7;

/// Route a rewritten packet as a router would and redirect it to its egress
/// interface; anything the FIB does not answer for is the stack's
/// (`Forward`). Called by steering after `forward`, not from it: a call
/// deeper would take the combined program past the verifier's 512-byte stack.
#[inline(never)]
pub fn route(ctx: &TcContext, pkt: &TcpPacket) -> Handoff {
    let skb = ctx.skb.skb;
    // SAFETY: reading fields of the context the kernel passed in.
    let (vlan_present, ifindex) = unsafe { ((*skb).vlan_present, (*skb).ifindex) };
    if pkt.tagged || vlan_present != 0 {
        return Handoff::Forward;
    }
    // SAFETY: plain old data; all-zero is a valid value.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.l4_protocol = crate::parse::IPPROTO_TCP;
    fib.sport = pkt.sport.to_be();
    fib.dport = pkt.dport.to_be();
    fib.ifindex = ifindex;
    let hop_off = if pkt.family == FAMILY_IPV4 {
        fib.family = AF_INET;
        let a = &pkt.saddr;
        let b = &pkt.daddr;
        fib.__bindgen_anon_2.tos = pkt.dscp << 2;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        pkt.l3_off + IPV4_TTL_OFF
    } else {
        fib.family = AF_INET6;
        // SAFETY: 16 bytes as four words, the layout the helper reads.
        unsafe {
            fib.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(pkt.saddr);
            fib.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(pkt.daddr);
        }
        pkt.l3_off + IPV6_HOP_LIMIT_OFF
    };
    // tot_len 0: the helper checks the skb against the egress MTU itself.
    // SAFETY: helper call with the context and a stack struct of its size.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let rc = rc as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Handoff::Forward;
    }
    // TTL (IPv4: with the protocol byte, the checksummed 16-bit word).
    let Ok(mut word) = ctx.load::<[u8; 2]>(hop_off) else {
        return Handoff::Forward;
    };
    if word[0] <= 1 {
        // Expiring: the stack answers with ICMP time exceeded.
        return Handoff::Forward;
    }
    let old = u16::from_ne_bytes(word);
    word[0] -= 1;
    if ctx.store(hop_off, &word[0], 0).is_err() {
        return Handoff::Drop;
    }
    if pkt.family == FAMILY_IPV4 {
        let new = u16::from_ne_bytes(word);
        let check = pkt.l3_off + IPV4_CHECK_OFF;
        // 2: the size of the replaced field.
        if ctx
            .l3_csum_replace(check, u64::from(old), u64::from(new), 2)
            .is_err()
        {
            return Handoff::Drop;
        }
    }
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        // The Ethernet addresses, at the frame's start.
        if ctx.store(0, &macs, 0).is_err() {
            return Handoff::Drop;
        }
        // SAFETY: helper call; no flags: the interface's egress.
        unsafe { bpf_redirect(fib.ifindex, 0) };
    } else {
        // The next hop's address is not resolved yet: the kernel resolves
        // it (and queues the packet meanwhile).
        // SAFETY: helper call; no parameters: the kernel looks up the next hop.
        unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) };
    }
    bump(Verdict::SteerHandoffRouted);
    Handoff::Redirect
}

#[inline(always)]
fn rewrite(ctx: &TcContext, pkt: &TcpPacket, now: u64) -> Handoff {
    let key = key_of(pkt);
    let Some(rw) = HANDOFFS.get_ptr_mut(&key) else {
        return Handoff::NotOurs;
    };
    if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A new connection on a handed-off connection's tuple (the initiator
        // reconnected from the same port after a reset): the old entries are
        // stale, and the new connection is steered like any other.
        let _ = HANDOFFS.remove(&key);
        let _ = HANDOFFS.remove(&key.reversed());
        return Handoff::NotOurs;
    }
    // SAFETY: a map value, valid for this program's run; concurrent writers
    // only ever store whole fields (learned once, or flags set to 1).
    let rw = unsafe { &mut *rw };
    // SAFETY: the helper has no preconditions.
    let now = if now != 0 {
        now
    } else {
        unsafe { bpf_ktime_get_ns() }
    };
    // Both directions' entries are written from both CPUs: store only what
    // changed (the sweeper needs seconds, not every packet's time).
    if now.wrapping_sub(rw.last_seen_ns) > LAST_SEEN_GRAIN_NS {
        rw.last_seen_ns = now;
    }
    if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 && rw.closing == 0 {
        rw.closing = 1;
    }
    let len = (pkt.payload_off.wrapping_sub(pkt.l4_off) & 0x3c) as u32;
    if (len as usize) < FIXED_LEN {
        return Handoff::Drop;
    }
    let mut hdr = Header {
        bytes: [0; 64],
        diff: 0,
    };
    // SAFETY: `hdr.bytes` has 64 bytes; `len` is at most 60.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr().cast(),
            pkt.l4_off as u32,
            hdr.bytes.as_mut_ptr().cast::<c_void>(),
            len,
        )
    };
    if rc != 0 {
        return Handoff::Drop;
    }
    let (timestamps_at, sack_at, sack_len) = find_options(&hdr, len as usize);
    if rw.timestamps != 0 && timestamps_at == 0 && pkt.tcp_flags & TCP_RST == 0 {
        bump(Verdict::SteerHandoffUnparsed);
        return Handoff::Unparsed;
    }
    hdr.add32(SEQ_OFF, rw.seq_delta);
    let ack = hdr.add32(ACK_OFF, rw.ack_delta);
    if rw.acked == 0 && pkt.tcp_flags & TCP_ACK != 0 && ack.wrapping_sub(rw.watch_ack) as i32 >= 0 {
        rw.acked = 1;
    }
    if rw.window_shift != 0 {
        // The window shares a 32-bit word with the data offset and flags.
        let word = hdr.get32(WINDOW_OFF - 2);
        let scaled = rescale_window(word as u16, rw.window_shift);
        hdr.set32(WINDOW_OFF - 2, (word & 0xffff_0000) | u32::from(scaled));
    }
    if timestamps_at != 0 && rw.timestamps != 0 {
        rewrite_timestamps(&mut hdr, timestamps_at, rw, &key, now);
    }
    if sack_at != 0 {
        // Up to four blocks of two edges.
        let edges = (sack_len - 2) / 4;
        for e in 0..8 {
            if e < edges {
                hdr.add32(sack_at + 2 + e * 4, rw.ack_delta);
            }
        }
    }
    // SAFETY: writing `len` bytes from the stack buffer over the TCP header.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.as_ptr().cast(),
            pkt.l4_off as u32,
            hdr.bytes.as_ptr().cast::<c_void>(),
            len,
            0,
        )
    };
    if rc != 0 {
        return Handoff::Drop;
    }
    // Flags 0: `to` is a checksum difference, not a field value.
    if ctx
        .l4_csum_replace(pkt.l4_off + CHECK_OFF, 0, u64::from(hdr.folded_diff()), 0)
        .is_err()
    {
        return Handoff::Drop;
    }
    bump(Verdict::SteerHandoff);
    Handoff::Forward
}

/// Where the options the rewrite needs sit. Every mainstream stack (Linux, the
/// BSDs, Windows) pads them to 4-byte boundaries as RFC 7323 Appendix A
/// recommends: NOP NOP TS at the start of the options, NOP NOP SACK after it
/// (or first when there are no timestamps). Only these places are looked at,
/// so the program's verification stays small; a handed-off connection whose
/// packets carry its negotiated timestamps anywhere else is dropped at the
/// first such packet (`tc_steer_handoff_unparsed`) rather than forwarded in
/// the wrong numbering.
#[inline(always)]
fn find_options(hdr: &Header, len: usize) -> (usize, usize, usize) {
    let b = &hdr.bytes;
    let mut timestamps_at = 0;
    let mut next = FIXED_LEN;
    if len >= FIXED_LEN + 12
        && b[20] == OPT_NOP
        && b[21] == OPT_NOP
        && b[22] == OPT_TIMESTAMP
        && b[23] as usize == OPT_TIMESTAMP_LEN
    {
        timestamps_at = 22;
        next = 32;
    } else if len >= FIXED_LEN + 12
        && b[20] == OPT_TIMESTAMP
        && b[21] as usize == OPT_TIMESTAMP_LEN
        && b[30] == OPT_NOP
        && b[31] == OPT_NOP
    {
        timestamps_at = 20;
        next = 32;
    }
    let (mut sack_at, mut sack_len) = (0, 0);
    if next == FIXED_LEN {
        if len >= FIXED_LEN + 12 && b[20] == OPT_NOP && b[21] == OPT_NOP && b[22] == OPT_SACK {
            sack_at = 22;
            sack_len = b[23] as usize;
        }
    } else if len >= 32 + 12 && b[32] == OPT_NOP && b[33] == OPT_NOP && b[34] == OPT_SACK {
        sack_at = 34;
        sack_len = b[35] as usize;
    }
    if sack_at != 0 && (sack_len < 10 || sack_at + sack_len > len) {
        sack_at = 0;
    }
    (timestamps_at, sack_at, sack_len)
}
#[inline(always)]
fn rewrite_timestamps(
    hdr: &mut Header,
    at: usize,
    rw: &mut HandoffRewrite,
    key: &HandoffKey,
    now: u64,
) {
    let tsval = hdr.get32(at + 2);
    if rw.tsval_known == 0 {
        // Continue the receiver's view of its peer's clock from now (+1 so it
        // is never behind the last timestamp that socket sent).
        let peer_clock = ((now / 1_000_000) as u32)
            .wrapping_add(rw.receiver_ts_offset_ms)
            .wrapping_add(1);
        rw.tsval_delta = peer_clock.wrapping_sub(tsval);
        rw.tsval_known = 1;
        if let Some(rev) = HANDOFFS.get_ptr_mut(&key.reversed()) {
            // SAFETY: as for `rw`.
            let rev = unsafe { &mut *rev };
            rev.tsecr_delta = 0u32.wrapping_sub(rw.tsval_delta);
            rev.tsecr_known = 1;
        }
    }
    hdr.set32(at + 2, tsval.wrapping_add(rw.tsval_delta));
    let tsecr = hdr.get32(at + 6);
    let echoed = if rw.tsecr_known != 0 && tsecr != 0 {
        tsecr.wrapping_add(rw.tsecr_delta)
    } else {
        0
    };
    hdr.set32(at + 6, echoed);
}
