//! Parsing with a cursor: Ethernet (up to two VLAN tags), IPv4 (any IHL) or IPv6 (extension
//! headers up to a fixed bound), and the TCP/UDP ports. Every access is bounds-checked by
//! `ptr_at`; later stages read the `Meta` instead of parsing again.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_common::{ADDR_F_BACKEND, ADDR_F_VIP, AddrKey, PROTO_TCP, PROTO_UDP, addr_filter_bit, stat};
use network_types::eth::EthHdr;

use crate::{
    Verdict,
    maps::{ADDR_FILTER, ADDRS},
    pass, ptr_at,
};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const ETH_P_IPV4: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();
/// IPv6 extension headers skipped before giving up (the packet then counts as malformed if it is
/// ours, not ours otherwise).
pub const MAX_EXT_HEADERS: usize = 6;
/// No header of interest lies beyond this offset (bounds the verifier's view of the cursor).
const MAX_L4_OFFSET: usize = 512;

/// Fragment position of a packet.
pub const FRAG_NONE: u8 = 0;
/// First fragment: carries the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment: no L4 header.
pub const FRAG_LATER: u8 = 2;

#[derive(Default)]
pub struct Meta {
    /// Offset of the IP header (after Ethernet and any VLAN tags). 16 bits wide: read back from the
    /// scratch map, a zero-extended u16 is provably non-negative to the verifier.
    pub l3: u16,
    /// Offset of the L4 header (of the fragment's data for later fragments).
    pub l4: u16,
    pub v6: bool,
    pub vlan: bool,
    /// Direct server return (`GLOBAL_F_DSR`): only MACs change; set by the entry function.
    pub dsr: bool,
    pub proto: u8,
    /// Addresses as in the packet (network order words; IPv4 uses [0]).
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Ports as in the packet (network order); 0 without an L4 header.
    pub sport: u16,
    pub dport: u16,
    pub frag: u8,
    /// IPv4 identification or IPv6 fragment identification.
    pub frag_id: u32,
    /// IPv4 total length or IPv6 payload length + 40, host order.
    pub ip_len: u16,
    pub tos: u8,
    /// Frame length, for byte counters.
    pub len: u64,
    /// CLOCK_MONOTONIC_COARSE ns, read once per packet of ours (pins, FIB cache expiry).
    pub now: u64,
    /// `CONFIG`'s cache epochs, read once per packet of ours with the DSR flag.
    pub fib_epoch: u32,
    pub svc_epoch: u32,
    /// The ingress interface, read from the context once per packet of ours.
    pub ingress: u32,
    /// `jiffies` when `now` was read: `now` is read again (a helper call) only when a tick has
    /// passed since, so most packets take the clock from this CPU's scratch slot.
    pub now_jiffies: u64,
    /// `CONFIG`'s Maglev size, client hash seed and new-pin limit, read once per packet of ours.
    pub maglev_m: u32,
    pub hash_seed: u32,
    pub new_limit: u32,
    /// This CPU's new-pin guard: the second (ns >> 30) it counts, and what it counted in it.
    /// Kept across packets in this CPU's scratch slot.
    pub guard_window: u32,
    pub guard_count: u32,
}

impl Meta {
    #[inline(always)]
    pub fn l3(&self) -> usize {
        self.l3 as usize
    }

    #[inline(always)]
    pub fn l4(&self) -> usize {
        self.l4 as usize
    }

    pub fn family(&self) -> u8 {
        if self.v6 { lb_common::FAMILY_V6 } else { lb_common::FAMILY_V4 }
    }

    pub fn has_ports(&self) -> bool {
        self.frag != FRAG_LATER && (self.proto == PROTO_TCP || self.proto == PROTO_UDP)
    }
}

/// Whether `ADDR_FILTER` may hold the address: false means it is in no `ADDRS` entry (neither a
/// VIP nor a backend), known without a hash-map lookup.
#[inline(always)]
pub fn maybe_listed(v6: bool, addr: &[u32; 4]) -> bool {
    let (word, bit) = addr_filter_bit(v6, addr);
    ADDR_FILTER.get(word).is_some_and(|w| *w & (1u64 << bit) != 0)
}

/// `ADDRS` flags of an address (0 when it is neither a VIP nor a backend).
#[inline(always)]
pub fn addr_flags(v6: bool, addr: &[u32; 4]) -> u32 {
    if !maybe_listed(v6, addr) {
        return 0;
    }
    let key = AddrKey { addr: *addr, family: if v6 { 6 } else { 4 } };
    // SAFETY: a copy is read at once.
    unsafe { ADDRS.get(key) }.copied().unwrap_or(0)
}

/// Whether a packet we could not fully parse is ours (to a VIP or from a backend).
#[inline(always)]
pub fn is_ours(v6: bool, src: &[u32; 4], dst: &[u32; 4]) -> bool {
    addr_flags(v6, dst) & ADDR_F_VIP != 0 || addr_flags(v6, src) & ADDR_F_BACKEND != 0
}

#[inline(always)]
fn malformed_unless_ours(v6: bool, src: &[u32; 4], dst: &[u32; 4]) -> Verdict {
    if is_ours(v6, src, dst) {
        crate::drop(stat::DROP_MALFORMED)
    } else {
        pass(stat::PASS_MALFORMED)
    }
}

/// The 16 bytes at `p` (an address field of a bounds-checked packet header) as four 32-bit loads
/// rather than sixteen byte loads: LLVM's BPF backend splits every access it cannot prove aligned
/// into bytes, while the kernel lets programs load packet words at any offset: the verifier
/// checks packet alignment only in strict mode (`BPF_F_STRICT_ALIGNMENT`, which lb does not ask
/// for, or an architecture without efficient unaligned access, where the load of the program
/// would fail with the verifier's message; x86-64 and arm64 are not such). C XDP programs get
/// the same loads from `struct in6_addr`'s `u32` members.
///
/// # Safety
/// `p` must point at 16 readable bytes of the packet.
#[inline(always)]
#[allow(clippy::cast_ptr_alignment)]
pub unsafe fn load_words(p: *const u8) -> [u32; 4] {
    let w = p as *const u32;
    // SAFETY: see above; volatile keeps LLVM from splitting the loads by the alignment it sees.
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    }
}

/// The 4 bytes at `p` (a packet field) as one 32-bit load (see `load_words`).
///
/// # Safety
/// `p` must point at 4 readable bytes of the packet.
#[inline(always)]
#[allow(clippy::cast_ptr_alignment)]
pub unsafe fn load_word(p: *const u8) -> u32 {
    // SAFETY: see `load_words`.
    unsafe { core::ptr::read_volatile(p as *const u32) }
}

/// Writes `v` to the 4 bytes at `p` as one 32-bit store (see `load_words`).
///
/// # Safety
/// `p` must point at 4 writable bytes of the packet.
#[inline(always)]
#[allow(clippy::cast_ptr_alignment)]
pub unsafe fn store_word(p: *mut u8, v: u32) {
    // SAFETY: see `load_words`.
    unsafe { core::ptr::write_volatile(p as *mut u32, v) }
}

/// Writes `v` to the 16 bytes at `p` as four 32-bit stores (see `load_words`).
///
/// # Safety
/// `p` must point at 16 writable bytes of the packet.
#[inline(always)]
#[allow(clippy::cast_ptr_alignment)]
pub unsafe fn store_words(p: *mut u8, v: &[u32; 4]) {
    let w = p as *mut u32;
    // SAFETY: see `load_words`.
    unsafe {
        for (i, x) in v.iter().enumerate() {
            core::ptr::write_volatile(w.add(i), *x);
        }
    }
}

/// Fills `m` from the packet.
#[inline(always)]
pub fn parse(ctx: &XdpContext, m: &mut Meta) -> Result<(), Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(pass(stat::PASS_MALFORMED))?;
    // SAFETY: bounds-checked by ptr_at.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    let mut vlan = false;
    // One 802.1Q tag, or an 802.1ad outer tag with an 802.1Q inner one; the tags stay in place.
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let tag: *const [u16; 2] = ptr_at(ctx, l3).ok_or(pass(stat::PASS_MALFORMED))?;
        ether_type = unsafe { (*tag)[1] };
        l3 += 4;
        vlan = true;
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    if ether_type == ETH_P_IPV4 || ether_type == ETH_P_IPV6 {
        m.len = len;
        m.vlan = vlan;
        m.v6 = ether_type == ETH_P_IPV6;
        let v = parse_ip(ctx, l3, m);
        if v.0 == PARSED.0 { Ok(()) } else { Err(v) }
    } else {
        Err(pass(stat::PASS_NOT_OURS))
    }
}

/// `parse_v6` succeeded.
const PARSED: Verdict = Verdict(u32::MAX);

/// IPv4, or IPv6 with its extension headers, written straight into `m` (the scratch map: no
/// copy of the parsed packet on the stack). Returns `PARSED` or the verdict.
#[inline(always)]
fn parse_ip(ctx: &XdpContext, l3: usize, m: &mut Meta) -> Verdict {
    let parsed = if m.v6 {
        let v = parse_v6(ctx.ctx, l3, m);
        if v.0 == PARSED.0 { Ok(()) } else { Err(v) }
    } else {
        parse_v4(ctx, l3, m)
    };
    match parsed {
        // Neither to a VIP nor from a backend (nor anything that could be ours: ICMP to a VIP,
        // fragments of our datagrams): not ours, told by two filter bits instead of map lookups.
        Ok(()) if !maybe_listed(m.v6, &m.dst) && !maybe_listed(m.v6, &m.src) => pass(stat::PASS_NOT_OURS),
        Ok(()) => PARSED,
        Err(v) => v,
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize, m: &mut Meta) -> Result<(), Verdict> {
    let ip: *const network_types::ip::Ipv4Hdr = ptr_at(ctx, l3).ok_or(pass(stat::PASS_MALFORMED))?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    let proto = ip.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        return Err(pass(stat::PASS_NOT_OURS));
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 {
        return Err(pass(stat::PASS_MALFORMED));
    }
    let frags = u16::from_be_bytes(ip.frags);
    let frag = if frags & 0x1fff != 0 {
        FRAG_LATER
    } else if frags & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    m.l3 = l3 as u16;
    m.l4 = (l3 + ihl) as u16;
    m.proto = proto;
    // SAFETY: fields of the bounds-checked header; word loads as in `load_words`.
    unsafe {
        m.src = [load_word(ip.src_addr.as_ptr()), 0, 0, 0];
        m.dst = [load_word(ip.dst_addr.as_ptr()), 0, 0, 0];
    }
    m.sport = 0;
    m.dport = 0;
    m.frag = frag;
    m.frag_id = u16::from_be_bytes(ip.id) as u32;
    m.ip_len = u16::from_be_bytes(ip.tot_len);
    m.tos = ip.tos;
    read_ports(ctx, m)
}

/// IPv6 with its extension headers, out of line (a BPF-to-BPF call): the entry function's stack
/// stays small. Returns `PARSED` or the verdict.
#[inline(never)]
fn parse_v6(raw: *mut xdp_md, l3: usize, m: &mut Meta) -> Verdict {
    match parse_v6_inner(&crate::ctx_of(raw), l3, m) {
        Ok(()) => PARSED,
        Err(v) => v,
    }
}

#[inline(always)]
fn parse_v6_inner(ctx: &XdpContext, l3: usize, m: &mut Meta) -> Result<(), Verdict> {
    let ip: *const network_types::ip::Ipv6Hdr = ptr_at(ctx, l3).ok_or(pass(stat::PASS_MALFORMED))?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(pass(stat::PASS_MALFORMED));
    }
    // Straight into the scratch slot: no copies on the stack.
    // SAFETY: fields of the bounds-checked header.
    unsafe {
        m.src = load_words(ip.src_addr.as_ptr());
        m.dst = load_words(ip.dst_addr.as_ptr());
    }
    let mut next = ip.next_hdr;
    let mut off = l3 + 40;
    let mut frag = FRAG_NONE;
    let mut frag_id = 0u32;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        i += 1;
        if off > MAX_L4_OFFSET {
            return Err(malformed_unless_ours(true, &m.src, &m.dst));
        }
        match next {
            // A routing header with segments left: the destination field is not the final
            // destination, which the L4 checksum covers. Ours (to a VIP) is malformed: a rewrite
            // would leave a wrong checksum; otherwise not ours.
            43 => {
                let Some(h) = ptr_at::<[u8; 4]>(ctx, off) else {
                    return Err(malformed_unless_ours(true, &m.src, &m.dst));
                };
                let h = unsafe { *h };
                if h[3] != 0 {
                    return Err(malformed_unless_ours(true, &m.src, &m.dst));
                }
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            // Hop-by-hop, destination options (and routing, above): length in 8-byte units, not
            // counting the first 8 bytes.
            0 | 60 => {
                let Some(h) = ptr_at::<[u8; 2]>(ctx, off) else {
                    return Err(malformed_unless_ours(true, &m.src, &m.dst));
                };
                let h = unsafe { *h };
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            // Authentication header: length in 4-byte units, minus 2.
            51 => {
                let Some(h) = ptr_at::<[u8; 2]>(ctx, off) else {
                    return Err(malformed_unless_ours(true, &m.src, &m.dst));
                };
                let h = unsafe { *h };
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            44 => {
                let Some(h) = ptr_at::<[u8; 8]>(ctx, off) else {
                    return Err(malformed_unless_ours(true, &m.src, &m.dst));
                };
                let h = unsafe { *h };
                next = h[0];
                let fo = u16::from_be_bytes([h[2], h[3]]);
                frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                off += 8;
                if fo >> 3 != 0 {
                    frag = FRAG_LATER;
                    break;
                }
                if fo & 1 != 0 {
                    frag = FRAG_FIRST;
                }
            }
            _ => break,
        }
    }
    // Bounds the cursor for the verifier (and lets it prune the paths through the loop).
    if off > MAX_L4_OFFSET {
        return Err(malformed_unless_ours(true, &m.src, &m.dst));
    }
    if matches!(next, 0 | 43 | 60 | 51 | 44) && frag != FRAG_LATER {
        // A chain longer than the bound.
        return Err(malformed_unless_ours(true, &m.src, &m.dst));
    }
    if next != PROTO_TCP && next != PROTO_UDP && next != PROTO_ICMPV6 {
        return Err(pass(stat::PASS_NOT_OURS));
    }
    m.l3 = l3 as u16;
    m.l4 = off as u16;
    m.proto = next;
    m.sport = 0;
    m.dport = 0;
    m.frag = frag;
    m.frag_id = frag_id;
    m.ip_len = u16::from_be_bytes(ip.payload_len).wrapping_add(40);
    m.tos = ((ip.vcf[0] & 0x0f) << 4) | (ip.vcf[1] >> 4);
    read_ports(ctx, m)
}

/// Reads the ports of a TCP/UDP packet that has its L4 header; a packet too short for them passes
/// untouched when it is not ours and is dropped when its addresses say it is (to a VIP, from a
/// backend).
#[inline(always)]
fn read_ports(ctx: &XdpContext, m: &mut Meta) -> Result<(), Verdict> {
    if !m.has_ports() {
        return Ok(());
    }
    // The ports must lie inside the datagram (not in padding after it) and inside the frame.
    if m.l4() > MAX_L4_OFFSET || m.l4() + 4 > m.l3() + m.ip_len as usize {
        return Err(malformed_unless_ours(m.v6, &m.src, &m.dst));
    }
    let Some(p) = ptr_at::<[u16; 2]>(ctx, m.l4()) else {
        return Err(malformed_unless_ours(m.v6, &m.src, &m.dst));
    };
    // SAFETY: bounds-checked by ptr_at.
    let p = unsafe { *p };
    m.sport = p[0];
    m.dport = p[1];
    Ok(())
}

/// A packet of ours must hold its whole L4 header, and its IP length must cover the headers and
/// fit in the frame. An IPv6 UDP datagram must carry a checksum (RFC 8200). Ok holds the TCP
/// flags (0 for UDP and later fragments).
#[inline(always)]
pub fn check_l4(ctx: &XdpContext, m: &Meta) -> Result<u8, Verdict> {
    let frame = ctx.data_end() - ctx.data();
    let ip_end = m.l3() + m.ip_len as usize;
    if ip_end > frame || ip_end < m.l4() {
        return Err(crate::drop(stat::DROP_MALFORMED));
    }
    if m.frag == FRAG_LATER {
        return Ok(0);
    }
    let hdr = if m.proto == PROTO_TCP { 20 } else { 8 };
    if ip_end < m.l4() + hdr {
        return Err(crate::drop(stat::DROP_MALFORMED));
    }
    if m.proto == PROTO_TCP {
        return match ptr_at::<[u8; 20]>(ctx, m.l4()) {
            // SAFETY: bounds-checked by ptr_at.
            Some(h) => Ok(unsafe { (*h)[13] }),
            None => Err(crate::drop(stat::DROP_MALFORMED)),
        };
    }
    match ptr_at::<[u16; 4]>(ctx, m.l4()) {
        // SAFETY: bounds-checked by ptr_at.
        Some(u) if !(m.v6 && unsafe { (*u)[3] } == 0) => Ok(0),
        _ => Err(crate::drop(stat::DROP_MALFORMED)),
    }
}
