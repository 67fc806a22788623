//! The NBD face's threads in `braid serve`: each NBD connection runs on one
//! of several single-threaded runtimes, the one with the fewest
//! connections when it arrives. Connections then share the machine's cores
//! while each one's reads, backend operations and replies stay on one
//! thread (no cross-thread wake-up per request), and the protocol engine
//! keeps the main runtime to itself.
//!
//! Why not the main runtime with more workers (`--threads`): four fio jobs
//! over a unix socket, 4k random reads at QD32, left 15-21% of the 2-vCPU
//! development machine idle on one thread (232-268k IOPS); two workers
//! used it all (308-314k), but a single connection's 4k writes at QD32
//! fell from 163-165k to 147-159k, its CPU per IO up from 6.0 to 6.8-8.0
//! µs: work-stealing moves a connection's tasks between the workers.

use braid_core::server::Backend;
use braid_frontend_nbd::{BackendTarget, Placement, Target};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The running threads; dropping this stops them (after the listeners
/// that place connections on them have drained).
pub(crate) struct NbdThreads {
    placement: Placement,
    _stops: Vec<oneshot::Sender<()>>,
}

impl NbdThreads {
    /// Starts `count` threads, each serving `backend` with its own io_uring
    /// (where the backend has one) and its own poller of `poll` after each
    /// IO.
    pub(crate) fn start(
        count: usize,
        backend: Arc<dyn Backend>,
        poll: Duration,
    ) -> Result<NbdThreads, String> {
        let mut places = Vec::with_capacity(count);
        let mut stops = Vec::with_capacity(count);
        for index in 0..count {
            let (stop, stopped) = oneshot::channel();
            places.push(spawn(index, backend.clone(), poll, stopped)?);
            stops.push(stop);
        }
        Ok(NbdThreads {
            placement: Placement::spread(places),
            _stops: stops,
        })
    }

    /// Where the NBD listeners put their connections.
    pub(crate) fn placement(&self) -> Placement {
        self.placement.clone()
    }
}

/// Threads by default on a machine with fewer CPUs than this. A
/// connection with a thread to itself did better than two sharing one,
/// even with more connections than cores: on the 2-vCPU development
/// machine, four fio jobs over unix (three and two alternations) ran 4k
/// random reads at QD32 at 317-335k IOPS on four threads against 286-288k
/// on two, and at QD1 143k against 103-117k, with less CPU per IO on both
/// sides; eight jobs at QD32 305-313k on eight threads, 218-310k on two.
/// The kernel's scheduler then shares the cores between connections, as
/// it does between nbd-server's processes. An idle thread costs a parked
/// runtime and its io_uring.
const MIN_DEFAULT_COUNT: usize = 8;

/// The default: a thread per CPU the process may run on, and at least
/// [`MIN_DEFAULT_COUNT`].
pub(crate) fn default_count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.max(MIN_DEFAULT_COUNT)
}

fn spawn(
    index: usize,
    backend: Arc<dyn Backend>,
    poll: Duration,
    stopped: oneshot::Receiver<()>,
) -> Result<(Handle, Arc<dyn Target>), String> {
    crate::runtime_thread::start(format!("braid-nbd-{index}"), poll, stopped, move || {
        let target = BackendTarget::new(backend)
            .on_client_wait(crate::busy_poll::transfer_wait)
            .with_io_queue();
        Arc::new(target) as Arc<dyn Target>
    })
    .map_err(|e| format!("NBD {e}"))
}
