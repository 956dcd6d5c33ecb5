//! The validated, typed configuration the daemon runs on: addresses, durations and enums where
//! the file has strings, and the defaults they take when the file leaves them out.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::Serialize;

/// Where `lb run` pins its maps and link unless told otherwise.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";
/// The control socket `lb run` listens on and the CLI talks to unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";
/// Where the Prometheus metrics are served unless `control.metrics` says otherwise: loopback.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9940";
/// Default of `services.backends.weight`.
pub(super) const DEFAULT_WEIGHT: u32 = 100;
const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub datapath: DatapathConfig,
    pub control: ControlConfig,
    pub services: Vec<ServiceConfig>,
    /// VIP announcement for a routing daemon (BIRD); none when the table is absent.
    pub announce: Option<AnnounceConfig>,
}

/// `[announce]`: the daemon keeps one blackhole route per announced VIP in a kernel routing
/// table of its own (protocol `announce::ROUTE_PROTOCOL`), which a routing daemon such as BIRD
/// learns and announces over BGP. A VIP is announced while the datapath is attached and one of
/// its services has a backend up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnnounceConfig {
    /// The kernel routing table (1..=2^32-1, not 253 default, 254 main or 255 local).
    pub table: u32,
    /// `lb down`: after withdrawing, how long the datapath keeps serving (routers move the
    /// traffic meanwhile) before it is detached.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

/// Default of `announce.grace`.
pub const DEFAULT_ANNOUNCE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatapathConfig {
    /// Interfaces the XDP program is attached to.
    pub interfaces: Vec<String>,
    pub mode: Mode,
    pub xdp_mode: XdpMode,
    /// Capacity of the `AFFINITY` LRU map (size it to about twice the active clients).
    pub affinity_entries: u32,
    /// Capacity of the `FLOWS` LRU map: established TCP connections that stay on their backend
    /// whatever happens to their client's pin (size it to about twice the open connections).
    pub flow_entries: u32,
    /// New pins and connection entries one CPU may write per second (0: no limit); past it, new
    /// clients are placed by Maglev without being remembered, so a flood of spoofed sources
    /// cannot flush the tables.
    pub max_new_pins_per_cpu: u32,
    /// bpffs directory holding the pinned maps and link.
    pub pin_path: PathBuf,
    pub max_services: u32,
    /// Capacity of `BACKENDS`: total over all services.
    pub max_backends: u32,
    /// Maglev table size M, a prime.
    pub maglev_table_size: u32,
    /// Seed for hashing clients onto Maglev slots; the same on every node of a cluster.
    pub hash_seed: u32,
}

/// Forwarding mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Rewrite the destination to the backend; replies come back through the balancer.
    Nat,
    /// Direct server return: only the destination MAC is rewritten; the backends, on the same L2
    /// segment as the balancer, hold the VIP on a loopback interface and answer clients directly.
    Dsr,
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, generic (skb) mode otherwise.
    Auto,
    Native,
    Skb,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlConfig {
    /// Unix socket of the control API.
    pub socket: PathBuf,
    /// Prometheus listener (`DEFAULT_METRICS`, on loopback, unless set; `"off"`: none).
    pub metrics: Option<SocketAddr>,
    /// The journal of moves: `control.journal`, `control.journal_max_size`, `control.journal_events`.
    pub journal: JournalConfig,
}

/// Where the journal of moves goes besides memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalConfig {
    /// A file the moves are appended to as JSON lines (none by default).
    pub path: Option<PathBuf>,
    /// Past this size the file is rotated (renamed to `<path>.1`, replacing an older one).
    pub max_size: u64,
    /// Moves kept in memory (`lb events`).
    pub events: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self { path: None, max_size: 10 << 20, events: 100_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub affinity: AffinityConfig,
    pub health: HealthConfig,
    /// `[services.balance]`: every part off when absent.
    #[serde(skip_serializing_if = "BalanceConfig::is_off")]
    pub balance: BalanceConfig,
    pub backends: Vec<BackendConfig>,
}

/// Fairness for new clients (`[services.balance]`); pins never move for it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BalanceConfig {
    /// A backend whose load is above this many times its weighted share of the service's load
    /// takes no new clients while it stays above (bounded loads); none: no bound.
    pub load_bound: Option<f64>,
    /// What load counts.
    pub load: LoadKind,
    /// An added, recovered or undrained backend's share of new clients ramps up over this.
    #[serde(with = "humantime_serde")]
    pub slow_start: Option<Duration>,
    /// A client prefix bringing more than this share of the service's new clients is split finer.
    pub hot_prefix_share: Option<f64>,
}

impl BalanceConfig {
    pub fn is_off(&self) -> bool {
        self.load_bound.is_none() && self.slow_start.is_none() && self.hot_prefix_share.is_none()
    }
}

/// What a backend's load is, as a rate over a short sliding window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadKind {
    /// Packets per second sent to it.
    #[default]
    Packets,
    /// Bytes per second sent to it.
    Bytes,
    /// New pins per second (clients placed on it).
    Pins,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number, as in the IPv4 header and `ServiceKey::proto`.
    pub fn number(&self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AffinityConfig {
    /// Idle time after which a client's pin counts as gone. Make it longer than the
    /// application's own session timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Clients sharing this many leading address bits share a backend.
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Cap on a pin's whole life, even for a client that never goes idle; none when absent.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        Self { timeout: DEFAULT_AFFINITY_TIMEOUT, ipv4_prefix: 32, ipv6_prefix: 64, max_age: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthConfig {
    pub kind: HealthKind,
    /// Request path (HTTP checks only).
    pub path: String,
    /// Host header (HTTP checks only); the backend address when absent.
    pub host: Option<String>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring a backend up.
    pub rise: u32,
    /// Consecutive failures that take a backend down.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            kind: HealthKind::Tcp,
            path: "/".to_owned(),
            host: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP GET expecting a 2xx or 3xx status.
    Http,
    /// No checks: backends are always up.
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// Administrative state from the config (`lb drain`/`lb undrain` override it at run time).
    pub state: BackendState,
}

/// A backend's administrative state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new clients (when healthy).
    #[default]
    Active,
    /// Takes no new clients; clients pinned to it keep it until their pin times out.
    Draining,
}

macro_rules! display_as_serde_name {
    ($($ty:ty { $($variant:ident => $name:literal),* $(,)? })*) => {$(
        impl $ty {
            /// The name used in the config file and in status output.
            pub fn as_str(&self) -> &'static str {
                match self { $(Self::$variant => $name),* }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

display_as_serde_name! {
    Mode { Nat => "nat", Dsr => "dsr" }
    XdpMode { Auto => "auto", Native => "native", Skb => "skb" }
    Protocol { Tcp => "tcp", Udp => "udp" }
    HealthKind { Tcp => "tcp", Http => "http", None => "none" }
    BackendState { Active => "active", Draining => "draining" }
    LoadKind { Packets => "packets", Bytes => "bytes", Pins => "pins" }
}

#[cfg(test)]
mod tests {
    use super::Config;
    use crate::config::testing::FULL;

    #[test]
    fn serializes_lowercase_and_humantime() {
        let v = serde_json::to_value(Config::parse(FULL).unwrap()).unwrap();
        assert_eq!(v["datapath"]["mode"], "nat");
        assert_eq!(v["datapath"]["xdp_mode"], "auto");
        assert_eq!(v["services"][0]["protocol"], "tcp");
        assert_eq!(v["services"][0]["health"]["kind"], "http");
        assert_eq!(v["services"][0]["affinity"]["timeout"], "30m");
        assert_eq!(v["services"][0]["vip"], "10.0.0.100");
        assert_eq!(v["control"]["metrics"], "127.0.0.1:9940");
    }
}
