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
    let unit = read("packaging/lb.service");
    let bin = tests::lb_bin();
    let dir = std::env::temp_dir().join(format!("lb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("lb.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/lb", &bin.to_string_lossy())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("lb.service"), "systemd-analyze verify lb.service:\n{err}");
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
    let bin = tests::lb_bin();
    let dir = std::env::temp_dir().join(format!("lb-agent-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("lb-agent.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/lb", &bin.to_string_lossy())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("lb-agent.service"), "systemd-analyze verify lb-agent.service:\n{err}");
    // And the README shows it.
    assert!(read("README.md").contains("packaging/lb-agent.service"));
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
