//! The wire format (docs/PROTOCOL.md is the normative text).
//!
//! Every frame is a 20-byte prefix, a kind-specific body and an optional
//! payload. The prefix and body are covered by one CRC32C, the payload by
//! another, so a flipped bit is caught before anything executes: a bad
//! header makes the connection untrustworthy (framing may be lost), a bad
//! payload costs only that one request, which is resent.

mod codec;
mod message;
pub mod onesided;
mod stream;

pub use codec::{
    decode, decode_in, encode, encode_reply_from_file, DecodeError, FileSlice, InFrame, OutFrame,
    PayloadCrc,
};
pub use message::*;
pub use stream::FrameReader;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"BRD1";
/// The one protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body.
pub const PREFIX_LEN: usize = 20;
/// Largest body any message may have.
pub const MAX_BODY_LEN: usize = 640;
/// Absolute cap on a payload, whatever was negotiated.
pub const MAX_PAYLOAD_LEN: u32 = 32 << 20;
/// Longest key id or export name.
pub const MAX_NAME_LEN: usize = 255;
