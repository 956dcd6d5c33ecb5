//! Datapath fixtures: crafted frames through the loaded XDP program with BPF_PROG_TEST_RUN,
//! asserting the exact verdict and output bytes. Each test loads its own program and maps and runs
//! inside its own network namespace (the FIB lookups read that namespace's routes and neighbours).
//! Needs root.

use std::net::Ipv4Addr;

use std::time::Duration;

use lb::config::Config;
use lb_common::{AffinityKey, AffinityValue};
use tests::{
    FixtureNs, Loaded, XDP_DROP, XDP_PASS, XDP_REDIRECT, MAC_BACKEND1, MAC_CLIENT, MAC_LB_BACKEND_SIDE, MAC_LB_CLIENT_SIDE, Pkt, assert_frame_eq, to_backend1,
    verify_checksums, decode, monotonic_ns, backend, backends, service, service_mut, udp_service, validated,
};


const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP_MULTI: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BACKEND1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
const BACKEND_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 12);

/// web: one backend with a resolved neighbour (exact-bytes cases); multi: three backends for
/// the affinity cases, with a 2 s affinity timeout; dns: UDP; noarp: a backend without a
/// neighbour entry.
fn config() -> Config {
    let mut dp = tests::datapath_config(&["cl", "bk"]);
    dp.affinity_entries = 1024;
    dp.max_services = 8;
    dp.max_backends = 32;
    dp.maglev_table_size = 251;
    dp.hash_seed = 7;
    let mut multi = service("multi", "10.0.0.101", 80, backends(&["10.1.0.11", "10.1.0.12", "10.1.0.13"], 8081));
    multi.affinity.timeout = Duration::from_secs(2);
    tests::config(
        dp,
        vec![
            service("web", "10.0.0.100", 80, vec![backend("10.1.0.11", 8080)]),
            udp_service("dns", "10.0.0.100", 53, vec![backend("10.1.0.11", 5353)]),
            multi,
            service("noarp", "10.0.0.102", 80, vec![backend("10.1.0.12", 9000)]),
        ],
    )
}

/// `config()` without the services after dns (multi and noarp).
fn config_web_and_dns() -> Config {
    let mut cfg = config();
    cfg.services.retain(|s| s.name == "web" || s.name == "dns");
    cfg
}

fn v4(a: std::net::IpAddr) -> Ipv4Addr {
    match a {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}

struct Fixture(Loaded);

impl std::ops::Deref for Fixture {
    type Target = Loaded;
    fn deref(&self) -> &Loaded {
        &self.0
    }
}

impl std::ops::DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut Loaded {
        &mut self.0
    }
}

impl Fixture {
    fn new() -> Self {
        Self(Loaded::from_config(config()))
    }

    /// Runs one frame arriving on `ingress`; returns the verdict and the output frame.
    fn run(&mut self, frame: &[u8], ingress: &str) -> (u32, Vec<u8>) {
        let r = self.0.test_run(frame, FixtureNs::ifindex(ingress)).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
        (r.verdict, r.out)
    }

    /// The (IPv4) backend address Maglev gives `client` in service `name`.
    fn maglev_pick(&self, name: &str, client: Ipv4Addr) -> Ipv4Addr {
        v4(self.0.maglev_pick(name, client.into()))
    }

    fn backend_id(&self, name: &str, addr: Ipv4Addr) -> u32 {
        self.0.backend_id(name, addr.into())
    }

    fn affinity_of(&self, name: &str, client: Ipv4Addr) -> Option<AffinityValue> {
        let id = self.service(name).entry.id;
        let key = AffinityKey { service_id: id, addr: [u32::from_ne_bytes(client.octets()), 0, 0, 0] };
        self.dp.affinity_entries().expect("reading AFFINITY").into_iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

fn in_fixture(tag: &str, f: impl FnOnce(&mut Fixture) + Send) {
    let ns = FixtureNs::new(tag);
    ns.run(|| {
        let mut fx = Fixture::new();
        f(&mut fx);
    });
}

/// What the balancer must send toward backend 1 for `p`: destination rewritten, TTL - 1,
/// MACs of the backend-side hop, checksums valid.
fn expected_to_backend1(p: &Pkt, port: u16) -> Vec<u8> {
    to_backend1(p, port).bytes()
}

#[test]
fn tcp_to_vip_is_rewritten_and_redirected() {
    in_fixture("tcp", |fx| {
        let p = Pkt::tcp(CLIENT, 40000, VIP, 80);
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT, "{}", decode(&out));
        assert_frame_eq(&out, &expected_to_backend1(&p, 8080), "TCP to VIP");
        verify_checksums(&out).unwrap();
        assert_eq!(fx.stat("redirect"), 1);
        assert_eq!(fx.stat("to_vip"), 1);
        let web = fx.service("web").entry.id;
        let c = fx.dp.service_counters(web).unwrap();
        assert_eq!((c.packets, c.bytes, c.new_pins, c.hits), (1, p.bytes().len() as u64, 1, 0));
    });
}

#[test]
fn udp_to_vip_is_rewritten_and_zero_checksum_stays_zero() {
    in_fixture("udp", |fx| {
        let p = Pkt::udp(CLIENT, 40001, VIP, 53);
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT);
        assert_frame_eq(&out, &expected_to_backend1(&p, 5353), "UDP to VIP");

        let p0 = Pkt { udp_no_checksum: true, ..Pkt::udp(CLIENT, 40002, VIP, 53) };
        let (v, out) = fx.run(&p0.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT);
        assert_frame_eq(&out, &expected_to_backend1(&p0, 5353), "UDP without checksum");
        let l4 = 14 + 20;
        assert_eq!(out[l4 + 6..l4 + 8], [0, 0], "a zero UDP checksum must stay zero");
    });
}

#[test]
fn reply_from_backend_gets_the_vip_back() {
    in_fixture("reply", |fx| {
        for (proto_pkt, vport) in [(Pkt::tcp(BACKEND1, 8080, CLIENT, 40000), 80), (Pkt::udp(BACKEND1, 5353, CLIENT, 40001), 53)] {
            let p = Pkt { eth_dst: MAC_LB_BACKEND_SIDE, eth_src: MAC_BACKEND1, ..proto_pkt };
            let (v, out) = fx.run(&p.bytes(), "bk");
            assert_eq!(v, XDP_REDIRECT, "{}", decode(&out));
            let want = Pkt {
                src: VIP,
                sport: vport,
                ttl: p.ttl - 1,
                eth_dst: MAC_CLIENT,
                eth_src: MAC_LB_CLIENT_SIDE,
                ..p.clone()
            };
            assert_frame_eq(&out, &want.bytes(), "reply");
        }
        assert_eq!(fx.stat("reply"), 2);
        let web = fx.service("web").entry.id;
        assert_eq!(fx.dp.service_counters(web).unwrap().reply_packets, 1);
    });
}

#[test]
fn reply_to_the_balancer_itself_is_not_translated() {
    in_fixture("local", |fx| {
        fx.dp.set_local_addrs(&[Ipv4Addr::new(10, 1, 0, 1).into()]).unwrap();
        let p = Pkt::tcp(BACKEND1, 8080, Ipv4Addr::new(10, 1, 0, 1), 33000);
        let (v, out) = fx.run(&p.bytes(), "bk");
        assert_eq!(v, XDP_PASS);
        assert_frame_eq(&out, &p.bytes(), "health-check reply");
        assert_eq!(fx.stat("reply"), 0);
    });
}

#[test]
fn martian_sources_to_a_vip_are_dropped() {
    in_fixture("martian", |fx| {
        for src in [VIP, Ipv4Addr::new(224, 0, 0, 5), Ipv4Addr::BROADCAST] {
            let (v, _) = fx.run(&Pkt::tcp(src, 40000, VIP, 80).bytes(), "cl");
            assert_eq!(v, XDP_DROP, "source {src}");
        }
        assert_eq!(fx.stat("drop_malformed"), 3);
        assert_eq!(fx.stat("redirect"), 0);
    });
}

#[test]
fn traffic_that_is_not_ours_passes_untouched() {
    in_fixture("other", |fx| {
        let mut frames: Vec<(&str, Vec<u8>)> = vec![
            ("TCP to a non-VIP", Pkt::tcp(CLIENT, 40000, Ipv4Addr::new(10, 0, 0, 1), 22).bytes()),
            ("VIP, port without a service", Pkt::tcp(CLIENT, 40000, VIP, 443).bytes()),
            ("VIP, UDP port of the TCP service", Pkt::udp(CLIENT, 40000, VIP, 80).bytes()),
            ("from a backend port that is not a service's", Pkt::tcp(BACKEND1, 22, CLIENT, 40000).bytes()),
        ];
        let mut icmp = Pkt::tcp(CLIENT, 0, VIP, 0).bytes();
        icmp[23] = 1; // ICMP: not handled by this datapath
        frames.push(("ICMP to the VIP", icmp));
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&MAC_CLIENT);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        frames.push(("ARP", arp));
        let mut lldp = Pkt::tcp(CLIENT, 1, VIP, 80).bytes();
        lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
        frames.push(("LLDP ethertype", lldp));
        for (what, f) in &frames {
            let (v, out) = fx.run(f, "cl");
            assert_eq!(v, XDP_PASS, "{what}");
            assert_frame_eq(&out, f, what);
        }
        assert_eq!(fx.stat("pass_not_ours"), frames.len() as u64);
        assert_eq!(fx.stat("to_vip"), 0);
    });
}

#[test]
fn ipv4_options_are_skipped_and_kept() {
    in_fixture("opts", |fx| {
        for opts in [vec![1, 1, 1, 0], vec![0x94, 0x04, 0, 0, 1, 1, 1, 1], vec![1; 40]] {
            let p = Pkt { options: opts.clone(), ..Pkt::tcp(CLIENT, 40000, VIP, 80) };
            let (v, out) = fx.run(&p.bytes(), "cl");
            assert_eq!(v, XDP_REDIRECT, "options {opts:?}");
            assert_frame_eq(&out, &expected_to_backend1(&p, 8080), "IPv4 with options");
        }
    });
}

#[test]
fn truncated_packets_are_never_forwarded_and_always_counted() {
    in_fixture("trunc", |fx| {
        for (what, p) in [
            ("TCP", Pkt { payload: vec![], ..Pkt::tcp(CLIENT, 40000, VIP, 80) }),
            ("UDP", Pkt { payload: vec![], ..Pkt::udp(CLIENT, 40000, VIP, 53) }),
            ("TCP with options", Pkt { payload: vec![], options: vec![1; 8], ..Pkt::tcp(CLIENT, 40000, VIP, 80) }),
            ("reply", Pkt { payload: vec![], ..Pkt::tcp(BACKEND1, 8080, CLIENT, 40000) }),
        ] {
            let full = p.bytes();
            for len in 14..full.len() {
                let before: u64 = fx.dp.stats().unwrap().iter().filter(|(k, _)| !matches!(**k, "to_vip" | "reply")).map(|(_, v)| v).sum();
                let (v, out) = fx.run(&full[..len], "cl");
                assert!(v == XDP_PASS || v == XDP_DROP, "{what} truncated to {len} bytes: verdict {v}");
                if v == XDP_PASS {
                    assert_frame_eq(&out, &full[..len], &format!("{what} truncated to {len} bytes, passed"));
                }
                let after: u64 = fx.dp.stats().unwrap().iter().filter(|(k, _)| !matches!(**k, "to_vip" | "reply")).map(|(_, v)| v).sum();
                assert_eq!(after, before + 1, "{what} truncated to {len} bytes: exactly one verdict counted");
                // Once the ports are there, a packet to a VIP or from a backend is ours: dropped.
                let l4 = 14 + p.ihl_bytes();
                if len >= l4 + 4 {
                    assert_eq!(v, XDP_DROP, "{what} truncated to {len} bytes (ports present) must be dropped");
                }
            }
        }
        assert!(fx.stat("drop_malformed") > 0 && fx.stat("pass_malformed") > 0);
        assert_eq!(fx.stat("redirect") + fx.stat("tx") + fx.stat("pass_fib"), 0);
    });
}

#[test]
fn bad_ihl_and_bad_total_length_are_dropped() {
    in_fixture("badlen", |fx| {
        let good = Pkt::tcp(CLIENT, 40000, VIP, 80).bytes();
        let mut ihl4 = good.clone();
        ihl4[14] = 0x44; // IHL 16 bytes: invalid
        let (v, out) = fx.run(&ihl4, "cl");
        assert_eq!(v, XDP_PASS);
        assert_frame_eq(&out, &ihl4, "IHL < 5");
        let mut long = good.clone();
        long[16..18].copy_from_slice(&((good.len() - 14 + 10) as u16).to_be_bytes());
        assert_eq!(fx.run(&long, "cl").0, XDP_DROP, "total length beyond the frame");
        let mut short = good.clone();
        short[16..18].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(fx.run(&short, "cl").0, XDP_DROP, "total length shorter than the headers");
        assert_eq!(fx.stat("drop_malformed"), 2);
        assert_eq!(fx.stat("pass_malformed"), 1);
    });
}

#[test]
fn egress_through_an_interface_we_are_not_attached_to_goes_through_the_kernel() {
    in_fixture("notattached", |fx| {
        // As if `bk` were a VLAN or bridge device on top of an attached interface.
        fx.dp.set_tx_port("bk", false).unwrap();
        let p = Pkt::tcp(CLIENT, 40000, VIP, 80);
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_PASS);
        // Rewritten, but TTL and MACs are left to the kernel.
        assert_frame_eq(&out, &Pkt { dst: BACKEND1, dport: 8080, ..p.clone() }.bytes(), "egress not attached");
        assert_eq!((fx.stat("pass_fib"), fx.stat("redirect")), (1, 0));
    });
}

#[test]
fn unresolved_next_hop_is_rewritten_and_passed_to_the_kernel() {
    in_fixture("noneigh", |fx| {
        let p = Pkt::tcp(CLIENT, 40000, Ipv4Addr::new(10, 0, 0, 102), 80);
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_PASS);
        // Rewritten, but MACs and TTL are the kernel's business on this path.
        let want = Pkt { dst: BACKEND_UNRESOLVED, dport: 9000, ..p.clone() };
        assert_frame_eq(&out, &want.bytes(), "next hop unresolved");
        assert_eq!(fx.stat("pass_fib"), 1);
    });
}

/// `bpf_fib_lookup`'s answer for a destination is reused for `FIB_CACHE_TTL_NS`, then looked up
/// again: a neighbour change shows within that time, not at once (the cost of not asking the FIB
/// for every packet).
#[test]
fn next_hops_are_cached_and_refreshed() {
    let ns = FixtureNs::new("fibcache");
    ns.run(|| {
        // The cache is per CPU.
        tests::pin_to_one_cpu();
        let mut fx = Fixture::new();
        let p = Pkt::tcp(CLIENT, 40000, VIP, 80);
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT);
        assert_frame_eq(&out, &expected_to_backend1(&p, 8080), "first packet (FIB lookup)");
        let filled = std::time::Instant::now();
        let new_mac = [0x02, 0, 0, 0, 0, 0x99];
        ns.ip(&["neigh", "replace", "10.1.0.11", "lladdr", "02:00:00:00:00:99", "dev", "bk", "nud", "permanent"]);
        let (v, out) = fx.run(&p.bytes(), "cl");
        let ttl = std::time::Duration::from_nanos(lb_common::FIB_CACHE_TTL_NS);
        assert_eq!(v, XDP_REDIRECT);
        // Only meaningful if this machine did not stall past the TTL meanwhile.
        if filled.elapsed() < ttl {
            assert_frame_eq(&out, &expected_to_backend1(&p, 8080), "within the TTL: the cached next hop");
        }
        std::thread::sleep(ttl + std::time::Duration::from_millis(50));
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT);
        let want = Pkt { eth_dst: new_mac, ..to_backend1(&p, 8080) };
        assert_frame_eq(&out, &want.bytes(), "after the TTL: the new neighbour");
        assert_eq!(fx.stat("redirect"), 3);
    });
}

/// Cached next hops remember whether their interface is a redirect target; changing the
/// targets (`TX_PORTS`) makes the program look up every destination again at once.
#[test]
fn redirect_target_changes_take_effect_at_once() {
    in_fixture("fibepoch", |fx| {
        // The cache is per CPU: without pinning, a run on another CPU would look up anyway.
        tests::pin_to_one_cpu();
        let p = Pkt::tcp(CLIENT, 40000, VIP, 80);
        assert_eq!(fx.run(&p.bytes(), "cl").0, XDP_REDIRECT);
        fx.dp.set_tx_port("bk", false).unwrap();
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_PASS, "no longer a redirect target: {}", decode(&out));
        assert_frame_eq(&out, &Pkt { dst: BACKEND1, dport: 8080, ..p.clone() }.bytes(), "handed to the kernel");
        fx.dp.set_tx_port("bk", true).unwrap();
        assert_eq!(fx.run(&p.bytes(), "cl").0, XDP_REDIRECT);
        assert_eq!((fx.stat("redirect"), fx.stat("pass_fib")), (2, 1));
    });
}

/// A frame to a VIP but for another MAC address than the ingress interface's (a switch flooding
/// it, promiscuous mode) belongs to the host with that MAC: passed untouched, counted, no pin.
#[test]
fn frames_for_another_mac_are_not_ours() {
    in_fixture("othermac", |fx| {
        for (what, mac) in [("another host", [0x02, 0, 0, 0, 0x07, 0x07]), ("broadcast", [0xff; 6])] {
            let p = Pkt { eth_dst: mac, ..Pkt::tcp(CLIENT, 40000, VIP, 80) };
            let (v, out) = fx.run(&p.bytes(), "cl");
            assert_eq!(v, XDP_PASS, "{what}: {}", decode(&out));
            assert_frame_eq(&out, &p.bytes(), what);
        }
        assert_eq!((fx.stat("pass_other_mac"), fx.stat("to_vip")), (2, 0));
        assert!(fx.affinity_of("web", CLIENT).is_none(), "no pin for a frame that was not ours");
        // The interface's own MAC: balanced as ever.
        assert_eq!(fx.run(&Pkt::tcp(CLIENT, 40000, VIP, 80).bytes(), "cl").0, XDP_REDIRECT);
    });
}

/// A cached next hop carries its route's MTU: a packet too big for it takes the full lookup,
/// which hands it to the kernel (which answers "fragmentation needed"); smaller packets keep
/// using the cache.
#[test]
fn packets_over_the_route_mtu_go_to_the_kernel() {
    let ns = FixtureNs::new("fibmtu");
    // Forwarding uses a route's MTU when it is locked (else the device's).
    ns.ip(&["route", "add", "10.1.0.11/32", "dev", "bk", "mtu", "lock", "1000"]);
    ns.run(|| {
        tests::pin_to_one_cpu();
        let mut fx = Fixture::new();
        let small = Pkt::tcp(CLIENT, 40000, VIP, 80);
        let big = Pkt { payload: vec![7; 1000], ..small.clone() };
        assert_eq!(fx.run(&small.bytes(), "cl").0, XDP_REDIRECT);
        let (v, out) = fx.run(&big.bytes(), "cl");
        assert_eq!(v, XDP_PASS, "over the route MTU: {}", decode(&out));
        assert_frame_eq(&out, &Pkt { dst: BACKEND1, dport: 8080, ..big.clone() }.bytes(), "big packet, rewritten only");
        let (v, out) = fx.run(&small.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT);
        assert_frame_eq(&out, &expected_to_backend1(&small, 8080), "small packet after the big one");
        assert_eq!((fx.stat("redirect"), fx.stat("pass_fib")), (2, 1));
    });
}

/// The program keeps the services it looked up in a per-CPU cache; every service change the
/// daemon writes retires it, so the very next packet on the same CPU sees the change.
#[test]
fn a_service_change_is_seen_at_the_next_packet() {
    in_fixture("svccache", |fx| {
        tests::pin_to_one_cpu();
        let p = Pkt::tcp(CLIENT, 40000, VIP, 80);
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT);
        assert_frame_eq(&out, &expected_to_backend1(&p, 8080), "before the change");
        // web's only backend moves to port 9090: a new backend (new id, new table half).
        let mut moved = config();
        service_mut(&mut moved, "web").backends[0].port = 9090;
        fx.0.rt.reconcile(&validated(moved), &mut fx.0.dp).unwrap();
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT);
        assert_frame_eq(&out, &expected_to_backend1(&p, 9090), "the next packet");
    });
}

/// `ADDR_FILTER` holds the bit of every VIP and backend address and no other, after every
/// reconcile (a clear bit makes the program pass the packet as not ours without a lookup).
#[test]
fn address_filter_holds_exactly_the_vips_and_backends() {
    in_fixture("filter", |fx| {
        let expected = |cfg: &Config| {
            let mut w = vec![0u64; lb_common::ADDR_FILTER_WORDS as usize];
            for s in &cfg.services {
                for a in std::iter::once(s.vip).chain(s.backends.iter().map(|b| b.address)) {
                    let (word, bit) = lb_common::addr_filter_bit(a.is_ipv6(), &lb::datapath::addr_words(a));
                    w[word as usize] |= 1 << bit;
                }
            }
            w
        };
        let full = validated(config());
        assert_eq!(fx.dp.addr_filter().unwrap(), expected(&full));
        let fewer = validated(config_web_and_dns());
        fx.0.rt.reconcile(&fewer, &mut fx.0.dp).unwrap();
        assert_eq!(fx.dp.addr_filter().unwrap(), expected(&fewer));
        assert_ne!(expected(&fewer), expected(&full));
        // The program consults it: with the VIP's bit cleared, its packets are not ours.
        let (word, _) = lb_common::addr_filter_bit(false, &[u32::from_ne_bytes(VIP.octets()), 0, 0, 0]);
        let (bword, _) = lb_common::addr_filter_bit(false, &[u32::from_ne_bytes(CLIENT.octets()), 0, 0, 0]);
        assert_ne!(word, bword, "fixture addresses share a filter word");
        fx.dp.write_addr_filter_word(word, 0).unwrap();
        let p = Pkt::tcp(CLIENT, 40000, VIP, 80);
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_PASS);
        assert_frame_eq(&out, &p.bytes(), "filtered out: untouched");
        assert_eq!((fx.stat("pass_not_ours"), fx.stat("to_vip")), (1, 0));
    });
}

#[test]
fn first_packet_pins_and_later_packets_hit() {
    in_fixture("pin", |fx| {
        let multi = fx.service("multi").entry.id;
        let client = Ipv4Addr::new(10, 0, 0, 2);
        assert!(fx.affinity_of("multi", client).is_none());
        let pick = fx.maglev_pick("multi", client);
        let p = Pkt::tcp(client, 40000, VIP_MULTI, 80);
        fx.run(&p.bytes(), "cl");
        let e = fx.affinity_of("multi", client).expect("an affinity entry after the first packet");
        assert_eq!(e.backend_id, fx.backend_id("multi", pick), "the pin is Maglev's pick");
        let c = fx.dp.service_counters(multi).unwrap();
        assert_eq!((c.new_pins, c.hits), (1, 0));
        for port in 40001..40005 {
            fx.run(&Pkt::tcp(client, port, VIP_MULTI, 80).bytes(), "cl");
        }
        let c = fx.dp.service_counters(multi).unwrap();
        assert_eq!((c.new_pins, c.hits, c.packets), (1, 4, 5), "one pin, then hits for every new connection");
    });
}

#[test]
fn a_pin_overrides_maglev() {
    in_fixture("override", |fx| {
        let client = Ipv4Addr::new(10, 0, 0, 2);
        let multi = fx.service("multi").entry.id;
        // Pin the client to a backend Maglev would not give it; the pin must win.
        let pick = fx.maglev_pick("multi", client);
        let other = fx.service("multi").backends.iter().find(|b| b.config.address != pick).unwrap().clone();
        let now = monotonic_ns();
        let key = AffinityKey { service_id: multi, addr: [u32::from_ne_bytes(client.octets()), 0, 0, 0] };
        fx.dp.write_affinity(key, AffinityValue { backend_id: other.id, flags: 0, last_seen_ns: now, created_ns: now }).unwrap();
        let (_, out) = fx.run(&Pkt::tcp(client, 40000, VIP_MULTI, 80).bytes(), "cl");
        assert_eq!(out[30..34], v4(other.config.address).octets(), "went to the pinned backend: {}", decode(&out));
        assert_eq!(u16::from_be_bytes([out[36], out[37]]), 8081);
        assert_eq!(fx.dp.backend_counters(other.id).unwrap().hits, 1);
    });
}

#[test]
fn an_expired_pin_is_reselected() {
    in_fixture("expired", |fx| {
        let client = Ipv4Addr::new(10, 0, 0, 2);
        let multi = fx.service("multi").entry.id;
        let pick = fx.maglev_pick("multi", client);
        let other = fx.service("multi").backends.iter().find(|b| b.config.address != pick).unwrap().clone();
        // Idle for 3 s against a 2 s timeout.
        let then = monotonic_ns() - 3_000_000_000;
        let key = AffinityKey { service_id: multi, addr: [u32::from_ne_bytes(client.octets()), 0, 0, 0] };
        fx.dp.write_affinity(key, AffinityValue { backend_id: other.id, flags: 0, last_seen_ns: then, created_ns: then }).unwrap();
        // The client's next connection (its SYN) is placed afresh.
        let (_, out) = fx.run(&Pkt::syn(client, 40000, VIP_MULTI, 80).bytes(), "cl");
        assert_eq!(out[30..34], pick.octets(), "re-selected by Maglev: {}", decode(&out));
        let c = fx.dp.service_counters(multi).unwrap();
        assert_eq!((c.expired, c.new_pins, c.hits), (1, 1, 0));
        let e = fx.affinity_of("multi", client).unwrap();
        assert_eq!(e.backend_id, fx.backend_id("multi", pick));
        assert!(e.created_ns > then && e.last_seen_ns > then, "the entry was renewed");
    });
}

#[test]
fn clients_spread_over_backends_and_stay() {
    in_fixture("spread", |fx| {
        let mut seen = std::collections::BTreeMap::new();
        // 10.0.0.100-102 are VIPs, not clients.
        for i in (10..250u8).filter(|i| !(100..=102).contains(i)) {
            let client = Ipv4Addr::new(10, 0, 0, i);
            let p = Pkt::tcp(client, 40000, VIP_MULTI, 80);
            let (_, a) = fx.run(&p.bytes(), "cl");
            let (_, b) = fx.run(&Pkt { sport: 50000, ..p }.bytes(), "cl");
            assert_eq!(a[30..34], b[30..34], "client {client} moved between connections");
            assert_eq!(a[30..34], fx.maglev_pick("multi", client).octets());
            *seen.entry(Ipv4Addr::new(a[30], a[31], a[32], a[33])).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "every backend gets clients: {seen:?}");
    });
}

/// Sends one TCP packet from `client` to the multi service; returns the backend it went to.
fn send_multi(fx: &mut Fixture, client: Ipv4Addr, sport: u16) -> Ipv4Addr {
    let (_, out) = fx.run(&Pkt::tcp(client, sport, VIP_MULTI, 80).bytes(), "cl");
    Ipv4Addr::new(out[30], out[31], out[32], out[33])
}

/// Pins 60 clients of the multi service; returns (client, backend) pairs.
fn pin_clients(fx: &mut Fixture) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    (10..70u8).map(|i| Ipv4Addr::new(10, 0, 0, i)).map(|c| (c, send_multi(fx, c, 40000))).collect()
}

fn set_backend(fx: &mut Fixture, addr: Ipv4Addr, f: impl FnOnce(&mut lb::state::BackendRt)) {
    let Loaded { dp, rt } = &mut fx.0;
    rt.update_backend(dp, "multi", addr.into(), 8081, |b| {
            f(b);
            true
        })
        .expect("updating a backend");
}

#[test]
fn a_down_backend_loses_exactly_its_clients() {
    in_fixture("failover", |fx| {
        let pins = pin_clients(fx);
        let dead = Ipv4Addr::new(10, 1, 0, 12);
        let generation = fx.service("multi").entry.generation;
        set_backend(fx, dead, |b| b.healthy = false);
        let s = fx.service("multi");
        assert_eq!(s.entry.generation, generation + 1, "a new table was swapped in");
        assert!(!s.table.contains(&fx.backend_id("multi", dead)), "the down backend left the table");
        let mut moved = 0;
        for (c, before) in &pins {
            let after = send_multi(fx, *c, 40001);
            if *before == dead {
                assert_ne!(after, dead, "client {c} still sent to the down backend");
                assert_eq!(after, fx.maglev_pick("multi", *c), "re-selected by the new table");
                moved += 1;
            } else {
                assert_eq!(after, *before, "client {c} of a live backend moved");
            }
        }
        assert!(moved > 0, "some clients were on the dead backend");
        let multi = fx.service("multi").entry.id;
        assert_eq!(fx.dp.service_counters(multi).unwrap().failovers, moved);
        // It comes back: nobody moves (the clients it lost are pinned elsewhere now).
        set_backend(fx, dead, |b| b.healthy = true);
        let now: Vec<_> = pins.iter().map(|(c, _)| (*c, send_multi(fx, *c, 40002))).collect();
        for ((c, b1), (_, b2)) in pins.iter().zip(&now) {
            if *b1 != dead {
                assert_eq!(b1, b2, "client {c} moved when a backend came back");
            } else {
                assert_ne!(*b2, dead, "client {c} went back to the returning backend");
            }
        }
    });
}

#[test]
fn draining_keeps_pins_and_takes_no_new_clients_and_force_moves_them() {
    in_fixture("drain", |fx| {
        let pins = pin_clients(fx);
        let drained = Ipv4Addr::new(10, 1, 0, 11);
        set_backend(fx, drained, |b| b.admin = lb::api::Admin::Draining);
        for (c, before) in &pins {
            assert_eq!(send_multi(fx, *c, 40001), *before, "pinned client {c} moved on a drain");
        }
        for i in 110..210u8 {
            let c = Ipv4Addr::new(10, 0, 0, i);
            assert_ne!(send_multi(fx, c, 40000), drained, "new client {c} reached a draining backend");
        }
        set_backend(fx, drained, |b| b.admin = lb::api::Admin::Forced);
        for (c, before) in &pins {
            let after = send_multi(fx, *c, 40002);
            if *before == drained {
                assert_ne!(after, drained, "client {c} kept a force-drained backend");
            } else {
                assert_eq!(after, *before);
            }
        }
    });
}

#[test]
fn every_backend_down_fails_open() {
    in_fixture("failopen", |fx| {
        let pins = pin_clients(fx);
        for a in [11, 12, 13] {
            set_backend(fx, Ipv4Addr::new(10, 1, 0, a), |b| b.healthy = false);
        }
        let s = fx.service("multi");
        assert!(s.fail_open && s.entry.flags & lb_common::SERVICE_F_FAIL_OPEN != 0);
        assert_eq!(s.entry.backend_count, 3, "the table holds every backend");
        for (c, before) in &pins {
            assert_eq!(send_multi(fx, *c, 40001), *before, "client {c} moved while failing open");
        }
        let (v, _) = fx.run(&Pkt::tcp(Ipv4Addr::new(10, 0, 0, 200), 1, VIP_MULTI, 80).bytes(), "cl");
        assert_ne!(v, XDP_DROP, "a new client is still served");
        set_backend(fx, Ipv4Addr::new(10, 1, 0, 13), |b| b.healthy = true);
        assert!(!fx.service("multi").fail_open);
    });
}

#[test]
fn a_pin_past_max_age_is_reselected_even_when_busy() {
    let mut cfg = config();
    service_mut(&mut cfg, "multi").affinity.max_age = Some(Duration::from_secs(5));
    let ns = FixtureNs::new("maxage");
    ns.run(move || {
        let mut fx = Fixture(Loaded::from_config(cfg));
        let client = Ipv4Addr::new(10, 0, 0, 2);
        let multi = fx.service("multi").entry.id;
        let pick = fx.maglev_pick("multi", client);
        let other = fx.service("multi").backends.iter().find(|b| b.config.address != pick).unwrap().id;
        let now = monotonic_ns();
        let key = AffinityKey { service_id: multi, addr: [u32::from_ne_bytes(client.octets()), 0, 0, 0] };
        // Seen just now (not idle), but pinned 6 s ago: past the 5 s max age.
        fx.dp.write_affinity(key, AffinityValue { backend_id: other, flags: 0, last_seen_ns: now, created_ns: now - 6_000_000_000 }).unwrap();
        // The client's next connection (its SYN) is placed afresh.
        let syn = |fx: &mut Fixture, port| {
            let (_, out) = fx.run(&Pkt::syn(client, port, VIP_MULTI, 80).bytes(), "cl");
            Ipv4Addr::new(out[30], out[31], out[32], out[33])
        };
        assert_eq!(syn(&mut fx, 40000), pick);
        assert_eq!(fx.dp.service_counters(multi).unwrap().expired, 1);
        // A pin 4 s old is kept.
        fx.dp.write_affinity(key, AffinityValue { backend_id: other, flags: 0, last_seen_ns: now, created_ns: now - 4_000_000_000 }).unwrap();
        assert_ne!(syn(&mut fx, 40001), pick);
    });
}

#[test]
fn reconcile_keeps_ids_and_pins_and_flushes_removed_backends() {
    in_fixture("reconcile", |fx| {
        let pins = pin_clients(fx);
        let ids: Vec<(Ipv4Addr, u32)> = fx.service("multi").backends.iter().map(|b| (v4(b.config.address), b.id)).collect();
        // Add a backend: ids stay, no pin moves.
        let mut added = config();
        service_mut(&mut added, "multi").backends.push(backend("10.1.0.14", 8081));
        let cfg = validated(added.clone());
        let ch = fx.0.rt.reconcile(&cfg, &mut fx.0.dp).unwrap();
        assert_eq!(ch.backends_added, ["multi/10.1.0.14:8081"]);
        for (a, id) in &ids {
            assert_eq!(fx.backend_id("multi", *a), *id, "backend {a} kept its id");
        }
        for (c, before) in &pins {
            assert_eq!(send_multi(fx, *c, 40001), *before, "client {c} moved on a reload that added a backend");
        }
        // Remove 10.1.0.13: its pins are deleted, the others stay.
        let mut removed = added;
        let b13 = service_mut(&mut removed, "multi").backends.iter_mut().find(|b| b.address.to_string() == "10.1.0.13").unwrap();
        *b13 = backend("10.1.0.15", 8081);
        let cfg = validated(removed);
        let gone = Ipv4Addr::new(10, 1, 0, 13);
        let n_gone = pins.iter().filter(|(_, b)| *b == gone).count();
        let ch = fx.0.rt.reconcile(&cfg, &mut fx.0.dp).unwrap();
        assert_eq!(ch.backends_removed, ["multi/10.1.0.13:8081"]);
        assert_eq!(ch.pins_flushed, n_gone);
        for (c, before) in &pins {
            let after = send_multi(fx, *c, 40002);
            if *before == gone {
                assert_ne!(after, gone);
            } else {
                assert_eq!(after, *before, "client {c} moved when another backend was removed");
            }
        }
        // A service removed: its SERVICES entry and pins go.
        let cfg = validated(config_web_and_dns());
        let ch = fx.0.rt.reconcile(&cfg, &mut fx.0.dp).unwrap();
        assert_eq!(ch.services_removed, ["noarp", "multi"]);
        let (v, out) = fx.run(&Pkt::tcp(Ipv4Addr::new(10, 0, 0, 10), 1, VIP_MULTI, 80).bytes(), "cl");
        assert_eq!(v, XDP_PASS, "the removed VIP is no longer ours: {}", decode(&out));
        assert!(fx.dp.affinity_entries().unwrap().is_empty() || fx.dp.affinity_entries().unwrap().iter().all(|(k, _)| k.service_id != 2));
    });
}

#[test]
fn a_split_prefix_places_its_clients_by_their_own_address() {
    use lb_common::{PIN_F_SPLIT, SERVICE_F_SPLIT_HOT};
    in_fixture("split", |fx| {
        let s = fx.service("multi").clone();
        let id = s.entry.id;
        // The service pins clients by /16 and splits hot prefixes.
        let mut entry = s.entry;
        entry.flags |= SERVICE_F_SPLIT_HOT;
        entry.v4_mask = lb_common::v4_mask(16);
        fx.dp.write_service(&s.key, entry).unwrap();
        let (a, b) = (s.backends[0].clone(), s.backends[1].clone());
        let client = Ipv4Addr::new(10, 0, 0, 2);
        let now = monotonic_ns();
        let pin = |backend_id, flags| AffinityValue { backend_id, flags, last_seen_ns: now, created_ns: now };
        let prefix = AffinityKey { service_id: id, addr: [u32::from_ne_bytes([10, 0, 0, 0]), 0, 0, 0] };
        let own = AffinityKey { service_id: id, addr: [u32::from_ne_bytes(client.octets()), 0, 0, 0] };
        fx.dp.write_affinity(prefix, pin(a.id, 0)).unwrap();
        fx.dp.write_affinity(own, pin(b.id, 0)).unwrap();
        // Not split: the /16's pin decides.
        let (_, out) = fx.run(&Pkt::tcp(client, 40000, VIP_MULTI, 80).bytes(), "cl");
        assert_eq!(out[30..34], v4(a.config.address).octets(), "the prefix's pin: {}", decode(&out));
        // Split (the prefix's pin flagged): the client's own pin decides; the prefix's pin stays.
        fx.dp.write_affinity(prefix, pin(a.id, PIN_F_SPLIT)).unwrap();
        let (_, out) = fx.run(&Pkt::tcp(client, 40001, VIP_MULTI, 80).bytes(), "cl");
        assert_eq!(out[30..34], v4(b.config.address).octets(), "its own pin: {}", decode(&out));
        assert_eq!(fx.dp.affinity_get(&prefix).unwrap().map(|v| v.backend_id), Some(a.id));
        // The prefix's pin gone, HOT_PREFIXES still lists it: the same, and no prefix pin is made.
        fx.dp.flush_affinity(|k, _| *k == prefix).unwrap();
        fx.dp.split_prefix(&prefix).unwrap();
        let (_, out) = fx.run(&Pkt::tcp(client, 40002, VIP_MULTI, 80).bytes(), "cl");
        assert_eq!(out[30..34], v4(b.config.address).octets(), "its own pin: {}", decode(&out));
        assert!(fx.dp.affinity_get(&prefix).unwrap().is_none(), "a split prefix gets no new pin of its own");
        // A new client of the split prefix: Maglev on its own address, its own pin, and its new
        // connection counted for its prefix.
        let newcomer = Ipv4Addr::new(10, 0, 7, 9);
        let (_, out) = fx.run(&Pkt::tcp(newcomer, 40000, VIP_MULTI, 80).bytes(), "cl");
        assert_eq!(out[30..34], fx.maglev_pick("multi", newcomer).octets(), "{}", decode(&out));
        let mine = AffinityKey { service_id: id, addr: [u32::from_ne_bytes(newcomer.octets()), 0, 0, 0] };
        assert!(fx.dp.affinity_get(&mine).unwrap().is_some(), "pinned by its own address");
        assert!(fx.dp.affinity_get(&prefix).unwrap().is_none());
        let counted: Vec<(AffinityKey, u64)> = fx.dp.prefix_new_counts().unwrap();
        assert!(counted.iter().any(|(k, n)| *k == prefix && *n >= 1), "{counted:?}");
        // Joined again: the prefix decides as before (no pin: Maglev on the /16).
        fx.dp.join_prefix(&prefix).unwrap();
        assert!(fx.dp.hot_prefixes().unwrap().is_empty());
    });
}
