//! A backend's [`IoQueue`] on the engine loop: operations start there and
//! their completions come back to it through the queue's descriptor, with
//! no pool thread in between. Under madsim there is none (the simulated
//! disk has no descriptor to poll), so the pool runs everything.

use braid_core::server::{Backend, BackendOp, IoQueue, OpToken};
use braid_core::wire::Status;
use bytes::Bytes;

/// The engine loop's queue, if its backend offers one.
pub(crate) struct Completions {
    queue: Box<dyn IoQueue>,
}

/// What wakes the loop when completions wait; kept apart from the queue
/// so the loop can wait on it while the queue stays free to use.
pub(crate) struct Readiness {
    /// A duplicate of the queue's descriptor, so it stays open for as long
    /// as it is registered, whichever is dropped first.
    #[cfg(not(madsim))]
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl Completions {
    /// The backend's queue and its readiness, or `None`: use the pool.
    pub(crate) fn open(backend: &dyn Backend) -> Option<(Completions, Readiness)> {
        #[cfg(madsim)]
        {
            let _ = backend;
            None
        }
        #[cfg(not(madsim))]
        {
            let queue = backend.io_queue()?;
            let registered = (|| {
                // SAFETY: the queue's descriptor is open while the queue is.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(queue.ready_fd()) };
                let owned = fd.try_clone_to_owned()?;
                // SAFETY: `owned` is ours; it stays open, and the same
                // descriptor, until the AsyncFd that holds it is dropped.
                unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        owned,
                        tokio::io::Interest::READABLE,
                    )
                }
                .map_err(std::io::Error::from)
            })();
            let fd = match registered {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot poll the backend's io_uring: using threads");
                    return None;
                }
            };
            Some((Completions { queue }, Readiness { fd }))
        }
    }

    /// Starts `op`, or gives it back for the pool.
    pub(crate) fn start(
        &mut self,
        export: usize,
        op: BackendOp,
        token: OpToken,
    ) -> Result<(), BackendOp> {
        self.queue.start(export, op, token)
    }

    /// Hands the operations started this turn to the kernel.
    pub(crate) fn submit(&mut self) {
        self.queue.submit();
    }

    /// Every operation that has finished.
    pub(crate) fn collect(&mut self, done: &mut dyn FnMut(OpToken, Result<Bytes, Status>)) {
        self.queue.collect(done);
    }
}

/// Waits until completions may be waiting (never, without a queue). Call
/// [`Completions::collect`] after: readiness is cleared here, so anything
/// that finishes from now on wakes it again.
pub(crate) async fn ready(readiness: Option<&Readiness>) {
    let Some(_r) = readiness else {
        return std::future::pending().await;
    };
    #[cfg(not(madsim))]
    match _r.fd.readable().await {
        Ok(mut guard) => guard.clear_ready(),
        Err(e) => {
            tracing::error!(error = %e, "polling the backend's io_uring failed");
            std::future::pending::<()>().await
        }
    }
}
