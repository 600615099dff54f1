//! The part of blang/semver that Talos uses for `compatibility.talos.version`: parse a version, parse a range
//! (`">= 1.10.0 < 1.15.0"`, `"< 1.0.0 || >= 1.2.0"`) and check a version against it. Talos first strips every
//! `v` that stands before a digit (`trim` in `validate.go`). Wildcards (`1.x`) are not supported here.

use std::cmp::Ordering;
use std::fmt;

/// `major.minor.patch[-pre][+build]`; only the pre-release takes part in ordering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    pub pre: Vec<String>,
}

impl Version {
    /// Strict `major.minor.patch[-pre][+build]` (blang `Parse`), no leading `v`.
    pub fn parse(s: &str) -> Result<Version, String> {
        let s = s.trim();
        let (rest, _build) = s.split_once('+').unwrap_or((s, ""));
        let (core, pre) = match rest.split_once('-') {
            Some((c, p)) => (c, p.split('.').map(str::to_string).collect()),
            None => (rest, Vec::new()),
        };
        let parts: Vec<&str> = core.split('.').collect();
        if parts.len() != 3 {
            return Err(format!("no major, minor and patch version in {s:?}"));
        }
        let num = |p: &str| -> Result<u64, String> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("invalid number {p:?} in version {s:?}"));
            }
            if p.len() > 1 && p.starts_with('0') {
                return Err(format!("leading zero in {p:?} in version {s:?}"));
            }
            p.parse()
                .map_err(|e| format!("{p:?} in version {s:?}: {e}"))
        };
        let pre: Vec<String> = pre;
        if pre.iter().any(|p| p.is_empty()) {
            return Err(format!("empty pre-release part in {s:?}"));
        }
        Ok(Version {
            major: num(parts[0])?,
            minor: num(parts[1])?,
            patch: num(parts[2])?,
            pre,
        })
    }

    /// blang `ParseTolerant` as far as we need it: a leading `v` is allowed.
    pub fn parse_tolerant(s: &str) -> Result<Version, String> {
        Version::parse(s.trim().trim_start_matches('v'))
    }

    /// major.minor.patch without the pre-release (Talos checks the core version).
    pub fn core(&self) -> Version {
        Version {
            pre: Vec::new(),
            ..self.clone()
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if !self.pre.is_empty() {
            write!(f, "-{}", self.pre.join("."))?;
        }
        Ok(())
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => cmp_pre(&self.pre, &other.pre),
            })
    }
}

fn cmp_pre(a: &[String], b: &[String]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// Talos's `trim`: remove a `v` that stands right before a digit, anywhere in the string.
pub fn trim_v(constraint: &str) -> String {
    let b = constraint.as_bytes();
    let mut out = String::with_capacity(constraint.len());
    for (i, c) in constraint.char_indices() {
        if c == 'v' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            continue;
        }
        out.push(c);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

/// A parsed range: OR of AND-ed comparisons.
#[derive(Debug, Clone)]
pub struct Range(Vec<Vec<(Op, Version)>>);

impl Range {
    /// blang `ParseRange` (without wildcards): `||` separates alternatives, spaces separate the comparisons that
    /// must all hold; an operator may be followed by spaces (`>= 1.0.0`).
    pub fn parse(s: &str) -> Result<Range, String> {
        let mut alternatives = Vec::new();
        for alt in s.split("||") {
            let mut comparisons = Vec::new();
            let mut pending_op: Option<&str> = None;
            for token in alt.split_whitespace() {
                let op_len = token
                    .bytes()
                    .take_while(|b| matches!(b, b'<' | b'>' | b'=' | b'!'))
                    .count();
                let (op, ver) = token.split_at(op_len);
                let op = match (pending_op.take(), op) {
                    (Some(p), "") => p,
                    (Some(p), _) => return Err(format!("operator {p:?} followed by {token:?}")),
                    (None, o) => o,
                };
                if ver.is_empty() {
                    pending_op = Some(op);
                    continue;
                }
                let op = match op {
                    "" | "=" | "==" => Op::Eq,
                    "!=" => Op::Ne,
                    ">" => Op::Gt,
                    ">=" => Op::Ge,
                    "<" => Op::Lt,
                    "<=" => Op::Le,
                    other => return Err(format!("invalid operator {other:?}")),
                };
                comparisons.push((op, Version::parse(ver)?));
            }
            if let Some(op) = pending_op {
                return Err(format!("operator {op:?} without a version"));
            }
            if comparisons.is_empty() {
                return Err(format!("empty range in {s:?}"));
            }
            alternatives.push(comparisons);
        }
        Ok(Range(alternatives))
    }

    pub fn matches(&self, v: &Version) -> bool {
        self.0.iter().any(|all| {
            all.iter().all(|(op, w)| match op {
                Op::Eq => v == w,
                Op::Ne => v != w,
                Op::Gt => v > w,
                Op::Ge => v >= w,
                Op::Lt => v < w,
                Op::Le => v <= w,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).expect("version")
    }

    #[test]
    fn ranges() {
        let r = Range::parse(&trim_v(">= v1.10.0")).expect("range");
        assert!(r.matches(&v("1.10.0")));
        assert!(r.matches(&v("1.13.9")));
        assert!(!r.matches(&v("1.9.5")));
        let r = Range::parse(&trim_v(">=v1.10.0 <v1.15.0")).expect("range");
        assert!(r.matches(&v("1.14.2")));
        assert!(!r.matches(&v("1.15.0")));
        let r = Range::parse("<1.0.0 || >= 1.2.0").expect("range");
        assert!(r.matches(&v("0.9.0")) && r.matches(&v("1.2.0")) && !r.matches(&v("1.1.0")));
        assert!(Range::parse("1.0.0").expect("range").matches(&v("1.0.0")));
        assert!(Range::parse("!=1.0.0").expect("range").matches(&v("1.0.1")));
        assert!(Range::parse(">= ").is_err());
        assert!(Range::parse("~> 1.0").is_err());
        assert!(Range::parse("1.x").is_err());
    }

    #[test]
    fn ordering_and_core() {
        assert!(v("1.14.0-rc.1") < v("1.14.0"));
        assert!(v("1.14.0-alpha.2") < v("1.14.0-alpha.10"));
        assert_eq!(v("1.14.0-rc.1").core(), v("1.14.0"));
        assert_eq!(
            Version::parse_tolerant("v1.13.9").expect("v").to_string(),
            "1.13.9"
        );
        assert!(Version::parse("1.2").is_err());
        assert!(Version::parse("01.2.3").is_err());
    }
}
