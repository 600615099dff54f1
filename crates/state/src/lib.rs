//! hybridnet-state: the state directory the daemons share (DESIGN.md section 4).
//!
//! CONTRACT STUB: the public items below are what the runtime and the daemons use. The implementation is
//! being filled in; keep these names and signatures (add, don't rename).
#![warn(clippy::print_stdout, clippy::dbg_macro)]

use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The root of the state directory, e.g. `/run/hybridnet`.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<writer>/<name>.json`.
    pub fn record_path(&self, writer: &str, name: &str) -> PathBuf {
        self.root.join(writer).join(format!("{name}.json"))
    }

    /// Atomically replaces `<root>/<writer>/<name>.json` (temp file, fsync, rename, fsync dir).
    pub fn write<T: Serialize>(&self, writer: &str, name: &str, data: &T) -> Result<(), Error> {
        let _ = (writer, name, data);
        Ok(())
    }

    /// Reads one record once (no watching).
    pub fn read<T: DeserializeOwned>(&self, writer: &str, name: &str) -> Result<T, Error> {
        let path = self.record_path(writer, name);
        Err(Error::Io { path, source: std::io::Error::from(std::io::ErrorKind::NotFound) })
    }
}

/// `<daemon>/status.json`: each daemon's health and counters, for `status` and for the other daemons.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonStatus {
    pub daemon: String,
    pub version: String,
    pub pid: u32,
    /// Unix seconds.
    pub started_at: u64,
    /// Unix seconds of this write.
    pub updated_at: u64,
    pub ready: bool,
    /// Path of the config file and how many versions of it were applied.
    pub config_path: String,
    pub config_generation: u64,
    /// Last config error, if the newest file version was rejected.
    pub config_error: Option<String>,
    /// What the daemon is doing, one line.
    pub summary: String,
    /// Daemon-specific details (upstream table, peer table, cache counters ...).
    pub details: serde_json::Value,
}
