//! The daemon at scale: `lb status`, a metrics scrape and a health event applied to the maps, with
//! ten million pins in the affinity table (`affinity_entries = 16777216`), while those pins are
//! being counted.
//!
//! The real `lb run` in the namespace lab; the pins are written straight into its pinned AFFINITY
//! map (live, spread over web's three backends). Figures:
//! - `pin_count_ms_10m_pins`: one count of the table (the background counter's scan), which is what
//!   every status, scrape and drain cost under the daemon lock before the counter existed;
//! - `status_ms_10m_pins`, `scrape_ms_10m_pins`: median round trip of `GET /status` on the
//!   control socket and `GET /metrics` (with the maximum beside it), taken while counts run back
//!   to back;
//! - `health_apply_ms_during_count`: the largest time from a health checker's verdict to the
//!   maps holding it (the daemon's own `applied_ms`, lock wait included), over the verdicts that
//!   came while a count was running (backend 1 made to fail and pass its check, again and again).
//!
//! Printed and written to `<target>/bench/scale.json` (section `control`). Nothing is asserted.
//! Run as root: `cargo bench -p tests --bench scale` (`LB_BIN` as for the others).

use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use lb::api::StatusReport;
use lb_common::{AffinityKey, AffinityValue};
use xtask::lab::{Lab, LabOptions, LabSpec};

const PINS: u32 = 10_000_000;
const CAPACITY: u32 = 16_777_216;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

fn status(lab: &Lab, fresh: bool) -> Result<StatusReport> {
    block_on(lb::client::get_json(lab.socket_path(), if fresh { "/status?fresh=true" } else { "/status" }))
}

fn scrape() -> std::io::Result<usize> {
    let mut s = std::net::TcpStream::connect("127.0.0.1:9940")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out.len())
}

/// The `applied_ms` of every health verdict the daemon logged (JSON logs), with whether a pin
/// count was running.
fn health_applies(log: &str) -> Vec<(f64, bool)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let f = v.get("fields")?;
            Some((f.get("applied_ms")?.as_f64()?, f.get("during_pin_count")?.as_bool()?))
        })
        .collect()
}

fn run(bin: &std::path::Path, reps: usize) -> Result<serde_json::Value> {
    let options = LabOptions::default().with_health_timing(Duration::from_millis(100), Duration::from_millis(100), 1, 1);
    let mut lab = Lab::create_with(LabSpec { clients: 2, backends: 3 }, options)?;
    let cfg = lab.render_config(&lab.interfaces());
    let cfg = cfg.replace("affinity_entries = 65536", &format!("affinity_entries = {CAPACITY}"));
    if !cfg.contains(&format!("affinity_entries = {CAPACITY}")) {
        bail!("the lab config has no affinity_entries line to change");
    }
    lab.write_config(&cfg)?;
    lab.set_lb_args(&["--log-format", "json"]);
    lab.start_lb(bin)?;
    let st = status(&lab, true)?;
    let web = st.services.iter().find(|s| s.name == "web").context("service web")?;
    let (sid, ids): (u32, Vec<u32>) = (web.id, web.backends.iter().map(|b| b.id).collect());

    let table = lb::datapath::PinTable::open_pinned(lab.pin_path())?;
    let now = lb::datapath::monotonic_coarse_ns();
    let t = Instant::now();
    let mut written = 0;
    for start in (0..PINS).step_by(1 << 20) {
        let chunk: Vec<(AffinityKey, AffinityValue)> = (start..(start + (1 << 20)).min(PINS))
            .map(|i| {
                let addr = (0x2000_0000u32 + i).to_be();
                let key = AffinityKey { service_id: sid, addr: [addr, 0, 0, 0] };
                let value = AffinityValue { backend_id: ids[i as usize % ids.len()], flags: 0, last_seen_ns: now, created_ns: now };
                (key, value)
            })
            .collect();
        written += table.write(&chunk)?;
    }
    println!("wrote {written} pins in {:.1} s", t.elapsed().as_secs_f64());
    let st = status(&lab, true)?;
    let count_ms = st.pin_count.took_ms.unwrap_or(f64::NAN);
    let pinned: u64 = st.services.iter().map(|s| s.pinned).sum();
    println!("counted {pinned} live pins ({} entries) in {count_ms:.0} ms", st.affinity_entries);

    // Counts back to back from here on: a thread keeps asking for fresh ones.
    let stop = AtomicBool::new(false);
    let (status_ms, scrape_ms, during, applies) = std::thread::scope(|s| -> Result<_> {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let _ = status(&lab, true);
            }
        });
        let mut status_ms = Vec::new();
        let mut during = 0;
        for _ in 0..reps * 3 {
            let t = Instant::now();
            let st = status(&lab, false)?;
            status_ms.push(t.elapsed().as_secs_f64() * 1e3);
            during += usize::from(st.pin_count.running);
            std::thread::sleep(Duration::from_millis(150));
        }
        let scrape_ms = xtask::lab::in_netns(lab.ns_lb(), || -> Result<Vec<f64>> {
            let mut v = Vec::new();
            for _ in 0..reps * 3 {
                let t = Instant::now();
                scrape().context("scraping /metrics")?;
                v.push(t.elapsed().as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(150));
            }
            Ok(v)
        })??;
        // Health verdicts: backend 1 fails and passes its check until enough of them came
        // while a count ran (or a minute is up).
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut healthy = true;
        let applies = loop {
            let applies = health_applies(&lab.lb_log());
            if applies.iter().filter(|(_, c)| *c).count() >= reps || Instant::now() >= deadline {
                break applies;
            }
            healthy = !healthy;
            lab.set_backend_healthy(1, healthy)?;
            std::thread::sleep(Duration::from_millis(700));
        };
        lab.set_backend_healthy(1, true)?;
        stop.store(true, Ordering::Relaxed);
        Ok((status_ms, scrape_ms, during, applies))
    })?;
    let in_count: Vec<f64> = applies.iter().filter(|(_, c)| *c).map(|(ms, _)| *ms).collect();
    let all: Vec<f64> = applies.iter().map(|(ms, _)| *ms).collect();
    println!(
        "status_ms_10m_pins {:.1}   (median of {}, max {:.1}; {during} of them while a count ran; goal < 100 ms)",
        median(status_ms.clone()),
        status_ms.len(),
        max(&status_ms)
    );
    println!(
        "scrape_ms_10m_pins {:.1}   (median of {}, max {:.1}; goal < 100 ms)",
        median(scrape_ms.clone()),
        scrape_ms.len(),
        max(&scrape_ms)
    );
    println!(
        "health_apply_ms_during_count {:.2}   (max of {} verdicts applied while a count ran, median {:.2}; all {} verdicts: max {:.2}; goal < 100 ms)",
        max(&in_count),
        in_count.len(),
        median(in_count.clone()),
        all.len(),
        max(&all)
    );
    println!("pin_count_ms_10m_pins {count_ms:.0}   (one scan of the table: before the background counter, every status, scrape and drain held the daemon lock this long)");
    let _ = lab.stop_lb();
    Ok(serde_json::json!({ "control": {
        "status_ms_10m_pins": median(status_ms),
        "scrape_ms_10m_pins": median(scrape_ms),
        "health_apply_ms_during_count": if in_count.is_empty() { serde_json::Value::Null } else { max(&in_count).into() },
        "pin_count_ms_10m_pins": count_ms,
    }}))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("scale bench skipped: namespaces and XDP need root");
        return;
    }
    let reps: usize = std::env::var("LB_BENCH_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(7);
    let bin = tests::lb_bin();
    match run(&bin, reps) {
        Ok(report) => {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
            if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join("scale.json"), report.to_string())) {
                eprintln!("writing {}: {e}", dir.display());
            }
        }
        Err(e) => {
            eprintln!("scale bench failed: {e:#}");
            std::process::exit(1);
        }
    }
}
