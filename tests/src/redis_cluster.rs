//! A real Redis Cluster for the lab: Debian's `redis-server`, three masters and
//! one replica each, TLS on every port (clients, the cluster bus, replication)
//! with a CA made for the run, and ACL users: `nearblock` (what the index may
//! do) and `admin` (the lab's own `redis-cli`). The default user is off.
//! Dropping it kills every server, also while unwinding from a failed
//! assertion.
//!
//! The servers listen on loopback — the host's, or a lab node's when started
//! in one (`netns`) — on ports picked free at start.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nearblock::index::RedisOptions;

/// The password of both lab users (a test secret, on loopback only).
const PASSWORD: &str = "lab-secret-7c1d";
/// Masters; each has one replica.
pub const MASTERS: usize = 3;

pub struct RedisCluster {
    dir: crate::tempdir::Dir,
    netns: Option<String>,
    pub ports: Vec<u16>,
    servers: Vec<Option<Child>>,
}

impl RedisCluster {
    /// Starts six servers and joins them into a cluster (host loopback).
    pub fn start() -> Result<Self> {
        Self::start_in(None)
    }

    /// As [`Self::start`], inside network namespace `netns`.
    pub fn start_in(netns: Option<&str>) -> Result<Self> {
        let dir = crate::tempdir::Dir::new("nb-redis")?;
        make_certs(dir.path())?;
        let ports = free_ports(2 * MASTERS, netns)?;
        let mut c = Self {
            dir,
            netns: netns.map(str::to_string),
            ports,
            servers: Vec::new(),
        };
        for i in 0..c.ports.len() {
            c.write_config(i)?;
            let child = c.spawn(i)?;
            c.servers.push(Some(child));
        }
        for i in 0..c.ports.len() {
            c.wait_up(i, Duration::from_secs(20))?;
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(c.ports.iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = c.cli_any(&args)?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c.wait_ok(Duration::from_secs(30))?;
        Ok(c)
    }

    /// What the index needs to reach the cluster as `nearblock`, under `prefix`.
    pub fn options(&self, prefix: &str) -> Result<RedisOptions> {
        let mut o = RedisOptions::new(
            self.ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            "nearblock",
            PASSWORD,
        );
        o.tls_ca = Some(std::fs::read(self.dir.path().join("ca.crt"))?);
        o.key_prefix = prefix.into();
        Ok(o)
    }

    /// The `[index]` table of an indexer config that keeps its index here
    /// under `prefix` (the password in a file beside the certificates).
    pub fn index_config(&self, prefix: &str) -> Result<String> {
        let pw = self.dir.path().join("password");
        std::fs::write(&pw, format!("{PASSWORD}\n"))?;
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        Ok(format!(
            "[index]\nbackend = \"redis-cluster\"\nnodes = {nodes:?}\npassword_file = {:?}\n\
             tls_ca = {:?}\nkey_prefix = {prefix:?}\n",
            pw.display().to_string(),
            self.dir.path().join("ca.crt").display().to_string(),
        ))
    }

    fn write_config(&self, i: usize) -> Result<()> {
        let port = self.ports[i];
        let d = self.dir.path();
        let node = d.join(format!("n{port}"));
        std::fs::create_dir_all(&node)?;
        let conf = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\n\
             tls-cert-file {d}/redis.crt\ntls-key-file {d}/redis.key\ntls-ca-cert-file {d}/ca.crt\n\
             tls-auth-clients no\ntls-replication yes\ntls-cluster yes\n\
             cluster-enabled yes\ncluster-config-file {n}/nodes.conf\ncluster-node-timeout 2000\n\
             cluster-replica-validity-factor 0\n\
             dir {n}\nsave \"\"\nappendonly no\nrepl-diskless-sync yes\nrepl-diskless-sync-delay 0\ndaemonize no\nlogfile {n}/redis.log\n\
             masteruser admin\nmasterauth {PASSWORD}\n\
             user default off\n\
             user admin on >{PASSWORD} ~* &* +@all\n\
             user nearblock on >{PASSWORD} ~* resetchannels -@all +@read +@write +@scripting \
             +@connection +wait +cluster|slots +cluster|shards +cluster|nodes +info -flushall -flushdb -debug\n",
            d = d.display(),
            n = node.display(),
        );
        std::fs::write(node.join("redis.conf"), conf)?;
        Ok(())
    }

    fn command(&self, argv: &[&str]) -> Command {
        if let Some(ns) = &self.netns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(argv);
            c
        } else {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    }

    fn spawn(&self, i: usize) -> Result<Child> {
        let conf = self
            .dir
            .path()
            .join(format!("n{}/redis.conf", self.ports[i]));
        let mut cmd = self.command(&["redis-server", conf.to_str().context("path")?]);
        // SAFETY: prctl in the child between fork and exec, async-signal-safe.
        // The server dies with the thread that started it, even on SIGKILL of
        // the test (a Drop cannot run then).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server (cargo xtask bootstrap installs it)")
    }

    /// `redis-cli` as admin against server `i`.
    pub fn cli(&self, i: usize, args: &[String]) -> Result<Output> {
        self.cli_with(i, args, None)
    }

    /// `redis-cli` as admin against server `i`, running the commands of
    /// `input` (one per line) on one connection.
    pub fn cli_input(&self, i: usize, input: &str) -> Result<Output> {
        self.cli_with(i, &[], Some(input))
    }

    fn cli_with(&self, i: usize, args: &[String], input: Option<&str>) -> Result<Output> {
        let port = self.ports[i].to_string();
        let ca = self.dir.path().join("ca.crt");
        let mut command: Vec<&str> = vec![
            "redis-cli",
            "--tls",
            "--cacert",
            ca.to_str().context("path")?,
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--user",
            "admin",
            "--pass",
            PASSWORD,
            "--no-auth-warning",
        ];
        command.extend(args.iter().map(String::as_str));
        let mut cmd = self.command(&command);
        let Some(input) = input else {
            return Ok(cmd.stdin(Stdio::null()).output()?);
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, input.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    fn cli_any(&self, args: &[String]) -> Result<Output> {
        let i = (0..self.ports.len())
            .find(|&i| self.servers.get(i).is_some_and(Option::is_some))
            .unwrap_or(0);
        self.cli(i, args)
    }

    fn wait_up(&self, i: usize, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(o) = self.cli(i, &["PING".into()]) {
                if String::from_utf8_lossy(&o.stdout).trim() == "PONG" {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("n{}/redis.log", self.ports[i])),
        )
        .unwrap_or_default();
        bail!(
            "redis-server on port {} did not answer: {log}",
            self.ports[i]
        )
    }

    /// Waits until every running server says the cluster is ok and each master
    /// has a replica in sync (`state=online`: `WAIT` counts it).
    pub fn wait_ok(&self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < limit {
            let ok = (0..self.ports.len())
                .filter(|&i| self.servers[i].is_some())
                .all(|i| {
                    self.cli(i, &["CLUSTER".into(), "INFO".into()])
                        .is_ok_and(|o| {
                            last = String::from_utf8_lossy(&o.stdout).into_owned();
                            last.contains("cluster_state:ok")
                        })
                });
            if ok && self.masters_with_replicas()? == MASTERS && self.replicas_acknowledge()? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the redis cluster did not become ok: {last}")
    }

    /// Every running master acknowledges a write through its replica (`WAIT`
    /// answers 1): a replica counted online may still be loading its copy.
    fn replicas_acknowledge(&self) -> Result<bool> {
        for (i, _) in self.ports.iter().enumerate() {
            if self.servers[i].is_none() {
                continue;
            }
            let o = self.cli(i, &["CLUSTER".into(), "NODES".into()])?;
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            let Some(me) = out.lines().find(|l| l.contains("myself")) else {
                continue;
            };
            if !me.contains("master") {
                continue;
            }
            let ranges: Vec<(u32, u32)> = me
                .split_whitespace()
                .skip(8)
                .filter_map(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    Some((a.parse().ok()?, b.parse().ok()?))
                })
                .collect();
            // A key of this master's slots (bounded search), written and
            // waited for on one connection.
            let mut key = None;
            for k in 0..64 {
                let cand = format!("nb-probe-{k}");
                let o = self.cli(i, &["CLUSTER".into(), "KEYSLOT".into(), cand.clone()])?;
                let slot: u32 = String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(u32::MAX);
                if ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)) {
                    key = Some(cand);
                    break;
                }
            }
            let Some(key) = key else { return Ok(false) };
            let o = self.cli_input(i, &format!("SET {key} 1\nWAIT 1 1000\n"))?;
            if String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                != ["OK", "1"]
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `CLUSTER NODES` of a running server: (port, is master, is up) per node.
    pub fn nodes(&self) -> Result<Vec<(u16, bool, bool)>> {
        let o = self.cli_any(&["CLUSTER".into(), "NODES".into()])?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let flags = f.get(2)?;
                let up = f.get(7).is_some_and(|s| *s == "connected") && !flags.contains("fail");
                Some((port, flags.contains("master"), up))
            })
            .collect())
    }

    fn masters_with_replicas(&self) -> Result<usize> {
        let mut n = 0;
        for (i, _) in self.ports.iter().enumerate() {
            if self.servers[i].is_none() {
                continue;
            }
            let o = self.cli(i, &["INFO".into(), "replication".into()])?;
            let s = String::from_utf8_lossy(&o.stdout);
            if s.contains("role:master")
                && s.contains("connected_slaves:1")
                && s.contains("state=online")
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The index of a running master.
    pub fn a_master(&self) -> Result<usize> {
        let nodes = self.nodes()?;
        for (i, p) in self.ports.iter().enumerate() {
            if self.servers[i].is_some() && nodes.iter().any(|(q, m, up)| q == p && *m && *up) {
                return Ok(i);
            }
        }
        bail!("no running master")
    }

    /// Kills server `i` (SIGKILL: nothing flushed, nothing said to the others).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.servers[i].take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts server `i` again with its cluster config: it rejoins (as the
    /// replica of whoever took over its slots).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        if self.servers[i].is_none() {
            let child = self.spawn(i)?;
            self.servers[i] = Some(child);
            self.wait_up(i, Duration::from_secs(20))?;
        }
        Ok(())
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.servers.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A CA and a server certificate for 127.0.0.1, made with openssl.
fn make_certs(d: &Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stdin(Stdio::null())
            .output()
            .context("openssl")?;
        if !o.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=nearblock lab CA",
    ];
    a.extend(ec);
    a.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    run(&a)?;
    let mut a = vec!["req", "-subj", "/CN=127.0.0.1"];
    a.extend(ec);
    a.extend(["-keyout", "redis.key", "-out", "redis.csr"]);
    run(&a)?;
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
    run(&[
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "redis.crt",
    ])
}

/// `n` ports free on loopback whose cluster-bus ports (+10000) are free too.
fn free_ports(n: usize, netns: Option<&str>) -> Result<Vec<u16>> {
    if netns.is_some() {
        // A fresh namespace's loopback is empty: any ports do.
        return Ok((0..n as u16).map(|i| 16379 + i).collect());
    }
    let mut out = Vec::new();
    let mut held = Vec::new();
    for _ in 0..200 {
        if out.len() == n {
            break;
        }
        let l = TcpListener::bind("127.0.0.1:0")?;
        let p = l.local_addr()?.port();
        if p > 55_000 {
            continue;
        }
        if let Ok(bus) = TcpListener::bind(("127.0.0.1", p + 10_000)) {
            out.push(p);
            held.push((l, bus));
        }
    }
    if out.len() < n {
        bail!("no {n} free port pairs on loopback");
    }
    Ok(out)
}
