//! Jobs: what the operator asked for (place and build an image as a VM), where
//! it is, and what happened, kept in the manager's own redb file so a restart
//! never forgets one. A job that was running when the manager stopped is failed
//! on the next start with a reason that says so (its agent's build, if any, is
//! cancelled): resuming half a plan against an index that moved on would be a
//! guess.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::plan::place::PlaceReport;

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// Most events one job keeps (the oldest go first).
pub const MAX_EVENTS: usize = 256;

/// How the disk is built (the seed's two ways).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuildMode {
    /// All at once: the target's agent writes the disk from the plan's sources.
    Agent,
    /// On demand: the hypervisor's own tool reads its LUN through the rack
    /// appliance, which pre-stages the plan's blocks.
    Transparent,
}

/// `POST /api/v1/vms/{image}/place`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlaceSpec {
    pub image: String,
    /// The new VM's name.
    pub name: String,
    /// `best`, `top:X:METRIC` or `within:P%:METRIC`.
    pub policy: String,
    pub mode: BuildMode,
    /// Build here instead of where the policy says (it must be a candidate).
    pub target: Option<String>,
    /// Only these hosts or racks are candidates (empty: every hypervisor).
    pub within: Vec<String>,
    /// How blocks are priced in the ranking (default: `usage` for mode
    /// transparent when the image has an access history, else `none`).
    #[serde(default)]
    pub weighting: Option<Weighting>,
}

/// How placement prices an image's blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    /// Every block at full cost (it will all be fetched: agent builds).
    None,
    /// Each block by its probability of being read, from the image's access
    /// history (on-demand builds: a block no boot reads never crosses a link).
    Usage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Placing,
    Building,
    Indexing,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    /// Its name in JSON and in metrics' labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Placing => "placing",
            Self::Building => "building",
            Self::Indexing => "indexing",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One thing that happened to a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobEvent {
    /// Unix time, milliseconds.
    pub at_ms: u64,
    pub message: String,
}

/// Bytes a build received from one source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SourceBytes {
    pub blocks: u64,
    /// Verified block bytes.
    pub bytes: u64,
    /// TCP payload of the build's connections to this source, both ways.
    pub wire_bytes: u64,
    /// Hops from the source to the target.
    pub hops: Option<u32>,
    /// `self`, `rack`, `peer` or `library` as seen from the target.
    pub class: String,
}

/// The construction plan a job follows (its latest re-plan).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanView {
    pub target: String,
    /// Mode transparent: the appliance that stages the blocks in its cache
    /// (the plan's sources, links and hops are toward it).
    #[serde(default)]
    pub staged_at: Option<String>,
    /// With link capacities or budgets: the capacity-aware plan's estimated
    /// finish (links at most at 80% of capacity, or at their budget), and the
    /// plain plan's, seconds.
    #[serde(default)]
    pub capacity_finish_s: Option<f64>,
    #[serde(default)]
    pub plain_finish_s: Option<f64>,
    pub blocks_total: u64,
    pub blocks_local: u64,
    pub blocks_fetched: u64,
    pub blocks_zero: u64,
    pub total_cost: f64,
    /// Source → planned blocks.
    pub by_source: BTreeMap<String, u64>,
    /// Link (`a-b`) → planned bytes.
    pub by_link: BTreeMap<String, u64>,
    /// Sources left out after they failed.
    pub excluded: Vec<String>,
    pub replans: u32,
    /// Pacing per source, bytes/s of block data (0: none): its share of the
    /// links' budgets, as last allocated.
    pub rates: BTreeMap<String, u64>,
    /// When the build should end at those rates (unix ms; when every source is
    /// paced), as of the last allocation.
    pub predicted_finish_ms: Option<u64>,
}

/// A build's progress as its agent last reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub blocks_total: u64,
    pub blocks_done: u64,
    pub bytes_written: u64,
    pub by_source: BTreeMap<String, SourceBytes>,
    /// Bytes by class of source (`self`, `rack`, `peer`, `library`).
    pub by_class: BTreeMap<String, u64>,
    /// Bytes by hop distance.
    pub by_hops: BTreeMap<u32, u64>,
    /// Link (`a-b`) → TCP payload that crossed it (each source's connection
    /// bytes, both ways, on every link of its path to the target).
    pub by_link: BTreeMap<String, u64>,
}

/// What a job does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Build a new VM from an image.
    #[default]
    Place,
    /// Move a running VM's disk to the chosen host (pre-copy rounds, a short
    /// stop, resume there).
    Migrate,
    /// Keep a running VM's unique blocks staged, pinned, at its top targets'
    /// rack caches (until cancelled or the VM migrates).
    Prestage,
}

impl JobKind {
    /// Its name in JSON and in metrics' labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Place => "place",
            Self::Migrate => "migrate",
            Self::Prestage => "prestage",
        }
    }
}

/// One pre-copy round of a migration (round 0 is the whole disk).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RoundView {
    pub round: u32,
    /// Bytes the source's hook named as written since the last round.
    pub bytes_dirty: u64,
    /// Bytes the source read and hashed to re-index them.
    pub bytes_hashed: u64,
    /// Blocks whose content changed since the last round.
    pub blocks_changed: u64,
    /// Verified block bytes the target received, by source.
    pub bytes_by_source: BTreeMap<String, u64>,
    /// Link (`a-b`) → the round's TCP payload on it (its connections' bytes,
    /// both ways, on every link of each source's path).
    #[serde(default)]
    pub bytes_by_link: BTreeMap<String, u64>,
    /// The round's wall time, ms (tracking, indexing, the target's patch).
    pub ms: u64,
    /// Taken with the VM paused (the last round).
    pub paused: bool,
}

/// A migration's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationView {
    /// The host the VM ran on.
    pub source: String,
    /// How the source knows what the VM wrote.
    pub tracking: Option<crate::hypervisor::Tracking>,
    pub rounds: Vec<RoundView>,
    /// From the pause on the source to the resume on the target, ms.
    pub pause_to_resume_ms: Option<u64>,
    /// The target's indexed disk equals the source's at the pause.
    pub verified: bool,
    /// The source's copy was retired (after the grace period).
    pub source_retired: bool,
}

/// A pre-staging job's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PrestageView {
    /// The host the VM runs on.
    pub source: String,
    /// Refresh rounds done.
    pub rounds: u32,
    /// The VM's blocks only its host held at the last round.
    pub unique_blocks: u64,
    /// Appliance → bytes it staged in its last round.
    pub staged_at: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: u64,
    pub spec: PlaceSpec,
    #[serde(default)]
    pub kind: JobKind,
    #[serde(default)]
    pub migration: Option<MigrationView>,
    #[serde(default)]
    pub prestage: Option<PrestageView>,
    pub state: JobState,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub placement: Option<PlaceReport>,
    pub plan: Option<PlanView>,
    pub progress: Progress,
    /// Milliseconds from the end of the build until the global index listed
    /// the new disk.
    pub indexed_after_ms: Option<u64>,
    pub events: Vec<JobEvent>,
    pub error: Option<String>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Job {
    pub fn new(id: u64, spec: PlaceSpec) -> Self {
        let now = now_ms();
        Self {
            id,
            spec,
            kind: JobKind::Place,
            migration: None,
            prestage: None,
            state: JobState::Placing,
            created_ms: now,
            updated_ms: now,
            placement: None,
            plan: None,
            progress: Progress::default(),
            indexed_after_ms: None,
            events: Vec::new(),
            error: None,
        }
    }

    pub fn event(&mut self, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(job = self.id, "{message}");
        self.events.push(JobEvent {
            at_ms: now_ms(),
            message,
        });
        if self.events.len() > MAX_EVENTS {
            let over = self.events.len() - MAX_EVENTS;
            self.events.drain(..over);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    #[error("jobs store {path}: {message}")]
    Store { path: String, message: String },
}

/// The jobs file.
pub struct JobStore {
    db: Arc<redb::Database>,
    path: String,
}

impl JobStore {
    pub fn open(path: &Path) -> Result<Self, JobStoreError> {
        let p = path.display().to_string();
        let err = |e: &dyn std::fmt::Display| JobStoreError::Store {
            path: p.clone(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let db = redb::Database::create(path).map_err(|e| err(&e))?;
        let tx = db.begin_write().map_err(|e| err(&e))?;
        tx.open_table(JOBS).map_err(|e| err(&e))?;
        tx.commit().map_err(|e| err(&e))?;
        Ok(Self {
            db: Arc::new(db),
            path: p,
        })
    }

    fn err(&self, e: &dyn std::fmt::Display) -> JobStoreError {
        JobStoreError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Writes `job` durably (a committed redb transaction).
    pub fn save(&self, job: &Job) -> Result<(), JobStoreError> {
        let bytes = serde_json::to_vec(job).map_err(|e| self.err(&e))?;
        let tx = self.db.begin_write().map_err(|e| self.err(&e))?;
        {
            let mut t = tx.open_table(JOBS).map_err(|e| self.err(&e))?;
            t.insert(job.id, bytes.as_slice())
                .map_err(|e| self.err(&e))?;
        }
        tx.commit().map_err(|e| self.err(&e))
    }

    /// Every job, by id.
    pub fn all(&self) -> Result<Vec<Job>, JobStoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(&e))?;
        let t = tx.open_table(JOBS).map_err(|e| self.err(&e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(&e))? {
            let (k, v) = row.map_err(|e| self.err(&e))?;
            match serde_json::from_slice::<Job>(v.value()) {
                Ok(j) => out.push(j),
                Err(e) => tracing::warn!(job = k.value(), "unreadable job record: {e}"),
            }
        }
        Ok(out)
    }

    /// Forgets jobs `ids` (one transaction).
    pub fn remove(&self, ids: &[u64]) -> Result<(), JobStoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(&e))?;
        {
            let mut t = tx.open_table(JOBS).map_err(|e| self.err(&e))?;
            for id in ids {
                t.remove(*id).map_err(|e| self.err(&e))?;
            }
        }
        tx.commit().map_err(|e| self.err(&e))
    }

    /// The next free id.
    pub fn next_id(&self) -> Result<u64, JobStoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(&e))?;
        let t = tx.open_table(JOBS).map_err(|e| self.err(&e))?;
        let last = t.last().map_err(|e| self.err(&e))?;
        Ok(last.map_or(1, |(k, _)| k.value() + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_json_names() {
        for k in [JobKind::Place, JobKind::Migrate, JobKind::Prestage] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
        for st in [
            JobState::Placing,
            JobState::Building,
            JobState::Indexing,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(serde_json::to_value(st).unwrap(), st.name());
        }
    }

    fn spec() -> PlaceSpec {
        PlaceSpec {
            image: "lib/1".into(),
            name: "web1".into(),
            policy: "best".into(),
            mode: BuildMode::Agent,
            target: None,
            within: Vec::new(),
            weighting: None,
        }
    }

    #[test]
    fn jobs_survive_reopening_and_ids_follow_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let store = JobStore::open(&path).unwrap();
        assert_eq!(store.next_id().unwrap(), 1);
        let mut j = Job::new(1, spec());
        j.event("placed");
        store.save(&j).unwrap();
        j.state = JobState::Building;
        store.save(&j).unwrap();
        drop(store);
        let store = JobStore::open(&path).unwrap();
        assert_eq!(store.all().unwrap(), vec![j]);
        assert_eq!(store.next_id().unwrap(), 2);
        store.save(&Job::new(2, spec())).unwrap();
        store.remove(&[1]).unwrap();
        let left: Vec<u64> = store.all().unwrap().iter().map(|j| j.id).collect();
        assert_eq!(left, [2]);
        assert_eq!(store.next_id().unwrap(), 3);
    }

    #[test]
    fn events_are_bounded() {
        let mut j = Job::new(1, spec());
        for i in 0..MAX_EVENTS + 10 {
            j.event(format!("e{i}"));
        }
        assert_eq!(j.events.len(), MAX_EVENTS);
        assert_eq!(j.events[0].message, "e10");
    }
}
