//! meshd as a controller, in network namespaces (userspace backend): what meshd owns and someone else
//! changed comes back within one resync (rules, addresses, the interface itself), a link of meshd's name
//! that meshd did not create is left alone, a failed start leaves nothing behind, and pongs stay fast
//! while meshd does slow work. Needs root; fails (never skips) without it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hybridnet_integration::meshd::{MeshLab, PORT};
use hybridnet_integration::{Daemon, Netns, wait_until, write_atomic};
use hybridnet_meshd::identity::PrivateKey;
use hybridnet_meshd::probe::{self, Kind, Probe};
use nix::sys::signal::Signal;

/// meshd's full resync period (`mesh::RESYNC`): every repair must land within it (plus slack for a
/// loaded machine: the pass itself, the status write).
const RESYNC: Duration = hybridnet_meshd::mesh::RESYNC;
const SLACK: Duration = Duration::from_secs(3);

fn sh(ns: &Netns, args: &[&str]) -> String {
    let out = ns.exec(args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_all_up(lab: &MeshLab, timeout: Duration) {
    for node in &lab.nodes {
        wait_until(
            timeout,
            format!("{} to see its peer up", node.name()),
            || node.all_up(lab.nodes.len() - 1),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Both directions ping over the mesh.
fn ping_both(lab: &MeshLab, timeout: Duration) {
    for (a, b) in [(0, 1), (1, 0)] {
        let dst = lab.nodes[b].mesh_ip().to_string();
        wait_until(timeout, format!("node{} to ping {dst}", a + 1), || {
            lab.nodes[a].ping(&dst)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Waits until `check` holds on node 0; returns how long it took (fails past one resync plus slack).
fn repaired(what: &str, check: impl FnMut() -> Result<(), String>) -> Duration {
    let start = Instant::now();
    wait_until(RESYNC + SLACK, what, check).unwrap_or_else(|e| panic!("{e}"));
    let took = start.elapsed();
    eprintln!("{what}: back after {took:?}");
    took
}

fn rules(ns: &Netns) -> (usize, usize) {
    let v4 = sh(ns, &["ip", "-4", "rule"])
        .matches("lookup 51821")
        .count();
    let v6 = sh(ns, &["ip", "-6", "rule"])
        .matches("lookup 51821")
        .count();
    (v4, v6)
}

#[test]
fn rules_addresses_and_the_interface_come_back_within_one_resync() {
    let mut lab = MeshLab::new(2, "meshd-drift");
    let mut daemons: Vec<Daemon> = lab.start_all();
    wait_all_up(&lab, Duration::from_secs(15));
    ping_both(&lab, Duration::from_secs(5));
    let ns = &lab.nodes[0].netns;
    let link = sh(ns, &["ip", "-d", "link", "show", "hybridnet0"]);
    assert!(
        link.contains("alias hybridnet-meshd"),
        "meshd marks its link: {link}"
    );

    // Rules deleted (as systemd-networkd's ManageForeignRoutingPolicyRules does).
    assert_eq!(rules(ns), (1, 1));
    ns.ip(&["-4", "rule", "del", "priority", "32450"]);
    ns.ip(&["-6", "rule", "del", "priority", "32450"]);
    assert_eq!(rules(ns), (0, 0));
    repaired("the two rules", || match rules(ns) {
        (1, 1) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    ping_both(&lab, Duration::from_secs(5));

    // An address removed.
    ns.ip(&["addr", "del", "10.99.0.1/32", "dev", "hybridnet0"]);
    repaired("the mesh address 10.99.0.1", || {
        let a = sh(ns, &["ip", "addr", "show", "dev", "hybridnet0"]);
        a.contains("10.99.0.1/32").then_some(()).ok_or(a)
    });
    ping_both(&lab, Duration::from_secs(5));

    // The interface set down and given another MTU.
    ns.ip(&["link", "set", "hybridnet0", "down", "mtu", "1300"]);
    repaired("the interface up with its MTU", || {
        let l = sh(ns, &["ip", "link", "show", "hybridnet0"]);
        (l.contains(",UP") && l.contains("mtu 1420"))
            .then_some(())
            .ok_or(l)
    });
    ping_both(&lab, Duration::from_secs(5));

    // The interface deleted: re-created, marked, configured, traffic passes again.
    ns.ip(&["link", "del", "hybridnet0"]);
    repaired("the interface", || {
        let l = sh(ns, &["ip", "-d", "link", "show", "hybridnet0"]);
        l.contains("alias hybridnet-meshd").then_some(()).ok_or(l)
    });
    ping_both(&lab, Duration::from_secs(10));
    let routes = sh(ns, &["ip", "route", "show", "table", "51821"]);
    assert!(routes.contains("10.99.0.2"), "routes back: {routes}");
    let metrics = daemons[0].metrics().unwrap_or_else(|e| panic!("{e}"));
    for resource in ["link", "address", "rule"] {
        let n = metrics
            .series("meshd_drift_repairs_total")
            .filter(|(labels, _)| labels.contains(&format!("resource=\"{resource}\"")))
            .map(|(_, v)| v)
            .sum::<f64>();
        assert!(
            n >= 1.0,
            "meshd_drift_repairs_total{{resource={resource}}} = {n}"
        );
    }
    for d in &mut daemons {
        d.signal(Signal::SIGTERM).unwrap_or_else(|e| panic!("{e}"));
        let status = d
            .wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "clean stop: {status:?}");
    }
}

#[test]
fn a_foreign_link_of_our_name_is_left_alone_with_a_clear_error() {
    let lab = MeshLab::new(1, "meshd-foreign");
    let ns = &lab.nodes[0].netns;
    // A bridge, as a CNI's `cni0` would be (this kernel may have no dummy links).
    ns.ip(&["link", "add", "hybridnet0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.123.0.1/32", "dev", "hybridnet0"]);
    ns.ip(&["link", "set", "hybridnet0", "up"]);
    lab.write_config(0);
    let mut d = lab.start(0);
    let state = lab.nodes[0].state_dir.clone();
    let summary = d
        .wait_alive(
            Duration::from_secs(15),
            "meshd to report the foreign link",
            |d| {
                let s = d.status_in(&state)?;
                if s.summary.contains("meshd did not create it") {
                    Ok(s.summary)
                } else {
                    Err(s.summary)
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("status: {summary}");
    assert!(
        summary.contains("hybridnet0") && summary.contains("bridge"),
        "{summary}"
    );
    d.signal(Signal::SIGTERM).unwrap_or_else(|e| panic!("{e}"));
    d.wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    let link = sh(ns, &["ip", "-d", "addr", "show", "dev", "hybridnet0"]);
    assert!(
        link.contains("bridge") && link.contains("10.123.0.1/32"),
        "the foreign link is untouched: {link}"
    );
    assert!(!link.contains("hybridnet-meshd"), "not marked: {link}");
    assert_eq!(rules(ns), (0, 0), "no rules left behind");
}

#[test]
fn a_failed_start_leaves_nothing_behind() {
    let lab = MeshLab::new(1, "meshd-failed-start");
    let ns = &lab.nodes[0].netns;
    // Someone holds the probe port: the start fails after the link and the rules were made.
    let port = probe::probe_port(PORT);
    let holder = ns
        .enter(|| UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, port)))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("cannot hold the probe port {port}: {e}"));
    lab.write_config(0);
    let mut d = lab.start(0);
    let state = lab.nodes[0].state_dir.clone();
    d.wait_alive(
        Duration::from_secs(15),
        "meshd to report the failed start",
        |d| {
            let s = d.status_in(&state)?;
            s.summary
                .contains("probe socket")
                .then_some(())
                .ok_or(s.summary)
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Between the retries (every 2 s) nothing of meshd's is left.
    wait_until(
        Duration::from_secs(6),
        "no link and no rules after the failed start",
        || {
            let link = ns.exec(&["ip", "link", "show", "hybridnet0"]);
            match (link.status.success(), rules(ns)) {
                (false, (0, 0)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The port free again: the next retry starts the mesh.
    drop(holder);
    wait_until(Duration::from_secs(10), "meshd to start", || {
        let l = sh(ns, &["ip", "-d", "link", "show", "hybridnet0"]);
        (l.contains("hybridnet-meshd") && rules(ns) == (1, 1))
            .then_some(())
            .ok_or(l)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    d.signal(Signal::SIGTERM).unwrap_or_else(|e| panic!("{e}"));
    d.wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !ns.exec(&["ip", "link", "show", "hybridnet0"])
            .status
            .success()
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// A stand-in prober (the test, with meshd's own probe code and a key of its own) pings meshd every
/// 10 ms while meshd reloads a config whose new peer has a hostname that cannot be resolved (the DNS
/// server is unreachable: the lookup runs into meshd's 2 s timeout), while its MSS clamping table is
/// deleted and repaired, and while its discovery client stops. Every pong must come back fast.
#[test]
fn pongs_stay_fast_while_meshd_does_slow_work() {
    let mut lab = MeshLab::new(2, "meshd-pong");
    // Node 2 runs no meshd: the test probes from there.
    let prober_key = PrivateKey([42; 32]);
    lab.nodes[1].public_key = prober_key.public().to_string();
    // Discovery on (its server unreachable), so that a reload can stop it. The identity is a Talos
    // fixture's (as in meshd_discovery.rs).
    // The identity stays (the mesh prefix comes from the cluster ID); the reload drops the service.
    let identity = "---\napiVersion: v1alpha1\nkind: DiscoveryIdentityConfig\n\
                    clusterID: 0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w=\n\
                    clusterSecret: pofHbABZq7VXuObsdLdy/bHmz6hlMHZ3p8+6WKrv1ic=\n";
    let service = "---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: lab0\n\
                   endpoint: https://192.0.2.99:443\n";
    let base = lab.render(0);
    write_atomic(&lab.nodes[0].config, format!("{base}{identity}{service}"));
    let mut d = lab.start(0);
    let meshd_key = hybridnet_integration::meshd::public_key_of(&mut d, &lab.nodes[0].state_dir);
    let meshd_key = decode_key(&meshd_key);
    let ns0 = &lab.nodes[0].netns;
    // The node's DNS server (from the shared resolv.conf) is on-link and never answers (a loopback
    // stub resolver cannot be redirected: then the lookup fails at once, and only the other slow work
    // remains).
    if let Some(dns) = nameserver().filter(|a| !a.is_loopback()) {
        ns0.ip(&["route", "add", &format!("{dns}/32"), "dev", "priv"]);
    }
    let target = SocketAddr::new(
        IpAddr::V4(lab.nodes[0].private_ip()),
        probe::probe_port(PORT),
    );
    let shared = probe::key(&prober_key.shared(&meshd_key));
    let sender = prober_key.public();
    let socket = lab.nodes[1]
        .netns
        .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap_or_else(|e| panic!("{e}"));
    let ping = |nonce: u64| -> Option<Duration> {
        let p = Probe {
            kind: Kind::Ping,
            sender,
            nonce,
            timestamp_us: probe::now_us(),
            observed: None,
            target: Some(target),
            flags: 0,
        };
        let start = Instant::now();
        socket.send_to(&probe::encode(&p, &shared), target).ok()?;
        let mut buf = [0u8; 128];
        while start.elapsed() < Duration::from_millis(500) {
            let Ok((n, _)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let bytes = &buf[..n];
            if let Some(pong) = probe::decode(bytes)
                && pong.kind == Kind::Pong
                && pong.nonce == nonce
                && probe::verify(bytes, &shared)
            {
                return Some(start.elapsed());
            }
        }
        None
    };
    // meshd knows the prober once its config lists it.
    wait_until(
        Duration::from_secs(10),
        "meshd to answer the prober",
        || ping(1).map(|_| ()).ok_or_else(|| "no pong".to_owned()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let slow_config = format!(
        "{}\n    - {{name: unresolvable, publicKey: \"{}\", endpoints: [\"node9.unresolvable.example:{PORT}\"], allowedIPs: [\"10.99.0.9/32\"]}}\n",
        base.trim_end_matches('\n'),
        PrivateKey([9; 32]).public()
    );
    let mut rtts = Vec::new();
    let mut lost = 0;
    let start = Instant::now();
    let mut step = 0;
    let mut nonce = 100;
    while start.elapsed() < Duration::from_secs(12) {
        let t = start.elapsed();
        if step == 0 && t > Duration::from_secs(1) {
            // A reload: a new peer behind an unresolvable name, and discovery off (it stops).
            write_atomic(&lab.nodes[0].config, format!("{slow_config}\n{identity}"));
            step = 1;
        } else if step == 1 && t > Duration::from_secs(5) {
            // The MSS clamping table deleted: meshd's next check repairs it.
            sh(ns0, &["nft", "delete", "table", "inet", "hybridnet-meshd"]);
            step = 2;
        }
        nonce += 1;
        match ping(nonce) {
            Some(rtt) => rtts.push(rtt),
            None => lost += 1,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    rtts.sort();
    let p50 = percentile(&rtts, 0.5);
    let p99 = percentile(&rtts, 0.99);
    let max = rtts.last().copied().unwrap_or_default();
    eprintln!(
        "pongs: {} answered, {lost} lost; p50 {p50:?}, p99 {p99:?}, max {max:?}",
        rtts.len()
    );
    let log = d.log();
    assert!(
        log.contains("cannot resolve endpoint"),
        "the slow lookup happened"
    );
    assert!(
        log.contains("discovery stopping") || log.contains("discovery settings changed"),
        "the discovery stop happened"
    );
    assert!(
        !log.contains("rebuilding the mesh"),
        "the reload was applied in place"
    );
    assert!(
        log.contains("MSS clamping rule installed"),
        "the nft repair happened"
    );
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");
    assert!(lost <= 2, "{lost} pings unanswered");
    d.signal(Signal::SIGTERM).unwrap_or_else(|e| panic!("{e}"));
    d.wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
}

fn nameserver() -> Option<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()?
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .find_map(|a| a.trim().parse().ok())
}

fn decode_key(b64: &str) -> hybridnet_config::PublicKey {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap_or_else(|e| panic!("public key {b64}: {e}"));
    let array: [u8; 32] = bytes
        .try_into()
        .unwrap_or_else(|_| panic!("public key {b64}: not 32 bytes"));
    hybridnet_config::PublicKey(array)
}

/// A router advertisement for 2001:db8:99::/64 (autonomous: SLAAC) with a router lifetime of 1800 s, sent
/// from `iface` in `ns` to all nodes. The kernel fills in the ICMPv6 checksum; the hop limit must be 255.
fn send_router_advertisement(ns: &Netns, iface: &str) {
    let index: u32 = sh(ns, &["ip", "-o", "link", "show", iface])
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .unwrap_or_else(|| panic!("no link {iface}"));
    let mut ra = vec![134u8, 0, 0, 0, 64, 0];
    ra.extend_from_slice(&1800u16.to_be_bytes()); // router lifetime
    ra.extend_from_slice(&[0; 8]); // reachable time, retrans timer
    ra.extend_from_slice(&[3, 4, 64, 0xc0]); // prefix information: on-link, autonomous
    ra.extend_from_slice(&86400u32.to_be_bytes());
    ra.extend_from_slice(&14400u32.to_be_bytes());
    ra.extend_from_slice(&[0; 4]);
    let prefix: std::net::Ipv6Addr = "2001:db8:99::".parse().unwrap_or_else(|e| panic!("{e}"));
    ra.extend_from_slice(&prefix.octets());
    ns.enter(|| {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        s.set_multicast_hops_v6(255)?;
        s.set_multicast_if_v6(index)?;
        let to = std::net::SocketAddrV6::new("ff02::1".parse().unwrap_or(prefix), 0, 0, index);
        s.send_to(&ra, &SockAddr::from(to))
    })
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("router advertisement: {e}"));
}

fn sysctl(ns: &Netns, key: &str) -> String {
    sh(ns, &["sysctl", "-n", key]).trim().to_owned()
}

/// A node that forwards (here: a public node, which may relay) turns IPv6 forwarding on. With
/// `accept_ra=1` the kernel would then ignore router advertisements and a SLAAC node would lose its
/// default route; meshd sets `accept_ra=2` where it was 1, and puts everything back on a clean stop. The
/// router is the test itself (a raw ICMPv6 socket on the public bridge; radvd is not needed for one RA).
#[test]
fn a_forwarding_node_keeps_its_slaac_default_route() {
    let lab = MeshLab::new(1, "meshd-slaac");
    let ns = &lab.nodes[0].netns;
    assert_eq!(sysctl(ns, "net.ipv6.conf.all.forwarding"), "0");
    assert_eq!(sysctl(ns, "net.ipv6.conf.pub.accept_ra"), "1");
    lab.write_config(0);
    let mut d = lab.start(0);
    wait_until(
        Duration::from_secs(10),
        "meshd to turn forwarding on",
        || match (
            sysctl(ns, "net.ipv6.conf.all.forwarding").as_str(),
            sysctl(ns, "net.ipv6.conf.pub.accept_ra").as_str(),
        ) {
            ("1", "2") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sysctl(ns, "net.ipv4.ip_forward"), "1");
    // The router's link-local address must be usable (DAD done) before it can advertise.
    wait_until(
        Duration::from_secs(10),
        "the router's link-local address",
        || {
            let a = sh(
                &lab.switch,
                &["ip", "-6", "addr", "show", "dev", "brpub", "scope", "link"],
            );
            (a.contains("fe80") && !a.contains("tentative"))
                .then_some(())
                .ok_or(a)
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    wait_until(Duration::from_secs(10), "a SLAAC default route", || {
        send_router_advertisement(&lab.switch, "brpub");
        std::thread::sleep(Duration::from_millis(300));
        let r = sh(ns, &["ip", "-6", "route", "show", "default"]);
        let a = sh(ns, &["ip", "-6", "addr", "show", "dev", "pub"]);
        (r.contains("via fe80") && r.contains("dev pub") && a.contains("2001:db8:99:"))
            .then_some(())
            .ok_or(format!("routes: {r}; addresses: {a}"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    d.signal(Signal::SIGTERM).unwrap_or_else(|e| panic!("{e}"));
    d.wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    for (key, was) in [
        ("net.ipv6.conf.all.forwarding", "0"),
        ("net.ipv4.ip_forward", "0"),
        ("net.ipv6.conf.pub.accept_ra", "1"),
        ("net.ipv6.conf.default.accept_ra", "1"),
    ] {
        assert_eq!(sysctl(ns, key), was, "{key} restored on a clean stop");
    }
}

/// Two peers claim the same prefix (a reinstalled node's old record, a reused pod CIDR): one holds it,
/// the status and the metrics say so, and nothing moves back and forth (every move is a WireGuard update
/// of two peers). WireGuard operations are counted over 60 s.
#[test]
fn identical_prefixes_from_two_peers_do_not_flap() {
    let mut lab = MeshLab::new(3, "meshd-identical");
    lab.nodes[1].routed = vec!["10.244.7.0/24".to_owned()];
    lab.nodes[2].routed = vec!["10.244.7.0/24".to_owned()];
    let daemons: Vec<Daemon> = lab.start_all();
    wait_all_up(&lab, Duration::from_secs(15));
    let status = lab.nodes[0].details().unwrap_or_else(|e| panic!("{e}"));
    let conflicts = status["prefixConflicts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(conflicts.len(), 1, "{status}");
    assert_eq!(conflicts[0]["prefix"], "10.244.7.0/24");
    let holder = conflicts[0]["holder"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(holder == "node2" || holder == "node3", "{conflicts:?}");
    // Let the start settle (endpoints chosen), then count.
    std::thread::sleep(Duration::from_secs(3));
    let ops = |d: &Daemon| {
        let m = d.metrics().unwrap_or_else(|e| panic!("{e}"));
        (
            m.value("meshd_wireguard_peer_ops_total"),
            m.value("meshd_prefix_conflicts"),
        )
    };
    let (before, gauge) = ops(&daemons[0]);
    assert_eq!(gauge, 1.0, "meshd_prefix_conflicts");
    std::thread::sleep(Duration::from_secs(60));
    let (after, _) = ops(&daemons[0]);
    eprintln!(
        "WireGuard peer operations over 60 s with a contested prefix: {}",
        after - before
    );
    assert_eq!(after - before, 0.0, "the contested prefix moved");
    let status = lab.nodes[0].details().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status["prefixConflicts"][0]["holder"],
        holder.as_str(),
        "same holder"
    );
    // Traffic to the prefix goes to the holder (its WireGuard peer carries it).
    let routes = sh(
        &lab.nodes[0].netns,
        &["ip", "route", "show", "table", "51821"],
    );
    assert!(routes.contains("10.244.7.0/24"), "{routes}");
}
