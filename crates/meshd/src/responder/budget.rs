//! How many datagrams may cost an HMAC check, so a flood at the probe port cannot raise the CPU or delay
//! real pongs.
//!
//! A datagram that does not decode, or names a sender we do not know, costs no HMAC (dropped before). The
//! rest is checked only within a budget: a source address (IP and port) that sent an authenticated probe
//! lately has a token bucket of its own ([`SOURCE_RATE`], far above any honest prober's few per second),
//! every other source shares one ([`SHARED_RATE`]). So forged datagrams from many addresses wait in the
//! shared bucket while the peers already probing keep theirs; only someone who sends from a peer's exact
//! address and port (an on-path attacker, who could drop its packets anyway) can eat into a peer's bucket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::bucket::Bucket;

/// Checks per second for a source that authenticated lately.
pub const SOURCE_RATE: f64 = 100.0;
/// Checks per second shared by all other sources.
pub const SHARED_RATE: f64 = 500.0;
/// A source stays verified this long after its last authenticated datagram.
pub const VERIFIED_FOR: Duration = Duration::from_secs(120);
/// At most this many verified sources (then the stalest is forgotten).
pub const MAX_SOURCES: usize = 4096;

/// The HMAC budget of one probe socket.
#[derive(Debug)]
pub struct Budget {
    /// Verified sources: their bucket and their last authenticated datagram.
    verified: HashMap<SocketAddr, (Bucket, Instant)>,
    shared: Bucket,
}

impl Budget {
    pub fn new(now: Instant) -> Budget {
        Budget {
            verified: HashMap::new(),
            shared: Bucket::full(SHARED_RATE, now),
        }
    }

    /// Whether a datagram from `from` may cost an HMAC check now.
    pub fn allow(&mut self, from: SocketAddr, now: Instant) -> bool {
        match self.verified.get_mut(&from) {
            Some((bucket, seen)) if now.saturating_duration_since(*seen) < VERIFIED_FOR => {
                bucket.take(SOURCE_RATE, 1.0, now)
            }
            _ => self.shared.take(SHARED_RATE, 1.0, now),
        }
    }

    /// A datagram from `from` passed its HMAC check: the source has a bucket of its own from now on.
    pub fn verified(&mut self, from: SocketAddr, now: Instant) {
        if let Some((_, seen)) = self.verified.get_mut(&from) {
            *seen = now;
            return;
        }
        if self.verified.len() >= MAX_SOURCES {
            self.verified
                .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < VERIFIED_FOR);
            if self.verified.len() >= MAX_SOURCES
                && let Some(stalest) = self
                    .verified
                    .iter()
                    .min_by_key(|(_, (_, seen))| *seen)
                    .map(|(a, _)| *a)
            {
                self.verified.remove(&stalest);
            }
        }
        self.verified
            .insert(from, (Bucket::full(SOURCE_RATE, now), now));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addr(i: u32) -> SocketAddr {
        SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 40000))
    }

    #[test]
    fn a_flood_from_unknown_sources_leaves_verified_peers_their_budget() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        let peer = addr(1);
        assert!(b.allow(peer, t0));
        b.verified(peer, t0);
        // A second of forged datagrams from 10 000 addresses: the shared bucket caps the HMACs at its rate.
        let mut checked = 0;
        for i in 0..10_000u32 {
            let at = t0 + Duration::from_micros(u64::from(i) * 100);
            if b.allow(addr(1000 + i), at) {
                checked += 1;
            }
            // The peer pings 10 times a second throughout: every one is checked.
            if i % 1000 == 0 {
                assert!(b.allow(peer, at), "the verified peer is never throttled");
            }
        }
        let max = (SHARED_RATE * 2.0) as usize + 1;
        assert!(checked <= max, "{checked} HMACs in a second, over {max}");
        // Forged datagrams from the peer's own address use its bucket only, capped at its rate.
        let t1 = t0 + Duration::from_secs(5);
        let spoofed = (0..1000).filter(|_| b.allow(peer, t1)).count();
        assert_eq!(spoofed, SOURCE_RATE as usize);
        // A verified source is forgotten after VERIFIED_FOR: back to the shared bucket.
        let late = t0 + VERIFIED_FOR + Duration::from_secs(1);
        let shared = (0..2000).filter(|_| b.allow(peer, late)).count();
        assert_eq!(shared, SHARED_RATE as usize);
    }

    #[test]
    fn verified_sources_are_bounded() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        for i in 0..(MAX_SOURCES as u32 + 10) {
            b.verified(addr(i), t0 + Duration::from_millis(u64::from(i)));
        }
        assert!(b.verified.len() <= MAX_SOURCES);
        // The newest stays.
        assert!(b.verified.contains_key(&addr(MAX_SOURCES as u32 + 9)));
    }
}
