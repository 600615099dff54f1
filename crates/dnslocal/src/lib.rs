//! dnslocal: a node-local DNS cache and forwarder.
//!
//! Until its data plane lands (issue "dnslocal"), `run` follows the config and reports what it would serve.
#![forbid(unsafe_code)]
#![warn(clippy::print_stdout, clippy::dbg_macro)]

use hybridnet_config::Config;
use hybridnet_runtime::{Context, Daemon};

/// The dnslocal daemon.
#[derive(Debug)]
pub struct Dnslocal;

impl Daemon for Dnslocal {
    const KIND: hybridnet_config::Daemon = hybridnet_config::Daemon::Dnslocal;
    type Error = std::convert::Infallible;

    async fn run(ctx: Context) -> Result<(), Self::Error> {
        hybridnet_runtime::idle::run(ctx, plan).await
    }
}

/// What dnslocal would do with `config`.
pub fn plan(config: &Config) -> (String, serde_json::Value) {
    let c = &config.dnslocal;
    (
        "idle: the DNS cache is not implemented yet".to_owned(),
        serde_json::json!({ "admin": c.admin.to_string() }),
    )
}
