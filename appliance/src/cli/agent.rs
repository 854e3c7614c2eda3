//! `nearblock agent --config FILE [--check]`: index this host's images, report
//! them to the parent indexer, rescan, and serve their blocks (see
//! [`crate::peer::agent`]).

use std::path::PathBuf;

use anyhow::Result;

use crate::peer::config::AgentConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The agent's TOML configuration.
    #[arg(long)]
    pub config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check: bool,
    /// Scan once, print the summary (JSON) and exit (no serving, no push).
    #[arg(long)]
    pub scan_once: bool,
}

pub fn run(args: &AgentArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let cfg = AgentConfig::load(&args.config)?;
    if args.check {
        writeln!(
            out,
            "config ok: agent {} on {} ({} images{})",
            cfg.node,
            cfg.listen,
            cfg.image.len(),
            if cfg.tgt_control_port.is_some() {
                " + tgtd LUNs"
            } else {
                ""
            }
        )?;
        return Ok(());
    }
    if args.scan_once {
        let store = crate::peer::agent::open_store(&cfg)?;
        let agent =
            crate::peer::agent::Agent::new(&cfg, store, crate::peer::agent::hypervisor_of(&cfg)?);
        let s = agent.scan()?;
        writeln!(out, "{}", serde_json::to_string(&s)?)?;
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(crate::peer::agent::run(cfg))?;
    Ok(())
}
