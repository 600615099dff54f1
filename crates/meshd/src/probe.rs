//! The probe protocol: small authenticated UDP pings between meshd instances, beside the tunnel.
//!
//! Each meshd listens on UDP `listenPort + 1` ([`probe_port`]) on every address, and probes each candidate
//! endpoint `ip:port` of a peer at `ip:port+1` (a NAT port-forward must forward both ports). The socket
//! carries meshd's fwmark, so probes always take the underlay, never the tunnel.
//!
//! Wire format, version 2 (90 bytes, big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `HNMP` |
//! | 4 | version, 2 |
//! | 5 | kind: 1 ping, 2 pong |
//! | 6 | flags (version 2): bit 0 `NO_UPLINK` in a pong: the responder is a gateway candidate that reaches none of the other locations' candidates; other bits zero |
//! | 7 | zero |
//! | 8..40 | the sender's WireGuard public key |
//! | 40..48 | nonce (random per ping; a pong echoes it) |
//! | 48..56 | the pinger's timestamp in microseconds (echoed; informational) |
//! | 56..72 | observed address: in a pong, the IP the ping came from (IPv6, IPv4 as `::ffff:a.b.c.d`); zero in a ping |
//! | 72..74 | observed port (the ping's source port) |
//! | 74..90 | MAC: the first 16 bytes of HMAC-SHA256(K, bytes 0..74) |
//!
//! The observed address tells a node behind a NAT its public (reflexive) address and whether the NAT keeps
//! the source port, STUN-like, authenticated like the rest. (Version 1, 72 bytes without the observed
//! address, was never released; it is not decoded.)
//!
//! `K = SHA-256("hybridnet-meshd-probe-v1" || X25519(our private key, their public key))`: both nodes compute
//! the same K from their WireGuard keys and nothing else, so only the holder of the peer's private key can
//! answer (and a meshd answers only peers it knows). A pong counts only if its nonce matches a ping still
//! outstanding, once: a replayed pong is ignored; a replayed ping costs one pong of the same size (no
//! amplification).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use hybridnet_config::PublicKey;
use sha2::{Digest, Sha256};

/// Size of a version-2 probe datagram.
pub const LEN: usize = 90;
/// Pong flag: the responder is a gateway candidate without a live path to any other location.
pub const NO_UPLINK: u8 = 1;

/// The wire version.
const VERSION: u8 = 2;
const MAGIC: &[u8; 4] = b"HNMP";

/// The probe port of a WireGuard port.
pub fn probe_port(wg_port: u16) -> u16 {
    wg_port.wrapping_add(1)
}

/// Where to probe a candidate WireGuard endpoint.
pub fn probe_addr(endpoint: SocketAddr) -> SocketAddr {
    SocketAddr::new(endpoint.ip(), probe_port(endpoint.port()))
}

/// The MAC key shared with one peer, from the X25519 shared secret.
pub fn key(shared: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"hybridnet-meshd-probe-v1");
    h.update(shared);
    h.finalize().into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ping,
    Pong,
}

/// A decoded probe (MAC not yet checked: [`verify`] does that once the sender's key is known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: Kind,
    pub sender: PublicKey,
    pub nonce: u64,
    pub timestamp_us: u64,
    /// In a pong, where the ping came from. `None` in a ping.
    pub observed: Option<SocketAddr>,
    /// Flags ([`NO_UPLINK`]).
    pub flags: u8,
}

fn mac(key: &[u8; 32], body: &[u8]) -> [u8; 16] {
    #[allow(clippy::expect_used)]
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(body);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// The authenticated part of a datagram (the MAC follows).
const BODY: usize = 74;

/// Encodes and authenticates a probe.
pub fn encode(probe: &Probe, key: &[u8; 32]) -> Vec<u8> {
    let mut out = vec![0u8; LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4] = VERSION;
    out[5] = match probe.kind {
        Kind::Ping => 1,
        Kind::Pong => 2,
    };
    out[6] = probe.flags & NO_UPLINK;
    out[8..40].copy_from_slice(&probe.sender.0);
    out[40..48].copy_from_slice(&probe.nonce.to_be_bytes());
    out[48..56].copy_from_slice(&probe.timestamp_us.to_be_bytes());
    if let Some(addr) = probe.observed {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        out[56..72].copy_from_slice(&ip.octets());
        out[72..74].copy_from_slice(&addr.port().to_be_bytes());
    }
    let tag = mac(key, &out[..BODY]);
    out[BODY..].copy_from_slice(&tag);
    out
}

/// Decodes a datagram's header; `None` for anything that is not a probe.
pub fn decode(bytes: &[u8]) -> Option<Probe> {
    if bytes.len() != LEN || bytes[4] != VERSION {
        return None;
    }
    let flags = bytes[6];
    if &bytes[..4] != MAGIC || bytes[7] != 0 || flags & !NO_UPLINK != 0 {
        return None;
    }
    let kind = match bytes[5] {
        1 => Kind::Ping,
        2 => Kind::Pong,
        _ => return None,
    };
    let mut sender = [0u8; 32];
    sender.copy_from_slice(&bytes[8..40]);
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&bytes[40..48]);
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&bytes[48..56]);
    let observed = if kind == Kind::Pong {
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&bytes[56..72]);
        let ip = Ipv6Addr::from(ip);
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        let port = u16::from_be_bytes([bytes[72], bytes[73]]);
        (!ip.is_unspecified() && port != 0).then_some(SocketAddr::new(ip, port))
    } else {
        None
    };
    Some(Probe {
        kind,
        sender: PublicKey(sender),
        nonce: u64::from_be_bytes(nonce),
        timestamp_us: u64::from_be_bytes(ts),
        observed,
        flags,
    })
}

/// Checks a datagram's MAC with the key shared with its sender (constant time).
pub fn verify(bytes: &[u8], key: &[u8; 32]) -> bool {
    if bytes.len() != LEN {
        return false;
    }
    let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        return false;
    };
    m.update(&bytes[..BODY]);
    m.verify_truncated_left(&bytes[BODY..]).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::identity::PrivateKey;

    #[test]
    fn round_trip_and_authentication() {
        let (a, b, c) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let kab = key(&a.shared(&b.public()));
        let kba = key(&b.shared(&a.public()));
        assert_eq!(kab, kba);
        let ping = Probe {
            kind: Kind::Ping,
            sender: a.public(),
            nonce: 42,
            timestamp_us: 7,
            observed: None,
            flags: 0,
        };
        let bytes = encode(&ping, &kab);
        assert_eq!(bytes.len(), LEN);
        assert_eq!(decode(&bytes), Some(ping));
        assert!(verify(&bytes, &kba));
        // A third node (or anyone without a's or b's key) cannot produce a valid MAC.
        let forged = encode(&ping, &key(&c.shared(&b.public())));
        assert!(!verify(&forged, &kba));
        let mut tampered = bytes.clone();
        tampered[40] ^= 1;
        assert!(!verify(&tampered, &kba));
        assert!(decode(&bytes[..89]).is_none());
        let mut wrong = bytes.clone();
        wrong[5] = 9;
        assert!(decode(&wrong).is_none());
        // A pong carries the observed address, authenticated: changing it breaks the MAC.
        for observed in ["203.0.113.9:40001", "[2001:db8::9]:51822"] {
            let pong = Probe {
                kind: Kind::Pong,
                sender: b.public(),
                observed: Some(observed.parse().unwrap()),
                ..ping
            };
            let bytes = encode(&pong, &kba);
            assert_eq!(decode(&bytes), Some(pong));
            assert!(verify(&bytes, &kab));
            let mut moved = bytes.clone();
            moved[73] ^= 1;
            assert!(!verify(&moved, &kab), "the observed port is under the MAC");
        }
        // The unreleased version 1 (72 bytes) is refused.
        assert!(decode(&bytes[..72]).is_none());
        assert!(!verify(&bytes[..72], &kba));
        // Flags: NO_UPLINK round-trips under the MAC; unknown bits are refused.
        let flagged = Probe {
            flags: NO_UPLINK,
            kind: Kind::Pong,
            ..ping
        };
        let bytes2 = encode(&flagged, &kab);
        assert_eq!(decode(&bytes2).map(|p| p.flags), Some(NO_UPLINK));
        let mut unknown = bytes2.clone();
        unknown[6] = 2;
        assert!(decode(&unknown).is_none());
        // Another version byte is refused.
        let mut other = bytes2.clone();
        other[4] = 1;
        assert!(decode(&other).is_none());
        assert_eq!(probe_addr("192.0.2.1:51821".parse().unwrap()).port(), 51822);
    }
}
