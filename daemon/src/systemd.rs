//! sd_notify for `Type=notify` units: READY=1 once the daemon serves,
//! STOPPING=1 when it starts draining. Without NOTIFY_SOCKET (not under
//! systemd) nothing is sent; a failed send is logged, never fatal.

use std::os::unix::net::UnixDatagram;

/// Tells systemd the daemon is serving, with a one-line status.
pub(crate) fn ready(status: &str) {
    notify(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}",
        std::process::id()
    ));
}

/// Tells systemd the daemon is rereading its configuration; `ready`
/// follows once it has.
pub(crate) fn reloading() {
    notify("RELOADING=1");
}

/// Tells systemd the daemon is draining and will exit.
pub(crate) fn stopping() {
    notify("STOPPING=1");
}

fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)
        } else {
            socket.send_to(message.as_bytes(), &path)
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = ?path, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        ready("serving 1 export");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            text.starts_with("READY=1\nSTATUS=serving 1 export\nMAINPID="),
            "{text}"
        );
    }
}
