//! meshd at scale, in a namespace lab of 32 nodes (userspace backend, this kernel has no WireGuard): the
//! join of 32 nodes restarted at once, and the probe packets a node sends and receives with 10 % of its
//! peers carrying traffic, extrapolated from its per-peer rates to 1,000 peers (issue 15: at most 500 per
//! second in and out). The simulation in crates/meshd/src/probing/tests.rs measures the same at 1,000 and
//! 5,000 peers; this test confirms it against real daemons. Needs root.
//!
//! The lab needs about 2,000 neighbour entries, more than the kernel's default table holds (it is shared
//! by all namespaces): [`MeshLab::new`] raises its limits first. Before it did, probes to peers whose
//! neighbour entry could not be allocated vanished in the kernel and this test failed with a third of the
//! peers down.
#![allow(clippy::print_stderr)]

use std::process::Child;
use std::time::Duration;

use hybridnet_integration::Daemon;
use hybridnet_integration::meshd::MeshLab;

/// 32 nodes; `MESHD_SCALE_NODES` for another count (at least 11).
fn nodes() -> u8 {
    std::env::var("MESHD_SCALE_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}
const WINDOW: Duration = Duration::from_secs(30);

/// Probe packets in and out of a node so far: pings sent and pongs received, pings received and pongs
/// sent.
fn probe_packets(d: &Daemon) -> f64 {
    let m = d.metrics().unwrap_or_else(|e| panic!("meshd metrics: {e}"));
    let get = |name: &str| m.get(name).unwrap_or_else(|| panic!("no metric {name}"));
    get("meshd_probes_sent_total")
        + get("meshd_probes_answered_total")
        + 2.0 * get("meshd_pings_answered_total")
}

#[test]
#[ignore = "a measurement: 32 userspace daemons' join time and probe rates need the 2 cores to themselves \
            (beside the rest of the suite, or parallel builds, their timing is the machine's, not meshd's): \
            run with --ignored on a quiet machine"]
fn thirty_two_nodes_join_in_seconds_and_probe_within_the_scale_budget() {
    let n = nodes();
    // node1 sends traffic to 10 % of its peers.
    let busy = (usize::from(n) - 1) / 10;
    let mut lab = MeshLab::new(n, "meshd-scale");
    let peers = usize::from(n) - 1;
    let daemons = lab.start_all();
    lab.wait_full_mesh(Duration::from_secs(90));
    // Join: every node restarted at once, keys and peers known (as after a reboot of the cluster).
    let (join, daemons) = lab.rejoin(daemons, Duration::from_secs(60));
    eprintln!("{n} nodes joined in {join:?}");

    // node1 sends traffic (5 pings/s) to the first of its peers; the last node carries none.
    let mut traffic: Vec<Child> = (1..=busy).map(|to| lab.pings(0, to, 120)).collect();
    std::thread::sleep(Duration::from_secs(5));
    let (busy_node, idle_node) = (&daemons[0], &daemons[usize::from(n) - 1]);
    let (b0, i0) = (probe_packets(busy_node), probe_packets(idle_node));
    std::thread::sleep(WINDOW);
    let (b1, i1) = (probe_packets(busy_node), probe_packets(idle_node));
    for t in &mut traffic {
        let _ = t.kill();
        let _ = t.wait();
    }
    let secs = WINDOW.as_secs_f64();
    let per_idle = (i1 - i0) / secs / peers as f64;
    let per_busy = ((b1 - b0) / secs - (peers - busy) as f64 * per_idle) / busy as f64;
    let at_1000 = 100.0 * per_busy.max(0.0) + 900.0 * per_idle;
    eprintln!(
        "probe packets/s in+out: node1 {:.1} ({busy} busy peers), node{n} {:.1}; per idle peer {per_idle:.3}, \
         per busy peer {per_busy:.3}; at 1,000 peers with 100 busy: {at_1000:.0}",
        (b1 - b0) / secs,
        (i1 - i0) / secs
    );
    assert!(
        at_1000 <= 500.0,
        "{at_1000:.0} probe packets/s at 1,000 peers (per idle peer {per_idle:.3}, per busy {per_busy:.3})"
    );
    // Issue 15's target.
    assert!(
        join <= Duration::from_secs(2),
        "{n} nodes took {join:?} to join"
    );
}
