//! Root tests: each daemon's life cycle in its own network namespace (start without a config, config
//! appearing, reload on change and SIGHUP, a bad version rejected, clean stop, `status`), and a three-node lab
//! running all three daemons. They fail loudly when not run as root (see `require_root`).
//!
//! Needs the release binaries: `cargo build --release -p hybridnet-apiprism -p hybridnet-meshd
//! -p hybridnet-dnslocal` (`hack/test.sh` does it).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use hybridnet_integration::{
    ConfigDoc, Daemon, DaemonKind, LabNet, Netns, TestDir, require_root, wait_until, write_atomic,
};
use hybridnet_state::DaemonStatus;
use nix::sys::signal::Signal;

/// Start-up, reload and readiness: generous for a loaded 2-core CI machine, but tests normally take ms.
const SOON: Duration = Duration::from_secs(10);
/// "Exits within a couple of seconds" after SIGTERM/SIGINT.
const PROMPT_EXIT: Duration = Duration::from_secs(3);
/// CLI commands that only read files.
const CLI: Duration = Duration::from_secs(5);

const RELOADS: &str = "hybridnet_config_reloads_total";
const RELOAD_ERRORS: &str = "hybridnet_config_reload_errors_total";

/// One daemon in its own namespace and scratch directory, with `config.yaml` not written yet.
/// Field order is drop order: the daemon before its namespace, the directory last.
struct Single {
    daemon: Option<Daemon>,
    netns: Netns,
    doc: ConfigDoc,
    config: std::path::PathBuf,
    dir: TestDir,
}

impl Single {
    fn new(kind: DaemonKind) -> Single {
        require_root();
        let dir = TestDir::new(kind.name());
        let doc = ConfigDoc::new(dir.path());
        let config = dir.join("config.yaml");
        let netns = Netns::new();
        netns.add_lab_link(); // the document's upstreams (192.0.2.x) are routable, so dnslocal can be ready
        Single {
            daemon: None,
            netns,
            doc,
            config,
            dir,
        }
    }

    /// Writes the current document (atomically), starts the daemon, waits for `/readyz` and for its
    /// status record to show the config applied.
    fn started_ready(kind: DaemonKind) -> Result<Single> {
        let mut s = Single::new(kind);
        s.write_config();
        s.start(kind);
        s.d().wait_ready(SOON)?;
        s.wait_status("status.json with the config applied", |st| {
            st.ready && st.config_generation >= 1
        })?;
        Ok(s)
    }

    fn start(&mut self, kind: DaemonKind) {
        self.daemon = Some(Daemon::start(kind, &self.netns, &self.config));
    }

    fn d(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("the daemon was started")
    }

    fn write_config(&self) {
        write_atomic(&self.config, self.doc.render());
    }

    fn status(&self) -> Result<DaemonStatus, String> {
        let daemon = self.daemon.as_ref().expect("the daemon was started");
        daemon.status_in(&self.doc.state_dir)
    }

    /// Waits until the record in the configured state dir satisfies `check`.
    fn wait_status(
        &mut self,
        what: &str,
        check: impl Fn(&DaemonStatus) -> bool,
    ) -> Result<DaemonStatus> {
        let state_dir = self.doc.state_dir.clone();
        let status = self.d().wait_alive(SOON, what, |d| {
            let s = d.status_in(&state_dir)?;
            if check(&s) {
                Ok(s)
            } else {
                Err(format!("status.json: {s:?}"))
            }
        })?;
        Ok(status)
    }

    /// Waits until metric `name` is above `floor`; returns its value.
    fn wait_metric_above(&mut self, name: &str, floor: f64) -> Result<f64> {
        let value = self
            .d()
            .wait_alive(SOON, format!("{name} > {floor}"), |d| {
                let v = d.metrics().map_err(|e| e.to_string())?.value(name);
                if v > floor {
                    Ok(v)
                } else {
                    Err(format!("{name} = {v}"))
                }
            })?;
        Ok(value)
    }

    fn metric(&mut self, name: &str) -> Result<f64> {
        Ok(self.d().metrics()?.value(name))
    }
}

/// A config that no daemon may accept: a port out of range (and, to prove the old version stays, an admin
/// address the daemon must not move to).
fn bad_version(doc: &ConfigDoc, kind: DaemonKind) -> String {
    let mut bad = doc.clone();
    bad.set_admin(
        kind,
        SocketAddr::from(([127, 0, 0, 1], 17_000 + kind.default_admin().port())),
    );
    let text = bad.render();
    assert!(
        text.contains("listenPort: 51821"),
        "the rendered config changed shape:\n{text}"
    );
    text.replace("listenPort: 51821", "listenPort: 70000")
}

fn starts_without_config_and_waits_for_it(kind: DaemonKind) -> Result<()> {
    let mut s = Single::new(kind);
    s.start(kind);
    let d = s.d();
    d.wait_healthy(SOON)?;
    let ready = d.get("/readyz")?;
    ensure!(
        ready.status == 503,
        "/readyz before any config: want 503, got {} {}",
        ready.status,
        ready.body
    );
    let state_dir = d.default_state_dir();
    let status = d.wait_alive(SOON, "status.json in the built-in stateDir", |d| {
        d.status_in(&state_dir)
    })?;
    ensure!(
        status.daemon == kind.name() && status.pid == d.pid(),
        "status.json: {status:?}"
    );
    ensure!(
        !status.ready && status.config_generation == 0,
        "no config yet, but status.json says {status:?}"
    );
    let metrics = d.metrics()?;
    let build = metrics
        .series("hybridnet_build_info")
        .map(|(labels, _)| labels.to_owned())
        .collect::<Vec<_>>();
    let daemon_label = format!("daemon=\"{}\"", kind.name());
    ensure!(
        build.iter().any(|l| l.contains(&daemon_label)),
        "hybridnet_build_info: {build:?}\n{}",
        metrics.0
    );
    ensure!(d.exited().is_none(), "the daemon exited without a config");
    Ok(())
}

fn applies_config_that_appears_after_start(kind: DaemonKind) -> Result<()> {
    let mut s = Single::new(kind);
    s.start(kind);
    s.d().wait_healthy(SOON)?;
    let reloads = s.metric(RELOADS)?;
    s.write_config();
    let config_path = s.config.display().to_string();
    let status = s.wait_status("the config to be applied", |st| {
        st.config_generation >= 1 && st.ready
    })?;
    ensure!(
        status.config_path == config_path && status.config_error.is_none(),
        "status.json: {status:?}"
    );
    s.d().wait_ready(SOON)?;
    s.wait_metric_above(RELOADS, reloads)?;
    Ok(())
}

fn applies_a_version_written_in_place(kind: DaemonKind) -> Result<()> {
    let mut s = Single::started_ready(kind)?;
    let generation = s.status().map_err(anyhow::Error::msg)?.config_generation;
    s.doc.meshd_location = "elsewhere".into();
    s.doc.apiprism_endpoints.push("192.0.2.2:6443".into());
    // Not atomic: truncate and write, as a careless editor would. A transient error is allowed; the daemon
    // must end up on the complete new version.
    std::fs::write(&s.config, s.doc.render()).context("rewriting the config in place")?;
    s.wait_status("the rewritten config", |st| {
        st.config_generation > generation && st.config_error.is_none()
    })?;
    s.d().wait_ready(SOON)?;
    Ok(())
}

fn follows_a_moved_admin_endpoint(kind: DaemonKind) -> Result<()> {
    let mut s = Single::started_ready(kind)?;
    let old = s.doc.admin(kind);
    let new = SocketAddr::from(([127, 0, 0, 1], old.port() + 10_000));
    s.doc.set_admin(kind, new);
    s.write_config();
    let d = s.d();
    d.set_admin(new);
    d.wait_ready(SOON)?;
    d.set_admin(old);
    d.wait_alive(
        SOON,
        format!("the old admin address {old} to close"),
        |d| match d.get("/healthz") {
            Ok(r) => Err(format!("still answers {}", r.status)),
            Err(_) => Ok(()),
        },
    )?;
    Ok(())
}

fn rejects_a_bad_new_version(kind: DaemonKind) -> Result<()> {
    let mut s = Single::started_ready(kind)?;
    let before = s.status().map_err(anyhow::Error::msg)?;
    let errors = s.metric(RELOAD_ERRORS)?;
    write_atomic(&s.config, bad_version(&s.doc, kind));
    s.wait_metric_above(RELOAD_ERRORS, errors)?;
    let status = s.wait_status("configError in status.json", |st| st.config_error.is_some())?;
    ensure!(
        status.config_generation == before.config_generation,
        "a rejected version was counted: {status:?}"
    );
    let (admin, moved) = (
        s.doc.admin(kind),
        SocketAddr::from(([127, 0, 0, 1], 17_000 + kind.default_admin().port())),
    );
    let d = s.d();
    ensure!(
        d.get("/readyz")?.status == 200,
        "not ready after a rejected version"
    );
    ensure!(
        d.get("/healthz")?.status == 200,
        "not healthy after a rejected version"
    );
    // The old version is still in force: the admin endpoint did not move to the bad version's address.
    d.set_admin(moved);
    ensure!(
        d.get("/healthz").is_err(),
        "the admin endpoint moved to {moved}, from a rejected version"
    );
    d.set_admin(admin);
    // A good (and different) version clears the error.
    s.doc.meshd_location = "fixed".into();
    s.write_config();
    let fixed = s.wait_status("a fixed version to clear configError", |st| {
        st.config_error.is_none()
    })?;
    ensure!(
        fixed.config_generation > before.config_generation,
        "the fixed version was not applied: {fixed:?}"
    );
    Ok(())
}

fn sighup_rereads_the_config(kind: DaemonKind) -> Result<()> {
    let mut s = Single::started_ready(kind)?;
    write_atomic(&s.config, bad_version(&s.doc, kind));
    s.wait_metric_above(RELOAD_ERRORS, 0.0)?;
    // Let the file watcher settle (one write may raise several events), then only SIGHUP can count.
    let settled = s
        .d()
        .wait_alive(SOON, "the reload error count to settle", |d| {
            let first = d.metrics().map_err(|e| e.to_string())?.value(RELOAD_ERRORS);
            std::thread::sleep(Duration::from_millis(300));
            let second = d.metrics().map_err(|e| e.to_string())?.value(RELOAD_ERRORS);
            if first == second {
                Ok(second)
            } else {
                Err(format!("{first} -> {second}"))
            }
        })?;
    s.d().signal(Signal::SIGHUP)?;
    s.wait_metric_above(RELOAD_ERRORS, settled)?;
    let d = s.d();
    ensure!(d.get("/readyz")?.status == 200, "not ready after SIGHUP");
    ensure!(d.exited().is_none(), "SIGHUP stopped the daemon");
    Ok(())
}

fn recreated_config_file_is_applied(kind: DaemonKind) -> Result<()> {
    let mut s = Single::started_ready(kind)?;
    let generation = s.status().map_err(anyhow::Error::msg)?.config_generation;
    std::fs::remove_file(&s.config)?;
    s.doc.meshd_location = "moved".into();
    s.write_config();
    s.wait_status("the re-created config", |st| {
        st.config_generation > generation
    })?;
    s.d().wait_ready(SOON)?;
    Ok(())
}

fn invalid_config_at_start_exits_78(kind: DaemonKind) -> Result<()> {
    let mut s = Single::new(kind);
    write_atomic(&s.config, bad_version(&s.doc, kind));
    s.start(kind);
    let status = s.d().wait_exit(SOON)?;
    ensure!(
        status.code() == Some(78),
        "want exit 78 for an invalid config at start, got {status}"
    );
    Ok(())
}

fn stops_promptly_on(kind: DaemonKind, signal: Signal) -> Result<()> {
    let mut s = Single::started_ready(kind)?;
    let d = s.d();
    d.signal(signal)?;
    let status = d.wait_exit(PROMPT_EXIT)?;
    ensure!(status.success(), "{signal}: want exit 0, got {status}");
    let config = s.config.display().to_string();
    let out = kind.cli(&["status", "--config", &config], CLI);
    ensure!(
        out.code() == Some(1),
        "`status` of a stopped daemon: want exit 1, got {}",
        out.describe()
    );
    Ok(())
}

fn status_prints_the_record(kind: DaemonKind) -> Result<()> {
    let mut s = Single::started_ready(kind)?;
    s.wait_status("status.json to say ready", |st| st.ready)?;
    let config = s.config.display().to_string();
    let pid = s.d().pid();
    let text = kind.cli(&["status", "--config", &config], CLI);
    ensure!(text.code() == Some(0), "`status`: {}", text.describe());
    ensure!(
        text.stdout.contains(kind.name()) && text.stdout.contains(&pid.to_string()),
        "{}",
        text.describe()
    );
    let state_dir = s.doc.state_dir.display().to_string();
    let json = kind.cli(&["status", "--state-dir", &state_dir, "--json"], CLI);
    ensure!(
        json.code() == Some(0),
        "`status --json`: {}",
        json.describe()
    );
    let record: DaemonStatus = serde_json::from_str(&json.stdout).context(json.describe())?;
    ensure!(
        record.daemon == kind.name() && record.pid == pid && record.ready,
        "{record:?}"
    );
    ensure!(
        record.config_path == config && record.config_generation >= 1,
        "{record:?}"
    );
    let empty = s.dir.join("empty-state");
    std::fs::create_dir_all(&empty)?;
    let none = kind.cli(
        &["status", "--state-dir", &empty.display().to_string()],
        CLI,
    );
    ensure!(
        none.code() == Some(1) && !none.stderr.is_empty(),
        "`status` without a record: {}",
        none.describe()
    );
    Ok(())
}

macro_rules! per_daemon {
    ($($module:ident => $kind:expr;)*) => {$(
        mod $module {
            use super::*;
            const KIND: DaemonKind = $kind;
            #[test]
            fn starts_without_config_and_waits_for_it() -> Result<()> { super::starts_without_config_and_waits_for_it(KIND) }
            #[test]
            fn applies_config_that_appears_after_start() -> Result<()> { super::applies_config_that_appears_after_start(KIND) }
            #[test]
            fn applies_a_version_written_in_place() -> Result<()> { super::applies_a_version_written_in_place(KIND) }
            #[test]
            fn follows_a_moved_admin_endpoint() -> Result<()> { super::follows_a_moved_admin_endpoint(KIND) }
            #[test]
            fn rejects_a_bad_new_version() -> Result<()> { super::rejects_a_bad_new_version(KIND) }
            #[test]
            fn sighup_rereads_the_config() -> Result<()> { super::sighup_rereads_the_config(KIND) }
            #[test]
            fn recreated_config_file_is_applied() -> Result<()> { super::recreated_config_file_is_applied(KIND) }
            #[test]
            fn invalid_config_at_start_exits_78() -> Result<()> { super::invalid_config_at_start_exits_78(KIND) }
            #[test]
            fn stops_promptly_on_sigterm() -> Result<()> { super::stops_promptly_on(KIND, Signal::SIGTERM) }
            #[test]
            fn stops_promptly_on_sigint() -> Result<()> { super::stops_promptly_on(KIND, Signal::SIGINT) }
            #[test]
            fn status_prints_the_record() -> Result<()> { super::status_prints_the_record(KIND) }
        }
    )*};
}

per_daemon! {
    apiprism => DaemonKind::Apiprism;
    meshd => DaemonKind::Meshd;
    dnslocal => DaemonKind::Dnslocal;
}

/// Talos documents in front of ours, so the lab exercises the Talos loader too.
const TALOS_PREAMBLE: &str = "\
apiVersion: v1alpha1
kind: KubePrismConfig
port: 7445
---
apiVersion: v1alpha1
kind: KubeSpanConfig
enabled: true
mtu: 1420
";

/// The lab network itself: every node reaches every other over IPv4 and IPv6, and nothing else.
#[test]
fn lab_network_connects_every_node() -> Result<()> {
    let lab = LabNet::new(3);
    for target in &lab.nodes {
        let addrs = [
            SocketAddr::from((target.ipv4, 0)),
            SocketAddr::from((target.ipv6, 0)),
        ];
        let listeners = target.netns.enter(|| addrs.map(TcpListener::bind))?;
        for listener in listeners {
            let listener = listener?; // kept open until the connects are done
            let addr = listener.local_addr()?;
            for from in &lab.nodes {
                let reached = from
                    .netns
                    .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))?;
                reached.with_context(|| format!("node{} cannot reach {addr}", from.index))?;
            }
        }
    }
    // The test's own namespace is not part of the lab.
    let outside = TcpStream::connect_timeout(
        &SocketAddr::from((lab.nodes[0].ipv4, 9)),
        Duration::from_millis(300),
    );
    ensure!(
        outside.is_err(),
        "the lab is reachable from the host namespace"
    );
    Ok(())
}

/// Three nodes on a bridge, each running all three daemons from generated configs (Talos documents plus
/// ours, a state and data directory per node): all become ready and report in their own state directory.
#[test]
fn three_nodes_run_all_daemons() -> Result<()> {
    let lab = LabNet::new(3);
    let dir = TestDir::new("lab");
    let mut running = Vec::new();
    for node in &lab.nodes {
        let root = dir.join(format!("node{}", node.index));
        std::fs::create_dir_all(&root)?;
        let mut doc = ConfigDoc::new(&root);
        doc.preamble = Some(TALOS_PREAMBLE.to_owned());
        doc.apiprism_listen = vec!["127.0.0.1:7455".into()]; // Talos's KubePrism has 7445
        doc.meshd_location = format!("site{}", node.index);
        let config = root.join("config.yaml");
        write_atomic(&config, doc.render());
        for kind in DaemonKind::ALL {
            let log = root.join(format!("{}.log", kind.name()));
            running.push((
                node.index,
                doc.state_dir.clone(),
                Daemon::builder(kind, &node.netns, &config)
                    .log_file(log)
                    .start(),
            ));
        }
    }
    for (node, state_dir, daemon) in &mut running {
        let what = format!("node{node} {}", daemon.kind().name());
        daemon.wait_ready(SOON).with_context(|| what.clone())?;
        let status = wait_until(SOON, format!("{what} status.json"), || {
            daemon.status_in(state_dir).and_then(|s| {
                if s.ready {
                    Ok(s)
                } else {
                    Err(format!("{s:?}"))
                }
            })
        })?;
        ensure!(
            status.pid == daemon.pid() && status.config_generation == 1,
            "{what}: {status:?}"
        );
        ensure!(
            daemon.get("/healthz")?.status == 200,
            "{what} is not healthy"
        );
    }
    for (node, _, daemon) in &mut running {
        if let Some(status) = daemon.exited() {
            bail!("node{node} {} exited: {status}", daemon.kind().name());
        }
    }
    check_state_dirs_are_separate(dir.path())
}

fn check_state_dirs_are_separate(root: &Path) -> Result<()> {
    for node in 1..=3 {
        for kind in DaemonKind::ALL {
            let state_dir = root.join(format!("node{node}/state"));
            let status = kind.read_status(&state_dir).map_err(anyhow::Error::msg)?;
            ensure!(
                status.config_path.contains(&format!("node{node}/")),
                "node{node} {}: {status:?}",
                kind.name()
            );
        }
    }
    Ok(())
}
