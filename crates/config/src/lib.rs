//! hybridnet-config: load one multi-document YAML file (Talos machine config in either shape, plus
//! our `HybridNetConfig` document), merge it with the documented precedence and validate it into
//! one typed [`Config`] whose every value remembers where it came from ([`Config::sources`]).
//!
//! # The file
//!
//! Documents separated by `---`:
//! - the legacy Talos `version: v1alpha1` document (`machine:`, `cluster:`);
//! - newer Talos kinds (`KubeSpanConfig`, `KubeSpanEndpointsConfig`, `KubePrismConfig`,
//!   `DiscoveryServiceConfig` (several, unique by `name`), `DiscoveryIdentityConfig`,
//!   `KubeNetworkConfig`, `KubeClusterConfig`, `ResolverConfig`, `KubeletConfig.clusterDNS`,
//!   `KubeAPIServerConfig.apiPort`, `ExtensionServiceConfig`); every other Talos field and kind is
//!   accepted and ignored;
//! - our `apiVersion: v1alpha1`, `kind: HybridNetConfig` (unknown keys are errors, with the
//!   nearest valid key suggested).
//!
//! # Precedence
//!
//! A value set in HybridNetConfig > the Talos field for the same thing > a value derived from Talos
//! fields > the built-in default. When a legacy Talos field and the newer document that replaces
//! it are both present (Talos itself refuses that), the newer document wins and a warning goes to
//! [`Config::warnings`].
//!
//! # Decisions
//!
//! - An empty file (or one with only comments or empty documents) loads to the defaults. (The daemons'
//!   reload treats an empty or whitespace-only file like a missing one instead: see hybridnet-runtime.)
//! - [`read_file`] never blocks: it opens with `O_NONBLOCK` and refuses anything that is not a regular
//!   file ([`Error::NotRegular`]): a FIFO at the config path would otherwise hang the reader forever.
//! - Input is capped at [`MAX_CONFIG_BYTES`] (4 MiB), checked from the file's metadata before it is
//!   read and on the text given to [`load_str`]; YAML parsing has budgets for events, nodes, depth
//!   and alias replay, so an alias bomb fails fast with [`IssueKind::Limit`].
//! - apiprism listens on `127.0.0.1:7445` and `[::1]:7445` by default; when Talos's own KubePrism
//!   is enabled on 7445, the default moves to 7455 (see [`ApiprismConfig::listen`]).
//! - Problems are collected: one [`Error::Invalid`] lists every issue found, each starting with
//!   `file:line:column:`.
#![forbid(unsafe_code)]
#![warn(clippy::print_stdout, clippy::dbg_macro)]

mod docs;
mod duration;
mod error;
mod filter;
mod hybridnet;
mod merge;
mod model;
mod parse;
mod pos;
mod read;
mod render;
mod source;
mod talos;
mod ula;
mod validate;
mod yaml;

use std::io::Read as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use duration::{format_duration, parse_duration};
pub use error::{Error, Issue, IssueKind};
pub use filter::{EndpointFilter, FilterRule};
pub use model::*;
pub use parse::HostPort;
pub use pos::Pos;
pub use source::{Source, Sources};
pub use ula::{ULA_KUBESPAN, ula_prefix};

/// Where the daemons look for their config file unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/usr/local/etc/hybridnet/config.yaml";

/// Where the kubelet's kubeconfig is, in the order the daemons try them: kubeadm, Talos
/// (`constants.KubeletKubeconfig`), k3s. meshd's Kubernetes registry, dnslocal's cluster zone and doctor read it.
pub const KUBELET_KUBECONFIGS: [&str; 3] = [
    "/etc/kubernetes/kubelet.conf",
    "/etc/kubernetes/kubeconfig-kubelet",
    "/var/lib/rancher/k3s/agent/kubelet.kubeconfig",
];

/// The largest config accepted (4 MiB); larger input fails before it is read or parsed.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The three daemons; each reads its own section of the merged config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Daemon {
    Apiprism,
    Meshd,
    Dnslocal,
}

impl Daemon {
    pub const ALL: [Daemon; 3] = [Daemon::Apiprism, Daemon::Meshd, Daemon::Dnslocal];

    /// The binary and section name: `apiprism`, `meshd`, `dnslocal`.
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Apiprism => "apiprism",
            Daemon::Meshd => "meshd",
            Daemon::Dnslocal => "dnslocal",
        }
    }
}

/// The merged, validated configuration.
///
/// Equality compares values only (not [`Config::sources`]), so a reload can tell whether anything
/// changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Runtime records shared by the daemons (tmpfs). Default `/run/hybridnet`.
    pub state_dir: PathBuf,
    /// What must survive a reboot (keys, last known peers). Default `/var/lib/hybridnet`.
    pub data_dir: PathBuf,
    /// `apiprism.listen` and the admin addresses may be outside loopback and link-local (default false:
    /// apiprism on a routable address is an open relay to the API servers, and `/metrics` tells a lot).
    pub allow_non_local_listen: bool,
    /// Facts about the cluster and this node, mostly from Talos.
    pub cluster: ClusterConfig,
    pub apiprism: ApiprismConfig,
    pub meshd: MeshdConfig,
    pub dnslocal: DnslocalConfig,
    /// Conflicts the loader resolved (legacy Talos field and newer document both set).
    pub warnings: Vec<String>,
    /// Where each value came from, keyed by dotted config key.
    pub sources: Sources,
}

impl Config {
    /// The built-in defaults: what a daemon runs with before any config file exists.
    pub fn defaults() -> Config {
        let localhost = |port| {
            vec![
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            ]
        };
        let admin = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Config {
            state_dir: PathBuf::from("/run/hybridnet"),
            data_dir: PathBuf::from("/var/lib/hybridnet"),
            allow_non_local_listen: false,
            cluster: ClusterConfig {
                local_api_server_port: 6443,
                ..ClusterConfig::default()
            },
            apiprism: ApiprismConfig {
                listen: localhost(KUBEPRISM_PORT),
                endpoints: Vec::new(),
                upstreams: Vec::new(),
                admin: admin(7446),
                health_check: HealthCheck {
                    interval: Duration::from_secs(1),
                    timeout: Duration::from_secs(1),
                    fall: 2,
                    rise: 2,
                },
                dial_timeout: Duration::from_secs(1),
                tls_server_name: None,
                cluster_ca_file: PathBuf::from("/etc/kubernetes/pki/ca.crt"),
                max_connections: 0,
                max_connections_per_client: 0,
            },
            meshd: MeshdConfig {
                interface: "hybridnet0".into(),
                listen_port: 51821,
                mtu: Mtu::Fixed(1420),
                backend: Backend::Auto,
                private_key_file: PathBuf::from("/var/lib/hybridnet/meshd.key"),
                addresses: Vec::new(),
                location: None,
                topology: Topology::Full,
                gateway: GatewayPin::Auto,
                peers: Vec::new(),
                endpoint_filter: EndpointFilter::default(),
                exclude_advertised_networks: Vec::new(),
                allow_down_peer_bypass: false,
                advertise_kubernetes_networks: false,
                harvest_extra_endpoints: false,
                extra_announced_endpoints: Vec::new(),
                kubespan_compat: false,
                clamp_mss: true,
                ula_prefix: None,
                admin: admin(7447),
                discovery_ca_file: None,
                discovery_endpoint_cas: Vec::new(),
                relay: RelayMode::Auto,
                relays: Vec::new(),
                trust: Trust {
                    min_prefix_v4: 8,
                    min_prefix_v6: 32,
                },
            },
            dnslocal: DnslocalConfig {
                listen: vec![SocketAddr::from(([169, 254, 20, 10], 53))],
                interface: DnsInterface {
                    name: "dnslocal0".into(),
                    create: true,
                },
                cluster_domain: "cluster.local".into(),
                cluster_dns: vec![SocketAddr::from(([10, 96, 0, 10], 53))],
                upstreams: Vec::new(),
                cache: DnsCache {
                    size: 100_000,
                    max_ttl: Duration::from_secs(3600),
                    negative_ttl: Duration::from_secs(5),
                    serve_stale: Duration::from_secs(3600),
                    prefetch: true,
                    max_memory: 64 << 20,
                },
                admin: admin(7448),
                client_rate: 2000,
                forward: Vec::new(),
                intercept_cluster_dns: None,
                cluster_zone: ClusterZone::Forward,
                cluster_zone_ttl: Duration::from_secs(5),
                kubeconfig: None,
                topology_zone: None,
            },
            warnings: Vec::new(),
            sources: Sources::default(),
        }
    }

    /// The admin (metrics/health) listen address of one daemon.
    pub fn admin_addr(&self, daemon: Daemon) -> SocketAddr {
        match daemon {
            Daemon::Apiprism => self.apiprism.admin,
            Daemon::Meshd => self.meshd.admin,
            Daemon::Dnslocal => self.dnslocal.admin,
        }
    }

    /// Human-readable effective config for `check-config`: the shared keys (`stateDir`, `dataDir`,
    /// `cluster.*`) plus the given daemon's section (all sections when `None`), one line per value:
    /// `key  value  # source`, then any warnings.
    pub fn render(&self, daemon: Option<Daemon>) -> String {
        render::render_text(self, daemon)
    }

    /// The same as JSON, flat: `{"apiprism.listen": {"value": [...], "source": "default"}, ...}`
    /// (see the `render` module docs), for `check-config --json`.
    pub fn render_json(&self, daemon: Option<Daemon>) -> serde_json::Value {
        render::render_json(self, daemon)
    }
}

/// Reads, merges and validates the config file at `path` ([`read_file`], then [`load_str`]).
pub fn load_file(path: &Path) -> Result<Config, Error> {
    let text = read_file(path)?;
    load_str(&text, path)
}

/// Reads the config file at `path` as text, never blocking on it: the file is opened with `O_NONBLOCK`
/// and anything that is not a regular file (a FIFO, a socket, a device, a directory) is refused with
/// [`Error::NotRegular`] (a FIFO opened for reading would otherwise wait for a writer forever). A symlink
/// to a regular file is fine. Files over [`MAX_CONFIG_BYTES`] and text that is not UTF-8 are refused too.
pub fn read_file(path: &Path) -> Result<String, Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    // The type of what was opened, not of what a stat before the open saw: the path may be swapped between.
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(Error::NotRegular {
            path: path.to_owned(),
            kind: error::file_kind(&meta.file_type()),
        });
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
            limit: MAX_CONFIG_BYTES,
        });
    }
    let mut bytes = Vec::new();
    // The file may grow between metadata and read: never read more than the cap plus one byte.
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            size: bytes.len() as u64,
            limit: MAX_CONFIG_BYTES,
        });
    }
    String::from_utf8(bytes).map_err(|e| Error::NotUtf8 {
        path: path.to_owned(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// Merges and validates config text; `origin` names it in errors and sources.
pub fn load_str(text: &str, origin: &Path) -> Result<Config, Error> {
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::TooLarge {
            path: origin.to_owned(),
            size: text.len() as u64,
            limit: MAX_CONFIG_BYTES,
        });
    }
    let nodes = yaml::parse_stream(text, origin).map_err(|issue| Error::Invalid {
        issues: vec![issue],
    })?;
    let mut ctx = read::Ctx::new(origin);
    let documents = docs::classify(&mut ctx, &nodes);
    let mut legacy = talos::TalosFacts::default();
    let mut newer = talos::TalosFacts::default();
    let mut ours = hybridnet::Ours::default();
    for doc in &documents {
        match doc {
            docs::Doc::Legacy(node) => legacy = talos::read_legacy(&mut ctx, node),
            docs::Doc::Talos(kind, node) => talos::read_document(&mut ctx, kind, node, &mut newer),
            docs::Doc::HybridNet(node) => ours = hybridnet::read_hybridnet(&mut ctx, node),
        }
    }
    let mut warnings = Vec::new();
    let facts = talos::TalosFacts::combine(legacy, newer, &mut warnings);
    let config = merge::merge(&mut ctx, facts, ours, warnings);
    validate::validate(&mut ctx, &config);
    if ctx.issues.is_empty() {
        Ok(config)
    } else {
        let mut issues = ctx.issues;
        issues.sort_by_key(|i| i.pos.map(|p| (p.line, p.column)));
        issues.dedup();
        Err(Error::Invalid { issues })
    }
}
