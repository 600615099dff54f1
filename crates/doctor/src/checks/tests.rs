use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;

use super::*;
use crate::facts::{Record, Route};
use crate::kubelet::Found;
use crate::model::Verdict;

fn config(yaml: &str) -> Config {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).expect("write");
    hybridnet_config::load_file(&path).expect("valid config")
}

const OURS: &str =
    "apiVersion: v1alpha1\nkind: HybridNetConfig\ndnslocal: {listen: [\"169.254.20.10:53\"]}\n";

fn meshd(peers: serde_json::Value, uptime: u64) -> Record {
    Record::Live {
        ready: true,
        uptime_secs: uptime,
        details: json!({
            "interface": "hybridnet0", "listenPort": 51821, "mtu": 1420,
            "mssClamp": {"enabled": true, "error": null},
            "peers": peers,
        }),
    }
}

fn facts(cfg: &str) -> Facts {
    Facts {
        config_path: PathBuf::from("/etc/hybridnet.yaml"),
        config: Ok(config(cfg)),
        kubelet_dns: Ok(None),
        kubelet_server: Ok(None),
        records: BTreeMap::new(),
        ipv4_forward: Some(true),
        ipv6_forward: Some(true),
        mtus: BTreeMap::from([("eth0".to_owned(), 1500), ("hybridnet0".to_owned(), 1420)]),
        routes: vec![Route {
            dest: Ipv4Addr::new(192, 0, 2, 0).into(),
            prefix_len: 24,
            interface: "eth0".to_owned(),
            gateway: false,
        }],
        clock: Vec::new(),
        neighbours: [None, None],
    }
}

fn find<'a>(all: &'a [Finding], check: &str) -> &'a Finding {
    all.iter()
        .find(|f| f.check == check)
        .unwrap_or_else(|| panic!("no {check} in {all:#?}"))
}

fn dns(ips: &[&str]) -> Result<Option<Found<Vec<IpAddr>>>, String> {
    Ok(Some(Found {
        value: ips.iter().map(|s| s.parse().expect("ip")).collect(),
        source: "/var/lib/kubelet/config.yaml clusterDNS".to_owned(),
    }))
}

#[test]
fn kubelet_dns_elsewhere_fails_with_the_fix() {
    let mut f = facts(OURS);
    f.kubelet_dns = dns(&["10.96.0.10"]);
    let all = all(&f);
    let k = find(&all, "kubelet-dns");
    assert_eq!(k.verdict, Verdict::Fail);
    assert!(
        k.message.contains("10.96.0.10") && k.message.contains("169.254.20.10"),
        "{k:?}"
    );
    let fix = k.fix.as_deref().unwrap_or_default();
    assert!(fix.contains("clusterDNS to [169.254.20.10]"), "{fix}");
    assert!(
        fix.contains("interceptClusterDNS: true to answer on 10.96.0.10"),
        "{fix}"
    );

    f.kubelet_dns = dns(&["169.254.20.10"]);
    assert_eq!(find(&all_of(&f), "kubelet-dns").verdict, Verdict::Ok);
    // interception: dnslocal also listens on the kube-dns address the kubelet hands out
    let mut f = facts(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\ndnslocal: {listen: [\"169.254.20.10:53\", \"10.96.0.10:53\"]}\n",
    );
    f.kubelet_dns = dns(&["10.96.0.10"]);
    assert_eq!(find(&all_of(&f), "kubelet-dns").verdict, Verdict::Ok);
    // interceptClusterDNS: dnslocal holds the kube-dns ClusterIP (derived from the service subnet) itself
    let mut f = facts(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\ndnslocal: {listen: [\"169.254.20.10:53\"], interceptClusterDNS: true, clusterDNS: [\"10.96.0.11:53\"]}\n",
    );
    f.kubelet_dns = dns(&["10.96.0.10"]);
    assert_eq!(find(&all_of(&f), "kubelet-dns").verdict, Verdict::Ok);
}

fn all_of(f: &Facts) -> Vec<Finding> {
    all(f)
}

#[test]
fn talos_host_dns_beside_dnslocal_fails() {
    let mut f = facts(OURS);
    f.kubelet_dns = dns(&["169.254.20.10", "169.254.116.108"]);
    let all = all(&f);
    assert_eq!(find(&all, "kubelet-dns").verdict, Verdict::Ok);
    let k = find(&all, "kubelet-dns-single");
    assert_eq!(k.verdict, Verdict::Fail, "{k:?}");
    assert!(k.message.contains("host DNS"), "{k:?}");
    f.kubelet_dns = dns(&["169.254.20.10", "10.96.0.10"]);
    assert_eq!(
        find(&all_of(&f), "kubelet-dns-single").verdict,
        Verdict::Warn
    );
}

#[test]
fn kubeprism_holds_apiprism_port() {
    let mut f = facts(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\napiprism: {listen: [\"127.0.0.1:7445\"]}\n",
    );
    let apiprism = |listen: serde_json::Value| Record::Live {
        ready: true,
        uptime_secs: 10,
        details: json!({"listen": listen, "upstreams": []}),
    };
    f.records.insert("apiprism", apiprism(json!([])));
    let k = find(&all(&f), "kubeprism-port").clone();
    assert_eq!(k.verdict, Verdict::Fail, "{k:?}");
    assert!(
        k.message.contains("127.0.0.1:7445") && k.message.contains("KubePrism"),
        "{k:?}"
    );
    assert!(
        k.fix
            .unwrap_or_default()
            .contains("kubePrism.enabled: false")
    );
    f.records
        .insert("apiprism", apiprism(json!(["127.0.0.1:7445"])));
    assert_eq!(find(&all(&f), "kubeprism-port").verdict, Verdict::Ok);
}

#[test]
fn kubelet_past_apiprism_and_apiprism_unused() {
    let mut f = facts(OURS);
    f.kubelet_server = Ok(Some(Found {
        value: "https://10.0.0.1:6443".to_owned(),
        source: "/etc/kubernetes/kubelet.conf server".to_owned(),
    }));
    f.records.insert(
        "apiprism",
        Record::Live {
            ready: true,
            uptime_secs: 600,
            details: json!({"upstreams": [{"address": "10.0.0.1:6443", "total": 0, "active": 0}]}),
        },
    );
    let all = all(&f);
    assert_eq!(find(&all, "kubelet-api").verdict, Verdict::Fail);
    assert_eq!(find(&all, "apiprism-used").verdict, Verdict::Warn);
    f.kubelet_server = Ok(Some(Found {
        value: "https://127.0.0.1:7445".to_owned(),
        source: "kubeconfig".to_owned(),
    }));
    assert_eq!(find(&all_of(&f), "kubelet-api").verdict, Verdict::Ok);
}

#[test]
fn mesh_port_unreachable_from_every_peer() {
    let mut f = facts(OURS);
    let peers = json!([
        {"name": "b", "state": "down", "endpoint": "192.0.2.12:51821"},
        {"name": "c", "state": "down", "endpoint": "192.0.2.13:51821"},
    ]);
    f.records.insert("meshd", meshd(peers.clone(), 120));
    let k = find(&all(&f), "mesh-port").clone();
    assert_eq!(k.verdict, Verdict::Fail, "{k:?}");
    assert!(k.message.contains("UDP 51821"), "{k:?}");
    assert!(k.message.contains("51822 probes"), "{k:?}");
    assert!(
        k.fix
            .unwrap_or_default()
            .contains("udp dport { 51821, 51822 } accept")
    );
    f.records.insert(
        "meshd",
        meshd(
            json!([{"name": "b", "state": "up"}, {"name": "c", "state": "down"}]),
            120,
        ),
    );
    assert_eq!(find(&all_of(&f), "mesh-port").verdict, Verdict::Ok);
    f.records.insert("meshd", meshd(peers, 5));
    assert_eq!(
        find(&all_of(&f), "mesh-port").verdict,
        Verdict::Fail,
        "peers already declared down"
    );
    f.records.insert(
        "meshd",
        meshd(json!([{"name": "b", "state": "unknown"}]), 5),
    );
    assert_eq!(
        find(&all_of(&f), "mesh-port").verdict,
        Verdict::Ok,
        "too early to tell"
    );
}

#[test]
fn mtu_black_hole_and_clamp() {
    let mut f = facts(OURS);
    f.mtus.insert("eth0".to_owned(), 1400);
    f.records.insert(
        "meshd",
        meshd(
            json!([{"name": "b", "state": "up", "endpoint": "192.0.2.12:51821"}]),
            60,
        ),
    );
    let k = find(&all(&f), "mtu").clone();
    assert_eq!(k.verdict, Verdict::Fail, "{k:?}");
    assert!(
        k.message.contains("1420 + 60") && k.message.contains("1400"),
        "{k:?}"
    );
    f.mtus.insert("eth0".to_owned(), 1500);
    assert_eq!(find(&all_of(&f), "mtu").verdict, Verdict::Ok);
    f.mtus.insert("hybridnet0".to_owned(), 1500);
    assert_eq!(
        find(&all_of(&f), "mtu").verdict,
        Verdict::Fail,
        "the interface differs from meshd's MTU"
    );
}

#[test]
fn mtu_black_hole_over_an_ipv6_underlay() {
    // A peer reached over IPv6 through a link with a 1480 MTU (a 6in4 tunnel): 1420 + 80 does not fit.
    let mut f = facts(OURS);
    f.routes.push(Route {
        dest: "2001:db8:7::".parse().expect("ip"),
        prefix_len: 48,
        interface: "sit1".to_owned(),
        gateway: false,
    });
    f.mtus.insert("sit1".to_owned(), 1480);
    f.records.insert(
        "meshd",
        meshd(
            json!([{"name": "c", "state": "up", "endpoint": "[2001:db8:7::12]:51821"}]),
            60,
        ),
    );
    let k = find(&all(&f), "mtu").clone();
    assert_eq!(k.verdict, Verdict::Fail, "{k:?}");
    assert!(
        k.message.contains("1420 + 80") && k.message.contains("sit1"),
        "{k:?}"
    );
    f.mtus.insert("sit1".to_owned(), 1500);
    assert_eq!(find(&all_of(&f), "mtu").verdict, Verdict::Ok);
}

#[test]
fn forwarding_off_on_a_gateway() {
    let mut f = facts(OURS);
    f.ipv4_forward = Some(false);
    let mut m = meshd(json!([]), 60);
    if let Record::Live { details, .. } = &mut m {
        details["topology"] =
            json!({"location": "a", "gatewayCandidate": true, "gateways": {"a": "n1"}});
    }
    f.records.insert("meshd", m);
    assert_eq!(find(&all(&f), "forwarding").verdict, Verdict::Fail);
    f.ipv4_forward = Some(true);
    assert_eq!(find(&all_of(&f), "forwarding").verdict, Verdict::Ok);
    // The mesh's addresses are IPv6: a gateway without IPv6 forwarding drops gateway-routed peers' traffic.
    f.ipv6_forward = Some(false);
    let k = find(&all_of(&f), "forwarding").clone();
    assert_eq!(k.verdict, Verdict::Fail, "{k:?}");
    assert!(k.message.contains("IPv6"), "{k:?}");
    if let Some(Record::Live { details, .. }) = f.records.get_mut("meshd") {
        details["topology"]["gatewayCandidate"] = json!(false);
    }
    assert_eq!(
        find(&all_of(&f), "forwarding").verdict,
        Verdict::Ok,
        "IPv6 forwarding matters on gateways only"
    );
}

#[test]
fn clock_skew_seen_in_discovery_tls_errors() {
    let mut f = facts(OURS);
    let mut m = meshd(json!([]), 60);
    if let Record::Live { details, .. } = &mut m {
        details["discovery"] = json!({"registries": [{"endpoint": "discovery.talos.dev:443", "state": "backoff",
            "error": "invalid peer certificate: NotValidYet"}]});
    }
    f.records.insert("meshd", m);
    assert_eq!(find(&all(&f), "clock").verdict, Verdict::Fail);
}

fn reading(source: &str, low_ms: i64, high_ms: i64) -> crate::skew::Measured {
    crate::skew::Measured {
        source: source.to_owned(),
        offset: Ok(crate::skew::Offset { low_ms, high_ms }),
    }
}

#[test]
fn clock_skew_measured_against_http_dates() {
    const API: &str = "https://192.0.2.1:6443/";
    const DISCOVERY: &str = "https://discovery.talos.dev/";
    let mut f = facts(OURS);
    let judge = |f: &Facts| find(&all(f), "clock").clone();

    // Ten minutes ahead of the API server: fails, with the fix and the figures in JSON.
    f.clock = vec![reading(API, 599_500, 600_700)];
    let c = judge(&f);
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    assert!(
        c.message
            .contains("600 s (10 min) behind https://192.0.2.1:6443/"),
        "{c:?}"
    );
    assert!(c.message.contains("30 s"), "names the probe window: {c:?}");
    let fix = c.fix.as_deref().unwrap_or_default();
    assert!(
        fix.contains("timedatectl set-ntp true") && fix.contains("machine.time"),
        "{fix}"
    );
    let m = c.measured.expect("measured");
    assert_eq!(m["source"], API);
    assert_eq!(m["offsetSeconds"], 600.1);
    assert_eq!(m["uncertaintySeconds"], 0.6);
    assert_eq!(m["readings"][0]["lowSeconds"], 599.5);

    // Our clock ahead by 20 s: fails too (the sign is in the words).
    f.clock = vec![reading(API, -20_600, -19_400)];
    let c = judge(&f);
    assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
    assert!(c.message.contains("20 s ahead of"), "{c:?}");

    // Exactly at the threshold (at least 15 s) is a warning; past it, a failure.
    f.clock = vec![reading(API, 15_000, 16_000)];
    assert_eq!(judge(&f).verdict, Verdict::Warn);
    f.clock = vec![reading(API, 15_001, 16_000)];
    assert_eq!(judge(&f).verdict, Verdict::Fail);

    // Five seconds: a warning naming where it breaks.
    f.clock = vec![reading(API, 4_500, 5_500)];
    let c = judge(&f);
    assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
    assert!(c.message.contains("at 15 s"), "{c:?}");

    // Within what a round trip can tell: OK, with the offset.
    f.clock = vec![reading(API, -400, 900)];
    let c = judge(&f);
    assert_eq!(c.verdict, Verdict::Ok, "{c:?}");
    assert_eq!(
        c.message,
        "clock agrees with https://192.0.2.1:6443/ (offset +0.3 s ± 0.7 s)"
    );

    // One source far off, another right: the nearest decides (a server's own clock may be the wrong one).
    f.clock = vec![
        reading(DISCOVERY, 3_600_000, 3_600_500),
        reading(API, -300, 700),
        crate::skew::Measured {
            source: "https://192.0.2.2:6443/".to_owned(),
            offset: Err("connecting: timed out".to_owned()),
        },
    ];
    let c = judge(&f);
    assert_eq!(c.verdict, Verdict::Ok, "{c:?}");
    assert!(c.message.contains("the nearest of 2 time sources"), "{c:?}");
    assert_eq!(
        c.measured.expect("measured")["readings"][2]["error"],
        "connecting: timed out"
    );

    // Nobody answered and no registry: skipped, saying why.
    f.clock = vec![crate::skew::Measured {
        source: API.to_owned(),
        offset: Err("no Date header (HTTP/1.1 200 OK)".to_owned()),
    }];
    let c = judge(&f);
    assert_eq!(c.verdict, Verdict::Skip, "{c:?}");
    assert!(c.message.contains("no Date header"), "{c:?}");

    // A registry failing on certificate time fails even when a source looks right.
    f.clock = vec![reading(API, -400, 900)];
    let mut m = meshd(json!([]), 60);
    if let Record::Live { details, .. } = &mut m {
        details["discovery"] = json!({"registries": [{"endpoint": "discovery.talos.dev:443", "state": "backoff",
            "error": "invalid peer certificate: Expired"}]});
    }
    f.records.insert("meshd", m);
    assert_eq!(judge(&f).verdict, Verdict::Fail);
}

#[test]
fn clock_skew_between_meshd_peers() {
    let mut f = facts(OURS);
    f.clock = vec![reading("https://192.0.2.1:6443/", -400, 900)];
    let peers = |offsets: &[(&str, Option<i64>)]| {
        meshd(
            json!(
                offsets
                    .iter()
                    .map(|(n, o)| json!({"name": n, "state": "up", "clockOffsetMs": o}))
                    .collect::<Vec<_>>()
            ),
            60,
        )
    };
    // In sync with the API server and with both peers (one has not answered a version-3 ping yet).
    f.records
        .insert("meshd", peers(&[("node2", Some(-120)), ("node3", None)]));
    let c = find(&all(&f), "clock").clone();
    assert_eq!(c.verdict, Verdict::Ok, "{c:?}");
    assert!(
        c.message
            .ends_with("; 1 meshd peers' clocks within 0.1 s of ours (probe pongs)"),
        "{c:?}"
    );
    assert_eq!(
        c.measured.expect("measured")["peers"],
        json!({"node2": -120})
    );

    // A peer 8 s ahead: a warning naming it, whichever of the two is off.
    f.records.insert(
        "meshd",
        peers(&[("node2", Some(-120)), ("node3", Some(8_000))]),
    );
    let c = find(&all(&f), "clock").clone();
    assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
    assert!(
        c.message
            .contains("meshd peer node3's clock is 8.0 s ahead of this node's"),
        "{c:?}"
    );
    assert!(
        c.fix
            .as_deref()
            .unwrap_or_default()
            .contains("run doctor on node3 too"),
        "{c:?}"
    );

    // This node 10 minutes off the API server: that failure stands (its peers refuse its probes: no offsets).
    f.clock = vec![reading("https://192.0.2.1:6443/", 599_500, 600_700)];
    f.records.insert("meshd", peers(&[("node2", None)]));
    assert_eq!(find(&all(&f), "clock").verdict, Verdict::Fail);

    // No time source answered: the peers alone make it OK.
    f.clock = Vec::new();
    f.records.insert("meshd", peers(&[("node2", Some(300))]));
    let c = find(&all(&f), "clock").clone();
    assert_eq!(c.verdict, Verdict::Ok, "{c:?}");
}

#[test]
fn skew_in_words() {
    assert_eq!(seconds(0), "0.0 s");
    assert_eq!(seconds(949), "0.9 s");
    assert_eq!(seconds(9_949), "9.9 s");
    assert_eq!(seconds(9_950), "10 s");
    assert_eq!(seconds(119_499), "119 s");
    assert_eq!(seconds(599_600), "600 s (10 min)");
    assert_eq!(
        seconds(u64::MAX),
        format!("{} s ({} min)", u64::MAX / 1000, u64::MAX / 60_000)
    );
}

#[test]
fn time_sources_from_the_config_or_the_command_line() {
    let cfg = config(
        "version: v1alpha1\nmachine: {type: worker}\ncluster:\n  controlPlane: {endpoint: https://cp.example:6443}\n  discovery: {enabled: true, registries: {service: {endpoint: https://discovery.example/}}}\n",
    );
    let src = crate::facts::Sources::default();
    let got = crate::facts::time_sources(&src, Some(&cfg));
    assert!(
        got.contains(&"https://discovery.example/".to_owned()),
        "{got:?}"
    );
    assert!(
        got.contains(&"https://cp.example:6443/".to_owned()),
        "{got:?}"
    );
    let src = crate::facts::Sources {
        time_sources: vec!["http://127.0.0.1:8080/".to_owned()],
        ..crate::facts::Sources::default()
    };
    assert_eq!(
        crate::facts::time_sources(&src, Some(&cfg)),
        vec!["http://127.0.0.1:8080/".to_owned()]
    );
    assert!(crate::facts::time_sources(&crate::facts::Sources::default(), None).is_empty());
}

#[test]
fn missing_daemons_and_bad_config_fail_the_report() {
    let mut f = facts(OURS);
    f.records
        .insert("dnslocal", Record::Missing("no such file".to_owned()));
    f.records.insert(
        "apiprism",
        Record::Stale {
            summary: "stopped".to_owned(),
            age_secs: 40,
        },
    );
    let report = crate::Report::new(all(&f));
    assert!(!report.ok);
    assert_eq!(
        find(&report.findings, "dnslocal-running").verdict,
        Verdict::Fail
    );
    assert_eq!(
        find(&report.findings, "apiprism-running").verdict,
        Verdict::Fail
    );
    f.config = Err("line 3: bad".to_owned());
    let all = all(&f);
    assert_eq!(find(&all, "config").verdict, Verdict::Fail);
    assert!(
        all.iter().all(|x| x.check != "kubelet-dns"),
        "config-dependent checks are left out"
    );
}

/// `n` peers, each with a path on 192.0.2.0/24 (on the link) and one on 198.51.100.0/24 (via a gateway).
fn peers_on_link(n: u8) -> serde_json::Value {
    json!(
        (0..n)
            .map(|i| json!({
                "name": format!("node{i}"), "state": "up", "endpoint": format!("192.0.2.{i}:51821"),
                "paths": [
                    {"endpoint": format!("192.0.2.{i}:51821"), "state": "alive"},
                    {"endpoint": format!("198.51.100.{i}:51821"), "state": "alive"},
                ],
            }))
            .collect::<Vec<_>>()
    )
}

#[test]
fn neighbour_tables_too_small_for_the_on_link_peers_fail_with_the_sysctls() {
    use crate::facts::NeighbourTable;
    let mut f = facts(OURS);
    f.routes.push(Route {
        dest: Ipv4Addr::UNSPECIFIED.into(),
        prefix_len: 0,
        interface: "eth0".to_owned(),
        gateway: true,
    });
    f.records.insert("meshd", meshd(peers_on_link(200), 600));
    // In a network namespace other than the host's the limits cannot be read: skipped, saying why.
    let n = find(&all(&f), "neighbours").clone();
    assert_eq!(n.verdict, Verdict::Skip, "{n:?}");
    assert!(n.message.contains("network namespace"), "{n:?}");
    let table = |limit, soft_limit, fulls| {
        Some(NeighbourTable {
            limit,
            soft_limit,
            fulls,
        })
    };
    // The defaults hold 200 on-link addresses (the 200 behind the gateway take none).
    f.neighbours = [table(1024, 512, 0), table(1024, 512, 0)];
    let n = find(&all(&f), "neighbours").clone();
    assert_eq!(n.verdict, Verdict::Ok, "{n:?}");
    assert!(n.message.contains("200 on-link"), "{n:?}");
    // Above the soft limit: warned, with the sysctls.
    f.neighbours[0] = table(1024, 128, 0);
    let n = find(&all(&f), "neighbours").clone();
    assert_eq!(n.verdict, Verdict::Warn, "{n:?}");
    // At the hard limit: packets are dropped.
    f.neighbours[0] = table(200, 128, 7);
    let n = find(&all(&f), "neighbours").clone();
    assert_eq!(n.verdict, Verdict::Fail, "{n:?}");
    assert!(
        n.message.contains("200 peer addresses") && n.message.contains("full 7 times"),
        "{n:?}"
    );
    let fix = n.fix.as_deref().unwrap_or_default();
    assert!(
        fix.contains("net.ipv4.neigh.default.gc_thresh3=1024")
            && fix.contains("net.ipv4.neigh.default.gc_thresh2=512")
            && fix.contains("machine.sysctls"),
        "{fix}"
    );
    // The fix's values clear the finding.
    f.neighbours[0] = table(1024, 512, 7);
    assert_eq!(find(&all(&f), "neighbours").verdict, Verdict::Ok);
    // Hostile or odd status: endpoints that do not parse count for nothing.
    f.records.insert(
        "meshd",
        meshd(
            json!([{"paths": [{"endpoint": "x"}, {"endpoint": 5}, {}]}, {"paths": "no"}]),
            600,
        ),
    );
    f.neighbours[0] = table(1, 1, 0);
    assert_eq!(find(&all(&f), "neighbours").verdict, Verdict::Ok);
}
