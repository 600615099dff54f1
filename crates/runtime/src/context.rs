//! What a daemon's `run` receives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hybridnet_config::Config;
use serde_json::value::RawValue;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::SharedRegistry;

/// Handed to [`crate::Daemon::run`].
#[derive(Debug, Clone)]
pub struct Context {
    /// The applied config; a new value arrives whenever a valid new version of the file is applied.
    pub config: watch::Receiver<Arc<Config>>,
    /// Cancelled on SIGTERM/SIGINT: stop accepting work, drain, return.
    pub shutdown: CancellationToken,
    /// Register the daemon's metrics here (under its own prefix); `/metrics` serves them.
    pub metrics: SharedRegistry,
    /// The daemon's one-line summary and details for `status.json`.
    pub status: StatusHandle,
    pub(crate) ready: Arc<Readiness>,
}

impl Context {
    /// Marks the daemon ready or not. Call it after the first successful apply of a config.
    /// `/readyz` says 200 only while the daemon says ready *and* a config file has been applied: a daemon
    /// running on the built-in defaults while it waits for its file is alive (`/healthz`) but not ready.
    pub fn set_ready(&self, ready: bool) {
        if self.ready.daemon.swap(ready, Ordering::SeqCst) != ready {
            tracing::info!(ready, "readiness changed");
            self.status.touch();
        }
    }

    /// Whether the daemon is ready (it said so, and a config file has been applied).
    pub fn is_ready(&self) -> bool {
        self.ready.is_ready()
    }

    /// The daemon handed its work to a new instance and stays only until it is stopped: not ready, and the
    /// runtime stops writing its status record (the new instance writes the same file) and closes its admin
    /// endpoint (the new instance binds the same address). For good: there is no way back.
    pub fn retire(&self) {
        self.set_ready(false);
        self.status.inner.retired.cancel();
        self.status.touch();
    }
}

/// The two halves of readiness: the daemon's own word, and the runtime's (a config file was applied).
#[derive(Debug, Default)]
pub struct Readiness {
    daemon: AtomicBool,
    config_applied: AtomicBool,
}

impl Readiness {
    /// Both halves hold.
    pub fn is_ready(&self) -> bool {
        self.daemon.load(Ordering::SeqCst) && self.config_applied.load(Ordering::SeqCst)
    }

    pub(crate) fn set_config_applied(&self) {
        self.config_applied.store(true, Ordering::SeqCst);
    }

    #[cfg(test)]
    pub(crate) fn set_both(&self) {
        self.daemon.store(true, Ordering::SeqCst);
        self.config_applied.store(true, Ordering::SeqCst);
    }
}

/// What the daemon reports about itself; the runtime writes it to `status.json` on change and periodically.
#[derive(Debug, Clone, Default)]
pub struct StatusHandle {
    inner: Arc<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    /// The details as written (compact JSON; `None` is `null`), shared with the status writer: a
    /// `serde_json::Value` takes several times its text's size (meshd's, about 4 KB per peer, against 0.7 KB
    /// of text) and the writer copied it at every write.
    report: Mutex<(String, Option<Arc<RawValue>>)>,
    changed: Notify,
    /// Cancelled by [`Context::retire`].
    retired: tokio_util::sync::CancellationToken,
}

impl StatusHandle {
    /// Replaces the summary line and the details.
    pub fn set(&self, summary: impl Into<String>, details: serde_json::Value) {
        // A `Value` always serializes (its map keys are strings).
        let details = serde_json::value::to_raw_value(&details)
            .ok()
            .map(Arc::from);
        self.replace(summary.into(), details);
    }

    /// Replaces the summary line and the details, given as JSON text: a daemon with large details writes
    /// them piece by piece instead of building one `Value` of them all.
    pub fn set_json(&self, summary: impl Into<String>, details: Box<RawValue>) {
        self.replace(summary.into(), Some(Arc::from(details)));
    }

    fn replace(&self, summary: String, details: Option<Arc<RawValue>>) {
        let old = std::mem::replace(
            &mut *self
                .inner
                .report
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            (summary, details),
        );
        drop(old); // outside the lock
        self.touch();
    }

    /// The current summary and details as written, shared (no copy).
    pub(crate) fn shared(&self) -> (String, Option<Arc<RawValue>>) {
        self.inner
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The current summary and details.
    pub fn get(&self) -> (String, serde_json::Value) {
        let (summary, details) = self.shared();
        let details = details
            .and_then(|d| serde_json::from_str(d.get()).ok())
            .unwrap_or_default();
        (summary, details)
    }

    /// Asks for the status record to be written soon.
    pub(crate) fn touch(&self) {
        self.inner.changed.notify_one();
    }

    /// Cancelled once the daemon retired ([`Context::retire`]).
    pub(crate) fn retired(&self) -> tokio_util::sync::CancellationToken {
        self.inner.retired.clone()
    }

    /// Waits until the daemon changes its report (or readiness).
    pub(crate) async fn changed(&self) {
        self.inner.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hybridnet_state::DaemonStatus;
    use serde_json::{Value, json};

    /// The details are kept as the JSON text the writer writes; they read back as set.
    #[test]
    fn details_are_kept_as_their_json_and_read_back_as_set() {
        let status = StatusHandle::default();
        assert_eq!(status.get().1, Value::Null, "nothing set: null");
        let details = json!({
            "peers": [{"name": "a", "rttMs": 1.5, "allowedIPs": ["10.0.0.1/32"], "lastSeen": null}],
            "error": null,
            "listenPort": 51820,
        });
        status.set("1/1 peers up", details.clone());
        let (summary, shared) = status.shared();
        assert_eq!(summary, "1/1 peers up");
        let text = serde_json::to_string(&details).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shared.as_deref().map(RawValue::get), Some(text.as_str()));
        assert_eq!(status.get().1, details);
        // The record as the supervisor writes it (borrowed details) reads back with the same details.
        let record = DaemonStatus::<()> {
            summary,
            ..DaemonStatus::default()
        }
        .with_details(shared.as_deref());
        let bytes = serde_json::to_vec(&record).unwrap_or_else(|e| panic!("{e}"));
        let read: DaemonStatus = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.details, details);
        assert_eq!(read.summary, "1/1 peers up");
        // Details given as text are kept as given.
        let raw = RawValue::from_string(text).unwrap_or_else(|e| panic!("{e}"));
        status.set_json("again", raw);
        assert_eq!(status.get(), ("again".to_owned(), details));
    }
}
