//! The topology under simulated liveness: two (then three) locations, gateways dying and coming back.

use super::*;

fn key(i: u8) -> PublicKey {
    PublicKey([i; 32])
}

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn node(i: u8, loc: &str, pin: Pin, endpoints: &[&str]) -> Node {
    Node {
        key: key(i),
        location: (!loc.is_empty()).then(|| loc.to_owned()),
        pin,
        endpoints: endpoints.iter().map(|e| ep(e)).collect(),
    }
}

/// Location A: 1 and 2 public, 3 private; location B: 11 public, 12 and 13 private. Keys order 1 < 2.
fn lab() -> Vec<Node> {
    vec![
        node(
            1,
            "a",
            Pin::Auto,
            &["192.168.1.1:51821", "198.51.100.1:51821"],
        ),
        node(
            2,
            "a",
            Pin::Auto,
            &["192.168.1.2:51821", "198.51.100.2:51821"],
        ),
        node(3, "a", Pin::Auto, &["192.168.1.3:51821"]),
        node(
            11,
            "b",
            Pin::Auto,
            &["192.168.2.11:51821", "198.51.100.11:51821"],
        ),
        node(12, "b", Pin::Auto, &["192.168.2.12:51821"]),
        node(13, "b", Pin::Auto, &["192.168.2.13:51821"]),
    ]
}

fn plan_of(nodes: &[Node], me: u8) -> Plan {
    let me_node = nodes.iter().find(|n| n.key == key(me)).unwrap();
    plan(me_node, nodes)
}

/// Each node's addresses: 10.99.0.i/32 and its ULA /128.
fn addrs(i: u8) -> BTreeSet<IpNet> {
    [
        format!("10.99.0.{i}/32").parse().unwrap(),
        format!("fd00::{i}/128").parse().unwrap(),
    ]
    .into_iter()
    .collect()
}

fn none(_: &PublicKey, _: &PublicKey) -> bool {
    false
}

struct World {
    addrs: BTreeMap<PublicKey, BTreeSet<IpNet>>,
    states: BTreeMap<PublicKey, PeerState>,
    no_uplink: BTreeSet<PublicKey>,
    /// Relayed peers: the relay, and whether the relayed path is up.
    relayed: BTreeMap<PublicKey, (PublicKey, bool)>,
}

impl World {
    fn new(nodes: &[Node]) -> World {
        World {
            addrs: nodes.iter().map(|n| (n.key, addrs(n.key.0[0]))).collect(),
            states: nodes.iter().map(|n| (n.key, PeerState::Up)).collect(),
            no_uplink: BTreeSet::new(),
            relayed: BTreeMap::new(),
        }
    }

    fn layout(&self, nodes: &[Node], me: u8) -> Layout {
        let plan = plan_of(nodes, me);
        let live = plan
            .peers
            .iter()
            .map(|(k, p)| {
                let state = if p.probe.is_empty() {
                    PeerState::Unknown
                } else {
                    self.states[k]
                };
                (
                    *k,
                    Live {
                        state,
                        active: p.probe.first().copied(),
                        allowed: &self.addrs[k],
                        no_uplink: self.no_uplink.contains(k),
                        relay: self.relayed.get(k).map(|r| r.0),
                        relay_up: self.relayed.get(k).is_some_and(|r| r.1),
                    },
                )
            })
            .collect();
        layout(
            &key(me),
            &plan,
            &live,
            "fd00::/64".parse().unwrap(),
            Sources {
                v4: Some(format!("10.99.0.{me}").parse().unwrap()),
                v6: None,
            },
            false,
        )
    }
}

fn via(gw: &str, me: u8) -> Route {
    Route::Via {
        gateway: gw.parse().unwrap(),
        src: Some(format!("10.99.0.{me}").parse().unwrap()),
    }
}

#[test]
fn relays_only_down_peers_of_a_natted_node_through_a_live_candidate() {
    let v = |i: u8, candidate: bool, state: PeerState| RelayView {
        key: key(i),
        candidate,
        state,
        pair_secret: (state == PeerState::Down).then_some([i; 32]),
    };
    let peers = [
        v(1, true, PeerState::Down),
        v(2, true, PeerState::Up),
        v(3, true, PeerState::Up),
        v(4, false, PeerState::Down),
        v(5, false, PeerState::Up),
        v(6, false, PeerState::Unknown),
    ];
    let r = relays(false, &peers, none);
    // 1 is down (a public node can be unreachable too), 4 is down; 6 is still being probed. Each goes
    // through the live candidate ranked first for its pair (2 or 3), never through a non-candidate.
    assert_eq!(r.keys().copied().collect::<Vec<_>>(), {
        let mut k = vec![key(1), key(4)];
        k.sort();
        k
    });
    for (peer, relay) in &r {
        let secret = peers
            .iter()
            .find(|p| p.key == *peer)
            .unwrap()
            .pair_secret
            .unwrap();
        let best = [key(2), key(3)]
            .into_iter()
            .max_by_key(|k| (relay_score(&secret, k), k.0))
            .unwrap();
        assert_eq!(*relay, best);
    }
    // A public node never relays: NATed peers reach it.
    assert!(relays(true, &peers, none).is_empty());
    // No live candidate: nothing to relay through.
    let lone = [v(2, true, PeerState::Down), v(4, false, PeerState::Down)];
    assert!(relays(false, &lone, none).is_empty());
    // The direct path comes back: the peer leaves the relay.
    let back = [v(2, true, PeerState::Up), v(4, false, PeerState::Up)];
    assert!(relays(false, &back, none).is_empty());
    // The relay itself dies: another candidate takes over.
    let next = [
        v(2, true, PeerState::Down),
        v(3, true, PeerState::Up),
        v(4, false, PeerState::Down),
    ];
    assert_eq!(
        relays(false, &next, none),
        [(key(2), key(3)), (key(4), key(3))].into_iter().collect()
    );
}

#[test]
fn relay_choice_is_per_pair_and_not_won_by_the_smallest_key() {
    // 8 candidates, 200 pairs (secrets): every candidate relays some pairs; the smallest key does not
    // win them all (as "the first by key" did).
    let candidates: Vec<PublicKey> = (1..=8).map(key).collect();
    let smallest = *candidates.iter().min().unwrap();
    let mut wins = std::collections::BTreeMap::<PublicKey, usize>::new();
    for pair in 0..200u16 {
        let mut secret = [0u8; 32];
        secret[..2].copy_from_slice(&pair.to_be_bytes());
        let best = candidates
            .iter()
            .max_by_key(|k| (relay_score(&secret, k), k.0))
            .unwrap();
        *wins.entry(*best).or_default() += 1;
    }
    assert_eq!(wins.len(), 8, "every candidate relays some pairs: {wins:?}");
    assert!(wins[&smallest] < 60, "{wins:?}");
    // The same secret ranks the same way on both ends of the pair (the score takes nothing else).
    assert_eq!(
        relay_score(&[9; 32], &key(3)),
        relay_score(&[9; 32], &key(3))
    );
    assert_ne!(
        relay_score(&[9; 32], &key(3)),
        relay_score(&[8; 32], &key(3))
    );
}

#[test]
fn nat_kinds_from_observed_addresses() {
    let own: Vec<IpAddr> = vec!["10.0.1.2".parse().unwrap()];
    let seen = |list: &[&str]| list.iter().map(|a| ep(a)).collect::<Vec<_>>();
    let k = |list: &[&str]| nat(&own, 51822, &seen(list));
    assert_eq!(k(&[]).kind, NatKind::Unknown);
    // Observations at private addresses (a LAN neighbour) say nothing.
    assert_eq!(k(&["10.0.1.3:51822"]).kind, NatKind::Unknown);
    let p = k(&["198.51.100.21:51822", "198.51.100.21:51822"]);
    assert_eq!(p.kind, NatKind::Preserving);
    assert_eq!(
        p.reflexive,
        vec!["198.51.100.21".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(k(&["198.51.100.21:40000"]).kind, NatKind::Changing);
    assert_eq!(
        k(&["198.51.100.21:40000", "198.51.100.21:40000"]).kind,
        NatKind::Changing
    );
    assert_eq!(
        k(&["198.51.100.21:40000", "198.51.100.21:40001"]).kind,
        NatKind::Symmetric
    );
    assert_eq!(
        k(&["198.51.100.21:51822", "198.51.100.21:40001"]).kind,
        NatKind::Symmetric
    );
    // A public node sees itself: no NAT, nothing reflexive.
    let own: Vec<IpAddr> = vec!["198.51.100.11".parse().unwrap()];
    let n = nat(&own, 51822, &seen(&["198.51.100.11:51822"]));
    assert_eq!(n.kind, NatKind::None);
    assert!(n.reflexive.is_empty());
}

#[test]
fn public_addresses() {
    for ip in ["198.51.100.1", "203.0.113.7", "2001:db8::1", "8.8.8.8"] {
        assert!(is_public(ip.parse().unwrap()), "{ip}");
    }
    for ip in [
        "192.168.1.1",
        "10.0.0.1",
        "172.16.5.1",
        "100.64.1.1",
        "169.254.1.1",
        "fd00::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "127.0.0.1",
    ] {
        assert!(!is_public(ip.parse().unwrap()), "{ip}");
    }
}

#[test]
fn plan_from_a_private_node_and_from_a_gateway() {
    let nodes = lab();
    let p = plan_of(&nodes, 3);
    assert!(!p.candidate);
    assert_eq!(p.candidates["a"], vec![key(1), key(2)]);
    assert_eq!(p.candidates["b"], vec![key(11)]);
    assert_eq!(p.peers[&key(1)].role, Role::Native);
    assert_eq!(p.peers[&key(1)].probe, vec![ep("192.168.1.1:51821")]);
    for k in [11, 12, 13] {
        assert_eq!(p.peers[&key(k)].role, Role::Routed, "{k}");
        assert!(
            p.peers[&key(k)].probe.is_empty(),
            "a private node never probes other locations"
        );
    }
    let p = plan_of(&nodes, 1);
    assert!(p.candidate);
    assert_eq!(p.peers[&key(2)].role, Role::Native);
    assert_eq!(p.peers[&key(3)].role, Role::Native);
    assert_eq!(p.peers[&key(11)].role, Role::Direct);
    assert_eq!(p.peers[&key(11)].probe.len(), 2);
    assert_eq!(p.peers[&key(12)].role, Role::Routed);
    // The standby candidate meshes with the other location's candidates too.
    assert_eq!(plan_of(&nodes, 2).peers[&key(11)].role, Role::Direct);
    // Every node computes the same candidate order.
    for me in [1, 2, 3, 11, 12, 13] {
        assert_eq!(plan_of(&nodes, me).candidates, p.candidates, "{me}");
    }
}

#[test]
fn pins_lone_nodes_and_nodes_without_location() {
    let mut nodes = lab();
    nodes[2].pin = Pin::Always; // 3: private but pinned: first
    nodes[0].pin = Pin::Never; // 1: public but never
    let p = plan_of(&nodes, 12);
    assert_eq!(p.candidates["a"], vec![key(3), key(2)]);
    // A location without a public node: every node not pinned `never` is a candidate.
    let nodes = vec![
        node(1, "home", Pin::Auto, &["192.168.1.1:51821"]),
        node(2, "home", Pin::Never, &["192.168.1.2:51821"]),
        node(5, "home", Pin::Auto, &["192.168.1.5:51821"]),
        node(11, "cloud", Pin::Auto, &["198.51.100.11:51821"]),
        node(20, "", Pin::Auto, &["10.1.1.20:51821"]),
    ];
    let p = plan_of(&nodes, 11);
    assert_eq!(p.candidates["home"], vec![key(1), key(5)]);
    assert_eq!(p.peers[&key(1)].role, Role::Direct);
    assert_eq!(p.peers[&key(2)].role, Role::Routed);
    // A node without a location is its own location (and its own gateway).
    let own = format!("node:{}", key(20));
    assert_eq!(p.candidates[&own], vec![key(20)]);
    assert_eq!(p.peers[&key(20)].role, Role::Direct);
    // Same location without a private endpoint: a WireGuard peer.
    let nodes = vec![
        node(1, "x", Pin::Auto, &["198.51.100.1:51821"]),
        node(2, "x", Pin::Auto, &["198.51.100.2:51821"]),
    ];
    assert_eq!(plan_of(&nodes, 1).peers[&key(2)].role, Role::Direct);
}

#[test]
fn layout_of_a_gateway_and_of_a_private_node() {
    let nodes = lab();
    let w = World::new(&nodes);
    // Gateway 1: natives via their private address, B's private nodes on B's gateway's WireGuard peer.
    let l = w.layout(&nodes, 1);
    assert_eq!(l.gateways["a"], Some(key(1)));
    assert_eq!(l.gateways["b"], Some(key(11)));
    assert_eq!(
        l.wireguard.keys().copied().collect::<Vec<_>>(),
        vec![key(11)]
    );
    let mut want = addrs(11);
    want.extend(addrs(12));
    want.extend(addrs(13));
    assert_eq!(l.wireguard[&key(11)], want);
    assert_eq!(
        l.routes[&"10.99.0.3/32".parse().unwrap()],
        via("192.168.1.3", 1)
    );
    assert_eq!(l.routes[&"10.99.0.12/32".parse().unwrap()], Route::Mesh);
    assert!(
        !l.routes.contains_key(&"fd00::3/128".parse().unwrap()),
        "no IPv6 route via an IPv4 next hop"
    );
    assert_eq!(
        l.paths[&key(2)],
        PathKind::Native {
            via: "192.168.1.2".parse().unwrap()
        }
    );
    assert_eq!(l.paths[&key(11)], PathKind::Direct);
    assert_eq!(l.paths[&key(13)], PathKind::Gateway { via: Some(key(11)) });
    // Private node 3: everything remote via its gateway 1, nothing on WireGuard.
    let l = w.layout(&nodes, 3);
    assert!(l.wireguard.is_empty());
    for k in [11, 12, 13] {
        assert_eq!(
            l.routes[&format!("10.99.0.{k}/32").parse().unwrap()],
            via("192.168.1.1", 3)
        );
        assert_eq!(l.paths[&key(k)], PathKind::Gateway { via: Some(key(1)) });
    }
    assert_eq!(
        l.routes[&"10.99.0.2/32".parse().unwrap()],
        via("192.168.1.2", 3)
    );
    assert_eq!(
        l.gateways["b"], None,
        "a private node does not know B's liveness"
    );
}

#[test]
fn gateway_failover_moves_only_what_it_must() {
    let nodes = lab();
    let mut w = World::new(&nodes);
    let before3 = w.layout(&nodes, 3);
    let before11 = w.layout(&nodes, 11);
    let before12 = w.layout(&nodes, 12);
    w.states.insert(key(1), PeerState::Down);
    // Private node 3: the remote routes move to 2, one replace each; nothing else changes.
    let after3 = w.layout(&nodes, 3);
    let changed: Vec<_> = after3
        .routes
        .iter()
        .filter(|(n, r)| before3.routes.get(n) != Some(r))
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(
        changed,
        vec!["10.99.0.11/32", "10.99.0.12/32", "10.99.0.13/32"]
    );
    // Node 1's own address stays routed natively (it is dead; the route costs nothing and is right when
    // it comes back).
    assert_eq!(
        after3.routes[&"10.99.0.1/32".parse().unwrap()],
        via("192.168.1.1", 3)
    );
    assert_eq!(after3.gateways["a"], Some(key(2)));
    // Gateway 11 of B: 3's addresses move from 1's peer to 2's, in place; 1 and 2 stay peers.
    let after11 = w.layout(&nodes, 11);
    assert_eq!(before11.wireguard[&key(1)].len(), 4);
    assert_eq!(after11.wireguard[&key(1)], addrs(1));
    let mut two = addrs(2);
    two.extend(addrs(3));
    assert_eq!(after11.wireguard[&key(2)], two);
    assert_eq!(
        after11.paths[&key(3)],
        PathKind::Gateway { via: Some(key(2)) }
    );
    // B's private node 12 is not affected at all.
    assert_eq!(w.layout(&nodes, 12), before12);
    // 1 comes back: everything returns to the first layout.
    w.states.insert(key(1), PeerState::Up);
    assert_eq!(w.layout(&nodes, 3), before3);
    assert_eq!(w.layout(&nodes, 11), before11);
    // No gateway alive: A's private nodes lose the remote routes (no black hole via a dead node).
    w.states.insert(key(1), PeerState::Down);
    w.states.insert(key(2), PeerState::Down);
    let l = w.layout(&nodes, 3);
    assert_eq!(l.gateways["a"], None);
    assert!(!l.routes.contains_key(&"10.99.0.12/32".parse().unwrap()));
    assert_eq!(l.paths[&key(12)], PathKind::Gateway { via: None });
}

#[test]
fn a_gateway_without_uplink_is_passed_over_while_another_has_one() {
    let nodes = lab();
    let mut w = World::new(&nodes);
    let before = w.layout(&nodes, 3);
    // Node 1 is up on the LAN but reaches no other location: private node 3 moves to node 2.
    w.no_uplink.insert(key(1));
    let l = w.layout(&nodes, 3);
    assert_eq!(l.gateways["a"], Some(key(2)));
    assert_eq!(
        l.routes[&"10.99.0.12/32".parse().unwrap()],
        via("192.168.1.2", 3)
    );
    // Node 1 stays a native neighbour.
    assert_eq!(
        l.routes[&"10.99.0.1/32".parse().unwrap()],
        via("192.168.1.1", 3)
    );
    // Both without uplink: the first one up after all (nothing better).
    w.no_uplink.insert(key(2));
    assert_eq!(w.layout(&nodes, 3).gateways["a"], Some(key(1)));
    // The uplink comes back: back to node 1.
    w.no_uplink.clear();
    assert_eq!(w.layout(&nodes, 3), before);
}

#[test]
fn start_up_picks_the_first_candidate_not_known_down() {
    let nodes = lab();
    let mut w = World::new(&nodes);
    for s in w.states.values_mut() {
        *s = PeerState::Unknown;
    }
    assert_eq!(w.layout(&nodes, 3).gateways["a"], Some(key(1)));
    w.states.insert(key(1), PeerState::Down);
    assert_eq!(w.layout(&nodes, 3).gateways["a"], Some(key(2)));
    // A candidate counts itself as up in its own location.
    assert_eq!(w.layout(&nodes, 2).gateways["a"], Some(key(2)));
}

#[test]
fn a_third_location_leaves_the_others_alone() {
    let nodes = lab();
    let w = World::new(&nodes);
    let before1 = w.layout(&nodes, 1);
    let before3 = w.layout(&nodes, 3);
    let mut more = nodes.clone();
    more.push(node(
        21,
        "c",
        Pin::Auto,
        &["192.168.3.21:51821", "198.51.100.21:51821"],
    ));
    more.push(node(22, "c", Pin::Auto, &["192.168.3.22:51821"]));
    let w = World::new(&more);
    let after1 = w.layout(&more, 1);
    for (k, allowed) in &before1.wireguard {
        assert_eq!(&after1.wireguard[k], allowed, "existing peers untouched");
    }
    let mut c = addrs(21);
    c.extend(addrs(22));
    assert_eq!(after1.wireguard[&key(21)], c);
    for (n, r) in &before1.routes {
        assert_eq!(after1.routes.get(n), Some(r));
    }
    let after3 = w.layout(&more, 3);
    for (n, r) in &before3.routes {
        assert_eq!(after3.routes.get(n), Some(r));
    }
    assert_eq!(
        after3.routes[&"10.99.0.22/32".parse().unwrap()],
        via("192.168.1.1", 3)
    );
    assert_eq!(after1.gateways["c"], Some(key(21)));
}

/// Home labs behind symmetric NATs: location a (1, 3), location b (11, and 12 pinned `never`), each
/// without a public node (all but 12 are candidates); location c: 21, public (a relay).
fn home_labs() -> Vec<Node> {
    vec![
        node(1, "a", Pin::Auto, &["192.168.1.1:51821"]),
        node(3, "a", Pin::Auto, &["192.168.1.3:51821"]),
        node(11, "b", Pin::Auto, &["192.168.2.11:51821"]),
        node(12, "b", Pin::Never, &["192.168.2.12:51821"]),
        node(21, "c", Pin::Auto, &["198.51.100.21:51821"]),
    ]
}

#[test]
fn a_remote_gateway_reached_through_a_relay_holds_its_location() {
    let nodes = home_labs();
    let plan = plan_of(&nodes, 1);
    assert!(plan.candidate);
    // The gateways of a and b are direct peers of each other (and of the relay's location).
    assert_eq!(plan.peers[&key(11)].role, Role::Direct);
    assert_eq!(plan.peers[&key(21)].role, Role::Direct);
    assert_eq!(plan.peers[&key(12)].role, Role::Routed);
    let mut w = World::new(&nodes);
    // No direct path between the two NATed gateways.
    w.states.insert(key(11), PeerState::Down);
    let l = w.layout(&nodes, 1);
    assert_eq!(
        l.gateways["b"], None,
        "b's only candidate is down: no gateway"
    );
    // Relayed through 21, granted and alive: 11 holds b, 12's addresses ride on 11's own WireGuard peer
    // (end to end), nothing of b goes onto the relay's peer.
    w.relayed.insert(key(11), (key(21), true));
    let l = w.layout(&nodes, 1);
    assert_eq!(l.gateways["b"], Some(key(11)));
    assert_eq!(l.paths[&key(11)], PathKind::Relayed { via: key(21) });
    assert_eq!(l.paths[&key(12)], PathKind::Gateway { via: Some(key(11)) });
    assert!(l.wireguard[&key(11)].is_superset(&addrs(12)));
    assert!(l.wireguard[&key(11)].is_superset(&addrs(11)));
    assert!(l.wireguard[&key(21)].is_disjoint(&addrs(11)));
    assert!(l.wireguard[&key(21)].is_disjoint(&addrs(12)));
    assert_eq!(l.routes[&"10.99.0.12/32".parse().unwrap()], Route::Mesh);
    // The relayed path dies: b has no gateway again (down, not a silent black hole through the relay).
    w.relayed.insert(key(11), (key(21), false));
    let l = w.layout(&nodes, 1);
    assert_eq!(l.gateways["b"], None);
    assert_eq!(l.paths[&key(11)], PathKind::Relayed { via: key(21) });
}

#[test]
fn location_relays_pair_gateways_only_and_pass_over_a_failed_relay() {
    // From gateway 1's side: 11 (another location's candidate) is down, 21 and 22 are relays; 3 (native,
    // our location) and 12 (routed) are never relayed: the caller gives them no pair secret.
    let v = |i: u8, candidate: bool, state: PeerState, secret: bool| RelayView {
        key: key(i),
        candidate,
        state,
        pair_secret: secret.then_some([i; 32]),
    };
    let peers = [
        v(11, false, PeerState::Down, true),
        v(3, false, PeerState::Down, false),
        v(12, false, PeerState::Down, false),
        v(21, true, PeerState::Up, false),
        v(22, true, PeerState::Up, false),
    ];
    let r = relays(false, &peers, none);
    assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![key(11)]);
    let first = r[&key(11)];
    // The first relay's path died for the pair: both parties pass it over, to the other one.
    let other = if first == key(21) { key(22) } else { key(21) };
    let r = relays(false, &peers, |p, relay| *p == key(11) && *relay == first);
    assert_eq!(r[&key(11)], other);
    // Both excluded: the peer is not relayed (it is down).
    assert!(relays(false, &peers, |_, _| true).is_empty());
}
