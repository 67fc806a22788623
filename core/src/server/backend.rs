//! The interface drivers use to run backend operations. The engine never
//! calls it (it only emits [`super::BackendRequest`] actions); drivers call
//! it from a blocking thread pool, so one slow operation never holds up
//! another.

use super::BackendOp;
use crate::wire::Status;
use bytes::Bytes;
use std::fs::File;
use std::os::fd::RawFd;
use std::sync::Arc;
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

    /// Where the kernel can send `len` bytes of export `export` from
    /// `offset` to a socket with `sendfile`, with no copy through this
    /// process, if it can do so now without waiting for a device: the
    /// bytes are all in the page cache. A protocol without payload
    /// checksums (NBD on a plain socket) answers large reads this way.
    fn splice_source(&self, _export: usize, _offset: u64, _len: u32) -> Option<SpliceSource> {
        None
    }

    /// The payload checksum (CRC32C, as [`crate::wire::PayloadCrc`]) of
    /// `len` bytes of export `export` from `offset`, for a reply braid's
    /// protocol sends from [`Backend::splice_source`] (a backend may keep
    /// checksums of its blocks rather than read them again). `None`: it
    /// cannot now, and the reply goes the ordinary way, through memory.
    fn payload_crc(&self, _export: usize, _offset: u64, _len: u32) -> Option<u32> {
        None
    }

    /// Where `len` bytes of export `export` from `offset` lie mapped into
    /// this process's memory (the page cache's own pages), if they are all
    /// cached now: a driver whose protocol has no payload checksum can then
    /// hand them to the kernel to copy into a socket, one copy where a read
    /// into a buffer and a send make two. The send may still wait for the
    /// mapping's pages, so only a thread that may block sends from it.
    fn mapped_source(&self, _export: usize, _offset: u64, _len: u32) -> Option<MappedRange> {
        None
    }

    /// Where a WRITE of `len` bytes to export `export` at `offset` can be
    /// received straight into the page cache's own pages, mapped into this
    /// process, if writing them can neither wait for a device nor need new
    /// space: a driver whose protocol has no payload checksum then has the
    /// kernel copy the payload from the socket into the file, one copy
    /// where a receive into a buffer and a write make two. The range
    /// counts as changing until the sink is dropped. A WRITE cut off
    /// mid-payload leaves its range partly written, as a device does.
    fn mapped_sink(&self, _export: usize, _offset: u64, _len: u32) -> Option<MappedSink> {
        None
    }

    /// A queue on which a driver loop can start operations that would
    /// otherwise wait on a pool thread, and collect them when the kernel
    /// has finished them (io_uring): no thread waits on each operation.
    /// Each loop asks for its own; `None` means use the pool.
    fn io_queue(&self) -> Option<Box<dyn IoQueue>> {
        None
    }

    /// Whether this backend's queues would run `op` on `export` (rather
    /// than give it back for the pool): a driver whose queue lives on
    /// another task asks first, so what the queue refuses takes no hop.
    fn io_queue_takes(&self, _export: usize, _op: &BackendOp) -> bool {
        false
    }
}

/// Operations a driver loop starts and later collects, with no thread
/// blocked on any of them (see [`Backend::io_queue`]).
pub trait IoQueue: Send {
    /// A descriptor that polls readable while finished operations wait to
    /// be collected.
    fn ready_fd(&self) -> RawFd;

    /// Queues `op` on `export`, to be reported under `tag`. Gives `op`
    /// back when this queue does not run that kind of operation or is
    /// full: the caller runs it on the pool instead.
    fn start(&mut self, export: usize, op: BackendOp, tag: u64) -> Result<(), BackendOp>;

    /// Hands everything queued since the last call to the kernel: one
    /// system call for all the operations a loop turn started.
    fn submit(&mut self);

    /// Calls `done` with each operation that finished, once each.
    fn collect(&mut self, done: &mut dyn FnMut(u64, Result<Bytes, Status>));
}

/// A file and where an export's bytes start in it, for `sendfile`.
#[derive(Debug, Clone)]
pub struct SpliceSource {
    /// The export's backing file, open for reading.
    pub file: Arc<File>,
    /// The file offset of the first byte asked for.
    pub offset: u64,
}

/// Part of a file mapped into memory, kept mapped while any
/// [`MappedRange`] in it lives.
pub trait MappedWindow: Send + Sync {
    /// The address of the window's first byte.
    fn base(&self) -> *const u8;
    /// How many bytes from [`MappedWindow::base`] are mapped.
    fn mapped_len(&self) -> usize;
    /// Whether the kernel may write into the window (a shared writable
    /// mapping: what it writes lands in the file).
    fn writable(&self) -> bool {
        false
    }
}

/// Bytes of an export in a [`MappedWindow`], for the kernel to read: a
/// file shrunk behind the server's back turns a read of the lost pages
/// into SIGBUS in user space, but only into a failed copy (EFAULT) inside
/// a system call. So this hands out an address for an iovec, never a
/// slice.
#[derive(Clone)]
pub struct MappedRange {
    window: Arc<dyn MappedWindow>,
    start: usize,
    len: usize,
}

impl MappedRange {
    /// `len` bytes from `start` into `window`; `None` if they do not all
    /// lie in it.
    pub fn new(window: Arc<dyn MappedWindow>, start: usize, len: usize) -> Option<MappedRange> {
        (start.checked_add(len)? <= window.mapped_len()).then_some(MappedRange {
            window,
            start,
            len,
        })
    }

    /// The address of the first byte, for a system call only.
    pub fn addr(&self) -> *const u8 {
        self.window.base().wrapping_add(self.start)
    }

    /// How many bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Bytes of an export in a writable [`MappedWindow`], for the kernel to
/// receive a WRITE's payload into (see [`Backend::mapped_sink`]). Like
/// [`MappedRange`] it hands out an address, never a slice: a file shrunk
/// behind the server's back fails the receive with EFAULT where a write
/// from user space would raise SIGBUS. (The file backend takes that risk
/// in one place, for an export whose file it holds locked: its copy of a
/// checked protocol WRITE into tmpfs, `ExportFile::copied_into_mapping`.)
/// Dropping it tells the backend the range has finished changing.
pub struct MappedSink {
    range: MappedRange,
    finished: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl MappedSink {
    /// `range`, which must lie in a writable window; `finished` runs when
    /// the sink is dropped, once the payload is in or the receive failed.
    pub fn new(
        range: MappedRange,
        finished: Box<dyn FnOnce() + Send + Sync>,
    ) -> Option<MappedSink> {
        range.window.writable().then_some(MappedSink {
            range,
            finished: Some(finished),
        })
    }

    /// The address of the first byte, for a system call only.
    pub fn addr(&self) -> *mut u8 {
        self.range.addr().cast_mut()
    }

    /// How many bytes.
    pub fn len(&self) -> usize {
        self.range.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.range.len == 0
    }
}

impl Drop for MappedSink {
    fn drop(&mut self) {
        if let Some(finished) = self.finished.take() {
            finished();
        }
    }
}

impl std::fmt::Debug for MappedSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedSink({:p}, {} bytes)", self.addr(), self.len())
    }
}

impl std::fmt::Debug for MappedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedRange({:p}, {} bytes)", self.addr(), self.len)
    }
}

/// A run of bytes with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run.
    pub len: u64,
    /// Not allocated: reads return zeroes and writes may need new space.
    pub hole: bool,
}
