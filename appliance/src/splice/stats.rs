//! The splicer's counters (status and `/metrics`), shared by the accept loop
//! (`relay`), the iSCSI-aware inside (`connection`) and the byte relay
//! (`bytes`), and the handles whose counters they report (cache, sourcing,
//! catalog).

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use serde::Serialize;

/// Splicer counters (exported in status and metrics).
#[derive(Debug, Default)]
pub struct SplicerStats {
    /// iSCSI connections handed to the byte relay after login (no served LUN).
    pub raw_relayed: AtomicU64,
    /// Of those, connections handed to the kernel (`splice::handoff`): their
    /// sockets closed, their packets rewritten and forwarded by TC.
    pub handed_off: AtomicU64,
    /// Handoffs not made (the connection stays in the user-space relay), by
    /// the first reason met.
    pub handoff_declined: AtomicU64,
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub upstream_failed: AtomicU64,
    pub bytes_to_target: AtomicU64,
    pub bytes_to_initiator: AtomicU64,
    /// Connections closed because a PDU could not be decoded or framed.
    pub protocol_errors: AtomicU64,
    /// Sessions whose login text could be read more than one way (passed through).
    pub sessions_ambiguous: AtomicU64,
    /// Served LUNs a session stopped being served (it may have written them, or
    /// overflowed a per-session bound), counted per session and LUN.
    pub sessions_tainted: AtomicU64,
    /// Connections accepted over a connection cap, relayed as bytes.
    pub over_cap_relayed: AtomicU64,
    /// Accepts and upstream sockets that failed for want of file descriptors.
    pub fd_exhausted: AtomicU64,
    /// READs of served LUNs answered locally, per design.
    pub reads_served_shadow: AtomicU64,
    pub reads_served_local: AtomicU64,
    /// READs of served LUNs passed through to the library (not all blocks at hand).
    pub reads_passed: AtomicU64,
    /// Per-block provenance of served READs (blocks touched, bytes sent), by
    /// [`crate::fetch::SourceClass`] index.
    pub served_blocks: [AtomicU64; 5],
    pub served_bytes: [AtomicU64; 5],
    /// Bytes served from blocks fetched from peers, by hop distance.
    pub hop_bytes: [AtomicU64; crate::fetch::MAX_HOPS + 1],
    /// Bytes of served LUNs' READs the library answered.
    pub library_bytes: AtomicU64,
    /// Blocks verified against the manifest and inserted into the cache.
    pub learned_blocks: AtomicU64,
    /// Library blocks whose hash did not match the manifest (the LUN is tainted).
    pub verify_failures: AtomicU64,
    /// HTTP requests read whole by the HTTP front end (`GET`, `HEAD`).
    pub http_requests: AtomicU64,
    /// Of those, `GET`s answered with a body from blocks.
    pub http_served: AtomicU64,
    /// Requests (and connections' rests) the origin answered itself.
    pub http_passed: AtomicU64,
    /// HTTP connections the front end closed early (the origin changed, its
    /// data failed verification, it closed; a client went away).
    pub http_aborted: AtomicU64,
    /// The block cache, for its counters.
    pub cache: std::sync::OnceLock<Arc<crate::fetch::BlockCache>>,
    /// The peer fetcher, for its counters.
    pub sourcing: std::sync::OnceLock<Arc<crate::fetch::Sourcing>>,
    /// The served LUNs, for their prefetch status.
    pub catalog: std::sync::OnceLock<Arc<super::catalog::Catalog>>,
    /// The HTTP front end's versions, for their prefetch status.
    pub http_images: std::sync::OnceLock<Arc<super::http::images::HttpImages>>,
    /// Connections handed to the kernel, for how many are open now.
    pub handoffs: std::sync::OnceLock<Arc<crate::datapath::HandoffMap>>,
}

/// The HTTP front end's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HttpSnapshot {
    pub requests: u64,
    pub served: u64,
    pub passed: u64,
    pub aborted: u64,
    /// Versions of origin files found in the index (served from blocks).
    #[serde(default)]
    pub versions: u64,
}

/// Blocks and bytes served from one source class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ServedFromSource {
    pub blocks: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SplicerSnapshot {
    #[serde(default)]
    pub raw_relayed: u64,
    #[serde(default)]
    pub handed_off: u64,
    #[serde(default)]
    pub handoff_declined: u64,
    /// Handed-off connections the kernel forwards now (neither side has sent
    /// a FIN or RST), and those closing but still remembered.
    #[serde(default)]
    pub handoffs_open: u64,
    #[serde(default)]
    pub handoffs_closing: u64,
    pub accepted: u64,
    pub active: u64,
    pub upstream_failed: u64,
    pub bytes_to_target: u64,
    pub bytes_to_initiator: u64,
    #[serde(default)]
    pub protocol_errors: u64,
    #[serde(default)]
    pub sessions_ambiguous: u64,
    #[serde(default)]
    pub sessions_tainted: u64,
    pub over_cap_relayed: u64,
    #[serde(default)]
    pub fd_exhausted: u64,
    #[serde(default)]
    pub reads_served_shadow: u64,
    #[serde(default)]
    pub reads_served_local: u64,
    #[serde(default)]
    pub reads_passed: u64,
    #[serde(default)]
    pub zero_blocks: u64,
    #[serde(default)]
    pub zero_bytes: u64,
    #[serde(default)]
    pub cache_blocks: u64,
    #[serde(default)]
    pub cache_bytes: u64,
    #[serde(default)]
    pub library_bytes: u64,
    #[serde(default)]
    pub learned_blocks: u64,
    #[serde(default)]
    pub verify_failures: u64,
    #[serde(default)]
    pub http: HttpSnapshot,
    #[serde(default)]
    pub cache: Option<crate::fetch::CacheSnapshot>,
    /// Served blocks by source: zero, cache, rack, `other_rack`, library.
    #[serde(default)]
    pub served: std::collections::BTreeMap<crate::fetch::SourceClass, ServedFromSource>,
    /// Bytes served from fetched blocks by the hop distance of their source.
    #[serde(default)]
    pub served_bytes_by_hops: std::collections::BTreeMap<u8, u64>,
    #[serde(default)]
    pub sourcing: Option<crate::fetch::SourcingSnapshot>,
    /// Prefetches of LUNs in prefetch mode (latest per LUN).
    #[serde(default)]
    pub prefetch: Vec<crate::fetch::prefetch::PrefetchStatus>,
    /// The prefetches' rate: the appliance's own budget or a manager's share.
    #[serde(default)]
    pub prefetch_pace: Option<crate::fetch::prefetch::PaceStatus>,
    /// Every declared LUN: served or not and why, its manifest.
    #[serde(default)]
    pub luns: Vec<super::catalog::LunStatus>,
}

impl SplicerStats {
    /// Add one served READ's provenance.
    pub fn count_provenance(&self, prov: &crate::fetch::Provenance) {
        for (i, c) in self.served_blocks.iter().enumerate() {
            c.fetch_add(prov.blocks[i], Ordering::Relaxed);
        }
        for (i, c) in self.served_bytes.iter().enumerate() {
            c.fetch_add(prov.bytes[i], Ordering::Relaxed);
        }
        for (i, c) in self.hop_bytes.iter().enumerate() {
            if prov.hop_bytes[i] > 0 {
                c.fetch_add(prov.hop_bytes[i], Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(&self) -> SplicerSnapshot {
        use crate::fetch::SourceClass;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let served_of = |class: SourceClass| ServedFromSource {
            blocks: get(&self.served_blocks[class.index()]),
            bytes: get(&self.served_bytes[class.index()]),
        };
        let handoffs = self.handoffs.get().map_or((0, 0), |m| m.connections());
        SplicerSnapshot {
            raw_relayed: get(&self.raw_relayed),
            handed_off: get(&self.handed_off),
            handoff_declined: get(&self.handoff_declined),
            handoffs_open: handoffs.0,
            handoffs_closing: handoffs.1,
            accepted: get(&self.accepted),
            active: get(&self.active),
            upstream_failed: get(&self.upstream_failed),
            bytes_to_target: get(&self.bytes_to_target),
            bytes_to_initiator: get(&self.bytes_to_initiator),
            protocol_errors: get(&self.protocol_errors),
            sessions_ambiguous: get(&self.sessions_ambiguous),
            sessions_tainted: get(&self.sessions_tainted),
            over_cap_relayed: get(&self.over_cap_relayed),
            fd_exhausted: get(&self.fd_exhausted),
            reads_served_shadow: get(&self.reads_served_shadow),
            reads_served_local: get(&self.reads_served_local),
            reads_passed: get(&self.reads_passed),
            zero_blocks: served_of(SourceClass::Zero).blocks,
            zero_bytes: served_of(SourceClass::Zero).bytes,
            cache_blocks: served_of(SourceClass::Cache).blocks,
            cache_bytes: served_of(SourceClass::Cache).bytes,
            served: SourceClass::ALL
                .iter()
                .map(|&c| (c, served_of(c)))
                .collect(),
            served_bytes_by_hops: self
                .hop_bytes
                .iter()
                .enumerate()
                .map(|(h, c)| (h as u8, get(c)))
                .filter(|(_, v)| *v > 0)
                .collect(),
            sourcing: self.sourcing.get().map(|s| s.snapshot()),
            prefetch: self
                .catalog
                .get()
                .map(|c| c.prefetches())
                .unwrap_or_default()
                .into_iter()
                .chain(self.http_images.get().map(|h| h.prefetches()).unwrap_or_default())
                .collect(),
            luns: self.catalog.get().map(|c| c.statuses()).unwrap_or_default(),
            prefetch_pace: self.catalog.get().map(|c| c.core.prefetch_pace.status()),
            library_bytes: get(&self.library_bytes),
            learned_blocks: get(&self.learned_blocks),
            verify_failures: get(&self.verify_failures),
            http: HttpSnapshot {
                requests: get(&self.http_requests),
                served: get(&self.http_served),
                passed: get(&self.http_passed),
                aborted: get(&self.http_aborted),
                versions: self.http_images.get().map_or(0, |h| h.found().len() as u64),
            },
            cache: self.cache.get().map(|c| c.snapshot()),
        }
    }
}
