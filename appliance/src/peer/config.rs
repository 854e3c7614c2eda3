//! Configuration files of `nearblock agent` and `nearblock indexer` (TOML, unknown
//! keys rejected, validated; every error names the key and, where found, its line).
//!
//! ```toml
//! # nearblock agent --config
//! node = "hv1"                          # this host's name in the index
//! listen = "0.0.0.0:7900"               # block service
//! advertise = "198.18.3.2:7900"         # how peers reach it (default: listen)
//! key_file = "/etc/nearblock/node.key"       # this node's key (`nearblock keygen`)
//! peers_file = "/etc/nearblock/peers.toml"   # every node's public key and role
//! db = "/var/lib/nearblock/agent.redb"  # the agent's own index of its files
//! parent = "198.18.3.1:7901"            # the rack's indexer (optional)
//! rescan_secs = 60                      # re-index changed files this often (also SIGHUP)
//! full_rescan_secs = 86400              # rehash even unchanged-looking files
//! push_interval_ms = 1000
//! block_sizes = ["4KiB"]
//! tgt_control_port = 0                  # library: learn LUN backing files from tgtd
//! tgtadm = "tgtadm"
//! metrics_interval_ms = 5000            # report cpu/mem/disk to the parent (0: never)
//! metrics_disk_path = "/var/lib/libvirt/images"  # filesystem of `disk` (default: db's dir)
//! max_image_blocks = 134217728          # largest image indexed, in blocks (1..=2^31)
//!
//! [[image]]
//! name = "vm1"
//! path = "/var/lib/libvirt/images/vm1.raw"
//!
//! [[http_root]]                         # an HTTP origin's document root (library host)
//! dir = "/srv/images"                   # files under it are indexed by URL path
//! url_prefix = "/images"                # the URL path of `dir` (default "/")
//! origin = "http://127.0.0.1:80"        # asked HEAD for each file's validators
//!
//! [metrics]                             # optional: report these instead of measuring
//! cpu = 0.5                             # (each of cpu, mem, disk optional)
//!
//! [peer]                                # client/server tuning (all optional)
//! max_in_flight = 16
//! request_timeout_ms = 10000
//! connect_timeout_ms = 3000
//! penalty_secs = 300
//! batch = 64
//! max_frame_mib = 32                    # one frame; larger requests are fragmented
//! max_message_mib = 1024                # largest reassembled request
//! ```
//!
//! ```toml
//! # nearblock indexer --config
//! node = "rack1"
//! listen = "0.0.0.0:7901"
//! key_file = "/etc/nearblock/node.key"
//! peers_file = "/etc/nearblock/peers.toml"   # also says which hosts each child speaks for
//! db = "/var/lib/nearblock/rack1-index.redb"
//! parent = "198.18.0.2:7901"            # optional: omit at the top of the tree
//! push_interval_ms = 1000
//! metrics_interval_ms = 5000            # forward hosts' reports to the parent (0: never)
//! max_image_blocks = 134217728          # a change or manifest claiming more blocks is refused
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{
    client::ClientOptions,
    identity::Credentials,
    proto::{Role, DEFAULT_MAX_FRAME},
    server::ServerOptions,
};
use crate::config::{ConfigError, KeyLines};

/// `[peer]`: protocol tuning shared by server and client.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerTuning {
    pub max_in_flight: usize,
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub penalty_secs: u64,
    pub batch: usize,
    pub max_frame_mib: u32,
    /// Largest request reassembled from fragments (a push of a big image's
    /// manifest: ~33 bytes per 4 KiB block).
    pub max_message_mib: usize,
}

impl Default for PeerTuning {
    fn default() -> Self {
        Self {
            max_in_flight: 16,
            request_timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
            penalty_secs: 300,
            batch: 64,
            max_frame_mib: DEFAULT_MAX_FRAME >> 20,
            max_message_mib: 1024,
        }
    }
}

impl PeerTuning {
    pub fn client(&self, node: &str, role: Role, creds: Credentials) -> ClientOptions {
        let mut o = ClientOptions::new(node, role, creds);
        o.max_in_flight = self.max_in_flight;
        o.request_timeout = Duration::from_millis(self.request_timeout_ms);
        o.connect_timeout = Duration::from_millis(self.connect_timeout_ms);
        o.penalty = Duration::from_secs(self.penalty_secs);
        o.batch = self.batch;
        o.max_frame = self.max_frame_mib << 20;
        o
    }

    pub fn server(&self, node: &str, role: Role, creds: Credentials) -> ServerOptions {
        let mut o = ServerOptions::new(node, role, creds);
        o.max_frame = self.max_frame_mib << 20;
        o.max_message = self.max_message_mib << 20;
        o.max_in_flight = self.max_in_flight.max(1) * 2;
        o
    }

    fn validate(&self, v: &Validator) -> Result<(), ConfigError> {
        if self.max_in_flight == 0 || self.max_in_flight > 4096 {
            return Err(v.err("peer", "max_in_flight", "must be 1..=4096"));
        }
        if self.batch == 0 || self.batch > super::proto::MAX_HASHES {
            return Err(v.err(
                "peer",
                "batch",
                &format!("must be 1..={}", super::proto::MAX_HASHES),
            ));
        }
        if !(2..=1024).contains(&self.max_frame_mib) {
            return Err(v.err("peer", "max_frame_mib", "must be 2..=1024"));
        }
        if self.max_message_mib < self.max_frame_mib as usize || self.max_message_mib > 16384 {
            return Err(v.err(
                "peer",
                "max_message_mib",
                "must be at least max_frame_mib and at most 16384",
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(v.err("peer", "request_timeout_ms", "must be > 0"));
        }
        if self.connect_timeout_ms == 0 {
            return Err(v.err("peer", "connect_timeout_ms", "must be > 0"));
        }
        Ok(())
    }
}

/// `[hypervisor]` of an agent: the host's VMs, through the hook
/// (`crate::hypervisor`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    /// The hook; `plain` (the only one built in): raw image files in `vm_dir`.
    #[serde(default = "default_hook")]
    pub kind: String,
    /// Where the VMs' disks live.
    pub vm_dir: PathBuf,
    /// Nodes (by their name in the peers file) whose build orders this agent
    /// follows: the manager's appliance. Empty: no builds.
    #[serde(default)]
    pub managers: Vec<String>,
    /// The image tool of transparent builds (`qemu-img` with its iSCSI
    /// driver; default: `qemu-img` on the PATH).
    #[serde(default)]
    pub qemu_img: Option<PathBuf>,
    /// Its block-driver modules (`QEMU_MODULE_DIR`), for an unpacked build.
    #[serde(default)]
    pub qemu_module_dir: Option<PathBuf>,
}

fn default_hook() -> String {
    "plain".into()
}

/// `[resources]` of an agent: absolute resources reported as given instead of
/// measured (namespaces share `/proc`, so a lab pins them; so may an operator
/// who reserves part of a host).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcePins {
    pub cores: Option<u32>,
    pub mem_bytes: Option<u64>,
    pub mem_free_bytes: Option<u64>,
    pub disk_free_bytes: Option<u64>,
}

/// `[[image]]` of an agent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub name: String,
    pub path: PathBuf,
}

/// `[[http_root]]` of an agent: a directory an HTTP origin serves, indexed
/// file by file under the name of the version the origin serves
/// ([`crate::index::http_image_name`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRootConfig {
    pub dir: PathBuf,
    /// The URL path the origin serves `dir` at.
    #[serde(default = "default_url_prefix")]
    pub url_prefix: String,
    /// The origin's base URL (`http://host:port`), asked `HEAD` for each file.
    pub origin: String,
}

fn default_url_prefix() -> String {
    "/".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub node: String,
    pub listen: SocketAddr,
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// This node's private key (`nearblock keygen`).
    pub key_file: PathBuf,
    /// Every node's public key, role and delegated hosts.
    pub peers_file: PathBuf,
    #[serde(default = "default_agent_db")]
    pub db: PathBuf,
    #[serde(default)]
    pub parent: Option<SocketAddr>,
    #[serde(default = "default_rescan")]
    pub rescan_secs: u64,
    #[serde(default = "default_full_rescan")]
    pub full_rescan_secs: u64,
    #[serde(default = "default_push_ms")]
    pub push_interval_ms: u64,
    #[serde(default = "default_block_sizes")]
    pub block_sizes: Vec<String>,
    #[serde(default)]
    pub tgt_control_port: Option<u32>,
    #[serde(default = "default_tgtadm")]
    pub tgtadm: String,
    #[serde(default)]
    pub image: Vec<ImageConfig>,
    #[serde(default)]
    pub http_root: Vec<HttpRootConfig>,
    /// How often the host's load is reported to the parent (0: never).
    #[serde(default = "default_metrics_ms")]
    pub metrics_interval_ms: u64,
    /// The filesystem whose used fraction is reported as `disk` (default: the
    /// directory of `db`).
    #[serde(default)]
    pub metrics_disk_path: Option<PathBuf>,
    /// `[metrics]`: values reported as given instead of measured (for hosts whose
    /// load is known from elsewhere, or to steer placement by hand).
    #[serde(default)]
    pub metrics: crate::plan::HostMetrics,
    /// The most blocks one image may have in the agent's store (a larger file
    /// is reported as an error and not indexed).
    #[serde(default = "default_max_image_blocks")]
    pub max_image_blocks: u64,
    /// The host's VMs and build orders (a hypervisor's agent).
    #[serde(default)]
    pub hypervisor: Option<HypervisorConfig>,
    #[serde(default)]
    pub resources: ResourcePins,
    #[serde(default)]
    pub peer: PeerTuning,
    /// Loaded from `key_file` and `peers_file` by validation.
    #[serde(skip)]
    pub creds: Option<Credentials>,
    /// Parsed `block_sizes`.
    #[serde(skip)]
    pub sizes: Vec<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexerConfig {
    pub node: String,
    pub listen: SocketAddr,
    /// How peers reach this indexer (an appliance's cache blocks, pre-staging
    /// orders): pushed to the parent as this node's address. Unset: not pushed.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// This node's private key (`nearblock keygen`).
    pub key_file: PathBuf,
    /// Every node's public key, role and delegated hosts.
    pub peers_file: PathBuf,
    /// The redb store (`[index] backend = "redb"`, the default); with another
    /// backend, the base name of the indexer's local state files only.
    pub db: PathBuf,
    /// Where the index is kept (`[index]`): redb in `db`, or a Redis Cluster.
    #[serde(default)]
    pub index: IndexBackend,
    #[serde(default)]
    pub parent: Option<SocketAddr>,
    #[serde(default = "default_push_ms")]
    pub push_interval_ms: u64,
    /// How often the hosts' load reports are forwarded to the parent (0: never).
    #[serde(default = "default_metrics_ms")]
    pub metrics_interval_ms: u64,
    /// The most blocks one source may have: a pushed change or a stored
    /// manifest claiming more is refused before it is expanded.
    #[serde(default = "default_max_image_blocks")]
    pub max_image_blocks: u64,
    #[serde(default)]
    pub peer: PeerTuning,
    #[serde(skip)]
    pub creds: Option<Credentials>,
}

/// `[index]` of an indexer's config: the store behind it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case")]
pub enum IndexBackend {
    /// The embedded store, in the file `db`.
    #[default]
    Redb,
    /// A Redis Cluster (the global index of a large datacenter).
    RedisCluster(RedisClusterConfig),
}

/// `[index] backend = "redis-cluster"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisClusterConfig {
    /// Seed nodes, `host:port`; the rest of the cluster is discovered.
    pub nodes: Vec<String>,
    /// The ACL user nearblock logs in as.
    #[serde(default = "default_redis_user")]
    pub username: String,
    /// A file holding its password (one line; never the password itself here).
    pub password_file: PathBuf,
    /// The CA certificate (PEM) that signed the servers': TLS when set.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Prefix of every key (several indexes may share one cluster).
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// Replicas each master must have acknowledged a push to before it is
    /// acknowledged (`WAIT`).
    #[serde(default = "default_redis_replicas")]
    pub replicas: u32,
    /// How long that `WAIT` may take.
    #[serde(default = "default_redis_wait_ms")]
    pub wait_ms: u64,
    /// Connect and per-command timeout: a lookup fails after it (and its
    /// caller falls back) rather than hang.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_redis_user() -> String {
    "nearblock".into()
}
fn default_redis_prefix() -> String {
    "nearblock".into()
}
fn default_redis_replicas() -> u32 {
    1
}
fn default_redis_wait_ms() -> u64 {
    2000
}
fn default_redis_timeout_ms() -> u64 {
    1000
}

impl RedisClusterConfig {
    /// The store's options, with the password and the CA read from their files.
    pub fn options(
        &self,
        coarse: Option<u32>,
        log: bool,
        max_image_blocks: u64,
    ) -> Result<crate::index::RedisOptions, ConfigError> {
        let password = read(&self.password_file)?.trim_end_matches(['\n', '\r']).to_string();
        let tls_ca = match &self.tls_ca {
            Some(p) => Some(std::fs::read(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?),
            None => None,
        };
        let mut o = crate::index::RedisOptions::new(self.nodes.clone(), &self.username, &password);
        o.tls_ca = tls_ca;
        o.key_prefix.clone_from(&self.key_prefix);
        o.log = log;
        o.coarse = coarse;
        o.max_image_blocks = max_image_blocks;
        o.replicas = self.replicas;
        o.wait = std::time::Duration::from_millis(self.wait_ms);
        o.timeout = std::time::Duration::from_millis(self.timeout_ms);
        Ok(o)
    }
}

fn default_agent_db() -> PathBuf {
    "/var/lib/nearblock/agent.redb".into()
}
fn default_rescan() -> u64 {
    60
}
fn default_full_rescan() -> u64 {
    86_400
}
fn default_push_ms() -> u64 {
    1000
}
fn default_metrics_ms() -> u64 {
    1000
}
fn default_max_image_blocks() -> u64 {
    crate::index::DEFAULT_MAX_IMAGE_BLOCKS
}
fn default_block_sizes() -> Vec<String> {
    vec!["4KiB".into()]
}
fn default_tgtadm() -> String {
    "tgtadm".into()
}

/// Builds the errors of the checks that run after parsing, each naming its key
/// and the key's line.
struct Validator<'a> {
    lines: KeyLines<'a>,
}

impl Validator<'_> {
    /// `key` inside `table` (`""`: top level; `key` may index an array of
    /// tables, `image[1].path`).
    fn err(&self, table: &str, key: &str, message: &str) -> ConfigError {
        let key = if table.is_empty() {
            key.to_string()
        } else {
            format!("{table}.{key}")
        };
        ConfigError::Invalid {
            line: self.lines.line(&key),
            key,
            message: message.into(),
        }
    }

    fn metrics_interval(&self, ms: u64) -> Result<(), ConfigError> {
        if ms != 0 && !(100..=3_600_000).contains(&ms) {
            return Err(self.err(
                "",
                "metrics_interval_ms",
                "must be 0 (off) or within 100..=3600000",
            ));
        }
        Ok(())
    }

    fn max_image_blocks(&self, max: u64) -> Result<(), ConfigError> {
        crate::index::check_max_image_blocks(max).map_err(|e| self.err("", "max_image_blocks", &e))
    }

    /// The node name checked, then its key and the peers file loaded: what an
    /// agent's and an indexer's config both start with.
    fn identity(
        &self,
        node: &str,
        key_file: &Path,
        peers_file: &Path,
    ) -> Result<Credentials, ConfigError> {
        self.node(node)?;
        self.credentials(key_file, peers_file)
    }

    fn node(&self, node: &str) -> Result<(), ConfigError> {
        if node.trim().is_empty() || node.len() > 255 {
            return Err(self.err("", "node", "must be 1..=255 characters"));
        }
        Ok(())
    }

    fn credentials(&self, key_file: &Path, peers_file: &Path) -> Result<Credentials, ConfigError> {
        let key = super::identity::NodeKey::load(key_file)
            .map_err(|e| self.err("", "key_file", &e.to_string()))?;
        let keyring = super::identity::Keyring::open(peers_file)
            .map_err(|e| self.err("", "peers_file", &e.to_string()))?;
        Ok(Credentials { key, keyring })
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read(path)?)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut c: AgentConfig = toml::from_str(text)?;
        let v = Validator {
            lines: KeyLines::new(text),
        };
        c.creds = Some(v.identity(&c.node, &c.key_file, &c.peers_file)?);
        if c.listen.ip().is_unspecified() && c.advertise.is_none() {
            return Err(v.err(
                "",
                "advertise",
                "required when listen is a wildcard address: the address peers fetch blocks from",
            ));
        }
        if c.rescan_secs == 0 {
            return Err(v.err("", "rescan_secs", "must be > 0"));
        }
        if c.push_interval_ms == 0 {
            return Err(v.err("", "push_interval_ms", "must be > 0"));
        }
        v.metrics_interval(c.metrics_interval_ms)?;
        v.max_image_blocks(c.max_image_blocks)?;
        if let Some((m, value)) = c.metrics.out_of_range() {
            return Err(v.err(
                "metrics",
                m.name(),
                &format!("{value} is not a used fraction in [0, 1]"),
            ));
        }
        if c.block_sizes.is_empty() {
            return Err(v.err("", "block_sizes", "give at least one block size"));
        }
        let mut sizes = Vec::new();
        for s in &c.block_sizes {
            match crate::index::chunk::parse_block_size(s) {
                Ok(b) => sizes.push(b),
                Err(e) => return Err(v.err("", "block_sizes", &format!("`{s}`: {e:#}"))),
            }
        }
        sizes.sort_unstable();
        sizes.dedup();
        c.sizes = sizes;
        if c.tgt_control_port == Some(0) {
            c.tgt_control_port = None;
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, im) in c.image.iter().enumerate() {
            if im.name.trim().is_empty() {
                return Err(v.err("", &format!("image[{i}].name"), "must not be empty"));
            }
            if !names.insert(im.name.clone()) {
                return Err(v.err(
                    "",
                    &format!("image[{i}].name"),
                    &format!("`{}` is listed twice", im.name),
                ));
            }
            if !im.path.is_absolute() {
                return Err(v.err(
                    "",
                    &format!("image[{i}].path"),
                    &format!("`{}` must be absolute", im.path.display()),
                ));
            }
        }
        if let Some(h) = &c.hypervisor {
            if h.kind != "plain" {
                return Err(v.err(
                    "hypervisor",
                    "kind",
                    &format!("`{}`: the built-in hook is `plain`", h.kind),
                ));
            }
            if !h.vm_dir.is_absolute() {
                return Err(v.err("hypervisor", "vm_dir", "must be absolute"));
            }
        }
        c.peer.validate(&v)?;
        Ok(c)
    }

    /// The filesystem whose used fraction is `disk`.
    pub fn disk_path(&self) -> PathBuf {
        match (&self.metrics_disk_path, self.db.parent()) {
            (Some(p), _) => p.clone(),
            (None, Some(d)) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// The address peers reach the block service at.
    pub fn advertised(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.listen)
    }

    pub fn credentials(&self) -> Credentials {
        self.creds
            .clone()
            .expect("validated config has credentials")
    }
}

impl IndexerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read(path)?)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut c: IndexerConfig = toml::from_str(text)?;
        let v = Validator {
            lines: KeyLines::new(text),
        };
        c.creds = Some(v.identity(&c.node, &c.key_file, &c.peers_file)?);
        if c.push_interval_ms == 0 {
            return Err(v.err("", "push_interval_ms", "must be > 0"));
        }
        v.metrics_interval(c.metrics_interval_ms)?;
        v.max_image_blocks(c.max_image_blocks)?;
        if c.parent == Some(c.listen) {
            return Err(v.err("", "parent", "an indexer cannot be its own parent"));
        }
        if let IndexBackend::RedisCluster(r) = &c.index {
            if r.nodes.is_empty() {
                return Err(v.err("index", "nodes", "name at least one node (host:port)"));
            }
            if r.key_prefix.is_empty() || r.key_prefix.contains(['{', '}']) {
                return Err(v.err("index", "key_prefix", "must be non-empty, without braces"));
            }
            if !(1..=600_000).contains(&r.wait_ms) || !(1..=600_000).contains(&r.timeout_ms) {
                return Err(v.err("index", "wait_ms", "wait_ms and timeout_ms: 1..=600000"));
            }
            // The secrets are read now, so a missing file fails the start.
            r.options(None, true, c.max_image_blocks)?;
        }
        c.peer.validate(&v)?;
        Ok(c)
    }

    pub fn credentials(&self) -> Credentials {
        self.creds
            .clone()
            .expect("validated config has credentials")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key file and a peers file in a temporary directory (kept alive by the
    /// returned guard), and the config lines naming them.
    fn credential_files() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = super::super::identity::NodeKey::generate().unwrap();
        key.save_new(&dir.path().join("node.key")).unwrap();
        std::fs::write(
            dir.path().join("peers.toml"),
            format!(
                "[[node]]\nname = \"hv1\"\nrole = \"agent\"\npublic_key = \"{}\"\n",
                key.public()
            ),
        )
        .unwrap();
        let lines = format!(
            "key_file = {:?}\npeers_file = {:?}\n",
            dir.path().join("node.key"),
            dir.path().join("peers.toml")
        );
        (dir, lines)
    }

    /// An agent config (its credential lines are line 5 and 6).
    fn agent() -> (tempfile::TempDir, String) {
        let (dir, creds) = credential_files();
        let text = format!(
            "\nnode = \"hv1\"\nlisten = \"0.0.0.0:7900\"\nadvertise = \"198.18.3.2:7900\"\n{creds}parent = \"198.18.3.1:7901\"\n\n[[image]]\nname = \"vm1\"\npath = \"/tmp/vm1.raw\"\n"
        );
        (dir, text)
    }

    #[test]
    fn agent_parses_with_defaults() {
        let (_dir, agent) = agent();
        let c = AgentConfig::parse(&agent).unwrap();
        assert_eq!(c.sizes, [4096]);
        assert_eq!(c.rescan_secs, 60);
        assert_eq!(c.advertised().to_string(), "198.18.3.2:7900");
        assert_eq!(c.peer.batch, 64);
        assert_eq!(c.metrics_interval_ms, 1000);
        assert_eq!(c.metrics, crate::plan::HostMetrics::default());
        assert_eq!(c.disk_path(), PathBuf::from("/var/lib/nearblock"));
    }

    #[test]
    fn agent_pinned_metrics() {
        let (_dir, agent) = agent();
        let c = AgentConfig::parse(&format!(
            "metrics_disk_path = \"/srv\"\n{agent}\n[metrics]\ncpu = 0.5\ndisk = 1\n"
        ))
        .unwrap();
        assert_eq!(
            (c.metrics.cpu, c.metrics.mem, c.metrics.disk),
            (Some(0.5), None, Some(1.0))
        );
        assert_eq!(c.disk_path(), PathBuf::from("/srv"));
        let e = |t: &str| AgentConfig::parse(t).unwrap_err().to_string();
        let s = e(&format!("{agent}\n[metrics]\nmem = 1.5\n"));
        assert!(
            s.contains("metrics.mem (line 14)") && s.contains("1.5"),
            "{s}"
        );
        let s = e(&format!("{agent}\n[metrics]\ngpu = 0.5\n"));
        assert!(s.contains("gpu"), "{s}");
        let s = e(&format!("metrics_interval_ms = 50\n{agent}"));
        assert!(s.contains("metrics_interval_ms (line 1)"), "{s}");
        assert_eq!(
            AgentConfig::parse(&format!("metrics_interval_ms = 0\n{agent}"))
                .unwrap()
                .metrics_interval_ms,
            0
        );
    }

    #[test]
    fn errors_name_the_key() {
        let (_dir, agent) = agent();
        let e = |t: &str| AgentConfig::parse(t).unwrap_err().to_string();
        let s = e(&agent.replace("advertise = \"198.18.3.2:7900\"\n", ""));
        assert!(s.contains("advertise"), "{s}");
        let key_line = agent.lines().nth(4).unwrap().to_string();
        let s = e(&agent.replace(&key_line, "key_file = \"/nonexistent/node.key\""));
        assert!(
            s.contains("key_file (line 5)") && s.contains("/nonexistent/node.key"),
            "{s}"
        );
        let s = e(&agent.replace(&format!("{key_line}\n"), ""));
        assert!(s.contains("key_file") && s.contains("missing"), "{s}");
        let s = e(&format!("{agent}\n[peer]\nbatch = 0\n"));
        assert!(s.contains("peer.batch"), "{s}");
        let s = e(&format!("rescan_secs = 0\n{agent}"));
        assert!(s.contains("rescan_secs (line 1)"), "{s}");
        let s = e(&format!("bogus = 1\n{agent}"));
        assert!(s.contains("bogus"), "{s}");
        let s = e(&format!(
            "{agent}\n[[image]]\nname = \"vm1\"\npath = \"/x\"\n"
        ));
        assert!(
            s.contains("image[1].name (line 14)") && s.contains("twice"),
            "{s}"
        );
        let s = e(&format!(
            "{agent}\n[[image]]\nname = \"vm2\"\npath = \"relative\"\n"
        ));
        assert!(s.contains("image[1].path (line 15)"), "{s}");
        let s = e(&format!("block_sizes = [\"3KiB\"]\n{agent}"));
        assert!(s.contains("block_sizes"), "{s}");
        let peers_line = agent.lines().nth(5).unwrap().to_string();
        let s = e(&agent.replace(&peers_line, "peers_file = \"/nonexistent/x\""));
        assert!(s.contains("peers_file (line 6)"), "{s}");
        let s = e(&format!("secret = \"0123456789abcdef\"\n{agent}"));
        assert!(s.contains("secret"), "{s}");
    }

    #[test]
    fn indexer_parses_and_validates() {
        let (_dir, creds) = credential_files();
        let (_adir, agent) = agent();
        let t =
            &format!("\nnode = \"core\"\nlisten = \"0.0.0.0:7901\"\n{creds}db = \"/tmp/x.redb\"\n");
        let c = IndexerConfig::parse(t).unwrap();
        assert!(c.parent.is_none());
        assert_eq!(c.max_image_blocks, crate::index::DEFAULT_MAX_IMAGE_BLOCKS);
        let c = IndexerConfig::parse(&format!("max_image_blocks = 1000\n{t}")).unwrap();
        assert_eq!(c.max_image_blocks, 1000);
        for bad in ["0", "2147483649"] {
            let e = IndexerConfig::parse(&format!("max_image_blocks = {bad}\n{t}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("max_image_blocks (line 1)"), "{e}");
        }
        let e = AgentConfig::parse(&format!("max_image_blocks = 0\n{agent}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_image_blocks (line 1)"), "{e}");
        let e = IndexerConfig::parse(&t.replace("db = \"/tmp/x.redb\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("db"), "{e}");
        let e = IndexerConfig::parse(&format!("parent = \"0.0.0.0:7901\"\n{t}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("parent (line 1)"), "{e}");
    }
    #[test]
    fn an_indexer_on_redis_cluster_reads_its_secrets_and_checks_its_keys() {
        let (dir, creds) = credential_files();
        let pw = dir.path().join("redis.password");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let base = format!("node = \"core\"\nlisten = \"0.0.0.0:7901\"\n{creds}db = \"/tmp/x.redb\"\n");
        let redis = |extra: &str| {
            format!(
                "{base}[index]\nbackend = \"redis-cluster\"\nnodes = [\"10.0.0.1:6379\"]\n\
                 password_file = {:?}\n{extra}",
                pw.display().to_string()
            )
        };
        let c = IndexerConfig::parse(&redis("key_prefix = \"dc1\"\n")).unwrap();
        let IndexBackend::RedisCluster(r) = &c.index else {
            panic!("backend: {:?}", c.index)
        };
        let o = r.options(Some(16), false, 1000).unwrap();
        assert_eq!(
            (o.username.as_str(), o.password.as_str(), o.key_prefix.as_str()),
            ("nearblock", "s3cret", "dc1")
        );
        assert_eq!((o.replicas, o.log, o.tls_ca.is_none()), (1, false, true));
        // The default is redb; an explicit one too.
        let c = IndexerConfig::parse(&base).unwrap();
        assert!(matches!(c.index, IndexBackend::Redb));
        let c = IndexerConfig::parse(&format!("{base}[index]\nbackend = \"redb\"\n")).unwrap();
        assert!(matches!(c.index, IndexBackend::Redb));
        let e = |t: &str| IndexerConfig::parse(t).unwrap_err().to_string();
        assert!(e(&redis("key_prefix = \"{x}\"\n")).contains("index.key_prefix"));
        assert!(e(&redis("wait_ms = 0\n")).contains("index.wait_ms"));
        assert!(e(&redis("colour = \"red\"\n")).contains("colour"));
        let missing = redis("").replace(&pw.display().to_string(), "/nonexistent/pw");
        assert!(e(&missing).contains("/nonexistent/pw"));
        let none = redis("").replace("[\"10.0.0.1:6379\"]", "[]");
        assert!(e(&none).contains("index.nodes"));
        assert!(e(&format!("{base}[index]\nbackend = \"etcd\"\n")).contains("etcd"));
    }
}
