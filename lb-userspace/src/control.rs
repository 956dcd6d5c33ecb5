//! The local control API, server side: HTTP/1.1 + JSON on a Unix socket (root only, mode 0600),
//! scriptable with `curl --unix-socket /run/lb/lb.sock http://lb/status`. The request and report
//! types are [`crate::api`]'s; the `lb` subcommands ([`crate::cli`]) are its client.
//!
//! Status codes: 200 with the report; 400 for a malformed request (the body says what is wrong);
//! 404 for an unknown service, backend or endpoint; 409 for a reload refused because it changes
//! what cannot change while lb runs; 500 when the datapath or the kernel failed. Every error
//! answer is a JSON `{"error": "..."}`.

use std::{
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use axum::{
    Json, Router,
    extract::{
        Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::net::{UnixListener, UnixStream};

use crate::{
    affinity,
    api::{
        Admin, AdminReport, AffinityList, ApiError, BadRequest, DryRunQuery, WhatIf, DownReport, DrainRequest, Explanation, ExplainQuery,
        FlushReport, FlushRequest, ListQuery, NotFound, StatusQuery, StatusReport, parse_backend,
    },
    daemon::{ReloadError, Shared, Stop},
    whatif,
};

/// How long `GET /status?fresh=true` waits for a new pin count at most.
const FRESH_WAIT: Duration = Duration::from_secs(60);

/// An error answer: its status code and message.
pub struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

/// Domain errors by kind ([`NotFound`], [`BadRequest`]); anything else failed in the datapath or
/// the kernel.
impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        let code = if e.chain().any(|c| c.is::<NotFound>()) {
            StatusCode::NOT_FOUND
        } else if e.chain().any(|c| c.is::<BadRequest>()) {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Failure(code, format!("{e:#}"))
    }
}

fn bad_request(msg: String) -> Failure {
    Failure(StatusCode::BAD_REQUEST, msg)
}

type Answer<T> = Result<Json<T>, Failure>;

/// A JSON body, or 400 saying what is wrong with it.
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, Failure> {
    b.map(|Json(t)| t).map_err(|e| bad_request(format!("request body: {}", e.body_text())))
}

/// A query string, or 400 saying what is wrong with it.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, Failure> {
    q.map(|Query(t)| t).map_err(|e| bad_request(format!("query: {}", e.body_text())))
}

/// Runs blocking work (a table scan, a wait) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Failure::from),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("the request's task failed: {e}"))),
    }
}

fn lock(d: &Shared) -> std::sync::MutexGuard<'_, crate::daemon::Daemon> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

async fn status(State(d): State<Shared>, q: Result<Query<StatusQuery>, QueryRejection>) -> Answer<StatusReport> {
    if query(q)?.fresh {
        let pins = lock(&d).pins.clone();
        blocking(move || Ok(pins.fresh(FRESH_WAIT))).await?;
    }
    Ok(Json(lock(&d).status()?))
}

/// The pins a what-if would move, counted outside the lock, filled into its report.
async fn what_if(d: &Shared, plan: impl FnOnce(&crate::daemon::Daemon) -> Result<(WhatIf, whatif::Doomed), Failure>) -> Result<Response, Failure> {
    let (w, doomed, view, table, names) = {
        let d = lock(d);
        let (w, doomed) = plan(&d)?;
        let names: std::collections::BTreeMap<u32, String> = d.rt.services.iter().map(|s| (s.entry.id, s.config.name.clone())).collect();
        let (view, table) = d.scan_handles()?;
        (w, doomed, view, table, names)
    };
    let counted = blocking(move || affinity::count_doomed(&view, &table, &doomed)).await?;
    Ok(Json(whatif::with_pins(w, &names, &counted)).into_response())
}

fn reload_failure(e: ReloadError) -> Failure {
    let code = match e {
        ReloadError::Invalid(_) => StatusCode::BAD_REQUEST,
        ReloadError::Refused(_) => StatusCode::CONFLICT,
        ReloadError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Failure(code, e.to_string())
}

async fn reload(State(d): State<Shared>, q: Result<Query<DryRunQuery>, QueryRejection>) -> Result<Response, Failure> {
    if query(q)?.dry_run {
        return what_if(&d, |d| {
            let cfg = d.load_for_reload().map_err(reload_failure)?;
            Ok(whatif::reload(&d.rt, &cfg))
        })
        .await;
    }
    let mut d = lock(&d);
    tracing::info!("reload requested through the control socket");
    match d.reload() {
        Ok(ch) => {
            tracing::info!(changes = %ch.summary(), "reload applied");
            Ok(Json(ch).into_response())
        }
        Err(e) => {
            tracing::error!("reload refused, the running config stays in force:\n{e}");
            Err(reload_failure(e))
        }
    }
}

fn set_admin(d: &Shared, req: DrainRequest, admin: Admin) -> Answer<AdminReport> {
    let addr = parse_backend(&req.backend).map_err(bad_request)?;
    let (backend, changed) = lock(d).set_admin(&req.service, addr.ip(), addr.port(), admin)?;
    Ok(Json(AdminReport { backend, changed }))
}

/// The service and backend id a request names.
fn named(d: &crate::daemon::Daemon, req: &DrainRequest) -> Result<(usize, u32), Failure> {
    let addr = parse_backend(&req.backend).map_err(bad_request)?;
    let i = d.rt.services.iter().position(|s| s.config.name == req.service).ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no service named {:?}", req.service)))?;
    let b = d.rt.services[i].backend(addr.ip(), addr.port()).ok_or_else(|| {
        Failure(StatusCode::NOT_FOUND, format!("service {:?} has no backend {addr}", req.service))
    })?;
    Ok((i, b.id))
}

async fn drain(State(d): State<Shared>, q: Result<Query<DryRunQuery>, QueryRejection>, req: Result<Json<DrainRequest>, JsonRejection>) -> Result<Response, Failure> {
    let req = body(req)?;
    if query(q)?.dry_run {
        return what_if(&d, |d| {
            let (i, id) = named(d, &req)?;
            Ok(whatif::drain(&d.rt, &d.rt.services[i], id, req.force))
        })
        .await;
    }
    let admin = if req.force { Admin::Forced } else { Admin::Draining };
    set_admin(&d, req, admin).map(IntoResponse::into_response)
}

/// `GET /events`: the journal of moves, filtered.
async fn events(State(d): State<Shared>, q: Result<Query<crate::api::EventsQuery>, QueryRejection>) -> Answer<Vec<crate::api::MoveRecord>> {
    let q = query(q)?;
    Ok(Json(lock(&d).events(&q)?))
}

/// `POST /simulate/down`: what the backend's death would do.
async fn simulate_down(State(d): State<Shared>, req: Result<Json<DrainRequest>, JsonRejection>) -> Result<Response, Failure> {
    let req = body(req)?;
    what_if(&d, |d| {
        let (i, id) = named(d, &req)?;
        Ok(whatif::down(&d.rt, &d.rt.services[i], id))
    })
    .await
}

async fn undrain(State(d): State<Shared>, req: Result<Json<DrainRequest>, JsonRejection>) -> Answer<AdminReport> {
    set_admin(&d, body(req)?, Admin::Active)
}

async fn explain(State(d): State<Shared>, q: Result<Query<ExplainQuery>, QueryRejection>) -> Answer<Vec<Explanation>> {
    let q = query(q)?;
    let client: IpAddr = q.client.parse().map_err(|_| bad_request(format!("client {:?}: not an IP address", q.client)))?;
    Ok(Json(lock(&d).explain(client, q.service.as_deref())?))
}

async fn affinity_list(State(d): State<Shared>, q: Result<Query<ListQuery>, QueryRejection>) -> Answer<AffinityList> {
    let q = query(q)?;
    let (view, table) = lock(&d).scan_handles()?;
    Ok(Json(blocking(move || affinity::list(&view, &table, &q)).await?))
}

async fn affinity_flush(State(d): State<Shared>, req: Result<Json<FlushRequest>, JsonRejection>) -> Answer<FlushReport> {
    let req = body(req)?;
    let (view, table, pins) = {
        let d = lock(&d);
        let (view, table) = d.scan_handles()?;
        (view, table, d.pins.clone())
    };
    let (r, moved) = blocking(move || {
        let (r, moved) = affinity::flush_pins(&view, &table, &req)?;
        tracing::info!(
            flushed = r.flushed,
            client = %req.client.map(|c| c.to_string()).unwrap_or_default(),
            backend = %req.backend.clone().unwrap_or_default(),
            all = req.all,
            service = %req.service.clone().unwrap_or_default(),
            "affinity pins flushed: those clients are placed afresh at their next packet"
        );
        Ok((r, moved))
    })
    .await?;
    // Journaled as moves: the clients go where Maglev says at their next packet.
    {
        let mut d = lock(&d);
        let now = crate::datapath::monotonic_coarse_ns();
        for (k, from) in moved {
            d.record_move(&lb_common::MoveEvent {
                at_ns: now,
                service_id: k.service_id,
                from,
                to: u32::MAX,
                reason: lb_common::move_reason::FLUSHED,
                addr: k.addr,
            });
        }
    }
    pins.wake();
    Ok(Json(r))
}

async fn down(State(d): State<Shared>) -> Json<DownReport> {
    let d = lock(&d);
    let grace = d.stop_grace();
    tracing::info!(
        grace = %humantime::format_duration(grace),
        "lb down requested through the control socket: detaching and removing the pinned state"
    );
    d.request_stop(Stop::Down);
    Json(DownReport { stopping: true, grace_secs: grace.as_secs_f64() })
}

async fn unknown() -> Failure {
    Failure(StatusCode::NOT_FOUND, "no such endpoint (see the README's control API)".into())
}

/// Binds the control socket, root-only from the first moment: the socket is made under a umask
/// of 0177 (mode 0600, never briefly wider), and a directory lb creates for it is 0700. A path
/// that exists is replaced only when it is a stale socket: a live socket (another lb serves it)
/// and anything that is not a socket (a file, a directory, a symlink) are refused, never deleted.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("control.socket: creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                bail!(
                    "control.socket {}: another lb is already serving it (stop it, or set another path)",
                    path.display()
                );
            }
            std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Ok(m) => bail!(
            "control.socket {}: the path exists and is not a socket (it is {}); lb will not replace it: \
             set another path, or remove it yourself",
            path.display(),
            file_kind(&m.file_type())
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("control.socket {}", path.display())),
    }
    // SAFETY: umask(2) cannot fail; the previous mask is restored right after the bind.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    l.with_context(|| format!("binding control socket {}", path.display()))
}

/// What a path is, for messages.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Serves the control API until the task is dropped.
pub async fn serve(listener: UnixListener, daemon: Shared) -> Result<()> {
    let app = Router::new()
        .route("/status", get(status))
        .route("/reload", post(reload))
        .route("/drain", post(drain))
        .route("/undrain", post(undrain))
        .route("/down", post(down))
        .route("/simulate/down", post(simulate_down))
        .route("/events", get(events))
        .route("/explain", get(explain))
        .route("/affinity", get(affinity_list))
        .route("/affinity/flush", post(affinity_flush))
        .fallback(unknown)
        .with_state(daemon);
    axum::serve(listener, app).await.context("control socket server")
}

