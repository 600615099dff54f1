//! KubeSpan endpoint filters (`filters.endpoints`), with Talos's semantics
//! (`siderolabs/net` `FilterIPs`): the result starts empty and the rules apply in order; a
//! positive CIDR adds the matching addresses, a `!CIDR` removes matching addresses added before.
//! A list made only of negations therefore selects nothing, and is refused.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::parse::parse_ipnet;

/// One rule: a prefix (a bare IP is its host prefix), possibly negated with `!`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterRule {
    pub negate: bool,
    pub net: IpNet,
}

impl fmt::Display for FilterRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.negate {
            f.write_str("!")?;
        }
        write!(f, "{}", self.net)
    }
}

impl FilterRule {
    pub fn parse(text: &str) -> Result<FilterRule, String> {
        let t = text.trim();
        let (negate, rest) = match t.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        Ok(FilterRule {
            negate,
            net: parse_ipnet(rest, true)?,
        })
    }
}

/// An ordered endpoint filter. Empty means "no filter": every address is kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointFilter {
    pub rules: Vec<FilterRule>,
}

impl EndpointFilter {
    /// Parses and checks a rule list: refuses a non-empty list with no positive rule.
    pub fn new(rules: Vec<FilterRule>) -> Result<EndpointFilter, String> {
        if !rules.is_empty() && rules.iter().all(|r| r.negate) {
            return Err("this filter list has only negations, so it selects nothing: \
                rules apply in order to an empty set; start with a positive rule such as `0.0.0.0/0` or `::/0`"
                .to_owned());
        }
        Ok(EndpointFilter { rules })
    }

    /// The addresses the filter selects, in input order (no duplicates).
    pub fn apply(&self, addrs: &[IpAddr]) -> Vec<IpAddr> {
        if self.rules.is_empty() {
            let mut out: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !out.contains(a) {
                    out.push(*a);
                }
            }
            return out;
        }
        let mut selected: Vec<IpAddr> = Vec::new();
        for rule in &self.rules {
            if rule.negate {
                selected.retain(|a| !rule.net.contains(a));
            } else {
                for a in addrs {
                    if rule.net.contains(a) && !selected.contains(a) {
                        selected.push(*a);
                    }
                }
            }
        }
        // Keep the input order, as Talos does.
        addrs
            .iter()
            .copied()
            .filter(|a| selected.contains(a))
            .fold(Vec::new(), |mut out, a| {
                if !out.contains(&a) {
                    out.push(a);
                }
                out
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn filter(rules: &[&str]) -> Result<EndpointFilter, String> {
        EndpointFilter::new(
            rules
                .iter()
                .map(|r| FilterRule::parse(r))
                .collect::<Result<_, _>>()?,
        )
    }

    #[test]
    fn talos_semantics() {
        let ips: Vec<IpAddr> = ["10.0.0.1", "192.168.1.2", "2001:db8::1", "203.0.113.7"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        let f = filter(&["0.0.0.0/0", "!192.168.0.0/16", "::/0"]).expect("valid");
        assert_eq!(f.apply(&ips), vec![ips[0], ips[2], ips[3]]);
        // Order matters: a negation before the positive removes nothing.
        let f = filter(&["!192.168.0.0/16", "0.0.0.0/0"]).expect("valid");
        assert_eq!(f.apply(&ips), vec![ips[0], ips[1], ips[3]]);
        let f = filter(&["203.0.113.7"]).expect("valid");
        assert_eq!(f.apply(&ips), vec![ips[3]]);
        assert!(
            filter(&["!10.0.0.0/8", "!192.168.0.0/16"])
                .unwrap_err()
                .contains("selects nothing")
        );
        assert!(filter(&["0.0.0.0/33"]).is_err());
        assert_eq!(filter(&[]).expect("empty").apply(&ips), ips);
    }
}
