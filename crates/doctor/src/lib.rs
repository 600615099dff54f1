//! hybridnet-doctor: `<daemon> doctor` checks a node's set-up end to end and says what is wrong, in plain words,
//! with the fix. The same for all three binaries (the runtime's CLI calls [`main`]).
//!
//! - [`facts`]: everything read from the node once (config, kubelet files, status records, kernel);
//! - [`checks`]: pure functions from those facts to [`Finding`]s;
//! - [`kubelet`]: the kubelet's cluster DNS and API server, from kubeadm, Talos and k3s files;
//! - [`render`]: the text and JSON reports.
#![forbid(unsafe_code)]

pub mod checks;
pub mod facts;
pub mod kubelet;
mod model;
pub mod render;
pub mod skew;

use std::path::PathBuf;

pub use facts::{Facts, Liveness, Sources};
pub use model::{Finding, Report, Verdict};

/// `doctor`'s command line (flattened into the runtime's subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The config file (Talos machine config and/or HybridNetConfig).
    #[arg(long, short, default_value = hybridnet_config::DEFAULT_CONFIG_PATH, env = "HYBRIDNET_CONFIG")]
    pub config: PathBuf,
    /// The state directory (default: `stateDir` from the config).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The kubelet's config file (default: kubeadm's, Talos's or k3s's, whichever exists).
    #[arg(long)]
    pub kubelet_config: Option<PathBuf>,
    /// The kubelet's kubeconfig (default: kubeadm's, Talos's or k3s's, whichever exists).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// A URL (`https://host[:port]/` or `http://...`) whose HTTP `Date` the clock is compared with;
    /// repeatable (default: the discovery service endpoints and apiprism's API servers from the config).
    #[arg(long = "time-source", value_name = "URL")]
    pub time_sources: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs every check on this node.
pub fn diagnose(args: &Args, live: Liveness) -> Report {
    let sources = Sources {
        config: args.config.clone(),
        state_dir: args.state_dir.clone(),
        kubelet_config: args.kubelet_config.clone(),
        kubelet_kubeconfig: args.kubeconfig.clone(),
        time_sources: args.time_sources.clone(),
    };
    let now = hybridnet_state::unix_now();
    Report::new(checks::all(&Facts::gather(&sources, live, now)))
}

/// `doctor`: prints the report; `true` when no check failed (exit 0), `false` otherwise (exit 1).
#[allow(clippy::print_stdout)] // printing the report is this command's job
pub fn main(args: &Args, live: Liveness) -> bool {
    let report = diagnose(args, live);
    if args.json {
        println!("{}", render::json(&report));
    } else {
        print!("{}", render::text(&report));
    }
    report.ok
}
