//! The last known peers, kept in `<dataDir>/meshd-peers.json` so a node that restarts while its peer
//! source is unreachable still rejoins. Written atomically (0600) when the peer set or a peer's working
//! endpoint changes; read once at start.
//!
//! Static peers (from the config) are cached too, with their last working endpoint first, but a cached
//! peer whose source was the config is used again only while the config still lists it: removing a peer
//! from the config removes it from the mesh. Peers from other sources (discovery, a later issue) are
//! used from the cache until their source says otherwise.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The cache file in `dataDir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("meshd-peers.json")
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Cache {
    pub version: u32,
    pub peers: Vec<CachedPeer>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CachedPeer {
    pub name: String,
    /// Base64.
    pub public_key: String,
    /// `ip:port`, the last working one first.
    pub endpoints: Vec<String>,
    pub allowed_ips: Vec<String>,
    pub location: Option<String>,
    /// `static` (from the config) or the discovery source.
    pub source: String,
    /// Unix seconds of the last answered probe.
    pub last_seen: u64,
    /// Discovered peers: node ID, underlay addresses, API server port (so members.json keeps them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_server_port: Option<u16>,
    /// The mesh address the peer announced (KubeSpan-compatible mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_address: Option<String>,
}

/// The version this meshd writes and reads.
pub const VERSION: u32 = 1;

/// Reads the cache; a missing, unreadable, misshapen or newer file is an empty cache (logged, except a
/// missing one). A cache readable by group or others is set to 0600 with a warning.
pub fn load(path: &Path) -> Cache {
    match crate::private::read(path, "peer cache") {
        Ok(bytes) => match parse(&bytes) {
            Ok(c) => c,
            Err(reason) => {
                tracing::warn!(path = %path.display(), "ignoring the peer cache: {reason}");
                Cache::default()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Cache::default(),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the peer cache");
            Cache::default()
        }
    }
}

/// Parses the cache text: an object with a `version` this meshd reads and a list of `peers`.
fn parse(bytes: &[u8]) -> Result<Cache, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let Some(object) = value.as_object() else {
        return Err("not a JSON object".into());
    };
    match object.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) if v > u64::from(VERSION) => {
            return Err(format!(
                "version {v} was written by a newer meshd (this one reads version {VERSION})"
            ));
        }
        Some(v) => return Err(format!("unknown version {v}")),
        None => return Err("no numeric `version`: not a meshd peer cache".into()),
    }
    if !object.get("peers").is_some_and(serde_json::Value::is_array) {
        return Err("no `peers` list".into());
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// Writes the cache atomically.
pub fn store(path: &Path, cache: &Cache) -> Result<(), String> {
    let mut bytes = serde_json::to_vec_pretty(cache).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    hybridnet_state::atomic_write(path, &bytes, hybridnet_state::PRIVATE_MODE)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tolerance() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert_eq!(load(&p), Cache::default());
        let c = Cache {
            version: 1,
            peers: vec![CachedPeer {
                name: "b".into(),
                public_key: "x".into(),
                endpoints: vec!["192.0.2.1:51821".into()],
                source: "static".into(),
                ..CachedPeer::default()
            }],
        };
        store(&p, &c).unwrap();
        assert_eq!(load(&p), c);
        std::fs::write(&p, "{not json").unwrap();
        assert_eq!(load(&p), Cache::default());
        for bad in [
            "[]",
            "{}",
            r#"{"version": 2, "peers": []}"#,
            r#"{"version": 1, "peers": {}}"#,
            r#"{"version": 1, "peers": [{"name": 3}]}"#,
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(parse(br#"{"version": 2, "peers": []}"#).is_err_and(|e| e.contains("newer")));
        assert_eq!(parse(br#"{"version": 1, "peers": []}"#).unwrap().version, 1);
    }
}
