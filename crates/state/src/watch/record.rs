//! [`RecordWatcher`]: follows one record of the state directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use inotify::WatchMask;
use serde::de::DeserializeOwned;

use super::{DirEvents, Fingerprint, WatchOptions, fingerprint};
use crate::{Record, StateDir, read_record_file};

/// Records are replaced by rename; the rest catches hand edits and removal.
const RECORD_MASK: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

/// Follows one record, e.g. `meshd/members.json`, and keeps its last good version.
///
/// A missing, partial, corrupt or unreadable record never replaces a good one: [`RecordWatcher::latest`] stays the
/// last good version, and the problem is logged once (and kept in [`RecordWatcher::problem`]) until it changes.
/// A record whose writer stopped writing stays too: judge it with [`RecordWatcher::is_stale`]. The file is read on
/// the task that awaits [`RecordWatcher::changed`] (records are small files on a tmpfs).
///
/// ```no_run
/// # async fn f() {
/// use hybridnet_state::{MEMBERS, Members, RecordWatcher, StateDir, WatchOptions};
/// let state = StateDir::new("/run/hybridnet");
/// let mut members = RecordWatcher::<Members>::new(&state, MEMBERS.0, MEMBERS.1, WatchOptions::default());
/// loop {
///     let record = members.changed().await;
///     let upstreams = record.data.api_servers();
///     # drop(upstreams);
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct RecordWatcher<T> {
    path: PathBuf,
    events: DirEvents,
    latest: Option<Arc<Record<T>>>,
    /// The file version last looked at, good or not.
    seen: Option<Fingerprint>,
    problem: Option<String>,
}

impl<T: DeserializeOwned> RecordWatcher<T> {
    /// Watches `<state_dir>/<writer>/<name>.json` and reads it once now. Call it inside the Tokio runtime.
    pub fn new(state_dir: &StateDir, writer: &str, name: &str, opts: WatchOptions) -> Self {
        Self::at_path(state_dir.record_path(writer, name), opts)
    }

    /// Watches the record file at `path` and reads it once now.
    pub fn at_path(path: impl Into<PathBuf>, opts: WatchOptions) -> Self {
        let path = path.into();
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let filter = path.file_name().map(ToOwned::to_owned);
        let events = DirEvents::new(dir, filter, RECORD_MASK, opts);
        let mut watcher = RecordWatcher {
            path,
            events,
            latest: None,
            seen: None,
            problem: None,
        };
        let now = fingerprint(&watcher.path);
        watcher.load(now);
        watcher
    }

    /// The record file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last good version, if there was one.
    pub fn latest(&self) -> Option<Arc<Record<T>>> {
        self.latest.clone()
    }

    /// Age of the last good version ([`Record::age`]).
    pub fn age(&self) -> Option<Duration> {
        self.latest.as_ref().map(|r| r.age())
    }

    /// True when there is no good version, or it is older than `max_age`.
    pub fn is_stale(&self, max_age: Duration) -> bool {
        self.latest.as_ref().is_none_or(|r| r.is_stale(max_age))
    }

    /// What is wrong with the file now (missing, corrupt, ...), if anything.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// True when inotify is in use (false: polling).
    pub fn uses_inotify(&self) -> bool {
        self.events.uses_inotify()
    }

    /// Looks at the file now; true if a new good version was loaded.
    pub fn reload(&mut self) -> bool {
        let now = fingerprint(&self.path);
        if now == self.seen {
            return false;
        }
        self.load(now)
    }

    /// Returns the next good version that differs from [`RecordWatcher::latest`] (another writer pid, seq or
    /// time). Cancel-safe: nothing is lost when the future is dropped.
    pub async fn changed(&mut self) -> Arc<Record<T>> {
        loop {
            self.events.wait().await;
            if self.reload()
                && let Some(latest) = &self.latest
            {
                return Arc::clone(latest);
            }
        }
    }

    fn load(&mut self, now: Option<Fingerprint>) -> bool {
        self.seen = now;
        if now.is_none() {
            self.note_missing();
            return false;
        }
        match read_record_file::<T>(&self.path) {
            Ok(record) => {
                if self.problem.take().is_some() {
                    tracing::info!(path = %self.path.display(), seq = record.seq, "record readable again");
                }
                if self
                    .latest
                    .as_ref()
                    .is_some_and(|latest| latest.same_version(&record))
                {
                    return false;
                }
                self.latest = Some(Arc::new(record));
                true
            }
            Err(error) if error.is_not_found() => {
                self.seen = None;
                self.note_missing();
                false
            }
            Err(error) => {
                let problem = error.to_string();
                if self.problem.as_ref() != Some(&problem) {
                    let kept = self.latest.as_ref().map(|r| r.seq);
                    tracing::warn!(%error, kept_seq = ?kept, "bad record: keeping the last good version");
                    self.problem = Some(problem);
                }
                false
            }
        }
    }

    fn note_missing(&mut self) {
        let problem = format!("{}: missing", self.path.display());
        if self.problem.as_ref() == Some(&problem) {
            return;
        }
        match &self.latest {
            None => tracing::info!(path = %self.path.display(), "record does not exist yet"),
            Some(latest) => tracing::warn!(
                path = %self.path.display(),
                kept_seq = latest.seq,
                "record removed: keeping the last good version"
            ),
        }
        self.problem = Some(problem);
    }
}
