//! The NBD face's share of a backend's io_uring: one task owns the queue;
//! connections hand it what would otherwise block a pool thread, and it
//! answers each when the kernel is done.

use crate::target::Completion;
use braid_core::server::{Backend, BackendOp, IoQueue};
use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

struct Job {
    export: usize,
    op: BackendOp,
    done: Completion,
}

/// Where connections send operations for the ring.
pub(crate) struct Ring {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Ring {
    /// Spawns the task that owns `backend`'s queue, if it offers one (on
    /// the current runtime). It ends once every handle is gone and its
    /// operations have finished.
    pub(crate) fn spawn(backend: Arc<dyn Backend>) -> Option<Ring> {
        let queue = backend.io_queue()?;
        let ready = match readiness(&*queue) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot poll the backend's io_uring: NBD uses threads");
                return None;
            }
        };
        let (jobs, incoming) = mpsc::unbounded_channel();
        tokio::spawn(run(queue, ready, incoming, backend));
        Some(Ring { jobs })
    }

    /// Hands `op` to the ring; gives it back if the ring has stopped.
    pub(crate) fn submit(
        &self,
        export: usize,
        op: BackendOp,
        done: Completion,
    ) -> Result<(), (BackendOp, Completion)> {
        self.jobs
            .send(Job { export, op, done })
            .map_err(|mpsc::error::SendError(job)| (job.op, job.done))
    }
}

/// A duplicate of the queue's descriptor, registered with tokio: it stays
/// open for as long as it is registered, whichever is dropped first.
fn readiness(queue: &dyn IoQueue) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the queue's descriptor is open while the queue is.
    let owned = unsafe { BorrowedFd::borrow_raw(queue.ready_fd()) }.try_clone_to_owned()?;
    // SAFETY: `owned` is ours; it stays open, and the same descriptor,
    // until the AsyncFd that holds it is dropped.
    unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
        .map_err(std::io::Error::from)
}

async fn run(
    mut queue: Box<dyn IoQueue>,
    ready: AsyncFd<OwnedFd>,
    mut incoming: mpsc::UnboundedReceiver<Job>,
    backend: Arc<dyn Backend>,
) {
    let mut waiting: HashMap<u64, Completion> = HashMap::new();
    let mut next_tag = 0u64;
    let mut open = true;
    let mut start = |queue: &mut Box<dyn IoQueue>, job: Job, waiting: &mut HashMap<_, _>| {
        next_tag += 1;
        match queue.start(job.export, job.op, next_tag) {
            Ok(()) => {
                waiting.insert(next_tag, job.done);
            }
            Err(op) => {
                let (backend, export, done) = (backend.clone(), job.export, job.done);
                tokio::task::spawn_blocking(move || done(backend.execute(export, &op)));
            }
        }
    };
    while open || !waiting.is_empty() {
        tokio::select! {
            biased;
            readable = ready.readable() => match readable {
                // Cleared before collecting: whatever finishes from now on
                // wakes this again.
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    tracing::error!(error = %e, "polling the backend's io_uring failed");
                    return;
                }
            },
            job = incoming.recv(), if open => match job {
                Some(job) => start(&mut queue, job, &mut waiting),
                None => open = false,
            },
        }
        while let Ok(job) = incoming.try_recv() {
            start(&mut queue, job, &mut waiting);
        }
        queue.collect(&mut |tag, result| {
            if let Some(done) = waiting.remove(&tag) {
                done(result);
            }
        });
        queue.submit();
    }
}
