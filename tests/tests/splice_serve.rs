//! Serving READs of an immutable LUN from the rack appliance (issue 6): a VM
//! instantiation (`qemu-img convert`) through nearblock is bit-identical cold
//! (library, learned into the cache) and warm (cache), and the BPF flow counters on
//! the appliance's upstream port show what crossed the library link. The
//! conformance suite on the served LUN gives the same per-test results as direct.
//! Run as root, after `cargo build -p nearblock`.

use std::collections::BTreeMap;

use nearblock::splice::catalog::{manifest_of, manifest_to_text};
use nearblock_lab::{conformance, content, ApplianceOptions, Lab, LunSpec};

const IQN: &str = "iqn.2026-11.test.nearblock:served";
const LUN_MIB: usize = 64;
const BLOCK: u32 = 64 * 1024;

/// A test image: `content::image` blocks (4 KiB, 40% zero) with whole 4 MiB regions
/// zeroed on top (every third), so that some READs are entirely zero (qemu-img reads
/// 2 MiB at a time; a READ mixing zero and missing blocks passes through whole).
fn test_image() -> Vec<u8> {
    let mut data = content::image(LUN_MIB << 20, 11, 40);
    for (i, region) in data.chunks_mut(4 << 20).enumerate() {
        if i % 3 == 1 {
            region.fill(0);
        }
    }
    data
}

/// A lab with the image exported read-only, and the appliance config serving it.
fn served_lab(design: &str) -> (Lab, Vec<u8>, String, ApplianceOptions) {
    let mut lab = Lab::default_topology().expect("lab");
    let data = test_image();
    let backing = lab.write_file("img.raw", &data).expect("backing");
    lab.add_lun(LunSpec::read_only(IQN, backing)).expect("lun");
    // The shadow design reads its manifest from a manifest file; the local design
    // from the appliance's index store, filled by `nearblock index` (both ways an
    // operator can declare a served LUN).
    let source = if design == "shadow" {
        let manifest = manifest_of("img", &data, BLOCK);
        let path = lab
            .write_file("img.manifest", manifest_to_text(&manifest).as_bytes())
            .expect("manifest");
        format!("manifest = {:?}\n", path.display().to_string())
    } else {
        let db = lab.dir.path().join("index.redb");
        let bin = nearblock_lab::nearblock_bin().expect("nearblock");
        let o = std::process::Command::new(bin)
            .arg("index")
            .arg(lab.dir.path().join("img.raw"))
            .args([
                "--image",
                "img",
                "--host",
                "library",
                "--block-size",
                "64KiB",
                "--quiet",
            ])
            .arg("--db")
            .arg(&db)
            .output()
            .expect("nearblock index");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        format!(
            "image = \"img\"\nauthority = \"library\"\n\n[index]\ndb = {:?}\n",
            db.display().to_string()
        )
    };
    let extra_config = format!(
        "\n[splicer]\ncache_bytes = {}\n\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\ndesign = {design:?}\n{source}",
        256u64 << 20,
    );
    let url = lab.lun_url(IQN, 1);
    let opts = ApplianceOptions {
        steer: true,
        extra_config,
    };
    (lab, data, url, opts)
}

/// Unique payload (payload − retransmitted) per library→hv1 flow on rack1's
/// upstream port.
fn library_flows(lab: &Lab) -> BTreeMap<(String, String), u64> {
    let hv1 = format!("{}:", lab.addr4("hv1"));
    lab.status("rack1")
        .expect("status")
        .flows
        .into_iter()
        .filter(|f| f.interface == "core" && f.dst.starts_with(&hv1))
        .map(|f| ((f.src, f.dst), f.payload_bytes - f.retrans_bytes))
        .collect()
}

fn moved_since(before: &BTreeMap<(String, String), u64>, lab: &Lab) -> u64 {
    library_flows(lab)
        .into_iter()
        .map(|(k, v)| v.saturating_sub(before.get(&k).copied().unwrap_or(0)))
        .sum()
}

fn copy(lab: &Lab, url: &str, name: &str) -> Vec<u8> {
    lab.qemu_copy("hv1", url, name, "rack1")
}

fn cold_then_warm(design: &str) {
    let (mut lab, data, url, opts) = served_lab(design);
    lab.start_appliance("rack1", opts).expect("appliance");
    let size = data.len() as u64;
    let nonzero = manifest_of("img", &data, BLOCK)
        .blocks
        .iter()
        .filter(|b| b.is_some())
        .count() as u64
        * u64::from(BLOCK);

    let before = library_flows(&lab);
    let cold = copy(&lab, &url, "cold");
    assert!(cold == data, "cold copy differs from the LUN");
    let cold_moved = moved_since(&before, &lab);
    let s = lab.status("rack1").expect("status").splicer;
    eprintln!(
        "{design} cold: library link {cold_moved} B for a {size} B image ({nonzero} B in non-zero blocks); {s:?}"
    );
    assert!(s.learned_blocks > 0, "nothing learned: {s:?}");
    assert!(s.zero_blocks > 0, "no zero block served cold: {s:?}");
    assert!(
        cold_moved <= nonzero + size / 100,
        "cold copy moved {cold_moved} B over the library link; non-zero {nonzero} B"
    );

    let before = library_flows(&lab);
    let warm = copy(&lab, &url, "warm");
    assert!(warm == data, "warm copy differs from the LUN");
    let warm_moved = moved_since(&before, &lab);
    let s2 = lab.status("rack1").expect("status").splicer;
    eprintln!("{design} warm: library link {warm_moved} B for a {size} B image; {s2:?}");
    assert!(
        warm_moved < size / 100,
        "warm copy moved {warm_moved} B over the library link (image {size} B)"
    );
    assert!(
        s2.cache_bytes > s.cache_bytes,
        "warm copy not served from the cache"
    );
    let served = match design {
        "local" => s2.reads_served_local,
        _ => s2.reads_served_shadow,
    };
    assert!(served > 0, "no READ served in the {design} design: {s2:?}");
    assert_eq!(s2.verify_failures, 0);
    assert_eq!(s2.protocol_errors, 0);
}

#[test]
fn shadow_copy_cold_and_warm() {
    cold_then_warm("shadow");
}

#[test]
fn local_copy_cold_and_warm() {
    cold_then_warm("local");
}

/// The suite against the served (read-only) LUN: direct, then through the
/// appliance with a cold cache (empty at the start: READs pass through and their
/// blocks are learned as the suite goes) and with a warm one (primed by a copy, so
/// every READ is served) must give identical per-test results.
fn conformance_served(design: &str) {
    let (mut lab, _data, url, opts) = served_lab(design);
    let dir = |lab: &Lab, n: &str| lab.dir.path().join(format!("cu-{design}-{n}"));
    let (direct, _) = conformance::run(&lab, "hv1", &url, &dir(&lab, "direct")).expect("direct");
    eprintln!("direct: {:?}", conformance::summary(&direct));
    lab.start_appliance("rack1", opts).expect("appliance");
    let mut served_before = 0;
    for pass in ["cold", "warm"] {
        if pass == "warm" {
            // Warm the cache with a copy so the suite's READs are served.
            let _ = copy(&lab, &url, "prime");
            let s = lab.status("rack1").expect("status").splicer;
            served_before = s.reads_served_shadow + s.reads_served_local;
        } else {
            let s = lab.status("rack1").expect("status").splicer;
            let held = s.cache.as_ref().map_or(0, |c| c.blocks);
            assert_eq!(held, 0, "the cold pass starts with an empty cache: {s:?}");
        }
        let (through, _) = conformance::run(&lab, "hv1", &url, &dir(&lab, pass)).expect("through");
        let diff = conformance::differences(&direct, &through);
        let s = lab.status("rack1").expect("status").splicer;
        eprintln!(
            "{design} {pass}: {:?}; {s:?}",
            conformance::summary(&through)
        );
        assert!(
            diff.is_empty(),
            "{design} {pass}: {} tests differ from direct:\n{}",
            diff.len(),
            diff.join("\n")
        );
        assert_eq!(s.protocol_errors, 0);
        // The suite's commands that carry data but write nothing (READ with the
        // W bit, VERIFY with BYTCHK, persistent reservations, mode pages) must not
        // stop the LUN from being served.
        assert!(
            s.luns.iter().all(|l| l.served),
            "{design} {pass}: the LUN stopped being served: {:?}",
            s.luns
        );
        if pass == "cold" {
            assert!(s.learned_blocks > 0, "the cold pass learned nothing: {s:?}");
        } else {
            assert!(
                s.reads_served_shadow + s.reads_served_local > served_before,
                "the warm pass served nothing: {s:?}"
            );
        }
    }
}

#[test]
fn conformance_shadow_matches_direct() {
    conformance_served("shadow");
}

#[test]
fn conformance_local_matches_direct() {
    conformance_served("local");
}

/// Export `data` as `iqn` LUN 1 with 4096-byte logical blocks (read-only, any
/// initiator): what a 4Kn image store does.
fn export_4k(lab: &mut Lab, iqn: &str, data: &[u8]) -> String {
    let backing = lab.write_file("img4k.raw", data).expect("backing");
    let backing = backing.to_string_lossy().into_owned();
    lab.tgtadm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn])
        .expect("target");
    lab.tgtadm(&[
        "--op",
        "new",
        "--mode",
        "logicalunit",
        "--tid",
        "1",
        "--lun",
        "1",
        "-b",
        &backing,
        "--blocksize",
        "4096",
    ])
    .expect("lun");
    lab.tgtadm(&[
        "--op",
        "update",
        "--mode",
        "logicalunit",
        "--tid",
        "1",
        "--lun",
        "1",
        "--params",
        "readonly=1",
    ])
    .expect("readonly");
    lab.tgtadm(&[
        "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
    ])
    .expect("bind");
    lab.lun_url(iqn, 1)
}

/// rack1's config serving `IQN_4K` LUN 1 (shadow design, manifest file), with
/// `logical_block_size` declared or not.
fn options_4k(lab: &Lab, data: &[u8], declared: Option<u32>) -> ApplianceOptions {
    let manifest = manifest_of("img4k", data, BLOCK);
    let path = lab
        .write_file("img4k.manifest", manifest_to_text(&manifest).as_bytes())
        .expect("manifest");
    let declared = declared
        .map(|d| format!("logical_block_size = {d}\n"))
        .unwrap_or_default();
    ApplianceOptions {
        steer: true,
        extra_config: format!(
            "\n[splicer]\ncache_bytes = {}\n\n[[splicer.lun]]\ntarget = {IQN_4K:?}\nlun = 1\ndesign = \"shadow\"\nmanifest = {:?}\n{declared}",
            256u64 << 20,
            path.display().to_string()
        ),
    }
}

const IQN_4K: &str = "iqn.2026-12.test.nearblock:lun4k";

/// A LUN exported with 4096-byte blocks. The block length is the target's: with
/// none declared, or 4096 declared, the LUN is served and copies are bit-identical
/// (before, a config left at the default 512 served LBA × 512 offsets: wrong bytes
/// with GOOD status); declared 512, it is not served, status says why, and copies
/// pass through bit-identical.
#[test]
fn block_length_comes_from_the_target() {
    let mut lab = Lab::default_topology().expect("lab");
    let data = test_image();
    let url = export_4k(&mut lab, IQN_4K, &data);
    for declared in [None, Some(4096), Some(512)] {
        lab.start_appliance("rack1", options_4k(&lab, &data, declared))
            .expect("appliance");
        for pass in ["cold", "warm"] {
            let copy = copy(&lab, &url, &format!("4k-{declared:?}-{pass}"));
            assert!(
                copy == data,
                "{declared:?} {pass}: the copy differs from the LUN"
            );
        }
        let s = lab.status("rack1").expect("status").splicer;
        let lun = &s.luns[0];
        eprintln!(
            "declared {declared:?}: {lun:?}; served {}",
            s.reads_served_shadow
        );
        assert_eq!(lun.target_facts.block_length, Some(4096), "{lun:?}");
        if declared == Some(512) {
            assert!(!lun.served, "{lun:?}");
            assert!(
                lun.why
                    .as_deref()
                    .is_some_and(|w| w.contains("512") && w.contains("4096")),
                "{lun:?}"
            );
            assert_eq!(s.reads_served_shadow, 0);
        } else {
            assert!(lun.served, "{lun:?}");
            assert!(s.reads_served_shadow > 0, "warm copy served: {s:?}");
        }
        assert_eq!(s.verify_failures, 0);
        lab.stop_appliance("rack1", std::time::Duration::from_secs(10))
            .expect("stop");
    }
}

/// The conformance suite on the 4096-byte LUN through the appliance (block length
/// not declared, warm cache) gives the same per-test results as direct.
#[test]
fn conformance_4k_matches_direct() {
    let mut lab = Lab::default_topology().expect("lab");
    let data = test_image();
    let url = export_4k(&mut lab, IQN_4K, &data);
    let dir = |lab: &Lab, n: &str| lab.dir.path().join(format!("cu-4k-{n}"));
    let (direct, _) = conformance::run(&lab, "hv1", &url, &dir(&lab, "direct")).expect("direct");
    lab.start_appliance("rack1", options_4k(&lab, &data, None))
        .expect("appliance");
    let _ = copy(&lab, &url, "prime");
    let before = lab
        .status("rack1")
        .expect("status")
        .splicer
        .reads_served_shadow;
    let (through, _) = conformance::run(&lab, "hv1", &url, &dir(&lab, "warm")).expect("through");
    let diff = conformance::differences(&direct, &through);
    let s = lab.status("rack1").expect("status").splicer;
    eprintln!("4k warm: {:?}; {s:?}", conformance::summary(&through));
    assert!(
        diff.is_empty(),
        "4k: {} tests differ from direct:\n{}",
        diff.len(),
        diff.join("\n")
    );
    assert!(s.luns.iter().all(|l| l.served), "{:?}", s.luns);
    assert!(
        s.reads_served_shadow > before,
        "the suite's READs were served: {s:?}"
    );
}
