//! Place and build (issue 12) on the 3 racks × 3 hypervisors lab: core's
//! appliance runs the global indexer and the manager; rack1's appliance steers
//! and splices iSCSI with its rack's indexer embedded; rack2, rack3 run indexers;
//! the library's agent exports tgtd's LUN; hv1..hv9 run agents with the plain
//! hypervisor hook. Run as root. One lab for every scenario, in order:
//!
//! 1. `nearblock vm list` shows the library's image, the hosts (racks, free
//!    disk) and hv4's stored VM with the share of its blocks held elsewhere; an
//!    agent started later (hv9) shows its VM within 5 s.
//! 2. Three jobs, each policy choosing a different host by the agents'
//!    pinned metrics (top:3:cpu → hv6, within:400%:mem → hv5, best → hv4),
//!    each built bit-identical to the library's image, the job's events naming
//!    the ranking, and the global index listing the new disk within 5 s (the
//!    job's own measure, and the holders of a block through core).
//!    Mode transparent: rack1's appliance stages the plan's blocks in its
//!    cache, then the target's agent imports the disk with qemu-img from the
//!    library's LUN; rack1 answers every READ from the staged blocks (none
//!    passes to the library) and the disk is bit-identical and indexed.
//! 3. A source serving corrupt blocks (hv4's old VM changed behind its index):
//!    the job re-plans without it and completes bit-identical; its events say
//!    which source failed and why.
//! 4. Lifecycle: start, pause and retire through the hook, seen in the
//!    inventory.
//! 5. A source killed mid-build (its link slowed so the build takes seconds):
//!    the job re-plans without it and completes bit-identical; the job's
//!    server-sent events end with its final state.
//!    The manager restarted mid-build fails the job with a reason and cancels
//!    the agent's build (no VM, no partial disk).
//! 6. Bad requests get clear errors: an unknown image, a bad name or policy, a
//!    read token placing, mode `transparent` of an image that is no LUN, a
//!    host without room never a candidate.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nearblock_lab::{
    content, fabric::Fabric, toml_path, ApplianceOptions, Lab, LunSpec, THREE_RACKS_TOPOLOGY,
};
use serde_json::Value;

const IQN: &str = "iqn.2026-12.test.nearblock:place";
/// A second target: its LUN rack1 prefetches at login (2c).
const IQN_PREFETCH: &str = "iqn.2026-12.test.nearblock:prefetch";
/// core–rack1's budget in this test, Mbit/s.
const RACK1_BUDGET_MBPS: f64 = 100.0;
const AGENT_PORT: u16 = 7300;
const INDEXER_PORT: u16 = 7301;
const MIB: usize = 1 << 20;
/// The library image: 8 MiB, a fifth of its blocks zero.
const IMAGE_BYTES: usize = 8 * MIB;
/// LUN 2, built twice at once over core–rack3's 200 Mbit/s budget.
const BIG_BYTES: usize = 64 * MIB;

struct Ctx {
    lab: Lab,
    fabric: Fabric,
    image: Vec<u8>,
}

impl Ctx {
    fn image_name() -> String {
        format!("{IQN}/1")
    }

    fn vm_dir(&self, hv: &str) -> PathBuf {
        self.lab.dir.path().join(format!("vms-{hv}"))
    }

    /// `nearblock vm ARGS…` in core with `token` (a token file): (success,
    /// stdout, stderr).
    fn vm(&self, token: &Path, words: &[&str]) -> (bool, String, String) {
        let bin = nearblock_lab::nearblock_bin().unwrap();
        let token = token.display().to_string();
        let mut command = vec![bin.to_str().unwrap(), "vm", "--token-file", &token];
        command.extend_from_slice(words);
        let o = self
            .lab
            .exec("core", &command)
            .expect("running nearblock vm");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    fn inventory(&self) -> Value {
        let (ok, out, err) = self.vm(&self.lab.api_read_token_file(), &["list", "--json"]);
        assert!(ok, "vm list: {err}");
        serde_json::from_str(&out).expect("inventory JSON")
    }

    /// Starts hypervisor `hv`'s agent under its rack's indexer, with pinned
    /// load and free disk.
    fn start_hv(&mut self, hv: &str, cpu: f64, mem: f64, disk_free: u64) {
        let n: u32 = hv[2..].parse().unwrap();
        let rack = format!("rack{}", (n - 1) / 3 + 1);
        let vm_dir = self.vm_dir(hv);
        self.fabric
            .start_hypervisor(&self.lab, hv, &rack, &vm_dir, "core", (cpu, mem), disk_free)
            .unwrap();
    }

    /// Places the image as `name`, following the job to its end: the job.
    fn place(&self, name: &str, policy: &str, within: &str) -> Value {
        self.place_in_mode(name, policy, within, "agent")
    }

    /// [`Self::place`] in build mode `mode`.
    fn place_in_mode(&self, name: &str, policy: &str, within: &str, mode: &str) -> Value {
        let image = Self::image_name();
        let mut args = vec![
            "place", &image, "--name", name, "--policy", policy, "--mode", mode, "--watch",
            "--json",
        ];
        if !within.is_empty() {
            args.extend(["--within", within]);
        }
        let (ok, out, err) = self.vm(&self.lab.api_admin_token_file(), &args);
        let job: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
        assert!(ok, "placing {name} ({policy}) failed: {err}\n{job:#}");
        job
    }

    /// The VM's disk is the library image, byte for byte.
    fn assert_identical(&self, hv: &str, name: &str) {
        let disk = std::fs::read(self.vm_dir(hv).join(format!("{name}.raw"))).unwrap();
        assert_eq!(disk.len(), self.image.len(), "{hv}/{name}: size");
        assert!(disk == self.image, "{hv}/{name}: not the library's image");
    }

    /// Creates a job placing `image` as `name` on `host` (the only candidate),
    /// without following it: the job's id.
    fn start_job(&self, image: &str, name: &str, host: &str) -> String {
        let (ok, out, err) = self.vm(
            &self.lab.api_admin_token_file(),
            &["place", image, "--name", name, "--within", host, "--json"],
        );
        assert!(ok, "placing {name} on {host}: {err}");
        serde_json::from_str::<Value>(&out).unwrap()["id"]
            .as_u64()
            .unwrap()
            .to_string()
    }

    /// Job `id` as `vm job --json` prints it.
    fn job(&self, id: &str) -> Value {
        let (ok, out, err) = self.vm(&self.lab.api_read_token_file(), &["job", id, "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    fn events(job: &Value) -> String {
        job["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Shapes `node`'s port toward `peer` to `rate` (tc tbf), or removes the
/// shaping (`None`).
fn shape(lab: &Lab, node: &str, peer: &str, rate: Option<&str>) {
    let port = lab.port_toward(node, peer).unwrap().iface.clone();
    let mut argv = vec!["tc", "qdisc"];
    match rate {
        Some(rate) => argv.extend([
            "add", "dev", &port, "root", "tbf", "rate", rate, "burst", "32kb", "latency", "500ms",
        ]),
        None => argv.extend(["del", "dev", &port, "root"]),
    }
    lab.exec_ok(node, &argv).unwrap();
}

/// Waits (bounded) until `f` holds; the time it took.
fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// Writes a stored VM `name` into `dir` (the plain hook's layout).
fn write_vm(dir: &Path, name: &str, image: &str, disk: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{name}.raw")), disk).unwrap();
    std::fs::write(
        dir.join(format!("{name}.vm.json")),
        serde_json::json!({"image": image, "size": disk.len(), "state": "running"}).to_string(),
    )
    .unwrap();
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one lab, its scenarios in order: each builds on the state the one before left"
)]
fn placed_vms_are_built_from_the_cheapest_sources_and_indexed() {
    let lab = Lab::new(THREE_RACKS_TOPOLOGY).expect("lab");
    // core–rack1 gets a budget too: rack1's prefetching shares it with the
    // builds crossing it (2c).
    let uplink = "a = \"core\"\nb = \"rack1\"\ncapacity_mbps = 10000\n";
    assert!(THREE_RACKS_TOPOLOGY.contains(uplink));
    let topology = THREE_RACKS_TOPOLOGY.replace(
        uplink,
        &format!("{uplink}budget_mbps = {RACK1_BUDGET_MBPS:?}\n"),
    );
    let topo = lab
        .write_file("topology.toml", topology.as_bytes())
        .unwrap();
    let fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    let image = content::image(IMAGE_BYTES, 1212, 20);
    let mut ctx = Ctx { lab, fabric, image };
    let lib_path = ctx.lab.write_file("lib.raw", &ctx.image).unwrap();
    ctx.lab.add_lun(LunSpec::read_only(IQN, lib_path)).unwrap();
    // Two larger images for the budget check: LUNs 2 and 3 (two images, so
    // the manager's fan-out does not make one build wait for the other).
    for (lun, seed) in [(2, 4242), (3, 4343)] {
        let big = content::image(BIG_BYTES, seed, 20);
        let big_path = ctx.lab.write_file(&format!("big{lun}.raw"), &big).unwrap();
        ctx.lab
            .add_lun(LunSpec {
                lun,
                ..LunSpec::read_only(IQN, big_path)
            })
            .unwrap();
    }

    // Target 2: a 48 MiB image rack1 prefetches when an initiator logs in.
    let prefetch_image = content::image(48 * MIB, 4444, 20);
    let prefetch_path = ctx.lab.write_file("prefetch.raw", &prefetch_image).unwrap();
    ctx.lab
        .add_lun(LunSpec {
            tid: 2,
            ..LunSpec::read_only(IQN_PREFETCH, prefetch_path)
        })
        .unwrap();

    // core: the global indexer and the manager; its XDP counts the peer
    // protocol's flows too (per flow, unique payload), for the bytes check.
    ctx.lab
        .set_datapath_extra("core", &format!("image_transfer_ports = [{AGENT_PORT}]"));
    let ix = ctx.fabric.indexer_config(&ctx.lab, "core", None).unwrap();
    let extra_config = format!(
        "[cost]\ntopology = {}\n[planner]\n[manager]\ndb = {}\nstale_secs = 5\nindex_wait_secs = 30\nlibrary_portal = \"{}:3260\"\n[indexer]\nconfig = {}\n",
        toml_path(&topo),
        toml_path(&ctx.lab.dir.path().join("manager.redb")),
        ctx.lab.addr4("library"),
        toml_path(&ix),
    );
    let core_opts = ApplianceOptions {
        steer: false,
        extra_config,
    };
    ctx.lab
        .start_appliance("core", core_opts.clone())
        .expect("core");
    // rack1: a steering appliance with its rack's indexer embedded, serving
    // the library's LUN 1 from the index; core's manager may stage blocks in
    // its cache, asked at the address its indexer advertises.
    let ix1 = ctx
        .fabric
        .indexer_config(&ctx.lab, "rack1", Some("core"))
        .unwrap();
    let mut ix1_text = std::fs::read_to_string(&ix1).unwrap();
    writeln!(
        ix1_text,
        "advertise = \"{}\"",
        Fabric::addr(&ctx.lab, "rack1", INDEXER_PORT)
    )
    .unwrap();
    std::fs::write(&ix1, ix1_text).unwrap();
    let rack1_config = format!(
        "[splicer]\nmanagers = [\"core\"]\nauthority = \"library\"\nmanifest_refresh_ms = 500\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\n[[splicer.lun]]\ntarget = {IQN_PREFETCH:?}\nlun = 1\nmode = \"prefetch\"\n[cost]\ntopology = {}\n[indexer]\nconfig = {}\n",
        toml_path(&topo),
        toml_path(&ix1),
    );
    ctx.lab
        .start_appliance(
            "rack1",
            ApplianceOptions {
                steer: true,
                extra_config: rack1_config,
            },
        )
        .expect("rack1");
    for rack in ["rack2", "rack3"] {
        ctx.fabric
            .start_indexer(&ctx.lab, rack, Some("core"))
            .unwrap();
    }
    ctx.fabric.start_library_agent(&ctx.lab, "core").unwrap();

    // hv4 runs a VM of the same seed: the image's first three quarters.
    let mut old = ctx.image.clone();
    let quarter = IMAGE_BYTES / 4;
    old[3 * quarter..].fill(0);
    write_vm(&ctx.vm_dir("hv4"), "old1", &Ctx::image_name(), &old);
    // Pinned load: rack2's three differ so each policy picks another; hv7 has
    // no room for the disk.
    let hosts: [(&str, f64, f64, u64); 8] = [
        ("hv1", 0.3, 0.3, 1 << 34),
        ("hv2", 0.3, 0.3, 1 << 34),
        ("hv3", 0.3, 0.3, 1 << 34),
        ("hv4", 0.9, 0.9, 1 << 34),
        ("hv5", 0.5, 0.1, 1 << 34),
        ("hv6", 0.2, 0.5, 1 << 34),
        ("hv7", 0.01, 0.01, 1 << 20),
        ("hv8", 0.3, 0.3, 1 << 34),
    ];
    for (hv, cpu, mem, free) in hosts {
        ctx.start_hv(hv, cpu, mem, free);
    }

    // 1. The inventory, once every agent reports and the library is indexed.
    let image_name = Ctx::image_name();
    within(Duration::from_secs(30), "the inventory fills", || {
        let inv = ctx.inventory();
        let reporting = inv["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["reporting"] == true)
            .count();
        let image = inv["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["image"] == image_name.as_str() && i["host"] == "library");
        let old1 = inv["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "old1" && v["indexed"] == true);
        reporting == 8 && image && old1
    });
    let inv = ctx.inventory();
    let old1 = inv["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "old1")
        .unwrap()
        .clone();
    assert_eq!(old1["host"], "hv4");
    assert_eq!(old1["rack"], "rack2");
    assert_eq!(old1["state"], "running");
    assert_eq!(old1["image"], image_name.as_str());
    // Its non-zero blocks are all the library's.
    assert_eq!(old1["held_elsewhere"].as_f64(), Some(1.0), "{old1}");
    let (ok, text, err) = ctx.vm(&ctx.lab.api_read_token_file(), &["list"]);
    assert!(ok, "{err}");
    for want in [
        "old1",
        "hv4",
        "rack2",
        image_name.as_str(),
        "held elsewhere 100.0%",
    ] {
        assert!(text.contains(want), "`vm list` lacks {want}:\n{text}");
    }
    // A newly started agent's VM appears within 5 s.
    write_vm(&ctx.vm_dir("hv9"), "late1", "unknown", &[0u8; 4 * 4096]);
    let started = Instant::now();
    ctx.start_hv("hv9", 0.3, 0.3, 1 << 34);
    within(Duration::from_secs(5), "hv9's VM in the inventory", || {
        ctx.inventory()["vms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "late1" && v["host"] == "hv9")
    });
    eprintln!(
        "hv9's VM listed {:?} after its agent started",
        started.elapsed()
    );

    // 2. Three policies, three hosts. Costs (hops × blocks): hv4 holds 3/4 of
    // the image; rack2's others fetch 3/4 from hv4 (2 hops) and the rest from
    // the library (3 hops); other racks everything from the library.
    let job = ctx.place("vm-top", "top:3:cpu", "rack2");
    assert_eq!(job["placement"]["chosen"], "hv6", "{job:#}");
    let ranked: Vec<&str> = job["placement"]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["host"].as_str().unwrap())
        .collect();
    assert_eq!(ranked[0], "hv4", "cheapest first: {ranked:?}");
    ctx.assert_identical("hv6", "vm-top");
    let ev = Ctx::events(&job);
    assert!(ev.contains("chose hv6"), "{ev}");
    assert!(job["indexed_after_ms"].as_u64().unwrap() < 5_000, "{job:#}");
    // Blocks came from hv4 (in rack) and the library; none from elsewhere.
    let by_source = job["progress"]["by_source"].as_object().unwrap();
    assert!(by_source.contains_key("hv4"), "{by_source:?}");
    assert!(
        by_source
            .keys()
            .all(|s| s == "hv4" || s == "library" || s == "hv6"),
        "{by_source:?}"
    );
    // Zero blocks are never fetched: what came is what the plan said.
    let fetched: u64 = by_source
        .values()
        .map(|s| s["blocks"].as_u64().unwrap())
        .sum();
    assert_eq!(
        fetched,
        job["plan"]["blocks_total"].as_u64().unwrap(),
        "{job:#}"
    );
    // The job's bytes on the library link (its connection to the library's
    // agent, both ways, framing and sealing included) against core's BPF
    // per-flow unique payload counters for that connection: within 2%.
    let lib = format!("{}:{AGENT_PORT}", ctx.lab.addr4("library"));
    let hv6 = format!("{}:", ctx.lab.addr4("hv6"));
    let status = ctx.lab.status("core").unwrap();
    let bpf: u64 = status
        .flows
        .iter()
        .filter(|f| {
            (f.src == lib && f.dst.starts_with(&hv6)) || (f.dst == lib && f.src.starts_with(&hv6))
        })
        .map(|f| f.payload_bytes - f.retrans_bytes)
        .sum();
    let job_lib = job["progress"]["by_link"]["library-core"].as_u64().unwrap();
    let diff = job_lib.abs_diff(bpf) as f64 / bpf as f64;
    eprintln!(
        "library link: job {job_lib} B, BPF {bpf} B ({:.3}%)",
        diff * 100.0
    );
    assert!(
        diff <= 0.02,
        "job {job_lib} B vs BPF {bpf} B on the library link"
    );
    // The library link carries at most the blocks no nearer holder had (hv4's
    // old VM, 2 hops from hv6), plus 1% of the virtual size.
    let hashes = |bytes: &[u8]| -> std::collections::HashSet<[u8; 32]> {
        bytes
            .chunks(4096)
            .filter(|b| b.iter().any(|&x| x != 0))
            .map(|b| *blake3::hash(b).as_bytes())
            .collect()
    };
    let nearer = hashes(&old);
    let only_library = hashes(&ctx.image).difference(&nearer).count() as u64 * 4096;
    let bound = only_library + IMAGE_BYTES as u64 / 100;
    eprintln!(
        "library link: {bpf} B, bound {bound} B ({only_library} B of blocks only the library had)"
    );
    assert!(bpf <= bound, "{bpf} B on the library link, bound {bound} B");

    let job = ctx.place(
        "vm-within",
        "within:400%:mem",
        "hv1,hv2,hv3,hv4,hv5,hv7,hv8,hv9",
    );
    assert_eq!(job["placement"]["chosen"], "hv5", "{job:#}");
    ctx.assert_identical("hv5", "vm-within");
    // hv7 has no room: never ranked.
    let ev = Ctx::events(&job);
    assert!(ev.contains("not a candidate: hv7"), "{ev}");
    assert!(
        !job["placement"]["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["host"] == "hv7"),
        "{job:#}"
    );

    let job = ctx.place("vm-best", "best", "hv1,hv2,hv3,hv4,hv7,hv8,hv9");
    assert_eq!(job["placement"]["chosen"], "hv4", "{job:#}");
    ctx.assert_identical("hv4", "vm-best");
    // The global index lists the new disk: a block only the image has, at hv4
    // through core.
    let block = ctx.image[3 * quarter..]
        .chunks(4096)
        .find(|b| b.iter().any(|&x| x != 0))
        .unwrap();
    ctx.fabric
        .wait_holder(&ctx.lab, "core", block, "hv4", Duration::from_secs(5))
        .unwrap();

    // Mode transparent, in rack1: rack1's appliance stages the blocks, then
    // the target's qemu-img reads the LUN through it.
    let deadline = Instant::now() + Duration::from_secs(30);
    // Its manifest from the index tree (served from the first READ CAPACITY on).
    while ctx.lab.status("rack1").unwrap().splicer.luns[0]
        .digest
        .is_none()
    {
        if Instant::now() > deadline {
            let bin = nearblock_lab::nearblock_bin().unwrap();
            let mut argv: Vec<String> = vec![
                bin.display().to_string(),
                "peer".into(),
                "manifest".into(),
                "--addr".into(),
                ctx.fabric.indexer_addr(&ctx.lab, "core"),
                "--host".into(),
                "library".into(),
            ];
            argv.extend(ctx.fabric.cli_args());
            argv.push(image_name.clone());
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let o = ctx.lab.exec("rack1", &argv).unwrap();
            panic!(
                "rack1 has no manifest for the LUN: {:?}\nmanifest from core: {}{}\n{}",
                ctx.lab.status("rack1").unwrap().splicer.luns,
                String::from_utf8_lossy(&o.stdout)
                    .chars()
                    .take(600)
                    .collect::<String>(),
                String::from_utf8_lossy(&o.stderr),
                ctx.lab.appliance_log("rack1")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = ctx.lab.status("rack1").unwrap().splicer;
    let job = ctx.place_in_mode("vm-tr", "best", "rack1", "transparent");
    let chosen = job["placement"]["chosen"].as_str().unwrap().to_owned();
    assert!(["hv1", "hv2", "hv3"].contains(&chosen.as_str()), "{job:#}");
    ctx.assert_identical(&chosen, "vm-tr");
    assert_eq!(job["plan"]["staged_at"], "rack1", "{job:#}");
    assert!(job["indexed_after_ms"].as_u64().unwrap() < 5_000, "{job:#}");
    let ev = Ctx::events(&job);
    for want in [
        "staged at rack1",
        "imports iscsi://",
        "imported on",
        "the global index lists vm/vm-tr",
    ] {
        assert!(ev.contains(want), "events lack {want}:\n{ev}");
    }
    // Staged from the library (2 hops from rack1; rack2's holders are 3).
    let staged = job["progress"]["by_source"].as_object().unwrap();
    let staged_blocks: u64 = staged.values().map(|s| s["blocks"].as_u64().unwrap()).sum();
    assert_eq!(
        staged_blocks,
        job["plan"]["blocks_total"].as_u64().unwrap(),
        "{job:#}"
    );
    let after = ctx.lab.status("rack1").unwrap().splicer;
    let served = (after.reads_served_shadow + after.reads_served_local)
        - (before.reads_served_shadow + before.reads_served_local);
    eprintln!(
        "transparent on {chosen}: staged {staged:?}; rack1 served {served} READs, passed {}, library bytes {}",
        after.reads_passed - before.reads_passed,
        after.library_bytes - before.library_bytes
    );
    assert!(
        served > 0,
        "rack1 served no READ: {after:?}\n{}",
        ctx.lab.appliance_log("rack1")
    );
    assert_eq!(
        after.reads_passed, before.reads_passed,
        "every READ answered from the staged cache"
    );
    // Each staged block served once as the library's (its first use), the
    // rest of the image zero blocks or repeats.
    let lib_class = nearblock::fetch::SourceClass::Library;
    assert_eq!(
        after.served[&lib_class].blocks - before.served[&lib_class].blocks,
        staged_blocks,
        "{after:?}"
    );

    // 2b. Two builds at once over core–rack3 (budget 200 Mbit/s): hv8 builds
    // LUN 2, hv9 LUN 3, from the library. core's BPF flow counters, sampled,
    // give nearblock's rate on the link in every 1-second window after the
    // first: at most 210 Mbit/s. Each job's predicted finish (its last
    // allocation) is within 20% of the measured one.
    let big_name = format!("{IQN}/2");
    let ids: Vec<String> = [("vm-b1", "hv8", 2), ("vm-b2", "hv9", 3)]
        .iter()
        .map(|(name, host, lun)| ctx.start_job(&format!("{IQN}/{lun}"), name, host))
        .collect();
    let lib = format!("{}:{AGENT_PORT}", ctx.lab.addr4("library"));
    let rack3_hosts = [
        format!("{}:", ctx.lab.addr4("hv8")),
        format!("{}:", ctx.lab.addr4("hv9")),
    ];
    let on_link = || -> u64 {
        ctx.lab
            .status("core")
            .unwrap()
            .flows
            .iter()
            .filter(|f| {
                rack3_hosts.iter().any(|h| {
                    (f.src == lib && f.dst.starts_with(h.as_str()))
                        || (f.dst == lib && f.src.starts_with(h.as_str()))
                })
            })
            .map(|f| f.payload_bytes - f.retrans_bytes)
            .sum()
    };
    let read_token = ctx.lab.api_read_token_file();
    let job_of = |id: &str| -> Value {
        let (ok, out, err) = ctx.vm(&read_token, &["job", id, "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let started = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    loop {
        samples.push(nearblock_lab::vmlab::stamped(started, on_link));
        let all_done = ids.iter().all(|id| job_of(id)["state"] == "done");
        if all_done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_mins(2),
            "budgeted builds did not end"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let peak = nearblock_lab::vmlab::peak_mbps(&samples, 2.0);
    let total = samples.last().unwrap().1;
    eprintln!(
        "budget: {total} B on core–rack3 in {:.1} s, peak 2-s window {peak:.1} Mbit/s",
        samples.last().unwrap().0
    );
    assert!(
        total > 2 * 40 * MIB as u64,
        "both builds crossed the link: {total} B"
    );
    assert!(
        peak <= 210.0,
        "nearblock's rate on core–rack3 peaked at {peak:.1} Mbit/s"
    );
    for id in &ids {
        let job = job_of(id);
        let created = job["created_ms"].as_u64().unwrap();
        let built = job["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["message"].as_str().unwrap().starts_with("built;"))
            .unwrap()["at_ms"]
            .as_u64()
            .unwrap();
        let predicted = job["plan"]["predicted_finish_ms"].as_u64().unwrap();
        let (measured, predicted) = (
            (built - created) as f64,
            predicted.saturating_sub(created) as f64,
        );
        eprintln!("job {id}: predicted {predicted} ms, measured {measured} ms");
        assert!(
            (predicted - measured).abs() <= 0.2 * measured,
            "job {id}: predicted {predicted} ms, measured {measured} ms\n{job:#}"
        );
    }

    // 2c. Fan-out: two jobs of LUN 3 at once in rack1. The first seeds (from
    // the library); the second waits for it, then sources only from its copy
    // in the rack (2 hops; the library is 3).
    //
    // Meanwhile rack1 prefetches target 2's LUN (an initiator logs in): the
    // manager counts its prefetching as a flow on core–rack1 beside the
    // seed's build, so each gets half the budget, and nearblock's rate on
    // core–rack1 stays within it; once no build crosses it, rack1's own
    // budget is back.
    let lun3 = format!("{IQN}/3");
    let seed = ctx.start_job(&lun3, "vm-f1", "hv2");
    let follower = ctx.start_job(&lun3, "vm-f2", "hv3");
    let half = RACK1_BUDGET_MBPS / 2.0 * 0.95;
    let library_rate = |job: &Value| job["plan"]["rates"]["library"].as_u64().unwrap_or(0) as f64;
    let pace = || {
        ctx.lab
            .status("rack1")
            .unwrap()
            .splicer
            .prefetch_pace
            .unwrap()
    };
    within(
        Duration::from_secs(30),
        "rack1's prefetch LUN installed",
        || {
            ctx.lab
                .status("rack1")
                .unwrap()
                .splicer
                .luns
                .iter()
                .any(|l| l.target == IQN_PREFETCH && l.lun == 1 && l.blocks > 0)
        },
    );
    within(
        Duration::from_secs(30),
        "the seed building, rack1 offered a share",
        || {
            let p = pace();
            ctx.job(&seed)["state"] == "building" && p.shared_by_manager
        },
    );
    let alone = library_rate(&ctx.job(&seed));
    let offered = pace().budget_mbps;
    assert!(
        (alone * 8.0 / 1e6 - RACK1_BUDGET_MBPS * 0.95).abs() < 0.5,
        "the seed alone on core–rack1: {alone} B/s"
    );
    assert!(
        (offered - half).abs() < 0.5,
        "rack1 offered {offered} Mbit/s"
    );
    let rack1_side: Vec<String> = ["rack1", "hv1", "hv2", "hv3"]
        .iter()
        .map(|n| format!("{}:", ctx.lab.addr4(n)))
        .collect();
    let lib = format!("{}:{AGENT_PORT}", ctx.lab.addr4("library"));
    let on_uplink = || -> u64 {
        ctx.lab
            .status("core")
            .unwrap()
            .flows
            .iter()
            .filter(|f| {
                rack1_side.iter().any(|h| {
                    (f.src == lib && f.dst.starts_with(h.as_str()))
                        || (f.dst == lib && f.src.starts_with(h.as_str()))
                })
            })
            .map(|f| f.payload_bytes - f.retrans_bytes)
            .sum()
    };
    let url = format!("iscsi://{}/{IQN_PREFETCH}/1", ctx.lab.addr4("library"));
    ctx.lab.exec_ok("hv1", &["iscsi-inq", &url]).unwrap();
    let started = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut shared = None;
    loop {
        samples.push(nearblock_lab::vmlab::stamped(started, on_uplink));
        let job = ctx.job(&seed);
        let p = pace();
        if shared.is_none() && p.running > 0 && (library_rate(&job) * 8.0 / 1e6 - half).abs() < 0.5
        {
            shared = Some((p, library_rate(&job)));
        }
        if job["state"] != "building" && job["state"] != "placing" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_mins(1),
            "the seed's build did not end: {job:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (p, rate) = shared.expect("rack1's prefetch and the seed's build shared core–rack1");
    eprintln!(
        "prefetch share: rack1 prefetching at {:.2} Mbit/s (own budget {:.0}), the seed at {:.2} Mbit/s",
        p.budget_mbps,
        p.default_mbps,
        rate * 8.0 / 1e6
    );
    assert!(
        (p.budget_mbps - half).abs() < 0.5 && p.shared_by_manager,
        "{p:?}"
    );
    let peak = nearblock_lab::vmlab::peak_mbps(&samples, 2.0);
    let total = samples.last().unwrap().1 - samples[0].1;
    eprintln!(
        "prefetch share: {total} B on core–rack1 in {:.1} s, peak 2-s window {peak:.1} Mbit/s",
        samples.last().unwrap().0
    );
    assert!(
        peak <= RACK1_BUDGET_MBPS * 1.05,
        "nearblock's rate on core–rack1 peaked at {peak:.1} Mbit/s"
    );
    let deadline = Instant::now() + Duration::from_mins(2);
    let (seed_job, follower_job) = loop {
        let (a, b) = (ctx.job(&seed), ctx.job(&follower));
        if a["state"] != "placing"
            && a["state"] != "building"
            && a["state"] != "indexing"
            && b["state"] != "placing"
            && b["state"] != "building"
            && b["state"] != "indexing"
        {
            break (a, b);
        }
        assert!(
            Instant::now() < deadline,
            "fan-out jobs not done:\n{a:#}\n{b:#}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(seed_job["state"], "done", "{seed_job:#}");
    assert_eq!(follower_job["state"], "done", "{follower_job:#}");
    let ev = Ctx::events(&follower_job);
    assert!(ev.contains(&format!("waiting for job {seed}")), "{ev}");
    let sources: Vec<&String> = follower_job["progress"]["by_source"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(sources, ["hv2"], "{follower_job:#}");
    within(Duration::from_secs(5), "rack1's own budget back", || {
        let p = pace();
        !p.shared_by_manager && (p.budget_mbps - RACK1_BUDGET_MBPS).abs() < 1e-9
    });
    assert!(
        std::fs::read(ctx.vm_dir("hv3").join("vm-f2.raw")).unwrap()
            == std::fs::read(ctx.lab.dir.path().join("big3.raw")).unwrap(),
        "vm-f2 is not LUN 3's image"
    );

    // 3. hv6's copy changes behind its index (a running VM writing): it now
    // serves blocks that fail verification. A build in rack2 plans from it,
    // finds it lying, and re-plans.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(ctx.vm_dir("hv6").join("vm-top.raw"))
            .unwrap();
        let mut flipped = ctx.image.clone();
        for b in flipped.chunks_mut(4096) {
            b[0] ^= 0xff;
        }
        f.write_all_at(&flipped, 0).unwrap();
        f.sync_all().unwrap();
    }
    let job = ctx.place("vm-replan", "best", "hv6");
    assert_eq!(job["placement"]["chosen"], "hv6", "{job:#}");
    ctx.assert_identical("hv6", "vm-replan");
    let ev = Ctx::events(&job);
    assert!(
        ev.contains("source hv6 failed") && ev.contains("verification"),
        "the events name the lying source: {ev}"
    );
    assert!(ev.contains("re-plan 1 without hv6"), "{ev}");

    // 4. The VMs' lifecycle through the hook: start and pause hv4's new VM,
    // retire hv5's (its disk goes, and the inventory follows).
    let read = ctx.lab.api_read_token_file();
    let admin = ctx.lab.api_admin_token_file();
    let vm_state = |host: &str, name: &str| -> Option<String> {
        ctx.inventory()["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["host"] == host && v["name"] == name)
            .map(|v| v["state"].as_str().unwrap().to_string())
    };
    for action in ["start", "pause"] {
        let (ok, _, err) = ctx.vm(&admin, &["set", "hv4", "vm-best", action]);
        assert!(ok, "{action}: {err}");
    }
    within(Duration::from_secs(5), "vm-best paused", || {
        vm_state("hv4", "vm-best").as_deref() == Some("paused")
    });
    let (ok, _, err) = ctx.vm(&admin, &["set", "hv4", "vm-best", "start"]);
    assert!(
        !ok && err.contains("cannot start"),
        "a paused VM resumes: {err}"
    );
    let (ok, _, err) = ctx.vm(&read, &["set", "hv5", "vm-within", "retire"]);
    assert!(
        !ok && err.contains("refused"),
        "a read token cannot retire: {err}"
    );
    let (ok, _, err) = ctx.vm(&admin, &["set", "hv5", "vm-within", "retire"]);
    assert!(ok, "retire: {err}");
    assert!(!ctx.vm_dir("hv5").join("vm-within.raw").exists());
    within(Duration::from_secs(5), "vm-within gone", || {
        vm_state("hv5", "vm-within").is_none()
    });
    let (ok, _, err) = ctx.vm(&admin, &["set", "hv5", "vm-within", "start"]);
    assert!(!ok && err.contains("does not exist"), "{err}");

    // 5. A source killed mid-build. hv4 is rack2's cheapest holder of every
    // block (hv6 ties, and loses on its name); its link is slowed so the build
    // takes seconds, and its agent is killed once the first blocks are in.
    shape(&ctx.lab, "hv4", "rack2", Some("16mbit"));
    let id = ctx.start_job(&image_name, "vm-killed", "hv5");
    let job_now = || -> Value {
        let (ok, out, err) = ctx.vm(&read, &["job", &id, "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    within(Duration::from_secs(30), "the first blocks from hv4", || {
        let j = job_now();
        j["progress"]["by_source"]["hv4"]["blocks"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    let j = job_now();
    assert_eq!(j["state"], "building", "killed mid-build, not after: {j:#}");
    ctx.fabric.procs.kill("agent-hv4").unwrap();
    let (ok, out, err) = ctx.vm(&read, &["job", &id, "--watch", "--json"]);
    assert!(ok, "the job completes without hv4: {err}\n{out}");
    let job: Value = serde_json::from_str(out.trim()).unwrap();
    ctx.assert_identical("hv5", "vm-killed");
    let ev = Ctx::events(&job);
    assert!(ev.contains("source hv4 failed"), "{ev}");
    assert!(ev.contains("re-plan 1 without hv4"), "{ev}");
    let by_source = job["progress"]["by_source"].as_object().unwrap();
    assert!(
        by_source.contains_key("hv4") && by_source.contains_key("hv6"),
        "{by_source:?}"
    );

    // The job as server-sent events: one `job` event per change, the last one
    // final, then the stream ends.
    let token = std::fs::read_to_string(&read).unwrap();
    let o = ctx
        .lab
        .exec_ok(
            "core",
            &[
                "curl",
                "-sN",
                "--max-time",
                "10",
                "-H",
                &format!("Authorization: Bearer {}", token.trim()),
                &format!("http://127.0.0.1:7878/api/v1/jobs/{id}/events"),
            ],
        )
        .unwrap();
    let sse = String::from_utf8_lossy(&o.stdout);
    assert!(sse.starts_with("event: job\ndata: {"), "{sse}");
    assert!(sse.contains("\"state\":\"done\""), "{sse}");
    // The OpenAPI document is served.
    let o = ctx
        .lab
        .exec_ok(
            "core",
            &[
                "curl",
                "-sf",
                "--max-time",
                "10",
                "-H",
                &format!("Authorization: Bearer {}", token.trim()),
                "http://127.0.0.1:7878/api/v1/openapi.json",
            ],
        )
        .unwrap();
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        doc["paths"]["/api/v1/vms/{image}/place"]["post"].is_object(),
        "{doc}"
    );

    // 5b. The manager restarts mid-build (core's daemon killed and started
    // again; the library's uplink slowed so the build is still running; hv1's
    // cheapest holder of LUN 2 is the library, rack3's copies are farther): the
    // job is not forgotten but failed with a reason that says so, and the
    // agent's build is cancelled — no VM, no partial disk left.
    shape(&ctx.lab, "library", "core", Some("8mbit"));
    let id = ctx.start_job(&big_name, "vm-restart", "hv1");
    within(Duration::from_secs(30), "the build under way", || {
        let j = ctx.job(&id);
        j["state"] == "building" && j["progress"]["blocks_done"].as_u64().unwrap_or(0) > 0
    });
    let partial = ctx.vm_dir("hv1").join(".vm-restart.raw.part");
    assert!(
        partial.exists(),
        "the build writes its partial disk: {:?}\n{:#}",
        std::fs::read_dir(ctx.vm_dir("hv1"))
            .map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>())
            .unwrap_or_default(),
        ctx.job(&id)
    );
    ctx.lab.kill_appliance("core").unwrap();
    ctx.lab.start_appliance("core", core_opts.clone()).unwrap();
    let job = ctx.job(&id);
    assert_eq!(job["state"], "failed", "{job:#}");
    assert!(
        job["error"].as_str().unwrap().contains("restarted"),
        "{job:#}"
    );
    within(
        Duration::from_secs(10),
        "the agent's build cancelled",
        || !partial.exists(),
    );
    assert!(!ctx.vm_dir("hv1").join("vm-restart.raw").exists());
    shape(&ctx.lab, "library", "core", None);

    // 6. Refusals.
    let (ok, _, err) = ctx.vm(&read, &["place", &image_name, "--name", "x"]);
    assert!(
        !ok && err.contains("refused"),
        "a read token cannot place: {err}"
    );
    let (ok, _, err) = ctx.vm(&admin, &["place", "no-such-image", "--name", "x"]);
    assert!(!ok && err.contains("not in the global index"), "{err}");
    let (ok, _, err) = ctx.vm(&admin, &["place", &image_name, "--name", "../x"]);
    assert!(!ok && err.contains("VM name"), "{err}");
    let (ok, _, err) = ctx.vm(
        &admin,
        &["place", &image_name, "--name", "x", "--policy", "worst"],
    );
    assert!(!ok && err.contains("policy"), "{err}");
    let (ok, _, err) = ctx.vm(
        &admin,
        &[
            "place",
            "vm/vm-best",
            "--name",
            "x",
            "--mode",
            "transparent",
        ],
    );
    assert!(!ok && err.contains("no TARGET/LUN"), "{err}");
    let (ok, out, err) = ctx.vm(&read, &["job", "999"]);
    assert!(!ok && err.contains("no job 999"), "{out}{err}");
}
