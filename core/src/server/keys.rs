//! Replacing the server's pre-shared keys while it serves: keys are
//! added and withdrawn without a restart, and a withdrawn key stops
//! working at once, for channels already open as for new ones.

use super::{CloseReason, ConnState, ServerEngine};
use crate::auth::Key;
use crate::limits::ConfigError;
use crate::Instant;

/// What a new key table changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyChange {
    /// Key ids the server did not hold before.
    pub added: Vec<String>,
    /// Key ids it no longer holds, or holds with other bytes.
    pub withdrawn: Vec<String>,
    /// Channels closed because they authenticated with a withdrawn key.
    pub channels_closed: usize,
}

impl ServerEngine {
    /// Replaces the pre-shared keys with `keys`, if the configuration
    /// they make is sound (else nothing changes and the error says why).
    ///
    /// A channel that authenticated with a key now withdrawn (gone, or
    /// given other bytes) is closed, as is one whose handshake waits for
    /// a fenced session to drain; a handshake between challenge and proof
    /// is judged against the new table when its proof arrives. Sessions
    /// are not ended: one left without channels lingers like any other,
    /// its results kept, so a client whose key is given back within the
    /// linger resumes it exactly once. Until then its reconnects are
    /// refused with `AuthFailed`.
    pub fn set_keys(
        &mut self,
        keys: Vec<(String, Key)>,
        now: Instant,
    ) -> Result<KeyChange, ConfigError> {
        let mut next = self.config.clone();
        next.keys = keys;
        next.validate()?;
        let held = |table: &[(String, Key)], id: &str, key: &Key| {
            table.iter().any(|(i, k)| i == id && k == key)
        };
        let knows = |table: &[(String, Key)], id: &str| table.iter().any(|(i, _)| i == id);
        let added = next
            .keys
            .iter()
            .filter(|(id, _)| !knows(&self.config.keys, id))
            .map(|(id, _)| id.clone())
            .collect();
        let withdrawn: Vec<String> = self
            .config
            .keys
            .iter()
            .filter(|(id, key)| !held(&next.keys, id, key))
            .map(|(id, _)| id.clone())
            .collect();
        self.config = next;
        let revoked: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(
                    c.state,
                    ConnState::AwaitFence { .. } | ConnState::Bound { .. }
                ) && c.key_id.as_ref().is_some_and(|k| withdrawn.contains(k))
            })
            .map(|(conn, _)| *conn)
            .collect();
        for &conn in &revoked {
            self.close(conn, CloseReason::KeyRevoked, now);
        }
        self.stats.channels_revoked += revoked.len() as u64;
        Ok(KeyChange {
            added,
            withdrawn,
            channels_closed: revoked.len(),
        })
    }
}
