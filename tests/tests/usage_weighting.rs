//! Usage-weighted placement (issue 12) on a real boot's reads: the access
//! history `cargo xtask test` records once per machine (corpus image b booted
//! under qemu-system through an appliance, `tests/src/bin/record-boot.rs`).
//!
//! The 3 racks × 3 hypervisors lab; the library exports image b; core's
//! manager reads the history. hv1 holds a VM with every block of b that the
//! boot did not read, hv4 one with only the blocks it read. Without weighting
//! hv1 ranks first (it holds most of the image); priced by the probability of
//! each block being read, hv4 does (it holds everything a boot reads). Mode
//! transparent uses the weighting by default.

use std::{
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nearblock::plan::AccessHistory;
use nearblock_lab::{fabric::Fabric, toml_path, Lab, LunSpec, THREE_RACKS_TOPOLOGY};
use serde_json::Value;

const IQN: &str = "iqn.2026-12.test.nearblock:usage";
const AGENT_PORT: u16 = 7310;
const INDEXER_PORT: u16 = 7311;
const BLOCK: usize = 4096;
/// Where `cargo xtask test` keeps the recorded boot, in the corpus directory
/// (xtask's `BOOT_HISTORY`).
const BOOT_HISTORY: &str = "history/b-bookworm-cloud.boot.history.json";

fn corpus_dir() -> PathBuf {
    std::env::var_os("NEARBLOCK_CORPUS_DIR")
        .map_or_else(|| "/var/cache/nearblock/corpus".into(), PathBuf::from)
}

/// A sparse raw file of `size` bytes holding `image`'s blocks where `keep`
/// says so (zero elsewhere).
fn write_partial(path: &Path, image: &[u8], keep: impl Fn(usize) -> bool) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(image.len() as u64).unwrap();
    for (i, b) in image.chunks(BLOCK).enumerate() {
        if keep(i) && b.iter().any(|&x| x != 0) {
            f.seek(SeekFrom::Start((i * BLOCK) as u64)).unwrap();
            f.write_all(b).unwrap();
        }
    }
    f.sync_all().unwrap();
}

fn vm_state(dir: &Path, name: &str, size: usize) {
    std::fs::write(
        dir.join(format!("{name}.vm.json")),
        serde_json::json!({"image": format!("{IQN}/1"), "size": size, "state": "stored"})
            .to_string(),
    )
    .unwrap();
}

#[test]
#[cfg_attr(
    not(nearblock_corpus),
    ignore = "needs the corpus: build and run with NEARBLOCK_CORPUS_DIR"
)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: the lab, the holdings, the rankings"
)]
fn a_real_boots_reads_change_the_ranking() {
    let history_file = corpus_dir().join(BOOT_HISTORY);
    let history: AccessHistory =
        serde_json::from_slice(&std::fs::read(&history_file).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (`cargo xtask test` records it)",
                history_file.display()
            )
        }))
        .unwrap();
    let image_path = corpus_dir().join("images/b-bookworm-cloud.raw");
    let image = std::fs::read(&image_path).unwrap();
    let nonzero = image
        .chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    // A partial reader: some, not all, of the image.
    assert!(history.boots >= 1);
    let read = history.blocks.len();
    assert!(
        read > 100 && read < nonzero / 2,
        "{read} blocks read of {nonzero}"
    );
    eprintln!(
        "boot history: {} boot(s), {read} distinct blocks read of {nonzero} non-zero",
        history.boots
    );

    let lab = Lab::new(THREE_RACKS_TOPOLOGY).expect("lab");
    let topo = lab
        .write_file("topology.toml", THREE_RACKS_TOPOLOGY.as_bytes())
        .unwrap();
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    let mut lab = lab;
    lab.add_lun(LunSpec::read_only(IQN, image_path.clone()))
        .unwrap();
    // The manager's history directory: the recorded boot under this LUN's name.
    let history_dir = lab.dir.path().join("history");
    std::fs::create_dir_all(&history_dir).unwrap();
    std::fs::copy(
        &history_file,
        nearblock::splice::catalog::history_path(&history_dir, IQN, 1),
    )
    .unwrap();
    let manager_lines = format!(
        "history_dir = {}\nlibrary_portal = \"{}:3260\"",
        toml_path(&history_dir),
        lab.addr4("library")
    );
    fabric
        .start_manager(&mut lab, "core", &topo, &manager_lines)
        .expect("core");
    for rack in ["rack1", "rack2"] {
        fabric.start_indexer(&lab, rack, Some("core")).unwrap();
    }
    // hv1: what the boot did not read; hv4: only what it read.
    let read_at = |i: usize| history.blocks.contains_key(&(i as u64));
    for (hv, rack, name, keep_read) in [
        ("hv1", "rack1", "unread", false),
        ("hv4", "rack2", "read", true),
    ] {
        let dir = lab.dir.path().join(format!("vms-{hv}"));
        std::fs::create_dir_all(&dir).unwrap();
        write_partial(&dir.join(format!("{name}.raw")), &image, |i| {
            read_at(i) == keep_read
        });
        vm_state(&dir, name, image.len());
        let extra = format!(
            "metrics_interval_ms = 200\n[hypervisor]\nvm_dir = {}\nmanagers = [\"core\"]\n[resources]\ndisk_free_bytes = {}\n",
            toml_path(&dir),
            1u64 << 36
        );
        fabric.start_agent(&lab, hv, rack, &[], &extra).unwrap();
    }
    fabric.start_library_agent(&lab, "core").unwrap();

    let bin = nearblock_lab::nearblock_bin().unwrap();
    let token = lab.api_read_token_file().display().to_string();
    let targets = |extra: &[&str]| -> Result<Value, String> {
        let image = format!("{IQN}/1");
        let mut argv = vec![
            bin.to_str().unwrap(),
            "vm",
            "--token-file",
            &token,
            "targets",
            &image,
            "--within",
            "hv1,hv4",
            "--json",
        ];
        argv.extend_from_slice(extra);
        let o = lab.exec("core", &argv).unwrap();
        if o.status.success() {
            Ok(serde_json::from_slice(&o.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    };
    let order = |t: &Value| -> Vec<(String, f64)> {
        t["placement"]["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["host"].as_str().unwrap().to_owned(),
                    c["total_cost"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect()
    };
    // Wait (bounded) until both VMs are indexed: both rank with some blocks local.
    let deadline = Instant::now() + Duration::from_mins(2);
    let unweighted = loop {
        if let Ok(t) = targets(&["--weighting", "none"]) {
            let all_local = t["placement"]["candidates"].as_array().is_some_and(|c| {
                c.len() == 2 && c.iter().all(|c| c["blocks_local"].as_u64() > Some(0))
            });
            if all_local {
                break t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the VMs were not indexed within 120 s: {:?}\n{}",
            targets(&["--weighting", "none"]),
            lab.appliance_log("core")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let weighted = targets(&["--weighting", "usage"]).unwrap();
    let transparent = targets(&["--mode", "transparent"]).unwrap();
    eprintln!(
        "unweighted: {:?}\nweighted: {:?}\n{}",
        order(&unweighted),
        order(&weighted),
        weighted["notes"]
    );
    assert_eq!(unweighted["weighting"], "none");
    assert_eq!(order(&unweighted)[0].0, "hv1", "{unweighted:#}");
    assert_eq!(weighted["weighting"], "usage");
    assert_eq!(order(&weighted)[0].0, "hv4", "{weighted:#}");
    // hv4 holds every block a boot reads: nothing it reads is fetched.
    assert!(order(&weighted)[0].1 < 1e-9, "{weighted:#}");
    assert!(
        weighted["notes"].to_string().contains("priced by usage"),
        "{weighted:#}"
    );
    // Transparent placements are priced by usage by default.
    assert_eq!(transparent["weighting"], "usage");
    assert_eq!(order(&transparent), order(&weighted));
    // Usage asked for an image without a history: a clear error.
    let o = lab
        .exec(
            "core",
            &[
                bin.to_str().unwrap(),
                "vm",
                "--token-file",
                &token,
                "targets",
                "vm/unread",
                "--weighting",
                "usage",
            ],
        )
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("history"), "{e}");
}
