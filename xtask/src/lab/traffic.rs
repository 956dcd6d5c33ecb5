//! Continuous client traffic in the background (see [`super::Lab::spawn_traffic`]) and summaries
//! of what it saw.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

use super::http::{HttpConn, http_get_here};

/// Default limit for one request of the traffic generator (connect and full answer).
pub const TRAFFIC_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One request of the traffic generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The client address the request came from.
    pub client: Ipv4Addr,
    /// Which connection of this client carried it, counting from 1. With a new connection per
    /// request every record has its own number; with keep-alive the number stays the same
    /// while one connection lasts, so a changed number means that connection was lost.
    pub conn: u32,
    /// When the request started.
    pub at: Instant,
    /// How long it took until the answer or the error.
    pub took: Duration,
    /// The answering backend's name (the body, trimmed, e.g. `backend-2`), or the error.
    pub result: Result<String, String>,
}

impl Record {
    /// The answering backend, if the request succeeded.
    pub fn backend(&self) -> Option<&str> {
        self.result.as_deref().ok()
    }
}

/// How [`super::Lab::spawn_traffic_with`] sends its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrafficOptions {
    /// Pause of each client after each request.
    pub pause: Duration,
    /// Limit for one request (connect and full answer).
    pub timeout: Duration,
    /// `false`: a new connection (`Connection: close`) per request. `true`: one persistent
    /// HTTP/1.1 connection per client that carries every request; after an error or a close by
    /// the server the client connects again (and [`Record::conn`] counts up).
    pub keep_alive: bool,
}

impl TrafficOptions {
    /// New connections, `pause` between requests, [`TRAFFIC_REQUEST_TIMEOUT`] per request.
    pub fn new(pause: Duration) -> TrafficOptions {
        TrafficOptions {
            pause,
            timeout: TRAFFIC_REQUEST_TIMEOUT,
            keep_alive: false,
        }
    }

    /// One persistent connection per client.
    pub fn keep_alive(mut self) -> TrafficOptions {
        self.keep_alive = true;
        self
    }

    /// Limit for one request.
    pub fn timeout(mut self, timeout: Duration) -> TrafficOptions {
        self.timeout = timeout;
        self
    }
}

/// Background traffic: one thread per client. Stop it with [`TrafficHandle::stop`]; dropping it
/// only tells the threads to end.
pub struct TrafficHandle {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    threads: Vec<JoinHandle<()>>,
    join_limit: Duration,
}

fn lock(records: &Mutex<Vec<Record>>) -> MutexGuard<'_, Vec<Record>> {
    records.lock().unwrap_or_else(|p| p.into_inner())
}

impl TrafficHandle {
    /// The records so far, in order of their start.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut records = lock(&self.records).clone();
        records.sort_by_key(|r| r.at);
        records
    }

    /// Polls [`TrafficHandle::snapshot`] every 20 ms until `done` holds for it (true) or
    /// `timeout` has passed (false).
    pub fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&[Record]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.snapshot()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every client has at least `n` successful requests since `since` (false after
    /// `timeout`).
    pub fn wait_for_successes(&self, since: Instant, n: usize, timeout: Duration) -> bool {
        let clients = self.threads.len();
        self.wait_until(timeout, |records| {
            let mut per_client: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
            for r in records.iter().filter(|r| r.at >= since && r.result.is_ok()) {
                *per_client.entry(r.client).or_default() += 1;
            }
            per_client.len() == clients && per_client.values().all(|&c| c >= n)
        })
    }

    /// Stops the clients and returns every record, in order of their start. A client still
    /// waiting for an answer finishes it first (bounded by the request timeout); one that is
    /// not done within the request timeout plus the pause plus 2 s is abandoned.
    pub fn stop(mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + self.join_limit;
        for t in self.threads.drain(..) {
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                eprintln!(
                    "lab: a traffic thread did not stop within {:?}",
                    self.join_limit
                );
            }
        }
        let mut records = std::mem::take(&mut *lock(&self.records));
        records.sort_by_key(|r| r.at);
        records
    }
}

impl Drop for TrafficHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sleeps `d`, in slices, returning early once `stop` is set.
fn pause(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// Starts one thread per client in the network namespace behind `netns` (an open
/// `/run/netns/<name>`).
pub(super) fn spawn(
    netns: &File,
    ns_name: &str,
    clients: Vec<Ipv4Addr>,
    target: SocketAddrV4,
    options: TrafficOptions,
) -> Result<TrafficHandle> {
    let mut handle = TrafficHandle {
        stop: Arc::new(AtomicBool::new(false)),
        records: Arc::new(Mutex::new(Vec::new())),
        threads: Vec::new(),
        join_limit: options.timeout + options.pause + Duration::from_secs(2),
    };
    for client in clients {
        let netns = netns
            .try_clone()
            .with_context(|| format!("duplicating the handle of namespace {ns_name}"))?;
        let (stop, records) = (handle.stop.clone(), handle.records.clone());
        let ns_name = ns_name.to_owned();
        let thread = thread::Builder::new()
            .name(format!("traffic-{client}"))
            .spawn(move || {
                let record = |conn: u32, at: Instant, result: Result<String>| {
                    lock(&records).push(Record {
                        client,
                        conn,
                        at,
                        took: at.elapsed(),
                        result: result
                            .map(|b| b.trim().to_owned())
                            .map_err(|e| format!("{e:#}")),
                    });
                };
                if let Err(e) = setns(&netns, CloneFlags::CLONE_NEWNET) {
                    let e = anyhow::anyhow!(e).context(format!("entering namespace {ns_name}"));
                    record(0, Instant::now(), Err(e));
                    return;
                }
                let mut conn_no = 0u32;
                let mut conn: Option<HttpConn> = None;
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    let result = if options.keep_alive {
                        keep_alive_request(&mut conn, &mut conn_no, client, target, options.timeout)
                    } else {
                        conn_no += 1;
                        http_get_here(client, target, "/", options.timeout)
                    };
                    record(conn_no, at, result);
                    pause(&stop, options.pause);
                }
            })
            .context("spawning a traffic thread");
        match thread {
            Ok(t) => handle.threads.push(t),
            // `handle` is dropped: the threads started so far stop.
            Err(e) => return Err(e),
        }
    }
    Ok(handle)
}

/// One request on the client's persistent connection, connecting first if there is none.
fn keep_alive_request(
    conn: &mut Option<HttpConn>,
    conn_no: &mut u32,
    client: Ipv4Addr,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    if conn.is_none() {
        *conn_no += 1;
        *conn = Some(HttpConn::connect_here(client, target, timeout)?);
    }
    let c = conn.as_mut().expect("connected above");
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let result = c.get("/", left);
    if !c.is_open() {
        *conn = None;
    }
    result
}

/// What one client saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientSummary {
    /// Requests made (successful and failed).
    pub requests: usize,
    /// Failed requests.
    pub failures: usize,
    /// The answering backend of every successful request, in order.
    pub backends: Vec<String>,
    /// Distinct connections used ([`Record::conn`] values).
    pub connections: usize,
    /// The error of every failed request, in order.
    pub errors: Vec<String>,
}

impl ClientSummary {
    /// [`ClientSummary::backends`] as runs: (backend, consecutive answers).
    pub fn runs(&self) -> Vec<(String, usize)> {
        let mut runs: Vec<(String, usize)> = Vec::new();
        for b in &self.backends {
            match runs.last_mut() {
                Some((last, n)) if last == b => *n += 1,
                _ => runs.push((b.clone(), 1)),
            }
        }
        runs
    }

    /// How often the answering backend changed.
    pub fn switches(&self) -> usize {
        self.runs().len().saturating_sub(1)
    }

    /// Every backend that answered.
    pub fn distinct_backends(&self) -> BTreeSet<String> {
        self.backends.iter().cloned().collect()
    }
}

/// Per-client summaries of traffic records; `Display` prints one line per client (for
/// assertion messages).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrafficSummary {
    pub clients: BTreeMap<Ipv4Addr, ClientSummary>,
}

impl TrafficSummary {
    /// Requests of all clients.
    pub fn requests(&self) -> usize {
        self.clients.values().map(|c| c.requests).sum()
    }

    /// Failed requests of all clients.
    pub fn failures(&self) -> usize {
        self.clients.values().map(|c| c.failures).sum()
    }
}

impl fmt::Display for TrafficSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (client, s) in &self.clients {
            let runs: Vec<String> = s.runs().iter().map(|(b, n)| format!("{b} x{n}")).collect();
            write!(
                f,
                "{client}: {} requests, {} failed, {} connection(s); {}",
                s.requests,
                s.failures,
                s.connections,
                if runs.is_empty() {
                    "no answers".to_owned()
                } else {
                    runs.join(", ")
                }
            )?;
            if let Some(e) = s.errors.first() {
                write!(f, "; first error: {e}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Groups `records` per client, keeping their order.
pub fn summarize(records: &[Record]) -> TrafficSummary {
    let mut clients: BTreeMap<Ipv4Addr, ClientSummary> = BTreeMap::new();
    let mut conns: BTreeMap<Ipv4Addr, BTreeSet<u32>> = BTreeMap::new();
    for r in records {
        let s = clients.entry(r.client).or_default();
        s.requests += 1;
        match &r.result {
            Ok(b) => s.backends.push(b.clone()),
            Err(e) => {
                s.failures += 1;
                s.errors.push(e.clone());
            }
        }
        conns.entry(r.client).or_default().insert(r.conn);
    }
    for (client, set) in conns {
        if let Some(s) = clients.get_mut(&client) {
            s.connections = set.len();
        }
    }
    TrafficSummary { clients }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_group_per_client() {
        let t = Instant::now();
        let c1 = Ipv4Addr::new(10, 200, 1, 10);
        let c2 = Ipv4Addr::new(10, 200, 1, 11);
        let rec = |client, conn, result: Result<&str, &str>| Record {
            client,
            conn,
            at: t,
            took: Duration::ZERO,
            result: result.map(str::to_owned).map_err(str::to_owned),
        };
        let records = [
            rec(c1, 1, Ok("backend-1")),
            rec(c2, 1, Ok("backend-2")),
            rec(c1, 1, Ok("backend-1")),
            rec(c1, 2, Err("reset")),
            rec(c1, 3, Ok("backend-3")),
        ];
        let s = summarize(&records);
        let one = &s.clients[&c1];
        assert_eq!((one.requests, one.failures, one.connections), (4, 1, 3));
        assert_eq!(
            one.runs(),
            vec![("backend-1".to_owned(), 2), ("backend-3".to_owned(), 1)]
        );
        assert_eq!(one.switches(), 1);
        assert_eq!(one.errors, vec!["reset".to_owned()]);
        assert_eq!((s.requests(), s.failures()), (5, 1));
        assert_eq!(s.clients[&c2].distinct_backends().len(), 1);
        let text = s.to_string();
        assert!(text.contains("10.200.1.10: 4 requests, 1 failed, 3 connection(s); backend-1 x2, backend-3 x1; first error: reset"), "{text}");
        assert_eq!(records[3].backend(), None);
    }
}
