//! Whole scenarios of [`plan`]: full mesh, relays, `allowDownPeerBypass`, KubeSpan compatibility, the
//! location topology with a gateway failing over, and identical prefixes from two peers. No root, no
//! kernel: the desired state is checked resource by resource.

use std::collections::BTreeSet;

use super::*;
use crate::topology::{Node, Pin};
use crate::wg::{Actual, PeerStats};

fn key(i: u8) -> PublicKey {
    PrivateKey([i; 32]).public()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn prefix() -> Ipv6Net {
    "fd00:1::/64".parse().unwrap()
}

/// Peer `i`: mesh address fd00:1::i, pod CIDR 10.244.i.0/24, endpoint 192.0.2.i:51820 (or public
/// 198.51.100.i), up.
fn peer(i: u8, public: bool) -> PeerInput {
    let endpoint = if public {
        ep(&format!("198.51.100.{i}:51820"))
    } else {
        ep(&format!("192.168.0.{i}:51820"))
    };
    PeerInput {
        key: key(i),
        allowed_ips: [
            net(&format!("fd00:1::{i}/128")),
            net(&format!("10.244.{i}.0/24")),
        ]
        .into_iter()
        .collect(),
        public,
        probe_state: PeerState::Up,
        state: PeerState::Up,
        active: Some(endpoint),
        endpoint: Some(endpoint),
        no_uplink: false,
    }
}

fn down(mut p: PeerInput) -> PeerInput {
    p.probe_state = PeerState::Down;
    p.state = PeerState::Down;
    p
}

fn inputs(peers: Vec<PeerInput>) -> Inputs {
    Inputs {
        private_key: PrivateKey([100; 32]),
        interface: "hybridnet0".to_owned(),
        mtu: 1420,
        listen_port: 51820,
        preshared_key: None,
        prefix: prefix(),
        mesh_addr: "fd00:1::100".parse().unwrap(),
        addresses: vec![net("10.99.0.100/32")],
        bypass: false,
        clamp_mss: true,
        own_public: false,
        topology: None,
        peers,
        relay: RelayMode::Auto,
        relays_allowed: Vec::new(),
    }
}

fn routes(d: &Desired) -> Vec<String> {
    d.routes
        .iter()
        .map(|(n, r)| match r {
            Route::Mesh => n.to_string(),
            Route::Via { gateway, .. } => format!("{n} via {gateway}"),
        })
        .collect()
}

fn allowed(d: &Desired, i: u8) -> Vec<String> {
    d.device
        .peers
        .get(&key(i))
        .map(|p| p.allowed_ips.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

/// The device as the kernel would report it after applying `d` (for "a second resync changes nothing").
fn applied(d: &Desired) -> Actual {
    Actual {
        public_key: Some(d.device.private_key.public()),
        listen_port: d.device.listen_port,
        fwmark: d.device.fwmark,
        peers: d
            .device
            .peers
            .iter()
            .map(|(k, c)| (*k, (c.clone(), PeerStats::default())))
            .collect(),
    }
}

#[test]
fn full_mesh_plans_every_resource() {
    let d = plan(&inputs(vec![peer(1, false), peer(2, false)]));
    assert_eq!(d.device.peers.len(), 2);
    assert_eq!(allowed(&d, 1), ["10.244.1.0/24", "fd00:1::1/128"]);
    let p1 = &d.device.peers[&key(1)];
    assert_eq!(p1.endpoint, Some(ep("192.168.0.1:51820")));
    assert_eq!(p1.keepalive, Some(KEEPALIVE));
    assert_eq!(p1.preshared_key, None);
    assert_eq!(d.device.listen_port, 51820);
    assert_eq!(d.device.fwmark, net::FWMARK);
    assert_eq!(
        routes(&d),
        ["10.244.1.0/24", "10.244.2.0/24", "fd00:1::/64"],
        "the mesh /64 and every peer's prefixes outside it"
    );
    let addrs: Vec<String> = d.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(addrs, ["10.99.0.100/32", "fd00:1::100/128"]);
    assert_eq!(d.rules.len(), 2);
    assert!(d.rules.iter().any(|r| r.v6) && d.rules.iter().any(|r| !r.v6));
    assert!(d.rules.iter().all(|r| r.table == net::ROUTE_TABLE
        && r.priority == net::RULE_PRIORITY
        && r.fwmark == net::FWMARK));
    assert_eq!(d.clamp.as_deref(), Some("hybridnet0"));
    assert!(
        !d.forwarding,
        "a private node in a full mesh does not forward"
    );
    assert_eq!(d.mtu, 1420);
    assert_eq!(d.interface, "hybridnet0");
    assert!(d.paths.values().all(|p| *p == PathKind::Direct));
    assert!(d.conflicts.is_empty());
    assert!(d.gateways.is_empty());
    // Applied, the next plan from the same inputs changes nothing.
    assert!(wg::diff(&d.device, &applied(&d)).is_empty());
}

#[test]
fn clamp_off_plans_no_table() {
    let mut i = inputs(vec![peer(1, false)]);
    i.clamp_mss = false;
    assert_eq!(plan(&i).clamp, None);
}

#[test]
fn allow_down_peer_bypass_withdraws_a_down_peers_routes_only() {
    let peers = vec![peer(1, false), down(peer(2, false))];
    let d = plan(&inputs(peers.clone()));
    assert_eq!(
        routes(&d),
        ["10.244.1.0/24", "10.244.2.0/24", "fd00:1::/64"],
        "without bypass a down peer keeps its routes (traffic is dropped, not leaked)"
    );
    let mut i = inputs(peers);
    i.bypass = true;
    let d = plan(&i);
    assert_eq!(
        routes(&d),
        ["10.244.1.0/24", "fd00:1::/64"],
        "with bypass the down peer's prefix takes the underlay"
    );
    assert_eq!(
        allowed(&d, 2),
        ["10.244.2.0/24", "fd00:1::2/128"],
        "the WireGuard peer itself stays"
    );
}

#[test]
fn a_down_peer_goes_through_a_public_peer_that_is_up() {
    // 1 public and up (the relay), 2 private and down, 3 public but down.
    let peers = vec![peer(1, true), down(peer(2, false)), down(peer(3, true))];
    let d = plan(&inputs(peers.clone()));
    assert_eq!(
        d.paths[&key(2)],
        PathKind::Relayed { via: key(1) },
        "relayed through the public peer that is up"
    );
    assert_eq!(allowed(&d, 2), Vec::<String>::new());
    let relay = allowed(&d, 1);
    for n in ["10.244.1.0/24", "10.244.2.0/24", "fd00:1::2/128"] {
        assert!(relay.contains(&n.to_owned()), "{n} rides on the relay");
    }
    assert!(
        routes(&d).contains(&"10.244.2.0/24".to_owned()),
        "a relayed peer is reachable: its routes stay, even with bypass"
    );
    // A public node relays for others and is never relayed itself: it forwards.
    let mut i = inputs(peers.clone());
    i.own_public = true;
    let d = plan(&i);
    assert_eq!(d.paths[&key(2)], PathKind::Direct);
    assert!(d.forwarding, "a public node may relay: forwarding on");

    // `relay: never`: the peer is down (unreachable), nothing moves onto another peer; with bypass its
    // routes are withdrawn.
    let mut i = inputs(peers.clone());
    i.relay = RelayMode::Never;
    i.bypass = true;
    let d = plan(&i);
    assert_eq!(d.paths[&key(2)], PathKind::Direct);
    assert_eq!(allowed(&d, 2), ["10.244.2.0/24", "fd00:1::2/128"]);
    assert!(!allowed(&d, 1).contains(&"10.244.2.0/24".to_owned()));
    assert!(!routes(&d).contains(&"10.244.2.0/24".to_owned()));

    // `relays:` names the allowed relays: one not listed is not used, even when up and public.
    let mut i = inputs(peers.clone());
    i.relays_allowed = vec![key(3)];
    let d = plan(&i);
    assert_eq!(
        d.paths[&key(2)],
        PathKind::Direct,
        "node3 (allowed) is down"
    );

    // Public is what we see, not only what a peer says: a peer that claims a public address but is
    // reached on a private one is no relay.
    let mut claims = peer(1, false);
    claims.public = true;
    let d = plan(&inputs(vec![claims, down(peer(2, false))]));
    assert_eq!(d.paths[&key(2)], PathKind::Direct);
}

#[test]
fn kubespan_compat_puts_the_cluster_secret_on_every_peer() {
    let mut i = inputs(vec![peer(1, false), peer(2, true)]);
    i.preshared_key = Some([7; 32]);
    let d = plan(&i);
    assert!(
        d.device
            .peers
            .values()
            .all(|p| p.preshared_key == Some([7; 32]))
    );
}

/// Location `a`: 1 and 2 public (gateway candidates, 1 first by key order of the test keys), 3 private;
/// location `b`: this node (100, public, the only candidate) and 12 private.
fn locations(me_public: bool) -> (Vec<Node>, Node) {
    let node = |i: u8, loc: &str, endpoints: &[String]| Node {
        key: key(i),
        location: Some(loc.to_owned()),
        pin: Pin::Auto,
        endpoints: endpoints.iter().map(|e| ep(e)).collect(),
    };
    let public = |i: u8| format!("198.51.100.{i}:51820");
    let private = |l: u8, i: u8| format!("192.168.{l}.{i}:51820");
    let peers = vec![
        node(1, "a", &[private(1, 1), public(1)]),
        node(2, "a", &[private(1, 2), public(2)]),
        node(3, "a", &[private(1, 3)]),
        node(12, "b", &[private(2, 12)]),
    ];
    let mut mine = vec![private(2, 100)];
    if me_public {
        mine.push(public(100));
    }
    (peers, node(100, "b", &mine))
}

#[test]
fn location_topology_fails_over_to_the_next_gateway() {
    let (nodes, me) = locations(true);
    let topo = topology::plan(&me, &nodes);
    assert!(topo.candidate);
    let first = topo.candidates["a"][0];
    let second = topo.candidates["a"][1];
    let index = |k: PublicKey| [1u8, 2].into_iter().find(|i| key(*i) == k).unwrap();
    let mut peers = vec![
        peer(1, true),
        peer(2, true),
        peer(3, false),
        peer(12, false),
    ];
    for p in &mut peers {
        // The plan probes what the topology says: active endpoints are the public ones.
        p.active = p.endpoint;
    }
    let mut i = inputs(peers);
    i.own_public = true;
    i.topology = Some(topo);
    let d = plan(&i);
    assert!(d.forwarding, "a gateway candidate forwards");
    assert_eq!(d.gateways["a"], Some(first));
    assert_eq!(d.paths[&key(3)], PathKind::Gateway { via: Some(first) });
    assert!(
        allowed(&d, index(first)).contains(&"10.244.3.0/24".to_owned()),
        "the routed node's prefix rides on the active gateway"
    );
    assert!(!allowed(&d, index(second)).contains(&"10.244.3.0/24".to_owned()));
    assert!(
        !d.device.peers.contains_key(&key(12)),
        "a native peer has no WireGuard peer"
    );
    assert!(matches!(d.paths[&key(12)], PathKind::Native { .. }));
    // The first gateway dies: its location's prefixes move to the second, in place.
    for p in &mut i.peers {
        if p.key == first {
            p.probe_state = PeerState::Down;
            p.state = PeerState::Down;
        }
    }
    let after = plan(&i);
    assert_eq!(after.gateways["a"], Some(second));
    assert_eq!(
        after.paths[&key(3)],
        PathKind::Gateway { via: Some(second) }
    );
    assert!(allowed(&after, index(second)).contains(&"10.244.3.0/24".to_owned()));
    let update = wg::diff(&after.device, &applied(&d));
    assert_eq!(
        update.peers.len(),
        2,
        "failover is two peer updates (old and new gateway), nothing else: {update:?}"
    );
    assert!(after.conflicts.is_empty());
}

#[test]
fn a_private_node_routes_other_locations_via_its_gateway() {
    let (mut nodes, me) = locations(false);
    // This node is private now; 13 is location b's public gateway.
    nodes.push(Node {
        key: key(13),
        location: Some("b".to_owned()),
        pin: Pin::Auto,
        endpoints: vec![ep("192.168.2.13:51820"), ep("198.51.100.13:51820")],
    });
    let topo = topology::plan(&me, &nodes);
    assert!(!topo.candidate);
    let mut i = inputs(vec![
        peer(1, true),
        peer(2, true),
        peer(3, false),
        peer(12, false),
        peer(13, true),
    ]);
    for p in &mut i.peers {
        if p.key == key(13) {
            p.active = Some(ep("192.168.2.13:51820"));
        }
    }
    i.topology = Some(topo);
    let d = plan(&i);
    assert!(
        !d.forwarding,
        "a node that is no gateway candidate does not forward"
    );
    assert!(
        routes(&d).contains(&"10.244.3.0/24 via 192.168.2.13".to_owned()),
        "{:?}",
        routes(&d)
    );
}

#[test]
fn identical_prefixes_go_to_one_peer_deterministically() {
    // A reinstalled node (2, up) and its old record (1, down) both claim 10.244.7.0/24.
    let mut old = down(peer(1, false));
    old.allowed_ips.insert(net("10.244.7.0/24"));
    let mut new = peer(2, false);
    new.allowed_ips.insert(net("10.244.7.0/24"));
    for mode in ["full", "compat", "location"] {
        let mut i = inputs(vec![old.clone(), new.clone()]);
        match mode {
            "compat" => i.preshared_key = Some([7; 32]),
            "location" => {
                let me = Node {
                    key: key(100),
                    location: None,
                    pin: Pin::Auto,
                    endpoints: vec![ep("198.51.100.100:51820")],
                };
                let nodes: Vec<Node> = [1u8, 2]
                    .iter()
                    .map(|n| Node {
                        key: key(*n),
                        location: None,
                        pin: Pin::Auto,
                        endpoints: vec![ep(&format!("198.51.100.{n}:51820"))],
                    })
                    .collect();
                i.topology = Some(topology::plan(&me, &nodes));
            }
            _ => {}
        }
        let d = plan(&i);
        assert!(
            allowed(&d, 2).contains(&"10.244.7.0/24".to_owned()),
            "{mode}: the live peer holds it"
        );
        assert!(
            !allowed(&d, 1).contains(&"10.244.7.0/24".to_owned()),
            "{mode}"
        );
        assert_eq!(
            d.conflicts,
            [Conflict {
                prefix: net("10.244.7.0/24"),
                holder: key(2),
                losers: vec![key(1)],
            }],
            "{mode}: reported"
        );
        // Every resync plans the same, so nothing moves back and forth.
        for _ in 0..3 {
            let again = plan(&i);
            assert!(wg::diff(&again.device, &applied(&d)).is_empty(), "{mode}");
        }
    }
    // Both up: the lowest key holds it, whatever the order of the inputs.
    let mut a = peer(1, false);
    a.allowed_ips.insert(net("10.244.7.0/24"));
    let mut b = peer(2, false);
    b.allowed_ips.insert(net("10.244.7.0/24"));
    let low = if key(1).0 < key(2).0 { key(1) } else { key(2) };
    let one = plan(&inputs(vec![a.clone(), b.clone()]));
    let other = plan(&inputs(vec![b, a]));
    assert_eq!(one.conflicts[0].holder, low);
    assert_eq!(other.conflicts, one.conflicts);
    let holder: BTreeSet<_> = one
        .device
        .peers
        .iter()
        .filter(|(_, c)| c.allowed_ips.contains(&net("10.244.7.0/24")))
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(holder, [low].into_iter().collect());
}
