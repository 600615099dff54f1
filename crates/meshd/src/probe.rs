//! The probe protocol: small authenticated UDP pings between meshd instances, beside the tunnel.
//!
//! Each meshd listens on UDP `listenPort + 1` ([`probe_port`]) on every address, and probes each candidate
//! endpoint `ip:port` of a peer at `ip:port+1` (a NAT port-forward must forward both ports). The socket
//! carries meshd's fwmark, so probes always take the underlay, never the tunnel.
//!
//! Wire format (72 bytes, big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `HNMP` |
//! | 4 | version, 1 |
//! | 5 | kind: 1 ping, 2 pong |
//! | 6..8 | zero |
//! | 8..40 | the sender's WireGuard public key |
//! | 40..48 | nonce (random per ping; a pong echoes it) |
//! | 48..56 | the pinger's timestamp in microseconds (echoed; informational) |
//! | 56..72 | MAC: the first 16 bytes of HMAC-SHA256(K, bytes 0..56) |
//!
//! `K = SHA-256("hybridnet-meshd-probe-v1" || X25519(our private key, their public key))`: both nodes compute
//! the same K from their WireGuard keys and nothing else, so only the holder of the peer's private key can
//! answer (and a meshd answers only peers it knows). A pong counts only if its nonce matches a ping still
//! outstanding, once: a replayed pong is ignored; a replayed ping costs one pong of the same size (no
//! amplification).

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use hybridnet_config::PublicKey;
use sha2::{Digest, Sha256};

/// Size of every probe datagram.
pub const LEN: usize = 72;
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

/// Encodes and authenticates a probe.
pub fn encode(probe: &Probe, key: &[u8; 32]) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4] = 1;
    out[5] = match probe.kind {
        Kind::Ping => 1,
        Kind::Pong => 2,
    };
    out[8..40].copy_from_slice(&probe.sender.0);
    out[40..48].copy_from_slice(&probe.nonce.to_be_bytes());
    out[48..56].copy_from_slice(&probe.timestamp_us.to_be_bytes());
    let tag = mac(key, &out[..56]);
    out[56..].copy_from_slice(&tag);
    out
}

/// Decodes a datagram's header; `None` for anything that is not a version-1 probe.
pub fn decode(bytes: &[u8]) -> Option<Probe> {
    if bytes.len() != LEN || &bytes[..4] != MAGIC || bytes[4] != 1 || bytes[6..8] != [0, 0] {
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
    Some(Probe {
        kind,
        sender: PublicKey(sender),
        nonce: u64::from_be_bytes(nonce),
        timestamp_us: u64::from_be_bytes(ts),
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
    m.update(&bytes[..56]);
    m.verify_truncated_left(&bytes[56..]).is_ok()
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
        };
        let bytes = encode(&ping, &kab);
        assert_eq!(decode(&bytes), Some(ping));
        assert!(verify(&bytes, &kba));
        // A third node (or anyone without a's or b's key) cannot produce a valid MAC.
        let forged = encode(&ping, &key(&c.shared(&b.public())));
        assert!(!verify(&forged, &kba));
        let mut tampered = bytes;
        tampered[40] ^= 1;
        assert!(!verify(&tampered, &kba));
        assert!(decode(&bytes[..71]).is_none());
        let mut wrong = bytes;
        wrong[5] = 9;
        assert!(decode(&wrong).is_none());
        assert_eq!(probe_addr("192.0.2.1:51821".parse().unwrap()).port(), 51822);
    }
}
