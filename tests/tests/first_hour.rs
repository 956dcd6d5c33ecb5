//! The operator's first hour, end to end against the real `lb` in the namespace lab: what a
//! hand-built setup gets wrong is refused or warned about with its fix, and the messages tell the
//! truth. Run as root by `cargo xtask test`.

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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
