//! Datapath breadth fixtures: IPv6 NAT and affinity, IPv6 extension headers, VLAN tags, IPv4 and
//! IPv6 fragments, ICMP echo and ICMP errors about VIP flows, through the loaded XDP program with
//! BPF_PROG_TEST_RUN. Like `datapath.rs`, every test loads its own program and maps inside its own
//! network namespace and asserts exact verdicts and output bytes; in addition every frame run is
//! checked to count exactly one verdict (every `STATS` counter except the informational `to_vip`,
//! `reply`, `fragment` and `icmp_error`). Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb::datapath::addr_words;
use lb_common::{AffinityKey, AffinityValue};
use tests::{
    from_backend, from_backend6, to_backend1, to_backend6, to_client, to_client6,
    INFORMATIONAL, Loaded, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, ETH_P_8021AD, ETH_P_8021Q, Ext, FixtureNs, MAC_BACKEND1, MAC_CLIENT,
    MAC_LB_BACKEND_SIDE, MAC_LB_CLIENT_SIDE, Pkt, Pkt6, V6_BACKEND1, V6_CLIENT,
    assert_frame_eq, decode, fragment_v4, fragment_v6,
    monotonic_ns, reassemble_v4, reassemble_v6, verify_checksums, vlan_tag,
};


const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP_MULTI: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BACKEND1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
/// A router on the client side that sends ICMP errors.
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
/// An address on the client side that is neither a VIP nor a backend.
const NOT_A_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const VIP6_MULTI: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x101);
const CLIENT6: Ipv6Addr = V6_CLIENT;
const BACKEND6: Ipv6Addr = V6_BACKEND1;
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
const NOT_A_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50);

struct Fixture {
    l: Loaded,
    /// The counters the last `run` changed, with their increments.
    last: BTreeMap<&'static str, u64>,
}

impl std::ops::Deref for Fixture {
    type Target = Loaded;
    fn deref(&self) -> &Loaded {
        &self.l
    }
}

impl std::ops::DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut Loaded {
        &mut self.l
    }
}

impl Fixture {
    fn new() -> Self {
        Self { l: Loaded::from_config(tests::fixture_config()), last: BTreeMap::new() }
    }

    /// Runs one frame arriving on `ingress`; returns the verdict and the output frame. Asserts
    /// that exactly one verdict counter went up, by one.
    fn run(&mut self, frame: &[u8], ingress: &str) -> (u32, Vec<u8>) {
        let r = self.l.test_run(frame, FixtureNs::ifindex(ingress)).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
        self.last = r.changed;
        let verdicts: Vec<_> = self.last.iter().filter(|(k, _)| !INFORMATIONAL.contains(k)).collect();
        assert!(
            verdicts.len() == 1 && *verdicts[0].1 == 1,
            "exactly one verdict counter must count a frame; changed: {:?}\n  frame: {}",
            self.last,
            decode(frame)
        );
        (r.verdict, r.out)
    }

    /// Asserts what the last `run` counted: the verdict counter `verdict` and each of `also`.
    #[track_caller]
    fn counted(&self, verdict: &str, also: &[&str]) {
        for name in std::iter::once(&verdict).chain(also) {
            assert_eq!(self.last.get(name), Some(&1), "counter {name} after the last frame; changed: {:?}", self.last);
        }
    }
}

fn in_fixture(tag: &str, f: impl FnOnce(&mut Fixture) + Send) {
    let ns = FixtureNs::new(tag);
    ns.run(|| {
        let mut fx = Fixture::new();
        f(&mut fx);
    });
}







fn v6_dst(frame: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap())
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

// ------------------------------------------------------------------------------------------
// 1. IPv6 NAT
// ------------------------------------------------------------------------------------------

#[test]
fn ipv6_tcp_and_udp_to_vip_are_rewritten_and_redirected() {
    in_fixture("v6nat", |fx| {
        for (p, port) in [(Pkt6::tcp(CLIENT6, 40000, VIP6, 80), 8080), (Pkt6::udp(CLIENT6, 40001, VIP6, 53), 5353)] {
            let (v, out) = fx.run(&p.bytes(), "cl");
            assert_eq!(v, XDP_REDIRECT, "{}", decode(&out));
            fx.counted("redirect", &["to_vip"]);
            assert_frame_eq(&out, &to_backend6(&p, port).bytes(), "IPv6 to the VIP");
            verify_checksums(&out).unwrap();
        }
        let web6 = fx.service("web6").entry.id;
        let c = fx.dp.service_counters(web6).unwrap();
        assert_eq!((c.packets, c.new_pins), (1, 1));
    });
}

#[test]
fn ipv6_reply_from_backend_gets_the_vip_back() {
    in_fixture("v6reply", |fx| {
        for (p, vport) in [
            (from_backend6(Pkt6::tcp(BACKEND6, 8080, CLIENT6, 40000)), 80),
            (from_backend6(Pkt6::udp(BACKEND6, 5353, CLIENT6, 40001)), 53),
        ] {
            let (v, out) = fx.run(&p.bytes(), "bk");
            assert_eq!(v, XDP_REDIRECT, "{}", decode(&out));
            fx.counted("redirect", &["reply"]);
            assert_frame_eq(&out, &to_client6(&p, vport).bytes(), "IPv6 reply");
            verify_checksums(&out).unwrap();
        }
        // A backend port that is no service's is not translated.
        let p = from_backend6(Pkt6::tcp(BACKEND6, 22, CLIENT6, 40000));
        let (v, out) = fx.run(&p.bytes(), "bk");
        assert_eq!(v, XDP_PASS);
        fx.counted("pass_not_ours", &[]);
        assert_frame_eq(&out, &p.bytes(), "IPv6 from a backend's other port");
    });
}

#[test]
fn ipv6_affinity_is_per_64_and_clients_spread() {
    in_fixture("v6aff", |fx| {
        let multi6 = fx.service("multi6").entry.id;
        let send = |fx: &mut Fixture, client: Ipv6Addr, sport: u16| -> Ipv6Addr {
            let (_, out) = fx.run(&Pkt6::tcp(client, sport, VIP6_MULTI, 80).bytes(), "cl");
            assert!(fx.last.contains_key("to_vip"), "{}", decode(&out));
            assert_eq!(u16::from_be_bytes([out[56], out[57]]), 8081, "{}", decode(&out));
            verify_checksums(&out).unwrap();
            v6_dst(&out)
        };
        // Four clients of 2001:db8::/64: one pin, one backend.
        let same: [Ipv6Addr; 4] =
            ["2001:db8::2", "2001:db8::3", "2001:db8::ffff:1234", "2001:db8::1:0:0:9"].map(|a| a.parse().unwrap());
        let first = send(fx, same[0], 40000);
        assert_eq!(IpAddr::V6(first), fx.maglev_pick("multi6", IpAddr::V6(same[0])));
        for (i, c) in same.iter().enumerate().skip(1) {
            assert_eq!(send(fx, *c, 40000 + i as u16), first, "client {c} of the same /64 went elsewhere");
        }
        let pins: Vec<_> = fx.dp.affinity_entries().unwrap().into_iter().filter(|(k, _)| k.service_id == multi6).collect();
        let net: Ipv6Addr = "2001:db8::".parse().unwrap();
        assert_eq!(pins.len(), 1, "one pin for the /64: {pins:?}");
        assert_eq!(pins[0].0.addr, addr_words(IpAddr::V6(net)), "the pin is keyed by the /64");
        let c = fx.dp.service_counters(multi6).unwrap();
        assert_eq!((c.new_pins, c.hits), (1, 3));

        // A pin written for the /64 moves every address in it.
        let other = fx.service("multi6").backends.iter().find(|b| b.config.address != IpAddr::V6(first)).unwrap().clone();
        let now = monotonic_ns();
        let key = AffinityKey { service_id: multi6, addr: addr_words(IpAddr::V6(net)) };
        fx.dp.write_affinity(key, AffinityValue { backend_id: other.id, flags: 0, last_seen_ns: now, created_ns: now }).unwrap();
        assert_eq!(IpAddr::V6(send(fx, same[3], 41000)), other.config.address, "the /64's pin is followed");

        // Clients of different /64s spread over the backends; two addresses of each /64 agree.
        let mut seen = BTreeMap::new();
        for i in 1..=60u16 {
            let a = Ipv6Addr::new(0x2001, 0xdb8, 0, i, 0, 0, 0, 2);
            let b = Ipv6Addr::new(0x2001, 0xdb8, 0, i, 0xabcd, 0, 0, 0x99);
            let ba = send(fx, a, 40000);
            assert_eq!(IpAddr::V6(ba), fx.maglev_pick("multi6", IpAddr::V6(a)), "client {a}: Maglev's pick");
            assert_eq!(send(fx, b, 40001), ba, "{b} and {a} share a /64");
            *seen.entry(ba).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "every backend gets /64s: {seen:?}");
    });
}

// ------------------------------------------------------------------------------------------
// 2. IPv6 extension headers
// ------------------------------------------------------------------------------------------

#[test]
fn ipv6_extension_headers_are_skipped_and_kept() {
    in_fixture("v6ext", |fx| {
        let exts = [
            vec![Ext::options(0, 0)],
            vec![Ext::options(60, 0)],
            vec![Ext::options(0, 0), Ext::options(60, 1)],
            vec![Ext::options(0, 2), Ext::options(60, 0), Ext::options(60, 0)],
        ];
        for ext in exts {
            for (p, port) in [(Pkt6::tcp(CLIENT6, 40000, VIP6, 80), 8080), (Pkt6::udp(CLIENT6, 40001, VIP6, 53), 5353)] {
                let p = Pkt6 { ext: ext.clone(), ..p };
                let what = format!("{} behind {} extension header bytes", if p.proto == 6 { "TCP" } else { "UDP" }, p.ext_len());
                let (v, out) = fx.run(&p.bytes(), "cl");
                assert_eq!(v, XDP_REDIRECT, "{what}: {}", decode(&out));
                fx.counted("redirect", &["to_vip"]);
                assert_frame_eq(&out, &to_backend6(&p, port).bytes(), &what);
                verify_checksums(&out).unwrap();
            }
        }
        // A reply behind extension headers too.
        let p = from_backend6(Pkt6 { ext: vec![Ext::options(60, 0)], ..Pkt6::tcp(BACKEND6, 8080, CLIENT6, 40000) });
        let (v, out) = fx.run(&p.bytes(), "bk");
        assert_eq!(v, XDP_REDIRECT);
        fx.counted("redirect", &["reply"]);
        assert_frame_eq(&out, &to_client6(&p, 80).bytes(), "reply behind destination options");
    });
}

#[test]
fn ipv6_extension_chain_of_seven_is_dropped_when_ours_and_passed_otherwise() {
    in_fixture("v6chain", |fx| {
        let mut chain = vec![Ext::options(0, 0)];
        chain.extend((0..6).map(|_| Ext::options(60, 0)));
        assert_eq!(chain.len(), 7);
        let p = Pkt6 { ext: chain.clone(), ..Pkt6::tcp(CLIENT6, 40000, VIP6, 80) };
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_DROP, "7 extension headers to the VIP: {}", decode(&out));
        fx.counted("drop_malformed", &[]);

        let q = Pkt6 { dst: NOT_A_VIP6, ..p.clone() };
        let (v, out) = fx.run(&q.bytes(), "cl");
        assert_eq!(v, XDP_PASS, "7 extension headers to a non-VIP");
        assert_frame_eq(&out, &q.bytes(), "7 extension headers to a non-VIP");
    });
}

#[test]
fn ipv6_udp_without_checksum_to_vip_is_dropped() {
    in_fixture("v6udp0", |fx| {
        let p = Pkt6 { udp_no_checksum: true, ..Pkt6::udp(CLIENT6, 40001, VIP6, 53) };
        assert_eq!(p.bytes()[54 + 6..54 + 8], [0, 0]);
        let (v, out) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_DROP, "{}", decode(&out));
        fx.counted("drop_malformed", &[]);
    });
}

// ------------------------------------------------------------------------------------------
// 3. VLAN tags
// ------------------------------------------------------------------------------------------

/// An IPv4 frame's L3+ bytes with the TTL and header checksum blanked: what must agree between a
/// tagged frame (passed, TTL kept) and an untagged one (redirected, TTL - 1).
fn l3_without_ttl(frame: &[u8], l3: usize) -> Vec<u8> {
    let mut b = frame[l3..].to_vec();
    b[8] = 0;
    b[10] = 0;
    b[11] = 0;
    b
}

#[test]
fn vlan_tagged_frames_are_rewritten_and_passed_with_the_tags_kept() {
    in_fixture("vlan", |fx| {
        let p = Pkt::tcp(CLIENT, 40000, VIP, 80);
        // Untagged: redirected.
        let (v, plain) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT);
        // Rewritten, TTL and MACs untouched (the kernel forwards it).
        let rewritten = Pkt { dst: BACKEND1, dport: 8080, ..p.clone() }.bytes();
        let single = |f: &[u8]| vlan_tag(f, ETH_P_8021Q, 100);
        let double = |f: &[u8]| vlan_tag(&vlan_tag(f, ETH_P_8021Q, 100), ETH_P_8021AD, 200);
        for (what, tag, tags) in [
            ("802.1Q", &single as &dyn Fn(&[u8]) -> Vec<u8>, 4),
            ("802.1ad", &double as &dyn Fn(&[u8]) -> Vec<u8>, 8),
        ] {
            let (v, out) = fx.run(&tag(&p.bytes()), "cl");
            assert_eq!(v, XDP_PASS, "{what}: {}", decode(&out));
            fx.counted("pass_vlan", &["to_vip"]);
            assert_frame_eq(&out, &tag(&rewritten), what);
            verify_checksums(&out).unwrap();
            assert_eq!(l3_without_ttl(&out, 14 + tags), l3_without_ttl(&plain, 14), "{what}: same L3/L4 rewrite as untagged");
            let l4 = 14 + tags + 20;
            assert_eq!(out[l4..], plain[34..], "{what}: identical L4 bytes");
        }
        // IPv6 in a tag.
        let p6 = Pkt6::tcp(CLIENT6, 40000, VIP6, 80);
        let (v, out) = fx.run(&single(&p6.bytes()), "cl");
        assert_eq!(v, XDP_PASS, "tagged IPv6: {}", decode(&out));
        fx.counted("pass_vlan", &["to_vip"]);
        assert_frame_eq(&out, &single(&Pkt6 { dst: BACKEND6, dport: 8080, ..p6 }.bytes()), "tagged IPv6");
    });
}

// ------------------------------------------------------------------------------------------
// 4. Fragments
// ------------------------------------------------------------------------------------------

/// A 108-byte UDP datagram (100 payload bytes) cut into 48 + 48 + 12 bytes.
const CUTS: [usize; 2] = [48, 96];

#[test]
fn ipv4_fragments_follow_their_first_fragment() {
    in_fixture("frag4", |fx| {
        let p = Pkt { payload: pattern(100), frag: 0, ip_id: 0x4242, ..Pkt::udp(CLIENT, 40001, VIP, 53) };
        let frags = fragment_v4(&p.bytes(), &CUTS);
        let want_full = to_backend1(&p, 5353);
        let want = fragment_v4(&want_full.bytes(), &CUTS);
        assert_eq!(frags.len(), 3);
        let mut outs = vec![Vec::new(); 3];
        // First, then the last, then the middle one: later fragments need not come in order.
        for i in [0, 2, 1] {
            let (v, out) = fx.run(&frags[i], "cl");
            assert_eq!(v, XDP_REDIRECT, "fragment {i}: {}", decode(&out));
            if i == 0 {
                fx.counted("redirect", &["to_vip"]);
            } else {
                fx.counted("redirect", &["fragment"]);
            }
            assert_frame_eq(&out, &want[i], &format!("fragment {i}"));
            verify_checksums(&out).unwrap();
            outs[i] = out;
        }
        let whole = reassemble_v4(&outs);
        verify_checksums(&whole).unwrap_or_else(|e| panic!("reassembled output: {e}: {}", decode(&whole)));
        assert_frame_eq(&whole, &want_full.bytes(), "reassembled output");
        let dns = fx.service("dns").entry.id;
        assert_eq!(fx.dp.service_counters(dns).unwrap().packets, 3);
    });
}

#[test]
fn ipv4_reply_fragments_get_the_vip_as_source() {
    in_fixture("frag4r", |fx| {
        let p = from_backend(Pkt { payload: pattern(100), frag: 0, ip_id: 0x5151, ..Pkt::udp(BACKEND1, 5353, CLIENT, 40001) });
        let frags = fragment_v4(&p.bytes(), &CUTS);
        let want_full = to_client(&p, 53);
        let want = fragment_v4(&want_full.bytes(), &CUTS);
        let mut outs = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            let (v, out) = fx.run(f, "bk");
            assert_eq!(v, XDP_REDIRECT, "reply fragment {i}: {}", decode(&out));
            fx.counted("redirect", if i == 0 { &["reply"] } else { &["fragment"] });
            assert_frame_eq(&out, &want[i], &format!("reply fragment {i}"));
            outs.push(out);
        }
        assert_frame_eq(&reassemble_v4(&outs), &want_full.bytes(), "reassembled reply");
    });
}

#[test]
fn ipv6_fragments_follow_their_first_fragment() {
    in_fixture("frag6", |fx| {
        let p = Pkt6 { payload: pattern(100), ..Pkt6::udp(CLIENT6, 40001, VIP6, 53) };
        let frags = fragment_v6(&p.bytes(), 0xdead_beef, &CUTS);
        let want_full = to_backend6(&p, 5353);
        let want = fragment_v6(&want_full.bytes(), 0xdead_beef, &CUTS);
        let mut outs = vec![Vec::new(); 3];
        for i in [0, 2, 1] {
            let (v, out) = fx.run(&frags[i], "cl");
            assert_eq!(v, XDP_REDIRECT, "fragment {i}: {}", decode(&out));
            fx.counted("redirect", if i == 0 { &["to_vip"] } else { &["fragment"] });
            assert_frame_eq(&out, &want[i], &format!("IPv6 fragment {i}"));
            outs[i] = out;
        }
        let whole = reassemble_v6(&outs);
        verify_checksums(&whole).unwrap_or_else(|e| panic!("reassembled output: {e}: {}", decode(&whole)));
        assert_frame_eq(&whole, &want_full.bytes(), "reassembled IPv6 output");
    });
}

#[test]
fn ipv6_reply_fragments_get_the_vip_as_source() {
    in_fixture("frag6r", |fx| {
        let p = from_backend6(Pkt6 { payload: pattern(100), ..Pkt6::udp(BACKEND6, 5353, CLIENT6, 40001) });
        let frags = fragment_v6(&p.bytes(), 0x0102_0304, &CUTS);
        let want_full = to_client6(&p, 53);
        let want = fragment_v6(&want_full.bytes(), 0x0102_0304, &CUTS);
        let mut outs = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            let (v, out) = fx.run(f, "bk");
            assert_eq!(v, XDP_REDIRECT, "reply fragment {i}: {}", decode(&out));
            fx.counted("redirect", if i == 0 { &["reply"] } else { &["fragment"] });
            assert_frame_eq(&out, &want[i], &format!("IPv6 reply fragment {i}"));
            outs.push(out);
        }
        let whole = reassemble_v6(&outs);
        verify_checksums(&whole).unwrap();
        assert_frame_eq(&whole, &want_full.bytes(), "reassembled IPv6 reply");
    });
}

#[test]
fn later_fragments_without_a_first_are_dropped_when_ours_and_passed_otherwise() {
    in_fixture("unplaced", |fx| {
        // IPv4: a first fragment with id 0x4242 was seen; 0x4343's was not.
        let p = Pkt { payload: pattern(100), frag: 0, ip_id: 0x4242, ..Pkt::udp(CLIENT, 40001, VIP, 53) };
        let seen = fragment_v4(&p.bytes(), &CUTS);
        assert_eq!(fx.run(&seen[0], "cl").0, XDP_REDIRECT);
        let other = fragment_v4(&Pkt { ip_id: 0x4343, ..p.clone() }.bytes(), &CUTS);
        for f in &other[1..] {
            let (v, out) = fx.run(f, "cl");
            assert_eq!(v, XDP_DROP, "unplaced IPv4 fragment to the VIP: {}", decode(&out));
            fx.counted("drop_frag_unplaced", &[]);
        }
        let not_ours = fragment_v4(&Pkt { dst: NOT_A_VIP, ..p.clone() }.bytes(), &CUTS);
        let (v, out) = fx.run(&not_ours[1], "cl");
        assert_eq!(v, XDP_PASS);
        fx.counted("pass_not_ours", &[]);
        assert_frame_eq(&out, &not_ours[1], "unplaced IPv4 fragment to a non-VIP");

        // IPv6 likewise.
        let p6 = Pkt6 { payload: pattern(100), ..Pkt6::udp(CLIENT6, 40001, VIP6, 53) };
        let f6 = fragment_v6(&p6.bytes(), 77, &CUTS);
        for f in &f6[1..] {
            let (v, out) = fx.run(f, "cl");
            assert_eq!(v, XDP_DROP, "unplaced IPv6 fragment to the VIP: {}", decode(&out));
            fx.counted("drop_frag_unplaced", &[]);
        }
        let n6 = fragment_v6(&Pkt6 { dst: NOT_A_VIP6, ..p6 }.bytes(), 77, &CUTS);
        let (v, out) = fx.run(&n6[2], "cl");
        assert_eq!(v, XDP_PASS);
        fx.counted("pass_not_ours", &[]);
        assert_frame_eq(&out, &n6[2], "unplaced IPv6 fragment to a non-VIP");
    });
}

// ------------------------------------------------------------------------------------------
// 5. ICMP echo
// ------------------------------------------------------------------------------------------

#[test]
fn icmp_echo_to_the_vip_is_answered_in_place() {
    in_fixture("echo4", |fx| {
        let rest = [0x12, 0x34, 0x00, 0x07];
        let data = pattern(56);
        let req = Pkt { ttl: 61, ip_id: 0x7777, ..Pkt::icmp(CLIENT, VIP, 8, 0, rest, &data) }.bytes();
        let (v, out) = fx.run(&req, "cl");
        assert_eq!(v, XDP_TX, "{}", decode(&out));
        fx.counted("icmp_echo", &[]);
        let want = Pkt { eth_dst: MAC_CLIENT, eth_src: MAC_LB_CLIENT_SIDE, ip_id: 0x7777, ..Pkt::icmp(VIP, CLIENT, 0, 0, rest, &data) }.bytes();
        assert_frame_eq(&out, &want, "echo reply");
        verify_checksums(&out).unwrap();
    });
}

#[test]
fn icmpv6_echo_to_the_vip_is_answered_in_place() {
    in_fixture("echo6", |fx| {
        let rest = [0xbe, 0xef, 0x00, 0x01];
        let data = pattern(40);
        let req = Pkt6 { hop_limit: 57, ..Pkt6::icmp(CLIENT6, VIP6, 128, 0, rest, &data) }.bytes();
        let (v, out) = fx.run(&req, "cl");
        assert_eq!(v, XDP_TX, "{}", decode(&out));
        fx.counted("icmp_echo", &[]);
        let want = Pkt6 { eth_dst: MAC_CLIENT, eth_src: MAC_LB_CLIENT_SIDE, ..Pkt6::icmp(VIP6, CLIENT6, 129, 0, rest, &data) }.bytes();
        assert_frame_eq(&out, &want, "ICMPv6 echo reply");
        verify_checksums(&out).unwrap();
    });
}

#[test]
fn icmp_echo_to_a_non_vip_passes_untouched() {
    in_fixture("echoother", |fx| {
        let rest = [0, 1, 0, 1];
        let frames = [
            Pkt { ip_id: 1, frag: 0, ..Pkt::icmp(CLIENT, NOT_A_VIP, 8, 0, rest, b"ping") }.bytes(),
            Pkt6::icmp(CLIENT6, NOT_A_VIP6, 128, 0, rest, b"ping").bytes(),
        ];
        for f in &frames {
            let (v, out) = fx.run(f, "cl");
            assert_eq!(v, XDP_PASS, "{}", decode(f));
            fx.counted("pass_not_ours", &[]);
            assert_frame_eq(&out, f, "echo to a non-VIP");
        }
    });
}

// ------------------------------------------------------------------------------------------
// 6. ICMP errors about a VIP flow
// ------------------------------------------------------------------------------------------

/// The IP packet a reply left the balancer as (VIP side -> client), without payload: what an ICMP
/// error quotes in full.
fn quoted_v4(p: Pkt) -> Vec<u8> {
    Pkt { payload: Vec::new(), ttl: 63, ..p }.bytes()[14..].to_vec()
}

fn quoted_v6(p: Pkt6) -> Vec<u8> {
    Pkt6 { payload: Vec::new(), hop_limit: 63, ..p }.bytes()[14..].to_vec()
}

const MTU_1400: [u8; 4] = [0, 0, 0x05, 0x78];
const MTU_1280: [u8; 4] = [0, 0, 0x05, 0x00];

/// An ICMP error from the router about `quote`, sent to `dst` with Ethernet addresses `macs`.
fn icmp_error(dst: Ipv4Addr, ttl: u8, macs: ([u8; 6], [u8; 6]), ty: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    Pkt { eth_dst: macs.0, eth_src: macs.1, ttl, ip_id: 0x5555, frag: 0, ..Pkt::icmp(ROUTER, dst, ty, code, rest, quote) }.bytes()
}

/// An ICMPv6 error (code 0) from the router about `quote`, sent to `dst`.
fn icmp6_error(dst: Ipv6Addr, hop_limit: u8, macs: ([u8; 6], [u8; 6]), ty: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    Pkt6 { eth_dst: macs.0, eth_src: macs.1, hop_limit, ..Pkt6::icmp(ROUTER6, dst, ty, 0, rest, quote) }.bytes()
}

/// A fragmentation-needed error from the router about `quote`, sent to `dst`.
fn frag_needed(dst: Ipv4Addr, ttl: u8, macs: ([u8; 6], [u8; 6]), quote: &[u8]) -> Vec<u8> {
    icmp_error(dst, ttl, macs, 3, 4, MTU_1400, quote)
}

fn packet_too_big(dst: Ipv6Addr, hop_limit: u8, macs: ([u8; 6], [u8; 6]), quote: &[u8]) -> Vec<u8> {
    icmp6_error(dst, hop_limit, macs, 2, MTU_1280, quote)
}

const FROM_ROUTER: ([u8; 6], [u8; 6]) = (MAC_LB_CLIENT_SIDE, MAC_CLIENT);
const TO_BACKEND1: ([u8; 6], [u8; 6]) = (MAC_BACKEND1, MAC_LB_BACKEND_SIDE);

#[test]
fn icmp_frag_needed_about_a_vip_flow_goes_to_the_clients_backend() {
    in_fixture("icmperr4", |fx| {
        // Pin the client first.
        assert_eq!(fx.run(&Pkt::tcp(CLIENT, 40000, VIP, 80).bytes(), "cl").0, XDP_REDIRECT);
        for (what, quote, want_quote) in [
            (
                "TCP quote",
                quoted_v4(Pkt::tcp(VIP, 80, CLIENT, 40000)),
                quoted_v4(Pkt::tcp(BACKEND1, 8080, CLIENT, 40000)),
            ),
            (
                "UDP quote",
                quoted_v4(Pkt::udp(VIP, 53, CLIENT, 40001)),
                quoted_v4(Pkt::udp(BACKEND1, 5353, CLIENT, 40001)),
            ),
        ] {
            let f = frag_needed(VIP, 64, FROM_ROUTER, &quote);
            verify_checksums(&f).unwrap();
            let (v, out) = fx.run(&f, "cl");
            assert_eq!(v, XDP_REDIRECT, "{what}: {}", decode(&out));
            fx.counted("redirect", &["icmp_error"]);
            assert_frame_eq(&out, &frag_needed(BACKEND1, 63, TO_BACKEND1, &want_quote), what);
            verify_checksums(&out).unwrap_or_else(|e| panic!("{what}: {e}: {}", decode(&out)));
        }
    });
}

#[test]
fn other_icmp_errors_and_short_quotes_are_translated_too() {
    in_fixture("icmperrx", |fx| {
        let quote = quoted_v4(Pkt::tcp(VIP, 80, CLIENT, 40000));
        let want_quote = quoted_v4(Pkt::tcp(BACKEND1, 8080, CLIENT, 40000));
        let error = |dst, ttl, macs, ty, code, q: &[u8]| icmp_error(dst, ttl, macs, ty, code, [0; 4], q);
        // Time exceeded and host unreachable, full quotes; and RFC 792's minimal quote (IP header
        // + 8 bytes: the ports and sequence number, no TCP checksum), as many routers send it.
        for (what, ty, code, n) in [("time exceeded", 11, 0, 40), ("host unreachable", 3, 1, 40), ("8-byte quote", 3, 4, 28)] {
            let f = error(VIP, 64, FROM_ROUTER, ty, code, &quote[..n]);
            let (v, out) = fx.run(&f, "cl");
            assert_eq!(v, XDP_REDIRECT, "{what}: {}", decode(&out));
            fx.counted("redirect", &["icmp_error"]);
            assert_frame_eq(&out, &error(BACKEND1, 63, TO_BACKEND1, ty, code, &want_quote[..n]), what);
            verify_checksums(&out).unwrap_or_else(|e| panic!("{what}: {e}: {}", decode(&out)));
        }
        // ICMPv6 destination unreachable and time exceeded.
        let quote = quoted_v6(Pkt6::tcp(VIP6, 80, CLIENT6, 40000));
        let want_quote = quoted_v6(Pkt6::tcp(BACKEND6, 8080, CLIENT6, 40000));
        let error6 = |dst, hl, macs, ty, q: &[u8]| icmp6_error(dst, hl, macs, ty, [0; 4], q);
        for (what, ty) in [("ICMPv6 destination unreachable", 1), ("ICMPv6 time exceeded", 3)] {
            let (v, out) = fx.run(&error6(VIP6, 64, FROM_ROUTER, ty, &quote), "cl");
            assert_eq!(v, XDP_REDIRECT, "{what}: {}", decode(&out));
            fx.counted("redirect", &["icmp_error"]);
            assert_frame_eq(&out, &error6(BACKEND6, 63, TO_BACKEND1, ty, &want_quote), what);
        }
    });
}

#[test]
fn icmp_error_follows_the_clients_pin() {
    in_fixture("icmppin", |fx| {
        // A client Maglev sends elsewhere, pinned to backend 10.1.0.11 (which has a neighbour).
        // Clients are taken below 10.0.0.100: a VIP is no client's source address.
        let client = (10..100u8)
            .map(|i| Ipv4Addr::new(10, 0, 0, i))
            .find(|c| fx.maglev_pick("multi", IpAddr::V4(*c)) != IpAddr::V4(BACKEND1))
            .unwrap();
        let multi = fx.service("multi").entry.id;
        let id = fx.backend_id("multi", IpAddr::V4(BACKEND1));
        let now = monotonic_ns();
        let key = AffinityKey { service_id: multi, addr: addr_words(IpAddr::V4(client)) };
        fx.dp.write_affinity(key, AffinityValue { backend_id: id, flags: 0, last_seen_ns: now, created_ns: now }).unwrap();
        let quote = quoted_v4(Pkt::tcp(VIP_MULTI, 80, client, 40000));
        let (v, out) = fx.run(&frag_needed(VIP_MULTI, 64, FROM_ROUTER, &quote), "cl");
        assert_eq!(v, XDP_REDIRECT, "{}", decode(&out));
        fx.counted("redirect", &["icmp_error"]);
        let want_quote = quoted_v4(Pkt::tcp(BACKEND1, 8081, client, 40000));
        assert_frame_eq(&out, &frag_needed(BACKEND1, 63, TO_BACKEND1, &want_quote), "error about a pinned client");

        // Another client, pinned by its own traffic to an unresolved backend: rewritten the same
        // way, passed to the kernel (TTL and MACs are its business then).
        let pinned = client;
        let client = (10..100u8)
            .map(|i| Ipv4Addr::new(10, 0, 0, i))
            .find(|c| *c != pinned && fx.maglev_pick("multi", IpAddr::V4(*c)) == IpAddr::V4(Ipv4Addr::new(10, 1, 0, 12)))
            .unwrap();
        let (v, out) = fx.run(&Pkt::tcp(client, 40000, VIP_MULTI, 80).bytes(), "cl");
        assert_eq!(v, XDP_PASS, "client {client}: {} counted {:?}", decode(&out), fx.last);
        fx.counted("pass_fib", &["to_vip"]);
        let b12 = Ipv4Addr::new(10, 1, 0, 12);
        let quote = quoted_v4(Pkt::tcp(VIP_MULTI, 80, client, 40000));
        let (v, out) = fx.run(&frag_needed(VIP_MULTI, 64, FROM_ROUTER, &quote), "cl");
        assert_eq!(v, XDP_PASS, "{}", decode(&out));
        fx.counted("pass_fib", &["icmp_error"]);
        let want_quote = quoted_v4(Pkt::tcp(b12, 8081, client, 40000));
        assert_frame_eq(&out, &frag_needed(b12, 64, FROM_ROUTER, &want_quote), "error about a client of 10.1.0.12");
    });
}

#[test]
fn icmpv6_packet_too_big_about_a_vip_flow_goes_to_the_clients_backend() {
    in_fixture("icmperr6", |fx| {
        assert_eq!(fx.run(&Pkt6::tcp(CLIENT6, 40000, VIP6, 80).bytes(), "cl").0, XDP_REDIRECT);
        for (what, quote, want_quote) in [
            (
                "TCP quote",
                quoted_v6(Pkt6::tcp(VIP6, 80, CLIENT6, 40000)),
                quoted_v6(Pkt6::tcp(BACKEND6, 8080, CLIENT6, 40000)),
            ),
            (
                "UDP quote",
                quoted_v6(Pkt6::udp(VIP6, 53, CLIENT6, 40001)),
                quoted_v6(Pkt6::udp(BACKEND6, 5353, CLIENT6, 40001)),
            ),
        ] {
            let f = packet_too_big(VIP6, 64, FROM_ROUTER, &quote);
            verify_checksums(&f).unwrap();
            let (v, out) = fx.run(&f, "cl");
            assert_eq!(v, XDP_REDIRECT, "{what}: {}", decode(&out));
            fx.counted("redirect", &["icmp_error"]);
            assert_frame_eq(&out, &packet_too_big(BACKEND6, 63, TO_BACKEND1, &want_quote), what);
            verify_checksums(&out).unwrap_or_else(|e| panic!("{what}: {e}: {}", decode(&out)));
        }
    });
}

#[test]
fn icmp_error_naming_no_service_passes_untouched() {
    in_fixture("icmpnone", |fx| {
        let frames = [
            ("IPv4, TCP port 443", frag_needed(VIP, 64, FROM_ROUTER, &quoted_v4(Pkt::tcp(VIP, 443, CLIENT, 40000)))),
            ("IPv4, UDP port 80", frag_needed(VIP, 64, FROM_ROUTER, &quoted_v4(Pkt::udp(VIP, 80, CLIENT, 40000)))),
            ("IPv6, TCP port 443", packet_too_big(VIP6, 64, FROM_ROUTER, &quoted_v6(Pkt6::tcp(VIP6, 443, CLIENT6, 40000)))),
        ];
        for (what, f) in &frames {
            let (v, out) = fx.run(f, "cl");
            assert_eq!(v, XDP_PASS, "{what}: {}", decode(&out));
            fx.counted("pass_not_ours", &[]);
            assert_frame_eq(&out, f, what);
        }
        assert_eq!(fx.dp.stats().unwrap()["icmp_error"], 0);
    });
}

// ------------------------------------------------------------------------------------------
// The builders themselves (no program): fragments reassemble to the original datagram.
// ------------------------------------------------------------------------------------------

#[test]
fn fragment_builders_round_trip() {
    let p = Pkt { payload: pattern(100), frag: 0, ..Pkt::udp(CLIENT, 1, VIP, 53) };
    let f = fragment_v4(&p.bytes(), &CUTS);
    assert_eq!(f.iter().map(|f| f.len() - 34).collect::<Vec<_>>(), [48, 48, 12]);
    assert_eq!(reassemble_v4(&f), p.bytes());
    for x in &f {
        verify_checksums(x).unwrap();
    }
    let p6 = Pkt6 { payload: pattern(100), ..Pkt6::udp(CLIENT6, 1, VIP6, 53) };
    let f6 = fragment_v6(&p6.bytes(), 9, &CUTS);
    assert_eq!(reassemble_v6(&f6), p6.bytes());
    let seen: BTreeSet<_> = f6.iter().map(|f| f[54 + 2..54 + 8].to_vec()).collect();
    assert_eq!(seen.len(), 3);
}

#[test]
fn checksum_verifier_catches_corruption() {
    let q4 = quoted_v4(Pkt::tcp(VIP, 80, CLIENT, 40000));
    let q6 = quoted_v6(Pkt6::tcp(VIP6, 80, CLIENT6, 40000));
    let v4 = frag_needed(VIP, 64, FROM_ROUTER, &q4);
    let v6 = packet_too_big(VIP6, 64, FROM_ROUTER, &q6);
    verify_checksums(&v4).unwrap();
    verify_checksums(&v6).unwrap();
    // Flip one byte at a time of: the outer IPv4 header, the ICMP header, the embedded IP header
    // and the embedded TCP header; or, for IPv6, anything covered by a checksum.
    for (frame, ranges) in [(&v4, vec![14..34, 34..38, 42..62, 62..82]), (&v6, vec![22..54, 54..58, 62..122])] {
        for i in ranges.into_iter().flatten() {
            let mut f = frame.clone();
            f[i] ^= 0x40;
            assert!(verify_checksums(&f).is_err(), "byte {i} flipped unnoticed: {}", decode(&f));
        }
    }
    for p in [Pkt6::tcp(CLIENT6, 1, VIP6, 80), Pkt6::udp(CLIENT6, 1, VIP6, 53)] {
        let p = Pkt6 { ext: vec![Ext::options(0, 0)], ..p };
        let mut f = p.bytes();
        verify_checksums(&f).unwrap();
        let n = f.len();
        f[n - 1] ^= 1;
        assert!(verify_checksums(&f).is_err());
    }
    let z = Pkt6 { udp_no_checksum: true, ..Pkt6::udp(CLIENT6, 1, VIP6, 53) }.bytes();
    assert!(verify_checksums(&z).is_err(), "a zero IPv6 UDP checksum is invalid");
}
