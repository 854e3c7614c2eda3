//! A/B runs of the namespace benches (`bench-datapath`, `bench-splice`): which
//! `nearblock` binaries a run compares, the order they take in each round, and the
//! spread and new/old ratio printed for each figure.
//!
//! `cargo xtask bench … --baseline-rev REV` builds the old binary and passes it in
//! `NEARBLOCK_BENCH_BASELINE_BIN`; the binary under test is `NEARBLOCK_BIN` as
//! always. Both run every round, and which goes first alternates from round to
//! round, so a drift of the machine's load over the run (other work, page cache,
//! thermal) lands on both sides instead of on one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Rounds per binary below which two equal binaries too often look different
/// (non-overlapping ranges by chance: 2 / C(2n, n), 0.8% at 5, 33% at 2).
pub const MEANINGFUL_ROUNDS: usize = 5;

/// Which binary a sample was measured with.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Side {
    /// The baseline (`--baseline-rev`).
    Old,
    /// The tree under test; also holds figures measured without any appliance.
    New,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Old => "old",
            Side::New => "new",
        }
    }
}

/// The binaries of one run and how many rounds it takes.
pub struct Daemons {
    pub new: PathBuf,
    pub old: Option<PathBuf>,
    pub rounds: usize,
}

impl Daemons {
    /// From the environment the xtask sets: `NEARBLOCK_BIN` (else the lab's
    /// default), `NEARBLOCK_BENCH_BASELINE_BIN`, `NEARBLOCK_BENCH_ROUNDS`
    /// (`default_rounds` when unset).
    pub fn from_env(default_rounds: usize) -> Result<Daemons> {
        let new = nearblock_lab::nearblock_bin()?;
        let old = std::env::var_os("NEARBLOCK_BENCH_BASELINE_BIN").map(PathBuf::from);
        if let Some(old) = &old {
            if !old.is_file() {
                bail!(
                    "NEARBLOCK_BENCH_BASELINE_BIN={} is not a file",
                    old.display()
                );
            }
        }
        let rounds = match std::env::var("NEARBLOCK_BENCH_ROUNDS") {
            Ok(v) => parse_rounds(&v)?,
            Err(_) => default_rounds,
        };
        Ok(Daemons { new, old, rounds })
    }

    pub fn comparing(&self) -> bool {
        self.old.is_some()
    }

    /// The sides round `round` runs, in order (see [`order`]).
    pub fn order(&self, round: usize) -> &'static [Side] {
        order(round, self.comparing())
    }

    /// Make the lab start `side`'s binary for the appliances started from now on.
    pub fn select(&self, side: Side) {
        let bin: &Path = match side {
            Side::Old => self.old.as_deref().unwrap_or(&self.new),
            Side::New => &self.new,
        };
        // The lab reads NEARBLOCK_BIN at each appliance start. Set between
        // measurements from the bench's main thread, while no appliance is
        // starting; std's environment lock serialises it with the lab's reads.
        std::env::set_var("NEARBLOCK_BIN", bin);
    }
}

/// `NEARBLOCK_BENCH_ROUNDS`: a whole number from 1 to 100.
pub fn parse_rounds(text: &str) -> Result<usize> {
    let n: usize = text
        .trim()
        .parse()
        .with_context(|| format!("NEARBLOCK_BENCH_ROUNDS={text:?} is not a number"))?;
    if !(1..=100).contains(&n) {
        bail!("NEARBLOCK_BENCH_ROUNDS={n}: must be 1 to 100");
    }
    Ok(n)
}

/// The sides round `round` runs: only `New` without a baseline; with one, old
/// then new in even rounds and new then old in odd ones.
pub fn order(round: usize, comparing: bool) -> &'static [Side] {
    match (comparing, round % 2) {
        (false, _) => &[Side::New],
        (true, 0) => &[Side::Old, Side::New],
        (true, _) => &[Side::New, Side::Old],
    }
}

/// Minimum, median and maximum of a figure's samples.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of the finite samples (NaN marks a skipped measurement), or
    /// `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Spread> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        let median = if s.len().is_multiple_of(2) {
            f64::midpoint(s[mid - 1], s[mid])
        } else {
            s[mid]
        };
        Some(Spread {
            min: s[0],
            median,
            max: s[s.len() - 1],
        })
    }
}

/// How new compares with old on one figure.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Comparison {
    /// new median / old median.
    pub ratio: f64,
    /// `Some(true)`: every new sample is above every old one; `Some(false)`: every
    /// one is below; `None`: the ranges overlap (the difference is within the
    /// spread).
    pub beyond: Option<bool>,
}

pub fn compare(old: Spread, new: Spread) -> Comparison {
    let beyond = if new.min > old.max {
        Some(true)
    } else if new.max < old.min {
        Some(false)
    } else {
        None
    };
    Comparison {
        ratio: new.median / old.median,
        beyond,
    }
}

/// The header of [`row`]'s table, after a warning when `rounds` is too few for
/// the verdicts to mean anything.
pub fn header(rounds: usize) -> String {
    let warning = if rounds < MEANINGFUL_ROUNDS {
        format!("  ({rounds} rounds: too few for the verdicts below to mean anything; use {MEANINGFUL_ROUNDS} or more)\n")
    } else {
        String::new()
    };
    warning
        + &format!(
            "  {:<64} {:>24} {:>24} {:>8}  {}",
            "figure", "old min / median / max", "new min / median / max", "new/old", "difference"
        )
}

/// One figure's line: both spreads, the ratio, and whether it is beyond the
/// spread (`unit` names what the figure counts).
pub fn row(figure: &str, unit: &str, old: &[f64], new: &[f64]) -> String {
    let fmt = |s: Option<Spread>| match s {
        Some(s) => format!("{:.0} / {:.0} / {:.0}", s.min, s.median, s.max),
        None => "n/a".into(),
    };
    let (o, n) = (Spread::of(old), Spread::of(new));
    let (ratio, verdict) = match (o, n) {
        (Some(o), Some(n)) => {
            let c = compare(o, n);
            let verdict = match c.beyond {
                Some(true) => "higher, beyond the spread",
                Some(false) => "lower, beyond the spread",
                None => "within the spread",
            };
            (format!("{:.3}", c.ratio), verdict)
        }
        _ => ("n/a".into(), "not measured"),
    };
    format!(
        "  {:<64} {:>24} {:>24} {:>8}  {verdict}",
        format!("{figure} ({unit})"),
        fmt(o),
        fmt(n),
        ratio
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_alternates_and_runs_both_each_round() {
        assert_eq!(order(0, false), &[Side::New]);
        assert_eq!(order(1, false), &[Side::New]);
        assert_eq!(order(0, true), &[Side::Old, Side::New]);
        assert_eq!(order(1, true), &[Side::New, Side::Old]);
        assert_eq!(order(4, true), &[Side::Old, Side::New]);
    }

    #[test]
    fn spread_skips_nan_and_takes_the_middle_of_an_even_count() {
        let s = Spread::of(&[4.0, f64::NAN, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            s,
            Spread {
                min: 1.0,
                median: 2.5,
                max: 4.0
            }
        );
        assert_eq!(
            Spread::of(&[5.0, 1.0, 3.0]),
            Some(Spread {
                min: 1.0,
                median: 3.0,
                max: 5.0
            })
        );
        assert_eq!(Spread::of(&[f64::NAN]), None);
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn beyond_only_when_the_ranges_do_not_overlap() {
        let old = Spread::of(&[100.0, 110.0, 120.0]).unwrap();
        let higher = compare(old, Spread::of(&[121.0, 130.0, 140.0]).unwrap());
        assert_eq!(higher.beyond, Some(true));
        assert!((higher.ratio - 130.0 / 110.0).abs() < 1e-12);
        let lower = compare(old, Spread::of(&[80.0, 90.0, 99.0]).unwrap());
        assert_eq!(lower.beyond, Some(false));
        let overlap = compare(old, Spread::of(&[115.0, 125.0, 135.0]).unwrap());
        assert_eq!(overlap.beyond, None);
        // Touching ranges overlap.
        let touching = compare(old, Spread::of(&[120.0, 125.0]).unwrap());
        assert_eq!(touching.beyond, None);
    }

    #[test]
    fn row_says_what_was_not_measured() {
        let line = row("cold 64K", "MB/s", &[], &[1.0]);
        assert!(line.contains("not measured"), "{line}");
        let line = row("cold 64K", "MB/s", &[100.0, 100.0], &[150.0, 160.0]);
        assert!(line.contains("1.550"), "{line}");
        assert!(line.contains("higher, beyond the spread"), "{line}");
    }

    #[test]
    fn few_rounds_are_flagged() {
        assert!(header(2).contains("too few"));
        assert!(!header(5).contains("too few"));
    }

    #[test]
    fn rounds_are_bounded() {
        assert_eq!(parse_rounds(" 5\n").unwrap(), 5);
        assert!(parse_rounds("0").is_err());
        assert!(parse_rounds("101").is_err());
        assert!(parse_rounds("five").is_err());
    }
}
