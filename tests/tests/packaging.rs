//! The shipped service files: the systemd unit (checked by `systemd-analyze verify`) and the
//! Containerfile agree with each other, with the restart behaviour (SIGTERM leaves the datapath
//! running, SIGHUP reloads) and with the README's instructions; the BIRD configs parse. Where
//! `systemd-analyze` or `bird` is missing, its check is skipped (`xtask::skips`) and
//! `cargo xtask test` counts it as skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use xtask::skips::skip;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `key=value` settings of one `[section]` of a unit file.
fn settings(unit: &str, section: &str) -> Vec<(String, String)> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            current = line.to_string();
            continue;
        }
        if current == format!("[{section}]")
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

fn one<'a>(s: &'a [(String, String)], key: &str) -> &'a str {
    let v: Vec<&str> = s.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect();
    assert_eq!(v.len(), 1, "{key}: {v:?}");
    v[0]
}

#[test]
fn the_systemd_unit_runs_reloads_and_restarts_lb_as_documented() {
    let unit = read("packaging/lb.service");
    let s = settings(&unit, "Service");
    assert_eq!(one(&s, "ExecStart"), "/usr/local/bin/lb run --config /etc/lb/lb.toml");
    assert_eq!(one(&s, "ExecStartPre"), "/usr/local/bin/lb check --config /etc/lb/lb.toml");
    assert_eq!(one(&s, "ExecReload"), "/bin/kill -HUP $MAINPID", "reload is SIGHUP");
    assert_eq!(one(&s, "KillSignal"), "SIGTERM", "stop leaves the datapath running");
    assert_eq!(one(&s, "Restart"), "on-failure");
    assert!(settings(&unit, "Install").iter().any(|(k, v)| k == "WantedBy" && v == "multi-user.target"));
}

/// systemd's own check of the unit, with the binary where the test can point at it.
#[test]
fn systemd_analyze_verifies_the_unit() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        skip("systemd_analyze_verifies_the_unit", "systemd-analyze not installed");
        return;
    }
    verify_unit("lb.service");
}

/// `systemd-analyze verify` of `packaging/<name>`, with the binary where the test can point at it.
fn verify_unit(name: &str) {
    let unit = read(&format!("packaging/{name}"));
    let bin = tests::lb_bin();
    let dir = std::env::temp_dir().join(format!("lb-unit-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(name);
    std::fs::write(&copy, unit.replace("/usr/local/bin/lb", &bin.to_string_lossy())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains(name), "systemd-analyze verify {name}:\n{err}");
}

/// The agent's unit: `lb agent` in the foreground, stopped by SIGTERM (which detaches it), and
/// systemd's own check of it.
#[test]
fn the_agent_unit_runs_lb_agent_and_verifies() {
    let unit = read("packaging/lb-agent.service");
    let s = settings(&unit, "Service");
    assert!(one(&s, "ExecStart").starts_with("/usr/local/bin/lb agent --port "), "{unit}");
    assert_eq!(one(&s, "KillSignal"), "SIGTERM", "stopping detaches");
    assert!(settings(&unit, "Install").iter().any(|(k, v)| k == "WantedBy" && v == "multi-user.target"));
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        skip("the_agent_unit_runs_lb_agent_and_verifies", "systemd-analyze not installed");
        return;
    }
    verify_unit("lb-agent.service");
    // And the README shows it.
    assert!(read("README.md").contains("packaging/lb-agent.service"));
}

/// `cargo xtask deb`'s package: what it holds, installed with dpkg into a root of its own
/// (`dpkg --root`, an empty dpkg database there), and the installed binary checks the installed
/// example config.
#[test]
fn the_debian_package_installs_and_checks_its_example_config() {
    let bin = tests::lb_bin();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = std::env::temp_dir().join(format!("lb-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let deb = xtask::deb::build(workspace, &bin, &dir).unwrap_or_else(|e| panic!("{e:#}"));
    let version = xtask::deb::version(workspace).unwrap();
    assert!(deb.ends_with(format!("lb_{version}_amd64.deb")), "{}", deb.display());
    let contents = String::from_utf8_lossy(&Command::new("dpkg-deb").arg("--contents").arg(&deb).output().unwrap().stdout).into_owned();
    for f in ["./usr/bin/lb", "./lib/systemd/system/lb.service", "./lib/systemd/system/lb-agent.service", "./etc/lb/lb.toml", "./usr/share/man/man1/lb.1.gz"] {
        assert!(contents.contains(f), "{f} missing from the package:\n{contents}");
    }
    let root = dir.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-depends", "--force-not-root", "-i"])
        .arg(&deb)
        .output()
        .expect("dpkg");
    assert!(out.status.success(), "dpkg -i: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(status.contains("Package: lb") && status.contains("Status: install ok installed"), "{status}");
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/lb.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/lb run --config /etc/lb/lb.toml"), "{unit}");
    let installed = root.join("usr/bin/lb");
    let out = Command::new(&installed).args(["check", "--offline", "--config"]).arg(root.join("etc/lb/lb.toml")).output().unwrap();
    assert!(out.status.success(), "lb check on the example config: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok (1 service(s), 2 backend(s))"));
    let man = Command::new("sh").arg("-c").arg(format!("gzip -dc {}", root.join("usr/share/man/man1/lb.1.gz").display())).output().unwrap();
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.contains(".TH lb 1") && man.contains("LB AGENT") && man.contains("LB RELOAD"), "man page: {}", &man[..man.len().min(400)]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shipped BIRD configs carry what the README promises: the node's kernel protocol learns
/// lb's table, the router merges equal paths.
#[test]
fn the_bird_configs_learn_and_merge() {
    let node = read("packaging/bird/node.conf");
    assert!(node.contains("kernel table 4242;") && node.contains("learn;"), "node.conf learns lb's table");
    assert!(read("packaging/bird/router.conf").contains("merge paths yes;"), "router.conf installs ECMP routes");
}

/// The shipped BIRD configs parse (`bird -p`).
#[test]
fn the_bird_configs_parse() {
    if Command::new("bird").arg("--version").output().is_err() {
        skip("the_bird_configs_parse", "bird not installed");
        return;
    }
    for conf in ["packaging/bird/node.conf", "packaging/bird/router.conf"] {
        let out = Command::new("bird").arg("-p").arg("-c").arg(repo(conf)).output().expect("bird");
        assert!(out.status.success(), "bird -p {conf}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn the_containerfile_and_the_readme_agree() {
    let cf = read("packaging/Containerfile");
    assert!(cf.contains("STOPSIGNAL SIGTERM"), "docker stop must leave the datapath running");
    assert!(cf.contains(r#"ENTRYPOINT ["/usr/bin/lb"]"#));
    assert!(cf.contains(r#"CMD ["run", "--config", "/etc/lb/lb.toml"]"#), "same config path as the unit");
    assert!(cf.lines().any(|l| l.starts_with("FROM ${BASE}")), "built on the locally made base");
    let readme = read("README.md");
    let run_line = "docker run -d --name lb --privileged --network host \\\n    -v /sys/fs/bpf:/sys/fs/bpf -v /etc/lb:/etc/lb:ro -v /run/lb:/run/lb lb:latest";
    assert!(readme.contains(run_line), "README lacks the documented docker run line:\n{run_line}");
    assert!(cf.contains("docker run -d --name lb --privileged --network host"), "the Containerfile's comment shows it too");
    assert!(readme.contains("cargo xtask image") && readme.contains("packaging/lb.service"));
}
