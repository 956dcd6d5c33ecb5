//! The running daemon's state and what the control API asks of it: status, reload, drains,
//! health events, pins. One mutex guards it ([`Shared`]); nothing done under it scans the
//! affinity table (pin counts come from [`crate::pincount`], list and flush scan outside it).
//! The lifecycle (start, the main loop, stop) is [`crate::run`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;

use crate::{
    affinity,
    api::{self, Admin, BackendReport, Changes, InterfaceReport, PinCountReport, ServiceReport, StatusReport},
    config::{Config, ConfigErrors},
    datapath::Datapath,
    health::{self, HealthChecker},
    pincount::PinCounter,
    state::{BackendBalance, BackendRt, RAMP_STEPS, Runtime},
};

/// The daemon, shared by the main loop, the API servers and the pin counter.
pub type Shared = Arc<Mutex<Daemon>>;

/// Why the daemon's main loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Leave the datapath running on its pinned state (SIGTERM, SIGINT).
    Leave,
    /// Detach and remove the pinned state (`lb down` while running).
    Down,
}

/// A reload that was not applied; the running config stays in force.
#[derive(Debug)]
pub enum ReloadError {
    /// The config has errors.
    Invalid(ConfigErrors),
    /// It changes what cannot change while lb runs, or names what this host lacks.
    Refused(String),
    /// Applying it failed (a map write, an attach); everything done was undone.
    Failed(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Invalid(e) => write!(f, "{e}"),
            ReloadError::Refused(m) | ReloadError::Failed(m) => f.write_str(m),
        }
    }
}

/// Counter samples for rates (new pins per second): one per refresh tick, the last minute's.
#[derive(Default)]
pub struct Rates {
    samples: std::collections::VecDeque<(Instant, BTreeMap<RateKey, u64>)>,
}

/// A service (backend `None`) or one of its backends, by id.
type RateKey = (u32, Option<u32>);

/// How far back rates look.
const RATE_WINDOW: Duration = Duration::from_secs(60);

impl Rates {
    fn add(&mut self, at: Instant, counts: BTreeMap<RateKey, u64>) {
        self.samples.push_back((at, counts));
        while self.samples.len() > 1 && at.duration_since(self.samples[0].0) > RATE_WINDOW {
            self.samples.pop_front();
        }
    }

    /// Per second since the oldest sample, for a counter that is `now_count` now; 0 when there
    /// is no sample of it yet (or the counter went back: its id was reused).
    fn per_sec(&self, key: RateKey, now_count: u64, now: Instant) -> f64 {
        let Some((at, counts)) = self.samples.front() else { return 0.0 };
        let secs = now.duration_since(*at).as_secs_f64();
        match counts.get(&key) {
            Some(&then) if secs > 0.0 && now_count >= then => (now_count - then) as f64 / secs,
            _ => 0.0,
        }
    }
}

/// The running state the control API reads and changes.
pub struct Daemon {
    pub config_path: PathBuf,
    pub config: Config,
    pub rt: Runtime,
    pub dp: Datapath,
    pub adopted: bool,
    pub started: SystemTime,
    pub health: HealthChecker,
    pub stop: mpsc::UnboundedSender<Stop>,
    pub rates: Rates,
    /// Keeps the VIP routes for BIRD (`[announce]`); none without that table.
    pub announcer: Option<crate::announce::Announcer>,
    /// Keeps the backends' next hops resolved (managed neighbour entries).
    pub neighbours: Option<crate::neighbours::Keeper>,
    /// Pin counts, kept by a thread of their own.
    pub pins: PinCounter,
    /// This daemon, for the threads it starts (set once it is shared).
    pub me: std::sync::Weak<Mutex<Daemon>>,
    /// Attached veths whose peer drops what lb sends into them ([`crate::environment`]),
    /// refreshed at start, after reloads and every half minute.
    pub veth_warnings: Vec<String>,
    /// NAT backends that take packets but send no replies back through the balancer.
    pub replies: ReplyWatch,
    /// Recent counters of the backends of balanced services ([`crate::balance`]).
    pub loads: crate::balance::Loads,
    /// New connections per client prefix, and the prefixes split ([`crate::balance`]).
    pub hot: crate::balance::HotPrefixes,
    /// Balance ticks so far (hot prefixes are judged every other one).
    pub ticks: u64,
    /// The moves of known clients ([`crate::journal`]).
    pub journal: crate::journal::Journal,
    /// The last minutes, for the status page's charts ([`crate::trend`]).
    pub trend: crate::trend::Trend,
}

/// The `to` of a move whose pin was deleted: the client's next packet places it.
pub const PLACED_AFRESH: &str = "(placed afresh)";

/// How long a NAT backend may take packets without one reply coming back through the balancer
/// before lb warns (its route back to the clients bypasses the balancer).
pub const NO_REPLY_AFTER: Duration = Duration::from_secs(10);
/// A warning about missing replies ends once the backend took no packets for this long.
const NO_REPLY_FORGET: Duration = Duration::from_secs(60);

/// Per NAT backend (service id, backend id): its packet and reply counters at the last sample,
/// since when packets grew while replies did not, and when packets last grew.
#[derive(Default)]
pub struct ReplyWatch {
    seen: BTreeMap<(u32, u32), Silence>,
}

#[derive(Clone, Copy)]
struct Silence {
    packets: u64,
    replies: u64,
    at: Instant,
    silent_since: Option<Instant>,
    packets_grew: Instant,
    warned: bool,
}

impl ReplyWatch {
    /// Takes one sample of a backend's counters; true when it has just become silent for
    /// [`NO_REPLY_AFTER`] (the caller logs it once).
    fn sample(&mut self, key: (u32, u32), packets: u64, replies: u64, now: Instant) -> bool {
        let fresh = Silence { packets, replies, at: now, silent_since: None, packets_grew: now, warned: false };
        let w = self.seen.entry(key).or_insert(fresh);
        if packets < w.packets || replies < w.replies {
            // The id was reused: a new backend.
            *w = fresh;
            return false;
        }
        if replies > w.replies {
            w.silent_since = None;
            w.warned = false;
        } else if packets > w.packets {
            w.silent_since.get_or_insert(w.at);
            w.packets_grew = now;
        }
        (w.packets, w.replies, w.at) = (packets, replies, now);
        let silent = w.silent_since.is_some_and(|s| now.duration_since(s) >= NO_REPLY_AFTER)
            && now.duration_since(w.packets_grew) < NO_REPLY_FORGET;
        let first = silent && !w.warned;
        w.warned = silent;
        first
    }

    /// How long the backend has taken packets without a reply, when the latest sample found
    /// that past [`NO_REPLY_AFTER`] (so the log, which says so at that sample, and `lb status`
    /// agree).
    fn silent(&self, key: (u32, u32), now: Instant) -> Option<Duration> {
        let w = self.seen.get(&key)?;
        w.warned.then(|| now.duration_since(w.silent_since.unwrap_or(w.at)))
    }

    fn retain(&mut self, live: &std::collections::BTreeSet<(u32, u32)>) {
        self.seen.retain(|k, _| live.contains(k));
    }
}

fn no_reply_warning(service: &str, b: &BackendRt, silent: Duration, packets: u64) -> String {
    format!(
        "service {service}, backend {}: {packets} packets sent to it and no reply came back through the balancer for \
         {}: in NAT mode its replies must return through lb; point the backend's route to the clients (usually its \
         default route) at the balancer, or use mode = \"dsr\" (if the service never answers by design, ignore this)",
        std::net::SocketAddr::new(b.config.address, b.config.port),
        humantime::format_duration(Duration::from_secs(silent.as_secs()))
    )
}

fn time_string(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Slots per backend id in a Maglev table (one pass over it).
fn slot_counts(table: &[u32]) -> BTreeMap<u32, u32> {
    let mut m = BTreeMap::new();
    for id in table {
        *m.entry(*id).or_insert(0) += 1;
    }
    m
}

fn backend_report(
    b: &BackendRt,
    balance: &crate::config::BalanceConfig,
    slots: u32,
    counters: api::CountersReport,
    pinned: u64,
    new_pins_per_sec: f64,
) -> BackendReport {
    BackendReport {
        id: b.id,
        address: b.config.address.to_string(),
        port: b.config.port,
        weight: b.config.weight,
        state: b.state_name().into(),
        healthy: b.healthy,
        admin: b.admin,
        since: time_string(b.changed_at),
        reason: b.reason.clone(),
        slots,
        pinned,
        new_pins_per_sec,
        moves_per_min: 0,
        counters,
        config_state: b.config.state.to_string(),
        differs_from_config: differs_from_config(b),
        balance: (!balance.is_off()).then(|| api::BackendBalanceReport {
            load: b.balance.load,
            bound: (balance.load_bound.is_some() && b.balance.bound > 0.0 && b.eligible()).then_some(b.balance.bound),
            over_bound: b.balance.over_bound,
            ramping_percent: b.balance.ramp_percent(),
        }),
    }
}

/// A note when `lb drain`/`lb undrain` left a backend in another admin state than its config
/// says.
fn differs_from_config(b: &BackendRt) -> Option<String> {
    let configured = match b.config.state {
        crate::config::BackendState::Active => Admin::Active,
        crate::config::BackendState::Draining => Admin::Draining,
    };
    if b.admin == configured {
        return None;
    }
    let now = match b.admin {
        Admin::Active => "undrained (lb undrain)",
        Admin::Draining => "draining (lb drain)",
        Admin::Forced => "drained (lb drain --force)",
    };
    Some(format!(
        "{now} at run time, but the config says state = \"{}\": kept across restarts and reloads until the file's \
         state for it changes; set it in the file to make it last",
        b.config.state
    ))
}

impl Daemon {
    /// What the pin counter needs of the model (taken under the lock: cheap, plus a Maglev build
    /// per balanced service for the plain tables).
    pub fn pin_view(&self) -> affinity::View {
        affinity::View::for_counting(&self.rt)
    }

    /// `lb status` (and the metrics): no table scan; pin counts are the counter's latest.
    pub fn status(&self) -> Result<StatusReport> {
        let snap = self.pins.snapshot();
        let counts = snap.latest.as_ref().map(|c| &c.counts);
        let now = Instant::now();
        let recent = self.journal.since(SystemTime::now() - Duration::from_secs(60));
        let mut services = Vec::new();
        for s in &self.rt.services {
            let id = s.entry.id;
            let slots = slot_counts(&s.table);
            let mut backends = Vec::new();
            for b in &s.backends {
                let pinned = counts.and_then(|c| c.by_backend.get(&(id, b.id)).copied()).unwrap_or(0);
                let counters = self.dp.backend_counters(b.id)?;
                let rate = self.rates.per_sec((id, Some(b.id)), counters.new_pins, now);
                let mut r = backend_report(b, &s.config.balance, slots.get(&b.id).copied().unwrap_or(0), counters, pinned, rate);
                r.moves_per_min = recent.by_backend.get(&(s.config.name.clone(), SocketAddr::new(b.config.address, b.config.port).to_string())).copied().unwrap_or(0);
                backends.push(r);
            }
            let counters = self.dp.service_counters(id)?;
            services.push(ServiceReport {
                id,
                name: s.config.name.clone(),
                vip: s.config.vip.to_string(),
                port: s.config.port,
                protocol: s.config.protocol.to_string(),
                affinity_timeout: humantime::format_duration(s.config.affinity.timeout).to_string(),
                affinity_max_age: s.config.affinity.max_age.map(|d| humantime::format_duration(d).to_string()),
                ipv4_prefix: s.config.affinity.ipv4_prefix,
                ipv6_prefix: s.config.affinity.ipv6_prefix,
                health: s.config.health.kind.to_string(),
                fail_open: s.fail_open,
                table_generation: s.entry.generation,
                table_fingerprint: s.fingerprint(self.rt.global.hash_seed),
                pinned: counts.and_then(|c| c.by_service.get(&id).copied()).unwrap_or(0),
                new_pins_per_sec: self.rates.per_sec((id, None), counters.new_pins, now),
                counters,
                moves: self
                    .journal
                    .counts
                    .iter()
                    .filter(|((svc, _), _)| *svc == s.config.name)
                    .map(|((_, reason), n)| (reason.clone(), *n))
                    .collect(),
                moves_per_min: recent.by_service.get(&s.config.name).copied().unwrap_or(0),
                balance: (!s.config.balance.is_off()).then(|| api::ServiceBalanceReport {
                    load_bound: s.config.balance.load_bound,
                    load: s.config.balance.load.to_string(),
                    slow_start: s.config.balance.slow_start.map(|d| humantime::format_duration(d).to_string()),
                    hot_prefix_share: s.config.balance.hot_prefix_share,
                    split_prefixes: self
                        .hot
                        .split
                        .iter()
                        .filter(|k| k.service_id == id && s.splits_hot())
                        .map(|k| crate::affinity::key_string(s, k))
                        .collect(),
                    placements_past_choice: snap.past_choice_total.get(&s.config.name).copied().unwrap_or(0),
                }),
                backends,
            });
        }
        Ok(StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            config: self.config_path.display().to_string(),
            started: time_string(self.started),
            adopted: self.adopted,
            layout_version: lb_common::LAYOUT_VERSION,
            mode: self.config.datapath.mode.to_string(),
            maglev_table_size: self.config.datapath.maglev_table_size,
            affinity_entries: counts.map_or(0, |c| c.entries),
            affinity_capacity: self.config.datapath.affinity_entries,
            pin_count: PinCountReport {
                counted_at: snap.latest.as_ref().map(|c| time_string(c.started_at)),
                age_secs: snap.latest.as_ref().map(|c| c.started.elapsed().as_secs_f64()),
                took_ms: snap.latest.as_ref().map(|c| c.took.as_secs_f64() * 1e3),
                running: snap.running,
                error: snap.error,
            },
            interfaces: self
                .dp
                .attachments()
                .iter()
                .map(|a| InterfaceReport { name: a.interface.clone(), mode: a.mode.to_string() })
                .collect(),
            services,
            stats: self.dp.stats()?.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            hash_seed: self.rt.global.hash_seed,
            announce: self.announcer.as_ref().map(|a| api::AnnounceReport {
                table: a.table,
                announced: a.announced().iter().map(IpAddr::to_string).collect(),
                grace_secs: a.grace.as_secs_f64(),
            }),
            warnings: self.warnings(),
        })
    }

    /// The VIPs to announce: those with a service that has a backend up (healthy and not
    /// force-drained). Called only once the datapath is attached.
    pub fn wanted_vips(&self) -> std::collections::BTreeSet<IpAddr> {
        self.rt
            .services
            .iter()
            .filter(|s| s.backends.iter().any(|b| b.flags() & lb_common::BACKEND_F_UP != 0))
            .map(|s| s.config.vip)
            .collect()
    }

    /// Tells the announcer what should be announced now.
    fn update_announcements(&self) {
        if let Some(a) = &self.announcer {
            a.set(self.wanted_vips());
        }
    }

    /// Takes a sample of the new-pin counters, for the rates `status` reports, of the NAT
    /// backends' packet and reply counters (logging a backend that just went silent), and a
    /// point of the status page's charts ([`crate::trend`]).
    pub fn sample_rates(&mut self) {
        let mut counts = BTreeMap::new();
        let now = Instant::now();
        let nat = self.config.datapath.mode == crate::config::Mode::Nat;
        let mut live = std::collections::BTreeSet::new();
        // The same counters make a point of the status page's charts.
        let snap = self.pins.snapshot();
        let pinned = snap.latest.as_ref().map(|c| &c.counts);
        let mut seen = Vec::new();
        for s in &self.rt.services {
            if let Ok(c) = self.dp.service_counters(s.entry.id) {
                counts.insert((s.entry.id, None), c.new_pins);
            }
            for b in &s.backends {
                if let Ok(c) = self.dp.backend_counters(b.id) {
                    counts.insert((s.entry.id, Some(b.id)), c.new_pins);
                    let key = (s.entry.id, b.id);
                    live.insert(key);
                    if nat && self.replies.sample(key, c.packets, c.reply_packets, now) {
                        let silent = self.replies.silent(key, now).unwrap_or(NO_REPLY_AFTER);
                        tracing::warn!("{}", no_reply_warning(&s.config.name, b, silent, c.packets));
                    }
                    seen.push(crate::trend::Seen {
                        service_id: s.entry.id,
                        backend_id: b.id,
                        service: s.config.name.clone(),
                        backend: SocketAddr::new(b.config.address, b.config.port).to_string(),
                        state: b.state_name().into(),
                        pinned: pinned.and_then(|p| p.by_backend.get(&key).copied()).unwrap_or(0),
                        new_pins: c.new_pins,
                        packets: c.packets,
                    });
                }
            }
        }
        self.replies.retain(&live);
        self.rates.add(now, counts);
        let moves = self.journal.after(self.trend.last_seq);
        self.trend.last_seq = self.journal.last_seq();
        self.trend.add(now, SystemTime::now(), seen, moves);
    }

    /// Splits the hot client prefixes of the services that split them (every second), and joins
    /// again the prefixes of services that no longer do.
    fn hot_tick(&mut self, now: Instant) {
        if !self.hot.loaded {
            match self.dp.hot_prefixes() {
                Ok(keys) => {
                    self.hot.split = keys.into_iter().collect();
                    self.hot.loaded = true;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "reading HOT_PREFIXES");
                    return;
                }
            }
        }
        let splitting: Vec<(u32, f64)> =
            self.rt.services.iter().filter(|s| s.splits_hot()).map(|s| (s.entry.id, s.config.balance.hot_prefix_share.unwrap_or(1.0))).collect();
        let stale: Vec<lb_common::AffinityKey> =
            self.hot.split.iter().filter(|k| !splitting.iter().any(|(id, _)| *id == k.service_id)).copied().collect();
        for k in stale {
            match self.dp.join_prefix(&k) {
                Ok(()) => {
                    self.hot.split.remove(&k);
                    tracing::info!(service_id = k.service_id, "a split client prefix is joined again (its service no longer splits hot prefixes)");
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "joining a split prefix"),
            }
        }
        if splitting.is_empty() {
            return;
        }
        match self.dp.prefix_new_counts() {
            Ok(c) => self.hot.add(now, c.into_iter().collect()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading PREFIX_NEW");
                return;
            }
        }
        for (id, share) in splitting {
            for (k, got) in self.hot.hot(id, share) {
                if self.hot.split.len() >= lb_common::HOT_PREFIX_ENTRIES as usize {
                    tracing::warn!("HOT_PREFIXES is full: no more client prefixes are split");
                    return;
                }
                let Some(s) = self.rt.services.iter().find(|s| s.entry.id == id) else { continue };
                let (name, prefix) = (s.config.name.clone(), crate::affinity::key_string(s, &k));
                match self.dp.split_prefix(&k) {
                    Ok(()) => {
                        self.hot.split.insert(k);
                        tracing::info!(
                            service = %name,
                            %prefix,
                            share = %format!("{:.0} %", got * 100.0),
                            "a hot client prefix brought more than hot_prefix_share of the new connections: it is split, its clients are pinned by their own address from their next placement (its pin and open connections stay)"
                        );
                    }
                    Err(e) => tracing::warn!(service = %name, %prefix, error = %format!("{e:#}"), "splitting a hot prefix"),
                }
            }
        }
    }

    /// One step of `[services.balance]` (every [`crate::balance::SAMPLE_EVERY`]): samples the
    /// balanced services' backend counters, moves slow-start ramps on, judges each backend
    /// against its service's load bound, and swaps in a new table where that changed it; every
    /// other step, hot prefixes ([`Daemon::hot_tick`]).
    pub fn balance_tick(&mut self) {
        use crate::balance::{Judged, bounds, min_total, ramp_step};
        let now = Instant::now();
        self.ticks += 1;
        if self.ticks.is_multiple_of(2) {
            self.hot_tick(now);
        }
        let mut counts = BTreeMap::new();
        for s in self.rt.services.iter().filter(|s| !s.config.balance.is_off()) {
            for b in &s.backends {
                if let Ok(c) = self.dp.backend_counters(b.id) {
                    counts.insert(b.id, (c.packets, c.bytes, c.new_pins));
                }
            }
        }
        if counts.is_empty() {
            return;
        }
        self.loads.add(now, counts);
        for i in 0..self.rt.services.len() {
            let s = &mut self.rt.services[i];
            let cfg = s.config.balance.clone();
            if cfg.is_off() {
                continue;
            }
            let mut changed = false;
            let name = s.config.name.clone();
            for b in &mut s.backends {
                let Some(since) = b.balance.ramp_since else { continue };
                let step = cfg.slow_start.map_or(RAMP_STEPS, |ss| ramp_step(now.duration_since(since), ss));
                if step >= RAMP_STEPS {
                    b.balance.ramp_since = None;
                    b.balance.ramp_step = RAMP_STEPS;
                    tracing::info!(service = %name, backend = %SocketAddr::new(b.config.address, b.config.port), "slow start done: full weight");
                    changed = true;
                } else if step != b.balance.ramp_step {
                    b.balance.ramp_step = step;
                    changed = true;
                }
            }
            let idx: Vec<usize> = (0..s.backends.len()).filter(|&j| s.backends[j].eligible()).collect();
            let judged: Vec<Judged> = idx
                .iter()
                .map(|&j| {
                    let b = &s.backends[j];
                    let step = if b.balance.ramp_since.is_some() { b.balance.ramp_step } else { RAMP_STEPS };
                    Judged {
                        load: self.loads.rate(b.id, cfg.load),
                        weight: b.config.weight as f64 * step as f64 / RAMP_STEPS as f64,
                        was_over: b.balance.over_bound,
                    }
                })
                .collect();
            let verdicts = match cfg.load_bound {
                Some(bound) => bounds(&judged, bound, min_total(cfg.load)),
                None => judged.iter().map(|_| (false, 0.0)).collect(),
            };
            for b in s.backends.iter_mut() {
                b.balance.load = self.loads.rate(b.id, cfg.load);
                if !b.eligible() && b.balance.over_bound {
                    b.balance.over_bound = false;
                    b.balance.bound = 0.0;
                }
            }
            for (k, &j) in idx.iter().enumerate() {
                let b = &mut s.backends[j];
                let (over, bound) = verdicts[k];
                b.balance.bound = bound;
                if over != b.balance.over_bound {
                    let backend = SocketAddr::new(b.config.address, b.config.port);
                    let (load, unit) = (b.balance.load, cfg.load);
                    if over {
                        tracing::info!(service = %name, %backend, load = %format!("{load:.0} {unit}/s"), bound = %format!("{bound:.0} {unit}/s"), "backend over the load bound: it takes no new clients while above");
                    } else {
                        tracing::info!(service = %name, %backend, load = %format!("{load:.0} {unit}/s"), bound = %format!("{bound:.0} {unit}/s"), "backend back under the load bound: it takes new clients again");
                    }
                    b.balance.over_bound = over;
                    changed = true;
                }
            }
            if changed && let Err(e) = self.rt.rebalance(&mut self.dp, i) {
                tracing::warn!(service = %name, error = %format!("{e:#}"), "writing a rebalanced table");
            }
        }
    }

    /// Names a move the datapath reported and keeps it in the journal.
    pub fn record_move(&mut self, e: &lb_common::MoveEvent) {
        let Some(s) = self.rt.services.iter().find(|s| s.entry.id == e.service_id) else { return };
        let name = |id: u32| {
            if id == u32::MAX {
                // A flush: the client's next packet places it.
                return PLACED_AFRESH.to_string();
            }
            s.backends.iter().find(|b| b.id == id).map_or_else(|| format!("id {id}"), |b| SocketAddr::new(b.config.address, b.config.port).to_string())
        };
        let (from, to) = (name(e.from), name(e.to));
        let key = lb_common::AffinityKey { service_id: e.service_id, addr: e.addr };
        self.journal_move(e.at_ns, &key, from, to, e.reason);
    }

    /// Journals a move of the client `key` of a service that is still here, at `at_ns`
    /// (CLOCK_MONOTONIC_COARSE).
    pub fn journal_move(&mut self, at_ns: u64, key: &lb_common::AffinityKey, from: String, to: String, reason: u32) {
        let Some(s) = self.rt.services.iter().find(|s| s.entry.id == key.service_id) else { return };
        let at = crate::journal::wall_time(at_ns);
        let r = api::MoveRecord {
            seq: 0,
            time: humantime::format_rfc3339_millis(at).to_string(),
            service: s.config.name.clone(),
            client: affinity::key_string(s, key),
            from,
            to,
            reason: lb_common::move_reason::name(reason).to_string(),
        };
        self.journal.push(at, r);
    }

    /// `GET /events`.
    pub fn events(&self, q: &api::EventsQuery) -> Result<Vec<api::MoveRecord>> {
        let keys = match &q.client {
            Some(c) => {
                let ip: IpAddr = c.parse().map_err(|_| api::BadRequest(format!("client {c:?}: not an IP address")))?;
                Some(
                    self.rt
                        .services
                        .iter()
                        .filter(|s| s.config.vip.is_ipv6() == ip.is_ipv6())
                        .map(|s| (s.config.name.clone(), affinity::key_string(s, &affinity::client_key(s, ip))))
                        .collect::<BTreeMap<_, _>>(),
                )
            }
            None => None,
        };
        Ok(self.journal.query(q, keys.as_ref()))
    }

    /// Every warning that holds now, each with its fix.
    pub fn warnings(&self) -> Vec<String> {
        let now = Instant::now();
        let mut out = self.veth_warnings.clone();
        for s in &self.rt.services {
            for b in &s.backends {
                if let Some(silent) = self.replies.silent((s.entry.id, b.id), now) {
                    let packets = self.dp.backend_counters(b.id).map_or(0, |c| c.packets);
                    out.push(no_reply_warning(&s.config.name, b, silent, packets));
                }
            }
        }
        out
    }

    /// Replaces the veth warnings, logging those that are new and those that went away.
    pub fn set_veth_warnings(&mut self, now: Vec<String>) {
        for w in now.iter().filter(|w| !self.veth_warnings.contains(w)) {
            tracing::warn!("{w}");
        }
        for w in self.veth_warnings.iter().filter(|w| !now.contains(w)) {
            tracing::info!(was = %w, "a veth warning no longer holds");
        }
        self.veth_warnings = now;
    }

    /// `lb explain` (point lookups only).
    pub fn explain(&self, client: IpAddr, service: Option<&str>) -> Result<Vec<api::Explanation>> {
        let mut v = affinity::explain(&self.rt, &self.dp, client, service)?;
        for e in &mut v {
            e.history = self.journal.history(&e.service, &e.key, 10);
        }
        Ok(v)
    }

    /// What `lb affinity list` and `flush` need to scan the table without the lock: the model's
    /// view and a handle of the table of their own.
    pub fn scan_handles(&self) -> Result<(affinity::View, crate::datapath::PinTable)> {
        Ok((affinity::View::of(&self.rt), self.dp.pin_table()?))
    }

    /// The config file as a reload would apply it: valid, changing nothing that cannot change
    /// while lb runs, and naming only interfaces this host has.
    pub fn load_for_reload(&self) -> Result<Config, ReloadError> {
        let cfg = Config::load(&self.config_path).map_err(ReloadError::Invalid)?;
        let (old, new) = (&self.config.datapath, &cfg.datapath);
        let fixed = [
            ("datapath.mode", old.mode.to_string(), new.mode.to_string()),
            ("datapath.pin_path", old.pin_path.display().to_string(), new.pin_path.display().to_string()),
            ("datapath.max_services", old.max_services.to_string(), new.max_services.to_string()),
            ("datapath.max_backends", old.max_backends.to_string(), new.max_backends.to_string()),
            ("datapath.maglev_table_size", old.maglev_table_size.to_string(), new.maglev_table_size.to_string()),
            ("datapath.affinity_entries", old.affinity_entries.to_string(), new.affinity_entries.to_string()),
            ("control.socket", self.config.control.socket.display().to_string(), cfg.control.socket.display().to_string()),
            ("control.metrics", cfg_metrics_text(self.config.control.metrics), cfg_metrics_text(cfg.control.metrics)),
            ("announce", announce_text(&self.config), announce_text(&cfg)),
        ];
        for (field, was, now) in fixed {
            if was != now {
                return Err(ReloadError::Refused(format!(
                    "{field} changed ({was} -> {now}): it cannot change while lb runs; restart lb for it \
                     (capacities also need `lb down` first, which drops every pin)"
                )));
            }
        }
        let added: Vec<String> = new.interfaces.iter().filter(|i| !old.interfaces.contains(i)).cloned().collect();
        let missing: Vec<&String> = added.iter().filter(|i| nix::net::if_::if_nametoindex(i.as_str()).is_err()).collect();
        if !missing.is_empty() {
            return Err(ReloadError::Refused(format!(
                "datapath.interfaces: no interface named {} in this network namespace",
                missing.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(cfg)
    }

    /// Re-reads the config file and applies it whole, or not at all: a config with errors, or
    /// that changes what cannot change while lb runs, is refused before anything is touched; a
    /// failure while applying (a map write, an attach) undoes what was done — maps, interfaces —
    /// and the health targets, announcements and neighbour entries never see the attempt.
    pub fn reload(&mut self) -> Result<Changes, ReloadError> {
        let cfg = self.load_for_reload()?;
        let (old, new) = (&self.config.datapath, &cfg.datapath);
        let added: Vec<String> = new.interfaces.iter().filter(|i| !old.interfaces.contains(i)).cloned().collect();
        let removed: Vec<String> = old.interfaces.iter().filter(|i| !new.interfaces.contains(i)).cloned().collect();
        // Maps first, so that a new interface sees the whole new config from its first packet;
        // then the new interfaces. Either failing undoes both.
        let before = self.rt.clone();
        let mut attached: Vec<&String> = Vec::new();
        let staged = self.rt.stage(&cfg, &mut self.dp).context("writing the new config to the maps").and_then(|staged| {
            for iface in &added {
                self.dp.attach(iface, new.xdp_mode).with_context(|| format!("attaching XDP to {iface}"))?;
                attached.push(iface);
                tracing::info!(interface = %iface, "attached XDP (reload)");
            }
            Ok(staged)
        });
        let (mut changes, retired) = match staged {
            Ok(s) => s,
            Err(e) => {
                let mut msg = format!("applying the config failed: {e:#}; ");
                for iface in attached {
                    if let Err(d) = self.dp.detach(iface) {
                        msg.push_str(&format!("detaching {iface} again failed ({d:#}); "));
                    }
                }
                match self.rt.rollback(&mut self.dp, before) {
                    Ok(()) => msg.push_str("everything it changed was undone, the running config stays in force"),
                    Err(r) => msg.push_str(&format!("undoing it failed too ({r:#}): the maps may hold part of it; reload again")),
                }
                return Err(ReloadError::Failed(msg));
            }
        };
        // Committed from here on: the pins of what was removed go, outside the lock, then their ids.
        if !retired.is_empty() {
            match self.dp.pin_table() {
                Ok(table) => {
                    self.retire_in_background(table, retired);
                    changes.pins_flushing = true;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "a second handle on AFFINITY: deleting the removed pins under the lock");
                    match self.rt.commit(&mut self.dp, retired) {
                        Ok(n) => changes.pins_flushed += n,
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "deleting the pins of removed services and backends"),
                    }
                }
            }
        }
        for iface in &removed {
            if let Err(e) = self.dp.detach(iface) {
                tracing::warn!(interface = %iface, error = %format!("{e:#}"), "detaching XDP (reload)");
            } else {
                tracing::info!(interface = %iface, "detached XDP (reload)");
            }
        }
        self.config = cfg;
        self.journal.configure(&self.config.control.journal);
        self.health.set_targets(self.rt.health_targets());
        self.update_announcements();
        if let Some(k) = &self.neighbours {
            k.set(self.rt.backend_addrs());
        }
        self.pins.wake();
        if !added.is_empty() {
            let w = crate::environment::veth_warnings(&self.config.datapath.interfaces);
            self.set_veth_warnings(w);
        }
        Ok(changes)
    }

    /// Deletes the pins that name what a reload removed, scanning the table on a thread of its
    /// own without the lock, then (under the lock, briefly) frees their ids: until then no new
    /// backend can take one, so no pin can come to name a backend it was not made for.
    fn retire_in_background(&self, table: crate::datapath::PinTable, retired: crate::state::Retired) {
        let me = self.me.clone();
        let pins = self.pins.clone();
        let spawned = std::thread::Builder::new().name("lb-retire".into()).spawn(move || {
            let t = Instant::now();
            let now = crate::datapath::monotonic_coarse_ns();
            let mut doomed = Vec::new();
            let mut moved = Vec::new();
            let r = table.scan(|k, v| {
                if retired.doomed(k, v) {
                    doomed.push(*k);
                    if let Some(from) = retired.moved_from(k, v, now) {
                        moved.push((*k, from.to_string()));
                    }
                }
            });
            let r = r.and_then(|_| table.delete(&doomed));
            match r {
                Ok(n) => tracing::info!(
                    deleted = n,
                    took_ms = t.elapsed().as_secs_f64() * 1e3,
                    "deleted the pins of removed services and backends; their ids are free again"
                ),
                // Their ids stay taken: better an id lost until restart than a pin misdirected.
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "deleting the pins of removed services and backends: their ids stay taken");
                    return;
                }
            }
            if let Some(d) = me.upgrade() {
                let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
                d.rt.release(retired);
                // Their clients move: journaled, to where their next packet places them.
                for (k, from) in moved {
                    d.journal_move(now, &k, from, PLACED_AFRESH.into(), lb_common::move_reason::BACKEND_REMOVED);
                }
            }
            pins.wake();
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "starting the thread that deletes removed pins: their ids stay taken");
        }
    }

    /// `lb drain` / `lb undrain`. The pin count reported is the counter's latest.
    /// `lb drain`/`lb undrain`: the backend as it is now, and whether this changed it.
    pub fn set_admin(&mut self, service: &str, addr: IpAddr, port: u16, admin: Admin) -> Result<(BackendReport, bool)> {
        let mut changed = false;
        let slow_start = self.rt.service(service).is_some_and(|s| s.config.balance.slow_start.is_some());
        let b = self.rt.update_backend(&mut self.dp, service, addr, port, |b| {
            if b.admin == admin {
                return false;
            }
            changed = true;
            // An undrained backend ramps up (slow start).
            if slow_start && admin == Admin::Active && b.healthy {
                b.balance = BackendBalance::ramping(Instant::now());
            }
            b.admin = admin;
            b.changed_at = SystemTime::now();
            b.reason = match admin {
                Admin::Active => "undrained by lb undrain".into(),
                Admin::Draining => "drained by lb drain".into(),
                Admin::Forced => "drained by lb drain --force".into(),
            };
            true
        })?;
        if !changed {
            let s = self.rt.service(service).expect("found just now");
            let slots = s.table.iter().filter(|id| **id == b.id).count() as u32;
            let pinned = self.pins.snapshot().latest.and_then(|c| c.counts.by_backend.get(&(s.entry.id, b.id)).copied()).unwrap_or(0);
            return Ok((backend_report(&b, &s.config.balance, slots, self.dp.backend_counters(b.id)?, pinned, 0.0), false));
        }
        tracing::info!(service, backend = %std::net::SocketAddr::new(addr, port), state = b.state_name(), reason = %b.reason, "backend state changed");
        self.update_announcements();
        self.pins.wake();
        let s = self.rt.service(service).expect("updated just now");
        let slots = s.table.iter().filter(|id| **id == b.id).count() as u32;
        let pinned = self.pins.snapshot().latest.and_then(|c| c.counts.by_backend.get(&(s.entry.id, b.id)).copied()).unwrap_or(0);
        Ok((backend_report(&b, &s.config.balance, slots, self.dp.backend_counters(b.id)?, pinned, 0.0), true))
    }

    /// Applies a health checker's verdict. Logs how long after the verdict the maps held it
    /// (`applied_ms`: waiting for the lock included) and whether a pin count was running.
    pub fn on_health(&mut self, ev: health::Event) {
        let reason = ev.reason.clone();
        let slow_start = self.rt.service(&ev.key.service).is_some_and(|s| s.config.balance.slow_start.is_some());
        let r = self.rt.update_backend(&mut self.dp, &ev.key.service, ev.key.address, ev.key.port, |b| {
            if b.healthy == ev.up {
                return false;
            }
            // A recovered backend ramps up (slow start).
            if slow_start && ev.up && b.admin == Admin::Active {
                b.balance = BackendBalance::ramping(Instant::now());
            }
            b.healthy = ev.up;
            b.changed_at = ev.at;
            b.reason = format!("health check: {reason}");
            true
        });
        let applied_ms = ev.at.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let counting = self.pins.snapshot().running;
        let backend = std::net::SocketAddr::new(ev.key.address, ev.key.port);
        match r {
            Ok(b) if ev.up => tracing::info!(service = %ev.key.service, %backend, state = b.state_name(), reason = %ev.reason, applied_ms, during_pin_count = counting, "backend is up"),
            Ok(b) => tracing::warn!(service = %ev.key.service, %backend, state = b.state_name(), reason = %ev.reason, applied_ms, during_pin_count = counting, "backend is down: its clients move to other backends"),
            // A check of a backend a reload just removed.
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "health event for an unknown backend"),
        }
        self.update_announcements();
        self.pins.wake();
    }

    /// Asks the main loop to stop.
    pub fn request_stop(&self, how: Stop) {
        let _ = self.stop.send(how);
    }

    /// How long `lb down` should wait for this daemon to stop: the announce grace, if any.
    pub fn stop_grace(&self) -> Duration {
        self.announcer.as_ref().map_or(Duration::ZERO, |a| a.grace)
    }
}

pub fn announce_text(c: &Config) -> String {
    c.announce.as_ref().map_or_else(|| "none".to_string(), |a| format!("table {} grace {}", a.table, humantime::format_duration(a.grace)))
}

pub fn cfg_metrics_text(m: Option<std::net::SocketAddr>) -> String {
    m.map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"))
}
