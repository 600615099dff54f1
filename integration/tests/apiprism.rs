//! Root tests of apiprism's failover (issue 3): three stand-in API servers, each in its own network namespace on
//! a lab bridge, apiprism in a client namespace, and kubelet-like clients through it (one long-lived HTTP/2
//! watch, plus bursts of new connections). The stand-ins are test doubles (TLS + HTTP/2 servers of our own,
//! `hybridnet_integration::apiprism`) because no real kube-apiserver can run here.
//!
//! Each scenario asserts: no failed new connection while one upstream is healthy; the dead upstream leaves the
//! rotation within 2 s; a watch through it is cut within 2 s and the client's reconnect succeeds; an upstream
//! that comes back is used again within 2 s. apiprism runs with its default health checks (1 s interval and
//! timeout, fall 2, rise 2; dial timeout 1 s).
//!
//! Needs root and the release binaries (`hack/test.sh`). Scenarios run one at a time (timing assertions on a
//! 2-core machine); the whole file takes about half a minute.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use hybridnet_integration::apiprism::Pki;
use hybridnet_integration::apiprism::lab::{ClientLog as Log, Load, Standin, beside, lock};
use hybridnet_integration::{
    ConfigDoc, Daemon, DaemonKind, LabNet, TestDir, require_root, wait_until, write_atomic,
};

/// The bound for leaving the rotation, cutting a watch, and using a returning upstream again.
const BOUND: Duration = Duration::from_secs(2);
const SOON: Duration = Duration::from_secs(10);
const API_PORT: u16 = 6443;
const LISTEN: &str = "127.0.0.1:7445";
/// The pause between bursts of 4 new connections.
const BURST_EVERY: Duration = Duration::from_millis(50);

/// Timing assertions need the machine to themselves: one scenario at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Lab {
    apiprism: Daemon,
    standins: Vec<Option<Standin>>,
    doc: ConfigDoc,
    config: PathBuf,
    pki: PathBuf,
    // Drop order: processes first, then namespaces, then files.
    net: LabNet,
    _dir: TestDir,
    _serial: MutexGuard<'static, ()>,
}

const NAMES: [&str; 3] = ["api-1", "api-2", "api-3"];

impl Lab {
    fn new() -> Result<Lab> {
        Lab::with_endpoints(3)
    }

    /// Three stand-ins, the first `endpoints` of them in apiprism's config.
    fn with_endpoints(endpoints: usize) -> Result<Lab> {
        require_root();
        let serial = serial();
        let dir = TestDir::new("apiprism");
        let net = LabNet::new(4);
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        Pki::generate().write(&pki);
        let mut standins = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            standins.push(Some(standin(&net, i, name, &pki)?));
        }
        let mut doc = ConfigDoc::new(dir.path());
        doc.apiprism_listen = vec![LISTEN.into(), "[::1]:7445".into()];
        doc.apiprism_endpoints = (0..endpoints)
            .map(|i| upstream(&net, i).to_string())
            .collect();
        // The stand-ins' CA: members (discovered upstreams) must verify against it.
        doc.apiprism_extra = vec![(
            "clusterCAFile".into(),
            pki.join("ca.pem").display().to_string(),
        )];
        let config = dir.join("config.yaml");
        write_atomic(&config, doc.render());
        let mut apiprism = Daemon::start(DaemonKind::Apiprism, &net.nodes[3].netns, &config);
        apiprism.wait_ready(SOON)?;
        let lab = Lab {
            apiprism,
            standins,
            doc,
            config,
            pki,
            net,
            _dir: dir,
            _serial: serial,
        };
        for i in 0..endpoints {
            lab.wait_state(i, "up", SOON)?;
        }
        Ok(lab)
    }

    fn upstream(&self, i: usize) -> SocketAddr {
        upstream(&self.net, i)
    }

    /// apiprism's state of upstream `i` (`up`, `down`, `unknown`; `absent` when not in its table).
    fn state(&self, i: usize) -> Result<String> {
        let metrics = self.apiprism.metrics()?;
        let needle = format!("upstream=\"{}\"", self.upstream(i));
        let state = metrics
            .series("apiprism_upstream_state")
            .find(|(labels, v)| labels.contains(&needle) && *v == 1.0)
            .and_then(|(labels, _)| labels.split("state=\"").nth(1))
            .map(|s| s.trim_end_matches("\"}").to_owned());
        Ok(state.unwrap_or_else(|| "absent".to_owned()))
    }

    /// Waits until upstream `i` is in `state`; returns how long that took.
    fn wait_state(&self, i: usize, state: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        wait_until(
            timeout,
            format!("{} {state}", self.upstream(i)),
            || match self.state(i) {
                Ok(s) if s == state => Ok(()),
                Ok(s) => Err(s),
                Err(e) => Err(e.to_string()),
            },
        )?;
        Ok(start.elapsed())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut s) = self.standins[i].take() {
            s.kill();
        }
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        self.standins[i] = Some(standin(&self.net, i, NAMES[i], &self.pki)?);
        Ok(())
    }

    /// Drops every packet from upstream `i` to the client node (a blackhole route in its namespace).
    fn blackhole(&self, i: usize, on: bool) {
        let client = format!("{}/32", self.net.nodes[3].ipv4);
        let verb = if on { "add" } else { "del" };
        self.net.nodes[i]
            .netns
            .ip(&["route", verb, "blackhole", &client]);
    }

    /// Runs the kubelet-like client in the client namespace while `scenario` runs on this thread.
    fn with_kubelet<T>(
        &mut self,
        scenario: impl FnOnce(&mut Lab, &Mutex<Log>) -> Result<T>,
    ) -> Result<(T, Log)> {
        let tls = Pki::read(&self.pki)?.client_config()?;
        let netns = self.net.nodes[3].netns.name().to_owned();
        let load = Load {
            burst: 4,
            every: BURST_EVERY,
            timeout: Duration::from_secs(5),
        };
        let result = beside(&netns, LISTEN.parse()?, tls, load, |log| {
            scenario(self, log)
        });
        if result.is_err() {
            eprintln!("--- apiprism log ---\n{}", self.apiprism.log());
        }
        result
    }

    fn rewrite_config(&mut self, endpoints: Vec<String>) {
        self.doc.apiprism_endpoints = endpoints;
        write_atomic(&self.config, self.doc.render());
    }
}

fn upstream(net: &LabNet, i: usize) -> SocketAddr {
    SocketAddr::new(net.nodes[i].ipv4.into(), API_PORT)
}

/// Stand-in `name` on upstream `i`'s address.
fn standin(net: &LabNet, i: usize, name: &str, pki: &std::path::Path) -> Result<Standin> {
    Standin::start(
        &net.nodes[i].netns,
        env!("CARGO_BIN_EXE_apiprism-standin"),
        name,
        upstream(net, i),
        pki,
    )
    .with_context(|| format!("starting apiprism-standin {name}"))
}

/// The upstream the current watch goes through, once it streams.
fn watch_server(log: &Mutex<Log>) -> Result<String> {
    wait_until(SOON, "the watch streaming", || {
        lock(log)
            .connected
            .last()
            .map(|(_, s)| s.clone())
            .ok_or("no watch yet")
    })
    .map_err(Into::into)
}

fn index_of(name: &str) -> Result<usize> {
    NAMES
        .iter()
        .position(|n| *n == name)
        .with_context(|| format!("unknown server {name}"))
}

/// The watch was cut after `t0` and reconnected to another server: (cut latency, new server).
fn watch_moved(log: &Mutex<Log>, t0: Instant, from: &str) -> Result<(Duration, String)> {
    let cut = wait_until(SOON, "the watch cut", || {
        lock(log)
            .cut
            .iter()
            .find(|(at, _)| *at >= t0)
            .map(|(at, e)| (*at, e.clone()))
            .ok_or("not cut yet")
    })?;
    let server = wait_until(SOON, "the watch reconnected", || {
        lock(log)
            .connected
            .iter()
            .find(|(at, _)| *at >= cut.0)
            .map(|(_, s)| s.clone())
            .ok_or("not reconnected yet")
    })?;
    ensure!(
        server != from,
        "the watch reconnected to {server}, the dead upstream"
    );
    Ok((cut.0 - t0, server))
}

/// Waits until a new connection that started after `t0` was served by `name`; returns how long after `t0`.
fn used_again(log: &Mutex<Log>, t0: Instant, name: &str) -> Result<Duration> {
    let start = wait_until(SOON, format!("a connection served by {name}"), || {
        lock(log)
            .requests
            .iter()
            .filter(|(start, _, r)| *start >= t0 && r.as_deref() == Ok(name))
            .map(|(start, _, _)| *start)
            .min()
            .ok_or("not yet")
    })?;
    Ok(start - t0)
}

/// Fails on any failed connection that ended before `fault` (nothing may fail while all is well) and on any
/// failed new connection that started after `t0` (by then apiprism has taken the upstream out). Connections
/// in flight through the dead or removed upstream between `fault` and `t0` are cut, by design. Returns
/// (connections since `t0`, cut between `fault` and `t0`).
fn no_failures(log: &Log, fault: Instant, t0: Instant) -> Result<(usize, usize)> {
    let after: Vec<_> = log.requests.iter().filter(|r| r.0 >= t0).collect();
    let cut_by_design = log
        .requests
        .iter()
        .filter(|r| r.0 < t0 && r.1 >= fault && r.2.is_err())
        .count();
    let failed: Vec<_> = after.iter().filter(|r| r.2.is_err()).collect();
    if let Some((start, end, Err(e))) = failed.first() {
        bail!(
            "{} of {} new connections failed; first {:?} after the fault, after {:?}: {e}",
            failed.len(),
            after.len(),
            *start - t0,
            *end - *start
        );
    }
    let before_failed = log
        .requests
        .iter()
        .filter(|r| r.1 < fault && r.2.is_err())
        .count();
    ensure!(
        before_failed == 0,
        "{before_failed} connections failed before the fault"
    );
    Ok((after.len(), cut_by_design))
}

fn settle() {
    std::thread::sleep(Duration::from_millis(500)); // traffic before the fault
}

/// Common to the SIGKILL and blackhole scenarios. `cuts`: apiprism itself closes the watch's connection (a
/// blackholed upstream never resets it; a killed one's kernel does, possibly before apiprism marks it down),
/// so `apiprism_connections_cut_total` counts it.
fn fail_one(
    fault: impl Fn(&mut Lab, usize),
    repair: impl Fn(&mut Lab, usize) -> Result<()>,
    what: &str,
    cuts: bool,
) -> Result<()> {
    let mut lab = Lab::new()?;
    let ((out, t0, down, cut, back), log) = lab.with_kubelet(|lab, log| {
        let server = watch_server(log)?;
        let victim = index_of(&server)?;
        settle();
        let t0 = Instant::now();
        fault(lab, victim);
        let down = lab.wait_state(victim, "down", SOON)?;
        let (cut, to) = watch_moved(log, t0, &server)?;
        settle();
        let t1 = Instant::now();
        repair(lab, victim)?;
        let back = used_again(log, t1, &server)?;
        settle();
        Ok((
            format!("{server} {what}; watch moved to {to}"),
            t0,
            down,
            cut,
            back,
        ))
    })?;
    let (total, cut_in_flight) = no_failures(&log, t0, t0)?;
    eprintln!(
        "apiprism {what}: {out}; out of rotation after {down:?}, watch cut after {cut:?}, used again {back:?} \
         after its return; {total} new connections after the fault, none failed ({cut_in_flight} in flight \
         through it were cut)"
    );
    if down > BOUND || cut > BOUND || back > BOUND {
        eprintln!("--- apiprism log ---\n{}", lab.apiprism.log());
    }
    ensure!(down <= BOUND, "{what}: out of rotation after {down:?}");
    ensure!(cut <= BOUND, "{what}: watch cut after {cut:?}");
    ensure!(
        back <= BOUND,
        "{what}: used again {back:?} after its return"
    );
    let counted = lab
        .apiprism
        .metrics()?
        .value("apiprism_connections_cut_total");
    eprintln!("apiprism {what}: apiprism_connections_cut_total {counted}");
    if cuts {
        ensure!(
            counted >= 1.0,
            "{what}: the watch apiprism cut is not counted (apiprism_connections_cut_total {counted})"
        );
    }
    Ok(())
}

#[test]
fn sigkilled_upstream_fails_over_without_a_failed_connection() -> Result<()> {
    fail_one(
        |lab, i| lab.kill(i),
        |lab, i| lab.restart(i),
        "SIGKILLed",
        false,
    )
}

#[test]
fn blackholed_upstream_fails_over_without_a_failed_connection() -> Result<()> {
    fail_one(
        |lab, i| lab.blackhole(i, true),
        |lab, i| {
            lab.blackhole(i, false);
            Ok(())
        },
        "blackholed",
        true,
    )
}

#[test]
fn upstream_removed_from_config_is_cut_and_readded_is_used() -> Result<()> {
    let mut lab = Lab::new()?;
    let all: Vec<String> = (0..3).map(|i| lab.upstream(i).to_string()).collect();
    let ((written, t0, removed, cut, to, back), log) = lab.with_kubelet(|lab, log| {
        let server = watch_server(log)?;
        let victim = index_of(&server)?;
        settle();
        let written = Instant::now();
        let rest: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, a)| a.clone())
            .collect();
        lab.rewrite_config(rest);
        let removed = lab.wait_state(victim, "absent", SOON)?;
        // Connections through it until apiprism applied the new file are cut on purpose: count new
        // connections from then on.
        let t0 = Instant::now();
        let (cut, to) = watch_moved(log, written, &server)?;
        settle();
        let t1 = Instant::now();
        lab.rewrite_config(all.clone());
        let back = used_again(log, t1, &server)?;
        Ok((written, t0, removed, cut, to, back))
    })?;
    let (total, cut_in_flight) = no_failures(&log, written, t0)?;
    eprintln!(
        "apiprism removal: removed after {removed:?}, watch cut after {cut:?} (moved to {to}), re-added and used \
         after {back:?}; {total} new connections after the removal, none failed ({cut_in_flight} in flight \
         through it were cut)"
    );
    if removed > BOUND || cut > BOUND || back > BOUND {
        eprintln!("--- apiprism log ---\n{}", lab.apiprism.log());
        if let Ok(m) = lab.apiprism.metrics() {
            for name in [
                "apiprism_upstream_rtt_seconds",
                "apiprism_upstream_active_connections",
            ] {
                for (labels, v) in m.series(name) {
                    eprintln!("{name}{labels} {v}");
                }
            }
        }
    }
    ensure!(removed <= BOUND, "removed after {removed:?}");
    ensure!(cut <= BOUND, "watch cut after {cut:?}");
    ensure!(back <= BOUND, "re-added and used after {back:?}");
    Ok(())
}

#[test]
fn all_down_then_one_back_is_used_at_once() -> Result<()> {
    let mut lab = Lab::new()?;
    let ((back, watch_back), log) = lab.with_kubelet(|lab, log| {
        watch_server(log)?;
        settle();
        for i in 0..3 {
            lab.kill(i);
        }
        for i in 0..3 {
            lab.wait_state(i, "down", SOON)?;
        }
        settle();
        let t1 = Instant::now();
        lab.restart(1)?;
        let back = used_again(log, t1, NAMES[1])?;
        let watch_back = wait_until(SOON, "the watch back", || {
            lock(log)
                .connected
                .iter()
                .find(|(at, s)| *at >= t1 && s == NAMES[1])
                .map(|(at, _)| *at - t1)
                .ok_or("not yet")
        })?;
        Ok((back, watch_back))
    })?;
    eprintln!(
        "apiprism all down, one back: used again after {back:?}, watch back after {watch_back:?}; {} new \
         connections (those while all were down fail)",
        log.requests.len()
    );
    ensure!(back <= BOUND, "used again {back:?} after its return");
    ensure!(
        watch_back <= BOUND,
        "watch back {watch_back:?} after the return"
    );
    Ok(())
}

#[test]
fn status_shows_the_upstream_table() -> Result<()> {
    let lab = Lab::new()?;
    let want: Vec<String> = (0..3).map(|i| lab.upstream(i).to_string()).collect();
    // The status record is written shortly after a change: wait for the one with all three up.
    let text = wait_until(SOON, "`apiprism status` with 3/3 upstreams up", || {
        let out = Command::new(hybridnet_integration::bin_path(DaemonKind::Apiprism))
            .args(["status", "--config"])
            .arg(&lab.config)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let complete = out.status.success()
            && text.contains("UPSTREAM")
            && text.contains("3/3 upstreams up")
            && want.iter().all(|a| text.contains(a.as_str()));
        if complete {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    })?;
    eprintln!("{text}");
    Ok(())
}

/// meshd's control-plane members become upstreams (meshd does not write the record yet: the test does), and a
/// member that leaves is removed with its connections.
#[test]
fn members_from_meshd_become_upstreams() -> Result<()> {
    use hybridnet_state::{MEMBERS, Member, Members, StateDir};
    let lab = Lab::with_endpoints(2)?;
    let state = StateDir::new(&lab.doc.state_dir);
    let member = |name: &str, i: usize, control_plane: bool| Member {
        name: name.to_owned(),
        addresses: vec![lab.net.nodes[i].ipv4.into()],
        control_plane,
        api_server_port: Some(API_PORT),
        ..Default::default()
    };
    ensure!(
        lab.state(2)? == "absent",
        "upstream 3 before the members record"
    );
    let members = Members {
        members: vec![
            member("cp-1", 0, true), // also a configured endpoint: one upstream, two sources
            member("cp-3", 2, true),
            member("worker", 3, false),
        ],
    };
    state.write(MEMBERS.0, MEMBERS.1, &members)?;
    let added = lab.wait_state(2, "up", SOON)?;
    let metrics = lab.apiprism.metrics()?;
    ensure!(
        metrics.value("apiprism_upstreams") == 3.0,
        "upstreams: {:?}",
        metrics.get("apiprism_upstreams")
    );
    state.write(
        MEMBERS.0,
        MEMBERS.1,
        &Members {
            members: vec![member("cp-1", 0, true)],
        },
    )?;
    let removed = lab.wait_state(2, "absent", SOON)?;
    ensure!(lab.state(0)? == "up", "the configured endpoint stays");
    eprintln!("apiprism members: cp-3 added and up after {added:?}, removed after {removed:?}");
    Ok(())
}

/// Issue 15, upgrades that cut nothing: a new instance started beside the running one (as a DaemonSet's
/// rolling update with `maxSurge` does, or `systemd-run` with the new binary) takes its listeners and
/// established connections over `<stateDir>/apiprism/handoff.sock`; the old one retires and is then stopped
/// with SIGTERM. Ten times in a row under the kubelet-like client: the watch (TLS + HTTP/2, so a lost or
/// repeated byte would break it) is never cut and no new connection fails.
#[test]
fn ten_restarts_with_a_handoff_cut_nothing() -> Result<()> {
    const RESTARTS: usize = 10;
    let mut lab = Lab::new()?;
    let (pauses, log) = lab.with_kubelet(|lab, log| {
        watch_server(log)?;
        let mut pauses = Vec::new();
        for i in 1..=RESTARTS {
            let t = Instant::now();
            let next = Daemon::builder(DaemonKind::Apiprism, &lab.net.nodes[3].netns, &lab.config)
                .log_file(lab.config.with_file_name(format!("apiprism-{i}.log")))
                .start();
            let took = wait_until(SOON, format!("instance {i} taking over"), || {
                let text = next.log();
                text.lines()
                    .find(|l| l.contains("took over from the running instance"))
                    .map(str::to_owned)
                    .ok_or("not yet")
            })
            .with_context(|| format!("instance {i}'s log:\n{}", next.log()))?;
            ensure!(
                !took.contains("connections=0"),
                "instance {i} took no connection over (the watch stays with the old one): {took}"
            );
            wait_until(SOON, "the old instance retiring", || {
                if lab.apiprism.log().contains("handed over: retired") {
                    Ok(())
                } else {
                    Err("not yet")
                }
            })?;
            pauses.push(t.elapsed());
            let mut old = std::mem::replace(&mut lab.apiprism, next);
            old.signal(nix::sys::signal::Signal::SIGTERM)?;
            old.wait_exit(SOON)?;
            // Traffic through the new instance alone before the next restart.
            let since = Instant::now();
            wait_until(SOON, "new connections through the new instance", || {
                let ok = lock(log)
                    .requests
                    .iter()
                    .filter(|(start, _, r)| *start >= since && r.is_ok())
                    .count();
                if ok >= 8 {
                    Ok(())
                } else {
                    Err(format!("{ok} so far"))
                }
            })?;
            lab.apiprism.wait_ready(SOON)?;
        }
        Ok(pauses)
    })?;
    let failed: Vec<_> = log.requests.iter().filter(|r| r.2.is_err()).collect();
    eprintln!(
        "apiprism, {RESTARTS} restarts with a handoff: {} new connections, {} failed; watch connected {} time(s), \
         cut {} time(s); start to takeover: {pauses:?}",
        log.requests.len(),
        failed.len(),
        log.connected.len(),
        log.cut.len()
    );
    ensure!(log.cut.is_empty(), "the watch was cut: {:?}", log.cut);
    ensure!(log.connected.len() == 1, "the watch reconnected");
    if let Some((_, _, Err(e))) = failed.first() {
        bail!(
            "{} of {} new connections failed; first: {e}",
            failed.len(),
            log.requests.len()
        );
    }
    ensure!(
        log.requests.len() >= 10 * RESTARTS,
        "too little traffic: {}",
        log.requests.len()
    );
    Ok(())
}

/// A new instance that hangs up half-way through a handoff (it died, or is not apiprism at all): the running
/// one serves on as before. The stand-in taker says hello, takes the first message (a listening socket) and
/// closes; the watch is not cut, no new connection fails, and new connections are accepted after it.
#[test]
fn a_handoff_abandoned_half_way_cuts_nothing() -> Result<()> {
    let mut lab = Lab::new()?;
    let socket = lab.doc.state_dir.join("apiprism").join("handoff.sock");
    let ((), log) = lab.with_kubelet(|lab, log| {
        watch_server(log)?;
        let taker = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
        taker.connect(&socket2::SockAddr::unix(&socket)?)?;
        taker.set_read_timeout(Some(SOON))?;
        taker.send(b"TAKE 1")?;
        let mut first = [std::mem::MaybeUninit::<u8>::uninit(); 128];
        let n = taker.recv(&mut first)?; // its descriptor is discarded by the kernel
        ensure!(n > 0, "no first message from the giver");
        drop(taker);
        wait_until(SOON, "apiprism serving on", || {
            if lab.apiprism.log().contains("handoff failed: serving on") {
                Ok(())
            } else {
                Err("not yet")
            }
        })?;
        let since = Instant::now();
        wait_until(SOON, "new connections after the abandoned handoff", || {
            let ok = lock(log)
                .requests
                .iter()
                .filter(|(start, _, r)| *start >= since && r.is_ok())
                .count();
            if ok >= 20 {
                Ok(())
            } else {
                Err(format!("{ok} so far"))
            }
        })?;
        Ok(())
    })?;
    ensure!(log.cut.is_empty(), "the watch was cut: {:?}", log.cut);
    let failed = log.requests.iter().filter(|r| r.2.is_err()).count();
    ensure!(
        failed == 0,
        "{failed} of {} new connections failed",
        log.requests.len()
    );
    Ok(())
}

/// Any node can announce itself as a control plane (a Talos affiliate with an API server port, a Node
/// with the control-plane label and `api-server-port`), and meshd lists it in the members record. A member
/// whose certificate does not verify against the cluster CA (`apiprism.clusterCAFile`) for the checked
/// name never joins the upstreams, so it gets no traffic: here stand-in 3 serves a certificate from
/// another CA, as a hostile node would. A member with the cluster's certificate joins.
#[test]
fn a_member_whose_certificate_does_not_verify_gets_no_traffic() -> Result<()> {
    use hybridnet_state::{MEMBERS, Member, Members, StateDir};
    let mut lab = Lab::with_endpoints(1)?;
    let hostile = lab.pki.with_file_name("pki-hostile");
    std::fs::create_dir_all(&hostile)?;
    Pki::generate().write(&hostile);
    lab.kill(2);
    lab.standins[2] = Some(standin(&lab.net, 2, "hostile", &hostile)?);
    let member = |name: &str, i: usize| Member {
        name: name.to_owned(),
        addresses: vec![lab.net.nodes[i].ipv4.into()],
        control_plane: true,
        api_server_port: Some(API_PORT),
        ..Default::default()
    };
    let state = StateDir::new(&lab.doc.state_dir);
    state.write(
        MEMBERS.0,
        MEMBERS.1,
        &Members {
            members: vec![member("cp-2", 1), member("evil", 2)],
        },
    )?;
    let verified = lab.wait_state(1, "up", SOON)?;
    // Several health intervals (1 s) later the hostile one is still not an upstream.
    std::thread::sleep(Duration::from_secs(4));
    ensure!(
        lab.state(2)? == "absent",
        "the hostile member is in the table: {}",
        lab.state(2)?
    );
    let metrics = lab.apiprism.metrics()?;
    ensure!(
        metrics.value("apiprism_upstreams") == 2.0,
        "upstreams: {:?}",
        metrics.get("apiprism_upstreams")
    );
    let log = lab.apiprism.log();
    ensure!(
        log.contains("held back") && log.contains(&lab.upstream(2).to_string()),
        "the refusal is logged"
    );
    // Not in the table is no traffic: apiprism dials only upstreams of its table.
    eprintln!("apiprism: a verified member joined after {verified:?}; the hostile one never did");
    Ok(())
}
