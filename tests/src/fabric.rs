//! A lab's index fabric: `nearblock indexer` and `nearblock agent` processes in
//! lab nodes, each with its own key and one peers file listing them all (as an
//! operator would lay them out: libraries and hypervisors are agents, switches
//! and rack appliances indexers speaking for the agents linked below them), and
//! the question tests ask of it (which
//! hosts the global index lists for a block). The splicer tests and the splice
//! bench build the same tree with it: an indexer on core (the global index),
//! rack indexers below it, and agents (the library's, exporting its tgtd LUNs as
//! `IQN/LUN` images; hypervisors' with image files).
//!
//! Declare the [`Fabric`] *after* the [`Lab`] (or before it in a struct), so its
//! processes are killed before the namespaces go.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use nearblock::{cost::topology::Role as NodeRole, peer::identity::NodeKey};

use crate::{procs::Procs, toml_path, Lab};

/// The name the lab's operator CLI (`nearblock peer …`) is listed under.
pub const CLI_NODE: &str = "cli";

/// Indexers and agents of one lab.
pub struct Fabric {
    pub procs: Procs,
    /// Each node's key file, `<name>.key` (and the CLI's, [`CLI_NODE`]).
    pub keys: PathBuf,
    /// The peers file every node reads.
    pub peers_file: PathBuf,
    pub agent_port: u16,
    pub indexer_port: u16,
    /// Lines added to a node's indexer config (e.g. its `[index]` backend).
    pub index_lines: std::collections::BTreeMap<String, String>,
}

impl Fabric {
    /// Makes every lab node's key (`nearblock keygen`'s format, owner-only
    /// files) and the peers file listing them; starts nothing yet.
    pub fn new(lab: &Lab, agent_port: u16, indexer_port: u16) -> Result<Self> {
        let keys = lab.dir.path().join("keys");
        std::fs::create_dir_all(&keys)?;
        let mut peers = String::new();
        let mut add = |name: &str, role: &str, hosts: &[String]| -> Result<()> {
            let key = NodeKey::generate()?;
            key.save_new(&keys.join(format!("{name}.key")))?;
            writeln!(
                peers,
                "[[node]]\nname = \"{name}\"\nrole = \"{role}\"\npublic_key = \"{}\"\nhosts = {hosts:?}\n",
                key.public()
            )?;
            Ok(())
        };
        for n in &lab.topology.nodes {
            match n.role {
                NodeRole::Library | NodeRole::Hypervisor => add(&n.name, "agent", &[])?,
                NodeRole::Appliance | NodeRole::Switch => {
                    add(&n.name, "indexer", &Self::delegated(lab, &n.name))?;
                }
            }
        }
        add(CLI_NODE, "client", &[])?;
        let peers_file = lab.write_file("peers.toml", peers.as_bytes())?;
        Ok(Fabric {
            procs: Procs::new(),
            keys,
            peers_file,
            agent_port,
            indexer_port,
            index_lines: std::collections::BTreeMap::new(),
        })
    }

    /// The hosts an indexer in `node` speaks for: a rack appliance for the
    /// agents linked to it and itself (its block cache is a holder); a switch
    /// (the top of the lab's tree) for every agent.
    fn delegated(lab: &Lab, node: &str) -> Vec<String> {
        let is_agent = |name: &str| {
            lab.topology.nodes.iter().any(|n| {
                n.name == name && matches!(n.role, NodeRole::Library | NodeRole::Hypervisor)
            })
        };
        let role = lab
            .topology
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.role);
        if matches!(role, Some(NodeRole::Switch)) {
            return lab
                .topology
                .nodes
                .iter()
                .filter(|n| is_agent(&n.name))
                .map(|n| n.name.clone())
                .collect();
        }
        let mut hosts: Vec<String> = lab
            .topology
            .links
            .iter()
            .filter_map(|l| {
                if l.a == node {
                    Some(&l.b)
                } else if l.b == node {
                    Some(&l.a)
                } else {
                    None
                }
            })
            .filter(|n| is_agent(n))
            .cloned()
            .collect();
        hosts.push(node.to_owned());
        hosts
    }

    /// `node`'s key file.
    pub fn key_file(&self, node: &str) -> PathBuf {
        self.keys.join(format!("{node}.key"))
    }

    /// The config lines giving `node` its key and the peers file.
    pub fn credential_lines(&self, node: &str) -> String {
        format!(
            "key_file = {}\npeers_file = {}\n",
            toml_path(&self.key_file(node)),
            toml_path(&self.peers_file)
        )
    }

    /// `nearblock peer` arguments that speak as the lab's operator CLI.
    pub fn cli_args(&self) -> Vec<String> {
        vec![
            "--key-file".into(),
            self.key_file(CLI_NODE).display().to_string(),
            "--peers-file".into(),
            self.peers_file.display().to_string(),
        ]
    }

    /// `node`'s address with `port`.
    pub fn addr(lab: &Lab, node: &str, port: u16) -> String {
        format!("{}:{port}", lab.addr4(node))
    }

    /// The indexer address of `node`.
    pub fn indexer_addr(&self, lab: &Lab, node: &str) -> String {
        Self::addr(lab, node, self.indexer_port)
    }

    /// Writes an indexer config for `node` (pushing to `parent`'s indexer, if any);
    /// also what an appliance's `[indexer] config` names to embed one.
    pub fn indexer_config(&self, lab: &Lab, node: &str, parent: Option<&str>) -> Result<PathBuf> {
        let parent = parent
            .map(|p| format!("parent = \"{}\"\n", self.indexer_addr(lab, p)))
            .unwrap_or_default();
        lab.write_file(
            &format!("ix-{node}.toml"),
            format!(
                "node = \"{node}\"\nlisten = \"0.0.0.0:{}\"\n{}db = {}\n{parent}push_interval_ms = 200\n{}",
                self.indexer_port,
                self.credential_lines(node),
                toml_path(&lab.dir.path().join(format!("{node}.redb"))),
                self.index_lines.get(node).map_or("", String::as_str),
            )
            .as_bytes(),
        )
    }

    /// Starts the manager's appliance in `node`, monitor-only (it counts and
    /// does not steer): the global indexer, `[cost]` over `topology`,
    /// `[planner]`, and `[manager]` (its jobs in the lab directory) with
    /// `manager_lines` added.
    pub fn start_manager(
        &self,
        lab: &mut Lab,
        node: &str,
        topology: &Path,
        manager_lines: &str,
    ) -> Result<()> {
        self.start_manager_with(lab, node, topology, manager_lines, "")
    }

    /// [`Self::start_manager`] with `cost_lines` in its `[cost]` section
    /// (e.g. the peers it polls).
    pub fn start_manager_with(
        &self,
        lab: &mut Lab,
        node: &str,
        topology: &Path,
        manager_lines: &str,
        cost_lines: &str,
    ) -> Result<()> {
        let ix = self.indexer_config(lab, node, None)?;
        let extra_config = format!(
            "[cost]\ntopology = {}\n{cost_lines}\n[planner]\n[manager]\ndb = {}\n{manager_lines}\n[indexer]\nconfig = {}\n",
            toml_path(topology),
            toml_path(&lab.dir.path().join("manager.redb")),
            toml_path(&ix),
        );
        lab.start_appliance(
            node,
            crate::ApplianceOptions {
                steer: false,
                extra_config,
            },
        )
    }

    /// Starts a standalone indexer (`ix-<node>`) in `node`.
    pub fn start_indexer(&mut self, lab: &Lab, node: &str, parent: Option<&str>) -> Result<()> {
        let cfg = self.indexer_config(lab, node, parent)?;
        let cfg = cfg.to_str().context("config path")?;
        self.procs.spawn(
            lab,
            &format!("ix-{node}"),
            node,
            &["indexer", "--config", cfg],
        )
    }

    /// Starts an agent (`agent-<node>`) in `node` reporting to `parent`'s indexer,
    /// holding `images` (name, file); `extra` is appended to its config.
    pub fn start_agent(
        &mut self,
        lab: &Lab,
        node: &str,
        parent: &str,
        images: &[(&str, &Path)],
        extra: &str,
    ) -> Result<()> {
        let mut t = format!(
            "node = \"{node}\"\nlisten = \"0.0.0.0:{port}\"\nadvertise = \"{}\"\n{}db = {}\nparent = \"{}\"\nrescan_secs = 3600\npush_interval_ms = 200\n{extra}\n",
            Self::addr(lab, node, self.agent_port),
            self.credential_lines(node),
            toml_path(&lab.dir.path().join(format!("agent-{node}.redb"))),
            self.indexer_addr(lab, parent),
            port = self.agent_port,
        );
        for (name, path) in images {
            writeln!(
                t,
                "[[image]]\nname = \"{name}\"\npath = {}",
                toml_path(path)
            )?;
        }
        let cfg = lab.write_file(&format!("agent-{node}.toml"), t.as_bytes())?;
        let cfg = cfg.to_str().context("config path")?;
        self.procs.spawn(
            lab,
            &format!("agent-{node}"),
            node,
            &["agent", "--config", cfg],
        )
    }

    /// Starts hypervisor `hv`'s agent under `rack`'s indexer with the plain
    /// hook over `vm_dir`, managed by `manager`, its load pinned (CPU, memory)
    /// and `disk_free` bytes free.
    #[expect(clippy::too_many_arguments, reason = "one host's whole description")]
    pub fn start_hypervisor(
        &mut self,
        lab: &Lab,
        hv: &str,
        rack: &str,
        vm_dir: &Path,
        manager: &str,
        (cpu, mem): (f64, f64),
        disk_free: u64,
    ) -> Result<()> {
        let (qemu_img, modules) = crate::qemu_img()?;
        let extra = format!(
            "metrics_interval_ms = 200\n[hypervisor]\nvm_dir = {}\nmanagers = [\"{manager}\"]\nqemu_img = {}\nqemu_module_dir = {}\n[metrics]\ncpu = {cpu}\nmem = {mem}\n[resources]\ndisk_free_bytes = {disk_free}\n",
            toml_path(vm_dir),
            toml_path(&qemu_img),
            toml_path(&modules),
        );
        self.start_agent(lab, hv, rack, &[], &extra)
    }

    /// Starts the library host's agent: it indexes every LUN of the lab's tgtd
    /// (as `IQN/LUN`, found through tgtd's control port).
    pub fn start_library_agent(&mut self, lab: &Lab, parent: &str) -> Result<()> {
        let lib = lab.library().to_string();
        let tgt = format!("tgt_control_port = {}", lab.tgt_control_port());
        self.start_agent(lab, &lib, parent, &[], &tgt)
    }

    /// The holders `node`'s indexer lists for `block` (its own tree only), as the
    /// CLI prints them (JSON text; empty if the indexer does not answer).
    pub fn holders(&self, lab: &Lab, node: &str, block: &[u8]) -> Result<String> {
        let hash = blake3::hash(block).to_hex().to_string();
        let bin = crate::nearblock_bin()?;
        let addr = self.indexer_addr(lab, node);
        let mut argv: Vec<&str> = vec![
            bin.to_str().context("binary path")?,
            "peer",
            "holders",
            "--addr",
            &addr,
            "--local-only",
        ];
        let cli = self.cli_args();
        argv.extend(cli.iter().map(String::as_str));
        argv.push(&hash);
        let o = lab.exec(node, &argv);
        Ok(o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default())
    }

    /// Waits (bounded by `within`) until `node`'s indexer lists `host` as a holder
    /// of `block`.
    pub fn wait_holder(
        &self,
        lab: &Lab,
        node: &str,
        block: &[u8],
        host: &str,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let out = self.holders(lab, node, block)?;
            if out.contains(&format!("\"{host}\"")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{node}'s index does not list {host} as a holder within {within:?}: {out}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
