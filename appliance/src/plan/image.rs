//! An image as the planner sees it: its distinct non-zero blocks (each fetched at
//! most once, however often it repeats), and those blocks grouped by identical
//! holder set, so that work per holder set is done once, not once per block.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use rustc_hash::{FxBuildHasher, FxHasher};

use super::{HolderIndex, HolderLists, PlanError};
use crate::cost::{Graph, NodeId};
use crate::index::{BlockHash, BlockHashSet, Manifest};

/// One distinct non-zero block of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistinctBlock {
    pub hash: BlockHash,
    /// Position of its first occurrence.
    pub first_index: u64,
    /// Its length in bytes (only the tail block may be short).
    pub len: u64,
}

/// An image's distinct non-zero blocks, in order of first occurrence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBlocks {
    pub image: String,
    pub block_size: u32,
    pub distinct: Vec<DistinctBlock>,
    /// Positions holding an all-zero block.
    pub zero_positions: u64,
}

/// Every position of runs `(start, count)` below `len`, in order.
pub fn positions_in(runs: &[(u32, u32)], len: usize) -> impl Iterator<Item = usize> + '_ {
    runs.iter().flat_map(move |&(start, count)| {
        let start = start as usize;
        start.min(len)..(start + count as usize).min(len)
    })
}

/// Runs `(start, count)` of sorted, distinct positions.
pub fn position_runs(positions: impl IntoIterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for p in positions {
        match out.last_mut() {
            Some((start, count)) if *start + *count == p => *count += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

impl ImageBlocks {
    pub fn of(manifest: &Manifest) -> Self {
        Self::over(manifest, 0..manifest.blocks.len())
    }

    /// The distinct non-zero blocks at `positions` (runs of `(start,
    /// count)`, sorted; positions past the manifest's end are ignored), in
    /// order of first occurrence among them: what a patch of those positions
    /// fetches. `zero_positions` counts the zero blocks among them.
    pub fn at_positions(manifest: &Manifest, positions: &[(u32, u32)]) -> Self {
        Self::over(manifest, positions_in(positions, manifest.blocks.len()))
    }

    /// The distinct non-zero blocks of `manifest` at `positions` (in
    /// range), in order of first occurrence.
    fn over(manifest: &Manifest, positions: impl Iterator<Item = usize>) -> Self {
        let mut seen = BlockHashSet::default();
        seen.reserve(positions.size_hint().0);
        let mut distinct = Vec::new();
        let mut zero_positions = 0;
        for i in positions {
            match manifest.blocks[i] {
                None => zero_positions += 1,
                Some(hash) => {
                    if seen.insert(hash) {
                        distinct.push(DistinctBlock {
                            hash,
                            first_index: i as u64,
                            len: manifest.block_len(i),
                        });
                    }
                }
            }
        }
        ImageBlocks {
            image: manifest.image.clone(),
            block_size: manifest.block_size,
            distinct,
            zero_positions,
        }
    }

    /// Byte offset of a distinct block's first occurrence.
    pub fn offset(&self, block: u32) -> u64 {
        self.distinct[block as usize].first_index * u64::from(self.block_size)
    }
}

/// 64-bit hash of a holder set.
fn set_key(set: &[NodeId]) -> u64 {
    let mut h = FxHasher::default();
    set.hash(&mut h);
    h.finish()
}

/// Holder sets interned to dense ids, stored in one pool. Keyed by a 64-bit hash
/// checked against the pool (no allocation per lookup); a set whose hash is
/// already taken by a different set lives in `overflow`.
struct SetInterner {
    by_hash: HashMap<u64, u32, FxBuildHasher>,
    overflow: HashMap<Vec<NodeId>, u32, FxBuildHasher>,
    /// Set `i` is `pool[start[i]..start[i + 1]]`.
    start: Vec<u32>,
    pool: Vec<NodeId>,
}

impl Default for SetInterner {
    fn default() -> Self {
        SetInterner {
            by_hash: HashMap::default(),
            overflow: HashMap::default(),
            start: vec![0],
            pool: Vec::new(),
        }
    }
}

impl SetInterner {
    fn get(&self, id: u32) -> &[NodeId] {
        &self.pool[self.start[id as usize] as usize..self.start[id as usize + 1] as usize]
    }

    /// The id of `set`, whose hash is `key`.
    fn intern(&mut self, set: &[NodeId], key: u64) -> u32 {
        let existing = match self.by_hash.get(&key) {
            Some(&id) if self.get(id) == set => Some(id),
            Some(_) => self.overflow.get(set).copied(),
            None => None,
        };
        if let Some(id) = existing {
            return id;
        }
        let id = (self.start.len() - 1) as u32;
        match self.by_hash.entry(key) {
            Entry::Vacant(v) => {
                v.insert(id);
            }
            Entry::Occupied(_) => {
                self.overflow.insert(set.to_vec(), id);
            }
        }
        self.pool.extend_from_slice(set);
        self.start.push(self.pool.len() as u32);
        id
    }
}

/// Distinct blocks sharing one holder set (a view into [`ImageHolders`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HolderGroup<'a> {
    /// Topology nodes holding these blocks: sorted, distinct (possibly empty).
    pub holders: &'a [NodeId],
    /// Indices into [`ImageBlocks::distinct`], ascending.
    pub blocks: &'a [u32],
    pub bytes: u64,
}

/// An image with its holders resolved against the index and the topology. Groups
/// are stored flat (one pool of holders, one of blocks, with offsets per group):
/// a million-block image has hundreds of thousands of groups, and one allocation
/// per group would cost more than the planning itself.
#[derive(Clone, Debug)]
pub struct ImageHolders {
    pub blocks: ImageBlocks,
    /// Per distinct block: its group.
    #[cfg(test)]
    pub group_of: Vec<u32>,
    /// Index hosts that hold some block of the image but are not in the topology.
    #[cfg(test)]
    pub hosts_outside_topology: Vec<String>,
    holder_start: Vec<u32>,
    holder_pool: Vec<NodeId>,
    block_start: Vec<u32>,
    block_pool: Vec<u32>,
    group_bytes: Vec<u64>,
}

impl ImageHolders {
    /// Look up the holders of every distinct block and group the blocks by holder
    /// set (keeping only holders that are topology nodes).
    pub fn resolve(
        manifest: &Manifest,
        index: &dyn HolderIndex,
        graph: &Graph,
    ) -> Result<Self, PlanError> {
        Self::resolve_blocks(ImageBlocks::of(manifest), index, graph)
    }

    /// [`Self::resolve`] for a given set of distinct blocks (a patch's:
    /// [`ImageBlocks::at_positions`]).
    pub fn resolve_blocks(
        blocks: ImageBlocks,
        index: &dyn HolderIndex,
        graph: &Graph,
    ) -> Result<Self, PlanError> {
        let host_names = index.hosts();
        let to_node: Vec<Option<NodeId>> = host_names.iter().map(|n| graph.node_id(n)).collect();
        let mut outside_seen = vec![false; host_names.len()];
        let hashes: Vec<BlockHash> = blocks.distinct.iter().map(|d| d.hash).collect();
        let mut lists = HolderLists::default();
        index.holders_of_all(&hashes, &mut lists)?;
        drop(hashes);

        let mut sets = SetInterner::default();
        let mut group_of = Vec::with_capacity(blocks.distinct.len());
        let mut set: Vec<NodeId> = Vec::new();
        for i in 0..blocks.distinct.len() {
            set.clear();
            for &host in lists.of(i) {
                match to_node.get(host as usize).copied().flatten() {
                    Some(node) => set.push(node),
                    None => {
                        if let Some(seen) = outside_seen.get_mut(host as usize) {
                            *seen = true;
                        }
                    }
                }
            }
            set.sort_unstable();
            set.dedup();
            let g = sets.intern(&set, set_key(&set));
            group_of.push(g);
        }
        drop(lists);
        let SetInterner {
            start: holder_start,
            pool: holder_pool,
            ..
        } = sets;
        let groups = holder_start.len() - 1;

        // Blocks per group, by counting sort (keeps each group's blocks ascending).
        let mut block_start = vec![0u32; groups + 1];
        let mut group_bytes = vec![0u64; groups];
        for (i, &g) in group_of.iter().enumerate() {
            block_start[g as usize + 1] += 1;
            group_bytes[g as usize] += blocks.distinct[i].len;
        }
        for g in 0..groups {
            block_start[g + 1] += block_start[g];
        }
        let mut fill = block_start.clone();
        let mut block_pool = vec![0u32; group_of.len()];
        for (i, &g) in group_of.iter().enumerate() {
            block_pool[fill[g as usize] as usize] = i as u32;
            fill[g as usize] += 1;
        }

        #[cfg(test)]
        let hosts_outside_topology = host_names
            .into_iter()
            .zip(outside_seen)
            .filter_map(|(n, seen)| seen.then_some(n))
            .collect();
        Ok(ImageHolders {
            blocks,
            #[cfg(test)]
            group_of,
            #[cfg(test)]
            hosts_outside_topology,
            holder_start,
            holder_pool,
            block_start,
            block_pool,
            group_bytes,
        })
    }

    pub fn group_count(&self) -> usize {
        self.holder_start.len() - 1
    }

    pub fn group(&self, g: u32) -> HolderGroup<'_> {
        let g = g as usize;
        HolderGroup {
            holders: &self.holder_pool
                [self.holder_start[g] as usize..self.holder_start[g + 1] as usize],
            blocks: &self.block_pool
                [self.block_start[g] as usize..self.block_start[g + 1] as usize],
            bytes: self.group_bytes[g],
        }
    }

    /// Every group, in id order.
    pub fn groups(&self) -> impl ExactSizeIterator<Item = HolderGroup<'_>> + '_ {
        (0..self.group_count() as u32).map(|g| self.group(g))
    }

    /// The lowest-offset block among `groups` (for errors naming one block), and
    /// how many other distinct blocks they hold.
    pub fn first_block_of(&self, groups: impl IntoIterator<Item = u32>) -> Option<(u32, u64)> {
        let mut first: Option<u32> = None;
        let mut count = 0u64;
        for g in groups {
            let blocks = self.group(g).blocks;
            count += blocks.len() as u64;
            if let Some(&b) = blocks.first() {
                first = Some(first.map_or(b, |f| f.min(b)));
            }
        }
        first.map(|b| (b, count - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::cost::paths::tests::topo;
    use crate::index::BlockHashMap;

    #[test]
    fn distinct_blocks_zero_positions_and_tail() {
        let m = manifest("img", &[1, 0, 2, 1, 0, 3], Some(100));
        let b = ImageBlocks::of(&m);
        assert_eq!(b.zero_positions, 2);
        let firsts: Vec<_> = b.distinct.iter().map(|d| (d.first_index, d.len)).collect();
        assert_eq!(firsts, [(0, 4096), (2, 4096), (5, 100)]);
        assert_eq!(b.offset(2), 5 * 4096);
    }

    #[test]
    fn a_patch_fetches_the_distinct_blocks_at_its_positions() {
        let m = manifest("img", &[1, 0, 2, 1, 0, 3], Some(100));
        assert_eq!(position_runs([1, 2, 3, 5, 9]), [(1, 3), (5, 1), (9, 1)]);
        let runs = position_runs([1, 3, 4, 5, 9]);
        let b = ImageBlocks::at_positions(&m, &runs);
        assert_eq!(b.zero_positions, 2, "positions 1 and 4");
        let firsts: Vec<_> = b.distinct.iter().map(|d| (d.first_index, d.len)).collect();
        assert_eq!(firsts, [(3, 4096), (5, 100)], "9 is past the end");
        assert_eq!(positions_in(&[(4, 10)], 6).collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn groups_by_holder_set_and_drops_unknown_hosts() {
        let g = Graph::from_topology(&topo(&["a", "b"], &[("a", "b", 1.0)]));
        let idx = index(&[("b", &[1, 2, 3]), ("a", &[1, 2]), ("ghost", &[3, 4])]);
        let m = manifest("img", &[1, 2, 3, 4, 4], None);
        let ih = ImageHolders::resolve(&m, &idx, &g).unwrap();
        let sets: Vec<_> = ih.groups().map(|g| (g.holders, g.blocks)).collect();
        let expect: [(&[u32], &[u32]); 3] = [(&[0, 1], &[0, 1]), (&[1], &[2]), (&[], &[3])];
        assert_eq!(sets, expect);
        assert_eq!(ih.group_of, [0, 0, 1, 2]);
        assert_eq!(ih.group(0).bytes, 8192);
        assert_eq!(ih.group_count(), 3);
        assert_eq!(ih.hosts_outside_topology, ["ghost"]);
        assert_eq!(ih.first_block_of([2, 1]), Some((2, 1)));
        assert_eq!(ih.first_block_of([]), None);
    }

    #[test]
    fn interner_survives_hash_collisions() {
        let mut i = SetInterner::default();
        assert_eq!(i.intern(&[1, 2], 7), 0);
        assert_eq!(i.intern(&[3], 7), 1, "same key, other set");
        assert_eq!(i.intern(&[], 7), 2);
        assert_eq!(i.intern(&[1, 2], 7), 0);
        assert_eq!(i.intern(&[3], 7), 1);
        assert_eq!(i.intern(&[], 7), 2);
        assert_eq!(i.intern(&[4], 8), 3);
        assert_eq!(i.get(1), &[3]);
        assert_eq!(i.get(2), &[] as &[NodeId]);
    }

    #[test]
    fn fx_hasher_spreads_patterned_keys() {
        let mut m: BlockHashMap<u8> = BlockHashMap::default();
        for n in 0..=255u8 {
            m.insert(h(n), n);
        }
        assert_eq!(m.len(), 256);
        assert_eq!(m[&h(7)], 7);
    }
}
