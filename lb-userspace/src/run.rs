//! `lb run`: validate, load (or adopt pinned state), attach, keep the maps current from health
//! checks, drains and reloads, serve the control socket; and `lb down` without a daemon.
//!
//! Stopping the daemon (SIGTERM, SIGINT) leaves the datapath running on its pinned maps and
//! pinned XDP links; the next `lb run` adopts them and keeps every pin. `lb down` (or a failed
//! first start) is what removes the pinned state. One daemon owns a pin directory at a time: it
//! holds an exclusive flock(2) on the directory while it runs ([`crate::bpffs::PinLock`]).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    bpffs::{PinDir, PinLock},
    config::Config,
    control,
    daemon::{Daemon, Rates, Stop, cfg_metrics_text},
    datapath::{ALL_MAPS, Capacity, Datapath},
    health::HealthChecker,
    pincount::PinCounter,
    state::Runtime,
};

/// How often the balancer's own addresses are re-read into LOCAL_ADDRS.
const LOCAL_ADDR_REFRESH: Duration = Duration::from_secs(5);
/// How often the attached veths' peers are checked again (GRO or XDP, see `environment`).
const VETH_RECHECK: Duration = Duration::from_secs(30);

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
    // The previous daemon's story of each backend, where its state is still the same.
    let history = if adopted { crate::history::restore(&pins.path, &mut rt) } else { 0 };
    let backends: usize = rt.services.iter().map(|s| s.backends.len()).sum();
    let changes = rt.reconcile(cfg, &mut dp).context("writing services and backends")?;
    if adopted {
        let history = format!("the health history of {history} of {backends} adopted backend(s) is kept");
        if changes.keeps_every_pin() {
            tracing::info!(changes = %changes.summary(), "adopted the pinned datapath state: every pin is kept; {history}");
        } else {
            tracing::info!(
                changes = %changes.summary(),
                "adopted the pinned datapath state: the pins of services and backends the config no longer lists \
                 were deleted, every other pin is kept; {history}"
            );
        }
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

/// Reads the datapath's `MOVES` ring buffer into the daemon's journal.
fn spawn_journal_reader(daemon: &Arc<Mutex<Daemon>>) {
    let map = daemon.lock().unwrap_or_else(|p| p.into_inner()).dp.ebpf_mut().take_map(lb_common::maps::MOVES);
    let Some(map) = map else {
        tracing::warn!("no MOVES ring buffer: the journal of moves stays empty");
        return;
    };
    let ring = match aya::maps::RingBuf::try_from(map) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "the MOVES ring buffer: the journal of moves stays empty");
            return;
        }
    };
    // SAFETY: the AsyncFd owns the ring buffer, and with it the fd, for as long as it is polled.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "polling the MOVES ring buffer");
            return;
        }
    };
    let weak = Arc::downgrade(daemon);
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { break };
            let mut batch = Vec::new();
            {
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() >= std::mem::size_of::<lb_common::MoveEvent>() {
                        // SAFETY: the program writes whole MoveEvents; read_unaligned copes with
                        // the ring's 8-byte alignment.
                        batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<lb_common::MoveEvent>()) });
                    }
                }
            }
            guard.clear_ready();
            if batch.is_empty() {
                continue;
            }
            let Some(d) = weak.upgrade() else { break };
            let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
            for e in &batch {
                d.record_move(e);
            }
        }
    });
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
    crate::history::forget(&pins.path);
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
    let pins = PinDir::prepare(&cfg.datapath.pin_path).inspect_err(|_| cleanup_socket())?;
    // One daemon per pin directory, whatever socket each was given: held until this exits.
    let _owner = PinLock::acquire(&pins.path).inspect_err(|_| cleanup_socket())?;
    // A start that fails from here on leaves no bpffs it mounted (unless state was pinned there).
    let undo = |e: anyhow::Error| {
        pins.release(&[]);
        cleanup_socket();
        e
    };
    let metrics_listener = match cfg.control.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await.map_err(undo)?),
        None => None,
    };
    let netlink = match cfg.announce {
        Some(_) => Some(crate::announce::connect().map_err(undo)?),
        None => None,
    };
    let neigh_netlink = crate::neighbours::connect().map_err(undo)?;
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
    let daemon = Arc::new_cyclic(|me| Mutex::new(Daemon {
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
        pins: PinCounter::default(),
        me: me.clone(),
        veth_warnings: Vec::new(),
        replies: Default::default(),
        loads: Default::default(),
        hot: Default::default(),
        ticks: 0,
        journal: Default::default(),
        trend: Default::default(),
    }));
    {
        let mut d = daemon.lock().unwrap_or_else(|p| p.into_inner());
        d.sample_rates();
        let table = d.dp.pin_table()?;
        d.pins.start(table, Arc::downgrade(&daemon), Daemon::pin_view).context("starting the pin counter")?;
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
    // The journal of moves: the datapath's MOVES ring buffer, read as it fills.
    {
        let mut d = daemon.lock().unwrap_or_else(|p| p.into_inner());
        let c = d.config.control.journal.clone();
        d.journal.configure(&c);
    }
    spawn_journal_reader(&daemon);
    // What would run but lose traffic: said now, and again when it changes.
    let veth = crate::environment::veth_warnings(&daemon.lock().unwrap_or_else(|p| p.into_inner()).config.datapath.interfaces);
    daemon.lock().unwrap_or_else(|p| p.into_inner()).set_veth_warnings(veth);
    let weak = Arc::downgrade(&daemon);
    let veth_watch = tokio::spawn(async move {
        loop {
            tokio::time::sleep(VETH_RECHECK).await;
            let Some(d) = weak.upgrade() else { break };
            let ifaces = d.lock().unwrap_or_else(|p| p.into_inner()).config.datapath.interfaces.clone();
            drop(d);
            let Ok(w) = tokio::task::spawn_blocking(move || crate::environment::veth_warnings(&ifaces)).await else { break };
            let Some(d) = weak.upgrade() else { break };
            d.lock().unwrap_or_else(|p| p.into_inner()).set_veth_warnings(w);
        }
    });
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
    let mut balance_tick = tokio::time::interval(crate::balance::SAMPLE_EVERY);
    balance_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lock = || daemon.lock().unwrap_or_else(|p| p.into_inner());
    let result = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break Ok(Stop::Leave) }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break Ok(Stop::Leave) }
            Some(how) = stop_rx.recv() => break Ok(how),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading {}", config_path.display());
                match lock().reload() {
                    Ok(ch) => tracing::info!(changes = %ch.summary(), "reload applied"),
                    Err(e) => tracing::error!("reload refused, the running config stays in force:\n{e}"),
                }
            }
            Some(ev) = health_rx.recv() => lock().on_health(ev),
            _ = balance_tick.tick() => lock().balance_tick(),
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
    veth_watch.abort();
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
        d.pins.stop();
        match how {
            Stop::Leave => {
                d.dp.release_attachments();
                if let Err(e) = crate::history::save(&pins.path, &d.rt) {
                    tracing::warn!(error = %format!("{e:#}"), "saving the backends' health history: the next lb starts it afresh");
                }
            }
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

/// `lb down` without a running daemon: detach and remove what a daemon left pinned. `None`
/// when nothing was pinned.
pub fn down_offline(cfg: &Config) -> Result<Option<String>> {
    require_root("lb down")?;
    // A daemon that still runs on this pin path (reached through another socket than this
    // config's) keeps it: its state is not pulled from under it.
    let _owner = if cfg.datapath.pin_path.is_dir() {
        Some(PinLock::acquire(&cfg.datapath.pin_path).context("lb down: stop the running daemon through its own socket (lb down --socket PATH) or with SIGTERM first")?)
    } else {
        None
    };
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
        crate::history::forget(dir);
        return Ok(None);
    }
    let pins = PinDir::existing(dir);
    let links = remove_pinned_state(&pins);
    Ok(Some(format!(
        "detached XDP from {} and removed the pinned state under {}",
        if links.is_empty() { "no interface".to_string() } else { links.join(", ") },
        dir.display()
    )))
}
