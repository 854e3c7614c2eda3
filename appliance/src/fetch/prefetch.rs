//! Prefetch mode: when a session logs in to a target with a LUN in prefetch mode,
//! warm the cache with the LUN's whole image in the background — likely blocks
//! first when the LUN has an access history, else in image order — through
//! [`Sourcing`] (each block from its cheapest holder), within a per-link bandwidth
//! budget: after every chunk, the prefetcher waits until the busiest link's bytes
//! so far, each chunk's at the rate in force when it came, have had their time.
//!
//! The rate is the appliance's [`PrefetchPace`]: its own default (the uplink's
//! `budget_mbps`, else `splicer.prefetch_budget_mbps`) unless a manager named in
//! `[splicer] managers` gave it a share of the uplink, which the manager does
//! while its builds cross that uplink (`manage::budget`).
//!
//! It stops early when the cache could not hold more without evicting what it
//! just fetched (the cache bound wins over prefetching).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use serde::{Deserialize, Serialize};

use super::{BlockCache, Sourcing};
use crate::index::BlockHash;

/// Blocks asked for per step.
const CHUNK: usize = 256;

/// One LUN's prefetch, for status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefetchStatus {
    /// `TARGET/LUN`, or an HTTP version's index name (`http:PATH@VERSION`).
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

/// How long the busiest link's new bytes take at `budget_mbps` (zero when
/// there is no budget): the pacer adds each chunk's time to what it is due.
pub fn chunk_time<S: std::hash::BuildHasher>(
    new_link_bytes: &HashMap<String, u64, S>,
    budget_mbps: f64,
) -> Duration {
    if budget_mbps <= 0.0 || !budget_mbps.is_finite() {
        return Duration::ZERO;
    }
    let busiest = new_link_bytes.values().copied().max().unwrap_or(0);
    Duration::from_secs_f64(busiest as f64 * 8.0 / (budget_mbps * 1e6))
}

/// A manager's share older than this is forgotten (the manager renews it every
/// second while its builds cross the uplink, and says when they stop).
pub const SHARE_FRESH: Duration = Duration::from_secs(5);

/// A prefetch starting while a manager's share is in force waits at most this
/// long for the manager to count it (its next poll) before it goes on at that
/// share.
pub const AWAIT_COUNT: Duration = Duration::from_secs(2);

/// The rate this appliance's prefetches may use of its uplink: its own default
/// unless a manager's share is in force. Shared by every LUN's prefetch.
#[derive(Debug)]
pub struct PrefetchPace {
    default_mbps: f64,
    state: Mutex<PaceState>,
}

#[derive(Debug, Default)]
struct PaceState {
    running: usize,
    share: Option<ManagerShare>,
}

#[derive(Clone, Copy, Debug)]
struct ManagerShare {
    mbps: f64,
    /// The manager counted this appliance's prefetching when it shared.
    counted: bool,
    at: Instant,
}

/// The pace as status shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PaceStatus {
    /// Mbit/s a prefetch may use now.
    pub budget_mbps: f64,
    /// The appliance's own budget (the uplink's, or the splicer's setting).
    pub default_mbps: f64,
    /// The budget is a manager's share of the uplink.
    pub shared_by_manager: bool,
    /// Prefetches running.
    pub running: usize,
}

impl PrefetchPace {
    pub fn new(default_mbps: f64) -> Self {
        Self {
            default_mbps,
            state: Mutex::new(PaceState::default()),
        }
    }

    fn fresh_share(st: &PaceState, now: Instant) -> Option<ManagerShare> {
        st.share.filter(|s| now.duration_since(s.at) < SHARE_FRESH)
    }

    /// Mbit/s a prefetch may use now.
    pub fn budget_mbps(&self) -> f64 {
        let st = self.state.lock();
        Self::fresh_share(&st, Instant::now()).map_or(self.default_mbps, |s| s.mbps)
    }

    pub fn status(&self) -> PaceStatus {
        let st = self.state.lock();
        let share = Self::fresh_share(&st, Instant::now());
        PaceStatus {
            budget_mbps: share.map_or(self.default_mbps, |s| s.mbps),
            default_mbps: self.default_mbps,
            shared_by_manager: share.is_some(),
            running: st.running,
        }
    }

    /// A manager's word: `bytes_per_s` (0: no share, back to the default),
    /// and whether it counted this appliance as prefetching. Returns whether a
    /// prefetch runs now (the manager counts it from then on).
    pub fn told(&self, bytes_per_s: u64, counted: bool) -> bool {
        let mut st = self.state.lock();
        st.share = (bytes_per_s > 0).then(|| ManagerShare {
            mbps: bytes_per_s as f64 * 8.0 / 1e6,
            counted,
            at: Instant::now(),
        });
        st.running > 0
    }

    /// A prefetch starts; it counts as running until the guard drops.
    pub fn begin(self: &Arc<Self>) -> PrefetchRunning {
        self.state.lock().running += 1;
        PrefetchRunning(self.clone())
    }

    /// A manager's share is in force but the manager has not counted this
    /// appliance's prefetching yet.
    fn awaiting_count(&self) -> bool {
        let st = self.state.lock();
        Self::fresh_share(&st, Instant::now()).is_some_and(|s| !s.counted)
    }
}

/// A running prefetch, as [`PrefetchPace`] counts it.
pub struct PrefetchRunning(Arc<PrefetchPace>);

impl Drop for PrefetchRunning {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.running = st.running.saturating_sub(1);
    }
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

/// Fetch `hashes` into the cache within `pace`'s budget per link.
pub async fn run(
    hashes: Vec<BlockHash>,
    block_size: u32,
    sourcing: Arc<Sourcing>,
    cache: Arc<BlockCache>,
    pace: Arc<PrefetchPace>,
    status: Arc<parking_lot::Mutex<PrefetchStatus>>,
) {
    let _running = pace.begin();
    // Under a manager's share, start once the manager has counted this
    // prefetch (its builds' shares shrink first), or after AWAIT_COUNT.
    let waited = Instant::now();
    while pace.awaiting_count() && waited.elapsed() < AWAIT_COUNT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    let mut base = sourcing.fetched_by_host();
    let mut due = Duration::ZERO;
    let budget_mbps = pace.budget_mbps();
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
        // Charge what this chunk fetched to every link on its path, at the
        // rate in force now.
        let budget_mbps = pace.budget_mbps();
        let cached = hashes.iter().filter(|h| cache.contains(h)).count() as u64;
        update(&|s| {
            s.blocks_cached = cached;
            s.budget_mbps = budget_mbps;
        });
        let ranks = sourcing.ranks();
        let now = sourcing.fetched_by_host();
        let mut links: HashMap<String, u64> = HashMap::new();
        for (host, bytes) in &now {
            let delta = bytes.saturating_sub(base.get(host).copied().unwrap_or(0));
            for link in ranks.path_links(host) {
                *links.entry(link.clone()).or_default() += delta;
            }
        }
        base = now;
        due += chunk_time(&links, budget_mbps);
        tokio::time::sleep(due.saturating_sub(start.elapsed())).await;
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
    fn a_chunk_takes_the_busiest_links_time() {
        let links = HashMap::from([("a-b".to_string(), 10_000_000u64), ("b-c".into(), 1)]);
        // 10 MB at 80 Mbit/s is 1 s.
        assert_eq!(chunk_time(&links, 80.0), Duration::from_secs(1));
        assert_eq!(chunk_time(&links, 0.0), Duration::ZERO, "no budget: no pacing");
        assert_eq!(chunk_time(&HashMap::new(), 10.0), Duration::ZERO);
    }

    #[test]
    fn a_managers_share_replaces_the_default_until_it_is_withdrawn() {
        let pace = Arc::new(PrefetchPace::new(200.0));
        assert_eq!(pace.budget_mbps().to_bits(), 200f64.to_bits());
        assert!(!pace.awaiting_count());
        // 100 Mbit/s = 12.5 MB/s, not counted yet: a prefetch starting waits.
        assert!(!pace.told(12_500_000, false), "no prefetch runs yet");
        assert_eq!(pace.budget_mbps().to_bits(), 100f64.to_bits());
        let running = pace.begin();
        assert!(pace.awaiting_count());
        assert!(pace.told(12_500_000, true), "the manager learns it runs");
        assert!(!pace.awaiting_count());
        let st = pace.status();
        assert!(st.shared_by_manager && st.running == 1, "{st:?}");
        drop(running);
        assert_eq!(pace.status().running, 0);
        // Withdrawn: the default again.
        pace.told(0, false);
        assert_eq!(pace.budget_mbps().to_bits(), 200f64.to_bits());
        assert!(!pace.status().shared_by_manager);
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
