//! The sans-IO core: the upstream table, health hysteresis, smoothed RTT and selection.
//!
//! Nothing here touches a socket or a clock: callers pass `now` and the results of probes and dials, and get
//! back state transitions and dial plans. The IO side (`health`, `proxy`) owns the sockets.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

#[cfg(test)]
mod tests;

/// The floor of an RTT-adaptive attempt timeout (probe or dial). A connect on a LAN or loopback takes well
/// under a millisecond; a SYN that is not answered within this is lost or blackholed.
pub const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);
/// An attempt times out after this many smoothed RTTs (but never before [`MIN_ATTEMPT_TIMEOUT`], never after
/// the configured timeout).
pub const RTT_TIMEOUT_FACTOR: u32 = 8;
/// Weight of a new RTT sample in the smoothed RTT (TCP's SRTT uses 1/8; we adapt faster).
pub const EWMA_ALPHA: f64 = 0.25;
/// Upstreams whose smoothed RTT is within this factor of the best one are "near-equal": connections spread
/// over them by active connection count.
pub const NEAR_FACTOR: f64 = 1.2;
/// ... or within this much of the best one. Connect times on a LAN are tens to hundreds of microseconds, and
/// our own scheduling delay on a busy node adds up to a millisecond of noise to each sample: differences
/// below this say nothing about the upstreams, and a request to an API server takes longer anyway.
pub const NEAR_SLACK: Duration = Duration::from_millis(1);
/// A sample above `2 × srtt` plus this is clipped (see [`Upstream::sample_rtt`]).
const CLIP_SLACK: Duration = Duration::from_micros(100);

/// Health of one upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Not checked yet: usable (it may be the only one), checked at once.
    Unknown,
    /// Passed `rise` checks in a row (or its first one).
    Up,
    /// Failed `fall` checks or dials in a row.
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Down => "down",
        }
    }

    pub fn usable(self) -> bool {
        self != State::Down
    }
}

/// Where a signal came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// An active health check.
    Probe,
    /// A real dial for a client (passive check).
    Dial,
}

/// A change of an upstream's health state. When it went down, its connections were cancelled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub addr: SocketAddr,
    pub from: State,
    pub to: State,
}

/// Hysteresis and timeouts, from the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub fall: u32,
    pub rise: u32,
    /// The longest a health probe may take.
    pub probe_timeout: Duration,
    /// The longest a client's dial to one upstream may take before the next one is tried.
    pub dial_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            fall: 2,
            rise: 2,
            probe_timeout: Duration::from_secs(1),
            dial_timeout: Duration::from_secs(1),
        }
    }
}

/// One upstream (a resolved address) and what we know about it.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// Where it came from (`endpoint 10.0.0.1:6443`, `member cp-1`, `localhost:6443` ...), sorted.
    pub sources: BTreeSet<String>,
    pub state: State,
    /// Consecutive successes (> 0) or failures (< 0).
    pub streak: i32,
    /// Smoothed connect RTT.
    pub srtt: Option<Duration>,
    pub last_rtt: Option<Duration>,
    /// Connections open through it now.
    pub active: u64,
    /// Connections opened through it.
    pub total: u64,
    /// Client dials to it that failed or timed out.
    pub dial_errors: u64,
    /// Client connections that were moved to another upstream after a failed dial to this one.
    pub failovers: u64,
    pub last_success: Option<Instant>,
    pub last_change: Instant,
    pub last_error: Option<String>,
    /// Cancelled (and replaced) when the upstream goes down or is removed: closes its connections.
    token: CancellationToken,
}

impl Upstream {
    fn new(addr: SocketAddr, now: Instant) -> Upstream {
        Upstream {
            addr,
            sources: BTreeSet::new(),
            state: State::Unknown,
            streak: 0,
            srtt: None,
            last_rtt: None,
            active: 0,
            total: 0,
            dial_errors: 0,
            failovers: 0,
            last_success: None,
            last_change: now,
            last_error: None,
            token: CancellationToken::new(),
        }
    }

    /// The timeout of one attempt (probe or dial): a multiple of the smoothed RTT, within
    /// [`MIN_ATTEMPT_TIMEOUT`, `max`].
    pub fn attempt_timeout(&self, max: Duration) -> Duration {
        match self.srtt {
            Some(srtt) => (srtt * RTT_TIMEOUT_FACTOR).clamp(MIN_ATTEMPT_TIMEOUT.min(max), max),
            None => max,
        }
    }

    /// Feeds the smoothed RTT. A sample is measured by our own task, so it includes our scheduling delay (and
    /// the first connect to a new address a neighbour lookup): noise only ever adds time. So a sample below
    /// half the smoothed value replaces it at once, and a sample above `2 × srtt + CLIP_SLACK` is clipped to
    /// that: one noisy sample cannot push an upstream out of the near-best set, and a real rise still shows
    /// within about ten samples (the smoothed value grows by a quarter per sample).
    fn sample_rtt(&mut self, rtt: Duration) {
        self.last_rtt = Some(rtt);
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) if rtt * 2 < s => rtt,
            Some(s) => {
                let rtt = rtt.min(s * 2 + CLIP_SLACK);
                s.mul_f64(1.0 - EWMA_ALPHA) + rtt.mul_f64(EWMA_ALPHA)
            }
        });
    }
}

/// What a reconcile changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// One dial of a client connection's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub addr: SocketAddr,
    pub timeout: Duration,
}

/// All upstreams.
#[derive(Debug, Default)]
pub struct Table {
    upstreams: Vec<Upstream>,
    policy: Policy,
    /// Rotates the tie-break among equally loaded near-best upstreams.
    rr: usize,
}

impl Table {
    pub fn new(policy: Policy) -> Table {
        Table {
            upstreams: Vec::new(),
            policy,
            rr: 0,
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.upstreams.iter()
    }

    pub fn get(&self, addr: SocketAddr) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.addr == addr)
    }

    fn get_mut(&mut self, addr: SocketAddr) -> Option<&mut Upstream> {
        self.upstreams.iter_mut().find(|u| u.addr == addr)
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Makes the set of upstreams `desired` (address, source; an address may come from several sources).
    /// Upstreams that stay keep their state and connections; removed ones have their connections cancelled.
    pub fn reconcile(&mut self, desired: &[(SocketAddr, String)], now: Instant) -> Changes {
        let mut changes = Changes::default();
        let mut removed = Vec::new();
        self.upstreams.retain(|u| {
            let keep = desired.iter().any(|(a, _)| *a == u.addr);
            if !keep {
                u.token.cancel();
                removed.push(u.addr);
            }
            keep
        });
        changes.removed = removed;
        for u in &mut self.upstreams {
            u.sources.clear();
        }
        for (addr, source) in desired {
            let upstream = match self.upstreams.iter().position(|u| u.addr == *addr) {
                Some(i) => &mut self.upstreams[i],
                None => {
                    changes.added.push(*addr);
                    self.upstreams.push(Upstream::new(*addr, now));
                    self.upstreams.last_mut().expect("just pushed")
                }
            };
            upstream.sources.insert(source.clone());
        }
        changes
    }

    /// Records a probe or dial result. `Ok(rtt)` is a connect time. Returns the state change, if any; an
    /// upstream that goes down has its connections cancelled.
    pub fn observe(
        &mut self,
        addr: SocketAddr,
        result: Result<Duration, String>,
        signal: Signal,
        now: Instant,
    ) -> Option<Transition> {
        let policy = self.policy;
        let u = self.get_mut(addr)?;
        let from = u.state;
        match result {
            Ok(rtt) => {
                u.sample_rtt(rtt);
                u.last_success = Some(now);
                u.streak = u.streak.max(0).saturating_add(1);
                let rise = i32::try_from(policy.rise).unwrap_or(i32::MAX);
                if from == State::Unknown || (from == State::Down && u.streak >= rise) {
                    u.state = State::Up;
                }
            }
            Err(error) => {
                u.last_error = Some(error);
                if signal == Signal::Dial {
                    u.dial_errors += 1;
                }
                u.streak = u.streak.min(0).saturating_sub(1);
                let fall = i32::try_from(policy.fall).unwrap_or(i32::MAX);
                if from != State::Down && -u.streak >= fall {
                    u.state = State::Down;
                    u.token.cancel();
                    u.token = CancellationToken::new();
                }
            }
        }
        let to = u.state;
        (from != to).then(|| {
            u.last_change = now;
            Transition { addr, from, to }
        })
    }

    /// A client dial to `addr` that started at `started` failed. It is a health signal only if the upstream
    /// has answered nothing (no probe, no other dial) since `started`: when it did, the upstream was alive
    /// while this dial waited, and the failure was ours (a burst of dials, a busy node) or a lost SYN. So a
    /// burst of concurrent dials that time out together cannot take a healthy upstream down; a dead or
    /// blackholed one answers nothing, and its failed dials count as before.
    pub fn observe_failed_dial(
        &mut self,
        addr: SocketAddr,
        error: String,
        started: Instant,
        now: Instant,
    ) -> Option<Transition> {
        let u = self.get_mut(addr)?;
        if u.last_success.is_some_and(|t| t >= started) {
            u.dial_errors += 1;
            u.last_error = Some(error);
            return None;
        }
        self.observe(addr, Err(error), Signal::Dial, now)
    }

    /// The order in which to dial for a new client connection: the chosen upstream first (among the usable
    /// ones with the lowest smoothed RTT, within [`NEAR_FACTOR`]/[`NEAR_SLACK`], the one with the fewest active
    /// connections), then the other usable ones by RTT, then the down ones, most recently successful first
    /// (so that a recovery is noticed by the first client, not the next check).
    pub fn plan(&mut self) -> Vec<Attempt> {
        let mut usable: Vec<&Upstream> =
            self.upstreams.iter().filter(|u| u.state.usable()).collect();
        usable.sort_by_key(|u| (u.srtt.is_none(), u.srtt));
        let mut order: Vec<SocketAddr> = Vec::with_capacity(self.upstreams.len());
        if let Some(best) = usable.first() {
            let near: Vec<&Upstream> = match best.srtt {
                Some(b) => {
                    let limit = b.mul_f64(NEAR_FACTOR).max(b + NEAR_SLACK);
                    usable
                        .iter()
                        .copied()
                        .filter(|u| u.srtt.is_some_and(|s| s <= limit))
                        .collect()
                }
                None => usable.clone(),
            };
            let least = near.iter().map(|u| u.active).min().unwrap_or(0);
            let tied: Vec<&Upstream> = near.into_iter().filter(|u| u.active == least).collect();
            let chosen = tied[self.rr % tied.len()].addr;
            self.rr = self.rr.wrapping_add(1);
            order.push(chosen);
            order.extend(usable.iter().map(|u| u.addr).filter(|a| *a != chosen));
        }
        let mut down: Vec<&Upstream> = self
            .upstreams
            .iter()
            .filter(|u| !u.state.usable())
            .collect();
        down.sort_by_key(|u| std::cmp::Reverse(u.last_success));
        order.extend(down.iter().map(|u| u.addr));
        let max = self.policy.dial_timeout;
        order
            .into_iter()
            .filter_map(|addr| {
                let u = self.get(addr)?;
                Some(Attempt {
                    addr,
                    timeout: u.attempt_timeout(max),
                })
            })
            .collect()
    }

    /// A client connection through `addr` was established: counts it and returns the token that closes it
    /// when the upstream goes down or is removed.
    pub fn open(&mut self, addr: SocketAddr) -> Option<CancellationToken> {
        let u = self.get_mut(addr)?;
        u.active += 1;
        u.total += 1;
        Some(u.token.child_token())
    }

    /// A connection opened with [`Table::open`] ended.
    pub fn close(&mut self, addr: SocketAddr) {
        if let Some(u) = self.get_mut(addr) {
            u.active = u.active.saturating_sub(1);
        }
    }

    /// A client connection moved on from `addr` after a failed dial.
    pub fn failover(&mut self, addr: SocketAddr) {
        if let Some(u) = self.get_mut(addr) {
            u.failovers += 1;
        }
    }

    /// How many upstreams are usable now.
    pub fn usable(&self) -> usize {
        self.upstreams.iter().filter(|u| u.state.usable()).count()
    }

    /// Cancels every upstream's connections (shutdown).
    pub fn cancel_all(&self) {
        for u in &self.upstreams {
            u.token.cancel();
        }
    }
}

/// Deduplicates resolved upstreams: the same address from several sources becomes one entry with all the
/// sources, and an address of this node (`is_local`) on the same port as a loopback upstream is folded into
/// it (Talos lists a control plane's own API server twice: `localhost:6443` and `<own ip>:6443`).
pub fn dedup(
    entries: Vec<(SocketAddr, String)>,
    is_local: impl Fn(IpAddr) -> bool,
) -> Vec<(SocketAddr, String)> {
    let loopback_ports: Vec<SocketAddr> = entries
        .iter()
        .map(|(a, _)| *a)
        .filter(|a| a.ip().is_loopback())
        .collect();
    entries
        .into_iter()
        .map(|(addr, source)| {
            if addr.ip().is_loopback() || !is_local(addr.ip()) {
                return (addr, source);
            }
            let same_family = loopback_ports
                .iter()
                .find(|l| l.port() == addr.port() && l.is_ipv4() == addr.is_ipv4());
            let any = loopback_ports.iter().find(|l| l.port() == addr.port());
            match same_family.or(any) {
                Some(l) => (*l, source),
                None => (addr, source),
            }
        })
        .collect()
}
