//! Map names, sizes, interface roles and load-time globals: the contract between the
//! kernel programs and the loader.

/// LRU per-CPU hash `FlowKey -> FlowCounters`.
pub const FLOWS: &str = "FLOWS";
pub const FLOWS_MAX: u32 = 65_536;
/// LRU hash `FlowKey -> FlowSeq`: sequence-space progress per flow (shared by all
/// CPUs), which separates new payload from retransmitted payload.
pub const FLOW_SEQ: &str = "FLOW_SEQ";
/// Per-CPU hash `ifindex -> IfCounters`.
pub const IF_COUNTERS: &str = "IF_COUNTERS";
pub const IF_COUNTERS_MAX: u32 = 256;
/// Per-CPU array of `u64`, indexed by `Verdict`.
pub const VERDICTS: &str = "VERDICTS";
/// Array of `u64`: a bitmap of the classified TCP ports (3260 + image-transfer
/// ports), bit `port % 64` of word `port / 64` ([`port_bit`]). An array, not a
/// hash: the verifier inlines an array lookup, and every packet asks twice.
pub const PORTS: &str = "PORTS";
pub const PORTS_WORDS: u32 = 65_536 / 64;

/// Where `port` (host order) sits in the [`PORTS`] bitmap: the word's index and
/// the bit's mask.
#[inline]
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1 << (port & 63))
}
/// Ring buffer of `LoginEvent`.
pub const LOGIN_EVENTS: &str = "LOGIN_EVENTS";
pub const LOGIN_EVENTS_BYTES: u32 = 256 * 1024;
/// Hash `ifindex -> role bits` for the steering program.
pub const IFACE_ROLES: &str = "IFACE_ROLES";
pub const IFACE_ROLES_MAX: u32 = 256;
/// SockMap of the splicer's listeners: key [`LISTENER_V4`] and [`LISTENER_V6`].
pub const LISTENERS: &str = "LISTENERS";
pub const LISTENER_V4: u32 = 0;
pub const LISTENER_V6: u32 = 1;
/// Array of [`crate::Heartbeat`], indexed like `LISTENERS`: each accept loop's
/// proof of life; a new SYN goes to a listener only while its heartbeat is fresh.
pub const HEARTBEATS: &str = "HEARTBEATS";
pub const HEARTBEATS_MAX: u32 = 2;
/// LRU hash [`crate::SourceKey`] `->` expiry (`CLOCK_MONOTONIC` ns): sources at their
/// per-source connection cap; their new SYNs are forwarded untouched until then.
/// LRU, so a flood of sources can only evict marks (those sources are then steered
/// again and re-marked), never fill the map.
pub const OVERCAP_SOURCES: &str = "OVERCAP_SOURCES";
pub const OVERCAP_SOURCES_MAX: u32 = 4096;

/// Hash [`crate::PortalKey`] `-> 1`: portals that export a served LUN; with
/// [`GLOBAL_STEER_SERVED_ONLY`] set, only SYNs to these are steered.
pub const SERVED_PORTALS: &str = "SERVED_PORTALS";
pub const SERVED_PORTALS_MAX: u32 = 4096;

/// Hash [`crate::HandoffKey`] `->` [`crate::HandoffRewrite`]: one entry per
/// direction of each connection the splicer handed to the kernel. Not LRU: an
/// entry evicted under a live connection would break it; when the map is full
/// the splicer keeps relaying instead.
pub const HANDOFFS: &str = "HANDOFFS";
pub const HANDOFFS_MAX: u32 = 16_384;

/// Role bit: new connections entering here toward a classified port are steered.
pub const ROLE_CLIENT_FACING: u32 = 1;
/// Role bit: replies entering here from a classified port to one of the splicer's
/// transparent upstream sockets are steered to that socket.
pub const ROLE_UPSTREAM_FACING: u32 = 2;

/// Global (set before load): the DSCP codepoint nearblock puts on its own upstream
/// connections; flows carrying it are never steered.
pub const GLOBAL_DSCP_MARK: &str = "DSCP_MARK";
/// Global (set before load): the skb mark the steering program sets so that policy
/// routing delivers the packet locally.
pub const GLOBAL_STEER_MARK: &str = "STEER_MARK";

/// Global (set before load): non-zero = steer new connections only to
/// `SERVED_PORTALS`; zero = to every classified port.
pub const GLOBAL_STEER_SERVED_ONLY: &str = "STEER_SERVED_ONLY";

/// Program names (the functions in appliance-ebpf).
pub const PROG_XDP_CLASSIFY: &str = "nb_classify";
pub const PROG_TC_CLASSIFY: &str = "nb_classify_skb";
pub const PROG_TC_STEER: &str = "nb_steer";
/// Classifier and steering in one TC program, for steering interfaces whose
/// classifier runs in TC: one pass over the headers instead of two.
pub const PROG_TC_CLASSIFY_STEER: &str = "nb_classify_steer";
pub const PROG_TC_EGRESS: &str = "nb_egress_count";

/// The iSCSI well-known port (RFC 7143 §13.2 / IANA).
pub const ISCSI_PORT: u16 = 3260;
