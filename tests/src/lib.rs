//! Shared helpers for the datapath (`BPF_PROG_TEST_RUN`) and end-to-end tests: a packet builder
//! with full checksums, a decoder for readable mismatches, and the fixture network namespace.

use std::{fmt::Write as _, net::Ipv4Addr, process::Command};

use lb_common::csum;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A frame described field by field; `bytes()` lays it out with valid checksums.
#[derive(Clone, Debug, PartialEq)]
pub struct Pkt {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub proto: u8,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub options: Vec<u8>,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// UDP only: send a zero checksum ("none").
    pub udp_no_checksum: bool,
    pub ip_id: u16,
    /// IPv4 flags + fragment offset, host order.
    pub frag: u16,
}

pub const MAC_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const MAC_LB_CLIENT_SIDE: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0];
pub const MAC_LB_BACKEND_SIDE: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0];
pub const MAC_BACKEND1: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];

impl Pkt {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            eth_dst: MAC_LB_CLIENT_SIDE,
            eth_src: MAC_CLIENT,
            src,
            dst,
            ttl: 64,
            proto: PROTO_TCP,
            options: Vec::new(),
            sport,
            dport,
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            udp_no_checksum: false,
            ip_id: 0x1234,
            frag: 0x4000, // DF
        }
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self { proto: PROTO_UDP, payload: b"query".to_vec(), ..Self::tcp(src, sport, dst, dport) }
    }

    pub fn ihl_bytes(&self) -> usize {
        20 + self.options.len()
    }

    pub fn l4_len(&self) -> usize {
        (if self.proto == PROTO_TCP { 20 } else { 8 }) + self.payload.len()
    }

    pub fn bytes(&self) -> Vec<u8> {
        assert!(self.options.len() % 4 == 0 && self.options.len() <= 40);
        let mut b = Vec::new();
        b.extend_from_slice(&self.eth_dst);
        b.extend_from_slice(&self.eth_src);
        b.extend_from_slice(&0x0800u16.to_be_bytes());
        let ihl = self.ihl_bytes();
        let mut ip = vec![0u8; ihl];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + self.l4_len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip[20..].copy_from_slice(&self.options);
        let c = csum::checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        b.extend_from_slice(&ip);
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.extend_from_slice(&[0x50, 0x18]); // doff 5, PSH|ACK
            l4.extend_from_slice(&64240u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0, 0, 0]); // check, urg
        } else {
            l4.extend_from_slice(&(self.l4_len() as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        let check_at = if self.proto == PROTO_TCP { 16 } else { 6 };
        if !(self.proto == PROTO_UDP && self.udp_no_checksum) {
            let c = csum::l4_checksum_v4(self.src.octets(), self.dst.octets(), self.proto, &l4);
            let c = if self.proto == PROTO_UDP { csum::udp_nonzero(c) } else { c };
            l4[check_at..check_at + 2].copy_from_slice(&c.to_ne_bytes());
        }
        b.extend_from_slice(&l4);
        b
    }
}

/// Checks the IPv4 header checksum and (for a whole TCP/UDP packet) the L4 checksum of a frame.
pub fn checksums_valid(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return Err("not an IPv4 frame".into());
    }
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    let ip = &frame[14..14 + ihl];
    if csum::checksum(ip) != 0 {
        return Err("bad IPv4 header checksum".into());
    }
    let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let l4 = &frame[14 + ihl..14 + tot];
    let proto = frame[23];
    if proto == PROTO_UDP && l4[6..8] == [0, 0] {
        return Ok(());
    }
    let mut acc = csum::sum(0, &frame[26..30]);
    acc = csum::sum(acc, &frame[30..34]);
    acc = csum::sum(acc, &[0, proto]);
    acc = csum::sum(acc, &(l4.len() as u16).to_be_bytes());
    acc = csum::sum(acc, l4);
    if !csum::fold(acc) != 0 {
        return Err(format!("bad {} checksum", if proto == PROTO_TCP { "TCP" } else { "UDP" }));
    }
    Ok(())
}

/// A one-line decode of a frame, for assertion messages.
pub fn decode(f: &[u8]) -> String {
    let mut s = String::new();
    if f.len() < 14 {
        return format!("runt frame of {} bytes", f.len());
    }
    let mac = |m: &[u8]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let _ = write!(s, "eth {} > {} type {:02x}{:02x}", mac(&f[6..12]), mac(&f[0..6]), f[12], f[13]);
    if f[12..14] != [0x08, 0x00] || f.len() < 34 {
        return s;
    }
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
    let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
    let _ = write!(s, " | ipv4 ihl {ihl} ttl {} proto {} {src} > {dst} check {:02x}{:02x}", f[22], f[23], f[24], f[25]);
    let l4 = 14 + ihl;
    if f.len() >= l4 + 8 {
        let sp = u16::from_be_bytes([f[l4], f[l4 + 1]]);
        let dp = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
        let c = if f[23] == PROTO_TCP && f.len() >= l4 + 18 { l4 + 16 } else { l4 + 6 };
        let _ = write!(s, " | ports {sp} > {dp} check {:02x}{:02x}", f[c], f[c + 1]);
    }
    let _ = write!(s, " | checksums: {}", checksums_valid(f).err().unwrap_or_else(|| "ok".into()));
    s
}

/// Asserts two frames are byte-identical, printing both decoded and the first differing offset.
#[track_caller]
pub fn assert_frame_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: output frame differs (first at byte {first}, lengths {} vs {})\n  got:  {}\n  want: {}",
            got.len(),
            want.len(),
            decode(got),
            decode(want)
        );
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fixture namespace: a veth pair with fixed MACs, the client side (10.0.0.1/24 on `cl`) and
/// the backend side (10.1.0.1/24 on `bk`), forwarding on, and permanent neighbours for the client
/// 10.0.0.2 and backend 10.1.0.11 (10.1.0.12 is left unresolved). Removed on drop, also on panic.
pub struct FixtureNs {
    pub name: String,
}

impl FixtureNs {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("lbdp{}-{n}-{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        let n = ns.name.as_str();
        let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        let (m_bk, m_cl) = (mac(MAC_LB_BACKEND_SIDE), mac(MAC_LB_CLIENT_SIDE));
        ip(&["-n", n, "link", "add", "bk", "address", &m_bk, "type", "veth", "peer", "name", "cl", "address", &m_cl]);
        ip(&["-n", n, "addr", "add", "10.1.0.1/24", "dev", "bk"]);
        ip(&["-n", n, "addr", "add", "10.0.0.1/24", "dev", "cl"]);
        for dev in ["lo", "bk", "cl"] {
            ip(&["-n", n, "link", "set", dev, "up"]);
        }
        ip(&["-n", n, "neigh", "replace", "10.1.0.11", "lladdr", &mac(MAC_BACKEND1), "dev", "bk", "nud", "permanent"]);
        ip(&["-n", n, "neigh", "replace", "10.0.0.2", "lladdr", &mac(MAC_CLIENT), "dev", "cl", "nud", "permanent"]);
        ip(&["netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ns
    }

    /// Runs `f` on a thread inside this namespace (BPF_PROG_TEST_RUN's FIB lookups use the
    /// calling thread's namespace); a panic in `f` is re-raised here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match xtask::lab::in_netns(&self.name, f) {
            Ok(v) => v,
            Err(e) => panic!("entering namespace {}: {e:#}", self.name),
        }
    }

    /// The ifindex of a device in this namespace (call from inside it).
    pub fn ifindex(dev: &str) -> u32 {
        nix::net::if_::if_nametoindex(dev).unwrap_or_else(|e| panic!("ifindex of {dev}: {e}"))
    }
}

impl Drop for FixtureNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// CLOCK_MONOTONIC now, in ns: the clock bpf_ktime_get_ns() reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
