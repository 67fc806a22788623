//! What an operator may change while a volume is in use: the channel count
//! and spreading policy, keep-alive and dead-channel timers, and the aging
//! bounds of resends. Each change is validated as a whole configuration
//! (the same checks as at start-up) and applied without failing any IO.

use super::config::{ClientConfig, Policy};
use std::time::Duration;

/// Changes to apply; `None` keeps the value in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTuning {
    /// Channels per session: new ones connect at once; removed ones hand
    /// their requests in flight to the others, as failover does.
    pub channels: Option<usize>,
    /// How requests are spread over live channels.
    pub policy: Option<Policy>,
    /// Probe a channel after this much silence.
    pub keepalive_interval: Option<Duration>,
    /// Declare a channel dead after this much silence with work outstanding.
    pub channel_timeout: Option<Duration>,
    /// Lower bound on how long a request waits before it is resent (from
    /// the next send on).
    pub resend_min: Option<Duration>,
    /// Upper bound on the same.
    pub resend_max: Option<Duration>,
}

impl ClientTuning {
    /// The values `config` has, every field set (for status output).
    pub fn of(config: &ClientConfig) -> Self {
        ClientTuning {
            channels: Some(config.channels),
            policy: Some(config.policy),
            keepalive_interval: Some(config.keepalive_interval),
            channel_timeout: Some(config.channel_timeout),
            resend_min: Some(config.resend_min),
            resend_max: Some(config.resend_max),
        }
    }

    /// `config` with these changes (not yet validated).
    pub fn applied_to(&self, config: &ClientConfig) -> ClientConfig {
        let mut c = config.clone();
        if let Some(v) = self.channels {
            c.channels = v;
        }
        if let Some(v) = self.policy {
            c.policy = v;
        }
        if let Some(v) = self.keepalive_interval {
            c.keepalive_interval = v;
        }
        if let Some(v) = self.channel_timeout {
            c.channel_timeout = v;
        }
        if let Some(v) = self.resend_min {
            c.resend_min = v;
        }
        if let Some(v) = self.resend_max {
            c.resend_max = v;
        }
        c
    }
}
