//! The state directory: versioned records, one writer each.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Serialize};

use crate::atomic::{RECORD_MODE, atomic_write, remove_stale_temps, sync_dir};
use crate::{DaemonStatus, Error, RecordWatcher, STATUS, WatchOptions};

/// The envelope schema this build writes and the newest it reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Records larger than this are refused unread (a record is a few KiB; this bounds memory on a bad file).
pub const MAX_RECORD_SIZE: u64 = 16 << 20;

/// One record as stored: the envelope with its metadata, and the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record<T> {
    /// Envelope schema ([`SCHEMA_VERSION`]).
    pub schema: u32,
    /// The daemon that owns the record (its directory).
    #[serde(default)]
    pub writer: String,
    /// The record's name (its file name without `.json`).
    #[serde(default)]
    pub name: String,
    /// Process id of the writer.
    #[serde(default)]
    pub pid: u32,
    /// Write counter of this record, 1 for the first write; continues across writer restarts.
    #[serde(default)]
    pub seq: u64,
    /// When it was written, unix milliseconds (wall clock).
    #[serde(default)]
    pub updated_at_ms: u64,
    /// The payload.
    pub data: T,
}

impl<T> Record<T> {
    /// When the record was written.
    pub fn updated_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.updated_at_ms)
    }

    /// How long ago it was written (zero if the clock says the future).
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.updated_at())
            .unwrap_or_default()
    }

    /// True when the record is older than `max_age`: its writer stopped writing, or died.
    pub fn is_stale(&self, max_age: Duration) -> bool {
        self.age() > max_age
    }

    /// True when `other` is the same write of the same record (same writer process, seq and time).
    pub fn same_version<U>(&self, other: &Record<U>) -> bool {
        self.pid == other.pid && self.seq == other.seq && self.updated_at_ms == other.updated_at_ms
    }
}

/// What the writer serializes: the envelope around a borrowed payload.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a, T> {
    schema: u32,
    writer: &'a str,
    name: &'a str,
    pid: u32,
    seq: u64,
    updated_at_ms: u64,
    data: &'a T,
}

/// The part of the envelope a reader checks before it trusts the rest.
#[derive(Deserialize)]
struct Header {
    schema: u32,
    #[serde(default)]
    seq: u64,
}

/// The root of the state directory, e.g. `/run/hybridnet`.
///
/// Clones share the per-record write counters, so one process should write a record through one `StateDir` (or
/// its clones).
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
    /// Last `seq` written per record path by this process.
    seqs: Arc<Mutex<HashMap<PathBuf, u64>>>,
}

impl StateDir {
    /// A state directory at `root`; nothing is touched until the first write.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir {
            root: root.into(),
            seqs: Arc::default(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<writer>/<name>.json`.
    pub fn record_path(&self, writer: &str, name: &str) -> PathBuf {
        self.root.join(writer).join(format!("{name}.json"))
    }

    /// Atomically replaces `<root>/<writer>/<name>.json` (temp file, fsync, rename, fsync dir), creating
    /// `<root>/<writer>/` as needed. The first write of a record in this process removes the temp files that a
    /// killed writer left, and resumes `seq` from the record on disk.
    ///
    /// Blocking (small files on a tmpfs: fine on an async task).
    pub fn write<T: Serialize>(&self, writer: &str, name: &str, data: &T) -> Result<(), Error> {
        check_name("writer", writer)?;
        check_name("name", name)?;
        let path = self.record_path(writer, name);
        // One writer per record: holding the lock across the write keeps seq and file order the same.
        let mut seqs = self
            .seqs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let seq = match seqs.get(&path) {
            Some(seq) => seq + 1,
            None => self.first_write(&path)? + 1,
        };
        seqs.insert(path.clone(), seq);
        let envelope = Envelope {
            schema: SCHEMA_VERSION,
            writer,
            name,
            pid: std::process::id(),
            seq,
            updated_at_ms: unix_ms(SystemTime::now()),
            data,
        };
        let mut bytes = serde_json::to_vec(&envelope).map_err(|source| Error::Encode {
            path: path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        atomic_write(&path, &bytes, RECORD_MODE)
    }

    /// Reads one record once (no watching) and returns its data.
    pub fn read<T: DeserializeOwned>(&self, writer: &str, name: &str) -> Result<T, Error> {
        self.read_record(writer, name).map(|record| record.data)
    }

    /// Reads one record once, with its envelope (seq, writer pid, time of the write).
    pub fn read_record<T: DeserializeOwned>(
        &self,
        writer: &str,
        name: &str,
    ) -> Result<Record<T>, Error> {
        check_name("writer", writer)?;
        check_name("name", name)?;
        read_record_file(&self.record_path(writer, name))
    }

    /// Removes a record (e.g. a daemon's status on a clean exit). A missing record is fine.
    pub fn remove(&self, writer: &str, name: &str) -> Result<(), Error> {
        check_name("writer", writer)?;
        check_name("name", name)?;
        let path = self.record_path(writer, name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// A [`RecordWatcher`] for `<root>/<writer>/<name>.json`. Call it inside the Tokio runtime.
    pub fn watch<T: DeserializeOwned>(
        &self,
        writer: &str,
        name: &str,
        opts: WatchOptions,
    ) -> RecordWatcher<T> {
        RecordWatcher::new(self, writer, name, opts)
    }

    /// Writes `<status.daemon>/status.json`.
    pub fn write_status(&self, status: &DaemonStatus) -> Result<(), Error> {
        self.write(&status.daemon, STATUS, status)
    }

    /// Reads `<daemon>/status.json`.
    pub fn read_status(&self, daemon: &str) -> Result<Record<DaemonStatus>, Error> {
        self.read_record(daemon, STATUS)
    }

    /// Prepares the first write of `path` in this process: creates its directory, removes stale temps, and
    /// returns the `seq` of the record already there (0 if none is readable).
    fn first_write(&self, path: &Path) -> Result<u64, Error> {
        if let Some(dir) = path.parent()
            && !dir.is_dir()
        {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            sync_dir(dir.parent().unwrap_or(&self.root))?;
        }
        let removed = remove_stale_temps(path)?;
        if removed > 0 {
            tracing::info!(path = %path.display(), removed, "removed temp files of an interrupted writer");
        }
        Ok(read_bytes(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Header>(&bytes).ok())
            .map_or(0, |h| h.seq))
    }
}

/// Reads and checks the record file at `path` (what [`StateDir::read_record`] does, for any path).
pub fn read_record_file<T: DeserializeOwned>(path: &Path) -> Result<Record<T>, Error> {
    let bytes = read_bytes(path)?;
    parse_record(path, &bytes)
}

/// Parses a record: empty, corrupt, newer schema and data of the wrong shape are distinct errors.
pub(crate) fn parse_record<T: DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
) -> Result<Record<T>, Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::Empty {
            path: path.to_path_buf(),
        });
    }
    let corrupt = |source| Error::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    // The header pass parses the whole document (skipping data), so truncated JSON fails here.
    let header: Header = serde_json::from_slice(bytes).map_err(corrupt)?;
    if header.schema > SCHEMA_VERSION {
        return Err(Error::NewerSchema {
            path: path.to_path_buf(),
            found: header.schema,
            supported: SCHEMA_VERSION,
        });
    }
    if header.schema == 0 {
        return Err(corrupt(serde_json::Error::custom(
            "schema 0 does not exist",
        )));
    }
    serde_json::from_slice(bytes).map_err(|source| Error::Data {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a whole file of at most [`MAX_RECORD_SIZE`] bytes.
fn read_bytes(path: &Path) -> Result<Vec<u8>, Error> {
    let err = |e| Error::io(path, e);
    let file = File::open(path).map_err(err)?;
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    let size = bytes.len() as u64;
    if size > MAX_RECORD_SIZE {
        let size = fs::metadata(path).map_or(size, |m| m.len());
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            size,
            max: MAX_RECORD_SIZE,
        });
    }
    Ok(bytes)
}

/// Writer and record names are single, plain path components.
fn check_name(what: &'static str, name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.starts_with('.') {
        "starts with a dot"
    } else if name.contains(['/', '\0']) {
        "contains '/' or NUL"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        what,
        name: name.to_string(),
        reason,
    })
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
