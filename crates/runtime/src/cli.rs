//! The command line, the same shape for all three daemons (DESIGN.md section 2), and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use hybridnet_config::DEFAULT_CONFIG_PATH;

use crate::Daemon;
use crate::exit::ExitStatus;

#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (in the foreground; logs go to stderr).
    Run {
        /// The config file. It may appear after start: the daemon then runs on defaults and waits for it.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH, env = "HYBRIDNET_CONFIG")]
        config: PathBuf,
    },
    /// Validate the config and print the effective values with where each came from.
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH, env = "HYBRIDNET_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print what the running daemon reports in the state directory (exit 1 if it is not running).
    Status {
        /// The config file, to find the state directory (ignored if --state-dir is given).
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH, env = "HYBRIDNET_CONFIG")]
        config: PathBuf,
        /// The state directory (default: `stateDir` from the config, else /run/hybridnet).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print the raw record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check this node's set-up end to end (kubelet DNS and API path, mesh port, MTU, forwarding, clock) and
    /// say what is wrong with the fix; exit 1 when a check fails.
    Doctor(hybridnet_doctor::Args),
}

/// The whole `main` of a daemon binary.
pub fn main<D: Daemon>() -> ExitCode {
    let name = D::KIND.name();
    let command = Cli::command()
        .name(name)
        .bin_name(name)
        .about(about(D::KIND));
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let status = match cli.command {
        Command::Run { config } => run::<D>(config),
        Command::CheckConfig { config, json } => check_config::<D>(&config, json),
        Command::Status {
            config,
            state_dir,
            json,
        } => crate::status::print::<D>(&config, state_dir, json),
        Command::Doctor(args) => match hybridnet_doctor::main(&args, crate::status::is_live) {
            true => ExitStatus::Ok,
            false => ExitStatus::Failure,
        },
    };
    status.into()
}

/// The one-line description `--help` starts with.
fn about(kind: hybridnet_config::Daemon) -> &'static str {
    match kind {
        hybridnet_config::Daemon::Apiprism => {
            "apiprism: a per-node loopback TCP load balancer in front of all Kubernetes API servers"
        }
        hybridnet_config::Daemon::Meshd => {
            "meshd: a WireGuard mesh between Kubernetes nodes, with endpoint filters and fast failover"
        }
        hybridnet_config::Daemon::Dnslocal => "dnslocal: a node-local DNS cache and forwarder",
    }
}

fn run<D: Daemon>(config: PathBuf) -> ExitStatus {
    let name = D::KIND.name();
    if let Some(warning) = crate::logging::init(name) {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(name)
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitStatus::Failure;
        }
    };
    runtime.block_on(crate::supervisor::run::<D>(config))
}

#[allow(clippy::print_stdout)] // printing the effective config is this command's job
fn check_config<D: Daemon>(path: &std::path::Path, json: bool) -> ExitStatus {
    match hybridnet_config::load_file(path) {
        Ok(config) => {
            if json {
                let value = config.render_json(Some(D::KIND));
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
            } else {
                print!("{}", config.render(Some(D::KIND)));
            }
            ExitStatus::Ok
        }
        Err(error) => {
            // Each issue on its own line, starting with `file:line:column:` where known.
            eprintln!("{error}");
            eprintln!("{}: the config is invalid", D::KIND.name());
            ExitStatus::Config
        }
    }
}
