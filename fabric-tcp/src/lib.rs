//! braid over TCP: drivers that run the sans-IO engines on tokio.
//!
//! Each engine lives in one task that owns it; connection tasks feed it
//! frames and write what it emits, with vectored writes so payloads are
//! never copied into frames. Backend operations that may wait for a device
//! run on the backend's io_uring, started and collected by the server's
//! loop, or else on tokio's blocking pool: one slow IO never holds up
//! another. Nothing here decides
//! protocol behaviour: that is all in `braid-core`.

#![deny(missing_docs)]
// Under madsim, spawn_blocking runs the closure as a simulated task (the
// simulated disk never blocks); madsim marks it deprecated to warn users
// whose closures really would block.
#![cfg_attr(madsim, allow(deprecated))]

mod clock;
mod completions;
pub mod conn;
mod direct;
mod engine_loop;
mod engines;
pub mod fabric;
#[cfg(feature = "tls")]
mod movable;

#[cfg(feature = "tls")]
mod cert_dates;
pub mod client;
pub mod server;
#[cfg(feature = "tls")]
pub mod tls;
pub mod volume;

pub use client::{Client, ClientStatus, ConnectError, IoCallback};

/// In checked builds (tests, sweeps, the madsim world, soak: the `sim`
/// profile), the engine's own consistency check after every step of its
/// driver loop, so the real drivers are held to what the engine-level
/// simulator checks. Release builds skip it: it costs O(state) per event.
fn check_engine(engine: &str, check: impl FnOnce() -> Result<(), String>) {
    if cfg!(debug_assertions) {
        if let Err(e) = check() {
            panic!("{engine} engine inconsistent: {e}");
        }
    }
}
pub use server::{EngineSpawner, EngineTask, Server, ServerStatus};
pub use volume::{next_run, LegChange, LogStore, StoreMap, Volume, VolumeStatus};

/// How a server protects its channels.
#[derive(Clone, Default)]
pub enum ServerSecurity {
    /// Plain TCP (the pre-shared-key session auth still applies).
    #[default]
    Plain,
    /// TLS on every channel.
    #[cfg(feature = "tls")]
    Tls(tls::TlsAcceptor),
}

/// How a client protects its channels.
#[derive(Clone, Default)]
pub enum ClientSecurity {
    /// Plain TCP (the pre-shared-key session auth still applies).
    #[default]
    Plain,
    /// TLS, expecting this name on the server's certificate.
    #[cfg(feature = "tls")]
    Tls(tls::TlsConnector, rustls::pki_types::ServerName<'static>),
}
