//! Peers for dnslocal's hardening tests: an upstream relay that races every query with forged answers (an
//! attacker that sees the queries: the strongest spoofer, which off-path ones can only approximate by
//! guessing), a zone of 60 KiB answers, and helpers for raw queries and the daemon's memory.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::spawn_in;

/// The forged address every forged answer carries.
pub const FORGED: [u8; 4] = [6, 6, 6, 6];

/// What the relay saw of one query from dnslocal.
#[derive(Debug, Clone)]
pub struct Seen {
    pub source_port: u16,
    /// The QNAME as sent (wire format, case as sent).
    pub qname: Vec<u8>,
}

/// A UDP upstream at `addr` that, for each query, first sends three forged answers (A 6.6.6.6, TTL 3600):
/// one with a wrong ID, one with the right ID but the question's case flipped, one with everything right but
/// from another source address (`wrong_source`); then relays the query to `real` and sends the real answer.
#[derive(Debug)]
pub struct SpoofingRelay {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn qname_end(q: &[u8]) -> Option<usize> {
    let mut off = 12;
    loop {
        let len = usize::from(*q.get(off)?);
        if len & 0xC0 != 0 {
            return None;
        }
        off += 1 + len;
        if len == 0 {
            return Some(off);
        }
    }
}

/// A forged answer to `query`: its question, one A record 6.6.6.6 with TTL 3600.
fn forge(query: &[u8]) -> Option<Vec<u8>> {
    let end = qname_end(query)? + 4;
    let mut a = query.get(..end)?.to_vec();
    a[2] = 0x81;
    a[3] = 0x80;
    a[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    a.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0x0E, 0x10, 0, 4]);
    a.extend_from_slice(&FORGED);
    Some(a)
}

impl SpoofingRelay {
    pub fn start(
        netns: &str,
        addr: SocketAddr,
        wrong_source: SocketAddr,
        real: SocketAddr,
    ) -> SpoofingRelay {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = spawn_in(netns, move || {
            let socket = UdpSocket::bind(addr).expect("bind relay");
            let other = UdpSocket::bind(wrong_source).expect("bind the wrong source");
            let upstream = UdpSocket::bind("0.0.0.0:0").expect("bind relay client");
            upstream
                .connect(real)
                .expect("connect to the real upstream");
            upstream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let _ = ready_tx.send(());
            let mut buf = [0u8; 4096];
            let mut answer = [0u8; 65535];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let query = &buf[..n];
                let Some(end) = qname_end(query) else {
                    continue;
                };
                seen2.lock().expect("seen").push(Seen {
                    source_port: peer.port(),
                    qname: query[12..end].to_vec(),
                });
                if let Some(forged) = forge(query) {
                    let mut wrong_id = forged.clone();
                    wrong_id[0] ^= 0x55;
                    let _ = socket.send_to(&wrong_id, peer);
                    let mut wrong_case = forged.clone();
                    if let Some(i) = (12..end).find(|&i| wrong_case[i].is_ascii_alphabetic()) {
                        wrong_case[i] ^= 0x20;
                        let _ = socket.send_to(&wrong_case, peer);
                    }
                    let _ = other.send_to(&forged, peer);
                }
                if upstream.send(query).is_err() {
                    continue;
                }
                if let Ok(m) = upstream.recv(&mut answer) {
                    let _ = socket.send_to(&answer[..m], peer);
                }
            }
        });
        ready_rx.recv().expect("relay started");
        SpoofingRelay {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Queries relayed so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Distinct source ports of the queries so far.
    pub fn distinct_ports(&self) -> usize {
        self.seen()
            .iter()
            .map(|s| s.source_port)
            .collect::<HashSet<_>>()
            .len()
    }
}

impl Drop for SpoofingRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A zone `bulk.test` with `names` names `b0`..: each a TXT RRset of 30 records of 8 × 255 bytes, about
/// 60 KiB on the wire (over UDP truncated; dnslocal fetches it over TCP).
pub fn bulk_zone(names: usize) -> (&'static str, String) {
    let mut text = String::from(
        "$TTL 3600\n@ IN SOA ns.bulk.test. h.bulk.test. 1 3600 600 86400 60\n@ IN NS ns.bulk.test.\nns IN A 127.0.0.11\n",
    );
    let strings: String = (0..8)
        .map(|i| format!(" \"{}\"", char::from(b'a' + i).to_string().repeat(255)))
        .collect();
    for n in 0..names {
        for r in 0..30 {
            text.push_str(&format!("b{n} IN TXT \"{r}\"{strings}\n"));
        }
    }
    ("bulk.test", text)
}

/// A raw query for `name` of type `qtype`, with `id`; `edns`: an OPT record with this UDP size.
pub fn raw_query(name: &str, qtype: u16, id: u16, edns: Option<u16>) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    if let Some(size) = edns {
        q.extend_from_slice(&[0, 0, 41]);
        q.extend_from_slice(&size.to_be_bytes());
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    q
}

/// Sends `query` from `from` to `server` over UDP in `netns`; the answer, if one came within 2 s.
pub fn udp_exchange(
    netns: &str,
    from: SocketAddr,
    server: SocketAddr,
    query: Vec<u8>,
) -> Option<Vec<u8>> {
    spawn_in(netns, move || {
        let socket = UdpSocket::bind(from).expect("bind client");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        socket.send_to(&query, server).expect("send");
        let mut buf = vec![0u8; 65535];
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    })
    .join()
    .expect("client thread")
}

/// The resident set of process `pid`, in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
