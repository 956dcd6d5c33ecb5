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

    /// Makes `path` a directory on a bpffs, as [`plan`] says.
    pub fn prepare(path: &Path) -> Result<Self> {
        let create = || std::fs::create_dir_all(path).with_context(|| format!("creating pin directory {}", path.display()));
        match plan(path)? {
            Plan::Ready => {}
            Plan::Create => create()?,
            Plan::Mount(at) => {
                if at != path {
                    mount_bpffs(&at)?;
                    create()?;
                } else {
                    create()?;
                    mount_bpffs(path)?;
                }
                tracing::info!(at = %at.display(), "mounted bpffs");
            }
        }
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

/// Why a mount made now would be gone once this process exits, if it would: mounts live as long
/// as their mount namespace, and a namespace that holds nobody but this process and its
/// ancestors (who wait for it) ends with it. `ip netns exec` runs its command in such a
/// namespace, made for it alone; so does a container whose first process is lb.
fn mount_would_die_with_us() -> Option<&'static str> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let ours = ns("self")?;
    let me = std::process::id();
    let mut keep = vec![me];
    // The parent chain, from /proc/PID/stat's fourth field (after the parenthesised name).
    let mut pid = me;
    while let Some(parent) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<u32>().ok()))
        .filter(|p| *p != 0 && !keep.contains(p))
    {
        keep.push(parent);
        pid = parent;
    }
    let others = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| !keep.contains(p))
        .any(|p| ns(&p.to_string()).as_ref() == Some(&ours));
    if others {
        None
    } else if in_container() {
        Some("this container's mount namespace holds nobody but lb and its parents")
    } else {
        Some("this process has a mount namespace of its own, as `ip netns exec` gives it")
    }
}

/// What [`PinDir::prepare`] does for a pin path.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// A directory on a bpffs already.
    Ready,
    /// Created inside the bpffs it is under.
    Create,
    /// A bpffs is mounted here (then the path is created in it, if it is not the path itself).
    Mount(PathBuf),
}

/// How `path` becomes a pin directory, or why it cannot be one that outlives lb:
/// - already on bpffs: use it (creating it inside its bpffs parent if needed);
/// - its nearest existing ancestor is an empty directory that is not bpffs (as `/sys/fs/bpf`
///   is inside a container or on a host without one): mount bpffs there, then create `path`;
/// - otherwise create `path` and mount a bpffs on it;
///
/// and refused when that mount would end with this process (see [`mount_would_die_with_us`]):
/// the pinned datapath would go with it, though lb says a stopped daemon leaves it running.
pub fn plan(path: &Path) -> Result<Plan> {
    if !path.is_absolute() {
        bail!("datapath.pin_path {}: must be an absolute path", path.display());
    }
    if path.is_dir() && is_bpffs(path) {
        return Ok(Plan::Ready);
    }
    let ancestor = path.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    if !ancestor.is_dir() {
        bail!("datapath.pin_path {}: {} is not a directory", path.display(), ancestor.display());
    }
    if is_bpffs(ancestor) {
        return Ok(Plan::Create);
    }
    let empty = std::fs::read_dir(ancestor).map(|mut d| d.next().is_none()).unwrap_or(false);
    let at = if ancestor != path && empty && ancestor != Path::new("/") { ancestor } else { path };
    if let Some(why) = mount_would_die_with_us() {
        bail!(
            "datapath.pin_path {}: no bpffs there, and one mounted at {} would end when lb stops ({why}), \
             taking the datapath with it; {}",
            path.display(),
            at.display(),
            if in_container() {
                "mount bpffs on the host (mount -t bpf bpf /sys/fs/bpf) and pass it in (-v /sys/fs/bpf:/sys/fs/bpf)"
            } else {
                "start lb with `lb --netns NAME run ...` (or `nsenter --net=/run/netns/NAME lb run ...`) instead of `ip netns exec`; \
                 in a container, pass the host's bpffs in (-v /sys/fs/bpf:/sys/fs/bpf)"
            }
        );
    }
    Ok(Plan::Mount(at.into()))
}

/// Whether this process is the first of its pid namespace, as lb is when it is a container's
/// entry point.
fn in_container() -> bool {
    std::process::id() == 1
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
