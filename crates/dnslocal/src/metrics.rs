//! dnslocal's Prometheus metrics (prefix `dnslocal_`). Hot-path counters are resolved once at start.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Query types counted on their own; everything else is `other`.
pub const QTYPES: [(u16, &str); 6] = [
    (1, "A"),
    (28, "AAAA"),
    (12, "PTR"),
    (33, "SRV"),
    (5, "CNAME"),
    (0, "other"),
];

/// How a query was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From the cache, fresh.
    Hit = 0,
    /// From the cache, expired (serve-stale).
    Stale,
    /// Forwarded upstream and answered.
    Miss,
    /// Joined an identical query already in flight, and answered by it.
    Coalesced,
    /// SERVFAIL from us (upstreams failed, or shed).
    Servfail,
    /// FORMERR/NOTIMP for a malformed or unsupported query.
    Error,
    /// From the cluster zone dnslocal holds itself (`clusterZone: kubernetes`).
    Authoritative,
}

const OUTCOMES: [&str; 7] = [
    "hit",
    "stale",
    "miss",
    "coalesced",
    "servfail",
    "error",
    "authoritative",
];

/// Every dnslocal metric. Clones share the values.
#[derive(Clone, Debug)]
pub struct Metrics {
    queries: Vec<Vec<Counter>>,
    pub cache_entries: Gauge,
    pub cache_bytes: Gauge,
    pub inflight: Gauge,
    pub prefetches: Counter,
    pub shed: Counter,
    pub dropped: Counter,
    pub pruned: Counter,
    ratelimited_truncated: Counter,
    ratelimited_dropped: Counter,
    upstream_latency: Family<Labels, Histogram>,
    upstream_errors: Family<Labels, Counter>,
    upstream_up: Family<Labels, Gauge>,
    upstream_mismatched: Family<Labels, Counter>,
    forward_loops: Family<Labels, Counter>,
    pub cluster_loop: Gauge,
    /// `clusterZone: kubernetes`: seconds since the Kubernetes API last confirmed the zone (0 while
    /// both watches are live; -1 without any state).
    pub cluster_zone_age: Gauge,
    pub cluster_zone_services: Gauge,
    pub cluster_zone_endpoints: Gauge,
    pub cluster_zone_api_up: Gauge,
    pub cluster_zone_events: Counter,
    pub cluster_zone_lists: Counter,
    pub cluster_zone_api_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            queries: Vec::new(),
            cache_entries: Gauge::default(),
            cache_bytes: Gauge::default(),
            inflight: Gauge::default(),
            prefetches: Counter::default(),
            shed: Counter::default(),
            dropped: Counter::default(),
            pruned: Counter::default(),
            ratelimited_truncated: Counter::default(),
            ratelimited_dropped: Counter::default(),
            upstream_latency: Family::new_with_constructor(new_histogram),
            upstream_errors: Family::default(),
            upstream_up: Family::default(),
            upstream_mismatched: Family::default(),
            forward_loops: Family::default(),
            cluster_loop: Gauge::default(),
            cluster_zone_age: Gauge::default(),
            cluster_zone_services: Gauge::default(),
            cluster_zone_endpoints: Gauge::default(),
            cluster_zone_api_up: Gauge::default(),
            cluster_zone_events: Counter::default(),
            cluster_zone_lists: Counter::default(),
            cluster_zone_api_errors: Counter::default(),
        }
    }
}

fn new_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    ])
}

fn upstream(label: &str) -> Labels {
    vec![("upstream".to_owned(), label.to_owned())]
}

impl Metrics {
    /// Registers everything under `registry` (give it the `dnslocal` sub-registry).
    pub fn register(registry: &mut Registry) -> Metrics {
        let queries_family: Family<Labels, Counter> = Family::default();
        let queries = QTYPES
            .iter()
            .map(|(_, t)| {
                OUTCOMES
                    .iter()
                    .map(|o| {
                        queries_family
                            .get_or_create(&vec![
                                ("type".to_owned(), (*t).to_owned()),
                                ("result".to_owned(), (*o).to_owned()),
                            ])
                            .clone()
                    })
                    .collect()
            })
            .collect();
        let ratelimited: Family<Labels, Counter> = Family::default();
        let action = |a: &str| {
            ratelimited
                .get_or_create(&vec![("action".to_owned(), a.to_owned())])
                .clone()
        };
        let m = Metrics {
            queries,
            ratelimited_truncated: action("truncated"),
            ratelimited_dropped: action("dropped"),
            ..Metrics::default()
        };
        registry.register(
            "queries",
            "Client queries by type and result (hit, stale, miss, coalesced, servfail, error)",
            queries_family,
        );
        registry.register(
            "cache_entries",
            "Answers in the cache",
            m.cache_entries.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes the cached answers hold (bounded by cache.maxMemory)",
            m.cache_bytes.clone(),
        );
        registry.register(
            "inflight",
            "Distinct questions being resolved upstream now",
            m.inflight.clone(),
        );
        registry.register(
            "prefetches",
            "Popular answers refreshed before they expired",
            m.prefetches.clone(),
        );
        registry.register(
            "shed",
            "Misses answered SERVFAIL (or stale) because too many were in flight",
            m.shed.clone(),
        );
        registry.register(
            "dropped",
            "Packets dropped unanswered (too short, or responses)",
            m.dropped.clone(),
        );
        registry.register(
            "ratelimited",
            "UDP queries over their client's budget, by action (truncated: empty TC answer; dropped)",
            ratelimited,
        );
        registry.register(
            "upstream_pruned",
            "Records outside the question's chain dropped from upstream answers before caching",
            m.pruned.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Upstream answer time",
            m.upstream_latency.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream exchanges that failed, by kind (timeout, refused, io; busy and local are our own limits and resources, never counted against the upstream)",
            m.upstream_errors.clone(),
        );
        registry.register(
            "upstream_up",
            "1 while an upstream answers",
            m.upstream_up.clone(),
        );
        registry.register(
            "upstream_mismatched",
            "Upstream datagrams dropped because their ID or question (case included) did not match a query",
            m.upstream_mismatched.clone(),
        );
        registry.register(
            "forward_loops",
            "Forwarding loops found: a forwarder that is one of our own listen addresses (own_address), or our loop probe coming back to us (returned)",
            m.forward_loops.clone(),
        );
        registry.register(
            "cluster_loop",
            "1 while cluster-zone questions get SERVFAIL at once because their forwarders loop back to us",
            m.cluster_loop.clone(),
        );
        registry.register(
            "cluster_zone_age_seconds",
            "clusterZone kubernetes: seconds since the Kubernetes API last confirmed the cluster zone served (0 while both watches are live, -1 without any state)",
            m.cluster_zone_age.clone(),
        );
        registry.register(
            "cluster_zone_services",
            "clusterZone kubernetes: Services held",
            m.cluster_zone_services.clone(),
        );
        registry.register(
            "cluster_zone_endpoints",
            "clusterZone kubernetes: EndpointSlice endpoints held",
            m.cluster_zone_endpoints.clone(),
        );
        registry.register(
            "cluster_zone_api_up",
            "clusterZone kubernetes: 1 while the Services and EndpointSlices watches are live",
            m.cluster_zone_api_up.clone(),
        );
        registry.register(
            "cluster_zone_events",
            "clusterZone kubernetes: watch events applied",
            m.cluster_zone_events.clone(),
        );
        registry.register(
            "cluster_zone_lists",
            "clusterZone kubernetes: lists (the first, and relists after 410 Gone or a reconnect)",
            m.cluster_zone_lists.clone(),
        );
        registry.register(
            "cluster_zone_api_errors",
            "clusterZone kubernetes: Kubernetes API failures (each followed by a reconnect with backoff)",
            m.cluster_zone_api_errors.clone(),
        );
        m
    }

    /// Counts one forwarding loop of `kind` (`own_address`, `returned`).
    pub fn forward_loop(&self, kind: &str) {
        self.forward_loops
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .inc();
    }

    /// Loops of `kind` counted so far.
    pub fn forward_loops(&self, kind: &str) -> u64 {
        self.forward_loops
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .get()
    }

    /// Counts one query of `qtype` answered with `outcome`.
    pub fn query(&self, qtype: u16, outcome: Outcome) {
        let t = QTYPES
            .iter()
            .position(|(q, _)| *q == qtype)
            .unwrap_or(QTYPES.len() - 1);
        if let Some(c) = self
            .queries
            .get(t)
            .and_then(|row| row.get(outcome as usize))
        {
            c.inc();
        }
    }

    /// Total queries with `outcome`, over all types.
    pub fn total(&self, outcome: Outcome) -> u64 {
        self.queries
            .iter()
            .filter_map(|row| row.get(outcome as usize))
            .map(Counter::get)
            .sum()
    }

    pub fn upstream_latency(&self, label: &str, rtt: Duration) {
        self.upstream_latency
            .get_or_create(&upstream(label))
            .observe(rtt.as_secs_f64());
    }

    pub fn upstream_error(&self, label: &str, kind: &str) {
        let mut l = upstream(label);
        l.push(("kind".to_owned(), kind.to_owned()));
        self.upstream_errors.get_or_create(&l).inc();
    }

    /// Counts a query over its client's budget.
    pub fn ratelimited(&self, truncated: bool) {
        if truncated {
            self.ratelimited_truncated.inc();
        } else {
            self.ratelimited_dropped.inc();
        }
    }

    pub fn upstream_mismatched(&self, label: &str) {
        self.upstream_mismatched
            .get_or_create(&upstream(label))
            .inc();
    }

    pub fn upstream_up(&self, label: &str, up: bool) {
        self.upstream_up
            .get_or_create(&upstream(label))
            .set(i64::from(up));
    }
}
