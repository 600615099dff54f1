//! The readers for each section of HybridNetConfig.

use std::path::PathBuf;

use super::{Ours, TOP_KEYS, get};
use crate::error::IssueKind;
use crate::filter::FilterRule;
use crate::model::{Backend, EndpointCa, GatewayPin, Mtu, Peer, PublicKey, Topology};
use crate::parse;
use crate::read::Ctx;
use crate::yaml::{Node, Value};

const APIPRISM_KEYS: &[&str] = &[
    "listen",
    "endpoints",
    "admin",
    "healthCheck",
    "dialTimeout",
    "tlsServerName",
    "clusterCAFile",
    "maxConnections",
    "maxConnectionsPerClient",
];
const HEALTH_KEYS: &[&str] = &["interval", "timeout", "fall", "rise"];
const MESHD_KEYS: &[&str] = &[
    "interface",
    "listenPort",
    "mtu",
    "backend",
    "privateKeyFile",
    "addresses",
    "location",
    "topology",
    "gateway",
    "peers",
    "filters",
    "allowDownPeerBypass",
    "advertiseKubernetesNetworks",
    "harvestExtraEndpoints",
    "extraAnnouncedEndpoints",
    "kubespanCompat",
    "clampMSS",
    "admin",
    "discovery",
    "relay",
    "relays",
    "trust",
];
const TRUST_KEYS: &[&str] = &["minPrefixLength"];
const MIN_PREFIX_KEYS: &[&str] = &["ipv4", "ipv6"];
const DISCOVERY_KEYS: &[&str] = &["caFile", "endpoints"];
const ENDPOINT_CA_KEYS: &[&str] = &["endpoint", "caFile"];
const FILTER_KEYS: &[&str] = &["endpoints", "excludeAdvertisedNetworks"];
const PEER_KEYS: &[&str] = &[
    "name",
    "publicKey",
    "endpoints",
    "allowedIPs",
    "location",
    "gateway",
];

/// A WireGuard public key (base64 of 32 bytes).
fn public_key(s: &str) -> Result<PublicKey, String> {
    s.parse::<PublicKey>()
        .map_err(|e| format!("invalid WireGuard public key: {e}"))
}

fn gateway_pin(v: &str) -> Result<GatewayPin, String> {
    match v {
        "auto" => Ok(GatewayPin::Auto),
        "always" => Ok(GatewayPin::Always),
        "never" => Ok(GatewayPin::Never),
        _ => Err(format!(
            "unknown gateway `{v}`: expected auto, always or never"
        )),
    }
}
const DNSLOCAL_KEYS: &[&str] = &[
    "listen",
    "interface",
    "clusterDomain",
    "clusterDNS",
    "upstreams",
    "cache",
    "admin",
    "clientRate",
    "forward",
    "interceptClusterDNS",
    "clusterZone",
    "clusterZoneTTL",
    "kubeconfig",
    "topologyZone",
];
const FORWARD_KEYS: &[&str] = &["zone", "to"];
const INTERFACE_KEYS: &[&str] = &["name", "create"];
const CACHE_KEYS: &[&str] = &[
    "size",
    "maxTTL",
    "negativeTTL",
    "serveStale",
    "prefetch",
    "maxMemory",
];

/// A section mapping, checked for unknown keys; `None` when absent, null or not a mapping.
fn section<'a>(
    ctx: &mut Ctx,
    parent: Option<&'a Node>,
    key: &str,
    name: &str,
    allowed: &[&str],
) -> Option<&'a Node> {
    let node = parent?.get(key).filter(|n| !n.is_null())?;
    ctx.check_keys(node, name, allowed).then_some(node)
}

fn path(ctx: &mut Ctx, n: &Node, key: &str) -> Option<PathBuf> {
    ctx.parsed(n, key, |s| {
        if s.is_empty() || s.contains('\0') {
            Err("expected a non-empty path".to_owned())
        } else {
            Ok(PathBuf::from(s))
        }
    })
}

fn count(ctx: &mut Ctx, n: &Node, key: &str) -> Option<u32> {
    ctx.uint(n, key, 1, 1000)
        .and_then(|v| u32::try_from(v).ok())
}

/// A connection limit: 0 (derived at run time) up to a million.
fn connection_limit(ctx: &mut Ctx, n: &Node, key: &str) -> Option<u32> {
    ctx.uint(n, key, 0, 1_000_000)
        .and_then(|v| u32::try_from(v).ok())
}

fn name(ctx: &mut Ctx, n: &Node, key: &str) -> Option<String> {
    ctx.parsed(n, key, |s| {
        if s.is_empty() || s.len() > 253 || s.chars().any(char::is_control) {
            Err(format!(
                "invalid name `{s}`: expected 1-253 printable characters"
            ))
        } else {
            Ok(s.to_owned())
        }
    })
}

fn host_ports(ctx: &mut Ctx, n: &Node, key: &str) -> Option<Vec<parse::HostPort>> {
    ctx.list(n, key, |c, item, k| {
        c.parsed(item, k, parse::parse_host_port)
    })
}

/// Reads our document. Unknown keys and bad values are added to `ctx.issues`.
pub fn read_hybridnet(ctx: &mut Ctx, doc: &Node) -> Ours {
    ctx.check_keys(doc, "HybridNetConfig", TOP_KEYS);
    let top = Some(doc);
    let mut o = Ours {
        state_dir: get(ctx, top, "", "stateDir", path),
        data_dir: get(ctx, top, "", "dataDir", path),
        allow_non_local_listen: get(ctx, top, "", "allowNonLocalListen", |c, n, k| {
            c.boolean(n, k)
        }),
        ..Ours::default()
    };
    let s = section(ctx, top, "apiprism", "apiprism", APIPRISM_KEYS);
    read_apiprism(ctx, s, &mut o);
    let s = section(ctx, top, "meshd", "meshd", MESHD_KEYS);
    read_meshd(ctx, s, &mut o);
    let s = section(ctx, top, "dnslocal", "dnslocal", DNSLOCAL_KEYS);
    read_dnslocal(ctx, s, &mut o);
    o
}

fn read_apiprism(ctx: &mut Ctx, s: Option<&Node>, o: &mut Ours) {
    const P: &str = "apiprism";
    o.ap_listen = get(ctx, s, P, "listen", |c, n, k| c.socket_addrs(n, k));
    o.ap_endpoints = get(ctx, s, P, "endpoints", host_ports);
    o.ap_admin = get(ctx, s, P, "admin", |c, n, k| c.socket_addr(n, k));
    o.ap_dial_timeout = get(ctx, s, P, "dialTimeout", |c, n, k| c.duration(n, k));
    o.ap_tls_server_name = get(ctx, s, P, "tlsServerName", name);
    o.ap_cluster_ca_file = get(ctx, s, P, "clusterCAFile", path);
    o.ap_max_connections = get(ctx, s, P, "maxConnections", connection_limit);
    o.ap_max_per_client = get(ctx, s, P, "maxConnectionsPerClient", connection_limit);
    let hc = section(ctx, s, "healthCheck", "apiprism.healthCheck", HEALTH_KEYS);
    const H: &str = "apiprism.healthCheck";
    o.ap_hc_interval = get(ctx, hc, H, "interval", |c, n, k| c.duration(n, k));
    o.ap_hc_timeout = get(ctx, hc, H, "timeout", |c, n, k| c.duration(n, k));
    o.ap_hc_fall = get(ctx, hc, H, "fall", count);
    o.ap_hc_rise = get(ctx, hc, H, "rise", count);
}

fn read_meshd(ctx: &mut Ctx, s: Option<&Node>, o: &mut Ours) {
    const P: &str = "meshd";
    o.m_interface = get(ctx, s, P, "interface", |c, n, k| {
        c.parsed(n, k, parse_ifname)
    });
    o.m_listen_port = get(ctx, s, P, "listenPort", |c, n, k| c.port(n, k));
    o.m_mtu = get(ctx, s, P, "mtu", read_mtu);
    o.m_backend = get(ctx, s, P, "backend", |c, n, k| {
        c.parsed(n, k, |v| match v {
            "kernel" => Ok(Backend::Kernel),
            "userspace" => Ok(Backend::Userspace),
            "auto" => Ok(Backend::Auto),
            _ => Err(format!(
                "unknown backend `{v}`: expected kernel, userspace or auto"
            )),
        })
    });
    o.m_private_key_file = get(ctx, s, P, "privateKeyFile", path);
    o.m_addresses = get(ctx, s, P, "addresses", |c, n, k| c.ipnets(n, k));
    o.m_location = get(ctx, s, P, "location", name);
    o.m_topology = get(ctx, s, P, "topology", |c, n, k| {
        c.parsed(n, k, |v| match v {
            "full" => Ok(Topology::Full),
            "location" => Ok(Topology::Location),
            _ => Err(format!("unknown topology `{v}`: expected full or location")),
        })
    });
    o.m_gateway = get(ctx, s, P, "gateway", |c, n, k| c.parsed(n, k, gateway_pin));
    o.m_peers = get(ctx, s, P, "peers", |c, n, k| c.list(n, k, read_peer));
    o.m_bypass = get(ctx, s, P, "allowDownPeerBypass", |c, n, k| c.boolean(n, k));
    o.m_advertise = get(ctx, s, P, "advertiseKubernetesNetworks", |c, n, k| {
        c.boolean(n, k)
    });
    o.m_harvest = get(ctx, s, P, "harvestExtraEndpoints", |c, n, k| {
        c.boolean(n, k)
    });
    o.m_extra_endpoints = get(ctx, s, P, "extraAnnouncedEndpoints", |c, n, k| {
        c.socket_addrs(n, k)
    });
    o.m_kubespan_compat = get(ctx, s, P, "kubespanCompat", |c, n, k| c.boolean(n, k));
    o.m_clamp_mss = get(ctx, s, P, "clampMSS", |c, n, k| c.boolean(n, k));
    o.m_admin = get(ctx, s, P, "admin", |c, n, k| c.socket_addr(n, k));
    o.m_relay = get(ctx, s, P, "relay", |c, n, k| {
        c.parsed(n, k, |v| match v {
            "auto" => Ok(crate::model::RelayMode::Auto),
            "never" => Ok(crate::model::RelayMode::Never),
            _ => Err(format!("unknown relay mode `{v}`: expected auto or never")),
        })
    });
    o.m_relays = get(ctx, s, P, "relays", |c, n, k| {
        c.list(n, k, |c, item, k| c.parsed(item, k, public_key))
    });
    let disc = section(ctx, s, "discovery", "meshd.discovery", DISCOVERY_KEYS);
    o.m_discovery_ca_file = get(ctx, disc, "meshd.discovery", "caFile", path);
    o.m_discovery_endpoint_cas = get(ctx, disc, "meshd.discovery", "endpoints", |c, n, k| {
        c.list(n, k, read_endpoint_ca)
    });
    let trust = section(ctx, s, "trust", "meshd.trust", TRUST_KEYS);
    let min = section(
        ctx,
        trust,
        "minPrefixLength",
        "meshd.trust.minPrefixLength",
        MIN_PREFIX_KEYS,
    );
    let bits = |max: u64| {
        move |c: &mut Ctx, n: &Node, k: &str| {
            c.uint(n, k, 0, max).and_then(|v| u8::try_from(v).ok())
        }
    };
    o.m_trust_min_v4 = get(ctx, min, "meshd.trust.minPrefixLength", "ipv4", bits(32));
    o.m_trust_min_v6 = get(ctx, min, "meshd.trust.minPrefixLength", "ipv6", bits(128));
    let filters = section(ctx, s, "filters", "meshd.filters", FILTER_KEYS);
    o.m_filters = get(ctx, filters, "meshd.filters", "endpoints", |c, n, k| {
        c.list(n, k, |c, item, k| c.parsed(item, k, FilterRule::parse))
    });
    o.m_exclude = get(
        ctx,
        filters,
        "meshd.filters",
        "excludeAdvertisedNetworks",
        |c, n, k| c.ipnets(n, k),
    );
}

/// A Linux interface name: 1-15 bytes, no `/`, whitespace or `:`.
fn parse_ifname(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 15
        || s.chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Err(format!(
            "invalid interface name `{s}`: expected 1-15 characters without `/`, `:` or spaces"
        ))
    } else {
        Ok(s.to_owned())
    }
}

fn read_mtu(ctx: &mut Ctx, n: &Node, key: &str) -> Option<Mtu> {
    match &n.value {
        Value::Str(s) if s == "auto" => Some(Mtu::Auto),
        Value::Int(_) => ctx
            .uint(n, key, 1280, 65535)
            .and_then(|v| u16::try_from(v).ok())
            .map(Mtu::Fixed),
        _ => {
            ctx.issue(
                n,
                IssueKind::Type,
                format!("`{key}`: expected a number (1280-65535) or `auto`"),
            );
            None
        }
    }
}

/// `{endpoint, caFile}`: both required.
fn read_endpoint_ca(ctx: &mut Ctx, n: &Node, key: &str) -> Option<EndpointCa> {
    if !ctx.check_keys(n, key, ENDPOINT_CA_KEYS) {
        if n.is_null() {
            ctx.issue(
                n,
                IssueKind::Type,
                format!("`{key}`: expected a mapping with endpoint and caFile"),
            );
        }
        return None;
    }
    let field = |ctx: &mut Ctx, name: &str| {
        let node = n.get(name).filter(|v| !v.is_null());
        if node.is_none() {
            ctx.issue(
                n,
                IssueKind::Value,
                format!("`{key}`: `{name}` is required"),
            );
        }
        node
    };
    let endpoint = field(ctx, "endpoint").and_then(|v| ctx.string(v, &format!("{key}.endpoint")));
    let ca_file = field(ctx, "caFile").and_then(|v| path(ctx, v, &format!("{key}.caFile")));
    Some(EndpointCa {
        endpoint: endpoint?,
        ca_file: ca_file?,
    })
}

fn read_peer(ctx: &mut Ctx, n: &Node, key: &str) -> Option<Peer> {
    if !ctx.check_keys(n, key, PEER_KEYS) {
        if n.is_null() {
            ctx.issue(
                n,
                IssueKind::Type,
                format!("`{key}`: expected a mapping with name and publicKey"),
            );
        }
        return None;
    }
    let need = |ctx: &mut Ctx, field: &str| {
        let node = n.get(field).filter(|v| !v.is_null());
        if node.is_none() {
            ctx.issue(
                n,
                IssueKind::Value,
                format!("`{key}`: `{field}` is required"),
            );
        }
        node
    };
    let name_node = need(ctx, "name");
    let key_node = need(ctx, "publicKey");
    let peer_name = name_node.and_then(|v| name(ctx, v, &format!("{key}.name")));
    let public_key = key_node.and_then(|v| ctx.parsed(v, &format!("{key}.publicKey"), public_key));
    let opt = |field: &str| {
        n.get(field)
            .filter(|v| !v.is_null())
            .map(|v| (v, format!("{key}.{field}")))
    };
    let endpoints = match opt("endpoints") {
        Some((v, k)) => host_ports(ctx, v, &k),
        None => Some(Vec::new()),
    };
    let allowed_ips = match opt("allowedIPs") {
        Some((v, k)) => ctx.ipnets(v, &k),
        None => Some(Vec::new()),
    };
    let location = match opt("location") {
        Some((v, k)) => name(ctx, v, &k).map(Some),
        None => Some(None),
    };
    let gateway = match opt("gateway") {
        Some((v, k)) => ctx.parsed(v, &k, gateway_pin),
        None => Some(GatewayPin::Auto),
    };
    Some(Peer {
        name: peer_name?,
        public_key: public_key?,
        endpoints: endpoints?,
        allowed_ips: allowed_ips?,
        location: location?,
        gateway: gateway?,
    })
}

fn read_dnslocal(ctx: &mut Ctx, s: Option<&Node>, o: &mut Ours) {
    const P: &str = "dnslocal";
    o.d_listen = get(ctx, s, P, "listen", |c, n, k| c.socket_addrs(n, k));
    o.d_cluster_domain = get(ctx, s, P, "clusterDomain", |c, n, k| {
        c.parsed(n, k, |v| {
            if parse::is_hostname(v) {
                Ok(v.trim_end_matches('.').to_owned())
            } else {
                Err(format!("invalid domain `{v}`"))
            }
        })
    });
    o.d_cluster_dns = get(ctx, s, P, "clusterDNS", dns_servers);
    o.d_upstreams = get(ctx, s, P, "upstreams", dns_servers);
    o.d_admin = get(ctx, s, P, "admin", |c, n, k| c.socket_addr(n, k));
    o.d_client_rate = get(ctx, s, P, "clientRate", |c, n, k| {
        c.uint(n, k, 0, 100_000_000)
            .and_then(|v| u32::try_from(v).ok())
    });
    o.d_forward = get(ctx, s, P, "forward", |c, n, k| c.list(n, k, read_forward));
    o.d_intercept_cluster_dns = get(ctx, s, P, "interceptClusterDNS", |c, n, k| c.boolean(n, k));
    o.d_cluster_zone = get(ctx, s, P, "clusterZone", |c, n, k| {
        c.parsed(n, k, |v| match v {
            "forward" => Ok(crate::model::ClusterZone::Forward),
            "kubernetes" => Ok(crate::model::ClusterZone::Kubernetes),
            _ => Err(format!(
                "unknown clusterZone `{v}`: expected forward or kubernetes"
            )),
        })
    });
    o.d_cluster_zone_ttl = get(ctx, s, P, "clusterZoneTTL", |c, n, k| c.duration(n, k));
    o.d_kubeconfig = get(ctx, s, P, "kubeconfig", path);
    o.d_topology_zone = get(ctx, s, P, "topologyZone", |c, n, k| {
        c.parsed(n, k, |v| {
            if !v.is_empty()
                && v.len() <= 63
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                Ok(v.to_owned())
            } else {
                Err(format!(
                    "invalid topology zone `{v}`: expected a label value"
                ))
            }
        })
    });
    let iface = section(ctx, s, "interface", "dnslocal.interface", INTERFACE_KEYS);
    o.d_if_name = get(ctx, iface, "dnslocal.interface", "name", |c, n, k| {
        c.parsed(n, k, parse_ifname)
    });
    o.d_if_create = get(ctx, iface, "dnslocal.interface", "create", |c, n, k| {
        c.boolean(n, k)
    });
    let cache = section(ctx, s, "cache", "dnslocal.cache", CACHE_KEYS);
    const C: &str = "dnslocal.cache";
    o.d_cache_size = get(ctx, cache, C, "size", |c, n, k| {
        c.uint(n, k, 0, 100_000_000)
            .and_then(|v| usize::try_from(v).ok())
    });
    o.d_cache_max_ttl = get(ctx, cache, C, "maxTTL", |c, n, k| c.duration(n, k));
    o.d_cache_negative_ttl = get(ctx, cache, C, "negativeTTL", |c, n, k| c.duration(n, k));
    o.d_cache_serve_stale = get(ctx, cache, C, "serveStale", |c, n, k| c.duration(n, k));
    o.d_cache_prefetch = get(ctx, cache, C, "prefetch", |c, n, k| c.boolean(n, k));
    o.d_cache_max_memory = get(ctx, cache, C, "maxMemory", |c, n, k| match &n.value {
        Value::Int(_) => c.uint(n, k, MIN_CACHE_MEMORY, MAX_CACHE_MEMORY),
        _ => c.parsed(n, k, parse_memory),
    });
}

/// DNS servers: `ip` (port 53) or `ip:port`.
fn dns_servers(ctx: &mut Ctx, n: &Node, key: &str) -> Option<Vec<std::net::SocketAddr>> {
    ctx.list(n, key, |c, item, k| {
        c.parsed(item, k, |s| parse::parse_socket_addr_default(s, 53))
    })
}

/// `dnslocal.cache.maxMemory` bounds: 1 MiB to 64 GiB.
const MIN_CACHE_MEMORY: u64 = 1 << 20;
const MAX_CACHE_MEMORY: u64 = 64 << 30;

/// A byte size: a number of bytes, or with a unit `KiB`, `MiB`, `GiB` (also `Ki`, `Mi`, `Gi`).
fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let shift = match unit.trim() {
        "" => 0,
        "Ki" | "KiB" => 10,
        "Mi" | "MiB" => 20,
        "Gi" | "GiB" => 30,
        other => {
            return Err(format!(
                "unknown unit `{other}`: expected bytes, or `KiB`, `MiB`, `GiB` (e.g. `64MiB`)"
            ));
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{t}` is not a size (e.g. `64MiB`)"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .filter(|b| (MIN_CACHE_MEMORY..=MAX_CACHE_MEMORY).contains(b))
        .ok_or_else(|| format!("`{t}` out of range: expected 1MiB-64GiB"))?;
    Ok(bytes)
}

/// One `dnslocal.forward` entry: `{zone: corp.example, to: ["10.0.0.53", "10.0.0.54:5353"]}`.
fn read_forward(ctx: &mut Ctx, n: &Node, key: &str) -> Option<crate::model::DnsForward> {
    if !ctx.check_keys(n, key, FORWARD_KEYS) {
        return None;
    }
    let zone_node = n.get("zone").filter(|v| !v.is_null());
    let to_node = n.get("to").filter(|v| !v.is_null());
    let (Some(zone_node), Some(to_node)) = (zone_node, to_node) else {
        ctx.issue(
            n,
            IssueKind::Value,
            format!(
                "`{key}`: expected `zone` and `to` (e.g. {{zone: corp.example, to: [10.0.0.53]}})"
            ),
        );
        return None;
    };
    let zone = ctx.parsed(zone_node, &format!("{key}.zone"), |s| {
        let z = s.trim_end_matches('.').to_ascii_lowercase();
        if parse::is_hostname(&z) {
            Ok(z)
        } else {
            Err(format!("`{s}` is not a DNS zone name"))
        }
    });
    let to = dns_servers(ctx, to_node, &format!("{key}.to"));
    if to.as_ref().is_some_and(Vec::is_empty) {
        ctx.issue(to_node, IssueKind::Value, format!("`{key}.to`: no server"));
        return None;
    }
    Some(crate::model::DnsForward {
        zone: zone?,
        to: to?,
    })
}

#[cfg(test)]
mod memory_tests {
    use super::parse_memory;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_memory("64MiB"), Ok(64 << 20));
        assert_eq!(parse_memory("2Gi"), Ok(2 << 30));
        assert_eq!(parse_memory("1048576"), Ok(1 << 20));
        assert!(parse_memory("64MB").is_err());
        assert!(parse_memory("1KiB").is_err(), "below 1 MiB");
        assert!(parse_memory("99999999999GiB").is_err());
    }
}
