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
};

use anyhow::Result;
use lb_common::{AffinityKey, AffinityValue, BACKEND_F_UP, hash::client_slot};

use crate::{
    api::{AffinityList, BadRequest, Explanation, FlushReport, FlushRequest, ListQuery, NotFound, PinReport, human, human_secs},
    datapath::{Datapath, PinTable, addr_words, monotonic_coarse_ns, words_addr},
    state::{BackendRt, Runtime, ServiceRt},
};


fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
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
pub fn key_string(s: &ServiceRt, key: &AffinityKey) -> String {
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
    if let Some(st) = by_age(&s.entry, v, now) {
        return Some(st);
    }
    match s.backends.iter().find(|b| b.id == v.backend_id) {
        None => Some(Stale::Removed),
        Some(b) if b.flags() & BACKEND_F_UP == 0 && !s.fail_open => Some(Stale::Backend(b.state_name())),
        Some(_) => None,
    }
}

/// Whether a pin of the service with datapath entry `entry` is past its age at `now`: idle past
/// the timeout, or older than `max_age`.
fn by_age(entry: &lb_common::Service, v: &AffinityValue, now: u64) -> Option<Stale> {
    let idle = now.saturating_sub(v.last_seen_ns);
    let age = now.saturating_sub(v.created_ns);
    if idle > entry.timeout_ns {
        return Some(Stale::Idle(idle));
    }
    if entry.max_age_ns != 0 && age > entry.max_age_ns {
        return Some(Stale::Old(age));
    }
    None
}

/// Whether the datapath would re-place this pin for its age alone (see [`by_age`]).
pub fn aged_out(entry: &lb_common::Service, v: &AffinityValue, now: u64) -> bool {
    by_age(entry, v, now).is_some()
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

/// Live pins per service id and per (service id, backend id), and when they were counted.
#[derive(Clone, Debug, Default)]
pub struct PinCounts {
    /// Entries in the table, live or stale.
    pub entries: usize,
    pub by_service: BTreeMap<u32, u64>,
    pub by_backend: BTreeMap<(u32, u32), u64>,
    /// When the scan started (CLOCK_MONOTONIC_COARSE ns, as pins' timestamps).
    pub scan_started_ns: u64,
    /// By service name (`[services.balance]` only): pins made since the previous scan started
    /// on another backend than plain Maglev would have chosen.
    pub past_choice: BTreeMap<String, u64>,
}

/// What judging pins needs of the model, copied out under the daemon lock (without the Maglev
/// tables) so that scans of the whole table run without it.
#[derive(Clone)]
pub struct View {
    pub services: Vec<ServiceRt>,
    /// The plain Maglev tables (without `[services.balance]`) of balanced services, by service
    /// id, and what the client hash needs, for counting placements past the plain choice.
    pub plain: BTreeMap<u32, std::sync::Arc<Vec<u32>>>,
    pub hash_seed: u32,
    pub maglev_m: u32,
}

impl View {
    /// The model without tables (list, flush, dry runs).
    pub fn of(rt: &Runtime) -> Self {
        Self {
            services: rt.services.iter().map(ServiceRt::without_table).collect(),
            plain: BTreeMap::new(),
            hash_seed: rt.global.hash_seed,
            maglev_m: rt.global.maglev_m,
        }
    }

    /// `of`, plus the plain tables of balanced services (a Maglev build each), for the pin
    /// counter's count of placements past the plain choice.
    pub fn for_counting(rt: &Runtime) -> Self {
        let m = rt.global.maglev_m;
        let mut v = Self::of(rt);
        v.plain = rt
            .services
            .iter()
            .filter(|s| !s.config.balance.is_off())
            .map(|s| (s.entry.id, std::sync::Arc::new(s.plain_table(m))))
            .collect();
        v
    }

    fn by_name(&self, name: Option<&str>) -> Result<Vec<&ServiceRt>> {
        match name {
            Some(n) => match self.services.iter().find(|s| s.config.name == n) {
                Some(s) => Ok(vec![s]),
                None => Err(NotFound(format!("no service named {n:?}")).into()),
            },
            None => Ok(self.services.iter().collect()),
        }
    }
}

/// Counts the live pins of every service: one scan of the table, a batch at a time. With
/// `since` (the previous scan's start), also the pins of balanced services made since then on
/// another backend than their plain Maglev choice.
pub fn count(view: &View, table: &PinTable, since: Option<u64>) -> Result<PinCounts> {
    let now = monotonic_coarse_ns();
    // Per service: its timeouts and whether it fails open; per (service, backend): up or not.
    let by_id: BTreeMap<u32, &ServiceRt> = view.services.iter().map(|s| (s.entry.id, s)).collect();
    let mut c = PinCounts { scan_started_ns: now, ..Default::default() };
    let mut past: BTreeMap<u32, u64> = BTreeMap::new();
    c.entries = table.scan(|k, v| {
        let Some(s) = by_id.get(&k.service_id) else { return };
        if staleness(s, v, now).is_none() {
            *c.by_service.entry(k.service_id).or_default() += 1;
            *c.by_backend.entry((k.service_id, v.backend_id)).or_default() += 1;
        }
        if let (Some(since), Some(plain)) = (since, view.plain.get(&k.service_id))
            && v.created_ns >= since
            && v.created_ns < now
            && !plain.is_empty()
        {
            let slot = client_slot(view.hash_seed, &k.addr, view.maglev_m) as usize;
            if plain.get(slot).is_some_and(|id| *id != v.backend_id) {
                *past.entry(k.service_id).or_default() += 1;
            }
        }
    })?;
    c.past_choice = past.into_iter().filter_map(|(id, n)| by_id.get(&id).map(|s| (s.config.name.clone(), n))).collect();
    Ok(c)
}

/// Live pins that name what `doomed` lists, by service id: per service id, every backend (None)
/// or these backend ids. One scan, outside the daemon lock (`lb reload --dry-run` and friends).
pub fn count_doomed(
    view: &View,
    table: &PinTable,
    doomed: &BTreeMap<u32, Option<std::collections::BTreeSet<u32>>>,
) -> Result<BTreeMap<u32, u64>> {
    let now = monotonic_coarse_ns();
    let by_id: BTreeMap<u32, &ServiceRt> = view.services.iter().map(|s| (s.entry.id, s)).collect();
    let mut out: BTreeMap<u32, u64> = BTreeMap::new();
    table.scan(|k, v| {
        let (Some(s), Some(which)) = (by_id.get(&k.service_id), doomed.get(&k.service_id)) else { return };
        if staleness(s, v, now).is_none() && which.as_ref().is_none_or(|ids| ids.contains(&v.backend_id)) {
            *out.entry(k.service_id).or_default() += 1;
        }
    })?;
    Ok(out)
}

/// The backend `addr:port` in `candidates`: (service id, backend id) pairs.
fn backend_ids(candidates: &[&ServiceRt], backend: &str) -> Result<Vec<(u32, u32)>> {
    let addr = crate::api::parse_backend(backend).map_err(BadRequest)?;
    let ids: Vec<(u32, u32)> = candidates
        .iter()
        .filter_map(|s| s.backend(addr.ip(), addr.port()).map(|b| (s.entry.id, b.id)))
        .collect();
    if ids.is_empty() {
        return Err(NotFound(format!(
            "no backend {addr} in {}",
            if candidates.len() == 1 { "that service" } else { "any service" }
        ))
        .into());
    }
    Ok(ids)
}

/// A pin kept for `lb affinity list`, ordered by (service rank, client address) alone: unique,
/// since a service has each key once.
struct Kept {
    order: (usize, [u32; 4]),
    key: AffinityKey,
    value: AffinityValue,
}

impl PartialEq for Kept {
    fn eq(&self, other: &Self) -> bool {
        self.order == other.order
    }
}

impl Eq for Kept {}

impl PartialOrd for Kept {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Kept {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order.cmp(&other.order)
    }
}

/// `lb affinity list`: with a limit, only the first `limit` pins (by service name, then client
/// address) are kept while scanning, so a table of millions costs no more memory than the answer.
pub fn list(view: &View, table: &PinTable, q: &ListQuery) -> Result<AffinityList> {
    let mut svcs = view.by_name(q.service.as_deref())?;
    let wanted_backends = q.backend.as_deref().map(|b| backend_ids(&svcs, b)).transpose()?;
    // Services in name order: their position is the first sort key.
    svcs.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    let rank: BTreeMap<u32, usize> = svcs.iter().enumerate().map(|(i, s)| (s.entry.id, i)).collect();
    let limit = q.limit.unwrap_or(usize::MAX);
    let mut kept: std::collections::BinaryHeap<Kept> = Default::default();
    let mut matched = 0;
    let entries = table.scan(|k, v| {
        let Some(&r) = rank.get(&k.service_id) else { return };
        if wanted_backends.as_ref().is_some_and(|w| !w.contains(&(k.service_id, v.backend_id))) {
            return;
        }
        matched += 1;
        if limit == 0 {
            return;
        }
        let order = (r, k.addr.map(u32::from_be));
        if kept.len() < limit {
            kept.push(Kept { order, key: *k, value: *v });
        } else if kept.peek().is_some_and(|top| order < top.order) {
            kept.pop();
            kept.push(Kept { order, key: *k, value: *v });
        }
    })?;
    let now = monotonic_coarse_ns();
    let pins = kept.into_sorted_vec().into_iter().map(|p| judge(svcs[p.order.0], &p.key, &p.value, now)).collect();
    Ok(AffinityList { table_entries: entries, table_capacity: table.capacity(), matched, pins })
}

/// `lb affinity flush`.
pub fn flush(view: &View, table: &PinTable, req: &FlushRequest) -> Result<FlushReport> {
    Ok(flush_pins(view, table, req)?.0)
}

/// `flush`, and the live pins it deleted (key, backend id), for the journal of moves.
pub fn flush_pins(view: &View, table: &PinTable, req: &FlushRequest) -> Result<(FlushReport, Vec<(AffinityKey, u32)>)> {
    let svcs = view.by_name(req.service.as_deref())?;
    let now = monotonic_coarse_ns();
    let by_id: BTreeMap<u32, &ServiceRt> = view.services.iter().map(|s| (s.entry.id, s)).collect();
    let live = |k: &AffinityKey, v: &AffinityValue| by_id.get(&k.service_id).is_some_and(|s| staleness(s, v, now).is_none());
    let mut moved = Vec::new();
    let doomed: Vec<AffinityKey> = match (req.client, req.backend.as_deref(), req.all) {
        (Some(client), None, false) => {
            let keys: Vec<AffinityKey> =
                svcs.iter().filter(|s| s.config.vip.is_ipv6() == client.is_ipv6()).map(|s| client_key(s, client)).collect();
            for k in &keys {
                if let Some(v) = table.get(k)?
                    && live(k, &v)
                {
                    moved.push((*k, v.backend_id));
                }
            }
            keys
        }
        (None, Some(backend), false) => {
            let ids = backend_ids(&svcs, backend)?;
            let mut keys = Vec::new();
            table.scan(|k, v| {
                if ids.contains(&(k.service_id, v.backend_id)) {
                    keys.push(*k);
                    if live(k, v) {
                        moved.push((*k, v.backend_id));
                    }
                }
            })?;
            keys
        }
        (None, None, true) => {
            let ids: Vec<u32> = svcs.iter().map(|s| s.entry.id).collect();
            let mut keys = Vec::new();
            table.scan(|k, v| {
                if ids.contains(&k.service_id) {
                    keys.push(*k);
                    if live(k, v) {
                        moved.push((*k, v.backend_id));
                    }
                }
            })?;
            keys
        }
        _ => return Err(BadRequest("name exactly one of: a client address, --backend ADDRESS:PORT, --all".into()).into()),
    };
    Ok((FlushReport { flushed: table.delete(&doomed)? }, moved))
}

/// `lb explain`: for each service of the client's family (or the one named).
pub fn explain(rt: &Runtime, dp: &Datapath, client: IpAddr, service: Option<&str>) -> Result<Vec<Explanation>> {
    let named: Vec<&ServiceRt> = match service {
        Some(n) => vec![rt.service(n).ok_or_else(|| NotFound(format!("no service named {n:?}")))?],
        None => rt.services.iter().collect(),
    };
    let svcs: Vec<&ServiceRt> = named.into_iter().filter(|s| s.config.vip.is_ipv6() == client.is_ipv6()).collect();
    if svcs.is_empty() {
        return Err(NotFound(format!(
            "no {} service{}",
            if client.is_ipv6() { "IPv6" } else { "IPv4" },
            service.map(|n| format!(" named {n:?}")).unwrap_or_default()
        ))
        .into());
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
        // Bounded loads and slow start change the table: what plain Maglev would have said.
        let past_choice = if s.config.balance.is_off() {
            None
        } else {
            let plain = s.plain_table(m).get(slot as usize).copied();
            match (plain.and_then(|id| s.backends.iter().find(|b| b.id == id)), maglev) {
                (Some(p), Some(live)) if p.id != live.id => Some(format!(
                    "its plain Maglev choice is {}, passed over: {}",
                    endpoint(p),
                    if p.balance.over_bound {
                        format!(
                            "over the load bound ({:.0} > {:.0} {}/s)",
                            p.balance.load, p.balance.bound, s.config.balance.load
                        )
                    } else if let Some(pct) = p.balance.ramp_percent() {
                        format!("it ramps up (slow start, {pct} % of its weight)")
                    } else {
                        "another backend ramps up or is over the bound, and the table's slots moved with it".to_string()
                    }
                )),
                _ => None,
            }
        };
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
        let reason = match (&past_choice, via) {
            (Some(p), "maglev") => format!("{reason}; {p}"),
            _ => reason,
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
            past_choice,
            reason,
            history: Vec::new(),
        });
    }
    Ok(out)
}

