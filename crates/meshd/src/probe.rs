//! The probe protocol: small authenticated UDP pings between meshd instances, beside the tunnel.
//!
//! Each meshd listens on UDP `listenPort + 1` ([`probe_port`]) on every address, and probes each candidate
//! endpoint `ip:port` of a peer at `ip:port+1` (a NAT port-forward must forward both ports). The socket
//! carries meshd's fwmark, so probes always take the underlay, never the tunnel.
//!
//! Wire format, version 3 (108 bytes, big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `HNMP` |
//! | 4 | version, 3 |
//! | 5 | kind: 1 ping, 2 pong |
//! | 6 | flags: bit 0 `NO_UPLINK` in a pong: the responder is a gateway candidate that reaches none of the other locations' candidates; other bits zero |
//! | 7 | zero |
//! | 8..40 | the sender's WireGuard public key |
//! | 40..48 | nonce (random per ping; a pong echoes it) |
//! | 48..56 | the sender's wall clock, Unix microseconds: a ping outside [`WINDOW`] of the responder's clock gets no pong |
//! | 56..72 | observed address: in a pong, the IP the ping came from (IPv6, IPv4 as `::ffff:a.b.c.d`); zero in a ping |
//! | 72..74 | observed port (the ping's source port) |
//! | 74..90 | target address: in a ping, the address it is sent to; a pong echoes it |
//! | 90..92 | target port |
//! | 92..108 | MAC: the first 16 bytes of HMAC-SHA256(K, bytes 0..92) |
//!
//! The observed address tells a node behind a NAT its public (reflexive) address and whether the NAT keeps
//! the source port, STUN-like, authenticated like the rest. The target binds a pong to the endpoint its
//! ping was sent to: the prober takes a pong only from that address, with that target echoed, for a nonce
//! it sent there. Version 1 (72 bytes) is not decoded. Version 2 (90 bytes: bytes 0..74 as above, then the
//! MAC; no target, a timestamp nobody checks) is kept for the rolling upgrade only: a version-3 node
//! answers a peer's version-2 pings until that peer sends its first version-3 ping, and pings a peer in
//! both versions until the peer's first version-3 pong (see the crate README).
//!
//! **Allocation messages** (end-to-end encrypted relays, see [`crate::relay`]): the same header, 148
//! bytes, kind 3 (allocate: a request to a relay) or 4 (grant: the relay's answer), authenticated with the
//! same pair key, timestamp window and replay list as a ping (a request is admitted like one), bound to
//! the relay's probe address like a pong (its target and nonce):
//!
//! | bytes | field |
//! |---|---|
//! | 0..92 | as above: kind 3 or 4, flags zero; in a grant the observed address is the requester's |
//! | 92..124 | the other party's WireGuard public key (the pair is the sender's, or the requester's, and this) |
//! | 124 | result, in a grant: 0 granted, else the refusal ([`AllocResult`]); zero in a request |
//! | 125 | zero |
//! | 126..128 | the relay port of the requester's side (granted) |
//! | 128..132 | the allocation's lifetime in seconds (granted) |
//! | 132..148 | MAC: the first 16 bytes of HMAC-SHA256(K, bytes 0..132) |
//!
//! `K = SHA-256("hybridnet-meshd-probe-v1" || X25519(our private key, their public key))`: both nodes compute
//! the same K from their WireGuard keys and nothing else, so only the holder of the peer's private key can
//! answer (and a meshd answers only peers it knows). A pong counts only if its nonce matches a ping still
//! outstanding, once: a replayed pong is ignored. A ping is answered once: the responder refuses a
//! timestamp outside [`WINDOW`] and remembers the nonces it answered for as long as their timestamps are
//! inside it ([`Replay`]), so a recorded ping replayed later (or at once) gets no pong and a meshd is never
//! a reflector.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use hybridnet_config::PublicKey;
use sha2::{Digest, Sha256};

/// Size of a version-3 probe datagram.
pub const LEN: usize = 108;
/// Size of a version-2 datagram (answered and sent only for the rolling upgrade: see [`encode_v2`]).
pub const LEN_V2: usize = 90;
/// How far a ping's timestamp may be from the responder's clock (either way). Nodes' clocks are assumed
/// to be synchronised (NTP, as Kubernetes' certificates need) well within this.
pub const WINDOW: Duration = Duration::from_secs(30);
/// Size of an allocation message (kinds 3 and 4).
pub const LEN_ALLOC: usize = 148;
/// The authenticated part of an allocation message.
const BODY_ALLOC: usize = 132;
/// Pong flag: the responder is a gateway candidate without a live path to any other location.
pub const NO_UPLINK: u8 = 1;

/// The wire version.
const VERSION: u8 = 3;
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
    /// An allocation request to a relay (148 bytes, with an [`Alloc`]).
    Allocate,
    /// A relay's answer to one (148 bytes, with an [`Alloc`]).
    Grant,
}

/// What a relay answers to an allocation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocResult {
    Granted,
    /// This node relays nothing (not public, or `meshd.relay: never`).
    NotRelay,
    /// The requester named itself as the other party.
    SelfPair,
    /// The other party is no node the relay knows.
    UnknownParty,
    /// The requester holds as many allocations as a node may.
    TooMany,
    /// The relay could not open a port.
    NoPorts,
}

impl AllocResult {
    pub fn code(self) -> u8 {
        match self {
            AllocResult::Granted => 0,
            AllocResult::NotRelay => 1,
            AllocResult::SelfPair => 2,
            AllocResult::UnknownParty => 3,
            AllocResult::TooMany => 4,
            AllocResult::NoPorts => 5,
        }
    }

    pub fn from_code(code: u8) -> Option<AllocResult> {
        Some(match code {
            0 => AllocResult::Granted,
            1 => AllocResult::NotRelay,
            2 => AllocResult::SelfPair,
            3 => AllocResult::UnknownParty,
            4 => AllocResult::TooMany,
            5 => AllocResult::NoPorts,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AllocResult::Granted => "granted",
            AllocResult::NotRelay => "not-relay",
            AllocResult::SelfPair => "self",
            AllocResult::UnknownParty => "unknown-party",
            AllocResult::TooMany => "too-many",
            AllocResult::NoPorts => "no-ports",
        }
    }
}

/// The allocation fields of a kind 3 or 4 message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alloc {
    /// The other party of the pair.
    pub other: PublicKey,
    /// In a grant, the answer; [`AllocResult::Granted`] in a request.
    pub result: AllocResult,
    /// The relay port of the requester's side (0 unless granted).
    pub port: u16,
    /// Seconds the allocation lasts without a refresh (0 unless granted).
    pub lifetime_s: u32,
}

/// A decoded probe (MAC not yet checked: [`verify`] does that once the sender's key is known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: Kind,
    pub sender: PublicKey,
    pub nonce: u64,
    /// The sender's wall clock (Unix microseconds, [`now_us`]).
    pub timestamp_us: u64,
    /// In a pong, where the ping came from. `None` in a ping.
    pub observed: Option<SocketAddr>,
    /// In a ping, where it is sent; in a pong, the ping's target echoed.
    pub target: Option<SocketAddr>,
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
const BODY: usize = 92;

/// The wall clock in Unix microseconds (0 before 1970).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The peer's clock minus ours, in milliseconds, from a version-3 pong: the responder stamped it
/// (`their_us`) about half a round trip (`rtt`) before it arrived, and it arrived `since_arrival` before our
/// clock read `our_now_us`. Off by at most half the round trip (an asymmetric path); `None` when out of
/// range. Only clocks within [`WINDOW`] of each other exchange pongs at all: beyond, pings go unanswered.
pub fn clock_offset_ms(
    their_us: u64,
    our_now_us: u64,
    since_arrival: Duration,
    rtt: Duration,
) -> Option<i64> {
    let arrived_us = i128::from(our_now_us) - i128::try_from(since_arrival.as_micros()).ok()?;
    let stamped_us = arrived_us - i128::try_from(rtt.as_micros() / 2).ok()?;
    i64::try_from((i128::from(their_us) - stamped_us) / 1000).ok()
}

fn put_addr(out: &mut [u8], addr: Option<SocketAddr>) {
    if let Some(addr) = addr {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        out[..16].copy_from_slice(&ip.octets());
        out[16..18].copy_from_slice(&addr.port().to_be_bytes());
    }
}

fn get_addr(bytes: &[u8]) -> Option<SocketAddr> {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&bytes[..16]);
    let ip = Ipv6Addr::from(ip);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    let port = u16::from_be_bytes([bytes[16], bytes[17]]);
    (!ip.is_unspecified() && port != 0).then_some(SocketAddr::new(ip, port))
}

/// Encodes and authenticates a probe.
pub fn encode(probe: &Probe, key: &[u8; 32]) -> Vec<u8> {
    let mut out = header(probe, LEN, VERSION);
    put_addr(&mut out[74..92], probe.target);
    let tag = mac(key, &out[..BODY]);
    out[BODY..].copy_from_slice(&tag);
    out
}

/// Encodes a probe in version 2 (no target; the timestamp is not checked by a version-2 responder), for
/// peers that still run it during a rolling upgrade.
pub fn encode_v2(probe: &Probe, key: &[u8; 32]) -> Vec<u8> {
    let mut out = header(probe, LEN_V2, 2);
    let tag = mac(key, &out[..LEN_V2 - 16]);
    out[LEN_V2 - 16..].copy_from_slice(&tag);
    out
}

/// Whether a datagram is version 2 (see [`encode_v2`]).
/// Whether `bytes` starts with the magic and version 3 (a cheap shape check; nothing is authenticated).
pub fn is_v3_header(bytes: &[u8]) -> bool {
    bytes.len() >= 5 && &bytes[..4] == MAGIC && bytes[4] == VERSION
}

pub fn is_v2(bytes: &[u8]) -> bool {
    bytes.len() == LEN_V2
}

fn header(probe: &Probe, len: usize, version: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    out[..4].copy_from_slice(MAGIC);
    out[4] = version;
    out[5] = match probe.kind {
        Kind::Ping => 1,
        Kind::Pong => 2,
        Kind::Allocate => 3,
        Kind::Grant => 4,
    };
    out[6] = probe.flags & NO_UPLINK;
    out[8..40].copy_from_slice(&probe.sender.0);
    out[40..48].copy_from_slice(&probe.nonce.to_be_bytes());
    out[48..56].copy_from_slice(&probe.timestamp_us.to_be_bytes());
    if matches!(probe.kind, Kind::Pong | Kind::Grant) {
        put_addr(&mut out[56..74], probe.observed);
    }
    out
}

/// Encodes and authenticates an allocation message (`probe.kind` [`Kind::Allocate`] or [`Kind::Grant`]).
pub fn encode_alloc(probe: &Probe, alloc: &Alloc, key: &[u8; 32]) -> Vec<u8> {
    let mut out = header(probe, LEN_ALLOC, VERSION);
    put_addr(&mut out[74..92], probe.target);
    out[92..124].copy_from_slice(&alloc.other.0);
    if probe.kind == Kind::Grant {
        out[124] = alloc.result.code();
        out[126..128].copy_from_slice(&alloc.port.to_be_bytes());
        out[128..132].copy_from_slice(&alloc.lifetime_s.to_be_bytes());
    }
    let tag = mac(key, &out[..BODY_ALLOC]);
    out[BODY_ALLOC..].copy_from_slice(&tag);
    out
}

/// Decodes an allocation message (MAC not yet checked); `None` for anything else, a ping or a pong too.
pub fn decode_alloc(bytes: &[u8]) -> Option<(Probe, Alloc)> {
    if bytes.len() != LEN_ALLOC {
        return None;
    }
    let probe = decode_header(bytes, false)?;
    if !matches!(probe.kind, Kind::Allocate | Kind::Grant) || probe.flags != 0 || bytes[125] != 0 {
        return None;
    }
    let mut other = [0u8; 32];
    other.copy_from_slice(&bytes[92..124]);
    let port = u16::from_be_bytes([bytes[126], bytes[127]]);
    let lifetime_s = u32::from_be_bytes([bytes[128], bytes[129], bytes[130], bytes[131]]);
    let result = AllocResult::from_code(bytes[124])?;
    if probe.kind == Kind::Allocate
        && (result != AllocResult::Granted || port != 0 || lifetime_s != 0)
    {
        return None;
    }
    // A grant carries a port and a lifetime; a refusal neither.
    let granted = result == AllocResult::Granted;
    if probe.kind == Kind::Grant && granted != (port != 0 && lifetime_s != 0) {
        return None;
    }
    if probe.kind == Kind::Grant && !granted && (port != 0 || lifetime_s != 0) {
        return None;
    }
    let alloc = Alloc {
        other: PublicKey(other),
        result,
        port,
        lifetime_s,
    };
    Some((probe, alloc))
}

/// Decodes a datagram's header; `None` for anything that is not a ping or a pong (allocation messages:
/// [`decode_alloc`]).
pub fn decode(bytes: &[u8]) -> Option<Probe> {
    let v2 = bytes.len() == LEN_V2 && bytes[4] == 2;
    if !v2 && (bytes.len() != LEN || bytes[4] != VERSION) {
        return None;
    }
    let probe = decode_header(bytes, v2)?;
    matches!(probe.kind, Kind::Ping | Kind::Pong).then_some(probe)
}

/// The fields every version and kind shares (`bytes` at least [`LEN_V2`] long, version checked).
fn decode_header(bytes: &[u8], v2: bool) -> Option<Probe> {
    if bytes.len() < LEN_V2 || (!v2 && bytes[4] != VERSION) {
        return None;
    }
    let flags = bytes[6];
    if &bytes[..4] != MAGIC || bytes[7] != 0 || flags & !NO_UPLINK != 0 {
        return None;
    }
    let kind = match bytes[5] {
        1 => Kind::Ping,
        2 => Kind::Pong,
        3 => Kind::Allocate,
        4 => Kind::Grant,
        _ => return None,
    };
    let mut sender = [0u8; 32];
    sender.copy_from_slice(&bytes[8..40]);
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&bytes[40..48]);
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&bytes[48..56]);
    let observed = if matches!(kind, Kind::Pong | Kind::Grant) {
        get_addr(&bytes[56..74])
    } else {
        None
    };
    let target = if v2 { None } else { get_addr(&bytes[74..92]) };
    Some(Probe {
        kind,
        sender: PublicKey(sender),
        nonce: u64::from_be_bytes(nonce),
        timestamp_us: u64::from_be_bytes(ts),
        observed,
        target,
        flags,
    })
}

/// Checks a datagram's MAC with the key shared with its sender (constant time).
pub fn verify(bytes: &[u8], key: &[u8; 32]) -> bool {
    let body = match bytes.len() {
        LEN => BODY,
        LEN_V2 => LEN_V2 - 16,
        LEN_ALLOC => BODY_ALLOC,
        _ => return false,
    };
    let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        return false;
    };
    m.update(&bytes[..body]);
    m.verify_truncated_left(&bytes[body..]).is_ok()
}

/// Whether a pong (MAC checked) answers the ping sent to `sent_to` (the probe address its nonce went to,
/// `None` when no such ping is outstanding): it arrived `from` that address and, in version 3, echoes it
/// as its target. A version-2 pong has no target; its source must still match.
pub fn bound(sent_to: Option<SocketAddr>, pong: &Probe, from: SocketAddr, v2: bool) -> bool {
    let Some(to) = sent_to else {
        return false;
    };
    from == to && (v2 || pong.target == Some(to))
}

/// Why a ping gets no pong (after its MAC passed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its timestamp is outside [`WINDOW`] of our clock: recorded earlier (or a clock far off).
    Stale,
    /// Its nonce was answered already, inside the window.
    Replayed,
    /// The sender has more pings inside the window than any honest prober sends.
    Full,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Stale => "stale",
            Refusal::Replayed => "replayed",
            Refusal::Full => "full",
        }
    }
}

/// At most this many pings remembered per sender. An honest prober sends at most a few per second per
/// path (4/s on the active one): 4096 inside a minute is far beyond any.
const PER_SENDER: usize = 4096;

/// The pings a responder answered lately, per sender: each is answered once, and only while its timestamp
/// is inside [`WINDOW`]; older entries can go, since their pings would be refused as stale anyway.
/// Memory is bounded by the known peers (only authenticated pings are recorded) times [`PER_SENDER`].
#[derive(Debug, Default)]
pub struct Replay {
    seen: HashMap<PublicKey, VecDeque<(u64, u64)>>,
}

impl Replay {
    /// Whether an authenticated ping may be answered at `now_us` (our wall clock); records it if so.
    pub fn admit(
        &mut self,
        sender: PublicKey,
        nonce: u64,
        timestamp_us: u64,
        now_us: u64,
    ) -> Result<(), Refusal> {
        let window = u64::try_from(WINDOW.as_micros()).unwrap_or(u64::MAX);
        if timestamp_us.abs_diff(now_us) > window {
            return Err(Refusal::Stale);
        }
        let oldest = now_us.saturating_sub(window);
        let seen = self.seen.entry(sender).or_default();
        // Mostly in order: drop the old head cheaply, everything old when the list is full.
        while seen.front().is_some_and(|(ts, _)| *ts < oldest) {
            seen.pop_front();
        }
        if seen.iter().any(|(_, n)| *n == nonce) {
            return Err(Refusal::Replayed);
        }
        if seen.len() >= PER_SENDER {
            seen.retain(|(ts, _)| *ts >= oldest);
            if seen.len() >= PER_SENDER {
                return Err(Refusal::Full);
            }
        }
        seen.push_back((timestamp_us, nonce));
        Ok(())
    }

    /// Forgets senders that are no longer peers.
    pub fn retain(&mut self, known: impl Fn(&PublicKey) -> bool) {
        self.seen.retain(|k, _| known(k));
    }
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
            target: Some("192.0.2.1:51822".parse().unwrap()),
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
        assert!(decode(&bytes[..LEN - 1]).is_none());
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
            let mut retargeted = bytes.clone();
            retargeted[89] ^= 1;
            assert!(!verify(&retargeted, &kab), "the target is under the MAC");
            let mut aged = bytes.clone();
            aged[55] ^= 1;
            assert!(!verify(&aged, &kab), "the timestamp is under the MAC");
        }
        // Version 1 (72 bytes) is refused, and so is a version-3 datagram cut to version 2's size.
        assert!(decode(&bytes[..72]).is_none());
        assert!(decode(&bytes[..90]).is_none());
        assert!(!verify(&bytes[..90], &kba));
        // Version 2 (the rolling upgrade): no target, the MAC over its own 74 bytes.
        let old = encode_v2(&ping, &kab);
        assert_eq!(old.len(), LEN_V2);
        assert!(is_v2(&old) && !is_v2(&bytes));
        assert_eq!(
            decode(&old),
            Some(Probe {
                target: None,
                ..ping
            })
        );
        assert!(verify(&old, &kba));
        let mut bad = old.clone();
        bad[41] ^= 1;
        assert!(!verify(&bad, &kba));
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
        for v in [1, 2, 4] {
            let mut other = bytes2.clone();
            other[4] = v;
            assert!(decode(&other).is_none());
        }
        assert_eq!(probe_addr("192.0.2.1:51821".parse().unwrap()).port(), 51822);
    }

    #[test]
    fn a_ping_is_answered_once_and_only_inside_the_window() {
        let a = PrivateKey::generate().public();
        let b = PrivateKey::generate().public();
        let w = u64::try_from(WINDOW.as_micros()).unwrap();
        let now = 1_800_000_000_000_000u64;
        let mut r = Replay::default();
        assert_eq!(r.admit(a, 1, now, now), Ok(()));
        // The same ping again, at once or later inside the window: no pong (never a reflector).
        assert_eq!(r.admit(a, 1, now, now + 1), Err(Refusal::Replayed));
        assert_eq!(r.admit(a, 1, now, now + w), Err(Refusal::Replayed));
        // Recorded and replayed after the window: stale, even though its nonce was forgotten.
        assert_eq!(r.admit(a, 1, now, now + w + 1), Err(Refusal::Stale));
        // A clock ahead by more than the window is refused too; inside it, answered.
        assert_eq!(r.admit(a, 2, now + w + 1, now), Err(Refusal::Stale));
        assert_eq!(r.admit(a, 3, now + w, now), Ok(()));
        // Nonces are per sender.
        assert_eq!(r.admit(b, 1, now, now + 2), Ok(()));
        // Bounded: a sender that floods valid pings fills its list and gets no more pongs until entries
        // age out; other senders are not affected.
        let mut flood = Replay::default();
        for n in 0..PER_SENDER as u64 {
            assert_eq!(flood.admit(a, 1000 + n, now, now), Ok(()));
        }
        assert_eq!(flood.admit(a, 7, now, now), Err(Refusal::Full));
        assert_eq!(flood.admit(b, 7, now, now), Ok(()));
        assert_eq!(
            flood.admit(a, 8, now + w + 1, now + 2 * w + 1),
            Ok(()),
            "old entries age out"
        );
        flood.retain(|k| *k == b);
        assert_eq!(flood.seen.len(), 1);
    }

    /// A valid v3 ping and v2 ping between two fresh keys, and the key that checks them.
    fn samples() -> (Vec<u8>, Vec<u8>, [u8; 32]) {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let k = key(&a.shared(&b.public()));
        let ping = Probe {
            kind: Kind::Ping,
            sender: a.public(),
            nonce: 0x0123_4567_89ab_cdef,
            timestamp_us: now_us(),
            observed: None,
            target: Some("192.0.2.1:51822".parse().unwrap()),
            flags: 0,
        };
        (encode(&ping, &k), encode_v2(&ping, &k), k)
    }

    /// Every truncation (and one byte too many) of a valid datagram, in both versions: nothing panics,
    /// nothing but the whole datagram decodes or verifies.
    #[test]
    fn truncated_datagrams_of_every_length_are_refused() {
        let (v3, v2, k) = samples();
        for whole in [&v3, &v2] {
            let mut longer = whole.clone();
            longer.push(0);
            assert!(decode(&longer).is_none() && !verify(&longer, &k));
            for len in 0..whole.len() {
                let cut = &whole[..len];
                // A v3 datagram cut to v2's size has version byte 3: not a v2 datagram either.
                assert!(decode(cut).is_none(), "{} bytes of {}", len, whole.len());
                assert!(!verify(cut, &k), "{} bytes of {}", len, whole.len());
            }
            assert!(decode(whole).is_some() && verify(whole, &k));
        }
    }

    /// Every single-bit flip of a valid datagram, in both versions: either it no longer decodes, or its MAC
    /// no longer verifies. None is taken as what was sent.
    #[test]
    fn no_flipped_bit_passes() {
        let (v3, v2, k) = samples();
        for whole in [&v3, &v2] {
            for bit in 0..whole.len() * 8 {
                let mut flipped = whole.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    decode(&flipped).is_none() || !verify(&flipped, &k),
                    "bit {bit} of a {}-byte datagram flipped and still taken",
                    whole.len()
                );
            }
        }
    }

    #[test]
    fn clock_offset_from_a_pong() {
        let ms = Duration::from_millis;
        // The peer stamped 10.000 s; the pong took half of a 40 ms round trip and arrived 5 ms before our
        // clock read 9.025 s: we stamped-equivalent 9.000 s, so the peer is 1 s ahead.
        assert_eq!(
            clock_offset_ms(10_000_000, 9_025_000, ms(5), ms(40)),
            Some(1000)
        );
        assert_eq!(
            clock_offset_ms(8_000_000, 9_025_000, ms(5), ms(40)),
            Some(-1000)
        );
        assert_eq!(clock_offset_ms(0, 0, ms(0), ms(0)), Some(0));
        assert_eq!(
            clock_offset_ms(u64::MAX, 0, Duration::MAX, Duration::MAX),
            None,
            "out of range, not a panic"
        );
        assert!(clock_offset_ms(u64::MAX, 0, ms(0), ms(0)).is_some());
    }

    /// The window's edges are inclusive, exactly `WINDOW` either way; timestamps at the integer extremes
    /// (a sender's clock wild, or the fields of a forged-but-authenticated ping) are stale, never a panic
    /// or an overflow; a responder whose clock reads 0 (before 1970) or the maximum refuses likewise.
    #[test]
    fn timestamps_at_the_window_edges_and_the_extremes() {
        let a = PrivateKey::generate().public();
        let w = u64::try_from(WINDOW.as_micros()).unwrap();
        let now = 1_800_000_000_000_000u64;
        let mut r = Replay::default();
        assert_eq!(r.admit(a, 1, now - w, now), Ok(()));
        assert_eq!(r.admit(a, 2, now + w, now), Ok(()));
        assert_eq!(r.admit(a, 3, now - w - 1, now), Err(Refusal::Stale));
        assert_eq!(r.admit(a, 4, now + w + 1, now), Err(Refusal::Stale));
        #[allow(clippy::cast_sign_loss)] // the i64 extremes as the u64 bits on the wire
        for ts in [
            0,
            1,
            u64::MAX,
            u64::MAX - 1,
            i64::MAX as u64,
            i64::MIN as u64,
            (-1i64) as u64,
        ] {
            assert_eq!(r.admit(a, 100, ts, now), Err(Refusal::Stale), "{ts}");
        }
        // Our clock at the extremes: no overflow; the same rule.
        let mut r = Replay::default();
        assert_eq!(r.admit(a, 1, w, 0), Ok(()));
        assert_eq!(r.admit(a, 2, w + 1, 0), Err(Refusal::Stale));
        assert_eq!(r.admit(a, 3, u64::MAX, 0), Err(Refusal::Stale));
        assert_eq!(r.admit(a, 4, u64::MAX, u64::MAX), Ok(()));
        assert_eq!(r.admit(a, 5, u64::MAX - w, u64::MAX), Ok(()));
        assert_eq!(r.admit(a, 6, 0, u64::MAX), Err(Refusal::Stale));
        assert_eq!(r.admit(a, 4, u64::MAX, u64::MAX), Err(Refusal::Replayed));
    }

    /// An attacker who records 4,097 pings of one sender (one more than the list holds), sent in and out
    /// of timestamp order, and replays all of them again and again as the window moves on: no ping is ever
    /// answered twice. (The one refused as `Full` may be answered once later, inside its window: it never
    /// was before.)
    #[test]
    fn a_full_replay_list_never_lets_a_replay_through() {
        let a = PrivateKey::generate().public();
        let w = u64::try_from(WINDOW.as_micros()).unwrap();
        let now = 1_800_000_000_000_000u64;
        let recorded = PER_SENDER as u64 + 1;
        // Timestamps 100 µs apart; every other one sent late (out of order, as over two paths).
        let mut order: Vec<u64> = (0..recorded).collect();
        for pair in order.chunks_mut(2) {
            pair.reverse();
        }
        let ts = |n: u64| now + n * 100;
        for reversed in [false, true] {
            let mut r = Replay::default();
            let mut answered = vec![0u32; order.len()];
            let mut sends = order.clone();
            if reversed {
                sends.reverse();
            }
            let mut admit = |r: &mut Replay, n: u64, at: u64| {
                if r.admit(a, n, ts(n), at).is_ok() {
                    answered[usize::try_from(n).unwrap()] += 1;
                }
            };
            for &n in &sends {
                admit(&mut r, n, ts(n));
            }
            // Replays: at once, across the window's end for the first ones (they go stale while the last
            // are still inside), and after every one is stale.
            let last = ts(recorded - 1);
            for at in [last, now + w, now + w + 200_000, last + w, last + w + 1] {
                for &n in &sends {
                    admit(&mut r, n, at);
                }
            }
            let twice: Vec<_> = answered
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 1)
                .collect();
            assert!(twice.is_empty(), "answered more than once: {twice:?}");
            let first = answered.iter().filter(|c| **c == 1).count();
            assert!(
                first >= PER_SENDER,
                "{first} answered (reversed: {reversed})"
            );
        }
    }

    /// An allocation request and its grant or refusal: round trip under the MAC (the other party, the
    /// port and the lifetime included), every truncation and bit flip refused, and the kinds kept apart
    /// (a ping is no allocation message, an allocation message no ping).
    #[test]
    fn allocation_messages() {
        let (a, r, b) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let k = key(&a.shared(&r.public()));
        let request = Probe {
            kind: Kind::Allocate,
            sender: a.public(),
            nonce: 9,
            timestamp_us: now_us(),
            observed: None,
            target: Some("192.0.2.1:51822".parse().unwrap()),
            flags: 0,
        };
        let ask = Alloc {
            other: b.public(),
            result: AllocResult::Granted,
            port: 0,
            lifetime_s: 0,
        };
        let bytes = encode_alloc(&request, &ask, &k);
        assert_eq!(bytes.len(), LEN_ALLOC);
        assert_eq!(decode_alloc(&bytes), Some((request, ask)));
        assert!(verify(&bytes, &k));
        assert!(decode(&bytes).is_none(), "not a ping");
        let grant = Probe {
            kind: Kind::Grant,
            sender: r.public(),
            observed: Some("198.51.100.7:40000".parse().unwrap()),
            ..request
        };
        let granted = Alloc {
            port: 41234,
            lifetime_s: 60,
            ..ask
        };
        let refused = Alloc {
            result: AllocResult::UnknownParty,
            ..ask
        };
        for (probe, alloc) in [(request, ask), (grant, granted), (grant, refused)] {
            let whole = encode_alloc(&probe, &alloc, &k);
            assert_eq!(decode_alloc(&whole), Some((probe, alloc)));
            assert!(verify(&whole, &k));
            for len in 0..whole.len() {
                assert!(decode_alloc(&whole[..len]).is_none() && !verify(&whole[..len], &k));
            }
            for bit in 0..whole.len() * 8 {
                let mut flipped = whole.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    decode_alloc(&flipped).is_none() || !verify(&flipped, &k),
                    "bit {bit} flipped and still taken"
                );
            }
        }
        // A grant without a port or lifetime, a refusal with one, a request with either, an unknown
        // result: refused before the MAC.
        let bad = |probe: &Probe, alloc: Alloc| decode_alloc(&encode_alloc(probe, &alloc, &k));
        assert!(bad(&grant, Alloc { port: 0, ..granted }).is_none());
        assert!(
            bad(
                &grant,
                Alloc {
                    lifetime_s: 0,
                    ..granted
                }
            )
            .is_none()
        );
        let mut refusal_with_port = encode_alloc(&grant, &refused, &k);
        refusal_with_port[127] = 1;
        assert!(decode_alloc(&refusal_with_port).is_none());
        let mut request_with_port = encode_alloc(&request, &ask, &k);
        request_with_port[127] = 1;
        assert!(decode_alloc(&request_with_port).is_none());
        let mut unknown = encode_alloc(&grant, &refused, &k);
        unknown[124] = 99;
        assert!(decode_alloc(&unknown).is_none());
        // A ping is no allocation message, whatever its length.
        let (ping, _, _) = samples();
        assert!(decode_alloc(&ping).is_none());
        let mut padded = ping.clone();
        padded.resize(LEN_ALLOC, 0);
        assert!(decode_alloc(&padded).is_none(), "kind 1 in 148 bytes");
        for code in 0..=5 {
            assert_eq!(
                AllocResult::from_code(code).map(AllocResult::code),
                Some(code)
            );
        }
    }

    #[test]
    fn a_pong_counts_only_for_the_endpoint_its_ping_went_to() {
        let a: SocketAddr = "192.0.2.12:51822".parse().unwrap();
        let b: SocketAddr = "198.51.100.12:51822".parse().unwrap();
        let pong = |target| Probe {
            kind: Kind::Pong,
            sender: crate::identity::PrivateKey([1; 32]).public(),
            nonce: 1,
            timestamp_us: 0,
            observed: None,
            target,
            flags: 0,
        };
        assert!(bound(Some(a), &pong(Some(a)), a, false));
        // The ping for path A carried to B and answered there: the pong echoes A but comes from B.
        assert!(!bound(Some(a), &pong(Some(a)), b, false));
        // A pong echoing another target, even from the right address.
        assert!(!bound(Some(a), &pong(Some(b)), a, false));
        assert!(!bound(Some(a), &pong(None), a, false));
        // No outstanding ping with that nonce.
        assert!(!bound(None, &pong(Some(a)), a, false));
        // Version 2: no target, the source decides.
        assert!(bound(Some(a), &pong(None), a, true));
        assert!(!bound(Some(a), &pong(None), b, true));
    }
}
