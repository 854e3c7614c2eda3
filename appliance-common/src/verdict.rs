//! Named verdict counters. Each kernel program increments one slot of a per-CPU array
//! per packet (plus extra slots for rare events); user space exports them by name.
//! Nothing here is ever a drop: every verdict ends in "pass" for the packet.

/// Index into the `VERDICTS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Classifier: frame too short for the header being parsed.
    Truncated = 0,
    /// Classifier: not IPv4/IPv6 (ARP, LLDP, ...).
    NotIp = 1,
    /// Classifier: IP but not TCP.
    NotTcp = 2,
    /// Classifier: a non-first IPv4 or IPv6 fragment (no TCP header to read).
    Fragment = 3,
    /// Classifier: TCP, but neither port is classified.
    OtherPort = 4,
    /// Classifier: classified and counted.
    Classified = 5,
    /// Classifier: a Login Request segment copied to the ring buffer.
    LoginCaptured = 6,
    /// Classifier: a Login Request segment seen but the ring buffer was full.
    LoginRingFull = 7,
    /// Classifier: the frame carried an 802.1Q tag (counted in addition).
    Vlan = 8,
    /// Classifier: IPv6 whose chain of extension headers (hop-by-hop, routing,
    /// destination options, fragment) does not reach TCP within four (passed, not
    /// classified). Up to four are walked and the packet classified.
    Ipv6ExtHeader = 9,
    /// TC: packet of a flow spliced by this appliance, assigned to its socket.
    SteerEstablished = 10,
    /// TC: new connection (SYN) assigned to the splicer's listener.
    SteerNewFlow = 11,
    /// TC: a SYN that would be steered, but no listener is registered (fail-open).
    SteerNoListener = 12,
    /// TC: flow carries the nearblock DSCP mark (another appliance splices it): passed.
    SteerMarkedPass = 13,
    /// TC: a reply from upstream assigned to the splicer's upstream socket.
    SteerReply = 14,
    /// TC: `bpf_sk_assign` failed; packet forwarded untouched.
    SteerAssignFailed = 15,
    /// TC: classified packet of a flow this appliance does not splice (e.g. started
    /// before steering was attached): forwarded untouched.
    SteerPassthrough = 16,
    /// TC: a new connection's SYN, forwarded untouched because the listener's
    /// heartbeat is stale (the daemon is stopped or its accept loop wedged).
    SteerStaleHeartbeat = 17,
    /// TC: a new connection's SYN, forwarded untouched because the daemon is alive
    /// but not accepting (out of file descriptors, or at its total connection cap).
    SteerNotAccepting = 18,
    /// TC: a new connection's SYN from a source at its per-source connection cap,
    /// forwarded untouched.
    SteerOverCapSource = 19,
    /// TC: a new connection's SYN to a portal that exports no served LUN,
    /// forwarded untouched (only served portals are steered; `steer_portals`).
    SteerNotServed = 20,
    /// TC: a packet of a connection handed to the kernel, rewritten into the
    /// other end's numbering and forwarded (no socket).
    SteerHandoff = 21,
    /// TC: a handed-off connection's packet without its timestamps where
    /// every mainstream stack puts them: dropped, never forwarded in the wrong
    /// numbering (docs/decisions.md, "Kernel handoff").
    SteerHandoffUnparsed = 22,
    /// TC: a handed-off connection's packet whose header could not be read or
    /// written: dropped (its sender retransmits).
    SteerHandoffDropped = 23,
    /// TC: a handed-off connection's rewritten packet routed by the program
    /// (FIB lookup, TTL decremented) and redirected to its egress interface;
    /// the rest of `tc_steer_handoff` went through the stack's forwarding.
    SteerHandoffRouted = 24,
}

/// Number of slots in the verdict array.
pub const VERDICT_COUNT: u32 = 25;

/// Names for export, indexed by the verdict's value.
pub const VERDICT_NAMES: [&str; VERDICT_COUNT as usize] = [
    "classify_truncated",
    "classify_not_ip",
    "classify_not_tcp",
    "classify_fragment",
    "classify_other_port",
    "classify_matched",
    "classify_login_captured",
    "classify_login_ring_full",
    "classify_vlan",
    "classify_ipv6_ext_header",
    "tc_steer_established",
    "tc_steer_new_flow",
    "tc_steer_no_listener",
    "tc_steer_marked_pass",
    "tc_steer_reply",
    "tc_steer_assign_failed",
    "tc_steer_passthrough",
    "tc_steer_stale_heartbeat",
    "tc_steer_not_accepting",
    "tc_steer_over_cap_source",
    "tc_steer_not_served",
    "tc_steer_handoff",
    "tc_steer_handoff_unparsed",
    "tc_steer_handoff_dropped",
    "tc_steer_handoff_routed",
];
