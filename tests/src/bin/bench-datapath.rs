//! `cargo xtask bench datapath`: what the datapath costs, as ratios to plain
//! forwarding measured in the same run, on the default lab topology (hv1 → rack1 →
//! core → library).
//!
//! - iSCSI: `iscsi-perf -m 32 -b 128` (64 KiB reads, QD32) against tgtd for
//!   forwarding only (no nearblock), classifier attached (monitor-only: XDP +
//!   egress counters), steering through the transparent byte relay, and steering
//!   through the iSCSI-aware splicer (LUN not served: every PDU parsed, passed on).
//! - Other traffic: an iperf3 bulk TCP transfer without and with all programs
//!   attached (steering appliance; iperf's port is not classified).
//!
//! Each configuration runs `ROUNDS` times, interleaved; the median is reported.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use nearblock_lab::{content, ApplianceOptions, Lab, LunSpec};

const IQN: &str = "iqn.2026-11.bench.nearblock:lun";
const SECS: u32 = 4;
const ROUNDS: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Forward,
    Classifier,
    /// Steered into the transparent byte relay (`iscsi_aware = false`).
    Relay,
    /// Steered into the iSCSI-aware splicer, LUN not served (pass-through).
    Splicer,
}

fn main() -> Result<()> {
    let mut lab = Lab::default_topology()?;
    let backing = lab.write_file("bench.raw", &content::image(256 << 20, 77, 0))?;
    lab.add_lun(LunSpec {
        tid: 1,
        iqn: IQN.into(),
        lun: 1,
        backing,
        readonly: false,
        allow: None,
    })?;
    let url = lab.lun_url(IQN, 1);
    let lib = lab.addr4(lab.library()).to_string();
    let mut iscsi: [Vec<f64>; 4] = Default::default();
    let mut bulk: [Vec<f64>; 2] = Default::default();
    let mut iperf = lab
        .cmd(lab.library(), &["iperf3", "-s", "-B", &lib])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("iperf3 server (cargo xtask bootstrap installs iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..ROUNDS {
        for (i, mode) in [Mode::Forward, Mode::Classifier, Mode::Relay, Mode::Splicer]
            .into_iter()
            .enumerate()
        {
            if mode != Mode::Forward {
                lab.start_appliance(
                    "rack1",
                    ApplianceOptions {
                        steer: matches!(mode, Mode::Relay | Mode::Splicer),
                        extra_config: if mode == Mode::Relay {
                            "[splicer]\niscsi_aware = false\n".into()
                        } else {
                            String::new()
                        },
                    },
                )?;
            }
            iscsi[i].push(iscsi_perf(&lab, &url)?);
            if mode == Mode::Forward {
                bulk[0].push(iperf3(&lab, &lib)?);
            }
            if mode == Mode::Splicer {
                bulk[1].push(iperf3(&lab, &lib)?);
            }
            if matches!(mode, Mode::Relay | Mode::Splicer) {
                let r = lab.status("rack1")?;
                if r.splicer.accepted == 0 {
                    bail!("round {round}: nothing was steered");
                }
            }
            if mode != Mode::Forward {
                lab.stop_appliance("rack1", Duration::from_secs(20))?;
            }
        }
        eprintln!("round {} of {ROUNDS} done", round + 1);
    }
    let _ = iperf.kill();
    let _ = iperf.wait();

    let fwd = median(&iscsi[0]);
    let bfwd = median(&bulk[0]);
    println!("bench datapath (2-core machine, hv1 → rack1 → core → library, median of {ROUNDS} × {SECS} s)");
    println!(
        "  {:<44} {:>12} {:>8} {:>8}",
        "configuration", "throughput", "ratio", "target"
    );
    let row = |name: &str, v: f64, base: f64, unit: &str, target: &str| {
        println!(
            "  {:<44} {:>8.0} {unit} {:>8.3} {:>8}",
            name,
            v,
            v / base,
            target
        );
    };
    row(
        "iSCSI 64 KiB QD32: forwarding only",
        fwd,
        fwd,
        "MB/s",
        "1.000",
    );
    row(
        "iSCSI 64 KiB QD32: classifier attached",
        median(&iscsi[1]),
        fwd,
        "MB/s",
        ">= 0.97",
    );
    row(
        "iSCSI 64 KiB QD32: steered, transparent relay",
        median(&iscsi[2]),
        fwd,
        "MB/s",
        ">= 0.80",
    );
    row(
        "iSCSI 64 KiB QD32: steered, iSCSI-aware splicer",
        median(&iscsi[3]),
        fwd,
        "MB/s",
        "",
    );
    row(
        "bulk TCP (iperf3): no programs",
        bfwd,
        bfwd,
        "Mb/s",
        "1.000",
    );
    row(
        "bulk TCP (iperf3): programs attached",
        median(&bulk[1]),
        bfwd,
        "Mb/s",
        ">= 0.90",
    );
    println!("  raw samples: iSCSI {iscsi:?} MB/s; bulk {bulk:?} Mb/s");
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// MB/s average that iscsi-perf reports at the end (64 KiB reads, QD32).
fn iscsi_perf(lab: &Lab, url: &str) -> Result<f64> {
    Ok(lab.iscsi_perf("hv1", url, 32, 128, SECS)?.0)
}

/// Mbit/s received, from iperf3's JSON summary.
fn iperf3(lab: &Lab, server: &str) -> Result<f64> {
    let o = lab.exec_ok(
        "hv1",
        &["iperf3", "-c", server, "-t", &SECS.to_string(), "-J"],
    )?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 bits_per_second")?;
    Ok(bps / 1e6)
}
