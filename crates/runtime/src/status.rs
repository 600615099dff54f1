//! `<stateDir>/<daemon>/status.json`: written by the running daemon, read by `status` and the other daemons.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hybridnet_state::{DaemonStatus, StateDir};

use crate::Daemon;
use crate::exit::ExitStatus;

/// How often the record is rewritten even when nothing changed (so readers can tell a live daemon).
pub const WRITE_INTERVAL: Duration = Duration::from_secs(5);
/// A record older than this is stale: its writer is gone or stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// The summary a daemon's last record carries after a clean stop.
pub const STOPPED: &str = "stopped";
/// The record's name under `<stateDir>/<daemon>/`.
pub const RECORD: &str = "status";

pub(crate) use hybridnet_state::unix_now;

/// Whether a record says its daemon is running now.
pub fn is_live(status: &DaemonStatus, now: u64) -> bool {
    status.summary != STOPPED && now.saturating_sub(status.updated_at) <= STALE_AFTER.as_secs()
}

/// `<daemon> status`.
#[allow(clippy::print_stdout)] // printing is this command's job
pub(crate) fn print<D: Daemon>(
    config: &Path,
    state_dir: Option<PathBuf>,
    json: bool,
) -> ExitStatus {
    let name = D::KIND.name();
    let root = state_dir.unwrap_or_else(|| match hybridnet_config::load_file(config) {
        Ok(c) => c.state_dir,
        Err(_) => hybridnet_config::Config::defaults().state_dir,
    });
    let dir = StateDir::new(&root);
    let status: DaemonStatus = match dir.read(name, RECORD) {
        Ok(s) => s,
        Err(error) => {
            eprintln!(
                "{name}: no status record ({error}); is {name} running with stateDir {}?",
                root.display()
            );
            return ExitStatus::Failure;
        }
    };
    let now = unix_now();
    let live = is_live(&status, now);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{}", render::<D>(&status, now, live));
    }
    if live {
        ExitStatus::Ok
    } else {
        ExitStatus::Failure
    }
}

fn render<D: Daemon>(s: &DaemonStatus, now: u64, live: bool) -> String {
    let state = if s.summary == STOPPED {
        "stopped".to_owned()
    } else if !live {
        format!(
            "STALE (last update {}s ago; not running?)",
            now.saturating_sub(s.updated_at)
        )
    } else if s.ready {
        "ready".to_owned()
    } else {
        "not ready".to_owned()
    };
    let mut out = format!(
        "{} {}  pid {}  up {}  {}\nconfig   {} (generation {})\n",
        s.daemon,
        s.version,
        s.pid,
        human_duration(s.updated_at.saturating_sub(s.started_at)),
        state,
        s.config_path,
        s.config_generation,
    );
    if let Some(error) = &s.config_error {
        out.push_str(&format!(
            "config error (running on the previous version): {error}\n"
        ));
    }
    out.push_str(&format!("summary  {}\n", s.summary));
    if !s.details.is_null() {
        for line in D::render_details(&s.details).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `3d4h`, `5m3s`, `42s`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(303), "5m3s");
        assert_eq!(human_duration(3 * 3600 + 120), "3h2m");
        assert_eq!(human_duration(2 * 86400 + 3600), "2d1h");
    }

    #[test]
    fn liveness_from_age_and_stop() {
        let mut s = DaemonStatus {
            updated_at: 1000,
            summary: "idle".into(),
            ..Default::default()
        };
        assert!(is_live(&s, 1010));
        assert!(!is_live(&s, 1000 + STALE_AFTER.as_secs() + 1));
        s.summary = STOPPED.into();
        assert!(!is_live(&s, 1000));
    }
}
