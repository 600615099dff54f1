//! apiprism's Prometheus metrics (prefix `apiprism_`), per upstream and in total.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::core::{State, Upstream};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub upstream: String,
    /// `unknown`, `up` or `down`.
    pub state: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values are the variant names
pub enum Direction {
    /// Client → upstream.
    to_upstream,
    /// Upstream → client.
    to_client,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub upstream: String,
    pub direction: Direction,
}

/// What hit local resource pressure (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values are the variant names
pub enum Op {
    accept,
    dial,
    probe,
    relay,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: Op,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `client_limit` (the client held its share of the connection limit) or `local_pressure` (out of
    /// descriptors or memory while dialling).
    pub reason: &'static str,
}

const STATES: [State; 3] = [State::Unknown, State::Up, State::Down];
const DIRECTIONS: [Direction; 2] = [Direction::to_upstream, Direction::to_client];

/// Every apiprism metric. Clones share the values.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub upstream_state: Family<StateLabels, Gauge>,
    pub upstream_rtt: Family<UpstreamLabels, Gauge<f64, AtomicU64>>,
    pub upstream_score: Family<UpstreamLabels, Gauge>,
    pub upstream_active: Family<UpstreamLabels, Gauge>,
    pub upstream_connections: Family<UpstreamLabels, Counter>,
    pub upstream_dial_errors: Family<UpstreamLabels, Counter>,
    pub upstream_failovers: Family<UpstreamLabels, Counter>,
    pub upstream_bytes: Family<BytesLabels, Counter>,
    pub connections: Counter,
    pub active: Gauge,
    pub failovers: Counter,
    pub rejected: Counter,
    /// Established client connections closed because their upstream went down (the client reconnects
    /// through another upstream; a watch restarts).
    pub connections_cut: Counter,
    pub transitions: Counter,
    pub upstreams: Gauge,
    pub upstreams_usable: Gauge,
    pub listeners: Gauge,
    pub connection_limit: Gauge,
    pub client_connection_limit: Gauge,
    pub accept_paused: Counter,
    pub refused: Family<ReasonLabels, Counter>,
    pub local_pressure: Family<OpLabels, Counter>,
}

pub fn labels(addr: SocketAddr) -> UpstreamLabels {
    UpstreamLabels {
        upstream: addr.to_string(),
    }
}

pub fn bytes_labels(addr: SocketAddr, direction: Direction) -> BytesLabels {
    BytesLabels {
        upstream: addr.to_string(),
        direction,
    }
}

/// One upstream's hot-path metrics, looked up once per upstream instead of once per connection.
#[derive(Debug)]
pub struct UpstreamHandles {
    pub connections: Counter,
    pub active: Gauge,
    pub dial_errors: Counter,
    pub failovers: Counter,
    pub to_upstream: Counter,
    pub to_client: Counter,
}

impl Metrics {
    /// The hot-path handles of `addr`'s series.
    pub fn handles(&self, addr: SocketAddr) -> UpstreamHandles {
        // One statement each: `get_or_create` returns a read guard on the family, and a second call on the
        // same family while the first guard lives (temporaries of one statement) would deadlock.
        let l = labels(addr);
        let connections = self.upstream_connections.get_or_create(&l).clone();
        let active = self.upstream_active.get_or_create(&l).clone();
        let dial_errors = self.upstream_dial_errors.get_or_create(&l).clone();
        let failovers = self.upstream_failovers.get_or_create(&l).clone();
        let up = bytes_labels(addr, Direction::to_upstream);
        let to_upstream = self.upstream_bytes.get_or_create(&up).clone();
        let down = bytes_labels(addr, Direction::to_client);
        let to_client = self.upstream_bytes.get_or_create(&down).clone();
        UpstreamHandles {
            connections,
            active,
            dial_errors,
            failovers,
            to_upstream,
            to_client,
        }
    }

    /// Registers under `apiprism_` in `registry` (the runtime's sub-registry).
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry;
        r.register(
            "upstream_state",
            "1 for the upstream's current health state (unknown, up, down)",
            m.upstream_state.clone(),
        );
        r.register(
            "upstream_rtt_seconds",
            "Smoothed connect round-trip time of the upstream (probes and dials)",
            m.upstream_rtt.clone(),
        );
        r.register(
            "upstream_score",
            "Consecutive successful (> 0) or failed (< 0) checks and dials",
            m.upstream_score.clone(),
        );
        r.register(
            "upstream_active_connections",
            "Client connections open through the upstream",
            m.upstream_active.clone(),
        );
        r.register(
            "upstream_connections",
            "Client connections established through the upstream",
            m.upstream_connections.clone(),
        );
        r.register(
            "upstream_dial_errors",
            "Client dials to the upstream that failed or timed out",
            m.upstream_dial_errors.clone(),
        );
        r.register(
            "upstream_failovers",
            "Client connections moved to another upstream after a failed dial to this one",
            m.upstream_failovers.clone(),
        );
        r.register(
            "upstream_bytes",
            "Bytes relayed through the upstream, by direction",
            m.upstream_bytes.clone(),
        );
        r.register(
            "connections",
            "Client connections accepted",
            m.connections.clone(),
        );
        r.register(
            "active_connections",
            "Client connections open now",
            m.active.clone(),
        );
        r.register(
            "failovers",
            "Failed dials retried on another upstream before the client saw anything",
            m.failovers.clone(),
        );
        r.register(
            "rejected_connections",
            "Client connections closed because no upstream could be reached",
            m.rejected.clone(),
        );
        r.register(
            "connections_cut",
            "Established client connections closed because their upstream went down",
            m.connections_cut.clone(),
        );
        r.register(
            "upstream_transitions",
            "Upstream health state changes",
            m.transitions.clone(),
        );
        r.register("upstreams", "Upstreams configured", m.upstreams.clone());
        r.register(
            "upstreams_usable",
            "Upstreams not down",
            m.upstreams_usable.clone(),
        );
        r.register("listeners", "Listening sockets", m.listeners.clone());
        r.register(
            "connection_limit",
            "Client connections served at once (apiprism.maxConnections, or derived from the open-file limit)",
            m.connection_limit.clone(),
        );
        r.register(
            "client_connection_limit",
            "Client connections one client (source address) may hold at once",
            m.client_connection_limit.clone(),
        );
        r.register(
            "accept_paused",
            "Times the accept loops paused because every connection slot was taken",
            m.accept_paused.clone(),
        );
        r.register(
            "refused_connections",
            "Client connections closed before dialling, by reason",
            m.refused.clone(),
        );
        r.register(
            "local_pressure_errors",
            "Operations that failed for lack of local descriptors or memory (never counted against an upstream)",
            m.local_pressure.clone(),
        );
        m
    }

    /// Sets the gauges of one upstream from the table.
    pub fn sync(&self, u: &Upstream) {
        let upstream = u.addr.to_string();
        for s in STATES {
            self.upstream_state
                .get_or_create(&StateLabels {
                    upstream: upstream.clone(),
                    state: s.as_str().to_owned(),
                })
                .set(i64::from(s == u.state));
        }
        let l = labels(u.addr);
        self.upstream_rtt
            .get_or_create(&l)
            .set(u.srtt.map_or(0.0, |d| d.as_secs_f64()));
        self.upstream_score
            .get_or_create(&l)
            .set(i64::from(u.streak));
        self.upstream_active
            .get_or_create(&l)
            .set(i64::try_from(u.active).unwrap_or(i64::MAX));
    }

    /// Drops a removed upstream's series.
    pub fn forget(&self, addr: SocketAddr) {
        let upstream = addr.to_string();
        for s in STATES {
            self.upstream_state.remove(&StateLabels {
                upstream: upstream.clone(),
                state: s.as_str().to_owned(),
            });
        }
        let l = labels(addr);
        self.upstream_rtt.remove(&l);
        self.upstream_score.remove(&l);
        self.upstream_active.remove(&l);
        self.upstream_connections.remove(&l);
        self.upstream_dial_errors.remove(&l);
        self.upstream_failovers.remove(&l);
        for d in DIRECTIONS {
            self.upstream_bytes.remove(&bytes_labels(addr, d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_of_a_new_upstream_do_not_deadlock_and_count() {
        let m = Metrics::default();
        let addr: SocketAddr = "192.0.2.11:6443".parse().expect("addr");
        let h = m.handles(addr);
        h.to_client.inc_by(5);
        assert_eq!(
            m.upstream_bytes
                .get_or_create(&bytes_labels(addr, Direction::to_client))
                .get(),
            5
        );
        m.forget(addr);
    }
}
