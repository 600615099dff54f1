//! The WireGuard device as meshd sees it, whichever backend runs it, and the pure desired-vs-actual diff.
//!
//! The reconcile loop builds a [`Desired`] device, reads the [`Actual`] one from the backend, and applies
//! [`diff`]'s minimal [`Update`]: only the peers that changed are touched, and a peer's unchanged fields are
//! left alone (its session and counters survive an endpoint change on the kernel backend). A peer is never
//! replaced wholesale, and the device is never configured with "replace peers".

pub mod kernel;
pub mod uapi;
pub mod userspace;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hybridnet_config::PublicKey;
use ipnet::IpNet;

use crate::identity::PrivateKey;

/// What meshd manages of one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerConfig {
    /// `None`: meshd has not chosen an endpoint yet; whatever the device has (e.g. roamed to) stays.
    pub endpoint: Option<SocketAddr>,
    /// Shared (one copy per peer, not one per plan and one in the device's view): planning clones the
    /// pointer, and [`share_allowed`] points a read device's sets at the plan's where they are equal.
    pub allowed_ips: Arc<BTreeSet<IpNet>>,
    pub keepalive: Option<u16>,
    /// Set when the peer is added (KubeSpan compatibility: the cluster secret); not diffed afterwards.
    pub preshared_key: Option<[u8; 32]>,
}

/// The device meshd wants.
#[derive(Clone, Debug)]
pub struct Desired {
    pub private_key: std::sync::Arc<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: HashMap<PublicKey, PeerConfig>,
}

/// Counters the backend reports for a peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Age of the last handshake, when the backend reports one (boringtun's UAPI does not: DESIGN.md 7).
    pub last_handshake: Option<Duration>,
}

/// The device as the backend reports it.
#[derive(Clone, Debug, Default)]
pub struct Actual {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: HashMap<PublicKey, (PeerConfig, PeerStats)>,
}

/// A change to one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerOp {
    Add(PublicKey, PeerConfig),
    Remove(PublicKey),
    /// `config` is the full desired config; the flags say which fields differ.
    Update {
        key: PublicKey,
        config: PeerConfig,
        endpoint: bool,
        allowed_ips: bool,
        keepalive: bool,
    },
}

impl PeerOp {
    pub fn key(&self) -> &PublicKey {
        match self {
            PeerOp::Add(key, _) | PeerOp::Remove(key) | PeerOp::Update { key, .. } => key,
        }
    }
}

/// A minimal change to the device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Set when the device has another (or no) key.
    pub private_key: Option<[u8; 32]>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    /// Sorted by public key (deterministic).
    pub peers: Vec<PeerOp>,
}

impl Update {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none()
            && self.listen_port.is_none()
            && self.fwmark.is_none()
            && self.peers.is_empty()
    }
}

/// The minimal update that turns `actual` into `desired`. Pure.
pub fn diff(desired: &Desired, actual: &Actual) -> Update {
    let mut update = Update::default();
    if actual.public_key != Some(desired.private_key.public()) {
        update.private_key = Some(desired.private_key.0);
    }
    if actual.listen_port != desired.listen_port {
        update.listen_port = Some(desired.listen_port);
    }
    if actual.fwmark != desired.fwmark {
        update.fwmark = Some(desired.fwmark);
    }
    for (key, want) in &desired.peers {
        match actual.peers.get(key) {
            None => update.peers.push(PeerOp::Add(*key, want.clone())),
            Some((have, _)) => {
                let endpoint = want.endpoint.is_some() && want.endpoint != have.endpoint;
                let allowed_ips = !Arc::ptr_eq(&want.allowed_ips, &have.allowed_ips)
                    && want.allowed_ips != have.allowed_ips;
                let keepalive = want.keepalive != have.keepalive;
                if endpoint || allowed_ips || keepalive {
                    update.peers.push(PeerOp::Update {
                        key: *key,
                        config: want.clone(),
                        endpoint,
                        allowed_ips,
                        keepalive,
                    });
                }
            }
        }
    }
    for key in actual.peers.keys() {
        if !desired.peers.contains_key(key) {
            update.peers.push(PeerOp::Remove(*key));
        }
    }
    update.peers.sort_by_key(|op| op.key().0);
    update
}

/// Records in `known` (the device as meshd last read it) that `update` was applied, so that the next diff
/// against it needs no read of the device. Both backends apply an [`PeerOp::Update`] in place: an endpoint
/// the update does not set stays (e.g. where WireGuard roamed the peer to). Counters are not touched (they
/// are read, never applied).
pub fn record_applied(known: &mut Actual, update: &Update) {
    if let Some(key) = &update.private_key {
        known.public_key = Some(PrivateKey(*key).public());
    }
    if let Some(port) = update.listen_port {
        known.listen_port = port;
    }
    if let Some(mark) = update.fwmark {
        known.fwmark = mark;
    }
    for op in &update.peers {
        match op {
            PeerOp::Add(key, config) => {
                known
                    .peers
                    .insert(*key, (config.clone(), PeerStats::default()));
            }
            PeerOp::Remove(key) => {
                known.peers.remove(key);
            }
            PeerOp::Update { key, config, .. } => {
                let entry = known.peers.entry(*key).or_default();
                if config.endpoint.is_some() {
                    entry.0.endpoint = config.endpoint;
                }
                entry.0.allowed_ips = Arc::clone(&config.allowed_ips);
                entry.0.keepalive = config.keepalive;
            }
        }
    }
}

/// Points each peer's allowed IPs in `known` (a device as read: sets of its own) at the equal set
/// `wanted` gives for the peer (the plan's, the peer's own): one copy per peer is kept between passes, not
/// two, and the next diff compares pointers.
pub fn share_allowed<'a>(
    known: &mut Actual,
    wanted: impl Fn(&PublicKey) -> Option<&'a Arc<BTreeSet<IpNet>>>,
) {
    for (key, (config, _)) in &mut known.peers {
        if let Some(want) = wanted(key)
            && !Arc::ptr_eq(want, &config.allowed_ips)
            && *want == config.allowed_ips
        {
            config.allowed_ips = Arc::clone(want);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn peer(ep: Option<&str>, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            endpoint: ep.map(|e| e.parse().unwrap()),
            allowed_ips: Arc::new(ips.iter().map(|i| i.parse().unwrap()).collect()),
            keepalive: Some(5),
            preshared_key: None,
        }
    }

    fn desired(peers: Vec<(PublicKey, PeerConfig)>) -> (Desired, Actual) {
        let private_key = std::sync::Arc::new(PrivateKey([7; 32]));
        let actual = Actual {
            public_key: Some(private_key.public()),
            listen_port: 51821,
            fwmark: 0x1000,
            peers: HashMap::new(),
        };
        let desired = Desired {
            private_key,
            listen_port: 51821,
            fwmark: 0x1000,
            peers: peers.into_iter().collect(),
        };
        (desired, actual)
    }

    #[test]
    fn fresh_device_gets_key_port_mark_and_all_peers() {
        let (d, _) = desired(vec![(key(1), peer(None, &["10.0.0.1/32"]))]);
        let u = diff(&d, &Actual::default());
        assert_eq!(u.private_key, Some([7; 32]));
        assert_eq!(u.listen_port, Some(51821));
        assert_eq!(u.fwmark, Some(0x1000));
        assert_eq!(
            u.peers,
            vec![PeerOp::Add(key(1), peer(None, &["10.0.0.1/32"]))]
        );
    }

    #[test]
    fn in_sync_device_needs_nothing() {
        let p = peer(Some("192.0.2.1:51821"), &["10.0.0.1/32"]);
        let (d, mut a) = desired(vec![(key(1), p.clone())]);
        a.peers.insert(key(1), (p, PeerStats::default()));
        assert!(diff(&d, &a).is_empty());
    }

    #[test]
    fn only_changed_fields_of_changed_peers() {
        let (d, mut a) = desired(vec![
            (key(1), peer(Some("192.0.2.1:1"), &["10.0.0.1/32"])),
            (key(2), peer(Some("192.0.2.2:1"), &["10.0.0.2/32"])),
            (key(3), peer(Some("192.0.2.3:1"), &["10.0.0.3/32"])),
        ]);
        a.peers.insert(
            key(1),
            (
                peer(Some("192.0.2.1:1"), &["10.0.0.1/32"]),
                PeerStats::default(),
            ),
        );
        a.peers.insert(
            key(2),
            (
                peer(Some("198.51.100.2:1"), &["10.0.0.2/32"]),
                PeerStats::default(),
            ),
        );
        a.peers.insert(
            key(3),
            (
                peer(Some("192.0.2.3:1"), &["10.0.9.9/32"]),
                PeerStats::default(),
            ),
        );
        a.peers
            .insert(key(4), (peer(None, &[]), PeerStats::default()));
        let u = diff(&d, &a);
        assert!(u.private_key.is_none() && u.listen_port.is_none() && u.fwmark.is_none());
        assert_eq!(u.peers.len(), 3);
        assert!(
            matches!(&u.peers[0], PeerOp::Update { key: k, endpoint: true, allowed_ips: false, keepalive: false, .. } if *k == key(2))
        );
        assert!(
            matches!(&u.peers[1], PeerOp::Update { key: k, endpoint: false, allowed_ips: true, .. } if *k == key(3))
        );
        assert_eq!(u.peers[2], PeerOp::Remove(key(4)));
    }

    #[test]
    fn no_endpoint_chosen_leaves_the_device_endpoint() {
        let (d, mut a) = desired(vec![(key(1), peer(None, &["10.0.0.1/32"]))]);
        a.peers.insert(
            key(1),
            (
                peer(Some("203.0.113.9:4"), &["10.0.0.1/32"]),
                PeerStats::default(),
            ),
        );
        assert!(diff(&d, &a).is_empty());
    }

    #[test]
    fn one_change_among_a_thousand_is_one_op() {
        let mut peers = Vec::new();
        for i in 0..1000u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            let ip = format!("10.{}.{}.1/32", i / 256, i % 256);
            peers.push((PublicKey(k), peer(Some("192.0.2.1:1"), &[&ip])));
        }
        let (d, mut a) = desired(peers);
        for (k, p) in &d.peers {
            a.peers.insert(*k, (p.clone(), PeerStats::default()));
        }
        let first = *d.peers.keys().next().unwrap();
        a.peers.get_mut(&first).unwrap().0.endpoint = Some("198.51.100.1:1".parse().unwrap());
        assert_eq!(diff(&d, &a).peers.len(), 1);
    }

    #[test]
    fn recorded_updates_leave_nothing_to_diff() {
        let (d, _) = desired(vec![
            (key(1), peer(Some("192.0.2.1:1"), &["10.0.0.1/32"])),
            (key(2), peer(None, &["10.0.0.2/32"])),
        ]);
        let mut known = Actual::default();
        known
            .peers
            .insert(key(3), (peer(None, &[]), PeerStats::default()));
        // Both backends update in place: an endpoint the update does not set stays.
        known.peers.insert(
            key(2),
            (
                peer(Some("203.0.113.2:9"), &["10.9.9.9/32"]),
                PeerStats {
                    rx_bytes: 7,
                    ..PeerStats::default()
                },
            ),
        );
        let u = diff(&d, &known);
        assert_eq!(u.peers.len(), 3, "add 1, update 2, remove 3");
        record_applied(&mut known, &u);
        assert!(diff(&d, &known).is_empty());
        assert!(!known.peers.contains_key(&key(3)));
        let (config, stats) = &known.peers[&key(2)];
        assert_eq!(config.endpoint, Some("203.0.113.2:9".parse().unwrap()));
        assert_eq!(stats.rx_bytes, 7, "the session and its counters stay");
        assert!(Arc::ptr_eq(
            &config.allowed_ips,
            &d.peers[&key(2)].allowed_ips
        ));
    }

    #[test]
    fn a_read_device_shares_equal_allowed_ips_with_the_plan() {
        let (d, _) = desired(vec![
            (key(1), peer(None, &["10.0.0.1/32"])),
            (key(2), peer(None, &["10.0.0.2/32"])),
        ]);
        let mut read = Actual::default();
        read.peers
            .insert(key(1), (peer(None, &["10.0.0.1/32"]), PeerStats::default()));
        read.peers
            .insert(key(2), (peer(None, &["10.0.9.9/32"]), PeerStats::default()));
        share_allowed(&mut read, |k| d.peers.get(k).map(|c| &c.allowed_ips));
        let shared = |k| Arc::ptr_eq(&read.peers[&k].0.allowed_ips, &d.peers[&k].allowed_ips);
        assert!(shared(key(1)), "equal: one copy");
        assert!(!shared(key(2)), "different: the device's own, diffed");
        assert_eq!(diff(&d, &read).peers.len(), 1);
    }
}
