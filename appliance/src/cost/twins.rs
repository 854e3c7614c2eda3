//! Twin classes: nodes with the same neighbours at the same (cheapest) link weights,
//! like the hosts of one rack under their top-of-rack switch.
//!
//! Twins are interchangeable for path costs: for any node `x` other than the twins
//! `h1`, `h2` themselves, `cost(x, h1) == cost(x, h2)` (a cheapest path into `h1`
//! enters through a neighbour that `h2` shares at the same weight, and a path
//! through `h2` can always enter `h1` directly from `h2`'s neighbour instead). Every
//! two members of a class are also at the same cost from each other. Placement uses
//! this to run one Dijkstra, and one pass over the image's holder sets, per class
//! of candidates instead of per candidate.

use std::collections::HashMap;

use super::paths::{Graph, NodeId};

/// The partition of a graph's nodes into twin classes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwinClasses {
    class_of: Vec<u32>,
    members: Vec<Vec<NodeId>>,
}

impl TwinClasses {
    /// Classes under the weights in force. Classes are numbered in the order of
    /// their lowest member; members are sorted.
    pub fn of(graph: &Graph) -> Self {
        let mut by_key: HashMap<Vec<(NodeId, u64)>, u32> = HashMap::new();
        let mut class_of = Vec::with_capacity(graph.node_count());
        let mut members: Vec<Vec<NodeId>> = Vec::new();
        for node in 0..graph.node_count() as NodeId {
            // Neighbours with the cheapest weight to each (parallel links collapse).
            let mut key: Vec<(NodeId, u64)> = Vec::new();
            for &(n, link) in graph.neighbours(node) {
                let w = graph.link(link).weight;
                match key.last_mut() {
                    Some((last, bits)) if *last == n => {
                        if w < f64::from_bits(*bits) {
                            *bits = w.to_bits();
                        }
                    }
                    _ => key.push((n, w.to_bits())),
                }
            }
            let next = members.len() as u32;
            let class = *by_key.entry(key).or_insert(next);
            if class == next {
                members.push(Vec::new());
            }
            members[class as usize].push(node);
            class_of.push(class);
        }
        TwinClasses { class_of, members }
    }

    pub fn class_of(&self, node: NodeId) -> u32 {
        self.class_of[node as usize]
    }

    pub fn members(&self, class: u32) -> &[NodeId] {
        &self.members[class as usize]
    }

    pub fn class_count(&self) -> usize {
        self.members.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::paths::tests::topo;
    use crate::cost::CostMatrix;
    use proptest::prelude::*;

    #[test]
    fn rack_hosts_are_twins() {
        let g = Graph::from_topology(&topo(
            &["h1", "h2", "h3", "tor", "core"],
            &[
                ("h1", "tor", 1.0),
                ("h2", "tor", 1.0),
                ("h3", "tor", 2.0),
                ("tor", "core", 1.0),
            ],
        ));
        let t = TwinClasses::of(&g);
        let id = |n| g.node_id(n).unwrap();
        assert_eq!(t.class_of(id("h1")), t.class_of(id("h2")));
        assert_ne!(t.class_of(id("h1")), t.class_of(id("h3")));
        // core hangs off tor at weight 1 too: a twin of h1 and h2.
        assert_eq!(t.class_count(), 3);
        assert_eq!(
            t.members(t.class_of(id("h2"))),
            &[id("core"), id("h1"), id("h2")]
        );
    }

    proptest! {
        /// The property placement relies on, checked against the full matrix.
        #[expect(clippy::float_cmp, reason = "exact values: the expected figures are exactly representable")]
        #[test]
        fn twins_have_equal_costs(
            links in proptest::collection::vec((0u32..7, 0u32..7, 1u32..3), 1..14),
        ) {
            let names = ["a", "b", "c", "d", "e", "f", "g"];
            let links: Vec<_> = links
                .into_iter()
                .filter(|(a, b, _)| a != b)
                .map(|(a, b, w)| (names[a as usize], names[b as usize], f64::from(w)))
                .collect();
            let g = Graph::from_topology(&topo(&names, &links));
            let m = CostMatrix::compute(&g);
            let t = TwinClasses::of(&g);
            for c in 0..t.class_count() as u32 {
                let ms = t.members(c);
                for &h1 in ms {
                    for &h2 in ms {
                        for x in 0..7 {
                            if x != h1 && x != h2 {
                                prop_assert_eq!(m.get(x, h1), m.get(x, h2));
                            }
                        }
                        for &h3 in ms {
                            if h1 != h2 && h1 != h3 {
                                prop_assert_eq!(m.get(h1, h2), m.get(h1, h3));
                            }
                        }
                    }
                }
            }
        }
    }
}
