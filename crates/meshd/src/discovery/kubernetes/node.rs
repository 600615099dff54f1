//! Node objects <-> affiliates, as Talos's Kubernetes registry writes and reads them
//! (`internal/pkg/discovery/registry/kubernetes.go`, names in `pkg/machinery/constants`). Pure.
//!
//! Values are comma-separated, in Go `netip` text forms: `self-ips` = addresses,
//! `assigned-prefixes` and `kubespan-exclude-advertised-networks` = prefixes, `kubespan-endpoints` =
//! `ip:port` (IPv6 as `[ip]:port`), `kubespan-ip` = one address, `kubespan-public-key` = base64,
//! `api-server-port` = decimal (control planes only). An empty value removes the annotation. A node
//! without `cluster.talos.dev/node-id` is not part of discovery and is skipped (as Talos does).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use serde_json::{Map, Value};

use super::super::{Affiliate, Local, codec};
use crate::plan::trust::overlaps;

pub const NODE_ID: &str = "cluster.talos.dev/node-id";
pub const SELF_IPS: &str = "networking.talos.dev/self-ips";
pub const API_SERVER_PORT: &str = "networking.talos.dev/api-server-port";
pub const KUBESPAN_IP: &str = "networking.talos.dev/kubespan-ip";
pub const PUBLIC_KEY: &str = "networking.talos.dev/kubespan-public-key";
pub const ASSIGNED_PREFIXES: &str = "networking.talos.dev/assigned-prefixes";
pub const ENDPOINTS: &str = "networking.talos.dev/kubespan-endpoints";
pub const EXCLUDED: &str = "networking.talos.dev/kubespan-exclude-advertised-networks";
/// Every annotation the registry owns.
pub const ALL: [&str; 8] = [
    NODE_ID,
    SELF_IPS,
    API_SERVER_PORT,
    KUBESPAN_IP,
    PUBLIC_KEY,
    ASSIGNED_PREFIXES,
    ENDPOINTS,
    EXCLUDED,
];

pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
const LABEL_CONTROL_PLANE: &str = "node-role.kubernetes.io/control-plane";
const LABEL_MASTER: &str = "node-role.kubernetes.io/master";
/// Longest value echoed into a log line.
const SHOW_MAX: usize = 80;
/// At most this many assigned prefixes and excluded networks are used per node (bounds the
/// AllowedIPs subtraction whatever a Node carries).
pub const PREFIXES_MAX: usize = 256;
pub const EXCLUDED_MAX: usize = 64;
/// At most this many addresses per `self-ips`.
pub const ADDRESSES_MAX: usize = 64;
/// Bad items reported per value.
pub const BAD_MAX: usize = 8;

/// An annotation (or field) that did not parse: the rest of the node is still used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bad {
    pub key: &'static str,
    /// The offending item, cut to 80 characters.
    pub value: String,
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: cannot parse {:?}", self.key, self.value)
    }
}

/// The parts of a Node the registry reads (name, version, labels, annotations, pod CIDRs, addresses):
/// what is kept of every Node, so a large cluster's images lists and conditions are not held in memory.
pub fn slim(node: Node) -> Node {
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let m = node.metadata;
    Node {
        metadata: ObjectMeta {
            name: m.name,
            resource_version: m.resource_version,
            labels: m.labels,
            annotations: m.annotations,
            ..ObjectMeta::default()
        },
        spec: node.spec.map(|s| NodeSpec {
            pod_cidr: s.pod_cidr,
            pod_cidrs: s.pod_cidrs,
            ..NodeSpec::default()
        }),
        status: node.status.map(|s| NodeStatus {
            addresses: s.addresses,
            ..NodeStatus::default()
        }),
    }
}

/// The annotations this node publishes (an empty value: remove it).
pub fn annotations(local: &Local) -> BTreeMap<&'static str, String> {
    let a = &local.affiliate;
    let ks = a.kubespan.clone().unwrap_or_default();
    let join = |items: Vec<String>| items.join(",");
    let mut out = BTreeMap::new();
    out.insert(NODE_ID, a.node_id.clone());
    out.insert(
        SELF_IPS,
        join(
            a.addresses
                .iter()
                .filter_map(|b| codec::ip_from_bytes(b))
                .map(|ip| ip.to_string())
                .collect(),
        ),
    );
    out.insert(
        API_SERVER_PORT,
        a.control_plane
            .as_ref()
            .filter(|cp| cp.api_server_port != 0)
            .map(|cp| cp.api_server_port.to_string())
            .unwrap_or_default(),
    );
    out.insert(
        KUBESPAN_IP,
        codec::ip_from_bytes(&ks.address)
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
    );
    out.insert(PUBLIC_KEY, ks.public_key.clone());
    out.insert(
        ASSIGNED_PREFIXES,
        join(
            ks.additional_addresses
                .iter()
                .filter_map(codec::prefix_from)
                .map(|p| p.to_string())
                .collect(),
        ),
    );
    out.insert(
        ENDPOINTS,
        join(
            local
                .endpoints_with(None)
                .iter()
                .map(ToString::to_string)
                .collect(),
        ),
    );
    out.insert(
        EXCLUDED,
        join(local.excluded.iter().map(ToString::to_string).collect()),
    );
    out
}

/// The JSON merge patch (`application/merge-patch+json`) that brings `current` to `want`: changed values
/// set, emptied ones `null`; `None` when nothing differs.
pub fn patch(
    current: Option<&BTreeMap<String, String>>,
    want: &BTreeMap<&'static str, String>,
) -> Option<Value> {
    let mut changes = Map::new();
    for (k, v) in want {
        let have = current.and_then(|c| c.get(*k));
        if v.is_empty() {
            if have.is_some() {
                changes.insert((*k).to_owned(), Value::Null);
            }
        } else if have != Some(v) {
            changes.insert((*k).to_owned(), Value::String(v.clone()));
        }
    }
    if changes.is_empty() {
        return None;
    }
    Some(serde_json::json!({ "metadata": { "annotations": changes } }))
}

/// The affiliate a Node describes, and what did not parse; `None` for a node without a node ID.
pub fn affiliate(node: &Node) -> Option<(Affiliate, Vec<Bad>)> {
    let empty = BTreeMap::new();
    let ann = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let node_id = ann.get(NODE_ID).filter(|s| !s.trim().is_empty())?;
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut bad = Vec::new();
    let mut a = Affiliate {
        id: name.clone(),
        node_id: node_id.trim().to_owned(),
        nodename: name,
        ..Affiliate::default()
    };
    if let Some(v) = ann.get(SELF_IPS) {
        a.addresses = list(v, SELF_IPS, &mut bad, ADDRESSES_MAX, |s| {
            s.parse::<IpAddr>().ok()
        });
    }
    let status = node.status.as_ref();
    for addr in status
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        match addr.type_.as_str() {
            "Hostname" if a.hostname.is_empty() => a.hostname.clone_from(&addr.address),
            "InternalIP" | "ExternalIP" => match addr.address.parse::<IpAddr>() {
                Ok(ip) if !a.addresses.contains(&ip) => a.addresses.push(ip),
                Ok(_) => {}
                Err(_) => bad.push(show("status.addresses", &addr.address)),
            },
            _ => {}
        }
    }
    a.machine_type =
        if labels.contains_key(LABEL_CONTROL_PLANE) || labels.contains_key(LABEL_MASTER) {
            "controlplane"
        } else {
            "worker"
        }
        .to_owned();
    if let Some(v) = ann.get(API_SERVER_PORT).filter(|v| !v.is_empty()) {
        match v.trim().parse::<u16>() {
            Ok(p) if p != 0 => a.api_server_port = Some(p),
            _ => bad.push(show(API_SERVER_PORT, v)),
        }
    }
    if let Some(v) = ann.get(PUBLIC_KEY).filter(|v| !v.is_empty()) {
        match v.parse() {
            Ok(k) => a.public_key = Some(k),
            Err(_) => bad.push(show(PUBLIC_KEY, v)),
        }
    }
    if let Some(v) = ann.get(KUBESPAN_IP).filter(|v| !v.is_empty()) {
        match v.trim().parse::<IpAddr>() {
            Ok(ip) => a.mesh_address = Some(ip),
            Err(_) => bad.push(show(KUBESPAN_IP, v)),
        }
    }
    if let Some(v) = ann.get(ASSIGNED_PREFIXES) {
        a.additional = list(v, ASSIGNED_PREFIXES, &mut bad, PREFIXES_MAX, |s| {
            s.parse::<IpNet>().ok()
        });
    }
    if let Some(v) = ann.get(ENDPOINTS) {
        a.endpoints = list(v, ENDPOINTS, &mut bad, codec::ENDPOINTS_MAX, |s| {
            s.parse::<SocketAddr>().ok()
        });
    }
    if let Some(v) = ann.get(EXCLUDED) {
        a.excluded = list(v, EXCLUDED, &mut bad, EXCLUDED_MAX, |s| {
            s.parse::<IpNet>().ok()
        });
    }
    a.location = location(node);
    Some((a, bad))
}

/// The node's location: its zone label, else its region label (a zone names the finer place; with
/// only one location per node, the zone wins).
pub fn location(node: &Node) -> Option<String> {
    let labels = node.metadata.labels.as_ref()?;
    [LABEL_ZONE, LABEL_REGION]
        .iter()
        .filter_map(|k| labels.get(*k))
        .map(|v| v.trim())
        .find(|v| !v.is_empty())
        .map(str::to_owned)
}

/// A Node may route only its own pods to itself. Pod space is the cluster's pod subnets
/// (`pod_subnets`) and every Node's `spec.podCIDRs`; an assigned prefix that touches pod space must lie
/// inside the node's own `spec.podCIDRs` (the cluster pod subnets when it has none) and touch no other
/// Node's (`others`). The rest moves from `additional` to `refused` (reported by the mesh with reason
/// `outside-pod-cidrs`). Prefixes outside pod space (a node's extra mesh addresses, `meshd.addresses`)
/// go on to the mesh's own screen. Anyone who may annotate a Node can write any prefix there;
/// `spec.podCIDRs` is set by the controller manager, which a node cannot change.
pub fn bound(a: &mut Affiliate, node: &Node, pod_subnets: &[IpNet], others: &[IpNet]) {
    let (own, _) = pod_cidrs(node);
    let bounds = if own.is_empty() { pod_subnets } else { &own };
    let touches = |set: &[IpNet], p: &IpNet| set.iter().any(|s| overlaps(s, p));
    let (kept, refused): (Vec<IpNet>, Vec<IpNet>) = a.additional.iter().copied().partition(|p| {
        let pod_space = touches(pod_subnets, p) || touches(others, p) || touches(&own, p);
        !pod_space || (bounds.iter().any(|b| b.contains(p)) && !touches(others, p))
    });
    a.additional = kept;
    a.refused = refused;
}

/// `spec.podCIDRs` (else the older single `spec.podCIDR`), and what did not parse.
pub fn pod_cidrs(node: &Node) -> (Vec<IpNet>, Vec<Bad>) {
    let Some(spec) = node.spec.as_ref() else {
        return (Vec::new(), Vec::new());
    };
    let raw: Vec<String> = match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(list), _) if !list.is_empty() => list.clone(),
        (_, Some(one)) if !one.is_empty() => vec![one.clone()],
        _ => Vec::new(),
    };
    let mut bad = Vec::new();
    let mut out = Vec::new();
    for r in raw {
        match r.trim().parse::<IpNet>() {
            Ok(n) if !out.contains(&n.trunc()) => out.push(n.trunc()),
            Ok(_) => {}
            Err(_) => bad.push(show("spec.podCIDRs", &r)),
        }
    }
    (out, bad)
}

/// The comma-separated items of `value` that parse, at most `max` (distinct); at most
/// [`BAD_MAX`] bad items reported per value, plus one saying the rest was cut.
fn list<T: PartialEq>(
    value: &str,
    key: &'static str,
    bad: &mut Vec<Bad>,
    max: usize,
    parse: impl Fn(&str) -> Option<T>,
) -> Vec<T> {
    let mut out = Vec::new();
    let mut reported = 0;
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if out.len() >= max {
            bad.push(show(
                key,
                &format!("more than {max} items; the rest is ignored"),
            ));
            break;
        }
        match parse(item) {
            Some(x) if !out.contains(&x) => out.push(x),
            Some(_) => {}
            None if reported < BAD_MAX => {
                reported += 1;
                bad.push(show(key, item));
            }
            None => {}
        }
    }
    out
}

fn show(key: &'static str, value: &str) -> Bad {
    Bad {
        key,
        value: value.chars().take(SHOW_MAX).collect(),
    }
}
