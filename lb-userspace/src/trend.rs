//! The last minutes of every service and backend, one point per sample, for the status page's
//! charts (`GET /trend.json`): pins, new pins and packets per second, and moves.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Instant, SystemTime},
};

use crate::api::{BackendPoint, ServicePoint, TrendPoint, TrendReport};

/// Points kept: 15 minutes at one per 5 s.
pub const KEEP: usize = 180;

/// One backend as a sample sees it.
pub struct Seen {
    pub service_id: u32,
    pub backend_id: u32,
    pub service: String,
    pub backend: String,
    pub state: String,
    pub pinned: u64,
    /// The datapath's counters: pins made, packets forwarded.
    pub new_pins: u64,
    pub packets: u64,
}

/// Pins made and packets forwarded, by (service id, backend id).
type Counts = BTreeMap<(u32, u32), (u64, u64)>;

#[derive(Default)]
pub struct Trend {
    points: VecDeque<TrendPoint>,
    /// Counters by (service id, backend id) at the sample before, and when it was.
    last: Option<(Instant, Counts)>,
    /// The journal's last move at the sample before.
    pub last_seq: u64,
    every_secs: f64,
}

impl Trend {
    /// Adds a point: `moves` are the moves by service since the sample before.
    pub fn add(&mut self, now: Instant, wall: SystemTime, seen: Vec<Seen>, moves: BTreeMap<String, u64>) {
        let secs = self.last.as_ref().map(|(at, _)| now.duration_since(*at).as_secs_f64()).filter(|s| *s > 0.0);
        if let Some(s) = secs {
            self.every_secs = s;
        }
        let mut services: BTreeMap<String, ServicePoint> = BTreeMap::new();
        let mut counters = BTreeMap::new();
        for b in seen {
            let key = (b.service_id, b.backend_id);
            // A counter that went back belongs to a reused id: no rate for it this time.
            let rate = |now: u64, then: Option<u64>| match (secs, then) {
                (Some(s), Some(t)) if now >= t => (now - t) as f64 / s,
                _ => 0.0,
            };
            let before = self.last.as_ref().and_then(|(_, c)| c.get(&key).copied());
            let point = BackendPoint {
                state: b.state,
                pinned: b.pinned,
                new_pins_per_sec: rate(b.new_pins, before.map(|c| c.0)),
                packets_per_sec: rate(b.packets, before.map(|c| c.1)),
            };
            counters.insert(key, (b.new_pins, b.packets));
            services.entry(b.service).or_default().backends.insert(b.backend, point);
        }
        for (name, n) in moves {
            if let Some(s) = services.get_mut(&name) {
                s.moves = n;
            }
        }
        let at_ms = wall.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.points.push_back(TrendPoint { at_ms, services });
        while self.points.len() > KEEP {
            self.points.pop_front();
        }
        self.last = Some((now, counters));
    }

    pub fn report(&self) -> TrendReport {
        TrendReport { every_secs: self.every_secs, points: self.points.iter().cloned().collect() }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn seen(backend_id: u32, new_pins: u64, packets: u64) -> Seen {
        Seen {
            service_id: 1,
            backend_id,
            service: "web".into(),
            backend: format!("10.0.0.{backend_id}:80"),
            state: "up".into(),
            pinned: new_pins,
            new_pins,
            packets,
        }
    }

    #[test]
    fn points_carry_rates_between_samples_and_are_bounded() {
        let mut t = Trend::default();
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        t.add(t0, w0, vec![seen(1, 10, 100)], BTreeMap::new());
        t.add(t0 + Duration::from_secs(5), w0 + Duration::from_secs(5), vec![seen(1, 20, 600), seen(2, 5, 5)], BTreeMap::from([("web".into(), 3)]));
        let r = t.report();
        assert_eq!(r.every_secs, 5.0);
        assert_eq!(r.points.len(), 2);
        let web = &r.points[1].services["web"];
        assert_eq!(web.moves, 3);
        let b1 = &web.backends["10.0.0.1:80"];
        assert_eq!((b1.new_pins_per_sec, b1.packets_per_sec), (2.0, 100.0));
        // A backend new since the sample before has no rate yet.
        assert_eq!(web.backends["10.0.0.2:80"].new_pins_per_sec, 0.0);
        for i in 0..KEEP as u64 {
            t.add(t0 + Duration::from_secs(10 + i), w0, vec![seen(1, 20, 600)], BTreeMap::new());
        }
        assert_eq!(t.report().points.len(), KEEP);
    }
}
