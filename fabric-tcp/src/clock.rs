//! The engines' clock: nanoseconds since the driver started, read from
//! tokio's clock (which madsim simulates).

use std::time::Duration;

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

    /// When to wake for an engine deadline (far off for "never").
    pub(crate) fn deadline(&self, at: Option<braid_core::Instant>) -> tokio::time::Instant {
        match at {
            Some(t) if t != braid_core::Instant::FAR_FUTURE => {
                self.start + Duration::from_nanos(t.as_nanos())
            }
            _ => tokio::time::Instant::now() + Duration::from_secs(3600),
        }
    }
}
