//! `lb run`: validate, load, attach, write the maps, serve the control socket, clean up.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    bpffs::PinDir,
    config::Config,
    control::{self, BackendReport, InterfaceReport, ServiceReport, StatusReport},
    datapath::{ALL_MAPS, Capacity, Datapath},
    plan::Plan,
};

/// How often the balancer's own addresses are re-read into LOCAL_ADDRS.
const LOCAL_ADDR_REFRESH: Duration = Duration::from_secs(5);

/// The running state the control API reads.
pub struct Daemon {
    pub config_path: PathBuf,
    pub config: Config,
    pub plan: Plan,
    pub dp: Datapath,
}

impl Daemon {
    pub fn status(&self) -> Result<StatusReport> {
        let mut services = Vec::new();
        for s in &self.plan.services {
            let mut backends = Vec::new();
            for b in &s.backends {
                backends.push(BackendReport {
                    id: b.id,
                    address: b.config.address.to_string(),
                    port: b.config.port,
                    weight: b.config.weight,
                    state: "up".into(),
                    slots: s.table.iter().filter(|id| **id == b.id).count() as u32,
                    counters: self.dp.backend_counters(b.id)?,
                });
            }
            services.push(ServiceReport {
                id: s.entry.id,
                name: s.config.name.clone(),
                vip: s.config.vip.to_string(),
                port: s.config.port,
                protocol: s.config.protocol.to_string(),
                affinity_timeout: humantime::format_duration(s.config.affinity.timeout).to_string(),
                ipv4_prefix: s.config.affinity.ipv4_prefix,
                counters: self.dp.service_counters(s.entry.id)?,
                backends,
            });
        }
        Ok(StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            config: self.config_path.display().to_string(),
            layout_version: lb_common::LAYOUT_VERSION,
            maglev_table_size: self.config.datapath.maglev_table_size,
            interfaces: self
                .dp
                .attachments()
                .iter()
                .map(|a| InterfaceReport { name: a.interface.clone(), mode: a.mode.to_string() })
                .collect(),
            services,
            stats: self.dp.stats()?.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        })
    }
}

/// Checks that need no kernel state: root, and every configured interface exists here.
fn preflight(cfg: &Config) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("lb run needs root (it loads eBPF and attaches XDP): run it as root or with sudo");
    }
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

/// The IPv4 addresses of this network namespace (the balancer's own).
pub fn local_ipv4_addrs() -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|s| s.ip())))
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

/// Loads, pins, writes and attaches; on any error everything done so far is undone.
fn start(cfg: &Config, pins: &PinDir) -> Result<(Datapath, Plan)> {
    raise_memlock();
    let mut dp = Datapath::load(Capacity::from_config(&cfg.datapath), Some(&pins.path))?;
    dp.check_layout()?;
    let plan = Plan::new(cfg);
    plan.apply(&mut dp).context("writing services and backends")?;
    dp.set_local_addrs(&local_ipv4_addrs())?;
    for iface in &cfg.datapath.interfaces {
        let mode = dp.attach(iface, cfg.datapath.xdp_mode)?;
        tracing::info!(interface = %iface, %mode, "attached XDP");
    }
    Ok((dp, plan))
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

pub async fn run(config_path: &Path, socket_override: Option<PathBuf>) -> Result<()> {
    let cfg = Config::load(config_path).map_err(|e| anyhow!("invalid config {}:\n{e}", config_path.display()))?;
    preflight(&cfg)?;
    let socket = socket_override.unwrap_or_else(|| cfg.control.socket.clone());
    // Bound first: a second daemon on the same socket is refused before it touches any pin.
    let listener = control::bind(&socket).await?;
    let pins = match PinDir::prepare(&cfg.datapath.pin_path) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let (mut dp, plan) = match start(&cfg, &pins) {
        Ok(x) => x,
        Err(e) => {
            pins.release(&ALL_MAPS);
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    spawn_ebpf_logger(&mut dp);
    for s in &plan.services {
        tracing::info!(
            service = %s.config.name,
            vip = %format!("{}:{}/{}", s.config.vip, s.config.port, s.config.protocol),
            backends = s.backends.len(),
            "service ready"
        );
    }
    let daemon = Arc::new(Mutex::new(Daemon { config_path: config_path.into(), config: cfg, plan, dp }));
    let mut server = tokio::spawn(control::serve(listener, daemon.clone()));
    tracing::info!(socket = %socket.display(), "lb running");

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut tick = tokio::time::interval(LOCAL_ADDR_REFRESH);
    let result = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break Ok(()) }
            r = &mut server => {
                break Err(match r {
                    Ok(Err(e)) => e,
                    _ => anyhow!("the control server stopped"),
                });
            }
            _ = tick.tick() => {
                let addrs = local_ipv4_addrs();
                let mut d = daemon.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = d.dp.set_local_addrs(&addrs) {
                    tracing::warn!(error = %format!("{e:#}"), "refreshing LOCAL_ADDRS");
                }
            }
        }
    };
    server.abort();
    {
        let mut d = daemon.lock().unwrap_or_else(|p| p.into_inner());
        d.dp.detach_all();
    }
    drop(daemon);
    pins.release(&ALL_MAPS);
    let _ = std::fs::remove_file(&socket);
    tracing::info!("detached and removed pinned state");
    result
}
