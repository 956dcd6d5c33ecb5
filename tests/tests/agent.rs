//! `lb agent` end to end, in a network namespace of its own: a preforking server (four Python
//! workers, each with its own SO_REUSEPORT socket on :8080, answering with its pid) and clients
//! from 40 loopback addresses. With the agent each client reaches one worker over many
//! connections; killing a worker moves only its clients; a worker that joins moves nobody who
//! is pinned; stopping the agent leaves the port working, spread by the kernel again. Run as
//! root by `cargo xtask test`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::lb_bin;
use xtask::lab::output_timeout;

const PORT: &str = "8080";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/agent").join(name)
}

/// The namespace and every process started in it, removed on drop (also when a test fails).
struct Ns {
    name: String,
    children: Vec<Child>,
}

impl Ns {
    fn new(tag: &str) -> Self {
        let name = format!("lbagt{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
        assert!(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]).status().unwrap().success());
        Self { name, children: Vec::new() }
    }

    fn spawn(&mut self, args: &[&str], log: Option<&Path>) -> u32 {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args).env("NO_COLOR", "1").stdin(Stdio::null());
        match log {
            Some(p) => {
                let f = std::fs::File::create(p).unwrap();
                cmd.stdout(f.try_clone().unwrap()).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
            }
        }
        let child = cmd.spawn().expect("spawning in the namespace");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Starts the server with `n` workers; returns their pids.
    fn server(&mut self, n: usize) -> Vec<u32> {
        self.server_of(n, "tcp")
    }

    /// `server` for a mode: tcp, tcp6, udp or udp6.
    fn server_of(&mut self, n: usize, mode: &str) -> Vec<u32> {
        self.spawn(&["python3", script("server.py").to_str().unwrap(), &n.to_string(), PORT, mode], None);
        let child = self.children.last_mut().unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut line = String::new();
        let mut buf = [0u8; 1];
        use std::io::Read as _;
        while !line.ends_with('\n') {
            if out.read(&mut buf).unwrap_or(0) == 0 {
                panic!("the server ended before printing its workers");
            }
            line.push(buf[0] as char);
        }
        line.split_whitespace().map(|p| p.parse().unwrap()).collect()
    }

    /// Connections from 127.0.0.2..=127.0.0.(1 + clients), `conns` each: which worker answered.
    fn clients(&self, clients: u32, conns: u32) -> BTreeMap<String, Vec<u32>> {
        self.clients_of(clients, conns, "tcp")
    }

    /// `clients` for a mode (IPv6 clients come from fd00::2.., see `v6_sources`).
    fn clients_of(&self, clients: u32, conns: u32, mode: &str) -> BTreeMap<String, Vec<u32>> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "python3", script("client.py").to_str().unwrap(), "2"])
            .arg((1 + clients).to_string())
            .arg(conns.to_string())
            .arg(PORT)
            .arg(mode);
        let out = output_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
        assert!(out.status.success(), "clients: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let mut f = l.split_whitespace();
                let src = f.next().unwrap().to_string();
                (src, f.map(|p| p.parse().unwrap()).collect())
            })
            .collect()
    }

    fn agent(&mut self, bin: &Path, log: &Path) -> u32 {
        let sock = self.socket();
        self.spawn(&[bin.to_str().unwrap(), "--socket", &sock, "agent", "--port", PORT], Some(log))
    }

    /// This namespace's agent control socket.
    fn socket(&self) -> String {
        std::env::temp_dir().join(format!("{}.sock", self.name)).to_string_lossy().into_owned()
    }

    fn status(&self, bin: &Path) -> lb::api::AgentStatus {
        let mut cmd = Command::new(bin);
        cmd.args(["--socket", &self.socket(), "agent", "status", "--output", "json"]);
        let out = output_timeout(&mut cmd, Duration::from_secs(15)).unwrap();
        assert!(out.status.success(), "lb agent status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("agent status JSON: {e}"))
    }

    /// fd00::2.. on lo, for IPv6 clients.
    fn v6_sources(&self, n: u32) {
        for i in 2..2 + n {
            let a = format!("fd00::{i:x}/128");
            assert!(Command::new("ip").args(["-n", &self.name, "-6", "addr", "add", &a, "dev", "lo", "nodad"]).status().unwrap().success());
        }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The workers are the server's children: end whatever is left in the namespace.
        let _ = Command::new("ip").args(["netns", "pids", &self.name]).output().map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn wait_log(log: &Path, what: &str) {
    let t = Instant::now();
    while !std::fs::read_to_string(log).unwrap_or_default().contains(what) {
        assert!(t.elapsed() < Duration::from_secs(15), "waited for {what:?} in the agent's log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sticky(seen: &BTreeMap<String, Vec<u32>>) -> Vec<&String> {
    seen.iter().filter(|(_, p)| p.iter().all(|x| *x == p[0])).map(|(c, _)| c).collect()
}

#[test]
fn each_client_stays_on_one_worker_process() {
    let bin = lb_bin();
    let mut ns = Ns::new("a");
    let workers = ns.server(4);
    assert_eq!(workers.len(), 4);
    // Without the agent the kernel spreads each client's connections over the workers.
    let before = ns.clients(40, 6);
    let stuck = sticky(&before).len();
    eprintln!("without the agent {stuck} of 40 clients stayed on one worker over 6 connections");
    assert!(stuck < 20, "the kernel's spread should move most clients: {before:?}");

    let log = std::env::temp_dir().join(format!("lb-agent-{}.log", std::process::id()));
    let agent = ns.agent(&bin, &log);
    wait_log(&log, "lb agent running");
    wait_log(&log, "slot=3");
    // 1. Each client reaches one worker over many connections.
    let with = ns.clients(40, 6);
    let stuck = sticky(&with);
    assert_eq!(stuck.len(), 40, "every client on one worker: {with:?}");
    let per_worker: BTreeMap<u32, usize> = with.values().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p[0]).or_default() += 1;
        m
    });
    assert!(per_worker.len() >= 3, "clients spread over the workers: {per_worker:?}");
    // lb agent status: the four workers, each client pinned to the one that answered it.
    let st = ns.status(&bin);
    assert_eq!(st.workers.len(), 4, "{st:?}");
    assert_eq!(st.pinned, 40, "{st:?}");
    for w in &st.workers {
        assert_eq!(w.pinned as usize, per_worker.get(&w.pid).copied().unwrap_or(0), "worker {}: {st:?}", w.pid);
        assert_eq!(w.command, "python3");
    }
    assert!(st.placed >= 40 && st.hits >= 40 * 5, "{st:?}");
    let mut cmd = Command::new(&bin);
    cmd.args(["--socket", &ns.socket(), "agent", "status"]);
    let text = String::from_utf8_lossy(&output_timeout(&mut cmd, Duration::from_secs(15)).unwrap().stdout).into_owned();
    assert!(text.contains("pinned clients 40") && text.contains("python3"), "{text}");

    // 2. Killing one worker moves only its clients.
    let victim = *per_worker.keys().next().unwrap();
    assert!(Command::new("kill").arg(victim.to_string()).status().unwrap().success());
    wait_log(&log, "worker socket gone");
    let after = ns.clients(40, 3);
    for (c, p) in &with {
        let now = &after[c];
        assert!(now.iter().all(|x| *x == now[0]), "client {c} sticky after the kill: {now:?}");
        if p[0] != victim {
            assert_eq!(now[0], p[0], "client {c} of worker {} moved when worker {victim} died", p[0]);
        } else {
            assert_ne!(now[0], victim);
        }
    }

    // 3. A worker that joins takes new clients only: nobody pinned moves.
    let joined = ns.server(1)[0];
    wait_log(&log, &format!("pid={joined}"));
    let later = ns.clients(40, 3);
    for (c, p) in &after {
        assert_eq!(later[c][0], p[0], "client {c} moved when worker {joined} joined");
    }
    // New clients (other addresses) may go to it.
    let newcomers = ns.clients(60, 1);
    assert!(newcomers.values().any(|p| p[0] == joined), "the new worker takes a share of new clients: {newcomers:?}");

    // The whole server restarts (a new reuseport group): the agent attaches to it again.
    let mut old: Vec<u32> = workers.clone();
    old.push(joined);
    for pid in old {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    let t = Instant::now();
    while std::fs::read_to_string(&log).unwrap_or_default().matches("worker socket gone").count() < 5 {
        assert!(t.elapsed() < Duration::from_secs(15), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    ns.server(4);
    let t = Instant::now();
    while std::fs::read_to_string(&log).unwrap_or_default().matches("attached to the port's SO_REUSEPORT group").count() < 2 {
        assert!(t.elapsed() < Duration::from_secs(15), "not attached to the new group: {}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let again = ns.clients(40, 4);
    assert_eq!(sticky(&again).len(), 40, "sticky again with the new server: {again:?}");

    // 4. Stopping the agent leaves the port working and nothing attached.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_log(&log, "lb agent stopped: detached");
    assert!(!Path::new(&ns.socket()).exists(), "the agent's socket is removed when it stops");
    let spread = ns.clients(40, 6);
    assert_eq!(spread.len(), 40, "every client answered after the agent stopped");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, bin.to_str().unwrap(), "agent", "--port", PORT, "--detach"]);
    let out = output_timeout(&mut cmd, Duration::from_secs(15)).unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("detached from 0"),
        "nothing left attached: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&log);
}

/// IPv6 clients (TCP over IPv6 sockets) and UDP (every datagram from a fresh socket, so each has
/// its own 4-tuple): each client stays on one worker with the agent.
#[test]
fn ipv6_and_udp_clients_stay_on_one_worker() {
    let bin = lb_bin();
    for (mode, proto) in [("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")] {
        let mut ns = Ns::new(mode);
        ns.v6_sources(30);
        let workers = ns.server_of(4, mode);
        assert_eq!(workers.len(), 4);
        let before = ns.clients_of(30, 6, mode);
        assert!(sticky(&before).len() < 15, "{mode}: without the agent the kernel spreads: {before:?}");
        let log = std::env::temp_dir().join(format!("lb-agent-{}-{mode}.log", std::process::id()));
        let sock = ns.socket();
        if mode == "udp" {
            // The same from an [agent] table of a config file.
            let cfg = std::env::temp_dir().join(format!("{}.toml", ns.name));
            std::fs::write(&cfg, format!("[agent]\nports = [{PORT}]\nprotocol = \"udp\"\nipv4_prefix = 32\ntimeout = \"30m\"\n")).unwrap();
            ns.spawn(&[bin.to_str().unwrap(), "--socket", &sock, "agent", "--config", cfg.to_str().unwrap()], Some(&log));
        } else {
            ns.spawn(&[bin.to_str().unwrap(), "--socket", &sock, "agent", "--port", PORT, "--protocol", proto], Some(&log));
        }
        wait_log(&log, "slot=3");
        let with = ns.clients_of(30, 6, mode);
        assert_eq!(sticky(&with).len(), 30, "{mode}: every client on one worker: {with:?}");
        let used: std::collections::BTreeSet<u32> = with.values().map(|p| p[0]).collect();
        assert!(used.len() >= 3, "{mode}: spread over the workers: {used:?}");
        eprintln!("{mode}: without the agent {} of 30 clients stayed on one worker, with it 30", sticky(&before).len());
        let _ = std::fs::remove_file(&log);
    }
}

/// Debian's nginx with `listen 8080 reuseport` and four workers answering with their pid: with
/// the agent each client stays on one worker over many connections.
#[test]
fn nginx_reuseport_workers_keep_their_clients() {
    let bin = lb_bin();
    let mut ns = Ns::new("nginx");
    let dir = std::env::temp_dir().join(format!("{}-nginx", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 4;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  \
             server {{\n    listen {PORT} reuseport;\n    location / {{ return 200 \"$pid\"; }}\n  }}\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let nginx_log = dir.join("stderr.log");
    ns.spawn(&["nginx", "-c", conf.to_str().unwrap(), "-e", dir.join("error.log").to_str().unwrap()], Some(&nginx_log));
    // Up when it answers.
    let t = Instant::now();
    let before = loop {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, "python3", script("client.py").to_str().unwrap(), "2", "41", "6", PORT]);
        let out = output_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(t.elapsed() < Duration::from_secs(15), "nginx never answered: {}\n{}", String::from_utf8_lossy(&out.stderr), std::fs::read_to_string(&nginx_log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(200));
    };
    let parse = |text: &str| -> BTreeMap<String, Vec<u32>> {
        text.lines().map(|l| {
            let mut f = l.split_whitespace();
            (f.next().unwrap().to_string(), f.map(|p| p.parse().unwrap()).collect())
        }).collect()
    };
    let before = parse(&before);
    let workers: std::collections::BTreeSet<u32> = before.values().flatten().copied().collect();
    assert_eq!(workers.len(), 4, "four nginx workers answered: {workers:?}");
    assert!(sticky(&before).len() < 20, "without the agent nginx's workers share each client: {before:?}");
    let log = dir.join("agent.log");
    ns.agent(&bin, &log);
    wait_log(&log, "slot=3");
    let with = ns.clients(40, 6);
    assert_eq!(sticky(&with).len(), 40, "every client on one nginx worker: {with:?}");
    let used: std::collections::BTreeSet<u32> = with.values().map(|p| p[0]).collect();
    assert!(used.len() >= 3 && used.is_subset(&workers), "spread over nginx's workers: {used:?}");
    eprintln!("nginx: without the agent {} of 40 clients stayed on one worker, with it 40 (over {} workers)", sticky(&before).len(), used.len());
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
