//! Where a benchmark's CPU goes: samples of the machine's busy time (`/proc/stat`)
//! and of every process's user + system time (`/proc/PID/stat`), and the
//! difference between two samples in core-seconds, by process role. On a
//! two-core machine that runs the initiator, the target, the appliance and the
//! agents at once, this is what a throughput ratio is spent on.

use std::collections::{BTreeMap, HashMap};

/// Clock ticks per second of `/proc` times (`_SC_CLK_TCK`).
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// One sample: the machine's busy and total ticks, and each process's ticks.
#[derive(Clone, Debug, Default)]
pub struct CpuSample {
    busy: u64,
    total: u64,
    procs: HashMap<u32, (String, u64)>,
}

/// Busy and total ticks from the first line of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?;
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

/// (comm, utime + stime) from a `/proc/PID/stat` line.
pub fn parse_pid_stat(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After the comm: state(0) … utime is field 14 of the line, 11 here.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// A process's role for the report: nearblock's subcommand (`run`, `agent`,
/// `indexer`) or the program's name.
fn role(pid: u32, comm: &str) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let prog = args
        .first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or(comm);
    if prog == "nearblock" {
        let sub = args.get(1).map_or("?", |s| s.as_str());
        return match sub {
            "run" => "appliance".into(),
            other => format!("nearblock {other}"),
        };
    }
    if prog.is_empty() {
        comm.to_string()
    } else {
        prog.to_string()
    }
}

impl CpuSample {
    pub fn take() -> CpuSample {
        let (busy, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_proc_stat(&t))
            .unwrap_or_default();
        let mut procs = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Some((comm, ticks)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|t| parse_pid_stat(&t))
                else {
                    continue;
                };
                procs.insert(pid, (role(pid, &comm), ticks));
            }
        }
        CpuSample { busy, total, procs }
    }

    /// Core-seconds used since `before`: the whole machine's, and per role of the
    /// processes alive at both samples (a process that started or ended between
    /// them is left to the remainder, `other`, with the kernel's own work).
    pub fn since(&self, before: &CpuSample) -> CpuUse {
        let hz = ticks_per_sec();
        let total = self.busy.saturating_sub(before.busy) as f64 / hz;
        let mut by_role: BTreeMap<String, f64> = BTreeMap::new();
        for (pid, (role, ticks)) in &self.procs {
            if let Some((_, t0)) = before.procs.get(pid) {
                let used = ticks.saturating_sub(*t0) as f64 / hz;
                if used > 0.0 {
                    *by_role.entry(role.clone()).or_default() += used;
                }
            }
        }
        let named: f64 = by_role.values().sum();
        by_role.insert("other".into(), (total - named).max(0.0));
        CpuUse {
            core_seconds: total,
            wall_fraction: self.busy.saturating_sub(before.busy) as f64
                / self.total.saturating_sub(before.total).max(1) as f64,
            by_role,
        }
    }
}

/// CPU used between two samples.
#[derive(Clone, Debug, Default)]
pub struct CpuUse {
    /// Busy core-seconds, all CPUs.
    pub core_seconds: f64,
    /// Busy share of all CPUs' time (1.0: every core busy throughout).
    pub wall_fraction: f64,
    /// Core-seconds per process role; `other` is the rest (processes that came
    /// or went in between, such as the benchmark client, and the kernel's).
    pub by_role: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_and_pid_stat() {
        let stat = "cpu  100 5 50 800 10 1 4 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_proc_stat(stat), Some((160, 970)));
        assert_eq!(parse_proc_stat("intr 1 2 3"), None);
        let pid = "42 (tokio rt) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 4 0 1 2 3";
        assert_eq!(parse_pid_stat(pid), Some(("tokio rt".into(), 10)));
        assert_eq!(parse_pid_stat("garbage"), None);
    }
}
