//! Which backend a packet to a VIP goes to.
//!
//! Two tables decide, and they answer different questions:
//! - `FLOWS` (TCP): where *this connection* goes. Written when the client's first packet after
//!   its SYN arrives (the handshake completed), never by a SYN; read by every later packet of the
//!   connection. A connection stays on its backend while that backend is up or draining, through
//!   pin expiry, `max_age`, table changes and reloads; only a backend that is down, removed or
//!   force-drained moves it (counted: `conn_moved`, `Counters::moved`).
//! - `AFFINITY` (the pin, per client prefix): where the client's *next connection* goes (TCP), or
//!   its next datagram (UDP). A fresh pin whose backend is usable decides; otherwise Maglev does,
//!   and the pin is written (re-placed in place, or created when the new-pin guard allows).
//!
//! A TCP SYN never creates state: it follows the fresh pin or Maglev, and at most re-places a
//! stale pin in place. A spoofed-source SYN flood therefore neither creates nor evicts entries.
//! A packet that creates an entry (a pin or a connection entry) counts against this CPU's
//! `GlobalConfig::new_pins_per_cpu` per second; past it the client is placed by Maglev without
//! being remembered (`guarded`).

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use aya_log_ebpf::error;
use lb_common::{
    AffinityKey, AffinityValue, BACKEND_F_IN_USE, BACKEND_F_UP, Backend, Counters, FlowKey, FlowValue,
    LAST_SEEN_REFRESH_NS, PIN_F_SPLIT, SERVICE_F_FAIL_OPEN, SERVICE_F_SPLIT_HOT, Service, flow_ticks,
    hash::client_slot, maglev_index, maglev_slot_id, stat,
};

use crate::{
    Verdict, bump, count, drop,
    maps::{AFFINITY, BACKEND_STATS, BACKENDS, FLOWS, HOT_PREFIXES, MAGLEV, MOVES, PREFIX_NEW, SERVICE_STATS},
    parse::Meta,
};

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What a placement may write to the client's pin (`place`'s `mode`, low bits).
/// Nothing (ICMP errors: they may be spoofed and only follow what is there).
pub const WRITE_NONE: u32 = 0;
/// Re-place a stale pin in place, never create one (a SYN: nothing new for a source that has
/// not answered yet).
pub const WRITE_EXISTING: u32 = 1;
/// Also create a pin, when this CPU's new-pin guard allows (UDP, a moved connection).
pub const WRITE_CREATE: u32 = 2;
/// Also create a pin; the caller already passed the guard for this packet (a new connection
/// entry is written beside it).
pub const WRITE_APPROVED: u32 = 3;
/// `place`'s `mode` flag: a pin past its timeout or max age still decides while its backend is
/// usable (an established connection whose own entry is gone: its backend is its pin's).
pub const ANY_AGE: u32 = 4;

/// The backend of `id` if it may take this service's packets: in use, of this service, and up
/// (or the service fails open: every backend is down, so none is left out).
#[inline(always)]
pub fn usable(svc: &Service, id: u32) -> Option<&'static Backend> {
    let b = BACKENDS.get(id)?;
    let ok = b.service_id == svc.id
        && b.flags & BACKEND_F_IN_USE != 0
        && (b.flags & BACKEND_F_UP != 0 || svc.flags & SERVICE_F_FAIL_OPEN != 0);
    if ok { Some(b) } else { None }
}

/// How long a pin's `last_seen` (or a connection's pin refresh) may lag: rarely (cache lines stay
/// calm across CPUs), but well within the timeout.
#[inline(always)]
fn refresh_ns(svc: &Service) -> u64 {
    if svc.timeout_ns / 2 < LAST_SEEN_REFRESH_NS { svc.timeout_ns / 2 } else { LAST_SEEN_REFRESH_NS }
}

/// Counts a selection for the service and the backend in one update each: `event` (a hit or a
/// new pin) and the packet (if `len` is not 0) with its bytes.
#[inline(always)]
pub fn count_pick(service_id: u32, backend_id: u32, len: u64, event: impl Fn(&mut Counters) + Copy) {
    let packets = (len != 0) as u64;
    let f = |c: &mut Counters| {
        event(c);
        c.packets += packets;
        c.bytes += len;
    };
    bump(&SERVICE_STATS, service_id, f);
    bump(&BACKEND_STATS, backend_id, f);
}

/// Whether this CPU may write one more new entry in the current second (about 1.07 s: ns >> 30).
#[inline(always)]
fn may_create(m: &mut Meta) -> bool {
    if m.new_limit == 0 {
        return true;
    }
    let window = (m.now >> 30) as u32;
    if m.guard_window != window {
        m.guard_window = window;
        m.guard_count = 0;
    }
    if m.guard_count >= m.new_limit {
        count(stat::GUARDED);
        return false;
    }
    m.guard_count += 1;
    true
}

/// Maglev's backend for the client. The pick is checked like a pin (in use, of this service): a
/// slot of a backend being removed, or of a table being written, never sends a packet to a free
/// backend slot (0.0.0.0:0).
#[inline(always)]
fn maglev(ctx: &XdpContext, m: &Meta, svc: &Service, key: &AffinityKey) -> Result<u32, Verdict> {
    if svc.backend_count == 0 || m.maglev_m == 0 {
        return Err(drop(stat::DROP_NO_BACKEND));
    }
    let slot = client_slot(m.hash_seed, &key.addr, m.maglev_m);
    let Some(word) = MAGLEV.get(maglev_index(svc.id, svc.table, m.maglev_m, slot)) else {
        error!(ctx, "service {}: Maglev slot {} out of range", svc.id, slot);
        return Err(drop(stat::ABORTED));
    };
    let id = maglev_slot_id(*word, slot);
    match BACKENDS.get(id) {
        Some(b) if b.service_id == svc.id && b.flags & BACKEND_F_IN_USE != 0 => Ok(id),
        _ => Err(drop(stat::DROP_NO_BACKEND)),
    }
}

/// The client's own-address pin key (for a split prefix: see `SERVICE_F_SPLIT_HOT`).
#[inline(always)]
fn own_key(svc: &Service, m: &Meta) -> AffinityKey {
    let addr = if m.v6 { m.src } else { [m.src[0], 0, 0, 0] };
    AffinityKey { service_id: svc.id, addr }
}

/// Whether the prefix of `key` (a prefix pin key) is split: its pin says so, or, without a pin,
/// `HOT_PREFIXES` lists it. Only for services that split hot prefixes.
#[inline(always)]
fn split(key: &AffinityKey, pin: Option<*mut AffinityValue>) -> bool {
    match pin {
        // SAFETY: as in `place`.
        Some(e) => (unsafe { (*e).flags } & PIN_F_SPLIT) != 0,
        // SAFETY: a copy of the flag is taken at once.
        None => unsafe { HOT_PREFIXES.get(key) }.is_some(),
    }
}

/// The client's backend from its pin, else from Maglev, writing the pin as `mode` allows (see
/// the `WRITE_*` constants and `ANY_AGE`). The packet (`m.len`, 0 for none) is counted with the
/// event (hit, new pin, expired, failover). `key` is the client's prefix; in a split prefix of a
/// service that splits hot prefixes the client's own address decides instead (its own pin, or
/// Maglev on its own address). Other services pay one flag test.
#[inline(always)]
pub fn place(ctx: &XdpContext, m: &mut Meta, svc: &Service, key: &AffinityKey, mode: u32) -> Result<u32, Verdict> {
    let pin = AFFINITY.get_ptr_mut(key);
    if svc.flags & SERVICE_F_SPLIT_HOT != 0 && split(key, pin) {
        let own = own_key(svc, m);
        let own_pin = AFFINITY.get_ptr_mut(own);
        return place_pin(ctx, m, svc, &own, mode, own_pin);
    }
    place_pin(ctx, m, svc, key, mode, pin)
}

/// `place` with the pin of `key` looked up already.
#[inline(always)]
fn place_pin(
    ctx: &XdpContext,
    m: &mut Meta,
    svc: &Service,
    key: &AffinityKey,
    mode: u32,
    pin: Option<*mut AffinityValue>,
) -> Result<u32, Verdict> {
    let now = m.now;
    let len = m.len;
    let write = mode & 3;
    if let Some(e) = pin {
        // SAFETY: the LRU map hands out a pointer to the element, valid during this program run.
        let e = unsafe { &mut *e };
        let backend_id = e.backend_id;
        let idle = now.saturating_sub(e.last_seen_ns);
        let fresh = mode & ANY_AGE != 0
            || (idle <= svc.timeout_ns && (svc.max_age_ns == 0 || now.saturating_sub(e.created_ns) <= svc.max_age_ns));
        let usable = usable(svc, backend_id).is_some();
        if fresh && usable {
            if write != WRITE_NONE && idle > refresh_ns(svc) {
                e.last_seen_ns = now;
            }
            count_pick(svc.id, backend_id, len, |c| c.hits += 1);
            return Ok(backend_id);
        }
        let id = maglev(ctx, m, svc, key)?;
        if write == WRITE_NONE {
            return Ok(id);
        }
        if !usable {
            bump(&SERVICE_STATS, svc.id, |c| c.failovers += 1);
            bump(&BACKEND_STATS, backend_id, |c| c.failovers += 1);
        } else {
            bump(&SERVICE_STATS, svc.id, |c| c.expired += 1);
        }
        if id != backend_id {
            use lb_common::{BACKEND_F_FORCED, move_reason};
            let reason = if usable {
                if idle > svc.timeout_ns { move_reason::EXPIRED } else { move_reason::MAX_AGE }
            } else {
                match BACKENDS.get(backend_id) {
                    Some(b) if b.service_id == svc.id && b.flags & BACKEND_F_IN_USE != 0 => {
                        if b.flags & BACKEND_F_FORCED != 0 { move_reason::DRAIN_FORCE } else { move_reason::BACKEND_DOWN }
                    }
                    _ => move_reason::BACKEND_REMOVED,
                }
            };
            journal((svc.id as u64) << 32 | reason as u64, key, (backend_id as u64) << 32 | id as u64, now);
        }
        // Re-placed in place: no new entry, nothing evicted.
        e.backend_id = id;
        e.last_seen_ns = now;
        e.created_ns = now;
        count_pick(svc.id, id, len, |c| c.new_pins += 1);
        return Ok(id);
    }
    let id = maglev(ctx, m, svc, key)?;
    if write == WRITE_APPROVED || (write == WRITE_CREATE && may_create(m)) {
        let val = AffinityValue { backend_id: id, flags: 0, last_seen_ns: now, created_ns: now };
        // BPF_ANY: a concurrent insert for the same client picked the same backend anyway.
        let _ = AFFINITY.insert(key, val, 0);
        count_pick(svc.id, id, len, |c| c.new_pins += 1);
    } else {
        count_pick(svc.id, id, len, |_| {});
    }
    Ok(id)
}

/// Reports a move (a pin re-placed onto another backend) to the daemon's journal: `svc_reason`
/// is service id << 32 | reason, `from_to` the backends. Out of line: only re-placements pay.
#[inline(never)]
fn journal(svc_reason: u64, key: &AffinityKey, from_to: u64, now: u64) {
    let e = lb_common::MoveEvent {
        at_ns: now,
        service_id: (svc_reason >> 32) as u32,
        from: (from_to >> 32) as u32,
        to: from_to as u32,
        reason: svc_reason as u32,
        addr: key.addr,
    };
    let _ = MOVES.output::<lb_common::MoveEvent>(&e, 0);
}

/// `place` out of line, for the rarer TCP paths (a SYN, a connection's first packet, a moved
/// connection): one copy of it serves them all. `1 << 32 | backend id`, or a verdict.
#[inline(never)]
fn place_out(raw: *mut xdp_md, m: &mut Meta, svc: &Service, key: &AffinityKey, mode: u32) -> u64 {
    match place(&crate::ctx_of(raw), m, svc, key, mode) {
        Ok(id) => (1u64 << 32) | id as u64,
        Err(v) => v.0 as u64,
    }
}

#[inline(always)]
fn unpack(r: u64) -> Result<u32, Verdict> {
    if r >> 32 != 0 { Ok(r as u32) } else { Err(Verdict(r as u32)) }
}

/// The connection's entry key: service, client address and port.
#[inline(always)]
pub fn flow_key(svc: &Service, m: &Meta) -> FlowKey {
    FlowKey { service_id: svc.id, addr: m.src, port: m.sport, _pad: 0 }
}

/// A live connection keeps its client's pin alive (and writes it again if it was evicted), so
/// that the client's next connection follows it; a pin re-placed since (another connection of
/// the client went elsewhere) is left alone.
/// Out of line: it runs about once a second per connection, and inlined into the established
/// connection's path its split handling would crowd that path's registers.
#[inline(never)]
fn refresh_pin(svc: &Service, m: &Meta, key: &AffinityKey, backend_id: u32, now: u64) {
    let pin = AFFINITY.get_ptr_mut(key);
    if svc.flags & SERVICE_F_SPLIT_HOT != 0 && split(key, pin) {
        let own = own_key(svc, m);
        refresh_at(&own, AFFINITY.get_ptr_mut(own), backend_id, now);
    } else {
        refresh_at(key, pin, backend_id, now);
    }
}

#[inline(always)]
fn refresh_at(key: &AffinityKey, pin: Option<*mut AffinityValue>, backend_id: u32, now: u64) {
    match pin {
        Some(p) => {
            // SAFETY: as in `place`.
            let p = unsafe { &mut *p };
            if p.backend_id == backend_id {
                p.last_seen_ns = now;
            }
        }
        None => {
            let val = AffinityValue { backend_id, flags: 0, last_seen_ns: now, created_ns: now };
            let _ = AFFINITY.insert(key, val, 0);
        }
    }
}

/// A TCP packet's backend: its connection's entry, else (a SYN, or the connection's first
/// packet after it) its client's pin or Maglev. `flags`: the TCP header's flag byte.
#[inline(always)]
pub fn select_tcp(raw: *mut xdp_md, m: &mut Meta, svc: &Service, key: &AffinityKey, flags: u8) -> Result<u32, Verdict> {
    let fk = flow_key(svc, m);
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        count(stat::SYN);
        let id = unpack(place_out(raw, m, svc, key, WRITE_EXISTING))?;
        // An entry for this client port is an earlier connection's (the port is being reused)
        // or a spoof's: it must not steer this connection's next packets elsewhere.
        // SAFETY: a copy of the id is taken at once.
        if unsafe { FLOWS.get(fk) }.is_some_and(|f| f.backend_id != id) {
            let _ = FLOWS.remove(fk);
        }
        return Ok(id);
    }
    if let Some(f) = FLOWS.get_ptr_mut(fk) {
        // SAFETY: the LRU map hands out a pointer to the element, valid during this program run.
        let f = unsafe { &mut *f };
        let old = f.backend_id;
        let now = m.now;
        if usable(svc, old).is_some() {
            let t = flow_ticks(now);
            if t.wrapping_sub(f.stamp) > flow_ticks(refresh_ns(svc)) {
                refresh_pin(svc, m, key, old, now);
                f.stamp = t;
            }
            count_pick(svc.id, old, m.len, |c| c.hits += 1);
            return Ok(old);
        }
        // Its backend is down, removed or force-drained: the connection moves (and its client's
        // pin with it), counted on the backend it left.
        let id = unpack(place_out(raw, m, svc, key, WRITE_CREATE))?;
        f.backend_id = id;
        f.stamp = flow_ticks(now);
        count(stat::CONN_MOVED);
        bump(&SERVICE_STATS, svc.id, |c| c.moved += 1);
        bump(&BACKEND_STATS, old, |c| c.moved += 1);
        return Ok(id);
    }
    // The connection's first packet after its SYN (or one whose entry was evicted, or that
    // predates this datapath): it goes where its client's pin says, whatever the pin's age (the
    // SYN re-placed a stale pin already), else where Maglev says. A reset writes nothing.
    let create = flags & TCP_RST == 0 && may_create(m);
    let mode = ANY_AGE | if create { WRITE_APPROVED } else { WRITE_EXISTING };
    let id = unpack(place_out(raw, m, svc, key, mode))?;
    if create {
        let _ = FLOWS.insert(fk, FlowValue { backend_id: id, stamp: flow_ticks(m.now) }, 0);
        count(stat::CONN_NEW);
        bump(&SERVICE_STATS, svc.id, |c| c.conns += 1);
        bump(&BACKEND_STATS, id, |c| c.conns += 1);
        // The daemon's measure of a prefix's new clients (to split a hot one).
        if svc.flags & SERVICE_F_SPLIT_HOT != 0 {
            match PREFIX_NEW.get_ptr_mut(key) {
                // SAFETY: this CPU's value, valid during this program run.
                Some(n) => unsafe { *n += 1 },
                None => {
                    let _ = PREFIX_NEW.insert(key, 1, 0);
                }
            }
        }
    }
    Ok(id)
}

/// The backend an ICMP error about a client's flow goes to, without writing anything (ICMP can
/// be spoofed): the connection's entry (a TCP flow: `fk.port` is not 0), else the client's fresh
/// pin, else Maglev. `1 << 32 | backend id`, or a verdict. Out of line.
#[inline(never)]
pub fn peek(raw: *mut xdp_md, m: &mut Meta, svc: &Service, key: &AffinityKey, fk: &FlowKey) -> u64 {
    let ctx = &crate::ctx_of(raw);
    if fk.port != 0 {
        // SAFETY: a copy of the id is taken at once.
        if let Some(id) = unsafe { FLOWS.get(fk) }.map(|f| f.backend_id)
            && usable(svc, id).is_some() {
                return (1u64 << 32) | id as u64;
            }
    }
    let len = m.len;
    m.len = 0;
    let r = place(ctx, m, svc, key, WRITE_NONE);
    m.len = len;
    match r {
        Ok(id) => (1u64 << 32) | id as u64,
        Err(v) => v.0 as u64,
    }
}

