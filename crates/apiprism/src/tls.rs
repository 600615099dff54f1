//! The optional TLS-handshake probe. It proves the API server's TLS stack answers (not only the kernel's
//! accept queue), and a completed handshake keeps "TLS handshake error ... EOF" out of the API server's log.
//!
//! For configured upstreams the certificate is not verified: apiprism is a TCP pass-through and the client
//! (kubelet) verifies the real connection end to end. An upstream discovered through meshd's members is
//! another matter: any node can announce itself as a control plane, so [`verified_handshake`] checks its
//! certificate against the cluster CA before it gets traffic (see `vetting`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use rustls::ClientConfig;
use rustls::crypto::ring;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn connector() -> Result<TlsConnector, rustls::Error> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, rustls::Error>> = OnceLock::new();
    CONFIG
        .get_or_init(|| hybridnet_tls::unverified_client_config(&[b"h2", b"http/1.1"]))
        .clone()
        .map(TlsConnector::from)
}

/// What identifies a version of the CA file without reading it: a rotated CA (written in place or
/// renamed over the old one) changes at least one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// The CA files parsed, each with its client config (one in practice: `apiprism.clusterCAFile`; a few
/// across config edits, cleared beyond [`CACHED_MAX`]).
type Cache = BTreeMap<PathBuf, (Stamp, Arc<ClientConfig>)>;
static VERIFYING: Mutex<Cache> = Mutex::new(BTreeMap::new());
const CACHED_MAX: usize = 4;

/// A client config that trusts only the CA certificates (PEM) in `ca_file`. Parsed once and kept while
/// the file is unchanged (one `stat` per check, not a read and a parse); a rotated CA is picked up at the
/// next check.
async fn verifying(ca_file: &Path) -> Result<Arc<ClientConfig>, String> {
    let shown = ca_file.display();
    let stamp = tokio::fs::metadata(ca_file)
        .await
        .map(|m| Stamp::of(&m))
        .map_err(|e| format!("cluster CA {shown}: {e}"))?;
    if let Ok(cache) = VERIFYING.lock()
        && let Some((cached, config)) = cache.get(ca_file)
        && *cached == stamp
    {
        return Ok(Arc::clone(config));
    }
    let pem = tokio::fs::read(ca_file)
        .await
        .map_err(|e| format!("cluster CA {shown}: {e}"))?;
    let config = client_config(&pem).map_err(|e| format!("cluster CA {shown}: {e}"))?;
    if let Ok(mut cache) = VERIFYING.lock() {
        if cache.len() >= CACHED_MAX {
            cache.clear();
        }
        cache.insert(ca_file.to_owned(), (stamp, Arc::clone(&config)));
    }
    Ok(config)
}

/// A client config that trusts only the CA certificates in `pem`.
fn client_config(pem: &[u8]) -> Result<Arc<ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate".to_owned());
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
    ca_file: &Path,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("cert").pem()
    }

    /// Writes `contents` to a new file renamed over `path` (as a CA rotation by an atomic write does).
    fn replace(path: &Path, contents: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, contents).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }

    #[tokio::test]
    async fn the_ca_file_is_parsed_once_and_again_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("apiprism-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ca.crt");
        replace(&path, &ca_pem());
        let first = verifying(&path).await.expect("a CA");
        let again = verifying(&path).await.expect("a CA");
        assert!(Arc::ptr_eq(&first, &again), "unchanged file, same config");
        replace(&path, &ca_pem());
        let rotated = verifying(&path).await.expect("the rotated CA");
        assert!(!Arc::ptr_eq(&first, &rotated), "a rotated CA is read again");
        // Hostile or broken files are errors naming the file, never a config that trusts nothing.
        replace(&path, "not a certificate");
        let error = verifying(&path).await.expect_err("no certificate");
        assert!(
            error.contains("ca.crt") && error.contains("no certificate"),
            "{error}"
        );
        replace(
            &path,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        assert!(verifying(&path).await.is_err());
        std::fs::remove_file(&path).expect("remove");
        let error = verifying(&path).await.expect_err("gone");
        assert!(error.contains("ca.crt"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
