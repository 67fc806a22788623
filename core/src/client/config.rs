//! Client engine configuration.

use crate::auth::Key;
use crate::limits::{self, Checks, ConfigError, MAX_CHANNELS, RESEND_MIN_FLOOR, TIMER_MAX};
use crate::wire::MAX_NAME_LEN;
use std::time::Duration;

/// How requests are spread over live channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Send to the channel with the fewest requests outstanding (default):
    /// a slow or stalled channel stops attracting work by itself. Requests
    /// of 64 KiB or less stay on the channel the last one took while it is
    /// fewer than [`ClientConfig::sticky_slack`] ahead of the least loaded,
    /// so a burst leaves in one send and the server reads and answers it
    /// in one go.
    #[default]
    LeastInflight,
    /// Rotate through live channels.
    RoundRobin,
    /// Send to the channel with the lowest smoothed round-trip time.
    LowestLatency,
}

/// Safety mechanisms that tests switch off to prove the invariant checker
/// notices their absence. Never set in production.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sabotage {
    /// Never resend an unanswered request.
    pub no_resend: bool,
    /// Send FLUSH without waiting for the writes it covers.
    pub no_flush_barrier: bool,
    /// Forget unflushed data instead of replaying it after a server restart.
    pub no_replay: bool,
    /// Send overlapping mutations together instead of one at a time.
    pub no_overlap_order: bool,
    /// After a server restart, let new IO run beside the resends of
    /// mutations it left unanswered.
    pub no_restart_gate: bool,
    /// Free only what a FLUSH covered by acknowledgement, not what the
    /// server executed before it.
    pub no_flush_frontier: bool,
    /// Never say Room after refusing an IO with Busy.
    pub no_room: bool,
}

/// Who a client is across its restarts. A server that sees a session opened
/// with a higher `epoch` of the same `owner` ends the owner's older
/// sessions on that export, so a dead run's frames still in the network
/// land nowhere (docs/PROTOCOL.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Stable across runs, unique per client (not 0).
    pub owner: u64,
    /// Higher for every new run (stored before the run connects).
    pub epoch: u64,
}

impl Identity {
    /// Bytes stored between runs.
    pub const ENCODED_LEN: usize = 16;

    /// The run after the one `stored` describes; the first run of a new
    /// `owner` if nothing was stored. If what was stored is unreadable, a
    /// new `owner` at epoch 2: an old run then goes unfenced (say so where
    /// it happens), but the epoch still says runs came before, so what
    /// they left unflushed is settled before this run serves it.
    pub fn next_run(stored: Option<&[u8]>, owner: u64) -> Identity {
        let owner = owner.max(1);
        match stored.map(Identity::decode) {
            Some(Some(last)) => Identity {
                owner: last.owner,
                epoch: last.epoch + 1,
            },
            Some(None) => Identity { owner, epoch: 2 },
            None => Identity { owner, epoch: 1 },
        }
    }

    /// Whether runs of the volume came before this one.
    pub fn restarted(&self) -> bool {
        self.epoch > 1
    }

    /// Owner then epoch, little-endian.
    pub fn encode(&self) -> [u8; Identity::ENCODED_LEN] {
        let mut b = [0u8; Identity::ENCODED_LEN];
        b[..8].copy_from_slice(&self.owner.to_le_bytes());
        b[8..].copy_from_slice(&self.epoch.to_le_bytes());
        b
    }

    /// What [`Identity::encode`] wrote, if `b` is that.
    pub fn decode(b: &[u8]) -> Option<Identity> {
        let b: &[u8; Identity::ENCODED_LEN] = b.try_into().ok()?;
        let owner = u64::from_le_bytes(b[..8].try_into().unwrap());
        let epoch = u64::from_le_bytes(b[8..].try_into().unwrap());
        (owner != 0 && epoch < u64::MAX).then_some(Identity { owner, epoch })
    }
}

/// Everything the client engine needs; defaults suit production.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Export to open.
    pub export: String,
    /// Which pre-shared key this is.
    pub key_id: String,
    /// The pre-shared key.
    pub key: Key,
    /// Channels per session.
    pub channels: usize,
    /// Channel selection.
    pub policy: Policy,
    /// Under [`Policy::LeastInflight`], how many more requests than the
    /// least loaded channel the channel of the last small request may hold
    /// and still take the next one. 0 spreads every request, as the client
    /// did before this rule; simulated worlds whose pinned seeds were found
    /// that way keep 0 so the seeds replay the runs that found them.
    pub sticky_slack: u32,
    /// Most frontend requests held at once (submitted, not completed).
    pub max_queued: usize,
    /// Most payload bytes held for frontend requests at once.
    pub max_journal_bytes: u64,
    /// Most requests on the wire at once (the server may lower it).
    pub max_inflight: u32,
    /// Acknowledged but unflushed data kept to replay after a server power
    /// loss. Reaching half of it triggers a FLUSH; reaching all of it holds
    /// new writes back.
    pub max_dirty_bytes: u64,
    /// Probe a channel after this much silence.
    pub keepalive_interval: Duration,
    /// Declare a channel dead after this much silence while something is
    /// outstanding on it.
    pub channel_timeout: Duration,
    /// A channel must finish its handshake within this.
    pub handshake_timeout: Duration,
    /// Lower bound on how long a request waits before it is resent.
    pub resend_min: Duration,
    /// Upper bound on the same.
    pub resend_max: Duration,
    /// First reconnect delay; doubles per failure up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Fail a request not completed within this. `None` (default) waits
    /// forever, as a disk does.
    pub io_timeout: Option<Duration>,
    /// Seed for nonces and jitter (OS randomness in production).
    pub rng_seed: [u8; 32],
    /// Who this run is, for fencing older runs; `None` (default): an
    /// anonymous client, never fenced.
    pub identity: Option<Identity>,
    #[doc(hidden)]
    pub sabotage: Sabotage,
}

impl ClientConfig {
    /// Production defaults for one export and key.
    pub fn new(
        export: impl Into<String>,
        key_id: impl Into<String>,
        key: Key,
        rng_seed: [u8; 32],
    ) -> Self {
        ClientConfig {
            export: export.into(),
            key_id: key_id.into(),
            key,
            channels: 4,
            policy: Policy::default(),
            sticky_slack: 16,
            max_queued: 1024,
            max_journal_bytes: 64 << 20,
            max_inflight: 256,
            max_dirty_bytes: 64 << 20,
            keepalive_interval: Duration::from_millis(200),
            channel_timeout: Duration::from_millis(800),
            handshake_timeout: Duration::from_secs(2),
            resend_min: Duration::from_millis(200),
            resend_max: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_secs(2),
            io_timeout: None,
            rng_seed,
            identity: None,
            sabotage: Sabotage::default(),
        }
    }
}

impl ClientConfig {
    /// Refuses a configuration the engine cannot run with; the error names
    /// the field. [`crate::client::ClientEngine::new`] calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut c = Checks::new("client");
        let ms = Duration::from_millis(1);
        c.require(
            !self.export.is_empty() && self.export.len() <= MAX_NAME_LEN,
            "export",
            || format!("must be 1 to {MAX_NAME_LEN} bytes"),
        );
        c.require(
            !self.key_id.is_empty() && self.key_id.len() <= MAX_NAME_LEN,
            "key_id",
            || format!("must be 1 to {MAX_NAME_LEN} bytes"),
        );
        c.require(
            (1..=MAX_CHANNELS).contains(&self.channels),
            "channels",
            || format!("{} is outside 1 to {MAX_CHANNELS}", self.channels),
        );
        c.require(self.max_queued >= 1, "max_queued", || {
            "must be at least 1".into()
        });
        c.require(self.max_journal_bytes >= 4096, "max_journal_bytes", || {
            format!("{} cannot hold one 4 KiB write", self.max_journal_bytes)
        });
        c.require(self.max_inflight >= 1, "max_inflight", || {
            "0 would never send a request".into()
        });
        c.require(self.max_dirty_bytes >= 4096, "max_dirty_bytes", || {
            format!("{} cannot hold one 4 KiB write", self.max_dirty_bytes)
        });
        c.duration(self.keepalive_interval, "keepalive_interval", ms, TIMER_MAX);
        c.duration(self.channel_timeout, "channel_timeout", ms, TIMER_MAX);
        c.require(
            self.channel_timeout > self.keepalive_interval,
            "channel_timeout",
            || {
                format!(
                    "{:?} must exceed keepalive_interval ({:?}), or a quiet channel dies before its probe is answered",
                    self.channel_timeout, self.keepalive_interval
                )
            },
        );
        c.duration(self.handshake_timeout, "handshake_timeout", ms, TIMER_MAX);
        c.duration(self.resend_min, "resend_min", RESEND_MIN_FLOOR, TIMER_MAX);
        c.duration(self.resend_max, "resend_max", self.resend_min, TIMER_MAX);
        c.duration(self.reconnect_min, "reconnect_min", ms, TIMER_MAX);
        c.duration(
            self.reconnect_max,
            "reconnect_max",
            self.reconnect_min,
            TIMER_MAX,
        );
        c.require(
            self.identity.is_none_or(|i| i.owner != 0),
            "identity",
            || "owner 0 means anonymous: leave identity unset".into(),
        );
        if let Some(t) = self.io_timeout {
            c.duration(t, "io_timeout", ms, limits::TIMER_MAX * 365);
        }
        c.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::Identity;

    #[test]
    fn each_run_has_a_higher_epoch_of_the_same_owner() {
        let first = Identity::next_run(None, 77);
        assert_eq!(
            first,
            Identity {
                owner: 77,
                epoch: 1
            }
        );
        let second = Identity::next_run(Some(&first.encode()), 5);
        assert_eq!(
            second,
            Identity {
                owner: 77,
                epoch: 2
            }
        );
        assert!(!first.restarted() && second.restarted());
        let after_torn = Identity::next_run(Some(b"torn"), 5);
        assert_eq!(
            after_torn,
            Identity { owner: 5, epoch: 2 },
            "a new owner, but not a first run"
        );
        assert!(after_torn.restarted());
        assert_eq!(Identity::next_run(None, 0).owner, 1, "owner 0 is anonymous");
    }
}
