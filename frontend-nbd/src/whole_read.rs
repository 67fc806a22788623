//! Large READs run whole on a pool thread: read from the backend and sent
//! from there, under the connection's writer lock. One thread doing every
//! READ's read and send in turn was saturated at about 500 µs of CPU per
//! MiB over TCP on loopback (perf: the `pread` copy 29%, the send copy
//! 19%, and 19% delivering the segments to the client's socket). With one
//! READ at a time whole on a pool thread and the next ones read by the
//! connection's thread meanwhile, one READ's read overlaps another's send,
//! and each READ's data is still in the sending core's cache.

use crate::socket::ReplySink;
use crate::target::Completion;
use braid_core::server::{Backend, BackendOp};
use bytes::BytesMut;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::BufWriter;

/// A connection's reply side, shared by its writer task and the pool
/// threads sending large READs; whoever holds it writes whole replies.
pub(crate) type SharedWriter = Arc<tokio::sync::Mutex<BufWriter<ReplySink>>>;

/// READs at least this large run whole on a pool thread. fio, READs at
/// QD8-16 over loopback TCP, two alternations: 64 KiB 888-1086 MiB/s
/// where they were read inline, 1613-1713 with this at 64 KiB, 1062-1070
/// at 256 KiB; 128 KiB 789-1079, 1117-1145, 965-988. At 16 KiB no better
/// than at 64.
pub(crate) const WHOLE_READ_MIN: u32 = 64 * 1024;

/// Large READs of one connection running whole at a time; the next ones
/// are read where they arrive (and sent by the writer task) meanwhile.
/// Two streams of reads and sends is what overlaps; more only added
/// switching between threads on two cores (perf: 12% in
/// `finish_task_switch`). 1 MiB READs at QD8, two alternations: inline
/// 1932-1990 MiB/s; one at a time 2145-2156; two 2010-2072; unbounded
/// 1848-1861.
const WHOLE_READS_AT_ONCE: usize = 1;

/// What a connection needs to run large READs whole elsewhere.
pub(crate) struct WholeReads {
    export_name: Arc<str>,
    backend: Arc<dyn Backend>,
    writer: SharedWriter,
    abandoned: Arc<AtomicBool>,
    running: Arc<AtomicUsize>,
    failure: Arc<Mutex<Option<io::Error>>>,
}

/// Sets the flag when the connection's task ends or is dropped, so a pool
/// thread waiting for the client to make room gives up.
pub(crate) struct AbandonOnDrop(pub(crate) Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl WholeReads {
    /// Large READs for a connection whose replies go to `writer`, if they
    /// can run whole here: on a plain socket (the blocking send needs its
    /// fd) to a local backend. The guard must live as long as the
    /// connection's task.
    pub(crate) fn new(
        export_name: &str,
        backend: Option<Arc<dyn Backend>>,
        writer: &SharedWriter,
        plain_socket: bool,
    ) -> Option<(WholeReads, AbandonOnDrop)> {
        let backend = backend.filter(|_| plain_socket)?;
        let abandoned = Arc::new(AtomicBool::new(false));
        let reads = WholeReads {
            export_name: export_name.into(),
            backend,
            writer: writer.clone(),
            abandoned: abandoned.clone(),
            running: Arc::default(),
            failure: Arc::default(),
        };
        Some((reads, AbandonOnDrop(abandoned)))
    }

    /// Reads `[offset, offset + len)` of `export` and sends it behind the
    /// header `head(len)` makes, on a pool thread. A failed read is
    /// answered through `done`, which is dropped (its budget given back)
    /// once the reply is sent. If [`WHOLE_READS_AT_ONCE`] are running
    /// already, `done` comes back: the caller runs the READ its usual way.
    pub(crate) fn try_spawn(
        &self,
        export: usize,
        offset: u64,
        len: u32,
        head: impl FnOnce(usize) -> BytesMut + Send + 'static,
        done: Completion,
    ) -> Result<(), Completion> {
        if self.running.fetch_add(1, Ordering::AcqRel) >= WHOLE_READS_AT_ONCE {
            self.running.fetch_sub(1, Ordering::AcqRel);
            return Err(done);
        }
        let running = self.running.clone();
        let export_name = self.export_name.clone();
        let backend = self.backend.clone();
        let writer = self.writer.clone();
        let abandoned = self.abandoned.clone();
        let failure = self.failure.clone();
        tokio::task::spawn_blocking(move || {
            let data = match backend.execute(export, &BackendOp::Read { offset, len }) {
                Ok(data) => data,
                Err(status) => {
                    running.fetch_sub(1, Ordering::AcqRel);
                    return done(Err(status));
                }
            };
            let head = head(data.len());
            let what = || format!("export {export_name}: READ at offset {offset} length {len}");
            send_whole(&writer, &head, &data, &abandoned, &failure, what);
            running.fetch_sub(1, Ordering::AcqRel);
            drop(done);
        });
        Ok(())
    }

    /// The first failure to send a reply, if any: the connection's error.
    pub(crate) fn failure(&self) -> Option<io::Error> {
        self.failure.lock().unwrap().take()
    }
}

/// Writes one whole reply, `head` then `data`, under the connection's
/// writer lock from a thread that may block; a failure (named by `what`)
/// ends the connection and is kept for its task to report.
pub(crate) fn send_whole(
    writer: &SharedWriter,
    head: &[u8],
    data: &[u8],
    abandoned: &AtomicBool,
    failure: &Mutex<Option<io::Error>>,
    what: impl FnOnce() -> String,
) {
    let wr = writer.blocking_lock();
    // The writer task flushes before it lets go, so its buffer is empty
    // unless its last write failed: the stream is broken.
    let sent = if wr.buffer().is_empty() {
        let mut bufs = [io::IoSlice::new(head), io::IoSlice::new(data)];
        wr.get_ref().write_all_blocking(&mut bufs, abandoned)
    } else {
        Err(io::Error::other("an earlier reply was left half-written"))
    };
    if let Err(e) = sent {
        let e = io::Error::new(e.kind(), format!("{}: {e}", what()));
        wr.get_ref().shut_down();
        failure.lock().unwrap().get_or_insert(e);
    }
}
