//! The Kubernetes API client of `clusterZone: kubernetes`: one list + watch of Services and one of
//! EndpointSlices (`discovery.k8s.io/v1`), cluster-wide, as kube-proxy holds on every node. Requests:
//! `GET /api/v1/services?limit=500` (more pages with `continue` in large clusters) then `GET /api/v1/services?watch=1&resourceVersion=N&timeoutSeconds=290`,
//! and the same for `/apis/discovery.k8s.io/v1/endpointslices`; a watch the server ends is resumed
//! from the last version, 410 Gone (as a status or an `ERROR` event) relists, any other failure
//! reconnects with backoff (1 s to 15 s, ±20 %) while the last state keeps being served. At start one
//! `GET /api/v1/nodes/<name>` reads this node's `topology.kubernetes.io/zone` (unless configured).
//!
//! Credentials (first found): `dnslocal.kubeconfig`, `KUBECONFIG`, the in-cluster service account
//! (`KUBERNETES_SERVICE_HOST`: the DaemonSet), the kubelet's kubeconfig ([`KUBELET_KUBECONFIGS`]: on
//! Talos it points at KubePrism, on kubeadm/k3s wherever the kubelet goes; with apiprism on the node,
//! point `dnslocal.kubeconfig` at one whose server is `https://127.0.0.1:7445`).
//!
//! Objects are converted at once into the zone's small records ([`service_info`], [`slice_info`]):
//! the full objects are never kept.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::authority::{Authority, Feed};
use crate::metrics::Metrics;
use crate::zone::{EndpointInfo, Port, ServiceInfo, ServiceKind, SliceInfo, Zone};

/// Kubelet kubeconfigs, in the order they are tried: kubeadm, Talos, k3s.
pub use hybridnet_kube::KUBELET_KUBECONFIGS;
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
const WATCH_TIMEOUT_SECS: u32 = 290;
const QUICK_END: Duration = Duration::from_secs(1);
/// Objects per list page (client-go's reflector asks for 500 too).
const LIST_PAGE: u32 = 500;
/// The API's own bounds (an EndpointSlice holds at most 1000 endpoints of at most 100 addresses).
const MAX_ENDPOINTS: usize = 1000;
const MAX_ADDRESSES: usize = 100;
const MAX_PORTS: usize = 100;

/// What the client needs from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub kubeconfig: Option<PathBuf>,
    /// `dnslocal.topologyZone`; `None`: read from this node's Node.
    pub topology_zone: Option<String>,
}

/// Loads the client configuration (see the module docs for the order).
pub async fn client_config(kubeconfig: Option<&Path>) -> Result<kube::Config, String> {
    hybridnet_kube::client_config(kubeconfig, Some("dnslocal.kubeconfig")).await
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// A DNS label (RFC 1123, what the API validates names against; checked again: hostile input).
fn label_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn ports<'a>(it: impl Iterator<Item = (Option<&'a String>, Option<&'a String>, i32)>) -> Vec<Port> {
    it.take(MAX_PORTS)
        .filter_map(|(name, proto, port)| {
            let name = name.map(|n| lower(n)).unwrap_or_default();
            if !name.is_empty() && !label_ok(&name) {
                return None;
            }
            let protocol = proto.map_or_else(|| "tcp".to_owned(), |p| lower(p));
            if !label_ok(&protocol) {
                return None;
            }
            Some(Port {
                name,
                protocol,
                port: u16::try_from(port).ok().filter(|p| *p != 0)?,
            })
        })
        .collect()
}

/// The zone's view of a Service (`None`: nothing to serve, e.g. a name that is no DNS label).
pub fn service_info(s: &Service) -> Option<ServiceInfo> {
    let name = s.metadata.name.as_deref().filter(|n| label_ok(n))?;
    let namespace = s.metadata.namespace.as_deref().filter(|n| label_ok(n))?;
    let spec = s.spec.as_ref()?;
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        let target = spec.external_name.as_deref()?.trim_end_matches('.');
        let ok =
            !target.is_empty() && target.len() <= 253 && target.split('.').all(label_ok_relaxed);
        if !ok {
            return None;
        }
        ServiceKind::ExternalName(lower(target))
    } else {
        let ips: Vec<&String> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().collect(),
            _ => spec.cluster_ip.iter().collect(),
        };
        if ips.iter().any(|ip| ip.as_str() == "None") {
            ServiceKind::Headless
        } else {
            ServiceKind::ClusterIp(
                ips.iter()
                    .filter_map(|ip| ip.parse().ok())
                    .take(2)
                    .collect(),
            )
        }
    };
    Some(ServiceInfo {
        namespace: lower(namespace),
        name: lower(name),
        kind,
        ports: ports(
            spec.ports
                .iter()
                .flatten()
                .map(|p| (p.name.as_ref(), p.protocol.as_ref(), p.port)),
        ),
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
    })
}

/// An ExternalName label: like a DNS label, underscores allowed (`_sip._tcp.example.com`).
fn label_ok_relaxed(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The zone's view of an EndpointSlice (`None`: not one a Service owns, or FQDN addresses).
pub fn slice_info(s: &EndpointSlice) -> Option<SliceInfo> {
    let name = s.metadata.name.as_deref()?;
    let namespace = s.metadata.namespace.as_deref().filter(|n| label_ok(n))?;
    let service = s
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .filter(|n| label_ok(n))?;
    if s.address_type == "FQDN" {
        return None;
    }
    let endpoints = s
        .endpoints
        .iter()
        .take(MAX_ENDPOINTS)
        .map(|e| EndpointInfo {
            addresses: e
                .addresses
                .iter()
                .take(MAX_ADDRESSES)
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .collect(),
            hostname: e.hostname.as_deref().filter(|h| label_ok(h)).map(lower),
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            zone: e.zone.clone().filter(|z| z.len() <= 63),
        })
        .filter(|e| !e.addresses.is_empty())
        .collect();
    Some(SliceInfo {
        namespace: lower(namespace),
        name: name.to_owned(),
        service: lower(service),
        ports: ports(
            s.ports
                .iter()
                .flatten()
                .map(|p| (p.name.as_ref(), p.protocol.as_ref(), p.port.unwrap_or(0))),
        ),
        endpoints,
    })
}

/// A resource the zone is fed from.
trait Source:
    kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    const FEED: Feed;
    const NAME: &'static str;
    /// What the zone keeps of one object.
    type Info: Send;
    fn info(item: &Self) -> Option<Self::Info>;
    fn replace_all(zone: &mut Zone, items: Vec<Self::Info>);
    fn upsert(zone: &mut Zone, item: &Self);
    fn delete(zone: &mut Zone, item: &Self);
}

fn ns_name<K: kube::Resource>(k: &K) -> (String, String) {
    let m = k.meta();
    (
        lower(m.namespace.as_deref().unwrap_or("")),
        m.name.clone().unwrap_or_default(),
    )
}

impl Source for Service {
    const FEED: Feed = Feed::Services;
    const NAME: &'static str = "services";
    type Info = ServiceInfo;
    fn info(item: &Self) -> Option<ServiceInfo> {
        service_info(item)
    }
    fn replace_all(zone: &mut Zone, items: Vec<ServiceInfo>) {
        zone.replace_services(items);
    }
    fn upsert(zone: &mut Zone, item: &Self) {
        match service_info(item) {
            Some(s) => zone.upsert_service(s),
            None => Self::delete(zone, item),
        }
    }
    fn delete(zone: &mut Zone, item: &Self) {
        let (ns, name) = ns_name(item);
        zone.remove_service(&ns, &name);
    }
}

impl Source for EndpointSlice {
    const FEED: Feed = Feed::Slices;
    const NAME: &'static str = "endpointslices";
    type Info = SliceInfo;
    fn info(item: &Self) -> Option<SliceInfo> {
        slice_info(item)
    }
    fn replace_all(zone: &mut Zone, items: Vec<SliceInfo>) {
        zone.replace_slices(items);
    }
    fn upsert(zone: &mut Zone, item: &Self) {
        match slice_info(item) {
            Some(s) => zone.upsert_slice(s),
            None => Self::delete(zone, item),
        }
    }
    fn delete(zone: &mut Zone, item: &Self) {
        let (ns, name) = ns_name(item);
        zone.remove_slice(&ns, &name);
    }
}

/// Runs both list + watch loops until `stop`.
pub async fn run(
    auth: Arc<Authority>,
    settings: Settings,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let services = reflect::<Service>(&auth, &settings, &metrics, &stop);
    let slices = reflect::<EndpointSlice>(&auth, &settings, &metrics, &stop);
    tokio::join!(services, slices);
}

async fn client(settings: &Settings) -> Result<(Client, String), String> {
    let config = client_config(settings.kubeconfig.as_deref()).await?;
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| format!("client for {server}: {e}"))?;
    Ok((client, server))
}

/// This node's name: `NODE_NAME` (the DaemonSet sets it from the downward API), else the hostname.
fn node_name() -> Option<String> {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
}

/// Reads this node's topology zone from its Node (once per session of the services loop): `Err` when
/// the Node could not be read (the zone known so far stays).
async fn local_zone(client: &Client) -> Result<Option<String>, ()> {
    let Some(name) = node_name() else {
        return Ok(None);
    };
    let api: Api<Node> = Api::all(client.clone());
    match api.get_opt(&name).await {
        Ok(Some(node)) => Ok(node
            .metadata
            .labels
            .and_then(|l| l.get(LABEL_ZONE).cloned())),
        Ok(None) => {
            tracing::info!(node = %name, "no Node of this name: headless answers are not ordered by zone");
            Ok(None)
        }
        Err(error) => {
            tracing::debug!(node = %name, %error, "cannot read this node's zone");
            Err(())
        }
    }
}

enum Ended {
    Stop,
    Failed(String),
}

async fn reflect<K: Source>(
    auth: &Arc<Authority>,
    settings: &Settings,
    metrics: &Metrics,
    stop: &CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut healthy = false;
        match session::<K>(auth, settings, metrics, stop, &mut healthy).await {
            Ok(never) => match never {},
            Err(Ended::Stop) => break,
            Err(Ended::Failed(error)) => {
                auth.set_live(K::FEED, false);
                metrics.cluster_zone_api_errors.inc();
                if healthy {
                    backoff = BACKOFF_MIN;
                }
                tracing::warn!(resource = K::NAME, %error, retry_in = ?backoff, "Kubernetes API unreachable or failed; serving the last known cluster zone");
                let wait = backoff.mul_f64(0.8 + fastrand::f64() * 0.4);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    auth.set_live(K::FEED, false);
}

fn bump<K: kube::Resource>(version: &mut String, k: &K) {
    if let Some(v) = &k.meta().resource_version {
        version.clone_from(v);
    }
}

async fn session<K: Source>(
    auth: &Arc<Authority>,
    settings: &Settings,
    metrics: &Metrics,
    stop: &CancellationToken,
    healthy: &mut bool,
) -> Result<std::convert::Infallible, Ended> {
    let fail = Ended::Failed;
    let (client, server) = client(settings).await.map_err(fail)?;
    if K::FEED == Feed::Services {
        let zone = match &settings.topology_zone {
            Some(z) => Ok(Some(z.clone())),
            None => local_zone(&client).await,
        };
        if let Ok(zone) = zone {
            auth.update(|z| z.set_local_zone(zone));
        }
    }
    let api: Api<K> = Api::all(client);
    loop {
        // In pages of LIST_PAGE (as client-go's reflector): each page is reduced to the zone's records
        // before the next is read, so the parsed objects of a large cluster are never all in memory.
        let mut infos: Vec<K::Info> = Vec::new();
        let mut items = 0usize;
        let mut token: Option<String> = None;
        let mut version;
        loop {
            let mut lp = ListParams::default().limit(LIST_PAGE);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = tokio::select! {
                () = stop.cancelled() => return Err(Ended::Stop),
                r = api.list(&lp) => r.map_err(|e| fail(format!("list {} on {server}: {e}", K::NAME)))?,
            };
            version = page.metadata.resource_version.clone().unwrap_or_default();
            items += page.items.len();
            infos.extend(page.items.iter().filter_map(K::info));
            token = page.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        *healthy = true;
        auth.update(|z| K::replace_all(z, infos));
        auth.set_live(K::FEED, true);
        metrics.cluster_zone_lists.inc();
        tracing::info!(resource = K::NAME, %server, items, %version, "listed");
        'watch: loop {
            let wp = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
            let stream = tokio::select! {
                () = stop.cancelled() => return Err(Ended::Stop),
                r = api.watch(&wp, &version) => r,
            };
            let started = std::time::Instant::now();
            let mut stream = match stream {
                Ok(s) => s.boxed(),
                Err(kube::Error::Api(status)) if status.code == 410 => {
                    tracing::info!(resource = K::NAME, %version, "resourceVersion too old (410 Gone): relisting");
                    break 'watch;
                }
                Err(e) => return Err(fail(format!("watch {} on {server}: {e}", K::NAME))),
            };
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return Err(Ended::Stop),
                    ev = stream.try_next() => ev,
                };
                match event {
                    Ok(Some(WatchEvent::Added(k) | WatchEvent::Modified(k))) => {
                        bump(&mut version, &k);
                        auth.update(|z| K::upsert(z, &k));
                    }
                    Ok(Some(WatchEvent::Deleted(k))) => {
                        bump(&mut version, &k);
                        auth.update(|z| K::delete(z, &k));
                    }
                    Ok(Some(WatchEvent::Bookmark(b))) => {
                        version = b.metadata.resource_version;
                        continue;
                    }
                    Ok(Some(WatchEvent::Error(status))) if status.code == 410 => {
                        tracing::info!(resource = K::NAME, %version, "watch expired (410 Gone): relisting");
                        break 'watch;
                    }
                    Ok(Some(WatchEvent::Error(status))) => {
                        return Err(fail(format!(
                            "watch {} error {}: {} {}",
                            K::NAME,
                            status.code,
                            status.reason,
                            status.message
                        )));
                    }
                    Ok(None) => {
                        if started.elapsed() < QUICK_END {
                            tokio::select! {
                                () = stop.cancelled() => return Err(Ended::Stop),
                                () = tokio::time::sleep(QUICK_END) => {}
                            }
                        }
                        continue 'watch;
                    }
                    Err(e) => return Err(fail(format!("watch {} on {server}: {e}", K::NAME))),
                }
                metrics.cluster_zone_events.inc();
            }
        }
    }
}
