//! Build orders: the manager tells a hypervisor's agent to build a VM's disk
//! from an indexed image, naming for each distinct block the source the plan
//! chose; the agent answers with its progress. Wire types and the pure rules
//! over them; the agent's side is [`super::builder`], the manager's is
//! `crate::manage`.
//!
//! The plan travels compactly: the image's distinct non-zero blocks in order of
//! first occurrence (`crate::plan::ImageBlocks`, computed identically by both
//! ends from the manifest whose digest the order names) are assigned to sources
//! as runs. A re-plan sends the same job again with new runs; the agent fetches
//! only what it does not have yet.

use serde::{Deserialize, Serialize};

/// Most sources one order may name.
pub const MAX_SOURCES: usize = 1024;
/// Most runs one order may carry (a plan cut into more runs is refused by the
/// manager before it is sent).
pub const MAX_RUNS: usize = 1 << 22;
/// The source index of a run whose blocks need no fetch (already held).
pub const SKIP: u16 = u16::MAX;

/// A block source named in an order: a node and its block service address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSource {
    pub node: String,
    pub addr: String,
}

/// `count` consecutive distinct blocks assigned to `sources[source]` (or
/// [`SKIP`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRun {
    pub source: u16,
    pub count: u32,
}

/// Build VM `vm`'s disk from `image` (the manifest `manifest_host` holds at
/// `block_size`, whose encoding hashes to `digest`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildOrder {
    pub job: u64,
    pub vm: String,
    pub image: String,
    pub manifest_host: String,
    pub block_size: u32,
    pub digest: [u8; 32],
    #[serde(deserialize_with = "super::proto::bounded::<_, _, MAX_SOURCES>")]
    pub sources: Vec<BuildSource>,
    #[serde(deserialize_with = "super::proto::bounded::<_, _, MAX_RUNS>")]
    pub runs: Vec<SourceRun>,
    /// Pacing per source, bytes/s of block data (0: none), in `sources`' order
    /// (empty: none); the manager's share of the links' budgets.
    #[serde(deserialize_with = "super::proto::bounded::<_, _, MAX_SOURCES>")]
    pub rates: Vec<u64>,
}

/// Where an agent's build is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    /// Getting the manifest and the blocks.
    Fetching,
    /// Every assigned source was tried; some blocks are still missing because
    /// their sources failed: waiting for a new order (a re-plan) for the same job.
    NeedsSources,
    /// The disk is the VM's, synced.
    Done,
    Failed,
    Cancelled,
}

impl BuildState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// What one source gave a build.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceTally {
    pub node: String,
    pub blocks: u64,
    /// Block bytes received (verified).
    pub bytes: u64,
    /// TCP payload to and from the source on this build's own connections
    /// (handshake, requests, framing and sealing included).
    pub wire_bytes: u64,
}

/// A source the build stopped using, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFailure {
    pub node: String,
    pub reason: String,
    /// Its blocks still missing when it failed.
    pub blocks_missing: u64,
}

/// An agent's answer to a build order or a status request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildReport {
    pub job: u64,
    pub vm: String,
    pub state: BuildState,
    /// Distinct non-zero blocks of the image (0 until the manifest is in).
    pub blocks_total: u64,
    pub blocks_done: u64,
    /// Bytes written to the disk (a block repeated in the image counts each time).
    pub bytes_written: u64,
    #[serde(deserialize_with = "super::proto::bounded::<_, _, MAX_SOURCES>")]
    pub by_source: Vec<SourceTally>,
    #[serde(deserialize_with = "super::proto::bounded::<_, _, MAX_SOURCES>")]
    pub failures: Vec<SourceFailure>,
    pub error: Option<String>,
}

/// Why an order cannot be followed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("the runs cover {got} blocks, the image has {want} distinct blocks")]
    Coverage { got: u64, want: u64 },
    #[error("a run names source {0}, the order lists {1}")]
    Source(u16, usize),
    #[error("{0} sources, at most {MAX_SOURCES}")]
    TooManySources(usize),
}

/// Runs from one source per distinct block (`None`: skip), merged.
pub fn to_runs(assignment: impl IntoIterator<Item = Option<u16>>) -> Vec<SourceRun> {
    let mut runs: Vec<SourceRun> = Vec::new();
    for a in assignment {
        let source = a.unwrap_or(SKIP);
        match runs.last_mut() {
            Some(r) if r.source == source && r.count < u32::MAX => r.count += 1,
            _ => runs.push(SourceRun { source, count: 1 }),
        }
    }
    runs
}

/// The source of every distinct block (`None`: skip), checked against an image
/// of `distinct` blocks and the order's source list.
pub fn expand_runs(
    runs: &[SourceRun],
    sources: usize,
    distinct: u64,
) -> Result<Vec<Option<u16>>, OrderError> {
    if sources > MAX_SOURCES {
        return Err(OrderError::TooManySources(sources));
    }
    let got: u64 = runs.iter().map(|r| u64::from(r.count)).sum();
    if got != distinct {
        return Err(OrderError::Coverage {
            got,
            want: distinct,
        });
    }
    let mut out = Vec::with_capacity(usize::try_from(distinct).unwrap_or(0));
    for r in runs {
        let source = if r.source == SKIP {
            None
        } else if usize::from(r.source) < sources {
            Some(r.source)
        } else {
            return Err(OrderError::Source(r.source, sources));
        };
        out.extend(std::iter::repeat_n(source, r.count as usize));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_merge_neighbours_and_check_coverage_and_sources() {
        let runs = to_runs([Some(0), Some(0), None, Some(1), Some(1), Some(1)]);
        assert_eq!(
            runs,
            vec![
                SourceRun { source: 0, count: 2 },
                SourceRun { source: SKIP, count: 1 },
                SourceRun { source: 1, count: 3 },
            ]
        );
        assert_eq!(
            expand_runs(&runs, 2, 5),
            Err(OrderError::Coverage { got: 6, want: 5 })
        );
        assert_eq!(expand_runs(&runs, 1, 6), Err(OrderError::Source(1, 1)));
        assert_eq!(
            expand_runs(&runs, MAX_SOURCES + 1, 6),
            Err(OrderError::TooManySources(MAX_SOURCES + 1))
        );
    }

    proptest! {
        #[test]
        fn expand_inverts_to_runs(a in proptest::collection::vec(proptest::option::of(0u16..4), 0..200)) {
            let runs = to_runs(a.iter().copied());
            prop_assert_eq!(expand_runs(&runs, 4, a.len() as u64).unwrap(), a);
        }
    }
}
