//! nearblock: an in-path appliance that builds VM images from the nearest copies of
//! their blocks.
//!
//! # Layout
//! The data path in the order a packet meets it, then the planes around it:
//! - [`config`]: the daemon's TOML configuration, validated.
//! - [`datapath`]: the loaded kernel programs and their maps.
//! - [`classify`]: flows, link counters and passive discovery (XDP, seen from user space).
//! - [`steer`]: steering into the splicer: listeners, transparent upstream sockets, policy routing.
//! - [`splice`]: the splicer: accept, connect upstream, relay; the protocol
//!   front ends (iSCSI, HTTP).
//! - [`block_core`]: a read of an image by byte range answered from blocks:
//!   zero, cached, fetched from the cheapest holder, else the origin; learning.
//! - [`fetch`]: block contents for locally answered READs: cache, providers.
//! - [`index`]: images as manifests of blake3-named blocks.
//! - [`cost`]: the topology and network cost between nodes (static and live).
//! - [`plan`]: the planner: block sources for a target, and placement of images.
//! - [`hypervisor`]: the hook into a hypervisor host: its VMs, building their disks.
//! - [`peer`]: the peer protocol (blocks by hash, holders, pushes up the index
//!   tree), the agent and indexer services on it, and hosts' load reports.
//! - [`manage`]: the manager: inventory, and jobs that place and build VMs.
//! - [`api`]: HTTP status and metrics; the versioned operator API.
//! - [`state`]: the running appliance's shared state and status report.
//! - [`daemon`]: `nearblock run`, the stages wired together.
//! - [`service`]: systemd's readiness and watchdog notifications.
//! - [`cli`]: the command line, one file per subcommand.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

/// Declares the crate's internal modules: crate-private, so the compiler reports
/// dead code in them, and public only with the `testing` feature, which the lab,
/// the fuzz targets and the benches turn on to reach codecs, stores and planners
/// directly.
macro_rules! internal_modules {
    ($($(#[$attr:meta])* $name:ident;)*) => {$(
        $(#[$attr])*
        #[cfg(feature = "testing")]
        pub mod $name;
        $(#[$attr])*
        #[cfg(not(feature = "testing"))]
        pub(crate) mod $name;
    )*};
}

internal_modules! {
    config;
    datapath;
    classify;
    steer;
    splice;
    block_core;
    fetch;
    index;
    cost;
    plan;
    hypervisor;
    peer;
    manage;
    api;
    state;
    daemon;
    service;
}

/// The command line: `main.rs` dispatches into it.
pub mod cli;
#[cfg(test)]
mod layout;
