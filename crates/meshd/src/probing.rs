//! The mesh's probe planning: how closely each peer needs watching ([`Need`]) and how often WireGuard's
//! counters are read. Pure: the mesh calls it at every poll, and the simulation in `probing/tests.rs` runs
//! it with [`crate::peer::PeerMachine`] under simulated time.
//!
//! - `topology: full`, and a WireGuard peer in `topology: location` (a remote gateway candidate, a peer of
//!   our location without a private endpoint): [`Need::Traffic`]: its traffic crosses WireGuard, whose
//!   receive counter is the evidence; idle, every 30 s, but a remote gateway candidate every
//!   [`REMOTE_GATEWAY_IDLE`] (our uplink is judged from them).
//! - `topology: location`, this node not a candidate: our location's *active gateway* carries our traffic
//!   to other locations natively (WireGuard's counters do not see it): [`Need::Every`] at
//!   [`gateway_interval`]; the standby candidates the same, no faster than the standby interval.
//! - every other native neighbour, and every neighbour of a gateway candidate: [`Need::Slow`] (nothing to
//!   fail over to).
//!
//! Counters are read every [`STATS_EVERY`] (a stall is seen within one reading, and a peer that starts
//! carrying traffic within two; one device dump, a few hundred bytes per peer, far cheaper than the
//! probes it replaces).

use std::time::Duration;

use hybridnet_config::PublicKey;

use crate::peer::{Need, PeerState, Timing};
use crate::topology::{Plan, Role};

/// How often WireGuard's counters are read (at most: see [`stats_interval`]).
pub const STATS_EVERY: Duration = Duration::from_millis(250);
/// Reading the counters (one dump of the device) may take at most this share of the time, 1/10: a device of
/// thousands of peers, whose dump takes tens of milliseconds, is read less often instead of keeping a core busy.
pub const STATS_COST_SHARE: u32 = 10;

/// The time until the next counter reading, after one that took `took`: every [`STATS_EVERY`], or
/// [`STATS_COST_SHARE`] times the reading's own duration when that is longer. Pure.
pub fn stats_interval(took: Duration) -> Duration {
    STATS_EVERY.max(took.saturating_mul(STATS_COST_SHARE))
}
/// Readings closer together than this are not evidence (a reconcile's read right after a poll's).
pub const STATS_MIN_SPACING: Duration = Duration::from_millis(200);
/// A location's nodes probe their active gateway at the active rate up to this many nodes; beyond, each
/// probes it proportionally less, so a gateway answers at most about `GATEWAY_SHARE × 4` pings per second
/// whatever the location's size (its failover slows down in proportion instead).
pub const GATEWAY_SHARE: u32 = 16;
/// A gateway candidate probes the other locations' candidates at least this often without traffic: its
/// uplink (the `NO_UPLINK` flag its location's nodes act on) is known within seconds.
pub const REMOTE_GATEWAY_IDLE: Duration = Duration::from_secs(2);

/// The probe interval of a location's gateways, for a location of `nodes` nodes (this one included).
pub fn gateway_interval(timing: &Timing, nodes: usize) -> Duration {
    let share = u32::try_from(nodes)
        .unwrap_or(u32::MAX)
        .div_ceil(GATEWAY_SHARE)
        .max(1);
    timing.active_interval.saturating_mul(share)
}

/// What the plan says about probing, computed once per poll.
#[derive(Clone, Debug)]
pub struct Planning {
    /// Our location's active gateway (when this node is not a candidate).
    pub active_gateway: Option<PublicKey>,
    pub gateway_interval: Duration,
    pub standby_interval: Duration,
    pub idle_interval: Duration,
}

impl Planning {
    /// `state`: a peer's probe state (to find the active gateway as [`crate::topology`] does: the first
    /// candidate up, else the first not known to be down).
    pub fn new(
        plan: Option<&Plan>,
        timing: &Timing,
        state: impl Fn(&PublicKey) -> PeerState,
    ) -> Planning {
        let mut out = Planning {
            active_gateway: None,
            gateway_interval: timing.active_interval,
            standby_interval: timing.standby_interval,
            idle_interval: timing.idle_interval,
        };
        let Some(plan) = plan.filter(|p| !p.candidate) else {
            return out;
        };
        let nodes = 1 + plan
            .peers
            .values()
            .filter(|p| p.location == plan.location)
            .count();
        out.gateway_interval = gateway_interval(timing, nodes);
        let candidates = plan
            .candidates
            .get(&plan.location)
            .map_or(&[][..], Vec::as_slice);
        out.active_gateway = candidates
            .iter()
            .find(|k| state(k) == PeerState::Up)
            .or_else(|| candidates.iter().find(|k| state(k) != PeerState::Down))
            .copied();
        out
    }

    /// The need of peer `key`.
    pub fn need(&self, plan: Option<&Plan>, key: &PublicKey) -> Need {
        let Some(plan) = plan else {
            return Need::Traffic(self.idle_interval);
        };
        let Some(p) = plan.peers.get(key) else {
            return Need::Slow;
        };
        match p.role {
            // Another location's gateway candidate, seen from a candidate: it carries our location's
            // traffic, and whether we still reach any of them says whether we have an uplink.
            Role::Direct if plan.candidate && p.candidate && p.location != plan.location => {
                Need::Traffic(REMOTE_GATEWAY_IDLE)
            }
            Role::Direct => Need::Traffic(self.idle_interval),
            Role::Routed => Need::Slow,
            Role::Native if !plan.candidate && p.candidate => {
                if self.active_gateway.as_ref() == Some(key) {
                    Need::Every(self.gateway_interval)
                } else {
                    Need::Every(self.gateway_interval.max(self.standby_interval))
                }
            }
            Role::Native => Need::Slow,
        }
    }
}

#[cfg(test)]
mod tests;
