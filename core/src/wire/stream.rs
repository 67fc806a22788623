//! Finding frame boundaries in a byte stream (TCP, TLS).

use super::codec::{header_ok, parse_prefix, DecodeError};
use super::PREFIX_LEN;
use bytes::{Buf, Bytes, BytesMut};

/// Splits a byte stream into frames. The header checksum is verified as soon
/// as the prefix and body are in, so a corrupted length is caught before the
/// reader waits for a payload that will never come.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max_payload: usize,
}

impl FrameReader {
    /// A reader that refuses payloads longer than `max_payload`.
    pub fn new(max_payload: usize) -> Self {
        FrameReader {
            buf: BytesMut::with_capacity(64 * 1024),
            max_payload,
        }
    }

    /// The buffer to read into (append received bytes here).
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `None` if more bytes are needed. After an error
    /// the stream is unusable and the connection must be closed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, DecodeError> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let prefix = parse_prefix(&self.buf)?;
        let head_len = PREFIX_LEN + prefix.body_len;
        if self.buf.len() < head_len {
            return Ok(None);
        }
        if !header_ok(&prefix, &self.buf[..head_len]) {
            return Err(DecodeError::HeaderChecksum);
        }
        if prefix.payload_len > self.max_payload {
            return Err(DecodeError::BadLength);
        }
        let total = head_len + prefix.payload_len;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let frame = self.buf.split_to(total).freeze();
        if self.buf.is_empty() && self.buf.capacity() < 4096 {
            // Give the allocation back rather than keep a sliver of it.
            self.buf = BytesMut::with_capacity(64 * 1024);
        }
        Ok(Some(frame))
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.remaining()
    }
}
