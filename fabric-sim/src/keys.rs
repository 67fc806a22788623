//! The operator's key file for a simulated server: the client's key is
//! withdrawn for a while and given back, through the running server's
//! `set_keys` as `braid reload` does it, and a server that boots meanwhile
//! reads the file as it is then.

use braid_core::auth::Key;
use braid_fabric_tcp::Server;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The key id every simulated client uses.
pub(crate) const KEY_ID: &str = "sim";

pub(crate) struct OperatorKeys {
    key: Key,
    withdrawn: AtomicBool,
    /// The server of the current boot, once it listens.
    serving: Mutex<Option<Server>>,
    /// Channels the server closed for a withdrawn key.
    revoked: AtomicU64,
}

impl OperatorKeys {
    pub(crate) fn new(key: Key) -> Self {
        OperatorKeys {
            key,
            withdrawn: AtomicBool::new(false),
            serving: Mutex::new(None),
            revoked: AtomicU64::new(0),
        }
    }

    /// The key file as a server booting now reads it: the client's key,
    /// or while it is withdrawn only another client's (a table is never
    /// empty).
    pub(crate) fn table(&self) -> Vec<(String, Key)> {
        if self.withdrawn.load(Ordering::SeqCst) {
            vec![(
                "another client".into(),
                Key::new(b"not the sim key".to_vec()),
            )]
        } else {
            vec![(KEY_ID.into(), self.key.clone())]
        }
    }

    /// The booted server listens: later changes reach it.
    pub(crate) fn serving(&self, server: Server) {
        *self.serving.lock().unwrap() = Some(server);
    }

    pub(crate) async fn withdraw(&self) {
        self.withdrawn.store(true, Ordering::SeqCst);
        self.reload().await;
    }

    pub(crate) async fn give_back(&self) {
        self.withdrawn.store(false, Ordering::SeqCst);
        self.reload().await;
    }

    /// Channels the server closed for a withdrawn key so far.
    pub(crate) fn channels_revoked(&self) -> u64 {
        self.revoked.load(Ordering::SeqCst)
    }

    async fn reload(&self) {
        let server = self.serving.lock().unwrap().clone();
        if let Some(server) = server {
            // A server killed since it booted refuses ("stopping"); its
            // next boot reads the table above.
            if let Ok(change) = server.set_keys(self.table()).await {
                self.revoked
                    .fetch_add(change.channels_closed as u64, Ordering::SeqCst);
            }
        }
    }
}
