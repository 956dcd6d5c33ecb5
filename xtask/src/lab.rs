//! The namespace lab that `cargo xtask run`, the end-to-end tests and the benchmarks share.
//!
//! ```text
//!  ns <p>-cl                  ns <p>-lb (lb runs here)                 ns <p>-b<i>
//!  eth0 10.200.1.2/24  <──>  eth0 10.200.1.1/24
//!       + 10.200.1.10..                eth<i> 10.200.(10+i).1/24  <──>  eth0 10.200.(10+i).2/24
//!       default via .1.1                                                   default via .(10+i).1
//!                                                                          HTTP :8080, UDP :5353
//! ```
//!
//! The VIP (10.200.100.1) lives on no interface: clients reach it through their default route,
//! and the XDP program on the balancer's `eth0` catches it. Without `lb` the VIP is unreachable
//! (the balancer namespace has no route to it), while the backends' own addresses are reachable
//! through plain kernel forwarding.
//!
//! Everything the lab makes is named after `<p>` = `lb<pid>-<counter>`, so labs of concurrent
//! tests never collide, and all of it is removed when the [`Lab`] is dropped, also while a
//! test panics. Veths are created directly inside their namespaces, so the root namespace's
//! network configuration is never touched. The backend servers are threads of this process whose
//! sockets were made inside the backend namespaces (see [`in_netns`]).

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::net::if_::InterfaceFlags;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use socket2::{Domain, Protocol, Socket, Type};

/// The virtual IP of both lab services; configured on no interface.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 1);
/// Service port of the `web` (TCP/HTTP) service on the VIP.
pub const VIP_HTTP_PORT: u16 = 80;
/// Service port of the `dns` (UDP) service on the VIP.
pub const VIP_UDP_PORT: u16 = 53;
/// Port of every backend's HTTP server.
pub const BACKEND_HTTP_PORT: u16 = 8080;
/// Port of every backend's UDP echo-ish server.
pub const BACKEND_UDP_PORT: u16 = 5353;

/// Where `ip netns add` puts its namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// Per-lab working directories (config, control socket, lb log) live under here.
const LAB_ROOT: &str = "/run/lb-lab";
/// Upper bound for one helper command (`ip`, `ethtool`, `lb status`): nothing here may hang.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Lab::start_lb`] waits for `lb status` to answer.
const LB_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Grace period between SIGTERM and SIGKILL in [`Lab::stop_lb`].
const LB_STOP_GRACE: Duration = Duration::from_secs(5);
/// Server threads look at their stop flag at least this often.
const SERVER_POLL: Duration = Duration::from_millis(20);
/// A backend gives up on a silent HTTP client after this long.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabSpec {
    /// Number of client addresses (10.200.1.10 onwards), 1..=240.
    pub clients: u32,
    /// Number of backends, 1..=50.
    pub backends: u32,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            clients: 8,
            backends: 3,
        }
    }
}

impl LabSpec {
    /// The balancer's interfaces: `eth0` (clients) and `eth1..ethN` (backends).
    pub fn interfaces(&self) -> Vec<String> {
        (0..=self.backends).map(|i| format!("eth{i}")).collect()
    }

    /// The balancer config of a lab of this size: services `web` (TCP :80, HTTP health checks,
    /// 30 min affinity) and `dns` (UDP :53, no health checks) on the VIP, every backend in
    /// both, `interfaces` as the XDP interfaces and `socket` as the control socket. Needs no
    /// lab (for `lb check` tests).
    pub fn config_toml(&self, interfaces: &[String], socket: &Path) -> String {
        let ifs: Vec<String> = interfaces.iter().map(|s| toml_str(s)).collect();
        let mut s = String::new();
        let _ = write!(
            s,
            "# Written by the xtask lab.\n\
             [datapath]\n\
             interfaces = [{ifs}]\n\
             mode = \"nat\"\n\
             xdp_mode = \"auto\"\n\
             affinity_entries = 65536\n\
             # Private per process: `ip netns exec` gives lb its own /sys.\n\
             pin_path = \"/sys/fs/bpf/lb\"\n\
             max_services = 8\n\
             maglev_table_size = 65537\n\
             \n\
             [control]\n\
             socket = {sock}\n\
             \n\
             [[services]]\n\
             name = \"web\"\n\
             vip = \"{VIP}\"\n\
             port = {VIP_HTTP_PORT}\n\
             protocol = \"tcp\"\n\
             [services.affinity]\n\
             timeout = \"30m\"\n\
             [services.health]\n\
             kind = \"http\"\n\
             path = \"/healthz\"\n",
            ifs = ifs.join(", "),
            sock = toml_str(&socket.to_string_lossy()),
        );
        for i in 1..=self.backends {
            let _ = write!(
                s,
                "[[services.backends]]\naddress = \"{}\"\nport = {BACKEND_HTTP_PORT}\n",
                backend_addr(i)
            );
        }
        let _ = write!(
            s,
            "\n[[services]]\n\
             name = \"dns\"\n\
             vip = \"{VIP}\"\n\
             port = {VIP_UDP_PORT}\n\
             protocol = \"udp\"\n\
             [services.health]\n\
             kind = \"none\"\n"
        );
        for i in 1..=self.backends {
            let _ = write!(
                s,
                "[[services.backends]]\naddress = \"{}\"\nport = {BACKEND_UDP_PORT}\n",
                backend_addr(i)
            );
        }
        s
    }
}

/// Backend `i`'s own address (1-based), 10.200.(10+i).2.
pub fn backend_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (10 + i) as u8, 2)
}

/// What one backend's servers have answered so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// HTTP requests other than `/healthz`.
    pub http: u64,
    /// HTTP requests for `/healthz` (the balancer's health checks).
    pub healthz: u64,
    /// UDP datagrams answered.
    pub udp: u64,
}

#[derive(Default)]
struct Counters {
    http: AtomicU64,
    healthz: AtomicU64,
    udp: AtomicU64,
}

/// A running lab: namespaces, veths, backend servers, config file, and optionally `lb`.
///
/// Dropping it stops `lb` (SIGTERM, SIGKILL after 5 s), stops the servers, deletes every
/// namespace and removes `/run/lb-lab/<p>`.
pub struct Lab {
    prefix: String,
    spec: LabSpec,
    ns_client: String,
    ns_lb: String,
    /// Namespaces created so far, in creation order (deleted in reverse).
    namespaces: Vec<String>,
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    counters: Vec<Arc<Counters>>,
    lb: Option<Child>,
}

impl Lab {
    /// Builds the whole lab and starts the backend servers. On any failure everything made so
    /// far is removed again before the error is returned.
    pub fn create(spec: LabSpec) -> Result<Lab> {
        ensure!(
            (1..=240).contains(&spec.clients),
            "LabSpec.clients must be 1..=240, got {}",
            spec.clients
        );
        ensure!(
            (1..=50).contains(&spec.backends),
            "LabSpec.backends must be 1..=50, got {}",
            spec.backends
        );
        ensure!(
            is_root(),
            "the lab needs root (network namespaces, veth, XDP)"
        );
        sweep_stale();

        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "lb{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = Path::new(LAB_ROOT).join(&prefix);
        let mut lab = Lab {
            config: dir.join("lb.toml"),
            socket: dir.join("lb.sock"),
            log: dir.join("lb.log"),
            dir,
            ns_client: format!("{prefix}-cl"),
            ns_lb: format!("{prefix}-lb"),
            prefix,
            spec,
            namespaces: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            counters: Vec::new(),
            lb: None,
        };
        // On error `lab` is dropped here, which removes whatever was already made.
        lab.build()
            .with_context(|| format!("creating lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;

        let cl = self.ns_client().to_owned();
        let lb = self.ns_lb().to_owned();
        self.add_netns(&cl)?;
        self.add_netns(&lb)?;
        for i in 1..=self.spec.backends {
            self.add_netns(&self.ns_backend(i))?;
        }

        // Client <-> balancer.
        ip(&[
            "link", "add", "eth0", "netns", &cl, "type", "veth", "peer", "name", "eth0", "netns",
            &lb,
        ])?;
        let mut cmds = vec![
            "link set lo up".to_owned(),
            "addr add 10.200.1.2/24 dev eth0".to_owned(),
        ];
        for a in self.client_addrs() {
            cmds.push(format!("addr add {a}/24 dev eth0"));
        }
        cmds.push("link set eth0 up".to_owned());
        cmds.push("route add default via 10.200.1.1".to_owned());
        self.ip_batch(&cl, &cmds)?;
        ethtool_lab_offloads(&cl, "eth0")?;

        // Balancer <-> backends.
        let mut lb_cmds = vec![
            "link set lo up".to_owned(),
            "addr add 10.200.1.1/24 dev eth0".to_owned(),
            "link set eth0 up".to_owned(),
        ];
        for i in 1..=self.spec.backends {
            let b = self.ns_backend(i);
            let ifname = format!("eth{i}");
            ip(&[
                "link", "add", &ifname, "netns", &lb, "type", "veth", "peer", "name", "eth0",
                "netns", &b,
            ])?;
            lb_cmds.push(format!("addr add 10.200.{}.1/24 dev {ifname}", 10 + i));
            lb_cmds.push(format!("link set {ifname} up"));
            self.ip_batch(
                &b,
                &[
                    "link set lo up".to_owned(),
                    format!("addr add {}/24 dev eth0", self.backend_addr(i)),
                    "link set eth0 up".to_owned(),
                    format!("route add default via 10.200.{}.1", 10 + i),
                ],
            )?;
            ethtool_lab_offloads(&b, "eth0")?;
        }
        self.ip_batch(&lb, &lb_cmds)?;
        let lb_ifs = self.interfaces();
        for ifname in &lb_ifs {
            ethtool_lab_offloads(&lb, ifname)?;
        }
        let mut sysctls = vec![
            ("net/ipv4/ip_forward".to_owned(), "1"),
            ("net/ipv4/conf/all/rp_filter".to_owned(), "0"),
            ("net/ipv4/conf/default/rp_filter".to_owned(), "0"),
        ];
        for ifname in &lb_ifs {
            sysctls.push((format!("net/ipv4/conf/{ifname}/rp_filter"), "0"));
        }
        in_netns(&lb, || -> Result<()> {
            for (key, value) in &sysctls {
                let path = Path::new("/proc/sys").join(key);
                fs::write(&path, value)
                    .with_context(|| format!("writing {value} to {}", path.display()))?;
            }
            Ok(())
        })??;

        // Carrier comes up at once, but the operational state (and with it the qdisc) only when
        // the kernel's link watcher gets round to it, up to a second later; until then the
        // first packets can vanish.
        for ns in self.namespaces.clone() {
            wait_links_running(&ns, Duration::from_secs(5))?;
        }
        for i in 1..=self.spec.backends {
            self.start_servers(i)?;
        }
        self.write_config(&self.render_config(&lb_ifs))?;
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    fn ip_batch(&self, ns: &str, cmds: &[String]) -> Result<()> {
        let file = self.dir.join(format!("{ns}.ip"));
        fs::write(&file, cmds.join("\n") + "\n")
            .with_context(|| format!("writing {}", file.display()))?;
        ip(&["-n", ns, "-batch", &file.to_string_lossy()])
            .with_context(|| format!("configuring namespace {ns}:\n{}", cmds.join("\n")))
    }

    fn start_servers(&mut self, i: u32) -> Result<()> {
        let ns = self.ns_backend(i);
        let (tcp, udp) = in_netns(&ns, || -> Result<(TcpListener, UdpSocket)> {
            let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_HTTP_PORT))
                .with_context(|| format!("binding TCP 0.0.0.0:{BACKEND_HTTP_PORT}"))?;
            tcp.set_nonblocking(true)
                .context("making the HTTP listener non-blocking")?;
            let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_UDP_PORT))
                .with_context(|| format!("binding UDP 0.0.0.0:{BACKEND_UDP_PORT}"))?;
            udp.set_read_timeout(Some(SERVER_POLL))
                .context("setting the UDP read timeout")?;
            Ok((tcp, udp))
        })?
        .with_context(|| format!("starting the servers of backend {i} in {ns}"))?;
        let body = format!("backend-{i}\n");
        let counters = Arc::new(Counters::default());
        self.counters.push(counters.clone());
        let (stop, b, c) = (self.stop.clone(), body.clone(), counters.clone());
        self.servers.push(
            thread::Builder::new()
                .name(format!("{ns}-http"))
                .spawn(move || serve_http(tcp, &b, &stop, &c))
                .context("spawning the HTTP server thread")?,
        );
        let stop = self.stop.clone();
        self.servers.push(
            thread::Builder::new()
                .name(format!("{ns}-udp"))
                .spawn(move || serve_udp(udp, &body, &stop, &counters))
                .context("spawning the UDP server thread")?,
        );
        Ok(())
    }

    /// The unique name stem `lb<pid>-<counter>` of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The spec this lab was built from.
    pub fn spec(&self) -> LabSpec {
        self.spec
    }

    /// The balancer's config file, `/run/lb-lab/<p>/lb.toml`.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The balancer's control socket named in the config, `/run/lb-lab/<p>/lb.sock`.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The file that collects `lb run`'s stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The client namespace, `<p>-cl`.
    pub fn ns_client(&self) -> &str {
        &self.ns_client
    }

    /// The balancer namespace, `<p>-lb`.
    pub fn ns_lb(&self) -> &str {
        &self.ns_lb
    }

    /// The namespace of backend `i` (1-based), `<p>-b<i>`.
    pub fn ns_backend(&self, i: u32) -> String {
        format!("{}-b{i}", self.prefix)
    }

    /// The VIP both services listen on.
    pub fn vip(&self) -> Ipv4Addr {
        VIP
    }

    /// The client addresses 10.200.1.10 .. 10.200.1.(10+clients-1).
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        (0..self.spec.clients)
            .map(|k| Ipv4Addr::new(10, 200, 1, (10 + k) as u8))
            .collect()
    }

    /// Backend `i`'s own address (1-based), 10.200.(10+i).2.
    pub fn backend_addr(&self, i: u32) -> Ipv4Addr {
        backend_addr(i)
    }

    /// The backend number (1-based) whose address is `addr`, if any.
    pub fn backend_index(&self, addr: Ipv4Addr) -> Option<u32> {
        (1..=self.spec.backends).find(|&i| self.backend_addr(i) == addr)
    }

    /// The balancer's interfaces: `eth0` (clients) and `eth1..ethN` (backends).
    pub fn interfaces(&self) -> Vec<String> {
        self.spec.interfaces()
    }

    /// Requests and datagrams backend `i` (1-based) has answered so far.
    pub fn backend_stats(&self, i: u32) -> BackendStats {
        (i as usize)
            .checked_sub(1)
            .and_then(|k| self.counters.get(k))
            .map(|c| BackendStats {
                http: c.http.load(Ordering::Relaxed),
                healthz: c.healthz.load(Ordering::Relaxed),
                udp: c.udp.load(Ordering::Relaxed),
            })
            .unwrap_or_default()
    }

    /// The lab's balancer config (see [`LabSpec::config_toml`]) with this lab's control socket,
    /// naming `interfaces` as the XDP interfaces.
    pub fn render_config(&self, interfaces: &[String]) -> String {
        self.spec.config_toml(interfaces, &self.socket)
    }

    /// Replaces the config file (for tests that need a variant of [`Lab::render_config`]).
    pub fn write_config(&self, text: &str) -> Result<()> {
        fs::write(&self.config, text).with_context(|| format!("writing {}", self.config.display()))
    }

    /// `ip netns exec <lb-ns> <lb_bin> run --config <cfg>` with `RUST_LOG=info` (unless set),
    /// `NO_COLOR=1` and stdin from /dev/null; the caller picks stdout/stderr.
    pub fn lb_run_command(&self, lb_bin: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns_lb()])
            .arg(lb_bin)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            // The log goes to a file that test failures print: no colour escapes.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `<lb_bin> --socket <sock> <args>` from the root namespace (the control socket is a
    /// path, reachable from anywhere), with a 30 s limit.
    pub fn lb_cli(&self, lb_bin: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(lb_bin);
        cmd.arg("--socket").arg(&self.socket).args(args);
        output_timeout(&mut cmd, CMD_TIMEOUT)
    }

    /// Whether `lb` was started by [`Lab::start_lb`] and not yet stopped (it may have exited).
    pub fn lb_started(&self) -> bool {
        self.lb.is_some()
    }

    /// Starts `lb run` in the balancer namespace (output appended to [`Lab::log_path`]) and
    /// waits until `lb status` answers, polling every 100 ms for up to 20 s. On timeout or an
    /// early exit the daemon is stopped and the error carries the last 30 lines of its log.
    pub fn start_lb(&mut self, lb_bin: &Path) -> Result<()> {
        ensure!(
            self.lb.is_none(),
            "lb is already running in lab {}",
            self.prefix
        );
        ensure!(
            lb_bin.is_file(),
            "lb binary {} does not exist (build it with `cargo build --release -p lb-userspace`)",
            lb_bin.display()
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let log2 = log
            .try_clone()
            .with_context(|| format!("duplicating {}", self.log.display()))?;
        let child = self
            .lb_run_command(lb_bin)
            .stdout(log)
            .stderr(log2)
            .spawn()
            .with_context(|| {
                format!(
                    "spawning `ip netns exec {} {} run`",
                    self.ns_lb(),
                    lb_bin.display()
                )
            })?;
        self.lb = Some(child);

        let started = Instant::now();
        let mut last_status;
        let err = loop {
            if let Some(child) = self.lb.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => break anyhow!("lb run exited early with {status}"),
                    Ok(None) => {}
                    Err(e) => break anyhow!(e).context("waiting for lb run"),
                }
            }
            match self.lb_cli(lb_bin, &["status"]) {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(out) => {
                    last_status = format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                }
                Err(e) => last_status = format!("{e:#}"),
            }
            if started.elapsed() >= LB_START_TIMEOUT {
                break anyhow!(
                    "`lb status` did not succeed within {LB_START_TIMEOUT:?} (last: {last_status})"
                );
            }
            thread::sleep(Duration::from_millis(100));
        };
        let stopped = self.stop_lb();
        let mut err = err.context(format!(
            "starting lb in {} with {}; last 30 lines of {}:\n{}",
            self.ns_lb(),
            self.config.display(),
            self.log.display(),
            self.lb_log_tail(30)
        ));
        if let Err(e) = stopped {
            err = err.context(format!("also failed to stop it: {e:#}"));
        }
        Err(err)
    }

    /// Stops `lb` if [`Lab::start_lb`] started it: SIGTERM, then SIGKILL after 5 s. Returns its
    /// exit status (`None` if it was not running). An error means SIGKILL was needed or waiting
    /// failed; the process is gone either way.
    pub fn stop_lb(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.lb.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait().context("checking on lb")? {
            return Ok(Some(status));
        }
        let pid = Pid::from_raw(child.id() as i32);
        // `ip netns exec` execs lb in place, so the child's pid is lb's.
        kill(pid, Signal::SIGTERM).with_context(|| format!("sending SIGTERM to lb (pid {pid})"))?;
        let deadline = Instant::now() + LB_STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().context("waiting for lb")? {
                return Ok(Some(status));
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let status = child.wait().context("waiting for lb after SIGKILL")?;
        bail!("lb (pid {pid}) ignored SIGTERM for {LB_STOP_GRACE:?} and was killed ({status})")
    }

    /// If `lb` was started and has exited since, reaps it and returns its exit status
    /// (afterwards [`Lab::lb_started`] is false); `None` while it runs or if never started.
    pub fn lb_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.lb.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().context("checking on lb")?;
        if status.is_some() {
            self.lb = None;
        }
        Ok(status)
    }

    /// Everything `lb run` has written so far ("" if nothing).
    pub fn lb_log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of [`Lab::lb_log`].
    pub fn lb_log_tail(&self, n: usize) -> String {
        let log = self.lb_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// HTTP `GET /` to `target` from the client namespace over a socket bound to `client`
    /// (which must be one of [`Lab::client_addrs`] or 10.200.1.2). Returns the body of a
    /// `200` answer; anything else, or no full answer within `timeout`, is an error.
    pub fn http_get(
        &self,
        client: Ipv4Addr,
        target: SocketAddrV4,
        timeout: Duration,
    ) -> Result<String> {
        in_netns(self.ns_client(), || http_get_here(client, target, timeout))?
            .with_context(|| format!("GET http://{target}/ from {client} in {}", self.ns_client()))
    }

    /// Sends one UDP datagram to `target` from `client` (in the client namespace) and returns
    /// the first reply's body and source address; no reply within `timeout` is an error.
    pub fn udp_query(
        &self,
        client: Ipv4Addr,
        target: SocketAddrV4,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        in_netns(self.ns_client(), || udp_query_here(client, target, timeout))?.with_context(|| {
            format!(
                "UDP query to {target} from {client} in {}",
                self.ns_client()
            )
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.stop_lb() {
            eprintln!("lab {}: stopping lb: {e:#}", self.prefix);
        }
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("lab {}: {e:#}", self.prefix);
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("lab {}: removing {}: {e}", self.prefix, self.dir.display());
        }
    }
}

/// Whether this process runs as root (the lab, `lb run` and the e2e tests need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `f` on a fresh thread that has entered network namespace `ns` (`/run/netns/<ns>`) and
/// returns its result. Sockets `f` creates belong to that namespace for their whole life, also
/// when used from other threads afterwards. A panic in `f` becomes an error. Use from plain
/// threads, never from inside an async runtime's worker.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = Path::new(NETNS_DIR).join(ns);
    let handle = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    thread::scope(|scope| {
        let worker = thread::Builder::new()
            .name(format!("in-{ns}"))
            .spawn_scoped(scope, move || -> Result<T> {
                setns(&handle, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering network namespace {ns}"))?;
                Ok(f())
            })
            .context("spawning a thread")?;
        worker.join().map_err(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".to_owned());
            anyhow!("thread in network namespace {ns} panicked: {msg}")
        })?
    })
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured), killing it if it has not
/// finished after `timeout`.
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {shown}"))?;
    let out_pipe = child.stdout.take().context("no stdout pipe")?;
    let err_pipe = child.stderr.take().context("no stderr pipe")?;
    // Readers on their own threads so a chatty command never blocks on a full pipe.
    let (out_tx, out_rx) = mpsc::channel();
    let (err_tx, err_rx) = mpsc::channel();
    for (mut pipe, tx) in [
        (Box::new(out_pipe) as Box<dyn Read + Send>, out_tx),
        (Box::new(err_pipe), err_tx),
    ] {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {shown}"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {timeout:?} and was killed");
        }
        thread::sleep(Duration::from_millis(5));
    };
    // A grandchild that inherited the pipes could keep them open: wait a little, not forever.
    let stdout = out_rx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    let stderr = err_rx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `ip <args>` and fails with its stderr unless it exits 0.
fn ip(args: &[&str]) -> Result<()> {
    let out = output_timeout(Command::new("ip").args(args), CMD_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Turns tx checksum offload off (a local socket on a veth otherwise sends partial checksums,
/// which an XDP program sees and would forward broken) and GRO on (frames XDP-redirected into a
/// veth are dropped unless the receiving peer has GRO or an XDP program).
fn ethtool_lab_offloads(ns: &str, ifname: &str) -> Result<()> {
    let args = [
        "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off", "gro", "on",
    ];
    let out = output_timeout(Command::new("ip").args(args), CMD_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "`ip {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Waits until every interface in `ns` is up and running (IFF_RUNNING, operstate up).
fn wait_links_running(ns: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let not_running = in_netns(ns, || -> Result<Vec<String>> {
            let mut down = Vec::new();
            for ifa in nix::ifaddrs::getifaddrs().context("listing interfaces")? {
                if !ifa.flags.contains(InterfaceFlags::IFF_RUNNING)
                    && !down.contains(&ifa.interface_name)
                {
                    down.push(ifa.interface_name);
                }
            }
            Ok(down)
        })??;
        if not_running.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "interfaces {not_running:?} in {ns} not running after {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Removes what labs of dead processes left behind (their process was killed before `Drop`
/// ran): any process still inside their namespaces (an orphaned `lb`), the namespaces and
/// their `/run/lb-lab` directories. Labs of live processes are never touched.
fn sweep_stale() {
    let owner_dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix("lb") else {
            return false;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(n)) = (parts.next(), parts.next()) else {
            return false;
        };
        if pid.is_empty()
            || n.is_empty()
            || !pid.bytes().chain(n.bytes()).all(|b| b.is_ascii_digit())
        {
            return false;
        }
        !Path::new("/proc").join(pid).exists()
    };
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !owner_dead(&name) {
                continue;
            }
            if let Ok(out) = output_timeout(
                Command::new("ip").args(["netns", "pids", &name]),
                CMD_TIMEOUT,
            ) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
            match ip(&["netns", "del", &name]) {
                Ok(()) => eprintln!("lab: removed stale namespace {name}"),
                Err(e) => eprintln!("lab: removing stale namespace {name}: {e:#}"),
            }
        }
    }
    if let Ok(entries) = fs::read_dir(LAB_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_dead(&name) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn serve_http(listener: TcpListener, body: &str, stop: &AtomicBool, counters: &Arc<Counters>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (body, counters) = (body.to_owned(), counters.clone());
                // One short-lived thread per connection, so a silent client (bounded by
                // SERVER_IO_TIMEOUT) never blocks the others or the health checks.
                let spawned = thread::Builder::new()
                    .name("lab-http-conn".to_owned())
                    .spawn(move || {
                        let _ = handle_http(stream, &body, &counters);
                    });
                if let Err(e) = spawned {
                    eprintln!("lab: spawning an HTTP connection thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(SERVER_POLL),
            Err(e) => {
                eprintln!("lab: accept: {e}");
                thread::sleep(SERVER_POLL);
            }
        }
    }
}

/// Reads one request head and answers `200 OK` with `body` (HTTP/1.0 and 1.1, then closes).
fn handle_http(mut stream: TcpStream, body: &str, counters: &Counters) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut request_line = head.lines().next().unwrap_or_default().split_whitespace();
    let (_method, path, version) = (
        request_line.next(),
        request_line.next(),
        request_line.next(),
    );
    let version = match version {
        Some("HTTP/1.0") => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    if path == Some("/healthz") {
        counters.healthz.fetch_add(1, Ordering::Relaxed);
    } else {
        counters.http.fetch_add(1, Ordering::Relaxed);
    }
    let response = format!(
        "{version} 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

fn serve_udp(socket: UdpSocket, body: &str, stop: &AtomicBool, counters: &Counters) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, from)) => {
                counters.udp.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = socket.send_to(body.as_bytes(), from) {
                    eprintln!("lab: UDP reply to {from}: {e}");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                eprintln!("lab: UDP receive: {e}");
                thread::sleep(SERVER_POLL);
            }
        }
    }
}

/// Time left until `deadline`, or an error once it has passed.
fn remaining(deadline: Instant, what: &str) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    ensure!(!left.is_zero(), "timed out {what}");
    Ok(left)
}

fn http_get_here(client: Ipv4Addr, target: SocketAddrV4, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .context("creating a TCP socket")?;
    socket
        .bind(&SocketAddr::from((client, 0)).into())
        .with_context(|| format!("binding to {client}"))?;
    socket
        .connect_timeout(&SocketAddr::V4(target).into(), timeout)
        .context("connecting")?;
    let mut stream: TcpStream = socket.into();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-lab\r\nConnection: close\r\n\r\n",
        target.ip()
    );
    stream.set_write_timeout(Some(remaining(deadline, "before sending the request")?))?;
    stream
        .write_all(request.as_bytes())
        .context("sending the request")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(remaining(
            deadline,
            &format!("reading the response ({} bytes so far)", response.len()),
        )?))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                ensure!(response.len() <= 1 << 20, "response larger than 1 MiB");
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(anyhow!(e).context(format!(
                    "reading the response ({} bytes so far)",
                    response.len()
                )));
            }
        }
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed response {text:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "answer was {status:?}, not 200"
    );
    Ok(body.to_owned())
}

fn udp_query_here(
    client: Ipv4Addr,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<(String, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let socket = UdpSocket::bind((client, 0)).with_context(|| format!("binding to {client}"))?;
    socket
        .send_to(b"query\n", target)
        .context("sending the query")?;
    let mut buf = [0u8; 2048];
    loop {
        socket.set_read_timeout(Some(remaining(deadline, "waiting for the reply")?))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => return Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!("no reply within {timeout:?}")
            }
            Err(e) => return Err(anyhow!(e).context("waiting for the reply")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(3);

    fn netns_exists(name: &str) -> bool {
        Path::new(NETNS_DIR).join(name).exists()
    }

    #[test]
    fn config_names_every_backend_and_interface() {
        // Pure rendering; no kernel needed.
        let spec = LabSpec {
            clients: 2,
            backends: 3,
        };
        let cfg = spec.config_toml(&spec.interfaces(), Path::new("/run/lb-lab/x/lb.sock"));
        assert!(
            cfg.contains(r#"interfaces = ["eth0", "eth1", "eth2", "eth3"]"#),
            "{cfg}"
        );
        assert!(cfg.contains(r#"socket = "/run/lb-lab/x/lb.sock""#), "{cfg}");
        assert_eq!(cfg.matches("[[services]]").count(), 2, "{cfg}");
        assert_eq!(cfg.matches("[[services.backends]]").count(), 6, "{cfg}");
        assert!(
            cfg.contains("address = \"10.200.13.2\"\nport = 5353"),
            "{cfg}"
        );
        assert_eq!(backend_addr(2), Ipv4Addr::new(10, 200, 12, 2));
        assert_eq!(toml_str("a\"b\\c"), r#""a\"b\\c""#);
    }

    /// Without lb: every client address reaches every backend's own address by kernel
    /// forwarding through the balancer namespace, and the VIP fails fast (no route).
    #[test]
    fn lab_routes_directly() {
        if !is_root() {
            eprintln!("skipping lab_routes_directly: needs root");
            return;
        }
        let lab = Lab::create(LabSpec {
            clients: 3,
            backends: 3,
        })
        .expect("creating the lab");
        for client in lab.client_addrs() {
            for i in 1..=3 {
                let addr = lab.backend_addr(i);
                let body = lab
                    .http_get(client, SocketAddrV4::new(addr, BACKEND_HTTP_PORT), T)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                assert_eq!(body, format!("backend-{i}\n"));
                let (body, from) = lab
                    .udp_query(client, SocketAddrV4::new(addr, BACKEND_UDP_PORT), T)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                assert_eq!(body, format!("backend-{i}\n"));
                assert_eq!(from, SocketAddr::from((addr, BACKEND_UDP_PORT)));
            }
        }
        for i in 1..=3 {
            let stats = lab.backend_stats(i);
            assert_eq!(
                (stats.http, stats.udp, stats.healthz),
                (3, 3, 0),
                "backend {i}"
            );
        }
        let started = Instant::now();
        let vip = SocketAddrV4::new(VIP, VIP_HTTP_PORT);
        let err = lab
            .http_get(lab.client_addrs()[0], vip, T)
            .expect_err("the VIP must be unreachable without lb");
        assert!(started.elapsed() < T + Duration::from_secs(1), "{err:#}");
        assert!(
            fs::read_to_string(lab.config_path())
                .unwrap()
                .contains("[datapath]")
        );
    }

    #[test]
    fn lab_is_removed_on_drop_and_on_panic() {
        if !is_root() {
            eprintln!("skipping lab_is_removed_on_drop_and_on_panic: needs root");
            return;
        }
        let lab = Lab::create(LabSpec {
            clients: 1,
            backends: 2,
        })
        .expect("creating the lab");
        let names = lab.namespaces.clone();
        let dir = lab.dir.clone();
        assert_eq!(names.len(), 4);
        assert!(names.iter().all(|n| netns_exists(n)) && dir.is_dir());
        drop(lab);
        assert!(
            !names.iter().any(|n| netns_exists(n)),
            "{names:?} left behind"
        );
        assert!(!dir.exists());

        let result = std::panic::catch_unwind(|| {
            let lab = Lab::create(LabSpec {
                clients: 1,
                backends: 1,
            })
            .expect("creating the lab");
            let names = lab.namespaces.clone();
            std::panic::panic_any(names)
        });
        let names = result
            .expect_err("the closure panics")
            .downcast::<Vec<String>>()
            .expect("panic payload is the namespace list");
        assert_eq!(names.len(), 3);
        assert!(
            !names.iter().any(|n| netns_exists(n)),
            "{names:?} left behind"
        );
    }

    #[test]
    fn in_netns_turns_errors_and_panics_into_errors() {
        let err = in_netns("lb-no-such-namespace", || ()).unwrap_err();
        assert!(
            format!("{err:#}").contains("lb-no-such-namespace"),
            "{err:#}"
        );
        if !is_root() {
            return;
        }
        let lab = Lab::create(LabSpec {
            clients: 1,
            backends: 1,
        })
        .expect("creating the lab");
        let err = in_netns(lab.ns_client(), || panic!("boom")).unwrap_err();
        assert!(format!("{err:#}").contains("boom"), "{err:#}");
    }

    #[test]
    fn output_timeout_kills_slow_commands() {
        let started = Instant::now();
        let err = output_timeout(Command::new("sleep").arg("10"), Duration::from_millis(200))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{err:#}");
        let out = output_timeout(Command::new("echo").arg("hi"), CMD_TIMEOUT).unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }
}
