//! Peers as the config and the cache describe them, their candidates, and the routes they need. Pure, except
//! the cache read and hostname lookups in [`peer_specs`].

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hybridnet_config::{Config, PublicKey};
use ipnet::{IpNet, Ipv6Net};

use crate::cache;
use crate::model::{PeerSpec, Source};
use crate::peer::PeerState;

/// How long a static peer's endpoint lookup may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The routes for the mesh: its prefix, and every peer's allowed IPs outside it, except (with `bypass`,
/// KubeSpan's `allowDownPeerBypass`) those of down peers, whose traffic then takes the underlay. Pure.
pub fn routes_for<'a>(
    prefix: Ipv6Net,
    peers: impl Iterator<Item = (PeerState, &'a BTreeSet<IpNet>)>,
    bypass: bool,
) -> BTreeSet<IpNet> {
    let mut routes = BTreeSet::new();
    routes.insert(IpNet::V6(prefix));
    for (state, allowed) in peers {
        if bypass && state == PeerState::Down {
            continue;
        }
        for net in allowed {
            if !matches!(net, IpNet::V6(n) if prefix.contains(n)) {
                routes.insert(*net);
            }
        }
    }
    routes
}

/// The peers from the config and the cache, with candidates filtered by the endpoint filter.
pub async fn peer_specs(cfg: &Config) -> Vec<PeerSpec> {
    let m = &cfg.meshd;
    let mut specs = Vec::new();
    for p in &m.peers {
        let mut addrs = Vec::new();
        for hp in &p.endpoints {
            match hybridnet_runtime::net::resolve(hp, RESOLVE_TIMEOUT).await {
                Ok(found) => addrs.extend(found),
                Err(error) => {
                    tracing::warn!(peer = %p.name, endpoint = %hp, %error, "cannot resolve endpoint")
                }
            }
        }
        specs.push(PeerSpec {
            name: p.name.clone(),
            key: p.public_key,
            candidates: filter_candidates(&m.endpoint_filter, &addrs),
            allowed_ips: p.allowed_ips.clone(),
            mesh_address: None,
            location: p.location.clone(),
            source: Source::Static,
            node_id: None,
            addresses: Vec::new(),
            api_server_port: None,
            refused: Vec::new(),
        });
    }
    // Cached peers from other sources.
    let cached = cache::load(&cache::path(&cfg.data_dir));
    for c in cached.peers {
        // Static peers come from the config; a cached record is never trusted as one.
        let source = match Source::from_cached(&c.source) {
            Some(Source::Static) => continue,
            other => other.unwrap_or(Source::Discovery),
        };
        let Ok(key) = c.public_key.parse::<PublicKey>() else {
            continue;
        };
        if specs.iter().any(|s| s.key == key) {
            continue;
        }
        let addrs: Vec<SocketAddr> = c.endpoints.iter().filter_map(|e| e.parse().ok()).collect();
        specs.push(PeerSpec {
            name: c.name,
            key,
            candidates: filter_candidates(&m.endpoint_filter, &addrs),
            allowed_ips: c
                .allowed_ips
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            mesh_address: c.mesh_address.as_deref().and_then(|a| a.parse().ok()),
            location: c.location,
            source,
            node_id: c.node_id,
            addresses: c.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            api_server_port: c.api_server_port,
            refused: Vec::new(),
        });
    }
    specs
}

/// A peer's candidates after our endpoint filter (Talos semantics, applied to the candidates' IPs), in the
/// peer's order, without duplicates.
pub fn filter_candidates(
    filter: &hybridnet_config::EndpointFilter,
    addrs: &[SocketAddr],
) -> Vec<SocketAddr> {
    let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    let kept = filter.apply(&ips);
    let mut out = Vec::new();
    for a in addrs {
        if kept.contains(&a.ip()) && !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> BTreeSet<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn routes_cover_the_prefix_and_peers_and_bypass_drops_down_peers() {
        let prefix: Ipv6Net = "fd00:1:2:3::/64".parse().unwrap();
        let up = nets(&["10.99.0.2/32", "fd00:1:2:3::2/128", "10.244.2.0/24"]);
        let down = nets(&["10.99.0.3/32", "fd00:1:2:3::3/128"]);
        let peers = || [(PeerState::Up, &up), (PeerState::Down, &down)].into_iter();
        let forced = routes_for(prefix, peers(), false);
        assert_eq!(
            forced,
            nets(&[
                "fd00:1:2:3::/64",
                "10.99.0.2/32",
                "10.244.2.0/24",
                "10.99.0.3/32"
            ]),
            "mesh /128s ride on the /64; a down peer stays routed (secure default)"
        );
        let bypass = routes_for(prefix, peers(), true);
        assert!(!bypass.contains(&"10.99.0.3/32".parse().unwrap()));
        assert!(bypass.contains(&"10.99.0.2/32".parse().unwrap()));
    }

    #[test]
    fn candidates_follow_the_endpoint_filter_in_peer_order() {
        use hybridnet_config::{EndpointFilter, FilterRule};
        let addrs: Vec<SocketAddr> = [
            "192.0.2.12:51821",
            "198.51.100.12:51821",
            "[2001:db8::12]:51821",
            "198.51.100.12:51821",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let rules = |r: &[&str]| {
            EndpointFilter::new(r.iter().map(|x| FilterRule::parse(x).unwrap()).collect()).unwrap()
        };
        // No filter: everything, deduplicated, in order.
        assert_eq!(
            filter_candidates(&EndpointFilter::default(), &addrs),
            addrs[..3].to_vec()
        );
        // Talos semantics: ordered, `!` removes what an earlier rule added.
        let f = rules(&["0.0.0.0/0", "!192.0.2.0/24"]);
        assert_eq!(filter_candidates(&f, &addrs), vec![addrs[1]]);
        let f = rules(&["::/0", "192.0.2.0/24"]);
        assert_eq!(filter_candidates(&f, &addrs), vec![addrs[0], addrs[2]]);
        // A negation before the positive removes nothing.
        let f = rules(&["!192.0.2.0/24", "0.0.0.0/0"]);
        assert_eq!(filter_candidates(&f, &addrs), addrs[..2].to_vec());
    }
}
