//! dnslocal with `clusterZone: kubernetes`, as root in a network namespace: the cluster zone answered
//! from Services and EndpointSlices, checked with `dig` against the Kubernetes DNS specification
//! (kubernetes/dns `docs/specification.md`), plus update latency, zone-first ordering, an API outage and
//! a restart with the API down.
//!
//! The Kubernetes API is the stand-in of `hybridnet_integration::kubernetes` (list + watch of Services
//! and EndpointSlices with resourceVersions and 410 Gone): a real kube-apiserver needs etcd, a PKI and a
//! control plane that cannot run in these tests. Names outside the cluster zone go to NSD, as in
//! `dnslocal.rs`.
//!
//! Run: `cargo build --profile lab --target x86_64-unknown-linux-musl -p hybridnet-dnslocal &&
//! sudo -E HYBRIDNET_BIN_DIR=$PWD/target/x86_64-unknown-linux-musl/lab cargo test -p hybridnet-integration
//! --test dnslocal_cluster`.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hybridnet_integration::dnslocal::{
    Dig, LISTEN, NSD_ADDR, Nsd, dig_in, query_bytes, require_tools, spawn_in, write_config,
};
use hybridnet_integration::kubernetes::{Gone, KubeApiServer};
use hybridnet_integration::{Daemon, DaemonKind, Netns, TestDir, wait_until};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(10);
const API: &str = "127.0.0.1:16443";

fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, &str, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, port)| json!({"name": n, "protocol": p, "port": port}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports}})
}

fn external(ns: &str, name: &str, target: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"type": "ExternalName", "externalName": target}})
}

/// (address, hostname, ready, zone)
type Ep<'a> = (&'a str, Option<&'a str>, bool, &'a str);

fn slice(ns: &str, name: &str, svc: &str, ports: &[(&str, &str, u16)], eps: &[Ep]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, port)| json!({"name": n, "protocol": p, "port": port}))
        .collect();
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, host, ready, zone)| {
            let mut e = json!({"addresses": [ip], "conditions": {"ready": ready}, "zone": zone});
            if let Some(h) = host {
                e["hostname"] = json!(h);
            }
            e
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
}

/// The objects every test starts with.
fn populate(api: &KubeApiServer) {
    api.put(
        "services",
        service(
            "default",
            "kubernetes",
            "10.96.0.1",
            &[("https", "TCP", 443)],
        ),
    );
    api.put(
        "services",
        service("prod", "db", "None", &[("pg", "TCP", 5432)]),
    );
    api.put(
        "endpointslices",
        slice(
            "prod",
            "db-x1",
            "db",
            &[("pg", "TCP", 5432)],
            &[
                ("10.244.1.10", Some("db-0"), true, "zone-a"),
                ("10.244.2.11", Some("db-1"), true, "zone-b"),
                ("10.244.3.12", Some("db-2"), false, "zone-b"),
                ("10.244.4.13", None, true, "zone-c"),
            ],
        ),
    );
    api.put("services", external("prod", "ext", "www.example.test"));
    api.put("services", service("prod", "empty", "None", &[]));
    let mut pubsvc = service("prod", "pub", "None", &[]);
    pubsvc["spec"]["publishNotReadyAddresses"] = json!(true);
    api.put("services", pubsvc);
    api.put(
        "endpointslices",
        slice(
            "prod",
            "pub-x1",
            "pub",
            &[],
            &[("10.244.5.5", None, false, "zone-a")],
        ),
    );
}

struct Setup {
    // Drop order: daemon, API, NSD, then the namespace.
    daemon: Daemon,
    api: Option<KubeApiServer>,
    _nsd: Nsd,
    dir: TestDir,
    config: PathBuf,
    ns: Netns,
}

fn config(dir: &TestDir, kubeconfig: &str) -> PathBuf {
    let upstream = format!("{NSD_ADDR}:53");
    let path = write_config(dir, "dnslocal", "127.0.0.1:7448", &[&upstream], "1h");
    let kc = dir.join("kubeconfig");
    std::fs::write(&kc, kubeconfig).unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "  clusterZone: kubernetes\n  clusterZoneTTL: 7s\n  kubeconfig: {}\n",
        kc.display()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

fn start(ns: &Netns, config: &PathBuf) -> Daemon {
    let mut d = Daemon::builder(DaemonKind::Dnslocal, ns, config)
        .env("NODE_NAME", "node-1")
        .start();
    d.wait_ready(READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    d
}

fn setup(label: &str) -> Setup {
    require_tools(&["nsd", "dig"]);
    let ns = Netns::new();
    let dir = TestDir::new(label);
    let nsd = Nsd::start(&ns, &dir, 0);
    let api = KubeApiServer::start(&ns, API.parse().unwrap());
    // This node's zone comes from its Node (GET /api/v1/nodes/node-1).
    api.add_node(
        "node-1",
        &[("topology.kubernetes.io/zone", "zone-b")],
        &[],
        &[],
    );
    populate(&api);
    let config = config(&dir, &api.kubeconfig("dnslocal"));
    let daemon = start(&ns, &config);
    let s = Setup {
        daemon,
        api: Some(api),
        _nsd: nsd,
        dir,
        config,
        ns,
    };
    s.wait_answer("kubernetes.default.svc.cluster.local", &["10.96.0.1"]);
    s
}

impl Setup {
    fn dig(&self, args: &[&str]) -> Dig {
        dig_in(self.ns.name(), LISTEN, args)
    }

    fn api(&self) -> &KubeApiServer {
        self.api.as_ref().unwrap()
    }

    fn wait_answer(&self, name: &str, want: &[&str]) {
        wait_until(READY, format!("{name} answers {want:?}"), || {
            let d = self.dig(&[name]);
            if d.data() == want {
                Ok(())
            } else {
                Err(d.text)
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.daemon.log()));
    }

    fn status(&self) -> String {
        DaemonKind::Dnslocal
            .cli(
                &[
                    "status",
                    "--state-dir",
                    self.dir.join("dnslocal-state").to_str().unwrap(),
                ],
                Duration::from_secs(5),
            )
            .stdout
    }

    fn metric(&self, name: &str) -> f64 {
        let m = self.daemon.metrics().unwrap();
        m.series(name).map(|(_, v)| v).sum()
    }
}

/// Asserts the answer is authoritative, `status`, and has the SOA of the zone when empty.
fn check(d: &Dig, status: &str, data: &[&str]) {
    assert_eq!(d.status, status, "{}", d.text);
    assert!(
        d.flags.contains(&"aa".to_owned()),
        "not authoritative: {}",
        d.text
    );
    assert_eq!(d.data(), data, "{}", d.text);
    if data.is_empty() {
        assert!(
            d.text.contains(
                "cluster.local.\t\t7\tIN\tSOA\tns.dns.cluster.local. hostmaster.cluster.local."
            ) && d.text.contains(" 7200 1800 86400 7\n"),
            "negative answers carry the zone's SOA with the zone TTL: {}",
            d.text
        );
    }
}

#[test]
fn every_record_of_the_specification() {
    let s = setup("dl-zone");
    // 2.2 schema version
    check(
        &s.dig(&["dns-version.cluster.local", "TXT"]),
        "NOERROR",
        &["\"1.1.0\""],
    );
    // 2.3 ClusterIP: A, TTL from clusterZoneTTL, client's case kept; SRV for the named port; PTR.
    let a = s.dig(&["Kubernetes.Default.svc.cluster.local"]);
    check(&a, "NOERROR", &["10.96.0.1"]);
    assert_eq!(a.ttls(), vec![7], "{}", a.text);
    assert!(
        a.answers[0].starts_with("Kubernetes.Default.svc.cluster.local."),
        "{}",
        a.text
    );
    check(
        &s.dig(&["_https._tcp.kubernetes.default.svc.cluster.local", "SRV"]),
        "NOERROR",
        &["0 100 443 kubernetes.default.svc.cluster.local."],
    );
    check(
        &s.dig(&["-x", "10.96.0.1"]),
        "NOERROR",
        &["kubernetes.default.svc.cluster.local."],
    );
    // 2.4 headless: ready endpoints, this node's zone (zone-b, from its Node) first; hostnames; SRV
    // per ready endpoint; PTR of endpoint addresses; no ready endpoint: NXDOMAIN; publishNotReadyAddresses.
    check(
        &s.dig(&["db.prod.svc.cluster.local"]),
        "NOERROR",
        &["10.244.2.11", "10.244.1.10", "10.244.4.13"],
    );
    check(
        &s.dig(&["db-0.db.prod.svc.cluster.local"]),
        "NOERROR",
        &["10.244.1.10"],
    );
    check(
        &s.dig(&["10-244-4-13.db.prod.svc.cluster.local"]),
        "NOERROR",
        &["10.244.4.13"],
    );
    check(&s.dig(&["db-2.db.prod.svc.cluster.local"]), "NXDOMAIN", &[]);
    check(
        &s.dig(&["_pg._tcp.db.prod.svc.cluster.local", "SRV"]),
        "NOERROR",
        &[
            "0 100 5432 db-1.db.prod.svc.cluster.local.",
            "0 100 5432 db-0.db.prod.svc.cluster.local.",
            "0 100 5432 10-244-4-13.db.prod.svc.cluster.local.",
        ],
    );
    check(
        &s.dig(&["-x", "10.244.1.10"]),
        "NOERROR",
        &["db-0.db.prod.svc.cluster.local."],
    );
    check(&s.dig(&["empty.prod.svc.cluster.local"]), "NXDOMAIN", &[]);
    check(
        &s.dig(&["pub.prod.svc.cluster.local"]),
        "NOERROR",
        &["10.244.5.5"],
    );
    // 2.5 ExternalName: a CNAME, with the target's records resolved where that name goes (NSD), as in
    // the spec's example; asked for the CNAME itself, the CNAME alone.
    let ext = s.dig(&["ext.prod.svc.cluster.local"]);
    assert_eq!(ext.status, "NOERROR", "{}", ext.text);
    assert_eq!(
        ext.data(),
        vec!["www.example.test.", "192.0.2.80"],
        "{}",
        ext.text
    );
    assert!(ext.answers[0].contains("\u{20}7 IN CNAME"), "{}", ext.text);
    check(
        &s.dig(&["ext.prod.svc.cluster.local", "CNAME"]),
        "NOERROR",
        &["www.example.test."],
    );
    // 2.6 pod records.
    check(
        &s.dig(&["10-244-9-9.prod.pod.cluster.local"]),
        "NOERROR",
        &["10.244.9.9"],
    );
    // NODATA: names that exist with another type, and empty non-terminals; NXDOMAIN for the rest.
    check(
        &s.dig(&["kubernetes.default.svc.cluster.local", "AAAA"]),
        "NOERROR",
        &[],
    );
    check(
        &s.dig(&["kubernetes.default.svc.cluster.local", "TXT"]),
        "NOERROR",
        &[],
    );
    check(&s.dig(&["prod.svc.cluster.local"]), "NOERROR", &[]);
    check(&s.dig(&["svc.cluster.local"]), "NOERROR", &[]);
    check(&s.dig(&["nope.prod.svc.cluster.local"]), "NXDOMAIN", &[]);
    check(&s.dig(&["nons.svc.cluster.local"]), "NXDOMAIN", &[]);
    check(
        &s.dig(&["_http._tcp.kubernetes.default.svc.cluster.local", "SRV"]),
        "NXDOMAIN",
        &[],
    );
    check(&s.dig(&["x.cluster.local"]), "NXDOMAIN", &[]);
    // The apex SOA.
    let soa = s.dig(&["cluster.local", "SOA"]);
    assert!(
        soa.answers[0].contains("SOA ns.dns.cluster.local."),
        "{}",
        soa.text
    );
    // Over TCP too.
    check(
        &s.dig(&["+tcp", "db-1.db.prod.svc.cluster.local"]),
        "NOERROR",
        &["10.244.2.11"],
    );
    // Outside the zone: today's path (NSD, not authoritative from us).
    let www = s.dig(&["www.example.test"]);
    assert_eq!(www.data(), vec!["192.0.2.80"], "{}", www.text);
    // One list and one watch per resource, like kube-proxy.
    for kind in ["services", "endpointslices"] {
        assert_eq!(s.api().requests(&format!("{kind}.list")), 1, "{kind}");
        assert_eq!(s.api().requests(&format!("{kind}.watch")), 1, "{kind}");
    }
    // Status is written every 2 s.
    wait_until(
        Duration::from_secs(10),
        "status shows the zone in sync",
        || {
            let st = s.status();
            if st.contains("from the Kubernetes API (api): 5 services, 5 endpoints, in sync")
                && st.contains("authoritative (cluster zone) ")
            {
                Ok(())
            } else {
                Err(st)
            }
        },
    )
    .unwrap();
    assert!(s.metric("dnslocal_queries_total") > 20.0);
}

/// Sends an A query for `name` from inside the namespace every millisecond until the answer holds
/// `want` (as its last four bytes: a single-record answer without EDNS); returns how long that took.
fn poll_until(ns: &str, name: &str, want: [u8; 4], since: Instant) -> Duration {
    let name = name.to_owned();
    spawn_in(ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let server: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
        let mut buf = [0u8; 1500];
        for id in 0u16.. {
            sock.send_to(&query_bytes(&name, id), server).unwrap();
            if let Ok(n) = sock.recv(&mut buf)
                && buf[..n].ends_with(&want)
            {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "{name} never changed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        unreachable!()
    })
    .join()
    .unwrap()
}

#[test]
fn changes_arrive_within_one_watch_event_and_410_relists() {
    let s = setup("dl-zone-upd");
    let ns = s.ns.name().to_owned();
    // A Service's ClusterIP changes (deleted and re-created): the next query sees it.
    let mut latencies = Vec::new();
    for i in 1..=20u8 {
        let since = Instant::now();
        s.api().put(
            "services",
            service("default", "moving", &format!("10.96.7.{i}"), &[]),
        );
        latencies.push(poll_until(
            &ns,
            "moving.default.svc.cluster.local",
            [10, 96, 7, i],
            since,
        ));
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];
    eprintln!(
        "API change -> answer: p50 {p50:?}, max {max:?} over {} changes",
        latencies.len()
    );
    assert!(max < Duration::from_millis(500), "{latencies:?}");

    // An endpoint becomes ready in another slice: the headless answer grows.
    s.api().put(
        "endpointslices",
        slice(
            "prod",
            "db-x2",
            "db",
            &[("pg", "TCP", 5432)],
            &[("10.244.2.20", Some("db-3"), true, "zone-b")],
        ),
    );
    s.wait_answer(
        "db.prod.svc.cluster.local",
        &["10.244.2.11", "10.244.2.20", "10.244.1.10", "10.244.4.13"],
    );

    // History compacted and every watch closed: the resumed watch gets 410 Gone, dnslocal relists and
    // sees what changed meanwhile (both forms of 410).
    for (how, ip) in [(Gone::Status, "10.96.8.1"), (Gone::Event, "10.96.8.2")] {
        let lists = s.api().requests("services.list");
        s.api().compact(how);
        s.api().close_watches();
        s.api().put("services", service("default", "late", ip, &[]));
        s.wait_answer("late.default.svc.cluster.local", &[ip]);
        assert!(
            s.api().requests("services.list") > lists,
            "{how:?}: relisted"
        );
    }
    // Deleted: NXDOMAIN.
    s.api().remove("services", "default", "late");
    wait_until(READY, "late is gone", || {
        let d = s.dig(&["late.default.svc.cluster.local"]);
        if d.status == "NXDOMAIN" {
            Ok(())
        } else {
            Err(d.text)
        }
    })
    .unwrap();
}

#[test]
fn serves_through_an_api_outage_and_from_the_snapshot_after_a_restart() {
    let mut s = setup("dl-zone-part");
    let snapshot = s.dir.join("dnslocal-data/dnslocal/cluster-zone.json");
    wait_until(Duration::from_secs(20), "the snapshot is written", || {
        if snapshot.exists() {
            Ok(())
        } else {
            Err("not yet")
        }
    })
    .unwrap();
    // The API goes away: the last known state keeps being served, its age grows.
    drop(s.api.take());
    std::thread::sleep(Duration::from_secs(3));
    check(
        &s.dig(&["db.prod.svc.cluster.local"]),
        "NOERROR",
        &["10.244.2.11", "10.244.1.10", "10.244.4.13"],
    );
    check(
        &s.dig(&["kubernetes.default.svc.cluster.local"]),
        "NOERROR",
        &["10.96.0.1"],
    );
    let status = wait_until(Duration::from_secs(10), "status shows the age", || {
        let st = s.status();
        if st.contains("s old (API unreachable") {
            Ok(st)
        } else {
            Err(st)
        }
    })
    .unwrap();
    assert!(status.contains("services"), "{status}");
    assert!(s.metric("dnslocal_cluster_zone_age_seconds") >= 1.0);
    assert_eq!(s.metric("dnslocal_cluster_zone_api_up"), 0.0);

    // Restart with the API still down: the snapshot answers.
    s.daemon.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    s.daemon.wait_exit(Duration::from_secs(10)).unwrap();
    s.daemon = start(&s.ns, &s.config);
    check(
        &s.dig(&["db.prod.svc.cluster.local"]),
        "NOERROR",
        &["10.244.2.11", "10.244.1.10", "10.244.4.13"],
    );
    check(
        &s.dig(&["_https._tcp.kubernetes.default.svc.cluster.local", "SRV"]),
        "NOERROR",
        &["0 100 443 kubernetes.default.svc.cluster.local."],
    );
    check(&s.dig(&["nope.prod.svc.cluster.local"]), "NXDOMAIN", &[]);
    wait_until(Duration::from_secs(10), "status shows the snapshot", || {
        let st = s.status();
        if st.contains("from the Kubernetes API (snapshot)") {
            Ok(())
        } else {
            Err(st)
        }
    })
    .unwrap();
    assert!(
        s.daemon
            .log()
            .contains("cluster zone loaded from the snapshot"),
        "{}",
        s.daemon.log()
    );

    // The API comes back (empty: a new cluster state): the zone follows it.
    let api = KubeApiServer::start(&s.ns, API.parse().unwrap());
    api.put(
        "services",
        service("default", "kubernetes", "10.96.0.2", &[]),
    );
    s.api = Some(api);
    s.wait_answer("kubernetes.default.svc.cluster.local", &["10.96.0.2"]);
    check(&s.dig(&["db.prod.svc.cluster.local"]), "NXDOMAIN", &[]);
}
