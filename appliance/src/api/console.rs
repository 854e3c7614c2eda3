//! The operator's console: one page and its script and style sheet, compiled
//! into the binary (no CDN, no build step: see docs/decisions.md), served
//! without a token — they hold no data; the page asks for a token once and
//! reads everything from `/api/v1` with it.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | redirects to `/console/` |
//! | `GET /console/` | the page (Inventory, Place, Jobs and Job, Network) |
//! | `GET /console/console.js`, `/console/console.css` | its script and style |

use axum::{
    http::{header, HeaderValue},
    response::{IntoResponse, Redirect, Response},
    routing::get,
    Router,
};

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/console.js");
const STYLE: &str = include_str!("../../console/console.css");

/// Only this origin's script and style run; the page may not be framed.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route(
            "/console/console.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // A new binary's page is picked up at the next load.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_loads_its_own_script_and_style_and_nothing_else() {
        for needle in ["/console/console.js", "/console/console.css"] {
            assert!(super::INDEX.contains(needle), "{needle}");
        }
        // No other origin anywhere: these machines have no internet, and the
        // policy would block it.
        for asset in [super::INDEX, super::SCRIPT, super::STYLE] {
            for scheme in ["http://", "https://"] {
                let bad: Vec<&str> = asset
                    .match_indices(scheme)
                    .map(|(i, _)| &asset[i..(i + 40).min(asset.len())])
                    .filter(|u| !u.starts_with("http://www.w3.org/2000/svg"))
                    .collect();
                assert!(bad.is_empty(), "{bad:?}");
            }
        }
        // Data goes in as text: no markup from strings.
        assert!(!super::SCRIPT.contains("innerHTML"));
        assert!(!super::SCRIPT.contains("insertAdjacentHTML"));
    }
}
