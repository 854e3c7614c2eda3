//! The rack appliance runs its indexer in-process (`[indexer]`): hypervisor agents
//! push their images into the appliance's own index store, and the appliance's
//! planner API answers from it live. The agents also report their host's load,
//! which placement uses over the `[planner] metrics` file while it is fresh. Run
//! as root.

use std::time::{Duration, Instant};

use nearblock::splice::catalog::{manifest_of, manifest_to_text};
use nearblock_lab::{
    content, fabric::Fabric, procs::Procs, ApplianceOptions, Lab, LunSpec, DEFAULT_TOPOLOGY,
};

const IQN: &str = "iqn.2026-11.test.nearblock:rack-indexer";

const INDEXER_PORT: u16 = 7100;
const AGENT_PORT: u16 = 7200;
/// `[planner] metrics_stale_secs` of rack1.
const STALE_SECS: u64 = 3;

/// `GET http://127.0.0.1:7878{path}` inside `node` with the lab's read token:
/// (HTTP status, body).
fn get(lab: &Lab, node: &str, path: &str) -> (u16, String) {
    let token_file = lab.api_read_token_file();
    #[expect(
        clippy::unnecessary_debug_formatting,
        reason = "Debug quotes the path as a Python string literal"
    )]
    let script = format!(
        "import urllib.request,urllib.error,sys\n\
         req=urllib.request.Request('http://127.0.0.1:7878{path}', headers={{'Authorization': 'Bearer '+open({token_file:?}).read().split()[0]}})\n\
         try:\n    r=urllib.request.urlopen(req, timeout=5); print(r.status); sys.stdout.write(r.read().decode())\n\
         except urllib.error.HTTPError as e:\n    print(e.code); sys.stdout.write(e.read().decode())\n"
    );
    let o = lab
        .exec_ok(node, &["python3", "-c", &script])
        .expect("API call");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (code, body) = text.split_once('\n').unwrap_or((&text, ""));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
#[expect(
    clippy::float_cmp,
    reason = "costs of whole hop counts times block counts are exact in f64"
)]
#[expect(
    clippy::many_single_char_names,
    reason = "a scenario's short-lived results (o, v, …) beside its images"
)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: each step checks what the one before set up"
)]
fn agents_push_into_the_rack_appliance_and_its_planner_uses_them() {
    let mut lab = Lab::default_topology().expect("lab");
    let topo = lab
        .write_file("topology.toml", DEFAULT_TOPOLOGY.as_bytes())
        .unwrap();
    // The lab's keys and peers file (the processes are started here, by hand).
    let fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    // hv1 runs the image; hv2 holds its first half (another VM of the same seed).
    let img = content::image(4 << 20, 21, 30);
    let img_path = lab.write_file("img.raw", &img).unwrap();
    let half_path = lab.write_file("vm2.raw", &img[..img.len() / 2]).unwrap();

    let indexer_cfg = lab
        .write_file(
            "rack1-indexer.toml",
            format!(
                "node = \"rack1\"\nlisten = \"0.0.0.0:{INDEXER_PORT}\"\n{}db = {:?}\npush_interval_ms = 200\n",
                fabric.credential_lines("rack1"),
                lab.dir.path().join("rack1.redb").display().to_string()
            )
            .as_bytes(),
        )
        .unwrap();
    // The library exports the image read-only; rack1 serves it (learning into its
    // cache from the library's Data-In).
    lab.add_lun(LunSpec::read_only(IQN, img_path.clone()))
        .unwrap();
    let manifest = lab
        .write_file(
            "img.manifest",
            manifest_to_text(&manifest_of("img", &img, 4096)).as_bytes(),
        )
        .unwrap();
    // The static metrics say the opposite of what the agents will report.
    let hosts = lab
        .write_file(
            "hosts.toml",
            b"[host.hv1]\ncpu = 0.05\n[host.hv2]\ncpu = 0.95\n",
        )
        .unwrap();
    let extra_config = format!(
        "[splicer]\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\nmanifest = {:?}\n[cost]\ntopology = {:?}\n[planner]\nmetrics = {:?}\nmetrics_stale_secs = {STALE_SECS}\n[indexer]\nconfig = {:?}\n",
        manifest.display().to_string(),
        topo.display().to_string(),
        hosts.display().to_string(),
        indexer_cfg.display().to_string()
    );
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            steer: true,
            extra_config,
        },
    )
    .expect("rack1");

    let mut procs = Procs::new();
    // Each agent pins its cpu (so the policy's choice is known) and measures mem
    // and disk.
    for (node, image, path, cpu) in [
        ("hv1", "img", &img_path, 0.9),
        ("hv2", "vm2", &half_path, 0.1),
    ] {
        let parent = lab.port_toward("rack1", node).unwrap().v4;
        let addr = lab.addr4(node);
        let cfg = lab
            .write_file(
                &format!("agent-{node}.toml"),
                format!(
                    "node = \"{node}\"\nlisten = \"0.0.0.0:{AGENT_PORT}\"\nadvertise = \"{addr}:{AGENT_PORT}\"\n{}db = {:?}\nparent = \"{parent}:{INDEXER_PORT}\"\nrescan_secs = 3600\npush_interval_ms = 200\nmetrics_interval_ms = 200\n[[image]]\nname = \"{image}\"\npath = {:?}\n[metrics]\ncpu = {cpu}\n",
                    fabric.credential_lines(node),
                    lab.dir.path().join(format!("agent-{node}.redb")).display().to_string(),
                    path.display().to_string()
                )
                .as_bytes(),
            )
            .unwrap();
        procs
            .spawn(
                &lab,
                &format!("agent-{node}"),
                node,
                &["agent", "--config", cfg.to_str().unwrap()],
            )
            .unwrap();
    }

    // Until both agents' images have arrived, the plan for hv2 is incomplete.
    let deadline = Instant::now() + Duration::from_secs(20);
    let plan = loop {
        let (code, body) = get(
            &lab,
            "rack1",
            "/plan/construct?image=img&target=hv2&pricing=static",
        );
        if code == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["blocks_local"].as_u64().unwrap_or(0) > 0 {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "agents' images never reached rack1's index: {code} {body}\n{}\n{}",
            procs.log("agent-hv1"),
            lab.appliance_log("rack1")
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // Independently: the distinct non-zero 4 KiB blocks of each half.
    let distinct = |data: &[u8]| {
        data.chunks(4096)
            .filter(|b| b.iter().any(|&x| x != 0))
            .map(|b| *blake3::hash(b).as_bytes())
            .collect::<std::collections::BTreeSet<[u8; 32]>>()
    };
    let first = distinct(&img[..img.len() / 2]);
    let all = distinct(&img);
    let only_second: usize = all.difference(&first).count();
    assert_eq!(
        plan["blocks_local"].as_u64().unwrap() as usize,
        first.len(),
        "{plan}"
    );
    assert_eq!(
        plan["blocks_fetched"].as_u64().unwrap() as usize,
        only_second,
        "{plan}"
    );
    // Everything hv2 lacks comes from hv1, its rack neighbour (path cost 2).
    assert_eq!(
        plan["by_source"]["hv1"]["blocks"].as_u64().unwrap() as usize,
        only_second,
        "{plan}"
    );
    assert_eq!(
        plan["total_cost"].as_f64().unwrap(),
        2.0 * only_second as f64,
        "{plan}"
    );

    // hv1 instantiates the image through rack1 (cold: rack1 learns every non-zero
    // block into its cache). The cache is a holder in rack1's own index: the blocks
    // hv2 lacks now come from rack1 (one hop) instead of hv1 (two hops).
    let copy = lab.dir.path().join("hv1-copy.raw");
    let o = lab
        .qemu_convert("hv1", &lab.lun_url(IQN, 1), &copy)
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&copy).unwrap() == img);
    let deadline = Instant::now() + Duration::from_secs(15);
    let plan = loop {
        let (_, body) = get(
            &lab,
            "rack1",
            "/plan/construct?image=img&target=hv2&pricing=static",
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if v["by_source"]["rack1"]["blocks"].as_u64().unwrap_or(0) > 0 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "rack1's cache never appeared in its index: {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(
        plan["by_source"]["rack1"]["blocks"].as_u64().unwrap() as usize,
        only_second,
        "{plan}"
    );
    assert_eq!(
        plan["total_cost"].as_f64().unwrap(),
        only_second as f64,
        "{plan}"
    );
    // And rack1 serves a cached block to a peer, by hash (verified by the client).
    let block = img[img.len() / 2..]
        .chunks(4096)
        .find(|b| b.iter().any(|&x| x != 0))
        .unwrap();
    let hash = blake3::hash(block).to_hex().to_string();
    let rack1 = lab.port_toward("rack1", "hv2").unwrap().v4;
    let out_dir = lab.dir.path().join("fetched");
    std::fs::create_dir_all(&out_dir).unwrap();
    let bin = nearblock_lab::nearblock_bin().unwrap();
    let addr = format!("{rack1}:{INDEXER_PORT}");
    let cli = fabric.cli_args();
    let mut argv = vec![bin.to_str().unwrap(), "peer", "get", "--addr", &addr];
    argv.extend(cli.iter().map(String::as_str));
    argv.extend(["--out", out_dir.to_str().unwrap(), &hash]);
    let o = lab.exec_ok("hv2", &argv).unwrap();
    assert_eq!(
        std::fs::read(out_dir.join(&hash)).unwrap(),
        block,
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // Placement: hv1 is cheapest (it holds the image), hv2 next. Among the two,
    // the lower cpu wins: the agents' reports (hv1 0.9, hv2 0.1) override the
    // file (hv1 0.05, hv2 0.95), so hv2.
    let place = "/plan/place?image=img&candidates=hv1,hv2&policy=top:2:cpu&pricing=static";
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let (_, body) = get(&lab, "rack1", place);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if v["chosen"] == "hv2" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "agents' metrics never decided the placement: {body}\n{}",
            procs.log("agent-hv1")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let c = &v["candidates"];
    assert_eq!(
        (c[0]["host"].as_str(), c[0]["cpu"].as_f64()),
        (Some("hv1"), Some(0.9)),
        "{v}"
    );
    assert_eq!(
        (c[1]["host"].as_str(), c[1]["cpu"].as_f64()),
        (Some("hv2"), Some(0.1)),
        "{v}"
    );
    // mem and disk were measured, inside the namespace, of this machine: they
    // agree with `free` and `df` (within what moves while the test runs).
    let mem = c[0]["mem"].as_f64().expect("measured mem");
    let disk = c[0]["disk"].as_f64().expect("measured disk");
    let free = String::from_utf8(
        std::process::Command::new("free")
            .arg("-b")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let f: Vec<f64> = free
        .lines()
        .find(|l| l.starts_with("Mem:"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let mem_free = 1.0 - f[5] / f[0];
    assert!((mem - mem_free).abs() < 0.1, "mem {mem} vs free {mem_free}");
    let df = String::from_utf8(
        std::process::Command::new("df")
            .args(["-B1", "--output=used,avail"])
            .arg(lab.dir.path())
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let d: Vec<f64> = df
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let disk_df = d[0] / (d[0] + d[1]);
    assert!((disk - disk_df).abs() < 0.02, "disk {disk} vs df {disk_df}");
    // The operator's view: report, file, effective.
    let (code, body) = get(&lab, "rack1", "/hosts");
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hv1 = &h["hosts"][0];
    assert_eq!(hv1["host"], "hv1", "{h}");
    assert_eq!(hv1["fresh"], true, "{h}");
    assert_eq!(hv1["reported"]["via"], "hv1", "{h}");
    assert_eq!(hv1["file"]["cpu"], 0.05, "{h}");
    assert_eq!(hv1["effective"]["cpu"], 0.9, "{h}");

    // hv2's agent stops: once its last report is older than the staleness bound,
    // the file's value (0.95) counts again and hv1 (0.9, still reported) wins.
    procs.kill("agent-hv2").unwrap();
    let deadline = Instant::now() + Duration::from_secs(STALE_SECS + 10);
    let v = loop {
        let (_, body) = get(&lab, "rack1", place);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if v["chosen"] == "hv1" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "hv2's report never went stale: {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(v["candidates"][1]["cpu"].as_f64(), Some(0.95), "{v}");
    let (_, body) = get(&lab, "rack1", "/hosts");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hv2 = &h["hosts"][1];
    assert_eq!(
        (hv2["host"].as_str(), hv2["fresh"].as_bool()),
        (Some("hv2"), Some(false)),
        "{h}"
    );
    assert_eq!(hv2["reported"]["cpu"], 0.1, "{h}");
    assert!(
        hv2["reported"]["age_ms"].as_u64().unwrap() > STALE_SECS * 1000,
        "{h}"
    );
    drop(procs);
}
