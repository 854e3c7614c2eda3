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
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use nearblock_lab::datacenter::{Datacenter, LinkSamples};

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
const HOSTS: usize = nearblock_lab::datacenter::HOSTS;
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

/// An uplink's link name (`a-b`, as the topology lists it).
fn uplink(peer: &str) -> String {
    if peer == "library" {
        "library-core".to_owned()
    } else {
        format!("core-{peer}")
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
    let b = Datacenter::start(
        IQN,
        &images,
        (AGENT_PORT, INDEXER_PORT),
        "index_wait_secs = 600",
        |_| (0.3, 0.3),
    )?;
    let free = nearblock_lab::vmlab::free_bytes(b.lab.dir.path())?;
    if free < NEED_FREE {
        bail!(
            "{} GiB free in {}, the bench needs {} GiB",
            free >> 30,
            b.lab.dir.path().display(),
            NEED_FREE >> 30
        );
    }
    eprintln!(
        "bench fanout: lab ready in {:.0} s",
        t_setup.elapsed().as_secs_f64()
    );

    // 1. Direct: 16 concurrent qemu-img copies from the library.
    let direct_dir = b.lab.dir.path().join("direct");
    std::fs::create_dir_all(&direct_dir)?;
    let mut samples = LinkSamples::default();
    let start = Instant::now();
    samples.take(&b.lab, start)?;
    let copies: Vec<(String, usize, String)> = (0..VMS).map(vm).collect();
    b.copy_luns(&copies, &direct_dir, &mut samples, start)?;
    let direct_secs = start.elapsed().as_secs_f64();
    let direct = samples.summary();
    std::fs::remove_dir_all(&direct_dir)?;
    eprintln!("bench fanout: direct done in {direct_secs:.1} s");

    // 2. One nearblock build alone (image b on hv1), then retired again so
    // the 16 start from the library alone.
    let start = Instant::now();
    let id = b.place(&b.image(1), "alone", &["--within", "hv1"])?;
    b.wait_jobs(&[id], |_| Ok(()))?;
    let alone_secs = start.elapsed().as_secs_f64();
    b.vm_cli(&["set", "hv1", "alone", "retire"])?;
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        let inv = b.vm_json(&["list"])?;
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
    let mut samples = LinkSamples::default();
    let start = Instant::now();
    samples.take(&b.lab, start)?;
    let mut ids = Vec::new();
    for i in 0..VMS {
        let (name, lun, host) = vm(i);
        ids.push(b.place(&b.image(lun), &name, &["--within", &host])?);
    }
    let jobs = b.wait_jobs(&ids, |_| samples.take(&b.lab, start))?;
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

    let lib_direct = direct[&uplink("library")].0;
    let lib_near = near[&uplink("library")].0.max(1);
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
        let link = uplink(peer);
        println!(
            "| {link} peak (1 s windows) | {:.0} Mbit/s ({:.0}%) | {:.0} Mbit/s ({:.0}%) | | |",
            direct[&link].1,
            100.0 * direct[&link].1 / cap,
            near[&link].1,
            100.0 * near[&link].1 / cap
        );
    }
    println!(
        "| 16 builds / one alone | | {nearblock_secs:.1} s / {alone_secs:.1} s | **{:.2}** | ≤ 1.5 |",
        nearblock_secs / alone_secs
    );
    println!("nearblock's block bytes by source class: {by_class:?}");
    Ok(())
}
