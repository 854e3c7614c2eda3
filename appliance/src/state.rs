//! The running appliance's shared state and its status report: what the daemon
//! builds (`daemon::run`) and the API reads (`api`), in a module of its own so
//! neither depends on the other.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{
    classify::{self, ByteSample, Discovery, DiscoveryTable, FlowView, LinkCounters, LinkRate},
    config::Config,
    cost::{
        feed::{self, LinkUtilization},
        Graph, LiveCosts, Topology,
    },
    datapath::{self, Datapath, DatapathError},
    fetch::{RankFeed, SourceRanks},
    splice::stats::{SplicerSnapshot, SplicerStats},
};

/// The running appliance's shared state.
pub struct Appliance {
    pub config: Config,
    pub datapath: Mutex<Datapath>,
    /// Who logged in to what (filled by [`classify::discovery_loop`]).
    pub discovery: Arc<Mutex<DiscoveryTable>>,
    /// Latest live rate per ifindex (from [`classify::sample_links_loop`]).
    pub rates: Mutex<BTreeMap<u32, LinkRate>>,
    /// Live network cost, when `[cost]` is configured.
    pub live_costs: Option<Mutex<LiveCosts>>,
    /// The planner behind `/plan/*`, when `[planner]` is configured.
    pub planner: Option<Planner>,
    pub splicer: Arc<SplicerStats>,
    /// The served LUNs (with their access histories), when steering.
    pub catalog: Option<Arc<crate::splice::catalog::Catalog>>,
    /// Inventory and jobs, when `[manager]` is configured (set once the
    /// embedded indexer runs).
    pub manager: std::sync::OnceLock<Arc<crate::manage::Manager>>,
    pub started: Instant,
}

/// The manager plans with the appliance's live-priced topology and its host
/// metrics.
impl crate::manage::PlanningView for Appliance {
    fn topology(&self) -> Option<Topology> {
        self.priced_topology(true)
    }

    fn host_metrics(&self) -> crate::plan::MetricsFile {
        self.planner
            .as_ref()
            .map(Planner::metrics_now)
            .unwrap_or_default()
    }

    fn link_utilisation(&self) -> Vec<f64> {
        self.live_costs
            .as_ref()
            .map(|lc| lc.lock().applied_utilisation().to_vec())
            .unwrap_or_default()
    }
}

/// What the API's planner answers from.
pub struct Planner {
    pub store: Arc<crate::index::RedbStore>,
    pub topology: Topology,
    /// `[planner] metrics`: the static host metrics.
    pub metrics: crate::plan::MetricsFile,
    /// The embedded indexer's agent-reported host metrics (set once it runs).
    pub reported: std::sync::OnceLock<Arc<crate::peer::hosts::HostReports>>,
    /// Reports at most this old override the file.
    pub stale_after: Duration,
}

impl Planner {
    /// The metrics placement uses now: the file, with fresh reports laid over it.
    pub fn metrics_now(&self) -> crate::plan::MetricsFile {
        match self.reported.get() {
            Some(r) => self
                .metrics
                .overlaid(&r.fresh(Instant::now(), self.stale_after)),
            None => self.metrics.clone(),
        }
    }
}

impl Appliance {
    /// The topology with each link's weight as in force now (live costs), or the
    /// static weights.
    pub fn priced_topology(&self, live: bool) -> Option<Topology> {
        let planner = self.planner.as_ref()?;
        let mut topo = planner.topology.clone();
        if live {
            if let Some(lc) = &self.live_costs {
                let lc = lc.lock();
                // Graph links are the topology's links, in order.
                for (l, g) in topo.links.iter_mut().zip(lc.graph().links()) {
                    l.weight = g.weight;
                }
            }
        }
        Some(topo)
    }
}

impl Appliance {
    /// How block holders rank from this appliance: path costs over the live link
    /// weights (static when live costs are off); `None` without a topology.
    pub fn source_ranks(&self) -> Option<SourceRanks> {
        let name = &self.config.appliance.name;
        if let Some(lc) = &self.live_costs {
            SourceRanks::from_graph(lc.lock().graph(), name)
        } else {
            let topo = &self.planner.as_ref()?.topology;
            SourceRanks::from_graph(&Graph::from_topology(topo), name)
        }
    }
}

/// The fetcher's holder ranks follow the live link costs.
impl RankFeed for Appliance {
    fn version(&self) -> Option<u64> {
        self.live_costs.as_ref().map(|lc| lc.lock().recomputes())
    }

    fn current(&self) -> Option<SourceRanks> {
        self.source_ranks()
    }
}

/// The link sampler reads the datapath's interface counters; its rates feed
/// status and, as this appliance's own links, the live costs.
impl LinkCounters for Appliance {
    fn byte_counters(&self) -> Result<ByteSample, DatapathError> {
        let counters = self.datapath.lock().interfaces()?;
        Ok(counters
            .iter()
            .map(|(i, c)| (*i, (c.rx_bytes, c.tx_bytes)))
            .collect())
    }

    fn publish_rates(&self, rates: BTreeMap<u32, LinkRate>) {
        *self.rates.lock() = rates;
        self.apply_link_reports(&self.own_links());
    }
}

/// Per-interface counters for status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceView {
    pub interface: String,
    pub ifindex: u32,
    /// Where the classifier runs here: `tc`, `xdp-native` or `xdp-generic`
    /// (absent for an interface the daemon did not attach).
    #[serde(default)]
    pub classifier: Option<String>,
    /// The TC programs the kernel runs here, ingress then egress, in order
    /// (`nb_classify_steer` where classifying and steering are one program).
    #[serde(default)]
    pub tc_ingress: Vec<String>,
    #[serde(default)]
    pub tc_egress: Vec<String>,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Live rate over the last sample interval.
    pub rate: LinkRate,
}

/// What `nearblock status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub appliance: String,
    pub steering: bool,
    pub uptime_secs: u64,
    pub splicer: SplicerSnapshot,
    pub verdicts: Vec<(String, u64)>,
    pub interfaces: Vec<InterfaceView>,
    /// Portals whose new connections are steered (`steer_portals = "served"`).
    #[serde(default)]
    pub served_portals: Vec<String>,
    pub flows: Vec<FlowView>,
    pub discovery: Vec<Discovery>,
}

impl Appliance {
    /// This appliance's own links with their measured utilisation (what
    /// `GET /links` publishes). Only links with a configured capacity and a
    /// topology peer are reported.
    pub fn own_links(&self) -> Vec<LinkUtilization> {
        let Some(cost) = &self.config.cost else {
            return Vec::new();
        };
        let rates = self.rates.lock().clone();
        let mut out = Vec::new();
        for iface in &self.config.datapath.interfaces {
            let Ok(ifindex) = datapath::if_index(iface) else {
                continue;
            };
            let Some(rate) = rates.get(&ifindex) else {
                continue;
            };
            let Some(u) = rate.utilization else {
                continue;
            };
            out.push(LinkUtilization {
                a: self.config.appliance.name.clone(),
                b: cost.peer_of(iface).to_string(),
                utilization: u,
                rx_bps: rate.rx_bps,
                tx_bps: rate.tx_bps,
            });
        }
        out
    }

    /// Feed link reports (own or a peer's) into the live costs.
    pub fn apply_link_reports(&self, reports: &[LinkUtilization]) {
        let Some(live) = &self.live_costs else {
            return;
        };
        let mut live = live.lock();
        match feed::apply(&mut live, reports) {
            Ok((changed, unknown)) => {
                if !changed.is_empty() {
                    tracing::debug!(links = changed.len(), "live link costs changed");
                }
                if !unknown.is_empty() {
                    warn!(links = ?unknown, "utilisation reported for links not in the topology");
                }
            }
            Err(e) => warn!(cause = %e, "applying link utilisation"),
        }
    }

    /// This appliance's own account for the manager's network view (`GET
    /// /api/v1/appliance`): no kernel map is walked.
    pub fn appliance_view(&self) -> crate::manage::network::ApplianceView {
        let splicer = self.splicer.snapshot();
        crate::manage::network::ApplianceView {
            name: self.config.appliance.name.clone(),
            steering: self.config.datapath.steer,
            uptime_secs: self.started.elapsed().as_secs(),
            cache: splicer.cache,
            luns: splicer.luns,
            served_bytes: splicer
                .served
                .iter()
                .map(|(class, s)| (class.name().to_owned(), s.bytes))
                .collect(),
            discovered: self.discovery.lock().entries().len(),
        }
    }

    /// A login to a target with a declared LUN: its portal exports a served LUN,
    /// so new connections to it are steered from now on (`steer_portals =
    /// "served"`). Sessions already running to it keep going where they go.
    pub fn learn_served_portal(&self, seen: &crate::classify::LoginSeen) {
        let dp_config = &self.config.datapath;
        if !dp_config.steer || dp_config.steer_portals != crate::config::SteerPortals::Served {
            return;
        }
        let (Some(catalog), Some(target)) = (&self.catalog, &seen.target_iqn) else {
            return;
        };
        if catalog.for_target(target).is_empty() {
            return;
        }
        let Ok(portal) = seen.portal.parse::<std::net::SocketAddr>() else {
            return;
        };
        match self.datapath.lock().serve_portal(portal) {
            Ok(true) => tracing::info!(%portal, target, "portal exports a served LUN: steering new connections to it"),
            Ok(false) => {}
            Err(e) => warn!(%portal, cause = %e, "cannot steer a served portal"),
        }
    }

    pub fn status(&self) -> Result<StatusReport, datapath::DatapathError> {
        let dp = self.datapath.lock();
        let mut flows: Vec<FlowView> = dp
            .flows()?
            .into_iter()
            .map(|f| {
                let (src, dst) = classify::endpoints(&f.key);
                FlowView {
                    interface: datapath::if_name(f.key.ifindex)
                        .unwrap_or_else(|| f.key.ifindex.to_string()),
                    src,
                    dst,
                    vlan: f.key.vlan,
                    packets: f.counters.packets,
                    payload_bytes: f.counters.payload_bytes,
                    retrans_bytes: f.counters.payload_bytes.saturating_sub(f.new_bytes),
                    frame_bytes: f.counters.frame_bytes,
                }
            })
            .collect();
        flows.sort();
        let rates = self.rates.lock().clone();
        let interfaces = dp
            .interfaces()?
            .into_iter()
            .map(|(ifindex, c)| {
                let interface =
                    datapath::if_name(ifindex).unwrap_or_else(|| ifindex.to_string());
                let (tc_ingress, tc_egress) = Datapath::tc_programs(&interface);
                InterfaceView {
                tc_ingress,
                tc_egress,
                rate: rates.get(&ifindex).copied().unwrap_or_default(),
                classifier: dp.attachments().get(&interface).map(|a| a.name().to_owned()),
                interface,
                ifindex,
                rx_packets: c.rx_packets,
                rx_bytes: c.rx_bytes,
                tx_packets: c.tx_packets,
                tx_bytes: c.tx_bytes,
                }
            })
            .collect();
        let verdicts = dp
            .verdicts()?
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect();
        let served_portals = dp
            .served_portals()?
            .into_iter()
            .map(|p| p.to_string())
            .collect();
        drop(dp);
        Ok(StatusReport {
            served_portals,
            appliance: self.config.appliance.name.clone(),
            steering: self.config.datapath.steer,
            uptime_secs: self.started.elapsed().as_secs(),
            splicer: self.splicer.snapshot(),
            verdicts,
            interfaces,
            flows,
            discovery: self.discovery.lock().entries(),
        })
    }
}
