//! The blocks of one READ of a served LUN, decided without the protocol around
//! it: read ahead, assemble from zero and cached blocks, else fetch what is
//! missing from peers (the READ waits, at most the fetch deadline), else leave it
//! to the library. The iSCSI connection ([`super::connection`]) calls
//! [`plan_read`] once when a READ arrives and once more after its wait; it knows
//! the PDUs, this knows only the LUN, the READ's blocks and the catalog, so
//! another front end could call it the same way.

use std::{future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;

use crate::fetch::{Provenance, Sourcing};

use super::catalog::{Catalog, ServedLun};
use super::scsi::ReadCommand;

/// A wait for fetched blocks: resolves `true` when the deadline passed first.
pub type BlockWait = Pin<Box<dyn Future<Output = bool> + Send>>;

/// What the blocks of one READ allow now.
pub enum ReadPlan {
    /// Every block is at hand: the READ's data, and where each byte came from.
    Ready(Vec<Bytes>, Provenance),
    /// Missing blocks are being fetched: wait, then plan again (`after_wait`).
    Fetching(BlockWait),
    /// Not servable now: the READ goes to the library.
    Library,
}

/// Plan `read` of `lun`. `servable`: the protocol allows answering it locally.
/// On the first plan of a READ (`after_wait` false) the read-ahead after it is
/// started and its missing blocks are asked for; the plan after the wait only
/// assembles what arrived.
pub fn plan_read(
    catalog: &Catalog,
    lun: &ServedLun,
    read: &ReadCommand,
    servable: bool,
    after_wait: bool,
) -> ReadPlan {
    let servable =
        servable && read.byte_len(lun.logical_block_size()) <= catalog.max_served_read_bytes;
    let sourcing = catalog.sourcing().filter(|_| servable && !after_wait);
    if let Some(sourcing) = sourcing {
        read_ahead(catalog, sourcing, lun, read);
    }
    if let Some((data, provenance)) = servable
        .then(|| lun.assemble(read, &catalog.cache))
        .flatten()
    {
        return ReadPlan::Ready(data, provenance);
    }
    match sourcing.and_then(|s| fetch_missing(catalog, s, lun, read)) {
        Some(wait) => ReadPlan::Fetching(wait),
        None => ReadPlan::Library,
    }
}

/// Start fetching the blocks likely to be read after `read` (nothing waits).
fn read_ahead(catalog: &Catalog, sourcing: &Arc<Sourcing>, lun: &ServedLun, read: &ReadCommand) {
    let window = catalog.readahead_blocks(lun.manifest.block_size);
    let ahead = lun.readahead(read, window, &catalog.cache);
    if !ahead.is_empty() {
        // Runs on its own; nothing waits for it.
        drop(sourcing.fill(&ahead));
    }
}

/// Fetch the blocks `read` lacks; the wait for them, bounded by the fetch
/// deadline (`None`: nothing is missing, the blocks cannot be served anyway).
fn fetch_missing(
    catalog: &Catalog,
    sourcing: &Arc<Sourcing>,
    lun: &ServedLun,
    read: &ReadCommand,
) -> Option<BlockWait> {
    let missing = lun.missing(read, &catalog.cache);
    if missing.is_empty() {
        return None;
    }
    let fill = sourcing.fill(&missing);
    let deadline = sourcing.deadline();
    Some(Box::pin(async move {
        tokio::time::timeout(deadline, fill).await.is_err()
    }))
}
