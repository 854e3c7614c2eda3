//! The command line: one file per subcommand. Each command takes its output
//! writer, so it can be tested in-process.

use clap::{Parser, Subcommand};

pub mod index;
pub mod plan;
pub mod run;
pub mod status;

#[derive(Debug, Parser)]
#[command(
    name = "nearblock",
    version,
    about = "Build VM images from the nearest copies of their blocks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance daemon (datapath, splicer, API).
    Run(run::RunArgs),
    /// Show a running appliance's flows, counters and discovery table.
    Status(status::StatusArgs),
    /// Split images into blocks, hash them, and record them in the index store.
    Index(index::IndexArgs),
    /// Plan offline from an index store and a topology: construction and placement.
    Plan(plan::PlanArgs),
}

/// Run one parsed command, writing its output to `out`.
pub fn dispatch(cli: Cli, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Status(a) => status::run(a, out),
        Command::Index(a) => index::run(a, out),
        Command::Plan(a) => plan::run(a, out),
    }
}
