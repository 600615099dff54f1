//! hybridnet-runtime: what the three daemons share, so that each `main.rs` is one line.
//!
//! - [`cli`]: the command line (`run`, `check-config`, `status`, `--version`, `--help`) and exit codes;
//! - [`logging`]: `tracing` to stderr, filtered by `<DAEMON>_LOG`, formatted by `<DAEMON>_LOG_FORMAT`;
//! - [`admin`]: the admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`), bound with `SO_REUSEPORT` so a
//!   new instance can start before the old one stops;
//! - [`supervisor`]: loads the config, watches its file (it may appear after start, as on Talos) and SIGHUP,
//!   applies valid new versions and rejects bad ones, handles SIGTERM/SIGINT with a bounded drain;
//! - [`limits`]: the open-file limit (raised to the hard one at start) and [`limits::is_local_pressure`];
//! - [`status`]: publishes `<stateDir>/<daemon>/status.json` and renders it for `status`.
//!
//! A daemon implements [`Daemon`]; its binary is `fn main() -> ExitCode { hybridnet_runtime::main::<D>() }`.
#![forbid(unsafe_code)]
#![warn(clippy::print_stdout, clippy::dbg_macro)]

pub mod admin;
pub mod cli;
mod context;
pub mod exit;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod status;
pub mod supervisor;

use std::future::Future;

pub use cli::main;
pub use context::{Context, StatusHandle};
pub use exit::ExitStatus;
pub use hybridnet_config as config;
pub use metrics::SharedRegistry;

/// One daemon: its kind, and its main loop.
pub trait Daemon: Send + Sync + 'static {
    /// Which daemon this is: names the binary, the config section, the state records and the log env vars.
    const KIND: config::Daemon;

    /// The daemon's error type (a `thiserror` enum in its library).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs until `ctx.shutdown` is cancelled, following `ctx.config` as new versions are applied.
    /// Returning `Err` stops the process with exit code 1.
    fn run(ctx: Context) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Renders the daemon-specific `details` of its status record for `status` (default: indented JSON).
    fn render_details(details: &serde_json::Value) -> String {
        serde_json::to_string_pretty(details).unwrap_or_default()
    }
}
