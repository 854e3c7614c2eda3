//! The command line: one file per subcommand. Each command takes its output
//! writer, so it can be tested in-process.

use clap::{Parser, Subcommand};

pub mod agent;
pub mod api;
pub mod index;
pub mod indexer;
pub mod keygen;
pub mod peer;
pub mod plan;
pub mod run;
pub mod status;
pub mod vm;

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
    /// Index this host's images, report them to the indexer, serve their blocks.
    Agent(agent::AgentArgs),
    /// A local or global indexer: pushes from children, holders, push upward.
    Indexer(indexer::IndexerArgs),
    /// A node's key for the peer protocol (`keygen --out FILE`; `--public FILE`).
    Keygen(keygen::KeygenArgs),
    /// Ask agents and indexers over the peer protocol (holders, blocks, ping).
    Peer(peer::PeerArgs),
    /// The HTTP API's bearer tokens (`api token new --out FILE`).
    Api(api::ApiArgs),
    /// The manager's VMs and jobs: list, place and build, watch, cancel.
    Vm(vm::VmArgs),
}

/// Run one parsed command, writing its output to `out`.
pub fn dispatch(cli: Cli, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run::run(&a),
        Command::Status(a) => status::run(&a, out),
        Command::Index(a) => index::run(&a, out),
        Command::Plan(a) => plan::run(a, out),
        Command::Agent(a) => agent::run(&a, out),
        Command::Indexer(a) => indexer::run(&a, out),
        Command::Keygen(a) => keygen::run(&a, out),
        Command::Peer(a) => peer::run(&a, out),
        Command::Api(a) => api::run(a, out),
        Command::Vm(a) => vm::run(&a, out),
    }
}
