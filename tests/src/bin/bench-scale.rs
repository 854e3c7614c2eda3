//! `cargo xtask bench scale`: the index at datacenter scale (issue 17),
//! measured at sizes this machine holds, each figure at three sizes so its
//! growth shows, and extrapolated to a rack of 40 hypervisors × 20 VMs × 20 GiB
//! and to a datacenter of 10,000 hypervisors / 1 PB (the extrapolation is
//! printed with the figure it scales).
//!
//! The synthetic datacenter follows the sharing the corpus measured
//! (docs/index.md, "Stats"): a few seed images, 70% zero blocks (corpus:
//! 61–87%); each VM disk derived from a seed, half as fresh builds sharing 90%
//! of the seed's non-zero blocks (corpus: 85–95%), half in place sharing 98.5%
//! (corpus: 98–99%); the rest of its blocks its own. VMs sit 20 to a
//! hypervisor.
//!
//! Parts:
//! 1. Rack index (redb, as on a rack appliance): build time, disk bytes,
//!    resident memory after open, holder entries, random lookups/s.
//! 2. Global index push throughput: the same batches applied to redb and to a
//!    real Redis Cluster (3 masters + 3 replicas, TLS, `WAIT` on every master),
//!    with each master's memory, keys and commands per CPU-second.
//! 3. Propagation traffic per link at a 5-minute rescan with 1% of blocks
//!    changing per hour, from the measured bytes of an encoded patch.
//!
//! Environment: `NEARBLOCK_SCALE_VMS` (comma-separated VM counts, default
//! 40,80,160), `NEARBLOCK_SCALE_BLOCKS` (blocks per VM disk, default 65,536 =
//! 256 MiB).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nearblock::index::{
    lookup::coarse_for, synthetic::SplitMix64, BlockHash, BlockStore, Change, Manifest, RedbStore,
    RedisClusterStore, StoreOptions,
};
use nearblock_lab::redis_cluster::{RedisCluster, MASTERS};

const SEEDS: u64 = 4;
const ZERO: f64 = 0.70;
const VMS_PER_HV: usize = 20;
/// The rack of the issue: 40 hypervisors × 20 VMs × 20 GiB disks.
const RACK_VMS: f64 = 800.0;
const RACK_DISK_BLOCKS: f64 = 20.0 * 262_144.0;
/// The datacenter: 10,000 hypervisors, 1 PB of images (2.7×10¹¹ 4 KiB blocks).
const DC_HYPERVISORS: f64 = 10_000.0;
const DC_BLOCKS: f64 = 2.7e11;
const TEN_GBE_BYTES_PER_S: f64 = 10e9 / 8.0;
const MIB: f64 = (1u64 << 20) as f64;

fn name(stream: u64, i: u64) -> BlockHash {
    let mut r = SplitMix64::new(stream.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i);
    r.hash()
}

/// Seed `s`'s block `i` (`None`: zero).
fn seed_block(s: u64, i: u64) -> Option<BlockHash> {
    let mut r = SplitMix64::new(s << 40 ^ i);
    (r.unit() >= ZERO).then(|| name(s, i))
}

/// Lookups/s of `n` names `store` holds, drawn at random from the first
/// `vms` VM disks, 256 per call (one round trip to a cluster).
fn lookup_rate(store: &impl BlockStore, vms: usize, blocks: u64, n: usize) -> Result<f64> {
    let mut r = SplitMix64::new(99);
    let queries: Vec<BlockHash> =
        std::iter::repeat_with(|| vm_block(r.below(vms) as u64, r.below(blocks as usize) as u64))
            .take(4 * n)
            .flatten()
            .take(n)
            .collect();
    let t = Instant::now();
    let mut found = 0usize;
    for q in queries.chunks(256) {
        found += store
            .holders_many(q)?
            .iter()
            .filter(|h| !h.is_empty())
            .count();
    }
    let per_s = queries.len() as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(
        found == queries.len(),
        "{found} of {} names found",
        queries.len()
    );
    Ok(per_s)
}

/// The lookup child: opens the rack index at `path` and looks up 200,000
/// names it holds at random; prints its resident bytes and lookups/s.
fn rack_lookups(vms: usize, blocks: u64, path: &std::path::Path) -> Result<()> {
    let store = RedbStore::open(path, StoreOptions::default())?;
    let per_s = lookup_rate(&store, vms, blocks, 200_000)?;
    // The whole process: the open index, after the lookups.
    println!("{} {per_s}", rss_bytes());
    Ok(())
}

/// Block `i` of VM `v`'s disk: derived from seed `v % SEEDS`, fresh (90% of
/// the seed's non-zero blocks shared) or in place (98.5%).
fn vm_block(v: u64, i: u64) -> Option<BlockHash> {
    let b = seed_block(v % SEEDS, i)?;
    let share = if v.is_multiple_of(2) { 0.90 } else { 0.985 };
    let mut r = SplitMix64::new((0x5ca1e ^ v) << 32 ^ i);
    Some(if r.unit() < share {
        b
    } else {
        name(1000 + v, i)
    })
}

fn vm_disk(v: u64, blocks: u64) -> Manifest {
    Manifest {
        image: format!("vm{v}"),
        size: blocks * 4096,
        block_size: 4096,
        blocks: (0..blocks).map(|i| vm_block(v, i)).collect(),
    }
}

fn put(v: u64, blocks: u64) -> Change {
    Change::PutImage {
        host: format!("hv{}", v as usize / VMS_PER_HV),
        manifest: vm_disk(v, blocks),
    }
}

/// Holder entries a manifest gives the index (non-zero blocks and coarse
/// groups at the default factor).
fn entries(m: &Manifest) -> u64 {
    let leaves = m.blocks.iter().filter(|b| b.is_some()).count() as u64;
    let groups = coarse_for(m.block_size, StoreOptions::default().coarse).map_or(0, |f| {
        m.blocks
            .chunks(f as usize)
            .filter(|g| g.iter().any(Option::is_some))
            .count() as u64
    });
    leaves + groups
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn dir_bytes(d: &std::path::Path) -> u64 {
    std::fs::read_dir(d).map_or(0, |it| {
        it.flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// Least-squares slope and intercept of `ys` over `xs` (per-unit growth).
fn fit(xs: &[f64], ys: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let slope = if sxx == 0.0 { 0.0 } else { sxy / sxx };
    (slope, my - slope * mx)
}

struct RackRow {
    vms: usize,
    entries: u64,
    build_s: f64,
    disk: u64,
    rss: u64,
    lookups_per_s: f64,
}

/// Part 1: a rack appliance's redb index of `vms` VM disks.
fn rack_index(vms: usize, blocks: u64) -> Result<RackRow> {
    let dir = nearblock_lab::tempdir::Dir::new("nb-scale")?;
    let path = dir.path().join("rack.redb");
    let opts = StoreOptions {
        log: true,
        ..StoreOptions::default()
    };
    let store = RedbStore::open(&path, opts)?;
    let mut n_entries = 0;
    let t0 = Instant::now();
    for chunk in (0..vms as u64).collect::<Vec<_>>().chunks(8) {
        let batch: Vec<Change> = chunk.iter().map(|&v| put(v, blocks)).collect();
        for c in &batch {
            if let Change::PutImage { manifest, .. } = c {
                n_entries += entries(manifest);
            }
        }
        store.apply(&batch)?;
    }
    store.compact()?;
    let build_s = t0.elapsed().as_secs_f64();
    store.close()?;
    // Opened and queried in a fresh process, so its resident memory is the
    // index's alone (this one's allocator keeps what the build freed).
    let out = std::process::Command::new(std::env::current_exe()?)
        .env(
            "NEARBLOCK_SCALE_CHILD",
            format!("{vms},{blocks},{}", path.display()),
        )
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let (Some(Ok(rss)), Some(Ok(lookups_per_s))) = (
        it.next().map(str::parse::<u64>),
        it.next().map(str::parse::<f64>),
    ) else {
        anyhow::bail!(
            "the lookup child: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let disk = dir_bytes(dir.path());
    Ok(RackRow {
        vms,
        entries: n_entries,
        build_s,
        disk,
        rss,
        lookups_per_s,
    })
}

struct PushRow {
    vms: usize,
    entries: u64,
    redb_per_s: f64,
    redis_per_s: f64,
    /// Seconds to apply one rescan's patch to one VM disk (the median of 5).
    redb_patch_s: f64,
    redis_patch_s: f64,
    redis_lookups_per_s: f64,
    masters: Vec<MasterInfo>,
}

#[derive(Default, Clone)]
struct MasterInfo {
    used_memory: u64,
    keys: u64,
    commands: u64,
    cpu_s: f64,
}

fn info_field(info: &str, key: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
}

fn masters_info(c: &RedisCluster) -> Result<Vec<MasterInfo>> {
    let mut out = Vec::new();
    for i in 0..c.ports.len() {
        let o = c.cli(i, &["INFO".into(), "everything".into()])?;
        let info = String::from_utf8_lossy(&o.stdout).into_owned();
        if info_field(&info, "role").as_deref() != Some("master") {
            continue;
        }
        let num = |k: &str| info_field(&info, k).and_then(|v| v.parse::<f64>().ok());
        let count = |k: &str| info_field(&info, k).and_then(|v| v.parse::<u64>().ok());
        let keys = info_field(&info, "db0")
            .and_then(|v| {
                v.split(',')
                    .find_map(|kv| kv.strip_prefix("keys=")?.parse().ok())
            })
            .unwrap_or(0);
        out.push(MasterInfo {
            used_memory: count("used_memory").unwrap_or(0),
            keys,
            commands: count("total_commands_processed").unwrap_or(0),
            cpu_s: num("used_cpu_user").unwrap_or(0.0) + num("used_cpu_sys").unwrap_or(0.0),
        });
    }
    Ok(out)
}

/// Part 2: the same batches pushed into redb and into the cluster.
fn push(c: &RedisCluster, vms: usize, blocks: u64, run: usize) -> Result<PushRow> {
    let batches: Vec<Vec<Change>> = (0..vms as u64)
        .collect::<Vec<_>>()
        .chunks(8)
        .map(|ch| ch.iter().map(|&v| put(v, blocks)).collect())
        .collect();
    let n_entries: u64 = batches
        .iter()
        .flatten()
        .map(|ch| match ch {
            Change::PutImage { manifest, .. } => entries(manifest),
            _ => 0,
        })
        .sum();
    let dir = nearblock_lab::tempdir::Dir::new("nb-scale")?;
    let redb = RedbStore::open(
        &dir.path().join("global.redb"),
        StoreOptions {
            log: false,
            ..StoreOptions::default()
        },
    )?;
    let t = Instant::now();
    for b in &batches {
        redb.apply(b)?;
    }
    let redb_per_s = n_entries as f64 / t.elapsed().as_secs_f64();
    let redb_patch_s = patch_time(&redb, blocks)?;
    drop(redb);
    let mut opts = c.options(&format!("scale{run}"))?;
    opts.log = false;
    opts.wait = Duration::from_secs(5);
    opts.timeout = Duration::from_secs(10);
    let store = RedisClusterStore::open(opts)?;
    let t = Instant::now();
    for b in &batches {
        store.apply(b)?;
    }
    let redis_per_s = n_entries as f64 / t.elapsed().as_secs_f64();
    let redis_patch_s = patch_time(&store, blocks)?;
    let redis_lookups_per_s = lookup_rate(&store, vms, blocks, 30_000)?;
    Ok(PushRow {
        vms,
        entries: n_entries,
        redb_per_s,
        redis_per_s,
        redb_patch_s,
        redis_patch_s,
        redis_lookups_per_s,
        masters: masters_info(c)?,
    })
}

/// One 5-minute rescan's patch of VM 0 (1% of its blocks per hour: 1/1200 of
/// them), applied 5 times; the median seconds.
fn patch_time(store: &impl BlockStore, blocks: u64) -> Result<f64> {
    let mut r = SplitMix64::new(77);
    let changed = (blocks / 1200).max(1);
    let mut times = Vec::new();
    for _ in 0..5 {
        let c = Change::PatchImage {
            host: format!("hv{}", 0),
            image: "vm0".into(),
            block_size: 4096,
            size: blocks * 4096,
            blocks: (0..changed)
                .map(|_| (r.below(blocks as usize) as u32, Some(r.hash())))
                .collect(),
        };
        let t = Instant::now();
        store.apply(&[c])?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// Part 3: bytes of an encoded patch per changed block (a rescan's push).
fn patch_bytes_per_block(changed: usize) -> f64 {
    let mut r = SplitMix64::new(5);
    let c = Change::PatchImage {
        host: "hv0017".into(),
        image: "vm-0017-disk0".into(),
        block_size: 4096,
        size: 20 << 30,
        blocks: (0..changed)
            .map(|_| (r.below(5 << 20) as u32, Some(r.hash())))
            .collect(),
    };
    c.encode().len() as f64 / changed as f64
}

fn main() -> Result<()> {
    if let Ok(child) = std::env::var("NEARBLOCK_SCALE_CHILD") {
        let mut f = child.splitn(3, ',');
        let (Some(vms), Some(blocks), Some(path)) = (f.next(), f.next(), f.next()) else {
            anyhow::bail!("NEARBLOCK_SCALE_CHILD: {child}");
        };
        return rack_lookups(vms.parse()?, blocks.parse()?, std::path::Path::new(path));
    }
    let vms: Vec<usize> = std::env::var("NEARBLOCK_SCALE_VMS")
        .unwrap_or_else(|_| "40,80,160".into())
        .split(',')
        .map(|s| s.trim().parse().context("NEARBLOCK_SCALE_VMS"))
        .collect::<Result<_>>()?;
    let blocks: u64 = std::env::var("NEARBLOCK_SCALE_BLOCKS")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(65_536);
    println!("== bench scale: VM disks of {blocks} blocks ({} MiB), {VMS_PER_HV} per hypervisor, {SEEDS} seeds, {:.0}% zero", (blocks * 4096) >> 20, ZERO * 100.0);

    report_rack(&vms, blocks)?;
    report_global(&vms, blocks)?;
    report_propagation();
    Ok(())
}

/// Part 1, printed.
fn report_rack(vms: &[usize], blocks: u64) -> Result<()> {
    println!("\n-- 1. rack index (redb)");
    println!(
        "{:>6} {:>12} {:>9} {:>10} {:>10} {:>8} {:>12}",
        "VMs", "entries", "build s", "disk MiB", "RSS MiB", "B/entry", "lookups/s"
    );
    let mut rack = Vec::new();
    for &n in vms {
        let row = rack_index(n, blocks)?;
        println!(
            "{:>6} {:>12} {:>9.1} {:>10.1} {:>10.1} {:>8.1} {:>12.0}",
            row.vms,
            row.entries,
            row.build_s,
            row.disk as f64 / MIB,
            row.rss as f64 / MIB,
            row.disk as f64 / row.entries as f64,
            row.lookups_per_s
        );
        rack.push(row);
    }
    let xs: Vec<f64> = rack.iter().map(|r| r.entries as f64).collect();
    let (disk_per, _) = fit(&xs, &rack.iter().map(|r| r.disk as f64).collect::<Vec<_>>());
    let (rss_per, _) = fit(&xs, &rack.iter().map(|r| r.rss as f64).collect::<Vec<_>>());
    let per_vm_entries = rack.last().map_or(0.0, |r| r.entries as f64 / r.vms as f64)
        * (RACK_DISK_BLOCKS / blocks as f64);
    let rack_entries = per_vm_entries * RACK_VMS;
    println!(
        "growth: {disk_per:.1} B disk and {rss_per:.1} B resident per entry (least squares over {} sizes)",
        rack.len()
    );
    println!(
        "extrapolated rack (40 hv × 20 VMs × 20 GiB): {rack_entries:.3e} entries → {:.1} GiB on disk, {:.1} GiB resident (goal ≤ 4 GiB of memory)",
        rack_entries * disk_per / f64::from(1u32 << 30),
        rack_entries * rss_per / f64::from(1u32 << 30)
    );

    Ok(())
}

/// Part 2, printed.
fn report_global(vms: &[usize], blocks: u64) -> Result<()> {
    println!("\n-- 2. global index push: redb vs Redis Cluster ({MASTERS} masters + {MASTERS} replicas, TLS, WAIT 1 on every master)");
    let cluster = RedisCluster::start()?;
    let base = masters_info(&cluster)?;
    println!(
        "{:>6} {:>12} {:>14} {:>14} {:>16} {:>12} {:>14} {:>14} {:>15} {:>16}",
        "VMs",
        "entries",
        "redb ent/s",
        "redis ent/s",
        "redis MiB/master",
        "keys/master",
        "cmds/cpu-s",
        "redb patch ms",
        "redis patch ms",
        "redis lookups/s"
    );
    let mut pushes = Vec::new();
    let mut prev = base.clone();
    for (run, &n) in vms.iter().enumerate() {
        let row = push(&cluster, n, blocks, run)?;
        let mem: u64 = row.masters.iter().map(|m| m.used_memory).sum();
        let base_mem: u64 = base.iter().map(|m| m.used_memory).sum();
        let keys: u64 = row.masters.iter().map(|m| m.keys).sum();
        let cmds: u64 = row.masters.iter().map(|m| m.commands).sum::<u64>()
            - prev.iter().map(|m| m.commands).sum::<u64>();
        let cpu: f64 = row.masters.iter().map(|m| m.cpu_s).sum::<f64>()
            - prev.iter().map(|m| m.cpu_s).sum::<f64>();
        println!(
            "{:>6} {:>12} {:>14.0} {:>14.0} {:>16.1} {:>12} {:>14.0} {:>14.1} {:>15.1} {:>16.0}",
            row.vms,
            row.entries,
            row.redb_per_s,
            row.redis_per_s,
            mem.saturating_sub(base_mem) as f64 / MASTERS as f64 / MIB,
            keys / MASTERS as u64,
            cmds as f64 / cpu.max(1e-9),
            row.redb_patch_s * 1000.0,
            row.redis_patch_s * 1000.0,
            row.redis_lookups_per_s
        );
        prev.clone_from(&row.masters);
        pushes.push(row);
    }
    // Every run adds its own prefix: memory is cumulative over the runs.
    let cum_entries: Vec<f64> = pushes
        .iter()
        .scan(0.0, |acc, r| {
            *acc += r.entries as f64;
            Some(*acc)
        })
        .collect();
    let mems: Vec<f64> = pushes
        .iter()
        .map(|r| r.masters.iter().map(|m| m.used_memory).sum::<u64>() as f64)
        .collect();
    let (redis_per_entry, _) = fit(&cum_entries, &mems);
    let dc_entries = DC_BLOCKS * (1.0 - ZERO) * (1.0 + 1.0 / 16.0);
    println!("growth: {redis_per_entry:.1} B of master memory per entry (replicas double it)");
    println!(
        "extrapolated 1 PB ({DC_BLOCKS:.1e} blocks, {:.0}% non-zero, + coarse): {dc_entries:.2e} entries → {:.1} TiB on masters, {:.0} masters of 24 GiB (+ as many replicas)",
        (1.0 - ZERO) * 100.0,
        dc_entries * redis_per_entry / 1024f64.powi(4),
        (dc_entries * redis_per_entry / (24.0 * 1024f64.powi(3))).ceil()
    );

    if let Some(last) = pushes.last() {
        // A patch rewrites its source's whole manifest: it scales with the
        // disk, not with the change.
        let scale = RACK_DISK_BLOCKS / blocks as f64;
        let vms_dc = DC_HYPERVISORS * VMS_PER_HV as f64;
        println!(
            "a rescan's patch of one {} MiB disk: redb {:.1} ms, redis {:.1} ms; of a 20 GiB disk (x{scale:.0}, the manifest is rewritten whole): redis {:.2} s; {vms_dc:.0} VMs every 5 min: {:.0} writer-seconds per second",
            (blocks * 4096) >> 20,
            last.redb_patch_s * 1000.0,
            last.redis_patch_s * 1000.0,
            last.redis_patch_s * scale,
            last.redis_patch_s * scale * vms_dc / 300.0
        );
    }

    Ok(())
}

/// Part 3, printed.
fn report_propagation() {
    println!("\n-- 3. propagation: 5-minute rescan, 1% of blocks changing per hour");
    let per_block = patch_bytes_per_block(10_000);
    let rack_blocks = RACK_VMS * RACK_DISK_BLOCKS;
    let rack_bps = rack_blocks * 0.01 / 3600.0 * per_block;
    let dc_bps = DC_BLOCKS * 0.01 / 3600.0 * per_block;
    println!("encoded patch: {per_block:.1} B per changed block (10,000 changed of a 20 GiB disk)");
    println!(
        "rack → global link: {:.2} MB/s = {:.4}% of 10 GbE (goal < 1%); a rescan every 5 min pushes {:.1} MB",
        rack_bps / 1e6,
        rack_bps / TEN_GBE_BYTES_PER_S * 100.0,
        rack_bps * 300.0 / 1e6
    );
    println!(
        "into the global indexer (all of 1 PB, {:.0} racks): {:.1} MB/s = {:.1}% of one 10 GbE link",
        DC_HYPERVISORS / 40.0,
        dc_bps / 1e6,
        dc_bps / TEN_GBE_BYTES_PER_S * 100.0
    );
}
