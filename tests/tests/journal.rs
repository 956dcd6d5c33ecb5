//! The journal of moves end to end against the real `lb` in the namespace lab: a failover leaves
//! exactly the dead backend's clients in the journal, with `backend_down`; `lb events --follow`
//! streams a move as it happens; `lb explain` shows a client's history; the status and the
//! metrics count the moves. Run as root by `cargo xtask test`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb::api::{AffinityList, Explanation, MoveRecord, StatusReport};
use tests::lb_bin;
use xtask::lab::{Lab, LabSpec};

fn out(lab: &Lab, bin: &Path, args: &[&str]) -> String {
    let o = lab.lb_cli(bin, args).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(o.status.success(), "lb {args:?}: {}\n{}", String::from_utf8_lossy(&o.stderr), lab.lb_log_tail(20));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn events(lab: &Lab, bin: &Path) -> Vec<MoveRecord> {
    out(lab, bin, &["events", "--service", "web", "--output", "json"]).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[test]
fn a_failover_journals_exactly_the_dead_backends_clients() {
    let bin = lb_bin();
    let mut lab = Lab::create(LabSpec { clients: 30, backends: 3 }).unwrap_or_else(|e| panic!("{e:#}"));
    // The journal also goes to a file (JSON lines, capped).
    let file = lab.dir().join("moves.jsonl");
    let cfg = lab.render_config_with(&lab.interfaces(), lab.options());
    let cfg = cfg.replacen("[control]\n", &format!("[control]\njournal = \"{}\"\njournal_max_size = 65536\n", file.display()), 1);
    assert!(cfg.contains("journal_max_size"), "the lab's config has a [control] table");
    lab.write_config(&cfg).unwrap();
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let (vip, clients) = tests::every_client_once(&lab);
    let list: AffinityList = serde_json::from_str(&out(&lab, &bin, &["affinity", "list", "--service", "web", "--output", "json"])).unwrap();
    let before: BTreeMap<String, String> = list.pins.into_iter().map(|p| (p.client, p.backend)).collect();
    let b1 = format!("{}:8080", lab.backend_addr(1));
    let of_b1: BTreeSet<String> = clients.iter().map(|c| c.to_string()).filter(|c| before.get(c) == Some(&b1)).collect();
    assert!(!of_b1.is_empty(), "b1 holds some of the clients: {before:?}");
    assert!(events(&lab, &bin).is_empty(), "no move yet");

    // b1 dies; every client comes back.
    lab.stop_backend(1).unwrap_or_else(|e| panic!("{e:#}"));
    let t = Instant::now();
    loop {
        let st: StatusReport = serde_json::from_str(&out(&lab, &bin, &["status", "--output", "json"])).unwrap();
        if st.services.iter().any(|s| s.name == "web" && s.backends.iter().any(|b| b.state == "down")) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "b1 never went down");
        std::thread::sleep(Duration::from_millis(200));
    }
    for c in &clients {
        lab.http_get(*c, vip, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{c}: {e:#}"));
    }
    let t = Instant::now();
    let journal = loop {
        let j = events(&lab, &bin);
        if j.len() >= of_b1.len() || t.elapsed() > Duration::from_secs(5) {
            break j;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let moved: BTreeSet<String> = journal.iter().map(|e| e.client.clone()).collect();
    assert_eq!(moved, of_b1, "exactly b1's clients moved: {journal:?}");
    assert!(journal.iter().all(|e| e.reason == "backend_down" && e.from == b1 && e.to != b1), "{journal:?}");
    let written: Vec<MoveRecord> = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|m: &MoveRecord| m.service == "web")
        .collect();
    assert_eq!(written, journal, "the file holds the same moves");
    let text = out(&lab, &bin, &["events", "--service", "web"]);
    assert!(text.contains("backend_down") && text.contains(&format!("{b1} -> ")), "{text}");
    // explain shows a moved client's history; status and metrics count the moves.
    let one = of_b1.iter().next().unwrap();
    let e: Vec<Explanation> = serde_json::from_str(&out(&lab, &bin, &["explain", one, "--service", "web", "--output", "json"])).unwrap();
    assert!(e[0].history.iter().any(|m| m.reason == "backend_down" && m.from == b1), "{:?}", e[0]);
    assert!(out(&lab, &bin, &["explain", one, "--service", "web"]).contains("last moves:"));
    let st: StatusReport = serde_json::from_str(&out(&lab, &bin, &["status", "--output", "json"])).unwrap();
    let web = st.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.moves.get("backend_down").copied(), Some(of_b1.len() as u64), "{:?}", web.moves);
    let metrics = xtask::lab::in_netns(lab.ns_lb(), || {
        Command::new("curl").args(["-sS", "--max-time", "10", "http://127.0.0.1:9940/metrics"]).output()
    })
    .unwrap()
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap();
    let want = format!("lb_client_moves_total{{service=\"web\",reason=\"backend_down\"}} {}", of_b1.len());
    assert!(metrics.contains(&want), "{want} in:\n{}", metrics.lines().filter(|l| l.contains("moves")).collect::<Vec<_>>().join("\n"));

    // --follow streams a move as it happens: a forced drain of b2, its clients come back.
    let b2 = format!("{}:8080", lab.backend_addr(2));
    let mut follow = Command::new(&bin)
        .arg("--socket")
        .arg(lab.socket_path())
        .args(["events", "--follow", "--service", "web", "--output", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("lb events --follow");
    let lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    // What was there already comes first.
    let mut seen = Vec::new();
    while let Ok(l) = rx.try_recv() {
        seen.push(l);
    }
    assert_eq!(seen.len(), journal.len(), "the journal so far first");
    out(&lab, &bin, &["drain", "web", &b2, "--force"]);
    for c in &clients {
        let _ = lab.http_get(*c, vip, Duration::from_secs(3));
    }
    let t = Instant::now();
    let streamed = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(l) => {
                let e: MoveRecord = serde_json::from_str(&l).unwrap();
                if e.reason == "drain_force" {
                    break e;
                }
            }
            Err(_) if t.elapsed() > Duration::from_secs(10) => panic!("no drain_force move streamed within 10 s"),
            Err(_) => {}
        }
    };
    assert_eq!(streamed.from, b2, "{streamed:?}");
    let _ = follow.kill();
    let _ = follow.wait();

    // A flushed client's pin is a move too: from its backend, placed afresh at its next packet.
    let c = clients[0].to_string();
    let e: Vec<Explanation> = serde_json::from_str(&out(&lab, &bin, &["explain", &c, "--service", "web", "--output", "json"])).unwrap();
    let from = e[0].backend.clone().expect("pinned");
    assert!(out(&lab, &bin, &["affinity", "flush", &c, "--service", "web"]).contains("flushed 1 pin"));
    let mine: Vec<MoveRecord> = out(&lab, &bin, &["events", "--client", &c, "--output", "json"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let last = mine.last().expect("the flush is journaled");
    assert_eq!((last.reason.as_str(), last.from.as_str(), last.to.as_str()), ("flushed", from.as_str(), "(placed afresh)"), "{mine:?}");
    assert!(mine.iter().all(|m| m.client == c), "--client filters: {mine:?}");
}
