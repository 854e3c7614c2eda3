//! `cargo xtask bench splice`: the iSCSI-aware splicer's READ paths, as ratios to
//! plain forwarding measured in the same run, on the default lab topology
//! (hv1 → rack1 → core → library), with `iscsi-perf` at 64 KiB QD32 and 4 KiB QD32
//! over a read-only 256 MiB LUN (no zero blocks, so every byte is real data).
//!
//! Configurations, each labelled with its design:
//! - direct: forwarding only, no nearblock;
//! - relay: the LUN not served: the session is handed to the kernel after
//!   login (pass-through, forwarded by the steering program);
//! - cold-relay: the LUN served, but the cache (16 MiB) is far smaller than the
//!   LUN, so every READ misses; with no index to source blocks from, each READ
//!   passes through to the library in the initiator's session, and its data is
//!   verified and learned;
//! - cold: the same small cache, with the index fabric running (a global indexer on
//!   core, rack1's embedded indexer, the library's agent exporting the LUN by
//!   `IQN/LUN`): missing blocks are fetched by hash from the library's agent,
//!   verified, and served in the shadow design;
//! - warm-shadow / warm-local: the LUN served from a warm cache (shadow: one
//!   zero-length READ upstream per READ; local: the target never sees the READ).
//!
//! Each configuration runs `ROUNDS` times (`NEARBLOCK_BENCH_ROUNDS`), interleaved;
//! the median is reported with the minimum and maximum and the range of the
//! per-round ratios to direct, and the CPU each 64 KiB run used (core-ms per MB
//! moved, by process role, and what it adds to direct's). Direct, relay and
//! warm-shadow also run with every hypervisor of rack1 reading at once (4
//! sessions each): the rack's aggregate throughput.
//!
//! With a baseline binary (`cargo xtask bench splice --baseline-rev REV`, see
//! `bench_ab`), rack1's appliance runs each configuration with both binaries in
//! each round, alternating which goes first, and each figure's spread and new/old
//! ratio are printed. The index fabric (indexers, the library's agent) and direct
//! run once, with the binary under test.
//!
//! Knobs for looking into the cold path (not needed for the figures):
//! `NEARBLOCK_BENCH_ONLY=direct,cold` runs only those configurations;
//! `NEARBLOCK_BENCH_COLD_CACHE_MIB` sizes cold's cache (16);
//! `NEARBLOCK_BENCH_SPLICER='readahead_bytes = 33554432\n'` adds `[splicer]` lines
//! to cold's config.

use std::time::Duration;

use anyhow::{bail, Result};
use nearblock::splice::catalog::{manifest_of, manifest_to_text};
use nearblock_lab::{
    content,
    cpu::{CpuSample, CpuUse},
    fabric::Fabric,
    ApplianceOptions, Lab, LunSpec,
};

#[path = "bench_ab/mod.rs"]
mod bench_ab;

use bench_ab::{Daemons, Side, Spread};

const IQN: &str = "iqn.2026-11.bench.nearblock:served";
const LUN_MIB: usize = 256;
const SECS: u32 = 4;
const ROUNDS: usize = 7;
const AGENT_PORT: u16 = 7500;
const INDEXER_PORT: u16 = 7501;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Config {
    Direct,
    Relay,
    ColdRelay,
    Cold,
    WarmShadow,
    WarmLocal,
}

impl Config {
    const ALL: [Config; 6] = [
        Config::Direct,
        Config::Relay,
        Config::ColdRelay,
        Config::Cold,
        Config::WarmShadow,
        Config::WarmLocal,
    ];

    /// Measured with every hypervisor of the rack reading at once too.
    fn in_rack_run(self) -> bool {
        matches!(self, Config::Direct | Config::Relay | Config::WarmShadow)
    }

    fn label(self) -> &'static str {
        match self {
            Config::Direct => "direct (forwarding only)",
            Config::Relay => "relay (LUN not served: handed to the kernel)",
            Config::ColdRelay => "cold-relay (shadow, library via session)",
            Config::Cold => "cold (shadow, library's agent by hash)",
            Config::WarmShadow => "warm-shadow (shadow design, cache)",
            Config::WarmLocal => "warm-local (local design, cache)",
        }
    }

    /// The appliance's extra config (`None`: no appliance). `sourcing`: the
    /// datapath, splicer and table lines that embed rack1's indexer.
    fn extra_config(self, manifest: &str, sourcing: &Sourcing) -> Option<String> {
        let lun = |design: &str, cache_mib: u64, datapath: &str, splicer: &str, tables: &str| {
            format!(
                "{datapath}\n[splicer]\ncache_bytes = {}\n{splicer}\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\ndesign = {design:?}\nmanifest = {manifest:?}\n{tables}",
                cache_mib << 20
            )
        };
        match self {
            Config::Direct => None,
            Config::Relay => Some(String::new()),
            Config::ColdRelay => Some(lun("shadow", 16, "", "", "")),
            Config::Cold => Some(lun(
                "shadow",
                std::env::var("NEARBLOCK_BENCH_COLD_CACHE_MIB")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(16),
                &sourcing.datapath,
                &sourcing.splicer,
                &sourcing.tables,
            )),
            Config::WarmShadow => Some(lun("shadow", 512, "", "", "")),
            Config::WarmLocal => Some(lun("local", 512, "", "", "")),
        }
    }
}

/// Config lines that give the appliance its index (for fetching by hash).
struct Sourcing {
    datapath: String,
    splicer: String,
    tables: String,
}

/// One binary's measurements, indexed like `Config::ALL` (direct's are in the
/// binary under test's, `Side::New`).
#[derive(Default)]
struct Runs {
    /// `[config][0 = 64 KiB, 1 = 4 KiB]` = samples of (MB/s, IOPS).
    results: Vec<[Vec<(f64, f64)>; 2]>,
    /// Bytes the library sent during the config's last round.
    library_bytes: Vec<u64>,
    /// Per round, (CPU used during the 64 KiB run, MB it moved).
    cpu: Vec<Vec<(CpuUse, f64)>>,
    /// Per round, aggregate MB/s of every hypervisor of rack1 reading at once
    /// (direct, relay and warm-shadow only).
    rack: Vec<Vec<f64>>,
}

impl Runs {
    fn new() -> Runs {
        let n = Config::ALL.len();
        Runs {
            results: vec![Default::default(); n],
            library_bytes: vec![0; n],
            cpu: vec![Vec::new(); n],
            rack: vec![Vec::new(); n],
        }
    }

    /// One figure's samples: `size` 0 = 64 KiB (MB/s), 1 = 4 KiB (IOPS).
    fn figure(&self, config: usize, size: usize) -> Vec<f64> {
        self.results[config][size]
            .iter()
            .map(|x| if size == 0 { x.0 } else { x.1 })
            .collect()
    }
}

fn main() -> Result<()> {
    let daemons = Daemons::from_env(ROUNDS)?;
    let rounds = daemons.rounds;
    let mut lab = Lab::default_topology()?;
    let data = content::image(LUN_MIB << 20, 99, 0);
    let backing = lab.write_file("served.raw", &data)?;
    let manifest = lab.write_file(
        "served.manifest",
        manifest_to_text(&manifest_of("served", &data, 4096)).as_bytes(),
    )?;
    drop(data);
    lab.add_lun(LunSpec::read_only(IQN, backing))?;
    let url = lab.lun_url(IQN, 1);
    let manifest = manifest.display().to_string();
    // The index fabric for the cold configuration: the library's agent indexes the
    // LUN (as `IQN/1`) and reports to the global indexer on core.
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT)?;
    fabric.start_indexer(&lab, "core", None)?;
    fabric.start_library_agent(&lab, "core")?;
    let topo = lab.write_file("topology.toml", nearblock_lab::DEFAULT_TOPOLOGY.as_bytes())?;
    let rack1_ix = fabric.indexer_config(&lab, "rack1", Some("core"))?;
    // The agent's block service port is an image-transfer port: rack1's flow
    // counters count what it sends like iSCSI's (the line lands in [datapath]).
    let sourcing = Sourcing {
        datapath: format!("image_transfer_ports = [{AGENT_PORT}]\n"),
        splicer: std::env::var("NEARBLOCK_BENCH_SPLICER")
            .unwrap_or_default()
            .replace("\\n", "\n")
            + "fetch_deadline_ms = 3000\n",
        // `{:?}` quotes the paths as TOML strings.
        #[expect(
            clippy::unnecessary_debug_formatting,
            reason = "Debug quotes and escapes the paths, which is what TOML wants"
        )]
        tables: format!(
            "[cost]\ntopology = {topo:?}\n[planner]\n[indexer]\nconfig = {rack1_ix:?}\n"
        ),
    };
    let probe = std::fs::read(lab.dir.path().join("served.raw"))?[..4096].to_vec();
    fabric.wait_holder(&lab, "core", &probe, lab.library(), Duration::from_mins(2))?;
    let mut runs = measure(&mut lab, &daemons, &url, &manifest, &sourcing)?;
    let [old, new] = &mut runs;
    report(&*new, None, rounds);
    if daemons.comparing() {
        // The baseline's ratios use the same direct runs.
        old.results[0].clone_from(&new.results[0]);
        old.cpu[0].clone_from(&new.cpu[0]);
        old.rack[0].clone_from(&new.rack[0]);
        report(&*old, Some("baseline binary"), rounds);
        report_ab(&*old, &*new, rounds);
    }
    Ok(())
}

/// Every round: direct, then each other configuration with each binary in the
/// round's order. Returns the runs indexed by `Side` (old, new).
fn measure(
    lab: &mut Lab,
    daemons: &Daemons,
    url: &str,
    manifest: &str,
    sourcing: &Sourcing,
) -> Result<[Runs; 2]> {
    let rounds = daemons.rounds;
    let mut runs = [Runs::new(), Runs::new()];
    let slot = |side: Side| usize::from(side == Side::New);
    // NEARBLOCK_BENCH_ONLY=direct,cold (configurations by the first word of their
    // label, comma-separated) runs only those (for profiling); ratios need direct.
    let only = std::env::var("NEARBLOCK_BENCH_ONLY").ok();
    let skipped = |cfg: Config| {
        let name = cfg.label().split(' ').next().unwrap_or_default();
        only.as_deref()
            .is_some_and(|o| !o.split(',').any(|o| o == name))
    };
    for round in 0..rounds {
        // Direct (no appliance) once per round, then every other configuration
        // with each binary in this round's order.
        let mut plan = vec![(Side::New, Config::Direct)];
        for &side in daemons.order(round) {
            plan.extend(Config::ALL[1..].iter().map(|&cfg| (side, cfg)));
        }
        for (side, cfg) in plan {
            let i = Config::ALL
                .iter()
                .position(|&c| c == cfg)
                .unwrap_or_default();
            let run = &mut runs[slot(side)];
            if skipped(cfg) {
                run.results[i][0].push((f64::NAN, f64::NAN));
                run.results[i][1].push((f64::NAN, f64::NAN));
                continue;
            }
            daemons.select(side);
            if let Some(extra_config) = cfg.extra_config(manifest, sourcing) {
                // Each run starts with rack1's index store empty: a cold run starts
                // cold, and the baseline's store format may not be this tree's.
                remove_index_store(lab, "rack1")?;
                lab.start_appliance(
                    "rack1",
                    ApplianceOptions {
                        steer: true,
                        extra_config,
                    },
                )?;
            }
            if matches!(cfg, Config::WarmShadow | Config::WarmLocal) {
                // Warm the cache: a sequential pass over the LUN and more.
                perf(lab, url, 128)?;
            }
            let before = lab_status_library_bytes(lab, cfg)?;
            let cpu0 = CpuSample::take();
            let r64 = perf(lab, url, 128)?;
            run.cpu[i].push((CpuSample::take().since(&cpu0), r64.0 * f64::from(SECS)));
            run.results[i][0].push(r64);
            run.results[i][1].push(perf(lab, url, 8)?);
            if cfg.in_rack_run() {
                run.rack[i].push(rack_aggregate(lab, url)?);
            }
            let after = lab_status_library_bytes(lab, cfg)?;
            run.library_bytes[i] = after.saturating_sub(before);
            if cfg != Config::Direct {
                let r = lab.status("rack1")?;
                if r.splicer.accepted == 0 {
                    bail!("{cfg:?} ({} binary): nothing was steered", side.name());
                }
                if matches!(cfg, Config::WarmShadow | Config::WarmLocal)
                    && r.splicer.reads_served_shadow + r.splicer.reads_served_local == 0
                {
                    bail!(
                        "{cfg:?} ({} binary): no READ was served locally",
                        side.name()
                    );
                }
                lab.stop_appliance("rack1", Duration::from_secs(20))?;
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    daemons.select(Side::New);
    Ok(runs)
}

/// One binary's figures as ratios to direct, and where the CPU went.
fn report(runs: &Runs, which: Option<&str>, rounds: usize) {
    let Runs {
        results,
        library_bytes,
        cpu,
        rack,
    } = runs;
    let which = which.map(|w| format!(", {w}")).unwrap_or_default();
    let median = |config: usize, size: usize| {
        Spread::of(&runs.figure(config, size)).map_or(f64::NAN, |s| s.median)
    };
    let direct_mbps = median(0, 0);
    let direct_iops = median(0, 1);
    println!(
        "bench splice (2-core machine, hv1 → rack1 → core → library, {LUN_MIB} MiB read-only LUN, median of {rounds} × {SECS} s{which})"
    );
    println!(
        "  {:<42} {:>20} {:>7} {:>13} {:>24} {:>7} {:>13} {:>16}",
        "configuration",
        "64K MB/s (min–max)",
        "ratio",
        "per round",
        "4K IOPS (min–max)",
        "ratio",
        "per round",
        "library bytes*"
    );
    let spread = |v: &[f64], digits: usize| {
        Spread::of(v).map_or_else(
            || "n/a".to_string(),
            |s| format!("{:.digits$}–{:.digits$}", s.min, s.max),
        )
    };
    let per_round = |config: usize, size: usize| {
        let ratios: Vec<f64> = runs
            .figure(config, size)
            .iter()
            .zip(runs.figure(0, size))
            .map(|(v, d)| v / d)
            .collect();
        spread(&ratios, 2)
    };
    for (i, cfg) in Config::ALL.into_iter().enumerate() {
        let mbps = median(i, 0);
        let iops = median(i, 1);
        println!(
            "  {:<42} {:>20} {:>7.3} {:>13} {:>24} {:>7.3} {:>13} {:>16}",
            cfg.label(),
            format!("{mbps:.0} ({})", spread(&runs.figure(i, 0), 0)),
            mbps / direct_mbps,
            per_round(i, 0),
            format!("{iops:.0} ({})", spread(&runs.figure(i, 1), 0)),
            iops / direct_iops,
            per_round(i, 1),
            library_bytes[i]
        );
    }
    report_rack(rack);
    println!("  targets at 64 KiB: cold >= 0.8, warm-shadow >= 1.0 (no data from the library), warm-local >= 1.5");
    println!("  * bytes the library sent (iSCSI and its agent's block service) during the last round's two measurements (BPF flow counters on rack1's upstream port; n/a without nearblock)");
    println!(
        "  where the CPU goes in the 64 KiB runs (2 cores; core-ms per MB moved, summed over the rounds; adds = total − direct's; other = iscsi-perf, kernel work outside these processes):"
    );
    let per_mb = |i: usize| {
        let mb: f64 = cpu[i].iter().map(|(_, mb)| mb).sum();
        let total: f64 = cpu[i].iter().map(|(u, _)| u.core_seconds).sum();
        total * 1e3 / mb
    };
    let direct_total = per_mb(0);
    for (i, cfg) in Config::ALL.into_iter().enumerate() {
        let mb: f64 = cpu[i].iter().map(|(_, mb)| mb).sum();
        if cpu[i].is_empty() || mb <= 0.0 {
            continue;
        }
        let busy = cpu[i].iter().map(|(u, _)| u.wall_fraction).sum::<f64>() / cpu[i].len() as f64;
        let mut roles = std::collections::BTreeMap::<String, f64>::default();
        for (u, _) in &cpu[i] {
            for (r, s) in &u.by_role {
                *roles.entry(r.clone()).or_default() += s;
            }
        }
        let total: f64 = cpu[i].iter().map(|(u, _)| u.core_seconds).sum();
        let parts: Vec<String> = roles
            .iter()
            .filter(|(_, s)| **s * 1e3 / mb >= 0.005)
            .map(|(r, s)| format!("{r} {:.3}", s * 1e3 / mb))
            .collect();
        println!(
            "  {:<42} busy {:>4.0}%  total {:.3}  adds {:.3}: {}",
            cfg.label(),
            busy * 100.0,
            total * 1e3 / mb,
            total * 1e3 / mb - direct_total,
            parts.join(", ")
        );
    }
    println!("  raw samples (MB/s, IOPS): {results:?}");
}

/// The rack run: every hypervisor of rack1 at once, aggregate MB/s.
fn report_rack(rack: &[Vec<f64>]) {
    let direct_rack = Spread::of(&rack[0]).map_or(f64::NAN, |s| s.median);
    println!(
        "  rack1's hypervisors ({}) reading at once, {RACK_SESSIONS} sessions each (64 KiB, QD8 per session): aggregate MB/s",
        RACK_HOSTS.join(", ")
    );
    for (i, cfg) in Config::ALL.into_iter().enumerate() {
        let Some(s) = Spread::of(&rack[i]) else {
            continue;
        };
        println!(
            "  {:<42} {:>20} {:>7.3}",
            cfg.label(),
            format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max),
            s.median / direct_rack
        );
    }
}

/// Old against new, configuration by configuration, with each side's spread.
fn report_ab(old: &Runs, new: &Runs, rounds: usize) {
    println!("bench splice A/B: rack1 running the baseline (old) and this tree (new), {rounds} rounds each, alternating which runs first");
    println!("{}", bench_ab::header(rounds));
    for (i, cfg) in Config::ALL.into_iter().enumerate().skip(1) {
        for (size, unit, name) in [(0, "MB/s", "64 KiB"), (1, "IOPS", "4 KiB")] {
            let figure = format!(
                "{} {name}",
                cfg.label().split(' ').next().unwrap_or_default()
            );
            println!(
                "{}",
                bench_ab::row(&figure, unit, &old.figure(i, size), &new.figure(i, size))
            );
        }
    }
}

/// Unique payload from the library's address (to hv1's iSCSI sessions and to
/// rack1's fetches from the library's agent) counted by rack1's classifier so far.
fn lab_status_library_bytes(lab: &Lab, cfg: Config) -> Result<u64> {
    if cfg == Config::Direct {
        return Ok(0);
    }
    let r = lab.status("rack1")?;
    let lib = format!("{}:", lab.addr4(lab.library()));
    Ok(r.flows
        .iter()
        .filter(|f| f.interface == "core" && f.src.starts_with(&lib))
        .map(|f| f.payload_bytes - f.retrans_bytes)
        .sum())
}

/// The hypervisors behind rack1 and the sessions each opens in the rack run.
const RACK_HOSTS: [&str; 2] = ["hv1", "hv2"];
const RACK_SESSIONS: usize = 4;

/// Every hypervisor of rack1 reading at once, `RACK_SESSIONS` sessions each
/// (64 KiB READs, QD8 per session: QD32 per host), each session its own
/// initiator name: their MB/s summed.
fn rack_aggregate(lab: &Lab, url: &str) -> Result<f64> {
    let mut children = Vec::new();
    for host in RACK_HOSTS {
        for k in 0..RACK_SESSIONS {
            let name = format!("iqn.2026-11.bench.nearblock:{host}-s{k}");
            let child = lab
                .cmd(
                    host,
                    &[
                        "iscsi-perf",
                        "-i",
                        &name,
                        "-m",
                        "8",
                        "-b",
                        "128",
                        "-t",
                        &SECS.to_string(),
                        url,
                    ],
                )
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            children.push((host, k, child));
        }
    }
    let mut total = 0.0;
    let mut failed = None;
    for (host, k, child) in children {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        match nearblock_lab::parse_iscsi_perf(&text) {
            Ok((mbs, _)) if out.status.success() => total += mbs,
            _ => {
                failed.get_or_insert(format!(
                    "{host} session {k}: {} {}",
                    text,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    if let Some(why) = failed {
        bail!("rack run: {why}");
    }
    Ok(total)
}

/// (MB/s, IOPS) for `blocks` 512-byte blocks per READ at QD32.
fn perf(lab: &Lab, url: &str, blocks: u32) -> Result<(f64, f64)> {
    lab.iscsi_perf("hv1", url, 32, blocks, SECS)
}

/// Removes `node`'s index store (`<node>.redb`) and the files beside it
/// (`<node>.redb.*`: the holder snapshot, the children state).
fn remove_index_store(lab: &Lab, node: &str) -> Result<()> {
    let prefix = format!("{node}.redb");
    for entry in std::fs::read_dir(lab.dir.path())? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
