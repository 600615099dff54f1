//! The newer Talos document kinds (`apiVersion: v1alpha1`, `kind: X`).

use super::{TalosFacts, at, fact, read_dns_servers, read_host_dns, read_id, read_secret};
use crate::error::IssueKind;
use crate::model::{KUBEPRISM_PORT, KubePrism};
use crate::parse;
use crate::read::Ctx;
use crate::yaml::{Node, Value};

/// Reads one new-style document of `kind` into `f`. Kinds we do not need are ignored.
pub fn read_document(ctx: &mut Ctx, kind: &str, doc: &Node, f: &mut TalosFacts) {
    let field = |name: &str| format!("{kind}.{name}");
    match kind {
        "KubeSpanConfig" => super::read_kubespan_fields(ctx, doc, kind, f),
        "KubeSpanEndpointsConfig" => {
            f.extra_endpoints = fact(
                ctx,
                doc,
                "extraAnnouncedEndpoints",
                &field("extraAnnouncedEndpoints"),
                |c, n, k| c.socket_addrs(n, k),
            );
        }
        "KubePrismConfig" => {
            let port = match at(doc, "port") {
                Some(n) => ctx.port(n, &field("port")),
                None => Some(KUBEPRISM_PORT),
            };
            let tls = fact(
                ctx,
                doc,
                "tlsServerName",
                &field("tlsServerName"),
                |c, n, k| c.string(n, k),
            );
            if let Some(port) = port {
                let value = KubePrism {
                    port,
                    tls_server_name: tls.map(|(t, _)| t),
                };
                f.kube_prism = Some((Some(value), ctx.talos(kind, doc)));
            }
        }
        "DiscoveryServiceConfig" => {
            let endpoint = fact(ctx, doc, "endpoint", &field("endpoint"), |c, n, k| {
                c.string(n, k)
            });
            let source = ctx.talos(kind, doc);
            f.discovery_enabled = Some((true, source.clone()));
            if let Some((endpoint, _)) = endpoint {
                let list = f
                    .discovery_endpoints
                    .get_or_insert_with(|| (Vec::new(), source));
                if !list.0.contains(&endpoint) {
                    list.0.push(endpoint);
                }
            }
        }
        "DiscoveryIdentityConfig" => {
            f.cluster_id = fact(ctx, doc, "clusterID", &field("clusterID"), read_id);
            f.cluster_secret = fact(
                ctx,
                doc,
                "clusterSecret",
                &field("clusterSecret"),
                read_secret,
            );
        }
        "KubeNetworkConfig" => {
            f.dns_domain = fact(ctx, doc, "dnsDomain", &field("dnsDomain"), |c, n, k| {
                c.string(n, k)
            });
            f.pod_subnets = fact(ctx, doc, "podSubnets", &field("podSubnets"), |c, n, k| {
                c.ipnets(n, k)
            });
            f.service_subnets = fact(
                ctx,
                doc,
                "serviceSubnets",
                &field("serviceSubnets"),
                |c, n, k| c.ipnets(n, k),
            );
        }
        "KubeClusterConfig" => {
            f.cluster_name = fact(ctx, doc, "clusterName", &field("clusterName"), |c, n, k| {
                c.string(n, k)
            });
            f.endpoint = fact(ctx, doc, "endpoint", &field("endpoint"), |c, n, k| {
                c.parsed(n, k, parse::parse_host_port)
            });
        }
        "ResolverConfig" => {
            f.nameservers = fact(ctx, doc, "nameservers", &field("nameservers"), |c, n, k| {
                c.list(n, k, |c, item, k| match at(item, "address") {
                    Some(addr) => c.ip(addr, &format!("{k}.address")),
                    None => {
                        c.issue(
                            item,
                            IssueKind::Type,
                            format!("`{k}`: expected a mapping with `address`"),
                        );
                        None
                    }
                })
            });
            f.host_dns = fact(ctx, doc, "hostDNS", &field("hostDNS"), read_host_dns);
        }
        "KubeletConfig" => {
            f.cluster_dns = fact(
                ctx,
                doc,
                "clusterDNS",
                &field("clusterDNS"),
                read_dns_servers,
            );
        }
        "KubeAPIServerConfig" => {
            f.local_api_port = fact(ctx, doc, "apiPort", &field("apiPort"), |c, n, k| {
                c.port(n, k)
            });
        }
        "ExtensionServiceConfig" => check_extension_service(ctx, doc),
        _ => {}
    }
}

/// Talos's own checks: `name` is required and there must be `configFiles` or `environment`.
fn check_extension_service(ctx: &mut Ctx, doc: &Node) {
    if at(doc, "name")
        .and_then(Node::as_str)
        .is_none_or(str::is_empty)
    {
        ctx.issue(
            doc,
            IssueKind::Value,
            "ExtensionServiceConfig: `name` is required",
        );
    }
    let files = at(doc, "configFiles");
    if files.is_none() && at(doc, "environment").is_none() {
        ctx.issue(
            doc,
            IssueKind::Value,
            "ExtensionServiceConfig: expected `configFiles` or `environment`",
        );
    }
    if let Some(Value::Seq(items)) = files.map(|n| &n.value) {
        for item in items {
            for key in ["content", "mountPath"] {
                if at(item, key)
                    .and_then(Node::as_str)
                    .is_none_or(str::is_empty)
                {
                    ctx.issue(
                        item,
                        IssueKind::Value,
                        format!("ExtensionServiceConfig.configFiles: `{key}` is required"),
                    );
                }
            }
        }
    }
}
