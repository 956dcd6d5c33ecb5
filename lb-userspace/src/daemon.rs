//! `lb run`: validate, load (or adopt pinned state), attach, keep the maps current from health
//! checks, drains and reloads, serve the control socket.
//!
//! Stopping the daemon (SIGTERM, SIGINT) leaves the datapath running on its pinned maps and
//! pinned XDP links; the next `lb run` adopts them and keeps every pin. `lb down` (or a failed
//! first start) is what removes the pinned state.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    affinity,
    bpffs::PinDir,
    config::{Config, ConfigErrors},
    control::{self, BackendReport, InterfaceReport, ServiceReport, StatusReport},
    datapath::{ALL_MAPS, Capacity, Datapath},
    health::{self, HealthChecker},
    state::{Admin, BackendRt, Changes, Runtime},
};

/// How often the balancer's own addresses are re-read into LOCAL_ADDRS.
const LOCAL_ADDR_REFRESH: Duration = Duration::from_secs(5);

/// Why the daemon's main loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Leave the datapath running on its pinned state (SIGTERM, SIGINT).
    Leave,
    /// Detach and remove the pinned state (`lb down` while running).
    Down,
}

/// A reload that was refused; the running config stays in force.
#[derive(Debug)]
pub enum ReloadError {
    Invalid(ConfigErrors),
    Refused(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Invalid(e) => write!(f, "{e}"),
            ReloadError::Refused(m) => f.write_str(m),
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
    health: HealthChecker,
    stop: mpsc::UnboundedSender<Stop>,
    rates: Rates,
    /// Keeps the VIP routes for BIRD (`[announce]`); none without that table.
    announcer: Option<crate::announce::Announcer>,
    /// Keeps the backends' next hops resolved (managed neighbour entries).
    neighbours: Option<crate::neighbours::Keeper>,
}

fn time_string(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn backend_report(b: &BackendRt, slots: u32, dp: &Datapath, pinned: u64, new_pins_per_sec: f64) -> Result<BackendReport> {
    Ok(BackendReport {
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
        counters: dp.backend_counters(b.id)?,
    })
}

impl Daemon {
    pub fn status(&self) -> Result<StatusReport> {
        let pins = affinity::count(&self.rt, &self.dp)?;
        let now = Instant::now();
        let mut services = Vec::new();
        for s in &self.rt.services {
            let id = s.entry.id;
            let mut backends = Vec::new();
            for b in &s.backends {
                let slots = s.table.iter().filter(|t| **t == b.id).count() as u32;
                let pinned = pins.by_backend.get(&(id, b.id)).copied().unwrap_or(0);
                let new_pins = self.dp.backend_counters(b.id)?.new_pins;
                let rate = self.rates.per_sec((id, Some(b.id)), new_pins, now);
                backends.push(backend_report(b, slots, &self.dp, pinned, rate)?);
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
                pinned: pins.by_service.get(&id).copied().unwrap_or(0),
                new_pins_per_sec: self.rates.per_sec((id, None), counters.new_pins, now),
                counters,
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
            maglev_table_size: self.config.datapath.maglev_table_size,
            affinity_entries: pins.entries,
            affinity_capacity: self.config.datapath.affinity_entries,
            interfaces: self
                .dp
                .attachments()
                .iter()
                .map(|a| InterfaceReport { name: a.interface.clone(), mode: a.mode.to_string() })
                .collect(),
            services,
            stats: self.dp.stats()?.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            hash_seed: self.rt.global.hash_seed,
            announce: self.announcer.as_ref().map(|a| control::AnnounceReport {
                table: a.table,
                announced: a.announced().iter().map(IpAddr::to_string).collect(),
            }),
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

    /// Takes a sample of the new-pin counters, for the rates `status` reports.
    pub fn sample_rates(&mut self) {
        let mut counts = BTreeMap::new();
        for s in &self.rt.services {
            if let Ok(c) = self.dp.service_counters(s.entry.id) {
                counts.insert((s.entry.id, None), c.new_pins);
            }
            for b in &s.backends {
                if let Ok(c) = self.dp.backend_counters(b.id) {
                    counts.insert((s.entry.id, Some(b.id)), c.new_pins);
                }
            }
        }
        self.rates.add(Instant::now(), counts);
    }

    /// `lb explain`.
    pub fn explain(&self, client: IpAddr, service: Option<&str>) -> Result<Vec<affinity::Explanation>> {
        affinity::explain(&self.rt, &self.dp, client, service)
    }

    /// `lb affinity list`.
    pub fn affinity_list(&self, q: &affinity::ListQuery) -> Result<affinity::AffinityList> {
        affinity::list(&self.rt, &self.dp, q)
    }

    /// `lb affinity flush`.
    pub fn affinity_flush(&mut self, req: &affinity::FlushRequest) -> Result<affinity::FlushReport> {
        let r = affinity::flush(&self.rt, &mut self.dp, req)?;
        tracing::info!(
            flushed = r.flushed,
            client = ?req.client,
            backend = ?req.backend,
            all = req.all,
            service = ?req.service,
            "affinity pins flushed: those clients are placed afresh at their next packet"
        );
        Ok(r)
    }

    /// Re-reads the config file and applies it, or refuses it whole.
    pub fn reload(&mut self) -> Result<Changes, ReloadError> {
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
        // Interfaces: attach the new ones first, so a failure leaves the running config intact.
        let added: Vec<&String> = new.interfaces.iter().filter(|i| !old.interfaces.contains(i)).collect();
        for (n, iface) in added.iter().enumerate() {
            if let Err(e) = self.dp.attach(iface, new.xdp_mode) {
                for undo in &added[..n] {
                    let _ = self.dp.detach(undo);
                }
                return Err(ReloadError::Refused(format!("{e:#}")));
            }
            tracing::info!(interface = %iface, "attached XDP (reload)");
        }
        let changes = match self.rt.reconcile(&cfg, &mut self.dp) {
            Ok(c) => c,
            Err(e) => return Err(ReloadError::Refused(format!("applying the config: {e:#}"))),
        };
        for iface in old.interfaces.iter().filter(|i| !new.interfaces.contains(i)) {
            if let Err(e) = self.dp.detach(iface) {
                tracing::warn!(interface = %iface, error = %format!("{e:#}"), "detaching XDP (reload)");
            } else {
                tracing::info!(interface = %iface, "detached XDP (reload)");
            }
        }
        self.config = cfg;
        self.health.set_targets(self.rt.health_targets());
        self.update_announcements();
        if let Some(k) = &self.neighbours {
            k.set(self.rt.backend_addrs());
        }
        Ok(changes)
    }

    /// `lb drain` / `lb undrain`.
    pub fn set_admin(&mut self, service: &str, addr: IpAddr, port: u16, admin: Admin) -> Result<BackendReport> {
        let b = self.rt.update_backend(&mut self.dp, service, addr, port, |b| {
            if b.admin == admin {
                return false;
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
        tracing::info!(service, backend = %std::net::SocketAddr::new(addr, port), state = b.state_name(), reason = %b.reason, "backend state changed");
        self.update_announcements();
        let s = self.rt.service(service).expect("updated just now");
        let slots = s.table.iter().filter(|id| **id == b.id).count() as u32;
        let pinned = affinity::count(&self.rt, &self.dp)?.by_backend.get(&(s.entry.id, b.id)).copied().unwrap_or(0);
        backend_report(&b, slots, &self.dp, pinned, 0.0)
    }

    fn on_health(&mut self, ev: health::Event) {
        let reason = ev.reason.clone();
        let r = self.rt.update_backend(&mut self.dp, &ev.key.service, ev.key.address, ev.key.port, |b| {
            if b.healthy == ev.up {
                return false;
            }
            b.healthy = ev.up;
            b.changed_at = ev.at;
            b.reason = format!("health check: {reason}");
            true
        });
        match r {
            Ok(b) if ev.up => tracing::info!(service = %ev.key.service, backend = %std::net::SocketAddr::new(ev.key.address, ev.key.port), state = b.state_name(), reason = %ev.reason, "backend is up"),
            Ok(b) => tracing::warn!(service = %ev.key.service, backend = %std::net::SocketAddr::new(ev.key.address, ev.key.port), state = b.state_name(), reason = %ev.reason, "backend is down: its clients move to other backends"),
            // A check of a backend a reload just removed.
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "health event for an unknown backend"),
        }
        self.update_announcements();
    }

    /// Asks the main loop to stop.
    pub fn request_stop(&self, how: Stop) {
        let _ = self.stop.send(how);
    }
}

/// Checks that need no kernel state: root, and every configured interface exists here.
fn preflight(cfg: &Config) -> Result<()> {
    require_root("lb run")?;
    let missing: Vec<&str> = cfg
        .datapath
        .interfaces
        .iter()
        .filter(|i| nix::net::if_::if_nametoindex(i.as_str()).is_err())
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        bail!(
            "datapath.interfaces: no interface named {} in this network namespace",
            missing.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (it loads eBPF and attaches XDP): run it as root or with sudo");
    }
    Ok(())
}

/// The addresses of this network namespace (the balancer's own), both families.
pub fn local_addrs() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|a| {
                let s = a.address?;
                s.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing local addresses");
            Vec::new()
        }
    };
    out.sort();
    out.dedup();
    out
}

fn raise_memlock() {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}

/// Loads (adopting pinned state when there is some), writes and attaches.
fn start(cfg: &Config, pins: &PinDir) -> Result<(Datapath, Runtime, bool)> {
    raise_memlock();
    let mut dp = Datapath::load(Capacity::from_config(&cfg.datapath), Some(&pins.path))?;
    let adopted = dp.check_adoptable()?;
    let mut rt = if adopted { Runtime::adopt(cfg, &dp)? } else { Runtime::new(cfg) };
    let changes = rt.reconcile(cfg, &mut dp).context("writing services and backends")?;
    if adopted {
        tracing::info!(?changes, "adopted the pinned datapath state: every pin is kept");
    }
    dp.set_local_addrs(&local_addrs())?;
    for iface in &cfg.datapath.interfaces {
        let mode = dp.attach(iface, cfg.datapath.xdp_mode)?;
        let adopted_link = dp.attachments().last().is_some_and(|a| a.adopted);
        tracing::info!(interface = %iface, %mode, adopted = adopted_link, "attached XDP");
    }
    for iface in Datapath::pinned_link_interfaces(&pins.path) {
        if !cfg.datapath.interfaces.contains(&iface) {
            dp.detach(&iface)?;
            tracing::info!(interface = %iface, "detached XDP (no longer configured)");
        }
    }
    Ok((dp, rt, adopted))
}

/// Bridges aya-log records from the XDP program into the log stream.
fn spawn_ebpf_logger(dp: &mut Datapath) {
    match aya_log::EbpfLogger::init(dp.ebpf_mut()) {
        // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
        Ok(logger) => match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Ok(mut fd) => {
                tokio::spawn(async move {
                    loop {
                        let Ok(mut guard) = fd.readable_mut().await else { break };
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "eBPF log reader"),
        },
        Err(e) => tracing::warn!(error = %e, "eBPF logger not initialised"),
    }
}

/// Removes everything a datapath left under `pins` (links first, which detaches the program).
pub fn remove_pinned_state(pins: &PinDir) -> Vec<String> {
    let links = Datapath::pinned_link_interfaces(&pins.path);
    for iface in &links {
        let _ = std::fs::remove_file(Datapath::link_pin(&pins.path, iface));
    }
    pins.release(&ALL_MAPS);
    links
}

pub async fn run(config_path: &Path, socket_override: Option<PathBuf>) -> Result<()> {
    let cfg = Config::load(config_path).map_err(|e| anyhow!("invalid config {}:\n{e}", config_path.display()))?;
    preflight(&cfg)?;
    let socket = socket_override.unwrap_or_else(|| cfg.control.socket.clone());
    // Bound first: a second daemon on the same socket is refused before it touches any pin.
    let listener = control::bind(&socket).await?;
    let cleanup_socket = || {
        let _ = std::fs::remove_file(&socket);
    };
    let metrics_listener = match cfg.control.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await.inspect_err(|_| cleanup_socket())?),
        None => None,
    };
    let netlink = match cfg.announce {
        Some(_) => Some(crate::announce::connect().inspect_err(|_| cleanup_socket())?),
        None => None,
    };
    let neigh_netlink = crate::neighbours::connect().inspect_err(|_| cleanup_socket())?;
    let pins = PinDir::prepare(&cfg.datapath.pin_path).inspect_err(|_| cleanup_socket())?;
    let had_state = pins.path.join(lb_common::maps::CONFIG).exists();
    let (mut dp, rt, adopted) = match start(&cfg, &pins) {
        Ok(x) => x,
        Err(e) => {
            if !had_state {
                // A first start that failed: undo all of it.
                remove_pinned_state(&pins);
            }
            cleanup_socket();
            return Err(e);
        }
    };
    spawn_ebpf_logger(&mut dp);
    for s in &rt.services {
        tracing::info!(
            service = %s.config.name,
            vip = %format!("{}/{}", std::net::SocketAddr::new(s.config.vip, s.config.port), s.config.protocol),
            backends = s.backends.len(),
            "service ready"
        );
    }
    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    let mut checker = HealthChecker::new(health_tx);
    checker.set_targets(rt.health_targets());
    let (stop_tx, mut stop_rx) = mpsc::unbounded_channel();
    let daemon = Arc::new(Mutex::new(Daemon {
        config_path: config_path.into(),
        config: cfg,
        rt,
        dp,
        adopted,
        started: SystemTime::now(),
        health: checker,
        stop: stop_tx,
        rates: Rates::default(),
        announcer: None,
        neighbours: None,
    }));
    {
        let mut d = daemon.lock().unwrap_or_else(|p| p.into_inner());
        d.sample_rates();
        // Attached now: announce what has a backend up (a restart adopts the routes it finds).
        if let (Some(a), Some(handle)) = (d.config.announce.clone(), netlink) {
            let want = d.wanted_vips();
            d.announcer = Some(crate::announce::Announcer::start(handle, a.table, a.grace, want));
            tracing::info!(table = a.table, "announcing VIPs through kernel table {}", a.table);
        }
        // Every pass also tells which backends' routes moved to another interface (their side).
        let weak = Arc::downgrade(&daemon);
        let keeper = crate::neighbours::Keeper::start(neigh_netlink, d.rt.backend_addrs(), move |sides| {
            let Some(daemon) = weak.upgrade() else { return };
            let mut d = daemon.lock().unwrap_or_else(|p| p.into_inner());
            let Daemon { rt, dp, .. } = &mut *d;
            match rt.refresh_sides(dp, |addr| sides.get(&addr).copied()) {
                Ok(changed) => {
                    for (backend, was, now) in changed {
                        tracing::info!(%backend, was, now, "the route to a backend moved: its side (REVERSE ifindex) updated");
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "updating the backends' sides"),
            }
        });
        d.neighbours = Some(keeper);
    }
    let mut server = tokio::spawn(control::serve(listener, daemon.clone()));
    let metrics_server = metrics_listener.map(|l| {
        let d = daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(l, d).await {
                tracing::error!(error = %format!("{e:#}"), "metrics server stopped");
            }
        })
    });
    tracing::info!(
        socket = %socket.display(),
        metrics = %cfg_metrics_text(daemon.lock().unwrap_or_else(|p| p.into_inner()).config.control.metrics),
        adopted,
        "lb running"
    );

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut tick = tokio::time::interval(LOCAL_ADDR_REFRESH);
    let lock = || daemon.lock().unwrap_or_else(|p| p.into_inner());
    let result = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break Ok(Stop::Leave) }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break Ok(Stop::Leave) }
            Some(how) = stop_rx.recv() => break Ok(how),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading {}", config_path.display());
                match lock().reload() {
                    Ok(ch) => tracing::info!(?ch, "reload applied"),
                    Err(e) => tracing::error!("reload refused, the running config stays in force:\n{e}"),
                }
            }
            Some(ev) = health_rx.recv() => lock().on_health(ev),
            r = &mut server => {
                break Err(match r {
                    Ok(Err(e)) => e,
                    _ => anyhow!("the control server stopped"),
                });
            }
            _ = tick.tick() => {
                let addrs = local_addrs();
                let mut d = lock();
                if let Err(e) = d.dp.set_local_addrs(&addrs) {
                    tracing::warn!(error = %format!("{e:#}"), "refreshing LOCAL_ADDRS");
                }
                d.sample_rates();
                match d.dp.refresh_tx_port_macs() {
                    Ok(changed) => {
                        for iface in changed {
                            tracing::info!(interface = %iface, "MAC address changed: datapath updated");
                        }
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "refreshing interface MAC addresses"),
                }
            }
        }
    };
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    let how = result.as_ref().map(|h| *h).unwrap_or(Stop::Leave);
    let announcer = lock().announcer.take();
    let neighbours = lock().neighbours.take();
    if let Some(a) = announcer {
        match how {
            // A restart keeps announcing: the datapath keeps serving.
            Stop::Leave => a.leave(),
            Stop::Down => {
                // Withdraw first, and keep serving while the routers move the traffic away.
                let grace = a.grace;
                match a.withdraw().await {
                    Ok(n) => tracing::info!(withdrawn = n, grace = %humantime::format_duration(grace), "VIPs withdrawn; detaching after the grace time"),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "withdrawing the VIPs"),
                }
                tokio::time::sleep(grace).await;
            }
        }
    }
    {
        let mut d = lock();
        d.health.shutdown();
        match how {
            Stop::Leave => d.dp.release_attachments(),
            Stop::Down => d.dp.detach_all(),
        }
    }
    drop(daemon);
    if let Some(k) = neighbours {
        match how {
            // A restart keeps them: the datapath keeps forwarding to the backends.
            Stop::Leave => k.leave(),
            Stop::Down => match k.remove_all().await {
                Ok(n) => tracing::info!(removed = n, "removed lb's neighbour entries"),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "removing lb's neighbour entries"),
            },
        }
    }
    match how {
        Stop::Leave => tracing::info!(
            pin_path = %pins.path.display(),
            "stopped; the datapath keeps running on its pinned state (`lb down` removes it)"
        ),
        Stop::Down => {
            remove_pinned_state(&pins);
            tracing::info!("detached and removed the pinned state");
        }
    }
    cleanup_socket();
    result.map(|_| ())
}

fn announce_text(c: &Config) -> String {
    c.announce.as_ref().map_or_else(|| "none".to_string(), |a| format!("table {} grace {}", a.table, humantime::format_duration(a.grace)))
}

fn cfg_metrics_text(m: Option<std::net::SocketAddr>) -> String {
    m.map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"))
}

/// `lb down` without a running daemon: detach and remove what a daemon left pinned.
pub fn down_offline(cfg: &Config) -> Result<String> {
    require_root("lb down")?;
    if let Some(a) = &cfg.announce {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let n = rt.block_on(crate::announce::withdraw_all(a.table)).context("withdrawing the VIPs")?;
        if n > 0 {
            println!("withdrew {n} VIP route(s) from table {}", a.table);
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let n = rt
        .block_on(async { crate::neighbours::remove_all(&crate::neighbours::connect()?).await })
        .context("removing lb's neighbour entries")?;
    if n > 0 {
        println!("removed {n} managed neighbour entr{} lb made", if n == 1 { "y" } else { "ies" });
    }
    let dir = &cfg.datapath.pin_path;
    if !dir.join(lb_common::maps::CONFIG).exists() && Datapath::pinned_link_interfaces(dir).is_empty() {
        return Ok(format!("nothing pinned under {}", dir.display()));
    }
    let pins = PinDir::existing(dir);
    let links = remove_pinned_state(&pins);
    Ok(format!(
        "detached XDP from {} and removed the pinned state under {}",
        if links.is_empty() { "no interface".to_string() } else { links.join(", ") },
        dir.display()
    ))
}
