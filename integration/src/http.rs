//! A tiny HTTP/1.0 GET client for the daemons' admin endpoints, run from inside a namespace, and a reader
//! for the Prometheus text they serve.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::Netns;
use crate::netns::enter_named;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_RESPONSE: u64 = 16 << 20;

/// A response: status code, headers as sent (lower-cased names), and the body (de-chunked).
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr`, from inside `netns` (pass `None` for the test's own namespace).
pub fn http_get(netns: Option<&Netns>, addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    match netns {
        Some(ns) => get_in(ns.name(), addr, path),
        None => get(addr, path),
    }
}

/// [`http_get`] in the namespace called `netns`.
pub(crate) fn get_in(netns: &str, addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    enter_named(netns, || get(addr, path))?
}

fn get(addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: hybridnet-integration\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut raw)?;
    parse(&raw).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("GET http://{addr}{path}: {e}"),
        )
    })
}

fn parse(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    let body = String::from_utf8(body).map_err(|_| "body is not UTF-8")?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

/// A scrape of `/metrics` (Prometheus or OpenMetrics text).
#[derive(Clone, Debug)]
pub struct Metrics(pub String);

impl Metrics {
    /// The sum over all series of metric `name` (e.g. `hybridnet_config_reloads_total`), whatever their
    /// labels; `None` when no series has that name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.series(name).map(|(_, v)| v).reduce(|a, b| a + b)
    }

    /// [`Metrics::get`], or 0 for a metric that is absent.
    pub fn value(&self, name: &str) -> f64 {
        self.get(name).unwrap_or(0.0)
    }

    /// The series of metric `name`: (labels as written, e.g. `{daemon="meshd"}` or empty, value).
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(move |line| {
                let rest = line.strip_prefix(name)?;
                let (labels, rest) = if rest.starts_with('{') {
                    let end = rest.find('}')?;
                    (&rest[..=end], &rest[end + 1..])
                } else {
                    ("", rest)
                };
                if !rest.starts_with(' ') {
                    return None; // a longer metric name with this prefix
                }
                let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
                Some((labels, value))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = parse(
            b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nnot ready\n",
        );
        let plain = plain.expect("plain response");
        assert_eq!((plain.status, plain.body.as_str()), (503, "not ready\n"));
        assert_eq!(plain.header("content-type"), Some("text/plain"));
        let chunked = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n");
        assert_eq!(chunked.expect("chunked response").body, "abcde");
        assert!(parse(b"garbage").is_err());
    }

    #[test]
    fn sums_series_by_exact_name() {
        let m = Metrics(
            "# HELP a_total x\na_total 2\na_total{d=\"x\"} 3\na_total_more 7\nb 1.5 1700000000\n# EOF\n".into(),
        );
        assert_eq!(m.get("a_total"), Some(5.0));
        assert_eq!(m.get("b"), Some(1.5));
        assert_eq!(m.get("c"), None);
        assert_eq!(m.value("c"), 0.0);
        assert_eq!(m.series("a_total").count(), 2);
    }
}
