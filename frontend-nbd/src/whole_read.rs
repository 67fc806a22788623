//! Large READs run whole on a pool thread: read from the backend and sent
//! from there, under the connection's writer lock. One thread doing every
//! READ's read and send in turn was saturated at about 500 µs of CPU per
//! MiB over TCP on loopback (perf: the `pread` copy 29%, the send copy
//! 19%, and 19% delivering the segments to the client's socket). With one
//! READ at a time whole on a pool thread and the next ones read by the
//! connection's thread meanwhile, one READ's read overlaps another's send,
//! and each READ's data is still in the sending core's cache. READs of a
//! MiB or more instead wait for the pool thread, in order: see
//! [`WHOLE_QUEUE_MIN`]; those whose pages are cached are sent from the
//! export file's mapping, one copy instead of two.

use crate::socket::ReplySink;
use crate::target::Completion;
use crate::turns::{Offer, Turns};
use braid_core::server::{Backend, BackendOp, MappedRange};
use bytes::BytesMut;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// READs at least this large that find the pool thread busy wait for it
/// in the connection's queue, rather than run beside it. Sent by the
/// writer task, such a reply leaves in pieces as the socket makes room,
/// each wait polled, while the pool thread blocks on the same socket; the
/// two senders then cost more CPU than one sending everything. fio, 1 MiB
/// READs at QD8 against `braid serve`, four alternations, MiB/s (server
/// CPU): over a unix socket, sequential 1381-1971 -> 1948-2233, random
/// 1370-1768 -> 1687-2189; over loopback TCP, sequential 1728-1967 (111-
/// 115%) -> 1818-2193 (98-102%), random 2023-2417 (113-119%) -> 2062-2236
/// (94-103%); nbd-server over unix beside them 1790-2118. Below this the
/// two streams win: 256 KiB over TCP 2126-2249 overlapping, 1693-1765
/// queued; 64 KiB over unix 1495-1614 against 732-871.
pub(crate) const WHOLE_QUEUE_MIN: u32 = 1 << 20;

/// Makes a READ's reply header for the length of data read.
type ReplyHead = Box<dyn FnOnce(usize) -> BytesMut + Send>;

/// A large READ to run whole.
struct WholeRead {
    export: usize,
    offset: u64,
    len: u32,
    head: ReplyHead,
    done: Completion,
}

/// What a connection needs to run large READs whole elsewhere.
pub(crate) struct WholeReads(Arc<Shared>);

/// What the connection and the pool thread running its READs share.
struct Shared {
    export_name: Arc<str>,
    backend: Arc<dyn Backend>,
    writer: SharedWriter,
    abandoned: Arc<AtomicBool>,
    /// One large READ of the connection runs whole at a time; smaller
    /// ones that find it busy are read where they arrive (and sent by the
    /// writer task) meanwhile. Two streams of reads and sends is what
    /// overlaps; more only added switching between threads on two cores
    /// (perf: 12% in `finish_task_switch`). 1 MiB READs at QD8, two
    /// alternations: inline 1932-1990 MiB/s; one at a time 2145-2156; two
    /// 2010-2072; unbounded 1848-1861.
    turns: Turns<WholeRead>,
    failure: Mutex<Option<io::Error>>,
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
        let shared = Shared {
            export_name: export_name.into(),
            backend,
            writer: writer.clone(),
            abandoned: abandoned.clone(),
            turns: Turns::default(),
            failure: Mutex::default(),
        };
        Some((WholeReads(Arc::new(shared)), AbandonOnDrop(abandoned)))
    }

    /// Reads `[offset, offset + len)` of `export` and sends it behind the
    /// header `head(len)` makes, on a pool thread. A failed read is
    /// answered through `done`, which is dropped (its budget given back)
    /// once the reply is sent. If one is running already, a READ of
    /// [`WHOLE_QUEUE_MIN`] or more waits for it and a smaller one's `done`
    /// comes back: the caller runs it its usual way.
    pub(crate) fn try_spawn(
        &self,
        export: usize,
        offset: u64,
        len: u32,
        head: impl FnOnce(usize) -> BytesMut + Send + 'static,
        done: Completion,
    ) -> Result<(), Completion> {
        let read = WholeRead {
            export,
            offset,
            len,
            head: Box::new(head),
            done,
        };
        match self.0.turns.offer(read, len >= WHOLE_QUEUE_MIN) {
            Offer::Start(read) => {
                let shared = self.0.clone();
                tokio::task::spawn_blocking(move || {
                    shared.turns.run(read, |read| shared.read_and_send(read))
                });
                Ok(())
            }
            Offer::Queued => Ok(()),
            Offer::Busy(read) => Err(read.done),
        }
    }

    /// The first failure to send a reply, if any: the connection's error.
    pub(crate) fn failure(&self) -> Option<io::Error> {
        self.0.failure.lock().unwrap().take()
    }
}

impl Shared {
    fn read_and_send(&self, read: WholeRead) {
        let WholeRead {
            export,
            offset,
            len,
            head,
            done,
        } = read;
        // A connection that has ended or failed reads nothing more; its
        // READs' budgets go back as they are dropped.
        if self.abandoned.load(Ordering::Acquire) || self.failure.lock().unwrap().is_some() {
            return;
        }
        let what = || {
            format!(
                "export {}: READ at offset {offset} length {len}",
                self.export_name
            )
        };
        // Cached bytes go from the file's mapping: the kernel copies them
        // once, into the socket. Only for READs that queue for this
        // thread: below that the copy out of the mapping, done under the
        // writer lock, held up the READs sent beside this one (fio, 256 KiB
        // random READs at QD8 over loopback TCP, three alternations:
        // 1542-2199 MiB/s read and sent, 1148-1610 from the mapping).
        let mapped = (len >= WHOLE_QUEUE_MIN)
            .then(|| self.backend.mapped_source(export, offset, len))
            .flatten();
        let read;
        let data = match &mapped {
            Some(range) => ReplyData::Mapped(range),
            None => match self
                .backend
                .execute(export, &BackendOp::Read { offset, len })
            {
                Ok(bytes) => {
                    read = bytes;
                    ReplyData::Memory(&read)
                }
                Err(status) => return done(Err(status)),
            },
        };
        let head = head(data.len());
        send_whole(
            &self.writer,
            &head,
            data,
            &self.abandoned,
            &self.failure,
            what,
        );
        drop(done);
    }
}

/// A reply's data: in memory, or in the backing file's mapping.
pub(crate) enum ReplyData<'a> {
    Memory(&'a [u8]),
    Mapped(&'a MappedRange),
}

impl ReplyData<'_> {
    fn len(&self) -> usize {
        match self {
            ReplyData::Memory(data) => data.len(),
            ReplyData::Mapped(range) => range.len(),
        }
    }

    fn iovec(&self) -> libc::iovec {
        match self {
            ReplyData::Memory(data) => iovec(data.as_ptr(), data.len()),
            ReplyData::Mapped(range) => iovec(range.addr(), range.len()),
        }
    }
}

fn iovec(base: *const u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base as *mut libc::c_void,
        iov_len: len,
    }
}

/// Writes one whole reply, `head` then `data`, under the connection's
/// writer lock from a thread that may block; a failure (named by `what`)
/// ends the connection and is kept for its task to report.
pub(crate) fn send_whole(
    writer: &SharedWriter,
    head: &[u8],
    data: ReplyData<'_>,
    abandoned: &AtomicBool,
    failure: &Mutex<Option<io::Error>>,
    what: impl FnOnce() -> String,
) {
    let wr = writer.blocking_lock();
    // The writer task flushes before it lets go, so its buffer is empty
    // unless its last write failed: the stream is broken.
    let sent = if wr.buffer().is_empty() {
        let mut bufs = [iovec(head.as_ptr(), head.len()), data.iovec()];
        wr.get_ref().write_all_blocking(&mut bufs, abandoned)
    } else {
        Err(io::Error::other("an earlier reply was left half-written"))
    };
    if let Err(e) = sent {
        let e = match (&data, e.raw_os_error()) {
            // The header has gone and the data cannot follow: the
            // connection ends, and its client asks again elsewhere.
            (ReplyData::Mapped(_), Some(libc::EFAULT)) => io::Error::other(format!(
                "{}: the backing file shrank under the export while its mapped pages were \
                 being sent ({e})",
                what()
            )),
            _ => io::Error::new(e.kind(), format!("{}: {e}", what())),
        };
        wr.get_ref().shut_down();
        failure.lock().unwrap().get_or_insert(e);
    }
}
