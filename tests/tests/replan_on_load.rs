//! A build re-plans when a link of its plan gets loaded by others (issue 12).
//!
//! `tests/topologies/load.toml`: the library's uplink is shaped to 200 Mbit/s
//! and weighs 0.5, so while idle it is the cheap way to hv1; hv2 (another rack)
//! holds a copy of the image. hv1 builds the image; once blocks flow, iperf3
//! (3 UDP streams of 200 Mbit/s, library → hv2: UDP does not back off) loads the library's uplink. core's appliance
//! measures the link at its cap with this build's share under half: the job
//! re-plans with the live link costs and takes the rest from hv2's copy; the
//! disk is the image, byte for byte.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use nearblock_lab::{content, fabric::Fabric, toml_path, Lab, LunSpec, LOAD_TOPOLOGY};
use serde_json::Value;

const IQN: &str = "iqn.2026-12.test.nearblock:load";
const AGENT_PORT: u16 = 7330;
const INDEXER_PORT: u16 = 7331;
const IMAGE_BYTES: usize = 256 << 20;

/// Kills the background load however the test ends.
struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn vm(lab: &Lab, token: &std::path::Path, words: &[&str]) -> Value {
    nearblock_lab::vmlab::vm_json(lab, "core", token, words).unwrap()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: the lab, the build, the load, the re-plan"
)]
fn a_build_replans_around_a_loaded_link() {
    let lab = Lab::new(LOAD_TOPOLOGY).expect("lab");
    let topo = lab
        .write_file("topology.toml", LOAD_TOPOLOGY.as_bytes())
        .unwrap();
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    let mut lab = lab;
    let image = content::image(IMAGE_BYTES, 777, 5);
    let lib_path = lab.write_file("lib.raw", &image).unwrap();
    lab.add_lun(LunSpec::read_only(IQN, lib_path)).unwrap();
    // hv2's copy of the image, a stored VM.
    let hv2_dir = lab.dir.path().join("vms-hv2");
    std::fs::create_dir_all(&hv2_dir).unwrap();
    std::fs::write(hv2_dir.join("copy.raw"), &image).unwrap();
    std::fs::write(
        hv2_dir.join("copy.vm.json"),
        serde_json::json!({"image": format!("{IQN}/1"), "size": IMAGE_BYTES, "state": "stored"})
            .to_string(),
    )
    .unwrap();

    fabric
        .start_manager(&mut lab, "core", &topo, "")
        .expect("core");
    for rack in ["rack1", "rack2"] {
        fabric.start_indexer(&lab, rack, Some("core")).unwrap();
    }
    for (hv, rack) in [("hv1", "rack1"), ("hv2", "rack2")] {
        let extra = format!(
            "metrics_interval_ms = 200\n[hypervisor]\nvm_dir = {}\nmanagers = [\"core\"]\n[resources]\ndisk_free_bytes = {}\n",
            toml_path(&lab.dir.path().join(format!("vms-{hv}"))),
            1u64 << 36
        );
        fabric.start_agent(&lab, hv, rack, &[], &extra).unwrap();
    }
    fabric.start_library_agent(&lab, "core").unwrap();
    let read = lab.api_read_token_file();
    let admin = lab.api_admin_token_file();
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let inv = vm(&lab, &read, &["list", "--json"]);
        let indexed = |name: &str| {
            inv["vms"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v["name"] == name && v["indexed"] == true))
        };
        let library = inv["images"]
            .as_array()
            .is_some_and(|i| i.iter().any(|i| i["host"] == "library"));
        if indexed("copy") && library {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not indexed within 60 s: {inv:#}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // The load's receiver, then the build, then the load once blocks flow.
    let mut load = Killed(Vec::new());
    load.0.push(
        lab.cmd("hv2", &["iperf3", "-s", "-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = lab.exec("hv2", &["ss", "-ltnH", "sport = :5201"]).unwrap();
        if !String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "iperf3 -s is not listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    let job = vm(
        &lab,
        &admin,
        &[
            "place",
            &format!("{IQN}/1"),
            "--name",
            "built",
            "--within",
            "hv1",
            "--json",
        ],
    );
    let id = job["id"].as_u64().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = vm(&lab, &read, &["job", &id, "--json"]);
        if j["progress"]["blocks_done"].as_u64() > Some(0) {
            let plan = &j["plan"]["by_source"];
            assert!(
                plan.get("library").is_some(),
                "the first plan uses the library: {j:#}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the build did not start: {j:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let hv2 = lab.addr4("hv2").to_string();
    load.0.push(
        lab.cmd(
            "library",
            &[
                "iperf3", "-c", &hv2, "-t", "30", "-u", "-b", "200M", "-P", "3", "-i", "1",
            ],
        )
        .stdout(std::fs::File::create(lab.dir.path().join("iperf.log")).unwrap())
        .stderr(std::fs::File::create(lab.dir.path().join("iperf.err")).unwrap())
        .spawn()
        .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_mins(2);
    let job = loop {
        let j = vm(&lab, &read, &["job", &id, "--json"]);
        if !matches!(
            j["state"].as_str(),
            Some("placing" | "building" | "indexing")
        ) {
            break j;
        }
        assert!(Instant::now() < deadline, "the job did not end: {j:#}");
        std::thread::sleep(Duration::from_millis(250));
    };
    drop(load);
    let events: Vec<&str> = job["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    eprintln!("{}", events.join("\n"));
    assert_eq!(job["state"], "done", "{job:#}");
    assert!(
        events
            .iter()
            .any(|e| e.contains("link library-core") && e.contains("re-planning")),
        "no re-plan on load: {job:#}\niperf3: {}{}",
        std::fs::read_to_string(lab.dir.path().join("iperf.log")).unwrap_or_default(),
        std::fs::read_to_string(lab.dir.path().join("iperf.err")).unwrap_or_default()
    );
    let by_source = job["progress"]["by_source"].as_object().unwrap();
    assert!(
        by_source.get("hv2").and_then(|s| s["blocks"].as_u64()) > Some(0),
        "nothing came from hv2 after the re-plan: {job:#}"
    );
    let built = std::fs::read(lab.dir.path().join("vms-hv1/built.raw")).unwrap();
    assert!(built == image, "the built disk is not the image");
}
