use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use serde_json::json;

use super::node::{self, *};
use crate::discovery::{Local, codec, proto::client, subtract_all};

fn node_from(v: serde_json::Value) -> Node {
    serde_json::from_value(v).unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

const KEY: &str = "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=";

fn local() -> Local {
    Local {
        affiliate: client::Affiliate {
            node_id: "29QQTc97U5ZyFTIX33Dp9NqtwxqQI8QI13scCLzffrZ".into(),
            nodename: "bar".into(),
            addresses: vec![
                codec::ip_bytes("10.0.0.2".parse().unwrap()),
                codec::ip_bytes("192.168.3.4".parse().unwrap()),
            ],
            kubespan: Some(client::KubeSpan {
                public_key: KEY.into(),
                address: codec::ip_bytes(
                    "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0".parse().unwrap(),
                ),
                additional_addresses: vec![codec::prefix_to(&net("10.244.3.0/24"))],
                exclude_advertised_addresses: Vec::new(),
            }),
            control_plane: None,
            ..client::Affiliate::default()
        },
        endpoints: vec![
            "10.0.0.2:51820".parse().unwrap(),
            "[2001:db8::2]:51820".parse().unwrap(),
        ],
        extra: Vec::new(),
        filter: hybridnet_config::EndpointFilter::default(),
        port: 51820,
        excluded: vec![net("0.0.0.0/0"), net("::/0")],
    }
}

/// Talos's `TestAnnotationsFromAffiliate` "mixed" case: the same strings.
#[test]
fn annotations_use_talos_names_and_formats() {
    let a = annotations(&local());
    let get = |k: &str| a.get(k).cloned().unwrap();
    assert_eq!(get(NODE_ID), "29QQTc97U5ZyFTIX33Dp9NqtwxqQI8QI13scCLzffrZ");
    assert_eq!(get(SELF_IPS), "10.0.0.2,192.168.3.4");
    assert_eq!(get(API_SERVER_PORT), "");
    assert_eq!(get(KUBESPAN_IP), "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0");
    assert_eq!(get(PUBLIC_KEY), KEY);
    assert_eq!(get(ASSIGNED_PREFIXES), "10.244.3.0/24");
    assert_eq!(get(ENDPOINTS), "10.0.0.2:51820,[2001:db8::2]:51820");
    assert_eq!(get(EXCLUDED), "0.0.0.0/0,::/0");
    assert_eq!(a.len(), ALL.len());
    let mut cp = local();
    cp.affiliate.control_plane = Some(client::ControlPlane {
        api_server_port: 443,
    });
    assert_eq!(annotations(&cp).get(API_SERVER_PORT).unwrap(), "443");
}

/// Talos's `TestAffiliateFromNode` "discovered" node, plus status addresses and topology labels.
#[test]
fn a_talos_node_becomes_an_affiliate() {
    let n = node_from(json!({
        "metadata": {
            "name": "bar",
            "annotations": {
                "cluster.talos.dev/node-id": "29QQTc97U5ZyFTIX33Dp9NqtwxqQI8QI13scCLzffrZ",
                "networking.talos.dev/assigned-prefixes": "10.244.3.1/24",
                "networking.talos.dev/kubespan-endpoints": "10.0.0.2:51820,192.168.3.4:51820",
                "networking.talos.dev/kubespan-ip": "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0",
                "networking.talos.dev/kubespan-public-key": KEY,
                "networking.talos.dev/kubespan-exclude-advertised-networks": "0.0.0.0/0,::/0",
                "networking.talos.dev/self-ips": "10.0.0.2,192.168.3.4",
                "networking.talos.dev/api-server-port": "6443"
            },
            "labels": {
                "node-role.kubernetes.io/control-plane": "",
                "topology.kubernetes.io/region": "eu-west",
                "topology.kubernetes.io/zone": "eu-west-1a"
            }
        },
        "status": {"addresses": [
            {"type": "Hostname", "address": "foo.com"},
            {"type": "InternalIP", "address": "10.0.0.2"},
            {"type": "ExternalIP", "address": "203.0.113.9"}
        ]}
    }));
    let (a, bad) = affiliate(&n).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(a.node_id, "29QQTc97U5ZyFTIX33Dp9NqtwxqQI8QI13scCLzffrZ");
    assert_eq!(a.nodename, "bar");
    assert_eq!(a.hostname, "foo.com");
    assert_eq!(a.machine_type, "controlplane");
    assert_eq!(
        a.addresses,
        ["10.0.0.2", "192.168.3.4", "203.0.113.9"].map(|s| s.parse::<std::net::IpAddr>().unwrap())
    );
    assert_eq!(a.public_key.unwrap().to_string(), KEY);
    assert_eq!(
        a.mesh_address,
        Some("fd50:8d60:4238:6302:f857:23ff:fe21:d1e0".parse().unwrap())
    );
    assert_eq!(a.additional, vec![net("10.244.3.1/24")]);
    assert_eq!(a.endpoints.len(), 2);
    assert_eq!(a.excluded, vec![net("0.0.0.0/0"), net("::/0")]);
    assert_eq!(a.api_server_port, Some(6443));
    assert_eq!(a.location.as_deref(), Some("eu-west-1a"), "the zone wins");
}

#[test]
fn slim_nodes_keep_what_the_registry_reads() {
    let full = node_from(json!({
        "metadata": {"name": "n", "resourceVersion": "7", "uid": "u",
                     "labels": {LABEL_ZONE: "z"}, "annotations": {NODE_ID: "id", PUBLIC_KEY: KEY},
                     "managedFields": [{"manager": "kubelet"}]},
        "spec": {"podCIDRs": ["10.244.1.0/24"], "providerID": "p"},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                   "images": [{"names": ["a"], "sizeBytes": 1}]}
    }));
    let slim = node::slim(full.clone());
    assert_eq!(affiliate(&slim), affiliate(&full));
    assert_eq!(pod_cidrs(&slim), pod_cidrs(&full));
    assert_eq!(slim.metadata.resource_version.as_deref(), Some("7"));
    assert!(slim.metadata.managed_fields.is_none());
    assert!(slim.status.unwrap().images.is_none());
}

#[test]
fn what_we_publish_reads_back_the_same() {
    let l = local();
    let ann: BTreeMap<String, String> = annotations(&l)
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let n = node_from(json!({"metadata": {"name": "bar", "annotations": ann}}));
    let (a, bad) = affiliate(&n).unwrap();
    assert!(bad.is_empty());
    assert_eq!(a.endpoints, l.endpoints);
    assert_eq!(a.additional, vec![net("10.244.3.0/24")]);
    assert_eq!(a.excluded, l.excluded);
    assert_eq!(a.machine_type, "worker");
    assert_eq!(a.api_server_port, None);
    assert_eq!(a.location, None);
    // And a patch from those annotations to the same ones is empty.
    assert_eq!(patch(Some(&ann), &annotations(&l)), None);
}

#[test]
fn the_patch_sets_only_differences_and_nulls_emptied_values() {
    let want = annotations(&local());
    let full = patch(None, &want).unwrap();
    let set = full["metadata"]["annotations"].as_object().unwrap();
    assert_eq!(
        set.len(),
        7,
        "every non-empty value, no removal of absent ones: {set:?}"
    );
    let mut current: BTreeMap<String, String> = set
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    current.insert(API_SERVER_PORT.into(), "6443".into());
    current.insert("unrelated/annotation".into(), "kept".into());
    current.insert(PUBLIC_KEY.into(), "old".into());
    let p = patch(Some(&current), &want).unwrap();
    assert_eq!(
        p,
        json!({"metadata": {"annotations": {API_SERVER_PORT: null, PUBLIC_KEY: KEY}}})
    );
}

#[test]
fn nodes_without_a_node_id_are_skipped() {
    assert!(affiliate(&node_from(json!({"metadata": {"name": "w1"}}))).is_none());
    assert!(
        affiliate(&node_from(
            json!({"metadata": {"name": "w1", "annotations": {NODE_ID: "  "}}})
        ))
        .is_none()
    );
}

#[test]
fn bad_annotations_are_reported_and_the_rest_is_used() {
    let n = node_from(json!({"metadata": {"name": "x", "annotations": {
        NODE_ID: "id1",
        SELF_IPS: "10.0.0.1,not-an-ip,,10.0.0.1",
        KUBESPAN_IP: "fd00::zz",
        PUBLIC_KEY: "c2hvcnQ=",
        ASSIGNED_PREFIXES: "10.244.1.0/24,10.244.2.0/33",
        ENDPOINTS: "10.0.0.1:51820,10.0.0.1,[::1]:99999",
        API_SERVER_PORT: "http",
        EXCLUDED: "nope"
    }}, "status": {"addresses": [{"type": "InternalIP", "address": "garbage"}]}}));
    let (a, bad) = affiliate(&n).unwrap();
    let keys: Vec<&str> = bad.iter().map(|b| b.key).collect();
    assert_eq!(
        keys,
        vec![
            SELF_IPS,
            "status.addresses",
            API_SERVER_PORT,
            PUBLIC_KEY,
            KUBESPAN_IP,
            ASSIGNED_PREFIXES,
            ENDPOINTS,
            ENDPOINTS,
            EXCLUDED
        ]
    );
    assert_eq!(
        a.addresses,
        vec!["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(a.additional, vec![net("10.244.1.0/24")]);
    assert_eq!(a.endpoints, vec!["10.0.0.1:51820".parse().unwrap()]);
    assert_eq!(a.public_key, None, "a short key is no key");
    assert_eq!(a.mesh_address, None);
    assert!(bad[0].to_string().contains("not-an-ip"));
    // Without a key there is no peer.
    let cfg = hybridnet_config::Config::defaults();
    assert!(crate::discovery::peer_spec(&a, &cfg).is_none());
}

#[test]
fn junk_annotations_never_panic_and_long_values_are_cut() {
    let mut rng = fastrand::Rng::with_seed(7);
    let alphabet: Vec<char> = ",:/[]. 0123456789abcdefx\u{e9}\u{0}=".chars().collect();
    for _ in 0..2000 {
        let len = rng.usize(0..300);
        let junk: String = (0..len)
            .map(|_| alphabet[rng.usize(0..alphabet.len())])
            .collect();
        let mut ann = serde_json::Map::new();
        for k in ALL {
            ann.insert(k.into(), json!(junk.clone()));
        }
        ann.insert(NODE_ID.into(), json!("id"));
        let n = node_from(json!({"metadata": {"name": "j", "annotations": ann,
            "labels": {LABEL_ZONE: junk.clone()}},
            "spec": {"podCIDRs": [junk.clone()]}}));
        if let Some((_, bad)) = affiliate(&n) {
            assert!(bad.iter().all(|b| b.value.chars().count() <= 80));
        }
        let _ = pod_cidrs(&n);
    }
}

#[test]
fn huge_annotations_are_bounded() {
    let many: Vec<String> = (0..20_000)
        .map(|i| format!("10.{}.{}.0/24", i / 256 % 256, i % 256))
        .collect();
    let junk = vec!["x"; 20_000].join(",");
    let n = node_from(json!({"metadata": {"name": "big", "annotations": {
        NODE_ID: "id", ASSIGNED_PREFIXES: many.join(","), EXCLUDED: many.join(","), SELF_IPS: junk
    }}}));
    let t = std::time::Instant::now();
    let (a, bad) = affiliate(&n).unwrap();
    assert_eq!(a.additional.len(), node::PREFIXES_MAX);
    assert_eq!(a.excluded.len(), node::EXCLUDED_MAX);
    assert_eq!(bad.len(), 2 + node::BAD_MAX, "{bad:?}");
    let allowed = subtract_all(&a.additional, &a.excluded);
    assert_eq!(allowed.len(), node::PREFIXES_MAX - node::EXCLUDED_MAX);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn location_prefers_the_zone_then_the_region() {
    let with =
        |labels: serde_json::Value| node_from(json!({"metadata": {"name": "n", "labels": labels}}));
    assert_eq!(
        location(&with(json!({LABEL_REGION: "eu", LABEL_ZONE: "eu-1"}))).as_deref(),
        Some("eu-1")
    );
    assert_eq!(
        location(&with(json!({LABEL_REGION: "eu"}))).as_deref(),
        Some("eu")
    );
    assert_eq!(
        location(&with(json!({LABEL_REGION: "eu", LABEL_ZONE: ""}))).as_deref(),
        Some("eu")
    );
    assert_eq!(location(&with(json!({}))), None);
}

#[test]
fn pod_cidrs_come_from_the_spec() {
    let n = node_from(json!({"metadata": {"name": "n"}, "spec": {
        "podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64", "bad"]}}));
    let (cidrs, bad) = pod_cidrs(&n);
    assert_eq!(cidrs, vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")]);
    assert_eq!(bad.len(), 1);
    let old = node_from(json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.244.7.0/24"}}));
    assert_eq!(pod_cidrs(&old).0, vec![net("10.244.7.0/24")]);
    assert!(
        pod_cidrs(&node_from(json!({"metadata": {"name": "n"}})))
            .0
            .is_empty()
    );
}

#[test]
fn excluded_networks_are_subtracted_from_allowed_ips() {
    let nets = [net("10.244.0.0/16"), net("10.99.0.1/32"), net("fd00::/64")];
    assert_eq!(
        subtract_all(&nets, &[net("0.0.0.0/0")]),
        vec![net("fd00::/64")]
    );
    assert_eq!(subtract_all(&nets, &[]), nets.to_vec());
    let split = subtract_all(&[net("10.244.0.0/22")], &[net("10.244.1.0/24")]);
    assert_eq!(
        split,
        vec![net("10.244.0.0/24"), net("10.244.2.0/23")],
        "the parts outside the exclusion stay"
    );
    assert_eq!(
        subtract_all(&[net("10.0.0.0/8")], &[net("10.1.2.3/32")]).len(),
        24
    );
}

#[test]
fn pod_cidrs_join_our_additional_addresses_only_when_advertised() {
    let mut cfg = hybridnet_config::Config::defaults();
    cfg.meshd.addresses = vec![net("10.99.0.1/32")];
    let key = hybridnet_config::PublicKey([3; 32]);
    let pods = [net("10.244.1.0/24")];
    let additional = |cfg: &hybridnet_config::Config| -> Vec<IpNet> {
        crate::discovery::local(cfg, &key, "fd00::1".parse().unwrap(), &[], &pods)
            .affiliate
            .kubespan
            .unwrap()
            .additional_addresses
            .iter()
            .filter_map(codec::prefix_from)
            .collect()
    };
    assert_eq!(additional(&cfg), vec![net("10.99.0.1/32")]);
    cfg.meshd.advertise_kubernetes_networks = true;
    assert_eq!(
        additional(&cfg),
        vec![net("10.99.0.1/32"), net("10.244.1.0/24")]
    );
    // An address inside our pod CIDR (a CNI bridge's) is no node address and no endpoint.
    let ips: Vec<std::net::IpAddr> =
        vec!["192.0.2.1".parse().unwrap(), "10.244.1.1".parse().unwrap()];
    let l = crate::discovery::local(&cfg, &key, "fd00::1".parse().unwrap(), &ips, &pods);
    assert_eq!(l.endpoints, vec!["192.0.2.1:51821".parse().unwrap()]);
    assert_eq!(l.affiliate.addresses.len(), 1);
    let _ = node::ALL;
}

#[test]
fn which_registries_run() {
    use crate::discovery::DiscoveryKey;
    let mut cfg = hybridnet_config::Config::defaults();
    assert!(DiscoveryKey::of(&cfg).is_none(), "discovery off");
    cfg.cluster.discovery.enabled = true;
    cfg.cluster.discovery.kubernetes_registry = true;
    let k = DiscoveryKey::of(&cfg).unwrap();
    assert!(k.endpoints().is_empty(), "no cluster secret: no service");
    let s = k.kubernetes().unwrap();
    assert!(s.registry && s.publish && !s.pod_cidrs);
    // Talos's own KubeSpan on this node owns the annotations: read only.
    cfg.cluster.kubespan_enabled = true;
    assert!(
        !DiscoveryKey::of(&cfg)
            .unwrap()
            .kubernetes()
            .unwrap()
            .publish
    );
    // Only the service, with advertiseKubernetesNetworks: a read-only client for our pod CIDRs.
    cfg.cluster.kubespan_enabled = false;
    cfg.cluster.discovery.kubernetes_registry = false;
    cfg.cluster.discovery.endpoints = vec!["http://192.0.2.1:3000/".into()];
    cfg.cluster.id = Some("0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w=".into());
    cfg.cluster.secret = Some(hybridnet_config::Secret([7; 32]));
    assert!(DiscoveryKey::of(&cfg).unwrap().kubernetes().is_none());
    cfg.meshd.advertise_kubernetes_networks = true;
    let k = DiscoveryKey::of(&cfg).unwrap();
    assert_eq!(k.endpoints().len(), 1);
    let s = k.kubernetes().unwrap();
    assert!(!s.registry && s.pod_cidrs);
}

/// A Node routes only its own pods: assigned prefixes in pod space must lie in its `spec.podCIDRs` (the
/// cluster pod subnets without them) and touch no other Node's; prefixes outside pod space go on to the
/// mesh's screen.
#[test]
fn assigned_prefixes_must_lie_in_the_nodes_pod_cidrs() {
    let with_cidrs = |cidrs: serde_json::Value| {
        node_from(json!({
            "metadata": {"name": "n2", "annotations": {NODE_ID: "id-2", ASSIGNED_PREFIXES:
                "10.244.2.0/24,10.244.2.128/25,10.244.1.0/24,10.244.99.0/24,10.99.0.2/32,0.0.0.0/0"}},
            "spec": {"podCIDRs": cidrs},
        }))
    };
    let pod_subnets = [net("10.244.0.0/16")];
    let others = [net("10.244.1.0/24")];
    let n = with_cidrs(json!(["10.244.2.0/24"]));
    let (mut a, _) = affiliate(&n).unwrap();
    bound(&mut a, &n, &pod_subnets, &others);
    assert_eq!(
        a.additional,
        [
            net("10.244.2.0/24"),
            net("10.244.2.128/25"),
            net("10.99.0.2/32")
        ],
        "its own pods, and what is not pod space (the mesh screen checks that)"
    );
    assert_eq!(
        a.refused,
        [
            net("10.244.1.0/24"),
            net("10.244.99.0/24"),
            net("0.0.0.0/0")
        ]
    );
    // Without spec.podCIDRs: the cluster pod subnets, minus the other Nodes' pod CIDRs.
    let n = with_cidrs(json!([]));
    let (mut a, _) = affiliate(&n).unwrap();
    bound(&mut a, &n, &pod_subnets, &others);
    assert_eq!(a.refused, [net("10.244.1.0/24"), net("0.0.0.0/0")]);
    // Neither: nothing in pod space (other Nodes' CIDRs) is its.
    let (mut a, _) = affiliate(&n).unwrap();
    bound(&mut a, &n, &[], &others);
    assert_eq!(a.refused, [net("10.244.1.0/24"), net("0.0.0.0/0")]);
}
