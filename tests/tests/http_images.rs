//! Image transfers over HTTP through the rack appliance (issue 16), with real
//! peers: nginx serves the library's document root, the library's agent
//! indexes it (and tgtd's LUNs), curl, wget and qemu-img's HTTP driver copy
//! from hv1 through rack1. Checked, in one lab:
//!
//! 1. curl, wget and qemu-img copies are bit-identical to the file, cold and
//!    warm; the warm copy moves under 1% of the image's size over the library
//!    link (rack1's BPF flow counters), the cold one at most its non-zero
//!    bytes plus 1%;
//! 2. an image copied over iSCSI first is then served over HTTP from the
//!    cache, and the reverse;
//! 3. a file replaced at the origin (new `ETag`) is copied as the new bytes;
//! 4. range edge cases, HEAD, HTTP/1.0, pipelining, ambiguous requests and a
//!    client that leaves mid-body answer exactly as nginx does direct (the
//!    `Date` header aside).
//!
//! Run as root, after `cargo build -p nearblock`.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nearblock_lab::{
    content, fabric::Fabric, origin, procs::Procs, ApplianceOptions, Lab, LunSpec,
};

const IQN: &str = "iqn.2026-12.test.nearblock:http";
const AGENT_PORT: u16 = 7400;
const INDEXER_PORT: u16 = 7401;
const MIB: usize = 1 << 20;

fn from_library(lab: &Lab) -> BTreeMap<(String, String), u64> {
    lab.library_link_flows().expect("status")
}

fn moved_since(before: &BTreeMap<(String, String), u64>, lab: &Lab) -> u64 {
    lab.library_link_moved_since(before).expect("status")
}

fn nonzero_bytes(data: &[u8]) -> u64 {
    data.chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| b.len() as u64)
        .sum()
}

fn publish(root: &Path, name: &str, data: &[u8], age: Duration) {
    origin::publish(root, name, data, age).unwrap();
}

struct Rig {
    lab: Lab,
    fabric: Fabric,
    nginx: Procs,
    www: PathBuf,
    lib: Ipv4Addr,
}

impl Rig {
    fn url(&self, name: &str) -> String {
        format!("http://{}/images/{name}", self.lib)
    }

    /// Copy `name` from hv1 with `tool`; check it equals `data`; the bytes
    /// that crossed the library's link meanwhile.
    fn copy(&self, tool: &str, name: &str, data: &[u8], what: &str) -> u64 {
        let before = from_library(&self.lab);
        let out = self.lab.dir.path().join(format!("{what}.out"));
        let url = self.url(name);
        let o = match tool {
            "curl" => self
                .lab
                .exec(
                    "hv1",
                    &[
                        "curl",
                        "-sS",
                        "--max-time",
                        "120",
                        "-o",
                        out.to_str().unwrap(),
                        &url,
                    ],
                )
                .unwrap(),
            "wget" => self
                .lab
                .exec(
                    "hv1",
                    &[
                        "wget",
                        "-q",
                        "--timeout=60",
                        "--tries=1",
                        "-O",
                        out.to_str().unwrap(),
                        &url,
                    ],
                )
                .unwrap(),
            // Bounded: a stalled client fails the step instead of the run.
            _ => {
                let (bin, modules) = nearblock_lab::qemu_img().unwrap();
                self.lab
                    .cmd(
                        "hv1",
                        &[
                            "timeout",
                            "-s",
                            "KILL",
                            "180",
                            bin.to_str().unwrap(),
                            "convert",
                            // One request at a time: see Lab::qemu_convert.
                            "-m",
                            "1",
                            "-O",
                            "raw",
                            &url,
                        ],
                    )
                    .arg(&out)
                    .env("QEMU_MODULE_DIR", modules)
                    .output()
                    .unwrap()
            }
        };
        assert!(
            o.status.success(),
            "{what}: {tool} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.lab.appliance_log("rack1")
        );
        let copy = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert!(
            copy == data,
            "{what}: the {tool} copy differs from the file"
        );
        let moved = moved_since(&before, &self.lab);
        let s = self.lab.status("rack1").unwrap().splicer;
        eprintln!(
            "{what} ({tool}): {moved} B from the library; served {}; http {:?}",
            nearblock_lab::served_by_source(&s),
            s.http
        );
        moved
    }

    /// Copy LUN `lun` over iSCSI from hv1; the library link's bytes.
    fn copy_iscsi(&self, lun: u32, data: &[u8], what: &str) -> u64 {
        let before = from_library(&self.lab);
        let copy = self
            .lab
            .qemu_copy("hv1", &self.lab.lun_url(IQN, lun), what, "rack1");
        assert!(copy == data, "{what}: the iSCSI copy differs from the LUN");
        let moved = moved_since(&before, &self.lab);
        eprintln!("{what} (iSCSI): {moved} B from the library");
        moved
    }

    /// Wait until the global index lists the library as holding `data`'s
    /// first non-zero block.
    fn wait_indexed(&self, data: &[u8]) {
        let block = data
            .chunks(4096)
            .find(|b| b.iter().any(|&x| x != 0))
            .unwrap();
        self.fabric
            .wait_holder(
                &self.lab,
                "core",
                block,
                self.lab.library(),
                Duration::from_mins(2),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "{e}\n{}",
                    self.fabric
                        .procs
                        .log(&format!("agent-{}", self.lab.library()))
                )
            });
    }
}

/// Send `request` to `to` from inside `node` and read the whole answer, up to
/// the server closing the connection (the request's last one must ask for
/// that: a half-close would end nginx's answers early).
fn exchange(lab: &Lab, node: &str, to: SocketAddr, request: &[u8]) -> Vec<u8> {
    let request = request.to_vec();
    lab.in_node(node, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&request).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("the whole answer");
        out
    })
}

/// An answer without its `Date` lines (the only header that differs by when).
fn without_date(answer: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(answer.len());
    let mut rest = answer;
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(rest.len(), |p| p + 2);
        let (line, tail) = rest.split_at(end);
        if !line.starts_with(b"Date: ") {
            out.extend_from_slice(line);
        }
        rest = tail;
    }
    out
}

fn head_of(answer: &[u8]) -> String {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(answer.len().min(400));
    String::from_utf8_lossy(&answer[..end]).into_owned()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, read top to bottom: each step checks what the one before set up"
)]
fn http_copies_are_served_from_blocks_and_answer_as_the_origin() {
    let mut lab = Lab::default_topology().expect("lab");
    let lib_name = lab.library().to_string();
    let lib = lab.addr4(&lib_name);
    let www = lab.dir.path().join("www");
    std::fs::create_dir_all(www.join("images")).unwrap();
    // a: the main image; x: on a LUN and over HTTP, iSCSI first; y: HTTP first.
    let a = content::image(32 * MIB, 11, 40);
    let x = content::image(16 * MIB, 12, 30);
    let y = content::image(16 * MIB, 13, 30);
    publish(&www.join("images"), "a.raw", &a, Duration::from_mins(1));
    publish(&www.join("images"), "x.raw", &x, Duration::from_mins(1));
    publish(&www.join("images"), "y.raw", &y, Duration::from_mins(1));
    for (lun, data) in [(1, &x), (2, &y)] {
        let backing = lab.write_file(&format!("lun{lun}.raw"), data).unwrap();
        lab.add_lun(LunSpec {
            tid: 1,
            iqn: IQN.into(),
            lun,
            backing,
            readonly: true,
            allow: None,
        })
        .unwrap();
    }
    let mut nginx = Procs::new();
    origin::start_nginx(&lab, &mut nginx, &lib_name, &www).unwrap();

    let topo = lab
        .write_file("topology.toml", nearblock_lab::DEFAULT_TOPOLOGY.as_bytes())
        .unwrap();
    let mut fabric = Fabric::new(&lab, AGENT_PORT, INDEXER_PORT).unwrap();
    fabric.start_indexer(&lab, "core", None).unwrap();
    let agent_extra = format!(
        "tgt_control_port = {}\n[[http_root]]\ndir = {:?}\nurl_prefix = \"/images\"\norigin = \"http://127.0.0.1:80\"\n",
        lab.tgt_control_port(),
        www.join("images")
    );
    fabric
        .start_agent(&lab, &lib_name, "core", &[], &agent_extra)
        .unwrap();
    let rack1_cfg = fabric.indexer_config(&lab, "rack1", Some("core")).unwrap();
    let extra_config = format!(
        "image_transfer_ports = [80, {AGENT_PORT}]\n[splicer]\ncache_bytes = {}\nfetch_deadline_ms = 3000\nmanifest_refresh_ms = 500\nauthority = {lib_name:?}\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 1\n[[splicer.lun]]\ntarget = {IQN:?}\nlun = 2\n[splicer.http]\nports = [80]\norigins = [\"{lib}:80\"]\n[cost]\ntopology = {topo:?}\n[planner]\n[indexer]\nconfig = {rack1_cfg:?}\n",
        1u64 << 30,
    );
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            steer: true,
            extra_config: extra_config.clone(),
        },
    )
    .unwrap();
    let rig = Rig {
        lab,
        fabric,
        nginx,
        www,
        lib,
    };
    for data in [&a, &x, &y] {
        rig.wait_indexed(data);
    }

    // 4. Edge cases, direct (from core: no appliance on the way) and through
    // (from hv1, steered by rack1), before anything is cached and after.
    let origin = SocketAddr::from((lib, 80));
    let get = |extra: &str| {
        format!("GET /images/a.raw HTTP/1.1\r\nHost: {lib}\r\n{extra}\r\n").into_bytes()
    };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("suffix range", get("Range: bytes=-1000\r\n")),
        ("open range", get("Range: bytes=33550000-\r\n")),
        ("first byte", get("Range: bytes=0-0\r\n")),
        ("mid range", get("Range: bytes=4000-70000\r\n")),
        ("range past the end", get("Range: bytes=40000000-\r\n")),
        (
            "missing file",
            format!("GET /images/none.raw HTTP/1.1\r\nHost: {lib}\r\n\r\n").into_bytes(),
        ),
        (
            "HEAD",
            format!("HEAD /images/a.raw HTTP/1.1\r\nHost: {lib}\r\n\r\n").into_bytes(),
        ),
        (
            "HEAD with range",
            format!("HEAD /images/a.raw HTTP/1.1\r\nHost: {lib}\r\nRange: bytes=5-9\r\n\r\n")
                .into_bytes(),
        ),
        (
            "HTTP/1.0",
            b"GET /images/a.raw HTTP/1.0\r\nRange: bytes=100-200\r\n\r\n".to_vec(),
        ),
        (
            "Connection: close",
            get("Range: bytes=10-20\r\nConnection: close\r\n"),
        ),
        (
            "both Content-Length and Transfer-Encoding",
            get("Range: bytes=0-9\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"),
        ),
        (
            "If-None-Match",
            get("If-None-Match: \"nothing\"\r\nRange: bytes=0-99\r\n"),
        ),
    ];
    // Hostile and foreign bytes: passed through, so answered as nginx answers
    // them (most with 400 and a close).
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        (
            "smuggling: Content-Length then a second request in the body",
            get("Content-Length: 40\r\n\r\nGET /images/x.raw HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        (
            "two Content-Lengths",
            get("Content-Length: 0\r\nContent-Length: 5\r\n"),
        ),
        (
            "a header over 16 KiB",
            get(&format!("X-Long: {}\r\n", "a".repeat(17 * 1024))),
        ),
        ("100 headers", get(&"X-H: 1\r\n".repeat(100))),
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x00\x2f\x01\x00\x00\x2b\x03\x03garbage-garbage-garbage-garbage".to_vec(),
        ),
        (
            "HTTP/2 prior knowledge",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        ("binary garbage", (0u8..=255).cycle().take(3000).collect()),
        (
            "bare LF line ends",
            format!("GET /images/a.raw HTTP/1.1\nHost: {lib}\nRange: bytes=0-9\n\n").into_bytes(),
        ),
        (
            "absolute-form target",
            format!(
                "GET http://{lib}/images/a.raw HTTP/1.1\r\nHost: {lib}\r\nRange: bytes=0-9\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "encoded path",
            format!("GET /images/%61.raw HTTP/1.1\r\nHost: {lib}\r\nRange: bytes=0-9\r\n\r\n")
                .into_bytes(),
        ),
    ];
    cases.extend(hostile);
    let mut pipelined = get("Range: bytes=100-4195\r\n");
    pipelined.extend(get("Range: bytes=-5000\r\n"));
    pipelined.extend(format!("HEAD /images/a.raw HTTP/1.1\r\nHost: {lib}\r\n\r\n").into_bytes());
    pipelined.extend(get("Range: bytes=8192-\r\n"));
    cases.push(("pipelined, keep-alive", pipelined));
    // Every case ends with a request that closes the connection (unless its
    // own answer does).
    let closing =
        format!("HEAD /images/a.raw HTTP/1.1\r\nHost: {lib}\r\nConnection: close\r\n\r\n");
    for (what, request) in &mut cases {
        if ![
            "HTTP/1.0",
            "Connection: close",
            "both Content-Length and Transfer-Encoding",
        ]
        .contains(what)
        {
            request.extend_from_slice(closing.as_bytes());
        }
    }
    for round in ["cold", "warm"] {
        for (what, request) in &cases {
            let direct = exchange(&rig.lab, "core", origin, request);
            let through = exchange(&rig.lab, "hv1", origin, request);
            assert!(
                without_date(&direct) == without_date(&through),
                "{round} {what}: through rack1 the answer differs from nginx's direct answer\ndirect:  {} ({} B)\nthrough: {} ({} B)",
                head_of(&direct),
                direct.len(),
                head_of(&through),
                through.len()
            );
        }
        if round == "cold" {
            // The whole image once, so the warm round is served from the cache.
            rig.copy("curl", "a.raw", &a, "fill");
        }
    }
    let s = rig.lab.status("rack1").unwrap().splicer;
    assert!(
        s.http.served >= 8,
        "ranges were served from blocks: {:?}",
        s.http
    );
    assert!(
        s.http.passed >= 8,
        "the others were passed through: {:?}",
        s.http
    );
    // A multi-range answer's boundary is nginx's own counter: compare statuses.
    let multi = get("Range: bytes=0-9,100-109\r\nConnection: close\r\n");
    let direct = exchange(&rig.lab, "core", origin, &multi);
    let through = exchange(&rig.lab, "hv1", origin, &multi);
    assert_eq!(
        head_of(&direct).lines().next(),
        head_of(&through).lines().next()
    );
    assert!(
        head_of(&through).starts_with("HTTP/1.1 206"),
        "{}",
        head_of(&through)
    );

    // A client that leaves mid-body: the appliance carries on.
    let aborted_before = s.http.aborted;
    let whole = get("");
    rig.lab.in_node("hv1", move || {
        let mut s = TcpStream::connect_timeout(&origin, Duration::from_secs(5)).unwrap();
        s.write_all(&whole).unwrap();
        let mut buf = vec![0u8; MIB];
        s.read_exact(&mut buf).unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.lab.status("rack1").unwrap().splicer.http.aborted == aborted_before {
        assert!(
            Instant::now() < deadline,
            "the left connection was not noticed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // 1. Copies: cold (nothing cached yet of x... a is warm now), then warm.
    let size = a.len() as u64;
    let warm_curl = rig.copy("curl", "a.raw", &a, "a warm");
    let warm_wget = rig.copy("wget", "a.raw", &a, "a warm");
    let warm_qemu = rig.copy("qemu-img", "a.raw", &a, "a warm");
    for (tool, moved) in [
        ("curl", warm_curl),
        ("wget", warm_wget),
        ("qemu-img", warm_qemu),
    ] {
        assert!(
            moved < size / 100,
            "warm {tool} copy moved {moved} B (image {size} B)"
        );
    }
    // Cold copies, one tool each, of images nothing cached yet: y by HTTP first.
    let y_size = y.len() as u64;
    let cold = rig.copy("wget", "y.raw", &y, "y cold");
    assert!(
        cold <= nonzero_bytes(&y) + y_size / 100,
        "cold copy moved {cold} B; non-zero bytes {}",
        nonzero_bytes(&y)
    );
    // 2. y over iSCSI after HTTP; x over HTTP (qemu-img) after iSCSI.
    let y_iscsi = rig.copy_iscsi(2, &y, "y after HTTP");
    assert!(y_iscsi < y_size / 100, "iSCSI after HTTP moved {y_iscsi} B");
    let x_cold = rig.copy_iscsi(1, &x, "x cold");
    assert!(x_cold <= nonzero_bytes(&x) + x.len() as u64 / 100);
    let x_http = rig.copy("qemu-img", "x.raw", &x, "x after iSCSI");
    assert!(
        x_http < x.len() as u64 / 100,
        "HTTP after iSCSI moved {x_http} B"
    );

    // 3. The file replaced at the origin: same length, new bytes, another
    // modification second (a new ETag). Never an old byte.
    let a2 = content::image(32 * MIB, 21, 40);
    publish(
        &rig.www.join("images"),
        "a.raw",
        &a2,
        Duration::from_secs(30),
    );
    for tool in ["curl", "qemu-img"] {
        rig.copy(tool, "a.raw", &a2, "a replaced");
    }
    let s = rig.lab.status("rack1").unwrap().splicer;
    assert_eq!(s.verify_failures, 0, "{s:?}");
    assert_eq!(s.protocol_errors, 0);

    // Cold copies with the other two tools: rack1 restarted, its cache empty.
    let mut rig = rig;
    rig.lab
        .stop_appliance("rack1", Duration::from_secs(20))
        .unwrap();
    rig.lab
        .start_appliance(
            "rack1",
            ApplianceOptions {
                steer: true,
                extra_config: extra_config.clone(),
            },
        )
        .unwrap();
    for (tool, name, data) in [("curl", "y.raw", &y), ("qemu-img", "x.raw", &x)] {
        let moved = rig.copy(tool, name, data, "cold again");
        let bound = nonzero_bytes(data) + data.len() as u64 / 100;
        assert!(
            moved <= bound,
            "cold {tool} copy moved {moved} B; bound {bound}"
        );
    }

    // Prefetch mode and access history: rack1 again, its cache empty. One
    // small range of x starts the prefetch of the whole version; the
    // connection's reads are saved as a boot of it.
    rig.lab
        .stop_appliance("rack1", Duration::from_secs(20))
        .unwrap();
    let history = rig.lab.dir.path().join("history");
    std::fs::create_dir_all(&history).unwrap();
    let extra_config = extra_config
        .replace("[splicer.http]\n", "[splicer.http]\nmode = \"prefetch\"\n")
        .replace(
            "[splicer]\n",
            &format!(
                "[splicer]\nhistory_dir = {}\n",
                nearblock_lab::toml_path(&history)
            ),
        );
    rig.lab
        .start_appliance(
            "rack1",
            ApplianceOptions {
                steer: true,
                extra_config,
            },
        )
        .unwrap();
    let one = exchange(
        &rig.lab,
        "hv1",
        origin,
        format!("GET /images/x.raw HTTP/1.1\r\nHost: {lib}\r\nRange: bytes=0-99\r\nConnection: keep-alive\r\n\r\n{closing}").as_bytes(),
    );
    assert!(
        head_of(&one).starts_with("HTTP/1.1 206"),
        "{}",
        head_of(&one)
    );
    let deadline = Instant::now() + Duration::from_mins(1);
    let prefetched = loop {
        let prefetches = rig.lab.status("rack1").unwrap().splicer.prefetch;
        let of_x = prefetches
            .iter()
            .find(|p| p.lun.starts_with("http:/images/x.raw@"))
            .filter(|p| !p.running && p.blocks_cached == p.blocks_total);
        if let Some(done) = of_x {
            break done.clone();
        }
        assert!(
            Instant::now() < deadline,
            "x was not prefetched: {prefetches:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("prefetched: {prefetched:?}");
    let after_prefetch = rig.copy("curl", "x.raw", &x, "x after prefetch");
    assert!(
        after_prefetch < x.len() as u64 / 100,
        "after the prefetch a copy moved {after_prefetch} B"
    );
    let saved: Vec<_> = std::fs::read_dir(&history)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(
        saved
            .iter()
            .any(|n| n.starts_with("http:") && n.contains("x.raw")),
        "no access history saved for x: {saved:?}"
    );
    eprintln!(
        "library link: warm curl {:.4}, wget {:.4}, qemu-img {:.4}; cold {:.4} (bound {:.4}); iSCSI after HTTP {:.4}; HTTP after iSCSI {:.4}",
        warm_curl as f64 / size as f64,
        warm_wget as f64 / size as f64,
        warm_qemu as f64 / size as f64,
        cold as f64 / y_size as f64,
        (nonzero_bytes(&y) + y_size / 100) as f64 / y_size as f64,
        y_iscsi as f64 / y_size as f64,
        x_http as f64 / x.len() as f64,
    );
    drop(rig.nginx);
    drop(rig.fabric);
}
