//! The interface drivers use to run backend operations. The engine never
//! calls it (it only emits [`super::BackendRequest`] actions); drivers call
//! it from a blocking thread pool, so one slow operation never holds up
//! another.

use super::BackendOp;
use crate::wire::Status;
use bytes::Bytes;
use std::time::Duration;

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

    /// How long the medium holds `op` before it runs, for backends that
    /// model a device rather than drive one (the simulator's disk: its
    /// driver waits on the simulated clock). Real backends spend their
    /// time inside `execute` and return `None`.
    fn latency(&self, _export: usize, _op: &BackendOp) -> Option<Duration> {
        None
    }

    /// For backends that model a device: how long after `op` took effect
    /// its completion is reported (used only with [`Backend::latency`]).
    /// A device's queue reports completions out of order, so two
    /// overlapping writes in flight together may land in one order and
    /// complete in the other; the simulator must be able to show that.
    fn completion_delay(&self, _export: usize, _op: &BackendOp) -> Duration {
        Duration::ZERO
    }

    /// Which parts of `[offset, offset + len)` are holes, as consecutive
    /// extents from `offset` that cover at least one byte and at most `len`.
    /// A backend that cannot tell reports everything allocated, which is
    /// always true enough: a hole is only a promise that reads return zeroes.
    fn allocation(&self, _export: usize, _offset: u64, len: u64) -> Result<Vec<Extent>, Status> {
        Ok(vec![Extent { len, hole: false }])
    }
}

/// Memory a fabric would rather have read data land in: RDMA moves a
/// READ's data to the client straight out of memory it registered, so a
/// backend that reads into such a buffer saves the copy into it. Drivers
/// and backends work without one (then reads land on the heap).
pub trait ReadStaging: Send + Sync + 'static {
    /// A buffer of exactly `len` bytes, or `None` when there is no room
    /// (the backend then reads onto the heap).
    fn buffer(&self, len: usize) -> Option<Box<dyn StagedBuffer>>;
}

/// One buffer from a [`ReadStaging`]: filled by the backend, then handed
/// on as the read's data. Dropped unused, it returns to its staging.
pub trait StagedBuffer: Send {
    /// The bytes to fill (initialised memory; its old contents mean
    /// nothing).
    fn bytes_mut(&mut self) -> &mut [u8];
    /// The filled buffer as a read's data.
    fn into_bytes(self: Box<Self>) -> Bytes;
}

/// A run of bytes with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run.
    pub len: u64,
    /// Not allocated: reads return zeroes and writes may need new space.
    pub hole: bool,
}
