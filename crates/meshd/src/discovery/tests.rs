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
            }),
            control_plane: Some(client::ControlPlane {
                api_server_port: 6443,
            }),
            ..client::Affiliate::default()
        },
        endpoints: Vec::new(),
        port: 51821,
        excluded: Vec::new(),
    }
}

#[test]
fn node_ids_are_stable_and_distinct() {
    assert_eq!(node_id(&key(1)), node_id(&key(1)));
    assert_ne!(node_id(&key(1)), node_id(&key(2)));
    assert_eq!(node_id(&key(1)).len(), 43);
}
