//! The backends' HTTP and UDP servers and the clients that talk to them: plain std sockets, so a
//! thread that entered a network namespace can create them there (see [`super::in_netns`]).
//!
//! The HTTP server answers every request with `200` and the backend's name as the body, except
//! `GET /healthz` of a backend marked unhealthy (`503`). It honours persistent connections:
//! HTTP/1.1 without `Connection: close`, and HTTP/1.0 with `Connection: keep-alive`, stay open
//! for the next request; `/healthz` answers always close the connection, so a health checker that
//! reads until EOF never waits for the idle timeout. `GET /bytes/<n>` answers a body of `n`
//! bytes (the name line, then filler), for tests that need big replies.
//!
//! The UDP server answers every datagram with the backend's name, except a datagram starting
//! with [`UDP_CHECK_MAGIC`] `<reply size>\n`: that one is answered with
//! `<name> len=<bytes received> fnv=<FNV-1a 64 of them>\n`, padded with a filler pattern to the
//! reply size, so a client can tell that a (fragmented) datagram arrived whole in both directions.

use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream,
    UdpSocket,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use socket2::{Domain, Protocol, Socket, Type};

/// Server threads look at their stop flag at least this often.
pub(super) const SERVER_POLL: Duration = Duration::from_millis(20);
/// A backend gives up on a new connection that sends no complete request head for this long.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A persistent connection with no new request for this long is closed by the backend.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Connection threads look at the stop flag at least this often while waiting for a request.
const CONN_POLL: Duration = Duration::from_millis(50);
/// Largest request head the backend accepts (`431` beyond).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body the backend reads and discards (`413` beyond).
const MAX_BODY: usize = 1 << 20;
/// Largest `GET /bytes/<n>` body.
const MAX_BYTES_BODY: usize = 1 << 20;
/// First bytes of a UDP check datagram (see the module docs).
pub const UDP_CHECK_MAGIC: &[u8] = b"lab-check ";
/// Largest UDP datagram the lab sends or answers.
const MAX_DATAGRAM: usize = 65_507;

/// What one backend's servers have answered; shared by every generation of its servers.
#[derive(Default)]
pub(super) struct Counters {
    pub http: AtomicU64,
    pub healthz: AtomicU64,
    pub udp: AtomicU64,
    pub connections: AtomicU64,
}

/// What a backend's server threads share.
pub(super) struct ServerCtx {
    /// Answer body: the backend's name and a newline.
    pub body: String,
    pub counters: Arc<Counters>,
    /// `/healthz` answers `200` while set, `503` otherwise.
    pub healthy: Arc<AtomicBool>,
    /// Set to stop this generation of servers: the listeners close, and connections close once
    /// their current request is answered (or at once when idle).
    pub stop: Arc<AtomicBool>,
}

pub(super) fn serve_http(listener: TcpListener, ctx: Arc<ServerCtx>) {
    while !ctx.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                ctx.counters.connections.fetch_add(1, Ordering::Relaxed);
                let ctx = ctx.clone();
                // One thread per connection, so a silent client (bounded by the timeouts above)
                // never blocks the others or the health checks.
                let spawned = thread::Builder::new()
                    .name("lab-http-conn".to_owned())
                    .spawn(move || {
                        let _ = handle_http(stream, &ctx);
                    });
                if let Err(e) = spawned {
                    eprintln!("lab: spawning an HTTP connection thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(SERVER_POLL),
            Err(e) => {
                eprintln!("lab: accept: {e}");
                thread::sleep(SERVER_POLL);
            }
        }
    }
    // Dropping the listener here closes it: new connections are refused from now on.
}

enum Head {
    /// A complete request head of this many bytes is at the start of the buffer.
    Complete(usize),
    TooLarge,
    /// EOF, idle timeout, or the server stops while the connection is idle.
    Closed,
}

/// End of the request/response head in `b` (after the blank line), if complete.
fn head_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads until `pending` holds a complete head. The stream has a short read timeout
/// ([`CONN_POLL`]) so the stop flag is seen while waiting.
fn read_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    idle_limit: Duration,
    stop: &AtomicBool,
) -> io::Result<Head> {
    let mut last_progress = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = head_end(pending) {
            return Ok(Head::Complete(end));
        }
        if pending.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
        if pending.is_empty() && stop.load(Ordering::Relaxed) {
            return Ok(Head::Closed);
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                last_progress = Instant::now();
            }
            Err(e) if is_timeout(&e) => {
                if last_progress.elapsed() >= idle_limit {
                    return Ok(Head::Closed);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The parts of a request (or response) head the lab looks at.
struct ParsedHead {
    /// Method and path of a request; status code (and reason) of a response.
    first: Vec<String>,
    /// `HTTP/1.0`, `HTTP/1.1`, ... (request: third word; response: first word).
    version: String,
    /// Lower-cased tokens of every `Connection` header.
    connection: Vec<String>,
    content_length: Option<usize>,
}

impl ParsedHead {
    fn parse(head: &str, is_request: bool) -> ParsedHead {
        let mut lines = head.lines();
        let words: Vec<String> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let (version, first) = if is_request {
            let version = words.get(2).cloned().unwrap_or_default();
            (version, words.into_iter().take(2).collect())
        } else {
            let mut it = words.into_iter();
            (it.next().unwrap_or_default(), it.collect())
        };
        let mut connection = Vec::new();
        let mut content_length = None;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim().to_ascii_lowercase();
            if name == "connection" {
                connection.extend(
                    value
                        .split(',')
                        .map(|t| t.trim().to_ascii_lowercase())
                        .filter(|t| !t.is_empty()),
                );
            } else if name == "content-length" {
                content_length = value.trim().parse().ok();
            }
        }
        ParsedHead {
            first,
            version,
            connection,
            content_length,
        }
    }

    /// Whether the sender asks for (request) or grants (response) a persistent connection.
    fn persistent(&self) -> bool {
        let has = |t: &str| self.connection.iter().any(|c| c == t);
        match self.version.as_str() {
            "HTTP/1.0" => has("keep-alive"),
            v if v.starts_with("HTTP/1.") => !has("close"),
            _ => false,
        }
    }
}

/// Serves requests on one connection until it is not persistent, idle, closed or stopped.
fn handle_http(mut stream: TcpStream, ctx: &ServerCtx) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CONN_POLL))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let mut pending = Vec::new();
    let mut idle_limit = SERVER_IO_TIMEOUT;
    loop {
        let head_len = match read_head(&mut stream, &mut pending, idle_limit, &ctx.stop)? {
            Head::Complete(n) => n,
            Head::Closed => return Ok(()),
            Head::TooLarge => {
                stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")?;
                return stream.shutdown(Shutdown::Write);
            }
        };
        let head = ParsedHead::parse(&String::from_utf8_lossy(&pending[..head_len]), true);
        // A request body (none of the lab's clients send one) is read and discarded.
        let body_len = head.content_length.unwrap_or(0);
        if body_len > MAX_BODY {
            stream.write_all(
                b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            )?;
            return stream.shutdown(Shutdown::Write);
        }
        let deadline = Instant::now() + SERVER_IO_TIMEOUT;
        let mut buf = [0u8; 4096];
        while pending.len() < head_len + body_len {
            if Instant::now() >= deadline {
                return Ok(());
            }
            match stream.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        pending.drain(..head_len + body_len);

        let path = head.first.get(1).map(String::as_str).unwrap_or_default();
        let healthz = path.split('?').next() == Some("/healthz");
        let counter = if healthz {
            &ctx.counters.healthz
        } else {
            &ctx.counters.http
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let bytes = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n <= MAX_BYTES_BODY);
        let padded;
        let (status, body) = if healthz && !ctx.healthy.load(Ordering::Relaxed) {
            ("503 Service Unavailable", "unhealthy\n")
        } else if let Some(n) = bytes {
            let mut b = ctx.body.clone();
            while b.len() < n {
                b.push(char::from(b'a' + (b.len() % 26) as u8));
            }
            padded = b;
            ("200 OK", padded.as_str())
        } else {
            ("200 OK", ctx.body.as_str())
        };
        let version = if head.version == "HTTP/1.0" {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        let keep = !healthz && head.persistent() && !ctx.stop.load(Ordering::Relaxed);
        let response = format!(
            "{version} {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if keep { "keep-alive" } else { "close" }
        );
        stream.write_all(response.as_bytes())?;
        stream.flush()?;
        if !keep {
            return stream.shutdown(Shutdown::Write);
        }
        idle_limit = KEEPALIVE_IDLE;
    }
}

pub(super) fn serve_udp(socket: UdpSocket, ctx: Arc<ServerCtx>) {
    // One byte more than the largest datagram: a truncated datagram shows as too long.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    while !ctx.stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                ctx.counters.udp.fetch_add(1, Ordering::Relaxed);
                let reply = udp_reply(&buf[..n], &ctx.body);
                if let Err(e) = socket.send_to(&reply, from) {
                    eprintln!("lab: UDP reply to {from}: {e}");
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                eprintln!("lab: UDP receive: {e}");
                thread::sleep(SERVER_POLL);
            }
        }
    }
}

/// The UDP server's answer to `datagram` (see the module docs).
fn udp_reply(datagram: &[u8], body: &str) -> Vec<u8> {
    let Some(rest) = datagram.strip_prefix(UDP_CHECK_MAGIC) else {
        return body.as_bytes().to_vec();
    };
    let reply_size = rest
        .iter()
        .position(|&b| b == b'\n')
        .and_then(|end| std::str::from_utf8(&rest[..end]).ok())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_DATAGRAM);
    let mut reply = format!(
        "{} len={} fnv={:016x}\n",
        body.trim(),
        datagram.len(),
        fnv1a64(datagram)
    )
    .into_bytes();
    while reply.len() < reply_size {
        reply.push(filler(reply.len()));
    }
    reply
}

/// FNV-1a, 64 bits.
pub(super) fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Byte `i` of the reply filler: no period that a misplaced fragment could keep.
fn filler(i: usize) -> u8 {
    (i % 251) as u8 ^ (i >> 8) as u8
}

/// A UDP socket bound to `addr` with `SO_REUSEADDR`, so a wildcard and a specific address can
/// share a port (the kernel hands a datagram to the most specific one).
pub(super) fn udp_bind_shared(addr: SocketAddr) -> Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .context("creating a UDP socket")?;
    socket
        .set_reuse_address(true)
        .context("setting SO_REUSEADDR")?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding UDP {addr}"))?;
    Ok(socket.into())
}

/// A TCP listener on `[::]:port`, IPv6 only (IPv4 has its own listener), `SO_REUSEADDR` as std
/// sets it.
pub(super) fn tcp_listen_v6only(port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))
        .context("creating a TCP socket")?;
    socket.set_only_v6(true).context("setting IPV6_V6ONLY")?;
    socket
        .set_reuse_address(true)
        .context("setting SO_REUSEADDR")?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding TCP {addr}"))?;
    socket.listen(128).context("listening")?;
    Ok(socket.into())
}

/// A UDP socket on `[::]:port`, IPv6 only.
pub(super) fn udp_bind_v6only(port: u16) -> Result<UdpSocket> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))
        .context("creating a UDP socket")?;
    socket.set_only_v6(true).context("setting IPV6_V6ONLY")?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding UDP {addr}"))?;
    Ok(socket.into())
}

/// Time left until `deadline`, or an error once it has passed.
pub(super) fn remaining(deadline: Instant, what: &str) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    ensure!(!left.is_zero(), "timed out {what}");
    Ok(left)
}

/// A TCP connection from `client` (bound before connecting) to `target`, in the calling thread's
/// network namespace.
fn connect_from(client: IpAddr, target: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    ensure!(
        client.is_ipv6() == target.is_ipv6(),
        "client {client} and target {target} are of different address families"
    );
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .context("creating a TCP socket")?;
    socket
        .bind(&SocketAddr::from((client, 0)).into())
        .with_context(|| format!("binding to {client}"))?;
    socket
        .connect_timeout(&target.into(), timeout)
        .context("connecting")?;
    Ok(socket.into())
}

/// A response as the lab's clients see it.
struct Response {
    status_line: String,
    status: Option<u16>,
    /// Whether the server keeps the connection open for another request.
    persistent: bool,
    body: String,
}

/// Reads one response: the head, then `Content-Length` bytes, or until EOF without one.
fn read_response(stream: &mut TcpStream, deadline: Instant) -> Result<Response> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let mut eof = false;
    let mut read_some = |data: &mut Vec<u8>, eof: &mut bool| -> Result<()> {
        loop {
            stream.set_read_timeout(Some(remaining(
                deadline,
                &format!("reading the response ({} bytes so far)", data.len()),
            )?))?;
            match stream.read(&mut buf) {
                Ok(0) => {
                    *eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    data.extend_from_slice(&buf[..n]);
                    ensure!(data.len() <= 1 << 20, "response larger than 1 MiB");
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(anyhow!(e).context(format!(
                        "reading the response ({} bytes so far)",
                        data.len()
                    )));
                }
            }
        }
    };
    let head_len = loop {
        if let Some(end) = head_end(&data) {
            break end;
        }
        ensure!(
            !eof,
            "connection closed after {} bytes: {:?}",
            data.len(),
            String::from_utf8_lossy(&data)
        );
        read_some(&mut data, &mut eof)?;
    };
    let head_text = String::from_utf8_lossy(&data[..head_len]).into_owned();
    let head = ParsedHead::parse(&head_text, false);
    match head.content_length {
        Some(n) => {
            while data.len() < head_len + n {
                ensure!(
                    !eof,
                    "connection closed after {} of {n} body bytes",
                    data.len() - head_len
                );
                read_some(&mut data, &mut eof)?;
            }
            data.truncate(head_len + n);
        }
        None => {
            while !eof {
                read_some(&mut data, &mut eof)?;
            }
        }
    }
    Ok(Response {
        status_line: head_text.lines().next().unwrap_or_default().to_owned(),
        status: head.first.first().and_then(|s| s.parse().ok()),
        persistent: head.persistent() && head.content_length.is_some() && !eof,
        body: String::from_utf8_lossy(&data[head_len..]).into_owned(),
    })
}

fn send_request(
    stream: &mut TcpStream,
    target: SocketAddr,
    path: &str,
    connection: &str,
    deadline: Instant,
) -> Result<()> {
    let host = match target.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-lab\r\nConnection: {connection}\r\n\r\n"
    );
    stream.set_write_timeout(Some(remaining(deadline, "before sending the request")?))?;
    stream
        .write_all(request.as_bytes())
        .context("sending the request")
}

fn expect_200(response: Response) -> Result<Response> {
    ensure!(
        response.status == Some(200),
        "answer was {:?}, not 200",
        response.status_line
    );
    Ok(response)
}

/// `GET <path>` with `Connection: close` from `client` to `target`, in the calling thread's
/// network namespace; the body of a `200` answer.
pub(super) fn http_get_here(
    client: Ipv4Addr,
    target: SocketAddrV4,
    path: &str,
    timeout: Duration,
) -> Result<String> {
    http_get_any(client.into(), target.into(), path, timeout)
}

/// [`http_get_here`] for either address family.
pub(super) fn http_get_any(
    client: IpAddr,
    target: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect_from(client, target, timeout)?;
    send_request(&mut stream, target, path, "close", deadline)?;
    Ok(expect_200(read_response(&mut stream, deadline)?)?.body)
}

/// One persistent HTTP/1.1 connection (`Connection: keep-alive`) from a client address to a
/// target. Made in the client namespace by [`super::Lab::http_connect`]; usable from any thread.
#[derive(Debug)]
pub struct HttpConn {
    stream: TcpStream,
    target: SocketAddrV4,
    local: SocketAddrV4,
    requests: u64,
    /// The server said it closes (or closed) the connection.
    closed: bool,
}

impl HttpConn {
    /// Connects from `client` to `target` in the calling thread's network namespace.
    pub(super) fn connect_here(
        client: Ipv4Addr,
        target: SocketAddrV4,
        timeout: Duration,
    ) -> Result<HttpConn> {
        let stream = connect_from(client.into(), target.into(), timeout)?;
        let local = match stream.local_addr().context("reading the local address")? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => bail!("IPv6 local address {a} on an IPv4 connection"),
        };
        Ok(HttpConn {
            stream,
            target,
            local,
            requests: 0,
            closed: false,
        })
    }

    /// `GET <path>` on this connection; the body of a `200` answer. Fails if the server has
    /// closed the connection (it said `Connection: close` or the connection was reset or ended),
    /// or without a full answer within `timeout`.
    pub fn get(&mut self, path: &str, timeout: Duration) -> Result<String> {
        ensure!(
            !self.closed,
            "the server closed connection {} -> {} after {} requests",
            self.local,
            self.target,
            self.requests
        );
        let deadline = Instant::now() + timeout;
        let result = send_request(
            &mut self.stream,
            self.target.into(),
            path,
            "keep-alive",
            deadline,
        )
        .and_then(|()| read_response(&mut self.stream, deadline));
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                self.closed = true;
                return Err(e.context(format!(
                    "request {} on connection {} -> {}",
                    self.requests + 1,
                    self.local,
                    self.target
                )));
            }
        };
        self.requests += 1;
        self.closed = !response.persistent;
        Ok(expect_200(response)?.body)
    }

    /// Whether the connection can take another request (the server has not closed it and no
    /// request on it failed).
    pub fn is_open(&self) -> bool {
        !self.closed
    }

    /// Requests answered on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The client side of the connection (address and port).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }
}

pub(super) fn udp_query_here(
    client: Ipv4Addr,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<(String, SocketAddr)> {
    udp_query_any(client.into(), target.into(), timeout)
}

/// What [`udp_check_here`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpCheck {
    /// The answering backend's name (e.g. `backend-2`).
    pub backend: String,
    /// Where the reply came from (the VIP and service port when the balancer translated it).
    pub from: SocketAddr,
    /// Bytes sent (and received whole by the backend).
    pub sent: usize,
    /// Bytes of the reply (all checked).
    pub received: usize,
}

/// Sends one check datagram of `size` bytes and verifies the reply (see
/// [`super::Lab::udp_check`]).
pub(super) fn udp_check_here(
    client: IpAddr,
    target: SocketAddr,
    size: usize,
    reply_size: usize,
    timeout: Duration,
) -> Result<UdpCheck> {
    static SEED: AtomicU64 = AtomicU64::new(1);
    ensure!(
        client.is_ipv6() == target.is_ipv6(),
        "client {client} and target {target} are of different address families"
    );
    let mut datagram = format!(
        "{} {reply_size}\n",
        String::from_utf8_lossy(UDP_CHECK_MAGIC).trim()
    )
    .into_bytes();
    ensure!(
        (datagram.len()..=MAX_DATAGRAM).contains(&size) && reply_size <= MAX_DATAGRAM,
        "a check datagram is {}..={MAX_DATAGRAM} bytes, its reply at most {MAX_DATAGRAM}",
        datagram.len()
    );
    // A fresh pattern per datagram: a fragment of another datagram spliced in changes the hash.
    let seed = SEED.fetch_add(0x9e37_79b9, Ordering::Relaxed);
    while datagram.len() < size {
        let i = datagram.len() as u64;
        datagram.push((seed.wrapping_mul(31).wrapping_add(i * 131) >> 3) as u8);
    }
    let want_hash = fnv1a64(&datagram);
    let deadline = Instant::now() + timeout;
    let socket = UdpSocket::bind((client, 0)).with_context(|| format!("binding to {client}"))?;
    socket
        .send_to(&datagram, target)
        .context("sending the datagram")?;
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let (n, from) = loop {
        socket.set_read_timeout(Some(remaining(deadline, "waiting for the reply")?))?;
        match socket.recv_from(&mut buf) {
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => bail!("no reply within {timeout:?}"),
            Err(e) => return Err(anyhow!(e).context("waiting for the reply")),
        }
    };
    let reply = &buf[..n];
    let line_end = reply
        .iter()
        .position(|&b| b == b'\n')
        .with_context(|| format!("reply of {n} bytes from {from} has no first line"))?;
    let line = String::from_utf8_lossy(&reply[..line_end]).into_owned();
    let mut words = line.split_whitespace();
    let backend = words.next().unwrap_or_default().to_owned();
    let (len, hash) = (words.next(), words.next());
    let expected = (
        format!("len={}", datagram.len()),
        format!("fnv={want_hash:016x}"),
    );
    ensure!(
        (len, hash) == (Some(expected.0.as_str()), Some(expected.1.as_str())),
        "the backend did not get the datagram whole: it says {line:?}, expected {} {}",
        expected.0,
        expected.1
    );
    let want_reply = reply_size.max(line_end + 1);
    ensure!(
        n == want_reply,
        "reply from {from} ({backend}) is {n} bytes, expected {want_reply}"
    );
    if let Some(i) = (line_end + 1..n).find(|&i| reply[i] != filler(i)) {
        bail!("reply from {from} ({backend}) is corrupt at byte {i} of {n}");
    }
    Ok(UdpCheck {
        backend,
        from,
        sent: datagram.len(),
        received: n,
    })
}

/// [`udp_query_here`] for either address family.
pub(super) fn udp_query_any(
    client: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<(String, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let socket = UdpSocket::bind((client, 0)).with_context(|| format!("binding to {client}"))?;
    socket
        .send_to(b"query\n", target)
        .context("sending the query")?;
    let mut buf = [0u8; 2048];
    loop {
        socket.set_read_timeout(Some(remaining(deadline, "waiting for the reply")?))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => return Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => bail!("no reply within {timeout:?}"),
            Err(e) => return Err(anyhow!(e).context("waiting for the reply")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_check_replies() {
        assert_eq!(udp_reply(b"query\n", "backend-2\n"), b"backend-2\n");
        let mut datagram = b"lab-check 100\n".to_vec();
        datagram.extend(std::iter::repeat_n(7u8, 2000));
        let reply = udp_reply(&datagram, "backend-2\n");
        assert_eq!(reply.len(), 100);
        let head = format!("backend-2 len=2014 fnv={:016x}\n", fnv1a64(&datagram));
        assert!(reply.starts_with(head.as_bytes()));
        assert!((head.len()..100).all(|i| reply[i] == filler(i)));
        // A reply size smaller than the first line: just the line.
        assert_eq!(
            udp_reply(b"lab-check 5\n", "b\n"),
            format!("b len=12 fnv={:016x}\n", fnv1a64(b"lab-check 5\n")).into_bytes()
        );
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn heads_and_persistence() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
        let req = |s: &str| ParsedHead::parse(s, true);
        assert!(req("GET / HTTP/1.1\r\nHost: x\r\n\r\n").persistent());
        assert!(!req("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").persistent());
        assert!(!req("GET / HTTP/1.0\r\n\r\n").persistent());
        assert!(req("GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n").persistent());
        assert!(!req("GET /").persistent());
        let r = req("POST /healthz HTTP/1.1\r\nContent-Length:  12 \r\n\r\n");
        assert_eq!(
            (r.first[1].as_str(), r.content_length),
            ("/healthz", Some(12))
        );
        let resp = ParsedHead::parse(
            "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n",
            false,
        );
        assert_eq!((resp.first[0].as_str(), resp.persistent()), ("503", false));
    }
}
