//! `lb agent`'s program: an `SO_REUSEPORT` socket selector that keeps every connection (TCP) or
//! datagram (UDP) of a client prefix on one socket of the group, and so on one process, while
//! that socket lives. Attached to one reuseport group by `lb agent`; the daemon fills
//! `AGENT_SOCKS` with the group's listening sockets (copies taken with `pidfd_getfd`).
//!
//! Per connection: the client's address (read from the IP header), masked to the prefix, finds
//! its pin in `AGENT_PINS`; a live pin whose socket still exists selects it. Otherwise the client
//! is placed: slot `hash(client) % slots`, then the next ones until a socket is there, and pinned.
//! A socket that closed leaves its slot empty (the kernel clears it), so only its clients move;
//! a new socket fills a slot and takes the new clients that hash there. With no socket found the
//! kernel's own spread decides.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, sk_action::SK_PASS},
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_load_bytes_relative},
    macros::{map, sk_reuseport},
    maps::{Array, LruHashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use lb_common::{
    AGENT_MAX_SOCKETS, AGENT_PIN_ENTRIES, AgentConfig, AgentKey, AgentPin, agent_stat, hash::hash4,
};

#[map(name = "AGENT_SOCKS")]
static AGENT_SOCKS: ReusePortSockArray = ReusePortSockArray::with_max_entries(AGENT_MAX_SOCKETS, 0);

#[map(name = "AGENT_PINS")]
static AGENT_PINS: LruHashMap<AgentKey, AgentPin> = LruHashMap::with_max_entries(AGENT_PIN_ENTRIES, 0);

#[map(name = "AGENT_CONFIG")]
static AGENT_CONFIG: Array<AgentConfig> = Array::with_max_entries(1, 0);

#[map(name = "AGENT_STATS")]
static AGENT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(agent_stat::COUNT, 0);

#[map(name = "AGENT_SLOT_NEW")]
static AGENT_SLOT_NEW: PerCpuArray<u64> = PerCpuArray::with_max_entries(AGENT_MAX_SOCKETS, 0);

/// Sockets tried when placing a client (the group's slots may have holes).
const PROBES: u32 = 16;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;

fn count(i: u32) {
    bump(&AGENT_STATS, i);
}

fn bump(a: &PerCpuArray<u64>, i: u32) {
    if let Some(c) = a.get_ptr_mut(i) {
        // SAFETY: this CPU's counter.
        unsafe { *c += 1 };
    }
}

#[sk_reuseport]
pub fn lb_agent(ctx: SkReuseportContext) -> u32 {
    select(&ctx);
    // Whether a socket was selected or not: SK_PASS lets the kernel use it, or spread as usual.
    SK_PASS
}

/// The client's key, from the IP header's source address.
#[inline(always)]
fn client(ctx: &SkReuseportContext, cfg: &AgentConfig) -> Option<AgentKey> {
    // The eth_protocol field is in network order.
    let proto = u16::from_be(ctx.eth_protocol() as u16) as u32;
    let mut w = [0u32; 4];
    let (offset, len, family) = match proto {
        ETH_P_IP => (12u32, 4u32, 4u32),
        ETH_P_IPV6 => (8, 16, 6),
        _ => return None,
    };
    // SAFETY: the helper writes at most `len` bytes into `w` (16 bytes).
    let r = unsafe { bpf_skb_load_bytes_relative(ctx.md as *const _, offset, w.as_mut_ptr().cast(), len, BPF_HDR_START_NET) };
    if r != 0 {
        return None;
    }
    let addr = if family == 4 {
        [w[0] & cfg.v4_mask, 0, 0, 0]
    } else {
        [w[0] & cfg.v6_mask[0], w[1] & cfg.v6_mask[1], w[2] & cfg.v6_mask[2], w[3] & cfg.v6_mask[3]]
    };
    Some(AgentKey { addr, family })
}

#[inline(always)]
fn select(ctx: &SkReuseportContext) {
    let Some(cfg) = AGENT_CONFIG.get(0) else { return };
    let Some(key) = client(ctx, cfg) else {
        count(agent_stat::FALLBACK);
        return;
    };
    // SAFETY: coarse clock read.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut moved = false;
    if let Some(p) = AGENT_PINS.get_ptr_mut(key) {
        // SAFETY: the LRU map's element, valid during this program run.
        let p = unsafe { &mut *p };
        if now.saturating_sub(p.last_seen_ns) <= cfg.timeout_ns {
            if AGENT_SOCKS.select_reuseport(ctx, p.index).is_ok() {
                p.last_seen_ns = now;
                count(agent_stat::HIT);
                return;
            }
            moved = true;
        }
    }
    let slots = cfg.slots;
    if slots == 0 {
        count(agent_stat::FALLBACK);
        return;
    }
    let start = hash4(cfg.hash_seed, &key.addr) % slots;
    for i in 0..PROBES {
        let index = (start + i) % slots;
        if AGENT_SOCKS.select_reuseport(ctx, index).is_ok() {
            let _ = AGENT_PINS.insert(key, AgentPin { index, _pad: 0, last_seen_ns: now }, 0);
            count(if moved { agent_stat::MOVED } else { agent_stat::PLACED });
            bump(&AGENT_SLOT_NEW, index);
            return;
        }
        if i + 1 >= slots {
            break;
        }
    }
    count(agent_stat::FALLBACK);
}

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
