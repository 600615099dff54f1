//! dnslocal's cluster zone (`clusterZone: kubernetes`): arbitrary bytes as a client query answered from
//! a fixed zone (ClusterIP, headless with hostnames, ExternalName), through the name parsing of
//! `zone::lookup` (service, endpoint, SRV, pod and reverse names) and `zone::encode::render`. Nothing may
//! panic; an answer must fit the client's limit.
#![no_main]

use std::sync::LazyLock;

use hybridnet_dnslocal::wire;
use hybridnet_dnslocal::zone::{
    EndpointInfo, Port, ServiceInfo, ServiceKind, SliceInfo, Zone, encode,
};
use libfuzzer_sys::fuzz_target;

static ZONE: LazyLock<Zone> = LazyLock::new(|| {
    let mut z = Zone::new("cluster.local", Some("a".into()));
    let port = |n: &str| Port { name: n.into(), protocol: "tcp".into(), port: 80 };
    z.upsert_service(ServiceInfo {
        namespace: "default".into(),
        name: "kubernetes".into(),
        kind: ServiceKind::ClusterIp(vec!["10.96.0.1".parse().unwrap(), "fd00::1".parse().unwrap()]),
        ports: vec![port("https"), port("")],
        publish_not_ready: false,
    });
    z.upsert_service(ServiceInfo {
        namespace: "n".into(),
        name: "h".into(),
        kind: ServiceKind::Headless,
        ports: vec![port("http")],
        publish_not_ready: false,
    });
    z.upsert_slice(SliceInfo {
        namespace: "n".into(),
        name: "h-1".into(),
        service: "h".into(),
        ports: vec![port("http")],
        endpoints: (0..40u8)
            .map(|i| EndpointInfo {
                addresses: vec![[10, 0, 0, i].into()],
                hostname: (i % 2 == 0).then(|| format!("p{i}")),
                ready: i % 5 != 0,
                zone: Some(if i % 3 == 0 { "a" } else { "b" }.into()),
            })
            .collect(),
    });
    z.upsert_service(ServiceInfo {
        namespace: "n".into(),
        name: "e".into(),
        kind: ServiceKind::ExternalName("www.example.com".into()),
        ports: Vec::new(),
        publish_not_ready: false,
    });
    z
});

fuzz_target!(|data: &[u8]| {
    let Ok(q) = wire::parse_query(data) else {
        return;
    };
    let lookup = ZONE.lookup(q.qname(), q.qtype);
    let params = encode::Params { apex: ZONE.apex(), ttl: 5, serial: 1 };
    let mut out = Vec::new();
    for limit in [q.udp_limit(), usize::from(u16::MAX)] {
        if encode::render(&lookup, data, &q, limit, &params, &mut out) {
            assert!(out.len() <= limit.max(q.question_end + 11), "{} > {limit}", out.len());
            assert_eq!(wire::id_of(&out), Some(q.id));
        }
    }
});
