//! Server engine configuration.

use crate::auth::Key;
use crate::limits::{Checks, ConfigError, BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, TIMER_MAX};
use crate::wire::{MAX_NAME_LEN, MAX_PAYLOAD_LEN};
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
    /// Test-only: run overlapping mutations in any order (no overlap gate).
    #[doc(hidden)]
    pub sabotage_no_overlap_gate: bool,
    /// Test-only: never end a client's older sessions when a newer run of
    /// it opens one (a dead run's frames may then land after the new run's).
    #[doc(hidden)]
    pub sabotage_no_fencing: bool,
    /// Test-only: one deliberately broken clause of the protocol, for the
    /// conformance checker's teeth.
    #[doc(hidden)]
    pub defect: Option<super::Defect>,
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
            sabotage_no_overlap_gate: false,
            sabotage_no_fencing: false,
            defect: None,
        }
    }
}

impl ServerConfig {
    /// Refuses a configuration the engine cannot run with; the error names
    /// the field. [`crate::server::ServerEngine::new`] calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut c = Checks::new("server");
        let ms = Duration::from_millis(1);
        c.require(!self.keys.is_empty(), "keys", || {
            "no key: nobody could connect".into()
        });
        for (id, _) in &self.keys {
            c.require(!id.is_empty() && id.len() <= MAX_NAME_LEN, "keys", || {
                format!("key id {id:?} must be 1 to {MAX_NAME_LEN} bytes")
            });
        }
        c.require(!self.exports.is_empty(), "exports", || {
            "no export to serve".into()
        });
        for (i, e) in self.exports.iter().enumerate() {
            c.require(
                !e.name.is_empty() && e.name.len() <= MAX_NAME_LEN,
                "exports.name",
                || {
                    format!(
                        "export {i} name {:?} must be 1 to {MAX_NAME_LEN} bytes",
                        e.name
                    )
                },
            );
            c.require(
                !self.exports[..i].iter().any(|o| o.name == e.name),
                "exports.name",
                || format!("export {:?} is configured twice", e.name),
            );
            c.require(
                e.block_size.is_power_of_two()
                    && (BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&e.block_size),
                "exports.block_size",
                || {
                    format!(
                        "export {:?}: {} is not a power of two from {BLOCK_SIZE_MIN} to {BLOCK_SIZE_MAX}",
                        e.name, e.block_size
                    )
                },
            );
            c.require(
                e.block_size == 0 || e.size % u64::from(e.block_size) == 0,
                "exports.size",
                || {
                    format!(
                        "export {:?}: {} bytes is not a whole number of {}-byte blocks",
                        e.name, e.size, e.block_size
                    )
                },
            );
            c.require(e.block_size <= self.max_payload, "max_payload", || {
                format!(
                    "{} is smaller than export {:?}'s block size {}: no request would fit",
                    self.max_payload, e.name, e.block_size
                )
            });
        }
        c.require(self.max_sessions >= 1, "max_sessions", || {
            "must be at least 1".into()
        });
        c.require(
            self.max_channels_per_session >= 1,
            "max_channels_per_session",
            || "must be at least 1".into(),
        );
        c.require(self.max_inflight >= 1, "max_inflight", || {
            "0 would refuse every request".into()
        });
        c.require(self.max_payload <= MAX_PAYLOAD_LEN, "max_payload", || {
            format!(
                "{} exceeds the wire format's {MAX_PAYLOAD_LEN}",
                self.max_payload
            )
        });
        c.require(self.id_window >= self.max_inflight, "id_window", || {
            format!(
                "{} is below max_inflight ({}): a client with that many requests out would be refused",
                self.id_window, self.max_inflight
            )
        });
        c.duration(self.handshake_timeout, "handshake_timeout", ms, TIMER_MAX);
        c.duration(self.idle_timeout, "idle_timeout", ms, TIMER_MAX);
        c.duration(
            self.session_linger,
            "session_linger",
            Duration::ZERO,
            TIMER_MAX,
        );
        c.finish()
    }
}
