//! Typed readers over [`Node`]s that collect [`Issue`]s instead of stopping at the first one.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::duration::parse_duration;
use crate::error::{Issue, IssueKind};
use crate::parse;
use crate::source::Source;
use crate::yaml::{Node, Value};

/// The reading context: where the text came from and the issues found so far.
pub struct Ctx {
    pub origin: PathBuf,
    pub issues: Vec<Issue>,
}

impl Ctx {
    pub fn new(origin: &Path) -> Self {
        Ctx {
            origin: origin.to_owned(),
            issues: Vec::new(),
        }
    }

    pub fn issue(&mut self, node: &Node, kind: IssueKind, message: impl Into<String>) {
        self.issues
            .push(Issue::new(&self.origin, Some(node.pos), kind, message));
    }

    fn type_error(&mut self, node: &Node, key: &str, expected: &str) {
        let message = format!("`{key}`: expected {expected}, found {}", node.type_name());
        self.issue(node, IssueKind::Type, message);
    }

    fn value_error(&mut self, node: &Node, key: &str, message: String) {
        self.issue(node, IssueKind::Value, format!("`{key}`: {message}"));
    }

    /// A Talos source label for `field` at `node`.
    pub fn talos(&self, field: &str, node: &Node) -> Source {
        Source::Talos {
            field: field.to_owned(),
            origin: self.origin.clone(),
            pos: node.pos,
        }
    }

    /// A HybridNetConfig source label for `key` at `node`.
    pub fn ours(&self, key: &str, node: &Node) -> Source {
        Source::HybridNet {
            key: key.to_owned(),
            origin: self.origin.clone(),
            pos: node.pos,
        }
    }

    /// Checks that a mapping has only `allowed` keys; suggests the nearest for an unknown one.
    /// Returns false (with an issue) when `node` is not a mapping at all.
    pub fn check_keys(&mut self, node: &Node, section: &str, allowed: &[&str]) -> bool {
        let Value::Map(entries) = &node.value else {
            if !node.is_null() {
                self.type_error(node, section, "a mapping");
            }
            return false;
        };
        for (key, _) in entries {
            let Some(name) = key.as_str() else {
                self.issue(
                    key,
                    IssueKind::Type,
                    format!(
                        "in {section}: keys must be strings, found {}",
                        key.type_name()
                    ),
                );
                continue;
            };
            if !allowed.contains(&name) {
                let message = match suggest(name, allowed) {
                    Some(best) => {
                        format!("unknown key `{name}` in {section}; did you mean `{best}`?")
                    }
                    None => format!(
                        "unknown key `{name}` in {section}; expected one of: {}",
                        allowed.join(", ")
                    ),
                };
                self.issue(key, IssueKind::UnknownKey, message);
            }
        }
        true
    }

    pub fn string(&mut self, node: &Node, key: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) => Some(s.clone()),
            _ => {
                self.type_error(node, key, "a string");
                None
            }
        }
    }

    pub fn boolean(&mut self, node: &Node, key: &str) -> Option<bool> {
        match &node.value {
            Value::Bool(b) => Some(*b),
            _ => {
                self.type_error(node, key, "true or false");
                None
            }
        }
    }

    /// An unsigned integer in `min..=max` (a numeric string is accepted too).
    pub fn uint(&mut self, node: &Node, key: &str, min: u64, max: u64) -> Option<u64> {
        let value = match &node.value {
            Value::Int(i) => *i,
            Value::Float(f) => {
                self.value_error(node, key, format!("{f} is not a whole number"));
                return None;
            }
            Value::Str(s) => match s.trim().parse::<i128>() {
                Ok(i) => i,
                Err(_) => {
                    self.type_error(node, key, "a number");
                    return None;
                }
            },
            _ => {
                self.type_error(node, key, "a number");
                return None;
            }
        };
        match u64::try_from(value) {
            Ok(v) if (min..=max).contains(&v) => Some(v),
            _ => {
                self.value_error(
                    node,
                    key,
                    format!("{value} out of range: expected {min}-{max}"),
                );
                None
            }
        }
    }

    pub fn port(&mut self, node: &Node, key: &str) -> Option<u16> {
        self.uint(node, key, 1, 65535)
            .and_then(|p| u16::try_from(p).ok())
    }

    /// Applies `f` to a string scalar, reporting its error as a value issue.
    pub fn parsed<T>(
        &mut self,
        node: &Node,
        key: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.string(node, key)?;
        match f(&text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.value_error(node, key, message);
                None
            }
        }
    }

    pub fn duration(&mut self, node: &Node, key: &str) -> Option<Duration> {
        match &node.value {
            Value::Int(0) => return Some(Duration::ZERO),
            Value::Int(i) => {
                self.value_error(
                    node,
                    key,
                    format!("`{i}` has no unit: expected e.g. `500ms`, `1s`, `5m`, `1h`"),
                );
                return None;
            }
            _ => {}
        }
        self.parsed(node, key, parse_duration)
    }

    pub fn socket_addr(&mut self, node: &Node, key: &str) -> Option<SocketAddr> {
        self.parsed(node, key, parse::parse_socket_addr)
    }

    pub fn ip(&mut self, node: &Node, key: &str) -> Option<IpAddr> {
        self.parsed(node, key, |s| {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("invalid IP address `{s}`"))
        })
    }

    /// A list, each element read with `f`; `None` if the node or any element is bad (all are
    /// reported). A null is an empty list.
    pub fn list<T>(
        &mut self,
        node: &Node,
        key: &str,
        mut f: impl FnMut(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = match &node.value {
            Value::Seq(items) => items,
            Value::Null => return Some(Vec::new()),
            _ => {
                self.type_error(node, key, "a list");
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match f(self, item, &format!("{key}[{i}]")) {
                Some(v) => out.push(v),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    pub fn socket_addrs(&mut self, node: &Node, key: &str) -> Option<Vec<SocketAddr>> {
        self.list(node, key, |c, n, k| c.socket_addr(n, k))
    }

    pub fn ipnets(&mut self, node: &Node, key: &str) -> Option<Vec<IpNet>> {
        self.list(node, key, |c, n, k| {
            c.parsed(n, k, |s| parse::parse_ipnet(s, false))
        })
    }
}

/// The allowed key nearest to `name`, if it is near enough to be a likely misspelling.
pub fn suggest<'a>(name: &str, allowed: &[&'a str]) -> Option<&'a str> {
    if name.len() > 64 {
        return None; // no key is that long, and the distance costs length squared
    }
    let lower = name.to_ascii_lowercase();
    allowed
        .iter()
        .map(|cand| {
            (
                strsim::damerau_levenshtein(&lower, &cand.to_ascii_lowercase()),
                *cand,
            )
        })
        .filter(|(d, cand)| *d <= (cand.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, cand)| cand)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn suggestions() {
        let keys = ["listen", "endpoints", "admin", "healthCheck", "dialTimeout"];
        assert_eq!(super::suggest("lisen", &keys), Some("listen"));
        assert_eq!(super::suggest("healthcheck", &keys), Some("healthCheck"));
        assert_eq!(super::suggest("zzzzzzzz", &keys), None);
    }
}
