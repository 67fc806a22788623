//! Why a channel went down, as a type: drivers and operators match on it
//! (a key problem does not fix itself; a silent channel usually does).

use crate::wire::{DecodeError, Kind, RejectCode};
use std::fmt;
use std::time::Duration;

/// Why the client closed a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownReason {
    /// The transport closed, reset or could not connect (the driver's
    /// words: address, OS error, TLS alert).
    Transport(String),
    /// A frame from the server failed to decode.
    BadFrame(DecodeError),
    /// The handshake did not finish within `handshake_timeout`.
    HandshakeTimeout,
    /// Nothing arrived for this long with a probe or a request outstanding.
    Silent(Duration),
    /// A message the server may not send in the channel's state.
    Unexpected(Kind),
    /// The server could not prove it holds our key.
    ServerNotAuthenticated,
    /// The server refused the handshake.
    Rejected {
        /// Its code.
        code: RejectCode,
        /// Its message.
        message: String,
    },
    /// The server does not know our session (restart or expiry); a new
    /// session follows at once.
    SessionUnknown,
    /// The channel joined a session the client no longer uses.
    StaleSession,
    /// A second session was offered while one is in use.
    SecondSession,
    /// A read's answer had the wrong length.
    BadReadLength,
    /// Runtime tuning lowered the channel count; its requests moved to the
    /// channels that remain.
    Retired,
}

impl fmt::Display for DownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownReason::Transport(why) => f.write_str(why),
            DownReason::BadFrame(e) => write!(f, "bad frame: {e}"),
            DownReason::HandshakeTimeout => f.write_str("handshake timed out"),
            DownReason::Silent(d) => write!(f, "silent for {} ms", d.as_millis()),
            DownReason::Unexpected(kind) => write!(f, "unexpected {kind:?} from server"),
            DownReason::ServerNotAuthenticated => f.write_str(
                "authentication failed: the server does not hold our key for this key id",
            ),
            DownReason::Rejected { code, message } => {
                write!(f, "server refused the handshake: {code:?} ({message})")
            }
            DownReason::SessionUnknown => f.write_str("session unknown to server"),
            DownReason::StaleSession => f.write_str("joined a stale session"),
            DownReason::SecondSession => f.write_str("second session refused"),
            DownReason::BadReadLength => f.write_str("read reply of the wrong length"),
            DownReason::Retired => f.write_str("retired: the channel count was lowered"),
        }
    }
}
