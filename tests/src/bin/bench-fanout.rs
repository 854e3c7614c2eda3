//! `cargo xtask bench fanout`: 16 VMs from corpus images (4 each of b, c, d
//! and g) on 3 racks × 3 hypervisors, the library's uplink shaped to 1 Gbit/s
//! and the racks' to 2 Gbit/s (`tests/topologies/fanout.toml`), in one run:
//!
//! - **direct**: 16 concurrent `qemu-img convert` of the library's LUNs to
//!   sparse raw files, one per VM on its host (core's appliance monitor-only,
//!   so the same counters count);
//! - **one build alone**: nearblock places and builds one VM of b;
//! - **nearblock**: the 16 VMs placed by the manager (each on the host the
//!   direct run used) and built by the agents, all submitted at once.
//!
//! It prints the wall-time ratio (direct / nearblock; goal ≥ 10), the
//! library-link bytes ratio (goal ≥ 20), each uplink's peak utilisation in
//! 1-second windows, and the 16 builds' wall time against one build alone
//! (goal ≤ 1.5). It checks free disk first and removes its outputs (the lab's
//! directory) at the end.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nearblock_lab::{fabric::Fabric, toml_path, ApplianceOptions, Lab, LunSpec, FANOUT_TOPOLOGY};
use serde_json::Value;

const IQN: &str = "iqn.2026-12.bench.nearblock:fanout";
const AGENT_PORT: u16 = 7320;
const INDEXER_PORT: u16 = 7321;
const IMAGES: [&str; 4] = [
    "b-bookworm-cloud",
    "c-bookworm-cloud-python",
    "d-bookworm-cloud-nginx",
    "g-bookworm-cloud-nginx-inplace",
];
const VMS: usize = 16;
const HOSTS: usize = 9;
/// What the run needs on disk: the direct copies and the built disks (each
/// image's data, ~400 MiB, sparse), with room to spare.
const NEED_FREE: u64 = 10 << 30;
const UPLINKS: [(&str, f64); 4] = [
    ("library", 1000.0),
    ("rack1", 2000.0),
    ("rack2", 2000.0),
    ("rack3", 2000.0),
];

fn corpus_dir() -> PathBuf {
    std::env::var_os("NEARBLOCK_CORPUS_DIR")
        .map_or_else(|| "/var/cache/nearblock/corpus".into(), PathBuf::from)
}

/// VM `i`: (name, image LUN 1..=4, host).
fn vm(i: usize) -> (String, usize, String) {
    (
        format!("vm{i:02}"),
        i % IMAGES.len() + 1,
        format!("hv{}", i % HOSTS + 1),
    )
}

/// Bytes each way on core's port toward each uplink's far end, by peer.
fn uplink_bytes(lab: &Lab) -> Result<BTreeMap<String, u64>> {
    let ports = lab.link_bytes("core")?;
    let mut out = BTreeMap::new();
    for (peer, _) in UPLINKS {
        let iface = &lab.port_toward("core", peer).context("port")?.iface;
        let (_, rx, tx) = ports.iter().find(|(i, _, _)| i == iface).context("iface")?;
        out.insert(peer.to_owned(), rx + tx);
    }
    Ok(out)
}

/// Samples of the uplinks' byte counters, for peaks in 1-second windows.
#[derive(Default)]
struct Samples(Vec<(f64, BTreeMap<String, u64>)>);

impl Samples {
    fn take(&mut self, lab: &Lab, start: Instant) -> Result<()> {
        self.0
            .push((start.elapsed().as_secs_f64(), uplink_bytes(lab)?));
        Ok(())
    }

    /// Per uplink: bytes over the run, and the peak rate (Mbit/s) over any
    /// window of at least 1 s between samples.
    fn summary(&self) -> BTreeMap<String, (u64, f64)> {
        let mut out = BTreeMap::new();
        for (peer, _) in UPLINKS {
            let series: Vec<(f64, u64)> = self.0.iter().map(|(t, m)| (*t, m[peer])).collect();
            let total = series.last().map_or(0, |l| l.1) - series.first().map_or(0, |f| f.1);
            let mut peak = 0.0f64;
            for (i, &(t0, b0)) in series.iter().enumerate() {
                if let Some(&(t1, b1)) = series[i..].iter().find(|(t, _)| *t - t0 >= 1.0) {
                    peak = peak.max((b1 - b0) as f64 * 8.0 / (t1 - t0) / 1e6);
                }
            }
            out.insert(peer.to_owned(), (total, peak));
        }
        out
    }
}

struct Bench {
    lab: Lab,
    fabric: Fabric,
}

impl Bench {
    fn vm_dir(&self, hv: &str) -> PathBuf {
        self.lab.dir.path().join(format!("vms-{hv}"))
    }

    /// `nearblock vm ARGS…` in core with the admin token: stdout.
    fn vm_cli(&self, words: &[&str]) -> Result<String> {
        let bin = nearblock_lab::nearblock_bin()?;
        let token = self.lab.api_admin_token_file().display().to_string();
        let mut argv = vec![bin.to_str().context("path")?, "vm", "--token-file", &token];
        argv.extend_from_slice(words);
        let o = self.lab.exec("core", &argv)?;
        if !o.status.success() {
            bail!("vm {words:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn place(&self, name: &str, lun: usize, host: &str) -> Result<u64> {
        let image = format!("{IQN}/{lun}");
        let out = self.vm_cli(&["place", &image, "--name", name, "--within", host, "--json"])?;
        let job: Value = serde_json::from_str(&out)?;
        job["id"].as_u64().context("job id")
    }

    fn job(&self, id: u64) -> Result<Value> {
        Ok(serde_json::from_str(&self.vm_cli(&[
            "job",
            &id.to_string(),
            "--json",
        ])?)?)
    }

    /// Waits (bounded) for every job to end; samples the uplinks meanwhile.
    fn wait_jobs(&self, ids: &[u64], samples: &mut Samples, start: Instant) -> Result<Vec<Value>> {
        let deadline = Instant::now() + Duration::from_mins(30);
        loop {
            samples.take(&self.lab, start)?;
            let jobs: Vec<Value> = ids.iter().map(|&id| self.job(id)).collect::<Result<_>>()?;
            let open = jobs
                .iter()
                .filter(|j| {
                    matches!(
                        j["state"].as_str(),
                        Some("placing" | "building" | "indexing")
                    )
                })
                .count();
            if open == 0 {
                if let Some(bad) = jobs.iter().find(|j| j["state"] != "done") {
                    bail!("a job did not end done: {bad:#}");
                }
                return Ok(jobs);
            }
            if Instant::now() > deadline {
                bail!("{open} jobs still running after 30 min");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one run, top to bottom: the lab, the three measurements, the ratios"
)]
fn main() -> Result<()> {
    let corpus = corpus_dir().join("images");
    let images: Vec<PathBuf> = IMAGES
        .iter()
        .map(|n| corpus.join(format!("{n}.raw")))
        .collect();
    if let Some(missing) = images.iter().find(|p| !p.exists()) {
        bail!(
            "{} missing: `cargo xtask bootstrap` builds the corpus",
            missing.display()
        );
    }
    let t_setup = Instant::now();
    let lab = Lab::new(FANOUT_TOPOLOGY)?;
    let free = nearblock_lab::vmlab::free_bytes(lab.dir.path())?;
    if free < NEED_FREE {
        bail!(
            "{} GiB free in {}, the bench needs {} GiB",
            free >> 30,
            lab.dir.path().display(),
            NEED_FREE >> 30
        );
    }
    let topo = lab.write_file("topology.toml", FANOUT_TOPOLOGY.as_bytes())?;
    let fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT)?;
    let mut b = Bench { lab, fabric };
    for (i, path) in images.iter().enumerate() {
        b.lab.add_lun(LunSpec {
            lun: u32::try_from(i + 1)?,
            ..LunSpec::read_only(IQN, path.clone())
        })?;
    }
    // core: monitor-only (counts both runs alike), the global indexer, the manager.
    let ix = b.fabric.indexer_config(&b.lab, "core", None)?;
    let extra_config = format!(
        "[cost]\ntopology = {}\n[planner]\n[manager]\ndb = {}\nindex_wait_secs = 600\n[indexer]\nconfig = {}\n",
        toml_path(&topo),
        toml_path(&b.lab.dir.path().join("manager.redb")),
        toml_path(&ix),
    );
    b.lab.start_appliance(
        "core",
        ApplianceOptions {
            steer: false,
            extra_config,
        },
    )?;
    for rack in ["rack1", "rack2", "rack3"] {
        b.fabric.start_indexer(&b.lab, rack, Some("core"))?;
    }
    for n in 1..=HOSTS {
        let hv = format!("hv{n}");
        let rack = format!("rack{}", (n - 1) / 3 + 1);
        let extra = format!(
            "[hypervisor]\nvm_dir = {}\nmanagers = [\"core\"]\n[resources]\ndisk_free_bytes = {}\n",
            toml_path(&b.vm_dir(&hv)),
            1u64 << 40
        );
        b.fabric.start_agent(&b.lab, &hv, &rack, &[], &extra)?;
    }
    b.fabric.start_library_agent(&b.lab, "core")?;
    // The library's agent indexes the four LUNs (4 GiB) before anything is placed.
    let deadline = Instant::now() + Duration::from_mins(10);
    loop {
        let inv: Value = serde_json::from_str(&b.vm_cli(&["list", "--json"])?)?;
        let listed = inv["images"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|i| i["host"] == "library").count());
        let hosts = inv["hosts"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|h| h["reporting"] == true).count());
        if listed >= IMAGES.len() && hosts == HOSTS {
            break;
        }
        if Instant::now() > deadline {
            bail!("the library's images were not indexed within 10 min");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "bench fanout: lab ready in {:.0} s",
        t_setup.elapsed().as_secs_f64()
    );

    // 1. Direct: 16 concurrent qemu-img copies from the library.
    let (qemu, modules) = nearblock_lab::qemu_img()?;
    let direct_dir = b.lab.dir.path().join("direct");
    std::fs::create_dir_all(&direct_dir)?;
    let mut samples = Samples::default();
    let start = Instant::now();
    samples.take(&b.lab, start)?;
    let mut copies: Vec<(String, Child)> = Vec::new();
    for i in 0..VMS {
        let (name, lun, host) = vm(i);
        let url = b.lab.lun_url(IQN, u32::try_from(lun)?);
        let child = b
            .lab
            .cmd(
                &host,
                &[qemu.to_str().context("path")?, "convert", "-O", "raw", &url],
            )
            .arg(direct_dir.join(format!("{name}.raw")))
            .env("QEMU_MODULE_DIR", &modules)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        copies.push((name, child));
    }
    let deadline = Instant::now() + Duration::from_mins(30);
    while copies
        .iter_mut()
        .any(|(_, c)| c.try_wait().ok().flatten().is_none())
    {
        if Instant::now() > deadline {
            bail!("direct copies still running after 30 min");
        }
        samples.take(&b.lab, start)?;
        std::thread::sleep(Duration::from_millis(500));
    }
    let direct_secs = start.elapsed().as_secs_f64();
    samples.take(&b.lab, start)?;
    for (name, c) in &mut copies {
        let st = c.wait()?;
        if !st.success() {
            bail!("qemu-img for {name} failed: {st}");
        }
    }
    let direct = samples.summary();
    std::fs::remove_dir_all(&direct_dir)?;
    eprintln!("bench fanout: direct done in {direct_secs:.1} s");

    // 2. One nearblock build alone (image b on hv1), then retired again so
    // the 16 start from the library alone.
    let mut alone_samples = Samples::default();
    let start = Instant::now();
    let id = b.place("alone", 1, "hv1")?;
    b.wait_jobs(&[id], &mut alone_samples, start)?;
    let alone_secs = start.elapsed().as_secs_f64();
    b.vm_cli(&["set", "hv1", "alone", "retire"])?;
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        let inv: Value = serde_json::from_str(&b.vm_cli(&["list", "--json"])?)?;
        let gone = !inv["images"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["image"] == "vm/alone"));
        if gone {
            break;
        }
        if Instant::now() > deadline {
            bail!("vm/alone still indexed 2 min after its retirement");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("bench fanout: one build alone in {alone_secs:.1} s");

    // 3. The 16, placed and built by nearblock, submitted together.
    let mut samples = Samples::default();
    let start = Instant::now();
    samples.take(&b.lab, start)?;
    let mut ids = Vec::new();
    for i in 0..VMS {
        let (name, lun, host) = vm(i);
        ids.push(b.place(&name, lun, &host)?);
    }
    let jobs = b.wait_jobs(&ids, &mut samples, start)?;
    let nearblock_secs = start.elapsed().as_secs_f64();
    samples.take(&b.lab, start)?;
    let near = samples.summary();
    // Each built disk is its image, byte for byte.
    for i in 0..VMS {
        let (name, lun, host) = vm(i);
        let built = std::fs::read(b.vm_dir(&host).join(format!("{name}.raw")))?;
        let want = std::fs::read(&images[lun - 1])?;
        if built != want {
            bail!("{name} on {host} is not {}", IMAGES[lun - 1]);
        }
    }
    let mut by_class: BTreeMap<String, u64> = BTreeMap::new();
    for j in &jobs {
        if let Some(c) = j["progress"]["by_class"].as_object() {
            for (k, v) in c {
                *by_class.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
    }

    let lib_direct = direct["library"].0;
    let lib_near = near["library"].0.max(1);
    println!("\nbench fanout: {VMS} VMs (4 each of b, c, d, g) on 3 racks × 3 hypervisors; library uplink 1 Gbit/s, rack uplinks 2 Gbit/s");
    println!("| | direct (16 × qemu-img) | nearblock (16 jobs) | ratio | goal |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| wall time | {direct_secs:.1} s | {nearblock_secs:.1} s | **{:.2}** | ≥ 10 |",
        direct_secs / nearblock_secs
    );
    println!(
        "| library-link bytes | {:.0} MiB | {:.0} MiB | **{:.2}** | ≥ 20 |",
        lib_direct as f64 / 1_048_576.0,
        lib_near as f64 / 1_048_576.0,
        lib_direct as f64 / lib_near as f64
    );
    for (peer, cap) in UPLINKS {
        let link = if peer == "library" {
            "library–core".to_owned()
        } else {
            format!("core–{peer}")
        };
        println!(
            "| {link} peak (1 s windows) | {:.0} Mbit/s ({:.0}%) | {:.0} Mbit/s ({:.0}%) | | |",
            direct[peer].1,
            100.0 * direct[peer].1 / cap,
            near[peer].1,
            100.0 * near[peer].1 / cap
        );
    }
    println!(
        "| 16 builds / one alone | | {nearblock_secs:.1} s / {alone_secs:.1} s | **{:.2}** | ≤ 1.5 |",
        nearblock_secs / alone_secs
    );
    println!("nearblock's block bytes by source class: {by_class:?}");
    Ok(())
}
