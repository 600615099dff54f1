//! meshd discovery in network namespaces: nodes with no static peers find each other through a Talos
//! discovery service. The real service (siderolabs/discovery-service) is BSL-licensed and cannot run
//! here, so `hybridnet_integration::discovery::DiscoveryServer` stands in for it: the same gRPC API,
//! snapshot-then-deltas watch, TTL expiry and limits, state in memory. Needs root; fails (never skips)
//! without it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hybridnet_integration::discovery::DiscoveryServer;
use hybridnet_integration::meshd::{MeshLab, PORT};
use hybridnet_integration::{Daemon, DaemonKind, wait_until, write_atomic};
use nix::sys::signal::Signal;

/// A Talos fixture's identity (`DiscoveryIdentityConfig`).
const CLUSTER_ID: &str = "0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w=";
const CLUSTER_SECRET: &str = "pofHbABZq7VXuObsdLdy/bHmz6hlMHZ3p8+6WKrv1ic=";

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 1], port))
}

fn server_addr() -> SocketAddr {
    "198.51.100.1:3000"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Node `i`: our document without peers, plus Talos's discovery documents. Node 1 is a control plane
/// (a Talos machine document with `machine.type: controlplane`).
fn write_config(lab: &MeshLab, i: usize, url: &str) {
    write_config_with(lab, i, &[url]);
}

/// [`write_config`] with one `DiscoveryServiceConfig` per URL.
fn write_config_with(lab: &MeshLab, i: usize, urls: &[&str]) {
    write_config_meshd(lab, i, urls, "");
}

/// [`write_config_with`] plus `meshd_extra` (indented lines) in the `meshd` section.
fn write_config_meshd(lab: &MeshLab, i: usize, urls: &[&str], meshd_extra: &str) {
    let node = &lab.nodes[i];
    let mut doc = format!(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {state}\ndataDir: {data}\nmeshd:\n  \
         interface: hybridnet0\n  backend: userspace\n  listenPort: {PORT}\n  privateKeyFile: {data}/meshd.key\n  \
         addresses: [\"{mesh}/32\"]\n{meshd_extra}---\napiVersion: v1alpha1\nkind: DiscoveryIdentityConfig\n\
         clusterID: {CLUSTER_ID}\nclusterSecret: {CLUSTER_SECRET}\n",
        state = node.state_dir.display(),
        data = node.data_dir.display(),
        mesh = node.mesh_ip(),
    );
    for (n, url) in urls.iter().enumerate() {
        doc.push_str(&format!(
            "---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: lab{n}\nendpoint: {url}\n"
        ));
    }
    if i == 0 {
        doc.push_str("---\nversion: v1alpha1\nmachine:\n  type: controlplane\n");
    }
    write_atomic(&node.config, doc);
}

fn start(lab: &MeshLab, i: usize) -> Daemon {
    let node = &lab.nodes[i];
    Daemon::builder(DaemonKind::Meshd, &node.netns, &node.config)
        .log_file(node.config.with_file_name("meshd.log"))
        .env("MESHD_NODENAME", node.name())
        .start()
}

/// Node `i` sees exactly `names` as peers, all up (from the status written by `pid` when given).
fn wait_peers(lab: &MeshLab, i: usize, names: &[&str], pid: Option<u32>, timeout: Duration) {
    let node = &lab.nodes[i];
    wait_until(
        timeout,
        format!("{} to see {names:?} up", node.name()),
        || {
            let status = DaemonKind::Meshd.read_status(&node.state_dir)?;
            if pid.is_some_and(|p| p != status.pid) {
                return Err(format!("status from pid {}", status.pid));
            }
            let rows = status.details["peers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut got: Vec<String> = rows
                .iter()
                .filter(|p| p["state"] == "up")
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect();
            got.sort();
            if got == names && rows.len() == names.len() {
                Ok(())
            } else {
                Err(format!("{got:?} up of {}: {}", rows.len(), status.details))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

fn registry_state(lab: &MeshLab, i: usize) -> String {
    DaemonKind::Meshd
        .read_status(&lab.nodes[i].state_dir)
        .map(|s| {
            s.details["discovery"]["registries"][0]["state"]
                .as_str()
                .unwrap_or("-")
                .to_owned()
        })
        .unwrap_or_default()
}

/// A mesh lab whose switch also holds 198.51.100.1 on the public bridge, where the discovery stand-ins listen.
fn discovery_lab(n: u8, label: &str) -> MeshLab {
    let lab = MeshLab::new(n, label);
    lab.switch
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "brpub"]);
    lab
}

#[test]
fn nodes_find_each_other_through_discovery_and_survive_its_outage() {
    let lab = discovery_lab(3, "meshd-discovery");
    let mut server = Some(DiscoveryServer::start(&lab.switch, server_addr()));
    let url = server
        .as_ref()
        .map(DiscoveryServer::url)
        .unwrap_or_default();
    for i in 0..3 {
        write_config(&lab, i, &url);
    }
    let t0 = Instant::now();
    let mut daemons: Vec<Daemon> = (0..3).map(|i| start(&lab, i)).collect();
    wait_peers(&lab, 0, &["node2", "node3"], None, Duration::from_secs(20));
    wait_peers(&lab, 1, &["node1", "node3"], None, Duration::from_secs(10));
    wait_peers(&lab, 2, &["node1", "node2"], None, Duration::from_secs(10));
    eprintln!(
        "3 nodes found each other and are up {:?} after start",
        t0.elapsed()
    );
    for a in 0..3 {
        for b in (0..3).filter(|b| *b != a) {
            let dst = lab.nodes[b].mesh_ip().to_string();
            wait_until(Duration::from_secs(5), "ping over the mesh", || {
                lab.nodes[a].ping(&dst)
            })
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let stored = server
        .as_ref()
        .map(|s| s.affiliates(CLUSTER_ID))
        .unwrap_or_default();
    assert_eq!(stored.len(), 3, "one record per node: {stored:?}");
    assert!(
        stored.iter().all(|(_, data, eps)| *data && *eps >= 2),
        "{stored:?}"
    );

    // members.json on node2: node1 is a control plane with its API server port (apiprism's upstream).
    wait_until(
        Duration::from_secs(5),
        "node1 as a control plane in node2's members.json",
        || {
            let members: hybridnet_state::Members =
                hybridnet_state::StateDir::new(&lab.nodes[1].state_dir)
                    .read("meshd", "members")
                    .map_err(|e| e.to_string())?;
            let m = members.get("node1").ok_or("no node1")?;
            if m.control_plane
                && m.api_server_port == Some(6443)
                && m.node_id.is_some()
                && !m.addresses.is_empty()
            {
                Ok(())
            } else {
                Err(format!("{m:?}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // Every watch is cut off ("lost update"): the clients watch again and resync; then a node leaving
    // cleanly deletes its record and disappears from the others at once.
    let watches = server.as_ref().map_or(0, |s| s.calls("Watch"));
    if let Some(s) = server.as_ref() {
        s.lose_updates();
    }
    wait_until(
        Duration::from_secs(10),
        "the clients to watch again",
        || {
            let n = server.as_ref().map_or(0, |s| s.calls("Watch"));
            if n >= watches + 3 {
                Ok(())
            } else {
                Err(format!("{n} watches"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    daemons[2]
        .signal(Signal::SIGTERM)
        .unwrap_or_else(|e| panic!("{e}"));
    daemons[2]
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    let left = Instant::now();
    wait_peers(&lab, 0, &["node2"], None, Duration::from_secs(5));
    wait_peers(&lab, 1, &["node1"], None, Duration::from_secs(5));
    eprintln!(
        "node3's departure seen by the others in {:?}",
        left.elapsed()
    );

    // The service stops: the mesh stays, the registries back off.
    drop(server.take());
    wait_until(
        Duration::from_secs(10),
        "node1's registry to notice the outage",
        || {
            let s = registry_state(&lab, 0);
            if s == "backoff" || s == "connecting" {
                Ok(())
            } else {
                Err(s)
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(2));
    wait_peers(&lab, 0, &["node2"], None, Duration::from_secs(5));
    lab.nodes[0]
        .ping(&lab.nodes[1].mesh_ip().to_string())
        .unwrap_or_else(|e| panic!("{e}"));

    // It comes back empty: the nodes reconnect, publish again, and a node that joins now is seen.
    let back = Instant::now();
    server = Some(DiscoveryServer::start(&lab.switch, server_addr()));
    daemons[2] = start(&lab, 2);
    let pid = Some(daemons[2].pid());
    wait_peers(&lab, 2, &["node1", "node2"], pid, Duration::from_secs(30));
    wait_peers(&lab, 0, &["node2", "node3"], None, Duration::from_secs(10));
    eprintln!("service back: full mesh again {:?} later", back.elapsed());
    wait_until(
        Duration::from_secs(20),
        "all three records republished",
        || {
            let n = server
                .as_ref()
                .map(|s| s.affiliates(CLUSTER_ID).len())
                .unwrap_or(0);
            if n == 3 {
                Ok(())
            } else {
                Err(format!("{n} records"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // The service goes away for good; node3 restarts and rejoins from its peer cache alone.
    drop(server.take());
    daemons[2]
        .signal(Signal::SIGTERM)
        .unwrap_or_else(|e| panic!("{e}"));
    daemons[2]
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    let restart = Instant::now();
    daemons[2] = start(&lab, 2);
    let pid = Some(daemons[2].pid());
    wait_peers(&lab, 2, &["node1", "node2"], pid, Duration::from_secs(15));
    eprintln!(
        "node3 rejoined from the cache with the service down in {:?}",
        restart.elapsed()
    );
    lab.nodes[2]
        .ping(&lab.nodes[0].mesh_ip().to_string())
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Several services at once, merged by node ID; a redirecting service is followed.
/// node1 uses services A and B, node2 only A, node3 only C, which redirects to B: node1 meets both,
/// node2 and node3 meet only node1.
#[test]
fn several_services_are_merged_and_redirects_followed() {
    let lab = discovery_lab(3, "meshd-discovery-multi");
    let a = DiscoveryServer::start(&lab.switch, addr(3000));
    let b = DiscoveryServer::start(&lab.switch, addr(3001));
    let c = DiscoveryServer::start(&lab.switch, addr(3002));
    // As the real service sends its `--redirect-endpoint`: a bare gRPC target, no scheme. The client
    // keeps its transport (plain HTTP/2 here), as Talos's does.
    c.set_redirect(Some(b.addr.to_string()));
    write_config_with(&lab, 0, &[&a.url(), &b.url()]);
    write_config_with(&lab, 1, &[&a.url()]);
    write_config_with(&lab, 2, &[&c.url()]);
    let _daemons: Vec<Daemon> = (0..3).map(|i| start(&lab, i)).collect();
    wait_peers(&lab, 0, &["node2", "node3"], None, Duration::from_secs(20));
    wait_peers(&lab, 1, &["node1"], None, Duration::from_secs(10));
    wait_peers(&lab, 2, &["node1"], None, Duration::from_secs(10));
    assert_eq!(a.affiliates(CLUSTER_ID).len(), 2, "node1 and node2 on A");
    assert_eq!(
        b.affiliates(CLUSTER_ID).len(),
        2,
        "node1 and node3 (redirected) on B"
    );
    assert!(c.affiliates(CLUSTER_ID).is_empty(), "C only redirects");
    assert!(c.calls("Hello") >= 1);
    for (name, s) in [("A", &a), ("B", &b), ("C", &c)] {
        assert_eq!(s.throttled(), 0, "{name}: a call hit the per-IP rate limit");
        assert_known_version(s);
    }
    let details = lab.nodes[0].details().unwrap_or_else(|e| panic!("{e}"));
    let regs = details["discovery"]["registries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(regs.len(), 2, "{details}");
    assert!(
        regs.iter()
            .all(|r| r["state"] == "watching" && r["affiliates"] == 1),
        "{details}"
    );
    lab.nodes[0]
        .ping(&lab.nodes[2].mesh_ip().to_string())
        .unwrap_or_else(|e| panic!("{e}"));
}

/// End to end: a control plane found through discovery becomes an apiprism upstream. node1 (a control
/// plane) serves TLS on its API server port 6443 with a certificate of the cluster CA for `kubernetes`; node2
/// runs meshd and apiprism with no upstream configured: apiprism adds node1's two addresses from meshd's
/// members.json once they pass the TLS check against the cluster CA, and finds them up (`apiprism status`).
#[test]
fn a_discovered_control_plane_becomes_an_apiprism_upstream() {
    let lab = discovery_lab(2, "meshd-discovery-apiprism");
    let server = DiscoveryServer::start(&lab.switch, server_addr());
    write_config(&lab, 0, &server.url());
    write_config(&lab, 1, &server.url());
    let node2 = &lab.nodes[1];
    // apiprism gives a discovered API server traffic only once its certificate verifies against the
    // cluster CA (`apiprism.clusterCAFile`) for the name `kubernetes`: the stand-in serves one.
    let ca =
        hybridnet_integration::pki::TestCa::new("cluster CA").unwrap_or_else(|e| panic!("{e}"));
    let ca_file = node2.config.with_file_name("ca.crt");
    write_atomic(&ca_file, ca.pem());
    let text = std::fs::read_to_string(&node2.config).unwrap_or_else(|e| panic!("{e}"));
    write_atomic(
        &node2.config,
        text.replacen(
            "meshd:\n",
            &format!(
                "apiprism:\n  listen: [\"127.0.0.1:7445\"]\n  clusterCAFile: {}\nmeshd:\n",
                ca_file.display()
            ),
            1,
        ),
    );
    let listener = lab.nodes[0]
        .netns
        .enter(|| std::net::TcpListener::bind("0.0.0.0:6443"))
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("API server stand-in: {e}"));
    let tls = ca
        .server_config_for(&["kubernetes".to_owned()])
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tls = tls.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                if let Ok(conn) = rustls::ServerConnection::new(tls) {
                    // Reading drives the handshake; the checker then closes.
                    let mut s = rustls::StreamOwned::new(conn, stream);
                    let _ = std::io::Read::read(&mut s, &mut [0u8; 1]);
                }
            });
        }
    });
    let _meshd: Vec<Daemon> = (0..2).map(|i| start(&lab, i)).collect();
    let _apiprism = Daemon::builder(DaemonKind::Apiprism, &node2.netns, &node2.config)
        .log_file(node2.config.with_file_name("apiprism.log"))
        .start();
    let t0 = Instant::now();
    let want = [
        format!("{}:6443", lab.nodes[0].private_ip()),
        format!("{}:6443", lab.nodes[0].public_ip()),
    ];
    wait_until(
        Duration::from_secs(30),
        "apiprism on node2 to have node1's API server addresses up",
        || {
            let out = node2
                .netns
                .command(DaemonKind::Apiprism.bin())
                .args(["status", "--config"])
                .arg(&node2.config)
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success()
                && text.contains("2/2 upstreams up")
                && want.iter().all(|a| text.contains(a.as_str()))
            {
                Ok(())
            } else {
                Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "apiprism on node2 has the discovered control plane's API server up {:?} after start",
        t0.elapsed()
    );
}

/// Node `i` in KubeSpan-compatible mode: no listen port, no extra addresses (KubeSpan has neither).
fn write_compat_config(lab: &MeshLab, i: usize, url: &str) {
    let node = &lab.nodes[i];
    let doc = format!(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {state}\ndataDir: {data}\nmeshd:\n  \
         interface: hybridnet0\n  backend: userspace\n  privateKeyFile: {data}/meshd.key\n  kubespanCompat: true\n\
         ---\napiVersion: v1alpha1\nkind: DiscoveryIdentityConfig\nclusterID: {CLUSTER_ID}\nclusterSecret: {CLUSTER_SECRET}\n\
         ---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: lab\nendpoint: {url}\n",
        state = node.state_dir.display(),
        data = node.data_dir.display(),
    );
    write_atomic(&node.config, doc);
}

/// The MAC of `link` in node `i`'s namespace.
fn mac_of(lab: &MeshLab, i: usize, link: &str) -> Vec<u8> {
    let out = lab.nodes[i].netns.exec(&["ip", "-o", "link", "show", link]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(|m| {
            m.split(':')
                .filter_map(|b| u8::from_str_radix(b, 16).ok())
                .collect()
        })
        .unwrap_or_else(|| panic!("no MAC for {link}: {text}"))
}

#[test]
fn kubespan_compatible_nodes_mesh_and_run_on_handshakes_without_probes() {
    let lab = discovery_lab(2, "meshd-compat");
    let _server = DiscoveryServer::start(&lab.switch, server_addr());
    let url = format!("http://{}", server_addr());
    for i in 0..2 {
        write_compat_config(&lab, i, &url);
    }
    let mut daemons: Vec<Daemon> = (0..2).map(|i| start(&lab, i)).collect();
    wait_peers(&lab, 0, &["node2"], None, Duration::from_secs(15));
    wait_peers(&lab, 1, &["node1"], None, Duration::from_secs(15));
    let details: Vec<serde_json::Value> = lab
        .nodes
        .iter()
        .map(|n| n.details().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    for (i, d) in details.iter().enumerate() {
        assert_eq!(d["listenPort"], 51820, "KubeSpan's port: {d}");
        // No physical NIC in a namespace of veths: the first ether link by name (`priv`) gives the MAC.
        let prefix: ipnet::Ipv6Net = d["meshPrefix"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{d}"));
        let want = hybridnet_meshd::kubespan::eui64(prefix, &mac_of(&lab, i, "priv"))
            .unwrap_or_else(|| panic!("no EUI-64"));
        assert_eq!(d["meshAddress"], want.to_string(), "EUI-64 address: {d}");
        // The peer's mesh address is the one it announced.
        let other = &details[1 - i];
        let row = &d["peers"][0];
        assert_eq!(row["meshAddress"], other["meshAddress"], "{row}");
        assert_eq!(row["handshakeMode"], false, "probes answered: {row}");
        assert!(
            row["endpoint"]
                .as_str()
                .is_some_and(|e| e.ends_with(":51820")),
            "{row}"
        );
    }
    // Talos's AllowedIPs: the peer's node addresses are routed through the mesh too.
    let table = String::from_utf8_lossy(
        &lab.nodes[0]
            .netns
            .exec(&["ip", "route", "show", "table", "51821"])
            .stdout,
    )
    .into_owned();
    for ip in [lab.nodes[1].private_ip(), lab.nodes[1].public_ip()] {
        assert!(
            table.contains(&format!("{ip} dev hybridnet0")),
            "{ip} through the mesh: {table}"
        );
    }
    let peer_mesh = details[1]["meshAddress"].as_str().unwrap_or_default();
    for dst in [peer_mesh.to_owned(), lab.nodes[1].private_ip().to_string()] {
        wait_until(Duration::from_secs(5), format!("ping {dst}"), || {
            lab.nodes[0].ping(&dst)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }

    // A peer that never answers probes (as a Talos node): node2 drops meshd's probe port, both restart.
    for d in &mut daemons {
        d.signal(Signal::SIGTERM).unwrap_or_else(|e| panic!("{e}"));
        d.wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let node2 = &lab.nodes[1].netns;
    for cmd in [
        &["nft", "add", "table", "inet", "lab"][..],
        &[
            "nft",
            "add chain inet lab in { type filter hook input priority 0; }",
        ],
        &["nft", "add rule inet lab in udp dport 51821 drop"],
    ] {
        let out = node2.exec(cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let start_at = Instant::now();
    let daemons: Vec<Daemon> = (0..2).map(|i| start(&lab, i)).collect();
    let pids: Vec<u32> = daemons.iter().map(Daemon::pid).collect();
    // Traffic makes WireGuard handshake; the handshake makes the peer up.
    wait_until(
        Duration::from_secs(20),
        "both peers up on handshakes alone",
        || {
            let _ = lab.nodes[0].ping(peer_mesh);
            for (i, pid) in pids.iter().enumerate() {
                let status = DaemonKind::Meshd.read_status(&lab.nodes[i].state_dir)?;
                let row = &status.details["peers"][0];
                if status.pid != *pid || row["state"] != "up" || row["handshakeMode"] != true {
                    return Err(format!("node{}: {row}", i + 1));
                }
            }
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "up on handshakes {:?} after the restart",
        start_at.elapsed()
    );
    lab.nodes[0]
        .ping(peer_mesh)
        .unwrap_or_else(|e| panic!("{e}"));
    let row = &lab.nodes[0].details().unwrap_or_default()["peers"][0];
    assert!(
        row["paths"]
            .as_array()
            .is_some_and(|ps| ps.iter().all(|p| p["state"] != "alive")),
        "no probe was ever answered: {row}"
    );
}

/// Every `Hello` carried a client version the real service can label (`vX.Y`, not `unknown`).
fn assert_known_version(s: &DiscoveryServer) {
    let versions = s.hello_versions();
    let want = {
        let mut parts = hybridnet_integration::WORKSPACE_VERSION.split('.');
        format!(
            "v{}.{}",
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        )
    };
    assert!(
        !versions.is_empty() && versions.keys().all(|v| *v == want),
        "Hello versions as the service labels them: {versions:?} (want only {want})"
    );
}

fn peer_names(lab: &MeshLab, i: usize) -> Vec<String> {
    lab.nodes[i]
        .details()
        .map(|d| {
            d["peers"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter_map(|p| p["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// A proxy in front of the service (or the service itself) ends the watch stream every 2 s. Each of
/// those sessions had its snapshot, so the backoff starts over and meshd watches again within about
/// 0.5 s, as Talos's client does (discovery-client `pkg/client/client.go`, `Run`: `backoff.Reset()`
/// after each successful update). Before, only a clean end reset it: meshd climbed to its 15 s cap
/// and missed about 60 % of the time. Then every stream ends at once, the worst case: meshd still
/// stays under the service's per-IP rate limit (15 calls/s, burst 60, `pkg/limits/limits.go`).
#[test]
fn a_proxy_cutting_watch_streams_keeps_meshd_watching_and_under_the_rate_limit() {
    let lab = discovery_lab(2, "meshd-discovery-cuts");
    let server = DiscoveryServer::start(&lab.switch, server_addr());
    server.cut_watches_every(Some(Duration::from_secs(2)));
    let url = server.url();
    write_config(&lab, 0, &url);
    write_config(&lab, 1, &url);
    let _node1 = start(&lab, 0);
    let ip1 = std::net::IpAddr::V4(lab.nodes[0].public_ip());
    wait_until(Duration::from_secs(15), "node1 to watch", || {
        if server.watching_time(ip1) > Duration::ZERO {
            Ok(())
        } else {
            Err(registry_state(&lab, 0))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // A measurement window (not a wait for a condition): 8 cuts and what follows each.
    let (w0, t0, watches0) = (
        server.watching_time(ip1),
        Instant::now(),
        server.calls("Watch"),
    );
    std::thread::sleep(Duration::from_secs(20));
    let watched = server.watching_time(ip1) - w0;
    let window = t0.elapsed();
    let not_watching = 1.0 - watched.as_secs_f64() / window.as_secs_f64();
    let watches = server.calls("Watch") - watches0;
    eprintln!(
        "streams cut every 2 s: node1 not watching {:.1} % of {window:?} ({watches} watches)",
        not_watching * 100.0
    );
    assert!(
        not_watching < 0.35,
        "node1 was not watching {:.1} % of the time",
        not_watching * 100.0
    );
    assert!(watches >= 6, "{watches} watches in {window:?}");

    // A node that joins now is seen within a bounded time (a watch is nearly always open).
    let joined = Instant::now();
    let _node2 = start(&lab, 1);
    wait_until(Duration::from_secs(8), "node1 to learn node2", || {
        let names = peer_names(&lab, 0);
        if names.iter().any(|n| n == "node2") {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "node2 seen by node1 {:?} after node2 started",
        joined.elapsed()
    );
    wait_peers(&lab, 0, &["node2"], None, Duration::from_secs(20));

    // The worst case: every stream ends right after its snapshot.
    server.cut_watches_every(Some(Duration::ZERO));
    let calls = |s: &DiscoveryServer| {
        ["Hello", "Watch", "AffiliateUpdate"]
            .iter()
            .map(|m| s.calls(m))
            .sum::<u64>()
    };
    let (c0, t0) = (calls(&server), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let rate = (calls(&server) - c0) as f64 / t0.elapsed().as_secs_f64() / 2.0;
    eprintln!("streams ended at once: {rate:.1} calls/s per node");
    assert!(
        rate < 15.0,
        "{rate:.1} calls/s per node, over the service's limit"
    );
    assert_eq!(server.throttled(), 0, "a call hit the per-IP rate limit");
    assert_known_version(&server);
    // The mesh itself is untouched by all this.
    wait_peers(&lab, 0, &["node2"], None, Duration::from_secs(5));
}

/// A self-hosted service with its own CA, over HTTPS: node1 trusts it through `meshd.discovery.caFile`
/// (for every endpoint), node2 through a per-endpoint `caFile`; node3 has neither, so the TLS
/// handshake fails on the system bundle and it never registers.
#[test]
fn a_self_hosted_service_with_its_own_ca_is_trusted_through_ca_file() {
    let lab = discovery_lab(3, "meshd-discovery-ca");
    let server = DiscoveryServer::start_tls(&lab.switch, addr(3443));
    let url = server.url();
    assert!(url.starts_with("https://"), "{url}");
    let pem = server.ca_pem.clone().unwrap_or_default();
    for i in 0..2 {
        write_atomic(
            &lab.nodes[i].config.with_file_name("discovery-ca.pem"),
            &pem,
        );
    }
    let ca = |i: usize| lab.nodes[i].config.with_file_name("discovery-ca.pem");
    write_config_meshd(
        &lab,
        0,
        &[&url],
        &format!("  discovery:\n    caFile: {}\n", ca(0).display()),
    );
    write_config_meshd(
        &lab,
        1,
        &[&url],
        &format!(
            "  discovery:\n    endpoints:\n      - endpoint: {url}\n        caFile: {}\n",
            ca(1).display()
        ),
    );
    write_config(&lab, 2, &url);
    let _daemons: Vec<Daemon> = (0..3).map(|i| start(&lab, i)).collect();
    wait_peers(&lab, 0, &["node2"], None, Duration::from_secs(20));
    wait_peers(&lab, 1, &["node1"], None, Duration::from_secs(10));
    wait_until(
        Duration::from_secs(10),
        "node3's TLS handshake to fail",
        || {
            let d = lab.nodes[2].details()?;
            let r = &d["discovery"]["registries"][0];
            let error = r["error"].as_str().unwrap_or_default();
            if r["state"] != "watching" && error.contains("TLS") {
                Ok(())
            } else {
                Err(d.to_string())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        server.affiliates(CLUSTER_ID).len(),
        2,
        "node3, which does not trust the service's CA, never registered"
    );
    assert_eq!(server.throttled(), 0);
    lab.nodes[0]
        .ping(&lab.nodes[1].mesh_ip().to_string())
        .unwrap_or_else(|e| panic!("{e}"));
}
