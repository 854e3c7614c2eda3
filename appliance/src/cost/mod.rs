//! Network cost: the topology (nodes, links, weights, capacities) and the cost of
//! moving a block between two nodes.
//!
//! - [`topology`]: the topology TOML schema shared by the planner, the daemon and the
//!   namespace lab (which adds its own keys under `lab` tables).

pub mod topology;

pub use topology::{Link, Node, Role, Topology, TopologyError};
