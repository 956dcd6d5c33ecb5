//! `lb`: the daemon and its command-line client.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb::{config::Config, control};

#[derive(Parser)]
#[command(name = "lb", version, about = "Sticky XDP layer-4 load balancer")]
struct Cli {
    /// Control socket; overrides `control.socket` of the config.
    #[arg(long, global = true, env = "LB_SOCKET")]
    socket: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Work in this network namespace: a name as `ip netns` gives it (/run/netns/NAME) or a
    /// path. For a container on the host's network that serves another namespace.
    #[arg(long, global = true, env = "LB_NETNS")]
    netns: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Text,
    Json,
}

/// How a client command talks to the daemon and answers.
#[derive(clap::Args)]
struct ClientOpts {
    /// A table for people, or JSON for scripts.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Read `control.socket` from this config (when --socket is not given).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath, apply the config, serve the control socket.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print every error.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Services, backends and counters of the running daemon.
    Status {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Re-read the daemon's config file and apply it; a config with errors is refused whole
    /// (exit 1) and the running one stays. SIGHUP to the daemon does the same.
    Reload {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Stop sending new clients to a backend; its pinned clients stay until their pin times out
    /// (or move now with --force).
    Drain {
        service: String,
        /// ADDRESS:PORT of the backend.
        backend: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Let a drained backend take new clients again.
    Undrain {
        service: String,
        backend: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Where a client goes and why: its pin (age, time left) or its Maglev slot, and the
    /// backend's state. Sends no traffic and changes nothing.
    Explain {
        /// The client's IP address.
        client: String,
        /// Only this service (else every service of the client's address family).
        #[arg(long, short)]
        service: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List or flush the affinity table's pins.
    Affinity {
        #[command(subcommand)]
        command: AffinityCommand,
    },
    /// Detach the XDP program and remove the pinned state (stops a running daemon first).
    Down {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AffinityCommand {
    /// The pins, live or stale, with their backend, age, idle time and time left.
    List {
        #[arg(long, short)]
        service: Option<String>,
        /// Only pins to this backend (ADDRESS:PORT).
        #[arg(long, short)]
        backend: Option<String>,
        /// Show at most this many (all by default; the count of all that matched is printed).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Delete pins: a client's (CLIENT_IP), a backend's (--backend), or all (--all); --service
    /// narrows any of them. Those clients are placed afresh (Maglev) at their next packet.
    Flush {
        client: Option<String>,
        #[arg(long, short, conflicts_with_all = ["client", "all"])]
        backend: Option<String>,
        #[arg(long, conflicts_with = "client")]
        all: bool,
        #[arg(long, short)]
        service: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // `init` also installs the `log` bridge, which carries aya-log's records from the XDP program.
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Moves this (still single-threaded) process into network namespace `name`.
fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsFd as _;
    let path = if name.contains('/') { PathBuf::from(name) } else { PathBuf::from("/run/netns").join(name) };
    let f = std::fs::File::open(&path).with_context(|| format!("--netns {name}: opening {}", path.display()))?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("--netns {name}: entering the network namespace (needs root)"))
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    if let Some(ns) = &cli.netns {
        enter_netns(ns)?;
    }
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} service(s), {} backend(s))",
                    config.display(),
                    c.services.len(),
                    c.services.iter().map(|s| s.backends.len()).sum::<usize>()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprintln!("{}: {} error(s)", config.display(), errors.0.len());
                for e in &errors.0 {
                    eprintln!("  {e}");
                }
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Run { config } => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(lb::daemon::run(&config, cli.socket))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { opts: ClientOpts { output, config } } => {
            let socket = client_socket(cli.socket, config)?;
            let report: control::StatusReport = block_on(control::get_json(&socket, "/status"))?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", control::render_status(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { opts: ClientOpts { output, config } } => {
            let socket = client_socket(cli.socket, config)?;
            let changes: lb::state::Changes = match block_on(control::call_json(&socket, "POST", "/reload", None)) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("lb: reload refused, the running config stays in force:\n{e:#}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&changes)?);
            } else if changes.is_empty() {
                println!("reloaded: nothing changed");
            } else {
                println!("reloaded: {}", serde_json::to_string(&changes)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Drain { service, backend, force, opts: ClientOpts { output, config } } => {
            admin(client_socket(cli.socket, config)?, "/drain", service, backend, force, output)
        }
        Command::Undrain { service, backend, opts: ClientOpts { output, config } } => {
            admin(client_socket(cli.socket, config)?, "/undrain", service, backend, false, output)
        }
        Command::Explain { client, service, opts: ClientOpts { output, config } } => {
            let socket = client_socket(cli.socket, config)?;
            let path = control::with_query("/explain", &[("client", Some(client)), ("service", service)]);
            let v: Vec<lb::affinity::Explanation> = block_on(control::get_json(&socket, &path))?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", lb::affinity::render_explanations(&v));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Affinity { command: AffinityCommand::List { service, backend, limit, opts: ClientOpts { output, config } } } => {
            let socket = client_socket(cli.socket, config)?;
            let path = control::with_query(
                "/affinity",
                &[("service", service), ("backend", backend), ("limit", limit.map(|l| l.to_string()))],
            );
            let l: lb::affinity::AffinityList = block_on(control::get_json(&socket, &path))?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", lb::affinity::render_list(&l));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Affinity { command: AffinityCommand::Flush { client, backend, all, service, opts: ClientOpts { output, config } } } => {
            let client = match client {
                Some(c) => Some(c.parse::<std::net::IpAddr>().map_err(|_| anyhow::anyhow!("{c:?} is not an IP address"))?),
                None => None,
            };
            if client.is_none() && backend.is_none() && !all {
                anyhow::bail!("name what to flush: a client address, --backend ADDRESS:PORT, or --all");
            }
            let socket = client_socket(cli.socket, config)?;
            let req = lb::affinity::FlushRequest { client, backend, all, service };
            let r: lb::affinity::FlushReport =
                block_on(control::call_json(&socket, "POST", "/affinity/flush", Some(&serde_json::to_string(&req)?)))?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("flushed {} pin(s); those clients are placed afresh at their next packet", r.flushed);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Down { config } => {
            let cfg = Config::load(&config).map_err(|e| anyhow::anyhow!("invalid config {}:\n{e}", config.display()))?;
            let socket = control::socket_path(cli.socket, Some(cfg.control.socket.clone()));
            if socket.exists() && block_on(control::request(&socket, "POST", "/down", None)).is_ok() {
                // The daemon detaches, removes its pins and exits; wait for it.
                for _ in 0..100 {
                    if !socket.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                if socket.exists() {
                    anyhow::bail!("the daemon on {} did not stop within 10s", socket.display());
                }
                println!("stopped the running lb; it detached XDP and removed its pinned state");
            }
            println!("{}", lb::daemon::down_offline(&cfg)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

/// The control socket a client command talks to.
fn client_socket(flag: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf> {
    let from_config = match config {
        Some(p) => Some(Config::load(&p).map_err(|e| anyhow::anyhow!("{e}"))?.control.socket),
        None => None,
    };
    Ok(control::socket_path(flag, from_config))
}

fn admin(socket: PathBuf, path: &str, service: String, backend: String, force: bool, output: Output) -> Result<ExitCode> {
    let req = control::DrainRequest { service, backend, force };
    let b: control::BackendReport =
        block_on(control::call_json(&socket, "POST", path, Some(&serde_json::to_string(&req)?)))?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&b)?);
    } else {
        println!("{}/{} is now {} ({})", req.service, control::endpoint(&b.address, b.port), b.state, b.reason);
    }
    Ok(ExitCode::SUCCESS)
}
