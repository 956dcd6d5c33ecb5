//! `lb`: the daemon and its command-line client.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb::cli;

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
    /// Validate a config file and print every error; then check that it can run here
    /// (interfaces, bpffs, control socket, capabilities).
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Check the file alone, not this machine (for CI and config repositories).
        #[arg(long)]
        offline: bool,
    },
    /// Services, backends and counters of the running daemon. Pin counts are counted in the
    /// background and shown with their age.
    Status {
        /// Wait for a pin count that starts after this call (up to a minute on huge tables).
        #[arg(long)]
        fresh: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Re-read the daemon's config file and apply it; a config with errors is refused whole
    /// (exit 1) and the running one stays. SIGHUP to the daemon does the same.
    Reload {
        /// Validate and report what applying the file would do (backends added, removed,
        /// re-weighted; live pins that would move; share of Maglev slots changing), changing
        /// nothing.
        #[arg(long)]
        dry_run: bool,
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
        /// Report what the drain would do (pins that would move, share of slots), changing nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// The journal of moves: every move of a known client (its pin re-placed onto another
    /// backend) with its time, service, client, from, to and reason, oldest first.
    Events {
        /// Only this client's moves (by each service's prefix).
        #[arg(long)]
        client: Option<String>,
        #[arg(long, short)]
        service: Option<String>,
        /// Only moves from or to this backend (ADDRESS:PORT).
        #[arg(long, short)]
        backend: Option<String>,
        /// Only moves within this long (e.g. 10m).
        #[arg(long)]
        since: Option<String>,
        /// Keep printing moves as they happen (until interrupted).
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// What-if reports that change nothing.
    Simulate {
        #[command(subcommand)]
        command: SimulateCommand,
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
    /// Print lb's man page (roff) on stdout.
    #[command(hide = true)]
    Man,
    /// Detach the XDP program and remove the pinned state (stops a running daemon first).
    Down {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// On a backend host: keep each client on one worker process of the server whose
    /// SO_REUSEPORT sockets listen on PORT (runs in the foreground; stopping it detaches).
    Agent {
        #[command(subcommand)]
        command: Option<AgentCommand>,
        /// The port the workers listen on (repeat for several).
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// tcp (default) or udp.
        #[arg(long, value_enum)]
        protocol: Option<AgentProtocol>,
        /// Clients sharing this many leading bits share a worker (default 32).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=32))]
        ipv4_prefix: Option<u8>,
        /// The same for IPv6 (default 128).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=128))]
        ipv6_prefix: Option<u8>,
        /// A client idle for longer may be placed on another worker (default 30m).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Read the options from the `[agent]` table of this file; flags override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Remove what an agent attached to the port(s) and exit.
        #[arg(long)]
        detach: bool,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// The running agent's workers (pid, command, socket), pinned clients per worker and new
    /// clients per second, from its control socket (--socket, default /run/lb/agent.sock).
    Status {
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AgentProtocol {
    Tcp,
    Udp,
}

#[derive(Subcommand)]
enum SimulateCommand {
    /// What the death of a backend would do: the live pins that would fail over and the share
    /// of Maglev slots that would change.
    Down {
        service: String,
        /// ADDRESS:PORT of the backend.
        backend: String,
        #[command(flatten)]
        opts: ClientOpts,
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

/// Logs go to stderr, coloured only when it is a terminal (under systemd, journald or a redirect
/// the lines carry no escape codes).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
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
    let out = |o: Output| if o == Output::Json { cli::Output::Json } else { cli::Output::Text };
    match cli.command {
        Command::Check { config, offline } => cli::check(&config, offline),
        Command::Run { config } => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(lb::run::run(&config, cli.socket))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { fresh, opts: ClientOpts { output, config } } => {
            cli::status(&cli::socket(cli.socket, config)?, fresh, out(output))
        }
        Command::Reload { dry_run: true, opts: ClientOpts { output, config } } => {
            cli::what_if(&cli::socket(cli.socket, config)?, "/reload?dry_run=true", None, out(output))
        }
        Command::Reload { dry_run: false, opts: ClientOpts { output, config } } => cli::reload(&cli::socket(cli.socket, config)?, out(output)),
        Command::Drain { service, backend, force, dry_run: true, opts: ClientOpts { output, config } } => {
            let req = lb::api::DrainRequest { service, backend, force };
            cli::what_if(&cli::socket(cli.socket, config)?, "/drain?dry_run=true", Some(&req), out(output))
        }
        Command::Drain { service, backend, force, dry_run: false, opts: ClientOpts { output, config } } => {
            cli::admin(&cli::socket(cli.socket, config)?, service, backend, force, false, out(output))
        }
        Command::Events { client, service, backend, since, follow, opts: ClientOpts { output, config } } => {
            let q = lb::api::EventsQuery { client, service, backend, since, after: None };
            cli::events(&cli::socket(cli.socket, config)?, q, follow, out(output))
        }
        Command::Simulate { command: SimulateCommand::Down { service, backend, opts: ClientOpts { output, config } } } => {
            let req = lb::api::DrainRequest { service, backend, force: false };
            cli::what_if(&cli::socket(cli.socket, config)?, "/simulate/down", Some(&req), out(output))
        }
        Command::Undrain { service, backend, opts: ClientOpts { output, config } } => {
            cli::admin(&cli::socket(cli.socket, config)?, service, backend, false, true, out(output))
        }
        Command::Explain { client, service, opts: ClientOpts { output, config } } => {
            cli::explain(&cli::socket(cli.socket, config)?, client, service, out(output))
        }
        Command::Affinity { command: AffinityCommand::List { service, backend, limit, opts: ClientOpts { output, config } } } => {
            cli::affinity_list(&cli::socket(cli.socket, config)?, service, backend, limit, out(output))
        }
        Command::Affinity { command: AffinityCommand::Flush { client, backend, all, service, opts: ClientOpts { output, config } } } => {
            cli::affinity_flush(&cli::socket(cli.socket, config)?, client, backend, all, service, out(output))
        }
        Command::Down { config } => cli::down(cli.socket, &config),
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd.clone()).render(&mut out).context("rendering the man page")?;
            // Every command's own options too, a section each, on the one page.
            use std::io::Write as _;
            for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
                let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default().replace('\\', "\\\\");
                writeln!(out, ".SH \"LB {}\"\n{about}", sub.get_name().to_uppercase())?;
                if sub.get_arguments().any(|a| !a.is_hide_set()) {
                    clap_mangen::Man::new(sub.clone()).render_options_section(&mut out).context("rendering the man page")?;
                }
            }
            std::io::stdout().write_all(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent { command: Some(AgentCommand::Status { output }), .. } => {
            let socket = cli.socket.unwrap_or_else(|| PathBuf::from(lb::agent::DEFAULT_SOCKET));
            lb::agent::status_cli(&socket, output == Output::Json)
        }
        Command::Agent { command: None, ports, protocol, ipv4_prefix, ipv6_prefix, timeout, config, detach } => {
            let file = match &config {
                Some(p) => {
                    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                    lb::agent::parse_file(&text).map_err(|errs| {
                        anyhow::anyhow!("invalid config {}: {} error(s)\n  {}", p.display(), errs.len(), errs.join("\n  "))
                    })?
                }
                None => lb::agent::FileOptions::default(),
            };
            let opts = lb::agent::Options {
                ports: if ports.is_empty() { file.ports.unwrap_or_default() } else { ports },
                protocol: match protocol {
                    Some(AgentProtocol::Tcp) => lb::agent::Proto::Tcp,
                    Some(AgentProtocol::Udp) => lb::agent::Proto::Udp,
                    None => file.protocol.unwrap_or(lb::agent::Proto::Tcp),
                },
                ipv4_prefix: ipv4_prefix.or(file.ipv4_prefix).unwrap_or(32),
                ipv6_prefix: ipv6_prefix.or(file.ipv6_prefix).unwrap_or(128),
                timeout: timeout.or(file.timeout).unwrap_or(std::time::Duration::from_secs(30 * 60)),
            };
            if detach {
                lb::run::require_root("lb agent --detach")?;
                let n = lb::agent::detach_ports(&opts, &opts.ports)?;
                println!("detached from {n} reuseport group(s)");
                return Ok(ExitCode::SUCCESS);
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(lb::agent::run(opts, cli.socket))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
