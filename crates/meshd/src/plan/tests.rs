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
        .collect::<BTreeSet<_>>()
        .into(),
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
        private_key: std::sync::Arc::new(PrivateKey([100; 32])),
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
        relay_grants: BTreeMap::new(),
        relay_excluded: BTreeMap::new(),
        trust: trust::Trust::default(),
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
    // End to end: the relayed peer keeps its own AllowedIPs, nothing of it goes onto the relay's peer.
    assert_eq!(allowed(&d, 2), ["10.244.2.0/24", "fd00:1::2/128"]);
    assert_eq!(allowed(&d, 1), ["10.244.1.0/24", "fd00:1::1/128"]);
    // No grant yet: its own endpoint, and (without bypass) its routes as before.
    assert_eq!(
        d.device.peers[&key(2)].endpoint,
        Some(ep("192.168.0.2:51820"))
    );
    // Granted: the endpoint is the relay port.
    let relay_port = ep("198.51.100.1:40001");
    let mut i = inputs(peers.clone());
    i.bypass = true;
    let d = plan(&i);
    assert!(
        !routes(&d).contains(&"10.244.2.0/24".to_owned()),
        "with bypass, a relayed peer without a grant is down: its routes go"
    );
    i.relay_grants = BTreeMap::from([(key(2), (key(1), relay_port))]);
    let d = plan(&i);
    assert_eq!(d.device.peers[&key(2)].endpoint, Some(relay_port));
    assert_eq!(allowed(&d, 2), ["10.244.2.0/24", "fd00:1::2/128"]);
    assert_eq!(allowed(&d, 1), ["10.244.1.0/24", "fd00:1::1/128"]);
    assert_eq!(
        d.device.peers[&key(1)].endpoint,
        Some(ep("198.51.100.1:51820")),
        "the relay's own peer keeps its endpoint"
    );
    assert!(
        routes(&d).contains(&"10.244.2.0/24".to_owned()),
        "a relayed peer with a grant is reachable: its routes stay, even with bypass"
    );
    // A grant from another relay than the plan's is not used.
    i.relay_grants = BTreeMap::from([(key(2), (key(3), relay_port))]);
    let d = plan(&i);
    assert_eq!(
        d.device.peers[&key(2)].endpoint,
        Some(ep("192.168.0.2:51820"))
    );
    // The pair goes direct (the peer is up): the grant is ignored.
    let mut direct = inputs(vec![peer(1, true), peer(2, false)]);
    direct.relay_grants = BTreeMap::from([(key(2), (key(1), relay_port))]);
    let d = plan(&direct);
    assert_eq!(d.paths[&key(2)], PathKind::Direct);
    assert_eq!(
        d.device.peers[&key(2)].endpoint,
        Some(ep("192.168.0.2:51820"))
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
    std::sync::Arc::make_mut(&mut old.allowed_ips).insert(net("10.244.7.0/24"));
    let mut new = peer(2, false);
    std::sync::Arc::make_mut(&mut new.allowed_ips).insert(net("10.244.7.0/24"));
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
    std::sync::Arc::make_mut(&mut a.allowed_ips).insert(net("10.244.7.0/24"));
    let mut b = peer(2, false);
    std::sync::Arc::make_mut(&mut b.allowed_ips).insert(net("10.244.7.0/24"));
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

// === trust: discovered peers' prefixes ===

/// Inputs where every peer is discovered (untrusted) except those in `statics`, with this node's
/// underlay 192.0.2.100/24 (+ 2001:db8:1::100/64), service subnet 10.32.0.0/12, the API endpoint
/// 203.0.113.10, and the defaults /8 and /32.
fn screened(peers: Vec<PeerInput>, statics: &[u8]) -> Inputs {
    let mut i = inputs(peers);
    i.trust.policy = trust::Policy {
        min_v4: 8,
        min_v6: 32,
        underlay: vec![
            net("192.0.2.0/24"),
            net("2001:db8:1::/64"),
            net("10.99.0.100/32"),
        ],
        service_subnets: vec![net("10.32.0.0/12")],
        endpoints: vec!["203.0.113.10".parse().unwrap()],
    };
    for (n, p) in i.peers.iter().enumerate() {
        let idx = p.key;
        let mesh_addr = i
            .peers
            .iter()
            .find(|q| q.key == idx)
            .and_then(|q| {
                q.allowed_ips.iter().find_map(|a| match a {
                    IpNet::V6(v) if v.prefix_len() == 128 && prefix().contains(v) => Some(v.addr()),
                    _ => None,
                })
            })
            .unwrap();
        let trusted = statics.iter().any(|s| key(*s) == idx);
        i.trust.peers.insert(
            idx,
            trust::PeerTrust {
                trusted,
                mesh_addr,
                seniority: n as u64,
                refused: Vec::new(),
                addresses: Vec::new(),
                proven: Vec::new(),
            },
        );
    }
    i
}

fn claims(p: &mut PeerInput, list: &[&str]) {
    for n in list {
        std::sync::Arc::make_mut(&mut p.allowed_ips).insert(net(n));
    }
}

fn refused_of(d: &Desired, k: PublicKey) -> Vec<(String, &'static str)> {
    d.refused
        .iter()
        .filter(|r| r.peer == k)
        .map(|r| (r.prefix.to_string(), r.reason.as_str()))
        .collect()
}

fn wg_allowed(d: &Desired, k: PublicKey) -> BTreeSet<IpNet> {
    (*d.device.peers[&k].allowed_ips).clone()
}

#[test]
fn each_hostile_prefix_is_refused_for_its_reason_and_the_rest_is_used() {
    let mut hostile = peer(1, false);
    let cases = [
        ("0.0.0.0/0", "default-route"),
        ("::/0", "default-route"),
        ("10.0.0.0/7", "too-short"),
        ("2001:db8::/31", "too-short"),
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/64", "link-local"),
        ("224.0.0.0/8", "multicast"),
        ("ff02::/16", "multicast"),
        // The victim's underlay subnet, a neighbour in it, a prefix covering it, its v6 subnet, its own
        // extra mesh address.
        ("192.0.2.0/24", "underlay"),
        ("192.0.2.7/32", "underlay"),
        ("192.0.0.0/16", "underlay"),
        ("2001:db8:1::/48", "underlay"),
        ("10.99.0.100/32", "underlay"),
        ("10.32.0.0/12", "service-subnet"),
        ("10.32.0.10/32", "service-subnet"),
        ("203.0.113.0/24", "endpoint"),
        // Another node's mesh /128, and a prefix covering the mesh.
        ("fd00:1::2/128", "mesh-address"),
        ("fd00:1::100/128", "mesh-address"),
        ("fd00::/16", "mesh-address"),
    ];
    claims(&mut hostile, &cases.map(|(n, _)| n));
    let d = plan(&screened(vec![hostile, peer(2, false)], &[]));
    let mut want: Vec<(String, &str)> = cases
        .iter()
        .map(|(n, r)| (net(n).to_string(), *r))
        .collect();
    want.sort();
    let mut got = refused_of(&d, key(1));
    got.sort();
    assert_eq!(got, want);
    // The legitimate parts of the same record: its own mesh /128 and pod CIDR, in WireGuard and routes.
    assert_eq!(
        wg_allowed(&d, key(1)),
        [net("fd00:1::1/128"), net("10.244.1.0/24")]
            .into_iter()
            .collect()
    );
    assert!(d.routes.contains_key(&net("10.244.1.0/24")));
    for (n, _) in cases {
        assert!(!d.routes.contains_key(&net(n)), "{n} routed");
    }
    // The victim's mesh address and the other peer's stay where they were.
    assert_eq!(
        wg_allowed(&d, key(2)),
        [net("fd00:1::2/128"), net("10.244.2.0/24")]
            .into_iter()
            .collect()
    );
    assert!(d.conflicts.is_empty());
}

#[test]
fn the_minimum_prefix_length_is_configurable() {
    let mut p = peer(1, false);
    claims(&mut p, &["10.128.0.0/9", "2001:db8:40::/42"]);
    let mut i = screened(vec![p], &[]);
    let d = plan(&i);
    assert!(d.refused.is_empty(), "{:?}", d.refused);
    i.trust.policy.min_v4 = 16;
    i.trust.policy.min_v6 = 48;
    let d = plan(&i);
    let mut got = refused_of(&d, key(1));
    got.sort();
    assert_eq!(
        got,
        vec![
            ("10.128.0.0/9".to_owned(), "too-short"),
            ("2001:db8:40::/42".to_owned(), "too-short")
        ]
    );
}

#[test]
fn static_peers_are_trusted_and_their_prefixes_protected() {
    let mut op = peer(1, false);
    claims(&mut op, &["0.0.0.0/0", "192.0.2.0/24"]);
    let mut hostile = peer(2, false);
    claims(&mut hostile, &["10.244.1.128/25"]);
    let d = plan(&screened(vec![op, hostile], &[1]));
    assert!(
        refused_of(&d, key(1)).is_empty(),
        "operator config is trusted"
    );
    assert!(wg_allowed(&d, key(1)).contains(&net("0.0.0.0/0")));
    assert_eq!(
        refused_of(&d, key(2)),
        vec![("10.244.1.128/25".to_owned(), "static-peer")]
    );
}

#[test]
fn a_mesh_address_claim_goes_to_its_first_holder_only() {
    // KubeSpan-compatible mode: addresses are announced. Peer 2 (seen first) holds fd00:1::2; peer 3,
    // seen later, claims it too (a hostile kubespan-ip), whatever its key or state.
    let mut late = peer(3, false);
    late.allowed_ips = [net("fd00:1::2/128"), net("10.244.3.0/24")]
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into();
    let mut i = screened(vec![peer(2, false), late], &[]);
    let d = plan(&i);
    assert_eq!(
        refused_of(&d, key(3)),
        vec![("fd00:1::2/128".to_owned(), "mesh-address")]
    );
    assert!(wg_allowed(&d, key(2)).contains(&net("fd00:1::2/128")));
    assert_eq!(
        wg_allowed(&d, key(3)),
        [net("10.244.3.0/24")].into_iter().collect()
    );
    // Reversed seniority: the other way round.
    for t in i.trust.peers.values_mut() {
        t.seniority = 10 - t.seniority;
    }
    let d = plan(&i);
    assert_eq!(
        refused_of(&d, key(2)),
        vec![("fd00:1::2/128".to_owned(), "mesh-address")]
    );
    // An address outside the mesh prefix, or this node's own, is owned by nobody.
    let mut i = screened(vec![peer(4, false)], &[]);
    i.peers[0].allowed_ips = [net("2001:db8:9::4/128")]
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into();
    i.trust.peers.get_mut(&key(4)).unwrap().mesh_addr = "2001:db8:9::4".parse().unwrap();
    assert_eq!(
        refused_of(&plan(&i), key(4)),
        vec![("2001:db8:9::4/128".to_owned(), "mesh-address")]
    );
    i.trust.peers.get_mut(&key(4)).unwrap().mesh_addr = "fd00:1::100".parse().unwrap();
    i.peers[0].allowed_ips = [net("fd00:1::100/128")]
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into();
    assert_eq!(
        refused_of(&plan(&i), key(4)),
        vec![("fd00:1::100/128".to_owned(), "mesh-address")]
    );
}

#[test]
fn what_a_source_refused_is_reported_with_the_rest() {
    let mut i = screened(vec![peer(1, false)], &[]);
    i.trust.peers.get_mut(&key(1)).unwrap().refused =
        vec![(net("10.250.0.0/16"), trust::Reason::OutsidePodCidrs)];
    let d = plan(&i);
    assert_eq!(
        refused_of(&d, key(1)),
        vec![("10.250.0.0/16".to_owned(), "outside-pod-cidrs")]
    );
    assert_eq!(
        wg_allowed(&d, key(1)),
        [net("fd00:1::1/128"), net("10.244.1.0/24")]
            .into_iter()
            .collect()
    );
}

#[test]
fn the_private_key_is_shared_not_copied() {
    let i = screened(vec![peer(1, false)], &[]);
    let d = plan(&i);
    assert!(std::sync::Arc::ptr_eq(
        &d.device.private_key,
        &i.private_key
    ));
}

#[test]
fn a_node_address_in_the_underlay_is_routed_once_proven() {
    // KubeSpan-compatible mode: Talos routes a peer's node addresses through the mesh. One in this
    // node's subnet is a claim on a neighbour: refused until the peer proved to be there (probes, or a
    // handshake), and this node's own address never.
    let mut p = peer(1, false);
    claims(&mut p, &["192.0.2.7/32", "192.0.2.8/32", "192.0.2.100/32"]);
    let mut i = screened(vec![p], &[]);
    i.trust.policy.underlay.push(net("192.0.2.100/32"));
    let t = i.trust.peers.get_mut(&key(1)).unwrap();
    t.addresses = ["192.0.2.7", "192.0.2.100"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let mut got = refused_of(&plan(&i), key(1));
    got.sort();
    assert_eq!(
        got,
        vec![
            ("192.0.2.100/32".to_owned(), "underlay"),
            ("192.0.2.7/32".to_owned(), "unproven-address"),
            ("192.0.2.8/32".to_owned(), "underlay"),
        ]
    );
    i.trust.peers.get_mut(&key(1)).unwrap().proven = ["192.0.2.7", "192.0.2.100"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let d = plan(&i);
    let mut got = refused_of(&d, key(1));
    got.sort();
    assert_eq!(
        got,
        vec![
            ("192.0.2.100/32".to_owned(), "underlay"),
            ("192.0.2.8/32".to_owned(), "underlay"),
        ]
    );
    assert!(wg_allowed(&d, key(1)).contains(&net("192.0.2.7/32")));
    assert!(d.routes.contains_key(&net("192.0.2.7/32")));
}

/// `cargo test --profile lab -p hybridnet-meshd --lib plan::tests::bench_plan -- --ignored --nocapture`:
/// how long planning and the device diff take for one change among 1,000 and 5,000 peers (the part of a
/// change-triggered reconcile that stays O(peers): it is pure, and must stay a small share of 50 ms).
#[test]
#[ignore = "benchmark"]
#[allow(clippy::print_stdout)]
fn bench_plan() {
    for n in [1000u32, 5000] {
        let peers: Vec<PeerInput> = (0..n)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                k[31] = 0x42;
                let endpoint = ep(&format!("203.0.113.{}:51821", 1 + i % 250));
                PeerInput {
                    key: PublicKey(k),
                    allowed_ips: [
                        net(&format!("fd00:1::{:x}/128", i + 1)),
                        net(&format!(
                            "10.{}.{}.{}/32",
                            200 + i / 65536,
                            (i / 256) % 256,
                            i % 256
                        )),
                    ]
                    .into_iter()
                    .collect::<BTreeSet<_>>()
                    .into(),
                    public: true,
                    probe_state: PeerState::Down,
                    state: PeerState::Down,
                    active: None,
                    endpoint: Some(endpoint),
                    no_uplink: false,
                }
            })
            .collect();
        let inputs = inputs(peers);
        let known = applied(&plan(&inputs));
        let rounds = 20u32;
        let mut changed = inputs.clone();
        changed.peers[7].endpoint = Some(ep("203.0.113.8:51999"));
        let started = std::time::Instant::now();
        let mut ops = 0;
        for _ in 0..rounds {
            let copy = changed.clone();
            let d = plan(&copy);
            ops = crate::wg::diff(&d.device, &known).peers.len();
        }
        let each = started.elapsed() / rounds;
        assert_eq!(ops, 1);
        println!("BENCH plan_and_diff_{n}_ms {:.1}", each.as_secs_f64() * 1e3);
    }
}

/// Home labs behind symmetric NATs: this node (100) alone in location `a`, node 11 in `b` with 12 behind
/// it (pinned `never`: routed through 11), node 21 and 22 public in `c` (relays). No public node in `a`
/// or `b`: 100 and 11 are their locations' gateways, and no direct path joins them.
fn home_labs() -> Inputs {
    let node = |i: u8, loc: &str, pin: Pin, endpoint: &str| Node {
        key: key(i),
        location: Some(loc.to_owned()),
        pin,
        endpoints: vec![ep(endpoint)],
    };
    let me = node(100, "a", Pin::Auto, "192.168.1.100:51820");
    let nodes = vec![
        node(11, "b", Pin::Auto, "192.168.2.11:51820"),
        node(12, "b", Pin::Never, "192.168.2.12:51820"),
        node(21, "c", Pin::Auto, "198.51.100.21:51820"),
        node(22, "c", Pin::Auto, "198.51.100.22:51820"),
    ];
    let topo = topology::plan(&me, &nodes);
    assert!(topo.candidate);
    let mut peers = vec![
        down(peer(11, false)),
        down(peer(12, false)),
        peer(21, true),
        peer(22, true),
    ];
    for p in &mut peers {
        p.active = p.endpoint.filter(|_| p.public);
    }
    let mut i = inputs(peers);
    i.topology = Some(topo);
    i
}

#[test]
fn location_topology_relays_the_pair_of_gateways_end_to_end() {
    let mut i = home_labs();
    i.bypass = true;
    let d = plan(&i);
    let relay = match d.paths[&key(11)] {
        PathKind::Relayed { via } => via,
        ref other => panic!("the remote gateway is relayed: {other:?}"),
    };
    assert!(relay == key(21) || relay == key(22));
    let other = if relay == key(21) { key(22) } else { key(21) };
    // The routed node behind it is never relayed itself: it rides on its gateway.
    assert!(matches!(d.paths[&key(12)], PathKind::Gateway { .. }));
    // No grant yet: b has no gateway, and with bypass nothing of b is routed.
    assert_eq!(d.gateways["b"], None);
    assert!(!routes(&d).contains(&"10.244.12.0/24".to_owned()));
    // Granted: 11 holds b; its own WireGuard peer (endpoint: the relay port) carries 12's prefixes, end to
    // end; the relay's peer holds nothing of b.
    let relay_port = ep("198.51.100.21:40001");
    i.relay_grants = BTreeMap::from([(key(11), (relay, relay_port))]);
    let d = plan(&i);
    assert_eq!(d.gateways["b"], Some(key(11)));
    assert_eq!(d.device.peers[&key(11)].endpoint, Some(relay_port));
    assert_eq!(
        allowed(&d, 11),
        [
            "10.244.11.0/24",
            "10.244.12.0/24",
            "fd00:1::11/128",
            "fd00:1::12/128"
        ]
    );
    let relay_i = if relay == key(21) { 21 } else { 22 };
    assert_eq!(
        allowed(&d, relay_i),
        [
            format!("10.244.{relay_i}.0/24"),
            format!("fd00:1::{relay_i}/128")
        ]
    );
    assert!(routes(&d).contains(&"10.244.12.0/24".to_owned()));
    assert!(routes(&d).contains(&"10.244.11.0/24".to_owned()));
    // The relayed path through it died (no grant endpoint any more, the relay excluded for the pair):
    // the pair moves to the other relay.
    i.relay_grants.clear();
    i.relay_excluded = BTreeMap::from([(key(11), BTreeSet::from([relay]))]);
    let d = plan(&i);
    assert_eq!(d.paths[&key(11)], PathKind::Relayed { via: other });
    assert_eq!(d.gateways["b"], None, "until the new relay grants");
    // Every relay excluded: the gateway is down (reported, routes withdrawn with bypass).
    i.relay_excluded = BTreeMap::from([(key(11), BTreeSet::from([relay, other]))]);
    let d = plan(&i);
    assert_eq!(d.paths[&key(11)], PathKind::Direct);
    assert!(!routes(&d).contains(&"10.244.12.0/24".to_owned()));
    // `relay: never`: not relayed either.
    let mut never = home_labs();
    never.relay = RelayMode::Never;
    let d = plan(&never);
    assert_eq!(d.paths[&key(11)], PathKind::Direct);
    // A public node (here: a gateway with a public address) is never relayed.
    let mut public = home_labs();
    public.own_public = true;
    assert_eq!(plan(&public).paths[&key(11)], PathKind::Direct);
}
