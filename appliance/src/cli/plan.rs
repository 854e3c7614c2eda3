//! `nearblock plan construct` and `nearblock plan place`: the planner offline,
//! on an index store and a topology file, without a running daemon. The work is
//! in [`crate::plan::offline`]; this file only parses arguments and picks the
//! output format.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::cost::Topology;
use crate::plan::offline::{
    construct_report, place_report, write_construct_text, write_place_text, ConstructRequest,
    PlaceRequest, PlanStore,
};
use crate::plan::{AccessHistory, CapacityConfig, MetricsFile, Policy};

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(subcommand)]
    pub command: PlanCommand,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Where each block of an image comes from, for a given target host.
    Construct(ConstructArgs),
    /// Rank candidate hosts for an image by construction cost and pick one.
    Place(PlaceArgs),
}

/// Arguments both commands share.
#[derive(Debug, Args)]
pub struct Common {
    /// Index store filled by `nearblock index`.
    #[arg(long)]
    pub db: PathBuf,
    /// Topology TOML (`[[node]]`, `[[link]]`).
    #[arg(long)]
    pub topology: PathBuf,
    /// Image (or any indexed object) name.
    #[arg(long)]
    pub image: String,
    /// Block size of the manifest to use [default: the image's smallest indexed].
    #[arg(long)]
    pub block_size: Option<u32>,
    /// Print JSON (see docs/planner.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ConstructArgs {
    #[command(flatten)]
    pub common: Common,
    /// Host the image is built on.
    #[arg(long)]
    pub target: String,
    /// Spread blocks over sources to cut the finish time under link capacities.
    #[arg(long)]
    pub capacity_aware: bool,
    /// Highest link utilisation a capacity-aware plan may cause.
    #[arg(long, default_value_t = 0.8)]
    pub util_cap: f64,
    /// Extra cost a capacity-aware plan may have over the plain plan (0.25 = 25 %).
    #[arg(long, default_value_t = 0.25)]
    pub cost_slack: f64,
    /// List every non-zero block position and its source.
    #[arg(long)]
    pub list_blocks: bool,
    /// Access history (JSON) to order the listed blocks for prefetch.
    #[arg(long)]
    pub history: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlaceArgs {
    #[command(flatten)]
    pub common: Common,
    /// Candidate hosts, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub candidates: Vec<String>,
    /// best, top:X:METRIC or within:P%:METRIC (METRIC: cpu, mem, disk).
    #[arg(long, default_value = "best")]
    pub policy: Policy,
    /// Host metrics TOML: `[host.NAME]` tables with cpu, mem, disk (used fractions).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Placing a replica: candidates that already hold the whole object are listed
    /// last, not chosen.
    #[arg(long)]
    pub replica: bool,
}

/// Run a `plan` command against the index store at `--db`.
pub fn run(args: PlanArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let db = match &args.command {
        PlanCommand::Construct(a) => &a.common.db,
        PlanCommand::Place(a) => &a.common.db,
    };
    let store = open_store(db)?;
    run_with(args, &store, out)
}

/// The index store the planner reads (filled by `nearblock index`).
fn open_store(
    db: &Path,
) -> anyhow::Result<crate::plan::indexed::IndexedStore<crate::index::RedbStore>> {
    if !db.exists() {
        anyhow::bail!(
            "no index store at {} (fill it with `nearblock index`)",
            db.display()
        );
    }
    let store = crate::index::RedbStore::open(db, crate::index::StoreOptions::default())
        .with_context(|| format!("opening the index store {}", db.display()))?;
    crate::plan::indexed::IndexedStore::new(store)
        .map_err(|e| anyhow::anyhow!("reading the index store {}: {e}", db.display()))
}

/// Run a `plan` command against `store` (the testable part of [`run`]).
pub fn run_with(args: PlanArgs, store: &dyn PlanStore, out: &mut dyn Write) -> anyhow::Result<()> {
    match args.command {
        PlanCommand::Construct(a) => {
            let topology = load_topology(&a.common.topology)?;
            let history = a
                .history
                .as_deref()
                .map(|p| -> anyhow::Result<AccessHistory> {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("parsing history {}", p.display()))
                })
                .transpose()?;
            let req = ConstructRequest {
                image: a.common.image,
                target: a.target,
                block_size: a.common.block_size,
                capacity: a.capacity_aware.then(|| CapacityConfig {
                    util_cap: a.util_cap,
                    cost_slack: a.cost_slack,
                    background: Vec::new(),
                }),
                list_blocks: a.list_blocks,
                history,
            };
            let report = construct_report(store, &topology, &req)?;
            if a.common.json {
                serde_json::to_writer_pretty(&mut *out, &report)?;
                writeln!(out)?;
            } else {
                write_construct_text(&report, out)?;
            }
        }
        PlanCommand::Place(a) => {
            let topology = load_topology(&a.common.topology)?;
            let metrics = match &a.metrics {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    MetricsFile::parse(&text)
                        .with_context(|| format!("metrics file {}", p.display()))?
                }
                None => MetricsFile::default(),
            };
            let req = PlaceRequest {
                image: a.common.image,
                candidates: a.candidates,
                policy: a.policy,
                block_size: a.common.block_size,
                metrics,
                replica: a.replica,
            };
            let report = place_report(store, &topology, &req)?;
            if a.common.json {
                serde_json::to_writer_pretty(&mut *out, &report)?;
                writeln!(out)?;
            } else {
                write_place_text(&report, out)?;
            }
        }
    }
    Ok(())
}

fn load_topology(path: &Path) -> anyhow::Result<Topology> {
    Ok(Topology::load(path)?)
}
