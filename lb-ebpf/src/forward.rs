//! Sending a rewritten packet on: FIB lookup, TTL / hop limit, MACs, then TX, redirect, or the
//! kernel when the next hop is not resolved yet (or a VLAN-tagged frame must change interface).

use core::mem;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams, xdp_action, xdp_md,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{csum, stat};
use network_types::eth::EthHdr;

use crate::{Verdict, drop, maps::TX_PORTS, parse::Meta, pass, ptr_at, verdict};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Forwards the packet described by `m` (whose addresses are now `src` -> `dst`). In DSR mode the
/// packet still goes to the VIP and `dst` is the backend: the backend must be directly connected
/// (the FIB's next hop is the backend itself) and the frame is switched to it, TTL untouched.
/// Out of line (a BPF-to-BPF call): every path shares one copy and one stack frame for the FIB
/// parameters.
#[inline(never)]
pub fn forward(raw: *mut xdp_md, m: &Meta, src: &[u32; 4], dst: &[u32; 4]) -> Verdict {
    let ctx = &crate::ctx_of(raw);
    // All-zero is the struct's documented initial state. Zeroed with volatile word stores: a
    // plain zero initialisation becomes a call to a memset subprogram (~40 ns per packet).
    const _: () = assert!(mem::size_of::<FibParams>() == 64);
    let mut storage = mem::MaybeUninit::<FibParams>::uninit();
    let words = storage.as_mut_ptr() as *mut u32;
    for i in 0..16 {
        // SAFETY: 16 u32 words cover the 64-byte struct, whose alignment is 4.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte was written above; used in place (moving it would copy it again).
    let fib = unsafe { &mut *storage.as_mut_ptr() };
    fib.l4_protocol = m.proto;
    fib.__bindgen_anon_1.tot_len = m.ip_len;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    if m.v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = *src;
        fib.__bindgen_anon_4.ipv6_dst = *dst;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_2.tos = m.tos;
        fib.__bindgen_anon_3.ipv4_src = src[0];
        fib.__bindgen_anon_4.ipv4_dst = dst[0];
    }
    // SAFETY: the helper reads and writes only `fib`.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), fib as *mut FibParams, mem::size_of::<FibParams>() as i32, 0) } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            return drop(stat::DROP_FIB);
        }
        // DSR: the kernel cannot forward a packet still addressed to the VIP (it has no route
        // to it); the health checks keep the backends' neighbour entries resolved.
        _ if m.dsr => return drop(stat::DROP_FIB),
        // No neighbour entry yet, forwarding disabled, needs fragmenting, ...: the kernel knows.
        _ => return pass(stat::PASS_FIB),
    }
    let same_if = fib.ifindex == ctx.ingress_ifindex() as u32;

    if m.dsr {
        // The FIB reports the next hop in the destination fields: a gateway there means the
        // backend is not on a segment we share, and DSR cannot reach it.
        // SAFETY: plain reads of the union the helper filled.
        let nexthop_is_backend = unsafe {
            if m.v6 { fib.__bindgen_anon_4.ipv6_dst == *dst } else { fib.__bindgen_anon_4.ipv4_dst == dst[0] }
        };
        if !nexthop_is_backend {
            return drop(stat::DROP_FIB);
        }
    } else if m.vlan && !same_if {
        // A tagged frame leaving through another interface: the kernel's VLAN devices re-tag it.
        return pass(stat::PASS_VLAN);
    }
    // SAFETY: presence only.
    let attached = same_if || unsafe { TX_PORTS.get(&fib.ifindex) }.is_some();
    if !attached {
        // An interface we are not attached to (a VLAN, bridge or bond device on top of one we
        // are): it cannot transmit an XDP frame, so the kernel forwards the rewritten packet.
        return if m.dsr { drop(stat::DROP_FIB) } else { pass(stat::PASS_FIB) };
    }
    if !m.dsr && decrement_ttl(ctx, m).is_err() {
        // Expiring here (or unreadable): the kernel sends the ICMP time exceeded.
        return pass(stat::PASS_FIB);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return drop(stat::DROP_MALFORMED);
    };
    // SAFETY: bounds-checked above. Byte stores: a 6-byte array assignment becomes a call to a
    // memmove subprogram.
    unsafe {
        let e = &mut *eth;
        for i in 0..6 {
            core::ptr::write_volatile(&mut e.dst_addr[i], fib.dmac[i]);
            core::ptr::write_volatile(&mut e.src_addr[i], fib.smac[i]);
        }
    }
    if same_if {
        return verdict(xdp_action::XDP_TX, stat::TX);
    }
    // SAFETY: a helper call; it returns XDP_REDIRECT, or XDP_ABORTED for a bad ifindex.
    let action = unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
    verdict(action, stat::REDIRECT)
}

/// TTL (IPv4, with its checksum) or hop limit (IPv6) minus one, as a router does; Err when it
/// would reach zero.
#[inline(always)]
fn decrement_ttl(ctx: &XdpContext, m: &Meta) -> Result<(), ()> {
    if m.v6 {
        let ip: *mut network_types::ip::Ipv6Hdr = ptr_at(ctx, m.l3()).ok_or(())?;
        // SAFETY: bounds-checked above.
        let ip = unsafe { &mut *ip };
        if ip.hop_limit <= 1 {
            return Err(());
        }
        ip.hop_limit -= 1;
        return Ok(());
    }
    let ip: *mut network_types::ip::Ipv4Hdr = ptr_at(ctx, m.l3()).ok_or(())?;
    // SAFETY: bounds-checked above.
    let ip = unsafe { &mut *ip };
    if ip.ttl <= 1 {
        return Err(());
    }
    // TTL and protocol form one 16-bit word of the header checksum.
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = csum::replace2(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
    Ok(())
}
