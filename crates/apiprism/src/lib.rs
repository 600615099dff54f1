//! apiprism: a per-node loopback TCP load balancer in front of all Kubernetes API servers.
//!
//! - [`core`]: the sans-IO upstream table (health hysteresis, smoothed RTT, selection, dial plans);
//! - `health`: parallel active checks (TCP connect, or a TLS handshake when `tlsServerName` is set);
//! - `admission`: the connection limit (below the open-file limit) and each client's share of it;
//! - `proxy`: listeners and client connections (dial with transparent retry, connections closed when their
//!   upstream goes down or is removed);
//! - `relay`: the splice(2) data path with half-close;
//! - `upstreams`: the desired upstream set from the config and meshd's members, resolved and deduplicated;
//! - `vetting`: discovered upstreams get traffic only after a TLS check against the cluster CA.
#![warn(clippy::print_stdout, clippy::dbg_macro)]

mod admission;
pub mod core;
mod health;
pub mod metrics;
mod proxy;
mod relay;
mod shared;
mod sockopt;
mod status;
mod tls;
mod upstreams;
mod vetting;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridnet_config::Config;
use hybridnet_runtime::{Context, Daemon};
use hybridnet_state::{MEMBERS, Members, RecordWatcher, StateDir, WatchOptions};

use crate::admission::Limits;
use crate::core::{Policy, Table};
use crate::health::{ProbeSettings, Prober};
use crate::metrics::Metrics;
use crate::proxy::Listeners;
use crate::shared::Shared;
use crate::upstreams::{RESOLVE_EVERY, Resolver, has_hostnames};
use crate::vetting::Vetting;

/// How often listeners that failed to bind are retried, and the status counters refreshed.
const TICK: Duration = Duration::from_secs(2);

/// apiprism's errors. The daemon itself retries what it can; nothing is fatal today.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0}")]
    Other(String),
}

/// The apiprism daemon.
#[derive(Debug)]
pub struct Apiprism;

impl Daemon for Apiprism {
    const KIND: hybridnet_config::Daemon = hybridnet_config::Daemon::Apiprism;
    type Error = Error;

    async fn run(ctx: Context) -> Result<(), Self::Error> {
        run(ctx).await
    }

    fn render_details(details: &serde_json::Value) -> String {
        status::render(details)
    }
}

fn policy(c: &Config) -> Policy {
    let a = &c.apiprism;
    Policy {
        fall: a.health_check.fall,
        rise: a.health_check.rise,
        probe_timeout: a.health_check.timeout,
        dial_timeout: a.dial_timeout,
    }
}

fn probe_settings(c: &Config) -> ProbeSettings {
    let a = &c.apiprism;
    ProbeSettings {
        interval: a.health_check.interval,
        timeout: a.health_check.timeout,
        tls_server_name: a.tls_server_name.clone(),
        cluster_ca_file: a.cluster_ca_file.clone(),
    }
}

fn members_watcher(c: &Config) -> RecordWatcher<Members> {
    StateDir::new(&c.state_dir).watch(MEMBERS.0, MEMBERS.1, WatchOptions::default())
}

/// Everything the control loop owns.
struct Control {
    ctx: Context,
    config: Arc<Config>,
    shared: Arc<Shared>,
    prober: Prober,
    listeners: Listeners,
    resolver: Resolver,
    vetting: Vetting,
    members: RecordWatcher<Members>,
    started: Instant,
}

/// The main loop: follows the config and the members record, keeps listeners and upstreams in line.
pub async fn run(mut ctx: Context) -> Result<(), Error> {
    let config = ctx.config.borrow_and_update().clone();
    let metrics = ctx.metrics.register("apiprism", Metrics::register);
    let limits = limits(&config);
    tracing::info!(
        max_connections = limits.total,
        max_connections_per_client = limits.per_client,
        open_files = ?hybridnet_runtime::limits::open_files_limit(),
        "connection limits"
    );
    let shared = Arc::new(Shared::new(Table::new(policy(&config)), metrics, limits));
    let mut c = Control {
        prober: Prober::new(probe_settings(&config)),
        listeners: Listeners::default(),
        resolver: Resolver::default(),
        vetting: Vetting::default(),
        members: members_watcher(&config),
        started: Instant::now(),
        shared,
        config,
        ctx: ctx.clone(),
    };
    c.apply_listeners();
    c.reconcile_upstreams().await;
    c.publish();
    let mut tick = tokio::time::interval(TICK);
    let mut resolve = tokio::time::interval(RESOLVE_EVERY);
    resolve.reset();
    let vetted = Arc::clone(&c.vetting.changed);
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            changed = ctx.config.changed() => {
                if changed.is_err() {
                    break;
                }
                let config = ctx.config.borrow_and_update().clone();
                c.apply_config(config).await;
            }
            _ = c.members.changed() => {
                tracing::info!("meshd members changed");
                c.reconcile_upstreams().await;
            }
            _ = resolve.tick() => {
                if has_hostnames(&c.config.apiprism.upstreams) {
                    c.reconcile_upstreams().await;
                }
            }
            () = c.shared.changed.notified() => c.publish(),
            () = vetted.notified() => c.reconcile_upstreams().await,
            _ = tick.tick() => {
                if c.listeners.bound().len() < c.config.apiprism.listen.len() {
                    c.apply_listeners();
                }
                c.prober.reap();
                c.publish();
            }
        }
    }
    c.stop().await;
    Ok(())
}

/// The connection limits from the config and the open-file limit (the runtime raised the soft limit to
/// the hard one at start).
fn limits(c: &Config) -> Limits {
    Limits::new(
        c.apiprism.max_connections,
        c.apiprism.max_connections_per_client,
        hybridnet_runtime::limits::open_files_limit(),
    )
}

impl Control {
    async fn apply_config(&mut self, config: Arc<Config>) {
        let old = std::mem::replace(&mut self.config, config);
        let new = Arc::clone(&self.config);
        if old.apiprism != new.apiprism {
            tracing::info!("config changed: applying");
        }
        self.shared.table().set_policy(policy(&new));
        self.shared.set_limits(limits(&new));
        self.prober.set_settings(probe_settings(&new));
        if old.state_dir != new.state_dir {
            self.members = members_watcher(&new);
        }
        self.apply_listeners();
        self.reconcile_upstreams().await;
        self.publish();
    }

    fn apply_listeners(&mut self) {
        let want = self.config.apiprism.listen.clone();
        let errors = self
            .listeners
            .reconcile(&want, &self.shared, &self.ctx.shutdown);
        for (addr, error) in errors {
            tracing::warn!(listen = %addr, %error, "cannot listen (retrying)");
        }
        // Ready once we serve: every listener bound, or at least one when some address cannot be bound.
        self.ctx
            .set_ready(!self.listeners.bound().is_empty() || want.is_empty());
    }

    async fn reconcile_upstreams(&mut self) {
        let members = self.members.latest().map(|r| r.data.clone());
        let desired = self
            .resolver
            .desired(&self.config.apiprism.upstreams, members.as_ref())
            .await;
        let (desired, verified) =
            self.vetting
                .admit(desired, &probe_settings(&self.config), &self.ctx.shutdown);
        let changes = self.shared.table().reconcile(&desired, Instant::now());
        if changes.is_empty() {
            return;
        }
        for addr in &changes.removed {
            tracing::info!(upstream = %addr, "upstream removed: its connections closed");
            self.prober.remove(*addr, &self.shared);
            self.shared.forget_metrics(*addr);
        }
        for addr in &changes.added {
            tracing::info!(upstream = %addr, "upstream added");
            let verify = verified.contains(addr);
            self.prober
                .add(*addr, &self.shared, &self.ctx.shutdown, verify);
        }
        let table = self.shared.table();
        let m = &self.shared.metrics;
        m.upstreams.set(i64::try_from(table.len()).unwrap_or(0));
        m.upstreams_usable
            .set(i64::try_from(table.usable()).unwrap_or(0));
        for u in table.iter() {
            m.sync(u);
        }
        drop(table);
        self.shared.changed.notify_one();
    }

    fn publish(&self) {
        let (summary, details) =
            status::report(&self.shared.table(), &self.listeners.bound(), self.started);
        self.ctx.status.set(summary, details);
    }

    async fn stop(self) {
        tracing::info!("stopping: closing listeners and connections");
        self.shared.table().cancel_all();
        self.listeners.stop().await;
        self.prober.stop().await;
        self.ctx.set_ready(false);
    }
}
