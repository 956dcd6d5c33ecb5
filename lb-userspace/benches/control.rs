//! Control-plane benchmarks (run by `cargo xtask bench`; figures printed, never asserted):
//! Maglev table build time, and the time to apply a config of 1,000 services with 16 backends
//! each to a loaded datapath (first apply, then a reload that re-weights every service).
//! Medians of several repetitions, on whatever machine runs it.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lb::{
    config::Config,
    datapath::{Capacity, Datapath},
    maglev::{self, MaglevBackend},
    state::Runtime,
};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn config(services: u32, backends: u32, weight: u32) -> String {
    let mut s = format!(
        "[datapath]\ninterfaces = [\"lo\"]\nmax_services = {services}\nmax_backends = {}\naffinity_entries = 65536\n",
        services * backends
    );
    for i in 0..services {
        let _ = write!(
            s,
            "[[services]]\nname = \"s{i}\"\nvip = \"10.{}.{}.1\"\nport = 80\n[services.health]\nkind = \"none\"\n",
            100 + i / 256,
            i % 256
        );
        for j in 0..backends {
            let _ = write!(
                s,
                "[[services.backends]]\naddress = \"172.{}.{}.{}\"\nport = 8080\nweight = {}\n",
                16 + i / 256,
                i % 256,
                j + 1,
                weight + j
            );
        }
    }
    s
}

fn main() {
    let reps: usize = std::env::var("LB_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let m = lb_common::DEFAULT_MAGLEV_M;

    // Maglev: M = 65537, 1,000 backends with varied weights.
    let backends: Vec<MaglevBackend> = (0..1000u32)
        .map(|i| MaglevBackend {
            addr: IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i)),
            port: 8080,
            weight: 50 + (i % 7) * 25,
            id: i,
        })
        .collect();
    let times: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(maglev::build(&backends, m));
            t.elapsed()
        })
        .collect();
    let build = median(times);
    println!("maglev_build_ms {:.3}   (M = {m}, 1000 backends, median of {reps}; goal < 10 ms)", ms(build));

    let small: Vec<MaglevBackend> = backends[..16].to_vec();
    let t = Instant::now();
    for _ in 0..100 {
        std::hint::black_box(maglev::build(&small, m));
    }
    println!("maglev_build_16_ms {:.3}   (M = {m}, 16 backends, mean of 100)", ms(t.elapsed()) / 100.0);

    // Reload: 1,000 services x 16 backends onto a loaded datapath (root needed).
    if !nix::unistd::geteuid().is_root() {
        println!("reload_1000_ms skipped: loading the datapath needs root");
        write_report(ms(build), None);
        return;
    }
    let first = Config::parse(&config(1000, 16, 100)).expect("bench config");
    let mut dp = Datapath::load(Capacity::from_config(&first.datapath), None).expect("loading the datapath");
    let mut rt = Runtime::new(&first);
    let t = Instant::now();
    rt.reconcile(&first, &mut dp).expect("first apply");
    let initial = t.elapsed();
    let mut times = Vec::new();
    for r in 0..reps {
        let cfg = Config::parse(&config(1000, 16, 101 + r as u32)).expect("bench config");
        let t = Instant::now();
        let ch = rt.reconcile(&cfg, &mut dp).expect("reload");
        times.push(t.elapsed());
        assert_eq!(ch.services_changed.len(), 1000, "every service was re-weighted");
    }
    let same = Config::parse(&config(1000, 16, 100 + reps as u32)).expect("bench config");
    let t = Instant::now();
    rt.reconcile(&same, &mut dp).expect("no-op reload");
    let noop = t.elapsed();
    let reload = ms(median(times));
    println!(
        "reload_1000_ms {reload:.1}   (1000 services x 16 backends re-weighted, median of {reps}; goal < 1000 ms; first apply {:.1} ms, unchanged reload {:.1} ms; parsing not included)",
        ms(initial),
        ms(noop)
    );
    write_report(ms(build), Some(reload));
}

/// `target/bench/control.json`, merged into the report by `cargo xtask bench`.
fn write_report(maglev_build_ms: f64, reload_1000_ms: Option<f64>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let json = serde_json::json!({ "control": { "maglev_build_ms": maglev_build_ms, "reload_1000_ms": reload_1000_ms } });
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join("control.json"), json.to_string())) {
        eprintln!("writing {}: {e}", dir.display());
    }
}
