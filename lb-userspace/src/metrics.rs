//! Prometheus metrics on `control.metrics` (loopback by default): `GET /metrics` in the
//! Prometheus text format (0.0.4), rendered at each scrape from the same report as `lb status`,
//! so the two never disagree. Counters end in `_total`, byte counters say `bytes`; every series
//! is prefixed `lb_`.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get};
use lb_common::Counters;
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    api::{CountersReport, StatusReport, endpoint},
    daemon::Shared,
};

type Labels = Vec<(&'static str, String)>;

/// A counter of `Counters`: metric suffix, help, value.
type CounterField = (&'static str, &'static str, fn(&Counters) -> u64);

/// The `lb_service_*` / `lb_backend_*` counters of one `Counters`.
const COUNTERS: [CounterField; 10] = [
    ("packets", "Packets from clients forwarded toward", |c| c.packets),
    ("bytes", "Bytes (whole frames) from clients forwarded toward", |c| c.bytes),
    ("pins_created", "Clients pinned (a new affinity entry from the Maglev table) to", |c| c.new_pins),
    ("pin_hits", "Packets whose client had a live pin, for", |c| c.hits),
    ("pins_expired", "Pins found idle past the timeout or older than max_age (re-selected), for", |c| c.expired),
    ("failovers", "Pins to a backend that could no longer take traffic, re-selected, for", |c| c.failovers),
    ("reply_packets", "Reply packets translated back to the VIP, from", |c| c.reply_packets),
    ("reply_bytes", "Reply bytes translated back to the VIP, from", |c| c.reply_bytes),
    ("connections", "TCP connections given a connection entry (handshake completed) to", |c| c.conns),
    ("connections_moved", "Established connections moved off a backend that is down, removed or force-drained, for", |c| c.moved),
];

/// The verdict codes of `lb_common::stat` that are counted beside the verdict, not as one.
const EVENTS: [&str; 8] = lb_common::stat::EVENT_NAMES;

/// Backend states as `lb status` names them.
const STATES: [&str; 4] = ["up", "down", "draining", "drained"];

fn counter_family(reg: &mut Registry, name: &str, help: String) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge_family_f64(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> {
    let f = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    reg.register(name, help, f.clone());
    f
}

fn set_counters(fams: &[Family<Labels, Counter>], labels: &Labels, c: &CountersReport) {
    for (f, (_, _, get)) in fams.iter().zip(COUNTERS.iter()) {
        f.get_or_create(labels).inc_by(get(c));
    }
}

/// The whole exposition for one status report.
pub fn render(r: &StatusReport) -> String {
    let mut reg = Registry::default();
    let svc_counters: Vec<_> = COUNTERS
        .iter()
        .map(|(n, h, _)| counter_family(&mut reg, &format!("lb_service_{n}"), format!("{h} the service's backends")))
        .collect();
    let be_counters: Vec<_> = COUNTERS
        .iter()
        .map(|(n, h, _)| counter_family(&mut reg, &format!("lb_backend_{n}"), format!("{h} this backend")))
        .collect();
    let svc_pinned = gauge_family(&mut reg, "lb_service_pinned_clients", "Clients (prefixes) with a live pin");
    let svc_rate = gauge_family_f64(&mut reg, "lb_service_pins_created_per_second", "Pins made per second over the last minute");
    let svc_open = gauge_family(&mut reg, "lb_service_fail_open", "1 while every backend is down and the service routes as if all were up");
    let svc_up = gauge_family(&mut reg, "lb_service_backends_up", "Backends taking new clients");
    let be_up = gauge_family(&mut reg, "lb_backend_up", "1 while the backend takes traffic (healthy and not drained)");
    let be_healthy = gauge_family(&mut reg, "lb_backend_healthy", "The health checks' verdict (1 without checks)");
    let be_state = gauge_family(&mut reg, "lb_backend_state", "1 for the backend's current state (up, down, draining, drained)");
    let be_weight = gauge_family(&mut reg, "lb_backend_weight", "Configured weight: share of new clients");
    let be_slots = gauge_family(&mut reg, "lb_backend_maglev_slots", "Slots the backend owns in the live Maglev table");
    let be_pinned = gauge_family(&mut reg, "lb_backend_pinned_clients", "Clients (prefixes) with a live pin to the backend");
    let be_rate = gauge_family_f64(&mut reg, "lb_backend_pins_created_per_second", "Pins made per second over the last minute");
    let be_since = gauge_family(
        &mut reg,
        "lb_backend_state_change_timestamp_seconds",
        "When the backend's state last changed (Unix time)",
    );
    let verdicts = counter_family(&mut reg, "lb_verdicts", "Packets by the datapath's verdict or drop/pass reason".into());
    let events = counter_family(
        &mut reg,
        "lb_datapath_packets",
        "Packets the datapath saw, by kind (to a VIP, reply from a backend, later fragment, ICMP error), counted beside their verdict"
            .into(),
    );
    let moves = counter_family(&mut reg, "lb_client_moves", "Moves of known clients (a pin re-placed onto another backend), by reason".into());
    let past = counter_family(
        &mut reg,
        "lb_placements_past_choice",
        "[services.balance]: clients placed on another backend than plain Maglev would have chosen (over the bound, ramping)".into(),
    );
    let be_load = gauge_family_f64(
        &mut reg,
        "lb_backend_load",
        "[services.balance]: the backend's load, per second of the service's balance.load (packets, bytes or pins)",
    );
    let be_bound = gauge_family_f64(&mut reg, "lb_backend_load_bound", "[services.balance]: the load above which the backend takes no new clients");
    let be_over = gauge_family(&mut reg, "lb_backend_over_bound", "[services.balance]: 1 while the backend is over its load bound (skipped for new clients)");
    let be_ramp = gauge_family(&mut reg, "lb_backend_ramping_percent", "[services.balance]: the share of its weight a backend in slow start takes now (100 when not ramping)");
    let fill = gauge_family(&mut reg, "lb_affinity_entries", "Entries in the affinity table, live or stale (as of the latest pin count)");
    let count_age = gauge_family_f64(
        &mut reg,
        "lb_pin_count_age_seconds",
        "Age of the pin count behind lb_*_pinned_clients and lb_affinity_entries (counted in the background)",
    );
    let count_took = gauge_family_f64(&mut reg, "lb_pin_count_duration_seconds", "How long the latest pin count took");
    let cap = gauge_family(&mut reg, "lb_affinity_capacity", "Capacity of the affinity table (datapath.affinity_entries)");
    let ifaces = gauge_family(&mut reg, "lb_interface_attached", "1 for each interface the XDP program is attached to, with its mode");
    let info = gauge_family(&mut reg, "lb_build_info", "Version of the running lb; always 1");
    let started = gauge_family(&mut reg, "lb_start_time_seconds", "When this daemon started (Unix time)");

    for s in &r.services {
        let sl: Labels = vec![("service", s.name.clone())];
        set_counters(&svc_counters, &sl, &s.counters);
        svc_pinned.get_or_create(&sl).set(s.pinned as i64);
        svc_rate.get_or_create(&sl).set(s.new_pins_per_sec);
        svc_open.get_or_create(&sl).set(s.fail_open as i64);
        svc_up.get_or_create(&sl).set(s.backends.iter().filter(|b| b.state == "up" || b.state == "draining").count() as i64);
        if let Some(b) = &s.balance {
            past.get_or_create(&sl).inc_by(b.placements_past_choice);
        }
        for (reason, n) in &s.moves {
            moves.get_or_create(&vec![("service", s.name.clone()), ("reason", reason.clone())]).inc_by(*n);
        }
        for b in &s.backends {
            let bl: Labels = vec![("service", s.name.clone()), ("backend", endpoint(&b.address, b.port))];
            set_counters(&be_counters, &bl, &b.counters);
            be_up.get_or_create(&bl).set((b.state == "up" || b.state == "draining") as i64);
            be_healthy.get_or_create(&bl).set(b.healthy as i64);
            for st in STATES {
                let mut l = bl.clone();
                l.push(("state", st.to_string()));
                be_state.get_or_create(&l).set((b.state == st) as i64);
            }
            be_weight.get_or_create(&bl).set(b.weight as i64);
            be_slots.get_or_create(&bl).set(b.slots as i64);
            be_pinned.get_or_create(&bl).set(b.pinned as i64);
            be_rate.get_or_create(&bl).set(b.new_pins_per_sec);
            if let Some(t) = unix_secs(&b.since) {
                be_since.get_or_create(&bl).set(t);
            }
            if let Some(bal) = &b.balance {
                be_load.get_or_create(&bl).set(bal.load);
                be_bound.get_or_create(&bl).set(bal.bound.unwrap_or(0.0));
                be_over.get_or_create(&bl).set(bal.over_bound as i64);
                be_ramp.get_or_create(&bl).set(bal.ramping_percent.unwrap_or(100) as i64);
            }
        }
    }
    for (name, v) in &r.stats {
        let fam = if EVENTS.contains(&name.as_str()) { &events } else { &verdicts };
        let key = if EVENTS.contains(&name.as_str()) { "kind" } else { "verdict" };
        fam.get_or_create(&vec![(key, name.clone())]).inc_by(*v);
    }
    fill.get_or_create(&vec![]).set(r.affinity_entries as i64);
    if let (Some(age), Some(took)) = (r.pin_count.age_secs, r.pin_count.took_ms) {
        count_age.get_or_create(&vec![]).set(age);
        count_took.get_or_create(&vec![]).set(took / 1e3);
    }
    cap.get_or_create(&vec![]).set(r.affinity_capacity as i64);
    for i in &r.interfaces {
        ifaces.get_or_create(&vec![("interface", i.name.clone()), ("mode", i.mode.clone())]).set(1);
    }
    info.get_or_create(&vec![("version", r.version.clone())]).set(1);
    if let Some(t) = unix_secs(&r.started) {
        started.get_or_create(&vec![]).set(t);
    }
    let mut out = String::new();
    prometheus_text::encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

fn unix_secs(rfc3339: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs() as i64)
}

async fn metrics(State(d): State<Shared>) -> impl IntoResponse {
    let report = {
        let d = d.lock().unwrap_or_else(|p| p.into_inner());
        d.status()
    };
    match report {
        Ok(r) => (StatusCode::OK, [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], render(&r)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("collecting metrics: {e:#}\n")).into_response(),
    }
}

/// Binds the metrics listener (`control.metrics`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("control.metrics: cannot listen on {addr} (in use by another program? set another address, or \"off\")")
    })
}

/// Serves `GET /metrics` and the status page ([`crate::page`]) until the task is dropped.
pub async fn serve(listener: TcpListener, daemon: Shared) -> Result<()> {
    let app = Router::new().route("/metrics", get(metrics)).merge(crate::page::routes()).with_state(daemon);
    axum::serve(listener, app).await.context("metrics server")
}
