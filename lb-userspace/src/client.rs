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
        // The daemon's messages say what is wrong and what to do; the HTTP status is for scripts
        // (`code`), not for people.
        match self.message.trim() {
            "" => write!(f, "the daemon refused the request without saying why"),
            m => f.write_str(m),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{Json, Router, http::StatusCode, routing::get};

    /// The client against a real axum server on a Unix socket: a streamed (chunked) body, a JSON
    /// error with its status code, and a socket nobody serves.
    #[tokio::test]
    async fn round_trips_answers_and_refusals() {
        let dir = std::env::temp_dir().join(format!("lb-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let app = Router::new()
            .route(
                "/big",
                get(|| async {
                    // Streamed: hyper sends it chunked.
                    let parts = (0..64).map(|i| Ok::<_, std::io::Error>(format!("\"{i:04}\",")));
                    let stream = futures_util::stream::iter(parts.chain(std::iter::once(Ok("\"end\"".to_string()))));
                    axum::body::Body::from_stream(futures_util::StreamExt::map(stream, |r| r.map(|s| format!("[{s}]").into_bytes())))
                }),
            )
            .route("/json", get(|| async { Json(vec!["ä".to_string(); 3]) }))
            .route("/missing", get(|| async { (StatusCode::NOT_FOUND, Json(ApiError { error: "no service named \"x\"".into() })) }));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let (code, body) = request(&sock, "GET", "/big", None).await.unwrap();
        assert_eq!(code, 200);
        assert!(body.starts_with("[\"0000\",]") && body.ends_with("[\"end\"]"), "{body}");
        let v: Vec<String> = get_json(&sock, "/json").await.unwrap();
        assert_eq!(v, ["ä", "ä", "ä"]);
        let e = get_json::<serde_json::Value>(&sock, "/missing").await.unwrap_err();
        let r = e.downcast_ref::<Refusal>().expect("a refusal");
        assert_eq!((r.code, r.message.as_str()), (404, "no service named \"x\""));
        assert_eq!(e.to_string(), "no service named \"x\"");
        server.abort();
        let _ = std::fs::remove_file(&sock);
        let e = request(&sock, "GET", "/json", None).await.unwrap_err();
        assert!(format!("{e:#}").contains("cannot reach the lb daemon"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
