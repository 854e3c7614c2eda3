//! Fail-open on a hung daemon (issue 10, finding 5): a stopped daemon, one out of
//! file descriptors, and a source over its connection cap must not swallow new
//! connections. Real clients (qemu-img 7.2, the kernel datapath, tgtd) in the
//! namespace lab; each test builds its own lab and removes it on drop. Run as root.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use nearblock::state::StatusReport;
use nearblock_lab::{content, ApplianceOptions, Lab, LunSpec, DEFAULT_TOPOLOGY};

const IQN: &str = "iqn.2026-11.test.nearblock:hang";

fn add_lun(lab: &mut Lab, mib: usize) -> Vec<u8> {
    let data = content::image(mib << 20, 17, 40);
    let backing = lab.write_file("hang.raw", &data).expect("backing file");
    lab.add_lun(LunSpec::read_only(IQN, backing)).expect("lun");
    data
}

fn verdict(r: &StatusReport, name: &str) -> u64 {
    r.verdicts.iter().find(|(n, _)| n == name).map_or_else(
        || panic!("no verdict `{name}` in {:?}", r.verdicts),
        |(_, v)| *v,
    )
}

fn signal(lab: &Lab, node: &str, sig: i32) {
    let pid = lab.appliance_pid(node).expect("daemon pid");
    // SAFETY: signalling the lab's own child process.
    let rc = unsafe { libc::kill(pid.cast_signed(), sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// A `qemu-img convert` of `url` inside `node`, started now.
struct QemuCopy {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl QemuCopy {
    fn start(lab: &Lab, node: &str, url: &str, name: &str) -> Self {
        let (bin, modules) = nearblock_lab::qemu_img().expect("qemu-img 7.2");
        let out = lab.dir.path().join(format!("{name}.raw"));
        let err = lab.dir.path().join(format!("{name}.err"));
        let child = lab
            .cmd(node, &[bin.to_str().unwrap(), "convert", "-O", "raw", url])
            .arg(&out)
            .env("QEMU_MODULE_DIR", &modules)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("qemu-img");
        Self { child, out, err }
    }

    fn finished(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_some()
    }

    /// The copied bytes, or why there are none: failed, or not done `within`
    /// (then it is killed).
    fn result(mut self, within: Duration) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!("not finished within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !status.success() {
            return Err(format!(
                "{status}: {}",
                std::fs::read_to_string(&self.err).unwrap_or_default()
            ));
        }
        Ok(std::fs::read(&self.out).expect("the copy"))
    }
}

impl Drop for QemuCopy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Idle TCP connections to the library's iSCSI port, opened one by one from
/// `node` and held until dropped (a Python process in the node's namespace).
/// A connection reset while connecting is retried (up to five times), as an
/// initiator would: a daemon out of descriptors resets what waits in its backlog.
struct IdleConnections {
    child: Child,
}

impl IdleConnections {
    fn open(lab: &Lab, node: &str, count: usize, tag: &str) -> Self {
        let ready = lab.dir.path().join(format!("idle-{node}-{tag}.ready"));
        let script = format!(
            "import socket, sys, time\nheld = []\nfor i in range({count}):\n    \
             for attempt in range(5):\n        \
             try:\n            \
             held.append(socket.create_connection(('{lib}', 3260), timeout=10))\n            \
             break\n        \
             except (ConnectionResetError, ConnectionRefusedError):\n            \
             time.sleep(0.1)\n    \
             time.sleep(0.02)\nopen('{ready}', 'w').write(str(len(held)))\nsys.stdin.read()\n",
            lib = lab.addr4(lab.library()),
            ready = ready.display()
        );
        let mut child = lab
            .cmd(node, &["python3", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("python3");
        let deadline = Instant::now() + Duration::from_mins(1);
        while !ready.exists() {
            if let Some(st) = child.try_wait().expect("wait") {
                panic!("opening {count} idle connections from {node} failed: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "{count} idle connections from {node} not open within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child }
    }
}

impl Drop for IdleConnections {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `cond` until it holds or `within` passes; whether it held.
fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Poll `what` until it holds (bounded), else fail.
fn wait_for(what: &str, within: Duration, cond: impl FnMut() -> bool) {
    assert!(wait_until(within, cond), "{what}: not within {within:?}");
}

/// Done-when 1: SIGSTOP of the daemon during a copy: a new copy started 2 s later
/// succeeds directly, untouched (no accept, a stale-heartbeat verdict); after
/// SIGCONT the stalled copy finishes intact and new copies are steered again.
#[test]
fn sigstop_fails_open_and_sigcont_steers_again() {
    // The library link shaped to 200 Mbit/s, so a 32 MiB copy takes over a second
    // and is still in flight when the daemon stops.
    let topology = DEFAULT_TOPOLOGY.replacen(
        "b = \"core\"\ncapacity_mbps = 10000",
        "b = \"core\"\ncapacity_mbps = 200\nlab = { shape = true }",
        1,
    );
    assert_ne!(
        topology, DEFAULT_TOPOLOGY,
        "the library link was not shaped"
    );
    let mut lab = Lab::new(&topology).expect("lab");
    let data = add_lun(&mut lab, 32);
    let url = lab.lun_url(IQN, 1);
    lab.start_appliance("rack1", ApplianceOptions::default())
        .expect("appliance");

    let mut inflight = QemuCopy::start(&lab, "hv1", &url, "inflight");
    let mut before = lab.status("rack1").expect("status");
    wait_for("the copy is spliced", Duration::from_secs(20), || {
        before = lab.status("rack1").expect("status");
        before.splicer.bytes_to_initiator > 0 || inflight.finished()
    });
    signal(&lab, "rack1", libc::SIGSTOP);
    let stopped = Instant::now();
    let was_in_flight = !inflight.finished();
    eprintln!("daemon stopped; the first copy was in flight: {was_in_flight}");

    std::thread::sleep(Duration::from_secs(2).saturating_sub(stopped.elapsed()));
    let direct = QemuCopy::start(&lab, "hv1", &url, "while-stopped").result(Duration::from_mins(1));
    // Resume before asserting, so a failure leaves a daemon that answers.
    signal(&lab, "rack1", libc::SIGCONT);
    let direct = direct.unwrap_or_else(|e| {
        panic!(
            "a copy started 2 s into the stop failed: {e}\n{}",
            lab.appliance_log("rack1")
        )
    });
    assert!(
        direct == data,
        "the copy made while the daemon was stopped differs"
    );

    // The stalled session resumes with the daemon.
    let resumed = inflight
        .result(Duration::from_mins(2))
        .expect("the copy in flight at SIGSTOP");
    assert!(resumed == data, "the copy in flight at SIGSTOP differs");

    let after = lab.status("rack1").expect("status after SIGCONT");
    assert_eq!(
        after.splicer.accepted, before.splicer.accepted,
        "the copy made while the daemon was stopped was steered to it"
    );
    assert!(
        verdict(&after, "tc_steer_stale_heartbeat") > verdict(&before, "tc_steer_stale_heartbeat"),
        "no SYN was forwarded for a stale heartbeat: {:?}",
        after.verdicts
    );

    // Steering resumes: the heartbeat is written again within a quarter second.
    std::thread::sleep(Duration::from_millis(500));
    let again = QemuCopy::start(&lab, "hv1", &url, "after-sigcont")
        .result(Duration::from_mins(1))
        .expect("copy after SIGCONT");
    assert!(again == data, "the copy after SIGCONT differs");
    let last = lab.status("rack1").expect("status");
    assert!(
        last.splicer.accepted > after.splicer.accepted,
        "the copy after SIGCONT was not steered"
    );
    assert!(
        verdict(&last, "tc_steer_new_flow") > verdict(&after, "tc_steer_new_flow"),
        "{:?}",
        last.verdicts
    );
}

/// Done-when 2: the daemon runs out of file descriptors (its limit lowered below
/// what many idle connections need): new copies still work, forwarded untouched
/// while it is out; once the connections close, copies are steered again.
#[test]
fn fd_exhaustion_fails_open_and_recovers() {
    let mut lab = Lab::default_topology().expect("lab");
    let data = add_lun(&mut lab, 8);
    let url = lab.lun_url(IQN, 1);
    lab.start_appliance("rack1", ApplianceOptions::default())
        .expect("appliance");
    let before = lab.status("rack1").expect("status");
    let pid = lab.appliance_pid("rack1").expect("pid");
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's fds")
        .count() as u64;
    // Room for about eight spliced connections (two descriptors each).
    let limit = libc::rlimit {
        rlim_cur: open + 16,
        rlim_max: open + 16,
    };
    // SAFETY: valid rlimit pointer; the pid is the lab's own child.
    let rc = unsafe {
        libc::prlimit(
            pid.cast_signed(),
            libc::RLIMIT_NOFILE,
            &raw const limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    // About the ninth finds the daemon out of descriptors. The kernel completes
    // handshakes before the daemon accepts, so on a loaded machine the daemon may
    // lag: give it time to get there before the copy starts (not an assertion:
    // the copy is the check).
    let idle = IdleConnections::open(&lab, "hv2", 40, "fds");
    let seen = wait_until(Duration::from_secs(10), || {
        lab.appliance_log("rack1")
            .contains("out of file descriptors")
    });
    eprintln!("daemon reported running out of descriptors before the copy: {seen}");
    let copy = QemuCopy::start(&lab, "hv1", &url, "exhausted").result(Duration::from_mins(1));
    drop(idle);
    let copy = copy.unwrap_or_else(|e| {
        panic!(
            "a copy while the daemon was out of descriptors failed: {e}\n{}",
            lab.appliance_log("rack1")
        )
    });
    assert!(
        copy == data,
        "the copy made while out of descriptors differs"
    );

    // The idle connections closed: descriptors come back, steering resumes.
    let mut during = before.clone();
    wait_for(
        "the idle connections end",
        Duration::from_secs(30),
        || match lab.status("rack1") {
            Ok(r) => {
                during = r;
                during.splicer.active == 0
            }
            Err(_) => false,
        },
    );
    assert!(
        verdict(&during, "tc_steer_not_accepting") > 0,
        "no SYN was forwarded while out of descriptors: {:?}",
        during.verdicts
    );
    assert!(during.splicer.fd_exhausted > 0, "{:?}", during.splicer);
    assert!(
        lab.appliance_log("rack1")
            .contains("out of file descriptors: new connections bypass"),
        "the daemon did not report running out of descriptors"
    );
    std::thread::sleep(Duration::from_millis(500));
    let again = QemuCopy::start(&lab, "hv1", &url, "recovered")
        .result(Duration::from_mins(1))
        .expect("copy after the descriptors came back");
    assert!(again == data);
    let last = lab.status("rack1").expect("status");
    assert!(
        last.splicer.accepted > during.splicer.accepted,
        "not steered again after the descriptors came back: {}",
        lab.appliance_log("rack1")
    );
}

/// rack1 serving nothing, with `splicer_keys` (a cap of 4), and hv2 holding ten
/// idle connections: the first four spliced, the rest arriving after the daemon
/// took them (the kernel completes handshakes before the daemon accepts, and the
/// mark is written before the accept is counted). Returns the lab, the LUN's
/// content and URL, the connections and the status then.
fn lab_at_cap(splicer_keys: &str) -> (Lab, Vec<u8>, String, [IdleConnections; 2], StatusReport) {
    let mut lab = Lab::default_topology().expect("lab");
    let data = add_lun(&mut lab, 8);
    let url = lab.lun_url(IQN, 1);
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            extra_config: format!("[splicer]\n{splicer_keys}\n"),
            ..Default::default()
        },
    )
    .expect("appliance");
    let idle = IdleConnections::open(&lab, "hv2", 4, "first");
    wait_for("4 connections accepted", Duration::from_secs(10), || {
        lab.status("rack1").expect("status").splicer.accepted >= 4
    });
    let more = IdleConnections::open(&lab, "hv2", 6, "more");
    let before = lab.status("rack1").expect("status");
    assert_eq!(
        (before.splicer.accepted, before.splicer.over_cap_relayed),
        (4, 0),
        "only the first 4 are spliced: {:?}",
        before.splicer
    );
    (lab, data, url, [idle, more], before)
}

/// A source over its per-source cap: its new connections are forwarded untouched
/// (its copy works, and is not accepted); other sources are still steered; once
/// below its cap it is steered again.
#[test]
fn a_source_over_its_cap_is_forwarded_untouched() {
    let (lab, data, url, idle, before) = lab_at_cap("max_connections_per_source = 4");
    assert!(
        verdict(&before, "tc_steer_over_cap_source") >= 6,
        "{:?}",
        before.verdicts
    );

    let hv2 = QemuCopy::start(&lab, "hv2", &url, "over-cap")
        .result(Duration::from_mins(1))
        .expect("copy from the source at its cap");
    assert!(hv2 == data, "the over-cap source's copy differs");
    let mid = lab.status("rack1").expect("status");
    assert_eq!(
        mid.splicer.accepted, before.splicer.accepted,
        "the over-cap source's copy was steered"
    );
    assert!(
        verdict(&mid, "tc_steer_over_cap_source") > verdict(&before, "tc_steer_over_cap_source"),
        "{:?}",
        mid.verdicts
    );

    let hv1 = QemuCopy::start(&lab, "hv1", &url, "other-source")
        .result(Duration::from_mins(1))
        .expect("copy from another source");
    assert!(hv1 == data);
    let other = lab.status("rack1").expect("status");
    assert!(
        other.splicer.accepted > mid.splicer.accepted,
        "another source was not steered"
    );

    drop(idle);
    wait_for("the idle connections end", Duration::from_secs(30), || {
        lab.status("rack1").is_ok_and(|r| r.splicer.active == 0)
    });
    let back = QemuCopy::start(&lab, "hv2", &url, "below-cap")
        .result(Duration::from_mins(1))
        .expect("copy from the source below its cap");
    assert!(back == data);
    let last = lab.status("rack1").expect("status");
    assert!(
        last.splicer.accepted > other.splicer.accepted,
        "the source was not steered again below its cap"
    );
}

/// At `max_connections`, every new connection is forwarded untouched (not only
/// the busy source's), and steering resumes below it.
#[test]
fn at_the_total_cap_new_connections_are_forwarded_untouched() {
    let (lab, data, url, idle, before) = lab_at_cap("max_connections = 4");

    let copy = QemuCopy::start(&lab, "hv1", &url, "at-cap")
        .result(Duration::from_mins(1))
        .expect("copy at the total cap");
    assert!(copy == data, "the copy at the total cap differs");
    let at_cap = lab.status("rack1").expect("status");
    assert_eq!(
        at_cap.splicer.accepted, before.splicer.accepted,
        "a copy at the total cap was steered"
    );
    assert!(
        verdict(&at_cap, "tc_steer_not_accepting") > verdict(&before, "tc_steer_not_accepting"),
        "{:?}",
        at_cap.verdicts
    );

    drop(idle);
    wait_for("the idle connections end", Duration::from_secs(30), || {
        lab.status("rack1").is_ok_and(|r| r.splicer.active == 0)
    });
    std::thread::sleep(Duration::from_millis(500));
    let back = QemuCopy::start(&lab, "hv1", &url, "below-total-cap")
        .result(Duration::from_mins(1))
        .expect("copy below the total cap");
    assert!(back == data);
    let last = lab.status("rack1").expect("status");
    assert!(
        last.splicer.accepted > at_cap.splicer.accepted,
        "not steered again below the total cap"
    );
}

/// Dead peers are found by keepalive (and `TCP_USER_TIMEOUT`), live idle sessions
/// are never cut: hv1 logs in through rack1 and stays idle; hv2 opens a
/// connection and then vanishes (its link to rack1 goes down, nothing is sent
/// back, not even a reset). Within idle + interval × count (1 + 1 × 2 s here, 15 s
/// allowed) the splicer closes hv2's connection; hv1's session outlives several
/// keepalive periods and still reads the LUN's bytes.
#[test]
fn a_vanished_initiator_is_found_and_an_idle_session_is_kept() {
    use nearblock_lab::initiator::{connect_in, Initiator, LoginOptions};
    let mut lab = Lab::default_topology().expect("lab");
    let data = add_lun(&mut lab, 8);
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            // The splicer's own sockets are what keepalive watches: the
            // session stays in the user-space relay, not handed to the kernel.
            extra_config: "[splicer]\nkernel_handoff = false\nkeepalive_idle_secs = 1\nkeepalive_interval_secs = 1\nkeepalive_count = 2\nuser_timeout_secs = 3\n".into(),
            ..Default::default()
        },
    )
    .expect("appliance");
    let portal = std::net::SocketAddr::new(lab.addr4(lab.library()).into(), 3260);
    let stream = connect_in(&lab, "hv1", portal, Duration::from_secs(10)).expect("connect");
    let mut live = Initiator::login(
        stream,
        LoginOptions::new("iqn.2026-12.test.initiator:idle", IQN),
    )
    .expect("hv1 logs in");
    let vanishing = IdleConnections::open(&lab, "hv2", 1, "vanishing");
    wait_for("both connections spliced", Duration::from_secs(10), || {
        lab.status("rack1").expect("status").splicer.active == 2
    });
    // hv2 vanishes: its end of the link to rack1 goes down (the kernel of rack1
    // sees no reset; its packets to hv2 go nowhere).
    lab.exec_ok("hv2", &["ip", "link", "set", "dev", "rack1", "down"])
        .expect("hv2's link down");
    let started = Instant::now();
    wait_for(
        "the vanished initiator's connection closed",
        Duration::from_secs(15),
        || lab.status("rack1").expect("status").splicer.active == 1,
    );
    let found_in = started.elapsed();
    eprintln!("vanished initiator found in {found_in:?}");
    // hv1 stays idle for several more keepalive periods: still spliced.
    std::thread::sleep(Duration::from_secs(4));
    let s = lab.status("rack1").expect("status").splicer;
    assert_eq!(s.active, 1, "the live idle session was cut: {s:?}");
    let _ = live.clear_unit_attention(1, 3);
    let r = live.read10(1, 0, 16, 512).expect("hv1 reads after idling");
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.data == data[..16 * 512], "hv1 read other bytes");
    drop(vanishing);
    live.logout().expect("logout");
}
