//! Test doubles for apiprism: stand-in Kubernetes API servers and kubelet-like clients.
//!
//! No real kube-apiserver can run here (it needs etcd, images and certificates of a real cluster), so the
//! upstreams are stand-ins that speak what matters to a node-local TCP load balancer: TLS (a test CA generated
//! with rcgen) and HTTP/2, with a watch-like streaming response. `GET /name` answers the server's name (so a
//! test knows which upstream served a connection); `GET /watch` streams `<name> <seq>\n` every 100 ms until the
//! connection dies, as a Kubernetes watch keeps one HTTP/2 stream open for minutes.
//!
//! The server runs as its own process (`apiprism-standin`, so a test can SIGKILL it) in an upstream's network
//! namespace; the clients run on a thread inside the client's namespace.

pub mod lab;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How often a watch stream sends an event.
pub const WATCH_EVERY: Duration = Duration::from_millis(100);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A test CA and one server certificate for `localhost`, `127.0.0.1` and `::1` (what clients of a node-local
/// load balancer verify), all DER.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl Pki {
    pub fn generate() -> Pki {
        let build = || -> Result<Pki, rcgen::Error> {
            let ca_key = rcgen::KeyPair::generate()?;
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "apiprism test CA");
            let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
            let key = rcgen::KeyPair::generate()?;
            let params = rcgen::CertificateParams::new(vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "::1".to_owned(),
                // The name apiprism verifies a discovered API server for (`vetting`).
                "kubernetes".to_owned(),
            ])?;
            let cert = params.signed_by(&key, &ca)?;
            Ok(Pki {
                ca: ca.der().to_vec(),
                cert: cert.der().to_vec(),
                key: key.serialize_der(),
            })
        };
        build().expect("generating the test PKI")
    }

    /// Writes `ca.der` (and `ca.pem`), `server.der` and `server.key.der` into `dir`.
    pub fn write(&self, dir: &Path) {
        for (name, bytes) in [
            ("ca.der", &self.ca),
            ("server.der", &self.cert),
            ("server.key.der", &self.key),
        ] {
            std::fs::write(dir.join(name), bytes).expect("writing the test PKI");
        }
        std::fs::write(dir.join("ca.pem"), self.ca_pem()).expect("writing the test PKI");
    }

    /// The CA certificate as PEM (what `apiprism.clusterCAFile` holds).
    pub fn ca_pem(&self) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.ca);
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out
    }

    /// Reads what [`Pki::write`] wrote.
    pub fn read(dir: &Path) -> std::io::Result<Pki> {
        Ok(Pki {
            ca: std::fs::read(dir.join("ca.der"))?,
            cert: std::fs::read(dir.join("server.der"))?,
            key: std::fs::read(dir.join("server.key.der"))?,
        })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    pub fn server_config(&self) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(self.cert.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone())),
            )?;
        // As kube-apiserver: HTTP/2 for clients that offer it, HTTP/1.1 for the others (doctor's clock
        // check asks for the `Date` over HTTP/1.1). kubernetes/kubernetes,
        // staging/src/k8s.io/apiserver/pkg/server/secure_serving.go, `SecureServingInfo.tlsConfig`:
        // `NextProtos: []string{"h2", "http/1.1"}`, and `Serve` enables both protocols.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    pub fn client_config(&self) -> Result<Arc<ClientConfig>, rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(self.ca.clone()))?;
        let mut config = ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A streaming body fed by a channel (the watch).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

type ServerBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn answer(name: &str, req: &Request<Incoming>) -> Response<ServerBody> {
    match req.uri().path() {
        "/watch" => {
            let (tx, rx) = mpsc::channel(4);
            let name = name.to_owned();
            tokio::spawn(async move {
                for seq in 0u64.. {
                    if tx
                        .send(Bytes::from(format!("{name} {seq}\n")))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    tokio::time::sleep(WATCH_EVERY).await;
                }
            });
            Response::new(ChannelBody(rx).boxed_unsync())
        }
        _ => Response::new(Full::new(Bytes::from(name.to_owned())).boxed_unsync()),
    }
}

/// Serves TLS + HTTP/2 (HTTP/1.1 to clients that do not offer h2) on `listener` as `name` until the
/// process dies.
pub async fn serve(name: String, listener: TcpListener, tls: Arc<ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    let name: Arc<str> = name.into();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let name = Arc::clone(&name);
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = answer(&name, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            }
        });
    }
}

/// An HTTP/2 connection to `addr` over TLS, verified as `127.0.0.1` (what kubelet does through a loopback LB).
pub async fn connect(
    addr: SocketAddr,
    tls: &Arc<ClientConfig>,
) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let server_name = ServerName::IpAddress(addr.ip().into());
    let stream = TlsConnector::from(Arc::clone(tls))
        .connect(server_name, tcp)
        .await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn get(path: &str) -> Result<Request<Empty<Bytes>>, BoxError> {
    Ok(Request::builder()
        .uri(format!("https://127.0.0.1{path}"))
        .body(Empty::new())?)
}

/// A new connection, one `GET /name`: the name of the server that answered.
pub async fn fetch_name(
    addr: SocketAddr,
    tls: &Arc<ClientConfig>,
    timeout: Duration,
) -> Result<String, String> {
    let work = async {
        let mut sender = connect(addr, tls).await?;
        let resp = sender.send_request(get("/name")?).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, BoxError>(String::from_utf8_lossy(&body).into_owned())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(name)) => Ok(name),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

/// An open watch: events as they come.
#[derive(Debug)]
pub struct Watch {
    body: Incoming,
    buffer: String,
}

impl Watch {
    /// Opens a new connection and starts `GET /watch`.
    pub async fn open(addr: SocketAddr, tls: &Arc<ClientConfig>) -> Result<Watch, String> {
        let work = async {
            let mut sender = connect(addr, tls).await?;
            let resp = sender.send_request(get("/watch")?).await?;
            Ok::<_, BoxError>(resp.into_body())
        };
        match tokio::time::timeout(Duration::from_secs(5), work).await {
            Ok(Ok(body)) => Ok(Watch {
                body,
                buffer: String::new(),
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("watch: timed out".to_owned()),
        }
    }

    /// The next event's server name; `Err` when the stream ended or broke.
    pub async fn next(&mut self) -> Result<String, String> {
        loop {
            if let Some(i) = self.buffer.find('\n') {
                let line: String = self.buffer.drain(..=i).collect();
                let name = line.split(' ').next().unwrap_or_default().to_owned();
                return Ok(name);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("stream ended".to_owned()),
            }
        }
    }
}
