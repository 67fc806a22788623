//! Seeded randomness. The engines take a seed in their configuration so a
//! simulated run replays exactly; production drivers seed from the OS.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// A small fast generator (SplitMix64) for jitter and other choices where
/// predictability does no harm.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose whole future is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value uniformly drawn from `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        // Multiply-shift keeps the bias below 2^-64 per unit of bound.
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// True with probability `p` (0.0..=1.0).
    pub fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 1.0 < p
    }
}

/// Nonces and identifiers that must be unpredictable to a network peer:
/// HMAC-SHA256 of a counter under a secret seed (a PRF), so knowing earlier
/// outputs tells an attacker nothing about the next one.
#[derive(Clone)]
pub struct SecretRng {
    seed: [u8; 32],
    counter: u64,
}

impl SecretRng {
    /// A generator keyed by `seed`; production drivers pass OS randomness.
    pub fn new(seed: [u8; 32]) -> Self {
        SecretRng { seed, counter: 0 }
    }

    /// Generator number `stream` under `seed`: streams never repeat each
    /// other's output (each starts 2^48 blocks past the one before), and
    /// stream 0 is [`SecretRng::new`]'s.
    pub fn stream(seed: [u8; 32], stream: u16) -> Self {
        SecretRng {
            seed,
            counter: u64::from(stream) << 48,
        }
    }

    /// Fills `out` with fresh unpredictable bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(32) {
            self.counter += 1;
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.seed)
                .expect("HMAC accepts keys of any length");
            mac.update(&self.counter.to_le_bytes());
            let block = mac.finalize().into_bytes();
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }

    /// A fresh unpredictable 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b)
    }
}

impl std::fmt::Debug for SecretRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretRng(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64::new(7);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn secret_rng_is_seeded_and_fresh() {
        let mut a = SecretRng::new([1; 32]);
        let mut b = SecretRng::new([1; 32]);
        let mut c = SecretRng::new([2; 32]);
        let (x, y, z) = (a.next_u64(), b.next_u64(), c.next_u64());
        assert_eq!(x, y);
        assert_ne!(x, z);
        assert_ne!(a.next_u64(), x);
    }
}
