//! The transmission phase: requests are read in order, run concurrently
//! and answered as they finish, in simple or structured replies.

use crate::negotiate::{protocol_error, Negotiated};
use crate::proto::*;
use crate::receive::{noting_waits, receive, receive_mapped, receive_staged};
use crate::reply::{errno, Replier, Reply};
use crate::socket::{self, RequestSource};
use crate::target::Target;
use crate::whole_read::{AbandonOnDrop, SharedWriter, WholeReads, WHOLE_READ_MIN};
use crate::whole_send::WholeSends;
use crate::writer::write_replies_until_done;
use crate::NbdExport;
use braid_core::server::{BackendOp, MappedSink};
use braid_core::staging::Staging;
use bytes::Bytes;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

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

/// Where a reply goes: the writer task, with the request's budget, given
/// back once the reply is written.
type Replies = mpsc::UnboundedSender<(Reply, OwnedSemaphorePermit)>;

/// Serves one negotiated connection until the client disconnects, the
/// stream fails, or the server shuts down; every request taken in is
/// answered before it returns.
pub(crate) async fn transmit(
    n: Negotiated,
    target: Arc<dyn Target>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let (mut conn, writer, _abandon) = Connection::open(n, target).await;
    let ended = loop {
        let req = match conn.next_request(&mut shutdown).await {
            Ok(Some(req)) => req,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        // Budget is taken before the payload is read and given back only
        // once the reply is written: a client that floods requests, or
        // stops reading replies, stalls its own connection, not the server.
        let Some(permit) = conn.take_budget(&req).await else {
            break Ok(());
        };
        conn.after_large_write = false;
        let admitted = if req.cmd == CMD_WRITE {
            match conn.receive_write(&req, permit).await {
                Ok(Payload::Received(admitted)) => admitted,
                Ok(Payload::Answered) => continue,
                Ok(Payload::ClientGone) => break Ok(()),
                Err(e) => break Err(e),
            }
        } else {
            Admitted::without_data(permit)
        };
        if req.cmd == CMD_DISC {
            // "The server MUST handle all outstanding requests" and close.
            break Ok(());
        }
        conn.dispatch(&req, admitted);
    };
    conn.finish(ended, writer).await
}

/// One connection's request side: what was negotiated, the target its
/// requests run on, and the ways a request's data may travel.
struct Connection {
    rd: BufReader<RequestSource>,
    export: NbdExport,
    target: Arc<dyn Target>,
    structured: bool,
    block_status: bool,
    fast_zero: bool,
    staging: Option<Arc<dyn Staging>>,
    send_files: bool,
    large_writes_inline: bool,
    whole_reads: Option<WholeReads>,
    whole_sends: Option<Arc<WholeSends>>,
    replies: Replies,
    budget: Arc<Semaphore>,
    /// The request just read was a large WRITE.
    after_large_write: bool,
}

/// A request's budget, and its WRITE payload once received.
struct Admitted {
    permit: OwnedSemaphorePermit,
    data: Bytes,
    /// Bytes of the payload received straight into the file (the head of
    /// it); `data` holds the rest.
    received_mapped: usize,
}

impl Admitted {
    fn without_data(permit: OwnedSemaphorePermit) -> Admitted {
        Admitted {
            permit,
            data: Bytes::new(),
            received_mapped: 0,
        }
    }
}

/// What became of a WRITE's payload.
enum Payload {
    Received(Admitted),
    /// Refused or written whole already, its reply queued.
    Answered,
    /// The client left in the middle of it.
    ClientGone,
}

/// What lives as long as the connection's task: a pool thread still
/// sending for it gives up once these are dropped.
type Abandon = (Option<AbandonOnDrop>, Option<AbandonOnDrop>);

impl Connection {
    /// Splits the stream, starts the writer task and picks the ways large
    /// requests take on this socket.
    async fn open(
        n: Negotiated,
        target: Arc<dyn Target>,
    ) -> (Connection, JoinHandle<io::Result<()>>, Abandon) {
        let Negotiated {
            stream,
            export,
            structured,
            block_status,
        } = n;
        let waiting = target.clone();
        let (rd, wr) = socket::split(stream, Box::new(move || waiting.client_wait()));
        let send_files = wr.can_send_file();
        let large_writes_inline = rd.buffers_large_requests();
        let plain_socket = wr.is_plain();
        let (replies, rx) = mpsc::unbounded_channel();
        let sink: SharedWriter = Arc::new(tokio::sync::Mutex::new(BufWriter::with_capacity(
            256 * 1024,
            wr,
        )));
        // Where sendfile is not used on a plain socket (a client on this
        // machine) large READs run whole on a pool thread, one at a time.
        let whole_reads = (!send_files)
            .then(|| WholeReads::new(&export.name, target.local_backend(), &sink, plain_socket))
            .flatten();
        let (whole_reads, abandon_reads) = whole_reads.unzip();
        // Where the target has no backend here (`braid attach`), large
        // READs' data is sent to a unix socket from a pool thread.
        let whole_sends = match target.local_backend() {
            Some(_) => None,
            None => WholeSends::new(&export.name, sink.lock().await.get_ref(), &sink),
        };
        let (whole_sends, abandon_sends) = whole_sends.unzip();
        let writer = tokio::spawn(write_replies_until_done(rx, sink, export.name.clone()));
        let conn = Connection {
            rd: BufReader::with_capacity(128 * 1024, rd),
            fast_zero: target.fast_zero(),
            staging: target.write_staging(),
            export,
            target,
            structured,
            block_status,
            send_files,
            large_writes_inline,
            whole_reads,
            whole_sends,
            replies,
            budget: Arc::new(Semaphore::new(INFLIGHT_KIB as usize)),
            after_large_write: false,
        };
        (conn, writer, (abandon_reads, abandon_sends))
    }

    /// The next request's header; `None` once the client has gone or the
    /// server is shutting down.
    async fn next_request(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> io::Result<Option<Request>> {
        let mut h = [0u8; 28];
        // After a large WRITE the next request is likely another: its
        // header is read alone, so the reader's buffer does not take in
        // the start of its payload only to copy it out again.
        let unbuffered = self.after_large_write && self.rd.buffer().is_empty();
        let rd = &mut self.rd;
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
            _ = shutdown.wait_for(|down| *down) => return Ok(None),
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        // A bad header leaves no way to find the next request: a hard
        // disconnect.
        Request::parse(&h).map(Some)
    }

    /// The request's share of the connection's budget, waited for; `None`
    /// if the budget is closed.
    async fn take_budget(&mut self, req: &Request) -> Option<OwnedSemaphorePermit> {
        let kib = if matches!(req.cmd, CMD_READ | CMD_WRITE) && req.len <= self.export.block_max {
            (req.len / 1024).clamp(REQUEST_MIN_KIB, INFLIGHT_KIB)
        } else {
            REQUEST_MIN_KIB
        };
        self.budget.clone().acquire_many_owned(kib).await.ok()
    }

    /// Takes in a WRITE's payload: straight into the file where the target
    /// can, else into a staged buffer or onto the heap.
    async fn receive_write(
        &mut self,
        req: &Request,
        permit: OwnedSemaphorePermit,
    ) -> io::Result<Payload> {
        let replier = self.replier(req);
        if req.len > self.export.block_max {
            return self.refuse_oversized_write(req, replier, permit).await;
        }
        let len = req.len as usize;
        self.after_large_write = crate::target::is_large_write(len);
        let mut received_mapped = 0;
        let sink =
            (self.after_large_write && self.rd.buffer().is_empty() && self.rd.get_ref().is_plain())
                .then(|| mapped_write(&*self.target, &self.export, req, self.structured))
                .flatten();
        if let Some(sink) = sink {
            match noting_waits(receive_mapped(self.rd.get_mut(), &sink), &*self.target).await {
                Ok(()) => {
                    drop(sink);
                    let _ = self.replies.send((replier.ok(), permit));
                    return Ok(Payload::Answered);
                }
                Err((got, e)) if e.raw_os_error() == Some(libc::EFAULT) => {
                    // The file's pages took no more (it shrank behind the
                    // export's back): the rest goes the ordinary way,
                    // whose write says what is wrong.
                    tracing::warn!(
                        export = %self.export.name,
                        offset = req.offset + got as u64,
                        "a WRITE's payload could not be received into the file's mapping: writing the rest from memory"
                    );
                    received_mapped = got;
                }
                Err((_, e)) => return Err(e),
            }
        }
        let len = len - received_mapped;
        let target = &*self.target;
        let data = match self.staging.as_ref().and_then(|s| s.buffer(len)) {
            Some(staged) => noting_waits(receive_staged(&mut self.rd, staged), target).await?,
            None => noting_waits(receive(&mut self.rd, len), target).await?,
        };
        Ok(Payload::Received(Admitted {
            permit,
            data,
            received_mapped,
        }))
    }

    /// Skips an oversized WRITE's data to stay in step, then refuses it:
    /// the client keeps its connection.
    async fn refuse_oversized_write(
        &mut self,
        req: &Request,
        replier: Replier,
        permit: OwnedSemaphorePermit,
    ) -> io::Result<Payload> {
        let skipped = tokio::io::copy(
            &mut (&mut self.rd).take(u64::from(req.len)),
            &mut tokio::io::sink(),
        )
        .await?;
        if skipped != u64::from(req.len) {
            return Ok(Payload::ClientGone);
        }
        let msg = format!(
            "export {}: WRITE of {} bytes is over the {}-byte maximum",
            self.export.name, req.len, self.export.block_max
        );
        let _ = self.replies.send((replier.error(EINVAL, &msg), permit));
        Ok(Payload::Answered)
    }

    /// Checks a request whose payload is in and starts it: answered at
    /// once, or run on the target and answered when done.
    fn dispatch(&mut self, req: &Request, admitted: Admitted) {
        let replier = self.replier(req);
        let Admitted {
            permit,
            data,
            received_mapped,
        } = admitted;
        let action = check(
            &self.export,
            req,
            self.structured,
            self.block_status,
            self.fast_zero,
        );
        let op = match action {
            Err((error, why)) => {
                let msg = format!(
                    "export {}: {} at offset {} length {}: {why}",
                    self.export.name,
                    cmd_name(req.cmd),
                    req.offset,
                    req.len
                );
                tracing::debug!(handle = req.handle, error, "{msg}");
                let _ = self.replies.send((replier.error(error, &msg), permit));
                return;
            }
            Ok(Action::Done) => {
                let reply = if req.cmd == CMD_READ {
                    replier.read_data(req.offset, Bytes::new())
                } else {
                    replier.ok()
                };
                let _ = self.replies.send((reply, permit));
                return;
            }
            Ok(Action::BlockStatus { req_one }) => {
                self.block_status(req, replier, req_one, permit);
                return;
            }
            Ok(Action::Io(BackendOp::Write { offset, fua, .. })) => BackendOp::Write {
                offset: offset + received_mapped as u64,
                data,
                fua,
            },
            Ok(Action::Io(op)) => op,
        };
        self.run(req, replier, op, permit);
    }

    /// Asks the target for a range's allocation and answers with it.
    fn block_status(
        &self,
        req: &Request,
        replier: Replier,
        req_one: bool,
        permit: OwnedSemaphorePermit,
    ) {
        let replies = self.replies.clone();
        let (name, offset, len) = (self.export.name.clone(), req.offset, req.len);
        self.target.allocation(
            self.export.backend_index,
            offset,
            u64::from(len),
            Box::new(move |result| {
                let reply = match result {
                    Ok(extents) => replier.block_status(&extents, req_one, len),
                    Err(status) => replier.error(
                        errno(status),
                        &format!("export {name}: BLOCK_STATUS at offset {offset}: {status:?}"),
                    ),
                };
                let _ = replies.send((reply, permit));
            }),
        );
    }

    /// Runs a checked IO the cheapest way this connection has for it.
    fn run(&self, req: &Request, replier: Replier, op: BackendOp, permit: OwnedSemaphorePermit) {
        let backend = self.export.backend_index;
        if let BackendOp::Read { offset, len } = op {
            let spliced = (self.send_files && len >= SENDFILE_MIN)
                .then(|| self.target.splice_read(backend, offset, len))
                .flatten();
            if let Some(src) = spliced {
                let reply = replier.read_file(offset, src, len as usize);
                let _ = self.replies.send((reply, permit));
                return;
            }
        }
        let done = reply_when_done(
            req,
            replier,
            &self.export.name,
            self.whole_sends.clone(),
            (permit, self.replies.clone()),
        );
        let done = match (&self.whole_reads, &op) {
            (Some(whole), BackendOp::Read { offset, len }) if *len >= WHOLE_READ_MIN => {
                let offset = *offset;
                let head = move |len| replier.read_head(offset, len);
                match whole.try_spawn(backend, offset, *len, head, done) {
                    Ok(()) => return,
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
        if self.large_writes_inline && self.after_large_write {
            if let Some(result) = self.target.try_now(backend, &op) {
                done(result);
                return;
            }
        }
        self.target.submit(backend, op, done);
    }

    fn replier(&self, req: &Request) -> Replier {
        Replier {
            handle: req.handle,
            structured: self.structured,
        }
    }

    /// Waits for every request taken in to be answered, and says how the
    /// connection ended.
    async fn finish(
        self,
        ended: io::Result<()>,
        writer: JoinHandle<io::Result<()>>,
    ) -> io::Result<()> {
        let Connection {
            replies,
            whole_reads,
            whole_sends,
            ..
        } = self;
        // Every completion holds a sender: the writer ends after the last
        // outstanding request is answered.
        drop(replies);
        let written = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
        let sent_whole = whole_reads.and_then(|w| w.failure()).map_or(Ok(()), Err);
        let sent_from_memory = whole_sends.and_then(|w| w.failure()).map_or(Ok(()), Err);
        ended.and(written).and(sent_whole).and(sent_from_memory)
    }
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
