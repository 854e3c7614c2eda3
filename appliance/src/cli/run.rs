//! `nearblock run --config FILE`: the daemon, until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file (TOML; see docs/operations.md).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Only validate the configuration and exit.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    // Token files are checked before anything starts (and by --check).
    config.api.auth().context("[api]")?;
    if let Some(f) = config
        .cost
        .as_ref()
        .and_then(|c| c.peer_token_file.as_deref())
    {
        crate::api::auth::read_client_token(f).context("[cost] peer_token_file")?;
    }
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        crate::daemon::run(config, shutdown).await
    })?;
    Ok(())
}
