//! The network as the console's Network page shows it: every topology link
//! with its capacity, budget, measured utilisation and nearblock's own rate on
//! it, and every appliance's cache and LUNs.
//!
//! nearblock's rate on a link is measured, not planned: the running builds'
//! agents report bytes by source, the runner turns them into bytes by link
//! ([`super::Progress::by_link`]), and [`LinkRates`] differentiates those
//! counters between samples. The appliances' caches and LUNs come from their
//! own `GET /api/v1/appliance` ([`ApplianceView`]), polled by [`watch`] with
//! the token the cost feed presents to them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Weak,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{Job, Manager, PlanningView};
use crate::cost::{feed::LinksClient, Topology};

/// One appliance's own account (its `GET /api/v1/appliance`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApplianceView {
    pub name: String,
    /// Steers iSCSI sessions into its splicer (else it only classifies).
    pub steering: bool,
    pub uptime_secs: u64,
    /// Its block cache, if it has one.
    #[schema(value_type = Option<Object>)]
    pub cache: Option<crate::fetch::CacheSnapshot>,
    /// Every declared LUN: served or not and why.
    #[schema(value_type = Vec<Object>)]
    pub luns: Vec<crate::splice::catalog::LunStatus>,
    /// Bytes its splicer served, by source class.
    pub served_bytes: BTreeMap<String, u64>,
    /// (initiator, target) associations it learned from logins.
    pub discovered: usize,
}

/// A node of the topology.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    pub name: String,
    /// `library`, `switch`, `appliance` or `hypervisor`.
    pub role: String,
    /// A hypervisor's rack (the appliance or switch it hangs off).
    pub rack: Option<String>,
}

/// A link of the topology, now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LinkView {
    /// `A-B`, the name builds' `by_link` uses.
    pub name: String,
    pub a: String,
    pub b: String,
    pub capacity_mbps: Option<f64>,
    /// nearblock's own budget on it.
    pub budget_mbps: Option<f64>,
    /// All traffic over capacity (0..1), as the appliances measure it; `None`
    /// when no appliance measures the link.
    pub utilisation: Option<f64>,
    /// nearblock's builds on it, Mbit/s, over the last sample.
    pub nearblock_mbps: f64,
}

/// One appliance as the manager last polled it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApplianceEntry {
    /// Its API address (`[cost] peers`), or `local` for the manager's own.
    pub api: String,
    pub view: Option<ApplianceView>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// The Network page's data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkView {
    pub nodes: Vec<NodeView>,
    pub links: Vec<LinkView>,
    pub appliances: Vec<ApplianceEntry>,
    /// The discovery table of the manager's appliance.
    pub discovery: Vec<crate::classify::Discovery>,
}

/// Per (job, round): its build's bytes by link.
type Counters = HashMap<(u64, usize), BTreeMap<String, u64>>;

/// nearblock's per-link rates from the jobs' cumulative `by_link` counters.
/// A build's counters restart with each migration round, so they are keyed by
/// (job, round).
#[derive(Debug, Default)]
pub struct LinkRates {
    last: Counters,
    at: Option<Instant>,
}

impl LinkRates {
    /// Mbit/s per link since the previous sample (empty at the first).
    pub fn sample(&mut self, jobs: &[Job], now: Instant) -> BTreeMap<String, f64> {
        let (bytes, next) = link_deltas(&self.last, jobs);
        let elapsed = self.at.map(|t| now.duration_since(t).as_secs_f64());
        self.last = next;
        self.at = Some(now);
        match elapsed {
            Some(secs) if secs > 0.0 => bytes
                .into_iter()
                .map(|(l, b)| (l, b as f64 * 8.0 / secs / 1e6))
                .collect(),
            _ => BTreeMap::new(),
        }
    }
}

/// Bytes per link moved since `last`, and the counters to compare with next.
/// A (job, round) not in `last` started since: all its bytes are new.
fn link_deltas(last: &Counters, jobs: &[Job]) -> (BTreeMap<String, u64>, Counters) {
    let mut moved = BTreeMap::new();
    let mut next = HashMap::new();
    for j in jobs {
        let round = j.migration.as_ref().map_or(0, |m| m.rounds.len());
        let key = (j.id, round);
        let before = last.get(&key);
        for (link, &now) in &j.progress.by_link {
            let was = before.and_then(|b| b.get(link)).copied().unwrap_or(0);
            let delta = now.saturating_sub(was);
            if delta > 0 {
                *moved.entry(link.clone()).or_default() += delta;
            }
        }
        next.insert(key, j.progress.by_link.clone());
    }
    (moved, next)
}

/// The view from the topology and what was measured; `rates` by link name.
pub fn network_view(
    topology: &Topology,
    utilisation: &[f64],
    rates: &BTreeMap<String, f64>,
    appliances: Vec<ApplianceEntry>,
) -> NetworkView {
    let nodes = topology
        .nodes
        .iter()
        .map(|n| NodeView {
            name: n.name.clone(),
            role: format!("{:?}", n.role).to_lowercase(),
            rack: (n.role == crate::cost::topology::Role::Hypervisor)
                .then(|| super::inventory::rack_of(topology, &n.name))
                .flatten(),
        })
        .collect();
    let links = topology
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let name = format!("{}-{}", l.a, l.b);
            LinkView {
                nearblock_mbps: rates.get(&name).copied().unwrap_or(0.0),
                name,
                a: l.a.clone(),
                b: l.b.clone(),
                capacity_mbps: l.capacity_mbps,
                budget_mbps: l.budget_mbps,
                utilisation: utilisation.get(i).copied(),
            }
        })
        .collect();
    NetworkView {
        nodes,
        links,
        appliances,
        discovery: Vec::new(),
    }
}

/// How often the rates are sampled; the appliances are polled every other
/// sample.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Keeps the manager's [`NetworkView`] current while it lives: nearblock's
/// link rates each second, the appliances at `peers` every two.
pub async fn watch(
    manager: Weak<Manager>,
    view: std::sync::Arc<dyn PlanningView>,
    client: Option<LinksClient>,
    peers: Vec<String>,
) {
    let mut rates = LinkRates::default();
    let mut appliances: Vec<ApplianceEntry> = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    for n in 0u64.. {
        tick.tick().await;
        let Some(m) = manager.upgrade() else { return };
        let now_rates = rates.sample(&m.jobs(), Instant::now());
        if n % 2 == 0 {
            if let Some(client) = &client {
                let (client, peers) = (client.clone(), peers.clone());
                match tokio::task::spawn_blocking(move || poll_appliances(&client, &peers)).await {
                    Ok(polled) => appliances = polled,
                    Err(e) => tracing::warn!(cause = %e, "appliance poll task"),
                }
            }
        }
        if let Some(topology) = view.topology() {
            let v = network_view(&topology, &view.link_utilisation(), &now_rates, appliances.clone());
            *m.network.lock() = Some(v);
        }
    }
}

/// Each peer's `GET /api/v1/appliance`.
fn poll_appliances(client: &LinksClient, peers: &[String]) -> Vec<ApplianceEntry> {
    peers
        .iter()
        .map(|p| match client.get_json::<ApplianceView>(p, "/api/v1/appliance") {
            Ok(v) => ApplianceEntry {
                api: p.clone(),
                view: Some(v),
                error: None,
            },
            Err(e) => ApplianceEntry {
                api: p.clone(),
                view: None,
                error: Some(e.to_string()),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manage::jobs::{MigrationView, RoundView};

    fn job(id: u64, by_link: &[(&str, u64)]) -> Job {
        let mut j = Job::new(
            id,
            crate::manage::PlaceSpec {
                image: "img".into(),
                name: "vm".into(),
                policy: "best".into(),
                mode: crate::manage::BuildMode::Agent,
                target: None,
                within: Vec::new(),
                weighting: None,
            },
        );
        j.progress.by_link = by_link.iter().map(|&(l, b)| (l.to_owned(), b)).collect();
        j
    }

    #[test]
    fn link_rates_are_the_counters_growth_per_second() {
        let t0 = Instant::now();
        let mut rates = LinkRates::default();
        assert!(rates.sample(&[job(1, &[("a-b", 1000)])], t0).is_empty(), "no rate at the first sample");
        // 1 s later: job 1 moved 125,000 B more on a-b (1 Mbit/s), job 2 is
        // new with 250,000 B (all of it since the last sample).
        let r = rates.sample(
            &[job(1, &[("a-b", 126_000)]), job(2, &[("a-b", 250_000), ("b-c", 125_000)])],
            t0 + Duration::from_secs(1),
        );
        assert!((r["a-b"] - 3.0).abs() < 1e-9, "{r:?}");
        assert!((r["b-c"] - 1.0).abs() < 1e-9, "{r:?}");
        // A migration's next round restarts its counters: its bytes are new.
        let mut m = job(1, &[("a-b", 62_500)]);
        m.migration = Some(MigrationView {
            rounds: vec![RoundView::default()],
            ..MigrationView::default()
        });
        let r = rates.sample(
            &[m, job(2, &[("a-b", 250_000), ("b-c", 125_000)])],
            t0 + Duration::from_secs(3),
        );
        assert!((r["a-b"] - 0.25).abs() < 1e-9, "{r:?}");
        assert!(!r.contains_key("b-c"), "nothing moved on b-c: {r:?}");
    }

    #[test]
    fn the_view_names_links_as_builds_do_and_racks_hypervisors() {
        let topology = crate::cost::Topology::parse(
            "[[node]]\nname = \"lib\"\nrole = \"library\"\n[[node]]\nname = \"r1\"\nrole = \"appliance\"\n[[node]]\nname = \"h1\"\nrole = \"hypervisor\"\n[[link]]\na = \"lib\"\nb = \"r1\"\ncapacity_mbps = 1000\nbudget_mbps = 100\n[[link]]\na = \"r1\"\nb = \"h1\"\n",
        )
        .unwrap();
        let rates = BTreeMap::from([("lib-r1".to_owned(), 42.0)]);
        let v = network_view(&topology, &[0.5], &rates, Vec::new());
        assert_eq!(v.links[0].name, "lib-r1");
        assert_eq!(v.links[0].budget_mbps, Some(100.0));
        assert_eq!(v.links[0].utilisation, Some(0.5));
        assert!((v.links[0].nearblock_mbps - 42.0).abs() < f64::EPSILON);
        assert_eq!(v.links[1].utilisation, None, "not measured");
        let rack = |n: &str| v.nodes.iter().find(|x| x.name == n).unwrap().rack.clone();
        assert_eq!(rack("h1").as_deref(), Some("r1"));
        assert_eq!(rack("r1"), None);
        assert_eq!(v.nodes[0].role, "library");
    }
}
