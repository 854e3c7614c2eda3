//! Fail-open on a hung daemon: the records through which the daemon tells the
//! steering program that it is alive and may take new connections.
//!
//! - [`Heartbeat`]: one per listener slot (`HEARTBEATS[LISTENER_V4 | LISTENER_V6]`),
//!   written by that listener's accept loop every [`HEARTBEAT_INTERVAL_NS`]. A new
//!   SYN is steered to the listener only while its heartbeat is [`Liveness::Fresh`];
//!   a stopped (SIGSTOP), wedged or fd-starved daemon's listener is skipped and the
//!   SYN is forwarded untouched.
//! - [`SourceKey`]: key of `OVERCAP_SOURCES` (value: expiry, `CLOCK_MONOTONIC` ns):
//!   sources at their per-source connection cap, whose new SYNs are forwarded.
//!
//! Clock: the kernel reads `bpf_ktime_get_ns()`, which is `CLOCK_MONOTONIC`; the
//! daemon writes `clock_gettime(CLOCK_MONOTONIC)`. (A daemon in a time namespace
//! with a monotonic offset would disagree with the kernel: not supported.)

/// A heartbeat older than this means the accept loop is not running: 1 s. Long
/// enough that a loaded machine's scheduling delays never trip it (the loop writes
/// every 250 ms), short enough that an initiator's SYN retransmission (1 s, then
/// 2 s, ...) after a hang finds the path open.
pub const HEARTBEAT_STALE_NS: u64 = 1_000_000_000;
/// How often an accept loop writes its heartbeat: a quarter of the bound.
pub const HEARTBEAT_INTERVAL_NS: u64 = HEARTBEAT_STALE_NS / 4;

/// One listener's proof of life (an `Array` value, written whole by user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// `CLOCK_MONOTONIC` of the write, nanoseconds. 0: never written.
    pub mono_ns: u64,
    /// 1: the loop takes new connections; 0: it is alive but must not get any
    /// (out of file descriptors, or at its total connection cap).
    pub accepting: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a #[repr(C)] map type: public so both sides build values as literals, never read"
    )]
    pub _pad: u32,
}

/// What a heartbeat says about new connections at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Steer new connections to the listener.
    Fresh,
    /// Not written within [`HEARTBEAT_STALE_NS`] (or never): the daemon is stopped
    /// or its accept loop is not being run.
    Stale,
    /// Alive, but refusing new connections (fds, cap).
    NotAccepting,
}

impl Heartbeat {
    /// The liveness at `now_ns` (same clock as `mono_ns`). A heartbeat written
    /// "after" `now_ns` (another CPU read the clock a moment earlier) is fresh.
    #[expect(
        clippy::inline_always,
        reason = "runs in the eBPF steering program, where a BPF-to-BPF call would cost a stack frame of the verifier's 512 bytes"
    )]
    #[inline(always)]
    pub fn liveness(&self, now_ns: u64) -> Liveness {
        if self.mono_ns == 0 || now_ns.saturating_sub(self.mono_ns) > HEARTBEAT_STALE_NS {
            Liveness::Stale
        } else if self.accepting == 0 {
            Liveness::NotAccepting
        } else {
            Liveness::Fresh
        }
    }
}

/// A connection's source address, family-tagged (IPv4 in the first 4 bytes, the
/// rest zero, as in [`crate::FlowKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// [`crate::flow::FAMILY_IPV4`] or [`crate::flow::FAMILY_IPV6`].
    pub family: u8,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding of a #[repr(C)] map type: public so both sides build values as literals, never read"
    )]
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl From<core::net::IpAddr> for SourceKey {
    fn from(ip: core::net::IpAddr) -> Self {
        let (family, addr) = crate::flow::raw_addr(ip);
        Self {
            family,
            _pad: [0; 3],
            addr,
        }
    }
}

const _: () = assert!(core::mem::size_of::<Heartbeat>() == 16);
const _: () = assert!(core::mem::align_of::<Heartbeat>() == 8);
const _: () = assert!(core::mem::size_of::<SourceKey>() == 20);
const _: () = assert!(core::mem::align_of::<SourceKey>() == 1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{FAMILY_IPV4, FAMILY_IPV6};

    #[test]
    fn heartbeat_liveness() {
        let at = |mono_ns, accepting| Heartbeat {
            mono_ns,
            accepting,
            _pad: 0,
        };
        let t = 50 * HEARTBEAT_STALE_NS;
        assert_eq!(at(0, 1).liveness(t), Liveness::Stale, "never written");
        assert_eq!(at(t, 1).liveness(t), Liveness::Fresh);
        assert_eq!(at(t - HEARTBEAT_STALE_NS, 1).liveness(t), Liveness::Fresh);
        assert_eq!(
            at(t - HEARTBEAT_STALE_NS - 1, 1).liveness(t),
            Liveness::Stale
        );
        // Stale wins over not-accepting: a stopped daemon is stopped.
        assert_eq!(
            at(t - 2 * HEARTBEAT_STALE_NS, 0).liveness(t),
            Liveness::Stale
        );
        assert_eq!(at(t, 0).liveness(t), Liveness::NotAccepting);
        // Written a moment "after" the reader's clock: fresh, not stale.
        assert_eq!(at(t + 5, 1).liveness(t), Liveness::Fresh);
    }

    #[test]
    fn source_keys_tag_the_family() {
        let v4 = SourceKey::from(core::net::IpAddr::from([198, 18, 3, 2]));
        assert_eq!(v4.family, FAMILY_IPV4);
        assert_eq!(&v4.addr[..4], &[198, 18, 3, 2]);
        assert!(v4.addr[4..].iter().all(|b| *b == 0));
        // An IPv6 address with the same leading bytes is a different key.
        let mut o = [0u8; 16];
        o[..4].copy_from_slice(&[198, 18, 3, 2]);
        let v6 = SourceKey::from(core::net::IpAddr::from(o));
        assert_eq!(v6.family, FAMILY_IPV6);
        assert_ne!(v4, v6);
    }
}
