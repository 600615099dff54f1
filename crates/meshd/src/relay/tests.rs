//! The allocation state machine against hostile requests and datagrams.

use super::*;
use crate::identity::PrivateKey;

fn key(i: u8) -> PublicKey {
    PrivateKey([i; 32]).public()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A WireGuard data message of `len` bytes (type 4).
fn data(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v[0] = 4;
    v
}

fn initiation() -> Vec<u8> {
    let mut v = vec![0u8; 148];
    v[0] = 1;
    v
}

struct Lab {
    t: Instant,
    table: Allocations,
    next_port: u16,
}

impl Lab {
    fn new() -> Lab {
        Lab {
            t: Instant::now(),
            table: Allocations::default(),
            next_port: 40000,
        }
    }

    /// Node `who` (behind `ip`) asks for a pair with `other`; nodes 1-3 are known, 9 is not.
    fn ask(&mut self, who: u8, ip: &str, other: u8) -> Result<Grant, Refused> {
        let port = &mut self.next_port;
        self.table.request(
            self.t,
            key(who),
            ip.parse().unwrap(),
            key(other),
            |k| [key(1), key(2), key(3)].contains(k),
            || {
                *port += 1;
                Some(*port)
            },
        )
    }

    fn send(&mut self, port: u16, src: &str, bytes: &[u8]) -> Result<Forward, Dropped> {
        self.table
            .forward(self.t, port, addr(src), bytes, bytes.len())
    }
}

#[test]
fn a_pair_forwards_between_its_two_parties_only() {
    let mut lab = Lab::new();
    let a = lab.ask(1, "203.0.113.1", 2).unwrap();
    // Only A asked: nothing is forwarded (B never consented).
    assert_eq!(
        lab.send(a.port, "203.0.113.1:5000", &initiation()),
        Err(Dropped::NoConsent)
    );
    let b = lab.ask(2, "198.51.100.2", 1).unwrap();
    assert_ne!(a.port, b.port, "each side has its own port");
    // Asking again returns the same port (a refresh).
    assert_eq!(lab.ask(1, "203.0.113.1", 2).unwrap().port, a.port);
    // A sends first: its address is fixed, but B's is unknown yet.
    assert_eq!(
        lab.send(a.port, "203.0.113.1:5000", &initiation()),
        Err(Dropped::OtherSideUnknown)
    );
    // B sends: forwarded to A, out of A's port; then A to B out of B's port.
    assert_eq!(
        lab.send(b.port, "198.51.100.2:7000", &data(96)),
        Ok(Forward {
            from_port: a.port,
            to: addr("203.0.113.1:5000")
        })
    );
    assert_eq!(
        lab.send(a.port, "203.0.113.1:5000", &data(32)),
        Ok(Forward {
            from_port: b.port,
            to: addr("198.51.100.2:7000")
        })
    );
    // A stranger (another address) on A's port: dropped, and it does not take A's place.
    assert_eq!(
        lab.send(a.port, "192.0.2.66:5000", &initiation()),
        Err(Dropped::Stranger)
    );
    // A's own address on another port: only a new handshake initiation moves it (NAT rebinding).
    assert_eq!(
        lab.send(a.port, "203.0.113.1:5001", &data(32)),
        Err(Dropped::Stranger)
    );
    assert!(lab.send(a.port, "203.0.113.1:5001", &initiation()).is_ok());
    assert_eq!(
        lab.send(b.port, "198.51.100.2:7000", &data(32)).unwrap().to,
        addr("203.0.113.1:5001")
    );
    // Only WireGuard-shaped datagrams pass (no tunnel for anything else through the relay).
    for junk in [vec![4u8, 0, 0, 0, 1], vec![1u8; 148], vec![9u8, 0, 0, 0]] {
        assert_eq!(
            lab.send(a.port, "203.0.113.1:5001", &junk),
            Err(Dropped::NotWireGuard)
        );
    }
    // An unknown port.
    assert_eq!(
        lab.send(1, "203.0.113.1:5001", &data(32)),
        Err(Dropped::NoAllocation)
    );
}

#[test]
fn hostile_requests_are_refused() {
    let mut lab = Lab::new();
    // To itself, to a key the relay does not know (a third party outside the mesh).
    assert_eq!(lab.ask(1, "203.0.113.1", 1), Err(Refused::SelfPair));
    assert_eq!(lab.ask(1, "203.0.113.1", 9), Err(Refused::UnknownParty));
    // To a third party of the mesh that never asks: granted a port, but nothing is ever forwarded.
    let g = lab.ask(1, "203.0.113.1", 3).unwrap();
    for _ in 0..3 {
        assert_eq!(
            lab.send(g.port, "203.0.113.1:5000", &data(64)),
            Err(Dropped::NoConsent)
        );
    }
    // The unasked side's port takes nothing either (someone sending there as node3).
    let other_port = if g.port == 40001 { 40002 } else { 40001 };
    assert_eq!(
        lab.send(other_port, "192.0.2.3:5000", &data(64)),
        Err(Dropped::NoConsent)
    );
    // And it expires with A's lifetime: the ports are freed.
    lab.t += LIFETIME + Duration::from_secs(1);
    let freed = lab.table.expire(lab.t);
    assert_eq!(freed.len(), 2);
    assert!(lab.table.is_empty());
}

#[test]
fn an_allocation_expires_unless_both_sides_refresh_it() {
    let mut lab = Lab::new();
    let a = lab.ask(1, "203.0.113.1", 2).unwrap();
    let b = lab.ask(2, "198.51.100.2", 1).unwrap();
    lab.send(a.port, "203.0.113.1:5000", &data(32)).ok();
    assert!(lab.send(b.port, "198.51.100.2:7000", &data(32)).is_ok());
    // A refreshes, B does not: after B's lifetime nothing is forwarded either way.
    lab.t += LIFETIME / 2;
    lab.ask(1, "203.0.113.1", 2).unwrap();
    lab.t += LIFETIME / 2 + Duration::from_secs(1);
    assert_eq!(
        lab.send(a.port, "203.0.113.1:5000", &data(32)),
        Err(Dropped::Expired)
    );
    assert_eq!(
        lab.send(b.port, "198.51.100.2:7000", &data(32)),
        Err(Dropped::Expired)
    );
    assert!(
        lab.table.expire(lab.t).is_empty(),
        "A's side is still alive"
    );
    // B asks again: forwarding resumes on the same ports.
    assert_eq!(lab.ask(2, "198.51.100.2", 1).unwrap().port, b.port);
    assert!(lab.send(b.port, "198.51.100.2:7000", &data(32)).is_ok());
    // Both stop asking: gone after the lifetime.
    lab.t += LIFETIME + Duration::from_secs(1);
    assert_eq!(lab.table.expire(lab.t).len(), 2);
    assert_eq!(
        lab.send(a.port, "203.0.113.1:5000", &data(32)),
        Err(Dropped::NoAllocation)
    );
}

#[test]
fn an_allocation_is_held_to_its_budget_and_a_node_to_its_share() {
    let mut lab = Lab::new();
    let a = lab.ask(1, "203.0.113.1", 2).unwrap();
    let b = lab.ask(2, "198.51.100.2", 1).unwrap();
    lab.send(a.port, "203.0.113.1:5000", &data(32)).ok();
    lab.send(b.port, "198.51.100.2:7000", &data(32)).unwrap();
    // Full-size datagrams as fast as possible within one instant: the byte budget (one second's worth)
    // runs out, the rest is dropped.
    let big = data(1440);
    let mut passed = 0usize;
    let mut over = 0usize;
    for _ in 0..60_000 {
        match lab.send(a.port, "203.0.113.1:5000", &big) {
            Ok(_) => passed += 1,
            Err(Dropped::OverBudget) => over += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(over > 0);
    assert!((passed * 1440) as f64 <= BYTES_PER_SEC + 1440.0);
    // A second later the budget is back.
    lab.t += Duration::from_secs(1);
    assert!(lab.send(a.port, "203.0.113.1:5000", &big).is_ok());
    // Small datagrams: the packet budget.
    lab.t += Duration::from_secs(1);
    let small = data(32);
    let n = (0..(PACKETS_PER_SEC as usize + 100))
        .filter(|_| lab.send(a.port, "203.0.113.1:5000", &small).is_ok())
        .count();
    assert_eq!(n, PACKETS_PER_SEC as usize);
    // A node holds at most MAX_PER_NODE allocations (here: asks towards known nodes only, so the cap is
    // checked with a larger mesh).
    let mut t = Allocations::default();
    let mut port = 1000u16;
    let now = Instant::now();
    let mut refused = None;
    for i in 0..=(MAX_PER_NODE as u8) {
        let r = t.request(
            now,
            key(200),
            "203.0.113.1".parse().unwrap(),
            key(i),
            |_| true,
            || {
                port += 1;
                Some(port)
            },
        );
        if let Err(e) = r {
            refused = Some((i, e));
        }
    }
    assert_eq!(refused, Some((MAX_PER_NODE as u8, Refused::TooMany)));
}

#[test]
fn wireguard_shapes() {
    let mut v = vec![0u8; 148];
    v[0] = 1;
    assert_eq!(is_wireguard(&v, 148), Some(MessageType::Initiation));
    assert_eq!(is_wireguard(&v, 147), None);
    v[0] = 2;
    assert_eq!(is_wireguard(&v, 92), Some(MessageType::Response));
    v[0] = 3;
    assert_eq!(is_wireguard(&v, 64), Some(MessageType::Cookie));
    v[0] = 4;
    assert_eq!(is_wireguard(&v, 32), Some(MessageType::Data));
    assert_eq!(is_wireguard(&v, 48), Some(MessageType::Data));
    // boringtun does not pad the plaintext: any size from the header and tag up.
    assert_eq!(is_wireguard(&v, 116), Some(MessageType::Data));
    assert_eq!(is_wireguard(&v, 31), None);
    v[2] = 1;
    assert_eq!(is_wireguard(&v, 32), None);
    assert_eq!(is_wireguard(&[4, 0, 0], 32), None);
}

/// A relay that cannot open a port refuses, and keeps nothing (no half-made allocation).
#[test]
fn no_port_no_allocation() {
    let mut t = Allocations::default();
    let now = Instant::now();
    let mut first = true;
    let r = t.request(
        now,
        key(1),
        "203.0.113.1".parse().unwrap(),
        key(2),
        |_| true,
        || {
            let got = first.then_some(40001);
            first = false;
            got
        },
    );
    assert_eq!(r, Err(Refused::NoPorts));
    assert!(t.is_empty());
    assert_eq!(t.ports().count(), 0);
}

/// A side that sends before the other side asked (its handshake is dropped: no consent) is still where
/// the other side's first datagram goes once it asks: no 5 s wait for WireGuard's handshake retry.
#[test]
fn the_first_sides_address_is_learnt_before_the_other_consents() {
    let mut lab = Lab::new();
    let a = lab.ask(1, "203.0.113.1", 2).unwrap();
    assert_eq!(
        lab.send(a.port, "203.0.113.1:5000", &initiation()),
        Err(Dropped::NoConsent)
    );
    let b = lab.ask(2, "198.51.100.2", 1).unwrap();
    assert_eq!(
        lab.send(b.port, "198.51.100.2:6000", &initiation()),
        Ok(Forward {
            from_port: a.port,
            to: addr("203.0.113.1:5000")
        })
    );
    // A stranger's datagram before consent teaches nothing: only the side's own address counts.
    let mut lab = Lab::new();
    let a = lab.ask(1, "203.0.113.1", 2).unwrap();
    assert_eq!(
        lab.send(a.port, "192.0.2.66:5000", &initiation()),
        Err(Dropped::Stranger)
    );
    let b = lab.ask(2, "198.51.100.2", 1).unwrap();
    assert_eq!(
        lab.send(b.port, "198.51.100.2:6000", &initiation()),
        Err(Dropped::OtherSideUnknown)
    );
}

/// A version-3 probe datagram (ping or pong) as the parties' probe sockets send it (MAC not checked here:
/// the relay cannot, it does not have the pair's key).
fn probe_shaped(ping: bool) -> Vec<u8> {
    let p = crate::probe::Probe {
        kind: if ping {
            crate::probe::Kind::Ping
        } else {
            crate::probe::Kind::Pong
        },
        sender: key(1),
        nonce: 7,
        timestamp_us: 1,
        observed: None,
        target: Some(addr("198.51.100.9:40001")),
        flags: 0,
    };
    crate::probe::encode(&p, &[5; 32]).to_vec()
}

#[test]
fn probes_of_the_relayed_path_go_between_the_parties_probe_sockets() {
    let mut lab = Lab::new();
    let a = lab.ask(1, "203.0.113.1", 2).unwrap();
    let b = lab.ask(2, "198.51.100.2", 1).unwrap();
    // WireGuard from both sides (their WireGuard sockets).
    assert_eq!(
        lab.send(a.port, "203.0.113.1:5000", &initiation()),
        Err(Dropped::OtherSideUnknown)
    );
    assert!(lab.send(b.port, "198.51.100.2:7000", &data(32)).is_ok());
    // A's ping from its probe socket (another NAT mapping): B's probe socket is unknown yet.
    assert_eq!(
        lab.send(a.port, "203.0.113.1:6000", &probe_shaped(true)),
        Err(Dropped::OtherSideUnknown)
    );
    // B's ping: to A's probe socket, not to A's WireGuard socket; A's pong: to B's probe socket.
    assert_eq!(
        lab.send(b.port, "198.51.100.2:8000", &probe_shaped(true)),
        Ok(Forward {
            from_port: a.port,
            to: addr("203.0.113.1:6000")
        })
    );
    assert_eq!(
        lab.send(a.port, "203.0.113.1:6000", &probe_shaped(false)),
        Ok(Forward {
            from_port: b.port,
            to: addr("198.51.100.2:8000")
        })
    );
    // WireGuard still goes to the WireGuard sockets.
    assert_eq!(
        lab.send(b.port, "198.51.100.2:7000", &data(32)).unwrap().to,
        addr("203.0.113.1:5000")
    );
    // Another port of A's address: a pong does not move A's probe socket, a ping does (NAT rebinding).
    assert_eq!(
        lab.send(a.port, "203.0.113.1:6001", &probe_shaped(false)),
        Err(Dropped::Stranger)
    );
    assert!(
        lab.send(a.port, "203.0.113.1:6001", &probe_shaped(true))
            .is_ok()
    );
    assert_eq!(
        lab.send(b.port, "198.51.100.2:8000", &probe_shaped(false))
            .unwrap()
            .to,
        addr("203.0.113.1:6001")
    );
    // A stranger's probe is dropped; so is anything probe-like of another size, version or kind.
    assert_eq!(
        lab.send(a.port, "192.0.2.66:6000", &probe_shaped(true)),
        Err(Dropped::Stranger)
    );
    let mut v2 = probe_shaped(true);
    v2[4] = 2;
    let mut alloc = probe_shaped(true);
    alloc[5] = 3;
    let short = probe_shaped(true)[..90].to_vec();
    for junk in [v2, alloc, short] {
        assert_eq!(
            lab.send(a.port, "203.0.113.1:6001", &junk),
            Err(Dropped::NotWireGuard)
        );
    }
}
