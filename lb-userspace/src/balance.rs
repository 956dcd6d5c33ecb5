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
}
