//! meshd across NATs in network namespaces, userspace backend: router namespaces masquerade (one
//! endpoint-independent, "cone"; one port-randomising, "symmetric") and drop unsolicited inbound
//! traffic; peers learn each other's public address only through discovery (the stand-in: the real
//! service is BSL-licensed and cannot run here). Needs root; fails (never skips) without it.

use std::time::{Duration, Instant};

use hybridnet_integration::meshd::PORT;
use hybridnet_integration::meshd::nat::{Nat, NatLab};
use hybridnet_integration::wait_until;

fn wait_path(lab: &NatLab, i: usize, j: usize, path: &str, timeout: Duration) -> (String, String) {
    let mut got = (String::new(), String::new());
    wait_until(
        timeout,
        format!(
            "{} to reach {} {path}",
            lab.nodes[i].name(),
            lab.nodes[j].name()
        ),
        || {
            let (p, via, endpoint, state) = lab.path(i, j)?;
            if p == path && state == "up" {
                got = (via, endpoint);
                Ok(())
            } else {
                Err(format!("{p} via {via} endpoint {endpoint} state {state}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    got
}

fn ping(lab: &NatLab, i: usize, j: usize, timeout: Duration) {
    let dst = lab.nodes[j].mesh_ip().to_string();
    wait_until(
        timeout,
        format!("{} to ping {}", lab.nodes[i].name(), lab.nodes[j].name()),
        || lab.nodes[i].ping(&dst),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until node `i` lists node `j` as a peer (discovery delivered it); returns when.
fn wait_known(lab: &NatLab, i: usize, j: usize) -> Instant {
    wait_until(
        Duration::from_secs(20),
        "discovery to deliver the peer",
        || lab.nodes[i].peer(&lab.nodes[j].name()).map(|_| ()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Instant::now()
}

#[test]
fn cone_nats_punch_through_and_symmetric_ones_are_relayed_until_direct_works() {
    // node1 public; node2, node3 behind cone NATs; node4, node5 behind symmetric NATs.
    let lab = NatLab::new(
        "meshd-nat",
        &[Nat::Cone, Nat::Cone, Nat::Symmetric, Nat::Symmetric],
    );
    let start = Instant::now();
    let _daemons: Vec<_> = (0..lab.nodes.len()).map(|i| lab.start(i)).collect();
    let (p, a, b, c, d) = (0, 1, 2, 3, 4);

    // Cone to cone: both sides probe each other's public address at once, the mappings open, WireGuard
    // follows: a direct path through both NATs.
    let known = wait_known(&lab, a, b);
    let (_, endpoint) = wait_path(&lab, a, b, "direct", Duration::from_secs(10));
    let punched = start.elapsed();
    assert_eq!(
        endpoint,
        format!("{}:{PORT}", lab.wan_ip(b)),
        "node2 -> node3 via node3's NAT"
    );
    let (_, endpoint) = wait_path(&lab, b, a, "direct", Duration::from_secs(5));
    assert_eq!(endpoint, format!("{}:{PORT}", lab.wan_ip(a)));
    ping(&lab, a, b, Duration::from_secs(5));
    let through = start.elapsed();
    eprintln!(
        "cone <-> cone: direct {punched:?} after the daemons started (peer listed after {:?}), ping through after {through:?}",
        known.duration_since(start)
    );

    // Symmetric to symmetric: no direct path; within 5 s both sides go through the public node.
    let known = wait_known(&lab, c, d);
    let (via, _) = wait_path(&lab, c, d, "relayed", Duration::from_secs(10));
    assert_eq!(via, lab.nodes[p].name());
    let (via, _) = wait_path(&lab, d, c, "relayed", Duration::from_secs(10));
    assert_eq!(via, lab.nodes[p].name());
    ping(&lab, c, d, Duration::from_secs(10));
    let relayed = start.elapsed();
    eprintln!(
        "symmetric <-> symmetric: relayed through node1, ping through {relayed:?} after the daemons started \
         (peer listed after {:?}); measured from the start, so it includes joining discovery",
        known.duration_since(start)
    );
    assert!(
        relayed <= Duration::from_secs(5),
        "relayed pair connected after {relayed:?}"
    );
    // The relay itself never relays: it reaches everyone directly.
    for j in [a, b, c, d] {
        let (path, ..) = lab.path(p, j).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(path, "direct", "node1 -> {}", lab.nodes[j].name());
    }

    // A direct path becomes possible (both routers forward the WireGuard and probe ports): the pair
    // leaves the relay.
    lab.port_forward(c);
    lab.port_forward(d);
    let t = Instant::now();
    let (_, endpoint) = wait_path(&lab, c, d, "direct", Duration::from_secs(15));
    assert_eq!(endpoint, format!("{}:{PORT}", lab.wan_ip(d)));
    wait_path(&lab, d, c, "direct", Duration::from_secs(15));
    ping(&lab, c, d, Duration::from_secs(5));
    eprintln!(
        "port forwards added: the pair left the relay after {:?}",
        t.elapsed()
    );
}
