//! Latency histograms per operation, kept by both engines so that metrics
//! (and the simulator) see the same figures a driver would measure. Fixed
//! power-of-two buckets: recording is a shift and an add, and snapshots
//! are plain arrays a driver can copy under its status lock.

use crate::wire::Op;
use std::time::Duration;

/// Upper bound of the first bucket, in nanoseconds (8 µs).
const FIRST_BOUND_NANOS: u64 = 8_000;
/// Buckets with an upper bound: 8 µs, 16 µs, ... about 8.4 s. Anything
/// slower is counted only in the total (Prometheus's `+Inf`).
pub const LATENCY_BUCKETS: usize = 21;

/// One operation's latencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Observations at or under each bound, not cumulative.
    buckets: [u64; LATENCY_BUCKETS],
    count: u64,
    sum_nanos: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: [0; LATENCY_BUCKETS],
            count: 0,
            sum_nanos: 0,
        }
    }
}

impl LatencyHistogram {
    /// Counts one observation.
    pub fn record(&mut self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.count += 1;
        self.sum_nanos = self.sum_nanos.saturating_add(nanos);
        // The bucket whose bound is the first at or above `nanos`.
        let over = nanos.saturating_sub(1) / FIRST_BOUND_NANOS;
        let index = (u64::BITS - over.leading_zeros()) as usize;
        if let Some(b) = self.buckets.get_mut(index) {
            *b += 1;
        }
    }

    /// The bucket bounds.
    pub fn bounds() -> [Duration; LATENCY_BUCKETS] {
        std::array::from_fn(|i| Duration::from_nanos(FIRST_BOUND_NANOS << i))
    }

    /// `(upper bound, observations at or under it)`, cumulative, as
    /// Prometheus histograms count.
    pub fn cumulative(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        Self::bounds()
            .into_iter()
            .zip(self.buckets.iter().scan(0u64, |total, n| {
                *total += n;
                Some(*total)
            }))
    }

    /// Observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their total time.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_nanos)
    }

    /// Adds `other`'s observations (another engine's, for one view of a
    /// server that runs several).
    pub fn add(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum_nanos = self.sum_nanos.saturating_add(other.sum_nanos);
    }
}

/// One histogram per operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpLatency([LatencyHistogram; 5]);

impl OpLatency {
    /// Every operation, in the order [`OpLatency::get`] indexes them.
    pub const OPS: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes];

    fn index(op: Op) -> usize {
        match op {
            Op::Read => 0,
            Op::Write => 1,
            Op::Flush => 2,
            Op::Trim => 3,
            Op::WriteZeroes => 4,
        }
    }

    /// Counts one `op` that took `took`.
    pub fn record(&mut self, op: Op, took: Duration) {
        self.0[Self::index(op)].record(took);
    }

    /// The histogram of `op`.
    pub fn get(&self, op: Op) -> &LatencyHistogram {
        &self.0[Self::index(op)]
    }

    /// Adds `other`'s observations, operation by operation.
    pub fn add(&mut self, other: &OpLatency) {
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            mine.add(theirs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_at_or_above_them() {
        let mut h = LatencyHistogram::default();
        let us = Duration::from_micros;
        for d in [
            us(0),
            us(8),
            us(9),
            us(16),
            us(17),
            us(1000),
            Duration::from_secs(60),
        ] {
            h.record(d);
        }
        let c: Vec<(Duration, u64)> = h.cumulative().collect();
        assert_eq!(c[0], (us(8), 2), "0 and 8 µs are at or under 8 µs");
        assert_eq!(c[1], (us(16), 4));
        assert_eq!(c[2], (us(32), 5));
        assert_eq!((c[6].1, c[7]), (5, (us(1024), 6)), "1 ms is under 1.024 ms");
        assert_eq!(c[LATENCY_BUCKETS - 1].1, 6, "a minute is only in +Inf");
        assert_eq!(h.count(), 7);
        assert_eq!(
            h.sum(),
            us(8 + 9 + 16 + 17 + 1000) + Duration::from_secs(60)
        );
    }

    #[test]
    fn adding_histograms_is_recording_both_sets() {
        let us = Duration::from_micros;
        let (mut a, mut b, mut both) = (
            OpLatency::default(),
            OpLatency::default(),
            OpLatency::default(),
        );
        for (d, op) in [(us(5), Op::Read), (us(300), Op::Write)] {
            a.record(op, d);
            both.record(op, d);
        }
        for (d, op) in [(us(40), Op::Read), (us(9000), Op::Flush)] {
            b.record(op, d);
            both.record(op, d);
        }
        a.add(&b);
        assert_eq!(a, both);
        assert_eq!(a.get(Op::Read).count(), 2);
    }

    #[test]
    fn each_op_has_its_own_histogram() {
        let mut l = OpLatency::default();
        l.record(Op::Flush, Duration::from_millis(3));
        assert_eq!(l.get(Op::Flush).count(), 1);
        assert_eq!(l.get(Op::Read).count(), 0);
    }
}
