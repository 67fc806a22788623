//! TLS for channels, with rustls. The pre-shared-key session auth runs
//! inside it unchanged: TLS protects the bytes, braid's handshake proves the
//! peer holds the key.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("certificates {}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("certificates {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("certificates {}: none found", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("private key {}: {e}", path.display()))
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| format!("CA {}: {e}", path.display()))?;
    }
    Ok(store)
}

/// A server side: its certificate and key, and, to require client
/// certificates, the CA that signs them.
pub fn acceptor(
    cert: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| format!("TLS certificate: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client side: the CA (or the server's own self-signed certificate) to
/// trust, the name to expect on it, and optionally a client certificate.
pub fn connector(
    ca: &Path,
    server_name: &str,
    client: Option<(&Path, &Path)>,
) -> Result<(TlsConnector, ServerName<'static>), String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?);
    let config = match client {
        Some((cert, k)) => builder
            .with_client_auth_cert(certs(cert)?, key(k)?)
            .map_err(|e| format!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("TLS server name {server_name:?}: {e}"))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// Writes a self-signed certificate for `names` and its key (0600).
pub fn generate_self_signed(
    names: &[String],
    cert_out: &Path,
    key_out: &Path,
) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| format!("generate certificate: {e}"))?;
    let mut k = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_out)
        .map_err(|e| format!("{}: {e}", key_out.display()))?;
    k.write_all(ck.signing_key.serialize_pem().as_bytes())
        .map_err(|e| format!("{}: {e}", key_out.display()))?;
    std::fs::write(cert_out, ck.cert.pem()).map_err(|e| format!("{}: {e}", cert_out.display()))
}
