//! The block core: answering a read of an image by byte range from blocks,
//! for any protocol front end (the iSCSI splicer's READs, the HTTP front end's
//! ranges). Given an image's manifest and a byte range it decides which blocks
//! are zero, cached, to fetch (from the cheapest holders, by cost) or left to
//! the origin, assembles the data, and learns verified blocks from what the
//! origin sends. It knows nothing of PDUs or requests.
//!
//! - [`image`]: one image served from one manifest (taint, access history,
//!   assembly, what is missing, read-ahead).
//! - [`read_plan`]: the blocks of one read: read ahead, assemble, fetch and
//!   wait, else the origin.
//! - [`learner`]: blocks learned from the origin's answer, each verified.
//! - [`BlockCore`]: what every front end shares: the cache, the sourcing, the
//!   per-read limits, prefetch.

pub mod image;
pub mod learner;
pub mod read_plan;

use std::sync::{Arc, OnceLock};

use crate::fetch::{prefetch::PrefetchPace, BlockCache, Sourcing};

pub use image::ServedImage;
pub use learner::{verify_blocks, Learner, VerifyError};
pub use read_plan::{plan_read, BlockWait, ReadPlan};

/// What every front end shares to answer reads from blocks.
#[derive(Debug)]
pub struct BlockCore {
    pub cache: Arc<BlockCache>,
    /// Learn from reads passed through (off: the cache is never filled that way).
    pub learn: bool,
    /// Reads longer than this are passed through without learning (bounds CPU).
    pub max_learn_bytes: u64,
    /// Reads longer than this are not served (`splicer.max_served_read_bytes`).
    pub max_served_read_bytes: u64,
    /// Bytes read ahead after an on-demand read (when blocks come from peers).
    pub readahead_bytes: u64,
    /// Where missing blocks are fetched from (set once the index service runs).
    sourcing: OnceLock<Arc<Sourcing>>,
    /// The prefetches' rate per link: the appliance's budget or a manager's
    /// share of it.
    pub prefetch_pace: Arc<PrefetchPace>,
}

impl BlockCore {
    pub fn new(cache: Arc<BlockCache>, learn: bool) -> BlockCore {
        BlockCore {
            cache,
            learn,
            max_learn_bytes: 64 << 20,
            max_served_read_bytes: 16 << 20,
            readahead_bytes: 8 << 20,
            sourcing: OnceLock::new(),
            prefetch_pace: Arc::new(PrefetchPace::new(1000.0)),
        }
    }

    /// Fetch missing blocks from peers through `sourcing` from now on (once).
    pub fn set_sourcing(&self, sourcing: Arc<Sourcing>) {
        let _ = self.sourcing.set(sourcing);
    }

    pub fn sourcing(&self) -> Option<&Arc<Sourcing>> {
        self.sourcing.get()
    }

    /// The read-ahead window in manifest blocks of `block_size`.
    pub fn readahead_blocks(&self, block_size: u32) -> usize {
        (self.readahead_bytes / u64::from(block_size.max(1))) as usize
    }

    /// Start prefetching `image` (named `name` in its status) in the
    /// background unless it is already running or there is no one to fetch
    /// from: in its access history's order when it has one, else image order.
    pub fn start_prefetch(&self, image: &Arc<ServedImage>, name: String) {
        let Some(sourcing) = self.sourcing().cloned() else {
            return;
        };
        {
            let mut st = image.prefetch.lock();
            if st.running {
                return;
            }
            st.running = true;
            st.lun = name;
        }
        let history = image.history();
        let positions: Vec<u64> = if history.boots > 0 {
            history.prefetch_order(&image.manifest)
        } else {
            (0..image.manifest.blocks.len() as u64).collect()
        };
        let hashes = crate::fetch::prefetch::distinct_in_order(&image.manifest.blocks, positions);
        tokio::spawn(crate::fetch::prefetch::run(
            hashes,
            image.manifest.block_size,
            sourcing,
            self.cache.clone(),
            self.prefetch_pace.clone(),
            image.prefetch.clone(),
        ));
    }
}
