//! Forwarding loops: dnslocal never forwards a zone to itself.
//!
//! Two checks. At start, a forwarder (`clusterDNS`, `upstreams`) that is one of our own listen
//! addresses is refused ([`is_own`]); when every cluster forwarder is refused, cluster-zone
//! questions get SERVFAIL at once instead of going anywhere else. While running, a probe finds the
//! loops that pass through another server (kube-dns whose Service points back at us, a forwarder
//! that forwards to us): every [`PROBE_INTERVAL`] a question for `dnslocal-loop-<token>.<cluster
//! domain>` (HINFO, the token random per instance) goes to the cluster forwarders, as CoreDNS's
//! `loop` plugin does. No client ever asks that name: if it reaches our listener, the cluster zone
//! comes back to us. That question is answered SERVFAIL at once (never forwarded again), and
//! cluster-zone questions get SERVFAIL at once until a probe round passes without it coming back.
//! Each loop is logged and counted in `dnslocal_forward_loops_total{kind}`; `dnslocal_cluster_loop`
//! is 1 while cluster zones are refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::engine::Engine;
use crate::wire;

/// How often the cluster forwarders are probed for a loop.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// How long one probe waits for its answer.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);
const TYPE_HINFO: u16 = 13;

/// Whether `addr` is one of our `listen` addresses (an unspecified listen address covers the
/// loopback addresses on its port).
pub fn is_own(listen: &[SocketAddr], addr: SocketAddr) -> bool {
    listen.iter().any(|l| {
        l.port() == addr.port()
            && (l.ip() == addr.ip() || (l.ip().is_unspecified() && addr.ip().is_loopback()))
    })
}

/// The loop state of one instance.
#[derive(Debug)]
pub struct LoopGuard {
    /// The probe's first label, lower-cased wire format with its length byte.
    label: Vec<u8>,
    /// Every configured cluster forwarder was one of our own addresses.
    refused: bool,
    /// The last probe came back to us.
    looped: AtomicBool,
    /// A probe came back during the current round.
    seen: AtomicBool,
}

impl LoopGuard {
    /// A guard with a random probe name; `refused` when the cluster zone has no forwarder left
    /// after the own-address check.
    pub fn new(refused: bool) -> LoopGuard {
        let name = format!("dnslocal-loop-{:016x}", fastrand::u64(..));
        let mut label = vec![name.len() as u8];
        label.extend_from_slice(name.as_bytes());
        LoopGuard {
            label,
            refused,
            looped: AtomicBool::new(false),
            seen: AtomicBool::new(false),
        }
    }

    /// The probe question's name under `zone`.
    pub fn probe_name(&self, zone: &str) -> String {
        let first = String::from_utf8_lossy(self.label.get(1..).unwrap_or_default()).into_owned();
        format!("{first}.{}", zone.trim_end_matches('.'))
    }

    /// Whether a (lower-cased, wire-format) question name is our probe: it came back to us.
    /// Marks the loop seen.
    pub fn is_probe(&self, qname: &[u8]) -> bool {
        let hit = qname.starts_with(&self.label);
        if hit {
            self.seen.store(true, Ordering::Relaxed);
        }
        hit
    }

    /// Whether cluster-zone questions are refused (SERVFAIL at once).
    pub fn cluster_refused(&self) -> bool {
        self.refused || self.looped.load(Ordering::Relaxed)
    }

    /// Ends a probe round: the cluster zone loops if the probe came back during it.
    fn end_round(&self) -> bool {
        let seen = self.seen.swap(false, Ordering::Relaxed);
        let was = self.looped.swap(seen, Ordering::Relaxed);
        if seen && !was {
            tracing::error!(
                probe = %String::from_utf8_lossy(self.label.get(1..).unwrap_or_default()),
                "the cluster DNS forwards the cluster zone back to us (a loop): cluster-zone questions get SERVFAIL until it stops; point dnslocal.clusterDNS at kube-dns's ClusterIP, not at dnslocal"
            );
        } else if was && !seen {
            tracing::info!("the cluster DNS loop is gone: forwarding the cluster zone again");
        }
        seen
    }
}

/// A query message for `name` HINFO with a random ID and RD set.
fn probe_query(name: &str) -> Vec<u8> {
    let mut q = fastrand::u16(..).to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(&wire::name_to_wire(name));
    q.extend_from_slice(&TYPE_HINFO.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// Probes the cluster forwarders every [`PROBE_INTERVAL`] until the engine is dropped elsewhere
/// (the task holds only a weak reference between rounds).
pub async fn probe_loop(engine: std::sync::Weak<Engine>, zone: String) {
    loop {
        let Some(e) = engine.upgrade() else { return };
        probe_once(&e, &zone).await;
        drop(e);
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// One probe round; whether the cluster zone loops.
pub async fn probe_once(engine: &Arc<Engine>, zone: &str) -> bool {
    let Some(pool) = engine.routes.cluster.clone() else {
        return false;
    };
    let msg = probe_query(&engine.loops.probe_name(zone));
    let deadline = Instant::now() + PROBE_DEADLINE;
    // The answer itself does not matter (NXDOMAIN from a real kube-dns, SERVFAIL through a loop).
    let _ = pool.exchange(&msg, deadline, &engine.metrics).await;
    let looped = engine.loops.end_round();
    engine
        .metrics
        .cluster_loop
        .set(i64::from(engine.loops.cluster_refused()));
    looped
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_are_recognised() {
        let listen: Vec<SocketAddr> = vec!["169.254.20.10:53".parse().unwrap()];
        assert!(is_own(&listen, "169.254.20.10:53".parse().unwrap()));
        assert!(!is_own(&listen, "169.254.20.10:5353".parse().unwrap()));
        assert!(!is_own(&listen, "10.96.0.10:53".parse().unwrap()));
        let any: Vec<SocketAddr> = vec!["0.0.0.0:53".parse().unwrap()];
        assert!(is_own(&any, "127.0.0.1:53".parse().unwrap()));
        assert!(!is_own(&any, "10.96.0.10:53".parse().unwrap()));
    }

    #[test]
    fn the_probe_is_recognised_only_under_its_own_label() {
        let g = LoopGuard::new(false);
        let name = g.probe_name("cluster.local.");
        assert!(name.starts_with("dnslocal-loop-") && name.ends_with(".cluster.local"));
        assert!(!g.cluster_refused());
        assert!(!g.is_probe(&wire::name_to_wire("kubernetes.default.svc.cluster.local")));
        assert!(!g.end_round(), "nothing came back");
        // Our question names are lower-cased before they are compared.
        assert!(g.is_probe(&wire::name_to_wire(&name.to_uppercase())));
        assert!(g.end_round());
        assert!(g.cluster_refused());
        assert!(!g.end_round(), "a round without it clears the loop");
        assert!(!g.cluster_refused());
        assert!(LoopGuard::new(true).cluster_refused());
        let q = probe_query(&name);
        assert_eq!(&q[q.len() - 4..], &[0, 13, 0, 1]);
    }
}
