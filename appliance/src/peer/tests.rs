//! In-process tests of server + client + indexer over loopback TCP, with fake
//! block sources.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::{io::AsyncWriteExt, net::TcpListener};

use super::{
    client::{ClientOptions, FetchError, PeerClient},
    identity::{testing, Credentials},
    indexer::{IndexService, PushStatus, Pusher},
    proto::{BlockReply, Msg, Role},
    server::{serve, BlockSource, ServerMetrics, ServerOptions, Services},
};
use crate::index::{
    chunk::manifest_of_bytes, BlockHash, BlockStore, Change, RedbStore, StoreOptions,
};

/// The peers-file entry of the test indexer `rack1` (speaks for every host).
fn rack1() -> super::identity::PeerEntry {
    super::identity::PeerEntry {
        name: "rack1".into(),
        role: Role::Indexer,
        hosts: vec!["*".into()],
    }
}

/// A test node's credentials (an indexer speaks for every host).
fn creds(name: &str, role: Role) -> Credentials {
    match role {
        Role::Indexer => testing::creds(name, role, &["*"]),
        _ => testing::creds(name, role, &[]),
    }
}

/// Serves a map; `corrupt` flips a bit of every block it serves.
struct Fake {
    blocks: HashMap<BlockHash, Bytes>,
    corrupt: bool,
    served: AtomicUsize,
}

impl Fake {
    fn new(blocks: &[Vec<u8>], corrupt: bool) -> Arc<Self> {
        Arc::new(Fake {
            blocks: blocks
                .iter()
                .map(|b| (BlockHash::of(b), Bytes::from(b.clone())))
                .collect(),
            corrupt,
            served: AtomicUsize::new(0),
        })
    }
}

impl BlockSource for Fake {
    fn read_blocks(&self, hashes: &[BlockHash], budget: usize) -> Vec<BlockReply> {
        let mut used = 0;
        hashes
            .iter()
            .map(|h| match self.blocks.get(h) {
                Some(b) if used > 0 && used + b.len() > budget => BlockReply::Skipped,
                Some(b) => {
                    used += b.len();
                    self.served.fetch_add(1, Ordering::Relaxed);
                    if self.corrupt {
                        let mut v = b.to_vec();
                        v[100] ^= 0x10;
                        BlockReply::Found(v.into())
                    } else {
                        BlockReply::Found(b.clone())
                    }
                }
                None => BlockReply::NotFound,
            })
            .collect()
    }
}

async fn start(services: Services, max_frame: u32) -> (String, Arc<ServerMetrics>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let mut o = ServerOptions::new("srv", Role::Agent, creds("srv", Role::Agent));
    o.max_frame = max_frame;
    let m = Arc::new(ServerMetrics::default());
    tokio::spawn(serve(l, Arc::new(o), services, m.clone()));
    (addr, m)
}

fn blocks_src(b: Arc<Fake>) -> Services {
    Services {
        blocks: Some(b as Arc<dyn BlockSource>),
        ..Default::default()
    }
}

fn client() -> PeerClient {
    client_with(creds("cli", Role::Client))
}

fn client_with(creds: Credentials) -> PeerClient {
    let mut o = ClientOptions::new("cli", Role::Client, creds);
    o.batch = 7;
    o.max_in_flight = 3;
    o.request_timeout = Duration::from_secs(20);
    PeerClient::new(o)
}

fn block(i: u32) -> Vec<u8> {
    (0..4096u32)
        .map(|j| (i.wrapping_mul(31) ^ j) as u8)
        .collect()
}

#[expect(
    clippy::many_single_char_names,
    reason = "short names for the test's server, client and blocks"
)]
#[tokio::test]
async fn fetch_many_blocks_batched_and_pipelined() {
    let bs: Vec<Vec<u8>> = (0..100).map(block).collect();
    let (addr, m) = start(blocks_src(Fake::new(&bs, false)), 1 << 20).await;
    let c = client();
    let mut hashes: Vec<BlockHash> = bs.iter().map(|b| BlockHash::of(b)).collect();
    let unknown = BlockHash::of(b"nobody has this");
    hashes.push(unknown);
    let r = c.peer(&addr).fetch_blocks(&hashes).await;
    for (i, b) in bs.iter().enumerate() {
        assert_eq!(r[i].as_ref().unwrap()[..], b[..]);
    }
    assert!(
        matches!(r[100], Err(FetchError::NotFound { .. })),
        "{:?}",
        r[100]
    );
    let s = c.metrics();
    assert_eq!((s.blocks_ok, s.not_found, s.mismatches), (100, 1, 0));
    assert_eq!(s.connects, 1, "one pipelined connection");
    assert!(s.requests >= 15, "batches of 7: {}", s.requests);
    assert_eq!(m.blocks_served.load(Ordering::Relaxed), 100);
    // Concurrent callers share the connection.
    let p = c.peer(&addr);
    let mut set = tokio::task::JoinSet::new();
    for k in 0..8 {
        let (p, hs) = (p.clone(), hashes[k * 10..k * 10 + 10].to_vec());
        set.spawn(async move { p.fetch_blocks(&hs).await.into_iter().all(|r| r.is_ok()) });
    }
    while let Some(ok) = set.join_next().await {
        assert!(ok.unwrap());
    }
    assert_eq!(c.metrics().connects, 1);
}

#[tokio::test]
async fn replies_above_the_frame_limit_are_split() {
    // 2 MiB frames, 64 KiB blocks: one request of 100 blocks cannot be answered in
    // one frame; the server skips the rest and the client asks again.
    let bs: Vec<Vec<u8>> = (0..100u32)
        .map(|i| {
            (0..65536u32)
                .map(|j| (i ^ j.rotate_left(3)) as u8)
                .collect()
        })
        .collect();
    let (addr, _) = start(blocks_src(Fake::new(&bs, false)), 2 << 20).await;
    let mut o = ClientOptions::new("cli", Role::Client, creds("cli", Role::Client));
    o.batch = 100;
    let c = PeerClient::new(o);
    let hashes: Vec<BlockHash> = bs.iter().map(|b| BlockHash::of(b)).collect();
    let r = c.peer(&addr).fetch_blocks(&hashes).await;
    assert!(r.iter().all(Result::is_ok));
    assert!(c.metrics().requests >= 4, "{:?}", c.metrics());
}

#[expect(
    clippy::many_single_char_names,
    reason = "short names for the test's server, client and blocks"
)]
#[tokio::test]
async fn corrupt_copy_is_rejected_penalised_and_fetched_elsewhere() {
    let bs: Vec<Vec<u8>> = (0..5).map(block).collect();
    let (bad, _) = start(blocks_src(Fake::new(&bs, true)), 1 << 20).await;
    let good_src = Fake::new(&bs, false);
    let (good, _) = start(blocks_src(good_src.clone()), 1 << 20).await;
    let c = client();
    let h = BlockHash::of(&bs[0]);
    let f = c
        .fetch_from_any(&h, &[bad.clone(), good.clone()])
        .await
        .unwrap();
    assert_eq!(f.data[..], bs[0][..]);
    assert_eq!(&*f.from, good.as_str());
    assert!(
        matches!(f.failed[..], [FetchError::Mismatch { .. }]),
        "{:?}",
        f.failed
    );
    let s = c.metrics();
    assert_eq!((s.mismatches, s.penalties, s.blocks_ok), (1, 1, 1));
    assert!(c.peer(&bad).is_penalised());
    assert_eq!(c.peer(&bad).mismatches(), 1);
    // The penalised peer is now tried last, though listed first.
    assert_eq!(
        c.order(&[bad.clone(), good.clone()]),
        [good.clone(), bad.clone()]
    );
    let f = c
        .fetch_from_any(&BlockHash::of(&bs[1]), &[bad.clone(), good.clone()])
        .await
        .unwrap();
    assert_eq!(&*f.from, good.as_str());
    assert!(f.failed.is_empty());
    // Many blocks at once: all from the good peer.
    let wants: Vec<_> = bs
        .iter()
        .map(|b| (BlockHash::of(b), Arc::from(vec![bad.clone(), good.clone()])))
        .collect();
    assert!(c
        .fetch_many(&wants)
        .await
        .iter()
        .all(|r| r.as_ref().is_ok_and(|f| *f.from == *good)));
    // Only the bad holder: the block is not returned.
    let mut o = ClientOptions::new("c2", Role::Client, creds("c2", Role::Client));
    o.penalty = Duration::from_millis(1);
    let c2 = PeerClient::new(o);
    let e = c2
        .fetch_from_any(&h, std::slice::from_ref(&bad))
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Mismatch { .. }), "{e}");
    // No holders at all.
    assert_eq!(
        c2.fetch_from_any(&h, &[]).await.unwrap_err(),
        FetchError::NoHolders
    );
}

#[tokio::test]
async fn an_unlisted_key_cannot_pull_blocks() {
    let bs: Vec<Vec<u8>> = vec![block(1)];
    let src = Fake::new(&bs, false);
    let (addr, m) = start(blocks_src(src.clone()), 1 << 20).await;
    // A key the peers file does not list (the client itself knows the server).
    let c = client_with(Credentials {
        key: testing::key("a stranger's key"),
        keyring: testing::keyring(),
    });
    let r = c.peer(&addr).fetch_blocks(&[BlockHash::of(&bs[0])]).await;
    assert!(matches!(r[0], Err(FetchError::Auth { .. })), "{:?}", r[0]);
    assert_eq!(src.served.load(Ordering::Relaxed), 0);
    // The server counts the stranger it refused.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(m.auth_failures.load(Ordering::Relaxed), 1);
}

/// An authenticated channel to `addr`, for writing frames by hand.
async fn raw_channel(
    addr: &str,
) -> super::auth::Secured<tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf> {
    let (rd, wr) = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap()
        .into_split();
    super::auth::client_handshake(
        rd,
        wr,
        &creds("raw", Role::Client),
        Role::Client,
        "raw",
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn malformed_frames_close_only_that_connection() {
    let bs: Vec<Vec<u8>> = vec![block(1)];
    let (addr, m) = start(blocks_src(Fake::new(&bs, false)), 1 << 20).await;
    // Authenticate by hand, then send garbage.
    let mut s = raw_channel(&addr).await;
    // Inside the channel: a frame of an unknown kind.
    s.writer
        .write_all(&[0, 0, 0, 12, 2, 250, 0, 0, 0, 0, 0, 0, 0, 1, 9, 9])
        .await
        .unwrap();
    s.writer.flush().await.unwrap();
    let mut buf = Vec::new();
    // The server answers the bad request with an error frame and closes.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut s.reader, &mut buf),
    )
    .await
    .expect("server closed the connection");
    assert_eq!(m.malformed.load(Ordering::Relaxed), 1);
    // An oversized length: closed as well.
    let mut s = raw_channel(&addr).await;
    s.writer.write_all(&[0x7f, 0, 0, 0]).await.unwrap();
    s.writer.flush().await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut s.reader, &mut buf),
    )
    .await
    .expect("closed");
    assert_eq!(m.malformed.load(Ordering::Relaxed), 2);
    // The server still serves others.
    let c = client();
    assert!(c.peer(&addr).fetch_blocks(&[BlockHash::of(&bs[0])]).await[0].is_ok());
}

#[tokio::test]
async fn dead_peer_is_an_error_not_a_hang() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let c = client();
    let r = c.peer(&addr).fetch_blocks(&[BlockHash::of(b"x")]).await;
    assert!(
        matches!(r[0], Err(FetchError::Connection { .. })),
        "{:?}",
        r[0]
    );
    // A server that accepts but never answers: the deadline fires.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let _keep = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            v.push(s);
        }
    });
    let mut o = ClientOptions::new("cli", Role::Client, creds("cli", Role::Client));
    o.connect_timeout = Duration::from_millis(200);
    let c = PeerClient::new(o);
    let r = c.peer(&addr).fetch_blocks(&[BlockHash::of(b"x")]).await;
    assert!(matches!(r[0], Err(FetchError::Auth { .. })), "{:?}", r[0]);
}

fn store(dir: &std::path::Path, name: &str, log: bool) -> Arc<RedbStore> {
    Arc::new(
        RedbStore::open(
            &dir.join(name),
            StoreOptions {
                log,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

fn put(host: &str, image: &str, seed: u8) -> (Change, Vec<u8>) {
    // Block k starts with (seed, k): distinct across images.
    let data: Vec<u8> = (0..40 * 4096)
        .map(|i: usize| match i % 4096 {
            0 => seed,
            1 => (i / 4096) as u8,
            j => j as u8,
        })
        .collect();
    (
        Change::PutImage {
            host: host.into(),
            manifest: manifest_of_bytes(image, &data, 4096),
        },
        data,
    )
}

/// A push larger than one frame (the `PutImage` of a big image) is sent in
/// fragments and applied whole; other requests on the connection are unaffected.
#[expect(
    clippy::many_single_char_names,
    reason = "short names for the test's server, client and blocks"
)]
#[tokio::test]
async fn large_push_is_fragmented() {
    let dir = tempfile::tempdir().unwrap();
    let ix = Arc::new(
        IndexService::open(
            "g",
            store(dir.path(), "g", false),
            None,
            dir.path().join("c.json"),
        )
        .unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let mut so = ServerOptions::new("g", Role::Indexer, creds("g", Role::Indexer));
    so.max_frame = 8192;
    so.max_message = 1 << 20;
    tokio::spawn(serve(
        l,
        Arc::new(so),
        Services {
            blocks: None,
            index: Some(ix.clone()),
            ..Default::default()
        },
        Arc::new(ServerMetrics::default()),
    ));
    let mut co = ClientOptions::new("rack", Role::Indexer, creds("rack", Role::Indexer));
    co.max_frame = 8192;
    let c = PeerClient::new(co);
    let data: Vec<u8> = (0..2000 * 4096usize)
        .map(|i| {
            if i % 4096 < 4 {
                ((i / 4096) >> (8 * (i % 4))) as u8
            } else {
                1
            }
        })
        .collect();
    let put = Change::PutImage {
        host: "hv9".into(),
        manifest: manifest_of_bytes("big", &data, 4096),
    };
    let enc = Bytes::from(put.encode());
    assert!(enc.len() > 4 * 8192, "{}", enc.len());
    let p = c.peer(&addr);
    let (seq, pong) = tokio::join!(
        p.push("rack", false, 0, vec![], vec![(1, enc)]),
        p.request(&Msg::Ping)
    );
    assert_eq!(seq.unwrap(), 1);
    assert_eq!(pong.unwrap(), Msg::Pong);
    let h = BlockHash::of(&data[4096 * 1999..]);
    assert_eq!(&*ix.store().holders(&h).unwrap()[0].host, "hv9");
    // Pushing under another child's name is refused.
    let e = p.push("rack2", false, 0, vec![], vec![]).await.unwrap_err();
    assert!(e.to_string().contains("authenticated as rack"), "{e}");
    // Beyond the message limit: the connection is closed, nothing applied.
    let huge = Bytes::from(vec![0u8; 2 << 20]);
    assert!(p
        .push("rack", false, 0, vec![], vec![(2, huge)])
        .await
        .is_err());
    assert_eq!(ix.child_state().acked["rack"], 1);
}

#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
#[tokio::test]
async fn push_is_idempotent_and_gaps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let parent = IndexService::open(
        "g",
        store(dir.path(), "g", false),
        None,
        dir.path().join("g.children.json"),
    )
    .unwrap();
    let (c1, _) = put("hv1", "a", 1);
    let (c2, _) = put("hv1", "b", 2);
    let enc = |s: u64, c: &Change| (s, Bytes::from(c.encode()));
    let addrs = vec![("hv1".to_string(), "1.2.3.4:7900".to_string())];
    let r = parent
        .push(
            &rack1(),
            false,
            0,
            addrs.clone(),
            vec![enc(1, &c1), enc(2, &c2)],
        )
        .await;
    assert_eq!(r, Msg::Ack { seq: 2 });
    let seq = parent.store().seq();
    // A retry of the same push (the ack was lost): nothing applied twice.
    let r = parent
        .push(
            &rack1(),
            false,
            0,
            addrs.clone(),
            vec![enc(1, &c1), enc(2, &c2)],
        )
        .await;
    assert_eq!(r, Msg::Ack { seq: 2 });
    assert_eq!(parent.store().seq(), seq);
    assert_eq!(parent.metrics.duplicates.load(Ordering::Relaxed), 2);
    // A gap: refused with what the parent has.
    match parent
        .push(&rack1(), false, 0, vec![], vec![enc(5, &c1)])
        .await
    {
        Msg::Error { code, acked, .. } => assert_eq!((code, acked), (super::proto::code::GAP, 2)),
        m => panic!("{m:?}"),
    }
    // The record survives a reopen (the sidecar).
    drop(parent);
    let parent = IndexService::open(
        "g",
        store(dir.path(), "g2", false),
        None,
        dir.path().join("g.children.json"),
    )
    .unwrap();
    assert_eq!(parent.child_state().acked["rack1"], 2);
    assert_eq!(parent.child_state().addrs["hv1"], "1.2.3.4:7900");
    // An empty push answers the record.
    assert_eq!(
        parent.push(&rack1(), false, 0, vec![], vec![]).await,
        Msg::Ack { seq: 2 }
    );
    // A resync restating only "b" removes "a" (the child no longer holds it);
    // sources of other children's hosts stay.
    // (The reopened service has a new, empty store: give it rack1's sources.)
    parent.store().apply(&[c1.clone(), c2.clone()]).unwrap();
    let (c3, _) = put("hv7", "c", 3);
    assert_eq!(
        parent
            .push(
                &super::identity::PeerEntry {
                    name: "rack2".into(),
                    ..rack1()
                },
                false,
                0,
                vec![],
                vec![enc(1, &c3)],
            )
            .await,
        Msg::Ack { seq: 1 }
    );
    assert_eq!(parent.store().images().unwrap().len(), 3);
    let r = parent
        .push(
            &rack1(),
            true,
            super::indexer::RESYNC_MORE,
            vec![],
            vec![enc(0, &c2)],
        )
        .await;
    assert_eq!(
        r,
        Msg::Ack { seq: 2 },
        "a resync piece acknowledges nothing new"
    );
    assert_eq!(
        parent.push(&rack1(), true, 7, vec![], vec![]).await,
        Msg::Ack { seq: 7 }
    );
    let mut imgs: Vec<String> = parent
        .store()
        .images()
        .unwrap()
        .into_iter()
        .map(|i| i.image)
        .collect();
    imgs.sort();
    assert_eq!(imgs, ["b", "c"]);
    // Garbage changes are refused by name, not applied; the push is acknowledged
    // past them so that the child does not resend them forever.
    match parent
        .push(
            &rack1(),
            false,
            0,
            vec![],
            vec![(8, Bytes::from_static(b"\x09"))],
        )
        .await
    {
        Msg::Error {
            code,
            acked,
            message,
        } => {
            assert_eq!((code, acked), (super::proto::code::REFUSED, 8));
            assert!(message.contains("change 8 from rack1"), "{message}");
        }
        m => panic!("{m:?}"),
    }
}

/// agent store → pusher → rack indexer (server) → pusher → global indexer
/// (server); holders asked at the rack fall back to the global; a global restart
/// with a new (empty) store makes the rack resync.
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
#[expect(
    clippy::many_single_char_names,
    reason = "short names for the scenario's nodes and stores"
)]
#[tokio::test]
async fn two_level_push_and_parent_fallback_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let start_ix = |name: &'static str, db: &'static str, parent: Option<String>| {
        let dir = dir.path().to_path_buf();
        async move {
            let st = store(&dir, db, parent.is_some());
            let client = PeerClient::new(ClientOptions::new(
                name,
                Role::Indexer,
                creds(name, Role::Indexer),
            ));
            let p = parent.map(|a| client.peer(&a));
            let ix = Arc::new(
                IndexService::open(
                    name,
                    st.clone(),
                    p.clone(),
                    dir.join(format!("{db}.children.json")),
                )
                .unwrap(),
            );
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let srv = tokio::spawn(serve(
                l,
                Arc::new(ServerOptions::new(
                    name,
                    Role::Indexer,
                    creds(name, Role::Indexer),
                )),
                Services {
                    blocks: None,
                    index: Some(ix.clone()),
                    ..Default::default()
                },
                Arc::new(ServerMetrics::default()),
            ));
            let status = Arc::new(PushStatus::default());
            let pusher = p.map(|p| {
                let ix2 = ix.clone();
                tokio::spawn(
                    Pusher {
                        node: name.into(),
                        store: st,
                        parent: p,
                        addrs: Arc::new(move || ix2.addrs()),
                        interval: Duration::from_millis(50),
                        max_changes: 1,
                        max_bytes: 1 << 20,
                        wake: ix.changed.clone(),
                        status: status.clone(),
                    }
                    .run(),
                )
            });
            (ix, addr, srv, pusher, status)
        }
    };
    let (g, gaddr, gsrv, _, _) = start_ix("global", "g", None).await;
    let (rack, raddr, _rsrv, _rp, rstatus) = start_ix("rack2", "r2", Some(gaddr.clone())).await;
    // The agent's store pushes to the rack.
    let agent = store(dir.path(), "agent", true);
    let (c, data) = put("hv3", "img", 3);
    agent.apply(&[c]).unwrap();
    let aclient = PeerClient::new(ClientOptions::new(
        "hv3",
        Role::Agent,
        creds("hv3", Role::Agent),
    ));
    let astatus = Arc::new(PushStatus::default());
    let _ap = tokio::spawn(
        Pusher {
            node: "hv3".into(),
            store: agent.clone(),
            parent: aclient.peer(&raddr),
            addrs: Arc::new(|| vec![("hv3".into(), "10.0.0.3:7900".into())]),
            interval: Duration::from_millis(50),
            max_changes: 16,
            max_bytes: 1 << 20,
            wake: Arc::new(tokio::sync::Notify::new()),
            status: astatus.clone(),
        }
        .run(),
    );
    let h = BlockHash::of(&data[4096 * 5..4096 * 6]);
    let q = PeerClient::new(ClientOptions::new(
        "q",
        Role::Client,
        creds("q", Role::Client),
    ));
    let wait_for = |addr: String, want: usize| {
        let q = &q;
        async move {
            for _ in 0..200 {
                if let Ok(r) = q.peer(&addr).holders(&[h], true).await {
                    if r[0].len() == want {
                        return r;
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("{addr}: holders never reached {want}");
        }
    };
    let r = wait_for(gaddr.clone(), 1).await;
    assert_eq!(&*r[0][0].location.host, "hv3");
    assert_eq!(r[0][0].addr.as_deref(), Some("10.0.0.3:7900"));
    assert_eq!(
        agent.changes_since(0, 10).unwrap().len(),
        0,
        "agent log trimmed"
    );
    // A rack lookup (local) of a block only the global knows: the rack asks its
    // parent. Put it straight into the global's store.
    let (c, other) = put("lib", "libimg", 9);
    g.store().apply(&[c]).unwrap();
    let ho = BlockHash::of(&other[..4096]);
    let r = q.peer(&raddr).holders(&[ho, h], false).await.unwrap();
    assert_eq!(&*r[0][0].location.host, "lib");
    assert_eq!(&*r[1][0].location.host, "hv3");
    assert!(q.peer(&raddr).holders(&[ho], true).await.unwrap()[0].is_empty());
    assert!(rack.metrics.parent_lookups.load(Ordering::Relaxed) >= 1);
    // The global comes back empty on the same address (state lost): the rack's
    // next push meets a parent that acknowledged nothing, and resyncs.
    gsrv.abort();
    drop(g);
    let _ = gsrv.await;
    let st = store(dir.path(), "g-new", false);
    let ix = Arc::new(
        IndexService::open(
            "global",
            st.clone(),
            None,
            dir.path().join("g-new.children.json"),
        )
        .unwrap(),
    );
    let l = loop {
        match TcpListener::bind(&gaddr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    tokio::spawn(serve(
        l,
        Arc::new(ServerOptions::new(
            "global",
            Role::Indexer,
            creds("global", Role::Indexer),
        )),
        Services {
            blocks: None,
            index: Some(ix.clone()),
            ..Default::default()
        },
        Arc::new(ServerMetrics::default()),
    ));
    // Another change at the agent travels up after the resync.
    let (c, _) = put("hv3", "img2", 4);
    agent.apply(&[c]).unwrap();
    for _ in 0..400 {
        if st.images().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(st.images().unwrap().len(), 2, "resynced: img + img2");
    assert!(rstatus.resyncs.load(Ordering::Relaxed) >= 1);
    let _ = astatus;
}

/// Loopback figures for docs/peer.md (not an assertion; the machine is shared):
/// `cargo test -p nearblock --release --lib peer::tests::measure_loopback -- --ignored --nocapture`
#[expect(
    clippy::many_single_char_names,
    reason = "short names for the test's server, client and blocks"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement that prints throughput, not a check: run by hand"]
async fn measure_loopback() {
    let n = 8192u32;
    let bs: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut v = block(i);
            v[..4].copy_from_slice(&i.to_le_bytes());
            v
        })
        .collect();
    let (addr, _) = start(blocks_src(Fake::new(&bs, false)), 32 << 20).await;
    let hashes: Vec<BlockHash> = bs.iter().map(|b| BlockHash::of(b)).collect();
    for (batch, inflight) in [(1, 1), (64, 1), (64, 16), (256, 16)] {
        let mut o = ClientOptions::new("m", Role::Client, creds("m", Role::Client));
        o.batch = batch;
        o.max_in_flight = inflight;
        let c = PeerClient::new(o);
        let p = c.peer(&addr);
        let _ = p.fetch_blocks(&hashes[..16]).await;
        let t = std::time::Instant::now();
        let r = p.fetch_blocks(&hashes).await;
        let dt = t.elapsed().as_secs_f64();
        assert!(r.iter().all(Result::is_ok));
        println!(
            "batch {batch:>3}, in flight {inflight:>2}: {:>8.0} blocks/s, {:>7.1} MB/s (verified)",
            f64::from(n) / dt,
            f64::from(n) * 4096.0 / dt / 1e6
        );
    }
    // Round trip of one single-block request.
    let c = client();
    let p = c.peer(&addr);
    let mut lat: Vec<f64> = Vec::new();
    for h in &hashes[..2000] {
        let t = std::time::Instant::now();
        assert!(p.fetch_blocks(std::slice::from_ref(h)).await[0].is_ok());
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "single-block request: p50 {:.0} µs, p99 {:.0} µs",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
    // blake3 of 4 KiB, for comparison.
    let t = std::time::Instant::now();
    for b in &bs {
        std::hint::black_box(BlockHash::of(b));
    }
    println!(
        "verification alone: {:.0} blocks/s",
        f64::from(n) / t.elapsed().as_secs_f64()
    );
}

/// An indexer on loopback with its store in `dir`, pushing to `parent` if any;
/// `extra` is appended to the config.
pub(crate) fn indexer_config(
    dir: &std::path::Path,
    node: &str,
    parent: Option<std::net::SocketAddr>,
    extra: &str,
) -> super::config::IndexerConfig {
    // Indexers speak for the hosts `hv*` in these tests; the peers file lists
    // every node the tests make (the keys `creds` gives them).
    const HOSTS: &[&str] = &["hv*"];
    let p = parent
        .map(|a| format!("parent = \"{a}\"\n"))
        .unwrap_or_default();
    let key_file = dir.join(format!("{node}.key"));
    if !key_file.exists() {
        testing::key_of(node, Role::Indexer, HOSTS)
            .save_new(&key_file)
            .unwrap();
    }
    let peers_file = dir.join("peers.toml");
    let no_hosts: &[&str] = &[];
    std::fs::write(
        &peers_file,
        testing::peers_text(&[
            ("g", Role::Indexer, HOSTS),
            ("r", Role::Indexer, HOSTS),
            ("hv5", Role::Agent, no_hosts),
            ("cli", Role::Client, no_hosts),
        ]),
    )
    .unwrap();
    // The tests' clients check these indexers against the shared keyring.
    let _ = testing::creds(node, Role::Indexer, HOSTS);
    super::config::IndexerConfig::parse(&format!(
        "node = \"{node}\"\nlisten = \"127.0.0.1:0\"\nkey_file = {key_file:?}\npeers_file = {peers_file:?}\ndb = {:?}\n{p}push_interval_ms = 50\n{extra}",
        dir.join(format!("{node}.redb"))
    ))
    .unwrap()
}

/// `start_indexer` from configs (as `nearblock indexer` and an embedding daemon
/// use it): a child's store change reaches the parent.
#[tokio::test]
async fn start_indexer_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |node: &str, parent| indexer_config(dir.path(), node, parent, "");
    let g = super::start_indexer(&cfg("g", None)).await.unwrap();
    let r = super::start_indexer(&cfg("r", Some(g.local_addr)))
        .await
        .unwrap();
    let (c, data) = put("hv5", "x", 5);
    r.service.store().apply(&[c]).unwrap();
    r.service.changed.notify_one();
    let h = BlockHash::of(&data[..4096]);
    // The child's status records the ack when the reply arrives, after the
    // parent applied the push: wait for that, not only for the parent's store.
    for _ in 0..200 {
        if r.push_status.acked.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(&*g.service.store().holders(&h).unwrap()[0].host, "hv5");
    assert_eq!(g.service.child_state().acked["r"], 1);
    assert_eq!(r.push_status.acked.load(Ordering::Relaxed), 1);
}

/// Host load reports: an agent reports its own host to its rack indexer, which
/// forwards it to the global indexer; an agent cannot speak for another host and
/// a client cannot report at all.
#[tokio::test]
async fn host_metrics_travel_up_the_tree() {
    use super::{hosts::ReportView, proto::HostReport};
    use crate::plan::HostMetrics;
    let dir = tempfile::tempdir().unwrap();
    let cfg = |node: &str, parent| {
        indexer_config(dir.path(), node, parent, "metrics_interval_ms = 100\n")
    };
    let g = super::start_indexer(&cfg("g", None)).await.unwrap();
    let r = super::start_indexer(&cfg("r", Some(g.local_addr)))
        .await
        .unwrap();
    let rack = r.local_addr.to_string();
    let as_role = |node: &str, role: Role| {
        PeerClient::new(ClientOptions::new(node, role, creds(node, role))).peer(&rack)
    };
    let m = HostMetrics {
        cpu: Some(0.25),
        mem: Some(0.5),
        disk: None,
    };
    let report = |host: &str| HostReport {
        host: host.into(),
        metrics: m,
        age_ms: 0,
        resources: crate::peer::proto::HostResources {
            disk_free_bytes: Some(1 << 30),
            ..Default::default()
        },
        vms: vec![crate::peer::proto::VmReport {
            name: "web1".into(),
            image: Some("lib/1".into()),
            size: 4096,
            state: crate::hypervisor::VmState::Stored,
        }],
    };
    let hv5 = as_role("hv5", Role::Agent);
    assert_eq!(hv5.report_metrics(vec![report("hv5")]).await.unwrap(), 1);
    let refused = hv5.report_metrics(vec![report("hv6")]).await.unwrap_err();
    assert!(
        matches!(refused, FetchError::Remote { code: c, .. } if c == super::proto::code::BAD_REQUEST),
        "{refused}"
    );
    let cli = as_role("cli", Role::Client);
    assert!(cli.report_metrics(vec![report("cli")]).await.is_err());
    let at_rack = r.service.hosts.view(std::time::Instant::now());
    assert_eq!(at_rack.len(), 1, "{at_rack:?}");
    assert_eq!(
        (at_rack[0].host.as_str(), at_rack[0].via.as_str()),
        ("hv5", "hv5")
    );
    // Forwarded to the global indexer, which knows it came through `r`.
    let mut up: Vec<ReportView> = Vec::new();
    for _ in 0..200 {
        up = g.service.hosts.view(std::time::Instant::now());
        if !up.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!((up[0].host.as_str(), up[0].via.as_str()), ("hv5", "r"));
    assert_eq!((up[0].cpu, up[0].mem, up[0].disk), (m.cpu, m.mem, m.disk));
    // The host's VMs and free disk travel with its load.
    assert_eq!(up[0].vms, report("hv5").vms);
    assert_eq!(up[0].resources, report("hv5").resources);
    assert!(up[0].age_ms < 5_000, "{}", up[0].age_ms);
    assert!(r.metrics_status.sent.load(Ordering::Relaxed) >= 1);
    // Both show it in their status.
    let st = as_role("cli", Role::Client)
        .request(&Msg::Status)
        .await
        .unwrap();
    let Msg::StatusReply { json } = st else {
        panic!("{st:?}")
    };
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["index"]["hosts"][0]["host"], "hv5", "{v}");
}

/// An indexer server on `store` (asking `parent`, if any), its frame limit
/// `max_frame`; returns the service and the address.
async fn manifest_indexer(
    store: Arc<RedbStore>,
    dir: &std::path::Path,
    name: &str,
    parent: Option<&str>,
    max_frame: u32,
) -> (Arc<IndexService>, String) {
    let client = PeerClient::new(ClientOptions::new(
        name,
        Role::Indexer,
        creds(name, Role::Indexer),
    ));
    let ix = Arc::new(
        IndexService::open(
            name,
            store,
            parent.map(|p| client.peer(p)),
            dir.join(format!("{name}.children.json")),
        )
        .unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let mut o = ServerOptions::new(name, Role::Indexer, creds(name, Role::Indexer));
    o.max_frame = max_frame;
    tokio::spawn(serve(
        l,
        Arc::new(o),
        Services {
            index: Some(ix.clone()),
            ..Default::default()
        },
        Arc::new(ServerMetrics::default()),
    ));
    (ix, addr)
}

/// A hypervisor's holding under a library LUN's image name (its own copy, with
/// other bytes: newer, in the rack's store and in the global one) is answered only to who asks for that hypervisor's holding: the
/// library's is asked up the tree with the library's name and comes back
/// unchanged, never replaced by the newer one.
#[tokio::test]
async fn a_manifest_is_only_ever_the_named_hosts_holding() {
    use super::client::ManifestAnswer;
    let dir = tempfile::tempdir().unwrap();
    let (global_store, rack_store) = (store(dir.path(), "g", false), store(dir.path(), "r", false));
    let (lib, _) = put("lib", "iqn.t:lib/1", 1);
    global_store.apply(std::slice::from_ref(&lib)).unwrap();
    // hv1 indexed other bytes under the same name, newer than the library's,
    // in the rack's store and (pushed up) the global one.
    let (hostile, _) = put("hv1", "iqn.t:lib/1", 9);
    rack_store.apply(std::slice::from_ref(&hostile)).unwrap();
    global_store.apply(std::slice::from_ref(&hostile)).unwrap();
    let manifest = |c: &Change| match c {
        Change::PutImage { manifest, .. } => manifest.clone(),
        _ => unreachable!(),
    };
    let (_g, gaddr) = manifest_indexer(global_store, dir.path(), "global", None, 32 << 20).await;
    let (rack, raddr) =
        manifest_indexer(rack_store, dir.path(), "rack1", Some(&gaddr), 32 << 20).await;
    let c = client();
    for addr in [&raddr, &gaddr] {
        match c
            .peer(addr)
            .manifest("lib", "iqn.t:lib/1", None, None)
            .await
        {
            Ok(ManifestAnswer::Found { manifest: m, .. }) => {
                assert_eq!(m, manifest(&lib), "{addr}");
            }
            r => panic!("{addr}: {r:?}"),
        }
    }
    // The rack lacks the library's holding: it asked its parent, for the library's.
    assert_eq!(
        rack.metrics.manifest_parent_lookups.load(Ordering::Relaxed),
        1
    );
    // hv1's own holding is still what it is, to whoever asks for hv1's.
    match c
        .peer(&raddr)
        .manifest("hv1", "iqn.t:lib/1", None, None)
        .await
    {
        Ok(ManifestAnswer::Found { manifest: m, .. }) => assert_eq!(m, manifest(&hostile)),
        r => panic!("{r:?}"),
    }
}

/// `GetManifest`: the named host's holding, from the indexer's own store, else
/// from its parent; the known digest answers `Unchanged`; an unknown image is
/// `Absent`; a manifest larger than the server's frame limit comes in pieces; a
/// dead parent is an error (not `Absent`: the asker must not withdraw a LUN over
/// it); a peer without an index refuses.
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
#[tokio::test]
async fn manifests_from_the_store_then_the_parent() {
    use super::client::ManifestAnswer;
    let dir = tempfile::tempdir().unwrap();
    let (global_store, rack_store) = (store(dir.path(), "g", false), store(dir.path(), "r", false));
    // The library's LUN is only in the global index; a big one (400 blocks,
    // ~13 KB encoded) too; the rack's own image only in the rack's.
    let (lib, _) = put("lib", "iqn.t:lib/1", 1);
    let big = Change::PutImage {
        host: "lib".into(),
        manifest: manifest_of_bytes(
            "iqn.t:lib/2",
            &(0..400 * 4096u32)
                .map(|i| (i / 4096) as u8 | 1)
                .collect::<Vec<_>>(),
            4096,
        ),
    };
    global_store.apply(&[lib.clone(), big.clone()]).unwrap();
    let (own, _) = put("hv1", "vm1", 2);
    rack_store.apply(std::slice::from_ref(&own)).unwrap();
    let manifest = |c: &Change| match c {
        Change::PutImage { manifest, .. } => manifest.clone(),
        _ => unreachable!(),
    };
    // The global server cuts replies at 2 KiB frames.
    let (_g, gaddr) = manifest_indexer(global_store, dir.path(), "global", None, 2048).await;
    let (rack, raddr) =
        manifest_indexer(rack_store, dir.path(), "rack1", Some(&gaddr), 32 << 20).await;
    let c = client();
    let peer = c.peer(&raddr);

    let found = |a: ManifestAnswer| match a {
        ManifestAnswer::Found { manifest, digest } => (manifest, digest),
        a => panic!("{a:?}"),
    };
    let (m, d) = found(peer.manifest("hv1", "vm1", None, None).await.unwrap());
    assert_eq!(m, manifest(&own));
    assert_eq!(
        rack.metrics.manifest_parent_lookups.load(Ordering::Relaxed),
        0
    );
    assert_eq!(d, *blake3::hash(&m.encode()).as_bytes());

    let (m, d) = found(
        peer.manifest("lib", "iqn.t:lib/1", Some(4096), None)
            .await
            .unwrap(),
    );
    assert_eq!(m, manifest(&lib));
    // Two pieces (1.3 KB through the global server's 2 KiB frames), each asked up.
    assert_eq!(
        rack.metrics.manifest_parent_lookups.load(Ordering::Relaxed),
        2
    );
    assert_eq!(
        peer.manifest("lib", "iqn.t:lib/1", None, Some(d))
            .await
            .unwrap(),
        ManifestAnswer::Unchanged
    );
    // At another block size, another name, or held by another host: nobody has it.
    for (host, image, bs) in [
        ("lib", "iqn.t:lib/1", Some(65536)),
        ("lib", "nope", None),
        ("hv1", "iqn.t:lib/1", None),
    ] {
        assert_eq!(
            peer.manifest(host, image, bs, None).await.unwrap(),
            ManifestAnswer::Absent
        );
    }
    // In pieces (the global server's frames are 2 KiB).
    let requests = c.metrics().requests;
    let (m, _) = found(
        peer.manifest("lib", "iqn.t:lib/2", None, None)
            .await
            .unwrap(),
    );
    assert_eq!(m, manifest(&big));
    assert!(
        c.metrics().requests - requests >= 6,
        "{}",
        c.metrics().requests
    );

    // A dead parent is an error, not an absent image.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let (_o, oaddr) = manifest_indexer(
        store(dir.path(), "orphan", false),
        dir.path(),
        "orphan",
        Some(&dead_addr),
        32 << 20,
    )
    .await;
    match c
        .peer(&oaddr)
        .manifest("lib", "iqn.t:lib/1", None, None)
        .await
    {
        Err(FetchError::Remote { code, .. }) => assert_eq!(code, super::proto::code::INTERNAL),
        r => panic!("{r:?}"),
    }
    // An agent is never asked: its answer could not be an index's. The client
    // refuses before sending…
    let (aaddr, _) = start(blocks_src(Fake::new(&[], false)), 1 << 20).await;
    match c.peer(&aaddr).manifest("hv1", "vm1", None, None).await {
        Err(FetchError::Protocol { message, .. }) => {
            assert!(message.contains("not an indexer"), "{message}");
        }
        r => panic!("{r:?}"),
    }
    // …and the agent refuses a request sent anyway.
    let mut raw = raw_channel(&aaddr).await;
    let ask = Msg::GetManifest {
        host: "hv1".into(),
        image: "vm1".into(),
        block_size: 0,
        known: [0; 32],
        offset: 0,
        max_len: 1 << 20,
    };
    raw.writer.write_all(&ask.encode(1)).await.unwrap();
    raw.writer.flush().await.unwrap();
    let f = super::proto::read_frame(&mut raw.reader, 1 << 20)
        .await
        .unwrap()
        .expect("a reply");
    match Msg::decode(f.body).unwrap() {
        Msg::Error { code, .. } => assert_eq!(code, super::proto::code::UNSUPPORTED),
        m => panic!("{m:?}"),
    }
}
