//! Where NBD requests go: a server's own backend, or (for `braid attach`)
//! a braid volume reached over the network.

use braid_core::server::{Backend, BackendOp, Extent, MappedSink, SpliceSource};
use braid_core::staging::Staging;
use braid_core::wire::Status;
use bytes::Bytes;
use std::sync::Arc;

/// Called once with an operation's result, from any thread.
pub type Completion = Box<dyn FnOnce(Result<Bytes, Status>) + Send>;
/// Called once with an allocation map, from any thread.
pub type ExtentsCompletion = Box<dyn FnOnce(Result<Vec<Extent>, Status>) + Send>;

/// Storage behind NBD exports. Calls must not block: the transmission loop
/// of a connection calls them inline and hands results back through the
/// completion, so one slow IO never holds up the next request.
pub trait Target: Send + Sync + 'static {
    /// Runs `op` on export `export`.
    fn submit(&self, export: usize, op: BackendOp, done: Completion);

    /// The allocation map of `[offset, offset + len)` (see
    /// [`Backend::allocation`]).
    fn allocation(&self, export: usize, offset: u64, len: u64, done: ExtentsCompletion);

    /// Whether WRITE_ZEROES can honour FAST_ZERO (fail at once with
    /// `Unsupported` rather than write zeroes slowly).
    fn fast_zero(&self) -> bool;

    /// Where WRITE data should be received, if the target would rather
    /// have it somewhere other than the heap (RDMA's registered memory:
    /// the server then fetches it with no copy).
    fn write_staging(&self) -> Option<Arc<dyn Staging>> {
        None
    }

    /// Where a READ of `[offset, offset + len)` can be sent from with
    /// `sendfile`, if the target keeps it in a file whose pages are cached
    /// now (see [`Backend::splice_source`]). Must not block.
    fn splice_read(&self, _export: usize, _offset: u64, _len: u32) -> Option<SpliceSource> {
        None
    }

    /// Runs `op` here and now if it can finish without blocking, whatever
    /// its size (see [`Backend::try_execute_now`]); `None` if it cannot, or
    /// if the target has no such shortcut.
    fn try_now(&self, _export: usize, _op: &BackendOp) -> Option<Result<Bytes, Status>> {
        None
    }

    /// Where a WRITE of `[offset, offset + len)` can be received straight
    /// into the file (see [`Backend::mapped_sink`]). Must not block.
    fn mapped_write(&self, _export: usize, _offset: u64, _len: u32) -> Option<MappedSink> {
        None
    }

    /// The backend behind this target when it runs on this machine and
    /// may be called from any thread (see [`Backend::execute`]), so a
    /// connection can run a large READ whole, reading and sending it, on a
    /// thread that may block. `None` where IO completes elsewhere.
    fn local_backend(&self) -> Option<Arc<dyn Backend>> {
        None
    }

    /// Called each time a connection must wait for its client in the
    /// middle of a transfer: a reply that finds the socket full (a large
    /// READ leaves in several sends, each once the client has read the
    /// last), or a WRITE whose data is still arriving. A process that
    /// polls for IO can keep polling through such waits, where sleeping
    /// would cost a wake-up for every part of the transfer.
    fn client_wait(&self) {}
}

/// WRITEs over this size are large: the connection reads the next header
/// on its own after one (see the transmit loop), and the server keeps
/// them off the connection's thread unless the socket buffers enough for
/// the client to go on sending meanwhile (see [`BackendTarget::submit`]).
const LARGE_WRITE: usize = 64 * 1024;

/// Whether a WRITE of `len` bytes is large (see [`LARGE_WRITE`]).
pub(crate) fn is_large_write(len: usize) -> bool {
    len > LARGE_WRITE
}

/// A local [`Backend`]: what `braid serve --nbd` uses. Operations the
/// backend can finish without blocking run inline; the rest go to its
/// io_uring if it has one and [`BackendTarget::with_io_queue`] asked for
/// it, else to tokio's blocking pool, as in the braid server driver.
pub struct BackendTarget {
    backend: Arc<dyn Backend>,
    client_wait: fn(),
    ring: Option<crate::ring::Ring>,
}

impl BackendTarget {
    /// Serves `backend`'s exports.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        BackendTarget {
            backend,
            client_wait: || {},
            ring: None,
        }
    }

    /// Runs what may wait for a device on the backend's io_uring (see
    /// [`Backend::io_queue`]), owned by a task spawned on the current
    /// runtime; without one, on the pool.
    pub fn with_io_queue(self) -> Self {
        BackendTarget {
            ring: crate::ring::Ring::spawn(self.backend.clone()),
            ..self
        }
    }

    /// Calls `hook` whenever a connection waits for its client in the
    /// middle of a transfer (see [`Target::client_wait`]).
    pub fn on_client_wait(self, hook: fn()) -> Self {
        BackendTarget {
            client_wait: hook,
            ..self
        }
    }
}

impl Target for BackendTarget {
    fn submit(&self, export: usize, op: BackendOp, done: Completion) {
        // A large WRITE goes to the pool even when the kernel would take
        // it at once, so the connection goes on receiving the next one
        // meanwhile: inline, 1 MiB writes at QD8 fell from 3055-3152 to
        // 1288-1640 MiB/s over a unix socket, whose small buffer leaves
        // the client waiting. Connections that buffer more (TCP) ask
        // `try_now` first.
        let large_write =
            matches!(&op, BackendOp::Write { data, .. } if is_large_write(data.len()));
        if !large_write {
            if let Some(result) = self.backend.try_execute_now(export, &op) {
                return done(result);
            }
        }
        let (op, done) = match &self.ring {
            Some(ring) if self.backend.io_queue_takes(export, &op) => {
                match ring.submit(export, op, done) {
                    Ok(()) => return,
                    Err(back) => back,
                }
            }
            _ => (op, done),
        };
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || done(backend.execute(export, &op)));
    }

    fn allocation(&self, export: usize, offset: u64, len: u64, done: ExtentsCompletion) {
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || done(backend.allocation(export, offset, len)));
    }

    fn fast_zero(&self) -> bool {
        true
    }

    fn try_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        self.backend.try_execute_now(export, op)
    }

    fn splice_read(&self, export: usize, offset: u64, len: u32) -> Option<SpliceSource> {
        self.backend.splice_source(export, offset, len)
    }

    fn mapped_write(&self, export: usize, offset: u64, len: u32) -> Option<MappedSink> {
        self.backend.mapped_sink(export, offset, len)
    }

    fn local_backend(&self) -> Option<Arc<dyn Backend>> {
        Some(self.backend.clone())
    }

    fn client_wait(&self) {
        (self.client_wait)()
    }
}
