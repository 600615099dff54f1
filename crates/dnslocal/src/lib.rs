//! dnslocal: a node-local DNS cache and forwarder (DESIGN.md section 5).
//!
//! - [`wire`]: sans-IO DNS wire handling (query parsing, answer analysis, rendering with ID/case/TTL patching);
//! - [`chain`]: only the records of the question's chain (bailiwick) are cached and passed on;
//! - [`cache`]: the sharded, bounded, TTL-aware wire-format cache with serve-stale and prefetch signals;
//! - [`engine`]: hits on the hot path; misses coalesced, bounded, routed, served stale when upstreams fail;
//! - [`upstream`]: UDP (TCP on truncation) and persistent pipelined TCP upstreams, health and failover;
//! - [`server`]: `SO_REUSEPORT` UDP sockets (one thread each) and TCP listeners, drained without loss;
//! - [`limit`]: per-client budgets on the UDP path (answers beyond them truncated or dropped);
//! - [`link`]: the dummy link holding the listen addresses (rtnetlink);
//! - [`intercept`]: `interceptClusterDNS`, the NOTRACK rules for the kube-dns ClusterIP (nftables over netlink);
//! - [`loops`]: forwarding-loop checks (own addresses, a probe that must not come back to us);
//! - [`zone`]: `clusterZone: kubernetes`, the pure model of Services and EndpointSlices and the answers
//!   the Kubernetes DNS specification derives from it; [`authority`]: that model as the engine and the
//!   status see it, with its snapshot in `dataDir`; [`kubeapi`]: the list + watch that feeds it.
#![forbid(unsafe_code)]
#![warn(clippy::print_stdout, clippy::dbg_macro)]

pub mod authority;
pub mod cache;
pub mod chain;
pub mod engine;
pub mod intercept;
pub mod kubeapi;
pub mod limit;
pub mod link;
pub mod loops;
pub mod metrics;
pub mod server;
pub mod upstream;
pub mod wire;
pub mod zone;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hybridnet_config::{ClusterZone, Config, DnslocalConfig};
use hybridnet_runtime::{Context, Daemon};

use crate::authority::Authority;
use crate::cache::Cache;
use crate::engine::{Engine, MAX_INFLIGHT, Routes};
use crate::limit::ClientBudget;
use crate::metrics::{Metrics, Outcome};
use crate::server::Listeners;
use crate::upstream::{Pool, Upstream};
use crate::wire::TtlPolicy;

/// How long upstream SERVFAIL answers are cached.
pub const SERVFAIL_TTL: u32 = 1;
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_secs(2);

/// dnslocal's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listen address link: {0}")]
    Link(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("upstream {addr}: {source}")]
    Upstream {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The dnslocal daemon.
#[derive(Debug)]
pub struct Dnslocal;

impl Daemon for Dnslocal {
    const KIND: hybridnet_config::Daemon = hybridnet_config::Daemon::Dnslocal;
    type Error = Error;

    async fn run(ctx: Context) -> Result<(), Error> {
        run(ctx).await
    }

    fn render_details(details: &serde_json::Value) -> String {
        render_details(details)
    }
}

/// The nameservers of a resolv.conf text.
pub fn resolv_conf_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|w| w.split('%').next()?.parse().ok())
        .collect()
}

/// Where names outside the cluster zones go: `upstreams`, else Talos's nameservers, else the node's
/// `/etc/resolv.conf`; never our own listen addresses (a loop).
pub fn default_upstreams(config: &Config, resolv_conf: &str) -> Vec<SocketAddr> {
    let c = &config.dnslocal;
    let candidates: Vec<SocketAddr> = if !c.upstreams.is_empty() {
        c.upstreams.clone()
    } else if !config.cluster.nameservers.is_empty() {
        config
            .cluster
            .nameservers
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    } else {
        resolv_conf_nameservers(resolv_conf)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    };
    not_ours(c, candidates)
}

/// `candidates` without duplicates and without our own listen addresses (a loop).
fn not_ours(
    c: &DnslocalConfig,
    candidates: impl IntoIterator<Item = SocketAddr>,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for addr in candidates {
        if loops::is_own(&c.listen, addr) {
            tracing::warn!(%addr, "skipping an upstream that is one of our own listen addresses (a loop)");
        } else if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// One running configuration: engine, listeners.
struct Instance {
    engine: Arc<Engine>,
    listeners: Listeners,
    config: DnslocalConfig,
    /// The loop probe ([`loops::probe_loop`]), stopped when the instance drains.
    probe: tokio::task::JoinHandle<()>,
}

fn pool(addrs: &[SocketAddr], tcp_only: bool, metrics: &Metrics) -> Pool {
    let upstreams = addrs
        .iter()
        .map(|&addr| {
            metrics.upstream_up(&addr.to_string(), true);
            Arc::new(Upstream::new(addr, tcp_only, metrics))
        })
        .collect();
    Pool { upstreams }
}

/// Whether a new configuration keeps what the cache holds valid: same cache settings, same routing.
fn same_cache(old: &Config, new: &Config) -> bool {
    let (a, b) = (&old.dnslocal, &new.dnslocal);
    a.cache == b.cache
        && a.cluster_domain == b.cluster_domain
        && a.cluster_dns == b.cluster_dns
        && a.upstreams == b.upstreams
        && a.forward == b.forward
        && old.cluster.nameservers == new.cluster.nameservers
}

impl Instance {
    /// Starts serving `config`, with `cache` when one is handed over (a reload), else a new one.
    async fn start(
        config: &Config,
        metrics: &Metrics,
        cache: Option<Arc<Cache>>,
        authority: Option<Arc<Authority>>,
    ) -> Result<Instance, Error> {
        let c = &config.dnslocal;
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let upstreams = default_upstreams(config, &resolv);
        if upstreams.is_empty() {
            tracing::error!("no upstream for names outside the cluster: they will get SERVFAIL");
        }
        for addr in c.upstreams.iter().filter(|a| loops::is_own(&c.listen, **a)) {
            tracing::error!(%addr, "dnslocal.upstreams holds one of our own listen addresses (a loop): refused");
            metrics.forward_loop("own_address");
        }
        let (own, cluster_dns): (Vec<SocketAddr>, Vec<SocketAddr>) = c
            .cluster_dns
            .iter()
            .partition(|a| loops::is_own(&c.listen, **a));
        for addr in &own {
            tracing::error!(%addr, "dnslocal.clusterDNS is one of our own listen addresses: forwarding the cluster zone there would loop; refused (point it at kube-dns's ClusterIP)");
            metrics.forward_loop("own_address");
        }
        let refused = cluster_dns.is_empty() && !own.is_empty();
        if refused {
            tracing::error!("no cluster DNS left: cluster-zone questions get SERVFAIL at once");
        }
        let cluster = if cluster_dns.is_empty() {
            None
        } else {
            Some(Arc::new(pool(&cluster_dns, true, metrics)))
        };
        let routes = Routes {
            cluster_zones: [c.cluster_domain.as_str(), "in-addr.arpa", "ip6.arpa"]
                .iter()
                .map(|z| wire::name_to_wire(z))
                .collect(),
            cluster,
            forward: c
                .forward
                .iter()
                .map(|f| {
                    let to = not_ours(c, f.to.iter().copied());
                    (
                        wire::name_to_wire(&f.zone),
                        Arc::new(pool(&to, false, metrics)),
                    )
                })
                .collect(),
            default: Arc::new(pool(&upstreams, false, metrics)),
            authority,
        };
        let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        let policy = TtlPolicy {
            max_ttl: secs(c.cache.max_ttl),
            negative_ttl: secs(c.cache.negative_ttl),
            servfail_ttl: SERVFAIL_TTL,
        };
        let cache = cache.unwrap_or_else(|| {
            Arc::new(Cache::new(
                c.cache.size,
                c.cache.max_memory,
                c.cache.serve_stale.as_secs(),
                c.cache.prefetch,
            ))
        });
        let mut engine = Engine::new(
            cache,
            routes,
            policy,
            metrics.clone(),
            MAX_INFLIGHT,
            tokio::runtime::Handle::current(),
        );
        engine.budget = ClientBudget::new(c.client_rate);
        let engine = Arc::new(engine.with_loops(loops::LoopGuard::new(refused)));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let listeners =
            Listeners::bind(&c.listen, threads, &engine).map_err(|source| Error::Bind {
                addr: c
                    .listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                source,
            })?;
        tracing::info!(listen = ?c.listen, ?upstreams, cluster_dns = ?c.cluster_dns, threads, "serving DNS");
        let probe = tokio::spawn(loops::probe_loop(
            Arc::downgrade(&engine),
            c.cluster_domain.clone(),
        ));
        Ok(Instance {
            engine,
            listeners,
            config: c.clone(),
            probe,
        })
    }

    /// Stops taking queries, answers what is queued and in flight (bounded), and returns.
    async fn drain(self) {
        self.probe.abort();
        self.listeners.drain().await;
        let deadline = tokio::time::Instant::now() + engine::MISS_DEADLINE * 2;
        while self.engine.inflight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn status(&self) -> (String, serde_json::Value) {
        let e = &self.engine;
        let m = &e.metrics;
        let entries = e.cache.len();
        m.cache_entries.set(entries as i64);
        let bytes = e.cache.bytes();
        m.cache_bytes.set(bytes as i64);
        let (hits, stale, misses, coalesced, servfail) = (
            m.total(Outcome::Hit),
            m.total(Outcome::Stale),
            m.total(Outcome::Miss),
            m.total(Outcome::Coalesced),
            m.total(Outcome::Servfail),
        );
        let pools = |p: &Pool| -> Vec<serde_json::Value> {
            p.upstreams
                .iter()
                .map(|u| {
                    serde_json::json!({
                        "addr": u.addr.to_string(), "protocol": u.protocol(), "up": u.is_up(),
                        "srtt_ms": u.srtt().as_secs_f64() * 1000.0,
                    })
                })
                .collect()
        };
        let up = e
            .routes
            .default
            .upstreams
            .iter()
            .filter(|u| u.is_up())
            .count();
        let summary = format!(
            "serving on {}: {entries} cached, {up}/{} upstreams up",
            self.config
                .listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            e.routes.default.upstreams.len()
        );
        let details = serde_json::json!({
            "listen": self.config.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "cluster_domain": self.config.cluster_domain,
            "cluster_dns": e.routes.cluster.as_deref().map(pools).unwrap_or_default(),
            "upstreams": pools(&e.routes.default),
            "forward": e.routes.forward.iter().map(|(zone, p)| serde_json::json!({
                "zone": wire::wire_to_name(zone), "upstreams": pools(p),
            })).collect::<Vec<_>>(),
            "cache": { "entries": entries, "capacity": e.cache.capacity(), "bytes": bytes, "max_bytes": e.cache.max_bytes() },
            "queries": { "hit": hits, "stale": stale, "miss": misses, "coalesced": coalesced, "servfail": servfail, "authoritative": m.total(Outcome::Authoritative) },
            "inflight": e.inflight(),
            "cluster_loop": e.loops.cluster_refused(),
            "intercept": self.config.intercept_cluster_dns.map(|ip| ip.to_string()),
            "cluster_zone": e.routes.authority.as_deref().map(|a| cluster_zone_status(a, m)),
        });
        (summary, details)
    }
}

/// The configuration as served: with `interceptClusterDNS`, the kube-dns ClusterIP (port 53) is one more
/// listen address (held on the link, bound, removed like any other).
pub fn effective(config: &Arc<Config>) -> Arc<Config> {
    let Some(ip) = config.dnslocal.intercept_cluster_dns else {
        return config.clone();
    };
    let mut c = (**config).clone();
    let addr = SocketAddr::new(ip, 53);
    if !c.dnslocal.listen.contains(&addr) {
        c.dnslocal.listen.push(addr);
    }
    Arc::new(c)
}

/// Installs (or repairs) the NOTRACK rules for `ip`, or removes the table when `ip` is `None` and
/// `installed` says it may be there. Logs what it did; returns whether the table is ours now.
async fn sync_intercept(ip: Option<IpAddr>, installed: bool) -> bool {
    match ip {
        Some(ip) => match tokio::task::spawn_blocking(move || intercept::check(ip)).await {
            Ok(Ok(hybridnet_nft::Outcome::Installed)) => {
                tracing::info!(table = intercept::TABLE, %ip, "NOTRACK rules for the kube-dns ClusterIP installed");
                true
            }
            Ok(Ok(hybridnet_nft::Outcome::InPlace)) => true,
            Ok(Err(error)) => {
                tracing::error!(%error, %ip, "cannot install the NOTRACK rules: queries to the ClusterIP go to kube-dns");
                installed
            }
            Err(error) => {
                tracing::error!(%error, "NOTRACK rules task failed");
                installed
            }
        },
        None if installed => {
            remove_intercept().await;
            false
        }
        None => false,
    }
}

async fn remove_intercept() {
    match tokio::task::spawn_blocking(intercept::remove).await {
        Ok(Ok(())) => tracing::info!(
            table = intercept::TABLE,
            "NOTRACK rules removed: queries to the ClusterIP go to kube-dns"
        ),
        Ok(Err(error)) => tracing::warn!(%error, "cannot remove the NOTRACK rules"),
        Err(error) => tracing::warn!(%error, "NOTRACK removal task failed"),
    }
}

async fn run(mut ctx: Context) -> Result<(), Error> {
    let metrics = ctx.metrics.register("dnslocal", Metrics::register);
    let mut config: Arc<Config> = effective(&ctx.config.borrow_and_update().clone());
    // Whether our nftables table may be in place (so it is removed when interception is turned off).
    let mut intercepting = false;
    let mut link: Option<Link> = None;
    let mut instance: Option<Instance> = None;
    let mut zone_task = ZoneTask::default();
    loop {
        if instance.is_none() {
            zone_task.sync(&config, &metrics);
            match start(&config, &metrics, &mut link, None, zone_task.authority()).await {
                Ok((i, retired)) => {
                    instance = Some(i);
                    if let Some(l) = retired {
                        l.teardown(&[]).await;
                    }
                    ctx.set_ready(true);
                }
                Err(error) => {
                    tracing::error!(%error, "cannot serve DNS; retrying");
                    // Nothing serves the addresses: the link made for them goes until the retry.
                    if let Some(l) = link.take() {
                        l.teardown(&config.dnslocal.listen).await;
                    }
                    ctx.status
                        .set(format!("not serving: {error}"), serde_json::Value::Null);
                }
            }
        }
        if let Some(i) = &instance {
            // Desired from the config, checked against the kernel on every tick (repaired if flushed).
            intercepting =
                sync_intercept(config.dnslocal.intercept_cluster_dns, intercepting).await;
            let (summary, details) = i.status();
            ctx.status.set(summary, details);
        }
        let wait = if instance.is_some() {
            STATUS_INTERVAL
        } else {
            RETRY
        };
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
            changed = ctx.config.changed() => {
                if changed.is_err() {
                    break;
                }
                let new = effective(&ctx.config.borrow_and_update().clone());
                if new.dnslocal != config.dnslocal || new.cluster.nameservers != config.cluster.nameservers {
                    // Interception off (or another ClusterIP): the rules go first, so queries to the
                    // old ClusterIP reach kube-dns through kube-proxy while the old instance drains.
                    if intercepting && new.dnslocal.intercept_cluster_dns != config.dnslocal.intercept_cluster_dns {
                        remove_intercept().await;
                        intercepting = false;
                    }
                    let old = std::mem::replace(&mut config, new);
                    zone_task.sync(&config, &metrics);
                    reload(&old, &config, &metrics, &mut link, &mut instance, zone_task.authority()).await;
                    ctx.set_ready(instance.is_some());
                }
            }
        }
    }
    ctx.set_ready(false);
    zone_task.stop().await;
    if let Some(i) = instance {
        let listen = i.config.listen.clone();
        let intercepted = i.config.intercept_cluster_dns;
        i.drain().await;
        // The rules go unless another instance (a restart overlapping us) serves the ClusterIP: a plain
        // bind fails while it holds the port. Without them kube-proxy's DNAT sends queries to kube-dns.
        if intercepting && let Some(ip) = intercepted {
            if std::net::UdpSocket::bind(SocketAddr::new(ip, 53)).is_ok() {
                remove_intercept().await;
            } else {
                tracing::info!(%ip, "another instance serves the ClusterIP: leaving the NOTRACK rules");
            }
        }
        if let Some(l) = link {
            l.teardown(&listen).await;
        }
    }
    Ok(())
}

/// Applies a new configuration: the new instance binds beside the old one (`SO_REUSEPORT`), on the link
/// with any new listen address added; then the old one drains, and the listen addresses no longer
/// configured are removed. The cache is handed over when the new configuration keeps it valid.
async fn reload(
    old: &Config,
    new: &Config,
    metrics: &Metrics,
    link: &mut Option<Link>,
    instance: &mut Option<Instance>,
    authority: Option<Arc<Authority>>,
) {
    let cache = instance
        .as_ref()
        .filter(|_| same_cache(old, new))
        .map(|i| i.engine.cache.clone());
    let kept = cache.is_some();
    match start(new, metrics, link, cache, authority).await {
        Ok((i, retired)) => {
            let Some(previous) = instance.replace(i) else {
                return;
            };
            let old_listen = previous.config.listen.clone();
            previous.drain().await;
            if let Some(l) = retired {
                l.teardown(&old_listen).await;
            }
            let now: Vec<IpAddr> = new.dnslocal.listen.iter().map(SocketAddr::ip).collect();
            let gone: Vec<IpAddr> = old_listen
                .iter()
                .map(SocketAddr::ip)
                .filter(|ip| !now.contains(ip))
                .collect();
            if let Some(l) = link.as_mut()
                && !gone.is_empty()
            {
                l.remove(&gone).await;
            }
            tracing::info!(cache_kept = kept, "applied the new configuration");
        }
        Err(error) => {
            tracing::error!(%error, "cannot apply the new configuration; the old one keeps serving");
        }
    }
}

use crate::link::Link;

/// What the cluster-zone task was started for: a change restarts it (with a fresh state).
#[derive(Clone, Debug, PartialEq)]
struct ZoneKey {
    domain: String,
    ttl: Duration,
    data_dir: std::path::PathBuf,
    settings: kubeapi::Settings,
}

/// A running cluster-zone task: what it runs for, its state, its stop token and tasks.
type Running = (
    ZoneKey,
    Arc<Authority>,
    tokio_util::sync::CancellationToken,
    Vec<tokio::task::JoinHandle<()>>,
);

/// The `clusterZone: kubernetes` state and the tasks that feed it (list + watch) and save it (snapshot).
#[derive(Default)]
struct ZoneTask {
    running: Option<Running>,
}

impl ZoneTask {
    fn authority(&self) -> Option<Arc<Authority>> {
        self.running.as_ref().map(|r| r.1.clone())
    }

    /// Starts, restarts or stops the task for `config`.
    fn sync(&mut self, config: &Config, metrics: &Metrics) {
        let c = &config.dnslocal;
        let key = (c.cluster_zone == ClusterZone::Kubernetes).then(|| ZoneKey {
            domain: c.cluster_domain.clone(),
            ttl: c.cluster_zone_ttl,
            data_dir: config.data_dir.clone(),
            settings: kubeapi::Settings {
                kubeconfig: c.kubeconfig.clone(),
                topology_zone: c.topology_zone.clone(),
            },
        });
        if self.running.as_ref().map(|r| &r.0) == key.as_ref() {
            return;
        }
        if let Some((_, _, stop, _)) = self.running.take() {
            stop.cancel();
        }
        let Some(key) = key else {
            metrics.cluster_zone_age.set(-1);
            return;
        };
        let auth = Arc::new(Authority::new(
            &key.domain,
            key.settings.topology_zone.clone(),
            key.ttl,
            Some(&key.data_dir),
        ));
        match auth.load_snapshot() {
            Ok((services, slices, age)) => tracing::info!(
                services,
                slices,
                age_s = age.as_secs(),
                "cluster zone loaded from the snapshot; serving it until the Kubernetes API answers"
            ),
            Err(reason) => tracing::info!(%reason, "no cluster-zone snapshot loaded"),
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let watch = tokio::spawn(kubeapi::run(
            auth.clone(),
            key.settings.clone(),
            metrics.clone(),
            stop.clone(),
        ));
        let saver = tokio::spawn(save_snapshots(auth.clone(), stop.clone()));
        tracing::info!(domain = %key.domain, ttl = ?key.ttl, "answering the cluster zone from the Kubernetes API");
        self.running = Some((key, auth, stop, vec![watch, saver]));
    }

    async fn stop(&mut self) {
        if let Some((_, _, stop, tasks)) = self.running.take() {
            stop.cancel();
            for t in tasks {
                let _ = t.await;
            }
        }
    }
}

/// Writes the snapshot when the state changed, at most every [`authority::SNAPSHOT_EVERY`], and once
/// more at stop.
async fn save_snapshots(auth: Arc<Authority>, stop: tokio_util::sync::CancellationToken) {
    let mut written = 0u32;
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(authority::SNAPSHOT_EVERY) => false,
        };
        let generation = auth.generation();
        if generation != written && auth.origin() == authority::Origin::Api {
            let a = auth.clone();
            match tokio::task::spawn_blocking(move || a.write_snapshot()).await {
                Ok(Ok(bytes)) => {
                    written = generation;
                    tracing::debug!(bytes, "cluster-zone snapshot written");
                }
                Ok(Err(error)) => tracing::warn!(%error, "cannot write the cluster-zone snapshot"),
                Err(error) => tracing::warn!(%error, "cluster-zone snapshot task failed"),
            }
        }
        if stopping {
            break;
        }
    }
}

/// The cluster zone's part of `dnslocal status` (and its gauges).
fn cluster_zone_status(a: &Authority, m: &Metrics) -> serde_json::Value {
    let (services, slices, endpoints) = a.read(zone::Zone::counts);
    let age = a.age();
    m.cluster_zone_age
        .set(age.map_or(-1, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    m.cluster_zone_services.set(services as i64);
    m.cluster_zone_endpoints.set(endpoints as i64);
    m.cluster_zone_api_up.set(i64::from(a.api_live()));
    serde_json::json!({
        "origin": match a.origin() {
            authority::Origin::None => "none",
            authority::Origin::Snapshot => "snapshot",
            authority::Origin::Api => "api",
        },
        "api_live": a.api_live(),
        "age_s": age.map(|d| d.as_secs_f64()),
        "services": services, "slices": slices, "endpoints": endpoints,
        "local_zone": a.read(|z| z.local_zone().map(str::to_owned)),
        "snapshot": a.snapshot_path().map(|p| p.display().to_string()),
    })
}

/// Sets up the link for `config` (adding its listen addresses) and starts an instance. Returns the
/// instance and a link to tear down once the old instance drained (one no longer configured).
async fn start(
    config: &Config,
    metrics: &Metrics,
    link: &mut Option<Link>,
    cache: Option<Arc<Cache>>,
    authority: Option<Arc<Authority>>,
) -> Result<(Instance, Option<Link>), Error> {
    let c = &config.dnslocal;
    let mut retired = None;
    if c.interface.create {
        match link.as_mut() {
            Some(l) if l.name() == c.interface.name => l.add(&c.listen).await?,
            _ => {
                let new = Link::setup(&c.interface.name, &c.listen).await?;
                retired = link.replace(new);
            }
        }
    } else {
        retired = link.take();
    }
    Ok((
        Instance::start(config, metrics, cache, authority).await?,
        retired,
    ))
}

/// `dnslocal status` details, as text.
pub fn render_details(d: &serde_json::Value) -> String {
    let mut out = String::new();
    let list = |v: &serde_json::Value| -> String {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|u| {
                        format!(
                            "{} ({}, {}, srtt {:.1} ms)",
                            u["addr"].as_str().unwrap_or("?"),
                            u["protocol"].as_str().unwrap_or("?"),
                            if u["up"].as_bool().unwrap_or(false) {
                                "up"
                            } else {
                                "DOWN"
                            },
                            u["srtt_ms"].as_f64().unwrap_or(0.0)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    out.push_str(&format!("listen       {}\n", d["listen"]));
    out.push_str(&format!(
        "cluster      {} -> {}{}\n",
        d["cluster_domain"],
        list(&d["cluster_dns"]),
        if d["cluster_loop"].as_bool().unwrap_or(false) {
            "  LOOP: the cluster DNS leads back to us, cluster-zone questions get SERVFAIL"
        } else {
            ""
        }
    ));
    if let Some(ip) = d["intercept"].as_str() {
        out.push_str(&format!(
            "intercept    {ip}:53 (kube-dns ClusterIP, NOTRACK table inet {})\n",
            intercept::TABLE
        ));
    }
    if let Some(z) = d["cluster_zone"].as_object() {
        let age = match z.get("age_s").and_then(serde_json::Value::as_f64) {
            None => "no state: cluster names are forwarded".to_owned(),
            Some(0.0) => "in sync".to_owned(),
            Some(a) => format!("{a:.0} s old (API unreachable, serving the last known state)"),
        };
        out.push_str(&format!(
            "zone         from the Kubernetes API ({}): {} services, {} endpoints, {age}\n",
            z.get("origin")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?"),
            z.get("services").unwrap_or(&serde_json::Value::Null),
            z.get("endpoints").unwrap_or(&serde_json::Value::Null),
        ));
    }
    out.push_str(&format!("upstreams    {}\n", list(&d["upstreams"])));
    for f in d["forward"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "forward      {} -> {}\n",
            f["zone"].as_str().unwrap_or("?"),
            list(&f["upstreams"])
        ));
    }
    out.push_str(&format!(
        "cache        {} / {} entries, {} / {} bytes\n",
        d["cache"]["entries"], d["cache"]["capacity"], d["cache"]["bytes"], d["cache"]["max_bytes"]
    ));
    let q = &d["queries"];
    out.push_str(&format!(
        "queries      hit {}  stale {}  miss {}  coalesced {}  servfail {}  (in flight {})\n",
        q["hit"], q["stale"], q["miss"], q["coalesced"], q["servfail"], d["inflight"]
    ));
    if d["cluster_zone"].is_object() {
        out.push_str(&format!(
            "             authoritative (cluster zone) {}\n",
            q["authoritative"]
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let text = "# comment\nsearch svc.cluster.local\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n";
        let ns = resolv_conf_nameservers(text);
        assert_eq!(
            ns,
            vec![
                IpAddr::from([10, 0, 0, 2]),
                "fe80::1".parse::<IpAddr>().unwrap()
            ]
        );
    }

    #[test]
    fn default_upstreams_skip_our_own_addresses() {
        let mut config = Config::defaults();
        config.dnslocal.listen = vec!["169.254.20.10:53".parse().unwrap()];
        let resolv = "nameserver 169.254.20.10\nnameserver 192.0.2.53\nnameserver 192.0.2.53\n";
        assert_eq!(
            default_upstreams(&config, resolv),
            vec!["192.0.2.53:53".parse().unwrap()]
        );
        config.cluster.nameservers = vec![IpAddr::from([198, 51, 100, 1])];
        assert_eq!(
            default_upstreams(&config, resolv),
            vec!["198.51.100.1:53".parse().unwrap()]
        );
        config.dnslocal.upstreams = vec!["203.0.113.1:5353".parse().unwrap()];
        assert_eq!(
            default_upstreams(&config, resolv),
            vec!["203.0.113.1:5353".parse().unwrap()]
        );
    }

    #[test]
    fn details_render_as_text() {
        let d = serde_json::json!({
            "listen": ["169.254.20.10:53"], "cluster_domain": "cluster.local",
            "cluster_dns": [{"addr": "10.96.0.10:53", "protocol": "tcp", "up": true, "srtt_ms": 1.0}],
            "upstreams": [], "cache": {"entries": 3, "capacity": 10}, "queries": {"hit": 1}, "inflight": 0,
        });
        let text = render_details(&d);
        assert!(text.contains("10.96.0.10:53 (tcp, up"), "{text}");
        assert!(text.contains("3 / 10 entries"), "{text}");
    }
}
