//! Prefetch mode: when a session logs in to a target with a LUN in prefetch mode,
//! warm the cache with the LUN's whole image in the background — likely blocks
//! first when the LUN has an access history, else in image order — through
//! [`Sourcing`] (each block from its cheapest holder), within a per-link bandwidth
//! budget: after every chunk, the prefetcher waits until the bytes fetched over
//! each link since it started, divided by the elapsed time, are within the budget.
//!
//! It stops early when the cache could not hold more without evicting what it
//! just fetched (the cache bound wins over prefetching).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{BlockCache, Sourcing};
use crate::index::BlockHash;

/// Blocks asked for per step.
const CHUNK: usize = 256;

/// One LUN's prefetch, for status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefetchStatus {
    /// `TARGET/LUN`.
    pub lun: String,
    pub running: bool,
    /// Distinct non-zero blocks of the image.
    pub blocks_total: u64,
    /// Of those, in the cache when the prefetch last looked.
    pub blocks_cached: u64,
    pub budget_mbps: f64,
    pub elapsed_ms: u64,
    /// Why it stopped early, if it did.
    pub stopped: Option<String>,
}

/// How long to wait so that no link's average rate since the start exceeds the
/// budget: the busiest link's bytes at `budget_mbps` take that long, minus what
/// has already elapsed.
pub fn pacing_delay<S: std::hash::BuildHasher>(
    link_bytes: &HashMap<String, u64, S>,
    elapsed: Duration,
    budget_mbps: f64,
) -> Duration {
    if budget_mbps <= 0.0 || !budget_mbps.is_finite() {
        return Duration::ZERO;
    }
    let busiest = link_bytes.values().copied().max().unwrap_or(0);
    let needed = Duration::from_secs_f64(busiest as f64 * 8.0 / (budget_mbps * 1e6));
    needed.saturating_sub(elapsed)
}

/// The image's distinct non-zero hashes in the order given by `positions`
/// (manifest positions), each at its first position.
pub fn distinct_in_order(
    blocks: &[Option<BlockHash>],
    positions: impl IntoIterator<Item = u64>,
) -> Vec<BlockHash> {
    let mut seen = std::collections::HashSet::new();
    positions
        .into_iter()
        .filter_map(|p| blocks.get(p as usize).copied().flatten())
        .filter(|h| seen.insert(*h))
        .collect()
}

/// Fetch `hashes` into the cache within `budget_mbps` per link.
pub async fn run(
    hashes: Vec<BlockHash>,
    block_size: u32,
    sourcing: Arc<Sourcing>,
    cache: Arc<BlockCache>,
    budget_mbps: f64,
    status: Arc<parking_lot::Mutex<PrefetchStatus>>,
) {
    let start = Instant::now();
    let base = sourcing.fetched_by_host();
    let update = |f: &dyn Fn(&mut PrefetchStatus)| {
        let mut s = status.lock();
        f(&mut s);
        s.elapsed_ms = start.elapsed().as_millis() as u64;
    };
    update(&|s| {
        s.running = true;
        s.blocks_total = hashes.len() as u64;
        s.budget_mbps = budget_mbps;
        s.stopped = None;
    });
    for chunk in hashes.chunks(CHUNK) {
        let missing: Vec<BlockHash> = chunk
            .iter()
            .filter(|h| !cache.contains(h))
            .copied()
            .collect();
        let snap = cache.snapshot();
        let want = missing.len() as u64 * u64::from(block_size);
        if snap.bytes + want > snap.capacity_bytes {
            update(&|s| s.stopped = Some("the cache is full".into()));
            break;
        }
        if !missing.is_empty() {
            sourcing.fill(&missing).await;
        }
        let cached = hashes.iter().filter(|h| cache.contains(h)).count() as u64;
        update(&|s| s.blocks_cached = cached);
        // Charge what was fetched since the start to every link on its path.
        let ranks = sourcing.ranks();
        let mut links: HashMap<String, u64> = HashMap::new();
        for (host, bytes) in sourcing.fetched_by_host() {
            let delta = bytes.saturating_sub(base.get(&host).copied().unwrap_or(0));
            for link in ranks.path_links(&host) {
                *links.entry(link.clone()).or_default() += delta;
            }
        }
        tokio::time::sleep(pacing_delay(&links, start.elapsed(), budget_mbps)).await;
    }
    let cached = hashes.iter().filter(|h| cache.contains(h)).count() as u64;
    update(&|s| {
        s.running = false;
        s.blocks_cached = cached;
    });
    tracing::info!(
        blocks = hashes.len(),
        cached,
        secs = start.elapsed().as_secs_f64(),
        "prefetch finished"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_keeps_the_busiest_link_within_budget() {
        let links = HashMap::from([("a-b".to_string(), 10_000_000u64), ("b-c".into(), 1)]);
        // 10 MB at 80 Mbit/s is 1 s; 0.25 s have passed.
        assert_eq!(
            pacing_delay(&links, Duration::from_millis(250), 80.0),
            Duration::from_millis(750)
        );
        assert_eq!(
            pacing_delay(&links, Duration::from_secs(2), 80.0),
            Duration::ZERO
        );
        assert_eq!(
            pacing_delay(&links, Duration::ZERO, 0.0),
            Duration::ZERO,
            "no budget: no pacing"
        );
        assert_eq!(
            pacing_delay(&HashMap::new(), Duration::ZERO, 10.0),
            Duration::ZERO
        );
    }

    #[test]
    fn distinct_hashes_at_their_first_position() {
        let h = |i: u8| Some(BlockHash::of(&[i]));
        let blocks = [h(1), None, h(2), h(1), h(3)];
        assert_eq!(
            distinct_in_order(&blocks, [4, 3, 2, 1, 0, 9]),
            [h(3).unwrap(), h(1).unwrap(), h(2).unwrap()]
        );
    }
}
