//! dnslocal's cluster DNS never points at dnslocal itself, and meshd's discovery CA files.

use crate::common::{err, fixtures, ok, read};

/// A real Talos machine config (legacy document) whose kubelet `clusterDNS` points at dnslocal, as
/// `docs/talos.md` recommends.
fn legacy_pointing_at_dnslocal() -> String {
    let text = read(&fixtures().join("machine-config/v1.13-base-worker.yaml"));
    let kubelet = "    kubelet:\n";
    assert!(
        text.contains(kubelet),
        "fixture changed: no kubelet section"
    );
    text.replacen(
        kubelet,
        "    kubelet:\n        clusterDNS:\n            - 169.254.20.10\n",
        1,
    )
}

#[test]
fn a_kubelet_cluster_dns_pointing_at_dnslocal_yields_kube_dns_from_the_service_subnet() {
    let c = ok(&legacy_pointing_at_dnslocal());
    assert_eq!(
        c.dnslocal.cluster_dns,
        vec!["10.96.0.10:53".parse().unwrap_or_else(|e| panic!("{e}"))]
    );
    let source = c.sources.get("dnslocal.clusterDNS").to_string();
    assert!(
        source.starts_with("derived from cluster.network.serviceSubnets")
            && source.contains("machine.kubelet.clusterDNS")
            && source.contains("dnslocal itself"),
        "{source}"
    );
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("169.254.20.10:53") && w.contains("dnslocal itself")),
        "{:?}",
        c.warnings
    );
    // check-config shows both.
    let text = c.render(None);
    assert!(
        text.lines().any(|l| l.starts_with("dnslocal.clusterDNS")
            && l.contains("10.96.0.10:53")
            && l.contains("# derived from cluster.network.serviceSubnets")),
        "{text}"
    );
    assert!(
        text.contains("warning: Talos machine.kubelet.clusterDNS"),
        "{text}"
    );
}

#[test]
fn the_kubelet_config_document_pointing_at_dnslocal_is_handled_too() {
    let text = read(&fixtures().join("machine-config/v1.14-overrides-worker.yaml"));
    assert!(text.contains("    - 3.3.3.3\n"), "fixture changed");
    let c = ok(&text.replacen("    - 3.3.3.3\n", "    - 169.254.20.10\n", 1));
    assert_eq!(c.dnslocal.cluster_dns[0].to_string(), "10.96.0.10:53");
    assert!(
        c.sources
            .get("dnslocal.clusterDNS")
            .to_string()
            .contains("KubeletConfig.clusterDNS"),
        "{}",
        c.sources.get("dnslocal.clusterDNS")
    );
    // A kubelet clusterDNS that is not dnslocal is used as before.
    let c = ok(&text);
    assert_eq!(c.dnslocal.cluster_dns[0].to_string(), "3.3.3.3:53");
    assert!(c.warnings.iter().all(|w| !w.contains("dnslocal itself")));
}

#[test]
fn only_the_own_address_is_dropped_when_there_are_others() {
    let c = ok(
        "version: v1alpha1\nmachine:\n  type: worker\n  kubelet:\n    clusterDNS: [169.254.20.10, 10.96.0.53]\ncluster:\n  network:\n    serviceSubnets: [10.96.0.0/12]\n",
    );
    assert_eq!(c.dnslocal.cluster_dns[0].to_string(), "10.96.0.53:53");
    assert_eq!(c.dnslocal.cluster_dns.len(), 1);
    assert!(c.warnings.iter().any(|w| w.contains("to the others only")));
}

#[test]
fn without_a_service_subnet_the_default_is_used_with_a_warning() {
    let c = ok("version: v1alpha1\nmachine:\n  kubelet:\n    clusterDNS: [169.254.20.10]\n");
    assert_eq!(c.dnslocal.cluster_dns[0].to_string(), "10.96.0.10:53");
    assert_eq!(c.sources.get("dnslocal.clusterDNS").to_string(), "default");
    assert!(c.warnings.iter().any(|w| w.contains("no service subnet")));
}

#[test]
fn our_own_cluster_dns_on_a_listen_address_is_an_error() {
    let e = err(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\ndnslocal:\n  listen: [\"169.254.20.10:53\"]\n  clusterDNS: [169.254.20.10]\n",
    );
    let text = e.to_string();
    assert!(
        text.contains("dnslocal.clusterDNS") && text.contains("loop"),
        "{text}"
    );
}

/// `interceptClusterDNS`: the kube-dns ClusterIP comes from the kubelet (else the service subnet); the cluster
/// zone must then go elsewhere (a `kube-dns-upstream` Service), so the ClusterIP as `clusterDNS` is an error.
#[test]
fn intercepting_the_cluster_ip_needs_another_cluster_dns() {
    let talos = "version: v1alpha1\nmachine:\n  type: worker\n  kubelet:\n    clusterDNS: [10.96.0.10]\ncluster:\n  network:\n    serviceSubnets: [10.96.0.0/12]\n---\n";
    let ours =
        "apiVersion: v1alpha1\nkind: HybridNetConfig\ndnslocal:\n  interceptClusterDNS: true\n";
    let e = err(&format!("{talos}{ours}"));
    let text = e.to_string();
    assert!(
        text.contains("interceptClusterDNS")
            && text.contains("kube-dns-upstream")
            && text.contains("10.96.0.10"),
        "{text}"
    );
    let c = ok(&format!("{talos}{ours}  clusterDNS: [10.96.0.11]\n"));
    assert_eq!(
        c.dnslocal.intercept_cluster_dns,
        Some("10.96.0.10".parse().unwrap_or_else(|e| panic!("{e}")))
    );
    assert_eq!(c.dnslocal.cluster_dns[0].to_string(), "10.96.0.11:53");
    assert!(
        c.render(None)
            .lines()
            .any(|l| l.starts_with("dnslocal.interceptClusterDNS") && l.contains("10.96.0.10")),
        "{}",
        c.render(None)
    );
    // Off by default; the subnet's 10th address without a kubelet clusterDNS.
    assert_eq!(
        ok(talos.trim_end_matches("---\n"))
            .dnslocal
            .intercept_cluster_dns,
        None
    );
    let c = ok(&format!(
        "version: v1alpha1\ncluster:\n  network:\n    serviceSubnets: [10.100.0.0/16]\n---\n{ours}  clusterDNS: [10.100.0.11]\n"
    ));
    assert_eq!(
        c.dnslocal
            .intercept_cluster_dns
            .map(|ip| ip.to_string())
            .as_deref(),
        Some("10.100.0.10")
    );
}

const IDENTITY: &str = "apiVersion: v1alpha1\nkind: DiscoveryIdentityConfig\nclusterID: 0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w=\nclusterSecret: pofHbABZq7VXuObsdLdy/bHmz6hlMHZ3p8+6WKrv1ic=\n---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: own\nendpoint: https://discovery.example.org:3001/\n---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: talos\nendpoint: https://discovery.talos.dev/\n";

#[test]
fn discovery_ca_files_apply_per_endpoint_or_to_all() {
    let c = ok(&format!(
        "{IDENTITY}---\napiVersion: v1alpha1\nkind: HybridNetConfig\nmeshd:\n  discovery:\n    caFile: /etc/hybridnet/all.pem\n    endpoints:\n      - endpoint: https://discovery.example.org:3001\n        caFile: /etc/hybridnet/own.pem\n"
    ));
    let m = &c.meshd;
    assert_eq!(
        m.discovery_ca_for("https://discovery.example.org:3001/"),
        Some(std::path::Path::new("/etc/hybridnet/own.pem"))
    );
    assert_eq!(
        m.discovery_ca_for("https://discovery.talos.dev/"),
        Some(std::path::Path::new("/etc/hybridnet/all.pem"))
    );
    let text = c.render(None);
    assert!(
        text.lines().any(|l| l.starts_with("meshd.discovery.caFile")
            && l.contains("/etc/hybridnet/all.pem")
            && l.contains("# HybridNetConfig meshd.discovery.caFile")),
        "{text}"
    );
    assert!(text.contains("/etc/hybridnet/own.pem"), "{text}");
    let c = ok(IDENTITY);
    assert_eq!(
        c.meshd.discovery_ca_for("https://discovery.talos.dev/"),
        None
    );
}

#[test]
fn a_ca_file_for_an_unknown_endpoint_or_an_unknown_key_is_an_error() {
    let e = err(&format!(
        "{IDENTITY}---\napiVersion: v1alpha1\nkind: HybridNetConfig\nmeshd:\n  discovery:\n    endpoints:\n      - endpoint: https://discovery.example.com:3001/\n        caFile: /x.pem\n"
    ));
    assert!(
        e.to_string().contains("not a discovery endpoint in use"),
        "{e}"
    );
    // With discovery off the entry is kept, unchecked.
    let c = ok(
        "version: v1alpha1\ncluster:\n  discovery:\n    enabled: false\n---\napiVersion: v1alpha1\nkind: HybridNetConfig\nmeshd:\n  discovery:\n    endpoints:\n      - endpoint: https://discovery.example.com:3001/\n        caFile: /x.pem\n",
    );
    assert_eq!(c.meshd.discovery_endpoint_cas.len(), 1);
    let e = err(&format!(
        "{IDENTITY}---\napiVersion: v1alpha1\nkind: HybridNetConfig\nmeshd:\n  discovery:\n    caFiel: /x.pem\n"
    ));
    assert!(e.to_string().contains("caFile"), "{e}");
    let e = err(&format!(
        "{IDENTITY}---\napiVersion: v1alpha1\nkind: HybridNetConfig\nmeshd:\n  discovery:\n    endpoints:\n      - endpoint: https://discovery.talos.dev/\n"
    ));
    assert!(e.to_string().contains("`caFile` is required"), "{e}");
}
