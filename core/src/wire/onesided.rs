//! Frames on a message transport whose payloads move one-sided (RDMA,
//! docs/PROTOCOL.md §9.2).
//!
//! There, each frame travels as one message of exactly its prefix and
//! body. `payload_len` and `payload_crc` keep describing the payload, which
//! the server moves itself: it RDMA-READs a WRITE's data from the client
//! buffer named in the request, and RDMA-WRITEs a READ's data into it
//! before it sends the reply. So the payload is still checked end to end
//! by the same CRC as on a stream, and the engines, which only ever see
//! stream-form frames, need not know which fabric carried them.

use super::codec::{header_ok, parse_prefix};
use super::message::{Kind, RemoteBuf, FLAG_REMOTE_BUF};
use super::{DecodeError, MAGIC, PREFIX_LEN, VERSION};

/// Body length of a request with and without its remote buffer.
const REQUEST_BODY: usize = 32;
const REQUEST_BODY_REMOTE: usize = 48;
/// Where a request's flags sit in its body.
const FLAGS_AT: usize = 28;

/// Kind byte of the WINDOW message, which only a message transport
/// carries (the codec knows no such kind, so on a stream it is refused
/// like any unknown one).
pub const WINDOW_KIND: u8 = 0x33;
const WINDOW_BODY: usize = 24;

/// The memory a client lets the server reach one-sided on a channel: its
/// first message names it, so the server can answer a request naming a
/// buffer outside it INVALID instead of posting an access the NIC would
/// refuse by killing the queue pair (and every request on the channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Virtual address of the first byte.
    pub base: u64,
    /// Bytes from `base`.
    pub len: u64,
    /// Remote key of the registration.
    pub rkey: u32,
}

impl Window {
    /// Whether `len` bytes at `remote` lie inside the window.
    pub fn holds(&self, remote: RemoteBuf, len: u32) -> bool {
        let end = remote.addr.checked_add(len as u64);
        let limit = self.base.checked_add(self.len);
        remote.rkey == self.rkey
            && remote.addr >= self.base
            && matches!((end, limit), (Some(e), Some(l)) if e <= l)
    }

    /// The WINDOW message naming it.
    pub fn message(&self) -> Vec<u8> {
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[0..4].copy_from_slice(&MAGIC);
        prefix[4] = VERSION;
        prefix[5] = WINDOW_KIND;
        let mut body = [0u8; WINDOW_BODY];
        body[0..8].copy_from_slice(&self.base.to_le_bytes());
        body[8..16].copy_from_slice(&self.len.to_le_bytes());
        body[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        with_body(&prefix, &body)
    }
}

/// What a received message is, as far as moving its payload goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carried {
    /// A READ or WRITE naming a client buffer. The server moves the data
    /// (`payload_len` bytes of a WRITE, `length` of a READ) and hands the
    /// engine `stream_head`, the same frame without the remote buffer.
    Remote {
        /// Read or Write.
        kind: Kind,
        /// The request id.
        id: u64,
        /// Bytes the request covers.
        length: u32,
        /// Bytes of payload the client's buffer holds (WRITE) or 0 (READ).
        payload_len: u32,
        /// The client's buffer.
        remote: RemoteBuf,
        /// Prefix and body as a stream would carry them.
        stream_head: Vec<u8>,
    },
    /// A REPLY: a READ's data, if any, was placed one-sided before it.
    Reply {
        /// The request it answers.
        id: u64,
        /// Bytes of data placed.
        payload_len: u32,
    },
    /// The memory the client lets the server reach (never an engine's).
    Window(Window),
    /// Any other frame: no payload anywhere.
    Plain,
}

/// Reads a received message without trusting it: its length must be its
/// prefix and body exactly and its header checksum must hold, so nothing
/// is moved for a corrupt or forged-length message.
pub fn inspect(message: &[u8]) -> Result<Carried, DecodeError> {
    let prefix = parse_prefix(message)?;
    if message.len() != PREFIX_LEN + prefix.body_len {
        return Err(DecodeError::BadLength);
    }
    if !header_ok(&prefix, message) {
        return Err(DecodeError::HeaderChecksum);
    }
    let body = &message[PREFIX_LEN..];
    let le64 = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
    let le32 = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap());
    if prefix.kind == WINDOW_KIND {
        if prefix.body_len != WINDOW_BODY || prefix.payload_len != 0 {
            return Err(DecodeError::Malformed("window of the wrong size"));
        }
        return Ok(Carried::Window(Window {
            base: le64(0),
            len: le64(8),
            rkey: le32(16),
        }));
    }
    let kind = Kind::from_u8(prefix.kind).ok_or(DecodeError::UnknownKind(prefix.kind))?;
    let payload_len = prefix.payload_len as u32;
    match kind {
        Kind::Read | Kind::Write if prefix.body_len == REQUEST_BODY_REMOTE => {
            let flags = u16::from_le_bytes([body[FLAGS_AT], body[FLAGS_AT + 1]]);
            if flags & FLAG_REMOTE_BUF == 0 {
                return Err(DecodeError::Malformed("remote buffer without its flag"));
            }
            let length = le32(24);
            let expected = if kind == Kind::Write { length } else { 0 };
            if payload_len != expected {
                return Err(DecodeError::Malformed(
                    "payload length disagrees with request",
                ));
            }
            let remote = RemoteBuf {
                addr: le64(32),
                rkey: le32(40),
            };
            let mut stream_body = [0u8; REQUEST_BODY];
            stream_body.copy_from_slice(&body[..REQUEST_BODY]);
            stream_body[FLAGS_AT..FLAGS_AT + 2]
                .copy_from_slice(&(flags & !FLAG_REMOTE_BUF).to_le_bytes());
            Ok(Carried::Remote {
                kind,
                id: le64(0),
                length,
                payload_len,
                remote,
                stream_head: with_body(&message[..PREFIX_LEN], &stream_body),
            })
        }
        Kind::Reply if prefix.body_len >= 8 => Ok(Carried::Reply {
            id: le64(0),
            payload_len,
        }),
        _ if payload_len != 0 => Err(DecodeError::Malformed("payload on a message transport")),
        _ => Ok(Carried::Plain),
    }
}

/// Turns a stream-form READ or WRITE head (prefix and 32-byte body) into
/// its message form naming `remote`; `payload_len` and `payload_crc` are
/// kept, so the server can check the data it fetches.
pub fn attach_remote(head: &[u8], remote: RemoteBuf) -> Result<Vec<u8>, DecodeError> {
    let prefix = parse_prefix(head)?;
    let is_request = matches!(Kind::from_u8(prefix.kind), Some(Kind::Read | Kind::Write));
    if !is_request || prefix.body_len != REQUEST_BODY || head.len() != PREFIX_LEN + REQUEST_BODY {
        return Err(DecodeError::Malformed(
            "not a stream-form read or write head",
        ));
    }
    let mut body = [0u8; REQUEST_BODY_REMOTE];
    body[..REQUEST_BODY].copy_from_slice(&head[PREFIX_LEN..]);
    let flags = u16::from_le_bytes([body[FLAGS_AT], body[FLAGS_AT + 1]]) | FLAG_REMOTE_BUF;
    body[FLAGS_AT..FLAGS_AT + 2].copy_from_slice(&flags.to_le_bytes());
    body[32..40].copy_from_slice(&remote.addr.to_le_bytes());
    body[40..44].copy_from_slice(&remote.rkey.to_le_bytes());
    Ok(with_body(&head[..PREFIX_LEN], &body))
}

/// The prefix (payload fields kept) with a new body and header checksum.
fn with_body(prefix: &[u8], body: &[u8]) -> Vec<u8> {
    let mut head = Vec::with_capacity(PREFIX_LEN + body.len());
    head.extend_from_slice(&prefix[..16]);
    head[6..8].copy_from_slice(&(body.len() as u16).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[..16]), body);
    head.extend_from_slice(&crc.to_le_bytes());
    head.extend_from_slice(body);
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_travels_whole_and_holds_only_what_lies_inside_it() {
        let w = Window {
            base: 0x1000,
            len: 0x4000,
            rkey: 5,
        };
        assert_eq!(inspect(&w.message()), Ok(Carried::Window(w)));
        // On a stream it is no frame at all.
        assert!(crate::wire::decode(Bytes::from(w.message())).is_err());
        let at = |addr, rkey| RemoteBuf { addr, rkey };
        assert!(w.holds(at(0x1000, 5), 0x4000));
        assert!(w.holds(at(0x4000, 5), 0x1000));
        assert!(!w.holds(at(0x4000, 5), 0x1001), "one byte past the end");
        assert!(!w.holds(at(0xfff, 5), 1), "one byte before the start");
        assert!(!w.holds(at(0x1000, 6), 1), "another key");
        assert!(!w.holds(at(u64::MAX, 5), 2), "an address that wraps");
        let mut garbled = w.message();
        garbled[PREFIX_LEN] ^= 1;
        assert_eq!(inspect(&garbled), Err(DecodeError::HeaderChecksum));
    }
    use crate::wire::{decode, encode, Message, Op, Reply, Request, Status, FLAG_FUA};
    use bytes::Bytes;

    fn request(op: Op, payload: &[u8]) -> Request {
        Request {
            op,
            id: 7,
            floor: 3,
            offset: 8192,
            length: 4096,
            flags: FLAG_FUA,
            remote: None,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn a_write_travels_as_its_head_and_comes_back_whole_with_the_fetched_data() {
        let data = vec![0xa5u8; 4096];
        let frame = encode(&Message::Request(request(Op::Write, &data)));
        let remote = RemoteBuf {
            addr: 0x7f00_0000_1000,
            rkey: 0x1234,
        };
        let message = attach_remote(frame.head(), remote).unwrap();
        assert_eq!(message.len(), PREFIX_LEN + REQUEST_BODY_REMOTE);
        let Carried::Remote {
            kind,
            id,
            length,
            payload_len,
            remote: seen,
            stream_head,
        } = inspect(&message).unwrap()
        else {
            panic!("not a remote request")
        };
        assert_eq!(
            (kind, id, length, payload_len, seen),
            (Kind::Write, 7, 4096, 4096, remote)
        );
        // What the engine gets is byte for byte what a stream carries.
        assert_eq!(stream_head, frame.head());
        let mut whole = stream_head;
        whole.extend_from_slice(&data);
        let Message::Request(r) = decode(Bytes::from(whole)).unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.remote, r.flags, &r.payload[..]),
            (None, FLAG_FUA, &data[..])
        );
    }

    #[test]
    fn data_corrupted_in_the_one_sided_move_fails_its_checksum() {
        let frame = encode(&Message::Request(request(Op::Write, &[1u8; 4096])));
        let remote = RemoteBuf { addr: 64, rkey: 9 };
        let message = attach_remote(frame.head(), remote).unwrap();
        let Carried::Remote {
            mut stream_head, ..
        } = inspect(&message).unwrap()
        else {
            panic!()
        };
        let mut fetched = vec![1u8; 4096];
        fetched[100] ^= 0x10;
        stream_head.extend_from_slice(&fetched);
        assert_eq!(
            decode(Bytes::from(stream_head)),
            Err(DecodeError::PayloadChecksum {
                kind: Kind::Write,
                id: 7
            })
        );
    }

    #[test]
    fn a_read_names_its_buffer_and_its_reply_says_how_much_was_placed() {
        let frame = encode(&Message::Request(request(Op::Read, &[])));
        let message = attach_remote(frame.head(), RemoteBuf { addr: 1, rkey: 2 }).unwrap();
        assert!(matches!(
            inspect(&message).unwrap(),
            Carried::Remote {
                kind: Kind::Read,
                payload_len: 0,
                length: 4096,
                ..
            }
        ));
        let reply = encode(&Message::Reply(Reply {
            id: 7,
            status: Status::Ok,
            exec_seq: 0,
            payload: Bytes::from(vec![3u8; 4096]),
        }));
        assert_eq!(
            inspect(reply.head()).unwrap(),
            Carried::Reply {
                id: 7,
                payload_len: 4096
            }
        );
    }

    #[test]
    fn a_message_that_is_not_exactly_its_head_or_fails_its_checksum_is_refused() {
        let frame = encode(&Message::Request(request(Op::Read, &[])));
        let message = attach_remote(frame.head(), RemoteBuf { addr: 1, rkey: 2 }).unwrap();
        let mut longer = message.clone();
        longer.push(0);
        assert_eq!(inspect(&longer), Err(DecodeError::BadLength));
        let mut flipped = message.clone();
        flipped[PREFIX_LEN + 33] ^= 1; // the remote address
        assert_eq!(inspect(&flipped), Err(DecodeError::HeaderChecksum));
        // A stream-form WRITE head claims a payload no message carries.
        let write = encode(&Message::Request(request(Op::Write, &[0u8; 4096])));
        assert!(inspect(write.head()).is_err());
        assert_eq!(
            inspect(encode(&Message::Ping { token: 1 }).head()),
            Ok(Carried::Plain)
        );
    }

    #[test]
    fn only_stream_form_reads_and_writes_take_a_remote_buffer() {
        let flush = encode(&Message::Request(Request {
            op: Op::Flush,
            offset: 0,
            length: 0,
            ..request(Op::Flush, &[])
        }));
        assert!(attach_remote(flush.head(), RemoteBuf { addr: 1, rkey: 1 }).is_err());
        let read = encode(&Message::Request(request(Op::Read, &[])));
        let once = attach_remote(read.head(), RemoteBuf { addr: 1, rkey: 1 }).unwrap();
        assert!(attach_remote(&once, RemoteBuf { addr: 1, rkey: 1 }).is_err());
    }
}
