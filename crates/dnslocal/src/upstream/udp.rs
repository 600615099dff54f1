//! UDP to one upstream, hardened against off-path spoofing:
//!
//! - every query leaves from a socket bound to a fresh random port (the kernel picks it at random from
//!   the ephemeral range), as long as the port budget allows; the socket is `connect`ed, so the kernel drops
//!   datagrams from any other source address or port;
//! - a random ID and, where the upstream echoes it, 0x20 case randomisation of the QNAME;
//! - a datagram that does not match (ID, the exact question bytes including their case) is counted and
//!   skipped: the exchange keeps waiting for the real answer, so a spoofed datagram cannot turn it into a
//!   failure either.
//!
//! Conntrack: a socket that carried one query is kept for reuse (at most [`IDLE`] of them); new ports are
//! opened at most [`FRESH_PER_SEC`] a second (burst [`FRESH_BURST`]), beyond that an idle socket is reused
//! (its port is known to anyone who saw its earlier query: less entropy under a flood of misses, never more
//! conntrack entries). Each port costs one conntrack entry for `nf_conntrack_udp_timeout` (30 s) after its
//! last datagram, so one upstream holds at most `FRESH_PER_SEC * 30 + FRESH_BURST + IDLE` entries (about
//! 8,000) plus one per miss in flight.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use tokio::net::UdpSocket;

use super::{Failure, io_failure, lock};
use crate::metrics::Metrics;
use crate::wire;

/// Idle sockets kept per upstream for reuse.
pub const IDLE: usize = 64;
/// New source ports per second per upstream (the conntrack bound, see the module docs).
pub const FRESH_PER_SEC: f64 = 250.0;
pub const FRESH_BURST: f64 = 250.0;
/// Answers arriving with the right ID but the question's case changed, without a matching answer in
/// between, after which the upstream is taken not to echo case and gets queries without 0x20.
pub const CASE_STRIKES: u32 = 3;
/// The largest UDP answer read; a larger one is taken as truncated (retried over TCP).
const MAX_ANSWER: usize = 4096;

/// A token bucket for new ports.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * FRESH_PER_SEC;
        self.tokens = (self.tokens + refill).min(FRESH_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How a received datagram relates to the query that was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// ID and question (byte for byte) match: the answer.
    Exact,
    /// ID matches, the question only when case is ignored: an upstream that does not echo case, or a forgery.
    CaseOnly,
    /// Anything else: a late answer to an earlier query, or a forgery.
    No,
}

/// Compares an answer with the query `sent` (whose question ends at `question_end`).
pub fn classify(answer: &[u8], sent: &[u8], question_end: usize) -> Match {
    let header_ok = answer.len() >= wire::HEADER
        && answer[..2] == sent[..2]
        && answer[2] & 0x80 != 0
        && answer[4..6] == [0, 1];
    let (Some(theirs), Some(ours)) = (
        answer.get(wire::HEADER..question_end),
        sent.get(wire::HEADER..question_end),
    ) else {
        return Match::No;
    };
    if !header_ok {
        Match::No
    } else if theirs == ours {
        Match::Exact
    } else if theirs.eq_ignore_ascii_case(ours) {
        Match::CaseOnly
    } else {
        Match::No
    }
}

/// Flips the case of each letter of the wire-format name `name` at random; returns whether it has letters.
pub fn randomise_case(name: &mut [u8]) -> bool {
    let mut off = 0;
    let mut letters = false;
    while let Some(&len) = name.get(off) {
        if len == 0 || len & 0xC0 != 0 {
            break;
        }
        let end = (off + 1 + usize::from(len)).min(name.len());
        for b in &mut name[off + 1..end] {
            if b.is_ascii_alphabetic() {
                letters = true;
                *b = if fastrand::bool() {
                    b.to_ascii_uppercase()
                } else {
                    b.to_ascii_lowercase()
                };
            }
        }
        off = end;
    }
    letters
}

/// The UDP side of one upstream.
#[derive(Debug)]
pub struct UdpPorts {
    addr: SocketAddr,
    label: String,
    idle: Mutex<Vec<UdpSocket>>,
    bucket: Mutex<Bucket>,
    case_strikes: AtomicU32,
}

impl UdpPorts {
    pub fn new(addr: SocketAddr) -> UdpPorts {
        UdpPorts {
            addr,
            label: addr.to_string(),
            idle: Mutex::new(Vec::new()),
            bucket: Mutex::new(Bucket {
                tokens: FRESH_BURST,
                at: Instant::now(),
            }),
            case_strikes: AtomicU32::new(0),
        }
    }

    /// Whether queries to this upstream get 0x20 case randomisation.
    pub fn uses_0x20(&self) -> bool {
        self.case_strikes.load(Ordering::Relaxed) < CASE_STRIKES
    }

    async fn fresh(&self) -> Result<UdpSocket, Failure> {
        let local: SocketAddr = if self.addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(local).await.map_err(|e| io_failure(&e))?;
        socket
            .connect(self.addr)
            .await
            .map_err(|e| io_failure(&e))?;
        Ok(socket)
    }

    /// A fresh port when the budget allows, else an idle socket (its queue emptied), else a fresh one.
    async fn acquire(&self) -> Result<UdpSocket, Failure> {
        if lock(&self.bucket).take(Instant::now()) {
            return self.fresh().await;
        }
        let reused = {
            let mut idle = lock(&self.idle);
            if idle.is_empty() {
                None
            } else {
                let i = fastrand::usize(..idle.len());
                Some(idle.swap_remove(i))
            }
        };
        match reused {
            Some(socket) => {
                let mut buf = [0u8; 1];
                while socket.try_recv(&mut buf).is_ok() {}
                Ok(socket)
            }
            None => self.fresh().await,
        }
    }

    fn release(&self, socket: UdpSocket) {
        let mut idle = lock(&self.idle);
        if idle.len() < IDLE {
            idle.push(socket);
        }
    }

    /// Sends `query` (its ID is replaced; `question_end` ends its question) and waits for the matching answer,
    /// returned with the question's case as in `query`. The caller bounds the wait (dropping the future).
    pub async fn exchange(
        &self,
        query: &[u8],
        question_end: usize,
        metrics: &Metrics,
    ) -> Result<Vec<u8>, Failure> {
        let socket = self.acquire().await?;
        let mut sent = query.to_vec();
        sent[..2].copy_from_slice(&fastrand::u16(..).to_be_bytes());
        let qname_end = question_end.saturating_sub(4);
        let mixed = self.uses_0x20()
            && sent
                .get_mut(wire::HEADER..qname_end)
                .is_some_and(randomise_case);
        socket.send(&sent).await.map_err(|e| io_failure(&e))?;
        let mut buf = vec![0u8; MAX_ANSWER];
        let n = loop {
            let n = socket.recv(&mut buf).await.map_err(|e| io_failure(&e))?;
            match classify(&buf[..n], &sent, question_end) {
                Match::Exact => {
                    if mixed {
                        self.case_strikes.store(0, Ordering::Relaxed);
                    }
                    break n;
                }
                Match::CaseOnly if !mixed => break n,
                Match::CaseOnly => {
                    metrics.upstream_mismatched(&self.label);
                    if self.case_strikes.fetch_add(1, Ordering::Relaxed) + 1 == CASE_STRIKES {
                        tracing::warn!(upstream = %self.addr, "the upstream does not echo the question's case: no 0x20 randomisation for it");
                    }
                }
                Match::No => metrics.upstream_mismatched(&self.label),
            }
        };
        let mut answer = buf;
        answer.truncate(n);
        if n >= MAX_ANSWER {
            answer[2] |= 0x02; // cut short by our buffer: take it as truncated
        }
        // The question back in the case the caller sent.
        if let (Some(dst), Some(src)) = (
            answer.get_mut(wire::HEADER..question_end),
            query.get(wire::HEADER..question_end),
        ) {
            dst.copy_from_slice(src);
        }
        self.release(socket);
        Ok(answer)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A query for `name` (A, IN) with ID 0, as the engine builds it.
    fn query(name: &str) -> (Vec<u8>, usize) {
        let q = wire::testing::query_with_id(name, hickory_proto::rr::RecordType::A, 0, None);
        let end = q.len();
        (q, end)
    }

    /// Answers each query with the datagrams `reply` makes of it, from a thread.
    fn upstream(reply: fn(&[u8]) -> Vec<Vec<u8>>) -> SocketAddr {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                for d in reply(&buf[..n]) {
                    let _ = socket.send_to(&d, peer);
                }
            }
        });
        addr
    }

    fn response(q: &[u8]) -> Vec<u8> {
        let mut a = q.to_vec();
        a[2] |= 0x80;
        a
    }

    #[test]
    fn classify_and_case_randomisation() {
        let (q, end) = query("www.example.test");
        let mut sent = q.clone();
        let mut tries = 0;
        while !(randomise_case(&mut sent[12..end - 4]) && sent != q) {
            tries += 1;
            assert!(tries < 10, "no case ever changed");
            sent.clone_from(&q);
        }
        assert!(sent[12..end].eq_ignore_ascii_case(&q[12..end]));
        assert_eq!(classify(&response(&sent), &sent, end), Match::Exact);
        assert_eq!(classify(&response(&q), &sent, end), Match::CaseOnly);
        let mut other_id = response(&sent);
        other_id[1] ^= 1;
        assert_eq!(classify(&other_id, &sent, end), Match::No);
        assert_eq!(classify(&sent, &sent, end), Match::No, "not a response");
        assert_eq!(classify(&[0; 5], &sent, end), Match::No);
        let mut digits = wire::name_to_wire("1.2.3.4.in-addr.arpa");
        let before = digits.clone();
        assert!(!randomise_case(&mut digits[..8]), "digits have no case");
        assert_eq!(digits, before);
    }

    /// Forged datagrams (wrong ID, wrong case) before the real answer do not end the exchange.
    #[tokio::test]
    async fn forgeries_are_skipped_and_the_real_answer_taken() {
        let addr = upstream(|q| {
            let real = response(q);
            let mut wrong_id = real.clone();
            wrong_id[0] ^= 0x55;
            let mut wrong_case = real.clone();
            for b in &mut wrong_case[12..] {
                if b.is_ascii_alphabetic() {
                    *b ^= 0x20;
                    break;
                }
            }
            vec![wrong_id, wrong_case, real]
        });
        let ports = UdpPorts::new(addr);
        let (q, end) = query("www.example.test");
        for _ in 0..5 {
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                ports.exchange(&q, end, &Metrics::default()),
            )
            .await
            .unwrap()
            .unwrap();
            assert_eq!(
                &answer[12..end],
                &q[12..end],
                "the question comes back as asked"
            );
            assert!(
                ports.uses_0x20(),
                "forged case mismatches must not turn 0x20 off"
            );
        }
    }

    /// An upstream that answers with the question lower-cased: after three strikes, no more 0x20.
    #[tokio::test]
    async fn an_upstream_that_does_not_echo_case_loses_0x20() {
        let addr = upstream(|q| {
            let mut a = response(q);
            a[12..].make_ascii_lowercase();
            vec![a]
        });
        let ports = UdpPorts::new(addr);
        let (q, end) = query("www.example.test");
        let metrics = Metrics::default();
        let mut failed = 0;
        for _ in 0..CASE_STRIKES {
            let r = tokio::time::timeout(
                Duration::from_millis(200),
                ports.exchange(&q, end, &metrics),
            )
            .await;
            failed += u32::from(r.is_err());
        }
        assert_eq!(failed, CASE_STRIKES);
        assert!(!ports.uses_0x20());
        let answer =
            tokio::time::timeout(Duration::from_secs(2), ports.exchange(&q, end, &metrics))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(&answer[12..end], &q[12..end]);
    }

    #[test]
    fn new_ports_are_rationed() {
        let start = Instant::now();
        let mut b = Bucket {
            tokens: FRESH_BURST,
            at: start,
        };
        let burst = (0..1000).filter(|_| b.take(start)).count();
        assert_eq!(burst as f64, FRESH_BURST);
        let later = start + std::time::Duration::from_millis(100);
        let refill = (0..1000).filter(|_| b.take(later)).count();
        assert_eq!(refill as f64, FRESH_PER_SEC / 10.0);
    }
}
