//! `cargo xtask bench migrate`: a running VM moved by nearblock against a
//! plain copy of its disk from its host, on the 3 racks × 3 hypervisors lab
//! with corpus image b (1 GiB, ~400 MiB of data) as the library's LUN.
//!
//! - `web1` on hv1: a copy of b served by qemu-storage-daemon, written by the
//!   lab's guest (`vm-workload`) at 4 MiB/s; `other1`, another VM of seed b,
//!   on hv4 (rack2).
//! - **plain copy**: the VM paused, its disk copied from hv1 to hv6 with
//!   `qemu-img convert` over NBD (`qemu-nbd` on hv1, TCP): the VM is stopped
//!   for the whole copy; bytes from hv1 by core's BPF flow counters.
//! - **nearblock**: `vm place vm/web1 --within hv5` (a migration): time from
//!   the job's creation until the VM runs on hv5, the pause-to-resume time,
//!   bytes from hv1 (the job's per-source bytes and the BPF counters), rounds.
//! - **round cost**: the same guest on `web2` (hv2), whose disk holds a
//!   quarter of b's data, migrated with dirty bitmaps, and on `web3` (hv3, b,
//!   no bitmaps: the rescan default): bytes rehashed and time per pre-copy
//!   round, against web1's.
//!
//! It prints the ratios (bytes from the source host, total time, the VM's
//! stop) and removes its outputs (the lab's directory) at the end.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nearblock_lab::{fabric::Fabric, toml_path, vmlab, Lab, LunSpec, THREE_RACKS_TOPOLOGY};
use serde_json::Value;

const IQN: &str = "iqn.2026-12.bench.nearblock:migrate";
const AGENT_PORT: u16 = 7350;
const INDEXER_PORT: u16 = 7351;
const NBD_PORT: u16 = 10809;
const RATE: u64 = 4 << 20;
const WRITE: u64 = 64 << 10;
const NEED_FREE: u64 = 6 << 30;

fn corpus_dir() -> PathBuf {
    std::env::var_os("NEARBLOCK_CORPUS_DIR")
        .map_or_else(|| "/var/cache/nearblock/corpus".into(), PathBuf::from)
}

struct Bench {
    lab: Lab,
    fabric: Fabric,
    workload: PathBuf,
    size: u64,
    children: vmlab::Children,
}

/// One pre-copy round.
struct Round {
    /// Bytes of the blocks whose content changed.
    changed: u64,
    /// Bytes the source rehashed.
    hashed: u64,
    ms: u64,
}

/// One migration as the bench reports it.
struct Moved {
    /// From the job's creation until the VM ran on the target.
    total: Duration,
    pause_ms: u64,
    from_source: u64,
    /// Pre-copy rounds (not round 0), the paused one last.
    rounds: Vec<Round>,
}

impl Bench {
    fn vm_dir(&self, hv: &str) -> PathBuf {
        self.lab.dir.path().join(format!("vms-{hv}"))
    }

    fn vm_cli(&self, words: &[&str]) -> Result<Value> {
        vmlab::vm_json(&self.lab, "core", &self.lab.api_admin_token_file(), words)
    }

    /// Bytes of payload core's BPF counters saw from `node`'s `port`.
    fn bpf_from(&self, node: &str, port: u16) -> Result<u64> {
        let src = format!("{}:{port}", self.lab.addr4(node));
        Ok(self
            .lab
            .status("core")?
            .flows
            .iter()
            .filter(|f| f.src == src)
            .map(|f| f.payload_bytes - f.retrans_bytes)
            .sum())
    }

    /// VM `name` on `hv`: `disk` copied in, served by a storage daemon and
    /// written by the guest; `bitmaps` off leaves the hook to rescan.
    fn start_vm(
        &mut self,
        hv: &str,
        name: &str,
        disk: &Path,
        bitmaps: bool,
        seed: u64,
    ) -> Result<()> {
        let path = self.vm_dir(hv).join(format!("{name}.raw"));
        vmlab::sparse_copy(disk, &path)?;
        let served = vmlab::serve_disk(self.lab.dir.path(), name, &path, &mut self.children)?;
        let stats = self.lab.dir.path().join(format!("{name}.workload.json"));
        let pid = vmlab::Workload {
            rate: RATE,
            write: WRITE,
            seed,
        }
        .start(
            &self.workload,
            &served,
            self.size,
            &stats,
            &mut self.children,
        )?;
        vmlab::write_vm_files(
            &self.vm_dir(hv),
            name,
            &format!("{IQN}/1"),
            self.size,
            Some(pid),
            bitmaps.then_some(&served),
        )
    }

    fn wait_indexed(&self, hv: &str, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_mins(2);
        loop {
            let inv = self.vm_cli(&["list", "--json"])?;
            if inv["vms"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v["name"] == name && v["indexed"] == true))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self.fabric.procs.log(&format!("agent-{hv}"));
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                bail!("{name} not indexed within 2 minutes; {hv}'s agent: {tail:#?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn migrate(&self, name: &str, source: &str, target: &str) -> Result<Moved> {
        let bpf_before = self.bpf_from(source, AGENT_PORT)?;
        let started = Instant::now();
        let job = self.vm_cli(&[
            "place",
            &format!("vm/{name}"),
            "--name",
            name,
            "--within",
            target,
            "--json",
        ])?;
        let id = job["id"].as_u64().context("job id")?.to_string();
        let mut running_after = None;
        let deadline = Instant::now() + Duration::from_mins(10);
        let job = loop {
            let job = self.vm_cli(&["job", &id, "--json"])?;
            let state = job["state"].as_str().unwrap_or("").to_owned();
            if running_after.is_none() && (state == "indexing" || state == "done") {
                running_after = Some(started.elapsed());
            }
            if matches!(state.as_str(), "done" | "failed" | "cancelled") {
                break job;
            }
            if Instant::now() > deadline {
                bail!("migration of {name} not done in 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if job["state"] != "done" {
            bail!("migration of {name}: {job:#}");
        }
        let m = &job["migration"];
        let rounds: Vec<&Value> = m["rounds"].as_array().context("rounds")?.iter().collect();
        let from_job: u64 = rounds
            .iter()
            .filter_map(|r| r["bytes_by_source"][source].as_u64())
            .sum();
        let from_bpf = self.bpf_from(source, AGENT_PORT)? - bpf_before;
        println!("  {name}: {source} → {target}: {} rounds, from {source} {from_job} B by the job, {from_bpf} B by BPF", rounds.len());
        Ok(Moved {
            total: running_after.context("never ran on the target")?,
            pause_ms: m["pause_to_resume_ms"].as_u64().context("pause")?,
            from_source: from_bpf.max(from_job),
            rounds: rounds[1..]
                .iter()
                .map(|r| Round {
                    changed: r["blocks_changed"].as_u64().unwrap_or(0) * 4096,
                    hashed: r["bytes_hashed"].as_u64().unwrap_or(0),
                    ms: r["ms"].as_u64().unwrap_or(0),
                })
                .collect(),
        })
    }

    /// The plain way: web1 paused, its disk copied from hv1 to hv6 over NBD,
    /// resumed. Returns (time, bytes from hv1).
    fn plain_copy(&self, name: &str) -> Result<(Duration, u64)> {
        let run: Value = serde_json::from_slice(&std::fs::read(
            self.vm_dir("hv1").join(format!("{name}.run.json")),
        )?)?;
        let pid = i32::try_from(run["pid"].as_u64().context("pid")?)?;
        let disk = self.vm_dir("hv1").join(format!("{name}.raw"));
        let (qemu_img, modules) = nearblock_lab::qemu_img()?;
        let qemu_nbd = qemu_img.with_file_name("qemu-nbd");
        let addr = self.lab.addr4("hv1").to_string();
        let mut server = self
            .lab
            .cmd(
                "hv1",
                &[
                    qemu_nbd.to_str().context("path")?,
                    "-r",
                    "-f",
                    "raw",
                    "-b",
                    &addr,
                    "-p",
                    &NBD_PORT.to_string(),
                    "-t",
                    disk.to_str().context("path")?,
                ],
            )
            .spawn()?;
        std::thread::sleep(Duration::from_millis(500));
        let before = self.bpf_from("hv1", NBD_PORT)?;
        let out = self.vm_dir("hv6").join("plain.raw");
        // SAFETY: kill(2) of the guest's process group (the VM's pause).
        unsafe { libc::kill(-pid, libc::SIGSTOP) };
        let started = Instant::now();
        let copied = self
            .lab
            .cmd(
                "hv6",
                &[
                    qemu_img.to_str().context("path")?,
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &format!("nbd://{addr}:{NBD_PORT}"),
                    out.to_str().context("path")?,
                ],
            )
            .env("QEMU_MODULE_DIR", &modules)
            .status();
        let took = started.elapsed();
        // SAFETY: as above: the VM resumes.
        unsafe { libc::kill(-pid, libc::SIGCONT) };
        let _ = server.kill();
        let _ = server.wait();
        if !copied?.success() {
            bail!("qemu-img convert over NBD failed");
        }
        let bytes = self.bpf_from("hv1", NBD_PORT)? - before;
        std::fs::remove_file(&out)?;
        Ok((took, bytes))
    }
}

/// Means over the rounds: (bytes changed, bytes rehashed, ms).
fn mean(v: &[Round]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let n = v.len() as f64;
    let avg = |f: &dyn Fn(&Round) -> u64| v.iter().map(|r| f(r) as f64).sum::<f64>() / n;
    (avg(&|r| r.changed), avg(&|r| r.hashed), avg(&|r| r.ms))
}

#[expect(
    clippy::too_many_lines,
    reason = "the bench's steps in order: the lab, the plain copy, the migrations, the report"
)]
fn main() -> Result<()> {
    let image = corpus_dir().join("images/b-bookworm-cloud.raw");
    if !image.exists() {
        bail!(
            "{} missing: `cargo xtask bootstrap` builds the corpus",
            image.display()
        );
    }
    let workload = std::env::current_exe()?.with_file_name("vm-workload");
    if !workload.exists() {
        bail!(
            "{} missing: `cargo xtask bench migrate` builds it",
            workload.display()
        );
    }
    let size = std::fs::metadata(&image)?.len();
    let t_setup = Instant::now();
    let lab = Lab::new(THREE_RACKS_TOPOLOGY)?;
    let free = vmlab::free_bytes(lab.dir.path())?;
    if free < NEED_FREE {
        bail!(
            "{} GiB free in {}, the bench needs {} GiB",
            free >> 30,
            lab.dir.path().display(),
            NEED_FREE >> 30
        );
    }
    let topo = lab.write_file("topology.toml", THREE_RACKS_TOPOLOGY.as_bytes())?;
    let fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT)?;
    let mut b = Bench {
        lab,
        fabric,
        workload,
        size,
        children: vmlab::Children::default(),
    };
    b.lab.add_lun(LunSpec::read_only(IQN, image.clone()))?;
    b.lab.set_datapath_extra(
        "core",
        &format!("image_transfer_ports = [{AGENT_PORT}, {NBD_PORT}]"),
    );
    b.fabric.start_manager(
        &mut b.lab,
        "core",
        &topo,
        "stale_secs = 5\nindex_wait_secs = 120\nmigrate_final_mib = 4\nretire_grace_secs = 2",
    )?;
    for rack in ["rack1", "rack2"] {
        b.fabric.start_indexer(&b.lab, rack, Some("core"))?;
    }
    b.fabric.start_library_agent(&b.lab, "core")?;
    // web2's disk: a quarter of b's data (the rest holes).
    let quarter = b.lab.dir.path().join("quarter.raw");
    {
        use std::os::unix::fs::FileExt;
        let data = std::fs::read(&image)?;
        let f = std::fs::File::create(&quarter)?;
        f.set_len(size)?;
        let mut kept = 0usize;
        let total = data
            .chunks(4096)
            .filter(|c| c.iter().any(|&x| x != 0))
            .count();
        for (i, c) in data.chunks(4096).enumerate() {
            if c.iter().any(|&x| x != 0) && kept < total / 4 {
                f.write_all_at(c, (i * 4096) as u64)?;
                kept += 1;
            }
        }
        f.sync_all()?;
    }
    for hv in ["hv1", "hv2", "hv3", "hv4", "hv5", "hv6"] {
        std::fs::create_dir_all(b.vm_dir(hv))?;
    }
    vmlab::sparse_copy(&image, &b.vm_dir("hv4").join("other1.raw"))?;
    vmlab::write_vm_files(
        &b.vm_dir("hv4"),
        "other1",
        &format!("{IQN}/1"),
        size,
        None,
        None,
    )?;
    b.start_vm("hv1", "web1", &image, true, 11)?;
    let (qemu_img, modules) = nearblock_lab::qemu_img()?;
    for (hv, rack) in [
        ("hv1", "rack1"),
        ("hv2", "rack1"),
        ("hv3", "rack1"),
        ("hv4", "rack2"),
        ("hv5", "rack2"),
        ("hv6", "rack2"),
    ] {
        let extra = format!(
            "metrics_interval_ms = 200\n[hypervisor]\nvm_dir = {}\nmanagers = [\"core\"]\nqemu_img = {}\nqemu_module_dir = {}\n[resources]\ndisk_free_bytes = {}\n",
            toml_path(&b.vm_dir(hv)),
            toml_path(&qemu_img),
            toml_path(&modules),
            1u64 << 36
        );
        b.fabric.start_agent(&b.lab, hv, rack, &[], &extra)?;
    }
    b.wait_indexed("hv1", "web1")?;
    b.wait_indexed("hv4", "other1")?;
    println!(
        "bench migrate (2-core machine, 3 racks × 3 hypervisors, corpus b: {size} B virtual; guest writing {} MiB/s in {} KiB writes; setup {:.1} s)",
        RATE >> 20,
        WRITE >> 10,
        t_setup.elapsed().as_secs_f64()
    );

    let (plain_time, plain_bytes) = b.plain_copy("web1")?;
    println!(
        "  plain copy: web1 paused, hv1 → hv6 over NBD: {:.2} s, {plain_bytes} B from hv1",
        plain_time.as_secs_f64()
    );
    let web1 = b.migrate("web1", "hv1", "hv5")?;

    b.start_vm("hv2", "web2", &quarter, true, 22)?;
    b.start_vm("hv3", "web3", &image, false, 33)?;
    // The agents index new VMs at their next scan: now.
    b.fabric.procs.signal("agent-hv2", libc::SIGHUP)?;
    b.fabric.procs.signal("agent-hv3", libc::SIGHUP)?;
    b.wait_indexed("hv2", "web2")?;
    b.wait_indexed("hv3", "web3")?;
    let web2 = b.migrate("web2", "hv2", "hv6")?;
    let web3 = b.migrate("web3", "hv3", "hv6")?;

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "  {:<44} {:>14} {:>14} {:>8}",
        "figure", "nearblock", "plain copy", "ratio"
    );
    println!(
        "  {:<44} {:>14} {:>14} {:>8.3}",
        "bytes from the source host",
        web1.from_source,
        plain_bytes,
        ratio(web1.from_source as f64, plain_bytes as f64)
    );
    println!(
        "  {:<44} {:>13.2}s {:>13.2}s {:>8.3}",
        "total time (start → VM runs on the target)",
        web1.total.as_secs_f64(),
        plain_time.as_secs_f64(),
        ratio(web1.total.as_secs_f64(), plain_time.as_secs_f64())
    );
    println!(
        "  {:<44} {:>13.3}s {:>13.2}s {:>8.3}",
        "the VM stopped (pause → resume)",
        web1.pause_ms as f64 / 1e3,
        plain_time.as_secs_f64(),
        ratio(web1.pause_ms as f64 / 1e3, plain_time.as_secs_f64())
    );
    println!(
        "  pause to resume: web1 {} ms, web2 {} ms, web3 {} ms (goal < 1 s for web1)",
        web1.pause_ms, web2.pause_ms, web3.pause_ms
    );
    println!(
        "  pre-copy rounds (means per round: bytes of blocks that changed, bytes rehashed, ms):"
    );
    for (name, what, m) in [
        ("web1", "b's data, dirty bitmap", &web1),
        ("web2", "a quarter of it, dirty bitmap", &web2),
        ("web3", "b's data, rescan (no bitmap)", &web3),
    ] {
        let (changed, hashed, ms) = mean(&m.rounds);
        println!(
            "    {name} ({what}): {} rounds, {changed:.0} B changed, {hashed:.0} B rehashed ({:.2} per byte changed), {ms:.0} ms",
            m.rounds.len(),
            ratio(hashed, changed)
        );
    }
    let per_changed = |m: &Moved| {
        let (d, h, _) = mean(&m.rounds);
        ratio(h, d)
    };
    println!(
        "  bytes rehashed per byte changed: with bitmaps {:.2} (web1) and {:.2} (web2, a quarter of the allocated bytes); without {:.1} (web3)",
        per_changed(&web1),
        per_changed(&web2),
        per_changed(&web3)
    );
    drop(b);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn mean_of_rounds() {
        let r = |changed, hashed, ms| super::Round {
            changed,
            hashed,
            ms,
        };
        assert_eq!(super::mean(&[r(2, 4, 6), r(4, 8, 10)]), (3.0, 6.0, 8.0));
        assert_eq!(super::mean(&[]), (0.0, 0.0, 0.0));
    }
}
