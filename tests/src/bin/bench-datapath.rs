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
//! Each configuration runs `ROUNDS` times (`NEARBLOCK_BENCH_ROUNDS`), interleaved;
//! the median is reported.
//!
//! With a baseline binary (`cargo xtask bench datapath --baseline-rev REV`, see
//! `bench_ab`), every configuration that runs nearblock runs with both binaries in
//! each round, alternating which goes first, and each figure's spread and new/old
//! ratio are printed.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, Context, Result};
use nearblock_lab::{content, ApplianceOptions, Lab, LunSpec};

#[path = "bench_ab/mod.rs"]
mod bench_ab;

use bench_ab::{Daemons, Side, Spread};

const IQN: &str = "iqn.2026-11.bench.nearblock:lun";
const SECS: u32 = 4;
const ROUNDS: usize = 3;

/// Figure names (samples are keyed by side and these).
const FORWARD: &str = "iSCSI 64 KiB QD32: forwarding only";
const BULK_FORWARD: &str = "bulk TCP (iperf3): no programs";
const BULK_PROGRAMS: &str = "bulk TCP (iperf3): programs attached";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Classifier,
    /// Steered into the transparent byte relay (`iscsi_aware = false`).
    Relay,
    /// Steered into the iSCSI-aware splicer, LUN not served (pass-through).
    Splicer,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Classifier, Mode::Relay, Mode::Splicer];

    fn figure(self) -> &'static str {
        match self {
            Mode::Classifier => "iSCSI 64 KiB QD32: classifier attached",
            Mode::Relay => "iSCSI 64 KiB QD32: steered, transparent relay",
            Mode::Splicer => "iSCSI 64 KiB QD32: steered, iSCSI-aware splicer",
        }
    }
}

/// Samples by side and figure name.
#[derive(Default, Debug)]
struct Samples(BTreeMap<(Side, &'static str), Vec<f64>>);

impl Samples {
    fn push(&mut self, side: Side, figure: &'static str, value: f64) {
        self.0.entry((side, figure)).or_default().push(value);
    }

    fn get(&self, side: Side, figure: &str) -> &[f64] {
        self.0
            .iter()
            .find(|((s, f), _)| *s == side && *f == figure)
            .map_or(&[], |(_, v)| v.as_slice())
    }

    /// The median of a figure's samples (NaN when it has none).
    fn median(&self, side: Side, figure: &str) -> f64 {
        Spread::of(self.get(side, figure)).map_or(f64::NAN, |s| s.median)
    }
}

fn main() -> Result<()> {
    let daemons = Daemons::from_env(ROUNDS)?;
    let rounds = daemons.rounds;
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
    let mut samples = Samples::default();
    let mut iperf = lab
        .cmd(lab.library(), &["iperf3", "-s", "-B", &lib])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("iperf3 server (cargo xtask bootstrap installs iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..rounds {
        // Forwarding only: no appliance, one reference per round.
        samples.push(Side::New, FORWARD, iscsi_perf(&lab, &url)?);
        samples.push(Side::New, BULK_FORWARD, iperf3(&lab, &lib)?);
        for &side in daemons.order(round) {
            daemons.select(side);
            for mode in Mode::ALL {
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
                samples.push(side, mode.figure(), iscsi_perf(&lab, &url)?);
                if mode == Mode::Splicer {
                    samples.push(side, BULK_PROGRAMS, iperf3(&lab, &lib)?);
                }
                if matches!(mode, Mode::Relay | Mode::Splicer) {
                    let r = lab.status("rack1")?;
                    if r.splicer.accepted == 0 {
                        bail!(
                            "round {round} ({} binary): nothing was steered",
                            side.name()
                        );
                    }
                }
                lab.stop_appliance("rack1", Duration::from_secs(20))?;
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let _ = iperf.kill();
    let _ = iperf.wait();

    report_ratios(&samples, Side::New, rounds);
    if daemons.comparing() {
        report_ratios(&samples, Side::Old, rounds);
        report_ab(&samples, rounds);
    }
    println!("  raw samples (iSCSI MB/s, bulk Mb/s): {samples:?}");
    Ok(())
}

/// One binary's figures as ratios to forwarding (the report without a baseline).
fn report_ratios(samples: &Samples, side: Side, rounds: usize) {
    let fwd = samples.median(Side::New, FORWARD);
    let bfwd = samples.median(Side::New, BULK_FORWARD);
    let which = if side == Side::Old {
        ", baseline binary"
    } else {
        ""
    };
    println!("bench datapath (2-core machine, hv1 → rack1 → core → library, median of {rounds} × {SECS} s{which})");
    println!(
        "  {:<48} {:>12} {:>8} {:>8}",
        "configuration", "throughput", "ratio", "target"
    );
    let row = |name: &str, v: f64, base: f64, unit: &str, target: &str| {
        println!(
            "  {:<48} {:>7.0} {unit} {:>8.3} {:>8}",
            name,
            v,
            v / base,
            target
        );
    };
    row(FORWARD, fwd, fwd, "MB/s", "1.000");
    for (mode, target) in Mode::ALL.into_iter().zip([">= 0.97", ">= 0.80", ""]) {
        row(
            mode.figure(),
            samples.median(side, mode.figure()),
            fwd,
            "MB/s",
            target,
        );
    }
    row(BULK_FORWARD, bfwd, bfwd, "Mb/s", "1.000");
    row(
        BULK_PROGRAMS,
        samples.median(side, BULK_PROGRAMS),
        bfwd,
        "Mb/s",
        ">= 0.90",
    );
}

/// Old against new, figure by figure, with each side's spread.
fn report_ab(samples: &Samples, rounds: usize) {
    println!("bench datapath A/B: the baseline (old) and this tree (new), {rounds} rounds each, alternating which runs first");
    println!("{}", bench_ab::header(rounds));
    for mode in Mode::ALL {
        let f = mode.figure();
        println!(
            "{}",
            bench_ab::row(
                f,
                "MB/s",
                samples.get(Side::Old, f),
                samples.get(Side::New, f)
            )
        );
    }
    println!(
        "{}",
        bench_ab::row(
            BULK_PROGRAMS,
            "Mb/s",
            samples.get(Side::Old, BULK_PROGRAMS),
            samples.get(Side::New, BULK_PROGRAMS)
        )
    );
    println!(
        "  forwarding only (no nearblock, one run per round): {:.0} MB/s iSCSI, {:.0} Mb/s bulk (medians)",
        samples.median(Side::New, FORWARD),
        samples.median(Side::New, BULK_FORWARD)
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_by_side_and_figure() {
        let mut s = Samples::default();
        s.push(Side::Old, "a", 1.0);
        s.push(Side::New, "a", 3.0);
        s.push(Side::New, "a", 5.0);
        assert_eq!(s.get(Side::Old, "a"), &[1.0]);
        assert!((s.median(Side::New, "a") - 4.0).abs() < 1e-12);
        assert!(s.median(Side::Old, "b").is_nan());
    }
}
