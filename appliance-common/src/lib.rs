//! Types shared by nearblock's kernel programs (`appliance-ebpf`) and user space
//! (`appliance`). Every type here is `#[repr(C)]`, `Copy`, defined exactly once, and
//! its size is asserted at compile time so both sides agree on the layout.
//!
//! # Layout
//! - [`flow`]: the flow key (directional 5-tuple + ingress interface) and its counters.
//! - [`verdict`]: named verdict counters of the classifier and the steering program.
//! - [`event`]: the ring-buffer record that carries iSCSI Login Request segments.
//! - [`maps`]: map names, sizes, interface roles and load-time globals.
//! - [`failopen`]: the heartbeat and over-cap source records (fail open on a hung
//!   daemon).
//! - [`handoff`]: connections handed from the splicer to the kernel, rewritten
//!   packet by packet.
#![no_std]

pub mod event;
pub mod failopen;
pub mod flow;
pub mod handoff;
pub mod maps;
pub mod verdict;

pub use event::LoginEvent;
pub use failopen::{Heartbeat, SourceKey};
pub use flow::{FlowCounters, FlowKey, FlowSeq, IfCounters, PortalKey};
pub use handoff::{HandoffKey, HandoffRewrite};
pub use verdict::Verdict;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and byte
    // arrays, and have explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowCounters {}
    unsafe impl aya::Pod for super::IfCounters {}
    unsafe impl aya::Pod for super::FlowSeq {}
    unsafe impl aya::Pod for super::Heartbeat {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::PortalKey {}
    unsafe impl aya::Pod for super::HandoffKey {}
    unsafe impl aya::Pod for super::HandoffRewrite {}
}
