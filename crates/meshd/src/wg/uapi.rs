//! The WireGuard cross-platform userspace API (the text protocol wireguard-go and boringtun serve; meshd speaks it
//! to its embedded boringtun over a private socket pair): `get=1` and `set=1`, `key=value` lines, keys in hex.
//!
//! An [`PeerOp::Update`] is rendered in place: only the fields that changed (`endpoint`,
//! `persistent_keepalive_interval`, `replace_allowed_ips` with the new list), so the peer's session
//! survives an endpoint change, as on the kernel backend. Published boringtun 0.7.1 panics on that
//! ("Modifying existing peers is not yet supported", cloudflare/boringtun#40, #209); meshd builds a patched
//! copy (`vendor/boringtun`, see its `HYBRIDNET-PATCH.md`) that updates an existing peer in place.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use hybridnet_config::PublicKey;

use super::{Actual, PeerConfig, PeerOp, PeerStats, Update};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One peer's section: a new peer with everything (`add`), or an existing peer's changed fields in place
/// (`changed`: endpoint, allowed IPs, keepalive; no `remove`, no preshared key, which is set when the peer
/// is added: the session stays). The kernel backend's twin is `kernel::peer_attrs`.
fn peer_lines(
    out: &mut String,
    key: &PublicKey,
    config: &PeerConfig,
    add: bool,
    (endpoint, allowed_ips, keepalive): (bool, bool, bool),
) {
    let _ = writeln!(out, "public_key={}", hex(&key.0));
    if let Some(psk) = config.preshared_key.as_ref().filter(|_| add) {
        let _ = writeln!(out, "preshared_key={}", hex(psk));
    }
    if let Some(ep) = config.endpoint.filter(|_| endpoint) {
        let _ = writeln!(out, "endpoint={ep}");
    }
    // A new peer without keepalive needs no line; an existing one whose keepalive went is set to 0 (off).
    if let Some(k) = config
        .keepalive
        .or((!add).then_some(0))
        .filter(|_| keepalive)
    {
        let _ = writeln!(out, "persistent_keepalive_interval={k}");
    }
    if allowed_ips {
        let _ = writeln!(out, "replace_allowed_ips=true");
        for ip in config.allowed_ips.iter() {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
}

/// The `set=1` requests for `update` (each ends with the blank line), in order.
///
/// One request per peer: boringtun 0.7.1 carries a peer section's `remove`, `endpoint`, keepalive and
/// preshared key over into the next section of the same request, so sections are never batched.
pub fn render_set(update: &Update) -> Vec<String> {
    let mut requests = Vec::new();
    // Holds the private key when it changes: zeroed when dropped (the caller zeroes the requests).
    let mut device = zeroize::Zeroizing::new(String::new());
    if let Some(key) = &update.private_key {
        let key = zeroize::Zeroizing::new(hex(key));
        let _ = writeln!(device, "private_key={}", key.as_str());
    }
    if let Some(port) = update.listen_port {
        let _ = writeln!(device, "listen_port={port}");
    }
    if let Some(mark) = update.fwmark {
        let _ = writeln!(device, "fwmark={mark}");
    }
    if !device.is_empty() {
        requests.push(format!("set=1\n{}\n", device.as_str()));
    }
    for op in &update.peers {
        let mut out = String::from("set=1\n");
        match op {
            PeerOp::Add(key, config) => peer_lines(&mut out, key, config, true, (true, true, true)),
            PeerOp::Remove(key) => {
                let _ = writeln!(out, "public_key={}\nremove=true", hex(&key.0));
            }
            PeerOp::Update {
                key,
                config,
                endpoint,
                allowed_ips,
                keepalive,
            } => peer_lines(
                &mut out,
                key,
                config,
                false,
                (*endpoint, *allowed_ips, *keepalive),
            ),
        }
        out.push('\n');
        requests.push(out);
    }
    requests
}

/// Parses a `get=1` answer (without the final `errno=` line check, done by the caller).
pub fn parse_get(text: &str) -> Result<Actual, String> {
    let mut actual = Actual::default();
    let mut current: Option<(PublicKey, PeerConfig, PeerStats)> = None;
    let mut handshake_sec: Option<u64> = None;
    let mut peers: HashMap<PublicKey, (PeerConfig, PeerStats)> = HashMap::new();
    let finish = |current: &mut Option<(PublicKey, PeerConfig, PeerStats)>,
                  peers: &mut HashMap<PublicKey, (PeerConfig, PeerStats)>| {
        if let Some((k, c, s)) = current.take() {
            peers.insert(k, (c, s));
        }
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let bad = || format!("bad UAPI line {line:?}");
        match key {
            "own_public_key" => actual.public_key = Some(PublicKey(unhex(value).ok_or_else(bad)?)),
            "listen_port" => actual.listen_port = value.parse().map_err(|_| bad())?,
            "fwmark" => actual.fwmark = value.parse().map_err(|_| bad())?,
            "public_key" => {
                finish(&mut current, &mut peers);
                handshake_sec = None;
                let k = PublicKey(unhex(value).ok_or_else(bad)?);
                current = Some((k, PeerConfig::default(), PeerStats::default()));
            }
            "errno" => {}
            _ => {
                let Some((_, config, stats)) = current.as_mut() else {
                    continue;
                };
                match key {
                    "endpoint" => config.endpoint = value.parse().ok(),
                    "allowed_ip" => {
                        std::sync::Arc::make_mut(&mut config.allowed_ips)
                            .insert(value.parse().map_err(|_| bad())?);
                    }
                    "persistent_keepalive_interval" => {
                        config.keepalive = value.parse().ok().filter(|k| *k != 0);
                    }
                    "rx_bytes" => stats.rx_bytes = value.parse().unwrap_or(0),
                    "tx_bytes" => stats.tx_bytes = value.parse().unwrap_or(0),
                    // boringtun reports the time *since* the handshake here; wireguard-go the unix time.
                    // Neither is used for liveness (meshd probes); it is shown as a hint only.
                    "last_handshake_time_sec" => handshake_sec = value.parse().ok(),
                    "last_handshake_time_nsec" => {
                        if let Some(sec) = handshake_sec.filter(|s| *s > 0) {
                            let age = hybridnet_age(sec);
                            stats.last_handshake = Some(age);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    finish(&mut current, &mut peers);
    actual.peers = peers;
    Ok(actual)
}

/// A `last_handshake_time_sec` value as an age: values past 2001 are unix times (wireguard-go), smaller
/// ones are already ages (boringtun).
fn hybridnet_age(sec: u64) -> Duration {
    const Y2001: u64 = 978_307_200;
    if sec > Y2001 {
        Duration::from_secs(hybridnet_state::unix_now().saturating_sub(sec))
    } else {
        Duration::from_secs(sec)
    }
}

/// One exchange on a UAPI stream: writes `body`, reads the answer up to its `errno=` line and the blank line
/// after it. Bounded by the stream's read timeout and a size cap.
pub fn exchange(stream: &mut BufReader<UnixStream>, body: &str) -> Result<String, String> {
    stream
        .get_mut()
        .write_all(body.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    let mut errno = None;
    loop {
        let mut line = String::new();
        let n = stream.read_line(&mut line).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if let Some(v) = line.strip_prefix("errno=") {
            errno = v.trim().parse::<i32>().ok();
            // The blank line that closes the answer.
            let mut blank = String::new();
            let _ = stream.read_line(&mut blank);
            break;
        }
        out.push_str(&line);
        if out.len() > 64 << 20 {
            return Err("answer too large".into());
        }
    }
    match errno {
        Some(0) => Ok(out),
        Some(n) => Err(format!("the device refused the request (errno {n})")),
        None => Err("no answer from the device".into()),
    }
}

/// The `get=1` request. No blank line after it: boringtun reads one line per command, and a blank line
/// would be taken as a second (invalid) command on a persistent stream.
pub const GET: &str = "get=1\n";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn set_renders_adds_removes_and_updates_in_place() {
        let config = PeerConfig {
            endpoint: Some("192.0.2.1:51821".parse().unwrap()),
            allowed_ips: std::sync::Arc::new(
                ["10.0.0.1/32".parse().unwrap()].into_iter().collect(),
            ),
            keepalive: Some(5),
            preshared_key: None,
        };
        let update = Update {
            private_key: Some([1; 32]),
            listen_port: Some(51821),
            fwmark: Some(4096),
            peers: vec![
                PeerOp::Add(PublicKey([2; 32]), config.clone()),
                PeerOp::Remove(PublicKey([3; 32])),
                PeerOp::Update {
                    key: PublicKey([4; 32]),
                    config,
                    endpoint: true,
                    allowed_ips: false,
                    keepalive: false,
                },
            ],
        };
        let requests = render_set(&update);
        assert_eq!(requests.len(), 4, "device, add, remove, update: one each");
        assert!(requests[0].starts_with("set=1\nprivate_key=0101"));
        assert!(requests[0].ends_with("listen_port=51821\nfwmark=4096\n\n"));
        assert_eq!(
            requests[1],
            format!(
                "set=1\npublic_key={}\nendpoint=192.0.2.1:51821\npersistent_keepalive_interval=5\n\
                 replace_allowed_ips=true\nallowed_ip=10.0.0.1/32\n\n",
                hex(&[2; 32])
            )
        );
        assert_eq!(
            requests[2],
            format!("set=1\npublic_key={}\nremove=true\n\n", hex(&[3; 32]))
        );
        // Only the changed endpoint: no remove (the session stays), allowed IPs and keepalive untouched.
        assert_eq!(
            requests[3],
            format!(
                "set=1\npublic_key={}\nendpoint=192.0.2.1:51821\n\n",
                hex(&[4; 32])
            )
        );
        let ips_and_keepalive = Update {
            peers: vec![PeerOp::Update {
                key: PublicKey([4; 32]),
                config: PeerConfig {
                    endpoint: None,
                    allowed_ips: std::sync::Arc::new(
                        ["10.0.0.2/32".parse().unwrap()].into_iter().collect(),
                    ),
                    keepalive: None,
                    preshared_key: Some([9; 32]),
                },
                endpoint: false,
                allowed_ips: true,
                keepalive: true,
            }],
            ..Update::default()
        };
        assert_eq!(
            render_set(&ips_and_keepalive),
            vec![format!(
                "set=1\npublic_key={}\npersistent_keepalive_interval=0\nreplace_allowed_ips=true\n\
                 allowed_ip=10.0.0.2/32\n\n",
                hex(&[4; 32])
            )]
        );
    }

    #[test]
    fn get_parses_boringtun_output() {
        let text = format!(
            "own_public_key={}\nlisten_port=51821\nfwmark=4096\npublic_key={}\nendpoint=192.0.2.9:51821\n\
             allowed_ip=10.0.0.9/32\nallowed_ip=fd00::9/128\npersistent_keepalive_interval=5\n\
             last_handshake_time_sec=3\nlast_handshake_time_nsec=5\nrx_bytes=100\ntx_bytes=200\n\
             public_key={}\nrx_bytes=0\ntx_bytes=0\nerrno=0\n\n",
            hex(&[1; 32]),
            hex(&[2; 32]),
            hex(&[3; 32])
        );
        let a = parse_get(&text).unwrap();
        assert_eq!(a.public_key, Some(PublicKey([1; 32])));
        assert_eq!((a.listen_port, a.fwmark), (51821, 4096));
        let (c, s) = &a.peers[&PublicKey([2; 32])];
        assert_eq!(c.endpoint, Some("192.0.2.9:51821".parse().unwrap()));
        assert_eq!(c.allowed_ips.len(), 2);
        assert_eq!(c.keepalive, Some(5));
        assert_eq!((s.rx_bytes, s.tx_bytes), (100, 200));
        assert_eq!(s.last_handshake, Some(Duration::from_secs(3)));
        assert!(a.peers[&PublicKey([3; 32])].0.endpoint.is_none());
        assert!(parse_get("public_key=zz\n").is_err());
    }
}
