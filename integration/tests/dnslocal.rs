//! dnslocal against real peers, as root, each test in its own network namespace: NSD as the upstream and
//! the cluster DNS, `dig` and glibc's resolver (`getent`) as clients.
//!
//! Run: `cargo build --release -p hybridnet-dnslocal && sudo -E cargo test -p hybridnet-integration --test dnslocal`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hybridnet_integration::dnslocal::{
    CountingUpstream, LISTEN, Load, NSD_ADDR, NetnsResolvConf, Nsd, dig_in, query_bytes,
    require_tools, spawn_in, write_config,
};
use hybridnet_integration::{Daemon, DaemonKind, Netns, TestDir, wait_until};
use nix::sys::signal::Signal;

const READY: Duration = Duration::from_secs(10);

struct Setup {
    // Drop order: daemon, nsd, then the namespace.
    daemon: Daemon,
    nsd: Nsd,
    dir: TestDir,
    ns: Netns,
}

fn setup(label: &str, max_ttl: &str) -> Setup {
    require_tools(&["nsd", "dig", "getent"]);
    let ns = Netns::new();
    let dir = TestDir::new(label);
    let nsd = Nsd::start(&ns, &dir, 0);
    let upstream = format!("{NSD_ADDR}:53");
    let config = write_config(&dir, "dnslocal", "127.0.0.1:7448", &[&upstream], max_ttl);
    let mut daemon = Daemon::builder(DaemonKind::Dnslocal, &ns, config).start();
    daemon
        .wait_ready(READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    Setup {
        daemon,
        nsd,
        dir,
        ns,
    }
}

impl Setup {
    fn dig(&self, args: &[&str]) -> hybridnet_integration::dnslocal::Dig {
        dig_in(self.ns.name(), LISTEN, args)
    }
}

#[test]
fn answers_caches_and_routes() {
    let s = setup("dl-basic", "1h");
    // The client's case comes back; the answer is cached (the second one has an aged or equal TTL).
    let first = s.dig(&["WwW.ExAmPlE.tEsT"]);
    assert_eq!(first.status, "NOERROR", "{}", first.text);
    assert_eq!(first.data(), vec!["192.0.2.80"]);
    assert!(
        first.answers[0].starts_with("WwW.ExAmPlE.tEsT."),
        "{}",
        first.text
    );
    assert!(first.flags.contains(&"ra".to_owned()), "{}", first.text);

    // The cluster zone and reverse zones go to the cluster DNS (over TCP).
    let k8s = s.dig(&["kubernetes.default.svc.cluster.local"]);
    assert_eq!(k8s.data(), vec!["10.96.0.1"], "{}", k8s.text);
    let ptr = s.dig(&["-x", "192.0.2.80"]);
    assert_eq!(ptr.data(), vec!["www.example.test."], "{}", ptr.text);

    // NXDOMAIN and NODATA, then the same with the upstream hung: answered from the cache, at once.
    let nx = s.dig(&["nope.example.test"]);
    assert_eq!(nx.status, "NXDOMAIN", "{}", nx.text);
    assert!(nx.text.contains("SOA"), "{}", nx.text);
    let nodata = s.dig(&["www.example.test", "MX"]);
    assert_eq!(
        (nodata.status.as_str(), nodata.answers.len()),
        ("NOERROR", 0),
        "{}",
        nodata.text
    );
    s.nsd.pause(true);
    for (args, status) in [
        (vec!["nope.example.test"], "NXDOMAIN"),
        (vec!["www.example.test", "MX"], "NOERROR"),
        (vec!["www.example.test"], "NOERROR"),
        (vec!["kubernetes.default.svc.cluster.local"], "NOERROR"),
    ] {
        let d = s.dig(&args);
        assert_eq!(d.status, status, "{args:?} from the cache: {}", d.text);
        assert!(
            d.elapsed < Duration::from_millis(500),
            "{args:?} took {:?}",
            d.elapsed
        );
    }
    s.nsd.pause(false);

    // Metrics and status.
    let m = s.daemon.metrics().unwrap();
    let hits: f64 = m
        .series("dnslocal_queries_total")
        .filter(|(l, _)| l.contains("result=\"hit\""))
        .map(|(_, v)| v)
        .sum();
    assert!(hits >= 4.0, "hits {hits}:\n{}", m.0);
    let status = wait_until(Duration::from_secs(10), "status shows the cache", || {
        let out = DaemonKind::Dnslocal.cli(
            &[
                "status",
                "--state-dir",
                s.dir.join("dnslocal-state").to_str().unwrap(),
            ],
            Duration::from_secs(5),
        );
        if out.stdout.contains("upstreams") && out.stdout.contains("hit ") {
            Ok(out.stdout)
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    })
    .unwrap();
    assert!(status.contains("127.0.0.11:53 (udp, up"), "{status}");

    // On SIGTERM it stops and removes the link it created.
    let Setup {
        mut daemon,
        ns,
        nsd,
        dir,
    } = s;
    daemon.signal(Signal::SIGTERM).unwrap();
    let exit = daemon.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "{exit}\n{}", daemon.log());
    let link = ns.exec(&["ip", "link", "show", "dnslocal0"]);
    assert!(!link.status.success(), "the link is still there");
    drop((daemon, nsd, dir, ns));
}

#[test]
fn truncation_and_tcp() {
    let s = setup("dl-tc", "1h");
    // 8 × 200-byte TXT: more than the 1232 bytes dnslocal asks upstream for, so it retries over TCP.
    let big = s.dig(&["big.example.test", "TXT", "+bufsize=4096"]);
    assert_eq!(big.answers.len(), 8, "{}", big.text);
    assert!(!big.flags.contains(&"tc".to_owned()), "{}", big.text);
    // A client without EDNS gets TC and no records over UDP...
    let tc = s.dig(&["big.example.test", "TXT", "+noedns", "+ignore"]);
    assert!(tc.flags.contains(&"tc".to_owned()), "{}", tc.text);
    assert!(tc.answers.is_empty(), "{}", tc.text);
    // ... and everything over TCP (dig retries by itself without +ignore).
    let retried = s.dig(&["big.example.test", "TXT", "+noedns"]);
    assert_eq!(retried.answers.len(), 8, "{}", retried.text);
    let tcp = s.dig(&["www.example.test", "+tcp"]);
    assert_eq!(tcp.data(), vec!["192.0.2.80"], "{}", tcp.text);
}

#[test]
fn glibc_search_path_expansion() {
    let s = setup("dl-glibc", "1h");
    let _resolv = NetnsResolvConf::write(
        &s.ns,
        &format!(
            "nameserver {LISTEN}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        ),
    );
    for (name, want) in [
        ("kubernetes", "10.96.0.1"),
        ("kube-dns.kube-system", "10.96.0.10"),
        ("www.example.test", "192.0.2.80"),
    ] {
        let started = Instant::now();
        let out = s.ns.exec(&["getent", "ahosts", name]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(want),
            "getent ahosts {name}: {text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name} took {:?}",
            started.elapsed()
        );
    }
    let out = s.ns.exec(&["getent", "ahosts", "nothing-here"]);
    assert_eq!(out.status.code(), Some(2), "a name that exists nowhere");
}

#[test]
fn upstream_hung_dead_and_back() {
    // maxTTL 1s: answers expire fast, so what follows is served stale.
    let mut s = setup("dl-stale", "1s");
    for name in ["www.example.test", "kubernetes.default.svc.cluster.local"] {
        assert_eq!(s.dig(&[name]).status, "NOERROR");
    }
    std::thread::sleep(Duration::from_millis(1500));

    // Hung upstream (SIGSTOP: no answers, no errors).
    s.nsd.pause(true);
    for name in ["www.example.test", "kubernetes.default.svc.cluster.local"] {
        let d = s.dig(&[name]);
        assert_eq!(d.status, "NOERROR", "{name} stale: {}", d.text);
        assert_eq!(d.ttls(), vec![30], "stale TTL: {}", d.text);
        assert!(
            d.elapsed < Duration::from_secs(1),
            "{name} took {:?}",
            d.elapsed
        );
    }
    let d = s.dig(&["uncached.example.test"]);
    assert_eq!(d.status, "SERVFAIL", "{}", d.text);
    assert!(
        d.elapsed < Duration::from_millis(1250),
        "SERVFAIL took {:?}",
        d.elapsed
    );

    // Dead upstream (killed: ICMP port unreachable, connection refused).
    s.nsd.kill();
    let d = s.dig(&["www.example.test"]);
    assert_eq!(
        (d.status.as_str(), d.ttls()),
        ("NOERROR", vec![30]),
        "{}",
        d.text
    );
    let d = s.dig(&["kubernetes.default.svc.cluster.local"]);
    assert_eq!(
        (d.status.as_str(), d.ttls()),
        ("NOERROR", vec![30]),
        "{}",
        d.text
    );
    let d = s.dig(&["other.example.test"]);
    assert_eq!(d.status, "SERVFAIL", "{}", d.text);
    assert!(
        d.elapsed < Duration::from_millis(1250),
        "SERVFAIL took {:?}",
        d.elapsed
    );

    // Back, with new data: fresh answers within a second.
    s.nsd.restart(1);
    let back = Instant::now();
    let fresh = wait_until(Duration::from_secs(1), "a fresh answer", || {
        let d = s.dig(&["www.example.test"]);
        if d.data() == vec!["192.0.2.81"] {
            Ok(d)
        } else {
            Err(d.text)
        }
    })
    .unwrap();
    assert!(
        back.elapsed() < Duration::from_millis(1200),
        "fresh after {:?}",
        back.elapsed()
    );
    assert_ne!(fresh.ttls(), vec![30]);
    let d = s.dig(&["uncached.example.test"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
}

#[test]
fn concurrent_identical_misses_are_one_upstream_query() {
    require_tools(&["dig"]);
    let ns = Netns::new();
    let dir = TestDir::new("dl-coalesce");
    let upstream: SocketAddr = "127.0.0.12:53".parse().unwrap();
    let standin = CountingUpstream::start(ns.name(), upstream, Duration::from_millis(300));
    let config = write_config(&dir, "dnslocal", "127.0.0.1:7448", &["127.0.0.12:53"], "1h");
    let mut daemon = Daemon::builder(DaemonKind::Dnslocal, &ns, config).start();
    daemon
        .wait_ready(READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));

    let server: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let barrier = Arc::new(Barrier::new(100));
    let clients: Vec<_> = (0..100u16)
        .map(|i| {
            let barrier = barrier.clone();
            spawn_in(ns.name(), move || {
                let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .unwrap();
                barrier.wait();
                socket
                    .send_to(&query_bytes("same.example.test", i), server)
                    .unwrap();
                let mut buf = [0u8; 512];
                let (n, _) = socket.recv_from(&mut buf).expect("an answer");
                (buf[..2] == i.to_be_bytes() && n > 12 && buf[3] & 0x0F == 0 && buf[7] == 1)
                    .then_some(())
                    .ok_or(format!("bad answer {:?}", &buf[..n]))
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap().unwrap();
    }
    assert_eq!(
        standin.count(),
        1,
        "upstream queries for 100 identical misses"
    );
    let m = daemon.metrics().unwrap();
    let count = |result: &str| -> f64 {
        m.series("dnslocal_queries_total")
            .filter(|(l, _)| l.contains(&format!("result=\"{result}\"")))
            .map(|(_, v)| v)
            .sum()
    };
    // One miss; the others joined it (or, if they came late on a busy machine, hit the cache it filled).
    assert_eq!(count("miss"), 1.0, "{}", m.0);
    assert!(count("coalesced") >= 1.0, "{}", m.0);
    assert_eq!(count("coalesced") + count("hit"), 99.0, "{}", m.0);
}

#[test]
fn restart_under_load_loses_nothing() {
    let s = setup("dl-restart", "1h");
    let names: Vec<String> = [
        "www.example.test",
        "kubernetes.default.svc.cluster.local",
        "nope.example.test",
        "kube-dns.kube-system.svc.cluster.local",
    ]
    .iter()
    .map(|n| (*n).to_owned())
    .collect();
    let server: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let load = Load::start(s.ns.name(), server, names, 16, Duration::from_micros(200));
    std::thread::sleep(Duration::from_millis(800));

    // The new instance starts beside the old one (SO_REUSEPORT on DNS and admin ports)...
    let config = write_config(
        &s.dir,
        "dnslocal-new",
        "127.0.0.1:7449",
        &[&format!("{NSD_ADDR}:53")],
        "1h",
    );
    let mut new = Daemon::builder(DaemonKind::Dnslocal, &s.ns, config)
        .admin("127.0.0.1:7449".parse().unwrap())
        .log_file(s.dir.join("dnslocal-new.log"))
        .start();
    new.wait_ready(READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", new.log()));
    std::thread::sleep(Duration::from_millis(500));
    // ... then the old one drains and exits.
    let Setup {
        mut daemon,
        nsd,
        dir,
        ns,
    } = s;
    daemon.signal(Signal::SIGTERM).unwrap();
    let exit = daemon.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "{exit}\n{}", daemon.log());
    std::thread::sleep(Duration::from_millis(800));
    let report = load.stop();
    assert!(report.sent > 1000, "too little load: {report:?}");
    assert_eq!(
        report.lost, 0,
        "lost queries across the restart: {report:?}"
    );
    // The new instance took over and still has its listen address.
    let d = dig_in(ns.name(), LISTEN, &["www.example.test"]);
    assert_eq!(d.data(), vec!["192.0.2.80"], "{}", d.text);
    eprintln!("restart under load: {report:?}");
    drop((new, daemon, nsd, dir, ns));
}

#[test]
fn reload_under_load_loses_nothing() {
    let s = setup("dl-reload", "1h");
    let names = vec![
        "www.example.test".to_owned(),
        "nope.example.test".to_owned(),
    ];
    let server: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let load = Load::start(s.ns.name(), server, names, 8, Duration::from_micros(500));
    std::thread::sleep(Duration::from_millis(500));
    // A new version of the file (another cache size): a new engine binds beside the old one, which drains.
    let config = s.dir.join("dnslocal.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("size: 10000", "size: 20000");
    hybridnet_integration::write_atomic(&config, text);
    wait_until(Duration::from_secs(10), "the new config applied", || {
        let log = s.daemon.log();
        if log.contains("applied the new configuration") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    assert!(report.sent > 1000, "too little load: {report:?}");
    assert_eq!(report.lost, 0, "lost queries across the reload: {report:?}");
    let status = wait_until(
        Duration::from_secs(10),
        "status shows the new capacity",
        || {
            let st = DaemonKind::Dnslocal.read_status(&s.dir.join("dnslocal-state"))?;
            let capacity = st.details["cache"]["capacity"].as_u64().unwrap_or(0);
            if capacity >= 20000 {
                Ok(capacity)
            } else {
                Err(format!("capacity {capacity}"))
            }
        },
    )
    .unwrap();
    assert!(status >= 20000);
}

/// An upstream the node has no route to yet (ENETUNREACH on connect) must not stop dnslocal: it serves the
/// cluster zone from the cluster DNS and answers SERVFAIL promptly for the rest (found in the extension's
/// QEMU test, where dnslocal started before the VM had a route).
#[test]
fn unroutable_upstream_does_not_stop_serving() {
    require_tools(&["nsd", "dig"]);
    let ns = Netns::new(); // loopback only: 198.51.100.0/24 has no route here
    let dir = TestDir::new("dl-noroute");
    let _nsd = Nsd::start(&ns, &dir, 0);
    let config = write_config(
        &dir,
        "dnslocal",
        "127.0.0.1:7448",
        &["198.51.100.53:53"],
        "1h",
    );
    let mut daemon = Daemon::builder(DaemonKind::Dnslocal, &ns, config).start();
    daemon
        .wait_ready(READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let k8s = dig_in(ns.name(), LISTEN, &["kubernetes.default.svc.cluster.local"]);
    assert_eq!(k8s.data(), vec!["10.96.0.1"], "{}", k8s.text);
    let started = Instant::now();
    let outside = dig_in(ns.name(), LISTEN, &["www.example.test"]);
    assert_eq!(outside.status, "SERVFAIL", "{}", outside.text);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "SERVFAIL took {:?}",
        started.elapsed()
    );
}

/// A Service-like ClusterIP: `ip`:53 (UDP and TCP) DNATed to `to`:53, as kube-proxy does.
fn cluster_ip(ns: &Netns, ip: &str, to: &str) {
    ns.nft(&format!(
            "table ip dltest {{\n chain out {{\n  type nat hook output priority -100;\n  \
             ip daddr {ip} udp dport 53 dnat to {to}:53\n  ip daddr {ip} tcp dport 53 dnat to {to}:53\n }}\n}}\n"
        ),
    );
}

/// The set-up `docs/talos.md` recommends: the kubelet's `clusterDNS` is dnslocal. The config then
/// derives kube-dns from the service subnet (its 10th address, 10.96.0.10: a ClusterIP in front of
/// NSD here) instead of forwarding the cluster zone to dnslocal itself.
#[test]
fn a_kubelet_pointing_at_dnslocal_sends_the_cluster_zone_to_kube_dns() {
    require_tools(&["nsd", "dig", "nft"]);
    let ns = Netns::new();
    let dir = TestDir::new("dl-kubelet-self");
    let _nsd = Nsd::start(&ns, &dir, 0);
    cluster_ip(&ns, "10.96.0.10", NSD_ADDR);
    ns.ip(&["addr", "add", "10.96.0.10/32", "dev", "lo"]);
    let text = format!(
        "version: v1alpha1\nmachine:\n  type: worker\n  kubelet:\n    clusterDNS: [{LISTEN}]\ncluster:\n  \
         network:\n    dnsDomain: cluster.local\n    serviceSubnets: [10.96.0.0/12]\n---\n\
         apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {state}\ndataDir: {data}\ndnslocal:\n  \
         listen: [\"{LISTEN}:53\"]\n  upstreams: [\"{NSD_ADDR}:53\"]\n  admin: 127.0.0.1:7448\n",
        state = dir.join("state").display(),
        data = dir.join("data").display(),
    );
    let config = dir.join("dnslocal.yaml");
    std::fs::write(&config, text).unwrap();
    let check = DaemonKind::Dnslocal.cli(
        &["check-config", "--config", config.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert!(
        check
            .stdout
            .lines()
            .any(|l| l.starts_with("dnslocal.clusterDNS")
                && l.contains("10.96.0.10:53")
                && l.contains("derived from cluster.network.serviceSubnets")),
        "{}{}",
        check.stdout,
        check.stderr
    );
    assert!(
        format!("{}{}", check.stdout, check.stderr).contains("warning:"),
        "{}{}",
        check.stdout,
        check.stderr
    );
    let mut daemon = Daemon::builder(DaemonKind::Dnslocal, &ns, config).start();
    daemon
        .wait_ready(READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let k8s = dig_in(ns.name(), LISTEN, &["kubernetes.default.svc.cluster.local"]);
    assert_eq!(k8s.data(), vec!["10.96.0.1"], "{}", k8s.text);
    let m = daemon.metrics().unwrap();
    assert_eq!(m.value("dnslocal_forward_loops_total"), 0.0, "{}", m.0);
    assert_eq!(m.value("dnslocal_cluster_loop"), 0.0, "{}", m.0);
}

/// A loop through another hop: the cluster DNS address is a ClusterIP that leads back to dnslocal
/// (kube-dns's Service pointed at the node-local cache). dnslocal's probe comes back to it: the loop
/// is logged and counted, cluster-zone questions get SERVFAIL at once instead of recursing until
/// the deadline, and other names still resolve.
#[test]
fn a_cluster_dns_that_leads_back_to_dnslocal_is_refused_at_run_time() {
    require_tools(&["nsd", "dig", "nft"]);
    let ns = Netns::new();
    let dir = TestDir::new("dl-loop");
    let _nsd = Nsd::start(&ns, &dir, 0);
    ns.ip(&["addr", "add", "10.96.0.10/32", "dev", "lo"]);
    cluster_ip(&ns, "10.96.0.10", LISTEN);
    let config = write_config(
        &dir,
        "dnslocal",
        "127.0.0.1:7448",
        &[&format!("{NSD_ADDR}:53")],
        "1h",
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("clusterDNS: [\"{NSD_ADDR}:53\"]"),
        "clusterDNS: [\"10.96.0.10:53\"]",
    );
    std::fs::write(&config, text).unwrap();
    let mut daemon = Daemon::builder(DaemonKind::Dnslocal, &ns, config).start();
    daemon
        .wait_ready(READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let m = wait_until(Duration::from_secs(5), "the loop to be found", || {
        let m = daemon.metrics().map_err(|e| e.to_string())?;
        if m.value("dnslocal_cluster_loop") == 1.0 {
            Ok(m)
        } else {
            Err(m.0)
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let returned: f64 = m
        .series("dnslocal_forward_loops_total")
        .filter(|(l, _)| l.contains("kind=\"returned\""))
        .map(|(_, v)| v)
        .sum();
    assert!(returned >= 1.0, "{}", m.0);
    assert!(daemon.log().contains("loop"), "{}", daemon.log());
    let k8s = dig_in(ns.name(), LISTEN, &["kubernetes.default.svc.cluster.local"]);
    let took = k8s.elapsed;
    assert_eq!(k8s.status, "SERVFAIL", "{}", k8s.text);
    eprintln!("cluster-zone question through the loop: SERVFAIL in {took:?}");
    assert!(took < Duration::from_millis(300), "SERVFAIL took {took:?}");
    let outside = dig_in(ns.name(), LISTEN, &["www.example.test"]);
    assert_eq!(outside.data(), vec!["192.0.2.80"], "{}", outside.text);
}

/// A link of dnslocal's interface name that dnslocal did not create (a CNI's bridge, an administrator's
/// link) is left alone: no addresses added, not deleted on exit, and the status names it.
#[test]
fn a_foreign_link_of_its_name_is_left_alone() {
    let ns = Netns::new();
    let dir = TestDir::new("dnslocal-foreign");
    ns.ip(&["link", "add", "dnslocal0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.123.0.1/32", "dev", "dnslocal0"]);
    let config = write_config(&dir, "dnslocal", "127.0.0.1:7448", &["127.0.0.1:53"], "1h");
    let mut daemon = Daemon::builder(DaemonKind::Dnslocal, &ns, config).start();
    let state = dir.join("dnslocal-state");
    let summary = daemon
        .wait_alive(READY, "dnslocal to report the foreign link", |_| {
            let s = DaemonKind::Dnslocal.read_status(&state)?;
            if s.summary.contains("dnslocal did not create it") {
                Ok(s.summary)
            } else {
                Err(s.summary)
            }
        })
        .unwrap();
    assert!(
        summary.contains("dnslocal0") && summary.contains("bridge"),
        "{summary}"
    );
    daemon.signal(Signal::SIGTERM).unwrap();
    daemon.wait_exit(Duration::from_secs(10)).unwrap();
    let link = String::from_utf8_lossy(&ns.exec(&["ip", "-d", "addr", "show", "dnslocal0"]).stdout)
        .into_owned();
    assert!(link.contains("10.123.0.1/32"), "untouched: {link}");
    assert!(
        !link.contains(&LISTEN.to_string()),
        "no listen address added: {link}"
    );
    assert!(!link.contains("hybridnet-dnslocal"), "not marked: {link}");
}

/// A start that fails after the link was made (the listen port is taken) removes the link again.
#[test]
fn a_failed_bind_removes_the_link() {
    let ns = Netns::new();
    let dir = TestDir::new("dnslocal-failed-bind");
    // A TCP listener on the wildcard address without SO_REUSEPORT: dnslocal's TCP bind on the listen
    // address fails (its UDP port stays free, so its teardown does not take it for another instance's).
    let holder = ns
        .enter(|| std::net::TcpListener::bind("0.0.0.0:53"))
        .unwrap()
        .unwrap();
    let config = write_config(&dir, "dnslocal", "127.0.0.1:7448", &["127.0.0.1:53"], "1h");
    let mut daemon = Daemon::builder(DaemonKind::Dnslocal, &ns, config).start();
    let state = dir.join("dnslocal-state");
    daemon
        .wait_alive(READY, "dnslocal to report the failed bind", |_| {
            let s = DaemonKind::Dnslocal.read_status(&state)?;
            s.summary
                .contains("not serving")
                .then_some(())
                .ok_or(s.summary)
        })
        .unwrap();
    // Between the retries the link is gone.
    wait_until(
        Duration::from_secs(6),
        "no link after the failed start",
        || {
            let link = ns.exec(&["ip", "link", "show", "dnslocal0"]);
            (!link.status.success())
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&link.stdout).into_owned())
        },
    )
    .unwrap();
    drop(holder);
    daemon.wait_ready(READY).unwrap();
    daemon.signal(Signal::SIGTERM).unwrap();
    daemon.wait_exit(Duration::from_secs(10)).unwrap();
}
