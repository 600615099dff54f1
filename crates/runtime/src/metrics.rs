//! The Prometheus registry every daemon shares with its admin endpoint, and the runtime's own metrics.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// A registry behind a lock: components register at start-up, `/metrics` encodes on each scrape.
#[derive(Debug, Clone, Default)]
pub struct SharedRegistry(Arc<Mutex<Registry>>);

impl SharedRegistry {
    /// Registers metrics under `prefix` (e.g. `apiprism`): `f` gets the sub-registry.
    pub fn register<R>(&self, prefix: &str, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut root = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(root.sub_registry_with_prefix(prefix))
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let root = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        // Encoding into a String only fails if a metric's own encoder fails, which ours don't.
        if let Err(error) = encode(&mut out, &root) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }
}

/// The runtime's metrics, shared by all three daemons (prefix `hybridnet_`).
#[derive(Debug, Clone)]
pub struct RuntimeMetrics {
    pub config_reloads: Counter,
    pub config_reload_errors: Counter,
    pub config_generation: Gauge,
    pub ready: Gauge,
    pub config_blank: Counter,
    pub open_files_limit: Gauge,
}

impl RuntimeMetrics {
    pub fn register(registry: &SharedRegistry, daemon: &str) -> Self {
        let metrics = RuntimeMetrics {
            config_reloads: Counter::default(),
            config_reload_errors: Counter::default(),
            config_generation: Gauge::default(),
            ready: Gauge::default(),
            config_blank: Counter::default(),
            open_files_limit: Gauge::default(),
        };
        let info = Info::new(vec![
            ("daemon".to_owned(), daemon.to_owned()),
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ]);
        registry.register("hybridnet", |r| {
            r.register("build", "Build information of the running daemon", info);
            r.register(
                "config_reloads",
                "Config versions applied after start (file changes and SIGHUP)",
                metrics.config_reloads.clone(),
            );
            r.register(
                "config_reload_errors",
                "New config versions rejected as invalid (the running config stays)",
                metrics.config_reload_errors.clone(),
            );
            r.register(
                "config_generation",
                "How many config versions have been applied (1 = the one loaded at start)",
                metrics.config_generation.clone(),
            );
            r.register(
                "ready",
                "1 when the daemon reports ready",
                metrics.ready.clone(),
            );
            r.register(
                "config_blank_reads",
                "Reads that found the config file empty or whitespace-only (the running config stays)",
                metrics.config_blank.clone(),
            );
            r.register(
                "open_files_limit",
                "The soft open-file limit (RLIMIT_NOFILE) after raising it to the hard one at start",
                metrics.open_files_limit.clone(),
            );
        });
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_runtime_metrics_with_prefix() {
        let registry = SharedRegistry::default();
        let m = RuntimeMetrics::register(&registry, "apiprism");
        m.config_reloads.inc();
        let text = registry.encode();
        assert!(text.contains("hybridnet_config_reloads_total 1"), "{text}");
        assert!(
            text.contains("hybridnet_build_info{daemon=\"apiprism\""),
            "{text}"
        );
        assert!(text.contains("# EOF"), "{text}");
    }
}
