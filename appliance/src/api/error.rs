//! The JSON error body every `/api/v1` route answers with, and every refused
//! request on any route ([`super::auth`]): `{"code": "…", "message": "…"}`.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};

/// The error body of every v1 route (and of every refused request).
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// `bad_request`, `unauthorized`, `invalid_token`, `insufficient_scope`,
    /// `forbidden`, `not_found`, `not_implemented`, `unavailable` or `internal`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// The machine-readable code of an error status (the body's `code`).
pub fn error_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::NOT_IMPLEMENTED => "not_implemented",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "internal",
    }
}

/// An error answer: `status` with the JSON [`ErrorBody`].
pub fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            code: code.to_owned(),
            message,
        }),
    )
        .into_response()
}
