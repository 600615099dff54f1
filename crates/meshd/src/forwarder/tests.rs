//! The forwarder on loopback sockets (no fwmark: no root needed): a granted pair forwards WireGuard-shaped
//! datagrams between its two parties through the relay ports only, a third node that asks for a pair
//! with a party that never asked gets nothing forwarded, and expiry and stop close the ports.

use super::*;
use crate::identity::PrivateKey;
use std::net::UdpSocket;

fn key(i: u8) -> PublicKey {
    PrivateKey([i; 32]).public()
}

fn party() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

fn data(tag: u8) -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[0] = 4;
    v[40] = tag;
    v
}

fn relay_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Receives one datagram (or `None` within the timeout).
fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    s.recv_from(&mut buf)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

#[test]
fn a_granted_pair_talks_through_its_relay_ports_and_nobody_else_does() {
    let f = Forwarder::start(Metrics::default(), false).unwrap();
    let known = |k: &PublicKey| [key(1), key(2), key(3)].contains(k);
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let now = Instant::now();
    let (a, b, c) = (party(), party(), party());
    let ga = f.request(now, key(1), lo, key(2), known).unwrap();
    let gb = f.request(now, key(2), lo, key(1), known).unwrap();
    assert_ne!(ga.port, gb.port);
    // A speaks first: its address is learnt, nothing to forward to yet.
    a.send_to(&data(1), relay_addr(ga.port)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(f.open_ports(), 2);
    b.send_to(&data(2), relay_addr(gb.port)).unwrap();
    let (got, from) = recv(&a).expect("B's datagram reaches A");
    assert_eq!(
        (got, from),
        (data(2), relay_addr(ga.port)),
        "from A's relay port"
    );
    a.send_to(&data(3), relay_addr(ga.port)).unwrap();
    let (got, from) = recv(&b).expect("A's datagram reaches B");
    assert_eq!((got, from), (data(3), relay_addr(gb.port)));
    // Not WireGuard-shaped: dropped.
    a.send_to(b"hello", relay_addr(ga.port)).unwrap();
    assert!(recv(&b).is_none());
    // C (another port of the same address here) sends on A's port: a stranger without a handshake.
    c.send_to(&data(4), relay_addr(ga.port)).unwrap();
    assert!(recv(&b).is_none());
    // C asks for a pair with A; A never asked for it: nothing C sends is forwarded to A.
    let gc = f.request(now, key(3), lo, key(1), known).unwrap();
    for tag in 5..8 {
        c.send_to(&data(tag), relay_addr(gc.port)).unwrap();
    }
    assert!(recv(&a).is_none(), "no consent, nothing forwarded");
    // An unknown party, and oneself, are refused outright.
    assert_eq!(
        f.request(now, key(1), lo, key(9), known),
        Err(Refused::UnknownParty)
    );
    assert_eq!(
        f.request(now, key(1), lo, key(1), known),
        Err(Refused::SelfPair)
    );
    let (stats, rows) = f.snapshot();
    assert_eq!(stats.forwarded_packets, 2, "{stats:?}");
    assert_eq!(stats.forwarded_bytes, 128);
    assert_eq!(stats.dropped.get("not-wireguard"), Some(&1), "{stats:?}");
    assert_eq!(stats.dropped.get("stranger"), Some(&1), "{stats:?}");
    assert_eq!(stats.dropped.get("no-consent"), Some(&3), "{stats:?}");
    assert_eq!(stats.requests.get("granted"), Some(&3));
    assert_eq!(rows.len(), 2);
    f.stop();
    assert_eq!(f.open_ports(), 0, "stop closes every relay port");
    assert!(f.snapshot().1.is_empty());
}

#[test]
fn an_expired_allocation_closes_its_ports() {
    let f = Forwarder::start(Metrics::default(), false).unwrap();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    // Asked long enough ago that both sides expire within a second.
    let then = Instant::now()
        .checked_sub(crate::relay::LIFETIME - Duration::from_millis(300))
        .unwrap();
    let ga = f.request(then, key(1), lo, key(2), |_| true).unwrap();
    f.request(then, key(2), lo, key(1), |_| true).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(f.open_ports(), 2);
    std::thread::sleep(EXPIRE_EVERY + Duration::from_millis(500));
    assert_eq!(f.open_ports(), 0, "expired: its sockets are closed");
    assert!(f.snapshot().1.is_empty());
    // The port is free again: a datagram there reaches no one (nothing bound), and it can be bound.
    assert!(
        UdpSocket::bind(("::", ga.port)).is_ok() || UdpSocket::bind(("0.0.0.0", ga.port)).is_ok()
    );
}

/// Every reason `meshd_relay_dropped_total` counts is there at 0 once the forwarder runs, so an alert's
/// `increase()` sees the first drop too.
#[test]
fn every_drop_reason_is_a_series_from_the_start() {
    let registry = hybridnet_runtime::SharedRegistry::default();
    let f = Forwarder::start(Metrics::register(&registry), false).unwrap();
    let text = registry.encode();
    for reason in Dropped::ALL
        .map(Dropped::as_str)
        .iter()
        .chain(&FORWARDER_DROPS)
    {
        let series = format!("meshd_relay_dropped_total{{reason=\"{reason}\"}} 0");
        assert!(text.contains(&series), "{series} in\n{text}");
    }
    f.stop();
}
