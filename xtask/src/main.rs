//! `cargo xtask`: set up the toolchain, build, run the lab demo, run every test layer.
//!
//! Every step installs what it is missing first, so a bare machine needs nothing by hand:
//! nightly `rust-src` (for `-Z build-std=core`), `llvm-22-dev` and `bpf-linker` (to link the eBPF
//! object with BTF), and the Debian tools the lab and the tests use (`iproute2`, `ethtool`, BIRD,
//! `systemd-analyze`, ...); `setup` and `bench` also the benchmarks' tools (wrk, HAProxy, nginx's
//! stream module). Then, run as root, only the container test can still be skipped: setup
//! does not install a Docker engine.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
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
    // tests/agent.rs: a preforking server whose workers answer with their pid, and nginx with
    // `reuseport` and four workers.
    ("python3", "/usr/bin/python3"),
    ("nginx-light", "/usr/sbin/nginx"),
    // tests/status_page.rs: the status page in a real headless browser (DevTools over a pipe).
    ("chromium", "/usr/bin/chromium"),
];
/// Debian packages only the benchmarks need (`cargo xtask setup` and `cargo xtask bench` install
/// them, `cargo xtask test` does not), as in [`APT_PACKAGES`]: tests/benches/e2e.rs runs wrk
/// through lb, HAProxy and nginx's `stream` module (nginx itself is `nginx-light` above).
const BENCH_APT_PACKAGES: &[(&str, &str)] = &[
    ("wrk", "/usr/bin/wrk"),
    ("haproxy", "/usr/sbin/haproxy"),
    ("libnginx-mod-stream", "/usr/lib/nginx/modules/ngx_stream_module.so"),
];

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building, testing and benchmarks need (idempotent, quick when all is there).
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
    /// The Debian package target/deb/lb_<version>_amd64.deb (binary, systemd units, example
    /// /etc/lb/lb.toml, man page), built with dpkg-deb.
    Deb,
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
        Cmd::Setup => setup().and_then(|_| setup_bench()),
        Cmd::Build => setup().and_then(|_| build_release()).map(|lb| println!("built {}", lb.display())),
        Cmd::Run { args } => run(args),
        // The summary line stays the last one printed: a failed layer only sets the exit code.
        Cmd::Test { filter } => match test(filter.as_deref()) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Cmd::Bench { quick } => bench(quick),
        Cmd::Image => image(),
        Cmd::Deb => deb(),
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

/// What the benchmarks need besides [`setup`].
fn setup_bench() -> Result<()> {
    ensure_apt(BENCH_APT_PACKAGES)
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

fn deb() -> Result<()> {
    setup()?;
    let lb = build_release()?;
    let out = workspace_root().join("target/deb");
    std::fs::create_dir_all(&out)?;
    let deb = xtask::deb::build(&workspace_root(), &lb, &out)?;
    println!("built {}", deb.display());
    Ok(())
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
    setup_bench()?;
    if !xtask::lab::is_root() {
        bail!("the benchmarks load XDP programs and create namespaces: run as root");
    }
    let lb = build_release()?;
    let dir = workspace_root().join("target/bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let reps = if quick { "3" } else { "7" };
    let runs: [(&str, &[&str]); 7] = [
        ("control plane: Maglev build, reload of 1000 services", &["bench", "-p", "lb-userspace", "--bench", "control"]),
        ("fairness: Zipf clients and a university prefix, load bound off and on", &["bench", "-p", "lb-userspace", "--bench", "fairness"]),
        ("control plane at scale: status, scrape and health with 10 million pins", &["bench", "-p", "tests", "--bench", "scale"]),
        ("datapath: per packet (BPF_PROG_TEST_RUN), table scale, veth", &["bench", "-p", "tests", "--bench", "datapath"]),
        ("end to end: wrk through lb, HAProxy, nginx", &["bench", "-p", "tests", "--bench", "e2e"]),
        ("scale-out: failover convergence of two nodes behind ECMP (BIRD)", &["bench", "-p", "tests", "--bench", "cluster"]),
        ("agent: new connections per second to 4 nginx workers, with and without lb agent", &["bench", "-p", "tests", "--bench", "agent"]),
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
            // Sections merge: two benchmarks may both add figures to one (e.g. `control`).
            if let serde_json::Value::Object(m) = v {
                for (section, figures) in m {
                    match (report.get_mut(&section), figures) {
                        (Some(serde_json::Value::Object(have)), serde_json::Value::Object(more)) => have.extend(more),
                        (_, figures) => {
                            report.insert(section, figures);
                        }
                    }
                }
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

/// Runs every test layer, also after one failed, and ends with the summary line
/// `xtask: N passed, N failed, N skipped (test: reason; ...)`: tests that recorded a skip
/// (`xtask::skips`) count as skipped, not as the passes libtest saw. A failed layer makes the exit
/// code non-zero and is named before the summary, which stays the last line.
fn test(filter: Option<&str>) -> Result<ExitCode> {
    setup()?;
    if !xtask::lab::is_root() {
        bail!("the datapath and end-to-end tests load XDP programs and create namespaces: run as root");
    }
    let lb = build_release()?;
    let skips_dir = workspace_root().join("target/test-skips");
    std::fs::create_dir_all(&skips_dir).with_context(|| format!("creating {}", skips_dir.display()))?;
    // (short name, what it runs, `cargo test` arguments).
    let layers: [(&str, &str, &[&str]); 5] = [
        ("unit", "unit and property tests", &["-p", "lb-common", "-p", "lb-userspace", "-p", "xtask", "--", "--test-threads=2"]),
        (
            "datapath",
            "datapath tests (BPF_PROG_TEST_RUN)",
            &["-p", "tests", "--lib", "--test", "datapath", "--test", "breadth", "--test", "corpus", "--test", "flows", "--test", "packaging", "--"],
        ),
        (
            "e2e",
            "end-to-end tests (network namespaces, real servers)",
            &["-p", "tests", "--test", "e2e", "--test", "control", "--test", "breadth_e2e", "--test", "operator", "--test", "safe_e2e", "--test", "hardening", "--test", "first_hour", "--test", "fairness", "--test", "agent", "--test", "whatif", "--test", "journal", "--test", "status_page", "--", "--test-threads=1"],
        ),
        ("cluster", "scale-out (two nodes with BIRD behind an ECMP router; figures printed)", &["-p", "tests", "--test", "cluster", "--", "--test-threads=1", "--nocapture"]),
        ("container", "container image (the balancer run from it against a namespace lab)", &["-p", "tests", "--test", "container", "--"]),
    ];
    let mut tally = xtask::skips::Tally::default();
    let mut failed = Vec::new();
    for (name, what, args) in layers {
        println!("\n== {what}");
        let skips = skips_dir.join(format!("{name}.tsv"));
        let mut c = cargo();
        // --no-fail-fast: a failing test binary does not keep the layer's others from being counted.
        c.args(["test", "--no-fail-fast"]).args(args).env("LB_BIN", &lb);
        if let Some(f) = filter {
            c.arg(f);
        }
        if let Err(e) = cargo_test(&mut c, &skips, &mut tally) {
            eprintln!("xtask: {e:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        println!("\nxtask: failed layers: {}", failed.join(", "));
    }
    println!("\n{}", tally.summary());
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs one `cargo test` with a fresh skips file, its stdout passed through as it comes and added,
/// with the skips it recorded, to `tally`; fails when the run does.
fn cargo_test(cmd: &mut Command, skips: &Path, tally: &mut xtask::skips::Tally) -> Result<()> {
    use std::io::{Read as _, Write as _};
    match std::fs::remove_file(skips) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", skips.display()));
        }
        _ => {}
    }
    cmd.env(xtask::skips::SKIPS_ENV, skips).stdout(Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let mut pipe = child.stdout.take().expect("stdout is piped");
    let mut stdout = Vec::new();
    let mut buf = [0u8; 8192];
    // Chunks, not lines: libtest prints `test name ... ` before the test ends.
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading the output of {shown}")),
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&buf[..n]).and_then(|()| out.flush());
        stdout.extend_from_slice(&buf[..n]);
    }
    let status = child.wait().with_context(|| format!("waiting for {shown}"))?;
    let recorded = match std::fs::read_to_string(skips) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", skips.display())),
    };
    tally.add_run(&String::from_utf8_lossy(&stdout), &recorded);
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}
