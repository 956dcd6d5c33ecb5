//! What the daemon can tell about clients and their pins without sending a packet: `lb explain`,
//! `lb affinity list` / `flush`, and the pin counts of `lb status` and the metrics.
//!
//! The judgement of a pin mirrors the XDP program's selection (`lb-ebpf/src/main.rs`,
//! `select_inner`): a pin is used while it is idle for no longer than the service's timeout, is
//! no older than its `max_age`, and names a backend of the service that is up (or any backend
//! while the service fails open). Otherwise the next packet re-selects through the live Maglev
//! table. `last_seen` is refreshed by the datapath at most once a second, so idle times read here
//! can be up to a second long.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, bail};
use lb_common::{AffinityKey, AffinityValue, BACKEND_F_UP, hash::client_slot};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::{Datapath, addr_words, monotonic_coarse_ns, words_addr},
    state::{BackendRt, Runtime, ServiceRt},
};

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
    /// One sentence: why this backend.
    pub reason: String,
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A duration for people: whole seconds (or milliseconds under a second).
pub fn human(ns: u64) -> String {
    let d = if ns >= 1_000_000_000 {
        Duration::from_secs(ns / 1_000_000_000)
    } else {
        Duration::from_millis(ns / 1_000_000)
    };
    humantime::format_duration(d).to_string()
}

fn human_secs(s: f64) -> String {
    human((s * 1e9) as u64)
}

/// `address:port`, IPv6 in brackets.
fn endpoint(b: &BackendRt) -> String {
    SocketAddr::new(b.config.address, b.config.port).to_string()
}

/// The service's affinity key for `client`, exactly as the datapath builds it.
pub fn client_key(s: &ServiceRt, client: IpAddr) -> AffinityKey {
    let w = addr_words(client);
    let addr = match client {
        IpAddr::V4(_) => [w[0] & s.entry.v4_mask, 0, 0, 0],
        IpAddr::V6(_) => std::array::from_fn(|i| w[i] & s.entry.v6_mask[i]),
    };
    AffinityKey { service_id: s.entry.id, addr }
}

/// The client prefix of a key: `10.0.0.2`, `10.0.0.0/24`, `2001:db8::/64`.
fn key_string(s: &ServiceRt, key: &AffinityKey) -> String {
    let v6 = s.config.vip.is_ipv6();
    let addr = words_addr(&key.addr, v6);
    let (prefix, full) = if v6 { (s.config.affinity.ipv6_prefix, 128) } else { (s.config.affinity.ipv4_prefix, 32) };
    if prefix == full { addr.to_string() } else { format!("{addr}/{prefix}") }
}

/// Why the datapath would not use a pin.
enum Stale {
    Idle(u64),
    Old(u64),
    Removed,
    /// The backend's state.
    Backend(&'static str),
}

/// Whether service `s`'s datapath would not use pin `v` at `now` (CLOCK_MONOTONIC_COARSE ns),
/// and why (the rules of `select_inner` in the XDP program).
fn staleness(s: &ServiceRt, v: &AffinityValue, now: u64) -> Option<Stale> {
    let idle = now.saturating_sub(v.last_seen_ns);
    let age = now.saturating_sub(v.created_ns);
    if idle > s.entry.timeout_ns {
        return Some(Stale::Idle(idle));
    }
    if s.entry.max_age_ns != 0 && age > s.entry.max_age_ns {
        return Some(Stale::Old(age));
    }
    match s.backends.iter().find(|b| b.id == v.backend_id) {
        None => Some(Stale::Removed),
        Some(b) if b.flags() & BACKEND_F_UP == 0 && !s.fail_open => Some(Stale::Backend(b.state_name())),
        Some(_) => None,
    }
}

/// Judges a pin of service `s` at `now` (CLOCK_MONOTONIC_COARSE ns) as the datapath would.
pub fn judge(s: &ServiceRt, key: &AffinityKey, v: &AffinityValue, now: u64) -> PinReport {
    let idle = now.saturating_sub(v.last_seen_ns);
    let age = now.saturating_sub(v.created_ns);
    let (timeout, max_age) = (s.entry.timeout_ns, s.entry.max_age_ns);
    let backend = s.backends.iter().find(|b| b.id == v.backend_id);
    let stale = staleness(s, v, now).map(|why| match why {
        Stale::Idle(idle) => format!("idle for {} (timeout {})", human(idle), human(timeout)),
        Stale::Old(age) => format!("older than max_age ({} > {})", human(age), human(max_age)),
        Stale::Removed => "its backend was removed".to_string(),
        Stale::Backend(state) => format!("its backend is {state}"),
    });
    let left_idle = timeout.saturating_sub(idle);
    let left = if max_age != 0 { left_idle.min(max_age.saturating_sub(age)) } else { left_idle };
    PinReport {
        service: s.config.name.clone(),
        client: key_string(s, key),
        backend: backend.map_or_else(|| format!("id {}", v.backend_id), endpoint),
        backend_state: backend.map_or("removed", |b| b.state_name()).to_string(),
        age_secs: secs(age),
        idle_secs: secs(idle),
        expires_in_secs: if stale.is_some() { 0.0 } else { secs(left) },
        live: stale.is_none(),
        stale,
    }
}

/// Live pins per service id and per (service id, backend id).
#[derive(Clone, Debug, Default)]
pub struct PinCounts {
    pub entries: usize,
    pub by_service: BTreeMap<u32, u64>,
    pub by_backend: BTreeMap<(u32, u32), u64>,
}

/// Counts the live pins of every service (one scan of the table).
pub fn count(rt: &Runtime, dp: &Datapath) -> Result<PinCounts> {
    let entries = dp.affinity_entries()?;
    let now = monotonic_coarse_ns();
    let by_id: BTreeMap<u32, &ServiceRt> = rt.services.iter().map(|s| (s.entry.id, s)).collect();
    let mut c = PinCounts { entries: entries.len(), ..Default::default() };
    for (k, v) in &entries {
        let Some(s) = by_id.get(&k.service_id) else { continue };
        if staleness(s, v, now).is_none() {
            *c.by_service.entry(k.service_id).or_default() += 1;
            *c.by_backend.entry((k.service_id, v.backend_id)).or_default() += 1;
        }
    }
    Ok(c)
}

fn services<'a>(rt: &'a Runtime, name: Option<&str>) -> Result<Vec<&'a ServiceRt>> {
    match name {
        Some(n) => match rt.service(n) {
            Some(s) => Ok(vec![s]),
            None => bail!("no service named {n:?}"),
        },
        None => Ok(rt.services.iter().collect()),
    }
}

/// The backend `addr:port` in `candidates`: (service id, backend id) pairs.
fn backend_ids(candidates: &[&ServiceRt], backend: &str) -> Result<Vec<(u32, u32)>> {
    let addr = crate::control::parse_backend(backend).map_err(anyhow::Error::msg)?;
    let ids: Vec<(u32, u32)> = candidates
        .iter()
        .filter_map(|s| s.backend(addr.ip(), addr.port()).map(|b| (s.entry.id, b.id)))
        .collect();
    if ids.is_empty() {
        bail!("no backend {addr} in {}", if candidates.len() == 1 { "that service" } else { "any service" });
    }
    Ok(ids)
}

/// `lb affinity list`.
pub fn list(rt: &Runtime, dp: &Datapath, q: &ListQuery) -> Result<AffinityList> {
    let svcs = services(rt, q.service.as_deref())?;
    let wanted_backends = q.backend.as_deref().map(|b| backend_ids(&svcs, b)).transpose()?;
    let by_id: BTreeMap<u32, &ServiceRt> = svcs.iter().map(|s| (s.entry.id, *s)).collect();
    let entries = dp.affinity_entries()?;
    let now = monotonic_coarse_ns();
    let mut pins: Vec<(String, [u32; 4], PinReport)> = entries
        .iter()
        .filter(|(k, v)| wanted_backends.as_ref().is_none_or(|w| w.contains(&(k.service_id, v.backend_id))))
        .filter_map(|(k, v)| by_id.get(&k.service_id).map(|s| (s.config.name.clone(), k.addr, judge(s, k, v, now))))
        .collect();
    // By service, then by address (numerically).
    pins.sort_by(|a, b| (&a.0, a.1.map(u32::from_be)).cmp(&(&b.0, b.1.map(u32::from_be))));
    let matched = pins.len();
    Ok(AffinityList {
        table_entries: entries.len(),
        table_capacity: dp.capacity().affinity_entries,
        matched,
        pins: pins.into_iter().take(q.limit.unwrap_or(usize::MAX)).map(|p| p.2).collect(),
    })
}

/// `lb affinity flush`.
pub fn flush(rt: &Runtime, dp: &mut Datapath, req: &FlushRequest) -> Result<FlushReport> {
    let svcs = services(rt, req.service.as_deref())?;
    let flushed = match (req.client, req.backend.as_deref(), req.all) {
        (Some(client), None, false) => {
            let keys: Vec<AffinityKey> = svcs
                .iter()
                .filter(|s| s.config.vip.is_ipv6() == client.is_ipv6())
                .map(|s| client_key(s, client))
                .collect();
            dp.delete_affinity(&keys)?
        }
        (None, Some(backend), false) => {
            let ids = backend_ids(&svcs, backend)?;
            dp.flush_affinity(|k, v| ids.contains(&(k.service_id, v.backend_id)))?
        }
        (None, None, true) => {
            let ids: Vec<u32> = svcs.iter().map(|s| s.entry.id).collect();
            dp.flush_affinity(|k, _| ids.contains(&k.service_id))?
        }
        _ => bail!("name exactly one of: a client address, --backend ADDRESS:PORT, --all"),
    };
    Ok(FlushReport { flushed })
}

/// `lb explain`: for each service of the client's family (or the one named).
pub fn explain(rt: &Runtime, dp: &Datapath, client: IpAddr, service: Option<&str>) -> Result<Vec<Explanation>> {
    let svcs: Vec<&ServiceRt> = services(rt, service)?
        .into_iter()
        .filter(|s| s.config.vip.is_ipv6() == client.is_ipv6())
        .collect();
    if svcs.is_empty() {
        bail!(
            "no {} service{}",
            if client.is_ipv6() { "IPv6" } else { "IPv4" },
            service.map(|n| format!(" named {n:?}")).unwrap_or_default()
        );
    }
    let now = monotonic_coarse_ns();
    let m = rt.global.maglev_m;
    let mut out = Vec::new();
    for s in svcs {
        let key = client_key(s, client);
        let value = dp.affinity_get(&key)?;
        let value = value.as_ref();
        let pin = value.map(|v| judge(s, &key, v, now));
        let slot = client_slot(rt.global.hash_seed, &key.addr, m);
        let maglev = if s.entry.backend_count == 0 {
            None
        } else {
            let id = dp.read_maglev(s.entry.id, s.entry.table, slot)?;
            s.backends.iter().find(|b| b.id == id)
        };
        let maglev_text = match maglev {
            Some(b) => format!("Maglev slot {slot} of {m} -> {} ({})", endpoint(b), b.state_name()),
            None => "no backend can take a new client (the packet is dropped: drop_no_backend)".to_string(),
        };
        let by_maglev = if maglev.is_some() { "maglev" } else { "none" };
        let (via, backend, reason) = match (value, &pin) {
            (Some(v), Some(p)) if p.live => (
                "pin",
                s.backends.iter().find(|b| b.id == v.backend_id),
                format!(
                    "pinned {} ago, last packet {} ago; the pin lasts {} more without traffic{}",
                    human(now.saturating_sub(v.created_ns)),
                    human(now.saturating_sub(v.last_seen_ns)),
                    human_secs(p.expires_in_secs),
                    if s.fail_open { " (the service fails open: every backend is down)" } else { "" }
                ),
            ),
            (_, Some(p)) => (
                by_maglev,
                maglev,
                format!(
                    "its pin to {} is not used ({}): the next packet re-selects, {maglev_text}",
                    p.backend,
                    p.stale.as_deref().unwrap_or("stale"),
                ),
            ),
            _ => (by_maglev, maglev, format!("no pin: {maglev_text}; the first packet pins it")),
        };
        out.push(Explanation {
            client: client.to_string(),
            service: s.config.name.clone(),
            vip: format!("{}/{}", SocketAddr::new(s.config.vip, s.config.port), s.config.protocol),
            key: key_string(s, &key),
            via: via.to_string(),
            backend: backend.map(endpoint),
            backend_state: backend.map(|b| b.state_name().to_string()),
            pin,
            maglev_slot: slot,
            maglev_table_size: m,
            maglev_backend: maglev.map(endpoint),
            reason,
        });
    }
    Ok(out)
}

/// `lb explain` as text.
pub fn render_explanations(v: &[Explanation]) -> String {
    let mut o = String::new();
    for e in v {
        let to = match (&e.backend, &e.backend_state) {
            (Some(b), Some(st)) => format!("{b} ({st})"),
            _ => "nowhere (dropped)".to_string(),
        };
        o.push_str(&format!("client {} -> service {} {} (key {}): {} via {}\n", e.client, e.service, e.vip, e.key, to, e.via));
        o.push_str(&format!("  {}\n", e.reason));
        if e.via == "pin" {
            o.push_str(&format!(
                "  without the pin: Maglev slot {} of {} -> {}\n",
                e.maglev_slot,
                e.maglev_table_size,
                e.maglev_backend.as_deref().unwrap_or("no backend")
            ));
        }
    }
    o
}

/// `lb affinity list` as a table.
pub fn render_list(l: &AffinityList) -> String {
    let mut o = format!(
        "{} pin(s) matched; the affinity table holds {} of {} entries\n",
        l.matched, l.table_entries, l.table_capacity
    );
    if l.pins.is_empty() {
        return o;
    }
    o.push_str(&format!(
        "{:<12} {:<28} {:<24} {:>8} {:>10} {:>10} {:>12}  {}\n",
        "service", "client", "backend", "state", "age", "idle", "expires in", "live"
    ));
    for p in &l.pins {
        let live = match &p.stale {
            None => "yes".to_string(),
            Some(why) => format!("no: {why}"),
        };
        o.push_str(&format!(
            "{:<12} {:<28} {:<24} {:>8} {:>10} {:>10} {:>12}  {}\n",
            p.service,
            p.client,
            p.backend,
            p.backend_state,
            human_secs(p.age_secs),
            human_secs(p.idle_secs),
            human_secs(p.expires_in_secs),
            live
        ));
    }
    if l.pins.len() < l.matched {
        o.push_str(&format!("... {} more (raise --limit)\n", l.matched - l.pins.len()));
    }
    o
}
