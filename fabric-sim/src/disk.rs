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
    /// Whether some completions are heard milliseconds late (see
    /// `completion_delay`). The mirror worlds keep the short delays their
    /// pinned seeds were found with.
    pub late_completions: bool,
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
        let mut rng = self.rng.lock().unwrap();
        // A long tail, as real controllers have: one operation in eight is
        // on the disk milliseconds before anyone hears so. Reads meanwhile
        // see its data, and a power loss then leaves a write that was seen
        // but never answered: the window the restart gate closes, which
        // with 300 us at most the real drivers almost never opened (all
        // faults: one seed in 300 without the gate; now about one in 30,
        // and power loss alone one in 16).
        let micros = if self.late_completions && rng.below(8) == 0 {
            5_000 + rng.below(45_000)
        } else {
            rng.below(300)
        };
        Duration::from_micros(micros)
    }

    fn try_execute_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        // Reached only when `latency` said none: memory never blocks.
        Some(self.execute(export, op))
    }
}
