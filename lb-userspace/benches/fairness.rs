//! Fairness benchmark (run by `cargo xtask bench`; figures printed, never asserted): a simulation
//! of new clients placed through the real selection code — the service's Maglev table as
//! `ServiceRt::desired_table` builds it, the datapath's client hash (`client_slot`), and the
//! bounded-loads judgement of `lb::balance` — with the load bound off and on.
//!
//! 100,000 clients with Zipf-distributed request rates (s = 1.1) share 70 % of the requests; one
//! "university" prefix (5,000 clients in 172.16.0.0/16) carries the other 30 %. Each client comes
//! for two sessions at random times (a session lasts 10 to 40 % of the run; arrival order is
//! independent of the rate); each request comes from a client in session, drawn by rate. A
//! session's first request places the client (its pin lasts the session; after it the pin has
//! timed out and the next session is placed afresh), its other requests follow the pin. Every
//! 10,000 requests the daemon's judgement runs on the loads of the last 30,000 requests (as the
//! daemon samples every 500 ms over 1.5 s) and the table is rebuilt when a backend crossed the
//! bound. Clients are placed per address (`ipv4_prefix = 32`). Reported: max/mean backend load over the
//! last 40 % of the run, off and on, and the share of pinned clients that moved within a session
//! (a pin is never re-placed: it must be 0).

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::Ipv4Addr,
    time::Instant,
};

use lb::{
    balance::{Judged, bounds, min_total},
    config::{Config, LoadKind},
    state::Runtime,
};
use lb_common::hash::client_slot;

const BACKENDS: u32 = 10;
const CLIENTS: u32 = 100_000;
const UNIVERSITY: u32 = 5_000;
const REQUESTS: u32 = 2_000_000;
const EVERY: u32 = 10_000;
const WINDOW_BUCKETS: usize = 3;

/// xorshift64*: deterministic, so both runs see the same request sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn config(bound: Option<f64>) -> String {
    let mut s = String::from("[datapath]\ninterfaces = [\"lo\"]\n[[services]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n");
    if let Some(b) = bound {
        let _ = write!(s, "[services.balance]\nload_bound = {b}\nload = \"packets\"\n");
    }
    for i in 0..BACKENDS {
        let _ = write!(s, "[[services.backends]]\naddress = \"10.1.0.{}\"\nport = 8080\n", i + 1);
    }
    s
}

/// Client addresses (network order words as the datapath hashes them) and request weights.
fn clients() -> (Vec<[u32; 4]>, Vec<f64>) {
    let mut addrs = Vec::new();
    let mut weights = Vec::new();
    // Zipf over the general population: 70 % of the requests. Addresses spread over 10.0.0.0/8
    // (an odd multiplier is a bijection mod 2^24).
    let h: f64 = (1..=CLIENTS).map(|r| (r as f64).powf(-1.1)).sum();
    for r in 1..=CLIENTS {
        let host = r.wrapping_mul(0x9e37_79b1) & 0x00ff_ffff;
        addrs.push([u32::from(Ipv4Addr::from(0x0a00_0000 | host)).to_be(), 0, 0, 0]);
        weights.push(0.7 * (r as f64).powf(-1.1) / h);
    }
    // The university: 30 %, evenly over its clients.
    for j in 0..UNIVERSITY {
        let host = j.wrapping_mul(0x9e37) & 0xffff;
        addrs.push([u32::from(Ipv4Addr::from(0xac10_0000 | host)).to_be(), 0, 0, 0]);
        weights.push(0.3 / UNIVERSITY as f64);
    }
    (addrs, weights)
}

struct Outcome {
    max_over_mean: f64,
    moved_share: f64,
    past_choice: u32,
    rebuilds: u32,
}

/// Weights that can be switched on one at a time, drawn from by weight (a Fenwick tree).
struct Active {
    tree: Vec<f64>,
}

impl Active {
    fn new(n: usize) -> Self {
        Self { tree: vec![0.0; n + 1] }
    }

    fn add(&mut self, i: usize, w: f64) {
        let mut k = i + 1;
        while k < self.tree.len() {
            self.tree[k] += w;
            k += k & k.wrapping_neg();
        }
    }

    fn total(&self) -> f64 {
        let mut k = self.tree.len() - 1;
        let mut s = 0.0;
        while k > 0 {
            s += self.tree[k];
            k &= k - 1;
        }
        s
    }

    /// The index whose cumulative weight first exceeds `x`.
    fn find(&self, mut x: f64) -> usize {
        let mut pos = 0;
        let mut step = (self.tree.len() - 1).next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next < self.tree.len() && self.tree[next] <= x {
                x -= self.tree[next];
                pos = next;
            }
            step >>= 1;
        }
        pos.min(self.tree.len() - 2)
    }
}

/// A session starts (`true`) or ends for client `c` at request number `at`.
type Event = (u32, bool, u32);

fn run(bound: Option<f64>, addrs: &[[u32; 4]], weights: &[f64], events: &[Event]) -> Outcome {
    let cfg = Config::parse(&config(bound)).expect("bench config");
    let m = cfg.datapath.maglev_table_size;
    let seed = cfg.datapath.hash_seed;
    let mut rt = Runtime::new(&cfg);
    let mut svc = rt.add_service(&cfg.services[0]).expect("service");
    let plain = svc.desired_table(m).0;
    let mut table = plain.clone();
    let ids: Vec<u32> = svc.backends.iter().map(|b| b.id).collect();
    let index: HashMap<u32, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    // The pin of each client in session, and where its session was placed.
    let mut pins: HashMap<u32, u32> = HashMap::new();
    let mut placed_at: HashMap<u32, u32> = HashMap::new();
    let (mut sessions, mut moved) = (0u64, 0u64);
    let mut window = vec![vec![0u64; ids.len()]; WINDOW_BUCKETS];
    let mut measured = vec![0u64; ids.len()];
    let (mut past_choice, mut rebuilds) = (0, 0);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut active = Active::new(addrs.len());
    let mut next_event = 0;
    for n in 0..REQUESTS {
        while next_event < events.len() && events[next_event].0 <= n {
            let (_, start, c) = events[next_event];
            let c = c as usize;
            active.add(c, if start { weights[c] } else { -weights[c] });
            if !start {
                // The session is over: its pin times out.
                if let (Some(p), Some(first)) = (pins.remove(&(c as u32)), placed_at.remove(&(c as u32))) {
                    moved += (p != first) as u64;
                    sessions += 1;
                }
            }
            next_event += 1;
        }
        if active.total() <= 0.0 {
            continue;
        }
        let c = active.find(rng.unit() * active.total()) as u32;
        let backend = *pins.entry(c).or_insert_with(|| {
            let slot = client_slot(seed, &addrs[c as usize], m) as usize;
            if table[slot] != plain[slot] {
                past_choice += 1;
            }
            placed_at.insert(c, table[slot]);
            table[slot]
        });
        let i = index[&backend];
        window[(n / EVERY) as usize % WINDOW_BUCKETS][i] += 1;
        if n >= REQUESTS / 10 * 6 {
            measured[i] += 1;
        }
        if (n + 1) % EVERY == 0 {
            if let Some(bound) = bound {
                // The daemon's judgement on the last WINDOW_BUCKETS * EVERY requests (the bucket
                // about to be reused is the oldest).
                let judged: Vec<Judged> = (0..ids.len())
                    .map(|i| Judged {
                        load: window.iter().map(|w| w[i]).sum::<u64>() as f64,
                        weight: svc.backends[i].config.weight as f64,
                        was_over: svc.backends[i].balance.over_bound,
                    })
                    .collect();
                let mut changed = false;
                for (b, (over, _)) in svc.backends.iter_mut().zip(bounds(&judged, bound, min_total(LoadKind::Packets))) {
                    changed |= b.balance.over_bound != over;
                    b.balance.over_bound = over;
                }
                if changed {
                    table = svc.desired_table(m).0;
                    rebuilds += 1;
                }
            }
            window[((n + 1) / EVERY) as usize % WINDOW_BUCKETS].iter_mut().for_each(|x| *x = 0);
        }
    }
    for (c, p) in &pins {
        moved += (placed_at[c] != *p) as u64;
        sessions += 1;
    }
    let mean = measured.iter().sum::<u64>() as f64 / ids.len() as f64;
    let max = *measured.iter().max().unwrap() as f64;
    if std::env::var_os("LB_FAIRNESS_DEBUG").is_some() {
        eprintln!("loads/mean: {:?}", measured.iter().map(|x| format!("{:.2}", *x as f64 / mean)).collect::<Vec<_>>());
    }
    Outcome { max_over_mean: max / mean, moved_share: moved as f64 / sessions.max(1) as f64, past_choice, rebuilds }
}

fn main() {
    let (addrs, weights) = clients();
    // Two sessions per client: the first starts in the first half of the run, the second after
    // a pause; each lasts 10 to 40 % of the run.
    let mut rng = Rng(0xa441_7a1b_0000_0042);
    let r = REQUESTS as f64;
    let mut events: Vec<Event> = Vec::new();
    for c in 0..addrs.len() as u32 {
        let mut start = rng.unit() * r * 0.5;
        for _ in 0..2 {
            let end = start + r * (0.1 + 0.3 * rng.unit());
            events.push((start as u32, true, c));
            events.push((end.min(r) as u32, false, c));
            start = end + rng.unit() * r * 0.2;
            if start >= r {
                break;
            }
        }
    }
    // Ends before starts at the same instant.
    events.sort_unstable_by_key(|(at, start, c)| (*at, *start, *c));
    let t = Instant::now();
    let off = run(None, &addrs, &weights, &events);
    let on = run(Some(1.25), &addrs, &weights, &events);
    println!(
        "fairness: {REQUESTS} requests from {} clients (Zipf s = 1.1, plus a /16 with 30 %), {BACKENDS} backends, simulated in {:.1} s",
        CLIENTS + UNIVERSITY,
        t.elapsed().as_secs_f64()
    );
    println!("  max/mean backend load, load bound off:   {:.3}", off.max_over_mean);
    println!(
        "  max/mean backend load, load_bound = 1.25: {:.3}   (goal <= 1.25; {} table rebuilds, {} clients placed past their Maglev choice)",
        on.max_over_mean, on.rebuilds, on.past_choice
    );
    println!("  pinned clients that moved within a session: off {:.4}, on {:.4}   (must be 0)", off.moved_share, on.moved_share);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let json = serde_json::json!({ "fairness": {
        "max_mean_off": off.max_over_mean,
        "max_mean_bound_1_25": on.max_over_mean,
        "moved_share": on.moved_share.max(off.moved_share),
        "past_choice": on.past_choice,
    }});
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join("fairness.json"), json.to_string())) {
        eprintln!("writing {}: {e}", dir.display());
    }
}
