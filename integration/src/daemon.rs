//! The daemon binaries: where they are, and a running daemon in a namespace.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use hybridnet_state::{DaemonStatus, STATUS, StateDir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::http::{self, HttpResponse, Metrics};
use crate::wait::{Timeout, wait_until};
use crate::{Netns, TimedOutput, run_with_timeout};

/// One of the three daemons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DaemonKind {
    Apiprism,
    Meshd,
    Dnslocal,
}

impl DaemonKind {
    pub const ALL: [DaemonKind; 3] = [
        DaemonKind::Apiprism,
        DaemonKind::Meshd,
        DaemonKind::Dnslocal,
    ];

    /// The binary, package suffix and config section: `apiprism`, `meshd`, `dnslocal`.
    pub fn name(self) -> &'static str {
        match self {
            DaemonKind::Apiprism => "apiprism",
            DaemonKind::Meshd => "meshd",
            DaemonKind::Dnslocal => "dnslocal",
        }
    }

    /// The built-in admin address (per namespace, so the same in every node).
    pub fn default_admin(self) -> SocketAddr {
        let port = match self {
            DaemonKind::Apiprism => 7446,
            DaemonKind::Meshd => 7447,
            DaemonKind::Dnslocal => 7448,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The prefix of its environment variables: `APIPRISM` (`APIPRISM_LOG`, `APIPRISM_LOG_FORMAT`).
    pub fn env_prefix(self) -> String {
        self.name().to_ascii_uppercase()
    }

    /// The release binary ([`bin_path`]).
    pub fn bin(self) -> PathBuf {
        bin_path(self)
    }

    /// A command for the binary, in the test's own namespace, with no config-related environment inherited.
    pub fn command(self) -> Command {
        let mut cmd = Command::new(self.bin());
        cmd.env_remove("HYBRIDNET_CONFIG");
        cmd
    }

    /// Runs the binary with `args` and waits at most `timeout` (CLI subcommands).
    pub fn cli(self, args: &[&str], timeout: Duration) -> TimedOutput {
        run_with_timeout(self.command().args(args), timeout)
    }

    /// Reads `<state_dir>/<daemon>/status.json` (the payload of the record's envelope).
    pub fn read_status(self, state_dir: &Path) -> Result<DaemonStatus, String> {
        StateDir::new(state_dir)
            .read(self.name(), STATUS)
            .map_err(|e| e.to_string())
    }
}

/// The directories searched for the binaries, in order: `$HYBRIDNET_BIN_DIR`; `release/` in the target
/// directory this test binary was built in; `<workspace>/target/release`.
fn bin_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("HYBRIDNET_BIN_DIR") {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    // target/<profile>/deps/<test binary>
    if let Some(target) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(|exe| exe.ancestors().nth(3))
    {
        dirs.push(target.join("release"));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    if !dirs.iter().any(|d| same_dir(d, &workspace)) {
        dirs.push(workspace);
    }
    dirs
}

fn same_dir(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// The built binary of `kind`; panics, saying how to build it, when it is missing or older than the sources
/// (a forgotten rebuild: [`crate::stale`]).
pub fn bin_path(kind: DaemonKind) -> PathBuf {
    let dirs = bin_dirs();
    let found = dirs
        .iter()
        .map(|d| d.join(kind.name()))
        .find(|p| p.is_file());
    let Some(path) = found else {
        let tried: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        panic!(
            "the {name} binary is missing (looked in: {tried}). Build the release binaries first (hack/test.sh \
             does):\n    cargo build --release -p hybridnet-apiprism -p hybridnet-meshd -p hybridnet-dnslocal\n\
             or point HYBRIDNET_BIN_DIR at a directory that holds apiprism, meshd and dnslocal.",
            name = kind.name(),
            tried = tried.join(", "),
        );
    };
    crate::stale::require_fresh(&path);
    path
}

/// Gives the daemon private, empty `/run/hybridnet` and `/var/lib/hybridnet` (tmpfs in the mount
/// namespace `ip netns exec` creates), so a daemon on built-in defaults never touches the host's, nor
/// another test's. Only the empty mount points are created on the host. `HN_TEST_NOFILE`, when set, is the
/// daemon's open-file limit, soft and hard (so the daemon cannot raise it).
const SANDBOX: &str = r#"set -e
for d in /run/hybridnet /var/lib/hybridnet; do
  mkdir -p "$d"
  mount -t tmpfs -o mode=0755,size=16m hybridnet-test "$d"
done
if [ -n "${HN_TEST_NOFILE:-}" ]; then ulimit -S -n "$HN_TEST_NOFILE"; ulimit -H -n "$HN_TEST_NOFILE"; fi
exec "$@""#;

/// How a [`Daemon`] is started: see [`Daemon::builder`].
#[derive(Debug)]
pub struct DaemonBuilder<'a> {
    kind: DaemonKind,
    netns: &'a Netns,
    config: PathBuf,
    log: Option<PathBuf>,
    env: Vec<(String, String)>,
    admin: SocketAddr,
}

impl DaemonBuilder<'_> {
    /// Where stdout and stderr go (default `<config dir>/<daemon>.log`).
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// An environment variable for the daemon (e.g. `APIPRISM_LOG=debug`).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The daemon's open-file limit (`RLIMIT_NOFILE`, soft and hard), set before it starts.
    pub fn open_files_limit(self, limit: u64) -> Self {
        self.env("HN_TEST_NOFILE", limit.to_string())
    }

    /// Where the test expects the admin endpoint (default the built-in one).
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.admin = addr;
        self
    }

    /// Starts `<bin> run --config <config>` in the namespace; panics if it cannot be started.
    pub fn start(self) -> Daemon {
        let bin = self.kind.bin();
        let log = self.log.unwrap_or_else(|| {
            self.config
                .parent()
                .unwrap_or(Path::new("."))
                .join(format!("{}.log", self.kind.name()))
        });
        let out =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup {}: {e}", log.display()));
        let mut cmd = self.netns.command("sh");
        cmd.args(["-c", SANDBOX, self.kind.name()])
            .arg(&bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .env_remove("HYBRIDNET_CONFIG")
            .env(format!("{}_LOG", self.kind.env_prefix()), "info")
            .env(format!("{}_LOG_FORMAT", self.kind.env_prefix()), "plain")
            .envs(self.env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Daemon {
            kind: self.kind,
            netns: self.netns.name().to_owned(),
            child,
            log,
            admin: self.admin,
            exit: None,
        }
    }
}

/// A daemon process in a namespace, killed (SIGKILL) on drop; its log is printed if the test failed.
#[derive(Debug)]
pub struct Daemon {
    kind: DaemonKind,
    netns: String,
    child: Child,
    log: PathBuf,
    admin: SocketAddr,
    exit: Option<ExitStatus>,
}

impl Daemon {
    /// Prepares `<kind> run --config <config>` in `netns`. The config file need not exist.
    pub fn builder<'a>(
        kind: DaemonKind,
        netns: &'a Netns,
        config: impl Into<PathBuf>,
    ) -> DaemonBuilder<'a> {
        DaemonBuilder {
            kind,
            netns,
            config: config.into(),
            log: None,
            env: Vec::new(),
            admin: kind.default_admin(),
        }
    }

    /// Starts `<kind> run --config <config>` in `netns` with the defaults of [`Daemon::builder`].
    pub fn start(kind: DaemonKind, netns: &Netns, config: impl Into<PathBuf>) -> Daemon {
        Daemon::builder(kind, netns, config).start()
    }

    pub fn kind(&self) -> DaemonKind {
        self.kind
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the daemon wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// Where the test expects the admin endpoint from now on (after a config moved it).
    pub fn set_admin(&mut self, addr: SocketAddr) {
        self.admin = addr;
    }

    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        let pid = i32::try_from(self.pid()).map_err(|_| nix::Error::ESRCH)?;
        kill(Pid::from_raw(pid), signal)
    }

    /// The exit status if the process has exited (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, Timeout> {
        let what = format!("{} (pid {}) to exit", self.kind.name(), self.pid());
        wait_until(timeout, what, || self.exited().ok_or("still running"))
    }

    /// `GET path` on the admin endpoint, from inside the daemon's namespace.
    pub fn get(&self, path: &str) -> std::io::Result<HttpResponse> {
        http::get_in(&self.netns, self.admin, path)
    }

    /// A `/metrics` scrape (an error unless it answers 200).
    pub fn metrics(&self) -> std::io::Result<Metrics> {
        let response = self.get("/metrics")?;
        if response.status != 200 {
            return Err(std::io::Error::other(format!(
                "/metrics answered {}",
                response.status
            )));
        }
        Ok(Metrics(response.body))
    }

    /// Waits until `GET path` answers `status`; gives up at once if the daemon exits.
    pub fn wait_for_status(
        &mut self,
        path: &str,
        status: u16,
        timeout: Duration,
    ) -> Result<(), Timeout> {
        let what = format!("{} {path} to answer {status}", self.kind.name());
        self.wait_alive(timeout, what, |d| match d.get(path) {
            Ok(r) if r.status == status => Ok(()),
            Ok(r) => Err(format!("answered {}: {}", r.status, r.body.trim())),
            Err(e) => Err(e.to_string()),
        })
    }

    /// `/healthz` answers 200.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<(), Timeout> {
        self.wait_for_status("/healthz", 200, timeout)
    }

    /// `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), Timeout> {
        self.wait_for_status("/readyz", 200, timeout)
    }

    /// [`wait_until`] that stops early, with the exit status and log, when the daemon has exited.
    pub fn wait_alive<T>(
        &mut self,
        timeout: Duration,
        what: impl std::fmt::Display,
        mut probe: impl FnMut(&Daemon) -> Result<T, String>,
    ) -> Result<T, Timeout> {
        let what = what.to_string();
        let start = std::time::Instant::now();
        let result = wait_until(timeout, &what, || match self.exited() {
            Some(status) => Ok(Err(format!(
                "{} exited ({status}); log:\n{}",
                self.kind.name(),
                self.log()
            ))),
            None => probe(self).map(Ok),
        })?;
        result.map_err(|last| Timeout {
            what,
            waited: start.elapsed(),
            last,
            gave_up: true,
        })
    }

    /// The daemon's private built-in state directory (`/run/hybridnet` in its mount namespace), where it
    /// writes status while it runs on defaults.
    pub fn default_state_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/run/hybridnet", self.pid()))
    }

    /// Its `status.json` under `state_dir`.
    pub fn status_in(&self, state_dir: &Path) -> Result<DaemonStatus, String> {
        self.kind.read_status(state_dir)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill(); // it may exit between the check and the kill
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!(
                "--- {} in {} (pid {}, exit {:?}), log {} (last {} lines) ---",
                self.kind.name(),
                self.netns,
                self.pid(),
                self.exit,
                self.log.display(),
                tail.len()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
