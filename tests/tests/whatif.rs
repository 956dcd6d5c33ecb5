//! What-if end to end against the real `lb` in the namespace lab: `lb reload --dry-run`, `lb
//! drain --dry-run` and `lb simulate down` change nothing, and the dry run's `pins_moved` is what
//! the real reload then moves (compared through `lb affinity list` before and after), and the
//! journal names those clients (`backend_removed`). Run as root by `cargo xtask test`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use lb::api::{AffinityList, MoveRecord, StatusReport, WhatIf};
use tests::lb_bin;
use xtask::lab::{Lab, LabSpec};

fn json<T: serde::de::DeserializeOwned>(lab: &Lab, bin: &Path, args: &[&str]) -> T {
    let out = lab.lb_cli(bin, args).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.status.success(), "lb {args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), lab.lb_log_tail(20));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("lb {args:?} JSON: {e}\n{}", String::from_utf8_lossy(&out.stdout)))
}

/// The web service's pins: client -> backend.
fn pins(lab: &Lab, bin: &Path) -> BTreeMap<String, String> {
    let l: AffinityList = json(lab, bin, &["affinity", "list", "--service", "web", "--output", "json"]);
    l.pins.into_iter().map(|p| (p.client, p.backend)).collect()
}

fn fingerprint(lab: &Lab, bin: &Path) -> Vec<String> {
    let st: StatusReport = json(lab, bin, &["status", "--output", "json"]);
    st.services.iter().map(|s| format!("{} {}", s.name, s.table_fingerprint)).collect()
}

#[test]
fn dry_runs_change_nothing_and_predict_the_moves() {
    let bin = lb_bin();
    let mut lab = Lab::create(LabSpec { clients: 30, backends: 3 }).unwrap_or_else(|e| panic!("{e:#}"));
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    tests::every_client_once(&lab);
    let before = pins(&lab, &bin);
    assert!(before.len() >= 30, "{before:?}");
    let tables = fingerprint(&lab, &bin);
    let b3 = format!("{}:8080", lab.backend_addr(3));
    let b1 = format!("{}:8080", lab.backend_addr(1));
    let on = |b: &str| before.values().filter(|x| *x == b).count() as u64;

    // Simulated death and drains: the backend's pins, the slot shares; nothing changes.
    let down: WhatIf = json(&lab, &bin, &["simulate", "down", "web", &b1, "--output", "json"]);
    assert_eq!(down.pins_moved, on(&b1), "{down:?}");
    let share = down.services[0].slot_share_moved;
    assert!((share - 1.0 / 3.0).abs() < 0.05, "about a third of the slots were b1's: {share}");
    let drain: WhatIf = json(&lab, &bin, &["drain", "web", &b1, "--dry-run", "--output", "json"]);
    assert_eq!((drain.pins_moved, drain.action.as_str()), (0, "drain"), "a drain keeps pins: {drain:?}");
    let force: WhatIf = json(&lab, &bin, &["drain", "web", &b1, "--force", "--dry-run", "--output", "json"]);
    assert_eq!(force.pins_moved, on(&b1), "{force:?}");
    let text = String::from_utf8_lossy(&lab.lb_cli(&bin, &["simulate", "down", "web", &b1]).unwrap().stdout).into_owned();
    assert!(text.starts_with("dry run of down: nothing was changed") && text.contains("live pin(s) would move"), "{text}");

    // A reload without b3, dry first.
    let cfg = lab.render_config_with(&lab.interfaces(), lab.options());
    let cut = tests::config_without_backend(&cfg, &lab.backend_addr(3).to_string());
    lab.write_config(&cut).unwrap();
    let dry: WhatIf = json(&lab, &bin, &["reload", "--dry-run", "--output", "json"]);
    let web = dry.services.iter().find(|s| s.service == "web").expect("web in the dry run");
    assert_eq!(web.backends_removed, std::slice::from_ref(&b3), "{dry:?}");
    assert_eq!(web.pins_moved, on(&b3), "{dry:?}");
    assert!((web.slot_share_moved - 1.0 / 3.0).abs() < 0.05, "{dry:?}");
    assert_eq!(pins(&lab, &bin), before, "a dry run moves no pin");
    assert_eq!(fingerprint(&lab, &bin), tables, "a dry run changes no table");
    let text = String::from_utf8_lossy(&lab.lb_cli(&bin, &["reload", "--dry-run"]).unwrap().stdout).into_owned();
    assert!(text.contains("dry run of reload: nothing was changed") && text.contains(&format!("backends removed {b3}")), "{text}");

    // The real reload moves exactly that many of web's pins.
    let out = lab.lb_cli(&bin, &["reload"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = std::time::Instant::now();
    let after = loop {
        let a = pins(&lab, &bin);
        if !a.values().any(|b| *b == b3) || t.elapsed() > Duration::from_secs(10) {
            break a;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let moved = before.iter().filter(|(c, b)| after.get(*c) != Some(*b)).count() as u64;
    assert_eq!(moved, web.pins_moved, "the dry run said {} would move; {moved} did", web.pins_moved);
    assert!(moved > 0, "b3 held pins: {before:?}");
    // And the journal names each of those clients, moved off b3 by its removal.
    let gone: std::collections::BTreeSet<String> = before.iter().filter(|(c, b)| after.get(*c) != Some(*b)).map(|(c, _)| c.clone()).collect();
    let t = std::time::Instant::now();
    let journal = loop {
        let out = lab.lb_cli(&bin, &["events", "--service", "web", "--output", "json"]).unwrap();
        let j: Vec<MoveRecord> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
        if j.len() >= gone.len() || t.elapsed() > Duration::from_secs(5) {
            break j;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(journal.iter().map(|e| e.client.clone()).collect::<std::collections::BTreeSet<_>>(), gone, "{journal:?}");
    assert!(journal.iter().all(|e| e.reason == "backend_removed" && e.from == b3 && e.to == "(placed afresh)"), "{journal:?}");
}
