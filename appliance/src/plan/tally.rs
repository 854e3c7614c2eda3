//! Cost totals as a histogram of per-block path costs: the total is summed in
//! increasing cost order, so two computations that see the same per-block costs
//! (construction for one target, placement over many) agree to the last bit,
//! whatever order they visited the blocks in.

use std::collections::HashMap;

/// Block counts per path cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CostTally {
    /// f64 bits of a (non-negative) cost → number of blocks at that cost.
    counts: HashMap<u64, u64>,
}

impl CostTally {
    pub fn new() -> Self {
        Self::default()
    }

    /// Count `blocks` blocks at path cost `cost` (non-negative, or infinite).
    pub fn add(&mut self, cost: f64, blocks: u64) {
        if blocks > 0 {
            // 0.0 and -0.0 are one cost.
            let cost = if cost == 0.0 { 0.0 } else { cost };
            *self.counts.entry(cost.to_bits()).or_default() += blocks;
        }
    }

    /// Take `blocks` blocks away from cost `cost` (they were counted there).
    pub fn remove(&mut self, cost: f64, blocks: u64) {
        let cost = if cost == 0.0 { 0.0 } else { cost };
        if let Some(n) = self.counts.get_mut(&cost.to_bits()) {
            *n -= blocks.min(*n);
            if *n == 0 {
                self.counts.remove(&cost.to_bits());
            }
        }
    }

    /// Blocks counted at an infinite cost (held by no reachable host).
    pub fn unreachable(&self) -> u64 {
        self.counts
            .get(&f64::INFINITY.to_bits())
            .copied()
            .unwrap_or(0)
    }

    /// Sum of `cost * blocks`, in increasing cost order.
    pub fn total(&self) -> f64 {
        let mut entries: Vec<(f64, u64)> = self
            .counts
            .iter()
            .map(|(&bits, &n)| (f64::from_bits(bits), n))
            .collect();
        entries.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Fold from +0.0: `Sum` of no f64 is -0.0, which sorts before 0.0.
        entries.iter().fold(0.0, |acc, &(c, n)| acc + c * n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_independent_total() {
        let mut a = CostTally::new();
        let mut b = CostTally::new();
        let costs = [0.1, 0.7, 0.2, 0.1, 3.3, 0.0, -0.0];
        for c in costs {
            a.add(c, 1);
        }
        for c in costs.iter().rev() {
            b.add(*c, 1);
        }
        assert_eq!(a.total().to_bits(), b.total().to_bits());
        assert_eq!(a, b);
        assert!(CostTally::new().total().is_sign_positive());
        a.remove(0.1, 2);
        assert!((a.total() - 4.2).abs() < 1e-12);
        a.add(f64::INFINITY, 2);
        assert_eq!(a.unreachable(), 2);
    }
}
