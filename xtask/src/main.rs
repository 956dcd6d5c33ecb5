//! `cargo xtask`: set up the toolchain, build, run the lab demo, run every test layer.
//!
//! Every step installs what it is missing first, so a bare machine needs nothing by hand:
//! nightly `rust-src` (for `-Z build-std=core`), `llvm-22-dev` and `bpf-linker` (to link the eBPF
//! object with BTF), and the Debian tools the lab and the tests use (`iproute2`, `ethtool`, BIRD,
//! `systemd-analyze`, ...).

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages: (package, a file it installs that tells whether it is there).
const APT_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "/usr/sbin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("procps", "/usr/sbin/sysctl"),
    ("curl", "/usr/bin/curl"),
    // The scale-out tests: BIRD on the router and the balancer nodes, nft to cut health checks.
    ("bird2", "/usr/sbin/bird"),
    ("nftables", "/usr/sbin/nft"),
    // tests/packaging.rs: `systemd-analyze verify` of packaging/lb.service (works without systemd running).
    ("systemd", "/usr/bin/systemd-analyze"),
];

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent, quick when all is there).
    Setup,
    /// Build the release binary at target/release/lb.
    Build,
    /// Without arguments: the namespace lab demo. With arguments: `lb <args>`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: figures printed side by side from one run, never asserted.
    Bench {
        /// Fewer repetitions (3 instead of 7).
        #[arg(long)]
        quick: bool,
    },
    /// The container image `lb:<version>` and `lb:latest` (packaging/Containerfile), on a base
    /// made here from this machine's C runtime: no registry needed.
    Image,
    /// Unit tests, datapath fixtures (BPF_PROG_TEST_RUN) and end-to-end tests in namespaces.
    Test {
        /// Only run tests whose name contains this (passed to every test binary).
        filter: Option<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build => setup().and_then(|_| build_release()).map(|lb| println!("built {}", lb.display())),
        Cmd::Run { args } => run(args),
        Cmd::Test { filter } => test(filter.as_deref()),
        Cmd::Bench { quick } => bench(quick),
        Cmd::Image => image(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command, failing with its command line when it does not succeed.
fn sh(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> Result<()> {
    ensure_apt(APT_PACKAGES)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    println!("xtask: installing Debian packages: {}", pkgs.join(" "));
    sh(Command::new("apt-get").arg("update").arg("-qq"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_apt(pkgs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().filter(|(_, f)| !Path::new(f).exists()).map(|(p, _)| *p).collect();
    if missing.is_empty() { Ok(()) } else { apt_install(&missing) }
}

fn ensure_nightly_rust_src() -> Result<()> {
    let sysroot = match output_ok(Command::new("rustc").args(["+nightly", "--print", "sysroot"])) {
        Some(s) => PathBuf::from(s.trim()),
        None => {
            println!("xtask: installing the nightly toolchain");
            sh(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
            let s = output_ok(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
                .context("nightly rustc still missing after install")?;
            PathBuf::from(s.trim())
        }
    };
    let src = sysroot.join("lib/rustlib/src/rust/library/core");
    if src.exists() {
        return Ok(());
    }
    println!("xtask: adding rust-src to the nightly toolchain");
    if sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"])).is_ok()
        && src.exists()
    {
        return Ok(());
    }
    // Offline fallback: the same component, packed in ../shared/toolchain for this exact nightly.
    let shared = workspace_root().join("../shared/toolchain");
    let archive = std::fs::read_dir(&shared)
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("rust-src-nightly")))
        })
        .with_context(|| format!("rustup could not add rust-src and {} has no fallback", shared.display()))?;
    let dest = sysroot.join("lib/rustlib/src");
    std::fs::create_dir_all(&dest)?;
    println!("xtask: unpacking {}", archive.display());
    sh(Command::new("tar").arg("-C").arg(&dest).arg("-xJf").arg(&archive))?;
    if !src.exists() {
        bail!("rust-src from {} did not provide {}", archive.display(), src.display());
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(v) = output_ok(Command::new("bpf-linker").arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        apt_install(&["llvm-22-dev"])?;
    }
    println!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (links the XDP object with BTF)");
    sh(Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--no-default-features"])
        .args(["--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX))
}

fn build_release() -> Result<PathBuf> {
    sh(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "lb"]))?;
    let lb = workspace_root().join("target/release/lb");
    if !lb.exists() {
        bail!("{} was not produced", lb.display());
    }
    Ok(lb)
}

fn image() -> Result<()> {
    setup()?;
    let lb = build_release()?;
    if let Some(why) = xtask::image::engine_missing() {
        bail!("no Docker engine to build the image with: {why}");
    }
    let version = format!("lb:{}", env!("CARGO_PKG_VERSION"));
    let id = xtask::image::build(&workspace_root(), &lb, &version)?;
    sh(Command::new("docker").args(["tag", &version, "lb:latest"]))?;
    println!("built image {version} (also lb:latest), {id}");
    Ok(())
}

fn run(args: Vec<String>) -> Result<()> {
    setup()?;
    let lb = build_release()?;
    if args.is_empty() {
        if !xtask::lab::is_root() {
            bail!("the lab demo creates network namespaces and loads XDP: run it as root");
        }
        return xtask::demo::run(&lb);
    }
    let status = Command::new(&lb).args(&args).status().with_context(|| format!("starting {}", lb.display()))?;
    if !status.success() {
        bail!("lb exited with {status}");
    }
    Ok(())
}

fn bench(quick: bool) -> Result<()> {
    setup()?;
    if !xtask::lab::is_root() {
        bail!("the benchmarks load XDP programs and create namespaces: run as root");
    }
    let lb = build_release()?;
    let dir = workspace_root().join("target/bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let reps = if quick { "3" } else { "7" };
    let runs: [(&str, &[&str]); 4] = [
        ("control plane: Maglev build, reload of 1000 services", &["bench", "-p", "lb-userspace", "--bench", "control"]),
        ("datapath: per packet (BPF_PROG_TEST_RUN), table scale, veth", &["bench", "-p", "tests", "--bench", "datapath"]),
        ("end to end: wrk through lb, HAProxy, nginx", &["bench", "-p", "tests", "--bench", "e2e"]),
        ("scale-out: failover convergence of two nodes behind ECMP (BIRD)", &["bench", "-p", "tests", "--bench", "cluster"]),
    ];
    let mut failed = Vec::new();
    for (what, args) in runs {
        println!("\n== {what}");
        let mut c = cargo();
        c.args(args).env("LB_BENCH_REPS", reps).env("LB_BIN", &lb);
        if quick {
            c.env("LB_BENCH_QUICK", "1");
        }
        // One failing benchmark does not hide the others' figures.
        if let Err(e) = sh(&mut c) {
            eprintln!("xtask: {e:#}");
            failed.push(what);
        }
    }
    // Merge every section the benchmarks wrote into one report.
    let mut report = serde_json::Map::new();
    for entry in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "json") && p.file_name().is_some_and(|n| n != "report.json") {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
                .with_context(|| format!("parsing {}", p.display()))?;
            if let serde_json::Value::Object(m) = v {
                report.extend(m);
            }
        }
    }
    let out = dir.join("report.json");
    std::fs::write(&out, serde_json::to_string_pretty(&serde_json::Value::Object(report.clone()))?)?;
    println!("\n== report ({})", out.display());
    for (section, v) in &report {
        if let serde_json::Value::Object(m) = v {
            for (k, x) in m {
                println!("  {section:<11} {k:<16} {x}");
            }
        }
    }
    if !failed.is_empty() {
        bail!("benchmarks failed: {}", failed.join("; "));
    }
    Ok(())
}

fn test(filter: Option<&str>) -> Result<()> {
    setup()?;
    if !xtask::lab::is_root() {
        bail!("the datapath and end-to-end tests load XDP programs and create namespaces: run as root");
    }
    let lb = build_release()?;
    let with_filter = |c: &mut Command| {
        if let Some(f) = filter {
            c.arg(f);
        }
    };
    println!("\n== unit and property tests");
    let mut c = cargo();
    c.args(["test", "-p", "lb-common", "-p", "lb-userspace", "-p", "xtask", "--", "--test-threads=2"]);
    with_filter(&mut c);
    sh(&mut c)?;
    println!("\n== datapath tests (BPF_PROG_TEST_RUN)");
    let mut c = cargo();
    c.args(["test", "-p", "tests", "--test", "datapath", "--test", "breadth", "--test", "corpus", "--test", "flows", "--test", "packaging", "--"]);
    with_filter(&mut c);
    sh(&mut c)?;
    println!("\n== end-to-end tests (network namespaces, real servers)");
    let mut c = cargo();
    c.args(["test", "-p", "tests", "--test", "e2e", "--test", "control", "--test", "breadth_e2e", "--test", "operator", "--test", "safe_e2e", "--", "--test-threads=1"])
        .env("LB_BIN", &lb);
    with_filter(&mut c);
    sh(&mut c)?;
    println!("\n== scale-out (two nodes with BIRD behind an ECMP router; figures printed)");
    let mut c = cargo();
    c.args(["test", "-p", "tests", "--test", "cluster", "--", "--test-threads=1", "--nocapture"]).env("LB_BIN", &lb);
    with_filter(&mut c);
    sh(&mut c)?;
    println!("\n== container image (the balancer run from it against a namespace lab)");
    match xtask::image::engine_missing() {
        Some(why) => println!("xtask: container test skipped: no Docker engine here ({why})"),
        None => {
            let mut c = cargo();
            c.args(["test", "-p", "tests", "--test", "container", "--"]).env("LB_BIN", &lb);
            with_filter(&mut c);
            sh(&mut c)?;
        }
    }
    println!("\nxtask: all test layers passed");
    Ok(())
}
