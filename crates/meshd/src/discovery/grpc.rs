//! A small gRPC client over HTTP/2 (hyper), for the discovery service's unary calls and its server
//! stream. gRPC framing: a 1-byte compression flag (always 0 here), a 4-byte big-endian length, the
//! protobuf message; the status comes in the trailers (or in the headers of a trailers-only answer).
//! `https://` endpoints use TLS (rustls, system roots from the usual CA bundle paths plus an optional
//! CA file for a self-hosted service with its own CA, ALPN `h2`); `http://` is plain HTTP/2
//! (self-hosted services, tests). Both are read at every connect, so a renewed bundle or CA file is
//! picked up on the next reconnect.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest message accepted from the service.
const MESSAGE_MAX: usize = 4 << 20;
/// Where CA bundles usually are.
const CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// A discovery endpoint: `https://host[:port][/]`, `http://host:port`, or `host:port` (TLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, String> {
        Self::parse_with(text, true)
    }

    /// Where a `Hello` redirect points, seen from this target. The service sends a gRPC target
    /// (`--redirect-endpoint`, "e.g. 'example.com:443'", discovery-service
    /// `cmd/discovery-service/main.go`), and Talos's client dials it with the transport it already
    /// uses (discovery-client `pkg/client/client.go`, `Run`: only `options.Endpoint` changes, the
    /// dial options stay): a redirect without a scheme keeps ours; one with a scheme says which.
    pub fn redirect(&self, text: &str) -> Result<Target, String> {
        Self::parse_with(text, self.tls)
    }

    fn parse_with(text: &str, bare_tls: bool) -> Result<Target, String> {
        let t = text.trim();
        let (tls, rest) = if let Some(r) = t.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = t.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = t.strip_prefix("grpc://") {
            (false, r)
        } else {
            (bare_tls, t)
        };
        let hostport = rest.split('/').next().unwrap_or_default();
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("bad endpoint {text:?}"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("bad port in {text:?}"))?,
                None => default_port,
            };
            (h.to_owned(), port)
        } else if let Some((h, p)) = hostport.rsplit_once(':') {
            (
                h.to_owned(),
                p.parse().map_err(|_| format!("bad port in {text:?}"))?,
            )
        } else {
            (hostport.to_owned(), default_port)
        };
        if host.is_empty() {
            return Err(format!("no host in endpoint {text:?}"));
        }
        Ok(Target { tls, host, port })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One HTTP/2 connection to a discovery service.
#[derive(Debug)]
pub struct Channel {
    send: SendRequest<Full<Bytes>>,
    base: String,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Adds the certificates of a CA file (PEM); an unreadable file, or one without a usable
/// certificate, is an error (the operator named it).
fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("caFile {}: {e}", path.display()))?;
    let mut added = 0;
    for cert in iter {
        let cert = cert.map_err(|e| format!("caFile {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("caFile {}: {e}", path.display()))?;
        added += 1;
    }
    if added == 0 {
        return Err(format!(
            "caFile {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(())
}

fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for path in CA_BUNDLES {
        if let Ok(iter) = CertificateDer::pem_file_iter(path) {
            for cert in iter.flatten() {
                let _ = roots.add(cert);
            }
        }
    }
    if let Some(path) = ca_file {
        add_ca_file(&mut roots, path)?;
    }
    if roots.is_empty() {
        return Err(format!(
            "no CA certificates for TLS: the system bundle ({}) is empty or missing and no caFile is set",
            CA_BUNDLES.join(", ")
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

impl Channel {
    /// Connects (TCP, TLS when asked, trusting `ca_file` besides the system bundle, HTTP/2
    /// handshake) within `timeout`.
    pub async fn connect(
        target: &Target,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Channel, String> {
        tokio::time::timeout(timeout, Self::connect_inner(target, ca_file))
            .await
            .map_err(|_| format!("connecting to {target}: timed out"))?
    }

    async fn connect_inner(target: &Target, ca_file: Option<&Path>) -> Result<Channel, String> {
        let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("connecting to {target}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if target.tls {
            let connector = tokio_rustls::TlsConnector::from(tls_config(ca_file)?);
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| format!("{target}: {e}"))?;
            Box::new(
                connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {target}: {e}"))?,
            )
        } else {
            Box::new(tcp)
        };
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP/2 with {target}: {e}"))?;
        let conn = tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "discovery connection closed");
            }
        });
        let scheme = if target.tls { "https" } else { "http" };
        Ok(Channel {
            send,
            base: format!("{scheme}://{}", target.authority()),
            conn,
        })
    }

    async fn call<Req: Message>(&mut self, method: &str, req: &Req) -> Result<Incoming, String> {
        let body = req.encode_to_vec();
        let mut frame = Vec::with_capacity(body.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        let request = hyper::Request::builder()
            .method("POST")
            .uri(format!(
                "{}/sidero.discovery.server.Cluster/{method}",
                self.base
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header(
                "user-agent",
                concat!("hybridnet-meshd/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(frame)))
            .map_err(|e| e.to_string())?;
        self.send
            .ready()
            .await
            .map_err(|e| format!("{method}: {e}"))?;
        let response = self
            .send
            .send_request(request)
            .await
            .map_err(|e| format!("{method}: {e}"))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(format!("{method}: HTTP {}", response.status()));
        }
        check_status(method, response.headers())?;
        Ok(response.into_body())
    }

    /// A unary call.
    pub async fn unary<Req: Message, Resp: Message + Default>(
        &mut self,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, String> {
        let work = async {
            let body = self.call(method, req).await?;
            let collected = body.collect().await.map_err(|e| format!("{method}: {e}"))?;
            if let Some(trailers) = collected.trailers() {
                check_status(method, trailers)?;
            }
            let mut buf = BytesMut::from(collected.to_bytes().as_ref());
            match next_message(&mut buf)? {
                Some(bytes) => Resp::decode(bytes).map_err(|e| format!("{method}: {e}")),
                None => Err(format!("{method}: no message in the answer")),
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("{method}: timed out"))?
    }

    /// A server-streaming call.
    pub async fn stream<Req: Message>(
        &mut self,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Stream, String> {
        let body = tokio::time::timeout(timeout, self.call(method, req))
            .await
            .map_err(|_| format!("{method}: timed out"))??;
        Ok(Stream {
            body,
            buf: BytesMut::new(),
            method: method.to_owned(),
        })
    }
}

/// The messages of a server stream.
#[derive(Debug)]
pub struct Stream {
    body: Incoming,
    buf: BytesMut,
    method: String,
}

impl Stream {
    /// The next message; `Err` when the stream fails or ends (a watch never ends on its own).
    pub async fn next<M: Message + Default>(&mut self) -> Result<M, String> {
        loop {
            if let Some(bytes) = next_message(&mut self.buf)? {
                return M::decode(bytes).map_err(|e| format!("{}: {e}", self.method));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        check_status(&self.method, trailers)?;
                        return Err(format!("{}: the stream ended", self.method));
                    }
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(format!("{}: {e}", self.method)),
                None => return Err(format!("{}: the stream ended", self.method)),
            }
        }
    }
}

fn check_status(method: &str, headers: &hyper::HeaderMap) -> Result<(), String> {
    match headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        None | Some("0") => Ok(()),
        Some(code) => {
            let message = headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            Err(format!("{method}: gRPC status {code} {message}"))
        }
    }
}

/// Takes one complete gRPC message off `buf`.
fn next_message(buf: &mut BytesMut) -> Result<Option<Bytes>, String> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err("compressed gRPC message (not negotiated)".into());
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MESSAGE_MAX {
        return Err(format!("gRPC message of {len} bytes (over {MESSAGE_MAX})"));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_as_talos_writes_them() {
        let t = Target::parse("https://discovery.talos.dev/").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port),
            (true, "discovery.talos.dev", 443)
        );
        let t = Target::parse("http://192.0.2.1:3000").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port), (false, "192.0.2.1", 3000));
        let t = Target::parse("discovery.example.org:8443").unwrap();
        assert_eq!((t.tls, t.port), (true, 8443));
        let t = Target::parse("http://[2001:db8::1]:3000/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("2001:db8::1", 3000));
        assert_eq!(t.to_string(), "http://[2001:db8::1]:3000");
        assert!(Target::parse("https://").is_err());
        assert!(Target::parse("http://h:x").is_err());
    }

    /// The real service redirects to a bare `host:port` (a gRPC target): the transport stays.
    #[test]
    fn a_redirect_without_a_scheme_keeps_the_transport() {
        let plain = Target::parse("http://192.0.2.1:3000/").unwrap();
        let to = plain.redirect("192.0.2.2:3001").unwrap();
        assert_eq!(
            (to.tls, to.host.as_str(), to.port),
            (false, "192.0.2.2", 3001)
        );
        let to = plain.redirect("[2001:db8::2]:3001").unwrap();
        assert_eq!((to.tls, to.host.as_str()), (false, "2001:db8::2"));
        let to = plain.redirect("https://discovery.example.org").unwrap();
        assert_eq!((to.tls, to.port), (true, 443));
        let tls = Target::parse("https://discovery.talos.dev/").unwrap();
        let to = tls.redirect("discovery2.example.org:443").unwrap();
        assert_eq!((to.tls, to.port), (true, 443));
        let to = tls.redirect("http://192.0.2.2:3001").unwrap();
        assert!(!to.tls);
        assert!(plain.redirect("h:x").is_err());
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let missing = dir.path().join("missing.pem");
        let e = add_ca_file(&mut roots, &missing).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = add_ca_file(&mut roots, &empty).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(roots.is_empty());
        // A PEM block whose content is no certificate is refused.
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(add_ca_file(&mut roots, &bad).is_err(), "garbage DER");
    }

    #[test]
    fn frames_split_and_join() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0, 0, 0, 0, 3, 1, 2]);
        assert_eq!(next_message(&mut buf).unwrap(), None);
        buf.extend_from_slice(&[3, 0, 0, 0, 0, 0]);
        assert_eq!(
            next_message(&mut buf).unwrap().unwrap().as_ref(),
            &[1, 2, 3]
        );
        assert_eq!(
            next_message(&mut buf).unwrap().unwrap().as_ref(),
            &[] as &[u8]
        );
        buf.extend_from_slice(&[1, 0, 0, 0, 0]);
        assert!(next_message(&mut buf).is_err());
        let mut big = BytesMut::from(&[0u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(next_message(&mut big).is_err());
    }
}
