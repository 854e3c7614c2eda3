//! The agent's side of build orders ([`super::build_order`]): fetch the image's
//! manifest from the parent indexer (checked against the order's digest), then
//! every distinct non-zero block from the source the order assigns it, verified
//! (blake3, by the peer client), written at each of its positions through the
//! hypervisor hook. Zero blocks are never fetched: the disk is sparse.
//!
//! A source that fails (dead, refusing, serving a corrupt or missing block) is
//! not asked again in this pass; when the pass ends with blocks missing, the
//! build waits in `NeedsSources` for the manager's re-plan (the same job, new
//! runs), up to [`REPLAN_WAIT`], keeping what it wrote. When every block is in,
//! the disk is synced and becomes the VM's, and the agent rescans so the new
//! disk is indexed and pushed up as a holder.
//!
//! An appliance follows the same orders into its block cache instead
//! ([`BuildTarget::Cache`]): pre-staging a transparent build's blocks ahead of
//! the hypervisor's own reads. An agent also imports disks with the host's own
//! image tool ([`Builder::import`], followed and cancelled like a build).
//!
//! Only the nodes named in `[hypervisor] managers` (an appliance: `[splicer]
//! managers`) may order, query or cancel builds.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::Instrument;

use super::{
    build_order::{
        expand_runs, BuildOrder, BuildReport, BuildState, SourceFailure, SourceTally,
    },
    client::{FetchError, ManifestAnswer, Peer, PeerClient},
    proto::BlockReply,
};

/// This node's own blocks by hash, read from its disks (the agent's block
/// source): one reply per hash, at most about `budget` bytes of them.
pub type LocalBlocks = Arc<dyn Fn(&[BlockHash], usize) -> Vec<BlockReply> + Send + Sync>;
use crate::{
    fetch::{prefetch::PrefetchPace, BlockCache, Origin},
    hypervisor::{check_import_source, check_vm_name, DiskBuild, Hypervisor, VmAction},
    index::{BlockHash, BlockHashMap, Manifest},
};

/// Migration's source side (the agent): a running VM's writes tracked and
/// re-indexed round by round. Blocking.
pub trait VmTracker: Send + Sync {
    /// VM `vm`'s writes since `since` (none: start tracking), re-indexed.
    fn track(&self, vm: &str, since: Option<&str>) -> Result<super::proto::TrackReport, String>;
    /// Stops tracking `vm` (its disk is rescanned as any other again).
    fn untrack(&self, vm: &str) -> Result<(), String>;
}

/// Where a staged block's source sits from this appliance (`None`: not known
/// yet), so its first READ is counted by where it came from.
pub type OriginOf = Arc<dyn Fn(&str) -> Option<Origin> + Send + Sync>;

/// The appliance's prefetch pace, once its splicer runs.
pub type PrefetchPaceOf = Arc<dyn Fn() -> Option<Arc<PrefetchPace>> + Send + Sync>;

/// What a builder's orders fill.
#[derive(Clone)]
pub enum BuildTarget {
    /// An agent: VM disks, through the hypervisor hook.
    Disks(Arc<dyn Hypervisor>),
    /// An appliance: its block cache (pre-staging).
    Cache {
        cache: Arc<BlockCache>,
        origin_of: OriginOf,
        /// The appliance's prefetch pace (`None` until its splicer runs): a
        /// manager shares the uplink's budget with it.
        prefetch_pace: PrefetchPaceOf,
    },
}

/// How long a build waits in `NeedsSources` for a re-plan before it gives up
/// (and removes what it wrote).
pub const REPLAN_WAIT: Duration = Duration::from_mins(1);
/// Distinct blocks asked of one source per round (the peer client batches and
/// pipelines within it); progress is reported per round.
const ROUND_BLOCKS: usize = 256;
/// Rounds asked of one source at a time: enough to keep its pipe full, few
/// enough that a source that dies has not been asked for the whole image.
const ROUNDS_IN_FLIGHT: usize = 4;
/// Finished builds' reports kept for status queries.
const KEEP_FINISHED: usize = 256;

/// One build in progress (or finished, for its report).
struct Build {
    order: Mutex<BuildOrder>,
    /// A patch of these positions (runs `(start, count)`) of the existing
    /// VM's disk, not a new disk (a migration's later rounds).
    patch: Option<Vec<(u32, u32)>>,
    /// Pre-staging for this owner: the staged blocks are pinned in the cache
    /// under its name.
    pin: Option<String>,
    report: Mutex<BuildReport>,
    /// A re-plan arrived (wakes a build waiting in `NeedsSources`).
    replanned: Notify,
    /// A re-plan arrived while fetching (a link got loaded): the pass stops
    /// asking its sources and the next one follows the new order.
    switch: AtomicBool,
    cancelled: AtomicBool,
    bytes_written: AtomicU64,
    /// Pacing per source node, bytes/s (absent or 0: none).
    rates: Mutex<HashMap<String, u64>>,
}

impl Build {
    fn set_rates(&self, order: &BuildOrder, rates: &[u64]) {
        let mut r = self.rates.lock();
        r.clear();
        for (s, &rate) in order.sources.iter().zip(rates) {
            if rate > 0 {
                r.insert(s.node.clone(), rate);
            }
        }
    }

    fn rate_of(&self, node: &str) -> u64 {
        self.rates.lock().get(node).copied().unwrap_or(0)
    }

    fn set_state(&self, state: BuildState, error: Option<String>) {
        let mut r = self.report.lock();
        r.state = state;
        if error.is_some() {
            r.error = error;
        }
    }

    fn snapshot(&self) -> BuildReport {
        let mut r = self.report.lock().clone();
        r.bytes_written = self.bytes_written.load(Ordering::Relaxed);
        r
    }
}

/// The agent's builds.
pub struct Builder {
    node: String,
    target: BuildTarget,
    /// This node's own blocks, read from its disks when the plan names this
    /// node as a source (no connection, no sealing), verified like any other.
    local: Option<LocalBlocks>,
    /// The agent's write tracking for migrations (`None`: not an agent).
    tracker: Option<Arc<dyn VmTracker>>,
    client: Arc<PeerClient>,
    /// Where manifests come from (the agent's parent indexer).
    parent: Option<Peer>,
    managers: Vec<String>,
    /// Told when a disk is finished (the agent rescans on it).
    built: Arc<Notify>,
    builds: Mutex<HashMap<u64, Arc<Build>>>,
    /// Finished jobs, oldest first (trimmed to [`KEEP_FINISHED`]).
    finished: Mutex<std::collections::VecDeque<u64>>,
}

impl Builder {
    pub fn new(
        node: &str,
        target: BuildTarget,
        client: Arc<PeerClient>,
        parent: Option<Peer>,
        managers: Vec<String>,
        built: Arc<Notify>,
    ) -> Self {
        Self {
            node: node.to_owned(),
            target,
            local: None,
            tracker: None,
            client,
            parent,
            managers,
            built,
            builds: Mutex::new(HashMap::new()),
            finished: Mutex::default(),
        }
    }

    /// Reads the plan's blocks from this node itself through `local`.
    #[must_use]
    pub fn with_local_blocks(mut self, local: LocalBlocks) -> Self {
        self.local = Some(local);
        self
    }

    /// A migration source's write tracking (the agent's).
    #[must_use]
    pub fn with_tracker(mut self, tracker: Arc<dyn VmTracker>) -> Self {
        self.tracker = Some(tracker);
        self
    }

    /// VM `vm`'s writes since `since`, re-indexed (a migration's round).
    pub async fn track(&self, vm: String, since: Option<String>) -> Result<super::proto::TrackReport, String> {
        check_vm_name(&vm).map_err(|e| e.to_string())?;
        let tracker = self
            .tracker
            .clone()
            .ok_or_else(|| format!("{} tracks no VM writes (not an agent)", self.node))?;
        tokio::task::spawn_blocking(move || tracker.track(&vm, since.as_deref()))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Stops tracking VM `vm`'s writes.
    pub async fn stop_tracking(&self, vm: String) -> Result<(), String> {
        check_vm_name(&vm).map_err(|e| e.to_string())?;
        let tracker = self
            .tracker
            .clone()
            .ok_or_else(|| format!("{} tracks no VM writes (not an agent)", self.node))?;
        tokio::task::spawn_blocking(move || tracker.untrack(&vm))
            .await
            .map_err(|e| e.to_string())?
    }

    /// May `node` order builds here?
    pub fn is_manager(&self, node: &str) -> bool {
        self.managers.iter().any(|m| m == node)
    }

    /// Starts a build, or re-plans one waiting for sources.
    pub fn order(self: &Arc<Self>, order: BuildOrder) -> Result<BuildReport, String> {
        self.order_or_patch(order, None, None)
    }

    /// Pre-stages the blocks `order` assigns to a source (the others are
    /// SKIP) in this appliance's cache and pins them for `owner` (a VM likely
    /// to move): they stay until the owner's pins are replaced or released.
    pub fn prestage(self: &Arc<Self>, order: BuildOrder, owner: String) -> Result<BuildReport, String> {
        if !matches!(self.target, BuildTarget::Cache { .. }) {
            return Err(format!("{} has no cache to pre-stage in (an agent)", self.node));
        }
        if owner.is_empty() || owner.len() > 256 {
            return Err("a pin owner is 1 to 256 bytes".into());
        }
        self.order_or_patch(order, None, Some(owner))
    }

    /// Releases every block pinned for `owner`.
    pub fn unpin(&self, owner: &str) -> Result<(), String> {
        match &self.target {
            BuildTarget::Cache { cache, .. } => {
                cache.unpin(owner);
                Ok(())
            }
            BuildTarget::Disks(_) => Err(format!("{} has no cache (an agent)", self.node)),
        }
    }

    /// Patches the positions `positions` (runs `(start, count)`) of stored VM
    /// `order.vm`'s disk to the order's manifest: the blocks there fetched as
    /// the order assigns them (the distinct non-zero blocks at those positions,
    /// [`crate::plan::image::ImageBlocks::at_positions`]), zero blocks written
    /// as zeros. A second order for the same job is its re-plan.
    pub fn patch(
        self: &Arc<Self>,
        order: BuildOrder,
        positions: Vec<(u32, u32)>,
    ) -> Result<BuildReport, String> {
        if matches!(self.target, BuildTarget::Cache { .. }) {
            return Err(format!("{} patches no disks (an appliance)", self.node));
        }
        self.order_or_patch(order, Some(positions), None)
    }

    fn order_or_patch(
        self: &Arc<Self>,
        order: BuildOrder,
        patch: Option<Vec<(u32, u32)>>,
        pin: Option<String>,
    ) -> Result<BuildReport, String> {
        check_vm_name(&order.vm).map_err(|e| e.to_string())?;
        if let Some(b) = self.builds.lock().get(&order.job).cloned() {
            let state = b.report.lock().state;
            let same = {
                let current = b.order.lock();
                current.vm == order.vm && current.digest == order.digest && b.patch == patch
            };
            // A re-plan that crossed the build's end: nothing is left to do.
            if state == BuildState::Done && same {
                return Ok(b.snapshot());
            }
            if !matches!(state, BuildState::NeedsSources | BuildState::Fetching) {
                return Err(format!("build {} is {state:?}: too late to re-plan", order.job));
            }
            if !same {
                return Err(format!("build {} is of another VM, image or patch", order.job));
            }
            b.set_rates(&order, &order.rates);
            *b.order.lock() = order;
            b.set_state(BuildState::Fetching, None);
            if state == BuildState::Fetching {
                b.switch.store(true, Ordering::Relaxed);
            } else {
                b.replanned.notify_one();
            }
            return Ok(b.snapshot());
        }
        let b = Self::new_build(order.clone(), patch, pin);
        b.set_rates(&order, &order.rates);
        self.builds.lock().insert(order.job, b.clone());
        let me = self.clone();
        let span = tracing::info_span!("build", node = %self.node, job = order.job, vm = %order.vm, image = %order.image);
        tokio::spawn(
            async move {
                let result = me.run(&b).await;
                me.settle(&b, result);
            }
            .instrument(span),
        );
        Ok(self.status(order.job).expect("just inserted"))
    }

    fn new_build(order: BuildOrder, patch: Option<Vec<(u32, u32)>>, pin: Option<String>) -> Arc<Build> {
        Arc::new(Build {
            patch,
            pin,
            report: Mutex::new(BuildReport {
                job: order.job,
                vm: order.vm.clone(),
                state: BuildState::Fetching,
                blocks_total: 0,
                blocks_done: 0,
                bytes_written: 0,
                by_source: Vec::new(),
                failures: Vec::new(),
                error: None,
            }),
            order: Mutex::new(order),
            replanned: Notify::new(),
            switch: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            bytes_written: AtomicU64::new(0),
            rates: Mutex::new(HashMap::new()),
        })
    }

    /// Records how a build (or import) ended.
    fn settle(&self, b: &Build, result: Result<(), String>) {
        match result {
            Ok(()) => {
                b.set_state(BuildState::Done, None);
                tracing::info!("built");
                self.built.notify_one();
            }
            Err(_) if b.cancelled.load(Ordering::Relaxed) => {
                b.set_state(BuildState::Cancelled, None);
                tracing::info!("cancelled");
            }
            Err(e) => {
                tracing::warn!("build failed: {e}");
                b.set_state(BuildState::Failed, Some(e));
            }
        }
        self.retire_finished(b.report.lock().job);
    }

    fn hypervisor(&self) -> Result<&Arc<dyn Hypervisor>, String> {
        match &self.target {
            BuildTarget::Disks(hv) => Ok(hv),
            BuildTarget::Cache { .. } => Err(format!("{} has no hypervisor (an appliance)", self.node)),
        }
    }

    /// Imports VM `vm`'s disk with the host's own image tool reading `source`
    /// (transparent mode): a build without sources, followed and cancelled by
    /// its job like any other.
    pub fn import(
        self: &Arc<Self>,
        job: u64,
        vm: String,
        image: String,
        size: u64,
        source: String,
    ) -> Result<BuildReport, String> {
        let hv = self.hypervisor()?.clone();
        check_vm_name(&vm).map_err(|e| e.to_string())?;
        check_import_source(&source).map_err(|e| e.to_string())?;
        if self.builds.lock().contains_key(&job) {
            return Err(format!("build {job} exists here"));
        }
        let b = Self::new_build(BuildOrder {
            job,
            vm: vm.clone(),
            image: image.clone(),
            manifest_host: String::new(),
            block_size: 0,
            digest: [0; 32],
            sources: Vec::new(),
            runs: Vec::new(),
            rates: Vec::new(),
        }, None, None);
        self.builds.lock().insert(job, b.clone());
        let me = self.clone();
        let span = tracing::info_span!("import", node = %self.node, job, vm = %vm, source = %source);
        tokio::spawn(
            async move {
                let bb = b.clone();
                let result = tokio::task::spawn_blocking(move || {
                    hv.import_disk(&vm, &image, size, &source, &bb.cancelled)
                        .map(|disk| {
                            bb.bytes_written.store(disk.size, Ordering::Relaxed);
                        })
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| format!("import task: {e}"))
                .and_then(|r| r);
                me.settle(&b, result);
            }
            .instrument(span),
        );
        Ok(self.status(job).expect("just inserted"))
    }

    /// A lifecycle change of a VM; the agent rescans after it (a retired VM's
    /// disk leaves the index).
    pub async fn vm_action(&self, vm: String, action: VmAction) -> Result<(), String> {
        check_vm_name(&vm).map_err(|e| e.to_string())?;
        let hv = self.hypervisor()?.clone();
        tokio::task::spawn_blocking(move || crate::hypervisor::apply(&*hv, &vm, action))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.built.notify_one();
        Ok(())
    }

    /// New pacing for a running build's sources (in its order's source order).
    pub fn set_rates(&self, job: u64, rates: &[u64]) -> Result<BuildReport, String> {
        let b = self
            .builds
            .lock()
            .get(&job)
            .cloned()
            .ok_or_else(|| format!("no build {job} here"))?;
        let order = b.order.lock().clone();
        b.set_rates(&order, rates);
        Ok(b.snapshot())
    }

    /// A manager's share of the uplink for this appliance's prefetches
    /// (bytes/s, 0: none) and whether it counted them; returns whether a
    /// prefetch runs now.
    pub fn prefetch_share(&self, bytes_per_s: u64, counted: bool) -> Result<bool, String> {
        match &self.target {
            BuildTarget::Cache { prefetch_pace, .. } => Ok(prefetch_pace()
                .is_some_and(|p| p.told(bytes_per_s, counted))),
            BuildTarget::Disks(_) => Err(format!("{} prefetches nothing (an agent)", self.node)),
        }
    }

    pub fn status(&self, job: u64) -> Option<BuildReport> {
        self.builds.lock().get(&job).map(|b| b.snapshot())
    }

    /// Stops a build (what it wrote is removed); its report says `Cancelled`.
    pub fn cancel(&self, job: u64) -> Option<BuildReport> {
        let b = self.builds.lock().get(&job).cloned()?;
        b.cancelled.store(true, Ordering::Relaxed);
        b.replanned.notify_one();
        Some(b.snapshot())
    }

    fn retire_finished(&self, job: u64) {
        let mut f = self.finished.lock();
        f.push_back(job);
        while f.len() > KEEP_FINISHED {
            if let Some(old) = f.pop_front() {
                self.builds.lock().remove(&old);
            }
        }
    }

    async fn manifest(&self, order: &BuildOrder) -> Result<Manifest, String> {
        let parent = self
            .parent
            .as_ref()
            .ok_or("this agent has no parent indexer to get manifests from")?;
        let answer = parent
            .manifest(
                &order.manifest_host,
                &order.image,
                Some(order.block_size),
                None,
            )
            .await
            .map_err(|e| format!("manifest of {}: {e}", order.image))?;
        match answer {
            ManifestAnswer::Found { manifest, digest } if digest == order.digest => Ok(manifest),
            ManifestAnswer::Found { .. } => Err(format!(
                "the index's manifest of {} is not the one the order names (the image changed)",
                order.image
            )),
            ManifestAnswer::Absent | ManifestAnswer::Unchanged => Err(format!(
                "{} of {} is not in the index",
                order.image, order.manifest_host
            )),
        }
    }

    /// Where a build's verified blocks go: a new disk, a patched one, or the
    /// appliance's cache.
    async fn open_sink(
        &self,
        b: &Build,
        order: &BuildOrder,
        manifest: &Manifest,
        blocks: &crate::plan::image::ImageBlocks,
    ) -> Result<Sink, String> {
        Ok(match &self.target {
            BuildTarget::Disks(hv) => {
                let hv = hv.clone();
                let (vm, image, size) = (order.vm.clone(), order.image.clone(), manifest.size);
                let patch = b.patch.clone();
                let zeros: Vec<usize> = patch
                    .as_deref()
                    .map(|p| {
                        crate::plan::image::positions_in(p, manifest.blocks.len())
                            .filter(|&i| manifest.blocks[i].is_none())
                            .collect()
                    })
                    .unwrap_or_default();
                let block_size = u64::from(manifest.block_size);
                let lens: Vec<u64> = zeros.iter().map(|&i| manifest.block_len(i)).collect();
                Sink::Disk(Arc::from(
                    tokio::task::spawn_blocking(move || {
                        if patch.is_none() {
                            return hv.create_disk(&vm, &image, size);
                        }
                        // A patch: the disk exists; its zeroed positions are
                        // written as zeros first.
                        let disk = hv.patch_disk(&vm)?;
                        let zero = vec![0u8; usize::try_from(block_size).unwrap_or(0)];
                        for (&i, &len) in zeros.iter().zip(&lens) {
                            disk.write_at(&zero[..usize::try_from(len).unwrap_or(0)], i as u64 * block_size)?;
                        }
                        Ok(disk)
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?,
                ))
            }
            BuildTarget::Cache { cache, origin_of, .. } => {
                let bytes: u64 = blocks.distinct.iter().map(|d| d.len).sum();
                if bytes > cache.capacity() {
                    return Err(format!(
                        "the cache holds {} bytes, the image's distinct blocks are {bytes}: not staged (its reads are sourced on demand)",
                        cache.capacity()
                    ));
                }
                Sink::Cache {
                    cache: cache.clone(),
                    origin_of: origin_of.clone(),
                }
            }
        })
    }

    /// A pre-staging order's staged blocks (not the skipped ones) pinned for
    /// its owner.
    fn pin_staged(&self, b: &Build, ctx: &Pass) -> Result<(), String> {
        if let (Some(owner), Sink::Cache { cache, .. }) = (&b.pin, &ctx.sink) {
            // Pinned: what the order staged (not what it skipped).
            let order = b.order.lock().clone();
            let assigned = expand_runs(&order.runs, order.sources.len(), ctx.blocks.distinct.len() as u64)
                .map_err(|e| e.to_string())?;
            let staged: Vec<BlockHash> = ctx
                .blocks
                .distinct
                .iter()
                .zip(&assigned)
                .filter(|(_, a)| a.is_some())
                .map(|(d, _)| d.hash)
                .collect();
            let report = cache.pin(owner, &staged);
            tracing::info!(owner, pinned = report.pinned, refused = report.refused, absent = report.absent, "pre-staged blocks pinned");
            if report.refused > 0 {
                b.report.lock().failures.push(SourceFailure {
                    node: self.node.clone(),
                    reason: format!("{} blocks not pinned: the cache's pinned share is full", report.refused),
                    blocks_missing: report.refused,
                });
            }
        }
        Ok(())
    }

    async fn run(&self, b: &Arc<Build>) -> Result<(), String> {
        let order = b.order.lock().clone();
        let manifest = self.manifest(&order).await?;
        let blocks = match &b.patch {
            Some(p) => crate::plan::image::ImageBlocks::at_positions(&manifest, p),
            None => crate::plan::image::ImageBlocks::of(&manifest),
        };
        let positions = positions_of(&manifest, &blocks, b.patch.as_deref());
        let total = blocks.distinct.len();
        b.report.lock().blocks_total = total as u64;
        let sink = self.open_sink(b, &order, &manifest, &blocks).await?;
        let mut done = vec![false; total];
        let mut done_count = 0usize;
        // Staging: what the cache holds already is not fetched again.
        if let Sink::Cache { cache, .. } = &sink {
            for (d, slot) in blocks.distinct.iter().zip(done.iter_mut()) {
                if cache.contains(&d.hash) {
                    *slot = true;
                    done_count += 1;
                }
            }
            b.report.lock().blocks_done = done_count as u64;
        }
        let ctx = Arc::new(Pass {
            client: PeerClient::new(self.client.options().clone()),
            blocks,
            positions,
            block_size: u64::from(manifest.block_size),
            sink,
            build: b.clone(),
            local: self.local.clone().map(|l| (self.node.clone(), l)),
        });
        loop {
            let order = b.order.lock().clone();
            let failures = self
                .pass(&ctx, &order, &mut done, &mut done_count)
                .await?;
            if b.cancelled.load(Ordering::Relaxed) {
                return Err("cancelled".into());
            }
            if done_count == total {
                break;
            }
            if b.switch.swap(false, Ordering::Relaxed) {
                // Re-planned while fetching: the rest from the new order's sources.
                b.report.lock().failures.extend(failures);
                tracing::info!(missing = total - done_count, "re-planned while fetching");
                continue;
            }
            {
                let mut r = b.report.lock();
                r.failures.extend(failures);
                r.state = BuildState::NeedsSources;
            }
            tracing::info!(
                missing = total - done_count,
                "blocks missing: waiting for a re-plan"
            );
            if tokio::time::timeout(REPLAN_WAIT, b.replanned.notified())
                .await
                .is_err()
            {
                return Err(format!(
                    "{} blocks missing and no re-plan within {REPLAN_WAIT:?}",
                    total - done_count
                ));
            }
            if b.cancelled.load(Ordering::Relaxed) {
                return Err("cancelled".into());
            }
        }
        self.pin_staged(b, &ctx)?;
        if let Sink::Disk(disk) = &ctx.sink {
            let disk = disk.clone();
            drop(ctx);
            tokio::task::spawn_blocking(move || disk.finish())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl Builder {
    /// One pass over the order: every source's blocks not yet done, fetched in
    /// parallel (one task per source). Returns the sources that failed.
    async fn pass(
        &self,
        ctx: &Arc<Pass>,
        order: &BuildOrder,
        done: &mut [bool],
        done_count: &mut usize,
    ) -> Result<Vec<SourceFailure>, String> {
        let assigned = expand_runs(&order.runs, order.sources.len(), done.len() as u64)
            .map_err(|e| e.to_string())?;
        let mut by_source: Vec<Vec<u32>> = vec![Vec::new(); order.sources.len()];
        for (i, a) in assigned.iter().enumerate() {
            match (a, done[i]) {
                (Some(s), false) => by_source[usize::from(*s)].push(i as u32),
                // SKIP: the order wants it not fetched (a pre-staging order
                // stages only the blocks no one else holds).
                (None, false) => {
                    done[i] = true;
                    *done_count += 1;
                }
                (_, true) => {}
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (s, list) in by_source.into_iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let src = order.sources[s].clone();
            let peer = ctx.client.peer(&src.addr);
            let ctx = ctx.clone();
            tasks.spawn(async move {
                let outcome = ctx.fetch_from(&src.node, &peer, &list).await;
                (src.node, outcome)
            });
        }
        let mut failures = Vec::new();
        while let Some(j) = tasks.join_next().await {
            let (node, outcome) = j.map_err(|e| format!("fetch task: {e}"))?;
            for &i in &outcome.written {
                if !done[i as usize] {
                    done[i as usize] = true;
                    *done_count += 1;
                }
            }
            ctx.build.report.lock().blocks_done = *done_count as u64;
            if let Some(reason) = outcome.failure {
                tracing::warn!(source = %node, missing = outcome.missing, "source failed: {reason}");
                failures.push(SourceFailure {
                    node,
                    reason,
                    blocks_missing: outcome.missing,
                });
            }
        }
        Ok(failures)
    }
}

/// Adds a round's blocks and bytes to `node`'s tally; `wire_bytes` is the
/// source connection's running total.
fn tally(list: &mut Vec<SourceTally>, node: &str, blocks: u64, bytes: u64, wire_bytes: u64) {
    if let Some(t) = list.iter_mut().find(|t| t.node == node) {
        t.blocks += blocks;
        t.bytes += bytes;
        t.wire_bytes = t.wire_bytes.max(wire_bytes);
    } else {
        list.push(SourceTally {
            node: node.to_owned(),
            blocks,
            bytes,
            wire_bytes,
        });
    }
}

/// `hashes` read from this node's own disks, each verified (blake3) as a
/// peer's would be: a disk changed behind the index fails like a lying peer.
fn read_local(local: &LocalBlocks, hashes: &[BlockHash]) -> Vec<Result<Bytes, FetchError>> {
    let peer = || "self".to_owned();
    let mut out: Vec<Option<Result<Bytes, FetchError>>> = vec![None; hashes.len()];
    let mut todo: Vec<usize> = (0..hashes.len()).collect();
    // Each call answers at least one block (the budget is far above a block),
    // so this ends within `hashes.len()` calls.
    for _ in 0..=hashes.len() {
        if todo.is_empty() {
            break;
        }
        let ask: Vec<BlockHash> = todo.iter().map(|&i| hashes[i]).collect();
        let replies = local(&ask, 64 << 20);
        let mut again = Vec::new();
        for (&i, r) in todo.iter().zip(replies) {
            out[i] = match r {
                BlockReply::Found(data) if *blake3::hash(&data).as_bytes() == hashes[i].0 => Some(Ok(data)),
                BlockReply::Found(_) => Some(Err(FetchError::Mismatch { peer: peer() })),
                BlockReply::NotFound => Some(Err(FetchError::NotFound { peer: peer() })),
                BlockReply::Failed(message) => Some(Err(FetchError::Unavailable { peer: peer(), message })),
                BlockReply::Skipped => {
                    again.push(i);
                    None
                }
            };
        }
        todo = again;
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(FetchError::Unavailable {
                    peer: peer(),
                    message: "not answered".into(),
                })
            })
        })
        .collect()
}

/// Every position of each distinct block, by distinct index (in a patch,
/// only the patched positions).
fn positions_of(
    manifest: &Manifest,
    blocks: &crate::plan::image::ImageBlocks,
    patch: Option<&[(u32, u32)]>,
) -> Vec<Vec<u64>> {
    let index: BlockHashMap<u32> = blocks
        .distinct
        .iter()
        .enumerate()
        .map(|(i, d)| (d.hash, i as u32))
        .collect();
    let mut out = vec![Vec::new(); blocks.distinct.len()];
    let mut add = |pos: usize| {
        if let Some(i) = manifest.blocks[pos].as_ref().and_then(|h| index.get(h)) {
            out[*i as usize].push(pos as u64);
        }
    };
    match patch {
        Some(p) => crate::plan::image::positions_in(p, manifest.blocks.len()).for_each(&mut add),
        None => (0..manifest.blocks.len()).for_each(&mut add),
    }
    out
}

/// What one pass shares between its sources' tasks.
struct Pass {
    /// The build's own client: its connections carry only this build's
    /// traffic, so their wire bytes are the build's.
    client: PeerClient,
    blocks: crate::plan::image::ImageBlocks,
    positions: Vec<Vec<u64>>,
    block_size: u64,
    sink: Sink,
    build: Arc<Build>,
    /// This node's name and its own blocks.
    local: Option<(String, LocalBlocks)>,
}

/// Where a pass's verified blocks go.
enum Sink {
    /// At each of the block's positions in the VM's disk.
    Disk(Arc<dyn DiskBuild>),
    /// Into the appliance's cache, once, tagged with where it came from.
    Cache {
        cache: Arc<BlockCache>,
        origin_of: OriginOf,
    },
}

/// What one source gave in a pass.
struct SourceOutcome {
    written: Vec<u32>,
    /// Why the source was given up (its remaining blocks are missing).
    failure: Option<String>,
    missing: u64,
}

impl Pass {
    /// Fetches `list` (distinct indices) from `peer` in rounds, up to
    /// [`ROUNDS_IN_FLIGHT`] at a time, and writes them; stops asking at the
    /// source's first failure.
    async fn fetch_from(self: &Arc<Self>, node: &str, peer: &Peer, list: &[u32]) -> SourceOutcome {
        use futures_util::StreamExt;
        let mut out = SourceOutcome {
            written: Vec::with_capacity(list.len()),
            failure: None,
            missing: 0,
        };
        // A paced source gets rounds of about 50 ms of its rate, so a round's
        // burst stays small against the 1-second windows budgets are kept in.
        let rate = self.build.rate_of(node);
        let round_blocks = if rate > 0 {
            usize::try_from(rate / 20 / self.block_size.max(1))
                .unwrap_or(ROUND_BLOCKS)
                .clamp(16, ROUND_BLOCKS)
        } else {
            ROUND_BLOCKS
        };
        let owned: Vec<Vec<u32>> = list.chunks(round_blocks).map(<[u32]>::to_vec).collect();
        let (me, source) = (self.clone(), peer.clone());
        let pacer: Arc<Mutex<Option<tokio::time::Instant>>> = Arc::default();
        let node_name = node.to_owned();
        let mut rounds = futures_util::stream::iter(owned)
            .map(move |round| {
                let (me, source, pacer, node) =
                    (me.clone(), source.clone(), pacer.clone(), node_name.clone());
                let fetch: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                    Box::pin(async move {
                        let rate = me.build.rate_of(&node);
                        if rate > 0 {
                            // Reserve this round's slot on the source's timeline.
                            let bytes: u64 = round
                                .iter()
                                .map(|&i| me.blocks.distinct[i as usize].len)
                                .sum();
                            let start = {
                                let mut next = pacer.lock();
                                let now = tokio::time::Instant::now();
                                let start = next.map_or(now, |n| n.max(now));
                                *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
                                start
                            };
                            tokio::time::sleep_until(start).await;
                        }
                        let hashes: Vec<BlockHash> = round
                            .iter()
                            .map(|&i| me.blocks.distinct[i as usize].hash)
                            .collect();
                        let local = me.local.as_ref().filter(|(n, _)| *n == node).map(|(_, l)| l.clone());
                        let results = match local {
                            Some(l) => tokio::task::spawn_blocking(move || read_local(&l, &hashes))
                                .await
                                .unwrap_or_else(|e| {
                                    vec![Err(FetchError::Unavailable {
                                        peer: "self".into(),
                                        message: e.to_string(),
                                    })]
                                }),
                            None => source.fetch_blocks(&hashes).await,
                        };
                        (round, results)
                    });
                fetch
            })
            .buffered(ROUNDS_IN_FLIGHT);
        while let Some((round, results)) = rounds.next().await {
            if self.build.cancelled.load(Ordering::Relaxed) {
                out.failure = Some("cancelled".into());
                break;
            }
            self.keep(node, peer, &round, results, &mut out).await;
            // A failed source is not asked again; a new order (re-planned while
            // fetching) takes over from here.
            if out.failure.is_some() || self.build.switch.load(Ordering::Relaxed) {
                break;
            }
        }
        out.missing = (list.len() - out.written.len()) as u64;
        out
    }

    /// Writes what one round fetched from `node` and tallies it; the round's
    /// first error becomes the source's failure.
    async fn keep(
        self: &Arc<Self>,
        node: &str,
        peer: &Peer,
        round: &[u32],
        results: Vec<Result<Bytes, FetchError>>,
        out: &mut SourceOutcome,
    ) {
        let mut good: Vec<(u32, Bytes)> = Vec::with_capacity(round.len());
        for (&i, r) in round.iter().zip(results) {
            match r {
                Ok(data) => good.push((i, data)),
                Err(e) if out.failure.is_none() => out.failure = Some(e.to_string()),
                Err(_) => {}
            }
        }
        let (me, from) = (self.clone(), node.to_owned());
        match tokio::task::spawn_blocking(move || me.write(&from, good)).await {
            Ok(Ok((ids, bytes))) => {
                // Progress per round, so the manager sees a long build move.
                {
                    let mut r = self.build.report.lock();
                    r.blocks_done += ids.len() as u64;
                    tally(&mut r.by_source, node, ids.len() as u64, bytes, peer.wire_bytes());
                }
                out.written.extend(ids);
            }
            Ok(Err(e)) => {
                out.failure.get_or_insert(e);
            }
            Err(e) => {
                out.failure.get_or_insert(format!("write task: {e}"));
            }
        }
    }

    /// Writes verified blocks from `from` at every position they occupy (a
    /// cache: once): (written distinct indices, block bytes received).
    fn write(&self, from: &str, blocks: Vec<(u32, Bytes)>) -> Result<(Vec<u32>, u64), String> {
        let mut ids = Vec::with_capacity(blocks.len());
        let mut bytes = 0;
        for (i, data) in blocks {
            let want = self.blocks.distinct[i as usize].len;
            if data.len() as u64 != want {
                return Err(format!("block {i}: {} bytes, the manifest says {want}", data.len()));
            }
            match &self.sink {
                Sink::Disk(disk) => {
                    for &pos in &self.positions[i as usize] {
                        disk.write_at(&data, pos * self.block_size)
                            .map_err(|e| e.to_string())?;
                        self.build
                            .bytes_written
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
                Sink::Cache { cache, origin_of } => {
                    let origin = origin_of(from);
                    self.build
                        .bytes_written
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    cache.insert_from(self.blocks.distinct[i as usize].hash, data.clone(), origin);
                }
            }
            bytes += data.len() as u64;
            ids.push(i);
        }
        Ok((ids, bytes))
    }
}
