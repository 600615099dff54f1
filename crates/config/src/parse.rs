//! Parsers for scalar values: addresses, ports, prefixes, host:port endpoints.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// A `host:port` where the host is an IP address or a DNS name (an API server endpoint).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    /// An IP address (without brackets) or a hostname.
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// The address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses a port number, saying what the range is.
pub fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u64>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} out of range: expected 1-65535")),
        Err(_) => Err(format!("invalid port `{text}`: expected a number 1-65535")),
    }
}

/// Splits `host:port` / `[v6]:port`; `None` when there is no port.
fn split_host_port(text: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("invalid address `{text}`: missing `]`"))?;
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(format!("invalid address `{text}`: expected `[ipv6]:port`")),
            },
        };
    }
    match text.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address, no port.
        Some((host, _)) if host.contains(':') => Ok((text, None)),
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((text, None)),
    }
}

/// Parses `ip:port` or `[ipv6]:port`.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    let expected = || format!("invalid address `{text}`: expected `ip:port` or `[ipv6]:port`");
    let (host, port) = split_host_port(text.trim())?;
    let port = parse_port(port.ok_or_else(expected)?).map_err(|e| format!("{e} in `{text}`"))?;
    let ip: IpAddr = host.parse().map_err(|_| expected())?;
    Ok(SocketAddr::new(ip, port))
}

/// Parses `ip[:port]`, using `default_port` when there is none (DNS servers: port 53).
pub fn parse_socket_addr_default(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    let trimmed = text.trim();
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    parse_socket_addr(trimmed)
}

/// Parses `host:port` where host is an IP or a DNS name, or a URL `scheme://host[:port][/path]`
/// (the port defaults to 443 for https and 80 for http).
pub fn parse_host_port(text: &str) -> Result<HostPort, String> {
    let trimmed = text.trim();
    let (default_port, rest) = match trimmed.split_once("://") {
        Some(("https", rest)) => (Some(443), rest),
        Some(("http", rest)) => (Some(80), rest),
        Some((scheme, _)) => {
            return Err(format!(
                "invalid endpoint `{text}`: unsupported scheme `{scheme}`"
            ));
        }
        None => (None, trimmed),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = split_host_port(authority)?;
    let port = match (port, default_port) {
        (Some(p), _) => parse_port(p).map_err(|e| format!("{e} in `{text}`"))?,
        (None, Some(p)) => p,
        (None, None) => return Err(format!("invalid endpoint `{text}`: expected `host:port`")),
    };
    if host.parse::<IpAddr>().is_err() && !is_hostname(host) {
        return Err(format!(
            "invalid endpoint `{text}`: `{host}` is neither an IP address nor a hostname"
        ));
    }
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

/// A DNS hostname: labels of letters, digits, `-` and `_`, 1-63 bytes each, 253 in all.
pub fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
        })
}

/// Parses a CIDR prefix `10.0.0.0/8`; with `allow_ip`, a bare address is its host prefix.
pub fn parse_ipnet(text: &str, allow_ip: bool) -> Result<IpNet, String> {
    let t = text.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return if allow_ip {
            Ok(IpNet::from(ip))
        } else {
            Err(format!(
                "invalid prefix `{text}`: expected CIDR notation like `10.0.0.0/8` (a prefix length is required)"
            ))
        };
    }
    if let Some((addr, len)) = t.split_once('/') {
        if let Ok(ip) = addr.parse::<IpAddr>() {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            return Err(format!(
                "invalid prefix `{text}`: prefix length `{len}` must be 0-{max}"
            ));
        }
        return Err(format!(
            "invalid prefix `{text}`: `{addr}` is not an IP address"
        ));
    }
    Err(format!(
        "invalid prefix `{text}`: expected CIDR notation like `10.0.0.0/8`"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_socket_addr("[::1]:7445").map(|a| a.port()), Ok(7445));
        assert!(
            parse_socket_addr("10.0.0.1:70000")
                .unwrap_err()
                .contains("port 70000 out of range")
        );
        assert!(parse_socket_addr("10.0.0.1").is_err());
        assert!(parse_socket_addr("10.0.0.300:1").is_err());
        assert_eq!(
            parse_socket_addr_default("1.1.1.1", 53).map(|a| a.port()),
            Ok(53)
        );
        assert_eq!(
            parse_host_port("https://base:6443"),
            Ok(HostPort {
                host: "base".into(),
                port: 6443
            })
        );
        assert_eq!(
            parse_host_port("https://[fd00::1]/x").map(|h| h.to_string()),
            Ok("[fd00::1]:443".into())
        );
        assert!(parse_host_port("base").is_err());
        assert!(parse_host_port("ftp://x:1").is_err());
        assert!(
            parse_ipnet("10.0.0.0/33", false)
                .unwrap_err()
                .contains("0-32")
        );
        assert!(parse_ipnet("10.0.0.1", false).is_err());
        assert!(parse_ipnet("10.0.0.1", true).is_ok());
    }
}
