//! The backends' health history (since when each is in its state, and why) across a restart.
//! The pinned maps carry each backend's state, not its story: a daemon that stops writes the
//! story to a file of its pin path under [`DIR`] (tmpfs: it lasts as long as the pins, until a
//! reboot), and the next daemon that adopts those pins reads it back for every backend still in
//! the same state. `lb down` removes it with the pins.

use std::{
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{api::Admin, state::Runtime};

/// Where the history files live, one per pin path.
pub const DIR: &str = "/run/lb/history";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Entry {
    service: String,
    address: IpAddr,
    port: u16,
    healthy: bool,
    admin: Admin,
    /// Milliseconds since the Unix epoch.
    since_ms: u64,
    reason: String,
}

/// The history file of `pin_path`: its path with `%` and `/` escaped, so that two pin paths
/// never share one.
fn file(pin_path: &Path) -> PathBuf {
    let name = pin_path.to_string_lossy().replace('%', "%25").replace('/', "%2F");
    Path::new(DIR).join(format!("{name}.json"))
}

/// Writes the history of every backend of `rt` (replacing the file whole).
pub fn save(pin_path: &Path, rt: &Runtime) -> Result<()> {
    let entries: Vec<Entry> = rt
        .services
        .iter()
        .flat_map(|s| {
            s.backends.iter().map(|b| Entry {
                service: s.config.name.clone(),
                address: b.config.address,
                port: b.config.port,
                healthy: b.healthy,
                admin: b.admin,
                since_ms: b.changed_at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                reason: b.reason.clone(),
            })
        })
        .collect();
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(DIR).with_context(|| format!("creating {DIR}"))?;
    let path = file(pin_path);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(serde_json::to_string(&entries)?.as_bytes()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Gives each backend of `rt` the history saved for it, when the saved state is still its state
/// (same service, address and port, same health verdict and admin state); returns how many got
/// theirs. The file is removed: it describes the daemon that wrote it, not a later one.
pub fn restore(pin_path: &Path, rt: &mut Runtime) -> usize {
    let path = file(pin_path);
    let Ok(text) = std::fs::read_to_string(&path) else { return 0 };
    let _ = std::fs::remove_file(&path);
    let entries: Vec<Entry> = match serde_json::from_str(&text) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable health history");
            return 0;
        }
    };
    let mut n = 0;
    for s in &mut rt.services {
        for b in &mut s.backends {
            let saved = entries.iter().find(|e| {
                e.service == s.config.name && e.address == b.config.address && e.port == b.config.port
            });
            if let Some(e) = saved
                && e.healthy == b.healthy
                && e.admin == b.admin
            {
                b.changed_at = SystemTime::UNIX_EPOCH + Duration::from_millis(e.since_ms);
                b.reason = e.reason.clone();
                n += 1;
            }
        }
    }
    n
}

/// Removes the history of `pin_path` (`lb down`).
pub fn forget(pin_path: &Path) {
    let _ = std::fs::remove_file(file(pin_path));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_never_collide() {
        assert_ne!(file(Path::new("/a/b_c")), file(Path::new("/a_b/c")));
        assert_ne!(file(Path::new("/a%2Fb")), file(Path::new("/a/b")));
        assert!(file(Path::new("/sys/fs/bpf/lb")).starts_with(DIR));
    }
}
