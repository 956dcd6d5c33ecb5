//! The namespace lab that `cargo xtask run`, the end-to-end tests and the benchmarks share.
//!
//! ```text
//!  ns <p>-cl                  ns <p>-lb (lb runs here)                 ns <p>-b<i>
//!  eth0 10.200.1.2/24  <──>  eth0 10.200.1.1/24
//!       + 10.200.1.10..                eth<i> 10.200.(10+i).1/24  <──>  eth0 10.200.(10+i).2/24
//!       default via .1.1                                                   default via .(10+i).1
//!                                                                          HTTP :8080, UDP :5353
//! ```
//!
//! The VIP (10.200.100.1) lives on no interface: clients reach it through their default route,
//! and the XDP program on the balancer's `eth0` catches it. Without `lb` the VIP is unreachable
//! (the balancer namespace has no route to it), while the backends' own addresses are reachable
//! through plain kernel forwarding.
//!
//! Everything the lab makes is named after `<p>` = `lb<pid>-<counter>`, so labs of concurrent
//! tests never collide, and all of it is removed when the [`Lab`] is dropped, also while a
//! test panics. Veths are created directly inside their namespaces, so the root namespace's
//! network configuration is never touched. The backend servers are threads of this process whose
//! sockets were made inside the backend namespaces (see [`in_netns`]); they can be stopped and
//! started again ([`Lab::stop_backend`], [`Lab::start_backend`]) and more backends added
//! ([`Lab::add_backend`]).
//!
//! Topology variants ([`LabOptions`], fixed when the lab is created):
//!
//! - [`LabOptions::ipv6`]: IPv6 on every link as well (clients spread over /64s of
//!   2001:db8:c::/48, a /64 per backend link, forwarding on in the balancer), and the IPv6
//!   services `web6`/`dns6` on [`VIP6`]; see [`Ipv6Options`].
//! - [`LabOptions::vlan`]: 802.1Q (or QinQ) tagged client link, optionally tagged backend links;
//!   the addresses sit on VLAN devices `eth0.<vid>` while the balancer's XDP program stays on the
//!   physical interfaces; see [`VlanOptions`] (the VLAN devices are stand-ins built from macvlan
//!   and TCX programs, since the kernel may lack 802.1Q support).
//! - [`LabOptions::dsr`]: one L2 segment instead of point-to-point links, for `mode = "dsr"`:
//!
//! ```text
//!  ns <p>-cl 10.200.1.2/24 + .10..      ns <p>-sw: bridge br0     ns <p>-lb  eth0 10.200.1.1/24
//!       eth0 ───────────────────── cl ─┤                     ├─ lb ──── eth0 (XDP)
//!                                       ├─ b<i> ── ns <p>-b<i> eth0 10.200.1.(200+i)/24, VIP on lo
//! ```
//!
//! `lb` runs under `nsenter --net=/run/netns/<p>-lb`, which changes only its network namespace
//! (`ip netns exec` would also give it a private mount namespace and `/sys`, and its pins would
//! die with it). The lab's config pins to `/run/lb-lab/<p>/bpf`, where `lb` mounts a bpffs itself,
//! so a restarted `lb` finds the pins of the one before ([`Lab::restart_lb`]).
//!
//! The parts, in `lab/`: `topology.rs` (size and options, the namespaces, veths, addresses and
//! routes [`Lab::create`] builds and dropping removes), `config.rs` (the balancer config),
//! `backends.rs` (the backend servers), `process.rs` (the `lb` process: run, CLI, signals, log),
//! `client.rs` (requests and traffic from the client namespace), `system.rs` (command,
//! namespace, mount and interface counter helpers), `http.rs` (the servers and clients
//! themselves), `traffic.rs` (background traffic and its summaries), `bpf.rs` (the lab's own
//! eBPF programs) and `cluster.rs` (the two-node cluster lab).

mod backends;
mod bpf;
mod client;
pub mod cluster;
mod config;
mod http;
mod process;
mod system;
mod topology;
mod traffic;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

pub use backends::BackendStats;
pub use bpf::{ETH_P_8021AD, ETH_P_8021Q};
pub use http::{HttpConn, UdpCheck};
pub use system::{LinkStats, in_netns, is_root, output_timeout};
pub use topology::{
    HealthKind, HealthOptions, Ipv6Options, LabOptions, LabSpec, VlanOptions, backend_addr,
    backend_addr6, client_prefix6, dsr_backend_addr,
};
pub use traffic::{
    ClientSummary, Record, TRAFFIC_REQUEST_TIMEOUT, TrafficHandle, TrafficOptions, TrafficSummary,
    summarize,
};

// What `cluster` takes from here besides the above.
use backends::{Backend, Servers};
use system::{ethtool_lab_offloads, ip, set_sysctls, unmount_under, wait_links_running};
use topology::sweep_stale;

/// The virtual IP of both lab services; configured on no interface (in the DSR topology: on
/// every backend's `lo`).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 1);
/// The IPv6 VIP of the IPv6 services `web6` and `dns6` of a lab with [`LabOptions::ipv6`].
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
/// The balancer's client-side IPv6 address (the clients' default router), on a /48.
pub const LB_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
/// The client namespace's own IPv6 address (not one of the measured clients; for probes).
pub const CLIENT_PROBE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);
/// The client namespace's own IPv4 address (not one of the measured clients; for probes).
pub const CLIENT_PROBE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// Service ports of the DSR topology's backends: DSR rewrites no port, so a backend serves the
/// service port itself.
pub const DSR_BACKEND_HTTP_PORT: u16 = VIP_HTTP_PORT;
/// See [`DSR_BACKEND_HTTP_PORT`].
pub const DSR_BACKEND_UDP_PORT: u16 = VIP_UDP_PORT;
/// Most client addresses of a DSR lab (10.200.1.10 .. 10.200.1.199; backends follow at .201).
pub const DSR_MAX_CLIENTS: u32 = 190;
/// Service port of the `web` (TCP/HTTP) service on the VIP.
pub const VIP_HTTP_PORT: u16 = 80;
/// Service port of the `dns` (UDP) service on the VIP.
pub const VIP_UDP_PORT: u16 = 53;
/// Port of every backend's HTTP server.
pub const BACKEND_HTTP_PORT: u16 = 8080;
/// Port of every backend's UDP echo-ish server.
pub const BACKEND_UDP_PORT: u16 = 5353;
/// Most backends a lab can have (addresses 10.200.11.2 .. 10.200.60.2).
pub const MAX_BACKENDS: u32 = 50;

/// Where `ip netns add` puts its namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// Per-lab working directories (config, control socket, lb log, pins) live under here.
const LAB_ROOT: &str = "/run/lb-lab";
/// Upper bound for one helper command (`ip`, `ethtool`, `lb status`): nothing here may hang.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for the best-effort `lb down` when a lab is dropped.
const LB_DOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Lab::start_lb`] waits for `lb status` to answer.
const LB_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Grace period between SIGTERM and SIGKILL in [`Lab::stop_lb`].
const LB_STOP_GRACE: Duration = Duration::from_secs(5);

/// A running lab: namespaces, veths, backend servers, config file, and optionally `lb`.
///
/// Dropping it stops `lb` (SIGTERM, SIGKILL after 5 s), runs `lb down --config <cfg>` when a
/// binary is known and pins are left, stops the servers, lazily unmounts whatever is mounted
/// under `/run/lb-lab/<p>` (the bpffs), removes that directory and deletes every namespace.
pub struct Lab {
    prefix: String,
    /// Current size: `backends` grows with [`Lab::add_backend`].
    spec: LabSpec,
    options: LabOptions,
    ns_client: String,
    ns_lb: String,
    /// The DSR topology's switch namespace `<p>-sw` (bridge `br0`).
    ns_switch: Option<String>,
    /// Namespaces created so far, in creation order (deleted in reverse).
    namespaces: Vec<String>,
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    pin_path: PathBuf,
    /// Backend `i` is `backends[i - 1]`.
    backends: Vec<Backend>,
    /// The lab's own BPF links: TCX links of the VLAN stand-ins (see [`VlanOptions`]) and the
    /// XDP_PASS program of the switch port facing the balancer; closed after the namespaces are
    /// gone.
    bpf_links: Vec<OwnedFd>,
    lb: Option<Child>,
    /// The `lb` binary last started (or set), for `lb down` on drop.
    lb_bin: Option<PathBuf>,
    /// Global options `lb run` gets besides `--config` (e.g. `--log-format json`).
    lb_args: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::skips::skip;

    use std::fs;
    use std::net::{IpAddr, SocketAddr, SocketAddrV4};
    use std::path::Path;
    use std::process::Command;
    use std::thread;
    use std::time::Instant;

    use super::system::mounts_under;
    use super::topology::owner_dead;

    const T: Duration = Duration::from_secs(3);

    fn netns_exists(name: &str) -> bool {
        Path::new(NETNS_DIR).join(name).exists()
    }

    fn mounted_under(dir: &Path) -> Vec<PathBuf> {
        mounts_under(dir).expect("reading mountinfo")
    }

    fn mount_bpffs(at: &Path) {
        fs::create_dir_all(at).unwrap();
        let out =
            output_timeout(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(at), T).unwrap();
        assert!(
            out.status.success(),
            "mount -t bpf bpf {}: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Without lb: every client address reaches every backend's own address by kernel
    /// forwarding through the balancer namespace, and the VIP fails fast (no route).
    #[test]
    fn lab_routes_directly() {
        if !is_root() {
            skip("lab_routes_directly", "needs root");
            return;
        }
        let lab = Lab::create(LabSpec {
            clients: 3,
            backends: 3,
        })
        .expect("creating the lab");
        for client in lab.client_addrs() {
            for i in 1..=3 {
                let addr = lab.backend_addr(i);
                let body = lab
                    .http_get(client, SocketAddrV4::new(addr, BACKEND_HTTP_PORT), T)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                assert_eq!(body, format!("backend-{i}\n"));
                let (body, from) = lab
                    .udp_query(client, SocketAddrV4::new(addr, BACKEND_UDP_PORT), T)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                assert_eq!(body, format!("backend-{i}\n"));
                assert_eq!(from, SocketAddr::from((addr, BACKEND_UDP_PORT)));
            }
        }
        for i in 1..=3 {
            let stats = lab.backend_stats(i);
            assert_eq!(
                (stats.http, stats.udp, stats.healthz, stats.connections),
                (3, 3, 0, 3),
                "backend {i}"
            );
        }
        let started = Instant::now();
        let vip = SocketAddrV4::new(VIP, VIP_HTTP_PORT);
        let err = lab
            .http_get(lab.client_addrs()[0], vip, T)
            .expect_err("the VIP must be unreachable without lb");
        assert!(started.elapsed() < T + Duration::from_secs(1), "{err:#}");
        let cfg = fs::read_to_string(lab.config_path()).unwrap();
        assert!(cfg.contains("[datapath]"));
        assert!(
            cfg.contains(&format!("pin_path = \"{}\"", lab.pin_path().display())),
            "{cfg}"
        );
        let cmd = lab.lb_run_command(Path::new("/usr/bin/lb"));
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(cmd.get_program(), "nsenter");
        assert_eq!(
            args[..4],
            [
                format!("--net=/run/netns/{}", lab.ns_lb()),
                "--".to_owned(),
                "/usr/bin/lb".to_owned(),
                "run".to_owned()
            ]
        );
    }

    /// The topology variants route without lb too: IPv6, VLAN-tagged links (also QinQ and tagged
    /// backend links), and the DSR switch (backends reachable at their own addresses; the VIP on
    /// their `lo` answers only on the backend itself).
    #[test]
    fn topology_variants_route_directly() {
        if !is_root() {
            skip("topology_variants_route_directly", "needs root");
            return;
        }
        let spec = LabSpec {
            clients: 2,
            backends: 2,
        };
        let v6 = Ipv6Options {
            client_prefixes: 2,
            addrs_per_prefix: 2,
            affinity_prefix: None,
        };
        let variants = [
            ("ipv6", LabOptions::default().with_ipv6(v6)),
            (
                "vlan",
                LabOptions::default().with_ipv6(v6).with_vlan(VlanOptions {
                    client_vid: 100,
                    client_outer_vid: None,
                    backend_vid: None,
                }),
            ),
            (
                "qinq+tagged backends",
                LabOptions::default().with_vlan(VlanOptions {
                    client_vid: 100,
                    client_outer_vid: Some(20),
                    backend_vid: Some(200),
                }),
            ),
            ("dsr", LabOptions::default().with_dsr()),
        ];
        for (what, options) in variants {
            let lab =
                Lab::create_with(spec, options.clone()).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let (http_port, udp_port) = lab.backend_ports();
            let mut clients: Vec<IpAddr> = lab.client_addrs().into_iter().map(IpAddr::V4).collect();
            clients.extend(lab.client_addrs6().into_iter().map(IpAddr::V6));
            for client in clients {
                for i in 1..=2 {
                    let addr = if client.is_ipv6() {
                        IpAddr::V6(lab.backend_addr6(i))
                    } else {
                        IpAddr::V4(lab.backend_addr(i))
                    };
                    let body = lab
                        .http_get_from(client, SocketAddr::new(addr, http_port), "/", T)
                        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                    assert_eq!(body, format!("backend-{i}\n"), "{what}");
                    let target = SocketAddr::new(addr, udp_port);
                    let check = lab
                        .udp_check(client, target, 4000, 3000, T)
                        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                    assert_eq!(
                        (check.backend.as_str(), check.from),
                        (format!("backend-{i}").as_str(), target),
                        "{what}"
                    );
                }
            }
            if options.vlan.is_some() {
                assert_eq!(lab.client_side_if(), "eth0.100");
            }
            if options.dsr {
                assert_eq!(lab.interfaces(), vec!["eth0".to_owned()]);
                assert!(lab.ns_switch().is_some());
                assert!(
                    lab.render_config(&lab.interfaces())
                        .contains("mode = \"dsr\"")
                );
            }
        }
    }

    /// Stop, start, health flag and add of backends, all without lb.
    #[test]
    fn backends_stop_start_and_add() {
        if !is_root() {
            skip("backends_stop_start_and_add", "needs root");
            return;
        }
        let mut lab = Lab::create(LabSpec {
            clients: 2,
            backends: 2,
        })
        .expect("creating the lab");
        let client = lab.client_addrs()[0];
        let http = |i| SocketAddrV4::new(backend_addr(i), BACKEND_HTTP_PORT);
        let udp = |i| SocketAddrV4::new(backend_addr(i), BACKEND_UDP_PORT);
        let healthz = |lab: &Lab, i| lab.http_get_path(client, http(i), "/healthz", T);
        assert_eq!(healthz(&lab, 1).unwrap(), "backend-1\n");
        lab.http_get_path(client, http(1), "/healthz?deep=1", T)
            .unwrap();
        assert_eq!(lab.backend_stats(1).healthz, 2);

        lab.stop_backend(1).unwrap();
        assert!(!lab.backend_running(1));
        for (what, result) in [
            ("GET /", lab.http_get(client, http(1), T).map(|_| ())),
            ("GET /healthz", healthz(&lab, 1).map(|_| ())),
            ("UDP", lab.udp_query(client, udp(1), T).map(|_| ())),
        ] {
            let started = Instant::now();
            let err = result.expect_err(what);
            let text = format!("{err:#}");
            // A connection the stopping server had already queued is reset rather than
            // refused (seen once in a full run); either way nothing answered.
            assert!(
                text.contains("refused") || text.contains("reset") || text.contains("no reply"),
                "{what}: {text}"
            );
            assert!(started.elapsed() < T, "{what} took {:?}", started.elapsed());
        }
        assert_eq!(
            lab.backend_stats(1).healthz,
            2,
            "nothing answered while stopped"
        );
        assert_eq!(lab.http_get(client, http(2), T).unwrap(), "backend-2\n");
        lab.stop_backend(1).unwrap();

        lab.start_backend(1).unwrap();
        lab.start_backend(1).unwrap();
        assert!(lab.backend_running(1));
        assert_eq!(healthz(&lab, 1).unwrap(), "backend-1\n");
        assert_eq!(lab.http_get(client, http(1), T).unwrap(), "backend-1\n");
        assert_eq!(lab.udp_query(client, udp(1), T).unwrap().0, "backend-1\n");
        assert_eq!(lab.backend_stats(1).healthz, 3, "counters carry on");

        lab.set_backend_healthy(2, false).unwrap();
        let err = healthz(&lab, 2).expect_err("unhealthy backend");
        assert!(format!("{err:#}").contains("503"), "{err:#}");
        assert_eq!(lab.http_get(client, http(2), T).unwrap(), "backend-2\n");
        lab.set_backend_healthy(2, true).unwrap();
        assert_eq!(healthz(&lab, 2).unwrap(), "backend-2\n");
        assert!(lab.stop_backend(3).is_err() && lab.set_backend_healthy(0, true).is_err());

        let before = lab.render_config(&lab.interfaces());
        assert_eq!(lab.add_backend().unwrap(), 3);
        assert!(netns_exists(&lab.ns_backend(3)));
        assert_eq!(lab.spec().backends, 3);
        assert_eq!(lab.interfaces().last().map(String::as_str), Some("eth3"));
        assert_eq!(lab.backend_index(backend_addr(3)), Some(3));
        for client in lab.client_addrs() {
            assert_eq!(lab.http_get(client, http(3), T).unwrap(), "backend-3\n");
            let (body, from) = lab.udp_query(client, udp(3), T).unwrap();
            assert_eq!(
                (body.as_str(), from),
                ("backend-3\n", SocketAddr::V4(udp(3)))
            );
        }
        assert_eq!(lab.backend_stats(3).http, 2);
        // The config file is the test's business until it asks.
        assert_eq!(fs::read_to_string(lab.config_path()).unwrap(), before);
        lab.rewrite_config().unwrap();
        let cfg = fs::read_to_string(lab.config_path()).unwrap();
        assert!(
            cfg.contains("\"eth3\"]") && cfg.contains("10.200.13.2"),
            "{cfg}"
        );
        lab.set_options(LabOptions::default().with_draining(3).with_backends(2))
            .expect_err("draining backend 3 of 2");
        lab.set_options(LabOptions::default().with_draining(3))
            .unwrap();
        assert!(
            fs::read_to_string(lab.config_path())
                .unwrap()
                .contains("state = \"draining\"")
        );

        let names = lab.namespaces.clone();
        assert_eq!(names.len(), 5);
        drop(lab);
        assert!(
            !names.iter().any(|n| netns_exists(n)),
            "{names:?} left behind"
        );
    }

    /// Persistent connections and the traffic generator, straight to backend addresses.
    #[test]
    fn keepalive_and_traffic() {
        if !is_root() {
            skip("keepalive_and_traffic", "needs root");
            return;
        }
        let mut lab = Lab::create(LabSpec {
            clients: 3,
            backends: 2,
        })
        .expect("creating the lab");
        let clients = lab.client_addrs();
        let b1 = SocketAddrV4::new(backend_addr(1), BACKEND_HTTP_PORT);
        let b2 = SocketAddrV4::new(backend_addr(2), BACKEND_HTTP_PORT);

        // One connection, many requests; usable from another thread than the one that made it.
        let mut conn = lab.http_connect(clients[0], b1, T).unwrap();
        let conn = thread::spawn(move || {
            for _ in 0..5 {
                assert_eq!(conn.get("/", T).unwrap(), "backend-1\n");
            }
            conn
        })
        .join()
        .unwrap();
        assert!(conn.is_open() && conn.requests() == 5);
        assert_eq!(*conn.local_addr().ip(), clients[0]);
        let s = lab.backend_stats(1);
        assert_eq!((s.http, s.connections), (5, 1));
        // `/healthz` answers close the connection, whatever the client asks.
        let mut hc = lab.http_connect(clients[0], b1, T).unwrap();
        assert_eq!(hc.get("/healthz", T).unwrap(), "backend-1\n");
        assert!(!hc.is_open());
        assert!(hc.get("/", T).is_err());
        drop(conn);

        // Keep-alive traffic: one connection per client for the whole run.
        let traffic = lab
            .spawn_keepalive_traffic(clients.clone(), b1, Duration::from_millis(10))
            .unwrap();
        let since = Instant::now();
        assert!(traffic.wait_for_successes(since, 5, Duration::from_secs(10)));
        let records = traffic.stop();
        let summary = summarize(&records);
        assert_eq!(summary.clients.len(), 3, "{summary}");
        for s in summary.clients.values() {
            assert!(
                s.requests >= 5 && s.failures == 0 && s.connections == 1,
                "{summary}"
            );
            assert_eq!(s.runs().len(), 1, "{summary}");
        }

        // Stopping the backend closes persistent connections; after a start the clients
        // connect again.
        let traffic = lab
            .spawn_keepalive_traffic(clients.clone(), b1, Duration::from_millis(10))
            .unwrap();
        assert!(traffic.wait_for_successes(Instant::now(), 2, Duration::from_secs(10)));
        lab.stop_backend(1).unwrap();
        let stopped = Instant::now();
        assert!(traffic.wait_until(Duration::from_secs(10), |r| {
            clients.iter().all(|c| {
                r.iter()
                    .any(|r| r.client == *c && r.at >= stopped && r.result.is_err())
            })
        }));
        lab.start_backend(1).unwrap();
        assert!(traffic.wait_for_successes(Instant::now(), 2, Duration::from_secs(10)));
        let summary = summarize(&traffic.stop());
        for s in summary.clients.values() {
            assert!(s.failures >= 1 && s.connections >= 2, "{summary}");
            assert_eq!(s.distinct_backends().len(), 1, "{summary}");
        }

        // New connections: every request its own.
        let traffic = lab
            .spawn_traffic(clients.clone(), b2, Duration::from_millis(10))
            .unwrap();
        assert!(traffic.wait_for_successes(Instant::now(), 3, Duration::from_secs(10)));
        let records = traffic.stop();
        let summary = summarize(&records);
        for s in summary.clients.values() {
            assert_eq!((s.failures, s.connections), (0, s.requests), "{summary}");
            assert_eq!(s.backends[0], "backend-2", "{summary}");
        }
        assert!(records.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(lab.backend_stats(2).connections >= records.len() as u64);
    }

    #[test]
    fn drop_unmounts_bpffs_under_the_lab_dir() {
        if !is_root() {
            skip("drop_unmounts_bpffs_under_the_lab_dir", "needs root");
            return;
        }
        let lab = Lab::create(LabSpec {
            clients: 1,
            backends: 1,
        })
        .expect("creating the lab");
        let dir = lab.dir().to_owned();
        let pins = lab.pin_path().to_owned();
        // Twice: a stacked mount must go too.
        mount_bpffs(&pins);
        mount_bpffs(&pins);
        fs::create_dir(pins.join("sub")).unwrap();
        assert_eq!(mounted_under(&dir), vec![pins.clone(), pins.clone()]);
        let names = lab.namespaces.clone();
        drop(lab);
        assert!(mounted_under(&dir).is_empty(), "{:?}", mounted_under(&dir));
        assert!(!dir.exists());
        assert!(
            !names.iter().any(|n| netns_exists(n)),
            "{names:?} left behind"
        );
    }

    #[test]
    fn sweep_unmounts_stale_labs() {
        if !is_root() {
            skip("sweep_unmounts_stale_labs", "needs root");
            return;
        }
        // A pid that just exited stands for a killed test process.
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let dir = Path::new(LAB_ROOT).join(format!("lb{dead}-0"));
        assert!(owner_dead(&dir.file_name().unwrap().to_string_lossy()));
        assert!(!owner_dead(&format!("lb{}-0", std::process::id())));
        assert!(!owner_dead("lbx-0") && !owner_dead("other"));
        mount_bpffs(&dir.join("bpf"));
        fs::write(dir.join("lb.toml"), "").unwrap();
        sweep_stale();
        assert!(mounted_under(&dir).is_empty(), "{:?}", mounted_under(&dir));
        assert!(!dir.exists());
    }

    #[test]
    fn lab_is_removed_on_drop_and_on_panic() {
        if !is_root() {
            skip("lab_is_removed_on_drop_and_on_panic", "needs root");
            return;
        }
        let lab = Lab::create(LabSpec {
            clients: 1,
            backends: 2,
        })
        .expect("creating the lab");
        let names = lab.namespaces.clone();
        let dir = lab.dir.clone();
        assert_eq!(names.len(), 4);
        assert!(names.iter().all(|n| netns_exists(n)) && dir.is_dir());
        drop(lab);
        assert!(
            !names.iter().any(|n| netns_exists(n)),
            "{names:?} left behind"
        );
        assert!(!dir.exists());

        let result = std::panic::catch_unwind(|| {
            let lab = Lab::create(LabSpec {
                clients: 1,
                backends: 1,
            })
            .expect("creating the lab");
            let names = lab.namespaces.clone();
            std::panic::panic_any(names)
        });
        let names = result
            .expect_err("the closure panics")
            .downcast::<Vec<String>>()
            .expect("panic payload is the namespace list");
        assert_eq!(names.len(), 3);
        assert!(
            !names.iter().any(|n| netns_exists(n)),
            "{names:?} left behind"
        );
    }
}
