//! The NBD face over a unix socket and with STARTTLS.

mod common;

use braid_frontend_nbd::NbdListener;
use common::*;
use tokio::net::{TcpStream, UnixStream};

const ERR_UNSUP: u32 = (1 << 31) + 1;
const ERR_POLICY: u32 = (1 << 31) + 2;

async fn write_then_read(s: &mut (impl Io + ?Sized)) {
    let data = vec![0x3c; 4096];
    request(s, 1, 1, 1, 8192, 4096, &data).await;
    assert_eq!(reply(s, 0).await.1, 0);
    request(s, 0, 0, 2, 8192, 4096, &[]).await;
    assert_eq!(reply(s, 4096).await.2, data);
}

#[tokio::test]
async fn a_unix_socket_serves_like_tcp_and_replaces_only_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    // A regular file in the way is never deleted.
    std::fs::write(&path, b"precious").unwrap();
    assert!(NbdListener::bind(path.to_str().unwrap()).await.is_err());
    std::fs::remove_file(&path).unwrap();
    drop(NbdListener::bind(path.to_str().unwrap()).await.unwrap());
    // The stale socket left behind is replaced.
    let listener = NbdListener::bind(path.to_str().unwrap()).await.unwrap();
    assert_eq!(
        listener.uri("disk0").unwrap(),
        format!("nbd+unix:///disk0?socket={}", path.display())
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "no NBD access for other users");
    start_with(dir.path(), listener, |c| c);
    let mut s = UnixStream::connect(&path).await.unwrap();
    greet(&mut s).await;
    let (size, _) = go(&mut s, "disk0").await;
    assert_eq!(size, SIZE);
    write_then_read(&mut s).await;
}

#[tokio::test]
async fn starttls_without_tls_configured_is_refused_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    option(&mut s, 5, &[]).await;
    // NOTLS: "MUST respond with NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP";
    // a build without TLS does not know the option at all.
    let refusal = if cfg!(feature = "tls") {
        ERR_POLICY
    } else {
        ERR_UNSUP
    };
    assert_eq!(option_reply(&mut s).await.1, refusal);
    // Negotiation goes on in plain text.
    go(&mut s, "disk0").await;
    write_then_read(&mut s).await;
}

// Without the tls feature there is no acceptor to hand the listener; the
// plain-text tests above still show STARTTLS refused by policy.
#[cfg(feature = "tls")]
mod forced_tls {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const ERR_INVALID: u32 = (1 << 31) + 3;
    const ERR_TLS_REQD: u32 = (1 << 31) + 5;

    #[tokio::test]
    async fn forced_tls_refuses_options_until_starttls_then_serves_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        braid_fabric_tcp::tls::generate_self_signed(&["localhost".into()], &cert, &key).unwrap();
        let acceptor = braid_fabric_tcp::tls::acceptor(&cert, &key, None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        start_with(dir.path(), NbdListener::Tcp(listener), |c| {
            c.with_tls(acceptor, true)
        });

        let mut s = TcpStream::connect(addr).await.unwrap();
        greet(&mut s).await;
        // FORCEDTLS: "If the server receives any other option, it MUST reply
        // with NBD_REP_ERR_TLS_REQD."
        option(&mut s, 3, &[]).await;
        assert_eq!(option_reply(&mut s).await.1, ERR_TLS_REQD);
        option(&mut s, 6, &go_data("disk0")).await;
        assert_eq!(option_reply(&mut s).await.1, ERR_TLS_REQD);
        option(&mut s, 5, &[]).await;
        assert_eq!(option_reply(&mut s).await.1, 1, "STARTTLS acked");
        let (connector, name) = braid_fabric_tcp::tls::connector(&cert, "localhost", None).unwrap();
        let mut tls = connector.connect(name, s).await.unwrap();
        // "when TLS has already been negotiated, it MUST reply with
        // NBD_REP_ERR_INVALID", and never TLS_REQD again.
        option(&mut tls, 5, &[]).await;
        assert_eq!(option_reply(&mut tls).await.1, ERR_INVALID);
        let (size, _) = go(&mut tls, "disk0").await;
        assert_eq!(size, SIZE);
        write_then_read(&mut tls).await;

        // EXPORT_NAME before TLS "MUST terminate the session".
        let mut plain = TcpStream::connect(addr).await.unwrap();
        greet(&mut plain).await;
        option(&mut plain, 1, b"disk0").await;
        assert_eq!(plain.read(&mut [0u8; 1]).await.unwrap_or(0), 0, "closed");

        // A client that fails the TLS handshake is dropped; others go on.
        let mut bad = TcpStream::connect(addr).await.unwrap();
        greet(&mut bad).await;
        option(&mut bad, 5, &[]).await;
        assert_eq!(option_reply(&mut bad).await.1, 1);
        tokio::io::AsyncWriteExt::write_all(&mut bad, b"this is not a TLS client hello....")
            .await
            .unwrap();
        assert!(bad.read(&mut [0u8; 64]).await.unwrap_or(0) < 64, "dropped");
        write_then_read(&mut tls).await;
    }
}
