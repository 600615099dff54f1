//! A Talos discovery service stand-in for the tests. The real service (`siderolabs/discovery-service`) is
//! BSL-licensed and cannot run here; this one implements the same gRPC API (`sidero.discovery.server.Cluster`
//! over HTTP/2, messages written from the published API description) and behaves as the real one does:
//!
//! - `Hello` answers the client's address as seen by the server (and a redirect when one is set);
//! - `AffiliateUpdate` stores the opaque (encrypted) data, *merges* endpoints, honours the TTL;
//! - `Watch` sends a full snapshot first (even when empty), then one message per change; a subscriber
//!   whose 32-message buffer overflows is cut off ("lost update") and must re-watch;
//! - records expire after their TTL (checked every second here; every minute in the real one);
//! - the real limits: IDs 256 B, data 2048 B, endpoint 32 B, 64 endpoints, TTL 30 min, 1024 affiliates per
//!   cluster (answered with gRPC `INVALID_ARGUMENT` / `RESOURCE_EXHAUSTED`);
//! - state is in memory: a stopped server comes back empty (the real one does too without snapshots).
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
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::sync::mpsc;

use crate::Netns;

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
}

/// A running stand-in service; stopped (every connection closed, state lost) on drop.
#[derive(Debug)]
pub struct DiscoveryServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiscoveryServer {
    /// Starts the service on `addr` inside `netns` (plain HTTP/2: Talos's `insecure` mode).
    pub fn start(netns: &Netns, addr: SocketAddr) -> DiscoveryServer {
        let listener = netns
            .tcp_listener(addr)
            .unwrap_or_else(|e| panic!("discovery stand-in cannot listen on {addr}: {e}"));
        let state = Arc::new(Mutex::new(State::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"));
            rt.block_on(serve(listener, st, stop_rx));
        });
        DiscoveryServer {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://addr/`, as a `DiscoveryServiceConfig` endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Makes `Hello` redirect every client to `endpoint`.
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

    /// Calls served, by method.
    pub fn calls(&self, method: &str) -> u64 {
        self.state
            .lock()
            .map(|s| s.calls.get(method).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for DiscoveryServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<Mutex<State>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => panic!("listener: {e}"),
    };
    let gc_state = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            gc(&gc_state);
        }
    });
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                let st = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, peer, req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        }
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
            if r.cluster_id.len() > ID_MAX {
                return error(INVALID_ARGUMENT, "cluster ID is too long");
            }
            let ip = match peer.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
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
            drop(s);
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                if tx.send(Frame::data(frame(&snapshot))).await.is_err() {
                    return;
                }
                while let Some(m) = sub_rx.recv().await {
                    if tx.send(Frame::data(frame(&m))).await.is_err() {
                        return;
                    }
                }
                // Cut off (buffer overflow) or the server stops.
                let _ = tx.send(trailers(10, "lost update")).await;
            });
            grpc_response(rx)
        }
        _ => error(UNIMPLEMENTED, "unknown method"),
    }
}
