//! Fair stickiness end to end (`[services.balance]`) against the real `lb` in the namespace lab:
//! bounded loads keep new clients off a backend a heavy client keeps busy, without moving any
//! pin; slow start ramps a recovered backend's share of new clients over time. Run as root by
//! `cargo xtask test`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use lb::api::StatusReport;
use tests::lb_bin;
use xtask::lab::{Lab, LabSpec, VIP_HTTP_PORT};

const TIMEOUT: Duration = Duration::from_secs(3);

fn fail(lab: &Lab, msg: &str) -> ! {
    panic!("{msg}\n--- last 40 lines of {} ---\n{}\n---", lab.log_path().display(), lab.lb_log_tail(40))
}

fn status(lab: &Lab, bin: &Path) -> StatusReport {
    let out = lab.lb_cli(bin, &["status", "--output", "json"]).unwrap_or_else(|e| panic!("{e:#}"));
    if !out.status.success() {
        fail(lab, &format!("lb status: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}"))
}

fn wait_for(lab: &Lab, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            fail(lab, &format!("waited {limit:?} for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lab's config with `balance` (TOML lines) as the web service's `[services.balance]`.
fn config_with_balance(lab: &Lab, balance: &str) -> String {
    let text = lab.render_config_with(&lab.interfaces(), lab.options());
    let web = text.find("name = \"web\"").expect("a web service");
    let at = web + text[web..].find("[[services.backends]]").expect("web has backends");
    format!("{}[services.balance]\n{balance}\n\n{}", &text[..at], &text[at..])
}

fn get(lab: &Lab, client: Ipv4Addr) -> String {
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    lab.http_get(client, vip, TIMEOUT).unwrap_or_else(|e| fail(lab, &format!("{client}: {e:#}"))).trim().to_owned()
}

/// Bounded loads: one client keeps its backend busy over a persistent connection; of 40 new
/// clients at most 2 land there and no pin moves. The same 40-client step with the bound
/// switched off (reload) gives about the fair share, so the test shows the difference.
#[test]
fn a_heavy_clients_backend_takes_few_new_clients_while_over_the_bound() {
    let bin = lb_bin();
    let mut lab = Lab::create(LabSpec { clients: 90, backends: 4 }).unwrap_or_else(|e| panic!("{e:#}"));
    lab.write_config(&config_with_balance(&lab, "load_bound = 1.25\nload = \"packets\"")).unwrap();
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let clients = lab.client_addrs();
    let heavy = clients[0];
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    wait_for(&lab, "the VIP", Duration::from_secs(20), || lab.http_get(heavy, vip, TIMEOUT).is_ok());
    let home = get(&lab, heavy);

    // The heavy client: back-to-back requests on one connection.
    let traffic = lab.spawn_keepalive_traffic(vec![heavy], vip, Duration::ZERO).unwrap_or_else(|e| panic!("{e:#}"));
    let home_addr = {
        let i: u32 = home.strip_prefix("backend-").and_then(|n| n.parse().ok()).expect("backend-N");
        lab.backend_addr(i).to_string()
    };
    wait_for(&lab, "the heavy client's backend to be over the bound", Duration::from_secs(10), || {
        let st = status(&lab, &bin);
        let web = st.services.iter().find(|s| s.name == "web").expect("web");
        web.backends.iter().any(|b| b.address == home_addr && b.balance.as_ref().is_some_and(|x| x.over_bound))
    });
    let text = String::from_utf8_lossy(&lab.lb_cli(&bin, &["status"]).unwrap().stdout).into_owned();
    assert!(text.contains("OVER BOUND (skipped for new clients)") && text.contains("load bound 1.25x"), "{text}");
    assert!(lab.lb_log().contains("backend over the load bound"), "{}", lab.lb_log_tail(10));

    // lb explain says which new clients are placed past their Maglev choice, and why.
    let first: Vec<Ipv4Addr> = clients[1..41].to_vec();
    let mut passed_over = 0;
    for c in &first {
        let out = lab.lb_cli(&bin, &["explain", &c.to_string(), "--service", "web", "--output", "json"]).unwrap();
        let e: Vec<lb::api::Explanation> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("explain JSON: {e}"));
        if let Some(p) = &e[0].past_choice {
            assert!(p.contains(&home_addr) && p.contains("over the load bound"), "{p}");
            assert!(e[0].reason.contains("passed over") && e[0].maglev_backend.as_deref() != Some(&*format!("{home_addr}:8080")), "{:?}", e[0]);
            passed_over += 1;
        }
    }
    assert!(passed_over >= 1, "about a quarter of 40 new clients have the heavy backend as their plain choice");
    let mut placed: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for c in &first {
        placed.insert(*c, get(&lab, *c));
    }
    let on_home = first.iter().filter(|c| placed[c] == home).count();
    assert!(on_home <= 2, "{on_home} of 40 new clients went to the heavy client's backend {home} while it was over the bound: {placed:?}");
    // Counted: status and the metrics say how many were placed past their plain choice.
    wait_for(&lab, "placements past the plain choice counted", Duration::from_secs(10), || {
        let st = status(&lab, &bin);
        let web = st.services.iter().find(|s| s.name == "web").unwrap();
        web.balance.as_ref().is_some_and(|b| b.placements_past_choice as usize >= passed_over)
    });
    let metrics = xtask::lab::in_netns(lab.ns_lb(), || {
        std::process::Command::new("curl").args(["-sS", "--max-time", "10", "http://127.0.0.1:9940/metrics"]).output()
    })
    .unwrap()
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap();
    let line = metrics.lines().find(|l| l.starts_with("lb_placements_past_choice_total{service=\"web\"}")).unwrap_or_else(|| panic!("{metrics}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n as usize >= passed_over, "{line} (explain named {passed_over})");
    assert!(metrics.contains(&format!("lb_backend_over_bound{{service=\"web\",backend=\"{home_addr}:8080\"}} 1")), "{metrics}");

    // The bound off (same test, same lab): the next 40 new clients see the plain table.
    lab.write_config(&lab.render_config_with(&lab.interfaces(), lab.options())).unwrap();
    let out = lab.lb_cli(&bin, &["reload"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second: Vec<Ipv4Addr> = clients[41..81].to_vec();
    for c in &second {
        placed.insert(*c, get(&lab, *c));
    }
    let plain_home = second.iter().filter(|c| placed[c] == home).count();
    eprintln!("new clients on the heavy client's backend: {on_home} of 40 with load_bound = 1.25, {plain_home} of 40 without");
    assert!(plain_home >= 5, "without the bound the heavy backend should take about its share (10 of 40), got {plain_home}");

    // Nobody moved: the heavy client stayed home all along, every placed client is still where it went.
    let records = traffic.stop();
    assert!(records.len() > 100, "the heavy client sent {} requests", records.len());
    let away: Vec<_> = records.iter().filter(|r| r.result.as_deref().ok() != Some(home.as_str())).collect();
    assert!(away.is_empty(), "the heavy client left {home}: {:?}", &away[..away.len().min(3)]);
    for (c, b) in &placed {
        assert_eq!(&get(&lab, *c), b, "client {c} moved");
    }
}

/// Slow start: a recovered backend's share of new clients grows over 20 s in steps, rather than
/// jumping to its full share the moment it is up.
#[test]
fn a_recovered_backend_ramps_its_share_of_new_clients() {
    let bin = lb_bin();
    let mut lab = Lab::create(LabSpec { clients: 170, backends: 3 }).unwrap_or_else(|e| panic!("{e:#}"));
    lab.write_config(&config_with_balance(&lab, "slow_start = \"20s\"")).unwrap();
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let clients = lab.client_addrs();
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    wait_for(&lab, "the VIP", Duration::from_secs(20), || lab.http_get(clients[0], vip, TIMEOUT).is_ok());
    let b1 = lab.backend_addr(1).to_string();
    let state = |lab: &Lab| {
        let st = status(lab, &bin);
        st.services.iter().find(|s| s.name == "web").unwrap().backends.iter().find(|b| b.address == b1).cloned().unwrap()
    };
    lab.stop_backend(1).unwrap_or_else(|e| panic!("{e:#}"));
    wait_for(&lab, "backend 1 down", Duration::from_secs(20), || state(&lab).state == "down");
    lab.start_backend(1).unwrap_or_else(|e| panic!("{e:#}"));
    wait_for(&lab, "backend 1 up again", Duration::from_secs(20), || state(&lab).state == "up");
    let up_at = Instant::now();
    let ramp = state(&lab).balance.and_then(|b| b.ramping_percent);
    assert!(ramp.is_some_and(|p| p <= 20), "just recovered, it ramps from about 0: {ramp:?}");
    let text = String::from_utf8_lossy(&lab.lb_cli(&bin, &["status"]).unwrap().stdout).into_owned();
    assert!(text.contains("ramping") && text.contains("slow start 20s"), "{text}");

    // Four buckets of 40 new clients, 5 s apart: how many land on backend 1.
    let mut next = clients.iter().skip(1);
    let mut shares = Vec::new();
    for bucket in 0..4u32 {
        let start = up_at + Duration::from_secs(5 * bucket as u64);
        if let Some(wait) = start.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let n = (0..40).filter(|_| get(&lab, *next.next().expect("enough clients")) == "backend-1").count();
        shares.push(n);
    }
    eprintln!("new clients on the recovered backend per 5 s bucket (of 40, full share ~13): {shares:?}");
    assert!(shares[0] <= 5, "right after recovery it takes few new clients: {shares:?}");
    assert!(shares[3] >= shares[0] + 4, "its share grows: {shares:?}");
    assert!(shares[0] + shares[1] < shares[2] + shares[3], "over time buckets, not at once: {shares:?}");
    wait_for(&lab, "the ramp to end", Duration::from_secs(10), || state(&lab).balance.is_some_and(|b| b.ramping_percent.is_none()));
    assert!(lab.lb_log().contains("slow start done"), "{}", lab.lb_log_tail(10));
}

/// Hot prefixes: a service pinning clients by /16, every lab client in one /16, which therefore
/// brings all of the service's new connections: once seen, it is split, and new clients spread
/// over the backends by their own address, each staying where it went. The /16's pin stays.
#[test]
fn a_hot_prefix_is_split_and_its_new_clients_spread() {
    let bin = lb_bin();
    let mut lab = Lab::create(LabSpec { clients: 60, backends: 4 }).unwrap_or_else(|e| panic!("{e:#}"));
    let mut cfg = config_with_balance(&lab, "hot_prefix_share = 0.2");
    let web = cfg.find("name = \"web\"").unwrap();
    match cfg[web..].find("[services.affinity]\n").filter(|at| !cfg[web..web + at].contains("[[services]]")) {
        Some(at) => cfg.insert_str(web + at + "[services.affinity]\n".len(), "ipv4_prefix = 16\n"),
        None => cfg = config_with_balance(&lab, "hot_prefix_share = 0.2\n[services.affinity]\nipv4_prefix = 16"),
    }
    lab.write_config(&cfg).unwrap();
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let clients = lab.client_addrs();
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    wait_for(&lab, "the VIP", Duration::from_secs(20), || lab.http_get(clients[0], vip, TIMEOUT).is_ok());
    // The first clients share the /16's pin: one backend.
    let home = get(&lab, clients[0]);
    for c in &clients[1..10] {
        assert_eq!(get(&lab, *c), home, "before any split a /16 sits on one backend");
    }
    let split = |lab: &Lab| {
        let st = status(lab, &bin);
        st.services.iter().find(|s| s.name == "web").unwrap().balance.as_ref().is_some_and(|b| b.split_prefixes.iter().any(|p| p == "10.200.0.0/16"))
    };
    wait_for(&lab, "the /16 to be split", Duration::from_secs(15), || {
        for c in &clients[0..10] {
            let _ = lab.http_get(*c, vip, TIMEOUT);
        }
        split(&lab)
    });
    assert!(lab.lb_log().contains("a hot client prefix brought more than hot_prefix_share"), "{}", lab.lb_log_tail(10));
    let text = String::from_utf8_lossy(&lab.lb_cli(&bin, &["status"]).unwrap().stdout).into_owned();
    assert!(text.contains("hot prefix share 0.2 (split: 10.200.0.0/16)"), "{text}");

    // New clients of the split /16 spread, each sticky.
    let mut placed: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for c in &clients[10..50] {
        placed.insert(*c, get(&lab, *c));
    }
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for b in placed.values() {
        *per_backend.entry(b.as_str()).or_default() += 1;
    }
    eprintln!("40 new clients of the split /16: {per_backend:?} (before the split all went to {home})");
    assert!(per_backend.len() >= 3 && per_backend.get(home.as_str()).copied().unwrap_or(0) <= 20, "{per_backend:?}");
    for (c, b) in &placed {
        assert_eq!(&get(&lab, *c), b, "client {c} moved");
    }
    // The /16's own pin is still there, on its backend.
    let out = lab.lb_cli(&bin, &["affinity", "list", "--service", "web", "--output", "json"]).unwrap();
    let list: lb::api::AffinityList = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("affinity JSON: {e}"));
    let i: u32 = home.strip_prefix("backend-").and_then(|n| n.parse().ok()).unwrap();
    let home_ep = format!("{}:8080", lab.backend_addr(i));
    assert!(list.pins.iter().any(|p| p.client == "10.200.0.0/16" && p.backend == home_ep), "{:?}", list.pins.iter().take(5).collect::<Vec<_>>());
}
