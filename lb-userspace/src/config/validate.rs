//! Validation: the raw model judged into the typed one, every problem reported with its field
//! path and the fix. Each check returns `None` after recording an error (or for a value `read`
//! already found of the wrong type); the checks across fields and services then run on every
//! value that passed, whatever else failed around it, so that independent problems all appear
//! at once while one mistake is reported once rather than echoed by every rule after it.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use super::{
    model::{
        AffinityConfig, AnnounceConfig, BackendConfig, BackendState, BalanceConfig, JournalConfig, LoadKind, Config, ControlConfig, DEFAULT_ANNOUNCE_GRACE,
        DEFAULT_METRICS, DEFAULT_PIN_PATH, DEFAULT_SOCKET, DEFAULT_WEIGHT, DatapathConfig, HealthConfig, HealthKind,
        Mode, Protocol, ServiceConfig, XdpMode,
    },
    raw::{self, Field, RawAffinity, RawAnnounce, RawBackend, RawBalance, RawControl, RawDatapath, RawHealth, RawService},
};
use crate::maglev::is_prime;

const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Upper bound of `affinity.max_age`.
const MAX_PIN_AGE: Duration = Duration::from_secs(365 * 24 * 3600);
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);
/// Upper bound of `balance.slow_start`.
const MAX_SLOW_START: Duration = Duration::from_secs(3600);
/// Cap on the `MAGLEV` array (`max_services * 2 * maglev_table_size` u32 slots): beyond this the
/// map is more memory than any sane deployment wants locked in the kernel.
const MAX_MAGLEV_BYTES: u64 = 1 << 30;

// ------------------------------------------------------------------------------------------------
// Errors.

/// One problem in a config: the field path (`services[0].backends[1].weight`) and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a config, in file order (datapath, control, then services).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ------------------------------------------------------------------------------------------------
// Validation.

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError { field: field.to_owned(), message: message.into() });
    }

    /// `value` (or `default` when absent) if it lies in `lo..=hi`.
    fn int<T: TryFrom<i64>>(&mut self, field: &str, value: Field<i64>, default: T, lo: i64, hi: i64) -> Option<T> {
        match value {
            Field::Absent => Some(default),
            Field::Wrong => None,
            Field::Given(v) => self.range(field, v, lo, hi),
        }
    }

    /// A required integer in `lo..=hi`; `example` shows how to set it.
    fn required_int<T: TryFrom<i64>>(
        &mut self,
        field: &str,
        value: Field<i64>,
        lo: i64,
        hi: i64,
        example: &str,
    ) -> Option<T> {
        match value {
            Field::Absent => self.missing(field, example),
            Field::Wrong => None,
            Field::Given(v) => self.range(field, v, lo, hi),
        }
    }

    fn range<T: TryFrom<i64>>(&mut self, field: &str, v: i64, lo: i64, hi: i64) -> Option<T> {
        if (lo..=hi).contains(&v) {
            T::try_from(v).ok()
        } else {
            self.push(field, format!("must be {lo}..={hi}, got {v}"));
            None
        }
    }

    fn missing<T>(&mut self, field: &str, example: &str) -> Option<T> {
        self.push(field, format!("is required, e.g. `{example}`"));
        None
    }

    /// One of `choices` (variant, name as written in the file), or `default` when absent.
    fn choice<T: Copy>(&mut self, field: &str, value: Field<&str>, default: T, choices: &[(T, &str)]) -> Option<T> {
        let v = match value {
            Field::Absent => return Some(default),
            Field::Wrong => return None,
            Field::Given(v) => v,
        };
        if let Some((t, _)) = choices.iter().find(|(_, name)| *name == v) {
            return Some(*t);
        }
        let names: Vec<String> = choices.iter().map(|(_, n)| format!("\"{n}\"")).collect();
        self.push(field, format!("must be one of {}, got \"{v}\"", names.join(", ")));
        None
    }

    fn duration(&mut self, field: &str, value: Field<&str>, default: Duration) -> Option<Duration> {
        let v = match value {
            Field::Absent => return Some(default),
            Field::Wrong => return None,
            Field::Given(v) => v,
        };
        match humantime::parse_duration(v) {
            Ok(d) => Some(d),
            Err(e) => {
                self.push(field, format!("\"{v}\" is not a duration ({e}); write e.g. \"30m\", \"1s\", \"500ms\""));
                None
            }
        }
    }

    fn absolute_path(&mut self, field: &str, value: Field<&str>, default: &str) -> Option<PathBuf> {
        let v = match value {
            Field::Absent => default,
            Field::Wrong => return None,
            Field::Given(v) => v,
        };
        if Path::new(v).is_absolute() {
            Some(PathBuf::from(v))
        } else {
            self.push(field, format!("must be an absolute path, got \"{v}\""));
            None
        }
    }

    /// An IPv4 or IPv6 address a packet can be sent to (VIPs and backends).
    fn unicast(&mut self, field: &str, value: Field<&str>, example: &str) -> Option<IpAddr> {
        let v = match value {
            Field::Absent => return self.missing(field, example),
            Field::Wrong => return None,
            Field::Given(v) => v,
        };
        let a = match v.parse::<IpAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.push(field, format!("\"{v}\" is not an IP address; write e.g. `{example}`"));
                return None;
            }
        };
        let what = if a.is_unspecified() {
            "unspecified"
        } else if a.is_multicast() {
            "multicast"
        } else if matches!(a, IpAddr::V4(v4) if v4.is_broadcast()) {
            "broadcast"
        } else if let IpAddr::V6(v6) = a
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            self.push(field, format!("{a} is an IPv4-mapped IPv6 address; write the IPv4 address {v4}"));
            return None;
        } else {
            return Some(a);
        };
        self.push(field, format!("{a} is a {what} address; use a unicast address"));
        None
    }
}

pub(super) fn validate(doc: &toml::Table) -> Result<Config, ConfigErrors> {
    let mut e = Errors::default();
    let raw = raw::read(doc, &mut e.0);
    let (datapath, limits) = match raw.datapath.or_default() {
        Some(r) => validate_datapath(&mut e, r),
        None => (None, Limits::default()),
    };
    let control = raw.control.or_default().and_then(|r| validate_control(&mut e, r));
    let announce = match raw.announce {
        Field::Absent => Some(None),
        Field::Wrong => None,
        Field::Given(r) => validate_announce(&mut e, r).map(Some),
    };
    let services: Vec<ServiceParts> = listed(raw.services)
        .into_iter()
        .enumerate()
        .map(|(i, s)| match s {
            Field::Given(s) => validate_service(&mut e, i, s),
            // Not a table: reported by `read`.
            Field::Absent | Field::Wrong => ServiceParts::default(),
        })
        .collect();
    cross_check(&mut e, &limits, &services);

    if !e.0.is_empty() {
        return Err(ConfigErrors(e.0));
    }
    // No error was recorded, so every part validated.
    let parts = (|| {
        Some(Config {
            datapath: datapath?,
            control: control?,
            services: services.into_iter().map(ServiceParts::build).collect::<Option<_>>()?,
            announce: announce?,
        })
    })();
    Ok(parts.expect("a part failed validation without recording an error"))
}

/// The entries of a list, none when the list is absent or of the wrong type (reported).
fn listed<T>(list: Field<Vec<T>>) -> Vec<T> {
    match list {
        Field::Given(items) => items,
        Field::Absent | Field::Wrong => Vec::new(),
    }
}

/// The datapath values the checks across services use, each if it validated.
#[derive(Default)]
struct Limits {
    mode: Option<Mode>,
    max_services: Option<u32>,
    max_backends: Option<u32>,
    maglev_table_size: Option<u32>,
}

fn validate_datapath(e: &mut Errors, r: RawDatapath) -> (Option<DatapathConfig>, Limits) {
    let interfaces = match r.interfaces {
        Field::Absent => e.missing("datapath.interfaces", r#"interfaces = ["eth0"]"#),
        Field::Wrong => None,
        Field::Given(list) if list.is_empty() => {
            e.push("datapath.interfaces", r#"must name at least one interface, e.g. `interfaces = ["eth0"]`"#);
            None
        }
        Field::Given(list) => {
            let mut ok = true;
            for (i, name) in list.iter().enumerate() {
                let field = format!("datapath.interfaces[{i}]");
                let Field::Given(name) = name else {
                    ok = false;
                    continue;
                };
                if let Some(why) = ifname_problem(name) {
                    e.push(&field, format!("\"{}\" is not a valid interface name: {why}", name.escape_debug()));
                    ok = false;
                } else if let Some(first) = list[..i].iter().position(|n| *n == Field::Given(name.clone())) {
                    e.push(
                        &field,
                        format!("\"{name}\" is already listed as interfaces[{first}]; list each interface once"),
                    );
                    ok = false;
                }
            }
            ok.then(|| list.into_iter().filter_map(|n| n.or_default()).collect())
        }
    };

    let mode = e.choice("datapath.mode", r.mode.as_deref(), Mode::Nat, &[(Mode::Nat, "nat"), (Mode::Dsr, "dsr")]);
    let xdp_mode = e.choice(
        "datapath.xdp_mode",
        r.xdp_mode.as_deref(),
        XdpMode::Auto,
        &[(XdpMode::Auto, "auto"), (XdpMode::Native, "native"), (XdpMode::Skb, "skb")],
    );
    let affinity_entries =
        e.int("datapath.affinity_entries", r.affinity_entries, lb_common::DEFAULT_AFFINITY_ENTRIES, 1024, 1 << 27);
    let flow_entries = e.int("datapath.flow_entries", r.flow_entries, lb_common::DEFAULT_FLOW_ENTRIES, 1024, 1 << 27);
    let max_new_pins_per_cpu = e.int(
        "datapath.max_new_pins_per_cpu",
        r.max_new_pins_per_cpu,
        lb_common::DEFAULT_NEW_PINS_PER_CPU,
        0,
        u32::MAX.into(),
    );
    let pin_path = e.absolute_path("datapath.pin_path", r.pin_path.as_deref(), DEFAULT_PIN_PATH);
    let max_services = e.int("datapath.max_services", r.max_services, lb_common::DEFAULT_MAX_SERVICES, 1, 4096);
    // Maglev tables hold 16-bit backend ids.
    let max_backends = e.int(
        "datapath.max_backends",
        r.max_backends,
        lb_common::DEFAULT_MAX_BACKENDS,
        1,
        i64::from(lb_common::MAX_BACKEND_ID) + 1,
    );
    let hash_seed = e.int("datapath.hash_seed", r.hash_seed, 0u32, 0, u32::MAX.into());

    let field = "datapath.maglev_table_size";
    let mut maglev_table_size = e.int(field, r.maglev_table_size, lb_common::DEFAULT_MAGLEV_M, 7, 1_000_003);
    if let Some(m) = maglev_table_size {
        if !is_prime(m) {
            let (below, above) = neighbour_primes(m);
            e.push(field, format!("must be prime (Maglev fills its table by prime strides), got {m}; nearest primes are {below} and {above}"));
            maglev_table_size = None;
        } else if let Some(s) = max_services {
            let bytes = u64::from(s) * 2 * u64::from(lb_common::maglev_words(m)) * 8;
            if bytes > MAX_MAGLEV_BYTES {
                e.push(
                    field,
                    format!(
                        "the MAGLEV map would need max_services ({s}) * 2 tables * {m} slots * 2 bytes = {bytes} bytes, \
                         over the 1 GiB limit; lower maglev_table_size or datapath.max_services"
                    ),
                );
                maglev_table_size = None;
            }
        }
    }

    let limits = Limits { mode, max_services, max_backends, maglev_table_size };
    let config = (|| {
        Some(DatapathConfig {
            interfaces: interfaces?,
            mode: mode?,
            xdp_mode: xdp_mode?,
            affinity_entries: affinity_entries?,
            flow_entries: flow_entries?,
            max_new_pins_per_cpu: max_new_pins_per_cpu?,
            pin_path: pin_path?,
            max_services: max_services?,
            max_backends: max_backends?,
            maglev_table_size: maglev_table_size?,
            hash_seed: hash_seed?,
        })
    })();
    (config, limits)
}

/// Why Linux would refuse `name` as an interface name (`dev_valid_name` in net/core/dev.c).
fn ifname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 15 {
        Some("must be 1 to 15 bytes long")
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are reserved")
    } else if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
        Some("must not contain '/', ':', whitespace or control characters")
    } else {
        None
    }
}

/// The primes just below and just above `n`, for the "must be prime" hint.
fn neighbour_primes(n: u32) -> (u32, u32) {
    let below = (2..n).rev().find(|p| is_prime(*p)).unwrap_or(2);
    let above = (n + 1..).find(|p| is_prime(*p)).unwrap_or(n);
    (below, above)
}

fn validate_announce(e: &mut Errors, r: RawAnnounce) -> Option<AnnounceConfig> {
    let table: Option<u32> = e.required_int("announce.table", r.table, 1, u32::MAX as i64, "table = 4242");
    let table = match table {
        Some(t @ 253..=255) => {
            e.push(
                "announce.table",
                format!("{t} is one of the kernel's own tables (253 default, 254 main, 255 local): pick a table of lb's own, e.g. 4242"),
            );
            None
        }
        t => t,
    };
    let grace = e.duration("announce.grace", r.grace.as_deref(), DEFAULT_ANNOUNCE_GRACE);
    let grace = match grace {
        Some(g) if g > Duration::from_secs(60) => {
            e.push("announce.grace", format!("must be at most 60s, got {}", humantime::format_duration(g)));
            None
        }
        g => g,
    };
    Some(AnnounceConfig { table: table?, grace: grace? })
}

fn validate_control(e: &mut Errors, r: RawControl) -> Option<ControlConfig> {
    let socket = e.absolute_path("control.socket", r.socket.as_deref(), DEFAULT_SOCKET);
    let metrics = match r.metrics.as_deref() {
        Field::Absent => Some(Some(DEFAULT_METRICS.parse().expect("a valid default"))),
        Field::Wrong => None,
        Field::Given("off") => Some(None),
        Field::Given(v) => match v.parse::<SocketAddr>() {
            Ok(a) => Some(Some(a)),
            Err(_) => {
                e.push(
                    "control.metrics",
                    format!("\"{v}\" is not an address:port; write e.g. \"127.0.0.1:9940\" or \"[::1]:9940\", or \"off\""),
                );
                None
            }
        },
    };
    let d = JournalConfig::default();
    let path = match r.journal.as_deref() {
        Field::Absent => Some(None),
        Field::Wrong => None,
        Field::Given(v) => e.absolute_path("control.journal", Field::Given(v), "").map(Some),
    };
    let max_size = e.int("control.journal_max_size", r.journal_max_size, d.max_size, 4096, 1 << 40);
    let events = e.int("control.journal_events", r.journal_events, d.events, 1, 10_000_000);
    Some(ControlConfig {
        socket: socket?,
        metrics: metrics?,
        journal: JournalConfig { path: path?, max_size: max_size?, events: events? },
    })
}

/// What validated of one service: each field that passed its own checks (`None`: it failed and
/// was reported), for the checks across fields and services.
#[derive(Default)]
struct ServiceParts {
    name: Option<String>,
    vip: Option<IpAddr>,
    port: Option<u16>,
    protocol: Option<Protocol>,
    affinity: Option<AffinityConfig>,
    health: Option<HealthConfig>,
    balance: Option<BalanceConfig>,
    /// Every backend listed, valid or not.
    backends: Vec<BackendParts>,
}

impl ServiceParts {
    /// The service, if every part of it validated.
    fn build(self) -> Option<ServiceConfig> {
        let backends: Vec<_> = self.backends.into_iter().map(BackendParts::build).collect::<Option<_>>()?;
        Some(ServiceConfig {
            name: self.name?,
            vip: self.vip?,
            port: self.port?,
            protocol: self.protocol?,
            affinity: self.affinity?,
            health: self.health?,
            balance: self.balance?,
            backends: Some(backends).filter(|b| !b.is_empty())?,
        })
    }

    /// The backends that take part in checks across services: a duplicate within the service is
    /// reported as such, not again as whatever its first listing is.
    fn distinct_backends(&self) -> impl Iterator<Item = (usize, &BackendParts)> {
        self.backends.iter().enumerate().filter(|(_, b)| !b.duplicate)
    }
}

/// What validated of one backend, as `ServiceParts`.
#[derive(Default)]
struct BackendParts {
    address: Option<IpAddr>,
    port: Option<u16>,
    weight: Option<u32>,
    state: Option<BackendState>,
    /// An earlier backend of the service has the same address and port.
    duplicate: bool,
}

impl BackendParts {
    fn endpoint(&self) -> Option<(IpAddr, u16)> {
        Some((self.address?, self.port?))
    }

    fn build(self) -> Option<BackendConfig> {
        Some(BackendConfig { address: self.address?, port: self.port?, weight: self.weight?, state: self.state? })
    }
}

/// Checks one service on its own: its fields, and its backends against each other and its VIP.
fn validate_service(e: &mut Errors, i: usize, r: RawService) -> ServiceParts {
    let p = format!("services[{i}]");
    let name = match r.name {
        Field::Absent => e.missing(&format!("{p}.name"), r#"name = "web""#),
        Field::Wrong => None,
        Field::Given(n)
            if n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) =>
        {
            e.push(
                &format!("{p}.name"),
                format!("\"{}\" is not a valid name: use 1 to 64 of A-Z a-z 0-9 _ . -", n.escape_debug()),
            );
            None
        }
        Field::Given(n) => Some(n),
    };
    let vip = e.unicast(&format!("{p}.vip"), r.vip.as_deref(), r#"vip = "10.0.0.100""#);
    let port = e.required_int(&format!("{p}.port"), r.port, 1, 65535, "port = 80");
    let protocol = e.choice(
        &format!("{p}.protocol"),
        r.protocol.as_deref(),
        Protocol::Tcp,
        &[(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")],
    );
    let affinity = r.affinity.or_default().and_then(|a| validate_affinity(e, &p, a));
    let health = r.health.or_default().and_then(|h| validate_health(e, &p, h));
    let balance = r.balance.or_default().and_then(|b| validate_balance(e, &p, b));

    if matches!(&r.backends, Field::Absent) || matches!(&r.backends, Field::Given(list) if list.is_empty()) {
        e.push(
            &format!("{p}.backends"),
            "a service needs at least one [[services.backends]] with an address and a port",
        );
    }
    let mut backends: Vec<BackendParts> = listed(r.backends)
        .into_iter()
        .enumerate()
        .map(|(j, b)| match b {
            Field::Given(b) => validate_backend(e, &format!("{p}.backends[{j}]"), b),
            // Not a table: reported by `read`.
            Field::Absent | Field::Wrong => BackendParts::default(),
        })
        .collect();
    // Duplicates within the service, among the backends whose address and port parsed.
    for j in 0..backends.len() {
        let Some((address, port)) = backends[j].endpoint() else { continue };
        if let Some(first) = backends[..j].iter().position(|o| o.endpoint() == Some((address, port))) {
            e.push(
                &format!("{p}.backends[{j}]"),
                format!("{} is already listed as backends[{first}]; list each backend once", SocketAddr::new(address, port)),
            );
            backends[j].duplicate = true;
        }
    }

    // NAT keeps the address family: a service's backends are of its VIP's family. An address of
    // the other family fails like any other bad value (no "is a VIP" or "shared endpoint" echo
    // of it); the rest of the backend still takes part in the checks across services.
    if let Some(vip) = vip {
        let fam = |a: &IpAddr| if a.is_ipv6() { "IPv6" } else { "IPv4" };
        for (j, b) in backends.iter_mut().enumerate().filter(|(_, b)| !b.duplicate) {
            if let Some(address) = b.address
                && address.is_ipv6() != vip.is_ipv6()
            {
                e.push(
                    &format!("{p}.backends[{j}].address"),
                    format!(
                        "{address} is {} but the service's vip {vip} is {}: the balancer does not translate between \
                         families; use an {} backend",
                        fam(&address),
                        fam(&vip),
                        fam(&vip)
                    ),
                );
                b.address = None;
            }
        }
    }

    ServiceParts { name, vip, port, protocol, affinity, health, balance, backends }
}

fn validate_affinity(e: &mut Errors, p: &str, r: RawAffinity) -> Option<AffinityConfig> {
    let d = AffinityConfig::default();
    let field = format!("{p}.affinity.timeout");
    let timeout = e.duration(&field, r.timeout.as_deref(), d.timeout).and_then(|t| {
        if t.is_zero() || t > MAX_AFFINITY_TIMEOUT {
            e.push(&field, format!("must be more than 0 and at most 30 days, got {}", humantime::format_duration(t)));
            None
        } else {
            Some(t)
        }
    });
    let ipv4_prefix = e.int(&format!("{p}.affinity.ipv4_prefix"), r.ipv4_prefix, d.ipv4_prefix, 0, 32);
    let ipv6_prefix = e.int(&format!("{p}.affinity.ipv6_prefix"), r.ipv6_prefix, d.ipv6_prefix, 0, 128);
    let field = format!("{p}.affinity.max_age");
    let max_age = match r.max_age.as_deref() {
        Field::Absent => Some(None),
        Field::Wrong => None,
        Field::Given(v) => e.duration(&field, Field::Given(v), Duration::ZERO).and_then(|t| {
            if t.is_zero() || t > MAX_PIN_AGE {
                e.push(&field, format!("must be more than 0 and at most 365 days, got {}", humantime::format_duration(t)));
                None
            } else {
                Some(Some(t))
            }
        }),
    };
    Some(AffinityConfig { timeout: timeout?, ipv4_prefix: ipv4_prefix?, ipv6_prefix: ipv6_prefix?, max_age: max_age? })
}

fn validate_balance(e: &mut Errors, p: &str, r: RawBalance) -> Option<BalanceConfig> {
    let number = |e: &mut Errors, key: &str, v: Field<f64>, lo: f64, hi: f64, what: &str| match v {
        Field::Absent => Some(None),
        Field::Wrong => None,
        Field::Given(x) if x > lo && x <= hi => Some(Some(x)),
        Field::Given(x) => {
            e.push(&format!("{p}.balance.{key}"), format!("must be {what}, got {x}"));
            None
        }
    };
    let load_bound = number(e, "load_bound", r.load_bound, 1.0, 100.0, "more than 1 and at most 100 (1.25: 25% above the fair share)");
    let hot_prefix_share =
        number(e, "hot_prefix_share", r.hot_prefix_share, 0.0, 1.0, "more than 0 and at most 1 (0.2: a fifth of the new clients)");
    let load = e.choice(
        &format!("{p}.balance.load"),
        r.load.as_deref(),
        LoadKind::Packets,
        &[(LoadKind::Packets, "packets"), (LoadKind::Bytes, "bytes"), (LoadKind::Pins, "pins")],
    );
    let field = format!("{p}.balance.slow_start");
    let slow_start = match r.slow_start.as_deref() {
        Field::Absent => Some(None),
        Field::Wrong => None,
        Field::Given(v) => e.duration(&field, Field::Given(v), Duration::ZERO).and_then(|t| {
            if t.is_zero() || t > MAX_SLOW_START {
                e.push(&field, format!("must be more than 0 and at most 1 hour, got {}", humantime::format_duration(t)));
                None
            } else {
                Some(Some(t))
            }
        }),
    };
    Some(BalanceConfig { load_bound: load_bound?, load: load?, slow_start: slow_start?, hot_prefix_share: hot_prefix_share? })
}

fn validate_health(e: &mut Errors, p: &str, r: RawHealth) -> Option<HealthConfig> {
    let d = HealthConfig::default();
    let kind = e.choice(
        &format!("{p}.health.kind"),
        r.kind.as_deref(),
        d.kind,
        &[(HealthKind::Tcp, "tcp"), (HealthKind::Http, "http"), (HealthKind::None, "none")],
    );
    // Path and host go into an HTTP request line and header: no whitespace or control bytes.
    let bad_char = |s: &str| s.chars().any(|c| c.is_whitespace() || c.is_control());
    let path = match r.path {
        Field::Absent => Some(d.path),
        Field::Wrong => None,
        Field::Given(v) if !v.starts_with('/') || bad_char(&v) => {
            e.push(
                &format!("{p}.health.path"),
                format!("\"{}\" must start with '/' and contain no whitespace, e.g. \"/healthz\"", v.escape_debug()),
            );
            None
        }
        Field::Given(v) => Some(v),
    };
    let host = match r.host {
        Field::Absent => Some(None),
        Field::Wrong => None,
        Field::Given(v) if v.is_empty() || bad_char(&v) => {
            e.push(
                &format!("{p}.health.host"),
                format!(
                    "\"{}\" must be a non-empty host name without whitespace, e.g. \"www.example.com\"",
                    v.escape_debug()
                ),
            );
            None
        }
        Field::Given(v) => Some(Some(v)),
    };
    let field = format!("{p}.health.interval");
    let interval = e.duration(&field, r.interval.as_deref(), d.interval).and_then(|i| {
        if i < MIN_HEALTH_INTERVAL {
            e.push(&field, format!("must be at least 10ms, got {}", humantime::format_duration(i)));
            None
        } else {
            Some(i)
        }
    });
    let field = format!("{p}.health.timeout");
    let timeout = e.duration(&field, r.timeout.as_deref(), d.timeout).and_then(|t| {
        if t.is_zero() {
            e.push(&field, "must be more than 0");
            None
        } else if interval.is_some_and(|i| t > i) {
            e.push(
                &field,
                format!(
                    "{} is longer than health.interval ({}); make it at most the interval",
                    humantime::format_duration(t),
                    humantime::format_duration(interval.unwrap_or_default())
                ),
            );
            None
        } else {
            Some(t)
        }
    });
    let rise = e.int(&format!("{p}.health.rise"), r.rise, d.rise, 1, 100);
    let fall = e.int(&format!("{p}.health.fall"), r.fall, d.fall, 1, 100);
    Some(HealthConfig {
        kind: kind?,
        path: path?,
        host: host?,
        interval: interval?,
        timeout: timeout?,
        rise: rise?,
        fall: fall?,
    })
}

fn validate_backend(e: &mut Errors, p: &str, r: RawBackend) -> BackendParts {
    let address = e.unicast(&format!("{p}.address"), r.address.as_deref(), r#"address = "10.1.0.11""#);
    let port = e.required_int(&format!("{p}.port"), r.port, 1, 65535, "port = 8080");
    let weight = e.int(&format!("{p}.weight"), r.weight, DEFAULT_WEIGHT, 1, 65535);
    let state = e.choice(
        &format!("{p}.state"),
        r.state.as_deref(),
        BackendState::Active,
        &[(BackendState::Active, "active"), (BackendState::Draining, "draining")],
    );
    BackendParts { address, port, weight, state, duplicate: false }
}

/// Rules that span services. Every value that passed its own checks takes part, whatever else
/// failed in its service, so independent problems are all reported; a value that failed takes
/// part in none, so it is reported once.
fn cross_check(e: &mut Errors, limits: &Limits, services: &[ServiceParts]) {
    let label = |i: usize| match &services[i].name {
        Some(name) => format!("services[{i}] (\"{name}\")"),
        None => format!("services[{i}]"),
    };

    // DSR rewrites no port: a backend answers on the service port itself.
    if limits.mode == Some(Mode::Dsr) {
        for (i, s) in services.iter().enumerate() {
            let Some(service_port) = s.port else { continue };
            let vip = s.vip.map_or_else(|| "the VIP".to_owned(), |v| format!("the VIP {v}"));
            for (j, b) in s.distinct_backends() {
                if let Some(port) = b.port
                    && port != service_port
                {
                    e.push(
                        &format!("services[{i}].backends[{j}].port"),
                        format!(
                            "is {port} but the service port is {service_port}: in DSR mode only the MAC address is \
                             rewritten, so a backend must listen on the service port (and hold {vip} on a loopback \
                             interface, with arp_ignore=1 and arp_announce=2, on the balancer's L2 segment)"
                        ),
                    );
                }
            }
        }
    }

    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut vips: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        if let Some(name) = &s.name {
            if let Some(&first) = names.get(name.as_str()) {
                e.push(
                    &format!("services[{i}].name"),
                    format!("\"{name}\" is already the name of services[{first}]; names must be unique"),
                );
            } else {
                names.insert(name, i);
            }
        }
        let (Some(vip), Some(port), Some(protocol)) = (s.vip, s.port, s.protocol) else { continue };
        if let Some(&first) = vips.get(&(vip, port, protocol)) {
            e.push(
                &format!("services[{i}].vip"),
                format!(
                    "{}/{protocol} is already the address of {}; each (vip, port, protocol) must be unique",
                    SocketAddr::new(vip, port),
                    label(first)
                ),
            );
        } else {
            vips.insert((vip, port, protocol), i);
        }
    }

    // A backend must not be a VIP (any port): traffic to it would be balanced again.
    let mut vip_owner: HashMap<IpAddr, usize> = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        if let Some(vip) = s.vip {
            vip_owner.entry(vip).or_insert(i);
        }
    }
    // A backend endpoint in two services would make reply translation ambiguous: REVERSE maps
    // (address, port, protocol) to exactly one VIP.
    let mut endpoints: HashMap<(IpAddr, u16, Protocol), (usize, usize)> = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        for (j, b) in s.distinct_backends() {
            let field = format!("services[{i}].backends[{j}]");
            if let Some(address) = b.address
                && let Some(&owner) = vip_owner.get(&address)
            {
                e.push(
                    &format!("{field}.address"),
                    format!("{address} is the VIP of {}; a backend must not be a VIP", label(owner)),
                );
            }
            let (Some((address, port)), Some(protocol)) = (b.endpoint(), s.protocol) else { continue };
            match endpoints.get(&(address, port, protocol)) {
                Some(&(oi, oj)) if oi != i => e.push(
                    &field,
                    format!(
                        "{}/{protocol} is also services[{oi}].backends[{oj}] of {}; NAT reply \
                         translation would be ambiguous (a reply from it could belong to either service). Give \
                         each service its own backend port",
                        SocketAddr::new(address, port),
                        label(oi)
                    ),
                ),
                Some(_) => {}
                None => {
                    endpoints.insert((address, port, protocol), (i, j));
                }
            }
        }
    }

    // Capacities count every service and backend listed, valid or not.
    if let Some(max) = limits.max_services
        && services.len() > max as usize
    {
        e.push(
            "services",
            format!(
                "{} services exceed datapath.max_services = {max}; raise it (at most 4096) or remove services",
                services.len()
            ),
        );
    }
    let backends: usize = services.iter().map(|s| s.backends.len()).sum();
    if let Some(max) = limits.max_backends
        && backends > max as usize
    {
        e.push(
            "services",
            format!(
                "{backends} backends in total exceed datapath.max_backends = {max}; raise it (at most 65536) or \
                 remove backends"
            ),
        );
    }
    // Maglev can give every backend a slot only if there are no more backends than slots.
    let Some(m) = limits.maglev_table_size else { return };
    for (i, s) in services.iter().enumerate() {
        let n = s.distinct_backends().count();
        if n > m as usize {
            e.push(
                &format!("services[{i}].backends"),
                format!(
                    "{n} backends do not fit a Maglev table of datapath.maglev_table_size = {m}; raise it (to a prime \
                     at least 100 times the backend count for even balance)"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::testing::*;

    #[test]
    fn full_example_parses() {
        let c = Config::parse(FULL).unwrap();
        assert_eq!(
            c,
            Config {
                datapath: DatapathConfig {
                    interfaces: vec!["eth0".into(), "eth1".into()],
                    mode: Mode::Nat,
                    xdp_mode: XdpMode::Auto,
                    affinity_entries: 1_048_576,
                    flow_entries: 1_048_576,
                    max_new_pins_per_cpu: 125_000,
                    pin_path: "/sys/fs/bpf/lb".into(),
                    max_services: 64,
                    max_backends: 1024,
                    maglev_table_size: 65537,
                    hash_seed: 0,
                },
                control: ControlConfig {
                    socket: "/run/lb/lb.sock".into(),
                    metrics: Some("127.0.0.1:9940".parse().unwrap()),
                    journal: Default::default(),
                },
                services: vec![ServiceConfig {
                    name: "web".into(),
                    vip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100)),
                    port: 80,
                    protocol: Protocol::Tcp,
                    affinity: AffinityConfig { timeout: Duration::from_secs(1800), ipv4_prefix: 32, ipv6_prefix: 64, max_age: None },
                    health: HealthConfig {
                        kind: HealthKind::Http,
                        path: "/healthz".into(),
                        host: Some("www.example.com".into()),
                        interval: Duration::from_secs(1),
                        timeout: Duration::from_millis(500),
                        rise: 2,
                        fall: 3,
                    },
                    balance: Default::default(),
                    backends: vec![BackendConfig { address: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 11)), port: 8080, weight: 100, state: BackendState::Active }],
                }],
                announce: Some(AnnounceConfig { table: 4242, grace: Duration::from_secs(3) }),
            }
        );
    }

    #[test]
    fn announce_is_optional_and_checked() {
        assert_eq!(Config::parse(MINIMAL).unwrap().announce, None);
        let a = Config::parse(&format!("{MINIMAL}\n[announce]\ntable = 100")).unwrap().announce.unwrap();
        assert_eq!(a, AnnounceConfig { table: 100, grace: DEFAULT_ANNOUNCE_GRACE });
        rejects(&format!("{MINIMAL}\n[announce]\n"), "announce.table", "is required");
        rejects(&format!("{MINIMAL}\n[announce]\ntable = 254"), "announce.table", "254 main");
        rejects(&format!("{MINIMAL}\n[announce]\ntable = 0"), "announce.table", "must be 1..=4294967295");
        rejects(&format!("{MINIMAL}\n[announce]\ntable = 7\ngrace = \"2m\""), "announce.grace", "at most 60s");
    }

    #[test]
    fn minimal_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        let d = &c.datapath;
        assert_eq!(d.interfaces, ["eth0"]);
        assert_eq!((d.mode, d.xdp_mode), (Mode::Nat, XdpMode::Auto));
        assert_eq!(d.affinity_entries, 1 << 20);
        assert_eq!(d.pin_path, Path::new(DEFAULT_PIN_PATH));
        assert_eq!((d.max_services, d.max_backends, d.maglev_table_size, d.hash_seed), (64, 1024, 65537, 0));
        assert_eq!(
            c.control,
            ControlConfig { socket: DEFAULT_SOCKET.into(), metrics: Some(DEFAULT_METRICS.parse().unwrap()), journal: Default::default() }
        );
        let s = &c.services[0];
        assert_eq!(s.protocol, Protocol::Tcp);
        assert_eq!(
            s.affinity,
            AffinityConfig { timeout: Duration::from_secs(30 * 60), ipv4_prefix: 32, ipv6_prefix: 64, max_age: None }
        );
        assert_eq!(
            s.health,
            HealthConfig {
                kind: HealthKind::Tcp,
                path: "/".into(),
                host: None,
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 3,
            }
        );
        assert_eq!(s.backends, [BackendConfig { address: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 11)), port: 8080, weight: 100, state: BackendState::Active }]);
    }

    #[test]
    fn two_services_parse_and_other_values() {
        let text = edit(
            &two_services("[services.affinity]\nipv4_prefix = 24\ntimeout = \"2h\"\n"),
            &[(
                "interfaces = [\"eth0\"]",
                "interfaces = [\"eth0\", \"veth-lb.1\"]\nxdp_mode = \"skb\"\nhash_seed = 4294967295",
            )],
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.datapath.xdp_mode, XdpMode::Skb);
        assert_eq!(c.datapath.hash_seed, u32::MAX);
        let dns = &c.services[1];
        assert_eq!((dns.protocol, dns.protocol.number(), dns.protocol.to_string()), (Protocol::Udp, 17, "udp".into()));
        assert_eq!(c.services[0].protocol.number(), 6);
        assert_eq!(dns.affinity.ipv4_prefix, 24);
        assert_eq!(dns.affinity.timeout, Duration::from_secs(7200));
        assert_eq!(dns.backends.len(), 2);
    }

    // ---- datapath

    #[test]
    fn interfaces_required_and_non_empty() {
        rejects_minimal(&[("interfaces = [\"eth0\"]", "")], "datapath.interfaces", "required");
        rejects_minimal(&[("interfaces = [\"eth0\"]", "interfaces = []")], "datapath.interfaces", "at least one");
        // No [datapath] table at all.
        rejects_minimal(&[("[datapath]\ninterfaces = [\"eth0\"]", "")], "datapath.interfaces", "required");
    }

    #[test]
    fn interface_names_are_linux_names() {
        for bad in ["", "a-name-of-16-byt", "eth/0", "eth0:1", "eth 0", "eth\t0", ".", ".."] {
            let text = edit(MINIMAL, &[("[\"eth0\"]", &format!("[\"eth0\", {bad:?}]"))]);
            rejects(&text, "datapath.interfaces[1]", "not a valid interface name");
        }
        let ok = edit(MINIMAL, &[("[\"eth0\"]", "[\"a-name-of-15byt\"]")]);
        assert!(Config::parse(&ok).is_ok());
    }

    #[test]
    fn interfaces_unique() {
        rejects_minimal(
            &[("[\"eth0\"]", "[\"eth0\", \"eth1\", \"eth0\"]")],
            "datapath.interfaces[2]",
            "already listed",
        );
    }

    #[test]
    fn mode_choices() {
        let dsr = datapath("mode = \"dsr\"").replace("port = 8080", "port = 80");
        assert_eq!(Config::parse(&dsr).unwrap().datapath.mode, Mode::Dsr);
        rejects(&datapath("mode = \"tunnel\""), "datapath.mode", "must be one of \"nat\", \"dsr\"");
    }

    #[test]
    fn dsr_backends_listen_on_the_service_port() {
        let text = MINIMAL.replace("[datapath]", "[datapath]\nmode = \"dsr\"");
        rejects(&text, "services[0].backends[0].port", "DSR");
        let ok = text.replace("port = 8080", "port = 80");
        assert!(Config::parse(&ok).is_ok(), "{:?}", Config::parse(&ok).err());

    }

    #[test]
    fn xdp_mode_choices() {
        for ok in ["auto", "native", "skb"] {
            assert!(Config::parse(&datapath(&format!("xdp_mode = \"{ok}\""))).is_ok());
        }
        rejects(&datapath("xdp_mode = \"driver\""), "datapath.xdp_mode", "\"auto\", \"native\", \"skb\"");
    }

    #[test]
    fn affinity_entries_range() {
        rejects(
            &datapath("affinity_entries = 1023"),
            "datapath.affinity_entries",
            "must be 1024..=134217728, got 1023",
        );
        rejects(&datapath("affinity_entries = 134217729"), "datapath.affinity_entries", "got 134217729");
        assert!(Config::parse(&datapath("affinity_entries = 1024")).is_ok());
        assert!(Config::parse(&datapath("affinity_entries = 134217728")).is_ok());
    }

    #[test]
    fn pin_path_and_socket_absolute() {
        rejects(&datapath("pin_path = \"bpf/lb\""), "datapath.pin_path", "absolute path");
        rejects(&format!("{MINIMAL}\n[control]\nsocket = \"lb.sock\""), "control.socket", "absolute path");
    }

    #[test]
    fn max_services_range() {
        rejects(&datapath("max_services = 0"), "datapath.max_services", "must be 1..=4096, got 0");
        rejects(&datapath("max_services = 4097"), "datapath.max_services", "got 4097");
    }

    #[test]
    fn max_backends_range() {
        rejects(&datapath("max_backends = 0"), "datapath.max_backends", "must be 1..=65536, got 0");
        rejects(&datapath("max_backends = 65537"), "datapath.max_backends", "got 65537");
    }

    #[test]
    fn maglev_table_size_prime_in_range_and_bounded_memory() {
        rejects(&datapath("maglev_table_size = 65536"), "datapath.maglev_table_size", "65521 and 65537");
        rejects(&datapath("maglev_table_size = 5"), "datapath.maglev_table_size", "must be 7..=1000003, got 5");
        rejects(&datapath("maglev_table_size = 1000033"), "datapath.maglev_table_size", "got 1000033");
        assert!(Config::parse(&datapath("maglev_table_size = 7")).is_ok());
        // 4096 services * 2 * 65537 * 4 bytes is 2 GiB.
        rejects(&datapath("max_services = 4096"), "datapath.maglev_table_size", "1 GiB");
        assert!(Config::parse(&datapath("max_services = 1024")).is_ok());
        assert!(Config::parse(&datapath("maglev_table_size = 1000003\nmax_services = 134")).is_ok());
    }

    #[test]
    fn hash_seed_is_u32() {
        rejects(&datapath("hash_seed = -1"), "datapath.hash_seed", "must be 0..=4294967295, got -1");
        rejects(&datapath("hash_seed = 4294967296"), "datapath.hash_seed", "got 4294967296");
    }

    // ---- control

    #[test]
    fn metrics_is_a_socket_address() {
        let ok = Config::parse(&format!("{MINIMAL}\n[control]\nmetrics = \"[::1]:9940\"")).unwrap();
        assert_eq!(ok.control.metrics, Some("[::1]:9940".parse().unwrap()));
        let off = Config::parse(&format!("{MINIMAL}\n[control]\nmetrics = \"off\"")).unwrap();
        assert_eq!(off.control.metrics, None);
        rejects(&format!("{MINIMAL}\n[control]\nmetrics = \"localhost\""), "control.metrics", "not an address:port");
    }

    // ---- services

    #[test]
    fn service_required_fields() {
        rejects_minimal(&[("name = \"web\"\n", "")], "services[0].name", "required");
        rejects_minimal(&[("vip = \"10.0.0.100\"\n", "")], "services[0].vip", "required");
        rejects_minimal(&[("port = 80\n", "")], "services[0].port", "required");
    }

    #[test]
    fn service_name_charset_and_length() {
        for bad in ["", "web site", "web/1", "wéb", &"x".repeat(65)] {
            rejects_minimal(&[("name = \"web\"", &format!("name = {bad:?}"))], "services[0].name", "not a valid name");
        }
        assert!(Config::parse(&edit(MINIMAL, &[("\"web\"", &format!("\"A-z_0.9{}\"", "x".repeat(57)))])).is_ok());
    }

    #[test]
    fn service_names_unique() {
        rejects(
            &edit(&two_services(""), &[("name = \"dns\"", "name = \"web\"")]),
            "services[1].name",
            "already the name of services[0]",
        );
    }

    #[test]
    fn vip_unicast_only() {
        rejects_minimal(&[("10.0.0.100", "10.0.0")], "services[0].vip", "not an IP address");
        rejects_minimal(&[("10.0.0.100", "::")], "services[0].vip", "unspecified");
        rejects_minimal(&[("10.0.0.100", "ff02::1")], "services[0].vip", "multicast");
        rejects_minimal(&[("10.0.0.100", "::ffff:10.0.0.100")], "services[0].vip", "IPv4-mapped");
        rejects_minimal(&[("10.0.0.100", "0.0.0.0")], "services[0].vip", "unspecified");
        rejects_minimal(&[("10.0.0.100", "224.0.0.1")], "services[0].vip", "multicast");
        rejects_minimal(&[("10.0.0.100", "255.255.255.255")], "services[0].vip", "broadcast");
    }

    #[test]
    fn service_port_range() {
        rejects_minimal(&[("port = 80", "port = 0")], "services[0].port", "must be 1..=65535, got 0");
        rejects_minimal(&[("port = 80", "port = 65536")], "services[0].port", "got 65536");
    }

    #[test]
    fn protocol_choices() {
        rejects(&service("protocol = \"sctp\""), "services[0].protocol", "\"tcp\", \"udp\"");
    }

    #[test]
    fn vip_port_protocol_unique() {
        let same =
            edit(&two_services(""), &[("10.0.0.53", "10.0.0.100"), ("port = 53", "port = 80"), ("\"udp\"", "\"tcp\"")]);
        rejects(&same, "services[1].vip", "10.0.0.100:80/tcp is already the address of services[0] (\"web\")");
        // The same VIP and port over another protocol is another service.
        let other_proto = edit(&two_services(""), &[("10.0.0.53", "10.0.0.100"), ("port = 53", "port = 80")]);
        assert!(Config::parse(&other_proto).is_ok());
    }

    #[test]
    fn affinity_fields() {
        let aff = |l: &str| service(&format!("[services.affinity]\n{l}"));
        rejects(&aff("timeout = \"0s\""), "services[0].affinity.timeout", "more than 0");
        rejects(&aff("timeout = \"31days\""), "services[0].affinity.timeout", "at most 30 days");
        rejects(&aff("timeout = \"soon\""), "services[0].affinity.timeout", "not a duration");
        assert!(Config::parse(&aff("timeout = \"30days\"")).is_ok());
        rejects(&aff("ipv4_prefix = 33"), "services[0].affinity.ipv4_prefix", "must be 0..=32, got 33");
        rejects(&aff("ipv6_prefix = 129"), "services[0].affinity.ipv6_prefix", "must be 0..=128, got 129");
        assert!(Config::parse(&aff("ipv4_prefix = 0\nipv6_prefix = 128")).is_ok());
    }

    #[test]
    fn health_fields() {
        let h = |l: &str| service(&format!("[services.health]\n{l}"));
        rejects(&h("kind = \"icmp\""), "services[0].health.kind", "\"tcp\", \"http\", \"none\"");
        rejects(&h("path = \"healthz\""), "services[0].health.path", "must start with '/'");
        rejects(&h("path = \"/a b\""), "services[0].health.path", "no whitespace");
        rejects(&h("host = \"\""), "services[0].health.host", "non-empty");
        rejects(&h("interval = \"9ms\""), "services[0].health.interval", "at least 10ms");
        rejects(&h("interval = \"often\""), "services[0].health.interval", "not a duration");
        rejects(&h("timeout = \"0s\""), "services[0].health.timeout", "more than 0");
        rejects(&h("interval = \"1s\"\ntimeout = \"2s\""), "services[0].health.timeout", "longer than health.interval");
        rejects(&h("rise = 0"), "services[0].health.rise", "must be 1..=100, got 0");
        rejects(&h("fall = 101"), "services[0].health.fall", "must be 1..=100, got 101");
        let ok = Config::parse(&h("kind = \"none\"\ninterval = \"10ms\"\ntimeout = \"10ms\"\nrise = 100\nfall = 1"))
            .unwrap();
        assert_eq!(ok.services[0].health.kind, HealthKind::None);
    }

    // ---- backends

    #[test]
    fn at_least_one_backend() {
        rejects_minimal(
            &[("[[services.backends]]\naddress = \"10.1.0.11\"\nport = 8080\n", "")],
            "services[0].backends",
            "at least one",
        );
    }

    #[test]
    fn backend_required_fields() {
        rejects_minimal(&[("address = \"10.1.0.11\"\n", "")], "services[0].backends[0].address", "required");
        rejects_minimal(&[("port = 8080", "")], "services[0].backends[0].port", "required");
    }

    #[test]
    fn backend_address_unicast_only() {
        rejects_minimal(&[("10.1.0.11", "fd00::11")], "services[0].backends[0].address", "is IPv6 but the service's vip");
        rejects_minimal(&[("10.1.0.11", "backend1")], "services[0].backends[0].address", "not an IP address");
        rejects_minimal(&[("10.1.0.11", "0.0.0.0")], "services[0].backends[0].address", "unspecified");
        rejects_minimal(&[("10.1.0.11", "239.1.1.1")], "services[0].backends[0].address", "multicast");
        rejects_minimal(&[("10.1.0.11", "255.255.255.255")], "services[0].backends[0].address", "broadcast");
    }

    #[test]
    fn backend_port_and_weight_ranges() {
        rejects_minimal(&[("port = 8080", "port = 0")], "services[0].backends[0].port", "must be 1..=65535, got 0");
        rejects_minimal(&[("port = 8080", "port = 70000")], "services[0].backends[0].port", "got 70000");
        rejects(&backend("weight = 0"), "services[0].backends[0].weight", "must be 1..=65535, got 0");
        rejects(&backend("weight = 65536"), "services[0].backends[0].weight", "got 65536");
    }

    #[test]
    fn backend_is_not_a_vip() {
        // A backend of `dns` at the VIP of `web`.
        let text = edit(&two_services(""), &[("10.1.0.21", "10.0.0.100")]);
        rejects(&text, "services[1].backends[0].address", "is the VIP of services[0] (\"web\")");
        // Its own VIP, too.
        rejects_minimal(&[("10.1.0.11", "10.0.0.100")], "services[0].backends[0].address", "is the VIP of services[0]");
    }

    #[test]
    fn backends_unique_within_a_service() {
        rejects(
            &two_services("").replacen("10.1.0.22", "10.1.0.21", 1),
            "services[1].backends[1]",
            "already listed as backends[0]",
        );
        // Same address, another port: fine.
        assert!(
            Config::parse(&two_services("").replacen("10.1.0.22", "10.1.0.21", 1).replacen(
                "port = 5353",
                "port = 5354",
                1
            ))
            .is_ok()
        );
    }

    #[test]
    fn backend_endpoint_not_shared_between_services() {
        // dns's first backend becomes web's backend endpoint, and both services use TCP.
        let text = edit(
            &two_services(""),
            &[("\"udp\"", "\"tcp\""), ("10.1.0.21\"\nport = 5353", "10.1.0.11\"\nport = 8080")],
        );
        rejects(&text, "services[1].backends[0]", "ambiguous");
        // Over different protocols, replies are told apart.
        let text = edit(&two_services(""), &[("10.1.0.21\"\nport = 5353", "10.1.0.11\"\nport = 8080")]);
        assert!(Config::parse(&text).is_ok());
    }

    // ---- capacities

    #[test]
    fn number_of_services_bounded() {
        let text = edit(&two_services(""), &[("interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\nmax_services = 1")]);
        rejects(&text, "services", "2 services exceed datapath.max_services = 1");
    }

    #[test]
    fn total_backends_bounded() {
        let text = edit(&two_services(""), &[("interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\nmax_backends = 2")]);
        rejects(&text, "services", "3 backends in total exceed datapath.max_backends = 2");
    }

    #[test]
    fn backends_fit_the_maglev_table() {
        let mut text = datapath("maglev_table_size = 7");
        for i in 0..7 {
            text.push_str(&format!("\n[[services.backends]]\naddress = \"10.1.1.{i}\"\nport = 80\n"));
        }
        rejects(&text, "services[0].backends", "8 backends do not fit");
    }

    // ---- all at once

    #[test]
    fn reports_every_error() {
        let text = r#"
[datapath]
interfaces = ["eth0", "eth0"]
mode = "tunnel"
maglev_table_size = 100

[control]
metrics = "nowhere"

[[services]]
name = "bad name"
vip = "::"
port = 0

[services.health]
rise = 0

[[services.backends]]
address = "10.1.0.11"
port = 0
weight = 0

[[services]]
name = "ok"
vip = "10.0.0.1"
port = 80

[[services.backends]]
address = "10.1.0.12"
port = 80

[[services.backends]]
address = "10.1.0.12"
port = 80
"#;
        let errs = Config::parse(text).unwrap_err();
        let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "datapath.interfaces[1]",
                "datapath.mode",
                "datapath.maglev_table_size",
                "control.metrics",
                "services[0].name",
                "services[0].vip",
                "services[0].port",
                "services[0].health.rise",
                "services[0].backends[0].port",
                "services[0].backends[0].weight",
                "services[1].backends[1]",
            ],
            "\n{errs}"
        );
        // Display: one "field: message" per line.
        let shown = errs.to_string();
        assert_eq!(shown.lines().count(), fields.len());
        assert!(shown.lines().next().unwrap().starts_with("datapath.interfaces[1]: "));
    }

    #[test]
    fn independent_problems_all_appear_in_one_pass() {
        let errs = Config::parse(INDEPENDENT_MISTAKES).unwrap_err();
        let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                // The shape of the file.
                "services[2].vipp",
                "services[2].port",
                // Each service on its own: a required field of the wrong type is not also missing.
                "services[0].backends[0].address",
                "services[1].backends[0].port",
                "services[2].vip",
                // Across services, among the values that passed, wherever the other mistakes are.
                "services[0].backends[0].port",
                "services[0].backends[1].port",
                "services[1].backends[1].port",
                "services[1].name",
                "services[1].vip",
                "services[1].backends[0].address",
                "services[1].backends[1]",
            ],
            "\n{errs}"
        );
        let shown = errs.to_string();
        for needle in [
            "services[2].vipp: unknown field; expected one of name, vip, port, protocol, affinity, health, balance, backends",
            "services[2].port: must be an integer, got a string \"53\"",
            "services[0].backends[0].address: fd00::11 is IPv6 but the service's vip 10.0.0.100 is IPv4",
            "services[1].backends[0].port: must be 1..=65535, got 0",
            "services[2].vip: is required",
            "services[0].backends[0].port: is 8080 but the service port is 80: in DSR mode",
            "services[1].name: \"web\" is already the name of services[0]",
            "services[1].vip: 10.0.0.100:80/tcp is already the address of services[0] (\"web\")",
            "services[1].backends[0].address: 10.0.0.100 is the VIP of services[0] (\"web\")",
            "services[1].backends[1]: 10.1.0.12:8080/tcp is also services[0].backends[1]",
        ] {
            assert!(shown.contains(needle), "missing `{needle}` in:\n{shown}");
        }
    }

    #[test]
    fn a_failed_value_takes_part_in_no_other_check() {
        // The duplicate backend is reported as a duplicate, not again as a shared endpoint or a VIP.
        let text = edit(
            &two_services(""),
            &[
                ("\"udp\"", "\"tcp\""),
                ("10.1.0.21\"\nport = 5353", "10.1.0.11\"\nport = 8080"),
                ("10.1.0.22", "10.1.0.11"),
            ],
        );
        let text = text.replacen("port = 5353", "port = 8080", 1);
        let errs = errors(&text);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["services[1].backends[1]", "services[1].backends[0]"], "{}", ConfigErrors(errs.clone()));
        // A name or VIP that failed is not compared with the others.
        let text = edit(&two_services(""), &[("name = \"dns\"", "name = \"web \""), ("10.0.0.53", "10.0.0.100.1")]);
        let fields: Vec<String> = errors(&text).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["services[1].name", "services[1].vip"]);
        // An address of the wrong family is not also "the VIP of" an IPv6 service.
        let text = edit(
            &two_services(""),
            &[
                ("10.0.0.53", "fd00::53"),
                ("10.1.0.21", "fd00::21"),
                ("10.1.0.22", "fd00::22"),
                ("10.1.0.11", "fd00::53"),
            ],
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
        assert_eq!(errs[0].field, "services[0].backends[0].address");
        assert!(errs[0].message.contains("is IPv6 but the service's vip"), "{}", errs[0]);
    }

    #[test]
    fn ipv6_services() {
        let c = Config::parse(
            r#"[datapath]
interfaces = ["eth0"]
[[services]]
name = "web6"
vip = "2001:db8::100"
port = 80
[services.affinity]
ipv6_prefix = 56
[[services.backends]]
address = "2001:db8:1::11"
port = 8080
"#,
        )
        .unwrap();
        assert_eq!(c.services[0].vip, "2001:db8::100".parse::<IpAddr>().unwrap());
        assert_eq!(c.services[0].backends[0].address, "2001:db8:1::11".parse::<IpAddr>().unwrap());
        assert_eq!(c.services[0].affinity.ipv6_prefix, 56);
    }

    #[test]
    fn max_age_and_backend_state() {
        let c = Config::parse(&format!(
            "{}\n[services.affinity]\nmax_age = \"2h\"\n[[services.backends]]\naddress = \"10.1.0.12\"\nport = 8080\nstate = \"draining\"\n",
            r#"[datapath]
interfaces = ["eth0"]
[[services]]
name = "web"
vip = "10.0.0.100"
port = 80
[[services.backends]]
address = "10.1.0.11"
port = 8080"#
        ))
        .unwrap();
        assert_eq!(c.services[0].affinity.max_age, Some(Duration::from_secs(7200)));
        assert_eq!(c.services[0].backends[0].state, BackendState::Active);
        assert_eq!(c.services[0].backends[1].state, BackendState::Draining);
        let bad = Config::parse(
            r#"[datapath]
interfaces = ["eth0"]
[[services]]
name = "web"
vip = "10.0.0.100"
port = 80
[services.affinity]
max_age = "0s"
[[services.backends]]
address = "10.1.0.11"
port = 8080
state = "off"
"#,
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("services[0].affinity.max_age: must be more than 0"), "{bad}");
        assert!(bad.contains("services[0].backends[0].state: must be one of \"active\", \"draining\""), "{bad}");
    }

    #[test]
    fn balance_fields() {
        let c = Config::parse(&service("[services.balance]\nload_bound = 1.25\nload = \"bytes\"\nslow_start = \"30s\"\nhot_prefix_share = 0.2")).unwrap();
        let b = &c.services[0].balance;
        assert_eq!(
            (b.load_bound, b.load, b.slow_start, b.hot_prefix_share),
            (Some(1.25), LoadKind::Bytes, Some(Duration::from_secs(30)), Some(0.2))
        );
        assert!(Config::parse(MINIMAL).unwrap().services[0].balance.is_off(), "off when absent");
        assert_eq!(Config::parse(&service("[services.balance]\nload_bound = 2")).unwrap().services[0].balance.load_bound, Some(2.0));
        rejects(&service("[services.balance]\nload_bound = 1.0"), "services[0].balance.load_bound", "more than 1");
        rejects(&service("[services.balance]\nhot_prefix_share = 1.5"), "services[0].balance.hot_prefix_share", "at most 1");
        rejects(&service("[services.balance]\nload = \"cpu\""), "services[0].balance.load", "\"packets\", \"bytes\", \"pins\"");
        rejects(&service("[services.balance]\nslow_start = \"0s\""), "services[0].balance.slow_start", "more than 0");
        rejects(&service("[services.balance]\nload_bound = \"high\""), "services[0].balance.load_bound", "must be a number");
        rejects(&service("[services.balance]\nbound = 1.2"), "services[0].balance.bound", "unknown field");
    }
}
