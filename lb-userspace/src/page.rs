//! The live status page on the metrics listener (`control.metrics`): `GET /` is an HTML page,
//! read-only, with its script and style served from here too (no external asset: it works
//! offline). It polls `GET /live.json` (the status report and the latest moves) every second
//! and `GET /trend.json` (the last minutes, [`crate::trend`]) for its charts.

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{
    api::{LIVE_MOVES, LiveReport},
    daemon::Shared,
};

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

/// Nothing but this origin's own script, style and JSON; no frames, forms or plugins.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
                      base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/ui/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/live.json", get(live))
        .route("/trend.json", get(trend))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn fresh(mut r: Response) -> Response {
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

async fn live(State(d): State<Shared>) -> Response {
    let got = {
        let d = d.lock().unwrap_or_else(|p| p.into_inner());
        d.status().map(|status| LiveReport { status, recent_moves: d.journal.recent(LIVE_MOVES) })
    };
    fresh(match got {
        Ok(r) => Json(r).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("collecting the status: {e:#}\n")).into_response(),
    })
}

async fn trend(State(d): State<Shared>) -> Response {
    let r = d.lock().unwrap_or_else(|p| p.into_inner()).trend.report();
    fresh(Json(r).into_response())
}
