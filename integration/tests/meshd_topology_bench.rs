//! meshd topology and NAT benchmarks (run by `hack/bench/meshd.sh`, not by the test suite: `#[ignore]`).
//! Each prints `BENCH key value` lines that the script turns into the table in docs/benchmarks.md.
//! Needs root (network namespaces).
#![allow(clippy::print_stdout)] // the results are the output

use std::time::{Duration, Instant};

use hybridnet_integration::meshd::location::LocationLab;
use hybridnet_integration::meshd::nat::{Nat, NatLab};
use hybridnet_integration::wait_until;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_stats(key: &str, mut samples: Vec<f64>) {
    samples.sort_by(f64::total_cmp);
    println!("BENCH {key}_n {}", samples.len());
    for (name, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
        println!("BENCH {key}_{name}_s {:.2}", percentile(&samples, p));
    }
}

/// Gateway failover: loc1 has two gateway candidates (node11, node12) and a private node13; loc2 a
/// gateway node21 and a private node22. Each trial unplugs loc1's active gateway and times until both
/// node13 routes loc2 via the standby and node21 carries loc1 on the standby (then a ping node13 ->
/// node22 must pass); the gateway is plugged back in and everyone returns to it before the next trial.
#[test]
#[ignore = "benchmark: hack/bench/meshd.sh"]
fn bench_gateway_failover() {
    let trials: usize = std::env::var("MESHD_BENCH_FAILOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut lab = LocationLab::new("bench-gateway");
    let mut all = lab.add_location(1, &[true, true, false]);
    all.extend(lab.add_location(2, &[true, false]));
    let _daemons = lab.start_nodes(&all);
    let (n11, n12, n13) = (lab.pos(11), lab.pos(12), lab.pos(13));
    let (n21, n22) = (lab.pos(21), lab.pos(22));
    let dst = lab.nodes[n22].mesh_ip().to_string();
    wait_until(Duration::from_secs(20), "the mesh to come up", || {
        lab.nodes[n13].ping(&dst)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let gw_name = wait_until(Duration::from_secs(10), "loc1's gateway", || {
        let g = lab.gateway_seen_by(n13, 1)?;
        let r = lab.gateway_seen_by(n21, 1)?;
        if g == r {
            Ok(g)
        } else {
            Err(format!("{g} vs {r}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (gw, standby) = if gw_name == lab.nodes[n11].name() {
        (n11, n12)
    } else {
        (n12, n11)
    };
    let standby_name = lab.nodes[standby].name();
    let moved_to = |name: &str, via: usize| {
        let want = format!("via {} dev lan", lab.lan_ip(via));
        let route = lab.route_get(n13, lab.nodes[n22].mesh_ip());
        let remote = lab.gateway_seen_by(n21, 1)?;
        if route.contains(&want) && remote == name {
            Ok(())
        } else {
            Err(format!("route {route}, node21 sees {remote}"))
        }
    };
    let mut samples = Vec::new();
    for trial in 0..trials {
        let kill = Instant::now();
        lab.unplug(gw);
        wait_until(
            Duration::from_secs(10),
            "failover to the standby gateway",
            || moved_to(&standby_name, standby),
        )
        .unwrap_or_else(|e| panic!("trial {trial}: {e}"));
        let t = kill.elapsed();
        wait_until(Duration::from_secs(5), "ping through the standby", || {
            lab.nodes[n13].ping(&dst)
        })
        .unwrap_or_else(|e| panic!("trial {trial}: {e}"));
        samples.push(t.as_secs_f64());
        for net in ["lan", "pub"] {
            lab.nodes[gw].netns.ip(&["link", "set", net, "up"]);
        }
        wait_until(Duration::from_secs(20), "the gateway to come back", || {
            moved_to(&gw_name, gw)
        })
        .unwrap_or_else(|e| panic!("trial {trial}: {e}"));
        wait_until(Duration::from_secs(10), "ping through the gateway", || {
            lab.nodes[n13].ping(&dst)
        })
        .unwrap_or_else(|e| panic!("trial {trial}: {e}"));
    }
    print_stats("gateway_failover", samples);
}

/// NAT: a fresh lab per trial (public node1, cone node2 and node3, symmetric node4 and node5, the
/// discovery stand-in); time from the daemons' start (so joining discovery is included) until node2
/// pings node3 directly through both NATs, and until node4 pings node5 through the relay.
#[test]
#[ignore = "benchmark: hack/bench/meshd.sh"]
fn bench_nat_connect() {
    let trials: usize = std::env::var("MESHD_BENCH_NAT_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let (mut direct, mut relayed) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        let lab = NatLab::new(
            &format!("bench-nat-{trial}"),
            &[Nat::Cone, Nat::Cone, Nat::Symmetric, Nat::Symmetric],
        );
        let start = Instant::now();
        let _daemons: Vec<_> = (0..lab.nodes.len()).map(|i| lab.start(i)).collect();
        // Both pairs are watched together: the time of the first ping through each path.
        let pairs = [(1usize, 2usize, "direct"), (3, 4, "relayed")];
        let mut done: [Option<f64>; 2] = [None, None];
        while done.iter().any(Option::is_none) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "trial {trial}: NAT pairs not connected: {done:?}"
            );
            for (k, (i, j, path)) in pairs.iter().enumerate() {
                if done[k].is_some() {
                    continue;
                }
                let on_path = lab.path(*i, *j).is_ok_and(|(p, ..)| p == *path);
                if on_path
                    && lab.nodes[*i]
                        .ping(&lab.nodes[*j].mesh_ip().to_string())
                        .is_ok()
                {
                    done[k] = Some(start.elapsed().as_secs_f64());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        direct.push(done[0].unwrap_or(f64::NAN));
        relayed.push(done[1].unwrap_or(f64::NAN));
    }
    print_stats("nat_direct", direct);
    print_stats("nat_relayed", relayed);
}
