//! A Kubernetes API server stand-in for meshd's Kubernetes registry. A real kube-apiserver needs etcd,
//! certificates and a control plane that cannot run in these tests, so this one serves just the Node API
//! that the registry uses, over plain HTTP/1.1, as the real server behaves:
//!
//! - `GET /api/v1/nodes`: a `NodeList` with the current `resourceVersion` (`fieldSelector=metadata.name=x`
//!   honoured);
//! - `GET /api/v1/nodes?watch=1&resourceVersion=N`: chunked JSON lines (`{"type":"ADDED|MODIFIED|DELETED",
//!   "object":...}`): every change after N from the history, then live changes; without N (or 0) the
//!   current nodes as ADDED first. A version older than the compacted history answers 410 Gone, as an
//!   HTTP status ([`Gone::Status`]) or as an `ERROR` event with code 410 that ends the stream
//!   ([`Gone::Event`], what the watch cache sends). Upstream (kubernetes/kubernetes,
//!   `staging/src/k8s.io/apiserver/pkg/storage/cacher/`): `watchCache.getAllEventsSinceLocked`
//!   (watch_cache.go) answers a version older than its oldest event with `NewResourceExpired` ("too old
//!   resource version", 410), and `Cacher.Watch` (cacher.go) hands that error to the client as a watch
//!   whose one event is `ERROR` with the 410 `Status` (`newErrWatcher`);
//! - `GET /api/v1/nodes/<name>`, and `PATCH /api/v1/nodes/<name>` with a JSON merge patch
//!   (`application/merge-patch+json`, RFC 7386): the resourceVersion moves on and watchers get MODIFIED;
//!   404 `Status` for an unknown node;
//! - controls: add, change and delete nodes (what kubelets and controllers do), close every watch
//!   ([`KubeApiServer::close_watches`]), compact the history ([`KubeApiServer::compact`]), count requests;
//! - plain HTTP ([`KubeApiServer::start`], the token in the kubeconfig is ignored) or HTTPS with client
//!   certificates as kubelets use them ([`KubeApiServer::start_tls`]: a test CA, a server certificate for
//!   the listen address, one client certificate; a client without one is refused in the handshake); no
//!   authorization; state is in memory and a stopped server (drop) closes every connection.
//!
//! For dnslocal's `clusterZone: kubernetes` it also serves Services and EndpointSlices cluster-wide, as
//! kube-proxy and CoreDNS read them: `GET /api/v1/services` and
//! `GET /apis/discovery.k8s.io/v1/endpointslices` (`ServiceList`/`EndpointSliceList` with the
//! `resourceVersion`), and the same with `watch=1&resourceVersion=N` (history, then live events; 410
//! Gone below the compacted history, in the same two forms as for Nodes). One resourceVersion counter
//! orders every kind, as etcd's revision does. Controls: [`KubeApiServer::put`] and
//! [`KubeApiServer::remove`] (what the API server's clients write), counted as `services.list`,
//! `endpointslices.watch`, and so on.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::Netns;
use crate::standin::{HttpStandin, Protocol};

/// How a too-old resourceVersion is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// HTTP 410 with a `Status` body.
    Status,
    /// HTTP 200, then one `ERROR` event carrying a `Status` with code 410, then the end of the stream.
    Event,
}

#[derive(Debug)]
struct Watcher {
    tx: mpsc::UnboundedSender<Bytes>,
    name: Option<String>,
    /// `nodes`, `services` or `endpointslices`.
    collection: &'static str,
}

/// The namespaced collections served besides Nodes: (collection, list path, list kind).
const COLLECTIONS: [(&str, &str, &str); 2] = [
    ("services", "/api/v1/services", "ServiceList"),
    (
        "endpointslices",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
    ),
];

#[derive(Debug)]
struct State {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object, collection) after `oldest`.
    history: Vec<(u64, &'static str, Value, &'static str)>,
    /// Services and EndpointSlices by (collection, `namespace/name`).
    objects: BTreeMap<(&'static str, String), Value>,
    /// Watches from a version below this get 410 Gone.
    oldest: u64,
    gone: Gone,
    watchers: Vec<Watcher>,
    requests: BTreeMap<String, u64>,
}

impl State {
    fn emit(&mut self, kind: &'static str, object: Value) {
        self.emit_in("nodes", kind, object);
    }

    fn emit_in(&mut self, collection: &'static str, kind: &'static str, object: Value) {
        let rv = self.rv;
        self.history.push((rv, kind, object.clone(), collection));
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let line = event_line(kind, &object);
        self.watchers.retain(|w| {
            if w.collection != collection || w.name.as_ref().is_some_and(|n| *n != name) {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
    }

    fn bump(&mut self, object: &mut Value) {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

/// The PEM material a kubeconfig embeds for [`KubeApiServer::start_tls`].
#[derive(Clone, Debug)]
struct ClientTls {
    ca: String,
    cert: String,
    key: String,
}

/// A test CA, a server certificate for `ip` and a client certificate (CN `system:node:lab`, group
/// `system:nodes`, as a kubelet's).
fn pki(ip: std::net::IpAddr) -> Result<(Arc<rustls::ServerConfig>, ClientTls), String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca = crate::pki::TestCa::new("kubernetes stand-in CA")?;
    let (server, server_key) = ca.issue(
        &[ip.to_string()],
        &[],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client, client_key) = ca.issue(
        &[],
        &[
            (rcgen::DnType::CommonName, "system:node:lab"),
            (rcgen::DnType::OrganizationName, "system:nodes"),
        ],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).map_err(|e| e.to_string())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(server.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .map_err(|e| e.to_string())?;
    Ok((
        Arc::new(config),
        ClientTls {
            ca: ca.pem(),
            cert: client.pem(),
            key: client_key.serialize_pem(),
        },
    ))
}

/// A running stand-in; stopped (every connection closed) on drop.
#[derive(Debug)]
pub struct KubeApiServer {
    pub addr: SocketAddr,
    tls: Option<ClientTls>,
    state: Arc<Mutex<State>>,
    _server: HttpStandin,
}

impl KubeApiServer {
    /// Starts the server on `addr` inside `netns`, plain HTTP.
    pub fn start(netns: &Netns, addr: SocketAddr) -> KubeApiServer {
        Self::start_with(netns, addr, None)
    }

    /// Starts the server on `addr` inside `netns`, HTTPS with client certificates (see the module docs).
    pub fn start_tls(netns: &Netns, addr: SocketAddr) -> KubeApiServer {
        let (config, client) =
            pki(addr.ip()).unwrap_or_else(|e| panic!("Kubernetes API stand-in PKI: {e}"));
        Self::start_with(netns, addr, Some((config, client)))
    }

    fn start_with(
        netns: &Netns,
        addr: SocketAddr,
        tls: Option<(Arc<rustls::ServerConfig>, ClientTls)>,
    ) -> KubeApiServer {
        let (acceptor, client_tls) = match tls {
            Some((config, client)) => (Some(tokio_rustls::TlsAcceptor::from(config)), Some(client)),
            None => (None, None),
        };
        let listener = netns
            .tcp_listener(addr)
            .unwrap_or_else(|e| panic!("Kubernetes API stand-in cannot listen on {addr}: {e}"));
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            nodes: BTreeMap::new(),
            history: Vec::new(),
            objects: BTreeMap::new(),
            oldest: 0,
            gone: Gone::Status,
            watchers: Vec::new(),
            requests: BTreeMap::new(),
        }));
        let st = state.clone();
        let server =
            HttpStandin::spawn(listener, acceptor, Protocol::Http1, None, move |_, req| {
                let st = st.clone();
                async move { handle(&st, req).await }
            });
        KubeApiServer {
            addr,
            tls: client_tls,
            state,
            _server: server,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(|e| panic!("Kubernetes API stand-in state poisoned: {e}"));
        f(&mut s)
    }

    /// `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A kubeconfig for `user` pointing at this server: a token the server ignores, or over HTTPS the
    /// CA and the client certificate embedded (`*-data`, base64 PEM, as kubeadm writes them).
    pub fn kubeconfig(&self, user: &str) -> String {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let (ca, creds) = match &self.tls {
            None => (String::new(), format!("    token: token-{user}\n")),
            Some(t) => (
                format!("    certificate-authority-data: {}\n", b64(&t.ca)),
                format!(
                    "    client-certificate-data: {}\n    client-key-data: {}\n",
                    b64(&t.cert),
                    b64(&t.key)
                ),
            ),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {url}\n{ca}\
             users:\n- name: {user}\n  user:\n{creds}contexts:\n- name: lab\n  context:\n    \
             cluster: lab\n    user: {user}\ncurrent-context: lab\n",
            url = self.url()
        )
    }

    /// Registers a Node as a kubelet does: `labels`, `spec.podCIDRs`, `status.addresses` as
    /// (type, address).
    pub fn add_node(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        pod_cidrs: &[&str],
        addresses: &[(&str, &str)],
    ) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let addresses: Vec<Value> = addresses
            .iter()
            .map(|(t, a)| json!({"type": t, "address": a}))
            .chain(std::iter::once(
                json!({"type": "Hostname", "address": name}),
            ))
            .collect();
        let mut node = json!({
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {"name": name, "labels": labels, "annotations": {}},
            "spec": {"podCIDR": pod_cidrs.first().copied().unwrap_or(""), "podCIDRs": pod_cidrs},
            "status": {"addresses": addresses},
        });
        self.with(|s| {
            s.bump(&mut node);
            s.nodes.insert(name.to_owned(), node.clone());
            s.emit("ADDED", node);
        });
    }

    /// Changes a Node (as a controller would); watchers get MODIFIED.
    pub fn update_node(&self, name: &str, f: impl FnOnce(&mut Value)) {
        self.with(|s| {
            let Some(mut node) = s.nodes.get(name).cloned() else {
                panic!("no node {name}");
            };
            f(&mut node);
            s.bump(&mut node);
            s.nodes.insert(name.to_owned(), node.clone());
            s.emit("MODIFIED", node);
        });
    }

    /// Deletes a Node; watchers get DELETED.
    pub fn delete_node(&self, name: &str) {
        self.with(|s| {
            if let Some(mut node) = s.nodes.remove(name) {
                s.bump(&mut node);
                s.emit("DELETED", node);
            }
        });
    }

    /// The Node as stored.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.with(|s| s.nodes.get(name).cloned())
    }

    /// A Node's annotations.
    pub fn annotations(&self, name: &str) -> BTreeMap<String, String> {
        self.node(name)
            .and_then(|n| {
                n["metadata"]["annotations"].as_object().map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Ends every watch stream (as an API server restart or a load balancer timeout does); clients
    /// resume from their last resourceVersion.
    pub fn close_watches(&self) {
        self.with(|s| s.watchers.clear());
    }

    /// Compacts the history: the version moves on (writes elsewhere) and every watch from an older
    /// version is answered 410 Gone in `how`; a fresh list gives a version that can be watched.
    pub fn compact(&self, how: Gone) {
        self.with(|s| {
            s.rv += 1;
            s.oldest = s.rv;
            s.history.clear();
            s.gone = how;
        });
    }

    /// Live watch streams.
    pub fn watches(&self) -> usize {
        self.with(|s| s.watchers.iter().filter(|w| !w.tx.is_closed()).count())
    }

    /// Requests served by kind: `list`, `watch`, `get`, `patch`, `gone` (410 answers) for Nodes;
    /// `services.list`, `services.watch`, `endpointslices.list`, `endpointslices.watch`.
    pub fn requests(&self, kind: &str) -> u64 {
        self.with(|s| s.requests.get(kind).copied().unwrap_or(0))
    }

    /// Creates or replaces a Service or EndpointSlice (`collection` `services` or `endpointslices`), as
    /// a controller's write does: the resourceVersion moves on, watchers get ADDED or MODIFIED.
    pub fn put(&self, collection: &str, mut object: Value) {
        let Some((coll, _, _)) = COLLECTIONS.iter().find(|c| c.0 == collection) else {
            panic!("the stand-in serves no collection {collection}");
        };
        let key = format!(
            "{}/{}",
            object["metadata"]["namespace"].as_str().unwrap_or(""),
            object["metadata"]["name"].as_str().unwrap_or("")
        );
        self.with(|s| {
            s.bump(&mut object);
            let kind = if s.objects.contains_key(&(*coll, key.clone())) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            s.objects.insert((*coll, key), object.clone());
            s.emit_in(coll, kind, object);
        });
    }

    /// Deletes a Service or EndpointSlice; watchers get DELETED.
    pub fn remove(&self, collection: &str, namespace: &str, name: &str) {
        let Some((coll, _, _)) = COLLECTIONS.iter().find(|c| c.0 == collection) else {
            panic!("the stand-in serves no collection {collection}");
        };
        self.with(|s| {
            if let Some(mut object) = s.objects.remove(&(*coll, format!("{namespace}/{name}"))) {
                s.bump(&mut object);
                s.emit_in(coll, "DELETED", object);
            }
        });
    }
}

/// A response body fed by a channel (one chunk per watch event).
struct ChanBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn reply(code: StatusCode, body: &Value) -> Response<ChanBody> {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(Bytes::from(body.to_string()));
    let mut r = Response::new(ChanBody(rx));
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<ChanBody> {
    reply(code, &status(code.as_u16(), reason, message))
}

/// Minimal percent-decoding of a query value.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// The node name a `fieldSelector` asks for (only `metadata.name=x` is supported).
fn selected(q: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    match q.get("fieldSelector").filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(sel) => sel
            .strip_prefix("metadata.name=")
            .map(|n| Some(n.to_owned()))
            .ok_or_else(|| format!("unsupported fieldSelector {sel:?}")),
    }
}

fn count(state: &Arc<Mutex<State>>, kind: &str) {
    if let Ok(mut s) = state.lock() {
        *s.requests.entry(kind.to_owned()).or_default() += 1;
    }
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<ChanBody> {
    let path = req.uri().path().to_owned();
    let q = query(&req);
    let method = req.method().clone();
    if method == hyper::Method::GET
        && let Some(&(collection, _, list_kind)) = COLLECTIONS.iter().find(|c| c.1 == path)
    {
        let watch = q.get("watch").is_some_and(|w| w == "1" || w == "true");
        count(
            state,
            &format!("{collection}.{}", if watch { "watch" } else { "list" }),
        );
        if watch {
            return watch_collection(state, &q, collection, None);
        }
        let Ok(s) = state.lock() else {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "poisoned",
            );
        };
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((c, _), _)| *c == collection)
            .map(|(_, v)| v.clone())
            .collect();
        let api_version = if collection == "services" {
            "v1"
        } else {
            "discovery.k8s.io/v1"
        };
        return reply(
            StatusCode::OK,
            &json!({"kind": list_kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    }
    let name = path
        .strip_prefix("/api/v1/nodes/")
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .map(str::to_owned);
    if path == "/api/v1/nodes" && method == hyper::Method::GET {
        let field = match selected(&q) {
            Ok(f) => f,
            Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        let watch = q.get("watch").is_some_and(|w| w == "1" || w == "true");
        if watch {
            count(state, "watch");
            return watch_nodes(state, &q, field);
        }
        count(state, "list");
        let Ok(s) = state.lock() else {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "poisoned",
            );
        };
        let items: Vec<Value> = s
            .nodes
            .iter()
            .filter(|(n, _)| field.as_ref().is_none_or(|f| f == *n))
            .map(|(_, v)| v.clone())
            .collect();
        return reply(
            StatusCode::OK,
            &json!({"kind": "NodeList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    }
    let Some(name) = name else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route {path}"),
        );
    };
    if method == hyper::Method::GET {
        count(state, "get");
        let node = state.lock().ok().and_then(|s| s.nodes.get(&name).cloned());
        return match node {
            Some(n) => reply(StatusCode::OK, &n),
            None => failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("nodes \"{name}\" not found"),
            ),
        };
    }
    if method == hyper::Method::PATCH {
        count(state, "patch");
        let ctype = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if !ctype.starts_with("application/merge-patch+json") {
            return failure(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!("only application/merge-patch+json here, not {ctype:?}"),
            );
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let patch: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let Ok(mut s) = state.lock() else {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "poisoned",
            );
        };
        let Some(mut node) = s.nodes.get(&name).cloned() else {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("nodes \"{name}\" not found"),
            );
        };
        merge_patch(&mut node, &patch);
        node["metadata"]["name"] = json!(name);
        s.bump(&mut node);
        s.nodes.insert(name.clone(), node.clone());
        s.emit("MODIFIED", node.clone());
        return reply(StatusCode::OK, &node);
    }
    failure(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        &format!("{method} {path}"),
    )
}

fn watch_nodes(
    state: &Arc<Mutex<State>>,
    q: &BTreeMap<String, String>,
    field: Option<String>,
) -> Response<ChanBody> {
    watch_collection(state, q, "nodes", field)
}

/// A watch on `collection` (`field`: only the object of this name).
fn watch_collection(
    state: &Arc<Mutex<State>>,
    q: &BTreeMap<String, String>,
    collection: &'static str,
    field: Option<String>,
) -> Response<ChanBody> {
    let Ok(mut s) = state.lock() else {
        return failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "poisoned",
        );
    };
    let from = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let (tx, rx) = mpsc::unbounded_channel();
    let wanted = |n: &str| field.as_ref().is_none_or(|f| f == n);
    if from.is_empty() || from == "0" {
        if collection == "nodes" {
            for (n, v) in &s.nodes {
                if wanted(n) {
                    let _ = tx.send(event_line("ADDED", v));
                }
            }
        } else {
            for ((c, _), v) in &s.objects {
                if *c == collection {
                    let _ = tx.send(event_line("ADDED", v));
                }
            }
        }
    } else {
        let Ok(from) = from.parse::<u64>() else {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("resourceVersion {from:?}"),
            );
        };
        if from < s.oldest {
            *s.requests.entry("gone".into()).or_default() += 1;
            let st = status(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", s.oldest),
            );
            return match s.gone {
                Gone::Status => reply(StatusCode::GONE, &st),
                Gone::Event => {
                    let _ = tx.send(event_line("ERROR", &st));
                    drop(tx);
                    let mut r = Response::new(ChanBody(rx));
                    r.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    r
                }
            };
        }
        for (rv, kind, obj, c) in &s.history {
            if *c == collection
                && *rv > from
                && wanted(obj["metadata"]["name"].as_str().unwrap_or(""))
            {
                let _ = tx.send(event_line(kind, obj));
            }
        }
    }
    s.watchers.push(Watcher {
        tx,
        name: field,
        collection,
    });
    let mut r = Response::new(ChanBody(rx));
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(decode("metadata.name%3Dnode1"), "metadata.name=node1");
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("%"), "%");
    }
}
