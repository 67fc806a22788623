//! braid's production drivers in a deterministic simulated world.
//!
//! The client and server drivers of `fabric-tcp` (the code `braid serve`
//! and `braid attach` run) execute unchanged on madsim: under
//! `--cfg madsim`, `madsim-tokio` swaps tokio's network, time and task
//! layers for simulated ones, so sockets, timers and scheduling are all
//! driven by one seed. Around them: a server node whose disk has a
//! volatile cache over durable media ([`braid_core::testkit::MemDisk`]), a
//! client node running a checked workload, and a fault plan drawn from the
//! seed (partitions, one-way loss, server crash and restart, power loss,
//! stalls, media errors).
//!
//! Build and run (its own target dir: every crate compiles differently):
//!
//! ```sh
//! cargo xtask sim --madsim --seeds 100
//! # which runs:
//! RUSTFLAGS="--cfg madsim" CARGO_TARGET_DIR=target/madsim \
//!     cargo run --release -p braid-fabric-sim --bin madsim-sweep -- --seeds 100
//! ```
//!
//! A normal build compiles this crate empty.

#![cfg_attr(madsim, deny(missing_docs))]

#[cfg(madsim)]
mod disk;
#[cfg(madsim)]
mod judge;
#[cfg(madsim)]
mod keys;
#[cfg(madsim)]
mod layout;
#[cfg(madsim)]
mod logs;
#[cfg(madsim)]
mod mirror;
#[cfg(madsim)]
mod workload;
#[cfg(madsim)]
mod world;

#[cfg(madsim)]
pub use braid_core::testkit::{Fault, Sabotage, Scenario};
#[cfg(madsim)]
pub use world::{first_divergence, run, run_sabotaged, run_with_engines, Report};
