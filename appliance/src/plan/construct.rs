//! VM Construction (seed Table 1): for one target, the source of every distinct
//! non-zero block: the target itself when it holds the block (cost 0), else the
//! holder with the cheapest path to the target, ties broken by host name in byte
//! order. A block that no reachable host holds is an error naming its offset.

use std::collections::BTreeMap;

use super::image::ImageHolders;
use super::report::{ConstructReport, SourceSummary};
use super::tally::CostTally;
use super::PlanError;
use crate::cost::{Graph, NodeId, ShortestPaths};

/// Where every distinct non-zero block of an image comes from, for one target.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstructionPlan {
    pub target: NodeId,
    /// Per distinct block (see [`super::ImageBlocks::distinct`]): its source, the
    /// target itself when the block is already there.
    pub sources: Vec<NodeId>,
    /// Sum over fetched blocks of the source's path cost to the target.
    pub total_cost: f64,
    /// Distinct non-zero blocks fetched from another host.
    pub blocks_fetched: u64,
    /// Distinct non-zero blocks the target already holds.
    pub blocks_local: u64,
    /// Positions holding an all-zero block.
    pub blocks_zero: u64,
    /// Fetch sources (the target excluded), in host name order.
    pub by_source: BTreeMap<NodeId, SourceSummary>,
}

/// The cheapest reachable holder of a set (ties: lowest id, i.e. host name), with
/// its path cost; `None` when no holder is reachable.
pub fn cheapest_holder(holders: &[NodeId], paths: &ShortestPaths) -> Option<(NodeId, f64)> {
    let mut best: Option<(NodeId, f64)> = None;
    // Holders are sorted by id, so a strict `<` keeps the lowest name on ties.
    for &h in holders {
        let d = paths.dist[h as usize];
        if d.is_finite() && best.is_none_or(|(_, bd)| d < bd) {
            best = Some((h, d));
        }
    }
    best
}

/// Plain construction of `image` on `paths.source` (`paths` computed on `graph`).
pub fn construct(
    image: &ImageHolders,
    graph: &Graph,
    paths: &ShortestPaths,
) -> Result<ConstructionPlan, PlanError> {
    let target = paths.source;
    let mut sources = vec![target; image.blocks.distinct.len()];
    let mut unreachable = Vec::new();
    for (g, group) in image.groups().enumerate() {
        if group.holders.binary_search(&target).is_ok() {
            continue;
        }
        match cheapest_holder(group.holders, paths) {
            Some((h, _)) => {
                for &b in group.blocks {
                    sources[b as usize] = h;
                }
            }
            None => unreachable.push(g as u32),
        }
    }
    if let Some((block, more)) = image.first_block_of(unreachable) {
        return Err(unreachable_error(image, block, more, graph.name(target)));
    }
    Ok(ConstructionPlan::from_sources(image, paths, sources))
}

/// The error for distinct block `block` held by no reachable host.
pub(crate) fn unreachable_error(
    image: &ImageHolders,
    block: u32,
    more: u64,
    target: &str,
) -> PlanError {
    PlanError::Unreachable {
        offset: image.blocks.offset(block),
        hash: image.blocks.distinct[block as usize].hash,
        target: target.to_owned(),
        more,
    }
}

impl ConstructionPlan {
    /// Summarise a per-block choice of sources (each reachable from the target).
    pub fn from_sources(image: &ImageHolders, paths: &ShortestPaths, sources: Vec<NodeId>) -> Self {
        let target = paths.source;
        let mut by_source: BTreeMap<NodeId, SourceSummary> = BTreeMap::new();
        let mut blocks_local = 0;
        for (block, &src) in image.blocks.distinct.iter().zip(&sources) {
            if src == target {
                blocks_local += 1;
                continue;
            }
            let s = by_source.entry(src).or_default();
            s.blocks += 1;
            s.bytes += block.len;
        }
        let mut tally = CostTally::new();
        for (&src, s) in &mut by_source {
            let d = paths.dist[src as usize];
            s.path_cost = d * s.blocks as f64;
            tally.add(d, s.blocks);
        }
        ConstructionPlan {
            target,
            total_cost: tally.total(),
            blocks_fetched: sources.len() as u64 - blocks_local,
            blocks_local,
            blocks_zero: image.blocks.zero_positions,
            sources,
            by_source,
        }
    }

    /// Bytes each link carries towards the target (indexed by link id), with every
    /// fetch routed along the tree of cheapest paths.
    pub fn link_bytes(&self, paths: &ShortestPaths, link_count: usize) -> Vec<u64> {
        let mut bytes = vec![0u64; link_count];
        for (&src, s) in &self.by_source {
            for link in paths.path_links(src) {
                bytes[link as usize] += s.bytes;
            }
        }
        bytes
    }

    /// The JSON report (`docs/planner.md`).
    pub fn report(&self, image: &ImageHolders, graph: &Graph) -> ConstructReport {
        ConstructReport {
            image: image.blocks.image.clone(),
            target: graph.name(self.target).to_owned(),
            total_cost: self.total_cost,
            blocks_fetched: self.blocks_fetched,
            blocks_local: self.blocks_local,
            blocks_zero: self.blocks_zero,
            by_source: self
                .by_source
                .iter()
                .map(|(&n, s)| (graph.name(n).to_owned(), *s))
                .collect(),
            capacity: None,
            blocks: None,
        }
    }
}

/// Link loads for a plan, as `(link, bytes)` for links that carry any.
pub fn loaded_links(bytes: &[u64]) -> impl Iterator<Item = (crate::cost::paths::LinkId, u64)> + '_ {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b > 0)
        .map(|(l, &b)| (l as crate::cost::paths::LinkId, b))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::testutil::*;
    use super::super::MemoryIndex;
    use super::*;
    use crate::cost::paths::tests::topo;
    use crate::cost::Topology;
    use crate::index::Manifest;

    /// lib - core - tor1 - {h1, h2}; core - tor2 - {h3, h4}; all weight 1, except
    /// lib - core at weight 2. Path costs from h1: h2 2, h3 4, h4 4, lib 4.
    pub(crate) fn dc() -> Topology {
        topo(
            &[
                "lib", "core", "tor1", "tor2", "h1", "h2", "h3", "h4", "island",
            ],
            &[
                ("lib", "core", 2.0),
                ("core", "tor1", 1.0),
                ("core", "tor2", 1.0),
                ("tor1", "h1", 1.0),
                ("tor1", "h2", 1.0),
                ("tor2", "h3", 1.0),
                ("tor2", "h4", 1.0),
            ],
        )
    }

    pub(crate) fn plan(
        m: &Manifest,
        idx: &MemoryIndex,
        target: &str,
    ) -> Result<(ConstructReport, ConstructionPlan), PlanError> {
        let g = Graph::from_topology(&dc());
        let image = ImageHolders::resolve(m, idx, &g)?;
        let t = g.node_id(target).unwrap();
        let paths = g.shortest_paths(t);
        let p = construct(&image, &g, &paths)?;
        Ok((p.report(&image, &g), p))
    }

    #[expect(
        clippy::float_cmp,
        reason = "costs are sums of integer link weights, exact in f64"
    )]
    #[test]
    fn nearest_holder_wins_and_costs_add_up() {
        // Blocks 1..=4; 1 on h2 (cost 2) and lib (4); 2 on h3 (4) and lib (4): tie,
        // "h3" < "lib"; 3 on the target; 4 on lib only.
        let idx = index(&[
            ("h2", &[1]),
            ("lib", &[1, 2, 4]),
            ("h3", &[2]),
            ("h1", &[3]),
        ]);
        let m = manifest("img", &[1, 2, 3, 4], None);
        let (r, p) = plan(&m, &idx, "h1").unwrap();
        assert_eq!(r.total_cost, 2.0 + 4.0 + 4.0);
        assert_eq!((r.blocks_fetched, r.blocks_local, r.blocks_zero), (3, 1, 0));
        let by: Vec<_> = r
            .by_source
            .iter()
            .map(|(k, s)| (k.as_str(), s.blocks, s.path_cost))
            .collect();
        assert_eq!(by, [("h2", 1, 2.0), ("h3", 1, 4.0), ("lib", 1, 4.0)]);
        let sum: f64 = r.by_source.values().map(|s| s.path_cost).sum();
        assert_eq!(sum, r.total_cost);
        assert_eq!(p.sources.len(), 4);
    }

    #[expect(
        clippy::float_cmp,
        reason = "costs are sums of integer link weights, exact in f64"
    )]
    #[test]
    fn zero_and_repeated_blocks_and_short_tail() {
        // Block 5 repeats three times (fetched once); two zero positions; the tail
        // is block 6, 100 bytes, on lib.
        let idx = index(&[("h2", &[5]), ("lib", &[6])]);
        let m = manifest("img", &[5, 0, 5, 5, 0, 6], Some(100));
        let (r, _) = plan(&m, &idx, "h1").unwrap();
        assert_eq!((r.blocks_fetched, r.blocks_local, r.blocks_zero), (2, 0, 2));
        assert_eq!(r.total_cost, 2.0 + 4.0);
        assert_eq!(r.by_source["h2"].bytes, 4096);
        assert_eq!(r.by_source["lib"].bytes, 100);
    }

    #[expect(
        clippy::float_cmp,
        reason = "costs are sums of integer link weights, exact in f64"
    )]
    #[test]
    fn all_local_costs_nothing() {
        let idx = index(&[("h1", &[1, 2]), ("h2", &[1, 2])]);
        let (r, _) = plan(&manifest("img", &[1, 2, 0], None), &idx, "h1").unwrap();
        assert_eq!(r.total_cost, 0.0);
        assert_eq!((r.blocks_fetched, r.blocks_local), (0, 2));
        assert!(r.by_source.is_empty());
        // An image of zero blocks only: nothing to do anywhere.
        let (r, _) = plan(&manifest("img", &[0, 0], None), &idx, "island").unwrap();
        assert_eq!((r.total_cost, r.blocks_fetched, r.blocks_zero), (0.0, 0, 2));
    }

    #[test]
    fn unreachable_holders_are_not_sources() {
        // Block 1 on the island (unreachable) and lib: lib it is.
        let idx = index(&[("island", &[1]), ("lib", &[1])]);
        let (r, _) = plan(&manifest("img", &[1], None), &idx, "h1").unwrap();
        assert_eq!(r.by_source.keys().collect::<Vec<_>>(), ["lib"]);
    }

    #[test]
    fn block_held_nowhere_names_its_offset() {
        // Block 2 (offset 8192) on the island only, block 3 held nowhere at all.
        let idx = index(&[("island", &[2]), ("lib", &[1]), ("ghost", &[3])]);
        let err = plan(&manifest("img", &[1, 0, 2, 3], None), &idx, "h1").unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                PlanError::Unreachable {
                    offset: 8192,
                    more: 1,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("offset 8192") && msg.contains("`h1`") && msg.contains("1 more"),
            "{msg}"
        );
    }

    #[expect(
        clippy::float_cmp,
        reason = "costs are sums of integer link weights, exact in f64"
    )]
    #[test]
    fn live_utilisation_moves_the_source() {
        use crate::cost::{LiveCostConfig, LiveCosts};
        let idx = index(&[("h2", &[1]), ("lib", &[1])]);
        let g = Graph::from_topology(&dc());
        let image = ImageHolders::resolve(&manifest("img", &[1], None), &idx, &g).unwrap();
        let t = g.node_id("h1").unwrap();
        let tor1_h2 = 4;
        let mut live = LiveCosts::new(g, LiveCostConfig::default()).unwrap();
        let (g, paths) = live.graph_and_paths(t);
        let before = construct(&image, g, paths).unwrap();
        assert_eq!(g.name(before.sources[0]), "h2");
        // tor1 - h2 at 90 %: weight 1 * (1 + 0.9 / 0.1) = 10, so h2 costs 11 > lib's 4.
        live.observe(&[(tor1_h2, 0.9)]).unwrap();
        let (g, paths) = live.graph_and_paths(t);
        let after = construct(&image, g, paths).unwrap();
        assert_eq!(g.name(after.sources[0]), "lib");
        assert_eq!(after.total_cost, 4.0);
    }

    #[test]
    fn link_bytes_follow_the_path() {
        let idx = index(&[("h3", &[1, 2])]);
        let g = Graph::from_topology(&dc());
        let m = manifest("img", &[1, 2], Some(10));
        let image = ImageHolders::resolve(&m, &idx, &g).unwrap();
        let paths = g.shortest_paths(g.node_id("h1").unwrap());
        let p = construct(&image, &g, &paths).unwrap();
        let loads: Vec<_> = loaded_links(&p.link_bytes(&paths, g.links().len())).collect();
        // h3 - tor2 (5), tor2 - core (2), core - tor1 (1), tor1 - h1 (3).
        assert_eq!(loads, [(1, 4106), (2, 4106), (3, 4106), (5, 4106)]);
    }
}
