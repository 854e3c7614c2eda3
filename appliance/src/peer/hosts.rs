//! Host load reports (`cpu`, `mem`, `disk` used fractions) travelling up the
//! indexer tree, for the planner's placement policies.
//!
//! - An agent measures its host ([`crate::peer::hostmetrics::Sampler`]) and sends
//!   `HostMetrics` to its parent every `metrics_interval_ms`.
//! - An indexer keeps the latest report per host ([`HostReports`], in memory: a
//!   report is worth something for seconds, the next one comes within an
//!   interval, and a restarted indexer is full again one interval later) and
//!   forwards all of them to its own parent at its own `metrics_interval_ms`, so
//!   every level up to the global indexer knows every host below it.
//! - Ages, not timestamps, cross the wire: each level turns "measured `age_ms`
//!   ago" into its own monotonic clock, so the peers' clocks need not agree.
//!
//! The sender of both is [`MetricsReporter`].

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use super::{
    client::{FetchError, Peer},
    proto::{code, HostReport, HostResources, VmReport},
};
use crate::plan::HostMetrics;

/// Hosts one indexer keeps reports of; reports of further hosts are dropped.
pub const MAX_HOSTS: usize = 65_536;
/// Reports older than this are forgotten (and not forwarded).
pub const FORGET_AFTER: Duration = Duration::from_hours(1);
/// How long a reporter waits before trying a parent that refused `HostMetrics`
/// (an older build that does not know the message).
pub const REFUSED_BACKOFF: Duration = Duration::from_mins(10);

#[derive(Clone, Debug)]
struct Entry {
    metrics: HostMetrics,
    resources: HostResources,
    vms: Vec<VmReport>,
    measured_at: Instant,
    /// The child it came from (the host itself, or a child indexer).
    via: String,
}

/// The latest report of every host below an indexer.
#[derive(Debug, Default)]
pub struct HostReports {
    hosts: Mutex<BTreeMap<String, Entry>>,
    /// Reports dropped because [`MAX_HOSTS`] hosts are known already.
    pub dropped: AtomicU64,
}

/// One host's latest report, for status and the API.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportView {
    pub host: String,
    pub cpu: Option<f64>,
    pub mem: Option<f64>,
    pub disk: Option<f64>,
    /// Milliseconds since it was measured.
    pub age_ms: u64,
    /// The child that sent it.
    pub via: String,
    pub resources: HostResources,
    pub vms: Vec<VmReport>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl HostReports {
    /// Records `reports` received from child `via` at `now`; a report older than
    /// what is held for its host (it came the long way round) is ignored.
    /// Returns how many were recorded.
    pub fn record(&self, via: &str, reports: &[HostReport], now: Instant) -> usize {
        let mut hosts = self.hosts.lock();
        hosts.retain(|_, e| now.saturating_duration_since(e.measured_at) < FORGET_AFTER);
        let mut n = 0;
        for r in reports {
            let age = Duration::from_millis(r.age_ms);
            if age >= FORGET_AFTER {
                continue;
            }
            let Some(measured_at) = now.checked_sub(age) else {
                continue;
            };
            match hosts.get(&r.host) {
                Some(e) if e.measured_at > measured_at => continue,
                None if hosts.len() >= MAX_HOSTS => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                _ => {}
            }
            hosts.insert(
                r.host.clone(),
                Entry {
                    metrics: r.metrics,
                    resources: r.resources,
                    vms: r.vms.clone(),
                    measured_at,
                    via: via.to_string(),
                },
            );
            n += 1;
        }
        n
    }

    /// Metrics of the hosts whose report is at most `max_age` old at `now`.
    pub fn fresh(&self, now: Instant, max_age: Duration) -> BTreeMap<String, HostMetrics> {
        self.hosts
            .lock()
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.measured_at) <= max_age)
            .map(|(h, e)| (h.clone(), e.metrics))
            .collect()
    }

    /// Every report held (not yet forgotten), with its age at `now`: what an
    /// indexer forwards to its parent.
    pub fn to_forward(&self, now: Instant) -> Vec<HostReport> {
        self.hosts
            .lock()
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.measured_at) < FORGET_AFTER)
            .map(|(h, e)| HostReport {
                host: h.clone(),
                metrics: e.metrics,
                age_ms: ms(now.saturating_duration_since(e.measured_at)),
                resources: e.resources,
                vms: e.vms.clone(),
            })
            .collect()
    }

    /// Every report held, by host name.
    pub fn view(&self, now: Instant) -> Vec<ReportView> {
        self.hosts
            .lock()
            .iter()
            .map(|(h, e)| ReportView {
                host: h.clone(),
                cpu: e.metrics.cpu,
                mem: e.metrics.mem,
                disk: e.metrics.disk,
                age_ms: ms(now.saturating_duration_since(e.measured_at)),
                via: e.via.clone(),
                resources: e.resources,
                vms: e.vms.clone(),
            })
            .collect()
    }
}

/// Where a reporter stands (for status).
#[derive(Debug, Default, serde::Serialize)]
pub struct ReportStatus {
    /// Rounds the parent accepted.
    pub sent: AtomicU64,
    pub failures: AtomicU64,
    /// Reports in the last accepted round.
    pub last_reports: AtomicU64,
    #[serde(serialize_with = "super::serialize_locked")]
    pub last_error: Mutex<Option<String>>,
}

/// What a reporter sends each round (called on a blocking thread: it may read
/// `/proc` and stat a filesystem).
pub type Collect = Arc<dyn Fn() -> Vec<HostReport> + Send + Sync>;

/// Sends `HostMetrics` to a parent every `interval` (nothing when there is
/// nothing to report).
pub struct MetricsReporter {
    /// Our name, for logs.
    pub node: String,
    pub parent: Peer,
    pub interval: Duration,
    pub collect: Collect,
    pub status: Arc<ReportStatus>,
}

/// What to do after a round: the usual interval, or the long back-off after a
/// parent refused the message (it does not know it, or is not an indexer).
pub fn next_wait(result: &Result<(), FetchError>, interval: Duration) -> Duration {
    match result {
        Err(FetchError::Remote { code: c, .. })
            if *c == code::BAD_REQUEST || *c == code::UNSUPPORTED =>
        {
            REFUSED_BACKOFF.max(interval)
        }
        _ => interval,
    }
}

impl MetricsReporter {
    /// Runs until the task is dropped.
    pub async fn run(self) {
        loop {
            let r = self.round().await;
            match &r {
                Ok(()) => *self.status.last_error.lock() = None,
                Err(e) => {
                    self.status.failures.fetch_add(1, Ordering::Relaxed);
                    let msg = e.to_string();
                    let mut last = self.status.last_error.lock();
                    if last.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(node = %self.node, parent = %self.parent.addr(),
                            "host metrics: {msg}");
                    }
                    *last = Some(msg);
                }
            }
            tokio::time::sleep(next_wait(&r, self.interval)).await;
        }
    }

    async fn round(&self) -> Result<(), FetchError> {
        let collect = self.collect.clone();
        let reports = tokio::task::spawn_blocking(move || collect())
            .await
            .unwrap_or_default();
        if reports.is_empty() {
            return Ok(());
        }
        let n = reports.len() as u64;
        self.parent.report_metrics(reports).await?;
        self.status.sent.fetch_add(1, Ordering::Relaxed);
        self.status.last_reports.store(n, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(host: &str, cpu: f64, age_ms: u64) -> HostReport {
        HostReport {
            host: host.into(),
            metrics: HostMetrics {
                cpu: Some(cpu),
                ..Default::default()
            },
            age_ms,
            resources: HostResources::default(),
            vms: Vec::new(),
        }
    }

    #[test]
    fn keeps_the_newest_report_per_host_by_measurement_time() {
        let r = HostReports::default();
        let t0 = Instant::now() + Duration::from_secs(10_000);
        assert_eq!(r.record("hv1", &[report("hv1", 0.5, 0)], t0), 1);
        // Via another path, measured earlier: ignored.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(r.record("rack9", &[report("hv1", 0.9, 3000)], t1), 0);
        assert_eq!(r.fresh(t1, Duration::from_mins(1))["hv1"].cpu, Some(0.5));
        // Measured later: replaces it, and says where it came from.
        assert_eq!(r.record("rack9", &[report("hv1", 0.7, 1000)], t1), 1);
        let v = r.view(t1);
        assert_eq!(v.len(), 1);
        assert_eq!(
            (v[0].cpu, v[0].age_ms, v[0].via.as_str()),
            (Some(0.7), 1000, "rack9")
        );
        // Forwarded with its age at forwarding time.
        let f = r.to_forward(t1 + Duration::from_millis(500));
        assert_eq!((f[0].host.as_str(), f[0].age_ms), ("hv1", 1500));
    }

    #[test]
    fn staleness_and_forgetting() {
        let r = HostReports::default();
        let t0 = Instant::now() + Duration::from_secs(10_000);
        r.record(
            "hv1",
            &[report("hv1", 0.1, 0), report("hv2", 0.2, 59_000)],
            t0,
        );
        let bound = Duration::from_mins(1);
        assert_eq!(r.fresh(t0, bound).len(), 2);
        let later = t0 + Duration::from_secs(2);
        let fresh = r.fresh(later, bound);
        assert_eq!(fresh.keys().collect::<Vec<_>>(), ["hv1"]);
        // Stale reports are still shown and forwarded (the receiver judges).
        assert_eq!(r.view(later).len(), 2);
        assert_eq!(r.to_forward(later).len(), 2);
        // Too old to keep: neither recorded nor forwarded, and forgotten.
        assert_eq!(
            r.record("x", &[report("hv3", 0.3, ms(FORGET_AFTER))], t0),
            0
        );
        let much_later = t0 + FORGET_AFTER;
        assert!(r.to_forward(much_later).is_empty());
        r.record("hv4", &[report("hv4", 0.4, 0)], much_later);
        assert_eq!(r.view(much_later).len(), 1);
    }

    #[test]
    fn refusal_backs_off() {
        let i = Duration::from_secs(5);
        let refused = |c| {
            Err(FetchError::Remote {
                peer: "p".into(),
                code: c,
                acked: 0,
                message: "unknown message kind 26".into(),
            })
        };
        assert_eq!(next_wait(&refused(code::BAD_REQUEST), i), REFUSED_BACKOFF);
        assert_eq!(next_wait(&refused(code::UNSUPPORTED), i), REFUSED_BACKOFF);
        assert_eq!(next_wait(&refused(code::INTERNAL), i), i);
        assert_eq!(next_wait(&Ok(()), i), i);
        let down = Err(FetchError::Timeout { peer: "p".into() });
        assert_eq!(next_wait(&down, i), i);
    }
}
