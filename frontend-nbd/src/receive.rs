//! A WRITE's payload off the socket: onto the heap, into the target's
//! staged buffer, or straight into the export's file, with the
//! connection's wake-ups held back until a large one is in.

use crate::socket::RequestSource;
use crate::target::Target;
use braid_core::server::MappedSink;
use braid_core::staging::StagedBuffer;
use bytes::{BufMut, Bytes, BytesMut};
use std::future::Future;
use std::io;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// Runs `transfer`, telling `target` each time it waits for the client.
pub(crate) async fn noting_waits<F: Future>(transfer: F, target: &dyn Target) -> F::Output {
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
pub(crate) async fn receive(rd: &mut BufReader<RequestSource>, len: usize) -> io::Result<Bytes> {
    // Read into spare capacity: zeroing a 1 MiB buffer first cost as much
    // as a copy (perf: memset was 9% of a sequential run).
    let mut buf = BytesMut::with_capacity(len);
    drain_buffered(rd, &mut buf, len);
    let rest = len - buf.len();
    read_payload(rd.get_mut(), &mut buf, rest).await?;
    Ok(buf.freeze())
}

/// A WRITE's data, read straight into the target's staged buffer.
pub(crate) async fn receive_staged(
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
pub(crate) async fn receive_mapped(
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
