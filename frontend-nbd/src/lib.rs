//! The NBD protocol in front of braid storage, so the NBD ecosystem (qemu,
//! the kernel's nbd-client, libnbd's tools, fio) reaches it.
//!
//! Two uses of one adapter: `braid serve --nbd` puts a server's own
//! exports behind NBD ([`BackendTarget`]); `braid attach --nbd` puts a
//! braid volume, with its failover, behind a local NBD socket (its own
//! [`Target`]). Fixed newstyle negotiation with EXPORT_NAME, INFO, GO,
//! LIST, ABORT, STARTTLS, STRUCTURED_REPLY and LIST/SET_META_CONTEXT
//! (`base:allocation`); READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with
//! FAST_ZERO), CACHE, BLOCK_STATUS and DISC, with FUA. The spec
//! (NetworkBlockDevice/nbd doc/proto.md), not any one peer, decides
//! behaviour; each choice names its clause. docs/CONFORMANCE.md lists
//! every MUST and SHOULD with its status.

#![deny(missing_docs)]

#[cfg(any(test, feature = "fuzzing"))]
mod fuzz;
mod listener;
mod negotiate;
mod placement;
mod proto;
mod receive;
mod reply;
mod ring;
mod socket;
mod target;
mod transmit;
mod turns;
mod whole_read;
mod whole_send;
mod writer;

#[cfg(any(test, feature = "fuzzing"))]
pub use fuzz::exercise_nbd;
pub use listener::NbdListener;
pub use placement::Placement;
pub use target::{BackendTarget, Completion, ExtentsCompletion, Target};

use listener::Accepted;
use placement::Placed;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Any byte stream a connection runs over: TCP, a unix socket, or TLS on
/// either after STARTTLS.
/// `Any` lets transmission find a plain socket again (for `sendfile`).
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + std::any::Any {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}
pub(crate) type BoxStream = Box<dyn Stream>;

/// One export as NBD clients see it.
#[derive(Debug, Clone)]
pub struct NbdExport {
    /// Name clients ask for (the first export also answers the empty name,
    /// as the spec's default export).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Refuse writes.
    pub read_only: bool,
    /// Index of the export in the target.
    pub backend_index: usize,
    /// Alignment every offset and length must have (a power of two).
    pub block_min: u32,
    /// Longest READ or WRITE accepted.
    pub block_max: u32,
}

impl NbdExport {
    /// A writable export taking any alignment and requests up to 32 MiB.
    pub fn new(name: impl Into<String>, size: u64, backend_index: usize) -> Self {
        NbdExport {
            name: name.into(),
            size,
            read_only: false,
            backend_index,
            block_min: 1,
            block_max: 32 << 20,
        }
    }
}

/// What an NBD server offers.
#[derive(Clone)]
pub struct NbdConfig {
    /// The exports, the first being the default.
    pub exports: Vec<NbdExport>,
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsAcceptor>,
    tls_required: bool,
}

impl NbdConfig {
    /// Plain NBD (STARTTLS is refused with ERR_POLICY).
    pub fn new(exports: Vec<NbdExport>) -> Self {
        NbdConfig {
            exports,
            #[cfg(feature = "tls")]
            tls: None,
            tls_required: false,
        }
    }

    /// Offers STARTTLS with this acceptor. With `required` the server runs
    /// in the spec's FORCEDTLS mode: every option but STARTTLS and ABORT is
    /// refused with ERR_TLS_REQD until TLS is up.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, acceptor: tokio_rustls::TlsAcceptor, required: bool) -> Self {
        self.tls = Some(acceptor);
        self.tls_required = required;
        self
    }

    /// Whether every client must speak TLS before it sees an export.
    pub fn has_tls(&self) -> bool {
        self.tls_required
    }
}

/// How long a shutdown waits for connections to finish what is in flight.
const DRAIN_MAX: Duration = Duration::from_secs(30);

/// Serves NBD on `listener` until `shutdown` completes, then lets every
/// connection finish its in-flight requests (up to 30 s) and returns. Each
/// connection is independent: a misbehaving client loses only its own.
/// Connections run where `placement` puts them (an `Arc<dyn Target>`: on
/// this runtime).
pub async fn serve(
    listener: NbdListener,
    config: NbdConfig,
    placement: impl Into<Placement>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let config = Arc::new(config);
    let placement = placement.into();
    let (down_tx, down_rx) = watch::channel(false);
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (config, down) = (config.clone(), down_rx.clone());
                    spawn_connection(&mut sessions, placement.place(), stream, peer, config, down);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    let _ = down_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_MAX, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = sessions.len(),
            "NBD connections still busy after the drain limit; closing them"
        );
    }
    Ok(())
}

/// Runs a connection where it was placed, registering its socket with
/// that runtime first if it is not the one that accepted it.
fn spawn_connection(
    sessions: &mut JoinSet<()>,
    placed: Placed,
    stream: Accepted,
    peer: String,
    config: Arc<NbdConfig>,
    down: watch::Receiver<bool>,
) {
    let Some(runtime) = placed.runtime.clone() else {
        sessions.spawn(connection(stream.boxed(), peer, config, placed, down));
        return;
    };
    let socket = match stream.detach() {
        Ok(socket) => socket,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "NBD connection dropped: its socket could not leave the accepting runtime");
            return;
        }
    };
    let moved = async move {
        match socket.register() {
            Ok(stream) => connection(stream, peer, config, placed, down).await,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "NBD connection dropped: its socket could not join its runtime")
            }
        }
    };
    sessions.spawn_on(moved, &runtime);
}

async fn connection(
    stream: BoxStream,
    peer: String,
    config: Arc<NbdConfig>,
    placed: Placed,
    down: watch::Receiver<bool>,
) {
    if let Err(e) = run(stream, &config, placed.target.clone(), down).await {
        tracing::debug!(%peer, error = %e, "NBD connection ended");
    }
}

async fn run(
    stream: BoxStream,
    config: &NbdConfig,
    target: Arc<dyn Target>,
    down: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let shutting_down = || *down.borrow();
    let Some(negotiated) =
        negotiate::negotiate(stream, config, target.fast_zero(), &shutting_down).await?
    else {
        return Ok(());
    };
    transmit::transmit(negotiated, target, down).await
}
