//! End-to-end tests of the datapath's breadth: IPv6 services with per-/64 affinity, IP fragments,
//! 802.1Q / QinQ tagged traffic and direct server return, with the real `lb` binary in the
//! namespace lab (see `xtask::lab`, whose topology options these tests use; its VLAN devices are
//! stand-ins that also work on kernels without 802.1Q support).
//!
//! Run as root: `LB_BIN=target/release/lb cargo test -p tests --test breadth_e2e --
//! --test-threads=1`. The binary comes from `LB_BIN`, else `<workspace>/target/release/lb`. Every
//! lab lives in its own network namespaces, which are removed when the test ends, also when it
//! fails; traffic stays inside them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use lb::api::{ServiceReport, StatusReport};
use tests::lb_bin;
use xtask::lab::{
    CLIENT_PROBE_ADDR, CLIENT_PROBE_ADDR6, Ipv6Options, Lab, LabOptions, LabSpec,
    VIP_HTTP_PORT, VIP_UDP_PORT, VlanOptions,
};

/// Per request; generous for a 2-core machine, small enough that a dead path fails fast.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Until the first request through the VIP succeeds (health checks may still be settling).
const WARMUP: Duration = Duration::from_secs(15);


/// Panics with `msg`, the tail of lb's log, its verdict counters and the balancer namespace's
/// interface counters (drops included: a failed XDP redirect shows there).
fn fail(lab: &Lab, msg: &str) -> ! {
    let verdicts = lab
        .lb_cli(&lb_bin(), &["status"])
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("verdicts") || l.starts_with("service"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|e| format!("lb status: {e:#}"));
    let links = lab
        .all_link_stats(lab.ns_lb())
        .map(|all| {
            all.iter()
                .map(|(name, s)| {
                    format!(
                        "{name}: rx {} pkts ({} dropped), tx {} pkts ({} dropped)",
                        s.rx_packets, s.rx_dropped, s.tx_packets, s.tx_dropped
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|e| format!("{e:#}"));
    panic!(
        "{msg}\n--- lb status ---\n{verdicts}\n--- interfaces in {} ---\n{links}\n--- last 40 lines of {} ---\n{}\n---",
        lab.ns_lb(),
        lab.log_path().display(),
        lab.lb_log_tail(40)
    )
}

/// A lab with `options`, lb started in it.
fn lab_with_lb(bin: &Path, spec: LabSpec, options: LabOptions) -> Lab {
    let mut lab = Lab::create_with(spec, options).unwrap_or_else(|e| panic!("{e:#}"));
    // The error already carries the log tail.
    lab.start_lb(bin).unwrap_or_else(|e| panic!("{e:#}"));
    lab
}

/// Retries `probe` (from an address that is not one of the measured clients) until it succeeds,
/// so that the measurement does not race the daemon's first health checks.
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

/// `lb status --output json` from the running daemon.
fn status(lab: &Lab, bin: &Path) -> StatusReport {
    let out = lab
        .lb_cli(bin, &["status", "--output", "json"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    if !out.status.success() {
        fail(
            lab,
            &format!("lb status failed: {}", String::from_utf8_lossy(&out.stderr)),
        );
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lb status JSON: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn service<'a>(status: &'a StatusReport, name: &str) -> &'a ServiceReport {
    status
        .services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("service {name} not in lb status"))
}

fn stat(status: &StatusReport, name: &str) -> u64 {
    *status.stats.get(name).unwrap_or_else(|| {
        panic!(
            "verdict counter {name} not in lb status: {:?}",
            status.stats
        )
    })
}

/// The first line of a backend's answer (`backend-<i>`).
fn backend_name(body: &str) -> String {
    body.lines().next().unwrap_or_default().trim().to_owned()
}

/// Asserts that every client in `answers` (client -> backend per request) always reached the same
/// backend, and returns clients per backend.
fn check_sticky<K: Ord + std::fmt::Debug>(
    lab: &Lab,
    what: &str,
    answers: &BTreeMap<K, Vec<String>>,
) -> BTreeMap<String, usize> {
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut unsticky = Vec::new();
    for (client, backends) in answers {
        let distinct: BTreeSet<&String> = backends.iter().collect();
        match distinct.len() {
            1 => *per_backend.entry(backends[0].clone()).or_default() += 1,
            0 => unsticky.push(format!("{client:?}: no answers")),
            _ => unsticky.push(format!("{client:?} -> {backends:?}")),
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
    eprintln!("{what}: clients per backend {per_backend:?}");
    per_backend
}

/// Asserts that every backend of the lab is in `per_backend`.
fn check_every_backend(lab: &Lab, what: &str, per_backend: &BTreeMap<String, usize>) {
    let expected: BTreeSet<String> = (1..=lab.spec().backends)
        .map(|i| format!("backend-{i}"))
        .collect();
    let reached: BTreeSet<String> = per_backend.keys().cloned().collect();
    if reached != expected {
        fail(
            lab,
            &format!(
                "{what}: clients per backend {per_backend:?}; expected every one of {expected:?} to get one"
            ),
        );
    }
}

fn fail_on_errors(lab: &Lab, what: &str, total: usize, failures: &[String]) {
    if !failures.is_empty() {
        fail(
            lab,
            &format!(
                "{what}: {} of {total} requests failed:\n{}",
                failures.len(),
                failures.join("\n")
            ),
        );
    }
}

/// IPv6 service on the VIP 2001:db8:ffff::1 with the default `ipv6_prefix` (64): 16 client /64s
/// with 3 addresses each, 3 connections per address. Every address of a /64 reaches the same
/// backend, the /64s spread over all three backends, no request fails, and the balancer made
/// exactly one pin per /64 (not one per address). IPv4 keeps working in the dual-stack lab.
#[test]
fn ipv6_affinity_by_prefix() {
    let bin = lb_bin();
    const PREFIXES: u32 = 16;
    const PER_PREFIX: u32 = 3;
    const CONNECTIONS: usize = 3;
    let lab = lab_with_lb(
        &bin,
        LabSpec {
            clients: 4,
            backends: 3,
        },
        LabOptions::default().with_ipv6(Ipv6Options {
            client_prefixes: PREFIXES,
            addrs_per_prefix: PER_PREFIX,
            affinity_prefix: None,
        }),
    );
    let vip6 = SocketAddr::from((lab.vip6(), VIP_HTTP_PORT));
    warm_up(
        &lab,
        &format!("GET http://{vip6}/ from {CLIENT_PROBE_ADDR6}"),
        || lab.http_get_from(CLIENT_PROBE_ADDR6.into(), vip6, "/", REQUEST_TIMEOUT),
    );

    let mut per_prefix: BTreeMap<Ipv6Addr, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut total = 0;
    for (prefix, addrs) in lab.client_prefixes6() {
        for client in addrs {
            for n in 1..=CONNECTIONS {
                total += 1;
                match lab.http_get_from(client.into(), vip6, "/", REQUEST_TIMEOUT) {
                    Ok(body) => per_prefix
                        .entry(prefix)
                        .or_default()
                        .push(backend_name(&body)),
                    Err(e) => failures.push(format!("{client} request {n}: {e:#}")),
                }
            }
        }
    }
    fail_on_errors(&lab, "IPv6", total, &failures);
    assert_eq!(per_prefix.len(), PREFIXES as usize);
    let per_backend = check_sticky(&lab, "IPv6 /64s", &per_prefix);
    check_every_backend(&lab, "IPv6 /64s", &per_backend);

    let st = status(&lab, &bin);
    let web6 = service(&st, "web6");
    // One pin per /64: PREFIXES measured ones and the probe's 2001:db8:c::/64.
    if web6.counters.new_pins != u64::from(PREFIXES) + 1 {
        fail(
            &lab,
            &format!(
                "web6 made {} pins, expected one per client /64 ({}): {:?}",
                web6.counters.new_pins,
                PREFIXES + 1,
                web6.counters
            ),
        );
    }
    assert!(
        web6.counters.reply_packets > 0 && web6.counters.packets > 0,
        "web6 counters: {:?}",
        web6.counters
    );
    // Each request reached exactly one backend server, once.
    let served: u64 = (1..=3).map(|i| lab.backend_stats(i).http).sum();
    assert!(
        served >= total as u64,
        "backends served {served} of {total}"
    );

    // IPv4 in the same (dual-stack) lab still works.
    let vip4 = SocketAddr::from((lab.vip(), VIP_HTTP_PORT));
    for client in lab.client_addrs() {
        if let Err(e) = lab.http_get_from(client.into(), vip4, "/", REQUEST_TIMEOUT) {
            fail(&lab, &format!("IPv4 in the dual-stack lab: {e:#}"));
        }
    }
}

/// UDP datagrams larger than the 1500-byte MTU, fragmented by the client's kernel, through the
/// VIP (IPv4 and IPv6), with equally large replies fragmented by the backend's kernel. The backend
/// must receive every datagram whole (its reply states the length and FNV-1a hash of what it
/// got), the reply must arrive whole and from the VIP, each client's datagrams (fragmented or
/// not) always reach the same backend, and the balancer counted translated later fragments and no
/// unplaced ones.
#[test]
fn fragmented_udp_reaches_the_right_backend_whole() {
    let bin = lb_bin();
    const ROUNDS: usize = 4;
    let lab = lab_with_lb(
        &bin,
        LabSpec {
            clients: 8,
            backends: 3,
        },
        LabOptions::default().with_ipv6(Ipv6Options {
            client_prefixes: 8,
            addrs_per_prefix: 1,
            affinity_prefix: None,
        }),
    );
    let vip4 = SocketAddr::from((lab.vip(), VIP_UDP_PORT));
    let vip6 = SocketAddr::from((lab.vip6(), VIP_UDP_PORT));
    for (probe, vip) in [
        (IpAddr::from(CLIENT_PROBE_ADDR), vip4),
        (IpAddr::from(CLIENT_PROBE_ADDR6), vip6),
    ] {
        warm_up(&lab, &format!("UDP check to {vip} from {probe}"), || {
            lab.udp_check(probe, vip, 100, 100, Duration::from_millis(500))
        });
    }
    let before = status(&lab, &bin);

    let clients: Vec<(IpAddr, SocketAddr)> = lab
        .client_addrs()
        .into_iter()
        .map(|a| (IpAddr::from(a), vip4))
        .chain(
            lab.client_addrs6()
                .into_iter()
                .map(|a| (IpAddr::from(a), vip6)),
        )
        .collect();
    // (request, reply) sizes: one small datagram, then fragmented ones both ways (3 and 7
    // fragments at a 1500-byte MTU), and a small request with a fragmented reply.
    let sizes = [
        (200, 200),
        (3000, 3000),
        (9000, 9000),
        (200, 5000),
        (5000, 200),
    ];
    let mut answers: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut total = 0;
    let mut fragmented = 0;
    for round in 0..ROUNDS {
        for &(client, vip) in &clients {
            for &(size, reply) in &sizes {
                total += 1;
                if size > 1400 {
                    fragmented += 1;
                }
                match lab.udp_check(client, vip, size, reply, REQUEST_TIMEOUT) {
                    Ok(c) if c.from == vip => answers.entry(client).or_default().push(c.backend),
                    Ok(c) => failures.push(format!(
                        "round {round}, {client}, {size}/{reply} bytes: reply from {}, not from {vip} ({c:?})",
                        c.from
                    )),
                    Err(e) => {
                        failures.push(format!("round {round}, {client}, {size}/{reply} bytes: {e:#}"))
                    }
                }
            }
        }
    }
    fail_on_errors(&lab, "fragmented UDP", total, &failures);
    let v4: BTreeMap<IpAddr, Vec<String>> = answers
        .iter()
        .filter(|(c, _)| c.is_ipv4())
        .map(|(c, b)| (*c, b.clone()))
        .collect();
    let v6: BTreeMap<IpAddr, Vec<String>> = answers
        .iter()
        .filter(|(c, _)| c.is_ipv6())
        .map(|(c, b)| (*c, b.clone()))
        .collect();
    for (what, answers) in [("IPv4 UDP", &v4), ("IPv6 UDP", &v6)] {
        let per_backend = check_sticky(&lab, what, answers);
        // Several backends take part, so "same backend" is not the only possible answer.
        if per_backend.len() < 2 {
            fail(
                &lab,
                &format!("{what}: all clients on one backend: {per_backend:?}"),
            );
        }
    }

    let after = status(&lab, &bin);
    let delta = |name: &str| stat(&after, name) - stat(&before, name);
    // Each fragmented request has at least 2 later fragments, each fragmented reply too.
    let later_fragments = delta("fragment");
    if later_fragments < 2 * fragmented as u64 {
        fail(
            &lab,
            &format!(
                "only {later_fragments} later fragments translated for {fragmented} fragmented requests: {:?}",
                after.stats
            ),
        );
    }
    for name in ["drop_frag_unplaced", "drop_fragment", "drop_malformed"] {
        if delta(name) != 0 {
            fail(
                &lab,
                &format!("{name} went up by {}: {:?}", delta(name), after.stats),
            );
        }
    }
    for name in ["dns", "dns6"] {
        let c = &service(&after, name).counters;
        let b = &service(&before, name).counters;
        assert!(
            c.packets > b.packets && c.reply_packets > b.reply_packets,
            "{name}: {b:?} -> {c:?}"
        );
    }
}

/// VLAN traffic through the VIP: HTTP works for every client, is sticky per client and spreads
/// over every backend, UDP too (replies from the VIP), and the verdict counters show that the
/// XDP program saw the tags: every client -> VIP packet took `pass_vlan` (tagged, rewritten and
/// handed to the kernel because it leaves through another interface), and with tagged backend
/// links every reply too.
fn vlan_case(vlan: VlanOptions) {
    let bin = lb_bin();
    const CONNECTIONS: usize = 4;
    let lab = lab_with_lb(
        &bin,
        LabSpec {
            clients: 12,
            backends: 3,
        },
        LabOptions::default().with_vlan(vlan),
    );
    let vip = SocketAddr::from((lab.vip(), VIP_HTTP_PORT));
    warm_up(
        &lab,
        &format!("GET http://{vip}/ from {CLIENT_PROBE_ADDR}"),
        || lab.http_get_from(CLIENT_PROBE_ADDR.into(), vip, "/", REQUEST_TIMEOUT),
    );
    let before = status(&lab, &bin);

    let mut answers: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut total = 0;
    for client in lab.client_addrs() {
        for n in 1..=CONNECTIONS {
            total += 1;
            match lab.http_get_from(client.into(), vip, "/", REQUEST_TIMEOUT) {
                Ok(body) => answers.entry(client).or_default().push(backend_name(&body)),
                Err(e) => failures.push(format!("{client} request {n}: {e:#}")),
            }
        }
    }
    let udp_vip = SocketAddr::from((lab.vip(), VIP_UDP_PORT));
    let mut udp_answers: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    for client in lab.client_addrs() {
        for n in 1..=2 {
            total += 1;
            match lab.udp_query_from(client.into(), udp_vip, REQUEST_TIMEOUT) {
                Ok((body, from)) if from == udp_vip => udp_answers
                    .entry(client)
                    .or_default()
                    .push(backend_name(&body)),
                Ok((_, from)) => failures.push(format!(
                    "{client} UDP {n}: reply from {from}, not {udp_vip}"
                )),
                Err(e) => failures.push(format!("{client} UDP {n}: {e:#}")),
            }
        }
    }
    fail_on_errors(&lab, "VLAN", total, &failures);
    let per_backend = check_sticky(&lab, "VLAN TCP", &answers);
    check_every_backend(&lab, "VLAN TCP", &per_backend);
    check_sticky(&lab, "VLAN UDP", &udp_answers);

    let after = status(&lab, &bin);
    let delta = |name: &str| stat(&after, name) - stat(&before, name);
    // Every client -> VIP packet of the measurement arrived tagged and had to change interface,
    // so the kernel had to forward it (pass_vlan, or pass_fib while a neighbour was unresolved);
    // so did every reply when the backend links are tagged too, and then nothing may have been
    // sent on by XDP itself (that would have lost or misplaced the tags).
    let (to_vip, reply) = (delta("to_vip"), delta("reply"));
    let (vlan_path, fib) = (delta("pass_vlan"), delta("pass_fib"));
    let expected = if vlan.backend_vid.is_some() {
        to_vip + reply
    } else {
        to_vip
    };
    if to_vip == 0 || reply == 0 || vlan_path == 0 || vlan_path + fib < expected {
        fail(
            &lab,
            &format!(
                "{to_vip} packets to the VIP and {reply} replies, but only {vlan_path} took the \
                 tagged path (pass_vlan) and {fib} pass_fib, expected at least {expected} together"
            ),
        );
    }
    if vlan.backend_vid.is_some() && delta("redirect") + delta("tx") != 0 {
        fail(
            &lab,
            &format!(
                "tagged frames were sent on by XDP (redirect {}, tx {})",
                delta("redirect"),
                delta("tx")
            ),
        );
    }
}

/// Client traffic in 802.1Q VLAN 100 between the client and the balancer (`eth0.100` on both
/// ends; the balancer's XDP program stays on its physical `eth0` and sees the tagged frames), the
/// backend links untagged: the requests' way in is tagged, and the replies' way out (FIB egress
/// `eth0.100`, a device XDP cannot transmit on) must go through the kernel, whose VLAN device tags
/// them.
#[test]
fn vlan_tagged_traffic() {
    vlan_case(VlanOptions {
        client_vid: 100,
        client_outer_vid: None,
        backend_vid: None,
    });
}

/// 802.1Q on every link: VLAN 100 toward the clients, VLAN 200 toward every backend, so both
/// directions arrive tagged and leave through another interface's VLAN device.
#[test]
fn vlan_tagged_traffic_on_every_link() {
    vlan_case(VlanOptions {
        client_vid: 100,
        client_outer_vid: None,
        backend_vid: Some(200),
    });
}

/// QinQ toward the clients (802.1ad service VLAN 20 around 802.1Q VLAN 100), 802.1Q VLAN 200
/// toward the backends.
#[test]
fn qinq_tagged_traffic() {
    vlan_case(VlanOptions {
        client_vid: 100,
        client_outer_vid: Some(20),
        backend_vid: Some(200),
    });
}

/// Direct server return on one L2 segment (a bridge joining the client, the balancer and three
/// backends that hold the VIP on `lo`): HTTP through the VIP works for every client, is sticky and
/// spreads over every backend, UDP answers come from the VIP, and the replies bypass the
/// balancer: its services counted requests but no reply packet, no `reply` verdict, and its
/// interface received far fewer bytes than the (20 kB) responses the clients got.
#[test]
fn dsr_replies_bypass_the_balancer() {
    let bin = lb_bin();
    const CONNECTIONS: usize = 3;
    const BODY: usize = 20_000;
    let lab = lab_with_lb(
        &bin,
        LabSpec {
            clients: 12,
            backends: 3,
        },
        LabOptions::default().with_dsr(),
    );
    let vip = SocketAddr::from((lab.vip(), VIP_HTTP_PORT));
    warm_up(
        &lab,
        &format!("GET http://{vip}/ from {CLIENT_PROBE_ADDR}"),
        || lab.http_get_from(CLIENT_PROBE_ADDR.into(), vip, "/", REQUEST_TIMEOUT),
    );
    let before = status(&lab, &bin);
    let link_before = lab
        .link_stats(lab.ns_lb(), "eth0")
        .unwrap_or_else(|e| panic!("{e:#}"));

    let path = format!("/bytes/{BODY}");
    let mut answers: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut total = 0;
    let mut received = 0;
    for client in lab.client_addrs() {
        for n in 1..=CONNECTIONS {
            total += 1;
            match lab.http_get_from(client.into(), vip, &path, REQUEST_TIMEOUT) {
                Ok(body) if body.len() == BODY => {
                    received += body.len();
                    answers.entry(client).or_default().push(backend_name(&body))
                }
                Ok(body) => failures.push(format!(
                    "{client} request {n}: {} bytes, expected {BODY}",
                    body.len()
                )),
                Err(e) => failures.push(format!("{client} request {n}: {e:#}")),
            }
        }
    }
    let link_after = lab
        .link_stats(lab.ns_lb(), "eth0")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let udp_vip = SocketAddr::from((lab.vip(), VIP_UDP_PORT));
    for client in lab.client_addrs() {
        total += 1;
        match lab.udp_query_from(client.into(), udp_vip, REQUEST_TIMEOUT) {
            Ok((_, from)) if from == udp_vip => {}
            Ok((_, from)) => {
                failures.push(format!("{client} UDP: reply from {from}, not {udp_vip}"))
            }
            Err(e) => failures.push(format!("{client} UDP: {e:#}")),
        }
    }
    fail_on_errors(&lab, "DSR", total, &failures);
    let per_backend = check_sticky(&lab, "DSR TCP", &answers);
    check_every_backend(&lab, "DSR TCP", &per_backend);

    let after = status(&lab, &bin);
    let web = service(&after, "web");
    let web_before = service(&before, "web");
    if web.counters.packets <= web_before.counters.packets {
        fail(&lab, &format!("web forwarded nothing: {:?}", web.counters));
    }
    let replies: u64 = after
        .services
        .iter()
        .map(|s| s.counters.reply_packets)
        .chain(
            after
                .services
                .iter()
                .flat_map(|s| s.backends.iter().map(|b| b.counters.reply_packets)),
        )
        .sum();
    if replies != 0 || stat(&after, "reply") != 0 {
        fail(
            &lab,
            &format!(
                "replies went through the balancer ({replies} reply packets, verdict reply {}): {:?}",
                stat(&after, "reply"),
                after.stats
            ),
        );
    }
    // XDP_TX: the frames left the way they came, toward the backends.
    if stat(&after, "tx") <= stat(&before, "tx") {
        fail(&lab, &format!("no XDP_TX: {:?}", after.stats));
    }
    let rx = link_after.rx_bytes - link_before.rx_bytes;
    eprintln!(
        "DSR: the balancer's eth0 received {rx} bytes while the clients received {received} bytes of bodies"
    );
    if rx * 4 > received as u64 {
        fail(
            &lab,
            &format!(
                "the balancer's eth0 received {rx} bytes during the measurement, while clients got \
                 {received} bytes of responses: the replies went through it"
            ),
        );
    }
}

/// One IPv4 neighbour entry of a namespace, as `ip -j -d neigh show` reports it (read with
/// iproute2, not with lb's own netlink code, so that a bug there cannot hide itself).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Neighbour {
    dev: String,
    lladdr: Option<String>,
    managed: bool,
    state: Vec<String>,
    protocol: Option<String>,
}

/// The IPv4 neighbour entries of namespace `ns`, by address.
fn neighbours(lab: &Lab, ns: &str) -> BTreeMap<Ipv4Addr, Neighbour> {
    let out = xtask::lab::output_timeout(
        std::process::Command::new("ip").args(["-n", ns, "-4", "-j", "-d", "neigh", "show"]),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| fail(lab, &format!("ip neigh show in {ns}: {e:#}")));
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        fail(
            lab,
            &format!("ip -j neigh show: {e}: {}", String::from_utf8_lossy(&out.stdout)),
        )
    });
    let text = |v: &serde_json::Value, k: &str| v.get(k).and_then(|s| s.as_str()).map(str::to_owned);
    all.iter()
        .filter_map(|v| {
            let dst: Ipv4Addr = text(v, "dst")?.parse().ok()?;
            let state = v
                .get("state")
                .and_then(|s| s.as_array())
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            Some((
                dst,
                Neighbour {
                    dev: text(v, "dev").unwrap_or_default(),
                    lladdr: text(v, "lladdr"),
                    managed: v.get("managed").is_some(),
                    state,
                    protocol: text(v, "protocol"),
                },
            ))
        })
        .collect()
}

/// Waits until `ok` holds for the balancer's neighbour table (lb keeps it every few seconds).
fn wait_neighbours(lab: &Lab, what: &str, ok: impl Fn(&BTreeMap<Ipv4Addr, Neighbour>) -> bool) {
    let started = Instant::now();
    loop {
        let table = neighbours(lab, lab.ns_lb());
        if ok(&table) {
            return;
        }
        if started.elapsed() > Duration::from_secs(15) {
            fail(lab, &format!("{what}: not within 15 s; the balancer's neighbours: {table:#?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// lb's managed entry, resolved: what keeps a DSR backend's MAC without traffic.
fn kept_resolved(n: Option<&Neighbour>) -> bool {
    n.is_some_and(|n| {
        n.managed
            && n.protocol.as_deref() == Some("242")
            && n.lladdr.is_some()
            && n.state.iter().any(|s| s == "REACHABLE" || s == "STALE" || s == "DELAY" || s == "PROBE")
    })
}

/// DSR without health checks: nothing but lb's managed neighbour entries resolves the backends'
/// MACs (a DSR packet still addressed to the VIP cannot go to the kernel), so every client's very
/// first request succeeds and nothing is dropped for a missing next hop.
#[test]
fn neighbours_kept_dsr_without_health_checks_answers_the_first_request() {
    let bin = lb_bin();
    let lab = lab_with_lb(
        &bin,
        LabSpec { clients: 6, backends: 3 },
        LabOptions::default()
            .with_dsr()
            .with_health_kind(xtask::lab::HealthKind::None),
    );
    let backends: Vec<Ipv4Addr> = (1..=3).map(|i| lab.backend_addr(i)).collect();
    wait_neighbours(&lab, "a resolved managed neighbour entry for every backend", |t| {
        backends.iter().all(|b| kept_resolved(t.get(b)))
    });
    let vip = SocketAddr::from((lab.vip(), VIP_HTTP_PORT));
    let mut failures = Vec::new();
    for client in lab.client_addrs() {
        // One try each: a dropped SYN would need the kernel's 1 s retransmission, so the timeout
        // is shorter than that.
        if let Err(e) = lab.http_get_from(client.into(), vip, "/", Duration::from_millis(900)) {
            failures.push(format!("{client}: first request: {e:#}"));
        }
    }
    fail_on_errors(&lab, "DSR without health checks", lab.client_addrs().len(), &failures);
    let after = status(&lab, &bin);
    if stat(&after, "drop_fib") != 0 {
        fail(&lab, &format!("packets dropped for want of a next hop: {:?}", after.stats));
    }
}

/// The keeper removes the entries of backends a reload removed, and all of its entries on
/// `lb down`, and never touches an operator's PERMANENT entry.
#[test]
fn neighbours_follow_the_backends_and_spare_permanent_entries() {
    let bin = lb_bin();
    let options = LabOptions::default()
        .with_dsr()
        .with_health_kind(xtask::lab::HealthKind::None);
    let mut lab = Lab::create_with(LabSpec { clients: 2, backends: 3 }, options.clone())
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Backends 1..=3 at b[0..3].
    let b: Vec<Ipv4Addr> = (1..=3).map(|i| lab.backend_addr(i)).collect();
    // The operator's static entry for backend 3, with a MAC of its own choosing.
    const STATIC_MAC: &str = "02:00:00:00:42:42";
    let out = xtask::lab::output_timeout(
        std::process::Command::new("ip").args([
            "-n",
            lab.ns_lb(),
            "neigh",
            "replace",
            &b[2].to_string(),
            "dev",
            "eth0",
            "lladdr",
            STATIC_MAC,
            "nud",
            "permanent",
        ]),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.status.success(), "ip neigh replace: {}", String::from_utf8_lossy(&out.stderr));
    let permanent_kept = |t: &BTreeMap<Ipv4Addr, Neighbour>| {
        t.get(&b[2]).is_some_and(|n| {
            n.lladdr.as_deref() == Some(STATIC_MAC)
                && n.state == ["PERMANENT"]
                && !n.managed
                && n.dev == "eth0"
        })
    };
    lab.start_lb(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    wait_neighbours(&lab, "managed entries for backends 1 and 2", |t| {
        kept_resolved(t.get(&b[0])) && kept_resolved(t.get(&b[1]))
    });
    let table = neighbours(&lab, lab.ns_lb());
    if !permanent_kept(&table) {
        fail(&lab, &format!("the operator's PERMANENT entry for {} changed: {table:#?}", b[2]));
    }

    // Reload with backend 1 only: the entry for backend 2 goes, the permanent one stays.
    lab.set_options(options.with_backends(1)).unwrap_or_else(|e| panic!("{e:#}"));
    let out = lab.lb_cli(&bin, &["reload"]).unwrap_or_else(|e| panic!("{e:#}"));
    if !out.status.success() {
        fail(&lab, &format!("lb reload: {}", String::from_utf8_lossy(&out.stderr)));
    }
    wait_neighbours(&lab, "the removed backend's entry removed", |t| {
        !t.contains_key(&b[1]) && kept_resolved(t.get(&b[0]))
    });
    let table = neighbours(&lab, lab.ns_lb());
    if !permanent_kept(&table) {
        fail(&lab, &format!("reload: the operator's PERMANENT entry for {} changed: {table:#?}", b[2]));
    }

    // `lb down` while running: lb's entries go, the operator's stays.
    let out = lab.lb_down(&bin).unwrap_or_else(|e| panic!("{e:#}"));
    if !out.status.success() {
        fail(&lab, &format!("lb down: {}", String::from_utf8_lossy(&out.stderr)));
    }
    wait_neighbours(&lab, "lb down removes lb's entries", |t| {
        !t.values().any(|n| n.protocol.as_deref() == Some("242"))
    });
    let table = neighbours(&lab, lab.ns_lb());
    if !permanent_kept(&table) {
        fail(&lab, &format!("lb down: the operator's PERMANENT entry for {} changed: {table:#?}", b[2]));
    }
}
