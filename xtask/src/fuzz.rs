//! `cargo xtask fuzz`: the cargo-fuzz targets in appliance/fuzz (libFuzzer), each run
//! for a bounded time, with libFuzzer's final statistics appended to the checked-in
//! log appliance/fuzz/fuzz-log.md; and the replay CI runs (`--replay`).
//!
//! Every build uses the same flags, so `build` once and the runs reuse it: no
//! sanitizer (the code fuzzed has no `unsafe`; a panic, a timeout or an allocation
//! over the RSS limit is what a run finds) and debug assertions on (arithmetic
//! overflow panics instead of wrapping into wrong data). cargo-fuzz passes `-Z`
//! flags; the stable toolchain takes them with `RUSTC_BOOTSTRAP=1`.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{root, StatusOk, FUZZ_REPLAY_SECS, FUZZ_TARGETS};

/// The fuzz crate's build cache: outside the clone, so CI's clean clones reuse it
/// (a release build with one codegen unit is the slow part of the replay).
pub const FUZZ_TARGET_DIR: &str = "/var/cache/nearblock/fuzz-target";

const BUILD_FLAGS: &[&str] = &[
    "--sanitizer",
    "none",
    "--debug-assertions",
    "--target-dir",
    FUZZ_TARGET_DIR,
];
/// libFuzzer fails a run whose RSS passes this (bounded memory is a property).
const RSS_LIMIT_MB: u32 = 1024;
/// libFuzzer fails an input that takes longer than this (bounded work per input).
const INPUT_TIMEOUT_SECS: u32 = 10;

fn fuzz_dir() -> PathBuf {
    root().join("appliance/fuzz")
}

fn corpus_dir(target: &str) -> PathBuf {
    fuzz_dir().join("corpus").join(target)
}

/// `cargo fuzz SUB` run from appliance/ (cargo-fuzz finds its crate in ./fuzz).
fn cargo_fuzz(sub: &str) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root().join("appliance"))
        .args(["fuzz", sub])
        .args(BUILD_FLAGS)
        .env("RUSTC_BOOTSTRAP", "1")
        // The fuzzers need no kernel programs.
        .env("NEARBLOCK_SKIP_EBPF", "1");
    c
}

/// The targets named (all when none is), checked against the known ones.
pub fn targets(named: &[String]) -> Result<Vec<&'static str>> {
    if named.is_empty() {
        return Ok(FUZZ_TARGETS.to_vec());
    }
    named
        .iter()
        .map(|n| {
            FUZZ_TARGETS
                .iter()
                .copied()
                .find(|t| t == n)
                .with_context(|| format!("no fuzz target `{n}` ({})", FUZZ_TARGETS.join(", ")))
        })
        .collect()
}

pub fn build() -> Result<()> {
    cargo_fuzz("build").status_ok()
}

/// Write the seed inputs (made by nearblock's own encoders) into the corpora.
pub fn seeds() -> Result<()> {
    let bin = PathBuf::from(FUZZ_TARGET_DIR).join("x86_64-unknown-linux-gnu/release/seeds");
    Command::new(&bin)
        .arg(fuzz_dir().join("corpus"))
        .status_ok()
        .with_context(|| format!("running {} (built by `cargo fuzz build`)", bin.display()))
}

/// What one libFuzzer run reported.
#[derive(Debug, Default)]
struct RunStats {
    executions: u64,
    peak_rss_mb: Option<u64>,
    seconds: f64,
    /// The reproducer libFuzzer wrote, if the run failed.
    artifact: Option<String>,
    ok: bool,
}

impl RunStats {
    fn result(&self) -> String {
        match (&self.artifact, self.ok) {
            (_, true) => "no crash".into(),
            (Some(path), false) => format!("CRASH: {path}"),
            (None, false) => "FAILED (no reproducer written; see the output)".into(),
        }
    }
}

/// Read libFuzzer's output: the executions (`stat::number_of_executed_units`, else
/// the last `#N` status line), peak RSS, and the reproducer's path. Returns whether
/// to echo the line: status lines (thousands), the dictionary it recommends and the
/// missing-sanitizer warnings (there is no sanitizer) are not.
fn parse_line(line: &str, stats: &mut RunStats) -> bool {
    if line.contains("# Uses: ")
        || line.starts_with("###### ")
        || line.starts_with("WARNING: Failed to find function \"__sanitizer_")
    {
        return false;
    }
    if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
        if let Ok(n) = n.trim().parse() {
            stats.executions = n;
        }
        return true;
    }
    if let Some(n) = line.strip_prefix("stat::peak_rss_mb:") {
        stats.peak_rss_mb = n.trim().parse().ok();
        return true;
    }
    if let Some(rest) = line.strip_prefix('#') {
        let n = rest.split_whitespace().next().unwrap_or("");
        if let Ok(n) = n.parse() {
            stats.executions = stats.executions.max(n);
        }
        return rest.contains("DONE");
    }
    if let Some(at) = line.find("Test unit written to ") {
        stats.artifact = Some(
            line[at + "Test unit written to ".len()..]
                .trim()
                .to_string(),
        );
    }
    true
}

/// Run `target` for `seconds` over `corpora` (libFuzzer adds new inputs to the first).
fn libfuzzer(target: &str, corpora: &[PathBuf], seconds: u64) -> Result<RunStats> {
    let mut cmd = cargo_fuzz("run");
    cmd.arg(target)
        .args(corpora)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    let mut stats = RunStats::default();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            if parse_line(&line, &mut stats) {
                eprintln!("{line}");
            }
        }
    }
    stats.ok = child.wait()?.success();
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

/// CI's replay: every checked-in input of every target, then `FUZZ_REPLAY_SECS` of
/// fuzzing each. New inputs go to a scratch directory, never into the corpora.
pub fn replay(targets: &[&str]) -> Result<()> {
    let mut failed = Vec::new();
    for &target in targets {
        let scratch = fuzz_dir().join("target/replay").join(target);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        let stats = libfuzzer(target, &[scratch, corpus_dir(target)], FUZZ_REPLAY_SECS)?;
        eprintln!(
            "xtask: fuzz replay {target}: {} executions in {:.1} s: {}",
            stats.executions,
            stats.seconds,
            stats.result()
        );
        if !stats.ok {
            failed.push(format!("{target}: {}", stats.result()));
        }
    }
    if !failed.is_empty() {
        bail!("fuzz replay failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Fuzz each target for `seconds` over its checked-in corpus, minimize the corpus
/// (`cargo fuzz cmin`), and append the run to fuzz-log.md.
pub fn run(targets: &[&str], seconds: u64) -> Result<()> {
    let commit = commit()?;
    let mut failed = Vec::new();
    for &target in targets {
        std::fs::create_dir_all(corpus_dir(target))?;
        let stats = libfuzzer(target, &[corpus_dir(target)], seconds)?;
        let date = utc_now()?;
        append_log(&format!(
            "| {date} | {commit} | {target} | {:.0} | {} | {} | {} |",
            stats.seconds,
            stats.executions,
            stats
                .peak_rss_mb
                .map_or_else(|| "-".to_string(), |m| m.to_string()),
            stats.result()
        ))?;
        if stats.ok {
            // Greedy set cover rather than libFuzzer's default merge: a corpus a
            // fraction of the size for the same features (it is checked in).
            let mut cmin = cargo_fuzz("cmin");
            cmin.arg(target)
                .arg("--")
                .arg("-set_cover_merge=1")
                .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
                .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"));
            cmin.status_ok()?;
        } else {
            failed.push(format!("{target}: {}", stats.result()));
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found crashes (add each reproducer as a regression test): {}",
            failed.join("; ")
        );
    }
    Ok(())
}

const LOG_HEADER: &str = "# Fuzzing log

Appended by `cargo xtask fuzz [SECONDS]` (docs/operations.md, \"Fuzzing\"), one row per
target and run. *seconds*: the run's wall time; *executions*: libFuzzer's
`stat::number_of_executed_units`; *peak RSS*: libFuzzer's `stat::peak_rss_mb`. The
commit is the tree fuzzed (`+dirty`: with uncommitted changes outside the corpora and
this log). Goal (issue 10): at least one hour per target without a crash.

| date (UTC) | commit | target | seconds | executions | peak RSS MB | result |
|---|---|---|---|---|---|---|
";

fn append_log(row: &str) -> Result<()> {
    let path = fuzz_dir().join("fuzz-log.md");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if file.metadata()?.len() == 0 {
        file.write_all(LOG_HEADER.as_bytes())?;
    }
    writeln!(file, "{row}")?;
    eprintln!("xtask: fuzz log: {row}");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The commit fuzzed, `+dirty` when the tree differs from it (the corpora and the
/// log excepted: runs change them).
fn commit() -> Result<String> {
    let hash =
        output(
            Command::new("git")
                .current_dir(root())
                .args(["rev-parse", "--short", "HEAD"]),
        )?;
    let changes = output(Command::new("git").current_dir(root()).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!appliance/fuzz/corpus",
        ":!appliance/fuzz/fuzz-log.md",
    ]))?;
    Ok(if changes.is_empty() {
        hash
    } else {
        format!("{hash}+dirty")
    })
}

fn utc_now() -> Result<String> {
    output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_give_executions_and_rss() {
        let mut stats = RunStats::default();
        for line in [
            "#2\tINITED cov: 10 ft: 10 corp: 1/1b exec/s: 0 rss: 30Mb",
            "#65536\tpulse  cov: 10 ft: 10 corp: 1/1b exec/s: 21845 rss: 31Mb",
            "#70001\tDONE   cov: 10 ft: 10 corp: 1/1b exec/s: 23333 rss: 31Mb",
            "stat::number_of_executed_units: 70001",
            "stat::peak_rss_mb: 31",
        ] {
            parse_line(line, &mut stats);
        }
        assert_eq!(stats.executions, 70001);
        assert_eq!(stats.peak_rss_mb, Some(31));
        assert_eq!(stats.artifact, None);
    }

    #[test]
    fn a_crash_reports_its_reproducer() {
        let mut stats = RunStats::default();
        assert!(!parse_line("#1234\tNEW    cov: 5 ft: 5", &mut stats));
        assert!(!parse_line("\"\\377\\377\" # Uses: 968", &mut stats));
        parse_line(
            "artifact_prefix='/r/appliance/fuzz/artifacts/config/'; Test unit written to \
             /r/appliance/fuzz/artifacts/config/crash-0a1b",
            &mut stats,
        );
        assert_eq!(stats.executions, 1234);
        assert_eq!(
            stats.artifact.as_deref(),
            Some("/r/appliance/fuzz/artifacts/config/crash-0a1b")
        );
        assert_eq!(
            stats.result(),
            "CRASH: /r/appliance/fuzz/artifacts/config/crash-0a1b"
        );
    }
}
