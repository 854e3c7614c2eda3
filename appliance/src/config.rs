//! The daemon's configuration file (TOML). Parsed with unknown keys rejected, then
//! validated; every error names the key and, where it can be found, its line.
//!
//! ```toml
//! [appliance]
//! name = "rack1"
//!
//! [datapath]
//! interfaces = ["hv1", "hv2", "up"]  # classifier (XDP or TC) + tx counters on each
//! client_facing = ["hv1", "hv2"]     # new iSCSI connections entering here are steered
//! upstream_facing = ["up"]           # replies to the splicer's upstream sockets
//! image_transfer_ports = []          # classified in addition to 3260
//! steer = true                       # false: monitor only (count, discover)
//! ```

use std::{net::SocketAddr, path::Path, time::Duration};

use serde::Deserialize;

mod key_lines;
pub(crate) use key_lines::KeyLines;

/// Default DSCP codepoint the splicer puts on its upstream connections. 5 is
/// unassigned in the IANA DSCP registry's standard pool, so it does not collide
/// with a PHB an operator already uses.
pub const DEFAULT_DSCP_MARK: u8 = 5;
/// Default skb mark set on steered packets ("nb" in ASCII).
pub const DEFAULT_STEER_MARK: u32 = 0x6e62;
/// Default policy-routing table holding `local default dev lo`.
pub const DEFAULT_ROUTE_TABLE: u32 = 2600;
/// Default priority of the `fwmark … iif … lookup TABLE` rules.
pub const DEFAULT_RULE_PRIORITY: u32 = 100;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub appliance: ApplianceConfig,
    pub datapath: DatapathConfig,
    #[serde(default)]
    pub splicer: SplicerConfig,
    #[serde(default)]
    pub api: ApiConfig,
    /// Live network cost (optional): needs the topology.
    #[serde(default)]
    pub cost: Option<CostConfig>,
    /// The appliance's index store (optional): manifests of served LUNs and the
    /// planner's holders.
    #[serde(default)]
    pub index: Option<IndexConfig>,
    /// The planner served by the API (optional): needs `[index]` and `[cost]`.
    #[serde(default)]
    pub planner: Option<PlannerConfig>,
    /// Run this rack's indexer inside the daemon (optional), on the index store.
    #[serde(default)]
    pub indexer: Option<EmbeddedIndexer>,
    /// The manager (optional; on the appliance whose indexer is the global one):
    /// inventory and place-and-build jobs. Needs `[indexer]` and `[planner]`.
    #[serde(default)]
    pub manager: Option<ManagerConfig>,
}

/// `[manager]`: inventory and jobs (`crate::manage`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    /// The jobs file (redb).
    #[serde(default = "default_manager_db")]
    pub db: std::path::PathBuf,
    /// A host whose agent has not reported for this long is no candidate.
    #[serde(default = "default_manager_stale_secs")]
    pub stale_secs: u64,
    /// How long a built disk may take to appear in the global index.
    #[serde(default = "default_manager_index_wait_secs")]
    pub index_wait_secs: u64,
    /// The library's iSCSI portal (`ADDR:3260`): transparent builds have the
    /// hypervisor's own image tool read `iscsi://PORTAL/TARGET/LUN`, which its
    /// rack's appliance answers. Unset: mode `transparent` is refused.
    #[serde(default)]
    pub library_portal: Option<std::net::SocketAddr>,
    /// Access histories of library LUNs (`TARGET_LUN.history.json`, as a rack
    /// appliance's `[splicer] history_dir` keeps them): usage-weighted
    /// placement. Unset: every block at full cost.
    #[serde(default)]
    pub history_dir: Option<std::path::PathBuf>,
    /// Migration: once a pre-copy round's writes are at most this many MiB,
    /// the VM is paused and the last round moves.
    #[serde(default = "default_migrate_final_mib")]
    pub migrate_final_mib: u64,
    /// Migration: pre-copy rounds at most (then it pauses whatever the delta).
    #[serde(default = "default_migrate_max_rounds")]
    pub migrate_max_rounds: u32,
    /// Migration: how long the source's copy is kept after the VM runs on the
    /// target and its disk is verified, before it is retired.
    #[serde(default = "default_retire_grace_secs")]
    pub retire_grace_secs: u64,
    /// Pre-staging: how often a VM's staged blocks are refreshed.
    #[serde(default = "default_prestage_refresh_secs")]
    pub prestage_refresh_secs: u64,
    /// Pre-staging: a host whose CPU or memory (used fraction, 0..1) stays at
    /// or above this has its running VMs marked likely to move. Unset: only
    /// the operator marks them.
    #[serde(default)]
    pub prestage_when_load_above: Option<f64>,
    /// ... for this long.
    #[serde(default = "default_prestage_after_secs")]
    pub prestage_after_secs: u64,
}

fn default_prestage_after_secs() -> u64 {
    60
}

fn default_prestage_refresh_secs() -> u64 {
    30
}

fn default_migrate_final_mib() -> u64 {
    8
}

fn default_migrate_max_rounds() -> u32 {
    10
}

fn default_retire_grace_secs() -> u64 {
    60
}

fn default_manager_db() -> std::path::PathBuf {
    "/var/lib/nearblock/manager.redb".into()
}

fn default_manager_stale_secs() -> u64 {
    10
}

fn default_manager_index_wait_secs() -> u64 {
    60
}

/// `[indexer]`: the local (rack) or global indexer, run in-process so agents push
/// into the same store the splicer and planner read.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedIndexer {
    /// An indexer configuration file (`nearblock indexer --config`'s format);
    /// its `db` is the appliance's index store.
    pub config: std::path::PathBuf,
}

/// `[index]`: the appliance's block index store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// The store (as filled by `nearblock index` or pushed by agents).
    pub db: std::path::PathBuf,
    /// The most blocks one source may have (1..=2^31; default
    /// [`crate::index::DEFAULT_MAX_IMAGE_BLOCKS`]): changes and stored manifests
    /// claiming more are refused before they are expanded. With `[indexer]`, the
    /// indexer's config sets it (giving a different value here is an error).
    #[serde(default, deserialize_with = "max_image_blocks")]
    pub max_image_blocks: Option<u64>,
}

impl IndexConfig {
    /// `max_image_blocks`, or its default.
    pub fn max_image_blocks(&self) -> u64 {
        self.max_image_blocks
            .unwrap_or(crate::index::DEFAULT_MAX_IMAGE_BLOCKS)
    }
}

/// `[index] max_image_blocks`, range-checked while parsing (the TOML error
/// names the line).
fn max_image_blocks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = u64::deserialize(d)?;
    crate::index::check_max_image_blocks(v)
        .map_err(|e| serde::de::Error::custom(format!("max_image_blocks: {e}")))?;
    Ok(Some(v))
}

#[cfg(test)]
mod index_config_tests {
    use super::IndexConfig;

    #[test]
    fn max_image_blocks_is_optional_and_range_checked() {
        let c: IndexConfig = toml::from_str("db = \"i.redb\"").unwrap();
        assert_eq!(c.max_image_blocks, None);
        assert_eq!(c.max_image_blocks(), crate::index::DEFAULT_MAX_IMAGE_BLOCKS);
        let c: IndexConfig = toml::from_str("db = \"i\"\nmax_image_blocks = 1000").unwrap();
        assert_eq!(c.max_image_blocks(), 1000);
        for bad in ["0", "2147483649"] {
            let e = toml::from_str::<IndexConfig>(&format!("db = \"i\"\nmax_image_blocks = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("max_image_blocks") && e.contains("line 2"),
                "{e}"
            );
        }
    }
}

/// `[planner]`: serve `/plan/*` from the index store and the topology.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerConfig {
    /// Host metrics (`[host.NAME]` tables with cpu, mem, disk) for placement policies.
    #[serde(default)]
    pub metrics: Option<std::path::PathBuf>,
    /// Agent-reported metrics at most this old (seconds) override the file's.
    #[serde(default = "default_metrics_stale_secs")]
    pub metrics_stale_secs: u64,
}

fn default_metrics_stale_secs() -> u64 {
    60
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            metrics: None,
            metrics_stale_secs: default_metrics_stale_secs(),
        }
    }
}

/// `[cost]`: where this appliance sits in the topology, which link each of its
/// interfaces is, and which appliances to learn the other links' utilisation from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostConfig {
    /// The topology file (the planner's schema).
    pub topology: std::path::PathBuf,
    /// Interface → the node at the other end of its link. Default: the node named
    /// like the interface.
    #[serde(default)]
    pub link_peers: std::collections::BTreeMap<String, String>,
    /// Other appliances' API addresses (`host:port`), polled for `/links`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The read token this appliance presents to its peers' APIs (first token
    /// of the file; mode 0600). Needed with `peers`.
    #[serde(default)]
    pub peer_token_file: Option<std::path::PathBuf>,
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// How utilisation turns into cost (gain, saturation, threshold).
    #[serde(default)]
    pub live: crate::cost::live::LiveCostConfig,
}

impl DatapathConfig {
    /// Where `iface`'s classifier runs, as configured.
    pub fn classifier_of(&self, iface: &str) -> ClassifierPlacement {
        self.classifier_for
            .get(iface)
            .copied()
            .unwrap_or(self.classifier)
    }
}

impl CostConfig {
    /// The node at the other end of `iface`.
    pub fn peer_of<'a>(&'a self, iface: &'a str) -> &'a str {
        self.link_peers.get(iface).map_or(iface, String::as_str)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    /// This appliance's node name in the topology.
    pub name: String,
}

/// Where an interface's classifier runs (docs/decisions.md, "Where to classify").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassifierPlacement {
    /// TC on veth and on drivers without native XDP (where XDP would copy every
    /// frame into a linear buffer first); native XDP elsewhere.
    #[default]
    Auto,
    /// XDP, in `xdp_mode`.
    Xdp,
    /// TC ingress (clsact/TCX), ahead of the steering program.
    Tc,
}

/// Which new connections the steering program hands to the splicer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteerPortals {
    /// Only connections to portals that export a served LUN (`served_portals`,
    /// and portals learned from logins to targets with a declared LUN); the
    /// rest are forwarded by the kernel untouched.
    #[default]
    Served,
    /// Every classified connection (the splicer relays what it cannot serve).
    All,
}

/// How XDP is attached (when the classifier is XDP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode if the interface supports it, else generic.
    #[default]
    Auto,
    /// Generic (skb) mode: works on every interface.
    Skb,
    /// Native mode only; attaching fails where unsupported.
    Driver,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// Interfaces that get the XDP classifier and the egress counters.
    pub interfaces: Vec<String>,
    /// Interfaces whose new classified connections are steered to the splicer.
    #[serde(default)]
    pub client_facing: Vec<String>,
    /// Interfaces on which replies to the splicer's upstream sockets arrive.
    #[serde(default)]
    pub upstream_facing: Vec<String>,
    /// TCP ports classified besides iSCSI's 3260 (image-transfer protocols).
    #[serde(default)]
    pub image_transfer_ports: Vec<u16>,
    /// `false`: monitor only (classify, count, discover; nothing is steered).
    #[serde(default = "yes")]
    pub steer: bool,
    /// `served` (default): steer new connections only to portals that export a
    /// served LUN; `all`: every classified connection.
    #[serde(default)]
    pub steer_portals: SteerPortals,
    /// Portals (`ADDR:PORT`) known to export served LUNs before any login is
    /// seen (e.g. the image library's). Others are learned from logins.
    #[serde(default)]
    pub served_portals: Vec<SocketAddr>,
    /// Where the classifier runs on every interface without an entry in
    /// `classifier_for`.
    #[serde(default)]
    pub classifier: ClassifierPlacement,
    /// Per-interface exceptions to `classifier` (`{ eth0 = "xdp" }`).
    #[serde(default)]
    pub classifier_for: std::collections::BTreeMap<String, ClassifierPlacement>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// DSCP codepoint (0..=63, not 0) marking nearblock's own upstream flows.
    #[serde(default = "default_dscp")]
    pub dscp_mark: u8,
    /// skb mark the steering program sets (non-zero).
    #[serde(default = "default_steer_mark")]
    pub steer_mark: u32,
    /// Routing table for steered packets (holds `local default dev lo`).
    #[serde(default = "default_route_table")]
    pub route_table: u32,
    #[serde(default = "default_rule_priority")]
    pub rule_priority: u32,
    /// Capacity per interface in Mbit/s, for live utilization (`{ hv1 = 10000 }`).
    #[serde(default)]
    pub link_capacity_mbps: std::collections::BTreeMap<String, f64>,
    /// How often interface counters are sampled into rates, milliseconds.
    #[serde(default = "default_sample_ms")]
    pub sample_interval_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent on/off keys of the [splicer] table, as operators write them"
)]
pub struct SplicerConfig {
    /// Where the steered IPv4 connections are accepted (any local address).
    #[serde(default = "default_listen_v4")]
    pub listen_v4: SocketAddr,
    /// Where the steered IPv6 connections are accepted.
    #[serde(default = "default_listen_v6")]
    pub listen_v6: SocketAddr,
    /// Upstream connect timeout, seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// On a clean exit, how long existing flows may take to finish, seconds.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    /// `false`: relay every connection as bytes (no iSCSI interpretation at all).
    #[serde(default = "yes")]
    pub iscsi_aware: bool,
    /// Hand an iSCSI connection with no served LUN behind its target to the
    /// kernel after login (its packets rewritten and forwarded by the steering
    /// program, no socket of the splicer's in between); `false`: relay it in
    /// user space.
    #[serde(default = "yes")]
    pub kernel_handoff: bool,
    /// Destination ports whose connections are spliced as iSCSI.
    #[serde(default = "default_iscsi_ports")]
    pub iscsi_ports: Vec<u16>,
    /// Memory block cache bound, bytes (content-addressed, LRU).
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// The share of the cache that blocks pre-staged for VMs likely to move
    /// may pin (0..1).
    #[serde(default = "default_pin_share")]
    pub pin_share: f64,
    /// Learn verified blocks from READs the library answers.
    #[serde(default = "yes")]
    pub learn: bool,
    /// With `[indexer]`: fetch blocks the cache lacks, by hash, from the cheapest
    /// holders the index knows (peers, agents, the library's agent).
    #[serde(default = "yes")]
    pub fetch_from_peers: bool,
    /// How long a READ waits for blocks being fetched before it passes through
    /// to the library, milliseconds.
    #[serde(default = "default_fetch_deadline_ms")]
    pub fetch_deadline_ms: u64,
    /// Bytes fetched ahead of an on-demand READ (0: no read-ahead).
    #[serde(default = "default_readahead_bytes")]
    pub readahead_bytes: u64,
    /// READs longer than this pass through (bounds what one READ makes the splicer
    /// list, assemble and frame; initiators read at most a few MiB at a time).
    #[serde(default = "default_max_served_read_bytes")]
    pub max_served_read_bytes: u64,
    /// A connection whose iSCSI login has not reached Full Feature Phase within this
    /// many seconds is closed on both sides.
    #[serde(default = "default_login_timeout_secs")]
    pub login_timeout_secs: u64,
    /// Blocks per fetch (one holder lookup, one completion signal): a READ waits
    /// for the whole fetch holding its blocks.
    #[serde(default = "default_fetch_batch_blocks")]
    pub fetch_batch_blocks: usize,
    /// Where each served LUN's access history (which blocks each session read,
    /// in order) is kept; it orders read-ahead and feeds the planner.
    #[serde(default)]
    pub history_dir: Option<std::path::PathBuf>,
    /// Prefetch (LUNs with `mode = "prefetch"`): bandwidth budget per link, Mbit/s.
    #[serde(default = "default_prefetch_budget")]
    pub prefetch_budget_mbps: f64,
    /// Nodes (by their name in the embedded indexer's peers file) whose
    /// pre-staging orders this appliance follows into its cache: the manager's
    /// appliance (transparent builds). Empty: none.
    #[serde(default)]
    pub managers: Vec<String>,
    /// How often each declared LUN's manifest source is looked at again
    /// (a changed manifest replaces the LUN; a vanished one withdraws it),
    /// milliseconds.
    #[serde(default = "default_manifest_refresh_ms")]
    pub manifest_refresh_ms: u64,
    /// Connections spliced at once (lowered at start to what the fd limit holds);
    /// at the cap, new connections are forwarded untouched.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections from one source address at once; a source at its cap has its
    /// new connections forwarded untouched.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// TCP keepalive on the splicer's sockets (both sides): idle time before the
    /// first probe, seconds.
    #[serde(default = "default_keepalive_idle_secs")]
    pub keepalive_idle_secs: u64,
    /// Between unanswered probes, seconds.
    #[serde(default = "default_keepalive_interval_secs")]
    pub keepalive_interval_secs: u64,
    /// Unanswered probes before the peer is dead.
    #[serde(default = "default_keepalive_count")]
    pub keepalive_count: u32,
    /// `TCP_USER_TIMEOUT`, seconds: how long sent data may go unacknowledged (or
    /// the peer's receive window stay shut) before the connection is closed
    /// (0: the kernel's default).
    #[serde(default = "default_user_timeout_secs")]
    pub user_timeout_secs: u64,
    /// The host whose index holding speaks for every index-sourced LUN that
    /// names no `authority` of its own (usually the library host's agent name:
    /// one library per rack). Only that host's manifest of the image is served.
    #[serde(default)]
    pub authority: Option<String>,
    /// LUNs served locally (declared immutable; served while a current
    /// manifest is available).
    #[serde(default)]
    pub lun: Vec<ServedLunConfig>,
    /// `[splicer.http]`: the HTTP front end (absent: HTTP is relayed as bytes).
    #[serde(default)]
    pub http: Option<HttpFrontConfig>,
}

/// `[splicer.http]`: image transfers over HTTP answered from the block core.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFrontConfig {
    /// Destination ports answered as HTTP/1.1 (each one of
    /// `datapath.image_transfer_ports`, so that it is steered).
    pub ports: Vec<u16>,
    /// The host whose index holds the origin's files, as its agent names
    /// them (`[[http_root]]` of the library's agent). Default: `splicer.authority`.
    #[serde(default)]
    pub authority: Option<String>,
    /// When a served version's blocks are fetched: `on_demand` (what requests
    /// touch, plus read-ahead) or `prefetch` (the whole version the first time
    /// it is served, in the background, within the prefetch budget).
    #[serde(default)]
    pub mode: crate::splice::catalog::FetchMode,
    /// The HTTP origins (`ADDR:PORT`) whose connections are steered when
    /// `datapath.steer_portals = "served"` (with `"all"`, every connection to
    /// `ports` is).
    #[serde(default)]
    pub origins: Vec<SocketAddr>,
}

/// The largest single-level LUN number (SAM flat space addressing: 14 bits).
pub const MAX_LUN: u16 = 0x3fff;

/// `[[splicer.lun]]`: one immutable LUN the splicer may answer READs of.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServedLunConfig {
    /// Target IQN (TargetName at login).
    pub target: String,
    /// LUN number.
    pub lun: u16,
    /// Manifest file (`nearblock-manifest 1` text form) of the LUN's content.
    #[serde(default)]
    pub manifest: Option<std::path::PathBuf>,
    /// Or: the image's name in the index (the appliance's own store, else its
    /// indexer's parent). Default: `TARGET/LUN`, the library agent's name.
    #[serde(default)]
    pub image: Option<String>,
    /// With `image`: which indexed block size to serve from (default: the
    /// smallest the authority indexed).
    #[serde(default)]
    pub block_size: Option<u32>,
    /// With an index source: the host whose holding of the image is the LUN's
    /// manifest (default: `[splicer] authority`). Another host's manifest of
    /// the same name is never served.
    #[serde(default)]
    pub authority: Option<String>,
    /// Logical block length the LUN is expected to have. Optional: the target's own
    /// (READ CAPACITY) is always what serving uses; a declared one that differs
    /// keeps the LUN from being served (`nearblock status` says why).
    #[serde(default)]
    pub logical_block_size: Option<u32>,
    /// `shadow` (default) or `local`.
    #[serde(default)]
    pub design: crate::splice::catalog::ServeDesign,
    /// `on_demand` (default) or `prefetch` (the whole image at login).
    #[serde(default)]
    pub mode: crate::splice::catalog::FetchMode,
}

impl Default for SplicerConfig {
    fn default() -> Self {
        Self {
            listen_v4: default_listen_v4(),
            listen_v6: default_listen_v6(),
            connect_timeout_secs: default_connect_timeout(),
            drain_timeout_secs: default_drain_timeout(),
            iscsi_aware: true,
            kernel_handoff: true,
            iscsi_ports: default_iscsi_ports(),
            cache_bytes: default_cache_bytes(),
            pin_share: default_pin_share(),
            learn: true,
            fetch_from_peers: true,
            fetch_deadline_ms: default_fetch_deadline_ms(),
            readahead_bytes: default_readahead_bytes(),
            max_served_read_bytes: default_max_served_read_bytes(),
            login_timeout_secs: default_login_timeout_secs(),
            fetch_batch_blocks: default_fetch_batch_blocks(),
            history_dir: None,
            prefetch_budget_mbps: default_prefetch_budget(),
            managers: Vec::new(),
            manifest_refresh_ms: default_manifest_refresh_ms(),
            max_connections: default_max_connections(),
            max_connections_per_source: default_max_connections_per_source(),
            keepalive_idle_secs: default_keepalive_idle_secs(),
            keepalive_interval_secs: default_keepalive_interval_secs(),
            keepalive_count: default_keepalive_count(),
            user_timeout_secs: default_user_timeout_secs(),
            authority: None,
            lun: Vec::new(),
            http: None,
        }
    }
}

impl SplicerConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
    pub fn fetch_deadline(&self) -> Duration {
        Duration::from_millis(self.fetch_deadline_ms)
    }

    pub fn manifest_refresh(&self) -> Duration {
        Duration::from_millis(self.manifest_refresh_ms)
    }

    /// The declared LUNs (no manifest loaded yet: see `splice::manifests`) and
    /// the cache.
    /// `prefetch_budget_mbps`: the prefetches' rate per link (the topology's
    /// budget on the uplink supersedes `splicer.prefetch_budget_mbps`).
    pub fn catalog(
        &self,
        prefetch_budget_mbps: Option<f64>,
    ) -> Result<crate::splice::catalog::Catalog, crate::splice::catalog::CatalogError> {
        use crate::splice::catalog::{Catalog, CatalogError};
        let cache = std::sync::Arc::new(crate::fetch::BlockCache::with_pin_share(self.cache_bytes, self.pin_share));
        let mut core = crate::block_core::BlockCore::new(cache, self.learn);
        core.readahead_bytes = self.readahead_bytes;
        core.max_served_read_bytes = self.max_served_read_bytes;
        core.prefetch_pace = std::sync::Arc::new(crate::fetch::prefetch::PrefetchPace::new(
            prefetch_budget_mbps.unwrap_or(self.prefetch_budget_mbps),
        ));
        let mut catalog = Catalog::with_core(core);
        catalog.login_timeout = Duration::from_secs(self.login_timeout_secs);
        for l in &self.lun {
            let decl =
                l.decl(self.authority.as_deref())
                    .map_err(|message| CatalogError::Invalid {
                        target: l.target.clone(),
                        lun: l.lun,
                        message,
                    })?;
            catalog.declare(decl);
        }
        if let Some(dir) = &self.history_dir {
            std::fs::create_dir_all(dir).map_err(|source| CatalogError::Read {
                path: dir.clone(),
                source,
            })?;
            catalog.load_histories(dir.clone());
        }
        Ok(catalog)
    }
}

impl ServedLunConfig {
    /// Where the manifest comes from: `manifest`, else the index image `image`
    /// (default `TARGET/LUN`) as held by the LUN's authority (its own
    /// `authority`, else `default_authority`, the `[splicer]` one). An index
    /// source without an authority is an error: guessing which host's holding
    /// to serve is what would let any host decide what initiators read.
    pub fn source(
        &self,
        default_authority: Option<&str>,
    ) -> Result<crate::splice::catalog::LunSource, String> {
        use crate::splice::catalog::{lun_name, LunSource};
        let lun = format!("LUN {}/{}", self.target, self.lun);
        match (&self.manifest, &self.image) {
            (Some(_), Some(_)) => Err(format!(
                "{lun}: give at most one of `manifest` (a file) and `image` (in the index)"
            )),
            (Some(_), None) if self.authority.is_some() => Err(format!(
                "{lun}: `authority` names whose index holding is the manifest; \
                 this LUN's manifest is a file (`manifest`)"
            )),
            (Some(path), None) => Ok(LunSource::File(path.clone())),
            (None, image) => {
                let image = image
                    .clone()
                    .unwrap_or_else(|| lun_name(&self.target, self.lun));
                let authority = match self.authority.as_deref().or(default_authority) {
                    Some(host) if !host.trim().is_empty() => host.to_string(),
                    Some(_) => return Err(format!("{lun}: `authority` is empty")),
                    None => {
                        return Err(format!(
                            "{lun}: its manifest comes from the index (image {image}): say which \
                             host's index holding speaks for it, `authority = \"HOST\"` (the \
                             library host's agent name) in this [[splicer.lun]] or in [splicer]"
                        ))
                    }
                };
                Ok(LunSource::Index {
                    image,
                    block_size: self.block_size,
                    authority,
                })
            }
        }
    }

    pub fn decl(
        &self,
        default_authority: Option<&str>,
    ) -> Result<crate::splice::catalog::LunDecl, String> {
        Ok(crate::splice::catalog::LunDecl {
            target: self.target.clone(),
            lun: self.lun,
            design: self.design,
            logical_block_size: self.logical_block_size,
            mode: self.mode,
            source: self.source(default_authority)?,
        })
    }
}

/// `[api]`: the HTTP API. Every route but `/metrics` and `/healthz` needs a
/// bearer token from one of the token files (see [`crate::api::auth`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// HTTP API listen address. Anything but loopback needs a token file.
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// Tokens (one a line, mode 0600) that may read: every GET route.
    #[serde(default)]
    pub read_token_file: Option<std::path::PathBuf>,
    /// Tokens that may also change state (admin routes; admin implies read).
    #[serde(default)]
    pub admin_token_file: Option<std::path::PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_api_listen(),
            read_token_file: None,
            admin_token_file: None,
        }
    }
}

impl ApiConfig {
    /// The tokens of both files, read and checked (owner-only, well formed).
    pub fn auth(&self) -> Result<crate::api::auth::ApiAuth, crate::api::auth::TokenError> {
        crate::api::auth::ApiAuth::load(
            self.read_token_file.as_deref(),
            self.admin_token_file.as_deref(),
        )
    }

    /// Why this section is unsafe, if it is: an API other hosts can reach with
    /// no token configured would be reachable by anyone (or, since requests
    /// without a token are refused, reachable by no one: a mistake either way).
    fn exposure_error(&self) -> Option<String> {
        let exposed = !self.listen.ip().is_loopback();
        let no_token = self.read_token_file.is_none() && self.admin_token_file.is_none();
        (exposed && no_token).then(|| {
            format!(
                "{} is reachable from other hosts but no token is configured: set \
                 read_token_file (and admin_token_file), made with `nearblock api token new \
                 --out FILE`, or listen on 127.0.0.1",
                self.listen
            )
        })
    }
}

fn yes() -> bool {
    true
}

fn default_manifest_refresh_ms() -> u64 {
    5000
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_source() -> usize {
    256
}
fn default_keepalive_idle_secs() -> u64 {
    30
}
fn default_keepalive_interval_secs() -> u64 {
    10
}
fn default_keepalive_count() -> u32 {
    3
}
/// Idle + interval × count: a peer that stops acknowledging is given up on in
/// about the time keepalive takes to declare a silent one dead.
fn default_user_timeout_secs() -> u64 {
    60
}
fn default_dscp() -> u8 {
    DEFAULT_DSCP_MARK
}
fn default_steer_mark() -> u32 {
    DEFAULT_STEER_MARK
}
fn default_route_table() -> u32 {
    DEFAULT_ROUTE_TABLE
}
fn default_rule_priority() -> u32 {
    DEFAULT_RULE_PRIORITY
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_sample_ms() -> u64 {
    1000
}
fn default_listen_v4() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15001))
}
fn default_listen_v6() -> SocketAddr {
    "[::1]:15001".parse().expect("literal address")
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_drain_timeout() -> u64 {
    10
}
fn default_iscsi_ports() -> Vec<u16> {
    vec![3260]
}
fn default_pin_share() -> f64 {
    crate::fetch::DEFAULT_PIN_SHARE
}

fn default_cache_bytes() -> u64 {
    256 << 20
}
fn default_fetch_deadline_ms() -> u64 {
    1000
}
fn default_readahead_bytes() -> u64 {
    8 << 20
}
fn default_fetch_batch_blocks() -> usize {
    crate::fetch::SourcingOptions::default().batch
}
fn default_login_timeout_secs() -> u64 {
    30
}
fn default_max_served_read_bytes() -> u64 {
    16 << 20
}
fn default_prefetch_budget() -> f64 {
    1000.0
}
/// Default API address.
pub fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7878))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("config: {key}{}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid {
        key: String,
        line: Option<usize>,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate(text)?;
        Ok(cfg)
    }

    /// TCP ports the classifier treats as image traffic: 3260 plus the configured ones.
    pub fn classified_ports(&self) -> Vec<u16> {
        let mut ports = vec![nearblock_common::maps::ISCSI_PORT];
        for &p in &self.datapath.image_transfer_ports {
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        ports
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one check after another in the file's order; each is two lines of condition and message"
    )]
    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let lines = KeyLines::new(text);
        let invalid = |table: &str, key: &str, message: String| {
            let key = format!("{table}.{key}");
            ConfigError::Invalid {
                line: lines.line(&key),
                key,
                message,
            }
        };
        let dp = &self.datapath;
        if let Some(t) = self.manager.as_ref().and_then(|m| m.prestage_when_load_above) {
            if !(t > 0.0 && t <= 1.0) {
                return Err(invalid(
                    "manager",
                    "prestage_when_load_above",
                    format!("{t} is not a used fraction in (0, 1]"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.splicer.pin_share) {
            return Err(invalid(
                "splicer",
                "pin_share",
                format!("{} is not a share in 0..1", self.splicer.pin_share),
            ));
        }
        if self.appliance.name.trim().is_empty() {
            return Err(invalid("appliance", "name", "must not be empty".into()));
        }
        if dp.interfaces.is_empty() {
            return Err(invalid(
                "datapath",
                "interfaces",
                "list at least one interface".into(),
            ));
        }
        for name in &dp.interfaces {
            if name.is_empty() || name.len() > 15 {
                return Err(invalid(
                    "datapath",
                    "interfaces",
                    format!("`{name}` is not a valid interface name (1..=15 bytes)"),
                ));
            }
        }
        for (key, list) in [
            ("client_facing", &dp.client_facing),
            ("upstream_facing", &dp.upstream_facing),
        ] {
            for name in list {
                if !dp.interfaces.contains(name) {
                    return Err(invalid(
                        "datapath",
                        key,
                        format!("`{name}` is not listed in datapath.interfaces"),
                    ));
                }
            }
        }
        if let Some(name) = dp
            .classifier_for
            .keys()
            .find(|n| !dp.interfaces.contains(n))
        {
            return Err(invalid(
                "datapath",
                "classifier_for",
                format!("`{name}` is not listed in datapath.interfaces"),
            ));
        }
        if let Some(both) = dp
            .client_facing
            .iter()
            .find(|n| dp.upstream_facing.contains(n))
        {
            return Err(invalid(
                "datapath",
                "upstream_facing",
                format!("`{both}` is also client_facing; an interface has one role"),
            ));
        }
        if dp.steer && dp.client_facing.is_empty() {
            return Err(invalid(
                "datapath",
                "client_facing",
                "steering is on but no interface is client_facing (set steer = false for monitor-only)"
                    .into(),
            ));
        }
        for (iface, c) in &dp.link_capacity_mbps {
            if !dp.interfaces.contains(iface) {
                return Err(invalid(
                    "datapath",
                    "link_capacity_mbps",
                    format!("`{iface}` is not listed in datapath.interfaces"),
                ));
            }
            if !c.is_finite() || *c <= 0.0 {
                return Err(invalid(
                    "datapath",
                    "link_capacity_mbps",
                    format!("`{iface}`: {c} is not a capacity (> 0 Mbit/s)"),
                ));
            }
        }
        if !(50..=60_000).contains(&dp.sample_interval_ms) {
            return Err(invalid(
                "datapath",
                "sample_interval_ms",
                "must be within 50..=60000".into(),
            ));
        }
        if dp.image_transfer_ports.contains(&0) {
            return Err(invalid(
                "datapath",
                "image_transfer_ports",
                "port 0 is not a port".into(),
            ));
        }
        if dp.dscp_mark == 0 || dp.dscp_mark > 63 {
            return Err(invalid(
                "datapath",
                "dscp_mark",
                format!("{} is not a DSCP codepoint in 1..=63", dp.dscp_mark),
            ));
        }
        if dp.steer_mark == 0 {
            return Err(invalid("datapath", "steer_mark", "must be non-zero".into()));
        }
        if matches!(dp.route_table, 0 | 253..=255) {
            return Err(invalid(
                "datapath",
                "route_table",
                format!("table {} is reserved by the kernel", dp.route_table),
            ));
        }
        if let Some(c) = &self.cost {
            for iface in c.link_peers.keys() {
                if !dp.interfaces.contains(iface) {
                    return Err(invalid(
                        "cost",
                        "link_peers",
                        format!("`{iface}` is not listed in datapath.interfaces"),
                    ));
                }
            }
            if let Err(e) = c.live.validate() {
                return Err(invalid("cost", "live", e.to_string()));
            }
            if !(100..=600_000).contains(&c.poll_interval_ms) {
                return Err(invalid(
                    "cost",
                    "poll_interval_ms",
                    "must be within 100..=600000".into(),
                ));
            }
            for p in &c.peers {
                if p.parse::<SocketAddr>().is_err() {
                    return Err(invalid(
                        "cost",
                        "peers",
                        format!("`{p}` is not an address:port"),
                    ));
                }
            }
            if !c.peers.is_empty() && c.peer_token_file.is_none() {
                return Err(invalid(
                    "cost",
                    "peers",
                    "the peers' /links needs a read token of theirs: set peer_token_file".into(),
                ));
            }
        }
        if let Some(message) = self.api.exposure_error() {
            return Err(invalid("api", "listen", message));
        }
        if self.planner.is_some()
            && (self.cost.is_none() || (self.index.is_none() && self.indexer.is_none()))
        {
            return Err(invalid(
                "planner",
                "metrics",
                "the planner needs the topology and the index: add [cost] and [index] sections"
                    .into(),
            ));
        }
        if !self.splicer.managers.is_empty() && self.indexer.is_none() {
            return Err(invalid(
                "splicer",
                "managers",
                "pre-staging orders arrive on the embedded indexer's port: add [indexer]".into(),
            ));
        }
        if self.splicer.managers.iter().any(String::is_empty) {
            return Err(invalid("splicer", "managers", "an empty node name".into()));
        }
        if let Some(m) = &self.manager {
            if self.indexer.is_none() || self.planner.is_none() {
                return Err(invalid(
                    "manager",
                    "db",
                    "the manager plans over the global index: add [indexer] and [planner]".into(),
                ));
            }
            if !(1..=86_400).contains(&m.stale_secs) {
                return Err(invalid("manager", "stale_secs", "must be within 1..=86400".into()));
            }
            if !(1..=86_400).contains(&m.index_wait_secs) {
                return Err(invalid(
                    "manager",
                    "index_wait_secs",
                    "must be within 1..=86400".into(),
                ));
            }
        }
        if let Some(p) = &self.planner {
            if !(1..=86_400).contains(&p.metrics_stale_secs) {
                return Err(invalid(
                    "planner",
                    "metrics_stale_secs",
                    "must be within 1..=86400".into(),
                ));
            }
        }
        for (i, l) in self.splicer.lun.iter().enumerate() {
            let key = |k: &str| format!("lun[{i}].{k}");
            if l.lun > MAX_LUN {
                return Err(invalid(
                    "splicer",
                    &key("lun"),
                    format!(
                        "LUN {}: single-level LUN numbers end at {MAX_LUN} (flat space)",
                        l.lun
                    ),
                ));
            }
            if l.manifest.is_none() && self.index.is_none() && self.indexer.is_none() {
                return Err(invalid(
                    "splicer",
                    &key("image"),
                    format!(
                        "LUN {}/{}: without `manifest`, its manifest comes from the index \
                         (`image`, default `TARGET/LUN`): add an [index] or [indexer] section",
                        l.target, l.lun
                    ),
                ));
            }
            if let Err(message) = l.source(self.splicer.authority.as_deref()) {
                let which = match (&l.manifest, &l.image) {
                    (Some(_), Some(_)) => "manifest",
                    _ => "authority",
                };
                return Err(invalid("splicer", &key(which), message));
            }
        }
        if let Some(http) = &self.splicer.http {
            for p in &http.ports {
                if !self.datapath.image_transfer_ports.contains(p)
                    || self.splicer.iscsi_ports.contains(p)
                {
                    return Err(invalid(
                        "splicer.http",
                        "ports",
                        format!("port {p} must be one of datapath.image_transfer_ports and not an iSCSI port"),
                    ));
                }
            }
            if let Some(o) = http.origins.iter().find(|o| !http.ports.contains(&o.port())) {
                return Err(invalid(
                    "splicer.http",
                    "origins",
                    format!("{o}: its port must be one of splicer.http.ports"),
                ));
            }
            if http.authority.is_none() && self.splicer.authority.is_none() {
                return Err(invalid(
                    "splicer.http",
                    "authority",
                    "names the host whose index holds the origin's files (or set splicer.authority)".into(),
                ));
            }
        }
        if !(1..=3600).contains(&self.splicer.login_timeout_secs) {
            return Err(invalid(
                "splicer",
                "login_timeout_secs",
                "must be within 1..=3600".into(),
            ));
        }
        if !(4096..=(1 << 30)).contains(&self.splicer.max_served_read_bytes) {
            return Err(invalid(
                "splicer",
                "max_served_read_bytes",
                "must be within 4096..=1073741824".into(),
            ));
        }
        if !(10..=3_600_000).contains(&self.splicer.manifest_refresh_ms) {
            return Err(invalid(
                "splicer",
                "manifest_refresh_ms",
                "must be within 10..=3600000".into(),
            ));
        }
        let s = &self.splicer;
        if !s.listen_v4.is_ipv4() {
            return Err(invalid(
                "splicer",
                "listen_v4",
                "must be an IPv4 address".into(),
            ));
        }
        if !s.listen_v6.is_ipv6() {
            return Err(invalid(
                "splicer",
                "listen_v6",
                "must be an IPv6 address".into(),
            ));
        }
        if s.connect_timeout_secs == 0 {
            return Err(invalid(
                "splicer",
                "connect_timeout_secs",
                "must be > 0".into(),
            ));
        }
        for (key, v, max) in [
            ("max_connections", s.max_connections as u64, 1 << 20),
            (
                "max_connections_per_source",
                s.max_connections_per_source as u64,
                1 << 20,
            ),
            // The kernel's own bounds (TCP_KEEPIDLE/KEEPINTVL ≤ 32767 s, KEEPCNT ≤ 127).
            ("keepalive_idle_secs", s.keepalive_idle_secs, 32_767),
            ("keepalive_interval_secs", s.keepalive_interval_secs, 32_767),
            ("keepalive_count", u64::from(s.keepalive_count), 127),
        ] {
            if !(1..=max).contains(&v) {
                return Err(invalid("splicer", key, format!("must be within 1..={max}")));
            }
        }
        if s.user_timeout_secs > 86_400 {
            return Err(invalid(
                "splicer",
                "user_timeout_secs",
                "must be within 0..=86400 (0: the kernel's default)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[appliance]
name = "rack1"

[datapath]
interfaces = ["hv1", "up"]
client_facing = ["hv1"]
upstream_facing = ["up"]
image_transfer_ports = [10809, 3260]
"#;

    #[test]
    fn parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert!(c.datapath.steer);
        assert_eq!(c.datapath.dscp_mark, DEFAULT_DSCP_MARK);
        assert_eq!(c.classified_ports(), [3260, 10809]);
        assert_eq!(c.splicer.listen_v4.port(), 15001);
        assert_eq!(c.api.listen, default_api_listen());
    }

    #[test]
    fn the_manager_needs_the_global_indexer_and_the_planner() {
        let e = Config::parse(&format!("{GOOD}\n[manager]\ndb = \"/tmp/m.redb\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("manager") && e.contains("[indexer]"), "{e}");
        let e = Config::parse(&format!(
            "{GOOD}\n[cost]\ntopology = \"/t.toml\"\n[planner]\n[indexer]\nconfig = \"/ix.toml\"\n[manager]\nstale_secs = 0\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("stale_secs"), "{e}");
        let e = Config::parse(&format!("{GOOD}\n[splicer]\nmanagers = [\"core\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("managers") && e.contains("[indexer]"), "{e}");
        let c = Config::parse(&format!(
            "{GOOD}\n[cost]\ntopology = \"/t.toml\"\n[planner]\n[indexer]\nconfig = \"/ix.toml\"\n[manager]\n"
        ))
        .unwrap();
        let m = c.manager.unwrap();
        assert_eq!((m.stale_secs, m.index_wait_secs), (10, 60));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::parse(
            &GOOD
                .replace("steer_markk", "")
                .replace("image_transfer_ports", "stear = true\nimage_transfer_ports"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("stear"), "{e}");
        assert!(e.contains("line 9"), "{e}");
    }

    #[test]
    fn semantic_error_names_key_and_line() {
        let e =
            Config::parse(&GOOD.replace("client_facing = [\"hv1\"]", "client_facing = [\"hv9\"]"))
                .unwrap_err()
                .to_string();
        assert!(e.contains("datapath.client_facing"), "{e}");
        assert!(e.contains("line 7"), "{e}");
        assert!(e.contains("hv9"), "{e}");
    }

    #[test]
    fn rejects_bad_values() {
        for (from, to, key) in [
            ("name = \"rack1\"", "name = \" \"", "appliance.name"),
            (
                "upstream_facing = [\"up\"]",
                "upstream_facing = [\"hv1\"]",
                "upstream_facing",
            ),
            (
                "image_transfer_ports = [10809, 3260]",
                "image_transfer_ports = [0]",
                "image_transfer_ports",
            ),
            ("[datapath]", "[datapath]\ndscp_mark = 64", "dscp_mark"),
            ("[datapath]", "[datapath]\nroute_table = 254", "route_table"),
            ("[datapath]", "[datapath]\nsteer_mark = 0", "steer_mark"),
            (
                "[datapath]",
                "[datapath]\nlink_capacity_mbps = { hv9 = 10 }",
                "link_capacity_mbps",
            ),
            (
                "[datapath]",
                "[datapath]\nlink_capacity_mbps = { up = 0 }",
                "link_capacity_mbps",
            ),
            (
                "[datapath]",
                "[datapath]\nsample_interval_ms = 1",
                "sample_interval_ms",
            ),
        ] {
            let e = Config::parse(&GOOD.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn cost_section() {
        let c = Config::parse(&format!(
            "{GOOD}\n[cost]\ntopology = \"t.toml\"\nlink_peers = {{ up = \"core\" }}\npeers = [\"198.18.0.2:7878\"]\npeer_token_file = \"/etc/nearblock/peer.token\"\n"
        ))
        .unwrap();
        let cost = c.cost.unwrap();
        assert_eq!(cost.peer_of("up"), "core");
        assert_eq!(cost.peer_of("hv1"), "hv1");
        for (bad, key) in [
            ("link_peers = { eth9 = \"x\" }", "cost.link_peers"),
            ("peers = [\"nowhere\"]", "cost.peers"),
            ("peers = [\"198.18.0.2:7878\"]", "peer_token_file"),
            ("live = { saturation = 1.5 }", "cost.live"),
        ] {
            let e = Config::parse(&format!("{GOOD}\n[cost]\ntopology = \"t\"\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn api_beyond_loopback_needs_a_token() {
        // Loopback without tokens starts (only /metrics and /healthz answer).
        let c = Config::parse(&format!("{GOOD}\n[api]\nlisten = \"[::1]:7878\"\n")).unwrap();
        assert!(c.api.read_token_file.is_none());
        for listen in ["0.0.0.0:7878", "198.18.0.2:7878", "[::]:7878"] {
            let text = format!("{GOOD}\n[api]\nlisten = \"{listen}\"\n");
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains("api.listen") && e.contains("line 12"), "{e}");
            assert!(e.contains("no token is configured"), "{e}");
            for key in ["read_token_file", "admin_token_file"] {
                let c = Config::parse(&format!("{text}{key} = \"/etc/t\"\n")).unwrap();
                assert_eq!(c.api.listen, listen.parse().unwrap());
            }
        }
    }

    #[test]
    fn api_token_files_are_checked_when_loaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("read.token");
        std::fs::write(&file, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let c = Config::parse(&format!("{GOOD}\n[api]\nread_token_file = {file:?}\n")).unwrap();
        let e = c.api.auth().unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(c.api.auth().unwrap().has_tokens());
        std::fs::write(&file, "secret\n").unwrap();
        let e = c.api.auth().unwrap_err().to_string();
        assert!(e.contains("read.token") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn served_lun_manifest_sources() {
        use crate::splice::catalog::LunSource;
        let lun =
            |body: &str| format!("{GOOD}\n[[splicer.lun]]\ntarget = \"iqn.x\"\nlun = 1\n{body}");
        let c = Config::parse(&lun("manifest = \"m\"\n")).unwrap();
        assert_eq!(
            c.splicer.lun[0].source(None),
            Ok(LunSource::File("m".into()))
        );
        assert_eq!(c.splicer.manifest_refresh_ms, 5000);
        for (body, key) in [
            (
                "manifest = \"m\"\nimage = \"i\"\n",
                "splicer.lun[0].manifest",
            ),
            ("image = \"i\"\n", "splicer.lun[0].image"),
            ("", "splicer.lun[0].image"),
        ] {
            let e = Config::parse(&lun(body)).unwrap_err().to_string();
            assert!(e.contains(key), "{body:?}: {e}");
        }
        let index = "\n[index]\ndb = \"i.redb\"\n";
        // `image`, or neither: the library agent's name for the LUN; held by
        // the LUN's own authority, else the [splicer] one.
        let splicer = |keys: &str| {
            lun("").replace(
                "[[splicer.lun]]",
                &format!("[splicer]\n{keys}[[splicer.lun]]"),
            )
        };
        for (text, image, authority) in [
            (lun("image = \"img\"\nauthority = \"lib\"\n"), "img", "lib"),
            (splicer("authority = \"lib\"\n"), "iqn.x/1", "lib"),
            (
                format!("{}authority = \"lib2\"\n", splicer("authority = \"lib\"\n")),
                "iqn.x/1",
                "lib2",
            ),
        ] {
            let c = Config::parse(&format!("{text}{index}")).unwrap();
            let want = LunSource::Index {
                image: image.into(),
                block_size: None,
                authority: authority.into(),
            };
            assert_eq!(
                c.splicer.lun[0].source(c.splicer.authority.as_deref()),
                Ok(want)
            );
            assert!(c.splicer.catalog(None).is_ok());
        }
        // An index source with no authority, an empty one, or an authority
        // for a file: errors that say what to write.
        for (text, says) in [
            (
                lun("image = \"img\"\n"),
                "say which host's index holding speaks for it",
            ),
            (lun("authority = \"\"\n"), "`authority` is empty"),
            (
                lun("manifest = \"m\"\nauthority = \"lib\"\n"),
                "this LUN's manifest is a file",
            ),
        ] {
            let e = Config::parse(&format!("{text}{index}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("splicer.lun[0].authority") && e.contains(says),
                "{text}: {e}"
            );
        }
        // A file LUN needs no authority, and a [splicer] one does not touch it.
        let c = Config::parse(&format!(
            "{}{index}",
            splicer("authority = \"lib\"\n").replace("lun = 1\n", "lun = 1\nmanifest = \"m\"\n")
        ))
        .unwrap();
        assert_eq!(
            c.splicer.lun[0].source(Some("lib")),
            Ok(LunSource::File("m".into()))
        );
        let e = Config::parse(&format!(
            "{}{index}",
            splicer("manifest_refresh_ms = 0\nauthority = \"lib\"\n")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("manifest_refresh_ms"), "{e}");
    }

    /// Two `[[splicer.lun]]` tables after `GOOD` (lines 11..=14 and 16..=19),
    /// the second with `body` added on line 20.
    fn two_luns(body: &str) -> String {
        format!(
            "{GOOD}\n[[splicer.lun]]\ntarget = \"iqn.x\"\nlun = 1\nmanifest = \"m\"\n\n\
             [[splicer.lun]]\ntarget = \"iqn.x\"\nlun = 2\nmanifest = \"m2\"\n{body}"
        )
    }

    #[test]
    fn keys_of_the_second_served_lun_are_named_at_their_line() {
        let c = Config::parse(&two_luns("")).unwrap();
        assert_eq!(c.splicer.lun[1].lun, 2);
        // Checked after parsing: the line of the key in the second table.
        let e = Config::parse(&two_luns("").replace("lun = 2", "lun = 20000"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("splicer.lun[1].lun (line 18)"), "{e}");
        let e = Config::parse(&two_luns("authority = \"lib\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("splicer.lun[1].authority (line 20)"), "{e}");
        // Rejected while parsing: the parser's own position of the key.
        let e = Config::parse(&two_luns("bogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus") && e.contains("line 20"), "{e}");
        // A key the LUN does not give is located at its `[[splicer.lun]]`.
        let e = Config::parse(&two_luns("").replace("manifest = \"m2\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("splicer.lun[1].image (line 16)"), "{e}");
    }

    #[test]
    fn monitor_only_needs_no_client_facing() {
        let text = "[appliance]\nname = \"a\"\n[datapath]\ninterfaces = [\"x\"]\nsteer = false\n";
        assert!(!Config::parse(text).unwrap().datapath.steer);
        let e = Config::parse(&text.replace("steer = false", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("client_facing"), "{e}");
    }

    #[test]
    fn classifier_placement_defaults_to_auto_with_per_interface_exceptions() {
        let text = "[appliance]\nname = \"a\"\n[datapath]\ninterfaces = [\"x\", \"y\"]\nsteer = false\n";
        let c = Config::parse(text).unwrap();
        assert_eq!(c.datapath.classifier_of("x"), ClassifierPlacement::Auto);
        let c = Config::parse(&format!(
            "{text}classifier = \"tc\"\nclassifier_for = {{ y = \"xdp\" }}\n"
        ))
        .unwrap();
        assert_eq!(c.datapath.classifier_of("x"), ClassifierPlacement::Tc);
        assert_eq!(c.datapath.classifier_of("y"), ClassifierPlacement::Xdp);
        let e = Config::parse(&format!("{text}classifier_for = {{ z = \"tc\" }}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("classifier_for") && e.contains("`z`"), "{e}");
        let e = Config::parse(&format!("{text}classifier = \"ebpf\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("classifier"), "{e}");
    }

    #[test]
    fn connection_caps_and_keepalive() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(
            (
                c.splicer.max_connections,
                c.splicer.max_connections_per_source
            ),
            (4096, 256)
        );
        let k = crate::steer::Keepalive::from(&c.splicer);
        assert_eq!(
            (k.idle, k.interval, k.count, k.user_timeout),
            (
                Duration::from_secs(30),
                Duration::from_secs(10),
                3,
                Some(Duration::from_mins(1))
            )
        );
        let with = |body: &str| {
            Config::parse(&format!(
                "{GOOD}
[splicer]
{body}
"
            ))
        };
        let c = with(
            "user_timeout_secs = 0
max_connections_per_source = 4",
        )
        .unwrap();
        assert_eq!(
            crate::steer::Keepalive::from(&c.splicer).user_timeout,
            None,
            "0: kernel default"
        );
        assert_eq!(c.splicer.max_connections_per_source, 4);
        for bad in [
            "max_connections = 0",
            "max_connections_per_source = 0",
            "keepalive_idle_secs = 0",
            "keepalive_interval_secs = 40000",
            "keepalive_count = 128",
            "user_timeout_secs = 100000",
        ] {
            let key = bad.split(' ').next().unwrap();
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("splicer.{key}")), "{bad}: {e}");
        }
    }

    #[test]
    fn wrong_type_is_reported_with_line() {
        let e = Config::parse(&GOOD.replace("[datapath]", "[datapath]\nsteer = 3")).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("line 6"), "{e}");
    }
}
