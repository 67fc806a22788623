//! Every limit an engine relies on, named, and the validation of both
//! configurations against them. An engine refuses a configuration that
//! would make it spin (a zero resend delay), divide by zero (a zero block
//! size) or drop every request (a zero in-flight limit), with an error that
//! names the field.

use std::fmt;
use std::time::Duration;

/// Most channels one client session may have: a request remembers which
/// channel slots it tried in a 64-bit mask.
pub const MAX_CHANNELS: usize = 64;

/// Block sizes an export may have: powers of two from a sector to a page
/// of 64 KiB (every offset and length is a multiple).
pub const BLOCK_SIZE_MIN: u32 = 512;
/// See [`BLOCK_SIZE_MIN`].
pub const BLOCK_SIZE_MAX: u32 = 64 << 10;

/// Shortest resend delay a client accepts: below this, a lost frame's
/// resend loop would spin faster than any network answers.
pub const RESEND_MIN_FLOOR: Duration = Duration::from_millis(1);

/// A configuration field that cannot work, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `client` or `server`.
    pub side: &'static str,
    /// The field, as spelled in the config struct.
    pub field: &'static str,
    /// What is wrong and what would be right.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} config: {}: {}", self.side, self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// Collects checks of one side's fields; the first failure wins.
pub(crate) struct Checks {
    side: &'static str,
    first: Option<ConfigError>,
}

impl Checks {
    pub(crate) fn new(side: &'static str) -> Self {
        Checks { side, first: None }
    }

    /// Records `problem` for `field` unless `ok`.
    pub(crate) fn require(
        &mut self,
        ok: bool,
        field: &'static str,
        problem: impl FnOnce() -> String,
    ) {
        if !ok && self.first.is_none() {
            self.first = Some(ConfigError {
                side: self.side,
                field,
                problem: problem(),
            });
        }
    }

    /// A positive duration no longer than `max`.
    pub(crate) fn duration(
        &mut self,
        value: Duration,
        field: &'static str,
        min: Duration,
        max: Duration,
    ) {
        self.require(value >= min && value <= max, field, || {
            format!("{value:?} is outside {min:?} to {max:?}")
        });
    }

    pub(crate) fn finish(self) -> Result<(), ConfigError> {
        match self.first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Longest any engine timer may be: beyond a day, a timeout is a typo.
pub(crate) const TIMER_MAX: Duration = Duration::from_secs(24 * 3600);
