use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use super::*;

#[test]
fn sources_from_urls_and_grpc_targets() {
    let s = Source::parse("https://discovery.talos.dev/").expect("url");
    assert_eq!(
        (s.host.as_str(), s.port, s.tls),
        ("discovery.talos.dev", 443, true)
    );
    let s = Source::parse("http://198.51.100.1:3000/").expect("url");
    assert_eq!(
        (s.host.as_str(), s.port, s.tls),
        ("198.51.100.1", 3000, false)
    );
    let s = Source::parse("https://[2001:db8::1]:6443/version?x=1").expect("url");
    assert_eq!(
        (s.host.as_str(), s.port, s.tls),
        ("2001:db8::1", 6443, true)
    );
    let s = Source::parse("discovery.example:8443").expect("grpc target");
    assert_eq!((s.port, s.tls), (8443, true));
    for bad in [
        "",
        "https://",
        "ftp://host/",
        "https://user@host/",
        "https://host:0/",
        "https://host:99999/",
        "https://[zz::1]/",
        "https://[2001:db8::1]x/",
        "https://ho st/",
        "https://host:port/",
        "https://\u{202e}evil/",
    ] {
        assert_eq!(Source::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn date_headers_and_hostile_heads() {
    let ok = "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\n";
    assert_eq!(date_of(ok), Ok(784_111_777));
    // The obsolete forms a server may still send (RFC 9110 5.6.7).
    assert_eq!(
        date_of("HTTP/1.0 200 OK\r\nDate: Sunday, 06-Nov-94 08:49:37 GMT"),
        Ok(784_111_777)
    );
    assert_eq!(
        date_of("HTTP/1.1 200 OK\r\nDate: Sun Nov  6 08:49:37 1994"),
        Ok(784_111_777)
    );
    for bad in [
        "",
        "SSH-2.0-OpenSSH_9.2\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT",
        "\x16\x03\x01\x02\x00",
        "HTTP/2 200\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT",
        "HTTP/1.1 200 OK\r\nServer: x",
        "HTTP/1.1 200 OK\r\nDate: yesterday",
        "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nDate: Mon, 07 Nov 1994 08:49:37 GMT",
        "HTTP/1.1 200 OK\r\nDate: Sun, 31 Feb 1994 08:49:37 GMT",
        "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 25:49:37 GMT",
        "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 99999 08:49:37 GMT",
        "HTTP/1.1 200 OK\r\nDate: \u{fffd}\u{fffd}",
    ] {
        assert!(date_of(bad).is_err(), "{bad:?}: {:?}", date_of(bad));
    }
    let long = format!("HTTP/1.1 200 OK\r\nDate: {}", "x".repeat(100_000));
    let e = date_of(&long).expect_err("junk");
    assert!(e.len() < 200, "errors are cut: {e}");
}

#[test]
fn offsets_account_for_the_round_trip_and_the_whole_second() {
    // Sent at 1000.200 s, answered at 1000.600 s, the server said 1000 (it read 1000.0..1001.0): the offset
    // is between 1000.000 - 1000.600 and 1001.000 - 1000.200.
    let r = Reading {
        date_secs: 1000,
        sent_ms: 1_000_200,
        received_ms: 1_000_600,
    };
    let o = r.offset().expect("offset");
    assert_eq!((o.low_ms, o.high_ms), (-600, 800));
    assert_eq!(o.at_least_ms(), 0, "in sync within what can be told");
    assert_eq!(o.estimate_ms(), 100);
    assert_eq!(o.uncertainty_ms(), 700);
    // Ten minutes ahead (the server says 600 s later).
    let ahead = Reading {
        date_secs: 1600,
        ..r
    }
    .offset()
    .expect("offset");
    assert_eq!(ahead.at_least_ms(), 599_400);
    // Our clock ahead: the server is behind.
    let behind = Reading {
        date_secs: 900,
        ..r
    }
    .offset()
    .expect("offset");
    assert_eq!(behind.at_least_ms(), 99_200);
    assert!(behind.estimate_ms() < 0);
    // A slow round trip widens the bounds instead of faking an offset.
    let slow = Reading {
        date_secs: 1002,
        sent_ms: 1_000_000,
        received_ms: 1_003_000,
    }
    .offset()
    .expect("offset");
    assert_eq!(slow.at_least_ms(), 0);
    // Received before sent (our clock stepped back) is no reading; the extremes do not overflow.
    assert_eq!(
        Reading {
            date_secs: 1,
            sent_ms: 5,
            received_ms: 4
        }
        .offset(),
        None
    );
    let extreme = Reading {
        date_secs: u64::MAX,
        sent_ms: 0,
        received_ms: u64::MAX,
    };
    assert_eq!(extreme.offset(), None, "out of i64 range");
    let zero = Reading {
        date_secs: 0,
        sent_ms: u64::MAX / 2,
        received_ms: u64::MAX / 2,
    }
    .offset()
    .expect("in range");
    assert!(zero.at_least_ms() > 0);
}

/// An HTTP server on loopback answering once with `head` (a stand-in for an API server: kube-apiserver,
/// as any Go net/http server, sends `Date` on every answer, a 401 to an anonymous request included).
fn one_answer(head: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(head.as_bytes());
        }
    });
    format!("http://{addr}/")
}

fn http_date(offset_secs: i64) -> String {
    let now = SystemTime::now();
    let t = if offset_secs >= 0 {
        now + Duration::from_secs(offset_secs.unsigned_abs())
    } else {
        now - Duration::from_secs(offset_secs.unsigned_abs())
    };
    httpdate::fmt_http_date(t)
}

#[test]
fn measures_a_server_ten_minutes_ahead_and_reports_the_ones_that_fail() {
    let ahead = one_answer(format!(
        "HTTP/1.1 401 Unauthorized\r\nDate: {}\r\nContent-Length: 0\r\n\r\n",
        http_date(600)
    ));
    let right = one_answer(format!(
        "HTTP/1.1 200 OK\r\nDate: {}\r\nContent-Length: 0\r\n\r\n",
        http_date(0)
    ));
    let no_date = one_answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_owned());
    let silent = {
        // Accepts and never answers: bounded by the timeout.
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/", l.local_addr().expect("addr"));
        std::thread::spawn(move || {
            let _conn = l.accept();
            std::thread::sleep(Duration::from_secs(5));
        });
        url
    };
    let urls = vec![ahead, right, no_date, silent, "gopher://x/".to_owned()];
    let started = Instant::now();
    let got = measure_all(&urls, Duration::from_millis(1500));
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(got.len(), MAX_SOURCES, "at most {MAX_SOURCES} asked");
    let ahead = got[0].offset.clone().expect("a reading");
    assert!(
        (598_000..=601_000).contains(&ahead.at_least_ms()) && ahead.estimate_ms() > 0,
        "{ahead:?}"
    );
    let right = got[1].offset.clone().expect("a reading");
    assert!(right.at_least_ms() <= 1000, "{right:?}");
    assert!(
        got[2].offset.as_ref().is_err_and(|e| e.contains("no Date")),
        "{:?}",
        got[2]
    );
    assert!(
        got[3]
            .offset
            .as_ref()
            .is_err_and(|e| e.contains("reading") || e.contains("no answer")),
        "{:?}",
        got[3]
    );
    let bad = measure_all(&["gopher://x/".to_owned()], Duration::from_millis(100));
    assert!(bad[0].offset.is_err());
    // A source that never even finishes its handshake is left behind at the deadline.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let stuck = format!(
        "https://localhost:{}/",
        l.local_addr().expect("addr").port()
    );
    std::thread::spawn(move || {
        let _conn = l.accept();
        std::thread::sleep(Duration::from_secs(5));
    });
    let started = Instant::now();
    let got = measure_all(&[stuck], Duration::from_millis(300));
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert!(got[0].offset.is_err(), "{got:?}");
}

/// A TLS server on loopback with a self-signed certificate that expired in 2000 (what a node whose clock
/// is far off sees of any certificate), answering once with a `Date` `ahead` seconds ahead: stands in for
/// an API server (kube-apiserver serves TLS only, and sends `Date` on every answer).
fn tls_answer(ahead: i64) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.not_before = rcgen::date_time_ymd(1999, 1, 1);
    params.not_after = rcgen::date_time_ymd(2000, 1, 1);
    let cert = params.self_signed(&key).expect("cert");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let Ok((tcp, _)) = listener.accept() else {
            return;
        };
        let conn = rustls::ServerConnection::new(Arc::new(config)).expect("server");
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut buf = [0u8; 1024];
        let _ = tls.read(&mut buf);
        let answer = format!(
            "HTTP/1.1 403 Forbidden\r\nDate: {}\r\nContent-Length: 0\r\n\r\n",
            http_date(ahead)
        );
        let _ = tls.write_all(answer.as_bytes());
        let _ = tls.flush();
        tls.conn.send_close_notify();
        let _ = tls.flush();
    });
    format!("https://localhost:{}/", addr.port())
}

#[test]
fn tls_sources_are_read_without_trusting_their_certificate() {
    let got = measure_all(&[tls_answer(-600)], Duration::from_secs(2));
    let o = got[0].offset.clone().expect("a reading over TLS");
    assert!(
        (598_000..=601_000).contains(&o.at_least_ms()) && o.estimate_ms() < 0,
        "our clock is 10 minutes ahead of the source's: {o:?}"
    );
    // A TLS source that is not there fails within the bound; a plain HTTP server is no TLS source.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let gone = format!("https://{}/", l.local_addr().expect("addr"));
    drop(l);
    let plain = one_answer(format!("HTTP/1.1 200 OK\r\nDate: {}\r\n\r\n", http_date(0)))
        .replace("http://", "https://");
    let got = measure_all(&[gone, plain], Duration::from_millis(1500));
    assert!(got[0].offset.is_err(), "{got:?}");
    assert!(
        got[1].offset.as_ref().is_err_and(|e| e.contains("TLS")),
        "{got:?}"
    );
    assert!(tls::connect("192.0.2.1").is_ok(), "IP server names");
}
