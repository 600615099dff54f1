//! CLI tests of the three binaries (no root needed): `--version`, `--help`, `check-config` on every Talos
//! fixture and on bad inputs, `status` without a record.
//!
//! Needs the release binaries: `cargo build --release -p hybridnet-apiprism -p hybridnet-meshd
//! -p hybridnet-dnslocal` (`hack/test.sh` does it). Run alone: `cargo test -p hybridnet-integration --test cli`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use hybridnet_integration::{
    ConfigDoc, DaemonKind, TestDir, WORKSPACE_VERSION, run_with_timeout, talos_fixtures,
};

const CLI: Duration = Duration::from_secs(5);
/// "Fail fast": a hostile file is rejected in well under this.
const FAST: Duration = Duration::from_secs(2);
/// The address space a `check-config` may use (KiB): a YAML bomb must not expand into gigabytes.
const MEMORY_LIMIT_KIB: u32 = 1 << 20;
const EX_CONFIG: i32 = 78;

fn version(kind: DaemonKind) -> Result<()> {
    let out = kind.cli(&["--version"], CLI);
    ensure!(out.code() == Some(0), "{}", out.describe());
    ensure!(
        out.stdout.contains(kind.name()) && out.stdout.contains(WORKSPACE_VERSION),
        "{}",
        out.describe()
    );
    Ok(())
}

fn help(kind: DaemonKind) -> Result<()> {
    let out = kind.cli(&["--help"], CLI);
    ensure!(out.code() == Some(0), "{}", out.describe());
    for subcommand in ["run", "check-config", "status"] {
        ensure!(
            out.stdout.contains(subcommand),
            "--help does not mention {subcommand}:\n{}",
            out.describe()
        );
    }
    Ok(())
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    Ok(files)
}

fn check_config(
    kind: DaemonKind,
    path: &Path,
    extra: &[&str],
) -> hybridnet_integration::TimedOutput {
    let path = path.display().to_string();
    let mut args = vec!["check-config", "--config", path.as_str()];
    args.extend_from_slice(extra);
    kind.cli(&args, CLI)
}

fn accepts_every_talos_fixture(kind: DaemonKind) -> Result<()> {
    let root = talos_fixtures();
    let mut files = yaml_files(&root.join("machine-config"))?;
    files.extend(yaml_files(&root.join("documents"))?);
    ensure!(
        files.len() >= 30,
        "only {} fixture files in {}",
        files.len(),
        root.display()
    );
    let failures: Vec<String> = files
        .iter()
        .map(|file| (file, check_config(kind, file, &[])))
        .filter(|(_, out)| out.code() != Some(0))
        .map(|(file, out)| format!("{}: {}", file.display(), out.describe()))
        .collect();
    if !failures.is_empty() {
        bail!(
            "{} of {} fixtures rejected:\n{}",
            failures.len(),
            files.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

fn accepts_our_document_and_prints_json(kind: DaemonKind) -> Result<()> {
    let dir = TestDir::new("check");
    let mut doc = ConfigDoc::new(Path::new("/run/hybridnet-test/node1"));
    // This machine config keeps Talos's KubePrism on 127.0.0.1:7445: apiprism must use another port.
    doc.apiprism_listen = vec!["127.0.0.1:7455".into()];
    doc.preamble = Some(std::fs::read_to_string(
        talos_fixtures().join("machine-config/v1.15-base-worker.yaml"),
    )?);
    let file = dir.join("config.yaml");
    std::fs::write(&file, doc.render())?;
    let text = check_config(kind, &file, &[]);
    ensure!(
        text.code() == Some(0) && !text.stdout.trim().is_empty(),
        "{}",
        text.describe()
    );
    ensure!(
        text.stdout.contains("/run/hybridnet-test/node1/state"),
        "stateDir not shown:\n{}",
        text.describe()
    );
    let json = check_config(kind, &file, &["--json"]);
    ensure!(json.code() == Some(0), "{}", json.describe());
    let value: serde_json::Value = serde_json::from_str(&json.stdout).context(json.describe())?;
    ensure!(
        value.is_object(),
        "check-config --json is not an object:\n{}",
        json.describe()
    );
    Ok(())
}

/// One hostile or wrong config: what it is, its bytes, and what stderr must show.
struct Bad {
    name: &'static str,
    bytes: Vec<u8>,
    /// Stderr must contain this (case-insensitive), e.g. the suggested key.
    needle: Option<&'static str>,
    /// The error names `file:line:column:`.
    positioned: bool,
}

fn our_doc() -> String {
    ConfigDoc::new(Path::new("/run/hybridnet-test/node1")).render()
}

/// `our_doc()` with `from` replaced by `to` (which must occur).
fn edited(from: &str, to: &str) -> Vec<u8> {
    let doc = our_doc();
    assert!(
        doc.contains(from),
        "{from:?} is not in the rendered document:\n{doc}"
    );
    doc.replace(from, to).into_bytes()
}

fn alias_bomb() -> Vec<u8> {
    let mut bomb = String::from(
        "version: v1alpha1\nmachine:\n  type: worker\n  laughs:\n    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for (prev, name) in "abcdefgh".chars().zip("bcdefghi".chars()) {
        let refs = vec![format!("*{prev}"); 9].join(", ");
        bomb.push_str(&format!("    {name}: &{name} [{refs}]\n"));
    }
    bomb.push_str("---\n");
    bomb.push_str(&our_doc());
    bomb.into_bytes()
}

fn ten_mib() -> Vec<u8> {
    let mut text = our_doc();
    let line =
        "# padding padding padding padding padding padding padding padding padding padding\n";
    while text.len() < 10 << 20 {
        text.push_str(line);
    }
    text.into_bytes()
}

fn junk() -> Vec<u8> {
    // A fixed xorshift stream: every byte value, NULs and invalid UTF-8 included.
    let mut x: u32 = 0x9e37_79b9;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn bad_inputs() -> Vec<Bad> {
    let tabs = "apiVersion: v1alpha1\nkind: HybridNetConfig\nmeshd:\n\tlistenPort: 51821\n";
    let kubeprism_on = "apiVersion: v1alpha1\nkind: KubePrismConfig\nport: 7445\n";
    let talos_negations = "apiVersion: v1alpha1\nkind: KubeSpanConfig\nenabled: true\nfilters:\n    endpoints:\n        - \"!10.0.0.0/8\"\n        - \"!192.168.0.0/16\"\n";
    vec![
        Bad {
            name: "alias bomb",
            bytes: alias_bomb(),
            needle: None,
            positioned: false,
        },
        Bad {
            name: "10 MiB file",
            bytes: ten_mib(),
            needle: None,
            positioned: false,
        },
        Bad {
            name: "binary junk",
            bytes: junk(),
            needle: None,
            positioned: false,
        },
        Bad {
            name: "tab indentation",
            bytes: tabs.as_bytes().to_vec(),
            needle: None,
            positioned: true,
        },
        Bad {
            name: "duplicate documents",
            bytes: format!("{}---\n{}", our_doc(), our_doc()).into_bytes(),
            needle: None,
            positioned: false,
        },
        Bad {
            name: "CIDR 10.0.0.0/33",
            bytes: edited(
                "location: \"lab\"",
                "location: \"lab\", addresses: [\"10.0.0.0/33\"]",
            ),
            needle: Some("10.0.0.0/33"),
            positioned: true,
        },
        Bad {
            name: "port 70000",
            bytes: edited("listenPort: 51821", "listenPort: 70000"),
            needle: Some("70000"),
            positioned: true,
        },
        Bad {
            name: "endpoint filter of negations only",
            bytes: edited(
                "location: \"lab\"",
                "location: \"lab\", filters: {endpoints: [\"!10.0.0.0/8\"]}",
            ),
            needle: Some("nothing"),
            positioned: true,
        },
        Bad {
            name: "Talos endpoint filter of negations only",
            bytes: format!("{talos_negations}---\n{}", our_doc()).into_bytes(),
            needle: Some("nothing"),
            positioned: false,
        },
        Bad {
            name: "apiprism on the port of Talos's KubePrism",
            bytes: format!("{kubeprism_on}---\n{}", our_doc()).into_bytes(),
            needle: Some("7445"),
            positioned: true,
        },
        Bad {
            name: "misspelt key",
            bytes: edited("listenPort:", "listenPrt:"),
            needle: Some("listenPort"),
            positioned: true,
        },
    ]
}

/// `path:LINE:COL:` somewhere in `stderr`.
fn has_position(stderr: &str, path: &Path) -> bool {
    let prefix = format!("{}:", path.display());
    stderr.match_indices(&prefix).any(|(at, _)| {
        let mut parts = stderr[at + prefix.len()..].splitn(3, ':');
        let mut number = || {
            parts
                .next()
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        number() && number()
    })
}

fn rejects_bad_inputs(kind: DaemonKind) -> Result<()> {
    let dir = TestDir::new("bad");
    let mut failures = Vec::new();
    for (i, bad) in bad_inputs().into_iter().enumerate() {
        let file = dir.join(format!("bad-{i}.yaml"));
        std::fs::write(&file, &bad.bytes)?;
        // Bounded memory: the address space is capped, so a blow-up aborts instead of exiting 78.
        let limit = format!("ulimit -v {MEMORY_LIMIT_KIB}; exec \"$@\"");
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", &limit, "sh"])
            .arg(kind.bin())
            .args(["check-config", "--config"])
            .arg(&file);
        cmd.env_remove("HYBRIDNET_CONFIG");
        let out = run_with_timeout(&mut cmd, CLI);
        if std::env::var_os("HYBRIDNET_TEST_VERBOSE").is_some() {
            eprintln!("[{}] {}", bad.name, out.describe());
        }
        let stderr = out.stderr.to_lowercase();
        let problem = if out.code() != Some(EX_CONFIG) {
            Some(format!("want exit {EX_CONFIG}"))
        } else if stderr.contains("panicked") || out.stderr.trim().is_empty() {
            Some("want a config error message on stderr, and no panic".to_owned())
        } else if out.elapsed > FAST {
            Some(format!("want a fast failure (< {FAST:?})"))
        } else if bad
            .needle
            .is_some_and(|n| !stderr.contains(&n.to_lowercase()))
        {
            Some(format!(
                "want {:?} in stderr",
                bad.needle.unwrap_or_default()
            ))
        } else if bad.positioned && !has_position(&out.stderr, &file) {
            Some(format!("want `{}:LINE:COLUMN:` in stderr", file.display()))
        } else {
            None
        };
        if let Some(problem) = problem {
            failures.push(format!("[{}] {problem}; got {}", bad.name, out.describe()));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} bad inputs not rejected as they should be:\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    Ok(())
}

fn status_without_a_record_exits_1(kind: DaemonKind) -> Result<()> {
    let dir = TestDir::new("status");
    let out = kind.cli(
        &["status", "--state-dir", &dir.path().display().to_string()],
        CLI,
    );
    ensure!(
        out.code() == Some(1) && !out.stderr.trim().is_empty(),
        "{}",
        out.describe()
    );
    let json = kind.cli(
        &[
            "status",
            "--state-dir",
            &dir.path().display().to_string(),
            "--json",
        ],
        CLI,
    );
    ensure!(json.code() == Some(1), "{}", json.describe());
    Ok(())
}

macro_rules! per_daemon {
    ($($module:ident => $kind:expr;)*) => {$(
        mod $module {
            use super::*;
            const KIND: DaemonKind = $kind;
            #[test]
            fn version() -> Result<()> { super::version(KIND) }
            #[test]
            fn help() -> Result<()> { super::help(KIND) }
            #[test]
            fn check_config_accepts_every_talos_fixture() -> Result<()> { super::accepts_every_talos_fixture(KIND) }
            #[test]
            fn check_config_accepts_our_document_and_prints_json() -> Result<()> { super::accepts_our_document_and_prints_json(KIND) }
            #[test]
            fn check_config_rejects_bad_inputs() -> Result<()> { super::rejects_bad_inputs(KIND) }
            #[test]
            fn status_without_a_record_exits_1() -> Result<()> { super::status_without_a_record_exits_1(KIND) }
        }
    )*};
}

per_daemon! {
    apiprism => DaemonKind::Apiprism;
    meshd => DaemonKind::Meshd;
    dnslocal => DaemonKind::Dnslocal;
}

#[test]
fn has_position_finds_file_line_column() {
    let path = Path::new("/tmp/x.yaml");
    assert!(has_position(
        "meshd: config error: /tmp/x.yaml:4:1: tab",
        path
    ));
    assert!(!has_position("/tmp/x.yaml: no such file", path));
    assert!(!has_position("/tmp/x.yaml:4: tab", path));
}
