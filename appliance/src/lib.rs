//! nearblock: an in-path appliance that builds VM images from the nearest copies of
//! their blocks.
//!
//! # Layout
//! The data path in the order a packet meets it:
//! - [`cost`]: the topology and network cost between nodes.
//! - [`index`]: images as manifests of blake3-named blocks.
//! - [`plan`]: the planner: block sources for a target, and placement of images.
//! - [`splice`]: the splicer (iSCSI text parsing today).
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod cost;
pub mod index;
pub mod plan;
pub mod splice;
