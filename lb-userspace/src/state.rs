//! The daemon's model of what the datapath holds, and the one place that changes it: stable
//! service and backend ids, backend states (health, drain), Maglev tables, and the order of map
//! writes that keeps every packet consistent.
//!
//! Identity: a service is its `name`, a backend is (service, address, port). Ids stay with an
//! identity across reloads and restarts, so a pin (which stores a backend id) keeps meaning the
//! same backend. Freed ids are reused oldest-first, after every pin that named them is deleted.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail};
use lb_common::{
    ADDR_F_BACKEND, ADDR_F_VIP, ADDR_FILTER_WORDS, AddrKey, BACKEND_F_DRAINING, BACKEND_F_FORCED, BACKEND_F_HEALTH_DOWN,
    BACKEND_F_IN_USE, BACKEND_F_UP, Backend, GlobalConfig, LAYOUT_VERSION, SERVICE_F_FAIL_OPEN, Service, addr_filter_bit,
    v4_mask, v6_mask, FAMILY_V6,
};

pub use crate::api::{Admin, Changes};
use crate::{
    config::{BackendConfig, BackendState, Config, HealthKind, ServiceConfig},
    datapath::{Datapath, Endpoint, addr_key, addr_words, words_addr},
    maglev::{self, MaglevBackend},
};

/// A backend as the daemon tracks it.
#[derive(Clone, Debug)]
pub struct BackendRt {
    pub id: u32,
    pub config: BackendConfig,
    /// Health-check verdict (always true without checks).
    pub healthy: bool,
    pub admin: Admin,
    /// When the health or admin state last changed, and why.
    pub changed_at: SystemTime,
    pub reason: String,
    /// Fairness for new clients (`[services.balance]`), kept by [`crate::balance`].
    pub balance: BackendBalance,
}

/// A backend's part in its service's balance: whether it is over the load bound (it then leaves
/// the Maglev table, so new clients take their next choice), and its slow-start ramp.
#[derive(Clone, Debug, Default)]
pub struct BackendBalance {
    /// Its load (per second, of the service's `balance.load`), at the latest sample.
    pub load: f64,
    /// The load above which it is over the bound, at the latest sample (0: no bound).
    pub bound: f64,
    pub over_bound: bool,
    /// Since when it ramps up (slow start), if it does.
    pub ramp_since: Option<std::time::Instant>,
    /// Its share of its weight while ramping, in steps of 1/[`RAMP_STEPS`]; `RAMP_STEPS` is full.
    pub ramp_step: u32,
}

/// Slow start ramps a backend's weight in this many steps (5 % each).
pub const RAMP_STEPS: u32 = 20;

impl BackendBalance {
    /// Full weight, not over any bound.
    pub fn full() -> Self {
        Self { ramp_step: RAMP_STEPS, ..Default::default() }
    }

    /// Starting a ramp from about 0 (its first step).
    pub fn ramping(now: std::time::Instant) -> Self {
        Self { ramp_since: Some(now), ramp_step: 1, ..Default::default() }
    }

    /// The percentage of its weight it takes now, while ramping.
    pub fn ramp_percent(&self) -> Option<u32> {
        self.ramp_since.map(|_| self.ramp_step * 100 / RAMP_STEPS)
    }
}

impl BackendRt {
    /// The datapath flags for this state.
    pub fn flags(&self) -> u16 {
        let mut f = BACKEND_F_IN_USE;
        if self.healthy && self.admin != Admin::Forced {
            f |= BACKEND_F_UP;
        }
        if self.admin != Admin::Active {
            f |= BACKEND_F_DRAINING;
        }
        if self.admin == Admin::Forced {
            f |= BACKEND_F_FORCED;
        }
        if !self.healthy {
            f |= BACKEND_F_HEALTH_DOWN;
        }
        f
    }

    /// Takes new clients.
    pub fn eligible(&self) -> bool {
        self.healthy && self.admin == Admin::Active
    }

    /// One word for status output: up, down, draining, drained.
    pub fn state_name(&self) -> &'static str {
        match (self.healthy, self.admin) {
            (_, Admin::Forced) => "drained",
            (true, Admin::Draining) => "draining",
            (false, Admin::Draining) => "down",
            (true, Admin::Active) => "up",
            (false, Admin::Active) => "down",
        }
    }

    fn entry(&self, service_id: u32) -> Backend {
        Backend {
            addr: addr_words(self.config.address),
            port: self.config.port.to_be(),
            flags: self.flags(),
            service_id,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServiceRt {
    pub config: ServiceConfig,
    pub key: Endpoint,
    /// The SERVICES entry as last written.
    pub entry: Service,
    pub backends: Vec<BackendRt>,
    /// The live Maglev table (backend ids); shared, so that a copy of the model (a reload's
    /// rollback point) does not copy every table.
    pub table: std::sync::Arc<Vec<u32>>,
    /// A digest of the live table by backend identity (see [`ServiceRt::table_digest`]),
    /// computed when first asked for after the table changed (a reload of many services does
    /// not pay for it).
    pub digest: std::sync::OnceLock<u64>,
    /// Every backend is down and the service routes as if all were up.
    pub fail_open: bool,
}

impl ServiceRt {
    /// A copy without the Maglev table (for judging pins outside the daemon lock).
    pub fn without_table(&self) -> Self {
        Self {
            config: self.config.clone(),
            key: self.key,
            entry: self.entry,
            backends: self.backends.clone(),
            table: Default::default(),
            digest: Default::default(),
            fail_open: self.fail_open,
        }
    }

    /// A digest of `table` by backend address and port, not by datapath id.
    pub fn table_digest(&self, table: &[u32]) -> u64 {
        const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
        // Backend id -> a hash of its identity, as a dense table (one index per slot below).
        let top = self.backends.iter().map(|b| b.id as usize + 1).max().unwrap_or(0);
        let mut identity = vec![0u64; top];
        for b in &self.backends {
            let w = addr_words(b.config.address);
            let words = [w[0], w[1], w[2], w[3], b.config.port as u32];
            identity[b.id as usize] = (lb_common::hash::hash_words(0x4650_5254, &words) as u64) << 32
                | lb_common::hash::hash_words(0x4650_5255, &words) as u64;
        }
        let mut h = FNV_OFFSET;
        for v in std::iter::once(table.len() as u64)
            .chain(table.iter().map(|id| identity.get(*id as usize).copied().unwrap_or(0)))
        {
            h = (h ^ v).wrapping_mul(FNV_PRIME);
        }
        h
    }

    /// The live table's fingerprint with the client hash seed, as `lb status` shows it:
    /// balancer nodes that send every client to the same backend show the same value, whatever
    /// order their configs list the backends in.
    pub fn fingerprint(&self, hash_seed: u32) -> String {
        let digest = *self.digest.get_or_init(|| self.table_digest(&self.table));
        let h = (digest ^ hash_seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        format!("{:016x}", h ^ (h >> 29))
    }

    pub fn backend(&self, addr: IpAddr, port: u16) -> Option<&BackendRt> {
        self.backends.iter().find(|b| b.config.address == addr && b.config.port == port)
    }

    fn reverse_key(&self, b: &BackendRt) -> Endpoint {
        Endpoint::new(b.config.address, b.config.port, self.key.proto())
    }

    /// Whether the service splits hot client prefixes: `balance.hot_prefix_share` is set and its
    /// clients are pinned by a prefix shorter than a whole address.
    pub fn splits_hot(&self) -> bool {
        let a = &self.config.affinity;
        self.config.balance.hot_prefix_share.is_some()
            && if self.config.vip.is_ipv6() { a.ipv6_prefix < 128 } else { a.ipv4_prefix < 32 }
    }

    /// The table without `[services.balance]`: every backend taking new clients at its full
    /// weight (what plain Maglev would choose).
    pub fn plain_table(&self, m: u32) -> Vec<u32> {
        let eligible: Vec<MaglevBackend> = self
            .backends
            .iter()
            .filter(|b| b.eligible())
            .map(|b| MaglevBackend { addr: b.config.address, port: b.config.port, weight: b.config.weight, id: b.id })
            .collect();
        maglev::build(&eligible, m)
    }

    /// The table the current states call for, how many backends it holds, and whether that is
    /// failing open.
    pub fn desired_table(&self, m: u32) -> (Vec<u32>, u32, bool) {
        let pick = |f: &dyn Fn(&BackendRt) -> bool| -> Vec<MaglevBackend> {
            self.backends
                .iter()
                .filter(|b| f(b))
                .map(|b| MaglevBackend { addr: b.config.address, port: b.config.port, weight: b.config.weight, id: b.id })
                .collect()
        };
        // Every backend with a weight gets at least one slot (weights are >= 1, N <= M).
        let mut eligible = pick(&|b| b.eligible());
        if !eligible.is_empty() {
            let balanced = !self.config.balance.is_off();
            if balanced {
                // Slow start: a ramping backend takes its step's share of its weight (all weights
                // scaled alike, so a full table is the plain one). Bounded loads: a backend over
                // the bound leaves the table, so its slots go to each client's next choice,
                // unless every backend is over it (then the plain choice stands).
                let over: Vec<u32> = self.backends.iter().filter(|b| b.eligible() && b.balance.over_bound).map(|b| b.id).collect();
                let all_over = over.len() == eligible.len();
                for e in &mut eligible {
                    let b = self.backends.iter().find(|b| b.id == e.id).expect("picked from them");
                    let step = if b.balance.ramp_since.is_some() { b.balance.ramp_step.clamp(1, RAMP_STEPS) } else { RAMP_STEPS };
                    e.weight *= step;
                    if !all_over && over.contains(&e.id) {
                        e.weight = 0;
                    }
                }
                let n = eligible.iter().filter(|e| e.weight > 0).count() as u32;
                return (maglev::build(&eligible, m), n, false);
            }
            return (maglev::build(&eligible, m), eligible.len() as u32, false);
        }
        // Every backend that may take clients is down: route as if they were all up.
        let active = pick(&|b| b.admin == Admin::Active);
        let fail_open = !active.is_empty();
        (maglev::build(&active, m), active.len() as u32, fail_open)
    }
}

/// The interface the route to a backend leaves by (its side: only replies arriving there are
/// translated), 0 when there is no route to it (nothing from it is translated until there is).
pub fn backend_side(addr: IpAddr) -> u32 {
    match crate::routes::egress(addr) {
        Ok(Some(e)) => e.ifindex,
        Ok(None) => {
            tracing::warn!(backend = %addr, "no route to the backend: its replies are not translated until there is one");
            0
        }
        Err(e) => {
            tracing::warn!(backend = %addr, error = %format!("{e:#}"), "cannot look up the route to the backend");
            0
        }
    }
}

/// Ids handed out oldest-freed first, so a freed id rests as long as possible.
#[derive(Clone, Debug)]
struct IdPool {
    cap: u32,
    next: u32,
    free: VecDeque<u32>,
    used: BTreeSet<u32>,
}

impl IdPool {
    fn new(cap: u32) -> Self {
        Self { cap, next: 0, free: VecDeque::new(), used: BTreeSet::new() }
    }

    fn alloc(&mut self, what: &str) -> Result<u32> {
        let id = match self.free.pop_front() {
            Some(id) => id,
            None if self.next < self.cap => {
                self.next += 1;
                self.next - 1
            }
            None => bail!("no free {what} id: all {} are in use (raise datapath.max_{what}s)", self.cap),
        };
        self.used.insert(id);
        Ok(id)
    }

    /// Marks an id found in pinned state as used.
    fn take(&mut self, id: u32) -> Result<()> {
        if id >= self.cap || !self.used.insert(id) {
            bail!("pinned state names id {id} twice or beyond the capacity {}", self.cap);
        }
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
        } else {
            self.free.retain(|f| *f != id);
        }
        Ok(())
    }

    fn release(&mut self, id: u32) {
        if self.used.remove(&id) {
            self.free.push_back(id);
        }
    }
}

/// What a staged reconcile removed, for its commit: the ids of removed services (with their
/// backends) and of removed backends of services that stay.
#[derive(Debug, Default)]
#[must_use = "commit it (or roll back): the pins and ids of what was removed are still held"]
pub struct Retired {
    services: Vec<(u32, Vec<u32>)>,
    backends: Vec<(u32, Vec<u32>)>,
    /// The removed backends of services that stay, for the journal: (service id, backend id)
    /// to `address:port`, and each such service's datapath entry, to tell the live pins
    /// (clients that move) from the stale ones.
    names: BTreeMap<(u32, u32), String>,
    entries: BTreeMap<u32, Service>,
}

impl Retired {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.backends.is_empty()
    }

    /// Whether a pin names what was removed (and so must go before the ids are freed).
    pub fn doomed(&self, k: &lb_common::AffinityKey, v: &lb_common::AffinityValue) -> bool {
        self.services.iter().any(|(id, _)| *id == k.service_id)
            || self.backends.iter().any(|(s, ids)| *s == k.service_id && ids.contains(&v.backend_id))
    }

    /// For a doomed pin whose service stays and whose client is live at `now` (by idle
    /// timeout and max age): the address of the removed backend it names. Deleting it moves
    /// that client (`backend_removed`).
    pub fn moved_from(&self, k: &lb_common::AffinityKey, v: &lb_common::AffinityValue, now: u64) -> Option<&str> {
        let name = self.names.get(&(k.service_id, v.backend_id))?;
        let entry = self.entries.get(&k.service_id)?;
        (!crate::affinity::aged_out(entry, v, now)).then_some(name.as_str())
    }
}

/// The whole runtime state.
#[derive(Clone)]
pub struct Runtime {
    pub global: GlobalConfig,
    pub services: Vec<ServiceRt>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// `ADDRS` as last written (None: not known yet).
    addrs: Option<BTreeMap<AddrKey, u32>>,
    /// `ADDR_FILTER` as last written (None: not known yet).
    filter: Option<Vec<u64>>,
    /// The side (`Reverse::ifindex`) last written for each backend id, for [`Runtime::refresh_sides`].
    sides: BTreeMap<u32, u32>,
}

/// `ADDR_FILTER` words holding `addrs`.
fn filter_words<'a>(addrs: impl Iterator<Item = &'a AddrKey>) -> Vec<u64> {
    let mut w = vec![0u64; ADDR_FILTER_WORDS as usize];
    for k in addrs {
        let (word, bit) = addr_filter_bit(k.family == FAMILY_V6 as u32, &k.addr);
        w[word as usize] |= 1 << bit;
    }
    w
}

fn service_entry(s: &ServiceConfig, id: u32) -> Service {
    Service {
        id,
        flags: 0,
        timeout_ns: s.affinity.timeout.as_nanos().min(u64::MAX as u128) as u64,
        max_age_ns: s.affinity.max_age.map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64),
        v4_mask: v4_mask(s.affinity.ipv4_prefix as u32),
        table: 0,
        v6_mask: v6_mask(s.affinity.ipv6_prefix as u32),
        backend_count: 0,
        generation: 0,
    }
}

/// `service/address:port`, IPv6 addresses in brackets.
fn backend_label(service: &str, b: &BackendConfig) -> String {
    format!("{service}/{}", std::net::SocketAddr::new(b.address, b.port))
}

pub fn admin_from_config(state: BackendState) -> Admin {
    match state {
        BackendState::Active => Admin::Active,
        BackendState::Draining => Admin::Draining,
    }
}

impl Runtime {
    /// An empty runtime for the capacities of `cfg` (nothing written yet).
    pub fn new(cfg: &Config) -> Self {
        let d = &cfg.datapath;
        Self {
            global: GlobalConfig {
                layout_version: LAYOUT_VERSION,
                hash_seed: d.hash_seed,
                maglev_m: d.maglev_table_size,
                flags: if d.mode == crate::config::Mode::Dsr { lb_common::GLOBAL_F_DSR } else { 0 },
                max_services: d.max_services,
                max_backends: d.max_backends,
                affinity_entries: d.affinity_entries,
                fib_epoch: 0,
                svc_epoch: 0,
                flow_entries: d.flow_entries,
                new_pins_per_cpu: d.max_new_pins_per_cpu,
                _pad: 0,
            },
            services: Vec::new(),
            service_ids: IdPool::new(d.max_services),
            backend_ids: IdPool::new(d.max_backends),
            addrs: None,
            filter: None,
            sides: BTreeMap::new(),
        }
    }

    /// Rebuilds the runtime from pinned maps a previous daemon left (restart): services are
    /// matched to `cfg` by (vip, port, protocol), backends by address and port; their ids, live
    /// table half, health and drain states are kept. Pinned services or backends that `cfg` no
    /// longer has are kept too, so that the reconcile that follows removes them properly.
    pub fn adopt(cfg: &Config, dp: &Datapath) -> Result<Self> {
        let mut rt = Self::new(cfg);
        let pinned_services = dp.services()?;
        let pinned_backends = dp.backends()?;
        let now = SystemTime::now();
        for (key, entry) in pinned_services {
            rt.service_ids.take(entry.id).context("adopting SERVICES")?;
            let config = cfg.services.iter().find(|s| Endpoint::new(s.vip, s.port, s.protocol.number()) == key);
            let (config, name_known) = match config {
                Some(c) => (c.clone(), true),
                None => (orphan_service_config(&key, entry.id), false),
            };
            let mut backends = Vec::new();
            for (id, b) in pinned_backends.iter().filter(|(_, b)| b.service_id == entry.id) {
                rt.backend_ids.take(*id).context("adopting BACKENDS")?;
                let address = words_addr(&b.addr, key.addr().is_ipv6());
                let port = u16::from_be(b.port);
                let bc = config
                    .backends
                    .iter()
                    .find(|c| c.address == address && c.port == port)
                    .cloned()
                    .unwrap_or(BackendConfig { address, port, weight: 1, state: BackendState::Active });
                // A drain made at run time survives the restart; a config that now says
                // draining applies too.
                let admin = if b.flags & BACKEND_F_FORCED != 0 {
                    Admin::Forced
                } else if b.flags & BACKEND_F_DRAINING != 0 || bc.state == BackendState::Draining {
                    Admin::Draining
                } else {
                    Admin::Active
                };
                backends.push(BackendRt {
                    id: *id,
                    config: bc,
                    healthy: b.flags & BACKEND_F_HEALTH_DOWN == 0,
                    admin,
                    changed_at: now,
                    reason: "adopted from the previous daemon".into(),
                    balance: BackendBalance::full(),
                });
            }
            if !name_known {
                tracing::info!(service = %config.name, "pinned service not in the config: will be removed");
            }
            rt.services.push(ServiceRt {
                table: Default::default(),
                digest: Default::default(),
                fail_open: entry.flags & SERVICE_F_FAIL_OPEN != 0,
                key,
                entry,
                backends,
                config,
            });
        }
        Ok(rt)
    }

    pub fn service(&self, name: &str) -> Option<&ServiceRt> {
        self.services.iter().find(|s| s.config.name == name)
    }

    /// Brings the datapath to `cfg`: adds, removes and changes services and backends, keeping
    /// every id (and so every pin) of what stays. Nothing is written for what did not change.
    pub fn reconcile(&mut self, cfg: &Config, dp: &mut Datapath) -> Result<Changes> {
        let (mut ch, retired) = self.stage(cfg, dp)?;
        ch.pins_flushed += self.commit(dp, retired)?;
        Ok(ch)
    }

    /// The part of [`Runtime::reconcile`] that can be undone: every map write, but no pin
    /// deleted and no id freed (that is [`Runtime::commit`]). Should it fail half-way, or the
    /// caller's next step fail, [`Runtime::rollback`] to a copy of the runtime taken before
    /// brings the maps back to that copy.
    pub fn stage(&mut self, cfg: &Config, dp: &mut Datapath) -> Result<(Changes, Retired)> {
        let mut ch = Changes::default();
        let mut retired = Retired::default();
        // (The cache epochs are the datapath's own.)
        let pinned =
            GlobalConfig { fib_epoch: self.global.fib_epoch, svc_epoch: self.global.svc_epoch, ..dp.read_global()? };
        if self.global.hash_seed != cfg.datapath.hash_seed || pinned != self.global {
            self.global.hash_seed = cfg.datapath.hash_seed;
            dp.write_global(self.global)?;
        }
        // The address filter lets through every address old or new before any service or
        // backend is written; `sync_addrs` narrows it to the new ones at the end.
        let new_addrs: Vec<AddrKey> = cfg
            .services
            .iter()
            .flat_map(|s| std::iter::once(s.vip).chain(s.backends.iter().map(|b| b.address)))
            .map(addr_key)
            .collect();
        let mut union = filter_words(new_addrs.iter());
        for (u, h) in union.iter_mut().zip(self.written_filter(dp)?) {
            *u |= h;
        }
        self.sync_filter(dp, union)?;
        // Removed services: those whose name is gone (or orphans from adoption).
        let gone: Vec<usize> = (0..self.services.len())
            .filter(|i| !cfg.services.iter().any(|c| c.name == self.services[*i].config.name))
            .rev()
            .collect();
        for i in gone {
            let s = self.services.remove(i);
            Self::unwrite_service(dp, &s)?;
            retired.services.push((s.entry.id, s.backends.iter().map(|b| b.id).collect()));
            ch.services_removed.push(s.config.name.clone());
        }
        // Update the model first; the services that changed are written afterwards, once their
        // tables are built (in parallel: building is the expensive part of a large reload).
        let mut ordered = Vec::with_capacity(cfg.services.len());
        let mut pending: Vec<(usize, Vec<BackendRt>)> = Vec::new();
        for sc in &cfg.services {
            let pos = self.services.iter().position(|s| s.config.name == sc.name);
            let svc = match pos {
                Some(p) => {
                    let mut s = self.services.remove(p);
                    // An adopted service gets its table rebuilt; that alone is no change.
                    let differs = s.config != *sc
                        || s.backends.len() != sc.backends.len()
                        || s.backends.iter().any(|b| !sc.backends.contains(&b.config));
                    if let Some(removed) = self.update_service(dp, &mut s, sc, &mut ch)? {
                        if differs {
                            ch.services_changed.push(sc.name.clone());
                        }
                        pending.push((ordered.len(), removed));
                    }
                    s
                }
                None => {
                    let s = self.add_service(sc)?;
                    ch.services_added.push(sc.name.clone());
                    ch.backends_added.extend(sc.backends.iter().map(|b| backend_label(&sc.name, b)));
                    pending.push((ordered.len(), Vec::new()));
                    s
                }
            };
            ordered.push(svc);
        }
        let m = self.global.maglev_m;
        let tables = build_tables(pending.iter().map(|(i, _)| &ordered[*i]).collect(), m);
        for ((i, removed), table) in pending.into_iter().zip(tables) {
            let s = &mut ordered[i];
            self.write_service(dp, s, &removed, table)?;
            if !removed.is_empty() {
                retired.backends.push((s.entry.id, removed.iter().map(|b| b.id).collect()));
                for b in &removed {
                    retired.names.insert((s.entry.id, b.id), std::net::SocketAddr::new(b.config.address, b.config.port).to_string());
                }
                retired.entries.insert(s.entry.id, s.entry);
            }
        }
        self.services = ordered;
        self.sync_addrs(dp)?;
        Ok((ch, retired))
    }

    /// Finishes a staged reconcile: deletes the pins that name removed services and backends,
    /// then frees their ids (only then may a new backend take one). Returns the pins deleted.
    /// (The daemon deletes them outside its lock instead: [`Retired::doomed`], then
    /// [`Runtime::release`].)
    pub fn commit(&mut self, dp: &mut Datapath, retired: Retired) -> Result<usize> {
        if retired.is_empty() {
            return Ok(0);
        }
        let n = dp.flush_affinity(|k, v| retired.doomed(k, v))?;
        self.release(retired);
        Ok(n)
    }

    /// Frees the ids of what a committed reconcile removed, once no pin names them any more.
    pub fn release(&mut self, retired: Retired) {
        for (id, backend_ids) in retired.services {
            for b in backend_ids {
                self.backend_ids.release(b);
            }
            self.service_ids.release(id);
        }
        for (_, ids) in retired.backends {
            for b in ids {
                self.backend_ids.release(b);
            }
        }
    }

    /// Undoes a staged reconcile that failed or was not committed: the model becomes `before`
    /// (a copy taken before [`Runtime::stage`]) and the maps are written back to it. What the
    /// attempt added is removed (with any pin the datapath made to it meanwhile); what it
    /// removed or changed is written again as it was. Each service's live Maglev half is the
    /// one `before` names, which a stage never writes (it fills the idle half).
    pub fn rollback(&mut self, dp: &mut Datapath, before: Runtime) -> Result<()> {
        *self = before;
        let keys: std::collections::HashSet<Endpoint> = self.services.iter().map(|s| s.key).collect();
        let ids: BTreeSet<u32> = self.services.iter().map(|s| s.entry.id).collect();
        let backend_ids: BTreeSet<u32> = self.services.iter().flat_map(|s| s.backends.iter().map(|b| b.id)).collect();
        let reverse: std::collections::HashSet<Endpoint> =
            self.services.iter().flat_map(|s| s.backends.iter().map(|b| s.reverse_key(b))).collect();
        let mut stray_services = BTreeSet::new();
        for (key, entry) in dp.services()? {
            if !keys.contains(&key) {
                dp.remove_service(&key)?;
            }
            if !ids.contains(&entry.id) {
                stray_services.insert(entry.id);
            }
        }
        let mut stray_backends = BTreeSet::new();
        for (id, _) in dp.backends()? {
            if !backend_ids.contains(&id) {
                dp.write_backend(id, Backend::default())?;
                stray_backends.insert(id);
            }
        }
        for key in dp.reverse_keys()? {
            if !reverse.contains(&key) {
                dp.remove_reverse(&key)?;
            }
        }
        if !stray_services.is_empty() || !stray_backends.is_empty() {
            dp.flush_affinity(|k, v| stray_services.contains(&k.service_id) || stray_backends.contains(&v.backend_id))?;
        }
        let nat = self.global.flags & lb_common::GLOBAL_F_DSR == 0;
        for s in &self.services {
            for b in &s.backends {
                dp.write_backend(b.id, b.entry(s.entry.id))?;
                if nat {
                    let side = self.sides.get(&b.id).copied().unwrap_or_else(|| backend_side(b.config.address));
                    dp.write_reverse(&s.reverse_key(b), &s.key, s.entry.id, b.id, side)?;
                }
            }
            dp.write_service(&s.key, s.entry)?;
        }
        let pinned = GlobalConfig { fib_epoch: self.global.fib_epoch, svc_epoch: self.global.svc_epoch, ..dp.read_global()? };
        if pinned != self.global {
            dp.write_global(self.global)?;
        }
        // Read ADDRS and ADDR_FILTER back from the maps, and write the difference.
        self.addrs = None;
        self.filter = None;
        self.sync_addrs(dp)
    }

    /// Brings `ADDRS` to the current services, writing only what changed since the last time
    /// (the map is read once, on the first call, to learn what a previous daemon left).
    fn sync_addrs(&mut self, dp: &mut Datapath) -> Result<()> {
        let want = self.addr_flags();
        let have = match self.addrs.take() {
            Some(h) => h,
            None => dp.addrs()?,
        };
        for k in have.keys().filter(|k| !want.contains_key(*k)) {
            dp.set_addr(k, None)?;
        }
        for (k, v) in &want {
            if have.get(k) != Some(v) {
                dp.set_addr(k, Some(*v))?;
            }
        }
        let words = filter_words(want.keys());
        self.addrs = Some(want);
        self.sync_filter(dp, words)
    }

    /// `ADDR_FILTER` as last written (read from the map the first time: a previous daemon's).
    fn written_filter(&mut self, dp: &Datapath) -> Result<&[u64]> {
        if self.filter.is_none() {
            self.filter = Some(dp.addr_filter()?);
        }
        Ok(self.filter.as_deref().unwrap_or_default())
    }

    /// Writes the `ADDR_FILTER` words that differ from `want`.
    fn sync_filter(&mut self, dp: &mut Datapath, want: Vec<u64>) -> Result<()> {
        let have = self.written_filter(dp)?.to_vec();
        for (i, (w, h)) in want.iter().zip(&have).enumerate() {
            if w != h {
                dp.write_addr_filter_word(i as u32, *w)?;
            }
        }
        self.filter = Some(want);
        Ok(())
    }

    /// Every VIP and backend address with its `ADDR_F_*` flags (for packets without ports).
    pub fn addr_flags(&self) -> BTreeMap<AddrKey, u32> {
        let mut m = BTreeMap::new();
        for s in &self.services {
            *m.entry(addr_key(s.config.vip)).or_insert(0) |= ADDR_F_VIP;
            for b in &s.backends {
                *m.entry(addr_key(b.config.address)).or_insert(0) |= ADDR_F_BACKEND;
            }
        }
        m
    }

    /// A new service in the model (written by the caller).
    pub fn add_service(&mut self, sc: &ServiceConfig) -> Result<ServiceRt> {
        let id = self.service_ids.alloc("service")?;
        let now = SystemTime::now();
        let mut backends = Vec::new();
        for bc in &sc.backends {
            backends.push(BackendRt {
                id: self.backend_ids.alloc("backend")?,
                config: bc.clone(),
                healthy: true,
                admin: admin_from_config(bc.state),
                changed_at: now,
                reason: "configured".into(),
                balance: BackendBalance::full(),
            });
        }
        let mut s = ServiceRt {
            key: Endpoint::new(sc.vip, sc.port, sc.protocol.number()),
            entry: service_entry(sc, id),
            config: sc.clone(),
            backends,
            table: Default::default(),
            digest: Default::default(),
            fail_open: false,
        };
        // A fresh service has no live table yet: table 0 is written, then the VIP goes live.
        s.entry.table = 1;
        Ok(s)
    }

    /// Applies a changed config to an existing service in the model, removing what is gone from
    /// the maps. Returns the removed backends when the service must be written, None when
    /// nothing changed.
    fn update_service(
        &mut self,
        dp: &mut Datapath,
        s: &mut ServiceRt,
        sc: &ServiceConfig,
        ch: &mut Changes,
    ) -> Result<Option<Vec<BackendRt>>> {
        let had_table = !s.table.is_empty();
        if s.config == *sc && had_table {
            return Ok(None);
        }
        let old_key = s.key;
        let old_reverse: Vec<Endpoint> = s.backends.iter().map(|b| s.reverse_key(b)).collect();
        let now = SystemTime::now();
        // Backends that are gone.
        let mut removed = Vec::new();
        s.backends.retain(|b| {
            let keep = sc.backends.iter().any(|c| c.address == b.config.address && c.port == b.config.port);
            if !keep {
                removed.push(b.clone());
            }
            keep
        });
        // Backends that stay (new weight, new configured state) and new ones.
        let mut backends = Vec::new();
        for bc in &sc.backends {
            match s.backends.iter().position(|b| b.config.address == bc.address && b.config.port == bc.port) {
                Some(p) => {
                    let mut b = s.backends.remove(p);
                    if b.config.state != bc.state {
                        b.admin = admin_from_config(bc.state);
                        b.changed_at = now;
                        b.reason = format!("config: state = \"{}\"", bc.state);
                    }
                    b.config = bc.clone();
                    backends.push(b);
                }
                None => {
                    backends.push(BackendRt {
                        id: self.backend_ids.alloc("backend")?,
                        config: bc.clone(),
                        healthy: true,
                        admin: admin_from_config(bc.state),
                        changed_at: now,
                        reason: "added by reload".into(),
                        // A backend added to a running service ramps up (slow start).
                        balance: if sc.balance.slow_start.is_some() {
                            BackendBalance::ramping(std::time::Instant::now())
                        } else {
                            BackendBalance::full()
                        },
                    });
                    ch.backends_added.push(backend_label(&sc.name, bc));
                }
            }
        }
        s.backends = backends;
        s.config = sc.clone();
        s.key = Endpoint::new(sc.vip, sc.port, sc.protocol.number());
        let fresh = service_entry(sc, s.entry.id);
        s.entry = Service { table: s.entry.table, generation: s.entry.generation, ..fresh };
        if s.key != old_key {
            dp.remove_service(&old_key)?;
        }
        for k in old_reverse {
            if !s.backends.iter().any(|b| s.reverse_key(b) == k) {
                dp.remove_reverse(&k)?;
            }
        }
        for b in &removed {
            ch.backends_removed.push(backend_label(&sc.name, &b.config));
        }
        Ok(Some(removed))
    }

    /// Writes a service whose backends or states changed, in an order that keeps every packet
    /// consistent: backends that can take or keep clients first, then the new table into the idle
    /// half, then the service entry that flips to it, and only then the backends that went
    /// down or away (so that their re-selected clients already see the new table).
    pub fn sync(&mut self, dp: &mut Datapath, s: &mut ServiceRt) -> Result<()> {
        let table = s.desired_table(self.global.maglev_m);
        self.write_service(dp, s, &[], table)
    }

    /// Rebuilds service `i`'s table after its backends' balance changed (a bound crossed, a ramp
    /// step): only the table and the service entry are written, as a table swap. Whether the
    /// table changed.
    pub fn rebalance(&mut self, dp: &mut Datapath, i: usize) -> Result<bool> {
        let m = self.global.maglev_m;
        let s = &mut self.services[i];
        let (table, in_table, fail_open) = s.desired_table(m);
        if table == *s.table || fail_open != s.fail_open {
            // Unchanged, or a health change is on its way through `sync` anyway.
            return Ok(false);
        }
        let next = 1 - (s.entry.table & 1);
        dp.write_maglev(s.entry.id, next, &table).with_context(|| format!("writing the Maglev table of service {}", s.config.name))?;
        s.entry.table = next;
        s.entry.backend_count = in_table;
        s.entry.generation = s.entry.generation.wrapping_add(1);
        dp.write_service(&s.key, s.entry)?;
        s.digest = Default::default();
        s.table = std::sync::Arc::new(table);
        Ok(true)
    }

    /// `sync` with the table already built.
    fn write_service(&mut self, dp: &mut Datapath, s: &mut ServiceRt, removed: &[BackendRt], desired: (Vec<u32>, u32, bool)) -> Result<()> {
        let (table, in_table, fail_open) = desired;
        if fail_open && !s.fail_open {
            tracing::error!(service = %s.config.name, "every backend is down: failing open, routing as if all were up");
        } else if !fail_open && s.fail_open {
            tracing::warn!(service = %s.config.name, "a backend is up again: no longer failing open");
        }
        // DSR has no reply path: backends answer clients from the VIP themselves.
        let nat = self.global.flags & lb_common::GLOBAL_F_DSR == 0;
        for b in s.backends.iter().filter(|b| b.flags() & BACKEND_F_UP != 0) {
            dp.write_backend(b.id, b.entry(s.entry.id))?;
            if nat {
                let side = backend_side(b.config.address);
                dp.write_reverse(&s.reverse_key(b), &s.key, s.entry.id, b.id, side)?;
                self.sides.insert(b.id, side);
            }
        }
        for b in s.backends.iter().filter(|b| b.flags() & BACKEND_F_UP == 0) {
            // Replies from a backend that is down still go back to the VIP.
            if nat {
                let side = backend_side(b.config.address);
                dp.write_reverse(&s.reverse_key(b), &s.key, s.entry.id, b.id, side)?;
                self.sides.insert(b.id, side);
            }
        }
        let next = if table != *s.table { 1 - (s.entry.table & 1) } else { s.entry.table };
        if next != s.entry.table {
            dp.write_maglev(s.entry.id, next, &table)
                .with_context(|| format!("writing the Maglev table of service {}", s.config.name))?;
        }
        s.entry.table = next;
        s.entry.flags = if fail_open { SERVICE_F_FAIL_OPEN } else { 0 } | if s.splits_hot() { lb_common::SERVICE_F_SPLIT_HOT } else { 0 };
        s.entry.backend_count = in_table;
        s.entry.generation = s.entry.generation.wrapping_add(1);
        dp.write_service(&s.key, s.entry)?;
        s.digest = Default::default();
        s.table = std::sync::Arc::new(table);
        s.fail_open = fail_open;
        for b in s.backends.iter().filter(|b| b.flags() & BACKEND_F_UP == 0) {
            dp.write_backend(b.id, b.entry(s.entry.id))?;
        }
        for b in removed {
            dp.write_backend(b.id, Backend::default())?;
            dp.remove_reverse(&s.reverse_key(b))?;
        }
        Ok(())
    }

    /// Follows route changes: rewrites the REVERSE entry of each NAT backend whose side
    /// (`side(addr)`: the egress ifindex now, 0 without a route, None when unknown) differs from
    /// the one last written. The caller resolves the routes (netlink) before it takes the lock
    /// this runs under. Returns the backends whose side changed, with the old and new ifindex.
    pub fn refresh_sides(&mut self, dp: &mut Datapath, side: impl Fn(IpAddr) -> Option<u32>) -> Result<Vec<(IpAddr, u32, u32)>> {
        let mut changed = Vec::new();
        if self.global.flags & lb_common::GLOBAL_F_DSR != 0 {
            return Ok(changed);
        }
        for s in &self.services {
            for b in &s.backends {
                let Some(now) = side(b.config.address) else { continue };
                let was = self.sides.get(&b.id).copied();
                if was == Some(now) {
                    continue;
                }
                dp.write_reverse(&s.reverse_key(b), &s.key, s.entry.id, b.id, now)
                    .with_context(|| format!("updating the side of backend {}", b.config.address))?;
                self.sides.insert(b.id, now);
                changed.push((b.config.address, was.unwrap_or(0), now));
            }
        }
        let ids: BTreeSet<u32> = self.services.iter().flat_map(|s| s.backends.iter().map(|b| b.id)).collect();
        self.sides.retain(|id, _| ids.contains(id));
        Ok(changed)
    }

    /// Every backend address of every service (the next hops lb keeps resolved).
    pub fn backend_addrs(&self) -> BTreeSet<IpAddr> {
        self.services.iter().flat_map(|s| s.backends.iter().map(|b| b.config.address)).collect()
    }

    /// Removes a service's entries from the maps (its pins and ids go at the commit).
    fn unwrite_service(dp: &mut Datapath, s: &ServiceRt) -> Result<()> {
        dp.remove_service(&s.key)?;
        for b in &s.backends {
            dp.remove_reverse(&s.reverse_key(b))?;
            dp.write_backend(b.id, Backend::default())?;
        }
        Ok(())
    }

    /// Index of the service named `name`.
    fn position(&self, name: &str) -> Result<usize> {
        self.services
            .iter()
            .position(|s| s.config.name == name)
            .ok_or_else(|| crate::api::NotFound(format!("no service named {name:?}")).into())
    }

    /// Changes one backend's state with `f` and re-syncs its service. Returns the backend after.
    pub fn update_backend(
        &mut self,
        dp: &mut Datapath,
        service: &str,
        addr: IpAddr,
        port: u16,
        f: impl FnOnce(&mut BackendRt) -> bool,
    ) -> Result<BackendRt> {
        let i = self.position(service)?;
        let mut s = self.services[i].clone();
        let b = s
            .backends
            .iter_mut()
            .find(|b| b.config.address == addr && b.config.port == port)
            .ok_or_else(|| crate::api::NotFound(format!("service {service:?} has no backend {}", std::net::SocketAddr::new(addr, port))))?;
        let changed = f(b);
        let after = b.clone();
        if changed {
            self.sync(dp, &mut s)?;
            self.services[i] = s;
        }
        Ok(after)
    }

    /// Health-check targets for the current services (kind `none` is not checked).
    pub fn health_targets(&self) -> Vec<crate::health::Target> {
        let mut out = Vec::new();
        for s in &self.services {
            if s.config.health.kind == HealthKind::None {
                continue;
            }
            for b in &s.backends {
                out.push(crate::health::Target {
                    key: crate::health::TargetKey { service: s.config.name.clone(), address: b.config.address, port: b.config.port },
                    check: s.config.health.clone(),
                    initially_up: b.healthy,
                });
            }
        }
        out
    }
}

/// Builds the desired tables of `services` on every core (order kept).
fn build_tables(services: Vec<&ServiceRt>, m: u32) -> Vec<(Vec<u32>, u32, bool)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(services.len().max(1));
    if threads <= 1 || services.len() < 8 {
        return services.iter().map(|s| s.desired_table(m)).collect();
    }
    let chunk = services.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = services
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|s| s.desired_table(m)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("table builder panicked")).collect()
    })
}

/// A stand-in config for a pinned service the new config does not have (it is removed next).
fn orphan_service_config(key: &Endpoint, id: u32) -> ServiceConfig {
    ServiceConfig {
        name: format!("#orphan-{id}"),
        vip: key.addr(),
        port: key.port(),
        protocol: if key.proto() == lb_common::PROTO_UDP { crate::config::Protocol::Udp } else { crate::config::Protocol::Tcp },
        affinity: Default::default(),
        health: Default::default(),
        balance: Default::default(),
        backends: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_pool_reuses_oldest_freed_first_and_adopts() {
        let mut p = IdPool::new(4);
        assert_eq!([p.alloc("x").unwrap(), p.alloc("x").unwrap(), p.alloc("x").unwrap()], [0, 1, 2]);
        p.release(1);
        p.release(0);
        assert_eq!([p.alloc("x").unwrap(), p.alloc("x").unwrap(), p.alloc("x").unwrap()], [1, 0, 3]);
        assert!(p.alloc("x").unwrap_err().to_string().contains("max_xs"));

        let mut q = IdPool::new(8);
        q.take(5).unwrap();
        q.take(2).unwrap();
        assert!(q.take(5).is_err(), "an id adopted twice is refused");
        assert!(q.take(8).is_err(), "beyond the capacity");
        let got: Vec<u32> = (0..6).map(|_| q.alloc("x").unwrap()).collect();
        assert_eq!(got, [0, 1, 3, 4, 6, 7]);
    }

    /// The service `web` of a config listing `backends` in that order, with its live table
    /// built, in a runtime where `skip` other backends took the first ids.
    fn built(backends: &[&str], skip: u32) -> (ServiceRt, u32) {
        let mut text = String::from("[datapath]\ninterfaces = [\"eth0\"]\nmaglev_table_size = 1009\n");
        text.push_str("[[services]]\nname = \"other\"\nvip = \"10.0.0.2\"\nport = 80\n");
        for i in 0..skip.max(1) {
            text.push_str(&format!("[[services.backends]]\naddress = \"10.9.0.{}\"\nport = 80\n", i + 1));
        }
        text.push_str("[[services]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n");
        for b in backends {
            text.push_str(&format!("[[services.backends]]\naddress = \"{b}\"\nport = 8080\n"));
        }
        let cfg = Config::parse(&text).unwrap();
        let mut rt = Runtime::new(&cfg);
        let mut services = Vec::new();
        for sc in &cfg.services {
            services.push(rt.add_service(sc).unwrap());
        }
        let mut s = services.pop().unwrap();
        let (table, _, _) = s.desired_table(cfg.datapath.maglev_table_size);
        s.table = std::sync::Arc::new(table);
        (s, cfg.datapath.hash_seed)
    }

    #[test]
    fn fingerprints_agree_across_nodes_and_tell_tables_apart() {
        let (a, seed) = built(&["10.1.0.1", "10.1.0.2", "10.1.0.3"], 1);
        // Another node: other order, other datapath ids.
        let (b, _) = built(&["10.1.0.3", "10.1.0.1", "10.1.0.2"], 5);
        assert_ne!(a.backends[0].id, b.backends[1].id, "the nodes' ids differ");
        assert_eq!(a.fingerprint(seed), b.fingerprint(seed));
        let (c, _) = built(&["10.1.0.1", "10.1.0.2"], 1);
        assert_ne!(a.fingerprint(seed), c.fingerprint(seed), "another backend set");
        assert_ne!(a.fingerprint(seed), a.fingerprint(seed + 1), "another client hash seed");
    }

    /// Service `web` with `weights` (backends 10.1.0.1.. on :8080) and `[services.balance]`.
    fn balanced(weights: &[u32]) -> ServiceRt {
        let mut text = String::from("[datapath]\ninterfaces = [\"eth0\"]\nmaglev_table_size = 1009\n");
        text.push_str("[[services]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n");
        text.push_str("[services.balance]\nload_bound = 1.25\nslow_start = \"30s\"\n");
        for (i, w) in weights.iter().enumerate() {
            text.push_str(&format!("[[services.backends]]\naddress = \"10.1.0.{}\"\nport = 8080\nweight = {w}\n", i + 1));
        }
        let cfg = Config::parse(&text).unwrap();
        let mut rt = Runtime::new(&cfg);
        rt.add_service(&cfg.services[0]).unwrap()
    }

    fn slots(s: &ServiceRt) -> BTreeMap<u32, usize> {
        let mut m = BTreeMap::new();
        for id in s.desired_table(1009).0 {
            *m.entry(id).or_default() += 1;
        }
        m
    }

    #[test]
    fn bounded_walk_sends_an_over_bound_backends_clients_to_their_next_choice() {
        let mut s = balanced(&[100, 100, 100]);
        let plain = s.desired_table(1009).0;
        let (a, b) = (s.backends[0].id, s.backends[1].id);
        s.backends[0].balance.over_bound = true;
        let bounded = s.desired_table(1009).0;
        assert!(!bounded.contains(&a), "an over-bound backend takes no new client");
        // Its slots go to the others; almost every other client keeps its plain choice (Maglev
        // moves a few more on a removal)...
        let others_moved = plain.iter().zip(&bounded).filter(|(p, q)| **p != a && p != q).count();
        assert!(others_moved * 100 < plain.len() * 3, "{others_moved} of {} other slots moved", plain.len());
        // ... and the walk is deterministic given which backends are over.
        assert_eq!(bounded, s.desired_table(1009).0);
        // Everything over the bound: the plain table stands.
        for x in &mut s.backends {
            x.balance.over_bound = true;
        }
        assert_eq!(s.desired_table(1009).0, plain);
        // A draining backend is out whatever its bound says; over-bound others leave too.
        for x in &mut s.backends {
            x.balance.over_bound = false;
        }
        s.backends[2].admin = Admin::Draining;
        s.backends[0].balance.over_bound = true;
        let t = s.desired_table(1009).0;
        assert!(t.iter().all(|id| *id == b), "only b is neither draining nor over the bound");
    }

    #[test]
    fn bounded_walk_keeps_weights_and_slow_start_ramps_them() {
        let mut s = balanced(&[300, 100, 100]);
        let (a, b, c) = (s.backends[0].id, s.backends[1].id, s.backends[2].id);
        s.backends[2].balance.over_bound = true;
        let m = slots(&s);
        // a and b share c's slots by their weights: 3:1 (within a slot or two of 1009 * 3/4).
        assert!(!m.contains_key(&c));
        assert!((m[&a] as f64 / 1009.0 - 0.75).abs() < 0.01 && (m[&b] as f64 / 1009.0 - 0.25).abs() < 0.01, "{m:?}");
        // Slow start: a backend at 1 of 20 steps takes about 1/20 of its weight's share.
        s.backends[2].balance.over_bound = false;
        s.backends[1].balance = BackendBalance::ramping(std::time::Instant::now());
        let m = slots(&s);
        let want = 1009.0 * 5.0 / (300.0 + 5.0 + 100.0);
        assert!((m[&b] as f64 - want).abs() <= 2.0, "{m:?} want {want}");
        s.backends[1].balance.ramp_step = 10;
        let m = slots(&s);
        let want = 1009.0 * 50.0 / 450.0;
        assert!((m[&b] as f64 - want).abs() <= 2.0, "{m:?} want {want}");
    }
}
