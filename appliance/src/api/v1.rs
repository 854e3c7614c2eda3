//! The versioned operator API, `/api/v1`: the manager's inventory and jobs.
//! Every error is JSON, `{"error": "…"}`, with its status code. Reads need a
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
//! | `GET /api/v1/openapi.json` | this API as an OpenAPI 3.1 document, generated from these handlers ([`ApiDoc`]) |

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;

use super::ApiState;
use crate::{
    manage::{BuildMode, Job, ManageError, Manager, PlaceSpec, PlanningView},
    state::Appliance,
};

/// A v1 error: its status and message, sent as JSON.
#[derive(Debug)]
pub struct V1Error(StatusCode, String);

impl IntoResponse for V1Error {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
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

/// The error body of every v1 route.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// The v1 API's OpenAPI document, from the handlers' annotations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "nearblock operator API", version = "1"),
    paths(vms, targets, place, jobs, job, events, cancel, vm_action, openapi),
    components(schemas(ErrorBody, PlaceBody, Job, Targets, crate::manage::inventory::Inventory))
)]
pub struct ApiDoc;

/// `GET /api/v1/openapi.json`.
#[utoipa::path(get, path = "/api/v1/openapi.json",
    responses((status = 200, description = "this document")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

pub fn read_routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/vms", get(vms))
        .route("/api/v1/vms/{image}/targets", get(targets))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/jobs/{id}", get(job))
        .route("/api/v1/jobs/{id}/events", get(events))
}

pub fn admin_routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/vms/{image}/place", post(place))
        .route("/api/v1/jobs/{id}/cancel", post(cancel))
        .route("/api/v1/hosts/{host}/vms/{name}/{action}", post(vm_action))
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
async fn vms(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, V1Error> {
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
        serde_json::to_value(inv).map_err(|e| V1Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await
    .map_err(|e| V1Error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map(Json)
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
    use utoipa::OpenApi as _;

    #[test]
    fn the_openapi_document_lists_every_route_with_its_method() {
        let doc = ApiDoc::openapi();
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
            ("/api/v1/openapi.json", "get"),
        ] {
            assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{path} {method}");
        }
        assert_eq!(paths.len(), 9, "a route without its document entry: {:?}", paths.keys());
        // The job's schema is the one the handlers serialise.
        let job = &json["components"]["schemas"]["Job"]["properties"];
        for field in ["id", "spec", "state", "placement", "plan", "progress", "events", "error"] {
            assert!(job.get(field).is_some(), "Job.{field}");
        }
    }
}
