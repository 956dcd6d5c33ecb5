//! Every table and line the CLI prints for people (`--output text`); JSON output is the API's
//! reports as they are.

use std::fmt::Write as _;

use crate::api::{AdminReport, AffinityList, Changes, Explanation, StatusReport, endpoint, human_secs};

/// Renders `lb status` as a readable table.
pub fn render_status(r: &StatusReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "lb {} (pid {}), config {}, started {}{}",
        r.version,
        r.pid,
        r.config,
        r.started,
        if r.adopted { " (adopted the pinned datapath state)" } else { "" }
    );
    let ifs: Vec<String> = r.interfaces.iter().map(|i| format!("{} ({})", i.name, i.mode)).collect();
    let _ = writeln!(o, "forwarding mode: {}; interfaces: {}", r.mode, ifs.join(", "));
    let counted = match (&r.pin_count.age_secs, &r.pin_count.took_ms) {
        (Some(age), Some(took)) => format!("counted {} ago in {took:.0} ms", human_secs(*age)),
        _ => "not counted yet".to_string(),
    };
    let running = if r.pin_count.running { ", a count is running" } else { "" };
    let failed = r.pin_count.error.as_ref().map(|e| format!(", the last count failed: {e}")).unwrap_or_default();
    let _ = writeln!(
        o,
        "affinity table: {} of {} entries ({counted}{running}{failed}); client hash seed {}",
        r.affinity_entries, r.affinity_capacity, r.hash_seed
    );
    if let Some(a) = &r.announce {
        let list = if a.announced.is_empty() { "nothing".to_string() } else { a.announced.join(", ") };
        let _ = writeln!(o, "announcing (kernel table {}, grace {}): {list}", a.table, human_secs(a.grace_secs));
    }
    for s in &r.services {
        let c = &s.counters;
        let prefix = if s.vip.contains(':') { s.ipv6_prefix } else { s.ipv4_prefix };
        let _ = writeln!(
            o,
            "\nservice {} {}/{}  affinity {} /{}  table {}  pinned {} ({:.1} new/s)  packets {} bytes {} pins {} hits {} expired {} failovers {} replies {} connections {} moved {}  client moves {}/min",
            s.name, endpoint(&s.vip, s.port), s.protocol, s.affinity_timeout, prefix, s.table_fingerprint, s.pinned,
            s.new_pins_per_sec, c.packets, c.bytes, c.new_pins, c.hits, c.expired, c.failovers, c.reply_packets, c.conns,
            c.moved, s.moves_per_min
        );
        if s.fail_open {
            let _ = writeln!(o, "  !! every backend is down: FAILING OPEN (routing as if all were up)");
        }
        if let Some(b) = &s.balance {
            let mut parts = Vec::new();
            if let Some(x) = b.load_bound {
                parts.push(format!("load bound {x}x its weighted share of {}/s", b.load));
            }
            if let Some(ss) = &b.slow_start {
                parts.push(format!("slow start {ss}"));
            }
            if let Some(h) = b.hot_prefix_share {
                parts.push(format!(
                    "hot prefix share {h} (split: {})",
                    if b.split_prefixes.is_empty() { "none".to_string() } else { b.split_prefixes.join(", ") }
                ));
            }
            let _ = writeln!(o, "  balance: {}", parts.join(", "));
        }
        let _ = writeln!(
            o,
            "  {:<22} {:>6} {:>8} {:>7} {:>8} {:>7} {:>10} {:>12} {:>8} {:>10}  since / reason",
            "backend", "weight", "state", "slots", "pinned", "new/s", "packets", "bytes", "pins", "replies"
        );
        for b in &s.backends {
            let c = &b.counters;
            let _ = writeln!(
                o,
                "  {:<22} {:>6} {:>8} {:>7} {:>8} {:>7.1} {:>10} {:>12} {:>8} {:>10}  {} {}",
                endpoint(&b.address, b.port),
                b.weight,
                if b.differs_from_config.is_some() { format!("{}*", b.state) } else { b.state.clone() },
                b.slots,
                b.pinned,
                b.new_pins_per_sec,
                c.packets,
                c.bytes,
                c.new_pins,
                c.reply_packets,
                b.since,
                b.reason
            );
            if let (Some(bal), Some(sb)) = (&b.balance, &s.balance) {
                let mut parts = vec![format!("load {:.0} {}/s", bal.load, sb.load)];
                if let Some(bound) = bal.bound {
                    parts.push(format!("bound {bound:.0}"));
                }
                if bal.over_bound {
                    parts.push("OVER BOUND (skipped for new clients)".into());
                }
                if let Some(p) = bal.ramping_percent {
                    parts.push(format!("ramping {p} %"));
                }
                let _ = writeln!(o, "  {:<22} {}", "", parts.join(", "));
            }
        }
    }
    let notes: Vec<String> = r
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(move |b| (s, b)))
        .filter_map(|(s, b)| b.differs_from_config.as_ref().map(|n| format!("  {}/{}: {n}", s.name, endpoint(&b.address, b.port))))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(o, "\n* state set at run time, differing from the config:\n{}", notes.join("\n"));
    }
    if !r.warnings.is_empty() {
        let _ = writeln!(o, "\nwarnings:");
        for w in &r.warnings {
            let _ = writeln!(o, "  !! {w}");
        }
    }
    let stats: Vec<String> = r.stats.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(o, "\nverdicts: {}", if stats.is_empty() { "none yet".into() } else { stats.join(" ") });
    o
}


/// `lb explain` as text.
pub fn render_explanations(v: &[Explanation]) -> String {
    let mut o = String::new();
    for e in v {
        let to = match (&e.backend, &e.backend_state) {
            (Some(b), Some(st)) => format!("{b} ({st})"),
            _ => "nowhere (dropped)".to_string(),
        };
        o.push_str(&format!("client {} -> service {} {} (key {}): {} via {}\n", e.client, e.service, e.vip, e.key, to, e.via));
        o.push_str(&format!("  {}\n", e.reason));
        if e.via == "pin" {
            o.push_str(&format!(
                "  without the pin: Maglev slot {} of {} -> {}\n",
                e.maglev_slot,
                e.maglev_table_size,
                e.maglev_backend.as_deref().unwrap_or("no backend")
            ));
        }
        if !e.history.is_empty() {
            o.push_str("  last moves:\n");
            for m in &e.history {
                o.push_str(&format!("    {}  {} -> {}  {}\n", m.time, m.from, m.to, m.reason));
            }
        }
    }
    o
}

/// `lb affinity list` as a table.
pub fn render_list(l: &AffinityList) -> String {
    let mut o = format!(
        "{} pin(s) matched; the affinity table holds {} of {} entries\n",
        l.matched, l.table_entries, l.table_capacity
    );
    if l.pins.is_empty() {
        return o;
    }
    o.push_str(&format!(
        "{:<12} {:<28} {:<24} {:>8} {:>10} {:>10} {:>12}  {}\n",
        "service", "client", "backend", "state", "age", "idle", "expires in", "live"
    ));
    for p in &l.pins {
        let live = match &p.stale {
            None => "yes".to_string(),
            Some(why) => format!("no: {why}"),
        };
        o.push_str(&format!(
            "{:<12} {:<28} {:<24} {:>8} {:>10} {:>10} {:>12}  {}\n",
            p.service,
            p.client,
            p.backend,
            p.backend_state,
            human_secs(p.age_secs),
            human_secs(p.idle_secs),
            human_secs(p.expires_in_secs),
            live
        ));
    }
    if l.pins.len() < l.matched {
        o.push_str(&format!("... {} more (raise --limit)\n", l.matched - l.pins.len()));
    }
    o
}

/// `lb reload` for people: what changed, a line per kind.
pub fn render_changes(c: &Changes) -> String {
    if c.is_empty() {
        return "reloaded: nothing changed\n".to_string();
    }
    let mut o = String::from("reloaded:\n");
    for (what, list) in [
        ("services added", &c.services_added),
        ("services removed", &c.services_removed),
        ("services changed", &c.services_changed),
        ("backends added", &c.backends_added),
        ("backends removed", &c.backends_removed),
    ] {
        if !list.is_empty() {
            let _ = writeln!(o, "  {what}: {}", list.join(", "));
        }
    }
    if c.pins_flushing {
        let _ = writeln!(o, "  pins of removed services and backends: being deleted in the background (the log says how many)");
    } else if c.pins_flushed > 0 {
        let _ = writeln!(o, "  pins deleted (their service or backend was removed): {}", c.pins_flushed);
    }
    o
}

/// `lb drain` / `lb undrain` as a line (two when the result differs from the config).
pub fn render_backend_change(service: &str, r: &AdminReport, undrain: bool) -> String {
    let b = &r.backend;
    let who = format!("{service}/{}", endpoint(&b.address, b.port));
    let mut o = match (r.changed, undrain, b.state.as_str()) {
        (false, true, _) => format!("{who} is not drained: nothing to undrain (it is {}: {})\n", b.state, b.reason),
        (false, false, _) => format!("{who} was already {}: nothing changed ({})\n", b.state, b.reason),
        (true, true, "down") => format!(
            "{who} is no longer drained, but it is down ({}); it takes new clients once its health checks pass\n",
            b.reason
        ),
        (true, _, _) => format!("{who} is now {} ({})\n", b.state, b.reason),
    };
    if let Some(note) = &b.differs_from_config {
        let _ = writeln!(o, "note: {note}");
    }
    o
}

/// `lb affinity flush` as a line.
pub fn render_flushed(n: usize) -> String {
    format!("flushed {n} pin(s); those clients are placed afresh at their next packet\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_changes_read_as_text_not_json() {
        assert_eq!(render_changes(&Changes::default()), "reloaded: nothing changed\n");
        let c = Changes {
            services_added: vec!["api".into()],
            backends_added: vec!["web/[2001:db8::11]:8080".into(), "web/10.1.0.12:8080".into()],
            backends_removed: vec!["web/10.1.0.13:8080".into()],
            pins_flushing: true,
            ..Default::default()
        };
        let text = render_changes(&c);
        assert_eq!(
            text,
            "reloaded:\n  services added: api\n  backends added: web/[2001:db8::11]:8080, web/10.1.0.12:8080\n  backends removed: web/10.1.0.13:8080\n  pins of removed services and backends: being deleted in the background (the log says how many)\n"
        );
        assert!(!text.contains('{') && !text.contains('"'), "{text}");
        let flushed = Changes { services_removed: vec!["old".into()], pins_flushed: 3, ..Default::default() };
        assert_eq!(render_changes(&flushed), "reloaded:\n  services removed: old\n  pins deleted (their service or backend was removed): 3\n");
    }

    fn backend(state: &str, reason: &str) -> crate::api::BackendReport {
        crate::api::BackendReport {
            id: 1,
            address: "2001:db8::11".into(),
            port: 8080,
            weight: 1,
            state: state.into(),
            healthy: state != "down",
            admin: crate::api::Admin::Active,
            since: "2026-12-04T00:00:00Z".into(),
            reason: reason.into(),
            slots: 0,
            pinned: 0,
            new_pins_per_sec: 0.0,
            moves_per_min: 0,
            counters: Default::default(),
            config_state: "active".into(),
            differs_from_config: None,
            balance: None,
        }
    }

    #[test]
    fn drain_and_undrain_say_what_happened() {
        let up = AdminReport { backend: backend("up", "health check: ok"), changed: false };
        assert_eq!(
            render_backend_change("web", &up, true),
            "web/[2001:db8::11]:8080 is not drained: nothing to undrain (it is up: health check: ok)\n"
        );
        let again = AdminReport { backend: backend("draining", "drained by lb drain"), changed: false };
        assert!(render_backend_change("web", &again, false).contains("was already draining: nothing changed"));
        let mut b = backend("draining", "drained by lb drain");
        b.differs_from_config = Some("draining (lb drain) at run time, but the config says state = \"active\"".into());
        let text = render_backend_change("web", &AdminReport { backend: b, changed: true }, false);
        assert!(text.starts_with("web/[2001:db8::11]:8080 is now draining (drained by lb drain)\nnote: draining"), "{text}");
        let down = AdminReport { backend: backend("down", "health check: refused"), changed: true };
        assert!(render_backend_change("web", &down, true).contains("no longer drained, but it is down"));
    }

    #[test]
    fn changes_summarise_on_one_line() {
        assert_eq!(Changes::default().summary(), "nothing changed");
        let c = Changes { backends_removed: vec!["web/10.1.0.13:8080".into()], pins_flushed: 6, ..Default::default() };
        assert_eq!(c.summary(), "1 backend removed (web/10.1.0.13:8080); 6 pins deleted (their service or backend was removed)");
        assert!(!c.keeps_every_pin());
        let added = Changes { services_added: vec!["a".into(), "b".into()], ..Default::default() };
        assert_eq!(added.summary(), "2 services added (a, b)");
        assert!(added.keeps_every_pin());
    }
}
