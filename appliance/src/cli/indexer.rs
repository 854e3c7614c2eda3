//! `nearblock indexer --config FILE [--check]`: a local or global indexer
//! (receives pushes from children, answers holders, pushes up to its parent; see
//! [`crate::peer::indexer`]).

use std::path::PathBuf;

use anyhow::Result;

use crate::peer::config::IndexerConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct IndexerArgs {
    /// The indexer's TOML configuration.
    #[arg(long)]
    pub config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: &IndexerArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let cfg = IndexerConfig::load(&args.config)?;
    if args.check {
        writeln!(
            out,
            "config ok: indexer {} on {}, parent {}",
            cfg.node,
            cfg.listen,
            cfg.parent
                .map_or_else(|| "none (top of the tree)".to_string(), |p| p.to_string())
        )?;
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(crate::peer::run_indexer(cfg))?;
    Ok(())
}
