//! The container image end to end: built by `xtask::image` (its base made here, no registry),
//! run privileged on the host's network, serving a namespace lab's balancer namespace
//! (`--netns`), with the lab's clients getting sticky answers through it and the host's `lb`
//! CLI talking to it over the control socket. Skipped (`xtask::skips`, counted as skipped by
//! `cargo xtask test`) where no Docker engine runs. Run as root by `cargo xtask test`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lb::api::StatusReport;
use tests::lb_bin;
use xtask::lab::{Lab, LabSpec, VIP_HTTP_PORT, output_timeout};
use xtask::skips::skip;

/// Removes the container and the test's image tag when the test ends, also on panic.
struct Container {
    name: String,
    tag: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.name]).output();
        let _ = Command::new("docker").args(["rmi", &self.tag]).output();
    }
}

fn docker(args: &[&str]) -> std::process::Output {
    output_timeout(Command::new("docker").args(args), Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e:#}"))
}

fn logs(name: &str) -> String {
    let out = docker(&["logs", name]);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_balancer_runs_from_its_image_against_a_lab() {
    if let Some(why) = xtask::image::engine_missing() {
        skip("the_balancer_runs_from_its_image_against_a_lab", &format!("no Docker engine ({why})"));
        return;
    }
    let bin = lb_bin();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
    let pid = std::process::id();
    let lab = Lab::create(LabSpec { clients: 6, backends: 3 }).unwrap_or_else(|e| panic!("{e:#}"));
    let c = Container { name: format!("lb-e2e-{pid}"), tag: format!("lb:e2e-{pid}") };
    xtask::image::build(workspace, &bin, &c.tag).unwrap_or_else(|e| panic!("building the image: {e:#}"));

    // The pins on the host's bpffs, as the README's `-v /sys/fs/bpf:/sys/fs/bpf` gives them: a
    // bpffs lb mounted inside the container would end with it (and lb refuses to do that).
    std::fs::create_dir_all(lab.pin_path()).expect("pin dir");
    let m = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(lab.pin_path()).status().expect("mount");
    assert!(m.success(), "mounting bpffs at {}", lab.pin_path().display());

    // As the README says to run it, plus the lab's namespace and directory.
    let dir = lab.dir().to_string_lossy().into_owned();
    let socket = lab.socket_path().to_string_lossy().into_owned();
    let config = lab.config_path().to_string_lossy().into_owned();
    let volume = format!("{dir}:{dir}");
    let run = |privileges: &[&str]| {
        let mut args = vec!["run", "-d", "--name", &c.name];
        args.extend_from_slice(privileges);
        args.extend(["--network", "host", "-v", "/run/netns:/run/netns", "-v", &volume]);
        args.extend([c.tag.as_str(), "--netns", lab.ns_lb(), "--socket", &socket, "run", "--config", &config]);
        docker(&args)
    };
    let mut out = run(&["--privileged"]);
    if String::from_utf8_lossy(&out.stderr).contains("unable to apply caps") {
        // This machine may itself run in a container without every capability (here: no
        // CAP_SYS_RESOURCE in its bounding set), so docker cannot grant them all: the same, less
        // the ones it lacks. lb needs CAP_SYS_ADMIN (bpf, setns, mounts) and CAP_NET_ADMIN.
        eprintln!("note: --privileged is not possible on this machine; running with every capability docker can grant");
        docker(&["rm", "-f", &c.name]);
        out = run(&[
            "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
        ]);
    }
    assert!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));

    // Up when its control socket answers.
    let t = Instant::now();
    loop {
        match lab.lb_cli(&bin, &["status"]) {
            Ok(o) if o.status.success() => break,
            _ if t.elapsed() > Duration::from_secs(30) => panic!("the containerized lb never answered:\n{}", logs(&c.name)),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    // Sticky answers through the VIP for every client.
    let vip = SocketAddrV4::new(lab.vip(), VIP_HTTP_PORT);
    let probe = Ipv4Addr::new(10, 200, 1, 2);
    let t = Instant::now();
    while lab.http_get(probe, vip, Duration::from_secs(3)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "the VIP never answered:\n{}", logs(&c.name));
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut seen: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for round in 0..3 {
        for client in lab.client_addrs() {
            let body = lab.http_get(client, vip, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&c.name)));
            let first = seen.entry(client).or_insert_with(|| body.clone());
            assert_eq!(*first, body, "client {client} moved in round {round}");
        }
    }
    let out = lab.lb_cli(&bin, &["status", "--fresh", "--output", "json"]).unwrap_or_else(|e| panic!("{e:#}"));
    let st: StatusReport = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}"));
    let web = st.services.iter().find(|s| s.name == "web").expect("service web");
    assert_eq!(web.pinned, lab.client_addrs().len() as u64 + 1, "our clients and the probe: {web:?}");
    assert_eq!(st.interfaces.len(), lab.interfaces().len(), "{st:?}");

    // docker stop: SIGTERM, a clean exit that leaves the datapath to its pins.
    let out = docker(&["stop", "-t", "10", &c.name]);
    assert!(out.status.success(), "docker stop: {}", String::from_utf8_lossy(&out.stderr));
    let code = docker(&["inspect", "--format", "{{.State.ExitCode}}", &c.name]);
    let log = logs(&c.name);
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0", "exit code after docker stop:\n{log}");
    assert!(log.contains("SIGTERM: stopping") && log.contains("the datapath keeps running"), "{log}");
    // And it does: the container is gone, its pins on the host's bpffs keep the VIP answering.
    for client in lab.client_addrs() {
        let body = lab.http_get(client, vip, Duration::from_secs(3)).unwrap_or_else(|e| panic!("after docker stop, {client}: {e:#}\n{log}"));
        assert_eq!(seen[&client], body, "client {client} moved after docker stop");
    }
}
