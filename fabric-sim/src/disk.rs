//! The server's disk in the simulation: a [`MemDisk`] shared with the
//! world, so it outlives server crashes and can lose power.

use braid_core::rng::SplitMix64;
use braid_core::server::{Backend, BackendOp};
use braid_core::testkit::MemDisk;
use braid_core::wire::Status;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The backend the simulated server runs on.
pub(crate) struct SimDisk {
    /// One disk per export.
    pub disks: Vec<Arc<Mutex<MemDisk>>>,
    /// While set, every mutation fails with NO_SPACE and changes nothing,
    /// as a thin-provisioned or shared filesystem does when it fills.
    pub full: Arc<AtomicBool>,
    /// While set, the disk is in a latency spike (a dying drive's retries,
    /// a saturated array): each operation takes tens to hundreds of ms.
    pub slow: Arc<AtomicBool>,
    /// Draws each operation's latency; seeded, so runs replay.
    pub rng: Mutex<SplitMix64>,
}

impl Backend for SimDisk {
    fn execute(&self, export: usize, op: &BackendOp) -> Result<Bytes, Status> {
        let mutates = !matches!(op, BackendOp::Read { .. } | BackendOp::Flush);
        if mutates && self.full.load(Ordering::SeqCst) {
            return Err(Status::NoSpace);
        }
        let Some(disk) = self.disks.get(export) else {
            return Err(Status::Invalid);
        };
        disk.lock().unwrap().apply(op)
    }

    fn latency(&self, _export: usize, _op: &BackendOp) -> Option<Duration> {
        let mut rng = self.rng.lock().unwrap();
        // One operation in four is answered inline, which keeps the
        // driver's inline path under test too.
        if !self.slow.load(Ordering::SeqCst) && rng.below(4) == 0 {
            return None;
        }
        let micros = if self.slow.load(Ordering::SeqCst) {
            20_000 + rng.below(400_000)
        } else {
            20 + rng.below(300)
        };
        Some(Duration::from_micros(micros))
    }

    fn completion_delay(&self, _export: usize, _op: &BackendOp) -> Duration {
        Duration::from_micros(self.rng.lock().unwrap().below(300))
    }

    fn try_execute_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        // Reached only when `latency` said none: memory never blocks.
        Some(self.execute(export, op))
    }
}
