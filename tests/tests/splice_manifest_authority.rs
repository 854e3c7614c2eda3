//! A served LUN's manifest comes only from its authority (issue 10, done-when 1).
//!
//! The library exports a LUN (tgtd) and its agent indexes it as host `library`
//! (`IQN/1`, pushed to core, the global index). A hypervisor's agent (hv1)
//! indexes a *different* image that it really holds and serves, under the
//! *same* image name, and pushes it to rack1's embedded indexer (which pushes
//! it on to core): both indexes now hold two manifests named `IQN/1`, hv1's the
//! newer. rack1 serves the LUN in the local design (cached READs never reach the
//! target) from its index, with `[splicer] authority = "library"`:
//!
//! - hv1's push is recorded as hv1's own holding (the indexes list hv1 as a
//!   holder of its blocks), never as the LUN's manifest: rack1 installs the
//!   library's (digest of the library's bytes, `nearblock status` names
//!   `library` as the authority);
//! - qemu-img copies from hv2 and from hv1 through rack1 are bit-identical to
//!   the library's bytes, and rack1 served their READs (the warm one without
//!   passing any through), so the cache was used with the library's manifest.
//!
//! Before the authority existed, rack1 took the newest manifest of the name from
//! any host (its own store first): it served hv1's blocks, fetched from hv1's
//! agent and verified against hv1's manifest, to every initiator. Run as root.

use std::time::{Duration, Instant};

use nearblock::splice::{catalog::LunStatus, manifests::digest_of};
use nearblock_lab::{fabric::Fabric, ApplianceOptions, Lab, LunSpec};

const IQN: &str = "iqn.2026-11.test.nearblock:authority";
const AGENT_PORT: u16 = 7420;
const INDEXER_PORT: u16 = 7421;
const SIZE: usize = 4 << 20;
/// The agents' default indexed block size (what the manifests are cut at).
const BLOCK: u32 = 4096;

/// An image of `SIZE` bytes: 4 KiB blocks stamped with `seed` and their number,
/// every eighth block zero (so zero blocks are shared, nothing else is).
fn image(seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    for (i, b) in v.chunks_mut(4096).enumerate() {
        if i % 8 == 7 {
            continue;
        }
        for (j, x) in b.iter_mut().enumerate() {
            *x = (j as u8) ^ (i as u8).wrapping_mul(31) ^ seed.wrapping_mul(97) | 1;
        }
        b[0] = seed;
        b[1] = i as u8;
        b[2] = (i >> 8) as u8;
    }
    v
}

/// The digest rack1 reports for a manifest of `data` under the LUN's name.
fn digest_hex(data: &[u8]) -> String {
    let name = format!("{IQN}/1");
    let digest = digest_of(&nearblock::index::chunk::manifest_of_bytes(
        &name, data, BLOCK,
    ));
    blake3::Hash::from(digest).to_hex().to_string()
}

fn lun(lab: &Lab) -> LunStatus {
    let s = lab.status("rack1").expect("status").splicer;
    s.luns.into_iter().next().expect("one declared LUN")
}

/// (READs served, READs passed through) by rack1's splicer.
fn reads(lab: &Lab) -> (u64, u64) {
    let s = lab.status("rack1").expect("status").splicer;
    (s.reads_served_shadow + s.reads_served_local, s.reads_passed)
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: each step checks what the one before set up"
)]
fn a_hypervisors_manifest_under_a_library_luns_name_is_never_served() {
    let (library_bytes, hv1_bytes) = (image(1), image(2));
    assert_ne!(digest_hex(&library_bytes), digest_hex(&hv1_bytes));
    let mut lab = Lab::default_topology().expect("lab");
    let backing = lab.write_file("lun.raw", &library_bytes).unwrap();
    lab.add_lun(LunSpec::read_only(IQN, backing)).unwrap();
    let hv1_copy = lab.write_file("hv1-own.raw", &hv1_bytes).unwrap();
    let lib = lab.library().to_string();
    let name = format!("{IQN}/1");

    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    fabric.start_indexer(&lab, "core", None).unwrap();
    fabric.start_library_agent(&lab, "core").unwrap();
    let rack1_cfg = fabric.indexer_config(&lab, "rack1", Some("core")).unwrap();
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            steer: true,
            extra_config: format!(
                "[splicer]\nmanifest_refresh_ms = 200\nfetch_deadline_ms = 3000\nauthority = {lib:?}\n\
                 [[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\ndesign = \"local\"\n\
                 [indexer]\nconfig = {rack1_cfg:?}\n"
            ),
        },
    )
    .unwrap();
    // hv1 holds (and serves) its own image under the library LUN's name, and
    // pushes it to rack1's index.
    fabric
        .start_agent(&lab, "hv1", "rack1", &[(&name, &hv1_copy)], "")
        .unwrap();

    // Both holdings are in the indexes: the library's in core's, hv1's in
    // rack1's and (pushed up) core's, as hv1's own.
    let (lib_block, hv1_block) = (&library_bytes[..4096], &hv1_bytes[..4096]);
    let within = Duration::from_mins(1);
    let agent_log = |node: &str| fabric.procs.log(&format!("agent-{node}"));
    fabric
        .wait_holder(&lab, "core", lib_block, &lib, within)
        .unwrap_or_else(|e| panic!("{e}\n{}", agent_log(&lib)));
    for node in ["rack1", "core"] {
        fabric
            .wait_holder(&lab, node, hv1_block, "hv1", within)
            .unwrap_or_else(|e| panic!("{e}\n{}", agent_log("hv1")));
    }
    assert!(
        fabric
            .holders(&lab, "rack1", hv1_block)
            .unwrap()
            .contains(&Fabric::addr(&lab, "hv1", AGENT_PORT)),
        "hv1 serves its own blocks"
    );

    // rack1 has a manifest; several refreshes later (hv1's holding in its own
    // store all along) it is still the library's.
    let t0 = Instant::now();
    while lun(&lab).digest.is_none() {
        assert!(
            t0.elapsed() < within,
            "rack1 has no manifest within {within:?}: {:?}\n{}",
            lun(&lab),
            lab.appliance_log("rack1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let l = lun(&lab);
    eprintln!("rack1's LUN: {l:?}");
    assert_eq!(
        l.digest.as_deref(),
        Some(digest_hex(&library_bytes).as_str()),
        "rack1 installed a manifest other than the library's (hv1's is {})",
        digest_hex(&hv1_bytes)
    );
    assert_eq!(l.authority.as_deref(), Some(lib.as_str()), "{l:?}");
    assert_eq!(l.image.as_deref(), Some(name.as_str()));
    assert_eq!(l.manifest_seq, 1, "never replaced: {l:?}");

    // Copies from hv2 (cold) and hv1 (warm): the library's bytes, served.
    let url = lab.lun_url(IQN, 1);
    let before = reads(&lab);
    assert!(
        lab.qemu_copy("hv2", &url, "hv2-cold", "rack1") == library_bytes,
        "hv2's copy differs from the library's bytes"
    );
    let cold = reads(&lab);
    assert!(cold.0 > before.0, "cold copy served: {before:?} → {cold:?}");
    assert!(
        lab.qemu_copy("hv1", &url, "hv1-warm", "rack1") == library_bytes,
        "hv1's copy differs from the library's bytes"
    );
    let warm = reads(&lab);
    assert!(
        warm.0 > cold.0 && warm.1 == cold.1,
        "warm copy served, nothing passed through: {cold:?} → {warm:?}"
    );
    let l = lun(&lab);
    assert!(l.served && l.manifest_seq == 1, "{l:?}");
    assert_eq!(l.authority.as_deref(), Some(lib.as_str()));
    // What an operator reads: the LUN's line names the authority.
    let bin = nearblock_lab::nearblock_bin().unwrap();
    let token = lab.api_read_token_file();
    let out = lab
        .exec_ok(
            "rack1",
            &[
                bin.to_str().unwrap(),
                "status",
                "--token-file",
                token.to_str().unwrap(),
            ],
        )
        .expect("nearblock status");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("no line for {name}:\n{text}"));
    assert!(
        line.contains("  served  ") && line.contains(&format!("from parent, {lib}'s holding")),
        "{line}"
    );
    let st = lab.status("rack1").expect("status").splicer;
    eprintln!(
        "copies served {}; passed through {} B",
        nearblock_lab::served_by_source(&st),
        st.library_bytes
    );
    drop(fabric);
}
