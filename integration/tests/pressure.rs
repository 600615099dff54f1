//! Root tests of issue 17: local pressure and careless edits never cut service.
//!
//! - apiprism with a 1,024 open-file limit under a flood of 3,000 local connections: an established proxied
//!   connection (an HTTP/2 watch through a TLS stand-in API server) keeps streaming, no upstream is marked
//!   down, and new connections succeed within 2 s after the flood.
//! - An empty config file (`: > config.yaml`, as editors and config tools truncate before writing) and the
//!   real content 1 s later: the running config is never replaced (no reload, no generation bump), for all
//!   three daemons; for apiprism also no upstream leaves the table and the watch is not cut.
//! - A FIFO swapped in for the config, then a valid changed file: the change applies within 5 s without
//!   SIGHUP, for all three daemons.
//!
//! The upstreams are `apiprism-standin` processes (TLS + HTTP/2 stand-ins; no real kube-apiserver runs here).
//! Needs root and the release binaries (`hack/test.sh`).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use hybridnet_integration::apiprism::{Pki, Watch, fetch_name};
use hybridnet_integration::{
    ConfigDoc, Daemon, DaemonKind, LabNet, Netns, TestDir, require_root, wait_until, write_atomic,
};

const SOON: Duration = Duration::from_secs(10);
const API_PORT: u16 = 6443;
const LISTEN: &str = "127.0.0.1:7445";
/// The numbers.
const FD_LIMIT: u64 = 1024;
const FLOOD: usize = 3000;
const RECOVERY: Duration = Duration::from_secs(2);
const FIFO_BOUND: Duration = Duration::from_secs(5);

const GENERATION: &str = "hybridnet_config_generation";
const RELOADS: &str = "hybridnet_config_reloads_total";
const BLANK: &str = "hybridnet_config_blank_reads_total";
const RELOAD_ERRORS: &str = "hybridnet_config_reload_errors_total";

/// Timing assertions need the machine to themselves: one scenario at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One stand-in API server process in a lab node.
struct Standin(Child);

impl Standin {
    fn start(net: &LabNet, node: usize, name: &str, pki: &Path) -> Result<Standin> {
        let addr = upstream(net, node);
        let mut child = net.nodes[node]
            .netns
            .command(env!("CARGO_BIN_EXE_apiprism-standin"))
            .args([name, &addr.to_string(), &pki.display().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting apiprism-standin")?;
        let stdout = child.stdout.take().context("standin stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        ensure!(line.starts_with("listening"), "standin {name}: {line:?}");
        Ok(Standin(child))
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The document with extra `apiprism` keys.
fn render(doc: &ConfigDoc, settings: &str) -> Result<String> {
    let text = doc.render();
    ensure!(
        text.contains("apiprism: {"),
        "the rendered config changed shape:\n{text}"
    );
    Ok(text.replacen("apiprism: {", &format!("apiprism: {{{settings}"), 1))
}

fn upstream(net: &LabNet, i: usize) -> SocketAddr {
    SocketAddr::new(net.nodes[i].ipv4.into(), API_PORT)
}

/// Two stand-ins (nodes 0 and 1) and apiprism in node 2. Field order is drop order.
struct ApiLab {
    apiprism: Daemon,
    _standins: Vec<Standin>,
    doc: ConfigDoc,
    config: PathBuf,
    pki: PathBuf,
    net: LabNet,
    _dir: TestDir,
}

impl ApiLab {
    fn new(open_files: Option<u64>) -> Result<ApiLab> {
        ApiLab::with_settings(open_files, "")
    }

    /// `settings`: extra `apiprism` keys, in YAML flow style (`maxConnections: 10, `).
    fn with_settings(open_files: Option<u64>, settings: &str) -> Result<ApiLab> {
        require_root();
        let dir = TestDir::new("pressure");
        let net = LabNet::new(3);
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        Pki::generate().write(&pki);
        let standins = vec![
            Standin::start(&net, 0, "api-1", &pki)?,
            Standin::start(&net, 1, "api-2", &pki)?,
        ];
        let mut doc = ConfigDoc::new(dir.path());
        doc.apiprism_listen = vec![LISTEN.into()];
        doc.apiprism_endpoints = (0..2).map(|i| upstream(&net, i).to_string()).collect();
        let config = dir.join("config.yaml");
        write_atomic(&config, render(&doc, settings)?);
        let mut builder = Daemon::builder(DaemonKind::Apiprism, &net.nodes[2].netns, &config);
        if let Some(limit) = open_files {
            builder = builder.open_files_limit(limit);
        }
        let mut apiprism = builder.start();
        apiprism.wait_ready(SOON)?;
        let lab = ApiLab {
            apiprism,
            _standins: standins,
            doc,
            config,
            pki,
            net,
            _dir: dir,
        };
        for i in 0..2 {
            lab.wait_up(i)?;
        }
        Ok(lab)
    }

    fn client_ns(&self) -> &Netns {
        &self.net.nodes[2].netns
    }

    /// The upstreams apiprism has, with their state.
    fn states(&self) -> Result<Vec<(String, String)>> {
        let metrics = self.apiprism.metrics()?;
        Ok(metrics
            .series("apiprism_upstream_state")
            .filter(|(_, v)| *v == 1.0)
            .map(|(labels, _)| {
                let field = |key: &str| {
                    labels
                        .split(&format!("{key}=\""))
                        .nth(1)
                        .and_then(|s| s.split('"').next())
                        .unwrap_or_default()
                        .to_owned()
                };
                (field("upstream"), field("state"))
            })
            .collect())
    }

    fn wait_up(&self, i: usize) -> Result<()> {
        let want = upstream(&self.net, i).to_string();
        wait_until(SOON, format!("{want} up"), || {
            let states = self.states().map_err(|e| e.to_string())?;
            if states.iter().any(|(u, s)| *u == want && s == "up") {
                Ok(())
            } else {
                Err(format!("{states:?}"))
            }
        })?;
        Ok(())
    }

    fn metric(&self, name: &str) -> Result<f64> {
        Ok(self.apiprism.metrics()?.value(name))
    }
}

/// A watch through apiprism on its own thread in the client namespace: counts events, records the first
/// error (a cut), until `stop`.
struct WatchRunner {
    events: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WatchRunner {
    fn start(lab: &ApiLab) -> Result<WatchRunner> {
        let tls = Pki::read(&lab.pki)?.client_config()?;
        let addr: SocketAddr = LISTEN.parse()?;
        let ns = lab.client_ns().name().to_owned();
        let events = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, err, st) = (events.clone(), error.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let fail = |msg: String| {
                err.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(msg);
            };
            let entered = std::fs::File::open(format!("/run/netns/{ns}"))
                .map_err(|x| x.to_string())
                .and_then(|f| {
                    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|x| x.to_string())
                });
            if let Err(x) = entered {
                return fail(format!("setns: {x}"));
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(x) => return fail(format!("runtime: {x}")),
            };
            rt.block_on(async {
                let mut w = match Watch::open(addr, &tls).await {
                    Ok(w) => w,
                    Err(x) => return fail(format!("open: {x}")),
                };
                while !st.load(Ordering::SeqCst) {
                    match tokio::time::timeout(Duration::from_millis(200), w.next()).await {
                        Ok(Ok(_)) => {
                            e.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Err(x)) => return fail(format!("cut: {x}")),
                        Err(_) => {}
                    }
                }
            });
        });
        let runner = WatchRunner {
            events,
            error,
            stop,
            thread: Some(thread),
        };
        runner.wait_events(3)?;
        Ok(runner)
    }

    fn error(&self) -> Option<String> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// Waits until `n` more events came; fails at once if the watch was cut.
    fn wait_events(&self, n: u64) -> Result<()> {
        let floor = self.events() + n;
        wait_until(SOON, format!("{n} more watch events"), || {
            if let Some(e) = self.error() {
                return Ok(Err(e));
            }
            if self.events() >= floor {
                Ok(Ok(()))
            } else {
                Err(format!("{} events", self.events()))
            }
        })?
        .map_err(|e| anyhow::anyhow!("the watch failed: {e}"))
    }
}

impl Drop for WatchRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One new connection through apiprism from the client namespace: the name of the server that answered.
fn fetch(lab: &ApiLab, timeout: Duration) -> Result<String> {
    let tls = Pki::read(&lab.pki)?.client_config()?;
    let addr: SocketAddr = LISTEN.parse()?;
    let result = lab.client_ns().enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(fetch_name(addr, &tls, timeout)))
    })?;
    result.map_err(anyhow::Error::msg)
}

/// The test process needs more than `FLOOD` descriptors itself.
fn raise_own_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = (FLOOD as u64 + 1024).max(hard);
    setrlimit(Resource::RLIMIT_NOFILE, want, want)
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard, hard))?;
    Ok(())
}

/// The open-file limit of a running process, from `/proc/<pid>/limits` (soft, hard).
fn open_files_limit(pid: u32) -> Result<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files line")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    ensure!(fields.len() >= 5, "{line}");
    Ok((fields[3].to_owned(), fields[4].to_owned()))
}

/// The flood comes from one address, so by default it runs into its share of the connection limit (half):
/// connections over the share are reset at once.
#[test]
fn apiprism_survives_a_local_connection_flood_at_1024_descriptors() -> Result<()> {
    flood("")
}

/// The same with the share as large as the limit: the flood takes every slot, the accept loops pause, and
/// the backlog of closed flood connections drains without upstream dials once the flood ends.
#[test]
fn apiprism_pauses_accepting_at_the_connection_limit() -> Result<()> {
    flood("maxConnectionsPerClient: 1000000, ")
}

/// With no effective limit the flood exhausts apiprism's descriptors (as before the limit existed): every
/// `EMFILE` is local pressure, so still no upstream goes down and the established watch is not cut.
#[test]
fn apiprism_out_of_descriptors_blames_no_upstream() -> Result<()> {
    flood("maxConnections: 1000000, maxConnectionsPerClient: 1000000, ")
}

fn flood(settings: &str) -> Result<()> {
    let _serial = serial();
    raise_own_limit()?;
    let lab = ApiLab::with_settings(Some(FD_LIMIT), settings)?;
    let result = flood_in(&lab, settings);
    if result.is_err() {
        eprintln!("--- apiprism log ---\n{}", lab.apiprism.log());
    }
    result
}

fn flood_in(lab: &ApiLab, settings: &str) -> Result<()> {
    let limits = open_files_limit(lab.apiprism.pid())?;
    ensure!(
        limits == (FD_LIMIT.to_string(), FD_LIMIT.to_string()),
        "apiprism's open-file limit: {limits:?}"
    );
    let watch = WatchRunner::start(lab)?;
    let transitions = lab.metric("apiprism_upstream_transitions_total")?;
    let before = lab.states()?;

    // The flood: 3,000 connections from the client namespace to apiprism's loopback listener, held open.
    // Connections over the flood's share are reset by apiprism: that is the point, not a test failure.
    let flood_start = Instant::now();
    let flood = lab.client_ns().enter(|| {
        let addr: SocketAddr = LISTEN.parse().map_err(|e| format!("{e}"))?;
        let mut held = Vec::with_capacity(FLOOD);
        let mut reset = 0usize;
        for i in 0..FLOOD {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => held.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset += 1,
                Err(e) => return Err(format!("flood connection {i}: {e}")),
            }
        }
        Ok((held, reset))
    })?;
    let (flood, reset) = flood.map_err(anyhow::Error::msg)?;
    let opened_in = flood_start.elapsed();
    // Hold it while apiprism works through it and checks its upstreams several times (1 s interval).
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(3) {
        if let Some(e) = watch.error() {
            bail!(
                "the established watch was cut during the flood: {e}\n{}",
                lab.apiprism.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    watch.wait_events(5)?;
    // Out of descriptors, apiprism cannot even answer /metrics: judge it after the flood.
    let exhausting = settings.contains("maxConnections: 1000000");
    if !exhausting {
        let during = lab.states()?;
        ensure!(
            during == before,
            "upstreams changed during the flood: {before:?} -> {during:?}"
        );
    }
    // The flood ends: new connections succeed within 2 s.
    drop(flood);
    let ended = Instant::now();
    let mut attempts = Vec::new();
    let first_ok = loop {
        let result = fetch(lab, RECOVERY);
        let at = ended.elapsed();
        match result {
            Ok(name) => break (at, name),
            Err(e) => attempts.push(format!("{at:?}: {e}")),
        }
        if at > RECOVERY {
            bail!("no new connection succeeded within {RECOVERY:?} after the flood: {attempts:?}");
        }
    };
    ensure!(
        first_ok.0 <= RECOVERY,
        "first new connection after the flood took {:?}",
        first_ok.0
    );
    watch.wait_events(3)?;
    ensure!(
        lab.metric("apiprism_upstream_transitions_total")? == transitions,
        "an upstream changed state:\n{}",
        lab.apiprism.log()
    );
    ensure!(lab.states()? == before, "upstreams changed after the flood");
    let sum = |name: &str| -> Result<f64> {
        Ok(lab
            .apiprism
            .metrics()?
            .series(name)
            .map(|(_, v)| v)
            .fold(0.0, |a, b| a + b))
    };
    let paused = sum("apiprism_accept_paused_total")?;
    let refused = sum("apiprism_refused_connections_total")?;
    let pressure = sum("apiprism_local_pressure_errors_total")?;
    if exhausting {
        ensure!(pressure > 0.0, "the flood never exhausted the descriptors");
    } else {
        ensure!(
            paused + refused > 0.0,
            "the flood never reached the connection limit (paused {paused}, refused {refused})"
        );
    }
    if settings.starts_with("maxConnectionsPerClient") {
        ensure!(paused > 0.0, "accepting never paused at the limit");
    }
    ensure!(
        watch.error().is_none(),
        "the watch was cut: {:?}",
        watch.error()
    );
    let log = lab.apiprism.log();
    ensure!(
        !log.contains("upstream down"),
        "an upstream was marked down:\n{log}"
    );
    eprintln!(
        "flood of {FLOOD} opened in {opened_in:?} ({reset} reset while connecting); accept paused {paused} \
         times, {refused} refused; first new connection {:?} after the flood ({} failed attempts before); local pressure errors: {}",
        first_ok.0,
        attempts.len(),
        lab.apiprism
            .metrics()?
            .series("apiprism_local_pressure_errors_total")
            .map(|(l, v)| format!("{l}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

/// `: > config.yaml`, then the same content 1 s later: the empty file is never applied.
#[test]
fn apiprism_keeps_its_upstreams_and_connections_through_an_emptied_config() -> Result<()> {
    let _serial = serial();
    let lab = ApiLab::new(None)?;
    let watch = WatchRunner::start(&lab)?;
    let before = lab.states()?;
    let (generation, reloads) = (lab.metric(GENERATION)?, lab.metric(RELOADS)?);
    truncate_then_restore(
        &lab.config,
        &lab.doc.render(),
        || {
            let states = lab.states()?;
            ensure!(
                states == before,
                "upstreams changed: {before:?} -> {states:?}"
            );
            Ok(())
        },
        &lab.apiprism,
    )?;
    watch.wait_events(3)?;
    ensure!(
        watch.error().is_none(),
        "the watch was cut: {:?}",
        watch.error()
    );
    ensure!(lab.states()? == before);
    ensure!(
        lab.metric(GENERATION)? == generation,
        "the config generation changed"
    );
    ensure!(lab.metric(RELOADS)? == reloads, "a config was applied");
    Ok(())
}

/// Truncates `config`, checks `invariant` for 1 s while the daemon has seen the empty file, writes `text`
/// back (in place, as an editor would), and checks the daemon logged the empty file.
fn truncate_then_restore(
    config: &Path,
    text: &str,
    mut invariant: impl FnMut() -> Result<()>,
    daemon: &Daemon,
) -> Result<()> {
    let blank = daemon.metrics()?.value(BLANK);
    std::fs::File::create(config).context("truncating the config")?; // `: > config.yaml`
    wait_until(SOON, "the daemon reading the empty file", || {
        let v = daemon.metrics().map_err(|e| e.to_string())?.value(BLANK);
        if v > blank {
            Ok(())
        } else {
            Err(format!("{BLANK} = {v}"))
        }
    })?;
    let truncated = Instant::now();
    while truncated.elapsed() < Duration::from_secs(1) {
        invariant()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(config, text).context("writing the content back")?;
    // The watcher sees the write (debounced 100 ms) and finds the running config unchanged.
    wait_until(SOON, "the daemon logging the unchanged config", || {
        let log = daemon.log();
        if log.contains("config file is empty") && log.matches("config unchanged").count() >= 1 {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    })?;
    invariant()
}

/// meshd and dnslocal: the same, judged by their config generation and reload count (the running config
/// object was never replaced, so nothing it names was removed).
fn keeps_running_config_through_an_emptied_file(kind: DaemonKind) -> Result<()> {
    let _serial = serial();
    require_root();
    let dir = TestDir::new(kind.name());
    let doc = ConfigDoc::new(dir.path());
    let config = dir.join("config.yaml");
    let netns = Netns::new();
    netns.add_lab_link();
    write_atomic(&config, doc.render());
    let mut d = Daemon::start(kind, &netns, &config);
    d.wait_ready(SOON)?;
    let m = d.metrics()?;
    let (generation, reloads) = (m.value(GENERATION), m.value(RELOADS));
    ensure!(generation >= 1.0, "{GENERATION} = {generation}");
    truncate_then_restore(
        &config,
        &doc.render(),
        || {
            let m = d.metrics()?;
            ensure!(
                m.value(GENERATION) == generation,
                "the config generation changed"
            );
            ensure!(m.value(RELOADS) == reloads, "a config was applied");
            Ok(())
        },
        &d,
    )?;
    d.wait_ready(SOON)?;
    let status = d.status_in(&doc.state_dir).map_err(anyhow::Error::msg)?;
    ensure!(status.config_error.is_none(), "{status:?}");
    Ok(())
}

#[test]
fn meshd_keeps_its_config_through_an_emptied_file() -> Result<()> {
    keeps_running_config_through_an_emptied_file(DaemonKind::Meshd)
}

#[test]
fn dnslocal_keeps_its_config_through_an_emptied_file() -> Result<()> {
    keeps_running_config_through_an_emptied_file(DaemonKind::Dnslocal)
}

/// A FIFO renamed over the config: refused with a clear error (the reload thread does not block on it); a
/// valid changed file renamed over it then applies within 5 s, without SIGHUP.
fn fifo_does_not_block_reloading(kind: DaemonKind) -> Result<()> {
    let _serial = serial();
    require_root();
    let dir = TestDir::new(kind.name());
    let mut doc = ConfigDoc::new(dir.path());
    let config = dir.join("config.yaml");
    let netns = Netns::new();
    netns.add_lab_link();
    write_atomic(&config, doc.render());
    let mut d = Daemon::start(kind, &netns, &config);
    d.wait_ready(SOON)?;
    let generation = d.metrics()?.value(GENERATION);
    let errors = d.metrics()?.value(RELOAD_ERRORS);

    let fifo = dir.join("config.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
    ensure!(made.success(), "mkfifo failed");
    std::fs::rename(&fifo, &config)?;
    wait_until(SOON, "the FIFO refused", || {
        let v = d.metrics().map_err(|e| e.to_string())?.value(RELOAD_ERRORS);
        if v > errors {
            Ok(())
        } else {
            Err(format!("{RELOAD_ERRORS} = {v}"))
        }
    })?;
    let log = d.log();
    ensure!(
        log.contains("is a FIFO, not a regular file"),
        "no clear error in the log:\n{log}"
    );

    doc.meshd_location = "elsewhere".into();
    doc.apiprism_endpoints.push("192.0.2.2:6443".into());
    doc.dnslocal_upstreams.push("192.0.2.2:53".into());
    let written = Instant::now();
    write_atomic(&config, doc.render());
    let took = d.wait_alive(FIFO_BOUND, "the changed config applied", |d| {
        let v = d.metrics().map_err(|e| e.to_string())?.value(GENERATION);
        if v > generation {
            Ok(written.elapsed())
        } else {
            Err(format!("{GENERATION} = {v}"))
        }
    })?;
    ensure!(took <= FIFO_BOUND, "applied after {took:?}");
    eprintln!(
        "{}: changed config applied {took:?} after the FIFO",
        kind.name()
    );
    Ok(())
}

#[test]
fn apiprism_reloads_after_a_fifo() -> Result<()> {
    fifo_does_not_block_reloading(DaemonKind::Apiprism)
}

#[test]
fn meshd_reloads_after_a_fifo() -> Result<()> {
    fifo_does_not_block_reloading(DaemonKind::Meshd)
}

#[test]
fn dnslocal_reloads_after_a_fifo() -> Result<()> {
    fifo_does_not_block_reloading(DaemonKind::Dnslocal)
}
