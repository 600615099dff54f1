//! Logs go to stderr only (the supervisor, Talos or systemd, captures them).
//!
//! `<DAEMON>_LOG` sets the filter (`info` by default; `debug`, `apiprism=trace,warn`, ...), and
//! `<DAEMON>_LOG_FORMAT=json` switches from plain text to one JSON object per line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber for `daemon`. Returns a warning to log if the env vars were bad.
pub fn init(daemon: &str) -> Option<String> {
    let upper = daemon.to_ascii_uppercase();
    let filter_var = format!("{upper}_LOG");
    let format_var = format!("{upper}_LOG_FORMAT");
    let mut warning = None;

    let filter = match std::env::var(&filter_var) {
        Ok(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|error| {
            warning = Some(format!(
                "{filter_var}={spec:?} is not a valid filter ({error}); using `info`"
            ));
            EnvFilter::new("info")
        }),
        Err(_) => EnvFilter::new("info"),
    };
    let json = match std::env::var(&format_var).as_deref() {
        Ok("json") => true,
        Ok("plain") | Err(_) => false,
        Ok(other) => {
            warning = Some(format!(
                "{format_var}={other:?}: expected `plain` or `json`; using `plain`"
            ));
            false
        }
    };

    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // try_init fails only if a subscriber is already installed (tests): keep that one.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    warning
}
