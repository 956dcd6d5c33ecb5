//! Scale-out benchmark: failover convergence of two balancer nodes behind an ECMP router
//! (`xtask::lab::cluster`, BIRD with the repository's configs, BGP hold time 3 s).
//!
//! A client address that the router's ECMP (hashing by address here) sends to node 1 is probed
//! with a new connection every 10 ms (each given 200 ms). Per repetition:
//!
//! - **node lost**: node 1 goes silent as a hung host would (nftables drop everything in and
//!   out, its datapath is removed; the router hears nothing more, not even the end of the BGP
//!   session): the figure is the time from the loss to the client's first good answer, which
//!   comes once the router's hold timer (3 s) drops node 1 and the client is rehashed to node 2
//!   (`failover_convergence_ms`);
//! - **lb down**: node 1's daemon withdraws (then serves through its 1 s grace time and
//!   detaches): the figure is the time from the start of `lb down` until the router stops
//!   using node 1 (`withdraw_convergence_ms`); the probe must not fail meanwhile.
//!
//! Node 1 is started again between repetitions. Medians of `LB_BENCH_REPS` repetitions (5; 3
//! with `LB_BENCH_QUICK=1`), printed and written to `<target>/bench/cluster.json`. Nothing is
//! asserted. Run as root: `cargo bench -p tests --bench cluster` (`LB_BIN` as for the others).

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use socket2::{Domain, Socket, Type};
use xtask::lab::cluster::{Cluster, ClusterMode, ClusterSpec, EcmpHash};

/// One request on the fixed flow from `client:sport`: did the VIP answer 200?
fn probe(c: &Cluster, client: Ipv4Addr, sport: u16, timeout: Duration) -> bool {
    let vip = c.vip();
    xtask::lab::in_netns(c.ns_client(), move || -> std::io::Result<bool> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddrV4::new(client, sport).into())?;
        s.connect_timeout(&vip.into(), timeout)?;
        let mut t: TcpStream = s.into();
        t.set_read_timeout(Some(timeout))?;
        t.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut buf = Vec::new();
        let _ = t.read_to_end(&mut buf);
        Ok(buf.starts_with(b"HTTP/1.1 200") && buf.windows(8).any(|w| w == b"backend-"))
    })
    .ok()
    .and_then(|r| r.ok())
    .unwrap_or(false)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn lb_bin() -> PathBuf {
    std::env::var_os("LB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb"))
}

fn restore(c: &mut Cluster, bin: &Path) -> Result<()> {
    c.start_node(1, bin)?;
    c.wait_nexthops(&[1, 2], Duration::from_secs(30)).map_err(|e| anyhow::anyhow!("{e:#}\nnode 1:\n{}", c.node_log_tail(1, 30)))?;
    Ok(())
}

fn run() -> Result<serde_json::Value> {
    let quick = std::env::var("LB_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let reps: usize = std::env::var("LB_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(if quick { 3 } else { 5 });
    let bin = lb_bin();
    if !bin.is_file() {
        bail!("{} not found: build it with `cargo build --release -p lb-userspace`", bin.display());
    }
    let mut c = Cluster::create(ClusterSpec { clients: 8, backends: 3, mode: ClusterMode::Dsr, ecmp: EcmpHash::L3 })?;
    c.start_node(2, &bin)?;
    restore(&mut c, &bin)?;
    let step = Duration::from_millis(10);
    let timeout = Duration::from_millis(200);
    // The flow really goes through node 1.
    let through_node1 = |c: &Cluster| -> Result<u64> {
        let out = c.lb_cli(1, &bin, &["status", "--output", "json"])?;
        let st: lb::api::StatusReport = serde_json::from_slice(&out.stdout).context("node 1 status")?;
        Ok(st.services.iter().find(|s| s.name == "web").map_or(0, |s| s.counters.packets))
    };
    // A client the router sends to node 1 (its ECMP hashes by address here): found by trying,
    // checked with three connections.
    let mut found = None;
    'clients: for client in c.client_addrs() {
        for k in 0..3u16 {
            let before = through_node1(&c)?;
            if !probe(&c, client, 40000 + k, Duration::from_secs(2)) {
                bail!("the probe client {client} got no answer with both nodes up");
            }
            if through_node1(&c)? == before {
                continue 'clients;
            }
        }
        found = Some(client);
        break;
    }
    let client = found.context("no client address goes through node 1")?;
    let sport = 40000;
    println!("cluster bench: probing from {client} -> {} (ECMP sends it to node 1), {reps} repetitions", c.vip());

    let (mut lost, mut withdraw) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        // Node lost: it goes silent as a hung host (its kernel drops everything, its datapath is
        // gone): the router hears nothing, not even the end of the BGP session, and waits out
        // the hold time.
        let t0 = Instant::now();
        c.blackhole_node(1, true)?;
        c.kill_lb(1);
        let out = c.lb_down(1, &bin)?;
        if !out.status.success() {
            bail!("lb down on node 1: {}", String::from_utf8_lossy(&out.stderr));
        }
        let answered = loop {
            let t = Instant::now();
            if probe(&c, client, sport, timeout) {
                break t0.elapsed();
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("no good answer 30 s after losing node 1");
            }
            std::thread::sleep(step.saturating_sub(t.elapsed()));
        };
        lost.push(answered.as_secs_f64() * 1e3);
        // The router has dropped node 1 (the answer came through node 2). Back as a rebooted
        // host: BIRD and lb started afresh.
        c.wait_nexthops(&[2], Duration::from_secs(30))?;
        c.stop_bird(1, Signal::SIGKILL)?;
        c.blackhole_node(1, false)?;
        restore(&mut c, &bin)?;

        // lb down: withdrawal, served through the grace time.
        let t0 = Instant::now();
        let mut downing = c.lb_down_command(1, &bin).spawn().context("starting lb down")?;
        let down = std::thread::scope(|s| {
            let h = s.spawn(|| -> Result<Duration> {
                c.wait_nexthops(&[2], Duration::from_secs(30))?;
                Ok(t0.elapsed())
            });
            let mut failures = 0;
            while !h.is_finished() {
                if !probe(&c, client, sport, timeout) {
                    failures += 1;
                }
                std::thread::sleep(step);
            }
            (h.join().expect("waiting thread"), failures)
        });
        let (moved, failures) = (down.0?, down.1);
        let st = downing.wait()?;
        if !st.success() {
            bail!("lb down on node 1 exited with {st}");
        }
        // Forgets the daemon that exited.
        c.lb_down(1, &bin)?;
        withdraw.push(moved.as_secs_f64() * 1e3);
        println!(
            "  rep {rep}: node lost -> first good answer {:.0} ms; lb down -> router off node 1 {:.1} ms ({failures} failed probes)",
            answered.as_secs_f64() * 1e3,
            moved.as_secs_f64() * 1e3
        );
        c.stop_bird(1, Signal::SIGTERM)?;
        restore(&mut c, &bin)?;
    }
    let (l, w) = (median(lost.clone()), median(withdraw.clone()));
    println!("cluster: failover_convergence_ms {l:.0} (node lost: BGP hold time 3 s), withdraw_convergence_ms {w:.1} (lb down), medians of {reps}");
    Ok(serde_json::json!({
        "cluster": {
            "failover_convergence_ms": (l * 10.0).round() / 10.0,
            "withdraw_convergence_ms": (w * 10.0).round() / 10.0,
            "repetitions": reps,
            "bgp_hold_time_s": 3,
        }
    }))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("cluster bench skipped: namespaces, XDP and BIRD need root");
        return;
    }
    match run() {
        Ok(v) => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join("cluster.json");
            std::fs::write(&path, serde_json::to_string_pretty(&v).expect("JSON")).expect("writing the report");
            println!("written: {}", path.display());
        }
        Err(e) => {
            eprintln!("cluster bench: {e:#}");
            std::process::exit(1);
        }
    }
}
