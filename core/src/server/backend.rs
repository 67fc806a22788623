//! The interface drivers use to run backend operations. The engine never
//! calls it (it only emits [`super::BackendRequest`] actions); drivers call
//! it from a blocking thread pool, so one slow operation never holds up
//! another.

use super::BackendOp;
use crate::wire::Status;
use bytes::Bytes;

/// Storage behind the exports, indexed like [`super::ServerConfig::exports`].
pub trait Backend: Send + Sync + 'static {
    /// Performs `op` on export `export`, blocking until it is done (and, for
    /// FLUSH and FUA, durable). Returns read data (empty for other ops) or
    /// the status to report.
    fn execute(&self, export: usize, op: &BackendOp) -> Result<Bytes, Status>;

    /// Performs `op` only if it can finish without blocking (data in the
    /// page cache, no writeback throttling); `None` means "hand it to the
    /// thread pool". Drivers call it inline, so it must never block.
    fn try_execute_now(&self, _export: usize, _op: &BackendOp) -> Option<Result<Bytes, Status>> {
        None
    }
}
