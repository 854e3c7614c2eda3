//! A network namespace for packet fixtures run with `BPF_PROG_TEST_RUN`
//! (`tests/tests/classifier_fixtures.rs`, `bench-programs`): a test run's skb
//! enters on the loopback device of the caller's namespace, and the handoff's
//! routing asks that namespace's FIB. Run the fixture on a thread inside it
//! ([`crate::in_namespace`]).

/// The routed namespace's egress interface and next hop.
pub const EGRESS_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

/// A network namespace of the fixture's own (removed on drop), where the
/// test run's skb enters on its loopback device. Routed: `198.18.0.0/16` via
/// `10.99.0.2` and `fd00:6e62::/32` via `fd99::2` on one end of a veth pair, the
/// next hops' addresses resolved, and forwarding on; else nothing but `lo`,
/// so the FIB answers nothing.
pub struct FixtureNetns(String);

impl FixtureNetns {
    pub fn new(routed: bool) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "nbfix-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let ns = Self(name.clone());
        let ip = |args: &str| {
            let argv: Vec<&str> = args.split_whitespace().collect();
            let st = std::process::Command::new("ip")
                .args(["-n", &name])
                .args(&argv)
                .status()
                .expect("ip");
            assert!(st.success(), "ip -n {name} {args}");
        };
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {name}");
        ip("link set lo up");
        if routed {
            ip("link add d0 address 02:00:00:00:00:01 type veth peer name d1");
            ip("link set d1 up");
            ip("link set d0 up");
            ip("addr add 10.99.0.1/24 dev d0");
            ip("route add 198.18.0.0/16 via 10.99.0.2");
            ip("neigh add 10.99.0.2 lladdr 02:00:00:00:00:99 dev d0 nud permanent");
            ip("-6 addr add fd99::1/64 dev d0 nodad");
            ip("-6 route add fd00:6e62::/32 via fd99::2");
            ip("-6 neigh add fd99::2 lladdr 02:00:00:00:00:99 dev d0 nud permanent");
            for knob in [
                "net.ipv4.conf.all.forwarding=1",
                "net.ipv6.conf.all.forwarding=1",
            ] {
                let st = std::process::Command::new("ip")
                    .args(["netns", "exec", &name, "sysctl", "-qw", knob])
                    .status()
                    .expect("sysctl");
                assert!(st.success(), "{knob} in {name}");
            }
        }
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for FixtureNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}
