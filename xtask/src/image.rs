//! The container image, built without any registry: the base is the C runtime the `lb` binary
//! links against (found with `ldd`), copied from this machine into a root file system and
//! `docker import`ed as `lb-base:<digest>`; `packaging/Containerfile` adds the binary on top.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::lab::output_timeout;

/// Repository of the locally made base image.
pub const BASE_REPO: &str = "lb-base";

const DOCKER_TIMEOUT: Duration = Duration::from_secs(300);

fn docker(args: &[&str]) -> Result<String> {
    let out = output_timeout(Command::new("docker").args(args).env("DOCKER_BUILDKIT", "0"), DOCKER_TIMEOUT)
        .with_context(|| format!("running docker {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("docker {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Why there is no usable Docker engine here, if there is none.
pub fn engine_missing() -> Option<String> {
    match output_timeout(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]), Duration::from_secs(20)) {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`docker info` failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Some(format!("no docker client: {e:#}")),
    }
}

/// The shared objects `bin` loads (absolute paths, as the dynamic loader finds them).
fn shared_objects(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = output_timeout(Command::new("ldd").arg(bin), Duration::from_secs(30)).context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary needs nothing.
        ensure!(text.contains("not a dynamic executable"), "ldd {}: {}", bin.display(), text.trim());
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    ensure!(!libs.is_empty(), "ldd found no shared objects for {}:\n{text}", bin.display());
    Ok(libs)
}

/// Makes (once per content) the base image; returns its `lb-base:<digest>` name.
pub fn build_base(work: &Path, lb_bin: &Path) -> Result<String> {
    let rootfs = work.join("base");
    let _ = std::fs::remove_dir_all(&rootfs);
    for dir in ["etc/lb", "run/lb", "tmp", "proc", "sys", "dev", "usr/bin"] {
        std::fs::create_dir_all(rootfs.join(dir)).with_context(|| format!("creating {}", rootfs.join(dir).display()))?;
    }
    for lib in shared_objects(lb_bin)? {
        let dest = rootfs.join(lib.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(dest.parent().expect("a parent"))?;
        // Follows symlinks: the file itself lands at the path the loader asks for.
        std::fs::copy(&lib, &dest).with_context(|| format!("copying {} into the base", lib.display()))?;
    }
    let tar = work.join("base.tar");
    let out = output_timeout(
        Command::new("tar")
            .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        DOCKER_TIMEOUT,
    )?;
    ensure!(out.status.success(), "tar of the base failed: {}", String::from_utf8_lossy(&out.stderr));
    let sum = output_timeout(Command::new("sha256sum").arg(&tar), Duration::from_secs(30))?;
    let digest: String = String::from_utf8_lossy(&sum.stdout).chars().take(16).collect();
    ensure!(digest.len() == 16, "sha256sum of the base failed");
    let name = format!("{BASE_REPO}:{digest}");
    if docker(&["image", "inspect", "--format", "{{.Id}}", &name]).is_err() {
        docker(&["import", &tar.to_string_lossy(), &name]).context("docker import of the base")?;
    }
    Ok(name)
}

/// Builds the image `tag` from `packaging/Containerfile` with `lb_bin`; returns the image id.
pub fn build(workspace: &Path, lb_bin: &Path, tag: &str) -> Result<String> {
    let work = workspace.join("target/image");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let base = build_base(&work, lb_bin)?;
    let ctx = work.join("context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx)?;
    std::fs::copy(lb_bin, ctx.join("lb")).with_context(|| format!("copying {}", lb_bin.display()))?;
    std::fs::copy(workspace.join("packaging/Containerfile"), ctx.join("Containerfile")).context("copying the Containerfile")?;
    docker(&[
        "build",
        "-q",
        "--build-arg",
        &format!("BASE={base}"),
        "-t",
        tag,
        "-f",
        &ctx.join("Containerfile").to_string_lossy(),
        &ctx.to_string_lossy(),
    ])
    .context("docker build")
}
