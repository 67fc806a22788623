//! The server's disk in the simulation: a [`MemDisk`] shared with the
//! world, so it outlives server crashes and can lose power.

use braid_core::server::{Backend, BackendOp};
use braid_core::testkit::MemDisk;
use braid_core::wire::Status;
use bytes::Bytes;
use std::sync::{Arc, Mutex};

/// The backend the simulated server runs on.
pub(crate) struct SimDisk(pub Arc<Mutex<MemDisk>>);

impl Backend for SimDisk {
    fn execute(&self, _export: usize, op: &BackendOp) -> Result<Bytes, Status> {
        self.0.lock().unwrap().apply(op)
    }

    fn try_execute_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        // Memory never blocks; the driver's inline path is exercised.
        Some(self.execute(export, op))
    }
}
