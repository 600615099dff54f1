//! A Talos discovery service stand-in for the tests. The real service (`siderolabs/discovery-service`) is
//! BSL-licensed and cannot run here; this one implements the same gRPC API (`sidero.discovery.server.Cluster`
//! over HTTP/2, messages written from the published API description) and behaves as the real one does:
//!
//! - `Hello` answers the client's address as seen by the server (and a redirect when one is set: the
//!   real one sends its `--redirect-endpoint` as written, a gRPC target such as `example.com:443`,
//!   `cmd/discovery-service/main.go`), and counts the client version as the real one labels
//!   `discovery_server_hello_requests_total` ([`parse_version`], `pkg/server/version.go`);
//! - every call first passes the real per-IP rate limit, 15 requests/s with a burst of 60
//!   (`pkg/limits/limits.go`, `internal/limiter/iprate.go`): a call over it waits for a token, as
//!   `rate.Limiter.Wait` does in `pkg/server/limiting.go`, and fails with `RESOURCE_EXHAUSTED` when
//!   the client's deadline (`grpc-timeout`) is nearer than the token; [`DiscoveryServer::throttled`]
//!   counts the calls that had to wait;
//! - `AffiliateUpdate` stores the opaque (encrypted) data, *merges* endpoints, honours the TTL;
//! - `Watch` sends a full snapshot first (even when empty), then one message per change; a subscriber
//!   whose 32-message buffer overflows is cut off ("lost update") and must re-watch;
//! - records expire after their TTL (checked every second here; every minute in the real one);
//! - the real limits: IDs 256 B, data 2048 B, endpoint 32 B, 64 endpoints, TTL 30 min, 1024 affiliates per
//!   cluster (answered with gRPC `INVALID_ARGUMENT` / `RESOURCE_EXHAUSTED`);
//! - state is in memory: a stopped server comes back empty (the real one does too without snapshots);
//! - plain HTTP/2 (the real one without `--certificate-path`) or TLS with a certificate from a test CA
//!   ([`DiscoveryServer::start_tls`]; the real one with its own certificate and key).
//!
//! Beside the service, a test can make it behave as a proxy in front of it does:
//! [`DiscoveryServer::cut_watches_every`] ends every watch stream after a while (`UNAVAILABLE`, as a
//! load balancer's stream timeout does), and [`DiscoveryServer::watching_time`] measures how long a
//! client had a watch open.
//!
//! The server sees only cluster IDs, affiliate IDs and ciphertext, as the real one.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{HeaderMap, Request, Response};
use prost::Message;
use tokio::sync::mpsc;

use crate::Netns;
use crate::standin::{HttpStandin, Protocol};

/// The real service's limits (`pkg/limits`).
pub const ID_MAX: usize = 256;
pub const DATA_MAX: usize = 2048;
pub const ENDPOINT_MAX: usize = 32;
pub const ENDPOINTS_MAX: usize = 64;
pub const TTL_MAX: Duration = Duration::from_secs(30 * 60);
pub const AFFILIATES_MAX: usize = 1024;
/// Per-subscriber buffer before "lost update".
pub const WATCH_BUFFER: usize = 32;

/// The API messages (package `sidero.discovery.server`): the same definitions meshd speaks; their wire
/// compatibility with Talos is checked against vectors from an independent implementation (meshd's tests).
pub use hybridnet_meshd::discovery::proto::server as pb;

#[derive(Debug)]
struct Entry {
    data: Vec<u8>,
    data_expires: Instant,
    endpoints: Vec<(Vec<u8>, Instant)>,
}

impl Entry {
    fn expires(&self) -> Instant {
        self.endpoints
            .iter()
            .map(|e| e.1)
            .fold(self.data_expires, Instant::max)
    }

    fn to_pb(&self, id: &str) -> pb::Affiliate {
        pb::Affiliate {
            id: id.to_owned(),
            data: self.data.clone(),
            endpoints: self.endpoints.iter().map(|e| e.0.clone()).collect(),
        }
    }
}

#[derive(Debug, Default)]
struct Cluster {
    affiliates: BTreeMap<String, Entry>,
    watchers: Vec<mpsc::Sender<pb::WatchResponse>>,
}

impl Cluster {
    fn notify(&mut self, msg: pb::WatchResponse) {
        // A full buffer cuts the subscriber off ("lost update"): dropping its sender ends its stream.
        self.watchers.retain(|w| w.try_send(msg.clone()).is_ok());
    }
}

#[derive(Debug, Default)]
struct State {
    clusters: BTreeMap<String, Cluster>,
    redirect: Option<String>,
    calls: BTreeMap<String, u64>,
    /// `Hello`s by parsed client version.
    versions: BTreeMap<String, u64>,
    limiters: BTreeMap<IpAddr, Bucket>,
    throttled: u64,
    cut_every: Option<Duration>,
    /// Open watches per client IP, and since when at least one was open.
    open: BTreeMap<IpAddr, (usize, Instant)>,
    /// Closed watching time per client IP (intervals with at least one watch open).
    watched: BTreeMap<IpAddr, Duration>,
}

/// The real per-IP limit (`pkg/limits/limits.go`: `IPRateRequestsPerSecondMax`, `IPRateBurstSizeMax`).
pub const RATE_PER_SECOND: f64 = 15.0;
pub const RATE_BURST: f64 = 60.0;

/// A token bucket as `golang.org/x/time/rate.Limiter`: full at first, `RATE_PER_SECOND` tokens a
/// second up to `RATE_BURST`; a reservation may take the count below zero, and then says how long
/// to wait.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(now: Instant) -> Bucket {
        Bucket {
            tokens: RATE_BURST,
            last: now,
        }
    }

    /// Takes one token at `now`; how long the call must wait for it.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * RATE_PER_SECOND).min(RATE_BURST);
        self.last = now.max(self.last);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / RATE_PER_SECOND)
        }
    }

    /// Gives a reservation back (the call was refused instead of waiting).
    pub fn cancel(&mut self) {
        self.tokens += 1.0;
    }
}

/// The client version as the real service labels it (`pkg/server/version.go`, `parseVersion`):
/// `vX.Y` out of `vX.Y.Z`, `vX.Y-pre` with a `-suffix`, else `unknown`.
pub fn parse_version(v: &str) -> String {
    const UNKNOWN: &str = "unknown";
    let (ver, suffix) = v.split_once('-').unwrap_or((v, ""));
    if !ver.starts_with('v') {
        return UNKNOWN.into();
    }
    let Some(p1) = ver.find('.').filter(|p| *p <= 3) else {
        return UNKNOWN.into();
    };
    let Some(p2) = ver[p1 + 1..].find('.').filter(|p| *p <= 3) else {
        return UNKNOWN.into();
    };
    let base = &ver[..p1 + p2 + 1];
    if suffix.is_empty() {
        base.into()
    } else {
        format!("{base}-pre")
    }
}

fn client_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl State {
    fn watch_opened(&mut self, ip: IpAddr) {
        let e = self.open.entry(ip).or_insert((0, Instant::now()));
        if e.0 == 0 {
            e.1 = Instant::now();
        }
        e.0 += 1;
    }

    fn watch_closed(&mut self, ip: IpAddr) {
        let Some(e) = self.open.get_mut(&ip) else {
            return;
        };
        e.0 = e.0.saturating_sub(1);
        if e.0 == 0 {
            let since = e.1;
            *self.watched.entry(ip).or_default() += since.elapsed();
        }
    }
}

/// Marks a watch closed when its task ends, however it ends.
struct WatchGuard {
    state: Arc<Mutex<State>>,
    ip: IpAddr,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            s.watch_closed(self.ip);
        }
    }
}

/// A running stand-in service; stopped (every connection closed, state lost) on drop.
#[derive(Debug)]
pub struct DiscoveryServer {
    pub addr: SocketAddr,
    /// The test CA's certificate (PEM) when the service speaks TLS.
    pub ca_pem: Option<String>,
    state: Arc<Mutex<State>>,
    _server: HttpStandin,
}

impl DiscoveryServer {
    /// Starts the service on `addr` inside `netns` (plain HTTP/2: Talos's `insecure` mode).
    pub fn start(netns: &Netns, addr: SocketAddr) -> DiscoveryServer {
        Self::start_with(netns, addr, None)
    }

    /// Starts the service over TLS, with a certificate for `addr`'s IP from a new test CA
    /// ([`DiscoveryServer::ca_pem`]), as a self-hosted service with its own CA.
    pub fn start_tls(netns: &Netns, addr: SocketAddr) -> DiscoveryServer {
        let ca = crate::pki::TestCa::new("discovery stand-in CA")
            .unwrap_or_else(|e| panic!("test CA: {e}"));
        let config = ca
            .server_config(addr.ip())
            .unwrap_or_else(|e| panic!("discovery TLS: {e}"));
        Self::start_with(netns, addr, Some((config, ca.pem())))
    }

    fn start_with(
        netns: &Netns,
        addr: SocketAddr,
        tls: Option<(Arc<rustls::ServerConfig>, String)>,
    ) -> DiscoveryServer {
        let (acceptor, ca_pem) = match tls {
            Some((config, pem)) => (Some(tokio_rustls::TlsAcceptor::from(config)), Some(pem)),
            None => (None, None),
        };
        let listener = netns
            .tcp_listener(addr)
            .unwrap_or_else(|e| panic!("discovery stand-in cannot listen on {addr}: {e}"));
        let state = Arc::new(Mutex::new(State::default()));
        let (st, gc_state) = (state.clone(), state.clone());
        let server = HttpStandin::spawn(
            listener,
            acceptor,
            Protocol::Http2,
            Some(Box::new(move || gc(&gc_state))),
            move |peer, req| {
                let st = st.clone();
                async move { handle(&st, peer, req).await }
            },
        );
        DiscoveryServer {
            addr,
            ca_pem,
            state,
            _server: server,
        }
    }

    /// `http://addr/` (`https://addr/` over TLS), as a `DiscoveryServiceConfig` endpoint.
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/", self.addr)
    }

    /// Makes `Hello` redirect every client to `endpoint`, sent as written (the real service sends
    /// a bare gRPC target, `host:port`).
    pub fn set_redirect(&self, endpoint: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            s.redirect = endpoint;
        }
    }

    /// The affiliate IDs stored for `cluster`, and whether each has data.
    pub fn affiliates(&self, cluster: &str) -> Vec<(String, bool, usize)> {
        let Ok(s) = self.state.lock() else {
            return Vec::new();
        };
        s.clusters
            .get(cluster)
            .map(|c| {
                c.affiliates
                    .iter()
                    .map(|(id, e)| (id.clone(), !e.data.is_empty(), e.endpoints.len()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Cuts every watch off with "lost update", as a subscriber whose buffer overflowed is: the
    /// clients must watch again and resync from a new snapshot.
    pub fn lose_updates(&self) {
        if let Ok(mut s) = self.state.lock() {
            for c in s.clusters.values_mut() {
                c.watchers.clear();
            }
        }
    }

    /// Ends every watch stream `every` after it started (`None`: never), as a proxy with a stream
    /// timeout in front of the service does.
    pub fn cut_watches_every(&self, every: Option<Duration>) {
        if let Ok(mut s) = self.state.lock() {
            s.cut_every = every;
        }
    }

    /// How long, in all, `ip` has had at least one watch open.
    pub fn watching_time(&self, ip: IpAddr) -> Duration {
        let Ok(s) = self.state.lock() else {
            return Duration::ZERO;
        };
        let closed = s.watched.get(&ip).copied().unwrap_or_default();
        match s.open.get(&ip) {
            Some((n, since)) if *n > 0 => closed + since.elapsed(),
            _ => closed,
        }
    }

    /// `Hello`s by client version as the real service labels them ([`parse_version`]).
    pub fn hello_versions(&self) -> BTreeMap<String, u64> {
        self.state
            .lock()
            .map(|s| s.versions.clone())
            .unwrap_or_default()
    }

    /// Calls that had to wait for the per-IP rate limit (or were refused by it).
    pub fn throttled(&self) -> u64 {
        self.state.lock().map(|s| s.throttled).unwrap_or(0)
    }

    /// Calls served, by method.
    pub fn calls(&self, method: &str) -> u64 {
        self.state
            .lock()
            .map(|s| s.calls.get(method).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

fn gc(state: &Arc<Mutex<State>>) {
    let Ok(mut s) = state.lock() else { return };
    let now = Instant::now();
    for cluster in s.clusters.values_mut() {
        let expired: Vec<String> = cluster
            .affiliates
            .iter()
            .filter(|(_, e)| e.expires() <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            cluster.affiliates.remove(&id);
            cluster.notify(pb::WatchResponse {
                affiliates: vec![pb::Affiliate {
                    id,
                    ..pb::Affiliate::default()
                }],
                deleted: true,
            });
        }
        for e in cluster.affiliates.values_mut() {
            e.endpoints.retain(|(_, exp)| *exp > now);
        }
    }
}

/// A response body fed by a channel (unary answers and the watch stream alike).
struct ChanBody(mpsc::Receiver<Frame<Bytes>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn frame<M: Message>(m: &M) -> Bytes {
    let body = m.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

fn trailers(code: u32, message: &str) -> Frame<Bytes> {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", code.into());
    if let Ok(v) = message.parse() {
        h.insert("grpc-message", v);
    }
    Frame::trailers(h)
}

fn respond(frames: Vec<Frame<Bytes>>) -> Response<ChanBody> {
    let (tx, rx) = mpsc::channel(frames.len().max(1));
    for f in frames {
        let _ = tx.try_send(f);
    }
    grpc_response(rx)
}

fn grpc_response(rx: mpsc::Receiver<Frame<Bytes>>) -> Response<ChanBody> {
    let mut r = Response::new(ChanBody(rx));
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    r
}

fn ok<M: Message>(m: &M) -> Response<ChanBody> {
    respond(vec![Frame::data(frame(m)), trailers(0, "")])
}

fn error(code: u32, message: &str) -> Response<ChanBody> {
    respond(vec![trailers(code, message)])
}

const INVALID_ARGUMENT: u32 = 3;
const RESOURCE_EXHAUSTED: u32 = 8;
const UNIMPLEMENTED: u32 = 12;
const UNAVAILABLE: u32 = 14;

/// The client's deadline from `grpc-timeout` (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let unit = v.chars().last()?;
    let n: u64 = v.get(..v.len() - 1)?.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n.saturating_mul(3600)),
        'M' => Duration::from_secs(n.saturating_mul(60)),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The rate-limit interceptor (`pkg/server/limiting.go`, `pause`): waits for a token, or refuses
/// when the client's deadline comes first.
async fn pause(state: &Arc<Mutex<State>>, ip: IpAddr, deadline: Option<Duration>) -> bool {
    let wait = {
        let Ok(mut s) = state.lock() else {
            return false;
        };
        let now = Instant::now();
        let bucket = s.limiters.entry(ip).or_insert_with(|| Bucket::new(now));
        let wait = bucket.reserve(now);
        if deadline.is_some_and(|d| d < wait) {
            bucket.cancel();
        }
        if !wait.is_zero() {
            s.throttled += 1;
        }
        wait
    };
    if deadline.is_some_and(|d| d < wait) {
        return false;
    }
    tokio::time::sleep(wait).await;
    true
}

async fn handle(
    state: &Arc<Mutex<State>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<ChanBody> {
    let method = req
        .uri()
        .path()
        .strip_prefix("/sidero.discovery.server.Cluster/")
        .unwrap_or("")
        .to_owned();
    let ip = client_ip(peer);
    if !pause(state, ip, grpc_timeout(req.headers())).await {
        return error(RESOURCE_EXHAUSTED, "rate limit exceeds request timeout");
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(INVALID_ARGUMENT, "bad body"),
    };
    let msg = if body.len() >= 5 {
        body.slice(5..)
    } else {
        Bytes::new()
    };
    if let Ok(mut s) = state.lock() {
        *s.calls.entry(method.clone()).or_default() += 1;
    }
    macro_rules! parse {
        ($t:ty) => {
            match <$t>::decode(msg.clone()) {
                Ok(m) => m,
                Err(e) => return error(INVALID_ARGUMENT, &e.to_string()),
            }
        };
    }
    let Ok(mut s) = state.lock() else {
        return error(13, "poisoned");
    };
    match method.as_str() {
        "Hello" => {
            let r = parse!(pb::HelloRequest);
            *s.versions
                .entry(parse_version(&r.client_version))
                .or_default() += 1;
            if r.cluster_id.len() > ID_MAX {
                return error(INVALID_ARGUMENT, "cluster ID is too long");
            }
            let client_ip = match ip {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            ok(&pb::HelloResponse {
                redirect: s
                    .redirect
                    .clone()
                    .map(|endpoint| pb::RedirectMessage { endpoint }),
                client_ip,
            })
        }
        "AffiliateUpdate" => {
            let r = parse!(pb::AffiliateUpdateRequest);
            if r.cluster_id.len() > ID_MAX || r.affiliate_id.len() > ID_MAX {
                return error(INVALID_ARGUMENT, "ID is too long");
            }
            if r.affiliate_data
                .as_ref()
                .is_some_and(|d| d.len() > DATA_MAX)
            {
                return error(INVALID_ARGUMENT, "affiliate data is too big");
            }
            if r.affiliate_endpoints.iter().any(|e| e.len() > ENDPOINT_MAX) {
                return error(INVALID_ARGUMENT, "affiliate endpoint is too big");
            }
            let ttl = r
                .ttl
                .map(|d| Duration::from_secs(d.seconds.max(0) as u64))
                .unwrap_or(TTL_MAX);
            if ttl > TTL_MAX {
                return error(INVALID_ARGUMENT, "TTL is too long");
            }
            let cluster = s.clusters.entry(r.cluster_id.clone()).or_default();
            if !cluster.affiliates.contains_key(&r.affiliate_id)
                && cluster.affiliates.len() >= AFFILIATES_MAX
            {
                return error(RESOURCE_EXHAUSTED, "too many affiliates in the cluster");
            }
            let expires = Instant::now() + ttl;
            let entry = cluster
                .affiliates
                .entry(r.affiliate_id.clone())
                .or_insert_with(|| Entry {
                    data: Vec::new(),
                    data_expires: expires,
                    endpoints: Vec::new(),
                });
            if let Some(d) = r.affiliate_data {
                entry.data = d;
                entry.data_expires = expires;
            }
            for e in r.affiliate_endpoints {
                match entry.endpoints.iter_mut().find(|x| x.0 == e) {
                    Some(x) => x.1 = expires,
                    None => entry.endpoints.push((e, expires)),
                }
            }
            if entry.endpoints.len() > ENDPOINTS_MAX {
                return error(INVALID_ARGUMENT, "too many endpoints");
            }
            let snapshot = entry.to_pb(&r.affiliate_id);
            cluster.notify(pb::WatchResponse {
                affiliates: vec![snapshot],
                deleted: false,
            });
            ok(&pb::Empty {})
        }
        "AffiliateDelete" => {
            let r = parse!(pb::AffiliateDeleteRequest);
            if let Some(cluster) = s.clusters.get_mut(&r.cluster_id)
                && cluster.affiliates.remove(&r.affiliate_id).is_some()
            {
                cluster.notify(pb::WatchResponse {
                    affiliates: vec![pb::Affiliate {
                        id: r.affiliate_id,
                        ..pb::Affiliate::default()
                    }],
                    deleted: true,
                });
            }
            ok(&pb::Empty {})
        }
        "List" => {
            let r = parse!(pb::ListRequest);
            let affiliates = s
                .clusters
                .get(&r.cluster_id)
                .map(|c| c.affiliates.iter().map(|(id, e)| e.to_pb(id)).collect())
                .unwrap_or_default();
            ok(&pb::ListResponse { affiliates })
        }
        "Watch" => {
            let r = parse!(pb::WatchRequest);
            let cluster = s.clusters.entry(r.cluster_id).or_default();
            let (sub_tx, mut sub_rx) = mpsc::channel(WATCH_BUFFER);
            let snapshot = pb::WatchResponse {
                affiliates: cluster
                    .affiliates
                    .iter()
                    .map(|(id, e)| e.to_pb(id))
                    .collect(),
                deleted: false,
            };
            cluster.watchers.push(sub_tx);
            let cut = s.cut_every;
            s.watch_opened(ip);
            drop(s);
            let guard = WatchGuard {
                state: state.clone(),
                ip,
            };
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let _guard = guard;
                if tx.send(Frame::data(frame(&snapshot))).await.is_err() {
                    return;
                }
                let cut_at = cut.map(|d| tokio::time::Instant::now() + d);
                loop {
                    tokio::select! {
                        m = sub_rx.recv() => match m {
                            Some(m) => {
                                if tx.send(Frame::data(frame(&m))).await.is_err() {
                                    return;
                                }
                            }
                            None => {
                                // Cut off (buffer overflow) or the server stops.
                                let _ = tx.send(trailers(10, "lost update")).await;
                                return;
                            }
                        },
                        () = tx.closed() => return,
                        () = async {
                            match cut_at {
                                Some(at) => tokio::time::sleep_until(at).await,
                                None => std::future::pending().await,
                            }
                        } => {
                            let _ = tx.send(trailers(UNAVAILABLE, "stream timeout (proxy)")).await;
                            return;
                        }
                    }
                }
            });
            grpc_response(rx)
        }
        _ => error(UNIMPLEMENTED, "unknown method"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors follow `pkg/server/version.go`: Talos sends its tag (`version.Tag`).
    #[test]
    fn versions_are_labelled_as_the_service_does() {
        assert_eq!(parse_version("v1.13.9"), "v1.13");
        assert_eq!(parse_version("v1.13.0-alpha.1"), "v1.13-pre");
        assert_eq!(parse_version("v0.1.0"), "v0.1");
        assert_eq!(parse_version("hybridnet-meshd 0.1.0"), "unknown");
        assert_eq!(parse_version("0.1.0"), "unknown");
        assert_eq!(parse_version("v1"), "unknown");
        assert_eq!(parse_version("v1234.1.0"), "unknown");
        assert_eq!(parse_version(""), "unknown");
        // What meshd sends is labelled with its own version, not `unknown`.
        let ours = hybridnet_meshd::discovery::registry::CLIENT_VERSION;
        assert_eq!(
            parse_version(ours),
            format!(
                "v{}",
                env!("CARGO_PKG_VERSION")
                    .rsplit_once('.')
                    .map_or("", |p| p.0)
            )
        );
    }

    #[test]
    fn the_bucket_allows_a_burst_of_60_then_15_a_second() {
        let t0 = Instant::now();
        let mut b = Bucket::new(t0);
        for _ in 0..60 {
            assert_eq!(b.reserve(t0), Duration::ZERO);
        }
        let wait = b.reserve(t0);
        assert!(
            wait > Duration::from_millis(60) && wait < Duration::from_millis(70),
            "{wait:?}"
        );
        let mut b = Bucket::new(t0);
        for _ in 0..60 {
            b.reserve(t0);
        }
        // A second later 15 more fit.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..15 {
            assert_eq!(b.reserve(t1), Duration::ZERO);
        }
        assert!(!b.reserve(t1).is_zero());
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut h = HeaderMap::new();
        h.insert(
            "grpc-timeout",
            "250m".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert(
            "grpc-timeout",
            "10S".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(grpc_timeout(&h), Some(Duration::from_secs(10)));
        h.insert(
            "grpc-timeout",
            "x".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(grpc_timeout(&h), None);
    }
}
