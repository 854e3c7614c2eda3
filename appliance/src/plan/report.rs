//! The planner's reports: what `plan construct --json` and the API print, kept
//! apart from the algorithms that fill them in (construction, capacity-aware
//! construction), so neither algorithm depends on the other for its types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one source contributes to a plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceSummary {
    /// Distinct blocks fetched from it.
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Sum of their path costs (`blocks` times the source's path cost).
    pub path_cost: f64,
}

/// `plan construct --json` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstructReport {
    pub image: String,
    pub target: String,
    pub total_cost: f64,
    pub blocks_fetched: u64,
    pub blocks_local: u64,
    pub blocks_zero: u64,
    pub by_source: BTreeMap<String, SourceSummary>,
    /// Capacity-aware mode only: finish times and link loads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<CapacityReport>,
    /// With `--list-blocks`: every non-zero block position and its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Vec<BlockSource>>,
}

/// One non-zero block position and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSource {
    pub offset: u64,
    pub hash: String,
    /// The host it is fetched from (the target itself when local).
    pub source: String,
}

/// Capacity-aware part of the construct JSON report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacityReport {
    pub util_cap: f64,
    pub cost_slack: f64,
    pub plain_total_cost: f64,
    pub finish_time_s: f64,
    pub plain_finish_time_s: f64,
    /// Links carrying bytes in either plan.
    pub links: Vec<LinkLoad>,
}

/// One link's load under the capacity-aware plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkLoad {
    pub a: String,
    pub b: String,
    pub capacity_mbps: Option<f64>,
    pub bytes: u64,
    pub plain_bytes: u64,
    /// Utilisation while the plan runs (bytes over the finish time, plus the
    /// background), for links with a capacity.
    pub utilisation: Option<f64>,
}
