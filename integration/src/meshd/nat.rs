//! A NAT lab: node1 (and more with [`NatLab::with_publics`]) is public (198.51.100.11 on the public
//! bridge); every other node `i` sits alone on a
//! LAN (10.0.i.2/24) behind its own router namespace, whose WAN address 198.51.100.(10+i) masquerades
//! the LAN: `Cone` (Linux's default masquerade: the source port is kept when it is free, one mapping
//! whatever the destination) or `Symmetric` (`fully-random`: a new random port per destination). Both
//! routers drop unsolicited inbound traffic (`ct state new` from the WAN), as home routers do. The
//! switch holds 198.51.100.1, where the discovery stand-in listens: NATed nodes learn each other's
//! public address (the Hello address) only through it. Node i's IPv4 mesh address is 10.99.0.i.

use std::net::{Ipv4Addr, SocketAddr};

use super::{MeshNode, PORT};
use crate::discovery::DiscoveryServer;
use crate::{Daemon, DaemonKind, Netns, TestDir, write_atomic};

/// A Talos fixture's identity (`DiscoveryIdentityConfig`).
const CLUSTER_ID: &str = "0raF93qnkMvF-FZNuvyGozXNdLiT2FOWSlyBaW4PR-w=";
const CLUSTER_SECRET: &str = "pofHbABZq7VXuObsdLdy/bHmz6hlMHZ3p8+6WKrv1ic=";

/// A router's masquerading behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    Cone,
    Symmetric,
}

#[derive(Debug)]
pub struct NatLab {
    // Drop order: nodes, routers, the discovery stand-in, the switch.
    pub nodes: Vec<MeshNode>,
    pub routers: Vec<Option<Netns>>,
    pub nats: Vec<Option<Nat>>,
    pub server: DiscoveryServer,
    pub switch: Netns,
    pub dir: TestDir,
}

impl NatLab {
    /// node1 public, then one NATed node per entry of `nats`.
    pub fn new(label: &str, nats: &[Nat]) -> NatLab {
        NatLab::with_publics(label, 1, nats)
    }

    /// `publics` public nodes (node1...), then one NATed node per entry of `nats`.
    pub fn with_publics(label: &str, publics: usize, nats: &[Nat]) -> NatLab {
        let switch = Netns::new();
        switch.ip(&["link", "add", "brpub", "type", "bridge"]);
        switch.ip(&["link", "set", "brpub", "up"]);
        switch.ip(&["addr", "add", "198.51.100.1/24", "dev", "brpub"]);
        let server = DiscoveryServer::start(&switch, SocketAddr::from(([198, 51, 100, 1], 3000)));
        let dir = TestDir::new(label);
        let mut lab = NatLab {
            nodes: Vec::new(),
            routers: Vec::new(),
            nats: Vec::new(),
            server,
            switch,
            dir,
        };
        let kinds: Vec<Option<Nat>> = std::iter::repeat_n(None, publics)
            .chain(nats.iter().copied().map(Some))
            .collect();
        for (k, nat) in kinds.into_iter().enumerate() {
            let index = k as u8 + 1;
            let netns = Netns::new();
            let wan = Ipv4Addr::new(198, 51, 100, 10 + index);
            let router = match nat {
                None => {
                    lab.plug(&netns, index, "pub", wan);
                    None
                }
                Some(kind) => {
                    let r = Netns::new();
                    lab.plug(&r, index, "wan", wan);
                    r.ip(&[
                        "link",
                        "add",
                        "inside",
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "lan",
                        "netns",
                        netns.name(),
                    ]);
                    r.ip(&[
                        "addr",
                        "add",
                        &format!("10.0.{index}.1/24"),
                        "dev",
                        "inside",
                    ]);
                    r.ip(&["link", "set", "inside", "up"]);
                    netns.ip(&["addr", "add", &format!("10.0.{index}.2/24"), "dev", "lan"]);
                    netns.ip(&["link", "set", "lan", "up"]);
                    netns.ip(&["route", "add", "default", "via", &format!("10.0.{index}.1")]);
                    let out = r.exec(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
                    assert!(
                        out.status.success(),
                        "cannot enable forwarding in the router"
                    );
                    let random = if kind == Nat::Symmetric {
                        " fully-random"
                    } else {
                        ""
                    };
                    lab.nft(
                        &r,
                        &format!("router{index}"),
                        &format!(
                            "table ip nat {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
                             oifname \"wan\" masquerade{random}\n  }}\n}}\n\
                             table inet guard {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
                             iifname \"wan\" ct state new drop\n  }}\n}}\n"
                        ),
                    );
                    Some(r)
                }
            };
            lab.nodes
                .push(super::MeshNode::new(index, netns, lab.dir.path()));
            lab.routers.push(router);
            lab.nats.push(nat);
        }
        lab
    }

    fn plug(&self, ns: &Netns, index: u8, name: &str, addr: Ipv4Addr) {
        self.switch.plug(
            "brpub",
            &format!("{name}{index}"),
            ns,
            name,
            &format!("{addr}/24"),
        );
    }

    /// Loads `script` with `nft -f` in `ns` (the file goes in the lab's directory, named after `name`);
    /// fails the test when nft refuses it.
    pub fn nft(&self, ns: &Netns, name: &str, script: &str) {
        let path = self.dir.join(format!("{name}-{}.nft", fastrand_suffix()));
        std::fs::write(&path, script).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let out = ns.exec(&["nft", "-f", &path.to_string_lossy()]);
        assert!(
            out.status.success(),
            "nft in {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The address the world sees for node `i` (its router's WAN address, or its own).
    pub fn wan_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 10 + self.nodes[i].index)
    }

    /// Forwards UDP `PORT` and `PORT + 1` (WireGuard and probes) from node `i`'s router to node `i`.
    pub fn port_forward(&self, i: usize) {
        let index = self.nodes[i].index;
        let Some(r) = &self.routers[i] else {
            panic!("node{index} has no router");
        };
        self.nft(
            r,
            &format!("forward{index}"),
            &format!(
                "table ip forward {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
                 iifname \"wan\" udp dport {{ {PORT}, {} }} dnat to 10.0.{index}.2\n  }}\n}}\n",
                PORT + 1
            ),
        );
    }

    /// Node `i`'s config: no static peers; discovery through the stand-in.
    pub fn write_config(&self, i: usize) {
        let node = &self.nodes[i];
        let doc = format!(
            "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {state}\ndataDir: {data}\nmeshd:\n  \
             interface: hybridnet0\n  backend: userspace\n  listenPort: {PORT}\n  privateKeyFile: {data}/meshd.key\n  \
             addresses: [\"{mesh}/32\"]\n{extra}---\napiVersion: v1alpha1\nkind: DiscoveryIdentityConfig\n\
             clusterID: {CLUSTER_ID}\nclusterSecret: {CLUSTER_SECRET}\n---\napiVersion: v1alpha1\n\
             kind: DiscoveryServiceConfig\nname: lab\nendpoint: {url}\n",
            state = node.state_dir.display(),
            data = node.data_dir.display(),
            mesh = node.mesh_ip(),
            extra = node.extra,
            url = self.server.url(),
        );
        write_atomic(&node.config, doc);
    }

    pub fn start(&self, i: usize) -> Daemon {
        self.write_config(i);
        let node = &self.nodes[i];
        Daemon::builder(DaemonKind::Meshd, &node.netns, &node.config)
            .log_file(node.config.with_file_name("meshd.log"))
            .env("MESHD_NODENAME", node.name())
            .start()
    }

    /// Node `i`'s row for node `j`: (path, via, endpoint, state).
    pub fn path(&self, i: usize, j: usize) -> Result<(String, String, String, String), String> {
        let row = self.nodes[i].peer(&self.nodes[j].name())?;
        let s = |k: &str| row[k].as_str().unwrap_or("-").to_owned();
        Ok((s("path"), s("via"), s("endpoint"), s("state")))
    }
}

fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
