//! Served LUNs' manifests stay current (issue 6): a LUN declared without a
//! manifest gets the library agent's `IQN/LUN` manifest through the global index
//! (rack1's embedded indexer asks its parent, core); when the LUN's backing file
//! changes and the agent re-indexes it (SIGHUP), rack1 installs the new manifest
//! and from then on every READ returns the new content, bit-identical:
//!
//! - a session that logged in before the change reads the new content at its
//!   next READ, served locally from the new manifest (the splicer's counters);
//! - a copy with qemu-img from hv1 through rack1 equals the new image, and
//!   rack1 served it (nothing passed through);
//! - the old content, still cached, is never served once the new manifest is in.
//!
//! What this cannot promise (docs/decisions.md): between the file changing and
//! the new manifest arriving (agent rescan + push + refresh), the LUN is served
//! from the old manifest. Run as root.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use nearblock_lab::{
    fabric::Fabric,
    initiator::{connect_in, Initiator, LoginOptions},
    ApplianceOptions, Lab, LunSpec,
};

const IQN: &str = "iqn.2026-11.test.nearblock:current";
const AGENT_PORT: u16 = 7410;
const INDEXER_PORT: u16 = 7411;
const SIZE: usize = 4 << 20;

/// An image of `SIZE` bytes: 4 KiB blocks stamped with `version` and their
/// number, every eighth block zero.
fn image(version: u8) -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    for (i, b) in v.chunks_mut(4096).enumerate() {
        if i % 8 == 7 {
            continue;
        }
        for (j, x) in b.iter_mut().enumerate() {
            *x = (j as u8) ^ (i as u8).wrapping_mul(29) ^ version.wrapping_mul(101) | 1;
        }
        b[0] = version;
    }
    v
}

/// rack1's view of the LUN: (served, manifest seq, digest).
fn lun_state(lab: &Lab) -> (bool, u64, Option<String>) {
    let s = lab.status("rack1").expect("status").splicer;
    let l = s.luns.first().expect("one declared LUN");
    (l.served, l.manifest_seq, l.digest.clone())
}

/// Waits (bounded) until rack1 has installed a manifest newer than `seq` (served
/// from then on, once the target has told the LUN's geometry: every copy asks).
fn wait_manifest_after(lab: &Lab, seq: u64, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let (_, s, digest) = lun_state(lab);
        if digest.is_some() && s > seq {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "rack1 has no manifest after #{seq} within {within:?}: {:?}\n{}",
            lab.status("rack1").map(|s| s.splicer.luns),
            lab.appliance_log("rack1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn served_reads(lab: &Lab) -> (u64, u64) {
    let s = lab.status("rack1").expect("status").splicer;
    (s.reads_served_shadow + s.reads_served_local, s.reads_passed)
}

fn copy(lab: &Lab, name: &str) -> Vec<u8> {
    lab.qemu_copy("hv1", &lab.lun_url(IQN, 1), name, "rack1")
}

#[test]
fn a_changed_image_is_served_from_its_new_manifest() {
    let (old, new) = (image(1), image(2));
    assert_ne!(old, new);
    let mut lab = Lab::default_topology().expect("lab");
    let backing = lab.write_file("lun.raw", &old).unwrap();
    lab.add_lun(LunSpec::read_only(IQN, backing.clone()))
        .unwrap();
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    fabric.start_indexer(&lab, "core", None).unwrap();
    fabric.start_library_agent(&lab, "core").unwrap();
    let rack1_cfg = fabric.indexer_config(&lab, "rack1", Some("core")).unwrap();
    let lib = lab.library().to_string();
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            steer: true,
            extra_config: format!(
                "[splicer]\nmanifest_refresh_ms = 200\nfetch_deadline_ms = 3000\nauthority = {lib:?}\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\n[indexer]\nconfig = {rack1_cfg:?}\n"
            ),
        },
    )
    .unwrap();
    let took = wait_manifest_after(&lab, 0, Duration::from_mins(1));
    eprintln!("first manifest installed after {took:.1?}");
    let (_, first_seq, first_digest) = lun_state(&lab);

    // Cold and warm copies of the old content (the cache now holds it all).
    assert!(copy(&lab, "cold") == old, "cold copy differs");
    let before = served_reads(&lab);
    assert!(copy(&lab, "warm") == old, "warm copy differs");
    let after = served_reads(&lab);
    assert!(
        after.0 > before.0 && after.1 == before.1,
        "warm copy served: {before:?} → {after:?}"
    );

    // A session logs in while the old manifest is current and reads block 0.
    let lib: SocketAddr = (lab.addr4(lab.library()), 3260).into();
    let stream = connect_in(&lab, "hv1", lib, Duration::from_secs(10)).expect("connect");
    let mut ini = Initiator::login(
        stream,
        LoginOptions::new("iqn.2026-11.test.initiator:current", IQN),
    )
    .expect("login");
    ini.clear_unit_attention(1, 3).expect("unit attention");
    let r = ini.read16(1, 0, 64, 512).expect("read");
    assert_eq!(r.data, old[..32768], "old content before the change");

    // The image changes in place (tgt serves the new bytes at once); the
    // agent re-indexes on SIGHUP; rack1's refresh installs the new manifest.
    std::fs::write(&backing, &new).unwrap();
    let t0 = Instant::now();
    fabric
        .procs
        .signal(&format!("agent-{}", lab.library()), libc::SIGHUP)
        .unwrap();
    wait_manifest_after(&lab, first_seq, Duration::from_secs(30));
    eprintln!(
        "new manifest served {:.1?} after the rescan was asked for",
        t0.elapsed()
    );
    let (_, _, digest) = lun_state(&lab);
    assert_ne!(digest, first_digest);

    // The open session's next READs: the new content, served locally from
    // the new manifest (blocks fetched by hash from the library's agent).
    let before = served_reads(&lab);
    for lba in [0u64, 64, 4096] {
        let r = ini.read16(1, lba, 64, 512).expect("read");
        let at = lba as usize * 512;
        assert!(r.data == new[at..at + 32768], "stale data at LBA {lba}");
    }
    let after = served_reads(&lab);
    assert_eq!(
        after.0 - before.0,
        3,
        "all three READs served: {before:?} → {after:?}"
    );
    ini.logout().expect("logout");

    // A new copy: bit-identical to the new image, served, never the old.
    let before = served_reads(&lab);
    assert!(
        copy(&lab, "after-change") == new,
        "copy after the change differs"
    );
    let after = served_reads(&lab);
    assert!(after.0 > before.0, "copy served: {before:?} → {after:?}");
    assert_eq!(after.1, before.1, "nothing passed through");
    drop(fabric);
}
