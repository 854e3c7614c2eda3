//! Classification and counting: per-flow, per-interface and verdict counters, and
//! the Login Request capture for passive discovery. Owns every map the classifier
//! (XDP or TC ingress, whichever the interface got) and the TC egress counter
//! write. The classifier is one function over [`Frame`], so both attachments
//! count, classify and capture identically.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    cty::c_void,
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    macros::map,
    maps::{Array, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use nearblock_common::{
    event::LOGIN_CAPTURE_MAX,
    maps::{port_bit, FLOWS_MAX, IF_COUNTERS_MAX, LOGIN_EVENTS_BYTES, PORTS_WORDS},
    verdict::VERDICT_COUNT,
    FlowCounters, FlowKey, FlowSeq, IfCounters, LoginEvent, Verdict,
};

use crate::parse::{parse_skb, parse_tcp, TcpPacket, IPPROTO_TCP};

/// iSCSI Login Request opcode (RFC 7143 §11.12), low six bits of BHS byte 0.
const ISCSI_OP_LOGIN_REQUEST: u8 = 0x03;
const ISCSI_BHS_LEN: usize = 48;

#[map]
pub static FLOWS: LruPerCpuHashMap<FlowKey, FlowCounters> =
    LruPerCpuHashMap::with_max_entries(FLOWS_MAX, 0);

#[map]
pub static FLOW_SEQ: LruHashMap<FlowKey, FlowSeq> = LruHashMap::with_max_entries(FLOWS_MAX, 0);

#[map]
pub static IF_COUNTERS: PerCpuHashMap<u32, IfCounters> =
    PerCpuHashMap::with_max_entries(IF_COUNTERS_MAX, 0);

#[map]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICT_COUNT, 0);

#[map]
pub static PORTS: Array<u64> = Array::with_max_entries(PORTS_WORDS, 0);

#[map]
pub static LOGIN_EVENTS: RingBuf = RingBuf::with_byte_size(LOGIN_EVENTS_BYTES, 0);

#[inline(always)]
pub fn bump(v: Verdict) {
    if let Some(p) = VERDICTS.get_ptr_mut(v as u32) {
        // SAFETY: per-CPU slot, valid for the program's run.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn is_classified_port(port: u16) -> bool {
    let (word, bit) = port_bit(port);
    PORTS.get(word).is_some_and(|w| w & bit != 0)
}

/// A classified TCP packet, as the classifier saw it: what steering needs
/// next, so that the combined program parses once.
pub struct Classified {
    pub pkt: TcpPacket,
    /// Toward a classified port.
    pub toward: bool,
    /// From a classified port.
    pub from: bool,
    /// `bpf_ktime_get_ns` when it was counted.
    pub now: u64,
}

/// What the classifier needs from the context it runs in.
pub trait Frame: EbpfContext {
    /// The packet's headers down to TCP.
    fn parse(&self) -> Result<TcpPacket, Verdict>;
    /// The whole frame's length, Ethernet header included (for a GSO
    /// super-packet, all of it: what the interface carries).
    fn frame_len(&self) -> u64;
    /// The interface the frame arrived on.
    fn ifindex(&self) -> u32;
    /// A VLAN id the driver took out of the frame (TC sees offloaded tags in the
    /// skb; XDP sees tags only in the frame).
    fn offloaded_vlan(&self) -> Option<u16>;
    /// Copy `len` bytes at `off` (from the frame's start, linear or not) to `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes.
    unsafe fn load(&self, off: u32, dst: *mut c_void, len: u32) -> i64;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn parse(&self) -> Result<TcpPacket, Verdict> {
        parse_tcp(self.data(), self.data_end())
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        (self.data_end() - self.data()) as u64
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn offloaded_vlan(&self) -> Option<u16> {
        None
    }
    #[inline(always)]
    unsafe fn load(&self, off: u32, dst: *mut c_void, len: u32) -> i64 {
        // SAFETY: the caller vouches for `dst`; the helper bounds-checks `off`.
        unsafe { bpf_xdp_load_bytes(self.as_ptr().cast(), off, dst, len) }
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn parse(&self) -> Result<TcpPacket, Verdict> {
        parse_skb(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        u64::from(self.len())
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context the kernel passed in.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn offloaded_vlan(&self) -> Option<u16> {
        // SAFETY: as above.
        let (present, tci) = unsafe { ((*self.skb.skb).vlan_present, (*self.skb.skb).vlan_tci) };
        (present != 0).then_some((tci & 0x0fff) as u16)
    }
    #[inline(always)]
    unsafe fn load(&self, off: u32, dst: *mut c_void, len: u32) -> i64 {
        // SAFETY: the caller vouches for `dst`; the helper bounds-checks `off`.
        unsafe { bpf_skb_load_bytes(self.as_ptr().cast(), off, dst, len) }
    }
}

/// Count the frame on its interface, and if it is a classified TCP segment, on
/// its flow; copy Login Request segments to user space. Returns the classified
/// segment, if it was one.
#[inline(always)]
pub fn classify<F: Frame>(ctx: &F) -> Option<Classified> {
    let frame_len = ctx.frame_len();
    let ifindex = ctx.ifindex();
    count_interface(ifindex, frame_len, true);

    let mut pkt = match ctx.parse() {
        Ok(p) => p,
        Err(v) => {
            bump(v);
            return None;
        }
    };
    if !pkt.tagged {
        if let Some(vlan) = ctx.offloaded_vlan() {
            pkt.tagged = true;
            pkt.vlan = vlan;
        }
    }
    if pkt.tagged {
        bump(Verdict::Vlan);
    }
    let toward_port = is_classified_port(pkt.dport);
    let from_port = is_classified_port(pkt.sport);
    if !toward_port && !from_port {
        bump(Verdict::OtherPort);
        return None;
    }
    bump(Verdict::Classified);

    let now = count_classified(ctx, &pkt, frame_len, toward_port);
    Some(Classified {
        pkt,
        toward: toward_port,
        from: from_port,
        now,
    })
}

/// Count a classified segment on its flow and capture it if it is a Login
/// Request; returns the clock reading. Not inlined: its stack frame (the flow
/// key, fresh counters) is gone before steering's calls push theirs, which
/// keeps the combined program within the verifier's 512-byte stack.
#[inline(never)]
fn count_classified<F: Frame>(ctx: &F, pkt: &TcpPacket, frame_len: u64, toward_port: bool) -> u64 {
    // BIG TCP super-packets carry 0 in the IP length: fall back to the frame.
    let mut payload_len = pkt.payload_len as u64;
    if payload_len == 0 {
        payload_len = frame_len.saturating_sub(pkt.payload_off as u64);
    }
    let key = flow_key(ctx.ifindex(), pkt);
    track_sequence(&key, pkt.seq, payload_len as u32);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    count_flow(&key, frame_len, payload_len, pkt.tcp_flags, now);

    if toward_port && payload_len >= ISCSI_BHS_LEN as u64 {
        // Loaded, not read in place: in an skb the payload may start in a page
        // fragment, outside the linear headers.
        let mut opcode = [0u8; 4];
        // SAFETY: `opcode` is a 4-byte stack buffer.
        let rc = unsafe { ctx.load(pkt.payload_off as u32, opcode.as_mut_ptr().cast(), 4) };
        if rc == 0 && opcode[0] & 0x3f == ISCSI_OP_LOGIN_REQUEST {
            capture_login(ctx, &key, pkt.payload_off, payload_len);
        }
    }
    now
}

/// TC egress: per-interface transmit counters.
#[inline(always)]
pub fn egress(ctx: &TcContext) {
    // SAFETY: reading a field of the context the kernel passed in.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    count_interface(ifindex, ctx.len() as u64, false);
}

#[inline(always)]
fn flow_key(ifindex: u32, pkt: &TcpPacket) -> FlowKey {
    FlowKey {
        ifindex,
        family: pkt.family,
        proto: IPPROTO_TCP,
        vlan: pkt.vlan,
        sport: pkt.sport,
        dport: pkt.dport,
        saddr: pkt.saddr,
        daddr: pkt.daddr,
    }
}

#[inline(always)]
fn count_interface(ifindex: u32, bytes: u64, rx: bool) {
    if let Some(c) = IF_COUNTERS.get_ptr_mut(&ifindex) {
        // SAFETY: per-CPU value; XDP writes only rx_*, TC egress only tx_*.
        unsafe {
            if rx {
                (*c).rx_packets += 1;
                (*c).rx_bytes += bytes;
            } else {
                (*c).tx_packets += 1;
                (*c).tx_bytes += bytes;
            }
        }
        return;
    }
    let mut c = IfCounters::default();
    if rx {
        c.rx_packets = 1;
        c.rx_bytes = bytes;
    } else {
        c.tx_packets = 1;
        c.tx_bytes = bytes;
    }
    let _ = IF_COUNTERS.insert(&ifindex, &c, 0);
}

/// Advance the flow's sequence-space counter by the part of `[seq, seq+len)` beyond
/// the highest end seen (serial-number arithmetic, RFC 1982). Reordered and
/// retransmitted segments add nothing. Shared across CPUs without atomics (the BPF
/// target has none in `core`): two CPUs racing on one flow's update can misfile
/// one segment's bytes, a rare and bounded error.
#[inline(always)]
fn track_sequence(key: &FlowKey, seq: u32, len: u32) {
    if len == 0 {
        return;
    }
    let end = seq.wrapping_add(len);
    if let Some(s) = FLOW_SEQ.get_ptr_mut(key) {
        // SAFETY: a live map value.
        unsafe {
            let ahead = end.wrapping_sub((*s).max_end) as i32;
            if ahead > 0 {
                (*s).new_bytes += ahead as u64;
                (*s).max_end = end;
            }
        }
        return;
    }
    let fresh = FlowSeq {
        max_end: end,
        _pad: 0,
        new_bytes: len as u64,
    };
    let _ = FLOW_SEQ.insert(key, &fresh, 0);
}

#[inline(always)]
fn count_flow(key: &FlowKey, frame_len: u64, payload_len: u64, flags: u8, now: u64) {
    if let Some(c) = FLOWS.get_ptr_mut(key) {
        add_to_flow(c, frame_len, payload_len, flags, now);
        return;
    }
    let fresh = FlowCounters {
        packets: 1,
        frame_bytes: frame_len,
        payload_bytes: payload_len,
        first_seen_ns: now,
        last_seen_ns: now,
        tcp_flags: flags as u32,
        _pad: 0,
    };
    // Per-CPU values: no other CPU writes this slot, so no atomics are needed
    // (the BPF target has none in `core`); user space sums the CPUs.
    let _ = FLOWS.insert(key, &fresh, BPF_NOEXIST as u64);
}

#[inline(always)]
fn add_to_flow(c: *mut FlowCounters, frame_len: u64, payload_len: u64, flags: u8, now: u64) {
    // SAFETY: `c` points at this CPU's slot of a live map value.
    unsafe {
        (*c).packets += 1;
        (*c).frame_bytes += frame_len;
        (*c).payload_bytes += payload_len;
        (*c).tcp_flags |= flags as u32;
        if (*c).first_seen_ns == 0 {
            (*c).first_seen_ns = now;
        }
        (*c).last_seen_ns = now;
    }
}

#[inline(always)]
fn capture_login<F: Frame>(ctx: &F, key: &FlowKey, payload_off: usize, payload_len: u64) {
    let Some(mut entry) = LOGIN_EVENTS.reserve::<LoginEvent>(0) else {
        bump(Verdict::LoginRingFull);
        aya_log_ebpf::warn!(
            ctx,
            "login ring buffer full: a Login Request was not captured"
        );
        return;
    };
    // 1..=LOGIN_CAPTURE_MAX in a form the verifier can follow to the helper
    // (whose length must be non-zero): `payload_len` is at least a BHS here.
    const _: () = assert!(LOGIN_CAPTURE_MAX.is_power_of_two());
    let mut len = payload_len as u32;
    if len > LOGIN_CAPTURE_MAX as u32 {
        len = LOGIN_CAPTURE_MAX as u32;
    }
    let len = (len.wrapping_sub(1) & (LOGIN_CAPTURE_MAX as u32 - 1)) + 1;
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved ring-buffer slot, sized for a LoginEvent; the
    // helper copies `len` (≤ LOGIN_CAPTURE_MAX) bytes into its data array.
    let rc = unsafe {
        (*ev).key = *key;
        (*ev).len = len;
        ctx.load(payload_off as u32, (&raw mut (*ev).data).cast(), len)
    };
    if rc != 0 {
        entry.discard(0);
        return;
    }
    entry.submit(0);
    bump(Verdict::LoginCaptured);
}
