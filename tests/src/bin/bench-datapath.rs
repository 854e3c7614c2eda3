//! `cargo xtask bench datapath`: what the appliance costs the traffic it does not
//! serve, as ratios to plain forwarding measured in the same run, on the default
//! lab topology (hv1 → rack1 → core → library), and the CPU each configuration
//! adds.
//!
//! Loads: `iscsi-perf` against tgtd at 64 KiB QD32 (`-b 128`) and 4 KiB QD32
//! (`-b 8`), and an iperf3 bulk TCP transfer (its port is not classified).
//! Configurations (rack1's appliance):
//! - forwarding only: no nearblock (the baseline of every ratio);
//! - classifier (TC): monitor-only, `classifier = "auto"`, which on the lab's
//!   veths is TC ingress;
//! - classifier (XDP): monitor-only, `classifier = "xdp"` (generic XDP on veth:
//!   what `auto` replaced);
//! - steered, LUN not served: steering, the library's portal served (config),
//!   the session's target has no declared LUN: the splicer relays it in the
//!   kernel after login; bulk TCP runs here too, with every program attached;
//! - portal not served: steering, but the library's portal is not among the
//!   served ones: the kernel forwards it (ratio to the TC classifier's).
//!
//! Every configuration runs once per round for `ROUNDS` rounds
//! (`NEARBLOCK_BENCH_ROUNDS`), the order rotated by one each round
//! ([`round_order`]) so that no configuration always runs first after the
//! machine was idle or right after the appliance started; each figure's median, minimum and maximum
//! are printed, with its ratio of medians and the range of its per-round ratios
//! (each round's figure over that round's baseline), and the CPU it used:
//! core-ms per MB moved by process role, and what that adds to its baseline's.
//!
//! With a baseline binary (`cargo xtask bench datapath --baseline-rev REV`, see
//! `bench_ab`), every configuration that runs nearblock runs with both binaries in
//! each round, alternating which goes first, and each figure's spread and new/old
//! ratio are printed.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, Context, Result};
use nearblock_lab::{
    content,
    cpu::{CpuSample, CpuUse},
    ApplianceOptions, Lab, LunSpec,
};

#[path = "bench_ab/mod.rs"]
mod bench_ab;

use bench_ab::{Daemons, Side, Spread};

const IQN: &str = "iqn.2026-11.bench.nearblock:lun";
const SECS: u32 = 4;
const ROUNDS: usize = 7;

/// What a figure counts.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Load {
    /// iSCSI READs, 64 KiB at QD32: MB/s.
    Iscsi64k,
    /// iSCSI READs, 4 KiB at QD32: IOPS.
    Iscsi4k,
    /// iperf3: Mbit/s.
    Bulk,
}

impl Load {
    fn unit(self) -> &'static str {
        match self {
            Load::Iscsi64k => "MB/s",
            Load::Iscsi4k => "IOPS",
            Load::Bulk => "Mb/s",
        }
    }

    /// MB moved in one measurement at `value`.
    fn megabytes(self, value: f64) -> f64 {
        let per_sec = match self {
            Load::Iscsi64k => value,
            Load::Iscsi4k => value * 4096.0 / 1e6,
            Load::Bulk => value / 8.0,
        };
        per_sec * f64::from(SECS)
    }
}

/// rack1's appliance for a configuration.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Setup {
    Forwarding,
    ClassifierTc,
    ClassifierXdp,
    Steered,
    PortalNotServed,
}

impl Setup {
    const ALL: [Setup; 5] = [
        Setup::Forwarding,
        Setup::ClassifierTc,
        Setup::ClassifierXdp,
        Setup::Steered,
        Setup::PortalNotServed,
    ];

    fn loads(self) -> &'static [Load] {
        match self {
            Setup::Forwarding | Setup::Steered => &[Load::Iscsi64k, Load::Iscsi4k, Load::Bulk],
            Setup::ClassifierTc | Setup::ClassifierXdp => &[Load::Iscsi64k, Load::Bulk],
            Setup::PortalNotServed => &[Load::Iscsi64k],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Setup::Forwarding => "forwarding only",
            Setup::ClassifierTc => "classifier attached (TC, auto on veth)",
            Setup::ClassifierXdp => "classifier attached (generic XDP)",
            Setup::Steered => "steered, LUN not served (handed to the kernel)",
            Setup::PortalNotServed => "portal with no served LUN",
        }
    }

    /// The `[datapath]` lines and whether it steers (`None`: no appliance).
    fn appliance(self) -> Option<(&'static str, bool)> {
        match self {
            Setup::Forwarding => None,
            Setup::ClassifierTc => Some(("classifier = \"auto\"", false)),
            Setup::ClassifierXdp => Some(("classifier = \"xdp\"", false)),
            Setup::Steered => Some(("", true)),
            // A documentation address (RFC 5737): nothing the lab reaches.
            Setup::PortalNotServed => Some(("served_portals = [\"192.0.2.1:3260\"]", true)),
        }
    }

    /// What a figure of this setup is a ratio to, and the target.
    fn baseline(self, load: Load) -> (Setup, &'static str) {
        match (self, load) {
            (Setup::Forwarding, _) => (Setup::Forwarding, "1.000"),
            (Setup::ClassifierTc, _) => (Setup::Forwarding, ">= 0.97"),
            (Setup::ClassifierXdp, _) | (Setup::Steered, Load::Bulk) => (Setup::Forwarding, ""),
            (Setup::Steered, _) => (Setup::Forwarding, ">= 0.95"),
            (Setup::PortalNotServed, _) => (Setup::ClassifierTc, ">= 0.99"),
        }
    }
}

type Key = (Side, Setup, Load);

/// Samples by side, setup and load: one value per round, with the CPU it used
/// and the MB it moved.
#[derive(Default, Debug)]
struct Samples {
    values: BTreeMap<Key, Vec<f64>>,
    cpu: BTreeMap<Key, Vec<(CpuUse, f64)>>,
}

impl Samples {
    fn push(&mut self, side: Side, setup: Setup, load: Load, value: f64, cpu: CpuUse) {
        let key = (side, setup, load);
        self.values.entry(key).or_default().push(value);
        self.cpu
            .entry(key)
            .or_default()
            .push((cpu, load.megabytes(value)));
    }

    fn get(&self, side: Side, setup: Setup, load: Load) -> &[f64] {
        self.values
            .get(&(side, setup, load))
            .map_or(&[], Vec::as_slice)
    }

    /// The forwarding and no-appliance figures are measured once, as `New`.
    fn baseline_side(setup: Setup, side: Side) -> Side {
        if setup == Setup::Forwarding {
            Side::New
        } else {
            side
        }
    }

    /// Per-round ratios of `setup`'s figure to its baseline's.
    fn ratios(&self, side: Side, setup: Setup, load: Load) -> Vec<f64> {
        let (base, _) = setup.baseline(load);
        let b = self.get(Self::baseline_side(base, side), base, load);
        self.get(side, setup, load)
            .iter()
            .zip(b)
            .map(|(v, b)| v / b)
            .collect()
    }

    /// Core-ms per MB over all rounds: the total and by role.
    fn core_ms_per_mb(&self, side: Side, setup: Setup, load: Load) -> Option<CpuPerMb> {
        let runs = self.cpu.get(&(side, setup, load))?;
        let mb: f64 = runs.iter().map(|(_, mb)| mb).sum();
        if runs.is_empty() || mb <= 0.0 {
            return None;
        }
        let mut by_role: BTreeMap<String, f64> = BTreeMap::new();
        for (u, _) in runs {
            for (role, s) in &u.by_role {
                *by_role.entry(role.clone()).or_default() += s * 1e3 / mb;
            }
        }
        Some(CpuPerMb {
            busy: runs.iter().map(|(u, _)| u.wall_fraction).sum::<f64>() / runs.len() as f64,
            total: runs.iter().map(|(u, _)| u.core_seconds).sum::<f64>() * 1e3 / mb,
            by_role,
        })
    }
}

struct CpuPerMb {
    busy: f64,
    total: f64,
    by_role: BTreeMap<String, f64>,
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
    let result = run_rounds(&mut lab, &daemons, &url, &lib, &mut samples);
    let _ = iperf.kill();
    let _ = iperf.wait();
    result?;

    report(&samples, Side::New, rounds);
    if daemons.comparing() {
        report(&samples, Side::Old, rounds);
        report_ab(&samples, rounds);
    }
    println!("  raw samples: {:?}", samples.values);
    Ok(())
}

fn run_rounds(
    lab: &mut Lab,
    daemons: &Daemons,
    url: &str,
    lib: &str,
    samples: &mut Samples,
) -> Result<()> {
    let rounds = daemons.rounds;
    for round in 0..rounds {
        for setup in round_order(round) {
            let Some((datapath, steer)) = setup.appliance() else {
                for &load in setup.loads() {
                    let (v, cpu) = measure(lab, load, url, lib)?;
                    samples.push(Side::New, setup, load, v, cpu);
                }
                continue;
            };
            for &side in daemons.order(round) {
                daemons.select(side);
                lab.set_datapath_extra("rack1", datapath);
                lab.start_appliance(
                    "rack1",
                    ApplianceOptions {
                        steer,
                        // The handoff (the default) is what this bench
                        // measures for a session with nothing served.
                        extra_config: "[splicer]\nkernel_handoff = true\n".into(),
                    },
                )?;
                for &load in setup.loads() {
                    let (v, cpu) = measure(lab, load, url, lib)?;
                    samples.push(side, setup, load, v, cpu);
                }
                check_steering(lab, setup, side, round)?;
                lab.stop_appliance("rack1", Duration::from_secs(20))?;
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    lab.set_datapath_extra("rack1", "");
    Ok(())
}

/// Round `round`'s order: `Setup::ALL` rotated left by `round`.
fn round_order(round: usize) -> [Setup; 5] {
    let mut order = Setup::ALL;
    order.rotate_left(round % Setup::ALL.len());
    order
}

/// The configuration did what it is named for.
fn check_steering(lab: &Lab, setup: Setup, side: Side, round: usize) -> Result<()> {
    let r = lab.status("rack1")?;
    let not_served = r
        .verdicts
        .iter()
        .find(|(n, _)| n == "tc_steer_not_served")
        .map_or(0, |(_, v)| *v);
    let which = format!("round {round}, {} binary, {}", side.name(), setup.name());
    match setup {
        Setup::Steered if r.splicer.accepted == 0 => bail!("{which}: nothing was steered"),
        // The baseline binary may predate the kernel relay's counter.
        Setup::Steered if r.splicer.raw_relayed == 0 && side == Side::New => {
            bail!("{which}: no session dropped to the relay")
        }
        // iSCSI sessions go to the kernel after login (bulk TCP on the iSCSI
        // port is not iSCSI: it stays in the byte relay).
        Setup::Steered if r.splicer.handed_off == 0 && side == Side::New => {
            bail!("{which}: no session was handed to the kernel")
        }
        Setup::PortalNotServed if r.splicer.accepted != 0 => {
            bail!("{which}: a portal with nothing served was steered")
        }
        Setup::PortalNotServed if not_served == 0 && side == Side::New => {
            bail!("{which}: tc_steer_not_served never counted")
        }
        _ => Ok(()),
    }
}

/// One measurement and the CPU it used.
fn measure(lab: &Lab, load: Load, url: &str, lib: &str) -> Result<(f64, CpuUse)> {
    let cpu0 = CpuSample::take();
    let v = match load {
        Load::Iscsi64k => lab.iscsi_perf("hv1", url, 32, 128, SECS)?.0,
        Load::Iscsi4k => lab.iscsi_perf("hv1", url, 32, 8, SECS)?.1,
        Load::Bulk => iperf3(lab, lib)?,
    };
    Ok((v, CpuSample::take().since(&cpu0)))
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

fn load_name(load: Load) -> &'static str {
    match load {
        Load::Iscsi64k => "iSCSI 64 KiB QD32",
        Load::Iscsi4k => "iSCSI 4 KiB QD32",
        Load::Bulk => "bulk TCP",
    }
}

/// One binary's figures: spread, ratios to their baselines, CPU.
fn report(samples: &Samples, side: Side, rounds: usize) {
    let which = if side == Side::Old {
        ", baseline binary"
    } else {
        ""
    };
    println!("bench datapath (2-core machine, hv1 → rack1 → core → library, {rounds} rounds × {SECS} s per figure{which})");
    println!(
        "  {:<58} {:>28} {:>7} {:>21} {:>8}",
        "figure", "min / median / max", "ratio", "per-round ratios", "target"
    );
    for setup in Setup::ALL {
        for &load in setup.loads() {
            let s = Samples::baseline_side(setup, side);
            let Some(v) = Spread::of(samples.get(s, setup, load)) else {
                continue;
            };
            let (base, target) = setup.baseline(load);
            let b = Spread::of(samples.get(Samples::baseline_side(base, side), base, load));
            let ratio = b.map_or(f64::NAN, |b| v.median / b.median);
            let per_round = Spread::of(&samples.ratios(s, setup, load)).map_or_else(
                || "n/a".to_string(),
                |r| format!("{:.3}–{:.3}", r.min, r.max),
            );
            println!(
                "  {:<58} {:>28} {:>7.3} {:>21} {:>8}",
                format!("{}: {}", load_name(load), setup.name()),
                format!(
                    "{:.0} / {:.0} / {:.0} {}",
                    v.min,
                    v.median,
                    v.max,
                    load.unit()
                ),
                ratio,
                per_round,
                target
            );
        }
    }
    println!("  where the CPU goes (2 cores; core-ms per MB moved over all rounds; adds = total − the baseline's total; other = the clients, kernel work outside these processes):");
    println!(
        "  {:<58} {:>5} {:>7} {:>7} {:>10} {:>7} {:>7} {:>7}",
        "figure", "busy", "total", "adds", "appliance", "tgtd", "iperf3", "other"
    );
    for setup in Setup::ALL {
        for &load in setup.loads() {
            let s = Samples::baseline_side(setup, side);
            let Some(c) = samples.core_ms_per_mb(s, setup, load) else {
                continue;
            };
            let (base, _) = setup.baseline(load);
            let adds = samples
                .core_ms_per_mb(Samples::baseline_side(base, side), base, load)
                .map_or(f64::NAN, |b| c.total - b.total);
            let role = |r: &str| c.by_role.get(r).copied().unwrap_or(0.0);
            println!(
                "  {:<58} {:>4.0}% {:>7.2} {:>7.2} {:>10.2} {:>7.2} {:>7.2} {:>7.2}",
                format!("{}: {}", load_name(load), setup.name()),
                c.busy * 100.0,
                c.total,
                adds,
                role("appliance"),
                role("tgtd"),
                role("iperf3"),
                role("other")
            );
        }
    }
}

/// Old against new, figure by figure, with each side's spread.
fn report_ab(samples: &Samples, rounds: usize) {
    println!("bench datapath A/B: the baseline (old) and this tree (new), {rounds} rounds each, alternating which runs first");
    println!("{}", bench_ab::header(rounds));
    for setup in Setup::ALL.into_iter().filter(|s| *s != Setup::Forwarding) {
        for &load in setup.loads() {
            println!(
                "{}",
                bench_ab::row(
                    &format!("{}: {}", load_name(load), setup.name()),
                    load.unit(),
                    samples.get(Side::Old, setup, load),
                    samples.get(Side::New, setup, load)
                )
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_per_round_against_the_baseline() {
        let mut s = Samples::default();
        for (f, c) in [(100.0, 90.0), (200.0, 190.0)] {
            s.push(
                Side::New,
                Setup::Forwarding,
                Load::Iscsi64k,
                f,
                CpuUse::default(),
            );
            s.push(
                Side::New,
                Setup::ClassifierTc,
                Load::Iscsi64k,
                c,
                CpuUse::default(),
            );
        }
        let r = s.ratios(Side::New, Setup::ClassifierTc, Load::Iscsi64k);
        assert_eq!(r, [0.9, 0.95]);
        // A baseline binary's figures compare with the one forwarding run.
        s.push(
            Side::Old,
            Setup::ClassifierTc,
            Load::Iscsi64k,
            50.0,
            CpuUse::default(),
        );
        assert_eq!(
            s.ratios(Side::Old, Setup::ClassifierTc, Load::Iscsi64k),
            [0.5]
        );
    }

    #[test]
    fn every_round_runs_every_setup_and_each_leads_in_turn() {
        for round in 0..10 {
            let mut order = round_order(round).to_vec();
            assert_eq!(order[0], Setup::ALL[round % Setup::ALL.len()]);
            order.sort_by_key(|s| Setup::ALL.iter().position(|a| a == s));
            assert_eq!(order, Setup::ALL);
        }
    }

    #[test]
    fn megabytes_per_load() {
        assert!((Load::Iscsi64k.megabytes(100.0) - 400.0).abs() < 1e-9);
        assert!((Load::Bulk.megabytes(8000.0) - 4000.0).abs() < 1e-9);
        assert!((Load::Iscsi4k.megabytes(1e6 / 4096.0) - 4.0).abs() < 1e-9);
    }
}
