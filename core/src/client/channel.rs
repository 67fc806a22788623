//! One channel's state as the client sees it.

use crate::auth::{Key, NONCE_LEN};
use crate::Instant;
use std::fmt;
use std::time::Duration;

/// Names a channel and which connection of it: `slot` is stable, `gen`
/// changes on every reconnect, so events from an old connection are ignored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId {
    /// Which of the session's channels.
    pub slot: u16,
    /// Which connection attempt of that channel.
    pub gen: u32,
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ch{}.{}", self.slot, self.gen)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone)]
pub(crate) enum ChanState {
    /// Not connected; may connect at `retry_at` (if it may lead or a
    /// session exists).
    Idle { retry_at: Instant },
    /// Waiting for the driver to report the transport connected.
    Connecting { since: Instant },
    /// Hello sent, naming `key`'s id: the proofs use that key even if
    /// the engine is given another before the challenge comes.
    AwaitChallenge {
        since: Instant,
        nonce: [u8; NONCE_LEN],
        session_id: u64,
        key: Box<(String, Key)>,
    },
    /// Auth sent.
    AwaitWelcome { since: Instant, session_id: u64 },
    /// Carrying requests.
    Ready,
}

/// The shortest silence that makes a busy channel not answering: below it,
/// timer and scheduling noise, not a stall.
const QUIET_LIMIT_MIN: Duration = Duration::from_millis(1);

/// Smoothed RTT as in RFC 6298.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl RttEstimator {
    pub(crate) fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    pub(crate) fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// How long to wait for an answer before resending.
    pub(crate) fn rto(&self, min: Duration, max: Duration) -> Duration {
        match self.srtt {
            None => min,
            Some(srtt) => (srtt + self.rttvar * 4).clamp(min, max),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Channel {
    pub(crate) gen: u32,
    pub(crate) state: ChanState,
    pub(crate) inflight: u32,
    /// When `inflight` last rose from zero.
    pub(crate) busy_since: Instant,
    pub(crate) last_rx: Instant,
    pub(crate) ping: Option<(u64, Instant)>,
    pub(crate) rtt: RttEstimator,
    pub(crate) failures: u32,
    /// A request aged out here with nothing heard since it was sent: avoid
    /// the channel until it speaks again (otherwise least-in-flight, seeing
    /// its count drop as requests move away, would send it more).
    pub(crate) suspect: bool,
}

impl Channel {
    pub(crate) fn new() -> Self {
        Channel {
            gen: 0,
            state: ChanState::Idle {
                retry_at: Instant::ZERO,
            },
            inflight: 0,
            busy_since: Instant::ZERO,
            last_rx: Instant::ZERO,
            ping: None,
            rtt: RttEstimator::default(),
            failures: 0,
            suspect: false,
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        matches!(self.state, ChanState::Ready)
    }

    /// Counts one more request in flight here.
    pub(crate) fn carry(&mut self, now: Instant) {
        if self.inflight == 0 {
            self.busy_since = now;
        }
        self.inflight += 1;
    }

    /// False once the channel has had something to answer and said
    /// nothing for twice its smoothed round trip (at least
    /// `QUIET_LIMIT_MIN`).
    pub(crate) fn is_answering(&self, now: Instant) -> bool {
        if self.inflight == 0 {
            return true;
        }
        let limit = self.rtt.srtt().map_or(Duration::ZERO, |rtt| rtt * 2);
        now - self.last_rx.max(self.busy_since) <= limit.max(QUIET_LIMIT_MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rto_tracks_rtt_within_bounds() {
        let mut r = RttEstimator::default();
        let (min, max) = (Duration::from_millis(10), Duration::from_secs(1));
        assert_eq!(r.rto(min, max), min);
        for _ in 0..20 {
            r.sample(Duration::from_millis(50));
        }
        let rto = r.rto(min, max);
        assert!(
            rto >= Duration::from_millis(50) && rto < Duration::from_millis(80),
            "{rto:?}"
        );
        r.sample(Duration::from_secs(30));
        assert_eq!(r.rto(min, max), max);
    }

    #[test]
    fn a_channel_is_named_by_slot_and_generation() {
        let ch = ChannelId { slot: 3, gen: 7 };
        assert_eq!(
            (format!("{ch}"), format!("{ch:?}")),
            ("ch3.7".into(), "ch3.7".into())
        );
    }

    #[test]
    fn the_resend_timeout_follows_rfc_6298() {
        let ms = Duration::from_millis;
        let mut rtt = RttEstimator::default();
        assert_eq!(
            rtt.rto(ms(200), ms(5000)),
            ms(200),
            "no sample yet: the floor"
        );
        // First sample R: SRTT = R, RTTVAR = R/2, RTO = SRTT + 4 RTTVAR.
        rtt.sample(ms(100));
        assert_eq!(rtt.srtt(), Some(ms(100)));
        assert_eq!(rtt.rto(ms(10), ms(5000)), ms(300));
        // Then RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|, SRTT = 7/8 SRTT + 1/8 R.
        rtt.sample(ms(180));
        assert_eq!(rtt.srtt(), Some(ms(110)));
        assert_eq!(rtt.rto(ms(10), ms(5000)), ms(110 + 4 * (150 + 80) / 4));
        assert_eq!(rtt.rto(ms(10), ms(200)), ms(200), "capped");
    }
}
