//! libiscsi's conformance suite (`iscsi-test-cu`) as a judge: run it inside a node
//! and record every test's outcome, then compare two runs test by test.
//!
//! `CUnit` counts a skipped test as passed, so a skip has to be recognised from what the
//! test logged (`[SKIPPED]`). In XML mode (`-x`) the skip messages go to stdout with
//! nothing saying which test printed them, so the suite runs in its default verbose
//! mode instead, whose stdout names each suite and test and puts the test's messages
//! and its verdict right after it:
//!
//! ```text
//! Suite: CompareAndWrite
//!   Test: Simple ...    [SKIPPED] COMPAREANDWRITE is not implemented.
//! passed
//!   Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful but ...
//! FAILED
//! ```
//!
//! The families ALL, SCSI, iSCSI and LINUX overlap (ALL holds every test), so the run
//! asks for ALL only; a test is still keyed by suite, name and occurrence, so a
//! repeated name could never hide another.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::Lab;

/// What one test run came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Skipped,
    Failed,
}

/// (suite, test, occurrence) → outcome.
pub type Results = BTreeMap<(String, String, usize), Outcome>;

/// Parse the verbose-mode stdout of `iscsi-test-cu`.
pub fn parse(stdout: &str) -> Results {
    let mut results = Results::new();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut suite = String::new();
    // The test being run and the text it printed so far.
    let mut current: Option<(String, String)> = None;
    let mut finish =
        |suite: &str, name: String, text: &str, failed: bool, results: &mut Results| {
            let n = seen.entry((suite.to_string(), name.clone())).or_insert(0);
            *n += 1;
            let outcome = if failed {
                Outcome::Failed
            } else if text.contains("[SKIPPED]") {
                Outcome::Skipped
            } else {
                Outcome::Passed
            };
            results.insert((suite.to_string(), name, *n), outcome);
        };
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("Suite: ") {
            suite = rest.trim().to_string();
            current = None;
            continue;
        }
        if let Some(rest) = line.trim_start().strip_prefix("Test: ") {
            let (name, tail) = rest.split_once(" ...").unwrap_or((rest, ""));
            current = Some((name.trim().to_string(), String::new()));
            let verdict = tail.trim_end();
            if let Some((name, text)) = current.as_mut() {
                text.push_str(tail);
                if verdict.ends_with("passed") || verdict.ends_with("FAILED") {
                    let failed = verdict.ends_with("FAILED");
                    let (name, text) = (name.clone(), text.clone());
                    finish(&suite, name, &text, failed, &mut results);
                    current = None;
                }
            }
            continue;
        }
        let Some((name, text)) = current.as_mut() else {
            continue;
        };
        let trimmed = line.trim();
        if trimmed == "passed" || trimmed == "FAILED" {
            let (name, text) = (name.clone(), text.clone());
            finish(&suite, name, &text, trimmed == "FAILED", &mut results);
            current = None;
        } else {
            text.push('\n');
            text.push_str(line);
        }
    }
    results
}

/// Run the whole suite once (`-t ALL`: the family that holds every test; the
/// default run adds the SCSI, iSCSI and LINUX families, which repeat 385 of them)
/// with destructive tests allowed (`-d`) from `node` against `url` (given twice,
/// for the multipath tests), in its own working directory `workdir`.
/// Returns the parsed results and the raw stdout. Prints the run's wall time and
/// its slowest tests (the suite is most of the test phase's time: where it goes is
/// worth seeing in every log).
pub fn run(lab: &Lab, node: &str, url: &str, workdir: &Path) -> Result<(Results, String)> {
    std::fs::create_dir_all(workdir)?;
    let started = Instant::now();
    let mut child = lab
        .cmd(
            node,
            &[
                "timeout",
                "900",
                "iscsi-test-cu",
                "-d",
                "-v",
                "-t",
                "ALL",
                url,
                url,
            ],
        )
        .current_dir(workdir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iscsi-test-cu")?;
    let stderr = child.stderr.take().context("stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = BufReader::new(stderr).read_to_end(&mut buf);
        buf
    });
    let mut stdout = String::new();
    let mut durations: Vec<(Duration, String)> = Vec::new();
    let mut current: Option<(Instant, String)> = None;
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line.context("reading iscsi-test-cu's output")?;
        if let Some(rest) = line.trim_start().strip_prefix("Test: ") {
            if let Some((t, name)) = current.take() {
                durations.push((t.elapsed(), name));
            }
            let name = rest.split_once(" ...").map_or(rest, |(n, _)| n);
            current = Some((Instant::now(), name.trim().to_string()));
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    if let Some((t, name)) = current.take() {
        durations.push((t.elapsed(), name));
    }
    let status = child.wait().context("waiting for iscsi-test-cu")?;
    let stderr = stderr.join().unwrap_or_default();
    std::fs::write(workdir.join("stdout.txt"), &stdout)?;
    std::fs::write(workdir.join("stderr.txt"), &stderr)?;
    durations.sort_by_key(|d| std::cmp::Reverse(d.0));
    let slowest: Vec<String> = durations
        .iter()
        .take(5)
        .map(|(d, n)| format!("{n} {:.1} s", d.as_secs_f64()))
        .collect();
    eprintln!(
        "iscsi-test-cu from {node}: {} tests in {:.0} s; slowest: {}",
        durations.len(),
        started.elapsed().as_secs_f64(),
        slowest.join(", ")
    );
    let results = parse(&stdout);
    if results.len() < 100 {
        bail!(
            "iscsi-test-cu ran only {} tests ({status}): {}",
            results.len(),
            String::from_utf8_lossy(&stderr)
        );
    }
    Ok((results, stdout))
}

/// Per-test differences between two runs (empty: identical outcomes).
pub fn differences(expected: &Results, actual: &Results) -> Vec<String> {
    let mut out = Vec::new();
    for (key, want) in expected {
        match actual.get(key) {
            Some(got) if got == want => {}
            Some(got) => out.push(format!(
                "{}.{} #{}: {want:?} → {got:?}",
                key.0, key.1, key.2
            )),
            None => out.push(format!(
                "{}.{} #{}: {want:?} → missing",
                key.0, key.1, key.2
            )),
        }
    }
    for key in actual.keys().filter(|k| !expected.contains_key(*k)) {
        out.push(format!("{}.{} #{}: unexpected", key.0, key.1, key.2));
    }
    out
}

/// Counts of (passed, skipped, failed).
pub fn summary(results: &Results) -> (usize, usize, usize) {
    let count = |o| results.values().filter(|&&v| v == o).count();
    (
        count(Outcome::Passed),
        count(Outcome::Skipped),
        count(Outcome::Failed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pass_fail_skip_and_repeats() {
        let out = "found matching LU device identifier\n\nSuite: GetLBAStatus\n  Test: Simple ...passed\n  Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful\nFAILED\n    1. test.c:38  - CU_ASSERT_EQUAL(_r,0)\n  Test: UnmapSingle ...    [SKIPPED] fully provisioned\npassed\nSuite: CompareAndWrite\n  Test: Simple ...    [SKIPPED] not implemented.\n    [SKIPPED] not implemented.\npassed\nSuite: GetLBAStatus\n  Test: Simple ...passed\n\nRun Summary:    Type  Total\n";
        let r = parse(out);
        let get = |s: &str, t: &str, n| r[&(s.to_string(), t.to_string(), n)];
        assert_eq!(r.len(), 5);
        assert_eq!(get("GetLBAStatus", "Simple", 1), Outcome::Passed);
        assert_eq!(get("GetLBAStatus", "Simple", 2), Outcome::Passed);
        assert_eq!(get("GetLBAStatus", "BeyondEol", 1), Outcome::Failed);
        assert_eq!(get("GetLBAStatus", "UnmapSingle", 1), Outcome::Skipped);
        assert_eq!(get("CompareAndWrite", "Simple", 1), Outcome::Skipped);
        assert_eq!(summary(&r), (2, 2, 1));
        let mut other = r.clone();
        other.insert(
            ("GetLBAStatus".into(), "Simple".into(), 2),
            Outcome::Skipped,
        );
        assert_eq!(differences(&r, &other).len(), 1);
    }
}
