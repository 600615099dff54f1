//! The data every stage shares: a peer as its source describes it ([`PeerSpec`]) and where it came from
//! ([`Source`]). Sources (config, cache, discovery) produce specs, `plan` turns them into the desired state,
//! `mesh/apply.rs` applies it, `status` and `mesh/publish.rs` report it; none of them imports another for
//! these types.

use std::net::{IpAddr, SocketAddr};

use hybridnet_config::PublicKey;
use ipnet::IpNet;

/// Where a peer came from: trust follows it (a static peer is operator config; everything else is
/// screened, see `plan::trust`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// `meshd.peers` in the config.
    Static,
    /// A discovery registry (Talos discovery service, Kubernetes), or its record restored from the peer
    /// cache.
    Discovery,
}

impl Source {
    /// Both, in the order status and metrics list them.
    pub const ALL: [Source; 2] = [Source::Static, Source::Discovery];

    /// The name in status, metrics (`source` label) and the peer cache.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Discovery => "discovery",
        }
    }

    /// The source a peer cache record names (the cache is a file anyone with access to the data directory
    /// may have edited: `None` for a name that is neither).
    pub fn from_cached(name: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A peer as the config (or the cache) describes it.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub name: String,
    pub key: PublicKey,
    pub candidates: Vec<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// The peer's mesh address as it announced it (its affiliate's KubeSpan address); used in
    /// KubeSpan-compatible mode, where addresses are not derived from keys.
    pub mesh_address: Option<std::net::Ipv6Addr>,
    pub location: Option<String>,
    pub source: Source,
    /// From discovery: the node ID, its underlay addresses, its API server port (control planes).
    pub node_id: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub api_server_port: Option<u16>,
    /// Prefixes its source refused (the Kubernetes registry's pod CIDR check).
    pub refused: Vec<(IpNet, crate::plan::trust::Reason)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_source_names_round_trip_and_strangers_are_none() {
        for s in Source::ALL {
            assert_eq!(Source::from_cached(s.as_str()), Some(s));
        }
        for name in ["", "Static", "static ", "kubernetes", "cache"] {
            assert_eq!(Source::from_cached(name), None, "{name:?}");
        }
    }
}
