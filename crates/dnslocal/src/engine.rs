//! The query engine: cache lookups on the hot path, and for misses, coalescing, the in-flight bound,
//! routing to an upstream pool, serve-stale and prefetch.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::authority::Answered;
use crate::cache::{Cache, Hit};
use crate::limit::{ClientBudget, Verdict};
use crate::loops::LoopGuard;
use crate::metrics::{Metrics, Outcome};
use crate::upstream::Pool;
use crate::wire::{self, Aging, Query, QueryError, Rcode, TtlPolicy};

/// A miss gets SERVFAIL (or a stale answer) after this long, never a client timeout.
pub const MISS_DEADLINE: Duration = Duration::from_millis(900);
/// With a stale answer at hand, the upstream gets this long before the stale answer goes out.
pub const STALE_WAIT: Duration = Duration::from_millis(400);
/// RFC 8767: the TTL of a stale answer.
pub const STALE_TTL: u32 = 30;
/// Default bound on distinct questions resolved upstream at once.
pub const MAX_INFLIGHT: usize = 2048;
/// Clients waiting on one question in flight; more get a stale answer or SERVFAIL at once.
pub const MAX_WAITERS_PER_QUESTION: usize = 256;
/// Clients waiting on any question in flight (each holds its query, at most 4 KiB over UDP).
pub const MAX_WAITERS: usize = 16_384;

/// Where an answer goes.
#[derive(Debug)]
pub enum Reply {
    Udp(Arc<UdpSocket>, SocketAddr),
    Tcp(mpsc::Sender<Vec<u8>>),
}

impl Reply {
    fn limit(&self, q: &Query) -> usize {
        match self {
            Reply::Udp(..) => q.udp_limit(),
            Reply::Tcp(_) => usize::from(u16::MAX),
        }
    }

    fn send(&self, bytes: Vec<u8>) {
        match self {
            Reply::Udp(socket, peer) => {
                let _ = socket.send_to(&bytes, peer);
            }
            Reply::Tcp(tx) => {
                let _ = tx.try_send(bytes);
            }
        }
    }
}

#[derive(Debug)]
struct Waiter {
    buf: Vec<u8>,
    q: Query,
    reply: Reply,
    /// Joined a flight someone else started.
    coalesced: bool,
}

#[derive(Debug, Default)]
struct Flight {
    waiters: Vec<Waiter>,
    /// The upstream is slow or down and a stale answer went out: later askers get it at once.
    stale_mode: bool,
}

/// Which pool serves which names.
#[derive(Debug)]
pub struct Routes {
    /// Lower-cased wire-format zones that go to `cluster` (cluster domain, reverse zones).
    pub cluster_zones: Vec<Vec<u8>>,
    pub cluster: Option<Arc<Pool>>,
    /// Conditional forwarding (`forward`): lower-cased wire-format zones and their pools.
    pub forward: Vec<(Vec<u8>, Arc<Pool>)>,
    pub default: Arc<Pool>,
    /// `clusterZone: kubernetes`: the cluster zone (and the reverse names of its addresses) answered
    /// from the Kubernetes API; what it does not hold takes the paths above.
    pub authority: Option<Arc<crate::authority::Authority>>,
}

impl Routes {
    /// Whether `qname` is in one of the cluster zones (whatever serves them).
    pub fn in_cluster_zone(&self, qname: &[u8]) -> bool {
        self.cluster_zones.iter().any(|z| wire::in_zone(qname, z))
    }

    /// The pool of the longest zone `qname` is in (a `forward` zone before a cluster zone of the same
    /// name), else the default pool.
    pub fn pool_for(&self, qname: &[u8]) -> &Arc<Pool> {
        let cluster = self
            .cluster
            .iter()
            .flat_map(|pool| self.cluster_zones.iter().map(move |zone| (zone, pool)));
        let mut best: Option<(usize, &Arc<Pool>)> = None;
        for (zone, pool) in self.forward.iter().map(|(z, p)| (z, p)).chain(cluster) {
            if wire::in_zone(qname, zone) && best.is_none_or(|(len, _)| zone.len() > len) {
                best = Some((zone.len(), pool));
            }
        }
        best.map_or(&self.default, |(_, pool)| pool)
    }
}

/// The engine shared by all listeners of one instance.
#[derive(Debug)]
pub struct Engine {
    /// Shared with the next engine across a reload that does not change what it caches.
    pub cache: Arc<Cache>,
    pub routes: Routes,
    pub metrics: Metrics,
    /// Forwarding-loop state ([`crate::loops`]).
    pub loops: LoopGuard,
    policy: TtlPolicy,
    inflight: Mutex<HashMap<Box<[u8]>, Flight>>,
    max_inflight: usize,
    /// Waiters over all flights (changed under the `inflight` lock).
    waiters: AtomicUsize,
    runtime: tokio::runtime::Handle,
    /// Per-client budgets on the UDP path (`None`: unlimited).
    pub budget: Option<ClientBudget>,
}

/// What a listener does after [`Engine::handle`].
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `out` now.
    Send,
    /// The answer will be sent later (through the [`Reply`]).
    Later,
    /// Drop the packet.
    Drop,
}

impl Engine {
    pub fn new(
        cache: Arc<Cache>,
        routes: Routes,
        policy: TtlPolicy,
        metrics: Metrics,
        max_inflight: usize,
        runtime: tokio::runtime::Handle,
    ) -> Engine {
        Engine {
            cache,
            routes,
            metrics,
            loops: LoopGuard::new(false),
            policy,
            inflight: Mutex::default(),
            max_inflight,
            waiters: AtomicUsize::new(0),
            runtime,
            budget: None,
        }
    }

    /// The engine with loop state `loops` (by default: no loop known).
    pub fn with_loops(mut self, loops: LoopGuard) -> Engine {
        self.metrics
            .cluster_loop
            .set(i64::from(loops.cluster_refused()));
        self.loops = loops;
        self
    }

    fn now_ms(&self) -> u64 {
        self.cache.now_ms()
    }

    /// Distinct questions in flight.
    pub fn inflight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Charges a UDP query from `client` to its budget: `Send` (an empty TC answer in `out`) or `Drop` when it
    /// is over budget, `Later` when the query may go on to [`Engine::handle`].
    pub fn over_budget(&self, client: IpAddr, buf: &[u8], out: &mut Vec<u8>) -> Action {
        let Some(budget) = &self.budget else {
            return Action::Later;
        };
        match budget.check(client) {
            Verdict::Allow => Action::Later,
            Verdict::Drop => {
                self.metrics.ratelimited(false);
                Action::Drop
            }
            Verdict::Truncate => {
                self.metrics.ratelimited(true);
                match wire::parse_query(buf) {
                    Ok(q) => wire::error_response(buf, Some(&q), Rcode::NoError, true, out),
                    Err(_) => return Action::Drop,
                }
                Action::Send
            }
        }
    }

    /// Handles one client message `buf`. Cache hits and errors are rendered into `out` (send it);
    /// misses are resolved in the background and answered through `reply()`.
    pub fn handle(
        self: &Arc<Self>,
        buf: &[u8],
        tcp: bool,
        out: &mut Vec<u8>,
        reply: impl FnOnce() -> Reply,
    ) -> Action {
        let q = match wire::parse_query(buf) {
            Ok(q) => q,
            Err(QueryError::Drop) => {
                self.metrics.dropped.inc();
                return Action::Drop;
            }
            Err(QueryError::Reply(rcode)) => {
                wire::error_response(buf, None, rcode, false, out);
                self.metrics.query(0, Outcome::Error);
                return Action::Send;
            }
        };
        if self.loops.is_probe(q.qname()) {
            // Our own loop probe came back: answer at once, never forward it again.
            self.metrics.forward_loop("returned");
            wire::error_response(buf, Some(&q), Rcode::ServFail, false, out);
            self.metrics.query(q.qtype, Outcome::Servfail);
            return Action::Send;
        }
        if q.edns.is_some_and(|e| e.version > 0) {
            wire::badvers_response(buf, &q, out);
            self.metrics.query(q.qtype, Outcome::Error);
            return Action::Send;
        }
        match q.qtype {
            wire::TYPE_ANY => {
                wire::any_response(buf, &q, out);
                self.metrics.query(q.qtype, Outcome::Hit);
                return Action::Send;
            }
            // Zone transfers: not ours to serve (and never over UDP).
            wire::TYPE_AXFR | wire::TYPE_IXFR => {
                wire::error_response(buf, Some(&q), Rcode::Refused, false, out);
                self.metrics.query(q.qtype, Outcome::Error);
                return Action::Send;
            }
            _ => {}
        }
        let limit = if tcp {
            usize::from(u16::MAX)
        } else {
            q.udp_limit()
        };
        if let Some(auth) = &self.routes.authority {
            match auth.answer(buf, &q, limit, out) {
                Answered::Done => {
                    self.metrics.query(q.qtype, Outcome::Authoritative);
                    return Action::Send;
                }
                Answered::Chase(target) => {
                    return self.chase(q, target, std::mem::take(out), limit, reply);
                }
                Answered::NotOurs => {}
            }
        }
        let now = self.now_ms();
        let hit = self.cache.get(&q.key, now, |answer, hit| match hit {
            Hit::Fresh { age, prefetch } => {
                wire::render(answer, buf, &q, Aging::By(age), limit, out);
                Some(prefetch)
            }
            Hit::Stale => None,
        });
        match hit {
            Some(Some(prefetch)) => {
                self.metrics.query(q.qtype, Outcome::Hit);
                if prefetch {
                    self.metrics.prefetches.inc();
                    self.start_flight(buf, q, None, false);
                }
                Action::Send
            }
            Some(None) => self.miss(buf, q, true, out, limit, reply),
            None => self.miss(buf, q, false, out, limit, reply),
        }
    }

    /// An ExternalName's CNAME (`ours`, rendered for the client) with the target's records, resolved
    /// where the target's name goes (as CoreDNS does); the CNAME alone when that fails.
    fn chase(
        self: &Arc<Self>,
        q: Query,
        target: Vec<u8>,
        ours: Vec<u8>,
        limit: usize,
        reply: impl FnOnce() -> Reply,
    ) -> Action {
        let mut msg = vec![0, 0, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 1];
        msg.extend_from_slice(&target);
        msg.extend_from_slice(&q.qtype.to_be_bytes());
        msg.extend_from_slice(&[0, 1]);
        msg.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        let reply = reply();
        let engine = self.clone();
        self.runtime.spawn(async move {
            let pool = engine.routes.pool_for(&target).clone();
            let deadline = Instant::now() + MISS_DEADLINE;
            let bytes = match pool.exchange(&msg, deadline, &engine.metrics).await {
                Ok(theirs) => with_target(&ours, &theirs, limit).unwrap_or(ours),
                Err(_) => ours,
            };
            engine.metrics.query(q.qtype, Outcome::Authoritative);
            reply.send(bytes);
        });
        Action::Later
    }

    fn render_stale(&self, buf: &[u8], q: &Query, limit: usize, out: &mut Vec<u8>) -> bool {
        let now = self.now_ms();
        self.cache
            .get(&q.key, now, |answer, _| {
                wire::render(answer, buf, q, Aging::Stale(STALE_TTL), limit, out);
            })
            .is_some()
    }

    fn miss(
        self: &Arc<Self>,
        buf: &[u8],
        q: Query,
        has_stale: bool,
        out: &mut Vec<u8>,
        limit: usize,
        reply: impl FnOnce() -> Reply,
    ) -> Action {
        if self.loops.cluster_refused() && self.routes.in_cluster_zone(q.qname()) {
            // The cluster forwarders loop back to us: fail fast rather than recurse.
            if has_stale && self.render_stale(buf, &q, limit, out) {
                self.metrics.query(q.qtype, Outcome::Stale);
            } else {
                wire::error_response(buf, Some(&q), Rcode::ServFail, false, out);
                self.metrics.query(q.qtype, Outcome::Servfail);
            }
            return Action::Send;
        }
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        let waiters_full = self.waiters.load(Ordering::Relaxed) >= MAX_WAITERS;
        if let Some(flight) = inflight.get_mut(q.key.as_slice()) {
            if flight.stale_mode && has_stale && self.render_stale(buf, &q, limit, out) {
                self.metrics.query(q.qtype, Outcome::Stale);
                return Action::Send;
            }
            if waiters_full || flight.waiters.len() >= MAX_WAITERS_PER_QUESTION {
                drop(inflight);
                return self.shed(buf, &q, has_stale, limit, out);
            }
            self.waiters.fetch_add(1, Ordering::Relaxed);
            flight.waiters.push(Waiter {
                buf: buf.to_vec(),
                q,
                reply: reply(),
                coalesced: true,
            });
            return Action::Later;
        }
        if waiters_full || inflight.len() >= self.max_inflight {
            drop(inflight);
            return self.shed(buf, &q, has_stale, limit, out);
        }
        let answer_stale_now = has_stale && self.routes.pool_for(q.qname()).all_down();
        drop(inflight);
        if answer_stale_now && self.render_stale(buf, &q, limit, out) {
            self.metrics.query(q.qtype, Outcome::Stale);
            self.start_flight(buf, q, None, true);
            return Action::Send;
        }
        let waiter = Waiter {
            buf: buf.to_vec(),
            q: q.clone(),
            reply: reply(),
            coalesced: false,
        };
        self.start_flight(buf, q, Some(waiter), false);
        Action::Later
    }

    /// Too much in flight: a stale answer, or SERVFAIL, now.
    fn shed(
        &self,
        buf: &[u8],
        q: &Query,
        has_stale: bool,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Action {
        self.metrics.shed.inc();
        if has_stale && self.render_stale(buf, q, limit, out) {
            self.metrics.query(q.qtype, Outcome::Stale);
        } else {
            wire::error_response(buf, Some(q), Rcode::ServFail, false, out);
            self.metrics.query(q.qtype, Outcome::Servfail);
        }
        Action::Send
    }

    /// Registers a flight for `q` (unless one exists) and resolves it in the background.
    fn start_flight(
        self: &Arc<Self>,
        buf: &[u8],
        q: Query,
        waiter: Option<Waiter>,
        stale_mode: bool,
    ) {
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            self.waiters
                .fetch_add(usize::from(waiter.is_some()), Ordering::Relaxed);
            if let Some(flight) = inflight.get_mut(q.key.as_slice()) {
                flight.waiters.extend(waiter.map(|w| Waiter {
                    coalesced: true,
                    ..w
                }));
                return;
            }
            inflight.insert(
                q.key.clone().into_boxed_slice(),
                Flight {
                    waiters: waiter.into_iter().collect(),
                    stale_mode,
                },
            );
            self.metrics.inflight.set(inflight.len() as i64);
        }
        let mut msg = Vec::with_capacity(buf.len() + 11);
        wire::upstream_query(buf, &q, 0, &mut msg);
        let engine = self.clone();
        self.runtime
            .spawn(async move { engine.resolve(msg, q).await });
    }

    fn take_waiters(&self, key: &[u8], remove: bool) -> Vec<Waiter> {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        let waiters = if remove {
            inflight.remove(key).map(|f| f.waiters).unwrap_or_default()
        } else {
            inflight
                .get_mut(key)
                .map(|f| {
                    f.stale_mode = true;
                    std::mem::take(&mut f.waiters)
                })
                .unwrap_or_default()
        };
        self.waiters.fetch_sub(waiters.len(), Ordering::Relaxed);
        self.metrics.inflight.set(inflight.len() as i64);
        waiters
    }

    async fn resolve(self: Arc<Self>, msg: Vec<u8>, q: Query) {
        let pool = self.routes.pool_for(q.qname()).clone();
        let has_stale = self
            .cache
            .get(&q.key, self.now_ms(), |_, h| h == Hit::Stale)
            .unwrap_or(false);
        let deadline = Instant::now() + MISS_DEADLINE;
        let exchange = pool.exchange(&msg, deadline, &self.metrics);
        tokio::pin!(exchange);
        let result = if has_stale {
            tokio::select! {
                r = &mut exchange => r,
                () = tokio::time::sleep(STALE_WAIT) => {
                    // Slow upstream: the stale answer goes out now, the refresh goes on.
                    self.answer_stale(&q.key, self.take_waiters(&q.key, false));
                    exchange.await
                }
            }
        } else {
            exchange.await
        };
        let answer = result.ok().and_then(|bytes| {
            let mut parsed = hickory_proto::op::Message::from_vec(&bytes).ok()?;
            let bytes = match crate::chain::prune(&mut parsed) {
                None => bytes,
                Some(foreign) => {
                    self.metrics.pruned.inc_by(foreign as u64);
                    parsed.to_vec().ok()?
                }
            };
            wire::analyse_answer(&bytes, &msg, &q, &self.policy).ok()
        });
        match answer {
            Some(answer) if !(answer.rcode == Rcode::ServFail as u8 && has_stale) => {
                self.cache.insert(&q.key, answer.clone(), self.now_ms());
                let waiters = self.take_waiters(&q.key, true);
                let mut out = Vec::new();
                for w in waiters {
                    wire::render(
                        &answer,
                        &w.buf,
                        &w.q,
                        Aging::By(0),
                        w.reply.limit(&w.q),
                        &mut out,
                    );
                    let outcome = if w.coalesced {
                        Outcome::Coalesced
                    } else {
                        Outcome::Miss
                    };
                    self.metrics.query(w.q.qtype, outcome);
                    w.reply.send(std::mem::take(&mut out));
                }
            }
            _ => {
                self.cache.refresh_failed(&q.key);
                let waiters = self.take_waiters(&q.key, true);
                self.answer_stale(&q.key, waiters);
            }
        }
    }

    /// Answers `waiters` from the stale entry of `key`, or with SERVFAIL when there is none.
    fn answer_stale(&self, key: &[u8], waiters: Vec<Waiter>) {
        let now = self.now_ms();
        for w in waiters {
            let limit = w.reply.limit(&w.q);
            let mut out = Vec::new();
            let stale = self
                .cache
                .get(key, now, |answer, _| {
                    wire::render(
                        answer,
                        &w.buf,
                        &w.q,
                        Aging::Stale(STALE_TTL),
                        limit,
                        &mut out,
                    );
                })
                .is_some();
            if stale {
                self.metrics.query(w.q.qtype, Outcome::Stale);
            } else {
                wire::error_response(&w.buf, Some(&w.q), Rcode::ServFail, false, &mut out);
                self.metrics.query(w.q.qtype, Outcome::Servfail);
            }
            w.reply.send(out);
        }
    }
}

/// Our CNAME answer `ours` with the answer records (and rcode) of the target's answer `theirs`
/// appended; `None` when either does not parse or the result exceeds `limit` (then the CNAME alone).
fn with_target(ours: &[u8], theirs: &[u8], limit: usize) -> Option<Vec<u8>> {
    use hickory_proto::op::Message;
    let mut m = Message::from_vec(ours).ok()?;
    let t = Message::from_vec(theirs).ok()?;
    m.metadata.response_code = t.metadata.response_code;
    m.answers.extend(t.answers);
    let bytes = m.to_vec().ok()?;
    (bytes.len() <= limit).then_some(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::upstream::Upstream;

    fn query(name: &str, id: u16) -> Vec<u8> {
        wire::testing::query_with_id(name, hickory_proto::rr::RecordType::A, id, None)
    }

    /// An upstream that never answers; at most two misses in flight: the third is shed at once, and
    /// an identical query joins its flight instead of counting against the bound.
    #[tokio::test]
    async fn misses_beyond_the_bound_are_shed_with_servfail() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = Upstream::new(silent.local_addr().unwrap(), false, &Metrics::default());
        let routes = Routes {
            cluster_zones: Vec::new(),
            cluster: None,
            forward: Vec::new(),
            default: Arc::new(Pool {
                upstreams: vec![Arc::new(upstream)],
            }),
            authority: None,
        };
        let policy = TtlPolicy {
            max_ttl: 60,
            negative_ttl: 5,
            servfail_ttl: 1,
        };
        let engine = Arc::new(Engine::new(
            Arc::new(Cache::new(100, 1 << 20, 0, false)),
            routes,
            policy,
            Metrics::default(),
            2,
            tokio::runtime::Handle::current(),
        ));
        let client = Arc::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let peer = client.local_addr().unwrap();
        let reply = || Reply::Udp(client.clone(), peer);
        let mut out = Vec::new();
        for (name, id) in [("a.example", 1), ("b.example", 2), ("a.example", 3)] {
            assert_eq!(
                engine.handle(&query(name, id), false, &mut out, reply),
                Action::Later
            );
        }
        assert_eq!(engine.inflight(), 2);
        assert_eq!(
            engine.handle(&query("c.example", 4), false, &mut out, reply),
            Action::Send
        );
        assert_eq!(wire::rcode_of(&out), Rcode::ServFail as u8);
        assert_eq!(engine.metrics.shed.get(), 1);
    }

    #[test]
    fn cluster_zones_go_to_the_cluster_pool() {
        let cluster = Arc::new(Pool {
            upstreams: Vec::new(),
        });
        let default = Arc::new(Pool {
            upstreams: Vec::new(),
        });
        let routes = Routes {
            cluster_zones: ["cluster.local", "in-addr.arpa", "ip6.arpa"]
                .iter()
                .map(|z| wire::name_to_wire(z))
                .collect(),
            cluster: Some(cluster.clone()),
            forward: Vec::new(),
            default: default.clone(),
            authority: None,
        };
        let to_cluster =
            |name: &str| Arc::ptr_eq(routes.pool_for(&wire::name_to_wire(name)), &cluster);
        assert!(to_cluster("kubernetes.default.svc.cluster.local"));
        assert!(to_cluster("10.0.96.10.in-addr.arpa"));
        assert!(to_cluster("1.0.0.0.ip6.arpa"));
        assert!(!to_cluster("example.com"));
        assert!(!to_cluster("cluster.local.example.com"));
        assert!(!to_cluster("mycluster.local"));
        let without = Routes {
            cluster: None,
            ..routes
        };
        assert!(Arc::ptr_eq(
            without.pool_for(&wire::name_to_wire("a.cluster.local")),
            &default
        ));
    }

    /// Conditional forwarding: the longest zone wins, a forward zone overrides the cluster zone it equals.
    #[test]
    fn the_longest_forward_zone_wins() {
        let pool = || {
            Arc::new(Pool {
                upstreams: Vec::new(),
            })
        };
        let (corp, deep, cluster, default, local) = (pool(), pool(), pool(), pool(), pool());
        let routes = Routes {
            cluster_zones: vec![wire::name_to_wire("cluster.local")],
            cluster: Some(cluster.clone()),
            forward: vec![
                (wire::name_to_wire("corp.example"), corp.clone()),
                (wire::name_to_wire("deep.a.corp.example"), deep.clone()),
                (wire::name_to_wire("svc.cluster.local"), local.clone()),
            ],
            default: default.clone(),
            authority: None,
        };
        let to = |name: &str, pool: &Arc<Pool>| {
            Arc::ptr_eq(routes.pool_for(&wire::name_to_wire(name)), pool)
        };
        assert!(to("www.corp.example", &corp));
        assert!(to("corp.example", &corp));
        assert!(to("x.deep.a.corp.example", &deep));
        assert!(to("a.corp.example", &corp));
        assert!(to("x.svc.cluster.local", &local));
        assert!(to("x.pod.cluster.local", &cluster));
        assert!(to("example.com", &default));
        assert!(to("notcorp.example", &default));
    }
}
