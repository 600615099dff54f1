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
    // node1, node2 public; node3, node4 behind cone NATs; node5, node6 behind symmetric NATs.
    let lab = NatLab::with_publics(
        "meshd-nat",
        2,
        &[Nat::Cone, Nat::Cone, Nat::Symmetric, Nat::Symmetric],
    );
    let start = Instant::now();
    let _daemons: Vec<_> = (0..lab.nodes.len()).map(|i| lab.start(i)).collect();
    let (p, q, a, b, c, d) = (0, 1, 2, 3, 4, 5);
    let publics = [lab.nodes[p].name(), lab.nodes[q].name()];

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
    let (relay, _) = wait_path(&lab, c, d, "relayed", Duration::from_secs(10));
    assert!(publics.contains(&relay), "relayed via {relay}");
    let (via, _) = wait_path(&lab, d, c, "relayed", Duration::from_secs(10));
    assert!(publics.contains(&via), "relayed via {via}");
    ping(&lab, c, d, Duration::from_secs(10));
    let relayed = start.elapsed();
    eprintln!(
        "symmetric <-> symmetric: relayed through {relay}, ping through {relayed:?} after the daemons started \
         (peer listed after {:?}); measured from the start, so it includes joining discovery",
        known.duration_since(start)
    );
    assert!(
        relayed <= Duration::from_secs(5),
        "relayed pair connected after {relayed:?}"
    );
    // The public nodes never relay: they reach everyone directly.
    for i in [p, q] {
        for j in [a, b, c, d] {
            let (path, ..) = lab.path(i, j).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                path,
                "direct",
                "{} -> {}",
                lab.nodes[i].name(),
                lab.nodes[j].name()
            );
        }
    }
    // The symmetric nodes cannot be probed from outside (each destination gets its own port), but their
    // WireGuard sessions with the relay are up: the relay shows them up by traffic.
    let relay_pos = if relay == lab.nodes[p].name() { p } else { q };
    for j in [c, d] {
        wait_until(
            Duration::from_secs(5),
            "the relay to show the symmetric node up",
            || {
                let row = lab.nodes[relay_pos].peer(&lab.nodes[j].name())?;
                if row["state"] == "up" && row["liveness"] == "traffic" {
                    Ok(())
                } else {
                    Err(format!("{row}"))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // What the pongs of the two public nodes told each node about its NAT.
    let nat_of = |i: usize| -> Result<(String, String), String> {
        let d = lab.nodes[i].details()?;
        Ok((
            d["nat"]["type"].as_str().unwrap_or("-").to_owned(),
            d["nat"]["reflexive"].to_string(),
        ))
    };
    for (i, want) in [
        (p, "none"),
        (a, "port-preserving"),
        (b, "port-preserving"),
        (c, "symmetric"),
        (d, "symmetric"),
    ] {
        wait_until(Duration::from_secs(5), "the NAT classification", || {
            let (kind, reflexive) = nat_of(i)?;
            let want_ip = lab.wan_ip(i).to_string();
            if kind == want && (want == "none" || reflexive.contains(&want_ip)) {
                Ok(())
            } else {
                Err(format!("{}: {kind} {reflexive}", lab.nodes[i].name()))
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let announced = lab.nodes[a].details().unwrap_or_default()["nat"]["announced"].to_string();
    assert!(
        announced.contains(&format!("{}:{PORT}", lab.wan_ip(a))),
        "a port-preserving node announces its reflexive address on the WireGuard port: {announced}"
    );

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

/// `meshd.relay: never` on two nodes behind symmetric NATs: no relay is used although a public node is up
/// for both; each reports the other down (unreachable) and nothing crosses.
#[test]
fn with_relay_never_a_pair_no_direct_path_reaches_is_reported_unreachable() {
    let mut lab = NatLab::with_publics("meshd-norelay", 1, &[Nat::Symmetric, Nat::Symmetric]);
    for n in &mut lab.nodes[1..] {
        n.extra = "  relay: never\n".to_owned();
    }
    let _daemons: Vec<_> = (0..lab.nodes.len()).map(|i| lab.start(i)).collect();
    let (p, c, d) = (0, 1, 2);
    wait_known(&lab, c, d);
    // The public node is up for both (it would be their relay with `relay: auto`).
    for i in [c, d] {
        wait_path(&lab, i, p, "direct", Duration::from_secs(10));
    }
    for (i, j) in [(c, d), (d, c)] {
        wait_until(
            Duration::from_secs(10),
            "the pair to be reported down",
            || match lab.path(i, j)? {
                (path, _, _, state) if path == "direct" && state == "down" => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // And it stays so: never relayed, no traffic through.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (path, via, _, state) = lab.path(c, d).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (path.as_str(), state.as_str()),
            ("direct", "down"),
            "via {via}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        lab.nodes[c]
            .ping(&lab.nodes[d].mesh_ip().to_string())
            .is_err(),
        "nothing crosses without a relay"
    );
}
