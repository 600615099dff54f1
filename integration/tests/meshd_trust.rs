//! meshd's trust boundary in network namespaces: a discovered peer's record is hostile input. Three
//! nodes meet through the Kubernetes registry (the `KubeApiServer` stand-in for a kube-apiserver's Node
//! API, as in `meshd_kubernetes.rs`: a real one needs etcd and a PKI). node3's Node carries a hostile
//! record (written by the test; node3 runs meshd with Talos's KubeSpan switch on, so it does not
//! publish its own annotations and overwrite them): beside its own key, endpoint, mesh address and pod
//! CIDR it announces a default route (IPv4 and IPv6), the victims' underlay subnet, the service subnet,
//! another node's pod CIDR, a prefix outside its own pod CIDR and node2's mesh /128; a fourth Node
//! ("evil", no daemon) claims node2's mesh address as its `kubespan-ip`. On node1 and node2 nothing of
//! that reaches table 51821 or the WireGuard device, each refusal is counted and shown in `meshd status`,
//! and node3's legitimate parts (its mesh address, its pod CIDR) still carry pings. Needs root; fails
//! (never skips) without it.

use std::collections::BTreeSet;
use std::time::Duration;

use hybridnet_integration::kubernetes::KubeApiServer;
use hybridnet_integration::meshd::kube::{IDENTITY, pod_cidr, pod_ip, server_addr, start};
use hybridnet_integration::meshd::{MeshLab, PORT};
use hybridnet_integration::{Daemon, DaemonKind, wait_until, write_atomic};

/// Not the usual 10.96.0.0/12: the lab's mesh addresses (10.99.0.i) would lie in it.
const SERVICE_SUBNET: &str = "10.96.0.0/16";
/// A 32-byte key for the Node without a daemon ("evilevil..." in base64).
const EVIL_KEY: &str = "ZXZpbGV2aWxldmlsZXZpbGV2aWxldmlsZXZpbGV2aWw=";

/// Node `i`: the Kubernetes registry only, the cluster's pod and service subnets, the API server as
/// control-plane endpoint. `publish: false` (node3) turns Talos's KubeSpan switch on, which keeps meshd
/// from writing its Node's annotations (Talos's own registry would).
fn write_config(lab: &MeshLab, i: usize, server: &KubeApiServer, publish: bool) {
    let node = &lab.nodes[i];
    let kubespan = if publish {
        ""
    } else {
        "  network:\n    kubespan:\n      enabled: true\n"
    };
    let doc = format!(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {state}\ndataDir: {data}\nmeshd:\n  \
         interface: hybridnet0\n  backend: userspace\n  listenPort: {PORT}\n  privateKeyFile: {data}/meshd.key\n  \
         addresses: [\"{mesh}/32\"]\n  advertiseKubernetesNetworks: true\n---\nversion: v1alpha1\nmachine:\n  \
         type: worker\n{kubespan}cluster:\n  controlPlane:\n    endpoint: https://{api}\n  network:\n    \
         podSubnets: [10.244.0.0/16]\n    serviceSubnets: [{SERVICE_SUBNET}]\n  discovery:\n    enabled: true\n    \
         registries:\n      kubernetes:\n        disabled: false\n      service:\n        disabled: true\n---\n{IDENTITY}",
        state = node.state_dir.display(),
        data = node.data_dir.display(),
        mesh = node.mesh_ip(),
        api = server_addr(),
    );
    write_atomic(&node.config, doc);
    write_atomic(
        &node.config.with_file_name("kubeconfig"),
        server.kubeconfig(&node.name()),
    );
}

fn routes(lab: &MeshLab, i: usize) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for family in ["-4", "-6"] {
        let o = lab.nodes[i]
            .netns
            .exec(&["ip", family, "route", "show", "table", "51821"]);
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // Without volatile parts (expiry of IPv6 routes).
            let line: Vec<&str> = line.split_whitespace().take(3).collect();
            out.insert(line.join(" "));
        }
    }
    out
}

/// Each peer's AllowedIPs as node `i`'s WireGuard device reports them.
fn allowed(lab: &MeshLab, i: usize) -> Result<Vec<(String, Vec<String>)>, String> {
    let d = lab.nodes[i].details()?;
    let mut out: Vec<(String, Vec<String>)> = d["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let ips = p["allowedIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            (p["name"].as_str().unwrap_or("").to_owned(), ips)
        })
        .collect();
    out.sort();
    Ok(out)
}

fn ping_from(lab: &MeshLab, i: usize, src: &str, dst: &str) -> Result<(), String> {
    let out = lab.nodes[i]
        .netns
        .exec(&["ping", "-c", "1", "-W", "1", "-I", src, dst]);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} {src} -> {dst}: {}",
            lab.nodes[i].name(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

fn field(lab: &MeshLab, i: usize, key: &str) -> String {
    lab.nodes[i]
        .details()
        .ok()
        .and_then(|d| d[key].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("{} has no {key} in its status", lab.nodes[i].name()))
}

#[test]
fn a_hostile_record_changes_nothing_and_its_legitimate_parts_work() {
    let lab = MeshLab::new(3, "meshd-trust");
    lab.switch
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "brpub"]);
    let server = KubeApiServer::start(&lab.switch, server_addr());
    for i in 0..3 {
        write_config(&lab, i, &server, i != 2);
        let n = &lab.nodes[i];
        let private = n.private_ip().to_string();
        server.add_node(
            &n.name(),
            &[],
            &[pod_cidr(n.index).as_str()],
            &[("InternalIP", private.as_str())],
        );
        n.netns.ip(&[
            "addr",
            "add",
            &format!("{}/32", pod_ip(n.index)),
            "dev",
            "lo",
        ]);
    }
    let daemons: Vec<Daemon> = (0..3).map(|i| start(&lab, i)).collect();
    let key3 = {
        let mut k = String::new();
        wait_until(Duration::from_secs(15), "node3's status", || {
            k = lab.nodes[2]
                .details()?
                .get("publicKey")
                .and_then(|v| v.as_str())
                .ok_or("no key")?
                .to_owned();
            Ok::<(), String>(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        k
    };
    let mesh3 = field(&lab, 2, "meshAddress");
    let legit = format!("{},{}/32", pod_cidr(3), lab.nodes[2].mesh_ip());
    let annotate = |prefixes: &str| {
        let (key, mesh, ip) = (key3.clone(), mesh3.clone(), lab.nodes[2].private_ip());
        let prefixes = prefixes.to_owned();
        server.update_node("node3", move |n| {
            n["metadata"]["annotations"] = serde_json::json!({
                "cluster.talos.dev/node-id": "node3-id",
                "networking.talos.dev/kubespan-public-key": key,
                "networking.talos.dev/kubespan-ip": mesh,
                "networking.talos.dev/kubespan-endpoints": format!("{ip}:{PORT}"),
                "networking.talos.dev/self-ips": ip.to_string(),
                "networking.talos.dev/assigned-prefixes": prefixes,
            });
        });
    };
    annotate(&legit);
    for i in 0..2 {
        wait_until(
            Duration::from_secs(30),
            format!("{}'s peers up", lab.nodes[i].name()),
            || lab.nodes[i].all_up(2),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let pods = |a: usize, b: usize| {
        let (na, nb) = (&lab.nodes[a], &lab.nodes[b]);
        wait_until(Duration::from_secs(10), "pod to pod ping", || {
            ping_from(&lab, a, &pod_ip(na.index), &pod_ip(nb.index))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    };
    for (a, b) in [(0, 2), (1, 2), (0, 1)] {
        pods(a, b);
    }
    // The victims' view with node3's legitimate record: routes and AllowedIPs, once settled.
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<_> = (0..2)
        .map(|i| {
            (
                routes(&lab, i),
                allowed(&lab, i).unwrap_or_else(|e| panic!("{e}")),
            )
        })
        .collect();
    let mesh2 = field(&lab, 1, "meshAddress");
    assert!(
        before[0]
            .1
            .iter()
            .any(|(n, ips)| n == "node2" && ips.contains(&format!("{mesh2}/128"))),
        "{:?}",
        before[0].1
    );

    // The hostile record: node3's legitimate parts plus claims on the others' traffic.
    let hostile: Vec<(String, &str)> = vec![
        ("0.0.0.0/0".into(), "outside-pod-cidrs"),
        ("::/0".into(), "default-route"),
        ("192.0.2.0/24".into(), "underlay"),
        (SERVICE_SUBNET.into(), "service-subnet"),
        (pod_cidr(2), "outside-pod-cidrs"),
        ("10.244.200.0/24".into(), "outside-pod-cidrs"),
        (format!("{mesh2}/128"), "mesh-address"),
    ];
    let list: Vec<&str> = hostile.iter().map(|(p, _)| p.as_str()).collect();
    annotate(&format!("{legit},{}", list.join(",")));
    // A Node without a daemon claims node2's mesh address as its own (kubespan-ip).
    server.add_node("evil", &[], &[], &[]);
    let claim = mesh2.clone();
    server.update_node("evil", move |n| {
        n["metadata"]["annotations"] = serde_json::json!({
            "cluster.talos.dev/node-id": "evil-id",
            "networking.talos.dev/kubespan-public-key": EVIL_KEY,
            "networking.talos.dev/kubespan-ip": claim,
            "networking.talos.dev/kubespan-endpoints": "192.0.2.99:51821",
        });
    });
    let mut want: BTreeSet<(String, String, String)> = hostile
        .iter()
        .map(|(p, r)| ("node3".to_owned(), p.clone(), (*r).to_owned()))
        .collect();
    want.insert(("evil".into(), format!("{mesh2}/128"), "mesh-address".into()));
    for i in 0..2 {
        wait_until(
            Duration::from_secs(15),
            format!("{} to refuse the hostile prefixes", lab.nodes[i].name()),
            || {
                let d = lab.nodes[i].details()?;
                let got: BTreeSet<(String, String, String)> = d["refusedPrefixes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
                        (s("peer"), s("prefix"), s("reason"))
                    })
                    .collect();
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // A resync (every 10 s) for anything that would have moved.
    std::thread::sleep(Duration::from_secs(12));
    for (i, was) in before.iter().enumerate() {
        let n = &lab.nodes[i];
        assert_eq!(routes(&lab, i), was.0, "{}: table 51821 changed", n.name());
        let now = allowed(&lab, i).unwrap_or_else(|e| panic!("{e}"));
        let without_evil: Vec<_> = now.iter().filter(|(p, _)| p != "evil").cloned().collect();
        assert_eq!(without_evil, was.1, "{}: AllowedIPs changed", n.name());
        let evil = now.iter().find(|(p, _)| p == "evil");
        assert!(
            evil.is_none_or(|(_, ips)| !ips.contains(&format!("{mesh2}/128"))),
            "{}: {evil:?}",
            n.name()
        );
        // The own underlay stays on the underlay.
        let out = n.netns.exec(&["ip", "route", "get", "192.0.2.13"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("dev priv"), "{}: {text}", n.name());
    }
    // Counted: once per (peer, reason) change.
    let metrics = daemons[0]
        .metrics()
        .unwrap_or_else(|e| panic!("metrics: {e}"));
    for (peer, _, reason) in &want {
        let n: f64 = metrics
            .series("meshd_prefixes_refused_total")
            .filter(|(l, _)| {
                l.contains(&format!("peer=\"{peer}\""))
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .map(|(_, v)| v)
            .sum();
        assert!(n >= 1.0, "{peer} {reason}: {n}");
    }
    assert!(
        daemons[0]
            .log()
            .contains("refused a prefix a discovered peer announced"),
        "logged"
    );
    // The CLI view shows them.
    let out = lab.nodes[0].netns.exec(&[
        &hybridnet_integration::bin_path(DaemonKind::Meshd)
            .display()
            .to_string(),
        "status",
        "--state-dir",
        &lab.nodes[0].state_dir.display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("refused 0.0.0.0/0 from node3 (outside-pod-cidrs)")
            && text.contains(&format!("refused {mesh2}/128 from evil (mesh-address)")),
        "{text}"
    );
    // The legitimate parts still work: pods and mesh addresses on both sides, the underlay too.
    for (a, b) in [(0, 2), (1, 2), (0, 1), (1, 0)] {
        pods(a, b);
    }
    for i in 0..2 {
        for dst in [lab.nodes[2].mesh_ip().to_string(), mesh3.clone()] {
            wait_until(Duration::from_secs(5), "ping node3 over the mesh", || {
                lab.nodes[i].ping(&dst)
            })
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    wait_until(
        Duration::from_secs(5),
        "node2's mesh address from node1",
        || lab.nodes[0].ping(&mesh2),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    wait_until(
        Duration::from_secs(5),
        "node2 on the underlay from node1",
        || lab.nodes[0].ping("192.0.2.12"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    drop(daemons);
}
