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
use crate::turns::{Offer, Turns};
use crate::whole_read::{send_whole, AbandonOnDrop, ReplyData, SharedWriter};
use bytes::{Bytes, BytesMut};
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

/// One connection's large READ replies, sent from a pool thread.
pub(crate) struct WholeSends(Arc<Shared>);

/// What the connection and the pool thread draining its queue share.
struct Shared {
    export_name: Arc<str>,
    writer: SharedWriter,
    turns: Turns<Queued>,
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
            turns: Turns::default(),
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
        let reply = Queued {
            head,
            data,
            offset,
            keep: Box::new(keep),
        };
        if let Offer::Start(reply) = self.0.turns.offer(reply, true) {
            let shared = self.0.clone();
            tokio::task::spawn_blocking(move || {
                shared.turns.run(reply, |reply| {
                    shared.send(&reply);
                    drop(reply.keep);
                })
            });
        }
    }

    /// The first failure to send a reply, if any: the connection's error.
    pub(crate) fn failure(&self) -> Option<io::Error> {
        self.0.failure.lock().unwrap().take()
    }
}

impl Shared {
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
            ReplyData::Memory(&reply.data),
            &self.abandoned,
            &self.failure,
            what,
        );
    }
}
