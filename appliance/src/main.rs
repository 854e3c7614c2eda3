//! The `nearblock` binary: parses the command line and runs one command.

use clap::Parser;
use nearblock::cli::{dispatch, Cli};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    dispatch(cli, &mut std::io::stdout().lock())
}
