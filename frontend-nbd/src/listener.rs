//! Where NBD clients connect: TCP (port 10809 by convention) or a unix
//! socket (`nbd+unix://`, `nbd-client -unix`).

use crate::BoxStream;
use std::io;
use std::path::Path;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A bound NBD listening socket.
pub enum NbdListener {
    /// TCP; connections get TCP_NODELAY.
    Tcp(TcpListener),
    /// A unix stream socket.
    Unix(UnixListener),
}

impl NbdListener {
    /// Binds `addr`: a path if it contains a `/` (an old socket file there
    /// is replaced), else a TCP host:port.
    pub async fn bind(addr: &str) -> io::Result<NbdListener> {
        if addr.contains('/') {
            let path = Path::new(addr);
            if path.exists() {
                // Only a socket may be replaced: never delete a user's file.
                use std::os::unix::fs::FileTypeExt;
                if !std::fs::metadata(path)?.file_type().is_socket() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{addr} exists and is not a socket"),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            let listener = UnixListener::bind(path)?;
            // NBD has no authentication: whoever can connect can read and
            // write every export. Owner and group only.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
            return Ok(NbdListener::Unix(listener));
        }
        Ok(NbdListener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Whether clients on other machines can reach it: a TCP address that
    /// is not loopback (`0.0.0.0` included). NBD has no authentication.
    pub fn reachable_from_network(&self) -> bool {
        match self {
            NbdListener::Tcp(l) => l.local_addr().is_ok_and(|a| !a.ip().is_loopback()),
            NbdListener::Unix(_) => false,
        }
    }

    /// An NBD URI for an export on this listener.
    pub fn uri(&self, export: &str) -> io::Result<String> {
        Ok(match self {
            NbdListener::Tcp(l) => format!("nbd://{}/{export}", l.local_addr()?),
            NbdListener::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr.as_pathname().map(|p| p.display().to_string());
                format!(
                    "nbd+unix:///{export}?socket={}",
                    path.unwrap_or_else(|| "?".into())
                )
            }
        })
    }

    pub(crate) async fn accept(&self) -> io::Result<(Accepted, String)> {
        match self {
            NbdListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Accepted::Tcp(s), peer.to_string()))
            }
            NbdListener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Accepted::Unix(s), "unix".into()))
            }
        }
    }
}

/// A connection just accepted, still registered with the accepting
/// runtime's reactor.
pub(crate) enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Accepted {
    /// The stream, to run on the accepting runtime.
    pub(crate) fn boxed(self) -> BoxStream {
        match self {
            Accepted::Tcp(s) => Box::new(s),
            Accepted::Unix(s) => Box::new(s),
        }
    }

    /// The socket, released from the accepting runtime so that another
    /// can take it up ([`Detached::register`]).
    pub(crate) fn detach(self) -> io::Result<Detached> {
        Ok(match self {
            Accepted::Tcp(s) => Detached::Tcp(s.into_std()?),
            Accepted::Unix(s) => Detached::Unix(s.into_std()?),
        })
    }
}

/// A connection's socket between two runtimes (still non-blocking).
pub(crate) enum Detached {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Detached {
    /// Registers the socket with the current runtime's reactor.
    pub(crate) fn register(self) -> io::Result<BoxStream> {
        Ok(match self {
            Detached::Tcp(s) => Box::new(TcpStream::from_std(s)?),
            Detached::Unix(s) => Box::new(UnixStream::from_std(s)?),
        })
    }
}

impl From<TcpListener> for NbdListener {
    fn from(l: TcpListener) -> Self {
        NbdListener::Tcp(l)
    }
}
