//! Shared helpers for the datapath (`BPF_PROG_TEST_RUN`) and end-to-end tests: packet builders
//! with full checksums (`Pkt` for IPv4, `Pkt6` for IPv6, VLAN tags, fragments), one checksum
//! verifier and one decoder that know all of them, and the fixture network namespace.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
};

use lb_common::csum;

pub mod browser;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const EXT_HOP_BY_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_AUTH: u8 = 51;
pub const EXT_DEST_OPTS: u8 = 60;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// TCP flag bytes.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH_ACK: u8 = 0x18;
pub const TCP_ACK: u8 = 0x10;

pub const MAC_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const MAC_LB_CLIENT_SIDE: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0];
pub const MAC_LB_BACKEND_SIDE: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0];
pub const MAC_BACKEND1: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];

/// The fixture namespace's IPv6 side: the balancer's addresses on `cl` and `bk`, the client and
/// backend with permanent neighbours.
pub const V6_LB_CLIENT_SIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const V6_LB_BACKEND_SIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const V6_CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
pub const V6_BACKEND1: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11);

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

/// An IPv4 frame described field by field; `bytes()` lays it out with valid checksums.
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
    /// What follows the TCP/UDP header; for any other protocol the whole upper layer (an ICMP
    /// message: see `Pkt::icmp`).
    pub payload: Vec<u8>,
    /// UDP only: send a zero checksum ("none").
    pub udp_no_checksum: bool,
    pub ip_id: u16,
    /// IPv4 flags + fragment offset, host order.
    pub frag: u16,
    /// TCP only: the flag byte (PSH|ACK unless set otherwise).
    pub tcp_flags: u8,
}

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
            tcp_flags: TCP_PSH_ACK,
        }
    }

    /// A TCP SYN (no payload): the first packet of a new connection.
    pub fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self { tcp_flags: TCP_SYN, payload: Vec::new(), ..Self::tcp(src, sport, dst, dport) }
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self { proto: PROTO_UDP, payload: b"query".to_vec(), ..Self::tcp(src, sport, dst, dport) }
    }

    /// An ICMP message (type, code, the 4 bytes after the checksum, body); `bytes()` fills in its
    /// checksum. Ethernet addresses, TTL, ID and DF as in `tcp`.
    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Self {
        Self { proto: PROTO_ICMP, sport: 0, dport: 0, payload: icmp_message(ty, code, rest, body), ..Self::tcp(src, 0, dst, 0) }
    }

    pub fn ihl_bytes(&self) -> usize {
        20 + self.options.len()
    }

    pub fn bytes(&self) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let (src, dst, proto) = (self.src.octets(), self.dst.octets(), self.proto);
        let l4 = upper_layer(self.proto, self.sport, self.dport, self.tcp_flags, &self.payload, self.udp_no_checksum, |m| {
            if proto == PROTO_ICMP { csum::checksum(m) } else { csum::l4_checksum_v4(src, dst, proto, m) }
        });
        let ihl = self.ihl_bytes();
        let mut ip = vec![0u8; ihl];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&self.ip_id.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        ip[20..].copy_from_slice(&self.options);
        set_ipv4_checksum(&mut ip);
        ip.extend_from_slice(&l4);
        ether(self.eth_dst, self.eth_src, ETH_P_IPV4, &ip)
    }
}

/// An IPv6 extension header; its first byte (next header) is filled in by `Pkt6::bytes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Ext {
    pub kind: u8,
    pub bytes: Vec<u8>,
}

impl Ext {
    /// Hop-by-hop (0) or destination options (60): `8 * (len8 + 1)` bytes holding one PadN option.
    pub fn options(kind: u8, len8: u8) -> Self {
        let n = 8 * (len8 as usize + 1);
        let mut b = vec![0u8; n];
        b[1] = len8;
        b[2] = 1; // PadN
        b[3] = (n - 4) as u8;
        Self { kind, bytes: b }
    }

    /// A fragment header: `offset` in bytes (a multiple of 8), more-fragments flag, identification.
    pub fn fragment(offset: usize, more: bool, id: u32) -> Self {
        assert!(offset.is_multiple_of(8));
        let mut b = vec![0u8; 8];
        b[2..4].copy_from_slice(&((offset as u16) | more as u16).to_be_bytes());
        b[4..8].copy_from_slice(&id.to_be_bytes());
        Self { kind: EXT_FRAGMENT, bytes: b }
    }
}

/// An IPv6 frame described field by field, like `Pkt`; `bytes()` lays it out with a valid
/// upper-layer checksum (over the IPv6 pseudo-header; extension headers are not covered).
#[derive(Clone, Debug, PartialEq)]
pub struct Pkt6 {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    /// Traffic class and flow label.
    pub tclass: u8,
    pub flow: u32,
    pub proto: u8,
    /// Extension headers between the fixed header and the upper layer, in order.
    pub ext: Vec<Ext>,
    pub sport: u16,
    pub dport: u16,
    /// What follows the TCP/UDP header; for any other protocol the whole upper layer (an ICMPv6
    /// message: see `Pkt6::icmp`).
    pub payload: Vec<u8>,
    /// UDP only: send a zero checksum (invalid over IPv6).
    pub udp_no_checksum: bool,
    /// TCP only: the flag byte (PSH|ACK unless set otherwise).
    pub tcp_flags: u8,
}

impl Pkt6 {
    pub fn tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Self {
            eth_dst: MAC_LB_CLIENT_SIDE,
            eth_src: MAC_CLIENT,
            src,
            dst,
            hop_limit: 64,
            tclass: 0,
            flow: 0x12345,
            proto: PROTO_TCP,
            ext: Vec::new(),
            sport,
            dport,
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            udp_no_checksum: false,
            tcp_flags: TCP_PSH_ACK,
        }
    }

    pub fn udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Self { proto: PROTO_UDP, payload: b"query".to_vec(), ..Self::tcp(src, sport, dst, dport) }
    }

    /// An ICMPv6 message (type, code, the 4 bytes after the checksum, body); `bytes()` fills in
    /// its checksum. Ethernet addresses and hop limit as in `tcp`, flow label 0.
    pub fn icmp(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Self {
        Self {
            proto: PROTO_ICMPV6,
            flow: 0,
            sport: 0,
            dport: 0,
            payload: icmp_message(ty, code, rest, body),
            ..Self::tcp(src, 0, dst, 0)
        }
    }

    /// Bytes of extension headers before the upper layer.
    pub fn ext_len(&self) -> usize {
        self.ext.iter().map(|e| e.bytes.len()).sum()
    }

    pub fn bytes(&self) -> Vec<u8> {
        let (src, dst, proto) = (self.src.octets(), self.dst.octets(), self.proto);
        let l4 = upper_layer(proto, self.sport, self.dport, self.tcp_flags, &self.payload, self.udp_no_checksum, |m| {
            csum::l4_checksum_v6(src, dst, proto, m)
        });
        let kinds: Vec<u8> = self.ext.iter().map(|e| e.kind).chain([proto]).collect();
        let mut ip = Vec::with_capacity(40 + self.ext_len() + l4.len());
        let vcf = (6u32 << 28) | ((self.tclass as u32) << 20) | (self.flow & 0xfffff);
        ip.extend_from_slice(&vcf.to_be_bytes());
        ip.extend_from_slice(&((self.ext_len() + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[kinds[0], self.hop_limit]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        for (e, next) in self.ext.iter().zip(&kinds[1..]) {
            ip.push(*next);
            ip.extend_from_slice(&e.bytes[1..]);
        }
        ip.extend_from_slice(&l4);
        ether(self.eth_dst, self.eth_src, ETH_P_IPV6, &ip)
    }
}

/// An ICMP or ICMPv6 message with its checksum zero (`Pkt::bytes`/`Pkt6::bytes` fill it in).
fn icmp_message(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    m
}

/// The upper layer of a `Pkt` or `Pkt6`: a TCP header (seq 1000, ack 0, `tcp_flags`, window
/// 64240) or UDP header followed by `payload`, or `payload` as given for any other protocol; the
/// TCP, UDP, ICMP or ICMPv6 checksum is `checksum` of it (its pseudo-header included).
fn upper_layer(
    proto: u8,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    payload: &[u8],
    udp_no_checksum: bool,
    checksum: impl FnOnce(&[u8]) -> u16,
) -> Vec<u8> {
    let mut l4 = Vec::new();
    if proto == PROTO_TCP || proto == PROTO_UDP {
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
    }
    let check_at = match proto {
        PROTO_TCP => {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.extend_from_slice(&[0x50, tcp_flags]); // doff 5, flags
            l4.extend_from_slice(&64240u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0, 0, 0]); // check, urg
            Some(16)
        }
        PROTO_UDP => {
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            (!udp_no_checksum).then_some(6)
        }
        PROTO_ICMP | PROTO_ICMPV6 => Some(2),
        _ => None,
    };
    l4.extend_from_slice(payload);
    if let Some(at) = check_at {
        let c = checksum(&l4);
        let c = if proto == PROTO_UDP { csum::udp_nonzero(c) } else { c };
        l4[at..at + 2].copy_from_slice(&c.to_ne_bytes());
    }
    l4
}

/// An Ethernet header (no tag) followed by `l3`.
fn ether(dst: [u8; 6], src: [u8; 6], ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(14 + l3.len());
    b.extend_from_slice(&dst);
    b.extend_from_slice(&src);
    b.extend_from_slice(&ethertype.to_be_bytes());
    b.extend_from_slice(l3);
    b
}

/// Recomputes the checksum of an IPv4 header (all of `hdr`, options included).
fn set_ipv4_checksum(hdr: &mut [u8]) {
    hdr[10..12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(hdr);
    hdr[10..12].copy_from_slice(&c.to_ne_bytes());
}

/// Inserts a VLAN tag (`tpid`, VLAN id `vid`, priority 0) right after the MAC addresses: it
/// becomes the outermost tag. Tag twice (0x8100 first, then 0x88a8) for an 802.1ad frame.
pub fn vlan_tag(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut b = frame[..12].to_vec();
    b.extend_from_slice(&tpid.to_be_bytes());
    b.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    b.extend_from_slice(&frame[12..]);
    b
}

/// The offset of the L3 header of a frame (after any VLAN tags) and its ethertype.
pub fn l3_of(frame: &[u8]) -> Option<(usize, u16)> {
    let mut off = 12;
    loop {
        let t = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
        if t == ETH_P_8021Q || t == ETH_P_8021AD {
            off += 4;
            continue;
        }
        return Some((off + 2, t));
    }
}

/// Splits an untagged IPv4 frame into fragments: the IP payload is cut at the byte offsets `cuts`
/// (multiples of 8, increasing). Every fragment keeps the Ethernet header and the IP header
/// (identification, TTL, addresses), with its length, MF flag and offset set and DF cleared.
pub fn fragment_v4(frame: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    assert_eq!(frame[12..14], [0x08, 0x00], "fragment_v4 wants an untagged IPv4 frame");
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let data = &frame[14 + ihl..14 + tot];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(data.len());
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert!(a.is_multiple_of(8) && a < b, "fragment offsets must be increasing multiples of 8");
        let last = b == data.len();
        let mut f = frame[..14 + ihl].to_vec();
        f[16..18].copy_from_slice(&((ihl + b - a) as u16).to_be_bytes());
        let flags = (u16::from_be_bytes([frame[20], frame[21]]) & 0x8000) | if last { 0 } else { 0x2000 };
        f[20..22].copy_from_slice(&(flags | (a / 8) as u16).to_be_bytes());
        set_ipv4_checksum(&mut f[14..14 + ihl]);
        f.extend_from_slice(&data[a..b]);
        out.push(f);
    }
    out
}

/// Reassembles untagged IPv4 fragments (any order) into one frame: the Ethernet and IP header of
/// the fragment at offset 0, the data of all by offset, MF/offset cleared, checksum recomputed.
pub fn reassemble_v4(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, &[u8])> = frags
        .iter()
        .map(|f| {
            let ihl = ((f[14] & 0x0f) as usize) * 4;
            let tot = u16::from_be_bytes([f[16], f[17]]) as usize;
            let off = (u16::from_be_bytes([f[20], f[21]]) & 0x1fff) as usize * 8;
            (off, &f[14 + ihl..14 + tot])
        })
        .collect();
    parts.sort_by_key(|p| p.0);
    let first = frags.iter().find(|f| u16::from_be_bytes([f[20], f[21]]) & 0x1fff == 0).expect("a first fragment");
    let ihl = ((first[14] & 0x0f) as usize) * 4;
    let mut out = first[..14 + ihl].to_vec();
    let mut data = Vec::new();
    for (off, d) in parts {
        assert_eq!(off, data.len(), "fragments must be contiguous");
        data.extend_from_slice(d);
    }
    out[16..18].copy_from_slice(&((ihl + data.len()) as u16).to_be_bytes());
    let df = u16::from_be_bytes([out[20], out[21]]) & 0x4000;
    out[20..22].copy_from_slice(&df.to_be_bytes());
    set_ipv4_checksum(&mut out[14..14 + ihl]);
    out.extend_from_slice(&data);
    out
}

/// Splits an untagged IPv6 frame without extension headers into fragments: a fragment header
/// (identification `id`) is inserted after the fixed header and the payload cut at `cuts`.
pub fn fragment_v6(frame: &[u8], id: u32, cuts: &[usize]) -> Vec<Vec<u8>> {
    assert_eq!(frame[12..14], [0x86, 0xdd], "fragment_v6 wants an untagged IPv6 frame");
    let next = frame[20];
    assert!(!matches!(next, 0 | 43 | 44 | 51 | 60), "fragment_v6 wants a frame without extension headers");
    let plen = u16::from_be_bytes([frame[18], frame[19]]) as usize;
    let data = &frame[54..54 + plen];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(data.len());
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert!(a.is_multiple_of(8) && a < b, "fragment offsets must be increasing multiples of 8");
        let mut f = frame[..54].to_vec();
        f[18..20].copy_from_slice(&((8 + b - a) as u16).to_be_bytes());
        f[20] = EXT_FRAGMENT;
        let mut h = Ext::fragment(a, b != data.len(), id).bytes;
        h[0] = next;
        f.extend_from_slice(&h);
        f.extend_from_slice(&data[a..b]);
        out.push(f);
    }
    out
}

/// Reassembles untagged IPv6 fragments (fragment header right after the fixed header) into one
/// frame without the fragment header.
pub fn reassemble_v6(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(usize, &[u8])> = frags
        .iter()
        .map(|f| {
            assert_eq!(f[20], EXT_FRAGMENT, "reassemble_v6 wants the fragment header first");
            let plen = u16::from_be_bytes([f[18], f[19]]) as usize;
            let off = (u16::from_be_bytes([f[56], f[57]]) & !7) as usize;
            (off, &f[62..54 + plen])
        })
        .collect();
    parts.sort_by_key(|p| p.0);
    let first = frags.iter().find(|f| u16::from_be_bytes([f[56], f[57]]) & !7 == 0).expect("a first fragment");
    let mut out = first[..54].to_vec();
    out[20] = first[54];
    let mut data = Vec::new();
    for (off, d) in parts {
        assert_eq!(off, data.len(), "fragments must be contiguous");
        data.extend_from_slice(d);
    }
    out[18..20].copy_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(&data);
    out
}


// ---------------------------------------------------------------------------------------------
// Checking and decoding
// ---------------------------------------------------------------------------------------------

/// A fragment header's (offset in bytes, more fragments, identification).
type FragInfo = (usize, bool, u32);

/// The L4 part of an IPv6 packet at `ip`: (protocol, offset of the upper layer, fragment header)
/// after walking the extension headers.
fn walk_v6(ip: &[u8]) -> Result<(u8, usize, Option<FragInfo>), String> {
    if ip.len() < 40 {
        return Err("IPv6 header truncated".into());
    }
    let mut next = ip[6];
    let mut off = 40;
    let mut frag = None;
    loop {
        match next {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS | EXT_AUTH => {
                let h = ip.get(off..off + 2).ok_or("extension header truncated")?;
                // This header's length: AH in 4-byte words less two, the others in 8-byte words
                // less one.
                off += if next == EXT_AUTH { (h[1] as usize + 2) * 4 } else { (h[1] as usize + 1) * 8 };
                next = h[0];
            }
            EXT_FRAGMENT => {
                let h = ip.get(off..off + 8).ok_or("fragment header truncated")?;
                next = h[0];
                let fo = u16::from_be_bytes([h[2], h[3]]);
                frag = Some(((fo & !7) as usize, fo & 1 != 0, u32::from_be_bytes([h[4], h[5], h[6], h[7]])));
                off += 8;
            }
            _ => return Ok((next, off, frag)),
        }
    }
}

/// Checks an upper-layer checksum of `l4` against the pseudo-header of `src` -> `dst` (IPv4
/// addresses or IPv6 ones: the pseudo-headers sum to the same words but for the addresses). A zero
/// UDP checksum means "none" over IPv4 and is invalid over IPv6.
fn check_l4(src: &[u8], dst: &[u8], proto: u8, l4: &[u8], what: &str) -> Result<(), String> {
    if proto == PROTO_UDP && l4.len() >= 8 && l4[6..8] == [0, 0] {
        return if src.len() == 4 { Ok(()) } else { Err(format!("{what} IPv6 UDP checksum is zero")) };
    }
    let mut acc = csum::sum(0, src);
    acc = csum::sum(acc, dst);
    acc = csum::sum(acc, &[0, proto]);
    acc = csum::sum(acc, &(l4.len() as u16).to_be_bytes());
    acc = csum::sum(acc, l4);
    if !csum::fold(acc) != 0 {
        return Err(format!("bad {what} {} checksum", proto_name(proto)));
    }
    Ok(())
}

fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_ICMP => "ICMP".into(),
        PROTO_ICMPV6 => "ICMPv6".into(),
        _ => format!("proto {p}"),
    }
}

/// Checks an embedded (quoted) packet of an ICMP error: its IPv4 header checksum, and its L4
/// checksum when the whole embedded datagram is quoted.
fn check_quote(q: &[u8], v6: bool) -> Result<(), String> {
    if v6 {
        let (proto, l4, frag) = walk_v6(q).map_err(|e| format!("embedded: {e}"))?;
        let plen = u16::from_be_bytes([q[4], q[5]]) as usize;
        if frag.is_none() && q.len() >= 40 + plen && l4 <= 40 + plen && (proto == PROTO_TCP || proto == PROTO_UDP) {
            check_l4(&q[8..24], &q[24..40], proto, &q[l4..40 + plen], "embedded")?;
        }
        return Ok(());
    }
    if q.len() < 20 {
        return Err("embedded IPv4 header truncated".into());
    }
    let ihl = ((q[0] & 0x0f) as usize) * 4;
    if csum::checksum(q.get(..ihl).ok_or("embedded IPv4 header truncated")?) != 0 {
        return Err("bad embedded IPv4 header checksum".into());
    }
    let tot = u16::from_be_bytes([q[2], q[3]]) as usize;
    let frags = u16::from_be_bytes([q[6], q[7]]);
    if frags & 0x3fff == 0 && q.len() >= tot && ihl <= tot && (q[9] == PROTO_TCP || q[9] == PROTO_UDP) {
        check_l4(&q[12..16], &q[16..20], q[9], &q[ihl..tot], "embedded")?;
    }
    Ok(())
}

/// Checks every checksum of a frame that can be checked: VLAN tags are skipped; IPv4 header
/// checksum; TCP/UDP (IPv4 or IPv6 pseudo-header, whole unfragmented packets only), ICMP, ICMPv6
/// (pseudo-header); for ICMP errors also the quoted packet's IPv4 and L4 checksums.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let (l3, ty) = l3_of(frame).ok_or("frame truncated in the Ethernet header")?;
    let ip = &frame[l3..];
    match ty {
        ETH_P_IPV4 => {
            if ip.len() < 20 {
                return Err("IPv4 header truncated".into());
            }
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if csum::checksum(ip.get(..ihl).ok_or("IPv4 header truncated")?) != 0 {
                return Err("bad IPv4 header checksum".into());
            }
            let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            let l4 = ip.get(ihl..tot).ok_or("IPv4 total length beyond the frame")?;
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return Ok(()); // a fragment: its L4 checksum covers the whole datagram
            }
            match ip[9] {
                PROTO_TCP | PROTO_UDP => check_l4(&ip[12..16], &ip[16..20], ip[9], l4, "outer"),
                PROTO_ICMP => {
                    if csum::checksum(l4) != 0 {
                        return Err("bad ICMP checksum".into());
                    }
                    if l4.len() > 8 && matches!(l4[0], 3 | 11 | 12) {
                        check_quote(&l4[8..], false)?;
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        ETH_P_IPV6 => {
            let (proto, off, frag) = walk_v6(ip)?;
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            let l4 = ip.get(off..40 + plen).ok_or("IPv6 payload length beyond the frame")?;
            if matches!(frag, Some((o, m, _)) if o != 0 || m) {
                return Ok(());
            }
            match proto {
                PROTO_TCP | PROTO_UDP => check_l4(&ip[8..24], &ip[24..40], proto, l4, "outer"),
                PROTO_ICMPV6 => {
                    check_l4(&ip[8..24], &ip[24..40], proto, l4, "outer")?;
                    if l4.len() > 8 && matches!(l4[0], 1..=4) {
                        check_quote(&l4[8..], true)?;
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        _ => Err(format!("ethertype {ty:04x} is neither IPv4 nor IPv6")),
    }
}

/// A one-line decode of a frame, for assertion messages: VLAN tags, IPv4 or IPv6 with extension
/// headers, fragments, ports, ICMP (with the quoted packet of an error) and the checksum verdict
/// of `verify_checksums`.
pub fn decode(f: &[u8]) -> String {
    let mut s = String::new();
    if f.len() < 14 {
        return format!("runt frame of {} bytes", f.len());
    }
    let mac = |m: &[u8]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let _ = write!(s, "{} bytes: eth {} > {}", f.len(), mac(&f[6..12]), mac(&f[0..6]));
    let mut off = 12;
    while f.len() >= off + 4 {
        let t = u16::from_be_bytes([f[off], f[off + 1]]);
        if t != ETH_P_8021Q && t != ETH_P_8021AD {
            break;
        }
        let _ = write!(s, " | tag {t:04x} vid {}", u16::from_be_bytes([f[off + 2], f[off + 3]]) & 0xfff);
        off += 4;
    }
    let Some(tb) = f.get(off..off + 2) else { return s };
    let ty = u16::from_be_bytes([tb[0], tb[1]]);
    let _ = write!(s, " type {ty:04x}");
    decode_ip(&mut s, &f[off + 2..], ty, 0);
    let _ = write!(s, " | checksums: {}", verify_checksums(f).err().unwrap_or_else(|| "ok".into()));
    s
}

fn decode_ip(s: &mut String, ip: &[u8], ty: u16, depth: u32) {
    let (proto, l4, frag) = match ty {
        ETH_P_IPV4 if ip.len() >= 20 => {
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            let fr = u16::from_be_bytes([ip[6], ip[7]]);
            let _ = write!(
                s,
                " | ipv4 ihl {ihl} len {} id {:04x} frag {}{}+{} ttl {} proto {} {} > {} check {:02x}{:02x}",
                u16::from_be_bytes([ip[2], ip[3]]),
                u16::from_be_bytes([ip[4], ip[5]]),
                if fr & 0x4000 != 0 { "DF " } else { "" },
                if fr & 0x2000 != 0 { "MF" } else { "-" },
                (fr & 0x1fff) * 8,
                ip[8],
                ip[9],
                Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
                ip[10],
                ip[11]
            );
            (ip[9], ihl, fr & 0x1fff != 0)
        }
        ETH_P_IPV6 if ip.len() >= 40 => {
            let a = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap());
            let _ = write!(
                s,
                " | ipv6 plen {} hlim {} {} > {}",
                u16::from_be_bytes([ip[4], ip[5]]),
                ip[7],
                a(&ip[8..24]),
                a(&ip[24..40])
            );
            match walk_v6(ip) {
                Ok((proto, l4, frag)) => {
                    if l4 > 40 {
                        let _ = write!(s, " ext {} bytes", l4 - 40);
                    }
                    if let Some((o, m, id)) = frag {
                        let _ = write!(s, " frag id {id:08x} {}+{o}", if m { "MF" } else { "-" });
                    }
                    let _ = write!(s, " next {proto}");
                    (proto, l4, matches!(frag, Some((o, _, _)) if o != 0))
                }
                Err(e) => {
                    let _ = write!(s, " ({e})");
                    return;
                }
            }
        }
        _ => return,
    };
    if frag || ip.len() < l4 + 4 {
        return;
    }
    let h = &ip[l4..];
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let c = if proto == PROTO_TCP { 16 } else { 6 };
            let _ = write!(s, " | {} {} > {}", proto_name(proto), u16::from_be_bytes([h[0], h[1]]), u16::from_be_bytes([h[2], h[3]]));
            if h.len() >= c + 2 {
                let _ = write!(s, " check {:02x}{:02x}", h[c], h[c + 1]);
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let _ = write!(s, " | {} type {} code {} check {:02x}{:02x}", proto_name(proto), h[0], h[1], h[2], h[3]);
            let error = if proto == PROTO_ICMP { matches!(h[0], 3 | 11 | 12) } else { matches!(h[0], 1..=4) };
            if error && h.len() > 8 && depth == 0 {
                s.push_str(" | quote [");
                decode_ip(s, &h[8..], if proto == PROTO_ICMP { ETH_P_IPV4 } else { ETH_P_IPV6 }, depth + 1);
                s.push_str(" ]");
            }
        }
        _ => {}
    }
}

/// A hex dump of `b`, 16 bytes a line, each line indented and led by its offset.
pub fn hex_dump(b: &[u8]) -> String {
    b.chunks(16)
        .enumerate()
        .map(|(i, c)| format!("      {:04x}: {}", i * 16, c.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts two frames are byte-identical; on a mismatch prints both decoded, the first differing
/// offset and a hex dump of both.
#[track_caller]
pub fn assert_frame_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: output frame differs (first at byte {first}, lengths {} vs {})\n  got:  {}\n  want: {}\n  got bytes:\n{}\n  want bytes:\n{}",
            got.len(),
            want.len(),
            decode(got),
            decode(want),
            hex_dump(got),
            hex_dump(want)
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
/// 10.0.0.2 and backend 10.1.0.11 (10.1.0.12 is left unresolved); the same in IPv6 (2001:db8::/64
/// on `cl`, 2001:db8:1::/64 on `bk`, client ::2, backend 2001:db8:1::11). Removed on drop, also on
/// panic.
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
        // IPv6: 2001:db8::1/64 on `cl` (client 2001:db8::2), 2001:db8:1::1/64 on `bk` (backend
        // 2001:db8:1::11 resolved; ::12 and ::13 are left unresolved), no DAD, forwarding on.
        ip(&["-n", n, "addr", "add", "2001:db8::1/64", "dev", "cl", "nodad"]);
        ip(&["-n", n, "addr", "add", "2001:db8:1::1/64", "dev", "bk", "nodad"]);
        ip(&["-n", n, "neigh", "replace", "2001:db8:1::11", "lladdr", &mac(MAC_BACKEND1), "dev", "bk", "nud", "permanent"]);
        ip(&["-n", n, "neigh", "replace", "2001:db8::2", "lladdr", &mac(MAC_CLIENT), "dev", "cl", "nud", "permanent"]);
        ip(&["netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
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

    /// Runs `ip -n <this namespace> args...`; panics with its error output if it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
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

/// Pins the calling thread to the first CPU it may run on: BPF_PROG_TEST_RUN runs the program
/// on the calling CPU, so consecutive runs then share the program's per-CPU caches.
pub fn pin_to_one_cpu() {
    let pid = nix::unistd::Pid::from_raw(0);
    let allowed = nix::sched::sched_getaffinity(pid).expect("sched_getaffinity");
    let cpu = (0..nix::sched::CpuSet::count()).find(|&c| allowed.is_set(c).unwrap_or(false)).expect("some CPU");
    let mut one = nix::sched::CpuSet::new();
    one.set(cpu).expect("CPU set");
    nix::sched::sched_setaffinity(pid, &one).expect("sched_setaffinity");
}

/// CLOCK_MONOTONIC now, in ns: the clock bpf_ktime_get_ns() reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// XDP verdicts, as BPF_PROG_TEST_RUN returns them.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Counters that are counted besides a verdict, not as one.
pub const INFORMATIONAL: [&str; 8] = lb_common::stat::EVENT_NAMES;

/// One BPF_PROG_TEST_RUN: the verdict, the output frame and the counters it changed.
pub struct Run {
    pub verdict: u32,
    pub out: Vec<u8>,
    pub changed: std::collections::BTreeMap<&'static str, u64>,
}

/// The XDP program loaded (nothing attached, nothing pinned) with its maps written from a config,
/// the core every datapath test file builds its fixture on.
pub struct Loaded {
    pub dp: lb::datapath::Datapath,
    pub rt: lb::state::Runtime,
}

impl Loaded {
    /// From a config text (parsed and validated).
    pub fn new(config: &str) -> Self {
        Self::load(&lb::config::Config::parse(config).unwrap_or_else(|e| panic!("fixture config: {e}")))
    }

    /// From a typed config, checked first as the daemon would check it (`validated`).
    pub fn from_config(cfg: lb::config::Config) -> Self {
        Self::load(&validated(cfg))
    }

    fn load(cfg: &lb::config::Config) -> Self {
        assert!(nix::unistd::geteuid().is_root(), "datapath tests need root (BPF_PROG_TEST_RUN)");
        let mut dp = lb::datapath::Datapath::load(lb::datapath::Capacity::from_config(&cfg.datapath), None)
            .expect("loading the XDP program");
        let mut rt = lb::state::Runtime::new(cfg);
        rt.reconcile(cfg, &mut dp).expect("writing the maps");
        // As if attached to the fixture namespace's interfaces: redirect targets.
        for dev in ["cl", "bk"] {
            dp.set_tx_port(dev, true).expect("writing TX_PORTS");
        }
        Self { dp, rt }
    }

    /// Runs one frame arriving on interface `ifindex` of the calling thread's namespace; Err is
    /// the kernel refusing to run it.
    pub fn test_run(&mut self, frame: &[u8], ifindex: u32) -> Result<Run, String> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let before = self.dp.stats().expect("reading STATS");
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        };
        let r = self.dp.program().test_run(opts).map_err(|e| e.to_string());
        let after = self.dp.stats().expect("reading STATS");
        let changed = after.iter().filter(|(k, v)| **v != before[*k]).map(|(k, v)| (*k, v - before[k])).collect();
        let r = r?;
        out.truncate(r.data_size_out as usize);
        Ok(Run { verdict: r.return_value, out, changed })
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.dp.stats().expect("reading STATS")[name]
    }

    pub fn service(&self, name: &str) -> &lb::state::ServiceRt {
        self.rt.service(name).expect("fixture service")
    }

    /// The backend address Maglev gives `client` in service `name` (after the service's mask).
    pub fn maglev_pick(&self, name: &str, client: std::net::IpAddr) -> std::net::IpAddr {
        let s = self.service(name);
        let w = lb::datapath::addr_words(client);
        let masked = match client {
            std::net::IpAddr::V4(_) => [w[0] & s.entry.v4_mask, 0, 0, 0],
            std::net::IpAddr::V6(_) => std::array::from_fn(|i| w[i] & s.entry.v6_mask[i]),
        };
        let slot = lb_common::hash::client_slot(self.rt.global.hash_seed, &masked, self.rt.global.maglev_m);
        let id = s.table[slot as usize];
        s.backends.iter().find(|b| b.id == id).expect("backend of the table").config.address
    }

    pub fn backend_id(&self, name: &str, addr: std::net::IpAddr) -> u32 {
        self.service(name).backends.iter().find(|b| b.config.address == addr).expect("fixture backend").id
    }
}

/// Fixture configs are built as typed values: `datapath_config`, `service` and `backend` give
/// what `Config::parse` gives for a file naming only their arguments (every other field at its
/// default); a test changes a field by assignment. `validated` checks one as a file would be.
pub fn config(datapath: lb::config::DatapathConfig, services: Vec<lb::config::ServiceConfig>) -> lb::config::Config {
    lb::config::Config {
        datapath,
        control: lb::config::ControlConfig {
            socket: lb::config::DEFAULT_SOCKET.into(),
            metrics: Some(lb::config::DEFAULT_METRICS.parse().expect("the default metrics address")),
            journal: lb::config::JournalConfig::default(),
        },
        services,
        announce: None,
    }
}

/// `[datapath]` with only `interfaces` given.
pub fn datapath_config(interfaces: &[&str]) -> lb::config::DatapathConfig {
    lb::config::DatapathConfig {
        interfaces: interfaces.iter().map(|i| i.to_string()).collect(),
        mode: lb::config::Mode::Nat,
        xdp_mode: lb::config::XdpMode::Auto,
        affinity_entries: lb_common::DEFAULT_AFFINITY_ENTRIES,
        flow_entries: lb_common::DEFAULT_FLOW_ENTRIES,
        max_new_pins_per_cpu: lb_common::DEFAULT_NEW_PINS_PER_CPU,
        pin_path: lb::config::DEFAULT_PIN_PATH.into(),
        max_services: lb_common::DEFAULT_MAX_SERVICES,
        max_backends: lb_common::DEFAULT_MAX_BACKENDS,
        maglev_table_size: lb_common::DEFAULT_MAGLEV_M,
        hash_seed: 0,
    }
}

/// A TCP service with only its name, VIP, port and backends given.
pub fn service(name: &str, vip: &str, port: u16, backends: Vec<lb::config::BackendConfig>) -> lb::config::ServiceConfig {
    lb::config::ServiceConfig {
        name: name.to_owned(),
        vip: vip.parse().expect("a VIP address"),
        port,
        protocol: lb::config::Protocol::Tcp,
        affinity: lb::config::AffinityConfig::default(),
        health: lb::config::HealthConfig::default(),
        balance: lb::config::BalanceConfig::default(),
        backends,
    }
}

/// `service` over UDP.
pub fn udp_service(name: &str, vip: &str, port: u16, backends: Vec<lb::config::BackendConfig>) -> lb::config::ServiceConfig {
    lb::config::ServiceConfig { protocol: lb::config::Protocol::Udp, ..service(name, vip, port, backends) }
}

/// A backend with only its address and port given (weight 100, active).
pub fn backend(address: &str, port: u16) -> lb::config::BackendConfig {
    lb::config::BackendConfig {
        address: address.parse().expect("a backend address"),
        port,
        weight: 100,
        state: lb::config::BackendState::Active,
    }
}

/// `backend` at each of `addresses`, all on `port`.
pub fn backends(addresses: &[&str], port: u16) -> Vec<lb::config::BackendConfig> {
    addresses.iter().map(|a| backend(a, port)).collect()
}

/// The service `name` of `cfg`, to change.
pub fn service_mut<'a>(cfg: &'a mut lb::config::Config, name: &str) -> &'a mut lb::config::ServiceConfig {
    cfg.services.iter_mut().find(|s| s.name == name).unwrap_or_else(|| panic!("no service {name} in the fixture config"))
}

/// `cfg` as a config file would give it: written out as TOML (`config_toml`) and parsed back,
/// which must give `cfg` again; panics naming every problem validation finds.
pub fn validated(cfg: lb::config::Config) -> lb::config::Config {
    let text = config_toml(&cfg);
    let parsed = lb::config::Config::parse(&text).unwrap_or_else(|e| panic!("fixture config: {e}\n{text}"));
    assert_eq!(parsed, cfg, "the fixture config does not read back as itself:\n{text}");
    parsed
}

/// A config file that parses to `cfg`: its `Serialize` form, but for the journal, which the file
/// spells as `control.journal` (the path), `control.journal_max_size` and `control.journal_events`.
pub fn config_toml(cfg: &lb::config::Config) -> String {
    let mut doc = toml::Table::try_from(cfg).expect("a config serialises to TOML");
    let control = doc.get_mut("control").and_then(|c| c.as_table_mut()).expect("control");
    let journal = control.remove("journal").expect("control.journal");
    for (key, value) in journal.as_table().expect("journal").clone() {
        let key = if key == "path" { "journal".to_owned() } else { format!("journal_{key}") };
        control.insert(key, value);
    }
    toml::to_string(&doc).expect("TOML text")
}

/// The fixture config of the breadth and corpus tests (and the datapath bench): the IPv4
/// services of `datapath.rs` (web, dns, multi) plus their IPv6 twins: web6 and dns6 with one
/// resolved backend (exact-bytes cases), multi6 with three backends (affinity cases; only ::11
/// has a neighbour entry).
pub fn fixture_config() -> lb::config::Config {
    let mut dp = datapath_config(&["cl", "bk"]);
    dp.affinity_entries = 1024;
    dp.max_services = 16;
    dp.max_backends = 32;
    dp.maglev_table_size = 251;
    dp.hash_seed = 7;
    config(
        dp,
        vec![
            service("web", "10.0.0.100", 80, vec![backend("10.1.0.11", 8080)]),
            udp_service("dns", "10.0.0.100", 53, vec![backend("10.1.0.11", 5353)]),
            service("multi", "10.0.0.101", 80, backends(&["10.1.0.11", "10.1.0.12", "10.1.0.13"], 8081)),
            service("web6", "2001:db8::100", 80, vec![backend("2001:db8:1::11", 8080)]),
            udp_service("dns6", "2001:db8::100", 53, vec![backend("2001:db8:1::11", 5353)]),
            service("multi6", "2001:db8::101", 80, backends(&["2001:db8:1::11", "2001:db8:1::12", "2001:db8:1::13"], 8081)),
        ],
    )
}

/// The `lb` binary under test (`LB_BIN`, else `target/release/lb`); panics with a clear message
/// when it or root is missing.
pub fn lb_bin() -> std::path::PathBuf {
    assert!(
        xtask::lab::is_root(),
        "the end-to-end tests need root (network namespaces, veth, XDP): run `cargo xtask test` as root"
    );
    let bin = std::env::var_os("LB_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb"));
    assert!(
        bin.is_file(),
        "lb binary {} not found: build it with `cargo build --release -p lb-userspace` or point LB_BIN at it",
        bin.display()
    );
    bin
}

/// The VIPs and backend 1 of `fixture_config()` (the fixture namespace resolves backend 1).
const FX_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const FX_BACKEND1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
const FX_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

/// What the balancer sends toward backend 1 for `p`: destination rewritten, TTL - 1, MACs of the
/// backend-side hop.
pub fn to_backend1(p: &Pkt, port: u16) -> Pkt {
    Pkt { dst: FX_BACKEND1, dport: port, ttl: p.ttl - 1, eth_dst: MAC_BACKEND1, eth_src: MAC_LB_BACKEND_SIDE, ..p.clone() }
}

/// A reply from backend 1 as the balancer sends it to the client: source = VIP:`vport`.
pub fn to_client(p: &Pkt, vport: u16) -> Pkt {
    Pkt { src: FX_VIP, sport: vport, ttl: p.ttl - 1, eth_dst: MAC_CLIENT, eth_src: MAC_LB_CLIENT_SIDE, ..p.clone() }
}

/// `to_backend1` for IPv6 (backend 1 = `V6_BACKEND1`).
pub fn to_backend6(p: &Pkt6, port: u16) -> Pkt6 {
    Pkt6 {
        dst: V6_BACKEND1,
        dport: port,
        hop_limit: p.hop_limit - 1,
        eth_dst: MAC_BACKEND1,
        eth_src: MAC_LB_BACKEND_SIDE,
        ..p.clone()
    }
}

/// `to_client` for IPv6.
pub fn to_client6(p: &Pkt6, vport: u16) -> Pkt6 {
    Pkt6 {
        src: FX_VIP6,
        sport: vport,
        hop_limit: p.hop_limit - 1,
        eth_dst: MAC_CLIENT,
        eth_src: MAC_LB_CLIENT_SIDE,
        ..p.clone()
    }
}

/// A reply packet from backend 1, arriving on `bk`.
pub fn from_backend(p: Pkt) -> Pkt {
    Pkt { eth_dst: MAC_LB_BACKEND_SIDE, eth_src: MAC_BACKEND1, ..p }
}

/// `from_backend` for IPv6.
pub fn from_backend6(p: Pkt6) -> Pkt6 {
    Pkt6 { eth_dst: MAC_LB_BACKEND_SIDE, eth_src: MAC_BACKEND1, ..p }
}

/// A lab config text without its `[[services.backends]]` entries at `addr` (every service): each
/// backend's body runs up to the next table header.
pub fn config_without_backend(cfg: &str, addr: &str) -> String {
    let mut parts = cfg.split("\n[[services.backends]]");
    let mut kept = parts.next().unwrap_or_default().to_owned();
    for block in parts {
        let end = block.find("\n[").unwrap_or(block.len());
        if block[..end].contains(&format!("address = \"{addr}\"")) {
            kept.push_str(&block[end..]);
        } else {
            kept.push_str("\n[[services.backends]]");
            kept.push_str(block);
        }
    }
    kept
}

/// Waits (up to 20 s) until the lab's HTTP VIP answers, then sends one request from each of its
/// clients (each gets its pin): the VIP and the clients, for the test to go on with.
pub fn every_client_once(lab: &xtask::lab::Lab) -> (std::net::SocketAddrV4, Vec<Ipv4Addr>) {
    use std::time::{Duration, Instant};
    let vip = std::net::SocketAddrV4::new(lab.vip(), xtask::lab::VIP_HTTP_PORT);
    let clients = lab.client_addrs();
    let t = Instant::now();
    while lab.http_get(clients[0], vip, Duration::from_secs(2)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "the VIP never answered:\n{}", lab.lb_log_tail(20));
    }
    for c in &clients {
        lab.http_get(*c, vip, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{c}: {e:#}"));
    }
    (vip, clients)
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn fixture_config_reads_back_as_itself() {
        validated(fixture_config());
    }

    #[test]
    #[should_panic(expected = "must be prime")]
    fn validated_rejects_what_a_file_could_not_say() {
        let mut cfg = fixture_config();
        cfg.datapath.maglev_table_size = 250;
        validated(cfg);
    }
}

#[cfg(test)]
mod kit_tests {
    use super::*;

    #[test]
    fn extension_headers_are_walked_by_their_own_length() {
        // IPv6 -> AH (12 bytes: length field 1, in 4-byte words less two) -> UDP.
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[6] = EXT_AUTH;
        ip.extend_from_slice(&[PROTO_UDP, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
        ip.extend_from_slice(&[0, 53, 0, 53, 0, 8, 0, 0]);
        assert_eq!(walk_v6(&ip), Ok((PROTO_UDP, 52, None)));
        // IPv6 -> destination options (8 bytes: length field 0, in 8-byte words less one) -> AH.
        let mut ip2 = vec![0u8; 40];
        ip2[0] = 0x60;
        ip2[6] = EXT_DEST_OPTS;
        ip2.extend_from_slice(&[EXT_AUTH, 0, 1, 4, 0, 0, 0, 0]);
        ip2.extend_from_slice(&ip[40..]);
        assert_eq!(walk_v6(&ip2), Ok((PROTO_UDP, 60, None)));
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The layout the datapath tests' exact-bytes expectations were written against.
    #[test]
    fn builders_keep_their_exact_layout() {
        let v4 = "02000000020002000000000208004500003a12344000400614250a0000020a0000649c400050000003e8000000005018faf0214b0000474554202f20485454502f312e310d0a0d0a";
        assert_eq!(Pkt::tcp(A, 40000, B, 80).bytes(), unhex(v4));
        let v6 = "02000000020002000000000286dd6001234500153c4020010db800000000000000000000000220010db800010000000000000000001111000104000000009c410035000db7ef7175657279";
        let p6 = Pkt6 { ext: vec![Ext::options(EXT_DEST_OPTS, 0)], ..Pkt6::udp(V6_CLIENT, 40001, V6_BACKEND1, 53) };
        assert_eq!(p6.bytes(), unhex(v6));
    }

    /// Every kind of frame the builders make verifies, a flipped last byte does not, and the
    /// decoder and verifier take every truncation of each without panicking (breadth.rs tests
    /// the verifier byte by byte and the fragment helpers).
    #[test]
    fn built_frames_verify_and_every_truncation_decodes() {
        let quote = Pkt { payload: Vec::new(), ttl: 63, ..Pkt::tcp(B, 80, A, 40000) }.bytes()[14..].to_vec();
        let quote6 = Pkt6 { payload: Vec::new(), ..Pkt6::udp(V6_BACKEND1, 53, V6_CLIENT, 40001) }.bytes()[14..].to_vec();
        let frames = [
            Pkt::tcp(A, 40000, B, 80).bytes(),
            Pkt { options: vec![1; 8], tcp_flags: TCP_SYN, ..Pkt::udp(A, 40001, B, 53) }.bytes(),
            Pkt::icmp(A, B, 3, 4, [0, 0, 0x05, 0x78], &quote).bytes(),
            Pkt::icmp(A, B, 8, 0, [0, 1, 0, 1], b"ping").bytes(),
            Pkt6 { ext: vec![Ext::options(EXT_HOP_BY_HOP, 1), Ext::fragment(0, false, 9)], ..Pkt6::tcp(V6_CLIENT, 1, V6_BACKEND1, 80) }.bytes(),
            Pkt6::udp(V6_CLIENT, 40001, V6_BACKEND1, 53).bytes(),
            Pkt6::icmp(V6_CLIENT, V6_BACKEND1, 2, 0, [0, 0, 0x05, 0x00], &quote6).bytes(),
            vlan_tag(&vlan_tag(&Pkt6::tcp(V6_CLIENT, 1, V6_BACKEND1, 80).bytes(), ETH_P_8021Q, 100), ETH_P_8021AD, 200),
        ];
        for f in &frames {
            verify_checksums(f).unwrap_or_else(|e| panic!("{e}: {}", decode(f)));
            assert!(decode(f).ends_with("checksums: ok"), "{}", decode(f));
            let mut bad = f.clone();
            *bad.last_mut().unwrap() ^= 0x40;
            assert!(verify_checksums(&bad).is_err(), "flipped last byte not caught: {}", decode(&bad));
            for n in 0..f.len() {
                let _ = (decode(&f[..n]), verify_checksums(&f[..n]));
            }
        }
        let z = Pkt { udp_no_checksum: true, ..Pkt::udp(A, 1, B, 53) }.bytes();
        assert_eq!(verify_checksums(&z), Ok(()), "a zero IPv4 UDP checksum means none");
    }
}
