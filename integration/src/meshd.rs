//! meshd test support: nodes on two underlay networks, their configs, the mesh as `status.json` shows it,
//! path cuts, and a TCP stream that must survive a failover.
//!
//! [`MeshLab::new`] builds N nodes (network namespaces), each with `priv` on the "private" bridge
//! (192.0.2.0/24, node i at .1i) and `pub` on the "public" bridge (198.51.100.0/24), both bridges in a
//! switch namespace. Every node runs meshd with the userspace backend; the interface is `hybridnet0`
//! everywhere (the embedded userspace device serves its API on a private socket pair, so nothing on the
//! shared filesystem collides). Node i's IPv4 mesh address is 10.99.0.i.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod location;
pub mod nat;

use crate::netns::enter_named;
use crate::{Daemon, DaemonKind, Netns, TestDir, wait_until, write_atomic};

/// The private network (first candidate of every peer).
pub const PRIVATE: [u8; 3] = [192, 0, 2];
/// The public network.
pub const PUBLIC: [u8; 3] = [198, 51, 100];
/// meshd's WireGuard port in the lab.
pub const PORT: u16 = 51821;

/// One lab node.
#[derive(Debug)]
pub struct MeshNode {
    /// 1-based.
    pub index: u8,
    pub netns: Netns,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub data_dir: PathBuf,
    pub public_key: String,
    /// Extra YAML lines inside `meshd:` (e.g. a filter).
    pub extra: String,
    /// Prefixes routed to this node besides its mesh address (e.g. its pod CIDR): the other nodes list
    /// them in its `allowedIPs`.
    pub routed: Vec<String>,
}

impl MeshNode {
    /// Node `index` in `netns`, its files under `<dir>/node<index>` (created), its key not known yet.
    pub fn new(index: u8, netns: Netns, dir: &std::path::Path) -> MeshNode {
        let root = dir.join(format!("node{index}"));
        std::fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
        MeshNode {
            index,
            netns,
            config: root.join("config.yaml"),
            state_dir: root.join("state"),
            data_dir: root.join("data"),
            public_key: String::new(),
            extra: String::new(),
            routed: Vec::new(),
        }
    }

    /// Starts meshd on this node with its config, logging to `meshd.log` beside it.
    pub fn start(&self) -> Daemon {
        Daemon::builder(DaemonKind::Meshd, &self.netns, &self.config)
            .log_file(self.config.with_file_name("meshd.log"))
            .start()
    }
}

impl MeshNode {
    pub fn name(&self) -> String {
        format!("node{}", self.index)
    }

    pub fn private_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(PRIVATE[0], PRIVATE[1], PRIVATE[2], 10 + self.index)
    }

    pub fn public_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(PUBLIC[0], PUBLIC[1], PUBLIC[2], 10 + self.index)
    }

    pub fn mesh_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, self.index)
    }

    /// meshd's `status.json` details.
    pub fn details(&self) -> Result<Value, String> {
        DaemonKind::Meshd
            .read_status(&self.state_dir)
            .map(|s| s.details)
    }

    /// The row of peer `name` in the status details.
    pub fn peer(&self, name: &str) -> Result<Value, String> {
        let d = self.details()?;
        d["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned())
            .ok_or_else(|| format!("{} has no peer {name} yet: {d}", self.name()))
    }

    /// Whether every peer in the status is up.
    pub fn all_up(&self, peers: usize) -> Result<(), String> {
        self.all_up_in(peers, None)
    }

    /// [`MeshNode::all_up`] in the status written by process `pid` (not a previous run's record).
    pub fn all_up_in(&self, peers: usize, pid: Option<u32>) -> Result<(), String> {
        let status = DaemonKind::Meshd.read_status(&self.state_dir)?;
        if let Some(pid) = pid.filter(|p| *p != status.pid) {
            return Err(format!("status is from pid {}, not {pid}", status.pid));
        }
        let d = status.details;
        let rows = d["peers"].as_array().cloned().unwrap_or_default();
        let up = rows.iter().filter(|p| p["state"] == "up").count();
        if rows.len() == peers && up == peers {
            Ok(())
        } else {
            Err(format!("{}: {up}/{} up: {d}", self.name(), rows.len()))
        }
    }

    /// `ping -c1 -W1 dst` from this node.
    pub fn ping(&self, dst: &str) -> Result<(), String> {
        let out = self.netns.exec(&["ping", "-c", "1", "-W", "1", dst]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} cannot ping {dst}: {}",
                self.name(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }
}

/// N nodes on two underlays.
#[derive(Debug)]
pub struct MeshLab {
    // Drop order: nodes, then the switch.
    pub nodes: Vec<MeshNode>,
    pub switch: Netns,
    pub dir: TestDir,
}

impl MeshLab {
    pub fn new(n: u8, label: &str) -> MeshLab {
        // Each node resolves every other on both underlays, and the bridge learns them all.
        crate::netns::ensure_neighbour_capacity(2 * usize::from(n) * usize::from(n));
        let switch = Netns::new();
        for br in ["brpriv", "brpub"] {
            switch.ip(&["link", "add", br, "type", "bridge"]);
            switch.ip(&["link", "set", br, "up"]);
        }
        let dir = TestDir::new(label);
        let mut nodes = Vec::new();
        for index in 1..=n {
            let netns = Netns::new();
            for (net, br, prefix) in [("priv", "brpriv", PRIVATE), ("pub", "brpub", PUBLIC)] {
                let addr = format!(
                    "{}.{}.{}.{}/24",
                    prefix[0],
                    prefix[1],
                    prefix[2],
                    10 + index
                );
                switch.plug(br, &format!("{net}{index}"), &netns, net, &addr);
            }
            nodes.push(MeshNode::new(index, netns, dir.path()));
        }
        MeshLab { nodes, switch, dir }
    }

    /// Node `i`'s config: every other node whose key is known is a peer, private endpoint first.
    pub fn render(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let mut peers = String::new();
        for other in self
            .nodes
            .iter()
            .filter(|o| o.index != node.index && !o.public_key.is_empty())
        {
            peers.push_str(&format!(
                "    - {{name: {}, publicKey: \"{}\", endpoints: [\"{}:{PORT}\", \"{}:{PORT}\"], allowedIPs: [\"{}/32\"{}]}}\n",
                other.name(),
                other.public_key,
                other.private_ip(),
                other.public_ip(),
                other.mesh_ip(),
                other
                    .routed
                    .iter()
                    .map(|r| format!(", \"{r}\""))
                    .collect::<String>()
            ));
        }
        let peers = if peers.is_empty() {
            "  peers: []\n".to_owned()
        } else {
            format!("  peers:\n{peers}")
        };
        format!(
            "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {state}\ndataDir: {data}\nmeshd:\n  interface: hybridnet0\n  \
             backend: userspace\n  listenPort: {PORT}\n  privateKeyFile: {data}/meshd.key\n  addresses: [\"{mesh}/32\"]\n  \
             location: lab\n{peers}{extra}",
            state = node.state_dir.display(),
            data = node.data_dir.display(),
            mesh = node.mesh_ip(),
            extra = node.extra,
        )
    }

    pub fn write_config(&self, i: usize) {
        write_atomic(&self.nodes[i].config, self.render(i));
    }

    pub fn start(&self, i: usize) -> Daemon {
        self.nodes[i].start()
    }

    /// Starts every node without peers (each creates its key), learns the public keys from `status.json`,
    /// then writes the full configs (applied by reload). Returns the daemons.
    pub fn start_all(&mut self) -> Vec<Daemon> {
        for i in 0..self.nodes.len() {
            self.write_config(i);
        }
        let mut daemons: Vec<Daemon> = (0..self.nodes.len()).map(|i| self.start(i)).collect();
        for (i, d) in daemons.iter_mut().enumerate() {
            self.nodes[i].public_key = public_key_of(d, &self.nodes[i].state_dir);
        }
        for i in 0..self.nodes.len() {
            self.write_config(i);
        }
        daemons
    }

    /// Waits until every node reports every other node up (a warm-up: keys exchanged, caches written).
    pub fn wait_full_mesh(&self, timeout: Duration) {
        let peers = self.nodes.len().saturating_sub(1);
        for node in &self.nodes {
            wait_until(timeout, "every peer up", || node.all_up(peers))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Join after a restart of all (keys and peers known, as after a reboot of the cluster): stops
    /// `daemons`, starts every node at once and returns the time until each reports every peer up (as seen
    /// by its new process), with the new daemons.
    pub fn rejoin(&self, mut daemons: Vec<Daemon>, timeout: Duration) -> (Duration, Vec<Daemon>) {
        for d in &mut daemons {
            let _ = d.signal(nix::sys::signal::Signal::SIGTERM);
        }
        for d in &mut daemons {
            let _ = d.wait_exit(Duration::from_secs(15));
        }
        drop(daemons);
        let peers = self.nodes.len().saturating_sub(1);
        let start = Instant::now();
        let daemons: Vec<Daemon> = (0..self.nodes.len()).map(|i| self.start(i)).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            let pid = Some(daemons[i].pid());
            wait_until(timeout, "join", || node.all_up_in(peers, pid))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        (start.elapsed(), daemons)
    }

    /// A background ping (5/s, for `secs` seconds) from node `from` to node `to`'s mesh address: traffic
    /// that keeps the peer busy (probed as one carrying traffic) and shows when it passes.
    pub fn pings(&self, from: usize, to: usize, secs: u32) -> std::process::Child {
        self.nodes[from]
            .netns
            .command("ping")
            .args([
                "-q",
                "-i",
                "0.2",
                "-w",
                &secs.to_string(),
                &self.nodes[to].mesh_ip().to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("ping: {e}"))
    }

    /// Cuts (or restores) the private path between nodes `a` and `b` (0-based) with blackhole routes on
    /// both sides.
    pub fn cut_private(&self, a: usize, b: usize, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        let (na, nb) = (&self.nodes[a], &self.nodes[b]);
        na.netns.ip(&[
            "route",
            verb,
            "blackhole",
            &format!("{}/32", nb.private_ip()),
        ]);
        nb.netns.ip(&[
            "route",
            verb,
            "blackhole",
            &format!("{}/32", na.private_ip()),
        ]);
    }

    /// Waits until node `a` uses `endpoint` for node `b`; returns how long that took.
    pub fn wait_endpoint(
        &self,
        a: usize,
        b: usize,
        endpoint: Ipv4Addr,
        timeout: Duration,
    ) -> Duration {
        let start = Instant::now();
        let (na, nb) = (&self.nodes[a], &self.nodes[b]);
        let want = format!("{endpoint}:{PORT}");
        wait_until(
            timeout,
            format!("{} to reach {} via {want}", na.name(), nb.name()),
            || {
                let row = na.peer(&nb.name())?;
                if row["endpoint"] == want.as_str() && row["state"] == "up" {
                    Ok(())
                } else {
                    Err(format!("{row}"))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        start.elapsed()
    }
}

/// A TCP stream between two nodes: the client sends a byte every 20 ms and reads its echo. It records
/// the longest gap between echoes and any error.
#[derive(Debug)]
pub struct TcpFlow {
    stop: Arc<AtomicBool>,
    client: Option<JoinHandle<Result<(Duration, u64), String>>>,
    server: Option<JoinHandle<Result<(), String>>>,
}

impl TcpFlow {
    pub fn start(server_ns: &Netns, client_ns: &Netns, server_ip: Ipv4Addr, port: u16) -> TcpFlow {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sns = server_ns.name().to_owned();
        let server = std::thread::spawn(move || -> Result<(), String> {
            enter_named(&sns, || -> Result<(), String> {
                let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
                let _ = ready_tx.send(());
                let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                let mut b = [0u8; 1];
                loop {
                    match s.read(&mut b) {
                        Ok(0) => return Ok(()),
                        Ok(_) => s.write_all(&b).map_err(|e| e.to_string())?,
                        Err(e) => return Err(format!("server: {e}")),
                    }
                }
            })
            .map_err(|e| e.to_string())?
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        let cns = client_ns.name().to_owned();
        let flag = stop.clone();
        let client = std::thread::spawn(move || {
            enter_named(&cns, move || -> Result<(Duration, u64), String> {
                let addr = SocketAddr::from((server_ip, port));
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .map_err(|e| e.to_string())?;
                let (mut max_gap, mut n, mut last) = (Duration::ZERO, 0u64, Instant::now());
                // Bounded: at most 10 minutes of 20 ms rounds.
                for _ in 0..30_000 {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    s.write_all(b"x")
                        .map_err(|e| format!("write after {n}: {e}"))?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b)
                        .map_err(|e| format!("read after {n}: {e}"))?;
                    n += 1;
                    max_gap = max_gap.max(last.elapsed());
                    last = Instant::now();
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok((max_gap, n))
            })
            .map_err(|e| e.to_string())?
        });
        TcpFlow {
            stop,
            client: Some(client),
            server: Some(server),
        }
    }

    /// Stops the client; returns (longest gap between echoes, echoes) or the error that broke the stream.
    pub fn finish(mut self) -> Result<(Duration, u64), String> {
        self.stop.store(true, Ordering::Relaxed);
        let result = self
            .client
            .take()
            .map(|h| h.join().unwrap_or_else(|_| Err("client panicked".into())))
            .unwrap_or_else(|| Err("no client".into()));
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        result
    }
}

/// Waits until the meshd `d` (state directory `state`) publishes its public key in `status.json`; panics
/// after 20 s.
pub fn public_key_of(d: &mut Daemon, state: &std::path::Path) -> String {
    d.wait_alive(
        Duration::from_secs(20),
        "meshd to publish its public key",
        |d| {
            d.status_in(state).and_then(|s| {
                s.details["publicKey"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("no key yet: {}", s.summary))
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Labs whose nodes meet through meshd's Kubernetes registry (`meshd_kubernetes.rs`, `meshd_trust.rs`):
/// where the API stand-in listens, the nodes' pod CIDRs, a Talos identity, and starting a node's meshd
/// with its kubeconfig.
pub mod kube {
    use std::net::SocketAddr;

    use super::MeshLab;
    use crate::{Daemon, DaemonKind};

    /// The Kubernetes API stand-in's address (on the public bridge).
    pub fn server_addr() -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 1], 6443))
    }

    /// Node i's pod CIDR (1-based index).
    pub fn pod_cidr(index: u8) -> String {
        format!("10.244.{index}.0/24")
    }

    /// An address inside node i's pod CIDR (put on its loopback, as a pod's would be routed to it).
    pub fn pod_ip(index: u8) -> String {
        format!("10.244.{index}.1")
    }

    /// A Talos fixture's identity (`DiscoveryIdentityConfig`): every node shares the mesh prefix.
    pub const IDENTITY: &str = "apiVersion: v1alpha1\nkind: DiscoveryIdentityConfig\n\
        clusterID: 0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w=\n\
        clusterSecret: pofHbABZq7VXuObsdLdy/bHmz6hlMHZ3p8+6WKrv1ic=\n";

    /// Starts node `i`'s meshd with its Node name and the kubeconfig beside its config (`KUBECONFIG`).
    pub fn start(lab: &MeshLab, i: usize) -> Daemon {
        let node = &lab.nodes[i];
        Daemon::builder(DaemonKind::Meshd, &node.netns, &node.config)
            .log_file(node.config.with_file_name("meshd.log"))
            .env("MESHD_NODENAME", node.name())
            .env(
                "KUBECONFIG",
                node.config
                    .with_file_name("kubeconfig")
                    .display()
                    .to_string(),
            )
            .start()
    }
}
