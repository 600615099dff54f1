//! [`FileWatcher`]: follows one file that may not exist yet, e.g. a daemon's config file.

use std::path::{Path, PathBuf};

use inotify::WatchMask;

use super::{DirEvents, Fingerprint, WatchOptions, fingerprint};

/// Every way a file in the directory can change, including a symlink swap beside it (Kubernetes configmaps
/// replace `..data`, which the file's symlink goes through).
const FILE_MASK: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MODIFY)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

/// How the watched file changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileChange {
    /// It exists now and did not before.
    Created,
    /// It was written in place or replaced (renamed over, symlink target swapped).
    Modified,
    /// It does not exist any more.
    Removed,
}

/// Follows one file path, which may not exist yet (on Talos a config file appears after the daemon starts).
///
/// Events in the file's directory wake it (debounced: a burst of events is one change), and a slow poll too;
/// inotify is set up as soon as the directory exists. The file is compared by identity (device, inode, size,
/// mtime, ctime, following symlinks), so [`FileWatcher::changed`] returns only for real changes.
#[derive(Debug)]
pub struct FileWatcher {
    path: PathBuf,
    events: DirEvents,
    seen: Option<Fingerprint>,
}

impl FileWatcher {
    /// Watches `path` with the default [`WatchOptions`]. Call it inside the Tokio runtime.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::with_options(path, WatchOptions::default())
    }

    /// Watches `path`.
    pub fn with_options(path: impl Into<PathBuf>, opts: WatchOptions) -> Self {
        let path = path.into();
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Inotify first, then the first look: nothing that happens in between is missed.
        let events = DirEvents::new(dir, None, FILE_MASK, opts);
        let seen = fingerprint(&path);
        FileWatcher { path, events, seen }
    }

    /// The watched path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file existed at the last look.
    pub fn exists(&self) -> bool {
        self.seen.is_some()
    }

    /// True when inotify is in use (false: polling).
    pub fn uses_inotify(&self) -> bool {
        self.events.uses_inotify()
    }

    /// Looks at the file now: how it changed since the last look, if it did.
    pub fn check(&mut self) -> Option<FileChange> {
        let now = fingerprint(&self.path);
        let change = match (self.seen, now) {
            (None, None) => None,
            (None, Some(_)) => Some(FileChange::Created),
            (Some(_), None) => Some(FileChange::Removed),
            (Some(before), Some(now)) => (before != now).then_some(FileChange::Modified),
        };
        self.seen = now;
        change
    }

    /// Returns at the next change of the file (created, written, replaced or removed). Cancel-safe.
    pub async fn changed(&mut self) {
        self.next_change().await;
    }

    /// [`FileWatcher::changed`], saying how the file changed. Cancel-safe.
    pub async fn next_change(&mut self) -> FileChange {
        loop {
            self.events.wait().await;
            if let Some(change) = self.check() {
                tracing::debug!(path = %self.path.display(), ?change, "file changed");
                return change;
            }
        }
    }
}
