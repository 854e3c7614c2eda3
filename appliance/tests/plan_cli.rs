//! The offline planner as an operator runs it: `nearblock index` fills the store,
//! `nearblock plan construct|place --json` answer from it and a topology file.

use std::process::Command;

fn nearblock(args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_nearblock"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

fn block(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
        .collect()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: each step checks what the one before set up"
)]
fn index_then_construct_and_place() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    // The image: blocks 1 2 0 3 1 (a zero block, a repeated block); hv2 holds 2 and 3,
    // hv3 holds 1.
    let image = [block(1), block(2), vec![0; 4096], block(3), block(1)].concat();
    std::fs::write(p("img.raw"), &image).unwrap();
    std::fs::write(p("hv2.raw"), [block(2), block(3)].concat()).unwrap();
    std::fs::write(p("hv3.raw"), block(1)).unwrap();
    let db = p("idx.redb");
    for (file, image, host) in [
        ("img.raw", "img", "lib"),
        ("hv2.raw", "vm2", "hv2"),
        ("hv3.raw", "vm3", "hv3"),
    ] {
        nearblock(&[
            "index",
            &p(file),
            "--image",
            image,
            "--host",
            host,
            "--db",
            &db,
            "--quiet",
        ]);
    }
    std::fs::write(
        p("topo.toml"),
        r#"
[[node]]
name = "lib"
role = "library"
[[node]]
name = "core"
role = "switch"
[[node]]
name = "rack"
role = "appliance"
[[node]]
name = "hv1"
role = "hypervisor"
[[node]]
name = "hv2"
role = "hypervisor"
[[node]]
name = "hv3"
role = "hypervisor"
[[link]]
a = "lib"
b = "core"
[[link]]
a = "core"
b = "rack"
[[link]]
a = "rack"
b = "hv1"
[[link]]
a = "rack"
b = "hv2"
[[link]]
a = "core"
b = "hv3"
"#,
    )
    .unwrap();
    let topo = p("topo.toml");
    let c = nearblock(&[
        "plan",
        "construct",
        "--db",
        &db,
        "--topology",
        &topo,
        "--image",
        "img",
        "--target",
        "hv1",
        "--json",
    ]);
    // Distinct non-zero hashes 1, 2, 3: 2 and 3 from hv2 (cost 2 each), 1 from hv3
    // (cost 3; the library is 3 too: tie → lowest cost, then name "hv3" < "lib").
    assert_eq!(c["total_cost"], 7.0, "{c}");
    assert_eq!(c["blocks_fetched"], 3);
    assert_eq!(c["blocks_local"], 0);
    assert_eq!(c["blocks_zero"], 1);
    assert_eq!(c["by_source"]["hv2"]["blocks"], 2);
    assert_eq!(c["by_source"]["hv2"]["bytes"], 8192);
    assert_eq!(c["by_source"]["hv3"]["path_cost"], 3.0);

    let pl = nearblock(&[
        "plan",
        "place",
        "--db",
        &db,
        "--topology",
        &topo,
        "--image",
        "img",
        "--candidates",
        "hv1,hv2,hv3",
        "--policy",
        "best",
        "--json",
    ]);
    // hv2 holds 2 and 3 (local), fetches 1 from hv3 (3): 3. hv3 holds 1, fetches
    // 2 and 3 from hv2 (3 each): 6. hv1: 7.
    let hosts: Vec<_> = pl["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["host"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(hosts, ["hv2", "hv3", "hv1"], "{pl}");
    assert_eq!(pl["chosen"], "hv2");
    assert_eq!(pl["candidates"][0]["total_cost"], 3.0);
}
