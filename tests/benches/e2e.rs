//! End-to-end benchmark: short-connection HTTP load through `lb` against a direct backend,
//! HAProxy and nginx, in one namespace lab (see `xtask::lab`).
//!
//! `cargo bench -p tests --bench e2e` (as root). Four cases, measured in the same topology and
//! the same run, interleaved round by round (`direct`, `lb`, `haproxy`, `nginx`, then again), so
//! drift of the machine spreads over all of them:
//!
//! - `direct`: backend 1 at its own address (port [`PLAIN_PORT`]), forwarded by the balancer
//!   namespace's kernel;
//! - `lb`: the VIP through `lb` (NAT mode, affinity by client address, the lab's config);
//! - `haproxy`: HAProxy in the balancer namespace, `mode tcp`, `balance source`,
//!   `hash-type consistent`, on 10.200.1.1:[`HAPROXY_PORT`];
//! - `nginx`: nginx's `stream` module in the balancer namespace, `hash $remote_addr consistent`,
//!   on 10.200.1.1:[`NGINX_PORT`].
//!
//! The backends are real nginx servers (one per backend namespace, `worker_processes 1`,
//! `return 200 "backend-<i>\n"`, own config/pid/log files in a temp dir); the lab's in-process
//! servers are stopped. Each backend listens on :8080 (lb's service port, also its health
//! checks) and :[`PLAIN_PORT`]: `direct`, HAProxy and nginx use the latter, because `lb`
//! rewrites every reply from a configured backend endpoint (address, :8080) back to the VIP
//! unless it is addressed to the balancer itself, which would break a direct connection while
//! lb runs. lb stays running (XDP attached) through all cases, so every case crosses the same
//! veths with the same XDP program on them.
//!
//! Load: `wrk --latency -H "Connection: close"` in the client namespace. wrk then opens a new TCP
//! connection for every request (checked: the client namespace's `Tcp: ActiveOpens` grows by
//! about one per request, shown as `conn/req`). wrk binds no source address, so a tiny
//! `LD_PRELOAD` shim (`e2e/bind-shim.c`, compiled with `cc` at start) binds every new IPv4
//! socket before `connect` to the next of the lab's client addresses (10.200.1.10.., round
//! robin, with `IP_BIND_ADDRESS_NO_PORT`), so the load comes from many clients as affinity sees
//! them. Without `cc` the bench falls back to the namespace's one default source (10.200.1.2)
//! and says so.
//! wrk's latency is from the request's first byte to the full response (the TCP handshake is not
//! in it); `p99` is wrk's `--latency` 99th percentile.
//!
//! Knobs (environment): `LB_BENCH_QUICK=1` (5 s per run, 3 repetitions; default 10 s, 7),
//! `LB_BENCH_REPS`, `LB_BENCH_SECS`, `LB_BENCH_CONNECTIONS` (wrk `-c`, default 64),
//! `LB_BENCH_THREADS` (wrk `-t`, default 2), `LB_BENCH_CLIENTS` (source addresses, default 16),
//! `LB_BIN` (else `<workspace>/target/release/lb`; build it first with
//! `cargo build --release -p lb-userspace --bin lb`).
//!
//! The tools (`wrk`, `haproxy`, `nginx`, `libnginx-mod-stream`) come from `cargo xtask setup`
//! (also run by `cargo xtask bench`); the bench fails naming it when one is missing.
//! Results: medians of the repetitions, printed as a table with the ratios against the targets
//! (lb >= 0.9 x direct, above HAProxy and nginx, p99 no worse than theirs) and written to
//! `<target>/bench/e2e.json`. Nothing is asserted about the figures. Every process the bench
//! starts is in its own process group, killed when its guard drops (also on panic), and gets
//! SIGTERM if the bench dies; the lab removes its namespaces when dropped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use xtask::lab::{self, BACKEND_HTTP_PORT, CLIENT_PROBE_ADDR, Lab, LabSpec, VIP, VIP_HTTP_PORT};

/// Second port of every backend nginx: same server, but no endpoint of lb's config.
const PLAIN_PORT: u16 = 8081;
/// Port of every backend nginx's `stub_status` (per-backend connection counts).
const STATUS_PORT: u16 = 8082;
/// The balancer namespace's client-side address (the clients' default router).
const BALANCER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
const HAPROXY_PORT: u16 = 80;
const NGINX_PORT: u16 = 81;
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
const NETNS_DIR: &str = "/run/netns";
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Until lb's health checks have brought the backends up and every client reaches the VIP.
const LB_READY_TIMEOUT: Duration = Duration::from_secs(30);
const WARMUP_SECS: u64 = 2;

/// Binds each new IPv4 socket to the next address of `$LB_BENCH_SOURCES` before `connect`
/// (the `LD_PRELOAD` shim's source, `e2e/bind-shim.c`).
const SHIM_C: &str = include_str!("e2e/bind-shim.c");

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Direct,
    Lb,
    Haproxy,
    Nginx,
}

const CASES: [Case; 4] = [Case::Direct, Case::Lb, Case::Haproxy, Case::Nginx];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Direct => "direct",
            Case::Lb => "lb",
            Case::Haproxy => "haproxy",
            Case::Nginx => "nginx",
        }
    }

    fn target(self) -> SocketAddrV4 {
        match self {
            Case::Direct => SocketAddrV4::new(lab::backend_addr(1), PLAIN_PORT),
            Case::Lb => SocketAddrV4::new(VIP, VIP_HTTP_PORT),
            Case::Haproxy => SocketAddrV4::new(BALANCER_ADDR, HAPROXY_PORT),
            Case::Nginx => SocketAddrV4::new(BALANCER_ADDR, NGINX_PORT),
        }
    }
}

struct Settings {
    quick: bool,
    secs: u64,
    reps: usize,
    threads: u32,
    connections: u32,
    clients: u32,
    backends: u32,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid number")),
        _ => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let quick = std::env::var("LB_BENCH_QUICK")
            .is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        let s = Settings {
            quick,
            secs: env_num("LB_BENCH_SECS", if quick { 5 } else { 10 })?,
            reps: env_num("LB_BENCH_REPS", if quick { 3 } else { 7 })?,
            threads: env_num("LB_BENCH_THREADS", 2)?,
            connections: env_num("LB_BENCH_CONNECTIONS", 64)?,
            clients: env_num("LB_BENCH_CLIENTS", 16)?,
            backends: 3,
        };
        ensure!(s.secs >= 1, "LB_BENCH_SECS must be at least 1");
        ensure!(s.reps >= 1, "LB_BENCH_REPS must be at least 1");
        ensure!(s.threads >= 1, "LB_BENCH_THREADS must be at least 1");
        ensure!(
            s.connections >= s.threads,
            "LB_BENCH_CONNECTIONS must be at least LB_BENCH_THREADS"
        );
        ensure!(
            (1..=200).contains(&s.clients),
            "LB_BENCH_CLIENTS must be 1..=200"
        );
        Ok(s)
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` (or `--all-targets`) runs this
    // binary without it: only check that it builds then.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("e2e bench: not run without --bench (use `cargo bench -p tests --bench e2e`)");
        return;
    }
    if let Err(e) = run() {
        eprintln!("e2e bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_dir().join(d)
            }
        }
        _ => workspace_dir().join("target"),
    }
}

fn lb_bin() -> Result<PathBuf> {
    let bin = std::env::var_os("LB_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target/release/lb"));
    ensure!(
        bin.is_file(),
        "lb binary {} not found: build it with `cargo build --release -p lb-userspace --bin lb` \
         or point LB_BIN at it",
        bin.display()
    );
    Ok(bin)
}

fn run() -> Result<()> {
    ensure!(
        lab::is_root(),
        "the e2e bench needs root (network namespaces, veth, XDP)"
    );
    let settings = Settings::from_env()?;
    let lb_bin = lb_bin()?;
    check_tools()?;
    let work = WorkDir::new()?;
    let shim = match build_shim(&work.path) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!(
                "note: no source-address shim ({e:#}); wrk runs from the client namespace's one \
                 default source address"
            );
            None
        }
    };
    print_versions();

    // Drop order (reverse of declaration): wrk is done, then proxies, backends, and the lab
    // (lb, namespaces) last.
    let mut lab = Lab::create(LabSpec {
        clients: settings.clients,
        backends: settings.backends,
    })
    .context("creating the lab")?;
    tune_sysctls(&lab, settings.backends)?;
    for i in 1..=settings.backends {
        lab.stop_backend(i)?;
    }
    let mut backends = Vec::new();
    for i in 1..=settings.backends {
        backends.push(start_backend_nginx(&lab, &work.path, i)?);
    }
    lab.start_lb(&lb_bin).context("starting lb")?;
    let haproxy = start_haproxy(&lab, &work.path, settings.backends)?;
    let nginx = start_stream_nginx(&lab, &work.path, settings.backends)?;
    wait_lb_ready(&lab)?;
    for case in CASES {
        let body = lab
            .http_get(CLIENT_PROBE_ADDR, case.target(), PROBE_TIMEOUT)
            .with_context(|| format!("probing the {} case", case.name()))?;
        ensure!(
            body.starts_with("backend-"),
            "{}: unexpected answer {body:?}",
            case.name()
        );
    }

    let sources: Vec<Ipv4Addr> = if shim.is_some() {
        lab.client_addrs()
    } else {
        vec![CLIENT_PROBE_ADDR]
    };
    eprintln!(
        "e2e bench: wrk -t{} -c{} -d{}s --latency -H 'Connection: close', {} source address(es) \
         ({}), {} nginx backends, {} repetition(s) per case{}",
        settings.threads,
        settings.connections,
        settings.secs,
        sources.len(),
        if shim.is_some() {
            "LD_PRELOAD bind shim, round robin per connection"
        } else {
            "the client namespace's default source"
        },
        settings.backends,
        settings.reps,
        if settings.quick { " (quick)" } else { "" }
    );

    let wrk = Wrk {
        ns: lab.ns_client().to_owned(),
        shim: shim.clone(),
        sources: sources.clone(),
        work: work.path.clone(),
        threads: settings.threads,
        connections: settings.connections,
    };
    for case in CASES {
        wrk.run(case.target(), WARMUP_SECS)
            .with_context(|| format!("warm-up of the {} case", case.name()))?;
    }
    let mut results: BTreeMap<Case, Vec<Sample>> = BTreeMap::new();
    for rep in 1..=settings.reps {
        for case in CASES {
            let before_opens = active_opens(&lab)?;
            let before_accepts = backend_accepts(&lab, settings.backends)?;
            let mut sample = wrk
                .run(case.target(), settings.secs)
                .with_context(|| format!("{} case, repetition {rep}", case.name()))?;
            let after_accepts = backend_accepts(&lab, settings.backends)?;
            let opens = active_opens(&lab)?.saturating_sub(before_opens);
            sample.conns_per_request = opens as f64 / sample.requests.max(1) as f64;
            sample.backend_accepts = after_accepts
                .iter()
                .zip(&before_accepts)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect();
            eprintln!(
                "  rep {rep}/{} {:8} {:>10.1} req/s  p99 {:>8.3} ms  conn/req {:.3}  errors {}  \
                 sources used {}",
                settings.reps,
                case.name(),
                sample.rps,
                sample.p99_ms,
                sample.conns_per_request,
                sample.errors,
                sample.sources_used,
            );
            results.entry(case).or_default().push(sample);
        }
    }
    if lab.lb_exit_status()?.is_some() {
        bail!("lb exited during the bench:\n{}", lab.lb_log_tail(30));
    }
    drop(nginx);
    drop(haproxy);
    drop(backends);
    drop(lab);

    let summary = Summary::new(&results);
    print!(
        "{}",
        summary.table(&settings, sources.len(), shim.is_some())
    );
    let json = summary.json();
    let dir = target_dir().join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("e2e.json");
    fs::write(&file, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    println!("wrote {}", file.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tools

/// Fails, naming `cargo xtask setup`, unless wrk, haproxy, nginx and its stream module are
/// installed (the bench installs nothing itself).
fn check_tools() -> Result<()> {
    let mut missing = Vec::new();
    for bin in ["wrk", "haproxy", "nginx"] {
        if !on_path(bin) {
            missing.push(bin.to_owned());
        }
    }
    if !Path::new(NGINX_STREAM_MODULE).is_file() {
        missing.push(format!("nginx's stream module ({NGINX_STREAM_MODULE})"));
    }
    ensure!(
        missing.is_empty(),
        "the e2e bench needs {} (missing): run `cargo xtask setup` as root, which installs \
         them (Debian packages wrk, haproxy, nginx-light, libnginx-mod-stream)",
        missing.join(", ")
    );
    Ok(())
}

fn on_path(bin: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(bin).is_file())
}

fn print_versions() {
    let first_line = |cmd: &str, args: &[&str]| -> String {
        Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|e| format!("{cmd}: {e}"))
    };
    eprintln!(
        "e2e bench: {} | {} | {}",
        first_line("wrk", &["-v"]),
        first_line("haproxy", &["-v"]),
        first_line("nginx", &["-v"])
    );
}

/// Compiles [`SHIM_C`] into `dir/bind-shim.so`.
fn build_shim(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("bind-shim.c");
    let so = dir.join("bind-shim.so");
    fs::write(&src, SHIM_C).context("writing the shim source")?;
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .stdin(Stdio::null())
        .output()
        .context("running cc")?;
    ensure!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(so)
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A temp directory for configs, logs and pid files, removed on drop.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn new() -> Result<WorkDir> {
        // Left by a bench that was killed: remove those whose process is gone.
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name
                    .strip_prefix("lb-e2e-bench-")
                    .and_then(|p| p.parse::<u32>().ok())
                    && !Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let path = std::env::temp_dir().join(format!("lb-e2e-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A server process in its own process group: on drop the group gets SIGTERM, then SIGKILL
/// after 5 s. It also gets SIGTERM if the bench process dies first (PR_SET_PDEATHSIG).
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` (from the calling thread, which must outlive it: the main thread) with
    /// stdout and stderr into `log`.
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `addr` accepts TCP connections from namespace `ns`, or fails with the log.
    fn wait_listening(&mut self, ns: &str, addr: SocketAddrV4, extra_log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited ({status}):\n{}{}",
                    self.name,
                    self.log_text(),
                    fs::read_to_string(extra_log).unwrap_or_default()
                );
            }
            let up = lab::in_netns(ns, || {
                TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} does not listen on {addr} after 10 s:\n{}{}",
                    self.name,
                    self.log_text(),
                    fs::read_to_string(extra_log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = Pid::from_raw(-(child.id() as i32));
        let _ = kill(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Also whatever of the group is left (nginx workers of a master that did not wait).
        let _ = kill(group, Signal::SIGKILL);
        let _ = child.wait();
    }
}

/// The process started by `cmd` gets SIGTERM when the thread that spawned it (the bench's main
/// thread) dies, e.g. when the bench is killed: nothing outlives the bench.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `nsenter --net=/run/netns/<ns> -- <program>`: only the network namespace changes (no
/// private mounts to leave behind); nsenter execs the program in place.
fn in_ns_command(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={NETNS_DIR}/{ns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// Common top of an nginx config rooted in `dir` (pid, error log, temp paths).
fn nginx_main_conf(dir: &Path, workers: &str) -> String {
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes {workers};\n\
         worker_rlimit_nofile 16384;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\n\
         events {{ worker_connections 8192; multi_accept on; }}\n",
        dir = dir.display()
    )
}

fn nginx_command(ns: &str, dir: &Path, conf: &Path) -> Command {
    let mut cmd = in_ns_command(ns, "nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(conf);
    cmd
}

/// Backend `i`'s nginx: `return 200 "backend-<i>\n"` on :8080 and :8081, `stub_status` on :8082.
fn start_backend_nginx(lab: &Lab, work: &Path, i: u32) -> Result<Proc> {
    let dir = work.join(format!("backend-{i}"));
    fs::create_dir_all(&dir)?;
    let addr = lab.backend_addr(i);
    let mut conf = nginx_main_conf(&dir, "1");
    let _ = write!(
        conf,
        "http {{\n\
         \x20 access_log off;\n\
         \x20 default_type text/plain;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 server {{\n\
         \x20   listen {addr}:{BACKEND_HTTP_PORT} backlog=4096;\n\
         \x20   listen {addr}:{PLAIN_PORT} backlog=4096;\n\
         \x20   location / {{ return 200 \"backend-{i}\\n\"; }}\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen {addr}:{STATUS_PORT};\n\
         \x20   location / {{ stub_status; }}\n\
         \x20 }}\n\
         }}\n",
        d = dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let ns = lab.ns_backend(i);
    let mut p = Proc::spawn(
        &format!("nginx backend-{i}"),
        nginx_command(&ns, &dir, &conf_path),
        &dir.join("stdout.log"),
    )?;
    for port in [BACKEND_HTTP_PORT, PLAIN_PORT, STATUS_PORT] {
        p.wait_listening(&ns, SocketAddrV4::new(addr, port), &dir.join("error.log"))?;
    }
    Ok(p)
}

fn start_haproxy(lab: &Lab, work: &Path, backends: u32) -> Result<Proc> {
    let dir = work.join("haproxy");
    fs::create_dir_all(&dir)?;
    let mut conf = String::from(
        "global\n\
         \x20 maxconn 8192\n\
         defaults\n\
         \x20 mode tcp\n\
         \x20 timeout connect 5s\n\
         \x20 timeout client 30s\n\
         \x20 timeout server 30s\n",
    );
    let _ = write!(
        conf,
        "frontend fe\n\
         \x20 bind {BALANCER_ADDR}:{HAPROXY_PORT}\n\
         \x20 default_backend be\n\
         backend be\n\
         \x20 balance source\n\
         \x20 hash-type consistent\n"
    );
    for i in 1..=backends {
        let _ = writeln!(conf, "  server b{i} {}:{PLAIN_PORT}", lab.backend_addr(i));
    }
    let conf_path = dir.join("haproxy.cfg");
    fs::write(&conf_path, conf)?;
    let mut cmd = in_ns_command(lab.ns_lb(), "haproxy");
    // -db: stay in the foreground, no daemon.
    cmd.arg("-db").arg("-f").arg(&conf_path);
    let mut p = Proc::spawn("haproxy", cmd, &dir.join("haproxy.log"))?;
    p.wait_listening(
        lab.ns_lb(),
        SocketAddrV4::new(BALANCER_ADDR, HAPROXY_PORT),
        Path::new("/dev/null"),
    )?;
    Ok(p)
}

fn start_stream_nginx(lab: &Lab, work: &Path, backends: u32) -> Result<Proc> {
    let dir = work.join("nginx-stream");
    fs::create_dir_all(&dir)?;
    let mut conf = format!("load_module {NGINX_STREAM_MODULE};\n");
    // As many workers as CPUs, like HAProxy's default of one thread per CPU.
    conf.push_str(&nginx_main_conf(&dir, "auto"));
    conf.push_str("stream {\n  upstream be {\n    hash $remote_addr consistent;\n");
    for i in 1..=backends {
        let _ = writeln!(conf, "    server {}:{PLAIN_PORT};", lab.backend_addr(i));
    }
    let _ = write!(
        conf,
        "  }}\n  server {{\n    listen {BALANCER_ADDR}:{NGINX_PORT} backlog=4096;\n    \
         proxy_pass be;\n  }}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let mut p = Proc::spawn(
        "nginx stream",
        nginx_command(lab.ns_lb(), &dir, &conf_path),
        &dir.join("stdout.log"),
    )?;
    p.wait_listening(
        lab.ns_lb(),
        SocketAddrV4::new(BALANCER_ADDR, NGINX_PORT),
        &dir.join("error.log"),
    )?;
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// Lab helpers

/// The same per-namespace TCP settings for every case: the whole ephemeral port range and
/// TIME_WAIT reuse for outgoing connections (the client's, and the proxies' to the backends).
fn tune_sysctls(lab: &Lab, backends: u32) -> Result<()> {
    let mut namespaces = vec![lab.ns_client().to_owned(), lab.ns_lb().to_owned()];
    namespaces.extend((1..=backends).map(|i| lab.ns_backend(i)));
    for ns in namespaces {
        lab::in_netns(&ns, || -> Result<()> {
            for (key, value) in [
                ("net/ipv4/ip_local_port_range", "1024 65535"),
                ("net/ipv4/tcp_tw_reuse", "1"),
            ] {
                let path = Path::new("/proc/sys").join(key);
                fs::write(&path, value)
                    .with_context(|| format!("writing {value:?} to {}", path.display()))?;
            }
            Ok(())
        })?
        .with_context(|| format!("setting sysctls in {ns}"))?;
    }
    Ok(())
}

/// Waits until every client address gets an answer through the VIP (lb's health checks have
/// brought the backends up).
fn wait_lb_ready(lab: &Lab) -> Result<()> {
    let deadline = Instant::now() + LB_READY_TIMEOUT;
    let target = Case::Lb.target();
    let mut pending = lab.client_addrs();
    pending.push(CLIENT_PROBE_ADDR);
    loop {
        let mut last_err = None;
        pending.retain(|&c| match lab.http_get(c, target, PROBE_TIMEOUT) {
            Ok(_) => false,
            Err(e) => {
                last_err = Some(e);
                true
            }
        });
        let Some(err) = last_err else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            bail!(
                "the VIP does not answer {} client(s) after {LB_READY_TIMEOUT:?}: {err:#}\n\
                 --- lb log ---\n{}",
                pending.len(),
                lab.lb_log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `Tcp: ActiveOpens` of the client namespace (connections it has opened).
fn active_opens(lab: &Lab) -> Result<u64> {
    let text = lab::in_netns(lab.ns_client(), || {
        fs::read_to_string("/proc/thread-self/net/snmp")
    })?
    .context("reading /proc/net/snmp in the client namespace")?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Tcp lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ActiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .context("no ActiveOpens in /proc/net/snmp")
}

/// Connections every backend nginx has accepted so far (its `stub_status`).
fn backend_accepts(lab: &Lab, backends: u32) -> Result<Vec<u64>> {
    (1..=backends)
        .map(|i| {
            let target = SocketAddrV4::new(lab.backend_addr(i), STATUS_PORT);
            let body = lab.http_get(CLIENT_PROBE_ADDR, target, PROBE_TIMEOUT)?;
            // "Active connections: 1 \nserver accepts handled requests\n 10 10 10 \n..."
            body.lines()
                .nth(2)
                .and_then(|l| l.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("backend-{i} stub_status: {body:?}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// wrk

struct Wrk {
    ns: String,
    shim: Option<PathBuf>,
    sources: Vec<Ipv4Addr>,
    work: PathBuf,
    threads: u32,
    connections: u32,
}

#[derive(Debug, Clone, Default)]
struct Sample {
    rps: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
    conns_per_request: f64,
    /// Source addresses the shim bound at least one connection to.
    sources_used: usize,
    /// Connections each backend accepted during the run.
    backend_accepts: Vec<u64>,
}

impl Wrk {
    fn run(&self, target: SocketAddrV4, secs: u64) -> Result<Sample> {
        let url = format!("http://{target}/");
        let report = self.work.join("shim-report.txt");
        let _ = fs::remove_file(&report);
        let mut cmd = in_ns_command(&self.ns, "wrk");
        cmd.arg("-t")
            .arg(self.threads.to_string())
            .arg("-c")
            .arg(self.connections.to_string())
            .arg("-d")
            .arg(format!("{secs}s"))
            .arg("--timeout")
            .arg("2s")
            .arg("--latency")
            .arg("-H")
            .arg("Connection: close")
            .arg(&url);
        die_with_parent(&mut cmd);
        if let Some(shim) = &self.shim {
            let list: Vec<String> = self.sources.iter().map(Ipv4Addr::to_string).collect();
            cmd.env("LD_PRELOAD", shim)
                .env("LB_BENCH_SOURCES", list.join(","))
                .env("LB_BENCH_SHIM_REPORT", &report);
        }
        let out = lab::output_timeout(&mut cmd, Duration::from_secs(secs + 30))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "wrk {url} failed ({}):\n{stdout}{stderr}",
            out.status
        );
        let mut sample = parse_wrk(&stdout)
            .with_context(|| format!("parsing wrk's output:\n{stdout}{stderr}"))?;
        if self.shim.is_some() {
            let text = fs::read_to_string(&report).unwrap_or_default();
            let mut failed = 0;
            for line in text.lines() {
                let mut it = line.split_whitespace();
                match (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) {
                    (Some("failed"), Some(n)) => failed = n,
                    (Some(_), Some(n)) if n > 0 => sample.sources_used += 1,
                    _ => {}
                }
            }
            ensure!(
                !text.is_empty(),
                "the source-address shim wrote no report: was it loaded?"
            );
            if failed > 0 {
                eprintln!("note: the shim could not bind {failed} socket(s)");
            }
        } else {
            sample.sources_used = 1;
        }
        Ok(sample)
    }
}

/// A wrk duration (`812.00us`, `1.71ms`, `1.02s`, `2.00m`) in milliseconds.
fn parse_duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(v * factor)
}

fn parse_wrk(out: &str) -> Result<Sample> {
    let mut sample = Sample::default();
    let (mut rps, mut p99, mut requests) = (None, None, None);
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = parse_duration_ms(v.trim());
        } else if t.contains(" requests in ") {
            requests = t.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            sample.errors += v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            sample.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    sample.rps = rps.context("no Requests/sec line")?;
    sample.p99_ms = p99.context("no 99% latency line (--latency)")?;
    sample.requests = requests.context("no `N requests in` line")?;
    Ok(sample)
}

// ---------------------------------------------------------------------------------------------
// Summary

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

struct CaseSummary {
    rps: f64,
    p99_ms: f64,
    conns_per_request: f64,
    errors: u64,
    samples: Vec<f64>,
    /// Share of the connections each backend accepted, over all repetitions.
    backend_share: Vec<f64>,
}

struct Summary {
    cases: BTreeMap<Case, CaseSummary>,
}

impl Summary {
    fn new(results: &BTreeMap<Case, Vec<Sample>>) -> Summary {
        let cases = results
            .iter()
            .map(|(&case, samples)| {
                let mut rps: Vec<f64> = samples.iter().map(|s| s.rps).collect();
                let raw = rps.clone();
                let mut p99: Vec<f64> = samples.iter().map(|s| s.p99_ms).collect();
                let mut cpr: Vec<f64> = samples.iter().map(|s| s.conns_per_request).collect();
                let mut accepts =
                    vec![0u64; samples.first().map_or(0, |s| s.backend_accepts.len())];
                for s in samples {
                    for (a, b) in accepts.iter_mut().zip(&s.backend_accepts) {
                        *a += b;
                    }
                }
                let total = accepts.iter().sum::<u64>().max(1) as f64;
                (
                    case,
                    CaseSummary {
                        rps: median(&mut rps),
                        p99_ms: median(&mut p99),
                        conns_per_request: median(&mut cpr),
                        errors: samples.iter().map(|s| s.errors).sum(),
                        samples: raw,
                        backend_share: accepts.iter().map(|&a| a as f64 / total).collect(),
                    },
                )
            })
            .collect();
        Summary { cases }
    }

    fn get(&self, case: Case) -> (f64, f64) {
        self.cases
            .get(&case)
            .map_or((f64::NAN, f64::NAN), |c| (c.rps, c.p99_ms))
    }

    fn json(&self) -> serde_json::Value {
        let round = |v: f64, digits: i32| {
            let f = 10f64.powi(digits);
            (v * f).round() / f
        };
        let mut e2e = serde_json::Map::new();
        for case in CASES {
            let (rps, _) = self.get(case);
            e2e.insert(format!("{}_rps", case.name()), round(rps, 1).into());
        }
        for case in CASES {
            let (_, p99) = self.get(case);
            e2e.insert(format!("{}_p99_ms", case.name()), round(p99, 3).into());
        }
        serde_json::json!({ "e2e": e2e })
    }

    fn table(&self, settings: &Settings, sources: usize, shim: bool) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\ne2e: short connections (wrk -t{} -c{} -d{}s, Connection: close), {} source \
             address(es){}, {} nginx backends; median of {} repetition(s)",
            settings.threads,
            settings.connections,
            settings.secs,
            sources,
            if shim { "" } else { " (no shim: one source)" },
            settings.backends,
            settings.reps
        );
        let _ = writeln!(
            s,
            "{:<8} {:>11} {:>9} {:>9} {:>7}  {:<22} per-run req/s",
            "case", "req/s", "p99 ms", "conn/req", "errors", "backend share"
        );
        for case in CASES {
            let Some(c) = self.cases.get(&case) else {
                continue;
            };
            let share: Vec<String> = c
                .backend_share
                .iter()
                .map(|v| format!("{:.0}%", v * 100.0))
                .collect();
            let runs: Vec<String> = c.samples.iter().map(|v| format!("{v:.0}")).collect();
            let _ = writeln!(
                s,
                "{:<8} {:>11.1} {:>9.3} {:>9.3} {:>7}  {:<22} {}",
                case.name(),
                c.rps,
                c.p99_ms,
                c.conns_per_request,
                c.errors,
                share.join("/"),
                runs.join(" ")
            );
        }
        let (direct, _) = self.get(Case::Direct);
        let (lb, lb_p99) = self.get(Case::Lb);
        let (haproxy, haproxy_p99) = self.get(Case::Haproxy);
        let (nginx, nginx_p99) = self.get(Case::Nginx);
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        let _ = writeln!(s, "targets:");
        let _ = writeln!(
            s,
            "  lb req/s >= 0.9 x direct   lb/direct  = {:.3}  {}",
            lb / direct,
            verdict(lb >= 0.9 * direct)
        );
        let _ = writeln!(
            s,
            "  lb req/s >  haproxy        lb/haproxy = {:.3}  {}",
            lb / haproxy,
            verdict(lb > haproxy)
        );
        let _ = writeln!(
            s,
            "  lb req/s >  nginx          lb/nginx   = {:.3}  {}",
            lb / nginx,
            verdict(lb > nginx)
        );
        let _ = writeln!(
            s,
            "  lb p99 <= haproxy p99      {:.3} / {:.3} ms = {:.3}  {}",
            lb_p99,
            haproxy_p99,
            lb_p99 / haproxy_p99,
            verdict(lb_p99 <= haproxy_p99)
        );
        let _ = writeln!(
            s,
            "  lb p99 <= nginx p99        {:.3} / {:.3} ms = {:.3}  {}",
            lb_p99,
            nginx_p99,
            lb_p99 / nginx_p99,
            verdict(lb_p99 <= nginx_p99)
        );
        s
    }
}
