//! Fair stickiness for new clients (`[services.balance]`), decided where clients are placed: in
//! the service's Maglev table. Pins never move for it, and the datapath's hit path does nothing
//! for it: a pinned client never looks at the table.
//!
//! - **Bounded loads** (consistent hashing with bounded loads, Mirrokni et al. 2016): every
//!   [`SAMPLE_EVERY`] the daemon reads each backend's per-CPU counters, takes its load as a rate
//!   over the last [`WINDOW`] (packets, bytes or new pins per second), and compares it with the
//!   bound: `load_bound` times the backend's weighted share of the service's load. A backend
//!   above it leaves the table (rebuilt and swapped in atomically), so a new client whose Maglev
//!   choice it was takes the next backend of its slot's preference order, deterministically given
//!   which backends are over; weights count, since the table is weighted. It comes back once its
//!   load falls under [`CLEAR`] of the way from its share to the bound. When every backend is
//!   over, the plain table stands.
//! - **Slow start**: an added (by reload), recovered or undrained backend's weight in the table
//!   ramps linearly from 1/[`RAMP_STEPS`] to full over `slow_start`, one step at a time.
//! - **Hot prefixes**: for a service whose clients are pinned by prefix (`ipv4_prefix` < 32,
//!   `ipv6_prefix` < 128) with `hot_prefix_share`, the datapath counts new TCP connections per
//!   prefix (`PREFIX_NEW`); a prefix bringing more than that share of the service's new
//!   connections over [`HOT_WINDOW`] (at least [`HOT_MIN_CONNS`] of them) is split: its pin is
//!   flagged and it is listed in `HOT_PREFIXES`, and from then on each of its clients is placed
//!   by its own address (its own pin, Maglev on its own address, bounded like everyone). The
//!   prefix's pin stays as it was, and open connections keep their backend (`FLOWS`).

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use crate::config::LoadKind;
pub use crate::state::RAMP_STEPS;

/// How often loads are sampled and bounds decided: the bound reacts within a window plus this.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Loads are rates over this much time.
pub const WINDOW: Duration = Duration::from_millis(1500);
/// A backend over the bound comes back under it below `share + CLEAR * (bound - share)`.
pub const CLEAR: f64 = 0.8;

/// Below this total load (per second) a service is too quiet for a bound to mean anything.
pub fn min_total(kind: LoadKind) -> f64 {
    match kind {
        LoadKind::Packets => 20.0,
        LoadKind::Bytes => 20_000.0,
        LoadKind::Pins => 2.0,
    }
}

/// New connections per prefix are compared over this much time.
pub const HOT_WINDOW: Duration = Duration::from_secs(5);
/// A service with fewer new connections than this in [`HOT_WINDOW`] splits nothing.
pub const HOT_MIN_CONNS: u64 = 10;

/// Recent samples of `PREFIX_NEW`, and the prefixes split.
#[derive(Default)]
pub struct HotPrefixes {
    samples: VecDeque<(Instant, BTreeMap<lb_common::AffinityKey, u64>)>,
    /// What `HOT_PREFIXES` holds (read from it at the first look: a restart keeps the splits).
    pub split: std::collections::BTreeSet<lb_common::AffinityKey>,
    pub loaded: bool,
}

impl HotPrefixes {
    pub fn add(&mut self, at: Instant, counts: BTreeMap<lb_common::AffinityKey, u64>) {
        self.samples.push_back((at, counts));
        while self.samples.len() > 2 && at.duration_since(self.samples[1].0) >= HOT_WINDOW {
            self.samples.pop_front();
        }
    }

    /// The prefixes of service `id` that brought more than `share` of its new connections over
    /// the window, and are not split yet, with their share.
    pub fn hot(&self, id: u32, share: f64) -> Vec<(lb_common::AffinityKey, f64)> {
        let (Some((_, first)), Some((_, last))) = (self.samples.front(), self.samples.back()) else { return Vec::new() };
        let deltas: Vec<(lb_common::AffinityKey, u64)> = last
            .iter()
            .filter(|(k, _)| k.service_id == id)
            .map(|(k, n)| (*k, n.saturating_sub(first.get(k).copied().unwrap_or(0))))
            .collect();
        let total: u64 = deltas.iter().map(|(_, d)| d).sum();
        if total < HOT_MIN_CONNS {
            return Vec::new();
        }
        deltas
            .into_iter()
            .map(|(k, d)| (k, d as f64 / total as f64))
            .filter(|(k, f)| *f > share && !self.split.contains(k))
            .collect()
    }
}

/// One backend's counters as a sample holds them: packets, bytes, new pins.
pub type Sample = (u64, u64, u64);

/// Recent samples of every balanced backend's counters, by backend id.
#[derive(Default)]
pub struct Loads {
    samples: VecDeque<(Instant, BTreeMap<u32, Sample>)>,
}

impl Loads {
    pub fn add(&mut self, at: Instant, counts: BTreeMap<u32, Sample>) {
        self.samples.push_back((at, counts));
        while self.samples.len() > 2 && at.duration_since(self.samples[1].0) >= WINDOW {
            self.samples.pop_front();
        }
    }

    /// Backend `id`'s load: the rate of `kind` between the oldest sample of the window and the
    /// newest; 0 without two samples of it (or when its counter went back: a reused id).
    pub fn rate(&self, id: u32, kind: LoadKind) -> f64 {
        let (Some((t0, first)), Some((t1, last))) = (self.samples.front(), self.samples.back()) else { return 0.0 };
        let secs = t1.duration_since(*t0).as_secs_f64();
        let pick = |s: &Sample| match kind {
            LoadKind::Packets => s.0,
            LoadKind::Bytes => s.1,
            LoadKind::Pins => s.2,
        };
        match (first.get(&id), last.get(&id)) {
            (Some(a), Some(b)) if secs > 0.0 && pick(b) >= pick(a) => (pick(b) - pick(a)) as f64 / secs,
            _ => 0.0,
        }
    }
}

/// One backend as the bound sees it: its load, its (ramped) weight, whether it was over.
#[derive(Clone, Copy, Debug)]
pub struct Judged {
    pub load: f64,
    pub weight: f64,
    pub was_over: bool,
}

/// For each backend taking new clients: whether it is over the bound now, and its bound (the
/// load above which it is over; 0 when the service is too quiet to judge).
pub fn bounds(backends: &[Judged], load_bound: f64, min_total: f64) -> Vec<(bool, f64)> {
    let total: f64 = backends.iter().map(|b| b.load).sum();
    let weights: f64 = backends.iter().map(|b| b.weight).sum();
    if total < min_total || weights <= 0.0 {
        return backends.iter().map(|_| (false, 0.0)).collect();
    }
    backends
        .iter()
        .map(|b| {
            let share = total * b.weight / weights;
            let bound = load_bound * share;
            let clear = share + CLEAR * (bound - share);
            let over = if b.was_over { b.load > clear } else { b.load > bound };
            (over, bound)
        })
        .collect()
}

/// The ramp step (1..=RAMP_STEPS) `elapsed` into a slow start of `slow_start`: linear, rounded
/// up, so the first step is taken at once and the last when the time is up.
pub fn ramp_step(elapsed: Duration, slow_start: Duration) -> u32 {
    if slow_start.is_zero() {
        return RAMP_STEPS;
    }
    let f = elapsed.as_secs_f64() / slow_start.as_secs_f64();
    ((f * RAMP_STEPS as f64).ceil() as u32).clamp(1, RAMP_STEPS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(load: f64, weight: f64) -> Judged {
        Judged { load, weight, was_over: false }
    }

    #[test]
    fn a_backend_above_its_weighted_share_times_the_bound_is_over() {
        // Mean 250: 1.25 x 250 = 312.5.
        let r = bounds(&[j(700.0, 1.0), j(100.0, 1.0), j(100.0, 1.0), j(100.0, 1.0)], 1.25, 20.0);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [true, false, false, false]);
        assert!((r[0].1 - 312.5).abs() < 1e-9);
        // Weights count: a backend of weight 3 carries 3/4 of the load within its bound.
        let r = bounds(&[j(650.0, 3.0), j(350.0, 1.0)], 1.25, 20.0);
        assert_eq!((r[0].0, r[1].0), (false, true), "{r:?}");
    }

    #[test]
    fn hysteresis_and_quiet_services() {
        // Share 250, bound 312.5, clear line 250 + 0.8 * 62.5 = 300.
        let was = |load| Judged { load, weight: 1.0, was_over: true };
        let r = bounds(&[was(305.0), j(265.0, 1.0), j(215.0, 1.0), j(215.0, 1.0)], 1.25, 20.0);
        assert!(r[0].0, "305 > clear 300: still over {r:?}");
        let r = bounds(&[was(290.0), j(270.0, 1.0), j(220.0, 1.0), j(220.0, 1.0)], 1.25, 20.0);
        assert!(!r[0].0, "290 < clear 300: back {r:?}");
        assert!(bounds(&[j(10.0, 1.0), j(0.0, 1.0)], 1.25, 20.0).iter().all(|x| !x.0 && x.1 == 0.0));
    }

    #[test]
    fn every_backend_over_is_possible_and_left_to_the_table() {
        // With one backend its share is everything: it can never be over 1.25x of it.
        assert!(!bounds(&[j(1000.0, 1.0)], 1.25, 20.0)[0].0);
    }

    #[test]
    fn ramps_are_linear_in_steps() {
        let ss = Duration::from_secs(20);
        assert_eq!(ramp_step(Duration::ZERO, ss), 1);
        assert_eq!(ramp_step(Duration::from_secs(5), ss), 5);
        assert_eq!(ramp_step(Duration::from_millis(5001), ss), 6);
        assert_eq!(ramp_step(Duration::from_secs(20), ss), RAMP_STEPS);
        assert_eq!(ramp_step(Duration::from_secs(99), ss), RAMP_STEPS);
    }

    #[test]
    fn loads_are_rates_over_the_window() {
        let t = Instant::now();
        let mut l = Loads::default();
        let s = |p: u64| BTreeMap::from([(7u32, (p, p * 100, p / 10))]);
        l.add(t, s(0));
        l.add(t + Duration::from_millis(500), s(500));
        l.add(t + Duration::from_millis(1000), s(1000));
        assert!((l.rate(7, LoadKind::Packets) - 1000.0).abs() < 1e-6);
        assert!((l.rate(7, LoadKind::Bytes) - 100_000.0).abs() < 1e-3);
        assert_eq!(l.rate(8, LoadKind::Packets), 0.0);
        // Older samples leave the window.
        for k in 3..10u64 {
            l.add(t + Duration::from_millis(500 * k), s(1000 + (k - 2) * 200));
        }
        assert!((l.rate(7, LoadKind::Packets) - 400.0).abs() < 1e-6, "{}", l.rate(7, LoadKind::Packets));
    }

    #[test]
    fn a_prefix_bringing_more_than_its_share_of_new_connections_is_hot() {
        let k = |a: u32| lb_common::AffinityKey { service_id: 3, addr: [a, 0, 0, 0] };
        let t = Instant::now();
        let mut h = HotPrefixes::default();
        h.add(t, BTreeMap::from([(k(1), 100), (k(2), 50)]));
        assert!(h.hot(3, 0.2).is_empty(), "one sample: no rate yet");
        h.add(t + Duration::from_secs(1), BTreeMap::from([(k(1), 130), (k(2), 52), (k(3), 8)]));
        // 30 of 40 new connections: 75 %; k(3): 8 of 40 = 20 %, not more than 0.2.
        let hot = h.hot(3, 0.2);
        assert_eq!(hot.len(), 1, "{hot:?}");
        assert_eq!(hot[0].0, k(1));
        assert!((hot[0].1 - 0.75).abs() < 1e-9);
        assert!(h.hot(4, 0.2).is_empty(), "another service");
        h.split.insert(k(1));
        assert!(h.hot(3, 0.2).is_empty(), "split already");
        // Too few new connections to judge.
        let mut q = HotPrefixes::default();
        q.add(t, BTreeMap::from([(k(1), 0)]));
        q.add(t + Duration::from_secs(1), BTreeMap::from([(k(1), 9)]));
        assert!(q.hot(3, 0.2).is_empty());
    }
}
