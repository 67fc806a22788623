//! Latency histogram: log-linear buckets (16 per power of two), enough for
//! percentiles within ~6% and cheap to merge across workers.

use std::time::Duration;

const SUB: usize = 16;
const BUCKETS: usize = 64 * SUB;

#[derive(Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max_ns: u64,
    sum_ns: u128,
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max_ns: 0,
            sum_ns: 0,
        }
    }

    fn bucket(ns: u64) -> usize {
        if ns < SUB as u64 {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros() as usize;
        let frac = ((ns >> (exp - 4)) & (SUB as u64 - 1)) as usize;
        (exp - 3) * SUB + frac
    }

    fn lower_bound(b: usize) -> u64 {
        if b < SUB {
            return b as u64;
        }
        let exp = b / SUB + 3;
        let frac = (b % SUB) as u64;
        (1u64 << exp) + (frac << (exp - 4))
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.counts[Self::bucket(ns).min(BUCKETS - 1)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
        self.sum_ns += u128::from(ns);
    }

    pub(crate) fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max_ns = self.max_ns.max(o.max_ns);
        self.sum_ns += o.sum_ns;
    }

    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    pub(crate) fn percentile(&self, p: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_nanos(Self::lower_bound(b).min(self.max_ns));
            }
        }
        Duration::from_nanos(self.max_ns)
    }

    pub(crate) fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    pub(crate) fn mean(&self) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((self.sum_ns / u128::from(self.total)) as u64)
    }

    /// Rows of (lower bound, count) for non-empty power-of-two ranges.
    pub(crate) fn octaves(&self) -> Vec<(Duration, u64)> {
        let mut rows: Vec<(Duration, u64)> = Vec::new();
        for (b, c) in self.counts.iter().enumerate() {
            if *c == 0 {
                continue;
            }
            let low = Self::lower_bound(b);
            let octave = if low == 0 {
                0
            } else {
                1u64 << (63 - low.leading_zeros())
            };
            match rows.last_mut() {
                Some((d, n)) if d.as_nanos() as u64 == octave => *n += c,
                _ => rows.push((Duration::from_nanos(octave), *c)),
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_close_to_exact() {
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.percentile(50.0).as_micros() as f64;
        let p99 = h.percentile(99.0).as_micros() as f64;
        assert!((p50 - 500.0).abs() / 500.0 < 0.07, "{p50}");
        assert!((p99 - 990.0).abs() / 990.0 < 0.07, "{p99}");
        assert_eq!(h.max(), Duration::from_micros(1000));
        assert_eq!(h.count(), 1000);
        let total: u64 = h.octaves().iter().map(|r| r.1).sum();
        assert_eq!(total, 1000);
    }
}
