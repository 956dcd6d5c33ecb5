//! The CLI's client of the control API: HTTP/1.1 over the Unix socket through hyper, one request
//! per connection, JSON in and out.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

use crate::api::ApiError;

/// How long connecting to the daemon may take, and how long its answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// An answer other than 200: the status code and the daemon's `error` message.
#[derive(Debug)]
pub struct Refusal {
    pub code: u16,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the daemon answered {}: {}", self.code, self.message)
    }
}

impl std::error::Error for Refusal {}

/// One request; returns the status code and the body.
pub async fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| anyhow!("timed out connecting to {}", socket.display()))?
        .with_context(|| {
            format!(
                "cannot reach the lb daemon at {} (is `lb run` running? set --socket or control.socket)",
                socket.display()
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("starting HTTP on the control socket")?;
    // The connection is driven beside the request; it ends when the answer is read.
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "lb")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .context("building the request")?;
    let answer = async {
        let resp = sender.send_request(req).await.context("sending the request to the lb daemon")?;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.context("reading the daemon's answer")?.to_bytes();
        Ok::<_, anyhow::Error>((code, String::from_utf8_lossy(&bytes).into_owned()))
    };
    let r = tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| anyhow!("timed out waiting for the lb daemon's answer"))?;
    conn.abort();
    r
}

/// `GET path`, expecting 200 and a JSON body.
pub async fn get_json<T: for<'de> Deserialize<'de>>(socket: &Path, path: &str) -> Result<T> {
    call_json(socket, "GET", path, None).await
}

/// A request expecting 200 and a JSON body; any other status becomes a [`Refusal`] carrying the
/// daemon's `error` message (or the raw body when it has none).
pub async fn call_json<T: for<'de> Deserialize<'de>>(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<T> {
    let (code, body) = request(socket, method, path, body).await?;
    if code != 200 {
        let message = serde_json::from_str::<ApiError>(&body).map(|e| e.error).unwrap_or(body);
        return Err(Refusal { code, message }.into());
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
