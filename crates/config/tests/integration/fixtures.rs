//! Every Talos fixture loads, alone and combined, and the facts we read are right.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use crate::common::{fixture_files, fixtures, ok, read};
use hybridnet_config::{HostPort, IssueKind, MachineType};

/// Top-level kinds of a file (`v1alpha1` for the legacy document), with their `name` if any.
fn kinds(text: &str) -> BTreeSet<(String, Option<String>)> {
    let mut out = BTreeSet::new();
    for doc in text.split("\n---\n") {
        let mut kind = None;
        let mut name = None;
        for line in doc.lines() {
            if let Some(k) = line.strip_prefix("kind: ") {
                kind.get_or_insert(k.trim().to_owned());
            } else if let Some(n) = line.strip_prefix("name: ") {
                name.get_or_insert(n.trim().to_owned());
            } else if line.starts_with("version: v1alpha1") {
                kind.get_or_insert("v1alpha1".to_owned());
            }
        }
        if let Some(k) = kind {
            out.insert((k, name));
        }
    }
    out
}

#[test]
fn every_fixture_loads_alone() {
    for path in fixture_files("machine-config")
        .into_iter()
        .chain(fixture_files("documents"))
    {
        let text = read(&path);
        if let Err(e) = hybridnet_config::load_str(&text, &path) {
            panic!("{} does not load:\n{e}", path.display());
        }
        hybridnet_config::load_file(&path)
            .unwrap_or_else(|e| panic!("load_file {}: {e}", path.display()));
    }
}

#[test]
fn machine_configs_combine_with_documents() {
    let mut combined = 0;
    let mut duplicates = 0;
    for mc in fixture_files("machine-config") {
        let mc_text = read(&mc);
        let mc_kinds = kinds(&mc_text);
        for doc in fixture_files("documents") {
            let doc_text = read(&doc);
            let text = format!("{mc_text}\n---\n{doc_text}");
            let same = kinds(&doc_text).iter().any(|k| mc_kinds.contains(k));
            let result = hybridnet_config::load_str(&text, &mc);
            if same {
                let e = result.err().unwrap_or_else(|| {
                    panic!(
                        "{} + {}: expected a duplicate error",
                        mc.display(),
                        doc.display()
                    )
                });
                assert!(
                    e.has(IssueKind::Duplicate),
                    "{} + {}: {e}",
                    mc.display(),
                    doc.display()
                );
                assert!(e.to_string().contains("duplicate document"), "{e}");
                duplicates += 1;
            } else {
                if let Err(e) = result {
                    panic!("{} + {} does not load:\n{e}", mc.display(), doc.display());
                }
                combined += 1;
            }
        }
    }
    assert!(
        combined > 100 && duplicates > 0,
        "combined {combined}, duplicates {duplicates}"
    );
}

fn machine(name: &str) -> hybridnet_config::Config {
    ok(&read(&fixtures().join("machine-config").join(name)))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn v16_overrides_controlplane_legacy_facts() {
    let c = machine("v1.6-overrides-controlplane.yaml");
    assert_eq!(c.cluster.machine_type, MachineType::ControlPlane);
    let endpoint = HostPort {
        host: "base".into(),
        port: 6443,
    };
    assert_eq!(c.cluster.control_plane_endpoint, Some(endpoint.clone()));
    assert_eq!(c.cluster.local_api_server_port, 5443);
    assert_eq!(
        c.apiprism.upstreams,
        vec![
            endpoint,
            HostPort {
                host: "localhost".into(),
                port: 5443
            }
        ]
    );
    assert_eq!(c.dnslocal.cluster_domain, "example.com");
    assert_eq!(c.dnslocal.cluster_dns, vec![addr("10.96.0.10:53")]);
    assert_eq!(
        c.sources.get("dnslocal.clusterDNS").to_string(),
        "derived from cluster.network.serviceSubnets[0]"
    );
    assert!(
        c.sources
            .get("dnslocal.clusterDomain")
            .to_string()
            .starts_with("Talos cluster.network.dnsDomain (config.yaml:")
    );
    // Talos KubePrism on 7445: ours moves to 7455.
    assert_eq!(c.cluster.kube_prism.as_ref().map(|k| k.port), Some(7445));
    assert_eq!(
        c.apiprism.listen,
        vec![addr("127.0.0.1:7455"), addr("[::1]:7455")]
    );
    assert!(c.cluster.discovery.enabled);
    assert_eq!(
        c.cluster.discovery.endpoints,
        vec!["https://discovery.talos.dev/".to_owned()]
    );
    assert!(!c.cluster.discovery.kubernetes_registry);
    assert_eq!(
        c.cluster.id.as_deref(),
        Some("0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w=")
    );
    assert!(c.cluster.secret.is_some());
    assert!(c.meshd.ula_prefix.is_some());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn v115_overrides_controlplane_new_documents() {
    let c = machine("v1.15-overrides-controlplane.yaml");
    assert_eq!(c.cluster.machine_type, MachineType::ControlPlane);
    assert_eq!(c.cluster.local_api_server_port, 5443);
    assert_eq!(
        c.sources
            .get("cluster.localAPIServerPort")
            .to_string()
            .split(" (")
            .next(),
        Some("Talos KubeAPIServerConfig.apiPort")
    );
    assert_eq!(
        c.cluster.control_plane_endpoint,
        Some(HostPort {
            host: "base".into(),
            port: 6443
        })
    );
    assert_eq!(c.dnslocal.cluster_domain, "example.com");
    // KubeletConfig.clusterDNS wins over the derived kube-dns address.
    assert_eq!(c.dnslocal.cluster_dns, vec![addr("3.3.3.3:53")]);
    assert!(
        c.sources
            .get("dnslocal.clusterDNS")
            .to_string()
            .starts_with("Talos KubeletConfig.clusterDNS")
    );
    assert_eq!(
        c.cluster.id.as_deref(),
        Some("0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w=")
    );
    assert!(
        c.sources
            .get("cluster.id")
            .to_string()
            .starts_with("Talos DiscoveryIdentityConfig.clusterID")
    );
    assert!(c.cluster.host_dns.enabled && c.cluster.host_dns.forward_kube_dns_to_host);
    assert!(c.cluster.discovery.enabled);
    assert_eq!(c.cluster.kube_prism.as_ref().map(|k| k.port), Some(7445));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn workers_have_no_local_apiserver() {
    for v in ["1.6", "1.9", "1.12", "1.13", "1.14", "1.15"] {
        let c = machine(&format!("v{v}-overrides-worker.yaml"));
        assert_eq!(c.cluster.machine_type, MachineType::Worker, "{v}");
        assert!(
            !c.apiprism.upstreams.iter().any(|u| u.host == "localhost"),
            "{v}: {:?}",
            c.apiprism.upstreams
        );
        assert_eq!(c.apiprism.upstreams.len(), 1, "{v}");
        let c = machine(&format!("v{v}-base-controlplane.yaml"));
        assert!(
            c.apiprism
                .upstreams
                .iter()
                .any(|u| u.host == "localhost" && u.port == 6443),
            "{v}"
        );
    }
}

fn document(name: &str) -> hybridnet_config::Config {
    ok(&read(&fixtures().join("documents").join(name)))
}

#[test]
fn kubespan_documents() {
    let c = document("kubespanconfig.yaml");
    assert!(c.cluster.kubespan_enabled);
    assert_eq!(c.meshd.mtu, hybridnet_config::Mtu::Fixed(1420));
    assert!(
        c.sources
            .get("meshd.mtu")
            .to_string()
            .starts_with("Talos KubeSpanConfig.mtu")
    );
    assert!(!c.meshd.allow_down_peer_bypass && !c.meshd.advertise_kubernetes_networks);
    assert_eq!(
        c.meshd.exclude_advertised_networks,
        vec!["2007::/64".parse().unwrap_or_else(|_| unreachable!())]
    );
    let c = document("kubespanendpointsconfig.yaml");
    assert_eq!(
        c.meshd.extra_announced_endpoints,
        vec![addr("3.4.5.6:123"), addr("10.11.12.13:456")]
    );
}

#[test]
fn discovery_documents() {
    let c = document("discoveryserviceconfig-multiple.yaml");
    assert!(c.cluster.discovery.enabled);
    assert_eq!(c.cluster.discovery.endpoints.len(), 3);
    let c = document("discoveryidentityconfig.yaml");
    assert_eq!(
        c.cluster.id.as_deref(),
        Some("MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=")
    );
    let c = document("kubeprismconfig.yaml");
    assert_eq!(
        c.apiprism.tls_server_name.as_deref(),
        Some("api.cluster.local")
    );
    let c = document("resolverconfig_with_hostdns.yaml");
    assert_eq!(c.dnslocal.upstreams, vec![addr("10.0.0.1:53")]);
    assert!(c.cluster.host_dns.enabled);
}

#[test]
fn legacy_and_new_document_new_wins_with_warning() {
    let mc = read(&fixtures().join("machine-config/v1.6-base-controlplane.yaml"));
    let doc = read(&fixtures().join("documents/discoveryidentityconfig.yaml"));
    let c = ok(&format!("{mc}\n---\n{doc}"));
    assert_eq!(
        c.cluster.id.as_deref(),
        Some("MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=")
    );
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("cluster.id") && w.contains("DiscoveryIdentityConfig.clusterID")),
        "{:?}",
        c.warnings
    );
    assert!(c.render(None).contains("warning: "));
}
