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
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Read `control.socket` from this config (when --socket is not given).
        #[arg(long, short)]
        config: Option<PathBuf>,
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

fn real_main(cli: Cli) -> Result<ExitCode> {
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
        Command::Status { output, config } => {
            let from_config = match config {
                Some(p) => Some(Config::load(&p).map_err(|e| anyhow::anyhow!("{e}"))?.control.socket),
                None => None,
            };
            let socket = control::socket_path(cli.socket, from_config);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let report: control::StatusReport = rt.block_on(control::get_json(&socket, "/status"))?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", control::render_status(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
