use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

fn table(addrs: &[&str]) -> (Table, Instant) {
    let now = Instant::now();
    let mut t = Table::new(Policy::default());
    let desired: Vec<_> = addrs
        .iter()
        .map(|a| (addr(a), format!("endpoint {a}")))
        .collect();
    t.reconcile(&desired, now);
    (t, now)
}

const A: &str = "192.0.2.11:6443";
const B: &str = "192.0.2.12:6443";
const C: &str = "192.0.2.13:6443";

#[test]
fn new_upstreams_are_usable_and_first_success_brings_them_up() {
    let (mut t, now) = table(&[A]);
    assert_eq!(t.get(addr(A)).map(|u| u.state), Some(State::Unknown));
    assert_eq!(t.plan().len(), 1);
    let tr = t.observe(addr(A), Ok(us(50)), Signal::Probe, now);
    assert_eq!(
        tr,
        Some(Transition {
            addr: addr(A),
            from: State::Unknown,
            to: State::Up
        })
    );
}

#[test]
fn fall_and_rise_hysteresis() {
    let (mut t, now) = table(&[A]);
    t.observe(addr(A), Ok(us(50)), Signal::Probe, now);
    assert_eq!(
        t.observe(addr(A), Err("refused".into()), Signal::Probe, now),
        None
    );
    // A success in between resets the failure streak.
    assert_eq!(t.observe(addr(A), Ok(us(50)), Signal::Probe, now), None);
    assert_eq!(
        t.observe(addr(A), Err("refused".into()), Signal::Probe, now),
        None
    );
    let down = t.observe(addr(A), Err("refused".into()), Signal::Dial, now);
    assert_eq!(down.map(|t| t.to), Some(State::Down));
    assert_eq!(t.get(addr(A)).map(|u| u.dial_errors), Some(1));
    assert_eq!(t.observe(addr(A), Ok(us(50)), Signal::Probe, now), None);
    let up = t.observe(addr(A), Ok(us(50)), Signal::Probe, now);
    assert_eq!(up.map(|t| t.to), Some(State::Up));
}

#[test]
fn going_down_cancels_connections_and_later_ones_get_a_fresh_token() {
    let (mut t, now) = table(&[A, B]);
    t.observe(addr(A), Ok(us(50)), Signal::Probe, now);
    let conn = t.open(addr(A)).expect("known upstream");
    let other = t.open(addr(B)).expect("known upstream");
    t.observe(addr(A), Err("timeout".into()), Signal::Probe, now);
    assert!(!conn.is_cancelled());
    t.observe(addr(A), Err("timeout".into()), Signal::Probe, now);
    assert!(
        conn.is_cancelled(),
        "connections through a down upstream are closed"
    );
    assert!(!other.is_cancelled());
    let later = t.open(addr(A)).expect("known upstream");
    assert!(!later.is_cancelled());
}

#[test]
fn reconcile_keeps_state_of_upstreams_that_stay_and_cancels_removed_ones() {
    let (mut t, now) = table(&[A, B]);
    t.observe(addr(A), Ok(us(50)), Signal::Probe, now);
    let a_conn = t.open(addr(A)).expect("known");
    let b_conn = t.open(addr(B)).expect("known");
    let changes = t.reconcile(
        &[
            (addr(A), "endpoint".into()),
            (addr(C), "member cp-3".into()),
        ],
        now,
    );
    assert_eq!(changes.added, vec![addr(C)]);
    assert_eq!(changes.removed, vec![addr(B)]);
    assert!(!a_conn.is_cancelled());
    assert!(b_conn.is_cancelled());
    let a = t.get(addr(A)).expect("kept");
    assert_eq!((a.state, a.active), (State::Up, 1));
    assert!(
        t.reconcile(&[(addr(A), "x".into()), (addr(C), "y".into())], now)
            .is_empty()
    );
}

#[test]
fn same_address_from_two_sources_is_one_upstream() {
    let now = Instant::now();
    let mut t = Table::new(Policy::default());
    t.reconcile(
        &[
            (addr(A), "endpoint".into()),
            (addr(A), "member cp-1".into()),
        ],
        now,
    );
    assert_eq!(t.len(), 1);
    assert_eq!(t.get(addr(A)).map(|u| u.sources.len()), Some(2));
}

#[test]
fn plan_prefers_lowest_rtt_and_puts_down_ones_last_by_last_success() {
    let (mut t, now) = table(&[A, B, C]);
    t.observe(addr(A), Ok(ms(5)), Signal::Probe, now);
    t.observe(addr(B), Ok(us(100)), Signal::Probe, now);
    t.observe(addr(C), Ok(ms(1)), Signal::Probe, now);
    let order: Vec<_> = t.plan().iter().map(|a| a.addr).collect();
    assert_eq!(order, vec![addr(B), addr(C), addr(A)]);
    // B and C go down; C succeeded later than B.
    for _ in 0..2 {
        t.observe(addr(B), Err("x".into()), Signal::Probe, now);
    }
    t.observe(addr(C), Ok(ms(1)), Signal::Probe, now + ms(10));
    for _ in 0..2 {
        t.observe(addr(C), Err("x".into()), Signal::Probe, now + ms(20));
    }
    let order: Vec<_> = t.plan().iter().map(|a| a.addr).collect();
    assert_eq!(order, vec![addr(A), addr(C), addr(B)]);
}

#[test]
fn all_down_still_yields_every_upstream() {
    let (mut t, now) = table(&[A, B]);
    for a in [A, B] {
        for _ in 0..2 {
            t.observe(addr(a), Err("x".into()), Signal::Probe, now);
        }
    }
    assert_eq!(t.usable(), 0);
    assert_eq!(t.plan().len(), 2);
}

#[test]
fn near_equal_upstreams_share_the_load() {
    let (mut t, now) = table(&[A, B, C]);
    t.observe(addr(A), Ok(us(300)), Signal::Probe, now);
    t.observe(addr(B), Ok(us(320)), Signal::Probe, now);
    t.observe(addr(C), Ok(ms(20)), Signal::Probe, now);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..100 {
        let first = t.plan()[0].addr;
        t.open(first);
        *counts.entry(first).or_insert(0) += 1;
    }
    assert_eq!(counts.get(&addr(C)), None, "the far upstream gets nothing");
    assert_eq!(counts.get(&addr(A)), Some(&50));
    assert_eq!(counts.get(&addr(B)), Some(&50));
}

#[test]
fn lan_differences_below_a_millisecond_are_noise_and_regions_are_not() {
    let (mut t, now) = table(&[A, B, C]);
    // Same LAN: 60 us and 900 us differ by scheduling noise only.
    t.observe(addr(A), Ok(us(60)), Signal::Probe, now);
    t.observe(addr(B), Ok(us(900)), Signal::Probe, now);
    // Another region: 15 ms.
    t.observe(addr(C), Ok(ms(15)), Signal::Probe, now);
    let firsts: std::collections::HashSet<_> = (0..6).map(|_| t.plan()[0].addr).collect();
    assert_eq!(firsts, [addr(A), addr(B)].into_iter().collect());
    // Between regions the factor decides: 15 ms and 17 ms are near-equal, 15 ms and 30 ms are not.
    let (mut t, now) = table(&[A, B, C]);
    t.observe(addr(A), Ok(ms(15)), Signal::Probe, now);
    t.observe(addr(B), Ok(ms(17)), Signal::Probe, now);
    t.observe(addr(C), Ok(ms(30)), Signal::Probe, now);
    let firsts: std::collections::HashSet<_> = (0..6).map(|_| t.plan()[0].addr).collect();
    assert_eq!(firsts, [addr(A), addr(B)].into_iter().collect());
}

#[test]
fn smoothed_rtt_and_adaptive_timeout() {
    let (mut t, now) = table(&[A]);
    t.observe(addr(A), Ok(ms(100)), Signal::Probe, now);
    t.observe(addr(A), Ok(ms(200)), Signal::Probe, now);
    let u = t.get(addr(A)).expect("known");
    assert_eq!(u.srtt, Some(ms(125)));
    assert_eq!(u.attempt_timeout(Duration::from_secs(5)), ms(1000));
    assert_eq!(u.attempt_timeout(ms(500)), ms(500));
    t.observe(addr(A), Ok(us(50)), Signal::Probe, now);
    let (mut t2, _) = table(&[B]);
    t2.observe(addr(B), Ok(us(50)), Signal::Probe, now);
    let b = t2.get(addr(B)).expect("known");
    assert_eq!(
        b.attempt_timeout(Duration::from_secs(1)),
        MIN_ATTEMPT_TIMEOUT
    );
    assert_eq!(b.attempt_timeout(ms(100)), ms(100));
}

#[test]
fn dedup_folds_this_nodes_address_into_loopback() {
    let own: IpAddr = "192.0.2.11".parse().expect("ip");
    let out = dedup(
        vec![
            (addr("127.0.0.1:6443"), "localhost:6443".into()),
            (addr("192.0.2.11:6443"), "member cp-1".into()),
            (addr("192.0.2.12:6443"), "member cp-2".into()),
            (addr("192.0.2.11:8443"), "endpoint".into()),
        ],
        |ip| ip == own,
    );
    assert_eq!(out[1], (addr("127.0.0.1:6443"), "member cp-1".into()));
    assert_eq!(out[2].0, addr("192.0.2.12:6443"));
    assert_eq!(
        out[3].0,
        addr("192.0.2.11:8443"),
        "another port is another server"
    );
}

#[test]
fn counters_follow_connections() {
    let (mut t, _) = table(&[A]);
    t.open(addr(A));
    t.open(addr(A));
    t.close(addr(A));
    t.failover(addr(A));
    let u = t.get(addr(A)).expect("known");
    assert_eq!((u.active, u.total, u.failovers), (1, 2, 1));
    t.close(addr("192.0.2.99:1"));
}

#[test]
fn one_noisy_sample_does_not_push_an_upstream_out_of_the_near_set() {
    let (mut t, now) = table(&[A, B]);
    for _ in 0..4 {
        t.observe(addr(A), Ok(us(150)), Signal::Probe, now);
        t.observe(addr(B), Ok(us(150)), Signal::Probe, now);
    }
    // B's next connect was measured while the node was busy.
    t.observe(addr(B), Ok(ms(5)), Signal::Probe, now);
    let b = t.get(addr(B)).expect("known").srtt.expect("measured");
    assert!(b <= us(250), "{b:?}");
    let firsts: std::collections::HashSet<_> = (0..4).map(|_| t.plan()[0].addr).collect();
    assert_eq!(firsts.len(), 2, "both still share the load");
    // A real rise shows within about ten samples (each may be up to 2 × srtt).
    for _ in 0..12 {
        t.observe(addr(B), Ok(ms(5)), Signal::Probe, now);
    }
    assert!(t.get(addr(B)).and_then(|u| u.srtt).expect("measured") > ms(2));
    // A first connect slowed by a neighbour lookup: the next real sample replaces it.
    t.observe(addr(B), Ok(us(150)), Signal::Probe, now);
    assert_eq!(t.get(addr(B)).and_then(|u| u.srtt), Some(us(150)));
}

/// Dials that time out together in a burst, while the upstream answers other dials and probes, are not
/// health signals; dials to an upstream that answers nothing since they started are.
#[test]
fn failed_dials_count_only_when_nothing_answered_since_they_started() {
    let (mut t, t0) = table(&[A]);
    t.observe(addr(A), Ok(us(50)), Signal::Probe, t0);
    let started = t0 + ms(10);
    // Another dial succeeded while these waited: the upstream was alive.
    t.observe(addr(A), Ok(us(80)), Signal::Dial, t0 + ms(20));
    for i in 0..10 {
        let tr = t.observe_failed_dial(addr(A), "timed out".into(), started, t0 + ms(260 + i));
        assert_eq!(tr, None);
    }
    let u = t.get(addr(A)).expect("A");
    assert_eq!((u.state, u.dial_errors), (State::Up, 10));
    assert!(u.streak > 0, "{}", u.streak);
    // Nothing answered since these started: they count, and `fall` of them take it down.
    let later = t0 + ms(500);
    assert_eq!(
        t.observe_failed_dial(addr(A), "timed out".into(), later, later + ms(250)),
        None
    );
    let tr = t.observe_failed_dial(addr(A), "timed out".into(), later, later + ms(251));
    assert_eq!(tr.map(|t| t.to), Some(State::Down));
}
