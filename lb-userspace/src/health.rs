//! Active health checks for backends: one tokio task per target probes it every `interval`
//! (TCP connect or HTTP GET), counts consecutive results against `rise`/`fall`, and reports each
//! up/down transition as one [`Event`]. Pure userspace: the daemon turns events into map writes.
//!
//! Where state lives: each running target has one `Arc<Mutex<Shared>>` holding its current state
//! and a `stopped` flag. Its task is the only writer of the state while it runs, and commits a
//! transition (state + event) under that lock only if it has not been stopped; stopping takes the
//! same lock. So once [`HealthChecker::set_targets`] or [`HealthChecker::shutdown`] returns, a
//! stopped task can send nothing more, even if its abort lands later on another worker thread,
//! and a restarted checker starts from exactly the state its predecessor last reported.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, Take},
    net::TcpStream,
    runtime::Handle,
    sync::mpsc::UnboundedSender,
    task::JoinHandle,
    time::{Instant, sleep_until, timeout_at},
};

use crate::config::{HealthConfig, HealthKind};

/// Most bytes read of a response head (interim 1xx responses included) before giving up on it.
const MAX_RESPONSE_HEAD: u64 = 16 * 1024;
/// Interim (1xx) responses skipped before the final status line; more is a broken server.
const MAX_INTERIM_RESPONSES: usize = 8;
/// Reason given when a target is up only because its checks were turned off.
const REASON_DISABLED: &str = "health checks disabled (kind none)";

/// Identity of a checked backend.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    pub service: String,
    pub address: std::net::IpAddr,
    pub port: u16,
}

impl TargetKey {
    fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub key: TargetKey,
    pub check: HealthConfig,
    /// State to start in.
    pub initially_up: bool,
}

/// One up/down transition of a target.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub key: TargetKey,
    pub up: bool,
    /// Human reason of the transition, e.g. "3 consecutive failures, last: connection refused"
    /// or "2 consecutive successes (HTTP 200)".
    pub reason: String,
    pub at: SystemTime,
}

/// What a target's task and the checker share.
struct Shared {
    up: bool,
    /// Set when the checker stops this task; the task commits nothing afterwards.
    stopped: bool,
    /// Probes completed by this task (not carried over a restart).
    probes: u64,
}

/// One target the checker runs.
struct Running {
    check: HealthConfig,
    shared: Arc<Mutex<Shared>>,
    /// None for `kind = none`: nothing to probe.
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops the task (no event can follow once this returns) and gives the last state.
    fn stop(self) -> bool {
        let up = {
            let mut s = lock(&self.shared);
            s.stopped = true;
            s.up
        };
        if let Some(task) = self.task {
            task.abort();
        }
        up
    }
}

/// Runs the health checks of a set of targets; see the module docs.
pub struct HealthChecker {
    tx: UnboundedSender<Event>,
    runtime: Handle,
    running: BTreeMap<TargetKey, Running>,
}

impl HealthChecker {
    /// Events go to `tx`. Must be created inside a tokio runtime; the checks run on it.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn new(tx: UnboundedSender<Event>) -> Self {
        Self { tx, runtime: Handle::current(), running: BTreeMap::new() }
    }

    /// Replaces the target set: starts checkers for new keys, stops those whose key is gone,
    /// restarts a checker whose HealthConfig changed (starting it in its current state), and
    /// leaves unchanged ones running untouched (their counters and state continue).
    ///
    /// A new target starts in `initially_up`. A target with `kind = none` is always up: if that
    /// makes it up while it was (or was told to start) down, one event says so; otherwise it
    /// never sends events. If a key appears more than once, the last one wins.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        let wanted: BTreeMap<TargetKey, Target> = targets.into_iter().map(|t| (t.key.clone(), t)).collect();

        let gone: Vec<TargetKey> = self.running.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for key in gone {
            if let Some(r) = self.running.remove(&key) {
                r.stop();
                tracing::debug!(service = %key.service, backend = %key.socket_addr(), "health check stopped");
            }
        }

        for (key, target) in wanted {
            let start_up = match self.running.remove(&key) {
                Some(r) if r.check == target.check => {
                    self.running.insert(key, r);
                    continue;
                }
                Some(r) => {
                    let up = r.stop();
                    tracing::debug!(
                        service = %key.service, backend = %key.socket_addr(), up,
                        "health check config changed; restarting it in its current state"
                    );
                    up
                }
                None => target.initially_up,
            };
            let running = self.start(key.clone(), target.check, start_up);
            self.running.insert(key, running);
        }
    }

    /// Current state of every target (true = up).
    pub fn states(&self) -> BTreeMap<TargetKey, bool> {
        self.running.iter().map(|(k, r)| (k.clone(), lock(&r.shared).up)).collect()
    }

    /// Stops everything (also on Drop). No event is sent once this returns.
    pub fn shutdown(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            r.stop();
        }
    }

    /// Probes completed by the target's current task.
    #[cfg(test)]
    fn probes(&self, key: &TargetKey) -> Option<u64> {
        self.running.get(key).map(|r| lock(&r.shared).probes)
    }

    fn start(&self, key: TargetKey, check: HealthConfig, up: bool) -> Running {
        let backend = key.socket_addr();
        if check.kind == HealthKind::None {
            let shared = Arc::new(Mutex::new(Shared { up: true, stopped: false, probes: 0 }));
            if !up {
                let event = Event { key, up: true, reason: REASON_DISABLED.to_owned(), at: SystemTime::now() };
                log_transition(&event);
                // A closed receiver means the daemon is going away: nothing left to tell.
                let _ = self.tx.send(event);
            }
            return Running { check, shared, task: None };
        }
        tracing::debug!(
            service = %key.service, %backend, kind = ?check.kind, up,
            interval = ?check.interval, timeout = ?check.timeout, "health check started"
        );
        let shared = Arc::new(Mutex::new(Shared { up, stopped: false, probes: 0 }));
        let task = self.runtime.spawn(run(key, check.clone(), up, Arc::clone(&shared), self.tx.clone()));
        Running { check, shared, task: Some(task) }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // Nothing panics while holding the lock, but a poisoned flag must not take the checker down.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Debug level: the daemon logs every transition at info/warn with what it did about it.
fn log_transition(e: &Event) {
    tracing::debug!(
        service = %e.key.service,
        backend = %e.key.socket_addr(),
        state = if e.up { "up" } else { "down" },
        reason = %e.reason,
        "backend health changed"
    );
}

/// The loop of one target: probe, count, commit transitions, sleep until the next jittered tick.
async fn run(key: TargetKey, check: HealthConfig, mut up: bool, shared: Arc<Mutex<Shared>>, tx: UnboundedSender<Event>) {
    let backend = key.socket_addr();
    let seed = target_seed(&key);
    // Config validation keeps these >= 1; a 0 would mean "never", which no operator wants.
    let rise = check.rise.max(1);
    let fall = check.fall.max(1);
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut next = Instant::now() + first_delay(check.interval, seed);
    for tick in 1u64.. {
        sleep_until(next).await;
        let started = Instant::now();
        let result = probe(backend, &check).await;
        // Ticks are scheduled from probe starts so slow probes do not drift the cadence; a probe
        // that overran its slot (timeout near the interval) is followed at once, never in a burst.
        next = (started + jittered_interval(check.interval, seed, tick)).max(Instant::now());

        let transition = match &result {
            Ok(detail) => {
                tracing::trace!(service = %key.service, %backend, detail, "health probe succeeded");
                failures = 0;
                successes = successes.saturating_add(1);
                (!up && successes >= rise).then(|| format!("{} ({detail})", plural(rise, "consecutive success")))
            }
            Err(reason) => {
                tracing::debug!(service = %key.service, %backend, reason, "health probe failed");
                successes = 0;
                failures = failures.saturating_add(1);
                (up && failures >= fall).then(|| format!("{}, last: {reason}", plural(fall, "consecutive failure")))
            }
        };

        let mut s = lock(&shared);
        if s.stopped {
            return;
        }
        s.probes += 1;
        if let Some(reason) = transition {
            up = !up;
            (successes, failures) = (0, 0);
            s.up = up;
            let event = Event { key: key.clone(), up, reason, at: SystemTime::now() };
            log_transition(&event);
            // Sent under the lock so that stopping the task orders after it; a closed receiver
            // means the daemon is going away.
            let _ = tx.send(event);
        }
    }
}

fn plural(n: u32, what: &str) -> String {
    match (n, what.ends_with('s')) {
        (1, _) => format!("1 {what}"),
        (_, true) => format!("{n} {what}es"),
        (_, false) => format!("{n} {what}s"),
    }
}

// ------------------------------------------------------------------------------------------------
// Jitter: deterministic per target, so a restart probes the same pattern, yet different targets
// spread over the interval instead of probing in lockstep.

/// FNV-1a over the key's fields.
fn target_seed(key: &TargetKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let octets: Vec<u8> = match key.address {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    let bytes = key.service.bytes().chain([0xff]).chain(octets).chain(key.port.to_be_bytes());
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A number in `[0, 1)` from the target's seed and a counter (splitmix64 finalizer).
fn unit(seed: u64, n: u64) -> f64 {
    let mut x = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Delay before the first probe: anywhere in `[0, interval)`, so targets start out of phase.
fn first_delay(interval: Duration, seed: u64) -> Duration {
    interval.mul_f64(unit(seed, 0))
}

/// Interval before probe `n + 1`: `interval` ±10%.
fn jittered_interval(interval: Duration, seed: u64, n: u64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * unit(seed, n))
}

// ------------------------------------------------------------------------------------------------
// Probes.

/// One probe, exposed for tests and `lb explain`-style diagnostics: Ok(detail) on success,
/// Err(reason) on failure. Never takes longer than `check.timeout` (plus scheduling slack).
/// `kind = none` succeeds without touching the network.
pub async fn probe(addr: SocketAddr, check: &HealthConfig) -> Result<String, String> {
    let deadline = Instant::now() + check.timeout;
    let timed_out = |stage: &str| format!("timeout after {} {stage}", humantime::format_duration(check.timeout));
    match check.kind {
        HealthKind::None => Ok("not checked (kind none)".to_owned()),
        HealthKind::Tcp => {
            timeout_at(deadline, connect(addr)).await.map_err(|_| timed_out("connecting"))??;
            Ok("connected".to_owned())
        }
        HealthKind::Http => {
            let mut stream = timeout_at(deadline, connect(addr)).await.map_err(|_| timed_out("connecting"))??;
            let request = http_request(addr, check);
            timeout_at(deadline, stream.write_all(request.as_bytes()))
                .await
                .map_err(|_| timed_out("sending the request"))?
                .map_err(|e| format!("sending the request: {}", io_reason(&e)))?;
            let status = timeout_at(deadline, read_status(stream))
                .await
                .map_err(|_| timed_out("waiting for the status line"))??;
            if (200..400).contains(&status) { Ok(format!("HTTP {status}")) } else { Err(format!("HTTP {status}")) }
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    TcpStream::connect(addr).await.map_err(|e| io_reason(&e))
}

fn http_request(addr: SocketAddr, check: &HealthConfig) -> String {
    let host = check.host.clone().unwrap_or_else(|| addr.to_string());
    format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
        check.path
    )
}

type HeadReader = Take<BufReader<TcpStream>>;

/// Reads response heads until a final (non-1xx) status line and returns its code.
async fn read_status(stream: TcpStream) -> Result<u16, String> {
    let mut reader = BufReader::new(stream).take(MAX_RESPONSE_HEAD);
    let mut line = Vec::new();
    for _ in 0..=MAX_INTERIM_RESPONSES {
        // A status line cut short by the end of the stream is still read: lenient, and harmless.
        let complete = read_line(&mut reader, &mut line).await.map_err(|e| e.describe("the status line"))?;
        let status = parse_status_line(&line).ok_or_else(|| {
            let shown: String = String::from_utf8_lossy(&line).trim_end().chars().take(60).collect();
            format!("malformed status line {shown:?}")
        })?;
        // 1xx (103 Early Hints, 100 Continue) are interim: their headers end at an empty line,
        // then the real response follows. 101 would switch protocols, which a check never asks.
        if !(100..200).contains(&status) || status == 101 {
            return Ok(status);
        }
        if !complete {
            return Err(format!("connection closed after an interim HTTP {status}"));
        }
        loop {
            let what = "the headers of an interim response";
            if !read_line(&mut reader, &mut line).await.map_err(|e| e.describe(what))? {
                return Err(LineError::Closed.describe(what));
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                break;
            }
        }
    }
    Err(format!("more than {MAX_INTERIM_RESPONSES} interim (1xx) responses"))
}

enum LineError {
    /// The stream ended before any byte of the line.
    Closed,
    /// More than `MAX_RESPONSE_HEAD` bytes of head.
    TooLong,
    Io(io::Error),
}

impl LineError {
    fn describe(self, what: &str) -> String {
        match self {
            LineError::Closed => format!("connection closed before {what}"),
            LineError::TooLong => format!("malformed response: head longer than {MAX_RESPONSE_HEAD} bytes"),
            LineError::Io(e) => format!("reading {what}: {}", io_reason(&e)),
        }
    }
}

/// Reads one line into `line`; true if it ended with LF, false if the stream ended first.
async fn read_line(reader: &mut HeadReader, line: &mut Vec<u8>) -> Result<bool, LineError> {
    line.clear();
    let n = reader.read_until(b'\n', line).await.map_err(LineError::Io)?;
    if line.last() == Some(&b'\n') {
        Ok(true)
    } else if reader.limit() == 0 {
        Err(LineError::TooLong)
    } else if n == 0 {
        Err(LineError::Closed)
    } else {
        Ok(false)
    }
}

/// `HTTP/<d>.<d> <3 digits>[ <reason>]` (CRLF or LF already included or not) -> the code.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/")?;
    let [major, b'.', minor, b' ', c1, c2, c3, tail @ ..] = rest else { return None };
    let well_formed = major.is_ascii_digit() && minor.is_ascii_digit() && matches!(tail.first(), None | Some(b' '));
    if !well_formed {
        return None;
    }
    let digit = |c: &u8| c.is_ascii_digit().then(|| u16::from(c - b'0'));
    let status = digit(c1)? * 100 + digit(c2)? * 10 + digit(c3)?;
    (100..=599).contains(&status).then_some(status)
}

/// A short, stable reason for a socket error ("connection refused"), the OS text otherwise.
fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind::*;
    let known = match e.kind() {
        ConnectionRefused => "connection refused",
        ConnectionReset => "connection reset",
        ConnectionAborted => "connection aborted",
        BrokenPipe => "connection closed by the backend",
        HostUnreachable => "host unreachable",
        NetworkUnreachable => "network unreachable",
        NetworkDown => "network down",
        AddrNotAvailable => "no local address available",
        TimedOut => "timed out in the kernel",
        _ => return e.to_string(),
    };
    known.to_owned()
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        sync::atomic::{AtomicU16, Ordering},
    };

    use tokio::{
        net::{TcpListener, TcpSocket},
        sync::mpsc::{self, UnboundedReceiver},
        task::JoinSet,
        time::timeout,
    };

    use super::*;

    const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
    /// Upper bound on any wait for something that must happen; tests never hang past it.
    const PATIENCE: Duration = Duration::from_secs(5);

    fn check(kind: HealthKind, interval_ms: u64, rise: u32, fall: u32) -> HealthConfig {
        HealthConfig {
            kind,
            path: "/".to_owned(),
            host: None,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(200),
            rise,
            fall,
        }
    }

    fn key(service: &str, port: u16) -> TargetKey {
        TargetKey { service: service.to_owned(), address: std::net::IpAddr::V4(LOCALHOST), port }
    }

    fn target(key: &TargetKey, check: &HealthConfig, initially_up: bool) -> Target {
        Target { key: key.clone(), check: check.clone(), initially_up }
    }

    fn checker() -> (HealthChecker, UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (HealthChecker::new(tx), rx)
    }

    async fn next_event(rx: &mut UnboundedReceiver<Event>, waiting_for: &str) -> Event {
        match timeout(PATIENCE, rx.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("event channel closed while waiting for {waiting_for}"),
            Err(_) => panic!("no event within {PATIENCE:?} while waiting for {waiting_for}"),
        }
    }

    async fn assert_no_event(rx: &mut UnboundedReceiver<Event>, during: Duration, context: &str) {
        if let Ok(Some(e)) = timeout(during, rx.recv()).await {
            panic!("unexpected event {context}: {e:?}");
        }
    }

    /// Waits until `cond` holds, polling; panics with `what` after PATIENCE.
    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A listener with SO_REUSEADDR, so a test can bind the same port again after closing it.
    fn listen(port: u16) -> TcpListener {
        let socket = TcpSocket::new_v4().expect("creating a TCP socket");
        socket.set_reuseaddr(true).expect("setting SO_REUSEADDR");
        socket.bind(SocketAddr::from((LOCALHOST, port))).unwrap_or_else(|e| panic!("binding 127.0.0.1:{port}: {e}"));
        socket.listen(128).expect("listening")
    }

    /// Accepts and closes connections until dropped.
    struct TcpServer {
        port: u16,
        task: JoinHandle<()>,
    }

    impl TcpServer {
        fn start(port: u16) -> Self {
            let listener = listen(port);
            let port = listener.local_addr().expect("listener address").port();
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    drop(stream);
                }
            });
            Self { port, task }
        }

        /// Closes the listener before returning, so the port refuses connections.
        async fn stop(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    /// What the test HTTP server answers to the n-th connection (0-based); None = never answer.
    type Responder = Arc<dyn Fn(usize) -> Option<String> + Send + Sync>;

    /// Records each request head and answers it as the responder says; dropping it closes every
    /// connection.
    struct HttpServer {
        addr: SocketAddr,
        requests: Arc<Mutex<Vec<String>>>,
        _task: AbortOnDrop,
    }

    struct AbortOnDrop(JoinHandle<()>);

    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    fn response(status: u16) -> String {
        format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    }

    impl HttpServer {
        fn start(responder: Responder) -> Self {
            let listener = listen(0);
            let addr = match listener.local_addr().expect("listener address") {
                SocketAddr::V4(a) => a,
                other => panic!("IPv4 listener has address {other}"),
            };
            let requests = Arc::new(Mutex::new(Vec::new()));
            let recorded = Arc::clone(&requests);
            let task = tokio::spawn(async move {
                // Owned by this task, so aborting it aborts every connection too.
                let mut connections = JoinSet::new();
                for n in 0.. {
                    let Ok((mut stream, _)) = listener.accept().await else { return };
                    let (responder, recorded) = (Arc::clone(&responder), Arc::clone(&recorded));
                    connections.spawn(async move {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => head.extend_from_slice(&buf[..k]),
                            }
                        }
                        recorded.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                        match responder(n) {
                            Some(answer) => {
                                let _ = stream.write_all(answer.as_bytes()).await;
                                let _ = stream.shutdown().await;
                            }
                            None => std::future::pending().await,
                        }
                    });
                    while connections.try_join_next().is_some() {}
                }
            });
            Self { addr: SocketAddr::V4(addr), requests, _task: AbortOnDrop(task) }
        }

        fn status(status: u16) -> Self {
            Self::start(Arc::new(move |_| Some(response(status))))
        }

        /// Answers with whatever status `status` holds at the time.
        fn switchable(status: &Arc<AtomicU16>) -> Self {
            let status = Arc::clone(status);
            Self::start(Arc::new(move |_| Some(response(status.load(Ordering::SeqCst)))))
        }

        fn port(&self) -> u16 {
            self.addr.port()
        }

        fn requests(&self) -> Vec<String> {
            self.requests.lock().unwrap().clone()
        }
    }

    // --------------------------------------------------------------------------------------------
    // Probes.

    #[tokio::test]
    async fn tcp_probe_connects_or_names_the_refusal() {
        let server = TcpServer::start(0);
        let addr = SocketAddr::new(std::net::IpAddr::V4(LOCALHOST), server.port);
        let tcp = check(HealthKind::Tcp, 50, 1, 1);
        assert_eq!(probe(addr, &tcp).await, Ok("connected".to_owned()));
        server.stop().await;
        assert_eq!(probe(addr, &tcp).await, Err("connection refused".to_owned()));
    }

    #[tokio::test]
    async fn http_probe_judges_the_status() {
        let http = check(HealthKind::Http, 50, 1, 1);
        for (status, expected) in [
            (200, Ok("HTTP 200".to_owned())),
            (204, Ok("HTTP 204".to_owned())),
            (301, Ok("HTTP 301".to_owned())),
            (404, Err("HTTP 404".to_owned())),
            (503, Err("HTTP 503".to_owned())),
        ] {
            let server = HttpServer::status(status);
            assert_eq!(probe(server.addr, &http).await, expected, "server answering {status}");
        }
    }

    #[tokio::test]
    async fn http_probe_sends_path_and_default_host() {
        let server = HttpServer::status(200);
        let http = HealthConfig { path: "/healthz?deep=1".to_owned(), ..check(HealthKind::Http, 50, 1, 1) };
        assert_eq!(probe(server.addr, &http).await, Ok("HTTP 200".to_owned()));
        let requests = server.requests();
        assert_eq!(
            requests,
            [format!(
                "GET /healthz?deep=1 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
                server.port()
            )]
        );
    }

    #[tokio::test]
    async fn http_probe_sends_the_configured_host() {
        let server = HttpServer::status(200);
        let http = HealthConfig { host: Some("www.example.com".to_owned()), ..check(HealthKind::Http, 50, 1, 1) };
        assert_eq!(probe(server.addr, &http).await, Ok("HTTP 200".to_owned()));
        let requests = server.requests();
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert!(requests[0].starts_with("GET / HTTP/1.1\r\n"), "{requests:?}");
        assert!(requests[0].contains("\r\nHost: www.example.com\r\n"), "{requests:?}");
        assert!(!requests[0].contains("127.0.0.1"), "{requests:?}");
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let server = HttpServer::start(Arc::new(|_| None));
        let http = check(HealthKind::Http, 50, 1, 1);
        let started = Instant::now();
        let result = probe(server.addr, &http).await;
        let took = started.elapsed();
        assert_eq!(result, Err("timeout after 200ms waiting for the status line".to_owned()));
        assert!(took >= http.timeout, "returned after {took:?}, before the timeout");
        assert!(took < http.timeout + Duration::from_millis(100), "returned only after {took:?}");
        assert_eq!(server.requests().len(), 1, "the request was sent before the wait");
    }

    #[tokio::test]
    async fn http_probe_names_broken_responses() {
        let http = check(HealthKind::Http, 50, 1, 1);
        let cases: [(&str, Result<&str, &str>); 6] = [
            ("garbage\r\n\r\n", Err("malformed status line \"garbage\"")),
            ("HTTP/1.1 2000 OK\r\n\r\n", Err("malformed status line \"HTTP/1.1 2000 OK\"")),
            ("", Err("connection closed before the status line")),
            // Interim responses are skipped; the final one decides.
            ("HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", Ok("HTTP 200")),
            ("HTTP/1.1 100 Continue\r\n", Err("connection closed before the headers of an interim response")),
            // No reason phrase, LF only, cut short by the close: still understood.
            ("HTTP/1.0 302", Ok("HTTP 302")),
        ];
        for (answer, expected) in cases {
            let server = HttpServer::start(Arc::new(move |_| Some(answer.to_owned())));
            let expected = expected.map(str::to_owned).map_err(str::to_owned);
            assert_eq!(probe(server.addr, &http).await, expected, "server answering {answer:?}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service Unavailable\n"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.1 200OK\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 999 OK\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/x.1 200 OK\r\n"), None);
        assert_eq!(parse_status_line(b"ICY 200 OK\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[test]
    fn jitter_is_within_ten_percent_and_differs_between_targets() {
        let interval = Duration::from_secs(1);
        let (a, b) = (target_seed(&key("web", 80)), target_seed(&key("web", 81)));
        assert_ne!(a, b);
        assert_ne!(first_delay(interval, a), first_delay(interval, b));
        assert_eq!(first_delay(interval, a), first_delay(interval, target_seed(&key("web", 80))));
        let ticks: Vec<Duration> = (1..1000).map(|n| jittered_interval(interval, a, n)).collect();
        for t in &ticks {
            assert!((Duration::from_millis(900)..=Duration::from_millis(1100)).contains(t), "{t:?}");
        }
        let mean = ticks.iter().sum::<Duration>() / ticks.len() as u32;
        assert!((Duration::from_millis(980)..=Duration::from_millis(1020)).contains(&mean), "mean {mean:?}");
        assert!(ticks.iter().any(|t| *t < Duration::from_millis(920)), "jitter spans the low end");
        assert!(ticks.iter().any(|t| *t > Duration::from_millis(1080)), "jitter spans the high end");
    }

    #[test]
    fn reasons_read_well() {
        assert_eq!(plural(1, "consecutive success"), "1 consecutive success");
        assert_eq!(plural(2, "consecutive success"), "2 consecutive successes");
        assert_eq!(plural(3, "consecutive failure"), "3 consecutive failures");
    }

    // --------------------------------------------------------------------------------------------
    // Checkers. Multi-threaded like the daemon, so stops race with tasks on other workers.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_target_follows_its_listener() {
        let server = TcpServer::start(0);
        let port = server.port;
        let k = key("web", port);
        let (mut hc, mut rx) = checker();
        hc.set_targets(vec![target(&k, &check(HealthKind::Tcp, 20, 2, 3), false)]);
        assert_eq!(hc.states(), BTreeMap::from([(k.clone(), false)]));

        let up = next_event(&mut rx, "the listening backend to come up").await;
        assert_eq!((&up.key, up.up, up.reason.as_str()), (&k, true, "2 consecutive successes (connected)"));
        assert!(hc.states()[&k]);

        server.stop().await;
        let down = next_event(&mut rx, "the closed backend to go down").await;
        assert_eq!(
            (&down.key, down.up, down.reason.as_str()),
            (&k, false, "3 consecutive failures, last: connection refused")
        );
        assert!(!hc.states()[&k]);

        let server = TcpServer::start(port);
        let up = next_event(&mut rx, "the rebound backend to come up").await;
        assert_eq!((up.up, up.reason.as_str()), (true, "2 consecutive successes (connected)"));
        assert!(up.at >= down.at);
        assert_no_event(&mut rx, Duration::from_millis(150), "while the backend stays up").await;
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flapping_never_transitions() {
        let alternating: Responder = Arc::new(|n| Some(response(if n % 2 == 0 { 200 } else { 503 })));
        let (server_a, server_b) = (HttpServer::start(Arc::clone(&alternating)), HttpServer::start(alternating));
        let (ka, kb) = (key("web", server_a.port()), key("web", server_b.port()));
        let http = check(HealthKind::Http, 20, 2, 3);
        let (mut hc, mut rx) = checker();
        hc.set_targets(vec![target(&ka, &http, true), target(&kb, &http, false)]);
        wait_until("both flapping targets were probed 12 times", || {
            hc.probes(&ka).unwrap() >= 12 && hc.probes(&kb).unwrap() >= 12
        })
        .await;
        assert_no_event(&mut rx, Duration::ZERO, "from a flapping backend").await;
        assert_eq!(hc.states(), BTreeMap::from([(ka, true), (kb, false)]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_event_per_transition() {
        let status = Arc::new(AtomicU16::new(200));
        let server = HttpServer::switchable(&status);
        let k = key("api", server.port());
        let (mut hc, mut rx) = checker();
        hc.set_targets(vec![target(&k, &check(HealthKind::Http, 20, 2, 3), true)]);
        wait_until("a few probes passed", || hc.probes(&k).unwrap() >= 4).await;
        assert_no_event(&mut rx, Duration::ZERO, "while an up backend answers 200").await;

        status.store(503, Ordering::SeqCst);
        let down = next_event(&mut rx, "the 503 backend to go down").await;
        assert_eq!((down.up, down.reason.as_str()), (false, "3 consecutive failures, last: HTTP 503"));
        let probes = hc.probes(&k).unwrap();
        wait_until("more failing probes passed", || hc.probes(&k).unwrap() >= probes + 5).await;
        assert_no_event(&mut rx, Duration::ZERO, "while a down backend keeps failing").await;

        status.store(200, Ordering::SeqCst);
        let up = next_event(&mut rx, "the recovered backend to come up").await;
        assert_eq!((up.up, up.reason.as_str()), (true, "2 consecutive successes (HTTP 200)"));
        let probes = hc.probes(&k).unwrap();
        wait_until("more passing probes passed", || hc.probes(&k).unwrap() >= probes + 5).await;
        assert_no_event(&mut rx, Duration::ZERO, "while an up backend keeps passing").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_probe_is_prompt_and_timeouts_count_as_failures() {
        // A slow interval: the first probe still comes within one interval of the start.
        let silent = HttpServer::start(Arc::new(|_| None));
        let k = key("slow", silent.port());
        let c = HealthConfig { timeout: Duration::from_millis(50), ..check(HealthKind::Http, 400, 1, 1) };
        let (mut hc, mut rx) = checker();
        let started = Instant::now();
        hc.set_targets(vec![target(&k, &c, true)]);
        let down = next_event(&mut rx, "the silent backend to go down").await;
        assert!(started.elapsed() < c.interval + c.timeout + Duration::from_millis(100), "{:?}", started.elapsed());
        assert_eq!(down.reason, "1 consecutive failure, last: timeout after 50ms waiting for the status line");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn set_targets_adds_removes_and_restarts_only_what_changed() {
        let (server_a, server_b) = (HttpServer::status(200), HttpServer::status(200));
        let (ka, kb) = (key("web", server_a.port()), key("web", server_b.port()));
        let http = check(HealthKind::Http, 20, 1, 1);
        let (mut hc, mut rx) = checker();

        // Adding.
        hc.set_targets(vec![target(&ka, &http, false)]);
        assert_eq!(next_event(&mut rx, "A to come up").await.key, ka);
        hc.set_targets(vec![target(&ka, &http, false), target(&kb, &http, false)]);
        let e = next_event(&mut rx, "B to come up").await;
        assert_eq!((&e.key, e.up), (&kb, true), "A was left alone, B was added");
        assert_eq!(hc.states(), BTreeMap::from([(ka.clone(), true), (kb.clone(), true)]));

        // Changing A's config restarts A in its current state (up, so no event), and not B.
        wait_until("both were probed", || hc.probes(&ka).unwrap() >= 3 && hc.probes(&kb).unwrap() >= 3).await;
        let a_shared = Arc::clone(&hc.running[&ka].shared);
        let b_shared = Arc::clone(&hc.running[&kb].shared);
        let a_before = hc.probes(&ka).unwrap();
        let b_before = hc.probes(&kb).unwrap();
        let changed = HealthConfig { path: "/ready".to_owned(), fall: 2, ..http.clone() };
        hc.set_targets(vec![target(&ka, &changed, false), target(&kb, &http, false)]);
        assert!(!Arc::ptr_eq(&a_shared, &hc.running[&ka].shared), "A was restarted");
        assert!(lock(&a_shared).stopped);
        assert!(Arc::ptr_eq(&b_shared, &hc.running[&kb].shared), "B was left running");
        assert!(hc.probes(&ka).unwrap() < a_before, "A's counters restarted");
        assert!(hc.probes(&kb).unwrap() >= b_before, "B's counters continue");
        assert_eq!(hc.states(), BTreeMap::from([(ka.clone(), true), (kb.clone(), true)]));
        wait_until("A probed with the new config", || server_a.requests().iter().any(|r| r.starts_with("GET /ready "))).await;
        wait_until("B kept counting", || hc.probes(&kb).unwrap() >= b_before + 3).await;
        assert_no_event(&mut rx, Duration::ZERO, "from restarting an up target").await;

        // A restarted target keeps its down state too.
        drop(server_a);
        let e = next_event(&mut rx, "A to go down").await;
        assert_eq!((&e.key, e.up), (&ka, false));
        let down_again = HealthConfig { fall: 3, ..changed.clone() };
        hc.set_targets(vec![target(&ka, &down_again, true), target(&kb, &http, false)]);
        assert!(!hc.states()[&ka], "restart keeps the current state, not initially_up");

        // Removing: B flaps on every probe (rise = fall = 1), so a live checker would keep talking.
        let flapping = HttpServer::start(Arc::new(|n| Some(response(if n % 2 == 0 { 200 } else { 503 }))));
        let kc = key("flap", flapping.port());
        hc.set_targets(vec![target(&ka, &down_again, true), target(&kb, &http, false), target(&kc, &http, true)]);
        let mut seen = 0;
        while seen < 2 {
            if next_event(&mut rx, "the flapping target to flap").await.key == kc {
                seen += 1;
            }
        }
        hc.set_targets(vec![target(&ka, &down_again, true), target(&kb, &http, false)]);
        assert!(!hc.states().contains_key(&kc));
        // Whatever was sent before removal is already queued; nothing may follow it.
        while let Ok(e) = rx.try_recv() {
            assert_ne!(e.key, ka, "A stays down: {e:?}");
        }
        let served = flapping.requests().len();
        assert_no_event(&mut rx, Duration::from_millis(150), "after removing the flapping target").await;
        assert!(flapping.requests().len() <= served + 1, "the removed target kept probing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kind_none_is_always_up_and_silent() {
        let k = key("static", 1); // nothing listens there: any probe would fail
        let none = check(HealthKind::None, 20, 1, 1);
        let (mut hc, mut rx) = checker();
        hc.set_targets(vec![target(&k, &none, true)]);
        assert_eq!(hc.states(), BTreeMap::from([(k.clone(), true)]));
        assert_no_event(&mut rx, Duration::from_millis(150), "for kind none").await;
        assert_eq!(hc.states(), BTreeMap::from([(k.clone(), true)]));
        assert_eq!(probe(k.socket_addr(), &none).await, Ok("not checked (kind none)".to_owned()));

        // Turning checks off for a down target brings it up, which the daemon must hear once.
        let tcp = check(HealthKind::Tcp, 20, 1, 1);
        hc.set_targets(vec![target(&k, &tcp, true)]);
        let e = next_event(&mut rx, "the unreachable target to go down").await;
        assert_eq!((e.up, e.reason.as_str()), (false, "1 consecutive failure, last: connection refused"));
        hc.set_targets(vec![target(&k, &none, true)]);
        let e = next_event(&mut rx, "disabling checks to bring it up").await;
        assert_eq!((e.up, e.reason.as_str()), (true, REASON_DISABLED));
        assert!(hc.states()[&k]);
        assert_no_event(&mut rx, Duration::from_millis(100), "for kind none").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_and_drop_stop_everything() {
        let k = key("web", 1); // refused: with fall = rise = 1 a live checker would report
        let tcp = check(HealthKind::Tcp, 20, 1, 1);
        let (mut hc, mut rx) = checker();
        hc.set_targets(vec![target(&k, &tcp, true)]);
        next_event(&mut rx, "the target to go down").await;
        hc.shutdown();
        assert!(hc.states().is_empty());

        let server = TcpServer::start(0);
        hc.set_targets(vec![target(&key("web", server.port), &tcp, false)]);
        next_event(&mut rx, "the restarted checker to bring the target up").await;
        let shared = Arc::clone(&hc.running.values().next().unwrap().shared);
        drop(hc);
        assert!(lock(&shared).stopped);
        // Every sender is gone once the tasks are: the channel closes.
        match timeout(PATIENCE, rx.recv()).await {
            Ok(None) => {}
            other => panic!("expected the channel to close after drop, got {other:?}"),
        }
        server.stop().await;
    }
}
