//! TLS for channels, with rustls. The pre-shared-key session auth runs
//! inside it unchanged: TLS protects the bytes, braid's handshake proves the
//! peer holds the key.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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
    Ok(reloadable_acceptor(cert, key_path, client_ca)?.0)
}

/// [`acceptor`], and the handle that swaps its certificate and key for
/// what their files hold now ([`ServerCert::reload`]).
pub fn reloadable_acceptor(
    cert: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
) -> Result<(TlsAcceptor, Arc<ServerCert>), String> {
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
    let served = Arc::new(ServerCert {
        current: RwLock::new(Arc::new(certified_key(cert, key_path)?)),
        cert: cert.to_path_buf(),
        key: key_path.to_path_buf(),
    });
    let config = builder.with_cert_resolver(served.clone());
    Ok((TlsAcceptor::from(Arc::new(config)), served))
}

fn certified_key(cert: &Path, key_path: &Path) -> Result<CertifiedKey, String> {
    CertifiedKey::from_der(certs(cert)?, key(key_path)?, &provider()).map_err(|e| {
        format!(
            "TLS certificate {} with key {}: {e}",
            cert.display(),
            key_path.display()
        )
    })
}

/// A server's certificate and key, replaceable while it serves (a
/// certificate renewed before it expires): each TLS handshake takes the
/// one current when it starts, so connections already secured keep
/// theirs.
#[derive(Debug)]
pub struct ServerCert {
    current: RwLock<Arc<CertifiedKey>>,
    cert: PathBuf,
    key: PathBuf,
}

impl ServerCert {
    /// Reads the certificate and key files again and serves them from
    /// the next handshake on. Files that do not parse, or a key that does
    /// not match the certificate, change nothing.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = certified_key(&self.cert, &self.key)?;
        *self.current.write().unwrap() = Arc::new(fresh);
        Ok(())
    }

    /// The certificate file it reads.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap().clone())
    }
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
