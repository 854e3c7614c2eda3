//! The inventory: library images, hosts and their VMs, assembled from the
//! global index (every host's indexed images) and the agents' reports (VMs,
//! load, resources) that travel up the indexer tree. Pure: the caller hands in
//! what it read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    cost::{topology::Role, Topology},
    hypervisor::{vm_image_name, VmState},
    index::store::ImageInfo,
    peer::{hosts::ReportView, proto::HostResources},
};

/// An image of the library (what can be placed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageEntry {
    pub image: String,
    pub host: String,
    pub size: u64,
    pub block_size: u32,
    pub blocks: u64,
    pub zero_blocks: u64,
}

/// A hypervisor host as placement sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostEntry {
    pub host: String,
    pub rack: Option<String>,
    /// Its agent reports (within the staleness limit).
    pub reporting: bool,
    pub cpu: Option<f64>,
    pub mem: Option<f64>,
    pub disk: Option<f64>,
    pub resources: HostResources,
    pub vms: usize,
}

/// A VM on a hypervisor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmEntry {
    pub name: String,
    pub host: String,
    pub rack: Option<String>,
    pub image: Option<String>,
    pub size: u64,
    pub state: VmState,
    /// Its disk is in the global index (as `vm/<name>` of its host).
    pub indexed: bool,
    /// Share of its distinct non-zero blocks that another host also holds
    /// (`None` until indexed).
    pub held_elsewhere: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Inventory {
    pub images: Vec<ImageEntry>,
    pub hosts: Vec<HostEntry>,
    pub vms: Vec<VmEntry>,
    /// Who logged in to which target, as this appliance saw it.
    pub discovery: Vec<crate::classify::Discovery>,
}

/// Per (host, image name): the share of its distinct blocks another host holds.
pub type Shares = BTreeMap<(String, String), f64>;

/// The rack of `host`: its neighbour in the topology that is an appliance.
pub fn rack_of(topology: &Topology, host: &str) -> Option<String> {
    topology
        .neighbours(host)
        .map(|(_, other)| other)
        .find(|other| topology.node(other).is_some_and(|n| n.role == Role::Appliance))
        .map(str::to_owned)
}

/// Assembles the inventory. `reports`: the freshest report per host with
/// whether it is fresh; `held_elsewhere`: per (host, image name) the share the
/// caller computed.
pub fn assemble(
    topology: &Topology,
    images: &[ImageInfo],
    reports: &[(ReportView, bool)],
    held_elsewhere: &Shares,
) -> Inventory {
    let role = |n: &str| topology.nodes.iter().find(|x| x.name == n).map(|x| x.role);
    // One entry per library image, at its smallest block size.
    let mut lib: BTreeMap<(String, String), ImageEntry> = BTreeMap::new();
    for i in images.iter().filter(|i| role(&i.host) == Some(Role::Library)) {
        let e = lib
            .entry((i.image.clone(), i.host.clone()))
            .or_insert_with(|| ImageEntry {
                image: i.image.clone(),
                host: i.host.clone(),
                size: i.size,
                block_size: i.block_size,
                blocks: i.blocks,
                zero_blocks: i.zero_blocks,
            });
        if i.block_size < e.block_size {
            e.block_size = i.block_size;
            e.blocks = i.blocks;
            e.zero_blocks = i.zero_blocks;
        }
    }
    let indexed = |host: &str, image: &str| images.iter().any(|i| i.host == host && i.image == image);
    let mut hosts = Vec::new();
    let mut vms = Vec::new();
    for n in topology.nodes.iter().filter(|n| n.role == Role::Hypervisor) {
        let report = reports.iter().find(|(r, _)| r.host == n.name);
        let rack = rack_of(topology, &n.name);
        hosts.push(HostEntry {
            host: n.name.clone(),
            rack: rack.clone(),
            reporting: report.is_some_and(|(_, fresh)| *fresh),
            cpu: report.and_then(|(r, _)| r.cpu),
            mem: report.and_then(|(r, _)| r.mem),
            disk: report.and_then(|(r, _)| r.disk),
            resources: report.map(|(r, _)| r.resources).unwrap_or_default(),
            vms: report.map_or(0, |(r, _)| r.vms.len()),
        });
        for vm in report.iter().flat_map(|(r, _)| &r.vms) {
            let image = vm_image_name(&vm.name);
            vms.push(VmEntry {
                name: vm.name.clone(),
                host: n.name.clone(),
                rack: rack.clone(),
                image: vm.image.clone(),
                size: vm.size,
                state: vm.state,
                indexed: indexed(&n.name, &image),
                held_elsewhere: held_elsewhere.get(&(n.name.clone(), image)).copied(),
            });
        }
    }
    Inventory {
        images: lib.into_values().collect(),
        hosts,
        vms,
        discovery: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::proto::VmReport;

    const TOPO: &str = r#"
[[node]]
name = "library"
role = "library"
[[node]]
name = "core"
role = "switch"
[[node]]
name = "rack1"
role = "appliance"
[[node]]
name = "hv1"
role = "hypervisor"
[[node]]
name = "hv2"
role = "hypervisor"
[[link]]
a = "library"
b = "core"
[[link]]
a = "core"
b = "rack1"
[[link]]
a = "rack1"
b = "hv1"
[[link]]
a = "hv2"
b = "rack1"
"#;

    fn info(host: &str, image: &str, block_size: u32) -> ImageInfo {
        ImageInfo {
            host: host.into(),
            image: image.into(),
            block_size,
            size: 1 << 20,
            blocks: (1 << 20) / u64::from(block_size),
            zero_blocks: 0,
            seq: 1,
        }
    }

    #[test]
    fn library_images_hosts_and_vms_come_together() {
        let topo: Topology = toml::from_str(TOPO).unwrap();
        let images = vec![
            info("library", "lib/1", 65536),
            info("library", "lib/1", 4096),
            info("hv1", "vm/web1", 4096),
        ];
        let report = ReportView {
            host: "hv1".into(),
            cpu: Some(0.5),
            mem: None,
            disk: None,
            age_ms: 10,
            via: "rack1".into(),
            resources: HostResources {
                disk_free_bytes: Some(5),
                ..Default::default()
            },
            vms: vec![VmReport {
                name: "web1".into(),
                image: Some("lib/1".into()),
                size: 1 << 20,
                state: VmState::Running,
            }],
        };
        let mut shares = BTreeMap::new();
        shares.insert(("hv1".to_string(), "vm/web1".to_string()), 0.75);
        let inv = assemble(&topo, &images, &[(report, true)], &shares);
        assert_eq!(inv.images.len(), 1);
        assert_eq!(inv.images[0].block_size, 4096);
        assert_eq!(inv.hosts.len(), 2);
        assert_eq!(inv.hosts[0].rack.as_deref(), Some("rack1"));
        assert!(inv.hosts[0].reporting);
        assert!(!inv.hosts[1].reporting, "hv2 sends no report");
        assert_eq!(inv.vms.len(), 1);
        assert!(inv.vms[0].indexed);
        assert_eq!(inv.vms[0].held_elsewhere, Some(0.75));
        assert_eq!(rack_of(&topo, "hv2").as_deref(), Some("rack1"));
        assert_eq!(rack_of(&topo, "library"), None, "its neighbour is a switch");
    }
}
