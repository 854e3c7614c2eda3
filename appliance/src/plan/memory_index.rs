//! An in-memory block index (host names and, per hash, the hosts holding it): the
//! planner's tests and the plan bench build one directly; the daemon and the CLI
//! plan over the persistent store instead (`indexed`).

use std::collections::{BTreeMap, HashMap};

use crate::index::{BlockHash, BlockHashMap, Manifest};

use super::{HolderIndex, HolderIndexError, HostId};

/// An in-memory block index: host names and, per hash, the hosts holding it. Used
/// by tests and the bench, and as the shape the persistent store adapts to.
#[derive(Clone, Debug, Default)]
pub struct MemoryIndex {
    hosts: Vec<String>,
    host_ids: HashMap<String, HostId>,
    holders: BlockHashMap<HostList>,
    /// Manifests by (image, block size), for [`super::offline::PlanStore`].
    manifests: BTreeMap<(String, u32), Manifest>,
}

impl MemoryIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of `name`, registering it on first use.
    pub fn host(&mut self, name: &str) -> HostId {
        if let Some(&id) = self.host_ids.get(name) {
            return id;
        }
        let id = self.hosts.len() as HostId;
        self.hosts.push(name.to_owned());
        self.host_ids.insert(name.to_owned(), id);
        id
    }

    /// Record that `host` holds `hash`.
    pub fn add_block(&mut self, host: HostId, hash: BlockHash) {
        self.holders.entry(hash).or_default().insert(host);
    }

    /// Record that `host` indexed `manifest`: it holds every non-zero block, and the
    /// manifest becomes known for its image and block size.
    pub fn add_manifest(&mut self, host: &str, manifest: &Manifest) {
        let id = self.host(host);
        for hash in manifest.blocks.iter().flatten() {
            self.add_block(id, *hash);
        }
        self.manifests
            .entry((manifest.image.clone(), manifest.block_size))
            .or_insert_with(|| manifest.clone());
    }

    /// The manifest of `image` at `block_size`, or at its smallest indexed size.
    pub fn manifest(&self, image: &str, block_size: Option<u32>) -> Option<&Manifest> {
        self.manifests
            .range((image.to_owned(), 0)..=(image.to_owned(), u32::MAX))
            .find(|((_, size), _)| block_size.is_none_or(|b| b == *size))
            .map(|(_, m)| m)
    }

    /// Number of distinct hashes indexed.
    pub fn hash_count(&self) -> usize {
        self.holders.len()
    }
}

/// Holders of one hash: inline while few (the common case, one cache line with
/// the key), spilled to the heap beyond that.
#[derive(Clone, Debug)]
pub(super) enum HostList {
    Inline {
        len: u8,
        ids: [HostId; HostList::INLINE],
    },
    Spilled(Vec<HostId>),
}

impl Default for HostList {
    fn default() -> Self {
        HostList::Inline {
            len: 0,
            ids: [0; HostList::INLINE],
        }
    }
}

impl HostList {
    const INLINE: usize = 6;

    pub(super) fn as_slice(&self) -> &[HostId] {
        match self {
            HostList::Inline { len, ids } => &ids[..*len as usize],
            HostList::Spilled(v) => v,
        }
    }

    /// Add `host` unless present.
    pub(super) fn insert(&mut self, host: HostId) {
        if self.as_slice().contains(&host) {
            return;
        }
        match self {
            HostList::Inline { len, ids } if (*len as usize) < Self::INLINE => {
                ids[*len as usize] = host;
                *len += 1;
            }
            HostList::Inline { ids, .. } => {
                let mut v = ids.to_vec();
                v.push(host);
                *self = HostList::Spilled(v);
            }
            HostList::Spilled(v) => v.push(host),
        }
    }
}

impl HolderIndex for MemoryIndex {
    fn hosts(&self) -> Vec<String> {
        self.hosts.clone()
    }

    fn holders(&self, hash: &BlockHash, out: &mut Vec<HostId>) -> Result<(), HolderIndexError> {
        if let Some(h) = self.holders.get(hash) {
            out.extend_from_slice(h.as_slice());
        }
        Ok(())
    }
}
