//! The operator's first hour, end to end against the real `lb` in the namespace lab: what a
//! hand-built setup gets wrong is refused or warned about with its fix, and the messages tell the
//! truth. Run as root by `cargo xtask test`.

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lb::api::StatusReport;
use tests::lb_bin;
use xtask::lab::{CLIENT_PROBE_ADDR, Lab, LabSpec, VIP_HTTP_PORT, output_timeout};

fn fail(lab: &Lab, msg: &str) -> ! {
    panic!("{msg}\n--- last 40 lines of {} ---\n{}\n---", lab.log_path().display(), lab.lb_log_tail(40))
}

fn lab(backends: u32) -> Lab {
    Lab::create(LabSpec { clients: 2, backends }).unwrap_or_else(|e| panic!("{e:#}"))
}

fn cli(lab: &Lab, bin: &Path, args: &[&str]) -> Output {
    lab.lb_cli(bin, args).unwrap_or_else(|e| panic!("{e:#}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A process killed (and reaped) when dropped, so a failing test leaves none behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ip netns exec <lb-ns> lb run --config <lab config>`, as an operator following `ip netns`
/// habits would start it; output goes to the lab's log.
fn ip_netns_exec_lb_run(lab: &Lab, bin: &Path) -> Reaped {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(lab.log_path()).expect("log");
    let child = Command::new("ip")
        .args(["netns", "exec", lab.ns_lb()])
        .arg(bin)
        .arg("--socket")
        .arg(lab.socket_path())
        .arg("run")
        .arg("--config")
        .arg(lab.config_path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawning ip netns exec");
    Reaped(child)
}

/// Waits until `lb status` answers (`Ok`) or the process exits (`Err(status)`), 20 s at most.
fn started_or_exited(lab: &Lab, bin: &Path, p: &mut Reaped) -> Result<(), std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = p.0.try_wait().expect("try_wait") {
            return Err(st);
        }
        if lab.lb_cli(bin, &["status"]).is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(20) {
            fail(lab, "lb under ip netns exec neither answered nor exited in 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(lab: &Lab, p: &mut Reaped) {
    let pid = nix::unistd::Pid::from_raw(p.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let t = Instant::now();
    while p.0.try_wait().expect("try_wait").is_none() {
        if t.elapsed() > Duration::from_secs(10) {
            fail(lab, "lb ignored SIGTERM for 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vip_answers(lab: &Lab) -> bool {
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    (0..3).any(|_| lab.http_get(CLIENT_PROBE_ADDR, vip, Duration::from_secs(2)).is_ok())
}

fn xdp_attached(lab: &Lab) -> Vec<String> {
    lab.interfaces()
        .into_iter()
        .filter(|i| {
            let mut cmd = Command::new("ip");
            cmd.args(["-n", lab.ns_lb(), "link", "show", "dev", i]);
            output_timeout(&mut cmd, Duration::from_secs(5)).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("xdp"))
        })
        .collect()
}

/// Outcome 1: `ip netns exec NS lb run` never claims a datapath that dies with it. Its private
/// mount namespace would hold the bpffs lb mounts, and the pins with it: the start is refused,
/// naming the fix, and leaves nothing attached. With the pin path on a bpffs that outlives the
/// process (mounted from the host), the same command runs, and after SIGTERM traffic still flows.
#[test]
fn ip_netns_exec_is_refused_unless_the_pins_outlive_it() {
    let bin = lb_bin();
    let mut lab = lab(2);
    lab.set_lb_bin(&bin);

    let mut p = ip_netns_exec_lb_run(&lab, &bin);
    match started_or_exited(&lab, &bin, &mut p) {
        Err(st) => {
            assert!(!st.success(), "a refused start exits non-zero");
            let log = lab.lb_log();
            assert!(
                log.contains("lb --netns NAME run") && log.contains("would end when lb stops"),
                "the refusal names the reason and the fix:\n{log}"
            );
            assert_eq!(log.lines().filter(|l| l.contains("error")).count(), 1, "one line:\n{log}");
        }
        Ok(()) => {
            // Accepted: then it must survive its stop, as it will say it does.
            assert!(vip_answers(&lab), "the VIP answers while lb runs");
            stop(&lab, &mut p);
            if !vip_answers(&lab) {
                fail(&lab, "lb ran under `ip netns exec`, said the datapath keeps running, but after it stopped the VIP is dead");
            }
        }
    }
    assert!(xdp_attached(&lab).is_empty(), "a refused start leaves no XDP program attached");
    assert!(!lab.socket_path().exists(), "nor its control socket");

    // The pin path on a bpffs of the host's mount namespace: it outlives the command.
    std::fs::create_dir_all(lab.pin_path()).expect("pin dir");
    let m = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(lab.pin_path()).status().expect("mount");
    assert!(m.success(), "mounting bpffs at {}", lab.pin_path().display());
    let mut p = ip_netns_exec_lb_run(&lab, &bin);
    if let Err(st) = started_or_exited(&lab, &bin, &mut p) {
        fail(&lab, &format!("lb under ip netns exec, pins on a surviving bpffs, exited with {st}"));
    }
    assert!(vip_answers(&lab), "the VIP answers while lb runs");
    let st = cli(&lab, &bin, &["status"]);
    assert!(st.status.success(), "{}", text(&st));
    stop(&lab, &mut p);
    assert!(lab.lb_log().contains("the datapath keeps running"), "{}", lab.lb_log_tail(10));
    if !vip_answers(&lab) {
        fail(&lab, "after SIGTERM the pinned datapath should still forward");
    }
    // And the next lb (the lab's own, through nsenter) adopts it.
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(lab.lb_log().contains("adopted"), "{}", lab.lb_log_tail(10));
}

fn wait_for(lab: &Lab, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            fail(lab, &format!("waited {limit:?} for {what}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status(lab: &Lab, bin: &Path) -> StatusReport {
    let out = cli(lab, bin, &["status", "--output", "json"]);
    if !out.status.success() {
        fail(lab, &format!("lb status: {}", text(&out)));
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}"))
}

fn check(bin: &Path, global: &[&str], config: &Path, extra: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(bin);
    cmd.args(global).arg("check").arg("--config").arg(config).args(extra);
    let out = output_timeout(&mut cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e:#}"));
    (out.status.success(), text(&out))
}

fn ethtool_gro(ns: &str, ifname: &str, on: bool) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "ethtool", "-K", ifname, "gro", if on { "on" } else { "off" }]);
    let out = output_timeout(&mut cmd, Duration::from_secs(10)).expect("ethtool");
    assert!(out.status.success(), "ethtool: {}", text(&out));
}

/// Outcomes 2 and 3: `lb check` checks the machine (the lab's interfaces are not in the root
/// namespace; `--offline` skips that; `--netns` checks the balancer's namespace), and a veth
/// whose peer has neither GRO nor XDP is warned about, with the fix, by `lb check`, in `lb run`'s
/// log and in `lb status` (text and JSON), until the peer is fixed.
#[test]
fn check_sees_the_machine_and_veth_peers_without_gro_are_warned_about() {
    let bin = lb_bin();
    let mut lab = lab(2);
    let cfg = lab.config_path().to_owned();
    let (ok, out) = check(&bin, &[], &cfg, &[]);
    assert!(!ok && out.contains("no interface named \"eth2\"") && out.contains("--offline"), "{out}");
    let (ok, out) = check(&bin, &[], &cfg, &["--offline"]);
    assert!(ok && out.contains("not checked (--offline)"), "{out}");
    let (ok, out) = check(&bin, &["--netns", lab.ns_lb()], &cfg, &[]);
    assert!(ok && out.contains("interfaces: eth0, eth1, eth2 found") && out.contains("pin path:"), "{out}");
    assert!(!out.contains("warning"), "the lab's peers have GRO on: {out}");

    // The client-side peer loses GRO: every reply redirected to the clients would be dropped.
    let peer_ns = lab.ns_client().to_owned();
    ethtool_gro(&peer_ns, "eth0", false);
    let fix = format!("ip netns exec {peer_ns} ethtool -K eth0 gro on");
    let (ok, out) = check(&bin, &["--netns", lab.ns_lb()], &cfg, &[]);
    assert!(ok, "a warning is not an error: {out}");
    assert!(out.contains("warning: interface eth0 is a veth whose peer eth0") && out.contains(&fix), "{out}");

    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(lab.lb_log().contains(&fix), "lb run warns at start:\n{}", lab.lb_log_tail(20));
    let st = status(&lab, &bin);
    assert!(st.warnings.iter().any(|w| w.contains(&fix)), "{:?}", st.warnings);
    let out = cli(&lab, &bin, &["status"]);
    assert!(text(&out).contains("warnings:") && text(&out).contains(&fix), "{}", text(&out));

    // Fixed: the warning goes at the next check of the peers (every 30 s).
    ethtool_gro(&peer_ns, "eth0", true);
    wait_for(&lab, "the veth warning to go", Duration::from_secs(40), || status(&lab, &bin).warnings.is_empty());
    assert!(lab.lb_log().contains("a veth warning no longer holds"), "{}", lab.lb_log_tail(10));
}

/// Outcome 3: a NAT backend whose route back to the clients bypasses the balancer takes packets
/// and sends no reply through it; lb says so (log and status) within NO_REPLY_AFTER plus a
/// sample, naming the fix, and the warning goes once replies come back.
#[test]
fn nat_backend_without_replies_is_warned_about() {
    let bin = lb_bin();
    let mut lab = lab(1);
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(vip_answers(&lab), "the VIP answers");
    // Its replies to the clients now go nowhere (the balancer stays reachable on-link, so the
    // health checks still pass).
    let ns = lab.ns_backend(1);
    let route = |args: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &ns, "route"]).args(args);
        let out = output_timeout(&mut cmd, Duration::from_secs(5)).expect("ip route");
        assert!(out.status.success(), "ip route {args:?}: {}", text(&out));
    };
    route(&["replace", "blackhole", "default"]);
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    let client = lab.client_addrs()[0];
    let t = Instant::now();
    let warned = loop {
        let _ = lab.http_get(client, vip, Duration::from_millis(300));
        let st = status(&lab, &bin);
        if let Some(w) = st.warnings.iter().find(|w| w.contains("no reply came back through the balancer")) {
            break w.clone();
        }
        if t.elapsed() > Duration::from_secs(40) {
            fail(&lab, &format!("no warning about the missing replies after 40 s: {:?}", st.warnings));
        }
    };
    assert!(warned.contains("service web, backend 10.200.11.2:8080") && warned.contains("default route"), "{warned}");
    assert!(lab.lb_log().contains("no reply came back through the balancer"), "{}", lab.lb_log_tail(10));
    let out = cli(&lab, &bin, &["status"]);
    assert!(text(&out).contains("no reply came back"), "{}", text(&out));

    route(&["replace", "default", "via", "10.200.11.1"]);
    wait_for(&lab, "the VIP to answer again", Duration::from_secs(20), || vip_answers(&lab));
    wait_for(&lab, "the no-reply warning to go", Duration::from_secs(20), || {
        let _ = vip_answers(&lab);
        status(&lab, &bin).warnings.is_empty()
    });
}

/// Outcome 4 and 5: a restart from a changed config logs one adoption summary that tells which
/// pins went and why (not "every pin is kept" beside a count of deleted pins), each backend keeps
/// its health history (since / reason) across the restart, drain and undrain say what they did
/// (an undrain of an up backend changes nothing and says so), status marks a runtime state that
/// differs from the config, and CLI errors carry no HTTP status codes.
#[test]
fn messages_tell_the_truth() {
    let bin = lb_bin();
    let mut lab = lab(3);
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    for c in lab.client_addrs() {
        lab.http_get(c, vip, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{e:#}"));
    }

    // b1 goes down: its since / reason must survive the restart.
    lab.stop_backend(1).unwrap_or_else(|e| panic!("{e:#}"));
    let b1 = lab.backend_addr(1).to_string();
    wait_for(&lab, "b1 down", Duration::from_secs(20), || {
        status(&lab, &bin).services[0].backends.iter().any(|b| b.address == b1 && b.state == "down")
    });
    let find = |st: &StatusReport, addr: &str| {
        st.services.iter().find(|s| s.name == "web").unwrap().backends.iter().find(|b| b.address == addr).cloned().unwrap()
    };
    let before = find(&status(&lab, &bin), &b1);
    assert!(before.reason.starts_with("health check"), "{before:?}");
    std::thread::sleep(Duration::from_millis(1100));
    lab.restart_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let after = find(&status(&lab, &bin), &b1);
    assert_eq!((after.state.as_str(), &after.since, &after.reason), ("down", &before.since, &before.reason), "health history kept");
    let log = lab.lb_log();
    let last = log.lines().rev().find(|l| l.contains("adopted the pinned datapath state")).unwrap_or_else(|| fail(&lab, "no adoption line"));
    // Both services (web over TCP, dns over UDP) have the three backends.
    assert!(last.contains("every pin is kept") && last.contains("the health history of 6 of 6 adopted backend(s) is kept"), "{last}");
    assert!(last.contains("changes=nothing changed"), "a restart on the same config changes nothing: {last}");

    // A restart from a config without b3 (which holds pins, both services): the summary says they went.
    let opts = lab.options().clone();
    let mut text_cfg = lab.render_config_with(&lab.interfaces(), &opts);
    let b3 = lab.backend_addr(3).to_string();
    text_cfg = tests::config_without_backend(&text_cfg, &b3);
    assert!(!text_cfg.contains(&b3), "{text_cfg}");
    lab.write_config(&text_cfg).unwrap_or_else(|e| panic!("{e:#}"));
    lab.restart_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let log = lab.lb_log();
    let last = log.lines().rev().find(|l| l.contains("adopted the pinned datapath state")).unwrap_or_else(|| fail(&lab, "no adoption line"));
    assert!(!last.contains("every pin is kept;") && last.contains("were deleted") && last.contains("2 backends removed (web/"), "{last}");
    assert!(!last.contains("Changes {"), "fields, not Debug structs: {last}");
    assert!(!log.contains("Changes {"), "no Debug structs in the log");

    // Drain / undrain.
    let b2 = format!("{}:8080", lab.backend_addr(2));
    let out = cli(&lab, &bin, &["undrain", "web", &b2]);
    assert!(out.status.success() && text(&out).contains("is not drained: nothing to undrain"), "{}", text(&out));
    let out = cli(&lab, &bin, &["drain", "web", &b2]);
    assert!(text(&out).contains("is now draining") && text(&out).contains("note: draining (lb drain) at run time"), "{}", text(&out));
    let st = status(&lab, &bin);
    assert!(find(&st, &lab.backend_addr(2).to_string()).differs_from_config.is_some(), "{st:?}");
    let out = cli(&lab, &bin, &["status"]);
    assert!(text(&out).contains("draining*") && text(&out).contains("differing from the config"), "{}", text(&out));
    let out = cli(&lab, &bin, &["drain", "web", &b2]);
    assert!(text(&out).contains("was already draining: nothing changed"), "{}", text(&out));
    let out = cli(&lab, &bin, &["undrain", "web", &b2]);
    assert!(text(&out).contains("is now up") && !text(&out).contains("note:"), "{}", text(&out));
    assert!(find(&status(&lab, &bin), &lab.backend_addr(2).to_string()).differs_from_config.is_none());

    // Errors name the problem, not the HTTP status.
    let out = cli(&lab, &bin, &["drain", "nosuch", &b2]);
    let err = text(&out);
    assert!(!out.status.success() && err.contains("lb: error: no service named \"nosuch\""), "{err}");
    assert!(!err.contains("404") && !err.contains("answered"), "{err}");

    // lb down: one line about the daemon it stopped, nothing contradicting it, and it is gone.
    let pid = lab.lb_pid().expect("pid");
    let out = lab.lb_down(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let said = text(&out);
    assert!(out.status.success() && said.contains("stopped the running lb") && !said.contains("nothing pinned"), "{said}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || lab.lb_exit_status().ok().flatten().is_some(), "lb down returned with the daemon alive");
}
