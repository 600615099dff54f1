//! The typed, merged configuration the daemons use.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};

use crate::filter::EndpointFilter;
use crate::parse::HostPort;

/// Talos's KubePrism default port; also apiprism's default listen port when Talos's KubePrism is off.
pub const KUBEPRISM_PORT: u16 = 7445;
/// apiprism's default listen port when Talos's own KubePrism is on and owns 7445.
pub const APIPRISM_ALT_PORT: u16 = 7455;
/// Talos's default discovery service.
pub const DEFAULT_DISCOVERY_ENDPOINT: &str = "https://discovery.talos.dev/";
/// The Talos host DNS listen address (machined's cache; `/etc/resolv.conf` points at it).
pub const TALOS_HOST_DNS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 53));
/// The address Talos adds to `lo` for `forwardKubeDNSToHost` (CoreDNS forwards there).
pub const TALOS_HOST_DNS_FORWARD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 116, 108));
/// The IPv6 twin of [`TALOS_HOST_DNS_FORWARD`].
pub const TALOS_HOST_DNS_FORWARD_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(
    0xfd54, 0x616c, 0x6f73, 0, 0, 0x204f, 0x5320, 0x444e,
));

/// The node's role, from Talos `machine.type` (`init` counts as a control plane).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MachineType {
    ControlPlane,
    Worker,
    /// No Talos machine config in the file (plain Linux, or only our document).
    #[default]
    Unknown,
}

impl MachineType {
    pub fn is_control_plane(self) -> bool {
        self == MachineType::ControlPlane
    }
}

/// A 32-byte secret (the cluster secret). `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A WireGuard public key (32 bytes, written in base64).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64::Engine as _;
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

/// Parses a key as Talos and `wg` write it: base64 (standard or URL-safe, padded or not) of 32 bytes, surrounding
/// whitespace allowed. The one key parser: config, discovery records and the peer cache all use it.
impl std::str::FromStr for PublicKey {
    type Err = String;

    fn from_str(text: &str) -> Result<PublicKey, String> {
        crate::talos::decode32(text).map(PublicKey)
    }
}

/// Facts about the cluster, read from the Talos documents (or set in HybridNetConfig where it has a
/// key for them). Keys in [`crate::Sources`] are `cluster.<field>`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ClusterConfig {
    pub machine_type: MachineType,
    /// `cluster.controlPlane.endpoint` | `KubeClusterConfig.endpoint`, as host:port (https → 443).
    pub control_plane_endpoint: Option<HostPort>,
    /// This node's API server port on control-plane nodes: `cluster.controlPlane.localAPIServerPort`
    /// | `KubeAPIServerConfig.apiPort` | 6443.
    pub local_api_server_port: u16,
    pub name: Option<String>,
    pub pod_subnets: Vec<IpNet>,
    pub service_subnets: Vec<IpNet>,
    /// The discovery cluster ID as written (base64 of 32 bytes; validated).
    pub id: Option<String>,
    /// The discovery cluster secret (also KubeSpan's WireGuard preshared key).
    pub secret: Option<Secret>,
    pub discovery: DiscoveryConfig,
    /// Talos's own KubePrism, when it is enabled.
    pub kube_prism: Option<KubePrism>,
    pub host_dns: HostDns,
    /// `machine.network.nameservers` | `ResolverConfig.nameservers`.
    pub nameservers: Vec<IpAddr>,
    /// Talos's own KubeSpan is enabled (`machine.network.kubespan.enabled` | `KubeSpanConfig.enabled`).
    pub kubespan_enabled: bool,
}

/// The discovery service settings.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DiscoveryConfig {
    pub enabled: bool,
    /// Service registry endpoints (one per `DiscoveryServiceConfig`, or the legacy one); empty when
    /// the service registry is disabled.
    pub endpoints: Vec<String>,
    /// The (deprecated) Kubernetes registry is enabled.
    pub kubernetes_registry: bool,
}

/// Talos's own KubePrism (`machine.features.kubePrism` | `KubePrismConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubePrism {
    pub port: u16,
    pub tls_server_name: Option<String>,
}

/// Talos host DNS (`machine.features.hostDNS` | `ResolverConfig.hostDNS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HostDns {
    pub enabled: bool,
    pub forward_kube_dns_to_host: bool,
}

/// apiprism: the node-local API server load balancer.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiprismConfig {
    /// Where it listens. Default `127.0.0.1:7445` and `[::1]:7445`; when Talos's own KubePrism is
    /// enabled on 7445, the default moves to 7455 so both can run side by side.
    pub listen: Vec<SocketAddr>,
    /// Extra upstreams from HybridNetConfig `apiprism.endpoints`.
    pub endpoints: Vec<HostPort>,
    /// The effective static upstreams, deduplicated, in this order: the control-plane endpoint, this
    /// node's API server (`localhost:<port>`, control-plane nodes only), then `endpoints`.
    /// Discovered control-plane members come on top at run time.
    pub upstreams: Vec<HostPort>,
    pub admin: SocketAddr,
    pub health_check: HealthCheck,
    pub dial_timeout: Duration,
    /// TLS server name for the optional TLS health probe (`KubePrismConfig.tlsServerName` or ours).
    pub tls_server_name: Option<String>,
    /// `apiprism.clusterCAFile`: the cluster CA (PEM) a discovered API server's certificate must verify
    /// against before it gets traffic (default `/etc/kubernetes/pki/ca.crt`, the kubelet's client CA on
    /// Talos and kubeadm nodes).
    pub cluster_ca_file: PathBuf,
    /// Client connections served at once; 0 (default): derived from the open-file limit at run time,
    /// leaving a reserve of descriptors for upstream dials, health checks and the admin endpoint.
    pub max_connections: u32,
    /// Client connections one client (a source address; a local user on loopback) may hold at once;
    /// 0 (default): half of the connection limit.
    pub max_connections_per_client: u32,
}

/// Upstream health checks; a state flips after `fall` failures or `rise` successes in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
}

/// The mesh MTU: a number, or `auto` (underlay MTU minus the WireGuard overhead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mtu {
    Fixed(u16),
    Auto,
}

/// WireGuard implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Userspace,
    Auto,
}

/// Mesh shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Every node peers with every other node.
    Full,
    /// Nodes of one location reach each other natively; locations are meshed.
    Location,
}

/// Whether a node may be its location's gateway (`topology: location`): `auto` when it has a public
/// address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GatewayPin {
    Always,
    #[default]
    Auto,
    Never,
}

impl GatewayPin {
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayPin::Always => "always",
            GatewayPin::Auto => "auto",
            GatewayPin::Never => "never",
        }
    }
}

/// A static peer.
#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoints: Vec<HostPort>,
    pub allowed_ips: Vec<IpNet>,
    pub location: Option<String>,
    pub gateway: GatewayPin,
}

/// meshd: the WireGuard mesh.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshdConfig {
    pub interface: String,
    pub listen_port: u16,
    pub mtu: Mtu,
    pub backend: Backend,
    pub private_key_file: PathBuf,
    pub addresses: Vec<IpNet>,
    pub location: Option<String>,
    pub topology: Topology,
    /// This node's stance on being its location's gateway.
    pub gateway: GatewayPin,
    pub peers: Vec<Peer>,
    /// Which of this node's addresses are advertised as endpoints (KubeSpan `filters.endpoints`).
    pub endpoint_filter: EndpointFilter,
    /// Prefixes removed from the AllowedIPs peers install for this node.
    pub exclude_advertised_networks: Vec<IpNet>,
    pub allow_down_peer_bypass: bool,
    pub advertise_kubernetes_networks: bool,
    pub harvest_extra_endpoints: bool,
    /// `KubeSpanEndpointsConfig.extraAnnouncedEndpoints`, announced after filtering.
    pub extra_announced_endpoints: Vec<SocketAddr>,
    /// Behave like KubeSpan on the wire (ULA addressing, cluster secret as preshared key).
    pub kubespan_compat: bool,
    /// Clamp the TCP MSS of SYNs leaving through the mesh interface to the route MTU (nftables).
    pub clamp_mss: bool,
    /// The KubeSpan ULA /64 derived from the cluster ID, when there is one.
    pub ula_prefix: Option<Ipv6Net>,
    pub admin: SocketAddr,
    /// `meshd.discovery.caFile`: CA certificates (PEM) trusted for every `https://` discovery
    /// endpoint, besides the system bundle.
    pub discovery_ca_file: Option<PathBuf>,
    /// `meshd.discovery.endpoints`: a CA file for one endpoint (instead of `discovery_ca_file`).
    pub discovery_endpoint_cas: Vec<EndpointCa>,
    /// `meshd.relay`: whether peers no direct path reaches go through a relay node.
    pub relay: RelayMode,
    /// `meshd.relays`: the only nodes (by public key) allowed to relay; empty: any node that others reach
    /// on a public address.
    pub relays: Vec<PublicKey>,
    /// `meshd.trust`: what discovered peers may claim.
    pub trust: Trust,
}

/// `meshd.relay`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelayMode {
    /// A peer that no direct path reaches goes through a relay (when one is allowed and up).
    #[default]
    Auto,
    /// Never: such a peer is down (unreachable).
    Never,
}

/// `meshd.trust`: discovered peers' prefixes shorter than these are refused (static peers are trusted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trust {
    /// `meshd.trust.minPrefixLength.ipv4` (default 8).
    pub min_prefix_v4: u8,
    /// `meshd.trust.minPrefixLength.ipv6` (default 32).
    pub min_prefix_v6: u8,
}

/// A CA file for one discovery endpoint (as written in its `DiscoveryServiceConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointCa {
    pub endpoint: String,
    pub ca_file: PathBuf,
}

/// Two discovery endpoint URLs name the same service (a trailing `/` does not count).
pub fn same_endpoint(a: &str, b: &str) -> bool {
    a.trim().trim_end_matches('/') == b.trim().trim_end_matches('/')
}

impl MeshdConfig {
    /// The extra CA file for discovery `endpoint`: its own, else the one for all.
    pub fn discovery_ca_for(&self, endpoint: &str) -> Option<&std::path::Path> {
        self.discovery_endpoint_cas
            .iter()
            .find(|e| same_endpoint(&e.endpoint, endpoint))
            .map(|e| e.ca_file.as_path())
            .or(self.discovery_ca_file.as_deref())
    }
}

/// The dummy link that holds dnslocal's listen addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsInterface {
    pub name: String,
    pub create: bool,
}

/// The DNS cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsCache {
    pub size: usize,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
    /// How long an expired answer may still be served when upstreams fail (zero: never).
    pub serve_stale: Duration,
    pub prefetch: bool,
    /// Bytes the cached answers may hold at most (their wire bytes and bookkeeping).
    pub max_memory: u64,
}

/// dnslocal: the node-local DNS cache and forwarder.
#[derive(Clone, Debug, PartialEq)]
pub struct DnslocalConfig {
    pub listen: Vec<SocketAddr>,
    pub interface: DnsInterface,
    pub cluster_domain: String,
    /// Where the cluster domain and reverse zones go (kube-dns).
    pub cluster_dns: Vec<SocketAddr>,
    /// Where everything else goes; empty means the node's `/etc/resolv.conf`.
    pub upstreams: Vec<SocketAddr>,
    pub cache: DnsCache,
    pub admin: SocketAddr,
    /// UDP queries a second each client address may ask (0: no limit).
    pub client_rate: u32,
    /// Conditional forwarding (stub domains): names in a zone go to its servers; the longest zone wins.
    pub forward: Vec<DnsForward>,
    /// `interceptClusterDNS`: the kube-dns ClusterIP dnslocal also listens on (held on its link, with
    /// NOTRACK rules so kube-proxy's DNAT does not take the queries); `None` when off.
    pub intercept_cluster_dns: Option<std::net::IpAddr>,
    /// Who answers the cluster zone: kube-dns (`forward`) or dnslocal itself from the Kubernetes API.
    pub cluster_zone: ClusterZone,
    /// The TTL of the answers dnslocal gives from the Kubernetes API (`kubernetes` mode).
    pub cluster_zone_ttl: Duration,
    /// The kubeconfig for the Kubernetes API (`kubernetes` mode); `None`: `KUBECONFIG`, the in-cluster
    /// service account, then the kubelet's kubeconfig.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// This node's `topology.kubernetes.io/zone` (headless answers list its endpoints first); `None`:
    /// read from this node's Node object.
    pub topology_zone: Option<String>,
}

/// `dnslocal.clusterZone`: who answers the cluster zone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClusterZone {
    /// Forward it to `clusterDNS` (kube-dns).
    #[default]
    Forward,
    /// Answer it from Services and EndpointSlices (list + watch of the Kubernetes API).
    Kubernetes,
}

/// One `dnslocal.forward` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsForward {
    /// Lower-cased, without the trailing dot.
    pub zone: String,
    pub to: Vec<SocketAddr>,
}
