//! braid's protocol core, free of IO: no sockets, threads, clock or global
//! randomness. Drivers feed in frames, connection events and the current
//! time, and drain actions (frames to send, backend IO, completions) and the
//! next deadline. The same engines run under TCP, RDMA and the simulator.
//!
//! The byte-exact wire format is specified in `docs/PROTOCOL.md`; the
//! `wire` module and its golden vectors hold the code to that text.
#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub, rust_2018_idioms)]
#![warn(clippy::all)]

pub mod auth;
pub mod client;
pub mod latency;
pub mod limits;
pub mod rng;
pub mod server;
pub mod staging;
pub mod time;
pub mod volume;
pub mod wire;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use time::Instant;
