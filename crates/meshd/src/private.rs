//! Reading a private file (the WireGuard key, the peer cache) safely: never blocking on a FIFO, never
//! reading anything but a regular file, and never leaving it readable by group or others. A file found with
//! a looser mode is fixed to 0600 with a warning (someone who could read it may have copied it: the warning
//! says so, so the operator can rotate the key).

use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// The mode bits that must be clear on a private file.
const GROUP_OTHER: u32 = 0o077;
/// Private files are small; a bigger one is refused before it is read.
const MAX_BYTES: u64 = 16 << 20;

/// Reads the private file at `path` (`what` names it in logs), fixing a mode that lets group or others read
/// it. `NotFound` when it does not exist.
pub fn read(path: &Path, what: &str) -> io::Result<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes, over the {MAX_BYTES}-byte limit", meta.len()),
        ));
    }
    tighten(&file, meta.permissions().mode(), path, what);
    let mut bytes = Vec::new();
    file.take(MAX_BYTES).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Sets the mode of `file` to 0600 when group or others have any access, with a warning.
fn tighten(file: &File, mode: u32, path: &Path, what: &str) {
    if mode & GROUP_OTHER == 0 {
        return;
    }
    let mode = format!("{:04o}", mode & 0o7777);
    match file.set_permissions(std::fs::Permissions::from_mode(0o600)) {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            %mode,
            "the {what} was readable by group or others: mode set to 0600 (if others could read it, treat it as exposed)"
        ),
        Err(error) => tracing::warn!(
            path = %path.display(),
            %mode,
            %error,
            "the {what} is readable by group or others and its mode cannot be fixed"
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_readable_file_is_fixed_to_0600_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd.key");
        std::fs::write(&path, "secret").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read(&path, "key").unwrap(), b"secret");
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read(&path, "key").unwrap(), b"secret");
        assert_eq!(mode(&path), 0o400, "a stricter mode is left alone");
    }

    #[test]
    fn a_fifo_or_a_directory_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        assert_eq!(
            read(&fifo, "key").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            read(dir.path(), "key").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            read(&dir.path().join("missing"), "key").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
