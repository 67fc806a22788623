//! Memory a fabric would rather have payloads in. RDMA moves payloads
//! one-sided, straight out of memory it registered: a server's backend
//! that reads into such a buffer, or a client's frontend that receives a
//! WRITE's data into one, saves the copy into registered memory.
//! Everything works without one (payloads then live on the heap and the
//! fabric copies them).

use bytes::Bytes;

/// Hands out buffers in a fabric's registered memory.
pub trait Staging: Send + Sync + 'static {
    /// A buffer of exactly `len` bytes, or `None` when there is no room
    /// (the caller then uses the heap).
    fn buffer(&self, len: usize) -> Option<Box<dyn StagedBuffer>>;
}

/// One buffer from a [`Staging`]: filled, then handed on as a payload.
/// Dropped unused, it returns to its staging.
pub trait StagedBuffer: Send {
    /// The bytes to fill (initialised memory; its old contents mean
    /// nothing).
    fn bytes_mut(&mut self) -> &mut [u8];
    /// The filled buffer as a payload.
    fn into_bytes(self: Box<Self>) -> Bytes;
}
