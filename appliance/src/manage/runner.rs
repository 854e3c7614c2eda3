//! One job from placement to the indexed disk: candidates from the agents'
//! reports (hypervisors only, with room for the disk, without a VM of that
//! name), ranked over the global index by construction cost and chosen by the
//! policy; then the construction plan is sent as a build order, its progress
//! followed, and the plan remade without a source that failed; last, the job
//! waits until the global index lists the new disk.
//!
//! Mode `agent`: the order goes to the target's agent, which writes the disk.
//! Mode `transparent`: the order goes to the target's rack appliance, which
//! stages the blocks in its cache; then the target's agent imports the disk
//! with the host's own image tool from the library's LUN, whose READs that
//! appliance answers from the staged blocks.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::{
    budget,
    prefetchers::Allocation,
    jobs::{BuildMode, JobState, PlaceSpec, PlanView, Progress, SourceBytes, Weighting},
    Manager, PlanningView,
};
use crate::{
    cost::{topology::Role, Graph, NodeId, ShortestPaths, Topology},
    hypervisor::vm_image_name,
    index::{BlockStore, Manifest, RedbStore},
    peer::{
        build_order::{to_runs, BuildOrder, BuildReport, BuildSource, BuildState, MAX_RUNS},
        proto::Msg,
    },
    plan::{
        capacity::{construct_capacity_aware, CapacityConfig},
        construct::{construct, ConstructionPlan},
        image::ImageHolders,
        indexed::IndexedStore,
        place::{place, place_weighted, PlaceReport},
        HolderIndex, HolderIndexError, HolderLists, HostId, Policy,
    },
};

/// The share of a job's blocks another image's seed must hold for the job to
/// wait for it (fan-out across similar images).
const SHARED_FOR_SEED: f64 = 0.25;

/// The share of `mine` that `theirs` holds (0 for an empty `mine`).
fn shared_share(
    mine: &HashSet<crate::index::BlockHash>,
    theirs: &HashSet<crate::index::BlockHash>,
) -> f64 {
    if mine.is_empty() {
        return 0.0;
    }
    mine.iter().filter(|h| theirs.contains(*h)).count() as f64 / mine.len() as f64
}

/// Re-plans one job may make before it gives up.
const MAX_REPLANS: u32 = 16;

type Store = IndexedStore<Arc<RedbStore>>;

/// A source of a build as the budget allocator sees it: its node, the
/// topology links of its path to the target, the bytes planned from it.
pub(super) type SourceFlow = (String, Vec<usize>, u64);

/// The planner's view of the index without some hosts (sources that failed).
struct Excluding<'a> {
    inner: &'a Store,
    excluded: HashSet<HostId>,
}

impl HolderIndex for Excluding<'_> {
    fn hosts(&self) -> Vec<String> {
        self.inner.hosts()
    }

    fn holders(&self, hash: &crate::index::BlockHash, out: &mut Vec<HostId>) -> Result<(), HolderIndexError> {
        let from = out.len();
        self.inner.holders(hash, out)?;
        let mut i = from;
        while i < out.len() {
            if self.excluded.contains(&out[i]) {
                out.swap_remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    fn holders_of_all(
        &self,
        hashes: &[crate::index::BlockHash],
        out: &mut HolderLists,
    ) -> Result<(), HolderIndexError> {
        let mut all = HolderLists::default();
        self.inner.holders_of_all(hashes, &mut all)?;
        out.clear();
        for i in 0..all.len() {
            out.hosts
                .extend(all.of(i).iter().filter(|h| !self.excluded.contains(h)));
            out.close_list();
        }
        Ok(())
    }
}

/// What placement decided, for the build.
#[derive(Clone)]
pub(super) struct Placed {
    pub(super) topology: Topology,
    pub(super) manifest: Manifest,
    pub(super) manifest_host: String,
    pub(super) target: String,
    /// Who follows the build order: the target's agent, or (transparent) its
    /// rack's appliance.
    pub(super) builder: String,
    pub(super) mode: BuildMode,
    /// A patch of these positions of the target's existing disk (a
    /// migration's round after the first), not a new disk.
    pub(super) patch: Option<Vec<(u32, u32)>>,
    /// The build's id at its builder: the job's, or a migration round's.
    pub(super) build: u64,
}

impl Placed {
    /// The message that orders `order`: a build, or a patch of the positions.
    fn order_msg(&self, order: BuildOrder) -> Msg {
        match &self.patch {
            Some(positions) => Msg::Patch {
                order: Box::new(order),
                positions: positions.clone(),
            },
            None => Msg::Build {
                order: Box::new(order),
            },
        }
    }
}

/// The target and LUN of a library image named `TARGET/LUN` (the library
/// agent's name for a tgt LUN).
pub(super) fn lun_of(image: &str) -> Option<(&str, u32)> {
    let (target, lun) = image.rsplit_once('/')?;
    let lun = lun.parse().ok()?;
    (!target.is_empty() && !target.contains('/')).then_some((target, lun))
}

/// The URL the target's image tool reads the library LUN from.
fn import_source(portal: std::net::SocketAddr, image: &str) -> Option<String> {
    let (target, lun) = lun_of(image)?;
    Some(format!("iscsi://{portal}/{target}/{lun}"))
}

/// A ranking of the hypervisors for one image (a job's, or the targets view).
pub struct Ranked {
    pub topology: Topology,
    manifest: Manifest,
    manifest_host: String,
    pub report: PlaceReport,
    /// How the blocks were priced.
    pub weighting: Weighting,
    /// Hosts left out and why; how the blocks were priced.
    pub notes: Vec<String>,
}

/// The job event that announces a plan (or a re-plan).
fn plan_event(plan: &PlanView) -> String {
    let summary = plan
        .by_source
        .iter()
        .map(|(s, b)| format!("{s}: {b}"))
        .collect::<Vec<_>>()
        .join(", ");
    let finish = match (plan.capacity_finish_s, plan.plain_finish_s) {
        (Some(c), Some(p)) => format!("; capacity-aware, est. {c:.1} s (plain {p:.1} s)"),
        _ => String::new(),
    };
    if plan.replans == 0 {
        format!("plan: {} distinct blocks ({summary}){finish}", plan.blocks_total)
    } else if plan.excluded.is_empty() {
        format!("re-plan {}: {summary}{finish}", plan.replans)
    } else {
        format!(
            "re-plan {} without {}: {summary}{finish}",
            plan.replans,
            plan.excluded.join(", ")
        )
    }
}

/// The construction plan: capacity-aware when links have capacities (or
/// budgets), blocks spread over other holders where that finishes sooner
/// within 25% more cost; with (capacity-aware, plain) finish estimates, s.
fn plan_of(
    image: &ImageHolders,
    graph: &Graph,
    paths: &ShortestPaths,
    capacity: &CapacityConfig,
) -> Result<(ConstructionPlan, Option<(f64, f64)>), String> {
    if graph.links().iter().any(|l| l.capacity_mbps.is_some()) {
        let cp = construct_capacity_aware(image, graph, paths, capacity).map_err(|e| e.to_string())?;
        let finish = Some((cp.finish_time_s, cp.plain_finish_time_s));
        Ok((cp.plan, finish))
    } else {
        Ok((construct(image, graph, paths).map_err(|e| e.to_string())?, None))
    }
}

/// The topology as the capacity-aware plan prices it: a link with a budget
/// offers nearblock its budget (capacity budget / `util_cap`, so the usable
/// rate under the cap is the budget), whatever its line rate.
fn budgets_as_capacity(topology: &Topology, util_cap: f64) -> Topology {
    let mut t = topology.clone();
    for l in &mut t.links {
        if let Some(b) = l.budget_mbps {
            let cap = b / util_cap;
            l.capacity_mbps = Some(l.capacity_mbps.map_or(cap, |c| c.min(cap)));
        }
    }
    t
}

/// Per source of `order`: the links of its path and the bytes planned from it.
fn source_flows(
    order: &BuildOrder,
    graph: &Graph,
    paths: &ShortestPaths,
    plan: &ConstructionPlan,
    image: &ImageHolders,
    index_of: &BTreeMap<NodeId, u16>,
) -> Vec<SourceFlow> {
    let mut flows: Vec<SourceFlow> = order
        .sources
        .iter()
        .map(|src| {
            let n = graph.node_id(&src.node).expect("sources are topology nodes");
            (src.node.clone(), paths.path_links(n).map(|l| l as usize).collect(), 0)
        })
        .collect();
    for (&n, d) in plan.sources.iter().zip(&image.blocks.distinct) {
        if let Some(&i) = index_of.get(&n) {
            flows[usize::from(i)].2 += d.len;
        }
    }
    flows
}

/// The class of a source as seen from the target (`paths`' source): `self`,
/// `library`, `cache` (an appliance's block cache), `rack` (a host two links
/// away: the same rack) or `other_rack` — the splicer's classes.
fn class_of(graph: &Graph, paths: &ShortestPaths, source: NodeId) -> &'static str {
    if source == paths.source {
        return "self";
    }
    match graph.role(source) {
        Role::Library => "library",
        Role::Appliance | Role::Switch => "cache",
        Role::Hypervisor if paths.path_links(source).count() <= 2 => "rack",
        Role::Hypervisor => "other_rack",
    }
}

/// Candidates given their bytes by source class (of the distinct non-zero
/// blocks, as a build there would take them), at most this many, in rank
/// order: each costs one construction plan.
const CLASSED_CANDIDATES: usize = 16;

/// Fills the first [`CLASSED_CANDIDATES`] buildable candidates'
/// `bytes_by_class` from a construction plan on each.
fn classify_candidates(report: &mut PlaceReport, image: &ImageHolders, graph: &Graph) {
    for c in report
        .candidates
        .iter_mut()
        .filter(|c| c.total_cost.is_some())
        .take(CLASSED_CANDIDATES)
    {
        let Some(n) = graph.node_id(&c.host) else { continue };
        let paths = graph.shortest_paths(n);
        if let Ok(plan) = construct(image, graph, &paths) {
            c.bytes_by_class = bytes_by_class(&plan, image, graph, &paths);
        }
    }
}

/// A plan's distinct blocks' bytes by the class of their source.
fn bytes_by_class(
    plan: &ConstructionPlan,
    image: &ImageHolders,
    graph: &Graph,
    paths: &ShortestPaths,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (&source, d) in plan.sources.iter().zip(&image.blocks.distinct) {
        *out.entry(class_of(graph, paths, source).to_owned()).or_default() += d.len;
    }
    out
}

/// Per (host, image) of every indexed VM disk and library image: the share of
/// its distinct non-zero blocks another host also holds.
pub(super) fn held_elsewhere(
    store: &RedbStore,
    images: &[crate::index::store::ImageInfo],
) -> super::inventory::Shares {
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for i in images {
        if !seen.insert((i.host.clone(), i.image.clone())) {
            continue; // one block size is enough
        }
        let Ok(Some(m)) = store.manifest_at(&i.host, &i.image, i.block_size) else {
            continue;
        };
        let blocks = crate::plan::image::ImageBlocks::of(&m);
        if blocks.distinct.is_empty() {
            continue;
        }
        let hashes: Vec<_> = blocks.distinct.iter().map(|d| d.hash).collect();
        let Ok(lists) = store.holders_many(&hashes) else {
            continue;
        };
        let elsewhere = lists
            .iter()
            .filter(|l| l.iter().any(|loc| *loc.host != *i.host))
            .count();
        out.insert(
            (i.host.clone(), i.image.clone()),
            elsewhere as f64 / hashes.len() as f64,
        );
    }
    out
}

impl Manager {
    /// Shares the links' budgets among the running builds and the appliances
    /// prefetching across their uplinks, tells every build's agent but
    /// `skip`'s its new rates (and every appliance its share), and updates the
    /// jobs' predicted finish times. Returns the rates (bytes/s per source, 0:
    /// none) by job.
    pub(super) async fn reallocate(&self, skip: Option<u64>) -> BTreeMap<u64, Vec<u64>> {
        let Allocation {
            rates,
            agents,
            prefetch,
        } = self.allocation();
        self.tell_prefetchers(&prefetch).await;
        let now = std::time::SystemTime::now();
        for (job, r) in &rates {
            let Some(super::prefetchers::BuildAt {
                addr: agent,
                build,
                planned,
            }) = agents.get(job)
            else {
                continue;
            };
            if Some(*job) != skip {
                let _ = self
                    .client
                    .peer(agent)
                    .request(&Msg::BuildRates {
                        job: *build,
                        rates: r.clone(),
                    })
                    .await;
            }
            let done = self.job(*job).map(|j| j.progress.by_source).unwrap_or_default();
            // Every source paced: the slowest one's remaining bytes decide.
            let finish = planned
                .iter()
                .zip(r)
                .map(|((node, bytes), &rate)| {
                    let got = done.get(node).map_or(0, |s| s.bytes);
                    (rate > 0).then(|| budget::seconds(bytes.saturating_sub(got), rate as f64))
                })
                .try_fold(0.0f64, |acc, s| s.map(|s| acc.max(s)));
            let rates_by_node: BTreeMap<String, u64> =
                planned.iter().map(|(n, _)| n.clone()).zip(r.iter().copied()).collect();
            self.update(*job, |j| {
                if let Some(p) = &mut j.plan {
                    p.rates = rates_by_node;
                    p.predicted_finish_ms = finish.map(|s| {
                        let at = now + Duration::from_secs_f64(s);
                        at.duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    });
                }
            });
        }
        rates
    }

    /// The budgets' shares now: every running build's sources and every
    /// appliance prefetching across its uplink are flows.
    pub(super) fn allocation(&self) -> Allocation {
        let builds = self.flows.lock();
        let prefetchers = self.prefetchers.lock();
        let budgets = builds
            .values()
            .next_back()
            .map(|b| b.budgets.clone())
            .unwrap_or_default();
        let mut all = Vec::new();
        let mut owners = Vec::new();
        for (&job, b) in builds.iter() {
            for (_, links, _) in &b.sources {
                all.push(budget::Flow { links: links.clone() });
                owners.push(job);
            }
        }
        let from_builds = all.len();
        for p in prefetchers.values().filter(|p| p.prefetching) {
            all.push(budget::Flow {
                links: vec![p.uplink],
            });
        }
        let shares = budget::allocate(&budgets, &all);
        // Rates are positive and far below 2^64: the cast is exact enough.
        #[expect(clippy::cast_sign_loss, reason = "a share of a positive budget")]
        let bytes_per_s = |r: Option<f64>| r.map_or(0, |r| r.max(1.0) as u64);
        let mut rates: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (&job, &r) in owners.iter().zip(&shares) {
            rates.entry(job).or_default().push(bytes_per_s(r));
        }
        let mut counted = shares[from_builds..].iter();
        let prefetch = prefetchers
            .iter()
            .map(|(node, p)| {
                // Counted: its share; not yet: what it gets when it starts.
                let share = if p.prefetching {
                    counted.next().copied().flatten()
                } else {
                    budget::joining_share(&budgets, &all, &[p.uplink])
                };
                (node.clone(), p.addr.clone(), bytes_per_s(share), p.prefetching)
            })
            .collect();
        let agents = builds
            .iter()
            .map(|(&j, b)| {
                let planned = b.sources.iter().map(|(n, _, bytes)| (n.clone(), *bytes)).collect();
                (
                    j,
                    super::prefetchers::BuildAt {
                        addr: b.agent.clone(),
                        build: b.build,
                        planned,
                    },
                )
            })
            .collect();
        Allocation {
            rates,
            agents,
            prefetch,
        }
    }

    pub(super) async fn run(self: Arc<Self>, view: Arc<dyn PlanningView>, id: u64, cancel: CancellationToken) {
        let kind = self.job(id).map(|j| j.kind);
        let result = if kind == Some(super::jobs::JobKind::Migrate) {
            // A migration undoes what it did itself when cancelled (the VM
            // must keep running on its source).
            self.migrate(&view, id, &cancel).await
        } else if kind == Some(super::jobs::JobKind::Prestage) {
            // Runs until cancelled; releases its pins itself.
            self.prestage(&view, id, &cancel).await
        } else {
            tokio::select! {
                r = self.place_and_build(&view, id, &cancel) => r,
                () = cancel.cancelled() => Err("cancelled by the operator".into()),
            }
        };
        // Jobs waiting for this one's copy go on.
        self.release_seed(id);
        // Its share of the budgets goes to the builds still running.
        if self.flows.lock().remove(&id).is_some() {
            self.reallocate(None).await;
        }
        match result {
            Ok(()) => self.update(id, |j| {
                j.state = JobState::Done;
                j.event("done");
            }),
            Err(e) if cancel.is_cancelled() => {
                let nodes = self
                    .job(id)
                    .and_then(|j| j.plan)
                    .map(|p| p.staged_at.into_iter().chain([p.target]).collect::<Vec<_>>())
                    .unwrap_or_default();
                for addr in nodes.iter().filter_map(|n| self.addr_of(n)) {
                    let _ = self
                        .client
                        .peer(&addr)
                        .request(&Msg::BuildCancel { job: id })
                        .await;
                }
                self.update(id, |j| {
                    j.state = JobState::Cancelled;
                    j.event(e);
                });
            }
            Err(e) => self.update(id, |j| {
                j.state = JobState::Failed;
                j.event(format!("failed: {e}"));
                j.error = Some(e);
            }),
        }
    }

    async fn place_and_build(
        self: &Arc<Self>,
        view: &Arc<dyn PlanningView>,
        id: u64,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let placed = {
            let (me, view) = (self.clone(), view.clone());
            tokio::task::spawn_blocking(move || me.choose(&*view, id))
                .await
                .map_err(|e| format!("placement task: {e}"))??
        };
        self.fan_out_gate(id, cancel).await?;
        self.update(id, |j| {
            j.state = JobState::Building;
            j.event(match placed.mode {
                BuildMode::Agent => format!("building on {}", placed.target),
                BuildMode::Transparent => format!(
                    "building on {}: {} stages the blocks, then {}'s image tool reads the LUN through it",
                    placed.target, placed.builder, placed.target
                ),
            });
        });
        match placed.mode {
            BuildMode::Agent => self.build(view.as_ref(), id, &placed, cancel).await?,
            BuildMode::Transparent => {
                if let Err(e) = self.build(view.as_ref(), id, &placed, cancel).await {
                    if cancel.is_cancelled() {
                        return Err(e);
                    }
                    // The import still works: the appliance sources on demand.
                    self.update(id, |j| {
                        j.event(format!("staging at {} failed: {e}; the reads are sourced on demand", placed.builder));
                    });
                }
                self.import(id, &placed, cancel).await?;
            }
        }
        self.update(id, |j| {
            j.state = JobState::Indexing;
            j.event("built; waiting for the global index to list it");
        });
        let spec = self.job(id).ok_or("job vanished")?.spec;
        let image = vm_image_name(&spec.name);
        let started = Instant::now();
        loop {
            let listed = self
                .store
                .images()
                .map_err(|e| e.to_string())?
                .iter()
                .any(|i| i.host == placed.target && i.image == image);
            if listed {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.update(id, |j| {
                    j.indexed_after_ms = Some(ms);
                    j.event(format!("the global index lists {image} on {} ({ms} ms)", placed.target));
                });
                return Ok(());
            }
            if started.elapsed() > self.options.index_wait {
                return Err(format!(
                    "built, but the global index did not list {image} on {} within {:?}",
                    placed.target, self.options.index_wait
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fan-out: of the jobs that build one image at the same time, the first
    /// (the seed) builds at once; the others wait until it ends, then plan with
    /// its copy in the index, so the image crosses the library's link once and
    /// spreads from host to host (the plan prices each source by its path). A
    /// job also waits for the seed of another image that holds at least
    /// [`SHARED_FOR_SEED`] of its blocks, so similar images cross once too.
    async fn fan_out_gate(self: &Arc<Self>, id: u64, cancel: &CancellationToken) -> Result<(), String> {
        let image = self.job(id).ok_or("job vanished")?.spec.image;
        let mine = {
            let (me, image) = (self.clone(), image.clone());
            tokio::task::spawn_blocking(move || me.distinct_hashes(&image))
                .await
                .map_err(|e| format!("fan-out task: {e}"))?
        };
        // Each round either waits for a seed's end or sees a new seed: bounded
        // by the jobs running.
        loop {
            let running_seeds: Vec<(String, u64, tokio::sync::watch::Receiver<bool>)> = self
                .seeds
                .lock()
                .iter()
                .filter(|(_, (seed, _))| *seed != id)
                .map(|(i, (seed, tx))| (i.clone(), *seed, tx.subscribe()))
                .collect();
            let mut wait_for = None;
            for (other, seed, rx) in &running_seeds {
                let shared = if *other == image {
                    1.0
                } else {
                    let (me, o) = (self.clone(), other.clone());
                    let theirs = tokio::task::spawn_blocking(move || me.distinct_hashes(&o))
                        .await
                        .map_err(|e| format!("fan-out task: {e}"))?;
                    shared_share(&mine, &theirs)
                };
                if shared >= SHARED_FOR_SEED {
                    wait_for = Some((other.clone(), *seed, rx.clone(), shared));
                    break;
                }
            }
            let Some((other, seed, mut done, shared)) = wait_for else {
                let mut seeds = self.seeds.lock();
                let new_seed = seeds
                    .values()
                    .any(|(s, _)| *s != id && !running_seeds.iter().any(|(_, x, _)| x == s));
                if new_seed {
                    continue;
                }
                seeds
                    .entry(image)
                    .or_insert_with(|| (id, tokio::sync::watch::channel(false).0));
                return Ok(());
            };
            self.update(id, |j| {
                j.event(format!(
                    "waiting for job {seed}, the first build of {other} ({:.0}% of this image's blocks), to source from its copy",
                    shared * 100.0
                ));
            });
            tokio::select! {
                _ = done.wait_for(|d| *d) => {}
                () = cancel.cancelled() => return Err("cancelled by the operator".into()),
            }
        }
    }

    /// The distinct non-zero blocks of `image` as the index holds it (empty
    /// when it cannot be read: such a job waits only for its own image).
    fn distinct_hashes(&self, image: &str) -> HashSet<crate::index::BlockHash> {
        let Ok(infos) = self.store.images() else {
            return HashSet::new();
        };
        let Some(info) = infos.iter().find(|i| i.image == image) else {
            return HashSet::new();
        };
        match self.store.manifest_at(&info.host, image, info.block_size) {
            Ok(Some(m)) => m.blocks.iter().flatten().copied().collect(),
            _ => HashSet::new(),
        }
    }

    /// The end of job `id`: if it seeded its image, the jobs waiting on it go on.
    fn release_seed(&self, id: u64) {
        let mut seeds = self.seeds.lock();
        let image = seeds
            .iter()
            .find(|(_, (seed, _))| *seed == id)
            .map(|(image, _)| image.clone());
        if let Some((_, tx)) = image.and_then(|i| seeds.remove(&i)) {
            tx.send_replace(true);
        }
    }

    /// Candidates, ranking and the policy's choice (blocking: reads the store).
    pub(super) fn choose(&self, view: &dyn PlanningView, id: u64) -> Result<Placed, String> {
        let spec = self.job(id).ok_or("job vanished")?.spec;
        let Ranked {
            topology,
            manifest,
            manifest_host,
            report,
            weighting: _,
            notes,
        } = self.rank(view, &spec)?;
        for n in notes {
            self.update(id, |j| j.event(n));
        }
        let target = match &spec.target {
            Some(t) => {
                let ok = report
                    .candidates
                    .iter()
                    .any(|c| c.host == *t && c.total_cost.is_some());
                if !ok {
                    return Err(format!("target {t} is not a candidate that can build the image"));
                }
                t.clone()
            }
            None => report.chosen.clone().ok_or("no candidate can build the image")?,
        };
        let ranked: Vec<String> = report
            .candidates
            .iter()
            .map(|c| match c.total_cost {
                Some(k) => format!("{} {k}", c.host),
                None => format!("{} -", c.host),
            })
            .collect();
        self.update(id, |j| {
            j.event(format!("ranked: {}; chose {target}", ranked.join(", ")));
            j.placement = Some(report);
        });
        let builder = match spec.mode {
            BuildMode::Agent => target.clone(),
            BuildMode::Transparent => super::inventory::rack_of(&topology, &target)
                .ok_or_else(|| format!("{target} has no rack node in the topology to stage at"))?,
        };
        Ok(Placed {
            topology,
            manifest,
            manifest_host,
            target,
            builder,
            mode: spec.mode,
            patch: None,
            build: id,
        })
    }

    /// The hypervisors that could take a VM of `spec.image`, ranked by
    /// construction cost over the global index and chosen by `spec.policy`
    /// (blocking: reads the store).
    pub fn rank(&self, view: &dyn PlanningView, spec: &PlaceSpec) -> Result<Ranked, String> {
        let topology = view.topology().ok_or("no topology: the manager needs [cost] topology")?;
        let graph = Graph::from_topology(&topology);
        let (manifest_host, manifest) = self.library_manifest(&topology, &spec.image)?;
        let need = manifest.blocks.iter().filter(|b| b.is_some()).count() as u64
            * u64::from(manifest.block_size);
        let now = Instant::now();
        let mut candidates = Vec::new();
        let mut notes = Vec::new();
        for r in self.index.hosts.view(now) {
            if graph.node_id(&r.host).map(|n| graph.role(n)) != Some(Role::Hypervisor) {
                continue;
            }
            let rack = super::inventory::rack_of(&topology, &r.host);
            if !spec.within.is_empty()
                && !spec
                    .within
                    .iter()
                    .any(|w| *w == r.host || Some(w) == rack.as_ref())
            {
                continue;
            }
            if Duration::from_millis(r.age_ms) > self.options.stale_after {
                notes.push(format!("{}: its agent's last report is {} ms old", r.host, r.age_ms));
                continue;
            }
            match r.resources.disk_free_bytes {
                Some(free) if free < need => {
                    notes.push(format!("{}: {free} bytes free, the disk needs {need}", r.host));
                    continue;
                }
                None => {
                    notes.push(format!("{}: reports no free disk (no [hypervisor])", r.host));
                    continue;
                }
                Some(_) => {}
            }
            if r.vms.iter().any(|v| v.name == spec.name) {
                notes.push(format!("{}: has a VM named {} already", r.host, spec.name));
                continue;
            }
            candidates.push(r.host);
        }
        let mut notes: Vec<String> = notes.into_iter().map(|n| format!("not a candidate: {n}")).collect();
        if candidates.is_empty() {
            return Err(format!("no candidate host: {}", notes.join("; ")));
        }
        let store = Store::new(self.store.clone()).map_err(|e| e.to_string())?;
        let image = ImageHolders::resolve(&manifest, &store, &graph).map_err(|e| e.to_string())?;
        let weighting = spec.weighting.unwrap_or(match spec.mode {
            BuildMode::Transparent if self.history(&spec.image).is_some() => Weighting::Usage,
            _ => Weighting::None,
        });
        let placement = match weighting {
            Weighting::None => place(&image, &graph, &candidates),
            Weighting::Usage => {
                let history = self
                    .history(&spec.image)
                    .ok_or_else(|| format!("no access history of {}", spec.image))?;
                let weights = history.distinct_weights(&manifest, &image.blocks);
                let read = weights.iter().filter(|&&w| w > 0.0).count();
                notes.push(format!(
                    "priced by usage: {} of {} distinct blocks read in {} recorded boot(s)",
                    read,
                    weights.len(),
                    history.boots
                ));
                place_weighted(&image, &graph, &candidates, &weights)
            }
        }
        .map_err(|e| e.to_string())?;
        let policy: Policy = spec.policy.parse().map_err(|e| format!("policy: {e}"))?;
        let metrics = view.host_metrics();
        let mut report = placement.report(&spec.image, policy, &metrics);
        classify_candidates(&mut report, &image, &graph);
        Ok(Ranked {
            topology,
            manifest,
            manifest_host,
            report,
            weighting,
            notes,
        })
    }

    /// The image's manifest at its smallest block size, preferring the library's
    /// copy.
    fn library_manifest(&self, topology: &Topology, image: &str) -> Result<(String, Manifest), String> {
        let role = |n: &str| topology.nodes.iter().find(|x| x.name == n).map(|x| x.role);
        let mut infos: Vec<_> = self
            .store
            .images()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|i| i.image == image)
            .collect();
        infos.sort_by_key(|i| (role(&i.host) != Some(Role::Library), i.block_size, i.host.clone()));
        let info = infos.first().ok_or_else(|| format!("image {image} is not in the global index"))?;
        let m = self
            .store
            .manifest_at(&info.host, image, info.block_size)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("image {image} of {} vanished from the index", info.host))?;
        Ok((info.host.clone(), m))
    }

    /// The construction plan without `excluded` sources, as a build order.
    fn plan_order(
        &self,
        id: u64,
        placed: &Placed,
        excluded: &BTreeSet<String>,
    ) -> Result<(BuildOrder, PlanView, ShortestPaths, Vec<SourceFlow>), String> {
        let spec = self.job(id).ok_or("job vanished")?.spec;
        let capacity = CapacityConfig::default();
        let graph = Graph::from_topology(&budgets_as_capacity(&placed.topology, capacity.util_cap));
        let store = Store::new(self.store.clone()).map_err(|e| e.to_string())?;
        let hosts = store.hosts();
        let addrs: BTreeMap<String, String> = self.index.addrs().into_iter().collect();
        // Failed sources, and holders nobody can ask (no address known: an
        // appliance's cache whose indexer advertises none).
        let excluded_ids = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| excluded.contains(*h) || !addrs.contains_key(*h))
            .map(|(i, _)| i as HostId)
            .collect();
        let index = Excluding {
            inner: &store,
            excluded: excluded_ids,
        };
        let image = match &placed.patch {
            Some(p) => ImageHolders::resolve_blocks(
                crate::plan::image::ImageBlocks::at_positions(&placed.manifest, p),
                &index,
                &graph,
            ),
            None => ImageHolders::resolve(&placed.manifest, &index, &graph),
        }
        .map_err(|e| e.to_string())?;
        let builder = graph
            .node_id(&placed.builder)
            .ok_or_else(|| format!("{} is not in the topology", placed.builder))?;
        let paths = graph.shortest_paths(builder);
        let (plan, finish) = plan_of(&image, &graph, &paths, &capacity)?;
        let mut sources: Vec<BuildSource> = Vec::new();
        let mut index_of: BTreeMap<NodeId, u16> = BTreeMap::new();
        for &n in &plan.sources {
            if index_of.contains_key(&n) {
                continue;
            }
            let node = graph.name(n).to_owned();
            let addr = addrs
                .get(&node)
                .ok_or_else(|| format!("no block service address known for {node}"))?;
            let i = u16::try_from(sources.len()).map_err(|_| "too many sources")?;
            index_of.insert(n, i);
            sources.push(BuildSource {
                node,
                addr: addr.clone(),
            });
        }
        let runs = to_runs(plan.sources.iter().map(|n| index_of.get(n).copied()));
        if runs.len() > MAX_RUNS {
            return Err(format!("the plan has {} runs, at most {MAX_RUNS}", runs.len()));
        }
        let mut by_source = BTreeMap::new();
        for &n in &plan.sources {
            *by_source.entry(graph.name(n).to_owned()).or_insert(0u64) += 1;
        }
        let link_bytes = plan.link_bytes(&paths, graph.links().len());
        let by_link = crate::plan::construct::loaded_links(&link_bytes)
            .map(|(l, b)| {
                let gl = graph.link(l);
                (format!("{}-{}", graph.name(gl.a), graph.name(gl.b)), b)
            })
            .collect();
        let view = PlanView {
            capacity_finish_s: finish.map(|f| f.0),
            plain_finish_s: finish.map(|f| f.1),
            target: placed.target.clone(),
            staged_at: (placed.builder != placed.target).then(|| placed.builder.clone()),
            blocks_total: image.blocks.distinct.len() as u64,
            blocks_local: plan.blocks_local,
            blocks_fetched: plan.blocks_fetched,
            blocks_zero: plan.blocks_zero,
            total_cost: plan.total_cost,
            by_source,
            by_link,
            excluded: excluded.iter().cloned().collect(),
            replans: 0,
            rates: BTreeMap::new(),
            predicted_finish_ms: None,
        };
        let order = BuildOrder {
            job: placed.build,
            vm: spec.name,
            image: spec.image,
            manifest_host: placed.manifest_host.clone(),
            block_size: placed.manifest.block_size,
            digest: *blake3::hash(&placed.manifest.encode()).as_bytes(),
            sources,
            runs,
            rates: Vec::new(),
        };
        let flows = source_flows(&order, &graph, &paths, &plan, &image, &index_of);
        Ok((order, view, paths, flows))
    }

    /// Orders the build (or the staging), follows it and re-plans around
    /// failed sources.
    pub(super) async fn build(
        self: &Arc<Self>,
        view: &dyn PlanningView,
        id: u64,
        placed: &Placed,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let mut placed = placed.clone();
        let target_addr = self.addr_of(&placed.builder).ok_or_else(|| {
            format!(
                "no peer address known for {} (an appliance's indexer advertises one with `advertise`)",
                placed.builder
            )
        })?;
        let agent = self.client.peer(&target_addr);
        let mut excluded = BTreeSet::new();
        let mut replans = 0;
        loop {
            let (mut order, mut plan_view, paths, flows) = {
                let (me, placed_ex) = (self.clone(), excluded.clone());
                // Planning reads the store: off the async workers.
                let placed = placed.clone();
                tokio::task::spawn_blocking(move || me.plan_order(id, &placed, &placed_ex))
                    .await
                    .map_err(|e| format!("planning task: {e}"))??
            };
            plan_view.replans = replans;
            let message = plan_event(&plan_view);
            self.update(id, |j| {
                j.event(message);
                j.plan = Some(plan_view);
            });
            // This build's flows join the budget allocation (which records its
            // rates and predicted finish in the plan above); the others' rates
            // change with it.
            *self.budget_topology.lock() = Some(Arc::new(placed.topology.clone()));
            self.flows.lock().insert(
                id,
                super::RunningBuild {
                    build: placed.build,
                    agent: target_addr.clone(),
                    sources: flows,
                    budgets: placed.topology.links.iter().map(|l| l.budget_mbps).collect(),
                },
            );
            let shares = self.reallocate(Some(id)).await;
            order.rates = shares.get(&id).cloned().unwrap_or_default();
            let reply = agent
                .request(&placed.order_msg(order))
                .await
                .map_err(|e| format!("build order to {}: {e}", placed.builder))?;
            if !matches!(reply, Msg::BuildReply { .. }) {
                return Err(format!("{} answered the build order with {}", placed.builder, reply.name()));
            }
            // Another build's allocation may have sent this one new rates before
            // its agent had the order (refused: no such build): send every build
            // the rates in force now that the agent has it.
            self.reallocate(None).await;
            let graph = Graph::from_topology(&placed.topology);
            let report = match self
                .follow(id, placed.build, &agent, Some((&graph, &paths, view)), cancel)
                .await?
            {
                Followed::Settled(report) => report,
                Followed::Loaded(why) => {
                    replans += 1;
                    if replans > MAX_REPLANS {
                        return Err(format!("gave up after {MAX_REPLANS} re-plans"));
                    }
                    self.update(id, |j| j.event(format!("{why}: re-planning with the live link costs")));
                    if let Some(t) = view.topology() {
                        placed.topology = t;
                    }
                    continue;
                }
            };
            match report.state {
                BuildState::Done => {
                    if placed.mode == BuildMode::Transparent {
                        let staged = self.job(id).map_or(0, |j| j.progress.bytes_written);
                        self.update(id, |j| {
                            j.event(format!("staged at {}: {staged} bytes", placed.builder));
                        });
                    }
                    return Ok(());
                }
                BuildState::NeedsSources => {
                    let newly = self.newly_failed(id, &report, &excluded);
                    if newly.is_empty() {
                        return Err("blocks missing but no source newly failed".into());
                    }
                    excluded.extend(newly);
                    replans += 1;
                    if replans > MAX_REPLANS {
                        return Err(format!("gave up after {MAX_REPLANS} re-plans"));
                    }
                }
                BuildState::Failed => {
                    return Err(report.error.unwrap_or_else(|| "the agent's build failed".into()))
                }
                BuildState::Cancelled => return Err("the agent cancelled the build".into()),
                BuildState::Fetching => unreachable!("follow returns at a settled state"),
            }
        }
    }

    /// The sources of `report` that failed and were not left out yet, each
    /// named in an event.
    fn newly_failed(&self, id: u64, report: &BuildReport, excluded: &BTreeSet<String>) -> Vec<String> {
        let newly: Vec<String> = report
            .failures
            .iter()
            .map(|f| f.node.clone())
            .filter(|n| !excluded.contains(n))
            .collect();
        for f in report.failures.iter().filter(|f| newly.contains(&f.node)) {
            self.update(id, |j| {
                j.event(format!(
                    "source {} failed ({}); {} of its blocks missing",
                    f.node, f.reason, f.blocks_missing
                ));
            });
        }
        newly
    }

    /// Has the target's agent import the disk with the host's image tool from
    /// the library's LUN (transparent mode), and follows it.
    async fn import(&self, id: u64, placed: &Placed, cancel: &CancellationToken) -> Result<(), String> {
        let portal = self.options.library_portal.ok_or("no [manager] library_portal")?;
        let spec = self.job(id).ok_or("job vanished")?.spec;
        let source = import_source(portal, &spec.image)
            .ok_or_else(|| format!("`{}` is no TARGET/LUN name", spec.image))?;
        let addr = self
            .addr_of(&placed.target)
            .ok_or_else(|| format!("no block service address known for {}", placed.target))?;
        let agent = self.client.peer(&addr);
        self.update(id, |j| j.event(format!("{} imports {source}", placed.target)));
        let started = Instant::now();
        let reply = agent
            .request(&Msg::Import {
                job: id,
                vm: spec.name,
                image: spec.image,
                size: placed.manifest.size,
                source,
            })
            .await
            .map_err(|e| format!("import order to {}: {e}", placed.target))?;
        if !matches!(reply, Msg::BuildReply { .. }) {
            return Err(format!("{} answered the import order with {}", placed.target, reply.name()));
        }
        let Followed::Settled(report) = self.follow(id, id, &agent, None, cancel).await? else {
            unreachable!("an import is followed without load checks");
        };
        match report.state {
            BuildState::Done => {
                let ms = started.elapsed().as_millis();
                self.update(id, |j| {
                    j.event(format!("imported on {} in {ms} ms", placed.target));
                });
                Ok(())
            }
            BuildState::Cancelled => Err("the agent cancelled the import".into()),
            _ => Err(report.error.unwrap_or_else(|| "the import failed".into())),
        }
    }

    /// Follows build `build` of job `id` at `agent` until it settles (no load
    /// checks, no progress).
    pub(super) async fn follow_build(
        &self,
        id: u64,
        build: u64,
        agent: &crate::peer::client::Peer,
        cancel: &CancellationToken,
    ) -> Result<BuildReport, String> {
        match self.follow(id, build, agent, None, cancel).await? {
            Followed::Settled(r) => Ok(r),
            Followed::Loaded(_) => unreachable!("followed without load checks"),
        }
    }

    /// Polls the builder until the build settles (done, failed, or waiting for
    /// sources), recording progress when `plan` (its graph and paths) is given,
    /// and then also watching its links' load: a link at its cap with others'
    /// traffic on it, twice in a row, ends the follow with [`Followed::Loaded`].
    async fn follow(
        &self,
        id: u64,
        build: u64,
        agent: &crate::peer::client::Peer,
        plan: Option<(&Graph, &ShortestPaths, &dyn PlanningView)>,
        cancel: &CancellationToken,
    ) -> Result<Followed, String> {
        let mut failures_in_a_row = 0;
        let mut load = LoadWatch::default();
        // Short builds (a migration's last round, with the VM paused) are seen
        // to end at once: the first polls come quickly, then every `poll`.
        let mut interval = Duration::from_millis(10).min(self.options.poll);
        loop {
            if cancel.is_cancelled() {
                return Err("cancelled by the operator".into());
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(self.options.poll);
            let report = match agent.request(&Msg::BuildStatus { job: build }).await {
                Ok(Msg::BuildReply { report }) => *report,
                Ok(m) => return Err(format!("status answered with {}", m.name())),
                Err(e) => {
                    failures_in_a_row += 1;
                    if failures_in_a_row >= 20 {
                        return Err(format!("the target's agent stopped answering: {e}"));
                    }
                    continue;
                }
            };
            failures_in_a_row = 0;
            if report.state != BuildState::Fetching {
                if let Some((graph, paths, _)) = plan {
                    self.update_progress(id, progress_of(&report, graph, paths));
                }
                return Ok(Followed::Settled(report));
            }
            if let Some((graph, paths, view)) = plan {
                self.update_progress(id, progress_of(&report, graph, paths));
                let ours = link_wire_bytes(&report, graph, paths);
                if let Some(why) = load.check(graph, &ours, &view.link_utilisation()) {
                    return Ok(Followed::Loaded(why));
                }
            }
        }
    }
}

/// How following a build ended.
enum Followed {
    /// Done, failed, cancelled or waiting for sources.
    Settled(BuildReport),
    /// Still fetching, but a link of its plan is loaded by others.
    Loaded(String),
}

/// The utilisation at which a link of a running build's plan counts as loaded
/// (the capacity-aware plan's cap).
const LOAD_CAP: f64 = 0.8;
/// Others' share of a loaded link's capacity (its utilisation minus this
/// build's) at which the build re-plans: what it planned on is not there.
const LOAD_OTHERS: f64 = 0.25;
/// 1-second windows in a row a link must be loaded so, to re-plan.
const LOAD_STRIKES: u32 = 2;

/// A running build's own rate per link (from its connections' wire bytes)
/// against the links' measured utilisation.
#[derive(Default)]
struct LoadWatch {
    /// When the window started, and the build's wire bytes per link then.
    window: Option<(Instant, Vec<u64>)>,
    /// The build's own utilisation per link over the last full window.
    ours: Vec<f64>,
    strikes: Vec<u32>,
}

impl LoadWatch {
    /// Why the plan should change, if a link carrying this build is at
    /// [`LOAD_CAP`] with others' traffic at least [`LOAD_OTHERS`] of it.
    fn check(&mut self, graph: &Graph, bytes: &[u64], util: &[f64]) -> Option<String> {
        let now = Instant::now();
        match &self.window {
            None => {
                self.window = Some((now, bytes.to_vec()));
                return None;
            }
            Some((t0, b0)) if now.duration_since(*t0) >= Duration::from_secs(1) => {
                let dt = now.duration_since(*t0).as_secs_f64();
                self.ours = bytes
                    .iter()
                    .zip(b0.iter().chain(std::iter::repeat(&0)))
                    .enumerate()
                    .map(|(l, (b, a))| {
                        graph.link(l as crate::cost::paths::LinkId).capacity_mbps.map_or(0.0, |c| {
                            b.saturating_sub(*a) as f64 * 8.0 / dt / (c * 1e6)
                        })
                    })
                    .collect();
                self.window = Some((now, bytes.to_vec()));
            }
            // Strikes count windows, not polls: a poll inside a window has
            // nothing new to judge.
            Some(_) => return None,
        }
        self.strikes.resize(bytes.len(), 0);
        for l in 0..bytes.len() {
            let u = util.get(l).copied().unwrap_or(0.0);
            let mine = self.ours.get(l).copied().unwrap_or(0.0);
            // Only links this build used in the window: after a re-plan, the
            // links it left are not its business.
            if mine > 0.0 && u >= LOAD_CAP && u - mine >= LOAD_OTHERS {
                self.strikes[l] += 1;
            } else {
                self.strikes[l] = 0;
            }
            if self.strikes[l] >= LOAD_STRIKES {
                let gl = graph.link(l as crate::cost::paths::LinkId);
                return Some(format!(
                    "link {}-{} at {:.0}% of its capacity, this build {:.0}%",
                    graph.name(gl.a),
                    graph.name(gl.b),
                    u * 100.0,
                    mine * 100.0
                ));
            }
        }
        None
    }
}

/// A build's wire bytes per link (each source's connection bytes on every
/// link of its path).
fn link_wire_bytes(report: &BuildReport, graph: &Graph, paths: &ShortestPaths) -> Vec<u64> {
    let mut out = vec![0u64; graph.links().len()];
    for t in &report.by_source {
        if let Some(n) = graph.node_id(&t.node) {
            for l in paths.path_links(n) {
                out[l as usize] += t.wire_bytes;
            }
        }
    }
    out
}

/// A build report in bytes by source, class, hop count and link.
fn progress_of(report: &BuildReport, graph: &Graph, paths: &ShortestPaths) -> Progress {
    let mut p = Progress {
        blocks_total: report.blocks_total,
        blocks_done: report.blocks_done,
        bytes_written: report.bytes_written,
        ..Progress::default()
    };
    for t in &report.by_source {
        let node = graph.node_id(&t.node);
        let hops = node.map(|n| paths.path_links(n).count() as u32);
        let class = node.map_or("unknown", |n| class_of(graph, paths, n)).to_owned();
        *p.by_class.entry(class.clone()).or_default() += t.bytes;
        if let Some(h) = hops {
            *p.by_hops.entry(h).or_default() += t.bytes;
        }
        if let Some(n) = node {
            for l in paths.path_links(n) {
                let gl = graph.link(l);
                *p.by_link
                    .entry(format!("{}-{}", graph.name(gl.a), graph.name(gl.b)))
                    .or_default() += t.wire_bytes;
            }
        }
        p.by_source.insert(
            t.node.clone(),
            SourceBytes {
                blocks: t.blocks,
                bytes: t.bytes,
                wire_bytes: t.wire_bytes,
                hops,
                class,
            },
        );
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_become_capacities_under_the_cap() {
        let t = Topology::parse(
            "[[node]]\nname = \"a\"\nrole = \"library\"\n[[node]]\nname = \"b\"\nrole = \"hypervisor\"\n[[node]]\nname = \"c\"\nrole = \"hypervisor\"\n\
             [[link]]\na = \"a\"\nb = \"b\"\ncapacity_mbps = 10000\nbudget_mbps = 200\n\
             [[link]]\na = \"a\"\nb = \"c\"\nbudget_mbps = 400\n\
             [[link]]\na = \"b\"\nb = \"c\"\ncapacity_mbps = 1000\n",
        )
        .unwrap();
        let caps: Vec<Option<f64>> = budgets_as_capacity(&t, 0.8)
            .links
            .iter()
            .map(|l| l.capacity_mbps)
            .collect();
        assert_eq!(caps, [Some(250.0), Some(500.0), Some(1000.0)]);
    }

    #[test]
    fn shared_share_is_the_part_of_mine_theirs_hold() {
        let h = |n: u8| crate::index::BlockHash([n; 32]);
        let mine: HashSet<_> = [h(1), h(2), h(3), h(4)].into();
        let theirs: HashSet<_> = [h(2), h(4), h(9)].into();
        assert!((shared_share(&mine, &theirs) - 0.5).abs() < 1e-12);
        assert!(shared_share(&HashSet::new(), &theirs).abs() < 1e-12);
    }

    #[test]
    fn library_images_are_target_and_lun() {
        assert_eq!(lun_of("iqn.2026-12.x:img/3"), Some(("iqn.2026-12.x:img", 3)));
        for bad in ["vm/web1", "img", "/1", "a/b/1", "iqn.x/one"] {
            assert_eq!(lun_of(bad), None, "{bad}");
        }
        assert_eq!(
            import_source("198.18.0.1:3260".parse().unwrap(), "iqn.x:y/2").as_deref(),
            Some("iscsi://198.18.0.1:3260/iqn.x:y/2")
        );
    }
}
