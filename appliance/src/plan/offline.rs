//! `plan construct` and `plan place` on any index store: requests in, reports
//! out (JSON-serialisable, or as text). The CLI and the daemon's API are thin
//! wrappers over [`construct_report`] and [`place_report`].

use std::io::Write;

use super::capacity::{construct_capacity_aware, CapacityConfig};
use super::construct::construct;
use super::image::ImageHolders;
use super::place::{place, Candidate, MetricsFile, PlaceReport, Policy};
use super::report::{BlockSource, ConstructReport};
use super::usage::AccessHistory;
use super::{HolderIndex, HolderIndexError, PlanError};
use crate::cost::{Graph, Topology};
use crate::index::BlockHashMap;
use crate::index::Manifest;

/// What the offline commands need from an index store.
pub trait PlanStore: HolderIndex {
    /// The manifest of `image` at `block_size`, or at the image's smallest indexed
    /// block size when `None`; `Ok(None)` when there is no such manifest.
    fn manifest(
        &self,
        image: &str,
        block_size: Option<u32>,
    ) -> Result<Option<Manifest>, HolderIndexError>;
}

#[cfg(any(test, feature = "testing"))]
impl PlanStore for super::MemoryIndex {
    fn manifest(
        &self,
        image: &str,
        block_size: Option<u32>,
    ) -> Result<Option<Manifest>, HolderIndexError> {
        Ok(super::MemoryIndex::manifest(self, image, block_size).cloned())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("image `{image}` is not in the index{}", .block_size.map(|b| format!(" at block size {b}")).unwrap_or_default())]
    UnknownImage {
        image: String,
        block_size: Option<u32>,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Index(#[from] HolderIndexError),
}

/// `plan construct`.
#[derive(Clone, Debug, Default)]
pub struct ConstructRequest {
    pub image: String,
    pub target: String,
    pub block_size: Option<u32>,
    /// Capacity-aware mode with these settings.
    pub capacity: Option<CapacityConfig>,
    /// List every non-zero block position with its source.
    pub list_blocks: bool,
    /// Order the listed blocks for prefetch by this history.
    pub history: Option<AccessHistory>,
}

/// `plan place`.
#[derive(Clone, Debug)]
pub struct PlaceRequest {
    pub image: String,
    pub candidates: Vec<String>,
    pub policy: Policy,
    pub block_size: Option<u32>,
    pub metrics: MetricsFile,
    /// Placing a replica: a candidate that already holds every block is no place
    /// for one, and is listed last with an error.
    pub replica: bool,
}

fn load(
    store: &dyn PlanStore,
    image: &str,
    block_size: Option<u32>,
) -> Result<Manifest, OfflineError> {
    store
        .manifest(image, block_size)?
        .ok_or_else(|| OfflineError::UnknownImage {
            image: image.to_owned(),
            block_size,
        })
}

/// Plan the construction of `req.image` on `req.target`.
pub fn construct_report(
    store: &dyn PlanStore,
    topology: &Topology,
    req: &ConstructRequest,
) -> Result<ConstructReport, OfflineError> {
    let graph = Graph::from_topology(topology);
    let target = graph
        .node_id(&req.target)
        .ok_or_else(|| PlanError::UnknownHost(req.target.clone()))?;
    let manifest = load(store, &req.image, req.block_size)?;
    let image = ImageHolders::resolve(&manifest, store, &graph)?;
    let paths = graph.shortest_paths(target);
    let (mut report, sources) = match &req.capacity {
        None => {
            let plan = construct(&image, &graph, &paths)?;
            (plan.report(&image, &graph), plan.sources)
        }
        Some(config) => {
            let cp = construct_capacity_aware(&image, &graph, &paths, config)?;
            (cp.report(&image, &graph, config), cp.plan.sources)
        }
    };
    if req.list_blocks {
        let distinct: BlockHashMap<u32> = image
            .blocks
            .distinct
            .iter()
            .enumerate()
            .map(|(i, d)| (d.hash, i as u32))
            .collect();
        let positions: Vec<u64> = match &req.history {
            Some(h) => h.prefetch_order(&manifest),
            None => (0..manifest.blocks.len() as u64)
                .filter(|&i| manifest.blocks[i as usize].is_some())
                .collect(),
        };
        report.blocks = Some(
            positions
                .into_iter()
                .filter_map(|pos| {
                    let hash = manifest.blocks[pos as usize]?;
                    let source = sources[*distinct.get(&hash)? as usize];
                    Some(BlockSource {
                        offset: pos * u64::from(manifest.block_size),
                        hash: hash.to_string(),
                        source: graph.name(source).to_owned(),
                    })
                })
                .collect(),
        );
    }
    Ok(report)
}

/// Rank `req.candidates` for `req.image` and pick one by `req.policy`.
pub fn place_report(
    store: &dyn PlanStore,
    topology: &Topology,
    req: &PlaceRequest,
) -> Result<PlaceReport, OfflineError> {
    let graph = Graph::from_topology(topology);
    let manifest = load(store, &req.image, req.block_size)?;
    let image = ImageHolders::resolve(&manifest, store, &graph)?;
    let mut placement = place(&image, &graph, &req.candidates)?;
    if req.replica {
        for c in &mut placement.candidates {
            if matches!(&c.cost, Ok(k) if k.blocks_fetched == 0) {
                c.cost = Err(PlanError::AlreadyHeld(c.host.clone()));
            }
        }
        resort(&mut placement.candidates);
    }
    Ok(placement.report(&req.image, req.policy, &req.metrics))
}

/// Keep the placement order after some candidates turned into failures.
fn resort(candidates: &mut [Candidate]) {
    // Stable: the successes keep their order, failures go last by host name.
    candidates.sort_by(|a, b| match (a.cost.is_ok(), b.cost.is_ok()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
        (false, false) => a.host.as_bytes().cmp(b.host.as_bytes()),
    });
}

fn cost_text(c: f64) -> String {
    if c.fract() == 0.0 && c.abs() < 1e15 {
        format!("{c:.0}")
    } else {
        format!("{c:.3}")
    }
}

/// `plan construct` without `--json`.
pub fn write_construct_text(r: &ConstructReport, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{} on {}: total cost {}, {} blocks fetched, {} already local, {} zero",
        r.image,
        r.target,
        cost_text(r.total_cost),
        r.blocks_fetched,
        r.blocks_local,
        r.blocks_zero
    )?;
    if !r.by_source.is_empty() {
        writeln!(
            out,
            "{:<24} {:>10} {:>14} {:>12}",
            "SOURCE", "BLOCKS", "BYTES", "PATH COST"
        )?;
        for (host, s) in &r.by_source {
            writeln!(
                out,
                "{:<24} {:>10} {:>14} {:>12}",
                host,
                s.blocks,
                s.bytes,
                cost_text(s.path_cost)
            )?;
        }
    }
    if let Some(c) = &r.capacity {
        writeln!(
            out,
            "capacity-aware: finish {:.3} s (plain plan {:.3} s, cost {}), links under {:.0} %",
            c.finish_time_s,
            c.plain_finish_time_s,
            cost_text(c.plain_total_cost),
            c.util_cap * 100.0
        )?;
    }
    if let Some(blocks) = &r.blocks {
        for b in blocks {
            writeln!(out, "{:>14} {} {}", b.offset, b.hash, b.source)?;
        }
    }
    Ok(())
}

/// `plan place` without `--json`.
pub fn write_place_text(r: &PlaceReport, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{} with policy {}: {}",
        r.image,
        r.policy,
        r.chosen.as_deref().unwrap_or("no candidate can be built")
    )?;
    let metric = |m: Option<f64>| m.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    writeln!(
        out,
        "{:<24} {:>12} {:>6} {:>6} {:>6}",
        "HOST", "TOTAL COST", "CPU", "MEM", "DISK"
    )?;
    for c in &r.candidates {
        let cost = c.total_cost.map_or_else(|| "-".to_owned(), cost_text);
        write!(
            out,
            "{:<24} {:>12} {:>6} {:>6} {:>6}",
            c.host,
            cost,
            metric(c.cpu),
            metric(c.mem),
            metric(c.disk)
        )?;
        match &c.error {
            Some(e) => writeln!(out, "  {e}")?,
            None => writeln!(out)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::construct::tests::dc;
    use super::super::testutil::*;
    use super::super::MemoryIndex;
    use super::*;

    fn store() -> MemoryIndex {
        // The image is blocks 1, 2, 0, 1 (tail 10 bytes); lib indexed all of it,
        // h2 holds block 1 only.
        let mut idx = MemoryIndex::new();
        idx.add_manifest("lib", &manifest("img", &[1, 2, 0, 3], Some(10)));
        let h2 = idx.host("h2");
        idx.add_block(h2, h(1));
        idx
    }

    #[test]
    fn construct_json_shape() {
        let req = ConstructRequest {
            image: "img".into(),
            target: "h1".into(),
            list_blocks: true,
            ..Default::default()
        };
        let r = construct_report(&store(), &dc(), &req).unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["image"], "img");
        assert_eq!(v["target"], "h1");
        assert_eq!(v["total_cost"], 2.0 + 4.0 + 4.0);
        assert_eq!(v["blocks_fetched"], 3);
        assert_eq!(v["blocks_local"], 0);
        assert_eq!(v["blocks_zero"], 1);
        assert_eq!(v["by_source"]["h2"]["blocks"], 1);
        assert_eq!(v["by_source"]["lib"]["bytes"], 4096 + 10);
        assert_eq!(v["by_source"]["lib"]["path_cost"], 8.0);
        assert!(v.get("capacity").is_none());
        let blocks = v["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[2]["offset"], 3 * 4096);
        assert_eq!(blocks[0]["source"], "h2");
        let mut text = Vec::new();
        write_construct_text(&r, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.starts_with("img on h1: total cost 10, 3 blocks fetched"),
            "{text}"
        );
    }

    #[test]
    fn construct_errors() {
        let s = store();
        let mut req = ConstructRequest {
            image: "img".into(),
            target: "nowhere".into(),
            ..Default::default()
        };
        let e = construct_report(&s, &dc(), &req).unwrap_err();
        assert!(
            e.to_string().contains("`nowhere` is not in the topology"),
            "{e}"
        );
        req.target = "island".into();
        let e = construct_report(&s, &dc(), &req).unwrap_err().to_string();
        assert!(e.contains("offset 0"), "{e}");
        req.target = "h1".into();
        req.block_size = Some(8192);
        let e = construct_report(&s, &dc(), &req).unwrap_err().to_string();
        assert_eq!(e, "image `img` is not in the index at block size 8192");
    }

    #[expect(
        clippy::float_cmp,
        reason = "costs are sums of integer link weights, exact in f64"
    )]
    #[test]
    fn construct_capacity_and_history() {
        let mut history = AccessHistory::new("img");
        history.record_boot([3, 1]);
        let req = ConstructRequest {
            image: "img".into(),
            target: "h1".into(),
            capacity: Some(CapacityConfig::default()),
            list_blocks: true,
            history: Some(history),
            ..Default::default()
        };
        let r = construct_report(&store(), &dc(), &req).unwrap();
        let offsets: Vec<u64> = r
            .blocks
            .as_ref()
            .unwrap()
            .iter()
            .map(|b| b.offset)
            .collect();
        assert_eq!(offsets, [3 * 4096, 4096, 0]);
        // No capacities in this topology: the plain plan, finishing "at once".
        let c = r.capacity.as_ref().unwrap();
        assert_eq!(c.finish_time_s, 0.0);
        assert_eq!(r.total_cost, c.plain_total_cost);
    }

    #[test]
    fn place_json_shape_and_replica() {
        let metrics = MetricsFile::parse("[host.h2]\ncpu = 0.5\n").unwrap();
        let mut req = PlaceRequest {
            image: "img".into(),
            candidates: vec!["h2".into(), "lib".into(), "island".into(), "h1".into()],
            policy: "top:2:cpu".parse().unwrap(),
            block_size: None,
            metrics,
            replica: false,
        };
        let r = place_report(&store(), &dc(), &req).unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["policy"], "top:2:cpu");
        // lib 0, h1 2 + 4 + 4 = 10, h2 8; island cannot be built.
        let hosts: Vec<_> = r.candidates.iter().map(|c| c.host.as_str()).collect();
        assert_eq!(hosts, ["lib", "h2", "h1", "island"]);
        assert_eq!(v["chosen"], "h2", "lib's cpu is unknown");
        assert_eq!(v["candidates"][1]["cpu"], 0.5);
        assert!(v["candidates"][3]["total_cost"].is_null());
        assert!(v["candidates"][3]["error"]
            .as_str()
            .unwrap()
            .contains("offset"));
        assert!(v["candidates"][0].get("error").is_none());
        req.replica = true;
        let r = place_report(&store(), &dc(), &req).unwrap();
        let hosts: Vec<_> = r.candidates.iter().map(|c| c.host.as_str()).collect();
        assert_eq!(hosts, ["h2", "h1", "island", "lib"]);
        assert!(r.candidates[3]
            .error
            .as_ref()
            .unwrap()
            .contains("already holds"));
        let mut text = Vec::new();
        write_place_text(&r, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.starts_with("img with policy top:2:cpu: h2"), "{text}");
    }
}
