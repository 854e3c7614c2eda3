//! A host's load as used fractions in [0, 1], measured the way `top`, `free` and
//! `df` do, for the planner's placement policies (`cpu`, `mem`, `disk`). Agents
//! measure and report them to their parent indexer (`super::hosts`).
//!
//! - `cpu`: busy share of all CPUs between two `/proc/stat` `cpu` lines:
//!   1 − Δ(idle + iowait) / Δ(user + nice + system + idle + iowait + irq + softirq
//!   + steal). `guest` and `guest_nice` are already counted in `user` and `nice`.
//! - `mem`: 1 − MemAvailable / MemTotal from `/proc/meminfo` (kernels before 3.14
//!   have no MemAvailable: MemFree + Buffers + Cached instead).
//! - `disk`: used / (used + available to unprivileged users) of a filesystem, from
//!   `statvfs(3)`: what `df` prints as Use%.
//!
//! Network namespaces share `/proc/stat` and `/proc/meminfo` with the host, so an
//! agent in a namespace measures the machine it runs on.

use std::path::{Path, PathBuf};

use crate::plan::HostMetrics;

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("read {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("{0}: no usable line")]
    Parse(&'static str),
    #[error("statvfs {path}: {source}")]
    Statvfs {
        path: String,
        source: std::io::Error,
    },
}

/// Cumulative CPU time of the `cpu` line of `/proc/stat` (clock ticks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// idle + iowait.
    pub idle: u64,
    /// user + nice + system + idle + iowait + irq + softirq + steal.
    pub total: u64,
}

/// The aggregate `cpu` line of `/proc/stat`. Kernels print 4 to 10 fields; the
/// missing ones count as 0.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let mut f = [0u64; 8];
    let mut n = 0;
    for (slot, v) in f.iter_mut().zip(line.split_whitespace().skip(1)) {
        *slot = v.parse().ok()?;
        n += 1;
    }
    if n < 4 {
        return None;
    }
    let idle = f[3].checked_add(f[4])?;
    let total = f.iter().try_fold(0u64, |a, &v| a.checked_add(v))?;
    Some(CpuTimes { idle, total })
}

/// Busy fraction between two samples; `None` when no time passed or the
/// counters went backwards (a different machine, a wrap).
pub fn cpu_busy_fraction(before: CpuTimes, after: CpuTimes) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let idle = after.idle.checked_sub(before.idle)?;
    if total == 0 || idle > total {
        return None;
    }
    Some(clamp01(1.0 - idle as f64 / total as f64))
}

/// A `/proc/meminfo` field (given in kB) in bytes.
pub fn meminfo_bytes(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()?
            .checked_mul(1024)
    })
}

/// Used memory fraction from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<f64> {
    let field = |name: &str| meminfo_bytes(text, name);
    let total = field("MemTotal")?;
    if total == 0 {
        return None;
    }
    let available = match field("MemAvailable") {
        Some(a) => a,
        None => field("MemFree")?
            .saturating_add(field("Buffers").unwrap_or(0))
            .saturating_add(field("Cached").unwrap_or(0)),
    };
    Some(clamp01(1.0 - available as f64 / total as f64))
}

/// `df`'s Use%: used / (used + available to unprivileged users), from statvfs
/// block counts (any unit, the same for all three).
pub fn disk_used_fraction(blocks: u64, free: u64, available: u64) -> Option<f64> {
    let used = blocks.checked_sub(free)?;
    let denom = used.checked_add(available)?;
    if denom == 0 {
        return None;
    }
    Some(clamp01(used as f64 / denom as f64))
}

fn clamp01(v: f64) -> f64 {
    v.clamp(0.0, 1.0)
}

fn read_proc(path: &'static str) -> Result<String, MeasureError> {
    std::fs::read_to_string(path).map_err(|source| MeasureError::Read { path, source })
}

/// The `cpu` line of this machine's `/proc/stat`.
pub fn read_cpu_times() -> Result<CpuTimes, MeasureError> {
    parse_proc_stat(&read_proc("/proc/stat")?).ok_or(MeasureError::Parse("/proc/stat"))
}

/// This machine's used memory fraction.
pub fn read_mem() -> Result<f64, MeasureError> {
    parse_meminfo(&read_proc("/proc/meminfo")?).ok_or(MeasureError::Parse("/proc/meminfo"))
}

/// Used fraction of the filesystem holding `path`.
pub fn read_disk(path: &Path) -> Result<f64, MeasureError> {
    let st = statvfs(path)?;
    disk_used_fraction(st.f_blocks, st.f_bfree, st.f_bavail).ok_or(MeasureError::Parse("statvfs"))
}

/// Bytes available to unprivileged users on the filesystem holding `path`
/// (what `df` prints as Avail).
pub fn read_disk_free(path: &Path) -> Result<u64, MeasureError> {
    let st = statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn statvfs(path: &Path) -> Result<libc::statvfs, MeasureError> {
    use std::os::unix::ffi::OsStrExt;
    let err = |source| MeasureError::Statvfs {
        path: path.display().to_string(),
        source,
    };
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` points to a statvfs-sized
    // buffer that the call fills on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it initialised the struct (and it was zeroed).
    Ok(unsafe { st.assume_init() })
}

/// Measures a host at each call: cpu over the time since the previous call (the
/// first call has none, so no `cpu`), mem now, disk of `disk_path` now. Values in
/// `pinned` are reported as given instead of measured.
pub struct Sampler {
    disk_path: PathBuf,
    pinned: HostMetrics,
    last_cpu: Option<CpuTimes>,
    /// The last error per metric, so a persistent failure is logged once.
    last_errors: [Option<String>; 3],
}

impl Sampler {
    pub fn new(disk_path: PathBuf, pinned: HostMetrics) -> Self {
        Self {
            disk_path,
            pinned,
            last_cpu: None,
            last_errors: Default::default(),
        }
    }

    /// One sample. A measurement that fails leaves its metric unknown (`None`)
    /// and is logged when its error changes.
    pub fn sample(&mut self) -> HostMetrics {
        let pinned = self.pinned;
        HostMetrics {
            cpu: pinned.cpu.or_else(|| self.measure_cpu()),
            mem: pinned.mem.or_else(|| self.measure_mem()),
            disk: pinned.disk.or_else(|| self.measure_disk()),
        }
    }

    /// Busy fraction since the last sample (unknown at the first).
    fn measure_cpu(&mut self) -> Option<f64> {
        let now = read_cpu_times();
        let v = match (&now, self.last_cpu) {
            (Ok(n), Some(b)) => cpu_busy_fraction(b, *n),
            _ => None,
        };
        self.last_cpu = now.as_ref().ok().copied();
        self.note(0, now.err());
        v
    }

    fn measure_mem(&mut self) -> Option<f64> {
        let r = read_mem();
        let v = r.as_ref().ok().copied();
        self.note(1, r.err());
        v
    }

    fn measure_disk(&mut self) -> Option<f64> {
        let r = read_disk(&self.disk_path);
        let v = r.as_ref().ok().copied();
        self.note(2, r.err());
        v
    }

    fn note(&mut self, i: usize, e: Option<MeasureError>) {
        let e = e.map(|e| e.to_string());
        if e.is_some() && e != self.last_errors[i] {
            tracing::warn!("host metrics: {}", e.as_deref().unwrap_or_default());
        }
        self.last_errors[i] = e;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT_A: &str = "cpu  100 20 30 800 50 0 0 0 10 0
cpu0 50 10 15 400 25 0 0 0 5 0
intr 12345
";
    // 200 more ticks: 50 idle + 10 iowait, the rest busy (70 %).
    const STAT_B: &str = "cpu  180 30 70 850 60 5 5 0 40 0
cpu0 90 15 35 425 30 2 3 0 20 0
";

    #[test]
    fn cpu_fraction_from_two_proc_stat_samples() {
        let a = parse_proc_stat(STAT_A).unwrap();
        assert_eq!(
            a,
            CpuTimes {
                idle: 850,
                total: 1000
            }
        );
        let b = parse_proc_stat(STAT_B).unwrap();
        assert_eq!(b.total - a.total, 200);
        let f = cpu_busy_fraction(a, b).unwrap();
        assert!((f - 0.7).abs() < 1e-12, "{f}");
        // No time passed, or counters from another boot: unknown.
        assert_eq!(cpu_busy_fraction(b, b), None);
        assert_eq!(cpu_busy_fraction(b, a), None);
        // Old kernels print only four fields.
        assert_eq!(
            parse_proc_stat("cpu 1 2 3 4\n"),
            Some(CpuTimes { idle: 4, total: 10 })
        );
        assert_eq!(parse_proc_stat("cpu 1 2 3\n"), None);
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_proc_stat("cpu 1 x 3 4\n"), None);
    }

    #[test]
    fn mem_fraction_from_meminfo() {
        let t = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    4000000 kB\nBuffers:          100 kB\n";
        assert_eq!(parse_meminfo(t), Some(0.75));
        // Without MemAvailable: free + buffers + cached.
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n";
        assert_eq!(parse_meminfo(old), Some(0.6));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n"), None);
        // A prefix of another key does not match (MemTotalX).
        assert_eq!(
            parse_meminfo("MemTotalX: 5 kB\nMemTotal: 10 kB\nMemAvailable: 5 kB\n"),
            Some(0.5)
        );
    }

    #[test]
    fn disk_fraction_like_df() {
        // 100 blocks, 40 free of which 30 available (10 reserved for root):
        // used 60 / (60 + 30).
        let f = disk_used_fraction(100, 40, 30).unwrap();
        assert!((f - 60.0 / 90.0).abs() < 1e-12);
        assert_eq!(disk_used_fraction(0, 0, 0), None);
        assert_eq!(disk_used_fraction(10, 20, 5), None);
        assert_eq!(disk_used_fraction(100, 0, 0), Some(1.0));
    }

    /// The real /proc and filesystem of the machine running the tests.
    #[test]
    fn measures_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(dir.path().into(), HostMetrics::default());
        let first = s.sample();
        assert_eq!(first.cpu, None, "no cpu before a second sample");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let m = s.sample();
        for v in [m.cpu, m.mem, m.disk] {
            let v = v.expect("measured");
            assert!((0.0..=1.0).contains(&v), "{v}");
        }
        let pinned = HostMetrics {
            cpu: Some(0.25),
            mem: None,
            disk: Some(1.0),
        };
        let m = Sampler::new(dir.path().into(), pinned).sample();
        assert_eq!((m.cpu, m.disk), (Some(0.25), Some(1.0)));
        assert!(m.mem.is_some());
        // An unmeasurable filesystem leaves disk unknown.
        let m = Sampler::new("/nonexistent/x".into(), HostMetrics::default()).sample();
        assert_eq!(m.disk, None);
    }
}
