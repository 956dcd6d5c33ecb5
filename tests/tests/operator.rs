//! The operator's tools end to end, against the real `lb` in the namespace lab: `lb status`,
//! `lb explain`, `lb affinity list` / `flush` (text and JSON), the Prometheus metrics (parsed
//! with a Prometheus text-format parser and checked against the traffic sent), JSON logs and the
//! control socket's permissions. Run as root by `cargo xtask test`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use lb::api::{AffinityList, Explanation, FlushReport};
use lb::api::StatusReport;
use tests::lb_bin;
use xtask::lab::{Lab, LabSpec, VIP_HTTP_PORT, VIP_UDP_PORT};

const TIMEOUT: Duration = Duration::from_secs(3);

fn fail(lab: &Lab, msg: &str) -> ! {
    panic!("{msg}\n--- last 40 lines of {} ---\n{}\n---", lab.log_path().display(), lab.lb_log_tail(40))
}

fn started_lab(clients: u32, backends: u32, bin: &Path) -> Lab {
    let mut lab = Lab::create(LabSpec { clients, backends }).unwrap_or_else(|e| panic!("{e:#}"));
    lab.start_lb(bin).unwrap_or_else(|e| panic!("{e:#}"));
    lab
}

/// `lb <args>`: its stdout, asserting success.
fn cli(lab: &Lab, bin: &Path, args: &[&str]) -> String {
    let out = lab.lb_cli(bin, args).unwrap_or_else(|e| panic!("{e:#}"));
    if !out.status.success() {
        fail(lab, &format!("lb {}: {}\n{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr)));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `lb <args> --output json`, decoded.
fn cli_json<T: serde::de::DeserializeOwned>(lab: &Lab, bin: &Path, args: &[&str]) -> T {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = cli(lab, bin, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("lb {}: JSON: {e}:\n{out}", all.join(" ")))
}

/// `lb <args>` that must fail: its stderr.
fn cli_err(lab: &Lab, bin: &Path, args: &[&str]) -> String {
    let out = lab.lb_cli(bin, args).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!out.status.success(), "lb {} succeeded:\n{}", args.join(" "), String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// "backend-N" (a backend's answer) -> its HTTP endpoint as lb names it.
fn http_endpoint(lab: &Lab, body: &str) -> String {
    let i: u32 = body.trim().strip_prefix("backend-").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("answer {body:?}"));
    SocketAddrV4::new(lab.backend_addr(i), lab.backend_ports().0).to_string()
}

fn get(lab: &Lab, client: Ipv4Addr) -> String {
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    lab.http_get(client, vip, TIMEOUT).unwrap_or_else(|e| fail(lab, &format!("{e:#}")))
}

/// Waits until the VIP answers (the first health checks may still be settling).
fn warm_up(lab: &Lab) {
    let probe = Ipv4Addr::new(10, 200, 1, 2);
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    let t = Instant::now();
    while lab.http_get(probe, vip, TIMEOUT).is_err() {
        if t.elapsed() > Duration::from_secs(15) {
            fail(lab, "the VIP never answered");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn web_packets(lab: &Lab, bin: &Path) -> (u64, u64) {
    let st: StatusReport = cli_json(lab, bin, &["status"]);
    let web = st.services.iter().find(|s| s.name == "web").expect("service web");
    (web.counters.packets, web.counters.new_pins)
}

#[test]
fn explain_predicts_the_backend_and_changes_nothing() {
    let bin = lb_bin();
    let lab = started_lab(4, 3, &bin);
    warm_up(&lab);
    let clients = lab.client_addrs();
    let c = clients[0].to_string();

    // Before any traffic from the client: Maglev's pick, and nothing sent or pinned by asking.
    let before = web_packets(&lab, &bin);
    let e: Vec<Explanation> = cli_json(&lab, &bin, &["explain", &c, "--service", "web"]);
    assert_eq!(e.len(), 1, "{e:?}");
    let e = &e[0];
    assert_eq!((e.via.as_str(), e.pin.is_none()), ("maglev", true), "{e:?}");
    assert_eq!(e.key, c);
    assert!(e.maglev_slot < e.maglev_table_size);
    let predicted = e.backend.clone().expect("a backend");
    assert_eq!(e.maglev_backend.as_ref(), Some(&predicted));
    assert_eq!(e.backend_state.as_deref(), Some("up"));
    assert_eq!(web_packets(&lab, &bin), before, "explain must send no traffic");
    let l: AffinityList = cli_json(&lab, &bin, &["affinity", "list", "--service", "web"]);
    assert!(l.pins.iter().all(|p| p.client != c), "explain must not pin: {l:?}");
    // Without --service: every IPv4 service (web and dns).
    let all: Vec<Explanation> = cli_json(&lab, &bin, &["explain", &c]);
    assert_eq!(all.iter().map(|e| e.service.as_str()).collect::<Vec<_>>(), ["web", "dns"]);

    // Traffic goes where explain said, and pins it.
    let body = get(&lab, clients[0]);
    assert_eq!(http_endpoint(&lab, &body), predicted, "explain predicted {predicted}, the client reached {body}");
    let e: Vec<Explanation> = cli_json(&lab, &bin, &["explain", &c, "--service", "web"]);
    let e = &e[0];
    assert_eq!(e.via, "pin", "{e:?}");
    assert_eq!(e.backend.as_ref(), Some(&predicted));
    let pin = e.pin.as_ref().expect("a pin");
    assert!(pin.live && pin.age_secs < 60.0 && pin.expires_in_secs > 29.0 * 60.0, "{pin:?}");
    let text = cli(&lab, &bin, &["explain", &c, "--service", "web"]);
    assert!(text.contains(&format!("{predicted} (up) via pin")) && text.contains("pinned") && text.contains("Maglev slot"), "{text}");

    // Draining keeps the pin (and says so); a forced drain moves the client at its next packet.
    // The drain reports the latest background pin count: make sure it has counted this pin.
    let _: StatusReport = cli_json(&lab, &bin, &["status", "--fresh"]);
    let b: lb::api::BackendReport = cli_json(&lab, &bin, &["drain", "web", &predicted]);
    assert!(b.state == "draining" && b.pinned >= 1, "{b:?}");
    let e: Vec<Explanation> = cli_json(&lab, &bin, &["explain", &c, "--service", "web"]);
    assert_eq!((e[0].via.as_str(), e[0].backend_state.as_deref()), ("pin", Some("draining")), "{:?}", e[0]);
    cli(&lab, &bin, &["drain", "web", &predicted, "--force"]);
    let e: Vec<Explanation> = cli_json(&lab, &bin, &["explain", &c, "--service", "web"]);
    let e = &e[0];
    assert_eq!(e.via, "maglev", "{e:?}");
    assert_ne!(e.backend.as_ref(), Some(&predicted), "a drained backend takes no client: {e:?}");
    let stale = e.pin.as_ref().and_then(|p| p.stale.clone()).unwrap_or_default();
    assert!(stale.contains("drained"), "{e:?}");
    let moved_to = e.backend.clone().unwrap();
    assert_eq!(http_endpoint(&lab, &get(&lab, clients[0])), moved_to, "the client went where explain said");
    let text = cli(&lab, &bin, &["undrain", "web", &predicted]);
    assert!(text.contains(&format!("web/{predicted} is now up")), "{text}");
    let ch: lb::api::Changes = cli_json(&lab, &bin, &["reload"]);
    assert!(ch.is_empty(), "an unchanged config reloads to no change: {ch:?}");

    // Bad input: one clear line, no crash.
    assert!(cli_err(&lab, &bin, &["explain", "10.0.0.300"]).contains("not an IP address"));
    assert!(cli_err(&lab, &bin, &["explain", &c, "--service", "nope"]).contains("no service named \"nope\""));
    assert!(cli_err(&lab, &bin, &["explain", "2001:db8::1"]).contains("no IPv6 service"));
}

#[test]
fn affinity_list_and_flush() {
    let bin = lb_bin();
    let lab = started_lab(9, 3, &bin);
    warm_up(&lab);
    let clients = lab.client_addrs();
    let mut reached: BTreeMap<String, String> = BTreeMap::new();
    for c in &clients {
        reached.insert(c.to_string(), http_endpoint(&lab, &get(&lab, *c)));
    }
    let udp_vip = SocketAddrV4::new(lab.vip(), VIP_UDP_PORT);
    lab.udp_query(clients[0], udp_vip, TIMEOUT).unwrap_or_else(|e| fail(&lab, &format!("{e:#}")));

    let l: AffinityList = cli_json(&lab, &bin, &["affinity", "list", "--service", "web"]);
    assert_eq!(l.matched, clients.len() + 1, "our clients and the warm-up probe: {l:?}");
    assert_eq!(l.table_capacity, 65536);
    assert!(l.table_entries >= clients.len() + 2, "web pins, the probe's and the dns pin: {l:?}");
    for p in &l.pins {
        if let Some(b) = reached.get(&p.client) {
            assert_eq!((&p.backend, p.live, p.backend_state.as_str()), (b, true, "up"), "{p:?}");
        }
    }
    let dns: AffinityList = cli_json(&lab, &bin, &["affinity", "list", "--service", "dns"]);
    assert_eq!(dns.pins.iter().map(|p| p.client.clone()).collect::<Vec<_>>(), [clients[0].to_string()]);

    let (target, target_clients): (String, Vec<String>) = {
        let b = reached.values().next().unwrap().clone();
        (b.clone(), reached.iter().filter(|(_, v)| **v == b).map(|(k, _)| k.clone()).collect())
    };
    let by_backend: AffinityList = cli_json(&lab, &bin, &["affinity", "list", "--service", "web", "--backend", &target]);
    // (The warm-up probe's pin may be there too.)
    let mut listed: Vec<String> =
        by_backend.pins.iter().map(|p| p.client.clone()).filter(|c| reached.contains_key(c)).collect();
    listed.sort();
    let mut want = target_clients.clone();
    want.sort();
    assert_eq!(listed, want, "pins to {target}");
    let limited: AffinityList = cli_json(&lab, &bin, &["affinity", "list", "--limit", "2"]);
    assert_eq!(limited.pins.len(), 2);
    assert!(limited.matched > 2);
    let text = cli(&lab, &bin, &["affinity", "list", "--service", "web"]);
    assert!(text.contains(&format!("{} pin(s) matched", clients.len() + 1)) && text.contains("expires in"), "{text}");
    assert!(text.contains(&clients[1].to_string()), "{text}");

    // One client's pins (here: web and dns).
    let r: FlushReport = cli_json(&lab, &bin, &["affinity", "flush", &clients[0].to_string()]);
    assert_eq!(r.flushed, 2);
    let l: AffinityList = cli_json(&lab, &bin, &["affinity", "list"]);
    assert!(l.pins.iter().all(|p| p.client != clients[0].to_string()), "{l:?}");
    let e: Vec<Explanation> = cli_json(&lab, &bin, &["explain", &clients[0].to_string(), "--service", "web"]);
    assert_eq!(e[0].via, "maglev");
    // One backend's.
    let there: AffinityList = cli_json(&lab, &bin, &["affinity", "list", "--backend", &target, "--service", "web"]);
    assert!(there.matched >= target_clients.iter().filter(|c| **c != clients[0].to_string()).count());
    let out = cli(&lab, &bin, &["affinity", "flush", "--backend", &target, "--service", "web"]);
    assert!(out.contains(&format!("flushed {} pin(s)", there.matched)), "{out}");
    let l: AffinityList = cli_json(&lab, &bin, &["affinity", "list", "--backend", &target]);
    assert_eq!(l.matched, 0, "{l:?}");
    // Everything.
    let left: AffinityList = cli_json(&lab, &bin, &["affinity", "list"]);
    let r: FlushReport = cli_json(&lab, &bin, &["affinity", "flush", "--all"]);
    assert_eq!(r.flushed, left.matched, "{r:?}");
    let l: AffinityList = cli_json(&lab, &bin, &["affinity", "list"]);
    assert_eq!((l.matched, l.table_entries), (0, 0));
    // Traffic after a flush: the same backends again (Maglev), new pins.
    for c in &clients {
        assert_eq!(&http_endpoint(&lab, &get(&lab, *c)), &reached[&c.to_string()], "client {c} after the flush");
    }

    assert!(cli_err(&lab, &bin, &["affinity", "flush"]).contains("name what to flush"));
    assert!(cli_err(&lab, &bin, &["affinity", "flush", "--backend", "10.9.9.9:1"]).contains("no backend 10.9.9.9:1"));
    assert!(cli_err(&lab, &bin, &["affinity", "list", "--backend", "nonsense"]).contains("ADDRESS:PORT"));
}

#[test]
fn status_shows_pinned_clients_rates_and_the_table() {
    let bin = lb_bin();
    let lab = started_lab(12, 3, &bin);
    warm_up(&lab);
    let clients = lab.client_addrs();
    let mut per_backend: BTreeMap<String, u64> = BTreeMap::new();
    for c in &clients {
        *per_backend.entry(http_endpoint(&lab, &get(&lab, *c))).or_default() += 1;
    }
    // Pins are counted in the background: --fresh waits for a count begun after this call.
    let st: StatusReport = cli_json(&lab, &bin, &["status", "--fresh"]);
    assert!(st.pin_count.counted_at.is_some() && st.pin_count.age_secs.is_some_and(|a| a < 60.0), "{:?}", st.pin_count);
    let web = st.services.iter().find(|s| s.name == "web").unwrap();
    // The warm-up probe client is pinned too.
    assert_eq!(web.pinned, clients.len() as u64 + 1, "{web:?}");
    assert_eq!(web.backends.iter().map(|b| b.pinned).sum::<u64>(), web.pinned);
    for b in &web.backends {
        let ours = per_backend.get(&format!("{}:{}", b.address, b.port)).copied().unwrap_or(0);
        assert!(b.pinned == ours || b.pinned == ours + 1, "backend {}: {} pinned, {ours} of our clients", b.address, b.pinned);
    }
    assert!(web.new_pins_per_sec > 0.0, "{web:?}");
    assert!(st.affinity_entries as u64 >= web.pinned && st.affinity_capacity == 65536, "{st:?}");
    assert!(web.backends.iter().all(|b| b.state == "up" && !b.since.is_empty() && !b.reason.is_empty()));
    assert!(st.interfaces.iter().all(|i| i.mode == "native" || i.mode == "generic"));
    let text = cli(&lab, &bin, &["status"]);
    assert!(text.contains("pinned") && text.contains("new/s") && text.contains("affinity table:"), "{text}");
    assert!(text.contains(&format!("pinned {}", web.pinned)), "{text}");
    assert_eq!(st.mode, "nat", "{st:?}");
    assert!(text.contains("forwarding mode: nat;"), "{text}");
}

/// Scrapes `GET /metrics` inside the balancer's namespace (where it listens on loopback).
fn scrape(lab: &Lab) -> (String, prometheus_parse::Scrape) {
    // curl undoes the chunked transfer encoding and prints the head (-D -) before the body.
    let raw = xtask::lab::in_netns(lab.ns_lb(), || {
        std::process::Command::new("curl").args(["-sS", "--max-time", "10", "-D", "-", "http://127.0.0.1:9940/metrics"]).output()
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_else(|e| fail(lab, &format!("scraping 127.0.0.1:9940 in {}: {e}", lab.ns_lb())));
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP:\n{raw}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let body = body.to_string();
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not the Prometheus text format: {e}\n{body}"));
    (body, parsed)
}

/// The value of the one sample `metric` with these labels.
fn value(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{metric} is not a plain sample"),
        })
        .collect();
    assert_eq!(found.len(), 1, "{metric}{labels:?}: {found:?}");
    found[0]
}

fn sum(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn metrics_match_the_traffic() {
    let bin = lb_bin();
    let lab = started_lab(6, 3, &bin);
    let clients = lab.client_addrs();
    // UDP to the dns service: one datagram each way per query, so the counts are exact.
    let udp_vip = SocketAddrV4::new(lab.vip(), VIP_UDP_PORT);
    let per_client = 5;
    let mut per_backend: BTreeMap<String, f64> = BTreeMap::new();
    for c in &clients {
        for _ in 0..per_client {
            let (body, from) = lab.udp_query(*c, udp_vip, TIMEOUT).unwrap_or_else(|e| fail(&lab, &format!("{e:#}")));
            assert_eq!(from, SocketAddr::V4(udp_vip), "replies come from the VIP");
            let i: u32 = body.trim().trim_start_matches("backend-").parse().unwrap_or_else(|_| panic!("answer {body:?}"));
            *per_backend.entry(SocketAddrV4::new(lab.backend_addr(i), lab.backend_ports().1).to_string()).or_default() += 1.0;
        }
    }
    let sent = (clients.len() * per_client) as f64;
    // The metrics show the latest background pin count: have one counted after the traffic.
    let _: StatusReport = cli_json(&lab, &bin, &["status", "--fresh"]);
    let (text, m) = scrape(&lab);
    let dns = [("service", "dns")];
    assert_eq!(value(&m, "lb_service_packets_total", &dns), sent, "{text}");
    assert_eq!(value(&m, "lb_service_reply_packets_total", &dns), sent);
    assert_eq!(value(&m, "lb_service_pins_created_total", &dns), clients.len() as f64);
    assert_eq!(value(&m, "lb_service_pin_hits_total", &dns), sent - clients.len() as f64);
    assert_eq!(value(&m, "lb_service_pinned_clients", &dns), clients.len() as f64);
    assert_eq!(value(&m, "lb_service_fail_open", &dns), 0.0);
    assert!(value(&m, "lb_service_bytes_total", &dns) >= sent * 42.0, "at least the frame headers");
    for (backend, n) in &per_backend {
        let l = [("service", "dns"), ("backend", backend.as_str())];
        assert_eq!(value(&m, "lb_backend_packets_total", &l), *n, "{backend}");
        assert_eq!(value(&m, "lb_backend_reply_packets_total", &l), *n, "{backend}");
        assert_eq!(value(&m, "lb_backend_up", &l), 1.0);
        assert_eq!(value(&m, "lb_backend_state", &[("service", "dns"), ("backend", backend.as_str()), ("state", "up")]), 1.0);
        assert_eq!(value(&m, "lb_backend_state", &[("service", "dns"), ("backend", backend.as_str()), ("state", "down")]), 0.0);
        assert_eq!(value(&m, "lb_backend_weight", &l), 100.0);
    }
    assert_eq!(sum(&m, "lb_backend_pinned_clients", &dns), clients.len() as f64);
    assert_eq!(sum(&m, "lb_backend_maglev_slots", &dns), 65537.0);
    assert_eq!(value(&m, "lb_datapath_packets_total", &[("kind", "to_vip")]), sent, "no TCP has been sent yet");
    assert!(value(&m, "lb_datapath_packets_total", &[("kind", "reply")]) >= sent);
    assert!(value(&m, "lb_verdicts_total", &[("verdict", "redirect")]) + value(&m, "lb_verdicts_total", &[("verdict", "pass_fib")]) >= 2.0 * sent);
    assert!(value(&m, "lb_affinity_entries", &[]) >= clients.len() as f64);
    assert_eq!(value(&m, "lb_affinity_capacity", &[]), 65536.0);
    assert_eq!(value(&m, "lb_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(value(&m, "lb_start_time_seconds", &[]) > 1.7e9);
    for i in lab.interfaces() {
        assert_eq!(sum(&m, "lb_interface_attached", &[("interface", i.as_str())]), 1.0, "{i}");
    }
    // Typed and documented, as Prometheus expects.
    assert!(text.contains("# TYPE lb_service_packets_total counter"), "{text}");
    assert!(text.contains("# TYPE lb_backend_up gauge") && text.contains("# HELP lb_backend_pinned_clients "), "{text}");
    assert!(m.samples.iter().all(|s| s.metric.starts_with("lb_")));

    // Only on loopback: the balancer's own addresses do not answer on the metrics port.
    let refused = xtask::lab::in_netns(lab.ns_client(), || {
        std::net::TcpStream::connect_timeout(&"10.200.1.1:9940".parse().unwrap(), Duration::from_secs(1)).is_err()
    })
    .unwrap();
    assert!(refused, "metrics reachable from the client network");
}

#[test]
fn json_logs_record_every_state_change_and_the_socket_is_root_only() {
    let bin = lb_bin();
    let mut lab = Lab::create(LabSpec { clients: 2, backends: 2 }).unwrap_or_else(|e| panic!("{e:#}"));
    lab.set_lb_args(&["--log-format", "json"]);
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let mode = std::fs::metadata(lab.socket_path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    let b1 = SocketAddrV4::new(lab.backend_addr(1), lab.backend_ports().0).to_string();
    cli(&lab, &bin, &["drain", "web", &b1]);
    cli(&lab, &bin, &["undrain", "web", &b1]);
    cli(&lab, &bin, &["affinity", "flush", "--all"]);
    lab.stop_lb().unwrap_or_else(|e| panic!("{e:#}"));
    let log = lab.lb_log();
    let records: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}\n{log}")))
        .collect();
    let find = |msg: &str| -> Vec<&serde_json::Value> {
        records.iter().filter(|r| r["fields"]["message"].as_str().is_some_and(|m| m.contains(msg))).collect()
    };
    for msg in ["attached XDP", "lb running", "backend state changed", "affinity pins flushed", "SIGTERM: stopping"] {
        let found = find(msg);
        assert!(!found.is_empty(), "no {msg:?} record in:\n{log}");
        assert!(found.iter().all(|r| r["level"] == "INFO"), "{msg:?} not at info: {found:?}");
    }
    let changes = find("backend state changed");
    assert_eq!(changes.len(), 2, "drain and undrain: {changes:?}");
    assert_eq!(changes[0]["fields"]["state"], "draining");
    assert_eq!(changes[1]["fields"]["state"], "up");
}
