//! What the accept loops, the probes and the control loop share: the table behind a lock, the metrics, and
//! the probe "kick" handles.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::admission::{Admission, Limits};
use crate::core::{Attempt, Signal, State, Table, Transition};
use crate::handoff::Pausing;
use crate::metrics::{Metrics, Op, OpLabels, UpstreamHandles};

/// Upstream dials in flight at once. A burst of new clients (a flood of local connections, every kubelet of a
/// node reconnecting) waits for a slot instead of sending hundreds of SYNs at once: connect times stay short,
/// so the burst does not time its own dials out and take healthy upstreams down, and the API servers do not
/// receive our clients' burst as one.
pub const MAX_DIALS_IN_FLIGHT: usize = 64;

/// Local pressure is logged at most this often (it comes in floods).
const PRESSURE_LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Shared {
    table: Mutex<Table>,
    pub metrics: Metrics,
    /// Wakes an upstream's probe task for an immediate check (after a failed dial).
    kicks: Mutex<HashMap<SocketAddr, Arc<Notify>>>,
    handles: Mutex<HashMap<SocketAddr, Arc<UpstreamHandles>>>,
    /// Something the status shows changed.
    pub changed: Notify,
    /// The connection limit and the per-client shares.
    pub admission: Arc<Admission>,
    /// When local pressure was last logged.
    pressure_logged: Mutex<Option<Instant>>,
    /// Slots for upstream dials in flight ([`MAX_DIALS_IN_FLIGHT`]).
    pub dials: tokio::sync::Semaphore,
    /// Pauses the relays for a handoff to a new instance, and holds the paused pairs.
    pub pausing: Pausing,
}

impl Shared {
    pub fn new(table: Table, metrics: Metrics, limits: Limits) -> Shared {
        let shared = Shared {
            table: Mutex::new(table),
            metrics,
            kicks: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            admission: Arc::new(Admission::new(limits)),
            pressure_logged: Mutex::new(None),
            dials: tokio::sync::Semaphore::new(MAX_DIALS_IN_FLIGHT),
            pausing: Pausing::default(),
        };
        shared.set_limits(limits);
        shared
    }

    /// New connection limits (a config change).
    pub fn set_limits(&self, limits: Limits) {
        if self.admission.slots().limits() != limits {
            tracing::info!(
                max_connections = limits.total,
                max_connections_per_client = limits.per_client,
                "connection limits changed"
            );
        }
        self.admission.set_limits(limits);
        self.metrics.connection_limit.set(i64::from(limits.total));
        self.metrics
            .client_connection_limit
            .set(i64::from(limits.per_client));
    }

    /// Counts (and now and then logs) an operation that failed for lack of local resources. Such a failure
    /// says nothing about an upstream: callers never feed it to the table.
    pub fn local_pressure(&self, op: Op, error: &std::io::Error) {
        self.metrics
            .local_pressure
            .get_or_create(&OpLabels { op })
            .inc();
        let now = Instant::now();
        let mut last = self
            .pressure_logged
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|t| now.duration_since(t) >= PRESSURE_LOG_EVERY) {
            *last = Some(now);
            tracing::warn!(
                ?op,
                %error,
                active = self.admission.slots().active(),
                "out of local resources (not an upstream failure): raise the open-file limit or lower apiprism.maxConnections"
            );
        }
    }

    pub fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn kicks(&self) -> MutexGuard<'_, HashMap<SocketAddr, Arc<Notify>>> {
        self.kicks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn register_kick(&self, addr: SocketAddr) -> Arc<Notify> {
        Arc::clone(self.kicks().entry(addr).or_default())
    }

    pub fn forget_kick(&self, addr: SocketAddr) {
        self.kicks().remove(&addr);
    }

    /// `addr`'s hot-path metric handles.
    pub fn handles(&self, addr: SocketAddr) -> Arc<UpstreamHandles> {
        let mut handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            handles
                .entry(addr)
                .or_insert_with(|| Arc::new(self.metrics.handles(addr))),
        )
    }

    /// Drops a removed upstream's metrics.
    pub fn forget_metrics(&self, addr: SocketAddr) {
        self.handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&addr);
        self.metrics.forget(addr);
    }

    fn kick(&self, addr: SocketAddr) {
        if let Some(k) = self.kicks().get(&addr) {
            k.notify_one();
        }
    }

    /// Records a probe or dial result, logs and counts a state change. Returns the upstream's state after.
    pub fn observe(
        &self,
        addr: SocketAddr,
        result: Result<Duration, String>,
        signal: Signal,
    ) -> Option<State> {
        let failed = result.is_err();
        self.record(addr, failed, signal, |table, now| {
            table.observe(addr, result, signal, now)
        })
    }

    /// Records a failed client dial that started at `started` (see [`Table::observe_failed_dial`]).
    pub fn observe_failed_dial(
        &self,
        addr: SocketAddr,
        error: String,
        started: Instant,
    ) -> Option<State> {
        self.record(addr, true, Signal::Dial, |table, now| {
            table.observe_failed_dial(addr, error, started, now)
        })
    }

    fn record(
        &self,
        addr: SocketAddr,
        failed: bool,
        signal: Signal,
        apply: impl FnOnce(&mut Table, Instant) -> Option<Transition>,
    ) -> Option<State> {
        let (transition, state) = {
            let mut table = self.table();
            let transition = apply(&mut table, Instant::now());
            let u = table.get(addr)?;
            // A successful dial changes only the RTT; the next probe syncs it (keeps the dial path cheap).
            if signal == Signal::Probe || failed || transition.is_some() {
                self.metrics.sync(u);
                self.metrics
                    .upstreams_usable
                    .set(i64::try_from(table.usable()).unwrap_or(0));
            }
            if let Some(t) = &transition {
                log_transition(t, u.active, u.last_error.as_deref());
                if t.to == State::Down {
                    self.metrics.connections_cut.inc_by(u.active);
                }
            }
            (transition, u.state)
        };
        if signal == Signal::Dial && failed {
            self.handles(addr).dial_errors.inc();
            self.kick(addr);
        }
        if transition.is_some() {
            self.metrics.transitions.inc();
            self.changed.notify_one();
        }
        Some(state)
    }

    pub fn plan(&self) -> Vec<Attempt> {
        self.table().plan()
    }
}

fn log_transition(t: &Transition, active: u64, error: Option<&str>) {
    match t.to {
        State::Down => tracing::warn!(
            upstream = %t.addr,
            from = t.from.as_str(),
            closed_connections = active,
            error = error.unwrap_or(""),
            "upstream down: out of rotation, its connections closed"
        ),
        State::Up => tracing::info!(upstream = %t.addr, from = t.from.as_str(), "upstream up"),
        State::Unknown => {}
    }
}
