//! Refuses daemon binaries older than the sources they are built from (a forgotten rebuild would make a root
//! test pass or fail against yesterday's code).
//!
//! The sources are the workspace files cargo's dep-info lists for the binary (`<binary>.d` beside it: exactly
//! what a rebuild would look at, so a rebuild always clears the failure); without one (or when it names files
//! of another checkout), every `.rs` and `.toml` under `crates/` and `Cargo.lock`. Modification times alone would fail a fresh `git clone` run against
//! binaries built before the clone (every checked-out file gets the time of the checkout), so a file newer
//! than the binary only counts when git says its content changed since: it is modified against `HEAD`, or a
//! commit after the build touched it. Without git, the modification times decide.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Panics, saying how to rebuild, when `bin` is older than the sources ([`stale_reason`]). Checked once per
/// binary per test process.
pub fn require_fresh(bin: &Path) {
    static CHECKED: Mutex<Option<HashMap<PathBuf, Option<String>>>> = Mutex::new(None);
    let reason = {
        let mut guard = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .get_or_insert_with(HashMap::new)
            .entry(bin.to_owned())
            .or_insert_with(|| stale_reason(bin, &workspace()))
            .clone()
    };
    if let Some(reason) = reason {
        panic!(
            "{} is older than the sources it is built from ({reason}): the test would run old code. Rebuild \
             (hack/test.sh does):\n    cargo build --release --locked --target x86_64-unknown-linux-musl \
             -p hybridnet-apiprism -p hybridnet-meshd -p hybridnet-dnslocal\nor point HYBRIDNET_BIN_DIR at \
             binaries built from this tree.",
            bin.display()
        );
    }
}

/// Why `bin` is stale against the sources in `workspace`, or `None` when it is not.
pub fn stale_reason(bin: &Path, workspace: &Path) -> Option<String> {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok()?;
    let is_newer = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > built)
    };
    let mut newer = Vec::new();
    match dep_info(bin, workspace) {
        Some(sources) if !sources.is_empty() => {
            newer.extend(sources.into_iter().filter(|p| is_newer(p)))
        }
        _ => {
            newer_sources(&workspace.join("crates"), built, &mut newer);
            let lock = workspace.join("Cargo.lock");
            if is_newer(&lock) {
                newer.push(lock);
            }
        }
    }
    if newer.is_empty() {
        return None;
    }
    newer.sort();
    let first = newer[0].display().to_string();
    match git_changed_since(workspace, built, &newer) {
        // not a git checkout (or no git): the modification times decide
        None => Some(format!("{first} was modified after it")),
        Some(Some(why)) => Some(why),
        Some(None) => None,
    }
}

/// `Some(Some(why))` when git shows a change after `built`, `Some(None)` when it shows none (the newer
/// modification times come from a checkout), `None` when git cannot tell.
fn git_changed_since(
    workspace: &Path,
    built: SystemTime,
    newer: &[PathBuf],
) -> Option<Option<String>> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut status = vec!["status", "--porcelain", "--untracked-files=all", "--"];
    let paths: Vec<String> = newer.iter().map(|p| p.display().to_string()).collect();
    status.extend(paths.iter().map(String::as_str));
    let modified = git(&status)?;
    if let Some(line) = modified.lines().next() {
        return Some(Some(format!(
            "{} is changed against git HEAD and was modified after it",
            line.get(3..).unwrap_or(line)
        )));
    }
    let mut log = vec!["log", "-1", "--format=%ct %h %s", "--"];
    log.extend(paths.iter().map(String::as_str));
    let last = git(&log)?;
    if last.trim().is_empty() {
        // none of them is tracked: their content is as new as their modification time says
        return Some(Some(format!("{} was modified after it", paths.join(", "))));
    }
    let (secs, rest) = last.trim().split_once(' ')?;
    let committed = UNIX_EPOCH + std::time::Duration::from_secs(secs.parse().ok()?);
    if committed > built {
        return Some(Some(format!(
            "commit {rest} changed the sources after it was built"
        )));
    }
    Some(None)
}

/// The workspace files cargo's dep-info (`<bin>.d`) lists for `bin`, or `None` when there is no such file.
fn dep_info(bin: &Path, workspace: &Path) -> Option<Vec<PathBuf>> {
    let text = std::fs::read_to_string(bin.with_extension("d")).ok()?;
    let root = workspace.canonicalize().ok()?;
    let line = text.lines().find(|l| !l.trim().is_empty())?;
    let (_, deps) = line.split_once(": ")?;
    // paths are separated by spaces; a space inside a path is written `\ `
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                current.push(' ');
                chars.next();
            }
            ' ' => paths.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    paths.push(current);
    Some(
        paths
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.starts_with(&root))
            .collect(),
    )
}

fn newer_sources(dir: &Path, built: SystemTime, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            newer_sources(&path, built, out);
        } else if path.extension().is_some_and(|e| e == "rs" || e == "toml")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built)
        {
            out.push(path);
        }
    }
}
