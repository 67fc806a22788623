//! Large READ replies whose data is already in memory (`braid attach`
//! receives it from the server) are sent from a pool thread, so the
//! thread that received one goes on receiving the next while this one is
//! copied into the client's socket. Sent inline, the two copies of every
//! MiB (out of the server's socket, into the client's) ran one after the
//! other on one thread, which fio through `braid attach` kept saturated.
//!
//! One thread at a time drains a connection's queue of such replies. A
//! reply that found a sender busy and was handed to the connection's
//! writer task instead waited for the lock behind a writer that kept
//! finding more replies ready (22 ms at 1 MiB, QD8), so every large reply
//! joins the queue.

use crate::socket::ReplySink;
use crate::whole_read::{send_whole, AbandonOnDrop, SharedWriter};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// A reply waiting for the sender, and what must live until it is sent
/// (its budget; a handle that keeps the connection's socket open).
struct Queued {
    head: BytesMut,
    data: Bytes,
    offset: u64,
    keep: Box<dyn Send>,
}

#[derive(Default)]
struct Queue {
    replies: VecDeque<Queued>,
    /// A pool thread is draining `replies`.
    draining: bool,
}

/// One connection's large READ replies, sent from a pool thread.
pub(crate) struct WholeSends(Arc<Shared>);

/// What the connection and the pool thread draining its queue share.
struct Shared {
    export_name: Arc<str>,
    writer: SharedWriter,
    queue: Mutex<Queue>,
    abandoned: Arc<AtomicBool>,
    failure: Mutex<Option<io::Error>>,
}

impl WholeSends {
    /// Sends for a connection whose replies go to `writer`, if `sink` is a
    /// plain unix socket. A TCP socket's send buffer grows to megabytes,
    /// so a reply seldom waits there: fio through `braid attach` over
    /// loopback TCP, 1 MiB READs at QD8, three alternations, 1285-1379
    /// MiB/s inline against 1214-1385 from a pool thread. The guard must
    /// live as long as the connection's task.
    pub(crate) fn new(
        export_name: &str,
        sink: &ReplySink,
        writer: &SharedWriter,
    ) -> Option<(Arc<WholeSends>, AbandonOnDrop)> {
        if !sink.is_unix() {
            return None;
        }
        let abandoned = Arc::new(AtomicBool::new(false));
        let shared = Shared {
            export_name: export_name.into(),
            writer: writer.clone(),
            queue: Mutex::default(),
            abandoned: abandoned.clone(),
            failure: Mutex::default(),
        };
        let sends = WholeSends(Arc::new(shared));
        Some((Arc::new(sends), AbandonOnDrop(abandoned)))
    }

    /// Queues a READ's reply, `head` then `data` (read from `offset`);
    /// `keep` is dropped once it is sent, or once the connection has
    /// failed.
    pub(crate) fn send<K: Send + 'static>(
        &self,
        head: BytesMut,
        data: Bytes,
        offset: u64,
        keep: K,
    ) {
        let mut queue = self.0.queue.lock().unwrap();
        queue.replies.push_back(Queued {
            head,
            data,
            offset,
            keep: Box::new(keep),
        });
        if queue.draining {
            return;
        }
        queue.draining = true;
        drop(queue);
        let shared = self.0.clone();
        tokio::task::spawn_blocking(move || shared.drain());
    }

    /// The first failure to send a reply, if any: the connection's error.
    pub(crate) fn failure(&self) -> Option<io::Error> {
        self.0.failure.lock().unwrap().take()
    }
}

impl Shared {
    /// Sends queued replies until none is left; runs on a pool thread.
    fn drain(&self) {
        loop {
            let next = {
                let mut queue = self.queue.lock().unwrap();
                let next = queue.replies.pop_front();
                // Decided under the lock: a reply queued after this sees
                // no drainer and starts one.
                queue.draining = next.is_some();
                next
            };
            let Some(reply) = next else { return };
            self.send(&reply);
            drop(reply.keep);
        }
    }

    /// Writes one reply under the connection's writer lock, blocking; a
    /// failure ends the connection and is kept for its task to report.
    fn send(&self, reply: &Queued) {
        if self.failure.lock().unwrap().is_some() {
            return;
        }
        let what = || {
            format!(
                "export {}: READ at offset {} length {}",
                self.export_name,
                reply.offset,
                reply.data.len()
            )
        };
        send_whole(
            &self.writer,
            &reply.head,
            &reply.data,
            &self.abandoned,
            &self.failure,
            what,
        );
    }
}
