//! A thread running a single-threaded runtime of its own, with its own
//! poller (see `busy_poll`): what each of `braid serve`'s NBD threads and
//! protocol engines (with `--engines` above one) runs on. Tasks spawned
//! there stay there, so a connection's reads, backend operations and
//! replies never cross threads.

use crate::busy_poll::Poller;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Starts the thread `name`, polling for `poll` after each IO, runs
/// `setup` on its runtime and returns the runtime's handle with what
/// `setup` made. The runtime runs until `stopped` completes (its sender
/// sends or is dropped).
pub(crate) fn start<T: Send + 'static>(
    name: String,
    poll: Duration,
    stopped: oneshot::Receiver<()>,
    setup: impl FnOnce() -> T + Send + 'static,
) -> Result<(Handle, T), String> {
    let (ready, started) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let poller = Poller::for_thread();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // The blocking pool's threads finish backend operations of
                // this runtime's connections: their marks keep this
                // runtime polling, not the main one.
                .on_thread_start(move || poller.mark_here())
                .build();
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready.send(Err(format!("cannot start a runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                poller.start(poll);
                let made = setup();
                let _ = ready.send(Ok((Handle::current(), made)));
                let _ = stopped.await;
            });
        })
        .map_err(|e| format!("thread {name}: {e}"))?;
    started
        .recv()
        .map_err(|_| format!("thread {name} ended before it started"))?
        .map_err(|e| format!("thread {name}: {e}"))
}
