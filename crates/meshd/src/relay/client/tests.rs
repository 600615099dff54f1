//! The relayed node's side: requests, grants, and the relayed path's probes, in simulated time.
use super::*;
use crate::identity::PrivateKey;

fn key(i: u8) -> PublicKey {
    PrivateKey([i; 32]).public()
}

/// Nonces 1, 2, 3, ... (what the mesh's counter hands out).
/// WireGuard's last handshake, the counters unread (the receive rule does not apply).
fn handshake(at: Option<Instant>) -> Heard {
    Heard {
        last_handshake: at,
        last_received: None,
    }
}

fn nonces() -> impl FnMut() -> u64 {
    let mut n = 0;
    move || {
        n += 1;
        n
    }
}

fn granted(other: PublicKey, port: u16) -> Alloc {
    Alloc {
        other,
        result: AllocResult::Granted,
        port,
        lifetime_s: 60,
    }
}

#[test]
fn asks_until_granted_refreshes_while_relayed_and_stops_when_direct() {
    let (b, r, r2) = (key(2), key(3), key(4));
    let to: SocketAddr = "198.51.100.1:51821".parse().unwrap();
    let to2: SocketAddr = "198.51.100.2:51821".parse().unwrap();
    let mut c = Client::default();
    let mut nonce = nonces();
    let t = Instant::now();
    let wanted = BTreeMap::from([(b, (r, to))]);
    let (due, changed) = c.poll(t, &wanted, &mut nonce);
    assert_eq!(due.len(), 1);
    assert!(!changed);
    let first = due[0];
    // Not again before RETRY; again after it (no answer).
    assert!(c.poll(t + RETRY / 2, &wanted, &mut nonce).0.is_empty());
    let (due, _) = c.poll(t + RETRY, &wanted, &mut nonce);
    assert_eq!(due.len(), 1);
    let second = due[0];
    // Answers that do not match the request are ignored: wrong relay, wrong source, wrong target,
    // wrong pair, unknown nonce.
    let at = t + RETRY;
    assert_eq!(
        c.on_answer(at, r2, to, second.nonce, Some(to), &granted(b, 9)),
        None
    );
    assert_eq!(
        c.on_answer(at, r, to2, second.nonce, Some(to), &granted(b, 9)),
        None
    );
    assert_eq!(
        c.on_answer(at, r, to, second.nonce, Some(to2), &granted(b, 9)),
        None
    );
    assert_eq!(
        c.on_answer(at, r, to, second.nonce, Some(to), &granted(key(5), 9)),
        None
    );
    assert_eq!(c.on_answer(at, r, to, 999, Some(to), &granted(b, 9)), None);
    assert!(c.endpoints().is_empty());
    // The first request's (late) answer still counts, once.
    assert_eq!(
        c.on_answer(at, r, to, first.nonce, Some(to), &granted(b, 40001)),
        Some(true)
    );
    assert_eq!(
        c.on_answer(at, r, to, first.nonce, Some(to), &granted(b, 40001)),
        None
    );
    let ep: SocketAddr = "198.51.100.1:40001".parse().unwrap();
    assert_eq!(c.endpoints(), BTreeMap::from([(b, (r, ep))]));
    // Refreshed at a third of the lifetime, not before.
    assert!(
        c.poll(at + Duration::from_secs(19), &wanted, &mut nonce)
            .0
            .is_empty()
    );
    let (due, changed) = c.poll(at + Duration::from_secs(20), &wanted, &mut nonce);
    assert_eq!((due.len(), changed), (1, false));
    // No answer to any refresh: the grant expires with its lifetime, the endpoint goes.
    let (_, changed) = c.poll(at + Duration::from_secs(60), &wanted, &mut nonce);
    assert!(changed);
    assert!(c.endpoints().is_empty());
    // Granted again, then the peer goes direct: forgotten at once, nothing more is sent.
    let later = at + Duration::from_secs(61);
    let (due, _) = c.poll(later, &wanted, &mut nonce);
    assert_eq!(due.len(), 1);
    assert_eq!(
        c.on_answer(later, r, to, due[0].nonce, Some(to), &granted(b, 40002)),
        Some(true)
    );
    let (due, changed) = c.poll(
        later + Duration::from_secs(30),
        &BTreeMap::new(),
        &mut nonce,
    );
    assert!(due.is_empty() && changed);
    assert!(c.endpoints().is_empty() && c.views(later).is_empty());
}

#[test]
fn a_refusal_is_retried_later_and_a_new_relay_starts_over() {
    let (b, r, r2) = (key(2), key(3), key(4));
    let to: SocketAddr = "198.51.100.1:51821".parse().unwrap();
    let to2: SocketAddr = "198.51.100.2:51821".parse().unwrap();
    let mut c = Client::default();
    let mut nonce = nonces();
    let t = Instant::now();
    let wanted = BTreeMap::from([(b, (r, to))]);
    let (due, _) = c.poll(t, &wanted, &mut nonce);
    let no = Alloc {
        other: b,
        result: AllocResult::NotRelay,
        port: 0,
        lifetime_s: 0,
    };
    assert_eq!(
        c.on_answer(t, r, to, due[0].nonce, Some(to), &no),
        Some(false)
    );
    assert_eq!(c.views(t)[0].refused, Some(AllocResult::NotRelay));
    assert!(c.poll(t + RETRY, &wanted, &mut nonce).0.is_empty());
    assert_eq!(c.poll(t + REFUSED_RETRY, &wanted, &mut nonce).0.len(), 1);
    // Granted by r, then the plan picks r2: r's endpoint goes, r2 is asked at once.
    let at = t + REFUSED_RETRY;
    let (due, _) = c.poll(at + RETRY, &wanted, &mut nonce);
    assert_eq!(
        c.on_answer(at, r, to, due[0].nonce, Some(to), &granted(b, 7)),
        Some(true)
    );
    let moved = BTreeMap::from([(b, (r2, to2))]);
    let (due, changed) = c.poll(at + RETRY, &moved, &mut nonce);
    assert!(changed);
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].relay, due[0].to), (r2, to2));
    assert!(c.endpoints().is_empty());
}

/// A client granted for peer `key(2)` through relay `key(3)` (probe address 198.51.100.1:51822) at
/// port 40001, at `t`: the client, the peer, the relay and the relayed endpoint.
fn granted_pair(t: Instant) -> (Client, PublicKey, PublicKey, SocketAddr) {
    let (b, r) = (key(2), key(3));
    let to: SocketAddr = "198.51.100.1:51822".parse().unwrap();
    let mut c = Client::default();
    granted_at(&mut c, t, b, r, to, 40001);
    (c, b, r, "198.51.100.1:40001".parse().unwrap())
}

/// Granted for `b` through `r` at `ep` (request sent at `t`).
fn granted_at(c: &mut Client, t: Instant, b: PublicKey, r: PublicKey, to: SocketAddr, port: u16) {
    let wanted = BTreeMap::from([(b, (r, to))]);
    let (due, _) = c.poll(t, &wanted, || 1000 + u64::from(port));
    assert_eq!(
        c.on_answer(t, r, to, due[0].nonce, Some(to), &granted(b, port)),
        Some(true)
    );
}

#[test]
fn the_relayed_path_is_probed_through_the_relay_and_a_dead_one_excluded() {
    let (b, r, r2) = (key(2), key(3), key(4));
    let to: SocketAddr = "198.51.100.1:51822".parse().unwrap();
    let to2: SocketAddr = "198.51.100.2:51822".parse().unwrap();
    let ep: SocketAddr = "198.51.100.1:40001".parse().unwrap();
    let mut c = Client::default();
    let mut nonce = nonces();
    let t = Instant::now();
    granted_at(&mut c, t, b, r, to, 40001);
    assert_eq!(c.path_state(&b), Some(PathState::Unknown));
    // Pinged at once, at the relay port, then every PATH_EVERY.
    let (pings, _) = c.probe_paths(t, |_| handshake(Some(t)), &mut nonce);
    assert_eq!(pings.len(), 1);
    assert_eq!((pings[0].peer, pings[0].to), (b, ep));
    assert!(
        c.probe_paths(t + PATH_EVERY / 2, |_| handshake(Some(t)), &mut nonce)
            .0
            .is_empty()
    );
    // A pong from elsewhere, or not echoing the relay port, or for no ping of ours: not taken.
    let at = t + Duration::from_millis(20);
    assert_eq!(c.on_pong(at, b, to, pings[0].nonce, Some(ep)), None);
    assert_eq!(c.on_pong(at, b, ep, pings[0].nonce, Some(to)), None);
    assert_eq!(c.on_pong(at, b, ep, 4242, Some(ep)), None);
    assert_eq!(c.on_pong(at, r, ep, pings[0].nonce, Some(ep)), None);
    // The right one: alive.
    assert_eq!(c.on_pong(at, b, ep, pings[0].nonce, Some(ep)), Some(true));
    assert_eq!(c.path_state(&b), Some(PathState::Alive));
    assert_eq!(c.views(at)[0].rtt, Some(Duration::from_millis(20)));
    assert!(c.excluded(at).is_empty());
    // The relay stops forwarding: 3 pings in a row without a pong, the path is dead (2-2.5 s).
    let mut now = t + PATH_EVERY;
    let died = loop {
        let (_, failed) = c.probe_paths(now, |_| handshake(Some(t)), &mut nonce);
        if !failed.is_empty() {
            assert_eq!(
                failed,
                vec![Failed {
                    peer: b,
                    relay: r,
                    reason: PathState::Dead,
                    why: "no pongs through the relay",
                }]
            );
            break now;
        }
        now += Duration::from_millis(250);
        assert!(now < t + Duration::from_secs(5), "never declared dead");
    };
    assert_eq!(c.path_state(&b), Some(PathState::Dead));
    let took = died - (t + PATH_EVERY);
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_millis(2500),
        "{took:?}"
    );
    // No relayed endpoint any more (the peer is down), and the relay is excluded for the pair.
    assert!(c.endpoints().is_empty());
    assert_eq!(c.excluded(died)[&b], BTreeSet::from([r]));
    // The plan moves the pair to r2; alive there, r stays excluded after the hold.
    granted_at(&mut c, died, b, r2, to2, 40009);
    let (pings, _) = c.probe_paths(died, |_| handshake(Some(t)), &mut nonce);
    assert_eq!(pings.len(), 1);
    let ep2: SocketAddr = "198.51.100.2:40009".parse().unwrap();
    assert_eq!(
        c.on_pong(died, b, ep2, pings[0].nonce, Some(ep2)),
        Some(true)
    );
    let later = died + FAILED_HOLD + Duration::from_secs(1);
    assert_eq!(c.excluded(later)[&b], BTreeSet::from([r]));
    // Without another live relay the exclusion ends with the hold.
    c.poll(later, &BTreeMap::new(), &mut nonce);
    c.probe_paths(later, |_| handshake(Some(t)), &mut nonce);
    assert!(c.excluded(later).is_empty());
}

#[test]
fn a_relayed_path_that_never_answered_excludes_nothing_and_comes_alive_later() {
    let t = Instant::now();
    let (mut c, b, r, ep) = granted_pair(t);
    let mut nonce = nonces();
    let mut now = t;
    let mut last = 0;
    while now < t + Duration::from_secs(4) {
        if let Some(p) = c
            .probe_paths(now, |_| handshake(Some(t)), &mut nonce)
            .0
            .first()
        {
            last = p.nonce;
        }
        now += Duration::from_millis(250);
    }
    assert_eq!(c.path_state(&b), Some(PathState::Dead));
    assert!(c.excluded(now).is_empty(), "never alive: nothing excluded");
    // The other party arrives: the next pong brings it alive, the endpoint back.
    assert_eq!(c.on_pong(now, b, ep, last, Some(ep)), Some(true));
    assert_eq!(c.endpoints()[&b], (r, ep));
}

/// Probes `b`'s relayed path through `ep` from `from` until `until` (every 250 ms), each ping answered at
/// once, WireGuard as `heard` says; returns when the path's state changed, if it did.
fn answered_until(
    c: &mut Client,
    (b, ep): (PublicKey, SocketAddr),
    (from, until): (Instant, Instant),
    heard: impl Fn(Instant) -> Heard,
    nonce: &mut impl FnMut() -> u64,
) -> Option<Instant> {
    let mut now = from;
    while now < until {
        let (pings, failed) = c.probe_paths(now, |_| heard(now), &mut *nonce);
        if !failed.is_empty() {
            assert!(
                failed
                    .iter()
                    .all(|f| f.peer == b && f.reason == PathState::NoHandshake)
            );
            return Some(now);
        }
        for p in pings {
            c.on_pong(now, b, ep, p.nonce, Some(ep));
        }
        now += Duration::from_millis(250);
    }
    None
}

#[test]
fn a_relayed_path_that_answers_probes_but_carries_no_handshake_is_left() {
    // A relay that forwards the probes (their size tells them apart) and drops WireGuard's datagrams.
    let t = Instant::now();
    let (mut c, b, r, ep) = granted_pair(t);
    let mut nonce = nonces();
    let (pings, _) = c.probe_paths(t, |_| handshake(None), &mut nonce);
    assert_eq!(c.on_pong(t, b, ep, pings[0].nonce, Some(ep)), Some(true));
    // The probes keep answering; no handshake ever completes: the path is given
    // FIRST_HANDSHAKE_WITHIN from when it came alive.
    let step = Duration::from_millis(250);
    let left = answered_until(
        &mut c,
        (b, ep),
        (t + step, t + Duration::from_secs(60)),
        |_| handshake(None),
        &mut nonce,
    )
    .expect("a path without handshakes is never left");
    let took = left - t;
    assert!(
        took >= FIRST_HANDSHAKE_WITHIN && took <= FIRST_HANDSHAKE_WITHIN + step,
        "{took:?}"
    );
    assert_eq!(c.path_state(&b), Some(PathState::NoHandshake));
    assert_eq!(c.views(left)[0].path.as_str(), "no-handshake");
    // No relayed endpoint (the peer is down), and the relay is excluded for the pair.
    assert!(c.endpoints().is_empty());
    assert_eq!(c.excluded(left)[&b], BTreeSet::from([r]));
    assert_eq!(
        c.exclusions(left),
        vec![Exclusion {
            peer: b,
            relay: r,
            reason: PathState::NoHandshake,
            left: NO_HANDSHAKE_HOLD,
        }]
    );
    // Its pongs keep coming: they do not bring it back.
    let (pings, _) = c.probe_paths(left + PATH_EVERY, |_| handshake(None), &mut nonce);
    assert_eq!(
        c.on_pong(left + PATH_EVERY, b, ep, pings[0].nonce, Some(ep)),
        Some(false)
    );
    assert_eq!(c.path_state(&b), Some(PathState::NoHandshake));
    // With no other relay it stays excluded for NO_HANDSHAKE_HOLD (not just FAILED_HOLD: it answers
    // probes, so it would be taken again at once), then it may be tried again.
    let later = left + FAILED_HOLD + Duration::from_secs(1);
    c.poll(later, &BTreeMap::new(), &mut nonce);
    c.probe_paths(later, |_| handshake(None), &mut nonce);
    assert_eq!(c.excluded(later)[&b], BTreeSet::from([r]));
    let after = left + NO_HANDSHAKE_HOLD;
    c.probe_paths(after, |_| handshake(None), &mut nonce);
    assert!(c.excluded(after).is_empty());
}

#[test]
fn a_relayed_path_keeps_a_valid_session_and_must_renew_it() {
    let mut nonce = nonces();
    let t = Instant::now() + Duration::from_secs(1000);
    // Granted, and alive at `t`.
    let alive = |nonce: &mut dyn FnMut() -> u64| {
        let (mut c, b, _, ep) = granted_pair(t);
        let (pings, _) = c.probe_paths(t, |_| handshake(None), &mut *nonce);
        assert_eq!(c.on_pong(t, b, ep, pings[0].nonce, Some(ep)), Some(true));
        (c, b, ep)
    };
    // An idle session on boringtun: it expires at 180 s and the next persistent keepalive (25 s)
    // starts a new one, 205 s after the last at worst (the kernel's renews within 145 s): never left.
    // The peer's keepalives arrive every 25 s, and not at all between the old session's last (155 s)
    // and the new one (205 s): 50 s of silence, within RECEIVE_SILENT.
    let (mut c, b, ep) = alive(&mut nonce);
    let renewed = |now: Instant| {
        let age = now.saturating_duration_since(t).as_secs() % 205;
        let heard = if age >= 155 { 155 } else { age - age % 25 };
        Heard {
            last_handshake: Some(now - Duration::from_secs(age)),
            last_received: Some(now - Duration::from_secs(age - heard)),
        }
    };
    assert_eq!(
        answered_until(
            &mut c,
            (b, ep),
            (t, t + Duration::from_secs(600)),
            renewed,
            &mut nonce
        ),
        None
    );
    assert_eq!(c.path_state(&b), Some(PathState::Alive));
    // A session from before the relay (a direct path's, 100 s old) holds while it is valid, but it
    // must be renewed through the relay: left HANDSHAKE_STALE after that handshake, not earlier.
    let (mut c, b, ep) = alive(&mut nonce);
    let old = t - Duration::from_secs(100);
    let left = answered_until(
        &mut c,
        (b, ep),
        (t, t + Duration::from_secs(600)),
        |_| handshake(Some(old)),
        &mut nonce,
    )
    .expect("a session never renewed through the relay is never left");
    let took = left - old;
    assert!(
        took >= HANDSHAKE_STALE && took <= HANDSHAKE_STALE + Duration::from_millis(250),
        "{took:?}"
    );
    assert_eq!(c.path_state(&b), Some(PathState::NoHandshake));
}

/// A relay that starts dropping WireGuard under a running session: the session stays valid for minutes,
/// but the peer's keepalives (25 s) stop arriving, so the path is left RECEIVE_SILENT after the last
/// datagram received, long before the handshake would go stale.
#[test]
fn a_running_session_that_stops_receiving_is_left_after_the_receive_silence() {
    let mut nonce = nonces();
    let t = Instant::now() + Duration::from_secs(1000);
    let (mut c, b, r, ep) = granted_pair(t);
    let (pings, _) = c.probe_paths(t, |_| handshake(Some(t)), &mut nonce);
    assert_eq!(c.on_pong(t, b, ep, pings[0].nonce, Some(ep)), Some(true));
    // Keepalives every 25 s until the relay starts dropping at t + 100 s (the last one at t + 100 s).
    let stop = t + Duration::from_secs(100);
    let heard = |now: Instant| {
        let last = now.min(stop);
        let age = last.saturating_duration_since(t).as_secs();
        Heard {
            last_handshake: Some(t),
            last_received: Some(t + Duration::from_secs(age - age % 25)),
        }
    };
    let left = answered_until(
        &mut c,
        (b, ep),
        (t, t + Duration::from_secs(600)),
        heard,
        &mut nonce,
    )
    .expect("a path that stopped carrying WireGuard is never left");
    let took = left - stop;
    assert!(
        took >= RECEIVE_SILENT && took <= RECEIVE_SILENT + Duration::from_millis(250),
        "{took:?}"
    );
    assert!(
        left < t + HANDSHAKE_STALE,
        "before the handshake went stale"
    );
    assert_eq!(c.path_state(&b), Some(PathState::NoHandshake));
    assert_eq!(c.excluded(left)[&b], BTreeSet::from([r]));
    // Unread counters (last_received unknown) apply no receive rule: the session holds until it is stale.
    let (mut c, b, _, ep) = granted_pair(t);
    let (pings, _) = c.probe_paths(t, |_| handshake(Some(t)), &mut nonce);
    assert_eq!(c.on_pong(t, b, ep, pings[0].nonce, Some(ep)), Some(true));
    let left = answered_until(
        &mut c,
        (b, ep),
        (t, t + Duration::from_secs(600)),
        |_| handshake(Some(t)),
        &mut nonce,
    );
    assert_eq!(left.map(|l| l - t), Some(HANDSHAKE_STALE));
}
