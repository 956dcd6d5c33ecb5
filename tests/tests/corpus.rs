//! The generated malformed and edge-case corpus: valid template frames (each first checked to be
//! forwarded correctly), then every truncation of each, crafted bad header fields, odd addresses
//! and ports, and seeded random mutations, all through the loaded XDP program with
//! BPF_PROG_TEST_RUN. Every frame is checked against the verdict spec:
//!
//! * the verdict is PASS, DROP, TX or REDIRECT, never ABORTED, and exactly one verdict counter
//!   (every `STATS` counter but `to_vip`, `reply`, `fragment`, `icmp_error`) counts it, one that
//!   matches the verdict;
//! * a frame passed as not ours or malformed is untouched;
//! * a forwarded frame (TX, REDIRECT, or passed rewritten: `pass_fib`, `pass_vlan`) keeps its length
//!   and every checksum that was valid in the input is valid in the output;
//! * over each test, the verdict counters add up to the number of frames run.
//!
//! Violations are collected per test and reported together, each with the input decoded and in
//! hex. Needs root. One fixture (program, maps, namespace) per test.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    time::Instant,
};

use lb_common::csum;
use tests::{
    from_backend, from_backend6, to_backend1, to_backend6, to_client,
    INFORMATIONAL, Loaded, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, Ext, FixtureNs, MAC_BACKEND1, MAC_CLIENT, MAC_LB_BACKEND_SIDE,
    MAC_LB_CLIENT_SIDE, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Pkt, Pkt6, V6_BACKEND1, V6_CLIENT, hex_dump,
    fragment_v4, fragment_v6, l3_of, vlan_tag,
};


const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP_MULTI: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BACKEND1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
/// A backend of `multi` without a neighbour entry: frames to it are passed to the kernel.
const BACKEND12: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 12);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const NOT_A_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const VIP6_MULTI: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x101);
const CLIENT6: Ipv6Addr = V6_CLIENT;
const BACKEND6: Ipv6Addr = V6_BACKEND1;
const BACKEND6_12: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x12);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
const NOT_A_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50);

/// The verdict counters each XDP action may be counted under.
fn counters_of(verdict: u32) -> &'static [&'static str] {
    match verdict {
        XDP_PASS => &["pass_not_ours", "pass_malformed", "pass_fib", "pass_vlan", "pass_other_mac"],
        XDP_DROP => &["drop_malformed", "drop_no_backend", "drop_fib", "drop_fragment", "drop_frag_unplaced", "aborted"],
        XDP_TX => &["tx", "icmp_echo"],
        XDP_REDIRECT => &["redirect"],
        _ => &[],
    }
}

fn action_name(v: u32) -> String {
    match v {
        XDP_ABORTED => "ABORTED".into(),
        XDP_DROP => "DROP".into(),
        XDP_PASS => "PASS".into(),
        XDP_TX => "TX".into(),
        XDP_REDIRECT => "REDIRECT".into(),
        _ => format!("action {v}"),
    }
}

// ------------------------------------------------------------------------------------------
// Fixture
// ------------------------------------------------------------------------------------------

/// What one run of the program did.
struct Outcome {
    verdict: u32,
    out: Vec<u8>,
    /// Every counter that changed, with its increment.
    changed: BTreeMap<&'static str, u64>,
}

impl Outcome {
    /// The verdict counter, if exactly one counted the frame (by one).
    fn counter(&self) -> Option<&'static str> {
        let v: Vec<_> = self.changed.iter().filter(|(k, _)| !INFORMATIONAL.contains(k)).collect();
        (v.len() == 1 && *v[0].1 == 1).then(|| *v[0].0)
    }

    fn describe(&self) -> String {
        format!("{} counted {:?}", action_name(self.verdict), self.changed)
    }
}

struct Fixture {
    l: Loaded,
    ifindex: BTreeMap<&'static str, u32>,
    /// Frames the program ran on (the kernel accepted them).
    frames: u64,
}

impl Fixture {
    fn new() -> Self {
        let ifindex = ["cl", "bk"].into_iter().map(|d| (d, FixtureNs::ifindex(d))).collect();
        Self { l: Loaded::from_config(tests::fixture_config()), ifindex, frames: 0 }
    }

    /// Runs one frame arriving on `ingress`; Err is the kernel refusing to run it.
    fn try_run(&mut self, frame: &[u8], ingress: &str) -> Result<Outcome, String> {
        match self.l.test_run(frame, self.ifindex[ingress]) {
            Ok(r) => {
                self.frames += 1;
                Ok(Outcome { verdict: r.verdict, out: r.out, changed: r.changed })
            }
            Err(e) => Err(e),
        }
    }

    fn run(&mut self, frame: &[u8], ingress: &str) -> Outcome {
        self.try_run(frame, ingress).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN refused {}: {e}", decode_caught(frame)))
    }

    fn maglev_pick(&self, name: &str, client: IpAddr) -> IpAddr {
        self.l.maglev_pick(name, client)
    }

    /// Property 5: the verdict counters add up to the frames run.
    fn assert_counters_add_up(&self) {
        let stats = self.l.dp.stats().expect("reading STATS");
        let sum: u64 = stats.iter().filter(|(k, _)| !INFORMATIONAL.contains(k)).map(|(_, v)| v).sum();
        assert_eq!(sum, self.frames, "verdict counters {stats:?} do not add up to the {} frames run", self.frames);
    }
}

/// Runs `f` in a fresh fixture; then checks the counters add up and reports `f`'s findings.
fn in_fixture(tag: &str, f: impl FnOnce(&mut Fixture) -> Findings + Send) {
    let ns = FixtureNs::new(tag);
    ns.run(|| {
        let mut fx = Fixture::new();
        let t = Instant::now();
        let found = f(&mut fx);
        eprintln!("{tag}: {} frames run, {} cases checked, in {:.2?}", fx.frames, found.cases, t.elapsed());
        fx.assert_counters_add_up();
        found.finish(tag);
    });
}

// ------------------------------------------------------------------------------------------
// Reporting
// ------------------------------------------------------------------------------------------

/// `tests::decode`, with a panic on some malformed frame reported, not raised.
fn decode_caught(f: &[u8]) -> String {
    let f = f.to_vec();
    std::panic::catch_unwind(move || tests::decode(&f)).unwrap_or_else(|_| "(decode panicked)".into())
}

/// Violations of one test, reported together at its end.
#[derive(Default)]
struct Findings {
    list: Vec<String>,
    /// Violations by kind.
    kinds: BTreeMap<String, usize>,
    cases: usize,
}

impl Findings {
    fn add(&mut self, case: &str, kind: &str, input: &[u8], o: Option<&Outcome>) {
        let n = self.kinds.entry(kind.to_string()).or_default();
        *n += 1;
        // A few examples of each kind.
        if *n > 4 {
            return;
        }
        let mut s = format!("{case}: {kind}\n    input:  {}\n{}", decode_caught(input), hex_dump(input));
        if let Some(o) = o {
            let _ = write!(s, "\n    result: {}", o.describe());
            if o.out != input {
                let _ = write!(s, "\n    output: {}\n{}", decode_caught(&o.out), hex_dump(&o.out));
            }
        }
        self.list.push(s);
    }

    /// Checks what every frame must satisfy; returns the verdict counter when there is exactly one.
    fn common(&mut self, case: &str, input: &[u8], o: &Outcome) -> Option<&'static str> {
        self.cases += 1;
        if !matches!(o.verdict, XDP_PASS | XDP_DROP | XDP_TX | XDP_REDIRECT) {
            self.add(case, &format!("verdict {}", action_name(o.verdict)), input, Some(o));
        }
        let Some(c) = o.counter() else {
            self.add(case, "not exactly one verdict counter", input, Some(o));
            return None;
        };
        if c == "aborted" {
            self.add(case, "counted as aborted", input, Some(o));
        }
        if !counters_of(o.verdict).contains(&c) {
            self.add(case, &format!("{} counted as {c}", action_name(o.verdict)), input, Some(o));
        }
        if matches!(c, "pass_not_ours" | "pass_malformed" | "pass_other_mac") && o.out != input {
            self.add(case, &format!("{c} changed the frame"), input, Some(o));
        }
        Some(c)
    }

    /// A frame that must be passed untouched (any PASS counter but the rewriting ones).
    fn expect_untouched_pass(&mut self, case: &str, input: &[u8], o: &Outcome, counters: &[&str]) {
        let c = self.common(case, input, o);
        if o.verdict != XDP_PASS || o.out != input || c.is_some_and(|c| !counters.contains(&c)) {
            self.add(case, &format!("want PASS untouched ({})", counters.join(" or ")), input, Some(o));
        }
    }

    /// A frame that must be dropped.
    fn expect_drop(&mut self, case: &str, input: &[u8], o: &Outcome, counter: Option<&str>) {
        let c = self.common(case, input, o);
        if o.verdict != XDP_DROP || counter.is_some_and(|w| c != Some(w)) {
            self.add(case, &format!("want DROP{}", counter.map(|c| format!(" ({c})")).unwrap_or_default()), input, Some(o));
        }
    }

    /// Property 4's forwarding invariant: a forwarded frame keeps its length and its valid
    /// checksums.
    fn forwarded_checks(&mut self, case: &str, input: &[u8], o: &Outcome, counter: &str) {
        let forwarded = matches!(o.verdict, XDP_TX | XDP_REDIRECT) || matches!(counter, "pass_fib" | "pass_vlan");
        if !forwarded {
            return;
        }
        if o.out.len() != input.len() {
            self.add(case, "forwarded frame changed length", input, Some(o));
            return;
        }
        let was = checksum_states(input);
        let now = checksum_states(&o.out);
        for (name, ok) in &was {
            if *ok && !now.iter().any(|(n, k)| n == name && *k) {
                self.add(case, &format!("{name} checksum valid in, not out"), input, Some(o));
            }
        }
    }

    fn finish(self, what: &str) {
        if !self.list.is_empty() {
            panic!(
                "{what}: {} violations in {} cases, by kind {:?}; examples ({}):\n\n{}",
                self.kinds.values().sum::<usize>(),
                self.cases,
                self.kinds,
                self.list.len(),
                self.list.join("\n\n")
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Checksums, per checksum: which are valid, and repairing them
// ------------------------------------------------------------------------------------------

/// One checksum of a frame: the field, the bytes it covers (field included) and the pseudo-header
/// sum.
struct Site {
    name: &'static str,
    field: usize,
    range: Range<usize>,
    pseudo: u64,
    /// UDP: 0 means "none" over IPv4 (valid) and is invalid over IPv6.
    udp: Option<bool>,
}

fn be16(f: &[u8], at: usize) -> usize {
    u16::from_be_bytes([f[at], f[at + 1]]) as usize
}

/// Every checksum that can be checked in `f`, read from the frame's own fields (VLAN tags, IPv4
/// header length and total length, IPv6 payload length and extension headers): the IPv4 header;
/// TCP/UDP/ICMP/ICMPv6 when the whole datagram (not a fragment) is in the frame; and for an ICMP
/// error, the same of the quoted packet when it lies within the ICMP message. Inner before outer.
fn sites(f: &[u8]) -> Vec<Site> {
    let mut out = Vec::new();
    if let Some((l3, ty)) = l3_of(f) {
        match ty {
            ETH_P_IPV4 => ip_sites(f, l3, false, f.len(), 0, &mut out),
            ETH_P_IPV6 => ip_sites(f, l3, true, f.len(), 0, &mut out),
            _ => {}
        }
    }
    out
}

fn ip_sites(f: &[u8], l3: usize, v6: bool, limit: usize, depth: u32, out: &mut Vec<Site>) {
    let inner = depth > 0;
    if !v6 {
        if l3 + 20 > limit || f[l3] >> 4 != 4 {
            return;
        }
        let ihl = (f[l3] & 0x0f) as usize * 4;
        if ihl < 20 || l3 + ihl > limit {
            return;
        }
        let tot = be16(f, l3 + 2);
        let end = l3 + tot;
        if tot >= ihl && end <= limit && be16(f, l3 + 6) & 0x3fff == 0 {
            let proto = f[l3 + 9];
            let mut pseudo = csum::sum(0, &f[l3 + 12..l3 + 20]);
            pseudo = csum::sum(pseudo, &[0, proto]);
            pseudo = csum::sum(pseudo, &((tot - ihl) as u16).to_be_bytes());
            transport(f, l3 + ihl, end, proto, pseudo, false, depth, out);
        }
        let name = if inner { "quoted IPv4 header" } else { "IPv4 header" };
        out.push(Site { name, field: l3 + 10, range: l3..l3 + ihl, pseudo: 0, udp: None });
        return;
    }
    if l3 + 40 > limit || f[l3] >> 4 != 6 {
        return;
    }
    let end = l3 + 40 + be16(f, l3 + 4);
    if end > limit {
        return;
    }
    let mut next = f[l3 + 6];
    let mut off = l3 + 40;
    for _ in 0..16 {
        match next {
            0 | 43 | 60 | 51 => {
                if off + 2 > end {
                    return;
                }
                let (n, here) = (f[off + 1] as usize, next);
                next = f[off];
                // This header's length: AH in 4-byte words less two, the others 8-byte words less one.
                off += if here == 51 { (n + 2) * 4 } else { (n + 1) * 8 };
            }
            44 => {
                if off + 8 > end || be16(f, off + 2) & 0xfff9 != 0 {
                    return; // a fragment (or garbage): no whole datagram
                }
                next = f[off];
                off += 8;
            }
            _ => break,
        }
    }
    if off > end || matches!(next, 0 | 43 | 60 | 51 | 44) {
        return;
    }
    let mut pseudo = csum::sum(0, &f[l3 + 8..l3 + 40]);
    pseudo = csum::sum(pseudo, &((end - off) as u32).to_be_bytes());
    pseudo = csum::sum(pseudo, &[0, 0, 0, next]);
    transport(f, off, end, next, pseudo, true, depth, out);
}

#[allow(clippy::too_many_arguments)]
fn transport(f: &[u8], l4: usize, end: usize, proto: u8, pseudo: u64, v6: bool, depth: u32, out: &mut Vec<Site>) {
    let len = end - l4;
    let inner = depth > 0;
    match proto {
        PROTO_TCP if len >= 20 => out.push(Site {
            name: if inner { "quoted TCP" } else { "TCP" },
            field: l4 + 16,
            range: l4..end,
            pseudo,
            udp: None,
        }),
        PROTO_UDP if len >= 8 => out.push(Site {
            name: if inner { "quoted UDP" } else { "UDP" },
            field: l4 + 6,
            range: l4..end,
            pseudo,
            udp: Some(v6),
        }),
        PROTO_ICMP | PROTO_ICMPV6 if !inner && len >= 8 && (proto == PROTO_ICMPV6) == v6 => {
            let error = if v6 { matches!(f[l4], 1..=4) } else { matches!(f[l4], 3 | 11 | 12) };
            if error && len > 8 {
                ip_sites(f, l4 + 8, v6, end, depth + 1, out);
            }
            let name = if v6 { "ICMPv6" } else { "ICMP" };
            out.push(Site { name, field: l4 + 2, range: l4..end, pseudo: if v6 { pseudo } else { 0 }, udp: None });
        }
        _ => {}
    }
}

fn site_valid(f: &[u8], s: &Site) -> bool {
    let field = [f[s.field], f[s.field + 1]];
    match (s.udp, field) {
        (Some(false), [0, 0]) => true,
        (Some(true), [0, 0]) => false,
        _ => csum::fold(csum::sum(s.pseudo, &f[s.range.clone()])) == 0xffff,
    }
}

/// (checksum, valid) for every checksum `sites` finds.
fn checksum_states(f: &[u8]) -> Vec<(&'static str, bool)> {
    sites(f).iter().map(|s| (s.name, site_valid(f, s))).collect()
}

/// Makes every checksum `sites` finds valid (inner first, so the ICMP checksum covers the
/// repaired quote).
fn fix_checksums(f: &mut [u8]) {
    for s in sites(f) {
        f[s.field] = 0;
        f[s.field + 1] = 0;
        let mut c = !csum::fold(csum::sum(s.pseudo, &f[s.range.clone()]));
        if s.udp.is_some() {
            c = csum::udp_nonzero(c);
        }
        f[s.field..s.field + 2].copy_from_slice(&c.to_ne_bytes());
    }
}

/// The offset of the L4 header (of the fragment data for a later fragment), by the frame's own
/// fields.
fn l4_offset(f: &[u8]) -> usize {
    let (l3, ty) = l3_of(f).expect("a template frame");
    if ty == ETH_P_IPV4 {
        return l3 + (f[l3] & 0x0f) as usize * 4;
    }
    let mut next = f[l3 + 6];
    let mut off = l3 + 40;
    loop {
        match next {
            0 | 43 | 60 => {
                next = f[off];
                off += (f[off + 1] as usize + 1) * 8;
            }
            44 => {
                next = f[off];
                off += 8;
            }
            _ => return off,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Templates
// ------------------------------------------------------------------------------------------

/// A valid frame of ours and what the program must make of it.
struct Template {
    name: String,
    frame: Vec<u8>,
    ingress: &'static str,
    verdict: u32,
    counter: &'static str,
    also: &'static [&'static str],
    want: Vec<u8>,
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}






fn quoted_v4(p: Pkt) -> Vec<u8> {
    Pkt { payload: Vec::new(), ttl: 63, ..p }.bytes()[14..].to_vec()
}

fn quoted_v6(p: Pkt6) -> Vec<u8> {
    Pkt6 { payload: Vec::new(), hop_limit: 63, ..p }.bytes()[14..].to_vec()
}

const FROM_ROUTER: ([u8; 6], [u8; 6]) = (MAC_LB_CLIENT_SIDE, MAC_CLIENT);
const TO_BACKEND1: ([u8; 6], [u8; 6]) = (MAC_BACKEND1, MAC_LB_BACKEND_SIDE);

fn frag_needed(dst: Ipv4Addr, ttl: u8, macs: ([u8; 6], [u8; 6]), quote: &[u8]) -> Vec<u8> {
    Pkt { eth_dst: macs.0, eth_src: macs.1, ttl, ip_id: 0x5555, frag: 0, ..Pkt::icmp(ROUTER, dst, 3, 4, [0, 0, 0x05, 0x78], quote) }.bytes()
}

fn packet_too_big(dst: Ipv6Addr, hop_limit: u8, macs: ([u8; 6], [u8; 6]), quote: &[u8]) -> Vec<u8> {
    Pkt6 { eth_dst: macs.0, eth_src: macs.1, hop_limit, ..Pkt6::icmp(ROUTER6, dst, 2, 0, [0, 0, 0x05, 0x00], quote) }.bytes()
}

fn echo4(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, ty: u8, macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
    Pkt { eth_dst: macs.0, eth_src: macs.1, ttl, ip_id: 0x7777, ..Pkt::icmp(src, dst, ty, 0, [0x12, 0x34, 0x00, 0x07], &pattern(56)) }.bytes()
}

fn echo6(src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8, ty: u8, macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
    Pkt6 { eth_dst: macs.0, eth_src: macs.1, hop_limit, ..Pkt6::icmp(src, dst, ty, 0, [0xbe, 0xef, 0x00, 0x01], &pattern(40)) }.bytes()
}

const CUTS: [usize; 2] = [48, 96];

fn single(f: &[u8]) -> Vec<u8> {
    vlan_tag(f, ETH_P_8021Q, 100)
}

fn double(f: &[u8]) -> Vec<u8> {
    vlan_tag(&vlan_tag(f, ETH_P_8021Q, 100), ETH_P_8021AD, 200)
}

/// Every template, in the order they must first run (a first fragment before its later one).
fn templates(fx: &Fixture) -> Vec<Template> {
    let mut t = Vec::new();
    let mut add = |name: &str, frame: Vec<u8>, ingress, verdict, counter, also, want: Vec<u8>| {
        t.push(Template { name: name.into(), frame, ingress, verdict, counter, also, want });
    };
    const TO_VIP: &[&str] = &["to_vip"];
    const REPLY: &[&str] = &["reply"];
    const FRAGMENT: &[&str] = &["fragment"];
    const ICMP_ERROR: &[&str] = &["icmp_error"];

    let tcp = Pkt::tcp(CLIENT, 40000, VIP, 80);
    add("IPv4 TCP", tcp.bytes(), "cl", XDP_REDIRECT, "redirect", TO_VIP, to_backend1(&tcp, 8080).bytes());
    let udp = Pkt::udp(CLIENT, 40001, VIP, 53);
    add("IPv4 UDP", udp.bytes(), "cl", XDP_REDIRECT, "redirect", TO_VIP, to_backend1(&udp, 5353).bytes());
    // IHL 7: seven NOPs and an end-of-options.
    let opts = Pkt { options: vec![1, 1, 1, 1, 1, 1, 1, 0], ..Pkt::tcp(CLIENT, 40002, VIP, 80) };
    add("IPv4 TCP, IHL 7", opts.bytes(), "cl", XDP_REDIRECT, "redirect", TO_VIP, to_backend1(&opts, 8080).bytes());
    let reply = from_backend(Pkt::tcp(BACKEND1, 8080, CLIENT, 40000));
    add("IPv4 reply from a backend", reply.bytes(), "bk", XDP_REDIRECT, "redirect", REPLY, to_client(&reply, 80).bytes());
    // A client Maglev sends to the unresolved backend: rewritten and passed to the kernel.
    let c12 = (10..100u8)
        .map(|i| Ipv4Addr::new(10, 0, 0, i))
        .find(|c| fx.maglev_pick("multi", IpAddr::V4(*c)) == IpAddr::V4(BACKEND12))
        .expect("a client of 10.1.0.12");
    let fib = Pkt::tcp(c12, 40003, VIP_MULTI, 80);
    let want = Pkt { dst: BACKEND12, dport: 8081, ..fib.clone() }.bytes();
    add("IPv4 TCP to an unresolved backend", fib.bytes(), "cl", XDP_PASS, "pass_fib", TO_VIP, want);

    let tcp6 = Pkt6::tcp(CLIENT6, 40000, VIP6, 80);
    add("IPv6 TCP", tcp6.bytes(), "cl", XDP_REDIRECT, "redirect", TO_VIP, to_backend6(&tcp6, 8080).bytes());
    let udp6 = Pkt6::udp(CLIENT6, 40001, VIP6, 53);
    add("IPv6 UDP", udp6.bytes(), "cl", XDP_REDIRECT, "redirect", TO_VIP, to_backend6(&udp6, 5353).bytes());
    let ext6 = Pkt6 { ext: vec![Ext::options(0, 0), Ext::options(60, 1)], ..Pkt6::tcp(CLIENT6, 40002, VIP6, 80) };
    add("IPv6 TCP, hop-by-hop + destination options", ext6.bytes(), "cl", XDP_REDIRECT, "redirect", TO_VIP, to_backend6(&ext6, 8080).bytes());
    let c12_6 = (1..200u16)
        .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0, i, 0, 0, 0, 2))
        .find(|c| fx.maglev_pick("multi6", IpAddr::V6(*c)) == IpAddr::V6(BACKEND6_12))
        .expect("a client of 2001:db8:1::12");
    let fib6 = Pkt6::tcp(c12_6, 40003, VIP6_MULTI, 80);
    let want = Pkt6 { dst: BACKEND6_12, dport: 8081, ..fib6.clone() }.bytes();
    add("IPv6 TCP to an unresolved backend", fib6.bytes(), "cl", XDP_PASS, "pass_fib", TO_VIP, want);

    let rewritten = Pkt { dst: BACKEND1, dport: 8080, ..tcp.clone() }.bytes();
    let rewritten6 = Pkt6 { dst: BACKEND6, dport: 8080, ..tcp6.clone() }.bytes();
    add("802.1Q IPv4 TCP", single(&tcp.bytes()), "cl", XDP_PASS, "pass_vlan", TO_VIP, single(&rewritten));
    add("802.1ad IPv4 TCP", double(&tcp.bytes()), "cl", XDP_PASS, "pass_vlan", TO_VIP, double(&rewritten));
    add("802.1Q IPv6 TCP", single(&tcp6.bytes()), "cl", XDP_PASS, "pass_vlan", TO_VIP, single(&rewritten6));
    add("802.1ad IPv6 TCP", double(&tcp6.bytes()), "cl", XDP_PASS, "pass_vlan", TO_VIP, double(&rewritten6));

    let fr = Pkt { payload: pattern(100), frag: 0, ip_id: 0x4242, ..Pkt::udp(CLIENT, 40004, VIP, 53) };
    let frags = fragment_v4(&fr.bytes(), &CUTS);
    let want = fragment_v4(&to_backend1(&fr, 5353).bytes(), &CUTS);
    add("IPv4 first fragment", frags[0].clone(), "cl", XDP_REDIRECT, "redirect", TO_VIP, want[0].clone());
    add("IPv4 later fragment", frags[1].clone(), "cl", XDP_REDIRECT, "redirect", FRAGMENT, want[1].clone());
    let fr6 = Pkt6 { payload: pattern(100), ..Pkt6::udp(CLIENT6, 40004, VIP6, 53) };
    let frags = fragment_v6(&fr6.bytes(), 0xdead_beef, &CUTS);
    let want = fragment_v6(&to_backend6(&fr6, 5353).bytes(), 0xdead_beef, &CUTS);
    add("IPv6 first fragment", frags[0].clone(), "cl", XDP_REDIRECT, "redirect", TO_VIP, want[0].clone());
    add("IPv6 later fragment", frags[1].clone(), "cl", XDP_REDIRECT, "redirect", FRAGMENT, want[1].clone());

    let swapped = (MAC_CLIENT, MAC_LB_CLIENT_SIDE);
    add("ICMP echo request", echo4(CLIENT, VIP, 61, 8, FROM_ROUTER), "cl", XDP_TX, "icmp_echo", &[], echo4(VIP, CLIENT, 64, 0, swapped));
    add("ICMPv6 echo request", echo6(CLIENT6, VIP6, 57, 128, FROM_ROUTER), "cl", XDP_TX, "icmp_echo", &[], echo6(VIP6, CLIENT6, 64, 129, swapped));

    for (proto, vport, bport) in [(PROTO_TCP, 80, 8080), (PROTO_UDP, 53, 5353)] {
        let p = Pkt { proto, ..Pkt::tcp(VIP, vport, CLIENT, 40000) };
        let q = Pkt { proto, ..Pkt::tcp(BACKEND1, bport, CLIENT, 40000) };
        let name = format!("ICMP frag-needed about a {} flow", if proto == PROTO_TCP { "TCP" } else { "UDP" });
        let f = frag_needed(VIP, 64, FROM_ROUTER, &quoted_v4(p));
        add(&name, f, "cl", XDP_REDIRECT, "redirect", ICMP_ERROR, frag_needed(BACKEND1, 63, TO_BACKEND1, &quoted_v4(q)));
        let p = Pkt6 { proto, ..Pkt6::tcp(VIP6, vport, CLIENT6, 40000) };
        let q = Pkt6 { proto, ..Pkt6::tcp(BACKEND6, bport, CLIENT6, 40000) };
        let name = format!("ICMPv6 packet-too-big about a {} flow", if proto == PROTO_TCP { "TCP" } else { "UDP" });
        let f = packet_too_big(VIP6, 64, FROM_ROUTER, &quoted_v6(p));
        add(&name, f, "cl", XDP_REDIRECT, "redirect", ICMP_ERROR, packet_too_big(BACKEND6, 63, TO_BACKEND1, &quoted_v6(q)));
    }
    t
}

/// Builds the templates and checks each is forwarded exactly as expected (in order: the first
/// fragments record the translation their later fragments follow).
fn checked_templates(fx: &mut Fixture) -> Vec<Template> {
    let t = templates(fx);
    for t in &t {
        let sums = checksum_states(&t.frame);
        assert!(sums.iter().all(|s| s.1), "template {}: checksums {sums:?}", t.name);
        let o = fx.run(&t.frame, t.ingress);
        assert_eq!(o.verdict, t.verdict, "template {}: {}: {}", t.name, o.describe(), decode_caught(&o.out));
        let mut want: BTreeMap<&str, u64> = t.also.iter().map(|c| (*c, 1)).collect();
        want.insert(t.counter, 1);
        // Whether a TCP template writes a connection entry depends on which template used its
        // client port first; the connection table has fixtures of its own (tests/flows.rs).
        let mut got = o.changed.clone();
        got.remove("conn_new");
        assert_eq!(got, want, "template {}: counters", t.name);
        tests::assert_frame_eq(&o.out, &t.want, &format!("template {}", t.name));
        let out = checksum_states(&o.out);
        assert!(out.iter().all(|s| s.1) && out.len() == sums.len(), "template {}: output checksums {out:?}", t.name);
    }
    t
}

// ------------------------------------------------------------------------------------------
// 1. Every truncation point
// ------------------------------------------------------------------------------------------

#[test]
fn every_truncation_of_every_template_is_passed_untouched_or_dropped() {
    in_fixture("trunc", |fx| {
        let templates = checked_templates(fx);
        let mut found = Findings::default();
        for t in &templates {
            // Below an Ethernet header the kernel refuses to run the program at all.
            for n in 0..14 {
                if let Ok(o) = fx.try_run(&t.frame[..n], t.ingress) {
                    found.add(&format!("{}, first {n} bytes", t.name), "BPF_PROG_TEST_RUN ran a runt", &t.frame[..n], Some(&o));
                }
            }
            // Once the ports (ICMP: type, code and checksum) are in the frame, the packet is
            // recognisably ours; a later fragment is ours once its fragment data starts.
            let ours_from = l4_offset(&t.frame) + 4;
            for n in 14..t.frame.len() {
                let f = &t.frame[..n];
                let case = format!("{} cut to {n} of {} bytes", t.name, t.frame.len());
                let o = fx.run(f, t.ingress);
                let c = found.common(&case, f, &o);
                match o.verdict {
                    XDP_PASS => {
                        if o.out != f || !matches!(c, Some("pass_not_ours" | "pass_malformed")) {
                            found.add(&case, "PASS of a truncated frame must leave it untouched", f, Some(&o));
                        }
                        if n >= ours_from {
                            found.add(&case, "truncated frame of ours with its ports passed, want DROP", f, Some(&o));
                        }
                    }
                    XDP_DROP => {}
                    _ => found.add(&case, "truncated frame forwarded", f, Some(&o)),
                }
            }
        }
        found
    });
}

// ------------------------------------------------------------------------------------------
// 2. Bad header fields
// ------------------------------------------------------------------------------------------

/// `f` with the 16-bit big-endian field at `at` set to `v`, checksums repaired.
fn with16(f: &[u8], at: usize, v: u16) -> Vec<u8> {
    let mut f = f.to_vec();
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    fix_checksums(&mut f);
    f
}

fn with8(f: &[u8], at: usize, v: u8) -> Vec<u8> {
    let mut f = f.to_vec();
    f[at] = v;
    fix_checksums(&mut f);
    f
}

/// A routing header (type 0, no segments left): 8 bytes.
fn routing() -> Ext {
    Ext { kind: 43, bytes: vec![0; 8] }
}

#[test]
fn bad_header_fields_are_passed_untouched_or_dropped_when_ours() {
    in_fixture("fields", |fx| {
        checked_templates(fx);
        let mut found = Findings::default();
        let ip4: Vec<(&str, Vec<u8>, &str, bool)> = vec![
            ("IPv4 TCP to the VIP", Pkt::tcp(CLIENT, 41000, VIP, 80).bytes(), "cl", true),
            ("IPv4 UDP to the VIP", Pkt::udp(CLIENT, 41001, VIP, 53).bytes(), "cl", true),
            ("IPv4 reply from a backend", from_backend(Pkt::tcp(BACKEND1, 8080, CLIENT, 41002)).bytes(), "bk", true),
            ("ICMP echo to the VIP", echo4(CLIENT, VIP, 64, 8, FROM_ROUTER), "cl", true),
            (
                "ICMP frag-needed to the VIP",
                frag_needed(VIP, 64, FROM_ROUTER, &quoted_v4(Pkt::tcp(VIP, 80, CLIENT, 41003))),
                "cl",
                true,
            ),
            ("IPv4 TCP to a non-VIP", Pkt::tcp(CLIENT, 41004, NOT_A_VIP, 80).bytes(), "cl", false),
            ("IPv4 UDP to a non-VIP", Pkt::udp(CLIENT, 41005, NOT_A_VIP, 53).bytes(), "cl", false),
        ];
        for (what, f, ingress, ours) in &ip4 {
            let f = f.as_slice();
            // IHL 0..4: passed untouched, malformed.
            for ihl in 0..5u8 {
                let g = with8(f, 14, 0x40 | ihl);
                let o = fx.run(&g, ingress);
                found.expect_untouched_pass(&format!("{what}, IHL {ihl}"), &g, &o, &["pass_malformed"]);
            }
            // IHL beyond the frame: the L4 header would start past its end.
            let len = f.len();
            for ihl in 6..16u8 {
                if 14 + ihl as usize * 4 + 4 <= len {
                    continue;
                }
                let g = with8(f, 14, 0x40 | ihl);
                let case = format!("{what}, IHL {ihl} in a {len}-byte frame");
                let o = fx.run(&g, ingress);
                let c = found.common(&case, &g, &o);
                let ok = (o.verdict == XDP_PASS && o.out == g && c == Some("pass_malformed"))
                    || (o.verdict == XDP_DROP && c == Some("drop_malformed"));
                if !ok {
                    found.add(&case, "want PASS untouched (pass_malformed) or DROP (drop_malformed)", &g, Some(&o));
                }
            }
            // IHL past the total length, the frame long enough for it: ports there but not
            // inside the datagram.
            let mut padded = f.to_vec();
            padded.resize(14 + 60 + 20, 0xab);
            let g = with8(&padded, 14, 0x4f);
            let hdr = if g[23] == PROTO_TCP { 20 } else { 8 };
            let short = be16(&g, 16) < 60 + hdr;
            let case = format!("{what}, IHL 15, total length {} (frame padded to {} bytes)", be16(&g, 16), g.len());
            let o = fx.run(&g, ingress);
            if !short {
                // The headers fit the total length: an odd but well-formed packet.
                if let Some(c) = found.common(&case, &g, &o) {
                    found.forwarded_checks(&case, &g, &o, c);
                }
            } else if *ours {
                found.expect_drop(&case, &g, &o, Some("drop_malformed"));
            } else {
                found.expect_untouched_pass(&case, &g, &o, &["pass_not_ours", "pass_malformed"]);
            }
            // Total length smaller than the headers, or larger than the frame.
            let ihl = 20;
            let hdr = match f[23] {
                PROTO_TCP => 20,
                _ => 8,
            };
            let tot = be16(f, 16) as u16;
            for t in [0, 1, 19, ihl, ihl + 3, ihl + hdr - 1, tot + 1, tot + 100, 0xffff] {
                let g = with16(f, 16, t);
                let case = format!("{what}, total length {t} (frame holds {})", f.len() - 14);
                let o = fx.run(&g, ingress);
                if *ours {
                    found.expect_drop(&case, &g, &o, Some("drop_malformed"));
                } else {
                    found.expect_untouched_pass(&case, &g, &o, &["pass_not_ours", "pass_malformed"]);
                }
            }
            // The version nibble of another IP version.
            for v in [0u8, 5, 6, 15] {
                let g = with8(f, 14, v << 4 | 5);
                let o = fx.run(&g, ingress);
                found.expect_untouched_pass(&format!("{what}, version {v}"), &g, &o, &["pass_malformed", "pass_not_ours"]);
            }
        }
        // Tagged frames with a wrong version too.
        for (what, f) in [("802.1Q IPv4", single(&ip4[0].1)), ("802.1ad IPv4", double(&ip4[0].1))] {
            let l3 = l3_of(&f).unwrap().0;
            let g = with8(&f, l3, 0x65);
            let o = fx.run(&g, "cl");
            found.expect_untouched_pass(&format!("{what}, version 6"), &g, &o, &["pass_malformed", "pass_not_ours"]);
        }
        // An ICMP error whose total length ends inside the quote, the rest of the quote still in
        // the frame (as trailing bytes): whatever the verdict, valid checksums stay valid.
        let quote = quoted_v4(Pkt::tcp(VIP, 80, CLIENT, 41006));
        let full = frag_needed(VIP, 64, FROM_ROUTER, &quote);
        for cut in [20, 24, 28, 36] {
            let mut g = frag_needed(VIP, 64, FROM_ROUTER, &quote[..cut]);
            g.extend_from_slice(&full[g.len()..]);
            let case = format!("ICMP frag-needed, total length ends {cut} bytes into the quote, quote complete in the frame");
            let o = fx.run(&g, "cl");
            if let Some(c) = found.common(&case, &g, &o) {
                found.forwarded_checks(&case, &g, &o, c);
            }
        }
        let quote6 = quoted_v6(Pkt6::tcp(VIP6, 80, CLIENT6, 41006));
        let full6 = packet_too_big(VIP6, 64, FROM_ROUTER, &quote6);
        for cut in [40, 44, 48, 56] {
            let mut g = packet_too_big(VIP6, 64, FROM_ROUTER, &quote6[..cut]);
            g.extend_from_slice(&full6[g.len()..]);
            let case = format!("ICMPv6 packet-too-big, payload length ends {cut} bytes into the quote, quote complete in the frame");
            let o = fx.run(&g, "cl");
            if let Some(c) = found.common(&case, &g, &o) {
                found.forwarded_checks(&case, &g, &o, c);
            }
        }

        // IPv6: payload length beyond the frame or short of the headers; wrong version.
        let ip6: Vec<(&str, Vec<u8>, &str, bool)> = vec![
            ("IPv6 TCP to the VIP", Pkt6::tcp(CLIENT6, 41000, VIP6, 80).bytes(), "cl", true),
            ("IPv6 UDP to the VIP", Pkt6::udp(CLIENT6, 41001, VIP6, 53).bytes(), "cl", true),
            ("IPv6 reply from a backend", from_backend6(Pkt6::tcp(BACKEND6, 8080, CLIENT6, 41002)).bytes(), "bk", true),
            ("ICMPv6 echo to the VIP", echo6(CLIENT6, VIP6, 64, 128, FROM_ROUTER), "cl", true),
            ("IPv6 TCP to a non-VIP", Pkt6::tcp(CLIENT6, 41004, NOT_A_VIP6, 80).bytes(), "cl", false),
        ];
        for (what, f, ingress, ours) in &ip6 {
            let plen = be16(f, 18) as u16;
            for p in [0, 3, 7, 19, plen + 1, plen + 200, 0xffff] {
                if f[20] != PROTO_TCP && p == 19 {
                    continue;
                }
                let g = with16(f, 18, p);
                let case = format!("{what}, payload length {p} (frame holds {})", f.len() - 54);
                let o = fx.run(&g, ingress);
                if *ours {
                    found.expect_drop(&case, &g, &o, Some("drop_malformed"));
                } else {
                    found.expect_untouched_pass(&case, &g, &o, &["pass_not_ours", "pass_malformed"]);
                }
            }
            for v in [0u8, 4, 5, 15] {
                let g = with8(f, 14, v << 4);
                let o = fx.run(&g, ingress);
                found.expect_untouched_pass(&format!("{what}, version {v}"), &g, &o, &["pass_malformed", "pass_not_ours"]);
            }
        }
        for (what, f) in [("802.1Q IPv6", single(&ip6[0].1)), ("802.1ad IPv6", double(&ip6[0].1))] {
            let l3 = l3_of(&f).unwrap().0;
            let g = with8(&f, l3, 0x40);
            let o = fx.run(&g, "cl");
            found.expect_untouched_pass(&format!("{what}, version 4"), &g, &o, &["pass_malformed", "pass_not_ours"]);
        }

        // Extension header chains: 6 are walked; 7 and 8 are too many.
        let chains: Vec<(&str, Vec<Ext>)> = vec![
            ("6 headers", std::iter::once(Ext::options(0, 0)).chain((0..5).map(|_| Ext::options(60, 0))).collect()),
            (
                "6 headers with routing and an atomic fragment header",
                vec![Ext::options(0, 0), Ext::options(60, 0), routing(), Ext::fragment(0, false, 9), Ext::options(60, 1), Ext::options(60, 0)],
            ),
            ("7 headers", std::iter::once(Ext::options(0, 0)).chain((0..6).map(|_| Ext::options(60, 0))).collect()),
            ("7 headers with routing", vec![Ext::options(0, 0), routing(), routing(), Ext::options(60, 0), routing(), Ext::options(60, 2), Ext::options(60, 0)]),
            ("8 headers", std::iter::once(Ext::options(0, 0)).chain((0..7).map(|_| Ext::options(60, 0))).collect()),
            ("8 headers ending in an atomic fragment header", {
                let mut c: Vec<Ext> = std::iter::once(Ext::options(0, 0)).chain((0..6).map(|_| Ext::options(60, 0))).collect();
                c.push(Ext::fragment(0, false, 7));
                c
            }),
        ];
        for (what, chain) in &chains {
            let n = chain.len();
            for (dir, p, ingress, ours, port) in [
                ("TCP to the VIP", Pkt6::tcp(CLIENT6, 42000, VIP6, 80), "cl", true, 8080),
                ("UDP to the VIP", Pkt6::udp(CLIENT6, 42001, VIP6, 53), "cl", true, 5353),
                ("TCP from a backend", from_backend6(Pkt6::tcp(BACKEND6, 8080, CLIENT6, 42002)), "bk", true, 0),
                ("TCP to a non-VIP", Pkt6::tcp(CLIENT6, 42003, NOT_A_VIP6, 80), "cl", false, 0),
            ] {
                let p = Pkt6 { ext: chain.clone(), ..p };
                let g = p.bytes();
                let case = format!("IPv6 {dir} behind {what}");
                let o = fx.run(&g, ingress);
                if !ours {
                    found.expect_untouched_pass(&case, &g, &o, &["pass_not_ours", "pass_malformed"]);
                } else if n <= 6 {
                    let c = found.common(&case, &g, &o);
                    if o.verdict != XDP_REDIRECT {
                        found.add(&case, "want REDIRECT", &g, Some(&o));
                    } else if port != 0 && o.out != to_backend6(&p, port).bytes() {
                        found.add(&case, "not rewritten as without extension headers", &g, Some(&o));
                    }
                    if let Some(c) = c {
                        found.forwarded_checks(&case, &g, &o, c);
                    }
                } else {
                    found.expect_drop(&case, &g, &o, None);
                }
            }
        }
        // An extension header whose length runs past the frame.
        for (dir, p, ingress, ours) in [
            ("TCP to the VIP", Pkt6::tcp(CLIENT6, 43000, VIP6, 80), "cl", true),
            ("UDP to the VIP", Pkt6::udp(CLIENT6, 43001, VIP6, 53), "cl", true),
            ("TCP from a backend", from_backend6(Pkt6::tcp(BACKEND6, 8080, CLIENT6, 43002)), "bk", true),
            ("TCP to a non-VIP", Pkt6::tcp(CLIENT6, 43003, NOT_A_VIP6, 80), "cl", false),
        ] {
            for (what, ext, at) in [
                ("destination options", vec![Ext::options(60, 0)], 0),
                ("hop-by-hop then destination options", vec![Ext::options(0, 0), Ext::options(60, 0)], 8),
                ("hop-by-hop then routing", vec![Ext::options(0, 0), routing()], 8),
            ] {
                let p = Pkt6 { ext, ..p.clone() };
                let f = p.bytes();
                for len8 in [5u8, 10, 40, 62, 63, 64, 255] {
                    // Payload length kept consistent with the frame; only the header's own length lies.
                    let g = with8(&f, 54 + at + 1, len8);
                    let end = 54 + at + (len8 as usize + 1) * 8;
                    if end <= g.len() {
                        continue;
                    }
                    let case = format!("IPv6 {dir}: {what}, last header length {len8} (ends at {end}, frame {})", g.len());
                    let o = fx.run(&g, ingress);
                    if ours {
                        found.expect_drop(&case, &g, &o, None);
                    } else {
                        found.expect_untouched_pass(&case, &g, &o, &["pass_not_ours", "pass_malformed"]);
                    }
                }
            }
        }
        found
    });
}

// ------------------------------------------------------------------------------------------
// 3. Addresses and ports
// ------------------------------------------------------------------------------------------

#[test]
fn odd_addresses_and_ports() {
    in_fixture("addrs", |fx| {
        checked_templates(fx);
        let mut found = Findings::default();
        // Destination port 0: no service.
        for (what, f) in [
            ("IPv4 TCP", Pkt::tcp(CLIENT, 44000, VIP, 0).bytes()),
            ("IPv4 UDP", Pkt::udp(CLIENT, 44001, VIP, 0).bytes()),
            ("IPv6 TCP", Pkt6::tcp(CLIENT6, 44000, VIP6, 0).bytes()),
            ("IPv6 UDP", Pkt6::udp(CLIENT6, 44001, VIP6, 0).bytes()),
        ] {
            let o = fx.run(&f, "cl");
            found.expect_untouched_pass(&format!("{what} to the VIP's port 0"), &f, &o, &["pass_not_ours"]);
        }
        // Source port 0: forwarded like any other.
        for (what, p, port) in [("IPv4 TCP", Pkt::tcp(CLIENT, 0, VIP, 80), 8080), ("IPv4 UDP", Pkt::udp(CLIENT, 0, VIP, 53), 5353)] {
            let f = p.bytes();
            let o = fx.run(&f, "cl");
            let case = format!("{what} from port 0");
            found.common(&case, &f, &o);
            if o.verdict != XDP_REDIRECT || o.out != to_backend1(&p, port).bytes() {
                found.add(&case, "want REDIRECT to 10.1.0.11, rewritten", &f, Some(&o));
            }
        }
        for (what, p, port) in [("IPv6 TCP", Pkt6::tcp(CLIENT6, 0, VIP6, 80), 8080), ("IPv6 UDP", Pkt6::udp(CLIENT6, 0, VIP6, 53), 5353)] {
            let f = p.bytes();
            let o = fx.run(&f, "cl");
            let case = format!("{what} from port 0");
            found.common(&case, &f, &o);
            if o.verdict != XDP_REDIRECT || o.out != to_backend6(&p, port).bytes() {
                found.add(&case, "want REDIRECT to 2001:db8:1::11, rewritten", &f, Some(&o));
            }
        }
        // A VIP as the source: dropped as malformed.
        for src in [VIP, VIP_MULTI] {
            for f in [Pkt::tcp(src, 44002, VIP, 80).bytes(), Pkt::udp(src, 44003, VIP, 53).bytes(), Pkt::tcp(src, 44004, VIP_MULTI, 80).bytes()] {
                let o = fx.run(&f, "cl");
                found.expect_drop(&format!("from the VIP {src}"), &f, &o, Some("drop_malformed"));
            }
        }
        for src in [VIP6, VIP6_MULTI] {
            for f in [Pkt6::tcp(src, 44002, VIP6, 80).bytes(), Pkt6::udp(src, 44003, VIP6, 53).bytes(), Pkt6::tcp(src, 44004, VIP6_MULTI, 80).bytes()] {
                let o = fx.run(&f, "cl");
                found.expect_drop(&format!("from the VIP {src}"), &f, &o, Some("drop_malformed"));
            }
        }
        // Multicast and broadcast sources.
        for src in [Ipv4Addr::new(224, 0, 0, 5), Ipv4Addr::new(239, 255, 255, 250), Ipv4Addr::BROADCAST] {
            for f in [Pkt::tcp(src, 44005, VIP, 80).bytes(), Pkt::udp(src, 44006, VIP, 53).bytes()] {
                let o = fx.run(&f, "cl");
                found.expect_drop(&format!("from {src}"), &f, &o, None);
            }
        }
        for src in [Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), Ipv6Addr::new(0xff05, 0, 0, 0, 0, 0, 1, 3)] {
            for f in [Pkt6::tcp(src, 44005, VIP6, 80).bytes(), Pkt6::udp(src, 44006, VIP6, 53).bytes()] {
                let o = fx.run(&f, "cl");
                found.expect_drop(&format!("from {src}"), &f, &o, None);
            }
        }
        // Echo requests from the same sources: answering them would reflect (a reply to a
        // broadcast or multicast group, or to a VIP).
        for src in [VIP, Ipv4Addr::new(224, 0, 0, 5), Ipv4Addr::BROADCAST] {
            let f = echo4(src, VIP, 64, 8, FROM_ROUTER);
            let o = fx.run(&f, "cl");
            found.expect_drop(&format!("ICMP echo request from {src}"), &f, &o, None);
        }
        for src in [VIP6, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)] {
            let f = echo6(src, VIP6, 64, 128, FROM_ROUTER);
            let o = fx.run(&f, "cl");
            found.expect_drop(&format!("ICMPv6 echo request from {src}"), &f, &o, None);
        }
        found
    });
}

// ------------------------------------------------------------------------------------------
// 4. Random mutations
// ------------------------------------------------------------------------------------------

/// xorshift64*: small, seeded, deterministic.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One mutant of `f`: 1-4 random bytes flipped, or a random 2-byte field overwritten (half the
/// time with a boundary value).
fn mutate(rng: &mut Rng, f: &[u8]) -> (Vec<u8>, String) {
    let mut g = f.to_vec();
    if rng.below(2) == 0 {
        let k = 1 + rng.below(4);
        let mut what = Vec::new();
        for _ in 0..k {
            let at = rng.below(g.len());
            let x = 1 + rng.below(255) as u8;
            g[at] ^= x;
            what.push(format!("[{at}]^={x:02x}"));
        }
        (g, format!("flip {}", what.join(" ")))
    } else {
        let at = rng.below(g.len() - 1);
        let old = u16::from_be_bytes([g[at], g[at + 1]]);
        let v = match rng.below(12) {
            0 => 0,
            1 => 0xffff,
            2 => 1,
            3 => 0x8000,
            4 => 0x7fff,
            5 => old.wrapping_add(1),
            6 => old.wrapping_sub(1),
            7 => old ^ 0x00ff,
            8..=11 => rng.next() as u16,
            _ => unreachable!(),
        };
        g[at..at + 2].copy_from_slice(&v.to_be_bytes());
        (g, format!("[{at}..{}]={v:04x}", at + 2))
    }
}

/// Mutants per template; each also runs with its checksums repaired, when that changes it.
const MUTANTS: usize = 3000;

fn run_mutants(tag: &str, pick: fn(&Template) -> bool) {
    in_fixture(tag, |fx| {
        let templates = checked_templates(fx);
        let mut found = Findings::default();
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        for (i, t) in templates.iter().enumerate() {
            if !pick(t) {
                continue;
            }
            let mut rng = Rng::new(0x5eed_0000 + i as u64);
            for m in 0..MUTANTS {
                let (raw, how) = mutate(&mut rng, &t.frame);
                let mut fixed = raw.clone();
                fix_checksums(&mut fixed);
                let variants = if fixed != raw { vec![(raw, ""), (fixed, ", checksums repaired")] } else { vec![(raw, "")] };
                for (g, note) in variants {
                    let case = format!("{} mutant {m} ({how}{note})", t.name);
                    let o = fx.run(&g, t.ingress);
                    if let Some(c) = found.common(&case, &g, &o) {
                        *outcomes.entry(c.to_string()).or_default() += 1;
                        found.forwarded_checks(&case, &g, &o, c);
                    }
                }
            }
        }
        eprintln!("{tag}: verdict counters {outcomes:?}");
        found
    });
}

#[test]
fn random_mutations_of_ipv4_templates() {
    run_mutants("mut4", |t| {
        let (_, ty) = l3_of(&t.frame).unwrap();
        ty == ETH_P_IPV4
    });
}

#[test]
fn random_mutations_of_ipv6_templates() {
    run_mutants("mut6", |t| {
        let (_, ty) = l3_of(&t.frame).unwrap();
        ty == ETH_P_IPV6
    });
}

// ------------------------------------------------------------------------------------------
// The checksum helpers themselves (no program)
// ------------------------------------------------------------------------------------------

#[test]
fn checksum_sites_see_every_checksum_and_repair_them() {
    let q4 = quoted_v4(Pkt::tcp(VIP, 80, CLIENT, 40000));
    let f = frag_needed(VIP, 64, FROM_ROUTER, &q4);
    let names: Vec<_> = checksum_states(&f).into_iter().map(|s| s.0).collect();
    assert_eq!(names, ["quoted TCP", "quoted IPv4 header", "ICMP", "IPv4 header"]);
    let q6 = quoted_v6(Pkt6::udp(VIP6, 53, CLIENT6, 40000));
    let f6 = packet_too_big(VIP6, 64, FROM_ROUTER, &q6);
    let names: Vec<_> = checksum_states(&f6).into_iter().map(|s| s.0).collect();
    assert_eq!(names, ["quoted UDP", "ICMPv6"]);
    let tagged = double(&Pkt6 { ext: vec![Ext::options(0, 0)], ..Pkt6::tcp(CLIENT6, 1, VIP6, 80) }.bytes());
    assert_eq!(checksum_states(&tagged), [("TCP", true)]);
    for frame in [f, f6, tagged, Pkt::udp(CLIENT, 1, VIP, 53).bytes(), echo4(CLIENT, VIP, 64, 8, FROM_ROUTER)] {
        assert!(checksum_states(&frame).iter().all(|s| s.1), "{}", decode_caught(&frame));
        // Any one byte flipped in a covered range breaks some checksum; repairing mends all.
        for i in 14..frame.len() {
            let mut g = frame.clone();
            g[i] ^= 0x10;
            let (l3, ty) = l3_of(&frame).unwrap();
            let pseudo = if ty == ETH_P_IPV6 { l3 + 8..l3 + 40 } else { l3 + 12..l3 + 20 };
            let covered = sites(&frame).iter().any(|s| s.range.contains(&i)) || pseudo.contains(&i);
            if covered && sites(&g).len() == sites(&frame).len() {
                assert!(checksum_states(&g).iter().any(|s| !s.1), "byte {i} of {}", decode_caught(&frame));
            }
            fix_checksums(&mut g);
            assert!(checksum_states(&g).iter().all(|s| s.1), "repaired byte {i}: {}", decode_caught(&g));
        }
    }
}
