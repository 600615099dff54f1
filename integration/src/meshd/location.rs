//! A lab of locations for `topology: location`: each location is a LAN (bridge `lan<l>`,
//! 192.168.<l>.0/24), some nodes also sit on the shared "public" bridge (198.51.100.0/24). Node `j` of
//! location `l` has index `10 l + j`, the LAN address 192.168.l.(10 l + j), the public address
//! 198.51.100.(10 l + j) when it is public, and the IPv4 mesh address 10.99.0.(10 l + j). Every node runs
//! meshd (userspace backend) with `topology: location`, `location: loc<l>`, and every other node as a
//! static peer (LAN endpoint first, then the public one) with its location. Nodes filter reverse paths
//! strictly (`rp_filter=1`).

use std::net::Ipv4Addr;

use super::{MeshNode, PORT};
use crate::{Daemon, Netns, TestDir, write_atomic};

/// One node's place in the lab.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub location: u8,
    pub public: bool,
    /// `meshd.gateway` (and the `gateway` of this node's entry in the others' configs), when set.
    pub gateway: Option<&'static str>,
}

/// Locations of nodes, the switch holding their bridges.
#[derive(Debug)]
pub struct LocationLab {
    // Drop order: daemons (held by the test), nodes, then the switch.
    pub nodes: Vec<MeshNode>,
    pub places: Vec<Place>,
    pub switch: Netns,
    pub dir: TestDir,
}

impl LocationLab {
    pub fn new(label: &str) -> LocationLab {
        let switch = Netns::new();
        switch.ip(&["link", "add", "brpub", "type", "bridge"]);
        switch.ip(&["link", "set", "brpub", "up"]);
        LocationLab {
            nodes: Vec::new(),
            places: Vec::new(),
            switch,
            dir: TestDir::new(label),
        }
    }

    pub fn lan_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.places[i].location, self.nodes[i].index)
    }

    pub fn public_ip(&self, i: usize) -> Option<Ipv4Addr> {
        self.places[i]
            .public
            .then(|| Ipv4Addr::new(198, 51, 100, self.nodes[i].index))
    }

    /// The position of the node with index `index`.
    pub fn pos(&self, index: u8) -> usize {
        self.nodes
            .iter()
            .position(|n| n.index == index)
            .unwrap_or_else(|| panic!("no node{index} in the lab"))
    }

    /// Adds location `l` with one node per entry of `public` (whether it has a public address); returns
    /// the positions of the new nodes.
    pub fn add_location(&mut self, l: u8, public: &[bool]) -> Vec<usize> {
        let br = format!("lan{l}");
        self.switch.ip(&["link", "add", &br, "type", "bridge"]);
        self.switch.ip(&["link", "set", &br, "up"]);
        let mut added = Vec::new();
        for (j, &is_public) in public.iter().enumerate() {
            let index = 10 * l + j as u8 + 1;
            let netns = Netns::new();
            // Strict reverse-path filtering (the strictest a distribution sets): the topology must pass it.
            for conf in ["all", "default"] {
                let path = format!("/proc/sys/net/ipv4/conf/{conf}/rp_filter");
                let out = netns.exec(&["sh", "-c", &format!("echo 1 > {path}")]);
                assert!(
                    out.status.success(),
                    "cannot set {path} in the node namespace"
                );
            }
            let mut links = vec![("lan", br.clone(), Ipv4Addr::new(192, 168, l, index))];
            if is_public {
                links.push(("pub", "brpub".into(), Ipv4Addr::new(198, 51, 100, index)));
            }
            for (net, bridge, addr) in links {
                self.switch.plug(
                    &bridge,
                    &format!("{net}{index}"),
                    &netns,
                    net,
                    &format!("{addr}/24"),
                );
            }
            self.nodes
                .push(super::MeshNode::new(index, netns, self.dir.path()));
            self.places.push(Place {
                location: l,
                public: is_public,
                gateway: None,
            });
            added.push(self.nodes.len() - 1);
        }
        added
    }

    /// Node `i`'s config: every other node whose key is known is a peer.
    pub fn render(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let mut peers = String::new();
        for (k, other) in self.nodes.iter().enumerate() {
            if k == i || other.public_key.is_empty() {
                continue;
            }
            let mut endpoints = format!("\"{}:{PORT}\"", self.lan_ip(k));
            if let Some(p) = self.public_ip(k) {
                endpoints.push_str(&format!(", \"{p}:{PORT}\""));
            }
            let pin = self.places[k]
                .gateway
                .map(|g| format!(", gateway: {g}"))
                .unwrap_or_default();
            peers.push_str(&format!(
                "    - {{name: {}, publicKey: \"{}\", endpoints: [{endpoints}], allowedIPs: [\"{}/32\"], location: loc{}{pin}}}\n",
                other.name(),
                other.public_key,
                other.mesh_ip(),
                self.places[k].location,
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
             topology: location\n  location: loc{loc}\n{pin}{peers}{extra}",
            state = node.state_dir.display(),
            data = node.data_dir.display(),
            mesh = node.mesh_ip(),
            loc = self.places[i].location,
            pin = self.places[i]
                .gateway
                .map(|g| format!("  gateway: {g}\n"))
                .unwrap_or_default(),
            extra = node.extra,
        )
    }

    pub fn write_config(&self, i: usize) {
        write_atomic(&self.nodes[i].config, self.render(i));
    }

    pub fn start(&self, i: usize) -> Daemon {
        self.nodes[i].start()
    }

    /// Starts the nodes at `which` (each creates its key), learns their keys, then rewrites every node's
    /// config (applied by reload). Returns the new daemons, in the order of `which`.
    pub fn start_nodes(&mut self, which: &[usize]) -> Vec<Daemon> {
        for &i in which {
            self.write_config(i);
        }
        let mut daemons: Vec<Daemon> = which.iter().map(|&i| self.start(i)).collect();
        for (d, &i) in daemons.iter_mut().zip(which) {
            self.nodes[i].public_key = super::public_key_of(d, &self.nodes[i].state_dir);
        }
        for i in 0..self.nodes.len() {
            self.write_config(i);
        }
        daemons
    }

    /// The name of the active gateway of location `l` as node `i` sees it (`topology.gateways`).
    pub fn gateway_seen_by(&self, i: usize, l: u8) -> Result<String, String> {
        let d = self.nodes[i].details()?;
        d["topology"]["gateways"][format!("loc{l}")]
            .as_str()
            .map(|g| {
                if g == "(this node)" {
                    self.nodes[i].name()
                } else {
                    g.to_owned()
                }
            })
            .ok_or_else(|| {
                format!(
                    "{}: no gateway for loc{l}: {}",
                    self.nodes[i].name(),
                    d["topology"]
                )
            })
    }

    /// `ip route get <dst>` in node `i` (the first line).
    pub fn route_get(&self, i: usize, dst: Ipv4Addr) -> String {
        let out = self.nodes[i]
            .netns
            .exec(&["ip", "route", "get", &dst.to_string()]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// Installs nft counters of ICMP packets leaving node `i` by `lan` and by `hybridnet0` (table
    /// `inet hncount`, replaced if present).
    pub fn count_icmp(&self, i: usize) {
        let script = "table inet hncount\ndelete table inet hncount\ntable inet hncount {\n  chain out {\n    type filter hook output priority 0; policy accept;\n    oifname \"lan\" meta l4proto icmp counter\n    oifname \"hybridnet0\" meta l4proto icmp counter\n  }\n}\n";
        let path = self.dir.join(format!("nft-{}.conf", self.nodes[i].name()));
        std::fs::write(&path, script).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let out = self.nodes[i]
            .netns
            .exec(&["nft", "-f", &path.to_string_lossy()]);
        assert!(
            out.status.success(),
            "nft in {}: {}",
            self.nodes[i].name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The counters [`LocationLab::count_icmp`] installed: (by `lan`, by `hybridnet0`).
    pub fn icmp_counts(&self, i: usize) -> (u64, u64) {
        let out = self.nodes[i]
            .netns
            .exec(&["nft", "list", "chain", "inet", "hncount", "out"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let count = |iface: &str| {
            text.lines()
                .find(|l| l.contains(&format!("oifname \"{iface}\"")))
                .and_then(|l| l.split("packets ").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no counter for {iface} in: {text}"))
        };
        (count("lan"), count("hybridnet0"))
    }

    /// Kills node `i`'s links (the node is gone from every network).
    pub fn unplug(&self, i: usize) {
        for net in ["lan", "pub"] {
            let _ = self.nodes[i]
                .netns
                .exec(&["ip", "link", "set", net, "down"]);
        }
    }
}
