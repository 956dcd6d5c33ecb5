//! The live status page in a real headless Chromium (Debian's `chromium`, driven over the
//! DevTools protocol on a pipe) against the real `lb` in the namespace lab: the page renders and
//! lists every backend, loads nothing from anywhere but lb, and after a failover shows the
//! backend down and the moves without being reloaded. A screenshot is written to
//! `target/status-page.png`. Run as root by `cargo xtask test`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lb::api::{AffinityList, StatusReport};
use serde_json::Value;
use tests::{browser::Browser, lb_bin};
use xtask::lab::{Lab, LabSpec};

const PAGE: &str = "http://127.0.0.1:9940/";

fn out(lab: &Lab, bin: &Path, args: &[&str]) -> String {
    let o = lab.lb_cli(bin, args).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(o.status.success(), "lb {args:?}: {}\n{}", String::from_utf8_lossy(&o.stderr), lab.lb_log_tail(20));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What the page shows, read from its DOM: every backend row's (service, backend, state,
/// moves/min), the moves listed, and the service's moves/min.
const SHOWN: &str = r##"JSON.stringify({
  backends: [...document.querySelectorAll("tr.backend")].map(r => [r.dataset.service, r.dataset.backend, r.querySelector(".state").textContent, r.querySelector(".moves").textContent]),
  moves: [...document.querySelectorAll("#moves tr.move")].map(r => [r.querySelector(".client").textContent, r.querySelector(".from").textContent, r.querySelector(".reason").textContent]),
  charts: document.querySelectorAll("section.service .chart svg").length,
  lines: document.querySelectorAll("section.service .chart svg polyline").length,
  link: document.getElementById("link")?.className ?? "",
  foreign: performance.getEntriesByType("resource").map(e => e.name).filter(n => !n.startsWith(location.origin)),
  updated: document.body?.dataset.updated || "",
  web: Object.fromEntries([...document.querySelectorAll('section.service[data-service="web"] .chart')].map(c => [c.dataset.chart, {
    sum: Number(c.dataset.sum || 0),
    last: Object.fromEntries([...c.querySelectorAll(".legend span")].map(s => [s.dataset.series, Number(s.dataset.last)])),
  }])),
})"##;

struct Shown {
    backends: Vec<(String, String, String, u64)>,
    moves: Vec<(String, String, String)>,
    charts: u64,
    lines: u64,
    link: String,
    foreign: Vec<String>,
    updated: String,
    /// The web service's charts: chart -> (sum of every point, last value by series).
    web: BTreeMap<String, (f64, BTreeMap<String, f64>)>,
}

fn shown(b: &mut Browser) -> Shown {
    let v: Value = serde_json::from_str(b.eval(SHOWN).unwrap_or_else(|e| panic!("{e:#}")).as_str().unwrap_or("{}")).unwrap();
    let strs = |x: &Value| x.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_string()).collect::<Vec<_>>()).unwrap_or_default();
    Shown {
        backends: v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let r = strs(r);
                (r[0].clone(), r[1].clone(), r[2].clone(), r[3].parse().unwrap_or(u64::MAX))
            })
            .collect(),
        moves: v["moves"].as_array().unwrap().iter().map(&strs).map(|r| (r[0].clone(), r[1].clone(), r[2].clone())).collect(),
        charts: v["charts"].as_u64().unwrap_or(0),
        lines: v["lines"].as_u64().unwrap_or(0),
        link: v["link"].as_str().unwrap_or_default().to_string(),
        foreign: strs(&v["foreign"]),
        updated: v["updated"].as_str().unwrap_or_default().to_string(),
        web: v["web"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, c)| {
                        let last = c["last"].as_object().map(|l| l.iter().map(|(s, x)| (s.clone(), x.as_f64().unwrap_or(0.0))).collect()).unwrap_or_default();
                        (k.clone(), (c["sum"].as_f64().unwrap_or(0.0), last))
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Waits up to `secs` for what the page shows to pass `ok`; the last view, described, if it
/// never does.
fn wait_for(b: &mut Browser, secs: u64, ok: impl Fn(&Shown) -> bool) -> Result<Shown, String> {
    let t = Instant::now();
    loop {
        let s = shown(b);
        if ok(&s) {
            return Ok(s);
        }
        if t.elapsed() > Duration::from_secs(secs) {
            return Err(describe(&s));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn describe(s: &Shown) -> String {
    format!("backends {:?}\nmoves {:?}\ncharts {} lines {} link {} foreign {:?}\nweb charts {:?}", s.backends, s.moves, s.charts, s.lines, s.link, s.foreign, s.web)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

#[test]
fn the_status_page_shows_every_backend_and_a_failover_live() {
    if !Path::new(tests::browser::CHROMIUM).exists() {
        let why = format!("no {} (the chromium package; cargo xtask setup installs it)", tests::browser::CHROMIUM);
        xtask::skips::skip("status_page::the_status_page_shows_every_backend_and_a_failover_live", &why);
        return;
    }
    let bin = lb_bin();
    let mut lab = Lab::create(LabSpec { clients: 30, backends: 3 }).unwrap_or_else(|e| panic!("{e:#}"));
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let (vip, clients) = tests::every_client_once(&lab);
    let st: StatusReport = serde_json::from_str(&out(&lab, &bin, &["status", "--output", "json"])).unwrap();
    let backends: BTreeSet<(String, String)> =
        st.services.iter().flat_map(|s| s.backends.iter().map(|b| (s.name.clone(), lb::api::endpoint(&b.address, b.port)))).collect();
    let services = st.services.len() as u64;
    assert!(services >= 2 && backends.len() >= 6, "the lab has web and dns, three backends each: {backends:?}");

    // The page and its parts come from lb, with a policy that allows nothing else.
    let head = xtask::lab::in_netns(lab.ns_lb(), || Command::new("curl").args(["-sS", "-D", "-", "-o", "/dev/null", "--max-time", "10", PAGE]).output())
        .unwrap()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_lowercase())
        .unwrap();
    assert!(head.contains("content-type: text/html") && head.contains("content-security-policy: default-src 'none'"), "{head}");

    let log = lab.dir().join("chromium.log");
    let mut b = Browser::start(Some(lab.ns_lb()), 1280, 1000, &log).unwrap_or_else(|e| panic!("{e:#}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    b.open(PAGE).unwrap_or_else(|e| panic!("{e:#}"));
    let first = wait_for(&mut b, 20, |s| s.backends.len() == backends.len()).unwrap_or_else(|s| panic!("the page never listed the backends:\n{}", s));
    let listed: BTreeSet<(String, String)> = first.backends.iter().map(|r| (r.0.clone(), r.1.clone())).collect();
    assert_eq!(listed, backends, "every backend of every service, by address:port");
    assert!(first.backends.iter().all(|r| r.2 == "up"), "{}", describe(&first));
    assert!(first.moves.is_empty(), "no move yet: {}", describe(&first));
    assert!(first.foreign.is_empty(), "nothing loaded from elsewhere: {:?}", first.foreign);
    assert_eq!(first.link, "link live");
    assert_eq!(first.charts, 4 * services, "four charts per service");
    let before_url = b.eval("location.href").unwrap();

    // Who is on b1, then b1 dies and every client comes back.
    let list: AffinityList = serde_json::from_str(&out(&lab, &bin, &["affinity", "list", "--service", "web", "--output", "json"])).unwrap();
    let pins: BTreeMap<String, String> = list.pins.into_iter().map(|p| (p.client, p.backend)).collect();
    let b1 = format!("{}:8080", lab.backend_addr(1));
    let of_b1: BTreeSet<String> = clients.iter().map(|c| c.to_string()).filter(|c| pins.get(c) == Some(&b1)).collect();
    assert!(!of_b1.is_empty(), "b1 holds some clients: {pins:?}");
    lab.stop_backend(1).unwrap_or_else(|e| panic!("{e:#}"));
    let t = Instant::now();
    loop {
        let st: StatusReport = serde_json::from_str(&out(&lab, &bin, &["status", "--output", "json"])).unwrap();
        if st.services.iter().any(|s| s.backends.iter().any(|b| b.state == "down")) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "b1 never went down");
        std::thread::sleep(Duration::from_millis(200));
    }
    for c in &clients {
        lab.http_get(*c, vip, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{c}: {e:#}"));
    }

    // The same page, not reloaded, shows b1 down, its clients' moves and the count per minute.
    let n = of_b1.len() as u64;
    let after = wait_for(&mut b, 15, |s| {
        s.backends.iter().any(|r| r.0 == "web" && r.1 == b1 && r.2 == "down" && r.3 == n) && s.moves.len() as u64 == n
    })
    .unwrap_or_else(|s| panic!("the page never showed the failover ({n} moves off {b1}):\n{}", s));
    let moved: BTreeSet<String> = after.moves.iter().map(|m| m.0.clone()).collect();
    assert_eq!(moved, of_b1, "exactly b1's clients are listed as moved");
    assert!(after.moves.iter().all(|m| m.1 == b1 && m.2 == "backend_down"), "{}", describe(&after));
    let web = after.backends.iter().filter(|r| r.0 == "web");
    assert!(web.filter(|r| r.1 != b1).all(|r| r.2 == "up" && r.3 == 0), "the others took the clients, lost none: {}", describe(&after));
    assert_eq!(b.eval("location.href").unwrap(), before_url, "no navigation happened");
    assert_eq!(b.eval("performance.getEntriesByType('navigation').length").unwrap(), 1, "the page was not reloaded");
    // The charts fill in from the samples (a point every 5 s): a line per backend in each of
    // the three line charts; the moves chart holds the failover's moves, the pins chart shows
    // b1 empty and the others holding every client.
    let b2 = format!("{}:8080", lab.backend_addr(2));
    let b3 = format!("{}:8080", lab.backend_addr(3));
    let charted = wait_for(&mut b, 20, |s| {
        let pinned = s.web.get("pinned").map(|c| &c.1);
        s.lines >= 3 * backends.len() as u64
            && s.web.get("moves").is_some_and(|c| c.0 == n as f64)
            && pinned.is_some_and(|p| p.get(&b1) == Some(&0.0) && p.get(&b2).unwrap_or(&0.0) + p.get(&b3).unwrap_or(&0.0) == clients.len() as f64)
    })
    .unwrap_or_else(|s| panic!("the charts never showed the failover:\n{}", s));
    assert!(charted.updated.parse::<u64>().is_ok());

    let png = b.screenshot().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "a real screenshot ({} bytes)", png.len());
    let dir = target_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("status-page.png");
    std::fs::write(&path, &png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    println!("status page screenshot: {} ({} bytes)", path.display(), png.len());
    drop(b);
    lab.stop_lb().unwrap_or_else(|e| panic!("{e:#}"));
}
