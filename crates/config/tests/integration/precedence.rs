//! Precedence (ours > Talos > derived > default) and the source labels.

use crate::common::ok;

const TALOS: &str = "version: v1alpha1\nmachine:\n  type: worker\n  kubelet:\n    clusterDNS: [10.96.0.53]\ncluster:\n  network:\n    dnsDomain: talos.local\n    serviceSubnets: [10.96.0.0/12]\n";

#[test]
fn each_layer_labels_its_source() {
    // Default.
    let c = ok("");
    assert_eq!(c.sources.get("dnslocal.clusterDNS").to_string(), "default");
    assert_eq!(c.dnslocal.cluster_domain, "cluster.local");
    // Derived.
    let c = ok(
        "version: v1alpha1\ncluster:\n  network:\n    serviceSubnets: [fd00:10::/108, 10.96.0.0/12]\n",
    );
    assert_eq!(
        c.dnslocal.cluster_dns,
        vec!["[fd00:10::a]:53".parse().unwrap_or_else(|_| unreachable!())]
    );
    assert_eq!(
        c.sources.get("dnslocal.clusterDNS").to_string(),
        "derived from cluster.network.serviceSubnets[0]"
    );
    // Talos field wins over derived.
    let c = ok(TALOS);
    assert_eq!(
        c.dnslocal.cluster_dns,
        vec!["10.96.0.53:53".parse().unwrap_or_else(|_| unreachable!())]
    );
    assert_eq!(
        c.sources.get("dnslocal.clusterDNS").to_string(),
        "Talos machine.kubelet.clusterDNS (config.yaml:5:17)"
    );
    assert_eq!(
        c.sources.get("dnslocal.clusterDomain").to_string(),
        "Talos cluster.network.dnsDomain (config.yaml:8:16)"
    );
    // Ours wins over Talos.
    let text = format!(
        "{TALOS}---\napiVersion: v1alpha1\nkind: HybridNetConfig\ndnslocal:\n  clusterDNS: [\"10.0.0.10:5353\"]\n  clusterDomain: ours.local\n"
    );
    let c = ok(&text);
    assert_eq!(
        c.dnslocal.cluster_dns,
        vec!["10.0.0.10:5353".parse().unwrap_or_else(|_| unreachable!())]
    );
    assert_eq!(
        c.sources.get("dnslocal.clusterDNS").to_string(),
        "HybridNetConfig dnslocal.clusterDNS (config.yaml:14:15)"
    );
    assert_eq!(c.dnslocal.cluster_domain, "ours.local");
    // Render shows the same.
    let text = c.render(Some(hybridnet_config::Daemon::Dnslocal));
    assert!(
        text.lines().any(|l| l.starts_with("dnslocal.clusterDNS")
            && l.contains("# HybridNetConfig dnslocal.clusterDNS (config.yaml:14:15)")),
        "{text}"
    );
    assert!(!text.contains("apiprism."), "{text}");
    let json = c.render_json(None);
    assert_eq!(json["dnslocal.clusterDomain"]["value"], "ours.local");
    assert_eq!(json["dnslocal.cache.maxTTL"]["value"], "1h");
    assert_eq!(json["dnslocal.cache.maxTTL"]["source"], "default");
    assert_eq!(json["apiprism.listen"]["source"], "default");
}

#[test]
fn apiprism_listen_port_follows_talos_kubeprism() {
    let c = ok("");
    assert_eq!(
        c.apiprism
            .listen
            .iter()
            .map(|a| a.port())
            .collect::<Vec<_>>(),
        vec![7445, 7445]
    );
    let c = ok("apiVersion: v1alpha1\nkind: KubePrismConfig\nport: 7445\n");
    assert_eq!(
        c.apiprism
            .listen
            .iter()
            .map(|a| a.port())
            .collect::<Vec<_>>(),
        vec![7455, 7455]
    );
    assert!(
        c.sources
            .get("apiprism.listen")
            .to_string()
            .starts_with("derived from KubePrismConfig")
    );
    let c =
        ok("version: v1alpha1\nmachine: {features: {kubePrism: {enabled: false, port: 7445}}}\n");
    assert_eq!(c.apiprism.listen[0].port(), 7445);
    assert!(c.cluster.kube_prism.is_none());
    let c = ok("apiVersion: v1alpha1\nkind: KubePrismConfig\nport: 7000\n");
    assert_eq!(c.apiprism.listen[0].port(), 7445);
}

#[test]
fn full_hybridnet_document() {
    let text = "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: /run/h\ndataDir: /data\napiprism:\n  endpoints: [\"10.0.0.1:6443\", \"https://api.example.com\"]\n  healthCheck: {interval: 500ms, timeout: 1s, fall: 3, rise: 1}\nmeshd:\n  mtu: auto\n  backend: userspace\n  topology: location\n  location: home\n  kubespanCompat: true\n  peers:\n    - name: b\n      publicKey: MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=\n      endpoints: [\"203.0.113.7:51821\"]\n      allowedIPs: [10.244.1.0/24]\n  filters: {endpoints: [\"0.0.0.0/0\", \"!10.0.0.0/8\"]}\ndnslocal:\n  upstreams: [1.1.1.1, \"[2606:4700::1111]:53\"]\n  cache: {size: 10, serveStale: 0}\n";
    let c = ok(text);
    assert_eq!(
        c.meshd.private_key_file,
        std::path::PathBuf::from("/data/meshd.key")
    );
    assert_eq!(
        c.sources.get("meshd.privateKeyFile").to_string(),
        "derived from dataDir"
    );
    assert_eq!(c.meshd.mtu, hybridnet_config::Mtu::Auto);
    // kubespanCompat listens on KubeSpan's port unless one is set; MSS clamping is on by default.
    assert_eq!(c.meshd.listen_port, 51820);
    assert_eq!(
        c.sources.get("meshd.listenPort").to_string(),
        "derived from meshd.kubespanCompat"
    );
    assert!(c.meshd.clamp_mss);
    let set = ok(&text.replace(
        "kubespanCompat: true",
        "kubespanCompat: true\n  listenPort: 51900\n  clampMSS: false",
    ));
    assert_eq!((set.meshd.listen_port, set.meshd.clamp_mss), (51900, false));
    let plain = ok(&text.replace("kubespanCompat: true", "kubespanCompat: false"));
    assert_eq!(plain.meshd.listen_port, 51821);
    assert_eq!(c.meshd.peers.len(), 1);
    assert_eq!(c.meshd.endpoint_filter.rules.len(), 2);
    assert_eq!(c.apiprism.upstreams.len(), 2);
    assert_eq!(c.apiprism.upstreams[1].port, 443);
    assert_eq!(
        c.apiprism.health_check.interval,
        std::time::Duration::from_millis(500)
    );
    assert_eq!(c.dnslocal.upstreams.len(), 2);
    assert!(c.dnslocal.cache.serve_stale.is_zero());
    // Equality ignores provenance: the same values on other lines compare equal.
    let moved = ok(&format!("# a comment moves every line\n{text}"));
    assert_eq!(c, moved);
}
