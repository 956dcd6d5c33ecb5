//! Address and port rewriting with incremental checksum updates (RFC 1624), for IPv4 and IPv6.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_common::{PROTO_TCP, csum};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{parse::Meta, ptr_at};

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// Replaces the address on `side` (and the port, when the packet carries its L4 header) and
/// updates the IPv4 header checksum and the TCP/UDP checksum. A UDP checksum of 0 (IPv4: none)
/// stays 0. Each header is reached through one bounds-checked pointer: separately checked
/// pointers into the same header let LLVM merge the checks in ways the verifier cannot follow.
/// Out of line (a BPF-to-BPF call) for the rarer paths; client packets and replies inline
/// `rewrite_inner`.
#[inline(never)]
pub fn rewrite(raw: *mut xdp_md, m: &Meta, side: Side, addr: &[u32; 4], port: u16) -> bool {
    rewrite_inner(&crate::ctx_of(raw), m, side, addr, port).is_ok()
}

/// Replaces the 16-byte address at `p` by `new` (network order words) and returns the old one,
/// as word accesses (`parse::load_words`).
#[inline(always)]
pub fn swap16(p: *mut u8, new: &[u32; 4]) -> [u32; 4] {
    // SAFETY: the callers pass a field of a bounds-checked IPv6 header.
    unsafe {
        let old = crate::parse::load_words(p);
        crate::parse::store_words(p, new);
        old
    }
}

/// Applies a checksum update to the TCP/UDP header at `m.l4()` and sets its port.
#[inline(always)]
fn update_l4(ctx: &XdpContext, m: &Meta, side: Side, port: u16, f: impl Fn(u16, u16) -> u16) -> Result<(), ()> {
    if m.proto == PROTO_TCP {
        let t: *mut TcpHdr = ptr_at(ctx, m.l4()).ok_or(())?;
        // SAFETY: bounds-checked.
        let t = unsafe { &mut *t };
        let field = if side == Side::Src { &mut t.source } else { &mut t.dest };
        let old_port = u16::from_ne_bytes(*field);
        *field = port.to_ne_bytes();
        t.check = f(u16::from_ne_bytes(t.check), old_port).to_ne_bytes();
    } else {
        let u: *mut UdpHdr = ptr_at(ctx, m.l4()).ok_or(())?;
        // SAFETY: bounds-checked.
        let u = unsafe { &mut *u };
        let field = if side == Side::Src { &mut u.src } else { &mut u.dst };
        let old_port = u16::from_ne_bytes(*field);
        *field = port.to_ne_bytes();
        let c = u16::from_ne_bytes(u.check);
        // IPv4 UDP without a checksum stays without one (IPv6 UDP always has one).
        if c != 0 || m.v6 {
            u.check = csum::udp_nonzero(f(c, old_port)).to_ne_bytes();
        }
    }
    Ok(())
}

#[inline(always)]
pub fn rewrite_inner(ctx: &XdpContext, m: &Meta, side: Side, addr: &[u32; 4], port: u16) -> Result<(), ()> {
    if !m.v6 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, m.l3()).ok_or(())?;
        // SAFETY: bounds-checked.
        let ip = unsafe { &mut *ip };
        let field = if side == Side::Src { &mut ip.src_addr } else { &mut ip.dst_addr };
        // The old address is the parsed one: not read back from the packet.
        let old = if side == Side::Src { m.src[0] } else { m.dst[0] };
        // SAFETY: a field of the bounds-checked header.
        unsafe { crate::parse::store_word(field.as_mut_ptr(), addr[0]) };
        ip.check = csum::replace4(u16::from_ne_bytes(ip.check), old, addr[0]).to_ne_bytes();
        if m.has_ports() {
            update_l4(ctx, m, side, port, |c, old_port| csum::replace_addr_port(c, old, addr[0], old_port, port))?;
        }
        return Ok(());
    }
    let ip: *mut Ipv6Hdr = ptr_at(ctx, m.l3()).ok_or(())?;
    // SAFETY: bounds-checked.
    let ip = unsafe { &mut *ip };
    let field = if side == Side::Src { &mut ip.src_addr } else { &mut ip.dst_addr };
    // The old address is the parsed one: the packet's 16 bytes are only written, not read back.
    let old = if side == Side::Src { m.src } else { m.dst };
    // SAFETY: a field of the bounds-checked header.
    unsafe { crate::parse::store_words(field.as_mut_ptr(), addr) };
    if m.has_ports() {
        update_l4(ctx, m, side, port, |c, old_port| csum::replace2(csum::replace16(c, &old, addr), old_port, port))?;
    }
    Ok(())
}
