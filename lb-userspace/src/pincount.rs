//! Pin counts for `lb status`, the metrics and drains, kept by a background thread so that no
//! request ever scans the affinity table under the daemon lock.
//!
//! The thread copies what judging needs out of the model under the lock (a [`View`], without the
//! Maglev tables: microseconds), then scans the table through its own map handle without it, a
//! batch at a time. Counts are reported with their age. Counts start at most every [`PERIOD`],
//! or pause [`DUTY`] times their own duration when that is longer (a table of ten million pins
//! takes several seconds to scan: the thread then uses a tenth of one core), and start sooner
//! when asked ([`PinCounter::wake`]: a state change, a fresh status), though not before
//! `min(DUTY x duration, PERIOD)` after the last one ended.

use std::{
    collections::BTreeMap,
    sync::{Arc, Condvar, Mutex, Weak},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;

use crate::{
    affinity::{self, PinCounts, View},
    datapath::PinTable,
};

/// The shortest time between the starts of two scheduled counts.
pub const PERIOD: Duration = Duration::from_secs(2);
/// A count is followed by a pause of this many times its duration (at least [`PERIOD`]).
const DUTY: u32 = 9;

/// One finished count.
#[derive(Clone, Debug)]
pub struct Count {
    pub counts: PinCounts,
    /// When the scan started and how long it took.
    pub started: Instant,
    pub started_at: SystemTime,
    pub took: Duration,
}

#[derive(Default)]
struct Shared {
    latest: Option<Arc<Count>>,
    /// The latest count failed, and why (the previous counts stay).
    error: Option<String>,
    running: bool,
    /// Placements past the plain Maglev choice so far, by service name (`[services.balance]`).
    past_choice_total: BTreeMap<String, u64>,
    /// Start the next count as soon as the pause after the last allows it.
    woken: bool,
    stop: bool,
}

/// The counter's handle: the latest count, and a way to ask for a new one.
#[derive(Clone, Default)]
pub struct PinCounter {
    inner: Arc<(Mutex<Shared>, Condvar)>,
}

/// A snapshot of the counter for reports.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub latest: Option<Arc<Count>>,
    pub running: bool,
    pub error: Option<String>,
    /// Placements past the plain Maglev choice so far, by service name.
    pub past_choice_total: BTreeMap<String, u64>,
}

impl PinCounter {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest count (none before the first has finished), and whether one is running.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot { latest: s.latest.clone(), running: s.running, error: s.error.clone(), past_choice_total: s.past_choice_total.clone() }
    }

    /// Asks for a count soon: the counts no longer match the model (a backend changed state, a
    /// reload, a flush), or somebody waits for fresh ones.
    pub fn wake(&self) {
        self.lock().woken = true;
        self.inner.1.notify_all();
    }

    /// Waits (blocking; call from a blocking thread) until a count that started after this call
    /// has finished, at most `timeout`; returns it, or the latest one on timeout.
    pub fn fresh(&self, timeout: Duration) -> Option<Arc<Count>> {
        let asked = Instant::now();
        let deadline = asked + timeout;
        self.wake();
        let mut s = self.lock();
        loop {
            if let Some(c) = &s.latest
                && c.started >= asked
            {
                return Some(c.clone());
            }
            let now = Instant::now();
            if now >= deadline || s.stop {
                return s.latest.clone();
            }
            s = self.inner.1.wait_timeout(s, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Ends the thread after its current count.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.inner.1.notify_all();
    }

    /// Starts the counting thread. `view` is called for each count (it takes the daemon lock
    /// briefly); it returns None once the daemon is gone, which ends the thread.
    pub fn start<D: Send + 'static>(
        &self,
        table: PinTable,
        daemon: Weak<Mutex<D>>,
        view: fn(&D) -> View,
    ) -> Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name("lb-pin-count".into()).spawn(move || {
            loop {
                let Some(d) = daemon.upgrade() else { break };
                let v = {
                    let g = d.lock().unwrap_or_else(|p| p.into_inner());
                    view(&g)
                };
                drop(d);
                {
                    let mut s = me.lock();
                    if s.stop {
                        break;
                    }
                    s.running = true;
                    s.woken = false;
                }
                let (started, started_at) = (Instant::now(), SystemTime::now());
                let since = me.lock().latest.as_ref().map(|c| c.counts.scan_started_ns);
                let r = affinity::count(&v, &table, since);
                let took = started.elapsed();
                {
                    let mut s = me.lock();
                    s.running = false;
                    match r {
                        Ok(counts) => {
                            for (name, n) in &counts.past_choice {
                                *s.past_choice_total.entry(name.clone()).or_default() += n;
                            }
                            s.latest = Some(Arc::new(Count { counts, started, started_at, took }));
                            s.error = None;
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "counting pins");
                            s.error = Some(format!("{e:#}"));
                        }
                    }
                }
                me.inner.1.notify_all();
                // The pause: at least the period, and DUTY times the scan; a wake cuts the
                // period short but not the scan-proportional part.
                let rest = took * DUTY;
                let scheduled = started + PERIOD.max(rest + took);
                let earliest = Instant::now() + rest.min(PERIOD);
                let mut s = me.lock();
                loop {
                    let now = Instant::now();
                    if s.stop || now >= scheduled || (s.woken && now >= earliest) {
                        break;
                    }
                    let until = if s.woken { earliest } else { scheduled };
                    s = me.inner.1.wait_timeout(s, until.saturating_duration_since(now)).unwrap_or_else(|p| p.into_inner()).0;
                }
                if s.stop {
                    break;
                }
            }
        })?;
        Ok(())
    }
}
