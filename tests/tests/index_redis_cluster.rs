//! The global index on a real Redis Cluster (Debian's redis-server, 3 masters
//! + 3 replicas, TLS, ACL users; see `nearblock_lab::redis_cluster`):
//!
//! - the model-based store suite every backend passes (redb runs it in the
//!   unit tests);
//! - a batch interrupted at every step is invisible to readers until the next
//!   writer finishes it, then visible whole;
//! - one writer at a time; the password is required;
//! - a master killed during a stream of pushes: every acknowledged push is
//!   there afterwards and lookups answer or fail fast throughout.
//!
//! Each test starts its own cluster (about 3 s): a cluster shared through a
//! static would outlive the test process's tests, and its servers with it.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use nearblock::index::{
    redis_store::Interrupt,
    store_suite::{self, Backend, Model},
    BlockStore, Change, Manifest, RedisClusterStore, RedisOptions,
};
use nearblock_lab::redis_cluster::RedisCluster;

/// A cluster of this test's own (dropped, servers killed, when the test ends).
fn cluster() -> RedisCluster {
    RedisCluster::start().expect("start the redis cluster")
}

struct Redis {
    opts: RedisOptions,
    run: String,
}

impl Backend for Redis {
    type Store = RedisClusterStore;
    fn fresh(&mut self, case: u64) -> RedisClusterStore {
        let mut o = self.opts.clone();
        o.key_prefix = format!("{}-{case}", self.run);
        RedisClusterStore::open(o).expect("open")
    }
    fn reopen(&mut self, store: RedisClusterStore, case: u64) -> RedisClusterStore {
        drop(store);
        self.fresh(case)
    }
    fn coarse(&self) -> Option<u32> {
        self.opts.coarse
    }
}

#[test]
fn redis_cluster_passes_the_store_suite() {
    let c = cluster();
    for (i, coarse) in [Some(16), Some(2), None].into_iter().enumerate() {
        let mut opts = c.options("unused").unwrap();
        opts.coarse = coarse;
        let mut b = Redis {
            opts,
            run: format!("suite{i}"),
        };
        store_suite::run(&mut b, 0x5eed + i as u64, 12);
    }
}

fn put(host: &str, image: &str, names: &[u8]) -> Change {
    Change::PutImage {
        host: host.into(),
        manifest: Manifest {
            image: image.into(),
            size: names.len() as u64 * 4096,
            block_size: 4096,
            blocks: names.iter().map(|&n| Some(store_suite::name(n))).collect(),
        },
    }
}

#[test]
fn an_interrupted_batch_is_invisible_until_the_next_writer_finishes_it() {
    let c = cluster();
    let first = vec![put("h1", "a", &[1, 2, 3]), put("h2", "a", &[1, 4])];
    // Replaces one source, removes a host, patches another: entries appear and
    // go away in the same batch.
    let second = vec![
        put("h1", "a", &[2, 5, 5]),
        Change::RemoveHost { host: "h2".into() },
        Change::PatchImage {
            host: "h3".into(),
            image: "b".into(),
            block_size: 4096,
            size: 3 * 4096,
            blocks: vec![(2, Some(store_suite::name(1)))],
        },
    ];
    let mut before = Model::default();
    for ch in &first {
        before.apply(ch);
    }
    let mut after = before.clone();
    for ch in &second {
        after.apply(ch);
    }
    for at in [
        Interrupt::AfterLog,
        Interrupt::MidWrite,
        Interrupt::AfterCommit,
    ] {
        let mut opts = c.options(&format!("interrupt-{at:?}")).unwrap();
        opts.coarse = Some(2);
        let w = RedisClusterStore::open(opts.clone()).unwrap();
        w.apply(&first).unwrap();
        w.interrupt_at(at);
        let e = w.apply(&second).unwrap_err().to_string();
        assert!(e.contains("interrupted"), "{e}");
        drop(w); // the writer "dies" here
        let r = RedisClusterStore::open_reader(opts.clone()).unwrap();
        let seen = if at == Interrupt::AfterCommit {
            &after
        } else {
            &before
        };
        store_suite::check(&r, seen, opts.coarse)
            .unwrap_or_else(|e| panic!("a reader after an interrupt {at:?}: {e}"));
        assert!(r.apply(&first).is_err(), "a reader may not write");
        // The next writer finishes the batch (or its cleaning) on open.
        let w = RedisClusterStore::open(opts.clone()).unwrap();
        store_suite::check(&w, &after, opts.coarse)
            .unwrap_or_else(|e| panic!("the next writer after {at:?}: {e}"));
        store_suite::check(&r, &after, opts.coarse)
            .unwrap_or_else(|e| panic!("the reader after recovery from {at:?}: {e}"));
        // And goes on from there.
        let mut more = after.clone();
        let third = vec![put("h3", "c", &[3])];
        for ch in &third {
            more.apply(ch);
        }
        w.apply(&third).unwrap();
        store_suite::check(&r, &more, opts.coarse).unwrap();
    }
}

#[test]
fn one_writer_at_a_time_and_no_entry_without_the_password() {
    let c = cluster();
    let opts = c.options("writers").unwrap();
    let a = RedisClusterStore::open(opts.clone()).unwrap();
    a.apply(&[put("h1", "a", &[1])]).unwrap();
    let b = RedisClusterStore::open(opts.clone()).unwrap();
    let e = a.apply(&[put("h1", "b", &[2])]).unwrap_err().to_string();
    assert!(e.contains("another writer"), "{e}");
    assert_eq!(b.apply(&[put("h1", "c", &[3])]).unwrap(), 2);
    let mut bad = opts.clone();
    bad.password = "wrong".into();
    let e = RedisClusterStore::open(bad)
        .err()
        .expect("a wrong password is refused");
    assert!(e.to_string().to_lowercase().contains("pass"), "{e}");
    let mut plain = opts.clone();
    plain.tls_ca = None;
    assert!(
        RedisClusterStore::open(plain).is_err(),
        "plain text is not served"
    );
}

/// A master is killed during a stream of pushes (one new source per push);
/// afterwards every push that was acknowledged is there. Meanwhile a reader
/// looks up a known name in a loop: each lookup answers or fails within the
/// store's timeout (the sourcing code then falls back to the library), and
/// lookups answer again after the failover.
#[test]
fn a_master_killed_mid_stream_loses_no_acknowledged_push() {
    let mut cluster = cluster();
    let mut opts = cluster.options("failover").unwrap();
    opts.coarse = None;
    opts.wait = Duration::from_millis(500);
    let writer = Arc::new(RedisClusterStore::open(opts.clone()).unwrap());
    writer.apply(&[put("lib", "seed", &[1, 2, 3])]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Set once the cluster is whole again: lookups after it must answer.
    let healed = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let pushed = Arc::new(AtomicU64::new(0));
    let push_loop = {
        let (w, stop, acked, pushed) =
            (writer.clone(), stop.clone(), acked.clone(), pushed.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_mins(2) {
                n += 1;
                pushed.store(n, Ordering::Relaxed);
                let names: Vec<u8> = (0..8).map(|i| ((n + i) % 251) as u8).collect();
                if w.apply(&[put("hv", &format!("vm{n}"), &names)]).is_ok() {
                    acked.lock().unwrap().push(n);
                }
            }
        })
    };
    let lookup_loop = {
        let (stop, healed, opts) = (stop.clone(), healed.clone(), opts.clone());
        std::thread::spawn(move || {
            let reader = RedisClusterStore::open_reader(opts).unwrap();
            let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
            let mut ok_healed = 0u32;
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_mins(2) {
                let started = Instant::now();
                match reader.holders(&store_suite::name(1)) {
                    Ok(h) if h.iter().any(|l| &*l.image == "seed") => {
                        ok += 1;
                        ok_healed += u32::from(healed.load(Ordering::Relaxed));
                    }
                    Ok(h) => panic!("the seed's holder is missing: {h:?}"),
                    Err(_) => failed += 1,
                }
                slowest = slowest.max(started.elapsed());
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed, slowest, ok_healed)
        })
    };
    let wait_pushes = |from: u64, more: u64| {
        let t0 = Instant::now();
        while acked.lock().unwrap().iter().filter(|&&n| n > from).count() < more as usize {
            assert!(t0.elapsed() < Duration::from_mins(1), "pushes stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_pushes(0, 20);
    let victim = cluster.a_master().unwrap();
    let killed_at = pushed.load(Ordering::Relaxed);
    cluster.kill(victim).unwrap();
    // The replica takes over after cluster-node-timeout; pushes that reach the
    // new master without a replica to WAIT for are refused, not acknowledged.
    std::thread::sleep(Duration::from_secs(5));
    cluster.restart(victim).unwrap();
    cluster.wait_ok(Duration::from_mins(1)).unwrap();
    healed.store(true, Ordering::Relaxed);
    wait_pushes(killed_at, 20);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    push_loop.join().unwrap();
    let (ok, failed, slowest, ok_healed) = lookup_loop.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    let check = RedisClusterStore::open_reader(opts.clone()).unwrap();
    let images = check.images().unwrap();
    for n in &acked {
        let name = format!("vm{n}");
        assert!(
            images.iter().any(|i| i.image == name),
            "acknowledged push {n} lost (killed at push {killed_at})"
        );
        let m = check
            .manifest_at("hv", &name, 4096)
            .unwrap()
            .expect("manifest");
        assert_eq!(m.blocks.len(), 8);
    }
    eprintln!(
        "failover: {} pushes acknowledged of {}; lookups {ok} answered, {failed} failed, \
         slowest {slowest:?}",
        acked.len(),
        pushed.load(Ordering::Relaxed)
    );
    assert!(ok > 0 && acked.len() >= 40);
    assert!(
        ok_healed > 0,
        "lookups did not answer again after the failover"
    );
    // Lookups fail fast, never hang: the store's timeout plus its retries.
    assert!(
        slowest < Duration::from_secs(10),
        "a lookup took {slowest:?}"
    );
}
