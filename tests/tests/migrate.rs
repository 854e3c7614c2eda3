//! Migration (issue 13) on the 3 racks × 3 hypervisors lab, with corpus image
//! b (1 GiB, Debian cloud) as the library's LUN.
//!
//! hv1 runs VM `web1`: its disk a copy of b, served by qemu-storage-daemon
//! (dirty bitmaps on), written by a workload through the daemon's NBD export
//! at 4 MiB/s (the lab's "guest"). hv4 runs `other1`, another VM of seed b.
//! `nearblock vm place vm/web1` (candidates hv5, hv6: rack2) is a migration:
//!
//! 1. The target's disk equals the source's at the pause (compared byte for
//!    byte before the source's copy is retired); the bytes that left hv1 (the
//!    job's per-source bytes, and core's BPF flow counters) are at most the
//!    blocks only hv1 held at the start plus the blocks the workload wrote
//!    until the pause, plus 1% of the virtual size.
//! 2. At least 90% of the moved bytes came from rack2 (other1 on hv4), by the
//!    job's per-source bytes.
//! 3. The pause-to-resume time is reported, and each round's rehashed bytes
//!    are what the dirty bitmap named (4 KiB granularity), not the disk's
//!    allocated bytes.
//! 4. The source's copy is retired after the grace period, its workload
//!    killed; the VM runs on the target.
//! 5. A second VM (`web2` on hv2, no write tracking: the rescan default)
//!    whose source agent is killed mid-migration: the job fails cleanly, the
//!    VM is still running on hv2, and nothing of it is left on the target.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nearblock_lab::{fabric::Fabric, toml_path, vmlab, Lab, LunSpec, THREE_RACKS_TOPOLOGY};
use serde_json::Value;

const IQN: &str = "iqn.2026-12.test.nearblock:migrate";
const AGENT_PORT: u16 = 7340;
const INDEXER_PORT: u16 = 7341;
const BLOCK: usize = 4096;
/// The workload's write rate and write size.
const RATE: u64 = 4 << 20;
const WRITE: u64 = 64 << 10;

fn corpus_dir() -> PathBuf {
    std::env::var_os("NEARBLOCK_CORPUS_DIR")
        .map_or_else(|| "/var/cache/nearblock/corpus".into(), PathBuf::from)
}

fn vm(lab: &Lab, token: &std::path::Path, words: &[&str]) -> Value {
    nearblock_lab::vmlab::vm_json(lab, "core", token, words).unwrap()
}

/// Agents on `hosts` (hypervisor, rack, pinned CPU load) with the plain
/// hook in `vms-HV`, managed by core.
fn start_hv_agents(lab: &Lab, fabric: &mut Fabric, hosts: &[(&str, &str, f64)]) {
    for &(hv, rack, cpu) in hosts {
        let vm_dir = lab.dir.path().join(format!("vms-{hv}"));
        fabric
            .start_hypervisor(lab, hv, rack, &vm_dir, "core", (cpu, 0.3), 1 << 36)
            .unwrap();
    }
}

/// Waits until the global index lists the library's image and `vms`.
fn wait_indexed(lab: &Lab, read: &Path, vms: &[&str]) {
    within(
        Duration::from_mins(2),
        "the VMs and the library indexed",
        || {
            let inv = vm(lab, read, &["list", "--json"]);
            let indexed = |name: &str| {
                inv["vms"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v["name"] == name && v["indexed"] == true))
            };
            let library = inv["images"]
                .as_array()
                .is_some_and(|i| i.iter().any(|i| i["host"] == "library"));
            library && vms.iter().all(|v| indexed(v))
        },
    );
}

fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn block_hashes(data: &[u8]) -> std::collections::HashSet<[u8; 32]> {
    data.chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| *blake3::hash(b).as_bytes())
        .collect()
}

/// Follows job `id` until it ends; calls `at_run` once when it reaches
/// `indexing` (the VM runs on the target).
fn follow(
    lab: &Lab,
    read: &Path,
    id: &str,
    limit: Duration,
    mut at_run: impl FnMut(&Value),
) -> Value {
    let deadline = Instant::now() + limit;
    let mut ran = false;
    loop {
        let job = vm(lab, read, &["job", id, "--json"]);
        let state = job["state"].as_str().unwrap_or("").to_owned();
        if !ran && (state == "indexing" || state == "done") {
            ran = true;
            at_run(&job);
        }
        if matches!(state.as_str(), "done" | "failed" | "cancelled") {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} not done: {job:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[cfg_attr(
    not(nearblock_corpus),
    ignore = "needs the corpus: build and run with NEARBLOCK_CORPUS_DIR"
)]
#[expect(
    clippy::too_many_lines,
    reason = "one lab, its scenarios in order: the migration, then the failed one"
)]
fn a_running_vm_migrates_and_only_what_nobody_nearer_holds_leaves_its_host() {
    let image_path = corpus_dir().join("images/b-bookworm-cloud.raw");
    let image = std::fs::read(&image_path).unwrap();
    let size = image.len() as u64;
    let seed_blocks = block_hashes(&image);

    let lab = Lab::new(THREE_RACKS_TOPOLOGY).expect("lab");
    let topo = lab
        .write_file("topology.toml", THREE_RACKS_TOPOLOGY.as_bytes())
        .unwrap();
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    let mut lab = lab;
    let mut children = vmlab::Children::default();
    lab.add_lun(LunSpec::read_only(IQN, image_path.clone()))
        .unwrap();
    lab.set_datapath_extra("core", &format!("image_transfer_ports = [{AGENT_PORT}]"));
    fabric
        .start_manager(
            &mut lab,
            "core",
            &topo,
            "stale_secs = 5\nindex_wait_secs = 60\nmigrate_final_mib = 4\nretire_grace_secs = 10",
        )
        .expect("core");
    for rack in ["rack1", "rack2"] {
        fabric.start_indexer(&lab, rack, Some("core")).unwrap();
    }
    fabric.start_library_agent(&lab, "core").unwrap();

    // hv1: web1, its disk served by qemu-storage-daemon and written by the
    // workload; hv2: web2 (no tracking); hv4: other1, of the same seed.
    let dir = |hv: &str| lab.dir.path().join(format!("vms-{hv}"));
    for hv in ["hv1", "hv2", "hv4", "hv5", "hv6"] {
        std::fs::create_dir_all(dir(hv)).unwrap();
    }
    let lun = format!("{IQN}/1");
    for (hv, name) in [("hv1", "web1"), ("hv2", "web2"), ("hv4", "other1")] {
        vmlab::sparse_copy(&image_path, &dir(hv).join(format!("{name}.raw"))).unwrap();
        vmlab::write_vm_files(&dir(hv), name, &lun, size, None, None).unwrap();
    }
    let web1 = dir("hv1").join("web1.raw");
    let served = vmlab::serve_disk(lab.dir.path(), "web1", &web1, &mut children).unwrap();
    start_hv_agents(
        &lab,
        &mut fabric,
        &[
            ("hv1", "rack1", 0.3),
            ("hv2", "rack1", 0.3),
            ("hv4", "rack2", 0.3),
            ("hv5", "rack2", 0.3),
            ("hv6", "rack2", 0.3),
        ],
    );
    let read = lab.api_read_token_file();
    let admin = lab.api_admin_token_file();
    wait_indexed(&lab, &read, &["web1", "web2", "other1"]);

    // The "guest" starts writing; its process group is the VM's process.
    let stats = lab.dir.path().join("web1.workload.json");
    let workload = vmlab::Workload {
        rate: RATE,
        write: WRITE,
        seed: 7,
    };
    let pid = workload
        .start(
            Path::new(env!("CARGO_BIN_EXE_vm-workload")),
            &served,
            size,
            &stats,
            &mut children,
        )
        .unwrap();
    vmlab::write_vm_files(&dir("hv1"), "web1", &lun, size, Some(pid), Some(&served)).unwrap();

    // 1–4. The migration.
    let written_before = vmlab::workload_bytes(&stats);
    let job = vm(
        &lab,
        &admin,
        &[
            "place", "vm/web1", "--name", "web1", "--within", "hv5,hv6", "--json",
        ],
    );
    assert_eq!(job["kind"], "migrate", "{job:#}");
    let id = job["id"].as_u64().unwrap().to_string();
    let mut compared = None;
    let mut written_at_pause = 0;
    let job = follow(&lab, &read, &id, Duration::from_mins(5), |job| {
        // The VM runs on the target; the source's copy is kept for the grace
        // period: both disks now, byte for byte.
        written_at_pause = vmlab::workload_bytes(&stats);
        let target = job["plan"]["target"].as_str().unwrap().to_owned();
        let source = std::fs::read(&web1).unwrap();
        let moved = std::fs::read(dir(&target).join("web1.raw")).unwrap();
        compared = Some((target, source == moved, source));
    });
    assert_eq!(job["state"], "done", "{job:#}");
    let (target, equal, source_at_pause) = compared.expect("the job reached `indexing`");
    assert!(equal, "{target}'s disk is not hv1's at the pause");
    let migration = &job["migration"];
    eprintln!("migration: {migration:#}");
    assert_eq!(migration["tracking"], "dirty_bitmap");
    assert_eq!(migration["verified"], true);
    assert_eq!(migration["source_retired"], true);
    let pause_ms = migration["pause_to_resume_ms"].as_u64().expect("reported");
    let rounds = migration["rounds"].as_array().unwrap();
    assert!(
        rounds.len() >= 2,
        "round 0 and the paused round: {rounds:#?}"
    );
    assert!(rounds.last().unwrap()["paused"] == true);
    // Each tracked round rehashed what the bitmap named, never the disk.
    for r in &rounds[1..] {
        let (dirty, hashed) = (
            r["bytes_dirty"].as_u64().unwrap(),
            r["bytes_hashed"].as_u64().unwrap(),
        );
        assert_eq!(hashed, dirty, "round {r}: rehashed what was written");
        assert!(hashed < size / 4, "round {r}: not the whole disk");
    }
    // 1. Bytes that left hv1: the blocks only hv1 held at the start (web1
    // began as the seed's copy: at most what the workload wrote before) plus
    // what it wrote until the pause (and the write in flight then), plus 1%
    // of the virtual size.
    let from_hv1: u64 = rounds
        .iter()
        .map(|r| r["bytes_by_source"]["hv1"].as_u64().unwrap_or(0))
        .sum();
    let only_hv1_at_start = written_before;
    let dirtied = written_at_pause - written_before + WRITE;
    let bound = only_hv1_at_start + dirtied + size / 100;
    eprintln!(
        "from hv1: {from_hv1} B (bound {bound}: {only_hv1_at_start} B written before, {dirtied} B during the migration); pause to resume {pause_ms} ms"
    );
    assert!(from_hv1 <= bound, "{from_hv1} B left hv1, bound {bound}");
    let hv1 = format!("{}:{AGENT_PORT}", lab.addr4("hv1"));
    let bpf_from_hv1: u64 = lab
        .status("core")
        .unwrap()
        .flows
        .iter()
        .filter(|f| f.src == hv1)
        .map(|f| f.payload_bytes - f.retrans_bytes)
        .sum();
    eprintln!("core's BPF counters: {bpf_from_hv1} B of payload from hv1's block service");
    assert!(
        bpf_from_hv1 <= bound + bound / 50,
        "BPF: {bpf_from_hv1} B from hv1, bound {bound}"
    );
    // 2. In-rack holders gave at least 90% of what moved.
    let mut total = 0u64;
    let mut in_rack = 0u64;
    for r in rounds {
        for (node, bytes) in r["bytes_by_source"].as_object().unwrap() {
            let b = bytes.as_u64().unwrap();
            total += b;
            if ["hv4", "hv5", "hv6", "rack2"].contains(&node.as_str()) {
                in_rack += b;
            }
        }
    }
    let nonzero = source_at_pause
        .chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
        * BLOCK as u64;
    eprintln!("moved {total} B ({in_rack} B from rack2) for a disk of {nonzero} non-zero bytes");
    assert!(
        in_rack * 10 >= total * 9,
        "{in_rack} of {total} B from rack2"
    );
    // Unique blocks at the pause: what hv1 alone could give.
    let unique = block_hashes(&source_at_pause)
        .difference(&seed_blocks)
        .count();
    eprintln!("blocks only web1 held at the pause: {unique}");
    // 4. The source's copy is gone, its workload killed; the VM runs on the
    // target.
    assert!(!web1.exists(), "hv1's copy retired");
    within(
        Duration::from_secs(5),
        "the inventory shows web1 on the target only",
        || {
            let inv = vm(&lab, &read, &["list", "--json"]);
            let on: Vec<(String, String)> = inv["vms"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["name"] == "web1")
                .map(|v| {
                    (
                        v["host"].as_str().unwrap_or("").to_owned(),
                        v["state"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            on == [(target.clone(), "running".to_owned())]
        },
    );

    // 5. web2's source agent dies mid-migration: the job fails cleanly, web2
    // still runs on hv2, and the target has nothing of it.
    let job = vm(
        &lab,
        &admin,
        &[
            "place", "vm/web2", "--name", "web2", "--within", "hv5,hv6", "--json",
        ],
    );
    let id2 = job["id"].as_u64().unwrap().to_string();
    within(Duration::from_mins(1), "web2's round 0 under way", || {
        let j = vm(&lab, &read, &["job", &id2, "--json"]);
        j["state"] == "building" && j["progress"]["blocks_done"].as_u64().unwrap_or(0) > 0
    });
    fabric.procs.kill("agent-hv2").unwrap();
    let job = follow(&lab, &read, &id2, Duration::from_mins(3), |_| {});
    assert_eq!(job["state"], "failed", "{job:#}");
    let events: Vec<&str> = job["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        events.iter().any(|e| e.contains("migration undone")),
        "{events:#?}"
    );
    let st: Value =
        serde_json::from_slice(&std::fs::read(dir("hv2").join("web2.vm.json")).unwrap()).unwrap();
    assert_eq!(st["state"], "running", "web2 keeps running on hv2");
    for hv in ["hv5", "hv6"] {
        let left: Vec<_> = std::fs::read_dir(dir(hv))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("web2"))
            .collect();
        assert!(left.is_empty(), "{hv} kept {left:?}");
    }
}

/// Item 4: `web1` (hv1) holds 128 MiB no one else has; marked likely to move,
/// its top-2 targets' rack appliances (rack1, rack2: steering appliances with
/// caches) get those blocks, pinned (status: pinned bytes); a migration to
/// hv5 (rack2) then moves from hv1 at most what the guest wrote since the
/// last pre-stage, plus 1% of the virtual size.
#[test]
#[cfg_attr(
    not(nearblock_corpus),
    ignore = "needs the corpus: build and run with NEARBLOCK_CORPUS_DIR"
)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: the lab, the marking, the migration"
)]
fn a_vm_likely_to_move_has_its_unique_blocks_pinned_at_its_targets_racks() {
    use std::fmt::Write as _;
    const UNIQUE: usize = 128 << 20;
    let image_path = corpus_dir().join("images/b-bookworm-cloud.raw");
    let size = std::fs::metadata(&image_path).unwrap().len();

    let lab = Lab::new(THREE_RACKS_TOPOLOGY).expect("lab");
    let topo = lab
        .write_file("topology.toml", THREE_RACKS_TOPOLOGY.as_bytes())
        .unwrap();
    let mut fabric = Fabric::new(&lab, AGENT_PORT + 10, INDEXER_PORT + 10).unwrap();
    let mut lab = lab;
    let mut children = vmlab::Children::default();
    lab.add_lun(LunSpec::read_only(IQN, image_path.clone()))
        .unwrap();
    lab.set_datapath_extra(
        "core",
        &format!("image_transfer_ports = [{}]", AGENT_PORT + 10),
    );
    fabric
        .start_manager(
            &mut lab,
            "core",
            &topo,
            "stale_secs = 5\nindex_wait_secs = 60\nmigrate_final_mib = 4\nretire_grace_secs = 2\nprestage_refresh_secs = 1\nprestage_when_load_above = 0.9\nprestage_after_secs = 1",
        )
        .expect("core");
    // rack1, rack2: appliances with caches the manager may stage in.
    for rack in ["rack1", "rack2"] {
        let ix = fabric.indexer_config(&lab, rack, Some("core")).unwrap();
        let mut text = std::fs::read_to_string(&ix).unwrap();
        writeln!(
            text,
            "advertise = \"{}\"",
            Fabric::addr(&lab, rack, INDEXER_PORT + 10)
        )
        .unwrap();
        std::fs::write(&ix, text).unwrap();
        let config = format!(
            "[splicer]\nmanagers = [\"core\"]\ncache_bytes = {}\npin_share = 0.5\n[cost]\ntopology = {}\n[indexer]\nconfig = {}\n",
            1u64 << 30,
            toml_path(&topo),
            toml_path(&ix),
        );
        lab.start_appliance(
            rack,
            nearblock_lab::ApplianceOptions {
                steer: true,
                extra_config: config,
            },
        )
        .expect(rack);
    }
    fabric.start_indexer(&lab, "rack3", Some("core")).unwrap();
    fabric.start_library_agent(&lab, "core").unwrap();

    let dir = |hv: &str| lab.dir.path().join(format!("vms-{hv}"));
    for hv in ["hv1", "hv2", "hv4", "hv5"] {
        std::fs::create_dir_all(dir(hv)).unwrap();
    }
    let lun = format!("{IQN}/1");
    let web1 = dir("hv1").join("web1.raw");
    vmlab::sparse_copy(&image_path, &web1).unwrap();
    vmlab::sparse_copy(&image_path, &dir("hv4").join("other1.raw")).unwrap();
    vmlab::write_vm_files(&dir("hv4"), "other1", &lun, size, None, None).unwrap();
    // hv2 stays loaded (its CPU pinned at 95%): its VM is marked on its own.
    vmlab::sparse_copy(&image_path, &dir("hv2").join("busy1.raw")).unwrap();
    vmlab::write_vm_files(&dir("hv2"), "busy1", &lun, size, None, None).unwrap();
    // What web1 alone holds: 128 MiB of its own data.
    vmlab::write_random(&web1, 600 << 20, UNIQUE, 99).unwrap();
    let served = vmlab::serve_disk(lab.dir.path(), "web1", &web1, &mut children).unwrap();
    let stats = lab.dir.path().join("web1.workload.json");
    let pid = vmlab::Workload {
        rate: RATE,
        write: WRITE,
        seed: 5,
    }
    .start(
        Path::new(env!("CARGO_BIN_EXE_vm-workload")),
        &served,
        size,
        &stats,
        &mut children,
    )
    .unwrap();
    vmlab::write_vm_files(&dir("hv1"), "web1", &lun, size, Some(pid), Some(&served)).unwrap();
    start_hv_agents(
        &lab,
        &mut fabric,
        &[
            ("hv1", "rack1", 0.3),
            ("hv2", "rack1", 0.95),
            ("hv4", "rack2", 0.3),
            ("hv5", "rack2", 0.3),
        ],
    );
    let read = lab.api_read_token_file();
    let admin = lab.api_admin_token_file();
    // busy1's host stays at 95% CPU (at least 90% for 1 s): marked on its own.
    within(
        Duration::from_secs(30),
        "busy1 marked likely to move by its host's load",
        || {
            vm(&lab, &read, &["jobs", "--json"])
                .as_array()
                .is_some_and(|a| {
                    a.iter().any(|j| {
                        j["kind"] == "prestage"
                            && j["spec"]["name"] == "busy1"
                            && j["events"].as_array().is_some_and(|e| {
                                e.iter().any(|e| {
                                    e["message"]
                                        .as_str()
                                        .is_some_and(|m| m.contains("marked likely to move"))
                                })
                            })
                    })
                })
        },
    );
    wait_indexed(&lab, &read, &["web1", "other1"]);

    // Marked likely to move: a pre-staging job.
    let bin = nearblock_lab::nearblock_bin().unwrap();
    let token = admin.display().to_string();
    let o = lab
        .exec(
            "core",
            &[
                bin.to_str().unwrap(),
                "vm",
                "--token-file",
                &token,
                "set",
                "hv1",
                "web1",
                "prestage",
            ],
        )
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let prestage_id = said
        .rsplit("(job ")
        .next()
        .and_then(|t| t.trim().trim_end_matches(')').parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no job id in {said:?}"))
        .to_string();
    let mut staged = Value::Null;
    within(
        Duration::from_mins(2),
        "web1's unique blocks staged at two racks, twice",
        || {
            staged = vm(&lab, &read, &["job", &prestage_id, "--json"]);
            staged["prestage"]["rounds"].as_u64().unwrap_or(0) >= 2
                && staged["prestage"]["staged_at"]
                    .as_object()
                    .is_some_and(|m| m.len() == 2)
        },
    );
    eprintln!("pre-staged: {:#}", staged["prestage"]);
    let racks: Vec<String> = staged["prestage"]["staged_at"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for rack in &racks {
        let cache = lab.status(rack).unwrap().splicer.cache.unwrap();
        eprintln!("{rack}'s cache: {cache:?}");
        assert!(
            cache.pinned_bytes >= UNIQUE as u64,
            "{rack} pins {} B of web1's {UNIQUE} unique bytes",
            cache.pinned_bytes
        );
        assert!(cache.pinned_bytes <= cache.pin_limit_bytes);
    }
    assert!(racks.contains(&"rack2".to_owned()), "{racks:?}");

    // The migration to rack2: hv1 gives what was written since the last
    // pre-stage (a round each second, each under a second), not its 128 MiB.
    let written_before = vmlab::workload_bytes(&stats);
    let job = vm(
        &lab,
        &admin,
        &[
            "place", "vm/web1", "--name", "web1", "--within", "hv5", "--json",
        ],
    );
    let id = job["id"].as_u64().unwrap().to_string();
    let mut written_at_pause = 0;
    let job = follow(&lab, &read, &id, Duration::from_mins(5), |_| {
        written_at_pause = vmlab::workload_bytes(&stats);
    });
    assert_eq!(job["state"], "done", "{job:#}");
    let from_hv1: u64 = job["migration"]["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["bytes_by_source"]["hv1"].as_u64().unwrap_or(0))
        .sum();
    let since_last_prestage = written_at_pause - written_before + 3 * RATE;
    let bound = since_last_prestage + size / 100;
    eprintln!(
        "after pre-staging: {from_hv1} B left hv1 (bound {bound}; web1's unique data {UNIQUE} B); rounds {:#}",
        job["migration"]["rounds"]
    );
    assert!(from_hv1 <= bound, "{from_hv1} B from hv1, bound {bound}");
    assert!(from_hv1 < UNIQUE as u64 / 2);
    let ended = vm(&lab, &read, &["job", &prestage_id, "--json"]);
    assert!(
        ended["state"] == "cancelled" || ended["state"] == "failed",
        "the migration ends the pre-staging: {ended:#}"
    );
}

/// "Both hosts' link budgets hold during migration": hv1–rack1 (the
/// source's link) and hv5–rack2 (the target's) get budgets for nearblock's
/// traffic. web1 (hv1, a generated 256 MiB image plus 48 MiB of its own data,
/// its guest writing 1 MiB/s) migrates to hv5; hv4 (rack2) runs another VM of
/// the same seed. rack1's and rack2's monitor-only appliances count every
/// flow of the block service; in every 1-second window after the first,
/// nearblock's rate out of hv1 and into hv5 stays within 5% of its link's
/// budget, and each link carried enough that the check is not vacuous.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: the lab, the migration, the two links"
)]
fn a_migration_keeps_within_both_hosts_link_budgets() {
    const SIZE: usize = 256 << 20;
    const UNIQUE: usize = 48 << 20;
    const SOURCE_BUDGET_MBPS: f64 = 40.0;
    const TARGET_BUDGET_MBPS: f64 = 160.0;
    let port = AGENT_PORT + 20;

    let mut topology = THREE_RACKS_TOPOLOGY.to_owned();
    for (host, rack, budget) in [
        ("hv1", "rack1", SOURCE_BUDGET_MBPS),
        ("hv5", "rack2", TARGET_BUDGET_MBPS),
    ] {
        let link = format!("a = \"{rack}\"\nb = \"{host}\"\ncapacity_mbps = 10000\n");
        assert!(topology.contains(&link));
        topology = topology.replace(&link, &format!("{link}budget_mbps = {budget:?}\n"));
    }
    let lab = Lab::new(&topology).expect("lab");
    let topo = lab
        .write_file("topology.toml", topology.as_bytes())
        .unwrap();
    let mut fabric = Fabric::new(&lab, port, INDEXER_PORT + 20).unwrap();
    let mut lab = lab;
    let mut children = vmlab::Children::default();
    let image = nearblock_lab::content::image(SIZE, 1313, 20);
    let image_path = lab.write_file("seed.raw", &image).unwrap();
    drop(image);
    lab.add_lun(LunSpec::read_only(IQN, image_path.clone()))
        .unwrap();
    for node in ["core", "rack1", "rack2"] {
        lab.set_datapath_extra(node, &format!("image_transfer_ports = [{port}]"));
    }
    fabric
        .start_manager(
            &mut lab,
            "core",
            &topo,
            "stale_secs = 5\nindex_wait_secs = 60\nmigrate_final_mib = 4\nretire_grace_secs = 2",
        )
        .expect("core");
    for rack in ["rack1", "rack2"] {
        fabric.start_indexer(&lab, rack, Some("core")).unwrap();
        // Monitor-only: they count the hosts' flows, steer nothing.
        lab.start_appliance(
            rack,
            nearblock_lab::ApplianceOptions {
                steer: false,
                extra_config: String::new(),
            },
        )
        .expect(rack);
    }
    fabric.start_library_agent(&lab, "core").unwrap();

    let dir = |hv: &str| lab.dir.path().join(format!("vms-{hv}"));
    for hv in ["hv1", "hv4", "hv5"] {
        std::fs::create_dir_all(dir(hv)).unwrap();
    }
    let lun = format!("{IQN}/1");
    let web1 = dir("hv1").join("web1.raw");
    vmlab::sparse_copy(&image_path, &web1).unwrap();
    vmlab::sparse_copy(&image_path, &dir("hv4").join("other1.raw")).unwrap();
    vmlab::write_vm_files(&dir("hv4"), "other1", &lun, SIZE as u64, None, None).unwrap();
    vmlab::write_random(&web1, 128 << 20, UNIQUE, 77).unwrap();
    let served = vmlab::serve_disk(lab.dir.path(), "web1", &web1, &mut children).unwrap();
    let stats = lab.dir.path().join("web1.workload.json");
    let pid = vmlab::Workload {
        rate: 1 << 20,
        write: WRITE,
        seed: 9,
    }
    .start(
        Path::new(env!("CARGO_BIN_EXE_vm-workload")),
        &served,
        SIZE as u64,
        &stats,
        &mut children,
    )
    .unwrap();
    vmlab::write_vm_files(
        &dir("hv1"),
        "web1",
        &lun,
        SIZE as u64,
        Some(pid),
        Some(&served),
    )
    .unwrap();
    start_hv_agents(
        &lab,
        &mut fabric,
        &[
            ("hv1", "rack1", 0.3),
            ("hv4", "rack2", 0.3),
            ("hv5", "rack2", 0.3),
        ],
    );
    let read = lab.api_read_token_file();
    let admin = lab.api_admin_token_file();
    wait_indexed(&lab, &read, &["web1", "other1"]);

    // nearblock's bytes out of hv1 (rack1 sees all of them) and into hv5
    // (rack2 sees all of them), from the BPF flow counters.
    let hv1 = format!("{}:{port}", lab.addr4("hv1"));
    let hv5 = format!("{}:", lab.addr4("hv5"));
    let counted = |node: &str, pick: &dyn Fn(&str, &str) -> bool| -> u64 {
        lab.status(node)
            .unwrap()
            .flows
            .iter()
            .filter(|f| pick(&f.src, &f.dst))
            .map(|f| f.payload_bytes - f.retrans_bytes)
            .sum()
    };
    let out_of_hv1 = || counted("rack1", &|src, _| src == hv1);
    let into_hv5 = || {
        counted("rack2", &|src, dst| {
            dst.starts_with(hv5.as_str()) && src.ends_with(&format!(":{port}"))
        })
    };
    let base = (out_of_hv1(), into_hv5());
    let job = vm(
        &lab,
        &admin,
        &[
            "place", "vm/web1", "--name", "web1", "--within", "hv5", "--json",
        ],
    );
    assert_eq!(job["kind"], "migrate", "{job:#}");
    let id = job["id"].as_u64().unwrap().to_string();
    let started = Instant::now();
    let (mut source, mut target) = (Vec::new(), Vec::new());
    let job = loop {
        source.push(vmlab::stamped(started, || out_of_hv1() - base.0));
        target.push(vmlab::stamped(started, || into_hv5() - base.1));
        let job = vm(&lab, &read, &["job", &id, "--json"]);
        if matches!(job["state"].as_str(), Some("done" | "failed" | "cancelled")) {
            break job;
        }
        assert!(
            started.elapsed() < Duration::from_mins(4),
            "job {id} not done: {job:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(job["state"], "done", "{job:#}");
    let migration = &job["migration"];
    let (peak_source, peak_target) = (
        vmlab::peak_mbps(&source, 1.0),
        vmlab::peak_mbps(&target, 1.0),
    );
    let (sent, received) = (source.last().unwrap().1, target.last().unwrap().1);
    eprintln!(
        "budgets: hv1–rack1 {sent} B, peak {peak_source:.1} Mbit/s (budget {SOURCE_BUDGET_MBPS}); hv5–rack2 {received} B, peak {peak_target:.1} Mbit/s (budget {TARGET_BUDGET_MBPS}); {:.1} s; pause to resume {} ms; rounds {:#}",
        source.last().unwrap().0,
        migration["pause_to_resume_ms"],
        migration["rounds"]
    );
    assert!(
        sent >= UNIQUE as u64 && received >= (SIZE / 2) as u64,
        "both links carried the migration: {sent} B out of hv1, {received} B into hv5"
    );
    assert!(
        peak_source <= SOURCE_BUDGET_MBPS * 1.05,
        "out of hv1: {peak_source:.1} Mbit/s, budget {SOURCE_BUDGET_MBPS}"
    );
    assert!(
        peak_target <= TARGET_BUDGET_MBPS * 1.05,
        "into hv5: {peak_target:.1} Mbit/s, budget {TARGET_BUDGET_MBPS}"
    );
    // The job's own account agrees: every round names its bytes by link.
    for r in migration["rounds"].as_array().unwrap() {
        assert!(r["bytes_by_link"].is_object(), "{r}");
    }
}
