//! VM Placement (seed Table 2): the construction cost of an image on each
//! candidate, candidates sorted by it, and a policy that picks one using host
//! metrics (`cpu`, `mem`, `disk`, used fractions).
//!
//! # Many candidates at once
//! Running one construction per candidate would cost candidates x blocks x
//! holders. Instead:
//! - blocks are grouped by identical holder set ([`ImageHolders`]), and holder sets
//!   are mapped to sets of twin classes ([`TwinClasses`]: hosts of one rack under
//!   the same switch at the same weight are interchangeable);
//! - candidates are processed per twin class: one Dijkstra and one pass over the
//!   class sets gives every class set's cheapest cost, identical for every member
//!   of the candidate's class, collected in a [`CostTally`];
//! - per candidate, only the groups the candidate itself holds are moved to cost 0.
//!
//! The cost per block is the same min-over-holders as [`super::construct`], and
//! the total is summed the same way, so placement and construction agree exactly.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::construct::unreachable_error;
use rustc_hash::FxBuildHasher;

use super::image::ImageHolders;
use super::tally::CostTally;
use super::PlanError;
use crate::cost::{Graph, NodeId, TwinClasses};

/// A host's reported load, as used fractions (0..1); unknown when absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMetrics {
    pub cpu: Option<f64>,
    pub mem: Option<f64>,
    pub disk: Option<f64>,
}

impl HostMetrics {
    pub fn get(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::Cpu => self.cpu,
            Metric::Mem => self.mem,
            Metric::Disk => self.disk,
        }
    }

    /// The first metric that is not a used fraction in [0, 1] (NaN included).
    pub fn out_of_range(&self) -> Option<(Metric, f64)> {
        [Metric::Cpu, Metric::Mem, Metric::Disk]
            .into_iter()
            .find_map(|m| {
                self.get(m)
                    .filter(|v| !(0.0..=1.0).contains(v))
                    .map(|v| (m, v))
            })
    }

    /// Each metric from `self` where known, else from `fallback`.
    #[must_use]
    pub fn or(self, fallback: HostMetrics) -> HostMetrics {
        HostMetrics {
            cpu: self.cpu.or(fallback.cpu),
            mem: self.mem.or(fallback.mem),
            disk: self.disk.or(fallback.disk),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.mem.is_none() && self.disk.is_none()
    }
}

/// A host metric a policy can rank by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Cpu,
    Mem,
    Disk,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Mem => "mem",
            Metric::Disk => "disk",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("unknown metric `{0}` (expected cpu, mem or disk)")]
    Metric(String),
    #[error("bad policy `{0}`: expected best, top:X:METRIC or within:P%:METRIC")]
    Syntax(String),
    #[error("bad policy `{0}`: X must be a whole number >= 1")]
    Count(String),
    #[error("bad policy `{0}`: P must be a number >= 0")]
    Percent(String),
}

impl FromStr for Metric {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s {
            "cpu" => Ok(Metric::Cpu),
            "mem" => Ok(Metric::Mem),
            "disk" => Ok(Metric::Disk),
            _ => Err(PolicyError::Metric(s.to_owned())),
        }
    }
}

/// How a host is chosen from the sorted candidates (seed: "uses of the sorted list").
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// The cheapest.
    Best,
    /// Among the `count` cheapest, the lowest `metric`.
    Top { count: usize, metric: Metric },
    /// Among those within `percent` % of the cheapest cost, the lowest `metric`.
    Within { percent: f64, metric: Metric },
}

impl FromStr for Policy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["best"] => Ok(Policy::Best),
            ["top", x, m] => {
                let count: usize = x.parse().map_err(|_| PolicyError::Count(s.to_owned()))?;
                if count == 0 {
                    return Err(PolicyError::Count(s.to_owned()));
                }
                Ok(Policy::Top {
                    count,
                    metric: m.parse()?,
                })
            }
            ["within", p, m] => {
                let percent: f64 = p
                    .strip_suffix('%')
                    .unwrap_or(p)
                    .parse()
                    .map_err(|_| PolicyError::Percent(s.to_owned()))?;
                if !percent.is_finite() || percent < 0.0 {
                    return Err(PolicyError::Percent(s.to_owned()));
                }
                Ok(Policy::Within {
                    percent,
                    metric: m.parse()?,
                })
            }
            _ => Err(PolicyError::Syntax(s.to_owned())),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Best => f.write_str("best"),
            Policy::Top { count, metric } => write!(f, "top:{count}:{}", metric.name()),
            Policy::Within { percent, metric } => write!(f, "within:{percent}%:{}", metric.name()),
        }
    }
}

/// The `--metrics` file: `[host.NAME]` tables with `cpu`, `mem`, `disk`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    #[serde(default)]
    pub host: BTreeMap<String, HostMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics file is not valid TOML for the schema: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("host `{host}`: {metric} = {value} is not a used fraction in [0, 1]")]
    Range {
        host: String,
        metric: &'static str,
        value: f64,
    },
}

impl MetricsFile {
    pub fn parse(text: &str) -> Result<Self, MetricsError> {
        let file: MetricsFile = toml::from_str(text)?;
        for (host, m) in &file.host {
            if let Some((metric, value)) = m.out_of_range() {
                return Err(MetricsError::Range {
                    host: host.clone(),
                    metric: metric.name(),
                    value,
                });
            }
        }
        Ok(file)
    }

    pub fn get(&self, host: &str) -> HostMetrics {
        self.host.get(host).copied().unwrap_or_default()
    }

    /// This file with `reported` values laid over it: per host and metric, a
    /// reported value wins; a metric the report lacks keeps the file's value.
    /// (The caller passes only reports it considers fresh.)
    #[must_use]
    pub fn overlaid(&self, reported: &BTreeMap<String, HostMetrics>) -> MetricsFile {
        let mut out = self.clone();
        for (host, r) in reported {
            let m = out.host.entry(host.clone()).or_default();
            *m = r.or(*m);
        }
        out
    }
}

/// Construction cost of the image on one candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CandidateCost {
    pub total_cost: f64,
    pub blocks_fetched: u64,
    pub blocks_local: u64,
}

/// One candidate and its cost, or why the image cannot be built there.
#[derive(Debug)]
pub struct Candidate {
    pub host: String,
    pub cost: Result<CandidateCost, PlanError>,
}

/// Candidates in increasing construction cost (ties by host name), those that
/// cannot be constructed last (by host name).
#[derive(Debug)]
pub struct Placement {
    pub candidates: Vec<Candidate>,
}

/// Cost every candidate (duplicates dropped) and sort them.
pub fn place(
    image: &ImageHolders,
    graph: &Graph,
    candidates: &[String],
) -> Result<Placement, PlanError> {
    if candidates.is_empty() {
        return Err(PlanError::NoCandidates);
    }
    let mut names: Vec<&str> = Vec::with_capacity(candidates.len());
    let mut seen = std::collections::HashSet::new();
    for c in candidates {
        if seen.insert(c.as_str()) {
            names.push(c);
        }
    }
    let twins = TwinClasses::of(graph);
    let classes = ClassGroups::of(image, &twins);

    // Which candidate nodes hold which groups (only those are corrected to cost 0).
    let nodes: Vec<Option<NodeId>> = names.iter().map(|n| graph.node_id(n)).collect();
    let mut is_candidate = vec![false; graph.node_count()];
    for n in nodes.iter().flatten() {
        is_candidate[*n as usize] = true;
    }
    let mut held_by: HashMap<NodeId, Vec<u32>> = HashMap::new();
    for (g, group) in image.groups().enumerate() {
        for &h in group.holders {
            if is_candidate[h as usize] {
                held_by.entry(h).or_default().push(g as u32);
            }
        }
    }

    let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if let Some(n) = n {
            by_class.entry(twins.class_of(*n)).or_default().push(i);
        }
    }
    let mut costs: Vec<Option<Result<CandidateCost, PlanError>>> =
        (0..names.len()).map(|_| None).collect();
    for (i, n) in nodes.iter().enumerate() {
        if n.is_none() {
            costs[i] = Some(Err(PlanError::UnknownHost(names[i].to_owned())));
        }
    }
    let distinct = image.blocks.distinct.len() as u64;
    for members in by_class.values() {
        let Some(rep) = nodes[members[0]] else {
            continue;
        };
        let min_cost = classes.min_costs(graph, &twins, rep);
        let mut base = CostTally::new();
        for (cg, &blocks) in classes.blocks.iter().enumerate() {
            base.add(min_cost[cg], blocks);
        }
        for &i in members {
            let Some(node) = nodes[i] else { continue };
            let mut tally = base.clone();
            let mut local = 0u64;
            let held = held_by.get(&node).map_or(&[][..], |v| v.as_slice());
            for &g in held {
                let n = image.group(g).blocks.len() as u64;
                tally.remove(min_cost[classes.of_group[g as usize] as usize], n);
                local += n;
            }
            costs[i] = Some(if tally.unreachable() > 0 {
                let failing = (0..image.group_count() as u32).filter(|&g| {
                    min_cost[classes.of_group[g as usize] as usize].is_infinite()
                        && held.binary_search(&g).is_err()
                });
                let (block, more) = image
                    .first_block_of(failing)
                    .expect("an unreachable count implies a failing group");
                Err(unreachable_error(image, block, more, names[i]))
            } else {
                Ok(CandidateCost {
                    total_cost: tally.total(),
                    blocks_fetched: distinct - local,
                    blocks_local: local,
                })
            });
        }
    }
    let mut out: Vec<Candidate> = names
        .iter()
        .zip(costs)
        .map(|(host, cost)| Candidate {
            host: (*host).to_owned(),
            cost: cost.unwrap_or_else(|| Err(PlanError::UnknownHost((*host).to_owned()))),
        })
        .collect();
    sort_candidates(&mut out);
    Ok(Placement { candidates: out })
}

/// [`place`] with each distinct block priced by its probability of being read
/// (`weights`, in [`super::image::ImageBlocks::distinct`] order; a missing
/// weight counts as 1): the expected cost of building the image on demand,
/// where a block nobody reads never crosses a link (the seed's usage-weighted
/// cost). `blocks_fetched` and `blocks_local` still count every block.
pub fn place_weighted(
    image: &ImageHolders,
    graph: &Graph,
    candidates: &[String],
    weights: &[f64],
) -> Result<Placement, PlanError> {
    if candidates.is_empty() {
        return Err(PlanError::NoCandidates);
    }
    let mut seen = std::collections::HashSet::new();
    let names: Vec<&str> = candidates
        .iter()
        .map(String::as_str)
        .filter(|c| seen.insert(*c))
        .collect();
    let group_weight: Vec<f64> = image
        .groups()
        .map(|g| {
            g.blocks
                .iter()
                .map(|&b| weights.get(b as usize).copied().unwrap_or(1.0))
                .sum()
        })
        .collect();
    let distinct = image.blocks.distinct.len() as u64;
    let mut out: Vec<Candidate> = names
        .iter()
        .map(|&name| {
            let Some(node) = graph.node_id(name) else {
                return Candidate {
                    host: name.to_owned(),
                    cost: Err(PlanError::UnknownHost(name.to_owned())),
                };
            };
            let paths = graph.shortest_paths(node);
            let (mut total, mut local) = (0.0f64, 0u64);
            let mut failing = Vec::new();
            for (g, group) in image.groups().enumerate() {
                if group.holders.contains(&node) {
                    local += group.blocks.len() as u64;
                    continue;
                }
                let cheapest = group
                    .holders
                    .iter()
                    .map(|&h| paths.dist[h as usize])
                    .fold(f64::INFINITY, f64::min);
                if cheapest.is_infinite() {
                    failing.push(g as u32);
                } else {
                    total += cheapest * group_weight[g];
                }
            }
            let cost = if let Some((block, more)) = image.first_block_of(failing) {
                Err(unreachable_error(image, block, more, name))
            } else {
                Ok(CandidateCost {
                    total_cost: total,
                    blocks_fetched: distinct - local,
                    blocks_local: local,
                })
            };
            Candidate {
                host: name.to_owned(),
                cost,
            }
        })
        .collect();
    sort_candidates(&mut out);
    Ok(Placement { candidates: out })
}

/// Increasing cost, then host name; failures last, by host name.
fn sort_candidates(c: &mut [Candidate]) {
    c.sort_by(|a, b| match (&a.cost, &b.cost) {
        (Ok(x), Ok(y)) => x
            .total_cost
            .total_cmp(&y.total_cost)
            .then_with(|| a.host.as_bytes().cmp(b.host.as_bytes())),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => a.host.as_bytes().cmp(b.host.as_bytes()),
    });
}

/// Holder groups mapped to sets of twin classes.
struct ClassGroups {
    /// Per class group: its twin classes, sorted.
    sets: Vec<Box<[u32]>>,
    /// Per class group: distinct blocks in it.
    blocks: Vec<u64>,
    /// Per holder group: its class group.
    of_group: Vec<u32>,
}

impl ClassGroups {
    fn of(image: &ImageHolders, twins: &TwinClasses) -> Self {
        let mut index: HashMap<Box<[u32]>, u32, FxBuildHasher> = HashMap::default();
        let mut sets = Vec::new();
        let mut blocks = Vec::new();
        let mut of_group = Vec::with_capacity(image.group_count());
        let mut scratch: Vec<u32> = Vec::new();
        for group in image.groups() {
            scratch.clear();
            scratch.extend(group.holders.iter().map(|&h| twins.class_of(h)));
            scratch.sort_unstable();
            scratch.dedup();
            let cg = if let Some(&cg) = index.get(scratch.as_slice()) {
                cg
            } else {
                let cg = sets.len() as u32;
                index.insert(scratch.clone().into_boxed_slice(), cg);
                sets.push(scratch.clone().into_boxed_slice());
                blocks.push(0);
                cg
            };
            blocks[cg as usize] += group.blocks.len() as u64;
            of_group.push(cg);
        }
        ClassGroups {
            sets,
            blocks,
            of_group,
        }
    }

    /// For a candidate `rep`, per class group: the cheapest path cost from a holder
    /// other than `rep` itself (identical for every twin of `rep`).
    fn min_costs(&self, graph: &Graph, twins: &TwinClasses, rep: NodeId) -> Vec<f64> {
        let paths = graph.shortest_paths(rep);
        let class_cost: Vec<f64> = (0..twins.class_count() as u32)
            .map(|k| {
                twins
                    .members(k)
                    .iter()
                    .find(|&&m| m != rep)
                    // A class of `rep` alone: only `rep` holds it, at cost 0.
                    .map_or(0.0, |&m| paths.dist[m as usize])
            })
            .collect();
        self.sets
            .iter()
            .map(|set| {
                set.iter()
                    .map(|&k| class_cost[k as usize])
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    }
}

impl Placement {
    /// The buildable candidates in the order `policy` prefers them (its pick
    /// first, none when no candidate can be built): `best`
    /// by cost; `top:X:M` the X cheapest by metric M, then the rest by cost;
    /// `within:P%:M` those within P% of the cheapest by M, then the rest by
    /// cost. Unknown metrics rank after known ones; ties keep cost order.
    pub fn ranking(&self, policy: Policy, metrics: &MetricsFile) -> Vec<usize> {
        let ok: Vec<(usize, f64)> = self
            .candidates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.cost.as_ref().ok().map(|k| (i, k.total_cost)))
            .collect();
        let Some(&(_, cheapest)) = ok.first() else {
            return Vec::new();
        };
        let (eligible, metric) = match policy {
            Policy::Best => return ok.iter().map(|&(i, _)| i).collect(),
            Policy::Top { count, metric } => (count.min(ok.len()), metric),
            Policy::Within { percent, metric } => {
                // A relative tolerance so that float noise does not exclude a tie.
                let limit = cheapest * (1.0 + percent / 100.0) * (1.0 + 1e-12);
                (ok.iter().take_while(|&&(_, c)| c <= limit).count(), metric)
            }
        };
        let mut head: Vec<usize> = ok[..eligible].iter().map(|&(i, _)| i).collect();
        head.sort_by(|&a, &b| {
            let ma = metrics.get(&self.candidates[a].host).get(metric);
            let mb = metrics.get(&self.candidates[b].host).get(metric);
            match (ma, mb) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            }
            .then(a.cmp(&b))
        });
        head.extend(ok[eligible..].iter().map(|&(i, _)| i));
        head
    }

    /// The JSON report (`docs/planner.md`).
    pub fn report(&self, image: &str, policy: Policy, metrics: &MetricsFile) -> PlaceReport {
        let ranking = self.ranking(policy, metrics);
        PlaceReport {
            image: image.to_owned(),
            policy: policy.to_string(),
            chosen: ranking.first().map(|&i| self.candidates[i].host.clone()),
            ranked: ranking.iter().map(|&i| self.candidates[i].host.clone()).collect(),
            candidates: self
                .candidates
                .iter()
                .map(|c| {
                    let m = metrics.get(&c.host);
                    let ok = c.cost.as_ref().ok();
                    CandidateReport {
                        host: c.host.clone(),
                        total_cost: ok.map(|k| k.total_cost),
                        blocks_fetched: ok.map(|k| k.blocks_fetched),
                        blocks_local: ok.map(|k| k.blocks_local),
                        cpu: m.cpu,
                        mem: m.mem,
                        disk: m.disk,
                        error: c.cost.as_ref().err().map(std::string::ToString::to_string),
                        bytes_by_class: std::collections::BTreeMap::new(),
                    }
                })
                .collect(),
        }
    }
}

/// `plan place --json` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlaceReport {
    pub image: String,
    pub policy: String,
    pub chosen: Option<String>,
    /// The buildable candidates in the policy's order (`chosen` first); the
    /// console's ranking. `candidates` stay in cost order.
    #[serde(default)]
    pub ranked: Vec<String>,
    pub candidates: Vec<CandidateReport>,
}

/// One candidate in [`PlaceReport`]; costs are null when it cannot be built.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CandidateReport {
    pub host: String,
    pub total_cost: Option<f64>,
    pub blocks_fetched: Option<u64>,
    pub blocks_local: Option<u64>,
    pub cpu: Option<f64>,
    pub mem: Option<f64>,
    pub disk: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of the distinct non-zero blocks by the class of the source a
    /// build here would take them from (`self`, `cache`, `rack`,
    /// `other_rack`, `library`); filled by the manager for the top
    /// candidates, empty otherwise.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bytes_by_class: std::collections::BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::super::construct::construct;
    use super::super::construct::tests::{dc, plan};
    use super::super::testutil::*;
    use super::super::MemoryIndex;
    use super::*;
    use crate::cost::paths::tests::topo;
    use crate::cost::CostMatrix;
    use crate::index::Manifest;
    use proptest::prelude::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(std::string::ToString::to_string).collect()
    }

    fn placed(m: &Manifest, idx: &MemoryIndex, cands: &[&str]) -> Placement {
        let g = Graph::from_topology(&dc());
        let image = ImageHolders::resolve(m, idx, &g).unwrap();
        place(&image, &g, &names(cands)).unwrap()
    }

    #[test]
    fn policies_parse_and_print() {
        assert_eq!("best".parse(), Ok(Policy::Best));
        assert_eq!(
            "top:3:cpu".parse(),
            Ok(Policy::Top {
                count: 3,
                metric: Metric::Cpu
            })
        );
        let w: Policy = "within:12.5%:disk".parse().unwrap();
        assert_eq!(w.to_string(), "within:12.5%:disk");
        assert_eq!(
            "within:10:mem".parse::<Policy>().unwrap().to_string(),
            "within:10%:mem"
        );
        assert!(matches!(
            "top:0:cpu".parse::<Policy>(),
            Err(PolicyError::Count(_))
        ));
        assert!(matches!(
            "top:2:gpu".parse::<Policy>(),
            Err(PolicyError::Metric(_))
        ));
        assert!(matches!(
            "within:-1%:cpu".parse::<Policy>(),
            Err(PolicyError::Percent(_))
        ));
        assert!(matches!(
            "cheapest".parse::<Policy>(),
            Err(PolicyError::Syntax(_))
        ));
    }

    #[test]
    fn metrics_file_schema() {
        let m =
            MetricsFile::parse("[host.h1]\ncpu = 0.5\n[host.\"h-2\"]\nmem = 0.25\ndisk = 1.0\n")
                .unwrap();
        assert_eq!(m.get("h1").cpu, Some(0.5));
        assert_eq!(m.get("h-2").mem, Some(0.25));
        assert_eq!(m.get("nobody"), HostMetrics::default());
        assert!(matches!(
            MetricsFile::parse("[host.h1]\ncpu = 1.5\n"),
            Err(MetricsError::Range { .. })
        ));
        assert!(MetricsFile::parse("[host.h1]\ngpu = 0.5\n").is_err());
        assert!(matches!(
            MetricsFile::parse("[host.h1]\nmem = nan\n"),
            Err(MetricsError::Range { metric: "mem", .. })
        ));
    }

    #[test]
    fn reported_metrics_override_the_file_per_metric() {
        let file =
            MetricsFile::parse("[host.h1]\ncpu = 0.5\nmem = 0.5\n[host.h2]\ndisk = 0.1\n").unwrap();
        let reported = BTreeMap::from([
            (
                "h1".to_string(),
                HostMetrics {
                    cpu: Some(0.9),
                    mem: None,
                    disk: Some(0.3),
                },
            ),
            (
                "h3".to_string(),
                HostMetrics {
                    cpu: Some(0.2),
                    ..Default::default()
                },
            ),
        ]);
        let m = file.overlaid(&reported);
        assert_eq!(
            m.get("h1"),
            HostMetrics {
                cpu: Some(0.9),
                mem: Some(0.5),
                disk: Some(0.3)
            }
        );
        assert_eq!(m.get("h2"), file.get("h2"));
        assert_eq!(m.get("h3").cpu, Some(0.2));
        assert_eq!(file.overlaid(&BTreeMap::new()), file);
    }

    #[test]
    fn sorted_by_cost_then_name_failures_last() {
        // Image blocks 1, 2. h1 holds 1; lib holds both; island holds both.
        let idx = index(&[("h1", &[1]), ("lib", &[1, 2]), ("island", &[1, 2])]);
        let m = manifest("img", &[1, 2, 0], None);
        let p = placed(
            &m,
            &idx,
            &["h4", "island", "h3", "h1", "nowhere", "h2", "lib", "h1"],
        );
        let order: Vec<_> = p
            .candidates
            .iter()
            .map(|c| (c.host.as_str(), c.cost.as_ref().ok().map(|k| k.total_cost)))
            .collect();
        // lib 0; h1: block 2 from lib (4); h2: 2 (h1) + 4 (lib) = 6; h3, h4: 4 + 4.
        // island holds everything (cost 0) but is listed as built: it is a node.
        assert_eq!(
            order,
            [
                ("island", Some(0.0)),
                ("lib", Some(0.0)),
                ("h1", Some(4.0)),
                ("h2", Some(6.0)),
                ("h3", Some(8.0)),
                ("h4", Some(8.0)),
                ("nowhere", None),
            ]
        );
        let r = p.report("img", Policy::Best, &MetricsFile::default());
        assert_eq!(r.chosen.as_deref(), Some("island"));
        assert!(r.candidates[6]
            .error
            .as_ref()
            .unwrap()
            .contains("not in the topology"));
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["candidates"][6]["total_cost"].is_null());
        assert_eq!(json["candidates"][2]["blocks_local"], 1);
    }

    #[test]
    fn weights_price_blocks_by_their_read_probability() {
        // Blocks 1..=4. h1 holds 1, 2, 3 (never read); h3 holds 4 (always read).
        let idx = index(&[("h1", &[1, 2, 3]), ("h3", &[4]), ("lib", &[1, 2, 3, 4])]);
        let m = manifest("img", &[1, 2, 3, 4], None);
        let g = Graph::from_topology(&dc());
        let image = ImageHolders::resolve(&m, &idx, &g).unwrap();
        let cands = names(&["h1", "h3"]);
        let unweighted = place(&image, &g, &cands).unwrap();
        assert_eq!(unweighted.candidates[0].host, "h1", "{unweighted:?}");
        // Equal weights reproduce the unweighted costs.
        let ones = place_weighted(&image, &g, &cands, &[1.0; 4]).unwrap();
        for (a, b) in ones.candidates.iter().zip(&unweighted.candidates) {
            assert_eq!(a.host, b.host);
            assert_eq!(a.cost.as_ref().unwrap(), b.cost.as_ref().unwrap());
        }
        // A boot reads only block 4 (position 3): h3 needs nothing it reads.
        let mut history = crate::plan::AccessHistory::new("img");
        history.record_boot([3]);
        let w = history.distinct_weights(&m, &image.blocks);
        assert_eq!(w, [0.0, 0.0, 0.0, 1.0]);
        let weighted = place_weighted(&image, &g, &cands, &w).unwrap();
        assert_eq!(weighted.candidates[0].host, "h3", "{weighted:?}");
        let h3 = weighted.candidates[0].cost.as_ref().unwrap();
        assert_eq!((h3.total_cost, h3.blocks_local, h3.blocks_fetched), (0.0, 1, 3));
        // Unreachable blocks still fail, weighted or not.
        let p = place_weighted(&image, &g, &names(&["island"]), &w).unwrap();
        assert!(p.candidates[0].cost.is_err());
    }

    #[test]
    fn unreachable_candidate_names_the_offset() {
        // Block 2 only on lib: the island cannot get it.
        let idx = index(&[("lib", &[1, 2]), ("island", &[1])]);
        let p = placed(&manifest("img", &[1, 0, 2], None), &idx, &["island", "h1"]);
        assert_eq!(p.candidates[0].host, "h1");
        let err = p.candidates[1].cost.as_ref().unwrap_err().to_string();
        assert!(
            err.contains("offset 8192") && err.contains("`island`"),
            "{err}"
        );
    }

    /// Costs: lib 0, h1 4, h2 6, h3 8, h4 8 (as above, without the island);
    /// CPU: lib 0.9, h1 0.5, h2 0.1, h3 0, h4 unknown.
    fn five_hosts_by_cpu() -> (Placement, MetricsFile) {
        let idx = index(&[("h1", &[1]), ("lib", &[1, 2])]);
        let p = placed(
            &manifest("img", &[1, 2], None),
            &idx,
            &["h1", "h2", "h3", "h4", "lib"],
        );
        let metrics = MetricsFile::parse(
            "[host.lib]\ncpu = 0.9\n[host.h1]\ncpu = 0.5\n[host.h2]\ncpu = 0.1\n[host.h3]\ncpu = 0.0\n",
        )
        .unwrap();
        (p, metrics)
    }

    /// The host `policy` picks: the head of the ranking.
    fn pick_of(p: &Placement, metrics: &MetricsFile, policy: &str) -> Option<String> {
        let first = p.ranking(policy.parse().unwrap(), metrics).first().copied();
        first.map(|i| p.candidates[i].host.clone())
    }

    #[test]
    fn policy_picks_by_metric() {
        let (p, metrics) = five_hosts_by_cpu();
        let pick = |s: &str| pick_of(&p, &metrics, s).unwrap();
        assert_eq!(pick("best"), "lib");
        assert_eq!(pick("top:2:cpu"), "h1");
        assert_eq!(pick("top:3:cpu"), "h2");
        assert_eq!(pick("top:9:cpu"), "h3");
        // Unknown mem everywhere: ties keep cost order.
        assert_eq!(pick("top:3:mem"), "lib");
        // Cheapest is 0: within any % keeps only cost 0.
        assert_eq!(pick("within:50%:cpu"), "lib");
        let idx = index(&[("h1", &[1]), ("lib", &[1, 2]), ("h2", &[2])]);
        let p = placed(&manifest("img", &[1, 2], None), &idx, &["h1", "h2", "h3"]);
        // h1 2, h2 2, h3 8: within 0% keeps h1, h2.
        let metrics = MetricsFile::parse("[host.h2]\ncpu = 0.2\n[host.h3]\ncpu = 0.0\n").unwrap();
        let pick = |s: &str| pick_of(&p, &metrics, s).unwrap();
        assert_eq!(
            pick("within:0%:cpu"),
            "h2",
            "h1's cpu is unknown: ranks after h2"
        );
        assert_eq!(pick("within:300%:cpu"), "h3");
        assert_eq!(pick("within:299%:cpu"), "h2");
    }

    #[test]
    fn the_ranking_puts_the_policys_eligible_hosts_first_by_metric() {
        let (p, metrics) = five_hosts_by_cpu();
        let ranked = |s: &str| -> Vec<String> {
            let r = p.ranking(s.parse().unwrap(), &metrics);
            r.iter().map(|&i| p.candidates[i].host.clone()).collect()
        };
        assert_eq!(ranked("best"), ["lib", "h1", "h2", "h3", "h4"]);
        assert_eq!(ranked("top:3:cpu"), ["h2", "h1", "lib", "h3", "h4"]);
        // h4's cpu is unknown: after the known ones.
        assert_eq!(ranked("top:9:cpu"), ["h3", "h2", "h1", "lib", "h4"]);
        let report = p.report("img", "top:3:cpu".parse().unwrap(), &metrics);
        assert_eq!(report.chosen.as_deref(), Some("h2"));
        assert_eq!(report.ranked, ["h2", "h1", "lib", "h3", "h4"]);
        assert_eq!(report.candidates[0].host, "lib", "candidates stay in cost order");
    }

    #[test]
    fn no_buildable_candidate_chooses_nothing() {
        let idx = index(&[("lib", &[1])]);
        let p = placed(&manifest("img", &[1], None), &idx, &["island", "zzz"]);
        assert_eq!(pick_of(&p, &MetricsFile::default(), "best"), None);
        let g = Graph::from_topology(&dc());
        let image = ImageHolders::resolve(&manifest("img", &[1], None), &idx, &g).unwrap();
        assert!(matches!(
            place(&image, &g, &[]),
            Err(PlanError::NoCandidates)
        ));
    }

    #[expect(
        clippy::float_cmp,
        reason = "costs are sums of integer link weights, exact in f64"
    )]
    #[test]
    fn placement_agrees_with_construction() {
        let idx = index(&[
            ("h1", &[1, 3]),
            ("h2", &[2]),
            ("lib", &[1, 2, 3, 4]),
            ("h4", &[4]),
        ]);
        let m = manifest("img", &[1, 2, 3, 4, 4, 0], Some(7));
        let cands = ["h1", "h2", "h3", "h4", "lib", "core"];
        let p = placed(&m, &idx, &cands);
        for c in &p.candidates {
            let (r, _) = plan(&m, &idx, &c.host).unwrap();
            let k = c.cost.as_ref().unwrap();
            assert_eq!(k.total_cost, r.total_cost, "{}", c.host);
            assert_eq!(
                (k.blocks_fetched, k.blocks_local),
                (r.blocks_fetched, r.blocks_local)
            );
        }
    }

    /// Floyd-Warshall, independent of the Dijkstra under test.
    fn floyd(n: usize, links: &[(usize, usize, f64)]) -> Vec<Vec<f64>> {
        let mut d = vec![vec![f64::INFINITY; n]; n];
        for (i, row) in d.iter_mut().enumerate() {
            row[i] = 0.0;
        }
        for &(a, b, w) in links {
            d[a][b] = d[a][b].min(w);
            d[b][a] = d[b][a].min(w);
        }
        for k in 0..n {
            for i in 0..n {
                for j in 0..n {
                    if d[i][k] + d[k][j] < d[i][j] {
                        d[i][j] = d[i][k] + d[k][j];
                    }
                }
            }
        }
        d
    }

    proptest! {
        /// Random small topologies and placements: construction's total equals the
        /// brute-force optimum (every block from its cheapest holder), and placement
        /// orders candidates as sorting them by that brute-force cost does.
        #[expect(clippy::float_cmp, reason = "costs are sums of integer link weights, exact in f64")]
        #[test]
        fn construction_and_placement_match_brute_force(
            links in proptest::collection::vec((0usize..8, 0usize..8, 0u32..4), 0..16),
            holdings in proptest::collection::vec(proptest::collection::vec(0usize..8, 0..4), 1..10),
            image in proptest::collection::vec(0u8..11, 1..14),
        ) {
            let names: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
            let refs: Vec<&str> = names.iter().map(std::string::String::as_str).collect();
            let links: Vec<(usize, usize, f64)> =
                links.into_iter().filter(|(a, b, _)| a != b).map(|(a, b, w)| (a, b, f64::from(w))).collect();
            let tl: Vec<(&str, &str, f64)> = links.iter().map(|&(a, b, w)| (refs[a], refs[b], w)).collect();
            let g = Graph::from_topology(&topo(&refs, &tl));
            let d = floyd(8, &links);
            // Block k (1..=10) is held by holdings[k % len]; 0 is a zero block.
            let mut idx = MemoryIndex::new();
            for k in 1..=10u8 {
                for &host in &holdings[k as usize % holdings.len()] {
                    let id = idx.host(&names[host]);
                    idx.add_block(id, h(k));
                }
            }
            let m = manifest("img", &image, Some(1));
            let im = ImageHolders::resolve(&m, &idx, &g).unwrap();
            let mut distinct: Vec<u8> = image.iter().copied().filter(|&b| b != 0).collect();
            distinct.sort_unstable();
            distinct.dedup();
            let brute = |t: usize| -> Option<f64> {
                let mut total = 0.0;
                for &b in &distinct {
                    let best = holdings[b as usize % holdings.len()]
                        .iter()
                        .map(|&h| d[h][t])
                        .fold(f64::INFINITY, f64::min);
                    if best.is_infinite() {
                        return None;
                    }
                    total += best;
                }
                Some(total)
            };
            let m2 = CostMatrix::compute(&g);
            for (t, row) in d.iter().enumerate() {
                let paths = g.shortest_paths(t as NodeId);
                let got = construct(&im, &g, &paths).ok().map(|p| p.total_cost);
                prop_assert_eq!(got, brute(t));
                for (u, &cost) in row.iter().enumerate() {
                    prop_assert_eq!(m2.get(t as NodeId, u as NodeId), cost);
                }
            }
            let cands: Vec<String> = names.clone();
            let p = place(&im, &g, &cands).unwrap();
            let mut expect: Vec<(Option<f64>, String)> =
                (0..8).map(|t| (brute(t), names[t].clone())).collect();
            expect.sort_by(|a, b| match (a.0, b.0) {
                (Some(x), Some(y)) => x.total_cmp(&y).then(a.1.cmp(&b.1)),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => a.1.cmp(&b.1),
            });
            let got: Vec<(Option<f64>, String)> = p
                .candidates
                .iter()
                .map(|c| (c.cost.as_ref().ok().map(|k| k.total_cost), c.host.clone()))
                .collect();
            prop_assert_eq!(got, expect);
        }
    }
}
