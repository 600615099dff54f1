//! The peer state machine under simulated time: a fake network answers probes per endpoint.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use super::*;

const PRIV: &str = "192.0.2.12:51821";
const PUB: &str = "198.51.100.12:51821";

struct Sim {
    start: Instant,
    now: Instant,
    m: PeerMachine,
    /// endpoint -> RTT when reachable
    net: HashMap<SocketAddr, Option<Duration>>,
    in_flight: Vec<(Instant, u64)>,
    endpoints: Vec<SocketAddr>,
    states: Vec<(Duration, PeerState)>,
    nonce: u64,
    probes: usize,
    /// Pings cannot be sent (the socket says ENOBUFS): each is reported with `not_sent`.
    unsendable: bool,
}

impl Sim {
    fn new(candidates: &[&str]) -> Sim {
        let now = Instant::now();
        let cands: Vec<SocketAddr> = candidates.iter().map(|c| c.parse().unwrap()).collect();
        let net = cands
            .iter()
            .map(|c| (*c, Some(Duration::from_millis(1))))
            .collect();
        Sim {
            start: now,
            now,
            m: PeerMachine::new(&cands, Timing::default(), now),
            net,
            in_flight: Vec::new(),
            endpoints: Vec::new(),
            states: Vec::new(),
            nonce: 0,
            probes: 0,
            unsendable: false,
        }
    }

    fn set(&mut self, ep: &str, rtt: Option<Duration>) {
        self.net.insert(ep.parse().unwrap(), rtt);
    }

    /// Runs for `d` in 5 ms steps.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(5);
            let now = self.now;
            let due: Vec<u64> = self
                .in_flight
                .iter()
                .filter(|(t, _)| *t <= now)
                .map(|(_, n)| *n)
                .collect();
            self.in_flight.retain(|(t, _)| *t > now);
            for n in due {
                self.m.on_pong(n, now);
            }
            let mut counter = self.nonce;
            let actions = self.m.poll(now, &mut || {
                counter += 1;
                counter
            });
            self.nonce = counter;
            for a in actions {
                match a {
                    Action::Probe { nonce, .. } if self.unsendable => self.m.not_sent(nonce),
                    Action::Probe { endpoint, nonce } => {
                        self.probes += 1;
                        if let Some(Some(rtt)) = self.net.get(&endpoint) {
                            self.in_flight.push((now + *rtt, nonce));
                        }
                    }
                    Action::SetEndpoint(ep) => self.endpoints.push(ep),
                    Action::State(s) => self.states.push((now - self.start, s)),
                }
            }
        }
    }

    fn active(&self) -> Option<String> {
        self.m.active_endpoint().map(|e| e.to_string())
    }

    fn since(&self, mark: Instant) -> Duration {
        self.now - mark
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn unknown_to_up_within_a_round_trip_on_the_first_listed_path() {
    let mut s = Sim::new(&[PRIV, PUB]);
    assert_eq!(s.m.state, PeerState::Unknown);
    s.run(ms(20));
    assert_eq!(s.m.state, PeerState::Up);
    assert_eq!(s.active().as_deref(), Some(PRIV));
    assert_eq!(
        s.states,
        vec![(ms(10), PeerState::Up)],
        "probe at 5 ms, pong (1 ms RTT) seen at the next 5 ms step"
    );
    // Both candidates were probed at once (in parallel), not one after the other.
    assert!(s.probes >= 2);
}

#[test]
fn faster_path_wins_when_rtts_differ_a_lot() {
    let mut s = Sim::new(&[PRIV, PUB]);
    s.set(PRIV, Some(ms(80)));
    s.set(PUB, Some(ms(2)));
    s.run(ms(3000));
    assert_eq!(s.active().as_deref(), Some(PUB));
}

#[test]
fn unknown_to_down_when_nothing_answers_and_down_to_up_when_it_does() {
    let mut s = Sim::new(&[PRIV, PUB]);
    s.set(PRIV, None);
    s.set(PUB, None);
    s.run(ms(2500));
    assert_eq!(s.m.state, PeerState::Down);
    assert_eq!(s.m.active, None);
    assert!(
        s.endpoints.is_empty(),
        "never points WireGuard at an untested path"
    );
    s.set(PUB, Some(ms(1)));
    let mark = s.now;
    s.run(ms(3000));
    assert_eq!(s.m.state, PeerState::Up);
    assert_eq!(s.active().as_deref(), Some(PUB));
    let up_at = s.states.last().unwrap().0;
    assert!(up_at <= s.since(s.start) && s.since(mark) >= ms(3000));
}

#[test]
fn failover_to_the_live_standby_within_two_seconds_then_back() {
    let mut s = Sim::new(&[PRIV, PUB]);
    s.run(ms(3000));
    assert_eq!(s.active().as_deref(), Some(PRIV));
    s.set(PRIV, None);
    let cut = s.now;
    let mut switched = None;
    for _ in 0..100 {
        s.run(ms(50));
        if s.active().as_deref() == Some(PUB) {
            switched = Some(s.since(cut));
            break;
        }
    }
    let switched = switched.expect("failed over");
    assert!(switched <= ms(2000), "failover took {switched:?}");
    assert_eq!(s.m.state, PeerState::Up, "a live standby keeps the peer up");
    assert_eq!(s.m.failovers, 1);
    // Repair: moves back to the preferred (first listed) path once it is alive again (rise = 2).
    s.set(PRIV, Some(ms(1)));
    let repaired = s.now;
    let mut back = None;
    for _ in 0..200 {
        s.run(ms(50));
        if s.active().as_deref() == Some(PRIV) {
            back = Some(s.since(repaired));
            break;
        }
    }
    let back = back.expect("moved back");
    assert!(back <= ms(5000), "moving back took {back:?}");
    assert_eq!(s.endpoints.len(), 3);
    // Cut again right after moving back: the path just made active is probed at the active rate at once,
    // not on its old dead-path backoff, so the failover is as fast as the first.
    s.set(PRIV, None);
    let cut = s.now;
    let mut again = None;
    for _ in 0..100 {
        s.run(ms(50));
        if s.active().as_deref() == Some(PUB) {
            again = Some(s.since(cut));
            break;
        }
    }
    let again = again.expect("failed over again");
    assert!(again <= ms(2000), "second failover took {again:?}");
}

#[test]
fn up_to_down_when_the_only_path_dies_and_the_endpoint_stays() {
    let mut s = Sim::new(&[PRIV]);
    s.run(ms(500));
    assert_eq!(s.m.state, PeerState::Up);
    s.set(PRIV, None);
    s.run(ms(2000));
    assert_eq!(s.m.state, PeerState::Down);
    assert_eq!(
        s.active().as_deref(),
        Some(PRIV),
        "no rotation onto nothing"
    );
    s.set(PRIV, Some(ms(1)));
    s.run(ms(4000));
    assert_eq!(s.m.state, PeerState::Up);
    assert_eq!(s.m.failovers, 0);
    let kinds: Vec<PeerState> = s.states.iter().map(|(_, st)| *st).collect();
    assert_eq!(kinds, vec![PeerState::Up, PeerState::Down, PeerState::Up]);
}

#[test]
fn never_rotates_onto_an_untested_or_dead_path() {
    let mut s = Sim::new(&[PRIV, PUB]);
    s.set(PUB, None);
    s.run(ms(3000));
    assert_eq!(s.active().as_deref(), Some(PRIV));
    assert_eq!(s.m.paths[1].state, PathState::Dead);
    s.set(PRIV, None);
    s.run(ms(3000));
    assert_eq!(s.active().as_deref(), Some(PRIV));
    assert_eq!(s.m.state, PeerState::Down);
    assert_eq!(s.endpoints.len(), 1);
}

#[test]
fn probing_backs_off_for_dead_standby_and_idle_paths() {
    let mut busy = Sim::new(&[PRIV, PUB]);
    busy.set(PUB, None);
    busy.run(ms(10_000));
    let mut idle = Sim::new(&[PRIV, PUB]);
    idle.set(PUB, None);
    idle.m.set_need(Need::Slow);
    idle.run(ms(10_000));
    // Active: 4/s for 10 s (~40); dead standby backs off to one per 2 s.
    assert!(
        (40..=60).contains(&busy.probes),
        "busy probes {}",
        busy.probes
    );
    assert!(
        idle.probes < busy.probes / 2,
        "idle {} busy {}",
        idle.probes,
        busy.probes
    );
    assert!(busy.m.next_wakeup().is_some());
}

#[test]
fn candidate_changes_keep_known_paths_and_a_removed_active_fails_over() {
    let mut s = Sim::new(&[PRIV, PUB]);
    s.run(ms(3000));
    let rtt = s.m.paths[1].rtt;
    let pub_ep: SocketAddr = PUB.parse().unwrap();
    s.m.set_candidates(&[pub_ep], s.now);
    assert_eq!(
        s.m.paths.len(),
        2,
        "the removed active path stays until replaced"
    );
    assert_eq!(s.m.paths[0].rtt, rtt, "known path kept its state");
    s.run(ms(100));
    assert_eq!(s.active().as_deref(), Some(PUB));
    s.m.set_candidates(&[pub_ep], s.now);
    assert_eq!(s.m.paths.len(), 1);
}

#[test]
fn replayed_or_unknown_pongs_are_ignored() {
    let mut s = Sim::new(&[PRIV]);
    let now = s.now;
    assert!(!s.m.on_pong(12345, now));
    let actions = s.m.poll(now, &mut || 7);
    assert!(actions.contains(&Action::Probe {
        endpoint: PRIV.parse().unwrap(),
        nonce: 7
    }));
    assert!(s.m.on_pong(7, now + ms(1)));
    assert!(!s.m.on_pong(7, now + ms(2)), "a nonce counts once");
}

/// Pings that could not be sent for lack of local buffers or descriptors are not misses: a peer stays up
/// through a spell of local pressure, however long.
#[test]
fn pings_not_sent_for_local_pressure_do_not_take_a_peer_down() {
    let mut s = Sim::new(&[PRIV, PUB]);
    s.run(ms(500));
    assert_eq!(s.m.state, PeerState::Up);
    s.unsendable = true;
    s.run(ms(20_000));
    assert_eq!(s.m.state, PeerState::Up, "{:?}", s.states);
    s.unsendable = false;
    s.run(ms(2_000));
    assert_eq!(s.m.state, PeerState::Up);
    assert_eq!(s.states.len(), 1, "{:?}", s.states);
}

#[test]
fn traffic_need_probes_only_when_counters_stop_or_go_unanswered() {
    let mut s = Sim::new(&[PRIV]);
    s.m.set_need(Need::Traffic(Timing::default().idle_interval));
    s.run(ms(500));
    assert_eq!(s.m.state, PeerState::Up);
    // Traffic flows (the receive counter moves at every reading): no probes at all.
    let before = s.probes;
    for _ in 0..20 {
        s.m.on_counters(true, true, s.now);
        s.run(ms(250));
    }
    assert_eq!(
        s.probes, before,
        "a path that carries traffic needs no probes"
    );
    // The path dies and the counter stops: down within the active-rate confirmation.
    s.set(PRIV, None);
    let cut = s.now;
    s.m.on_counters(false, true, s.now);
    s.run(ms(1600));
    assert_eq!(
        s.m.state,
        PeerState::Down,
        "down {:?} after the stall",
        s.since(cut)
    );
    // Idle peer: 30 s without a probe after the last evidence; an idle peer used again (sending, no
    // answer at two readings) is confirmed at once.
    let mut idle = Sim::new(&[PRIV]);
    idle.m
        .set_need(Need::Traffic(Timing::default().idle_interval));
    idle.run(ms(500));
    let n = idle.probes;
    idle.run(ms(20_000));
    assert_eq!(idle.probes, n, "an idle peer is probed every 30 s");
    idle.set(PRIV, None);
    idle.m.on_counters(false, true, idle.now);
    idle.run(ms(250));
    idle.m.on_counters(false, true, idle.now);
    idle.run(ms(1600));
    assert_eq!(idle.m.state, PeerState::Down);

    // Sparse use of an idle peer (a ping a second, read every 250 ms: quiet readings between the sends)
    // with nothing coming back is confirmed as fast: found in CI, where a dropped mesh port went unnoticed
    // for 15 s while the operator test pinged the peer once a second.
    let mut sparse = Sim::new(&[PRIV]);
    sparse
        .m
        .set_need(Need::Traffic(Timing::default().idle_interval));
    sparse.run(ms(500));
    sparse.run(ms(20_000));
    sparse.set(PRIV, None);
    let cut = sparse.now;
    for reading in 0..40 {
        sparse.m.on_counters(false, reading % 4 == 0, sparse.now);
        sparse.run(ms(250));
        if sparse.m.state == PeerState::Down {
            break;
        }
    }
    assert_eq!(sparse.m.state, PeerState::Down);
    assert!(
        sparse.since(cut) <= ms(3_000),
        "down {:?} after sparse unanswered traffic began",
        sparse.since(cut)
    );
    // An answer between two sends clears it: a peer that answers each of our rare sends (one every 2 s,
    // too sparse to count as flowing) is never suspected, and needs no probe before its idle one.
    let mut answered = Sim::new(&[PRIV]);
    answered
        .m
        .set_need(Need::Traffic(Timing::default().idle_interval));
    answered.run(ms(500));
    let n = answered.probes;
    for reading in 0..80 {
        let (moved, sent) = match reading % 8 {
            0 => (false, true),
            4 => (true, false),
            _ => (false, false),
        };
        answered.m.on_counters(moved, sent, answered.now);
        answered.run(ms(250));
    }
    assert_eq!(answered.probes, n, "answered sparse traffic needs no probe");
}

#[test]
fn an_rtt_spike_never_moves_traffic_a_sustained_slowdown_does() {
    // Two paths of equal RTT; the active (private) one slows down for less than SLOW_HOLD (a loaded host,
    // a burst on the link): traffic stays. Every move is a WireGuard update, so noise must not cause any.
    let mut s = Sim::new(&[PRIV, PUB]);
    s.run(ms(3000));
    assert_eq!(s.active().as_deref(), Some(PRIV));
    let moves = s.endpoints.len();
    for _ in 0..5 {
        s.set(PRIV, Some(ms(40)));
        s.run(SLOW_HOLD - ms(1000));
        s.set(PRIV, Some(ms(1)));
        s.run(ms(1500));
    }
    assert_eq!(s.active().as_deref(), Some(PRIV));
    assert_eq!(s.endpoints.len(), moves, "spikes moved the endpoint");
    // Slow for good: moves after the hold (not before), and back once the path is fast again.
    s.set(PRIV, Some(ms(40)));
    let slowed = s.now;
    let mut moved = None;
    for _ in 0..200 {
        s.run(ms(50));
        if s.active().as_deref() == Some(PUB) {
            moved = Some(s.since(slowed));
            break;
        }
    }
    let moved = moved.expect("moved off the slow path");
    assert!(
        moved >= SLOW_HOLD && moved <= SLOW_HOLD + ms(2000),
        "moved after {moved:?}"
    );
    assert_eq!(s.m.failovers, 0, "a slow path is no failover");
    s.set(PRIV, Some(ms(1)));
    let fast = s.now;
    let mut back = None;
    for _ in 0..200 {
        s.run(ms(50));
        if s.active().as_deref() == Some(PRIV) {
            back = Some(s.since(fast));
            break;
        }
    }
    let back = back.expect("moved back");
    assert!(back >= BACK_HOLD, "moved back after {back:?}");
}
