//! The leg server nodes: each serves its disk as export `disk0`, and the
//! faults, the end crash and the operator act on it.

use crate::disk::SimDisk;
use braid_core::auth::Key;
use braid_core::rng::SplitMix64;
use braid_core::server::{ExportConfig, ServerConfig};
use braid_core::testkit::{MemDisk, Sabotage};
use madsim::runtime::Handle;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One leg's server node and its disk, as the faults, the end crash and
/// the operator act on them.
#[derive(Clone)]
pub(super) struct LegServer {
    pub(super) handle: Handle,
    pub(super) node: madsim::task::NodeId,
    pub(super) disk: Arc<Mutex<MemDisk>>,
    /// Shut down for good: a fault that struck before must not bring it
    /// back when it heals.
    pub(super) gone: Arc<AtomicBool>,
    /// Held by whatever strikes it: faults on one leg take turns (two
    /// restarts at once would find the port taken).
    pub(super) turn: Arc<tokio::sync::Mutex<()>>,
}

impl LegServer {
    /// Killed, started again after `hold`.
    pub(super) async fn crash(&self, hold: Duration) {
        self.handle.kill(self.node);
        tokio::time::sleep(hold).await;
        self.restart_unless_gone();
    }

    /// Killed with its disk's cache lost, started again after `hold` (a
    /// node restarted at once can find its port still held by the one
    /// killed).
    pub(super) async fn lose_power(&self, hold: Duration) {
        self.handle.kill(self.node);
        self.disk.lock().unwrap().lose_power();
        tokio::time::sleep(hold).await;
        self.restart_unless_gone();
    }

    /// Paused, resumed after `hold`.
    pub(super) async fn stall(&self, hold: Duration) {
        self.handle.pause(self.node);
        tokio::time::sleep(hold).await;
        if !self.gone.load(Ordering::SeqCst) {
            self.handle.resume(self.node);
        }
    }

    fn restart_unless_gone(&self) {
        if !self.gone.load(Ordering::SeqCst) {
            self.handle.restart(self.node);
        }
    }

    /// Shut down for good, as an operator decommissions a server.
    pub(super) fn decommission(&self) {
        self.gone.store(true, Ordering::SeqCst);
        self.handle.kill(self.node);
    }
}

/// Per leg: its disk is full, its disk is slow. Outside the server node,
/// so they outlast its crashes.
pub(super) type DiskFlags = (Arc<AtomicBool>, Arc<AtomicBool>);

pub(super) fn server_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1 + i as u8))
}

/// A server node per disk size, each serving a disk of it as export
/// `disk0`, in node order; with each, its disk's full and slow flags
/// (they outlast its crashes).
pub(super) fn start_servers(
    handle: &Handle,
    seed: u64,
    key: &Key,
    sabotage: &[Sabotage],
    engines: usize,
    sizes: &[u64],
) -> (Vec<LegServer>, Vec<DiskFlags>) {
    let mut servers = Vec::new();
    let mut flags = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let served = Arc::new(Mutex::new(MemDisk::new(size)));
        let disk_flags = DiskFlags::default();
        let (disk, key, sabotage) = (served.clone(), key.clone(), sabotage.to_vec());
        let (full, slow) = disk_flags.clone();
        let boots = Arc::new(AtomicU64::new(0));
        let node = handle
            .create_node()
            .name(format!("server{i}"))
            .ip(server_ip(i))
            .init(move || {
                let (disk, key, sabotage) = (disk.clone(), key.clone(), sabotage.clone());
                let (full, slow) = (full.clone(), slow.clone());
                let boot = boots.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    let config = ServerConfig::new(
                        seed.rotate_left(i as u32 + 3) ^ boot,
                        crate::world::seed_bytes(seed, 50 + 8 * i as u64 + boot),
                        vec![("sim".into(), key)],
                        vec![ExportConfig::new("disk0", size)],
                    );
                    let disk = SimDisk {
                        disks: vec![disk],
                        full,
                        slow,
                        rng: Mutex::new(SplitMix64::new(seed ^ (boot << 8) ^ i as u64)),
                        late_completions: false,
                    };
                    crate::world::serve_sim(server_ip(i), config, &sabotage, engines, disk, |_| {})
                        .await;
                }
            })
            .build();
        servers.push(LegServer {
            handle: handle.clone(),
            node: node.id(),
            disk: served,
            gone: Arc::default(),
            turn: Arc::default(),
        });
        flags.push(disk_flags);
    }
    (servers, flags)
}
