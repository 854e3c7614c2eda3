//! The upward push, without the network: local stores' changes replayed into a
//! parent (and a grandparent) give the parent the union of their holders, deltas
//! included, and acknowledged changes can be trimmed.

use nearblock::index::{
    chunk::manifest_of_bytes,
    delta::{index_file, Policy},
    BlockStore, RedbStore, StoreOptions,
};

/// Pushes everything `child` logged after `acked` into `parent`; returns the new
/// acknowledged sequence number (what a pusher keeps).
fn push(child: &RedbStore, parent: &RedbStore, acked: u64) -> u64 {
    let mut acked = acked;
    loop {
        let batch = child.changes_since(acked, 2).unwrap();
        let Some(&(last, _)) = batch.last() else {
            return acked;
        };
        let changes: Vec<_> = batch.into_iter().map(|(_, c)| c).collect();
        parent.apply(&changes).unwrap();
        child.trim_log(last).unwrap();
        acked = last;
    }
}

#[test]
fn three_levels() {
    let dir = tempfile::tempdir().unwrap();
    let open = |n: &str| RedbStore::open(&dir.path().join(n), StoreOptions::default()).unwrap();
    let (rack1, rack2, region, global) = (open("r1"), open("r2"), open("region"), open("g"));
    let img = |seed: u8| -> Vec<u8> {
        (0..200 * 4096)
            .map(|i: usize| {
                if (i / 4096).is_multiple_of(3) {
                    0
                } else {
                    (i / 4096) as u8 ^ seed
                }
            })
            .collect()
    };
    let p1 = dir.path().join("base.raw");
    let p2 = dir.path().join("derived.raw");
    std::fs::write(&p1, img(0)).unwrap();
    let mut d = img(0);
    d[5 * 4096] ^= 1; // derived: one block differs
    std::fs::write(&p2, &d).unwrap();
    let pol = Policy::default();
    index_file(&rack1, "h1", "base", &p1, &[4096, 16384], &pol, &|_| {}).unwrap();
    index_file(&rack2, "h2", "derived", &p2, &[4096], &pol, &|_| {}).unwrap();

    let (mut a1, mut a2, mut ar) = (0, 0, 0);
    a1 = push(&rack1, &region, a1);
    a2 = push(&rack2, &region, a2);
    ar = push(&region, &global, ar);
    assert!(rack1.changes_since(0, 10).unwrap().is_empty(), "trimmed");

    let base = manifest_of_bytes("base", &img(0), 4096);
    let b1 = base.blocks[1].unwrap();
    let hosts = |s: &RedbStore| {
        let mut v: Vec<String> = s
            .holders(&b1)
            .unwrap()
            .iter()
            .map(|l| l.host.to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(hosts(&region), ["h1", "h2"]);
    assert_eq!(hosts(&global), ["h1", "h2"]);
    assert_eq!(global.images().unwrap().len(), 3);
    assert_eq!(global.manifest("base", None).unwrap().unwrap(), base);

    // A change on rack 2 (the derived image is rewritten to equal the base) travels
    // up as a one-block delta.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&p2, img(0)).unwrap();
    let r = index_file(&rack2, "h2", "derived", &p2, &[4096], &pol, &|_| {}).unwrap();
    assert_eq!(
        r[0].outcome,
        nearblock::index::delta::Outcome::Delta { changed: 1 }
    );
    let before = global.seq();
    a2 = push(&rack2, &region, a2);
    ar = push(&region, &global, ar);
    assert_eq!(global.seq(), before + 1, "one change: the patch");
    let b5 = base.blocks[5].unwrap();
    let mut h: Vec<String> = global
        .holders(&b5)
        .unwrap()
        .iter()
        .map(|l| l.host.to_string())
        .collect();
    h.sort();
    assert_eq!(h, ["h1", "h2"]);
    let _ = (a1, a2, ar);

    // Removing a host anywhere below removes it everywhere above after a push.
    rack1
        .apply(&[nearblock::index::Change::RemoveHost { host: "h1".into() }])
        .unwrap();
    push(&rack1, &region, 0);
    push(&region, &global, ar);
    assert_eq!(hosts(&global), ["h2"]);
}
