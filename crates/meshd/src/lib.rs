//! meshd: a WireGuard mesh between Kubernetes nodes that recovers from a dead path in seconds, on kernel or
//! userspace WireGuard.
//!
//! - [`identity`]: the key pair in `dataDir` and the mesh address (ULA /64 from the cluster ID, interface ID
//!   from the public key);
//! - [`wg`]: the device model, the pure desired-vs-actual [`wg::diff`], and the two backends (kernel
//!   netlink, embedded boringtun on a TUN device) configured by the same reconcile code;
//! - [`probe`] and [`peer`]: the authenticated probe protocol and the pure per-peer state machine (parallel
//!   probing of every candidate, RTT ranking, failover in about 1.5 s);
//! - [`net`]: addresses, routes, rules over rtnetlink (own table, rule priority and fwmark bit);
//! - [`mesh`]: the running mesh that ties them together: sources (static, cached and discovered peers,
//!   liveness, NAT) -> [`plan`] (pure: the desired state of every resource) -> the appliers (one per
//!   resource, drift repaired in every resync) -> report ([`status`]: `status.json` details and
//!   `members.json`; [`cache`]: the last known peers in `dataDir`);
//! - [`responder`]: the probe socket's thread (pings answered at once, whatever the mesh is doing);
//!   [`sysctl`]: forwarding without breaking SLAAC, restored on stop.
#![forbid(unsafe_code)]
#![warn(clippy::print_stdout, clippy::dbg_macro)]

pub mod bucket;
pub mod cache;
pub mod discovery;
pub mod forwarder;
pub mod identity;
pub mod kubespan;
pub mod mesh;
pub mod metrics;
pub mod model;
pub mod net;
pub mod nft;
pub mod peer;
pub mod plan;
mod private;
pub mod probe;
pub mod probing;
pub mod relay;
pub mod responder;
pub mod status;
pub mod sysctl;
pub mod topology;
pub mod wg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridnet_config::Config;
use hybridnet_runtime::{Context, Daemon};
use hybridnet_state::{MEMBERS, Members, StateDir};

use crate::discovery::{Discovery, DiscoveryKey};
use crate::mesh::Mesh;

/// meshd's errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("private key {path}: {reason}")]
    Key {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("WireGuard backend: {0}")]
    Backend(String),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{0}")]
    Io(String),
    /// A link of meshd's interface name that meshd did not create.
    #[error("{0}")]
    Foreign(String),
}

/// The meshd daemon.
#[derive(Debug)]
pub struct Meshd;

impl Daemon for Meshd {
    const KIND: hybridnet_config::Daemon = hybridnet_config::Daemon::Meshd;
    type Error = Error;

    async fn run(ctx: Context) -> Result<(), Error> {
        run(ctx).await
    }

    fn render_details(details: &serde_json::Value) -> String {
        status::render(details)
    }
}

/// How often status, metrics, members and the cache are refreshed.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The peer machines run at most this often (probe datagrams in between are only recorded), so the work
/// per second stays O(peers × 50), not O(peers²) with many peers answering.
const POLL_GRANULARITY: Duration = Duration::from_millis(20);
/// How long to wait before retrying a mesh that failed to start.
const RETRY_START: Duration = Duration::from_secs(2);

async fn run(mut ctx: Context) -> Result<(), Error> {
    let metrics = metrics::Metrics::register(&ctx.metrics);
    let mut mesh: Option<Mesh> = None;
    let mut discovery: Option<Discovery> = None;
    let mut members_written: Option<(Members, Instant)> = None;
    let mut underlay: (Vec<std::net::IpAddr>, Option<Instant>) = (Vec::new(), None);
    let mut next_report = Instant::now();
    let mut next_start = Instant::now();
    let mut last_poll = Instant::now()
        .checked_sub(POLL_GRANULARITY)
        .unwrap_or_else(Instant::now);
    // A new config's static peers, being resolved (hostname lookups take up to 2 s each) in a task of
    // their own, so that the mesh keeps probing meanwhile.
    let mut resolving: Option<tokio::task::JoinHandle<(Arc<Config>, Vec<mesh::PeerSpec>)>> = None;
    // An error meshd cannot recover from: the loop stops, what it owns is removed, the process exits 1.
    let mut fatal: Option<Error> = None;
    loop {
        let now = Instant::now();
        if mesh.is_none() && now >= next_start {
            let cfg: Arc<Config> = ctx.config.borrow_and_update().clone();
            match Mesh::start(cfg, metrics.clone()).await {
                Ok(m) => mesh = Some(m),
                Err(error) => {
                    tracing::error!(%error, "cannot start the mesh; retrying");
                    ctx.status.set(
                        format!("error: {error}"),
                        serde_json::json!({ "error": error.to_string() }),
                    );
                    next_start = now + RETRY_START;
                }
            }
        }
        if let Some(m) = mesh.as_mut() {
            sync_discovery(&mut discovery, m, &metrics).await;
        }
        let wake = mesh
            .as_ref()
            .map_or(next_start, Mesh::next_wakeup)
            .min(next_report)
            .max(last_poll + POLL_GRANULARITY);
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            changed = ctx.config.changed() => {
                if changed.is_err() { break; }
                let cfg: Arc<Config> = ctx.config.borrow_and_update().clone();
                if let Some(m) = mesh.as_mut() {
                    if m.compatible(&cfg) {
                        if let Some(old) = resolving.take() {
                            old.abort();
                        }
                        resolving = Some(tokio::spawn(async move {
                            let specs = mesh::peer_specs(&cfg).await;
                            (cfg, specs)
                        }));
                    } else if let Some(old) = mesh.take() {
                        tracing::info!("device settings changed: rebuilding the mesh");
                        old.shutdown().await;
                        next_start = Instant::now();
                    }
                }
            }
            changed = async { match discovery.as_mut() { Some(d) => d.snapshot.changed().await, None => std::future::pending().await } } => {
                if changed.is_ok()
                    && let (Some(d), Some(m)) = (discovery.as_mut(), mesh.as_mut())
                {
                    let snap = d.snapshot.borrow_and_update().clone();
                    apply_discovered(m, &snap);
                    // Publish at once what the registries just learnt about us (our pod CIDRs).
                    next_report = Instant::now();
                }
            }
            done = async { match resolving.as_mut() { Some(r) => r.await, None => std::future::pending().await } } => {
                resolving = None;
                match done {
                    Ok((cfg, specs)) => {
                        if let Some(m) = mesh.as_mut().filter(|m| m.compatible(&cfg))
                            && let Err(error) = m.update_config(cfg, specs).await
                        {
                            tracing::warn!(%error, "applying the new config failed");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "resolving the new config's peers failed"),
                }
            }
            result = async { match mesh.as_mut() { Some(m) => m.recv().await, None => std::future::pending().await } } => {
                if let Err(error) = result {
                    tracing::error!(%error, "unrecoverable: stopping");
                    fatal = Some(error);
                    break;
                }
            }
            () = tokio::time::sleep_until(wake.into()) => {}
        }
        let Some(m) = mesh.as_mut() else { continue };
        if last_poll.elapsed() < POLL_GRANULARITY {
            continue;
        }
        last_poll = Instant::now();
        let changed = m.poll(last_poll).await;
        if changed || Instant::now() >= next_report {
            next_report = Instant::now() + REPORT_EVERY;
            report(
                &ctx,
                m,
                discovery.as_ref(),
                &mut members_written,
                &mut underlay,
            )
            .await;
        }
    }
    // What meshd owns goes first: a drain cut short (the supervisor's timeout) must not leave it behind
    // while the discovery client unpublishes us (up to 4 s).
    if let Some(m) = mesh {
        m.shutdown().await;
    }
    if let Some(d) = discovery.take() {
        d.stop().await;
    }
    fatal.map_or(Ok(()), Err)
}

/// Starts, restarts or stops discovery to match the config and the mesh's key.
async fn sync_discovery(
    discovery: &mut Option<Discovery>,
    mesh: &mut Mesh,
    metrics: &metrics::Metrics,
) {
    let want = DiscoveryKey::of(&mesh.cfg);
    let our_id = discovery::node_id(&mesh.public);
    let same = match (discovery.as_ref(), want.as_ref()) {
        (Some(d), Some(k)) => d.key == *k && d.our_id == our_id,
        (None, None) => true,
        _ => false,
    };
    if same {
        return;
    }
    if let Some(old) = discovery.take() {
        tracing::info!("discovery settings changed: restarting discovery");
        // Stopping takes up to a few seconds (the registries unpublish us): not on the mesh's loop.
        tokio::spawn(old.stop());
    }
    if let Some(key) = want {
        if key.endpoints().is_empty() && !mesh.cfg.cluster.discovery.endpoints.is_empty() {
            tracing::warn!(
                "the discovery service needs the cluster ID and secret: only the Kubernetes registry runs"
            );
        }
        tracing::info!(endpoints = ?key.endpoints(), kubernetes = ?key.kubernetes(), node_id = %our_id, "discovery starting");
        *discovery = Some(Discovery::start(key, our_id, metrics.clone()));
    } else if mesh.cfg.cluster.discovery.enabled {
        tracing::warn!(
            "discovery is enabled but the cluster ID or secret is missing: discovery stays off"
        );
    }
}

fn apply_discovered(mesh: &mut Mesh, snap: &discovery::Snapshot) {
    let specs = discovery::peer_specs(&snap.affiliates, &mesh.cfg, &mesh.public);
    mesh.set_discovered(specs, snap.synced);
}

async fn report(
    ctx: &Context,
    mesh: &mut Mesh,
    discovery: Option<&Discovery>,
    written: &mut Option<(Members, Instant)>,
    underlay: &mut (Vec<std::net::IpAddr>, Option<Instant>),
) {
    // The counters are those of the poll's last reading (every `probing::stats_interval`): a report after
    // each change does not dump the device again.
    // One plan for the metrics and the status (at thousands of peers a plan costs milliseconds).
    let planned = mesh.planned();
    mesh.update_metrics(&planned.paths);
    let (summary, mut details, peers) = status::report(mesh, &planned);
    if let Some(d) = discovery {
        details["discovery"] = serde_json::json!({
            "synced": d.snapshot.borrow().synced,
            "registries": d.snapshot.borrow().registries,
        });
    }
    match status::with_peers(&details, peers) {
        Ok(json) => ctx.status.set_json(summary, json),
        Err(error) => {
            tracing::warn!(%error, "cannot write the peer table into the status details");
            ctx.status.set(summary, details);
        }
    }
    if mesh.last_error.is_none() && !ctx.is_ready() {
        ctx.set_ready(true);
    }
    mesh.store_cache();
    // This node's underlay addresses (re-read every 30 s), filtered as KubeSpan filters its endpoints.
    if underlay
        .1
        .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
        && let Ok(addrs) = mesh.underlay_addresses().await
    {
        let mut kept = mesh.cfg.meshd.endpoint_filter.apply(&addrs);
        for extra in &mesh.cfg.meshd.extra_announced_endpoints {
            if !kept.contains(&extra.ip()) {
                kept.push(extra.ip());
            }
        }
        *underlay = (kept, Some(Instant::now()));
    }
    if let Some(d) = discovery.filter(|d| !d.waits_for_pod_cidrs()) {
        let pod_cidrs = d.snapshot.borrow().own_pod_cidrs.clone();
        let mut local = discovery::local(
            &mesh.cfg,
            &mesh.public,
            std::net::IpAddr::V6(mesh.mesh_addr),
            &underlay.0,
            &pod_cidrs,
        );
        // Our reflexive address (from peers' pongs) when the NAT keeps ports: each node publishes only
        // its own endpoints.
        for e in mesh.reflexive_endpoints() {
            if !local.endpoints.contains(&e) {
                local.endpoints.push(e);
            }
        }
        d.set_local(local);
    }
    let members = status::members(mesh, underlay.0.clone());
    let same = written.as_ref().is_some_and(|(w, at)| {
        at.elapsed() < Duration::from_secs(30) && strip_seen(w) == strip_seen(&members)
    });
    if !same {
        let dir = StateDir::new(&mesh.cfg.state_dir);
        match dir.write(MEMBERS.0, MEMBERS.1, &members) {
            Ok(()) => *written = Some((members, Instant::now())),
            Err(error) => tracing::warn!(%error, "cannot write members.json"),
        }
    }
}

fn strip_seen(m: &Members) -> Members {
    let mut m = m.clone();
    for x in &mut m.members {
        x.last_seen = 0;
    }
    m
}
