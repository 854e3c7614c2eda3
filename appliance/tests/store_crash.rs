//! SIGKILL during updates loses nothing committed and never corrupts the store.
//!
//! The test re-executes its own binary as a child (`crash_child`, active only with
//! `NB_CRASH_CHILD=<db>`) that indexes image after image into the store, printing
//! each committed sequence number, with snapshot compaction after almost every
//! commit (so kills also land mid-compaction). The parent kills it at varying
//! moments, reopens, and checks every change the child reported as committed.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use nearblock::index::{BlockHash, BlockStore, Change, Manifest, RedbStore, StoreOptions};

fn opts() -> StoreOptions {
    StoreOptions {
        compact_min: 5_000,
        close_compact_min: 5_000,
        ..StoreOptions::default()
    }
}

fn image(s: u64) -> Manifest {
    let n = 20_000u64;
    Manifest {
        image: format!("img{s}"),
        size: n * 4096,
        block_size: 4096,
        blocks: (0..n)
            .map(|i| (i % 5 != 0).then(|| BlockHash::of(&(s * 7 + i % 1000).to_le_bytes())))
            .collect(),
    }
}

#[test]
fn crash_child() {
    let Some(db) = std::env::var_os("NB_CRASH_CHILD") else {
        return; // only a child when asked
    };
    let store = RedbStore::open(db.as_ref(), opts()).unwrap();
    let mut s = store.images().unwrap().len() as u64;
    loop {
        let seq = store
            .apply(&[Change::PutImage {
                host: "h".into(),
                manifest: image(s),
            }])
            .unwrap();
        println!("committed {seq} {s}");
        s += 1;
    }
}

#[test]
fn sigkill_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idx.redb");
    let exe = std::env::current_exe().unwrap();
    let mut committed = 0u64; // images 0..committed were reported committed
    for (round, delay_ms) in [0u64, 3, 11, 29, 1, 47].into_iter().enumerate() {
        let mut c = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("NB_CRASH_CHILD", &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while seen < 2 {
            let l = lines.next().expect("child exited").unwrap();
            if let Some(rest) = l.strip_prefix("committed ") {
                let s: u64 = rest.split_whitespace().nth(1).unwrap().parse().unwrap();
                committed = committed.max(s + 1);
                seen += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        c.kill().unwrap();
        // Lines already written before the kill are commits too.
        for l in lines.map_while(Result::ok) {
            if let Some(rest) = l.strip_prefix("committed ") {
                let s: u64 = rest.split_whitespace().nth(1).unwrap().parse().unwrap();
                committed = committed.max(s + 1);
            }
        }
        c.wait().unwrap();
        let store = RedbStore::open(&db, opts()).unwrap();
        let n = store.images().unwrap().len() as u64;
        assert!(
            n >= committed,
            "round {round}: {n} images < {committed} committed"
        );
        assert_eq!(store.seq(), n, "one change per image");
        for s in 0..n {
            let m = store
                .manifest_at("h", &format!("img{s}"), 4096)
                .unwrap()
                .unwrap();
            assert_eq!(m, image(s));
            let h = m.blocks[1].unwrap();
            assert!(
                store
                    .holders(&h)
                    .unwrap()
                    .iter()
                    .any(|l| l.offset == 4096 && &*l.image == format!("img{s}").as_str()),
                "round {round}: holder of img{s} block 1 missing"
            );
        }
        committed = n;
        drop(store);
    }
}
