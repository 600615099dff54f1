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

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Cache {
    pub version: u32,
    pub peers: Vec<CachedPeer>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// Reads the cache; a missing or unreadable file is an empty cache (logged).
pub fn load(path: &Path) -> Cache {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<Cache>(&bytes) {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "ignoring an unreadable peer cache");
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
    }
}
