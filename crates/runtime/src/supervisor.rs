//! Runs one daemon: loads its config, serves admin, publishes status, reloads on file change and SIGHUP,
//! and stops on SIGTERM/SIGINT with a bounded drain.
//!
//! Reload rules (DESIGN.md section 3): the file may be missing at start (the daemon runs on defaults and
//! waits for it: on Talos the ExtensionServiceConfig file can appear after the service started); a valid new
//! version is applied without a restart; an invalid one is logged, counted and shown in `status`, and the
//! running config stays. An invalid file at start is fatal (exit 78): there is no good version to keep.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hybridnet_config::Config;
use hybridnet_state::{DaemonStatus, FileWatcher, StateDir};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::context::Readiness;
use crate::exit::ExitStatus;
use crate::metrics::{RuntimeMetrics, SharedRegistry};
use crate::status::{RECORD, STOPPED, WRITE_INTERVAL, unix_now};
use crate::{Context, Daemon, StatusHandle};

/// How long a daemon may take to drain after SIGTERM before the process exits anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the status writer needs besides the daemon's own report.
#[derive(Debug)]
struct Shared {
    daemon: &'static str,
    config_path: PathBuf,
    started_at: u64,
    generation: Mutex<(u64, Option<String>)>,
}

/// Runs daemon `D` with the config at `path` until SIGTERM/SIGINT or a fatal error.
pub async fn run<D: Daemon>(path: PathBuf) -> ExitStatus {
    let name = D::KIND.name();
    let open_files = crate::limits::raise_open_files_limit();
    let (config, generation) = match read_config(&path) {
        Ok(Read::Config(config)) => {
            tracing::info!(config = %path.display(), "config loaded");
            log_warnings(&config);
            (*config, 1)
        }
        Ok(Read::Missing) => {
            tracing::info!(config = %path.display(), "no config file yet: running on the built-in defaults and waiting for it");
            (Config::defaults(), 0)
        }
        Ok(Read::Blank) => {
            tracing::warn!(config = %path.display(), "config file is empty: running on the built-in defaults and waiting for its content");
            (Config::defaults(), 0)
        }
        Err(error) => {
            tracing::error!("config error: {error}");
            return ExitStatus::Config;
        }
    };

    let registry = SharedRegistry::default();
    let metrics = RuntimeMetrics::register(&registry, name);
    metrics.config_generation.set(generation as i64);
    if let Some(limit) = open_files {
        metrics
            .open_files_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }
    let ready = Arc::new(Readiness::default());
    if generation > 0 {
        ready.set_config_applied();
    }
    let shutdown = CancellationToken::new();
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let admin_addr = config_rx.borrow().admin_addr(D::KIND);
    let (admin_tx, admin_rx) = watch::channel(admin_addr);
    let shared = Arc::new(Shared {
        daemon: name,
        config_path: path.clone(),
        started_at: unix_now(),
        generation: Mutex::new((generation, None)),
    });
    let ctx = Context {
        config: config_rx.clone(),
        shutdown: shutdown.child_token(),
        metrics: registry.clone(),
        status: StatusHandle::default(),
        ready: ready.clone(),
    };

    let admin_listener_stop = CancellationToken::new();
    let admin_state = AdminState {
        registry: registry.clone(),
        ready: ready.clone(),
    };
    let admin = tokio::spawn(admin::serve(
        admin_rx,
        admin_state,
        admin_listener_stop.clone(),
    ));
    // A retired daemon (it handed its work to a new instance) leaves the admin address to that instance.
    let retired = ctx.status.retired();
    let admin_stop = admin_listener_stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = retired.cancelled() => {
                tracing::info!("retired: admin endpoint closed, status record left to the new instance");
                admin_stop.cancel();
            }
            () = admin_stop.cancelled() => {}
        }
    });
    let status_stop = CancellationToken::new();
    let status_writer = tokio::spawn(write_status(
        shared.clone(),
        ctx.clone(),
        metrics.clone(),
        status_stop.clone(),
    ));
    let mut daemon = tokio::spawn(D::run(ctx.clone()));

    let mut exit = ExitStatus::Ok;
    match reload_loop(
        D::KIND,
        &path,
        &config_tx,
        &admin_tx,
        &shared,
        &metrics,
        &ctx,
        &mut daemon,
    )
    .await
    {
        Stop::Signal => {
            shutdown.cancel();
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut daemon).await {
                Ok(Ok(Ok(()))) => tracing::info!("stopped cleanly"),
                Ok(Ok(Err(error))) => {
                    tracing::error!(%error, "{name} failed while stopping");
                    exit = ExitStatus::Failure;
                }
                Ok(Err(join)) => {
                    tracing::error!(error = %join, "{name} task panicked");
                    exit = ExitStatus::Failure;
                }
                Err(_) => {
                    tracing::error!(timeout = ?DRAIN_TIMEOUT, "drain took too long; exiting anyway");
                    daemon.abort();
                    exit = ExitStatus::Failure;
                }
            }
        }
        Stop::Daemon(result) => {
            exit = result;
            shutdown.cancel();
        }
        Stop::Admin => exit = ExitStatus::Failure,
    }
    ctx.set_ready(false);
    status_stop.cancel();
    if let Err(error) = status_writer.await {
        tracing::warn!(%error, "status writer task failed");
    }
    admin_listener_stop.cancel();
    match admin.await {
        Ok(Err(error)) => {
            tracing::error!(%error, "admin endpoint failed");
            exit = ExitStatus::Failure;
        }
        Err(error) => tracing::warn!(%error, "admin task failed"),
        Ok(Ok(())) => {}
    }
    exit
}

enum Stop {
    Signal,
    Daemon(ExitStatus),
    Admin,
}

#[allow(clippy::too_many_arguments)]
async fn reload_loop<E: std::fmt::Display>(
    kind: hybridnet_config::Daemon,
    path: &Path,
    config_tx: &watch::Sender<Arc<Config>>,
    admin_tx: &watch::Sender<std::net::SocketAddr>,
    shared: &Shared,
    metrics: &RuntimeMetrics,
    ctx: &Context,
    daemon: &mut tokio::task::JoinHandle<Result<(), E>>,
) -> Stop {
    let (mut hup, mut term, mut int) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(h), Ok(t), Ok(i)) => (h, t, i),
        _ => {
            tracing::error!("cannot install signal handlers");
            return Stop::Admin;
        }
    };
    let mut watcher = FileWatcher::new(path);
    loop {
        let reason = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Stop::Signal; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Stop::Signal; }
            _ = hup.recv() => "SIGHUP",
            () = watcher.changed() => "file changed",
            result = &mut *daemon => {
                return Stop::Daemon(match result {
                    Ok(Ok(())) => { tracing::info!("daemon returned"); ExitStatus::Ok }
                    Ok(Err(error)) => { tracing::error!(%error, "daemon failed"); ExitStatus::Failure }
                    Err(error) => { tracing::error!(%error, "daemon task panicked"); ExitStatus::Failure }
                });
            }
        };
        reload(
            kind, path, reason, config_tx, admin_tx, shared, metrics, ctx,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn reload(
    kind: hybridnet_config::Daemon,
    path: &Path,
    reason: &str,
    config_tx: &watch::Sender<Arc<Config>>,
    admin_tx: &watch::Sender<std::net::SocketAddr>,
    shared: &Shared,
    metrics: &RuntimeMetrics,
    ctx: &Context,
) {
    match read_config(path) {
        Ok(Read::Config(new)) => {
            let mut generation = shared
                .generation
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            generation.1 = None;
            ctx.ready.set_config_applied();
            // Generation 0 is the built-in defaults: a first file equal to them still counts as applied.
            if generation.0 > 0 && **config_tx.borrow() == *new {
                tracing::info!(reason, "config unchanged");
            } else {
                generation.0 += 1;
                metrics.config_reloads.inc();
                metrics.config_generation.set(generation.0 as i64);
                tracing::info!(reason, generation = generation.0, "new config applied");
                log_warnings(&new);
                admin_tx.send_if_modified(|addr| {
                    let next = new.admin_addr(kind);
                    std::mem::replace(addr, next) != next
                });
                config_tx.send_replace(Arc::from(new));
            }
        }
        Ok(Read::Missing) => {
            tracing::warn!(reason, config = %path.display(), "config file is gone; keeping the running config");
        }
        Ok(Read::Blank) => {
            metrics.config_blank.inc();
            tracing::warn!(reason, config = %path.display(), "config file is empty (truncated, or being written?); keeping the running config");
        }
        Err(error) => {
            metrics.config_reload_errors.inc();
            tracing::error!(
                reason,
                "new config rejected, the running config stays: {error}"
            );
            shared
                .generation
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .1 = Some(error.to_string());
        }
    }
    ctx.status.touch();
}

/// What the config path holds.
#[derive(Debug)]
enum Read {
    Config(Box<Config>),
    /// No file: at start the defaults apply; on reload the running config stays.
    Missing,
    /// An empty or whitespace-only file, as editors and config tools leave it for a moment when they truncate
    /// before writing: treated like a missing file, never applied as the defaults (which would drop every
    /// upstream and peer the real content names).
    Blank,
}

/// Reads and validates the config file, without ever blocking on it (see [`hybridnet_config::read_file`]).
fn read_config(path: &Path) -> Result<Read, hybridnet_config::Error> {
    let text = match hybridnet_config::read_file(path) {
        Ok(text) => text,
        Err(error) if error.is_not_found() => return Ok(Read::Missing),
        Err(error) => return Err(error),
    };
    if text.trim().is_empty() {
        return Ok(Read::Blank);
    }
    hybridnet_config::load_str(&text, path).map(|c| Read::Config(Box::new(c)))
}

fn log_warnings(config: &Config) {
    for warning in &config.warnings {
        tracing::warn!("config: {warning}");
    }
}

/// Writes `status.json` on every change the daemon reports and every [`WRITE_INTERVAL`]; a last record
/// saying "stopped" when `stop` is cancelled.
async fn write_status(
    shared: Arc<Shared>,
    ctx: Context,
    metrics: RuntimeMetrics,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(WRITE_INTERVAL);
    let mut last_error = None;
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
            () = ctx.status.changed() => false,
        };
        if ctx.status.retired().is_cancelled() {
            return; // the new instance writes this record now
        }
        let ready = ctx.is_ready();
        metrics.ready.set(i64::from(ready));
        let (generation, config_error) = shared
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // The details as the daemon's report holds them (JSON text, shared): written without a copy.
        let (mut summary, details) = ctx.status.shared();
        if stopping {
            summary = STOPPED.to_owned();
        }
        let record = DaemonStatus {
            daemon: shared.daemon.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_at: shared.started_at,
            updated_at: unix_now(),
            ready,
            config_path: shared.config_path.display().to_string(),
            config_generation: generation,
            config_error,
            summary,
            details: (),
        };
        let dir = StateDir::new(ctx.config.borrow().state_dir.clone());
        let daemon = shared.daemon;
        // The write fsyncs a file and its directory: keep it off the async workers (the data paths).
        let written = tokio::task::spawn_blocking(move || {
            dir.write(daemon, RECORD, &record.with_details(details.as_deref()))
        })
        .await
        .unwrap_or_else(|join| {
            Err(hybridnet_state::Error::Io {
                path: PathBuf::from(RECORD),
                source: std::io::Error::other(join.to_string()),
            })
        });
        match written {
            Ok(()) => last_error = None,
            Err(error) => {
                let text = error.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(%error, "cannot write the status record");
                    last_error = Some(text);
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hybridnet-runtime-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    /// A truncated file (editors and config tools truncate before they write) is never applied as the
    /// defaults: it reads as blank, like a missing file; a FIFO is an error, returned at once.
    #[test]
    fn blank_missing_fifo_and_real_files_read_apart() {
        let dir = temp_dir("read");
        let path = dir.join("config.yaml");
        assert!(matches!(read_config(&path), Ok(Read::Missing)));
        for blank in ["", "\n", "  \n\t\n"] {
            std::fs::write(&path, blank).unwrap_or_else(|e| panic!("{e}"));
            assert!(matches!(read_config(&path), Ok(Read::Blank)), "{blank:?}");
        }
        std::fs::write(
            &path,
            "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: /tmp/x\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(read_config(&path), Ok(Read::Config(c)) if c.state_dir == Path::new("/tmp/x"))
        );
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap_or_else(|e| panic!("mkfifo: {e}"));
        assert!(made.success());
        let started = std::time::Instant::now();
        let read = read_config(&path);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(
            matches!(&read, Err(hybridnet_config::Error::NotRegular { .. })),
            "{read:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
