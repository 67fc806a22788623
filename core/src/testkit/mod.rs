//! A seeded, single-threaded world for the engines: a client and a server
//! joined by lossy links, an in-memory disk with a volatile cache, crashes,
//! power loss, and a checker of the invariants in
//! `shared/guide/semantics.md`. Every run is a pure function of its seed.
//!
//! It drives the engines exactly as a production driver does (actions out,
//! events and time in), with the network and disk replaced by models.

mod checker;
mod disk;
mod fuzz;
mod handshake;
mod pattern;
mod sabotage;
mod sweep;
mod vocabulary;
mod world;

pub use checker::{Checker, Violation};
pub use disk::MemDisk;
pub use fuzz::exercise_server;
pub use handshake::{authenticate, authenticate_as};
pub use pattern::{sector_tag, stamp, SectorContent, SECTOR};
pub use sabotage::Sabotage;
pub use sweep::{SweepArgs, SweepCommand, SWEEP_USAGE};
pub use vocabulary::{Fault, Level, Scenario};
pub use world::{first_divergence, FaultRates, Report, Step, World, WorldConfig};
