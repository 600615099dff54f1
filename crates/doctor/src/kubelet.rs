//! What the kubelet is told: its cluster DNS servers and its API server, from the files each distribution
//! keeps them in. Every file is hostile input: size-limited, parsed leniently, never trusted to be well formed.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Files larger than this are not read (a kubelet config is a few KiB).
const MAX_FILE: u64 = 1 << 20;

/// Where kubeadm, k3s and Talos keep the kubelet's settings (`KubeletConfiguration`, k3s's config file).
pub const KUBELET_CONFIGS: [&str; 3] = [
    "/var/lib/kubelet/config.yaml", // kubeadm (KubeletConfiguration)
    // Talos: internal/app/machined/pkg/controllers/k8s/kubelet_service.go writes the KubeletConfiguration here
    "/etc/kubernetes/kubelet.yaml",
    "/etc/rancher/k3s/config.yaml", // k3s: `cluster-dns`, or `kubelet-arg: [cluster-dns=...]`
];

pub use hybridnet_config::KUBELET_KUBECONFIGS;

/// A value and where it was read (file and key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found<T> {
    pub value: T,
    pub source: String,
}

/// Reads a small YAML file into one JSON value per document.
pub fn read_yaml(path: &Path) -> Result<Vec<Value>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_FILE {
        return Err(format!("{}: larger than {MAX_FILE} bytes", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_saphyr::from_multiple::<Value>(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Cluster DNS servers from one file: a `KubeletConfiguration` (`clusterDNS`), a k3s config (`cluster-dns`,
/// `kubelet-arg: cluster-dns=`), or a Talos machine config (`machine.kubelet.clusterDNS`). `Ok(None)`: the
/// file says nothing about it.
pub fn cluster_dns_in(path: &Path) -> Result<Option<Found<Vec<IpAddr>>>, String> {
    let docs = read_yaml(path)?;
    for doc in &docs {
        let candidates = [
            ("clusterDNS", &doc["clusterDNS"]),
            (
                "machine.kubelet.clusterDNS",
                &doc["machine"]["kubelet"]["clusterDNS"],
            ),
            ("cluster-dns", &doc["cluster-dns"]),
        ];
        for (key, v) in candidates {
            if let Some(ips) = ips_of(v) {
                return Ok(Some(Found {
                    value: ips,
                    source: format!("{} {key}", path.display()),
                }));
            }
        }
        if let Some(args) = doc["kubelet-arg"].as_array() {
            for arg in args.iter().filter_map(Value::as_str) {
                let arg = arg.trim_start_matches("--");
                if let Some(list) = arg.strip_prefix("cluster-dns=") {
                    return Ok(Some(Found {
                        value: parse_ips(list.split(','))?,
                        source: format!("{} kubelet-arg cluster-dns", path.display()),
                    }));
                }
            }
        }
    }
    Ok(None)
}

/// A list of IPs (or one comma-separated string, as k3s takes it); `None` when absent or empty.
fn ips_of(v: &Value) -> Option<Vec<IpAddr>> {
    let items: Vec<&str> = match v {
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        Value::String(s) => s.split(',').collect(),
        _ => return None,
    };
    let ips: Vec<IpAddr> = items.iter().filter_map(|s| s.trim().parse().ok()).collect();
    (!ips.is_empty()).then_some(ips)
}

fn parse_ips<'a>(items: impl Iterator<Item = &'a str>) -> Result<Vec<IpAddr>, String> {
    items
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("cluster-dns: {s:?} is not an IP address"))
        })
        .collect()
}

/// The API server URL of a kubeconfig's current context (or its only cluster).
pub fn kubeconfig_server(path: &Path) -> Result<Option<Found<String>>, String> {
    let docs = read_yaml(path)?;
    let Some(doc) = docs.first() else {
        return Ok(None);
    };
    let clusters = doc["clusters"].as_array().cloned().unwrap_or_default();
    let current = doc["current-context"].as_str();
    let cluster_name = doc["contexts"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == current))
        .and_then(|c| c["context"]["cluster"].as_str());
    let cluster = match cluster_name {
        Some(name) => clusters.iter().find(|c| c["name"].as_str() == Some(name)),
        None => clusters.first(),
    };
    Ok(cluster
        .and_then(|c| c["cluster"]["server"].as_str())
        .map(|server| Found {
            value: server.to_owned(),
            source: format!("{} server", path.display()),
        }))
}

/// `host:port` of an `https://host:port/...` URL (port 443 when absent). IPv6 hosts keep their brackets.
pub fn url_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse().ok()?),
        _ => (authority, 443),
    };
    Some((host.trim_matches(['[', ']']).to_owned(), port))
}

/// The first file of `candidates` that exists.
pub fn first_existing(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
        f
    }

    #[test]
    fn cluster_dns_from_each_distribution() {
        let kubeadm = file(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nclusterDNS:\n- 10.96.0.10\n",
        );
        let talos = file(
            "version: v1alpha1\nmachine:\n  kubelet:\n    clusterDNS: [169.254.20.10]\n---\napiVersion: v1alpha1\nkind: HybridNetConfig\n",
        );
        let k3s = file("cluster-dns: 169.254.20.10\n");
        let k3s_arg =
            file("kubelet-arg:\n  - max-pods=200\n  - cluster-dns=169.254.20.10,10.43.0.10\n");
        let none = file("kind: KubeletConfiguration\nclusterDomain: cluster.local\n");
        let got = |f: &tempfile::NamedTempFile| {
            cluster_dns_in(f.path())
                .expect("parses")
                .map(|x| x.value.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(got(&kubeadm), Some(vec!["10.96.0.10".to_owned()]));
        assert_eq!(got(&talos), Some(vec!["169.254.20.10".to_owned()]));
        assert_eq!(got(&k3s), Some(vec!["169.254.20.10".to_owned()]));
        assert_eq!(
            got(&k3s_arg),
            Some(vec!["169.254.20.10".to_owned(), "10.43.0.10".to_owned()])
        );
        assert_eq!(got(&none), None);
        assert!(cluster_dns_in(file("kubelet-arg: [cluster-dns=nope]").path()).is_err());
        assert!(cluster_dns_in(file("a: [unclosed").path()).is_err());
    }

    #[test]
    fn kubeconfig_server_of_the_current_context() {
        let kc = file(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: other\n  cluster: {server: https://10.0.0.9:6443}\n- name: k\n  cluster: {server: https://127.0.0.1:7445}\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\ncurrent-context: c\n",
        );
        let got = kubeconfig_server(kc.path())
            .expect("parses")
            .expect("server");
        assert_eq!(got.value, "https://127.0.0.1:7445");
        assert_eq!(
            url_host_port(&got.value),
            Some(("127.0.0.1".to_owned(), 7445))
        );
        assert_eq!(
            url_host_port("https://[::1]:7445"),
            Some(("::1".to_owned(), 7445))
        );
        assert_eq!(
            url_host_port("https://api.example.com"),
            Some(("api.example.com".to_owned(), 443))
        );
        assert_eq!(url_host_port("https://h:notaport"), None);
    }
}
