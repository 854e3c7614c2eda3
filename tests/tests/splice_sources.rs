//! Where the rack appliance sources the blocks of a served READ (splicer issue,
//! done-when 3): qemu-img convert of the library LUN through rack1 is bit-identical
//! to the LUN in every source mix, and the appliance's provenance counters say where
//! the bytes came from. Run as root.
//!
//! The lab: the library's agent (its tgtd LUNs, by IQN/LUN) and rack indexers push
//! to the global indexer on core; rack1 runs the appliance with its indexer
//! embedded. The library's link is expensive (weight 4), so a holder in another
//! rack (hv3, 3 hops) is cheaper than the library (5). hv3's link is shaped to
//! 200 Mbit/s so a copy from it takes long enough to kill it mid-copy.
//!
//! Mixes, each on a fresh (restarted, empty-cache) rack1 unless said:
//! 1. all from the library (its agent, by hash);
//! 2. all from the rack cache (the same appliance, second copy);
//! 3. half from a peer in another rack (hv3 holds the first half);
//! 4. that peer serves one corrupted block (rejected, refetched elsewhere);
//! 5. that peer is killed mid-copy (its blocks come from the next holder).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nearblock::fetch::SourceClass;
use nearblock::splice::catalog::{manifest_of, manifest_to_text};
use nearblock_lab::{
    content, fabric::Fabric, toml_path, ApplianceOptions, Lab, LunSpec, DEFAULT_TOPOLOGY,
};

const IQN: &str = "iqn.2026-11.test.nearblock:sources";
/// A second target whose LUN the appliance serves in prefetch mode.
const IQN_PREFETCH: &str = "iqn.2026-11.test.nearblock:prefetch";
/// The prefetch budget per link in this test, Mbit/s.
const PREFETCH_MBPS: f64 = 40.0;
const AGENT_PORT: u16 = 7300;
const INDEXER_PORT: u16 = 7301;
const MIB: usize = 1 << 20;
const IMAGE: usize = 64 * MIB;

/// The default lab with an expensive library link and a slow link to hv3.
fn topology() -> String {
    let t = DEFAULT_TOPOLOGY.replacen(
        "a = \"library\"\nb = \"core\"\n",
        "a = \"library\"\nb = \"core\"\nweight = 4.0\n",
        1,
    );
    let t = t.replacen(
        "a = \"rack2\"\nb = \"hv3\"\ncapacity_mbps = 10000\n",
        "a = \"rack2\"\nb = \"hv3\"\ncapacity_mbps = 200\nlab = { shape = true }\n",
        1,
    );
    assert!(t.contains("weight = 4.0") && t.contains("capacity_mbps = 200"));
    t
}

/// Distinct non-zero 4 KiB blocks of `data`.
fn distinct(data: &[u8]) -> BTreeSet<[u8; 32]> {
    data.chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| *blake3::hash(b).as_bytes())
        .collect()
}

struct Rig {
    fabric: Fabric,
    lab: Lab,
    topo: PathBuf,
    manifest: PathBuf,
    prefetch_manifest: PathBuf,
}

impl Rig {
    /// (Re)start rack1's appliance: an empty cache.
    fn restart_rack1(&mut self) {
        if self.lab.status("rack1").is_ok() {
            self.lab
                .stop_appliance("rack1", Duration::from_secs(10))
                .unwrap();
        }
        let ix = self
            .fabric
            .indexer_config(&self.lab, "rack1", Some("core"))
            .unwrap();
        let extra_config = format!(
            "[splicer]\nfetch_deadline_ms = 3000\nhistory_dir = {}\nprefetch_budget_mbps = {PREFETCH_MBPS:?}\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\nmanifest = {}\n[[splicer.lun]]\ntarget = {IQN_PREFETCH:?}\nlun = 1\nmanifest = {}\nmode = \"prefetch\"\n[cost]\ntopology = {}\n[planner]\n[indexer]\nconfig = {}\n",
            toml_path(&self.history_dir()),
            toml_path(&self.manifest),
            toml_path(&self.prefetch_manifest),
            toml_path(&self.topo),
            toml_path(&ix)
        );
        self.lab
            .start_appliance(
                "rack1",
                ApplianceOptions {
                    steer: true,
                    extra_config,
                },
            )
            .unwrap();
    }

    fn copy(&self, name: &str, image: &[u8]) {
        copy(&self.lab, name, image);
    }

    fn history_dir(&self) -> PathBuf {
        self.lab.dir.path().join("history")
    }

    fn splicer(&self) -> nearblock::splice::stats::SplicerSnapshot {
        self.lab.status("rack1").unwrap().splicer
    }

    /// Polls until `probe` holds (bounded).
    fn wait_indexed(&self, what: &str, probe: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_mins(1);
        while !probe(self) {
            assert!(
                Instant::now() < deadline,
                "{what} not indexed within 60 s\n{}",
                self.lab.appliance_log("rack1")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// One line per mix for the log: bytes by source, and the fetcher's counters.
fn report(mix: &str, s: &nearblock::splice::stats::SplicerSnapshot) {
    eprintln!(
        "{mix}: served {} passed_through={} by_hops={:?} sourcing={:?}",
        nearblock_lab::served_by_source(s),
        s.library_bytes,
        s.served_bytes_by_hops,
        s.sourcing
    );
}

fn bytes_of(s: &nearblock::splice::stats::SplicerSnapshot, class: SourceClass) -> u64 {
    s.served.get(&class).map_or(0, |v| v.bytes)
}

fn blocks_of(s: &nearblock::splice::stats::SplicerSnapshot, class: SourceClass) -> u64 {
    s.served.get(&class).map_or(0, |v| v.blocks)
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: each step checks what the one before set up"
)]
fn copies_are_identical_in_every_source_mix() {
    let mut lab = Lab::new(&topology()).expect("lab");
    let mut image = content::image(IMAGE, 61, 40);
    // qemu-img's format probe reads the first 2 KiB once more; a zero first block
    // keeps the per-source byte counts exact.
    image[..4096].fill(0);
    let lun = lab.write_file("lun.raw", &image).unwrap();
    lab.add_lun(LunSpec::read_only(IQN, lun.clone())).unwrap();
    // hv3 runs a VM of the same seed: the first half is the image's.
    let mut vm3 = image[..IMAGE / 2].to_vec();
    vm3.extend_from_slice(&content::image(IMAGE / 2, 62, 40));
    let vm3_path = lab.write_file("vm3.raw", &vm3).unwrap();
    let nonzero_bytes: u64 = image
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
        * 4096;
    let first_half = distinct(&image[..IMAGE / 2]);
    let topo = lab
        .write_file("topology.toml", topology().as_bytes())
        .unwrap();
    let manifest = lab
        .write_file(
            "lun.manifest",
            manifest_to_text(&manifest_of("lun", &image, 4096)).as_bytes(),
        )
        .unwrap();
    let mut prefetch_image = content::image(16 * MIB, 63, 40);
    prefetch_image[..4096].fill(0);
    let prefetch_lun = lab.write_file("prefetch.raw", &prefetch_image).unwrap();
    lab.add_lun(LunSpec {
        tid: 2,
        iqn: IQN_PREFETCH.into(),
        lun: 1,
        backing: prefetch_lun,
        readonly: true,
        allow: None,
    })
    .unwrap();
    let prefetch_manifest = lab
        .write_file(
            "prefetch.manifest",
            manifest_to_text(&manifest_of("prefetch", &prefetch_image, 4096)).as_bytes(),
        )
        .unwrap();
    let mut rig = Rig {
        fabric: Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap(),
        lab,
        topo,
        manifest,
        prefetch_manifest,
    };
    for (node, parent) in [("core", None), ("rack2", Some("core"))] {
        rig.fabric.start_indexer(&rig.lab, node, parent).unwrap();
    }
    let lib = rig.lab.library().to_string();
    rig.fabric.start_library_agent(&rig.lab, "core").unwrap();
    rig.restart_rack1();

    // 1. All from the library: its agent serves every non-zero block by hash.
    rig.wait_indexed("the library's LUN", |r| {
        holders_at_core(r, &image, 0).contains(&lib)
    });
    rig.copy("from-library", &image);
    let s = rig.splicer();
    report("1 library", &s);
    assert_eq!(
        bytes_of(&s, SourceClass::Library),
        nonzero_bytes,
        "every non-zero byte from the library's agent: {s:?}"
    );
    assert_eq!(s.library_bytes, 0, "no READ passed through: {s:?}");
    assert_eq!(blocks_of(&s, SourceClass::OtherRack), 0, "{s:?}");

    // 2. All from the rack cache: the same appliance, a second copy.
    rig.copy("from-cache", &image);
    let s2 = rig.splicer();
    report("2 cache", &s2);
    assert_eq!(
        bytes_of(&s2, SourceClass::Cache) - bytes_of(&s, SourceClass::Cache),
        nonzero_bytes,
        "{s2:?}"
    );
    assert_eq!(
        bytes_of(&s2, SourceClass::Library),
        bytes_of(&s, SourceClass::Library),
        "nothing more from the library: {s2:?}"
    );

    // Each copy was one boot of the LUN's access history (saved when the session
    // ended): every block position read. From now on it orders read-ahead.
    let path = nearblock::splice::catalog::history_path(&rig.history_dir(), IQN, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let history = loop {
        let h: Option<nearblock::plan::AccessHistory> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match h {
            Some(h) if h.boots >= 2 => break h,
            h => assert!(
                Instant::now() < deadline,
                "two boots not recorded in {}: {:?}",
                path.display(),
                h.map(|h| h.boots)
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(history.blocks.len(), IMAGE / 4096);
    assert!(history.blocks.values().all(|u| u.boots_read >= 2));

    // 3. Half from a peer in another rack: hv3 (rack2) holds the first half.
    rig.fabric
        .start_agent(&rig.lab, "hv3", "rack2", &[("vm3", &vm3_path)], "")
        .unwrap();
    rig.wait_indexed("hv3's image", |r| {
        holders_at_core(r, &image, 0).contains("hv3")
    });
    rig.restart_rack1();
    rig.copy("half-from-hv3", &image);
    let s = rig.splicer();
    report("3 half from hv3", &s);
    let first_half_bytes = first_half.len() as u64 * 4096;
    assert_eq!(
        bytes_of(&s, SourceClass::OtherRack),
        first_half_bytes,
        "the first half's blocks from hv3: {s:?}"
    );
    assert_eq!(
        bytes_of(&s, SourceClass::OtherRack) + bytes_of(&s, SourceClass::Library),
        nonzero_bytes,
        "the rest from the library: {s:?}"
    );
    assert_eq!(
        s.served_bytes_by_hops.get(&3).copied(),
        Some(first_half_bytes),
        "hv3 is 3 hops from rack1: {s:?}"
    );

    // 4. hv3 serves one corrupted block: rejected, fetched from the library.
    let victim = (0..IMAGE / 2 / 4096)
        .find(|&i| image[i * 4096..(i + 1) * 4096].iter().any(|&b| b != 0))
        .unwrap();
    flip_byte(&vm3_path, victim * 4096 + 100);
    rig.restart_rack1();
    rig.copy("hv3-corrupt", &image);
    let s = rig.splicer();
    report("4 corrupt", &s);
    let src = s.sourcing.clone().unwrap();
    assert!(src.corrupt >= 1, "the corrupt block was detected: {s:?}");
    assert_eq!(
        bytes_of(&s, SourceClass::OtherRack) + bytes_of(&s, SourceClass::Library),
        nonzero_bytes,
        "{s:?}"
    );
    flip_byte(&vm3_path, victim * 4096 + 100);

    // 5. hv3 killed mid-copy: the rest of its blocks come from the library.
    rig.restart_rack1();
    let killed = std::thread::scope(|scope| {
        let lab = &rig.lab;
        let copier = scope.spawn(|| copy(lab, "hv3-killed", &image));
        let deadline = Instant::now() + Duration::from_mins(1);
        let mut killed = false;
        while !copier.is_finished() && Instant::now() < deadline {
            let fetched = rig
                .lab
                .status("rack1")
                .ok()
                .and_then(|st| st.splicer.sourcing)
                .map_or(0, |s| s.fetched_blocks);
            if fetched > 0 {
                rig.fabric.procs.kill("agent-hv3").unwrap();
                killed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        copier.join().expect("copy thread");
        killed
    });
    assert!(killed, "hv3 was killed while the copy ran");
    let s = rig.splicer();
    report("5 killed", &s);
    assert!(
        bytes_of(&s, SourceClass::OtherRack) < first_half_bytes,
        "not every block came from hv3: {s:?}"
    );
    // Every byte qemu-img read was served once, by some source (its format
    // probe reads the first 2 KiB once more).
    let total: u64 = s.served.values().map(|v| v.bytes).sum::<u64>() + s.library_bytes;
    assert!(
        (IMAGE as u64..=IMAGE as u64 + 64 * 1024).contains(&total),
        "{total} bytes accounted for: {s:?}"
    );

    // 6. Prefetch mode: a login to the second target (an inquiry, no READ of the
    // image) warms the cache with its whole image, within the per-link budget;
    // a copy afterwards is served from the cache alone.
    let url = format!(
        "iscsi://{}/{IQN_PREFETCH}/1",
        rig.lab.addr4(rig.lab.library())
    );
    let o = rig.lab.exec_ok("hv1", &["iscsi-inq", &url]).unwrap();
    assert!(o.status.success());
    let deadline = Instant::now() + Duration::from_mins(1);
    let done = loop {
        let st = rig.splicer();
        if let Some(p) = st
            .prefetch
            .iter()
            .find(|p| p.lun == format!("{IQN_PREFETCH}/1"))
        {
            if !p.running {
                break p.clone();
            }
        }
        assert!(Instant::now() < deadline, "prefetch did not finish: {st:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let prefetch_blocks = distinct(&prefetch_image).len() as u64;
    assert_eq!(
        (done.blocks_total, done.blocks_cached, done.stopped.clone()),
        (prefetch_blocks, prefetch_blocks, None),
        "{done:?}"
    );
    // The budget held: the bytes at PREFETCH_MBPS take at least this long.
    let floor_ms = (prefetch_blocks * 4096 * 8) as f64 / (PREFETCH_MBPS * 1e3);
    eprintln!("prefetch: {done:?}; the budget allows it in {floor_ms:.0} ms at the least");
    assert!(
        done.elapsed_ms as f64 >= floor_ms * 0.95,
        "prefetch of {prefetch_blocks} blocks took {} ms, faster than {PREFETCH_MBPS} Mbit/s",
        done.elapsed_ms
    );
    let before = rig.splicer();
    let out = rig.lab.dir.path().join("prefetched.raw");
    let o = rig
        .lab
        .qemu_convert("hv1", &rig.lab.lun_url(IQN_PREFETCH, 1), &out)
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == prefetch_image);
    let after = rig.splicer();
    report("6 prefetched", &after);
    // Nothing was fetched or passed through for the copy; its blocks count as
    // the library's (where the prefetch got them) at their first serve.
    let fetched = |s: &nearblock::splice::stats::SplicerSnapshot| {
        s.sourcing.as_ref().map_or(0, |f| f.fetched_blocks)
    };
    assert_eq!(fetched(&after), fetched(&before), "{after:?}");
    assert_eq!(after.library_bytes, before.library_bytes, "{after:?}");
    assert_eq!(
        bytes_of(&after, SourceClass::Library) - bytes_of(&before, SourceClass::Library),
        prefetch_blocks * 4096,
        "{after:?}"
    );

    // `/metrics` of this appliance (every stage on: datapath, splicer, cache,
    // sourcing, sampler) exports exactly the series docs/operations.md documents.
    let exported = nearblock_lab::metric_names(&rig.lab.metrics("rack1").unwrap());
    let documented = nearblock_lab::documented_metric_names().unwrap();
    assert!(documented.len() >= 20, "docs list only {documented:?}");
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&exported).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "exported but not in docs/operations.md: {undocumented:?}; documented but not exported: {missing:?}"
    );
}

/// Copy the LUN from hv1 through rack1 and check it is the image.
fn copy(lab: &Lab, name: &str, image: &[u8]) {
    let copy = lab.qemu_copy("hv1", &lab.lun_url(IQN, 1), name, "rack1");
    assert!(copy == image, "{name}: the copy differs from the LUN");
}

/// Flip one byte of a file in place (what a peer's disk could do behind its index).
fn flip_byte(path: &Path, at: usize) {
    let mut data = std::fs::read(path).unwrap();
    data[at] ^= 0x5a;
    std::fs::write(path, data).unwrap();
}

/// The holders (host names) the global indexer lists for the first non-zero
/// block of `image` at or after block `from`.
fn holders_at_core(rig: &Rig, image: &[u8], from: usize) -> String {
    let i = (from..image.len() / 4096)
        .find(|&i| image[i * 4096..(i + 1) * 4096].iter().any(|&b| b != 0))
        .unwrap();
    rig.fabric
        .holders(&rig.lab, "core", &image[i * 4096..(i + 1) * 4096])
        .unwrap()
}
