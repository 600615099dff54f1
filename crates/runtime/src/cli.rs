//! The command line, the same shape for all three daemons (DESIGN.md section 2), and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hybridnet_config::DEFAULT_CONFIG_PATH;

use crate::Daemon;

/// Exit codes: 0 ok, 1 a runtime failure (or `status` found no live daemon), 78 (`EX_CONFIG`) a config error.
/// Usage errors are clap's (2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Ok,
    Failure,
    Config,
}

impl From<ExitStatus> for ExitCode {
    fn from(s: ExitStatus) -> ExitCode {
        match s {
            ExitStatus::Ok => ExitCode::SUCCESS,
            ExitStatus::Failure => ExitCode::from(1),
            ExitStatus::Config => ExitCode::from(78),
        }
    }
}

#[derive(Debug, Parser)]
#[command(version, propagate_version = true, about, long_about = None)]
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
}

/// The whole `main` of a daemon binary.
pub fn main<D: Daemon>() -> ExitCode {
    let cli = Cli::parse_from(std::env::args_os());
    let status = match cli.command {
        Command::Run { config } => run::<D>(config),
        Command::CheckConfig { config, json } => check_config::<D>(&config, json),
        Command::Status {
            config,
            state_dir,
            json,
        } => crate::status::print::<D>(&config, state_dir, json),
    };
    status.into()
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
            eprintln!("{}: config error: {error}", D::KIND.name());
            ExitStatus::Config
        }
    }
}
