//! `nearblock index`: index image files or block devices into the local store, and
//! report zero / unique / shared fractions.
//!
//! Written against the library (`crate::index`), so this file compiles both as
//! a module of the binary and from `appliance/tests/cli_index.rs`.

use std::{io::IsTerminal, path::PathBuf, time::Duration};

use crate::index::{
    chunk::{format_block_size, parse_block_size},
    delta::{self, Outcome, Policy},
    stats, BlockStore, Manifest, RedbStore, StoreOptions,
};
use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug, Clone)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each bool is an independent command-line flag"
)]
pub struct IndexArgs {
    /// Image files or block devices to index (none: only report, with --stats).
    pub files: Vec<PathBuf>,
    /// Image name (only with one file; default: the file name without extension).
    #[arg(long)]
    pub image: Option<String>,
    /// Host holding the image (default: this machine's host name).
    #[arg(long)]
    pub host: Option<String>,
    /// Block size, 4KiB to 1MiB, power of two; repeat to index several sizes.
    #[arg(long = "block-size", value_parser = parse_block_size, default_value = "4KiB")]
    pub block_sizes: Vec<u32>,
    /// The index database (the holder snapshot is written next to it).
    #[arg(long, default_value = "/var/lib/nearblock/index.redb")]
    pub db: PathBuf,
    /// Rehash even if size and mtime are unchanged.
    #[arg(long)]
    pub full: bool,
    /// Rehash anyway when the last full scan is older than this many seconds.
    #[arg(long, default_value_t = 86400)]
    pub rescan_secs: u64,
    /// Print zero / unique / cross-image shared fractions of the indexed images.
    #[arg(long)]
    pub stats: bool,
    /// Machine-readable output (JSON lines).
    #[arg(long)]
    pub json: bool,
    /// No progress bar even on a terminal.
    #[arg(long)]
    pub quiet: bool,
}

fn default_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn image_name(path: &std::path::Path) -> String {
    path.file_stem().or_else(|| path.file_name()).map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

pub fn run(args: &IndexArgs, out: &mut dyn std::io::Write) -> Result<()> {
    if args.image.is_some() && args.files.len() != 1 {
        bail!("--image names one file; give exactly one FILE");
    }
    if args.files.is_empty() && !args.stats {
        bail!("nothing to do: give FILEs to index, or --stats");
    }
    let mut sizes = args.block_sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let host = args.host.clone().unwrap_or_else(default_host);
    let store = RedbStore::open(&args.db, StoreOptions::default())?;
    let policy = Policy {
        rescan_after: Duration::from_secs(args.rescan_secs),
        force: args.full,
    };
    let show_bar = !args.quiet && !args.json && std::io::stderr().is_terminal();
    for file in &args.files {
        let image = args.image.clone().unwrap_or_else(|| image_name(file));
        let bar = if show_bar {
            let len = std::fs::File::open(file)
                .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                .unwrap_or(0);
            let b = indicatif::ProgressBar::new(len * sizes.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(image.clone());
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let reports = delta::index_file(&store, &host, &image, file, &sizes, &policy, &|n| {
            bar.inc(n);
        })
        .with_context(|| format!("index {}", file.display()))?;
        bar.finish_and_clear();
        for r in reports {
            let (what, n) = match r.outcome {
                Outcome::New { blocks, .. } => ("new", blocks),
                Outcome::Unchanged => ("unchanged", 0),
                Outcome::Delta { changed } => ("changed", changed),
            };
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"image": image, "host": host, "block_size": r.block_size,
                        "size": r.size, "outcome": what, "blocks": n, "seq": r.seq})
                )?;
            } else {
                writeln!(
                    out,
                    "{image} @ {}: {what} ({n} blocks), {} bytes, seq {}",
                    format_block_size(r.block_size),
                    r.size,
                    r.seq
                )?;
            }
        }
    }
    if args.stats {
        report_stats(&store, args, &sizes, out)?;
    }
    Ok(store.close()?)
}

/// Stats of every image in the store (one manifest per image name) at each block
/// size indexed now (or every size in the store when no file was given).
fn report_stats(
    store: &RedbStore,
    args: &IndexArgs,
    sizes: &[u32],
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let images = store.images()?;
    let mut all_sizes: Vec<u32> = if args.files.is_empty() {
        images.iter().map(|i| i.block_size).collect()
    } else {
        sizes.to_vec()
    };
    all_sizes.sort_unstable();
    all_sizes.dedup();
    for bs in all_sizes {
        let mut names: Vec<&str> = images
            .iter()
            .filter(|i| i.block_size == bs)
            .map(|i| i.image.as_str())
            .collect();
        names.dedup();
        let manifests: Vec<Manifest> = names
            .iter()
            .filter_map(|n| store.manifest(n, Some(bs)).transpose())
            .collect::<std::result::Result<_, _>>()?;
        let refs: Vec<&Manifest> = manifests.iter().collect();
        let st = stats::compute(&refs);
        if args.json {
            for s in &st {
                writeln!(out, "{}", serde_json::to_string(s)?)?;
            }
        } else {
            write!(out, "{}", stats::table(&st))?;
        }
    }
    Ok(())
}
