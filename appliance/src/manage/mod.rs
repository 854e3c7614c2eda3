//! The manager: on the appliance that guards the library, beside the global
//! indexer (the seed: placement is "executed on the global indexer machine").
//! It owns the inventory (library images, hypervisors and their VMs) and the
//! jobs that place an image as a new VM and build it: rank the candidate hosts
//! over the global index, choose by the operator's policy, plan the
//! construction, order the target's agent to build, follow and re-plan, and
//! wait until the global index lists the new disk.
//!
//! - [`inventory`]: the inventory view, assembled from the index and reports.
//! - [`jobs`]: job records, persisted in the manager's redb file.
//! - [`runner`]: one job from placement to the indexed disk.
//! - [`budget`]: per-link budgets shared among the running builds and the
//!   appliances prefetching.
//! - [`prefetchers`]: rack appliances' prefetching as flows in that sharing.
//! - [`migrate`]: a running VM's disk moved in pre-copy rounds.
//! - [`prestage`]: a VM likely to move has its unique blocks pinned at its
//!   top targets' rack caches.
//! - [`network`]: the links, nearblock's measured rate on each, and the
//!   appliances' caches and LUNs, for the console.

pub mod budget;
pub mod inventory;
pub mod jobs;
pub mod migrate;
pub mod network;
pub mod prefetchers;
pub mod prestage;
pub mod runner;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{
    cost::Topology,
    hypervisor::check_vm_name,
    index::{BlockStore, RedbStore},
    peer::{client::PeerClient, indexer::IndexService, proto::Msg},
    plan::{MetricsFile, Policy},
};
pub use jobs::{BuildMode, Job, JobState, PlaceSpec};

/// What the manager reads of the running appliance at planning time.
pub trait PlanningView: Send + Sync + 'static {
    /// The topology with each link's weight as in force now (live costs).
    fn topology(&self) -> Option<Topology>;
    /// Host metrics for the placement policies (reports over the file).
    fn host_metrics(&self) -> MetricsFile;
    /// Per topology link (in order): its measured utilisation now, 0..1 and
    /// more (empty when the appliance measures none).
    fn link_utilisation(&self) -> Vec<f64> {
        Vec::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("{0}")]
    BadRequest(String),
    #[error("image `{0}` is not in the global index")]
    UnknownImage(String),
    #[error("no job {0}")]
    NoJob(u64),
    #[error("mode `transparent` needs the library's iSCSI portal: set [manager] library_portal")]
    NoPortal,
    #[error(transparent)]
    Store(#[from] jobs::JobStoreError),
}

/// Jobs kept (the file and the list): beyond it the oldest finished ones are
/// forgotten when a job is created.
pub const KEEP_JOBS: usize = 1000;

/// `[manager]` settings.
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    /// Agent reports older than this make a host no candidate.
    pub stale_after: Duration,
    /// How often a build's agent is asked for progress.
    pub poll: Duration,
    /// How long a finished disk may take to appear in the global index.
    pub index_wait: Duration,
    /// The library's iSCSI portal, for transparent builds.
    pub library_portal: Option<std::net::SocketAddr>,
    /// Library LUNs' access histories, for usage-weighted placement.
    pub history_dir: Option<std::path::PathBuf>,
    /// Migration: a round with at most this many written bytes is followed by
    /// the pause and the last round.
    pub migrate_final_bytes: u64,
    /// Migration: pre-copy rounds at most.
    pub migrate_max_rounds: u32,
    /// Migration: the source's copy is retired this long after the VM runs on
    /// the target.
    pub retire_grace: Duration,
    /// Pre-staging: how often a VM's staged blocks are refreshed.
    pub prestage_refresh: Duration,
    /// Pre-staging: a host whose CPU or memory stays at or above this used
    /// fraction for `prestage_after` has its running VMs marked likely to
    /// move (`None`: only the operator marks them).
    pub prestage_when_load_above: Option<f64>,
    pub prestage_after: Duration,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(10),
            poll: Duration::from_millis(250),
            index_wait: Duration::from_mins(1),
            library_portal: None,
            history_dir: None,
            migrate_final_bytes: 8 << 20,
            migrate_max_rounds: 10,
            retire_grace: Duration::from_mins(1),
            prestage_refresh: Duration::from_secs(30),
            prestage_when_load_above: None,
            prestage_after: Duration::from_mins(1),
        }
    }
}

pub struct Manager {
    index: Arc<IndexService>,
    store: Arc<RedbStore>,
    client: Arc<PeerClient>,
    options: ManagerOptions,
    db: jobs::JobStore,
    jobs: Mutex<BTreeMap<u64, Job>>,
    running: Mutex<HashMap<u64, CancellationToken>>,
    /// The id of every job that changed (for event streams).
    updates: broadcast::Sender<u64>,
    /// The running builds' flows, for the budget allocator.
    flows: Mutex<BTreeMap<u64, RunningBuild>>,
    /// The topology the latest build was planned on (appliances' uplinks).
    budget_topology: Mutex<Option<Arc<Topology>>>,
    /// Appliances whose uplinks running builds cross, by node.
    prefetchers: Mutex<BTreeMap<String, prefetchers::Prefetcher>>,
    /// Appliances that refused a share, and when.
    refused: Mutex<HashMap<String, std::time::Instant>>,
    /// Hosts at or above the pre-staging load threshold, since when.
    loaded_since: Mutex<HashMap<String, std::time::Instant>>,
    /// Per image being built: the first job building it (the seed) and the
    /// signal its end sends to the jobs of that image that wait to source from
    /// its copy (`runner`'s fan-out).
    seeds: Mutex<HashMap<String, (u64, tokio::sync::watch::Sender<bool>)>>,
    /// The inventory's "held elsewhere" shares, at the index sequence number
    /// they were computed at.
    shares: Mutex<Option<(u64, inventory::Shares)>>,
    /// The Network page's data, kept current by [`network::watch`].
    pub network: Mutex<Option<network::NetworkView>>,
}

/// A running build as the allocator sees it.
struct RunningBuild {
    /// Its id at its builder (the job's, or a migration round's).
    build: u64,
    /// Its target's agent.
    agent: String,
    /// Its order's sources, in order: (node, links of its path, planned bytes).
    sources: Vec<(String, Vec<usize>, u64)>,
    /// Link budgets (Mbit/s) of the topology it was planned on.
    budgets: Vec<Option<f64>>,
}

impl Manager {
    /// Opens the jobs file; jobs that were running when the manager stopped are
    /// failed (and their agents' builds cancelled, best effort).
    pub fn open(
        path: &std::path::Path,
        index: Arc<IndexService>,
        store: Arc<RedbStore>,
        client: Arc<PeerClient>,
        options: ManagerOptions,
    ) -> Result<Arc<Self>, ManageError> {
        let db = jobs::JobStore::open(path)?;
        let mut jobs = BTreeMap::new();
        let mut interrupted = Vec::new();
        for mut j in db.all()? {
            if !j.state.is_final() {
                let was = j.state;
                j.state = JobState::Failed;
                j.error = Some(format!(
                    "the manager restarted while the job was {was:?}; place it again"
                ));
                j.event(format!("failed: the manager restarted while {was:?}"));
                j.updated_ms = jobs::now_ms();
                db.save(&j)?;
                if let Some(target) = j.plan.as_ref().map(|p| p.target.clone()) {
                    interrupted.push((j.id, target));
                }
            }
            jobs.insert(j.id, j);
        }
        let (updates, _) = broadcast::channel(1024);
        let me = Arc::new(Self {
            index,
            store,
            client,
            options,
            db,
            jobs: Mutex::new(jobs),
            running: Mutex::new(HashMap::new()),
            updates,
            flows: Mutex::new(BTreeMap::new()),
            budget_topology: Mutex::new(None),
            prefetchers: Mutex::new(BTreeMap::new()),
            refused: Mutex::new(HashMap::new()),
            loaded_since: Mutex::new(HashMap::new()),
            seeds: Mutex::new(HashMap::new()),
            shares: Mutex::new(None),
            network: Mutex::new(None),
        });
        tokio::spawn(prefetchers::run(Arc::downgrade(&me)));
        for (job, target) in interrupted {
            let me = me.clone();
            tokio::spawn(async move {
                if let Some(addr) = me.addr_of(&target) {
                    let _ = me
                        .client
                        .peer(&addr)
                        .request(&Msg::BuildCancel { job })
                        .await;
                }
            });
        }
        Ok(me)
    }

    /// Whether hosts' load marks their VMs for pre-staging
    /// (`prestage_when_load_above`).
    pub fn watches_load(&self) -> bool {
        self.options.prestage_when_load_above.is_some()
    }

    /// Every job, newest last.
    pub fn jobs(&self) -> Vec<Job> {
        self.jobs.lock().values().cloned().collect()
    }

    pub fn job(&self, id: u64) -> Option<Job> {
        self.jobs.lock().get(&id).cloned()
    }

    /// A receiver of job ids as they change.
    pub fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.updates.subscribe()
    }

    /// Checks `spec`, records the job and starts it.
    pub fn place(
        self: &Arc<Self>,
        view: Arc<dyn PlanningView>,
        spec: PlaceSpec,
    ) -> Result<Job, ManageError> {
        check_vm_name(&spec.name).map_err(|e| ManageError::BadRequest(e.to_string()))?;
        spec.policy
            .parse::<Policy>()
            .map_err(|e| ManageError::BadRequest(format!("policy: {e}")))?;
        if spec.weighting == Some(jobs::Weighting::Usage) && self.history(&spec.image).is_none() {
            return Err(ManageError::BadRequest(format!(
                "weighting usage: no access history of {} (see [manager] history_dir)",
                spec.image
            )));
        }
        if spec.mode == BuildMode::Transparent {
            if self.options.library_portal.is_none() {
                return Err(ManageError::NoPortal);
            }
            if runner::lun_of(&spec.image).is_none() {
                return Err(ManageError::BadRequest(format!(
                    "mode transparent reads the image as an iSCSI LUN: `{}` is no TARGET/LUN name",
                    spec.image
                )));
            }
        }
        self.check_known(&spec.image)?;
        let migrating_from = self.running_vm_host(&spec)?;
        self.start_job(view, spec, |job| match migrating_from {
            Some(source) => {
                job.kind = jobs::JobKind::Migrate;
                job.event(format!(
                    "created: migrate running VM {} from {source} ({})",
                    job.spec.name, job.spec.policy
                ));
                job.migration = Some(jobs::MigrationView {
                    source,
                    ..jobs::MigrationView::default()
                });
            }
            None => job.event(format!(
                "created: place {} as {} ({})",
                job.spec.image, job.spec.name, job.spec.policy
            )),
        })
    }

    /// Records a new job for `spec` (`init` sets its kind and first event)
    /// and starts it.
    fn start_job(
        self: &Arc<Self>,
        view: Arc<dyn PlanningView>,
        spec: PlaceSpec,
        init: impl FnOnce(&mut Job),
    ) -> Result<Job, ManageError> {
        let job = {
            let mut jobs = self.jobs.lock();
            let id = self
                .db
                .next_id()?
                .max(jobs.keys().next_back().map_or(1, |k| k + 1));
            let mut job = Job::new(id, spec);
            init(&mut job);
            self.db.save(&job)?;
            jobs.insert(id, job.clone());
            // The oldest finished jobs go beyond KEEP_JOBS (running ones stay).
            let excess = jobs.len().saturating_sub(KEEP_JOBS);
            let old: Vec<u64> = jobs
                .values()
                .filter(|j| j.state.is_final())
                .take(excess)
                .map(|j| j.id)
                .collect();
            if !old.is_empty() {
                self.db.remove(&old)?;
                for id in &old {
                    jobs.remove(id);
                }
            }
            job
        };
        let token = CancellationToken::new();
        self.running.lock().insert(job.id, token.clone());
        let me = self.clone();
        let id = job.id;
        tokio::spawn(async move {
            me.clone().run(view, id, token).await;
            me.running.lock().remove(&id);
        });
        Ok(job)
    }

    /// `image` is in the global index, or [`ManageError::UnknownImage`].
    fn check_known(&self, image: &str) -> Result<(), ManageError> {
        let known = self
            .store
            .images()
            .map_err(|e| ManageError::BadRequest(e.to_string()))?
            .iter()
            .any(|i| i.image == image);
        if known {
            Ok(())
        } else {
            Err(ManageError::UnknownImage(image.to_owned()))
        }
    }

    /// The hypervisors ranked for `spec` now, as a job would rank them
    /// (blocking: reads the store). Nothing is built.
    pub fn targets(&self, view: &dyn PlanningView, spec: &PlaceSpec) -> Result<runner::Ranked, ManageError> {
        spec.policy
            .parse::<Policy>()
            .map_err(|e| ManageError::BadRequest(format!("policy: {e}")))?;
        self.check_known(&spec.image)?;
        self.rank(view, spec).map_err(ManageError::BadRequest)
    }

    /// Cancels a running job (its agent's build too); a finished job is left.
    pub fn cancel(&self, id: u64) -> Result<Job, ManageError> {
        let job = self.job(id).ok_or(ManageError::NoJob(id))?;
        if let Some(t) = self.running.lock().get(&id) {
            t.cancel();
        }
        Ok(job)
    }

    /// Changes a job, saves it and tells the subscribers.
    fn update(&self, id: u64, f: impl FnOnce(&mut Job)) {
        self.change(id, true, f);
    }

    /// A build's progress: shown at once, written to the jobs file with the
    /// job's next event (a restart fails a running job anyway, so a commit per
    /// poll would buy nothing).
    fn update_progress(&self, id: u64, progress: jobs::Progress) {
        self.change(id, false, |j| j.progress = progress);
    }

    fn change(&self, id: u64, persist: bool, f: impl FnOnce(&mut Job)) {
        let snapshot = {
            let mut jobs = self.jobs.lock();
            let Some(j) = jobs.get_mut(&id) else {
                return;
            };
            f(j);
            j.updated_ms = jobs::now_ms();
            persist.then(|| j.clone())
        };
        if let Some(job) = snapshot {
            if let Err(e) = self.db.save(&job) {
                tracing::warn!(job = id, "saving the job: {e}");
            }
        }
        let _ = self.updates.send(id);
    }

    /// Starts, pauses, resumes or retires VM `vm` on `host` (its agent applies
    /// it through the hypervisor hook).
    pub async fn vm_action(
        &self,
        host: &str,
        vm: &str,
        action: crate::hypervisor::VmAction,
    ) -> Result<(), ManageError> {
        check_vm_name(vm).map_err(|e| ManageError::BadRequest(e.to_string()))?;
        let addr = self
            .addr_of(host)
            .ok_or_else(|| ManageError::BadRequest(format!("no agent address known for {host}")))?;
        let reply = self
            .client
            .peer(&addr)
            .request(&Msg::VmAction {
                vm: vm.to_owned(),
                action,
            })
            .await
            .map_err(|e| ManageError::BadRequest(format!("{host}: {e}")))?;
        match reply {
            Msg::Ack { .. } => {
                tracing::info!(host, vm, ?action, "VM lifecycle");
                Ok(())
            }
            m => Err(ManageError::BadRequest(format!(
                "{host} answered {}",
                m.name()
            ))),
        }
    }

    /// A host's block service address, as the index learned it.
    /// The access history of library image `image` (`TARGET/LUN`), if
    /// `[manager] history_dir` has one with at least one boot.
    pub fn history(&self, image: &str) -> Option<crate::plan::AccessHistory> {
        let dir = self.options.history_dir.as_ref()?;
        let (target, lun) = runner::lun_of(image)?;
        let path = crate::splice::catalog::history_path(dir, target, u16::try_from(lun).ok()?);
        crate::splice::catalog::access_history::read_history(&path).filter(|h| h.boots > 0)
    }

    fn addr_of(&self, host: &str) -> Option<String> {
        self.index
            .addrs()
            .into_iter()
            .find(|(h, _)| h == host)
            .map(|(_, a)| a)
    }

    /// The inventory now (blocking: it reads the store).
    pub fn inventory(&self, topology: &Topology) -> Result<inventory::Inventory, ManageError> {
        let images = self
            .store
            .images()
            .map_err(|e| ManageError::BadRequest(e.to_string()))?;
        let now = std::time::Instant::now();
        let reports: Vec<_> = self
            .index
            .hosts
            .view(now)
            .into_iter()
            .map(|r| {
                let fresh = Duration::from_millis(r.age_ms) <= self.options.stale_after;
                (r, fresh)
            })
            .collect();
        // The shares read every indexed image's manifest and holders: computed
        // once per index state (its sequence number), not per request.
        let seq = self.store.seq();
        let shares = {
            let mut cached = self.shares.lock();
            match &*cached {
                Some((at, shares)) if *at == seq => shares.clone(),
                _ => {
                    let shares = runner::held_elsewhere(&self.store, &images);
                    *cached = Some((seq, shares.clone()));
                    shares
                }
            }
        };
        Ok(inventory::assemble(topology, &images, &reports, &shares))
    }
}
