//! The namespace lab: a topology file (the planner's schema plus `lab` tables)
//! turned into network namespaces joined by veth pairs, with addresses, routes,
//! optional tbf shaping, a real tgtd in the library namespace, and nearblock
//! daemons in appliance namespaces. [`Lab`] is a guard: dropping it (also while
//! unwinding from a failed assertion) kills every process it started and deletes
//! every namespace.
//!
//! Labs run in parallel: each takes a *slot* (an flock'd file under
//! `/run/nearblock-lab/`), and every machine-wide name it uses derives from the slot
//! (namespace prefix `nbS-`, tgtd control port). Stale resources of a slot whose
//! owner died are removed when the slot is taken again.
//!
//! Addresses: link `i` of the topology is `198.18.i.0/24` (RFC 2544's benchmarking
//! range) and `fd00:6e62:0:i::/64`; end `a` is `.1`/`::1`, end `b` is `.2`/`::2`.
//! Namespaces are isolated, so parallel labs reuse the same addresses.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::File,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nearblock::{
    cost::{Role, Topology},
    state::StatusReport,
};

pub mod conformance;
pub mod content;
pub mod cpu;
pub mod datacenter;
pub mod fabric;
pub mod fixture_netns;
pub mod initiator;
pub mod origin;
pub mod procs;
pub mod redis_cluster;
pub mod vmlab;

/// The default lab: library ─ core ─ rack1, rack2 ─ hv1, hv2 / hv3, hv4.
pub const DEFAULT_TOPOLOGY: &str = include_str!("../topologies/default.toml");
/// Three racks of three hypervisors, the library's appliance on core.
pub const THREE_RACKS_TOPOLOGY: &str = include_str!("../topologies/three_racks.toml");
/// Three racks of three hypervisors, shaped uplinks: the fan-out bench's lab.
pub const FANOUT_TOPOLOGY: &str = include_str!("../topologies/fanout.toml");
/// A shaped library uplink and a second way round it: re-planning on load.
pub const LOAD_TOPOLOGY: &str = include_str!("../topologies/load.toml");

/// The lab's API token files, in its directory (`nearblock api token new`).
const API_READ_TOKEN_FILE: &str = "api-read.token";
const API_ADMIN_TOKEN_FILE: &str = "api-admin.token";

/// Where machine-wide state of the lab lives (slot locks).
const LOCK_DIR: &str = "/run/nearblock-lab";
const MAX_SLOTS: u32 = 48;

/// One end of a link, inside a node's namespace.
#[derive(Clone, Debug)]
pub struct Port {
    /// Interface name inside the node (the peer node's name).
    pub iface: String,
    pub peer: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub link: usize,
}

/// A running nearblock daemon.
pub struct ApplianceProc {
    pub node: String,
    child: Child,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

/// How to start an appliance.
#[derive(Clone, Debug)]
pub struct ApplianceOptions {
    /// `false`: monitor-only (no steering).
    pub steer: bool,
    pub extra_config: String,
}

impl Default for ApplianceOptions {
    fn default() -> Self {
        Self {
            steer: true,
            extra_config: String::new(),
        }
    }
}

/// A LUN exported by the lab's tgtd.
#[derive(Clone, Debug)]
pub struct LunSpec {
    pub tid: u32,
    pub iqn: String,
    pub lun: u32,
    pub backing: PathBuf,
    pub readonly: bool,
    /// `None`: any initiator (`-I ALL`); else only this address.
    pub allow: Option<IpAddr>,
}

impl LunSpec {
    /// `backing` as LUN 1 of target 1 (`iqn`), read-only, open to any
    /// initiator: how the tests and benches export a library image.
    pub fn read_only(iqn: &str, backing: PathBuf) -> Self {
        LunSpec {
            tid: 1,
            iqn: iqn.into(),
            lun: 1,
            backing,
            readonly: true,
            allow: None,
        }
    }
}

pub struct Lab {
    slot: u32,
    _slot_lock: File,
    pub topology: Topology,
    pub dir: tempdir::Dir,
    namespaces: Vec<String>,
    /// Node → its ports.
    pub ports: BTreeMap<String, Vec<Port>>,
    tgtd: Option<Child>,
    appliances: Vec<ApplianceProc>,
    luns: Vec<LunSpec>,
    /// Node → lines added to its appliance's `[datapath]` table.
    datapath_extra: BTreeMap<String, String>,
}

/// A temporary directory removed on drop (std only, no extra crate).
pub mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> std::io::Result<Self> {
            let base = std::env::var_os("NEARBLOCK_LAB_TMP")
                .map_or_else(std::env::temp_dir, PathBuf::from);
            for i in 0..1000u32 {
                let p = base.join(format!("{prefix}-{}-{i}", std::process::id()));
                if std::fs::create_dir(&p).is_ok() {
                    return Ok(Self(p));
                }
            }
            Err(std::io::Error::other("no free temporary directory name"))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `f` on a thread inside the network namespace at `ns_path` (threads it
/// starts stay there): sockets it opens belong to that lab node.
pub fn in_namespace<T: Send + 'static>(
    ns_path: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let fd = File::open(&ns_path).unwrap_or_else(|e| panic!("open {ns_path}: {e}"));
        // SAFETY: setns on a namespace file we hold open; it changes only this
        // thread's network namespace.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {ns_path}: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("thread in the lab node")
}

impl Lab {
    /// Runs `f` on a thread inside `node`'s network namespace.
    pub fn in_node<T: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        in_namespace(format!("/run/netns/{}", self.ns(node)), f)
    }

    /// Build the default topology.
    pub fn default_topology() -> Result<Self> {
        Self::new(DEFAULT_TOPOLOGY)
    }

    /// Build a lab from topology text.
    pub fn new(topology_text: &str) -> Result<Self> {
        require_root()?;
        let topology = Topology::parse(topology_text).context("lab topology")?;
        for n in &topology.nodes {
            if n.name.len() > 11 || !n.name.chars().all(|c| c.is_ascii_alphanumeric()) {
                bail!(
                    "lab node names must be 1..=11 ASCII alphanumerics: `{}`",
                    n.name
                );
            }
        }
        let (slot, lock) = take_slot()?;
        let dir = tempdir::Dir::new(&format!("nblab{slot}"))?;
        // Every appliance of the lab takes these API tokens (as a real one would
        // its operators'); the helpers that call the API present them.
        for file in [API_READ_TOKEN_FILE, API_ADMIN_TOKEN_FILE] {
            nearblock::api::auth::write_new_token(&dir.path().join(file))
                .context("writing the lab's API tokens")?;
        }
        let mut lab = Lab {
            slot,
            _slot_lock: lock,
            topology,
            dir,
            namespaces: Vec::new(),
            ports: BTreeMap::new(),
            tgtd: None,
            appliances: Vec::new(),
            luns: Vec::new(),
            datapath_extra: BTreeMap::new(),
        };
        lab.cleanup_stale();
        lab.build().context("building the lab topology")?;
        Ok(lab)
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The read-scope token file every lab appliance accepts (and presents to
    /// its peers' `/links`).
    pub fn api_read_token_file(&self) -> PathBuf {
        self.dir.path().join(API_READ_TOKEN_FILE)
    }

    /// The admin-scope token file every lab appliance accepts.
    pub fn api_admin_token_file(&self) -> PathBuf {
        self.dir.path().join(API_ADMIN_TOKEN_FILE)
    }

    /// The read token itself, for clients that send the header themselves.
    pub fn api_read_token(&self) -> Result<String> {
        Ok(nearblock::api::auth::read_client_token(
            &self.api_read_token_file(),
        )?)
    }

    /// The namespace of `node`.
    pub fn ns(&self, node: &str) -> String {
        format!("nb{}-{}", self.slot, node)
    }

    /// tgtd's control port for this lab.
    pub fn tgt_control_port(&self) -> u32 {
        200 + self.slot
    }

    fn cleanup_stale(&self) {
        let prefix = format!("nb{}-", self.slot);
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if name.starts_with(&prefix) {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
        // A tgtd left by a killed test of this slot.
        let _ = Command::new("pkill")
            .args([
                "-9",
                "-f",
                &format!("tgtd -f -C {} ", self.tgt_control_port()),
            ])
            .status();
    }

    fn build(&mut self) -> Result<()> {
        for n in &self.topology.nodes {
            let ns = self.ns(&n.name);
            run(Command::new("ip").args(["netns", "add", &ns]))?;
            self.namespaces.push(ns.clone());
            self.exec_ok(&n.name, &["ip", "link", "set", "lo", "up"])?;
            if matches!(n.role, Role::Appliance | Role::Switch) {
                self.exec_ok(&n.name, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
                self.exec_ok(
                    &n.name,
                    &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
                )?;
            }
        }
        let links = self.topology.links.clone();
        for (i, l) in links.iter().enumerate() {
            let (na, nb) = (self.ns(&l.a), self.ns(&l.b));
            run(Command::new("ip").args([
                "link", "add", "name", &l.b, "netns", &na, "type", "veth", "peer", "name", &l.a,
                "netns", &nb,
            ]))
            .with_context(|| format!("veth {} - {}", l.a, l.b))?;
            for (node, iface, peer, host) in [(&l.a, &l.b, &l.b, 1u8), (&l.b, &l.a, &l.a, 2u8)] {
                let v4 = Ipv4Addr::new(198, 18, i as u8, host);
                let v6 = Ipv6Addr::new(0xfd00, 0x6e62, 0, i as u16, 0, 0, 0, u16::from(host));
                self.exec_ok(
                    node,
                    &["ip", "addr", "add", &format!("{v4}/24"), "dev", iface],
                )?;
                self.exec_ok(
                    node,
                    &[
                        "ip",
                        "-6",
                        "addr",
                        "add",
                        &format!("{v6}/64"),
                        "dev",
                        iface,
                        "nodad",
                    ],
                )?;
                self.exec_ok(node, &["ip", "link", "set", iface, "up"])?;
                if let Some(mbps) = l.capacity_mbps {
                    if lab_bool(l.lab.as_ref(), "shape") {
                        let rate = format!("{mbps:.0}mbit");
                        self.exec_ok(
                            node,
                            &[
                                "tc", "qdisc", "add", "dev", iface, "root", "tbf", "rate", &rate,
                                "burst", "512kb", "latency", "50ms",
                            ],
                        )?;
                    }
                }
                self.ports.entry(node.clone()).or_default().push(Port {
                    iface: iface.clone(),
                    peer: peer.clone(),
                    v4,
                    v6,
                    link: i,
                });
            }
        }
        self.add_routes()?;
        let tgt_nodes: Vec<String> = self
            .topology
            .nodes
            .iter()
            .filter(|n| lab_bool(n.lab.as_ref(), "tgtd"))
            .map(|n| n.name.clone())
            .collect();
        if let Some(node) = tgt_nodes.first() {
            self.start_tgtd(node)?;
        }
        Ok(())
    }

    /// Static routes: every node reaches every link subnet via the first hop of a
    /// fewest-hops path (ties broken by neighbour name, so routes are stable).
    fn add_routes(&self) -> Result<()> {
        for n in &self.topology.nodes {
            let first_hop = self.first_hops(&n.name);
            for (i, l) in self.topology.links.iter().enumerate() {
                if l.a == n.name || l.b == n.name {
                    continue;
                }
                let (da, db) = (first_hop.get(&l.a), first_hop.get(&l.b));
                let Some((_, hop)) = [da, db].into_iter().flatten().min() else {
                    continue;
                };
                let gw = self.port_toward(hop, &n.name).context("gateway port")?;
                self.exec_ok(
                    &n.name,
                    &[
                        "ip",
                        "route",
                        "add",
                        &format!("198.18.{i}.0/24"),
                        "via",
                        &gw.v4.to_string(),
                    ],
                )?;
                self.exec_ok(
                    &n.name,
                    &[
                        "ip",
                        "-6",
                        "route",
                        "add",
                        &format!("fd00:6e62:0:{i:x}::/64"),
                        "via",
                        &gw.v6.to_string(),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// For each node reachable from `from`: (hops, first-hop neighbour).
    fn first_hops(&self, from: &str) -> BTreeMap<String, (usize, String)> {
        let mut out: BTreeMap<String, (usize, String)> = BTreeMap::new();
        let mut q = VecDeque::new();
        let mut neigh: Vec<&str> = self.topology.neighbours(from).map(|(_, o)| o).collect();
        neigh.sort_unstable();
        for nb in neigh {
            if !out.contains_key(nb) {
                out.insert(nb.to_string(), (1, nb.to_string()));
                q.push_back(nb.to_string());
            }
        }
        while let Some(cur) = q.pop_front() {
            let (d, hop) = out[&cur].clone();
            let mut neigh: Vec<&str> = self.topology.neighbours(&cur).map(|(_, o)| o).collect();
            neigh.sort_unstable();
            for nb in neigh {
                if nb != from && !out.contains_key(nb) {
                    out.insert(nb.to_string(), (d + 1, hop.clone()));
                    q.push_back(nb.to_string());
                }
            }
        }
        out
    }

    /// `node`'s port on the link toward neighbour `peer`.
    pub fn port_toward(&self, node: &str, peer: &str) -> Option<&Port> {
        self.ports.get(node)?.iter().find(|p| p.peer == peer)
    }

    /// The (first) IPv4 address of `node`.
    pub fn addr4(&self, node: &str) -> Ipv4Addr {
        self.ports[node][0].v4
    }

    /// Give `node` a second IPv4 address on its first port's subnet (host part
    /// `host`): the lab's routes reach it as they reach the first. For the
    /// library, tgtd (listening on every address) answers there too: a second
    /// portal.
    pub fn add_address(&self, node: &str, host: u8) -> Result<Ipv4Addr> {
        let port = &self.ports[node][0];
        let [a, b, c, _] = port.v4.octets();
        let addr = Ipv4Addr::new(a, b, c, host);
        self.exec_ok(
            node,
            &[
                "ip",
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &port.iface,
            ],
        )?;
        Ok(addr)
    }

    /// The (first) IPv6 address of `node`.
    pub fn addr6(&self, node: &str) -> Ipv6Addr {
        self.ports[node][0].v6
    }

    /// The node that runs tgtd.
    pub fn library(&self) -> &str {
        self.topology
            .nodes
            .iter()
            .find(|n| n.role == Role::Library)
            .map(|n| n.name.as_str())
            .expect("a library node")
    }

    /// A command to run inside `node`'s namespace.
    pub fn cmd(&self, node: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(node)]).args(argv);
        c
    }

    /// Run inside `node`, capture output.
    pub fn exec(&self, node: &str, argv: &[&str]) -> Result<Output> {
        self.cmd(node, argv)
            .output()
            .with_context(|| format!("running {argv:?} in {node}"))
    }

    /// Run inside `node`; fail with its stderr if it fails.
    pub fn exec_ok(&self, node: &str, argv: &[&str]) -> Result<Output> {
        let out = self.exec(node, argv)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {node} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(out)
    }

    fn start_tgtd(&mut self, node: &str) -> Result<()> {
        std::fs::create_dir_all("/var/run/tgtd")?;
        let port = self.tgt_control_port();
        let log = File::create(self.dir.path().join("tgtd.log"))?;
        let child = self
            .cmd(
                node,
                &["tgtd", "-f", "-C", &port.to_string(), "--nr_iothreads", "2"],
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting tgtd (is the tgt package installed? cargo xtask bootstrap)")?;
        self.tgtd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.tgtadm(&["--op", "show", "--mode", "sys"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "tgtd did not come up within 10 s (see {})",
                    self.dir.path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run `tgtadm` against this lab's tgtd.
    pub fn tgtadm(&self, args: &[&str]) -> Result<String> {
        let port = self.tgt_control_port().to_string();
        let mut command = vec!["tgtadm", "-C", &port, "--lld", "iscsi"];
        command.extend_from_slice(args);
        let out = self.exec_ok(self.library(), &command)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Set a target's parameter in tgtd (e.g. `HeaderDigest` to `CRC32C,None`).
    pub fn set_target_param(&self, tid: u32, name: &str, value: &str) -> Result<()> {
        let tid = tid.to_string();
        self.tgtadm(&[
            "--op", "update", "--mode", "target", "--tid", &tid, "--name", name, "--value", value,
        ])
        .map(drop)
    }

    /// Export a file as a LUN of a new target.
    pub fn add_lun(&mut self, spec: LunSpec) -> Result<()> {
        let tid = spec.tid.to_string();
        if !self.luns.iter().any(|l| l.tid == spec.tid) {
            self.tgtadm(&[
                "--op", "new", "--mode", "target", "--tid", &tid, "-T", &spec.iqn,
            ])?;
        }
        let backing = spec.backing.to_string_lossy().into_owned();
        let lun = spec.lun.to_string();
        self.tgtadm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            &tid,
            "--lun",
            &lun,
            "-b",
            &backing,
        ])?;
        if spec.readonly {
            self.tgtadm(&[
                "--op",
                "update",
                "--mode",
                "logicalunit",
                "--tid",
                &tid,
                "--lun",
                &lun,
                "--params",
                "readonly=1",
            ])?;
        }
        let allow = spec.allow.map_or_else(|| "ALL".into(), |a| a.to_string());
        if !self.luns.iter().any(|l| l.tid == spec.tid) {
            self.tgtadm(&[
                "--op", "bind", "--mode", "target", "--tid", &tid, "-I", &allow,
            ])?;
        }
        self.luns.push(spec);
        Ok(())
    }

    /// `iscsi://LIBRARY/IQN/LUN` with the library's IPv4 address.
    pub fn lun_url(&self, iqn: &str, lun: u32) -> String {
        format!("iscsi://{}/{iqn}/{lun}", self.addr4(self.library()))
    }

    /// `iscsi://[LIBRARY-v6]/IQN/LUN`.
    pub fn lun_url6(&self, iqn: &str, lun: u32) -> String {
        format!("iscsi://[{}]/{iqn}/{lun}", self.addr6(self.library()))
    }

    /// Adds `lines` to the `[datapath]` table of `node`'s appliance config
    /// (e.g. `image_transfer_ports = [7300]`), for appliances started after.
    pub fn set_datapath_extra(&mut self, node: &str, lines: &str) {
        self.datapath_extra
            .insert(node.to_owned(), lines.to_owned());
    }

    /// The appliance config for `node`: the classifier on every port; the port
    /// toward the library is upstream-facing, the others client-facing; the
    /// library's portal (v4 and v6, port 3260) is served.
    pub fn appliance_config(&self, node: &str, opts: &ApplianceOptions) -> String {
        let lib = self.library().to_string();
        let hops = self.first_hops(node);
        let up_peer = hops.get(&lib).map(|(_, h)| h.clone());
        let ports = &self.ports[node];
        let all: Vec<String> = ports.iter().map(|p| format!("{:?}", p.iface)).collect();
        let up: Vec<String> = ports
            .iter()
            .filter(|p| Some(&p.peer) == up_peer.as_ref())
            .map(|p| format!("{:?}", p.iface))
            .collect();
        let client: Vec<String> = ports
            .iter()
            .filter(|p| Some(&p.peer) != up_peer.as_ref())
            .map(|p| format!("{:?}", p.iface))
            .collect();
        let capacity: Vec<String> = ports
            .iter()
            .filter_map(|p| {
                let c = self.topology.links[p.link].capacity_mbps?;
                Some(format!("{:?} = {c:?}", p.iface))
            })
            .collect();
        let extra = self.datapath_extra.get(node).map_or("", String::as_str);
        // The library's portal serves (the lab's tests declare its LUNs); a test
        // that says which portals are steered says so itself.
        let served = if extra.contains("served_portals") || extra.contains("steer_portals") {
            String::new()
        } else {
            format!(
                "served_portals = [\"{}:3260\", \"[{}]:3260\"]\n",
                self.addr4(&lib),
                self.addr6(&lib)
            )
        };
        format!(
            "[appliance]\nname = {node:?}\n\n[datapath]\ninterfaces = [{}]\nclient_facing = [{}]\nupstream_facing = [{}]\nsteer = {}\nxdp_mode = \"skb\"\nlink_capacity_mbps = {{ {} }}\n{served}{}\n{}\n",
            all.join(", "),
            client.join(", "),
            up.join(", "),
            opts.steer,
            capacity.join(", "),
            extra,
            with_api_tokens(
                &opts.extra_config,
                &self.api_read_token_file(),
                &self.api_admin_token_file()
            )
        )
    }

    /// Start a nearblock daemon in `node` and wait until its API answers.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "callers build the options in the call"
    )]
    pub fn start_appliance(&mut self, node: &str, opts: ApplianceOptions) -> Result<()> {
        let cfg = self.appliance_config(node, &opts);
        let config_path = self.dir.path().join(format!("{node}.toml"));
        std::fs::write(&config_path, cfg)?;
        let log_path = self.dir.path().join(format!("{node}.log"));
        let log = File::options().create(true).append(true).open(&log_path)?;
        let bin = nearblock_bin()?;
        let child = self
            .cmd(
                node,
                &[bin.to_str().context("binary path")?, "run", "--config"],
            )
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting nearblock")?;
        self.appliances.push(ApplianceProc {
            node: node.to_string(),
            child,
            config_path,
            log_path: log_path.clone(),
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.status(node).is_ok() {
                return Ok(());
            }
            if let Some(p) = self.appliances.iter_mut().find(|p| p.node == node) {
                if let Ok(Some(st)) = p.child.try_wait() {
                    bail!(
                        "nearblock in {node} exited ({st}): {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "nearblock in {node} did not answer within 15 s: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn take_appliance(&mut self, node: &str) -> Result<ApplianceProc> {
        let i = self
            .appliances
            .iter()
            .position(|p| p.node == node)
            .with_context(|| format!("no appliance running in {node}"))?;
        Ok(self.appliances.remove(i))
    }

    /// SIGKILL the daemon in `node` (no cleanup runs).
    pub fn kill_appliance(&mut self, node: &str) -> Result<()> {
        let mut p = self.take_appliance(node)?;
        p.child.kill()?;
        p.child.wait()?;
        Ok(())
    }

    /// SIGTERM the daemon in `node` and wait for its clean exit (bounded).
    pub fn stop_appliance(
        &mut self,
        node: &str,
        within: Duration,
    ) -> Result<std::process::ExitStatus> {
        let mut p = self.take_appliance(node)?;
        // SAFETY: sending a signal to our own child's pid.
        unsafe { libc::kill(p.child.id().cast_signed(), libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = p.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = p.child.kill();
                let _ = p.child.wait();
                bail!("nearblock in {node} did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id of the daemon running in `node` (`ip netns exec` execs it,
    /// so the child is the daemon itself), for signals and resource limits.
    pub fn appliance_pid(&self, node: &str) -> Option<u32> {
        self.appliances
            .iter()
            .find(|p| p.node == node)
            .map(|p| p.child.id())
    }

    /// The daemon log of `node`.
    pub fn appliance_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{node}.log"))).unwrap_or_default()
    }

    /// The status report of the daemon in `node` (through its API).
    pub fn status(&self, node: &str) -> Result<StatusReport> {
        let bin = nearblock_bin()?;
        let token_file = self.api_read_token_file();
        let out = self.exec_ok(
            node,
            &[
                bin.to_str().context("binary path")?,
                "status",
                "--json",
                "--token-file",
                token_file.to_str().context("token file path")?,
            ],
        )?;
        serde_json::from_slice(&out.stdout).context("status JSON")
    }

    /// `GET /metrics` of the daemon in `node` (open route, default API address),
    /// as curl fetches it.
    pub fn metrics(&self, node: &str) -> Result<String> {
        let out = self.exec_ok(
            node,
            &[
                "curl",
                "-sf",
                "--max-time",
                "10",
                "http://127.0.0.1:7878/metrics",
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kernel interface statistics (`rx_bytes`, `tx_bytes`) of every port of `node`.
    pub fn link_bytes(&self, node: &str) -> Result<Vec<(String, u64, u64)>> {
        let mut out = Vec::new();
        for p in &self.ports[node] {
            let read = |what: &str| -> Result<u64> {
                let o = self.exec_ok(
                    node,
                    &[
                        "cat",
                        &format!("/sys/class/net/{}/statistics/{what}", p.iface),
                    ],
                )?;
                Ok(String::from_utf8_lossy(&o.stdout).trim().parse()?)
            };
            out.push((p.iface.clone(), read("rx_bytes")?, read("tx_bytes")?));
        }
        Ok(out)
    }

    /// Unique payload (payload − retransmitted) of every flow from the
    /// library's address that rack1's classifier saw on its port toward the
    /// core, by (source, destination): what crossed the library's link, all
    /// protocols alike (iSCSI, HTTP, the library agent's block service).
    pub fn library_link_flows(&self) -> Result<std::collections::BTreeMap<(String, String), u64>> {
        let lib = format!("{}:", self.addr4(self.library()));
        Ok(self
            .status("rack1")?
            .flows
            .into_iter()
            .filter(|f| f.interface == "core" && f.src.starts_with(&lib))
            .map(|f| ((f.src, f.dst), f.payload_bytes - f.retrans_bytes))
            .collect())
    }

    /// Bytes that crossed the library's link since `before` (an earlier
    /// [`Self::library_link_flows`]).
    pub fn library_link_moved_since(
        &self,
        before: &std::collections::BTreeMap<(String, String), u64>,
    ) -> Result<u64> {
        Ok(self
            .library_link_flows()?
            .into_iter()
            .map(|(k, v)| v.saturating_sub(before.get(&k).copied().unwrap_or(0)))
            .sum())
    }

    /// Write a file in the lab directory.
    pub fn write_file(&self, name: &str, data: &[u8]) -> Result<PathBuf> {
        let p = self.dir.path().join(name);
        let mut f = File::create(&p)?;
        f.write_all(data)?;
        f.sync_all()?;
        Ok(p)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut p in self.appliances.drain(..) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if let Some(mut t) = self.tgtd.take() {
            let _ = t.kill();
            let _ = t.wait();
        }
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}", self.tgt_control_port()));
        let _ = std::fs::remove_file(format!(
            "/var/run/tgtd/socket.{}.lock",
            self.tgt_control_port()
        ));
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

/// `extra` (a test's config tail) with the lab's token files in its `[api]`
/// table: added to the test's own `[api]` if it has one (TOML allows a table
/// once), else as a new table at the end.
pub fn with_api_tokens(extra: &str, read: &Path, admin: &Path) -> String {
    let keys = format!(
        "read_token_file = {}\nadmin_token_file = {}\n",
        toml_path(read),
        toml_path(admin)
    );
    let mut out = String::with_capacity(extra.len() + keys.len() + 8);
    let mut added = false;
    for line in extra.split_inclusive('\n') {
        out.push_str(line);
        if !added && line.trim() == "[api]" {
            if !line.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&keys);
            added = true;
        }
    }
    if !added {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("[api]\n");
        out.push_str(&keys);
    }
    out
}

fn lab_bool(t: Option<&toml::Table>, key: &str) -> bool {
    t.and_then(|t| t.get(key))
        .and_then(toml::Value::as_bool)
        .unwrap_or(false)
}

fn run(c: &mut Command) -> Result<()> {
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the namespace lab needs root (CAP_NET_ADMIN, CAP_BPF): run as root");
    }
    Ok(())
}

/// Take the first free slot: an exclusive flock on `/run/nearblock-lab/slot-N`.
fn take_slot() -> Result<(u32, File)> {
    std::fs::create_dir_all(LOCK_DIR)?;
    for slot in 0..MAX_SLOTS {
        let f = File::create(Path::new(LOCK_DIR).join(format!("slot-{slot}")))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok((slot, f));
        }
    }
    bail!("all {MAX_SLOTS} lab slots are busy")
}

/// The `nearblock` binary under test: `$NEARBLOCK_BIN`, else next to the test
/// executable's directory (`target/<profile>/nearblock`).
/// `path` as a TOML string (quoted and escaped), for the configs tests write.
pub fn toml_path(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

pub fn nearblock_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NEARBLOCK_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("exe dir")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("target dir")?;
    }
    let p = dir.join("nearblock");
    if !p.exists() {
        bail!(
            "{} not found: build it first (`cargo build -p nearblock`) or set NEARBLOCK_BIN",
            p.display()
        );
    }
    Ok(p)
}

/// The qemu-img 7.2 with its iSCSI block driver, unpacked by `cargo xtask
/// bootstrap` (the machine's own qemu-img has no iSCSI driver).
pub fn qemu_img() -> Result<(PathBuf, PathBuf)> {
    let root = PathBuf::from(
        std::env::var_os("NEARBLOCK_QEMU72")
            .unwrap_or_else(|| "/var/cache/nearblock/qemu-7.2".into()),
    );
    let bin = root.join("usr/bin/qemu-img");
    let modules = root.join("usr/lib/x86_64-linux-gnu/qemu");
    if !bin.exists() {
        bail!("{} missing: run `cargo xtask bootstrap`", bin.display());
    }
    Ok((bin, modules))
}

impl Lab {
    /// Run `iscsi-perf -m QD -b BLOCKS -t SECS URL` in `node`; returns the final
    /// average (MB/s, IOPS) it reports.
    pub fn iscsi_perf(
        &self,
        node: &str,
        url: &str,
        qd: u32,
        blocks: u32,
        secs: u32,
    ) -> Result<(f64, f64)> {
        let o = self.exec_ok(
            node,
            &[
                "iscsi-perf",
                "-m",
                &qd.to_string(),
                "-b",
                &blocks.to_string(),
                "-t",
                &secs.to_string(),
                url,
            ],
        )?;
        parse_iscsi_perf(&String::from_utf8_lossy(&o.stdout))
    }

    /// `qemu-img convert -O raw URL OUT` inside `node` (the VM-instantiation client).
    pub fn qemu_convert(&self, node: &str, url: &str, out: &Path) -> Result<Output> {
        let (bin, modules) = qemu_img()?;
        // qemu 7.2's HTTP driver stalls with several requests in flight (in
        // 12 of 60 copies here, direct as well as through the appliance:
        // `curl_multi_check_completion` reaps one finished transfer per call,
        // so a request slot leaks); one coroutine (`-m 1`) never did (0 of 95).
        let coroutines: &[&str] = if url.starts_with("http") {
            &["-m", "1"]
        } else {
            &[]
        };
        let o = self
            .cmd(
                node,
                &[bin.to_str().context("path")?, "convert", "-p", "-O", "raw"],
            )
            .args(coroutines)
            .arg(url)
            .arg(out)
            .env("QEMU_MODULE_DIR", modules)
            .output()?;
        Ok(o)
    }

    /// The bytes of `url` as `qemu-img convert` inside `node` copies them (into
    /// `<name>.raw` in the lab directory, removed again); a failed copy panics
    /// with qemu-img's stderr and `appliance`'s log.
    pub fn qemu_copy(&self, node: &str, url: &str, name: &str, appliance: &str) -> Vec<u8> {
        let out = self.dir.path().join(format!("{name}.raw"));
        let o = self.qemu_convert(node, url, &out).expect("qemu-img");
        assert!(
            o.status.success(),
            "{name}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.appliance_log(appliance)
        );
        let data = std::fs::read(&out).expect("the copy");
        std::fs::remove_file(&out).expect("remove the copy");
        data
    }
}

/// The splicer's served bytes by source, as `zero=N cache=N …` (for test logs).
pub fn served_by_source(s: &nearblock::splice::stats::SplicerSnapshot) -> String {
    let parts: Vec<String> = s
        .served
        .iter()
        .map(|(c, v)| format!("{}={}", c.name(), v.bytes))
        .collect();
    parts.join(" ")
}

/// (MB/s, IOPS) from iscsi-perf's last "iops average N (M MB/s)" report.
pub fn parse_iscsi_perf(text: &str) -> Result<(f64, f64)> {
    let last = text
        .rsplit("iops average")
        .next()
        .context("no iscsi-perf report")?;
    let mut nums = last
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse::<f64>().ok());
    let iops = nums
        .next()
        .with_context(|| format!("iscsi-perf IOPS in: {text}"))?;
    let mbs = nums
        .next()
        .with_context(|| format!("iscsi-perf MB/s in: {text}"))?;
    Ok((mbs, iops))
}

/// The metric names in Prometheus text: every `# TYPE` line's name, counters with
/// the `_total` their samples carry.
pub fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (name, kind) = (w.next()?, w.next()?);
            Some(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            })
        })
        .collect()
}

/// The metric names docs/operations.md lists under `GET /metrics` (backticked
/// `nearblock_…` names, `{a,b}` alternatives expanded, label sets dropped).
pub fn documented_metric_names() -> Result<std::collections::BTreeSet<String>> {
    documented_metric_names_under("- `GET /metrics`")
}

/// The metric names docs/operations.md lists for the manager's appliance only.
pub fn documented_manager_metric_names() -> Result<std::collections::BTreeSet<String>> {
    documented_metric_names_under("- On the manager's appliance, `/metrics` also has")
}

/// The metric names in the paragraph of docs/operations.md that starts with
/// `entry` (up to the next blank line).
fn documented_metric_names_under(entry: &str) -> Result<std::collections::BTreeSet<String>> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )?;
    let start = doc
        .find(entry)
        .with_context(|| format!("docs/operations.md has no {entry:?} entry"))?;
    let section = &doc[start..];
    let section = &section[..section.find("\n\n").unwrap_or(section.len())];
    let mut names = std::collections::BTreeSet::new();
    for quoted in section.split('`').skip(1).step_by(2) {
        let Some(name) = quoted.strip_prefix("nearblock_") else {
            continue;
        };
        // Labels (`{verdict}`) follow a complete name; alternatives sit inside it.
        let (head, tail) = match name.find('{') {
            Some(i) => (&name[..i], &name[i..]),
            None => (name, ""),
        };
        match (tail.find('}'), head.ends_with('_')) {
            (Some(end), true) => {
                let rest = &tail[end + 1..];
                for alt in tail[1..end].split(',') {
                    names.insert(format!("nearblock_{head}{alt}{rest}"));
                }
            }
            _ => {
                names.insert(format!("nearblock_{head}"));
            }
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_last_iscsi_perf_report() {
        let out = "00:00:01 - lba 129408, iops current 17362 (1085 MB/s), iops average 17362 (1085 MB/s), in_flight 32, busy 0\r        iops average 18130 (1133 MB/s)   \n\nfinished.\n";
        assert_eq!(super::parse_iscsi_perf(out).unwrap(), (1133.0, 18130.0));
        assert!(super::parse_iscsi_perf("garbage").is_err());
    }

    #[test]
    fn lab_tokens_join_the_tests_own_api_table_or_make_one() {
        use std::path::Path;
        let (r, a) = (Path::new("/lab/r"), Path::new("/lab/a"));
        let parse = |s: &str| s.parse::<toml::Table>().unwrap();
        let own =
            super::with_api_tokens("\n[api]\nlisten = \"0.0.0.0:7878\"\n[cost]\nx = 1\n", r, a);
        let t = parse(&own);
        assert_eq!(t["api"]["listen"].as_str(), Some("0.0.0.0:7878"));
        assert_eq!(t["api"]["read_token_file"].as_str(), Some("/lab/r"));
        assert_eq!(t["api"]["admin_token_file"].as_str(), Some("/lab/a"));
        assert_eq!(t["cost"]["x"].as_integer(), Some(1));
        for extra in ["", "[splicer]\nlearn = true"] {
            let t = parse(&super::with_api_tokens(extra, r, a));
            assert_eq!(t["api"]["read_token_file"].as_str(), Some("/lab/r"));
        }
    }
}
