//! The local control API: HTTP/1.1 + JSON on a Unix socket (root only, mode 0600), so it is
//! scriptable with `curl --unix-socket /run/lb/lb.sock http://lb/status`. The `lb` subcommands
//! are its client.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use lb_common::Counters;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
};

use crate::daemon::Daemon;

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
    /// "up" (health states arrive with the control-plane issue).
    pub state: String,
    /// Maglev slots this backend owns in its service's live table.
    pub slots: u32,
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
    pub ipv4_prefix: u8,
    pub counters: CountersReport,
    pub backends: Vec<BackendReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub config: String,
    pub layout_version: u32,
    pub maglev_table_size: u32,
    pub interfaces: Vec<InterfaceReport>,
    pub services: Vec<ServiceReport>,
    /// Verdict and reason counters by name (see lb_common::stat).
    pub stats: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct ApiError {
    error: String,
}

type Shared = Arc<Mutex<Daemon>>;

async fn status(State(d): State<Shared>) -> Result<Json<StatusReport>, (StatusCode, Json<ApiError>)> {
    let d = d.lock().unwrap_or_else(|p| p.into_inner());
    d.status()
        .map(Json)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, Json(ApiError { error: format!("{e:#}") })))
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
    let app = Router::new().route("/status", get(status)).with_state(daemon);
    axum::serve(listener, app).await.context("control socket server")
}

/// A minimal HTTP/1.1 client over the Unix socket: one request, `Connection: close`.
pub async fn request(socket: &Path, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(socket))
        .await
        .map_err(|_| anyhow!("timed out connecting to {}", socket.display()))?
        .with_context(|| {
            format!(
                "cannot reach the lb daemon at {} (is `lb run` running? set --socket or control.socket)",
                socket.display()
            )
        })?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.context("writing to the control socket")?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow!("timed out waiting for the lb daemon's answer"))?
        .context("reading from the control socket")?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed answer from the daemon"))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("malformed status line from the daemon"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or_else(|| anyhow!("bad chunked body"))?;
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).ok_or_else(|| anyhow!("short chunk"))?);
        s = rest.get(n + 2..).unwrap_or("");
    }
}

/// `GET path`, expecting 200 and a JSON body.
pub async fn get_json<T: for<'de> Deserialize<'de>>(socket: &Path, path: &str) -> Result<T> {
    let (code, body) = request(socket, "GET", path).await?;
    if code != 200 {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        bail!("the daemon answered {code}: {msg}");
    }
    serde_json::from_str(&body).context("decoding the daemon's answer")
}

/// The socket a client command talks to: `--socket`, else the config's `control.socket`, else
/// the default.
pub fn socket_path(flag: Option<PathBuf>, config_socket: Option<PathBuf>) -> PathBuf {
    flag.or(config_socket).unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET))
}

/// Renders `lb status` as a readable table.
pub fn render_status(r: &StatusReport) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "lb {} (pid {}), config {}", r.version, r.pid, r.config);
    let ifs: Vec<String> = r.interfaces.iter().map(|i| format!("{} ({})", i.name, i.mode)).collect();
    let _ = writeln!(o, "interfaces: {}", ifs.join(", "));
    for s in &r.services {
        let c = &s.counters;
        let _ = writeln!(
            o,
            "\nservice {} {}:{}/{}  affinity {} /{}  packets {} bytes {} pins {} hits {} expired {} replies {}",
            s.name, s.vip, s.port, s.protocol, s.affinity_timeout, s.ipv4_prefix, c.packets, c.bytes,
            c.new_pins, c.hits, c.expired, c.reply_packets
        );
        let _ = writeln!(
            o,
            "  {:<22} {:>6} {:>5} {:>7} {:>10} {:>12} {:>8} {:>10}",
            "backend", "weight", "state", "slots", "packets", "bytes", "pins", "replies"
        );
        for b in &s.backends {
            let c = &b.counters;
            let _ = writeln!(
                o,
                "  {:<22} {:>6} {:>5} {:>7} {:>10} {:>12} {:>8} {:>10}",
                format!("{}:{}", b.address, b.port),
                b.weight,
                b.state,
                b.slots,
                c.packets,
                c.bytes,
                c.new_pins,
                c.reply_packets
            );
        }
    }
    let stats: Vec<String> = r.stats.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(o, "\nverdicts: {}", if stats.is_empty() { "none yet".into() } else { stats.join(" ") });
    o
}
