//! What each kernel program costs one packet, measured by the kernel itself
//! (`BPF_PROG_TEST_RUN` with a repeat count: the mean ns per run, no network
//! around it). Part of `cargo xtask bench datapath`. Frames are the ones a
//! handed-off iSCSI session carries: a 1,448-byte Data-In segment from the
//! target and the initiator's bare ACK, both with timestamps. They run in a
//! namespace of their own with a route to the target (`FixtureNetns`), so a
//! handed-off packet's cost includes its routing (FIB lookup, TTL, redirect).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use nearblock::datapath::{
    Datapath, HandoffKey, HandoffRewrite, LoadOptions, PROG_TC_CLASSIFY, PROG_TC_CLASSIFY_STEER,
    PROG_TC_EGRESS, PROG_TC_STEER, PROG_XDP_CLASSIFY, ROLE_CLIENT_FACING, ROLE_UPSTREAM_FACING,
};

/// Runs per call. A test run repeats the program on one skb, so what it
/// changes accumulates: the routed path decrements the TTL (255 in the
/// frames), and 250 runs keep every one of them routed.
const REPEAT: u32 = 250;
/// Calls per figure per round: 10⁵ runs.
const CALLS: u32 = 400;
const ROUNDS: usize = 7;

fn segment(src: SocketAddr, dst: SocketAddr, payload: usize) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        unreachable!("IPv4 fixtures")
    };
    let mut tcp = vec![0u8; 32];
    tcp[0..2].copy_from_slice(&s.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&d.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&5000u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&9000u32.to_be_bytes());
    tcp[12] = 8 << 4;
    tcp[13] = 0x10;
    tcp[14..16].copy_from_slice(&2000u16.to_be_bytes());
    tcp[20..24].copy_from_slice(&[1, 1, 8, 10]);
    tcp[24..28].copy_from_slice(&100u32.to_be_bytes());
    tcp[28..32].copy_from_slice(&200u32.to_be_bytes());
    tcp.resize(32 + payload, 0x5a);
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip[8] = 255;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&s.ip().octets());
    ip[16..20].copy_from_slice(&d.ip().octets());
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

fn median(mut v: Vec<u32>) -> u32 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let ns = nearblock_lab::fixture_netns::FixtureNetns::new(true);
    nearblock_lab::in_namespace(ns.path(), measure)
}

fn measure() -> Result<()> {
    let initiator: SocketAddr = "198.18.3.2:40000".parse()?;
    let target: SocketAddr = "198.18.0.1:3260".parse()?;
    let unserved: SocketAddr = "198.18.0.9:3260".parse()?;
    let mut dp = Datapath::load(&LoadOptions {
        classified_ports: vec![3260, 80],
        dscp_mark: 5,
        steer_mark: 0x6e62,
        steer_served_only: true,
    })
    .context("load the eBPF programs (root, built by cargo xtask build)")?;
    // The fixtures run on the loopback device's context (ifindex 1), which
    // plays both roles.
    dp.set_interface_role(1, ROLE_CLIENT_FACING | ROLE_UPSTREAM_FACING)?;
    dp.serve_portal(target)?;
    let handoffs = dp.take_handoff_map()?;
    let key = HandoffKey::new(initiator, target);
    let rewrite = HandoffRewrite {
        seq_delta: 1000,
        ack_delta: 0u32.wrapping_sub(500),
        tsval_delta: 7,
        tsval_known: 1,
        tsecr_delta: 3,
        tsecr_known: 1,
        timestamps: 1,
        ..HandoffRewrite::default()
    };
    handoffs.install((key, rewrite), (key.reversed(), rewrite))?;

    let data_in = segment(target, initiator, 1448);
    let ack = segment(initiator, target, 0);
    let unserved_data = segment(unserved, initiator, 1448);
    let cases: [(&str, &'static str, &[u8]); 9] = [
        (
            "classifier, TC: Data-In segment",
            PROG_TC_CLASSIFY,
            &data_in,
        ),
        ("classifier, TC: bare ACK", PROG_TC_CLASSIFY, &ack),
        (
            "classifier, XDP: Data-In segment",
            PROG_XDP_CLASSIFY,
            &data_in,
        ),
        (
            "steering: handed-off Data-In (rewrite)",
            PROG_TC_STEER,
            &data_in,
        ),
        ("steering: handed-off ACK (rewrite)", PROG_TC_STEER, &ack),
        (
            "steering: portal with no served LUN",
            PROG_TC_STEER,
            &unserved_data,
        ),
        (
            "classify + steer in one: handed-off Data-In",
            PROG_TC_CLASSIFY_STEER,
            &data_in,
        ),
        (
            "classify + steer in one: no served LUN",
            PROG_TC_CLASSIFY_STEER,
            &unserved_data,
        ),
        ("egress counter", PROG_TC_EGRESS, &data_in),
    ];
    let mut ns: Vec<Vec<u32>> = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, prog, frame)) in cases.iter().enumerate() {
            let mut total = 0u64;
            for _ in 0..CALLS {
                total += u64::from(dp.time_program(prog, frame, REPEAT)?);
            }
            ns[i].push((total / u64::from(CALLS)) as u32);
        }
    }
    println!(
        "bench programs (BPF_PROG_TEST_RUN, {ROUNDS} rounds × {CALLS} calls × {REPEAT} runs; \
         ns per packet: min / median / max)"
    );
    for ((name, _, _), v) in cases.iter().zip(ns) {
        let (lo, hi) = (*v.iter().min().unwrap(), *v.iter().max().unwrap());
        println!("  {name:<45} {lo:>5} / {:>5} / {hi:>5}", median(v));
    }
    Ok(())
}
