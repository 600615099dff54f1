use super::*;

fn key(b: u8) -> PublicKey {
    PublicKey([b; 32])
}

fn affiliate(id: &str, name: &str, k: Option<u8>) -> Affiliate {
    Affiliate {
        id: id.into(),
        node_id: id.into(),
        nodename: name.into(),
        public_key: k.map(key),
        ..Affiliate::default()
    }
}

#[test]
fn merge_by_node_id_unions_lists_and_last_non_empty_scalar_wins() {
    let mut a = affiliate("n1", "node1", Some(1));
    a.addresses = vec!["192.0.2.1".parse().unwrap()];
    a.endpoints = vec!["192.0.2.1:51821".parse().unwrap()];
    let mut b = affiliate("n1", "", None);
    b.hostname = "node1.example".into();
    b.addresses = vec![
        "192.0.2.1".parse().unwrap(),
        "198.51.100.1".parse().unwrap(),
    ];
    b.endpoints = vec!["198.51.100.1:51821".parse().unwrap()];
    b.api_server_port = Some(6443);
    let c = affiliate("n2", "node2", Some(2));
    let merged = merge([&a, &c, &b]);
    assert_eq!(merged.len(), 2);
    let m = &merged[0];
    assert_eq!(m.nodename, "node1", "an empty scalar does not erase");
    assert_eq!(m.hostname, "node1.example");
    assert_eq!(m.public_key, Some(key(1)));
    assert_eq!(m.addresses.len(), 2);
    assert_eq!(m.endpoints.len(), 2);
    assert_eq!(m.api_server_port, Some(6443));
}

#[test]
fn decode_keeps_good_endpoints_and_reports_bad_ones() {
    let c = Codec::new(&[9; 32]);
    let local = local_for_test();
    let rec = server::Affiliate {
        id: "n1".into(),
        data: c.seal_affiliate(&local.affiliate),
        endpoints: vec![
            c.seal_endpoint("192.0.2.1:51821".parse().unwrap()),
            vec![1, 2, 3],
            c.seal_endpoint("192.0.2.1:51821".parse().unwrap()),
            Codec::new(&[1; 32]).seal_endpoint("192.0.2.9:51821".parse().unwrap()),
        ],
    };
    let (a, dropped) = decode(&c, &rec).unwrap();
    assert_eq!(a.endpoints, vec!["192.0.2.1:51821".parse().unwrap()]);
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert_eq!(a.name(), "n1-name");
    assert_eq!(a.api_server_port, Some(6443));
    assert_eq!(a.additional, vec!["10.99.0.1/32".parse::<IpNet>().unwrap()]);
    let other = Codec::new(&[1; 32]);
    assert_eq!(decode(&other, &rec).unwrap_err(), Rejected::Decrypt);
}

fn local_for_test() -> Local {
    Local {
        affiliate: client::Affiliate {
            node_id: "n1".into(),
            nodename: "n1-name".into(),
            kubespan: Some(client::KubeSpan {
                public_key: key(5).to_string(),
                address: codec::ip_bytes("fd00::5".parse().unwrap()),
                additional_addresses: vec![codec::prefix_to(&"10.99.0.1/32".parse().unwrap())],
                exclude_advertised_addresses: Vec::new(),
            }),
            control_plane: Some(client::ControlPlane {
                api_server_port: 6443,
            }),
            ..client::Affiliate::default()
        },
        endpoints: Vec::new(),
        extra: Vec::new(),
        filter: hybridnet_config::EndpointFilter::default(),
        port: 51821,
        excluded: Vec::new(),
    }
}

#[test]
fn endpoints_are_published_in_talos_order() {
    use hybridnet_config::{EndpointFilter, FilterRule};
    let ep = |s: &str| s.parse::<SocketAddr>().unwrap();
    let mut l = local_for_test();
    l.port = 51820;
    l.endpoints = vec![ep("192.168.1.5:51820"), ep("[2001:db8::5]:51820")];
    l.extra = vec![ep("203.0.113.9:40000")];
    // Node addresses, the Hello address on the port, then the extra endpoints.
    assert_eq!(
        l.endpoints_with(Some("198.51.100.7".parse().unwrap())),
        vec![
            ep("192.168.1.5:51820"),
            ep("[2001:db8::5]:51820"),
            ep("198.51.100.7:51820"),
            ep("203.0.113.9:40000")
        ]
    );
    // The Hello address goes through the endpoint filter (extras never do); no duplicates.
    l.filter = EndpointFilter::new(
        ["0.0.0.0/0", "!198.51.100.0/24"]
            .iter()
            .map(|r| FilterRule::parse(r).unwrap())
            .collect(),
    )
    .unwrap();
    assert_eq!(
        l.endpoints_with(Some("198.51.100.7".parse().unwrap())),
        vec![
            ep("192.168.1.5:51820"),
            ep("[2001:db8::5]:51820"),
            ep("203.0.113.9:40000")
        ]
    );
    assert_eq!(
        l.endpoints_with(Some("192.168.1.5".parse().unwrap())).len(),
        3
    );
}

#[test]
fn node_ids_are_stable_and_distinct() {
    assert_eq!(node_id(&key(1)), node_id(&key(1)));
    assert_ne!(node_id(&key(1)), node_id(&key(2)));
    assert_eq!(node_id(&key(1)).len(), 43);
}

#[test]
fn compat_peer_specs_use_talos_allowed_ips_and_announced_addresses() {
    let nets = |l: &[&str]| -> Vec<IpNet> { l.iter().map(|n| n.parse().unwrap()).collect() };
    let mut cfg = hybridnet_config::Config::defaults();
    // The cluster's mesh prefix (Talos's ULA for KubeSpan): announced mesh addresses lie in it.
    cfg.meshd.ula_prefix = Some("fd7f:175a:b97c:5602::/64".parse().unwrap());
    // Node "b" sorts before "c": it keeps the overlapping pod CIDR.
    let mut c = affiliate("c", "node-c", Some(3));
    c.addresses = vec!["192.168.3.7".parse().unwrap()];
    c.additional = nets(&["10.244.0.0/16"]);
    c.mesh_address = Some("fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169".parse().unwrap());
    let mut b = affiliate("b", "node-b", Some(2));
    b.addresses = vec![
        "192.168.3.5".parse().unwrap(),
        "203.0.113.5".parse().unwrap(),
    ];
    b.additional = nets(&["10.244.4.0/24"]);
    b.excluded = nets(&["203.0.113.0/24"]);
    b.mesh_address = Some("fd7f:175a:b97c:5602::b".parse().unwrap());
    let own = affiliate("a", "self", Some(1));
    let all = [c.clone(), own, b.clone()];
    // Default mode: KubeSpan address and additional addresses only, no overlap rule.
    let plain = peer_specs(&all, &cfg, &key(1));
    assert_eq!(plain.len(), 2, "our own record is not a peer");
    assert!(plain.iter().all(|s| s.allowed_ips.len() == 2));
    // A mesh address outside the mesh prefix is a claim on any address: refused, the rest is used.
    let mut stray = b.clone();
    stray.mesh_address = Some("2001:db8::66".parse().unwrap());
    let spec = peer_spec(&stray, &cfg).unwrap();
    assert_eq!(spec.allowed_ips, nets(&["10.244.4.0/24"]));
    assert_eq!(
        spec.refused,
        vec![(
            "2001:db8::66/128".parse().unwrap(),
            crate::plan::trust::Reason::MeshAddress
        )]
    );
    cfg.meshd.kubespan_compat = true;
    let specs = peer_specs(&all, &cfg, &key(1));
    assert_eq!(
        specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["node-b", "node-c"],
        "node ID order"
    );
    assert_eq!(
        specs[0].allowed_ips,
        nets(&[
            "10.244.4.0/24",
            "192.168.3.5/32",
            "fd7f:175a:b97c:5602::b/128"
        ]),
        "node addresses as hosts, excluded network gone"
    );
    assert_eq!(
        specs[1].allowed_ips,
        nets(&[
            "10.244.0.0/22",
            "10.244.5.0/24",
            "10.244.6.0/23",
            "10.244.8.0/21",
            "10.244.16.0/20",
            "10.244.32.0/19",
            "10.244.64.0/18",
            "10.244.128.0/17",
            "192.168.3.7/32",
            "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/128"
        ]),
        "node-b's /24 cut out of node-c's /16"
    );
    assert_eq!(
        specs[1].mesh_address,
        Some("fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169".parse().unwrap()),
        "the announced address, not one derived from the key"
    );
}
