//! A lab's index fabric: `nearblock indexer` and `nearblock agent` processes in
//! lab nodes sharing one peer secret, and the question tests ask of it (which
//! hosts the global index lists for a block). The splicer tests and the splice
//! bench build the same tree with it: an indexer on core (the global index),
//! rack indexers below it, and agents (the library's, exporting its tgtd LUNs as
//! `IQN/LUN` images; hypervisors' with image files).
//!
//! Declare the [`Fabric`] *after* the [`Lab`] (or before it in a struct), so its
//! processes are killed before the namespaces go.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{procs::Procs, Lab};

/// Indexers and agents of one lab.
pub struct Fabric {
    pub procs: Procs,
    pub secret: PathBuf,
    pub agent_port: u16,
    pub indexer_port: u16,
}

impl Fabric {
    /// Writes the shared secret; starts nothing yet.
    pub fn new(lab: &Lab, agent_port: u16, indexer_port: u16) -> Result<Self> {
        let secret = lab.write_file("peer.secret", b"a lab secret for the peer protocol\n")?;
        Ok(Fabric {
            procs: Procs::new(),
            secret,
            agent_port,
            indexer_port,
        })
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
                "node = \"{node}\"\nlisten = \"0.0.0.0:{}\"\nsecret_file = {:?}\ndb = {:?}\n{parent}push_interval_ms = 200\n",
                self.indexer_port,
                self.secret,
                lab.dir.path().join(format!("{node}.redb")),
            )
            .as_bytes(),
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
            "node = \"{node}\"\nlisten = \"0.0.0.0:{port}\"\nadvertise = \"{}\"\nsecret_file = {:?}\ndb = {:?}\nparent = \"{}\"\nrescan_secs = 3600\npush_interval_ms = 200\n{extra}\n",
            Self::addr(lab, node, self.agent_port),
            self.secret,
            lab.dir.path().join(format!("agent-{node}.redb")),
            self.indexer_addr(lab, parent),
            port = self.agent_port,
        );
        for (name, path) in images {
            t.push_str(&format!("[[image]]\nname = \"{name}\"\npath = {path:?}\n"));
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
        let o = lab.exec(
            node,
            &[
                bin.to_str().context("binary path")?,
                "peer",
                "holders",
                "--addr",
                &self.indexer_addr(lab, node),
                "--local-only",
                "--secret-file",
                self.secret.to_str().context("secret path")?,
                "--node",
                node,
                &hash,
            ],
        );
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
