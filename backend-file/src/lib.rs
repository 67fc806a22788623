//! braid's storage backend: each export is a regular file or a raw block
//! device.
//!
//! Durability follows the protocol exactly: a WRITE returns once the kernel
//! has the data; FUA uses `pwritev2(RWF_DSYNC)` so only that write is made
//! durable (falling back to write + `fdatasync`); FLUSH is `fdatasync`.
//! TRIM punches a hole (reads return zeroes, as braid defines TRIM) and
//! WRITE_ZEROES uses `FALLOCATE_FL_ZERO_RANGE`; both fall back to writing
//! zeroes where the filesystem or device cannot. Errors map to protocol
//! statuses: ENOSPC fails only that request with NO_SPACE.
//!
//! Operations that may wait for a device run either on the caller's thread
//! ([`FileBackend`] as a [`braid_core::server::Backend`], from a pool) or
//! on io_uring ([`IoEngine::Uring`]: a driver loop starts them on its own
//! queue and collects them when the kernel is done).

#![deny(missing_docs)]

mod block_crcs;
mod cache;
mod file;
pub mod lock;
mod mapping;
mod queue;
mod streaming_copy;

pub use file::{ExportFile, FileBackend, IoEngine, OpenOptions};
