//! The HTTP API: `GET /status` (JSON: flows, interfaces, verdicts, splicer,
//! discovery), `GET /metrics` (Prometheus text), `/links`, `/costs`, `/plan/*`,
//! `GET /hosts` (the host metrics placement uses, and where they come from),
//! `GET /healthz`, the versioned API ([`v1`]) and the console ([`console`]).
//!
//! Every route but `/metrics`, `/healthz` and the console's static files
//! needs a bearer token ([`auth`]).
//! Work that walks kernel maps or plans runs on the blocking pool, a few
//! requests at a time, so a burst of requests cannot stall the async workers
//! the splicer and the peer service share.

pub mod auth;
pub mod console;
pub mod error;
pub mod v1;

use std::sync::Arc;

use axum::{
    extract::{FromRef, Query, State},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::Semaphore;

use crate::state::{Appliance, StatusReport};

/// What the handlers share: the appliance, and the permits for heavy work.
#[derive(Clone)]
pub struct ApiState {
    app: Arc<Appliance>,
    heavy: Arc<Semaphore>,
}

impl FromRef<ApiState> for Arc<Appliance> {
    fn from_ref(s: &ApiState) -> Self {
        s.app.clone()
    }
}

/// Serve the API on `listener` until the task is dropped; `auth`'s token files
/// are re-read beside it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<Appliance>,
    auth: Arc<auth::ApiAuth>,
) {
    if !auth.has_tokens() {
        tracing::warn!(
            "no [api] token file: every route but /metrics and /healthz answers 401 \
             (make a token with `nearblock api token new --out FILE`)"
        );
    }
    let state = ApiState {
        app,
        heavy: Arc::new(Semaphore::new(heavy_concurrency())),
    };
    let open = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .merge(console::routes());
    let read = Router::new()
        .route("/status", get(status))
        .route("/links", get(links))
        .route("/costs", get(costs))
        .route("/plan/construct", get(plan_construct))
        .route("/plan/place", get(plan_place))
        .route("/hosts", get(hosts))
        .merge(v1::read_routes());
    let admin = v1::admin_routes();
    let router = auth::layout(auth.clone(), open, read, admin).with_state(state);
    tokio::select! {
        r = axum::serve(listener, router) => {
            if let Err(e) = r {
                tracing::warn!(cause = %e, "API server stopped");
            }
        }
        () = auth.refresh_loop() => {}
    }
}

/// Heavy requests run at most this many at a time (one per core): more would
/// only queue on the cores and the datapath lock.
fn heavy_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

/// Run `work` on the blocking pool once a heavy-work permit is free.
async fn offload<T: Send + 'static>(
    heavy: &Semaphore,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = heavy
        .acquire()
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request task: {e}"),
        )
    })?
}

/// `GET /healthz`: the process and its runtime answer (liveness; open, like
/// `/metrics`, for probes that hold no token).
async fn healthz() -> &'static str {
    "ok\n"
}

async fn status(State(s): State<ApiState>) -> Result<Json<StatusReport>, ApiError> {
    let app = s.app.clone();
    offload(&s.heavy, move || {
        app.status()
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await
    .map(Json)
}

/// `GET /links`: this appliance's own links and their measured utilisation.
async fn links(State(app): State<Arc<Appliance>>) -> Json<Vec<crate::cost::feed::LinkUtilization>> {
    Json(app.own_links())
}

#[derive(serde::Deserialize)]
struct CostsQuery {
    target: String,
}

/// `GET /costs?target=NODE`: path cost from every node to NODE under the live
/// link costs (`null`: unreachable).
async fn costs(
    State(s): State<ApiState>,
    Query(q): Query<CostsQuery>,
) -> Result<Json<std::collections::BTreeMap<String, Option<f64>>>, ApiError> {
    let app = s.app.clone();
    offload(&s.heavy, move || {
        let Some(live) = &app.live_costs else {
            return Err((StatusCode::NOT_FOUND, "no [cost] section configured".into()));
        };
        let mut live = live.lock();
        crate::cost::feed::costs_to(&mut live, &q.target).ok_or((
            StatusCode::NOT_FOUND,
            format!("`{}` is not a node of the topology", q.target),
        ))
    })
    .await
    .map(Json)
}

#[derive(serde::Deserialize)]
struct ConstructQuery {
    image: String,
    target: String,
    block_size: Option<u32>,
    /// List every block with its source, in prefetch order (the served LUN's
    /// access history, when this appliance serves the image and has one).
    #[serde(default)]
    blocks: bool,
    /// `static` prices paths with the topology's weights; default: live weights.
    #[serde(default)]
    pricing: Option<String>,
}

#[derive(serde::Deserialize)]
struct PlaceQuery {
    image: String,
    /// Comma-separated host names.
    candidates: String,
    #[serde(default = "best")]
    policy: String,
    block_size: Option<u32>,
    #[serde(default)]
    pricing: Option<String>,
}

fn best() -> String {
    "best".into()
}

type ApiError = (StatusCode, String);

fn planner_parts(
    app: &Appliance,
    pricing: Option<&str>,
) -> Result<
    (
        crate::plan::indexed::IndexedStore<Arc<crate::index::RedbStore>>,
        crate::cost::Topology,
    ),
    ApiError,
> {
    let planner = app.planner.as_ref().ok_or((
        StatusCode::NOT_FOUND,
        "no [planner] section configured".to_string(),
    ))?;
    let live = match pricing {
        None | Some("live") => true,
        Some("static") => false,
        Some(other) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("pricing `{other}`: live or static"),
            ))
        }
    };
    let topo = app
        .priced_topology(live)
        .ok_or((StatusCode::NOT_FOUND, "no planner".into()))?;
    let store = crate::plan::indexed::IndexedStore::new(planner.store.clone())
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((store, topo))
}

/// `GET /plan/construct?image=&target=[&block_size=][&pricing=static][&blocks=true]`:
/// the same report as `nearblock plan construct --json`, priced with live link
/// costs; with `blocks`, the per-block list in the served LUN's prefetch order.
async fn plan_construct(
    State(s): State<ApiState>,
    Query(q): Query<ConstructQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = s.app.clone();
    offload(&s.heavy, move || construct(&app, q))
        .await
        .map(Json)
}

fn construct(app: &Appliance, q: ConstructQuery) -> Result<serde_json::Value, ApiError> {
    let (store, topo) = planner_parts(app, q.pricing.as_deref())?;
    let req = crate::plan::offline::ConstructRequest {
        target: q.target,
        block_size: q.block_size,
        capacity: None,
        list_blocks: q.blocks,
        history: app.catalog.as_ref().and_then(|c| c.history_of(&q.image)),
        image: q.image,
    };
    let report = crate::plan::offline::construct_report(&store, &topo, &req)
        .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    serde_json::to_value(report).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// `GET /plan/place?image=&candidates=h1,h2[&policy=][&block_size=][&pricing=static]`:
/// the same report as `nearblock plan place --json`.
async fn plan_place(
    State(s): State<ApiState>,
    Query(q): Query<PlaceQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = s.app.clone();
    offload(&s.heavy, move || place(&app, q)).await.map(Json)
}

fn place(app: &Appliance, q: PlaceQuery) -> Result<serde_json::Value, ApiError> {
    let (store, topo) = planner_parts(app, q.pricing.as_deref())?;
    let policy = q
        .policy
        .parse()
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("policy: {e}")))?;
    // The `[planner] metrics` file with fresh agent reports laid over it.
    let metrics = app
        .planner
        .as_ref()
        .map(crate::state::Planner::metrics_now)
        .unwrap_or_default();
    let req = crate::plan::offline::PlaceRequest {
        image: q.image,
        candidates: q
            .candidates
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        policy,
        block_size: q.block_size,
        metrics,
        replica: false,
    };
    let report = crate::plan::offline::place_report(&store, &topo, &req)
        .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    serde_json::to_value(report).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// `GET /hosts`: per host, the agent-reported metrics (with their age), the
/// `[planner] metrics` file's, and the effective ones `/plan/place` uses.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostsReport {
    pub stale_after_secs: u64,
    pub hosts: Vec<HostView>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostView {
    pub host: String,
    /// The latest report, if any (stale or not).
    pub reported: Option<crate::peer::hosts::ReportView>,
    /// The report is at most `stale_after_secs` old, so it overrides the file.
    pub fresh: bool,
    pub file: Option<crate::plan::HostMetrics>,
    pub effective: crate::plan::HostMetrics,
}

/// Every host with a report or a file entry, by name. A report overrides the
/// file metric by metric while it is at most `stale_after` old (the same rule as
/// [`crate::plan::MetricsFile::overlaid`] over `HostReports::fresh`).
pub fn hosts_report(
    file: &crate::plan::MetricsFile,
    reported: Vec<crate::peer::hosts::ReportView>,
    stale_after: std::time::Duration,
) -> HostsReport {
    use std::collections::BTreeMap;
    let mut by_host: BTreeMap<String, Option<crate::peer::hosts::ReportView>> =
        file.host.keys().map(|h| (h.clone(), None)).collect();
    for r in reported {
        by_host.insert(r.host.clone(), Some(r));
    }
    let stale_ms = u64::try_from(stale_after.as_millis()).unwrap_or(u64::MAX);
    let hosts = by_host
        .into_iter()
        .map(|(host, reported)| {
            let file_m = file.host.get(&host).copied();
            let fresh = reported.as_ref().is_some_and(|r| r.age_ms <= stale_ms);
            let base = file_m.unwrap_or_default();
            let effective = match (&reported, fresh) {
                (Some(r), true) => crate::plan::HostMetrics {
                    cpu: r.cpu,
                    mem: r.mem,
                    disk: r.disk,
                }
                .or(base),
                _ => base,
            };
            HostView {
                host,
                reported,
                fresh,
                file: file_m,
                effective,
            }
        })
        .collect();
    HostsReport {
        stale_after_secs: stale_after.as_secs(),
        hosts,
    }
}

async fn hosts(State(app): State<Arc<Appliance>>) -> Result<Json<HostsReport>, ApiError> {
    let planner = app.planner.as_ref().ok_or((
        StatusCode::NOT_FOUND,
        "no [planner] section configured".to_string(),
    ))?;
    let reported = planner
        .reported
        .get()
        .map(|r| r.view(std::time::Instant::now()))
        .unwrap_or_default();
    Ok(Json(hosts_report(
        &planner.metrics,
        reported,
        planner.stale_after,
    )))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IfaceLabel {
    interface: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabel {
    interface: String,
}

/// `GET /metrics`: open (Prometheus scrapers hold no token). It shows counters
/// by verdict, interface name and source class only: no addresses, IQNs or
/// image names (those are in the token-guarded `/status`).
async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    let app = s.app.clone();
    offload(&s.heavy, move || {
        let manager = app.manager.get().map(|m| ManagerMetrics {
            jobs: m.jobs(),
            links: m.network.lock().as_ref().map(|n| n.links.clone()).unwrap_or_default(),
        });
        app.status()
            .map(|r| render_metrics(&r, manager.as_ref()))
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await
}

/// What a manager's appliance adds to `/metrics`: its jobs and its view of
/// the topology's links.
pub struct ManagerMetrics {
    pub jobs: Vec<crate::manage::Job>,
    pub links: Vec<crate::manage::network::LinkView>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    kind: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopologyLinkLabel {
    link: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HopsLabel {
    hops: String,
}

/// Finished jobs' durations, seconds: a build of a small image takes
/// seconds, a migration of a large disk tens of minutes.
const JOB_SECONDS_BUCKETS: [f64; 10] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// The manager's series: jobs by kind and state, finished jobs' durations,
/// and per topology link its utilisation and nearblock's rate.
fn register_manager(reg: &mut Registry, m: &ManagerMetrics) {
    let label = |j: &crate::manage::Job| JobLabel {
        kind: j.kind.name().to_owned(),
        state: j.state.name().to_owned(),
    };
    let jobs = Family::<JobLabel, Gauge>::default();
    let durations = Family::<JobLabel, Histogram>::new_with_constructor(|| {
        Histogram::new(JOB_SECONDS_BUCKETS.iter().copied())
    });
    for j in &m.jobs {
        jobs.get_or_create(&label(j)).inc();
        if j.state.is_final() {
            let secs = j.updated_ms.saturating_sub(j.created_ms) as f64 / 1000.0;
            durations.get_or_create(&label(j)).observe(secs);
        }
    }
    reg.register("jobs", "Jobs by kind and state", jobs);
    reg.register(
        "job_duration_seconds",
        "Finished jobs' durations, creation to final state, by kind and final state",
        durations,
    );
    let utilisation = Family::<TopologyLinkLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let nearblock = Family::<TopologyLinkLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for l in &m.links {
        let key = TopologyLinkLabel { link: l.name.clone() };
        if let Some(u) = l.utilisation {
            utilisation.get_or_create(&key).set(u);
        }
        nearblock.get_or_create(&key).set(l.nearblock_mbps * 1e6);
    }
    reg.register(
        "topology_link_utilization",
        "Topology links' utilisation as the appliances measure them (the manager's view)",
        utilisation,
    );
    reg.register(
        "topology_link_nearblock_bits_per_second",
        "nearblock's own builds' rate on each topology link over the last second",
        nearblock,
    );
}

/// Prometheus text for a status report. The counters live in kernel maps, so a
/// fresh registry is filled at every scrape with the current totals.
#[expect(
    clippy::too_many_lines,
    reason = "one registration per metric family, in the order operations.md lists them"
)]
pub fn render_metrics(r: &StatusReport, manager: Option<&ManagerMetrics>) -> String {
    let mut reg = Registry::with_prefix("nearblock");
    let verdicts = Family::<VerdictLabel, Counter>::default();
    for (name, v) in &r.verdicts {
        verdicts
            .get_or_create(&VerdictLabel {
                verdict: name.clone(),
            })
            .inc_by(*v);
    }
    reg.register("datapath_verdicts", "Packets by kernel verdict", verdicts);
    let bytes = Family::<IfaceLabel, Counter>::default();
    for i in &r.interfaces {
        for (dir, v) in [("rx", i.rx_bytes), ("tx", i.tx_bytes)] {
            bytes
                .get_or_create(&IfaceLabel {
                    interface: i.interface.clone(),
                    direction: dir.into(),
                })
                .inc_by(v);
        }
    }
    reg.register(
        "interface_bytes",
        "Bytes per interface and direction",
        bytes,
    );
    // The sampler's live rates (bits per second over its last interval) and, for
    // links with a configured capacity, their utilisation.
    let rates = Family::<IfaceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let utilisation = Family::<LinkLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for i in &r.interfaces {
        for (dir, bps) in [("rx", i.rate.rx_bps), ("tx", i.rate.tx_bps)] {
            rates
                .get_or_create(&IfaceLabel {
                    interface: i.interface.clone(),
                    direction: dir.into(),
                })
                .set(bps);
        }
        if let Some(u) = i.rate.utilization {
            utilisation
                .get_or_create(&LinkLabel {
                    interface: i.interface.clone(),
                })
                .set(u);
        }
    }
    reg.register(
        "interface_bits_per_second",
        "Bits per second per interface and direction over the last sample interval",
        rates,
    );
    reg.register(
        "link_utilization",
        "max(rx, tx) over the link's configured capacity",
        utilisation,
    );
    let s = &r.splicer;
    for (name, help, v) in [
        (
            "splicer_accepted",
            "Steered connections accepted",
            s.accepted,
        ),
        (
            "splicer_upstream_failed",
            "Upstream connects that failed",
            s.upstream_failed,
        ),
        (
            "splicer_bytes_to_target",
            "Bytes relayed initiator to target",
            s.bytes_to_target,
        ),
        (
            "splicer_bytes_to_initiator",
            "Bytes relayed target to initiator",
            s.bytes_to_initiator,
        ),
        (
            "splicer_protocol_errors",
            "Connections closed: undecodable PDUs, login timeout, too many tasks",
            s.protocol_errors,
        ),
        (
            "splicer_sessions_ambiguous",
            "Sessions passed through because their login text was ambiguous",
            s.sessions_ambiguous,
        ),
        (
            "splicer_sessions_tainted",
            "Served LUNs a session stopped being served (it may have written them)",
            s.sessions_tainted,
        ),
        (
            "splicer_raw_relayed",
            "iSCSI connections with nothing to serve, relayed after login",
            s.raw_relayed,
        ),
        (
            "splicer_handed_off",
            "Of those, connections handed to the kernel (forwarded by TC, rewritten)",
            s.handed_off,
        ),
        (
            "splicer_handoff_declined",
            "Handoffs not made: the connection stayed in the user-space relay",
            s.handoff_declined,
        ),
        (
            "splicer_over_cap_relayed",
            "Connections accepted over a connection cap, relayed as bytes",
            s.over_cap_relayed,
        ),
        (
            "splicer_fd_exhausted",
            "Accepts and upstream sockets that failed for want of file descriptors",
            s.fd_exhausted,
        ),
        (
            "splicer_http_requests",
            "HTTP requests the HTTP front end read whole (GET, HEAD)",
            s.http.requests,
        ),
        (
            "splicer_http_served",
            "HTTP GETs answered with a body from blocks (the origin validated the version)",
            s.http.served,
        ),
        (
            "splicer_http_passed",
            "HTTP requests (and connections' rests) the origin answered itself",
            s.http.passed,
        ),
        (
            "splicer_http_aborted",
            "HTTP connections closed early (origin changed or closed, data failed verification, client left)",
            s.http.aborted,
        ),
    ] {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    }
    // Where served bytes came from (provenance).
    let served = Family::<SourceLabel, Counter>::default();
    for (class, v) in &s.served {
        served
            .get_or_create(&SourceLabel {
                source: class.name().into(),
            })
            .inc_by(v.bytes);
    }
    served
        .get_or_create(&SourceLabel {
            source: "passed_through".into(),
        })
        .inc_by(s.library_bytes);
    reg.register(
        "splicer_served_bytes",
        "Bytes of served LUNs' READs by source (passed_through: answered by the library's target)",
        served,
    );
    let by_hops = Family::<HopsLabel, Counter>::default();
    for (hops, v) in &s.served_bytes_by_hops {
        by_hops
            .get_or_create(&HopsLabel {
                hops: hops.to_string(),
            })
            .inc_by(*v);
    }
    reg.register(
        "splicer_served_hop_bytes",
        "Bytes of served READs from fetched blocks, by the hop distance of their source",
        by_hops,
    );
    if let Some(c) = &s.cache {
        for (name, help, v) in [
            ("cache_hits", "Block cache lookups that found the block", c.hits),
            ("cache_misses", "Block cache lookups that did not", c.misses),
        ] {
            let counter = Counter::<u64>::default();
            counter.inc_by(v);
            reg.register(name, help, counter);
        }
        for (name, help, v) in [
            ("cache_bytes", "Bytes of blocks in the cache", c.bytes),
            ("cache_pinned_bytes", "Bytes of pinned (pre-staged) blocks in the cache", c.pinned_bytes),
        ] {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            reg.register(name, help, g);
        }
    }
    if let Some(m) = manager {
        register_manager(&mut reg, m);
    }
    if let Some(f) = &s.sourcing {
        for (name, help, v) in [
            (
                "splicer_fetch_blocks",
                "Blocks fetched from peers, verified and cached",
                f.fetched_blocks,
            ),
            (
                "splicer_fetch_bytes",
                "Bytes of blocks fetched from peers",
                f.fetched_bytes,
            ),
            (
                "splicer_fetch_failed",
                "Blocks no holder delivered",
                f.failed,
            ),
            (
                "splicer_fetch_corrupt",
                "Blocks a peer served that did not match their hash",
                f.corrupt,
            ),
            (
                "splicer_fetch_deadline_missed",
                "READs that passed through after waiting for fetches",
                f.deadline_missed,
            ),
            (
                "splicer_fetch_backed_off",
                "Blocks not fetched while holder lookups backed off after a failure",
                f.backed_off,
            ),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            reg.register(name, help, c);
        }
    }
    let active = Gauge::<i64>::default();
    active.set(i64::try_from(s.active).unwrap_or(i64::MAX));
    reg.register("splicer_active_flows", "Connections being spliced", active);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{peer::hosts::ReportView, plan::MetricsFile};
    use std::time::Duration;

    fn view(host: &str, cpu: Option<f64>, mem: Option<f64>, age_ms: u64) -> ReportView {
        ReportView {
            host: host.into(),
            cpu,
            mem,
            disk: None,
            age_ms,
            via: "rack1".into(),
            resources: crate::peer::proto::HostResources::default(),
            vms: Vec::new(),
        }
    }

    #[test]
    fn hosts_report_merges_fresh_reports_over_the_file() {
        let file = MetricsFile::parse("[host.hv1]\ncpu = 0.1\ndisk = 0.5\n[host.hv3]\ncpu = 0.3\n")
            .unwrap();
        let r = hosts_report(
            &file,
            vec![
                view("hv1", Some(0.9), Some(0.4), 1_000),
                view("hv2", Some(0.2), None, 61_000),
            ],
            Duration::from_mins(1),
        );
        assert_eq!(r.stale_after_secs, 60);
        let names: Vec<&str> = r.hosts.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(names, ["hv1", "hv2", "hv3"]);
        // hv1: fresh report wins per metric; disk only in the file.
        let h = &r.hosts[0];
        assert!(h.fresh);
        assert_eq!(
            (h.effective.cpu, h.effective.mem, h.effective.disk),
            (Some(0.9), Some(0.4), Some(0.5))
        );
        // hv2: stale report, no file entry: nothing known, but the report shown.
        let h = &r.hosts[1];
        assert!(!h.fresh && h.reported.is_some() && h.file.is_none());
        assert!(h.effective.is_empty());
        // hv3: file only.
        assert_eq!(r.hosts[2].effective.cpu, Some(0.3));
        assert!(r.hosts[2].reported.is_none());
    }
}
