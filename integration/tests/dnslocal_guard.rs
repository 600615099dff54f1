//! dnslocal's hardening, as root, each test in its own network namespace with NSD as the real upstream:
//! spoofed upstream answers, random source ports and 0x20, the cache bounded in bytes, per-client budgets
//! and TCP caps, the answers to abusive queries (ANY, AXFR over UDP, EDNS versions, oversized UDP), reloads
//! that move the listen address, and conditional forwarding.
//!
//! Run: build dnslocal (see `hack/test.sh`), then
//! `sudo -E cargo nextest run -p hybridnet-integration --test dnslocal_guard`.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hybridnet_integration::dnslocal::guard::{
    SpoofingRelay, bulk_zone, raw_query, rss_bytes, udp_exchange,
};
use hybridnet_integration::dnslocal::{
    CountingUpstream, LISTEN, NSD_ADDR, Nsd, dig_in, query_bytes, require_tools, spawn_in,
    write_config,
};
use hybridnet_integration::{Daemon, DaemonKind, Netns, TestDir, wait_until};

const READY: Duration = Duration::from_secs(10);
/// Where the spoofing relay listens (dnslocal's upstream) and where its wrong-source forgeries come from.
const RELAY: &str = "127.0.0.12:53";
const WRONG_SOURCE: &str = "127.0.0.13:53";

/// A dnslocal config (see [`write_config`]) with `edit` applied to its text.
fn config(dir: &TestDir, upstream: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let path = write_config(dir, "dnslocal", "127.0.0.1:7448", &[upstream], "1h");
    let text = edit(std::fs::read_to_string(&path).unwrap());
    std::fs::write(&path, text).unwrap();
    path
}

fn start(ns: &Netns, config: PathBuf) -> Daemon {
    let mut daemon = Daemon::builder(DaemonKind::Dnslocal, ns, config).start();
    daemon
        .wait_ready(READY)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    daemon
}

fn server() -> SocketAddr {
    format!("{LISTEN}:53").parse().unwrap()
}

/// Forged answers race every real one (wrong ID, wrong question case, wrong source, each carrying
/// 6.6.6.6 for an hour): none is cached or served, and none turns the real answer into a failure.
#[test]
fn spoofed_answers_are_never_cached_or_served() {
    require_tools(&["nsd", "dig"]);
    let ns = Netns::new();
    let dir = TestDir::new("dlg-spoof");
    let _nsd = Nsd::start(&ns, &dir, 0);
    let relay = SpoofingRelay::start(
        ns.name(),
        RELAY.parse().unwrap(),
        WRONG_SOURCE.parse().unwrap(),
        format!("{NSD_ADDR}:53").parse().unwrap(),
    );
    let daemon = start(&ns, config(&dir, RELAY, |t| t));
    let asked = [
        ("www.example.test", "A", "NOERROR"),
        ("www.example.test", "AAAA", "NOERROR"),
        ("ns.example.test", "A", "NOERROR"),
        ("nope.example.test", "A", "NXDOMAIN"),
        ("other.nope.example.test", "A", "NXDOMAIN"),
    ];
    // Twice: the second round is answered from the cache.
    for round in 0..2 {
        for (name, qtype, status) in asked {
            let d = dig_in(ns.name(), LISTEN, &[name, qtype]);
            assert_eq!(
                d.status, status,
                "round {round}, {name} {qtype}: {}",
                d.text
            );
            assert!(
                !d.text.contains("6.6.6.6"),
                "forged answer served: {}",
                d.text
            );
            if status == "NOERROR" {
                assert!(!d.answers.is_empty(), "{}", d.text);
            }
        }
    }
    let seen = relay.seen();
    assert_eq!(
        seen.len(),
        asked.len(),
        "one upstream query per question: {seen:?}"
    );
    // 0x20: the names went out with their case randomised (each has at least 15 letters: P(all lower) ~ 0).
    for s in &seen {
        assert!(
            s.qname.iter().any(u8::is_ascii_uppercase)
                && s.qname.iter().any(u8::is_ascii_lowercase),
            "no case randomisation in {:?}",
            String::from_utf8_lossy(&s.qname)
        );
    }
    // Every wrong-ID and wrong-case forgery reached dnslocal and was counted (the wrong-source one the
    // kernel drops: the upstream socket is connected).
    let m = daemon.metrics().unwrap();
    let mismatched = m.value("dnslocal_upstream_mismatched_total");
    assert!(
        mismatched >= 2.0 * seen.len() as f64,
        "mismatched {mismatched} for {} queries:\n{}",
        seen.len(),
        m.0
    );
    let servfail: f64 = m
        .series("dnslocal_queries_total")
        .filter(|(l, _)| l.contains("result=\"servfail\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(servfail, 0.0, "{}", m.0);
}

/// 100 misses leave from at least 90 distinct source ports.
#[test]
fn misses_leave_from_random_ports() {
    require_tools(&["nsd"]);
    let ns = Netns::new();
    let dir = TestDir::new("dlg-ports");
    let _nsd = Nsd::start(&ns, &dir, 0);
    let relay = SpoofingRelay::start(
        ns.name(),
        RELAY.parse().unwrap(),
        WRONG_SOURCE.parse().unwrap(),
        format!("{NSD_ADDR}:53").parse().unwrap(),
    );
    let _daemon = start(&ns, config(&dir, RELAY, |t| t));
    for i in 0..100u16 {
        let q = query_bytes(&format!("miss{i}.example.test"), i);
        let a = udp_exchange(ns.name(), "0.0.0.0:0".parse().unwrap(), server(), q)
            .unwrap_or_else(|| panic!("no answer to miss {i}"));
        assert_eq!(
            a[3] & 0x0F,
            3,
            "miss {i}: NXDOMAIN expected, got rcode {}",
            a[3] & 0x0F
        );
    }
    let seen = relay.seen();
    assert_eq!(seen.len(), 100);
    let ports = relay.distinct_ports();
    eprintln!("100 misses left from {ports} distinct source ports");
    assert!(ports >= 90, "only {ports} distinct source ports");
}

/// 150 answers of about 60 KiB each (fetched over TCP) in a cache of 4 MiB: it stays under 4 MiB, and the
/// daemon's resident memory grows by less than that plus a constant.
#[test]
fn cache_of_big_answers_stays_under_max_memory() {
    require_tools(&["nsd", "dig"]);
    let ns = Netns::new();
    let dir = TestDir::new("dlg-memory");
    let _nsd = Nsd::start_with(&ns, &dir, 0, vec![bulk_zone(150)]);
    let config = config(&dir, &format!("{NSD_ADDR}:53"), |t| {
        t.replace("prefetch: true}", "prefetch: true, maxMemory: 4MiB}")
    });
    let daemon = start(&ns, config);
    let before = rss_bytes(daemon.pid());
    for round in 0..2 {
        for i in 0..150 {
            let d = dig_in(
                ns.name(),
                LISTEN,
                &[&format!("b{i}.bulk.test"), "TXT", "+tcp"],
            );
            assert_eq!(d.answers.len(), 30, "round {round}, b{i}: {}", d.text);
        }
    }
    let after = rss_bytes(daemon.pid());
    let state = dir.join("dnslocal-state");
    let (bytes, max) = wait_until(Duration::from_secs(10), "status after the fill", || {
        let st = DaemonKind::Dnslocal.read_status(&state)?;
        let c = &st.details["cache"];
        match (
            c["bytes"].as_u64(),
            c["max_bytes"].as_u64(),
            c["entries"].as_u64(),
        ) {
            (Some(b), Some(m), Some(e)) if e > 0 => Ok((b, m)),
            _ => Err(format!("{}", st.details)),
        }
    })
    .unwrap();
    eprintln!(
        "cache {bytes} of {max} bytes; RSS {} -> {} KiB",
        before / 1024,
        after / 1024
    );
    assert!(max <= 4 << 20, "max {max}");
    assert!(bytes <= max, "cache holds {bytes} bytes, more than {max}");
    assert!(bytes >= 2 << 20, "the cache should be well filled: {bytes}");
    // 9 MB of answers went through; the resident set grew by less than maxMemory + 16 MiB.
    assert!(
        after.saturating_sub(before) < (4 << 20) + (16 << 20),
        "RSS grew from {before} to {after}"
    );
}

/// One client flooding at full rate (from 127.0.0.50) leaves another (127.0.0.51) at >= 99 % answered.
#[test]
fn a_flooding_client_does_not_starve_another() {
    require_tools(&["nsd", "dig"]);
    let ns = Netns::new();
    let dir = TestDir::new("dlg-flood");
    let _nsd = Nsd::start(&ns, &dir, 0);
    let config = config(&dir, &format!("{NSD_ADDR}:53"), |t| {
        t.replace("clientRate: 0", "clientRate: 2000")
    });
    let daemon = start(&ns, config);
    assert_eq!(
        dig_in(ns.name(), LISTEN, &["www.example.test"]).status,
        "NOERROR"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        spawn_in(ns.name(), move || {
            let socket = UdpSocket::bind("127.0.0.50:0").unwrap();
            socket.set_nonblocking(true).unwrap();
            let q = query_bytes("www.example.test", 7);
            let mut sent = 0u64;
            let mut sink = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if socket.send_to(&q, server()).is_ok() {
                    sent += 1;
                }
                while socket.recv_from(&mut sink).is_ok() {}
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let victim = spawn_in(ns.name(), move || {
        let socket = UdpSocket::bind("127.0.0.51:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(1000)))
            .unwrap();
        let mut answered = 0;
        let mut buf = [0u8; 1500];
        for i in 0..400u16 {
            let started = Instant::now();
            socket
                .send_to(&query_bytes("www.example.test", i), server())
                .unwrap();
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((n, _)) if n > 12 && buf[..2] == i.to_be_bytes() => {
                        answered += u32::from(buf[3] & 0x0F == 0 && buf[7] == 1);
                        break;
                    }
                    Ok(_) if started.elapsed() < Duration::from_secs(1) => {}
                    _ => break,
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        answered
    });
    let answered = victim.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    let m = daemon.metrics().unwrap();
    let limited = m.value("dnslocal_ratelimited_total");
    eprintln!(
        "flooder sent {sent}; {limited} over budget; the other client: {answered}/400 answered"
    );
    assert!(limited > 0.0, "the flooder was never over budget: {}", m.0);
    assert!(
        answered >= 396,
        "the other client got {answered}/400 answers"
    );
}

/// Answers to abusive queries: UDP answers capped at 1232 bytes whatever the client asks; ANY gets the
/// RFC 8482 answer; AXFR over UDP is refused; EDNS version 1 gets BADVERS; and one client holding many idle
/// TCP connections does not lock another out.
#[test]
fn abusive_queries_get_small_answers() {
    require_tools(&["nsd", "dig"]);
    let ns = Netns::new();
    let dir = TestDir::new("dlg-abuse");
    let _nsd = Nsd::start(&ns, &dir, 0);
    let _daemon = start(&ns, config(&dir, &format!("{NSD_ADDR}:53"), |t| t));
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    // 8 × 200-byte TXT (about 1.7 KB): asked with EDNS size 65535, truncated at 1232 over UDP.
    let big = udp_exchange(
        ns.name(),
        any,
        server(),
        raw_query("big.example.test", 16, 1, Some(65535)),
    )
    .unwrap();
    assert!(big.len() <= 1232, "{} bytes over UDP", big.len());
    assert_ne!(big[2] & 0x02, 0, "TC expected");
    let tcp = dig_in(ns.name(), LISTEN, &["big.example.test", "TXT", "+tcp"]);
    assert_eq!(tcp.answers.len(), 8, "{}", tcp.text);

    let d = dig_in(ns.name(), LISTEN, &["www.example.test", "ANY"]);
    assert_eq!(d.status, "NOERROR", "{}", d.text);
    assert_eq!(d.answers.len(), 1, "{}", d.text);
    assert!(d.answers[0].contains("HINFO \"RFC8482\""), "{}", d.text);

    let axfr = udp_exchange(
        ns.name(),
        any,
        server(),
        raw_query("example.test", 252, 2, None),
    )
    .unwrap();
    assert_eq!(axfr[3] & 0x0F, 5, "AXFR over UDP: REFUSED expected");

    let d = dig_in(
        ns.name(),
        LISTEN,
        &["www.example.test", "+edns=1", "+noednsnegotiation"],
    );
    assert_eq!(d.status, "BADVERS", "{}", d.text);

    // 100 idle TCP connections from 127.0.0.50: the oldest are closed; 127.0.0.51 still gets answers.
    let hog = spawn_in(ns.name(), || {
        let mut conns = Vec::new();
        for _ in 0..100 {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&"127.0.0.50:0".parse::<SocketAddr>().unwrap().into())
                .unwrap();
            s.connect(&server().into()).unwrap();
            conns.push(std::net::TcpStream::from(s));
        }
        conns
    })
    .join()
    .unwrap();
    let d = dig_in(
        ns.name(),
        LISTEN,
        &["www.example.test", "+tcp", "-b", "127.0.0.51"],
    );
    assert_eq!(d.data(), vec!["192.0.2.80"], "{}", d.text);
    // The hog's first connection was closed by dnslocal (EOF), its last is still open.
    use std::io::Read;
    let mut first = &hog[0];
    first
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        first.read(&mut byte).unwrap_or(0),
        0,
        "the oldest connection is still open"
    );
}

/// A reload from one listen address to another: answers on the new one within 2 s, none on the old one
/// after, and the cache (same cache settings and upstreams) is kept.
#[test]
fn reload_moves_the_listen_address() {
    require_tools(&["nsd", "dig"]);
    let ns = Netns::new();
    let dir = TestDir::new("dlg-reload");
    let nsd = Nsd::start(&ns, &dir, 0);
    let path = config(&dir, &format!("{NSD_ADDR}:53"), |t| t);
    let daemon = start(&ns, path.clone());
    assert_eq!(
        dig_in(ns.name(), LISTEN, &["www.example.test"]).status,
        "NOERROR"
    );
    let moved = "169.254.20.11";
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&format!("[\"{LISTEN}:53\"]"), &format!("[\"{moved}:53\"]"));
    assert!(text.contains(moved));
    hybridnet_integration::write_atomic(&path, text);
    let written = Instant::now();
    wait_until(Duration::from_secs(2), "answers on the new address", || {
        let d = dig_in(ns.name(), moved, &["+time=1", "www.example.test"]);
        if d.status == "NOERROR" {
            Ok(())
        } else {
            Err(d.text)
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    eprintln!(
        "answering on the new address {:?} after the write",
        written.elapsed()
    );
    // The old address goes away (drained, then removed from the link).
    wait_until(Duration::from_secs(5), "the old address removed", || {
        let out = ns.exec(&["ip", "-o", "addr", "show", "dev", "dnslocal0"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !text.contains(&format!("{LISTEN}/")) && text.contains(&format!("{moved}/")) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let old = dig_in(ns.name(), LISTEN, &["+time=1", "www.example.test"]);
    assert_eq!(
        old.status, "NO ANSWER",
        "the old address still answers: {}",
        old.text
    );
    // The cache came along: with the upstream hung, the name is still answered (fresh: its own TTL).
    nsd.pause(true);
    let d = dig_in(ns.name(), moved, &["www.example.test"]);
    nsd.pause(false);
    // From the cache: the upstream is hung, so a miss would be SERVFAIL (and nothing stale is held).
    assert_eq!(d.data(), vec!["192.0.2.80"], "{}", d.text);
    assert_ne!(d.ttls(), vec![30], "a stale answer: {}", d.text);
    assert!(daemon.log().contains("cache_kept=true"), "{}", daemon.log());
}

/// Conditional forwarding (`forward`, the kube-dns ConfigMap's stub domains): names in a forward zone go to
/// its server, the longest zone wins, everything else still goes to the default upstream (NSD).
#[test]
fn forward_zones_go_to_their_servers() {
    require_tools(&["nsd", "dig"]);
    let ns = Netns::new();
    let dir = TestDir::new("dlg-forward");
    let _nsd = Nsd::start(&ns, &dir, 0);
    // The stub domain's server: answers every A question with 192.0.2.1 and counts them.
    let corp = CountingUpstream::start(ns.name(), "127.0.0.14:53".parse().unwrap(), Duration::ZERO);
    let path = config(&dir, &format!("{NSD_ADDR}:53"), |t| {
        t + "  forward:\n    - {zone: corp.test, to: [\"127.0.0.14\"]}\n    - {zone: stub.example.test, to: [\"127.0.0.14:53\"]}\n"
    });
    let _daemon = start(&ns, path);
    for name in ["www.corp.test", "CORP.test", "x.stub.example.test"] {
        let d = dig_in(ns.name(), LISTEN, &[name]);
        assert_eq!(d.data(), vec!["192.0.2.1"], "{name}: {}", d.text);
    }
    assert_eq!(corp.count(), 3);
    let d = dig_in(ns.name(), LISTEN, &["www.example.test"]);
    assert_eq!(d.data(), vec!["192.0.2.80"], "{}", d.text);
    let d = dig_in(ns.name(), LISTEN, &["kubernetes.default.svc.cluster.local"]);
    assert_eq!(d.data(), vec!["10.96.0.1"], "{}", d.text);
    assert_eq!(
        corp.count(),
        3,
        "other names went to the stub domain's server"
    );
}
