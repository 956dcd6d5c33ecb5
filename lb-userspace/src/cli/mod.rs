//! The `lb` subcommands that talk to a running daemon (and `lb check`, `lb down`): each asks the
//! control API through [`crate::client`] and prints its answer, as a table ([`render`]) or as
//! JSON. The argument parsing (clap) is the binary's.

pub mod render;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    api::{AdminReport, AffinityList, Changes, DownReport, DrainRequest, Explanation, FlushReport, FlushRequest, StatusReport},
    client,
    config::Config,
};

/// How a command answers: a table for people, or JSON for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// How long `lb down` waits for the daemon to stop, beyond its announce grace.
const DOWN_WAIT: Duration = Duration::from_secs(10);

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

/// The control socket a client command talks to: `--socket`, else `control.socket` of
/// `--config`, else the default.
pub fn socket(flag: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf> {
    let from_config = match config {
        Some(p) => Some(Config::load(&p).map_err(|e| anyhow!("{e}"))?.control.socket),
        None => None,
    };
    Ok(client::socket_path(flag, from_config))
}

/// Prints `v` as JSON, or as `text(v)`.
fn answer<T: Serialize>(output: Output, v: &T, text: impl FnOnce(&T) -> String) -> Result<ExitCode> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", text(v));
    }
    Ok(ExitCode::SUCCESS)
}

fn post<T: DeserializeOwned>(socket: &Path, path: &str, body: &impl Serialize) -> Result<T> {
    block_on(client::call_json(socket, "POST", path, Some(&serde_json::to_string(body)?)))
}

/// `lb check [--offline]`: every error of the file, then (unless `offline`) whether this
/// machine can run it: the interfaces exist in this network namespace, the pin path is (or can
/// become) a bpffs that outlives lb, the control socket's path is free, and the capabilities.
pub fn check(config: &Path, offline: bool) -> Result<ExitCode> {
    let c = match Config::load(config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}: {} error(s)", config.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let summary = format!(
        "{}: ok ({} service(s), {} backend(s))",
        config.display(),
        c.services.len(),
        c.services.iter().map(|s| s.backends.len()).sum::<usize>()
    );
    if offline {
        println!("{summary}; the environment was not checked (--offline)");
        return Ok(ExitCode::SUCCESS);
    }
    let env = crate::environment::check(&c);
    if env.problems.is_empty() {
        println!("{summary}");
        for line in &env.ok {
            println!("  {line}");
        }
        for w in &env.warnings {
            println!("  warning: {w}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("{}: the file is valid, but not runnable here: {} error(s)", config.display(), env.problems.len());
    for p in &env.problems {
        eprintln!("  {p}");
    }
    for w in &env.warnings {
        eprintln!("  warning: {w}");
    }
    eprintln!("  (`lb check --offline` checks the file alone)");
    Ok(ExitCode::FAILURE)
}

/// `lb status [--fresh]`.
pub fn status(socket: &Path, fresh: bool, output: Output) -> Result<ExitCode> {
    let path = if fresh { "/status?fresh=true" } else { "/status" };
    let r: StatusReport = block_on(client::get_json(socket, path))?;
    answer(output, &r, render::render_status)
}

/// `lb reload`: exit 1 when refused (the running config stays).
pub fn reload(socket: &Path, output: Output) -> Result<ExitCode> {
    let changes: Changes = match block_on(client::call_json(socket, "POST", "/reload", None)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lb: reload refused, the running config stays in force:\n{e:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    answer(output, &changes, render::render_changes)
}

/// `lb events [--follow]`: the journal (then, with `follow`, its new moves every half second).
pub fn events(socket: &Path, mut q: crate::api::EventsQuery, follow: bool, output: Output) -> Result<ExitCode> {
    use std::io::Write as _;
    loop {
        let path = client::with_query(
            "/events",
            &[
                ("client", q.client.clone()),
                ("service", q.service.clone()),
                ("backend", q.backend.clone()),
                ("since", q.since.clone()),
                ("after", q.after.map(|a| a.to_string())),
            ],
        );
        let v: Vec<crate::api::MoveRecord> = block_on(client::get_json(socket, &path))?;
        let mut out = std::io::stdout().lock();
        for e in &v {
            if output == Output::Json {
                // One object per line: `--follow` streams them.
                writeln!(out, "{}", serde_json::to_string(e)?)?;
            } else {
                writeln!(out, "{}  {}  {}  {} -> {}  {}", e.time, e.service, e.client, e.from, e.to, e.reason)?;
            }
        }
        out.flush()?;
        if let Some(last) = v.last() {
            q.after = Some(last.seq);
        }
        // Once past the start, `since` no longer narrows anything `after` does not.
        q.since = None;
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(500));
        if q.after.is_none() {
            q.after = Some(0);
        }
    }
}

/// `lb reload --dry-run`, `lb drain --dry-run`, `lb simulate down`: POST `path` (with `req`).
pub fn what_if(socket: &Path, path: &str, req: Option<&DrainRequest>, output: Output) -> Result<ExitCode> {
    let body = req.map(serde_json::to_string).transpose()?;
    let w: crate::api::WhatIf = block_on(client::call_json(socket, "POST", path, body.as_deref()))?;
    answer(output, &w, crate::whatif::render)
}

/// `lb drain` (`force`: `--force`) and `lb undrain` (`undrain`).
pub fn admin(socket: &Path, service: String, backend: String, force: bool, undrain: bool, output: Output) -> Result<ExitCode> {
    let req = DrainRequest { service, backend, force };
    let r: AdminReport = post(socket, if undrain { "/undrain" } else { "/drain" }, &req)?;
    answer(output, &r, |r| render::render_backend_change(&req.service, r, undrain))
}

/// `lb explain`.
pub fn explain(socket: &Path, client_addr: String, service: Option<String>, output: Output) -> Result<ExitCode> {
    let path = client::with_query("/explain", &[("client", Some(client_addr)), ("service", service)]);
    let v: Vec<Explanation> = block_on(client::get_json(socket, &path))?;
    answer(output, &v, |v| render::render_explanations(v))
}

/// `lb affinity list`.
pub fn affinity_list(socket: &Path, service: Option<String>, backend: Option<String>, limit: Option<usize>, output: Output) -> Result<ExitCode> {
    let path = client::with_query(
        "/affinity",
        &[("service", service), ("backend", backend), ("limit", limit.map(|l| l.to_string()))],
    );
    let l: AffinityList = block_on(client::get_json(socket, &path))?;
    answer(output, &l, render::render_list)
}

/// `lb affinity flush`.
pub fn affinity_flush(
    socket: &Path,
    client_addr: Option<String>,
    backend: Option<String>,
    all: bool,
    service: Option<String>,
    output: Output,
) -> Result<ExitCode> {
    let client = match client_addr {
        Some(c) => Some(c.parse::<IpAddr>().map_err(|_| anyhow!("{c:?} is not an IP address"))?),
        None => None,
    };
    if client.is_none() && backend.is_none() && !all {
        bail!("name what to flush: a client address, --backend ADDRESS:PORT, or --all");
    }
    let r: FlushReport = post(socket, "/affinity/flush", &FlushRequest { client, backend, all, service })?;
    answer(output, &r, |r| render::render_flushed(r.flushed))
}

/// `lb down`: stops a running daemon (it withdraws its VIPs and keeps serving for its announce
/// grace first, which is waited for), then removes whatever is still pinned.
pub fn down(socket_flag: Option<PathBuf>, config: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config).map_err(|e| anyhow!("invalid config {}:\n{e}", config.display()))?;
    let socket = client::socket_path(socket_flag, Some(cfg.control.socket.clone()));
    if socket.exists()
        && let Ok(r) = block_on(client::call_json::<DownReport>(&socket, "POST", "/down", None))
    {
        let grace = Duration::from_secs_f64(r.grace_secs.max(0.0));
        if !grace.is_zero() {
            println!(
                "the daemon withdrew its VIPs and keeps serving for its announce grace ({}); waiting for it to stop",
                humantime::format_duration(grace)
            );
        }
        let deadline = Instant::now() + grace + DOWN_WAIT;
        // Gone when its socket is, and its hold on the pin directory with it.
        let pin_path = &cfg.datapath.pin_path;
        while socket.exists() || crate::bpffs::lock_holder(pin_path).is_some() {
            if Instant::now() >= deadline {
                bail!(
                    "the daemon on {} did not stop within {} (its grace {} and {} more)",
                    socket.display(),
                    humantime::format_duration(grace + DOWN_WAIT),
                    humantime::format_duration(grace),
                    humantime::format_duration(DOWN_WAIT)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("stopped the running lb: it detached XDP and removed its pinned state");
        // Whatever it could not remove (another pin path's leftovers are not ours to judge).
        if let Some(done) = crate::run::down_offline(&cfg).context("lb down")? {
            println!("{done}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    match crate::run::down_offline(&cfg).context("lb down")? {
        Some(done) => println!("{done}"),
        None => println!("no lb is running on {} and nothing is pinned under {}: nothing to do", socket.display(), cfg.datapath.pin_path.display()),
    }
    Ok(ExitCode::SUCCESS)
}
