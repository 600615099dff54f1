//! `dnslocal.interceptClusterDNS` (NodeLocal DNSCache's drop-in mode), as root, in network namespaces: a
//! "pod" namespace reaches a "node" namespace over a veth; pods ask kube-dns's ClusterIP 10.96.0.10.
//!
//! No Kubernetes runs here, so kube-proxy (iptables mode) is stood in for by an nftables NAT table in the
//! node namespace: 10.96.0.10:53 (kube-dns) and 10.96.0.11:53 (a second Service in front of CoreDNS,
//! NodeLocal DNSCache's `kube-dns-upstream`) DNATed to NSD (the CoreDNS stand-in) at 127.0.0.11. Both
//! kube-proxy modes DNAT through conntrack, which the NOTRACK rules bypass; `route_localnet` (which
//! kube-proxy also sets) lets the stand-in DNAT to a loopback address.
//!
//! Run: `cargo build --release -p hybridnet-dnslocal && sudo -E cargo test -p hybridnet-integration --test dnslocal_intercept`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hybridnet_integration::dnslocal::{NSD_ADDR, Nsd, dig_in, require_tools};
use hybridnet_integration::{Daemon, DaemonKind, Netns, TestDir, wait_until};
use nix::sys::signal::Signal;

const READY: Duration = Duration::from_secs(10);
const CLUSTER_IP: &str = "10.96.0.10";
const TABLE: &str = "hybridnet-dnslocal";

/// `nft list table inet hybridnet-dnslocal` in `ns`: the table's text, `None` when it does not exist.
fn our_table(ns: &Netns) -> Option<String> {
    let out = ns.exec(&["nft", "list", "table", "inet", TABLE]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `ip` is assigned in `ns`.
fn has_address(ns: &Netns, ip: &str) -> bool {
    let out = ns.exec(&["ip", "-o", "addr", "show"]);
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {ip}/"))
}

/// Queries dnslocal counted (every outcome).
fn counted(daemon: &Daemon) -> f64 {
    daemon.metrics().unwrap().value("dnslocal_queries_total")
}

struct Lab {
    dir: TestDir,
    node: Netns,
    pod: Netns,
    _nsd: Nsd,
}

impl Lab {
    fn new(label: &str) -> Lab {
        require_tools(&["nsd", "dig", "nft"]);
        let node = Netns::new();
        let pod = Netns::new();
        let dir = TestDir::new(label);
        let nsd = Nsd::start(&node, &dir, 0);
        node.ip(&[
            "link",
            "add",
            "vpod",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ]);
        node.ip(&["addr", "add", "10.244.0.1/24", "dev", "vpod"]);
        node.ip(&["link", "set", "vpod", "up"]);
        pod.ip(&["addr", "add", "10.244.0.2/24", "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "default", "via", "10.244.0.1"]);
        // kube-dns-upstream's ClusterIP, routable from the node (dnslocal's own queries take the output hook).
        node.ip(&["addr", "add", "10.96.0.11/32", "dev", "lo"]);
        for key in ["all", "vpod"] {
            let set = format!("echo 1 > /proc/sys/net/ipv4/conf/{key}/route_localnet");
            let out = node.exec(&["sh", "-c", &set]);
            assert!(out.status.success(), "route_localnet: {out:?}");
        }
        // The kube-proxy stand-in (see the module comment).
        let dnat = |ip: &str| {
            format!(
                "  ip daddr {ip} udp dport 53 dnat to {NSD_ADDR}:53\n  ip daddr {ip} tcp dport 53 dnat to {NSD_ADDR}:53\n"
            )
        };
        node.nft(&format!(
                "table ip kubeproxy {{\n chain prerouting {{\n  type nat hook prerouting priority -100;\n{}{} }}\n \
                 chain output {{\n  type nat hook output priority -100;\n{}{} }}\n}}\n",
                dnat(CLUSTER_IP),
                dnat("10.96.0.11"),
                dnat(CLUSTER_IP),
                dnat("10.96.0.11"),
            ),
        );
        Lab {
            dir,
            node,
            pod,
            _nsd: nsd,
        }
    }

    /// A Talos machine config (service subnet 10.96.0.0/12, the kubelet pointing pods at 10.96.0.10) and a
    /// HybridNetConfig with `interceptClusterDNS`; `cluster_dns` as the `clusterDNS` line, if any.
    fn config(&self, name: &str, intercept: bool, cluster_dns: Option<&str>) -> std::path::PathBuf {
        let dns = cluster_dns
            .map(|d| format!("  clusterDNS: [\"{d}\"]\n"))
            .unwrap_or_default();
        let text = format!(
            "version: v1alpha1\nmachine:\n  type: worker\n  kubelet:\n    clusterDNS: [{CLUSTER_IP}]\ncluster:\n  \
             network:\n    dnsDomain: cluster.local\n    serviceSubnets: [10.96.0.0/12]\n---\n\
             apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {state}\ndataDir: {data}\ndnslocal:\n  \
             listen: [\"169.254.20.10:53\"]\n  upstreams: [\"{NSD_ADDR}:53\"]\n  admin: 127.0.0.1:7448\n  \
             clientRate: 0\n  interceptClusterDNS: {intercept}\n{dns}",
            state = self.dir.join("state").display(),
            data = self.dir.join("data").display(),
        );
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn pod_dig(&self, args: &[&str]) -> hybridnet_integration::dnslocal::Dig {
        dig_in(self.pod.name(), CLUSTER_IP, args)
    }

    fn start(&self, config: &std::path::Path) -> Daemon {
        let mut daemon = Daemon::builder(DaemonKind::Dnslocal, &self.node, config).start();
        daemon
            .wait_ready(READY)
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
        daemon
    }
}

/// With `interceptClusterDNS`, a pod asking the kube-dns ClusterIP is answered by dnslocal (its metrics
/// count the query; without it, by NSD through the DNAT); the table is repaired when flushed; after a
/// crash kube-dns answers at once, and dnslocal again once it is restarted (measured); after a clean stop
/// the table and the address are gone and kube-dns answers.
#[test]
fn intercepted_cluster_ip_is_answered_by_dnslocal_and_by_kube_dns_after_it_stops() {
    let lab = Lab::new("dl-intercept");

    // Before dnslocal: kube-dns (NSD, authoritative: `aa`) answers through the kube-proxy stand-in.
    let before = lab.pod_dig(&["kubernetes.default.svc.cluster.local"]);
    assert_eq!(before.data(), vec!["10.96.0.1"], "{}", before.text);
    assert!(before.flags.contains(&"aa".to_owned()), "{}", before.text);

    // clusterDNS left to default is the intercepted ClusterIP: refused with a clear message.
    let bad = lab.config("bad", true, None);
    let check = DaemonKind::Dnslocal.cli(
        &["check-config", "--config", bad.to_str().unwrap()],
        Duration::from_secs(10),
    );
    let said = format!("{}{}", check.stdout, check.stderr);
    assert!(!check.status.is_some_and(|s| s.success()), "{said}");
    assert!(
        said.contains("kube-dns-upstream") && said.contains(CLUSTER_IP),
        "{said}"
    );

    let config = lab.config("dnslocal", true, Some("10.96.0.11:53"));
    let mut daemon = lab.start(&config);
    let table = wait_until(Duration::from_secs(5), "the NOTRACK table", || {
        our_table(&lab.node).ok_or("no table")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert_eq!(table.matches(" notrack comment").count(), 4, "{table}");
    assert!(
        table.contains("ip daddr 10.96.0.10 udp dport 53 socket wildcard 0 notrack"),
        "{table}"
    );
    assert!(
        table.contains("ip saddr 10.96.0.10 tcp sport 53 notrack")
            && table.contains("ip daddr 10.96.0.10 tcp dport 53 socket transparent 0 notrack"),
        "{table}"
    );
    assert!(
        has_address(&lab.node, CLUSTER_IP),
        "the ClusterIP on dnslocal's link"
    );

    // The pod's queries to the ClusterIP reach dnslocal (counted), over UDP and TCP, for the cluster zone
    // (forwarded to kube-dns-upstream) and other names.
    for args in [
        &["kubernetes.default.svc.cluster.local"][..],
        &["+tcp", "kubernetes.default.svc.cluster.local"][..],
        &["www.example.test"][..],
    ] {
        let n = counted(&daemon);
        let d = lab.pod_dig(args);
        assert_eq!(
            d.status,
            "NOERROR",
            "{args:?}: {}\n{}",
            d.text,
            daemon.log()
        );
        assert!(!d.answers.is_empty(), "{}", d.text);
        assert!(d.flags.contains(&"ra".to_owned()), "{}", d.text);
        assert_eq!(
            counted(&daemon),
            n + 1.0,
            "{args:?} was not answered by dnslocal"
        );
    }

    // Someone deletes the table: repaired on the next resync (every 2 s).
    let out = lab.node.exec(&["nft", "delete", "table", "inet", TABLE]);
    assert!(out.status.success(), "{out:?}");
    let started = Instant::now();
    wait_until(Duration::from_secs(5), "the table to be repaired", || {
        our_table(&lab.node).ok_or("no table")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    eprintln!(
        "table repaired {:?} after it was deleted",
        started.elapsed()
    );

    // A crash (SIGKILL): the address and the rules stay, but with no socket bound to the ClusterIP the rules
    // do not match (`socket wildcard 0`): queries are tracked again and the DNAT sends them to kube-dns.
    daemon.signal(Signal::SIGKILL).unwrap();
    daemon.wait_exit(Duration::from_secs(5)).unwrap();
    assert!(our_table(&lab.node).is_some(), "the rules outlive a crash");
    assert!(
        has_address(&lab.node, CLUSTER_IP),
        "the address outlives a crash"
    );
    let started = Instant::now();
    let during = lab.pod_dig(&["kubernetes.default.svc.cluster.local"]);
    eprintln!(
        "after a crash: kube-dns answers the ClusterIP in {:?} (status {})",
        during.elapsed, during.status
    );
    assert_eq!(during.data(), vec!["10.96.0.1"], "{}", during.text);
    assert!(
        during.flags.contains(&"aa".to_owned()),
        "kube-dns answers: {}",
        during.text
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let tcp = lab.pod_dig(&["+tcp", "kubernetes.default.svc.cluster.local"]);
    assert_eq!(tcp.data(), vec!["10.96.0.1"], "{}", tcp.text);
    // Started again, dnslocal takes the ClusterIP back (its metrics count the pod's query).
    let started = Instant::now();
    let daemon = Daemon::builder(DaemonKind::Dnslocal, &lab.node, &config).start();
    wait_until(
        Duration::from_secs(10),
        "dnslocal to answer the ClusterIP again",
        || {
            let n = daemon
                .metrics()
                .map(|m| m.value("dnslocal_queries_total"))
                .map_err(|e| e.to_string())?;
            let d = dig_in(lab.pod.name(), CLUSTER_IP, &["+time=1", "www.example.test"]);
            let m = daemon
                .metrics()
                .map(|m| m.value("dnslocal_queries_total"))
                .map_err(|e| e.to_string())?;
            if d.status == "NOERROR" && m > n {
                Ok(())
            } else {
                Err(d.text)
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    eprintln!(
        "after a crash: dnslocal answers the ClusterIP again {:?} after it is started",
        started.elapsed()
    );
    let mut daemon = daemon;
    daemon
        .wait_ready(READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));

    // A clean stop: the rules and the address go; kube-dns answers the ClusterIP again.
    daemon.signal(Signal::SIGTERM).unwrap();
    daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert!(our_table(&lab.node).is_none(), "{}", daemon.log());
    assert!(!has_address(&lab.node, CLUSTER_IP), "{}", daemon.log());
    let after = lab.pod_dig(&["kubernetes.default.svc.cluster.local"]);
    assert_eq!(after.data(), vec!["10.96.0.1"], "{}", after.text);
    assert!(after.flags.contains(&"aa".to_owned()), "{}", after.text);
}

/// A reload to `interceptClusterDNS: false` removes the rules and the ClusterIP: kube-dns answers it again
/// while dnslocal keeps serving its listen address.
#[test]
fn reload_to_false_hands_the_cluster_ip_back_to_kube_dns() {
    let lab = Lab::new("dl-intercept-reload");
    let config = lab.config("dnslocal", true, Some("10.96.0.11:53"));
    let daemon = lab.start(&config);
    wait_until(Duration::from_secs(5), "the NOTRACK table", || {
        our_table(&lab.node).ok_or("no table")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let n = counted(&daemon);
    assert_eq!(lab.pod_dig(&["www.example.test"]).status, "NOERROR");
    assert_eq!(counted(&daemon), n + 1.0);

    let off = lab.config("off", false, Some("10.96.0.11:53"));
    std::fs::copy(&off, &config).unwrap();
    wait_until(
        Duration::from_secs(5),
        "the table and the address to go",
        || {
            if our_table(&lab.node).is_none() && !has_address(&lab.node, CLUSTER_IP) {
                Ok(())
            } else {
                Err("still there")
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let n = counted(&daemon);
    let d = lab.pod_dig(&["kubernetes.default.svc.cluster.local"]);
    assert_eq!(d.data(), vec!["10.96.0.1"], "{}", d.text);
    assert!(
        d.flags.contains(&"aa".to_owned()),
        "kube-dns answers: {}",
        d.text
    );
    assert_eq!(counted(&daemon), n, "dnslocal no longer sees the ClusterIP");
    let own = dig_in(lab.node.name(), "169.254.20.10", &["www.example.test"]);
    assert_eq!(own.status, "NOERROR", "{}", own.text);
}
