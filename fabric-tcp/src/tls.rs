//! TLS for channels, with rustls. The pre-shared-key session auth runs
//! inside it unchanged: TLS protects the bytes, braid's handshake proves the
//! peer holds the key.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
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
    roots_of(certs(path)?, path)
}

fn roots_of(
    certs: Vec<CertificateDer<'static>>,
    path: &Path,
) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs {
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

/// [`acceptor`], and the handle that swaps its certificate, key and
/// client CA for what their files hold now ([`ServerCert::reload`]).
pub fn reloadable_acceptor(
    cert: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
) -> Result<(TlsAcceptor, Arc<ServerCert>), String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let client_ca = match client_ca {
        Some(path) => Some(Arc::new(ClientCa {
            current: RwLock::new(CaNow::read(path)?),
            path: path.to_path_buf(),
        })),
        None => None,
    };
    let builder = match &client_ca {
        Some(ca) => builder.with_client_cert_verifier(ca.clone()),
        None => builder.with_no_client_auth(),
    };
    let served = Arc::new(ServerCert {
        current: RwLock::new(Arc::new(certified_key(cert, key_path)?)),
        cert: cert.to_path_buf(),
        key: key_path.to_path_buf(),
        client_ca,
    });
    let mut config = builder.with_cert_resolver(served.clone());
    if served.client_ca.is_some() {
        // A resumed session is not verified again, and a handshake
        // verified under a CA just withdrawn can still be handed a ticket
        // after the reload: with client certificates required, every
        // connection proves its certificate afresh.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
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

/// What a client CA file holds now: the verifier built from it, and when
/// the first of its certificates expires (client certificates chained to
/// it stop passing then, however long they run themselves).
#[derive(Debug)]
struct CaNow {
    verifier: Arc<dyn ClientCertVerifier>,
    not_after: Option<i64>,
}

impl CaNow {
    fn read(ca: &Path) -> Result<Self, String> {
        let certs = certs(ca)?;
        // `None` if any of them cannot be read: a date from the rest
        // would claim more than is known.
        let not_after = certs
            .iter()
            .map(|c| crate::cert_dates::not_after(c))
            .collect::<Option<Vec<_>>>()
            .and_then(|dates| dates.into_iter().min());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots_of(certs, ca)?), provider())
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
        Ok(Self {
            verifier,
            not_after,
        })
    }
}

/// A server's certificate and key, and the CA its clients' certificates
/// must chain to (if it requires them), replaceable while it serves (a
/// certificate renewed before it expires, a CA rotated): each TLS
/// handshake uses the ones current when it starts, so connections already
/// secured keep theirs.
#[derive(Debug)]
pub struct ServerCert {
    current: RwLock<Arc<CertifiedKey>>,
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<Arc<ClientCa>>,
}

impl ServerCert {
    /// Reads the certificate, key and client CA files again and uses them
    /// from the next handshake on. If any file does not parse, or the key
    /// does not match the certificate, nothing changes.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = certified_key(&self.cert, &self.key)?;
        let ca_now = match &self.client_ca {
            Some(ca) => Some(CaNow::read(&ca.path)?),
            None => None,
        };
        *self.current.write().unwrap() = Arc::new(fresh);
        if let (Some(ca), Some(ca_now)) = (&self.client_ca, ca_now) {
            *ca.current.write().unwrap() = ca_now;
        }
        Ok(())
    }

    /// The certificate file it reads.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// When the certificate served now stops being valid, in seconds
    /// since the Unix epoch (`None` if its DER cannot be read).
    pub fn not_after(&self) -> Option<i64> {
        let current = self.current.read().unwrap().clone();
        crate::cert_dates::not_after(current.cert.first()?)
    }

    /// The client CA file it reads, if client certificates are required.
    pub fn client_ca_path(&self) -> Option<&Path> {
        self.client_ca.as_ref().map(|ca| ca.path.as_path())
    }

    /// When the first certificate of the client CA held now expires, in
    /// seconds since the Unix epoch (`None` without a client CA, or if a
    /// certificate's DER cannot be read).
    pub fn client_ca_not_after(&self) -> Option<i64> {
        self.client_ca.as_ref()?.current.read().unwrap().not_after
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap().clone())
    }
}

/// The CA a server requires client certificates to chain to, replaceable
/// by [`ServerCert::reload`]. Every certificate is checked by the
/// verifier current when it arrives.
#[derive(Debug)]
pub struct ClientCa {
    current: RwLock<CaNow>,
    path: PathBuf,
}

impl ClientCa {
    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.read().unwrap().verifier.clone()
    }
}

impl ClientCertVerifier for ClientCa {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No CA names go in the certificate request: they would have to
    /// outlive a reload, and a client with one certificate (braid attach,
    /// gnutls and OpenSSL clients given one) sends it without them.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate's PEM, valid until the given day.
    fn pem_expiring(year: i32, month: u8, day: u8) -> String {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn the_client_ca_says_when_its_first_certificate_expires_and_follows_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca) = (
            dir.path().join("cert.pem"),
            dir.path().join("key.pem"),
            dir.path().join("ca.pem"),
        );
        generate_self_signed(&["localhost".into()], &cert, &key).unwrap();
        // Two CAs in one file: the earlier expiry is the one that bites.
        let (in_2061, in_2031) = (pem_expiring(2061, 1, 1), pem_expiring(2031, 5, 17));
        std::fs::write(&ca, format!("{in_2061}{in_2031}")).unwrap();
        let (_, served) = reloadable_acceptor(&cert, &key, Some(&ca)).unwrap();
        assert_eq!(served.client_ca_not_after(), Some(1_936_742_400));

        std::fs::write(&ca, &in_2061).unwrap();
        served.reload().unwrap();
        assert_eq!(served.client_ca_not_after(), Some(2_871_763_200));

        // A file that does not parse leaves the date with the CA in use.
        std::fs::write(&ca, "not a certificate\n").unwrap();
        served.reload().unwrap_err();
        assert_eq!(served.client_ca_not_after(), Some(2_871_763_200));

        let (_, without) = reloadable_acceptor(&cert, &key, None).unwrap();
        assert_eq!(without.client_ca_not_after(), None);
    }
}
