//! A connection's two directions once negotiation is over. On a plain TCP
//! or unix socket the reply side can also `sendfile` a READ's data
//! straight from the backing file's page cache, which costs the server no
//! copy (TCP) or one instead of two (a unix socket). Under TLS the bytes
//! must pass through the encryption, so replies are always written.

use crate::BoxStream;
use braid_core::server::{MappedSink, SpliceSource};
use std::any::Any;
use std::io;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadHalf, WriteHalf};
use tokio::net::{tcp, unix, TcpStream, UnixStream};

/// How often a blocked [`ReplySink::write_all_blocking`] checks whether
/// its connection was abandoned.
const ABANDON_CHECK_MS: libc::c_int = 100;

/// Where a connection's replies go. Every time a reply finds the socket
/// full it calls its `waiting` hook (see `Target::client_wait`).
pub(crate) struct ReplySink {
    socket: SinkSocket,
    waiting: Box<dyn Fn() + Send + Sync>,
}

enum SinkSocket {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Other(WriteHalf<BoxStream>),
}

/// Where a connection's requests come from.
pub(crate) enum RequestSource {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Other(ReadHalf<BoxStream>),
}

/// Splits `stream` into its two directions, keeping the socket itself
/// reachable where it is a plain one; the reply side calls `waiting` when
/// it must wait for the client.
pub(crate) fn split(
    stream: BoxStream,
    waiting: Box<dyn Fn() + Send + Sync>,
) -> (RequestSource, ReplySink) {
    let (source, socket) = split_socket(stream);
    (source, ReplySink { socket, waiting })
}

fn split_socket(stream: BoxStream) -> (RequestSource, SinkSocket) {
    let kind: &dyn Any = &*stream;
    if kind.is::<TcpStream>() || kind.is::<UnixStream>() {
        let stream: Box<dyn Any + Send> = stream;
        return match stream.downcast::<TcpStream>() {
            Ok(tcp) => {
                let (rd, wr) = tcp.into_split();
                (RequestSource::Tcp(rd), SinkSocket::Tcp(wr))
            }
            Err(stream) => {
                let unix = stream
                    .downcast::<UnixStream>()
                    .unwrap_or_else(|_| unreachable!("checked just above"));
                let (rd, wr) = unix.into_split();
                (RequestSource::Unix(rd), SinkSocket::Unix(wr))
            }
        };
    }
    let (rd, wr) = tokio::io::split(stream);
    (RequestSource::Other(rd), SinkSocket::Other(wr))
}

impl ReplySink {
    /// Whether READs should go by [`ReplySink::send_file`] here: on TCP to
    /// another machine. A peer on this machine (loopback TCP, any unix
    /// socket) makes the only copy either way, and sendfile made it
    /// slower: the client then reads the page cache cold, where our copy
    /// leaves the data warm in the shared cache, and the client is the
    /// process that bounds the run. 1 MiB reads at QD8 over loopback TCP:
    /// 1470-1500 MiB/s with sendfile, 1950-2080 without (Linux 6.18,
    /// where the page-sized pieces also cut the stream into twice the
    /// segments); over a unix socket, three alternations on session 32's
    /// machine: 1246-1506 with sendfile (fio at 92-94% of a core, 39% of
    /// the machine's samples its copy out of the socket), 1961-2531
    /// copied by a pool thread (see `whole_read`).
    pub(crate) fn can_send_file(&self) -> bool {
        match &self.socket {
            SinkSocket::Tcp(w) => !w
                .peer_addr()
                .is_ok_and(|peer| peer.ip().to_canonical().is_loopback()),
            SinkSocket::Unix(_) | SinkSocket::Other(_) => false,
        }
    }

    /// Whether this is a plain TCP or unix socket, which
    /// [`ReplySink::write_all_blocking`] can write to.
    pub(crate) fn is_plain(&self) -> bool {
        self.fd().is_some()
    }

    /// Whether this is a plain unix socket.
    pub(crate) fn is_unix(&self) -> bool {
        matches!(self.socket, SinkSocket::Unix(_))
    }

    /// The socket's descriptor, where it is a plain one.
    fn fd(&self) -> Option<std::os::unix::io::RawFd> {
        match &self.socket {
            SinkSocket::Tcp(w) => Some(AsRef::<TcpStream>::as_ref(w).as_raw_fd()),
            SinkSocket::Unix(w) => Some(AsRef::<UnixStream>::as_ref(w).as_raw_fd()),
            SinkSocket::Other(_) => None,
        }
    }

    /// Writes all of `bufs` from a thread that may block, sleeping in
    /// `poll` while the socket is full; gives up once `abandoned` is set
    /// (the connection's task is gone and nobody will read the reply). The
    /// caller must hold the connection's writer so replies do not
    /// interleave, and keep every buffer alive and mapped. The buffers
    /// are raw iovecs because one may be a file's mapping, which only the
    /// kernel may read (see `MappedRange`). A plain socket only.
    pub(crate) fn write_all_blocking(
        &self,
        mut bufs: &mut [libc::iovec],
        abandoned: &AtomicBool,
    ) -> io::Result<()> {
        let Some(fd) = self.fd() else {
            return Err(io::Error::other("blocking writes need a plain socket"));
        };
        while let Some(first) = bufs.first() {
            if first.iov_len == 0 {
                bufs = &mut bufs[1..];
                continue;
            }
            // SAFETY: a zeroed msghdr is valid; the caller keeps every
            // buffer alive for the call.
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = bufs.as_mut_ptr();
                msg.msg_iovlen = bufs.len() as _;
                libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
            };
            if sent >= 0 {
                bufs = advance(bufs, sent as usize);
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    if abandoned.load(Ordering::Acquire) {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the connection was closed while a reply was being sent",
                        ));
                    }
                    let mut pollfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // Wakes now and then to notice an abandoned connection.
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pollfd, 1, ABANDON_CHECK_MS) };
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }

    /// Ends both directions of the socket at once, so a connection whose
    /// reply stream broke mid-reply stops taking requests.
    pub(crate) fn shut_down(&self) {
        let Some(fd) = self.fd() else { return };
        // SAFETY: the fd is open (borrowed). A failure leaves the socket
        // as it was; the error that led here is reported anyway.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }

    /// Passes on `poll`, calling the hook if the socket is full.
    fn waited<T>(&self, poll: Poll<T>) -> Poll<T> {
        if poll.is_pending() {
            (self.waiting)();
        }
        poll
    }

    /// Sends `len` bytes of `src`'s file from its offset with `sendfile`,
    /// waiting while the socket is full. Anything written before must have
    /// been flushed. A file shorter than promised is an error: the reply's
    /// header already announced `len` bytes, so the connection cannot go on.
    pub(crate) async fn send_file(&mut self, src: &SpliceSource, len: usize) -> io::Result<()> {
        let mut offset = src.offset;
        let mut left = len;
        while left > 0 {
            let sent = match &self.socket {
                SinkSocket::Tcp(w) => {
                    let s: &TcpStream = w.as_ref();
                    s.writable().await?;
                    s.try_io(Interest::WRITABLE, || sendfile(s, src, &mut offset, left))
                }
                SinkSocket::Unix(w) => {
                    let s: &UnixStream = w.as_ref();
                    s.writable().await?;
                    s.try_io(Interest::WRITABLE, || sendfile(s, src, &mut offset, left))
                }
                SinkSocket::Other(_) => {
                    return Err(io::Error::other("sendfile needs a plain socket"));
                }
            };
            match sent {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the backing file ends before offset {offset} \
                             ({left} bytes of a READ still to send)"
                        ),
                    ))
                }
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => (self.waiting)(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `bufs` less their first `n` bytes: whole iovecs dropped, the next one
/// started later.
fn advance(bufs: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    let mut skip = 0;
    while skip < bufs.len() && n >= bufs[skip].iov_len {
        n -= bufs[skip].iov_len;
        skip += 1;
    }
    let rest = &mut bufs[skip..];
    if let Some(first) = rest.first_mut() {
        first.iov_base = (first.iov_base as *mut u8).wrapping_add(n).cast();
        first.iov_len -= n;
    }
    rest
}

/// One `sendfile` call, moving `offset` past what it sent.
fn sendfile(
    socket: &impl AsRawFd,
    src: &SpliceSource,
    offset: &mut u64,
    len: usize,
) -> io::Result<usize> {
    let mut off = *offset as libc::off_t;
    loop {
        // SAFETY: both fds are open (borrowed for the call); `off` is ours.
        let n = unsafe { libc::sendfile(socket.as_raw_fd(), src.file.as_raw_fd(), &mut off, len) };
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

impl RequestSource {
    /// Whether the client can go on sending large requests while the
    /// server is busy with one: a TCP connection's receive buffer grows to
    /// megabytes, a unix socket's holds about 200 KiB.
    pub(crate) fn buffers_large_requests(&self) -> bool {
        matches!(self, RequestSource::Tcp(_))
    }

    /// Asks the kernel to wake this connection only once `bytes` can be
    /// read (1: as soon as any can): `SO_RCVLOWAT`, which the kernel caps
    /// at half the largest receive buffer (growing the buffer to fit).
    /// Unix sockets ignore it when polled, so only TCP sets it. A failure
    /// costs only the wake-ups it would have saved.
    pub(crate) fn set_low_water(&self, bytes: usize) {
        let RequestSource::Tcp(r) = self else {
            return;
        };
        let socket: &TcpStream = r.as_ref();
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

    /// Receives up to `len` bytes into `sink` from byte `at` on, waiting
    /// until some arrive; 0 at the end of the stream. The kernel writes
    /// the mapping itself, so a file shrunk under it fails the call with
    /// EFAULT (after the bytes it did take, which the next call reports).
    /// A plain socket only.
    pub(crate) async fn receive_mapped(
        &mut self,
        sink: &MappedSink,
        at: usize,
        len: usize,
    ) -> io::Result<usize> {
        assert!(at.checked_add(len).is_some_and(|end| end <= sink.len()));
        let recv = |fd: std::os::unix::io::RawFd| {
            // SAFETY: `[at, at + len)` lies in the sink (checked above),
            // which keeps its window mapped while borrowed; the fd is open.
            let n = unsafe { libc::recv(fd, sink.addr().add(at).cast(), len, 0) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        };
        loop {
            let got = match self {
                RequestSource::Tcp(r) => {
                    let s: &TcpStream = r.as_ref();
                    s.readable().await?;
                    s.try_io(Interest::READABLE, || recv(s.as_raw_fd()))
                }
                RequestSource::Unix(r) => {
                    let s: &UnixStream = r.as_ref();
                    s.readable().await?;
                    s.try_io(Interest::READABLE, || recv(s.as_raw_fd()))
                }
                RequestSource::Other(_) => {
                    return Err(io::Error::other(
                        "receiving into a mapping needs a plain socket",
                    ));
                }
            };
            match got {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                got => return got,
            }
        }
    }

    /// Whether this is a plain TCP or unix socket, which
    /// [`RequestSource::receive_mapped`] can read.
    pub(crate) fn is_plain(&self) -> bool {
        !matches!(self, RequestSource::Other(_))
    }
}

impl AsyncRead for RequestSource {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RequestSource::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            RequestSource::Unix(r) => Pin::new(r).poll_read(cx, buf),
            RequestSource::Other(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl SinkSocket {
    /// The socket as a writer, whichever kind it is.
    fn writer(&mut self) -> Pin<&mut (dyn AsyncWrite + Unpin + Send)> {
        match self {
            SinkSocket::Tcp(w) => Pin::new(w),
            SinkSocket::Unix(w) => Pin::new(w),
            SinkSocket::Other(w) => Pin::new(w),
        }
    }
}

impl AsyncWrite for ReplySink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = this.socket.writer().poll_write(cx, buf);
        this.waited(poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = this.socket.writer().poll_write_vectored(cx, bufs);
        this.waited(poll)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.socket {
            SinkSocket::Tcp(w) => w.is_write_vectored(),
            SinkSocket::Unix(w) => w.is_write_vectored(),
            SinkSocket::Other(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = this.socket.writer().poll_flush(cx);
        this.waited(poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().socket.writer().poll_shutdown(cx)
    }
}
