//! Talos machine config: the facts we read from it, from both shapes.
//!
//! The legacy `version: v1alpha1` document is read in [`legacy`], the newer kinds in [`documents`].
//! Talos treats a legacy field and the document that replaces it as mutually exclusive (it refuses
//! a machine config with both). This loader is more forgiving, because our file is often pasted
//! together from several sources: **the new document wins**, and a warning naming both sources is
//! recorded in [`crate::Config::warnings`]. Everything we do not read is accepted and ignored.

mod documents;
mod legacy;

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::filter::FilterRule;
use crate::model::{HostDns, KubePrism, MachineType, Secret};
use crate::parse::HostPort;
use crate::read::Ctx;
use crate::source::Sourced;
use crate::yaml::Node;

pub use documents::read_document;
pub use legacy::read_legacy;

/// Everything read from the Talos documents; `None` where Talos says nothing.
#[derive(Default)]
pub struct TalosFacts {
    pub machine_type: Sourced<MachineType>,
    pub endpoint: Sourced<HostPort>,
    pub local_api_port: Sourced<u16>,
    pub cluster_name: Sourced<String>,
    pub dns_domain: Sourced<String>,
    pub pod_subnets: Sourced<Vec<IpNet>>,
    pub service_subnets: Sourced<Vec<IpNet>>,
    pub cluster_dns: Sourced<Vec<SocketAddr>>,
    pub cluster_id: Sourced<String>,
    pub cluster_secret: Sourced<Secret>,
    pub discovery_enabled: Sourced<bool>,
    pub discovery_endpoints: Sourced<Vec<String>>,
    pub kubernetes_registry: Sourced<bool>,
    /// `Some(None)`: Talos's KubePrism is explicitly disabled.
    pub kube_prism: Sourced<Option<KubePrism>>,
    pub host_dns: Sourced<HostDns>,
    pub nameservers: Sourced<Vec<IpAddr>>,
    pub kubespan_enabled: Sourced<bool>,
    pub kubespan_mtu: Sourced<u16>,
    pub kubespan_filters: Sourced<Vec<FilterRule>>,
    pub kubespan_exclude: Sourced<Vec<IpNet>>,
    pub kubespan_advertise: Sourced<bool>,
    pub kubespan_bypass: Sourced<bool>,
    pub kubespan_harvest: Sourced<bool>,
    pub extra_endpoints: Sourced<Vec<SocketAddr>>,
}

fn pick<T>(legacy: Sourced<T>, new: Sourced<T>, warnings: &mut Vec<String>) -> Sourced<T> {
    match (legacy, new) {
        (Some((_, old)), Some(n)) => {
            warnings.push(format!(
                "both {old} and {} are set; Talos refuses this combination; using the newer document",
                n.1
            ));
            Some(n)
        }
        (l, n) => n.or(l),
    }
}

macro_rules! combine {
    ($l:ident, $n:ident, $w:ident; $($field:ident),* $(,)?) => {
        TalosFacts { $($field: pick($l.$field, $n.$field, $w)),* }
    };
}

impl TalosFacts {
    /// Merges the legacy document's facts with the new documents', the new ones winning.
    pub fn combine(legacy: TalosFacts, new: TalosFacts, warnings: &mut Vec<String>) -> TalosFacts {
        combine!(legacy, new, warnings;
            machine_type, endpoint, local_api_port, cluster_name, dns_domain, pod_subnets,
            service_subnets, cluster_dns, cluster_id, cluster_secret, discovery_enabled,
            discovery_endpoints, kubernetes_registry, kube_prism, host_dns, nameservers,
            kubespan_enabled, kubespan_mtu, kubespan_filters, kubespan_exclude, kubespan_advertise,
            kubespan_bypass, kubespan_harvest, extra_endpoints)
    }
}

/// The non-null value at a dotted path.
fn at<'a>(node: &'a Node, path: &str) -> Option<&'a Node> {
    node.path(path).filter(|n| !n.is_null())
}

/// Reads the value at `path` with `f` and tags it with the Talos field name `field`.
fn fact<T>(
    ctx: &mut Ctx,
    node: &Node,
    path: &str,
    field: &str,
    f: impl FnOnce(&mut Ctx, &Node, &str) -> Option<T>,
) -> Sourced<T> {
    let n = at(node, path)?;
    let value = f(ctx, n, field)?;
    Some((value, ctx.talos(field, n)))
}

/// Decodes base64 (standard or URL-safe alphabet, padded or not) of exactly 32 bytes.
pub fn decode32(text: &str) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let t = text.trim();
    let bytes = [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(t).ok())
        .ok_or_else(|| "expected base64 of 32 bytes, found text that is not base64".to_owned())?;
    let len = bytes.len();
    <[u8; 32]>::try_from(bytes)
        .map_err(|_| format!("expected base64 of 32 bytes, found {len} bytes"))
}

fn read_secret(ctx: &mut Ctx, n: &Node, key: &str) -> Option<Secret> {
    ctx.parsed(n, key, decode32).map(Secret)
}

fn read_id(ctx: &mut Ctx, n: &Node, key: &str) -> Option<String> {
    ctx.parsed(n, key, |s| decode32(s).map(|_| s.trim().to_owned()))
}

fn read_filters(ctx: &mut Ctx, n: &Node, key: &str) -> Option<Vec<FilterRule>> {
    ctx.list(n, key, |c, item, k| c.parsed(item, k, FilterRule::parse))
}

/// DNS server IPs (`clusterDNS`) as `ip:53`.
fn read_dns_servers(ctx: &mut Ctx, n: &Node, key: &str) -> Option<Vec<SocketAddr>> {
    ctx.list(n, key, |c, item, k| {
        c.parsed(item, k, |s| crate::parse::parse_socket_addr_default(s, 53))
    })
}

fn read_mtu(ctx: &mut Ctx, n: &Node, key: &str) -> Option<u16> {
    ctx.uint(n, key, 0, 65535)
        .and_then(|v| u16::try_from(v).ok())
}

fn read_host_dns(ctx: &mut Ctx, n: &Node, key: &str) -> Option<HostDns> {
    let enabled = match at(n, "enabled") {
        Some(e) => ctx.boolean(e, &format!("{key}.enabled"))?,
        None => false,
    };
    let forward = match at(n, "forwardKubeDNSToHost") {
        Some(e) => ctx.boolean(e, &format!("{key}.forwardKubeDNSToHost"))?,
        None => false,
    };
    Some(HostDns {
        enabled,
        forward_kube_dns_to_host: forward,
    })
}

/// The KubeSpan fields, the same in `machine.network.kubespan` and `KubeSpanConfig`.
fn read_kubespan_fields(ctx: &mut Ctx, ks: &Node, base: &str, f: &mut TalosFacts) {
    let field = |name: &str| format!("{base}.{name}");
    f.kubespan_enabled = fact(ctx, ks, "enabled", &field("enabled"), |c, n, k| {
        c.boolean(n, k)
    });
    f.kubespan_mtu = fact(ctx, ks, "mtu", &field("mtu"), read_mtu);
    f.kubespan_filters = fact(
        ctx,
        ks,
        "filters.endpoints",
        &field("filters.endpoints"),
        read_filters,
    );
    f.kubespan_exclude = fact(
        ctx,
        ks,
        "filters.excludeAdvertisedNetworks",
        &field("filters.excludeAdvertisedNetworks"),
        |c, n, k| {
            c.list(n, k, |c, item, k| {
                c.parsed(item, k, |s| crate::parse::parse_ipnet(s, true))
            })
        },
    );
    f.kubespan_advertise = fact(
        ctx,
        ks,
        "advertiseKubernetesNetworks",
        &field("advertiseKubernetesNetworks"),
        |c, n, k| c.boolean(n, k),
    );
    f.kubespan_bypass = fact(
        ctx,
        ks,
        "allowDownPeerBypass",
        &field("allowDownPeerBypass"),
        |c, n, k| c.boolean(n, k),
    );
    f.kubespan_harvest = fact(
        ctx,
        ks,
        "harvestExtraEndpoints",
        &field("harvestExtraEndpoints"),
        |c, n, k| c.boolean(n, k),
    );
}
