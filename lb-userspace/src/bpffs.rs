//! The pin directory: found on a BPF filesystem, or a BPF filesystem mounted for it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::statfs::statfs,
};

/// Entries the kernel puts in the root of every new bpffs when bpf_preload is built in.
const PRELOADED: [&str; 2] = ["maps.debug", "progs.debug"];

/// statfs(2) magic of bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(p: &Path) -> bool {
    // The f_type field is i64 on some targets and u32/i32 on others.
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between targets")]
    let is = statfs(p).map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC).unwrap_or(false);
    is
}

/// Whether `p` is itself the mount point of a bpffs (per /proc/self/mountinfo).
fn is_bpffs_mountpoint(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = p.to_string_lossy();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        // mount point is field 5; the filesystem type follows the " - " separator.
        let fstype = f.iter().position(|x| *x == "-").and_then(|i| f.get(i + 1));
        f.get(4).is_some_and(|m| *m == want) && fstype.is_some_and(|t| *t == "bpf")
    })
}

/// A pin directory on a BPF filesystem.
#[derive(Debug)]
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    /// An existing pin directory (for `lb down`).
    pub fn existing(path: &Path) -> Self {
        Self { path: path.into() }
    }

    /// Makes `path` a directory on a bpffs:
    /// - already on bpffs: use it (creating it inside its bpffs parent if needed);
    /// - its nearest existing ancestor is an empty directory that is not bpffs (as `/sys/fs/bpf`
    ///   is inside `ip netns exec` or a container): mount bpffs there, then create `path`;
    /// - otherwise create `path` and mount a bpffs on it.
    pub fn prepare(path: &Path) -> Result<Self> {
        if !path.is_absolute() {
            bail!("datapath.pin_path {}: must be an absolute path", path.display());
        }
        if path.is_dir() && is_bpffs(path) {
            return Ok(Self { path: path.into() });
        }
        let ancestor = path.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
        if !ancestor.is_dir() {
            bail!("datapath.pin_path {}: {} is not a directory", path.display(), ancestor.display());
        }
        if is_bpffs(ancestor) {
            std::fs::create_dir_all(path).with_context(|| format!("creating pin directory {}", path.display()))?;
            return Ok(Self { path: path.into() });
        }
        let empty = std::fs::read_dir(ancestor).map(|mut d| d.next().is_none()).unwrap_or(false);
        if ancestor != path && empty && ancestor != Path::new("/") {
            mount_bpffs(ancestor)?;
            tracing::info!(at = %ancestor.display(), "mounted bpffs");
            std::fs::create_dir_all(path).with_context(|| format!("creating pin directory {}", path.display()))?;
            return Ok(Self { path: path.into() });
        }
        std::fs::create_dir_all(path).with_context(|| format!("creating pin directory {}", path.display()))?;
        mount_bpffs(path)?;
        tracing::info!(at = %path.display(), "mounted bpffs");
        Ok(Self { path: path.into() })
    }

    /// Removes the pins named `names`; then, if the directory is a bpffs mounted right on it and
    /// nothing else is pinned there, unmounts it (a shared bpffs with other pins stays).
    pub fn release(&self, names: &[&str]) {
        for n in names {
            let p = self.path.join(n);
            if let Err(e) = std::fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(pin = %p.display(), error = %e, "removing pin");
            }
        }
        // A fresh bpffs root may hold the kernel's preloaded iterators (bpf_preload): not pins.
        let empty = std::fs::read_dir(&self.path)
            .map(|d| d.filter_map(|e| e.ok()).all(|e| PRELOADED.contains(&e.file_name().to_string_lossy().as_ref())))
            .unwrap_or(false);
        if empty
            && is_bpffs_mountpoint(&self.path)
            && let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH)
        {
            tracing::warn!(at = %self.path.display(), error = %e, "unmounting bpffs");
        }
    }
}

fn mount_bpffs(at: &Path) -> Result<()> {
    mount(Some("bpf"), at, Some("bpf"), MsFlags::empty(), None::<&str>).with_context(|| {
        format!("mounting bpffs at {} (is this a privileged container?)", at.display())
    })
}

/// The one-daemon-per-pin-directory lock: an exclusive flock(2) on the pin directory itself
/// (bpffs holds no regular files, but any directory can be locked), held for the daemon's life
/// and released by the kernel when it exits, however it exits.
#[derive(Debug)]
pub struct PinLock {
    _dir: std::fs::File,
}

impl PinLock {
    /// Takes the lock, or fails naming the pid of the daemon that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd as _;
        let f = std::fs::File::open(dir).with_context(|| format!("opening pin directory {}", dir.display()))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Self { _dir: f });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("locking pin directory {}", dir.display()));
        }
        let who = match lock_holder(dir) {
            Some(pid) => format!("lb (pid {pid})"),
            None => "another lb".to_string(),
        };
        bail!(
            "datapath.pin_path {}: {who} is already running on it; one daemon per pin path \
             (stop that one first, or give this one another pin_path)",
            dir.display()
        )
    }
}

/// The pid holding a flock on `path`, from /proc/locks (pids as this pid namespace sees them).
pub fn lock_holder(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    let (dev, ino) = (m.dev(), m.ino());
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        // "1: FLOCK  ADVISORY  WRITE 4242 00:2d:11 0 EOF"
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str())).then(|| f.get(4)?.parse().ok()).flatten()
    })
}
