//! Config texts and assertions shared by the unit tests of every part of `config`.

use super::{Config, ConfigErrors, FieldError};

/// The example from the config contract, every field set.
pub(super) const FULL: &str = r#"
[datapath]
interfaces = ["eth0", "eth1"]
mode = "nat"
xdp_mode = "auto"
affinity_entries = 1048576
pin_path = "/sys/fs/bpf/lb"
max_services = 64
max_backends = 1024
maglev_table_size = 65537
hash_seed = 0

[control]
socket = "/run/lb/lb.sock"
metrics = "127.0.0.1:9940"

[announce]
table = 4242
grace = "3s"

[[services]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"

[services.affinity]
timeout = "30m"
ipv4_prefix = 32
ipv6_prefix = 64

[services.health]
kind = "http"
path = "/healthz"
host = "www.example.com"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 3

[[services.backends]]
address = "10.1.0.11"
port = 8080
weight = 100
"#;

/// Only what is required: everything else takes its default.
pub(super) const MINIMAL: &str = r#"
[datapath]
interfaces = ["eth0"]

[[services]]
name = "web"
vip = "10.0.0.100"
port = 80

[[services.backends]]
address = "10.1.0.11"
port = 8080
"#;

/// Independent mistakes spread over three services, each of which also has a mistake of its own
/// that once kept it out of the checks across services (and a file-shape mistake that once
/// stopped the read).
pub(super) const INDEPENDENT_MISTAKES: &str = r#"
[datapath]
interfaces = ["eth0"]
mode = "dsr"

[[services]]
name = "web"
vip = "10.0.0.100"
port = 80

[[services.backends]]
address = "fd00::11"
port = 8080

[[services.backends]]
address = "10.1.0.12"
port = 8080

[[services]]
name = "web"
vip = "10.0.0.100"
port = 80

[[services.backends]]
address = "10.0.0.100"
port = 0

[[services.backends]]
address = "10.1.0.12"
port = 8080

[[services]]
name = "dns"
vipp = "10.0.0.53"
port = "53"

[[services.backends]]
address = "10.1.0.31"
port = 53
"#;

/// MINIMAL with a second service (`dns`, UDP, two backends) appended.
pub(super) fn two_services(extra: &str) -> String {
    format!(
        r#"{MINIMAL}
[[services]]
name = "dns"
vip = "10.0.0.53"
port = 53
protocol = "udp"
{extra}
[[services.backends]]
address = "10.1.0.21"
port = 5353

[[services.backends]]
address = "10.1.0.22"
port = 5353
"#
    )
}

/// `base` with each `(from, to)` replaced once; `from` must occur (guards against typos that
/// would silently test the unedited config).
pub(super) fn edit(base: &str, edits: &[(&str, &str)]) -> String {
    let mut s = base.to_owned();
    for (from, to) in edits {
        assert!(s.contains(from), "test bug: {from:?} not in config");
        s = s.replacen(from, to, 1);
    }
    s
}

pub(super) fn errors(text: &str) -> Vec<FieldError> {
    match Config::parse(text) {
        Ok(c) => panic!("expected errors, got {c:#?}\nfrom:\n{text}"),
        Err(e) => e.0,
    }
}

/// Asserts that `text` is rejected with an error on exactly `field` whose message contains
/// `needle`.
#[track_caller]
pub(super) fn rejects(text: &str, field: &str, needle: &str) {
    let errs = errors(text);
    assert!(
        errs.iter().any(|e| e.field == field && e.message.contains(needle)),
        "expected `{field}: ...{needle}...`, got:\n{}",
        ConfigErrors(errs.clone())
    );
}

#[track_caller]
pub(super) fn rejects_minimal(edits: &[(&str, &str)], field: &str, needle: &str) {
    rejects(&edit(MINIMAL, edits), field, needle);
}

/// Adds `line` to the [datapath] table of MINIMAL.
pub(super) fn datapath(line: &str) -> String {
    edit(MINIMAL, &[("interfaces = [\"eth0\"]", &format!("interfaces = [\"eth0\"]\n{line}"))])
}

/// Adds `lines` to services[0] of MINIMAL (as keys, or as a sub-table before the backends).
pub(super) fn service(lines: &str) -> String {
    edit(MINIMAL, &[("port = 80\n", &format!("port = 80\n{lines}\n"))])
}

/// Adds `line` to services[0].backends[0] of MINIMAL.
pub(super) fn backend(line: &str) -> String {
    edit(MINIMAL, &[("port = 8080", &format!("port = 8080\n{line}"))])
}
