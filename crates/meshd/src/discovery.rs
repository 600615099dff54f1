//! Discovery: peers from the Talos discovery service, merged by node ID as Talos merges affiliates.
//!
//! - [`proto`]: the service's protobuf messages (hand-written prost structs; `proto/*.proto` documents them);
//! - [`codec`]: Talos-compatible encryption of affiliate data and endpoints, keyed by the cluster secret;
//! - [`grpc`]: a small gRPC client over HTTP/2;
//! - [`registry`]: one task per service endpoint (Hello, AffiliateUpdate, Watch, AffiliateDelete,
//!   reconnects), all feeding one merged [`Snapshot`];
//! - [`kubernetes`]: the Kubernetes registry (Talos's Node annotations, list + watch of the Nodes), which
//!   also reads this node's pod CIDRs for `advertiseKubernetesNetworks`.
//!
//! The mesh merges the snapshot with the static peers ([`crate::mesh::Mesh::set_discovered`]); until some
//! registry has delivered its first snapshot, peers that discovery brought before a restart come from
//! the peer cache.

pub mod codec;
pub mod grpc;
pub mod kubernetes;
pub mod proto;
pub mod registry;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hybridnet_config::{Config, PublicKey};
use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::model::{PeerSpec, Source};
use crate::plan::trust::Reason;
use codec::{Codec, Rejected, ip_from_bytes, prefix_from};
use proto::{client, server};

/// TTL of our record on the service (Talos: 30 min); refreshed at half of it and on every change.
pub const TTL: Duration = Duration::from_secs(30 * 60);
/// How long publishing waits for our pod CIDRs (see [`Discovery::waits_for_pod_cidrs`]).
pub const POD_CIDR_WAIT: Duration = Duration::from_secs(10);

/// An affiliate as decoded from a registry.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Affiliate {
    /// The record ID on the service (Talos: the node ID).
    pub id: String,
    pub node_id: String,
    pub hostname: String,
    pub nodename: String,
    pub machine_type: String,
    pub addresses: Vec<IpAddr>,
    #[serde(skip)]
    pub public_key: Option<PublicKey>,
    pub mesh_address: Option<IpAddr>,
    pub additional: Vec<IpNet>,
    pub api_server_port: Option<u16>,
    pub endpoints: Vec<SocketAddr>,
    /// Topology location (Kubernetes registry: the node's zone label, else its region label).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// KubeSpan `ExcludeAdvertisedNetworks`: prefixes the node asks peers not to route to it (the
    /// service's `exclude_advertised_addresses`, the `kubespan-exclude-advertised-networks` annotation).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<IpNet>,
    /// Prefixes its registry refused (Kubernetes: assigned prefixes outside the Node's pod CIDRs).
    #[serde(skip)]
    pub refused: Vec<IpNet>,
}

impl Affiliate {
    /// The name the mesh shows: the node name, else the hostname, else the ID.
    pub fn name(&self) -> String {
        [&self.nodename, &self.hostname, &self.id]
            .into_iter()
            .find(|s| !s.is_empty())
            .cloned()
            .unwrap_or_default()
    }

    fn merge_key(&self) -> &str {
        if self.node_id.is_empty() {
            &self.id
        } else {
            &self.node_id
        }
    }
}

/// Decodes a service record; `Err` says why it is dropped. Bad endpoints are dropped one by one
/// (counted in the second value).
pub fn decode(c: &Codec, rec: &server::Affiliate) -> Result<(Affiliate, Vec<Rejected>), Rejected> {
    let a = c.open_affiliate(&rec.data)?;
    let mut dropped = Vec::new();
    let mut endpoints = Vec::new();
    for e in rec.endpoints.iter().take(codec::ENDPOINTS_MAX) {
        match c.open_endpoint(e) {
            Ok(ep) if !endpoints.contains(&ep) => endpoints.push(ep),
            Ok(_) => {}
            Err(r) => dropped.push(r),
        }
    }
    Ok((from_proto(&rec.id, &a, endpoints), dropped))
}

fn from_proto(id: &str, a: &client::Affiliate, endpoints: Vec<SocketAddr>) -> Affiliate {
    let ks = a.kubespan.as_ref();
    Affiliate {
        id: id.to_owned(),
        node_id: a.node_id.clone(),
        hostname: a.hostname.clone(),
        nodename: a.nodename.clone(),
        machine_type: a.machine_type.clone(),
        addresses: a
            .addresses
            .iter()
            .filter_map(|b| ip_from_bytes(b))
            .collect(),
        public_key: ks.and_then(|k| k.public_key.parse().ok()),
        mesh_address: ks.and_then(|k| ip_from_bytes(&k.address)),
        additional: ks
            .map(|k| {
                k.additional_addresses
                    .iter()
                    .filter_map(prefix_from)
                    .collect()
            })
            .unwrap_or_default(),
        excluded: ks
            .map(|k| {
                k.exclude_advertised_addresses
                    .iter()
                    .filter_map(prefix_from)
                    .collect()
            })
            .unwrap_or_default(),
        api_server_port: a
            .control_plane
            .as_ref()
            .and_then(|cp| u16::try_from(cp.api_server_port).ok())
            .filter(|p| *p != 0),
        endpoints,
        location: None,
        refused: Vec::new(),
    }
}

/// Merges affiliates by node ID as Talos does: addresses and endpoints unioned (in order), the last
/// non-empty scalar wins. Pure.
pub fn merge<'a>(all: impl IntoIterator<Item = &'a Affiliate>) -> Vec<Affiliate> {
    let mut out: BTreeMap<String, Affiliate> = BTreeMap::new();
    for a in all {
        let Some(m) = out.get_mut(a.merge_key()) else {
            out.insert(a.merge_key().to_owned(), a.clone());
            continue;
        };
        for (dst, src) in [
            (&mut m.hostname, &a.hostname),
            (&mut m.nodename, &a.nodename),
            (&mut m.machine_type, &a.machine_type),
            (&mut m.node_id, &a.node_id),
        ] {
            if !src.is_empty() {
                dst.clone_from(src);
            }
        }
        if a.public_key.is_some() {
            m.public_key = a.public_key;
        }
        if a.mesh_address.is_some() {
            m.mesh_address = a.mesh_address;
        }
        if a.api_server_port.is_some() {
            m.api_server_port = a.api_server_port;
        }
        if a.location.is_some() {
            m.location.clone_from(&a.location);
        }
        for x in &a.excluded {
            if !m.excluded.contains(x) {
                m.excluded.push(*x);
            }
        }
        for x in &a.addresses {
            if !m.addresses.contains(x) {
                m.addresses.push(*x);
            }
        }
        for x in &a.additional {
            if !m.additional.contains(x) {
                m.additional.push(*x);
            }
        }
        for x in &a.refused {
            if !m.refused.contains(x) {
                m.refused.push(*x);
            }
        }
        for x in &a.endpoints {
            if !m.endpoints.contains(x) {
                m.endpoints.push(*x);
            }
        }
    }
    out.into_values().collect()
}

/// The mesh peer for an affiliate (`None` without a WireGuard key). AllowedIPs: its mesh address and
/// its additional addresses (pod CIDRs when it advertises them) minus the networks it excludes
/// (KubeSpan also routes the node addresses; meshd does not, see the README).
pub fn peer_spec(a: &Affiliate, cfg: &Config) -> Option<PeerSpec> {
    let key = a.public_key?;
    let mut allowed: Vec<IpNet> = subtract_all(&a.additional, &a.excluded);
    let mut refused: Vec<(IpNet, Reason)> = a
        .refused
        .iter()
        .map(|p| (*p, Reason::OutsidePodCidrs))
        .collect();
    match mesh_claim(a, cfg) {
        Ok(Some(m)) => allowed.push(m),
        Ok(None) => {}
        Err(m) => refused.push((m, Reason::MeshAddress)),
    }
    Some(PeerSpec {
        name: a.name(),
        key,
        candidates: crate::mesh::filter_candidates(&cfg.meshd.endpoint_filter, &a.endpoints),
        allowed_ips: allowed,
        mesh_address: match a.mesh_address {
            Some(IpAddr::V6(v6)) => Some(v6),
            _ => None,
        },
        location: a.location.clone(),
        source: Source::Discovery,
        node_id: Some(a.node_id.clone()).filter(|s| !s.is_empty()),
        addresses: a.addresses.clone(),
        api_server_port: a.api_server_port,
        refused,
    })
}

/// The mesh address an affiliate announces (`kubespan-ip`), as a host prefix: `Ok` when it lies in the
/// mesh prefix (the plan then checks that the peer owns it), `Err` when it does not (any other address
/// would become a route to that peer).
fn mesh_claim(a: &Affiliate, cfg: &Config) -> Result<Option<IpNet>, IpNet> {
    let Some(m) = a.mesh_address else {
        return Ok(None);
    };
    let prefix = cfg
        .meshd
        .ula_prefix
        .unwrap_or_else(crate::identity::default_prefix);
    match m {
        IpAddr::V6(v6) if prefix.contains(&v6) => Ok(Some(IpNet::from(m))),
        _ => Err(IpNet::from(m)),
    }
}

/// The peers for a snapshot. In KubeSpan-compatible mode their AllowedIPs are Talos's: additional and
/// node addresses minus the excluded networks plus the KubeSpan address, overlaps going to the peer
/// with the smaller node ID (Talos lists affiliates by ID).
pub fn peer_specs(affiliates: &[Affiliate], cfg: &Config, own: &PublicKey) -> Vec<PeerSpec> {
    let mut peers: Vec<(&Affiliate, PeerSpec)> = affiliates
        .iter()
        .filter(|a| a.public_key.as_ref() != Some(own))
        .filter_map(|a| peer_spec(a, cfg).map(|s| (a, s)))
        .collect();
    if !cfg.meshd.kubespan_compat {
        return peers.into_iter().map(|(_, s)| s).collect();
    }
    peers.sort_by(|x, y| x.0.merge_key().cmp(y.0.merge_key()));
    let sets = crate::kubespan::resolve_overlaps(
        peers
            .iter()
            .map(|(a, _)| {
                crate::kubespan::allowed_ips(
                    &a.additional,
                    &a.addresses,
                    &a.excluded,
                    mesh_claim(a, cfg).ok().flatten().map(|n| n.addr()),
                )
            })
            .collect(),
    );
    peers
        .into_iter()
        .zip(sets)
        .map(|((_, mut spec), set)| {
            spec.allowed_ips = set.prefixes();
            spec
        })
        .collect()
}

/// `nets` minus every prefix in `excluded` (a prefix partly covered is split into the parts left).
/// Pure; at most 128 pieces per (prefix, exclusion) pair.
pub fn subtract_all(nets: &[IpNet], excluded: &[IpNet]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
    for e in excluded {
        out = out.iter().flat_map(|n| subtract(*n, e.trunc())).collect();
    }
    let mut dedup = Vec::new();
    for n in out {
        if !dedup.contains(&n) {
            dedup.push(n);
        }
    }
    dedup
}

fn subtract(net: IpNet, excluded: IpNet) -> Vec<IpNet> {
    if excluded.contains(&net) {
        return Vec::new();
    }
    if !net.contains(&excluded) {
        return vec![net];
    }
    // `excluded` is strictly inside `net`: keep the half without it, split the other one.
    let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
        return vec![net];
    };
    halves.flat_map(|h| subtract(h, excluded)).collect()
}

/// What this node publishes.
#[derive(Clone, Debug, PartialEq)]
pub struct Local {
    pub affiliate: client::Affiliate,
    /// Endpoint candidates from this node's addresses; each registry adds the public IP its Hello learnt.
    pub endpoints: Vec<SocketAddr>,
    /// `extraAnnouncedEndpoints`, always last.
    pub extra: Vec<SocketAddr>,
    /// The endpoint filter, applied to the Hello address too.
    pub filter: hybridnet_config::EndpointFilter,
    pub port: u16,
    /// `filters.excludeAdvertisedNetworks`, for the Kubernetes registry's annotation (the service's
    /// record carries it in `affiliate.kubespan`).
    pub excluded: Vec<IpNet>,
}

impl Local {
    /// The endpoints to publish in Talos's order: this node's addresses, then the public IP the service
    /// saw (if the endpoint filter keeps it), all on `port`, then `extraAnnouncedEndpoints`; no
    /// duplicates.
    pub fn endpoints_with(&self, public_ip: Option<IpAddr>) -> Vec<SocketAddr> {
        let mut out = self.endpoints.clone();
        let hello = public_ip
            .filter(|ip| !self.filter.apply(&[*ip]).is_empty())
            .map(|ip| SocketAddr::new(ip, self.port));
        for e in hello.iter().chain(&self.extra) {
            if !out.contains(e) {
                out.push(*e);
            }
        }
        out
    }
}

/// One registry's state, for `status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatus {
    pub endpoint: String,
    /// `connecting`, `watching`, `backoff`, `stopped`.
    pub state: String,
    /// Unix seconds of the last snapshot or delta.
    pub last_update: u64,
    pub affiliates: usize,
    pub public_ip: Option<IpAddr>,
    pub error: Option<String>,
    pub rejected: u64,
    pub reconnects: u64,
    /// Kubernetes registry: full relists after the API answered 410 Gone (history compacted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relists: Option<u64>,
    /// Kubernetes registry: watches the server ended, resumed from the last resourceVersion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch_restarts: Option<u64>,
}

/// The merged view of every registry.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub affiliates: Vec<Affiliate>,
    /// Some registry has delivered a full snapshot since start (the cache is no longer needed).
    pub synced: bool,
    pub registries: Vec<RegistryStatus>,
    /// This node's pod CIDRs (`spec.podCIDRs` of our Node), when the Kubernetes registry runs.
    pub own_pod_cidrs: Vec<IpNet>,
    /// The Kubernetes client has listed our Node once (its pod CIDRs are known, maybe none).
    pub own_node_read: bool,
}

#[derive(Debug, Default)]
struct Shared {
    per_registry: Vec<BTreeMap<String, Affiliate>>,
    status: Vec<RegistryStatus>,
    synced: bool,
    own_pod_cidrs: Vec<IpNet>,
    own_node_read: bool,
}

/// The running discovery: one task per endpoint.
#[derive(Debug)]
pub struct Discovery {
    pub key: DiscoveryKey,
    pub our_id: String,
    local: watch::Sender<Option<Local>>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub started: std::time::Instant,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The settings that, when changed, restart discovery.
#[derive(Clone, Debug, PartialEq)]
pub struct DiscoveryKey {
    /// Discovery service endpoints (empty without a cluster ID and secret).
    endpoints: Vec<String>,
    /// The extra CA file for each endpoint (`meshd.discovery`), by index.
    ca_files: Vec<Option<std::path::PathBuf>>,
    cluster_id: String,
    secret: Option<hybridnet_config::Secret>,
    kubernetes: Option<kubernetes::Settings>,
}

impl DiscoveryKey {
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn kubernetes(&self) -> Option<&kubernetes::Settings> {
        self.kubernetes.as_ref()
    }

    /// `None` when no registry would run. The service registries need the cluster ID and secret;
    /// the Kubernetes registry (plaintext annotations, as Talos) does not. With
    /// `advertiseKubernetesNetworks` and only the service registry on, the Kubernetes client still
    /// runs, read-only, to learn our pod CIDRs.
    pub fn of(cfg: &Config) -> Option<DiscoveryKey> {
        let c = &cfg.cluster;
        if !c.discovery.enabled {
            return None;
        }
        let (endpoints, cluster_id, secret) = match (&c.id, &c.secret) {
            (Some(id), Some(secret)) if !c.discovery.endpoints.is_empty() => (
                c.discovery.endpoints.clone(),
                id.clone(),
                Some(secret.clone()),
            ),
            _ => (Vec::new(), String::new(), None),
        };
        let registry = c.discovery.kubernetes_registry;
        let pod_cidrs = cfg.meshd.advertise_kubernetes_networks;
        let kubernetes =
            (registry || (pod_cidrs && !endpoints.is_empty())).then(|| kubernetes::Settings {
                registry,
                publish: !c.kubespan_enabled,
                pod_cidrs,
                // The kubelet registers its Node under the lowercased hostname.
                nodename: nodename().to_lowercase(),
                pod_subnets: c.pod_subnets.clone(),
            });
        if endpoints.is_empty() && kubernetes.is_none() {
            return None;
        }
        let ca_files = endpoints
            .iter()
            .map(|e| {
                cfg.meshd
                    .discovery_ca_for(e)
                    .map(std::path::Path::to_path_buf)
            })
            .collect();
        Some(DiscoveryKey {
            ca_files,
            endpoints,
            cluster_id,
            secret,
            kubernetes,
        })
    }
}

impl Discovery {
    /// Starts one registry task per endpoint.
    pub fn start(key: DiscoveryKey, our_id: String, metrics: Metrics) -> Discovery {
        let (local_tx, local_rx) = watch::channel(None);
        let (snap_tx, snap_rx) = watch::channel(Snapshot::default());
        let snap_tx = Arc::new(snap_tx);
        let stop = CancellationToken::new();
        let mut names: Vec<String> = key.endpoints.clone();
        if key.kubernetes.is_some() {
            names.push(kubernetes::REGISTRY.to_owned());
        }
        let shared = Arc::new(Mutex::new(Shared {
            per_registry: vec![BTreeMap::new(); names.len()],
            status: names
                .iter()
                .map(|e| RegistryStatus {
                    endpoint: e.clone(),
                    state: "connecting".into(),
                    ..RegistryStatus::default()
                })
                .collect(),
            synced: false,
            own_pod_cidrs: Vec::new(),
            own_node_read: false,
        }));
        let publisher = Publisher {
            shared: shared.clone(),
            tx: snap_tx.clone(),
        };
        let mut tasks = Vec::new();
        if let Some(secret) = &key.secret {
            let codec = Codec::new(&secret.0);
            for (index, endpoint) in key.endpoints.iter().enumerate() {
                metrics.discovery_rejected_zero(endpoint, &Rejected::ALL.map(Rejected::as_str));
                let r = registry::Registry {
                    index,
                    endpoint: endpoint.clone(),
                    ca_file: key.ca_files.get(index).cloned().flatten(),
                    cluster_id: key.cluster_id.clone(),
                    our_id: our_id.clone(),
                    codec: codec.clone(),
                    local: local_rx.clone(),
                    shared: publisher.clone(),
                    stop: stop.clone(),
                    metrics: metrics.clone(),
                };
                tasks.push(tokio::spawn(r.run()));
            }
        }
        if let Some(settings) = &key.kubernetes {
            metrics
                .discovery_rejected_zero(kubernetes::REGISTRY, &[kubernetes::REJECTED_ANNOTATION]);
            let r = kubernetes::Registry {
                index: names.len() - 1,
                settings: settings.clone(),
                local: local_rx.clone(),
                shared: publisher,
                stop: stop.clone(),
                metrics: metrics.clone(),
            };
            tasks.push(tokio::spawn(r.run()));
        }
        Discovery {
            key,
            our_id,
            local: local_tx,
            snapshot: snap_rx,
            started: std::time::Instant::now(),
            stop,
            tasks,
        }
    }

    /// Whether publishing waits for our pod CIDRs: with `advertiseKubernetesNetworks`, until the
    /// Kubernetes client has read our Node, at most [`POD_CIDR_WAIT`]. Peers then meet us with our pod
    /// CIDRs in their first record of us, not a record without them followed by one with them (two
    /// WireGuard updates on every peer; each was a session restart on the userspace backend before its
    /// updates were in place).
    pub fn waits_for_pod_cidrs(&self) -> bool {
        self.key.kubernetes.as_ref().is_some_and(|k| k.pod_cidrs)
            && !self.snapshot.borrow().own_node_read
            && self.started.elapsed() < POD_CIDR_WAIT
    }

    /// Sets what this node publishes (a change is pushed at once).
    pub fn set_local(&self, local: Local) {
        self.local.send_if_modified(|cur| {
            if cur.as_ref() == Some(&local) {
                false
            } else {
                *cur = Some(local);
                true
            }
        });
    }

    /// Stops the registries; each deletes our record from its service (bounded wait).
    pub async fn stop(self) {
        self.stop.cancel();
        let all = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(Duration::from_secs(4), all)
            .await
            .is_err()
        {
            tracing::warn!("discovery did not stop in time");
        }
    }
}

/// How registries publish into the merged snapshot.
#[derive(Clone, Debug)]
struct Publisher {
    shared: Arc<Mutex<Shared>>,
    tx: Arc<watch::Sender<Snapshot>>,
}

impl Publisher {
    fn update(&self, f: impl FnOnce(&mut Shared)) {
        let snap = {
            let Ok(mut s) = self.shared.lock() else {
                return;
            };
            f(&mut s);
            Snapshot {
                affiliates: merge(s.per_registry.iter().flat_map(|m| m.values())),
                synced: s.synced,
                registries: s.status.clone(),
                own_pod_cidrs: s.own_pod_cidrs.clone(),
                own_node_read: s.own_node_read,
            }
        };
        self.tx.send_replace(snap);
    }
}

/// This node's ID on the service: stable as long as its WireGuard key (Talos keeps a random one in a file).
pub fn node_id(public: &PublicKey) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"hybridnet-meshd-node-id-v1");
    h.update(public.0);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

/// This node's name: `MESHD_NODENAME` (for nodes sharing a UTS namespace), else the kernel hostname.
pub fn nodename() -> String {
    std::env::var("MESHD_NODENAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(crate::status::hostname)
}

/// Builds our affiliate; `pod_cidrs` (this node's `spec.podCIDRs`) join the KubeSpan additional
/// addresses when `advertiseKubernetesNetworks` is on. Addresses inside the pod CIDRs (a CNI bridge's
/// gateway address, say) are neither node addresses nor endpoints: peers route those through the mesh.
pub fn local(
    cfg: &Config,
    public: &PublicKey,
    mesh_addr: IpAddr,
    addresses: &[IpAddr],
    pod_cidrs: &[IpNet],
) -> Local {
    let name = nodename();
    let cp = cfg.cluster.machine_type.is_control_plane();
    let extra = &cfg.meshd.extra_announced_endpoints;
    let addresses: Vec<IpAddr> = addresses
        .iter()
        .filter(|ip| !pod_cidrs.iter().any(|p| p.contains(*ip)))
        .copied()
        .collect();
    let endpoints: Vec<SocketAddr> = addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, cfg.meshd.listen_port))
        .filter(|e| !extra.contains(e))
        .collect();
    let mut additional: Vec<IpNet> = cfg.meshd.addresses.clone();
    if cfg.meshd.advertise_kubernetes_networks {
        for p in pod_cidrs {
            if !additional.contains(p) {
                additional.push(*p);
            }
        }
    }
    Local {
        affiliate: client::Affiliate {
            node_id: node_id(public),
            addresses: addresses.iter().map(|ip| codec::ip_bytes(*ip)).collect(),
            hostname: name.clone(),
            nodename: name,
            machine_type: match cfg.cluster.machine_type {
                hybridnet_config::MachineType::ControlPlane => "controlplane",
                hybridnet_config::MachineType::Worker => "worker",
                hybridnet_config::MachineType::Unknown => "unknown",
            }
            .into(),
            operating_system: concat!("hybridnet meshd ", env!("CARGO_PKG_VERSION")).into(),
            kubespan: Some(client::KubeSpan {
                public_key: public.to_string(),
                address: codec::ip_bytes(mesh_addr),
                additional_addresses: additional.iter().map(codec::prefix_to).collect(),
                exclude_advertised_addresses: cfg
                    .meshd
                    .exclude_advertised_networks
                    .iter()
                    .map(codec::prefix_to)
                    .collect(),
            }),
            control_plane: cp.then(|| client::ControlPlane {
                api_server_port: u32::from(cfg.cluster.local_api_server_port),
            }),
        },
        endpoints,
        extra: extra.clone(),
        filter: cfg.meshd.endpoint_filter.clone(),
        port: cfg.meshd.listen_port,
        excluded: cfg.meshd.exclude_advertised_networks.clone(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
