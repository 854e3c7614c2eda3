//! Min-cost flow, written here rather than taken from a crate (see
//! `docs/planner.md`, "Decisions"): integer capacities (blocks), f64 costs (path
//! costs), primal-dual: Dijkstra with potentials finds the current cheapest s-t
//! distance, then a Dinic blocking flow pushes as much as possible along every
//! path of that distance at once. The number of phases is bounded by the number of
//! distinct s-t path costs, which is small for the planner's networks (one phase
//! per distinct holder cost), instead of one Dijkstra per augmenting path.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// Capacity standing for "unconstrained".
pub const UNBOUNDED: i64 = i64::MAX / 4;

/// A flow network; edges come in pairs (`e`, `e ^ 1`) of forward and residual.
#[derive(Clone, Debug, Default)]
pub struct FlowNetwork {
    adjacency: Vec<Vec<u32>>,
    to: Vec<u32>,
    cap: Vec<i64>,
    cost: Vec<f64>,
}

/// The outcome of [`FlowNetwork::min_cost_flow`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlowResult {
    pub flow: i64,
    pub cost: f64,
}

#[derive(Clone, Copy, PartialEq)]
struct Key(f64);
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl FlowNetwork {
    pub fn new(nodes: usize) -> Self {
        FlowNetwork {
            adjacency: vec![Vec::new(); nodes],
            ..Default::default()
        }
    }

    pub fn node_count(&self) -> usize {
        self.adjacency.len()
    }

    /// Add an edge `u -> v` of capacity `cap` (>= 0) and unit cost `cost` (>= 0);
    /// returns its id.
    pub fn add_edge(&mut self, u: usize, v: usize, cap: i64, cost: f64) -> usize {
        debug_assert!(cap >= 0 && cost >= 0.0 && cost.is_finite());
        let e = self.to.len();
        self.to.extend([v as u32, u as u32]);
        self.cap.extend([cap, 0]);
        self.cost.extend([cost, -cost]);
        self.adjacency[u].push(e as u32);
        self.adjacency[v].push(e as u32 + 1);
        e
    }

    /// Flow on edge `e` (as returned by [`Self::add_edge`]).
    pub fn flow(&self, e: usize) -> i64 {
        self.cap[e ^ 1]
    }

    /// Send up to `limit` units from `s` to `t` at minimum total cost.
    #[expect(
        clippy::many_single_char_names,
        reason = "the textbook's names: s source, t sink, u and v nodes, e edge, f flow"
    )]
    pub fn min_cost_flow(&mut self, s: usize, t: usize, limit: i64) -> FlowResult {
        let n = self.node_count();
        let max_cost = self.cost.iter().fold(0.0f64, |m, c| m.max(c.abs()));
        // Reduced costs of cheapest-path edges are 0 up to rounding.
        let eps = 1e-9 * (1.0 + max_cost);
        let mut potential = vec![0.0f64; n];
        let mut flow = 0i64;
        let mut dist = vec![f64::INFINITY; n];
        let mut level = vec![u32::MAX; n];
        let mut next_edge = vec![0usize; n];
        while flow < limit {
            // Dijkstra on reduced costs.
            dist.fill(f64::INFINITY);
            dist[s] = 0.0;
            let mut heap = BinaryHeap::new();
            heap.push(Reverse((Key(0.0), s)));
            while let Some(Reverse((Key(d), u))) = heap.pop() {
                if d > dist[u] {
                    continue;
                }
                for &e in &self.adjacency[u] {
                    let e = e as usize;
                    if self.cap[e] <= 0 {
                        continue;
                    }
                    let v = self.to[e] as usize;
                    let rc = (self.cost[e] + potential[u] - potential[v]).max(0.0);
                    if d + rc < dist[v] {
                        dist[v] = d + rc;
                        heap.push(Reverse((Key(dist[v]), v)));
                    }
                }
            }
            if dist[t].is_infinite() {
                break;
            }
            let reach = dist[t];
            for (p, &d) in potential.iter_mut().zip(&dist) {
                *p += d.min(reach);
            }
            // Dinic on the admissible edges (reduced cost 0).
            loop {
                if !self.bfs_levels(s, t, &potential, eps, &mut level) {
                    break;
                }
                next_edge.fill(0);
                let pushed = self.blocking_flow(
                    s,
                    t,
                    limit - flow,
                    &potential,
                    eps,
                    &mut level,
                    &mut next_edge,
                );
                if pushed == 0 {
                    break;
                }
                flow += pushed;
                if flow >= limit {
                    break;
                }
            }
        }
        let cost = (0..self.to.len())
            .step_by(2)
            .map(|e| self.flow(e) as f64 * self.cost[e])
            .sum();
        FlowResult { flow, cost }
    }

    fn admissible(&self, e: usize, potential: &[f64], eps: f64) -> bool {
        let u = self.to[e ^ 1] as usize;
        let v = self.to[e] as usize;
        self.cap[e] > 0 && self.cost[e] + potential[u] - potential[v] <= eps
    }

    fn bfs_levels(
        &self,
        s: usize,
        t: usize,
        potential: &[f64],
        eps: f64,
        level: &mut [u32],
    ) -> bool {
        level.fill(u32::MAX);
        level[s] = 0;
        let mut queue = VecDeque::from([s]);
        while let Some(u) = queue.pop_front() {
            for &e in &self.adjacency[u] {
                let e = e as usize;
                let v = self.to[e] as usize;
                if level[v] == u32::MAX && self.admissible(e, potential, eps) {
                    level[v] = level[u] + 1;
                    queue.push_back(v);
                }
            }
        }
        level[t] != u32::MAX
    }

    /// Iterative blocking flow (no recursion: residual paths can be long).
    #[expect(
        clippy::many_single_char_names,
        reason = "the textbook's names: s source, t sink, u and v nodes, e edge, f flow"
    )]
    #[expect(
        clippy::too_many_arguments,
        reason = "one phase's inputs and its two scratch arrays, reused across phases"
    )]
    fn blocking_flow(
        &mut self,
        s: usize,
        t: usize,
        limit: i64,
        potential: &[f64],
        eps: f64,
        level: &mut [u32],
        next_edge: &mut [usize],
    ) -> i64 {
        let mut total = 0i64;
        let mut path: Vec<usize> = Vec::new();
        let mut u = s;
        while total < limit {
            if u == t {
                let bottleneck = path
                    .iter()
                    .map(|&e| self.cap[e])
                    .min()
                    .unwrap_or(0)
                    .min(limit - total);
                let mut retreat_to = None;
                for (i, &e) in path.iter().enumerate() {
                    self.cap[e] -= bottleneck;
                    self.cap[e ^ 1] += bottleneck;
                    if self.cap[e] == 0 && retreat_to.is_none() {
                        retreat_to = Some(i);
                    }
                }
                total += bottleneck;
                // Resume from the tail of the first saturated edge.
                let i = retreat_to.unwrap_or(0);
                path.truncate(i);
                u = path.last().map_or(s, |&e| self.to[e] as usize);
                continue;
            }
            let mut advanced = false;
            while next_edge[u] < self.adjacency[u].len() {
                let e = self.adjacency[u][next_edge[u]] as usize;
                let v = self.to[e] as usize;
                if level[v] == level[u].wrapping_add(1) && self.admissible(e, potential, eps) {
                    path.push(e);
                    u = v;
                    advanced = true;
                    break;
                }
                next_edge[u] += 1;
            }
            if !advanced {
                if u == s {
                    break;
                }
                // Dead end: never visit `u` again in this phase.
                level[u] = u32::MAX;
                let e = path
                    .pop()
                    .expect("not at the source, so the path is not empty");
                u = self.to[e ^ 1] as usize;
                next_edge[u] += 1;
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefers_cheap_paths_until_full() {
        // s -> a (cap 2, cost 1) -> t ; s -> b (cap 5, cost 3) -> t.
        let mut n = FlowNetwork::new(4);
        let sa = n.add_edge(0, 1, 2, 1.0);
        let sb = n.add_edge(0, 2, 5, 3.0);
        n.add_edge(1, 3, UNBOUNDED, 0.0);
        n.add_edge(2, 3, UNBOUNDED, 0.0);
        let r = n.min_cost_flow(0, 3, 4);
        assert_eq!(
            r,
            FlowResult {
                flow: 4,
                cost: 2.0 + 6.0
            }
        );
        assert_eq!((n.flow(sa), n.flow(sb)), (2, 2));
    }

    #[expect(
        clippy::many_single_char_names,
        reason = "the textbook's names: s source, t sink, u and v nodes, e edge, f flow"
    )]
    #[test]
    fn reroutes_through_residual_edges() {
        // s-a-b-t is the cheapest path (cost 1) but takes b-t from s-b: the second
        // unit must undo a-b, giving s-a-t (5) + s-b-t (1).
        let mut n = FlowNetwork::new(4);
        let (s, a, b, t) = (0, 1, 2, 3);
        n.add_edge(s, a, 1, 0.0);
        n.add_edge(s, b, 1, 0.0);
        n.add_edge(a, b, 1, 0.0);
        n.add_edge(a, t, 1, 5.0);
        n.add_edge(b, t, 1, 1.0);
        let r = n.min_cost_flow(s, t, 2);
        assert_eq!(r, FlowResult { flow: 2, cost: 6.0 });
    }

    #[test]
    fn stops_at_max_flow() {
        let mut n = FlowNetwork::new(3);
        n.add_edge(0, 1, 3, 1.0);
        n.add_edge(1, 2, 2, 1.0);
        assert_eq!(n.min_cost_flow(0, 2, 10), FlowResult { flow: 2, cost: 4.0 });
    }

    /// Brute force min-cost flow on tiny graphs: unit capacities, enumerate every
    /// subset of edges as a flow and keep valid ones.
    fn brute(nodes: usize, edges: &[(usize, usize, u32)], k: i64) -> Option<(i64, f64)> {
        let m = edges.len();
        let mut best: Option<(i64, f64)> = None;
        for mask in 0u32..(1 << m) {
            let mut bal = vec![0i64; nodes];
            let mut cost = 0.0;
            for (i, &(u, v, c)) in edges.iter().enumerate() {
                if mask >> i & 1 == 1 {
                    bal[u] -= 1;
                    bal[v] += 1;
                    cost += f64::from(c);
                }
            }
            let f = bal[nodes - 1];
            if f > k || bal[0] != -f || (1..nodes - 1).any(|i| bal[i] != 0) {
                continue;
            }
            best = match best {
                Some((bf, bc)) if bf > f || (bf == f && bc <= cost) => Some((bf, bc)),
                _ => Some((f, cost)),
            };
        }
        best
    }

    proptest! {
        #[expect(clippy::float_cmp, reason = "costs are sums of integer link weights, exact in f64")]
        #[test]
        fn matches_brute_force(
            edges in proptest::collection::vec((0usize..5, 0usize..5, 0u32..5), 0..10),
            k in 0i64..4,
        ) {
            let edges: Vec<_> = edges.into_iter().filter(|(u, v, _)| u != v).collect();
            let mut n = FlowNetwork::new(5);
            for &(u, v, c) in &edges {
                n.add_edge(u, v, 1, f64::from(c));
            }
            let r = n.min_cost_flow(0, 4, k);
            let (bf, bc) = brute(5, &edges, k).unwrap_or((0, 0.0));
            // Cycles of zero cost are allowed in the brute force; costs are >= 0 so
            // the minimum never needs one.
            prop_assert_eq!(r.flow, bf);
            prop_assert_eq!(r.cost, bc);
        }
    }
}
