//! The iSCSI-aware splicer judged by libiscsi's conformance suite: every test must
//! come out the same (passed, skipped or failed) through the rack appliance as
//! directly against tgtd. Run as root, after `cargo build -p nearblock`.

use std::path::PathBuf;

use nearblock_lab::{
    conformance::{self, Results},
    content, ApplianceOptions, Lab, LunSpec,
};

const IQN: &str = "iqn.2026-11.test.nearblock:conf";
const LUN_MIB: usize = 64;

fn run(lab: &Lab, url: &str, name: &str) -> Results {
    let dir = lab.dir.path().join(format!("cu-{name}"));
    let (results, _) = conformance::run(lab, "hv1", url, &dir).expect("iscsi-test-cu");
    let (p, s, f) = conformance::summary(&results);
    eprintln!(
        "{name}: {} test runs: {p} passed, {s} skipped, {f} failed",
        results.len()
    );
    results
}

fn assert_same(direct: &Results, through: &Results, what: &str) {
    let diff = conformance::differences(direct, through);
    assert!(
        diff.is_empty(),
        "{what}: {} tests differ from direct:\n{}",
        diff.len(),
        diff.join("\n")
    );
}

/// Increment 1: PDU-aware pass-through (no LUN served) on a writable scratch LUN,
/// restored to the same content before each run.
#[test]
fn pass_through_matches_direct() {
    let mut lab = Lab::default_topology().expect("lab");
    let data = content::image(LUN_MIB << 20, 7, 30);
    let backing: PathBuf = lab.write_file("scratch.raw", &data).expect("backing");
    lab.add_lun(LunSpec {
        tid: 1,
        iqn: IQN.into(),
        lun: 1,
        backing,
        readonly: false,
        allow: None,
    })
    .expect("lun");
    let url = lab.lun_url(IQN, 1);
    let direct = run(&lab, &url, "direct");

    lab.write_file("scratch.raw", &data).expect("restore");
    lab.start_appliance("rack1", ApplianceOptions::default())
        .expect("appliance");
    let through = run(&lab, &url, "through");
    let r = lab.status("rack1").expect("status");
    assert!(
        r.splicer.accepted >= 10,
        "suite not spliced: {:?}",
        r.splicer
    );
    assert_eq!(r.splicer.protocol_errors, 0, "{:?}", r.splicer);
    assert_same(&direct, &through, "pass-through");
}
