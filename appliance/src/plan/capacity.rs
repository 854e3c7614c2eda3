//! Capacity-aware construction (beyond the seed): when the cheapest source, or a
//! link on its path, would carry most of the image, spread the blocks over other
//! holders so the transfer finishes sooner.
//!
//! # Model
//! - Every fetch runs along the tree of cheapest paths to the target (the routing
//!   the plain plan assumes), and all fetches run in parallel, paced so that no
//!   link exceeds `util_cap` of its `capacity_mbps` (minus the link's background
//!   utilisation, if known; at least 1 % of capacity is assumed usable so that a
//!   busy link slows the plan down rather than making it impossible). Links without
//!   a capacity are unconstrained.
//! - The estimated finish time is `max over links of bytes / usable bytes per s`.
//! - The plan must cost at most `(1 + cost_slack)` times the plain plan.
//!
//! # Method
//! For a candidate finish time `T`, "can every block be fetched with each link
//! carrying at most `T * usable` bytes, within the cost budget?" is a min-cost
//! flow: source -> holder-set group (its block count) -> each reachable holder
//! (at the holder's path cost) -> up the path tree (link capacity `T * usable`,
//! in blocks) -> target. Feasibility is monotone in `T`, and the plain plan is
//! feasible at its own finish time, so a binary search between 0 and that finds
//! the smallest `T` (to a relative 1e-9); the flow at that `T` is the cheapest
//! plan finishing by then. Flows are integral, so every block gets one source.
//! Capacity is counted in whole blocks (a short tail block counts as full).

use serde::{Deserialize, Serialize};

use super::construct::{construct, ConstructionPlan};
use super::flow::{FlowNetwork, UNBOUNDED};
use super::image::ImageHolders;
use super::report::{CapacityReport, ConstructReport, LinkLoad};
use super::PlanError;
use crate::cost::{Graph, NodeId, ShortestPaths};

/// Usable share of capacity assumed for a link already at or above the cap.
pub const MIN_HEADROOM: f64 = 0.01;

/// Settings of capacity-aware mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityConfig {
    /// Highest utilisation the plan may put on a link (0 < cap <= 1).
    pub util_cap: f64,
    /// Allowed extra cost over the plain plan, as a fraction (0.25 = 25 %).
    pub cost_slack: f64,
    /// Per link (by id): utilisation already there, 0..1; empty when unknown.
    #[serde(skip)]
    pub background: Vec<f64>,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig {
            util_cap: 0.8,
            cost_slack: 0.25,
            background: Vec::new(),
        }
    }
}

impl CapacityConfig {
    pub fn validate(&self) -> Result<(), PlanError> {
        if !(self.util_cap > 0.0 && self.util_cap <= 1.0) {
            return Err(PlanError::Capacity(format!(
                "utilisation cap {} must be in (0, 1]",
                self.util_cap
            )));
        }
        if !self.cost_slack.is_finite() || self.cost_slack < 0.0 {
            return Err(PlanError::Capacity(format!(
                "cost slack {} must be finite and >= 0",
                self.cost_slack
            )));
        }
        Ok(())
    }

    /// Usable bytes per second of each link under the cap (`None`: unconstrained).
    pub fn usable_bytes_per_s(&self, graph: &Graph) -> Vec<Option<f64>> {
        graph
            .links()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.capacity_mbps.map(|mbps| {
                    let busy = self.background.get(i).copied().unwrap_or(0.0);
                    let busy = if busy.is_nan() {
                        0.0
                    } else {
                        busy.clamp(0.0, 1.0)
                    };
                    let headroom = (self.util_cap - busy).max(MIN_HEADROOM * self.util_cap);
                    mbps * 1e6 / 8.0 * headroom
                })
            })
            .collect()
    }
}

/// Estimated finish time: the most loaded link relative to its usable rate.
pub fn finish_time_s(link_bytes: &[u64], usable: &[Option<f64>]) -> f64 {
    link_bytes
        .iter()
        .zip(usable)
        .filter_map(|(&b, u)| u.map(|u| b as f64 / u))
        .fold(0.0, f64::max)
}

/// A capacity-aware plan next to the plain one.
#[derive(Clone, Debug, PartialEq)]
pub struct CapacityPlan {
    pub plan: ConstructionPlan,
    pub plain: ConstructionPlan,
    pub finish_time_s: f64,
    pub plain_finish_time_s: f64,
    /// Bytes per link (by id) towards the target.
    pub link_bytes: Vec<u64>,
    pub plain_link_bytes: Vec<u64>,
    pub usable_bytes_per_s: Vec<Option<f64>>,
}

/// Capacity-aware construction of `image` on `paths.source`.
pub fn construct_capacity_aware(
    image: &ImageHolders,
    graph: &Graph,
    paths: &ShortestPaths,
    config: &CapacityConfig,
) -> Result<CapacityPlan, PlanError> {
    config.validate()?;
    let plain = construct(image, graph, paths)?;
    let usable = config.usable_bytes_per_s(graph);
    let links = graph.links().len();
    let plain_link_bytes = plain.link_bytes(paths, links);
    let plain_finish = finish_time_s(&plain_link_bytes, &usable);
    let block_bytes = f64::from(image.blocks.block_size);
    let problem = FlowProblem::new(image, graph, paths, &usable, block_bytes);
    let plain_blocks_finish = problem.finish_in_blocks(&plain);
    let budget = plain.total_cost * (1.0 + config.cost_slack) * (1.0 + 1e-12) + 1e-12;

    let mut best = None;
    if plain_blocks_finish > 0.0 {
        let (mut lo, mut hi) = (0.0f64, plain_blocks_finish);
        for _ in 0..200 {
            if hi - lo <= 1e-9 * hi {
                break;
            }
            let mid = 0.5 * (lo + hi);
            match problem.solve(mid, budget) {
                Some(sources) => {
                    hi = mid;
                    best = Some(sources);
                }
                None => lo = mid,
            }
        }
    }
    let searched = match best {
        Some(sources) => ConstructionPlan::from_sources(image, paths, sources),
        // Nothing constrained on the way, or the plain plan is already the fastest.
        None => plain.clone(),
    };
    let link_bytes = searched.link_bytes(paths, links);
    let finish = finish_time_s(&link_bytes, &usable);
    // Float noise could make the search's plan a hair slower: never return worse.
    let (chosen, link_bytes, finish) = if finish > plain_finish {
        (plain.clone(), plain_link_bytes.clone(), plain_finish)
    } else {
        (searched, link_bytes, finish)
    };
    Ok(CapacityPlan {
        plan: chosen,
        plain,
        finish_time_s: finish,
        plain_finish_time_s: plain_finish,
        link_bytes,
        plain_link_bytes,
        usable_bytes_per_s: usable,
    })
}

/// The fixed parts of the flow network: fetched groups and the path tree.
struct FlowProblem<'a> {
    image: &'a ImageHolders,
    paths: &'a ShortestPaths,
    usable: &'a [Option<f64>],
    block_bytes: f64,
    node_count: usize,
    /// Groups the target does not hold, with their reachable holders.
    fetched: Vec<(u32, Vec<NodeId>)>,
}

impl<'a> FlowProblem<'a> {
    fn new(
        image: &'a ImageHolders,
        graph: &Graph,
        paths: &'a ShortestPaths,
        usable: &'a [Option<f64>],
        block_bytes: f64,
    ) -> Self {
        let target = paths.source;
        let fetched = image
            .groups()
            .enumerate()
            .filter(|(_, g)| g.holders.binary_search(&target).is_err())
            .map(|(i, g)| {
                let reachable = g
                    .holders
                    .iter()
                    .copied()
                    .filter(|&h| paths.dist[h as usize].is_finite())
                    .collect();
                (i as u32, reachable)
            })
            .collect();
        FlowProblem {
            image,
            paths,
            usable,
            block_bytes,
            node_count: graph.node_count(),
            fetched,
        }
    }

    /// A plan's finish time with every block counted as a full block.
    fn finish_in_blocks(&self, plan: &ConstructionPlan) -> f64 {
        let mut blocks = vec![0u64; self.usable.len()];
        for (&src, s) in &plan.by_source {
            for link in self.paths.path_links(src) {
                blocks[link as usize] += s.blocks;
            }
        }
        #[expect(
            clippy::cast_sign_loss,
            reason = "block counts and sizes are non-negative"
        )]
        let bytes: Vec<u64> = blocks
            .iter()
            .map(|&b| (b as f64 * self.block_bytes) as u64)
            .collect();
        finish_time_s(&bytes, self.usable)
    }

    /// Sources per distinct block for the cheapest plan with every link carrying at
    /// most `t * usable` bytes, if one exists within `budget`.
    fn solve(&self, t: f64, budget: f64) -> Option<Vec<NodeId>> {
        let graph_nodes = self.node_count;
        let source = graph_nodes;
        let mut net = FlowNetwork::new(graph_nodes + 1 + self.fetched.len());
        for v in 0..graph_nodes {
            if let Some((parent, link)) = self.paths.parent[v] {
                let cap = match self.usable[link as usize] {
                    None => UNBOUNDED,
                    Some(u) => ((t * u / self.block_bytes) + 1e-9)
                        .floor()
                        .min(UNBOUNDED as f64) as i64,
                };
                net.add_edge(v, parent as usize, cap, 0.0);
            }
        }
        let mut total = 0i64;
        let mut holder_edges: Vec<Vec<(NodeId, usize)>> = Vec::with_capacity(self.fetched.len());
        for (k, (g, holders)) in self.fetched.iter().enumerate() {
            #[expect(
                clippy::cast_possible_wrap,
                reason = "a group has at most max_image_blocks (< 2^31) blocks"
            )]
            let n = self.image.group(*g).blocks.len() as i64;
            let node = graph_nodes + 1 + k;
            total += n;
            net.add_edge(source, node, n, 0.0);
            holder_edges.push(
                holders
                    .iter()
                    .map(|&h| {
                        (
                            h,
                            net.add_edge(node, h as usize, n, self.paths.dist[h as usize]),
                        )
                    })
                    .collect(),
            );
        }
        let result = net.min_cost_flow(source, self.paths.source as usize, total);
        if result.flow < total || result.cost > budget {
            return None;
        }
        let mut sources = vec![self.paths.source; self.image.blocks.distinct.len()];
        for ((g, _), edges) in self.fetched.iter().zip(&holder_edges) {
            let mut blocks = self.image.group(*g).blocks.iter();
            for &(h, e) in edges {
                // A flow is never negative.
                let flow = usize::try_from(net.flow(e)).unwrap_or(0);
                for &b in blocks.by_ref().take(flow) {
                    sources[b as usize] = h;
                }
            }
        }
        Some(sources)
    }
}

impl CapacityPlan {
    /// Utilisation of each link while the plan runs (`None`: no capacity).
    pub fn utilisation(&self, graph: &Graph, config: &CapacityConfig) -> Vec<Option<f64>> {
        graph
            .links()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mbps = l.capacity_mbps?;
                let busy = config.background.get(i).copied().unwrap_or(0.0);
                let rate = if self.finish_time_s > 0.0 {
                    self.link_bytes[i] as f64 / self.finish_time_s
                } else {
                    0.0
                };
                Some(busy + rate / (mbps * 1e6 / 8.0))
            })
            .collect()
    }

    /// The construct JSON report with its `capacity` section.
    pub fn report(
        &self,
        image: &ImageHolders,
        graph: &Graph,
        config: &CapacityConfig,
    ) -> ConstructReport {
        let mut report = self.plan.report(image, graph);
        let util = self.utilisation(graph, config);
        report.capacity = Some(CapacityReport {
            util_cap: config.util_cap,
            cost_slack: config.cost_slack,
            plain_total_cost: self.plain.total_cost,
            finish_time_s: self.finish_time_s,
            plain_finish_time_s: self.plain_finish_time_s,
            links: graph
                .links()
                .iter()
                .enumerate()
                .filter(|(i, _)| self.link_bytes[*i] > 0 || self.plain_link_bytes[*i] > 0)
                .map(|(i, l)| LinkLoad {
                    a: graph.name(l.a).to_owned(),
                    b: graph.name(l.b).to_owned(),
                    capacity_mbps: l.capacity_mbps,
                    bytes: self.link_bytes[i],
                    plain_bytes: self.plain_link_bytes[i],
                    utilisation: util[i],
                })
                .collect(),
        });
        report
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::cost::Topology;

    /// Target t behind switch sw (unconstrained). lib: cheapest (weight 1) but on a
    /// 100 Mbps link; a and b: weight 2, 300 Mbps each.
    fn lab() -> Graph {
        let t = Topology::parse(
            r#"
[[node]]
name = "t"
role = "hypervisor"
[[node]]
name = "sw"
role = "switch"
[[node]]
name = "lib"
role = "library"
[[node]]
name = "a"
role = "hypervisor"
[[node]]
name = "b"
role = "hypervisor"
[[link]]
a = "t"
b = "sw"
[[link]]
a = "lib"
b = "sw"
capacity_mbps = 100
[[link]]
a = "a"
b = "sw"
weight = 2.0
capacity_mbps = 300
[[link]]
a = "b"
b = "sw"
weight = 2.0
capacity_mbps = 300
"#,
        )
        .unwrap();
        Graph::from_topology(&t)
    }

    /// Brute force over every assignment of `n` blocks to {lib, a, b}: the lowest
    /// finish time within the budget, and the lowest cost at that time.
    fn brute(n: u32, usable: [f64; 3], cost: [f64; 3], budget: f64, bs: f64) -> (f64, f64) {
        let mut best = (f64::INFINITY, f64::INFINITY);
        for code in 0..3u32.pow(n) {
            let mut counts = [0u32; 3];
            let mut c = code;
            for _ in 0..n {
                counts[(c % 3) as usize] += 1;
                c /= 3;
            }
            let total: f64 = (0..3).map(|i| f64::from(counts[i]) * cost[i]).sum();
            if total > budget + 1e-9 {
                continue;
            }
            let t = (0..3)
                .map(|i| f64::from(counts[i]) * bs / usable[i])
                .fold(0.0, f64::max);
            if t < best.0 - 1e-12 || ((t - best.0).abs() <= 1e-12 && total < best.1) {
                best = (t, total);
            }
        }
        best
    }

    #[expect(
        clippy::float_cmp,
        reason = "costs are sums of integer link weights, exact in f64"
    )]
    #[test]
    fn spreads_load_off_a_saturated_cheap_link() {
        let g = lab();
        let blocks: Vec<u8> = (1..=8).collect();
        let m = manifest("img", &blocks, None);
        let idx = index(&[("lib", &blocks), ("a", &blocks), ("b", &blocks)]);
        let image = ImageHolders::resolve(&m, &idx, &g).unwrap();
        let t = g.node_id("t").unwrap();
        let paths = g.shortest_paths(t);
        let config = CapacityConfig {
            cost_slack: 0.5,
            ..Default::default()
        };
        let cp = construct_capacity_aware(&image, &g, &paths, &config).unwrap();
        let lib_link = 1usize;
        let total_bytes: u64 = 8 * 4096;
        // The plain plan: everything from lib, over the 100 Mbps link.
        assert!(cp.plain_link_bytes[lib_link] as f64 > 0.9 * total_bytes as f64);
        assert_eq!(cp.plain.total_cost, 16.0);
        // Capacity-aware: every link under the cap while the plan runs.
        for (i, u) in cp.utilisation(&g, &config).iter().enumerate() {
            if let Some(u) = u {
                assert!(*u <= config.util_cap + 1e-9, "link {i} at {u}");
            }
        }
        assert!(cp.plan.total_cost <= cp.plain.total_cost * 1.5);
        assert!(cp.finish_time_s < cp.plain_finish_time_s);
        // And the lowest finish time possible within the budget, at least cost.
        let usable = config.usable_bytes_per_s(&g);
        let u = [usable[1].unwrap(), usable[2].unwrap(), usable[3].unwrap()];
        let (best_t, best_cost) = brute(8, u, [2.0, 3.0, 3.0], 24.0, 4096.0);
        assert!(
            (cp.finish_time_s - best_t).abs() <= 1e-9 * best_t,
            "{} vs {best_t}",
            cp.finish_time_s
        );
        assert_eq!(cp.plan.total_cost, best_cost);
        // By hand: lib 10 MB/s, a and b 30 MB/s usable. 1 block on lib and 4 + 3 on
        // a and b finish at 4 * 4096 / 30e6 s (as does 0 + 4 + 4, which costs more;
        // 2 on lib take 2 * 4096 / 10e6 s, longer).
        let counts: Vec<u64> = cp.plan.by_source.values().map(|s| s.blocks).collect();
        assert_eq!(counts[2], 1, "lib");
        assert_eq!(counts[0].max(counts[1]), 4);
        assert!((cp.finish_time_s - 4.0 * 4096.0 / 30e6).abs() < 1e-15);
        let report = cp.report(&image, &g, &config);
        let cap = report.capacity.unwrap();
        assert_eq!(cap.plain_total_cost, 16.0);
        assert_eq!(report.total_cost, 2.0 + 7.0 * 3.0);
        assert!(cap
            .links
            .iter()
            .any(|l| l.a == "lib" && l.plain_bytes == total_bytes));
    }

    #[test]
    fn zero_slack_keeps_the_plain_cost() {
        let g = lab();
        let blocks: Vec<u8> = (1..=6).collect();
        let idx = index(&[("lib", &blocks), ("a", &blocks)]);
        let image = ImageHolders::resolve(&manifest("img", &blocks, None), &idx, &g).unwrap();
        let paths = g.shortest_paths(g.node_id("t").unwrap());
        let config = CapacityConfig {
            cost_slack: 0.0,
            ..Default::default()
        };
        let cp = construct_capacity_aware(&image, &g, &paths, &config).unwrap();
        assert_eq!(cp.plan, cp.plain);
    }

    #[expect(
        clippy::float_cmp,
        reason = "costs are sums of integer link weights, exact in f64"
    )]
    #[test]
    fn unconstrained_links_keep_the_plain_plan() {
        let t =
            crate::cost::paths::tests::topo(&["t", "x", "y"], &[("t", "x", 1.0), ("t", "y", 2.0)]);
        let g = Graph::from_topology(&t);
        let idx = index(&[("x", &[1, 2]), ("y", &[1, 2])]);
        let image = ImageHolders::resolve(&manifest("img", &[1, 2], None), &idx, &g).unwrap();
        let paths = g.shortest_paths(g.node_id("t").unwrap());
        let cp = construct_capacity_aware(&image, &g, &paths, &CapacityConfig::default()).unwrap();
        assert_eq!(cp.plan, cp.plain);
        assert_eq!(cp.finish_time_s, 0.0);
    }

    #[test]
    fn background_load_and_bad_settings() {
        let g = lab();
        let mut config = CapacityConfig {
            background: vec![0.0, 0.9, 0.2],
            ..Default::default()
        };
        let u = config.usable_bytes_per_s(&g);
        assert_eq!(u[0], None);
        assert!(
            (u[1].unwrap() - 12.5e6 * 0.008).abs() < 1e-6,
            "floor at 1 % of the cap"
        );
        assert!((u[2].unwrap() - 37.5e6 * 0.6).abs() < 1e-6);
        config.util_cap = 0.0;
        assert!(config.validate().is_err());
        config.util_cap = 0.5;
        config.cost_slack = -1.0;
        assert!(config.validate().is_err());
    }
}
