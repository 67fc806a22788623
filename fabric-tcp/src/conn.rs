//! One transport connection as the drivers see it: frames in as
//! [`ConnEvent`]s, frames out through a [`Writer`]. For a stream, a reader
//! task splits it into frames and a writer task sends frames in batches;
//! other fabrics (RDMA) make their channels out of the same two parts.
//! A frame whose payload is in a file ([`FileSlice`]) leaves a plain TCP
//! socket by `sendfile`; any other link reads the bytes in first.

use crate::direct::{Direct, Sent};
use braid_core::wire::{FileSlice, FrameReader, InFrame, OutFrame};
use bytes::{BufMut, Bytes};
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

/// What the engine task hears from a connection.
#[derive(Debug)]
pub enum ConnEvent<K> {
    /// A whole stream-form frame.
    Frame(K, InFrame),
    /// The connection is gone, and why.
    Closed(K, String),
}

/// What the engine task tells a connection's writer.
#[derive(Debug)]
pub enum Outgoing {
    /// Send this frame.
    Frame(OutFrame),
    /// Send what is queued, then close.
    Close,
}

/// Most frames gathered into one vectored write.
const BATCH: usize = 64;

/// Called each time a connection waits for its peer in the middle of a
/// transfer (see [`on_peer_wait`]); a no-op until set.
static PEER_WAIT: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Has every connection of this process call `hook` each time it must wait
/// for its peer in the middle of a transfer: frames that find the socket
/// full, or a frame whose rest has not arrived. A process that polls for
/// IO can keep polling through such waits, where sleeping would cost a
/// wake-up for every part of a large frame. Set once; later calls change
/// nothing.
pub fn on_peer_wait(hook: fn()) {
    let _ = PEER_WAIT.set(hook);
}

/// Polls `transfer`, calling the peer-wait hook each time it must wait.
async fn noting_waits<F: std::future::Future>(transfer: F) -> F::Output {
    let mut transfer = std::pin::pin!(transfer);
    std::future::poll_fn(|cx| {
        let poll = transfer.as_mut().poll(cx);
        if poll.is_pending() {
            if let Some(hook) = PEER_WAIT.get() {
                hook();
            }
        }
        poll
    })
    .await
}

/// What a [`Writer`] queues for the connection's sender.
#[derive(Debug)]
enum Queued {
    Out(Outgoing),
    /// A direct send left bytes in the tail (see [`crate::direct`]).
    Wake,
}

/// A connection's outgoing queue, which knows how many bytes it holds, so
/// a peer that stops reading cannot make it grow without bound.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Queued>,
    /// Unsent bytes: queued, in the sender's hands, or in the tail.
    queued: Arc<AtomicUsize>,
    limit: usize,
    /// A plain TCP socket, which [`Writer::send_all`] may write itself.
    direct: Option<Arc<Direct>>,
}

/// The other end of a [`Writer`]: what the connection's sender takes
/// frames from, saying when their bytes have left.
#[derive(Debug)]
pub struct Outbox {
    rx: mpsc::UnboundedReceiver<Queued>,
    queued: Arc<AtomicUsize>,
}

impl Outbox {
    /// The next frame (or Close); None once every Writer is gone.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        loop {
            match self.rx.recv().await? {
                Queued::Out(out) => return Some(out),
                Queued::Wake => {}
            }
        }
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        loop {
            match self.rx.try_recv().ok()? {
                Queued::Out(out) => return Some(out),
                Queued::Wake => {}
            }
        }
    }

    /// The next frame, Close, or a wake-up for the tail (None); ends
    /// (`Some(None)` never follows) once every Writer is gone.
    async fn recv_or_wake(&mut self) -> Option<Option<Outgoing>> {
        match self.rx.recv().await? {
            Queued::Out(out) => Some(Some(out)),
            Queued::Wake => Some(None),
        }
    }

    /// `bytes` of frames taken from here have been sent.
    pub fn sent(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl Writer {
    /// A queue refusing frames past `limit` unsent bytes, and its outbox.
    pub fn new(limit: usize) -> (Writer, Outbox) {
        let (tx, rx) = mpsc::unbounded_channel::<Queued>();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            tx,
            queued: queued.clone(),
            limit,
            direct: None,
        };
        (writer, Outbox { rx, queued })
    }

    /// Queues a frame; false if the peer is too far behind (or gone).
    pub fn send(&self, frame: OutFrame) -> bool {
        let n = frame.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > self.limit {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.tx.send(Queued::Out(Outgoing::Frame(frame))).is_ok()
    }

    /// Sends `frames` (emptying it), in order, after everything given
    /// before; false if the peer is too far behind (or gone). On a plain
    /// TCP socket with nothing else unsent they go out here and now, in
    /// one `sendmsg`, rather than through the writer task (an engine loop
    /// gives each connection the frames it gathered, see [`Gathered`]).
    pub fn send_all(&self, frames: &mut Vec<OutFrame>) -> bool {
        if let Some(direct) = &self.direct {
            let total: usize = frames.iter().map(OutFrame::len).sum();
            // Claiming the count from zero is what makes this sender the
            // only one: anyone else now finds bytes unsent and queues.
            if total <= self.limit
                && direct.takes(frames)
                && self
                    .queued
                    .compare_exchange(0, total, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                let sent = direct.send(frames);
                frames.clear();
                return match sent {
                    Sent::All => {
                        self.queued.fetch_sub(total, Ordering::Relaxed);
                        true
                    }
                    Sent::Part(n) => {
                        self.queued.fetch_sub(n, Ordering::Relaxed);
                        self.tx.send(Queued::Wake).is_ok()
                    }
                };
            }
        }
        frames.drain(..).all(|f| self.send(f))
    }

    /// Sends what is queued, then closes.
    pub fn close(&self) {
        if let Some(direct) = &self.direct {
            direct.close();
        }
        let _ = self.tx.send(Queued::Out(Outgoing::Close));
    }
}

/// The frames an engine loop emits until it has nothing else to do,
/// gathered per connection so that each connection's leave together
/// ([`Writer::send_all`]): one `sendmsg` per connection where frames went
/// one by one to the writer task, which gathered them itself while the
/// engine's task ran.
#[derive(Debug)]
pub(crate) struct Gathered<K> {
    conns: Vec<(K, Vec<OutFrame>)>,
}

/// Connections whose room [`Gathered`] keeps while they have no frames;
/// beyond it the room is given back.
const GATHERED_CONNS_KEPT: usize = 64;

impl<K: Copy + PartialEq> Gathered<K> {
    pub(crate) fn new() -> Self {
        Gathered { conns: Vec::new() }
    }

    pub(crate) fn push(&mut self, key: K, frame: OutFrame) {
        match self.conns.iter_mut().find(|(k, _)| *k == key) {
            Some((_, frames)) => frames.push(frame),
            None => self.conns.push((key, vec![frame])),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.conns.iter().all(|(_, frames)| frames.is_empty())
    }

    /// `key`'s frames so far (to send before its connection closes).
    pub(crate) fn of(&mut self, key: K) -> Option<&mut Vec<OutFrame>> {
        self.conns
            .iter_mut()
            .find(|(k, frames)| *k == key && !frames.is_empty())
            .map(|(_, frames)| frames)
    }

    /// Every connection's frames, to send; whatever is left in them
    /// (a connection without a writer) goes at [`Gathered::clear`].
    pub(crate) fn each(&mut self) -> impl Iterator<Item = (K, &mut Vec<OutFrame>)> {
        if self.conns.len() > GATHERED_CONNS_KEPT {
            self.conns.retain(|(_, frames)| !frames.is_empty());
        }
        self.conns
            .iter_mut()
            .filter(|(_, frames)| !frames.is_empty())
            .map(|(k, frames)| (*k, frames))
    }

    /// Drops what was not sent.
    pub(crate) fn clear(&mut self) {
        for (_, frames) in &mut self.conns {
            frames.clear();
        }
    }
}

/// Reads a frame's file payload into memory, for a link that cannot send
/// from a file.
pub(crate) fn fill_file_payload(frame: &mut OutFrame) -> io::Result<()> {
    let Some(data) = frame.file_payload() else {
        return Ok(());
    };
    let buf = read_file_slice(data)?;
    frame
        .fill_file_payload(Bytes::from(buf))
        .map_err(|_| io::Error::other("a file payload changed length"))
}

/// A file payload's bytes, read into memory.
fn read_file_slice(data: &FileSlice) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; data.len as usize];
    data.file
        .read_exact_at(&mut buf, data.offset)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "reading {} bytes at {} for a reply: {e}",
                    data.len, data.offset
                ),
            )
        })?;
    Ok(buf)
}

/// Frames awaiting at least this many more bytes hold back the reader's
/// wake-ups until they are whole (see [`LowWater`]).
const LOW_WATER_MIN: usize = 128 * 1024;

/// The most one read takes from the socket. The frame reader hashes each
/// read as it comes, while the bytes are still in the cache: a whole 1 MiB
/// payload read at once (as the low-water mark lets it arrive) left its
/// start cold for the hash (perf, `braid bench` 1 MiB reads: the CRC 9.8%
/// of the client's CPU in one read, 5.3% in 256 KiB reads).
const READ_CHUNK: usize = 256 * 1024;

/// How a connection's reader asks not to be woken before a large frame has
/// arrived. Over TCP every segment that lands would otherwise wake the
/// reader (an inter-processor interrupt when it sleeps on another core):
/// a 1 MiB frame arrives as 17-30 segments, and on loopback the sender's
/// core pays for each wake-up too. The kernel's receive low-water mark
/// wakes the reader once for the lot.
pub(crate) trait LowWater {
    /// Wake the reader only once `bytes` can be read (1: as soon as any can).
    fn set_low_water(&mut self, bytes: usize);
}

/// Any stream (TLS, a test's pipe): wakes on every arrival.
impl<S> LowWater for ReadHalf<S> {
    fn set_low_water(&mut self, _bytes: usize) {}
}

/// A plain TCP socket: `SO_RCVLOWAT`, which the kernel caps at half the
/// largest receive buffer and grows the buffer to fit. A failure only
/// costs the wake-ups it would have saved.
#[cfg(not(madsim))]
impl LowWater for tokio::net::tcp::OwnedReadHalf {
    fn set_low_water(&mut self, bytes: usize) {
        use std::os::unix::io::AsRawFd;
        let socket: &tokio::net::TcpStream = self.as_ref();
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: the fd is open (borrowed); the option is a plain int.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// How a connection's writer sends a payload that is in a file.
pub(crate) trait SendFile {
    /// Sends `data`'s bytes after everything written so far.
    fn send_file(&mut self, data: &FileSlice) -> impl Future<Output = io::Result<()>> + Send;
}

/// Any stream (TLS, a test's pipe): the bytes pass through memory.
impl<S: AsyncWrite + Send> SendFile for WriteHalf<S> {
    async fn send_file(&mut self, data: &FileSlice) -> io::Result<()> {
        let buf = read_file_slice(data)?;
        noting_waits(self.write_all(&buf)).await
    }
}

/// A plain TCP socket: straight from the page cache.
#[cfg(not(madsim))]
impl SendFile for tokio::net::tcp::OwnedWriteHalf {
    async fn send_file(&mut self, data: &FileSlice) -> io::Result<()> {
        let socket: &tokio::net::TcpStream = self.as_ref();
        let mut offset = data.offset;
        let mut left = data.len as usize;
        while left > 0 {
            socket.writable().await?;
            let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
                sendfile(socket, &data.file, &mut offset, left)
            });
            match sent {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file ends before offset {offset} ({left} bytes of a reply unsent)"
                        ),
                    ))
                }
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(hook) = PEER_WAIT.get() {
                        hook();
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// One `sendfile(2)` of up to `len` bytes of `file` from `offset` to
/// `socket`, moving `offset` past what it sent.
#[cfg(not(madsim))]
fn sendfile(
    socket: &impl std::os::unix::io::AsRawFd,
    file: &std::fs::File,
    offset: &mut u64,
    len: usize,
) -> io::Result<usize> {
    use std::os::unix::io::AsRawFd;
    let mut off = *offset as libc::off_t;
    loop {
        // SAFETY: both fds are open (borrowed for the call); `off` is ours.
        let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
        if n >= 0 {
            *offset = off as u64;
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Starts the reader and writer of a plain TCP connection, whose writer
/// sends file payloads with `sendfile`; returns the writer's queue, which
/// refuses frames past `queue_limit` unsent bytes. Frames already in
/// `frames`' buffer (read by whoever accepted the connection) come first.
#[cfg(not(madsim))]
pub(crate) fn spawn_tcp<K>(
    stream: tokio::net::TcpStream,
    key: K,
    frames: FrameReader,
    queue_limit: usize,
    events: mpsc::UnboundedSender<ConnEvent<K>>,
) -> Writer
where
    K: Copy + Send + std::fmt::Debug + 'static,
{
    use std::os::fd::AsFd;
    // Without a duplicate the writer task sends everything, as on any link.
    let direct = match stream.as_fd().try_clone_to_owned() {
        Ok(fd) => Some(Arc::new(Direct::new(fd))),
        Err(e) => {
            tracing::debug!(error = %e, "no duplicate of the socket: every frame goes through the writer task");
            None
        }
    };
    let (rd, wr) = stream.into_split();
    spawn_halves(rd, wr, key, frames, queue_limit, events, direct)
}

/// Starts the reader and writer of `stream`; returns the writer's queue,
/// which refuses frames past `queue_limit` unsent bytes. Frames already in
/// `frames`' buffer come first.
// A plain TCP stream on a real kernel goes through `spawn_tcp`; only TLS,
// madsim's streams and the tests come here.
#[cfg(any(feature = "tls", madsim, test))]
pub(crate) fn spawn<S, K>(
    stream: S,
    key: K,
    frames: FrameReader,
    queue_limit: usize,
    events: mpsc::UnboundedSender<ConnEvent<K>>,
) -> Writer
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    K: Copy + Send + std::fmt::Debug + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    spawn_halves(rd, wr, key, frames, queue_limit, events, None)
}

fn spawn_halves<R, W, K>(
    rd: R,
    wr: W,
    key: K,
    frames: FrameReader,
    queue_limit: usize,
    events: mpsc::UnboundedSender<ConnEvent<K>>,
    direct: Option<Arc<Direct>>,
) -> Writer
where
    R: AsyncRead + LowWater + Unpin + Send + 'static,
    W: AsyncWrite + SendFile + Unpin + Send + 'static,
    K: Copy + Send + std::fmt::Debug + 'static,
{
    let (mut writer, outbox) = Writer::new(queue_limit);
    writer.direct = direct.clone();
    let reader = tokio::spawn(read_frames(rd, key, frames, events.clone()));
    tokio::spawn(write_frames(wr, key, outbox, direct, reader, events));
    writer
}

/// The connection's read half: every whole frame checked and handed to
/// `events`, then why it closed.
async fn read_frames<R, K>(
    mut rd: R,
    key: K,
    mut frames: FrameReader,
    reader_events: mpsc::UnboundedSender<ConnEvent<K>>,
) where
    R: AsyncRead + LowWater + Unpin + Send + 'static,
    K: Copy + Send + std::fmt::Debug + 'static,
{
    let mut low_water = 1;
    let mut handed_over = !frames.buffer().is_empty();
    let why = loop {
        // Waiting for the next frame is idleness; waiting for the rest
        // of one is a transfer still under way.
        let mut window = frames.buffer().limit(READ_CHUNK);
        let read = if std::mem::take(&mut handed_over) {
            // What the acceptor read stands for this turn's read.
            Ok(window.get_ref().len())
        } else if window.get_ref().is_empty() {
            rd.read_buf(&mut window).await
        } else {
            noting_waits(rd.read_buf(&mut window)).await
        };
        match read {
            Ok(0) => break "closed by peer".to_string(),
            Ok(_) => {}
            Err(e) => break format!("read: {e}"),
        }
        let mut failed = None;
        loop {
            match frames.next_checked_frame() {
                Ok(Some(frame)) => {
                    if reader_events.send(ConnEvent::Frame(key, frame)).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(format!("bad frame: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = failed {
            break why;
        }
        let awaited = frames.awaited();
        let wanted = if awaited >= LOW_WATER_MIN { awaited } else { 1 };
        if wanted != low_water {
            rd.set_low_water(wanted);
            low_water = wanted;
        }
    };
    let _ = reader_events.send(ConnEvent::Closed(key, why));
}

/// The connection's write half: what direct sends left, then the queued
/// frames in batches, until it closes or a write fails; then the read
/// half stops and `events` hears why.
async fn write_frames<W, K>(
    mut wr: W,
    key: K,
    mut outbox: Outbox,
    direct: Option<Arc<Direct>>,
    reader: tokio::task::JoinHandle<()>,
    events: mpsc::UnboundedSender<ConnEvent<K>>,
) where
    W: AsyncWrite + SendFile + Unpin + Send + 'static,
    K: Copy + Send + std::fmt::Debug + 'static,
{
    let mut batch: Vec<OutFrame> = Vec::with_capacity(BATCH);
    let mut closing = false;
    let why = loop {
        match outbox.recv_or_wake().await {
            Some(Some(Outgoing::Frame(f))) => batch.push(f),
            Some(None) => {}
            Some(Some(Outgoing::Close)) | None => closing = true,
        }
        while !closing && batch.len() < BATCH {
            match outbox.try_recv() {
                Some(Outgoing::Frame(f)) => batch.push(f),
                Some(Outgoing::Close) => closing = true,
                None => break,
            }
        }
        // What direct sends left goes ahead of what was queued.
        let tail = direct
            .as_ref()
            .map(|d| d.start_writing())
            .unwrap_or_default();
        let written = async {
            let parts: Vec<&[u8]> = tail.iter().map(|piece| &piece[..]).collect();
            write_parts(&mut wr, &parts).await?;
            write_all_frames(&mut wr, &batch).await
        }
        .await;
        if let Some(d) = &direct {
            d.done_writing();
        }
        if let Err(e) = written {
            break format!("write: {e}");
        }
        outbox.sent(
            tail.iter().map(Bytes::len).sum::<usize>()
                + batch.iter().map(OutFrame::len).sum::<usize>(),
        );
        batch.clear();
        if closing {
            let _ = wr.shutdown().await;
            break "closed".to_string();
        }
    };
    reader.abort();
    let _ = events.send(ConnEvent::Closed(key, why));
}

/// Writes every frame: heads and payloads in memory as separate slices of
/// vectored writes, payloads in files by [`SendFile`].
async fn write_all_frames<W: AsyncWrite + SendFile + Unpin>(
    wr: &mut W,
    frames: &[OutFrame],
) -> io::Result<()> {
    let mut from = 0;
    for (at, frame) in frames.iter().enumerate() {
        if let Some(data) = frame.file_payload() {
            // Up to and including this frame's head.
            write_vectored_all(wr, &frames[from..=at]).await?;
            wr.send_file(data).await?;
            from = at + 1;
        }
    }
    write_vectored_all(wr, &frames[from..]).await?;
    noting_waits(wr.flush()).await
}

/// Writes the heads and in-memory payloads of `frames` as one vectored
/// write, resuming after partial writes.
async fn write_vectored_all<W: AsyncWrite + Unpin>(
    wr: &mut W,
    frames: &[OutFrame],
) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(frames.len() * 2);
    for f in frames {
        parts.push(f.head());
        if !f.payload.is_empty() {
            parts.push(&f.payload);
        }
    }
    write_parts(wr, &parts).await
}

/// Writes `parts` in vectored writes, resuming after partial writes.
async fn write_parts<W: AsyncWrite + Unpin>(wr: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut left = &mut slices[..];
    while !left.is_empty() {
        let n = noting_waits(wr.write_vectored(left)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

/// A connection tells the process each time it waits for its peer in the
/// middle of a transfer: a frame whose rest has not arrived, and frames
/// that find the socket full; not while it merely waits for the next
/// frame. (The hook is set once per process: tests that open connections
/// take turns.)
#[cfg(test)]
mod tests {
    use super::*;
    use braid_core::wire::{self, Message, Op, Request};
    use std::time::Duration;

    static WAITS: AtomicUsize = AtomicUsize::new(0);
    /// Held by each test that opens a connection, whose waits would count.
    static CONNECTIONS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn count_wait() {
        WAITS.fetch_add(1, Ordering::Relaxed);
    }

    fn write_frame(len: usize) -> wire::OutFrame {
        wire::encode(&Message::Request(Request {
            op: Op::Write,
            id: 1,
            floor: 0,
            offset: 0,
            length: len as u32,
            flags: 0,
            remote: None,
            payload: Bytes::from(vec![0x5a; len]),
        }))
    }

    /// Yields until the count passes `above` (nothing here is timed: the other
    /// side has done its part, so the count moves once the connection runs).
    async fn waits_pass(above: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while WAITS.load(Ordering::Relaxed) <= above {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the connection said it waits for its peer");
    }

    #[tokio::test]
    async fn a_connection_waiting_mid_transfer_tells_the_process() {
        let _turn = CONNECTIONS.lock().await;
        on_peer_wait(count_wait);
        let at_start = WAITS.load(Ordering::Relaxed);
        // A pipe smaller than one frame: the writer must wait for the reader.
        let (near, mut far) = tokio::io::duplex(16 << 10);
        let (events, mut heard) = mpsc::unbounded_channel();
        let writer = spawn(near, 0u8, FrameReader::new(1 << 20), 8 << 20, events);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            WAITS.load(Ordering::Relaxed),
            at_start,
            "waiting for a first frame is no transfer"
        );

        let frame = write_frame(256 << 10).to_bytes();
        far.write_all(&frame[..1000]).await.unwrap();
        waits_pass(at_start).await;
        far.write_all(&frame[1000..]).await.unwrap();
        match heard.recv().await {
            Some(ConnEvent::Frame(0u8, got)) => {
                assert!(got.into_bytes() == frame, "the frame arrives whole")
            }
            other => panic!("expected the frame, got {other:?}"),
        }

        let before = WAITS.load(Ordering::Relaxed);
        let out = write_frame(256 << 10);
        let expected = out.to_bytes();
        assert!(writer.send(out));
        waits_pass(before).await;
        let mut got = vec![0u8; expected.len()];
        far.read_exact(&mut got).await.unwrap();
        assert!(got == expected, "the frame leaves whole");
    }

    /// Frames given to a plain TCP connection directly and through the
    /// queue, alone and in groups, more than the socket holds: the peer
    /// reads every byte, in the order given, without a later frame or a
    /// close to push the last ones out. On one thread the writer task runs
    /// only between rounds, so it finds a direct send's tail and queued
    /// frames together; on two it runs beside the direct sends.
    #[cfg(not(madsim))]
    async fn mixed_sends_arrive_whole_and_in_order(one_thread: bool) {
        let _turn = CONNECTIONS.lock().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (near, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (mut far, _) = accepted.unwrap();
        let near = near.unwrap();
        // Small buffers, so that direct sends fill the socket and leave tails.
        small_buffer(&near, libc::SO_SNDBUF);
        small_buffer(&far, libc::SO_RCVBUF);
        let (events, _heard) = mpsc::unbounded_channel();
        let writer = spawn_tcp(near, 0u8, FrameReader::new(1 << 20), 1 << 30, events);

        let sizes = [0, 100, 4096, 300 << 10, 1 << 20];
        let mut groups: Vec<Vec<OutFrame>> = (0..120usize)
            .map(|round| {
                (0..1 + round % 3)
                    .map(|k| write_frame(sizes[(round + k) % sizes.len()]))
                    .collect()
            })
            .collect();
        // Last, more than the socket holds, given to an idle connection:
        // only the writer task's wake-up can send the rest.
        let last = vec![write_frame(1 << 20), write_frame(1 << 20)];
        groups.push(last.clone());
        let expected: Vec<u8> = groups.iter().flatten().flat_map(|f| f.to_bytes()).collect();
        let total = expected.len();
        // The peer reads as the frames go, so the socket fills and drains.
        let reading = tokio::spawn(async move {
            let mut got = vec![0u8; total];
            far.read_exact(&mut got).await.map(|_| got)
        });
        let (mut given_directly, mut left_tails) = (0, 0);
        groups.pop();
        for (round, group) in groups.into_iter().enumerate() {
            if round % 4 == 3 {
                for f in group {
                    assert!(writer.send(f));
                }
            } else {
                let idle = writer.queued.load(Ordering::Relaxed) == 0;
                let mut group = group;
                assert!(writer.send_all(&mut group));
                assert!(group.is_empty(), "send_all takes every frame");
                if idle {
                    given_directly += 1;
                    left_tails += usize::from(writer.queued.load(Ordering::Relaxed) > 0);
                }
            }
            if round % 7 == 6 {
                tokio::task::yield_now().await;
            }
        }
        while writer.queued.load(Ordering::Relaxed) > 0 {
            tokio::task::yield_now().await;
        }
        let mut last = last;
        assert!(writer.send_all(&mut last));
        // On two threads the woken writer task may already have sent it.
        assert!(
            !one_thread || writer.queued.load(Ordering::Relaxed) > 0,
            "the last group left a tail"
        );
        // On two threads the writer task may drain the socket between
        // any two sends, so which cases occur is up to the scheduler there.
        assert!(
            given_directly > 0 && (!one_thread || left_tails > 0),
            "the cases under test happened: {given_directly} groups sent directly, {left_tails} left tails"
        );
        let got = tokio::time::timeout(Duration::from_secs(10), reading)
            .await
            .expect("every byte arrives without a push")
            .unwrap()
            .unwrap();
        assert!(got == expected, "every byte, in the order given");
    }

    #[cfg(not(madsim))]
    fn small_buffer(socket: &tokio::net::TcpStream, option: libc::c_int) {
        use std::os::fd::AsRawFd;
        let bytes: libc::c_int = 64 << 10;
        // SAFETY: the fd is open (borrowed); the option is a plain int.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "setsockopt");
    }

    #[cfg(not(madsim))]
    #[tokio::test]
    async fn mixed_sends_on_one_thread_arrive_whole_and_in_order() {
        mixed_sends_arrive_whole_and_in_order(true).await
    }

    #[cfg(not(madsim))]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mixed_sends_on_two_threads_arrive_whole_and_in_order() {
        mixed_sends_arrive_whole_and_in_order(false).await
    }
}
