//! Sending a rewritten packet on: next hop (from the per-CPU FIB cache, else `bpf_fib_lookup`),
//! TTL / hop limit, MACs, then TX, redirect, or the kernel when the next hop is not resolved yet
//! (or a VLAN-tagged frame must change interface).

use core::mem;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams, xdp_action, xdp_md,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    FIB_CACHE_ENTRIES, FIB_CACHE_TTL_NS, FIB_F_ATTACHED, FIB_F_DIRECT, FIB_F_V6, FIB_F_VALID, FibCacheEntry, csum,
    hash::addr_hash, stat,
};
use network_types::eth::EthHdr;

use crate::{
    Verdict, drop,
    maps::{FIB_CACHE, TX_PORTS},
    parse::Meta,
    pass, ptr_at, verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Forwards the packet described by `m` (whose addresses are now `src` -> `dst`). In DSR mode the
/// packet still goes to the VIP and `dst` is the backend: the backend must be directly connected
/// (the FIB's next hop is the backend itself) and the frame is switched to it, TTL untouched.
///
/// The next hop comes from this CPU's `FIB_CACHE` slot for `dst` when that holds a lookup for
/// `dst` from this ingress interface, younger than `FIB_CACHE_TTL_NS`, made under the current
/// `fib_epoch`, for a route whose MTU the packet fits; otherwise from `bpf_fib_lookup`, whose
/// success refills the slot. The cache assumes the route to a destination does not depend on the
/// packet's source address or TOS (no source policy routing toward backends and clients; on a
/// multipath route every source takes the path the lookup that filled the entry took).
/// Out of line (a BPF-to-BPF call) for the rarer paths (ICMP errors, later fragments), which
/// share one copy; client packets and replies inline `forward_inner`.
#[inline(never)]
pub fn forward(raw: *mut xdp_md, m: &Meta, src: &[u32; 4], dst: &[u32; 4]) -> Verdict {
    forward_inner(&crate::ctx_of(raw), m, src, dst)
}

#[inline(always)]
pub fn forward_inner(ctx: &XdpContext, m: &Meta, src: &[u32; 4], dst: &[u32; 4]) -> Verdict {
    let ingress = m.ingress;
    // The ingress interface is part of the tag: mixed into the slot, so that one destination
    // reached from two interfaces does not take turns in one slot.
    let slot = (addr_hash(m.v6, dst) ^ ingress.wrapping_mul(0x9e37_79b1)) & (FIB_CACHE_ENTRIES - 1);
    let Some(e) = FIB_CACHE.get_ptr_mut(slot) else {
        return drop(stat::ABORTED);
    };
    // SAFETY: this CPU's slot; nothing else writes it while this program runs here.
    let e = unsafe { &mut *e };
    let now = m.now;
    let epoch = m.fib_epoch;
    let tag = FIB_F_VALID | if m.v6 { FIB_F_V6 } else { 0 };
    let same_dst = e.flags & (FIB_F_VALID | FIB_F_V6) == tag && e.addr == *dst && e.in_ifindex == ingress;
    if !(same_dst && e.epoch == epoch && now < e.expires_ns && m.ip_len <= e.mtu) {
        let v = lookup(ctx, m, src, dst, e, same_dst);
        if v.0 != FILLED.0 {
            return v;
        }
        e.expires_ns = now + FIB_CACHE_TTL_NS;
        e.epoch = epoch;
    }
    send(ctx, m, e)
}

/// `lookup` refilled the cache entry.
const FILLED: Verdict = Verdict(u32::MAX);

/// `bpf_fib_lookup` for the packet; on success its result goes into `e` (all but the expiry and
/// epoch) and `FILLED` is returned, else the verdict for the packet. A failed lookup for the
/// entry's own destination empties it (unless the packet was merely too big for the route).
#[inline(always)]
fn lookup(ctx: &XdpContext, m: &Meta, src: &[u32; 4], dst: &[u32; 4], e: &mut FibCacheEntry, same_dst: bool) -> Verdict {
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
    fib.ifindex = m.ingress;
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
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        if same_dst && rc != BPF_FIB_LKUP_RET_FRAG_NEEDED {
            e.flags = 0;
        }
        return match rc {
            BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
                drop(stat::DROP_FIB)
            }
            // DSR: the kernel cannot forward a packet still addressed to the VIP (it has no route
            // to it); the health checks keep the backends' neighbour entries resolved.
            _ if m.dsr => drop(stat::DROP_FIB),
            // No neighbour entry yet, forwarding disabled, needs fragmenting, ...: the kernel knows.
            _ => pass(stat::PASS_FIB),
        };
    }
    // The FIB reports the next hop in the destination fields: the destination itself unless a
    // gateway is on the way.
    // SAFETY: plain reads of the unions the helper filled.
    let direct = unsafe {
        if m.v6 { fib.__bindgen_anon_4.ipv6_dst == *dst } else { fib.__bindgen_anon_4.ipv4_dst == dst[0] }
    };
    // SAFETY: presence only.
    let attached = unsafe { TX_PORTS.get(fib.ifindex) }.is_some();
    // On success the helper leaves the route's MTU where tot_len was (kernel 5.12+); the packet
    // fitted it, whatever an older kernel leaves there.
    // SAFETY: a plain read of the union the helper filled.
    let mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
    e.addr = *dst;
    e.in_ifindex = m.ingress;
    e.ifindex = fib.ifindex;
    e.mtu = if mtu < m.ip_len { m.ip_len } else { mtu };
    e.flags = FIB_F_VALID
        | if m.v6 { FIB_F_V6 } else { 0 }
        | if direct { FIB_F_DIRECT } else { 0 }
        | if attached { FIB_F_ATTACHED } else { 0 };
    for i in 0..6 {
        e.dmac[i] = fib.dmac[i];
        e.smac[i] = fib.smac[i];
    }
    FILLED
}

/// Sends the packet to the next hop `e` describes.
#[inline(always)]
fn send(ctx: &XdpContext, m: &Meta, e: &FibCacheEntry) -> Verdict {
    // The entry is for this ingress interface.
    let same_if = e.ifindex == e.in_ifindex;
    if m.dsr {
        // A gateway on the way means the backend is not on a segment we share: DSR cannot
        // reach it.
        if e.flags & FIB_F_DIRECT == 0 {
            return drop(stat::DROP_FIB);
        }
    } else if m.vlan && !same_if {
        // A tagged frame leaving through another interface: the kernel's VLAN devices re-tag it.
        return pass(stat::PASS_VLAN);
    }
    if !same_if && e.flags & FIB_F_ATTACHED == 0 {
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
    // The entry keeps the two MACs back to back, word-aligned, in frame order: three word copies
    // (a 6-byte array assignment would become a call to a memmove subprogram, byte stores twelve
    // accesses).
    // SAFETY: the Ethernet header was bounds-checked above; `dmac` and `smac` are 12 contiguous
    // bytes of the entry (`lb_common::FIB_MACS_OFFSET`).
    unsafe {
        let from = e.dmac.as_ptr() as *const u32;
        let to = eth as *mut u8;
        for i in 0..3 {
            crate::parse::store_word(to.add(4 * i), core::ptr::read_volatile(from.add(i)));
        }
    }
    if same_if {
        return verdict(xdp_action::XDP_TX, stat::TX);
    }
    // SAFETY: a helper call; it returns XDP_REDIRECT, or XDP_ABORTED for a bad ifindex.
    let action = unsafe { bpf_redirect(e.ifindex, 0) } as u32;
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
