//! braid over RDMA: each channel is one reliable-connected queue pair.
//! Frames travel as SEND messages of their head only; payloads move
//! one-sided, the server RDMA-READing a WRITE's data from the client's
//! registered buffer and RDMA-WRITing a READ's data into it, so an IO
//! costs two messages (docs/PROTOCOL.md §9.2), as in RNBD.
//!
//! [`link`] and [`arena`] hold the channel's logic and its registered
//! memory accounting, sans-IO and tested on any host. The verbs driver
//! (feature `verbs`, which needs cmake and clang to build and rdma-core at
//! run time) executes what they ask for.

#![deny(missing_docs)]

/// Registered memory for payloads: the least that holds one largest
/// payload and its head room.
pub const MIN_REGION: u64 = braid_core::wire::MAX_PAYLOAD_LEN as u64 + arena::ALIGN;
/// Default registered memory per device, for a client process or a server.
pub const DEFAULT_REGION: u64 = 64 << 20;

pub mod arena;
pub mod link;
pub mod queue;
#[cfg(feature = "verbs")]
pub mod verbs;
