//! nearblock's kernel programs. Entry points only; parsing lives in `parse`,
//! counting in `count`, steering in `steer`.
//!
//! - `nb_classify` (XDP) or `nb_classify_skb` (TC ingress), one per appliance
//!   interface, whichever costs less there (docs/decisions.md, "Where to
//!   classify"): classify iSCSI / image-transfer flows, count bytes per flow and
//!   per interface, copy Login Request segments to user space. Always `XDP_PASS` /
//!   `TC_ACT_UNSPEC` (TCX: run the next program): an inline appliance never drops.
//! - `nb_steer` (TC ingress, client- and upstream-facing interfaces): hand new
//!   classified connections to the splicer's listener and replies to its
//!   transparent upstream sockets (`bpf_sk_assign` + mark for policy routing).
//!   Packets of connections the splicer handed to the kernel are rewritten and
//!   routed and redirected to their egress interface instead (`handoff`).
//!   `TC_ACT_OK`, except those (`TC_ACT_REDIRECT`) and a handed-off
//!   connection's packet that cannot be rewritten: dropped, as if lost.
//! - `nb_classify_steer` (TC ingress): both of the above in one pass over the
//!   headers, for a steering interface whose classifier runs in TC.
//! - `nb_egress_count` (TC egress, every appliance interface): per-interface tx bytes.
#![no_std]
#![no_main]

mod count;
mod handoff;
mod parse;
mod steer;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn nb_classify(ctx: XdpContext) -> u32 {
    count::classify(&ctx);
    xdp_action::XDP_PASS
}

#[classifier]
pub fn nb_classify_skb(ctx: TcContext) -> i32 {
    count::classify(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn nb_steer(ctx: TcContext) -> i32 {
    tc_action(steer::steer(&ctx))
}

#[classifier]
pub fn nb_classify_steer(ctx: TcContext) -> i32 {
    match count::classify(&ctx) {
        Some(c) => tc_action(steer::steer_classified(
            &ctx, &c.pkt, c.toward, c.from, c.now,
        )),
        None => TC_ACT_OK as i32,
    }
}

#[inline(always)]
fn tc_action(a: steer::Action) -> i32 {
    match a {
        steer::Action::Pass => TC_ACT_OK as i32,
        steer::Action::Drop => TC_ACT_SHOT as i32,
        steer::Action::Redirect => TC_ACT_REDIRECT as i32,
    }
}

#[classifier]
pub fn nb_egress_count(ctx: TcContext) -> i32 {
    count::egress(&ctx);
    TC_ACT_OK as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
