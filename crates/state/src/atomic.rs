//! Atomic file replacement: temp file in the same directory, fsync, rename, fsync the directory.

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::Error;

/// Mode of state records: readable by all (the daemons may run as different users), written by their one writer.
pub const RECORD_MODE: u32 = 0o644;

/// Mode of private files, e.g. meshd's WireGuard private key in `dataDir`.
pub const PRIVATE_MODE: u32 = 0o600;

/// Atomically replaces `path` with `bytes`, created with exactly `mode` (e.g. [`PRIVATE_MODE`]).
///
/// The bytes go to a temp file `.<file>.tmp.<pid>.<random>` beside `path` that is created with `mode` (the umask can
/// only narrow it, so the file is never readable wider than `mode`, not even for a moment), then set to exactly
/// `mode`, written in full, fsynced, renamed over `path`, and the directory is fsynced. A reader sees the old content
/// or the new one, never a mix. On error the temp file is removed. The directory must exist.
///
/// Blocking: call it from `spawn_blocking` if the file is large or the disk slow (records on a tmpfs are fine).
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let (dir, file_name) = split(path)?;
    let tmp = dir.join(temp_name(file_name));
    if let Err(error) = write_new(&tmp, bytes, mode) {
        discard(&tmp);
        return Err(error);
    }
    if let Err(source) = fs::rename(&tmp, path) {
        discard(&tmp);
        return Err(Error::io(path, source));
    }
    sync_dir(dir)
}

/// [`atomic_write`] of `value` as JSON (compact, with a final newline).
pub fn atomic_write_json<T: Serialize + ?Sized>(
    path: &Path,
    value: &T,
    mode: u32,
) -> Result<(), Error> {
    let mut bytes = serde_json::to_vec(value).map_err(|source| Error::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    atomic_write(path, &bytes, mode)
}

/// Removes the temp files that writers of `path` killed mid-write left behind (those of other processes: this
/// process's own temp files belong to writes in progress). Returns how many it removed; a missing directory is 0.
///
/// [`crate::StateDir::write`] calls it before the first write of each record.
pub fn remove_stale_temps(path: &Path) -> Result<usize, Error> {
    let (dir, file_name) = split(path)?;
    let prefix = temp_prefix(file_name);
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let own = format!("{}.", std::process::id());
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(rest) = name.as_bytes().strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        if rest.starts_with(own.as_bytes()) {
            continue;
        }
        let stale = entry.path();
        match fs::remove_file(&stale) {
            Ok(()) => {
                tracing::debug!(path = %stale.display(), "removed a stale temp file");
                removed += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(stale, e)),
        }
    }
    Ok(removed)
}

/// fsyncs a directory, so that a rename or a new entry in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// The directory of `path` (`.` for a bare file name) and its file name.
fn split(path: &Path) -> Result<(&Path, &OsStr), Error> {
    let file_name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    Ok((dir, file_name))
}

fn write_new(tmp: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let err = |e| Error::io(tmp, e);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(err)?;
    // The umask may have narrowed the mode: set exactly what was asked (never wider than it).
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

fn discard(tmp: &Path) {
    if let Err(error) = fs::remove_file(tmp)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %tmp.display(), %error, "cannot remove a temp file");
    }
}

fn temp_prefix(file_name: &OsStr) -> String {
    format!(".{}.tmp.", file_name.to_string_lossy())
}

/// `.<file>.tmp.<pid>.<random>`: unique per write, and tells whose it is.
fn temp_name(file_name: &OsStr) -> PathBuf {
    PathBuf::from(format!(
        "{}{}.{:016x}",
        temp_prefix(file_name),
        std::process::id(),
        random_u64()
    ))
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0)
    }

    #[test]
    fn writes_with_exact_mode_and_replaces() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let key = dir.path().join("meshd.key");
        atomic_write(&key, b"secret\n", PRIVATE_MODE)?;
        assert_eq!(mode_of(&key), 0o600);
        assert_eq!(fs::read(&key).ok().as_deref(), Some(&b"secret\n"[..]));
        atomic_write(&key, b"other\n", PRIVATE_MODE)?;
        assert_eq!(fs::read(&key).ok().as_deref(), Some(&b"other\n"[..]));
        let plain = dir.path().join("plain.json");
        atomic_write_json(&plain, &serde_json::json!({"a": 1}), RECORD_MODE)?;
        assert_eq!(mode_of(&plain), 0o644);
        assert_eq!(
            fs::read_to_string(&plain).ok().as_deref(),
            Some("{\"a\":1}\n")
        );
        // Nothing left behind.
        assert_eq!(fs::read_dir(dir.path()).map(|d| d.count()).ok(), Some(2));
        Ok(())
    }

    #[test]
    fn failed_rename_removes_temp() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let target = dir.path().join("x.json");
        fs::create_dir(&target).map_err(|e| Error::io(&target, e))?;
        fs::write(target.join("inside"), b"x").map_err(|e| Error::io(&target, e))?;
        let err = atomic_write(&target, b"data", RECORD_MODE).err();
        assert!(
            matches!(&err, Some(Error::Io { path, .. }) if path == &target),
            "{err:?}"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .map_err(|e| Error::io(dir.path(), e))?
            .flatten()
            .collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
        Ok(())
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_temp() {
        let err = atomic_write(
            Path::new("/nonexistent-hybridnet/x.json"),
            b"{}",
            RECORD_MODE,
        )
        .err();
        assert!(matches!(&err, Some(e) if e.is_not_found()), "{err:?}");
    }

    #[test]
    fn removes_only_other_processes_temps() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let target = dir.path().join("members.json");
        let stale = dir
            .path()
            .join(".members.json.tmp.999999999.0123456789abcdef");
        let own = dir
            .path()
            .join(format!(".members.json.tmp.{}.00", std::process::id()));
        let other_record = dir.path().join(".status.json.tmp.999999999.00");
        for p in [&stale, &own, &other_record] {
            fs::write(p, b"partial").map_err(|e| Error::io(p, e))?;
        }
        assert_eq!(remove_stale_temps(&target)?, 1);
        assert!(!stale.exists() && own.exists() && other_record.exists());
        assert_eq!(remove_stale_temps(&dir.path().join("gone/x.json"))?, 0);
        Ok(())
    }
}
