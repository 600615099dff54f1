//! `check-config` output: every effective value with its source.
//!
//! JSON shape (flat, one entry per key, keys in the config's camelCase dotted form):
//! `{"apiprism.listen": {"value": ["127.0.0.1:7445"], "source": "default"}, ...}`. Durations are
//! strings (`"1s"`), addresses strings, absent optional values `null`. Talos conflicts that were
//! resolved are listed under the key `"warnings"` as `{"value": [...], "source": "loader"}`.

use serde_json::{Value, json};

use crate::duration::format_duration;
use crate::model::{Backend, MachineType, Mtu, Topology};
use crate::{Config, Daemon};

fn strings<T: ToString>(items: &[T]) -> Value {
    Value::Array(items.iter().map(|i| Value::String(i.to_string())).collect())
}

fn opt<T: ToString>(item: Option<&T>) -> Value {
    item.map_or(Value::Null, |i| Value::String(i.to_string()))
}

fn shared(c: &Config) -> Vec<(String, Value)> {
    let k = &c.cluster;
    let machine = match k.machine_type {
        MachineType::ControlPlane => "controlplane",
        MachineType::Worker => "worker",
        MachineType::Unknown => "unknown",
    };
    vec![
        ("stateDir".into(), json!(c.state_dir.display().to_string())),
        ("dataDir".into(), json!(c.data_dir.display().to_string())),
        (
            "allowNonLocalListen".into(),
            json!(c.allow_non_local_listen),
        ),
        ("cluster.machineType".into(), json!(machine)),
        (
            "cluster.controlPlaneEndpoint".into(),
            opt(k.control_plane_endpoint.as_ref()),
        ),
        (
            "cluster.localAPIServerPort".into(),
            json!(k.local_api_server_port),
        ),
        ("cluster.name".into(), opt(k.name.as_ref())),
        ("cluster.podSubnets".into(), strings(&k.pod_subnets)),
        ("cluster.serviceSubnets".into(), strings(&k.service_subnets)),
        ("cluster.id".into(), opt(k.id.as_ref())),
        (
            "cluster.secret".into(),
            if k.secret.is_some() {
                json!("<redacted>")
            } else {
                Value::Null
            },
        ),
        (
            "cluster.discovery.enabled".into(),
            json!(k.discovery.enabled),
        ),
        (
            "cluster.discovery.endpoints".into(),
            strings(&k.discovery.endpoints),
        ),
        (
            "cluster.discovery.kubernetesRegistry".into(),
            json!(k.discovery.kubernetes_registry),
        ),
        (
            "cluster.kubePrism".into(),
            k.kube_prism.as_ref().map_or(
                json!("disabled"),
                |p| json!({"port": p.port, "tlsServerName": p.tls_server_name}),
            ),
        ),
        (
            "cluster.hostDNS".into(),
            json!({"enabled": k.host_dns.enabled, "forwardKubeDNSToHost": k.host_dns.forward_kube_dns_to_host}),
        ),
        ("cluster.nameservers".into(), strings(&k.nameservers)),
        ("cluster.kubespanEnabled".into(), json!(k.kubespan_enabled)),
    ]
}

fn apiprism(c: &Config) -> Vec<(String, Value)> {
    let a = &c.apiprism;
    let mut out = vec![
        ("apiprism.listen".into(), strings(&a.listen)),
        ("apiprism.endpoints".into(), strings(&a.endpoints)),
    ];
    for (i, u) in a.upstreams.iter().enumerate() {
        out.push((format!("apiprism.upstreams[{i}]"), json!(u.to_string())));
    }
    out.extend([
        ("apiprism.admin".into(), json!(a.admin.to_string())),
        (
            "apiprism.healthCheck.interval".into(),
            json!(format_duration(a.health_check.interval)),
        ),
        (
            "apiprism.healthCheck.timeout".into(),
            json!(format_duration(a.health_check.timeout)),
        ),
        (
            "apiprism.healthCheck.fall".into(),
            json!(a.health_check.fall),
        ),
        (
            "apiprism.healthCheck.rise".into(),
            json!(a.health_check.rise),
        ),
        (
            "apiprism.dialTimeout".into(),
            json!(format_duration(a.dial_timeout)),
        ),
        (
            "apiprism.tlsServerName".into(),
            opt(a.tls_server_name.as_ref()),
        ),
        (
            "apiprism.clusterCAFile".into(),
            json!(a.cluster_ca_file.display().to_string()),
        ),
        ("apiprism.maxConnections".into(), json!(a.max_connections)),
        (
            "apiprism.maxConnectionsPerClient".into(),
            json!(a.max_connections_per_client),
        ),
    ]);
    out
}

fn meshd(c: &Config) -> Vec<(String, Value)> {
    let m = &c.meshd;
    let mtu = match m.mtu {
        Mtu::Fixed(v) => json!(v),
        Mtu::Auto => json!("auto"),
    };
    let backend = match m.backend {
        Backend::Kernel => "kernel",
        Backend::Userspace => "userspace",
        Backend::Auto => "auto",
    };
    let topology = match m.topology {
        Topology::Full => "full",
        Topology::Location => "location",
    };
    let peers: Vec<Value> = m
        .peers
        .iter()
        .map(|p| {
            json!({"name": p.name, "publicKey": p.public_key.to_string(), "endpoints": strings(&p.endpoints),
                   "allowedIPs": strings(&p.allowed_ips), "location": p.location, "gateway": p.gateway.as_str()})
        })
        .collect();
    vec![
        ("meshd.interface".into(), json!(m.interface)),
        ("meshd.listenPort".into(), json!(m.listen_port)),
        ("meshd.mtu".into(), mtu),
        ("meshd.backend".into(), json!(backend)),
        (
            "meshd.privateKeyFile".into(),
            json!(m.private_key_file.display().to_string()),
        ),
        ("meshd.addresses".into(), strings(&m.addresses)),
        ("meshd.location".into(), opt(m.location.as_ref())),
        ("meshd.topology".into(), json!(topology)),
        ("meshd.gateway".into(), json!(m.gateway.as_str())),
        ("meshd.peers".into(), Value::Array(peers)),
        (
            "meshd.filters.endpoints".into(),
            strings(&m.endpoint_filter.rules),
        ),
        (
            "meshd.filters.excludeAdvertisedNetworks".into(),
            strings(&m.exclude_advertised_networks),
        ),
        (
            "meshd.allowDownPeerBypass".into(),
            json!(m.allow_down_peer_bypass),
        ),
        (
            "meshd.advertiseKubernetesNetworks".into(),
            json!(m.advertise_kubernetes_networks),
        ),
        (
            "meshd.harvestExtraEndpoints".into(),
            json!(m.harvest_extra_endpoints),
        ),
        (
            "meshd.extraAnnouncedEndpoints".into(),
            strings(&m.extra_announced_endpoints),
        ),
        ("meshd.kubespanCompat".into(), json!(m.kubespan_compat)),
        ("meshd.clampMSS".into(), json!(m.clamp_mss)),
        (
            "meshd.trust.minPrefixLength.ipv4".into(),
            json!(m.trust.min_prefix_v4),
        ),
        (
            "meshd.trust.minPrefixLength.ipv6".into(),
            json!(m.trust.min_prefix_v6),
        ),
        ("meshd.ulaPrefix".into(), opt(m.ula_prefix.as_ref())),
        ("meshd.admin".into(), json!(m.admin.to_string())),
        (
            "meshd.discovery.caFile".into(),
            opt(m.discovery_ca_file.as_ref().map(|p| p.display()).as_ref()),
        ),
        (
            "meshd.discovery.endpoints".into(),
            Value::Array(
                m.discovery_endpoint_cas
                    .iter()
                    .map(|e| json!({"endpoint": e.endpoint, "caFile": e.ca_file.display().to_string()}))
                    .collect(),
            ),
        ),
        (
            "meshd.relay".into(),
            json!(match m.relay {
                crate::model::RelayMode::Auto => "auto",
                crate::model::RelayMode::Never => "never",
            }),
        ),
        ("meshd.relays".into(), strings(&m.relays)),
    ]
}

fn dnslocal(c: &Config) -> Vec<(String, Value)> {
    let d = &c.dnslocal;
    vec![
        ("dnslocal.listen".into(), strings(&d.listen)),
        ("dnslocal.interface.name".into(), json!(d.interface.name)),
        (
            "dnslocal.interface.create".into(),
            json!(d.interface.create),
        ),
        ("dnslocal.clusterDomain".into(), json!(d.cluster_domain)),
        ("dnslocal.clusterDNS".into(), strings(&d.cluster_dns)),
        ("dnslocal.upstreams".into(), strings(&d.upstreams)),
        ("dnslocal.cache.size".into(), json!(d.cache.size)),
        (
            "dnslocal.cache.maxTTL".into(),
            json!(format_duration(d.cache.max_ttl)),
        ),
        (
            "dnslocal.cache.negativeTTL".into(),
            json!(format_duration(d.cache.negative_ttl)),
        ),
        (
            "dnslocal.cache.serveStale".into(),
            json!(format_duration(d.cache.serve_stale)),
        ),
        ("dnslocal.cache.prefetch".into(), json!(d.cache.prefetch)),
        ("dnslocal.cache.maxMemory".into(), json!(d.cache.max_memory)),
        ("dnslocal.admin".into(), json!(d.admin.to_string())),
        ("dnslocal.clientRate".into(), json!(d.client_rate)),
        (
            "dnslocal.interceptClusterDNS".into(),
            json!(
                d.intercept_cluster_dns
                    .map_or(Value::Bool(false), |ip| json!(ip.to_string()))
            ),
        ),
        (
            "dnslocal.clusterZone".into(),
            json!(match d.cluster_zone {
                crate::model::ClusterZone::Forward => "forward",
                crate::model::ClusterZone::Kubernetes => "kubernetes",
            }),
        ),
        (
            "dnslocal.clusterZoneTTL".into(),
            json!(format_duration(d.cluster_zone_ttl)),
        ),
        (
            "dnslocal.kubeconfig".into(),
            d.kubeconfig
                .as_ref()
                .map_or(Value::Null, |p| json!(p.display().to_string())),
        ),
        (
            "dnslocal.topologyZone".into(),
            d.topology_zone.as_ref().map_or(Value::Null, |z| json!(z)),
        ),
        (
            "dnslocal.forward".into(),
            json!(
                d.forward
                    .iter()
                    .map(|f| json!({"zone": f.zone, "to": strings(&f.to)}))
                    .collect::<Vec<_>>()
            ),
        ),
    ]
}

/// The shared keys plus the daemon's section (all sections for `None`).
pub fn entries(c: &Config, daemon: Option<Daemon>) -> Vec<(String, Value, String)> {
    let mut all = shared(c);
    for d in Daemon::ALL {
        if daemon.is_none_or(|want| want == d) {
            all.extend(match d {
                Daemon::Apiprism => apiprism(c),
                Daemon::Meshd => meshd(c),
                Daemon::Dnslocal => dnslocal(c),
            });
        }
    }
    all.into_iter()
        .map(|(key, value)| {
            let source = c.sources.get(&key).to_string();
            (key, value, source)
        })
        .collect()
}

pub fn render_text(c: &Config, daemon: Option<Daemon>) -> String {
    let rows = entries(c, daemon);
    let width = rows.iter().map(|(k, _, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value, source) in rows {
        out.push_str(&format!("{key:<width$}  {value}  # {source}\n"));
    }
    for warning in &c.warnings {
        out.push_str(&format!("warning: {warning}\n"));
    }
    out
}

pub fn render_json(c: &Config, daemon: Option<Daemon>) -> Value {
    let mut map = serde_json::Map::new();
    for (key, value, source) in entries(c, daemon) {
        map.insert(key, json!({"value": value, "source": source}));
    }
    if !c.warnings.is_empty() {
        map.insert(
            "warnings".into(),
            json!({"value": c.warnings, "source": "loader"}),
        );
    }
    Value::Object(map)
}
