//! Watching files: inotify on the file's directory, with a slow poll as fallback.
//!
//! Both watchers wake on inotify events in the file's directory and, in any case, every
//! [`WatchOptions::poll_interval`] (a resync that also covers a lost or overflowed inotify queue). When inotify is
//! unavailable, or the directory does not exist yet, they poll only, and switch to inotify as soon as the directory
//! exists. On each wake they compare the file's identity (device, inode, size, mtime, ctime) with the last one seen,
//! so a wake with no change costs a `stat`. When inotify cannot be set up for lack of descriptors or memory,
//! it is retried every 250 ms (not only every poll interval), so a watcher is back on inotify within a fraction
//! of a second of the pressure ending.
//!
//! The watchers need a Tokio runtime with IO and time enabled (the daemons' runtime has both). Create them inside
//! it: then no change made after `new` returns is missed.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, EventOwned, EventStream, Inotify, WatchMask};
use tokio::time::{Instant, Interval, MissedTickBehavior};

mod file;
mod record;
#[cfg(test)]
mod tests;

pub use file::{FileChange, FileWatcher};
pub use record::RecordWatcher;

/// How a watcher watches.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchOptions {
    /// How often to look at the file without an event: the only way to notice changes when inotify is not in use,
    /// and a resync when it is. Default 5 s.
    pub poll_interval: Duration,
    /// After an event, wait until the directory was quiet this long, so that a burst of events is one change.
    /// Default 100 ms; the wait is capped at ten times this under a continuous stream of events.
    pub debounce: Duration,
    /// Never use inotify (tests; file systems where inotify sees nothing, e.g. some network file systems).
    pub poll_only: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            poll_interval: Duration::from_secs(5),
            debounce: Duration::from_millis(100),
            poll_only: false,
        }
    }
}

impl WatchOptions {
    /// Sets [`WatchOptions::poll_interval`] (at least 10 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Sets [`WatchOptions::debounce`] (zero: none).
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Sets [`WatchOptions::poll_only`].
    pub fn poll_only(mut self, poll_only: bool) -> Self {
        self.poll_only = poll_only;
        self
    }
}

/// While inotify cannot be set up for lack of descriptors or memory (a passing condition: a flood of
/// connections, a burst of work), it is tried again this often, not only every poll interval, so a watcher
/// is back on inotify within a fraction of a second of the pressure ending.
const TRANSIENT_RETRY: Duration = Duration::from_millis(250);

/// True for the errors of `inotify_init`/`inotify_add_watch` that pass by themselves: out of descriptors
/// (the process's or the system's) or memory. (`EMFILE` also means "too many inotify instances for this
/// user"; retrying that is cheap too.)
fn transient(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

/// Events that say the watched directory itself is gone (or moved): inotify must be set up again.
const DIR_LOST: EventMask = EventMask::IGNORED
    .union(EventMask::DELETE_SELF)
    .union(EventMask::MOVE_SELF)
    .union(EventMask::UNMOUNT);

/// Identity of a file's current version, to tell whether anything changed since the last look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The file's fingerprint (following symlinks), `None` if it does not exist or cannot be looked at.
pub(crate) fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// What one inotify event means for the watcher.
enum Seen {
    /// Not about the watched entry.
    Other,
    /// The watched entry may have changed.
    Change,
    /// The directory is gone or the stream failed: fall back to polling.
    Lost,
}

/// Wakes when an entry of one directory may have changed: inotify if it can, polling otherwise.
#[derive(Debug)]
pub(crate) struct DirEvents {
    dir: PathBuf,
    /// Only events about this entry count (plus those about the directory); `None`: all entries.
    filter: Option<OsString>,
    mask: WatchMask,
    opts: WatchOptions,
    stream: Option<EventStream<Vec<u8>>>,
    ticker: Option<Interval>,
    /// The last problem logged, so that each is logged once.
    problem: Option<String>,
    /// The last attempt to set up inotify failed for a passing reason ([`transient`]): retry it soon.
    retry_soon: bool,
}

impl DirEvents {
    /// Watches `dir`; sets up inotify at once when called inside a Tokio runtime.
    pub(crate) fn new(
        dir: PathBuf,
        filter: Option<OsString>,
        mask: WatchMask,
        opts: WatchOptions,
    ) -> Self {
        let mut events = DirEvents {
            dir,
            filter,
            mask,
            opts,
            stream: None,
            ticker: None,
            problem: None,
            retry_soon: false,
        };
        events.arm();
        events
    }

    pub(crate) fn uses_inotify(&self) -> bool {
        self.stream.is_some()
    }

    /// Returns when the watched entry may have changed: after an event (debounced), after a poll interval, or at
    /// once when inotify was just set up (changes before that were not seen). Cancel-safe.
    pub(crate) async fn wait(&mut self) {
        if self.arm() {
            return;
        }
        let period = self.opts.poll_interval.max(Duration::from_millis(10));
        let ticker = self.ticker.get_or_insert_with(|| {
            let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticker
        });
        let Some(stream) = self.stream.as_mut() else {
            if !self.retry_soon {
                ticker.tick().await;
                return;
            }
            // Out of descriptors or memory a moment ago: try inotify again soon, polling meanwhile.
            loop {
                let Some(ticker) = self.ticker.as_mut() else {
                    return;
                };
                tokio::select! {
                    _ = ticker.tick() => return,
                    () = tokio::time::sleep(TRANSIENT_RETRY) => {}
                }
                if self.arm() || !self.retry_soon {
                    return;
                }
            }
        };
        let seen = loop {
            tokio::select! {
                _ = ticker.tick() => return,
                event = stream.next() => match classify(event, self.filter.as_ref()) {
                    Seen::Other => continue,
                    seen => break seen,
                },
            }
        };
        match seen {
            Seen::Lost => self.lose(),
            _ => self.debounce().await,
        }
    }

    /// Sets up inotify if it is not in use and may be; true if it just did.
    fn arm(&mut self) -> bool {
        if self.stream.is_some()
            || self.opts.poll_only
            || tokio::runtime::Handle::try_current().is_err()
        {
            return false;
        }
        match self.open_stream() {
            Ok(stream) => {
                self.stream = Some(stream);
                self.retry_soon = false;
                if self.problem.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "watching with inotify");
                }
                true
            }
            Err(error) => {
                self.retry_soon = transient(&error);
                let interval = self.opts.poll_interval;
                if error.kind() == io::ErrorKind::NotFound {
                    let problem = "directory does not exist yet".to_string();
                    if self.problem.as_ref() != Some(&problem) {
                        tracing::debug!(dir = %self.dir.display(), ?interval, "{problem}: polling until it does");
                        self.problem = Some(problem);
                    }
                } else {
                    let problem = format!("inotify unavailable: {error}");
                    if self.problem.as_ref() != Some(&problem) {
                        tracing::warn!(dir = %self.dir.display(), ?interval, "{problem}: polling instead");
                        self.problem = Some(problem);
                    }
                }
                false
            }
        }
    }

    fn open_stream(&self) -> io::Result<EventStream<Vec<u8>>> {
        let inotify = Inotify::init()?;
        inotify
            .watches()
            .add(&self.dir, self.mask | WatchMask::ONLYDIR)?;
        inotify.into_event_stream(vec![0; 4096])
    }

    /// Drops inotify after the directory went away; the next [`DirEvents::wait`] sets it up again if it can.
    fn lose(&mut self) {
        self.stream = None;
        tracing::debug!(dir = %self.dir.display(), "directory gone or inotify failed: polling");
        self.problem = Some("lost inotify".to_string());
    }

    /// Swallows further events until none came for `debounce` (at most ten times that in all).
    async fn debounce(&mut self) {
        let debounce = self.opts.debounce;
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        if debounce.is_zero() {
            return;
        }
        let deadline = Instant::now() + debounce * 10;
        let lost = loop {
            let quiet = (Instant::now() + debounce).min(deadline);
            match tokio::time::timeout_at(quiet, stream.next()).await {
                Err(_quiet) => break false,
                Ok(event) => {
                    if matches!(classify(event, None), Seen::Lost) {
                        break true;
                    }
                }
            }
            if Instant::now() >= deadline {
                break false;
            }
        };
        if lost {
            self.lose();
        }
    }
}

fn classify(event: Option<io::Result<EventOwned>>, filter: Option<&OsString>) -> Seen {
    match event {
        Some(Ok(event)) if event.mask.intersects(DIR_LOST) => Seen::Lost,
        Some(Ok(event)) if event.mask.contains(EventMask::Q_OVERFLOW) => Seen::Change,
        Some(Ok(event)) => match (filter, &event.name) {
            (None, _) => Seen::Change,
            (Some(want), Some(name)) if want == name => Seen::Change,
            _ => Seen::Other,
        },
        Some(Err(error)) => {
            tracing::warn!(%error, "reading inotify events failed: polling instead");
            Seen::Lost
        }
        None => Seen::Lost,
    }
}
