//! Talos-compatible encryption and encoding of affiliates, keyed by the cluster secret:
//!
//! - affiliate data: `nonce(12) ‖ AES-256-GCM(client.Affiliate protobuf) ‖ tag(16)`;
//! - each endpoint: `len(1) ‖ client.Endpoint protobuf`, zero-padded to a multiple of 16 bytes and
//!   encrypted with raw AES-256 per block (ECB, as Talos does, so the server can deduplicate them);
//! - IP addresses as Go's `netip.Addr.MarshalBinary`: 4 bytes (IPv4), 16 bytes (IPv6, including
//!   IPv4-mapped), plus the zone name if any (ignored when reading), empty for no address.
//!
//! Nothing here panics on input: every malformed record is a [`Rejected`] reason.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aes::Aes256;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, generic_array::GenericArray};
use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, Nonce};
use ipnet::IpNet;
use prost::Message as _;

use super::proto::client;

/// The discovery service refuses affiliate data larger than this (`AffiliateDataMax`).
pub const DATA_MAX: usize = 2048;
/// ... and an encrypted endpoint larger than this (`AffiliateEndpointMax`).
pub const ENDPOINT_MAX: usize = 32;
/// ... and more endpoints than this per affiliate (`AffiliateEndpointsMax`).
pub const ENDPOINTS_MAX: usize = 64;
const NONCE: usize = 12;
const TAG: usize = 16;
const BLOCK: usize = 16;

/// Why a record from the service was dropped (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Larger than the service's limit.
    Oversized,
    /// Shorter than nonce + tag.
    Short,
    /// Authentication failed: another cluster's record, or tampered with.
    Decrypt,
    /// Decrypted, but not an `Affiliate`/`Endpoint` protobuf.
    Protobuf,
    /// An endpoint that is not whole blocks, or whose length byte or address is wrong.
    Endpoint,
}

impl Rejected {
    /// Every reason (each is a `reason` label of `meshd_discovery_rejected_total`, there from the start).
    pub const ALL: [Rejected; 5] = [
        Rejected::Oversized,
        Rejected::Short,
        Rejected::Decrypt,
        Rejected::Protobuf,
        Rejected::Endpoint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Oversized => "oversized",
            Rejected::Short => "short",
            Rejected::Decrypt => "decrypt",
            Rejected::Protobuf => "protobuf",
            Rejected::Endpoint => "endpoint",
        }
    }
}

/// The cipher pair for one cluster secret.
#[derive(Clone)]
pub struct Codec {
    gcm: Aes256Gcm,
    block: Aes256,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Codec(<key redacted>)")
    }
}

impl Codec {
    pub fn new(secret: &[u8; 32]) -> Codec {
        Codec {
            gcm: Aes256Gcm::new(GenericArray::from_slice(secret)),
            block: Aes256::new(GenericArray::from_slice(secret)),
        }
    }

    /// Encrypts an affiliate with a random nonce.
    pub fn seal_affiliate(&self, affiliate: &client::Affiliate) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        self.seal_affiliate_with(affiliate, nonce)
    }

    /// Encrypts an affiliate with the given nonce (tests and vectors).
    pub fn seal_affiliate_with(
        &self,
        affiliate: &client::Affiliate,
        nonce: [u8; NONCE],
    ) -> Vec<u8> {
        let plain = affiliate.encode_to_vec();
        let mut out = nonce.to_vec();
        // Encryption with a valid key and nonce size cannot fail (the plaintext is far below the limit).
        match self
            .gcm
            .encrypt(Nonce::from_slice(&nonce), plain.as_slice())
        {
            Ok(sealed) => out.extend_from_slice(&sealed),
            Err(_) => out.clear(),
        }
        out
    }

    /// Decrypts and parses affiliate data.
    pub fn open_affiliate(&self, data: &[u8]) -> Result<client::Affiliate, Rejected> {
        if data.len() > DATA_MAX {
            return Err(Rejected::Oversized);
        }
        if data.len() < NONCE + TAG {
            return Err(Rejected::Short);
        }
        let (nonce, sealed) = data.split_at(NONCE);
        let plain = self
            .gcm
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| Rejected::Decrypt)?;
        client::Affiliate::decode(plain.as_slice()).map_err(|_| Rejected::Protobuf)
    }

    /// Encodes and encrypts one endpoint as Talos does.
    pub fn seal_endpoint(&self, endpoint: SocketAddr) -> Vec<u8> {
        let ep = client::Endpoint {
            ip: ip_bytes(endpoint.ip()),
            port: u32::from(endpoint.port()),
        };
        let body = ep.encode_to_vec();
        let mut data = Vec::with_capacity(ENDPOINT_MAX);
        // An Endpoint is at most 2 + 16 + 1 + 3 bytes: the length fits a byte.
        data.push(body.len() as u8);
        data.extend_from_slice(&body);
        if !data.len().is_multiple_of(BLOCK) {
            data.resize(data.len() + BLOCK - data.len() % BLOCK, 0);
        }
        for chunk in data.chunks_exact_mut(BLOCK) {
            self.block
                .encrypt_block(GenericArray::from_mut_slice(chunk));
        }
        data
    }

    /// Decrypts and parses one endpoint.
    pub fn open_endpoint(&self, data: &[u8]) -> Result<SocketAddr, Rejected> {
        if data.len() > ENDPOINT_MAX {
            return Err(Rejected::Oversized);
        }
        if data.is_empty() || !data.len().is_multiple_of(BLOCK) {
            return Err(Rejected::Endpoint);
        }
        let mut plain = data.to_vec();
        for chunk in plain.chunks_exact_mut(BLOCK) {
            self.block
                .decrypt_block(GenericArray::from_mut_slice(chunk));
        }
        let size = usize::from(plain[0]);
        let body = plain.get(1..1 + size).ok_or(Rejected::Endpoint)?;
        // The padding is zeros: anything else means another key (ECB has no authentication).
        if plain[1 + size..].iter().any(|b| *b != 0) {
            return Err(Rejected::Decrypt);
        }
        let ep = client::Endpoint::decode(body).map_err(|_| Rejected::Protobuf)?;
        let ip = ip_from_bytes(&ep.ip).ok_or(Rejected::Endpoint)?;
        let port = u16::try_from(ep.port).map_err(|_| Rejected::Endpoint)?;
        if port == 0 {
            return Err(Rejected::Endpoint);
        }
        Ok(SocketAddr::new(ip, port))
    }
}

/// Go `netip.Addr.MarshalBinary` of an address (no zone).
pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The inverse of [`ip_bytes`]; a zone after the 16 bytes is ignored; empty (Go's zero `Addr`) and
/// other lengths are `None`.
pub fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        n if n >= 16 => {
            let octets: [u8; 16] = b[..16].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// An `IPPrefix` as an [`IpNet`], when valid.
pub fn prefix_from(p: &client::IpPrefix) -> Option<IpNet> {
    let ip = ip_from_bytes(&p.ip)?;
    let bits = u8::try_from(p.bits).ok()?;
    IpNet::new(ip, bits).ok().map(|n| n.trunc())
}

/// An [`IpNet`] as an `IPPrefix`.
pub fn prefix_to(n: &IpNet) -> client::IpPrefix {
    client::IpPrefix {
        ip: ip_bytes(n.addr()),
        bits: u32::from(n.prefix_len()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
