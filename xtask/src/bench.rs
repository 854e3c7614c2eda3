//! `cargo xtask bench`: runs the benchmarks, and for the namespace benches
//! (datapath, splice) optionally an A/B comparison against a `nearblock` built from
//! another git revision (`--baseline-rev`), in the same run, rounds interleaved.
//!
//! The baseline is built from `git archive REV` under
//! `/var/cache/nearblock/bench-baseline/<commit>/` (source in `src/`, its own cargo
//! target directory in `target/`), with the same cargo profile as the binary under
//! test, and is reused by later runs against the same commit.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{cargo, root, target_dir, StatusOk};

/// Where baseline trees and their builds live, one directory per commit.
const BASELINE_ROOT: &str = "/var/cache/nearblock/bench-baseline";
/// Rounds per binary in an A/B run unless `--rounds` says otherwise: fewer do not
/// give a spread worth comparing.
pub const AB_ROUNDS: usize = 7;

/// What `cargo xtask bench` was asked for.
pub struct BenchArgs {
    pub which: String,
    pub baseline_rev: Option<String>,
    pub rounds: Option<usize>,
    pub profile: String,
}

/// The directory cargo puts `profile`'s outputs in.
pub fn profile_dir(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    }
}

/// Build the binary under test with `args.profile`, then run the benches.
pub fn run(args: &BenchArgs) -> Result<()> {
    let namespace: &[&str] = match args.which.as_str() {
        // `programs` (each kernel program's ns per packet, BPF_PROG_TEST_RUN)
        // goes before the datapath's rounds: seconds, no lab.
        "all" => &["programs", "datapath", "splice"],
        "datapath" => &["programs", "datapath"],
        "programs" => &["programs"],
        "splice" => &["splice"],
        "http" => &["http"],
        // Minutes long (16 corpus VMs twice; three corpus VMs migrated):
        // asked for by name only.
        "fanout" => &["fanout"],
        "migrate" => &["migrate"],
        // The index at datacenter scale (issue 17): minutes, a Redis Cluster.
        "scale" => &["scale"],
        _ => &[],
    };
    if args.baseline_rev.is_some()
        && (namespace.is_empty()
            || matches!(
                args.which.as_str(),
                "all" | "programs" | "fanout" | "migrate" | "http" | "scale"
            ))
    {
        bail!("--baseline-rev compares one namespace bench: `bench datapath` or `bench splice`");
    }
    cargo(&["build", "--profile", &args.profile, "-p", "nearblock"]).status_ok()?;
    let baseline = match &args.baseline_rev {
        Some(rev) => Some(build_baseline(rev, &args.profile)?),
        None => None,
    };
    let rounds = args
        .rounds
        .or(baseline.as_ref().map(|_| AB_ROUNDS))
        .map(|r| r.to_string());
    if namespace.contains(&"migrate") {
        // The lab's guest, beside the bench's binary.
        cargo(&[
            "build",
            "--profile",
            &args.profile,
            "-q",
            "-p",
            "nearblock-lab",
            "--bin",
            "vm-workload",
        ])
        .status_ok()?;
    }
    for name in namespace {
        let mut c = cargo(&[
            "run",
            "--profile",
            &args.profile,
            "-q",
            "-p",
            "nearblock-lab",
            "--bin",
            &format!("bench-{name}"),
        ]);
        c.env(
            "NEARBLOCK_BIN",
            target_dir()
                .join(profile_dir(&args.profile))
                .join("nearblock"),
        );
        if let Some(old) = &baseline {
            c.env("NEARBLOCK_BENCH_BASELINE_BIN", old);
        }
        if let Some(r) = &rounds {
            c.env("NEARBLOCK_BENCH_ROUNDS", r);
        }
        c.status_ok()?;
    }
    if args.which == "scale" {
        plan_at_scale()?;
    }
    let mut ran = !namespace.is_empty();
    let all = args.which == "all";
    for name in ["index", "plan"] {
        if all || args.which == name {
            let has_bench = root().join(format!("appliance/benches/{name}.rs")).exists();
            if has_bench {
                ran = true;
                appliance_bench(name).status_ok()?;
            } else if !all {
                bail!("no `{name}` benchmark in this tree yet");
            }
        }
    }
    if !ran {
        bail!(
            "unknown benchmark `{}` (datapath, programs, splice, http, index, plan, fanout, migrate, scale, all)",
            args.which
        );
    }
    Ok(())
}

/// `cargo bench` of the appliance's bench `name` (`appliance/benches/`).
fn appliance_bench(name: &str) -> Command {
    cargo(&[
        "bench",
        "-q",
        "-p",
        "nearblock",
        "--features",
        "testing",
        "--bench",
        name,
    ])
}

/// The planner and the cost matrix at datacenter size (`bench scale`): a 1 GiB
/// image (262,144 blocks), 1,000 / 3,000 / 10,000 hosts (growth over three sizes).
fn plan_at_scale() -> Result<()> {
    for hosts in ["1000", "3000", "10000"] {
        println!("== bench scale: planner and cost matrix at {hosts} hosts, a 1 GiB image");
        appliance_bench("plan")
            .env("NB_PLAN_HOSTS", hosts)
            .env("NB_PLAN_BLOCKS", "262144")
            .status_ok()?;
    }
    Ok(())
}

/// Build `nearblock` at `rev` with `profile` in its own directory; returns the
/// binary. A tree already extracted and built for that commit is reused (cargo
/// rebuilds nothing).
fn build_baseline(rev: &str, profile: &str) -> Result<PathBuf> {
    let commit = resolve_commit(rev)?;
    let dir = Path::new(BASELINE_ROOT).join(&commit);
    let src = dir.join("src");
    let target = dir.join("target");
    if !src.join("Cargo.toml").exists() {
        extract(&commit, &src)?;
    }
    seed_target(&target.join(profile_dir(profile)), &src)?;
    eprintln!(
        "xtask: building the baseline nearblock at {commit} ({profile}) in {}",
        dir.display()
    );
    let mut c = cargo(&[
        "build",
        "--profile",
        profile,
        "-p",
        "nearblock",
        "--bin",
        "nearblock",
    ]);
    c.current_dir(&src).env("CARGO_TARGET_DIR", &target);
    c.status_ok()?;
    let bin = target.join(profile_dir(profile)).join("nearblock");
    if !bin.is_file() {
        bail!("the baseline build left no binary at {}", bin.display());
    }
    Ok(bin)
}

/// The full commit id `rev` names in this repository.
fn resolve_commit(rev: &str) -> Result<String> {
    let out = Command::new("git")
        .current_dir(root())
        .args([
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{rev}^{{commit}}"),
        ])
        .output()
        .context("running git rev-parse")?;
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !is_commit_id(&commit) {
        bail!("--baseline-rev {rev:?} names no commit in this repository");
    }
    Ok(commit)
}

fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Extract `commit`'s tree into `dest` (through a sibling `.partial` directory,
/// renamed when complete, so an interrupted extraction is never mistaken for a
/// tree).
fn extract(commit: &str, dest: &Path) -> Result<()> {
    let partial = dest.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut archive = Command::new("git")
        .current_dir(root())
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let tar_in = archive.stdout.take().context("git archive's output")?;
    Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&partial)
        .stdin(tar_in)
        .status_ok()?;
    let st = archive.wait().context("waiting for git archive")?;
    if !st.success() {
        bail!("git archive {commit} failed: {st}");
    }
    std::fs::rename(&partial, dest)
        .with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))
}

/// A fresh baseline target directory starts as a hard-linked copy of this tree's
/// dependency builds (and the eBPF crate's), so only the workspace crates are
/// compiled again: cargo gives path crates of another source tree other file names,
/// and rewrites no up-to-date registry crate. Skipped when the directory exists.
fn seed_target(profile_target: &Path, src: &Path) -> Result<()> {
    let ours = target_dir().join(profile_target.file_name().unwrap_or_default());
    if !profile_target.exists() && ours.join("deps").is_dir() {
        std::fs::create_dir_all(profile_target)?;
        for sub in ["deps", "build", ".fingerprint"] {
            if ours.join(sub).is_dir() {
                hard_link_copy(&ours.join(sub), profile_target)?;
            }
        }
    }
    let ebpf_target = src.join("appliance-ebpf/target");
    let our_ebpf = root().join("appliance-ebpf/target");
    if !ebpf_target.exists() && our_ebpf.is_dir() {
        hard_link_copy(&our_ebpf, &src.join("appliance-ebpf"))?;
    }
    Ok(())
}

fn hard_link_copy(from: &Path, into_dir: &Path) -> Result<()> {
    Command::new("cp")
        .arg("-al")
        .arg(from)
        .arg(into_dir)
        .status_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dirs_follow_cargo() {
        assert_eq!(profile_dir("dev"), "debug");
        assert_eq!(profile_dir("release"), "release");
        assert_eq!(profile_dir("bench"), "release");
        assert_eq!(profile_dir("custom"), "custom");
    }

    #[test]
    fn only_full_ids_are_commits() {
        assert!(is_commit_id("9ea21e1a6b1bb8d0c1d1f0c3f9e1b7a2c4d5e6f7"));
        assert!(!is_commit_id("9ea21e1"));
        assert!(!is_commit_id("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"));
    }

    #[test]
    fn an_unknown_revision_is_refused() {
        let err = resolve_commit("no-such-branch-anywhere").unwrap_err();
        assert!(err.to_string().contains("names no commit"), "{err}");
    }
}
