//! What `braid attach` runs its NBD face and block device on: each
//! request carried over one export's session or a volume's legs, split
//! where it is longer than the largest braid payload.

use braid_core::client::{IoErrorKind, IoRequest};
use braid_core::server::{BackendOp, Extent};
use braid_core::wire::{Op, Status};
use braid_fabric_tcp::Client;
use braid_frontend_nbd::{Completion, ExtentsCompletion, Target};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// Makes the braid request for `len` bytes at `offset`, `at` bytes into
/// the original request.
type PartBuilder = Box<dyn Fn(u64, u32, usize) -> IoRequest>;

/// Where an attached volume's IO goes: one export's session, or a volume
/// over several legs.
#[derive(Clone)]
pub(super) enum Sink {
    Export(Client),
    Legs(braid_fabric_tcp::Volume),
}

impl Sink {
    async fn io(&self, io: IoRequest) -> Result<Bytes, IoErrorKind> {
        match self {
            Sink::Export(c) => c.io(io).await.map_err(|e| {
                tracing::warn!(error = %e, "IO failed");
                e.kind
            }),
            Sink::Legs(v) => v.io(io).await.inspect_err(|kind| {
                tracing::warn!(error = ?kind, "volume IO failed");
            }),
        }
    }
}

/// NBD requests carried by a braid [`Client`] or volume. Requests longer
/// than the largest payload are split and the parts run in parallel.
pub(super) struct VolumeTarget {
    pub(super) sink: Sink,
    pub(super) max_part: u32,
}

impl VolumeTarget {
    /// The braid requests that together perform `op`.
    fn parts(&self, op: BackendOp) -> Vec<IoRequest> {
        let (offset, len, build): (u64, u32, PartBuilder) = match op {
            BackendOp::Flush => return vec![IoRequest::flush()],
            BackendOp::Read { offset, len } => {
                (offset, len, Box::new(|o, l, _| IoRequest::read(o, l)))
            }
            BackendOp::Write { offset, data, fua } => {
                let len = data.len() as u32;
                (
                    offset,
                    len,
                    Box::new(move |o, l, at| {
                        IoRequest::write(o, data.slice(at..at + l as usize), fua)
                    }),
                )
            }
            BackendOp::Trim { offset, len, fua } => (
                offset,
                len,
                Box::new(move |o, l, _| IoRequest {
                    fua,
                    ..IoRequest::trim(o, l)
                }),
            ),
            BackendOp::WriteZeroes {
                offset,
                len,
                fua,
                may_unmap,
                ..
            } => (
                offset,
                len,
                Box::new(move |o, l, _| IoRequest {
                    no_unmap: !may_unmap,
                    ..IoRequest::write_zeroes(o, l, fua)
                }),
            ),
        };
        let mut parts = Vec::with_capacity((len / self.max_part + 1) as usize);
        let mut at = 0u32;
        while at < len {
            let n = self.max_part.min(len - at);
            parts.push(build(offset + u64::from(at), n, at as usize));
            at += n;
        }
        parts
    }
}

fn status_of(kind: IoErrorKind) -> Status {
    match kind {
        IoErrorKind::NoSpace => Status::NoSpace,
        IoErrorKind::OutOfRange => Status::OutOfRange,
        IoErrorKind::ReadOnly => Status::ReadOnly,
        IoErrorKind::Invalid => Status::Invalid,
        IoErrorKind::Unsupported => Status::Unsupported,
        IoErrorKind::Media
        | IoErrorKind::TimedOut
        | IoErrorKind::Closed
        | IoErrorKind::Fenced
        | IoErrorKind::Unknown(_) => Status::Io,
    }
}

impl Target for VolumeTarget {
    fn submit(&self, _export: usize, op: BackendOp, done: Completion) {
        let bytes = crate::busy_poll::data_len(&op);
        let mut parts = self.parts(op);
        let client = self.sink.clone();
        if parts.len() == 1 {
            let io = parts.pop().unwrap();
            crate::busy_poll::mark_io(bytes);
            let Sink::Export(export) = &client else {
                tokio::spawn(async move {
                    let r = client.io(io).await;
                    crate::busy_poll::mark_io(bytes);
                    done(r.map_err(status_of))
                });
                return;
            };
            // The answer goes straight to the NBD reply: no task per IO.
            let answer: braid_fabric_tcp::IoCallback = Box::new(move |r| {
                crate::busy_poll::mark_io(bytes);
                done(r.map_err(|e| {
                    tracing::warn!(error = %e, "IO failed");
                    status_of(e.kind)
                }))
            });
            if let Err((io, answer)) = export.try_io_with(io, answer) {
                // The driver's queue is full: wait for room in a task.
                let export = export.clone();
                tokio::spawn(async move { answer(export.io(io).await) });
            }
            return;
        }
        tokio::spawn(async move {
            let is_read = parts.first().is_some_and(|p| p.op == Op::Read);
            let mut set = tokio::task::JoinSet::new();
            for (i, io) in parts.into_iter().enumerate() {
                let client = client.clone();
                set.spawn(async move { (i, client.io(io).await) });
            }
            let mut results = Vec::with_capacity(set.len());
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(r) => results.push(r),
                    Err(_) => return done(Err(Status::Io)),
                }
            }
            results.sort_by_key(|(i, _)| *i);
            let mut data = BytesMut::new();
            for (_, r) in results {
                match r {
                    Ok(part) if is_read => data.extend_from_slice(&part),
                    Ok(_) => {}
                    Err(e) => return done(Err(status_of(e))),
                }
            }
            done(Ok(if is_read { data.freeze() } else { Bytes::new() }))
        });
    }

    fn allocation(&self, _export: usize, _offset: u64, len: u64, done: ExtentsCompletion) {
        // The braid protocol carries no allocation map: report data, which
        // the NBD spec allows for any block.
        done(Ok(vec![Extent { len, hole: false }]))
    }

    fn write_staging(&self) -> Option<Arc<dyn braid_core::staging::Staging>> {
        crate::rdma::write_staging()
    }

    fn fast_zero(&self) -> bool {
        // A braid WRITE_ZEROES cannot promise to be fast.
        false
    }

    fn client_wait(&self) {
        crate::busy_poll::transfer_wait()
    }
}
