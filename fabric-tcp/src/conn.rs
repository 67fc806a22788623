//! One transport connection as the drivers see it: frames in as
//! [`ConnEvent`]s, frames out through a [`Writer`]. For a stream, a reader
//! task splits it into frames and a writer task sends frames in batches;
//! other fabrics (RDMA) make their channels out of the same two parts.

use braid_core::wire::{FrameReader, OutFrame};
use bytes::Bytes;
use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// What the engine task hears from a connection.
#[derive(Debug)]
pub enum ConnEvent<K> {
    /// A whole stream-form frame.
    Frame(K, Bytes),
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

/// A connection's outgoing queue, which knows how many bytes it holds, so
/// a peer that stops reading cannot make it grow without bound.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// The other end of a [`Writer`]: what the connection's sender takes
/// frames from, saying when their bytes have left.
#[derive(Debug)]
pub struct Outbox {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
}

impl Outbox {
    /// The next frame (or Close); None once every Writer is gone.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        self.rx.recv().await
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.rx.try_recv().ok()
    }

    /// `bytes` of frames taken from here have been sent.
    pub fn sent(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl Writer {
    /// A queue refusing frames past `limit` unsent bytes, and its outbox.
    pub fn new(limit: usize) -> (Writer, Outbox) {
        let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            tx,
            queued: queued.clone(),
            limit,
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
        self.tx.send(Outgoing::Frame(frame)).is_ok()
    }

    /// Sends what is queued, then closes.
    pub fn close(&self) {
        let _ = self.tx.send(Outgoing::Close);
    }
}

/// Starts the reader and writer of `stream`; returns the writer's queue,
/// which refuses frames past `queue_limit` unsent bytes.
pub(crate) fn spawn<S, K>(
    stream: S,
    key: K,
    max_payload: usize,
    queue_limit: usize,
    events: mpsc::UnboundedSender<ConnEvent<K>>,
) -> Writer
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    K: Copy + Send + std::fmt::Debug + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (writer, mut outbox) = Writer::new(queue_limit);
    let reader_events = events.clone();
    let reader = tokio::spawn(async move {
        let mut frames = FrameReader::new(max_payload);
        let why = loop {
            match rd.read_buf(frames.buffer()).await {
                Ok(0) => break "closed by peer".to_string(),
                Ok(_) => {}
                Err(e) => break format!("read: {e}"),
            }
            let mut failed = None;
            loop {
                match frames.next_frame() {
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
        };
        let _ = reader_events.send(ConnEvent::Closed(key, why));
    });
    tokio::spawn(async move {
        let mut batch: Vec<OutFrame> = Vec::with_capacity(BATCH);
        let mut closing = false;
        let why = loop {
            match outbox.recv().await {
                Some(Outgoing::Frame(f)) => batch.push(f),
                Some(Outgoing::Close) | None => closing = true,
            }
            while !closing && batch.len() < BATCH {
                match outbox.try_recv() {
                    Some(Outgoing::Frame(f)) => batch.push(f),
                    Some(Outgoing::Close) => closing = true,
                    None => break,
                }
            }
            if let Err(e) = write_all_frames(&mut wr, &batch).await {
                break format!("write: {e}");
            }
            outbox.sent(batch.iter().map(OutFrame::len).sum());
            batch.clear();
            if closing {
                let _ = wr.shutdown().await;
                break "closed".to_string();
            }
        };
        reader.abort();
        let _ = events.send(ConnEvent::Closed(key, why));
    });
    writer
}

/// Writes every frame, header and payload as separate slices of one
/// vectored write, resuming after partial writes.
async fn write_all_frames<W: AsyncWrite + Unpin>(
    wr: &mut W,
    frames: &[OutFrame],
) -> std::io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(frames.len() * 2);
    for f in frames {
        parts.push(f.head());
        if !f.payload.is_empty() {
            parts.push(&f.payload);
        }
    }
    let mut first = 0;
    let mut offset = 0;
    while first < parts.len() {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() - first);
        slices.push(IoSlice::new(&parts[first][offset..]));
        for p in &parts[first + 1..] {
            slices.push(IoSlice::new(p));
        }
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = parts[first].len() - offset;
            if n >= left {
                n -= left;
                first += 1;
                offset = 0;
            } else {
                offset += n;
                n = 0;
            }
        }
    }
    wr.flush().await
}
