//! meshd's Kubernetes registry in network namespaces: nodes with no static peers and no discovery
//! service find each other through Talos's Node annotations. A real kube-apiserver (etcd, PKI, control
//! plane) cannot run here, so `hybridnet_integration::kubernetes::KubeApiServer` stands in for its Node
//! API: list, watch with resourceVersions (closed streams, 410 Gone as a status and as an ERROR event),
//! merge patches. Every node's kubeconfig (`KUBECONFIG`) points at it over plain HTTP. Needs root;
//! fails (never skips) without it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hybridnet_integration::discovery::DiscoveryServer;
use hybridnet_integration::kubernetes::{Gone, KubeApiServer};
use hybridnet_integration::meshd::kube::{IDENTITY, pod_cidr, pod_ip, server_addr, start};
use hybridnet_integration::meshd::{MeshLab, PORT};
use hybridnet_integration::{Daemon, DaemonKind, wait_until, write_atomic};

/// Node `i`: our document (mesh address, `advertiseKubernetesNetworks`) plus a Talos machine document
/// with discovery on, the service registry off and the Kubernetes registry on; a kubeconfig for the
/// stand-in. Node 1 is a control plane.
fn write_config(lab: &MeshLab, i: usize, server: &KubeApiServer) {
    write_config_with(lab, i, server, true, None);
}

/// [`write_config`] choosing the registries: the Kubernetes one (`kubernetes`) and a discovery service
/// at `service` (with the cluster identity).
fn write_config_with(
    lab: &MeshLab,
    i: usize,
    server: &KubeApiServer,
    kubernetes: bool,
    service: Option<&str>,
) {
    let node = &lab.nodes[i];
    let kind = if i == 0 { "controlplane" } else { "worker" };
    let mut doc = format!(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {state}\ndataDir: {data}\nmeshd:\n  \
         interface: hybridnet0\n  backend: userspace\n  listenPort: {PORT}\n  privateKeyFile: {data}/meshd.key\n  \
         addresses: [\"{mesh}/32\"]\n  advertiseKubernetesNetworks: true\n---\nversion: v1alpha1\nmachine:\n  \
         type: {kind}\n",
        state = node.state_dir.display(),
        data = node.data_dir.display(),
        mesh = node.mesh_ip(),
    );
    if kubernetes {
        // The legacy switches (Talos has no newer document for this registry); a
        // `DiscoveryServiceConfig` below then adds the service (meshd warns that Talos refuses the mix).
        doc.push_str(
            "cluster:\n  discovery:\n    enabled: true\n    registries:\n      kubernetes:\n        \
             disabled: false\n      service:\n        disabled: true\n",
        );
    }
    doc.push_str("---\n");
    doc.push_str(IDENTITY);
    if let Some(url) = service {
        doc.push_str(&format!(
            "---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: lab\nendpoint: {url}\n"
        ));
    }
    write_atomic(&node.config, doc);
    write_atomic(
        &node.config.with_file_name("kubeconfig"),
        server.kubeconfig(&node.name()),
    );
}

/// Registers node `i`'s Node object, as its kubelet would.
fn register(lab: &MeshLab, i: usize, server: &KubeApiServer) {
    let node = &lab.nodes[i];
    let private = node.private_ip().to_string();
    let cidr = pod_cidr(node.index);
    let mut labels = vec![("topology.kubernetes.io/region", "lab")];
    if i == 0 {
        labels.push(("node-role.kubernetes.io/control-plane", ""));
        labels.push(("topology.kubernetes.io/zone", "lab-a"));
    }
    server.add_node(
        &node.name(),
        &labels,
        &[cidr.as_str()],
        &[("InternalIP", private.as_str())],
    );
}

/// Node `i` sees exactly `names` as peers, all up.
fn wait_peers(lab: &MeshLab, i: usize, names: &[&str], timeout: Duration) {
    let node = &lab.nodes[i];
    wait_until(
        timeout,
        format!("{} to see {names:?} up", node.name()),
        || {
            let d = node.details()?;
            let rows = d["peers"].as_array().cloned().unwrap_or_default();
            let mut got: Vec<String> = rows
                .iter()
                .filter(|p| p["state"] == "up")
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect();
            got.sort();
            if got == names && rows.len() == names.len() {
                Ok(())
            } else {
                Err(format!("{got:?} up of {}: {d}", rows.len()))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Node `i`'s Kubernetes registry row in `status.json`.
fn registry(lab: &MeshLab, i: usize) -> serde_json::Value {
    lab.nodes[i]
        .details()
        .map(|d| {
            d["discovery"]["registries"]
                .as_array()
                .and_then(|rs| rs.iter().find(|r| r["endpoint"] == "k8s").cloned())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

fn ping_all(lab: &MeshLab, nodes: &[usize]) {
    for &a in nodes {
        for &b in nodes.iter().filter(|b| **b != a) {
            let dst = lab.nodes[b].mesh_ip().to_string();
            wait_until(Duration::from_secs(5), "ping over the mesh", || {
                lab.nodes[a].ping(&dst)
            })
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// A ping from node `a`'s pod address to node `b`'s.
fn ping_pods(lab: &MeshLab, a: usize, b: usize) -> Result<(), String> {
    let (na, nb) = (&lab.nodes[a], &lab.nodes[b]);
    let out = na.netns.exec(&[
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        "-I",
        &pod_ip(na.index),
        &pod_ip(nb.index),
    ]);
    if out.status.success() {
        Ok(())
    } else {
        let routes = |n: &hybridnet_integration::meshd::MeshNode| {
            let out = n.netns.exec(&["ip", "route", "show", "table", "51821"]);
            String::from_utf8_lossy(&out.stdout).replace('\n', "; ")
        };
        Err(format!(
            "{} pod {} cannot ping {} pod {}: {}\nroutes {}: {}\nroutes {}: {}",
            na.name(),
            pod_ip(na.index),
            nb.name(),
            pod_ip(nb.index),
            String::from_utf8_lossy(&out.stdout).trim(),
            na.name(),
            routes(na),
            nb.name(),
            routes(nb),
        ))
    }
}

/// Every node's registry has relisted at least `n` times and watches again.
fn wait_relisted(lab: &MeshLab, nodes: &[usize], server: &KubeApiServer, n: u64) {
    for &i in nodes {
        wait_until(
            Duration::from_secs(15),
            format!("{} to relist after 410 Gone", lab.nodes[i].name()),
            || {
                let r = registry(lab, i);
                if r["relists"].as_u64().unwrap_or(0) >= n && r["state"] == "watching" {
                    Ok(())
                } else {
                    Err(r.to_string())
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    wait_until(Duration::from_secs(10), "every node to watch again", || {
        let w = server.watches();
        if w >= nodes.len() {
            Ok(())
        } else {
            Err(format!("{w} watches"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn nodes_find_each_other_through_node_annotations_and_survive_watch_loss_and_outage() {
    let lab = MeshLab::new(4, "meshd-kubernetes");
    lab.switch
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "brpub"]);
    let mut server = Some(KubeApiServer::start(&lab.switch, server_addr()));
    let srv = || server.as_ref().unwrap_or_else(|| panic!("server stopped"));
    for i in 0..4 {
        write_config(&lab, i, srv());
    }
    for i in 0..3 {
        register(&lab, i, srv());
        let n = &lab.nodes[i];
        n.netns.ip(&[
            "addr",
            "add",
            &format!("{}/32", pod_ip(n.index)),
            "dev",
            "lo",
        ]);
    }
    // A Talos-annotated node with malformed values: reported, never fatal.
    srv().add_node("broken", &[], &[], &[]);
    srv().update_node("broken", |n| {
        n["metadata"]["annotations"] = serde_json::json!({
            "cluster.talos.dev/node-id": "broken-id",
            "networking.talos.dev/kubespan-public-key": "not base64!",
            "networking.talos.dev/kubespan-endpoints": "1.2.3.4,[::1]:99999",
            "networking.talos.dev/self-ips": "999.1.1.1",
        });
    });

    let t0 = Instant::now();
    let mut daemons: Vec<Daemon> = (0..3).map(|i| start(&lab, i)).collect();
    wait_peers(&lab, 0, &["node2", "node3"], Duration::from_secs(30));
    wait_peers(&lab, 1, &["node1", "node3"], Duration::from_secs(10));
    wait_peers(&lab, 2, &["node1", "node2"], Duration::from_secs(10));
    eprintln!(
        "3 nodes found each other through annotations and are up {:?} after start",
        t0.elapsed()
    );
    ping_all(&lab, &[0, 1, 2]);

    // What each node published on its Node: Talos's names and formats.
    for i in 0..3 {
        let n = &lab.nodes[i];
        let key = n
            .details()
            .ok()
            .and_then(|d| d["publicKey"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let ann = srv().annotations(&n.name());
        let get = |k: &str| ann.get(k).cloned().unwrap_or_default();
        assert_eq!(
            get("networking.talos.dev/kubespan-public-key"),
            key,
            "{ann:?}"
        );
        assert_eq!(get("cluster.talos.dev/node-id").len(), 43, "{ann:?}");
        assert!(
            get("networking.talos.dev/kubespan-ip").starts_with("fd"),
            "{ann:?}"
        );
        assert!(
            get("networking.talos.dev/self-ips").contains(&n.private_ip().to_string()),
            "{ann:?}"
        );
        assert!(
            get("networking.talos.dev/kubespan-endpoints")
                .contains(&format!("{}:{PORT}", n.private_ip())),
            "{ann:?}"
        );
        assert!(
            !get("networking.talos.dev/kubespan-endpoints").contains("10.244.")
                && !get("networking.talos.dev/self-ips").contains("10.244."),
            "the pod address on lo is no endpoint: {ann:?}"
        );
        let prefixes = get("networking.talos.dev/assigned-prefixes");
        assert!(
            prefixes.contains(&format!("{}/32", n.mesh_ip()))
                && prefixes.contains(&pod_cidr(n.index)),
            "mesh address and pod CIDR advertised: {ann:?}"
        );
        let port = get("networking.talos.dev/api-server-port");
        assert_eq!(port, if i == 0 { "6443" } else { "" }, "{ann:?}");
    }

    // node1 is a control plane with its API server port and its zone in node2's members.json.
    wait_until(
        Duration::from_secs(5),
        "node1 as a control plane in node2's members.json",
        || {
            let members: hybridnet_state::Members =
                hybridnet_state::StateDir::new(&lab.nodes[1].state_dir)
                    .read("meshd", "members")
                    .map_err(|e| e.to_string())?;
            let m = members.get("node1").ok_or("no node1")?;
            let n3 = members.get("node3").ok_or("no node3")?;
            if m.control_plane
                && m.api_server_port == Some(6443)
                && m.location.as_deref() == Some("lab-a")
                && n3.location.as_deref() == Some("lab")
                && m.node_id.is_some()
            {
                Ok(())
            } else {
                Err(format!("{m:?} {n3:?}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // The malformed node is counted and logged, not a peer.
    let rejected = daemons[0]
        .metrics()
        .map(|m| {
            m.series("meshd_discovery_rejected_total")
                .filter(|(l, _)| l.contains("registry=\"k8s\"") && l.contains("annotation"))
                .map(|(_, v)| v)
                .sum::<f64>()
        })
        .unwrap_or_else(|e| panic!("metrics: {e}"));
    assert!(
        rejected >= 4.0,
        "4 bad values on node \"broken\": {rejected}"
    );
    assert!(
        daemons[0]
            .log()
            .contains("ignoring a malformed node annotation"),
        "a clear log line"
    );

    // Pod CIDRs (spec.podCIDRs) are routed through the mesh on the other nodes, and pods talk.
    for i in 0..3 {
        for j in (0..3).filter(|j| *j != i) {
            let want = pod_cidr(lab.nodes[j].index);
            let (a, b) = (&lab.nodes[i], &lab.nodes[j]);
            wait_until(
                Duration::from_secs(10),
                format!(
                    "{}'s pod CIDR routed through the mesh on {}",
                    b.name(),
                    a.name()
                ),
                || {
                    let out = a.netns.exec(&["ip", "route", "show", "table", "51821"]);
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    if text
                        .lines()
                        .any(|l| l.starts_with(&want) && l.contains("dev hybridnet0"))
                    {
                        Ok(())
                    } else {
                        Err(text)
                    }
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            wait_until(Duration::from_secs(5), "pod to pod ping", || {
                ping_pods(&lab, i, j)
            })
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    eprintln!("pod CIDRs routed through the mesh; pod-to-pod pings pass");

    // The server ends every watch: the nodes resume from their resourceVersion (no relist).
    let lists = srv().requests("list");
    srv().close_watches();
    for i in 0..3 {
        wait_until(Duration::from_secs(10), "the watch to be resumed", || {
            let r = registry(&lab, i);
            if r["watchRestarts"].as_u64().unwrap_or(0) >= 1 && r["state"] == "watching" {
                Ok(())
            } else {
                Err(r.to_string())
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        srv().requests("list"),
        lists,
        "a closed watch resumes without a list"
    );

    // History compacted and every watch cut: the resumes get 410 Gone (HTTP status), the nodes relist;
    // then again with 410 as an ERROR event inside the watch stream.
    srv().compact(Gone::Status);
    srv().close_watches();
    wait_relisted(&lab, &[0, 1, 2], srv(), 1);
    srv().compact(Gone::Event);
    srv().close_watches();
    wait_relisted(&lab, &[0, 1, 2], srv(), 2);
    assert!(srv().requests("gone") >= 6, "{}", srv().requests("gone"));
    eprintln!("watches resumed after a close; relisted after 410 Gone (status and event)");

    // A node added after the relists is met by everyone.
    let joined = Instant::now();
    register(&lab, 3, srv());
    lab.nodes[3]
        .netns
        .ip(&["addr", "add", &format!("{}/32", pod_ip(4)), "dev", "lo"]);
    daemons.push(start(&lab, 3));
    wait_peers(
        &lab,
        3,
        &["node1", "node2", "node3"],
        Duration::from_secs(30),
    );
    for i in 0..3 {
        let mut names: Vec<String> = (0..4)
            .filter(|j| *j != i)
            .map(|j| lab.nodes[j].name())
            .collect();
        names.sort();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        wait_peers(&lab, i, &names, Duration::from_secs(10));
    }
    eprintln!(
        "node4 joined after the relists: full mesh {:?} later",
        joined.elapsed()
    );
    ping_all(&lab, &[0, 1, 2, 3]);

    // node4's Node is deleted: the others drop it (node4 itself still sees them).
    let deleted = Instant::now();
    srv().delete_node("node4");
    wait_peers(&lab, 0, &["node2", "node3"], Duration::from_secs(10));
    wait_peers(&lab, 1, &["node1", "node3"], Duration::from_secs(10));
    wait_peers(&lab, 2, &["node1", "node2"], Duration::from_secs(10));
    eprintln!(
        "node4's Node deleted: dropped by the others {:?} later",
        deleted.elapsed()
    );

    // The API server goes away: the registries back off, the mesh (and pod routes) stay.
    drop(server.take());
    for i in 0..4 {
        wait_until(
            Duration::from_secs(15),
            "the registry to notice the outage",
            || {
                let r = registry(&lab, i);
                if r["state"] == "backoff" || r["state"] == "connecting" {
                    Ok(())
                } else {
                    Err(r.to_string())
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..3 {
        lab.nodes[i]
            .all_up(2)
            .unwrap_or_else(|e| panic!("mesh changed with the API down: {e}"));
    }
    // node4 keeps its last view (3 peers), though they dropped it when its Node went.
    let rows = lab.nodes[3]
        .details()
        .map(|d| d["peers"].as_array().map_or(0, Vec::len))
        .unwrap_or(0);
    assert_eq!(rows, 3, "node4's last view is kept with the API down");
    ping_all(&lab, &[0, 1, 2]);
    ping_pods(&lab, 2, 0).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("API server down: mesh and pod routes unchanged");
    drop(daemons);
}

/// Both registries at once, merged by node ID. node1 and node4 use the discovery service and the
/// Kubernetes registry, node2 only the service (its Kubernetes client only reads its own pod CIDRs for
/// `advertiseKubernetesNetworks`), node3 only the Kubernetes registry. node1 meets node4 through both
/// registries as one peer, node2 through the service and node3 through annotations; node2's pod CIDR
/// reaches node1 through the service record.
#[test]
fn both_registries_merge_by_node_id_and_pod_cidrs_travel_through_the_service() {
    let lab = MeshLab::new(4, "meshd-kubernetes-merge");
    lab.switch
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "brpub"]);
    let server = KubeApiServer::start(&lab.switch, server_addr());
    let service = DiscoveryServer::start(&lab.switch, SocketAddr::from(([198, 51, 100, 1], 3000)));
    let url = service.url();
    write_config_with(&lab, 0, &server, true, Some(&url));
    write_config_with(&lab, 1, &server, false, Some(&url));
    write_config_with(&lab, 2, &server, true, None);
    write_config_with(&lab, 3, &server, true, Some(&url));
    for i in 0..4 {
        register(&lab, i, &server);
        let n = &lab.nodes[i];
        n.netns.ip(&[
            "addr",
            "add",
            &format!("{}/32", pod_ip(n.index)),
            "dev",
            "lo",
        ]);
    }
    let t0 = Instant::now();
    let _daemons: Vec<Daemon> = (0..4).map(|i| start(&lab, i)).collect();
    wait_peers(
        &lab,
        0,
        &["node2", "node3", "node4"],
        Duration::from_secs(30),
    );
    wait_peers(
        &lab,
        3,
        &["node1", "node2", "node3"],
        Duration::from_secs(10),
    );
    wait_peers(&lab, 1, &["node1", "node4"], Duration::from_secs(10));
    wait_peers(&lab, 2, &["node1", "node4"], Duration::from_secs(10));
    eprintln!(
        "4 nodes over two registries meshed {:?} after start",
        t0.elapsed()
    );

    // node1: the service saw node2 and node4, the Kubernetes registry node3 and node4; node4 is one peer.
    wait_until(Duration::from_secs(10), "node1's two registries", || {
        let d = lab.nodes[0].details()?;
        let regs = d["discovery"]["registries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let find = |name: &str| regs.iter().find(|r| r["endpoint"] == name).cloned();
        let (Some(svc), Some(k8s)) = (find(&url), find("k8s")) else {
            return Err(format!("{regs:?}"));
        };
        if svc["affiliates"] == 2
            && k8s["affiliates"] == 2
            && svc["state"] == "watching"
            && k8s["state"] == "watching"
        {
            Ok(())
        } else {
            Err(format!("{regs:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // node2 only reads: its Node carries no annotations.
    assert!(
        server.annotations("node2").is_empty(),
        "{:?}",
        server.annotations("node2")
    );
    assert!(!server.annotations("node4").is_empty());
    // node2's pod CIDR came to node1 in the service record (additional addresses), and back.
    for (a, b) in [(0, 1), (1, 0), (2, 0), (3, 1)] {
        wait_until(Duration::from_secs(10), "pod to pod ping", || {
            ping_pods(&lab, a, b)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A kubeconfig that cannot be read is the registry's error, naming the file; the mesh runs anyway.
#[test]
fn a_bad_kubeconfig_is_a_clear_registry_error() {
    let lab = MeshLab::new(1, "meshd-kubernetes-badconfig");
    lab.switch
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "brpub"]);
    let server = KubeApiServer::start(&lab.switch, server_addr());
    write_config(&lab, 0, &server);
    let node = &lab.nodes[0];
    let missing = node.config.with_file_name("no-such-kubeconfig");
    let _d = Daemon::builder(DaemonKind::Meshd, &node.netns, &node.config)
        .log_file(node.config.with_file_name("meshd.log"))
        .env("MESHD_NODENAME", node.name())
        .env("KUBECONFIG", missing.display().to_string())
        .start();
    let want = missing.display().to_string();
    wait_until(
        Duration::from_secs(15),
        "the registry to report the unreadable kubeconfig",
        || {
            let r = registry(&lab, 0);
            let err = r["error"].as_str().unwrap_or("");
            if r["state"] == "backoff" && err.contains(&want) && err.contains("KUBECONFIG") {
                Ok(())
            } else {
                Err(r.to_string())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let d = node.details().unwrap_or_else(|e| panic!("{e}"));
    assert!(d["error"].is_null(), "the mesh itself is fine: {d}");
}

/// Over HTTPS with a kubelet-style kubeconfig (CA and client certificate embedded): kube's rustls (ring)
/// client verifies the server by its IP and authenticates with the certificate; two nodes meet.
#[test]
fn the_registry_works_over_tls_with_client_certificates() {
    let lab = MeshLab::new(2, "meshd-kubernetes-tls");
    lab.switch
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "brpub"]);
    let server = KubeApiServer::start_tls(&lab.switch, server_addr());
    assert!(server.url().starts_with("https://"));
    for i in 0..2 {
        write_config(&lab, i, &server);
        register(&lab, i, &server);
    }
    let t0 = Instant::now();
    let _daemons: Vec<Daemon> = (0..2).map(|i| start(&lab, i)).collect();
    wait_peers(&lab, 0, &["node2"], Duration::from_secs(30));
    wait_peers(&lab, 1, &["node1"], Duration::from_secs(10));
    eprintln!("2 nodes met over HTTPS {:?} after start", t0.elapsed());
    ping_all(&lab, &[0, 1]);
    assert!(
        server
            .annotations("node2")
            .contains_key("networking.talos.dev/kubespan-public-key"),
        "{:?}",
        server.annotations("node2")
    );
    assert!(server.requests("patch") >= 2 && server.requests("watch") >= 2);
}
