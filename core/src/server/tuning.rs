//! What an operator may change on a running server: how many sessions and
//! channels it admits, what each new session may have outstanding, and its
//! idle and linger timers. Validated as a whole configuration, as at
//! start-up; nothing in flight is disturbed.

use super::config::ServerConfig;
use std::time::Duration;

/// Changes to apply; `None` keeps the value in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTuning {
    /// Most sessions at once (existing ones above it stay).
    pub max_sessions: Option<usize>,
    /// Most channels one session may have (existing channels stay).
    pub max_channels_per_session: Option<usize>,
    /// Most requests a session may have outstanding: announced to sessions
    /// created from now on; a session keeps what it was promised.
    pub max_inflight: Option<u32>,
    /// A bound connection silent this long is closed.
    pub idle_timeout: Option<Duration>,
    /// How long a session with no channel is kept for its client.
    pub session_linger: Option<Duration>,
}

impl ServerTuning {
    /// The values `config` has, every field set (for status output).
    pub fn of(config: &ServerConfig) -> Self {
        ServerTuning {
            max_sessions: Some(config.max_sessions),
            max_channels_per_session: Some(config.max_channels_per_session),
            max_inflight: Some(config.max_inflight),
            idle_timeout: Some(config.idle_timeout),
            session_linger: Some(config.session_linger),
        }
    }

    /// `config` with these changes (not yet validated).
    pub fn applied_to(&self, config: &ServerConfig) -> ServerConfig {
        let mut c = config.clone();
        if let Some(v) = self.max_sessions {
            c.max_sessions = v;
        }
        if let Some(v) = self.max_channels_per_session {
            c.max_channels_per_session = v;
        }
        if let Some(v) = self.max_inflight {
            c.max_inflight = v;
        }
        if let Some(v) = self.idle_timeout {
            c.idle_timeout = v;
        }
        if let Some(v) = self.session_linger {
            c.session_linger = v;
        }
        c
    }
}
