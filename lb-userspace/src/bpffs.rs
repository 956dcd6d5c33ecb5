//! The pin directory: found on a BPF filesystem, or a BPF filesystem mounted for it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::statfs::statfs,
};

/// statfs(2) magic of bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(p: &Path) -> bool {
    statfs(p).map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC).unwrap_or(false)
}

/// A prepared pin directory. Remembers a bpffs it mounted on the directory itself, so that
/// [`PinDir::release`] can unmount it again.
#[derive(Debug)]
pub struct PinDir {
    pub path: PathBuf,
    mounted_here: bool,
}

impl PinDir {
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
            return Ok(Self { path: path.into(), mounted_here: false });
        }
        let ancestor = path.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
        if !ancestor.is_dir() {
            bail!("datapath.pin_path {}: {} is not a directory", path.display(), ancestor.display());
        }
        if is_bpffs(ancestor) {
            std::fs::create_dir_all(path).with_context(|| format!("creating pin directory {}", path.display()))?;
            return Ok(Self { path: path.into(), mounted_here: false });
        }
        let empty = std::fs::read_dir(ancestor).map(|mut d| d.next().is_none()).unwrap_or(false);
        if ancestor != path && empty && ancestor != Path::new("/") {
            mount_bpffs(ancestor)?;
            tracing::info!(at = %ancestor.display(), "mounted bpffs");
            std::fs::create_dir_all(path).with_context(|| format!("creating pin directory {}", path.display()))?;
            return Ok(Self { path: path.into(), mounted_here: false });
        }
        std::fs::create_dir_all(path).with_context(|| format!("creating pin directory {}", path.display()))?;
        mount_bpffs(path)?;
        tracing::info!(at = %path.display(), "mounted bpffs");
        Ok(Self { path: path.into(), mounted_here: true })
    }

    /// Removes the pins named `names` (and the bpffs this process mounted on the directory).
    pub fn release(&self, names: &[&str]) {
        for n in names {
            let p = self.path.join(n);
            if let Err(e) = std::fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(pin = %p.display(), error = %e, "removing pin");
            }
        }
        if self.mounted_here
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
