//! hybridnet-integration: the harness for tests that run the real daemon binaries, most of them as root in
//! network namespaces (DESIGN.md section 7).
//!
//! What it gives a test:
//! - [`require_root`]: fails (panics with what is missing and how to run) when the process is not root or cannot
//!   use `ip netns`. Root tests never skip silently; everything below that needs root calls it first.
//! - [`Netns`]: a uniquely named network namespace (`hn-<pid>-<n>`, loopback up), deleted on drop; run commands
//!   in it ([`Netns::command`]) or run a closure on a thread that entered it ([`Netns::enter`]).
//! - [`LabNet`]: N nodes (namespaces) joined by veth pairs to a bridge in a "switch" namespace, with addresses
//!   from the documentation ranges ([`Segment`]).
//! - [`Daemon`]: one of our binaries running in a namespace with a config file, stdout/stderr captured to a file
//!   (printed when the test fails), signals, exit with a timeout, killed on drop.
//! - [`http_get`], [`Metrics`]: the admin endpoint seen from inside the namespace (a tiny HTTP/1.0 client).
//! - [`wait_until`]: polling with a deadline, for every "eventually" (never a bare sleep as the assertion).
//! - [`bin_path`], [`talos_fixtures`], [`TestDir`], [`ConfigDoc`], [`run_with_timeout`]: binaries, fixtures,
//!   scratch directories, config documents, CLI runs.
//!
//! The binaries are not built here: `hack/test.sh` runs `cargo build --release -p hybridnet-apiprism
//! -p hybridnet-meshd -p hybridnet-dnslocal` before the tests; [`bin_path`] fails with that command when a
//! binary is missing. Set `HYBRIDNET_BIN_DIR` to test other builds (e.g. the musl ones).
//!
//! Root tests: `sudo -E "$(command -v cargo)" nextest run -p hybridnet-integration` (or `hack/test.sh`).
//! Only the non-root CLI tests: `cargo test -p hybridnet-integration --test cli`.
#![warn(clippy::print_stdout, clippy::dbg_macro)]

pub mod apiprism;
mod config;
mod daemon;
pub mod discovery;
pub mod dnslocal;
mod fs;
mod http;
pub mod kubernetes;
pub mod meshd;
mod netns;
pub mod pki;
mod process;
pub mod qemu;
mod root;
pub mod stale;
mod standin;
mod wait;

pub use config::ConfigDoc;
pub use daemon::{Daemon, DaemonBuilder, DaemonKind, bin_path};
pub use fs::{TestDir, talos_fixtures, write_atomic};
pub use http::{HttpResponse, Metrics, http_get};
pub use netns::{LabNet, LabNode, Netns, SEGMENTS, Segment};
pub use process::{TimedOutput, run_with_timeout};
pub use root::require_root;
pub use wait::{Timeout, patience, wait_until};

/// The version every workspace crate carries (`--version` must print it).
pub const WORKSPACE_VERSION: &str = env!("CARGO_PKG_VERSION");
