//! lb's XDP program: sticky (client-IP affinity) layer-4 load balancing in NAT mode.
//!
//! Pipeline per packet: `parse` -> service lookup (`SERVICES`) -> `select` (affinity table, Maglev
//! on a miss) -> `rewrite` (addresses, ports, incremental checksums) -> `forward` (FIB lookup,
//! redirect / TX, or pass to the kernel while the next hop is unresolved). Replies from backends
//! take the same path with the source rewritten back to the VIP. Only `lb_xdp` turns a stage's
//! outcome into a verdict and counts it.
#![no_std]
#![no_main]

mod maps;

use core::mem;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect},
    macros::xdp,
    programs::XdpContext,
};
use aya_log_ebpf::error;
use lb_common::{
    AffinityKey, AffinityValue, BACKEND_F_IN_USE, BACKEND_F_UP, Counters, LAST_SEEN_REFRESH_NS,
    PROTO_TCP, PROTO_UDP, SERVICE_F_FAIL_OPEN, ServiceKey, csum, hash::client_slot, maglev_index,
    maglev_slot_id, stat,
};
use maps::{
    AFFINITY, BACKEND_STATS, BACKENDS, CONFIG, LOCAL_ADDRS, MAGLEV, REVERSE, SERVICE_STATS,
    SERVICES, STATS,
};
use network_types::eth::{EthHdr, EtherType};

const ETH_LEN: usize = EthHdr::LEN;
const ETH_P_IPV4: u16 = EtherType::Ipv4 as u16;
const AF_INET: u8 = 2;
/// Offsets inside the IPv4 header.
const IP_TTL: usize = 8;
const IP_CHECK: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
/// IPv4 flags/fragment offset field, host order: MF bit and offset bits.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// What a stage decided: the XDP action and the `STATS` code it is counted under.
struct Verdict {
    action: u32,
    stat: u32,
}

#[inline(always)]
const fn verdict(action: u32, stat: u32) -> Verdict {
    Verdict { action, stat }
}

#[inline(always)]
const fn pass(stat: u32) -> Verdict {
    verdict(xdp_action::XDP_PASS, stat)
}

#[inline(always)]
const fn drop(stat: u32) -> Verdict {
    verdict(xdp_action::XDP_DROP, stat)
}

/// What the later stages read instead of re-parsing the packet.
struct PacketMeta {
    /// Offset of the TCP/UDP header (Ethernet + IPv4 header with options).
    l4_off: usize,
    proto: u8,
    /// Addresses and ports as in the packet (network order).
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    /// IPv4 total length, host order.
    tot_len: u16,
    tos: u8,
    /// Frame length, for byte counters.
    len: u64,
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let v = process(&ctx);
    count(v.stat);
    v.action
}

/// A pointer to a `T` at `off` bytes into the frame, if the whole `T` lies inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn count(code: u32) {
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

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let meta = match parse(ctx) {
        Ok(m) => m,
        Err(v) => return v,
    };
    let skey = ServiceKey { addr: meta.dst, port: meta.dport, proto: meta.proto, _pad: 0 };
    // SAFETY: the daemon replaces whole values; a copy is taken at once.
    if let Some(svc) = unsafe { SERVICES.get(&skey) } {
        count(stat::TO_VIP);
        let svc = *svc;
        if let Err(v) = check_l4(ctx, &meta) {
            return v;
        }
        return to_backend(ctx, &meta, &svc);
    }
    let rkey = ServiceKey { addr: meta.src, port: meta.sport, proto: meta.proto, _pad: 0 };
    if let Some(rev) = unsafe { REVERSE.get(&rkey) } {
        // A backend answering the balancer itself (health checks): not a client flow.
        if unsafe { LOCAL_ADDRS.get(&meta.dst) }.is_some() {
            return pass(stat::PASS_NOT_OURS);
        }
        let rev = *rev;
        if let Err(v) = check_l4(ctx, &meta) {
            return v;
        }
        return to_client(ctx, &meta, &rev);
    }
    pass(stat::PASS_NOT_OURS)
}

/// Parses Ethernet, IPv4 (any IHL) and the TCP/UDP ports. Anything that is not IPv4 TCP/UDP, or
/// too short to tell, is passed untouched.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<PacketMeta, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(pass(stat::PASS_MALFORMED))?;
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IPV4 {
        return Err(pass(stat::PASS_NOT_OURS));
    }
    let ip: *mut network_types::ip::Ipv4Hdr =
        ptr_at(ctx, ETH_LEN).ok_or(pass(stat::PASS_MALFORMED))?;
    let ip = unsafe { &*ip };
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return Err(pass(stat::PASS_NOT_OURS));
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 {
        return Err(pass(stat::PASS_MALFORMED));
    }
    // A non-first fragment carries no ports: it cannot be matched to a service here (fragment
    // handling arrives with the datapath-breadth issue), so the kernel gets it.
    let frags = u16::from_be_bytes(ip.frags);
    if frags & IP_OFFSET != 0 {
        return Err(pass(stat::PASS_NOT_OURS));
    }
    let l4_off = ETH_LEN + ihl;
    let ports: *const [u16; 2] = ptr_at(ctx, l4_off).ok_or(pass(stat::PASS_MALFORMED))?;
    let ports = unsafe { *ports };
    let meta = PacketMeta {
        l4_off,
        proto: ip.proto,
        src: u32::from_ne_bytes(ip.src_addr),
        dst: u32::from_ne_bytes(ip.dst_addr),
        sport: ports[0],
        dport: ports[1],
        tot_len: u16::from_be_bytes(ip.tot_len),
        tos: ip.tos,
        len: (ctx.data_end() - ctx.data()) as u64,
    };
    if frags & IP_MF != 0 {
        // A first fragment: ours if it is to a VIP, but not forwardable whole yet.
        let skey = ServiceKey { addr: meta.dst, port: meta.dport, proto: meta.proto, _pad: 0 };
        if unsafe { SERVICES.get(&skey) }.is_some() {
            count(stat::TO_VIP);
            return Err(drop(stat::DROP_FRAGMENT));
        }
        return Err(pass(stat::PASS_NOT_OURS));
    }
    Ok(meta)
}

/// A packet of ours must hold its whole L4 header, and its IPv4 total length must cover the
/// headers and fit in the frame.
#[inline(always)]
fn check_l4(ctx: &XdpContext, meta: &PacketMeta) -> Result<(), Verdict> {
    let hdr = if meta.proto == PROTO_TCP { TCP_HDR_LEN } else { UDP_HDR_LEN };
    let tot = meta.tot_len as usize;
    let frame = ctx.data_end() - ctx.data();
    if tot < (meta.l4_off - ETH_LEN) + hdr || ETH_LEN + tot > frame {
        return Err(drop(stat::DROP_MALFORMED));
    }
    let ok = if meta.proto == PROTO_TCP {
        ptr_at::<[u8; TCP_HDR_LEN]>(ctx, meta.l4_off).is_some()
    } else {
        ptr_at::<[u8; UDP_HDR_LEN]>(ctx, meta.l4_off).is_some()
    };
    if !ok {
        return Err(drop(stat::DROP_MALFORMED));
    }
    Ok(())
}

/// Client -> VIP: pick the backend (affinity, else Maglev), rewrite the destination, forward.
#[inline(always)]
fn to_backend(ctx: &XdpContext, meta: &PacketMeta, svc: &lb_common::Service) -> Verdict {
    let backend_id = match select(ctx, meta, svc) {
        Ok(id) => id,
        Err(v) => return v,
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        error!(ctx, "backend id {} out of range", backend_id);
        return drop(stat::ABORTED);
    };
    let (baddr, bport) = (backend.addr[0], backend.port);
    let len = meta.len;
    bump(&SERVICE_STATS, svc.id, |c| {
        c.packets += 1;
        c.bytes += len;
    });
    bump(&BACKEND_STATS, backend_id, |c| {
        c.packets += 1;
        c.bytes += len;
    });
    if rewrite(ctx, meta, IP_DST, 2, baddr, bport).is_err() {
        return drop(stat::DROP_MALFORMED);
    }
    forward(ctx, meta.proto, meta.src, baddr, meta.tot_len, meta.tos)
}

/// Backend -> client: the source becomes the VIP again.
#[inline(always)]
fn to_client(ctx: &XdpContext, meta: &PacketMeta, rev: &lb_common::Reverse) -> Verdict {
    let len = meta.len;
    bump(&SERVICE_STATS, rev.service_id, |c| {
        c.reply_packets += 1;
        c.reply_bytes += len;
    });
    bump(&BACKEND_STATS, rev.backend_id, |c| {
        c.reply_packets += 1;
        c.reply_bytes += len;
    });
    count(stat::REPLY);
    if rewrite(ctx, meta, IP_SRC, 0, rev.vip, rev.port).is_err() {
        return drop(stat::DROP_MALFORMED);
    }
    forward(ctx, meta.proto, rev.vip, meta.dst, meta.tot_len, meta.tos)
}

/// The client's backend: its live affinity entry, else a fresh pick from the Maglev table.
#[inline(always)]
fn select(ctx: &XdpContext, meta: &PacketMeta, svc: &lb_common::Service) -> Result<u32, Verdict> {
    let key = AffinityKey { service_id: svc.id, addr: [meta.src & svc.v4_mask, 0, 0, 0] };
    // SAFETY: a helper call with no side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(e) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: the LRU map hands out a pointer to the element, valid during this program run.
        let e = unsafe { &mut *e };
        let backend_id = e.backend_id;
        let idle = now.saturating_sub(e.last_seen_ns);
        let fresh = idle <= svc.timeout_ns
            && (svc.max_age_ns == 0 || now.saturating_sub(e.created_ns) <= svc.max_age_ns);
        // Fail open: with every backend down, pins stay where they are.
        let usable = match BACKENDS.get(backend_id) {
            Some(b) => {
                b.service_id == svc.id
                    && (b.flags & BACKEND_F_UP != 0 || svc.flags & SERVICE_F_FAIL_OPEN != 0)
                    && b.flags & BACKEND_F_IN_USE != 0
            }
            None => false,
        };
        if fresh && usable {
            if idle > LAST_SEEN_REFRESH_NS {
                e.last_seen_ns = now;
            }
            bump(&SERVICE_STATS, svc.id, |c| c.hits += 1);
            bump(&BACKEND_STATS, backend_id, |c| c.hits += 1);
            return Ok(backend_id);
        }
        if !fresh {
            bump(&SERVICE_STATS, svc.id, |c| c.expired += 1);
        } else {
            bump(&SERVICE_STATS, svc.id, |c| c.failovers += 1);
            bump(&BACKEND_STATS, backend_id, |c| c.failovers += 1);
        }
    }
    if svc.backend_count == 0 {
        return Err(drop(stat::DROP_NO_BACKEND));
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Err(drop(stat::ABORTED));
    };
    let m = cfg.maglev_m;
    if m == 0 {
        return Err(drop(stat::ABORTED));
    }
    let slot = client_slot(cfg.hash_seed, &key.addr, m);
    let Some(word) = MAGLEV.get(maglev_index(svc.id, svc.table, m, slot)) else {
        error!(ctx, "service {}: Maglev slot {} out of range", svc.id, slot);
        return Err(drop(stat::ABORTED));
    };
    let backend_id = maglev_slot_id(*word, slot);
    let val = AffinityValue { backend_id, _pad: 0, last_seen_ns: now, created_ns: now };
    // BPF_ANY: a concurrent insert for the same client picked the same backend anyway.
    let _ = AFFINITY.insert(&key, &val, 0);
    bump(&SERVICE_STATS, svc.id, |c| c.new_pins += 1);
    bump(&BACKEND_STATS, backend_id, |c| c.new_pins += 1);
    Ok(backend_id)
}

/// Replaces the IPv4 address at `ip_field` (IP_SRC or IP_DST) and the port at `port_off` in the
/// L4 header (0: source, 2: destination), updating the IPv4 and TCP/UDP checksums incrementally.
/// A UDP checksum of 0 (none) stays 0.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    meta: &PacketMeta,
    ip_field: usize,
    port_off: usize,
    addr: u32,
    port: u16,
) -> Result<(), ()> {
    let a: *mut u32 = ptr_at(ctx, ETH_LEN + ip_field).ok_or(())?;
    let ic: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CHECK).ok_or(())?;
    let p: *mut u16 = ptr_at(ctx, meta.l4_off + port_off).ok_or(())?;
    let check_off = if meta.proto == PROTO_TCP { TCP_CHECK } else { UDP_CHECK };
    let lc: *mut u16 = ptr_at(ctx, meta.l4_off + check_off).ok_or(())?;
    // SAFETY: all four pointers were bounds-checked; unaligned access is fine in XDP.
    unsafe {
        let old_addr = a.read_unaligned();
        let old_port = p.read_unaligned();
        a.write_unaligned(addr);
        p.write_unaligned(port);
        ic.write_unaligned(csum::replace4(ic.read_unaligned(), old_addr, addr));
        let old = lc.read_unaligned();
        if meta.proto == PROTO_TCP {
            lc.write_unaligned(csum::replace_addr_port(old, old_addr, addr, old_port, port));
        } else if old != 0 {
            let new = csum::replace_addr_port(old, old_addr, addr, old_port, port);
            lc.write_unaligned(csum::udp_nonzero(new));
        }
    }
    Ok(())
}

/// Sends the rewritten packet toward `dst`: FIB lookup, then TX (same interface) or redirect,
/// with the TTL decremented as a router would. Without a resolved neighbour the kernel gets the
/// packet (already rewritten) and forwards it while it resolves the next hop.
#[inline(always)]
fn forward(ctx: &XdpContext, proto: u8, src: u32, dst: u32, tot_len: u16, tos: u8) -> Verdict {
    // SAFETY: a plain C struct; all-zero is its documented initial state.
    let mut fib: FibParams = unsafe { mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_2.tos = tos;
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: the helper reads and writes only `fib`.
    let rc = unsafe {
        bpf_fib_lookup(ctx.as_ptr(), &mut fib, mem::size_of::<FibParams>() as i32, 0)
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            return drop(stat::DROP_FIB);
        }
        // No neighbour entry yet, forwarding disabled, needs fragmenting, ...: the kernel knows.
        _ => return pass(stat::PASS_FIB),
    }
    let Some(ttl) = ptr_at::<u16>(ctx, ETH_LEN + IP_TTL) else {
        return drop(stat::DROP_MALFORMED);
    };
    let Some(ic) = ptr_at::<u16>(ctx, ETH_LEN + IP_CHECK) else {
        return drop(stat::DROP_MALFORMED);
    };
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return drop(stat::DROP_MALFORMED);
    };
    // SAFETY: bounds-checked above.
    unsafe {
        // TTL and protocol form one 16-bit word of the header checksum.
        let old = ttl.read_unaligned();
        let bytes = old.to_ne_bytes();
        if bytes[0] <= 1 {
            // Expiring here: the kernel sends the ICMP time exceeded.
            return pass(stat::PASS_FIB);
        }
        let new = u16::from_ne_bytes([bytes[0] - 1, bytes[1]]);
        ttl.write_unaligned(new);
        ic.write_unaligned(csum::replace2(ic.read_unaligned(), old, new));
        (*eth).dst_addr = fib.dmac;
        (*eth).src_addr = fib.smac;
    }
    if fib.ifindex == ctx.ingress_ifindex() as u32 {
        return verdict(xdp_action::XDP_TX, stat::TX);
    }
    // SAFETY: a helper call; it returns XDP_REDIRECT, or XDP_ABORTED for a bad ifindex.
    let action = unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
    verdict(action, stat::REDIRECT)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// bpf_fib_lookup and bpf_redirect need a GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
