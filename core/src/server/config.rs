//! Server engine configuration.

use crate::auth::Key;
use std::time::Duration;

/// One exported device.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Name clients ask for.
    pub name: String,
    /// Size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Offsets and lengths must be multiples of this (512 or 4096).
    pub block_size: u32,
    /// Refuse every mutating request.
    pub read_only: bool,
    /// Support TRIM.
    pub trim: bool,
    /// Support WRITE_ZEROES.
    pub write_zeroes: bool,
}

impl ExportConfig {
    /// A writable export with every op supported.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        ExportConfig {
            name: name.into(),
            size,
            block_size: 512,
            read_only: false,
            trim: true,
            write_zeroes: true,
        }
    }
}

/// Everything the server engine needs to know; defaults suit production.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Fresh for every server process start (clients detect restarts by it).
    pub boot_id: u64,
    /// Seed for nonces and session ids (OS randomness in production).
    pub rng_seed: [u8; 32],
    /// Pre-shared keys by key id.
    pub keys: Vec<(String, Key)>,
    /// The exports.
    pub exports: Vec<ExportConfig>,
    /// Most sessions at once.
    pub max_sessions: usize,
    /// Most channels one session may have.
    pub max_channels_per_session: usize,
    /// Most requests one session may have outstanding.
    pub max_inflight: u32,
    /// Largest payload of one request.
    pub max_payload: u32,
    /// How far past its floor a client's ids may run (bounds the result
    /// cache of a session).
    pub id_window: u32,
    /// A connection must finish its handshake within this.
    pub handshake_timeout: Duration,
    /// A bound connection silent this long is closed (clients ping well
    /// inside it).
    pub idle_timeout: Duration,
    /// A session with no channel is kept this long for its client to come
    /// back; then its state is freed.
    pub session_linger: Duration,
    /// Test-only: execute every copy of a request (no duplicate
    /// suppression), to prove the invariant checker notices.
    #[doc(hidden)]
    pub sabotage_no_dedup: bool,
}

impl ServerConfig {
    /// Production defaults around the given identity, keys and exports.
    pub fn new(
        boot_id: u64,
        rng_seed: [u8; 32],
        keys: Vec<(String, Key)>,
        exports: Vec<ExportConfig>,
    ) -> Self {
        ServerConfig {
            boot_id,
            rng_seed,
            keys,
            exports,
            max_sessions: 1024,
            max_channels_per_session: 64,
            max_inflight: 256,
            max_payload: 1 << 20,
            id_window: 1 << 16,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            session_linger: Duration::from_secs(300),
            sabotage_no_dedup: false,
        }
    }
}
