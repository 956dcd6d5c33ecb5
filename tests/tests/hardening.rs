//! The daemon hardened, end to end against the real `lb` in the namespace lab: the control socket
//! never clobbers a file and is root-only from the start, one daemon per pin path, reloads that
//! fail half-way are undone whole, `lb down` waits for the announce grace, logs carry colour only
//! on a terminal, the control API's status codes, and pin counts that come from the background
//! counter (with their age). Run as root by `cargo xtask test`.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lb::api::StatusReport;
use tests::lb_bin;
use xtask::lab::{Lab, LabSpec, in_netns, output_timeout};

fn fail(lab: &Lab, msg: &str) -> ! {
    panic!("{msg}\n--- last 40 lines of {} ---\n{}\n---", lab.log_path().display(), lab.lb_log_tail(40))
}

fn lab(backends: u32) -> Lab {
    Lab::create(LabSpec { clients: 2, backends }).unwrap_or_else(|e| panic!("{e:#}"))
}

fn started(backends: u32, bin: &Path) -> Lab {
    let mut lab = lab(backends);
    lab.start_lb(bin).unwrap_or_else(|e| panic!("{e:#}"));
    lab
}

fn cli(lab: &Lab, bin: &Path, args: &[&str]) -> Output {
    lab.lb_cli(bin, args).unwrap_or_else(|e| panic!("{e:#}"))
}

fn status(lab: &Lab, bin: &Path, fresh: bool) -> StatusReport {
    let mut args = vec!["status", "--output", "json"];
    if fresh {
        args.push("--fresh");
    }
    let out = cli(lab, bin, &args);
    if !out.status.success() {
        fail(lab, &format!("lb status: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}"))
}

/// A second `lb run` of this lab (with extra global args), output captured, stopped on drop.
struct Extra(Child);

impl Drop for Extra {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_lb(lab: &mut Lab, bin: &Path, global: &[&str], env_no_color: bool) -> Extra {
    lab.set_lb_args(global);
    let mut cmd = lab.lb_run_command(bin);
    lab.set_lb_args(&[]);
    if !env_no_color {
        cmd.env_remove("NO_COLOR");
    }
    Extra(cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawning lb run: {e}")))
}

/// Waits for `child` to exit (at most 20 s) and returns its exit success and stderr.
fn finish(child: &mut Extra) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.0.try_wait().expect("waiting for lb") {
            let mut err = String::new();
            let _ = child.0.stderr.take().expect("piped").read_to_string(&mut err);
            return (st.success(), err);
        }
        assert!(Instant::now() < deadline, "lb run did not exit within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

#[test]
fn control_socket_never_clobbers_a_file_and_is_root_only_from_the_start() {
    let bin = lb_bin();
    let mut lab = lab(1);
    // A regular file where the config puts the socket: refused, and left as it was.
    std::fs::write(lab.socket_path(), "precious data\n").unwrap();
    let mut first = spawn_lb(&mut lab, &bin, &[], true);
    let (ok, err) = finish(&mut first);
    assert!(!ok, "lb run served its socket over a regular file:\n{err}");
    assert!(err.contains("is not a socket") && err.contains("regular file"), "{err}");
    assert_eq!(std::fs::read_to_string(lab.socket_path()).unwrap(), "precious data\n", "the file was changed");
    assert!(!lab.pin_path().join("AFFINITY").exists(), "a refused start pinned maps");
    std::fs::remove_file(lab.socket_path()).unwrap();

    // A socket in directories lb creates: they are 0700, the socket 0600.
    let dir = lab.dir().join("made-by-lb/run");
    let sock = dir.join("lb.sock");
    let arg = sock.to_string_lossy().into_owned();
    let _second = spawn_lb(&mut lab, &bin, &["--socket", &arg], true);
    lab.set_lb_bin(&bin);
    wait_for("the socket", || sock.exists());
    assert_eq!(mode(&sock), 0o600, "socket mode");
    assert_eq!(mode(&dir), 0o700, "directory lb made for the socket");
    assert_eq!(mode(dir.parent().unwrap()), 0o700, "every directory lb made for the socket");
}

#[test]
fn a_second_daemon_on_the_same_pin_path_is_refused_naming_the_first() {
    let bin = lb_bin();
    let mut lab = started(1, &bin);
    let pid = lab.lb_pid().expect("running");
    let other = lab.dir().join("other.sock");
    let arg = other.to_string_lossy().into_owned();
    let mut second = spawn_lb(&mut lab, &bin, &["--socket", &arg], true);
    let (ok, err) = finish(&mut second);
    assert!(!ok, "a second lb ran on the same pin path:\n{err}");
    assert!(err.contains(&format!("pid {pid}")) && err.contains("already running"), "{err}");
    assert!(!other.exists(), "the refused daemon left its socket behind");
    // The first one is untouched.
    let st = status(&lab, &bin, false);
    assert_eq!(st.pid, pid);
}

/// Adds a bridge (no native XDP: its attach in native mode fails) and a veth pair (native XDP)
/// to the balancer's namespace; returns their names.
fn extra_interfaces(lab: &Lab) -> (String, String) {
    let ns = lab.ns_lb();
    let (dummy, veth) = (format!("{}br", lab.prefix()), format!("{}hx", lab.prefix()));
    for args in [
        vec!["-n", ns, "link", "add", &dummy, "type", "bridge"],
        vec!["-n", ns, "link", "set", &dummy, "up"],
        vec!["-n", ns, "link", "add", &veth, "type", "veth", "peer", "name", &format!("{veth}p")],
        vec!["-n", ns, "link", "set", &veth, "up"],
    ] {
        let st = Command::new("ip").args(&args).status().expect("ip");
        assert!(st.success(), "ip {args:?}");
    }
    (dummy, veth)
}

fn has_xdp(lab: &Lab, iface: &str) -> bool {
    let out = Command::new("ip").args(["-n", lab.ns_lb(), "-d", "link", "show", iface]).output().expect("ip");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.contains("xdp")
}

/// The config of `lab` with native XDP and these interfaces added.
fn config_with(lab: &Lab, base: &str, extra_ifs: &[&str]) -> String {
    let mut ifs = lab.interfaces();
    ifs.extend(extra_ifs.iter().map(|s| s.to_string()));
    let listed: Vec<String> = ifs.iter().map(|i| format!("\"{i}\"")).collect();
    let mut out = String::new();
    for line in base.lines() {
        if line.starts_with("interfaces = ") {
            out.push_str(&format!("interfaces = [{}]\n", listed.join(", ")));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.replace("xdp_mode = \"auto\"", "xdp_mode = \"native\"")
}

/// A backend as a failed reload must leave it: address, port, weight, state.
type BackendModel = (String, u16, u32, String);

/// What a failed reload must leave exactly as it was: each service's name, table fingerprint and
/// backends.
fn model(st: &StatusReport) -> Vec<(String, String, Vec<BackendModel>)> {
    st.services
        .iter()
        .map(|s| {
            let b = s.backends.iter().map(|b| (b.address.clone(), b.port, b.weight, b.state.clone())).collect();
            (s.name.clone(), s.table_fingerprint.clone(), b)
        })
        .collect()
}

/// A reload that changes the services, then fails to attach: every map write is undone, the
/// interface it attached is detached again, the daemon answers 500 and keeps serving as before.
#[test]
fn a_reload_whose_attach_fails_is_undone_whole() {
    let bin = lb_bin();
    let mut lab = lab(3);
    let base = lab.render_config(&lab.interfaces());
    lab.write_config(&config_with(&lab, &base, &[])).unwrap();
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let (dummy, veth) = extra_interfaces(&lab);
    let clients = lab.client_addrs();
    let vip = std::net::SocketAddrV4::new(lab.vip(), xtask::lab::VIP_HTTP_PORT);
    let answers = |lab: &Lab| -> Vec<String> {
        clients.iter().map(|c| lab.http_get(*c, vip, Duration::from_secs(3)).unwrap_or_else(|e| fail(lab, &format!("{e:#}")))).collect()
    };
    let before_answers = answers(&lab);
    let before = status(&lab, &bin, true);

    // The new config removes backend 3 of both services, re-weights the others, and adds the
    // veth (attaches) and the dummy (native XDP: fails), in that order.
    let mut changed = config_with(&lab, &base, &[&veth, &dummy]);
    let b3 = lab.backend_addr(3).to_string();
    changed = changed.replace(&format!("[[services.backends]]\naddress = \"{b3}\""), "[[services.backends]]\nweight = 7\naddress = \"10.255.255.1\"");
    lab.write_config(&changed).unwrap();
    let out = cli(&lab, &bin, &["reload"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the reload succeeded although {dummy} (a bridge) has no native XDP");
    assert!(err.contains(&format!("attaching XDP to {dummy}")) && err.contains("undone") && !err.contains("500"), "{err}");
    assert!(!has_xdp(&lab, &veth), "{veth}, attached by the failed reload, is still attached");
    let after = status(&lab, &bin, true);
    assert_eq!(model(&after), model(&before), "the failed reload changed the model");
    let ifs = |s: &StatusReport| s.interfaces.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
    assert_eq!(ifs(&after), ifs(&before));
    assert_eq!(after.services.iter().map(|s| s.pinned).collect::<Vec<_>>(), before.services.iter().map(|s| s.pinned).collect::<Vec<_>>(), "pins were lost");
    assert_eq!(answers(&lab), before_answers, "clients moved after a failed reload");
    assert!(lab.lb_log().contains("reload refused"), "not logged");
}

/// A reload that fails half-way through its map writes (no free backend id: the new backends
/// need ids before the removed ones' are freed) is undone too, and the interface it was to
/// attach is not left attached.
#[test]
fn a_reload_that_fails_writing_the_maps_is_undone_whole() {
    let bin = lb_bin();
    let mut lab = lab(3);
    let base = lab.render_config(&lab.interfaces());
    // Six backends in use (web and dns, three each), room for seven.
    let base = base.replace("max_services = 8\n", "max_services = 8\nmax_backends = 7\n");
    lab.write_config(&config_with(&lab, &base, &[])).unwrap();
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let (_dummy, veth) = extra_interfaces(&lab);
    let before = status(&lab, &bin, true);
    // web's backends 2 and 3 replaced by two new ones: eight ids at once.
    let (b2, b3) = (lab.backend_addr(2).to_string(), lab.backend_addr(3).to_string());
    let mut changed = config_with(&lab, &base, &[&veth]);
    let web_end = changed.find("name = \"dns\"").expect("dns service");
    let (web, rest) = changed.split_at(web_end);
    let web = web.replace(&format!("address = \"{b2}\""), "address = \"10.255.255.2\"").replace(&format!("address = \"{b3}\""), "address = \"10.255.255.3\"");
    changed = format!("{web}{rest}");
    lab.write_config(&changed).unwrap();
    let out = cli(&lab, &bin, &["reload"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the reload succeeded");
    assert!(err.contains("no free backend id") && err.contains("undone") && !err.contains("500"), "{err}");
    assert!(!has_xdp(&lab, &veth), "{veth} was left attached by the failed reload");
    let after = status(&lab, &bin, true);
    assert_eq!(model(&after), model(&before), "the failed reload changed the model");
    // The daemon still applies a good reload afterwards (the ids of the attempt were freed).
    lab.write_config(&config_with(&lab, &base, &[&veth])).unwrap();
    let out = cli(&lab, &bin, &["reload"]);
    assert!(out.status.success(), "a good reload after the failed one: {}", String::from_utf8_lossy(&out.stderr));
    assert!(has_xdp(&lab, &veth), "{veth} not attached by the good reload");
}

#[test]
fn lb_down_waits_for_the_announce_grace() {
    let bin = lb_bin();
    let mut lab = lab(1);
    // Longer than the 10 s an older lb down waited.
    let grace = Duration::from_secs(12);
    let text = format!("{}\n[announce]\ntable = 4242\ngrace = \"12s\"\n", lab.render_config(&lab.interfaces()));
    lab.write_config(&text).unwrap();
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let st = status(&lab, &bin, false);
    assert_eq!(st.announce.as_ref().map(|a| a.grace_secs), Some(12.0), "{:?}", st.announce);
    let t = Instant::now();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", lab.ns_lb()))
        .arg("--")
        .arg(&bin)
        .arg("--socket")
        .arg(lab.socket_path())
        .args(["down", "--config"])
        .arg(lab.config_path());
    let out = output_timeout(&mut cmd, Duration::from_secs(40)).unwrap_or_else(|e| panic!("{e:#}"));
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "lb down failed after {took:?}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("grace") && stdout.contains("waiting"), "lb down did not say it waits: {stdout}");
    assert!(took >= grace, "lb down returned after {took:?}, before the grace ended");
    assert!(stdout.contains("stopped the running lb"), "{stdout}");
    assert!(!lab.pin_path().join("AFFINITY").exists(), "lb down left the maps pinned");
    let _ = lab.stop_lb();
}

#[test]
fn logs_carry_colour_only_on_a_terminal() {
    let bin = lb_bin();
    let mut lab = lab(1);
    // Text logs (the default) to a pipe, NO_COLOR unset: plain text.
    let mut child = spawn_lb(&mut lab, &bin, &[], false);
    lab.set_lb_bin(&bin);
    wait_for("the socket", || lab.socket_path().exists());
    let _ = cli(&lab, &bin, &["status"]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let (_, err) = finish(&mut child);
    assert!(err.contains("lb running"), "no log lines:\n{err}");
    assert!(!err.contains('\u{1b}'), "escape codes in logs written to a pipe:\n{err:?}");
}

/// `curl --unix-socket` against the control socket: the status code and the JSON error body.
fn api(lab: &Lab, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(lab.socket_path())
        .args(["-X", method, "-H", "Content-Type: application/json"]);
    if let Some(b) = body {
        cmd.args(["--data", b]);
    }
    cmd.arg(format!("http://lb{path}"));
    let out = output_timeout(&mut cmd, Duration::from_secs(40)).unwrap_or_else(|e| panic!("{e:#}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or_else(|| panic!("curl: {text}"));
    let v = serde_json::from_str(body).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body:?}"));
    (code.trim().parse().unwrap_or_else(|_| panic!("code {code:?}")), v)
}

#[test]
fn control_api_status_codes_with_json_errors() {
    let bin = lb_bin();
    let lab = started(2, &bin);
    let b1 = format!("{}:{}", lab.backend_addr(1), lab.backend_ports().0);
    let error = |v: &serde_json::Value| v.get("error").and_then(|e| e.as_str()).unwrap_or_default().to_owned();
    let cases: [(&str, &str, Option<String>, u16, &str); 8] = [
        ("POST", "/drain", Some(r#"{"service":"nope","backend":"10.0.0.1:80"}"#.into()), 404, "no service named \"nope\""),
        ("POST", "/drain", Some(r#"{"service":"web","backend":"10.9.9.9:80"}"#.into()), 404, "has no backend"),
        ("POST", "/drain", Some(r#"{"service":"web","backend":"not-an-address"}"#.into()), 400, "ADDRESS:PORT"),
        ("POST", "/drain", Some("{not json".into()), 400, "request body"),
        ("GET", "/explain?client=nope", None, 400, "not an IP address"),
        ("GET", "/explain?client=10.0.0.1&service=nope", None, 404, "no service named"),
        ("GET", "/no/such/endpoint", None, 404, "no such endpoint"),
        ("POST", "/affinity/flush", Some(r#"{"all":true,"client":"10.0.0.1"}"#.into()), 400, "exactly one"),
    ];
    for (method, path, body, code, msg) in cases {
        let (got, v) = api(&lab, method, path, body.as_deref());
        assert_eq!(got, code, "{method} {path} {body:?}: {v}");
        assert!(error(&v).contains(msg), "{method} {path}: {v}");
    }
    let (got, v) = api(&lab, "POST", "/affinity/flush", Some(&format!(r#"{{"backend":"{b1}","service":"nope"}}"#)));
    assert_eq!(got, 404, "{v}");
    // The CLI prints the daemon's message, without the status code (that is for scripts).
    let out = cli(&lab, &bin, &["drain", "nope", "10.0.0.1:80"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && !err.contains("404") && err.contains("lb: error: no service named \"nope\""), "{err}");
}

/// Pin counts come from the background counter, with their age: a table of many pins (written
/// straight into the pinned map) is counted exactly, and status never waits for the count.
#[test]
fn pin_counts_come_from_the_background_counter() {
    let bin = lb_bin();
    let lab = started(2, &bin);
    let st = status(&lab, &bin, true);
    let web = st.services.iter().find(|s| s.name == "web").expect("web");
    let (sid, bid) = (web.id, web.backends[0].id);
    assert!(st.pin_count.counted_at.is_some() && st.pin_count.took_ms.is_some(), "{:?}", st.pin_count);
    // 50,000 live pins of web to its first backend, written as the datapath would.
    let n = 50_000u32;
    let map = aya::maps::MapData::from_pin(lab.pin_path().join("AFFINITY")).expect("pinned AFFINITY");
    let now = lb::datapath::monotonic_coarse_ns();
    let entries: Vec<(lb_common::AffinityKey, lb_common::AffinityValue)> = (0..n)
        .map(|i| {
            let key = lb_common::AffinityKey { service_id: sid, addr: [u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)).wrapping_add(i).to_be(), 0, 0, 0] };
            (key, lb_common::AffinityValue { backend_id: bid, flags: 0, created_ns: now, last_seen_ns: now })
        })
        .collect();
    let mut m: aya::maps::HashMap<_, lb_common::AffinityKey, lb_common::AffinityValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map)).expect("AFFINITY as a hash map");
    for (k, v) in &entries {
        m.insert(k, v, 0).expect("writing a pin");
    }
    let st = status(&lab, &bin, true);
    let web = st.services.iter().find(|s| s.name == "web").expect("web");
    assert!(web.pinned >= n as u64, "{} pinned, {n} written", web.pinned);
    assert_eq!(web.backends.iter().find(|b| b.id == bid).map(|b| b.pinned), Some(web.pinned), "{web:?}");
    assert!(st.affinity_entries >= n as usize);
    assert!(st.pin_count.age_secs.is_some_and(|a| a < 30.0), "{:?}", st.pin_count);
    let text = String::from_utf8_lossy(&cli(&lab, &bin, &["status"]).stdout).into_owned();
    assert!(text.contains("counted") && text.contains(" ago in "), "{text}");
    // Metrics say how old the count is.
    let scrape = in_netns(lab.ns_lb(), || Command::new("curl").args(["-sS", "--max-time", "10", "http://127.0.0.1:9940/metrics"]).output())
        .unwrap()
        .unwrap();
    let metrics = String::from_utf8_lossy(&scrape.stdout).into_owned();
    assert!(metrics.contains("lb_pin_count_age_seconds ") && metrics.contains("lb_pin_count_duration_seconds "), "{metrics}");
}

/// A reload that removes a backend deletes its pins on a thread of its own (outside the daemon
/// lock): the answer says so at once, and soon no pin names the removed backend.
#[test]
fn a_reload_removing_a_backend_deletes_its_pins_outside_the_lock() {
    let bin = lb_bin();
    let mut lab = Lab::create(LabSpec { clients: 24, backends: 3 }).unwrap_or_else(|e| panic!("{e:#}"));
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    let vip = std::net::SocketAddrV4::new(lab.vip(), xtask::lab::VIP_HTTP_PORT);
    for c in lab.client_addrs() {
        lab.http_get(c, vip, Duration::from_secs(3)).unwrap_or_else(|e| fail(&lab, &format!("{e:#}")));
    }
    let b3 = lab.backend_addr(3).to_string();
    let listed = |lab: &Lab| -> lb::api::AffinityList {
        let out = cli(lab, &bin, &["affinity", "list", "--service", "web", "--output", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("affinity list JSON: {e}"))
    };
    let before = listed(&lab);
    let on_b3 = before.pins.iter().filter(|p| p.backend.starts_with(&format!("{b3}:"))).count();
    assert!(on_b3 > 0, "no client pinned to backend 3: the test proves nothing ({before:?})");
    // Backend 3 leaves both services.
    let text = lab.render_config(&lab.interfaces());
    let cut = text.replace(&format!("[[services.backends]]\naddress = \"{b3}\""), "[[services.backends]]\naddress = \"10.255.255.9\"");
    lab.write_config(&cut).unwrap();
    let out = cli(&lab, &bin, &["reload", "--output", "json"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    let ch: lb::api::Changes = serde_json::from_slice(&out.stdout).unwrap();
    assert!(ch.pins_flushing && ch.pins_flushed == 0, "{ch:?}");
    wait_for("the removed backend's pins to go", || listed(&lab).pins.iter().all(|p| p.backend_state != "removed"));
    assert!(lab.lb_log().contains("deleted the pins of removed services and backends"), "not logged");
    assert_eq!(listed(&lab).matched, before.matched - on_b3, "{on_b3} pins on backend 3 should have gone, only they");
}
