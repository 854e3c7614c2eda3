//! On-demand mode: per-image access history, the probability that each block is
//! read during a boot, and what follows from it: the prefetch order (likely and
//! early blocks first, blocks never read in past boots last) and the read-ahead
//! after an on-demand read.
//!
//! A block's probability is the share of recorded boots that read it; its mean
//! rank is the average position of its first read among a boot's distinct reads.
//! Blocks are ordered by probability (descending), then mean rank (ascending),
//! then position. Zero blocks are never fetched and never listed.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::image::ImageBlocks;
use crate::index::BlockHashMap;
use crate::index::Manifest;

/// How one block was read across the recorded boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockUsage {
    /// Boots that read the block.
    pub boots_read: u32,
    /// Sum over those boots of the rank of its first read.
    pub rank_sum: u64,
}

/// The reads of past boots of one image, by block position.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AccessHistory {
    pub image: String,
    pub boots: u32,
    /// Only blocks read at least once.
    pub blocks: BTreeMap<u64, BlockUsage>,
}

impl AccessHistory {
    pub fn new(image: &str) -> Self {
        AccessHistory {
            image: image.to_owned(),
            ..Default::default()
        }
    }

    /// Record one boot: the block positions it read, in read order (repeats are
    /// counted once, at their first read).
    pub fn record_boot(&mut self, reads: impl IntoIterator<Item = u64>) {
        let mut seen = std::collections::HashSet::new();
        let mut rank = 0u64;
        for block in reads {
            if seen.insert(block) {
                let u = self.blocks.entry(block).or_default();
                u.boots_read += 1;
                u.rank_sum += rank;
                rank += 1;
            }
        }
        self.boots += 1;
    }

    /// Share of recorded boots that read `block` (0 with no history).
    pub fn probability(&self, block: u64) -> f64 {
        match (self.boots, self.blocks.get(&block)) {
            (0, _) | (_, None) => 0.0,
            (boots, Some(u)) => f64::from(u.boots_read) / f64::from(boots),
        }
    }

    /// Mean rank of the block's first read, when it was ever read.
    pub fn mean_rank(&self, block: u64) -> Option<f64> {
        self.blocks
            .get(&block)
            .filter(|u| u.boots_read > 0)
            .map(|u| u.rank_sum as f64 / f64::from(u.boots_read))
    }

    /// Per manifest position: the read probability (0 for zero blocks).
    pub fn weights(&self, manifest: &Manifest) -> Vec<f64> {
        manifest
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if b.is_some() {
                    self.probability(i as u64)
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Non-zero block positions in prefetch order.
    pub fn prefetch_order(&self, manifest: &Manifest) -> Vec<u64> {
        let mut read: Vec<(f64, f64, u64)> = Vec::new();
        let mut never: Vec<u64> = Vec::new();
        for (i, b) in manifest.blocks.iter().enumerate() {
            if b.is_none() {
                continue;
            }
            let i = i as u64;
            match self.mean_rank(i) {
                Some(rank) => read.push((self.probability(i), rank, i)),
                None => never.push(i),
            }
        }
        read.sort_by(|x, y| {
            y.0.total_cmp(&x.0)
                .then(x.1.total_cmp(&y.1))
                .then(x.2.cmp(&y.2))
        });
        read.into_iter().map(|(_, _, i)| i).chain(never).collect()
    }

    /// Per distinct block (indices into [`ImageBlocks::distinct`]): the
    /// probability it is read, the highest of its positions' (a block read at
    /// any of its positions has to be there).
    pub fn distinct_weights(&self, manifest: &Manifest, blocks: &ImageBlocks) -> Vec<f64> {
        let id: BlockHashMap<u32> = blocks
            .distinct
            .iter()
            .enumerate()
            .map(|(i, d)| (d.hash, i as u32))
            .collect();
        let mut out = vec![0.0f64; blocks.distinct.len()];
        for &pos in self.blocks.keys() {
            let hash = manifest.blocks.get(pos as usize).copied().flatten();
            if let Some(&i) = hash.as_ref().and_then(|h| id.get(h)) {
                let w = &mut out[i as usize];
                *w = w.max(self.probability(pos));
            }
        }
        out
    }

    /// Distinct blocks (indices into [`ImageBlocks::distinct`]) in prefetch order:
    /// a hash comes at the first of its positions in that order.
    pub fn prefetch_distinct(&self, manifest: &Manifest, blocks: &ImageBlocks) -> Vec<u32> {
        let mut id: BlockHashMap<(u32, bool)> = blocks
            .distinct
            .iter()
            .enumerate()
            .map(|(i, d)| (d.hash, (i as u32, false)))
            .collect();
        let mut out = Vec::with_capacity(blocks.distinct.len());
        for pos in self.prefetch_order(manifest) {
            if let Some(hash) = manifest.blocks[pos as usize] {
                if let Some((i, done)) = id.get_mut(&hash) {
                    if !*done {
                        *done = true;
                        out.push(*i);
                    }
                }
            }
        }
        out
    }
}

/// What to read ahead after an on-demand read.
#[derive(Clone, Debug)]
pub struct ReadAhead {
    order: Vec<u64>,
    place: HashMap<u64, usize>,
    probability: Vec<f64>,
    min_probability: f64,
    /// How many of `order` are likely enough (a prefix: the order is by
    /// probability, highest first); counted once, since every READ asks.
    likely_len: usize,
}

impl ReadAhead {
    /// Read ahead only blocks with a read probability of at least `min_probability`
    /// (so never-read blocks are never read ahead).
    pub fn new(history: &AccessHistory, manifest: &Manifest, min_probability: f64) -> Self {
        let order = history.prefetch_order(manifest);
        let place = order.iter().enumerate().map(|(i, &b)| (b, i)).collect();
        let probability: Vec<f64> = order.iter().map(|&b| history.probability(b)).collect();
        let min_probability = min_probability.max(f64::MIN_POSITIVE);
        let likely_len = probability
            .iter()
            .take_while(|&&p| p >= min_probability)
            .count();
        ReadAhead {
            order,
            place,
            probability,
            min_probability,
            likely_len,
        }
    }

    /// The blocks likely enough to read ahead, in prefetch order.
    pub fn likely(&self) -> &[u64] {
        &self.order[..self.likely_len]
    }

    /// Where `block` stands in [`Self::likely`] (`None`: not likely).
    pub fn position(&self, block: u64) -> Option<usize> {
        self.place
            .get(&block)
            .copied()
            .filter(|&i| self.probability[i] >= self.min_probability)
    }

    /// After reading `block`, up to `count` blocks to fetch next: those following
    /// it in prefetch order (from the front when `block` was never read before)
    /// that are likely enough and not `present` yet.
    #[cfg(test)]
    pub fn after(&self, block: u64, count: usize, present: impl Fn(u64) -> bool) -> Vec<u64> {
        let start = match self.place.get(&block) {
            Some(&i) if self.probability[i] >= self.min_probability => i + 1,
            _ => 0,
        };
        self.order[start..]
            .iter()
            .zip(&self.probability[start..])
            .take_while(|(_, &p)| p >= self.min_probability)
            .filter(|(&b, _)| b != block && !present(b))
            .map(|(&b, _)| b)
            .take(count)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn history() -> AccessHistory {
        let mut h = AccessHistory::new("img");
        // Three boots: block 4 always first, block 2 always, block 5 once, block 0
        // twice, late. Blocks 1 and 6 never; block 3 is a zero block.
        h.record_boot([4, 2, 0, 2]);
        h.record_boot([4, 5, 2, 0]);
        h.record_boot([4, 2]);
        h
    }

    fn m() -> Manifest {
        manifest("img", &[1, 2, 3, 0, 5, 6, 7], None)
    }

    #[expect(
        clippy::float_cmp,
        reason = "the expected values are exact in binary floating point"
    )]
    #[test]
    fn probabilities_and_ranks() {
        let h = history();
        assert_eq!(h.boots, 3);
        assert_eq!(h.probability(4), 1.0);
        assert!((h.probability(0) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(h.probability(1), 0.0);
        assert_eq!(h.mean_rank(2), Some((1.0 + 2.0 + 1.0) / 3.0));
        assert_eq!(h.mean_rank(1), None);
        assert_eq!(AccessHistory::new("x").probability(0), 0.0);
        let w = h.weights(&m());
        assert_eq!(w[3], 0.0);
        assert_eq!(w[4], 1.0);
    }

    #[test]
    fn prefetch_order_likely_then_early_never_read_last() {
        let h = history();
        // 4 (p 1, rank 0), 2 (p 1, rank 1.33), 0 (p 2/3), 5 (p 1/3); then 1, 6.
        assert_eq!(h.prefetch_order(&m()), [4, 2, 0, 5, 1, 6]);
        // No history at all: position order.
        assert_eq!(
            AccessHistory::new("img").prefetch_order(&m()),
            [0, 1, 2, 4, 5, 6]
        );
    }

    #[test]
    fn prefetch_distinct_dedupes_repeated_hashes() {
        // Positions 0 and 2 share a hash; 2 is likelier, so the hash comes there.
        let man = manifest("img", &[1, 9, 1, 0, 8], None);
        let mut h = AccessHistory::new("img");
        h.record_boot([2, 4]);
        let blocks = ImageBlocks::of(&man);
        // Distinct: 0 = hash 1, 1 = hash 9, 2 = hash 8.
        assert_eq!(h.prefetch_distinct(&man, &blocks), [0, 2, 1]);
    }

    #[test]
    fn read_ahead_follows_the_order_and_skips_present() {
        let h = history();
        let ra = ReadAhead::new(&h, &m(), 0.5);
        assert_eq!(ra.likely(), [4, 2, 0]);
        assert_eq!((ra.position(2), ra.position(5)), (Some(1), None));
        assert_eq!(ra.after(4, 2, |_| false), [2, 0]);
        assert_eq!(ra.after(4, 5, |b| b == 2), [0], "5 is below 0.5");
        assert_eq!(ra.after(0, 5, |_| false), Vec::<u64>::new());
        // A never-read block: start from the front.
        assert_eq!(ra.after(6, 1, |b| b == 4), [2]);
        let serde = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<AccessHistory>(&serde).unwrap(), h);
    }
}
