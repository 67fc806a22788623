//! A hand-driven client handshake, for tests and fuzzing that talk to a
//! server engine directly.

use crate::auth::{self, Key, NONCE_LEN};
use crate::server::{ConnId, ServerAction, ServerEngine};
use crate::wire::{self, Message};
use crate::Instant;

/// Sends a genuine HELLO for a new session on the opened `conn`, answers
/// the CHALLENGE with the right proof, and returns whether a CHALLENGE came
/// (the server's WELCOME or REJECT is left queued for the caller).
pub fn authenticate(
    server: &mut ServerEngine,
    conn: ConnId,
    key_id: &str,
    key: &Key,
    export: &str,
    now: Instant,
) -> bool {
    authenticate_as(server, conn, (key_id, key), export, (0, 0), now)
}

/// [`authenticate`] for a client with an identity: `(owner, epoch)`.
pub fn authenticate_as(
    server: &mut ServerEngine,
    conn: ConnId,
    (key_id, key): (&str, &Key),
    export: &str,
    (owner, epoch): (u64, u64),
    now: Instant,
) -> bool {
    let nonce = [9u8; NONCE_LEN];
    let hello = Message::Hello(wire::Hello {
        version_min: 1,
        version_max: 1,
        features: 0,
        session_id: 0,
        client_nonce: nonce,
        owner,
        epoch,
        key_id: key_id.into(),
        export: export.into(),
    });
    server.handle_frame(conn, wire::encode(&hello).to_bytes(), now);
    let mut challenge = None;
    while let Some(a) = server.poll_action() {
        if let ServerAction::Send { frame, .. } = a {
            if let Ok(Message::Challenge(c)) = wire::decode(frame.to_bytes()) {
                challenge = Some(c);
            }
        }
    }
    let Some(c) = challenge else { return false };
    let transcript = auth::Transcript {
        key_id,
        export,
        session_id: 0,
        owner_epoch: (owner, epoch),
        client_nonce: &nonce,
        server_nonce: &c.server_nonce,
        boot_id: c.boot_id,
    };
    let client_proof = auth::client_proof(key, &transcript);
    server.handle_frame(
        conn,
        wire::encode(&Message::Auth(wire::Auth { client_proof })).to_bytes(),
        now,
    );
    true
}
