//! End-to-end tests: the real `lb` binary in the namespace lab (see `xtask::lab`).
//!
//! Run as root by `cargo xtask test`. The binary comes from `LB_BIN`, else
//! `<workspace>/target/release/lb`. Every lab lives in its own network namespaces, which are
//! removed when the test ends, also when it fails; traffic stays inside them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::lb_bin;
use xtask::lab::{Lab, LabSpec, VIP_HTTP_PORT, VIP_UDP_PORT, output_timeout};

/// Per request; generous for a 2-core machine, small enough that a dead path fails fast.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECTIONS_PER_CLIENT: usize = 5;
/// Until the first request through the VIP succeeds (health checks may still be settling).
const WARMUP: Duration = Duration::from_secs(15);


/// Panics with `msg` and the tail of lb's log.
fn fail(lab: &Lab, msg: &str) -> ! {
    panic!(
        "{msg}\n--- last 40 lines of {} ---\n{}\n---",
        lab.log_path().display(),
        lab.lb_log_tail(40)
    )
}

fn create_lab(spec: LabSpec) -> Lab {
    Lab::create(spec).unwrap_or_else(|e| panic!("{e:#}"))
}

fn start_lb(lab: &mut Lab, bin: &Path) {
    if let Err(e) = lab.start_lb(bin) {
        // The error already carries the log tail.
        panic!("{e:#}");
    }
}

/// Stops lb and reports (does not assert) how it exited.
fn stop_lb(lab: &mut Lab) {
    match lab.stop_lb() {
        Ok(Some(status)) if !status.success() => {
            eprintln!("note: lb exited with {status} on SIGTERM")
        }
        Ok(_) => {}
        Err(e) => eprintln!("note: {e:#}"),
    }
}

/// Retries `probe` (from 10.200.1.2, which is not one of the measured client addresses) until it
/// succeeds, so that the measurement does not race the daemon's first health checks.
fn warm_up<T>(lab: &Lab, what: &str, mut probe: impl FnMut() -> anyhow::Result<T>) {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match probe() {
            Ok(_) => return,
            Err(e) if started.elapsed() >= WARMUP || attempts >= 30 => fail(
                lab,
                &format!("{what} never succeeded ({attempts} attempts in {WARMUP:?}): {e:#}"),
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Asserts affinity and spread over `answers` (client -> backend body per request).
fn check_affinity(lab: &Lab, what: &str, answers: &BTreeMap<Ipv4Addr, Vec<String>>) {
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    let mut unsticky = Vec::new();
    for (client, bodies) in answers {
        let distinct: BTreeSet<&str> = bodies.iter().map(|b| b.trim()).collect();
        if distinct.len() == 1 {
            *per_backend.entry(bodies[0].trim()).or_default() += 1;
        } else {
            unsticky.push(format!("{client} -> {distinct:?}"));
        }
    }
    if !unsticky.is_empty() {
        fail(
            lab,
            &format!(
                "{what}: clients reached more than one backend:\n{}",
                unsticky.join("\n")
            ),
        );
    }
    let backends = lab.spec().backends;
    let expected: BTreeSet<String> = (1..=backends).map(|i| format!("backend-{i}")).collect();
    let reached: BTreeSet<String> = per_backend.keys().map(|s| (*s).to_owned()).collect();
    if reached != expected {
        fail(
            lab,
            &format!(
                "{what}: clients per backend {per_backend:?}; expected every one of {expected:?} to get a client"
            ),
        );
    }
    eprintln!("{what}: clients per backend {per_backend:?}");
}

#[test]
fn tcp_affinity_through_vip() {
    let bin = lb_bin();
    let mut lab = create_lab(LabSpec {
        clients: 30,
        backends: 3,
    });
    start_lb(&mut lab, &bin);
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    let probe_client = Ipv4Addr::new(10, 200, 1, 2);
    warm_up(
        &lab,
        &format!("GET http://{vip}/ from {probe_client}"),
        || lab.http_get(probe_client, vip, REQUEST_TIMEOUT),
    );

    let mut answers = BTreeMap::new();
    let mut failures = Vec::new();
    for client in lab.client_addrs() {
        let mut bodies = Vec::new();
        for n in 1..=CONNECTIONS_PER_CLIENT {
            match lab.http_get(client, vip, REQUEST_TIMEOUT) {
                Ok(body) => bodies.push(body),
                Err(e) => failures.push(format!("request {n}: {e:#}")),
            }
        }
        answers.insert(client, bodies);
    }
    if !failures.is_empty() {
        fail(
            &lab,
            &format!(
                "{} of {} requests failed:\n{}",
                failures.len(),
                answers.len() * CONNECTIONS_PER_CLIENT,
                failures.join("\n")
            ),
        );
    }
    check_affinity(&lab, "TCP", &answers);
    // Each request reached exactly one backend server, once.
    let served: u64 = (1..=3).map(|i| lab.backend_stats(i).http).sum();
    let expected = (answers.len() * CONNECTIONS_PER_CLIENT) as u64;
    if served < expected {
        fail(
            &lab,
            &format!("backends served {served} requests, expected at least {expected}"),
        );
    }
    stop_lb(&mut lab);
}

#[test]
fn udp_affinity_through_vip() {
    let bin = lb_bin();
    let mut lab = create_lab(LabSpec {
        clients: 30,
        backends: 3,
    });
    start_lb(&mut lab, &bin);
    let vip = SocketAddrV4::new(lab.vip(), VIP_UDP_PORT);
    let probe_client = Ipv4Addr::new(10, 200, 1, 2);
    warm_up(
        &lab,
        &format!("UDP query to {vip} from {probe_client}"),
        || lab.udp_query(probe_client, vip, Duration::from_millis(500)),
    );

    let mut answers = BTreeMap::new();
    let mut failures = Vec::new();
    for client in lab.client_addrs() {
        let mut bodies = Vec::new();
        for n in 1..=CONNECTIONS_PER_CLIENT {
            match lab.udp_query(client, vip, REQUEST_TIMEOUT) {
                // The reply must come from the VIP: proof that the reply path was translated back.
                Ok((body, from)) if from == SocketAddr::V4(vip) => bodies.push(body),
                Ok((body, from)) => failures.push(format!(
                    "query {n} from {client}: reply {:?} came from {from}, not from {vip}",
                    body.trim()
                )),
                Err(e) => failures.push(format!("query {n}: {e:#}")),
            }
        }
        answers.insert(client, bodies);
    }
    if !failures.is_empty() {
        fail(
            &lab,
            &format!(
                "{} of {} queries failed:\n{}",
                failures.len(),
                answers.len() * CONNECTIONS_PER_CLIENT,
                failures.join("\n")
            ),
        );
    }
    check_affinity(&lab, "UDP", &answers);
    stop_lb(&mut lab);
}

/// Runs `lb check --offline --config <file>` (the file alone: its interfaces are in a lab namespace) and returns (exit code, stdout + stderr).
fn lb_check(bin: &Path, config: &Path) -> (Option<i32>, String) {
    let out = output_timeout(
        Command::new(bin).arg("check").arg("--offline").arg("--config").arg(config),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Removes a scratch directory on drop (also when the test panics).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn lb_check_reports_errors() {
    let bin = lb_bin();
    let dir = TempDir(std::env::temp_dir().join(format!("lb-e2e-check-{}", std::process::id())));
    fs::create_dir_all(&dir.0).expect("creating a scratch directory");
    let spec = LabSpec {
        clients: 1,
        backends: 3,
    };
    let good = spec.config_toml(&spec.interfaces(), &dir.0.join("lb.sock"));

    let path = dir.0.join("good.toml");
    fs::write(&path, &good).expect("writing the config");
    let (code, text) = lb_check(&bin, &path);
    assert_eq!(
        code,
        Some(0),
        "`lb check` rejected the lab's config:\n{text}\n--- config ---\n{good}"
    );

    // Each broken variant must be refused with exit 1 and an error that names the field.
    let broken = [
        (
            "bad address",
            good.replacen("vip = \"10.200.100.1\"", "vip = \"not-an-ip\"", 1),
            "vip",
        ),
        (
            "unknown field",
            good.replacen("[datapath]\n", "[datapath]\ncolour = \"blue\"\n", 1),
            "colour",
        ),
        (
            "missing field",
            good.replacen("address = \"10.200.11.2\"\n", "", 1),
            "address",
        ),
    ];
    for (what, config, field) in broken {
        assert_ne!(config, good, "{what}: the test did not change the config");
        let path = dir.0.join(format!("{}.toml", what.replace(' ', "-")));
        fs::write(&path, &config).expect("writing the config");
        let (code, text) = lb_check(&bin, &path);
        assert_eq!(
            code,
            Some(1),
            "{what}: `lb check` should exit 1, output:\n{text}"
        );
        assert!(
            text.contains(field),
            "{what}: the error should name `{field}`:\n{text}"
        );
        assert!(
            !text.contains("panicked"),
            "{what}: `lb check` panicked:\n{text}"
        );
    }
}

#[test]
fn missing_interface_fails_cleanly() {
    let bin = lb_bin();
    let lab = create_lab(LabSpec {
        clients: 1,
        backends: 3,
    });
    let mut interfaces = lab.interfaces();
    interfaces.push("nosuch0".to_owned());
    lab.write_config(&lab.render_config(&interfaces))
        .unwrap_or_else(|e| panic!("{e:#}"));

    let started = Instant::now();
    let out = output_timeout(&mut lab.lb_run_command(&bin), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("`lb run` with a missing interface did not exit: {e:#}"));
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(
        !out.status.success(),
        "`lb run` succeeded with a missing interface:\n{all}"
    );
    assert!(
        took < Duration::from_secs(10),
        "`lb run` took {took:?} to fail:\n{all}"
    );
    assert!(
        stderr.lines().any(|l| l.contains("nosuch0")),
        "the error should name the interface nosuch0 on one line:\n{all}"
    );
    assert!(!all.contains("panicked"), "`lb run` panicked:\n{all}");

    // Nothing may stay attached to the interfaces that do exist.
    let links = output_timeout(
        Command::new("ip").args(["-n", lab.ns_lb(), "-d", "link", "show"]),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.lines().any(|l| l.contains("xdp")),
        "an XDP program stayed attached after the failed start:\n{links}\n--- lb output ---\n{all}"
    );
}

/// `lb status --output json` from the running daemon.
fn status_json(lab: &Lab, bin: &Path) -> lb::api::StatusReport {
    let out = lab.lb_cli(bin, &["status", "--output", "json"]).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.status.success(), "lb status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("lb status JSON: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn status_counts_match_the_traffic_and_sigterm_cleans_up() {
    let bin = lb_bin();
    let mut lab = create_lab(LabSpec { clients: 12, backends: 3 });
    start_lb(&mut lab, &bin);
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    let before = status_json(&lab, &bin);
    let web = before.services.iter().find(|s| s.name == "web").expect("service web in status");
    assert_eq!((web.counters.packets, web.counters.new_pins), (0, 0), "no traffic yet");
    assert_eq!(before.interfaces.len(), lab.interfaces().len(), "every interface is reported");
    assert!(before.interfaces.iter().all(|i| i.mode == "native" || i.mode == "generic"));
    assert_eq!(web.backends.iter().map(|b| b.slots).sum::<u32>(), before.maglev_table_size);

    let clients = lab.client_addrs();
    for client in &clients {
        for _ in 0..3 {
            if let Err(e) = lab.http_get(*client, vip, REQUEST_TIMEOUT) {
                fail(&lab, &format!("request from {client}: {e:#}"));
            }
        }
    }
    let after = status_json(&lab, &bin);
    let web = after.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.counters.new_pins, clients.len() as u64, "one pin per client: {web:?}");
    assert!(web.counters.hits >= (clients.len() * 2) as u64, "later connections hit their pin: {web:?}");
    assert!(web.counters.reply_packets > 0, "replies were translated: {web:?}");
    let sum = |f: fn(&lb::api::CountersReport) -> u64| web.backends.iter().map(|b| f(&b.counters)).sum::<u64>();
    assert_eq!(sum(|c| c.packets), web.counters.packets, "backend packets add up to the service's");
    assert_eq!(sum(|c| c.new_pins), web.counters.new_pins);
    assert_eq!(sum(|c| c.reply_packets), web.counters.reply_packets);
    assert_eq!(after.stats["to_vip"], web.counters.packets, "every packet to the VIP was counted once");
    let text = lab.lb_cli(&bin, &["status"]).unwrap_or_else(|e| panic!("{e:#}"));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("service web 10.200.100.1:80/tcp"), "text status:\n{text}");

    // SIGTERM: a clean exit that leaves the datapath running on its pinned state ...
    match lab.stop_lb() {
        Ok(Some(st)) => assert!(st.success(), "lb exited with {st} on SIGTERM:\n{}", lab.lb_log_tail(20)),
        other => panic!("stopping lb: {other:?}"),
    }
    assert!(xdp_attached(&lab), "SIGTERM must leave XDP attached (restart without interruption)");
    assert!(lab.pin_path().join("AFFINITY").exists(), "SIGTERM must leave the maps pinned");
    // ... and `lb down` removes all of it.
    let out = lab.lb_down(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.status.success(), "lb down failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_no_xdp(&lab, "after lb down");
    assert!(!lab.pin_path().join("AFFINITY").exists(), "lb down must remove the pins");
}

fn xdp_attached(lab: &Lab) -> bool {
    let links = output_timeout(Command::new("ip").args(["-n", lab.ns_lb(), "-d", "link", "show"]), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    String::from_utf8_lossy(&links.stdout).lines().any(|l| l.contains("xdp"))
}

/// Asserts that no interface of the balancer namespace has an XDP program attached.
fn assert_no_xdp(lab: &Lab, when: &str) {
    let links = output_timeout(Command::new("ip").args(["-n", lab.ns_lb(), "-d", "link", "show"]), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.lines().any(|l| l.contains("xdp")), "XDP still attached {when}:\n{links}");
}

#[test]
fn attach_failure_leaves_nothing_attached_or_pinned() {
    let bin = lb_bin();
    let lab = create_lab(LabSpec { clients: 1, backends: 1 });
    // eth0 (veth) takes native XDP, lo does not: the start fails after eth0 was attached and the
    // maps were pinned, and must undo both. nsenter keeps this mount namespace, so the pins are
    // visible here afterwards (ip netns exec would give lb a private one).
    let pin_dir = lab.config_path().parent().unwrap().join("bpf");
    let cfg = lab
        .render_config(&["eth0".to_string(), "lo".to_string()])
        .replace("xdp_mode = \"auto\"", "xdp_mode = \"native\"")
        .replace("pin_path = \"/sys/fs/bpf/lb\"", &format!("pin_path = \"{}\"", pin_dir.display()));
    assert!(cfg.contains("native") && cfg.contains(&pin_dir.display().to_string()), "lab config changed shape:\n{cfg}");
    lab.write_config(&cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let out = output_timeout(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.ns_lb()))
            .arg(&bin)
            .args(["--socket"])
            .arg(lab.socket_path())
            .args(["run", "--config"])
            .arg(lab.config_path())
            .env("NO_COLOR", "1"),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lb run succeeded attaching native XDP to lo:\n{stderr}");
    let err_line = stderr.lines().find(|l| l.starts_with("lb: error:")).unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(err_line.contains("lo"), "the error names the interface: {err_line}");
    assert_no_xdp(&lab, "after a failed start");
    let left: Vec<_> = fs::read_dir(&pin_dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "pins left behind in {}: {left:?}", pin_dir.display());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&pin_dir.display().to_string()), "bpffs left mounted at {}", pin_dir.display());
    assert!(!lab.socket_path().exists(), "control socket left behind");
}

#[test]
fn not_root_is_refused_with_one_line() {
    let bin = lb_bin();
    let cfg = std::env::temp_dir().join(format!("lb-e2e-nonroot-{}.toml", std::process::id()));
    fs::write(&cfg, LabSpec { clients: 1, backends: 1 }.config_toml(&["eth0".into()], Path::new("/tmp/lb-e2e-nonroot.sock"))).unwrap();
    let out = output_timeout(
        Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&bin).args(["run", "--config"]).arg(&cfg),
        Duration::from_secs(20),
    );
    let _ = fs::remove_file(&cfg);
    let out = out.unwrap_or_else(|e| panic!("{e:#}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lb run succeeded without root");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("lb: error:")).collect();
    assert!(errors.len() == 1 && errors[0].contains("root"), "one line naming root:\n{stderr}");
}

#[test]
fn incompatible_pinned_state_is_refused_and_keeps_running() {
    let bin = lb_bin();
    let mut lab = create_lab(LabSpec { clients: 2, backends: 2 });
    start_lb(&mut lab, &bin);
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    let client = lab.client_addrs()[0];
    let first = lab.http_get(client, vip, REQUEST_TIMEOUT).unwrap_or_else(|e| fail(&lab, &format!("{e:#}")));
    stop_lb(&mut lab);
    // Other capacities than the pinned maps were made with: refused, pointing at `lb down`.
    let cfg = fs::read_to_string(lab.config_path()).unwrap();
    assert!(cfg.contains("max_services = 8"), "lab config changed shape:\n{cfg}");
    lab.write_config(&cfg.replace("max_services = 8", "max_services = 16")).unwrap();
    let out = output_timeout(&mut lab.lb_run_command(&bin), Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lb run adopted pins made with other capacities:\n{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("lb: error:")).unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(line.contains("max_services") && line.contains("lb down"), "the error names the field and `lb down`: {line}");
    // The refused start touched nothing: the old datapath still serves, the client keeps its backend.
    assert!(xdp_attached(&lab), "a refused adoption must leave the running datapath attached");
    let again = lab.http_get(client, vip, REQUEST_TIMEOUT).unwrap_or_else(|e| fail(&lab, &format!("after the refused start: {e:#}")));
    assert_eq!(first, again, "the client moved");
    let down = lab.lb_down(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(down.status.success(), "lb down: {}", String::from_utf8_lossy(&down.stderr));
    assert_no_xdp(&lab, "after lb down");
}
