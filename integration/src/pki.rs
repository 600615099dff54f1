//! Test PKI for the stand-ins that speak TLS (the Kubernetes API, the discovery service): a
//! self-signed CA and server certificates it signs, made with rcgen.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A test CA.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

fn e(e: rcgen::Error) -> String {
    e.to_string()
}

impl TestCa {
    /// A new self-signed CA named `cn`.
    pub fn new(cn: &str) -> Result<TestCa, String> {
        let key = rcgen::KeyPair::generate().map_err(e)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).map_err(e)?;
        Ok(TestCa { issuer })
    }

    /// The CA certificate (PEM), what a client trusts.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate (DER).
    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A certificate for `names` (IP addresses or DNS names) with extended key usage `usage`, and
    /// its key; `dn` adds distinguished-name entries.
    pub fn issue(
        &self,
        names: &[String],
        dn: &[(rcgen::DnType, &str)],
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> Result<(rcgen::Certificate, rcgen::KeyPair), String> {
        let key = rcgen::KeyPair::generate().map_err(e)?;
        let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(e)?;
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).map_err(e)?;
        Ok((cert, key))
    }

    /// A TLS server config for a server certificate for `ip` (no client authentication, ALPN `h2`
    /// and `http/1.1` offered).
    pub fn server_config(&self, ip: std::net::IpAddr) -> Result<Arc<rustls::ServerConfig>, String> {
        self.server_config_for(&[ip.to_string()])
    }

    /// [`TestCa::server_config`] for a certificate naming `names` (IP addresses or DNS names).
    pub fn server_config_for(&self, names: &[String]) -> Result<Arc<rustls::ServerConfig>, String> {
        let (cert, key) = self.issue(names, &[], rcgen::ExtendedKeyUsagePurpose::ServerAuth)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}
