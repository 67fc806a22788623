//! The volume's dirty logs and run identity, kept in memory outside the
//! client node so they outlast its restarts; and a store the client dies
//! in the middle of.
//!
//! `braid attach` stores each leg's log as a file of its own, replaced by
//! a rename, one leg after another. A client that dies part way through
//! leaves some legs' logs new and the others as they were; one whose
//! machine loses power before the directory is synced may keep any of
//! the renames. The store runs as one task here, which a madsim kill
//! cannot split, so the store the harness asks to tear keeps each leg's
//! new log or its old one with even odds, and kills the client node
//! itself before the driver can hear that the store returned.

use braid_core::rng::SplitMix64;
use braid_fabric_tcp::LogStore;
use madsim::runtime::Handle;
use madsim::task::NodeId;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::Notify;

/// What a torn store keeps, and whose node dies in it.
struct Tear {
    client: NodeId,
    keep: SplitMix64,
}

#[derive(Default)]
pub(crate) struct MemLogs {
    logs: Mutex<HashMap<String, Vec<u8>>>,
    identity: Mutex<Option<Vec<u8>>>,
    tear: Mutex<Option<Tear>>,
    torn: Notify,
}

impl MemLogs {
    /// The next store dies part way through, and kills `client` with it.
    pub(crate) fn tear_next_store(&self, client: NodeId, keep: SplitMix64) {
        *self.tear.lock().unwrap() = Some(Tear { client, keep });
    }

    /// Waits for the store asked for by [`MemLogs::tear_next_store`].
    pub(crate) async fn torn(&self) {
        self.torn.notified().await;
    }

    /// No store came: the next one completes as any other.
    pub(crate) fn tear_no_store(&self) {
        self.tear.lock().unwrap().take();
    }

    /// Each leg's stored log, for tracing.
    pub(crate) fn stored(&self) -> Vec<(String, Vec<u8>)> {
        let logs = self.logs.lock().unwrap();
        let mut stored: Vec<_> = logs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        stored.sort();
        stored
    }
}

impl LogStore for MemLogs {
    fn load(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.logs.lock().unwrap().get(name).cloned())
    }

    fn store(&self, logs: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        let tear = self.tear.lock().unwrap().take();
        let mut stored = self.logs.lock().unwrap();
        match tear {
            None => {
                for (k, v) in logs {
                    stored.insert(k.clone(), v.clone());
                }
            }
            Some(Tear { client, mut keep }) => {
                for (k, v) in logs {
                    if keep.chance(0.5) {
                        stored.insert(k.clone(), v.clone());
                    }
                }
                // Every task of the node is dropped before it runs again:
                // the driver never hears this store's result.
                Handle::current().kill(client);
                self.torn.notify_one();
            }
        }
        Ok(())
    }

    fn load_identity(&self) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.identity.lock().unwrap().clone())
    }

    fn store_identity(&self, bytes: &[u8]) -> std::io::Result<()> {
        *self.identity.lock().unwrap() = Some(bytes.to_vec());
        Ok(())
    }
}
