//! `lb agent`: sticky to the process on a backend host. The applications' listening sockets of a
//! port (one `SO_REUSEPORT` group: nginx `reuseport`, preforking servers) are found in
//! `/proc/net/{tcp,tcp6,udp,udp6}` and the processes' fds, copied with `pidfd_getfd(2)` just long
//! enough to put them into the program's `REUSEPORT_SOCKARRAY` (the kernel clears a socket's slot
//! when its process closes it, so a copy is never kept: a worker that exits really closes its
//! socket), and the `lb-agent` selector program is attached to the group. Every second the agent
//! looks again: a new worker's socket takes a free slot. Stopping detaches the program: the port
//! falls back to the kernel's own spread.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, ReusePortSockArray},
    programs::SkReuseport,
};
use lb_common::{AGENT_MAX_SOCKETS, AgentConfig, AgentKey, AgentPin, agent_stat, maps};

use crate::api::{AgentStatus, AgentWorker};

/// The agent's control socket unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lb/agent.sock";
/// New clients per second are counted over this much time.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The agent's program (`lb-ebpf/src/agent.rs`), built by build.rs.
pub static AGENT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-agent"));

/// How often the agent looks for workers that came or went.
pub const RESCAN: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// What `lb agent` is told.
#[derive(Clone, Debug)]
pub struct Options {
    pub ports: Vec<u16>,
    pub protocol: Proto,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub timeout: Duration,
}

/// What the `[agent]` table of a file says (every field optional; flags override them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileOptions {
    pub ports: Option<Vec<u16>>,
    pub protocol: Option<Proto>,
    pub ipv4_prefix: Option<u8>,
    pub ipv6_prefix: Option<u8>,
    pub timeout: Option<Duration>,
}

/// Reads the `[agent]` table of the TOML text `text` (other tables are not the agent's and are
/// left alone), reporting every problem, each with its field path.
pub fn parse_file(text: &str) -> std::result::Result<FileOptions, Vec<String>> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| vec![format!("TOML syntax error: {}", e.message())])?;
    let Some(t) = doc.get("agent") else { return Err(vec!["agent: the file has no [agent] table".into()]) };
    let Some(t) = t.as_table() else { return Err(vec!["agent: must be a table ([agent])".into()]) };
    let mut errs = Vec::new();
    let mut o = FileOptions::default();
    for (k, v) in t {
        let f = format!("agent.{k}");
        match k.as_str() {
            "ports" => match v.as_array() {
                Some(a) if !a.is_empty() => {
                    let mut ports = Vec::new();
                    for (i, p) in a.iter().enumerate() {
                        match p.as_integer() {
                            Some(n) if (1..=65535).contains(&n) => ports.push(n as u16),
                            _ => errs.push(format!("{f}[{i}]: must be a port 1..=65535, got {p}")),
                        }
                    }
                    o.ports = Some(ports);
                }
                _ => errs.push(format!("{f}: must be a non-empty list of ports, e.g. `ports = [8080]`")),
            },
            "protocol" => match v.as_str() {
                Some("tcp") => o.protocol = Some(Proto::Tcp),
                Some("udp") => o.protocol = Some(Proto::Udp),
                _ => errs.push(format!("{f}: must be \"tcp\" or \"udp\", got {v}")),
            },
            "ipv4_prefix" | "ipv6_prefix" => {
                let max = if k == "ipv4_prefix" { 32 } else { 128 };
                match v.as_integer() {
                    Some(n) if (0..=max).contains(&n) => {
                        if k == "ipv4_prefix" {
                            o.ipv4_prefix = Some(n as u8)
                        } else {
                            o.ipv6_prefix = Some(n as u8)
                        }
                    }
                    _ => errs.push(format!("{f}: must be 0..={max}, got {v}")),
                }
            }
            "timeout" => match v.as_str().map(humantime::parse_duration) {
                Some(Ok(d)) if !d.is_zero() => o.timeout = Some(d),
                _ => errs.push(format!("{f}: must be a duration like \"30m\", got {v}")),
            },
            _ => errs.push(format!("{f}: unknown field; expected one of ports, protocol, ipv4_prefix, ipv6_prefix, timeout")),
        }
    }
    if errs.is_empty() { Ok(o) } else { Err(errs) }
}

/// A listening socket of a port: its inode, and a process and fd that hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub inode: u64,
    pub port: u16,
    pub pid: u32,
    pub fd: i32,
}

/// The inodes of the listening (TCP) or bound (UDP) sockets on `ports`, from one
/// `/proc/net/<proto>` table's text.
pub fn listening(table: &str, ports: &[u16], proto: Proto) -> Vec<(u64, u16)> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            // TCP_LISTEN is 0A; a bound UDP socket is 07 (TCP_CLOSE) with no remote.
            let want = match proto {
                Proto::Tcp => "0A",
                Proto::Udp => "07",
            };
            let remote_zero = f.get(2)?.split(':').next()?.chars().all(|c| c == '0');
            (ports.contains(&port) && *f.get(3)? == want && remote_zero).then_some(())?;
            Some((f.get(9)?.parse().ok()?, port))
        })
        .collect()
}

/// Every process fd holding one of `inodes` (the first holder of each is enough; others are
/// kept as fallbacks), this process excluded.
fn holders(inodes: &BTreeMap<u64, u16>) -> Vec<Found> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.filter_map(|e| e.ok()) {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.filter_map(|e| e.ok()) {
            let Ok(link) = std::fs::read_link(fd.path()) else { continue };
            let Some(inode) = link.to_str().and_then(|l| l.strip_prefix("socket:[")).and_then(|l| l.strip_suffix(']')).and_then(|i| i.parse().ok()) else {
                continue;
            };
            if let (Some(port), Some(n)) = (inodes.get(&inode), fd.file_name().to_str().and_then(|n| n.parse().ok())) {
                out.push(Found { inode, port: *port, pid, fd: n });
            }
        }
    }
    out
}

/// The listening sockets on the agent's ports now, one holder each.
pub fn find(opts: &Options) -> BTreeMap<u64, Found> {
    let tables: &[&str] = match opts.protocol {
        Proto::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        Proto::Udp => &["/proc/net/udp", "/proc/net/udp6"],
    };
    let mut inodes = BTreeMap::new();
    for t in tables {
        if let Ok(text) = std::fs::read_to_string(t) {
            inodes.extend(listening(&text, &opts.ports, opts.protocol));
        }
    }
    let mut out = BTreeMap::new();
    for f in holders(&inodes) {
        out.entry(f.inode).or_insert(f);
    }
    out
}

/// A copy of `found`'s socket in this process (`pidfd_open` + `pidfd_getfd`, needs root).
fn grab(found: &Found) -> Result<OwnedFd> {
    // SAFETY: plain syscalls; the fds they return are owned right away.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, found.pid as libc::c_int, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("pidfd_open({})", found.pid));
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), found.fd, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pidfd_getfd(pid {}, fd {}) (needs root, Linux 5.6+)", found.pid, found.fd));
        }
        Ok(OwnedFd::from_raw_fd(fd as i32))
    }
}

fn reuseport(fd: &OwnedFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int we own.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, (&mut v as *mut libc::c_int).cast(), &mut len) };
    r == 0 && v != 0
}

fn v6_mask(prefix: u8) -> [u32; 4] {
    std::array::from_fn(|i| {
        let bits = (prefix as i32 - 32 * i as i32).clamp(0, 32) as u32;
        if bits == 0 { 0 } else { (u32::MAX << (32 - bits)).to_be() }
    })
}

/// The running agent: its program and maps, and which slot holds which socket.
pub struct Agent {
    ebpf: Ebpf,
    opts: Options,
    /// Slot -> the socket there (its inode, and the process that held it when it came).
    slots: BTreeMap<u32, Found>,
    /// The ports whose group has the program attached.
    attached: BTreeSet<u16>,
    /// Samples of `AGENT_SLOT_NEW`, for new clients per second.
    samples: VecDeque<(Instant, Vec<u64>)>,
}

impl Agent {
    pub fn load(opts: Options) -> Result<Self> {
        let mut ebpf = Ebpf::load(AGENT_OBJECT).context("loading lb-agent's program and maps")?;
        let prog: &mut SkReuseport = ebpf
            .program_mut("lb_agent")
            .context("the agent object has no program lb_agent")?
            .try_into()
            .context("lb_agent is not an sk_reuseport program")?;
        prog.load().context("loading lb_agent (verifier)")?;
        let mut a = Self { ebpf, opts, slots: BTreeMap::new(), attached: BTreeSet::new(), samples: VecDeque::new() };
        a.write_config()?;
        Ok(a)
    }

    fn write_config(&mut self) -> Result<()> {
        let slots = self.slots.keys().next_back().map_or(0, |s| s + 1);
        let cfg = AgentConfig {
            v4_mask: lb_common::v4_mask(self.opts.ipv4_prefix as u32),
            slots,
            v6_mask: v6_mask(self.opts.ipv6_prefix),
            timeout_ns: self.opts.timeout.as_nanos().min(u64::MAX as u128) as u64,
            hash_seed: 0,
            _pad: 0,
        };
        let mut m: Array<&mut MapData, AgentConfig> = Array::try_from(self.ebpf.map_mut(maps::AGENT_CONFIG).context("AGENT_CONFIG")?)?;
        m.set(0, cfg, 0).context("writing AGENT_CONFIG")
    }

    /// One look at the port: sockets gone give their slot back, new ones take a free slot, and
    /// a group without the program gets it. Returns (added, removed) socket counts.
    pub fn rescan(&mut self) -> Result<(usize, usize)> {
        let now = find(&self.opts);
        let gone: Vec<u32> = self.slots.iter().filter(|(_, f)| !now.contains_key(&f.inode)).map(|(s, _)| *s).collect();
        for s in &gone {
            // The kernel cleared the slot when the socket closed; forget it.
            self.slots.remove(s);
        }
        // A port none of whose sockets is left lost its group (the server restarted whole): the
        // next socket of the port makes a new group, which needs the program attached again.
        let live_ports: BTreeSet<u16> = self.slots.values().map(|f| f.port).collect();
        self.attached.retain(|p| live_ports.contains(p));
        self.sample();
        let known: BTreeSet<u64> = self.slots.values().map(|f| f.inode).collect();
        let mut added = 0;
        for f in now.values().filter(|f| !known.contains(&f.inode)) {
            let fd = match grab(f) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(pid = f.pid, fd = f.fd, error = %format!("{e:#}"), "cannot take a copy of a listening socket");
                    continue;
                }
            };
            if !reuseport(&fd) {
                tracing::warn!(pid = f.pid, port = f.port, "a socket on the port without SO_REUSEPORT: it is not part of a group the agent can steer");
                continue;
            }
            let Some(slot) = (0..AGENT_MAX_SOCKETS).find(|s| !self.slots.contains_key(s)) else {
                tracing::warn!("every slot is taken: {AGENT_MAX_SOCKETS} sockets at most");
                break;
            };
            {
                let mut socks: ReusePortSockArray<&mut MapData> =
                    ReusePortSockArray::try_from(self.ebpf.map_mut(maps::AGENT_SOCKS).context("AGENT_SOCKS")?)?;
                socks.set(slot, &fd, 0).with_context(|| format!("putting the socket of pid {} into AGENT_SOCKS", f.pid))?;
            }
            if !self.attached.contains(&f.port) {
                let prog: &mut SkReuseport = self.ebpf.program_mut("lb_agent").expect("loaded").try_into()?;
                prog.attach(&fd).with_context(|| format!("attaching lb_agent to the reuseport group of port {}", f.port))?;
                self.attached.insert(f.port);
                tracing::info!(port = f.port, "attached to the port's SO_REUSEPORT group");
            }
            tracing::info!(pid = f.pid, port = f.port, slot, comm = %comm(f.pid), "worker socket added");
            self.slots.insert(slot, f.clone());
            added += 1;
            // `fd` is dropped here: the worker's own fd keeps the socket (and its slot) alive.
        }
        for s in &gone {
            tracing::info!(slot = s, "worker socket gone: its clients are placed again");
        }
        if added > 0 || !gone.is_empty() {
            self.write_config()?;
        }
        Ok((added, gone.len()))
    }

    pub fn sockets(&self) -> usize {
        self.slots.len()
    }

    fn per_cpu_sum(&self, name: &str, n: u32) -> Vec<u64> {
        let Some(map) = self.ebpf.map(name) else { return vec![0; n as usize] };
        let Ok(a) = PerCpuArray::<&MapData, u64>::try_from(map) else { return vec![0; n as usize] };
        (0..n).map(|i| a.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)).collect()
    }

    fn sample(&mut self) {
        let now = Instant::now();
        let v = self.per_cpu_sum(maps::AGENT_SLOT_NEW, AGENT_MAX_SOCKETS);
        self.samples.push_back((now, v));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= RATE_WINDOW {
            self.samples.pop_front();
        }
    }

    /// What `lb agent status` shows.
    pub fn status(&self) -> Result<AgentStatus> {
        let now = crate::datapath::monotonic_coarse_ns();
        let timeout = self.opts.timeout.as_nanos() as u64;
        let pins: HashMap<&MapData, AgentKey, AgentPin> = HashMap::try_from(self.ebpf.map(maps::AGENT_PINS).context("AGENT_PINS")?)?;
        let mut by_slot: BTreeMap<u32, u64> = BTreeMap::new();
        for entry in pins.iter() {
            let Ok((_, p)) = entry else { continue };
            if now.saturating_sub(p.last_seen_ns) <= timeout {
                *by_slot.entry(p.index).or_default() += 1;
            }
        }
        let rate = |slot: u32| -> f64 {
            let (Some((t0, a)), Some((t1, b))) = (self.samples.front(), self.samples.back()) else { return 0.0 };
            let secs = t1.duration_since(*t0).as_secs_f64();
            let (x, y) = (a.get(slot as usize).copied().unwrap_or(0), b.get(slot as usize).copied().unwrap_or(0));
            if secs > 0.0 && y >= x { (y - x) as f64 / secs } else { 0.0 }
        };
        let stats = self.per_cpu_sum(maps::AGENT_STATS, agent_stat::COUNT);
        Ok(AgentStatus {
            pid: std::process::id(),
            ports: self.opts.ports.clone(),
            protocol: match self.opts.protocol {
                Proto::Tcp => "tcp".into(),
                Proto::Udp => "udp".into(),
            },
            ipv4_prefix: self.opts.ipv4_prefix,
            ipv6_prefix: self.opts.ipv6_prefix,
            timeout: humantime::format_duration(self.opts.timeout).to_string(),
            workers: self
                .slots
                .iter()
                .map(|(slot, f)| AgentWorker {
                    slot: *slot,
                    pid: f.pid,
                    command: comm(f.pid),
                    port: f.port,
                    socket: f.inode,
                    pinned: by_slot.get(slot).copied().unwrap_or(0),
                    new_clients_per_sec: rate(*slot),
                })
                .collect(),
            pinned: by_slot.values().sum(),
            hits: stats[agent_stat::HIT as usize],
            placed: stats[agent_stat::PLACED as usize],
            moved: stats[agent_stat::MOVED as usize],
            fallback: stats[agent_stat::FALLBACK as usize],
        })
    }

    /// Detaches the program from every group it was attached to (through a socket of it).
    pub fn detach(&mut self) -> Result<()> {
        detach_ports(&self.opts, &self.attached.iter().copied().collect::<Vec<_>>())?;
        self.attached.clear();
        Ok(())
    }
}

/// Detaches any reuseport program from the groups of `ports` (`lb agent --detach`, and stop).
pub fn detach_ports(opts: &Options, ports: &[u16]) -> Result<usize> {
    let mut n = 0;
    let found = find(opts);
    for port in ports {
        let Some(f) = found.values().find(|f| f.port == *port) else { continue };
        let fd = grab(f)?;
        match SkReuseport::detach(&fd) {
            Ok(()) => n += 1,
            // Nothing attached: fine.
            Err(e) if format!("{e:?}").contains("ENOENT") || format!("{e:?}").contains("No such file") => {}
            Err(e) => bail!("detaching from port {port}: {e:#}"),
        }
    }
    Ok(n)
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_owned()).unwrap_or_default()
}

type SharedAgent = Arc<Mutex<Agent>>;

async fn status_handler(
    axum::extract::State(a): axum::extract::State<SharedAgent>,
) -> Result<axum::Json<AgentStatus>, (axum::http::StatusCode, axum::Json<crate::api::ApiError>)> {
    let r = a.lock().unwrap_or_else(|p| p.into_inner()).status();
    r.map(axum::Json).map_err(|e| {
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, axum::Json(crate::api::ApiError { error: format!("{e:#}") }))
    })
}

/// `lb agent status`.
pub fn status_cli(socket: &Path, json: bool) -> Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let st: AgentStatus = rt.block_on(crate::client::get_json(socket, "/status"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", render_status(&st));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `lb agent status` as text.
pub fn render_status(st: &AgentStatus) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let ports: Vec<String> = st.ports.iter().map(u16::to_string).collect();
    let _ = writeln!(
        o,
        "lb agent (pid {}) on {} port {}: clients by /{} (IPv4), /{} (IPv6), timeout {}",
        st.pid,
        st.protocol,
        ports.join(","),
        st.ipv4_prefix,
        st.ipv6_prefix,
        st.timeout
    );
    let _ = writeln!(
        o,
        "pinned clients {}; connections by pin {}, clients placed {}, placed again (worker gone) {}, left to the kernel {}",
        st.pinned, st.hits, st.placed, st.moved, st.fallback
    );
    let _ = writeln!(o, "  {:>4} {:>8} {:<16} {:>6} {:>12} {:>8} {:>8}", "slot", "pid", "command", "port", "socket", "pinned", "new/s");
    for w in &st.workers {
        let _ = writeln!(
            o,
            "  {:>4} {:>8} {:<16} {:>6} {:>12} {:>8} {:>8.1}",
            w.slot, w.pid, w.command, w.port, w.socket, w.pinned, w.new_clients_per_sec
        );
    }
    if st.workers.is_empty() {
        let _ = writeln!(o, "  (no worker socket with SO_REUSEPORT on the port yet)");
    }
    o
}

/// `lb agent` in the foreground until SIGTERM or SIGINT, answering `lb agent status` on `socket`.
pub async fn run(opts: Options, socket: Option<PathBuf>) -> Result<()> {
    crate::run::require_root("lb agent")?;
    if opts.ports.is_empty() {
        bail!("lb agent: give at least one --port");
    }
    let socket = socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let listener = crate::control::bind(&socket).await?;
    let agent = match Agent::load(opts.clone()) {
        Ok(a) => Arc::new(Mutex::new(a)),
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let app = axum::Router::new().route("/status", axum::routing::get(status_handler)).with_state(agent.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let lock = || agent.lock().unwrap_or_else(|p| p.into_inner());
    let added = match lock().rescan() {
        Ok((added, _)) => added,
        Err(e) => {
            let _ = lock().detach();
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    tracing::info!(
        ports = %opts.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
        sockets = added,
        socket = %socket.display(),
        "lb agent running: each client prefix stays on one worker socket"
    );
    if added == 0 {
        tracing::warn!("no listening socket with SO_REUSEPORT on the port(s) yet: waiting for one");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(RESCAN);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                if let Err(e) = lock().rescan() {
                    tracing::warn!(error = %format!("{e:#}"), "looking for worker sockets");
                }
            }
        }
    }
    server.abort();
    let r = lock().detach();
    let _ = std::fs::remove_file(&socket);
    r?;
    tracing::info!("lb agent stopped: detached, the port is spread by the kernel again");
    Ok(())
}

/// The client key's address part for `addr` (for tests and status).
pub fn masked(addr: IpAddr, opts: &Options) -> [u32; 4] {
    let w = crate::datapath::addr_words(addr);
    match addr {
        IpAddr::V4(_) => [w[0] & lb_common::v4_mask(opts.ipv4_prefix as u32), 0, 0, 0],
        IpAddr::V6(_) => {
            let m = v6_mask(opts.ipv6_prefix);
            std::array::from_fn(|i| w[i] & m[i])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_read_from_proc_net() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000 100 0 0 10 0\n\
                   1: 0100007F:1F90 0200007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000 100 0 0 10 0\n\
                   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000 100 0 0 10 0\n";
        assert_eq!(listening(tcp, &[8080], Proto::Tcp), [(4242, 8080)]);
        assert_eq!(listening(tcp, &[80, 8080], Proto::Tcp), [(4242, 8080), (4444, 80)]);
        assert!(listening(tcp, &[8080], Proto::Udp).is_empty());
    }

    #[test]
    fn the_agent_table_of_a_file() {
        let o = parse_file("[datapath]\nx = 1\n[agent]\nports = [8080, 8443]\nprotocol = \"udp\"\nipv4_prefix = 24\ntimeout = \"5m\"\n").unwrap();
        assert_eq!(o.ports, Some(vec![8080, 8443]));
        assert_eq!((o.protocol, o.ipv4_prefix, o.ipv6_prefix), (Some(Proto::Udp), Some(24), None));
        assert_eq!(o.timeout, Some(Duration::from_secs(300)));
        let errs = parse_file("[agent]\nports = [0]\nprotocol = \"sctp\"\nipv6_prefix = 129\ntimeout = \"soon\"\ncolour = 1\n").unwrap_err();
        for f in ["agent.ports[0]", "agent.protocol", "agent.ipv6_prefix", "agent.timeout", "agent.colour: unknown field"] {
            assert!(errs.iter().any(|e| e.starts_with(f)), "{f} in {errs:?}");
        }
        assert!(parse_file("[datapath]\n").unwrap_err()[0].contains("no [agent] table"));
    }

    #[test]
    fn v6_masks() {
        assert_eq!(v6_mask(128), [u32::MAX; 4]);
        assert_eq!(v6_mask(64), [u32::MAX, u32::MAX, 0, 0]);
        assert_eq!(v6_mask(0), [0; 4]);
        assert_eq!(v6_mask(40)[1], (0xff00_0000u32).to_be());
    }
}
