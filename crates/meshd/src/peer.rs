//! The pure per-peer state machine: candidate paths probed in parallel, ranked by RTT, failover in seconds.
//!
//! Owns no sockets and no clock: the driver calls [`PeerMachine::poll`] with the time and sends the
//! [`Action::Probe`]s it returns, feeds pongs to [`PeerMachine::on_pong`], and applies [`Action::SetEndpoint`].
//!
//! **Paths.** Each candidate endpoint is a path: `Unknown` until it answers or misses; `Alive` after one pong
//! (from `Unknown`) or [`Timing::rise`] consecutive pongs (from `Dead`); `Dead` after [`Timing::fall`]
//! consecutive missed probes (a probe is missed when no pong came within `max(probe_timeout, 3 × RTT)`).
//!
//! **Probing.** All candidates are probed at once when the peer appears (a join is as fast as ever). After
//! that, how often depends on the peer's [`Need`] (the mesh decides it from the topology, see
//! [`crate::probing`]):
//! - [`Need::Fast`] (the default, and the only policy before): the active path every `active_interval`
//!   (4/s), alive standby paths every `standby_interval`;
//! - [`Need::Every`]: the active path at that interval (a location's active gateway, whose traffic
//!   WireGuard's counters do not see), standby paths no faster than `standby_interval`;
//! - [`Need::Traffic`]: WireGuard's receive counter is the evidence (fed by [`PeerMachine::on_counters`]).
//!   While traffic flows (the counter moved at two readings at most `evidence_max_age` apart, the last one
//!   recent) the active path is not probed at all; at the first reading that sees it stopped (or when the
//!   transmit counter moves at two readings with no receipt since the first: an idle peer being used,
//!   however sparsely) the path is *suspect*, probed every `active_interval` until a pong clears it or `fall`
//!   misses make it dead (a failover as fast as before, plus one counter reading). An idle peer's active
//!   path is probed at the interval the need carries (`idle_interval`, 30 s, in `topology: full`) after
//!   the last evidence (a pong, or a counter that moved: WireGuard's 25 s keepalives usually make the probe
//!   unnecessary). Standby paths: every `busy_standby_interval` while the peer carried traffic within
//!   `busy_hold`, else at the idle interval;
//! - [`Need::Slow`]: every path every `idle_interval` (a native neighbour that is not a gateway candidate:
//!   nothing to fail over to).
//!
//! Whatever the need, a missed probe on the active path makes it suspect (probed every `active_interval`
//! until a pong or death). Dead and unanswered paths back off from `active_interval`, doubling to
//! `dead_interval_max` (to `idle_interval` for the standby paths of an idle or slow peer that is up).
//!
//! **Choice.** The preferred live path is the one earliest in the candidate list among those whose RTT is
//! within `1.5 × best + 2 ms` of the best live RTT (near-equal paths keep the configured order, e.g. the private
//! network first). The active path changes only to a path that is `Alive` (never to an untested one):
//! - at once, when the active path is dead (a failover);
//! - when the preferred path is earlier in the list than the active one (moving back after a repair);
//! - when the active path is far slower (`> 2 × best + 5 ms`).
//!
//! **Peer state.** `Up` while the active path is alive; `Down` when no path is alive and every path has been
//! tried (or the active one died with no alternative); `Unknown` before that.
//!
//! KubeSpan, for comparison: one candidate at a time, down after 275 s without a handshake, checked every 30 s.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The timing constants (defaults in [`Timing::default`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub active_interval: Duration,
    pub standby_interval: Duration,
    pub dead_interval_max: Duration,
    pub probe_timeout: Duration,
    /// Consecutive missed probes that make a path dead.
    pub fall: u32,
    /// Consecutive pongs that make a dead path alive again.
    pub rise: u32,
    /// Idle and slow peers: how often their paths are probed without other evidence.
    pub idle_interval: Duration,
    /// [`Need::Traffic`]: alive standby paths of a peer that carried traffic lately.
    pub busy_standby_interval: Duration,
    /// [`Need::Traffic`]: how long a peer counts as busy after its traffic stopped flowing.
    pub busy_hold: Duration,
    /// [`Need::Traffic`]: traffic flows while the receive counter moved at two readings no further apart
    /// than this, the last no older (sparse traffic, a request a second, flows too).
    pub evidence_max_age: Duration,
}

/// How closely a peer's paths need watching (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Fast,
    Every(Duration),
    /// Traffic first; without traffic, probed at this interval.
    Traffic(Duration),
    Slow,
}

impl Need {
    pub fn as_str(self) -> &'static str {
        match self {
            Need::Fast => "fast",
            Need::Every(_) => "gateway",
            Need::Traffic(_) => "traffic",
            Need::Slow => "slow",
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            active_interval: Duration::from_millis(250),
            standby_interval: Duration::from_secs(1),
            dead_interval_max: Duration::from_secs(2),
            probe_timeout: Duration::from_millis(750),
            fall: 3,
            rise: 2,
            idle_interval: Duration::from_secs(30),
            busy_standby_interval: Duration::from_secs(2),
            busy_hold: Duration::from_secs(30),
            evidence_max_age: Duration::from_millis(1500),
        }
    }
}

/// A path's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathState {
    Unknown,
    Alive,
    Dead,
}

/// A peer's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    Unknown,
    Up,
    Down,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Unknown => "unknown",
            PeerState::Up => "up",
            PeerState::Down => "down",
        }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a ping with this nonce to the path's probe address.
    Probe { endpoint: SocketAddr, nonce: u64 },
    /// Point WireGuard at this endpoint.
    SetEndpoint(SocketAddr),
    /// The peer's state changed.
    State(PeerState),
}

/// One candidate endpoint.
#[derive(Clone, Debug)]
pub struct Path {
    pub endpoint: SocketAddr,
    pub state: PathState,
    /// Smoothed RTT (EWMA, 1/4 weight for a new sample).
    pub rtt: Option<Duration>,
    pub misses: u32,
    pub successes: u32,
    pub last_pong: Option<Instant>,
    outstanding: Vec<(u64, Instant)>,
    next_probe: Instant,
    backoff: Duration,
}

impl Path {
    fn new(endpoint: SocketAddr, now: Instant, timing: &Timing) -> Path {
        Path {
            endpoint,
            state: PathState::Unknown,
            rtt: None,
            misses: 0,
            successes: 0,
            last_pong: None,
            outstanding: Vec::new(),
            next_probe: now,
            backoff: timing.active_interval,
        }
    }

    fn timeout(&self, timing: &Timing) -> Duration {
        self.rtt
            .map_or(timing.probe_timeout, |r| (r * 3).max(timing.probe_timeout))
    }
}

/// The state machine of one peer.
#[derive(Clone, Debug)]
pub struct PeerMachine {
    /// Shared by every machine of a mesh (one copy, not one per peer).
    pub timing: std::sync::Arc<Timing>,
    pub paths: Vec<Path>,
    /// Index into `paths` of the endpoint WireGuard uses.
    pub active: Option<usize>,
    pub state: PeerState,
    pub failovers: u64,
    need: Need,
    /// The last two counter readings that saw the receive counter move (traffic flows while they are
    /// recent and close together: see [`PeerMachine::flowing`]).
    moved_at: Option<Instant>,
    moved_before: Option<Instant>,
    /// A reading saw the transmit counter move, and none since saw the receive counter move.
    unanswered: bool,
    /// The last time traffic flowed.
    busy_at: Option<Instant>,
    /// The active path needs confirming: traffic stopped, or a probe was missed.
    suspect: bool,
    /// Probes not sent because traffic proved the active path (for the metrics).
    pub skipped: u64,
    /// A live path other than the active one that the choice wants, and since when (see [`SLOW_HOLD`]).
    wanted: Option<(usize, Instant)>,
}

/// How long an alive active path must stay far slower than the best before traffic moves off it: RTT
/// samples spike on a loaded host or a busy link, and every move costs a WireGuard update (and a roam of
/// the other side). A dead path still fails over at once.
pub const SLOW_HOLD: Duration = Duration::from_secs(3);
/// How long an earlier-listed path must stay preferred (alive, near the best RTT) before traffic moves back
/// to it.
pub const BACK_HOLD: Duration = Duration::from_secs(1);

impl PeerMachine {
    pub fn new(
        candidates: &[SocketAddr],
        timing: impl Into<std::sync::Arc<Timing>>,
        now: Instant,
    ) -> PeerMachine {
        let mut m = PeerMachine {
            timing: timing.into(),
            paths: Vec::new(),
            active: None,
            state: PeerState::Unknown,
            failovers: 0,
            wanted: None,
            need: Need::Fast,
            moved_at: None,
            moved_before: None,
            unanswered: false,
            busy_at: None,
            suspect: false,
            skipped: 0,
        };
        m.set_candidates(candidates, now);
        m
    }

    /// The active endpoint.
    pub fn active_endpoint(&self) -> Option<SocketAddr> {
        self.active.map(|i| self.paths[i].endpoint)
    }

    /// Replaces the candidate list, keeping what is known of paths that stay. A removed active path is
    /// treated as dead at the next poll.
    pub fn set_candidates(&mut self, candidates: &[SocketAddr], now: Instant) {
        let active = self.active_endpoint();
        let mut old = std::mem::take(&mut self.paths);
        for c in candidates {
            if self.paths.iter().any(|p| p.endpoint == *c) {
                continue;
            }
            match old.iter().position(|p| p.endpoint == *c) {
                Some(i) => self.paths.push(old.swap_remove(i)),
                None => self.paths.push(Path::new(*c, now, &self.timing)),
            }
        }
        self.active = active.and_then(|a| self.paths.iter().position(|p| p.endpoint == a));
        if active.is_some() && self.active.is_none() {
            // The active endpoint is gone from the list: keep using it until another path is alive.
            if let Some(a) = active {
                let mut p = Path::new(a, now, &self.timing);
                p.state = PathState::Dead;
                p.misses = self.timing.fall;
                self.paths.push(p);
                self.active = Some(self.paths.len() - 1);
            }
        }
    }

    /// How closely this peer needs watching (decided by the mesh at every poll).
    pub fn set_need(&mut self, need: Need) {
        self.need = need;
    }

    pub fn need(&self) -> Need {
        self.need
    }

    /// A reading of WireGuard's counters: whether the receive counter `moved` since the previous reading,
    /// and whether the transmit counter did (`sent`).
    pub fn on_counters(&mut self, moved: bool, sent: bool, now: Instant) {
        let was_flowing = self.flowing(now);
        // Sending with nothing coming back, seen by two readings with no receipt between them (one of our
        // keepalives is one such reading; sparse traffic, a packet a second, has quiet readings between its
        // sends): a peer that was idle is being used now, and its path must be confirmed.
        let again = sent && !moved && self.unanswered;
        self.unanswered = !moved && (sent || self.unanswered);
        if moved {
            self.moved_before = self.moved_at;
            self.moved_at = Some(now);
            if self.flowing(now) {
                self.busy_at = Some(now);
            }
            // Evidence of liveness: an idle active path's next probe moves to `idle_interval` from now.
            if let Need::Traffic(idle) = self.need
                && !self.suspect
                && let Some(a) = self.active
                && self.paths[a].state == PathState::Alive
            {
                let path = &mut self.paths[a];
                path.next_probe = path.next_probe.max(now + idle);
            }
        } else if (was_flowing || again) && matches!(self.need, Need::Traffic(_)) {
            // The traffic stopped, or gets no answer: confirm the active path now.
            self.suspect = true;
            self.busy_at = Some(now);
            if let Some(a) = self.active {
                let path = &mut self.paths[a];
                path.next_probe = path.next_probe.min(now);
            }
        }
    }

    /// Whether the peer carries traffic: it flows, or flowed within `busy_hold`.
    pub fn busy(&self, now: Instant) -> bool {
        self.suspect
            || self
                .busy_at
                .is_some_and(|t| now.saturating_duration_since(t) < self.timing.busy_hold)
    }

    /// Whether traffic flows now: the receive counter moved at the last two readings that saw it move,
    /// no more than `evidence_max_age` apart, the last one no older than that (sparse traffic, a request
    /// every 300 ms, flows too; one keepalive every 25 s does not).
    pub fn flowing(&self, now: Instant) -> bool {
        let max = self.timing.evidence_max_age;
        match (self.moved_before, self.moved_at) {
            (Some(before), Some(last)) => {
                last.saturating_duration_since(before) <= max
                    && now.saturating_duration_since(last) <= max
            }
            _ => false,
        }
    }

    /// The ping with `nonce` could not be sent for lack of local resources (`ENOBUFS`, `ENOMEM`, ...): it is
    /// forgotten, so it never counts as a miss (local pressure is not the peer's health).
    pub fn not_sent(&mut self, nonce: u64) {
        for path in &mut self.paths {
            path.outstanding.retain(|(n, _)| *n != nonce);
        }
    }

    /// The endpoint an outstanding ping with `nonce` was sent to (a pong must come from there).
    pub fn endpoint_of(&self, nonce: u64) -> Option<SocketAddr> {
        self.paths
            .iter()
            .find(|p| p.outstanding.iter().any(|(n, _)| *n == nonce))
            .map(|p| p.endpoint)
    }

    /// When the outstanding ping with `nonce` was sent.
    pub fn sent_at(&self, nonce: u64) -> Option<Instant> {
        self.paths
            .iter()
            .flat_map(|p| p.outstanding.iter())
            .find(|(n, _)| *n == nonce)
            .map(|(_, sent)| *sent)
    }

    /// A pong with `nonce` arrived. Returns whether it matched an outstanding probe.
    pub fn on_pong(&mut self, nonce: u64, now: Instant) -> bool {
        for (i, path) in self.paths.iter_mut().enumerate() {
            let Some(pos) = path.outstanding.iter().position(|(n, _)| *n == nonce) else {
                continue;
            };
            let (_, sent) = path.outstanding.swap_remove(pos);
            let sample = now.saturating_duration_since(sent);
            path.rtt = Some(match path.rtt {
                None => sample,
                Some(r) => (r * 3 + sample) / 4,
            });
            path.misses = 0;
            path.successes = path.successes.saturating_add(1);
            path.last_pong = Some(now);
            path.backoff = self.timing.active_interval;
            let rise = if path.state == PathState::Unknown {
                1
            } else {
                self.timing.rise
            };
            if path.state != PathState::Alive && path.successes >= rise {
                path.state = PathState::Alive;
            }
            if Some(i) == self.active {
                self.suspect = false;
            }
            return true;
        }
        false
    }

    /// Advances to `now`: expires probes, decides, schedules. `nonce` makes probe nonces.
    pub fn poll(&mut self, now: Instant, nonce: &mut impl FnMut() -> u64) -> Vec<Action> {
        let mut actions = Vec::new();
        self.expire(now);
        self.choose(now, &mut actions);
        self.update_state(&mut actions);
        self.schedule(now, nonce, &mut actions);
        actions
    }

    fn expire(&mut self, now: Instant) {
        let timing = *self.timing;
        for (i, path) in self.paths.iter_mut().enumerate() {
            let timeout = path.timeout(&timing);
            let before = path.outstanding.len();
            path.outstanding
                .retain(|(_, sent)| now.saturating_duration_since(*sent) < timeout);
            let missed = (before - path.outstanding.len()) as u32;
            if missed > 0 {
                path.misses = path.misses.saturating_add(missed);
                path.successes = 0;
                if path.misses >= timing.fall {
                    path.state = PathState::Dead;
                }
                if Some(i) == self.active && path.state != PathState::Dead {
                    // Confirm at the active rate: dead or alive within `fall` probes.
                    self.suspect = true;
                    path.next_probe = path.next_probe.min(now + timing.active_interval);
                }
            }
        }
    }

    /// The preferred live path (see the module docs).
    pub fn preferred(&self) -> Option<usize> {
        let best = self
            .paths
            .iter()
            .filter(|p| p.state == PathState::Alive)
            .filter_map(|p| p.rtt)
            .min()?;
        let near = best.mul_f64(1.5) + Duration::from_millis(2);
        self.paths
            .iter()
            .position(|p| p.state == PathState::Alive && p.rtt.is_some_and(|r| r <= near))
    }

    fn choose(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let Some(pref) = self.preferred() else {
            return;
        };
        let switch = match self.active {
            None => true,
            Some(a) if a == pref => {
                self.wanted = None;
                false
            }
            Some(a) => {
                let active = &self.paths[a];
                match active.state {
                    PathState::Dead | PathState::Unknown => {
                        self.failovers += 1;
                        true
                    }
                    PathState::Alive => {
                        let best = self.paths[pref].rtt.unwrap_or_default();
                        let far = best * 2 + Duration::from_millis(5);
                        let back = pref < a;
                        if back || active.rtt.is_some_and(|r| r > far) {
                            let hold = if back { BACK_HOLD } else { SLOW_HOLD };
                            match self.wanted {
                                Some((p, since)) if p == pref => {
                                    now.saturating_duration_since(since) >= hold
                                }
                                _ => {
                                    self.wanted = Some((pref, now));
                                    false
                                }
                            }
                        } else {
                            self.wanted = None;
                            false
                        }
                    }
                }
            }
        };
        if switch {
            self.wanted = None;
            self.active = Some(pref);
            // An active path is probed at the active rate from now on, not on the schedule it had as a
            // standby or dead path (up to `dead_interval_max` away).
            let path = &mut self.paths[pref];
            path.next_probe = path.next_probe.min(now + self.timing.active_interval);
            actions.push(Action::SetEndpoint(path.endpoint));
        }
    }

    fn update_state(&mut self, actions: &mut Vec<Action>) {
        let active_alive = self
            .active
            .is_some_and(|a| self.paths[a].state == PathState::Alive);
        let all_tried = self.paths.iter().all(|p| p.state != PathState::Unknown);
        let state = if active_alive {
            PeerState::Up
        } else if self.active.is_some() || all_tried {
            PeerState::Down
        } else {
            PeerState::Unknown
        };
        if state != self.state {
            self.state = state;
            actions.push(Action::State(state));
        }
    }

    fn schedule(
        &mut self,
        now: Instant,
        nonce: &mut impl FnMut() -> u64,
        actions: &mut Vec<Action>,
    ) {
        let up = self.state == PeerState::Up;
        let busy = self.busy(now);
        let flowing = self.flowing(now);
        for i in 0..self.paths.len() {
            if now < self.paths[i].next_probe {
                continue;
            }
            let interval = match self.interval(i, up, busy, flowing) {
                Some(interval) => interval,
                None => {
                    // Traffic proves the active path: look again at the next slot.
                    self.paths[i].next_probe = now + self.timing.active_interval;
                    self.skipped += 1;
                    continue;
                }
            };
            let path = &mut self.paths[i];
            let n = nonce();
            if path.outstanding.len() >= 16 {
                path.outstanding.remove(0);
            }
            path.outstanding.push((n, now));
            path.next_probe = now + interval;
            actions.push(Action::Probe {
                endpoint: path.endpoint,
                nonce: n,
            });
        }
    }

    /// When path `i` is probed next, or `None` when it needs no probe now (traffic flows over it).
    fn interval(&mut self, i: usize, up: bool, busy: bool, flowing: bool) -> Option<Duration> {
        let timing = *self.timing;
        let path_state = self.paths[i].state;
        let active = Some(i) == self.active;
        if active && path_state == PathState::Alive {
            if self.suspect {
                return Some(timing.active_interval);
            }
            return match self.need {
                Need::Fast => Some(timing.active_interval),
                Need::Every(d) => Some(d),
                Need::Slow => Some(timing.idle_interval),
                Need::Traffic(_) if flowing => None,
                Need::Traffic(idle) => Some(idle),
            };
        }
        if path_state == PathState::Alive {
            return Some(match self.need {
                Need::Fast => timing.standby_interval,
                Need::Every(d) => d.max(timing.standby_interval),
                Need::Traffic(idle) if busy => timing.busy_standby_interval.min(idle),
                Need::Traffic(idle) => idle,
                Need::Slow => timing.idle_interval,
            });
        }
        if !up && path_state == PathState::Unknown {
            return Some(timing.active_interval);
        }
        // Dead, or untested while the peer is up: back off.
        // A peer that is not up (starting, or every path lost) retries fast: it joins within seconds.
        let cap = match self.need {
            Need::Fast | Need::Every(_) => timing.dead_interval_max,
            _ if busy || !up => timing.dead_interval_max,
            Need::Traffic(idle) => idle.max(timing.dead_interval_max),
            Need::Slow => timing.idle_interval,
        };
        let path = &mut self.paths[i];
        let b = path.backoff.min(cap);
        path.backoff = (b * 2).min(cap);
        Some(b)
    }

    /// When [`PeerMachine::poll`] next has something to do.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let timing = *self.timing;
        self.paths
            .iter()
            .flat_map(|p| {
                let t = p.timeout(&timing);
                std::iter::once(p.next_probe).chain(p.outstanding.iter().map(move |(_, s)| *s + t))
            })
            .min()
    }
}

#[cfg(test)]
mod tests;
