//! Pre-staging: a running VM marked as likely to move has the blocks that
//! only its host holds staged, pinned, in the rack caches of its top-k
//! placement targets, and kept fresh as it changes, so a later migration to
//! one of them moves almost nothing from its host.
//!
//! A pre-staging job (kind `prestage`, `nearblock vm set HOST NAME prestage`)
//! runs until it is cancelled: every `prestage_refresh` the source's agent
//! re-indexes what the VM wrote (the migration's `Track`, so a round costs
//! what changed), the manager ranks the targets as a migration would, and
//! each of the top targets' rack appliances gets a `Prestage` order: the VM's
//! blocks no other holder has but the source (and the appliance itself),
//! fetched from the source within the links' budgets (the order is a flow
//! in the allocation like a build), pinned for the VM in a bounded share of
//! the cache. Cancelling releases the pins and stops the tracking.

use std::{
    collections::BTreeSet,
    sync::{Arc, Weak},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::{
    jobs::{JobState, PrestageView},
    Manager, PlanningView,
};
use crate::{
    cost::Graph,
    index::BlockStore,
    peer::{
        build_order::{to_runs, BuildOrder, BuildSource, BuildState},
        proto::Msg,
    },
    plan::image::ImageBlocks,
};

/// Rack appliances (of the top targets) a VM's blocks are staged at.
pub const PRESTAGE_TARGETS: usize = 2;

impl Manager {
    /// Starts pre-staging running VM `vm` of `host` (a job of kind
    /// `prestage`, until cancelled or the VM migrates).
    pub fn prestage_vm(
        self: &Arc<Self>,
        view: Arc<dyn PlanningView>,
        host: &str,
        vm: &str,
    ) -> Result<super::Job, super::ManageError> {
        crate::hypervisor::check_vm_name(vm).map_err(|e| super::ManageError::BadRequest(e.to_string()))?;
        let spec = super::PlaceSpec {
            image: crate::hypervisor::vm_image_name(vm),
            name: vm.to_owned(),
            policy: "best".into(),
            mode: super::BuildMode::Agent,
            target: None,
            within: Vec::new(),
            weighting: None,
        };
        match self.running_vm_host(&spec)? {
            Some(h) if h == host => {}
            _ => {
                return Err(super::ManageError::BadRequest(format!(
                    "{host} reports no running VM {vm}"
                )))
            }
        }
        if self.running_prestage(host, vm).is_some() {
            return Err(super::ManageError::BadRequest(format!("{host}/{vm} is pre-staged already")));
        }
        self.start_job(view, spec, |job| {
            job.kind = super::jobs::JobKind::Prestage;
            job.event(format!("created: pre-stage running VM {vm} of {host} at its top {PRESTAGE_TARGETS} targets' racks"));
            job.prestage = Some(PrestageView {
                source: host.to_owned(),
                ..PrestageView::default()
            });
        })
    }

    /// One look at the hosts' load ([`watch_load`]): a host whose CPU or
    /// memory has stayed at or above `prestage_when_load_above` for
    /// `prestage_after` has each of its running VMs marked likely to move.
    fn mark_loaded_hosts(self: &Arc<Self>, view: &Arc<dyn PlanningView>) {
        let Some(threshold) = self.options.prestage_when_load_above else {
            return;
        };
        let now = std::time::Instant::now();
        let mut loaded = Vec::new();
        {
            let mut since = self.loaded_since.lock();
            let reports = self.index.hosts.view(now);
            since.retain(|h, _| reports.iter().any(|r| r.host == *h));
            for r in reports {
                if Duration::from_millis(r.age_ms) > self.options.stale_after {
                    since.remove(&r.host);
                    continue;
                }
                let hot = [r.cpu, r.mem]
                    .into_iter()
                    .flatten()
                    .find(|&v| v >= threshold);
                match hot {
                    Some(v) => {
                        let first = *since.entry(r.host.clone()).or_insert(now);
                        if now.duration_since(first) >= self.options.prestage_after {
                            loaded.push((r.host.clone(), v, r.vms));
                        }
                    }
                    None => {
                        since.remove(&r.host);
                    }
                }
            }
        }
        for (host, load, vms) in loaded {
            for v in vms.iter().filter(|v| v.state == crate::hypervisor::VmState::Running) {
                if self.running_prestage(&host, &v.name).is_some() {
                    continue;
                }
                match self.prestage_vm(view.clone(), &host, &v.name) {
                    Ok(job) => self.update(job.id, |j| {
                        j.event(format!(
                            "marked likely to move: {host}'s load at {:.0}% for {:?} (at least {:.0}%)",
                            load * 100.0,
                            self.options.prestage_after,
                            threshold * 100.0
                        ));
                    }),
                    Err(e) => tracing::warn!(%host, vm = %v.name, "pre-staging a loaded host's VM: {e}"),
                }
            }
        }
    }

    /// The running pre-staging job of `host`'s VM `vm`, if any.
    pub(super) fn running_prestage(&self, host: &str, vm: &str) -> Option<u64> {
        self.jobs
            .lock()
            .values()
            .find(|j| {
                j.kind == super::jobs::JobKind::Prestage
                    && !j.state.is_final()
                    && j.spec.name == vm
                    && j.prestage.as_ref().is_some_and(|p| p.source == host)
            })
            .map(|j| j.id)
    }

    /// Ends the pre-staging of `host`'s VM `vm` (a migration starts): its
    /// pins are released and its tracking stopped before this returns, so
    /// the migration's own tracking starts clean; the staged blocks stay in
    /// the caches (no longer pinned) for the migration to use.
    pub(super) async fn end_prestage(&self, host: &str, vm: &str) {
        let Some(id) = self.running_prestage(host, vm) else {
            return;
        };
        if let Some(token) = self.running.lock().get(&id) {
            token.cancel();
        }
        for _ in 0..300 {
            if self.job(id).is_none_or(|j| j.state.is_final()) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The pin owner for VM `vm` of `host` in the rack caches.
    fn pin_owner(host: &str, vm: &str) -> String {
        format!("{host}/{vm}")
    }

    pub(super) async fn prestage(
        self: &Arc<Self>,
        view: &Arc<dyn PlanningView>,
        id: u64,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let job = self.job(id).ok_or("job vanished")?;
        let vm = job.spec.name.clone();
        let source = job.prestage.map(|p| p.source).ok_or("not a pre-staging job")?;
        let owner = Self::pin_owner(&source, &vm);
        let mut staged_at: BTreeSet<String> = BTreeSet::new();
        let result = self
            .prestage_rounds(view, id, cancel, &source, &owner, &mut staged_at)
            .await;
        // Cancelled or failed: the pins go, tracking stops.
        for node in &staged_at {
            if let Some(addr) = self.addr_of(node) {
                let _ = self.client.peer(&addr).request(&Msg::Unpin { owner: owner.clone() }).await;
            }
        }
        if let Some(addr) = self.addr_of(&source) {
            let _ = self.client.peer(&addr).request(&Msg::Untrack { vm: vm.clone() }).await;
        }
        result
    }

    /// The rack appliances (with addresses) of the best-ranked targets, at
    /// most [`PRESTAGE_TARGETS`].
    fn prestage_targets(&self, placed: &super::runner::Ranked) -> Vec<String> {
        let mut ranked: Vec<_> = placed
            .report
            .candidates
            .iter()
            .filter_map(|c| c.total_cost.map(|k| (k, c.host.clone())))
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut appliances: Vec<String> = Vec::new();
        for (_, host) in &ranked {
            if let Some(rack) = super::inventory::rack_of(&placed.topology, host) {
                if !appliances.contains(&rack) && self.addr_of(&rack).is_some() {
                appliances.push(rack);
                }
            }
            if appliances.len() == PRESTAGE_TARGETS {
                break;
            }
        }
        appliances
    }

    /// Per distinct block: whether only `source` (or the appliances in
    /// `also`) holds it.
    async fn held_only_by(
        &self,
        blocks: &ImageBlocks,
        source: &str,
        also: &[String],
    ) -> Result<Vec<bool>, String> {
        let hashes: Vec<_> = blocks.distinct.iter().map(|d| d.hash).collect();
        let store = self.store.clone();
        let lists = tokio::task::spawn_blocking(move || store.holders_many(&hashes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(lists
            .iter()
            .map(|l| l.iter().all(|loc| *loc.host == *source || also.iter().any(|a| *a == *loc.host)))
            .collect())
    }

    /// Sends one pre-staging order to appliance `node` (a flow in the
    /// budgets' allocation like a build's, `planned` bytes from the source)
    /// and follows it to its end.
    #[expect(clippy::too_many_arguments, reason = "one order's context, passed once")]
    async fn stage_at(
        &self,
        id: u64,
        mut order: BuildOrder,
        node: &str,
        topology: &crate::cost::Topology,
        owner: &str,
        planned: u64,
        cancel: &CancellationToken,
    ) -> Result<crate::peer::build_order::BuildReport, String> {
        let addr = self.addr_of(node).ok_or_else(|| format!("no address for {node}"))?;
        let source = order.manifest_host.clone();
        let graph = Graph::from_topology(topology);
        let links = match (graph.node_id(&source), graph.node_id(node)) {
            (Some(s), Some(a)) => graph.shortest_paths(a).path_links(s).map(|l| l as usize).collect(),
            _ => Vec::new(),
        };
        let build = order.job;
        *self.budget_topology.lock() = Some(Arc::new(topology.clone()));
        self.flows.lock().insert(
            id,
            super::RunningBuild {
                build,
                agent: addr.clone(),
                sources: vec![(source, links, planned)],
                budgets: topology.links.iter().map(|l| l.budget_mbps).collect(),
            },
        );
        let shares = self.reallocate(Some(id)).await;
        order.rates = shares.get(&id).cloned().unwrap_or_default();
        let appliance = self.client.peer(&addr);
        let reply = appliance
            .request(&Msg::Prestage {
                order: Box::new(order),
                owner: owner.to_owned(),
            })
            .await
            .map_err(|e| format!("pre-staging at {node}: {e}"))?;
        if !matches!(reply, Msg::BuildReply { .. }) {
            return Err(format!("{node} answered the pre-staging order with {}", reply.name()));
        }
        let report = self.follow_build(id, build, &appliance, cancel).await;
        self.flows.lock().remove(&id);
        match report? {
            r if r.state == BuildState::Done => Ok(r),
            r => Err(r.error.unwrap_or_else(|| format!("pre-staging at {node}: {:?}", r.state))),
        }
    }

    async fn prestage_rounds(
        self: &Arc<Self>,
        view: &Arc<dyn PlanningView>,
        id: u64,
        cancel: &CancellationToken,
        source: &str,
        owner: &str,
        staged_at: &mut BTreeSet<String>,
    ) -> Result<(), String> {
        let job = self.job(id).ok_or("job vanished")?;
        let (vm, image) = (job.spec.name.clone(), job.spec.image.clone());
        let source_addr = self
            .addr_of(source)
            .ok_or_else(|| format!("no agent address known for {source}"))?;
        let mut token = None;
        let mut round: u32 = 0;
        self.update(id, |j| j.state = JobState::Building);
        loop {
            let r = self.track(source, &vm, token.take()).await?;
            token = Some(r.token.clone());
            let manifest = self
                .wait_for_manifest(source, &image, r.block_size, r.digest)
                .await?;
            // The top targets, as a migration would rank them now.
            let placed = {
                let (me, view) = (self.clone(), view.clone());
                tokio::task::spawn_blocking(move || me.rank(&*view, &me.job(id).ok_or("job vanished")?.spec))
                    .await
                    .map_err(|e| format!("ranking task: {e}"))??
            };
            let appliances = self.prestage_targets(&placed);
            if appliances.is_empty() {
                return Err("no target's rack has an appliance with an address to stage at".into());
            }
            // The blocks only the source holds (or the appliances themselves).
            let blocks = ImageBlocks::of(&manifest);
            let mine = self.held_only_by(&blocks, source, &appliances).await?;
            let unique = mine.iter().filter(|&&m| m).count();
            let unique_bytes: u64 = blocks
                .distinct
                .iter()
                .zip(&mine)
                .filter(|(_, m)| **m)
                .map(|(d, _)| d.len)
                .sum();
            let runs = to_runs(mine.iter().map(|&m| m.then_some(0)));
            let digest = *blake3::hash(&manifest.encode()).as_bytes();
            for node in &appliances {
                let build = super::migrate::round_build(id, round);
                let order = BuildOrder {
                    job: build,
                    vm: vm.clone(),
                    image: image.clone(),
                    manifest_host: source.to_owned(),
                    block_size: manifest.block_size,
                    digest,
                    sources: vec![BuildSource {
                        node: source.to_owned(),
                        addr: source_addr.clone(),
                    }],
                    runs: runs.clone(),
                    rates: Vec::new(),
                };
                let report = self
                    .stage_at(id, order, node, &placed.topology, owner, unique_bytes, cancel)
                    .await;
                staged_at.insert(node.clone());
                let report = report?;
                let refused: u64 = report.failures.iter().map(|f| f.blocks_missing).sum();
                self.update(id, |j| {
                    j.event(format!(
                        "round {round}: {unique} blocks only {source} holds ({unique_bytes} B) staged and pinned at {node}{}",
                        if refused > 0 { format!(" ({refused} not pinned: the pinned share is full)") } else { String::new() }
                    ));
                    if let Some(p) = &mut j.prestage {
                        p.rounds = round + 1;
                        p.unique_blocks = unique as u64;
                        p.staged_at.insert(node.clone(), report.bytes_written);
                    }
                });
            }
            self.reallocate(None).await;
            round += 1;
            tokio::select! {
                () = tokio::time::sleep(self.options.prestage_refresh) => {}
                () = cancel.cancelled() => return Err("cancelled by the operator".into()),
            }
        }
    }
}

/// How often [`watch_load`] looks at the hosts' load.
pub const LOAD_LOOK: Duration = Duration::from_secs(1);

/// Marks the running VMs of hosts that stay loaded as likely to move
/// (`[manager] prestage_when_load_above`), while the manager lives.
pub async fn watch_load(manager: Weak<Manager>, view: Arc<dyn PlanningView>) {
    let mut tick = tokio::time::interval(LOAD_LOOK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(m) = manager.upgrade() else {
            return;
        };
        if m.options.prestage_when_load_above.is_none() {
            return;
        }
        let view = view.clone();
        // It reads the index and may create jobs: off the async workers.
        let _ = tokio::task::spawn_blocking(move || m.mark_loaded_hosts(&view)).await;
    }
}
