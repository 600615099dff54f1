//! Our own document, `apiVersion: v1alpha1`, `kind: HybridNetConfig`: strict (unknown keys are
//! errors with a suggestion), every value tagged with its line and column.

mod sections;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::filter::FilterRule;
use crate::model::{Backend, GatewayPin, Mtu, Peer, Topology};
use crate::parse::HostPort;
use crate::read::Ctx;
use crate::source::Sourced;
use crate::yaml::Node;

pub use sections::read_hybridnet;

/// The keys of the top level.
pub const TOP_KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "stateDir",
    "dataDir",
    "apiprism",
    "meshd",
    "dnslocal",
    "allowNonLocalListen",
];

/// Everything HybridNetConfig can set; `None` where it is silent.
#[derive(Default)]
pub struct Ours {
    pub state_dir: Sourced<PathBuf>,
    pub data_dir: Sourced<PathBuf>,
    pub allow_non_local_listen: Sourced<bool>,
    // apiprism
    pub ap_listen: Sourced<Vec<SocketAddr>>,
    pub ap_endpoints: Sourced<Vec<HostPort>>,
    pub ap_admin: Sourced<SocketAddr>,
    pub ap_hc_interval: Sourced<Duration>,
    pub ap_hc_timeout: Sourced<Duration>,
    pub ap_hc_fall: Sourced<u32>,
    pub ap_hc_rise: Sourced<u32>,
    pub ap_dial_timeout: Sourced<Duration>,
    pub ap_tls_server_name: Sourced<String>,
    pub ap_cluster_ca_file: Sourced<PathBuf>,
    pub ap_max_connections: Sourced<u32>,
    pub ap_max_per_client: Sourced<u32>,
    // meshd
    pub m_interface: Sourced<String>,
    pub m_listen_port: Sourced<u16>,
    pub m_mtu: Sourced<Mtu>,
    pub m_backend: Sourced<Backend>,
    pub m_private_key_file: Sourced<PathBuf>,
    pub m_addresses: Sourced<Vec<IpNet>>,
    pub m_location: Sourced<String>,
    pub m_topology: Sourced<Topology>,
    pub m_gateway: Sourced<GatewayPin>,
    pub m_peers: Sourced<Vec<Peer>>,
    pub m_filters: Sourced<Vec<FilterRule>>,
    pub m_exclude: Sourced<Vec<IpNet>>,
    pub m_bypass: Sourced<bool>,
    pub m_advertise: Sourced<bool>,
    pub m_harvest: Sourced<bool>,
    pub m_extra_endpoints: Sourced<Vec<SocketAddr>>,
    pub m_kubespan_compat: Sourced<bool>,
    pub m_clamp_mss: Sourced<bool>,
    pub m_admin: Sourced<SocketAddr>,
    pub m_discovery_ca_file: Sourced<PathBuf>,
    pub m_discovery_endpoint_cas: Sourced<Vec<crate::model::EndpointCa>>,
    pub m_relay: Sourced<crate::model::RelayMode>,
    pub m_relays: Sourced<Vec<crate::model::PublicKey>>,
    pub m_trust_min_v4: Sourced<u8>,
    pub m_trust_min_v6: Sourced<u8>,
    // dnslocal
    pub d_listen: Sourced<Vec<SocketAddr>>,
    pub d_if_name: Sourced<String>,
    pub d_if_create: Sourced<bool>,
    pub d_cluster_domain: Sourced<String>,
    pub d_cluster_dns: Sourced<Vec<SocketAddr>>,
    pub d_upstreams: Sourced<Vec<SocketAddr>>,
    pub d_cache_size: Sourced<usize>,
    pub d_cache_max_ttl: Sourced<Duration>,
    pub d_cache_negative_ttl: Sourced<Duration>,
    pub d_cache_serve_stale: Sourced<Duration>,
    pub d_cache_prefetch: Sourced<bool>,
    pub d_cache_max_memory: Sourced<u64>,
    pub d_client_rate: Sourced<u32>,
    pub d_forward: Sourced<Vec<crate::model::DnsForward>>,
    pub d_intercept_cluster_dns: Sourced<bool>,
    pub d_cluster_zone: Sourced<crate::model::ClusterZone>,
    pub d_cluster_zone_ttl: Sourced<Duration>,
    pub d_kubeconfig: Sourced<PathBuf>,
    pub d_topology_zone: Sourced<String>,
    pub d_admin: Sourced<SocketAddr>,
}

/// Reads `section.key` with `f`, tagging it as set in HybridNetConfig.
fn get<T>(
    ctx: &mut Ctx,
    section: Option<&Node>,
    prefix: &str,
    key: &str,
    f: impl FnOnce(&mut Ctx, &Node, &str) -> Option<T>,
) -> Sourced<T> {
    let node = section?.get(key).filter(|n| !n.is_null())?;
    let full = if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    };
    let value = f(ctx, node, &full)?;
    Some((value, ctx.ours(&full, node)))
}
