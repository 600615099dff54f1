//! The gate of every root test: fail loudly, with what is missing and how to run, never skip.

use std::process::Command;
use std::sync::OnceLock;

const HOW_TO_RUN: &str = "\
Root tests need root and network namespaces (`ip netns`, from iproute2). Run them as root, after building the \
release binaries:
    hack/test.sh
or
    cargo build --release -p hybridnet-apiprism -p hybridnet-meshd -p hybridnet-dnslocal
    sudo -E \"$(command -v cargo)\" nextest run -p hybridnet-integration   # or: cargo test -p hybridnet-integration
The CLI tests alone need no root: cargo test -p hybridnet-integration --test cli";

/// Panics unless this process is root and can create, use and delete a network namespace.
///
/// Checked once per process; every harness function that needs root calls it, so a test cannot forget.
/// Stale namespaces that an earlier, killed test process left behind (`hn-<dead pid>-*`) are deleted here.
pub fn require_root() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(missing) = CHECK.get_or_init(check) {
        panic!("cannot run this root test: {missing}\n\n{HOW_TO_RUN}");
    }
}

fn check() -> Result<(), String> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        return Err(format!("not root (euid {euid})"));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(format!(
                "`ip -V` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Err(error) => {
            return Err(format!(
                "`ip` (iproute2) is not usable: {error}; install it: apt-get install -y --no-install-recommends iproute2"
            ));
        }
    }
    sweep_stale_namespaces();
    let probe = format!("hn-{}-probe", std::process::id());
    ip(&["netns", "add", &probe]).map_err(|e| format!("cannot create a network namespace: {e}"))?;
    let used = ip(&["-n", &probe, "link", "set", "lo", "up"]);
    let deleted = ip(&["netns", "del", &probe]);
    used.map_err(|e| format!("cannot configure a network namespace: {e}"))?;
    deleted.map_err(|e| format!("cannot delete a network namespace: {e}"))?;
    Ok(())
}

/// Runs `ip ARGS`; the error carries the command and its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<(), String> {
    match Command::new("ip").args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(error) => Err(format!("`ip {}`: {error}", args.join(" "))),
    }
}

/// Deletes `hn-<pid>-*` namespaces whose creating process is gone (a test run killed before its drops ran).
fn sweep_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("hn-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // Best effort: a namespace another run deletes concurrently is fine to miss.
            let _ = ip(&["netns", "del", name]);
        }
    }
}
