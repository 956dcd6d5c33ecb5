//! Property tests for every userspace input parser: the config file (`Config::parse`) and the
//! control API's inputs (`POST /drain` bodies, the backend `ADDRESS:PORT`, and the CLI's parsing of
//! the daemon's HTTP answers).
//!
//! Case counts keep the whole file at a few seconds in a debug build; for a longer soak set
//! `PROPTEST_CASES` (it then applies to every property). A failure prints the shrunk input, and
//! for config properties the TOML text itself.

use std::{
    collections::HashSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use lb::{
    config::{
        AffinityConfig, AnnounceConfig, BackendConfig, BackendState, Config, ConfigErrors, ControlConfig, DEFAULT_PIN_PATH,
        DEFAULT_SOCKET, DatapathConfig, HealthConfig, HealthKind, Mode, Protocol, ServiceConfig, XdpMode,
    },
    api::{DrainRequest, parse_backend},
};
use proptest::{
    collection::vec,
    option,
    prelude::*,
    sample::{Index, select},
    strategy::Union,
    test_runner::TestCaseError,
};
use serde_json::Value;

/// `cases` cases, unless `PROPTEST_CASES` asks for another number.
fn cases(cases: u32) -> ProptestConfig {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(cases)
    }
}

// ================================================================================================
// Rendering configs as TOML.

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c < ' ' || c == '\x7f' => {
                let _ = write!(o, "\\u{:04X}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn q_array(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "))
}

fn q_duration(d: Duration) -> String {
    q(&humantime::format_duration(d).to_string())
}

/// One TOML table: its header line (none for the root), the config path of its fields
/// (`services[0].health`) and its `key = value` lines, values as raw TOML.
#[derive(Clone, Debug)]
struct Table {
    header: String,
    path: String,
    entries: Vec<(String, String)>,
}

impl Table {
    fn new(header: &str, path: &str) -> Self {
        Self { header: header.to_owned(), path: path.to_owned(), entries: Vec::new() }
    }

    /// Adds `key = value` unless `omit` (callers pass `value is the default && coin()`).
    fn put(&mut self, key: &str, value: String, omit: bool) {
        if !omit {
            self.entries.push((key.to_owned(), value));
        }
    }
}

#[derive(Clone, Debug)]
struct Doc(Vec<Table>);

impl Doc {
    fn text(&self) -> String {
        let mut o = String::new();
        for t in &self.0 {
            if !t.header.is_empty() {
                o.push_str(&t.header);
                o.push('\n');
            }
            for (k, v) in &t.entries {
                let _ = writeln!(o, "{k} = {v}");
            }
            o.push('\n');
        }
        o
    }

    /// Sets (or with `None` removes) `key` in the table whose path is `path`.
    fn set(&mut self, path: &str, key: &str, value: Option<String>) {
        let t = self.0.iter_mut().find(|t| t.path == path).unwrap_or_else(|| panic!("test bug: no table {path}"));
        t.entries.retain(|(k, _)| k != key);
        if let Some(v) = value {
            t.entries.push((key.to_owned(), v));
        }
    }
}

/// A deterministic coin for "omit this default?" choices.
fn coin(seed: u64) -> impl FnMut() -> bool {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x & 1 == 1
    }
}

/// Renders `c` as the TOML that should parse back to it. Every table is written (even when
/// empty); a field holding its default is left out when `omit()` says so.
fn doc_of(c: &Config, mut omit: impl FnMut() -> bool) -> Doc {
    let mut tables = Vec::new();
    let d = &c.datapath;
    let mut t = Table::new("[datapath]", "datapath");
    t.put("interfaces", q_array(&d.interfaces), false);
    t.put("mode", q(d.mode.as_str()), d.mode == Mode::Nat && omit());
    t.put("xdp_mode", q(d.xdp_mode.as_str()), d.xdp_mode == XdpMode::Auto && omit());
    t.put(
        "affinity_entries",
        d.affinity_entries.to_string(),
        d.affinity_entries == lb_common::DEFAULT_AFFINITY_ENTRIES && omit(),
    );
    t.put("flow_entries", d.flow_entries.to_string(), d.flow_entries == lb_common::DEFAULT_FLOW_ENTRIES && omit());
    t.put(
        "max_new_pins_per_cpu",
        d.max_new_pins_per_cpu.to_string(),
        d.max_new_pins_per_cpu == lb_common::DEFAULT_NEW_PINS_PER_CPU && omit(),
    );
    let pin = d.pin_path.to_str().expect("generated paths are UTF-8");
    t.put("pin_path", q(pin), pin == DEFAULT_PIN_PATH && omit());
    t.put("max_services", d.max_services.to_string(), d.max_services == lb_common::DEFAULT_MAX_SERVICES && omit());
    t.put("max_backends", d.max_backends.to_string(), d.max_backends == lb_common::DEFAULT_MAX_BACKENDS && omit());
    t.put(
        "maglev_table_size",
        d.maglev_table_size.to_string(),
        d.maglev_table_size == lb_common::DEFAULT_MAGLEV_M && omit(),
    );
    t.put("hash_seed", d.hash_seed.to_string(), d.hash_seed == 0 && omit());
    tables.push(t);

    let mut t = Table::new("[control]", "control");
    let socket = c.control.socket.to_str().expect("generated paths are UTF-8");
    t.put("socket", q(socket), socket == DEFAULT_SOCKET && omit());
    // Unset means the loopback default; "off" means none.
    match c.control.metrics {
        Some(m) => t.put("metrics", q(&m.to_string()), m.to_string() == lb::config::DEFAULT_METRICS && omit()),
        None => t.put("metrics", q("off"), false),
    }
    tables.push(t);

    if let Some(a) = &c.announce {
        let mut t = Table::new("[announce]", "announce");
        t.put("table", a.table.to_string(), false);
        t.put("grace", q_duration(a.grace), a.grace == lb::config::DEFAULT_ANNOUNCE_GRACE && omit());
        tables.push(t);
    }

    let (da, dh) = (AffinityConfig::default(), HealthConfig::default());
    for (i, s) in c.services.iter().enumerate() {
        let p = format!("services[{i}]");
        let mut t = Table::new("[[services]]", &p);
        t.put("name", q(&s.name), false);
        t.put("vip", q(&s.vip.to_string()), false);
        t.put("port", s.port.to_string(), false);
        t.put("protocol", q(s.protocol.as_str()), s.protocol == Protocol::Tcp && omit());
        tables.push(t);

        let a = &s.affinity;
        let mut t = Table::new("[services.affinity]", &format!("{p}.affinity"));
        t.put("timeout", q_duration(a.timeout), a.timeout == da.timeout && omit());
        t.put("ipv4_prefix", a.ipv4_prefix.to_string(), a.ipv4_prefix == da.ipv4_prefix && omit());
        t.put("ipv6_prefix", a.ipv6_prefix.to_string(), a.ipv6_prefix == da.ipv6_prefix && omit());
        if let Some(m) = a.max_age {
            t.put("max_age", q_duration(m), false);
        }
        tables.push(t);

        let h = &s.health;
        let mut t = Table::new("[services.health]", &format!("{p}.health"));
        t.put("kind", q(h.kind.as_str()), h.kind == dh.kind && omit());
        t.put("path", q(&h.path), h.path == dh.path && omit());
        if let Some(host) = &h.host {
            t.put("host", q(host), false);
        }
        t.put("interval", q_duration(h.interval), h.interval == dh.interval && omit());
        t.put("timeout", q_duration(h.timeout), h.timeout == dh.timeout && omit());
        t.put("rise", h.rise.to_string(), h.rise == dh.rise && omit());
        t.put("fall", h.fall.to_string(), h.fall == dh.fall && omit());
        tables.push(t);

        for (j, b) in s.backends.iter().enumerate() {
            let mut t = Table::new("[[services.backends]]", &format!("{p}.backends[{j}]"));
            t.put("address", q(&b.address.to_string()), false);
            t.put("port", b.port.to_string(), false);
            t.put("weight", b.weight.to_string(), b.weight == 100 && omit());
            t.put("state", q(b.state.as_str()), b.state == BackendState::Active && omit());
            tables.push(t);
        }
    }
    Doc(tables)
}

fn render(c: &Config) -> String {
    doc_of(c, || false).text()
}

// ================================================================================================
// What every outcome of `Config::parse` must look like.

/// Every table of the config, indices written as `[]` (the document is "").
const TABLE_PATHS: &[&str] = &[
    "",
    "datapath",
    "control",
    "announce",
    "services[]",
    "services[].affinity",
    "services[].health",
    "services[].backends[]",
];

/// The types a value of the wrong type is told to be (`must be an integer, got a string "80"`).
const TYPES: &[&str] = &["a string", "an integer", "a table", "an array of strings", "an array of tables"];

/// Every field path an error may name, indices written as `[]`, besides unknown fields and the
/// table of a syntax error.
const FIELD_PATHS: &[&str] = &[
    "config",
    "datapath",
    "control",
    "services[]",
    "services[].affinity",
    "services[].health",
    "datapath.interfaces",
    "datapath.interfaces[]",
    "datapath.mode",
    "datapath.xdp_mode",
    "datapath.affinity_entries",
    "datapath.flow_entries",
    "datapath.max_new_pins_per_cpu",
    "datapath.pin_path",
    "datapath.max_services",
    "datapath.max_backends",
    "datapath.maglev_table_size",
    "datapath.hash_seed",
    "control.socket",
    "control.metrics",
    "announce",
    "announce.table",
    "announce.grace",
    "services",
    "services[].name",
    "services[].vip",
    "services[].port",
    "services[].protocol",
    "services[].affinity.timeout",
    "services[].affinity.ipv4_prefix",
    "services[].affinity.ipv6_prefix",
    "services[].affinity.max_age",
    "services[].health.kind",
    "services[].health.path",
    "services[].health.host",
    "services[].health.interval",
    "services[].health.timeout",
    "services[].health.rise",
    "services[].health.fall",
    "services[].backends",
    "services[].backends[]",
    "services[].backends[].address",
    "services[].backends[].port",
    "services[].backends[].weight",
    "services[].backends[].state",
];

/// `services[12].backends[0].port` -> `services[].backends[].port`.
fn field_template(field: &str) -> String {
    let mut o = String::new();
    let mut in_index = false;
    for c in field.chars() {
        match c {
            '[' => {
                in_index = true;
                o.push(c);
            }
            ']' => {
                in_index = false;
                o.push(c);
            }
            c if in_index && c.is_ascii_digit() => {}
            c => o.push(c),
        }
    }
    o
}

/// Parses `text` and checks the outcome is well formed: a config that survives a render/parse
/// round trip, or a non-empty list of errors each naming a known field path (or an unknown field
/// of a known table) with a message; a syntax error comes alone, and a value of the wrong type
/// is the only error on its field.
fn check_parse(text: &str) -> Result<Result<Config, ConfigErrors>, TestCaseError> {
    let r = Config::parse(text);
    match &r {
        Ok(c) => {
            let again = render(c);
            match Config::parse(&again) {
                Ok(c2) => prop_assert_eq!(&c2, c, "re-rendered config parses differently:\n{}", again),
                Err(e) => prop_assert!(
                    false,
                    "re-rendered config is rejected:\n{e}\n--- re-rendered:\n{again}\n--- from:\n{text}"
                ),
            }
        }
        Err(ConfigErrors(errs)) => {
            prop_assert!(!errs.is_empty(), "empty error list for:\n{}", text);
            for e in errs {
                prop_assert!(!e.field.is_empty(), "error without a field: {:?}\n--- config:\n{}", e, text);
                prop_assert!(!e.message.trim().is_empty(), "error without a message: {:?}\n--- config:\n{}", e, text);
                let t = field_template(&e.field);
                let table = t.rsplit_once('.').map_or("", |(table, _)| table);
                prop_assert!(
                    FIELD_PATHS.contains(&t.as_str())
                        || e.message.starts_with("unknown field; expected one of ") && TABLE_PATHS.contains(&table)
                        || e.message.starts_with("TOML syntax error at line "),
                    "error names no known field: {}\n--- config:\n{}",
                    e,
                    text
                );
                if TYPES.iter().any(|ty| e.message.starts_with(&format!("must be {ty}, got "))) {
                    prop_assert!(
                        errs.iter().filter(|o| o.field == e.field).count() == 1,
                        "a wrong type is the only error on its field:\n{}\n--- config:\n{}",
                        ConfigErrors(errs.clone()),
                        text
                    );
                }
            }
            if errs.iter().any(|e| e.message.starts_with("TOML syntax error")) {
                prop_assert_eq!(
                    errs.len(),
                    1,
                    "a TOML syntax error comes alone:\n{}\n--- config:\n{}",
                    ConfigErrors(errs.clone()),
                    text
                );
            }
        }
    }
    Ok(r)
}

/// [`check_parse`], for properties that only judge the outcome's shape.
fn well_formed(text: &str) -> Result<(), TestCaseError> {
    check_parse(text).map(drop)
}

// ================================================================================================
// Valid-by-construction configs.

fn is_prime(n: u32) -> bool {
    n >= 2 && (2u64..).take_while(|d| d * d <= u64::from(n)).all(|d| u64::from(n) % d != 0)
}

const MAX_MAGLEV_BYTES: u64 = 1 << 30;

/// Whether the config accepts `a` as a VIP or backend address on its own.
fn is_unicast(a: IpAddr) -> bool {
    !a.is_unspecified()
        && !a.is_multicast()
        && !matches!(a, IpAddr::V4(v4) if v4.is_broadcast())
        && !matches!(a, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

/// A unicast address of one family (IPv6 if `v6`).
fn unicast(v6: bool) -> BoxedStrategy<IpAddr> {
    let s = if v6 {
        prop_oneof![
            3 => any::<Ipv6Addr>().prop_filter("IPv4-mapped", |a| a.to_ipv4_mapped().is_none()).prop_map(IpAddr::V6),
            // A small pool, so services and backends collide and the generator must resolve it.
            1 => (1u16..=4).prop_map(|x| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, x))),
        ]
        .boxed()
    } else {
        prop_oneof![
            3 => any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
            1 => (1u8..=4).prop_map(|x| IpAddr::V4(Ipv4Addr::new(10, 0, 0, x))),
        ]
        .boxed()
    };
    s.prop_filter("unicast", |a| is_unicast(*a)).boxed()
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![3 => 1u16..=65535, 1 => 80u16..=81]
}

/// Linux interface names: 1 to 15 bytes, no '/', ':', whitespace or control characters.
fn ifname() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z][a-z0-9-]{0,6}(\\.[0-9]{1,4})?",
        1 => "[^/:\\s\\p{Cc}]{1,5}",
    ]
    .prop_filter("a valid interface name", |s| (1..=15).contains(&s.len()) && s != "." && s != "..")
}

fn abs_path() -> impl Strategy<Value = String> {
    prop_oneof!["/[a-z0-9/._-]{0,30}", "/(?s:.){0,10}"]
}

/// Durations in `lo..=hi`: arbitrary, and whole milliseconds and seconds as people write them.
fn duration(lo: Duration, hi: Duration) -> BoxedStrategy<Duration> {
    let (lo, hi) = (lo.as_nanos() as u64, hi.as_nanos() as u64);
    let mut s = vec![(lo..=hi).prop_map(Duration::from_nanos).boxed()];
    if lo.div_ceil(1_000_000) <= hi / 1_000_000 {
        s.push((lo.div_ceil(1_000_000)..=hi / 1_000_000).prop_map(Duration::from_millis).boxed());
    }
    if lo.div_ceil(1_000_000_000) <= hi / 1_000_000_000 {
        s.push((lo.div_ceil(1_000_000_000)..=hi / 1_000_000_000).prop_map(Duration::from_secs).boxed());
    }
    Union::new(s).boxed()
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn valid_affinity() -> impl Strategy<Value = AffinityConfig> {
    (
        prop_oneof![Just(AffinityConfig::default().timeout), duration(Duration::from_nanos(1), DAY * 30)],
        prop_oneof![Just(32u8), 0u8..=32],
        prop_oneof![Just(64u8), 0u8..=128],
        option::of(duration(Duration::from_nanos(1), DAY * 365)),
    )
        .prop_map(|(timeout, ipv4_prefix, ipv6_prefix, max_age)| AffinityConfig {
            timeout,
            ipv4_prefix,
            ipv6_prefix,
            max_age,
        })
}

fn valid_health() -> impl Strategy<Value = HealthConfig> {
    let d = HealthConfig::default();
    (
        select(vec![HealthKind::Tcp, HealthKind::Http, HealthKind::None]),
        prop_oneof![Just("/".to_owned()), "/[^\\s\\p{Cc}]{0,20}"],
        option::of("[^\\s\\p{Cc}]{1,20}"),
        prop_oneof![Just(d.interval), duration(Duration::from_millis(10), Duration::from_secs(3600))],
    )
        .prop_flat_map(move |(kind, path, host, interval)| {
            let timeout = if d.timeout <= interval {
                prop_oneof![Just(d.timeout), duration(Duration::from_nanos(1), interval)].boxed()
            } else {
                duration(Duration::from_nanos(1), interval)
            };
            (
                Just((kind, path, host, interval)),
                timeout,
                prop_oneof![Just(2u32), 1u32..=100],
                prop_oneof![Just(3u32), 1u32..=100],
            )
        })
        .prop_map(|((kind, path, host, interval), timeout, rise, fall)| HealthConfig {
            kind,
            path,
            host,
            interval,
            timeout,
            rise,
            fall,
        })
}

/// A backend valid on its own, of the VIP's family (IPv6 if `v6`).
fn valid_backend(v6: bool) -> impl Strategy<Value = BackendConfig> {
    (
        unicast(v6),
        port(),
        prop_oneof![Just(100u32), 1u32..=65535],
        select(vec![BackendState::Active, BackendState::Draining]),
    )
        .prop_map(|(address, port, weight, state)| BackendConfig { address, port, weight, state })
}

/// A service valid on its own (its name gets a unique suffix in `resolve`): IPv4 or IPv6, its
/// backends of its VIP's family.
fn valid_service() -> impl Strategy<Value = ServiceConfig> {
    any::<bool>()
        .prop_flat_map(|v6| {
            (
                "[A-Za-z0-9_.-]{1,60}",
                unicast(v6),
                port(),
                select(vec![Protocol::Tcp, Protocol::Udp]),
                valid_affinity(),
                valid_health(),
                vec(valid_backend(v6), 1..5),
            )
        })
        .prop_map(|(name, vip, port, protocol, affinity, health, backends)| ServiceConfig {
            name,
            vip,
            port,
            protocol,
            affinity,
            health,
            balance: Default::default(),
            backends,
        })
}

/// Makes independently generated services valid together, dropping what conflicts: unique names
/// and (vip, port, protocol); no backend at any VIP, twice in a service, or shared (same
/// protocol) with an earlier service; no service left without backends.
fn resolve(mut services: Vec<ServiceConfig>) -> Vec<ServiceConfig> {
    for (i, s) in services.iter_mut().enumerate() {
        // The index after the last '-' tells the names apart.
        s.name = format!("{}-{i}", s.name);
    }
    let mut keys = HashSet::new();
    services.retain(|s| keys.insert((s.vip, s.port, s.protocol)));
    let vips: HashSet<IpAddr> = services.iter().map(|s| s.vip).collect();
    let mut endpoints = HashSet::new();
    for s in &mut services {
        let mut own = HashSet::new();
        let proto = s.protocol;
        s.backends.retain(|b| {
            !vips.contains(&b.address)
                && !endpoints.contains(&(b.address, b.port, proto))
                && own.insert((b.address, b.port))
        });
        endpoints.extend(s.backends.iter().map(|b| (b.address, b.port, proto)));
    }
    services.retain(|s| !s.backends.is_empty());
    services
}

fn interfaces() -> impl Strategy<Value = Vec<String>> {
    vec(ifname(), 1..4).prop_map(|mut v| {
        let mut seen = HashSet::new();
        v.retain(|n| seen.insert(n.clone()));
        v
    })
}

fn maglev_size() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(lb_common::DEFAULT_MAGLEV_M),
        select(vec![7u32, 11, 13, 251, 65521, 1_000_003]),
        // The prime at or below a random size.
        (7u32..=1_000_003).prop_map(|n| (7..=n).rev().find(|p| is_prime(*p)).expect("7 is prime")),
    ]
}

fn valid_config() -> impl Strategy<Value = Config> {
    let head = (
        interfaces(),
        select(vec![XdpMode::Auto, XdpMode::Native, XdpMode::Skb]),
        prop_oneof![Just(lb_common::DEFAULT_AFFINITY_ENTRIES), 1024u32..=1 << 27],
        prop_oneof![Just(DEFAULT_PIN_PATH.to_owned()), abs_path()],
        prop_oneof![Just(0u32), any::<u32>()],
        prop_oneof![Just(DEFAULT_SOCKET.to_owned()), abs_path()],
        option::of(any::<SocketAddr>().prop_map(|mut a| {
            // Display does not show the flow label, so it cannot survive a round trip.
            if let SocketAddr::V6(v6) = &mut a {
                v6.set_flowinfo(0);
            }
            a
        })),
    );
    let announce = option::of(
        (prop_oneof![1u32..=252, 256u32..=u32::MAX], 0u64..=60)
            .prop_map(|(table, secs)| AnnounceConfig { table, grace: Duration::from_secs(secs) }),
    );
    (head, vec(valid_service(), 0..4), maglev_size(), announce)
        .prop_flat_map(|(head, services, m, announce)| {
            let services = resolve(services);
            let n = services.len() as u32;
            let total = services.iter().map(|s| s.backends.len() as u32).sum::<u32>();
            // The MAGLEV map is capped at 1 GiB: max_services * 2 tables * words(m) * 8 bytes.
            let cap = (MAX_MAGLEV_BYTES / (2 * 8 * u64::from(lb_common::maglev_words(m)))).min(4096) as u32;
            let lo = n.max(1);
            let max_services = if (lo..=cap).contains(&lb_common::DEFAULT_MAX_SERVICES) {
                prop_oneof![Just(lb_common::DEFAULT_MAX_SERVICES), lo..=cap].boxed()
            } else {
                (lo..=cap).boxed()
            };
            let max_backends = if total <= lb_common::DEFAULT_MAX_BACKENDS {
                prop_oneof![Just(lb_common::DEFAULT_MAX_BACKENDS), total.max(1)..=65536].boxed()
            } else {
                (total.max(1)..=65536).boxed()
            };
            (Just((head, services, m, announce)), max_services, max_backends)
        })
        .prop_map(
            |(
                ((interfaces, xdp_mode, affinity_entries, pin, hash_seed, socket, metrics), services, m, announce),
                max_services,
                max_backends,
            )| {
                Config {
                    datapath: DatapathConfig {
                        interfaces,
                        mode: Mode::Nat,
                        xdp_mode,
                        affinity_entries,
                        flow_entries: affinity_entries,
                        max_new_pins_per_cpu: affinity_entries / 8,
                        pin_path: PathBuf::from(pin),
                        max_services,
                        max_backends,
                        maglev_table_size: m,
                        hash_seed,
                    },
                    control: ControlConfig { socket: PathBuf::from(socket), metrics, journal: Default::default() },
                    services,
                    announce,
                }
            },
        )
}

// ================================================================================================
// Wild configs: mostly the right shape, any values.

#[derive(Clone, Copy, Debug)]
enum Kind {
    Int(i64, i64),
    Prime,
    /// The valid names.
    Choice(&'static [&'static str]),
    Duration,
    Ip,
    SockAddr,
    Path,
    Name,
    /// Health check path and host.
    Text,
    Interfaces,
}

const DATAPATH_KEYS: &[(&str, Kind)] = &[
    ("interfaces", Kind::Interfaces),
    ("mode", Kind::Choice(&["nat"])),
    ("xdp_mode", Kind::Choice(&["auto", "native", "skb"])),
    ("affinity_entries", Kind::Int(1024, 1 << 27)),
    ("flow_entries", Kind::Int(1024, 1 << 27)),
    ("max_new_pins_per_cpu", Kind::Int(0, u32::MAX as i64)),
    ("pin_path", Kind::Path),
    ("max_services", Kind::Int(1, 4096)),
    ("max_backends", Kind::Int(1, 65536)),
    ("maglev_table_size", Kind::Prime),
    ("hash_seed", Kind::Int(0, u32::MAX as i64)),
];
const CONTROL_KEYS: &[(&str, Kind)] = &[("socket", Kind::Path), ("metrics", Kind::SockAddr)];
const SERVICE_KEYS: &[(&str, Kind)] = &[
    ("name", Kind::Name),
    ("vip", Kind::Ip),
    ("port", Kind::Int(1, 65535)),
    ("protocol", Kind::Choice(&["tcp", "udp"])),
];
const AFFINITY_KEYS: &[(&str, Kind)] = &[
    ("timeout", Kind::Duration),
    ("ipv4_prefix", Kind::Int(0, 32)),
    ("ipv6_prefix", Kind::Int(0, 128)),
    ("max_age", Kind::Duration),
];
const HEALTH_KEYS: &[(&str, Kind)] = &[
    ("kind", Kind::Choice(&["tcp", "http", "none"])),
    ("path", Kind::Text),
    ("host", Kind::Text),
    ("interval", Kind::Duration),
    ("timeout", Kind::Duration),
    ("rise", Kind::Int(1, 100)),
    ("fall", Kind::Int(1, 100)),
];
const BACKEND_KEYS: &[(&str, Kind)] = &[
    ("address", Kind::Ip),
    ("port", Kind::Int(1, 65535)),
    ("weight", Kind::Int(1, 65535)),
    ("state", Kind::Choice(&["active", "draining"])),
];

/// Fields a config must set (`port` is required in both tables that have it).
const REQUIRED: &[&str] = &["interfaces", "name", "vip", "port", "address"];

const DURATIONS: &[&str] = &[
    "0s",
    "0",
    "1ns",
    "1ms",
    "9ms",
    "10ms",
    "500ms",
    "1s",
    "2s",
    "30m",
    "1h 30m",
    "30days",
    "30 days",
    "30d",
    "31days",
    "365d",
    "366d",
    "1y",
    "1year 1s",
    "garbage",
    "",
    " ",
    "-1s",
    "1.5s",
    "1e3s",
    "1 fortnight",
    "18446744073709551615s",
    "18446744073709551616s",
    "99999999999999999999999999d",
    "584942417355y",
    "1s1",
    "1 s",
    "s",
    "1µs",
    "1us",
];
const DURATION_UNITS: &[&str] = &[
    "ns", "us", "ms", "s", "sec", "m", "min", "h", "hr", "d", "day", "days", "w", "week", "M", "month", "y", "year",
    "x", "",
];
const IPS: &[&str] = &[
    "0.0.0.0",
    "255.255.255.255",
    "224.0.0.1",
    "239.255.255.255",
    "127.0.0.1",
    "10.0.0.100",
    "10.1.0.11",
    "::",
    "::1",
    "fd00::1",
    "ff02::1",
    "::ffff:10.0.0.1",
    "::ffff:0.0.0.0",
    "2001:db8::1",
    "2001:DB8:0:0:0:0:0:1",
    "fe80::1",
    "ff00::",
    "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "1::2::3",
    "1:2:3:4:5:6:7:8:9",
    "::1.2.3",
    "[2001:db8::1]:80",
    "1.2.3",
    "1.2.3.4.5",
    "01.2.3.4",
    "1.2.3.4:80",
    "256.1.1.1",
    "[::1]",
    "localhost",
    "",
    " 10.0.0.1",
    "10.0.0.1 ",
    "fe80::1%eth0",
];

fn ascii_case(s: &str, upper: bool) -> String {
    if upper { s.to_ascii_uppercase() } else { s.to_owned() }
}

/// Any TOML value of the wrong type for every field.
fn wrong_type() -> BoxedStrategy<String> {
    prop_oneof![
        any::<bool>().prop_map(|b| b.to_string()),
        select(vec!["1.5", "-0.0", "1e300", "inf", "nan", "-inf", "3.0"]).prop_map(str::to_owned),
        Just("1979-05-27T07:32:00Z".to_owned()),
        Just("07:32:00".to_owned()),
        Just("[]".to_owned()),
        Just("[1, 2]".to_owned()),
        Just("[\"a\", 1]".to_owned()),
        Just("{ a = 1 }".to_owned()),
        Just("{}".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "(?s).{0,12}".prop_map(|s| q(&s)),
    ]
    .boxed()
}

fn wild_int(lo: i64, hi: i64) -> BoxedStrategy<String> {
    prop_oneof![
        4 => (lo..=hi).prop_map(|n| n.to_string()),
        2 => select(vec![lo.saturating_sub(1), hi.saturating_add(1), 0, -1, i64::MIN, i64::MAX, lo, hi]).prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        // TOML's other spellings of integers.
        1 => (0..=hi.max(0)).prop_map(|n| format!("0x{n:x}")),
        1 => (lo..=hi).prop_map(|n| format!("{n:+}")),
        1 => Just("1_000".to_owned()),
    ]
    .boxed()
}

fn wild_typed(kind: Kind) -> BoxedStrategy<String> {
    match kind {
        Kind::Int(lo, hi) => wild_int(lo, hi),
        Kind::Prime => prop_oneof![
            wild_int(7, 1_000_003),
            maglev_size().prop_map(|m| m.to_string()),
            (4u32..=500_001).prop_map(|n| (2 * n).to_string()),
        ]
        .boxed(),
        Kind::Choice(names) => prop_oneof![
            4 => (select(names), any::<bool>()).prop_map(|(n, up)| q(&ascii_case(n, up))),
            1 => select(vec!["tunnel", "icmp", "sctp", "off", ""]).prop_map(q),
            1 => "(?s).{0,8}".prop_map(|s| q(&s)),
        ]
        .boxed(),
        Kind::Duration => prop_oneof![
            select(DURATIONS).prop_map(q),
            (any::<u64>(), select(vec!["", " "]), select(DURATION_UNITS))
                .prop_map(|(n, sep, u)| q(&format!("{n}{sep}{u}"))),
            (0u64..100_000, select(DURATION_UNITS)).prop_map(|(n, u)| q(&format!("{n}{u}"))),
            "[a-z0-9 .:+-]{0,12}".prop_map(|s| q(&s)),
        ]
        .boxed(),
        Kind::Ip => prop_oneof![
            any::<Ipv4Addr>().prop_map(|a| q(&a.to_string())),
            any::<IpAddr>().prop_map(|a| q(&a.to_string())),
            // The valid configs' small pools, so that addresses collide.
            (1u8..=4).prop_map(|x| q(&format!("10.0.0.{x}"))),
            (1u16..=4).prop_map(|x| q(&format!("fd00::{x}"))),
            select(IPS).prop_map(q),
            "[0-9.:a-f]{0,16}".prop_map(|s| q(&s)),
        ]
        .boxed(),
        Kind::SockAddr => prop_oneof![
            any::<SocketAddr>().prop_map(|a| q(&a.to_string())),
            select(IPS).prop_map(q),
            (select(IPS), any::<u32>()).prop_map(|(ip, p)| q(&format!("{ip}:{p}"))),
            (select(IPS), any::<u16>()).prop_map(|(ip, p)| q(&format!("[{ip}]:{p}"))),
        ]
        .boxed(),
        Kind::Path => {
            prop_oneof![abs_path().prop_map(|s| q(&s)), "[a-z./]{0,12}".prop_map(|s| q(&s)), Just(q(""))].boxed()
        }
        Kind::Name => prop_oneof![
            "[A-Za-z0-9_.-]{1,64}".prop_map(|s| q(&s)),
            Just(q(&"x".repeat(65))),
            select(vec!["web", "dns", ""]).prop_map(q),
            "(?s).{0,10}".prop_map(|s| q(&s)),
        ]
        .boxed(),
        Kind::Text => prop_oneof![
            "/[^\\s\\p{Cc}]{0,10}".prop_map(|s| q(&s)),
            "[a-z.]{0,10}".prop_map(|s| q(&s)),
            "(?s).{0,10}".prop_map(|s| q(&s)),
        ]
        .boxed(),
        Kind::Interfaces => prop_oneof![
            vec(prop_oneof![4 => "eth[0-2]", 1 => "(?s).{0,17}"], 0..4).prop_map(|v| q_array(&v)),
            Just("[\"eth0\", \"eth0\"]".to_owned()),
            Just("[\"eth0\", 1]".to_owned()),
        ]
        .boxed(),
    }
}

/// `Some` value of `s` with probability `p` (0 and 1 included, which `option::weighted` refuses).
fn maybe<S: Strategy + 'static>(p: f64, s: S) -> BoxedStrategy<Option<S::Value>> {
    if p <= 0.0 {
        Just(()).prop_map(|()| None).boxed()
    } else if p >= 1.0 {
        s.prop_map(Some).boxed()
    } else {
        option::weighted(p, s).boxed()
    }
}

/// A valid value for the field on its own (cross-field rules may still object); addresses are
/// IPv6 if `v6`, so that a service and its backends agree on the family.
fn tame(kind: Kind, v6: bool) -> BoxedStrategy<String> {
    match kind {
        Kind::Int(lo, hi) => (lo..=hi).prop_map(|n| n.to_string()).boxed(),
        Kind::Prime => select(vec![7u32, 11, 251, 65521, 65537]).prop_map(|m| m.to_string()).boxed(),
        Kind::Choice(names) => select(names).prop_map(q).boxed(),
        // Mostly "1s", so that health.timeout is rarely longer than health.interval.
        Kind::Duration => {
            prop_oneof![3 => Just(q("1s")), 1 => select(vec!["10ms", "500ms", "30m", "2h"]).prop_map(q)].boxed()
        }
        Kind::Ip => unicast(v6).prop_map(|a| q(&a.to_string())).boxed(),
        Kind::SockAddr => any::<SocketAddr>().prop_map(|a| q(&a.to_string())).boxed(),
        Kind::Path => abs_path().prop_map(|s| q(&s)).boxed(),
        Kind::Name => "[a-z]{1,8}".prop_map(|s| q(&s)).boxed(),
        Kind::Text => "/[a-z]{0,8}".prop_map(|s| q(&s)).boxed(),
        Kind::Interfaces => interfaces().prop_map(|v| q_array(&v)).boxed(),
    }
}

/// A value for a field of `kind`: valid with probability `1 - wildness`, else wild, or now and
/// then of the wrong type.
fn wild_value(kind: Kind, wildness: f64, v6: bool) -> BoxedStrategy<String> {
    let w = |p: f64| (p * 1000.0).round() as u32;
    let arms =
        [(w(1.0 - wildness), tame(kind, v6)), (w(wildness * 0.9), wild_typed(kind)), (w(wildness * 0.1), wrong_type())];
    Union::new_weighted(arms.into_iter().filter(|(w, _)| *w > 0).collect()).boxed()
}

/// A value of any field's kind.
fn any_value() -> BoxedStrategy<String> {
    let kinds = [DATAPATH_KEYS, CONTROL_KEYS, SERVICE_KEYS, AFFINITY_KEYS, HEALTH_KEYS, BACKEND_KEYS];
    let mut v: Vec<BoxedStrategy<String>> =
        kinds.iter().flat_map(|ks| ks.iter().map(|(_, k)| wild_typed(*k))).collect();
    v.push(wrong_type());
    Union::new(v).boxed()
}

/// A table with each known key present or not (required ones mostly present), and with
/// probability `wildness / 10` an unknown key. Tame addresses are IPv6 if `v6`.
fn wild_table(
    header: &'static str,
    path: &'static str,
    keys: &'static [(&'static str, Kind)],
    wildness: f64,
    v6: bool,
) -> BoxedStrategy<Table> {
    let entries: Vec<BoxedStrategy<Option<(String, String)>>> = keys
        .iter()
        .map(|(k, kind)| {
            let present = if REQUIRED.contains(k) { 1.0 - wildness / 3.0 } else { 0.5 };
            maybe(present, wild_value(*kind, wildness, v6)).prop_map(move |v| v.map(|v| (k.to_string(), v))).boxed()
        })
        .collect();
    (entries, maybe(wildness / 10.0, ("[a-z_]{1,10}", any_value())))
        .prop_map(move |(entries, unknown)| Table {
            header: header.to_owned(),
            path: path.to_owned(),
            entries: entries.into_iter().flatten().chain(unknown).collect(),
        })
        .boxed()
}

/// A service's tables; its tame addresses are all of one family.
fn wild_service(wildness: f64) -> BoxedStrategy<Vec<Table>> {
    let backends = if wildness == 0.0 { 1..4 } else { 0..4 };
    any::<bool>()
        .prop_flat_map(move |v6| {
            (
                wild_table("[[services]]", "services[]", SERVICE_KEYS, wildness, v6),
                option::weighted(
                    0.4,
                    wild_table("[services.affinity]", "services[].affinity", AFFINITY_KEYS, wildness, v6),
                ),
                option::weighted(0.4, wild_table("[services.health]", "services[].health", HEALTH_KEYS, wildness, v6)),
                vec(
                    wild_table("[[services.backends]]", "services[].backends[]", BACKEND_KEYS, wildness, v6),
                    backends.clone(),
                ),
            )
        })
        .prop_map(|(s, a, h, b)| std::iter::once(s).chain(a).chain(h).chain(b).collect())
        .boxed()
}

/// Structural damage to a document.
#[derive(Clone, Debug)]
enum DocOp {
    DuplicateTable(Index),
    DuplicateEntry(Index, Index),
    DropTable(Index),
    UnknownTable(&'static str),
    RootKey(String, String),
}

fn doc_op() -> impl Strategy<Value = DocOp> {
    prop_oneof![
        any::<Index>().prop_map(DocOp::DuplicateTable),
        (any::<Index>(), any::<Index>()).prop_map(|(t, e)| DocOp::DuplicateEntry(t, e)),
        any::<Index>().prop_map(DocOp::DropTable),
        select(vec![
            "[extra]",
            "[services]",
            "[[datapath]]",
            "[services.extra]",
            "[[services.health]]",
            "[datapath.x]"
        ])
        .prop_map(DocOp::UnknownTable),
        ("[a-z_]{1,10}", any_value()).prop_map(|(k, v)| DocOp::RootKey(k, v)),
    ]
}

/// Documents from nearly valid to chaotic: `wildness` (per document) is the chance of each value
/// being wild, and of the document's structure being damaged.
fn wild_doc() -> impl Strategy<Value = Doc> {
    select(vec![0.0, 0.02, 0.1, 0.3, 0.7]).prop_flat_map(|wildness| {
        (
            maybe(1.0 - wildness / 3.0, wild_table("[datapath]", "datapath", DATAPATH_KEYS, wildness, false)),
            option::weighted(0.5, wild_table("[control]", "control", CONTROL_KEYS, wildness, false)),
            vec(wild_service(wildness), 0..4),
            maybe(wildness, doc_op()),
        )
            .prop_map(|(d, c, services, op)| {
                let mut tables: Vec<Table> = d.into_iter().chain(c).chain(services.into_iter().flatten()).collect();
                if let Some(op) = op {
                    match op {
                        DocOp::DuplicateTable(i) if !tables.is_empty() => {
                            let t = tables[i.index(tables.len())].clone();
                            tables.push(t);
                        }
                        DocOp::DuplicateEntry(i, j) if !tables.is_empty() => {
                            let n = tables.len();
                            let t = &mut tables[i.index(n)];
                            if !t.entries.is_empty() {
                                let e = t.entries[j.index(t.entries.len())].clone();
                                t.entries.push(e);
                            }
                        }
                        DocOp::DropTable(i) if !tables.is_empty() => {
                            tables.remove(i.index(tables.len()));
                        }
                        DocOp::UnknownTable(h) => {
                            tables.push(Table { header: h.to_owned(), path: String::new(), entries: vec![] })
                        }
                        DocOp::RootKey(k, v) => tables
                            .insert(0, Table { header: String::new(), path: String::new(), entries: vec![(k, v)] }),
                        _ => {}
                    }
                }
                Doc(tables)
            })
    })
}

// ================================================================================================
// Mutations of a known-valid config.

/// Every field set, three services (the second UDP with two backends, the third IPv6).
const FULL: &str = r#"[datapath]
interfaces = ["eth0", "eth1"]
mode = "nat"
xdp_mode = "auto"
affinity_entries = 1048576
pin_path = "/sys/fs/bpf/lb"
max_services = 64
max_backends = 1024
maglev_table_size = 65537
hash_seed = 0

[control]
socket = "/run/lb/lb.sock"
metrics = "127.0.0.1:9940"

[[services]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"

[services.affinity]
timeout = "30m"
ipv4_prefix = 32
ipv6_prefix = 64
max_age = "2h"

[services.health]
kind = "http"
path = "/healthz"
host = "www.example.com"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 3

[[services.backends]]
address = "10.1.0.11"
port = 8080
weight = 100
state = "active"

[[services]]
name = "dns"
vip = "10.0.0.53"
port = 53
protocol = "udp"

[[services.backends]]
address = "10.1.0.21"
port = 5353

[[services.backends]]
address = "10.1.0.22"
port = 5353
weight = 50
state = "draining"

[[services]]
name = "web6"
vip = "2001:db8::100"
port = 443

[services.affinity]
ipv6_prefix = 56

[[services.backends]]
address = "2001:db8:1::11"
port = 8443

[[services.backends]]
address = "2001:db8:1::12"
port = 8443
"#;

/// The mutation properties start from a valid config.
#[test]
fn full_example_is_valid() {
    let c = Config::parse(FULL).unwrap();
    assert_eq!(Config::parse(&render(&c)).unwrap(), c);
}

#[derive(Clone, Debug)]
enum LineOp {
    Delete(Index),
    Duplicate(Index),
    Swap(Index, Index),
    /// Replaces the value of a `key = value` line.
    SetValue(Index, String),
    Insert(Index, String),
    /// Cuts the text at a byte.
    Truncate(Index),
}

fn line_op() -> impl Strategy<Value = LineOp> {
    let lines = prop_oneof![
        select(vec![
            "[datapath]",
            "[control]",
            "[[services]]",
            "[services.affinity]",
            "[services.health]",
            "[[services.backends]]",
            "[x]",
            "",
            "#",
            "["
        ])
        .prop_map(str::to_owned),
        (select(vec!["port", "weight", "name", "vip", "address", "timeout", "interfaces", "zzz"]), any_value())
            .prop_map(|(k, v)| format!("{k} = {v}")),
    ];
    prop_oneof![
        3 => any::<Index>().prop_map(LineOp::Delete),
        2 => any::<Index>().prop_map(LineOp::Duplicate),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| LineOp::Swap(a, b)),
        4 => (any::<Index>(), any_value()).prop_map(|(i, v)| LineOp::SetValue(i, v)),
        2 => (any::<Index>(), lines).prop_map(|(i, l)| LineOp::Insert(i, l)),
        1 => any::<Index>().prop_map(LineOp::Truncate),
    ]
}

fn mutate(base: &str, ops: &[LineOp]) -> String {
    let mut lines: Vec<String> = base.lines().map(str::to_owned).collect();
    let mut cut = None;
    for op in ops {
        let n = lines.len();
        match op {
            _ if n == 0 => {}
            LineOp::Delete(i) => {
                lines.remove(i.index(n));
            }
            LineOp::Duplicate(i) => {
                let i = i.index(n);
                lines.insert(i, lines[i].clone());
            }
            LineOp::Swap(a, b) => lines.swap(a.index(n), b.index(n)),
            LineOp::SetValue(i, v) => {
                let l = &mut lines[i.index(n)];
                if let Some((k, _)) = l.split_once(" = ") {
                    *l = format!("{k} = {v}");
                }
            }
            LineOp::Insert(i, l) => lines.insert(i.index(n + 1), l.clone()),
            LineOp::Truncate(i) => cut = Some(*i),
        }
    }
    let mut text = lines.join("\n");
    if let Some(i) = cut {
        let mut at = i.index(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    text
}

// ================================================================================================
// Exactly one invalid field.

/// Sets (`Some`) or removes (`None`) one key of one table. `fields` are the fields of the errors
/// expected, in order (one, except for a VIP switched to the other address family: then every
/// backend's address is wrong); each error message contains `says`, if set.
#[derive(Clone, Debug)]
struct Mutation {
    table: String,
    key: &'static str,
    value: Option<String>,
    fields: Vec<String>,
    says: Option<String>,
}

/// Integers outside `lo..=hi`, as TOML.
fn int_outside(lo: i64, hi: i64) -> BoxedStrategy<String> {
    let mut v: Vec<BoxedStrategy<i64>> = Vec::new();
    if lo > i64::MIN {
        v.push(Just(lo - 1).boxed());
        v.push((lo.saturating_sub(1000)..lo).boxed());
        v.push((i64::MIN..lo).boxed());
    }
    if hi < i64::MAX {
        v.push(Just(hi + 1).boxed());
        v.push((hi + 1..=hi.saturating_add(1000)).boxed());
        v.push((hi + 1..=i64::MAX).boxed());
    }
    Union::new(v).prop_map(|n| n.to_string()).boxed()
}

/// Strings none of `names` (choices are case-sensitive).
fn bad_choice(names: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        select(names).prop_map(|n| n.to_ascii_uppercase()),
        select(names).prop_map(|n| format!(" {n}")),
        "(?s).{0,10}",
    ]
    .prop_filter("not a choice", move |s| !names.contains(&s.as_str()))
    .prop_map(|s| q(&s))
    .boxed()
}

/// Strings humantime does not read as a duration.
fn bad_duration() -> BoxedStrategy<String> {
    prop_oneof![select(DURATIONS).prop_map(str::to_owned), "[a-z .-]{0,10}", "(?s).{0,10}"]
        .prop_filter("not a duration", |s| humantime::parse_duration(s).is_err())
        .prop_map(|s| q(&s))
        .boxed()
}

/// Not a unicast IP address, as TOML, with what the error about it must say.
fn bad_ip() -> BoxedStrategy<(String, String)> {
    prop_oneof![
        (224u32..=239, any::<u32>()).prop_map(|(hi, lo)| Ipv4Addr::from(hi << 24 | lo & 0xff_ffff).to_string()),
        (any::<u8>(), any::<u128>())
            .prop_map(|(hi, lo)| Ipv6Addr::from(0xff << 120 | u128::from(hi) << 112 | lo >> 16).to_string()),
        select(vec!["255.255.255.255", "0.0.0.0", "::", "0:0::0", "::0.0.0.0"]).prop_map(str::to_owned),
        select(IPS).prop_map(str::to_owned),
        "[0-9a-z.:]{0,16}",
    ]
    .prop_filter_map("not unicast", |s| {
        let says = match s.parse::<IpAddr>() {
            Err(_) => format!("\"{s}\" is not an IP address"),
            Ok(a) if is_unicast(a) => return None,
            Ok(a) if a.is_unspecified() => format!("{a} is a unspecified address"),
            Ok(a) if a.is_multicast() => format!("{a} is a multicast address"),
            Ok(IpAddr::V6(a)) if a.to_ipv4_mapped().is_some() => format!("{a} is an IPv4-mapped IPv6 address"),
            Ok(a) => format!("{a} is a broadcast address"),
        };
        Some((q(&s), says))
    })
    .boxed()
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv6() { "IPv6" } else { "IPv4" }
}

fn bad_name() -> BoxedStrategy<String> {
    prop_oneof![Just(String::new()), "[a-z]{65,70}", "[a-z]{0,5}[^A-Za-z0-9_.-][a-z]{0,5}",]
        .prop_filter("not a valid name", |n| {
            n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        })
        .prop_map(|s| q(&s))
        .boxed()
}

fn bad_ifname() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        "[a-z]{16,20}",
        "[a-z]{0,4}[/:\\s\\p{Cc}][a-z]{0,4}",
    ]
    .boxed()
}

/// Every way to make exactly one field of `c` invalid.
fn invalid_fields(c: &Config) -> Vec<BoxedStrategy<Mutation>> {
    // Values paired with what the errors must say.
    let said = |table: &str, key: &'static str, fields: Vec<String>, values: BoxedStrategy<(String, String)>| {
        let table = table.to_owned();
        values
            .prop_map(move |(v, says)| Mutation {
                table: table.clone(),
                key,
                value: Some(v),
                fields: fields.clone(),
                says: Some(says),
            })
            .boxed()
    };
    let mut addresses: Vec<BoxedStrategy<Mutation>> = Vec::new();
    let mut out: Vec<BoxedStrategy<Mutation>> = Vec::new();
    let mut set = |table: &str, key: &'static str, field: String, values: BoxedStrategy<String>| {
        let table = table.to_owned();
        out.push(
            values
                .prop_map(move |v| Mutation {
                    table: table.clone(),
                    key,
                    value: Some(v),
                    fields: vec![field.clone()],
                    says: None,
                })
                .boxed(),
        );
    };
    let del = |table: &str, key: &'static str| Mutation {
        table: table.to_owned(),
        key,
        value: None,
        fields: vec![format!("{table}.{key}")],
        says: None,
    };
    let mut deletions = vec![del("datapath", "interfaces")];

    // datapath
    let ifs = c.datapath.interfaces.clone();
    set("datapath", "interfaces", "datapath.interfaces".into(), Just("[]".to_owned()).boxed());
    for k in 0..=ifs.len() {
        let ifs = ifs.clone();
        // A bad name in place of interfaces[k], or appended.
        set(
            "datapath",
            "interfaces",
            format!("datapath.interfaces[{k}]"),
            bad_ifname()
                .prop_map(move |bad| {
                    let mut v = ifs.clone();
                    if k < v.len() {
                        v[k] = bad;
                    } else {
                        v.push(bad);
                    }
                    q_array(&v)
                })
                .boxed(),
        );
    }
    // A duplicate, appended.
    set(
        "datapath",
        "interfaces",
        format!("datapath.interfaces[{}]", ifs.len()),
        select(ifs.clone()).prop_map(move |dup| q_array(&[ifs.clone(), vec![dup]].concat())).boxed(),
    );
    set("datapath", "mode", "datapath.mode".into(), bad_choice(&["nat", "dsr"]).boxed());
    set("datapath", "xdp_mode", "datapath.xdp_mode".into(), bad_choice(&["auto", "native", "skb"]));
    set("datapath", "affinity_entries", "datapath.affinity_entries".into(), int_outside(1024, 1 << 27));
    let relative = "([^/](?s:.){0,10})?".prop_map(|s| q(&s)).boxed();
    set("datapath", "pin_path", "datapath.pin_path".into(), relative.clone());
    set("datapath", "max_services", "datapath.max_services".into(), int_outside(1, 4096));
    set("datapath", "max_backends", "datapath.max_backends".into(), int_outside(1, 65536));
    set(
        "datapath",
        "maglev_table_size",
        "datapath.maglev_table_size".into(),
        prop_oneof![
            int_outside(7, 1_000_003),
            (7u32..=1_000_003).prop_filter("composite", |m| !is_prime(*m)).prop_map(|m| m.to_string()),
        ]
        .boxed(),
    );
    set("datapath", "hash_seed", "datapath.hash_seed".into(), int_outside(0, u32::MAX.into()));

    // control
    set("control", "socket", "control.socket".into(), relative);
    set(
        "control",
        "metrics",
        "control.metrics".into(),
        prop_oneof![
            select(IPS).prop_map(str::to_owned),
            "[a-z0-9.:\\[\\]]{0,12}",
            any::<IpAddr>().prop_map(|a| a.to_string())
        ]
        .prop_filter("not an address:port", |s| s.parse::<SocketAddr>().is_err())
        .prop_map(|s| q(&s))
        .boxed(),
    );

    let vips: Vec<IpAddr> = c.services.iter().map(|s| s.vip).collect();
    // Every address the config uses: a VIP moved onto one would be a second problem.
    let used: Vec<IpAddr> =
        c.services.iter().flat_map(|s| std::iter::once(s.vip).chain(s.backends.iter().map(|b| b.address))).collect();
    for (i, s) in c.services.iter().enumerate() {
        let p = format!("services[{i}]");
        set(&p, "name", format!("{p}.name"), bad_name());
        if i > 0 {
            let earlier: Vec<String> = c.services[..i].iter().map(|s| q(&s.name)).collect();
            set(&p, "name", format!("{p}.name"), select(earlier).boxed());
        }
        addresses.push(said(&p, "vip", vec![format!("{p}.vip")], bad_ip()));
        // Valid on its own, but of the other family than the backends: each of them is wrong.
        let bfam = family(s.backends[0].address);
        let used = used.clone();
        addresses.push(said(
            &p,
            "vip",
            (0..s.backends.len()).map(|j| format!("{p}.backends[{j}].address")).collect(),
            unicast(s.vip.is_ipv4())
                .prop_filter("an address the config uses", move |a| !used.contains(a))
                .prop_map(move |a| {
                    (q(&a.to_string()), format!(" is {bfam} but the service's vip {a} is {}", family(a)))
                })
                .boxed(),
        ));
        set(&p, "port", format!("{p}.port"), int_outside(1, 65535));
        set(&p, "protocol", format!("{p}.protocol"), bad_choice(&["tcp", "udp"]));
        deletions.extend([del(&p, "name"), del(&p, "vip"), del(&p, "port")]);

        let a = format!("{p}.affinity");
        let days = |n: u64| DAY * n as u32;
        let too_long = |max: Duration| {
            prop_oneof![
                Just(Duration::ZERO),
                (1u64..=1_000_000_000_000).prop_map(move |n| max + Duration::from_nanos(n))
            ]
            .prop_map(q_duration)
        };
        set(&a, "timeout", format!("{a}.timeout"), prop_oneof![too_long(days(30)), bad_duration()].boxed());
        set(&a, "ipv4_prefix", format!("{a}.ipv4_prefix"), int_outside(0, 32));
        set(&a, "ipv6_prefix", format!("{a}.ipv6_prefix"), int_outside(0, 128));
        set(&a, "max_age", format!("{a}.max_age"), prop_oneof![too_long(days(365)), bad_duration()].boxed());

        let h = format!("{p}.health");
        set(&h, "kind", format!("{h}.kind"), bad_choice(&["tcp", "http", "none"]));
        set(
            &h,
            "path",
            format!("{h}.path"),
            prop_oneof![Just(String::new()), "[a-z]{1,5}", "/[a-z]{0,3}[\\s\\p{Cc}][a-z]{0,3}"]
                .prop_map(|s| q(&s))
                .boxed(),
        );
        set(
            &h,
            "host",
            format!("{h}.host"),
            prop_oneof![Just(String::new()), "[a-z]{0,3}[\\s\\p{Cc}][a-z]{0,3}"].prop_map(|s| q(&s)).boxed(),
        );
        set(
            &h,
            "interval",
            format!("{h}.interval"),
            prop_oneof![(0u64..10_000_000).prop_map(|n| q_duration(Duration::from_nanos(n))), bad_duration()].boxed(),
        );
        let interval = s.health.interval;
        set(
            &h,
            "timeout",
            format!("{h}.timeout"),
            prop_oneof![
                Just(q("0s")),
                (1u64..=1_000_000_000_000).prop_map(move |n| q_duration(interval + Duration::from_nanos(n))),
                bad_duration(),
            ]
            .boxed(),
        );
        set(&h, "rise", format!("{h}.rise"), int_outside(1, 100));
        set(&h, "fall", format!("{h}.fall"), int_outside(1, 100));

        for j in 0..s.backends.len() {
            let b = format!("{p}.backends[{j}]");
            let field = || vec![format!("{b}.address")];
            addresses.push(said(&b, "address", field(), bad_ip()));
            // Valid on its own, but the VIP of a service (of this one's family).
            let same: Vec<IpAddr> = vips.iter().copied().filter(|v| v.is_ipv6() == s.vip.is_ipv6()).collect();
            addresses.push(said(
                &b,
                "address",
                field(),
                select(same).prop_map(|a| (q(&a.to_string()), format!("{a} is the VIP of "))).boxed(),
            ));
            // Valid on its own, but of the other family than the service's VIP.
            let vip = s.vip;
            addresses.push(said(
                &b,
                "address",
                field(),
                unicast(vip.is_ipv4())
                    .prop_map(move |a| {
                        let says = format!("{a} is {} but the service's vip {vip} is {}", family(a), family(vip));
                        (q(&a.to_string()), says)
                    })
                    .boxed(),
            ));
            set(&b, "port", format!("{b}.port"), int_outside(1, 65535));
            set(&b, "weight", format!("{b}.weight"), int_outside(1, 65535));
            set(&b, "state", format!("{b}.state"), bad_choice(&["active", "draining"]));
            deletions.extend([del(&b, "address"), del(&b, "port")]);
        }
    }
    out.push(select(deletions).boxed());
    out.extend(addresses);
    out
}

fn one_invalid_field() -> impl Strategy<Value = (Config, u64, Mutation)> {
    (valid_config(), any::<u64>()).prop_flat_map(|(c, seed)| {
        let m = Union::new(invalid_fields(&c));
        (Just(c), Just(seed), m)
    })
}

// ================================================================================================
// Config properties.

proptest! {
    #![proptest_config(cases(1024))]

    /// 1a. Arbitrary text never panics the parser, and any outcome is well formed.
    #[test]
    fn config_arbitrary_text(text in "(?s).{0,400}") {
        well_formed(&text)?;
    }

    /// 1a. The same for text from TOML's alphabet, which gets past the tokenizer more often.
    #[test]
    fn config_toml_alphabet(text in "[\\[\\]a-z_.=\"' \n0-9{},#:/+-]{0,400}") {
        well_formed(&text)?;
    }

    /// 1a. Arbitrary bytes (read lossily as UTF-8).
    #[test]
    fn config_arbitrary_bytes(bytes in vec(any::<u8>(), 0..400)) {
        well_formed(&String::from_utf8_lossy(&bytes))?;
    }
}

proptest! {
    #![proptest_config(cases(768))]

    /// 1b. Structured random configs: the right tables and keys (mostly), random values and
    /// types, missing, duplicated and unknown tables and keys.
    #[test]
    fn config_wild_documents(doc in wild_doc()) {
        well_formed(&doc.text())?;
    }

    /// 1c. A valid config with a few lines deleted, duplicated, swapped, inserted or changed, or
    /// cut short.
    #[test]
    fn config_mutated_valid(ops in vec(line_op(), 1..5)) {
        well_formed(&mutate(FULL, &ops))?;
    }
}

proptest! {
    #![proptest_config(cases(384))]

    /// 2. A valid config parses to exactly what was written (defaults left out or not), and
    /// rendering and parsing it again gives the same config.
    #[test]
    fn config_valid_round_trips((c, seed) in (valid_config(), any::<u64>())) {
        let text = doc_of(&c, coin(seed)).text();
        match check_parse(&text)? {
            Ok(parsed) => prop_assert_eq!(parsed, c, "parsed config differs from the one written as:\n{}", text),
            Err(e) => prop_assert!(false, "valid config rejected:\n{e}\n--- config:\n{text}"),
        }
    }

    /// 3. With exactly one field of a valid config made invalid (or a required one removed),
    /// there is exactly one error and it names that field (and for addresses, says why). A VIP
    /// switched to the other address family is instead an error on each of its backends.
    #[test]
    fn config_one_bad_field_one_error((c, seed, m) in one_invalid_field()) {
        let mut doc = doc_of(&c, coin(seed));
        doc.set(&m.table, m.key, m.value.clone());
        let text = doc.text();
        match check_parse(&text)? {
            Ok(_) => prop_assert!(false, "accepted with {}.{} = {:?}:\n{}", m.table, m.key, m.value, text),
            Err(ConfigErrors(errs)) => {
                let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
                prop_assert!(
                    fields == m.fields
                        && m.says.as_ref().is_none_or(|says| errs.iter().all(|e| e.message.contains(says.as_str()))),
                    "expected errors on {:?}{}, got:\n{}\n--- config:\n{}",
                    m.fields,
                    m.says.as_ref().map_or(String::new(), |s| format!(" saying {s:?}")),
                    ConfigErrors(errs.clone()),
                    text
                );
            }
        }
    }
}

// ================================================================================================
// Control API: drain requests.

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![select(vec!["service", "backend", "force", "Service", "extra"]).prop_map(str::to_owned), "(?s).{0,6}"]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        "(?s).{0,12}".prop_map(Value::String),
        select(vec!["web", "10.1.0.11:8080", "true"]).prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((json_key(), inner), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Objects shaped like a drain request, fields of any type, present or not.
fn drain_like() -> impl Strategy<Value = Value> {
    let field = |good: BoxedStrategy<Value>| option::weighted(0.8, prop_oneof![3 => good, 1 => json_value()]);
    (
        field("[a-z]{0,8}".prop_map(Value::String).boxed()),
        field("(?s).{0,20}".prop_map(Value::String).boxed()),
        field(any::<bool>().prop_map(Value::Bool).boxed()),
        option::weighted(0.2, (json_key(), json_value())),
    )
        .prop_map(|(service, backend, force, extra)| {
            let mut m = serde_json::Map::new();
            // The extra key first: a known key overwrites it, as in a parsed object.
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            for (k, v) in [("service", service), ("backend", backend), ("force", force)] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            Value::Object(m)
        })
}

/// What serde makes of a JSON value as a `DrainRequest`: an object with string `service` and
/// `backend` and an optional bool `force` (unknown keys ignored), or the same as an array.
fn expected_drain(v: &Value) -> Option<(String, String, bool)> {
    match v {
        Value::Object(m) => {
            let service = m.get("service")?.as_str()?.to_owned();
            let backend = m.get("backend")?.as_str()?.to_owned();
            let force = match m.get("force") {
                None => false,
                Some(f) => f.as_bool()?,
            };
            Some((service, backend, force))
        }
        Value::Array(a) => match a.as_slice() {
            [Value::String(s), Value::String(b)] => Some((s.clone(), b.clone(), false)),
            [Value::String(s), Value::String(b), Value::Bool(f)] => Some((s.clone(), b.clone(), *f)),
            _ => None,
        },
        _ => None,
    }
}

fn drain_fields(r: &DrainRequest) -> (String, String, bool) {
    (r.service.clone(), r.backend.clone(), r.force)
}

// ================================================================================================
// Control API: backend ADDRESS:PORT.

fn octet() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => (0u32..=255).prop_map(|n| n.to_string()),
        1 => (256u32..=99_999).prop_map(|n| n.to_string()),
        1 => "0[0-9]{1,2}",
        1 => select(vec!["", "-1", "+1", " 1", "1 ", "0x1", "\u{663}", "4294967296"]).prop_map(str::to_owned),
    ]
}

fn port_text() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => any::<u16>().prop_map(|n| n.to_string()),
        1 => (65_536u64..=u64::MAX).prop_map(|n| n.to_string()),
        1 => "0[0-9]{1,5}",
        1 => select(vec!["", "+80", "-1", " 80", "80 ", "0x50", "8080/tcp"]).prop_map(str::to_owned),
    ]
}

/// IPv6 address text: a real address (in any of its spellings), or groups that may not add up.
fn ipv6_text() -> impl Strategy<Value = String> {
    let group = prop_oneof![
        8 => any::<u16>().prop_map(|n| format!("{n:x}")),
        1 => any::<u16>().prop_map(|n| format!("{n:04X}")),
        1 => select(vec!["", "0", "00000", "10000", "g", "-1", " 1"]).prop_map(str::to_owned),
    ];
    prop_oneof![
        4 => any::<Ipv6Addr>().prop_map(|a| a.to_string()),
        1 => any::<Ipv4Addr>().prop_map(|a| format!("::ffff:{a}")),
        1 => (1u16..=4).prop_map(|x| format!("fd00::{x}")),
        4 => vec(group, 0..10).prop_map(|gs| gs.join(":")),
        1 => (vec(any::<u16>(), 0..8), vec(any::<u16>(), 0..8)).prop_map(|(a, b)| {
            let hex = |v: Vec<u16>| v.iter().map(|n| format!("{n:x}")).collect::<Vec<_>>().join(":");
            format!("{}::{}", hex(a), hex(b))
        }),
        1 => (vec(any::<u16>(), 0..7), octet(), octet(), octet(), octet()).prop_map(|(gs, a, b, c, d)| {
            format!("{}::{a}.{b}.{c}.{d}", gs.iter().map(|n| format!("{n:x}")).collect::<Vec<_>>().join(":"))
        }),
    ]
}

fn backend_text() -> impl Strategy<Value = String> {
    let scope = prop_oneof![
        8 => Just(String::new()),
        1 => any::<u32>().prop_map(|n| format!("%{n}")),
        1 => select(vec!["%", "%eth0", "%-1", "%4294967296"]).prop_map(str::to_owned),
    ];
    prop_oneof![
        4 => (octet(), octet(), octet(), octet(), prop_oneof![8 => Just(":"), 1 => select(vec![" :", ": ", "::", ""])], port_text())
            .prop_map(|(a, b, c, d, sep, p)| format!("{a}.{b}.{c}.{d}{sep}{p}")),
        1 => (vec(octet(), 0..6), port_text()).prop_map(|(os, p)| format!("{}:{p}", os.join("."))),
        4 => (ipv6_text(), scope, prop_oneof![8 => Just("]:"), 1 => select(vec!["] :", "]: ", "]", ":", "]::"])], port_text())
            .prop_map(|(a, scope, sep, p)| format!("[{a}{scope}{sep}{p}")),
        1 => (ipv6_text(), port_text()).prop_map(|(a, p)| format!("{a}:{p}")),
        1 => any::<SocketAddr>().prop_map(|a| a.to_string()),
        1 => (select(IPS), port_text()).prop_map(|(ip, p)| format!("{ip}:{p}")),
        1 => (select(IPS), port_text()).prop_map(|(ip, p)| format!("[{ip}]:{p}")),
        1 => "(?s).{0,24}",
        1 => "[0-9a-f.:\\[\\]%]{0,24}",
    ]
}

proptest! {
    #![proptest_config(cases(1024))]

    /// 4. Drain request bodies: any JSON value deserializes (or not) as serde's rules say,
    /// without panicking.
    #[test]
    fn drain_request_from_any_json(v in prop_oneof![json_value(), drain_like()]) {
        let r = serde_json::from_value::<DrainRequest>(v.clone());
        prop_assert_eq!(r.as_ref().ok().map(drain_fields), expected_drain(&v), "{:?}", r);
        // The text form, as the control socket receives it, agrees.
        let text = serde_json::from_str::<DrainRequest>(&v.to_string());
        prop_assert_eq!(text.ok().map(|r| drain_fields(&r)), expected_drain(&v));
    }

    /// 4. Arbitrary request bodies never panic the deserializer.
    #[test]
    fn drain_request_from_any_text(text in prop_oneof!["(?s).{0,200}", "[{}\\[\\]\":,a-z0-9 ]{0,200}"]) {
        let _ = serde_json::from_str::<DrainRequest>(&text);
    }

    /// 4. What the CLI sends, the daemon reads back.
    #[test]
    fn drain_request_round_trips(service in "(?s).{0,20}", backend in "(?s).{0,20}", force in any::<bool>()) {
        let req = DrainRequest { service, backend, force };
        let back: DrainRequest = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        prop_assert_eq!(drain_fields(&back), drain_fields(&req));
    }

    /// 4. The backend `ADDRESS:PORT` parser accepts exactly what `SocketAddr::from_str` does
    /// (`a.b.c.d:port` and `[v6]:port`), and its error quotes the input.
    #[test]
    fn backend_address_agrees_with_std(s in backend_text()) {
        let ours = parse_backend(&s);
        prop_assert_eq!(ours.clone().ok(), s.parse::<SocketAddr>().ok());
        if let Err(msg) = ours {
            prop_assert!(msg.contains(&format!("{s:?}")) && msg.contains("ADDRESS:PORT"), "{}", msg);
        }
    }

    /// 4. Every socket address, IPv4 or IPv6 (with a scope id or not), as written by `lb
    /// status`, parses back.
    #[test]
    fn backend_address_round_trips(mut a in any::<SocketAddr>()) {
        // Display does not show the flow label, so it cannot survive a round trip.
        if let SocketAddr::V6(v6) = &mut a {
            v6.set_flowinfo(0);
        }
        prop_assert_eq!(parse_backend(&a.to_string()), Ok(a));
    }
}

/// Nesting deep enough to overflow a naive recursive parser is refused, not a crash.
#[test]
fn drain_request_deep_nesting() {
    for depth in [200, 10_000, 100_000] {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(serde_json::from_str::<DrainRequest>(&text).is_err());
        let text = format!("{}1{}", "{\"service\":".repeat(depth), "}".repeat(depth));
        assert!(serde_json::from_str::<DrainRequest>(&text).is_err());
    }
}
