//! The engines' clock: nanoseconds since the driver started, read from
//! tokio's clock (which madsim simulates).

use std::pin::Pin;
use std::time::Duration;

/// How far off "never" is: far enough that no run reaches it, near
/// enough that adding it to a clock's start cannot overflow.
const NEVER: Duration = Duration::from_secs(86400 * 365 * 30);

/// The timer wheel's resolution (tokio fires no timer sooner than its
/// millisecond anyway).
const TICK_NANOS: u64 = 1_000_000;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    start: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            start: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> braid_core::Instant {
        let nanos = self.start.elapsed().as_nanos();
        braid_core::Instant::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// When to wake for an engine deadline: rounded up to the timer
    /// wheel's millisecond, so a deadline that moves within one (as the
    /// oldest request's resend time does with every answer under load)
    /// leaves the timer where it is; "never" is one fixed instant.
    pub(crate) fn deadline(&self, at: Option<braid_core::Instant>) -> tokio::time::Instant {
        match at {
            Some(t) if t != braid_core::Instant::FAR_FUTURE => {
                let nanos = t.as_nanos().div_ceil(TICK_NANOS).saturating_mul(TICK_NANOS);
                self.start + Duration::from_nanos(nanos).min(NEVER)
            }
            _ => self.start + NEVER,
        }
    }
}

/// An engine loop's one timer. Re-armed only when its deadline moves:
/// a fresh sleep per turn of the loop cost each turn an insert into
/// tokio's timer wheel and a removal from it.
pub(crate) struct Alarm {
    sleep: Pin<Box<tokio::time::Sleep>>,
    at: tokio::time::Instant,
}

impl Alarm {
    pub(crate) fn new(clock: &Clock) -> Self {
        let at = clock.deadline(None);
        Alarm {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    /// Rings at `at` (from [`Clock::deadline`]) instead.
    pub(crate) fn set(&mut self, at: tokio::time::Instant) {
        if at != self.at {
            self.at = at;
            self.sleep.as_mut().reset(at);
        }
    }

    /// Done once the deadline has come; at once again if it is not moved.
    pub(crate) fn rung(&mut self) -> &mut Pin<Box<tokio::time::Sleep>> {
        &mut self.sleep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(nanos: u64) -> Option<braid_core::Instant> {
        Some(braid_core::Instant::from_nanos(nanos))
    }

    #[test]
    fn a_deadline_rounds_up_to_its_millisecond_and_never_earlier() {
        let clock = Clock::new();
        let ms = |n: u64| clock.start + Duration::from_millis(n);
        assert_eq!(clock.deadline(at(0)), ms(0));
        assert_eq!(clock.deadline(at(1)), ms(1));
        assert_eq!(clock.deadline(at(999_999)), ms(1));
        assert_eq!(clock.deadline(at(1_000_000)), ms(1));
        assert_eq!(clock.deadline(at(1_000_001)), ms(2));
        // Deadlines within one millisecond leave the timer alone.
        assert_eq!(clock.deadline(at(7_300_000)), clock.deadline(at(7_900_000)));
    }

    #[test]
    fn never_is_one_fixed_instant_past_any_deadline() {
        let clock = Clock::new();
        let never = clock.deadline(None);
        assert_eq!(clock.deadline(Some(braid_core::Instant::FAR_FUTURE)), never);
        assert_eq!(clock.deadline(at(u64::MAX - 1)), never);
        assert!(clock.deadline(at(86400 * 1_000_000_000)) < never);
    }
}
