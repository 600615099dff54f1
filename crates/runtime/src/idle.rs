//! The main loop of a daemon whose data plane has not landed yet: it follows the config, logs and
//! publishes what it would do, reports ready, and stops on shutdown.

use std::sync::Arc;

use hybridnet_config::Config;

use crate::Context;

/// A description of what the daemon would do with a config: a summary line and details for `status`.
pub type Plan = fn(&Config) -> (String, serde_json::Value);

/// Runs until `ctx.shutdown`, applying every config version with `plan`. Never fails.
pub async fn run(mut ctx: Context, plan: Plan) -> Result<(), std::convert::Infallible> {
    let mut config: Arc<Config> = ctx.config.borrow_and_update().clone();
    loop {
        let (summary, details) = plan(&config);
        tracing::info!(%details, "{summary}");
        ctx.status.set(summary, details);
        ctx.set_ready(true);
        tokio::select! {
            () = ctx.shutdown.cancelled() => return Ok(()),
            changed = ctx.config.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                config = ctx.config.borrow_and_update().clone();
            }
        }
    }
}
