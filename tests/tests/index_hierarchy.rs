//! The index hierarchy and the peer block service in the namespace lab (issue:
//! stores, done-when 2). Agents in hv1 (rack1), hv3 and hv4 (rack2) and on the
//! library (its tgtd LUN), local indexers in rack1 and rack2, the global indexer in
//! core. Run as root.
//!
//! - a holders lookup at rack1 for a block only hv3 holds is answered (via core);
//! - blocks fetched from hv1's side are the right bytes;
//! - a block served with one flipped bit is rejected, counted, the peer penalised,
//!   and the block fetched from another holder (the library); after the agent's
//!   rescan the changed block is no longer offered by it;
//! - SIGKILL of the global indexer while a large push is being applied, restart:
//!   every earlier lookup answers as before and the interrupted push completes.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nearblock::index::BlockHash;
use nearblock_lab::{
    content, fabric::Fabric, nearblock_bin, procs::Procs, toml_path, Lab, LunSpec,
};
use serde_json::Value;

const AGENT_PORT: u16 = 7900;
const INDEXER_PORT: u16 = 7901;
const IQN: &str = "iqn.2026-11.test.nearblock:lib";
const MIB: usize = 1 << 20;

struct Ctx {
    lab: Lab,
    /// The lab's keys and peers file (its processes are started here, by hand).
    fabric: Fabric,
}

impl Ctx {
    fn agent_addr(&self, node: &str) -> String {
        format!("{}:{AGENT_PORT}", self.lab.addr4(node))
    }
    fn indexer_addr(&self, node: &str) -> String {
        format!("{}:{INDEXER_PORT}", self.lab.addr4(node))
    }

    fn write_cfg(&self, name: &str, text: &str) -> PathBuf {
        self.lab
            .write_file(&format!("{name}.toml"), text.as_bytes())
            .expect("config")
    }

    fn indexer_cfg(&self, node: &str, parent: Option<&str>) -> PathBuf {
        let parent = parent
            .map(|p| format!("parent = \"{}\"\n", self.indexer_addr(p)))
            .unwrap_or_default();
        self.write_cfg(
            &format!("ix-{node}"),
            &format!(
                "node = \"{node}\"\nlisten = \"0.0.0.0:{INDEXER_PORT}\"\n{}db = {}\n{parent}push_interval_ms = 200\n",
                self.fabric.credential_lines(node),
                toml_path(&self.lab.dir.path().join(format!("{node}.redb"))),
            ),
        )
    }

    fn agent_cfg(
        &self,
        node: &str,
        parent: &str,
        images: &[(&str, &Path)],
        extra: &str,
    ) -> PathBuf {
        let mut t = format!(
            "node = \"{node}\"\nlisten = \"0.0.0.0:{AGENT_PORT}\"\nadvertise = \"{}\"\n{}db = {}\nparent = \"{}\"\nrescan_secs = 3600\npush_interval_ms = 200\n{extra}\n",
            self.agent_addr(node),
            self.fabric.credential_lines(node),
            toml_path(&self.lab.dir.path().join(format!("agent-{node}.redb"))),
            self.indexer_addr(parent),
        );
        for (name, path) in images {
            writeln!(
                t,
                "[[image]]\nname = \"{name}\"\npath = {}",
                toml_path(path)
            )
            .expect("write to a String");
        }
        self.write_cfg(&format!("agent-{node}"), &t)
    }

    /// `nearblock peer ARGS…` inside `node` (as the lab's operator CLI); the
    /// JSON lines it printed.
    fn peer(&self, node: &str, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        let bin = nearblock_bin()?;
        let mut command = vec![bin.to_str().unwrap(), "peer"];
        command.extend_from_slice(args);
        let cli = self.fabric.cli_args();
        command.extend(cli.iter().map(String::as_str));
        let o = self.lab.exec_ok(node, &command)?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect())
    }

    /// (host, addr) of every holder of each hash, as `indexer` answers `from` node.
    fn holders(
        &self,
        from: &str,
        indexer: &str,
        hashes: &[BlockHash],
        local_only: bool,
    ) -> anyhow::Result<Vec<BTreeSet<(String, String)>>> {
        let addr = self.indexer_addr(indexer);
        let hs: Vec<String> = hashes
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        let mut args = vec!["holders", "--addr", &addr];
        if local_only {
            args.push("--local-only");
        }
        args.extend(hs.iter().map(String::as_str));
        let lines = self.peer(from, &args)?;
        Ok(lines
            .iter()
            .filter(|l| l.get("hash").is_some())
            .map(|l| {
                l["holders"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| {
                        (
                            h["host"].as_str().unwrap().to_string(),
                            h["addr"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .collect())
    }

    /// Polls until `pred` holds for the answer of `indexer` (local lookups).
    fn wait_holders(
        &self,
        indexer: &str,
        hashes: &[BlockHash],
        within: Duration,
        what: &str,
        pred: impl Fn(&[BTreeSet<(String, String)>]) -> bool,
    ) -> Vec<BTreeSet<(String, String)>> {
        let deadline = Instant::now() + within;
        loop {
            let last = match self.holders(indexer, indexer, hashes, true) {
                Ok(h) if pred(&h) => return h,
                r => format!("{r:?}"),
            };
            assert!(
                Instant::now() < deadline,
                "{indexer}: {what} not reached within {within:?}; last answer: {last:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn block(data: &[u8], i: usize) -> &[u8] {
    &data[i * 4096..(i + 1) * 4096]
}

fn hash(data: &[u8], i: usize) -> BlockHash {
    BlockHash::of(block(data, i))
}

fn nonzero(data: &[u8], range: std::ops::Range<usize>) -> usize {
    range
        .into_iter()
        .find(|&i| block(data, i).iter().any(|&b| b != 0))
        .expect("a non-zero block")
}

fn hosts(s: &BTreeSet<(String, String)>) -> Vec<&str> {
    s.iter().map(|(h, _)| h.as_str()).collect()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: each step checks what the one before set up"
)]
#[expect(
    clippy::similar_names,
    clippy::many_single_char_names,
    reason = "images a, b, l and their blocks' indexes and hashes, named alike on purpose"
)]
fn hierarchy_lookup_verification_and_global_crash() {
    let mut lab = Lab::default_topology().expect("lab");
    let a = content::image(8 * MIB, 1, 20);
    let b = content::image(8 * MIB, 3, 20);
    // The library LUN: the first half of b, then its own blocks.
    let mut l = b[..4 * MIB].to_vec();
    l.extend_from_slice(&content::image(4 * MIB, 5, 20));
    let pa = lab.write_file("hv1-a.raw", &a).unwrap();
    let pb = lab.write_file("hv3-b.raw", &b).unwrap();
    let pl = lab.write_file("lib-l.raw", &l).unwrap();
    lab.add_lun(LunSpec::read_only(IQN, pl.clone()))
        .expect("lun");
    let fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    let ctx = Ctx { lab, fabric };
    let mut procs = Procs::new(); // after the lab: dropped (killed) first

    let cfgs = [
        ("ix-core", "core", ctx.indexer_cfg("core", None)),
        ("ix-rack1", "rack1", ctx.indexer_cfg("rack1", Some("core"))),
        ("ix-rack2", "rack2", ctx.indexer_cfg("rack2", Some("core"))),
    ];
    for (name, node, cfg) in &cfgs {
        procs
            .spawn(
                &ctx.lab,
                name,
                node,
                &["indexer", "--config", cfg.to_str().unwrap()],
            )
            .unwrap();
    }
    let lib = ctx.lab.library().to_string();
    let agents = [
        (
            "agent-hv1",
            "hv1",
            ctx.agent_cfg("hv1", "rack1", &[("a", &pa)], ""),
        ),
        (
            "agent-hv3",
            "hv3",
            ctx.agent_cfg("hv3", "rack2", &[("b", &pb)], ""),
        ),
        (
            "agent-lib",
            lib.as_str(),
            ctx.agent_cfg(
                &lib,
                "core",
                &[],
                &format!("tgt_control_port = {}", ctx.lab.tgt_control_port()),
            ),
        ),
    ];
    for (name, node, cfg) in &agents {
        procs
            .spawn(
                &ctx.lab,
                name,
                node,
                &["agent", "--config", cfg.to_str().unwrap()],
            )
            .unwrap();
    }

    // Blocks: one of a; one only hv3 holds (second half of b); one hv3 and the
    // library share (first half of b); one only the library holds.
    let ia = nonzero(&a, 10..100);
    let ib_only = nonzero(&b, 1500..1600);
    let ishared = nonzero(&b, 100..200);
    let il_only = nonzero(&l, 1500..1600);
    let (ha, hb_only, hshared, hl_only) = (
        hash(&a, ia),
        hash(&b, ib_only),
        hash(&b, ishared),
        hash(&l, il_only),
    );
    let sample = [ha, hb_only, hshared, hl_only];
    let lib_image_host = lib.clone();
    let before = ctx.wait_holders(
        "core",
        &sample,
        Duration::from_mins(1),
        "every agent's images at the global indexer",
        |h| {
            hosts(&h[0]) == ["hv1"]
                && hosts(&h[1]) == ["hv3"]
                && h[2].len() == 2
                && hosts(&h[3]) == [lib_image_host.as_str()]
        },
    );
    assert!(
        before[2].contains(&("hv3".into(), ctx.agent_addr("hv3"))),
        "{before:?}"
    );
    assert!(
        before[2].contains(&(lib.clone(), ctx.agent_addr(&lib))),
        "{before:?}"
    );
    // The library agent learned its image from tgtd and named it IQN/LUN.
    let lines = ctx
        .peer(
            "core",
            &[
                "holders",
                "--addr",
                &ctx.indexer_addr("core"),
                "--local-only",
                &hl_only.to_string(),
            ],
        )
        .unwrap();
    assert_eq!(lines[0]["holders"][0]["image"], format!("{IQN}/1"));
    assert_eq!(lines[0]["holders"][0]["offset"], (il_only * 4096) as u64);

    // 1. A lookup at rack1 for a block only hv3 (rack2) holds: rack1 has no holder
    // itself and answers through the global indexer.
    assert!(ctx.holders("hv1", "rack1", &[hb_only], true).unwrap()[0].is_empty());
    let via = ctx.holders("hv1", "rack1", &[hb_only], false).unwrap();
    assert_eq!(
        via[0],
        BTreeSet::from([("hv3".to_string(), ctx.agent_addr("hv3"))]),
        "rack1's answer for a block only in rack2"
    );
    // rack1 answers its own hosts' blocks locally.
    assert_eq!(
        hosts(&ctx.holders("hv1", "rack1", &[ha], true).unwrap()[0]),
        ["hv1"]
    );

    // 2. GetBlocks from hv1's side: the right bytes.
    let out = ctx.lab.dir.path().join("got");
    std::fs::create_dir_all(&out).unwrap();
    let hv3 = ctx.agent_addr("hv3");
    let lines = ctx
        .peer(
            "hv1",
            &[
                "get",
                "--addr",
                &hv3,
                "--out",
                out.to_str().unwrap(),
                &hb_only.to_string(),
                &hshared.to_string(),
            ],
        )
        .unwrap();
    assert!(lines[..2].iter().all(|l| l["ok"] == true), "{lines:?}");
    assert_eq!(
        std::fs::read(out.join(hb_only.to_string())).unwrap(),
        block(&b, ib_only)
    );
    assert_eq!(
        std::fs::read(out.join(hshared.to_string())).unwrap(),
        block(&b, ishared)
    );
    // An unknown hash is a clear not-found, never an empty block.
    let unknown = BlockHash::of(b"no such block");
    let lines = ctx
        .peer("hv1", &["get", "--addr", &hv3, &unknown.to_string()])
        .unwrap();
    assert_eq!(lines[0]["ok"], false);
    assert!(
        lines[0]["error"].as_str().unwrap().contains("not found"),
        "{lines:?}"
    );
    // A stranger (a key the lab's peers file does not list; its own peers file
    // lists the lab and itself) cannot pull blocks.
    let bin = nearblock_bin().unwrap();
    let stranger_key = ctx.lab.dir.path().join("stranger.key");
    let o = std::process::Command::new(&bin)
        .args(["keygen", "--out"])
        .arg(&stranger_key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lab_peers = std::fs::read_to_string(&ctx.fabric.peers_file).unwrap();
    let stranger_peers = ctx
        .lab
        .write_file(
            "stranger-peers.toml",
            format!(
                "{lab_peers}\n[[node]]\nname = \"stranger\"\nrole = \"client\"\n{}",
                String::from_utf8_lossy(&o.stdout)
            )
            .as_bytes(),
        )
        .unwrap();
    let o = ctx
        .lab
        .exec(
            "hv1",
            &[
                bin.to_str().unwrap(),
                "peer",
                "get",
                "--addr",
                &hv3,
                "--key-file",
                stranger_key.to_str().unwrap(),
                "--peers-file",
                stranger_peers.to_str().unwrap(),
                &hb_only.to_string(),
            ],
        )
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("authentication") && s.contains("not in the peers file"),
        "{s}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!s.contains("\"ok\":true"), "{s}");

    // 3. One flipped bit in hv3's copy of the shared block, before hv3 rescans:
    // hv3 serves it (it does not verify), the client rejects it, counts it,
    // penalises hv3 and gets the block from the library.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&pb).unwrap();
        let off = (ishared * 4096 + 1234) as u64;
        let mut byte = [b[ishared * 4096 + 1234]];
        byte[0] ^= 0x04;
        f.write_all_at(&byte, off).unwrap();
        f.sync_all().unwrap();
    }
    let holders_cost_order = format!("{},{}", hv3, ctx.agent_addr(&lib));
    std::fs::remove_file(out.join(hshared.to_string())).unwrap();
    let lines = ctx
        .peer(
            "hv1",
            &[
                "fetch",
                "--holders",
                &holders_cost_order,
                "--out",
                out.to_str().unwrap(),
                &hshared.to_string(),
            ],
        )
        .unwrap();
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
    assert_eq!(lines[0]["from"], ctx.agent_addr(&lib), "{lines:?}");
    let failed = lines[0]["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{lines:?}");
    assert!(
        failed[0].as_str().unwrap().contains("mismatch"),
        "{lines:?}"
    );
    assert_eq!(
        std::fs::read(out.join(hshared.to_string())).unwrap(),
        block(&b, ishared)
    );
    let m = &lines[1]["metrics"];
    assert_eq!(
        (m["mismatches"].as_u64(), m["penalties"].as_u64()),
        (Some(1), Some(1)),
        "{m}"
    );
    assert_eq!(m["blocks_ok"].as_u64(), Some(1), "{m}");
    // After hv3's rescan (SIGHUP) the changed block is no longer offered by hv3:
    // the delta travels hv3 → rack2 → core.
    procs.signal("agent-hv3", libc::SIGHUP).unwrap();
    let mut flipped = block(&b, ishared).to_vec();
    flipped[1234] ^= 0x04;
    let hflipped = BlockHash::of(&flipped);
    ctx.wait_holders(
        "core",
        &[hshared, hflipped],
        Duration::from_secs(30),
        "hv3's rescan delta at the global indexer",
        |h| hosts(&h[0]) == [lib.as_str()] && hosts(&h[1]) == ["hv3"],
    );
    let st = &ctx.peer("hv3", &["status", "--addr", &hv3]).unwrap()[0];
    assert_eq!(st["state"]["last_scan"]["changed_blocks"], 1, "{st}");
    assert!(st["server"]["blocks_served"].as_u64().unwrap() >= 3, "{st}");
    let before = ctx.holders("core", "core", &sample, true).unwrap();

    // 4. SIGKILL the global indexer while a large push is being applied; restart.
    let big = content::image(96 * MIB, 4, 0);
    let pbig = ctx.lab.write_file("hv4-big.raw", &big).unwrap();
    let cfg = ctx.agent_cfg("hv4", "rack2", &[("big", &pbig)], "");
    let n_before = procs.log("ix-core").matches("receiving push").count();
    procs
        .spawn(
            &ctx.lab,
            "agent-hv4",
            "hv4",
            &["agent", "--config", cfg.to_str().unwrap()],
        )
        .unwrap();
    procs
        .wait_log("ix-core", Duration::from_mins(2), |log| {
            log.lines()
                .filter(|l| l.contains("receiving push"))
                .skip(n_before)
                .any(|l| l.contains("child=rack2") && l.contains("bytes=") && big_push(l))
        })
        .unwrap();
    procs.kill("ix-core").unwrap();
    let log = procs.log("ix-core");
    let tail = &log[log.rfind("receiving push").unwrap()..];
    let landed_mid_apply = !tail.contains("applied push");
    eprintln!(
        "SIGKILL of the global indexer landed {}",
        if landed_mid_apply {
            "while the large push was in flight (received, not yet applied and acknowledged)"
        } else {
            "after the large push was applied (its ack may still have been lost)"
        }
    );
    let t0 = Instant::now();
    procs
        .spawn(
            &ctx.lab,
            "ix-core",
            "core",
            &["indexer", "--config", cfgs[0].2.to_str().unwrap()],
        )
        .unwrap();
    procs
        .wait_log("ix-core", Duration::from_secs(30), |log| {
            log.matches("indexer ready").count() >= 2
        })
        .unwrap();
    eprintln!("global indexer restarted and ready in {:?}", t0.elapsed());
    let after = ctx.wait_holders(
        "core",
        &sample,
        Duration::from_secs(20),
        "answers after restart",
        |_| true,
    );
    assert_eq!(
        after, before,
        "the restarted global indexer answers earlier lookups as before"
    );
    // The interrupted push completes (resumed from what the global acknowledged).
    let ibig = [0usize, 12_345, big.len() / 4096 - 1];
    let hbig: Vec<BlockHash> = ibig.iter().map(|&i| hash(&big, i)).collect();
    ctx.wait_holders(
        "core",
        &hbig,
        Duration::from_mins(1),
        "the interrupted large push",
        |h| h.iter().all(|s| hosts(s) == ["hv4"]),
    );
    // Resumed from what the global had acknowledged, not restated.
    let rack2_log = procs.log("ix-rack2");
    assert!(!rack2_log.contains("resync to parent"), "{rack2_log}");
    let st = &ctx
        .peer("rack2", &["status", "--addr", &ctx.indexer_addr("rack2")])
        .unwrap()[0];
    assert_eq!(st["state"]["push"]["resyncs"], 0, "{st}");
    if landed_mid_apply {
        // The push was received but never acknowledged: rack2 saw it fail and
        // resent it. (When the kill landed after the ack, nothing failed.)
        assert!(
            st["state"]["push"]["failures"].as_u64().unwrap() >= 1,
            "{st}"
        );
    }
    let st = &ctx
        .peer("core", &["status", "--addr", &ctx.indexer_addr("core")])
        .unwrap()[0];
    eprintln!("global indexer after the restart: {}", st["index"]);
    // And rack1 finds hv4's blocks through the restarted global.
    let via = ctx.holders("hv1", "rack1", &hbig[1..2], false).unwrap();
    assert_eq!(hosts(&via[0]), ["hv4"]);
    for name in [
        "ix-rack1",
        "ix-rack2",
        "agent-hv1",
        "agent-hv3",
        "agent-lib",
        "agent-hv4",
        "ix-core",
    ] {
        procs.check_alive(name).unwrap();
    }
}

/// A push line of the large image (≈ 33 bytes per block of 96 MiB ≈ 0.8 MB).
fn big_push(line: &str) -> bool {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("bytes="))
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|b| b > 500_000)
}
