//! meshd: a WireGuard mesh between Kubernetes nodes.
//!
//! Until its data plane lands (issue "meshd core"), `run` follows the config and reports what it would serve.
#![forbid(unsafe_code)]
#![warn(clippy::print_stdout, clippy::dbg_macro)]

use hybridnet_config::Config;
use hybridnet_runtime::{Context, Daemon};

/// The meshd daemon.
#[derive(Debug)]
pub struct Meshd;

impl Daemon for Meshd {
    const KIND: hybridnet_config::Daemon = hybridnet_config::Daemon::Meshd;
    type Error = std::convert::Infallible;

    async fn run(ctx: Context) -> Result<(), Self::Error> {
        hybridnet_runtime::idle::run(ctx, plan).await
    }
}

/// What meshd would do with `config`.
pub fn plan(config: &Config) -> (String, serde_json::Value) {
    let c = &config.meshd;
    (
        "idle: the mesh is not implemented yet".to_owned(),
        serde_json::json!({ "admin": c.admin.to_string() }),
    )
}
