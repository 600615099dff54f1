use super::*;
use crate::wire::{name_to_wire, parse_query};

fn port(name: &str, protocol: &str, port: u16) -> Port {
    Port {
        name: name.into(),
        protocol: protocol.into(),
        port,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ep(addr: &str, hostname: Option<&str>, ready: bool, zone: Option<&str>) -> EndpointInfo {
    EndpointInfo {
        addresses: vec![ip(addr)],
        hostname: hostname.map(Into::into),
        ready,
        zone: zone.map(Into::into),
    }
}

/// kubernetes (ClusterIP, dual-stack, named and unnamed ports), db (headless, two ready endpoints in two
/// zones, one not ready), ext (ExternalName), empty (headless without endpoints), pub (headless,
/// publishNotReadyAddresses).
fn zone() -> Zone {
    let mut z = Zone::new("cluster.local", Some("zone-b".into()));
    z.upsert_service(ServiceInfo {
        namespace: "default".into(),
        name: "kubernetes".into(),
        kind: ServiceKind::ClusterIp(vec![ip("10.96.0.1"), ip("fd00:96::1")]),
        ports: vec![port("https", "tcp", 443), port("", "tcp", 80)],
        publish_not_ready: false,
    });
    z.upsert_service(ServiceInfo {
        namespace: "prod".into(),
        name: "db".into(),
        kind: ServiceKind::Headless,
        ports: vec![port("pg", "tcp", 5432)],
        publish_not_ready: false,
    });
    z.upsert_slice(SliceInfo {
        namespace: "prod".into(),
        name: "db-abc".into(),
        service: "db".into(),
        ports: vec![port("pg", "tcp", 15432)],
        endpoints: vec![
            ep("10.0.1.1", Some("db-0"), true, Some("zone-a")),
            ep("10.0.2.2", Some("db-1"), true, Some("zone-b")),
            ep("10.0.3.3", Some("db-2"), false, Some("zone-b")),
            ep("10.0.4.4", None, true, None),
        ],
    });
    z.upsert_service(ServiceInfo {
        namespace: "prod".into(),
        name: "ext".into(),
        kind: ServiceKind::ExternalName("www.example.com".into()),
        ports: Vec::new(),
        publish_not_ready: false,
    });
    z.upsert_service(ServiceInfo {
        namespace: "prod".into(),
        name: "empty".into(),
        kind: ServiceKind::Headless,
        ports: Vec::new(),
        publish_not_ready: false,
    });
    z.upsert_service(ServiceInfo {
        namespace: "prod".into(),
        name: "pub".into(),
        kind: ServiceKind::Headless,
        ports: Vec::new(),
        publish_not_ready: true,
    });
    z.upsert_slice(SliceInfo {
        namespace: "prod".into(),
        name: "pub-1".into(),
        service: "pub".into(),
        ports: Vec::new(),
        endpoints: vec![ep("10.0.9.9", None, false, None)],
    });
    z
}

fn look(z: &Zone, name: &str, qtype: u16) -> Lookup {
    z.lookup(&name_to_wire(name), qtype)
}

fn data(l: &Lookup) -> Vec<Rdata> {
    match l {
        Lookup::Answer(a, _) => a.iter().map(|r| r.data.clone()).collect(),
        other => panic!("not an answer: {other:?}"),
    }
}

#[test]
fn cluster_ip_services_answer_a_and_aaaa() {
    let z = zone();
    let n = "kubernetes.default.svc.cluster.local";
    assert_eq!(
        data(&look(&z, n, TYPE_A)),
        vec![Rdata::A("10.96.0.1".parse().unwrap())]
    );
    assert_eq!(
        data(&look(&z, n, TYPE_AAAA)),
        vec![Rdata::Aaaa("fd00:96::1".parse().unwrap())]
    );
    assert_eq!(look(&z, n, TYPE_TXT), Lookup::NoData);
    assert_eq!(
        look(&z, "Kubernetes.DEFAULT.svc.cluster.local", TYPE_A),
        look(&z, n, TYPE_A),
        "case-insensitive"
    );
    assert_eq!(
        look(&z, "nope.default.svc.cluster.local", TYPE_A),
        Lookup::NxDomain
    );
}

#[test]
fn srv_for_named_ports_only() {
    let z = zone();
    let srv = look(
        &z,
        "_https._tcp.kubernetes.default.svc.cluster.local",
        TYPE_SRV,
    );
    let Lookup::Answer(a, extra) = &srv else {
        panic!("{srv:?}")
    };
    assert_eq!(
        a[0].data,
        Rdata::Srv {
            priority: 0,
            weight: 100,
            port: 443,
            target: name_to_wire("kubernetes.default.svc.cluster.local")
        }
    );
    assert_eq!(a.len(), 1);
    assert_eq!(extra.len(), 2, "A and AAAA of the target");
    assert_eq!(
        look(
            &z,
            "_https._tcp.kubernetes.default.svc.cluster.local",
            TYPE_A
        ),
        Lookup::NoData
    );
    assert_eq!(
        look(
            &z,
            "_http._tcp.kubernetes.default.svc.cluster.local",
            TYPE_SRV
        ),
        Lookup::NxDomain
    );
    assert_eq!(
        look(
            &z,
            "_https._udp.kubernetes.default.svc.cluster.local",
            TYPE_SRV
        ),
        Lookup::NxDomain
    );
    // `_tcp.<svc>` exists (names below it), `_udp.<svc>` does not.
    assert_eq!(
        look(&z, "_tcp.kubernetes.default.svc.cluster.local", TYPE_A),
        Lookup::NoData
    );
    assert_eq!(
        look(&z, "_udp.kubernetes.default.svc.cluster.local", TYPE_A),
        Lookup::NxDomain
    );
}

#[test]
fn headless_services_answer_ready_endpoints_local_zone_first() {
    let z = zone();
    assert_eq!(
        data(&look(&z, "db.prod.svc.cluster.local", TYPE_A)),
        ["10.0.2.2", "10.0.1.1", "10.0.4.4"]
            .iter()
            .map(|a| Rdata::A(a.parse().unwrap()))
            .collect::<Vec<_>>(),
        "zone-b first, the not-ready endpoint left out"
    );
    assert_eq!(
        look(&z, "db.prod.svc.cluster.local", TYPE_AAAA),
        Lookup::NoData
    );
    assert_eq!(
        data(&look(&z, "db-0.db.prod.svc.cluster.local", TYPE_A)),
        vec![Rdata::A("10.0.1.1".parse().unwrap())]
    );
    assert_eq!(
        data(&look(&z, "10-0-4-4.db.prod.svc.cluster.local", TYPE_A)),
        vec![Rdata::A("10.0.4.4".parse().unwrap())],
        "an endpoint without hostname is named by its dashed address"
    );
    assert_eq!(
        look(&z, "db-2.db.prod.svc.cluster.local", TYPE_A),
        Lookup::NxDomain,
        "not ready"
    );
    assert_eq!(
        look(&z, "empty.prod.svc.cluster.local", TYPE_A),
        Lookup::NxDomain,
        "the spec: no ready endpoint, NXDOMAIN"
    );
    assert_eq!(
        data(&look(&z, "pub.prod.svc.cluster.local", TYPE_A)),
        vec![Rdata::A("10.0.9.9".parse().unwrap())],
        "publishNotReadyAddresses"
    );
}

#[test]
fn headless_srv_per_ready_endpoint_with_slice_ports() {
    let z = zone();
    let l = look(&z, "_pg._tcp.db.prod.svc.cluster.local", TYPE_SRV);
    let targets: Vec<(u16, String)> = data(&l)
        .into_iter()
        .map(|d| match d {
            Rdata::Srv { port, target, .. } => (port, crate::wire::wire_to_name(&target)),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        targets,
        vec![
            (15432, "db-1.db.prod.svc.cluster.local.".into()),
            (15432, "db-0.db.prod.svc.cluster.local.".into()),
            (15432, "10-0-4-4.db.prod.svc.cluster.local.".into()),
        ]
    );
}

#[test]
fn ptr_for_service_and_headless_endpoint_addresses() {
    let z = zone();
    assert_eq!(
        data(&look(&z, "1.0.96.10.in-addr.arpa", TYPE_PTR)),
        vec![Rdata::Ptr(name_to_wire(
            "kubernetes.default.svc.cluster.local"
        ))]
    );
    let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa";
    assert_eq!(
        data(&look(&z, v6, TYPE_PTR)),
        vec![Rdata::Ptr(name_to_wire(
            "kubernetes.default.svc.cluster.local"
        ))]
    );
    assert_eq!(
        data(&look(&z, "1.1.0.10.in-addr.arpa", TYPE_PTR)),
        vec![Rdata::Ptr(name_to_wire("db-0.db.prod.svc.cluster.local"))]
    );
    assert_eq!(look(&z, "1.0.96.10.in-addr.arpa", TYPE_A), Lookup::NoData);
    assert_eq!(
        look(&z, "3.3.0.10.in-addr.arpa", TYPE_PTR),
        Lookup::NotOurs,
        "not ready: kube-dns or the upstreams decide"
    );
    assert_eq!(look(&z, "8.8.8.8.in-addr.arpa", TYPE_PTR), Lookup::NotOurs);
    assert_eq!(look(&z, "example.com", TYPE_A), Lookup::NotOurs);
}

#[test]
fn external_name_is_a_cname_for_every_type() {
    let z = zone();
    for t in [TYPE_A, TYPE_AAAA, TYPE_CNAME] {
        assert_eq!(
            data(&look(&z, "ext.prod.svc.cluster.local", t)),
            vec![Rdata::Cname(name_to_wire("www.example.com"))]
        );
    }
}

#[test]
fn version_apex_pods_and_negative_answers() {
    let z = zone();
    assert_eq!(
        data(&look(&z, "dns-version.cluster.local", TYPE_TXT)),
        vec![Rdata::Txt("1.1.0".into())]
    );
    assert_eq!(
        look(&z, "dns-version.cluster.local", TYPE_A),
        Lookup::NoData
    );
    assert_eq!(data(&look(&z, "cluster.local", TYPE_SOA)), vec![Rdata::Soa]);
    assert_eq!(look(&z, "cluster.local", TYPE_A), Lookup::NoData);
    assert_eq!(look(&z, "svc.cluster.local", TYPE_A), Lookup::NoData);
    assert_eq!(look(&z, "prod.svc.cluster.local", TYPE_A), Lookup::NoData);
    assert_eq!(look(&z, "nons.svc.cluster.local", TYPE_A), Lookup::NxDomain);
    assert_eq!(look(&z, "foo.cluster.local", TYPE_A), Lookup::NxDomain);
    assert_eq!(
        data(&look(&z, "10-244-1-7.prod.pod.cluster.local", TYPE_A)),
        vec![Rdata::A("10.244.1.7".parse().unwrap())]
    );
    assert_eq!(
        data(&look(&z, "fd00--7.prod.pod.cluster.local", TYPE_AAAA)),
        vec![Rdata::Aaaa("fd00::7".parse().unwrap())]
    );
    assert_eq!(
        look(&z, "10-244-1-7.prod.pod.cluster.local", TYPE_AAAA),
        Lookup::NoData
    );
    assert_eq!(
        look(&z, "bogus.prod.pod.cluster.local", TYPE_A),
        Lookup::NxDomain
    );
}

#[test]
fn updates_and_removals_move_the_indexes() {
    let mut z = zone();
    z.remove_service("default", "kubernetes");
    assert_eq!(
        look(&z, "kubernetes.default.svc.cluster.local", TYPE_A),
        Lookup::NxDomain
    );
    assert_eq!(
        look(&z, "default.svc.cluster.local", TYPE_A),
        Lookup::NxDomain
    );
    assert_eq!(
        look(&z, "1.0.96.10.in-addr.arpa", TYPE_PTR),
        Lookup::NotOurs
    );
    z.remove_slice("prod", "db-abc");
    assert_eq!(
        look(&z, "db.prod.svc.cluster.local", TYPE_A),
        Lookup::NxDomain
    );
    assert_eq!(look(&z, "1.1.0.10.in-addr.arpa", TYPE_PTR), Lookup::NotOurs);
    let snap = zone().snapshot();
    let mut restored = Zone::new("cluster.local", Some("zone-b".into()));
    restored.restore(snap.clone());
    assert_eq!(restored.snapshot(), snap);
    assert_eq!(restored.counts(), (5, 2, 5));
}

#[test]
fn reverse_names_parse_strictly() {
    let rev = |n: &str| reverse_ip(&labels(&name_to_wire(n)).unwrap());
    assert_eq!(rev("4.3.2.1.in-addr.arpa"), Some(ip("1.2.3.4")));
    assert_eq!(rev("04.3.2.1.in-addr.arpa"), None);
    assert_eq!(rev("256.3.2.1.in-addr.arpa"), None);
    assert_eq!(rev("3.2.1.in-addr.arpa"), None);
    assert_eq!(rev("x.ip6.arpa"), None);
}

/// A client's query, ID 0x1234 (EDNS with a 1232-byte payload when `edns`).
fn query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    crate::wire::testing::query_with_id(
        name,
        hickory_proto::rr::RecordType::from(qtype),
        0x1234,
        edns.then_some((1232, false)),
    )
}

fn rendered(
    z: &Zone,
    name: &str,
    qtype: u16,
    edns: bool,
    limit: usize,
) -> hickory_proto::op::Message {
    let buf = query(name, qtype, edns);
    let q = parse_query(&buf).unwrap();
    let l = z.lookup(q.qname(), qtype);
    let mut out = Vec::new();
    let p = encode::Params {
        apex: z.apex(),
        ttl: 5,
        serial: 7,
    };
    assert!(encode::render(&l, &buf, &q, limit, &p, &mut out));
    hickory_proto::op::Message::from_vec(&out).unwrap()
}

#[test]
fn answers_render_authoritative_with_the_clients_case_and_soa_when_negative() {
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::RecordType;
    let z = zone();
    let m = rendered(&z, "DB.prod.svc.cluster.local", TYPE_A, true, 1232);
    assert!(m.metadata.authoritative);
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.answers.len(), 3);
    assert_eq!(m.answers[0].name.to_string(), "DB.prod.svc.cluster.local.");
    assert_eq!(m.answers[0].ttl, 5);
    assert!(m.edns.is_some());
    let m = rendered(&z, "nope.prod.svc.cluster.local", TYPE_A, false, 512);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities.len(), 1);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(m.authorities[0].name.to_string(), "cluster.local.");
    let m = rendered(&z, "db.prod.svc.cluster.local", TYPE_AAAA, false, 512);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1);
    let m = rendered(
        &z,
        "_https._tcp.kubernetes.default.svc.cluster.local",
        TYPE_SRV,
        false,
        512,
    );
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.additionals.len(), 2);
}

#[test]
fn large_headless_answers_truncate_over_udp() {
    let mut z = Zone::new("cluster.local", None);
    z.upsert_service(ServiceInfo {
        namespace: "n".into(),
        name: "big".into(),
        kind: ServiceKind::Headless,
        ports: Vec::new(),
        publish_not_ready: false,
    });
    z.upsert_slice(SliceInfo {
        namespace: "n".into(),
        name: "big-1".into(),
        service: "big".into(),
        ports: Vec::new(),
        endpoints: (0..100)
            .map(|i| ep(&format!("10.1.0.{i}"), None, true, None))
            .collect(),
    });
    let m = rendered(&z, "big.n.svc.cluster.local", TYPE_A, false, 512);
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    let m = rendered(&z, "big.n.svc.cluster.local", TYPE_A, false, 65535);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
}

/// Random names built from the zone's own vocabulary (and random bytes), every type: lookup and render
/// never panic, and an answer fits the client's limit (the `cluster_zone` fuzz target does this at length).
#[test]
fn random_names_never_panic_and_answers_fit() {
    let z = zone();
    let words: [&[u8]; 16] = [
        b"svc",
        b"pod",
        b"cluster",
        b"local",
        b"db",
        b"prod",
        b"_pg",
        b"_tcp",
        b"db-0",
        b"10-0-1-1",
        b"in-addr",
        b"arpa",
        b"ip6",
        b"1",
        b"fd00--1",
        b"\xff\x00.",
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..50_000 {
        let mut name = Vec::new();
        for _ in 0..rng.usize(0..8) {
            let w: Vec<u8> = if rng.u8(..) < 20 {
                (0..rng.usize(1..70)).map(|_| rng.u8(..)).collect()
            } else {
                words[rng.usize(..words.len())].to_vec()
            };
            name.push(w.len().min(63) as u8);
            name.extend_from_slice(&w[..w.len().min(63)]);
        }
        if name.len() > 200 {
            continue;
        }
        name.extend_from_slice(&name_to_wire("cluster.local")[..if rng.bool() { 15 } else { 1 }]);
        let qtype = [
            TYPE_A, TYPE_AAAA, TYPE_SRV, TYPE_PTR, TYPE_TXT, TYPE_SOA, TYPE_CNAME, 99,
        ][rng.usize(..8)];
        let mut buf = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        buf.extend_from_slice(&name);
        buf.extend_from_slice(&qtype.to_be_bytes());
        buf.extend_from_slice(&[0, 1]);
        let Ok(q) = parse_query(&buf) else { continue };
        let l = z.lookup(q.qname(), q.qtype);
        let p = encode::Params {
            apex: z.apex(),
            ttl: 5,
            serial: 1,
        };
        let mut out = Vec::new();
        if encode::render(&l, &buf, &q, 512, &p, &mut out) {
            assert!(
                out.len() <= 512,
                "{} bytes for {:?}",
                out.len(),
                crate::wire::wire_to_name(q.qname())
            );
        }
    }
}
