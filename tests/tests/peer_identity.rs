//! Per-node identity in the peer protocol (issue 10, finding 1), against a real
//! `nearblock indexer` (core) and the library's real `nearblock agent` in the
//! namespace lab, each with its own key from the lab's peers file. The
//! hypervisor hv1, with its own real key, tries what a compromised hypervisor
//! would, through the project's own peer client:
//!
//! - push changes about the library's host (a poisoned manifest under the
//!   library's image name, the removal of the library, its address): refused and
//!   named, while hv1's own holding of the same image name is recorded as hv1's;
//! - present its key under the library's name: the handshake is refused;
//! - a frame altered in flight (a relay flips one bit after the handshake): the
//!   indexer closes that connection and keeps serving;
//! - its key revoked in the peers file (no restart): refused; a rotated key for
//!   hv1 added the same way: accepted.
//!
//! Run as root.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use bytes::Bytes;
use nearblock::{
    index::{Change, Manifest},
    peer::{
        client::{ClientOptions, FetchError, PeerClient},
        identity::{Credentials, NodeKey},
        proto::{code, Msg, PushedChange, Role},
    },
};
use nearblock_lab::{content, fabric::Fabric, Lab};

const AGENT_PORT: u16 = 7400;
const INDEXER_PORT: u16 = 7401;
const IMAGE: &str = "iqn.2026-12.test.nearblock:lib/1";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn pushed(changes: &[Change], first_seq: u64) -> Vec<PushedChange> {
    changes
        .iter()
        .enumerate()
        .map(|(i, c)| (first_seq + i as u64, Bytes::from(c.encode())))
        .collect()
}

fn manifest(data: &[u8]) -> Manifest {
    nearblock::index::chunk::manifest_of_bytes(IMAGE, data, 4096)
}

/// The first non-zero 4 KiB block of `data`.
fn first_block(data: &[u8]) -> &[u8] {
    data.chunks(4096)
        .find(|b| b.iter().any(|&x| x != 0))
        .expect("a non-zero block")
}

/// A one-connection TCP relay on hv1's loopback to `upstream` that passes the
/// handshake (magic, then two length-prefixed messages from the client) and
/// flips one bit of the client's first record after it. Returns its address.
fn start_tampering_relay(upstream: String) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("relay listen");
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let Ok((mut client, _)) = l.accept() else {
            return;
        };
        let Ok(mut server) = TcpStream::connect(&upstream) else {
            return;
        };
        let timeout = Some(Duration::from_secs(10));
        let _ = client.set_read_timeout(timeout);
        let _ = server.set_read_timeout(timeout);
        let (mut s_rd, mut c_wr) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s_rd, &mut c_wr);
        });
        // The magic, the client's two handshake messages, then its first record
        // with one bit flipped.
        let forward = |client: &mut TcpStream, server: &mut TcpStream| -> std::io::Result<()> {
            let mut magic = [0u8; 8];
            client.read_exact(&mut magic)?;
            server.write_all(&magic)?;
            for flip in [false, false, true] {
                let mut len = [0u8; 2];
                client.read_exact(&mut len)?;
                server.write_all(&len)?;
                let n = u16::from_be_bytes(len) as usize;
                let mut b = vec![0u8; n];
                client.read_exact(&mut b)?;
                if flip {
                    b[n / 2] ^= 0x01;
                }
                server.write_all(&b)?;
            }
            Ok(())
        };
        let _ = forward(&mut client, &mut server);
        let _ = std::io::copy(&mut client, &mut server);
    });
    addr
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: each step checks what the one before set up"
)]
fn a_hypervisor_cannot_speak_for_the_library() {
    let lab = Lab::default_topology().expect("lab");
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).expect("fabric");
    // The library's real image, indexed by its own agent; hv1's different bytes.
    let lib = content::image(64 * 4096, 31, 30);
    let mine = content::image(64 * 4096, 32, 30);
    let lib_path = lab.write_file("lib.raw", &lib).expect("image");
    fabric.start_indexer(&lab, "core", None).expect("core");
    fabric
        .start_agent(&lab, "library", "core", &[(IMAGE, &lib_path)], "")
        .expect("library agent");
    fabric
        .wait_holder(
            &lab,
            "core",
            first_block(&lib),
            "library",
            Duration::from_secs(30),
        )
        .expect("the library's image is indexed");

    let core = fabric.indexer_addr(&lab, "core");
    let hv1 = Credentials::load(&fabric.key_file("hv1"), &fabric.peers_file).expect("hv1's key");
    let hv1_addr = Fabric::addr(&lab, "hv1", AGENT_PORT);
    let lib_addr = Fabric::addr(&lab, "library", AGENT_PORT);
    let batch = vec![
        Change::PutImage {
            host: "library".into(),
            manifest: manifest(&mine),
        },
        Change::RemoveHost {
            host: "library".into(),
        },
        Change::PutImage {
            host: "hv1".into(),
            manifest: manifest(&mine),
        },
    ];
    let (push, as_library, tampered, after) = lab.in_node("hv1", {
        let (core, hv1) = (core.clone(), hv1.clone());
        move || {
            block_on(async move {
                let client = PeerClient::new(ClientOptions::new("hv1", Role::Agent, hv1.clone()));
                let addrs = vec![
                    ("library".to_string(), hv1_addr.clone()),
                    ("hv1".to_string(), hv1_addr),
                ];
                let push = client
                    .peer(&core)
                    .push("hv1", false, 0, addrs, pushed(&batch, 1))
                    .await;
                // hv1's key under the library's name.
                let impostor =
                    PeerClient::new(ClientOptions::new("library", Role::Agent, hv1.clone()));
                let as_library = impostor.peer(&core).request(&Msg::Ping).await;
                // One bit flipped in flight after the handshake.
                let relay = start_tampering_relay(core.clone());
                let tampered = PeerClient::new(ClientOptions::new("hv1", Role::Agent, hv1.clone()))
                    .peer(&relay)
                    .request(&Msg::Ping)
                    .await;
                let after = client.peer(&core).request(&Msg::Ping).await;
                (push, as_library, tampered, after)
            })
        }
    });
    match push {
        Err(FetchError::Remote {
            code: c,
            acked,
            message,
            ..
        }) => {
            assert_eq!((c, acked), (code::REFUSED, 3), "{message}");
            assert!(
                message.contains("change 1 from hv1")
                    && message.contains("change 2 from hv1")
                    && message.contains("does not speak for host library")
                    && !message.contains("change 3"),
                "{message}"
            );
        }
        r => panic!("expected a refusal naming the library's changes, got {r:?}"),
    }
    match as_library {
        Err(FetchError::Auth { message, .. }) => {
            assert!(message.contains("presents the key of hv1"), "{message}");
        }
        r => panic!("hv1's key under the library's name was not refused: {r:?}"),
    }
    assert!(
        tampered.is_err(),
        "a frame altered in flight was answered: {tampered:?}"
    );
    assert!(matches!(after, Ok(Msg::Pong)), "{after:?}");
    let log = fabric.procs.log("ix-core");
    assert!(log.contains("failed authentication"), "{log}");
    assert!(log.contains("does not speak for host library"), "{log}");

    // The index: the library still holds its image at its own address; hv1's
    // bytes are hv1's holding only.
    let lib_holders = fabric.holders(&lab, "core", first_block(&lib)).unwrap();
    assert!(
        lib_holders.contains("\"library\"") && lib_holders.contains(&lib_addr),
        "{lib_holders}"
    );
    fabric
        .wait_holder(
            &lab,
            "core",
            first_block(&mine),
            "hv1",
            Duration::from_secs(10),
        )
        .expect("hv1's own holding is recorded");
    let mine_holders = fabric.holders(&lab, "core", first_block(&mine)).unwrap();
    assert!(!mine_holders.contains("\"library\""), "{mine_holders}");

    // Revocation, then rotation, by editing the peers file (no restart).
    let peers = std::fs::read_to_string(&fabric.peers_file).unwrap();
    let old = hv1.key.public().to_string();
    let without_hv1: String = peers
        .split("[[node]]")
        .filter(|e| !e.contains(&old))
        .collect::<Vec<_>>()
        .join("[[node]]");
    std::fs::write(&fabric.peers_file, &without_hv1).unwrap();
    // The indexer looks at the file at most once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let new_key_file = lab.dir.path().join("hv1-rotated.key");
    let o = std::process::Command::new(nearblock_lab::nearblock_bin().unwrap())
        .args(["keygen", "--out"])
        .arg(&new_key_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let revoked = lab.in_node("hv1", {
        let (core, hv1) = (core.clone(), hv1.clone());
        move || {
            block_on(async move {
                PeerClient::new(ClientOptions::new("hv1", Role::Agent, hv1))
                    .peer(&core)
                    .request(&Msg::Ping)
                    .await
            })
        }
    });
    match revoked {
        Err(FetchError::Auth { message, .. }) => {
            assert!(message.contains("not in the peers file"), "{message}");
        }
        r => panic!("a revoked key was accepted: {r:?}"),
    }
    std::fs::write(
        &fabric.peers_file,
        format!(
            "{without_hv1}\n[[node]]\nname = \"hv1\"\nrole = \"agent\"\n{}",
            String::from_utf8_lossy(&o.stdout)
        ),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let rotated = Credentials::load(&new_key_file, &fabric.peers_file).expect("rotated key");
    assert_ne!(
        rotated.key.public(),
        NodeKey::load(&fabric.key_file("hv1")).unwrap().public()
    );
    let ok = lab.in_node("hv1", move || {
        block_on(async move {
            PeerClient::new(ClientOptions::new("hv1", Role::Agent, rotated))
                .peer(&core)
                .request(&Msg::Ping)
                .await
        })
    });
    assert!(matches!(ok, Ok(Msg::Pong)), "the rotated key: {ok:?}");
    fabric
        .procs
        .check_alive("ix-core")
        .expect("the indexer stays up");
}
