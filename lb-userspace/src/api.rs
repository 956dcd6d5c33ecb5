//! The control API's types: the requests and reports of the Unix-socket API, shared by the
//! server (`control`), the CLI client (`client`, `cli`) and the metrics. This module imports
//! nothing of the daemon's, so no cycle can run through it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_common::Counters;
use serde::{Deserialize, Serialize};

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
    /// Clients moved off it in the last minute (the journal's).
    #[serde(default)]
    pub moves_per_min: u64,
    pub counters: CountersReport,
    /// The backend's `state` in the config file (`active` or `draining`).
    #[serde(default)]
    pub config_state: String,
    /// Set when `lb drain`/`lb undrain` left the backend in another state than the config says
    /// (kept across reloads until the file's state for it changes, and across restarts).
    #[serde(default)]
    pub differs_from_config: Option<String>,
    /// Its part in the service's `[services.balance]`, when the service has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<BackendBalanceReport>,
}

/// A backend's load against its bound, and its slow-start ramp.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendBalanceReport {
    /// Per second, of the service's `balance.load` (packets, bytes or pins).
    pub load: f64,
    /// The load above which it takes no new clients; none without `load_bound`, or while the
    /// service is too quiet to judge.
    pub bound: Option<f64>,
    /// Over its bound: new clients skip it (their next choice takes them).
    pub over_bound: bool,
    /// While it ramps up (slow start): the share of its weight it takes now.
    pub ramping_percent: Option<u32>,
}

/// A service's `[services.balance]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceBalanceReport {
    pub load_bound: Option<f64>,
    /// packets, bytes or pins (per second).
    pub load: String,
    pub slow_start: Option<String>,
    pub hot_prefix_share: Option<f64>,
    /// Client prefixes split because they brought more than `hot_prefix_share` of the new
    /// connections: their clients are pinned by their own address.
    #[serde(default)]
    pub split_prefixes: Vec<String>,
    /// Clients placed on another backend than plain Maglev would have chosen (over the bound,
    /// ramping), since this daemon started; counted by the pin counter from the pins' creation
    /// times, so a pin made and lost between two counts is missed.
    #[serde(default)]
    pub placements_past_choice: u64,
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
    /// Moves of known clients so far, by reason (the journal's; `lb_client_moves_total`).
    #[serde(default)]
    pub moves: BTreeMap<String, u64>,
    /// Moves of its clients in the last minute.
    #[serde(default)]
    pub moves_per_min: u64,
    /// `[services.balance]`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<ServiceBalanceReport>,
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
    /// `datapath.mode`: `nat` or `dsr`.
    #[serde(default)]
    pub mode: String,
    pub maglev_table_size: u32,
    /// Entries in the affinity table (live or stale, every service) and its capacity, as of the
    /// latest pin count.
    pub affinity_entries: usize,
    pub affinity_capacity: u32,
    /// The pin count behind `affinity_entries` and every `pinned`: they are counted in the
    /// background, never while a request waits, so they carry their age.
    #[serde(default)]
    pub pin_count: PinCountReport,
    pub interfaces: Vec<InterfaceReport>,
    pub services: Vec<ServiceReport>,
    /// Verdict and reason counters by name (see lb_common::stat).
    pub stats: BTreeMap<String, u64>,
    /// `datapath.hash_seed`: nodes must share it to agree.
    pub hash_seed: u32,
    /// VIP announcement (`[announce]`), when configured.
    pub announce: Option<AnnounceReport>,
    /// Setups that run but lose traffic (a veth peer that drops redirected frames, a NAT backend
    /// whose replies do not come back through the balancer), each with its fix.
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceReport {
    /// The kernel routing table holding one route per announced VIP.
    pub table: u32,
    /// The VIPs announced now.
    pub announced: Vec<String>,
    /// `announce.grace`: how long `lb down` keeps serving after withdrawing, in seconds.
    #[serde(default)]
    pub grace_secs: f64,
}

/// When the pins were last counted (none yet: every count is 0 until the first finishes).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PinCountReport {
    /// When the latest count started (RFC 3339), how long ago, and how long it took.
    pub counted_at: Option<String>,
    pub age_secs: Option<f64>,
    pub took_ms: Option<f64>,
    /// A count is running now.
    pub running: bool,
    /// The latest count failed (the counts shown are the previous one's).
    pub error: Option<String>,
}

/// The answer to `POST /down`: the daemon is stopping; with `[announce]` it first withdraws its
/// VIPs and keeps serving for `grace_secs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DownReport {
    pub stopping: bool,
    #[serde(default)]
    pub grace_secs: f64,
}

/// Query of `GET /status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusQuery {
    /// Wait (up to a minute) for a pin count that starts after the request.
    #[serde(default)]
    pub fresh: bool,
}

/// A backend's administrative state at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    Active,
    /// No new clients; pinned clients stay until their pin times out.
    Draining,
    /// No new clients, and pinned clients are moved at their next packet.
    Forced,
}

/// What a reconcile changed, for logs and `lb reload`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Changes {
    pub services_added: Vec<String>,
    pub services_removed: Vec<String>,
    pub services_changed: Vec<String>,
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    /// Pins deleted because their service or backend was removed.
    pub pins_flushed: usize,
    /// The daemon deletes those pins in the background, outside its lock (they number in the
    /// millions on a big table): `pins_flushed` is then 0 and the log says how many went. Their
    /// clients are placed afresh meanwhile (their backend is gone from the datapath already).
    #[serde(default)]
    pub pins_flushing: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }

    /// One line for logs: `2 services added (a, b); 1 backend removed (web/10.0.0.1:80); 6 pins
    /// deleted (their service or backend was removed)`, or `nothing changed`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (list, one, many) in [
            (&self.services_added, "service added", "services added"),
            (&self.services_removed, "service removed", "services removed"),
            (&self.services_changed, "service changed", "services changed"),
            (&self.backends_added, "backend added", "backends added"),
            (&self.backends_removed, "backend removed", "backends removed"),
        ] {
            if !list.is_empty() {
                parts.push(format!("{} {} ({})", list.len(), if list.len() == 1 { one } else { many }, list.join(", ")));
            }
        }
        if self.pins_flushing {
            parts.push("the pins of what was removed are being deleted in the background".into());
        } else if self.pins_flushed > 0 {
            parts.push(format!(
                "{} pin{} deleted (their service or backend was removed)",
                self.pins_flushed,
                if self.pins_flushed == 1 { "" } else { "s" }
            ));
        }
        if parts.is_empty() { "nothing changed".into() } else { parts.join("; ") }
    }

    /// Whether every pin survived: nothing that held pins was removed.
    pub fn keeps_every_pin(&self) -> bool {
        self.pins_flushed == 0 && !self.pins_flushing && self.services_removed.is_empty() && self.backends_removed.is_empty()
    }
}

/// Answer of `POST /drain` and `POST /undrain`: the backend as it is now, and whether the
/// request changed it (an undrain of a backend that is not drained changes nothing).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdminReport {
    #[serde(flatten)]
    pub backend: BackendReport,
    #[serde(default = "yes")]
    pub changed: bool,
}

fn yes() -> bool {
    true
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

/// Query of `GET /explain`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainQuery {
    pub client: String,
    pub service: Option<String>,
}

/// One pin as `lb affinity list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PinReport {
    pub service: String,
    /// The client prefix the pin is for: an address, or address/prefix when the service's
    /// affinity prefix is shorter than the address.
    pub client: String,
    /// `address:port` of the backend (or `id N` for one that no longer exists).
    pub backend: String,
    /// up, down, draining, drained or removed.
    pub backend_state: String,
    /// Since the pin was made, and since the client's last packet (refreshed at most once a
    /// second), in seconds.
    pub age_secs: f64,
    pub idle_secs: f64,
    /// Seconds until the pin lapses if the client stays silent (the idle timeout or the max age,
    /// whichever comes first); 0 once it has.
    pub expires_in_secs: f64,
    /// Whether the client's next packet follows this pin.
    pub live: bool,
    /// Why it does not, when it does not.
    pub stale: Option<String>,
}

/// `lb affinity list`: the pins that matched, and how many there are in the whole table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AffinityList {
    /// Entries in the affinity table, live or stale, of every service.
    pub table_entries: usize,
    pub table_capacity: u32,
    /// Pins that matched the filters (all of them, even beyond `limit`).
    pub matched: usize,
    pub pins: Vec<PinReport>,
}

/// Filters of `lb affinity list`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListQuery {
    pub service: Option<String>,
    /// `address:port` of a backend.
    pub backend: Option<String>,
    /// At most this many pins in the answer (all when absent).
    pub limit: Option<usize>,
}

/// Body of `POST /affinity/flush`: exactly one of `client`, `backend`, `all`; `service` narrows
/// any of them to one service.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FlushRequest {
    pub client: Option<IpAddr>,
    pub backend: Option<String>,
    #[serde(default)]
    pub all: bool,
    pub service: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlushReport {
    /// Pins deleted: their clients are placed afresh (by Maglev) at their next packet.
    pub flushed: usize,
}

/// `lb explain`: where a client's next packet to one service goes, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explanation {
    pub client: String,
    pub service: String,
    /// `vip:port/protocol`.
    pub vip: String,
    /// The affinity key: the client address masked to the service's prefix.
    pub key: String,
    /// `pin` (the client's pin is used), `maglev` (no usable pin: a fresh pick, which pins it),
    /// or `none` (no backend can take a new client: the packet is dropped).
    pub via: String,
    /// Where the next packet goes, and that backend's state.
    pub backend: Option<String>,
    pub backend_state: Option<String>,
    /// The client's pin, usable or not.
    pub pin: Option<PinReport>,
    /// What the live Maglev table says for this client, pin or not.
    pub maglev_slot: u32,
    pub maglev_table_size: u32,
    pub maglev_backend: Option<String>,
    /// With `[services.balance]`, when the live table sends this client elsewhere than plain
    /// Maglev would: the plain choice and why it is passed over (over the load bound, ramping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub past_choice: Option<String>,
    /// One sentence: why this backend.
    pub reason: String,
    /// The client's last moves in this service (the journal's, newest last).
    #[serde(default)]
    pub history: Vec<MoveRecord>,
}

/// The body of every error answer: 400 (bad request), 404 (unknown service or backend), 409
/// (refused: the running state stays), 500 (datapath or kernel failure).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `address:port`, with IPv6 addresses in brackets.
pub fn endpoint(addr: &str, port: u16) -> String {
    match addr.parse::<IpAddr>() {
        Ok(a) => SocketAddr::new(a, port).to_string(),
        Err(_) => format!("{addr}:{port}"),
    }
}

/// An error of the control API's domain: the request names a service or backend that does not
/// exist (answered 404). Raised inside `anyhow::Error`s; the server tells it apart by downcast.
#[derive(Debug)]
pub struct NotFound(pub String);

/// The request is malformed or contradicts itself (answered 400).
#[derive(Debug)]
pub struct BadRequest(pub String);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotFound {}
impl std::error::Error for BadRequest {}

/// A duration for people: whole seconds (or milliseconds under a second).
pub fn human(ns: u64) -> String {
    let d = if ns >= 1_000_000_000 {
        Duration::from_secs(ns / 1_000_000_000)
    } else {
        Duration::from_millis(ns / 1_000_000)
    };
    humantime::format_duration(d).to_string()
}


/// Seconds for people (see [`human`]).
pub fn human_secs(s: f64) -> String {
    human((s * 1e9) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

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

/// `GET /status` of `lb agent`'s own control socket (`lb agent status`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub ports: Vec<u16>,
    /// tcp or udp.
    pub protocol: String,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub timeout: String,
    /// The worker sockets the agent steers to, by slot.
    pub workers: Vec<AgentWorker>,
    /// Live pins (client prefixes within the timeout) in all.
    pub pinned: u64,
    /// Connections (or datagrams) whose pin chose the socket, clients placed, clients placed
    /// again because their socket was gone, and those left to the kernel's spread.
    pub hits: u64,
    pub placed: u64,
    pub moved: u64,
    pub fallback: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentWorker {
    pub slot: u32,
    pub pid: u32,
    pub command: String,
    pub port: u16,
    /// The socket's inode (`socket:[N]` in the process's fds).
    pub socket: u64,
    /// Live pins to this socket.
    pub pinned: u64,
    /// Clients placed on it per second, over the last 10 s.
    pub new_clients_per_sec: f64,
}

/// What a change would do, computed without making it (`lb reload --dry-run`, `lb drain
/// --dry-run`, `lb simulate down`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WhatIf {
    /// reload, drain, drain --force or down.
    pub action: String,
    pub services: Vec<ServiceWhatIf>,
    pub services_added: Vec<String>,
    pub services_removed: Vec<String>,
    /// Live pins that would move (their clients placed afresh), over every service.
    pub pins_moved: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceWhatIf {
    pub service: String,
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    /// Backends whose weight or configured state changes.
    pub backends_reweighted: Vec<String>,
    /// Live pins of this service that would move.
    pub pins_moved: u64,
    /// The share of the Maglev table's slots whose backend changes: the share of new clients
    /// that would be placed differently.
    pub slot_share_moved: f64,
}

/// Query of `POST /reload` and `POST /drain`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DryRunQuery {
    #[serde(default)]
    pub dry_run: bool,
}

/// One move of a known client (`lb events`, `GET /events`): its pin went from one backend to
/// another, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MoveRecord {
    /// Order of arrival in this daemon's journal.
    pub seq: u64,
    /// RFC 3339, millisecond precision.
    pub time: String,
    pub service: String,
    /// The client's pin key: an address, or address/prefix.
    pub client: String,
    pub from: String,
    pub to: String,
    /// backend_down, backend_removed, drain_force, flushed, expired or max_age.
    pub reason: String,
}

/// Query of `GET /events`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EventsQuery {
    /// A client address: its moves (in each service, by the service's prefix).
    pub client: Option<String>,
    pub service: Option<String>,
    /// ADDRESS:PORT: moves from or to this backend.
    pub backend: Option<String>,
    /// Only moves newer than this (e.g. "10m").
    pub since: Option<String>,
    /// Only moves after this sequence number (`lb events --follow`).
    pub after: Option<u64>,
}

/// `GET /live.json` on the metrics listener: what the status page shows, refreshed each second.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveReport {
    pub status: StatusReport,
    /// The latest moves, newest first (at most [`LIVE_MOVES`]).
    pub recent_moves: Vec<MoveRecord>,
}

/// Moves `GET /live.json` carries.
pub const LIVE_MOVES: usize = 50;

/// `GET /trend.json` on the metrics listener: the last minutes, one point per sample
/// ([`TrendReport::every_secs`] apart), oldest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrendReport {
    pub every_secs: f64,
    pub points: Vec<TrendPoint>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrendPoint {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub services: BTreeMap<String, ServicePoint>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServicePoint {
    /// Moves of the service's clients since the point before.
    pub moves: u64,
    /// By backend `address:port`.
    pub backends: BTreeMap<String, BackendPoint>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackendPoint {
    pub state: String,
    pub pinned: u64,
    /// Over the time since the point before.
    pub new_pins_per_sec: f64,
    pub packets_per_sec: f64,
}
