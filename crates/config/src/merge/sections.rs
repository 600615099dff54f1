//! The per-daemon parts of the merge.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ipnet::IpNet;

use super::{Merger, field_of};
use crate::error::IssueKind;
use crate::filter::EndpointFilter;
use crate::hybridnet::Ours;
use crate::model::{
    APIPRISM_ALT_PORT, ApiprismConfig, ClusterConfig, DnsCache, DnsInterface, DnslocalConfig,
    HealthCheck, KUBEPRISM_PORT, MeshdConfig, Mtu,
};
use crate::parse::HostPort;
use crate::pos::Pos;
use crate::read::Ctx;
use crate::source::{Source, Sourced};
use crate::talos::TalosFacts;
use crate::ula::{ULA_KUBESPAN, ula_prefix};

pub fn apiprism(
    m: &mut Merger,
    t: &TalosFacts,
    o: &Ours,
    cluster: &ClusterConfig,
    d: &ApiprismConfig,
) -> ApiprismConfig {
    // Talos's own KubePrism owns 7445 when it is on: ours moves to 7455 so both can run.
    let moved: Sourced<Vec<SocketAddr>> = match &t.kube_prism {
        Some((Some(kp), source)) if kp.port == KUBEPRISM_PORT => {
            let listen = d
                .listen
                .iter()
                .map(|a| SocketAddr::new(a.ip(), APIPRISM_ALT_PORT))
                .collect();
            Some((
                listen,
                Source::derived(format!(
                    "{} (Talos KubePrism owns {KUBEPRISM_PORT})",
                    field_of(source)
                )),
            ))
        }
        _ => None,
    };
    let listen = m.first(
        "apiprism.listen",
        [o.ap_listen.clone(), moved],
        d.listen.clone(),
    );
    let endpoints = m.first("apiprism.endpoints", [o.ap_endpoints.clone()], Vec::new());
    let upstreams = upstreams(m, cluster, &endpoints);
    let tls_from_talos = match &t.kube_prism {
        Some((Some(kp), source)) => kp.tls_server_name.clone().map(|n| (n, source.clone())),
        _ => None,
    };
    ApiprismConfig {
        listen,
        endpoints,
        upstreams,
        admin: m.first("apiprism.admin", [o.ap_admin.clone()], d.admin),
        health_check: HealthCheck {
            interval: m.first(
                "apiprism.healthCheck.interval",
                [o.ap_hc_interval.clone()],
                d.health_check.interval,
            ),
            timeout: m.first(
                "apiprism.healthCheck.timeout",
                [o.ap_hc_timeout.clone()],
                d.health_check.timeout,
            ),
            fall: m.first(
                "apiprism.healthCheck.fall",
                [o.ap_hc_fall.clone()],
                d.health_check.fall,
            ),
            rise: m.first(
                "apiprism.healthCheck.rise",
                [o.ap_hc_rise.clone()],
                d.health_check.rise,
            ),
        },
        dial_timeout: m.first(
            "apiprism.dialTimeout",
            [o.ap_dial_timeout.clone()],
            d.dial_timeout,
        ),
        tls_server_name: m.optional(
            "apiprism.tlsServerName",
            [o.ap_tls_server_name.clone(), tls_from_talos],
        ),
        cluster_ca_file: m.first(
            "apiprism.clusterCAFile",
            [o.ap_cluster_ca_file.clone()],
            d.cluster_ca_file.clone(),
        ),
        max_connections: m.first(
            "apiprism.maxConnections",
            [o.ap_max_connections.clone()],
            d.max_connections,
        ),
        max_connections_per_client: m.first(
            "apiprism.maxConnectionsPerClient",
            [o.ap_max_per_client.clone()],
            d.max_connections_per_client,
        ),
    }
}

/// Control-plane endpoint, this node's API server (control planes only), then ours; no duplicates.
fn upstreams(m: &mut Merger, cluster: &ClusterConfig, endpoints: &[HostPort]) -> Vec<HostPort> {
    let mut list: Vec<(HostPort, Source)> = Vec::new();
    if let Some(ep) = &cluster.control_plane_endpoint {
        list.push((
            ep.clone(),
            m.sources.get("cluster.controlPlaneEndpoint").clone(),
        ));
    }
    if cluster.machine_type.is_control_plane() {
        let port_source = m.sources.get("cluster.localAPIServerPort").clone();
        let from = match port_source {
            Source::Default => {
                "machine.type (control plane) and the default API server port 6443".to_owned()
            }
            other => format!("machine.type (control plane) and {}", field_of(&other)),
        };
        list.push((
            HostPort {
                host: "localhost".into(),
                port: cluster.local_api_server_port,
            },
            Source::derived(from),
        ));
    }
    for (i, ep) in endpoints.iter().enumerate() {
        let source = match m.sources.get("apiprism.endpoints") {
            Source::HybridNet { origin, pos, .. } => Source::HybridNet {
                key: format!("apiprism.endpoints[{i}]"),
                origin: origin.clone(),
                pos: *pos,
            },
            other => other.clone(),
        };
        list.push((ep.clone(), source));
    }
    let mut out = Vec::new();
    for (ep, source) in list {
        if !out.contains(&ep) {
            m.sources
                .set(format!("apiprism.upstreams[{}]", out.len()), source);
            out.push(ep);
        }
    }
    out
}

fn pos_of(source: &Source) -> Option<Pos> {
    match source {
        Source::HybridNet { pos, .. } | Source::Talos { pos, .. } => Some(*pos),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
pub fn meshd(
    ctx: &mut Ctx,
    m: &mut Merger,
    t: &TalosFacts,
    o: &Ours,
    cluster: &ClusterConfig,
    data_dir: &Path,
    data_dir_source: &Source,
    d: &MeshdConfig,
) -> MeshdConfig {
    let talos_mtu = t.kubespan_mtu.clone().map(|(v, s)| (Mtu::Fixed(v), s));
    let mtu = m.first("meshd.mtu", [o.m_mtu.clone(), talos_mtu], d.mtu);
    if let Mtu::Fixed(v) = mtu
        && v < 1280
    {
        let pos = pos_of(m.sources.get("meshd.mtu"));
        ctx.issues.push(crate::error::Issue::new(
            &ctx.origin,
            pos,
            IssueKind::Value,
            format!("`meshd.mtu`: {v} is below the IPv6 minimum: expected 1280-65535"),
        ));
    }
    let key_file: Sourced<_> = match data_dir_source {
        Source::Default => None,
        _ => Some((data_dir.join("meshd.key"), Source::derived("dataDir"))),
    };
    let rules = m.first(
        "meshd.filters.endpoints",
        [o.m_filters.clone(), t.kubespan_filters.clone()],
        Vec::new(),
    );
    let endpoint_filter = match EndpointFilter::new(rules) {
        Ok(f) => f,
        Err(message) => {
            let pos = pos_of(m.sources.get("meshd.filters.endpoints"));
            let message = format!("`filters.endpoints`: {message}");
            ctx.issues.push(crate::error::Issue::new(
                &ctx.origin,
                pos,
                IssueKind::Value,
                message,
            ));
            EndpointFilter::default()
        }
    };
    let ula = cluster.id.as_ref().map(|id| {
        let from = field_of(m.sources.get("cluster.id"));
        (Some(ula_prefix(id, ULA_KUBESPAN)), Source::derived(from))
    });
    let kubespan_compat = m.first("meshd.kubespanCompat", [o.m_kubespan_compat.clone()], false);
    // KubeSpan-compatible mode listens where KubeSpan does, unless the port is set.
    let compat_port = kubespan_compat.then(|| (51820, Source::derived("meshd.kubespanCompat")));
    MeshdConfig {
        interface: m.first(
            "meshd.interface",
            [o.m_interface.clone()],
            d.interface.clone(),
        ),
        listen_port: m.first(
            "meshd.listenPort",
            [o.m_listen_port.clone(), compat_port],
            d.listen_port,
        ),
        mtu,
        backend: m.first("meshd.backend", [o.m_backend.clone()], d.backend),
        private_key_file: m.first(
            "meshd.privateKeyFile",
            [o.m_private_key_file.clone(), key_file],
            d.private_key_file.clone(),
        ),
        addresses: m.first("meshd.addresses", [o.m_addresses.clone()], Vec::new()),
        location: m.optional("meshd.location", [o.m_location.clone()]),
        topology: m.first("meshd.topology", [o.m_topology.clone()], d.topology),
        gateway: m.first("meshd.gateway", [o.m_gateway.clone()], d.gateway),
        peers: m.first("meshd.peers", [o.m_peers.clone()], Vec::new()),
        endpoint_filter,
        exclude_advertised_networks: m.first::<Vec<IpNet>>(
            "meshd.filters.excludeAdvertisedNetworks",
            [o.m_exclude.clone(), t.kubespan_exclude.clone()],
            Vec::new(),
        ),
        allow_down_peer_bypass: m.first(
            "meshd.allowDownPeerBypass",
            [o.m_bypass.clone(), t.kubespan_bypass.clone()],
            false,
        ),
        advertise_kubernetes_networks: m.first(
            "meshd.advertiseKubernetesNetworks",
            [o.m_advertise.clone(), t.kubespan_advertise.clone()],
            false,
        ),
        harvest_extra_endpoints: m.first(
            "meshd.harvestExtraEndpoints",
            [o.m_harvest.clone(), t.kubespan_harvest.clone()],
            false,
        ),
        extra_announced_endpoints: m.first(
            "meshd.extraAnnouncedEndpoints",
            [o.m_extra_endpoints.clone(), t.extra_endpoints.clone()],
            Vec::new(),
        ),
        kubespan_compat,
        clamp_mss: m.first("meshd.clampMSS", [o.m_clamp_mss.clone()], d.clamp_mss),
        ula_prefix: m.first("meshd.ulaPrefix", [ula], None),
        admin: m.first("meshd.admin", [o.m_admin.clone()], d.admin),
        discovery_ca_file: m.optional("meshd.discovery.caFile", [o.m_discovery_ca_file.clone()]),
        discovery_endpoint_cas: endpoint_cas(ctx, m, o, cluster),
        relay: m.first("meshd.relay", [o.m_relay.clone()], d.relay),
        relays: m.first("meshd.relays", [o.m_relays.clone()], d.relays.clone()),
        trust: crate::model::Trust {
            min_prefix_v4: m.first(
                "meshd.trust.minPrefixLength.ipv4",
                [o.m_trust_min_v4.clone()],
                d.trust.min_prefix_v4,
            ),
            min_prefix_v6: m.first(
                "meshd.trust.minPrefixLength.ipv6",
                [o.m_trust_min_v6.clone()],
                d.trust.min_prefix_v6,
            ),
        },
    }
}

/// `meshd.discovery.endpoints`: with discovery on, each must name a discovery endpoint in use (a typo
/// would otherwise leave that endpoint on the system bundle, silently).
fn endpoint_cas(
    ctx: &mut Ctx,
    m: &mut Merger,
    o: &Ours,
    cluster: &ClusterConfig,
) -> Vec<crate::model::EndpointCa> {
    let list = m.first(
        "meshd.discovery.endpoints",
        [o.m_discovery_endpoint_cas.clone()],
        Vec::new(),
    );
    let known = &cluster.discovery.endpoints;
    // With discovery off there is nothing to check against (the file may be shared by nodes).
    let checked = if cluster.discovery.enabled {
        list.as_slice()
    } else {
        &[]
    };
    for e in checked {
        if !known
            .iter()
            .any(|k| crate::model::same_endpoint(k, &e.endpoint))
        {
            let pos = pos_of(m.sources.get("meshd.discovery.endpoints"));
            let message = format!(
                "`meshd.discovery.endpoints`: `{}` is not a discovery endpoint in use (expected one of {known:?})",
                e.endpoint
            );
            ctx.issues.push(crate::error::Issue::new(
                &ctx.origin,
                pos,
                IssueKind::Value,
                message,
            ));
        }
    }
    list
}

/// The 10th address of `net` (kube-dns's conventional ClusterIP), if the prefix holds it.
pub fn tenth_address(net: &IpNet) -> Option<IpAddr> {
    match net {
        IpNet::V4(n) => {
            let base = u32::from(n.network()).checked_add(10)?;
            let addr = std::net::Ipv4Addr::from(base);
            n.contains(&addr).then_some(IpAddr::V4(addr))
        }
        IpNet::V6(n) => {
            let base = u128::from(n.network()).checked_add(10)?;
            let addr = std::net::Ipv6Addr::from(base);
            n.contains(&addr).then_some(IpAddr::V6(addr))
        }
    }
}

/// Where the cluster zone goes when nothing says it in HybridNetConfig: the kubelet's `clusterDNS`,
/// minus dnslocal's own listen addresses (an own address is never a cluster-zone forwarder: on Talos
/// set up as `docs/talos.md` says, `machine.kubelet.clusterDNS` *is* dnslocal), else kube-dns
/// derived from the service subnet. Dropping an own address is reported in `warnings`.
fn cluster_dns_from_talos(
    t: &TalosFacts,
    listen: &[SocketAddr],
    derived: Sourced<Vec<SocketAddr>>,
    warnings: &mut Vec<String>,
) -> Sourced<Vec<SocketAddr>> {
    let (dns, source) = t.cluster_dns.clone()?;
    let own = |a: &SocketAddr| listen.contains(a);
    if !dns.iter().any(own) {
        return Some((dns, source));
    }
    let dropped: Vec<String> = dns
        .iter()
        .filter(|a| own(a))
        .map(ToString::to_string)
        .collect();
    let kept: Vec<SocketAddr> = dns.iter().filter(|a| !own(a)).copied().collect();
    let dropped = dropped.join(", ");
    if !kept.is_empty() {
        warnings.push(format!(
            "{source} lists {dropped}, dnslocal's own listen address: the cluster zone goes to the others only"
        ));
        return Some((kept, source));
    }
    match derived {
        Some((dns, from)) => {
            let field = field_of(&from);
            warnings.push(format!(
                "{source} points at dnslocal itself ({dropped}): the cluster zone goes to kube-dns at the 10th address of {field} instead"
            ));
            Some((
                dns,
                Source::derived(format!(
                    "{field} (the kubelet's clusterDNS, {}, is dnslocal itself)",
                    field_of(&source)
                )),
            ))
        }
        None => {
            warnings.push(format!(
                "{source} points at dnslocal itself ({dropped}) and no service subnet is known: set dnslocal.clusterDNS to kube-dns's ClusterIP (using the default until then)"
            ));
            None
        }
    }
}

pub fn dnslocal(
    ctx: &mut Ctx,
    m: &mut Merger,
    t: &TalosFacts,
    o: &Ours,
    d: &DnslocalConfig,
    warnings: &mut Vec<String>,
) -> DnslocalConfig {
    let derived_dns = match &t.service_subnets {
        Some((nets, source)) if !nets.is_empty() => match tenth_address(&nets[0]) {
            Some(ip) => Some((
                vec![SocketAddr::new(ip, 53)],
                Source::derived(format!("{}[0]", field_of(source))),
            )),
            None => {
                let message = format!(
                    "service subnet {} is too small to hold the kube-dns address (its 10th)",
                    nets[0]
                );
                ctx.issues.push(crate::error::Issue::new(
                    &ctx.origin,
                    pos_of(source),
                    IssueKind::Value,
                    message,
                ));
                None
            }
        },
        _ => None,
    };
    let nameservers = t.nameservers.clone().map(|(ips, s)| {
        (
            ips.into_iter().map(|ip| SocketAddr::new(ip, 53)).collect(),
            s,
        )
    });
    let listen = m.first("dnslocal.listen", [o.d_listen.clone()], d.listen.clone());
    if let Some((dns, source)) = &o.d_cluster_dns
        && let Some(own) = dns.iter().find(|a| listen.contains(a))
    {
        ctx.issues.push(crate::error::Issue::new(
            &ctx.origin,
            pos_of(source),
            IssueKind::Value,
            format!(
                "`dnslocal.clusterDNS`: {own} is one of dnslocal's own listen addresses (the cluster zone would loop): expected kube-dns's ClusterIP"
            ),
        ));
    }
    let talos_dns = cluster_dns_from_talos(t, &listen, derived_dns.clone(), warnings);
    let cluster_dns = m.first(
        "dnslocal.clusterDNS",
        [o.d_cluster_dns.clone(), talos_dns, derived_dns.clone()],
        d.cluster_dns.clone(),
    );
    let intercept_cluster_dns =
        intercepted_cluster_ip(ctx, m, t, o, &listen, &cluster_dns, derived_dns);
    DnslocalConfig {
        listen,
        interface: DnsInterface {
            name: m.first(
                "dnslocal.interface.name",
                [o.d_if_name.clone()],
                d.interface.name.clone(),
            ),
            create: m.first(
                "dnslocal.interface.create",
                [o.d_if_create.clone()],
                d.interface.create,
            ),
        },
        cluster_domain: m.first(
            "dnslocal.clusterDomain",
            [o.d_cluster_domain.clone(), t.dns_domain.clone()],
            d.cluster_domain.clone(),
        ),
        cluster_dns,
        upstreams: m.first(
            "dnslocal.upstreams",
            [o.d_upstreams.clone(), nameservers],
            Vec::new(),
        ),
        cache: DnsCache {
            size: m.first(
                "dnslocal.cache.size",
                [o.d_cache_size.clone()],
                d.cache.size,
            ),
            max_ttl: m.first(
                "dnslocal.cache.maxTTL",
                [o.d_cache_max_ttl.clone()],
                d.cache.max_ttl,
            ),
            negative_ttl: m.first(
                "dnslocal.cache.negativeTTL",
                [o.d_cache_negative_ttl.clone()],
                d.cache.negative_ttl,
            ),
            serve_stale: m.first(
                "dnslocal.cache.serveStale",
                [o.d_cache_serve_stale.clone()],
                d.cache.serve_stale,
            ),
            prefetch: m.first(
                "dnslocal.cache.prefetch",
                [o.d_cache_prefetch.clone()],
                d.cache.prefetch,
            ),
            max_memory: m.first(
                "dnslocal.cache.maxMemory",
                [o.d_cache_max_memory.clone()],
                d.cache.max_memory,
            ),
        },
        admin: m.first("dnslocal.admin", [o.d_admin.clone()], d.admin),
        client_rate: m.first(
            "dnslocal.clientRate",
            [o.d_client_rate.clone()],
            d.client_rate,
        ),
        forward: m.first("dnslocal.forward", [o.d_forward.clone()], d.forward.clone()),
        intercept_cluster_dns,
        cluster_zone: m.first(
            "dnslocal.clusterZone",
            [o.d_cluster_zone.clone()],
            d.cluster_zone,
        ),
        cluster_zone_ttl: m.first(
            "dnslocal.clusterZoneTTL",
            [o.d_cluster_zone_ttl.clone()],
            d.cluster_zone_ttl,
        ),
        kubeconfig: m.optional("dnslocal.kubeconfig", [o.d_kubeconfig.clone()]),
        topology_zone: m.optional("dnslocal.topologyZone", [o.d_topology_zone.clone()]),
    }
}

/// With `dnslocal.interceptClusterDNS`, the kube-dns ClusterIP pods ask (the kubelet's `clusterDNS` when it
/// is not dnslocal's own listen address, else the 10th address of the service subnet, else 10.96.0.10).
/// The cluster zone must then go elsewhere: a `clusterDNS` equal to it is an error (it would come back to us).
fn intercepted_cluster_ip(
    ctx: &mut Ctx,
    m: &mut Merger,
    t: &TalosFacts,
    o: &Ours,
    listen: &[SocketAddr],
    cluster_dns: &[SocketAddr],
    derived: Sourced<Vec<SocketAddr>>,
) -> Option<IpAddr> {
    let on = m.first(
        "dnslocal.interceptClusterDNS",
        [o.d_intercept_cluster_dns.clone()],
        false,
    );
    if !on {
        return None;
    }
    let kubelet = t.cluster_dns.clone().and_then(|(dns, s)| {
        let kept: Vec<SocketAddr> = dns.into_iter().filter(|a| !listen.contains(a)).collect();
        (!kept.is_empty()).then_some((kept, s))
    });
    let ip = [kubelet, derived]
        .into_iter()
        .flatten()
        .find_map(|(dns, _)| dns.first().map(SocketAddr::ip))
        .unwrap_or(IpAddr::from([10, 96, 0, 10]));
    if cluster_dns.iter().any(|a| a.ip() == ip) {
        let source = o.d_intercept_cluster_dns.clone().map(|(_, s)| s);
        ctx.issues.push(crate::error::Issue::new(
            &ctx.origin,
            source.as_ref().and_then(pos_of),
            IssueKind::Value,
            format!(
                "`dnslocal.interceptClusterDNS`: dnslocal takes over kube-dns's ClusterIP {ip}, so `dnslocal.clusterDNS` cannot be {ip} (the cluster zone would come back to us): set it to a second Service in front of CoreDNS (NodeLocal DNSCache's `kube-dns-upstream`) or to CoreDNS's pod addresses"
            ),
        ));
    }
    Some(ip)
}
