//! The KubeSpan-compatible ULA /64 of a cluster (Talos `ULAPrefix(clusterID, ULAKubeSpan)`).
//!
//! What is hashed is the cluster ID *string as written in the config* (its UTF-8 bytes, the
//! base64 text itself, not the decoded 32 bytes): `sha256(clusterID)`, take the last 16 bytes of the
//! digest, set byte 0 to `0xfd` and byte 7 to the purpose (`0x02` for KubeSpan), mask to /64.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use sha2::{Digest, Sha256};

/// Talos's purpose byte for KubeSpan.
pub const ULA_KUBESPAN: u8 = 0x02;

/// The /64 for `cluster_id` and `purpose`.
pub fn ula_prefix(cluster_id: &str, purpose: u8) -> Ipv6Net {
    let digest = Sha256::digest(cluster_id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[16..32]);
    bytes[0] = 0xfd;
    bytes[7] = purpose;
    for b in &mut bytes[8..] {
        *b = 0;
    }
    // A /64 is always a valid IPv6 prefix length.
    Ipv6Net::new(Ipv6Addr::from(bytes), 64).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn talos_test_vector() {
        let net = super::ula_prefix(
            "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=",
            super::ULA_KUBESPAN,
        );
        assert_eq!(net.to_string(), "fd7f:175a:b97c:5602::/64");
    }
}
