//! The exit codes every daemon and subcommand returns. Its own module: the daemons' library code returns
//! them without importing the command line.

use std::process::ExitCode;

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
