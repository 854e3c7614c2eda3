//! Migration: a running VM's disk moves to the host placement picks, and only
//! what no nearer holder has crosses from its host.
//!
//! Placing an image that is a running VM's disk (`vm/NAME`, reported running
//! by its host's agent) is a migration (job kind `migrate`):
//!
//! 1. The source's agent starts tracking the VM's writes (the hook's dirty
//!    bitmap, or a rescan where nothing tracks them) and indexes the disk once;
//!    the manager waits until the global index has that manifest.
//! 2. Targets are ranked by the cost of building the VM's current blocks
//!    there (the source is no candidate: it has a VM of that name); round 0
//!    builds the whole disk on the chosen host from the cheapest holders, the
//!    source only for what nobody nearer holds.
//! 3. Pre-copy rounds while the VM runs: the source's agent re-indexes only
//!    what was written since the last round; the positions whose blocks changed
//!    are patched on the target (each block from its cheapest holder, which for
//!    freshly written blocks is the source). When a round's writes are at most
//!    `migrate_final_bytes` (or after `migrate_max_rounds`), the hook pauses the
//!    VM on the source, the last round moves, and the hook starts it on the
//!    target: that interval is the job's pause-to-resume time.
//! 4. The source stops tracking; once the global index lists the target's
//!    disk with the manifest the source had at the pause, and the grace period
//!    has passed, the source's copy is retired.
//!
//! A failure before the VM runs on the target undoes the migration: the VM is
//! resumed on the source if it was paused, tracking stops, and the target's
//! copy (whole or partial) is removed.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::{
    jobs::{JobState, RoundView},
    Manager, PlanningView,
};
use crate::{
    hypervisor::{VmAction, VmState},
    index::{BlockStore, Manifest},
    peer::proto::{Msg, TrackReport},
    plan::image::position_runs,
};

/// A migration round's build id at the target: the job's id in the low 48
/// bits, the round above (round 0 is the job's own id).
pub fn round_build(job: u64, round: u32) -> u64 {
    job | (u64::from(round) << 48)
}

/// What a migration did that a failure must undo.
#[derive(Default)]
struct Undo {
    target: Option<String>,
    /// The target's copy exists (round 0 ended).
    target_built: bool,
    /// The build id running at the target.
    build: Option<u64>,
    paused: bool,
    tracking: bool,
}

impl Manager {
    /// The host whose agent reports `spec`'s image as a running VM's disk
    /// (`None`: not a VM, or not running: a placement). A running VM is moved
    /// under its own name, by the agent mode.
    pub(super) fn running_vm_host(&self, spec: &super::PlaceSpec) -> Result<Option<String>, super::ManageError> {
        let Some(vm) = spec.image.strip_prefix("vm/") else {
            return Ok(None);
        };
        let now = Instant::now();
        let Some(host) = self
            .index
            .hosts
            .view(now)
            .into_iter()
            .find(|r| r.vms.iter().any(|v| v.name == vm && v.state == VmState::Running))
            .map(|r| r.host)
        else {
            return Ok(None);
        };
        if spec.name != vm {
            return Err(super::ManageError::BadRequest(format!(
                "{} is a running VM: a migration keeps its name ({vm}), not {}",
                spec.image, spec.name
            )));
        }
        if spec.mode != super::BuildMode::Agent {
            return Err(super::ManageError::BadRequest(
                "a migration builds the target's disk with its agent (mode agent)".into(),
            ));
        }
        Ok(Some(host))
    }

    /// Asks the source's agent for the VM's writes since `since`, re-indexed.
    pub(super) async fn track(&self, source: &str, vm: &str, since: Option<String>) -> Result<TrackReport, String> {
        let addr = self
            .addr_of(source)
            .ok_or_else(|| format!("no agent address known for {source}"))?;
        match self
            .client
            .peer(&addr)
            .request(&Msg::Track {
                vm: vm.to_owned(),
                since,
            })
            .await
        {
            Ok(Msg::Tracked { report }) => Ok(*report),
            Ok(m) => Err(format!("{source} answered tracking with {}", m.name())),
            Err(e) => Err(format!("tracking {vm} on {source}: {e}")),
        }
    }

    /// Waits until the global index holds `host`'s manifest of `image` at
    /// `block_size` with `digest`; returns it.
    pub(super) async fn wait_for_manifest(
        &self,
        host: &str,
        image: &str,
        block_size: u32,
        digest: [u8; 32],
    ) -> Result<Manifest, String> {
        let started = Instant::now();
        loop {
            let store = self.store.clone();
            let (h, i) = (host.to_owned(), image.to_owned());
            let found = tokio::task::spawn_blocking(move || {
                store
                    .manifest_at(&h, &i, block_size)
                    .ok()
                    .flatten()
                    .filter(|m| *blake3::hash(&m.encode()).as_bytes() == digest)
            })
            .await
            .map_err(|e| e.to_string())?;
            if let Some(m) = found {
                return Ok(m);
            }
            if started.elapsed() > self.options.index_wait {
                return Err(format!(
                    "the global index did not get {host}'s manifest of {image} within {:?}",
                    self.options.index_wait
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn round_event(&self, id: u64, view: RoundView) {
        let by_source: Vec<String> = view
            .bytes_by_source
            .iter()
            .map(|(n, b)| format!("{n} {b} B"))
            .collect();
        let by_link: Vec<String> = view
            .bytes_by_link
            .iter()
            .map(|(l, b)| format!("{l} {b} B"))
            .collect();
        let message = format!(
            "round {}{}: {} B written, {} B rehashed, {} blocks changed; moved {}{}; {} ms",
            view.round,
            if view.paused { " (paused)" } else { "" },
            view.bytes_dirty,
            view.bytes_hashed,
            view.blocks_changed,
            if by_source.is_empty() {
                "nothing".to_owned()
            } else {
                by_source.join(", ")
            },
            if by_link.is_empty() {
                String::new()
            } else {
                format!(" (links: {})", by_link.join(", "))
            },
            view.ms
        );
        self.update(id, |j| {
            j.event(message);
            if let Some(m) = &mut j.migration {
                m.rounds.push(view);
            }
        });
    }

    /// The bytes each source gave the job's latest build, and its bytes by
    /// link.
    fn build_bytes(&self, id: u64) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        self.job(id)
            .map(|j| {
                (
                    j.progress
                        .by_source
                        .into_iter()
                        .map(|(n, s)| (n, s.bytes))
                        .collect(),
                    j.progress.by_link,
                )
            })
            .unwrap_or_default()
    }

    pub(super) async fn migrate(
        self: &Arc<Self>,
        view: &Arc<dyn PlanningView>,
        id: u64,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let mut undo = Undo::default();
        let result = self.migrate_steps(view, id, cancel, &mut undo).await;
        if let Err(e) = &result {
            self.undo(id, undo, e).await;
        }
        result
    }

    /// Puts things back after a failure before the VM ran on the target.
    async fn undo(&self, id: u64, undo: Undo, why: &str) {
        let Some(job) = self.job(id) else { return };
        let vm = job.spec.name.clone();
        let source = job.migration.map(|m| m.source).unwrap_or_default();
        if let (Some(target), Some(build)) = (&undo.target, undo.build) {
            if let Some(addr) = self.addr_of(target) {
                let _ = self.client.peer(&addr).request(&Msg::BuildCancel { job: build }).await;
            }
        }
        if undo.target_built {
            if let Some(target) = &undo.target {
                if let Err(e) = self.vm_action(target, &vm, VmAction::Retire).await {
                    self.update(id, |j| j.event(format!("removing the copy on {target}: {e}")));
                }
            }
        }
        if undo.paused {
            if let Err(e) = self.vm_action(&source, &vm, VmAction::Resume).await {
                self.update(id, |j| j.event(format!("resuming {vm} on {source}: {e}")));
            }
        }
        if undo.tracking {
            if let Some(addr) = self.addr_of(&source) {
                let _ = self.client.peer(&addr).request(&Msg::Untrack { vm: vm.clone() }).await;
            }
        }
        self.update(id, |j| {
            j.event(format!("migration undone ({why}): {vm} runs on {source}; nothing of it is left on the target"));
        });
    }

    async fn migrate_steps(
        self: &Arc<Self>,
        view: &Arc<dyn PlanningView>,
        id: u64,
        cancel: &CancellationToken,
        undo: &mut Undo,
    ) -> Result<(), String> {
        let job = self.job(id).ok_or("job vanished")?;
        let (vm, image) = (job.spec.name.clone(), job.spec.image.clone());
        let source = job.migration.map(|m| m.source).ok_or("not a migration")?;
        let cancelled = || -> Result<(), String> {
            if cancel.is_cancelled() {
                Err("cancelled by the operator".into())
            } else {
                Ok(())
            }
        };

        // A pre-staging of this VM ends first (its tracking is the one the
        // migration restarts); what it staged stays cached.
        self.end_prestage(&source, &vm).await;
        // 1. Tracking starts; the manifest from then on.
        let started = Instant::now();
        undo.tracking = true;
        let first = self.track(&source, &vm, None).await?;
        self.update(id, |j| {
            j.event(format!(
                "tracking {vm}'s writes on {source} ({:?}); indexed its disk ({} B hashed)",
                first.tracking, first.bytes_hashed
            ));
            if let Some(m) = &mut j.migration {
                m.tracking = Some(first.tracking);
            }
        });
        let mut current = self
            .wait_for_manifest(&source, &image, first.block_size, first.digest)
            .await?;
        cancelled()?;

        // 2. Rank and choose; round 0 builds the whole disk.
        let mut placed = {
            let (me, view) = (self.clone(), view.clone());
            tokio::task::spawn_blocking(move || me.choose(&*view, id))
                .await
                .map_err(|e| format!("placement task: {e}"))??
        };
        // Build the manifest tracking started from (ranking read the index).
        placed.manifest = current.clone();
        placed.manifest_host.clone_from(&source);
        undo.target = Some(placed.target.clone());
        undo.build = Some(placed.build);
        self.update(id, |j| {
            j.state = JobState::Building;
            j.event(format!("round 0: building {vm}'s disk on {} from the cheapest holders", placed.target));
        });
        self.build(view.as_ref(), id, &placed, cancel).await?;
        undo.target_built = true;
        let (bytes_by_source, bytes_by_link) = self.build_bytes(id);
        self.round_event(
            id,
            RoundView {
                round: 0,
                bytes_dirty: 0,
                bytes_hashed: first.bytes_hashed,
                blocks_changed: 0,
                bytes_by_source,
                bytes_by_link,
                ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                paused: false,
            },
        );

        // 3. Pre-copy rounds, then the pause and the last round.
        let paused_at = self
            .pre_copy(view, id, cancel, undo, &mut placed, &mut current, first.token)
            .await?;
        // The disk on the target is the source's at the pause: run it there.
        self.vm_action(&placed.target, &vm, VmAction::Start)
            .await
            .map_err(|e| format!("starting {vm} on {}: {e}", placed.target))?;
        let stop_ms = u64::try_from(paused_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Past this point the VM runs on the target: nothing is undone.
        *undo = Undo::default();
        let target = placed.target.clone();
        self.update(id, |j| {
            j.state = JobState::Indexing;
            j.event(format!(
                "{vm} runs on {target}: paused to resumed in {stop_ms} ms; verifying before the source's copy is retired"
            ));
            if let Some(m) = &mut j.migration {
                m.pause_to_resume_ms = Some(stop_ms);
            }
        });

        self.hand_over(id, &vm, &image, &source, &target, &current).await
    }

    /// Step 3: rounds while the VM runs, each patching what changed since the
    /// last; then the pause and the last round. Returns when the VM paused.
    #[expect(clippy::too_many_arguments, reason = "the migration's state, threaded through its steps")]
    async fn pre_copy(
        self: &Arc<Self>,
        view: &Arc<dyn PlanningView>,
        id: u64,
        cancel: &CancellationToken,
        undo: &mut Undo,
        placed: &mut super::runner::Placed,
        current: &mut Manifest,
        token: String,
    ) -> Result<Instant, String> {
        let job = self.job(id).ok_or("job vanished")?;
        let (vm, image) = (job.spec.name.clone(), job.spec.image.clone());
        let source = placed.manifest_host.clone();
        let cancelled = || -> Result<(), String> {
            if cancel.is_cancelled() {
                Err("cancelled by the operator".into())
            } else {
                Ok(())
            }
        };
        let mut token = token;
        let mut paused_at = None;
        let mut round: u32 = 1;
        loop {
            cancelled()?;
            let t = Instant::now();
            let r = self.track(&source, &vm, Some(token)).await?;
            token = r.token.clone();
            let next = self
                .wait_for_manifest(&source, &image, r.block_size, r.digest)
                .await?;
            let changed = crate::index::delta::diff(current, &next);
            let runs = position_runs(changed.iter().map(|c| c.0));
            let mut moved = (BTreeMap::new(), BTreeMap::new());
            if !runs.is_empty() {
                placed.manifest = next.clone();
                placed.patch = Some(runs);
                placed.build = round_build(id, round);
                undo.build = Some(placed.build);
                self.build(view.as_ref(), id, placed, cancel).await?;
                moved = self.build_bytes(id);
            }
            *current = next;
            self.round_event(
                id,
                RoundView {
                    round,
                    bytes_dirty: r.bytes_dirty,
                    bytes_hashed: r.bytes_hashed,
                    blocks_changed: changed.len() as u64,
                    bytes_by_source: moved.0,
                    bytes_by_link: moved.1,
                    ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
                    paused: paused_at.is_some(),
                },
            );
            if paused_at.is_some() {
                break;
            }
            // The delta is the blocks whose content changed (a rescan names
            // every allocated extent as possibly written).
            let delta = changed.len() as u64 * u64::from(r.block_size);
            if delta <= self.options.migrate_final_bytes || round >= self.options.migrate_max_rounds {
                cancelled()?;
                self.vm_action(&source, &vm, VmAction::Pause)
                    .await
                    .map_err(|e| format!("pausing {vm} on {source}: {e}"))?;
                paused_at = Some(Instant::now());
                undo.paused = true;
                self.update(id, |j| {
                    j.event(format!(
                        "round {round} changed {delta} B (at most {}): {vm} paused on {source}",
                        self.options.migrate_final_bytes
                    ));
                });
            }
            round += 1;
        }

        paused_at.ok_or_else(|| "the rounds ended without a pause".to_owned())
    }

    /// Step 4: the source stops tracking; the target's disk is verified
    /// through the global index against the source's at the pause; after the
    /// grace period the source's copy is retired.
    async fn hand_over(
        &self,
        id: u64,
        vm: &str,
        image: &str,
        source: &str,
        target: &str,
        current: &Manifest,
    ) -> Result<(), String> {
        if let Some(addr) = self.addr_of(source) {
            let _ = self.client.peer(&addr).request(&Msg::Untrack { vm: vm.to_owned() }).await;
        }
        let digest = *blake3::hash(&current.encode()).as_bytes();
        self.wait_for_manifest(target, image, current.block_size, digest)
            .await
            .map_err(|e| format!("{vm} runs on {target}, but its disk was not verified (the source's copy is kept): {e}"))?;
        self.update(id, |j| {
            j.event(format!(
                "verified: the global index lists {target}'s disk with the manifest {source} had at the pause; retiring {source}'s copy in {:?}",
                self.options.retire_grace
            ));
            if let Some(m) = &mut j.migration {
                m.verified = true;
            }
        });
        tokio::time::sleep(self.options.retire_grace).await;
        self.vm_action(source, vm, VmAction::Retire)
            .await
            .map_err(|e| format!("retiring {vm} on {source}: {e}"))?;
        self.update(id, |j| {
            j.event(format!("retired {vm} on {source}"));
            if let Some(m) = &mut j.migration {
                m.source_retired = true;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_have_their_own_build_ids() {
        assert_eq!(round_build(7, 0), 7);
        assert_ne!(round_build(7, 1), 7);
        assert_eq!(round_build(7, 2) & ((1 << 48) - 1), 7);
    }
}
