//! `nearblock agent`: on a hypervisor (or the library host), index the local image
//! files into the agent's own store, push the changes to the parent indexer,
//! rescan periodically (and on SIGHUP) so changed blocks stop being offered, and
//! serve the blocks by hash to authenticated peers.
//!
//! Images are the configured `[[image]]` files plus, with `tgt_control_port`, every
//! LUN backing file tgtd lists (`tgtadm -C N --lld iscsi --op show --mode target`),
//! named `IQN/LUN` — so the library is a block source like any other — plus
//! every settled file of each `[[http_root]]`, named by the version its HTTP
//! origin serves (`super::http_root`). An image
//! whose file disappears (VM stopped, LUN deleted) is removed from the index.
//!
//! Every `metrics_interval_ms` the agent also reports its host's load (`cpu`,
//! `mem`, `disk` used fractions; measured, or pinned in `[metrics]`) to the
//! parent, for the planner's placement policies (`super::hosts`).
//!
//! Serving reads `len` bytes at the indexed offset of the file. It does not
//! verify them: if the file changed behind the index the receiver's blake3 check
//! rejects the block, and the next rescan records the changed blocks.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;

use parking_lot::{Mutex, RwLock};

use crate::{
    hypervisor::{vm_image_name, Hypervisor},
    index::{
        delta::{self, Outcome, Policy},
        BlockHash, BlockStore, Change, Location, RedbStore, StoreOptions,
    },
    peer::{
        config::{AgentConfig, HttpRootConfig, ImageConfig, ResourcePins},
        http_root::{self, Version},
        error::{AnnotateIo, PeerError, Result},
        proto::{BlockReply, HostResources, Role, TrackReport, VmReport},
        server::BlockSource,
    },
};

/// What one scan did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScanSummary {
    pub images: usize,
    pub new: usize,
    pub changed_blocks: u64,
    pub unchanged: usize,
    pub removed: usize,
    pub errors: Vec<String>,
    /// Store sequence number after the scan.
    pub seq: u64,
}

struct Open {
    path: PathBuf,
    file: Option<Arc<File>>,
}

pub struct Agent {
    node: String,
    store: Arc<RedbStore>,
    sizes: Vec<u32>,
    policy: Policy,
    configured: Vec<ImageConfig>,
    tgt: Option<(String, u32)>,
    http_roots: Vec<HttpRootConfig>,
    /// Asks HTTP origins for their files' validators.
    http: ureq::Agent,
    /// Image → its file (opened on first read, dropped at every scan so a
    /// replaced file is reopened).
    files: RwLock<HashMap<String, Open>>,
    /// Serialises scans.
    scan_lock: Mutex<()>,
    /// The host's VMs, whose disks are offered as `vm/<name>`.
    hypervisor: Option<Arc<dyn Hypervisor>>,
    /// Images of VMs a migration tracks: re-indexed by its rounds only.
    tracked: Mutex<std::collections::HashSet<String>>,
}

impl Agent {
    pub fn new(
        cfg: &AgentConfig,
        store: Arc<RedbStore>,
        hypervisor: Option<Arc<dyn Hypervisor>>,
    ) -> Self {
        Self {
            node: cfg.node.clone(),
            store,
            sizes: cfg.sizes.clone(),
            policy: Policy {
                rescan_after: Duration::from_secs(cfg.full_rescan_secs),
                force: false,
            },
            configured: cfg.image.clone(),
            tgt: cfg.tgt_control_port.map(|p| (cfg.tgtadm.clone(), p)),
            http_roots: cfg.http_root.clone(),
            http: super::http_root::http_agent(),
            files: RwLock::new(HashMap::new()),
            scan_lock: Mutex::new(()),
            hypervisor,
            tracked: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The images this agent should offer now: configured ones, the VMs' disks,
    /// then tgtd's LUNs (without the HTTP roots' files: [`Self::http_versions`]).
    pub fn wanted(&self) -> Result<BTreeMap<String, PathBuf>> {
        let mut out: BTreeMap<String, PathBuf> = self
            .configured
            .iter()
            .map(|i| (i.name.clone(), i.path.clone()))
            .collect();
        if let Some(hv) = &self.hypervisor {
            for vm in hv.vms()? {
                out.entry(vm_image_name(&vm.name)).or_insert(vm.path);
            }
        }
        if let Some((tgtadm, port)) = &self.tgt {
            let o = std::process::Command::new(tgtadm)
                .args([
                    "-C",
                    &port.to_string(),
                    "--lld",
                    "iscsi",
                    "--op",
                    "show",
                    "--mode",
                    "target",
                ])
                .output()
                .io_context(|| format!("running {tgtadm}"))?;
            if !o.status.success() {
                return Err(PeerError::Tgt(format!(
                    "{tgtadm} --op show failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )));
            }
            for l in parse_tgt_show(&String::from_utf8_lossy(&o.stdout)) {
                out.entry(format!("{}/{}", l.iqn, l.lun))
                    .or_insert(l.backing);
            }
        }
        Ok(out)
    }

    /// The versions of every `[[http_root]]` file the origin serves now
    /// (errors of single files are returned, not fatal).
    fn http_versions(&self) -> (Vec<Version>, Vec<String>) {
        let now = std::time::SystemTime::now();
        let mut versions = Vec::new();
        let mut errors = Vec::new();
        for root in &self.http_roots {
            let scan = http_root::scan_root(root, &self.http, now);
            if scan.unsettled > 0 {
                tracing::debug!(dir = %root.dir.display(), files = scan.unsettled, "modified too recently to index yet");
            }
            versions.extend(scan.versions);
            errors.extend(scan.errors);
        }
        (versions, errors)
    }

    /// Migration's source side: what VM `vm` wrote since `since` (a token
    /// from the last call; none starts tracking), re-indexed. Starting indexes
    /// the whole disk once so the manifest is current from the token on; a
    /// round rehashes only the extents the hook names (with a dirty bitmap,
    /// what was written; without, every allocated extent). Blocking.
    pub fn track(&self, vm: &str, since: Option<&str>) -> std::result::Result<TrackReport, String> {
        let hv = self
            .hypervisor
            .as_ref()
            .ok_or_else(|| format!("{} has no hypervisor hook", self.node))?;
        let disk = hv
            .vms()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|d| d.name == vm)
            .ok_or_else(|| format!("no VM {vm} on {}", self.node))?;
        let image = vm_image_name(vm);
        let _scanning = self.scan_lock.lock();
        let dirty = hv.dirty_since(vm, since).map_err(|e| e.to_string())?;
        // From now on only the rounds re-index it (a scan would rehash the
        // whole disk each time it changed).
        self.tracked.lock().insert(image.clone());
        let bytes_dirty = dirty.bytes();
        let (bytes_hashed, changed) = if since.is_none() {
            let force = Policy {
                force: true,
                ..self.policy.clone()
            };
            let reports = delta::index_file(&self.store, &self.node, &image, &disk.path, &self.sizes, &force, &|_| {})
                .map_err(|e| e.to_string())?;
            let changed = reports
                .iter()
                .map(|r| match r.outcome {
                    Outcome::Delta { changed } => changed,
                    Outcome::New { blocks, .. } => blocks,
                    Outcome::Unchanged => 0,
                })
                .sum();
            (disk.size * self.sizes.len() as u64, changed)
        } else {
            let r = delta::index_extents(&self.store, &self.node, &image, &disk.path, &self.sizes, &dirty.extents)
                .map_err(|e| e.to_string())?;
            (r.bytes_hashed, r.changed)
        };
        let block_size = self.sizes.iter().copied().min().unwrap_or(4096);
        let manifest = self
            .store
            .manifest_at(&self.node, &image, block_size)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{image} is not indexed at {block_size}"))?;
        Ok(TrackReport {
            vm: vm.to_owned(),
            token: dirty.token,
            tracking: dirty.tracking,
            bytes_dirty,
            bytes_hashed,
            changed,
            seq: self.store.seq(),
            block_size,
            digest: *blake3::hash(&manifest.encode()).as_bytes(),
        })
    }

    /// Stops tracking VM `vm`: its disk is scanned as any other again.
    pub fn untrack(&self, vm: &str) -> std::result::Result<(), String> {
        self.tracked.lock().remove(&vm_image_name(vm));
        let hv = self
            .hypervisor
            .as_ref()
            .ok_or_else(|| format!("{} has no hypervisor hook", self.node))?;
        hv.stop_tracking(vm).map_err(|e| e.to_string())
    }

    /// Index every wanted image (only what changed is recorded), remove images that
    /// are gone. Errors of single images are collected, not fatal.
    pub fn scan(&self) -> Result<ScanSummary> {
        let _g = self.scan_lock.lock();
        let mut wanted = self.wanted()?;
        let (http_versions, http_errors) = self.http_versions();
        for v in &http_versions {
            wanted.entry(v.name.clone()).or_insert(v.path.clone());
        }
        let mut sum = ScanSummary {
            images: wanted.len(),
            errors: http_errors,
            ..Default::default()
        };
        // Files are reopened after a scan (a replaced file has a new inode).
        *self.files.write() = wanted
            .iter()
            .map(|(n, p)| {
                (
                    n.clone(),
                    Open {
                        path: p.clone(),
                        file: None,
                    },
                )
            })
            .collect();
        let mut present = BTreeSet::new();
        let tracked = self.tracked.lock().clone();
        for (name, path) in &wanted {
            if tracked.contains(name) {
                // A migration's rounds re-index it.
                present.insert(name.clone());
                sum.unchanged += 1;
                continue;
            }
            match delta::index_file(
                &self.store,
                &self.node,
                name,
                path,
                &self.sizes,
                &self.policy,
                &|_| {},
            ) {
                Ok(reports) => {
                    // An HTTP file that changed while it was read is not the
                    // version its name says: dropped (removed below) until the
                    // next scan.
                    if let Some(v) = http_versions.iter().find(|v| &v.name == name) {
                        if !http_root::unchanged(v) {
                            sum.errors
                                .push(format!("{name}: changed while it was indexed"));
                            continue;
                        }
                    }
                    present.insert(name.clone());
                    for r in reports {
                        match r.outcome {
                            Outcome::New { .. } => sum.new += 1,
                            Outcome::Delta { changed } => sum.changed_blocks += changed,
                            Outcome::Unchanged => sum.unchanged += 1,
                        }
                    }
                }
                Err(e) => sum
                    .errors
                    .push(format!("{name} ({}): {e:#}", path.display())),
            }
        }
        // Sources of ours that are no longer wanted, or whose file is unreadable.
        let mut gone = Vec::new();
        for info in self.store.images()? {
            if info.host == self.node && !present.contains(&info.image) {
                gone.push(Change::RemoveImage {
                    host: info.host,
                    image: info.image,
                    block_size: info.block_size,
                });
            }
        }
        if !gone.is_empty() {
            sum.removed = gone.len();
            self.store.apply(&gone)?;
        }
        sum.seq = self.store.seq();
        Ok(sum)
    }

    fn file(&self, image: &str) -> Option<Arc<File>> {
        if let Some(o) = self.files.read().get(image) {
            if let Some(f) = &o.file {
                return Some(f.clone());
            }
        }
        let mut w = self.files.write();
        let o = w.get_mut(image)?;
        if o.file.is_none() {
            o.file = File::open(&o.path).ok().map(Arc::new);
        }
        o.file.clone()
    }
}

impl BlockSource for Agent {
    /// Blocks adjacent in one image file (a sequential READ's, usually) are read
    /// with one `pread` and handed out as slices of it.
    fn read_blocks(&self, hashes: &[BlockHash], budget: usize) -> Vec<BlockReply> {
        let locs: Vec<Option<Location>> = hashes
            .iter()
            .map(|h| {
                let mut loc = None;
                self.store.for_each_holder(h, |l| {
                    if loc.is_none() && *l.host == *self.node {
                        loc = Some(l);
                    }
                });
                loc
            })
            .collect();
        let mut out: Vec<BlockReply> = Vec::with_capacity(hashes.len());
        for step in plan_reads(&locs, budget) {
            match step {
                ReadStep::Reply(r) => out.push(r),
                ReadStep::Run(run) => {
                    let first = locs[run.start].as_ref().expect("runs cover located blocks");
                    let Some(f) = self.file(&first.image) else {
                        let e = format!("image {} is not open", first.image);
                        out.extend(run.map(|_| BlockReply::Failed(e.clone())));
                        continue;
                    };
                    let total: usize = locs[run.clone()]
                        .iter()
                        .map(|l| l.as_ref().map_or(0, |l| l.len as usize))
                        .sum();
                    let mut buf = vec![0u8; total];
                    match f.read_exact_at(&mut buf, first.offset) {
                        Ok(()) => {
                            let buf = Bytes::from(buf);
                            let mut at = 0;
                            for l in locs[run].iter().flatten() {
                                out.push(BlockReply::Found(buf.slice(at..at + l.len as usize)));
                                at += l.len as usize;
                            }
                        }
                        Err(e) => {
                            let e = format!("{} @ {}: {e}", first.image, first.offset);
                            out.extend(run.map(|_| BlockReply::Failed(e.clone())));
                        }
                    }
                }
            }
        }
        out
    }
}

/// One step of answering a block request, in request order.
#[derive(Debug, PartialEq)]
enum ReadStep {
    /// The reply for one block that needs no read.
    Reply(BlockReply),
    /// Requested blocks (indices) lying back to back in one image: one read.
    Run(std::ops::Range<usize>),
}

/// Largest single read when coalescing adjacent blocks.
const MAX_RUN_BYTES: usize = 1 << 20;

/// How to answer blocks at `locs` (in request order) within `budget` bytes:
/// unknown blocks are `NotFound`, blocks past the budget (after the first) are
/// `Skipped` (asked again later), and consecutive located blocks that follow each
/// other in the same image file are grouped into one read.
fn plan_reads(locs: &[Option<Location>], budget: usize) -> Vec<ReadStep> {
    let mut steps = Vec::new();
    let mut used = 0usize;
    let mut run: Option<(std::ops::Range<usize>, u64, usize)> = None; // (blocks, next offset, bytes)
    let flush = |run: &mut Option<(std::ops::Range<usize>, u64, usize)>,
                 steps: &mut Vec<ReadStep>| {
        if let Some((r, _, _)) = run.take() {
            steps.push(ReadStep::Run(r));
        }
    };
    for (i, loc) in locs.iter().enumerate() {
        let Some(l) = loc else {
            flush(&mut run, &mut steps);
            steps.push(ReadStep::Reply(BlockReply::NotFound));
            continue;
        };
        let len = l.len as usize;
        if used > 0 && used + len > budget {
            flush(&mut run, &mut steps);
            steps.push(ReadStep::Reply(BlockReply::Skipped));
            continue;
        }
        used += len;
        let extends = run.as_ref().is_some_and(|(r, next, bytes)| {
            let prev = locs[r.end - 1].as_ref().expect("runs cover located blocks");
            prev.image == l.image && *next == l.offset && bytes + len <= MAX_RUN_BYTES
        });
        if extends {
            let (r, next, bytes) = run.as_mut().expect("extends a run");
            r.end = i + 1;
            *next += u64::from(l.len);
            *bytes += len;
        } else {
            flush(&mut run, &mut steps);
            run = Some((i..i + 1, l.offset + u64::from(l.len), len));
        }
    }
    flush(&mut run, &mut steps);
    steps
}

/// A LUN of tgtd's target listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TgtLun {
    pub tid: u32,
    pub iqn: String,
    pub lun: u32,
    pub backing: PathBuf,
}

/// Parses `tgtadm --op show --mode target`: every LUN with a backing file (the
/// controller LUN 0 has `Backing store path: None`).
pub fn parse_tgt_show(text: &str) -> Vec<TgtLun> {
    let mut out = Vec::new();
    let (mut tid, mut iqn, mut lun) = (0u32, String::new(), None::<u32>);
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = line.strip_prefix("Target ") {
            if let Some((n, name)) = rest.split_once(':') {
                tid = n.trim().parse().unwrap_or(0);
                iqn = name.trim().to_string();
                lun = None;
            }
        } else if let Some(n) = t.strip_prefix("LUN:") {
            lun = n.trim().parse().ok();
        } else if let Some(p) = t.strip_prefix("Backing store path:") {
            let p = p.trim();
            if let Some(l) = lun {
                if p.starts_with('/') && !iqn.is_empty() {
                    out.push(TgtLun {
                        tid,
                        iqn: iqn.clone(),
                        lun: l,
                        backing: PathBuf::from(p),
                    });
                }
            }
        }
    }
    out
}

/// The agent's store: `db` with a change log when there is a parent to push to.
pub fn open_store(cfg: &AgentConfig) -> Result<Arc<RedbStore>> {
    if let Some(dir) = cfg.db.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).io_context(|| format!("create {}", dir.display()))?;
        }
    }
    let opts = StoreOptions {
        log: cfg.parent.is_some(),
        max_image_blocks: cfg.max_image_blocks,
        ..StoreOptions::default()
    };
    Ok(Arc::new(RedbStore::open(&cfg.db, opts)?))
}

/// The hook `[hypervisor]` configures, if any.
pub fn hypervisor_of(cfg: &AgentConfig) -> Result<Option<Arc<dyn Hypervisor>>> {
    let Some(h) = &cfg.hypervisor else {
        return Ok(None);
    };
    let tool = crate::hypervisor::ImageTool {
        qemu_img: h.qemu_img.clone(),
        module_dir: h.qemu_module_dir.clone(),
    };
    Ok(Some(Arc::new(crate::hypervisor::PlainFiles::open(
        &h.vm_dir, tool,
    )?)))
}

/// The host's absolute resources: pinned, else measured (cores, memory from
/// `/proc/meminfo`, free disk from the hook).
fn resources(pins: ResourcePins, hv: Option<&dyn Hypervisor>) -> HostResources {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let mem = |field: &str| {
        meminfo
            .as_deref()
            .and_then(|t| crate::peer::hostmetrics::meminfo_bytes(t, field))
    };
    HostResources {
        cores: pins.cores.or_else(|| {
            std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok())
        }),
        mem_bytes: pins.mem_bytes.or_else(|| mem("MemTotal")),
        mem_free_bytes: pins.mem_free_bytes.or_else(|| mem("MemAvailable")),
        disk_free_bytes: pins
            .disk_free_bytes
            .or_else(|| hv.and_then(|h| h.free_bytes().ok())),
    }
}

/// The host's VMs as reported up.
fn vm_reports(hv: Option<&dyn Hypervisor>) -> Vec<VmReport> {
    let Some(hv) = hv else {
        return Vec::new();
    };
    match hv.vms() {
        Ok(vms) => vms
            .into_iter()
            .take(crate::peer::proto::MAX_VMS)
            .map(|v| VmReport {
                name: v.name,
                image: v.image,
                size: v.size,
                state: v.state,
            })
            .collect(),
        Err(e) => {
            tracing::warn!("listing VMs: {e}");
            Vec::new()
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
#[expect(
    clippy::too_many_lines,
    reason = "the agent's start-up in order: scan, server, pusher, reporter, rescan loop"
)]
pub async fn run(cfg: AgentConfig) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let store = open_store(&cfg)?;
    let hypervisor = hypervisor_of(&cfg)?;
    let agent = Arc::new(Agent::new(&cfg, store.clone(), hypervisor.clone()));
    let creds = cfg.credentials();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .io_context(|| format!("listen on {}", cfg.listen))?;
    let first = {
        let a = agent.clone();
        tokio::task::spawn_blocking(move || a.scan()).await??
    };
    log_scan(&agent.node, &first);
    let last_scan = Arc::new(Mutex::new(first));
    let push_status = Arc::new(crate::peer::indexer::PushStatus::default());
    let metrics_status = Arc::new(crate::peer::hosts::ReportStatus::default());
    let last_metrics = Arc::new(Mutex::new(None::<crate::plan::HostMetrics>));
    let status: crate::peer::server::StatusFn = {
        let (l, p, parent) = (last_scan.clone(), push_status.clone(), cfg.parent);
        let (m, ms, pinned) = (last_metrics.clone(), metrics_status.clone(), cfg.metrics);
        Arc::new(move || {
            let scan = l.lock().clone();
            let last = *m.lock();
            serde_json::json!({ "parent": parent, "last_scan": scan, "push": &*p,
                "metrics": { "last": last, "pinned": pinned, "report": &*ms } })
        })
    };
    let server_opts = Arc::new(cfg.peer.server(&cfg.node, Role::Agent, creds.clone()));
    let client = Arc::new(crate::peer::client::PeerClient::new(cfg.peer.client(
        &cfg.node,
        Role::Agent,
        creds.clone(),
    )));
    // A finished build is rescanned at once, so its disk is offered and pushed.
    let built = Arc::new(tokio::sync::Notify::new());
    // Wakes the pusher: the index changed.
    let wake = Arc::new(tokio::sync::Notify::new());
    let builds = hypervisor.clone().map(|hv| {
        Arc::new(crate::peer::builder::Builder::new(
            &cfg.node,
            crate::peer::builder::BuildTarget::Disks(hv),
            client.clone(),
            cfg.parent.map(|p| client.peer(&p.to_string())),
            cfg.hypervisor
                .as_ref()
                .map(|h| h.managers.clone())
                .unwrap_or_default(),
            built.clone(),
        )
        .with_local_blocks({
            let agent = agent.clone();
            Arc::new(move |hashes: &[BlockHash], budget: usize| agent.read_blocks(hashes, budget))
        })
        .with_tracker(Arc::new(AgentTracker {
            agent: agent.clone(),
            wake: wake.clone(),
        })))
    });
    let services = crate::peer::server::Services {
        blocks: Some(agent.clone() as Arc<dyn BlockSource>),
        index: None,
        builds,
        status: Some(status),
    };
    let metrics = Arc::new(crate::peer::server::ServerMetrics::default());
    let server = tokio::spawn(crate::peer::server::serve(
        listener,
        server_opts,
        services,
        metrics,
    ));
    let reporter = match cfg.parent {
        Some(parent) if cfg.metrics_interval_ms > 0 => {
            let sampler = Mutex::new(crate::peer::hostmetrics::Sampler::new(
                cfg.disk_path(),
                cfg.metrics,
            ));
            let (node, last) = (cfg.node.clone(), last_metrics.clone());
            let (pins, hv) = (cfg.resources, hypervisor.clone());
            let collect: crate::peer::hosts::Collect = Arc::new(move || {
                let m = sampler.lock().sample();
                *last.lock() = Some(m);
                vec![crate::peer::proto::HostReport {
                    host: node.clone(),
                    metrics: m,
                    age_ms: 0,
                    resources: resources(pins, hv.as_deref()),
                    vms: vm_reports(hv.as_deref()),
                }]
            });
            Some(tokio::spawn(
                crate::peer::hosts::MetricsReporter {
                    node: cfg.node.clone(),
                    parent: client.peer(&parent.to_string()),
                    interval: Duration::from_millis(cfg.metrics_interval_ms),
                    collect,
                    status: metrics_status.clone(),
                }
                .run(),
            ))
        }
        _ => None,
    };
    let pusher = cfg.parent.map(|parent| {
        let me = (cfg.node.clone(), cfg.advertised().to_string());
        tokio::spawn(
            crate::peer::indexer::Pusher {
                node: cfg.node.clone(),
                store: store.clone(),
                parent: client.peer(&parent.to_string()),
                addrs: Arc::new(move || vec![me.clone()]),
                interval: Duration::from_millis(cfg.push_interval_ms),
                max_changes: 256,
                max_bytes: ((cfg.peer.max_frame_mib << 20) / 2) as usize,
                wake: wake.clone(),
                status: push_status.clone(),
            }
            .run(),
        )
    });
    tracing::info!(node = %cfg.node, listen = %cfg.listen, advertise = %cfg.advertised(),
        parent = ?cfg.parent, "agent serving blocks");
    let mut term = signal(SignalKind::terminate()).io_context(|| "SIGTERM handler".into())?;
    let mut int = signal(SignalKind::interrupt()).io_context(|| "SIGINT handler".into())?;
    let mut hup = signal(SignalKind::hangup()).io_context(|| "SIGHUP handler".into())?;
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.rescan_secs));
    tick.tick().await; // the first tick is immediate: the scan above was it
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => tracing::info!("SIGHUP: rescanning"),
            () = built.notified() => tracing::info!("a build finished: rescanning"),
            _ = tick.tick() => {}
        }
        let before = store.seq();
        let a = agent.clone();
        match tokio::task::spawn_blocking(move || a.scan()).await {
            Ok(Ok(s)) => {
                log_scan(&cfg.node, &s);
                if s.seq != before {
                    wake.notify_one();
                }
                *last_scan.lock() = s;
            }
            Ok(Err(e)) => tracing::warn!("rescan: {e:#}"),
            Err(e) => tracing::warn!("rescan: {e}"),
        }
    }
    tracing::info!("agent stopping");
    server.abort();
    if let Some(p) = pusher {
        p.abort();
    }
    if let Some(r) = reporter {
        r.abort();
    }
    Ok(())
}

/// The agent's side of migrations: each round's re-index pushed upward at
/// once, so the manager sees the new manifest.
struct AgentTracker {
    agent: Arc<Agent>,
    wake: Arc<tokio::sync::Notify>,
}

impl crate::peer::builder::VmTracker for AgentTracker {
    fn track(&self, vm: &str, since: Option<&str>) -> std::result::Result<TrackReport, String> {
        let r = self.agent.track(vm, since);
        self.wake.notify_one();
        r
    }

    fn untrack(&self, vm: &str) -> std::result::Result<(), String> {
        self.agent.untrack(vm)
    }
}

fn log_scan(node: &str, s: &ScanSummary) {
    tracing::info!(
        node,
        images = s.images,
        new = s.new,
        changed_blocks = s.changed_blocks,
        unchanged = s.unchanged,
        removed = s.removed,
        seq = s.seq,
        "scan"
    );
    for e in &s.errors {
        tracing::warn!(node, "scan: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[expect(
        clippy::unnecessary_wraps,
        reason = "a read plan's steps hold an Option<Location> per block"
    )]
    fn loc(image: &str, offset: u64) -> Option<Location> {
        Some(Location {
            host: "lib".into(),
            image: image.into(),
            block_size: 4096,
            offset,
            len: 4096,
        })
    }

    #[test]
    fn adjacent_blocks_are_read_together() {
        use ReadStep::*;
        let locs = [
            loc("a", 0),
            loc("a", 4096),
            loc("a", 8192),
            None,
            loc("a", 12288),
            loc("b", 16384),
            loc("b", 0),
            loc("b", 4096),
        ];
        assert_eq!(
            plan_reads(&locs, usize::MAX),
            vec![
                Run(0..3),
                Reply(BlockReply::NotFound),
                Run(4..5),
                Run(5..6),
                Run(6..8)
            ]
        );
        // The budget: after the first block, what does not fit is skipped.
        assert_eq!(
            plan_reads(&locs[..3], 4096 + 100),
            vec![
                Run(0..1),
                Reply(BlockReply::Skipped),
                Reply(BlockReply::Skipped)
            ]
        );
        // Runs stop at MAX_RUN_BYTES.
        let long: Vec<_> = (0..300).map(|i| loc("a", i * 4096)).collect();
        let steps = plan_reads(&long, usize::MAX);
        assert_eq!(steps, vec![Run(0..256), Run(256..300)]);
    }

    const SHOW: &str = "Target 1: iqn.2026-11.test.nearblock:img1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            Size: 25 MB, Block size: 512
            Backing store type: rdwr
            Backing store path: /tmp/lab/img1.raw
            Backing store flags: 
    Account information:
    ACL information:
        ALL
Target 2: iqn.2026-11.test.nearblock:img2
    LUN information:
        LUN: 0
            Backing store path: None
        LUN: 3
            Backing store path: /srv/img 2.raw
";

    #[test]
    fn parses_tgtadm_listing() {
        let l = parse_tgt_show(SHOW);
        assert_eq!(
            l,
            vec![
                TgtLun {
                    tid: 1,
                    iqn: "iqn.2026-11.test.nearblock:img1".into(),
                    lun: 1,
                    backing: "/tmp/lab/img1.raw".into()
                },
                TgtLun {
                    tid: 2,
                    iqn: "iqn.2026-11.test.nearblock:img2".into(),
                    lun: 3,
                    backing: "/srv/img 2.raw".into()
                },
            ]
        );
    }
}
