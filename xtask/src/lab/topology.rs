//! The lab's topology: its size and options, the namespaces, veths, addresses and routes
//! [`Lab::create`] builds, and their removal when the lab is dropped.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::backends::Backend;
use super::http::Counters;
use super::system::{
    ethtool, ethtool_lab_offloads, in_netns, ip, is_root, output_timeout, set_sysctls,
    unmount_under, wait_links_running,
};
use super::{
    BACKEND_HTTP_PORT, BACKEND_UDP_PORT, CLIENT_PROBE_ADDR, CLIENT_PROBE_ADDR6, CMD_TIMEOUT,
    DSR_BACKEND_HTTP_PORT, DSR_BACKEND_UDP_PORT, DSR_MAX_CLIENTS, ETH_P_8021AD, ETH_P_8021Q,
    LAB_ROOT, LB_CLIENT_ADDR6, Lab, MAX_BACKENDS, NETNS_DIR, VIP, VIP6, bpf,
};

/// Size of a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabSpec {
    /// Number of client addresses (10.200.1.10 onwards), 1..=240.
    pub clients: u32,
    /// Number of backends, 1..=50.
    pub backends: u32,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            clients: 8,
            backends: 3,
        }
    }
}

/// Health check kind of the lab's `web` service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HealthKind {
    /// `GET <path>` (default `/healthz`), healthy on `200`.
    #[default]
    Http,
    /// A TCP connect.
    Tcp,
    /// No checks: always healthy.
    None,
}

impl HealthKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            HealthKind::Http => "http",
            HealthKind::Tcp => "tcp",
            HealthKind::None => "none",
        }
    }
}

/// `[services.health]` of the `web` service. Fields left `None` are not written (lb's defaults
/// apply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthOptions {
    pub kind: HealthKind,
    /// Written for [`HealthKind::Http`] only; default `/healthz`.
    pub path: String,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

impl Default for HealthOptions {
    fn default() -> Self {
        HealthOptions {
            kind: HealthKind::Http,
            path: "/healthz".to_owned(),
            interval: None,
            timeout: None,
            rise: None,
            fall: None,
        }
    }
}

/// Variations of the lab's config. The default renders today's config; every option is written
/// only when set, so a default config parses with an lb that does not know the newer fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabOptions {
    /// Health checks of the `web` service (the `dns` service has none).
    pub health: HealthOptions,
    /// `affinity.timeout` of both services. Unset: `30m` for `web`, lb's default for `dns`.
    pub affinity_timeout: Option<Duration>,
    /// `affinity.max_age` of both services; unset: not written.
    pub affinity_max_age: Option<Duration>,
    /// Backends (1-based) written with `state = "draining"` in both services.
    pub draining: Vec<u32>,
    /// `datapath.hash_seed`; unset: not written.
    pub hash_seed: Option<u32>,
    /// Write this many backends (1..=50) into both services instead of as many as the lab has.
    /// More than the lab has names addresses nobody answers at (until [`Lab::add_backend`]);
    /// fewer lets a lab start with backends the config does not use yet, whose interfaces are
    /// still listed, so a reload can add them without attaching XDP anywhere new.
    pub backends: Option<u32>,
    /// Topology: IPv6 as well on every link (see [`Ipv6Options`]), and the IPv6 services `web6`
    /// (TCP [`VIP6`]:80 -> backends' IPv6 addresses :8080, health checks as `web`) and `dns6`
    /// (UDP :53 -> :5353). Fixed when the lab is created.
    pub ipv6: Option<Ipv6Options>,
    /// Topology: VLAN-tagged links (see [`VlanOptions`]). Fixed when the lab is created.
    pub vlan: Option<VlanOptions>,
    /// Topology and mode: `datapath.mode = "dsr"` on one L2 segment. A bridge `br0` in namespace
    /// `<p>-sw` joins the client, the balancer (XDP on `eth0` only) and the backends
    /// (10.200.1.(200+i)); the backends hold the VIP on `lo` (`arp_ignore=1`, `arp_announce=2`)
    /// and serve the service ports themselves (HTTP :80, UDP :53). IPv4 only. Fixed when the lab
    /// is created.
    pub dsr: bool,
}

/// The VLANs of a lab with [`LabOptions::vlan`]: the wire between the client and the balancer
/// carries `client_vid` (802.1Q; inside 802.1ad `client_outer_vid` for QinQ), and with
/// `backend_vid` every backend link carries that VLAN too.
///
/// On a tagged link each end holds its addresses on a "VLAN device" `<physical>.<vid>` (e.g.
/// `eth0.100` in the client and balancer namespaces) while the balancer's XDP program stays on the
/// physical `eth0`/`eth<i>` and sees the tagged frames. The kernel here may lack
/// `CONFIG_VLAN_8021Q`, so the VLAN device is a stand-in: a macvlan in passthru mode on the
/// physical veth (a separate interface with the same MAC, as a VLAN device is) with two TCX
/// programs that push the tag(s) on egress and accept only frames with exactly those tags on
/// ingress, popping them (see `lab/vlan.rs`). tx VLAN offload is off on the physical veths so the
/// tags are in the frame data, as they are on a wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanOptions {
    /// 802.1Q VLAN id of the client link, 1..=4094.
    pub client_vid: u16,
    /// 802.1ad (QinQ) service VLAN id outside `client_vid`; unset: a single tag.
    pub client_outer_vid: Option<u16>,
    /// 802.1Q VLAN id of every backend link; unset: untagged.
    pub backend_vid: Option<u16>,
}

impl VlanOptions {
    /// Tags of the client link, outermost first.
    pub(super) fn client_tags(&self) -> Vec<(u16, u16)> {
        let mut tags = Vec::new();
        if let Some(outer) = self.client_outer_vid {
            tags.push((ETH_P_8021AD, outer));
        }
        tags.push((ETH_P_8021Q, self.client_vid));
        tags
    }
}

/// The IPv6 side of a lab with [`LabOptions::ipv6`].
///
/// ```text
///  ns <p>-cl                                 ns <p>-lb                        ns <p>-b<i>
///  2001:db8:c::2/48                <──>      2001:db8:c::1/48
///  + 2001:db8:c:<n>::<10+k>/48                2001:db8:b:<i>::1/64  <──>  2001:db8:b:<i>::2/64
///    (n = 1..=client_prefixes, k < addrs_per_prefix)
///  default via 2001:db8:c::1                  forwarding on               default via ...:<i>::1
/// ```
/// Every address is added with `nodad` (and DAD is off in the lab's namespaces), so it is usable
/// at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Options {
    /// Client /64s, 1..=200: 2001:db8:c:1::/64 onwards.
    pub client_prefixes: u32,
    /// Client addresses in each /64, 1..=200: ::10 onwards.
    pub addrs_per_prefix: u32,
    /// `affinity.ipv6_prefix` of the IPv6 services; unset: not written (lb's default, 64).
    pub affinity_prefix: Option<u8>,
}

impl Default for Ipv6Options {
    fn default() -> Self {
        Ipv6Options {
            client_prefixes: 4,
            addrs_per_prefix: 2,
            affinity_prefix: None,
        }
    }
}

impl LabOptions {
    /// `web` health checks of this kind (path `/healthz` for HTTP).
    pub fn with_health_kind(mut self, kind: HealthKind) -> Self {
        self.health.kind = kind;
        self
    }

    /// `web` health check timing, e.g. `(200ms, 100ms, 2, 2)` for quick tests.
    pub fn with_health_timing(
        mut self,
        interval: Duration,
        timeout: Duration,
        rise: u32,
        fall: u32,
    ) -> Self {
        self.health.interval = Some(interval);
        self.health.timeout = Some(timeout);
        self.health.rise = Some(rise);
        self.health.fall = Some(fall);
        self
    }

    /// `affinity.timeout` of both services.
    pub fn with_affinity_timeout(mut self, timeout: Duration) -> Self {
        self.affinity_timeout = Some(timeout);
        self
    }

    /// `affinity.max_age` of both services.
    pub fn with_affinity_max_age(mut self, max_age: Duration) -> Self {
        self.affinity_max_age = Some(max_age);
        self
    }

    /// Backend `i` (1-based) is written with `state = "draining"`.
    pub fn with_draining(mut self, i: u32) -> Self {
        if !self.draining.contains(&i) {
            self.draining.push(i);
        }
        self
    }

    /// `datapath.hash_seed`.
    pub fn with_hash_seed(mut self, seed: u32) -> Self {
        self.hash_seed = Some(seed);
        self
    }

    /// Write `n` backends into the services (see [`LabOptions::backends`]).
    pub fn with_backends(mut self, n: u32) -> Self {
        self.backends = Some(n);
        self
    }

    /// IPv6 on every link and the IPv6 services (see [`LabOptions::ipv6`]).
    pub fn with_ipv6(mut self, ipv6: Ipv6Options) -> Self {
        self.ipv6 = Some(ipv6);
        self
    }

    /// VLAN-tagged links (see [`LabOptions::vlan`]).
    pub fn with_vlan(mut self, vlan: VlanOptions) -> Self {
        self.vlan = Some(vlan);
        self
    }

    /// The DSR topology and mode (see [`LabOptions::dsr`]).
    pub fn with_dsr(mut self) -> Self {
        self.dsr = true;
        self
    }

    /// Backend ports (HTTP, UDP) of this topology.
    pub(super) fn backend_ports(&self) -> (u16, u16) {
        if self.dsr {
            (DSR_BACKEND_HTTP_PORT, DSR_BACKEND_UDP_PORT)
        } else {
            (BACKEND_HTTP_PORT, BACKEND_UDP_PORT)
        }
    }

    /// Backend `i`'s IPv4 address in this topology.
    pub(super) fn backend_addr(&self, i: u32) -> Ipv4Addr {
        if self.dsr {
            dsr_backend_addr(i)
        } else {
            backend_addr(i)
        }
    }

    /// Whether `other` has the same topology (the fields fixed at creation).
    pub(super) fn same_topology(&self, other: &LabOptions) -> bool {
        self.ipv6.map(|v| (v.client_prefixes, v.addrs_per_prefix))
            == other.ipv6.map(|v| (v.client_prefixes, v.addrs_per_prefix))
            && self.vlan == other.vlan
            && self.dsr == other.dsr
    }

    /// Checks the topology options against the lab's size.
    pub(super) fn check_topology(&self, spec: &LabSpec) -> Result<()> {
        if let Some(v6) = self.ipv6 {
            ensure!(
                (1..=200).contains(&v6.client_prefixes) && (1..=200).contains(&v6.addrs_per_prefix),
                "Ipv6Options: client_prefixes and addrs_per_prefix must be 1..=200, got {} and {}",
                v6.client_prefixes,
                v6.addrs_per_prefix
            );
        }
        if let Some(v) = self.vlan {
            for vid in [Some(v.client_vid), v.client_outer_vid, v.backend_vid]
                .into_iter()
                .flatten()
            {
                ensure!(
                    (1..=4094).contains(&vid),
                    "VlanOptions: VLAN ids must be 1..=4094, got {vid}"
                );
            }
        }
        if self.dsr {
            ensure!(
                spec.clients <= DSR_MAX_CLIENTS,
                "a DSR lab has at most {DSR_MAX_CLIENTS} clients, got {}",
                spec.clients
            );
            ensure!(
                self.ipv6.is_none() && self.vlan.is_none(),
                "the lab's DSR topology is IPv4 without VLANs"
            );
        }
        Ok(())
    }

    /// Checks what the lab itself depends on (lb judges the values): the backend count and that
    /// every draining backend is written.
    pub(super) fn check(&self, lab_backends: u32) -> Result<()> {
        let n = self.backends.unwrap_or(lab_backends);
        ensure!(
            (1..=MAX_BACKENDS).contains(&n),
            "LabOptions.backends must be 1..={MAX_BACKENDS}, got {n}"
        );
        for &i in &self.draining {
            ensure!(
                (1..=n).contains(&i),
                "LabOptions.draining names backend {i}, but the config has backends 1..={n}"
            );
        }
        Ok(())
    }
}

impl LabSpec {
    /// The balancer's interfaces: `eth0` (clients) and `eth1..ethN` (backends).
    pub fn interfaces(&self) -> Vec<String> {
        (0..=self.backends).map(|i| format!("eth{i}")).collect()
    }
}

/// Backend `i`'s own address (1-based), 10.200.(10+i).2.
pub fn backend_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (10 + i) as u8, 2)
}

/// Backend `i`'s own address (1-based) in the DSR topology, 10.200.1.(200+i), on the clients'
/// segment.
pub fn dsr_backend_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 1, (200 + i) as u8)
}

/// Backend `i`'s own IPv6 address (1-based) in a lab with IPv6, 2001:db8:b:<i>::2 (a /64 per
/// backend link; the balancer's side is ::1).
pub fn backend_addr6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xb, i as u16, 0, 0, 0, 2)
}

/// The balancer's address on backend `i`'s link, 2001:db8:b:<i>::1.
fn lb_backend_side_addr6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xb, i as u16, 0, 0, 0, 1)
}

/// The /64 of client prefix `n` (1-based), 2001:db8:c:<n>::.
pub fn client_prefix6(n: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xc, n as u16, 0, 0, 0, 0)
}

impl Lab {
    /// Builds the whole lab with the default config and starts the backend servers. On any
    /// failure everything made so far is removed again before the error is returned.
    pub fn create(spec: LabSpec) -> Result<Lab> {
        Lab::create_with(spec, LabOptions::default())
    }

    /// [`Lab::create`] with the config rendered from `options`.
    pub fn create_with(spec: LabSpec, options: LabOptions) -> Result<Lab> {
        ensure!(
            (1..=240).contains(&spec.clients),
            "LabSpec.clients must be 1..=240, got {}",
            spec.clients
        );
        ensure!(
            (1..=MAX_BACKENDS).contains(&spec.backends),
            "LabSpec.backends must be 1..={MAX_BACKENDS}, got {}",
            spec.backends
        );
        options.check(spec.backends)?;
        options.check_topology(&spec)?;
        ensure!(
            is_root(),
            "the lab needs root (network namespaces, veth, XDP)"
        );
        sweep_stale();

        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "lb{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = Path::new(LAB_ROOT).join(&prefix);
        let mut lab = Lab {
            config: dir.join("lb.toml"),
            socket: dir.join("lb.sock"),
            log: dir.join("lb.log"),
            pin_path: dir.join("bpf"),
            dir,
            ns_client: format!("{prefix}-cl"),
            ns_lb: format!("{prefix}-lb"),
            ns_switch: options.dsr.then(|| format!("{prefix}-sw")),
            prefix,
            spec: LabSpec {
                backends: 0,
                ..spec
            },
            options,
            namespaces: Vec::new(),
            backends: Vec::new(),
            bpf_links: Vec::new(),
            lb: None,
            lb_bin: None,
            lb_args: Vec::new(),
        };
        // On error `lab` is dropped here, which removes whatever was already made.
        lab.build(spec.backends)
            .with_context(|| format!("creating lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&mut self, backends: u32) -> Result<()> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;

        let cl = self.ns_client().to_owned();
        let lb = self.ns_lb().to_owned();
        self.add_netns(&cl)?;
        self.add_netns(&lb)?;
        if let Some(sw) = self.ns_switch.clone() {
            self.add_netns(&sw)?;
            // No STP (ports forward at once) and no multicast snooping (IPv6 neighbour
            // discovery and ARP are never filtered): a plain learning switch.
            self.ip_batch(
                &sw,
                &[
                    "link set lo up".to_owned(),
                    "link add br0 type bridge stp_state 0 mcast_snooping 0".to_owned(),
                    "link set br0 up".to_owned(),
                ],
            )?;
        }

        // Client <-> balancer (or, in the DSR topology, both <-> the switch).
        match self.ns_switch.clone() {
            None => ip(&[
                "link", "add", "eth0", "netns", &cl, "type", "veth", "peer", "name", "eth0",
                "netns", &lb,
            ])?,
            Some(sw) => {
                self.switch_port(&sw, "cl", &cl)?;
                self.switch_port(&sw, "lb", &lb)?;
                // The balancer sends its DSR frames back with XDP_TX: this port must have an XDP
                // program, or they wait in its ring (GRO alone is not enough for XDP_TX).
                let link = in_netns(&sw, || bpf::attach_xdp_pass_here("lb"))?
                    .context("attaching XDP_PASS to the switch port facing the balancer")?;
                self.bpf_links.push(link);
            }
        }
        let v6 = self.options.ipv6.is_some();
        // With a VLAN the addresses live on `eth0.<vid>`; `eth0` carries the tagged frames.
        let client_if = self.client_side_if();
        let client_tags = self.options.vlan.map(|v| v.client_tags());
        // Each tag beyond the first needs 4 bytes more than the MTU on the wire ("baby giants";
        // a veth accepts one tag beyond its MTU): the VLAN device keeps 1500.
        let extra_tags = client_tags.as_ref().map_or(0, |t| t.len() - 1);
        let mut cmds = vec!["link set lo up".to_owned(), "link set eth0 up".to_owned()];
        cmds.extend(vlan_device_cmds("eth0", &client_if, extra_tags));
        cmds.push(format!("addr add {CLIENT_PROBE_ADDR}/24 dev {client_if}"));
        for a in self.client_addrs() {
            cmds.push(format!("addr add {a}/24 dev {client_if}"));
        }
        if v6 {
            cmds.push(format!(
                "addr add {CLIENT_PROBE_ADDR6}/48 dev {client_if} nodad"
            ));
            for a in self.client_addrs6() {
                cmds.push(format!("addr add {a}/48 dev {client_if} nodad"));
            }
        }
        cmds.push("route add default via 10.200.1.1".to_owned());
        if v6 {
            // `onlink`: the /48's prefix route appears only once the peer is up (carrier).
            cmds.push(format!(
                "route add ::/0 via {LB_CLIENT_ADDR6} dev {client_if} onlink"
            ));
        }
        self.ip_batch(&cl, &cmds)?;
        ethtool_lab_offloads(&cl, "eth0")?;
        if let Some(tags) = &client_tags {
            self.vlan_device(&cl, "eth0", &client_if, tags)?;
        }
        let mut cmds = vec!["link set lo up".to_owned(), "link set eth0 up".to_owned()];
        cmds.extend(vlan_device_cmds("eth0", &client_if, extra_tags));
        cmds.push(format!("addr add 10.200.1.1/24 dev {client_if}"));
        if v6 {
            cmds.push(format!(
                "addr add {LB_CLIENT_ADDR6}/48 dev {client_if} nodad"
            ));
        }
        self.ip_batch(&lb, &cmds)?;
        ethtool_lab_offloads(&lb, "eth0")?;
        if let Some(tags) = &client_tags {
            self.vlan_device(&lb, "eth0", &client_if, tags)?;
        }
        let mut sysctls = vec![
            ("net/ipv4/ip_forward".to_owned(), "1"),
            ("net/ipv4/conf/all/rp_filter".to_owned(), "0"),
            ("net/ipv4/conf/default/rp_filter".to_owned(), "0"),
            ("net/ipv4/conf/eth0/rp_filter".to_owned(), "0"),
        ];
        if client_if != "eth0" {
            sysctls.push((format!("net/ipv4/conf/{client_if}/rp_filter"), "0"));
        }
        if v6 {
            sysctls.push(("net/ipv6/conf/all/forwarding".to_owned(), "1"));
        }
        let sysctls: Vec<(&str, &str)> = sysctls.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        set_sysctls(&lb, &sysctls)?;

        // Balancer <-> backends.
        for i in 1..=backends {
            self.wire_backend(i)?;
            self.spec.backends = i;
        }

        // Carrier comes up at once, but the operational state (and with it the qdisc) only when
        // the kernel's link watcher gets round to it, up to a second later; until then the
        // first packets can vanish.
        for ns in self.namespaces.clone() {
            wait_links_running(&ns, Duration::from_secs(5))?;
        }
        for i in 1..=backends {
            self.start_backend(i)?;
        }
        self.rewrite_config()
    }

    /// Turns `dev` (a macvlan on `phys`, made by [`vlan_device_cmds`]) in namespace `ns` into a
    /// VLAN device for `tags` (see [`VlanOptions`]): tx VLAN offload off on `phys`, so the tags
    /// are written into the frames, and the TCX programs on `dev`.
    fn vlan_device(&mut self, ns: &str, phys: &str, dev: &str, tags: &[(u16, u16)]) -> Result<()> {
        ethtool(
            ns,
            phys,
            &["txvlan", "off", "tx-vlan-stag-hw-insert", "off"],
        )?;
        let links = in_netns(ns, || bpf::attach_here(dev, tags))?
            .with_context(|| format!("making {dev} a VLAN device in {ns}"))?;
        self.bpf_links.extend(links);
        Ok(())
    }

    /// DSR topology: a veth pair from port `port` of the switch's bridge to `eth0` in `ns`, the
    /// port enslaved and up, with the lab's offloads (GRO on the port: the balancer's XDP_TX
    /// frames arrive on it).
    fn switch_port(&self, sw: &str, port: &str, ns: &str) -> Result<()> {
        ip(&[
            "link", "add", port, "netns", sw, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        self.ip_batch(
            sw,
            &[
                format!("link set {port} master br0"),
                format!("link set {port} up"),
            ],
        )?;
        ethtool_lab_offloads(sw, port)
    }

    /// Creates backend `i`'s namespace, its veth pair (`eth<i>` in the balancer namespace,
    /// `eth0` in the backend's; in the DSR topology port `b<i>` of the switch), addresses,
    /// routes, offloads and sysctls, and registers it (servers not started).
    pub(super) fn wire_backend(&mut self, i: u32) -> Result<()> {
        let lb = self.ns_lb().to_owned();
        let b = self.ns_backend(i);
        self.add_netns(&b)?;
        if let Some(sw) = self.ns_switch.clone() {
            self.switch_port(&sw, &format!("b{i}"), &b)?;
            self.ip_batch(
                &b,
                &[
                    "link set lo up".to_owned(),
                    // The VIP on loopback: the backend accepts packets to it and answers from it.
                    format!("addr add {VIP}/32 dev lo"),
                    format!("addr add {}/24 dev eth0", dsr_backend_addr(i)),
                    "link set eth0 up".to_owned(),
                    "route add default via 10.200.1.1".to_owned(),
                ],
            )?;
            ethtool_lab_offloads(&b, "eth0")?;
            // Never answer ARP for the VIP (it is on lo, not eth0), and never use it as the
            // source of ARP requests: the segment must keep resolving the VIP to the balancer.
            set_sysctls(
                &b,
                &[
                    ("net/ipv4/conf/all/arp_ignore", "1"),
                    ("net/ipv4/conf/all/arp_announce", "2"),
                    ("net/ipv4/conf/eth0/arp_ignore", "1"),
                    ("net/ipv4/conf/eth0/arp_announce", "2"),
                ],
            )?;
        } else {
            let phys = format!("eth{i}");
            ip(&[
                "link", "add", &phys, "netns", &lb, "type", "veth", "peer", "name", "eth0",
                "netns", &b,
            ])?;
            let backend_vid = self.options.vlan.and_then(|v| v.backend_vid);
            // The interfaces holding the addresses: the VLAN stand-ins on a tagged link.
            let (b_if, lb_if) = match backend_vid {
                Some(vid) => (format!("eth0.{vid}"), format!("{phys}.{vid}")),
                None => ("eth0".to_owned(), phys.clone()),
            };
            let mut cmds = vec!["link set lo up".to_owned(), "link set eth0 up".to_owned()];
            cmds.extend(vlan_device_cmds("eth0", &b_if, 0));
            cmds.push(format!("addr add {}/24 dev {b_if}", backend_addr(i)));
            if self.options.ipv6.is_some() {
                cmds.push(format!("addr add {}/64 dev {b_if} nodad", backend_addr6(i)));
            }
            cmds.push(format!("route add default via 10.200.{}.1", 10 + i));
            if self.options.ipv6.is_some() {
                cmds.push(format!(
                    "route add ::/0 via {} dev {b_if} onlink",
                    lb_backend_side_addr6(i)
                ));
            }
            self.ip_batch(&b, &cmds)?;
            ethtool_lab_offloads(&b, "eth0")?;
            let mut cmds = vec![format!("link set {phys} up")];
            cmds.extend(vlan_device_cmds(&phys, &lb_if, 0));
            cmds.push(format!("addr add 10.200.{}.1/24 dev {lb_if}", 10 + i));
            if self.options.ipv6.is_some() {
                cmds.push(format!(
                    "addr add {}/64 dev {lb_if} nodad",
                    lb_backend_side_addr6(i)
                ));
            }
            self.ip_batch(&lb, &cmds)?;
            ethtool_lab_offloads(&lb, &phys)?;
            if let Some(vid) = backend_vid {
                self.vlan_device(&b, "eth0", &b_if, &[(ETH_P_8021Q, vid)])?;
                self.vlan_device(&lb, &phys, &lb_if, &[(ETH_P_8021Q, vid)])?;
            }
            let mut sysctls = vec![format!("net/ipv4/conf/{phys}/rp_filter")];
            if lb_if != phys {
                sysctls.push(format!("net/ipv4/conf/{lb_if}/rp_filter"));
            }
            let sysctls: Vec<(&str, &str)> = sysctls.iter().map(|k| (k.as_str(), "0")).collect();
            set_sysctls(&lb, &sysctls)?;
        }
        self.backends.push(Backend {
            ns: b,
            counters: Arc::new(Counters::default()),
            healthy: Arc::new(AtomicBool::new(true)),
            servers: None,
        });
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        if self.options.ipv6.is_some() {
            // Before any interface exists, so every interface inherits it: no duplicate
            // address detection, so link-local and global addresses are usable at once.
            set_sysctls(
                name,
                &[
                    ("net/ipv6/conf/all/accept_dad", "0"),
                    ("net/ipv6/conf/default/accept_dad", "0"),
                ],
            )?;
        }
        Ok(())
    }

    fn ip_batch(&self, ns: &str, cmds: &[String]) -> Result<()> {
        let file = self.dir.join(format!("{ns}.ip"));
        fs::write(&file, cmds.join("\n") + "\n")
            .with_context(|| format!("writing {}", file.display()))?;
        ip(&["-n", ns, "-batch", &file.to_string_lossy()])
            .with_context(|| format!("configuring namespace {ns}:\n{}", cmds.join("\n")))
    }

    /// The unique name stem `lb<pid>-<counter>` of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's current size (`backends` counts those added by [`Lab::add_backend`]).
    pub fn spec(&self) -> LabSpec {
        self.spec
    }

    /// The options the config is rendered with.
    pub fn options(&self) -> &LabOptions {
        &self.options
    }

    /// The lab's working directory, `/run/lb-lab/<p>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The balancer's config file, `/run/lb-lab/<p>/lb.toml`.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The balancer's control socket named in the config, `/run/lb-lab/<p>/lb.sock`.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The pin path named in the config, `/run/lb-lab/<p>/bpf`.
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// The file that collects `lb run`'s stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The client namespace, `<p>-cl`.
    pub fn ns_client(&self) -> &str {
        &self.ns_client
    }

    /// The balancer namespace, `<p>-lb`.
    pub fn ns_lb(&self) -> &str {
        &self.ns_lb
    }

    /// The namespace of backend `i` (1-based), `<p>-b<i>`.
    pub fn ns_backend(&self, i: u32) -> String {
        format!("{}-b{i}", self.prefix)
    }

    /// The VIP both services listen on.
    pub fn vip(&self) -> Ipv4Addr {
        VIP
    }

    /// The client addresses 10.200.1.10 .. 10.200.1.(10+clients-1).
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        (0..self.spec.clients)
            .map(|k| Ipv4Addr::new(10, 200, 1, (10 + k) as u8))
            .collect()
    }

    /// Backend `i`'s own address (1-based), 10.200.(10+i).2 (DSR topology: 10.200.1.(200+i)).
    pub fn backend_addr(&self, i: u32) -> Ipv4Addr {
        self.options.backend_addr(i)
    }

    /// The backend number (1-based) whose address is `addr`, if any.
    pub fn backend_index(&self, addr: Ipv4Addr) -> Option<u32> {
        (1..=self.spec.backends).find(|&i| self.backend_addr(i) == addr)
    }

    /// The IPv6 VIP of the services `web6` and `dns6` (configured only with
    /// [`LabOptions::ipv6`]).
    pub fn vip6(&self) -> Ipv6Addr {
        VIP6
    }

    /// Backend `i`'s own IPv6 address (1-based), 2001:db8:b:<i>::2 (only with
    /// [`LabOptions::ipv6`]).
    pub fn backend_addr6(&self, i: u32) -> Ipv6Addr {
        backend_addr6(i)
    }

    /// The client IPv6 addresses grouped by /64: (prefix, its addresses), empty without
    /// [`LabOptions::ipv6`].
    pub fn client_prefixes6(&self) -> Vec<(Ipv6Addr, Vec<Ipv6Addr>)> {
        let Some(v6) = self.options.ipv6 else {
            return Vec::new();
        };
        (1..=v6.client_prefixes)
            .map(|n| {
                let p = client_prefix6(n).segments();
                let addrs = (0..v6.addrs_per_prefix)
                    .map(|k| Ipv6Addr::new(p[0], p[1], p[2], p[3], 0, 0, 0, (0x10 + k) as u16))
                    .collect();
                (client_prefix6(n), addrs)
            })
            .collect()
    }

    /// Every client IPv6 address (see [`Lab::client_prefixes6`]).
    pub fn client_addrs6(&self) -> Vec<Ipv6Addr> {
        self.client_prefixes6()
            .into_iter()
            .flat_map(|(_, addrs)| addrs)
            .collect()
    }

    /// Ports (HTTP, UDP) the backends' servers listen on: 8080 and 5353, in the DSR topology the
    /// service ports 80 and 53.
    pub fn backend_ports(&self) -> (u16, u16) {
        self.options.backend_ports()
    }

    /// The DSR topology's switch namespace, `<p>-sw`.
    pub fn ns_switch(&self) -> Option<&str> {
        self.ns_switch.as_deref()
    }

    /// The client-side interface holding the addresses in the client and balancer namespaces:
    /// `eth0`, or the VLAN device `eth0.<vid>` with [`LabOptions::vlan`].
    pub fn client_side_if(&self) -> String {
        match self.options.vlan {
            Some(v) => format!("eth0.{}", v.client_vid),
            None => "eth0".to_owned(),
        }
    }

    /// The balancer's XDP interfaces: `eth0` (clients) and `eth1..ethN` (backends); in the DSR
    /// topology `eth0` only.
    pub fn interfaces(&self) -> Vec<String> {
        if self.options.dsr {
            vec!["eth0".to_owned()]
        } else {
            self.spec.interfaces()
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let p = self.prefix.clone();
        if let Err(e) = self.stop_lb() {
            eprintln!("lab {p}: stopping lb: {e:#}");
        }
        // Best effort: detach and unpin what lb left (restart adoption keeps it on SIGTERM). An
        // lb without `down` fails here; the unmount below frees the pins anyway.
        let pins_left = fs::read_dir(&self.pin_path).is_ok_and(|mut d| d.next().is_some());
        if pins_left && let Some(bin) = self.lb_bin.clone() {
            match self.lb_down(&bin) {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    if !stderr.contains("unrecognized subcommand") {
                        eprintln!(
                            "lab {p}: `lb down` failed ({}): {}",
                            out.status,
                            stderr.trim()
                        );
                    }
                }
                Err(e) => eprintln!("lab {p}: `lb down`: {e:#}"),
            }
        }
        for backend in &mut self.backends {
            if let Some(servers) = backend.servers.take() {
                servers.stop();
            }
        }
        if let Err(e) = unmount_under(&self.dir) {
            eprintln!("lab {p}: {e:#}");
        }
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("lab {p}: removing {}: {e}", self.dir.display());
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("lab {p}: {e:#}");
            }
        }
    }
}

/// `ip -batch` lines that make `dev` the VLAN stand-in on `phys` (a passthru macvlan: a separate
/// interface with `phys`'s MAC address that receives everything arriving on `phys`), up; nothing
/// when `dev` is `phys` itself (an untagged link). With `extra_tags` (QinQ) `phys` gets 4 bytes
/// of MTU per extra tag, so `dev` keeps 1500.
fn vlan_device_cmds(phys: &str, dev: &str, extra_tags: usize) -> Vec<String> {
    if dev == phys {
        return Vec::new();
    }
    let mut cmds = vec![
        format!("link add link {phys} name {dev} type macvlan mode passthru"),
        format!("link set {dev} up"),
    ];
    if extra_tags > 0 {
        cmds.push(format!("link set {phys} mtu {}", 1500 + 4 * extra_tags));
    }
    cmds
}

/// Whether the process that made lab `name` (`lb<pid>-<n>...`) is gone.
pub(super) fn owner_dead(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("lb") else {
        return false;
    };
    let mut parts = rest.splitn(3, '-');
    let (Some(pid), Some(n)) = (parts.next(), parts.next()) else {
        return false;
    };
    if pid.is_empty() || n.is_empty() || !pid.bytes().chain(n.bytes()).all(|b| b.is_ascii_digit()) {
        return false;
    }
    !Path::new("/proc").join(pid).exists()
}

/// Removes what labs of dead processes left behind (their process was killed before `Drop`
/// ran): any process still inside their namespaces (an orphaned `lb`), whatever is mounted
/// under their `/run/lb-lab` directories (lb's bpffs and its pins), those directories, and the
/// namespaces. Labs of live processes are never touched.
pub(super) fn sweep_stale() {
    let mut stale_ns = Vec::new();
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !owner_dead(&name) {
                continue;
            }
            if let Ok(out) = output_timeout(
                Command::new("ip").args(["netns", "pids", &name]),
                CMD_TIMEOUT,
            ) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
            stale_ns.push(name);
        }
    }
    if let Ok(entries) = fs::read_dir(LAB_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !owner_dead(&name) {
                continue;
            }
            if let Err(e) = unmount_under(&entry.path()) {
                eprintln!("lab: stale lab {name}: {e:#}");
            }
            match fs::remove_dir_all(entry.path()) {
                Ok(()) => eprintln!("lab: removed stale {}", entry.path().display()),
                Err(e) => eprintln!("lab: removing stale {}: {e}", entry.path().display()),
            }
        }
    }
    for name in stale_ns {
        match ip(&["netns", "del", &name]) {
            Ok(()) => eprintln!("lab: removed stale namespace {name}"),
            Err(e) => eprintln!("lab: removing stale namespace {name}: {e:#}"),
        }
    }
}
