//! The versioned operator API, `/api/v1`: the manager's inventory and jobs.
//! Every error is JSON, `{"code": "…", "message": "…"}` ([`ErrorBody`]), with
//! its status code. Reads need a
//! read token; creating and cancelling jobs an admin token.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /api/v1/vms` | the inventory: library images, hosts, VMs, discovery |
//! | `POST /api/v1/vms/{image}/place` | create a place-and-build job (202) |
//! | `GET /api/v1/jobs` | every job |
//! | `GET /api/v1/jobs/{id}` | one job: state, placement, plan, progress, events |
//! | `GET /api/v1/jobs/{id}/events` | the job as server-sent events, until it ends |
//! | `POST /api/v1/jobs/{id}/cancel` | cancel a running job |
//! | `POST /api/v1/hosts/{host}/vms/{name}/{action}` | start, pause, resume or retire a VM |
//! | `GET /api/v1/appliance` | this appliance: cache, LUNs, bytes served by source class |
//! | `GET /api/v1/network` | links (capacity, budget, utilisation, nearblock's rate), appliances, discovery |
//! | `GET /api/v1/events` | the console's live feed (server-sent events): inventory, network, jobs |
//! | `GET /api/v1/openapi.json` | this API as an OpenAPI 3.1 document, generated from these handlers as the routers register them ([`document`]) |

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json, Router,
};
use serde::Deserialize;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    error::{error_code, error_response, ErrorBody},
    ApiState,
};
use crate::{
    manage::{
        network::{ApplianceView, NetworkView},
        BuildMode, Job, ManageError, Manager, PlaceSpec, PlanningView,
    },
    state::Appliance,
};

/// A v1 error: its status and message, sent as JSON.
#[derive(Debug)]
pub struct V1Error(StatusCode, String);

impl IntoResponse for V1Error {
    fn into_response(self) -> Response {
        error_response(self.0, error_code(self.0), self.1)
    }
}

impl From<ManageError> for V1Error {
    fn from(e: ManageError) -> Self {
        let code = match &e {
            ManageError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ManageError::UnknownImage(_) | ManageError::NoJob(_) => StatusCode::NOT_FOUND,
            ManageError::NoPortal => StatusCode::NOT_IMPLEMENTED,
            ManageError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        V1Error(code, e.to_string())
    }
}

/// The v1 API's OpenAPI document: its title and shared schemas here; every
/// path is added by the router that serves it ([`read_router`],
/// [`admin_router`]), so the document lists exactly the routes served.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "nearblock operator API", version = "1"),
    components(schemas(ErrorBody, PlaceBody, Job, JobSummary, Targets, ApplianceView, NetworkView,
        crate::manage::inventory::Inventory))
)]
pub struct ApiDoc;

/// The routes a read token may call, each registered with its OpenAPI entry
/// (one `routes!` per handler: a route cannot be served undocumented).
fn read_router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(openapi))
        .routes(routes!(vms))
        .routes(routes!(appliance))
        .routes(routes!(network))
        .routes(routes!(follow))
        .routes(routes!(targets))
        .routes(routes!(jobs))
        .routes(routes!(job))
        .routes(routes!(events))
}

/// The routes that change state (an admin token).
fn admin_router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(place))
        .routes(routes!(cancel))
        .routes(routes!(vm_action))
}

/// The document of both routers.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = read_router().split_for_parts().1;
    doc.merge(admin_router().split_for_parts().1);
    doc
}

static DOCUMENT: std::sync::LazyLock<utoipa::openapi::OpenApi> = std::sync::LazyLock::new(document);

/// `GET /api/v1/openapi.json`.
#[utoipa::path(get, path = "/api/v1/openapi.json",
    responses((status = 200, description = "this document")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(DOCUMENT.clone())
}

pub fn read_routes() -> Router<ApiState> {
    read_router().split_for_parts().0
}

pub fn admin_routes() -> Router<ApiState> {
    admin_router().split_for_parts().0
}

/// Start, pause, resume or retire a VM through its host's hook.
#[utoipa::path(post, path = "/api/v1/hosts/{host}/vms/{name}/{action}",
    params(("host" = String, Path), ("name" = String, Path),
        ("action" = String, Path, description = "start, pause, resume, retire, or prestage (a job)")),
    responses((status = 200, description = "{host, vm, action}"),
        (status = 202, body = Job, description = "prestage: the pre-staging job"),
        (status = 400, body = ErrorBody)))]
async fn vm_action(
    State(s): State<ApiState>,
    Path((host, name, action)): Path<(String, String, String)>,
) -> Result<(StatusCode, Json<serde_json::Value>), V1Error> {
    if action == "prestage" {
        let m = manager(&s.app)?.clone();
        let view: Arc<dyn PlanningView> = s.app.clone();
        let job = tokio::task::spawn_blocking(move || m.prestage_vm(view, &host, &name))
            .await
            .map_err(|e| V1Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        let body = serde_json::to_value(&job).map_err(|e| V1Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        return Ok((StatusCode::ACCEPTED, Json(body)));
    }
    let action: crate::hypervisor::VmAction = action
        .parse()
        .map_err(|e| V1Error(StatusCode::BAD_REQUEST, format!("action {e}")))?;
    manager(&s.app)?.vm_action(&host, &name, action).await?;
    Ok((
        StatusCode::OK,
        Json(serde_json::json!({ "host": host, "vm": name, "action": action })),
    ))
}

fn manager(app: &Appliance) -> Result<&Arc<Manager>, V1Error> {
    app.manager.get().ok_or_else(|| {
        V1Error(
            StatusCode::NOT_FOUND,
            "this appliance runs no manager (no [manager] section)".into(),
        )
    })
}

/// The inventory: library images, hosts, VMs, discovery.
#[utoipa::path(get, path = "/api/v1/vms", responses(
    (status = 200, body = crate::manage::inventory::Inventory),
    (status = 404, body = ErrorBody, description = "no [manager] here")))]
async fn vms(State(s): State<ApiState>) -> Result<Json<crate::manage::inventory::Inventory>, V1Error> {
    inventory(&s).await.map(Json)
}

/// The inventory, assembled on the blocking pool (it reads the store).
async fn inventory(s: &ApiState) -> Result<crate::manage::inventory::Inventory, V1Error> {
    let app = s.app.clone();
    let _permit = s
        .heavy
        .acquire()
        .await
        .map_err(|e| V1Error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let m = manager(&app)?;
        let topology = app.topology().ok_or_else(|| {
            V1Error(StatusCode::NOT_FOUND, "no topology ([cost] and [planner])".into())
        })?;
        let mut inv = m.inventory(&topology)?;
        inv.discovery = app.discovery.lock().entries();
        Ok(inv)
    })
    .await
    .map_err(|e| V1Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// This appliance's own account: cache, LUNs, bytes served by source class.
#[utoipa::path(get, path = "/api/v1/appliance",
    responses((status = 200, body = ApplianceView)))]
async fn appliance(State(s): State<ApiState>) -> Json<ApplianceView> {
    Json(s.app.appliance_view())
}

/// The network: every link with its capacity, budget, utilisation and
/// nearblock's measured rate; every appliance's cache and LUNs (the manager's
/// own first); the discovery table.
#[utoipa::path(get, path = "/api/v1/network",
    responses((status = 200, body = NetworkView),
        (status = 404, body = ErrorBody, description = "no [manager] here")))]
async fn network(State(s): State<ApiState>) -> Result<Json<NetworkView>, V1Error> {
    network_now(&s.app).map(Json)
}

fn network_now(app: &Appliance) -> Result<NetworkView, V1Error> {
    let m = manager(app)?;
    let mut view = m.network.lock().clone().unwrap_or_default();
    view.appliances.insert(
        0,
        crate::manage::network::ApplianceEntry {
            api: "local".into(),
            view: Some(app.appliance_view()),
            error: None,
        },
    );
    view.discovery = app.discovery.lock().entries();
    Ok(view)
}

/// One line of the job list.
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct JobSummary {
    pub id: u64,
    pub kind: crate::manage::jobs::JobKind,
    pub state: crate::manage::JobState,
    pub name: String,
    pub image: String,
    pub target: Option<String>,
    pub blocks_done: u64,
    pub blocks_total: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub error: Option<String>,
}

impl From<&Job> for JobSummary {
    fn from(j: &Job) -> Self {
        Self {
            id: j.id,
            kind: j.kind,
            state: j.state,
            name: j.spec.name.clone(),
            image: j.spec.image.clone(),
            target: j.plan.as_ref().map(|p| p.target.clone()),
            blocks_done: j.progress.blocks_done,
            blocks_total: j.progress.blocks_total,
            created_ms: j.created_ms,
            updated_ms: j.updated_ms,
            error: j.error.clone(),
        }
    }
}

/// What the console's pages follow, as server-sent events.
struct Follow {
    s: ApiState,
    m: Arc<Manager>,
    rx: tokio::sync::broadcast::Receiver<u64>,
    tick: tokio::time::Interval,
    ticks: u64,
    jobs_changed: bool,
    last_inventory: Option<String>,
    last_network: Option<String>,
    queue: std::collections::VecDeque<Event>,
}

impl Follow {
    /// The next tick's events: the network when it changed (each second), the
    /// inventory when it changed (every other second), the job list when a
    /// job changed.
    async fn collect(&mut self) {
        if let Ok(net) = network_now(&self.s.app) {
            push_changed(&mut self.queue, &mut self.last_network, "network", &net);
        }
        if self.ticks.is_multiple_of(2) {
            if let Ok(inv) = inventory(&self.s).await {
                push_changed(&mut self.queue, &mut self.last_inventory, "inventory", &inv);
            }
        }
        if std::mem::take(&mut self.jobs_changed) {
            let jobs: Vec<JobSummary> = self.m.jobs().iter().rev().map(JobSummary::from).collect();
            if let Ok(e) = Event::default().event("jobs").json_data(&jobs) {
                self.queue.push_back(e);
            }
        }
        self.ticks += 1;
    }
}

/// Queues `value` as event `name` unless it is what was sent last.
fn push_changed<T: serde::Serialize>(
    queue: &mut std::collections::VecDeque<Event>,
    last: &mut Option<String>,
    name: &str,
    value: &T,
) {
    let Ok(text) = serde_json::to_string(value) else { return };
    if last.as_deref() != Some(text.as_str()) {
        queue.push_back(Event::default().event(name).data(&text));
        *last = Some(text);
    }
}

/// The console's live feed.
#[utoipa::path(get, path = "/api/v1/events",
    responses((status = 200, content_type = "text/event-stream",
        description = "`event: inventory` (the inventory, when it changed; checked every 2 s), \
            `event: network` (the network view, when it changed; each second), \
            `event: jobs` (every job's summary, newest first, when one changed); \
            each sent once at the start"),
        (status = 404, body = ErrorBody, description = "no [manager] here")))]
async fn follow(
    State(s): State<ApiState>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>, V1Error> {
    let m = manager(&s.app)?.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = Follow {
        s,
        rx: m.subscribe(),
        m,
        tick,
        ticks: 0,
        jobs_changed: true,
        last_inventory: None,
        last_network: None,
        queue: std::collections::VecDeque::new(),
    };
    let stream = futures_util::stream::unfold(state, |mut f| async move {
        loop {
            if let Some(e) = f.queue.pop_front() {
                return Some((Ok(e), f));
            }
            tokio::select! {
                _ = f.tick.tick() => f.collect().await,
                r = f.rx.recv() => match r {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => f.jobs_changed = true,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}

/// The body of `POST /api/v1/vms/{image}/place`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceBody {
    pub name: String,
    #[serde(default = "default_policy")]
    pub policy: String,
    #[serde(default = "default_mode")]
    pub mode: BuildMode,
    #[serde(default)]
    pub target: Option<String>,
    /// Only these hosts or racks.
    #[serde(default)]
    pub within: Vec<String>,
    /// `usage` or `none` (default: `usage` for mode transparent when the image
    /// has an access history).
    #[serde(default)]
    pub weighting: Option<crate::manage::jobs::Weighting>,
}

/// The query of `GET /api/v1/vms/{image}/targets`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TargetsQuery {
    #[serde(default = "default_policy")]
    pub policy: String,
    #[serde(default = "default_mode")]
    pub mode: BuildMode,
    /// Hosts or racks, comma-separated.
    #[serde(default)]
    pub within: Option<String>,
    #[serde(default)]
    pub weighting: Option<crate::manage::jobs::Weighting>,
}

/// The hypervisors ranked for an image, as a placement would rank them now.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Targets {
    pub image: String,
    pub mode: BuildMode,
    pub weighting: crate::manage::jobs::Weighting,
    /// Hosts left out and why; how the blocks were priced.
    pub notes: Vec<String>,
    pub placement: crate::plan::place::PlaceReport,
}

/// The ranked targets for an image (nothing is built).
#[utoipa::path(get, path = "/api/v1/vms/{image}/targets",
    params(("image" = String, Path, description = "the library image, percent-encoded"), TargetsQuery),
    responses(
        (status = 200, body = Targets),
        (status = 400, body = ErrorBody, description = "bad policy, no candidate, no history for weighting usage"),
        (status = 404, body = ErrorBody, description = "the image is not in the global index")))]
async fn targets(
    State(s): State<ApiState>,
    Path(image): Path<String>,
    query: Result<axum::extract::Query<TargetsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Targets>, V1Error> {
    let axum::extract::Query(q) = query.map_err(|e| V1Error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let m = manager(&s.app)?.clone();
    let spec = PlaceSpec {
        image: image.clone(),
        name: String::new(),
        policy: q.policy,
        mode: q.mode,
        target: None,
        within: q
            .within
            .map(|w| w.split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default(),
        weighting: q.weighting,
    };
    let view: Arc<dyn PlanningView> = s.app.clone();
    let _permit = s
        .heavy
        .acquire()
        .await
        .map_err(|e| V1Error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let ranked = tokio::task::spawn_blocking(move || m.targets(&*view, &spec))
        .await
        .map_err(|e| V1Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(Targets {
        image,
        mode: q.mode,
        weighting: ranked.weighting,
        notes: ranked.notes,
        placement: ranked.report,
    }))
}

fn default_policy() -> String {
    "best".into()
}

fn default_mode() -> BuildMode {
    BuildMode::Agent
}

/// Create a place-and-build job.
#[utoipa::path(post, path = "/api/v1/vms/{image}/place",
    params(("image" = String, Path, description = "the library image, percent-encoded")),
    request_body = PlaceBody,
    responses(
        (status = 202, body = Job),
        (status = 400, body = ErrorBody, description = "bad JSON, VM name or policy"),
        (status = 404, body = ErrorBody, description = "the image is not in the global index"),
        (status = 501, body = ErrorBody, description = "mode transparent without [manager] library_portal")))]
async fn place(
    State(s): State<ApiState>,
    Path(image): Path<String>,
    body: Result<Json<PlaceBody>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Job>), V1Error> {
    let Json(body) = body.map_err(|e| V1Error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let m = manager(&s.app)?;
    let spec = PlaceSpec {
        image,
        name: body.name,
        policy: body.policy,
        mode: body.mode,
        target: body.target,
        within: body.within,
        weighting: body.weighting,
    };
    let view: Arc<dyn PlanningView> = s.app.clone();
    let m = m.clone();
    // Placement checks read the store: off the async workers.
    let job = tokio::task::spawn_blocking(move || m.place(view, spec))
        .await
        .map_err(|e| V1Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

/// Every job.
#[utoipa::path(get, path = "/api/v1/jobs", responses((status = 200, body = Vec<Job>)))]
async fn jobs(State(s): State<ApiState>) -> Result<Json<Vec<Job>>, V1Error> {
    Ok(Json(manager(&s.app)?.jobs()))
}

fn parse_id(id: &str) -> Result<u64, V1Error> {
    id.parse()
        .map_err(|_| V1Error(StatusCode::BAD_REQUEST, format!("job id `{id}` is not a number")))
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", params(("id" = u64, Path)),
    responses((status = 200, body = Job), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn job(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Json<Job>, V1Error> {
    let id = parse_id(&id)?;
    manager(&s.app)?
        .job(id)
        .map(Json)
        .ok_or_else(|| ManageError::NoJob(id).into())
}

/// Cancel a running job.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", params(("id" = u64, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody)))]
async fn cancel(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Json<Job>, V1Error> {
    let id = parse_id(&id)?;
    Ok(Json(manager(&s.app)?.cancel(id)?))
}

/// The job now, then again at each change, until it ends (`event: job`, the
/// job's JSON as data; the last has a final state).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", params(("id" = u64, Path)),
    responses((status = 200, content_type = "text/event-stream",
        description = "`event: job` with the job's JSON, at each change, until a final state"),
        (status = 404, body = ErrorBody)))]
async fn events(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>, V1Error> {
    let id = parse_id(&id)?;
    let m = manager(&s.app)?.clone();
    let rx = m.subscribe();
    let first = m.job(id).ok_or(ManageError::NoJob(id))?;
    let state = (m, rx, Some(first), false);
    let stream = futures_util::stream::unfold(state, move |(m, mut rx, pending, done)| async move {
        if done {
            return None;
        }
        let job = match pending {
            Some(j) => j,
            None => loop {
                match rx.recv().await {
                    Ok(changed) if changed == id => break m.job(id)?,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            },
        };
        let last = job.state.is_final();
        let event = Event::default()
            .event("job")
            .json_data(&job)
            .unwrap_or_else(|_| Event::default().event("error"));
        Some((Ok(event), (m, rx, None, last)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_every_route_with_its_method() {
        let doc = document();
        let json = serde_json::to_value(&doc).unwrap();
        let paths = json["paths"].as_object().unwrap();
        for (path, method) in [
            ("/api/v1/vms", "get"),
            ("/api/v1/vms/{image}/targets", "get"),
            ("/api/v1/vms/{image}/place", "post"),
            ("/api/v1/jobs", "get"),
            ("/api/v1/jobs/{id}", "get"),
            ("/api/v1/jobs/{id}/events", "get"),
            ("/api/v1/jobs/{id}/cancel", "post"),
            ("/api/v1/hosts/{host}/vms/{name}/{action}", "post"),
            ("/api/v1/appliance", "get"),
            ("/api/v1/network", "get"),
            ("/api/v1/events", "get"),
            ("/api/v1/openapi.json", "get"),
        ] {
            assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{path} {method}");
        }
        assert_eq!(paths.len(), 12, "a route without its document entry: {:?}", paths.keys());
        // The job's schema is the one the handlers serialise.
        let job = &json["components"]["schemas"]["Job"]["properties"];
        for field in ["id", "spec", "state", "placement", "plan", "progress", "events", "error"] {
            assert!(job.get(field).is_some(), "Job.{field}");
        }
    }
}
