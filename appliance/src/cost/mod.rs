//! Network cost: the topology (nodes, links, weights, capacities) and the cost of
//! moving a block between two nodes.
//!
//! - [`topology`]: the topology TOML schema shared by the planner, the daemon and the
//!   namespace lab (which adds its own keys under `lab` tables).
//! - [`paths`]: the topology as a weighted graph; cheapest path costs (Dijkstra).
//! - [`twins`]: hosts that are interchangeable as sources (same neighbours and
//!   weights), which lets placement evaluate one host per class.
//! - [`feed`]: live utilisation samples from this and other appliances, into [`live`].
//! - [`live`]: link utilisation turned into effective link cost, with incremental
//!   recompute of cheapest paths.

pub mod feed;
pub mod live;
pub mod paths;
pub mod topology;
pub mod twins;

pub use live::{LiveCostError, LiveCosts};
#[cfg(test)]
pub use live::LiveCostConfig;
pub use paths::{Graph, NodeId, ShortestPaths};
#[cfg(test)]
pub use paths::CostMatrix;
pub use topology::{Role, Topology, TopologyError};
pub use twins::TwinClasses;
