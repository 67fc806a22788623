//! How one request's reply is framed: simple or structured, an error
//! with its message, READ data from memory or from a file, extents.

use crate::proto::*;
use braid_core::server::{Extent, SpliceSource};
use braid_core::wire::Status;
use bytes::{BufMut, Bytes, BytesMut};

/// One reply, ready to send: a header and an optional payload sent after
/// it without copying, or (for a large READ) the file range the kernel
/// sends its payload from.
pub(crate) struct Reply {
    pub(crate) head: BytesMut,
    pub(crate) data: Bytes,
    pub(crate) file: Option<(SpliceSource, usize)>,
}

/// How one request's replies are framed.
#[derive(Clone, Copy)]
pub(crate) struct Replier {
    pub(crate) handle: u64,
    pub(crate) structured: bool,
}

impl Replier {
    fn simple(self, error: u32, data: Bytes) -> Reply {
        let mut head = BytesMut::with_capacity(16);
        head.put_u32(SIMPLE_REPLY_MAGIC);
        head.put_u32(error);
        head.put_u64(self.handle);
        Reply {
            head,
            data,
            file: None,
        }
    }

    fn chunk(self, ty: u16, payload_len: usize, extra: usize) -> BytesMut {
        let mut head = BytesMut::with_capacity(20 + extra);
        head.put_u32(STRUCTURED_REPLY_MAGIC);
        head.put_u16(REPLY_FLAG_DONE);
        head.put_u16(ty);
        head.put_u64(self.handle);
        head.put_u32(payload_len as u32);
        head
    }

    pub(crate) fn ok(self) -> Reply {
        // "If structured replies have been negotiated, a simple reply MAY
        // be used as a reply to any request other than READ" without data.
        self.simple(0, Bytes::new())
    }

    pub(crate) fn error(self, error: u32, message: &str) -> Reply {
        if !self.structured {
            return self.simple(error, Bytes::new());
        }
        // "The server SHOULD prefer sending errors via a structured reply,
        // as the error can then be accompanied by a string."
        let msg = &message.as_bytes()[..message.len().min(STRING_MAX)];
        let mut head = self.chunk(REPLY_TYPE_ERROR, 6 + msg.len(), 6 + msg.len());
        head.put_u32(error);
        head.put_u16(msg.len() as u16);
        head.put_slice(msg);
        Reply {
            head,
            data: Bytes::new(),
            file: None,
        }
    }

    pub(crate) fn read_data(self, offset: u64, data: Bytes) -> Reply {
        if self.structured && data.is_empty() {
            // Nothing to cover: a zero-length read.
            let head = self.chunk(REPLY_TYPE_NONE, 0, 0);
            return Reply {
                head,
                data,
                file: None,
            };
        }
        Reply {
            head: self.read_head(offset, data.len()),
            data,
            file: None,
        }
    }

    /// A READ's reply whose `len` bytes of data the writer sends from
    /// `src` (never zero-length: those take [`Replier::read_data`]).
    pub(crate) fn read_file(self, offset: u64, src: SpliceSource, len: usize) -> Reply {
        Reply {
            head: self.read_head(offset, len),
            data: Bytes::new(),
            file: Some((src, len)),
        }
    }

    /// The header in front of `len` bytes of READ data: a simple reply, or
    /// one content chunk marked final (nothing can fail once the data is
    /// in hand).
    pub(crate) fn read_head(self, offset: u64, len: usize) -> BytesMut {
        if !self.structured {
            return self.simple(0, Bytes::new()).head;
        }
        let mut head = self.chunk(REPLY_TYPE_OFFSET_DATA, 8 + len, 8);
        head.put_u64(offset);
        head
    }

    pub(crate) fn block_status(self, extents: &[Extent], req_one: bool, len: u32) -> Reply {
        let mut descriptors: Vec<(u32, u32)> = Vec::new();
        let mut covered = 0u64;
        for e in extents {
            let n = e.len.min(u64::from(len) - covered) as u32;
            if n == 0 {
                break;
            }
            // Holes in a file read as zeroes (the backend contract).
            let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
            descriptors.push((n, flags));
            covered += u64::from(n);
            if req_one || descriptors.len() == EXTENTS_MAX {
                break;
            }
        }
        if descriptors.is_empty() {
            // "The server MUST return at least one status descriptor"; 0 is
            // always a safe status.
            descriptors.push((len, 0));
        }
        let payload = 4 + 8 * descriptors.len();
        let mut head = self.chunk(REPLY_TYPE_BLOCK_STATUS, payload, payload);
        head.put_u32(BASE_ALLOCATION_ID);
        for (n, flags) in descriptors {
            head.put_u32(n);
            head.put_u32(flags);
        }
        Reply {
            head,
            data: Bytes::new(),
            file: None,
        }
    }
}

pub(crate) fn errno(status: Status) -> u32 {
    match status {
        Status::Ok => 0,
        Status::NoSpace => ENOSPC,
        Status::ReadOnly => EPERM,
        Status::Invalid | Status::OutOfRange => EINVAL,
        Status::Unsupported => ENOTSUP,
        _ => EIO,
    }
}
