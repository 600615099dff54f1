//! Root tests of the operator kit against the real daemons: two nodes, each running apiprism, meshd and
//! dnslocal (meshd meshed with the other node).
//!
//! - every metric the alerting rules and the Grafana dashboards name is in the daemons' real `/metrics`
//!   (`hack/operator/metrics_check.py` over the six scrapes);
//! - `meshd doctor` on a healthy node: exit 0, kubelet DNS and the mesh port OK;
//! - `meshd doctor`'s clock check against an HTTP time source on our clock: OK, with the measured offset;
//! - a broken node (the kubelet's clusterDNS pointing past dnslocal, the mesh port dropped by nftables, the
//!   clock compared with a time source 10 minutes ahead): `doctor` exits 1 and names the three problems with
//!   their fix.
//!
//! The kubelet is not running here: its config file and kubeconfig are written as kubeadm writes them
//! (`KubeletConfiguration` with `clusterDNS`, a kubeconfig with `server`), which is all doctor reads of it.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use hybridnet_integration::discovery::DiscoveryServer;
use hybridnet_integration::dnslocal::{LISTEN, Nsd, dig_in, require_tools};
use hybridnet_integration::meshd::{MeshLab, MeshNode, PORT};
use hybridnet_integration::{
    Daemon, DaemonKind, Netns, TimedOutput, bin_path, require_root, run_with_timeout, wait_until,
    write_atomic,
};
use serde_json::Value;

const SOON: Duration = Duration::from_secs(15);
const CLI: Duration = Duration::from_secs(10);

/// apiprism and dnslocal settings beside meshd's, for each node's config: apiprism in front of a TCP
/// stand-in on node2 and a dead address; dnslocal forwarding the cluster zone to a dead address (timeouts)
/// and the rest to NSD on the node's loopback.
const OTHERS: &str = "apiprism: {listen: [\"127.0.0.1:7445\"], endpoints: [\"192.0.2.12:6443\", \"192.0.2.1:6443\"]}\n\
                      dnslocal: {listen: [\"169.254.20.10:53\"], clusterDNS: [\"192.0.2.53:53\"], upstreams: [\"127.0.0.11:53\"]}\n";

/// The discovery service stand-in's address, on the lab's public switch.
const DISCOVERY: &str = "198.51.100.1:3000";

/// HTTP time sources for doctor's clock check, on node1's loopback.
const TIME_RIGHT: &str = "127.0.0.1:8181";
const TIME_AHEAD: &str = "127.0.0.1:8182";

/// The lab's discovery identity: 32 bytes each, base64 (as Talos writes them).
const CLUSTER_ID: &str = "aHlicmlkbmV0LWxhYi1jbHVzdGVyLWlkLTAwMDAwMDA=";
const CLUSTER_SECRET: &str = "aHlicmlkbmV0LWxhYi1jbHVzdGVyLXNlY3JldC0wMDA=";

/// A TCP server that reads a request and answers each connection with `answer()`, then closes: standing in
/// for an API server (only the TCP side matters to apiprism's metrics) and for an HTTP time source (the
/// doctor reads only the `Date` of any answer, as kube-apiserver's net/http sends on each, a 401 included);
/// stops on drop.
struct TcpStandin {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpStandin {
    fn start(
        netns: &Netns,
        addr: SocketAddr,
        answer: impl Fn() -> String + Send + 'static,
    ) -> Result<TcpStandin> {
        let listener = netns.tcp_listener(addr)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut request = [0u8; 2048];
                        let _ = stream.read(&mut request);
                        let _ = stream.write_all(answer().as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(TcpStandin {
            stop,
            thread: Some(thread),
        })
    }

    /// An HTTP server whose clock is `ahead` seconds ahead of ours.
    fn time_source(netns: &Netns, addr: SocketAddr, ahead: u64) -> Result<TcpStandin> {
        TcpStandin::start(netns, addr, move || {
            let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(ahead));
            format!("HTTP/1.1 401 Unauthorized\r\nDate: {date}\r\nContent-Length: 0\r\n\r\n")
        })
    }
}

impl Drop for TcpStandin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Lab {
    // Drop order: daemons and stand-ins before the lab's namespaces.
    daemons: Vec<Daemon>,
    _api: TcpStandin,
    _nsd: Vec<Nsd>,
    _discovery: DiscoveryServer,
    lab: MeshLab,
}

fn start_lab() -> Result<Lab> {
    require_root();
    let mut lab = MeshLab::new(2, "operator");
    lab.switch
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "brpub"]);
    let discovery = DiscoveryServer::start(&lab.switch, DISCOVERY.parse()?);
    for node in &mut lab.nodes {
        node.extra = format!(
            "{OTHERS}---\napiVersion: v1alpha1\nkind: DiscoveryIdentityConfig\nclusterID: {CLUSTER_ID}\n\
             clusterSecret: {CLUSTER_SECRET}\n---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: lab\n\
             endpoint: {}\n",
            discovery.url()
        );
    }
    require_tools(&["nsd", "dig", "nft"]);
    let api = TcpStandin::start(&lab.nodes[1].netns, "192.0.2.12:6443".parse()?, || {
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_owned()
    })?;
    let nsd = lab
        .nodes
        .iter()
        .map(|n| Nsd::start(&n.netns, &lab.dir, 0))
        .collect();
    // node1's peer cache holds a stale discovered record announcing a default route: meshd refuses it
    // at its first reconcile (before discovery's first snapshot drops cached peers), so the refusal
    // counter the alerts and the dashboard name has a series to check.
    std::fs::create_dir_all(&lab.nodes[0].data_dir)?;
    write_atomic(
        &lab.nodes[0].data_dir.join("meshd-peers.json"),
        "{\"version\": 1, \"peers\": [{\"name\": \"stale\", \"publicKey\":          \"c3RhbGVzdGFsZXN0YWxlc3RhbGVzdGFsZXN0YWxlc3Q=\", \"endpoints\": [],          \"allowedIps\": [\"0.0.0.0/0\"], \"source\": \"discovery\", \"lastSeen\": 0}]}\n",
    );
    let mut daemons = lab.start_all();
    for node in &lab.nodes {
        for kind in [DaemonKind::Apiprism, DaemonKind::Dnslocal] {
            daemons.push(
                Daemon::builder(kind, &node.netns, &node.config)
                    .log_file(node.config.with_file_name(format!("{}.log", kind.name())))
                    .start(),
            );
        }
    }
    for d in &mut daemons {
        let what = d.kind().name();
        d.wait_ready(SOON)
            .with_context(|| format!("{what} ready"))?;
    }
    for node in &lab.nodes {
        wait_until(SOON, format!("{} sees its peer up", node.name()), || {
            node.all_up(1)
        })?;
    }
    Ok(Lab {
        daemons,
        _discovery: discovery,
        _api: api,
        _nsd: nsd,
        lab,
    })
}

/// Traffic through node1's apiprism and dnslocal, so that every labelled family has a series: a connection
/// through apiprism (per-upstream counters appear on first use), a lookup NSD answers (upstream latency)
/// and one in the cluster zone whose server is dead (upstream errors).
fn traffic(node: &MeshNode) -> Result<()> {
    wait_until(SOON, "a request through apiprism", || {
        let out = node
            .netns
            .exec(&["curl", "-s", "--max-time", "2", "http://127.0.0.1:7445/"]);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if body == "ok" {
            Ok(())
        } else {
            Err(format!("{body:?} {}", String::from_utf8_lossy(&out.stderr)))
        }
    })?;
    let ok = dig_in(node.netns.name(), LISTEN, &["www.example.test", "A"]);
    ensure!(
        ok.status == "NOERROR",
        "www.example.test through dnslocal: {ok:?}"
    );
    let _ = dig_in(
        node.netns.name(),
        LISTEN,
        &["kubernetes.default.svc.cluster.local", "A"],
    );
    Ok(())
}

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn rules_and_dashboards_name_only_exported_metrics() -> Result<()> {
    let lab = start_lab()?;
    traffic(&lab.lab.nodes[0])?;
    wait_until(SOON, "node1's discovery registry watching", || {
        let d = lab.lab.nodes[0].details()?;
        if d["discovery"]["registries"][0]["state"] == "watching" {
            Ok(())
        } else {
            Err(d["discovery"].to_string())
        }
    })?;
    let mut files = Vec::new();
    for (i, d) in lab.daemons.iter().enumerate() {
        let text = d
            .metrics()
            .with_context(|| format!("scrape {}", d.kind().name()))?
            .0;
        if d.kind() == DaemonKind::Meshd {
            rejections_zeroed(&text)?;
        }
        let path = lab.lab.dir.join(format!("{i}-{}.metrics", d.kind().name()));
        std::fs::write(&path, text)?;
        files.push(path);
    }
    let out = run_with_timeout(
        Command::new("/usr/bin/python3")
            .arg(repo().join("hack/operator/metrics_check.py"))
            .args(&files),
        CLI,
    );
    eprintln!("{}", out.stdout);
    ensure!(
        out.code() == Some(0),
        "metrics_check.py: {}",
        out.describe()
    );
    ensure!(
        !out.stdout.contains("MISSING")
            && out
                .stdout
                .contains(" metric names in the rules and dashboards are exported"),
        "{}",
        out.describe()
    );
    Ok(())
}

/// meshd's rejected-record counter has a series per reason at 0 for the lab's discovery service before any
/// record is rejected (the MeshdDiscoveryRecordsRejected alert's `increase()` then counts the first one).
fn rejections_zeroed(text: &str) -> Result<()> {
    let registry = format!("registry=\"http://{DISCOVERY}");
    for reason in ["oversized", "short", "decrypt", "protobuf", "endpoint"] {
        let found = text.lines().any(|l| {
            l.starts_with("meshd_discovery_rejected_total{")
                && l.contains(&registry)
                && l.contains(&format!("reason=\"{reason}\""))
                && l.ends_with(" 0")
        });
        ensure!(
            found,
            "meshd_discovery_rejected_total {registry} reason {reason} at 0 in:\n{text}"
        );
    }
    Ok(())
}

/// Runs `meshd doctor --json` inside the node's namespace (its /proc/sys/net and /sys/class/net), its clock
/// compared with `time_source`.
fn doctor(
    node: &MeshNode,
    kubelet_config: &Path,
    kubeconfig: &Path,
    time_source: Option<&str>,
) -> (TimedOutput, Value) {
    let out = run_with_timeout(
        node.netns
            .command(bin_path(DaemonKind::Meshd))
            .arg("doctor")
            .arg("--config")
            .arg(&node.config)
            .arg("--kubelet-config")
            .arg(kubelet_config)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(time_source.iter().flat_map(|t| ["--time-source", *t]))
            .arg("--json"),
        CLI,
    );
    let json = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
    (out, json)
}

fn finding<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["check"] == check))
        .unwrap_or(&Value::Null)
}

fn kubelet_files(dir: &Path, cluster_dns: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let config = dir.join("kubelet-config.yaml");
    write_atomic(
        &config,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nclusterDomain: cluster.local\nclusterDNS:\n- {cluster_dns}\n"
        ),
    );
    let kubeconfig = dir.join("kubelet.conf");
    write_atomic(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: k\n  cluster: {server: \"https://127.0.0.1:7445\"}\ncontexts:\n- name: c\n  context: {cluster: k, user: u}\ncurrent-context: c\n",
    );
    (config, kubeconfig)
}

#[test]
fn doctor_reports_kubelet_dns_elsewhere_and_a_dropped_mesh_port_with_the_fix() -> Result<()> {
    let lab = start_lab()?;
    let node = &lab.lab.nodes[0];
    let dir = lab.lab.dir.path();

    // Two HTTP time sources in node1's namespace: one on our clock, one 10 minutes ahead.
    let _right = TcpStandin::time_source(&node.netns, TIME_RIGHT.parse()?, 0)?;
    let _ahead = TcpStandin::time_source(&node.netns, TIME_AHEAD.parse()?, 600)?;
    let right = format!("http://{TIME_RIGHT}/");
    let ahead = format!("http://{TIME_AHEAD}/");

    let (kc, kube) = kubelet_files(dir, "169.254.20.10");
    let (out, report) = doctor(node, &kc, &kube, Some(&right));
    eprintln!("healthy node:\n{}", out.stdout);
    ensure!(
        out.code() == Some(0),
        "doctor on a healthy node: {}",
        out.describe()
    );
    for check in [
        "kubelet-dns",
        "kubelet-api",
        "mesh-port",
        "kubeprism-port",
        "meshd-running",
        "clock",
    ] {
        ensure!(
            finding(&report, check)["verdict"] == "ok",
            "{check}: {}",
            out.describe()
        );
    }

    let clock = finding(&report, "clock");
    let offset = clock["measured"]["offsetSeconds"]
        .as_f64()
        .unwrap_or(f64::NAN);
    ensure!(
        offset.abs() < 2.0 && clock["measured"]["source"] == right.as_str(),
        "clock: {clock}"
    );
    // The peer's probe pongs carry its clock (the same host clock here: within a few milliseconds). Its
    // name in status is the one discovery reports, so it is not looked up by name.
    let peers = clock["measured"]["peers"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    ensure!(
        peers.len() == 1
            && peers
                .values()
                .all(|ms| ms.as_i64().is_some_and(|ms| ms.abs() < 1000)),
        "clock offsets from the peer's pongs: {clock}"
    );

    // Without --time-source the config's sources are asked (the discovery stand-in, which speaks HTTP/2 only,
    // and apiprism's upstreams: a plain-TCP stand-in and a dead address): none gives its time, the check
    // says so and falls back on the registries, within doctor's bound.
    let (out, report) = doctor(node, &kc, &kube, None);
    let clock = finding(&report, "clock");
    ensure!(
        out.code() == Some(0)
            && clock["verdict"] == "ok"
            && clock["message"]
                .as_str()
                .unwrap_or_default()
                .contains("no time source gave its time"),
        "clock from the config's sources: {clock} {}",
        out.describe()
    );

    // Break it: the clock is compared with a server 10 minutes ahead, the kubelet hands pods kube-dns directly, and node1 drops the mesh ports (WireGuard's and
    // the probes', listenPort + 1).
    let (kc, kube) = kubelet_files(dir, "10.96.0.10");
    for rule in [
        "add table inet hntest".to_owned(),
        "add chain inet hntest input { type filter hook input priority 0 ; }".to_owned(),
        format!(
            "add rule inet hntest input udp dport {{ {PORT}, {} }} drop",
            PORT + 1
        ),
    ] {
        let args: Vec<&str> = std::iter::once("nft").chain(rule.split(' ')).collect();
        let o = node.netns.exec(&args);
        ensure!(
            o.status.success(),
            "nft {rule}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Traffic to the peer, as pods would send: an idle peer is probed every 30 s, unanswered traffic makes
    // meshd confirm its path at once (crates/meshd/README.md, probing policy).
    let peer_ip = lab.lab.nodes[1].mesh_ip().to_string();
    wait_until(SOON, "node1 sees its peer down", || {
        let _ = node.netns.exec(&["ping", "-c", "1", "-W", "1", &peer_ip]);
        let peer = node.peer("node2")?;
        if peer["state"] == "down" {
            Ok(())
        } else {
            Err(peer.to_string())
        }
    })?;
    let (out, report) = doctor(node, &kc, &kube, Some(&ahead));
    let text = run_with_timeout(
        node.netns
            .command(bin_path(DaemonKind::Meshd))
            .args(["doctor", "--config"])
            .arg(&node.config)
            .arg("--kubelet-config")
            .arg(&kc)
            .arg("--kubeconfig")
            .arg(&kube)
            .args(["--time-source", &ahead]),
        CLI,
    );
    eprintln!("broken node:\n{}", text.stdout);
    ensure!(
        out.code() == Some(1) && text.code() == Some(1),
        "doctor on a broken node: {}",
        out.describe()
    );
    ensure!(report["ok"] == false, "{}", out.describe());

    let dns = finding(&report, "kubelet-dns");
    ensure!(dns["verdict"] == "fail", "kubelet-dns: {dns}");
    let message = dns["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("10.96.0.10") && message.contains("bypass dnslocal"),
        "{dns}"
    );
    let fix = dns["fix"].as_str().unwrap_or_default();
    ensure!(fix.contains("clusterDNS to [169.254.20.10]"), "{dns}");

    let port = finding(&report, "mesh-port");
    ensure!(port["verdict"] == "fail", "mesh-port: {port}");
    ensure!(
        port["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!(
                "(UDP {PORT} WireGuard, {} probes) are not reachable from any peer",
                PORT + 1
            )),
        "{port}"
    );
    ensure!(
        port["fix"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("udp dport {{ {PORT}, {} }} accept", PORT + 1)),
        "{port}"
    );
    let clock = finding(&report, "clock");
    ensure!(clock["verdict"] == "fail", "clock: {clock}");
    ensure!(
        clock["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("600 s (10 min) behind {ahead}")),
        "{clock}"
    );
    let skew = clock["measured"]["offsetSeconds"]
        .as_f64()
        .unwrap_or(f64::NAN);
    ensure!((598.0..=602.0).contains(&skew), "{clock}");
    ensure!(
        text.stdout.contains("fix: enable time synchronisation"),
        "{}",
        text.describe()
    );
    ensure!(
        text.stdout
            .contains("fix: set the kubelet's clusterDNS to [169.254.20.10]"),
        "{}",
        text.describe()
    );
    Ok(())
}
