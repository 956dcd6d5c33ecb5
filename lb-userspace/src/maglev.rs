//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016), built in userspace and written to
//! the `MAGLEV` map. Pure: no kernel, no I/O.
//!
//! Two properties matter more than raw balance:
//! - **Cluster agreement.** A backend's permutation is seeded only by its identity (address and
//!   port) and the backends are sorted before filling, so every balancer node with the same backend
//!   set builds the same table whatever the config order or the datapath ids. Together with the
//!   shared client hash seed, nodes pick the same backend for a client without talking.
//! - **Minimal disruption.** Adding or removing one of N backends moves about 1/N of the slots, so
//!   clients whose affinity entry is lost still land where they were.
//!
//! Changing the seeds or the filling order below changes every table: nodes running different
//! versions would then disagree. `tests::golden_table` pins the output.

use std::net::IpAddr;

use lb_common::hash::hash_words;

/// Seed of the hash giving a backend's starting slot ("offset").
const OFFSET_SEED: u32 = 0x4d47_4c30; // "MGL0"
/// Seed of the hash giving a backend's stride through the table ("skip").
const SKIP_SEED: u32 = 0x4d47_4c31; // "MGL1"

/// Marks a slot nobody has taken yet while filling (backend indices are < `u32::MAX`).
const EMPTY: u32 = u32::MAX;

/// One backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend {
    pub addr: IpAddr,
    pub port: u16,
    /// Relative share of the slots; 0 takes no slot (e.g. a draining backend).
    pub weight: u32,
    /// Opaque datapath backend id, written into the slots this backend takes.
    pub id: u32,
}

/// Builds a lookup table of `m` slots, each holding the `id` of a backend.
///
/// Backends take slots in proportion to their weight (each within one slot of its exact share),
/// and every backend with a non-zero weight gets at least one slot when there are no more of them
/// than slots. Returns an empty table when no backend has a non-zero weight: the service cannot
/// take new clients.
///
/// `m` must be prime (the config guarantees it): that makes every skip in `1..m` a generator, so
/// each backend's permutation visits every slot. `(addr, port)` pairs must be unique.
pub fn build(backends: &[MaglevBackend], m: u32) -> Vec<u32> {
    debug_assert!(m >= 2 && is_prime(m), "Maglev table size must be prime, got {m}");
    let mut sorted: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if sorted.is_empty() || m < 2 {
        return Vec::new();
    }
    // Fill in identity order, never config order: the table must not depend on how the input
    // was listed.
    sorted.sort_unstable_by_key(|b| (b.addr, b.port));
    debug_assert!(
        sorted.windows(2).all(|w| (w[0].addr, w[0].port) != (w[1].addr, w[1].port)),
        "duplicate backend (addr, port)"
    );

    let m_us = m as usize;
    // Where each backend looks next in its permutation, and its stride.
    let mut next = Vec::with_capacity(sorted.len());
    let mut skip = Vec::with_capacity(sorted.len());
    for b in &sorted {
        let (o, s) = permutation(b, m);
        next.push(o as usize);
        skip.push(s as usize);
    }

    // Weights become exact slot quotas (largest remainder, at least one slot each); backends
    // then take turns round robin, each claiming the next free slot of its permutation, and
    // leave the rotation when their quota is filled. With equal weights this is exactly classic
    // Maglev. A turn costs O(1): no priority queue in the hot loop.
    let quotas = quotas(&sorted, m);
    let mut rotation: Vec<usize> = (0..sorted.len()).collect();
    let mut left = quotas;
    let mut owner = vec![EMPTY; m_us];
    // Which slots are taken, one bit each: the probing below touches only this (8 KiB for
    // M = 65537, cache-resident), not `owner`.
    let mut taken = vec![0u64; m_us.div_ceil(64)];
    let mut filled = 0usize;
    let mut r = 0usize;
    while filled < m_us {
        if r >= rotation.len() {
            r = 0;
        }
        let i = rotation[r];
        // Claim the first free slot in this backend's permutation. It exists: fewer than m slots
        // are taken, and the permutation visits all m. (Position and stride stay in registers.)
        let (step, mut slot) = (skip[i], next[i]);
        loop {
            // slot + skip < 2m: a subtraction instead of a division in the hottest loop.
            let after = slot + step;
            let following = if after >= m_us { after - m_us } else { after };
            let (word, bit) = (slot / 64, 1u64 << (slot % 64));
            if taken[word] & bit == 0 {
                taken[word] |= bit;
                owner[slot] = i as u32;
                next[i] = following;
                break;
            }
            slot = following;
        }
        filled += 1;
        left[i] -= 1;
        if left[i] == 0 {
            // Keeps the order of the others; happens once per backend.
            rotation.remove(r);
        } else {
            r += 1;
        }
    }

    // In place: one table's worth of memory, not two.
    for o in owner.iter_mut() {
        *o = sorted[*o as usize].id;
    }
    owner
}

/// Slots per backend: proportional to weight (largest remainder method, ties to the lower sorted
/// index), at least one each, summing to `m`. Needs `backends.len() <= m`.
fn quotas(backends: &[&MaglevBackend], m: u32) -> Vec<usize> {
    let total: u128 = backends.iter().map(|b| u128::from(b.weight)).sum();
    let m128 = u128::from(m);
    let mut q: Vec<usize> = backends.iter().map(|b| (m128 * u128::from(b.weight) / total) as usize).collect();
    let mut rest = m as usize - q.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..backends.len()).collect();
    // Larger fractional part first; remainder_i / total = (m * w_i mod total) / total.
    by_remainder.sort_by_key(|&i| (std::cmp::Reverse(m128 * u128::from(backends[i].weight) % total), i));
    for &i in by_remainder.iter().cycle() {
        if rest == 0 {
            break;
        }
        q[i] += 1;
        rest -= 1;
    }
    // Every backend with a weight gets a slot, taken from the largest quota.
    while let Some(z) = q.iter().position(|&n| n == 0) {
        let (big, _) = q.iter().enumerate().max_by_key(|&(i, n)| (*n, std::cmp::Reverse(i))).expect("not empty");
        if q[big] <= 1 {
            break; // more backends than slots; cannot happen with validated configs
        }
        q[big] -= 1;
        q[z] += 1;
    }
    q
}

/// A backend's (offset, skip): it tries slots offset, offset + skip, offset + 2 * skip, ... mod m.
fn permutation(b: &MaglevBackend, m: u32) -> (u32, u32) {
    // Address words in network order, as the datapath stores them, then the port.
    let mut words = [0u32; 5];
    let n = match b.addr {
        IpAddr::V4(a) => {
            words[0] = u32::from_ne_bytes(a.octets());
            1
        }
        IpAddr::V6(a) => {
            for (w, c) in words.iter_mut().zip(a.octets().chunks_exact(4)) {
                *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            4
        }
    };
    words[n] = u32::from(b.port);
    let words = &words[..=n];
    let offset = hash_words(OFFSET_SEED, words) % m;
    let skip = hash_words(SKIP_SEED, words) % (m - 1) + 1;
    (offset, skip)
}

/// Whether `n` is prime (trial division: table sizes are at most about a million).
pub fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d: &u32| u64::from(*d) * u64::from(*d) <= u64::from(n)).all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{Ipv4Addr, Ipv6Addr},
    };

    use super::*;

    const M: u32 = 65537;

    fn v4(i: u32, weight: u32) -> MaglevBackend {
        MaglevBackend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8)),
            port: 8080,
            weight,
            id: 100 + i,
        }
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for id in table {
            *c.entry(*id).or_default() += 1;
        }
        c
    }

    fn moved(a: &[u32], b: &[u32]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    /// Deterministic Fisher-Yates shuffle (a small LCG; no `rand` needed for a test).
    fn shuffle<T>(v: &mut [T], mut state: u64) {
        for i in (1..v.len()).rev() {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            v.swap(i, (state >> 33) as usize % (i + 1));
        }
    }

    #[test]
    fn weighted_shares_within_one_percent() {
        let weights = [100, 100, 200, 50, 150, 300, 75, 125, 250, 1000];
        let backends: Vec<_> = weights.iter().enumerate().map(|(i, w)| v4(i as u32, *w)).collect();
        let table = build(&backends, M);
        assert_eq!(table.len(), M as usize);
        let c = counts(&table);
        let total: u32 = weights.iter().sum();
        for b in &backends {
            let expected = f64::from(b.weight) / f64::from(total);
            let share = c[&b.id] as f64 / f64::from(M);
            assert!((share / expected - 1.0).abs() <= 0.01, "{b:?}: share {share}, expected {expected}");
            assert!((share - expected).abs() <= 0.01, "{b:?}: share {share}, expected {expected}");
        }
    }

    #[test]
    fn same_table_whatever_the_input_order() {
        let mut backends: Vec<_> = (0..50).map(|i| v4(i, 50 + i * 7)).collect();
        backends.push(MaglevBackend { addr: "fd00::1".parse().unwrap(), port: 80, weight: 100, id: 7 });
        let reference = build(&backends, M);
        for seed in 1..6 {
            shuffle(&mut backends, seed);
            assert_eq!(build(&backends, M), reference, "order after shuffle {seed}");
        }
        backends.reverse();
        assert_eq!(build(&backends, M), reference);
    }

    #[test]
    fn ids_do_not_move_slots() {
        // Same backends, other datapath ids (another node, or a restart): same slots per backend.
        let a: Vec<_> = (0..10).map(|i| v4(i, 100)).collect();
        let b: Vec<_> = a.iter().map(|x| MaglevBackend { id: x.id * 3 + 1, ..*x }).collect();
        let (ta, tb) = (build(&a, M), build(&b, M));
        assert!(ta.iter().zip(&tb).all(|(x, y)| *y == x * 3 + 1));
    }

    #[test]
    fn removing_or_adding_one_backend_moves_about_one_nth() {
        let n = 10;
        let backends: Vec<_> = (0..n).map(|i| v4(i, 100)).collect();
        let base = build(&backends, M);
        let m = f64::from(M);
        for removed in 0..n as usize {
            let mut fewer = backends.clone();
            fewer.remove(removed);
            let changed = moved(&base, &build(&fewer, M)) as f64;
            assert!(changed <= (1.0 / f64::from(n) + 0.01) * m, "removing #{removed} moved {changed} slots");
        }
        let mut more = backends.clone();
        more.push(v4(n, 100));
        let changed = moved(&base, &build(&more, M)) as f64;
        assert!(changed <= (1.0 / f64::from(n + 1) + 0.01) * m, "adding one moved {changed} slots");
    }

    #[test]
    fn every_slot_filled_and_every_weighted_backend_present() {
        // Skewed weights: the weight-1 backends still get their slot; the weight-0 one none.
        let mut backends: Vec<_> = (0..200).map(|i| v4(i, if i % 2 == 0 { 1 } else { 65535 })).collect();
        backends.push(v4(999, 0));
        backends.push(MaglevBackend {
            addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
            port: 443,
            weight: 1,
            id: 5,
        });
        let table = build(&backends, M);
        assert_eq!(table.len(), M as usize);
        let c = counts(&table);
        for b in &backends {
            if b.weight > 0 {
                assert!(c.get(&b.id).copied().unwrap_or(0) >= 1, "{b:?} missing");
            } else {
                assert!(!c.contains_key(&b.id), "{b:?} has weight 0 but got slots");
            }
        }
        assert_eq!(c.values().sum::<usize>(), M as usize);
        assert_eq!(c.len(), backends.len() - 1);
    }

    #[test]
    fn single_backend_fills_all_slots() {
        let table = build(&[v4(1, 3)], M);
        assert_eq!(table, vec![101; M as usize]);
        let small = build(&[v4(1, 3)], 7);
        assert_eq!(small, vec![101; 7]);
    }

    #[test]
    fn no_weighted_backend_gives_empty_table() {
        assert!(build(&[], M).is_empty());
        assert!(build(&[v4(1, 0), v4(2, 0)], M).is_empty());
    }

    #[test]
    fn permutation_depends_on_port_and_family() {
        let a = v4(1, 1);
        let b = MaglevBackend { port: 8081, ..a };
        assert_ne!(permutation(&a, M), permutation(&b, M));
        let (o, s) = permutation(&a, M);
        assert!(o < M && (1..M).contains(&s));
    }

    #[test]
    fn reweighting_one_backend_moves_little_more_than_its_gain() {
        let m = f64::from(M);
        let before: Vec<_> = (0..10).map(|i| v4(i, 100)).collect();
        let mut after = before.clone();
        after[3].weight = 200;
        let changed = moved(&build(&before, M), &build(&after, M)) as f64;
        // Its share goes from 1/10 to 2/11: at least that much must move.
        let gain = 2.0 / 11.0 - 0.1;
        assert!(changed >= (gain * m).floor() - 1.0 && changed <= (gain + 0.02) * m, "moved {changed} slots, gain {}", gain * m);
    }

    /// Pins the algorithm: every node of a cluster must build the same table from the same
    /// backends, so a change here is a cluster-visible change (bump it deliberately, never by
    /// accident).
    #[test]
    fn golden_table() {
        let backends: Vec<_> = (0..3).map(|i| v4(i, 1 + i)).collect();
        let table = build(&backends, 13);
        assert_eq!(table, GOLDEN_13);
    }
    const GOLDEN_13: [u32; 13] = [101, 102, 102, 101, 102, 101, 102, 101, 102, 100, 102, 100, 102];

    /// `cargo test --release -- --ignored --nocapture maglev_timing`
    #[test]
    #[ignore = "timing print, not a check; run in release"]
    fn maglev_timing() {
        let backends: Vec<_> = (0..1000).map(|i| v4(i, 100 + (i % 7) * 50)).collect();
        let equal: Vec<_> = (0..1000).map(|i| v4(i, 100)).collect();
        for (name, set) in [("varied weights", &backends), ("equal weights", &equal)] {
            let start = std::time::Instant::now();
            let runs = 20;
            for _ in 0..runs {
                std::hint::black_box(build(std::hint::black_box(set), M));
            }
            println!("M = {M}, {} backends, {name}: {:?} per table", set.len(), start.elapsed() / runs);
        }
    }
}
