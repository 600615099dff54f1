//! Discovery: peers from the Talos discovery service, merged by node ID as Talos merges affiliates.
//!
//! - [`proto`]: the service's protobuf messages (hand-written prost structs; `proto/*.proto` documents them);
//! - [`codec`]: Talos-compatible encryption of affiliate data and endpoints, keyed by the cluster secret;
//! - [`grpc`]: a small gRPC client over HTTP/2;
//! - [`registry`]: one task per service endpoint (Hello, AffiliateUpdate, Watch, AffiliateDelete,
//!   reconnects), all feeding one merged [`Snapshot`].
//!
//! The mesh merges the snapshot with the static peers ([`crate::mesh::Mesh::set_discovered`]); until some
//! registry has delivered its first snapshot, peers that discovery brought before a restart come from
//! the peer cache.

pub mod codec;
pub mod grpc;
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

use crate::mesh::PeerSpec;
use crate::metrics::Metrics;
use codec::{Codec, Rejected, ip_from_bytes, prefix_from};
use proto::{client, server};

/// TTL of our record on the service (Talos: 30 min); refreshed at half of it and on every change.
pub const TTL: Duration = Duration::from_secs(30 * 60);
/// The `source` of discovered peers (cache and status).
pub const SOURCE: &str = "discovery";

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
    /// KubeSpan `ExcludeAdvertisedNetworks`: prefixes the node asks peers not to route to it.
    pub exclude: Vec<IpNet>,
    pub api_server_port: Option<u16>,
    pub endpoints: Vec<SocketAddr>,
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
        public_key: ks.and_then(|k| parse_key(&k.public_key)),
        mesh_address: ks.and_then(|k| ip_from_bytes(&k.address)),
        additional: ks
            .map(|k| {
                k.additional_addresses
                    .iter()
                    .filter_map(prefix_from)
                    .collect()
            })
            .unwrap_or_default(),
        exclude: ks
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
    }
}

fn parse_key(text: &str) -> Option<PublicKey> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    Some(PublicKey(bytes.try_into().ok()?))
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
        for x in &a.exclude {
            if !m.exclude.contains(x) {
                m.exclude.push(*x);
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
/// its additional addresses (KubeSpan also routes the node addresses; meshd does not, see the README).
pub fn peer_spec(a: &Affiliate, cfg: &Config) -> Option<PeerSpec> {
    let key = a.public_key?;
    let mut allowed: Vec<IpNet> = a.additional.clone();
    if let Some(m) = a.mesh_address {
        allowed.push(IpNet::from(m));
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
        location: None,
        source: SOURCE.into(),
        node_id: Some(a.node_id.clone()).filter(|s| !s.is_empty()),
        addresses: a.addresses.clone(),
        api_server_port: a.api_server_port,
    })
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
                    &a.exclude,
                    a.mesh_address,
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
}

/// The merged view of every registry.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub affiliates: Vec<Affiliate>,
    /// Some registry has delivered a full snapshot since start (the cache is no longer needed).
    pub synced: bool,
    pub registries: Vec<RegistryStatus>,
}

#[derive(Debug, Default)]
struct Shared {
    per_registry: Vec<BTreeMap<String, Affiliate>>,
    status: Vec<RegistryStatus>,
    synced: bool,
}

/// The running discovery: one task per endpoint.
#[derive(Debug)]
pub struct Discovery {
    pub key: DiscoveryKey,
    pub our_id: String,
    local: watch::Sender<Option<Local>>,
    pub snapshot: watch::Receiver<Snapshot>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The settings that, when changed, restart discovery.
#[derive(Clone, Debug, PartialEq)]
pub struct DiscoveryKey {
    endpoints: Vec<String>,
    cluster_id: String,
    secret: hybridnet_config::Secret,
}

impl DiscoveryKey {
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn of(cfg: &Config) -> Option<DiscoveryKey> {
        let c = &cfg.cluster;
        if !c.discovery.enabled || c.discovery.endpoints.is_empty() {
            return None;
        }
        let (Some(id), Some(secret)) = (&c.id, &c.secret) else {
            return None;
        };
        Some(DiscoveryKey {
            endpoints: c.discovery.endpoints.clone(),
            cluster_id: id.clone(),
            secret: secret.clone(),
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
        let n = key.endpoints.len();
        let shared = Arc::new(Mutex::new(Shared {
            per_registry: vec![BTreeMap::new(); n],
            status: key
                .endpoints
                .iter()
                .map(|e| RegistryStatus {
                    endpoint: e.clone(),
                    state: "connecting".into(),
                    ..RegistryStatus::default()
                })
                .collect(),
            synced: false,
        }));
        let codec = Codec::new(&key.secret.0);
        let tasks = key
            .endpoints
            .iter()
            .enumerate()
            .map(|(index, endpoint)| {
                let r = registry::Registry {
                    index,
                    endpoint: endpoint.clone(),
                    cluster_id: key.cluster_id.clone(),
                    our_id: our_id.clone(),
                    codec: codec.clone(),
                    local: local_rx.clone(),
                    shared: Publisher {
                        shared: shared.clone(),
                        tx: snap_tx.clone(),
                    },
                    stop: stop.clone(),
                    metrics: metrics.clone(),
                };
                tokio::spawn(r.run())
            })
            .collect();
        Discovery {
            key,
            our_id,
            local: local_tx,
            snapshot: snap_rx,
            stop,
            tasks,
        }
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

/// Builds our affiliate.
pub fn local(cfg: &Config, public: &PublicKey, mesh_addr: IpAddr, addresses: &[IpAddr]) -> Local {
    let name = nodename();
    let cp = cfg.cluster.machine_type.is_control_plane();
    let extra = &cfg.meshd.extra_announced_endpoints;
    let endpoints: Vec<SocketAddr> = addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, cfg.meshd.listen_port))
        .filter(|e| !extra.contains(e))
        .collect();
    let additional: Vec<IpNet> = cfg.meshd.addresses.clone();
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
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
