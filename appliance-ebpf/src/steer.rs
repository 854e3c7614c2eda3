//! Steering (TC ingress): deliver classified connections to the splicer's sockets.
//!
//! On a client-facing interface, a packet toward a classified port is assigned to
//! the socket that already owns its tuple (a request socket or an accepted child:
//! `bpf_skc_lookup_tcp`, never `sk_`, see docs/decisions.md), and a bare SYN of a
//! new connection to the splicer's listener from the `LISTENERS` SockMap. On an
//! upstream-facing interface, a reply from a classified port is assigned to the
//! splicer's transparent upstream socket owning its tuple. Assigned packets get the
//! steering mark, which the daemon's policy rules (`fwmark M iif IFACE lookup T`,
//! table T: `local default dev lo`) deliver locally.
//!
//! Only portals that can be served are steered: with `STEER_SERVED_ONLY`, every
//! packet to or from a portal missing from `SERVED_PORTALS` (no served LUN
//! behind it) is forwarded untouched without a socket lookup, counted and
//! discovered like any other classified flow.
//!
//! A connection the splicer handed to the kernel (`handoff`) is rewritten and
//! forwarded instead of assigned: its sockets are gone.
//!
//! Fail-open: no listener in the map means the SYN is forwarded untouched; flows
//! carrying the nearblock DSCP mark (another appliance's upstream connection) are
//! never touched. A new SYN is also forwarded untouched when the listener's accept
//! loop has not written its heartbeat within `HEARTBEAT_STALE_NS` (daemon stopped
//! or wedged), when the loop says it is not accepting (out of fds, at its cap), or
//! when its source is marked over its per-source cap. Only new SYNs consult these:
//! packets of flows a splicer socket already owns keep being assigned to it (a
//! stopped daemon's established sessions stall until it runs again).

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT},
    cty::c_void,
    helpers::{
        bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, SockMap},
    programs::TcContext,
    EbpfContext,
};
use nearblock_common::{
    failopen::Liveness,
    flow::FAMILY_IPV4,
    maps::{
        HEARTBEATS_MAX, IFACE_ROLES_MAX, LISTENER_V4, LISTENER_V6, OVERCAP_SOURCES_MAX,
        ROLE_CLIENT_FACING, ROLE_UPSTREAM_FACING, SERVED_PORTALS_MAX,
    },
    Heartbeat, PortalKey, SourceKey, Verdict,
};

use crate::{
    count::{bump, is_classified_port},
    handoff::{self, Handoff},
    parse::{parse_skb, TcpPacket, TCP_ACK, TCP_SYN},
};

#[map]
pub static IFACE_ROLES: HashMap<u32, u32> = HashMap::with_max_entries(IFACE_ROLES_MAX, 0);

#[map]
pub static LISTENERS: SockMap = SockMap::with_max_entries(2, 0);

#[map]
pub static HEARTBEATS: Array<Heartbeat> = Array::with_max_entries(HEARTBEATS_MAX, 0);

#[map]
pub static OVERCAP_SOURCES: LruHashMap<SourceKey, u64> =
    LruHashMap::with_max_entries(OVERCAP_SOURCES_MAX, 0);

#[map]
pub static SERVED_PORTALS: HashMap<PortalKey, u8> =
    HashMap::with_max_entries(SERVED_PORTALS_MAX, 0);

/// Set by the loader before load (read-only global).
#[no_mangle]
static DSCP_MARK: u8 = 0;
/// Set by the loader before load (read-only global).
#[no_mangle]
static STEER_SERVED_ONLY: u8 = 0;
/// Set by the loader before load (read-only global).
#[no_mangle]
static STEER_MARK: u32 = 0;

/// What `nb_steer` returns for a packet.
pub enum Action {
    /// Go on (assigned to a socket, rewritten, or untouched).
    Pass,
    /// Drop: a handed-off connection's packet that could not be rewritten.
    Drop,
    /// Redirected to another interface (a handed-off connection's packet,
    /// routed by the program).
    Redirect,
}

#[inline(always)]
pub fn steer(ctx: &TcContext) -> Action {
    let Ok(pkt) = parse_skb(ctx) else {
        return Action::Pass;
    };
    let toward = is_classified_port(pkt.dport);
    let from = is_classified_port(pkt.sport);
    if !toward && !from {
        return Action::Pass;
    }
    steer_classified(ctx, &pkt, toward, from, 0)
}

/// Steer a classified packet (`toward` / `from` a classified port); `now`
/// is the classifier's clock reading when it ran first in the same program,
/// else 0.
#[inline(always)]
pub fn steer_classified(
    ctx: &TcContext,
    pkt: &TcpPacket,
    toward: bool,
    from: bool,
    now: u64,
) -> Action {
    // SAFETY: reading a field of the context the kernel passed in.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out immediately.
    let role = match unsafe { IFACE_ROLES.get(&ifindex) } {
        Some(r) => *r,
        None => return Action::Pass,
    };
    // SAFETY: read-only global set before load.
    let dscp_mark = unsafe { core::ptr::read_volatile(&DSCP_MARK) };
    if dscp_mark != 0 && pkt.dscp == dscp_mark {
        bump(Verdict::SteerMarkedPass);
        return Action::Pass;
    }
    // A portal with nothing served has no splicer socket in any of its flows
    // (portals are only ever added), so its packets skip the socket lookup too:
    // the kernel forwards them as if nearblock were not there.
    if toward && role & ROLE_CLIENT_FACING != 0 {
        if !portal_served(pkt.family, &pkt.daddr, pkt.dport) {
            if pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                bump(Verdict::SteerNotServed);
            }
            return Action::Pass;
        }
        match handoff::forward(ctx, pkt, now) {
            Handoff::NotOurs => steer_from_client(ctx, pkt),
            Handoff::Forward => return routed(ctx, pkt),
            Handoff::Redirect => return Action::Redirect,
            Handoff::Drop | Handoff::Unparsed => return Action::Drop,
        }
    } else if from && role & ROLE_UPSTREAM_FACING != 0 {
        if !portal_served(pkt.family, &pkt.saddr, pkt.sport) {
            return Action::Pass;
        }
        match handoff::forward(ctx, pkt, now) {
            Handoff::NotOurs => steer_reply(ctx, pkt),
            Handoff::Forward => return routed(ctx, pkt),
            Handoff::Redirect => return Action::Redirect,
            Handoff::Drop | Handoff::Unparsed => return Action::Drop,
        }
    }
    Action::Pass
}

/// A rewritten packet, routed by the program where the FIB answers.
#[inline(always)]
fn routed(ctx: &TcContext, pkt: &TcpPacket) -> Action {
    match handoff::route(ctx, pkt) {
        Handoff::Redirect => Action::Redirect,
        Handoff::Drop | Handoff::Unparsed => Action::Drop,
        Handoff::Forward | Handoff::NotOurs => Action::Pass,
    }
}

/// Outcome of looking up the socket that owns a packet's own tuple.
enum Owner {
    /// Assigned to an established/request socket.
    Assigned,
    /// No socket owns it (or only a listener / a TIME_WAIT socket for a new SYN).
    None,
}

fn steer_from_client(ctx: &TcContext, pkt: &TcpPacket) {
    let syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    match assign_owner(ctx, pkt, syn, Verdict::SteerEstablished) {
        Owner::Assigned => return,
        Owner::None => {}
    }
    if !syn {
        // A flow this appliance does not splice (started before steering, or
        // spliced by a previous daemon that died): forward it.
        bump(Verdict::SteerPassthrough);
        return;
    }
    assign_listener(ctx, pkt);
}

fn steer_reply(ctx: &TcContext, pkt: &TcpPacket) {
    let _ = assign_owner(ctx, pkt, false, Verdict::SteerReply);
}

#[inline(always)]
fn tuple_of(pkt: &TcpPacket) -> (bpf_sock_tuple, u32) {
    // SAFETY: bpf_sock_tuple is plain old data; all-zero is a valid value.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    if pkt.family == FAMILY_IPV4 {
        // SAFETY: writing the ipv4 member of a zeroed POD union.
        unsafe {
            let v4 = &mut t.__bindgen_anon_1.ipv4;
            v4.saddr = u32::from_ne_bytes([pkt.saddr[0], pkt.saddr[1], pkt.saddr[2], pkt.saddr[3]]);
            v4.daddr = u32::from_ne_bytes([pkt.daddr[0], pkt.daddr[1], pkt.daddr[2], pkt.daddr[3]]);
            v4.sport = pkt.sport.to_be();
            v4.dport = pkt.dport.to_be();
        }
        (t, 12)
    } else {
        // SAFETY: writing the ipv6 member of a zeroed POD union.
        unsafe {
            let v6 = &mut t.__bindgen_anon_1.ipv6;
            v6.saddr = core::mem::transmute::<[u8; 16], [u32; 4]>(pkt.saddr);
            v6.daddr = core::mem::transmute::<[u8; 16], [u32; 4]>(pkt.daddr);
            v6.sport = pkt.sport.to_be();
            v6.dport = pkt.dport.to_be();
        }
        (t, 36)
    }
}

/// Assign the packet to the socket that owns its tuple, if any. A listener found
/// this way is not ours to use; a TIME_WAIT socket does not own a new SYN.
#[inline(never)]
fn assign_owner(ctx: &TcContext, pkt: &TcpPacket, syn: bool, verdict: Verdict) -> Owner {
    let (mut tuple, size) = tuple_of(pkt);
    // SAFETY: helper call with a valid context and a stack tuple of `size` bytes.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return Owner::None;
    }
    // SAFETY: `sk` is a referenced socket returned by the lookup.
    let state = unsafe { (*sk).state };
    if state == BPF_TCP_LISTEN || (syn && state == BPF_TCP_TIME_WAIT) {
        // SAFETY: releasing the reference the lookup took.
        unsafe { bpf_sk_release(sk.cast()) };
        return Owner::None;
    }
    // SAFETY: assigning a referenced socket to the packet, then dropping our ref.
    let rc = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    // SAFETY: as above.
    unsafe { bpf_sk_release(sk.cast()) };
    if rc != 0 {
        bump(Verdict::SteerAssignFailed);
        aya_log_ebpf::warn!(ctx, "bpf_sk_assign to a flow's socket failed: {}", rc);
        return Owner::None;
    }
    mark(ctx);
    bump(verdict);
    Owner::Assigned
}

/// Whether connections to this portal may be steered: every portal, or only
/// those that export a served LUN.
#[inline(always)]
fn portal_served(family: u8, addr: &[u8; 16], port: u16) -> bool {
    // SAFETY: read-only global set before load.
    if unsafe { core::ptr::read_volatile(&STEER_SERVED_ONLY) } == 0 {
        return true;
    }
    let portal = PortalKey {
        family,
        _pad: 0,
        port,
        addr: *addr,
    };
    // SAFETY: the value is only tested for presence.
    unsafe { SERVED_PORTALS.get(&portal).is_some() }
}

/// Assign a new connection's SYN to the splicer's listener for its family.
#[inline(never)]
fn assign_listener(ctx: &TcContext, pkt: &TcpPacket) {
    let key: u32 = if pkt.family == FAMILY_IPV4 {
        LISTENER_V4
    } else {
        LISTENER_V6
    };
    // SAFETY: raw lookup in a SockMap; aya-ebpf 0.2 has no TC-side wrapper. The
    // result is a referenced socket or null.
    let sk = unsafe {
        bpf_map_lookup_elem(
            (&raw const LISTENERS).cast_mut().cast::<c_void>(),
            (&raw const key).cast::<c_void>(),
        )
    }
    .cast::<bpf_sock>();
    if sk.is_null() {
        bump(Verdict::SteerNoListener);
        return;
    }
    if let Some(refused) = new_flow_refused(pkt, key) {
        // SAFETY: dropping the map lookup's reference; the SYN goes on untouched.
        unsafe { bpf_sk_release(sk.cast()) };
        bump(refused);
        return;
    }
    // SAFETY: `sk` is the referenced listener from the map.
    let rc = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    // SAFETY: dropping the map lookup's reference.
    unsafe { bpf_sk_release(sk.cast()) };
    if rc != 0 {
        bump(Verdict::SteerAssignFailed);
        aya_log_ebpf::warn!(ctx, "bpf_sk_assign to the listener failed: {}", rc);
        return;
    }
    mark(ctx);
    bump(Verdict::SteerNewFlow);
}

/// Why a new connection must not be handed to the listener in `slot`, if it must
/// not: the listener's accept loop is not alive or not accepting, or the source
/// is over its per-source cap.
#[inline(always)]
fn new_flow_refused(pkt: &TcpPacket, slot: u32) -> Option<Verdict> {
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(hb) = HEARTBEATS.get(slot) else {
        return Some(Verdict::SteerStaleHeartbeat);
    };
    match hb.liveness(now) {
        Liveness::Fresh => {}
        Liveness::Stale => return Some(Verdict::SteerStaleHeartbeat),
        Liveness::NotAccepting => return Some(Verdict::SteerNotAccepting),
    }
    let source = SourceKey {
        family: pkt.family,
        _pad: [0; 3],
        addr: pkt.saddr,
    };
    // SAFETY: the value is copied out immediately.
    if let Some(until) = unsafe { OVERCAP_SOURCES.get(&source) } {
        if *until > now {
            return Some(Verdict::SteerOverCapSource);
        }
    }
    None
}

#[inline(always)]
fn mark(ctx: &TcContext) {
    // SAFETY: read-only global set before load.
    let m = unsafe { core::ptr::read_volatile(&STEER_MARK) };
    ctx.set_mark(m);
}
