//! The NBD protocol in front of braid exports, so the NBD ecosystem (qemu,
//! the kernel's nbd-client, libnbd's tools, fio) reaches braid storage.
//!
//! This serves a server's exports directly over NBD (fixed newstyle
//! negotiation with EXPORT_NAME, INFO, GO, LIST and ABORT; simple replies;
//! READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE and DISC with FUA). The
//! spec (NetworkBlockDevice/nbd doc/proto.md), not any one peer, decides
//! behaviour; each choice below names its clause.

#![deny(missing_docs)]

mod proto;
mod session;

use braid_core::server::Backend;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

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
    /// Index of the export in the backend.
    pub backend_index: usize,
}

/// Serves `exports` over NBD on `listener` until `shutdown` completes. Each
/// connection is independent: a misbehaving client loses only its own.
pub async fn serve(
    listener: TcpListener,
    exports: Vec<NbdExport>,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let exports = Arc::new(exports);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (exports, backend) = (exports.clone(), backend.clone());
                    tokio::spawn(async move {
                        if let Err(e) = session::run(stream, exports, backend).await {
                            tracing::debug!(%peer, error = %e, "NBD connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => return Ok(()),
        }
    }
}
