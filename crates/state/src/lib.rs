//! hybridnet-state: the state directory the daemons share (DESIGN.md section 4).
//!
//! `stateDir` (default `/run/hybridnet`, a tmpfs) holds small versioned JSON records, **one writer each**, at
//! `<root>/<writer>/<name>.json`: `meshd/members.json` ([`Members`]), `<daemon>/status.json` ([`DaemonStatus`]).
//!
//! # On-disk format
//!
//! Every record is one JSON object, the *envelope* ([`Record`]), followed by a newline:
//!
//! ```json
//! {"schema":1,"writer":"meshd","name":"members","pid":123,"seq":42,"updatedAtMs":1760000000000,"data":{"members":[]}}
//! ```
//!
//! | field | meaning |
//! |---|---|
//! | `schema` | envelope schema, [`SCHEMA_VERSION`] today; a reader refuses a newer one ([`Error::NewerSchema`]) |
//! | `writer`, `name` | the record's identity (the same as its path) |
//! | `pid` | the process that wrote it |
//! | `seq` | write counter of this record; it goes on across writer restarts (the writer resumes from the file) |
//! | `updatedAtMs` | wall-clock time of the write, unix milliseconds: readers judge staleness by it ([`Record::age`]) |
//! | `data` | the payload, e.g. [`Members`] |
//!
//! Unknown fields, in the envelope and in the shared schemas, are ignored, and missing fields of the shared schemas
//! take their defaults: an older reader reads a newer writer's record as long as `schema` is unchanged. `schema` is
//! bumped only for a change an older reader would misread.
//!
//! # Writes
//!
//! [`StateDir::write`] (and the general [`atomic_write`]) write a temp file `.<file>.tmp.<pid>.<random>` in the same
//! directory, fsync it, rename it over the target and fsync the directory: a reader sees the old or the new record,
//! never a mix. A writer killed mid-write leaves its temp file behind; readers never look at it (they open only
//! `<name>.json`), and the record's next writer removes it ([`remove_stale_temps`]).
//!
//! # Reads and watches
//!
//! [`StateDir::read`] / [`StateDir::read_record`] read once. [`RecordWatcher`] follows one record (inotify on its
//! directory, a slow poll as fallback) and keeps the last good version when the file goes missing or turns corrupt.
//! [`FileWatcher`] follows any one file, e.g. a daemon's config file, which may appear only after the daemon starts.
//! The watchers read on the task that awaits them (records are small files on a tmpfs).
//!
//! ```
//! use hybridnet_state::{MEMBERS, Member, Members, StateDir};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let state = StateDir::new(dir.path()); // e.g. /run/hybridnet
//! let members = Members {
//!     members: vec![Member {
//!         name: "cp-1".into(),
//!         addresses: vec!["192.0.2.10".parse()?],
//!         control_plane: true,
//!         api_server_port: Some(6443),
//!         ..Member::default()
//!     }],
//! };
//! state.write(MEMBERS.0, MEMBERS.1, &members)?; // meshd
//! let record = state.read_record::<Members>(MEMBERS.0, MEMBERS.1)?; // apiprism, `meshd status`
//! assert_eq!(record.seq, 1);
//! assert_eq!(record.data.api_servers(), ["192.0.2.10:6443".parse()?]);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(clippy::print_stdout, clippy::dbg_macro, missing_docs)]

mod atomic;
mod clock;
mod schema;
mod store;
mod watch;

use std::path::{Path, PathBuf};

pub use atomic::{PRIVATE_MODE, RECORD_MODE, atomic_write, atomic_write_json, remove_stale_temps};
pub use clock::unix_now;
pub use schema::{
    APIPRISM, DAEMONS, DNSLOCAL, DaemonStatus, MEMBERS, MESHD, Member, Members, STATUS,
    status_record,
};
pub use store::{MAX_RECORD_SIZE, Record, SCHEMA_VERSION, StateDir, read_record_file};
pub use watch::{FileChange, FileWatcher, RecordWatcher, WatchOptions};

/// Errors of the state directory. Each names the file it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading, writing, renaming or syncing a file failed (a missing record is this, with
    /// [`std::io::ErrorKind::NotFound`]: see [`Error::is_not_found`]).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The record file is empty (zero bytes or only whitespace).
    #[error("{path}: empty file, not a record")]
    Empty {
        /// The record file.
        path: PathBuf,
    },
    /// The file is not a record: invalid or truncated JSON, or no envelope.
    #[error("{path}: not a valid record: {source}")]
    Corrupt {
        /// The record file.
        path: PathBuf,
        /// Where the JSON or the envelope is wrong.
        #[source]
        source: serde_json::Error,
    },
    /// The record was written with a newer envelope schema than this build reads.
    #[error(
        "{path}: record schema {found} is newer than this build reads ({supported}): upgrade this daemon"
    )]
    NewerSchema {
        /// The record file.
        path: PathBuf,
        /// The schema in the file.
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// The envelope is fine but its `data` does not have the expected shape.
    #[error("{path}: the record's data is not what this reader expects: {source}")]
    Data {
        /// The record file.
        path: PathBuf,
        /// What does not match.
        #[source]
        source: serde_json::Error,
    },
    /// The file is larger than [`MAX_RECORD_SIZE`].
    #[error("{path}: {size} bytes, more than a record may have ({max})")]
    TooLarge {
        /// The record file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// [`MAX_RECORD_SIZE`].
        max: u64,
    },
    /// A value could not be encoded as JSON.
    #[error("{path}: cannot encode the record: {source}")]
    Encode {
        /// The file it was meant for.
        path: PathBuf,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
    /// A writer or record name that cannot be a path component.
    #[error("invalid record {what} {name:?}: {reason}")]
    InvalidName {
        /// `writer` or `name`.
        what: &'static str,
        /// The name.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

impl Error {
    /// True when the file (or its directory) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// The file or directory the error is about, if it is about one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::Empty { path }
            | Error::Corrupt { path, .. }
            | Error::NewerSchema { path, .. }
            | Error::Data { path, .. }
            | Error::TooLarge { path, .. }
            | Error::Encode { path, .. } => Some(path),
            Error::InvalidName { .. } => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
