//! The legacy `version: v1alpha1` document (`machine:`, `cluster:`).

use super::{TalosFacts, at, fact, read_dns_servers, read_host_dns, read_id, read_secret};
use crate::model::{DEFAULT_DISCOVERY_ENDPOINT, KUBEPRISM_PORT, KubePrism, MachineType};
use crate::parse;
use crate::read::Ctx;
use crate::yaml::Node;

fn machine_type(text: &str) -> Result<MachineType, String> {
    match text {
        "controlplane" | "init" => Ok(MachineType::ControlPlane),
        "worker" | "join" => Ok(MachineType::Worker),
        other => Err(format!(
            "unknown machine type `{other}`: expected controlplane, init or worker"
        )),
    }
}

/// Reads the facts we need from the legacy document.
pub fn read_legacy(ctx: &mut Ctx, doc: &Node) -> TalosFacts {
    let mut f = TalosFacts {
        machine_type: fact(ctx, doc, "machine.type", "machine.type", |c, n, k| {
            c.parsed(n, k, machine_type)
        }),
        endpoint: fact(
            ctx,
            doc,
            "cluster.controlPlane.endpoint",
            "cluster.controlPlane.endpoint",
            |c, n, k| c.parsed(n, k, parse::parse_host_port),
        ),
        local_api_port: fact(
            ctx,
            doc,
            "cluster.controlPlane.localAPIServerPort",
            "cluster.controlPlane.localAPIServerPort",
            |c, n, k| c.port(n, k),
        ),
        cluster_name: fact(
            ctx,
            doc,
            "cluster.clusterName",
            "cluster.clusterName",
            |c, n, k| c.string(n, k),
        ),
        dns_domain: fact(
            ctx,
            doc,
            "cluster.network.dnsDomain",
            "cluster.network.dnsDomain",
            |c, n, k| c.string(n, k),
        ),
        pod_subnets: fact(
            ctx,
            doc,
            "cluster.network.podSubnets",
            "cluster.network.podSubnets",
            |c, n, k| c.ipnets(n, k),
        ),
        service_subnets: fact(
            ctx,
            doc,
            "cluster.network.serviceSubnets",
            "cluster.network.serviceSubnets",
            |c, n, k| c.ipnets(n, k),
        ),
        cluster_dns: fact(
            ctx,
            doc,
            "machine.kubelet.clusterDNS",
            "machine.kubelet.clusterDNS",
            read_dns_servers,
        ),
        cluster_id: fact(ctx, doc, "cluster.id", "cluster.id", read_id),
        cluster_secret: fact(ctx, doc, "cluster.secret", "cluster.secret", read_secret),
        host_dns: fact(
            ctx,
            doc,
            "machine.features.hostDNS",
            "machine.features.hostDNS",
            read_host_dns,
        ),
        nameservers: fact(
            ctx,
            doc,
            "machine.network.nameservers",
            "machine.network.nameservers",
            |c, n, k| c.list(n, k, |c, item, k| c.ip(item, k)),
        ),
        ..TalosFacts::default()
    };
    read_kube_prism(ctx, doc, &mut f);
    read_discovery(ctx, doc, &mut f);
    read_kubespan(ctx, doc, &mut f);
    f
}

fn read_kube_prism(ctx: &mut Ctx, doc: &Node, f: &mut TalosFacts) {
    const FIELD: &str = "machine.features.kubePrism";
    let Some(node) = at(doc, FIELD) else { return };
    let enabled = match at(node, "enabled") {
        Some(n) => ctx.boolean(n, "machine.features.kubePrism.enabled"),
        None => Some(false),
    };
    let port = match at(node, "port") {
        Some(n) => ctx.port(n, "machine.features.kubePrism.port"),
        None => Some(KUBEPRISM_PORT),
    };
    if let (Some(enabled), Some(port)) = (enabled, port) {
        let value = enabled.then_some(KubePrism {
            port,
            tls_server_name: None,
        });
        f.kube_prism = Some((value, ctx.talos(FIELD, node)));
    }
}

fn read_discovery(ctx: &mut Ctx, doc: &Node, f: &mut TalosFacts) {
    let Some(node) = at(doc, "cluster.discovery") else {
        return;
    };
    f.discovery_enabled = fact(
        ctx,
        node,
        "enabled",
        "cluster.discovery.enabled",
        |c, n, k| c.boolean(n, k),
    );
    let service_disabled = match at(node, "registries.service.disabled") {
        Some(n) => ctx
            .boolean(n, "cluster.discovery.registries.service.disabled")
            .unwrap_or(false),
        None => false,
    };
    let endpoint = fact(
        ctx,
        node,
        "registries.service.endpoint",
        "cluster.discovery.registries.service.endpoint",
        |c, n, k| c.string(n, k),
    );
    let source = endpoint
        .as_ref()
        .map_or_else(|| ctx.talos("cluster.discovery", node), |(_, s)| s.clone());
    let endpoints = match (service_disabled, endpoint) {
        (true, _) => Vec::new(),
        (false, Some((e, _))) => vec![e],
        (false, None) => vec![DEFAULT_DISCOVERY_ENDPOINT.to_owned()],
    };
    f.discovery_endpoints = Some((endpoints, source));
    let k8s = fact(
        ctx,
        node,
        "registries.kubernetes.disabled",
        "cluster.discovery.registries.kubernetes.disabled",
        |c, n, k| c.boolean(n, k),
    );
    f.kubernetes_registry = k8s.map(|(disabled, s)| (!disabled, s));
}

fn read_kubespan(ctx: &mut Ctx, doc: &Node, f: &mut TalosFacts) {
    const BASE: &str = "machine.network.kubespan";
    let Some(ks) = at(doc, BASE) else { return };
    super::read_kubespan_fields(ctx, ks, BASE, f);
}
