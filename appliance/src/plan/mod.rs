//! The planner: where each block of an image comes from (VM Construction, seed
//! Table 1) and which host an image should go to (VM Placement, seed Table 2).
//!
//! - [`HolderIndex`]: what the planner needs from the block index (which hosts hold
//!   a hash), with [`MemoryIndex`] as the in-memory implementation.
//! - [`image`]: an image's distinct non-zero blocks, grouped by identical holder set.
//! - [`tally`]: cost totals that do not depend on the order blocks are visited in.
//! - [`construct`]: the cheapest source of every block for one target.
//! - [`place`]: construction cost for many candidates at once, host metrics and the
//!   selection policies.
//! - [`capacity`]: capacity-aware construction (spread blocks over sources to cut
//!   the finish time, under a link utilisation cap and a cost slack), on [`flow`].
//! - [`usage`]: on-demand mode: per-image read history, read probabilities, the
//!   prefetch order and read-ahead.
//! - [`offline`]: the `plan construct` / `plan place` commands on any store, as
//!   used by the CLI and the daemon's API.
//!
//! Hosts are the topology's nodes, named by [`crate::cost::NodeId`] (dense, in name
//! byte order). Index hosts missing from the topology are unreachable: never a
//! source, never a target.

use crate::index::BlockHash;

pub mod capacity;
pub mod construct;
pub mod flow;
pub mod image;
pub mod indexed;
#[cfg(any(test, feature = "testing"))]
pub mod memory_index;
pub mod offline;
pub mod place;
pub mod report;
pub mod tally;
pub mod usage;

pub use capacity::CapacityConfig;
#[cfg(any(test, feature = "testing"))]
pub use memory_index::MemoryIndex;
#[cfg(feature = "testing")]
pub use capacity::construct_capacity_aware;
#[cfg(feature = "testing")]
pub use construct::construct;
#[cfg(feature = "testing")]
pub use image::ImageHolders;
#[cfg(feature = "testing")]
pub use place::{place, place_weighted};
pub use place::{HostMetrics, MetricsFile, Policy};
pub use usage::{AccessHistory, ReadAhead};

/// A host as the block index numbers it: the position in [`HolderIndex::hosts`].
pub type HostId = u32;

/// A failed lookup in a block index (the store's own error, boxed).
#[derive(Debug, thiserror::Error)]
#[error("block index lookup failed: {0}")]
pub struct HolderIndexError(pub Box<dyn std::error::Error + Send + Sync>);

/// What the planner needs from the block index.
pub trait HolderIndex {
    /// Every host the index knows; a host's position in this list is its [`HostId`].
    fn hosts(&self) -> Vec<String>;
    /// Append the hosts holding `hash` to `out` (any order; duplicates allowed).
    fn holders(&self, hash: &BlockHash, out: &mut Vec<HostId>) -> Result<(), HolderIndexError>;

    /// The holders of many hashes at once, into `out` (cleared first). The default
    /// asks [`Self::holders`] per hash; a store on disk can do better in one scan
    /// (e.g. over the hashes sorted, in key order).
    fn holders_of_all(
        &self,
        hashes: &[BlockHash],
        out: &mut HolderLists,
    ) -> Result<(), HolderIndexError> {
        out.clear();
        for hash in hashes {
            self.holders(hash, &mut out.hosts)?;
            out.close_list();
        }
        Ok(())
    }
}

/// Holder lists of many hashes, stored flat: list `i` is
/// `hosts[starts[i]..starts[i + 1]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderLists {
    pub starts: Vec<usize>,
    pub hosts: Vec<HostId>,
}

impl Default for HolderLists {
    fn default() -> Self {
        HolderLists {
            starts: vec![0],
            hosts: Vec::new(),
        }
    }
}

impl HolderLists {
    pub fn clear(&mut self) {
        self.starts.clear();
        self.starts.push(0);
        self.hosts.clear();
    }

    /// End the current list: the hosts pushed since the last call form it.
    pub fn close_list(&mut self) {
        self.starts.push(self.hosts.len());
    }

    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The holders of the `i`-th hash.
    pub fn of(&self, i: usize) -> &[HostId] {
        &self.hosts[self.starts[i]..self.starts[i + 1]]
    }
}

/// Why a plan cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("host `{0}` is not in the topology")]
    UnknownHost(String),
    #[error(
        "block at offset {offset} ({hash}) is held by no host reachable from `{target}`{}",
        if *.more > 0 { format!(" (and {} more such blocks)", .more) } else { String::new() }
    )]
    Unreachable {
        offset: u64,
        hash: BlockHash,
        target: String,
        /// How many other distinct blocks are in the same case.
        more: u64,
    },
    #[error(transparent)]
    Index(#[from] HolderIndexError),
    #[error("no candidate given")]
    NoCandidates,
    #[error("capacity-aware mode: {0}")]
    Capacity(String),
    #[error("`{0}` already holds every block of the object")]
    AlreadyHeld(String),
}


#[cfg(test)]
pub(crate) mod testutil {
    //! Small builders shared by the planner's tests.
    use super::*;
    use crate::index::Manifest;

    pub fn h(n: u8) -> BlockHash {
        BlockHash([n; 32])
    }

    /// A manifest of `blocks` (0 = zero block, n = hash `h(n)`), 4 KiB blocks, the
    /// last one `tail` bytes long (`None`: full).
    pub fn manifest(image: &str, blocks: &[u8], tail: Option<u64>) -> Manifest {
        let bs = 4096u64;
        let size = blocks.len() as u64 * bs - tail.map_or(0, |t| bs - t);
        Manifest {
            image: image.into(),
            size,
            block_size: bs as u32,
            blocks: blocks.iter().map(|&b| (b != 0).then(|| h(b))).collect(),
        }
    }

    /// An index where each `(host, [block numbers])` holds those blocks.
    pub fn index(holdings: &[(&str, &[u8])]) -> MemoryIndex {
        let mut idx = MemoryIndex::new();
        for (host, blocks) in holdings {
            let id = idx.host(host);
            for &b in *blocks {
                idx.add_block(id, h(b));
            }
        }
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn memory_index_dedupes_and_finds_manifests() {
        let mut idx = MemoryIndex::new();
        let m = manifest("img", &[1, 0, 2, 1], None);
        idx.add_manifest("a", &m);
        idx.add_manifest("a", &m);
        let mut big = m.clone();
        big.block_size = 8192;
        idx.add_manifest("b", &big);
        assert_eq!(idx.hosts(), ["a", "b"]);
        let mut out = Vec::new();
        idx.holders(&h(1), &mut out).unwrap();
        assert_eq!(out, [0, 1]);
        assert_eq!(idx.hash_count(), 2);
        assert_eq!(idx.manifest("img", None).unwrap().block_size, 4096);
        assert_eq!(idx.manifest("img", Some(8192)).unwrap().block_size, 8192);
        assert!(idx.manifest("img", Some(512)).is_none());
        assert!(idx.manifest("im", None).is_none());
    }

    #[test]
    fn host_lists_spill_past_inline() {
        use super::memory_index::HostList;
        let mut l = HostList::default();
        for h in [3, 1, 3, 4, 5, 6, 7, 8, 1, 9] {
            l.insert(h);
        }
        assert_eq!(l.as_slice(), [3, 1, 4, 5, 6, 7, 8, 9]);
        assert!(matches!(l, HostList::Spilled(_)));
        let mut lists = HolderLists::default();
        let idx = index(&[("a", &[1]), ("b", &[1, 2])]);
        idx.holders_of_all(&[h(2), h(9), h(1)], &mut lists).unwrap();
        assert_eq!(lists.len(), 3);
        assert_eq!(
            (lists.of(0), lists.of(1), lists.of(2)),
            (&[1][..], &[][..], &[0, 1][..])
        );
    }
}
