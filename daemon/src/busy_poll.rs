//! Hybrid polling: after IO activity the runtime keeps polling its sockets
//! for a short window instead of sleeping in epoll, so the next request or
//! reply is picked up without the cost of waking a sleeping thread. On the
//! 2-vCPU development VM a wake-up costs about 40 µs each way, as much as
//! braid's whole path; at QD1 every IO pays it once per process it crosses.
//! An idle daemon does not spin: the window starts at each IO.

use braid_core::server::{
    Backend, BackendOp, Extent, IoQueue, MappedRange, MappedSink, SpliceSource,
};
use braid_core::wire::Status;
use bytes::Bytes;
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Microseconds of polling after the last IO, unless configured: long
/// enough to cover a QD1 peer's turnaround (its own wake-up included), so
/// a steady QD1 stream never sleeps; short enough that a daemon spins for
/// a fifth of a millisecond after its last IO.
pub(crate) const DEFAULT_WINDOW_US: u64 = 200;

/// One runtime's poller: the activity that keeps it spinning and the
/// wake-up of its sleep. The process's main runtime has [`PROCESS`]; a
/// runtime of its own (the NBD face's threads) gets one from
/// [`Poller::for_thread`], so IO on it spins that runtime only.
pub(crate) struct Poller {
    activity: AtomicU64,
    sleeping: AtomicBool,
    wake: Notify,
    started: AtomicBool,
}

static PROCESS: Poller = Poller::new();

thread_local! {
    /// The poller that IO on this thread marks, if not [`PROCESS`].
    static THREAD_POLLER: Cell<Option<&'static Poller>> = const { Cell::new(None) };
}

/// The poller IO on this thread marks.
fn current() -> &'static Poller {
    THREAD_POLLER.with(Cell::get).unwrap_or(&PROCESS)
}

/// The core goes to other runnable threads once in this many turns: every
/// turn made each turn cost a scheduler call, so IO was seen later.
/// Medians of 4-5 alternating runs, 4k random reads at QD1: fio through
/// `braid attach` 20.2k -> 22.1k-25.7k IOPS (every 4: 24.6k, every 16:
/// 22.2k, every 64: 21.2k), `braid bench` 44.5k -> 52.9k IOPS; fio over
/// NBD straight to the server unchanged. A thread woken meanwhile still
/// preempts the spinner (EEVDF's wakeup preemption); this only bounds how
/// long it can be kept waiting.
const TURNS_PER_YIELD: u32 = 8;

/// Transfers of at least this many bytes do not extend the polling window.
/// Such an IO's own copies cost each process it crosses 100 µs or more
/// (about 110 µs per MiB copied here), so a wake-up adds little to it,
/// while spinning between such IOs takes a core from the copies of the
/// processes it shares cores with. Alternating runs, 1 MiB through
/// `braid attach` at QD8 (see PERFORMANCE.md): with no polling, `braid
/// serve`'s CPU per write fell from 520-560 µs to 365-375 µs. A transfer
/// that waits for its peer polls through the wait ([`transfer_wait`]).
pub(crate) const LARGE_IO: usize = 256 * 1024;

/// Marks activity of an IO moving `bytes` of data (0 for one that moves
/// none): unless it is a large transfer, polling goes on for the window
/// after it.
pub(crate) fn mark_io(bytes: usize) {
    if extends_window(bytes) {
        mark();
    }
}

fn extends_window(bytes: usize) -> bool {
    bytes < LARGE_IO
}

/// The bytes of data `op` moves.
pub(crate) fn data_len(op: &BackendOp) -> usize {
    match op {
        BackendOp::Read { len, .. } => *len as usize,
        BackendOp::Write { data, .. } => data.len(),
        _ => 0,
    }
}

/// Marks a connection waiting for its peer in the middle of a transfer
/// (an NBD face's `Target::client_wait`, braid's protocol through
/// `conn::on_peer_wait`): whatever the IO's size, the process polls
/// through the wait. Over a unix socket a 1 MiB READ's reply leaves in
/// several sends, each waiting for fio to read the last, and sleeping
/// through each wait cost 30% of 1 MiB reads at QD8 (3507-3641 against
/// 2361-2589 IOPS).
pub(crate) fn transfer_wait() {
    mark();
}

/// Marks IO activity: polling goes on for the window after the last mark.
fn mark() {
    current().mark();
}

/// Spawns the process's poller on the current runtime, once per process;
/// a zero window spawns nothing.
pub(crate) fn start(window: Duration) {
    if PROCESS.start(window) {
        braid_fabric_tcp::conn::on_peer_wait(transfer_wait);
    }
}

impl Poller {
    const fn new() -> Poller {
        Poller {
            activity: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            wake: Notify::const_new(),
            started: AtomicBool::new(false),
        }
    }

    /// A poller for a runtime of its own. IO on the calling thread marks
    /// it from now on, as does IO on any thread that calls
    /// [`Poller::mark_here`] on it (the runtime's blocking pool threads,
    /// from its `on_thread_start`). It lives as long as the process, as
    /// such runtimes do.
    pub(crate) fn for_thread() -> &'static Poller {
        let poller: &'static Poller = Box::leak(Box::new(Poller::new()));
        poller.mark_here();
        poller
    }

    /// IO on the calling thread marks this poller.
    pub(crate) fn mark_here(&'static self) {
        THREAD_POLLER.with(|p| p.set(Some(self)));
    }

    fn mark(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
        if self.sleeping.load(Ordering::Relaxed) {
            self.sleeping.store(false, Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    /// Spawns this poller on the current runtime, once; a zero window
    /// spawns nothing. Whether it spawned.
    pub(crate) fn start(&'static self, window: Duration) -> bool {
        if window.is_zero() || self.started.swap(true, Ordering::Relaxed) {
            return false;
        }
        tracing::debug!(window_us = window.as_micros() as u64, "polling after IO");
        tokio::spawn(self.spin(window));
        true
    }

    async fn spin(&self, window: Duration) {
        let mut seen = self.activity.load(Ordering::Relaxed);
        let mut last = Instant::now();
        let mut turns = 0u32;
        // Polling goes on under load too. Until session 26 it stepped
        // aside for a millisecond whenever more than 64 IOs had come in
        // the last one (the runtime seldom sleeps then, and the turns cost
        // CPU); but every wait it then slept through cost a wake-up, and
        // with it, three alternations of 4k random reads at QD32: braid
        // bench over four channels 124-176k IOPS, without it 219-256k;
        // fio over TCP to the NBD face 110-134k -> 118-142k, four jobs
        // 133-168k -> 147-174k; through braid attach 56-72k -> 72-85k
        // (random writes 53-65k -> 63-64k).
        loop {
            let now = Instant::now();
            let now_seen = self.activity.load(Ordering::Relaxed);
            if now_seen != seen {
                seen = now_seen;
                last = now;
            }
            if now.duration_since(last) < window {
                // A yielded task is run again only after the runtime has
                // polled its IO driver without blocking: this loop turns
                // epoll's sleep into a spin while IO is near. And every few
                // turns the core goes to any other runnable thread first:
                // spinning must not slow the processes it shares cores with.
                turns = turns.wrapping_add(1);
                if turns % TURNS_PER_YIELD == 0 {
                    std::thread::yield_now();
                }
                tokio::task::yield_now().await;
            } else {
                let woken = self.wake.notified();
                self.sleeping.store(true, Ordering::Relaxed);
                if self.activity.load(Ordering::Relaxed) == seen {
                    woken.await;
                }
                self.sleeping.store(false, Ordering::Relaxed);
                last = Instant::now();
            }
        }
    }
}

/// A backend whose every operation marks activity: the server polls for the
/// next request on any face (braid's protocol, NBD, RDMA) after each one.
pub(crate) struct Polled<B>(pub(crate) B);

impl<B: Backend> Backend for Polled<B> {
    fn execute(&self, export: usize, op: &BackendOp) -> Result<Bytes, Status> {
        let r = self.0.execute(export, op);
        mark_io(data_len(op));
        r
    }

    fn try_execute_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        mark_io(data_len(op));
        self.0.try_execute_now(export, op)
    }

    fn latency(&self, export: usize, op: &BackendOp) -> Option<Duration> {
        self.0.latency(export, op)
    }

    fn completion_delay(&self, export: usize, op: &BackendOp) -> Duration {
        self.0.completion_delay(export, op)
    }

    fn allocation(&self, export: usize, offset: u64, len: u64) -> Result<Vec<Extent>, Status> {
        self.0.allocation(export, offset, len)
    }

    fn splice_source(&self, export: usize, offset: u64, len: u32) -> Option<SpliceSource> {
        self.0.splice_source(export, offset, len)
    }

    fn payload_crc(&self, export: usize, offset: u64, len: u32) -> Option<u32> {
        self.0.payload_crc(export, offset, len)
    }

    fn mapped_source(&self, export: usize, offset: u64, len: u32) -> Option<MappedRange> {
        // Asked for only to send the range at once, so it is the READ.
        let mapped = self.0.mapped_source(export, offset, len)?;
        mark_io(mapped.len());
        Some(mapped)
    }

    fn mapped_sink(&self, export: usize, offset: u64, len: u32) -> Option<MappedSink> {
        // Asked for only to receive the WRITE's payload at once.
        let sink = self.0.mapped_sink(export, offset, len)?;
        mark_io(sink.len());
        Some(sink)
    }

    fn io_queue_takes(&self, export: usize, op: &BackendOp) -> bool {
        self.0.io_queue_takes(export, op)
    }

    fn io_queue(&self) -> Option<Box<dyn IoQueue>> {
        Some(Box::new(PolledQueue {
            queue: self.0.io_queue()?,
            large: HashSet::new(),
        }))
    }
}

/// A backend's queue whose operations mark activity as they finish, as
/// those on the pool do.
struct PolledQueue {
    queue: Box<dyn IoQueue>,
    /// Operations in flight that move [`LARGE_IO`] or more.
    large: HashSet<u64>,
}

impl IoQueue for PolledQueue {
    fn ready_fd(&self) -> std::os::fd::RawFd {
        self.queue.ready_fd()
    }

    fn start(&mut self, export: usize, op: BackendOp, tag: u64) -> Result<(), BackendOp> {
        let large = !extends_window(data_len(&op));
        self.queue.start(export, op, tag)?;
        if large {
            self.large.insert(tag);
        }
        Ok(())
    }

    fn submit(&mut self) {
        self.queue.submit()
    }

    fn collect(&mut self, done: &mut dyn FnMut(u64, Result<Bytes, Status>)) {
        let large = &mut self.large;
        self.queue.collect(&mut |tag, result| {
            if !large.remove(&tag) {
                mark();
            }
            done(tag, result)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Answers;

    impl Backend for Answers {
        fn execute(&self, _export: usize, _op: &BackendOp) -> Result<Bytes, Status> {
            Ok(Bytes::from_static(b"pool"))
        }

        fn try_execute_now(
            &self,
            _export: usize,
            _op: &BackendOp,
        ) -> Option<Result<Bytes, Status>> {
            Some(Err(Status::NoSpace))
        }
    }

    #[test]
    fn only_transfers_below_the_large_size_extend_the_window() {
        let read = |len| BackendOp::Read { offset: 0, len };
        let write = |len| BackendOp::Write {
            offset: 0,
            data: Bytes::from(vec![0; len]),
            fua: false,
        };
        assert_eq!(data_len(&read(4096)), 4096);
        assert_eq!(data_len(&write(LARGE_IO)), LARGE_IO);
        // A trim of a large range moves no data: it costs what a small IO does.
        let trim = BackendOp::Trim {
            offset: 0,
            len: 1 << 30,
            fua: false,
        };
        assert_eq!(data_len(&trim), 0);
        assert_eq!(data_len(&BackendOp::Flush), 0);
        assert!(extends_window(0));
        assert!(extends_window(128 * 1024));
        assert!(!extends_window(LARGE_IO));
        assert!(!extends_window(1 << 20));
    }

    #[test]
    fn every_backend_operation_marks_activity_and_answers_unchanged() {
        let polled = Polled(Answers);
        let op = BackendOp::Flush;
        let before = PROCESS.activity.load(Ordering::Relaxed);
        assert_eq!(polled.execute(0, &op).unwrap(), Bytes::from_static(b"pool"));
        assert_eq!(polled.try_execute_now(0, &op), Some(Err(Status::NoSpace)));
        assert!(PROCESS.activity.load(Ordering::Relaxed) >= before + 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sleeping_poller_wakes_on_activity_and_sleeps_again_after_the_window() {
        start(Duration::from_micros(50));
        // Idle: the poller parks itself (nothing marks activity here).
        while !PROCESS.sleeping.load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
        mark();
        assert!(!PROCESS.sleeping.load(Ordering::Relaxed), "a mark wakes it");
        // Awake, it spins through its window, then parks again: a daemon
        // without IO does not spin.
        while !PROCESS.sleeping.load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }
    }
}
