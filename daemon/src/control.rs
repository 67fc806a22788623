//! The control socket of a long-running `braid` process: one command line
//! in, one JSON document out. `braid status` and `braid detach` use it.

use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Fails if a live process answers on `path`: taking its socket over would
/// leave it unreachable by `braid status`. A stale socket (its owner died)
/// is fine; `serve` replaces it.
pub(crate) fn ensure_unused(path: &Path) -> Result<(), String> {
    let Ok(stream) = std::os::unix::net::UnixStream::connect(path) else {
        return Ok(());
    };
    let who = peer_pid(&stream).map_or_else(
        || "another process".to_string(),
        |pid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            format!("{name} (pid {pid})")
        },
    );
    Err(format!(
        "socket {} is in use by {who}; stop it, or give this one a path of its own",
        path.display()
    ))
}

fn peer_pid(stream: &std::os::unix::net::UnixStream) -> Option<i32> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a zeroed ucred is valid; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a connected unix socket owned by `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// An answer, ready now or once the engine has acted on the command.
pub(crate) type Answer =
    std::pin::Pin<Box<dyn std::future::Future<Output = serde_json::Value> + Send>>;

/// An answer once `work` is done: its document, or `{"error": …}`.
pub(crate) fn later(
    work: impl std::future::Future<Output = Result<serde_json::Value, String>> + Send + 'static,
) -> Answer {
    Box::pin(async move {
        work.await
            .unwrap_or_else(|e| serde_json::json!({ "error": e }))
    })
}

/// An answer that is ready now.
pub(crate) fn now(v: serde_json::Value) -> Answer {
    Box::pin(std::future::ready(v))
}

/// A unix socket this process bound. At exit it is removed only while its
/// path still names it: a daemon started on the same path while this one
/// drained (the path answered no more, so `ensure_unused` let it bind) has
/// its own socket there, and deleting that would cut it off.
#[derive(Debug)]
pub(crate) struct OwnedSocket {
    path: PathBuf,
    identity: (u64, u64),
}

impl OwnedSocket {
    /// The socket at `path`, which this process has just bound.
    pub(crate) fn claim(path: &Path) -> Option<OwnedSocket> {
        Some(OwnedSocket {
            path: path.to_path_buf(),
            identity: identity(path)?,
        })
    }

    /// Removes the path if it still names this socket.
    pub(crate) fn remove(self) {
        if identity(&self.path) == Some(self.identity) {
            let _ = std::fs::remove_file(&self.path);
        } else {
            tracing::info!(path = %self.path.display(), "socket path taken over by another process: left in place");
        }
    }
}

/// Which file `path` names now (device and inode), without following a link.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Answers commands on `path` with `handler(command)`, and returns the
/// socket to remove at exit. A missing socket only costs `braid status`,
/// so failing to bind is a warning.
pub(crate) fn serve(
    path: PathBuf,
    handler: impl Fn(&str) -> Answer + Send + Sync + 'static,
) -> Option<OwnedSocket> {
    // Only a socket may be replaced (a stale one from a killed daemon).
    if std::fs::symlink_metadata(&path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    {
        let _ = std::fs::remove_file(&path);
    }
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no control socket: braid status will not work");
            return None;
        }
    };
    let owned = OwnedSocket::claim(&path);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            // A peer that sends nothing gets the status after a short wait.
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                BufReader::new(rd.take(1024)).read_line(&mut line),
            )
            .await;
            let command = match read {
                Ok(Ok(_)) => line.trim().to_string(),
                _ => "status".to_string(),
            };
            let answer = handler(if command.is_empty() {
                "status"
            } else {
                &command
            });
            // Off the accept loop: a command waiting on the engine holds up
            // no one else's `braid status`.
            tokio::spawn(async move {
                let doc = answer.await;
                let _ = wr.write_all(doc.to_string().as_bytes()).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    owned
}

/// Sends `command` to the process behind `path` and returns its answer.
pub(crate) async fn request(path: &Path, command: &str) -> Result<serde_json::Value, String> {
    let mut stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        format!(
            "control socket {}: {e} (is the braid daemon running?)",
            path.display()
        )
    })?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .await
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("control socket sent bad JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn an_exiting_daemon_removes_its_socket_but_not_a_successors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attach.sock");

        let _first = UnixListener::bind(&path).unwrap();
        OwnedSocket::claim(&path).unwrap().remove();
        assert!(!path.exists(), "its own socket is removed");

        let _draining = UnixListener::bind(&path).unwrap();
        let draining = OwnedSocket::claim(&path).unwrap();
        // A successor replaced the path while the first one drained.
        std::fs::remove_file(&path).unwrap();
        let _successor = UnixListener::bind(&path).unwrap();
        draining.remove();
        assert!(
            std::os::unix::net::UnixStream::connect(&path).is_ok(),
            "the successor's socket is still reachable"
        );
    }
}
