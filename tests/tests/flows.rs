//! Connections, pins and trust, through the loaded XDP program (BPF_PROG_TEST_RUN): a TCP
//! connection stays on its backend while that backend lives, a SYN writes no state, the new-pin
//! guard, replies only from the backend side, and the review fixes of the same area (Maglev picks
//! validated, IPv6 routing headers, martian sources, backends' own fragments). Needs root.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use lb_common::{AffinityKey, AffinityValue, FlowKey, FlowValue};

use tests::{
    Ext, FixtureNs, Loaded, MAC_BACKEND1, MAC_LB_BACKEND_SIDE, Pkt, Pkt6, TCP_ACK, TCP_RST, XDP_DROP, XDP_PASS,
    XDP_REDIRECT, assert_frame_eq, backend, backends, decode, monotonic_ns, pin_to_one_cpu, service, to_backend1,
    udp_service,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP_MULTI: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BACKEND1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);

/// web: one resolved backend (exact bytes); multi: three backends, 2 s timeout; dns: UDP on the
/// multi backends; no new-pin guard (its test sets one).
fn config() -> lb::config::Config {
    let mut dp = tests::datapath_config(&["cl", "bk"]);
    dp.affinity_entries = 1024;
    dp.flow_entries = 1024;
    dp.max_new_pins_per_cpu = 0;
    dp.max_services = 8;
    dp.max_backends = 32;
    dp.maglev_table_size = 251;
    dp.hash_seed = 7;
    let multi_backends = ["10.1.0.11", "10.1.0.12", "10.1.0.13"];
    let mut multi = service("multi", "10.0.0.101", 80, backends(&multi_backends, 8081));
    multi.affinity.timeout = Duration::from_secs(2);
    tests::config(
        dp,
        vec![
            service("web", "10.0.0.100", 80, vec![backend("10.1.0.11", 8080)]),
            multi,
            udp_service("dns", "10.0.0.101", 53, backends(&multi_backends, 5353)),
        ],
    )
}

struct Fx {
    l: Loaded,
}

impl Fx {
    /// Runs one frame arriving on `ingress`: (verdict, output frame, counters that moved).
    fn run(&mut self, frame: &[u8], ingress: &str) -> (u32, Vec<u8>, std::collections::BTreeMap<&'static str, u64>) {
        let r = self.l.test_run(frame, FixtureNs::ifindex(ingress)).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
        (r.verdict, r.out, r.changed)
    }

    /// Sends a multi-service TCP packet from `client:port` with `flags`; returns the backend it
    /// was sent to.
    fn send(&mut self, client: Ipv4Addr, port: u16, flags: u8) -> Ipv4Addr {
        let p = Pkt { tcp_flags: flags, ..Pkt::tcp(client, port, VIP_MULTI, 80) };
        let (v, out, _) = self.run(&p.bytes(), "cl");
        assert!(v == XDP_REDIRECT || v == tests::XDP_PASS, "verdict {v}: {}", decode(&out));
        Ipv4Addr::new(out[30], out[31], out[32], out[33])
    }

    fn id(&self, service: &str) -> u32 {
        self.l.service(service).entry.id
    }

    fn backend_id(&self, service: &str, addr: Ipv4Addr) -> u32 {
        self.l.backend_id(service, addr.into())
    }

    fn backend_addr(&self, service: &str, id: u32) -> Ipv4Addr {
        let b = self.l.service(service).backends.iter().find(|b| b.id == id).expect("backend of the service");
        match b.config.address {
            std::net::IpAddr::V4(a) => a,
            a => panic!("{a} is not IPv4"),
        }
    }

    fn pin_key(&self, service: &str, client: Ipv4Addr) -> AffinityKey {
        AffinityKey { service_id: self.id(service), addr: [u32::from_ne_bytes(client.octets()), 0, 0, 0] }
    }

    fn pin(&self, service: &str, client: Ipv4Addr) -> Option<AffinityValue> {
        self.l.dp.affinity_get(&self.pin_key(service, client)).expect("reading AFFINITY")
    }

    fn flow(&self, service: &str, client: Ipv4Addr, port: u16) -> Option<FlowValue> {
        let key = flow_key(self.id(service), client, port);
        self.l.dp.flow_entries().expect("reading FLOWS").into_iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Pins `client` of the multi service to the backend `addr` (a pin made `age_ns` ago and
    /// last seen then).
    fn write_pin(&mut self, client: Ipv4Addr, addr: Ipv4Addr, age_ns: u64) {
        let key = self.pin_key("multi", client);
        let then = monotonic_ns() - age_ns;
        let id = self.backend_id("multi", addr);
        self.l.dp.write_affinity(key, AffinityValue { backend_id: id, flags: 0, last_seen_ns: then, created_ns: then }).unwrap();
    }

    fn set_backend(&mut self, addr: Ipv4Addr, f: impl FnOnce(&mut lb::state::BackendRt)) {
        let Loaded { dp, rt } = &mut self.l;
        rt.update_backend(dp, "multi", addr.into(), 8081, |b| {
            f(b);
            true
        })
        .expect("updating a backend");
    }

    /// A multi backend other than `not`.
    fn other_than(&self, not: Ipv4Addr) -> Ipv4Addr {
        [11, 12, 13].map(|i| Ipv4Addr::new(10, 1, 0, i)).into_iter().find(|a| *a != not).unwrap()
    }
}

fn flow_key(service_id: u32, client: Ipv4Addr, port: u16) -> FlowKey {
    FlowKey { service_id, addr: [u32::from_ne_bytes(client.octets()), 0, 0, 0], port: port.to_be(), _pad: 0 }
}

fn in_fixture(tag: &str, f: impl FnOnce(&mut Fx) + Send) {
    in_fixture_with(tag, config(), f)
}

fn in_fixture_with(tag: &str, config: lb::config::Config, f: impl FnOnce(&mut Fx) + Send) {
    let ns = FixtureNs::new(tag);
    ns.run(|| {
        // One CPU: the per-CPU guard and caches see every run.
        pin_to_one_cpu();
        let mut fx = Fx { l: Loaded::from_config(config) };
        f(&mut fx);
    });
}

#[test]
fn a_syn_writes_no_state_and_the_handshake_writes_the_pin_and_the_connection() {
    in_fixture("handshake", |fx| {
        let syn = Pkt::syn(CLIENT, 40000, VIP, 80);
        let (v, out, changed) = fx.run(&syn.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT, "{}", decode(&out));
        assert_frame_eq(&out, &to_backend1(&syn, 8080).bytes(), "SYN to the VIP");
        assert_eq!(changed.get("syn"), Some(&1), "{changed:?}");
        assert!(!changed.contains_key("conn_new"), "{changed:?}");
        assert!(fx.pin("web", CLIENT).is_none(), "a SYN wrote a pin");
        assert!(fx.l.dp.flow_entries().unwrap().is_empty(), "a SYN wrote a connection entry");

        // The client's ACK completes the handshake: pin and connection entry, same backend.
        let ack = Pkt { tcp_flags: TCP_ACK, payload: Vec::new(), ..Pkt::tcp(CLIENT, 40000, VIP, 80) };
        let (v, out, changed) = fx.run(&ack.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT);
        assert_frame_eq(&out, &to_backend1(&ack, 8080).bytes(), "ACK to the VIP");
        assert_eq!(changed.get("conn_new"), Some(&1), "{changed:?}");
        let b1 = fx.backend_id("web", BACKEND1);
        assert_eq!(fx.pin("web", CLIENT).map(|p| p.backend_id), Some(b1));
        assert_eq!(fx.flow("web", CLIENT, 40000).map(|f| f.backend_id), Some(b1));
        let c = fx.l.dp.service_counters(fx.id("web")).unwrap();
        assert_eq!((c.conns, c.new_pins, c.packets), (1, 1, 2));

        // The connection's next packets hit its entry and write nothing new.
        let (_, _, changed) = fx.run(&Pkt::tcp(CLIENT, 40000, VIP, 80).bytes(), "cl");
        assert!(!changed.contains_key("conn_new") && !changed.contains_key("syn"), "{changed:?}");
        assert_eq!(fx.l.dp.service_counters(fx.id("web")).unwrap().hits, 1);
    });
}

#[test]
fn a_spoofed_syn_flood_creates_and_evicts_nothing() {
    in_fixture("synflood", |fx| {
        // 40 real clients with pins and connections.
        let real: Vec<Ipv4Addr> = (10..50u8).map(|i| Ipv4Addr::new(10, 0, 0, i)).filter(|c| *c != VIP && *c != VIP_MULTI).collect();
        let before: Vec<Ipv4Addr> = real.iter().map(|c| fx.send(*c, 40000, tests::TCP_PSH_ACK)).collect();
        let pins = fx.l.dp.affinity_entries().unwrap().len();
        // Three times the table's capacity in spoofed SYNs, each from a new source.
        let flood = 3 * 1024u32;
        for n in 0..flood {
            let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + n);
            fx.send(src, 1024 + (n % 60000) as u16, tests::TCP_SYN);
        }
        assert_eq!(fx.l.stat("syn"), u64::from(flood));
        assert_eq!(fx.l.dp.affinity_entries().unwrap().len(), pins, "the flood wrote pins");
        assert_eq!(fx.l.dp.flow_entries().unwrap().len(), real.len(), "the flood wrote connection entries");
        for (c, b) in real.iter().zip(&before) {
            assert_eq!(fx.pin("multi", *c).map(|p| fx.backend_addr("multi", p.backend_id)), Some(*b), "client {c}'s pin");
        }
    });
}

#[test]
fn an_established_connection_stays_through_expiry_max_age_and_table_changes() {
    in_fixture("stay", |fx| {
        let pick = fx.send(CLIENT, 40000, TCP_ACK);
        let other = fx.other_than(pick);
        // The pin expired long ago and now names another backend (a later connection of the
        // client went there): the connection stays where it started.
        fx.write_pin(CLIENT, other, 60_000_000_000);
        assert_eq!(fx.send(CLIENT, 40000, TCP_ACK), pick, "the connection moved with its client's pin");
        // Its backend drained: the connection stays too.
        fx.set_backend(pick, |b| b.admin = lb::api::Admin::Draining);
        assert_eq!(fx.send(CLIENT, 40000, TCP_ACK), pick, "the connection moved off a draining backend");
        // The client's next connection follows its (stale) pin's re-placement: not the
        // draining backend.
        let next = fx.send(CLIENT, 40001, tests::TCP_SYN);
        assert_ne!(next, pick, "a new connection went to a draining backend");
        assert_eq!(fx.l.dp.service_counters(fx.id("multi")).unwrap().moved, 0);
    });
}

#[test]
fn a_connection_whose_entry_is_lost_follows_its_pin_whatever_its_age() {
    in_fixture("lost", |fx| {
        let pick = fx.send(CLIENT, 40000, TCP_ACK);
        let other = fx.other_than(pick);
        // Entry evicted, pin expired and pointing elsewhere than Maglev: the pin decides.
        fx.l.dp.flush_flows(|_, _| true).unwrap();
        fx.write_pin(CLIENT, other, 60_000_000_000);
        assert_eq!(fx.send(CLIENT, 40000, TCP_ACK), other);
        assert_eq!(fx.flow("multi", CLIENT, 40000).map(|f| f.backend_id), Some(fx.backend_id("multi", other)), "written again");
        // Neither entry nor pin: Maglev, which is where the SYN went.
        fx.l.dp.flush_flows(|_, _| true).unwrap();
        fx.l.dp.flush_affinity(|_, _| true).unwrap();
        assert_eq!(fx.send(CLIENT, 40000, TCP_ACK), pick);
    });
}

#[test]
fn a_connection_moves_only_when_its_backend_is_down_and_the_move_is_counted() {
    in_fixture("moved", |fx| {
        let pick = fx.send(CLIENT, 40000, TCP_ACK);
        let id = fx.backend_id("multi", pick);
        fx.set_backend(pick, |b| b.healthy = false);
        let p = Pkt::tcp(CLIENT, 40000, VIP_MULTI, 80);
        let (v, out, changed) = fx.run(&p.bytes(), "cl");
        assert!(v == XDP_REDIRECT || v == XDP_PASS);
        let now = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        assert_ne!(now, pick, "still sent to the down backend");
        assert_eq!(changed.get("conn_moved"), Some(&1), "{changed:?}");
        assert_eq!(fx.l.dp.backend_counters(id).unwrap().moved, 1);
        assert_eq!(fx.l.dp.service_counters(fx.id("multi")).unwrap().moved, 1);
        // The connection and its client's pin now name the new backend; it stays there when the
        // old one recovers.
        let new_id = fx.backend_id("multi", now);
        assert_eq!(fx.flow("multi", CLIENT, 40000).map(|f| f.backend_id), Some(new_id));
        assert_eq!(fx.pin("multi", CLIENT).map(|p| p.backend_id), Some(new_id));
        fx.set_backend(pick, |b| b.healthy = true);
        assert_eq!(fx.send(CLIENT, 40000, TCP_ACK), now);
    });
}

#[test]
fn a_syn_reusing_a_client_port_does_not_follow_the_old_connection() {
    in_fixture("reuse", |fx| {
        let pick = fx.send(CLIENT, 40000, TCP_ACK);
        let other = fx.other_than(pick);
        // The client's pin now names another backend (fresh): a new connection on the same port
        // goes there, and its ACK must follow the SYN, not the old connection's entry.
        fx.write_pin(CLIENT, other, 0);
        assert_eq!(fx.send(CLIENT, 40000, tests::TCP_SYN), other);
        assert!(fx.flow("multi", CLIENT, 40000).is_none(), "the old connection's entry was kept");
        assert_eq!(fx.send(CLIENT, 40000, TCP_ACK), other);
    });
}

#[test]
fn a_reset_without_a_connection_writes_nothing() {
    in_fixture("rst", |fx| {
        fx.send(CLIENT, 40000, TCP_RST);
        assert!(fx.pin("multi", CLIENT).is_none());
        assert!(fx.flow("multi", CLIENT, 40000).is_none());
    });
}

#[test]
fn the_new_pin_guard_places_new_clients_without_remembering_them() {
    let mut cfg = config();
    cfg.datapath.max_new_pins_per_cpu = 10;
    in_fixture_with("guard", cfg, |fx| {
        let start = monotonic_ns();
        // 40 new UDP clients against a guard of 10 per CPU per second (about 1.07 s windows).
        for i in 0..40u8 {
            let c = Ipv4Addr::new(10, 0, 1, i);
            let (v, out, _) = fx.run(&Pkt::udp(c, 40000, VIP_MULTI, 53).bytes(), "cl");
            assert!(v == XDP_REDIRECT || v == XDP_PASS, "guarded clients are still forwarded: {}", decode(&out));
            let want = fx.l.maglev_pick("dns", c.into());
            assert_eq!(std::net::IpAddr::from(Ipv4Addr::new(out[30], out[31], out[32], out[33])), want);
        }
        let windows = (monotonic_ns() - start) / (1 << 30) + 1;
        let pins = fx.l.dp.affinity_entries().unwrap().len() as u64;
        assert!(pins <= 10 * windows && pins >= 10, "{pins} pins in {windows} guard windows");
        assert_eq!(fx.l.stat("guarded"), 40 - pins);
        // The same for TCP connections: past the guard no connection entry is written.
        let guarded = fx.l.stat("guarded");
        for i in 0..40u8 {
            fx.send(Ipv4Addr::new(10, 0, 2, i), 40000, TCP_ACK);
        }
        assert!(fx.l.stat("guarded") > guarded, "TCP connection entries are guarded too");
        assert!((fx.l.dp.flow_entries().unwrap().len() as u64) < 40);
    });
}

#[test]
fn replies_are_translated_only_from_the_backend_side() {
    in_fixture("side", |fx| {
        let reply = Pkt { eth_dst: MAC_LB_BACKEND_SIDE, eth_src: MAC_BACKEND1, ..Pkt::tcp(BACKEND1, 8080, CLIENT, 40000) };
        // From the client side (spoofed): dropped, counted, never re-sourced to the VIP.
        let spoofed = Pkt { eth_dst: tests::MAC_LB_CLIENT_SIDE, eth_src: tests::MAC_CLIENT, ..reply.clone() };
        let (v, out, changed) = fx.run(&spoofed.bytes(), "cl");
        assert_eq!(v, XDP_DROP, "{}", decode(&out));
        assert_eq!(changed.get("drop_reply_side"), Some(&1), "{changed:?}");
        assert!(!changed.contains_key("reply"));
        // From the backend side: translated.
        let (v, out, changed) = fx.run(&reply.bytes(), "bk");
        assert_eq!(v, XDP_REDIRECT, "{}", decode(&out));
        assert_eq!(changed.get("reply"), Some(&1));
        assert_eq!(out[26..30], VIP.octets());
    });
}

#[test]
fn a_maglev_slot_naming_a_free_backend_is_never_used() {
    in_fixture("maglev", |fx| {
        let s = fx.l.service("web").entry;
        // The live table names a backend id that is not in use (a table half-written, or a
        // backend being removed): dropped, never sent to 0.0.0.0:0.
        fx.l.dp.write_maglev(s.id, s.table, &vec![31; fx.l.rt.global.maglev_m as usize]).unwrap();
        let (v, out, changed) = fx.run(&Pkt::syn(CLIENT, 40000, VIP, 80).bytes(), "cl");
        assert_eq!(v, XDP_DROP, "{}", decode(&out));
        assert_eq!(changed.get("drop_no_backend"), Some(&1), "{changed:?}");
    });
}

#[test]
fn martian_sources_0_8_and_127_8_are_dropped() {
    in_fixture("martian", |fx| {
        for src in [Ipv4Addr::new(0, 1, 2, 3), Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 9, 9, 9)] {
            let (v, _, changed) = fx.run(&Pkt::tcp(src, 40000, VIP, 80).bytes(), "cl");
            assert_eq!(v, XDP_DROP, "source {src}");
            assert_eq!(changed.get("drop_malformed"), Some(&1), "source {src}: {changed:?}");
        }
    });
}

#[test]
fn a_backends_own_later_fragments_pass() {
    in_fixture("bkfrag", |fx| {
        // A later fragment from a backend to some host beyond the balancer (its gateway): not a
        // reply of ours, passed untouched.
        let p = Pkt {
            frag: 100,
            eth_dst: MAC_LB_BACKEND_SIDE,
            eth_src: MAC_BACKEND1,
            ..Pkt::udp(BACKEND1, 5353, Ipv4Addr::new(192, 0, 2, 9), 9999)
        };
        let frame = p.bytes();
        let (v, out, changed) = fx.run(&frame, "bk");
        assert_eq!(v, XDP_PASS);
        assert_eq!(changed.get("pass_not_ours"), Some(&1), "{changed:?}");
        assert_eq!(out, frame);
        // To a VIP it is still one of ours whose first fragment was not seen.
        let p = Pkt { frag: 100, ..Pkt::udp(CLIENT, 40000, VIP, 53) };
        let (v, _, changed) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_DROP);
        assert_eq!(changed.get("drop_frag_unplaced"), Some(&1), "{changed:?}");
    });
}

#[test]
fn ipv6_routing_headers_with_segments_left_are_dropped_when_ours() {
    in_fixture("srh", |fx| {
        let vip6: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let client6: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let mut cfg = config();
        cfg.services.push(service("web6", "2001:db8::100", 80, vec![backend("2001:db8:1::11", 8080)]));
        let cfg = tests::validated(cfg);
        let Loaded { dp, rt } = &mut fx.l;
        rt.reconcile(&cfg, dp).unwrap();
        // Type 0 routing header, one more address to visit (segments left 1): dropped.
        let routing = |left: u8| {
            // next header (filled in), length 2 (24 bytes), type 0, segments left, reserved.
            let mut bytes = vec![0u8, 2, 0, left, 0, 0, 0, 0];
            bytes.extend_from_slice(&client6.octets());
            Ext { kind: tests::EXT_ROUTING, bytes }
        };
        let p = Pkt6 { ext: vec![routing(1)], ..Pkt6::tcp(client6, 40000, vip6, 80) };
        let (v, _, changed) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_DROP);
        assert_eq!(changed.get("drop_malformed"), Some(&1), "{changed:?}");
        // Segments left 0: the destination is final; balanced as usual.
        let p = Pkt6 { ext: vec![routing(0)], ..Pkt6::tcp(client6, 40000, vip6, 80) };
        let (v, out, changed) = fx.run(&p.bytes(), "cl");
        assert_eq!(v, XDP_REDIRECT, "{changed:?}");
        tests::verify_checksums(&out).unwrap();
    });
}

#[test]
fn an_icmp_error_follows_the_connection_not_the_pin() {
    in_fixture("icmpflow", |fx| {
        let pick = fx.send(CLIENT, 40000, TCP_ACK);
        let other = fx.other_than(pick);
        fx.write_pin(CLIENT, other, 0);
        // "Fragmentation needed" about VIP:80 -> client:40000, from a router on the way.
        let quoted = Pkt { payload: Vec::new(), ttl: 63, ..Pkt::tcp(VIP_MULTI, 80, CLIENT, 40000) };
        let router = Ipv4Addr::new(10, 0, 0, 254);
        let frame = Pkt { ip_id: 0x5555, frag: 0, ..Pkt::icmp(router, VIP_MULTI, 3, 4, [0, 0, 0x05, 0x78], &quoted.bytes()[14..]) }.bytes();
        let (v, out, changed) = fx.run(&frame, "cl");
        assert!(v == XDP_REDIRECT || v == XDP_PASS, "{}", decode(&out));
        assert_eq!(changed.get("icmp_error"), Some(&1), "{changed:?}");
        assert_eq!(Ipv4Addr::new(out[30], out[31], out[32], out[33]), pick, "sent to the pin's backend, not the connection's");
    });
}
