//! Zero / unique / cross-image shared fractions of a set of images at one block size.
//!
//! Definitions (the same in `tests/corpus/independent_stats.py`), per image at
//! block size B, counting block positions (a short last block is a block):
//! - `blocks` = ceil(size / B); `zero` = blocks whose bytes are all zero;
//!   `nonzero` = blocks − zero;
//! - `shared` = non-zero blocks whose name also occurs (at any offset) in at least
//!   one *other* image of the set; `unique` = nonzero − shared (a block repeated
//!   only inside its own image is unique);
//! - `zero_pct` = 100·zero/blocks; `shared_pct` = 100·shared/nonzero and
//!   `unique_pct` = 100·unique/nonzero (0 when the denominator is 0).

use std::collections::HashMap;
use std::fmt::Write as _;

use super::Manifest;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ImageStats {
    pub image: String,
    pub block_size: u32,
    pub blocks: u64,
    pub zero: u64,
    pub nonzero: u64,
    pub shared: u64,
    pub unique: u64,
    pub zero_pct: f64,
    pub shared_pct: f64,
    pub unique_pct: f64,
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

/// Stats of each manifest against the others (all must have the same block size;
/// each manifest is one image).
pub fn compute(manifests: &[&Manifest]) -> Vec<ImageStats> {
    const MANY: u32 = u32::MAX;
    // name -> the only image holding it, or MANY.
    let mut owner: HashMap<[u8; 32], u32> = HashMap::new();
    for (i, m) in manifests.iter().enumerate() {
        for h in m.blocks.iter().flatten() {
            owner
                .entry(h.0)
                .and_modify(|o| {
                    if *o != i as u32 {
                        *o = MANY;
                    }
                })
                .or_insert(i as u32);
        }
    }
    manifests
        .iter()
        .map(|m| {
            let blocks = m.blocks.len() as u64;
            let zero = m.zero_blocks() as u64;
            let nonzero = blocks - zero;
            let shared = m
                .blocks
                .iter()
                .flatten()
                .filter(|h| owner[&h.0] == MANY)
                .count() as u64;
            let unique = nonzero - shared;
            ImageStats {
                image: m.image.clone(),
                block_size: m.block_size,
                blocks,
                zero,
                nonzero,
                shared,
                unique,
                zero_pct: pct(zero, blocks),
                shared_pct: pct(shared, nonzero),
                unique_pct: pct(unique, nonzero),
            }
        })
        .collect()
}

/// A fixed-width table of `stats`.
pub fn table(stats: &[ImageStats]) -> String {
    let w = stats
        .iter()
        .map(|s| s.image.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!(
        "{:<w$} {:>6} {:>9} {:>7} {:>8} {:>8}\n",
        "image", "block", "blocks", "zero%", "unique%", "shared%"
    );
    for s in stats {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{:<w$} {:>6} {:>9} {:>7.2} {:>8.2} {:>8.2}",
            s.image,
            super::chunk::format_block_size(s.block_size),
            s.blocks,
            s.zero_pct,
            s.unique_pct,
            s.shared_pct
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::BlockHash;

    #[expect(
        clippy::float_cmp,
        reason = "the expected values are exact in binary floating point"
    )]
    #[test]
    fn fractions() {
        let h = |x: u8| Some(BlockHash([x; 32]));
        let a = Manifest {
            image: "a".into(),
            size: 5 * 4096,
            block_size: 4096,
            blocks: vec![h(1), h(1), h(2), None, h(3)],
        };
        let b = Manifest {
            image: "b".into(),
            size: 2 * 4096,
            block_size: 4096,
            blocks: vec![h(3), None],
        };
        let s = compute(&[&a, &b]);
        assert_eq!(
            (s[0].zero, s[0].nonzero, s[0].shared, s[0].unique),
            (1, 4, 1, 3)
        );
        assert_eq!(s[0].zero_pct, 20.0);
        assert_eq!(s[0].shared_pct, 25.0);
        assert_eq!((s[1].shared, s[1].unique), (1, 0));
        assert_eq!(s[1].shared_pct, 100.0);
        let empty = Manifest {
            image: "e".into(),
            size: 0,
            block_size: 4096,
            blocks: vec![],
        };
        let s = compute(&[&empty]);
        assert_eq!(s[0].zero_pct, 0.0);
        assert!(table(&s).contains("4KiB"));
    }
}
