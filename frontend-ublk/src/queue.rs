//! One ublk queue: a thread with its own io_uring that fetches requests
//! from /dev/ublkcN, hands each to the target, and commits its result.
//!
//! The target answers from other threads (braid's client runs on tokio).
//! Its answers come back over a channel, and an eventfd read sits in the
//! ring so an answer wakes the thread at once: a ring waiting in
//! `submit_and_wait` sees nothing else a foreign thread does.

use crate::sys::{self, IoCmd, IoDesc};
use crate::{Completion, Target};
use braid_core::server::BackendOp;
use braid_core::staging::Staging;
use braid_core::wire::Status;
use bytes::Bytes;
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::sync::Arc;

/// The eventfd read's user_data; tags are below 4096.
const WAKE: u64 = u64::MAX;
const SECTOR: u64 = 512;

pub(crate) struct Queue {
    pub(crate) dev_id: u32,
    pub(crate) q_id: u16,
    pub(crate) depth: u16,
    pub(crate) buf_bytes: u32,
    pub(crate) cdev: Arc<File>,
    pub(crate) target: Arc<dyn Target>,
    /// The target's buffers for WRITE data, asked for once per queue.
    pub(crate) staging: Option<Arc<dyn Staging>>,
}

/// Each tag's IO buffer, page aligned, in one anonymous mapping. Shared
/// with the completions in flight so it outlives every one of them. Its
/// pages are the kernel's zero page until an IO first touches them: a
/// zeroed allocation with page alignment is zeroed by hand, which made
/// every buffer of every tag resident at once (128 MiB with two queues of
/// 128 tags, before any IO). A buffer's pages stay resident once an IO
/// used them, so memory follows the largest IO each tag has carried.
struct Buffers {
    base: *mut u8,
    len: usize,
    each: usize,
}

// SAFETY: a tag's buffer is touched by one party at a time: the kernel
// until the fetch completes, then the target's completion, then the
// kernel again after the commit.
unsafe impl Send for Buffers {}
unsafe impl Sync for Buffers {}

impl Buffers {
    fn new(depth: u16, each: u32) -> io::Result<Buffers> {
        let each = each as usize;
        let len = each
            .checked_mul(depth as usize)
            .filter(|&len| len > 0)
            .ok_or_else(|| io::Error::other("no room for IO buffers"))?;
        // SAFETY: a fresh private anonymous mapping; unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // A tag's first small IO would otherwise fault in a 2 MiB huge page
        // (four tags' buffers): after 3 s of 4 KiB reads at QD32, 36 MiB
        // resident for 1 MiB of IO buffers used. Failure costs only memory.
        // SAFETY: advice on the mapping just made.
        unsafe {
            libc::madvise(base, len, libc::MADV_NOHUGEPAGE);
        }
        Ok(Buffers {
            base: base.cast(),
            len,
            each,
        })
    }

    fn of(&self, tag: u16) -> *mut u8 {
        // SAFETY: callers pass tags below the depth the buffers were made for.
        unsafe { self.base.add(tag as usize * self.each) }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

/// The queue's request descriptors, mapped read-only from /dev/ublkcN.
struct Descriptors {
    base: *const IoDesc,
    len: usize,
}

impl Descriptors {
    fn map(cdev: &File, q_id: u16, depth: u16) -> io::Result<Descriptors> {
        let page = 4096usize;
        let round = |n: usize| n.div_ceil(page) * page;
        let len = round(depth as usize * std::mem::size_of::<IoDesc>());
        let stride = round(sys::MAX_QUEUE_DEPTH * std::mem::size_of::<IoDesc>());
        let offset = sys::CMD_BUF_OFFSET + (q_id as usize * stride) as i64;
        // SAFETY: a fresh shared read-only mapping of the device's
        // descriptor area; unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Descriptors {
            base: base.cast(),
            len,
        })
    }

    fn get(&self, tag: u16) -> IoDesc {
        // SAFETY: tag < depth, inside the mapping; the kernel wrote it
        // before completing the fetch, so a volatile read sees it whole.
        unsafe { std::ptr::read_volatile(self.base.add(tag as usize)) }
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: mapped in `map` with this length.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}

/// Wakes the queue thread from any thread.
struct Waker(OwnedFd);

impl Waker {
    fn new() -> io::Result<Waker> {
        // SAFETY: plain syscall; the fd is owned from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor no one else owns.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A failed
        // write means the counter is saturated: the thread wakes anyway.
        unsafe {
            libc::write(self.fd(), (&one as *const u64).cast(), 8);
        }
    }
}

/// Serves the queue until the device stops (every tag's fetch ends in
/// ABORT). Never returns while a request it took is still in the target.
pub(crate) fn serve(q: Queue) -> io::Result<()> {
    let descriptors = Descriptors::map(&q.cdev, q.q_id, q.depth)?;
    let buffers = Arc::new(Buffers::new(q.depth, q.buf_bytes)?);
    let waker = Arc::new(Waker::new()?);
    let (answers, answered) = mpsc::channel::<(u16, i32)>();
    let mut wake_buf = Box::new(0u64);
    let mut ring = IoUring::new((q.depth as u32 * 2 + 2).next_power_of_two())?;
    let cdev = types::Fd(q.cdev.as_raw_fd());
    let command = |op: u32, tag: u16, result: i32| {
        let cmd = IoCmd {
            q_id: q.q_id,
            tag,
            result,
            addr: buffers.of(tag) as u64,
        };
        let mut raw = [0u8; 16];
        raw.copy_from_slice(sys::bytes_of(&cmd));
        opcode::UringCmd16::new(cdev, op)
            .cmd(raw)
            .build()
            .user_data(tag as u64)
    };
    let wake_read = |buf: &mut u64| {
        opcode::Read::new(types::Fd(waker.fd()), (buf as *mut u64).cast(), 8)
            .build()
            .user_data(WAKE)
    };
    let mut pending = Vec::with_capacity(q.depth as usize + 1);
    for tag in 0..q.depth {
        pending.push(command(sys::IO_FETCH_REQ, tag, 0));
    }
    pending.push(wake_read(&mut wake_buf));
    let mut live = q.depth as usize;
    let mut done = Vec::with_capacity(q.depth as usize + 1);
    while live > 0 {
        for sqe in pending.drain(..) {
            // SAFETY: every buffer an SQE names (the tag buffers, wake_buf)
            // lives until the ring is dropped at the end of this function.
            unsafe {
                ring.submission()
                    .push(&sqe)
                    .map_err(|_| io::Error::other("ublk queue ring full"))?;
            }
        }
        ring.submit_and_wait(1)?;
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for (user_data, result) in done.drain(..) {
            if user_data == WAKE {
                pending.push(wake_read(&mut wake_buf));
                continue;
            }
            let tag = user_data as u16;
            match result {
                sys::IO_RES_OK => {
                    let io = descriptors.get(tag);
                    dispatch(&q, tag, io, &buffers, &answers, &waker);
                }
                sys::IO_RES_ABORT => live -= 1,
                e => {
                    tracing::warn!(
                        dev = q.dev_id,
                        queue = q.q_id,
                        tag,
                        error = %io::Error::from_raw_os_error(-e),
                        "ublk refused a queue command"
                    );
                    live -= 1;
                }
            }
        }
        while let Ok((tag, result)) = answered.try_recv() {
            pending.push(command(sys::IO_COMMIT_AND_FETCH_REQ, tag, result));
        }
    }
    Ok(())
}

/// Hands one request to the target; its answer comes back through
/// `answers` (for the commit) and `waker`.
fn dispatch(
    q: &Queue,
    tag: u16,
    io: IoDesc,
    buffers: &Arc<Buffers>,
    answers: &mpsc::Sender<(u16, i32)>,
    waker: &Arc<Waker>,
) {
    let op = (io.op_flags & 0xff) as u8;
    let fua = io.op_flags & sys::IO_F_FUA != 0;
    // A FLUSH carries no range, and whatever its descriptor holds there.
    let offset = io.start_sector.wrapping_mul(SECTOR);
    let bytes = u64::from(io.nr_sectors) * SECTOR;
    let (answers, waker) = (answers.clone(), waker.clone());
    let reply = move |result: i32| {
        // The queue thread is gone only if the device is being torn
        // down; the kernel fails the request then.
        let _ = answers.send((tag, result));
        waker.wake();
    };
    let ranged = op != sys::IO_OP_FLUSH;
    if ranged && io.start_sector.checked_mul(SECTOR).is_none() {
        return reply(-libc::EINVAL);
    }
    if bytes > u64::from(q.buf_bytes) && matches!(op, sys::IO_OP_READ | sys::IO_OP_WRITE) {
        return reply(-libc::EINVAL);
    }
    let len = bytes as u32;
    let buf = buffers.of(tag);
    let backend_op = match op {
        sys::IO_OP_READ => BackendOp::Read { offset, len },
        sys::IO_OP_WRITE => {
            // SAFETY: the kernel filled `len` bytes of this tag's buffer
            // before completing the fetch, and will not touch it again
            // until the commit.
            let data = unsafe { std::slice::from_raw_parts(buf, len as usize) };
            let data = match q.staging.as_ref().and_then(|s| s.buffer(data.len())) {
                Some(mut staged) => {
                    staged.bytes_mut().copy_from_slice(data);
                    staged.into_bytes()
                }
                None => Bytes::copy_from_slice(data),
            };
            BackendOp::Write { offset, data, fua }
        }
        sys::IO_OP_FLUSH => BackendOp::Flush,
        sys::IO_OP_DISCARD => BackendOp::Trim { offset, len, fua },
        sys::IO_OP_WRITE_ZEROES => BackendOp::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap: io.op_flags & sys::IO_F_NOUNMAP == 0,
            fast_only: false,
        },
        _ => return reply(-libc::EOPNOTSUPP),
    };
    let is_read = op == sys::IO_OP_READ;
    let buffers = buffers.clone();
    let done: Completion = Box::new(move |result: Result<Bytes, Status>| {
        let result = match result {
            Ok(data) if is_read => {
                if data.len() != len as usize {
                    -libc::EIO
                } else {
                    // SAFETY: as for writes: the buffer is ours until the
                    // commit this answer leads to; `buffers` keeps it alive.
                    unsafe {
                        std::ptr::copy_nonoverlapping(data.as_ptr(), buffers.of(tag), data.len())
                    };
                    len as i32
                }
            }
            Ok(_) => len as i32,
            Err(status) => -errno_of(status),
        };
        reply(result)
    });
    q.target.submit(backend_op, done);
}

/// The errno a failed request completes with; the block layer turns
/// ENOSPC and EOPNOTSUPP into their own statuses and the rest into EIO.
fn errno_of(status: Status) -> i32 {
    match status {
        Status::NoSpace => libc::ENOSPC,
        Status::Unsupported => libc::EOPNOTSUPP,
        Status::Invalid => libc::EINVAL,
        Status::ReadOnly => libc::EROFS,
        Status::Ok | Status::Io | Status::OutOfRange | Status::Corrupt | Status::Other(_) => {
            libc::EIO
        }
    }
}
