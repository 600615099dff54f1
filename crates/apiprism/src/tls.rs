//! The optional TLS-handshake probe. It proves the API server's TLS stack answers (not only the kernel's
//! accept queue), and a completed handshake keeps "TLS handshake error ... EOF" out of the API server's log.
//!
//! For configured upstreams the certificate is not verified: apiprism is a TCP pass-through and the client
//! (kubelet) verifies the real connection end to end. An upstream discovered through meshd's members is
//! another matter: any node can announce itself as a control plane, so [`verified_handshake`] checks its
//! certificate against the cluster CA before it gets traffic (see `vetting`).

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn connector() -> Result<TlsConnector, rustls::Error> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, rustls::Error>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    });
    config.clone().map(TlsConnector::from)
}

/// A client config that trusts only the CA certificates (PEM) in `ca_file`, read now (a rotated CA is
/// picked up at the next check).
async fn verifying(ca_file: &std::path::Path) -> Result<Arc<ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let shown = ca_file.display();
    let pem = tokio::fs::read(ca_file)
        .await
        .map_err(|e| format!("cluster CA {shown}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("cluster CA {shown}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("cluster CA {shown}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("cluster CA {shown}: no certificate"));
    }
    let provider = Arc::new(ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Completes a TLS handshake over `stream` whose certificate must verify against `ca_file` for
/// `server_name`, then closes cleanly.
pub async fn verified_handshake(
    stream: TcpStream,
    server_name: &str,
    ca_file: &std::path::Path,
) -> Result<(), String> {
    handshake_with(
        TlsConnector::from(verifying(ca_file).await?),
        stream,
        server_name,
    )
    .await
}

/// Completes a TLS handshake over `stream` with SNI `server_name`, then closes cleanly.
pub async fn handshake(stream: TcpStream, server_name: &str) -> Result<(), String> {
    handshake_with(connector().map_err(|e| e.to_string())?, stream, server_name).await
}

/// The handshake both checks make: SNI `server_name`, then a best-effort close_notify (the handshake is what
/// was checked).
async fn handshake_with(
    connector: TlsConnector,
    stream: TcpStream,
    server_name: &str,
) -> Result<(), String> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, stream)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tls.shutdown().await;
    Ok(())
}
