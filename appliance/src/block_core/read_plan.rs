//! The blocks of one read of a served image, decided without the protocol
//! around it: read ahead, assemble from zero and cached blocks, else fetch what
//! is missing from peers by cost (the read waits, at most the fetch deadline),
//! else leave it to the origin. A front end calls [`plan_read`] once when a read
//! arrives and once more after its wait; it knows its protocol, this knows only
//! the image, the byte range and the block core.

use std::{future::Future, ops::Range, pin::Pin, sync::Arc};

use bytes::Bytes;

use crate::fetch::{Provenance, Sourcing};

use super::{BlockCore, ServedImage};

/// A wait for fetched blocks: resolves `true` when the deadline passed first.
pub type BlockWait = Pin<Box<dyn Future<Output = bool> + Send>>;

/// What the blocks of one read allow now.
pub enum ReadPlan {
    /// Every block is at hand: the read's data, and where each byte came from.
    Ready(Vec<Bytes>, Provenance),
    /// Missing blocks are being fetched: wait, then plan again (`after_wait`).
    Fetching(BlockWait),
    /// Not servable now: the read goes to the origin.
    Origin,
}

/// Plan a read of `range` of `image`. `servable`: the protocol allows
/// answering it locally. On the first plan of a read (`after_wait` false) the
/// read-ahead after it is started and its missing blocks are asked for; the
/// plan after the wait only assembles what arrived.
pub fn plan_read(
    core: &BlockCore,
    image: &ServedImage,
    range: &Range<u64>,
    servable: bool,
    after_wait: bool,
) -> ReadPlan {
    let servable = servable && range.end.saturating_sub(range.start) <= core.max_served_read_bytes;
    let sourcing = core.sourcing().filter(|_| servable && !after_wait);
    if let Some(sourcing) = sourcing {
        read_ahead(core, sourcing, image, range);
    }
    if let Some((data, provenance)) = servable
        .then(|| image.assemble(range, &core.cache))
        .flatten()
    {
        return ReadPlan::Ready(data, provenance);
    }
    match sourcing.and_then(|s| fetch_missing(core, s, image, range)) {
        Some(wait) => ReadPlan::Fetching(wait),
        None => ReadPlan::Origin,
    }
}

/// Start fetching the blocks likely to be read after `range` (nothing waits).
fn read_ahead(core: &BlockCore, sourcing: &Arc<Sourcing>, image: &ServedImage, range: &Range<u64>) {
    let window = core.readahead_blocks(image.manifest.block_size);
    let ahead = image.readahead(range, window, &core.cache);
    if !ahead.is_empty() {
        // Runs on its own; nothing waits for it.
        drop(sourcing.fill(&ahead));
    }
}

/// Fetch the blocks `range` lacks; the wait for them, bounded by the fetch
/// deadline (`None`: nothing is missing, the blocks cannot be served anyway).
fn fetch_missing(
    core: &BlockCore,
    sourcing: &Arc<Sourcing>,
    image: &ServedImage,
    range: &Range<u64>,
) -> Option<BlockWait> {
    let missing = image.missing(range, &core.cache);
    if missing.is_empty() {
        return None;
    }
    let fill = sourcing.fill(&missing);
    let deadline = sourcing.deadline();
    Some(Box::pin(async move {
        tokio::time::timeout(deadline, fill).await.is_err()
    }))
}
