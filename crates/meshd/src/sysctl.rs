//! The sysctls applier: IPv4 and IPv6 forwarding on a node that forwards (a gateway candidate, a public
//! relay), without breaking SLAAC, recorded and restored on a clean stop.
//!
//! With `net.ipv6.conf.all.forwarding=1` the kernel treats every interface as a router and ignores router
//! advertisements where `accept_ra` is 1: a SLAAC node loses its IPv6 default route when its lifetime runs
//! out. `accept_ra=2` accepts them even when forwarding. So when meshd turns IPv6 forwarding on, every
//! interface (and `default`, for interfaces that appear later) with `accept_ra=1` gets 2. Each value
//! meshd changes is recorded with what it was, and put back when forwarding is no longer wanted or meshd
//! stops cleanly. Values someone else set (forwarding already on) are left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A sysctl by its path under `/proc/sys`, e.g. `net/ipv4/ip_forward`.
pub type Key = String;

pub const IPV4_FORWARD: &str = "net/ipv4/ip_forward";
pub const IPV6_FORWARD: &str = "net/ipv6/conf/all/forwarding";

/// The changes that turn forwarding on, given the current values (`net/ipv6/conf/<if>/accept_ra` for
/// every interface, and the two forwarding switches). `skip` is the mesh interface (it takes no RAs).
/// Pure.
pub fn forwarding_changes(current: &BTreeMap<Key, String>, skip: &str) -> Vec<(Key, String)> {
    let mut out = Vec::new();
    let is = |k: &str, v: &str| current.get(k).map(|s| s.trim()) == Some(v);
    if !is(IPV4_FORWARD, "1") && current.contains_key(IPV4_FORWARD) {
        out.push((IPV4_FORWARD.to_owned(), "1".to_owned()));
    }
    if !is(IPV6_FORWARD, "1") && current.contains_key(IPV6_FORWARD) {
        out.push((IPV6_FORWARD.to_owned(), "1".to_owned()));
        for (k, v) in current {
            let Some(iface) = k
                .strip_prefix("net/ipv6/conf/")
                .and_then(|r| r.strip_suffix("/accept_ra"))
            else {
                continue;
            };
            if iface == "all" || iface == "lo" || iface == skip {
                continue;
            }
            if v.trim() == "1" {
                out.push((k.clone(), "2".to_owned()));
            }
        }
    }
    out
}

/// What meshd changed, and the values to put back.
#[derive(Debug)]
pub struct Sysctls {
    root: PathBuf,
    saved: BTreeMap<Key, String>,
    /// Writes that failed (warned about once: in a Talos extension service `/proc/sys` is read-only).
    failed: BTreeSet<Key>,
}

impl Default for Sysctls {
    fn default() -> Self {
        Sysctls::new(Path::new("/proc/sys"))
    }
}

impl Sysctls {
    pub fn new(root: &Path) -> Sysctls {
        Sysctls {
            root: root.to_owned(),
            saved: BTreeMap::new(),
            failed: BTreeSet::new(),
        }
    }

    /// Whether meshd has forwarding on (it changed something).
    pub fn active(&self) -> bool {
        !self.saved.is_empty()
    }

    fn read(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(key)).ok()
    }

    fn current(&self) -> BTreeMap<Key, String> {
        let mut out = BTreeMap::new();
        for k in [IPV4_FORWARD, IPV6_FORWARD] {
            if let Some(v) = self.read(k) {
                out.insert(k.to_owned(), v);
            }
        }
        if let Ok(dir) = std::fs::read_dir(self.root.join("net/ipv6/conf")) {
            for entry in dir.flatten() {
                let k = format!(
                    "net/ipv6/conf/{}/accept_ra",
                    entry.file_name().to_string_lossy()
                );
                if let Some(v) = self.read(&k) {
                    out.insert(k, v);
                }
            }
        }
        out
    }

    /// Brings the sysctls in line with `forwarding`: on (recording what it changes), or back to what
    /// they were. While forwarding is on, an interface that appeared with `accept_ra=1` is fixed too.
    /// Returns the number of writes; failures are logged (the mesh works without forwarding).
    pub fn apply(&mut self, forwarding: bool, mesh_interface: &str) -> usize {
        if !forwarding {
            return self.restore();
        }
        let real = self.current();
        let mut view = real.clone();
        if self.saved.contains_key(IPV6_FORWARD) {
            // IPv6 forwarding is ours: the accept_ra rule still holds for interfaces that appear later.
            view.insert(IPV6_FORWARD.to_owned(), "0".to_owned());
        }
        let mut writes = 0;
        for (key, value) in forwarding_changes(&view, mesh_interface) {
            let Some(old) = real.get(&key) else {
                continue;
            };
            if old.trim() == value {
                continue;
            }
            match std::fs::write(self.root.join(&key), &value) {
                Ok(()) => {
                    self.failed.remove(&key);
                    tracing::info!(sysctl = %key, from = old.trim(), to = %value, "sysctl set (forwarding)");
                    self.saved
                        .entry(key)
                        .or_insert_with(|| old.trim().to_owned());
                    writes += 1;
                }
                Err(error) if self.failed.insert(key.clone()) => {
                    tracing::warn!(
                        sysctl = %key,
                        %error,
                        "cannot set sysctl: this node will not forward (on Talos, where /proc/sys is \
                         read-only for extensions, set it in machine.sysctls)"
                    );
                }
                Err(error) => tracing::debug!(sysctl = %key, %error, "cannot set sysctl"),
            }
        }
        writes
    }

    /// Puts back every value meshd changed. Returns the number of writes.
    pub fn restore(&mut self) -> usize {
        let mut writes = 0;
        for (key, old) in std::mem::take(&mut self.saved) {
            match std::fs::write(self.root.join(&key), &old) {
                Ok(()) => {
                    tracing::info!(sysctl = %key, to = %old, "sysctl restored");
                    writes += 1;
                }
                // An interface that went away takes its accept_ra with it.
                Err(error) => tracing::debug!(sysctl = %key, %error, "cannot restore sysctl"),
            }
        }
        writes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tree(values: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (k, v) in values {
            let p = dir.path().join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{v}\n")).unwrap();
        }
        dir
    }

    fn read(dir: &tempfile::TempDir, k: &str) -> String {
        std::fs::read_to_string(dir.path().join(k))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn forwarding_keeps_slaac_and_is_restored() {
        let dir = tree(&[
            (IPV4_FORWARD, "0"),
            (IPV6_FORWARD, "0"),
            ("net/ipv6/conf/all/accept_ra", "1"),
            ("net/ipv6/conf/default/accept_ra", "1"),
            ("net/ipv6/conf/eth0/accept_ra", "1"),
            ("net/ipv6/conf/eth1/accept_ra", "0"),
            ("net/ipv6/conf/lo/accept_ra", "1"),
            ("net/ipv6/conf/hybridnet0/accept_ra", "1"),
        ]);
        let mut s = Sysctls::new(dir.path());
        assert_eq!(s.apply(true, "hybridnet0"), 4);
        assert_eq!(read(&dir, IPV4_FORWARD), "1");
        assert_eq!(read(&dir, IPV6_FORWARD), "1");
        assert_eq!(
            read(&dir, "net/ipv6/conf/eth0/accept_ra"),
            "2",
            "SLAAC kept"
        );
        assert_eq!(read(&dir, "net/ipv6/conf/default/accept_ra"), "2");
        assert_eq!(
            read(&dir, "net/ipv6/conf/eth1/accept_ra"),
            "0",
            "RAs off stay off"
        );
        assert_eq!(read(&dir, "net/ipv6/conf/hybridnet0/accept_ra"), "1");
        assert_eq!(
            s.apply(true, "hybridnet0"),
            0,
            "a second pass changes nothing"
        );
        // An interface that appears later with accept_ra=1 is fixed in the next pass.
        std::fs::create_dir_all(dir.path().join("net/ipv6/conf/eth2")).unwrap();
        std::fs::write(dir.path().join("net/ipv6/conf/eth2/accept_ra"), "1\n").unwrap();
        assert_eq!(s.apply(true, "hybridnet0"), 1);
        assert_eq!(read(&dir, "net/ipv6/conf/eth2/accept_ra"), "2");
        assert_eq!(s.restore(), 5);
        assert_eq!(read(&dir, IPV4_FORWARD), "0");
        assert_eq!(read(&dir, IPV6_FORWARD), "0");
        assert_eq!(read(&dir, "net/ipv6/conf/eth0/accept_ra"), "1");
        assert_eq!(read(&dir, "net/ipv6/conf/eth2/accept_ra"), "1");
        assert!(!s.active());
    }

    #[test]
    fn forwarding_someone_else_set_is_left_alone() {
        let dir = tree(&[
            (IPV4_FORWARD, "1"),
            (IPV6_FORWARD, "1"),
            ("net/ipv6/conf/eth0/accept_ra", "1"),
        ]);
        let mut s = Sysctls::new(dir.path());
        assert_eq!(s.apply(true, "hybridnet0"), 0);
        assert_eq!(read(&dir, "net/ipv6/conf/eth0/accept_ra"), "1");
        assert_eq!(s.apply(false, "hybridnet0"), 0);
        assert_eq!(read(&dir, IPV4_FORWARD), "1", "not ours to restore");
    }
}
