//! The operator's console in a real browser (issue 14): headless Chromium,
//! driven by playwright-core (`tests/console/console-test.cjs`), against a
//! live lab (`library ─ core ─ rack1, rack2 ─ hv1..hv4`; core's appliance runs
//! the manager and serves the console; rack1 runs a monitor-only appliance the
//! manager polls for the Network page).
//!
//! hv1 holds a VM of the library's image (so `best` ranks it first); the
//! agents pin hv1..hv4's CPU at 0.9, 0.1, 0.5, 0.2 (so `top:3:cpu` picks hv2).
//! With the read token the browser sees each page with the lab's names,
//! changes the policy and sees the ranking change, and is refused placing;
//! with the admin token it places a VM on hv2 and watches its job reach
//! `done`. The test then checks the built disk is bit-identical to the image.
//! Screenshots of each page go to `NEARBLOCK_ARTIFACTS` (default
//! `/var/cache/nearblock/artifacts`)`/console/`.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use nearblock_lab::{content, fabric::Fabric, toml_path, ApplianceOptions, Lab, LunSpec};
use serde_json::{json, Value};

const IQN: &str = "iqn.2026-12.test.nearblock:console";
const AGENT_PORT: u16 = 7360;
const INDEXER_PORT: u16 = 7361;
const IMAGE_BYTES: usize = 16 << 20;
const DEFAULT_TOPOLOGY: &str = include_str!("../topologies/default.toml");
const CHROMIUM: &str = "/usr/bin/chromium";

/// Where `cargo xtask bootstrap` installs playwright-core.
fn browser_dir() -> PathBuf {
    std::env::var_os("NEARBLOCK_BROWSER_DIR")
        .map_or_else(|| "/var/cache/nearblock/browser".into(), PathBuf::from)
}

fn artifacts() -> PathBuf {
    std::env::var_os("NEARBLOCK_ARTIFACTS")
        .map_or_else(|| "/var/cache/nearblock/artifacts".into(), PathBuf::from)
        .join("console")
}

fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: the lab, the browser, the disk"
)]
fn the_console_shows_the_lab_reranks_places_and_follows_the_build() {
    let modules = browser_dir().join("node_modules");
    assert!(
        Path::new(CHROMIUM).exists() && modules.join("playwright-core").exists(),
        "the browser test needs {CHROMIUM} and playwright-core in {}: run `cargo xtask bootstrap`",
        modules.display()
    );
    let lab = Lab::new(DEFAULT_TOPOLOGY).expect("lab");
    let topo = lab
        .write_file("topology.toml", DEFAULT_TOPOLOGY.as_bytes())
        .unwrap();
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    let mut lab = lab;
    let image = content::image(IMAGE_BYTES, 1414, 20);
    let lib = lab.write_file("lib.raw", &image).unwrap();
    lab.add_lun(LunSpec::read_only(IQN, lib)).unwrap();
    let image_name = format!("{IQN}/1");

    // core: the manager, polling rack1's appliance for the Network page.
    let rack1_api = format!("{}:7878", lab.addr4("rack1"));
    let peer_token = toml_path(&lab.api_read_token_file());
    fabric
        .start_manager_with(
            &mut lab,
            "core",
            &topo,
            "stale_secs = 5\nindex_wait_secs = 60",
            &format!(
                "peers = [\"{rack1_api}\"]\npeer_token_file = {peer_token}\npoll_interval_ms = 1000"
            ),
        )
        .expect("core");
    for rack in ["rack1", "rack2"] {
        fabric.start_indexer(&lab, rack, Some("core")).unwrap();
    }
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            steer: false,
            extra_config: "[api]\nlisten = \"0.0.0.0:7878\"\n".into(),
        },
    )
    .expect("rack1");
    fabric.start_library_agent(&lab, "core").unwrap();
    let vm_dir = |hv: &str| lab.dir.path().join(format!("vms-{hv}"));
    for (hv, rack, cpu) in [
        ("hv1", "rack1", 0.9),
        ("hv2", "rack1", 0.1),
        ("hv3", "rack2", 0.5),
        ("hv4", "rack2", 0.2),
    ] {
        std::fs::create_dir_all(vm_dir(hv)).unwrap();
        if hv == "hv1" {
            std::fs::write(vm_dir(hv).join("stored1.raw"), &image).unwrap();
            std::fs::write(
                vm_dir(hv).join("stored1.vm.json"),
                json!({"image": image_name, "size": image.len(), "state": "stored"}).to_string(),
            )
            .unwrap();
        }
        fabric
            .start_hypervisor(&lab, hv, rack, &vm_dir(hv), "core", (cpu, 0.3), 1 << 34)
            .unwrap();
    }
    // The library's image and hv1's VM indexed: the ranking is meaningful.
    let read = lab.api_read_token_file();
    within(
        Duration::from_mins(2),
        "the image and stored1 indexed",
        || {
            let inv = nearblock_lab::vmlab::vm_json(&lab, "core", &read, &["list", "--json"])
                .unwrap_or(Value::Null);
            let vm_indexed = inv["vms"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|v| v["name"] == "stored1" && v["indexed"] == true)
            });
            let image_indexed = inv["images"]
                .as_array()
                .is_some_and(|i| i.iter().any(|i| i["image"] == image_name.as_str()));
            let reporting = inv["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().filter(|h| h["reporting"] == true).count() == 4);
            vm_indexed && image_indexed && reporting
        },
    );

    // The browser, in core's namespace (the console is at core's loopback).
    let shots = artifacts();
    std::fs::create_dir_all(&shots).unwrap();
    let user_data = lab.dir.path().join("chromium-profile");
    let cfg = json!({
        "url": "http://127.0.0.1:7878/console/",
        "readToken": lab.api_read_token().unwrap(),
        "adminToken": std::fs::read_to_string(lab.api_admin_token_file()).unwrap().lines().next().unwrap().trim(),
        "image": image_name,
        "storedVm": "stored1",
        "vm": "web-console",
        "hosts": ["hv1", "hv2", "hv3", "hv4"],
        "links": ["library-core", "core-rack1", "rack1-hv1", "rack2-hv4"],
        "appliances": ["core", "rack1"],
        "best": "hv1",
        "topCpu": "hv2",
        "shots": shots,
        "userDataDir": user_data,
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("console/console-test.cjs");
    let out = lab
        .cmd(
            "core",
            &[
                "timeout",
                "300",
                "node",
                script.to_str().unwrap(),
                &cfg.to_string(),
            ],
        )
        .env("NODE_PATH", &modules)
        .env("HOME", lab.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the browser test failed ({}); screenshots in {}",
        out.status,
        shots.display()
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("the script's result line");
    assert_eq!(result["target"], "hv2", "{result}");
    for page in ["inventory", "place", "network", "job", "jobs"] {
        let shot = shots.join(format!("{page}.png"));
        let len = std::fs::metadata(&shot).map_or(0, |m| m.len());
        assert!(len > 10_000, "{}: {len} bytes", shot.display());
    }
    eprintln!("screenshots in {}", shots.display());

    // The VM the browser placed: bit-identical to the library's image.
    let built = std::fs::read(vm_dir("hv2").join("web-console.raw")).unwrap_or_else(|e| {
        let listing: Vec<_> = std::fs::read_dir(vm_dir("hv2"))
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let job = nearblock_lab::vmlab::vm_json(&lab, "core", &read, &["job", "1", "--json"]);
        panic!("hv2's web-console.raw: {e}; hv2 holds {listing:?}; job: {job:?}")
    });
    assert!(built == image, "hv2's web-console.raw is not the image");

    // The manager's `/metrics` has the series docs/operations.md lists for
    // it, and no undocumented manager series; the finished job is counted.
    let text = lab.metrics("core").unwrap();
    let exported = nearblock_lab::metric_names(&text);
    let manager = nearblock_lab::documented_manager_metric_names().unwrap();
    let base = nearblock_lab::documented_metric_names().unwrap();
    let missing: Vec<_> = manager.difference(&exported).collect();
    let undocumented: Vec<_> = exported
        .iter()
        .filter(|n| !manager.contains(*n) && !base.contains(*n))
        .collect();
    assert!(
        missing.is_empty() && undocumented.is_empty(),
        "manager metrics missing: {missing:?}; undocumented: {undocumented:?}"
    );
    assert!(
        text.contains("nearblock_jobs{kind=\"place\",state=\"done\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("nearblock_job_duration_seconds_count{kind=\"place\",state=\"done\"} 1"),
        "{text}"
    );
}
