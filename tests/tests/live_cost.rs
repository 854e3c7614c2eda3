//! Live network cost: an appliance turns its eBPF interface counters into link
//! utilisation, publishes it at `/links`, another appliance polls it, and both
//! price paths over the loaded link higher (`/costs`). Run as root.

use std::time::{Duration, Instant};

use nearblock_lab::{content, ApplianceOptions, Lab, LunSpec};

const TOPOLOGY: &str = r#"
[[node]]
name = "library"
role = "library"
lab = { tgtd = true }
[[node]]
name = "core"
role = "switch"
[[node]]
name = "rack1"
role = "appliance"
[[node]]
name = "hv1"
role = "hypervisor"
[[node]]
name = "hv2"
role = "hypervisor"
[[link]]
a = "library"
b = "core"
capacity_mbps = 10000
[[link]]
a = "core"
b = "rack1"
capacity_mbps = 10000
[[link]]
a = "rack1"
b = "hv1"
capacity_mbps = 200
lab = { shape = true }
[[link]]
a = "rack1"
b = "hv2"
capacity_mbps = 10000
"#;

const IQN: &str = "iqn.2026-11.test.nearblock:live";

/// `GET http://127.0.0.1:7878{path}` inside `node` with the lab's read token,
/// as JSON.
fn get(lab: &Lab, node: &str, path: &str) -> serde_json::Value {
    let token_file = lab.api_read_token_file();
    #[expect(
        clippy::unnecessary_debug_formatting,
        reason = "Debug quotes the path as a Python string literal"
    )]
    let script = format!(
        "import urllib.request,sys; req=urllib.request.Request('http://127.0.0.1:7878{path}', headers={{'Authorization': 'Bearer '+open({token_file:?}).read().split()[0]}}); sys.stdout.write(urllib.request.urlopen(req, timeout=5).read().decode())"
    );
    let o = lab
        .exec_ok(node, &["python3", "-c", &script])
        .expect("API call");
    serde_json::from_slice(&o.stdout).expect("JSON")
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: each step checks what the one before set up"
)]
fn loaded_link_raises_path_cost_here_and_at_a_polling_peer() {
    let mut lab = Lab::new(TOPOLOGY).expect("lab");
    let topo = lab
        .write_file("topology.toml", TOPOLOGY.as_bytes())
        .unwrap();
    let backing = lab
        .write_file("live.raw", &content::image(64 << 20, 3, 0))
        .unwrap();
    lab.add_lun(LunSpec {
        tid: 1,
        iqn: IQN.into(),
        lun: 1,
        backing,
        readonly: false,
        allow: None,
    })
    .unwrap();
    let rack1_on_core = lab.port_toward("rack1", "core").unwrap().v4;
    // The planner's index: the library holds the image, hv2 holds its first half.
    let img = content::image(1 << 20, 11, 20);
    let img_path = lab.write_file("img.raw", &img).unwrap();
    let half = lab.write_file("hv2.raw", &img[..img.len() / 2]).unwrap();
    let db = lab.dir.path().join("index.redb");
    let bin = nearblock_lab::nearblock_bin().unwrap();
    for (file, image, host) in [(&img_path, "img", "library"), (&half, "vm2", "hv2")] {
        let o = std::process::Command::new(&bin)
            .args([
                "index",
                file.to_str().unwrap(),
                "--image",
                image,
                "--host",
                host,
                "--quiet",
                "--db",
            ])
            .arg(&db)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let offline = |args: &[&str]| -> serde_json::Value {
        let o = std::process::Command::new(&bin)
            .args(["plan"])
            .args(args)
            .args([
                "--db",
                db.to_str().unwrap(),
                "--topology",
                topo.to_str().unwrap(),
                "--json",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // rack1's API is polled from core, so it listens beyond loopback (the lab
    // adds its token files to [api]); core presents the lab's read token.
    let peer_token = lab.api_read_token_file();
    let cost = |peers: &str| {
        format!(
            "sample_interval_ms = 500\n[api]\nlisten = \"0.0.0.0:7878\"\n[cost]\ntopology = {:?}\npoll_interval_ms = 300\npeers = [{peers}]\npeer_token_file = {:?}\n",
            topo.display().to_string(),
            peer_token.display().to_string()
        )
    };
    // Offline first: the running daemon holds the store (redb locks it).
    let offline_construct = offline(&["construct", "--image", "img", "--target", "hv1"]);
    let offline_place = offline(&[
        "place",
        "--image",
        "img",
        "--candidates",
        "hv1,hv2",
        "--policy",
        "best",
    ]);
    let planner = format!("[index]\ndb = {:?}\n[planner]\n", db.display().to_string());
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            steer: true,
            extra_config: format!("{}{planner}", cost("")),
        },
    )
    .unwrap();
    // The daemon serves the offline planner's functions: identical reports.
    let construct_q = "/plan/construct?image=img&target=hv1";
    assert_eq!(
        get(&lab, "rack1", &format!("{construct_q}&pricing=static")),
        offline_construct
    );
    assert_eq!(
        get(
            &lab,
            "rack1",
            "/plan/place?image=img&candidates=hv1,hv2&policy=best&pricing=static"
        ),
        offline_place
    );
    let static_cost = get(&lab, "rack1", &format!("{construct_q}&pricing=static"))["total_cost"]
        .as_f64()
        .unwrap();
    lab.start_appliance(
        "core",
        ApplianceOptions {
            steer: false,
            extra_config: cost(&format!("\"{rack1_on_core}:7878\"")),
        },
    )
    .unwrap();

    let idle = get(&lab, "core", "/costs?target=library");
    assert_eq!(idle["hv1"], 3.0, "{idle}");
    assert_eq!(idle["hv2"], 3.0, "{idle}");

    // Load the shaped 200 Mbit/s link rack1─hv1 with reads for a few seconds.
    let url = lab.lun_url(IQN, 1);
    let mut perf = lab
        .cmd(
            "hv1",
            &["iscsi-perf", "-m", "16", "-b", "128", "-t", "6", &url],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut seen = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let links = get(&lab, "rack1", "/links");
        let core_costs = get(&lab, "core", "/costs?target=library");
        if core_costs["hv1"].as_f64().unwrap_or(0.0) > 3.5 {
            seen = Some((
                links,
                core_costs,
                get(&lab, "rack1", "/costs?target=library"),
                get(&lab, "rack1", construct_q),
            ));
            break;
        }
    }
    assert!(perf.wait().unwrap().success());
    let (links, core_costs, rack_costs, live_plan) =
        seen.expect("the loaded link's cost never rose at the polling peer");
    // Every source reaches hv1 over the loaded link: the live plan costs more.
    assert!(
        live_plan["total_cost"].as_f64().unwrap() > static_cost,
        "live {live_plan} vs static {static_cost}"
    );
    let hv1_link = links
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["b"] == "hv1")
        .expect("rack1 reports its hv1 link");
    assert!(
        hv1_link["utilization"].as_f64().unwrap() > 0.3,
        "{hv1_link}"
    );
    // Only paths over the loaded link got dearer, here and at the peer.
    for costs in [&core_costs, &rack_costs] {
        assert!(costs["hv1"].as_f64().unwrap() > 3.5, "{costs}");
        assert_eq!(costs["hv2"], 3.0, "{costs}");
        assert_eq!(costs["rack1"], 2.0, "{costs}");
    }
}
