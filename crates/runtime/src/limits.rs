//! Local resource pressure: the open-file limit, raised at start, and telling "we are out of descriptors or
//! memory" apart from "the peer failed".
//!
//! A dial or a send that fails with `EMFILE`, `ENFILE`, `ENOBUFS` or `ENOMEM` says nothing about the peer:
//! any local process can push a daemon there (opening connections to apiprism until its limit is reached).
//! Counting such a failure against an upstream or a peer would let local pressure cut healthy paths, so
//! every daemon checks [`is_local_pressure`] before it blames the other side.

use std::io;

use nix::errno::Errno;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// True when `error` is local resource exhaustion (descriptors, socket buffers, memory), not a failure
/// of the remote side.
pub fn is_local_pressure(error: &io::Error) -> bool {
    error.raw_os_error().is_some_and(|code| {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
            .iter()
            .any(|e| *e as i32 == code)
    })
}

/// The current soft limit on open files (`RLIMIT_NOFILE`), `None` when it cannot be read. `u64::MAX`
/// stands for "unlimited".
pub fn open_files_limit() -> Option<u64> {
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does at start), so that a daemon is not
/// held to a default soft limit of 1024 when more is allowed. Returns the soft limit in force afterwards.
pub fn raise_open_files_limit() -> Option<u64> {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(
                    from = soft,
                    to = hard,
                    "open-file limit raised to the hard limit"
                );
                Some(hard)
            }
            Err(error) => {
                tracing::warn!(%error, soft, hard, "cannot raise the open-file limit");
                Some(soft)
            }
        },
        Ok((soft, _)) => Some(soft),
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_pressure_is_told_apart_from_peer_failures() {
        for errno in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            assert!(is_local_pressure(&io::Error::from_raw_os_error(
                errno as i32
            )));
        }
        for errno in [Errno::ECONNREFUSED, Errno::ETIMEDOUT, Errno::EHOSTUNREACH] {
            assert!(!is_local_pressure(&io::Error::from_raw_os_error(
                errno as i32
            )));
        }
        assert!(!is_local_pressure(&io::Error::other("timed out")));
    }

    #[test]
    fn the_limit_is_readable_and_raising_never_lowers_it() {
        let before = open_files_limit();
        assert!(before.is_some());
        let after = raise_open_files_limit();
        assert!(after >= before, "{before:?} -> {after:?}");
    }
}
