//! A hostile child against a real indexer (issue 10, finding 4): `nearblock
//! indexer` runs in rack1 of the namespace lab with `max_image_blocks = 4096`;
//! the project's own peer client, authenticated as the agent hv1, pushes batches
//! that each hold one change over the cap among normal ones:
//!
//! - a `PatchImage` whose size implies 2^32 - 1 blocks (before the cap, applying
//!   it resized a block list to 141 GB and the indexer aborted, in a loop as the
//!   child resent it);
//! - a `PutImage` whose manifest bitmap claims 4097 blocks.
//!
//! Each push is answered with a refusal naming the change, the indexer stays up
//! and answers Status, the batch's other changes are visible to a holders lookup
//! (through the CLI), and resending the batch is acknowledged, not refused again.
//! Run as root.

use std::time::Duration;

use bytes::Bytes;
use nearblock::{
    index::{Change, Manifest},
    peer::{
        client::{ClientOptions, FetchError, Peer, PeerClient},
        identity::Credentials,
        proto::{code, Msg, PushedChange, Role},
    },
};
use nearblock_lab::{content, fabric::Fabric, toml_path, ApplianceOptions, Lab};
use serde_json::Value;

const AGENT_PORT: u16 = 7300;
const INDEXER_PORT: u16 = 7301;
const CAP: u64 = 4096;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The manifest of `data` at 4 KiB (named by its real blocks).
fn manifest(image: &str, data: &[u8]) -> Manifest {
    nearblock::index::chunk::manifest_of_bytes(image, data, 4096)
}

fn put(host: &str, m: Manifest) -> Change {
    Change::PutImage {
        host: host.into(),
        manifest: m,
    }
}

fn pushed(changes: &[Change], first_seq: u64) -> Vec<PushedChange> {
    changes
        .iter()
        .enumerate()
        .map(|(i, c)| (first_seq + i as u64, Bytes::from(c.encode())))
        .collect()
}

/// The indexer's `Status` JSON, as the client asks it.
async fn status(peer: &Peer) -> Value {
    match peer.request(&Msg::Status).await {
        Ok(Msg::StatusReply { json }) => serde_json::from_str(&json).expect("status JSON"),
        r => panic!("Status: {r:?}"),
    }
}

/// Expects a push to be refused with `acked` and a message containing `names`.
fn assert_refused(r: Result<u64, FetchError>, acked: u64, names: &[&str]) -> String {
    match r {
        Err(FetchError::Remote {
            code: c,
            acked: a,
            message,
            ..
        }) if c == code::REFUSED => {
            assert_eq!(a, acked, "acknowledged through: {message}");
            for n in names {
                assert!(
                    message.contains(n),
                    "refusal does not name {n:?}: {message}"
                );
            }
            message
        }
        r => panic!("expected a REFUSED reply acknowledging {acked}, got {r:?}"),
    }
}

#[test]
fn oversize_changes_are_refused_and_the_indexer_stays_up() {
    oversize_changes(false);
}

/// The same pushes into the rack appliance's embedded indexer (`[indexer]`): the
/// daemon, which also runs the datapath and the API, stays up and keeps serving.
#[test]
fn oversize_changes_are_refused_and_the_appliance_stays_up() {
    oversize_changes(true);
}

/// The indexer in rack1 runs as `nearblock indexer` or, `embedded`, inside the
/// rack appliance's daemon.
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: each step checks what the one before set up"
)]
fn oversize_changes(embedded: bool) {
    let mut lab = Lab::default_topology().expect("lab");
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).expect("fabric");
    let cfg = lab
        .write_file(
            "ix-rack1.toml",
            format!(
                "node = \"rack1\"\nlisten = \"0.0.0.0:{INDEXER_PORT}\"\n{}db = {}\nmax_image_blocks = {CAP}\n",
                fabric.credential_lines("rack1"),
                toml_path(&lab.dir.path().join("rack1.redb")),
            )
            .as_bytes(),
        )
        .expect("indexer config");
    if embedded {
        lab.start_appliance(
            "rack1",
            ApplianceOptions {
                steer: false,
                extra_config: format!("[indexer]\nconfig = {:?}\n", cfg.display().to_string()),
            },
        )
        .expect("start the appliance");
    } else {
        fabric
            .procs
            .spawn(
                &lab,
                "ix-rack1",
                "rack1",
                &["indexer", "--config", cfg.to_str().unwrap()],
            )
            .expect("start the indexer");
    }
    let wait_ready = |log: &dyn Fn() -> String| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !log().contains("indexer ready") {
            assert!(
                std::time::Instant::now() < deadline,
                "indexer not ready: {}",
                log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let log = |lab: &Lab, fabric: &Fabric| {
        if embedded {
            lab.appliance_log("rack1")
        } else {
            fabric.procs.log("ix-rack1")
        }
    };
    wait_ready(&|| log(&lab, &fabric));
    // Up: the indexer process runs; the appliance answers its API.
    let check_up = |lab: &Lab, fabric: &mut Fabric, when: &str| {
        if embedded {
            // A daemon that died cannot answer its API.
            lab.status("rack1").unwrap_or_else(|e| {
                panic!(
                    "the appliance {when}: {e:#}\n{}",
                    lab.appliance_log("rack1")
                )
            });
        } else {
            fabric
                .procs
                .check_alive("ix-rack1")
                .unwrap_or_else(|e| panic!("the indexer {when}: {e:#}"));
        }
    };

    // Normal images of hv1 (real content, so their blocks have real names).
    let a = content::image(64 * 4096, 11, 30);
    let c = content::image(64 * 4096, 12, 30);
    let d = content::image(64 * 4096, 13, 30);
    let huge_patch = Change::PatchImage {
        host: "hv1".into(),
        image: "b".into(),
        block_size: 4096,
        size: u64::from(u32::MAX) * 4096,
        blocks: vec![],
    };
    let big_put = put(
        "hv1",
        Manifest {
            image: "big".into(),
            size: (CAP + 1) * 4096,
            block_size: 4096,
            blocks: vec![None; CAP as usize + 1],
        },
    );
    let batch1 = vec![
        put("hv1", manifest("a", &a)),
        huge_patch,
        put("hv1", manifest("c", &c)),
    ];
    let batch2 = vec![big_put, put("hv1", manifest("d", &d))];

    let creds = Credentials::load(&fabric.key_file("hv1"), &fabric.peers_file).expect("hv1's key");
    let addr = fabric.indexer_addr(&lab, "rack1");
    let hv1_addr = Fabric::addr(&lab, "hv1", AGENT_PORT);
    let (r1, again, r2, st) = lab.in_node("hv1", move || {
        runtime().block_on(async move {
            let client = PeerClient::new(ClientOptions::new("hv1", Role::Agent, creds));
            let peer = client.peer(&addr);
            let addrs = vec![("hv1".to_string(), hv1_addr)];
            let r1 = peer
                .push("hv1", false, 0, addrs.clone(), pushed(&batch1, 1))
                .await;
            let again = peer
                .push("hv1", false, 0, addrs.clone(), pushed(&batch1, 1))
                .await;
            let r2 = peer.push("hv1", false, 0, addrs, pushed(&batch2, 4)).await;
            (r1, again, r2, status(&peer).await)
        })
    });

    assert_refused(
        r1,
        3,
        &[
            "change 2 from hv1",
            "PatchImage of `b` held by hv1",
            "4294967295 blocks, more than max_image_blocks = 4096",
        ],
    );
    assert_eq!(
        again.ok(),
        Some(3),
        "a resent batch is acknowledged, not refused again"
    );
    assert_refused(
        r2,
        5,
        &[
            "change 4 from hv1",
            "manifest of `big`",
            "claims 4097 blocks, more than max_image_blocks = 4096",
        ],
    );
    check_up(&lab, &mut fabric, "after the pushes");
    let ix = &st["index"];
    assert_eq!(ix["metrics"]["refused"], 2, "status: {st}");
    assert_eq!(ix["children"]["acked"]["hv1"], 5, "status: {st}");
    assert!(
        ix["metrics"]["last_refused"]
            .as_str()
            .is_some_and(|m| m.contains("manifest of `big`")),
        "status: {st}"
    );

    // The batches' other changes are in the index (asked through the CLI).
    for (name, data) in [("a", &a), ("c", &c), ("d", &d)] {
        let block = (0..64)
            .map(|i| &data[i * 4096..(i + 1) * 4096])
            .find(|b| b.iter().any(|&x| x != 0))
            .expect("a non-zero block");
        fabric
            .wait_holder(&lab, "rack1", block, "hv1", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("image {name}: {e}"));
        assert!(
            fabric
                .holders(&lab, "rack1", block)
                .unwrap()
                .contains(&Fabric::addr(&lab, "hv1", AGENT_PORT)),
            "image {name}: holder address"
        );
    }
    // Nothing was kept for the refused sources.
    let manifest_of = |image: &str| {
        let bin = nearblock_lab::nearblock_bin().unwrap();
        let addr = fabric.indexer_addr(&lab, "rack1");
        let cli = fabric.cli_args();
        let mut argv = vec![bin.to_str().unwrap(), "peer", "manifest", "--addr", &addr];
        argv.extend(cli.iter().map(String::as_str));
        argv.extend(["--host", "hv1", image]);
        let out = lab.exec("rack1", &argv).expect("peer manifest");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(
        manifest_of("a").contains("\"blocks\":64"),
        "{}",
        manifest_of("a")
    );
    for gone in ["b", "big"] {
        let out = manifest_of(gone);
        assert!(!out.contains("\"blocks\""), "{gone}: {out}");
    }
    check_up(&lab, &mut fabric, "at the end");
}
