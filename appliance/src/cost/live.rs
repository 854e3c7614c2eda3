//! Live link cost: link utilisation (from the appliances' interface counters) turned
//! into an effective link weight, and cheapest paths kept up to date incrementally.
//!
//! # Formula
//! For a link of topology weight `w` at utilisation `u` (0..1):
//!
//! ```text
//! u' = clamp(u, 0, saturation)
//! effective = w * (1 + gain * u' / (1 - u'))
//! ```
//!
//! `u / (1 - u)` is the mean queue length of an M/M/1 queue: cost grows slowly while
//! the link is lightly used and steeply near saturation. Clamping at `saturation`
//! (default 0.95) keeps the cost finite (at most `1 + gain * 19` times the base
//! weight with the defaults), so a saturated link is avoided, not cut off. A
//! zero-weight link stays free.
//!
//! # Incremental recompute
//! A sample only changes a link's weight when its utilisation moved by at least
//! `threshold` (default 0.05) since the value last applied, so jitter does not
//! invalidate anything. When a weight does change, a cached single-source result
//! is dropped only if the link is *tight* in it, before or after the change
//! (`dist[a] + w <= dist[b]` in either orientation): a link that is strictly slack
//! both before and after the change never decides anything in Dijkstra's run (its
//! relaxations are always overridden), so that result, costs and tree, is unchanged.

use std::collections::HashMap;

use super::paths::{Graph, LinkId, NodeId, ShortestPaths};

/// How utilisation turns into cost; see the module doc for the formula.
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LiveCostConfig {
    /// Multiplier on the queueing term; 0 disables live cost.
    pub gain: f64,
    /// Utilisation above which the cost stops growing (0 < saturation < 1).
    pub saturation: f64,
    /// Smallest utilisation change that updates a link's cost.
    pub threshold: f64,
}

impl Default for LiveCostConfig {
    fn default() -> Self {
        LiveCostConfig {
            gain: 1.0,
            saturation: 0.95,
            threshold: 0.05,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LiveCostError {
    #[error("live cost gain {0} must be finite and >= 0")]
    Gain(f64),
    #[error("live cost saturation {0} must be in (0, 1)")]
    Saturation(f64),
    #[error("live cost threshold {0} must be in [0, 1]")]
    Threshold(f64),
    #[error("utilisation sample for unknown link {0}")]
    UnknownLink(LinkId),
}

impl LiveCostConfig {
    pub fn validate(&self) -> Result<(), LiveCostError> {
        if !self.gain.is_finite() || self.gain < 0.0 {
            return Err(LiveCostError::Gain(self.gain));
        }
        if !(self.saturation > 0.0 && self.saturation < 1.0) {
            return Err(LiveCostError::Saturation(self.saturation));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(LiveCostError::Threshold(self.threshold));
        }
        Ok(())
    }

    /// Effective weight of a link of base weight `base` at utilisation `util`.
    pub fn effective_weight(&self, base: f64, util: f64) -> f64 {
        // NaN (a broken counter) counts as idle rather than poisoning the graph.
        let u = if util.is_nan() { 0.0 } else { util }.clamp(0.0, self.saturation);
        base * (1.0 + self.gain * u / (1.0 - u))
    }
}

/// Utilisation of a link from an interface byte counter: `bytes` moved in
/// `seconds` over a link of `capacity_mbps` (one direction), clamped to 0..1.
/// Zero when the capacity or interval is unknown or zero.
#[cfg(any(test, feature = "testing"))]
pub fn utilisation_from_counter(bytes: u64, seconds: f64, capacity_mbps: f64) -> f64 {
    if !(seconds > 0.0 && capacity_mbps > 0.0) {
        return 0.0;
    }
    (bytes as f64 * 8.0 / seconds / (capacity_mbps * 1e6)).clamp(0.0, 1.0)
}

/// Could changing `link` from `old` to `new` weight alter `paths`? False only when
/// the link is strictly slack in both orientations, before and after.
pub fn link_change_affects(
    paths: &ShortestPaths,
    graph: &Graph,
    link: LinkId,
    old: f64,
    new: f64,
) -> bool {
    let l = graph.link(link);
    let (da, db) = (paths.dist[l.a as usize], paths.dist[l.b as usize]);
    if da.is_infinite() && db.is_infinite() {
        // Both ends unreachable: no weight connects them to the source.
        return false;
    }
    [old, new].iter().any(|&w| da + w <= db || db + w <= da)
}

/// The graph with live weights, and cached single-source results kept valid.
#[derive(Debug)]
pub struct LiveCosts {
    graph: Graph,
    config: LiveCostConfig,
    /// Per link: the utilisation behind its weight in force.
    applied: Vec<f64>,
    cache: HashMap<NodeId, ShortestPaths>,
    recomputes: u64,
}

impl LiveCosts {
    /// Start from the topology weights (every link idle).
    pub fn new(graph: Graph, config: LiveCostConfig) -> Result<Self, LiveCostError> {
        config.validate()?;
        let applied = vec![0.0; graph.links().len()];
        Ok(LiveCosts {
            graph,
            config,
            applied,
            cache: HashMap::new(),
            recomputes: 0,
        })
    }

    /// The graph with the effective weights in force.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The utilisation behind each link's weight in force.
    pub fn applied_utilisation(&self) -> &[f64] {
        &self.applied
    }

    /// How many single-source results were computed so far (for tests and metrics).
    pub fn recomputes(&self) -> u64 {
        self.recomputes
    }

    /// Feed utilisation samples `(link, utilisation 0..1)`. Returns the links whose
    /// weight changed (those that moved by at least the threshold).
    #[expect(
        clippy::float_cmp,
        reason = "only a weight that did not change at all leaves the cached paths valid"
    )]
    pub fn observe(&mut self, samples: &[(LinkId, f64)]) -> Result<Vec<LinkId>, LiveCostError> {
        let mut changed = Vec::new();
        for &(link, util) in samples {
            if link as usize >= self.applied.len() {
                return Err(LiveCostError::UnknownLink(link));
            }
            let util = if util.is_nan() {
                0.0
            } else {
                util.clamp(0.0, 1.0)
            };
            if (util - self.applied[link as usize]).abs() < self.config.threshold {
                continue;
            }
            self.applied[link as usize] = util;
            let base = self.graph.link(link).base_weight;
            let new = self.config.effective_weight(base, util);
            let old = self.graph.set_weight(link, new);
            if old == new {
                continue;
            }
            let graph = &self.graph;
            self.cache
                .retain(|_, paths| !link_change_affects(paths, graph, link, old, new));
            changed.push(link);
        }
        Ok(changed)
    }

    /// Cheapest paths from `source` under the weights in force (cached).
    pub fn paths_from(&mut self, source: NodeId) -> &ShortestPaths {
        self.graph_and_paths(source).1
    }

    /// The graph in force and the cheapest paths from `source` (what
    /// [`crate::plan::construct`] takes).
    pub fn graph_and_paths(&mut self, source: NodeId) -> (&Graph, &ShortestPaths) {
        let graph = &self.graph;
        let recomputes = &mut self.recomputes;
        let paths = self.cache.entry(source).or_insert_with(|| {
            *recomputes += 1;
            graph.shortest_paths(source)
        });
        (graph, paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::paths::tests::topo;
    use proptest::prelude::*;

    #[expect(
        clippy::float_cmp,
        reason = "exact values: the expected figures are exactly representable"
    )]
    #[test]
    fn formula_shape_and_clamp() {
        let c = LiveCostConfig::default();
        assert_eq!(c.effective_weight(2.0, 0.0), 2.0);
        assert!((c.effective_weight(2.0, 0.5) - 4.0).abs() < 1e-12);
        let sat = c.effective_weight(1.0, 0.95);
        assert!((sat - 20.0).abs() < 1e-9);
        assert_eq!(c.effective_weight(1.0, 1.0), sat);
        assert_eq!(c.effective_weight(1.0, 7.0), sat);
        assert_eq!(c.effective_weight(1.0, -1.0), 1.0);
        assert_eq!(c.effective_weight(1.0, f64::NAN), 1.0);
        assert_eq!(c.effective_weight(0.0, 0.9), 0.0);
        let off = LiveCostConfig { gain: 0.0, ..c };
        assert_eq!(off.effective_weight(3.0, 0.9), 3.0);
    }

    #[expect(
        clippy::float_cmp,
        reason = "exact values: the expected figures are exactly representable"
    )]
    #[test]
    fn counters_to_utilisation() {
        // 62.5 MB in 1 s on a 1000 Mb/s link: half used.
        assert_eq!(utilisation_from_counter(62_500_000, 1.0, 1000.0), 0.5);
        assert_eq!(utilisation_from_counter(u64::MAX, 1.0, 1000.0), 1.0);
        assert_eq!(utilisation_from_counter(10, 0.0, 1000.0), 0.0);
        assert_eq!(utilisation_from_counter(10, 1.0, 0.0), 0.0);
    }

    #[expect(
        clippy::float_cmp,
        reason = "exact values: the expected figures are exactly representable"
    )]
    #[test]
    fn config_is_validated() {
        let bad = LiveCostConfig {
            saturation: 1.0,
            ..Default::default()
        };
        assert_eq!(bad.validate(), Err(LiveCostError::Saturation(1.0)));
        let bad = LiveCostConfig {
            gain: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let parsed: LiveCostConfig = toml::from_str("gain = 2.0").unwrap();
        assert_eq!(parsed.saturation, 0.95);
        assert_eq!(parsed.gain, 2.0);
    }

    fn square() -> Graph {
        // a - b - d and a - c - d, both 2 hops; e hangs off d.
        Graph::from_topology(&topo(
            &["a", "b", "c", "d", "e"],
            &[
                ("a", "b", 1.0),
                ("b", "d", 1.0),
                ("a", "c", 1.0),
                ("c", "d", 1.0),
                ("d", "e", 1.0),
            ],
        ))
    }

    #[test]
    fn small_changes_are_ignored_and_big_ones_reroute() {
        let mut live = LiveCosts::new(square(), LiveCostConfig::default()).unwrap();
        let (a, d) = (0, 3);
        let first = live.paths_from(a).clone();
        let (g, p) = live.graph_and_paths(a);
        assert_eq!((g.node_count(), p), (5, &first));
        assert_eq!(first.cost(d), Some(2.0));
        assert_eq!(first.parent[d as usize], Some((1, 1)), "via b (lower id)");
        assert_eq!(live.observe(&[(1, 0.04)]).unwrap(), Vec::<LinkId>::new());
        assert_eq!(live.paths_from(a), &first);
        assert_eq!(live.recomputes(), 1);
        // b - d at 50 %: cost 2, so a reaches d through c.
        assert_eq!(live.observe(&[(1, 0.5)]).unwrap(), vec![1]);
        let p = live.paths_from(a).clone();
        assert_eq!(live.recomputes(), 2);
        assert_eq!(p.cost(d), Some(2.0));
        assert_eq!(p.parent[d as usize], Some((2, 3)), "via c now");
        assert_eq!(p.cost(1), Some(1.0));
        assert!(matches!(
            live.observe(&[(9, 0.5)]),
            Err(LiveCostError::UnknownLink(9))
        ));
    }

    #[test]
    fn slack_link_keeps_cache() {
        let g = Graph::from_topology(&topo(
            &["a", "b", "c"],
            &[("a", "b", 1.0), ("b", "c", 1.0), ("a", "c", 5.0)],
        ));
        let mut live = LiveCosts::new(g, LiveCostConfig::default()).unwrap();
        live.paths_from(0);
        // a-c (weight 5, dist c = 2): slack before and after rising to 5 * 3.
        assert_eq!(live.observe(&[(2, 0.6)]).unwrap(), vec![2]);
        live.paths_from(0);
        assert_eq!(live.recomputes(), 1, "slack link kept the cached result");
    }

    proptest! {
        /// Whatever the samples, cached results equal a fresh Dijkstra.
        #[test]
        fn incremental_equals_fresh(
            links in proptest::collection::vec((0u32..6, 0u32..6, 0u32..4), 1..12),
            samples in proptest::collection::vec((0usize..12, 0.0f64..1.0), 1..20),
        ) {
            let names = ["a", "b", "c", "d", "e", "f"];
            let links: Vec<_> = links
                .into_iter()
                .filter(|(a, b, _)| a != b)
                .map(|(a, b, w)| (names[a as usize], names[b as usize], f64::from(w)))
                .collect();
            prop_assume!(!links.is_empty());
            let g = Graph::from_topology(&topo(&names, &links));
            let mut live = LiveCosts::new(g, LiveCostConfig { threshold: 0.1, ..Default::default() }).unwrap();
            for s in 0..6 {
                live.paths_from(s);
            }
            for (link, util) in samples {
                let link = (link % links.len()) as LinkId;
                live.observe(&[(link, util)]).unwrap();
                for s in 0..6 {
                    let fresh = live.graph().shortest_paths(s);
                    prop_assert_eq!(live.paths_from(s), &fresh);
                }
            }
        }
    }
}
