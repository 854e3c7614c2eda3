//! Packet fixtures through `BPF_PROG_TEST_RUN`: hand-built frames → the
//! classifier's verdict, verdict counters, flow counters and login capture (each
//! fixture through both classifiers, XDP and TC, which must agree), and
//! the TC steering program's fail-open decisions for new connections.
//! Fast and topology-free (the program runs on the loopback device's context).
//! Needs root (`CAP_BPF`).

use std::collections::BTreeMap;

use nearblock::{
    classify,
    datapath::{
        Datapath, LoadOptions, PROG_TC_CLASSIFY, PROG_TC_CLASSIFY_STEER, PROG_TC_STEER,
        PROG_XDP_CLASSIFY,
    },
};
use nearblock_lab::fixture_netns::{FixtureNetns, EGRESS_MAC, NEXT_HOP_MAC};

const XDP_PASS: u32 = 2;
/// `TC_ACT_UNSPEC` (-1): TCX runs the next program (steering).
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_OK: u32 = 0;

fn load() -> Datapath {
    Datapath::load(&LoadOptions {
        classified_ports: vec![3260, 10809],
        dscp_mark: 5,
        steer_mark: 0x6e62,
        steer_served_only: false,
    })
    .expect("load the eBPF programs (root, and built by cargo xtask build)")
}

fn verdicts(dp: &Datapath) -> BTreeMap<&'static str, u64> {
    dp.verdicts().unwrap().into_iter().collect()
}

struct Tcp<'a> {
    sport: u16,
    dport: u16,
    seq: u32,
    flags: u8,
    payload: &'a [u8],
}

fn tcp_header(t: &Tcp) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&t.sport.to_be_bytes());
    h[2..4].copy_from_slice(&t.dport.to_be_bytes());
    h[4..8].copy_from_slice(&t.seq.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = t.flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    h.extend_from_slice(t.payload);
    h
}

fn eth(ethertype: u16, vlans: &[u16]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for v in vlans {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn ipv4(proto: u8, frag: u16, body: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + body.len()) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&[198, 18, 3, 2]);
    h[16..20].copy_from_slice(&[198, 18, 0, 1]);
    h.extend_from_slice(body);
    h
}

fn ipv6(next: u8, body: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(
        &"fd00:6e62:0:3::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    h[24..40].copy_from_slice(
        &"fd00:6e62::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    h.extend_from_slice(body);
    h
}

fn frame(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// The attachments of the one classifier: XDP, TC, and TC combined with
/// steering (a steering interface's one program; no role is set for the
/// fixtures' interface, so it only classifies).
#[derive(Clone, Copy, Debug)]
enum Classifier {
    Xdp,
    Tc,
    TcSteering,
}

const ALL: [Classifier; 3] = [Classifier::Xdp, Classifier::Tc, Classifier::TcSteering];

impl Classifier {
    fn program(self) -> &'static str {
        match self {
            Classifier::Xdp => PROG_XDP_CLASSIFY,
            Classifier::Tc => PROG_TC_CLASSIFY,
            Classifier::TcSteering => PROG_TC_CLASSIFY_STEER,
        }
    }
}

fn run(dp: &Datapath, c: Classifier, f: &[u8]) {
    let (action, _) = dp.test_run_frame(c.program(), f).expect("test run");
    match c {
        Classifier::Xdp => assert_eq!(action, XDP_PASS, "XDP never drops"),
        Classifier::Tc => assert_eq!(
            action, TC_ACT_UNSPEC,
            "the TC classifier never ends the chain"
        ),
        Classifier::TcSteering => assert_eq!(action, TC_ACT_OK, "nothing to steer: go on"),
    }
}

fn login_pdu() -> Vec<u8> {
    let text = b"InitiatorName=iqn.2026-11.test:fixture\0TargetName=iqn.2026-11.lib:img\0";
    let mut p = vec![0u8; 48];
    p[0] = 0x43;
    p[1] = 0x87;
    p[5..8].copy_from_slice(&(text.len() as u32).to_be_bytes()[1..]);
    p.extend_from_slice(text);
    while !p.len().is_multiple_of(4) {
        p.push(0);
    }
    p
}

#[test]
fn every_fixture_passes_with_the_expected_verdict() {
    for c in ALL {
        fixtures_pass_with_the_expected_verdict(c);
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the fixture table, read top to bottom"
)]
fn fixtures_pass_with_the_expected_verdict(classifier: Classifier) {
    let dp = load();
    let data = [7u8; 100];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "IPv4 to 3260",
            frame(&[
                eth(0x0800, &[]),
                ipv4(
                    6,
                    0,
                    &tcp_header(&Tcp {
                        sport: 40000,
                        dport: 3260,
                        seq: 1,
                        flags: 0x18,
                        payload: &data,
                    }),
                ),
            ]),
            "classify_matched",
        ),
        (
            "IPv4 from 3260 (the other direction)",
            frame(&[
                eth(0x0800, &[]),
                ipv4(
                    6,
                    0,
                    &tcp_header(&Tcp {
                        sport: 3260,
                        dport: 40000,
                        seq: 1,
                        flags: 0x18,
                        payload: &data,
                    }),
                ),
            ]),
            "classify_matched",
        ),
        (
            "IPv4 to an image-transfer port",
            frame(&[
                eth(0x0800, &[]),
                ipv4(
                    6,
                    0,
                    &tcp_header(&Tcp {
                        sport: 40001,
                        dport: 10809,
                        seq: 1,
                        flags: 0x10,
                        payload: &[],
                    }),
                ),
            ]),
            "classify_matched",
        ),
        (
            "IPv6 to 3260",
            frame(&[
                eth(0x86dd, &[]),
                ipv6(
                    6,
                    &tcp_header(&Tcp {
                        sport: 40002,
                        dport: 3260,
                        seq: 9,
                        flags: 0x02,
                        payload: &[],
                    }),
                ),
            ]),
            "classify_matched",
        ),
        (
            "IPv6 with a destination-options header before TCP",
            {
                let mut ext = vec![6u8, 0, 0, 0, 0, 0, 0, 0];
                ext.extend_from_slice(&tcp_header(&Tcp {
                    sport: 40003,
                    dport: 3260,
                    seq: 9,
                    flags: 0x10,
                    payload: &[],
                }));
                frame(&[eth(0x86dd, &[]), ipv6(60, &ext)])
            },
            "classify_matched",
        ),
        (
            "802.1Q tagged IPv4 to 3260",
            frame(&[
                eth(0x0800, &[42]),
                ipv4(
                    6,
                    0,
                    &tcp_header(&Tcp {
                        sport: 40004,
                        dport: 3260,
                        seq: 1,
                        flags: 0x10,
                        payload: &[],
                    }),
                ),
            ]),
            "classify_matched",
        ),
        (
            "QinQ tagged IPv4 to 3260",
            frame(&[
                eth(0x0800, &[42, 7]),
                ipv4(
                    6,
                    0,
                    &tcp_header(&Tcp {
                        sport: 40005,
                        dport: 3260,
                        seq: 1,
                        flags: 0x10,
                        payload: &[],
                    }),
                ),
            ]),
            "classify_matched",
        ),
        (
            "other TCP port",
            frame(&[
                eth(0x0800, &[]),
                ipv4(
                    6,
                    0,
                    &tcp_header(&Tcp {
                        sport: 40006,
                        dport: 22,
                        seq: 1,
                        flags: 0x10,
                        payload: &[],
                    }),
                ),
            ]),
            "classify_other_port",
        ),
        (
            "UDP",
            frame(&[eth(0x0800, &[]), ipv4(17, 0, &[0u8; 16])]),
            "classify_not_tcp",
        ),
        (
            "non-first IPv4 fragment",
            frame(&[eth(0x0800, &[]), ipv4(6, 185, &[0u8; 40])]),
            "classify_fragment",
        ),
        (
            "IPv6 non-first fragment",
            {
                let frag = [6u8, 0, 0x05, 0x00, 0, 0, 0, 1];
                frame(&[
                    eth(0x86dd, &[]),
                    ipv6(44, &[frag.as_slice(), &[0u8; 32]].concat()),
                ])
            },
            "classify_fragment",
        ),
        (
            "ARP",
            frame(&[eth(0x0806, &[]), vec![0u8; 28]]),
            "classify_not_ip",
        ),
        (
            "truncated TCP header",
            {
                let mut f = frame(&[
                    eth(0x0800, &[]),
                    ipv4(
                        6,
                        0,
                        &tcp_header(&Tcp {
                            sport: 1,
                            dport: 3260,
                            seq: 1,
                            flags: 0,
                            payload: &[],
                        }),
                    ),
                ]);
                f.truncate(14 + 20 + 10);
                f
            },
            "classify_truncated",
        ),
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, so the
        // shortest fixture is a header announcing IPv4 with 10 bytes of it.
        (
            "IPv4 header cut short",
            frame(&[
                eth(0x0800, &[]),
                [0x45, 0, 0, 30, 0, 0, 0, 0, 64, 6].to_vec(),
            ]),
            "classify_truncated",
        ),
        (
            "VLAN tag cut short",
            frame(&[eth(0x8100, &[]), vec![0; 1]]),
            "classify_truncated",
        ),
    ];
    for (name, f, expect) in cases {
        let before = verdicts(&dp);
        if !matches!(classifier, Classifier::Xdp) && name == "IPv4 header cut short" {
            // BPF_PROG_TEST_RUN builds an skb only around a whole IPv4 header
            // (it reads the addresses for the test socket); the TC classifier
            // parses with the same code as XDP, which covers this frame.
            assert!(
                dp.test_run_frame(classifier.program(), &f).is_err(),
                "the kernel's test run refuses an skb with a cut IPv4 header"
            );
            continue;
        }
        run(&dp, classifier, &f);
        let after = verdicts(&dp);
        let changed: Vec<_> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v) && **k != "classify_vlan")
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(changed, [expect], "{name} ({classifier:?})");
    }
    let v = verdicts(&dp);
    assert_eq!(
        v["classify_vlan"], 2,
        "two tagged fixtures ({classifier:?})"
    );
}

#[test]
fn flow_counters_count_both_directions_payload_frames_and_retransmissions() {
    for c in ALL {
        flow_counters_count(c);
    }
}

fn flow_counters_count(classifier: Classifier) {
    let dp = load();
    let payload = [1u8; 1000];
    let seg = |seq: u32| {
        frame(&[
            eth(0x0800, &[]),
            ipv4(
                6,
                0,
                &tcp_header(&Tcp {
                    sport: 41000,
                    dport: 3260,
                    seq,
                    flags: 0x18,
                    payload: &payload,
                }),
            ),
        ])
    };
    let back = frame(&[
        eth(0x0800, &[]),
        ipv4(
            6,
            0,
            &tcp_header(&Tcp {
                sport: 3260,
                dport: 41000,
                seq: 5,
                flags: 0x10,
                payload: &[],
            }),
        ),
    ]);
    run(&dp, classifier, &seg(1000));
    run(&dp, classifier, &seg(2000));
    run(&dp, classifier, &seg(1000)); // a retransmission
    run(&dp, classifier, &seg(4000)); // ahead of a gap
    run(&dp, classifier, &seg(3000)); // the reordered segment filling the gap: new data
    run(&dp, classifier, &back);
    let flows = dp.flows().unwrap();
    let fwd = flows
        .iter()
        .find(|f| f.key.dport == 3260 && f.key.sport == 41000)
        .expect("forward flow");
    assert_eq!(fwd.counters.packets, 5, "{classifier:?}");
    assert_eq!(fwd.counters.payload_bytes, 5000);
    assert_eq!(
        fwd.new_bytes, 4000,
        "one retransmission, reordering is not one"
    );
    assert_eq!(fwd.counters.frame_bytes, 5 * (14 + 20 + 20 + 1000));
    assert_eq!(fwd.key.ifindex, 1, "test runs on loopback's context");
    let rev = flows
        .iter()
        .find(|f| f.key.sport == 3260)
        .expect("reverse flow");
    assert_eq!(rev.counters.packets, 1);
    assert_eq!(rev.counters.payload_bytes, 0);
    let (src, dst) = classify::endpoints(&fwd.key);
    assert_eq!(
        (src.as_str(), dst.as_str()),
        ("198.18.3.2:41000", "198.18.0.1:3260")
    );
}

#[test]
fn login_request_is_captured_for_discovery() {
    for c in ALL {
        login_request_is_captured(c);
    }
}

fn login_request_is_captured(classifier: Classifier) {
    let mut dp = load();
    let mut ring = dp.take_login_events().unwrap();
    let pdu = login_pdu();
    run(
        &dp,
        classifier,
        &frame(&[
            eth(0x0800, &[]),
            ipv4(
                6,
                0,
                &tcp_header(&Tcp {
                    sport: 42000,
                    dport: 3260,
                    seq: 1,
                    flags: 0x18,
                    payload: &pdu,
                }),
            ),
        ]),
    );
    // The target's Login Response (opcode 0x23, from port 3260) is not captured.
    let mut resp = pdu.clone();
    resp[0] = 0x23;
    run(
        &dp,
        classifier,
        &frame(&[
            eth(0x0800, &[]),
            ipv4(
                6,
                0,
                &tcp_header(&Tcp {
                    sport: 3260,
                    dport: 42000,
                    seq: 1,
                    flags: 0x18,
                    payload: &resp,
                }),
            ),
        ]),
    );
    let item = ring.next().expect("a login event");
    let (key, payload) = classify::decode_event(&item).expect("decodes");
    drop(item);
    assert!(ring.next().is_none(), "only the request is captured");
    let seen = classify::parse_login(&key, &payload).expect("parses");
    assert_eq!(seen.initiator_iqn, "iqn.2026-11.test:fixture");
    assert_eq!(seen.target_iqn.as_deref(), Some("iqn.2026-11.lib:img"));
    assert_eq!(seen.initiator_addr.to_string(), "198.18.3.2");
    assert_eq!(verdicts(&dp)["classify_login_captured"], 1);
}

/// A bare SYN toward the iSCSI port from 198.18.3.2 (IPv4) or `fd00:6e62:0:3::2`.
fn syn(v6: bool, sport: u16) -> Vec<u8> {
    let tcp = tcp_header(&Tcp {
        sport,
        dport: 3260,
        seq: 1,
        flags: 0x02,
        payload: &[],
    });
    if v6 {
        frame(&[eth(0x86dd, &[]), ipv6(6, &tcp)])
    } else {
        frame(&[eth(0x0800, &[]), ipv4(6, 0, &tcp)])
    }
}

/// Run one SYN through steering program `prog` (alone or combined with the
/// classifier); the steering verdicts that changed.
fn steer_syn(dp: &Datapath, prog: &'static str, v6: bool) -> BTreeMap<&'static str, u64> {
    let before = verdicts(dp);
    assert_eq!(
        dp.test_run_frame(prog, &syn(v6, 40000))
            .expect("test run")
            .0,
        TC_ACT_OK,
        "the steering program never drops"
    );
    verdicts(dp)
        .into_iter()
        .filter(|(n, v)| n.starts_with("tc_steer") && before.get(n) != Some(v))
        .map(|(n, v)| (n, v - before.get(n).copied().unwrap_or(0)))
        .collect()
}

/// A new connection's SYN reaches the listener only while the listener's
/// heartbeat is fresh and accepting and its source is not over its cap; else it
/// is forwarded untouched under a named verdict. A missing listener still counts
/// as such (it is checked first).
#[test]
fn steering_of_new_connections_fails_open_on_a_hung_daemon() {
    for prog in [PROG_TC_STEER, PROG_TC_CLASSIFY_STEER] {
        steering_fails_open(prog);
    }
}

fn steering_fails_open(prog: &'static str) {
    use nearblock::datapath::monotonic_ns;
    use nearblock::datapath::{LISTENER_V4, ROLE_CLIENT_FACING};

    let mut dp = load();
    // The test run's skb enters on the loopback device.
    dp.set_interface_role(1, ROLE_CLIENT_FACING).unwrap();
    let fail_open = dp.take_fail_open_maps().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    dp.register_listener(LISTENER_V4, &listener).unwrap();
    let one = |name: &'static str| BTreeMap::from([(name, 1u64)]);
    // Steered: handed to the listener (the test run's skb is not at TC ingress,
    // so the kernel may refuse the assignment itself: either is the steering path).
    let steered = |changed: &BTreeMap<&'static str, u64>| {
        changed == &one("tc_steer_new_flow") || changed == &one("tc_steer_assign_failed")
    };

    assert_eq!(
        steer_syn(&dp, prog, false),
        one("tc_steer_stale_heartbeat"),
        "never written"
    );
    fail_open.beat(LISTENER_V4, true).unwrap();
    let changed = steer_syn(&dp, prog, false);
    assert!(steered(&changed), "fresh heartbeat: {changed:?}");
    fail_open.beat(LISTENER_V4, false).unwrap();
    assert_eq!(steer_syn(&dp, prog, false), one("tc_steer_not_accepting"));

    fail_open.beat(LISTENER_V4, true).unwrap();
    let source = std::net::IpAddr::from([198, 18, 3, 2]);
    fail_open
        .mark_over_cap(source, monotonic_ns() + 60_000_000_000)
        .unwrap();
    assert_eq!(steer_syn(&dp, prog, false), one("tc_steer_over_cap_source"));
    // An expired mark no longer applies; a removed one neither.
    fail_open.mark_over_cap(source, monotonic_ns() - 1).unwrap();
    let changed = steer_syn(&dp, prog, false);
    assert!(steered(&changed), "expired mark: {changed:?}");
    fail_open
        .mark_over_cap(source, monotonic_ns() + 60_000_000_000)
        .unwrap();
    fail_open.unmark_over_cap(source).unwrap();
    let changed = steer_syn(&dp, prog, false);
    assert!(steered(&changed), "removed mark: {changed:?}");

    // A heartbeat that stops: stale after 1 s.
    fail_open.beat(LISTENER_V4, true).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(steer_syn(&dp, prog, false), one("tc_steer_stale_heartbeat"));

    // No IPv6 listener: that, not its (never written) heartbeat, is the verdict.
    assert_eq!(steer_syn(&dp, prog, true), one("tc_steer_no_listener"));
}

const TC_ACT_SHOT: u32 = 2;

/// A TCP segment from 198.18.3.2:40000 to 198.18.0.1:3260 with `options`,
/// its checksum filled in.
fn tcp_segment(seq: u32, ack: u32, window: u16, options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&40000u16.to_be_bytes());
    h[2..4].copy_from_slice(&3260u16.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = (((20 + options.len()) / 4) as u8) << 4;
    h[13] = 0x10; // ACK
    h[14..16].copy_from_slice(&window.to_be_bytes());
    h.extend_from_slice(options);
    let sum = tcp_sum(&h);
    h[16..18].copy_from_slice(&(!sum).to_be_bytes());
    h
}

/// One's-complement sum of the IPv4 pseudo-header (the fixture's addresses)
/// and `segment`, folded to 16 bits: 0xffff over a segment with a valid
/// checksum.
fn tcp_sum(segment: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&[198, 18, 3, 2, 198, 18, 0, 1, 0, 6]);
    add(&(segment.len() as u16).to_be_bytes());
    add(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// A handed-off connection's packet is rewritten exactly, in the kernel:
/// sequence and acknowledgement numbers, the timestamps (`TSval`, `TSecr`), both SACK edges,
/// the window rescaled; the checksum stays valid; an acknowledgement at the
/// watched number sets `acked`. The first packet of a direction learns its
/// `TSval` delta and gives the opposite direction its `TSecr` delta. A packet
/// without its timestamps where they are looked for is dropped, never sent
/// on in the old numbering.
#[test]
fn handed_off_packets_are_rewritten_exactly() {
    for routed in [false, true] {
        let ns = FixtureNetns::new(routed);
        nearblock_lab::in_namespace(ns.path(), move || {
            for prog in [PROG_TC_STEER, PROG_TC_CLASSIFY_STEER] {
                handed_off_packets_are_rewritten_by(prog, routed);
            }
        });
    }
}

const TC_ACT_REDIRECT: u32 = 7;

/// An IPv6 handed-off packet is routed too: the hop limit, not a checksum,
/// and the next hop from the IPv6 FIB.
#[test]
fn handed_off_ipv6_packets_are_routed() {
    let ns = FixtureNetns::new(true);
    nearblock_lab::in_namespace(ns.path(), || {
        for prog in [PROG_TC_STEER, PROG_TC_CLASSIFY_STEER] {
            handed_off_ipv6_packet_is_routed_by(prog);
        }
    });
}

fn handed_off_ipv6_packet_is_routed_by(prog: &'static str) {
    use nearblock::datapath::{HandoffKey, HandoffRewrite, ROLE_CLIENT_FACING};

    let mut dp = load();
    dp.set_interface_role(1, ROLE_CLIENT_FACING).unwrap();
    let map = dp.take_handoff_map().unwrap();
    let initiator: std::net::SocketAddr = "[fd00:6e62:0:3::2]:40000".parse().unwrap();
    let target: std::net::SocketAddr = "[fd00:6e62::1]:3260".parse().unwrap();
    let key = HandoffKey::new(initiator, target);
    let rewrite = HandoffRewrite {
        seq_delta: 1000,
        ..HandoffRewrite::default()
    };
    map.install((key, rewrite), (key.reversed(), HandoffRewrite::default()))
        .unwrap();
    let segment = tcp_segment(5000, 9000, 4000, &[]);
    let (action, out) = dp
        .test_run_frame(prog, &frame(&[eth(0x86dd, &[]), ipv6(6, &segment)]))
        .unwrap();
    assert_eq!(action, TC_ACT_REDIRECT, "{prog}");
    assert_eq!(out[0..6], NEXT_HOP_MAC, "{prog}: destination MAC");
    assert_eq!(out[6..12], EGRESS_MAC, "{prog}: source MAC");
    assert_eq!(out[14 + 7], 63, "{prog}: hop limit decremented");
    assert_eq!(be32(&out[14 + 40..], 4), 6000, "{prog}: seq rewritten");
    assert_eq!(verdicts(&dp)["tc_steer_handoff_routed"], 1, "{prog}");
}

/// `frame` (Ethernet + IPv4) with its IPv4 header checksum filled in.
fn with_ip_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = ip_sum(&frame[14..34]);
    frame[24..26].copy_from_slice(&(!sum).to_be_bytes());
    frame
}

/// One's-complement sum of an IPv4 header, folded: 0xffff when its
/// checksum is valid.
fn ip_sum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The routed namespace's promise: the packet leaves toward the next hop
/// with one TTL less and a valid IPv4 header checksum.
fn assert_routed(out: &[u8]) {
    assert_eq!(out[0..6], NEXT_HOP_MAC, "destination MAC: the next hop's");
    assert_eq!(out[6..12], EGRESS_MAC, "source MAC: the egress interface's");
    assert_eq!(out[14 + 8], 63, "TTL decremented");
    assert_eq!(ip_sum(&out[14..34]), 0xffff, "IPv4 checksum after the TTL");
}

#[expect(
    clippy::too_many_lines,
    reason = "one handed-off connection's packets, in the order they pass"
)]
fn handed_off_packets_are_rewritten_by(prog: &'static str, routed: bool) {
    use nearblock::datapath::{HandoffKey, HandoffRewrite, ROLE_CLIENT_FACING};

    // Routed by the program and redirected, or left to the stack.
    let forwarded = if routed { TC_ACT_REDIRECT } else { TC_ACT_OK };

    let mut dp = load();
    dp.set_interface_role(1, ROLE_CLIENT_FACING).unwrap();
    let map = dp.take_handoff_map().unwrap();
    let initiator: std::net::SocketAddr = "198.18.3.2:40000".parse().unwrap();
    let target: std::net::SocketAddr = "198.18.0.1:3260".parse().unwrap();
    let key = HandoffKey::new(initiator, target);
    let rewrite = HandoffRewrite {
        seq_delta: 1000,
        ack_delta: 0u32.wrapping_sub(500),
        tsval_delta: 7,
        tsval_known: 1,
        tsecr_delta: 3,
        tsecr_known: 1,
        timestamps: 1,
        window_shift: -2,
        watch_ack: 9000,
        ..HandoffRewrite::default()
    };
    map.install((key, rewrite), (key.reversed(), HandoffRewrite::default()))
        .unwrap();
    // NOP NOP TS(100, 200), NOP NOP SACK one block [9500, 9600).
    let mut options = vec![1, 1, 8, 10];
    options.extend_from_slice(&100u32.to_be_bytes());
    options.extend_from_slice(&200u32.to_be_bytes());
    options.extend_from_slice(&[1, 1, 5, 10]);
    options.extend_from_slice(&9500u32.to_be_bytes());
    options.extend_from_slice(&9600u32.to_be_bytes());
    let segment = tcp_segment(5000, 9000, 4000, &options);
    assert_eq!(tcp_sum(&segment), 0xffff, "the fixture's own checksum");
    let before = verdicts(&dp);
    let (action, out) = dp
        .test_run_frame(
            prog,
            &with_ip_checksum(frame(&[eth(0x0800, &[]), ipv4(6, 0, &segment)])),
        )
        .unwrap();
    assert_eq!(action, forwarded, "{prog}, routed {routed}");
    if routed {
        assert_routed(&out);
    } else {
        assert_eq!(
            out[14 + 8],
            64,
            "the stack decrements the TTL, not the program"
        );
    }
    let tcp = &out[14 + 20..];
    assert_eq!(tcp.len(), segment.len());
    assert_eq!(be32(tcp, 4), 6000, "seq");
    assert_eq!(be32(tcp, 8), 8500, "ack");
    assert_eq!(u16::from_be_bytes([tcp[14], tcp[15]]), 1000, "window");
    assert_eq!((be32(tcp, 24), be32(tcp, 28)), (107, 203), "TSval, TSecr");
    assert_eq!((be32(tcp, 36), be32(tcp, 40)), (9000, 9100), "SACK block");
    assert_eq!(tcp_sum(tcp), 0xffff, "checksum after the rewrite");
    assert_eq!(map.get(&key).unwrap().acked, 1);
    let after = verdicts(&dp);
    assert_eq!(after["tc_steer_handoff"], before["tc_steer_handoff"] + 1);
    assert_eq!(
        after["tc_steer_handoff_routed"],
        before["tc_steer_handoff_routed"] + u64::from(routed)
    );

    // Without timestamps where they are looked for: dropped and counted.
    let bare = tcp_segment(5000, 9000, 4000, &[]);
    let (action, _) = dp
        .test_run_frame(prog, &frame(&[eth(0x0800, &[]), ipv4(6, 0, &bare)]))
        .unwrap();
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(
        verdicts(&dp)["tc_steer_handoff_unparsed"],
        after["tc_steer_handoff_unparsed"] + 1
    );

    // A fresh connection: the first packet learns TSval's delta, maps it onto
    // the receiver-side socket's clock, and hands the reverse its TSecr delta;
    // until then TSecr goes out as 0.
    map.remove(&key);
    let learning = HandoffRewrite {
        timestamps: 1,
        receiver_ts_offset_ms: 5_000_000,
        ..HandoffRewrite::default()
    };
    map.install((key, learning), (key.reversed(), HandoffRewrite::default()))
        .unwrap();
    let segment = tcp_segment(5000, 9000, 4000, &options[..12]);
    let (action, out) = dp
        .test_run_frame(
            prog,
            &with_ip_checksum(frame(&[eth(0x0800, &[]), ipv4(6, 0, &segment)])),
        )
        .unwrap();
    assert_eq!(action, forwarded, "{prog}, routed {routed}");
    if routed {
        assert_routed(&out);
    }
    let tcp = &out[14 + 20..];
    let learned = map.get(&key).unwrap();
    let reverse = map.get(&key.reversed()).unwrap();
    assert_eq!(learned.tsval_known, 1);
    assert_eq!(be32(tcp, 24), 100u32.wrapping_add(learned.tsval_delta));
    // On the receiver's clock (CLOCK_MONOTONIC in ms plus its offset), one
    // tick ahead of when the packet passed, so never behind what it last saw.
    let now_ms = (nearblock::datapath::monotonic_ns() / 1_000_000) as u32;
    let lead = be32(tcp, 24)
        .wrapping_sub(5_000_000)
        .wrapping_sub(now_ms)
        .cast_signed();
    assert!(
        (-5_000..=1).contains(&lead),
        "TSval {lead} ms off the receiver's clock"
    );
    assert_eq!(be32(tcp, 28), 0, "TSecr before the reverse delta is known");
    assert_eq!(reverse.tsecr_known, 1);
    assert_eq!(reverse.tsecr_delta, 0u32.wrapping_sub(learned.tsval_delta));
    assert_eq!(tcp_sum(tcp), 0xffff, "checksum after the rewrite");

    // The initiator reconnects from the same port: its SYN is not rewritten,
    // and the stale entries go.
    let mut syn = tcp_segment(77, 0, 4000, &options[..12]);
    syn[13] = 0x02;
    let (action, out) = dp
        .test_run_frame(prog, &frame(&[eth(0x0800, &[]), ipv4(6, 0, &syn)]))
        .unwrap();
    assert_eq!(action, TC_ACT_OK);
    assert_eq!(be32(&out[14 + 20..], 4), 77, "the SYN's sequence number");
    assert!(
        map.get(&key).is_none() && map.get(&key.reversed()).is_none(),
        "{:?} {:?} {:?}",
        map.get(&key),
        map.get(&key.reversed()),
        verdicts(&dp)
    );
}
