//! Mutual authentication by pre-shared key (HMAC-SHA256 challenge-response).
//!
//! Each side proves knowledge of the key over the *other* side's fresh nonce,
//! so a recorded handshake is useless later: the server's next challenge
//! carries a nonce the recording never answered. The transcript both proofs
//! cover also binds the export and session, so a proof for one cannot be
//! moved onto another.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Length of a nonce on the wire.
pub const NONCE_LEN: usize = 16;
/// Length of a proof on the wire.
pub const PROOF_LEN: usize = 32;

/// A pre-shared key. Its bytes never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl Key {
    /// Wraps raw key bytes (any length; 32 random bytes recommended).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Key(bytes.into())
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// What both proofs cover: everything a man in the middle might want to
/// change between a client and a server.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// The key id the client named.
    pub key_id: &'a str,
    /// The export the client asked for.
    pub export: &'a str,
    /// The session the client asked to join (0 for a new one).
    pub session_id: u64,
    /// The client's owner and epoch: a forged epoch could fence the owner.
    pub owner_epoch: (u64, u64),
    /// The client's fresh nonce.
    pub client_nonce: &'a [u8; NONCE_LEN],
    /// The server's fresh nonce.
    pub server_nonce: &'a [u8; NONCE_LEN],
    /// The server's boot id.
    pub boot_id: u64,
}

fn prove(key: &Key, role: &[u8], t: &Transcript<'_>) -> [u8; PROOF_LEN] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0).expect("HMAC accepts keys of any length");
    mac.update(role);
    for field in [t.key_id.as_bytes(), t.export.as_bytes()] {
        mac.update(&(field.len() as u32).to_le_bytes());
        mac.update(field);
    }
    mac.update(&t.session_id.to_le_bytes());
    mac.update(&t.owner_epoch.0.to_le_bytes());
    mac.update(&t.owner_epoch.1.to_le_bytes());
    mac.update(t.client_nonce);
    mac.update(t.server_nonce);
    mac.update(&t.boot_id.to_le_bytes());
    mac.finalize().into_bytes().into()
}

/// The proof the server sends: it knows the key.
pub fn server_proof(key: &Key, t: &Transcript<'_>) -> [u8; PROOF_LEN] {
    prove(key, b"braid-v1 server", t)
}

/// The proof the client sends: it knows the key.
pub fn client_proof(key: &Key, t: &Transcript<'_>) -> [u8; PROOF_LEN] {
    prove(key, b"braid-v1 client", t)
}

/// Compares proofs without an early exit, so timing reveals nothing.
pub fn proofs_equal(a: &[u8; PROOF_LEN], b: &[u8; PROOF_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript<'a>(cn: &'a [u8; 16], sn: &'a [u8; 16]) -> Transcript<'a> {
        Transcript {
            key_id: "client",
            export: "disk0",
            session_id: 0,
            owner_epoch: (0, 0),
            client_nonce: cn,
            server_nonce: sn,
            boot_id: 9,
        }
    }

    #[test]
    fn roles_and_nonces_change_the_proof() {
        let key = Key::new(*b"0123456789abcdef0123456789abcdef");
        let (cn, sn, sn2) = ([1; 16], [2; 16], [3; 16]);
        let t = transcript(&cn, &sn);
        assert!(!proofs_equal(
            &server_proof(&key, &t),
            &client_proof(&key, &t)
        ));
        let replayed = client_proof(&key, &t);
        let fresh = client_proof(&key, &transcript(&cn, &sn2));
        assert!(
            !proofs_equal(&replayed, &fresh),
            "a new server nonce needs a new proof"
        );
        let other_key = Key::new(*b"another key");
        assert!(!proofs_equal(&client_proof(&other_key, &t), &replayed));
        assert!(proofs_equal(&replayed, &client_proof(&key, &t)));
    }
}
