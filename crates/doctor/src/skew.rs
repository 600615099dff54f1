//! Clock skew, measured: this node's clock against the HTTP `Date` header of the servers it talks to (the
//! discovery service endpoints and the API servers apiprism balances, or `--time-source` URLs).
//!
//! One `GET /` per source, over TLS for `https://`, bounded by [`TIMEOUT`] for all of them together (they run
//! at once). Any answer carries a `Date` from a Go server (kube-apiserver answers an anonymous request with
//! 401 or 403, with a `Date` as every net/http response has); a source that answers without one, or not in
//! HTTP/1.1 (the discovery service's own gRPC port speaks HTTP/2 only, unless a proxy in front of it answers), is
//! reported and left out.
//!
//! The certificate is not verified: a clock far off is exactly when validity checks fail, and the date read
//! is only reported (the doctor never sets the clock). The handshake signature is still checked against the
//! certificate's key.
//!
//! The round trip is accounted for: the server wrote its `Date` (whole seconds, truncated) between our
//! sending the request and our reading the answer, so its clock read `[D, D + 1)` at some instant of
//! `[sent, received]` of ours, and the offset lies in `[D - received, D + 1 - sent]` ([`Reading::offset`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The most time measuring takes, all sources together (each gets this long from the start).
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// At most this many sources are asked.
pub const MAX_SOURCES: usize = 4;
/// The most of an answer's head read (status line and headers).
const MAX_HEAD: usize = 16 * 1024;

/// Where to read a `Date` from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// As the config or the command line wrote it.
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Source {
    /// `https://host[:port][/path]`, `http://host[:port][/path]` or a bare `host:port` (a gRPC target, as
    /// the discovery service's redirects write it: TLS). IPv6 hosts in brackets. `None` for anything else.
    pub fn parse(url: &str) -> Option<Source> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if url.contains("://") {
            return None;
        } else {
            (true, url)
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']')?;
            h.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => default_port,
                None => return None,
            };
            (h.to_owned(), port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().ok()?),
                None => (authority.to_owned(), default_port),
            }
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        (host_ok && port != 0).then(|| Source {
            name: url.to_owned(),
            host,
            port,
            tls,
        })
    }
}

/// One source's answer: its `Date` and our clock around the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// The server's `Date`, Unix seconds.
    pub date_secs: u64,
    /// Our clock, Unix milliseconds, just before the request was sent and just after the answer's head
    /// was read.
    pub sent_ms: u64,
    pub received_ms: u64,
}

/// Our clock's offset from a source's (theirs minus ours), as bounds in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Offset {
    pub low_ms: i64,
    pub high_ms: i64,
}

impl Offset {
    /// Our clock is this far off at least (0 when the bounds include no offset).
    pub fn at_least_ms(self) -> u64 {
        if self.low_ms > 0 {
            self.low_ms.unsigned_abs()
        } else if self.high_ms < 0 {
            self.high_ms.unsigned_abs()
        } else {
            0
        }
    }

    /// The middle of the bounds: positive when our clock is behind the source's.
    pub fn estimate_ms(self) -> i64 {
        self.low_ms + (self.high_ms - self.low_ms) / 2
    }

    /// Half the width of the bounds.
    pub fn uncertainty_ms(self) -> u64 {
        self.high_ms.abs_diff(self.low_ms) / 2
    }
}

impl Reading {
    /// The offset's bounds; `None` when the reading is not one (received before sent).
    pub fn offset(self) -> Option<Offset> {
        if self.received_ms < self.sent_ms {
            return None;
        }
        let date_ms = i128::from(self.date_secs) * 1000;
        let low = date_ms - i128::from(self.received_ms);
        let high = date_ms + 1000 - i128::from(self.sent_ms);
        Some(Offset {
            low_ms: i64::try_from(low).ok()?,
            high_ms: i64::try_from(high).ok()?,
        })
    }
}

/// What one source gave: an offset, or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measured {
    pub source: String,
    pub offset: Result<Offset, String>,
}

/// The `Date` of an HTTP/1.x answer's head (status line and headers, as text): Unix seconds. Hostile input:
/// a missing, repeated or unparsable `Date` is an error, never a panic.
pub fn date_of(head: &str) -> Result<u64, String> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !status.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x answer: {:?}", cut(status)));
    }
    let mut dates = lines.filter_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("date")
            .then(|| value.trim())
    });
    let date = dates
        .next()
        .ok_or_else(|| format!("no Date header ({})", cut(status)))?;
    if dates.next().is_some() {
        return Err("more than one Date header".to_owned());
    }
    let t = httpdate::parse_http_date(date)
        .map_err(|_| format!("unreadable Date header {:?}", cut(date)))?;
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| format!("Date header before 1970: {:?}", cut(date)))
}

fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Asks the first [`MAX_SOURCES`] URLs at once, all bounded by `timeout` from now (name resolution
/// included: a reader still busy then is left behind and reported as not answering); a URL that is not one
/// is reported as such.
pub fn measure_all(urls: &[String], timeout: Duration) -> Vec<Measured> {
    let deadline = Instant::now() + timeout;
    let urls: Vec<&String> = urls.iter().take(MAX_SOURCES).collect();
    let mut results: Vec<Option<Result<Reading, String>>> = vec![None; urls.len()];
    let (tx, rx) = std::sync::mpsc::channel();
    let mut waiting = 0;
    for (i, url) in urls.iter().enumerate() {
        match Source::parse(url) {
            None => results[i] = Some(Err("not an http:// or https:// URL".to_owned())),
            Some(src) => {
                let tx = tx.clone();
                let spawned = std::thread::Builder::new()
                    .name("doctor-clock".to_owned())
                    .spawn(move || {
                        let _ = tx.send((i, read(&src, deadline)));
                    });
                match spawned {
                    Ok(_) => waiting += 1,
                    Err(e) => results[i] = Some(Err(format!("no thread: {e}"))),
                }
            }
        }
    }
    drop(tx);
    while waiting > 0 {
        // A little past the deadline: a reader's own timeouts end at it.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .saturating_add(Duration::from_millis(100));
        let Ok((i, r)) = rx.recv_timeout(wait) else {
            break;
        };
        if let Some(slot) = results.get_mut(i) {
            *slot = Some(r);
        }
        waiting -= 1;
    }
    urls.iter()
        .zip(results)
        .map(|(url, r)| Measured {
            source: (*url).clone(),
            offset: r
                .unwrap_or_else(|| Err(out_of_time(timeout)))
                .and_then(|r| r.offset().ok_or_else(|| "our clock went back".to_owned())),
        })
        .collect()
}

fn out_of_time(timeout: Duration) -> String {
    format!("no answer within {:.1} s", timeout.as_secs_f64())
}

fn left(deadline: Instant) -> Result<Duration, String> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| "out of time".to_owned())
}

fn read(src: &Source, deadline: Instant) -> Result<Reading, String> {
    let addrs: Vec<SocketAddr> = (src.host.as_str(), src.port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {}: {e}", src.host))?
        .collect();
    let addr = addrs
        .first()
        .ok_or_else(|| format!("{} has no address", src.host))?;
    let mut tcp = TcpStream::connect_timeout(addr, left(deadline)?)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let host_header = if src.host.contains(':') {
        format!("[{}]", src.host)
    } else {
        src.host.clone()
    };
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: hybridnet-doctor\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let guard = tcp.try_clone().map_err(|e| e.to_string())?;
    if !src.tls {
        return exchange(&mut tcp, &guard, &request, deadline);
    }
    let mut conn = tls::connect(&src.host)?;
    while conn.is_handshaking() {
        set_timeouts(&tcp, deadline)?;
        conn.complete_io(&mut tcp)
            .map_err(|e| format!("TLS handshake: {e}"))?;
    }
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    exchange(&mut stream, &guard, &request, deadline)
}

fn set_timeouts(tcp: &TcpStream, deadline: Instant) -> Result<(), String> {
    let d = left(deadline)?;
    tcp.set_read_timeout(Some(d))
        .and_then(|()| tcp.set_write_timeout(Some(d)))
        .map_err(|e| e.to_string())
}

/// Sends the request and reads the answer's head; `tcp` is the socket under `io` (for its timeouts).
fn exchange(
    io: &mut (impl Read + Write),
    tcp: &TcpStream,
    request: &str,
    deadline: Instant,
) -> Result<Reading, String> {
    set_timeouts(tcp, deadline)?;
    let sent_ms = now_ms();
    io.write_all(request.as_bytes())
        .and_then(|()| io.flush())
        .map_err(|e| format!("sending: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        set_timeouts(tcp, deadline)?;
        let n = match io.read(&mut buf) {
            Ok(0) => return Err("closed before the answer's headers ended".to_owned()),
            Ok(n) => n,
            Err(e) => return Err(format!("reading: {e}")),
        };
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let received_ms = now_ms();
            let text = String::from_utf8_lossy(head.get(..end).unwrap_or_default());
            return Ok(Reading {
                date_secs: date_of(&text)?,
                sent_ms,
                received_ms,
            });
        }
        if head.len() > MAX_HEAD {
            return Err(format!("no end of headers in {MAX_HEAD} bytes"));
        }
    }
}

mod tls {
    //! A TLS client that checks the handshake but not the certificate's chain or dates (see the module docs).
    use rustls::ClientConnection;
    use rustls::pki_types::ServerName;

    pub fn connect(host: &str) -> Result<ClientConnection, String> {
        let config = hybridnet_tls::unverified_client_config(&[]).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
        ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))
    }
}

#[cfg(test)]
mod tests;
