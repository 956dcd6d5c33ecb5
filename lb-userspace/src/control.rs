//! The local control API: HTTP/1.1 + JSON on a Unix socket (root only, mode 0600), so it is
//! scriptable with `curl --unix-socket /run/lb/lb.sock http://lb/status`. The `lb` subcommands
//! are its client.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    routing::{get, post},
};
use lb_common::Counters;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};

use crate::{
    affinity,
    daemon::{Daemon, ReloadError, Stop},
    state::{Admin, Changes},
};

/// Counters as reported: per-CPU values summed.
pub type CountersReport = Counters;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceReport {
    pub name: String,
    /// "native" or "generic".
    pub mode: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendReport {
    pub id: u32,
    pub address: String,
    pub port: u16,
    pub weight: u32,
    /// up, down, draining or drained.
    pub state: String,
    /// The health checks' verdict (true without checks).
    pub healthy: bool,
    /// active, draining or forced (set by the config and `lb drain`/`lb undrain`).
    pub admin: Admin,
    /// When the state last changed (RFC 3339), and why.
    pub since: String,
    pub reason: String,
    /// Maglev slots this backend owns in its service's live table.
    pub slots: u32,
    /// Clients pinned to it whose next packet follows the pin (live pins).
    pub pinned: u64,
    /// Pins made per second, over the last minute (or since the daemon started).
    pub new_pins_per_sec: f64,
    pub counters: CountersReport,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceReport {
    pub id: u32,
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub affinity_timeout: String,
    pub affinity_max_age: Option<String>,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Health check kind: tcp, http or none.
    pub health: String,
    /// Every backend is down and the service routes as if all were up.
    pub fail_open: bool,
    /// Bumped by every Maglev table swap.
    pub table_generation: u32,
    /// The live Maglev table's fingerprint (by backend address and port, with the client hash
    /// seed): equal on every balancer node that sends each client to the same backend.
    pub table_fingerprint: String,
    /// Live pins of the service, and pins made per second over the last minute.
    pub pinned: u64,
    pub new_pins_per_sec: f64,
    pub counters: CountersReport,
    pub backends: Vec<BackendReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub config: String,
    /// When this daemon started (RFC 3339).
    pub started: String,
    /// Whether it adopted the pinned state of a previous daemon.
    pub adopted: bool,
    pub layout_version: u32,
    pub maglev_table_size: u32,
    /// Entries in the affinity table (live or stale, every service) and its capacity.
    pub affinity_entries: usize,
    pub affinity_capacity: u32,
    pub interfaces: Vec<InterfaceReport>,
    pub services: Vec<ServiceReport>,
    /// Verdict and reason counters by name (see lb_common::stat).
    pub stats: BTreeMap<String, u64>,
    /// `datapath.hash_seed`: nodes must share it to agree.
    pub hash_seed: u32,
    /// VIP announcement (`[announce]`), when configured.
    pub announce: Option<AnnounceReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceReport {
    /// The kernel routing table holding one route per announced VIP.
    pub table: u32,
    /// The VIPs announced now.
    pub announced: Vec<String>,
}

#[derive(Serialize)]
struct ApiError {
    error: String,
}

/// The daemon, shared by the main loop and the API servers.
pub type Shared = Arc<Mutex<Daemon>>;

async fn status(State(d): State<Shared>) -> Result<Json<StatusReport>, (StatusCode, Json<ApiError>)> {
    let d = d.lock().unwrap_or_else(|p| p.into_inner());
    d.status()
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, Json(ApiError { error: format!("{e:#}") })))
}

fn api_error(code: StatusCode, error: String) -> (StatusCode, Json<ApiError>) {
    (code, Json(ApiError { error }))
}

async fn reload(State(d): State<Shared>) -> Result<Json<Changes>, (StatusCode, Json<ApiError>)> {
    let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
    tracing::info!("reload requested through the control socket");
    match d.reload() {
        Ok(ch) => {
            tracing::info!(?ch, "reload applied");
            Ok(Json(ch))
        }
        Err(e) => {
            tracing::error!("reload refused, the running config stays in force:\n{e}");
            let code = match e {
                ReloadError::Invalid(_) => StatusCode::BAD_REQUEST,
                ReloadError::Refused(_) => StatusCode::CONFLICT,
            };
            Err(api_error(code, e.to_string()))
        }
    }
}

/// Body of `POST /drain` and `POST /undrain`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrainRequest {
    pub service: String,
    /// `address:port` of the backend.
    pub backend: String,
    #[serde(default)]
    pub force: bool,
}

/// The `ADDRESS:PORT` (IPv4, or `[IPv6]:PORT`) of a drain request's backend; the error is
/// the message the API answers with.
pub fn parse_backend(backend: &str) -> std::result::Result<SocketAddr, String> {
    backend
        .parse()
        .map_err(|_| format!("backend {backend:?}: expected ADDRESS:PORT, e.g. 10.1.0.11:8080 or [2001:db8::11]:8080"))
}

fn set_admin(d: &Shared, req: DrainRequest, admin: Admin) -> Result<Json<BackendReport>, (StatusCode, Json<ApiError>)> {
    let addr = parse_backend(&req.backend).map_err(|e| api_error(StatusCode::BAD_REQUEST, e))?;
    let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
    d.set_admin(&req.service, addr.ip(), addr.port(), admin)
        .map(Json)
        .map_err(|e| api_error(StatusCode::NOT_FOUND, format!("{e:#}")))
}

async fn drain(State(d): State<Shared>, Json(req): Json<DrainRequest>) -> Result<Json<BackendReport>, (StatusCode, Json<ApiError>)> {
    let admin = if req.force { Admin::Forced } else { Admin::Draining };
    set_admin(&d, req, admin)
}

async fn undrain(State(d): State<Shared>, Json(req): Json<DrainRequest>) -> Result<Json<BackendReport>, (StatusCode, Json<ApiError>)> {
    set_admin(&d, req, Admin::Active)
}

/// Query of `GET /explain`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainQuery {
    pub client: String,
    pub service: Option<String>,
}

async fn explain(
    State(d): State<Shared>,
    Query(q): Query<ExplainQuery>,
) -> Result<Json<Vec<affinity::Explanation>>, (StatusCode, Json<ApiError>)> {
    let client: IpAddr = q
        .client
        .parse()
        .map_err(|_| api_error(StatusCode::BAD_REQUEST, format!("client {:?}: not an IP address", q.client)))?;
    let d = d.lock().unwrap_or_else(|p| p.into_inner());
    d.explain(client, q.service.as_deref()).map(Json).map_err(|e| api_error(StatusCode::BAD_REQUEST, format!("{e:#}")))
}

async fn affinity_list(
    State(d): State<Shared>,
    Query(q): Query<affinity::ListQuery>,
) -> Result<Json<affinity::AffinityList>, (StatusCode, Json<ApiError>)> {
    let d = d.lock().unwrap_or_else(|p| p.into_inner());
    d.affinity_list(&q).map(Json).map_err(|e| api_error(StatusCode::BAD_REQUEST, format!("{e:#}")))
}

async fn affinity_flush(
    State(d): State<Shared>,
    Json(req): Json<affinity::FlushRequest>,
) -> Result<Json<affinity::FlushReport>, (StatusCode, Json<ApiError>)> {
    let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
    d.affinity_flush(&req).map(Json).map_err(|e| api_error(StatusCode::BAD_REQUEST, format!("{e:#}")))
}

async fn down(State(d): State<Shared>) -> Json<serde_json::Value> {
    let d = d.lock().unwrap_or_else(|p| p.into_inner());
    tracing::info!("lb down requested through the control socket: detaching and removing the pinned state");
    d.request_stop(Stop::Down);
    Json(serde_json::json!({ "stopping": true }))
}

/// Binds the control socket: refuses to steal the socket of a running daemon, replaces a stale
/// one, and makes it root-only.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "control.socket {}: another lb is already serving it (stop it, or set another path)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

/// Serves the control API until the task is dropped.
pub async fn serve(listener: UnixListener, daemon: Shared) -> Result<()> {
    let app = Router::new()
        .route("/status", get(status))
        .route("/reload", post(reload))
        .route("/drain", post(drain))
        .route("/undrain", post(undrain))
        .route("/down", post(down))
        .route("/explain", get(explain))
        .route("/affinity", get(affinity_list))
        .route("/affinity/flush", post(affinity_flush))
        .with_state(daemon);
    axum::serve(listener, app).await.context("control socket server")
}

/// A minimal HTTP/1.1 client over the Unix socket: one request, `Connection: close`, with an
/// optional JSON body.
pub async fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(socket))
        .await
        .map_err(|_| anyhow!("timed out connecting to {}", socket.display()))?
        .with_context(|| {
            format!(
                "cannot reach the lb daemon at {} (is `lb run` running? set --socket or control.socket)",
                socket.display()
            )
        })?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.context("writing to the control socket")?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow!("timed out waiting for the lb daemon's answer"))?
        .context("reading from the control socket")?;
    parse_response(&buf)
}

/// Splits a whole HTTP/1.1 response (read to EOF) into its status code and body, undoing
/// `Transfer-Encoding: chunked`. The body is decoded as UTF-8 (lossily) only once dechunked: chunk
/// sizes count bytes, and a character may be split across chunks.
pub fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| anyhow!("malformed answer from the daemon"))?;
    let (head, body) = (String::from_utf8_lossy(&raw[..end]), &raw[end + 4..]);
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("malformed status line from the daemon"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut s: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(s, b"\r\n").ok_or_else(|| anyhow!("bad chunked body"))?;
        let (size, rest) = (&s[..eol], &s[eol + 2..]);
        let size = std::str::from_utf8(size).context("bad chunk size")?;
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..n).ok_or_else(|| anyhow!("short chunk"))?);
        s = rest.get(n + 2..).unwrap_or_default();
    }
}

/// `GET path`, expecting 200 and a JSON body.
pub async fn get_json<T: for<'de> Deserialize<'de>>(socket: &Path, path: &str) -> Result<T> {
    call_json(socket, "GET", path, None).await
}

/// A request expecting 200 and a JSON body; any other status becomes an error carrying the
/// daemon's message.
pub async fn call_json<T: for<'de> Deserialize<'de>>(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<T> {
    let (code, body) = request(socket, method, path, body).await?;
    if code != 200 {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        bail!("the daemon answered {code}: {msg}");
    }
    serde_json::from_str(&body).context("decoding the daemon's answer")
}

/// `path?k=v&...` for the control API, values percent-encoded (IPv6 addresses, brackets).
pub fn with_query(path: &str, params: &[(&str, Option<String>)]) -> String {
    let enc = |v: &str| {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let q: Vec<String> = params.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v)))).collect();
    if q.is_empty() { path.to_string() } else { format!("{path}?{}", q.join("&")) }
}

/// The socket a client command talks to: `--socket`, else the config's `control.socket`, else
/// the default.
pub fn socket_path(flag: Option<PathBuf>, config_socket: Option<PathBuf>) -> PathBuf {
    flag.or(config_socket).unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET))
}

/// `address:port`, with IPv6 addresses in brackets.
pub fn endpoint(addr: &str, port: u16) -> String {
    match addr.parse::<std::net::IpAddr>() {
        Ok(a) => std::net::SocketAddr::new(a, port).to_string(),
        Err(_) => format!("{addr}:{port}"),
    }
}

/// Renders `lb status` as a readable table.
pub fn render_status(r: &StatusReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "lb {} (pid {}), config {}, started {}{}",
        r.version,
        r.pid,
        r.config,
        r.started,
        if r.adopted { " (adopted the pinned datapath state)" } else { "" }
    );
    let ifs: Vec<String> = r.interfaces.iter().map(|i| format!("{} ({})", i.name, i.mode)).collect();
    let _ = writeln!(o, "interfaces: {}", ifs.join(", "));
    let _ = writeln!(o, "affinity table: {} of {} entries; client hash seed {}", r.affinity_entries, r.affinity_capacity, r.hash_seed);
    if let Some(a) = &r.announce {
        let list = if a.announced.is_empty() { "nothing".to_string() } else { a.announced.join(", ") };
        let _ = writeln!(o, "announcing (kernel table {}): {list}", a.table);
    }
    for s in &r.services {
        let c = &s.counters;
        let prefix = if s.vip.contains(':') { s.ipv6_prefix } else { s.ipv4_prefix };
        let _ = writeln!(
            o,
            "\nservice {} {}/{}  affinity {} /{}  table {}  pinned {} ({:.1} new/s)  packets {} bytes {} pins {} hits {} expired {} failovers {} replies {} connections {} moved {}",
            s.name, endpoint(&s.vip, s.port), s.protocol, s.affinity_timeout, prefix, s.table_fingerprint, s.pinned,
            s.new_pins_per_sec, c.packets, c.bytes, c.new_pins, c.hits, c.expired, c.failovers, c.reply_packets, c.conns,
            c.moved
        );
        if s.fail_open {
            let _ = writeln!(o, "  !! every backend is down: FAILING OPEN (routing as if all were up)");
        }
        let _ = writeln!(
            o,
            "  {:<22} {:>6} {:>8} {:>7} {:>8} {:>7} {:>10} {:>12} {:>8} {:>10}  since / reason",
            "backend", "weight", "state", "slots", "pinned", "new/s", "packets", "bytes", "pins", "replies"
        );
        for b in &s.backends {
            let c = &b.counters;
            let _ = writeln!(
                o,
                "  {:<22} {:>6} {:>8} {:>7} {:>8} {:>7.1} {:>10} {:>12} {:>8} {:>10}  {} {}",
                endpoint(&b.address, b.port),
                b.weight,
                b.state,
                b.slots,
                b.pinned,
                b.new_pins_per_sec,
                c.packets,
                c.bytes,
                c.new_pins,
                c.reply_packets,
                b.since,
                b.reason
            );
        }
    }
    let stats: Vec<String> = r.stats.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(o, "\nverdicts: {}", if stats.is_empty() { "none yet".into() } else { stats.join(" ") });
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_response_plain_and_chunked() {
        let plain = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (404, "{}".to_owned()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "abc0123456789".to_owned()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 2xx OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab").is_err());
    }

    /// Regression (found by tests/parsers.rs): the answer was decoded as UTF-8 before
    /// dechunking, so a character split across two chunks became U+FFFD replacement characters
    /// (3 bytes each) that threw the chunk sizes off: "short chunk", or a garbled body.
    #[test]
    fn parse_response_character_split_across_chunks() {
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nA\xc2\r\n1\r\n\xa1\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (200, "A\u{a1}".to_owned()));
    }

    #[test]
    fn parse_backend_is_address_and_port() {
        assert_eq!(parse_backend("10.1.0.11:8080"), Ok("10.1.0.11:8080".parse().unwrap()));
        assert_eq!(parse_backend("[2001:db8::11]:8080"), Ok("[2001:db8::11]:8080".parse().unwrap()));
        for bad in ["10.1.0.11", "10.1.0.11:", "10.1.0.11:65536", "::1:80", "backend:80", " 10.1.0.11:80"] {
            let e = parse_backend(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("ADDRESS:PORT"), "{e}");
        }
    }
}
