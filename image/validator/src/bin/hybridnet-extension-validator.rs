//! `hybridnet-extension-validator validate --rootfs DIR [--pkg-name NAME] [--talos-version V] [--strict]`:
//! what siderolabs/extensions-validator checks, offline (DIR holds `manifest.yaml` and `rootfs/`).
//! `hybridnet-extension-validator stage --extension DIR --bin-dir DIR --out DIR [--version V]`: stages our tree.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hybridnet_extension_validator::{Options, Version, stage, validate};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Validates Talos system extension trees; stages hybridnet's"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate an extension tree (a directory holding manifest.yaml and rootfs/).
    Validate {
        /// The tree (extensions-validator calls it --rootfs too).
        #[arg(long)]
        rootfs: PathBuf,
        /// The manifest's metadata.name must equal this.
        #[arg(long)]
        pkg_name: Option<String>,
        /// The Talos version to check compatibility.talos.version against.
        #[arg(long, default_value = hybridnet_extension_validator::DEFAULT_TALOS_VERSION)]
        talos_version: String,
        /// Also hybridnet's own stricter rules (unknown keys, entrypoints, no `configuration: true`, ...).
        #[arg(long)]
        strict: bool,
    },
    /// Stage hybridnet's tree from extension/ and the binaries.
    Stage {
        /// The extension sources (manifest.yaml template, service specs, defaults/).
        #[arg(long, default_value = "extension")]
        extension: PathBuf,
        /// Where the binaries named like the entrypoints are.
        #[arg(long)]
        bin_dir: PathBuf,
        /// The output directory (created; must be empty).
        #[arg(long)]
        out: PathBuf,
        /// The manifest's metadata.version.
        #[arg(long, default_value = stage::MANIFEST_VERSION)]
        version: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate {
            rootfs,
            pkg_name,
            talos_version,
            strict,
        } => {
            let talos_version = match Version::parse_tolerant(&talos_version) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("--talos-version: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = Options {
                strict,
                talos_version,
                ..Options::extensions_validator(pkg_name.as_deref())
            };
            match validate(&rootfs, &opts) {
                Ok(report) => {
                    let services: Vec<&str> = report
                        .services
                        .iter()
                        .map(|(_, s)| s.name.as_str())
                        .collect();
                    println!(
                        "{}: extension {} {} is valid ({} files; services: {})",
                        rootfs.display(),
                        report.manifest.name,
                        report.manifest.metadata_version,
                        report.files,
                        if services.is_empty() {
                            "none".to_string()
                        } else {
                            services.join(", ")
                        },
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", rootfs.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Stage {
            extension,
            bin_dir,
            out,
            version,
        } => {
            let binary = |name: &str| -> Result<PathBuf, String> {
                let p = bin_dir.join(name);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(format!("{} is missing", p.display()))
                }
            };
            match stage::stage(&extension, &version, &binary, &out) {
                Ok(names) => {
                    println!("{}: staged {}", out.display(), names.join(", "));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stage: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
