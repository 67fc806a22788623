//! The server's disk in the simulation: a [`MemDisk`] shared with the
//! world, so it outlives server crashes and can lose power.

use braid_core::server::{Backend, BackendOp};
use braid_core::testkit::MemDisk;
use braid_core::wire::Status;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The backend the simulated server runs on.
pub(crate) struct SimDisk {
    /// One disk per export.
    pub disks: Vec<Arc<Mutex<MemDisk>>>,
    /// While set, every mutation fails with NO_SPACE and changes nothing,
    /// as a thin-provisioned or shared filesystem does when it fills.
    pub full: Arc<AtomicBool>,
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

    fn try_execute_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        // Memory never blocks; the driver's inline path is exercised.
        Some(self.execute(export, op))
    }
}
