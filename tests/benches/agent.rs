//! `lb agent` benchmark (run by `cargo xtask bench`; figures printed, never asserted): new TCP
//! connections per second to a four-worker nginx (`listen reuseport`, `return 200`) in a network
//! namespace of its own, without and with the agent, interleaved in one run (without, with,
//! without, ...), from 64 loopback client addresses, each connection a fresh one (`HTTP/1.0`,
//! closed by the server). Reports the medians and their ratio (with / without).

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PORT: u16 = 8080;
const CLIENTS: u8 = 64;

struct Ns {
    name: String,
    children: Vec<Child>,
}

impl Drop for Ns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(o) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Connections per second for `secs`, from two threads in the namespace.
fn load(ns: &str, secs: f64) -> f64 {
    xtask::lab::in_netns(ns, || {
        let done = AtomicBool::new(false);
        let count = AtomicU64::new(0);
        let t = Instant::now();
        std::thread::scope(|s| {
            for th in 0..2u8 {
                let (done, count) = (&done, &count);
                s.spawn(move || {
                    let mut i = th;
                    let mut buf = [0u8; 512];
                    while !done.load(Ordering::Relaxed) {
                        let src = Ipv4Addr::new(127, 0, 1, 2 + i % CLIENTS);
                        i = i.wrapping_add(2);
                        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                        sock.bind(&SocketAddrV4::new(src, 0).into()).unwrap();
                        if sock.connect(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT).into()).is_err() {
                            continue;
                        }
                        let mut c: TcpStream = sock.into();
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        if c.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
                            continue;
                        }
                        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            std::thread::sleep(Duration::from_secs_f64(secs));
            done.store(true, Ordering::Relaxed);
        });
        count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
    })
    .expect("load in the namespace")
}

fn main() {
    let reps: usize = std::env::var("LB_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let secs = if std::env::var_os("LB_BENCH_QUICK").is_some() { 2.0 } else { 4.0 };
    let bin = std::env::var_os("LB_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb"));
    let mut ns = Ns { name: format!("lbagtb{}", std::process::id()), children: Vec::new() };
    assert!(Command::new("ip").args(["netns", "add", &ns.name]).status().unwrap().success());
    assert!(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]).status().unwrap().success());
    let dir = std::env::temp_dir().join(format!("{}-nginx", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 4;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  \
             server {{\n    listen {PORT} reuseport backlog=4096;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let nginx = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nginx", "-c", conf.to_str().unwrap(), "-e", &format!("{d}/error.log")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx");
    ns.children.push(nginx);
    std::thread::sleep(Duration::from_millis(500));
    let log = dir.join("agent.log");
    let sock = dir.join("agent.sock");
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        without.push(load(&ns.name, secs));
        let _ = std::fs::remove_file(&log);
        let agent = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&bin)
            .arg("--socket")
            .arg(&sock)
            .args(["agent", "--port", &PORT.to_string()])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("agent.err")).unwrap())
            .spawn()
            .expect("lb agent");
        let t = Instant::now();
        while !std::fs::read_to_string(dir.join("agent.err")).unwrap_or_default().contains("slot=3") {
            assert!(t.elapsed() < Duration::from_secs(15), "the agent did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        with.push(load(&ns.name, secs));
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let mut agent = agent;
        let _ = agent.wait();
    }
    let (a, b) = (median(without.clone()), median(with.clone()));
    println!(
        "agent: new TCP connections per second to 4 nginx workers (reuseport), {CLIENTS} client addresses, 2 threads, {secs} s per run, median of {reps}"
    );
    println!("  without the agent {a:>10.0} /s   {without:.0?}");
    println!("  with the agent    {b:>10.0} /s   {with:.0?}");
    println!("  ratio with/without {:.3}", b / a);
    let json = serde_json::json!({ "agent": { "conns_per_sec_without": a.round(), "conns_per_sec_with": b.round(), "ratio": (b / a * 1000.0).round() / 1000.0 } });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    if let Err(e) = std::fs::create_dir_all(&out).and_then(|_| std::fs::write(out.join("agent.json"), json.to_string())) {
        eprintln!("writing {}: {e}", out.display());
    }
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
