//! The Debian package, built with `dpkg-deb` (no extra tool): `lb_<version>_amd64.deb` holding
//! the binary (`/usr/bin/lb`), the systemd units (pointed at it), a commented example
//! `/etc/lb/lb.toml` (a conffile: an upgrade keeps the operator's edits) and the man page
//! (`lb man`, generated from the CLI's own definitions).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::lab::output_timeout;

/// The package's version: the workspace's.
pub fn version(workspace: &Path) -> Result<String> {
    let toml = std::fs::read_to_string(workspace.join("Cargo.toml")).context("reading Cargo.toml")?;
    toml.lines()
        .find_map(|l| l.strip_prefix("version = \"").and_then(|v| v.strip_suffix('"')))
        .map(str::to_owned)
        .context("no version in the workspace Cargo.toml")
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = output_timeout(cmd, Duration::from_secs(120))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", path.display()))
}

/// Builds the package from `lb_bin` into `out_dir`; returns its path.
pub fn build(workspace: &Path, lb_bin: &Path, out_dir: &Path) -> Result<PathBuf> {
    let version = version(workspace)?;
    let root = out_dir.join(format!("lb_{version}_amd64"));
    let _ = std::fs::remove_dir_all(&root);
    write(&root.join("usr/bin/lb"), &std::fs::read(lb_bin).with_context(|| format!("reading {}", lb_bin.display()))?, 0o755)?;
    for unit in ["lb.service", "lb-agent.service"] {
        let text = std::fs::read_to_string(workspace.join("packaging").join(unit)).with_context(|| format!("reading {unit}"))?;
        write(&root.join("lib/systemd/system").join(unit), text.replace("/usr/local/bin/lb", "/usr/bin/lb").as_bytes(), 0o644)?;
    }
    write(&root.join("etc/lb/lb.toml"), &std::fs::read(workspace.join("packaging/lb.toml")).context("reading packaging/lb.toml")?, 0o644)?;
    // The man page, gzip'd as Debian wants it.
    let man = run(Command::new(lb_bin).arg("man")).context("lb man")?;
    ensure!(man.starts_with(b".ie"), "lb man printed no roff");
    let mut gz = Command::new("gzip").args(["-9n"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().context("gzip")?;
    gz.stdin.take().expect("piped").write_all(&man)?;
    let gz = gz.wait_with_output()?;
    ensure!(gz.status.success(), "gzip failed");
    write(&root.join("usr/share/man/man1/lb.1.gz"), &gz.stdout, 0o644)?;
    let installed_kb = walk_size(&root) / 1024;
    let control = format!(
        "Package: lb\nVersion: {version}\nArchitecture: amd64\nMaintainer: lb developers <lb@localhost>\nInstalled-Size: {installed_kb}\n\
         Depends: libc6\nSection: net\nPriority: optional\nDescription: sticky XDP layer-4 load balancer\n \
         lb balances TCP and UDP services in XDP with client-IP session affinity (a BPF LRU\n \
         affinity table, Maglev for new clients), health checks, drains, reloads and restarts that\n \
         move no client, and lb agent for stickiness to one process on a backend host.\n"
    );
    write(&root.join("DEBIAN/control"), control.as_bytes(), 0o644)?;
    write(&root.join("DEBIAN/conffiles"), b"/etc/lb/lb.toml\n", 0o644)?;
    let deb = out_dir.join(format!("lb_{version}_amd64.deb"));
    run(Command::new("dpkg-deb").args(["--build", "--root-owner-group"]).arg(&root).arg(&deb)).context("dpkg-deb --build")?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(deb)
}

fn walk_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() { walk_size(&p) } else { e.metadata().map_or(0, |m| m.len()) }
        })
        .sum()
}
