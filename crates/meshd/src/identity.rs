//! This node's WireGuard identity and its mesh address.
//!
//! - The private key lives in `privateKeyFile` (default `<dataDir>/meshd.key`), base64 as `wg genkey` writes it,
//!   mode 0600. It is created on first start (written atomically) and reused on every later start; it is never
//!   logged (only the public key is).
//! - The mesh address is an IPv6 address inside the cluster's ULA /64 (Talos's `ULAPrefix(clusterID, KubeSpan)`,
//!   computed by the config crate as `meshd.ulaPrefix`), with the interface ID taken from the public key:
//!   the first 8 bytes of `SHA-256("hybridnet-meshd-iid-v1" || public key)`. Unlike KubeSpan's EUI-64 of the
//!   first MAC, it does not change when a NIC is swapped and does not collide when MACs are cloned, and every
//!   node can compute any peer's mesh address from its public key alone.
//! - Without a cluster ID the prefix is [`default_prefix`]: the same derivation applied to the fixed string
//!   [`DEFAULT_CLUSTER_ID`]. Every meshd without a cluster ID shares it, which is fine for one mesh; set a
//!   cluster ID (`cluster.id` / `DiscoveryIdentityConfig.clusterID`) to keep two meshes' addresses apart.

use std::net::Ipv6Addr;
use std::path::Path;

use base64::Engine as _;
use hybridnet_config::PublicKey;
use ipnet::Ipv6Net;
use sha2::{Digest, Sha256};
use x25519_dalek::StaticSecret;
use zeroize::{Zeroize as _, Zeroizing};

use crate::Error;

/// The string whose ULA prefix a cluster without an ID uses.
pub const DEFAULT_CLUSTER_ID: &str = "hybridnet-default-cluster";

/// A WireGuard private key. `Debug` never prints it; the bytes are zeroed when it is dropped. The mesh
/// holds one behind an `Arc` and every plan shares it (no copy per reconcile).
#[derive(Clone)]
pub struct PrivateKey(pub [u8; 32]);

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl PrivateKey {
    /// A fresh key from the OS's random source (clamped as X25519 keys are).
    pub fn generate() -> PrivateKey {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        PrivateKey(secret.to_bytes())
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        let secret = StaticSecret::from(self.0);
        PublicKey(*x25519_dalek::PublicKey::from(&secret).as_bytes())
    }

    /// X25519 with a peer's public key: the shared secret both sides can compute.
    pub fn shared(&self, peer: &PublicKey) -> [u8; 32] {
        let secret = StaticSecret::from(self.0);
        *secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer.0))
            .as_bytes()
    }

    /// Base64, as `wg genkey` writes it (zeroed when dropped).
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0))
    }

    /// Parses base64 text (surrounding whitespace allowed); the decoded bytes are zeroed after the copy.
    pub fn from_base64(text: &str) -> Option<PrivateKey> {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .ok()?,
        );
        let key: [u8; 32] = bytes.as_slice().try_into().ok()?;
        Some(PrivateKey(key))
    }
}

/// Loads the key at `path`, or creates it (0600, atomically) when the file does not exist. A key file
/// readable by group or others is set to 0600 with a warning (see `private`).
pub fn load_or_create(path: &Path) -> Result<PrivateKey, Error> {
    match crate::private::read(path, "WireGuard private key") {
        Ok(bytes) => {
            // The file's text and its copies are zeroed once parsed.
            let bytes = Zeroizing::new(bytes);
            let text = Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned());
            PrivateKey::from_base64(&text).ok_or_else(|| Error::Key {
                path: path.to_owned(),
                reason: "not a base64 WireGuard private key (32 bytes)".into(),
            })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::Key {
                    path: dir.to_owned(),
                    reason: e.to_string(),
                })?;
            }
            let text = Zeroizing::new(format!("{}\n", key.to_base64().as_str()));
            hybridnet_state::atomic_write(path, text.as_bytes(), hybridnet_state::PRIVATE_MODE)
                .map_err(|e| Error::Key {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            tracing::info!(path = %path.display(), public_key = %key.public(), "created a new WireGuard key");
            Ok(key)
        }
        Err(error) => Err(Error::Key {
            path: path.to_owned(),
            reason: error.to_string(),
        }),
    }
}

/// The ULA /64 of meshes without a cluster ID.
pub fn default_prefix() -> Ipv6Net {
    hybridnet_config::ula_prefix(DEFAULT_CLUSTER_ID, hybridnet_config::ULA_KUBESPAN)
}

/// The mesh address of the node with `key` inside `prefix` (a /64).
pub fn mesh_address(prefix: Ipv6Net, key: &PublicKey) -> Ipv6Addr {
    let mut hasher = Sha256::new();
    hasher.update(b"hybridnet-meshd-iid-v1");
    hasher.update(key.0);
    let digest = hasher.finalize();
    let mut bytes = prefix.network().octets();
    bytes[8..].copy_from_slice(&digest[..8]);
    Ipv6Addr::from(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/meshd.key");
        let first = load_or_create(&path).unwrap();
        let second = load_or_create(&path).unwrap();
        assert_eq!(first.0, second.0);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!format!("{first:?}").contains(first.to_base64().as_str()));
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        assert_eq!(load_or_create(&path).unwrap().0, first.0);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a key readable by others is fixed");
        std::fs::write(&path, "garbage").unwrap();
        assert!(load_or_create(&path).is_err());
    }

    #[test]
    fn shared_secret_is_symmetric() {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        assert_eq!(a.shared(&b.public()), b.shared(&a.public()));
        assert_ne!(a.shared(&b.public()), a.shared(&a.public()));
    }

    #[test]
    fn mesh_address_is_in_the_prefix_and_keyed() {
        // Talos's test vector for the prefix itself.
        let prefix =
            hybridnet_config::ula_prefix("8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=", 2);
        assert_eq!(prefix.to_string(), "fd7f:175a:b97c:5602::/64");
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let (ma, mb) = (
            mesh_address(prefix, &a.public()),
            mesh_address(prefix, &b.public()),
        );
        assert!(prefix.contains(&ma) && prefix.contains(&mb));
        assert_ne!(ma, mb);
        assert_eq!(ma, mesh_address(prefix, &a.public()));
        assert_eq!(default_prefix().prefix_len(), 64);
    }
}
