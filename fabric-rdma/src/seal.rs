//! Registered memory lent on as a frame or payload must hold the same
//! bytes until its last user gives it back: the queue pair may still
//! fetch from it, and the engine still reads it. A write over lent memory
//! (another buffer lent over it, a late one-sided move) passes every
//! other check when it lands before a checksum is made, so builds with
//! debug assertions seal the bytes when they are handed on and check the
//! seal when they come back, which stops the program where it happened.
//!
//! The seal is SipHash, not a CRC: data that carries its own CRC32C at
//! its end (braid verify's blocks once did) has the same CRC32C whatever
//! it holds, and every CRC of that polynomial, whatever its seed, is as
//! blind to it. The protocol's payload checksum was; the seal must not be.

use std::hash::Hasher;

/// A hash of lent bytes when they were handed on.
#[derive(Debug, Clone, Copy)]
pub struct Seal {
    hash: u64,
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

impl Seal {
    /// A seal over `bytes`, in builds with debug assertions (hashing
    /// every lent buffer twice is too dear for release builds).
    pub fn over(bytes: &[u8]) -> Option<Seal> {
        cfg!(debug_assertions).then(|| Seal { hash: hash(bytes) })
    }

    /// Whether `bytes` are still those sealed.
    pub fn holds(&self, bytes: &[u8]) -> bool {
        hash(bytes) == self.hash
    }

    /// Panics (unless the thread already is) when `bytes` changed since
    /// the seal; `what` names the memory.
    pub fn check(&self, bytes: &[u8], what: impl FnOnce() -> String) {
        if self.holds(bytes) {
            return;
        }
        let what = what();
        tracing::error!(memory = %what, "registered memory changed while lent");
        if !std::thread::panicking() {
            panic!("registered memory {what} changed while lent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(debug_assertions)]
    fn bytes_left_alone_keep_their_seal() {
        let bytes = vec![7u8; 4096];
        let seal = Seal::over(&bytes).unwrap();
        seal.check(&bytes, || unreachable!("nothing changed"));
    }

    /// Memory lent over a staged WRITE payload while the server could
    /// still fetch it (the bug the VM's misdirected block was first
    /// suspected to be): the seal taken when the payload was handed on
    /// stops the program when it comes back changed.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "registered memory staged payload at 65536+4096 changed while lent")]
    fn a_payload_written_while_lent_is_caught_when_given_back() {
        let mut bytes = vec![1u8; 4096];
        let seal = Seal::over(&bytes).unwrap();
        bytes[100] = 2;
        seal.check(&bytes, || "staged payload at 65536+4096".into());
    }

    /// Two blocks that each end in the CRC32C of the rest share one
    /// CRC32C (the residue); the seal must still tell them apart.
    #[test]
    #[cfg(debug_assertions)]
    fn blocks_ending_in_their_own_crc32c_have_different_seals() {
        let block = |fill: u8| {
            let mut b = vec![fill; 4096];
            let crc = crc32c::crc32c(&b[..4092]);
            b[4092..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let (a, b) = (block(1), block(2));
        assert_eq!(crc32c::crc32c(&a), crc32c::crc32c(&b), "the residue");
        assert!(!Seal::over(&a).unwrap().holds(&b));
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn release_builds_take_no_seal() {
        assert!(Seal::over(&[1, 2, 3]).is_none());
    }
}
