//! lb's XDP program: sticky (client-IP affinity) layer-4 load balancing in NAT mode.
//!
//! Pipeline per packet: `parse` (Ethernet, VLAN tags, IPv4/IPv6, TCP/UDP ports) -> service lookup
//! (`SERVICES`, `SERVICES6`) -> `select` (affinity table, Maglev on a miss) -> `nat::rewrite`
//! (addresses, ports, incremental checksums) -> `forward::forward` (FIB lookup, redirect / TX, or
//! pass to the kernel while the next hop is unresolved). Replies from backends take the same path
//! with the source rewritten back to the VIP. Later fragments follow their first fragment
//! (`FRAGS`); ICMP is handled in `icmp`. Only `lb_xdp` turns a stage's outcome into a verdict and
//! counts it.
#![no_std]
#![no_main]

mod forward;
mod icmp;
mod maps;
mod nat;
mod parse;
mod select;

use core::mem;

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::xdp,
    programs::XdpContext,
};
use aya_log_ebpf::error;
use lb_common::{
    AffinityKey, Counters, FRAG_TO_BACKEND, FRAG_TO_CLIENT,
    FragKey, FragValue, IFACE_CACHE_ENTRIES, IFACE_F_KNOWN, IFACE_F_VALID, Reverse, SVC_CACHE_ENTRIES, SVC_F_V6,
    SVC_F_VALID, Service, ServiceKey, ServiceKey6,
    hash::addr_hash,
    stat,
};
use maps::{
    BACKEND_STATS, BACKENDS, CONFIG, FRAGS, IFACE_CACHE, LOCAL_ADDRS, LOCAL_ADDRS6, REVERSE,
    REVERSE6, SCRATCH, SERVICE_STATS, SERVICES, SERVICES6, STATS, SVC_CACHE, TX_PORTS,
};
use network_types::eth::EthHdr;
use nat::Side;
use parse::{FRAG_FIRST, FRAG_LATER, Meta};

/// What a stage decided: the XDP action and the `STATS` code it is counted under, packed in one
/// register (action << 16 | stat) so that out-of-line stages can return it.
#[derive(Clone, Copy)]
pub struct Verdict(pub u32);

#[inline(always)]
pub const fn verdict(action: u32, stat: u32) -> Verdict {
    Verdict((action << 16) | stat)
}

#[inline(always)]
pub const fn pass(stat: u32) -> Verdict {
    verdict(xdp_action::XDP_PASS, stat)
}

#[inline(always)]
pub const fn drop(stat: u32) -> Verdict {
    verdict(xdp_action::XDP_DROP, stat)
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let v = process(&ctx);
    count(v.0 & 0xffff);
    v.0 >> 16
}

/// The context inside an out-of-line stage. The volatile read keeps LLVM from rewriting the stage
/// to take `data`/`data_end` instead of the context pointer (argument promotion): the verifier
/// rejects the zero-extension shifts that would then be applied to packet pointers.
#[inline(always)]
#[expect(clippy::not_unsafe_ptr_arg_deref, reason = "`raw` is always the program's own context, passed down the stages")]
pub fn ctx_of(raw: *mut xdp_md) -> XdpContext {
    // SAFETY: `raw` is the program's context; `data` is a readable field of it.
    unsafe { core::ptr::read_volatile(&(*raw).data) };
    XdpContext::new(raw)
}

/// No header of interest lies beyond this offset into the frame.
pub const MAX_PKT_OFFSET: usize = 1024;

/// A pointer to a `T` at `off` bytes into the frame, if the whole `T` lies inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    // Offsets may come from the scratch map, which the verifier knows nothing about: bound them.
    if off > MAX_PKT_OFFSET {
        return None;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn count(code: u32) {
    if let Some(p) = STATS.get_ptr_mut(code) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn bump(map: &aya_ebpf::maps::PerCpuArray<Counters>, id: u32, f: impl FnOnce(&mut Counters)) {
    if let Some(p) = map.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        f(unsafe { &mut *p });
    }
}

/// The service of (address, port, protocol): from this CPU's `SVC_CACHE`, else from the map of
/// the packet's family (and then cached). A cached copy is used while `CONFIG.svc_epoch` is the
/// one it was read under: the daemon bumps it after every service change, so a packet sees a
/// change at most one packet later than it would through the map. The reference points into
/// this CPU's cache slot: valid for this packet (one service lookup per packet).
#[inline(always)]
pub fn lookup_service(v6: bool, addr: &[u32; 4], port: u16, proto: u8, epoch: u32) -> Option<&'static Service> {
    let h = addr_hash(v6, addr) ^ (port as u32).wrapping_mul(0x9e37_79b1) ^ proto as u32;
    let e = SVC_CACHE.get_ptr_mut(h & (SVC_CACHE_ENTRIES - 1))?;
    // SAFETY: this CPU's slot; nothing else writes it while this program runs here.
    let e = unsafe { &mut *e };
    let tag = SVC_F_VALID | if v6 { SVC_F_V6 } else { 0 };
    if e.flags == tag && e.epoch == epoch && e.port == port && e.proto == proto && e.addr == *addr {
        return Some(&e.svc);
    }
    // SAFETY: the daemon replaces whole values; the value is copied at once.
    let found = unsafe {
        if v6 {
            SERVICES6.get(ServiceKey6 { addr: *addr, port, proto, _pad: 0 })
        } else {
            SERVICES.get(ServiceKey { addr: addr[0], port, proto, _pad: 0 })
        }
    };
    let svc = found?;
    e.svc = *svc;
    e.addr = *addr;
    e.port = port;
    e.proto = proto;
    e.flags = tag;
    e.epoch = epoch;
    Some(&e.svc)
}

/// What replies from backend (address, port, protocol) are translated back to.
#[inline(always)]
fn lookup_reverse(v6: bool, addr: &[u32; 4], port: u16, proto: u8) -> Option<([u32; 4], Reverse)> {
    // SAFETY: a copy is taken at once.
    unsafe {
        if v6 {
            REVERSE6.get(ServiceKey6 { addr: *addr, port, proto, _pad: 0 }).map(|r| {
                (r.vip, Reverse { vip: 0, port: r.port, _pad: 0, service_id: r.service_id, backend_id: r.backend_id, ifindex: r.ifindex })
            })
        } else {
            REVERSE.get(ServiceKey { addr: addr[0], port, proto, _pad: 0 }).map(|r| ([r.vip, 0, 0, 0], *r))
        }
    }
}

#[inline(always)]
fn is_local(v6: bool, addr: &[u32; 4]) -> bool {
    // SAFETY: presence only.
    unsafe {
        if v6 { LOCAL_ADDRS6.get(addr).is_some() } else { LOCAL_ADDRS.get(addr[0]).is_some() }
    }
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let Some(mp) = SCRATCH.get_ptr_mut(0) else {
        return drop(stat::ABORTED);
    };
    // SAFETY: this CPU's scratch slot; nothing else uses it while this program runs here.
    let m = unsafe { &mut *mp };
    if let Err(v) = parse::parse(ctx, m) {
        return v;
    }
    // Possibly ours from here on: the global settings, once per packet.
    if let Some(c) = CONFIG.get(0) {
        m.dsr = c.flags & lb_common::GLOBAL_F_DSR != 0;
        m.fib_epoch = c.fib_epoch;
        m.svc_epoch = c.svc_epoch;
        m.maglev_m = c.maglev_m;
        m.hash_seed = c.hash_seed;
        m.new_limit = c.new_pins_per_cpu;
    }
    // A frame for another host's MAC (a switch flooding it, or seen in promiscuous mode) is not
    // ours even when it is to a VIP: that host balances it.
    m.ingress = ctx.ingress_ifindex() as u32;
    if !for_this_mac(ctx, m.ingress, m.fib_epoch) {
        return pass(stat::PASS_OTHER_MAC);
    }
    // CLOCK_MONOTONIC_COARSE: no clock-source read (tick resolution, ample for timeouts and
    // cache expiry), for every stage. It only moves on a tick, when `jiffies` does too: the
    // verifier inlines `bpf_jiffies64` into a plain load, so the clock helper (a call, whose
    // return is costly on CPUs with return-stack mitigations) runs once per tick per CPU, not
    // once per packet. The value kept in this CPU's scratch slot lags the clock by at most the
    // tick it was read in.
    // SAFETY: helper calls with no side effects.
    let j = unsafe { bpf_jiffies64() };
    if j != m.now_jiffies || m.now == 0 {
        m.now = unsafe { bpf_ktime_get_coarse_ns() };
        m.now_jiffies = j;
    }
    if m.proto == parse::PROTO_ICMP || m.proto == parse::PROTO_ICMPV6 {
        return icmp::handle(ctx.ctx, m);
    }
    if m.frag == FRAG_LATER {
        return later_fragment(ctx.ctx, m);
    }
    let v = to_vip(ctx.ctx, m);
    if v.0 != NOT_A_VIP.0 {
        return v;
    }
    from_backend(ctx.ctx, m)
}

/// Whether the frame is for the ingress interface's own MAC address (always, when the interface
/// is not in `TX_PORTS`: the test harness). The address comes from this CPU's `IFACE_CACHE`, a
/// copy of `TX_PORTS` retired with the FIB cache (`CONFIG.fib_epoch`).
#[inline(always)]
fn for_this_mac(ctx: &XdpContext, ingress: u32, epoch: u32) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return true;
    };
    let Some(e) = IFACE_CACHE.get_ptr_mut(ingress & (IFACE_CACHE_ENTRIES - 1)) else {
        return true;
    };
    // SAFETY: this CPU's slot; nothing else writes it while this program runs here.
    let e = unsafe { &mut *e };
    if e.flags & IFACE_F_VALID == 0 || e.ifindex != ingress || e.epoch != epoch {
        // SAFETY: a copy is taken at once.
        match unsafe { TX_PORTS.get(ingress) } {
            Some(p) => {
                for i in 0..6 {
                    e.mac[i] = p.mac[i];
                }
                e.flags = IFACE_F_VALID | IFACE_F_KNOWN;
            }
            None => e.flags = IFACE_F_VALID,
        }
        e.ifindex = ingress;
        e.epoch = epoch;
    }
    if e.flags & IFACE_F_KNOWN == 0 {
        return true;
    }
    // A word and a half-word compared instead of six bytes (`mac` is word-aligned in the entry;
    // packet words as in `parse::load_words`).
    // SAFETY: bounds-checked above; `mac` holds 6 bytes.
    unsafe {
        let dst = eth as *const u8;
        let mac = e.mac.as_ptr();
        parse::load_word(dst) == core::ptr::read_volatile(mac as *const u32)
            && core::ptr::read_volatile(dst.add(4) as *const u16) == core::ptr::read_volatile(mac.add(4) as *const u16)
    }
}

/// Returned by `to_vip` when the packet is not to a service.
const NOT_A_VIP: Verdict = Verdict(u32::MAX);

/// Client -> VIP: check, pick the backend (affinity, else Maglev), rewrite, forward. Out of line
/// (a BPF-to-BPF call) to keep the entry function's stack small.
#[inline(never)]
fn to_vip(raw: *mut xdp_md, m: &mut Meta) -> Verdict {
    let ctx = &crate::ctx_of(raw);
    let Some(svc) = lookup_service(m.v6, &m.dst, m.dport, m.proto, m.svc_epoch) else {
        return NOT_A_VIP;
    };
    count(stat::TO_VIP);
    let flags = match parse::check_l4(ctx, m) {
        Ok(f) => f,
        Err(v) => return v,
    };
    // No client has a multicast, broadcast, unspecified, loopback or VIP source address:
    // spoofed or looping, dropped.
    if martian_source(m) {
        return drop(stat::DROP_MALFORMED);
    }
    to_backend(raw, m, svc, flags)
}

/// A source address no client can have.
#[inline(always)]
pub fn martian_source(m: &Meta) -> bool {
    let first = u32::from_be(m.src[0]);
    let bad = if m.v6 {
        // Multicast, or :: and ::1.
        first >> 24 == 0xff || (first == 0 && m.src[1] == 0 && m.src[2] == 0 && u32::from_be(m.src[3]) <= 1)
    } else {
        // 224/4 multicast, 255.255.255.255, 0/8 "this network", 127/8 loopback.
        first >> 28 == 0xe || first == u32::MAX || first >> 24 == 0 || first >> 24 == 127
    };
    bad || parse::addr_flags(m.v6, &m.src) & lb_common::ADDR_F_VIP != 0
}

/// Backend -> client, if the source is a backend's. Out of line like `to_vip`.
#[inline(never)]
fn from_backend(raw: *mut xdp_md, m: &Meta) -> Verdict {
    let ctx = &crate::ctx_of(raw);
    let Some((vip, rev)) = lookup_reverse(m.v6, &m.src, m.sport, m.proto) else {
        return pass(stat::PASS_NOT_OURS);
    };
    // A backend answering the balancer itself (health checks): not a client flow.
    if is_local(m.v6, &m.dst) {
        return pass(stat::PASS_NOT_OURS);
    }
    // A reply comes from the backend side: the interface the route to the backend leaves by.
    // A backend's address arriving anywhere else is spoofed (or looping), and is never
    // re-sourced to the VIP.
    // A tagged frame arrives on the physical interface while the route names the VLAN device
    // on top of it: not checked (see README, "Replies").
    if !m.vlan && rev.ifindex != m.ingress {
        return drop(stat::DROP_REPLY_SIDE);
    }
    if let Err(v) = parse::check_l4(ctx, m) {
        return v;
    }
    to_client(ctx, m, &vip, &rev)
}

/// The masked client address of an affinity key.
#[inline(always)]
pub fn client_key(svc: &Service, v6: bool, src: &[u32; 4]) -> AffinityKey {
    let addr = if v6 {
        [src[0] & svc.v6_mask[0], src[1] & svc.v6_mask[1], src[2] & svc.v6_mask[2], src[3] & svc.v6_mask[3]]
    } else {
        [src[0] & svc.v4_mask, 0, 0, 0]
    };
    AffinityKey { service_id: svc.id, addr }
}

/// Remembers how a first fragment was translated, for the fragments that follow.
#[inline(always)]
fn record_fragment(m: &Meta, addr: &[u32; 4], dir: u32, service_id: u32, backend_id: u32) {
    if m.frag == FRAG_FIRST {
        record_fragment_out(m, addr, dir, (service_id as u64) << 32 | backend_id as u64);
    }
}

/// Out of line: the key and value stay off the callers' stacks.
#[inline(never)]
fn record_fragment_out(m: &Meta, addr: &[u32; 4], dir: u32, ids: u64) {
    let (service_id, backend_id) = ((ids >> 32) as u32, ids as u32);
    let key = FragKey { src: m.src, dst: m.dst, id: m.frag_id, proto: m.proto, family: m.family(), _pad: 0 };
    let val = FragValue { addr: *addr, dir, service_id, backend_id, _pad: 0 };
    let _ = FRAGS.insert(key, val, 0);
}

/// Client -> VIP: pick the backend (the connection's entry, the client's pin, else Maglev; see
/// `select`), rewrite the destination, forward. Inlined into `to_vip`, with the rewrite and the
/// forwarding: an established connection's packet makes no BPF-to-BPF call past `to_vip` (each
/// call's return costs ~10 ns on CPUs with return-stack mitigations, e.g. AMD's SRSO "safe RET").
#[inline(always)]
fn to_backend(raw: *mut xdp_md, m: &mut Meta, svc: &Service, flags: u8) -> Verdict {
    let ctx = &ctx_of(raw);
    let key = client_key(svc, m.v6, &m.src);
    // Selection counts the packet and its bytes for the service and the backend.
    let picked = if m.proto == lb_common::PROTO_TCP {
        select::select_tcp(raw, m, svc, &key, flags)
    } else {
        select::place(ctx, m, svc, &key, select::WRITE_CREATE)
    };
    let backend_id = match picked {
        Ok(id) => id,
        Err(v) => return v,
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        error!(ctx, "backend id {} out of range", backend_id);
        return drop(stat::ABORTED);
    };
    let (baddr, bport) = (backend.addr, backend.port);
    record_fragment(m, &baddr, FRAG_TO_BACKEND, svc.id, backend_id);
    // DSR: the packet stays addressed to the VIP; `forward` only finds the backend's MAC.
    if !m.dsr && nat::rewrite_inner(ctx, m, Side::Dst, &baddr, bport).is_err() {
        return drop(stat::DROP_MALFORMED);
    }
    forward::forward_inner(ctx, m, &m.src, &baddr)
}

/// Backend -> client: the source becomes the VIP again.
#[inline(always)]
fn to_client(ctx: &XdpContext, m: &Meta, vip: &[u32; 4], rev: &Reverse) -> Verdict {
    let len = m.len;
    bump(&SERVICE_STATS, rev.service_id, |c| {
        c.reply_packets += 1;
        c.reply_bytes += len;
    });
    bump(&BACKEND_STATS, rev.backend_id, |c| {
        c.reply_packets += 1;
        c.reply_bytes += len;
    });
    count(stat::REPLY);
    record_fragment(m, vip, FRAG_TO_CLIENT, rev.service_id, rev.backend_id);
    if nat::rewrite_inner(ctx, m, Side::Src, vip, rev.port).is_err() {
        return drop(stat::DROP_MALFORMED);
    }
    forward::forward_inner(ctx, m, vip, &m.dst)
}

/// A fragment without the L4 header follows its first fragment's translation. Out of line (a
/// BPF-to-BPF call) to keep the entry function's stack small.
#[inline(never)]
fn later_fragment(raw: *mut xdp_md, m: &mut Meta) -> Verdict {
    let ctx = &crate::ctx_of(raw);
    let key = FragKey { src: m.src, dst: m.dst, id: m.frag_id, proto: m.proto, family: m.family(), _pad: 0 };
    // SAFETY: a copy is taken at once.
    let Some(f) = (unsafe { FRAGS.get(key) }).copied() else {
        // To a VIP: a datagram of ours whose first fragment was not seen (no backend to send
        // it to). From a backend's address to anywhere: not a reply we translated (its first
        // fragment would have been recorded), e.g. the backend's own traffic through this
        // host as its gateway: passed on untouched.
        if parse::addr_flags(m.v6, &m.dst) & lb_common::ADDR_F_VIP != 0 {
            return drop(stat::DROP_FRAG_UNPLACED);
        }
        return pass(stat::PASS_NOT_OURS);
    };
    if let Err(v) = parse::check_l4(ctx, m) {
        return v;
    }
    count(stat::FRAGMENT);
    let len = m.len;
    if f.dir == FRAG_TO_BACKEND {
        bump(&SERVICE_STATS, f.service_id, |c| {
            c.packets += 1;
            c.bytes += len;
        });
        bump(&BACKEND_STATS, f.backend_id, |c| {
            c.packets += 1;
            c.bytes += len;
        });
        if !m.dsr && !nat::rewrite(ctx.ctx, m, Side::Dst, &f.addr, 0) {
            return drop(stat::DROP_MALFORMED);
        }
        forward::forward(ctx.ctx, m, &m.src, &f.addr)
    } else {
        bump(&SERVICE_STATS, f.service_id, |c| {
            c.reply_packets += 1;
            c.reply_bytes += len;
        });
        bump(&BACKEND_STATS, f.backend_id, |c| {
            c.reply_packets += 1;
            c.reply_bytes += len;
        });
        if !nat::rewrite(ctx.ctx, m, Side::Src, &f.addr, 0) {
            return drop(stat::DROP_MALFORMED);
        }
        forward::forward(ctx.ctx, m, &f.addr, &m.dst)
    }
}

// Only for the BPF target: a host build of this crate (`cargo clippy --workspace`) links std
// through lb-common's `user` feature, which brings its own.
#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// bpf_fib_lookup and bpf_redirect need a GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
