//! The rack appliance runs its indexer in-process (`[indexer]`): hypervisor agents
//! push their images into the appliance's own index store, and the appliance's
//! planner API answers from it live. Run as root.

use std::time::{Duration, Instant};

use nearblock::splice::catalog::{manifest_of, manifest_to_text};
use nearblock_lab::{content, procs::Procs, ApplianceOptions, Lab, LunSpec, DEFAULT_TOPOLOGY};

const IQN: &str = "iqn.2026-11.test.nearblock:rack-indexer";

const INDEXER_PORT: u16 = 7100;
const AGENT_PORT: u16 = 7200;

/// `GET http://127.0.0.1:7878{path}` inside `node`: (HTTP status, body).
fn get(lab: &Lab, node: &str, path: &str) -> (u16, String) {
    let script = format!(
        "import urllib.request,urllib.error,sys\n\
         try:\n    r=urllib.request.urlopen('http://127.0.0.1:7878{path}', timeout=5); print(r.status); sys.stdout.write(r.read().decode())\n\
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
fn agents_push_into_the_rack_appliance_and_its_planner_uses_them() {
    let mut lab = Lab::default_topology().expect("lab");
    let topo = lab
        .write_file("topology.toml", DEFAULT_TOPOLOGY.as_bytes())
        .unwrap();
    let secret = lab
        .write_file("peer.secret", b"a lab secret for the peer protocol\n")
        .unwrap();
    // hv1 runs the image; hv2 holds its first half (another VM of the same seed).
    let img = content::image(4 << 20, 21, 30);
    let img_path = lab.write_file("img.raw", &img).unwrap();
    let half_path = lab.write_file("vm2.raw", &img[..img.len() / 2]).unwrap();

    let indexer_cfg = lab
        .write_file(
            "rack1-indexer.toml",
            format!(
                "node = \"rack1\"\nlisten = \"0.0.0.0:{INDEXER_PORT}\"\nsecret_file = {:?}\ndb = {:?}\npush_interval_ms = 200\n",
                secret.display().to_string(),
                lab.dir.path().join("rack1.redb").display().to_string()
            )
            .as_bytes(),
        )
        .unwrap();
    // The library exports the image read-only; rack1 serves it (learning into its
    // cache from the library's Data-In).
    lab.add_lun(LunSpec {
        tid: 1,
        iqn: IQN.into(),
        lun: 1,
        backing: img_path.clone(),
        readonly: true,
        allow: None,
    })
    .unwrap();
    let manifest = lab
        .write_file(
            "img.manifest",
            manifest_to_text(&manifest_of("img", &img, 4096)).as_bytes(),
        )
        .unwrap();
    let extra_config = format!(
        "[splicer]\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\nmanifest = {:?}\n[cost]\ntopology = {:?}\n[planner]\n[indexer]\nconfig = {:?}\n",
        manifest.display().to_string(),
        topo.display().to_string(),
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
    for (node, image, path) in [("hv1", "img", &img_path), ("hv2", "vm2", &half_path)] {
        let parent = lab.port_toward("rack1", node).unwrap().v4;
        let addr = lab.addr4(node);
        let cfg = lab
            .write_file(
                &format!("agent-{node}.toml"),
                format!(
                    "node = \"{node}\"\nlisten = \"0.0.0.0:{AGENT_PORT}\"\nadvertise = \"{addr}:{AGENT_PORT}\"\nsecret_file = {:?}\ndb = {:?}\nparent = \"{parent}:{INDEXER_PORT}\"\nrescan_secs = 3600\npush_interval_ms = 200\n[[image]]\nname = \"{image}\"\npath = {:?}\n",
                    secret.display().to_string(),
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
    let o = lab
        .exec_ok(
            "hv2",
            &[
                bin.to_str().unwrap(),
                "peer",
                "get",
                "--addr",
                &format!("{rack1}:{INDEXER_PORT}"),
                "--secret-file",
                secret.to_str().unwrap(),
                "--out",
                out_dir.to_str().unwrap(),
                &hash,
            ],
        )
        .unwrap();
    assert_eq!(
        std::fs::read(out_dir.join(&hash)).unwrap(),
        block,
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    drop(procs);
}
