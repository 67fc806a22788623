//! The transmission phase: requests are read in order, run concurrently
//! and answered as they finish, in simple or structured replies.

use crate::negotiate::{protocol_error, Negotiated};
use crate::proto::*;
use crate::socket::{self, ReplySink, RequestSource};
use crate::target::Target;
use crate::whole_read::{SharedWriter, WholeReads, WHOLE_READ_MIN};
use crate::whole_send::WholeSends;
use crate::NbdExport;
use braid_core::server::{BackendOp, Extent, MappedSink, SpliceSource};
use braid_core::staging::StagedBuffer;
use braid_core::wire::Status;
use bytes::{BufMut, Bytes, BytesMut};
use std::future::Future;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// Bytes of requests and replies one connection may have in flight (in
/// KiB permits). A client that pipelines more waits for answers, so no
/// client can make the server buffer without bound.
const INFLIGHT_KIB: u32 = 64 * 1024;
/// What any request counts against that budget at least, so a client also
/// cannot queue unbounded numbers of small or data-less requests (at most
/// 4096 in flight per connection).
const REQUEST_MIN_KIB: u32 = 16;

/// READs at least this large are sent with `sendfile` where they can be
/// (a plain socket, a file whose pages are cached): below it the extra
/// system call for the header costs more than the copy it saves.
const SENDFILE_MIN: u32 = 64 * 1024;

/// READ replies with at least this much data in memory are sent from a
/// pool thread where they can be (see `whole_send`). Such a reply is
/// more than twice a unix socket's send buffer (208 KiB by default), so
/// it waits for the client to read several times over, and sent inline
/// the thread that received it waited with it. fio through `braid
/// attach` over a unix socket, READs at QD8, three alternations, MiB/s:
/// 1 MiB 966-1107 -> 1663-1759, 512 KiB 1073-1581 -> 1463-1733, 1 MiB at
/// QD2 1243-1374 -> 1701-1893. Smaller ones lost: from 64 KiB up, 128 KiB
/// READs 957-1082 -> 815-1055; from 256 KiB up, 256 KiB READs 1335-1379
/// -> 1125-1467.
const WHOLE_SEND_MIN: usize = 512 * 1024;

/// Replies gathered into one write at most: two slices each, far under
/// the kernel's 1024 per `writev`.
const REPLY_BATCH: usize = 64;

/// One reply, ready to send: a header and an optional payload sent after
/// it without copying, or (for a large READ) the file range the kernel
/// sends its payload from.
struct Reply {
    head: BytesMut,
    data: Bytes,
    file: Option<(SpliceSource, usize)>,
}

/// How one request's replies are framed.
#[derive(Clone, Copy)]
struct Replier {
    handle: u64,
    structured: bool,
}

impl Replier {
    fn simple(self, error: u32, data: Bytes) -> Reply {
        let mut head = BytesMut::with_capacity(16);
        head.put_u32(SIMPLE_REPLY_MAGIC);
        head.put_u32(error);
        head.put_u64(self.handle);
        Reply {
            head,
            data,
            file: None,
        }
    }

    fn chunk(self, ty: u16, payload_len: usize, extra: usize) -> BytesMut {
        let mut head = BytesMut::with_capacity(20 + extra);
        head.put_u32(STRUCTURED_REPLY_MAGIC);
        head.put_u16(REPLY_FLAG_DONE);
        head.put_u16(ty);
        head.put_u64(self.handle);
        head.put_u32(payload_len as u32);
        head
    }

    fn ok(self) -> Reply {
        // "If structured replies have been negotiated, a simple reply MAY
        // be used as a reply to any request other than READ" without data.
        self.simple(0, Bytes::new())
    }

    fn error(self, error: u32, message: &str) -> Reply {
        if !self.structured {
            return self.simple(error, Bytes::new());
        }
        // "The server SHOULD prefer sending errors via a structured reply,
        // as the error can then be accompanied by a string."
        let msg = &message.as_bytes()[..message.len().min(STRING_MAX)];
        let mut head = self.chunk(REPLY_TYPE_ERROR, 6 + msg.len(), 6 + msg.len());
        head.put_u32(error);
        head.put_u16(msg.len() as u16);
        head.put_slice(msg);
        Reply {
            head,
            data: Bytes::new(),
            file: None,
        }
    }

    fn read_data(self, offset: u64, data: Bytes) -> Reply {
        if self.structured && data.is_empty() {
            // Nothing to cover: a zero-length read.
            let head = self.chunk(REPLY_TYPE_NONE, 0, 0);
            return Reply {
                head,
                data,
                file: None,
            };
        }
        Reply {
            head: self.read_head(offset, data.len()),
            data,
            file: None,
        }
    }

    /// A READ's reply whose `len` bytes of data the writer sends from
    /// `src` (never zero-length: those take [`Replier::read_data`]).
    fn read_file(self, offset: u64, src: SpliceSource, len: usize) -> Reply {
        Reply {
            head: self.read_head(offset, len),
            data: Bytes::new(),
            file: Some((src, len)),
        }
    }

    /// The header in front of `len` bytes of READ data: a simple reply, or
    /// one content chunk marked final (nothing can fail once the data is
    /// in hand).
    fn read_head(self, offset: u64, len: usize) -> BytesMut {
        if !self.structured {
            return self.simple(0, Bytes::new()).head;
        }
        let mut head = self.chunk(REPLY_TYPE_OFFSET_DATA, 8 + len, 8);
        head.put_u64(offset);
        head
    }

    fn block_status(self, extents: &[Extent], req_one: bool, len: u32) -> Reply {
        let mut descriptors: Vec<(u32, u32)> = Vec::new();
        let mut covered = 0u64;
        for e in extents {
            let n = e.len.min(u64::from(len) - covered) as u32;
            if n == 0 {
                break;
            }
            // Holes in a file read as zeroes (the backend contract).
            let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
            descriptors.push((n, flags));
            covered += u64::from(n);
            if req_one || descriptors.len() == EXTENTS_MAX {
                break;
            }
        }
        if descriptors.is_empty() {
            // "The server MUST return at least one status descriptor"; 0 is
            // always a safe status.
            descriptors.push((len, 0));
        }
        let payload = 4 + 8 * descriptors.len();
        let mut head = self.chunk(REPLY_TYPE_BLOCK_STATUS, payload, payload);
        head.put_u32(BASE_ALLOCATION_ID);
        for (n, flags) in descriptors {
            head.put_u32(n);
            head.put_u32(flags);
        }
        Reply {
            head,
            data: Bytes::new(),
            file: None,
        }
    }
}

fn errno(status: Status) -> u32 {
    match status {
        Status::Ok => 0,
        Status::NoSpace => ENOSPC,
        Status::ReadOnly => EPERM,
        Status::Invalid | Status::OutOfRange => EINVAL,
        Status::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// A request header.
struct Request {
    flags: u16,
    cmd: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

impl Request {
    fn parse(h: &[u8; 28]) -> io::Result<Request> {
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(protocol_error(format!("bad request magic {magic:#x}")));
        }
        Ok(Request {
            flags: u16::from_be_bytes([h[4], h[5]]),
            cmd: u16::from_be_bytes([h[6], h[7]]),
            handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(h[24..28].try_into().unwrap()),
        })
    }
}

/// What to do with a request that passed the checks.
enum Action {
    /// Answer success at once (CACHE, zero-length IO).
    Done,
    Io(BackendOp),
    BlockStatus {
        req_one: bool,
    },
}

pub(crate) async fn transmit(
    n: Negotiated,
    target: Arc<dyn Target>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let Negotiated {
        stream,
        export,
        structured,
        block_status,
    } = n;
    let fast_zero = target.fast_zero();
    let staging = target.write_staging();
    let waiting = target.clone();
    let (rd, wr) = socket::split(stream, Box::new(move || waiting.client_wait()));
    let send_files = wr.can_send_file();
    let large_writes_inline = rd.buffers_large_requests();
    let mut rd = BufReader::with_capacity(128 * 1024, rd);
    let plain_socket = wr.is_plain();
    let (tx, rx) = mpsc::unbounded_channel::<(Reply, OwnedSemaphorePermit)>();
    let export_name = export.name.clone();
    let sink: SharedWriter = Arc::new(tokio::sync::Mutex::new(BufWriter::with_capacity(
        256 * 1024,
        wr,
    )));
    // Where sendfile is not used on a plain socket (a client on this
    // machine) large READs run whole on a pool thread, one at a time.
    let whole_reads = (!send_files)
        .then(|| WholeReads::new(&export.name, target.local_backend(), &sink, plain_socket))
        .flatten();
    let (whole_reads, _abandon) = whole_reads.unzip();
    // Where the target has no backend here (`braid attach`), large READs'
    // data is sent to a unix socket from a pool thread.
    let whole_sends = match target.local_backend() {
        Some(_) => None,
        None => WholeSends::new(&export.name, sink.lock().await.get_ref(), &sink),
    };
    let (whole_sends, _abandon_sends) = whole_sends.unzip();
    let writer = tokio::spawn(write_replies_until_done(rx, sink, export_name));
    let budget = Arc::new(Semaphore::new(INFLIGHT_KIB as usize));
    let mut after_large_write = false;
    let ended = loop {
        let mut h = [0u8; 28];
        // After a large WRITE the next request is likely another: its
        // header is read alone, so the reader's buffer does not take in
        // the start of its payload only to copy it out again.
        let unbuffered = after_large_write && rd.buffer().is_empty();
        let header = async {
            if unbuffered {
                rd.get_mut().read_exact(&mut h).await
            } else {
                rd.read_exact(&mut h).await
            }
        };
        let read = tokio::select! {
            r = header => r,
            // "On a server shutdown, the server SHOULD wait for inflight
            // requests to be serviced": stop taking new ones and drain.
            _ = shutdown.wait_for(|down| *down) => break Ok(()),
        };
        if let Err(e) = read {
            break if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        let req = match Request::parse(&h) {
            Ok(req) => req,
            // Cannot find the next request: a hard disconnect.
            Err(e) => break Err(e),
        };
        let replier = Replier {
            handle: req.handle,
            structured,
        };
        // Budget is taken before the payload is read and given back only
        // once the reply is written: a client that floods requests, or
        // stops reading replies, stalls its own connection, not the server.
        let kib = if matches!(req.cmd, CMD_READ | CMD_WRITE) && req.len <= export.block_max {
            (req.len / 1024).clamp(REQUEST_MIN_KIB, INFLIGHT_KIB)
        } else {
            REQUEST_MIN_KIB
        };
        let Ok(permit) = budget.clone().acquire_many_owned(kib).await else {
            break Ok(());
        };
        let mut payload = Bytes::new();
        // Bytes of a WRITE received straight into the file before the
        // kernel could take no more there; `payload` holds the rest.
        let mut received_mapped = 0usize;
        after_large_write = false;
        if req.cmd == CMD_WRITE {
            if req.len > export.block_max {
                // Skip the data to stay in step, then refuse: the client
                // keeps its connection.
                let skipped = tokio::io::copy(
                    &mut (&mut rd).take(u64::from(req.len)),
                    &mut tokio::io::sink(),
                )
                .await;
                match skipped {
                    Ok(n) if n == u64::from(req.len) => {}
                    Ok(_) => break Ok(()),
                    Err(e) => break Err(e),
                }
                let msg = format!(
                    "export {}: WRITE of {} bytes is over the {}-byte maximum",
                    export.name, req.len, export.block_max
                );
                let _ = tx.send((replier.error(EINVAL, &msg), permit));
                continue;
            }
            let len = req.len as usize;
            after_large_write = crate::target::is_large_write(len);
            let sink = (after_large_write && rd.buffer().is_empty() && rd.get_ref().is_plain())
                .then(|| mapped_write(&*target, &export, &req, structured))
                .flatten();
            if let Some(sink) = sink {
                match noting_waits(receive_mapped(rd.get_mut(), &sink), &*target).await {
                    Ok(()) => {
                        drop(sink);
                        let _ = tx.send((replier.ok(), permit));
                        continue;
                    }
                    Err((got, e)) if e.raw_os_error() == Some(libc::EFAULT) => {
                        // The file's pages took no more (it shrank behind
                        // the export's back): the rest goes the ordinary
                        // way, whose write says what is wrong.
                        tracing::warn!(
                            export = %export.name,
                            offset = req.offset + got as u64,
                            "a WRITE's payload could not be received into the file's mapping: writing the rest from memory"
                        );
                        received_mapped = got;
                    }
                    Err((_, e)) => break Err(e),
                }
            }
            let len = len - received_mapped;
            let received = match staging.as_ref().and_then(|s| s.buffer(len)) {
                Some(staged) => noting_waits(receive_staged(&mut rd, staged), &*target).await,
                None => noting_waits(receive(&mut rd, len), &*target).await,
            };
            match received {
                Ok(data) => payload = data,
                Err(e) => break Err(e),
            }
        }
        if req.cmd == CMD_DISC {
            // "The server MUST handle all outstanding requests" and close.
            break Ok(());
        }
        let action = match check(&export, &req, structured, block_status, fast_zero) {
            Ok(a) => a,
            Err((error, why)) => {
                let msg = format!(
                    "export {}: {} at offset {} length {}: {why}",
                    export.name,
                    cmd_name(req.cmd),
                    req.offset,
                    req.len
                );
                tracing::debug!(handle = req.handle, error, "{msg}");
                let _ = tx.send((replier.error(error, &msg), permit));
                continue;
            }
        };
        let op = match action {
            Action::Done => {
                let reply = if req.cmd == CMD_READ {
                    replier.read_data(req.offset, Bytes::new())
                } else {
                    replier.ok()
                };
                let _ = tx.send((reply, permit));
                continue;
            }
            Action::Io(BackendOp::Write { offset, fua, .. }) => BackendOp::Write {
                offset: offset + received_mapped as u64,
                data: payload,
                fua,
            },
            Action::Io(op) => op,
            Action::BlockStatus { req_one } => {
                let tx = tx.clone();
                let (name, offset, len) = (export.name.clone(), req.offset, req.len);
                target.allocation(
                    export.backend_index,
                    offset,
                    u64::from(len),
                    Box::new(move |result| {
                        let reply = match result {
                            Ok(extents) => replier.block_status(&extents, req_one, len),
                            Err(status) => replier.error(
                                errno(status),
                                &format!(
                                    "export {name}: BLOCK_STATUS at offset {offset}: {status:?}"
                                ),
                            ),
                        };
                        let _ = tx.send((reply, permit));
                    }),
                );
                continue;
            }
        };
        if let BackendOp::Read { offset, len } = op {
            let spliced = (send_files && len >= SENDFILE_MIN)
                .then(|| target.splice_read(export.backend_index, offset, len))
                .flatten();
            if let Some(src) = spliced {
                let _ = tx.send((replier.read_file(offset, src, len as usize), permit));
                continue;
            }
        }
        let done = reply_when_done(
            &req,
            replier,
            &export.name,
            whole_sends.clone(),
            (permit, tx.clone()),
        );
        let done = match (&whole_reads, &op) {
            (Some(whole), BackendOp::Read { offset, len }) if *len >= WHOLE_READ_MIN => {
                let offset = *offset;
                let head = move |len| replier.read_head(offset, len);
                match whole.try_spawn(export.backend_index, offset, *len, head, done) {
                    Ok(()) => continue,
                    Err(done) => done,
                }
            }
            _ => done,
        };
        // A large WRITE is written from here when the kernel takes it at
        // once and the client can keep sending meanwhile: its data is
        // still in this core's cache. 1 MiB writes at QD8 over TCP, five
        // alternations: 2080-2377 -> 2214-2526 MiB/s, server CPU per MiB
        // about 470 -> 385 us. (Small ones always are: see the target.)
        if large_writes_inline && after_large_write {
            if let Some(result) = target.try_now(export.backend_index, &op) {
                done(result);
                continue;
            }
        }
        target.submit(export.backend_index, op, done);
    };
    // Every completion holds a sender: the writer ends after the last
    // outstanding request is answered.
    drop(tx);
    let written = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    let sent_whole = whole_reads.and_then(|w| w.failure()).map_or(Ok(()), Err);
    let sent_from_memory = whole_sends.and_then(|w| w.failure()).map_or(Ok(()), Err);
    ended.and(written).and(sent_whole).and(sent_from_memory)
}

/// The connection's writer: replies as they come, batched into as few
/// writes as are ready, each reply's budget given back once written;
/// ends when every sender is gone (each completion holds one).
async fn write_replies_until_done(
    mut rx: mpsc::UnboundedReceiver<(Reply, OwnedSemaphorePermit)>,
    sink: SharedWriter,
    export_name: String,
) -> io::Result<()> {
    let written = async {
        // Each reply's budget goes back once it is written (the permits
        // are dropped as the batch is cleared).
        let mut batch = Vec::with_capacity(REPLY_BATCH);
        while let Some(first) = rx.recv().await {
            let mut wr = sink.lock().await;
            batch.push(first);
            // Whatever else is ready goes in the same write.
            loop {
                while batch.len() < REPLY_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let full = batch.len() == REPLY_BATCH;
                write_replies(&mut wr, &batch, &export_name).await?;
                batch.clear();
                if !full {
                    break;
                }
            }
            wr.flush().await?;
        }
        sink.lock().await.shutdown().await
    }
    .await;
    if written.is_err() {
        // A reply left half-sent: the stream cannot go on. Pool
        // threads sending large READs share the socket, so it is
        // ended here rather than when the last user lets go of it.
        sink.lock().await.get_ref().shut_down();
    }
    written
}

/// The completion of request `req`'s backend IO: its reply, with the
/// request's budget, to the writer (a large READ's data through
/// `whole_sends` where there is one).
fn reply_when_done(
    req: &Request,
    replier: Replier,
    name: &str,
    whole_sends: Option<Arc<WholeSends>>,
    (permit, tx): (
        OwnedSemaphorePermit,
        mpsc::UnboundedSender<(Reply, OwnedSemaphorePermit)>,
    ),
) -> crate::Completion {
    let name = name.to_string();
    let (cmd, offset, len) = (req.cmd, req.offset, req.len);
    Box::new(move |result| {
        let reply = match result {
            Ok(data) if cmd == CMD_READ && data.len() >= WHOLE_SEND_MIN => {
                if let Some(whole) = &whole_sends {
                    // The reply's budget and a sender (which keeps the
                    // writer task from closing the socket) go with it.
                    let head = replier.read_head(offset, data.len());
                    whole.send(head, data, offset, (permit, tx.clone()));
                    return;
                }
                replier.read_data(offset, data)
            }
            Ok(data) if cmd == CMD_READ => replier.read_data(offset, data),
            Ok(_) => replier.ok(),
            Err(status) => replier.error(
                errno(status),
                &format!(
                    "export {name}: {} at offset {offset} length {len}: {status:?}",
                    cmd_name(cmd)
                ),
            ),
        };
        let _ = tx.send((reply, permit));
    })
}

/// Writes a batch of replies. On a plain socket each reply's header and
/// data go from where they are, in as few `writev`s as the socket allows;
/// the buffer, empty between batches, is only used under TLS, where every
/// write becomes a record and small ones must be gathered first. Copying
/// 4 KiB READ replies into the buffer was 5% of `braid attach`'s samples
/// under fio's 4k random reads at QD32 x4.
async fn write_replies(
    wr: &mut BufWriter<ReplySink>,
    batch: &[(Reply, OwnedSemaphorePermit)],
    export: &str,
) -> io::Result<()> {
    if !wr.get_ref().is_plain() {
        for (r, _) in batch {
            write_reply(wr, r, export).await?;
        }
        return Ok(());
    }
    debug_assert!(wr.buffer().is_empty(), "flushed after every batch");
    let mut slices = Vec::with_capacity(2 * batch.len());
    for (r, _) in batch {
        slices.push(io::IoSlice::new(&r.head));
        if !r.data.is_empty() {
            slices.push(io::IoSlice::new(&r.data));
        }
        if let Some((src, len)) = &r.file {
            // Its data follows from the file, after all that is before it.
            write_all_vectored(wr.get_mut(), &mut slices).await?;
            send_reply_file(wr.get_mut(), src, *len, export).await?;
        }
    }
    write_all_vectored(wr.get_mut(), &mut slices).await
}

/// Writes every byte of `slices` (and empties it). fabric-tcp's
/// `write_parts` is the same loop with its own wait hook; this crate does
/// not depend on a fabric, so each keeps its own.
async fn write_all_vectored(
    wr: &mut ReplySink,
    slices: &mut Vec<io::IoSlice<'_>>,
) -> io::Result<()> {
    let mut left = &mut slices[..];
    while !left.is_empty() {
        let n = wr.write_vectored(left).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut left, n);
    }
    slices.clear();
    Ok(())
}

/// Writes one reply into the buffer; one sent from a file flushes what is
/// buffered first (its header with it) and then has the kernel send the
/// data.
async fn write_reply(wr: &mut BufWriter<ReplySink>, r: &Reply, export: &str) -> io::Result<()> {
    wr.write_all(&r.head).await?;
    wr.write_all(&r.data).await?;
    if let Some((src, len)) = &r.file {
        wr.flush().await?;
        send_reply_file(wr.get_mut(), src, *len, export).await?;
    }
    Ok(())
}

/// Sends a READ reply's data from the file; its header must be sent.
async fn send_reply_file(
    sink: &mut ReplySink,
    src: &SpliceSource,
    len: usize,
    export: &str,
) -> io::Result<()> {
    sink.send_file(src, len).await.map_err(|e| {
        let e = io::Error::new(e.kind(), format!("export {export}: READ by sendfile: {e}"));
        if e.kind() == io::ErrorKind::UnexpectedEof {
            // The file, not the client: the operator must hear of it.
            tracing::warn!(error = %e, "closing an NBD connection mid-reply");
        }
        e
    })
}

/// Validates a request against the export and what was negotiated. The
/// error is the spec's errno with a reason for humans.
fn check(
    e: &NbdExport,
    r: &Request,
    structured: bool,
    block_status: bool,
    fast_zero: bool,
) -> Result<Action, (u32, &'static str)> {
    // "The server SHOULD return EINVAL if it receives an unknown command
    // flag ... or a flag not documented as applicable to the command."
    // FUA "is valid for all commands".
    let allowed = CMD_FLAG_FUA
        | match r.cmd {
            CMD_READ if structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES if fast_zero => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if !matches!(
        r.cmd,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    ) {
        return Err((EINVAL, "unknown command"));
    }
    if r.flags & !allowed != 0 {
        return Err((EINVAL, "flag not valid for this command"));
    }
    let fua = r.flags & CMD_FLAG_FUA != 0;
    if r.cmd == CMD_FLUSH {
        // "length and offset are reserved, and MUST be set to all-zero."
        if r.offset != 0 || r.len != 0 {
            return Err((EINVAL, "FLUSH with nonzero offset or length"));
        }
        return Ok(Action::Io(BackendOp::Flush));
    }
    if r.cmd == CMD_BLOCK_STATUS && !block_status {
        // "A client MUST NOT use BLOCK_STATUS unless it selected a nonzero
        // number of metadata contexts ... Servers SHOULD reply EINVAL."
        return Err((EINVAL, "no metadata context was selected"));
    }
    let mutates = matches!(r.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if mutates && e.read_only {
        // "SHOULD return EPERM if it receives a write or trim request on a
        // read-only export."
        return Err((EPERM, "export is read-only"));
    }
    let end = r.offset.checked_add(u64::from(r.len));
    if end.is_none_or(|end| end > e.size) {
        // "SHOULD return ENOSPC if it receives a write request including
        // one or more sectors beyond the size of the device"; EINVAL for
        // the rest.
        return Err(if matches!(r.cmd, CMD_WRITE | CMD_WRITE_ZEROES) {
            (ENOSPC, "past the end of the export")
        } else {
            (EINVAL, "past the end of the export")
        });
    }
    // The maximum block size bounds payloads (READ, WRITE); TRIM,
    // WRITE_ZEROES, CACHE and BLOCK_STATUS may be longer.
    if r.cmd == CMD_READ && r.len > e.block_max {
        return Err((EINVAL, "longer than the advertised maximum block size"));
    }
    // "If a client sends a request that is not aligned to the minimum block
    // size, the server SHOULD report EINVAL." BLOCK_STATUS only reads
    // metadata, so any range is fine.
    let misaligned = (r.offset | u64::from(r.len)) & u64::from(e.block_min - 1) != 0;
    if misaligned && r.cmd != CMD_BLOCK_STATUS {
        return Err((EINVAL, "not aligned to the minimum block size"));
    }
    if r.len == 0 {
        // Zero-length requests are unspecified; a no-op success harms no
        // one. BLOCK_STATUS must describe at least one byte.
        return if r.cmd == CMD_BLOCK_STATUS {
            Err((EINVAL, "zero-length BLOCK_STATUS"))
        } else {
            Ok(Action::Done)
        };
    }
    let (offset, len) = (r.offset, r.len);
    Ok(match r.cmd {
        CMD_READ => Action::Io(BackendOp::Read { offset, len }),
        CMD_WRITE => Action::Io(BackendOp::Write {
            offset,
            data: Bytes::new(),
            fua,
        }),
        CMD_TRIM => Action::Io(BackendOp::Trim { offset, len, fua }),
        CMD_WRITE_ZEROES => Action::Io(BackendOp::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap: r.flags & CMD_FLAG_NO_HOLE == 0,
            fast_only: r.flags & CMD_FLAG_FAST_ZERO != 0,
        }),
        // A hint; the page cache does this for us.
        CMD_CACHE => Action::Done,
        _ => Action::BlockStatus {
            req_one: r.flags & CMD_FLAG_REQ_ONE != 0,
        },
    })
}

/// Where the target would have `req`'s payload received straight into its
/// file (see [`Target::mapped_write`]): a large WRITE that passed the
/// checks, without FUA (the mapping promises nothing durable).
fn mapped_write(
    target: &dyn Target,
    export: &NbdExport,
    req: &Request,
    structured: bool,
) -> Option<MappedSink> {
    if req.cmd != CMD_WRITE || req.flags & CMD_FLAG_FUA != 0 {
        return None;
    }
    match check(export, req, structured, false, false) {
        Ok(Action::Io(BackendOp::Write { offset, .. })) => {
            target.mapped_write(export.backend_index, offset, req.len)
        }
        _ => None,
    }
}

/// Runs `transfer`, telling `target` each time it waits for the client.
async fn noting_waits<F: Future>(transfer: F, target: &dyn Target) -> F::Output {
    let mut transfer = std::pin::pin!(transfer);
    std::future::poll_fn(|cx| {
        let poll = transfer.as_mut().poll(cx);
        if poll.is_pending() {
            target.client_wait();
        }
        poll
    })
    .await
}

/// A WRITE's data, read onto the heap.
async fn receive(rd: &mut BufReader<RequestSource>, len: usize) -> io::Result<Bytes> {
    // Read into spare capacity: zeroing a 1 MiB buffer first cost as much
    // as a copy (perf: memset was 9% of a sequential run).
    let mut buf = BytesMut::with_capacity(len);
    drain_buffered(rd, &mut buf, len);
    let rest = len - buf.len();
    read_payload(rd.get_mut(), &mut buf, rest).await?;
    Ok(buf.freeze())
}

/// A WRITE's data, read straight into the target's staged buffer.
async fn receive_staged(
    rd: &mut BufReader<RequestSource>,
    mut staged: Box<dyn StagedBuffer>,
) -> io::Result<Bytes> {
    let mut unfilled = staged.bytes_mut();
    let len = unfilled.len();
    drain_buffered(rd, &mut unfilled, len);
    let rest = unfilled.len();
    read_payload(rd.get_mut(), &mut unfilled, rest).await?;
    Ok(staged.into_bytes())
}

/// A payload's rest at least this large is read with the connection's
/// wake-ups held back until it has all arrived.
const LOW_WATER_MIN: usize = 128 * 1024;

/// Reads the next `len` bytes of the socket into `dst`.
async fn read_payload(
    socket: &mut RequestSource,
    dst: &mut impl BufMut,
    len: usize,
) -> io::Result<()> {
    let mut low_water = LowWater::new();
    let mut got = 0;
    while got < len {
        let want = len - got;
        low_water.expect(socket, want);
        let mut window = (&mut *dst).limit(want);
        match socket.read_buf(&mut window).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    low_water.reset(socket);
    Ok(())
}

/// Receives a WRITE's whole payload from the socket straight into `sink`,
/// the export's file. `Err` says how many bytes went in before it.
async fn receive_mapped(
    socket: &mut RequestSource,
    sink: &MappedSink,
) -> Result<(), (usize, io::Error)> {
    let len = sink.len();
    let mut low_water = LowWater::new();
    let mut got = 0;
    while got < len {
        low_water.expect(socket, len - got);
        match socket.receive_mapped(sink, got, len - got).await {
            Ok(0) => return Err((got, io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) => {
                // The connection may go on (see the transmit loop).
                low_water.reset(socket);
                return Err((got, e));
            }
        }
    }
    low_water.reset(socket);
    Ok(())
}

/// A connection's receive low-water mark through one payload. Over TCP
/// each of a 1 MiB WRITE's 17-30 segments would wake the connection (and
/// on loopback the client's core pays for each wake-up too): the mark
/// wakes it once they are all in. It follows what is still missing after
/// every read, so a wake-up is never promised for bytes that are not
/// coming, and goes back to 1 when the payload is in.
struct LowWater {
    mark: usize,
}

impl LowWater {
    fn new() -> LowWater {
        LowWater { mark: 1 }
    }

    /// `missing` bytes of the payload are still to come.
    fn expect(&mut self, socket: &RequestSource, missing: usize) {
        let wanted = if missing >= LOW_WATER_MIN { missing } else { 1 };
        if wanted != self.mark {
            socket.set_low_water(wanted);
            self.mark = wanted;
        }
    }

    fn reset(self, socket: &RequestSource) {
        if self.mark != 1 {
            socket.set_low_water(1);
        }
    }
}

/// Moves what the request reader already holds of the next `len` bytes
/// into `dst`. The rest of a payload is read from the socket straight into
/// its buffer: through the reader, every read shorter than its buffer (a
/// payload's tail) went into the buffer and was copied out again (perf,
/// 1 MiB writes: that memcpy was 7% of the server's time, half its socket
/// copy).
fn drain_buffered<R: AsyncRead + Unpin>(rd: &mut BufReader<R>, dst: &mut impl BufMut, len: usize) {
    let buffered = rd.buffer();
    let n = buffered.len().min(len);
    dst.put_slice(&buffered[..n]);
    rd.consume(n);
}
