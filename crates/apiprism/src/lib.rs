//! apiprism: a per-node loopback TCP load balancer in front of all Kubernetes API servers.
//!
//! Until its data plane lands (issue "apiprism"), `run` follows the config and reports what it would serve.
#![forbid(unsafe_code)]
#![warn(clippy::print_stdout, clippy::dbg_macro)]

use hybridnet_config::Config;
use hybridnet_runtime::{Context, Daemon};

/// The apiprism daemon.
#[derive(Debug)]
pub struct Apiprism;

impl Daemon for Apiprism {
    const KIND: hybridnet_config::Daemon = hybridnet_config::Daemon::Apiprism;
    type Error = std::convert::Infallible;

    async fn run(ctx: Context) -> Result<(), Self::Error> {
        hybridnet_runtime::idle::run(ctx, plan).await
    }
}

/// What apiprism would do with `config`.
pub fn plan(config: &Config) -> (String, serde_json::Value) {
    let c = &config.apiprism;
    (
        "idle: the load balancer is not implemented yet".to_owned(),
        serde_json::json!({ "admin": c.admin.to_string() }),
    )
}
