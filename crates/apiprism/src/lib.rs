//! apiprism: a per-node loopback TCP load balancer in front of all Kubernetes API servers.
//!
//! - [`core`]: the sans-IO upstream table (health hysteresis, smoothed RTT, selection, dial plans);
//! - `health`: parallel active checks (TCP connect, or a TLS handshake when `tlsServerName` is set);
//! - `admission`: the connection limit (below the open-file limit) and each client's share of it;
//! - `proxy`: listeners and client connections (dial with transparent retry, connections closed when their
//!   upstream goes down or is removed);
//! - `relay`: the splice(2) data path with half-close;
//! - `sched`: a short scheduler slice for the runtime thread (wake-ups preempt sooner on a busy core);
//! - `upstreams`: the desired upstream set from the config and meshd's members, resolved and deduplicated;
//! - `vetting`: discovered upstreams get traffic only after a TLS check against the cluster CA;
//! - `handoff`: upgrades that cut nothing (a new instance takes the listeners and established connections
//!   over a Unix socket).
#![warn(clippy::print_stdout, clippy::dbg_macro)]

mod admission;
pub mod core;
mod handoff;
mod health;
pub mod metrics;
mod proxy;
mod relay;
mod sched;
mod shared;
mod sockopt;
mod status;
mod tls;
mod upstreams;
mod vetting;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridnet_config::Config;
use hybridnet_runtime::{Context, Daemon};
use hybridnet_state::{MEMBERS, Members, RecordWatcher, StateDir, WatchOptions};

use crate::admission::Limits;
use crate::core::{Policy, Table};
use crate::handoff::{GiverSocket, Pair, Taken};
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
    /// One thread: a node-local proxy needs less than a core, and every hop of a round trip (both sockets'
    /// readiness, both relays) stays on it without a wake-up handed between threads.
    const SINGLE_THREAD: bool = true;
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
    /// Where a newer instance asks to take over (`None`: the socket could not be bound).
    giver: Option<GiverSocket>,
    /// Handed over to a newer instance: serve what is left, bind nothing, wait to be stopped.
    retired: bool,
}

/// The main loop: follows the config and the members record, keeps listeners and upstreams in line.
pub async fn run(mut ctx: Context) -> Result<(), Error> {
    sched::request_short_slice(); // the one runtime thread ([`Apiprism`] is `SINGLE_THREAD`)
    let config = ctx.config.borrow_and_update().clone();
    let metrics = ctx.metrics.register("apiprism", Metrics::register);
    let limits = limits(&config);
    tracing::info!(
        max_connections = limits.total,
        max_connections_per_client = limits.per_client,
        open_files = ?hybridnet_runtime::limits::open_files_limit(),
        "connection limits"
    );
    let taken = take_over(&config, limits.total).await;
    let shared = Arc::new(Shared::new(Table::new(policy(&config)), metrics, limits));
    let mut c = Control {
        prober: Prober::new(probe_settings(&config)),
        listeners: Listeners::default(),
        resolver: Resolver::default(),
        vetting: Vetting::default(),
        members: members_watcher(&config),
        started: Instant::now(),
        giver: None,
        retired: false,
        shared,
        config,
        ctx: ctx.clone(),
    };
    c.listeners.offer(taken.listeners);
    c.apply_listeners();
    c.reconcile_upstreams().await;
    c.listeners.serve_pairs(adopt_pairs(taken.pairs), &c.shared);
    c.giver = bind_giver(&c.config);
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
            conn = next_taker(c.giver.as_ref()) => c.give(conn).await,
            () = c.shared.pausing.parked_changed() => {
                // Pairs that paused after a handoff was over (or failed) go on here.
                let pairs = c.shared.pausing.take_parked();
                c.listeners.serve_pairs(pairs, &c.shared);
            }
            () = c.shared.changed.notified() => c.publish(),
            () = vetted.notified() => c.reconcile_upstreams().await,
            _ = tick.tick() => {
                if !c.retired && c.listeners.bound().len() < c.config.apiprism.listen.len() {
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

/// Asks a running instance to hand its listeners and connections over (see `handoff`).
async fn take_over(config: &Config, max_pairs: u32) -> Taken {
    let path = handoff::socket_path(&config.state_dir);
    let max_pairs = usize::try_from(max_pairs).unwrap_or(usize::MAX);
    let taken = tokio::task::spawn_blocking(move || handoff::take(&path, max_pairs)).await;
    match taken {
        Ok(Ok(Some(taken))) => {
            tracing::info!(
                listeners = taken.listeners.len(),
                connections = taken.pairs.len(),
                "took over from the running instance"
            );
            taken
        }
        Ok(Ok(None)) => Taken::default(),
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not take over from the running instance: starting afresh");
            Taken::default()
        }
        Err(error) => {
            tracing::warn!(%error, "handoff task failed: starting afresh");
            Taken::default()
        }
    }
}

/// Handed-over descriptors as tokio streams.
fn adopt_pairs(pairs: Vec<(std::net::SocketAddr, OwnedFd, OwnedFd)>) -> Vec<Pair> {
    let stream = |fd: OwnedFd| {
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(std)
    };
    pairs
        .into_iter()
        .filter_map(
            |(addr, client, upstream)| match (stream(client), stream(upstream)) {
                (Ok(client), Ok(upstream)) => Some(Pair {
                    client,
                    upstream,
                    addr,
                }),
                (Err(error), _) | (_, Err(error)) => {
                    tracing::warn!(upstream = %addr, %error, "handed-over connection unusable");
                    None
                }
            },
        )
        .collect()
}

fn bind_giver(config: &Config) -> Option<GiverSocket> {
    let path = handoff::socket_path(&config.state_dir);
    match GiverSocket::bind(&path) {
        Ok(giver) => Some(giver),
        Err(error) => {
            tracing::warn!(%error, "no handoff socket: a new instance will not be able to take over");
            None
        }
    }
}

/// The next instance that asks to take over; never, without a handoff socket.
async fn next_taker(giver: Option<&GiverSocket>) -> socket2::Socket {
    match giver {
        Some(giver) => giver.accept().await,
        None => std::future::pending().await,
    }
}

/// Waits (at most [`handoff::PAUSE_BOUND`]) until every connection paused or ended, or no more pause for a
/// while (a direction blocked on a slow reader does not pause: that pair stays here).
async fn wait_paused(shared: &Shared) {
    const SETTLE: Duration = Duration::from_millis(100);
    let start = Instant::now();
    let (mut parked, mut since) = (shared.pausing.parked(), Instant::now());
    while shared.admission.slots().active() > 0
        && start.elapsed() < handoff::PAUSE_BOUND
        && since.elapsed() < SETTLE
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = shared.pausing.parked();
        if now != parked {
            (parked, since) = (now, Instant::now());
        }
    }
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

    /// Hands the listeners and the established connections to a newer instance; retires after a success,
    /// goes on as before after a failure (nothing is cut either way).
    async fn give(&mut self, conn: socket2::Socket) {
        let conn =
            match tokio::task::spawn_blocking(move || handoff::hello(&conn).map(|()| conn)).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "handoff request refused");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "handoff request task failed");
                    return;
                }
            };
        tracing::info!("a new instance asks to take over: pausing and handing over");
        self.listeners.stop_accepting();
        self.shared.pausing.pause();
        wait_paused(&self.shared).await;
        let listeners = self.listeners.raw_fds();
        let pairs = self.shared.pausing.take_parked();
        let raw: Vec<_> = pairs
            .iter()
            .map(|p| (p.addr, p.client.as_raw_fd(), p.upstream.as_raw_fd()))
            .collect();
        let given =
            tokio::task::spawn_blocking(move || handoff::give(&conn, &listeners, &raw)).await;
        // New relays (and pairs that pause late) run here again from now on.
        let mut late = self.shared.pausing.resume();
        match given {
            Ok(Ok(())) => {
                let left = self.shared.admission.slots().active() as usize + late.len();
                tracing::info!(
                    connections = pairs.len(),
                    left_here = left,
                    "handed over: retired (serving what is left until stopped)"
                );
                drop(pairs); // our copies: the new instance holds them
                self.listeners.release();
                self.listeners.serve_pairs(late, &self.shared);
                self.giver = None;
                self.retired = true;
                self.ctx.retire();
            }
            Ok(Err(error)) => self.resume(pairs, &mut late, &error.to_string()),
            Err(error) => self.resume(pairs, &mut late, &error.to_string()),
        }
    }

    fn resume(&mut self, pairs: Vec<Pair>, late: &mut Vec<Pair>, error: &str) {
        tracing::warn!(error, "handoff failed: serving on");
        late.extend(pairs);
        self.listeners
            .serve_pairs(std::mem::take(late), &self.shared);
        self.listeners
            .resume_accepting(&self.shared, &self.ctx.shutdown);
    }

    fn apply_listeners(&mut self) {
        if self.retired {
            return; // a newer instance serves the listen addresses
        }
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
