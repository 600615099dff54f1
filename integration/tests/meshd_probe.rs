//! The probe protocol against a running meshd (userspace backend, network namespaces): a replayed ping
//! and a ping with an old (or future) timestamp get no pong, a pong echoes the endpoint it answers, and
//! a 30 s flood of junk at the probe port leaves pong latency and failover as they were. The prober is
//! the test itself, with meshd's own probe code and a key the meshd nodes list as a peer (the same
//! stand-in as meshd_controller.rs). Needs root; fails (never skips) without it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hybridnet_config::PublicKey;
use hybridnet_integration::meshd::{MeshLab, PORT};
use hybridnet_integration::{Daemon, Netns, wait_until};
use hybridnet_meshd::identity::PrivateKey;
use hybridnet_meshd::probe::{self, Kind, Probe};

/// The test's own prober: a socket in a namespace and the probe key it shares with one meshd.
struct Prober {
    socket: UdpSocket,
    key: [u8; 32],
    sender: PublicKey,
    target: SocketAddr,
}

impl Prober {
    fn new(ns: &Netns, me: &PrivateKey, meshd: &PublicKey, target: SocketAddr) -> Prober {
        let socket = ns
            .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap_or_else(|e| panic!("{e}"));
        Prober {
            socket,
            key: probe::key(&me.shared(meshd)),
            sender: me.public(),
            target,
        }
    }

    fn ping(&self, nonce: u64, timestamp_us: u64) -> Vec<u8> {
        let p = Probe {
            kind: Kind::Ping,
            sender: self.sender,
            nonce,
            timestamp_us,
            observed: None,
            target: Some(self.target),
            flags: 0,
        };
        probe::encode(&p, &self.key)
    }

    /// Sends `bytes` and waits up to `wait` for the authenticated pong with `nonce`.
    fn exchange(&self, bytes: &[u8], nonce: u64, wait: Duration) -> Option<(Duration, Probe)> {
        let start = Instant::now();
        self.socket.send_to(bytes, self.target).ok()?;
        let mut buf = [0u8; 256];
        while start.elapsed() < wait {
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else {
                continue;
            };
            let got = &buf[..n];
            if let Some(pong) = probe::decode(got)
                && pong.kind == Kind::Pong
                && pong.nonce == nonce
                && probe::verify(got, &self.key)
            {
                return Some((start.elapsed(), pong));
            }
        }
        None
    }
}

fn decode_key(b64: &str) -> PublicKey {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap_or_else(|e| panic!("public key {b64}: {e}"));
    PublicKey(
        bytes
            .try_into()
            .unwrap_or_else(|_| panic!("public key {b64}: not 32 bytes")),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::MAX;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn dropped(d: &Daemon, reason: &str) -> f64 {
    let m = d.metrics().unwrap_or_else(|e| panic!("metrics: {e}"));
    let label = format!("{{reason=\"{reason}\"}}");
    m.series("meshd_probes_dropped_total")
        .filter(|(l, _)| *l == label)
        .map(|(_, v)| v)
        .sum()
}

/// Three nodes: node1 and node2 run meshd; node3 is the test's prober (and, later, the flooder). Returns
/// the lab, the daemons and the prober's key.
fn lab(label: &str) -> (MeshLab, Vec<Daemon>, PrivateKey) {
    let mut lab = MeshLab::new(3, label);
    let prober = PrivateKey([42; 32]);
    lab.nodes[2].public_key = prober.public().to_string();
    for i in 0..2 {
        lab.write_config(i);
    }
    let mut daemons: Vec<Daemon> = (0..2).map(|i| lab.start(i)).collect();
    for (i, d) in daemons.iter_mut().enumerate() {
        lab.nodes[i].public_key =
            hybridnet_integration::meshd::public_key_of(d, &lab.nodes[i].state_dir);
    }
    for i in 0..2 {
        lab.write_config(i);
    }
    wait_until(Duration::from_secs(15), "node1 to see node2 up", || {
        let row = lab.nodes[0].peer(&lab.nodes[1].name())?;
        (row["state"] == "up")
            .then_some(())
            .ok_or_else(|| format!("{row}"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    (lab, daemons, prober)
}

#[test]
fn a_replayed_or_stale_ping_gets_no_pong_and_a_pong_echoes_its_target() {
    let (lab, daemons, me) = lab("meshd-replay");
    let meshd = decode_key(&lab.nodes[0].public_key);
    let target = SocketAddr::new(
        IpAddr::V4(lab.nodes[0].private_ip()),
        probe::probe_port(PORT),
    );
    let p = Prober::new(&lab.nodes[2].netns, &me, &meshd, target);
    let wait = Duration::from_millis(500);
    let mut nonce = 1000u64;
    wait_until(
        Duration::from_secs(10),
        "meshd to answer the prober",
        || {
            nonce += 1;
            p.exchange(&p.ping(nonce, probe::now_us()), nonce, wait)
                .map(|_| ())
                .ok_or_else(|| "no pong".to_owned())
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // A fresh ping: one pong, echoing the target, telling where the ping came from.
    nonce += 1;
    let recorded = p.ping(nonce, probe::now_us());
    let (_, pong) = p
        .exchange(&recorded, nonce, wait)
        .unwrap_or_else(|| panic!("no pong to a fresh ping"));
    assert_eq!(pong.target, Some(target), "the pong is bound to its target");
    assert_eq!(
        pong.observed.map(|o| o.ip()),
        Some(IpAddr::V4(lab.nodes[2].private_ip()))
    );
    // The same datagram again, at once and a second later: no pong (a meshd is never a reflector).
    assert!(
        p.exchange(&recorded, nonce, wait).is_none(),
        "replay answered"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        p.exchange(&recorded, nonce, wait).is_none(),
        "late replay answered"
    );
    // A ping recorded a minute ago (or stamped a minute ahead): outside the window, no pong.
    let minute = 60_000_000;
    for ts in [probe::now_us() - minute, probe::now_us() + minute] {
        nonce += 1;
        assert!(
            p.exchange(&p.ping(nonce, ts), nonce, wait).is_none(),
            "a ping stamped {ts} was answered"
        );
    }
    // A fresh one still works; the refusals are counted.
    nonce += 1;
    assert!(
        p.exchange(&p.ping(nonce, probe::now_us()), nonce, wait)
            .is_some()
    );
    assert!(dropped(&daemons[0], "replayed") >= 2.0);
    assert!(dropped(&daemons[0], "stale") >= 2.0);
}

/// Junk at the probe ports of both meshd nodes from 64 source ports of node3: random bytes (dropped on
/// decode), and well-formed headers that name a known sender with a wrong MAC (these cost an HMAC
/// unless the budget says no), paced at `pps` datagrams per second.
fn flood(ns: &Netns, targets: Vec<SocketAddr>, sender: PublicKey, pps: u64, stop: Arc<AtomicBool>) {
    let sockets: Vec<UdpSocket> = (0..64)
        .map(|_| {
            ns.enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    for s in &sockets {
        s.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
    }
    std::thread::spawn(move || {
        let forged = Probe {
            kind: Kind::Ping,
            sender,
            nonce: 0,
            timestamp_us: probe::now_us(),
            observed: None,
            target: None,
            flags: 0,
        };
        let mut good_header = probe::encode(&forged, &[0; 32]);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut i = 0usize;
        // xorshift64: junk bytes, no dependency for it.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        while !stop.load(Ordering::Relaxed) {
            let due = start.elapsed().as_micros() as u64 * pps / 1_000_000;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            for _ in 0..(due - sent).min(200) {
                i = i.wrapping_add(1);
                let bytes: Vec<u8> = if i.is_multiple_of(2) {
                    (0..probe::LEN).map(|_| rand()).collect()
                } else {
                    let n = good_header.len();
                    for b in &mut good_header[n - 16..] {
                        *b = rand();
                    }
                    good_header.clone()
                };
                let _ = sockets[i % sockets.len()].send_to(&bytes, targets[i % targets.len()]);
                sent += 1;
            }
        }
    });
}

#[derive(Debug, Default)]
struct Phase {
    rtts: Vec<Duration>,
    lost: usize,
    failovers: Vec<Duration>,
}

/// 30 s: the prober pings node1 every 20 ms, and node1's private path to node2 is cut and restored over
/// and over (failover to the public path timed each time).
fn measure(lab: &MeshLab, p: &Prober, nonce: &mut u64) -> Phase {
    let mut phase = Phase::default();
    let stop = AtomicBool::new(false);
    let mut rtts = Vec::new();
    let mut lost = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                *nonce += 1;
                match p.exchange(
                    &p.ping(*nonce, probe::now_us()),
                    *nonce,
                    Duration::from_millis(500),
                ) {
                    Some((rtt, _)) => rtts.push(rtt),
                    None => lost += 1,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            lab.wait_endpoint(0, 1, lab.nodes[1].private_ip(), Duration::from_secs(15));
            lab.cut_private(0, 1, true);
            phase.failovers.push(lab.wait_endpoint(
                0,
                1,
                lab.nodes[1].public_ip(),
                Duration::from_secs(15),
            ));
            lab.cut_private(0, 1, false);
        }
        stop.store(true, Ordering::Relaxed);
    });
    rtts.sort();
    phase.failovers.sort();
    phase.rtts = rtts;
    phase.lost = lost;
    phase
}

fn report(name: &str, ph: &Phase) -> String {
    format!(
        "{name}: pongs {} (lost {}), p50 {:?}, p99 {:?}; failovers {} p50 {:?} max {:?}",
        ph.rtts.len(),
        ph.lost,
        percentile(&ph.rtts, 0.5),
        percentile(&ph.rtts, 0.99),
        ph.failovers.len(),
        percentile(&ph.failovers, 0.5),
        ph.failovers.last().copied().unwrap_or_default(),
    )
}

#[test]
fn a_flood_of_junk_at_the_probe_port_leaves_pongs_and_failover_unchanged() {
    let (lab, daemons, me) = lab("meshd-flood");
    let meshd = decode_key(&lab.nodes[0].public_key);
    let target = SocketAddr::new(
        IpAddr::V4(lab.nodes[0].private_ip()),
        probe::probe_port(PORT),
    );
    let p = Prober::new(&lab.nodes[2].netns, &me, &meshd, target);
    let mut nonce = 1u64;
    wait_until(
        Duration::from_secs(10),
        "meshd to answer the prober",
        || {
            nonce += 1;
            p.exchange(
                &p.ping(nonce, probe::now_us()),
                nonce,
                Duration::from_millis(500),
            )
            .map(|_| ())
            .ok_or_else(|| "no pong".to_owned())
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Traffic between node1 and node2 (5 pings/s), so the peer is busy and its active path probed 4/s.
    let mut traffic = lab.nodes[0]
        .netns
        .command("ping")
        .args(["-q", "-i", "0.2", "-w", "120"])
        .arg(lab.nodes[1].mesh_ip().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("ping: {e}"));

    let quiet = measure(&lab, &p, &mut nonce);
    eprintln!("{}", report("no flood", &quiet));

    let pps: u64 = std::env::var("MESHD_FLOOD_PPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut targets = Vec::new();
    for n in &lab.nodes[..2] {
        for ip in [n.private_ip(), n.public_ip()] {
            targets.push(SocketAddr::new(IpAddr::V4(ip), probe::probe_port(PORT)));
        }
    }
    let before_mac = dropped(&daemons[0], "mac");
    let stop = Arc::new(AtomicBool::new(false));
    flood(&lab.nodes[2].netns, targets, me.public(), pps, stop.clone());
    let t0 = Instant::now();
    let flooded = measure(&lab, &p, &mut nonce);
    let flood_secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    eprintln!("{} ({pps} datagrams/s)", report("flood", &flooded));
    let _ = traffic.kill();
    let _ = traffic.wait();

    let malformed = dropped(&daemons[0], "malformed");
    let throttled = dropped(&daemons[0], "throttled");
    let macs = dropped(&daemons[0], "mac") - before_mac;
    eprintln!(
        "node1 dropped: {malformed} malformed, {throttled} throttled, {macs} failed HMACs in {flood_secs:.0} s"
    );
    assert!(malformed > 0.0, "the flood reached meshd");
    // HMACs spent on junk are capped by the shared budget (plus one second's burst).
    let cap = hybridnet_meshd::responder::SHARED_RATE * (flood_secs + 1.0);
    assert!(macs <= cap, "{macs} HMACs on junk, cap {cap}");
    if pps as f64 / 4.0 > hybridnet_meshd::responder::SHARED_RATE * 2.0 {
        assert!(throttled > 0.0, "the budget throttled the forged datagrams");
    }
    // Pongs and failover as without the flood (slack for a loaded 2-core machine).
    let base99 = percentile(&quiet.rtts, 0.99);
    let flood99 = percentile(&flooded.rtts, 0.99);
    assert!(
        flood99 <= base99 * 2 + Duration::from_millis(20),
        "p99 {flood99:?} under the flood, {base99:?} without"
    );
    assert!(
        flooded.lost <= quiet.lost + 3,
        "{} pongs lost under the flood, {} without",
        flooded.lost,
        quiet.lost
    );
    let worst = flooded.failovers.last().copied().unwrap_or_default();
    assert!(
        worst <= Duration::from_secs(5),
        "failover took {worst:?} under the flood"
    );
    assert!(
        percentile(&flooded.failovers, 0.5)
            <= percentile(&quiet.failovers, 0.5) + Duration::from_millis(500),
        "failover slower under the flood"
    );
}
