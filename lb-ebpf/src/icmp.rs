//! ICMP and ICMPv6 addressed to a VIP: echo requests are answered by the balancer; errors about a
//! VIP flow (destination unreachable / fragmentation needed / packet too big, time exceeded) are
//! sent on to the backend serving the embedded flow's client, rewritten so the backend's stack
//! recognises its own packet, which is what makes path-MTU discovery work through the balancer.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    programs::XdpContext,
};
use lb_common::{ADDR_F_VIP, PROTO_TCP, PROTO_UDP, csum, stat};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    nat::swap16,
    BACKENDS, Verdict, client_key, count, drop, forward, lookup_service, pass,
    parse::{self, FRAG_NONE, Meta, load_words},
    ptr_at, verdict,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// TTL / hop limit of the balancer's echo replies.
const REPLY_TTL: u8 = 64;

/// Out of line (a BPF-to-BPF call) to keep the entry function's stack small.
#[inline(never)]
pub fn handle(raw: *mut xdp_md, m: &mut Meta) -> Verdict {
    let ctx = &crate::ctx_of(raw);
    if parse::addr_flags(m.v6, &m.dst) & ADDR_F_VIP == 0 {
        return pass(stat::PASS_NOT_OURS);
    }
    if m.frag != FRAG_NONE {
        return drop(stat::DROP_FRAGMENT);
    }
    // Never answer (or pass on errors from) a broadcast, multicast or VIP source.
    if crate::martian_source(m) {
        return drop(stat::DROP_MALFORMED);
    }
    let frame = ctx.data_end() - ctx.data();
    if m.l3() + m.ip_len as usize > frame || (m.l3() + m.ip_len as usize) < m.l4() + 8 {
        return drop(stat::DROP_MALFORMED);
    }
    let Some(h) = ptr_at::<[u8; 2]>(ctx, m.l4()) else {
        return drop(stat::DROP_MALFORMED);
    };
    // SAFETY: bounds-checked.
    let ty = unsafe { (*h)[0] };
    let embedded = if m.v6 {
        match ty {
            ICMPV6_ECHO_REQUEST => return echo(raw, m, ICMPV6_ECHO_REPLY),
            ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED => error_v6(raw, m),
            _ => return pass(stat::PASS_NOT_OURS),
        }
    } else {
        match ty {
            ICMP_ECHO_REQUEST => return echo(raw, m, ICMP_ECHO_REPLY),
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED => error_v4(raw, m),
            _ => return pass(stat::PASS_NOT_OURS),
        }
    };
    match embedded {
        Ok(mut e) => error(raw, m, &mut e),
        Err(v) => v,
    }
}

/// Answers an echo request in place: addresses and MACs swapped, type set to the reply, fresh
/// TTL. Swapping addresses leaves every checksum as it was (sums commute).
#[inline(never)]
#[expect(clippy::manual_swap, reason = "explicit copies of header fields: no memcpy/memmove call in the BPF object")]
fn echo(raw: *mut xdp_md, m: &Meta, reply_type: u8) -> Verdict {
    let ctx = &crate::ctx_of(raw);
    let Some(icmp) = ptr_at::<[u8; 4]>(ctx, m.l4()) else { return drop(stat::DROP_MALFORMED) };
    // SAFETY: every pointer below was bounds-checked.
    unsafe {
        if m.v6 {
            let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, m.l3()) else { return drop(stat::DROP_MALFORMED) };
            let ip = &mut *ip;
            let s = ip.src_addr;
            ip.src_addr = ip.dst_addr;
            ip.dst_addr = s;
            ip.hop_limit = REPLY_TTL;
        } else {
            let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, m.l3()) else { return drop(stat::DROP_MALFORMED) };
            let ip = &mut *ip;
            let s = ip.src_addr;
            ip.src_addr = ip.dst_addr;
            ip.dst_addr = s;
            let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
            ip.ttl = REPLY_TTL;
            let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
            ip.check = csum::replace2(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
        }
        let h = &mut *icmp;
        let old = u16::from_ne_bytes([h[0], h[1]]);
        h[0] = reply_type;
        let new = u16::from_ne_bytes([h[0], h[1]]);
        let c = csum::replace2(u16::from_ne_bytes([h[2], h[3]]), old, new).to_ne_bytes();
        h[2] = c[0];
        h[3] = c[1];
        let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return drop(stat::DROP_MALFORMED) };
        let e = &mut *eth;
        let d = e.dst_addr;
        e.dst_addr = e.src_addr;
        e.src_addr = d;
    }
    verdict(xdp_action::XDP_TX, stat::ICMP_ECHO)
}

/// The embedded flow of an ICMP error: where its L4 header is and what it says.
struct Embedded {
    /// Offset of the embedded IP header and of its L4 header.
    ip: usize,
    l4: usize,
    proto: u8,
    /// Embedded source (the VIP: it was our packet) and destination (the client).
    src: [u32; 4],
    dst: [u32; 4],
    /// The backend serving the client (filled by `to_backend`).
    baddr: [u32; 4],
    bport: u16,
}

/// `to_backend` found the backend.
const PICKED: Verdict = Verdict(u32::MAX);

/// Sends an ICMP error about a VIP flow to the backend of the embedded flow's client: the
/// backend is found by `to_backend`, the message rewritten and forwarded here, so that neither
/// the rewrite's frame nor the forwarding's stacks on top of the selection's. Out of line: one
/// copy for IPv4 and IPv6.
#[inline(never)]
fn error(raw: *mut xdp_md, m: &mut Meta, e: &mut Embedded) -> Verdict {
    let v = to_backend(raw, m, e);
    if v.0 != PICKED.0 {
        return v;
    }
    // DSR: the backend's own packet came from the VIP; the error goes to it unchanged.
    if !m.dsr && !rewrite(raw, m, e, &e.baddr, e.bport) {
        return drop(stat::DROP_MALFORMED);
    }
    count(stat::ICMP_ERROR);
    forward::forward(raw, m, &m.src, &e.baddr)
}

/// The embedded flow of an ICMPv4 error, if it may be ours.
#[inline(always)]
fn error_v4(raw: *mut xdp_md, m: &Meta) -> Result<Embedded, Verdict> {
    let ctx = &crate::ctx_of(raw);
    let ip = m.l4() + 8;
    let Some(h) = ptr_at::<network_types::ip::Ipv4Hdr>(ctx, ip) else { return Err(drop(stat::DROP_MALFORMED)) };
    // SAFETY: bounds-checked.
    let h = unsafe { &*h };
    let ihl = ((h.vihl & 0x0f) as usize) * 4;
    if ihl < 20 || (h.proto != PROTO_TCP && h.proto != PROTO_UDP) {
        return Err(pass(stat::PASS_NOT_OURS));
    }
    let e = Embedded {
        ip,
        l4: ip + ihl,
        proto: h.proto,
        src: [u32::from_ne_bytes(h.src_addr), 0, 0, 0],
        dst: [u32::from_ne_bytes(h.dst_addr), 0, 0, 0],
        baddr: [0; 4],
        bport: 0,
    };
    Ok(e)
}

#[inline(always)]
fn error_v6(raw: *mut xdp_md, m: &Meta) -> Result<Embedded, Verdict> {
    let ctx = &crate::ctx_of(raw);
    let ip = m.l4() + 8;
    let Some(h) = ptr_at::<network_types::ip::Ipv6Hdr>(ctx, ip) else { return Err(drop(stat::DROP_MALFORMED)) };
    // SAFETY: bounds-checked.
    let h = unsafe { &*h };
    if h.next_hdr != PROTO_TCP && h.next_hdr != PROTO_UDP {
        return Err(pass(stat::PASS_NOT_OURS));
    }
    Ok(Embedded {
        ip,
        l4: ip + 40,
        proto: h.next_hdr,
        // SAFETY: fields of the bounds-checked embedded header.
        src: unsafe { load_words(h.src_addr.as_ptr()) },
        dst: unsafe { load_words(h.dst_addr.as_ptr()) },
        baddr: [0; 4],
        bport: 0,
    })
}

/// The backend of the embedded flow's client into `e` (`PICKED`), or the verdict. Out of line:
/// one copy for IPv4 and IPv6.
#[inline(never)]
fn to_backend(raw: *mut xdp_md, m: &mut Meta, e: &mut Embedded) -> Verdict {
    let ctx = &crate::ctx_of(raw);
    // The quoted IP header and the first 8 bytes of its L4 header must lie inside the datagram;
    // what follows it in the frame (padding) is not part of the ICMP message.
    let ip_end = m.l3() + m.ip_len as usize;
    if e.l4 + 8 > ip_end {
        return drop(stat::DROP_MALFORMED);
    }
    let Some(ports) = ptr_at::<[u16; 4]>(ctx, e.l4) else { return drop(stat::DROP_MALFORMED) };
    // SAFETY: bounds-checked.
    let sport = unsafe { (*ports)[0] };
    // The embedded packet went VIP:port -> client: its source names the service.
    let Some(svc) = lookup_service(m.v6, &e.src, sport, e.proto, m.svc_epoch) else {
        return pass(stat::PASS_NOT_OURS);
    };
    let key = client_key(svc, m.v6, &e.dst);
    // The quoted packet went to the client's port: with TCP, that names its connection.
    // SAFETY: bounds-checked above.
    let cport = if e.proto == PROTO_TCP { unsafe { (*ports)[1] } } else { 0 };
    let fk = lb_common::FlowKey { service_id: svc.id, addr: e.dst, port: cport, _pad: 0 };
    let r = crate::select::peek(ctx.ctx, m, svc, &key, &fk);
    if r >> 32 == 0 {
        return Verdict(r as u32);
    }
    let backend_id = r as u32;
    let Some(b) = BACKENDS.get(backend_id) else { return drop(stat::ABORTED) };
    e.baddr = b.addr;
    e.bport = b.port;
    PICKED
}

/// Outer destination VIP -> backend; embedded source VIP:port -> backend:port, with the outer
/// IPv4 checksum, the embedded IPv4 and L4 checksums and the ICMP checksum (over its payload, and
/// for ICMPv6 the outer pseudo-header) all updated incrementally. One bounds-checked pointer per
/// header (see `nat::rewrite`). Out of line, called from `error` after the selection returned:
/// its frame does not add to the selection's.
#[inline(always)]
fn rewrite(raw: *mut xdp_md, m: &Meta, e: &Embedded, baddr: &[u32; 4], bport: u16) -> bool {
    if m.v6 { rewrite_v6(raw, m, e, baddr, bport) } else { rewrite_v4(raw, m, e, baddr, bport) }
}

/// One out-of-line copy per family, so that neither frame holds the other's locals.
#[inline(never)]
fn rewrite_v4(raw: *mut xdp_md, m: &Meta, e: &Embedded, baddr: &[u32; 4], bport: u16) -> bool {
    rewrite_v4_inner(&crate::ctx_of(raw), m, e, baddr, bport).is_ok()
}

#[inline(never)]
fn rewrite_v6(raw: *mut xdp_md, m: &Meta, e: &Embedded, baddr: &[u32; 4], bport: u16) -> bool {
    rewrite_v6_inner(&crate::ctx_of(raw), m, e, baddr, bport).is_ok()
}

#[inline(always)]
fn rewrite_v4_inner(ctx: &XdpContext, m: &Meta, e: &Embedded, baddr: &[u32; 4], bport: u16) -> Result<(), ()> {
    let icmp: *mut [u8; 4] = ptr_at(ctx, m.l4()).ok_or(())?;
    let quote: *mut [u16; 4] = ptr_at(ctx, e.l4).ok_or(())?;
    // SAFETY: every pointer was bounds-checked.
    unsafe {
        let h = &mut *icmp;
        let q = &mut *quote;
        let mut ic = u16::from_ne_bytes([h[2], h[3]]);
        let old_port = q[0];
        q[0] = bport;
        ic = csum::replace2(ic, old_port, bport);
        let outer: *mut Ipv4Hdr = ptr_at(ctx, m.l3()).ok_or(())?;
        let outer = &mut *outer;
        let old = u32::from_ne_bytes(outer.dst_addr);
        outer.dst_addr = baddr[0].to_ne_bytes();
        outer.check = csum::replace4(u16::from_ne_bytes(outer.check), old, baddr[0]).to_ne_bytes();
        let inner: *mut Ipv4Hdr = ptr_at(ctx, e.ip).ok_or(())?;
        let inner = &mut *inner;
        let old_src = u32::from_ne_bytes(inner.src_addr);
        inner.src_addr = baddr[0].to_ne_bytes();
        ic = csum::replace4(ic, old_src, baddr[0]);
        let c0 = u16::from_ne_bytes(inner.check);
        let c1 = csum::replace4(c0, old_src, baddr[0]);
        inner.check = c1.to_ne_bytes();
        ic = csum::replace2(ic, c0, c1);
        // The embedded L4 checksum, when the quote holds it.
        if e.proto == PROTO_UDP {
            let c0 = q[3];
            if c0 != 0 {
                let c1 = csum::udp_nonzero(csum::replace_addr_port(c0, old_src, baddr[0], old_port, bport));
                q[3] = c1;
                ic = csum::replace2(ic, c0, c1);
            }
        } else if e.l4 + 18 <= m.l3() + m.ip_len as usize
            && let Some(t) = ptr_at::<TcpHdr>(ctx, e.l4)
        {
            let t = &mut *t;
            let c0 = u16::from_ne_bytes(t.check);
            let c1 = csum::replace_addr_port(c0, old_src, baddr[0], old_port, bport);
            t.check = c1.to_ne_bytes();
            ic = csum::replace2(ic, c0, c1);
        }
        let c = ic.to_ne_bytes();
        h[2] = c[0];
        h[3] = c[1];
    }
    Ok(())
}

#[inline(always)]
fn rewrite_v6_inner(ctx: &XdpContext, m: &Meta, e: &Embedded, baddr: &[u32; 4], bport: u16) -> Result<(), ()> {
    let icmp: *mut [u8; 4] = ptr_at(ctx, m.l4()).ok_or(())?;
    let quote: *mut [u16; 4] = ptr_at(ctx, e.l4).ok_or(())?;
    // SAFETY: every pointer was bounds-checked.
    unsafe {
        let h = &mut *icmp;
        let q = &mut *quote;
        let mut ic = u16::from_ne_bytes([h[2], h[3]]);
        let old_port = q[0];
        q[0] = bport;
        ic = csum::replace2(ic, old_port, bport);
        let outer: *mut Ipv6Hdr = ptr_at(ctx, m.l3()).ok_or(())?;
        let outer = &mut *outer;
        let d_dst = csum::delta16(&swap16(outer.dst_addr.as_mut_ptr(), baddr), baddr);
        // ICMPv6 covers the outer pseudo-header.
        ic = csum::apply(ic, d_dst);
        let inner: *mut Ipv6Hdr = ptr_at(ctx, e.ip).ok_or(())?;
        let inner = &mut *inner;
        let d_src = csum::delta16(&swap16(inner.src_addr.as_mut_ptr(), baddr), baddr);
        ic = csum::apply(ic, d_src);
        let l4_update = |c0: u16| {
            let c1 = csum::replace2(csum::apply(c0, d_src), old_port, bport);
            if e.proto == PROTO_UDP { csum::udp_nonzero(c1) } else { c1 }
        };
        if e.proto == PROTO_UDP {
            let c0 = q[3];
            let c1 = l4_update(c0);
            q[3] = c1;
            ic = csum::replace2(ic, c0, c1);
        } else if e.l4 + 18 <= m.l3() + m.ip_len as usize
            && let Some(t) = ptr_at::<TcpHdr>(ctx, e.l4)
        {
            let t = &mut *t;
            let c0 = u16::from_ne_bytes(t.check);
            let c1 = l4_update(c0);
            t.check = c1.to_ne_bytes();
            ic = csum::replace2(ic, c0, c1);
        }
        let c = ic.to_ne_bytes();
        h[2] = c[0];
        h[3] = c[1];
    }
    Ok(())
}

