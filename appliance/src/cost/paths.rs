//! Cheapest paths over the topology: the weighted graph built from a [`Topology`]
//! (nodes interned to dense ids in name order) and Dijkstra from one source, or from
//! every node for a full cost matrix.
//!
//! Node ids are assigned in byte order of the node names, so comparing two ids
//! compares the names: the planner's "ties by host name" rule is then an integer
//! comparison.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use super::topology::{Role, Topology};

/// A node of the graph; ids are dense and ordered like the node names.
pub type NodeId = u32;
/// A link of the graph: its position in the topology's `[[link]]` list.
pub type LinkId = u32;

/// One link as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphLink {
    pub a: NodeId,
    pub b: NodeId,
    /// Weight from the topology file.
    pub base_weight: f64,
    /// Weight in force (the base weight, or a live effective weight).
    pub weight: f64,
    pub capacity_mbps: Option<f64>,
}

impl GraphLink {
    /// The end of the link that is not `node`.
    pub fn other(&self, node: NodeId) -> NodeId {
        if self.a == node {
            self.b
        } else {
            self.a
        }
    }
}

/// The topology as an undirected weighted graph.
#[derive(Clone, Debug)]
pub struct Graph {
    names: Vec<String>,
    roles: Vec<Role>,
    ids: HashMap<String, NodeId>,
    /// Per node: (neighbour, link), sorted, so every traversal is deterministic.
    adjacency: Vec<Vec<(NodeId, LinkId)>>,
    links: Vec<GraphLink>,
}

impl Graph {
    /// Build the graph of a validated topology.
    pub fn from_topology(topology: &Topology) -> Self {
        let mut order: Vec<usize> = (0..topology.nodes.len()).collect();
        order.sort_by(|&x, &y| topology.nodes[x].name.cmp(&topology.nodes[y].name));
        let names: Vec<String> = order
            .iter()
            .map(|&i| topology.nodes[i].name.clone())
            .collect();
        let roles = order.iter().map(|&i| topology.nodes[i].role).collect();
        let ids: HashMap<String, NodeId> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as NodeId))
            .collect();
        let mut adjacency = vec![Vec::new(); names.len()];
        let mut links = Vec::with_capacity(topology.links.len());
        for (index, l) in topology.links.iter().enumerate() {
            // A validated topology names only known nodes.
            let (Some(&a), Some(&b)) = (ids.get(&l.a), ids.get(&l.b)) else {
                continue;
            };
            links.push(GraphLink {
                a,
                b,
                base_weight: l.weight,
                weight: l.weight,
                capacity_mbps: l.capacity_mbps,
            });
            adjacency[a as usize].push((b, index as LinkId));
            adjacency[b as usize].push((a, index as LinkId));
        }
        for adj in &mut adjacency {
            adj.sort_unstable();
        }
        Graph {
            names,
            roles,
            ids,
            adjacency,
            links,
        }
    }

    pub fn node_count(&self) -> usize {
        self.names.len()
    }

    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.ids.get(name).copied()
    }

    pub fn name(&self, node: NodeId) -> &str {
        &self.names[node as usize]
    }

    pub fn role(&self, node: NodeId) -> Role {
        self.roles[node as usize]
    }

    pub fn links(&self) -> &[GraphLink] {
        &self.links
    }

    pub fn link(&self, link: LinkId) -> &GraphLink {
        &self.links[link as usize]
    }

    /// `(neighbour, link)` pairs of `node`, sorted.
    pub fn neighbours(&self, node: NodeId) -> &[(NodeId, LinkId)] {
        &self.adjacency[node as usize]
    }

    /// The cheapest link between `a` and `b` (lowest weight, then lowest id).
    pub fn link_between(&self, a: NodeId, b: NodeId) -> Option<LinkId> {
        self.neighbours(a)
            .iter()
            .filter(|&&(n, _)| n == b)
            .map(|&(_, l)| l)
            .min_by(|&x, &y| {
                self.link(x)
                    .weight
                    .total_cmp(&self.link(y).weight)
                    .then(x.cmp(&y))
            })
    }

    /// Replace a link's weight in force; returns the previous one.
    pub fn set_weight(&mut self, link: LinkId, weight: f64) -> f64 {
        debug_assert!(weight.is_finite() && weight >= 0.0);
        std::mem::replace(&mut self.links[link as usize].weight, weight)
    }

    /// Dijkstra from `source`.
    pub fn shortest_paths(&self, source: NodeId) -> ShortestPaths {
        shortest_paths(self, source)
    }
}

/// Cheapest path costs from one source, with the tree of cheapest paths.
#[derive(Clone, Debug, PartialEq)]
pub struct ShortestPaths {
    pub source: NodeId,
    /// Path cost per node; `f64::INFINITY` when unreachable.
    pub dist: Vec<f64>,
    /// Per node: the previous node and the link on the cheapest path from the
    /// source (`None` for the source and unreachable nodes).
    pub parent: Vec<Option<(NodeId, LinkId)>>,
}

impl ShortestPaths {
    /// Path cost to `node`, `None` when unreachable.
    pub fn cost(&self, node: NodeId) -> Option<f64> {
        let d = self.dist[node as usize];
        d.is_finite().then_some(d)
    }

    /// Links on the tree path between `node` and the source, from `node` towards the
    /// source (empty for the source itself and for unreachable nodes).
    pub fn path_links(&self, node: NodeId) -> impl Iterator<Item = LinkId> + '_ {
        let mut at = node;
        std::iter::from_fn(move || {
            let (prev, link) = self.parent[at as usize]?;
            at = prev;
            Some(link)
        })
    }
}

/// A non-negative finite f64 with a total order, for the heap.
#[derive(Clone, Copy, PartialEq)]
struct Cost(f64);
impl Eq for Cost {}
impl PartialOrd for Cost {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cost {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Dijkstra with a heap ordered by (cost, node id), and parents set only on a
/// strict improvement: the result, tree included, is a function of the weights of
/// links on cheapest paths only (see [`crate::cost::live`], which relies on it).
pub fn shortest_paths(graph: &Graph, source: NodeId) -> ShortestPaths {
    let n = graph.node_count();
    let mut dist = vec![f64::INFINITY; n];
    let mut parent = vec![None; n];
    let mut done = vec![false; n];
    let mut heap = BinaryHeap::new();
    dist[source as usize] = 0.0;
    heap.push(Reverse((Cost(0.0), source)));
    while let Some(Reverse((Cost(d), u))) = heap.pop() {
        if done[u as usize] {
            continue;
        }
        done[u as usize] = true;
        for &(v, link) in graph.neighbours(u) {
            if done[v as usize] {
                continue;
            }
            let candidate = d + graph.link(link).weight;
            if candidate < dist[v as usize] {
                dist[v as usize] = candidate;
                parent[v as usize] = Some((u, link));
                heap.push(Reverse((Cost(candidate), v)));
            }
        }
    }
    ShortestPaths {
        source,
        dist,
        parent,
    }
}

/// Path costs between every pair of nodes (one Dijkstra per node).
#[derive(Clone, Debug, PartialEq)]
#[cfg(test)]
pub struct CostMatrix {
    n: usize,
    dist: Vec<f64>,
}

#[cfg(test)]
impl CostMatrix {
    pub fn compute(graph: &Graph) -> Self {
        let n = graph.node_count();
        let mut dist = Vec::with_capacity(n * n);
        for s in 0..n {
            dist.extend_from_slice(&shortest_paths(graph, s as NodeId).dist);
        }
        CostMatrix { n, dist }
    }

    /// Path cost between `a` and `b`; `f64::INFINITY` when unreachable.
    pub fn get(&self, a: NodeId, b: NodeId) -> f64 {
        self.dist[a as usize * self.n + b as usize]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A topology from `(a, b, weight)` triples; every node a hypervisor.
    pub(crate) fn topo(nodes: &[&str], links: &[(&str, &str, f64)]) -> Topology {
        use std::fmt::Write as _;
        let mut text = String::new();
        for n in nodes {
            let _ = write!(text, "[[node]]\nname = \"{n}\"\nrole = \"hypervisor\"\n");
        }
        for (a, b, w) in links {
            let _ = write!(text, "[[link]]\na = \"{a}\"\nb = \"{b}\"\nweight = {w:?}\n");
        }
        Topology::parse(&text).unwrap()
    }

    #[test]
    fn ids_follow_name_byte_order() {
        let g = Graph::from_topology(&topo(&["b", "a", "B"], &[]));
        assert_eq!(g.node_id("B"), Some(0));
        assert_eq!(g.node_id("a"), Some(1));
        assert_eq!(g.node_id("b"), Some(2));
        assert_eq!(g.name(2), "b");
    }

    #[expect(
        clippy::many_single_char_names,
        reason = "variables named like the topology's nodes"
    )]
    #[test]
    fn cheapest_path_not_fewest_hops() {
        // a - b costs 5 directly, 1 + 1 through c.
        let g = Graph::from_topology(&topo(
            &["a", "b", "c", "d"],
            &[("a", "b", 5.0), ("a", "c", 1.0), ("c", "b", 1.0)],
        ));
        let a = g.node_id("a").unwrap();
        let b = g.node_id("b").unwrap();
        let c = g.node_id("c").unwrap();
        let p = g.shortest_paths(a);
        assert_eq!(p.cost(b), Some(2.0));
        assert_eq!(p.cost(g.node_id("d").unwrap()), None);
        assert_eq!(p.cost(a), Some(0.0));
        let links: Vec<_> = p.path_links(b).collect();
        assert_eq!(links, [2, 1]);
        assert_eq!(p.parent[b as usize], Some((c, 2)));
        assert_eq!(p.path_links(a).count(), 0);
    }

    #[expect(
        clippy::float_cmp,
        reason = "exact values: the expected figures are exactly representable"
    )]
    #[expect(
        clippy::many_single_char_names,
        reason = "variables named like the topology's nodes"
    )]
    #[test]
    fn default_weight_counts_hops() {
        let t = Topology::parse(
            "[[node]]\nname=\"x\"\nrole=\"library\"\n[[node]]\nname=\"s\"\nrole=\"switch\"\n\
             [[node]]\nname=\"y\"\nrole=\"hypervisor\"\n\
             [[link]]\na=\"x\"\nb=\"s\"\n[[link]]\na=\"s\"\nb=\"y\"\n",
        )
        .unwrap();
        let g = Graph::from_topology(&t);
        let m = CostMatrix::compute(&g);
        let (x, y) = (g.node_id("x").unwrap(), g.node_id("y").unwrap());
        assert_eq!(m.get(x, y), 2.0);
        assert_eq!(m.get(y, x), 2.0);
        assert_eq!(g.role(x), Role::Library);
    }

    #[test]
    fn parallel_links_pick_the_cheaper() {
        let g = Graph::from_topology(&topo(&["a", "b"], &[("a", "b", 3.0), ("a", "b", 2.0)]));
        assert_eq!(g.link_between(0, 1), Some(1));
        assert_eq!(g.shortest_paths(0).cost(1), Some(2.0));
        assert_eq!(g.link(1).other(0), 1);
    }
}
