//! The planner over the persistent block index: [`IndexedStore`] adapts any
//! [`BlockStore`] (the redb store today, a distributed one later) to
//! [`HolderIndex`] + [`PlanStore`]. A host that indexed an image, or any of its
//! blocks, holds them.

use std::{collections::HashMap, sync::Arc};

use super::{offline::PlanStore, HolderIndex, HolderIndexError, HolderLists, HostId};
use crate::index::{BlockHash, BlockStore, Manifest};

pub struct IndexedStore<S> {
    store: S,
    hosts: Vec<String>,
    ids: HashMap<Arc<str>, HostId>,
}

impl<S: BlockStore> IndexedStore<S> {
    /// Snapshot the store's host list (host ids are positions in it).
    pub fn new(store: S) -> Result<Self, HolderIndexError> {
        let mut hosts: Vec<String> = store
            .images()
            .map_err(|e| HolderIndexError(e.into()))?
            .into_iter()
            .map(|i| i.host)
            .collect();
        hosts.sort();
        hosts.dedup();
        let ids = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (Arc::from(h.as_str()), i as HostId))
            .collect();
        Ok(Self { store, hosts, ids })
    }
}

impl<S: BlockStore> HolderIndex for IndexedStore<S> {
    fn hosts(&self) -> Vec<String> {
        self.hosts.clone()
    }

    fn holders(&self, hash: &BlockHash, out: &mut Vec<HostId>) -> Result<(), HolderIndexError> {
        for loc in self
            .store
            .holders(hash)
            .map_err(|e| HolderIndexError(e.into()))?
        {
            if let Some(id) = self.ids.get(&loc.host) {
                out.push(*id);
            }
        }
        Ok(())
    }

    fn holders_of_all(
        &self,
        hashes: &[BlockHash],
        out: &mut HolderLists,
    ) -> Result<(), HolderIndexError> {
        out.clear();
        let all = self
            .store
            .holders_many(hashes)
            .map_err(|e| HolderIndexError(e.into()))?;
        for locs in all {
            for loc in locs {
                if let Some(id) = self.ids.get(&loc.host) {
                    out.hosts.push(*id);
                }
            }
            out.close_list();
        }
        Ok(())
    }
}

impl<S: BlockStore> PlanStore for IndexedStore<S> {
    fn manifest(
        &self,
        image: &str,
        block_size: Option<u32>,
    ) -> Result<Option<Manifest>, HolderIndexError> {
        self.store
            .manifest(image, block_size)
            .map_err(|e| HolderIndexError(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        index::{Change, RedbStore, StoreOptions},
        plan::offline::{construct_report, ConstructRequest},
    };

    fn manifest(image: &str, blocks: Vec<Option<BlockHash>>) -> Manifest {
        Manifest {
            image: image.into(),
            size: blocks.len() as u64 * 4096,
            block_size: 4096,
            blocks,
        }
    }

    /// The adapter answers the planner from a real redb store: holders by host,
    /// the image's manifest, and a construction over them.
    #[test]
    fn plans_from_a_redb_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("i.redb"), StoreOptions::default()).unwrap();
        let (a, b, c) = (
            BlockHash::of(b"a"),
            BlockHash::of(b"b"),
            BlockHash::of(b"c"),
        );
        store
            .apply(&[
                Change::PutImage {
                    host: "lib".into(),
                    manifest: manifest("img", vec![Some(a), Some(b), None, Some(c)]),
                },
                Change::PutImage {
                    host: "hv2".into(),
                    manifest: manifest("other", vec![Some(b)]),
                },
            ])
            .unwrap();
        let idx = IndexedStore::new(store).unwrap();
        assert_eq!(idx.hosts(), ["hv2", "lib"]);
        let mut out = Vec::new();
        idx.holders(&b, &mut out).unwrap();
        out.sort_unstable();
        assert_eq!(out, [0, 1]);
        let topo = crate::cost::Topology::parse(
            "[[node]]\nname=\"lib\"\nrole=\"library\"\n[[node]]\nname=\"sw\"\nrole=\"switch\"\n\
             [[node]]\nname=\"hv1\"\nrole=\"hypervisor\"\n[[node]]\nname=\"hv2\"\nrole=\"hypervisor\"\n\
             [[link]]\na=\"lib\"\nb=\"sw\"\nweight=5\n[[link]]\na=\"sw\"\nb=\"hv1\"\n[[link]]\na=\"sw\"\nb=\"hv2\"\n",
        )
        .unwrap();
        let r = construct_report(
            &idx,
            &topo,
            &ConstructRequest {
                image: "img".into(),
                target: "hv1".into(),
                block_size: None,
                capacity: None,
                list_blocks: false,
                history: None,
            },
        )
        .unwrap();
        let json = serde_json::to_value(&r).unwrap();
        // a, c from lib (6 each); b from hv2 (2).
        assert_eq!(json["total_cost"], 14.0, "{json}");
        assert_eq!(json["blocks_zero"], 1);
        assert_eq!(json["by_source"]["hv2"]["blocks"], 1);
    }
}
