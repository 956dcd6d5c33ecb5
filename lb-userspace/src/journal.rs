//! The journal of moves: every move of a known client the datapath reports (`MOVES` ring
//! buffer: a pin re-placed onto another backend, with why), named (service, client key,
//! backends) as it arrives and kept in a bounded in-memory ring for `lb events`, `lb explain`'s
//! history and `lb_client_moves_total`. New pins are counted elsewhere, not journaled.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, SystemTime},
};

use crate::api::{EventsQuery, MoveRecord};

/// Moves kept in memory.
pub const DEFAULT_EVENTS: usize = 100_000;

/// Counts of recent moves ([`Journal::since`]).
#[derive(Default)]
pub struct RecentMoves {
    pub by_service: BTreeMap<String, u64>,
    /// By (service, backend `address:port` the client left).
    pub by_backend: BTreeMap<(String, String), u64>,
}

pub struct Journal {
    events: VecDeque<(SystemTime, MoveRecord)>,
    cap: usize,
    next: u64,
    /// Moves so far by (service, reason).
    pub counts: BTreeMap<(String, String), u64>,
    /// `control.journal`: the file moves are appended to, as JSON lines.
    file: Option<JournalFile>,
}

struct JournalFile {
    path: std::path::PathBuf,
    max: u64,
    size: u64,
    out: Option<std::fs::File>,
    /// A write failed: said once, not per move.
    failed: bool,
}

impl JournalFile {
    fn open(&mut self) -> std::io::Result<&mut std::fs::File> {
        if self.out.is_none() {
            if let Some(d) = self.path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
            self.size = f.metadata()?.len();
            self.out = Some(f);
        }
        Ok(self.out.as_mut().expect("opened above"))
    }

    /// Appends one line; a file that would pass `max` is first renamed to `<path>.1` (replacing
    /// the one before) and started anew.
    fn append(&mut self, line: &str) -> std::io::Result<()> {
        use std::io::Write as _;
        self.open()?;
        if self.size > 0 && self.size + line.len() as u64 + 1 > self.max {
            self.out = None;
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, old)?;
            self.open()?;
        }
        let f = self.open()?;
        f.write_all(line.as_bytes())?;
        f.write_all(b"\n")?;
        self.size += line.len() as u64 + 1;
        Ok(())
    }
}

impl Default for Journal {
    fn default() -> Self {
        Self { events: VecDeque::new(), cap: DEFAULT_EVENTS, next: 1, counts: BTreeMap::new(), file: None }
    }
}

impl Journal {
    /// Applies `control.journal*` (at start and on reload).
    pub fn configure(&mut self, c: &crate::config::JournalConfig) {
        self.cap = c.events.max(1);
        while self.events.len() > self.cap {
            self.events.pop_front();
        }
        match &c.path {
            None => self.file = None,
            Some(p) => {
                if self.file.as_ref().is_none_or(|f| f.path != *p) {
                    self.file = Some(JournalFile { path: p.clone(), max: c.max_size, size: 0, out: None, failed: false });
                } else if let Some(f) = &mut self.file {
                    f.max = c.max_size;
                }
            }
        }
    }

    /// Adds a move (its `seq` is set here).
    pub fn push(&mut self, at: SystemTime, mut r: MoveRecord) {
        r.seq = self.next;
        self.next += 1;
        *self.counts.entry((r.service.clone(), r.reason.clone())).or_default() += 1;
        tracing::debug!(service = %r.service, client = %r.client, from = %r.from, to = %r.to, reason = %r.reason, "client moved");
        if let Some(f) = &mut self.file {
            let line = serde_json::to_string(&r).unwrap_or_default();
            match f.append(&line) {
                Ok(()) => f.failed = false,
                Err(e) if !f.failed => {
                    tracing::warn!(file = %f.path.display(), error = %e, "writing the journal of moves (moves stay in memory)");
                    f.failed = true;
                    f.out = None;
                }
                Err(_) => f.out = None,
            }
        }
        self.events.push_back((at, r));
        while self.events.len() > self.cap {
            self.events.pop_front();
        }
    }

    /// The moves `q` asks for, oldest first; `keys`: the client's key per service, when `q`
    /// names a client.
    pub fn query(&self, q: &EventsQuery, keys: Option<&BTreeMap<String, String>>) -> Vec<MoveRecord> {
        let since = q.since.as_deref().and_then(|s| humantime::parse_duration(s).ok()).map(|d| SystemTime::now() - d);
        self.events
            .iter()
            .filter(|(at, r)| {
                since.is_none_or(|t| *at >= t)
                    && q.after.is_none_or(|a| r.seq > a)
                    && q.service.as_ref().is_none_or(|s| *s == r.service)
                    && q.backend.as_ref().is_none_or(|b| *b == r.from || *b == r.to)
                    && keys.is_none_or(|k| k.get(&r.service).is_some_and(|key| *key == r.client))
            })
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// The newest `n` moves, newest first.
    pub fn recent(&self, n: usize) -> Vec<MoveRecord> {
        self.events.iter().rev().take(n).map(|(_, r)| r.clone()).collect()
    }

    /// Moves since `since`, by service and by (service, backend moved off): read from the
    /// newest back, so it costs what the window holds, not the ring.
    pub fn since(&self, since: SystemTime) -> RecentMoves {
        let mut m = RecentMoves::default();
        for (_, r) in self.events.iter().rev().take_while(|(at, _)| *at >= since) {
            *m.by_service.entry(r.service.clone()).or_default() += 1;
            *m.by_backend.entry((r.service.clone(), r.from.clone())).or_default() += 1;
        }
        m
    }

    /// Moves pushed after the one numbered `seq`, by service.
    pub fn after(&self, seq: u64) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (_, r) in self.events.iter().rev().take_while(|(_, r)| r.seq > seq) {
            *m.entry(r.service.clone()).or_default() += 1;
        }
        m
    }

    /// The number of the last move pushed (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.next - 1
    }

    /// The last `n` moves of `client` (its key string) in `service`.
    pub fn history(&self, service: &str, client: &str, n: usize) -> Vec<MoveRecord> {
        let mut v: Vec<MoveRecord> =
            self.events.iter().rev().filter(|(_, r)| r.service == service && r.client == client).take(n).map(|(_, r)| r.clone()).collect();
        v.reverse();
        v
    }
}

/// Wall-clock time of a CLOCK_MONOTONIC timestamp, as of now.
pub fn wall_time(at_ns: u64) -> SystemTime {
    let now = crate::datapath::monotonic_coarse_ns();
    SystemTime::now() - Duration::from_nanos(now.saturating_sub(at_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(service: &str, client: &str, reason: &str) -> MoveRecord {
        MoveRecord { seq: 0, time: String::new(), service: service.into(), client: client.into(), from: "a:1".into(), to: "b:1".into(), reason: reason.into() }
    }

    #[test]
    fn a_bounded_journal_answers_queries() {
        let mut j = Journal { cap: 3, ..Default::default() };
        for (c, reason) in [("10.0.0.1", "backend_down"), ("10.0.0.2", "expired"), ("10.0.0.1", "drain_force"), ("10.0.0.3", "backend_down")] {
            j.push(SystemTime::now(), r("web", c, reason));
        }
        // The oldest went; counts keep everything.
        assert_eq!(j.events.len(), 3);
        assert_eq!(j.counts[&("web".to_string(), "backend_down".to_string())], 2);
        let q = EventsQuery { after: Some(2), ..Default::default() };
        assert_eq!(j.query(&q, None).iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
        let keys = BTreeMap::from([("web".to_string(), "10.0.0.1".to_string())]);
        assert_eq!(j.query(&EventsQuery::default(), Some(&keys)).len(), 1);
        assert_eq!(j.history("web", "10.0.0.1", 5)[0].reason, "drain_force");
        assert_eq!(j.recent(2).iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 3]);
        assert_eq!(j.after(2)["web"], 2);
    }

    #[test]
    fn recent_moves_count_only_the_window() {
        let mut j = Journal::default();
        let now = SystemTime::now();
        j.push(now - Duration::from_secs(120), r("web", "10.0.0.1", "backend_down"));
        j.push(now - Duration::from_secs(30), r("web", "10.0.0.2", "backend_down"));
        let mut other = r("web", "10.0.0.3", "expired");
        other.from = "c:1".into();
        j.push(now, other);
        j.push(now, r("api", "10.0.0.4", "flushed"));
        let m = j.since(now - Duration::from_secs(60));
        assert_eq!(m.by_service["web"], 2);
        assert_eq!(m.by_service["api"], 1);
        assert_eq!(m.by_backend[&("web".to_string(), "a:1".to_string())], 1);
        assert_eq!(m.by_backend[&("web".to_string(), "c:1".to_string())], 1);
    }

    #[test]
    fn the_journal_file_is_capped_and_rotated() {
        let dir = std::env::temp_dir().join(format!("lb-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("moves.jsonl");
        let mut j = Journal::default();
        j.configure(&crate::config::JournalConfig { path: Some(path.clone()), max_size: 600, events: 10 });
        for i in 0..20 {
            j.push(SystemTime::now(), r("web", &format!("10.0.0.{i}"), "backend_down"));
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.join("moves.jsonl.1")).unwrap();
        assert!(now.len() <= 600 && old.len() <= 600, "{} {}", now.len(), old.len());
        for l in now.lines().chain(old.lines()) {
            let m: MoveRecord = serde_json::from_str(l).unwrap();
            assert_eq!(m.reason, "backend_down");
        }
        assert!(now.contains("\"seq\":20"), "the newest is in the current file: {now}");
        assert_eq!(j.events.len(), 10, "the ring keeps journal_events");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
