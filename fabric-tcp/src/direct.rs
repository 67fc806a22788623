//! Sending on the engine's own task. A plain TCP connection's frames go
//! out from the loop that produced them, in one `sendmsg`, when the
//! connection's writer task has nothing in hand; otherwise they are handed
//! to that task as before. At QD1 the hand-over (a wake-up and a turn of
//! the scheduler before the task writes) was on every IO's path twice, on
//! the client's request and the server's reply: `braid bench`, 4k random
//! reads at QD1, alternating, 53.9-58.1k IOPS handed over against
//! 59.4-62.6k sent directly.
//!
//! What a direct send cannot write at once (the socket is full, or the
//! writer task is busy) stays in the connection's tail, which the writer
//! task writes before anything it takes from its queue, so bytes leave in
//! the order they were given.

use braid_core::wire::OutFrame;
use bytes::Bytes;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The most frames one direct send writes: two slices each, well under
/// the kernel's 1024 per `sendmsg`.
pub(crate) const MOST_FRAMES: usize = 64;

/// A connection's socket as its [`crate::conn::Writer`]s write it directly.
#[derive(Debug)]
pub(crate) struct Direct {
    /// A duplicate of the socket's descriptor: valid for as long as a
    /// writer holds it, whatever the connection's tasks did with theirs
    /// (a number alone could name another file by then).
    fd: OwnedFd,
    state: Mutex<State>,
    /// The connection was asked to close: nothing more goes out directly.
    closing: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes given to the connection and not yet written, ahead of
    /// everything in the writer task's queue.
    tail: Vec<Bytes>,
    /// The writer task is writing frames it took: a direct send now would
    /// put its bytes in the middle of theirs.
    task_writing: bool,
}

/// What became of a direct send.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// All of it is on the socket.
    All,
    /// This many bytes are; the rest is in the tail for the writer task.
    Part(usize),
}

impl Direct {
    // Simulated sockets have no descriptor to duplicate.
    #[cfg_attr(madsim, allow(dead_code))]
    pub(crate) fn new(fd: OwnedFd) -> Self {
        Direct {
            fd,
            state: Mutex::new(State::default()),
            closing: AtomicBool::new(false),
        }
    }

    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Whether `frames` may go out directly at all: none sends from a
    /// file, there are not too many, and the connection is not closing.
    pub(crate) fn takes(&self, frames: &[OutFrame]) -> bool {
        !self.closing.load(Ordering::Relaxed)
            && frames.len() <= MOST_FRAMES
            && frames.iter().all(|f| f.file_payload().is_none())
    }

    /// Writes what of `frames` the socket takes now and keeps the rest in
    /// the tail. The caller has made sure nothing else of this
    /// connection's is queued or in the writer task's hands.
    pub(crate) fn send(&self, frames: &[OutFrame]) -> Sent {
        let total: usize = frames.iter().map(OutFrame::len).sum();
        let mut state = self.state.lock().unwrap();
        // The writer task may still be finishing the frames it took (its
        // count of them already settled): those bytes go first.
        let written = if state.task_writing || !state.tail.is_empty() {
            0
        } else {
            send_now(&self.fd, frames)
        };
        if written == total {
            return Sent::All;
        }
        state.tail.extend(unsent(frames, written));
        Sent::Part(written)
    }

    /// For the writer task, about to write frames it took: the tail, to
    /// write first. Direct sends wait for [`Direct::done_writing`].
    pub(crate) fn start_writing(&self) -> Vec<Bytes> {
        let mut state = self.state.lock().unwrap();
        state.task_writing = true;
        std::mem::take(&mut state.tail)
    }

    pub(crate) fn done_writing(&self) {
        self.state.lock().unwrap().task_writing = false;
    }
}

/// One non-blocking `sendmsg` of every frame's head and payload; the
/// bytes it wrote (none if the socket is full or failed: the writer task
/// then meets the failure and reports it).
fn send_now(fd: &OwnedFd, frames: &[OutFrame]) -> usize {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(frames.len() * 2);
    for f in frames {
        for part in [f.head(), &f.payload[..]] {
            if !part.is_empty() {
                iov.push(libc::iovec {
                    iov_base: part.as_ptr() as *mut libc::c_void,
                    iov_len: part.len(),
                });
            }
        }
    }
    // SAFETY: a zeroed msghdr is valid (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: the descriptor is open (owned); every iovec points into
        // a frame borrowed for the call.
        let n = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return n as usize;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return 0;
        }
    }
}

/// The bytes of `frames` after the first `written`, as pieces (payloads
/// are sliced, not copied).
fn unsent(frames: &[OutFrame], mut written: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    for f in frames {
        let head = f.head();
        if written >= head.len() {
            written -= head.len();
        } else {
            out.push(Bytes::copy_from_slice(&head[written..]));
            written = 0;
        }
        let payload = &f.payload;
        if written >= payload.len() {
            written -= payload.len();
        } else {
            out.push(payload.slice(written..));
            written = 0;
        }
    }
    out.retain(|piece| !piece.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_core::wire::{self, Message, Op, Request};

    fn frame(id: u64, len: usize) -> OutFrame {
        wire::encode(&Message::Request(Request {
            op: if len > 0 { Op::Write } else { Op::Read },
            id,
            floor: 0,
            offset: 0,
            length: len.max(4096) as u32,
            flags: 0,
            remote: None,
            payload: Bytes::from(vec![id as u8; len]),
        }))
    }

    fn wire_bytes(frames: &[OutFrame]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.to_bytes()).collect()
    }

    #[test]
    fn the_unsent_pieces_are_exactly_the_bytes_after_the_cut() {
        let frames = [frame(1, 3000), frame(2, 0), frame(3, 100)];
        let all = wire_bytes(&frames);
        for cut in 0..=all.len() {
            let rest: Vec<u8> = unsent(&frames, cut).concat();
            assert_eq!(rest, all[cut..], "cut at {cut}");
        }
    }

    #[test]
    fn a_full_socket_keeps_everything_in_order_for_the_writer_task() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let direct = Direct::new(OwnedFd::from(a));
        let mut sent = Vec::new();
        let mut frames_given = Vec::new();
        // Until the socket's buffer is full, frames leave at once.
        let mut id = 0;
        loop {
            id += 1;
            let frames = vec![frame(id, 64 << 10)];
            frames_given.extend(frames.iter().cloned());
            match direct.send(&frames) {
                Sent::All => sent.extend(wire_bytes(&frames)),
                Sent::Part(n) => {
                    sent.extend(&wire_bytes(&frames)[..n]);
                    break;
                }
            }
        }
        // Now the tail holds bytes: later frames join it, none goes ahead.
        let later = vec![frame(id + 1, 10), frame(id + 2, 0)];
        frames_given.extend(later.iter().cloned());
        assert_eq!(direct.send(&later), Sent::Part(0));
        let tail: Vec<u8> = direct.start_writing().concat();
        direct.done_writing();
        sent.extend(tail);
        assert_eq!(sent, wire_bytes(&frames_given), "every byte, in order");

        // The peer reads what the socket took; the rest was in the tail.
        use std::io::Read;
        b.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let _ = b.read_to_end(&mut got);
        assert!(!got.is_empty() && sent.starts_with(&got));
    }

    #[test]
    fn nothing_goes_out_directly_while_the_writer_task_writes() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let direct = Direct::new(OwnedFd::from(a));
        assert!(direct.start_writing().is_empty());
        let frames = vec![frame(1, 100)];
        assert_eq!(direct.send(&frames), Sent::Part(0));
        direct.done_writing();
        assert_eq!(direct.start_writing().concat(), wire_bytes(&frames));
        direct.done_writing();
        assert_eq!(direct.send(&frames), Sent::All);
    }

    #[test]
    fn a_closing_connection_or_too_many_frames_is_not_sent_directly() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let direct = Direct::new(OwnedFd::from(a));
        let many: Vec<OutFrame> = (0..=MOST_FRAMES as u64).map(|i| frame(i, 0)).collect();
        assert!(direct.takes(&many[..MOST_FRAMES]));
        assert!(!direct.takes(&many), "too many for one sendmsg");
        direct.close();
        assert!(!direct.takes(&many[..1]));
    }
}
