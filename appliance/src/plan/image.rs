//! An image as the planner sees it: its distinct non-zero blocks (each fetched at
//! most once, however often it repeats), and those blocks grouped by identical
//! holder set, so that work per holder set is done once, not once per block.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::{HolderIndex, HostId, PlanError};
use crate::cost::{Graph, NodeId};
use crate::index::{BlockHash, Manifest};

/// Hasher for keys that are (or start with) blake3 output: the bytes are already
/// uniform, so a multiply of the first eight is enough, and much cheaper than
/// SipHash on a million keys. Not for keys an attacker chooses freely.
#[derive(Default, Clone, Copy)]
pub struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 =
            (self.0.rotate_left(29) ^ u64::from_le_bytes(word)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A hash map keyed by [`BlockHash`].
pub type BlockHashMap<V> = HashMap<BlockHash, V, BuildHasherDefault<PrehashedHasher>>;

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

impl ImageBlocks {
    pub fn of(manifest: &Manifest) -> Self {
        let mut seen: BlockHashMap<()> = BlockHashMap::default();
        seen.reserve(manifest.blocks.len());
        let mut distinct = Vec::new();
        let mut zero_positions = 0;
        for (i, block) in manifest.blocks.iter().enumerate() {
            match block {
                None => zero_positions += 1,
                Some(hash) => {
                    if seen.insert(*hash, ()).is_none() {
                        distinct.push(DistinctBlock {
                            hash: *hash,
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
        self.distinct[block as usize].first_index * self.block_size as u64
    }
}

/// Distinct blocks sharing one holder set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderGroup {
    /// Topology nodes holding these blocks: sorted, distinct (possibly empty).
    pub holders: Box<[NodeId]>,
    /// Indices into [`ImageBlocks::distinct`], ascending.
    pub blocks: Vec<u32>,
    pub bytes: u64,
}

/// An image with its holders resolved against the index and the topology.
#[derive(Clone, Debug)]
pub struct ImageHolders {
    pub blocks: ImageBlocks,
    pub groups: Vec<HolderGroup>,
    /// Per distinct block: its group.
    pub group_of: Vec<u32>,
    /// Index hosts that hold some block of the image but are not in the topology.
    pub hosts_outside_topology: Vec<String>,
}

impl ImageHolders {
    /// Look up the holders of every distinct block and group the blocks by holder
    /// set (keeping only holders that are topology nodes).
    pub fn resolve(
        manifest: &Manifest,
        index: &dyn HolderIndex,
        graph: &Graph,
    ) -> Result<Self, PlanError> {
        let blocks = ImageBlocks::of(manifest);
        let host_names = index.hosts();
        let to_node: Vec<Option<NodeId>> = host_names.iter().map(|n| graph.node_id(n)).collect();
        let mut outside_seen = vec![false; host_names.len()];
        let mut by_set: HashMap<Box<[NodeId]>, u32> = HashMap::new();
        let mut groups: Vec<HolderGroup> = Vec::new();
        let mut group_of = Vec::with_capacity(blocks.distinct.len());
        let mut raw: Vec<HostId> = Vec::new();
        let mut set: Vec<NodeId> = Vec::new();
        for (i, block) in blocks.distinct.iter().enumerate() {
            raw.clear();
            index.holders(&block.hash, &mut raw)?;
            set.clear();
            for &host in &raw {
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
            let g = match by_set.get(set.as_slice()) {
                Some(&g) => g,
                None => {
                    let g = groups.len() as u32;
                    by_set.insert(set.clone().into_boxed_slice(), g);
                    groups.push(HolderGroup {
                        holders: set.clone().into_boxed_slice(),
                        blocks: Vec::new(),
                        bytes: 0,
                    });
                    g
                }
            };
            let group = &mut groups[g as usize];
            group.blocks.push(i as u32);
            group.bytes += block.len;
            group_of.push(g);
        }
        let hosts_outside_topology = host_names
            .into_iter()
            .zip(outside_seen)
            .filter_map(|(n, seen)| seen.then_some(n))
            .collect();
        Ok(ImageHolders {
            blocks,
            groups,
            group_of,
            hosts_outside_topology,
        })
    }

    /// The lowest-offset block among `groups` (for errors naming one block), and
    /// how many other distinct blocks they hold.
    pub fn first_block_of(&self, groups: impl IntoIterator<Item = u32>) -> Option<(u32, u64)> {
        let mut first: Option<u32> = None;
        let mut count = 0u64;
        for g in groups {
            let blocks = &self.groups[g as usize].blocks;
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
    fn groups_by_holder_set_and_drops_unknown_hosts() {
        let g = Graph::from_topology(&topo(&["a", "b"], &[("a", "b", 1.0)]));
        let idx = index(&[("b", &[1, 2, 3]), ("a", &[1, 2]), ("ghost", &[3, 4])]);
        let m = manifest("img", &[1, 2, 3, 4, 4], None);
        let ih = ImageHolders::resolve(&m, &idx, &g).unwrap();
        let sets: Vec<_> = ih
            .groups
            .iter()
            .map(|g| (&*g.holders, g.blocks.clone()))
            .collect();
        assert_eq!(
            sets,
            [
                (&[0u32, 1][..], vec![0, 1]),
                (&[1][..], vec![2]),
                (&[][..], vec![3])
            ]
        );
        assert_eq!(ih.group_of, [0, 0, 1, 2]);
        assert_eq!(ih.groups[0].bytes, 8192);
        assert_eq!(ih.hosts_outside_topology, ["ghost"]);
        assert_eq!(ih.first_block_of([2, 1]), Some((2, 1)));
        assert_eq!(ih.first_block_of([]), None);
    }

    #[test]
    fn prehashed_hasher_spreads_patterned_keys() {
        let mut m: BlockHashMap<u8> = BlockHashMap::default();
        for n in 0..=255u8 {
            m.insert(h(n), n);
        }
        assert_eq!(m.len(), 256);
        assert_eq!(m[&h(7)], 7);
    }
}
