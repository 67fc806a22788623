//! Encoding and decoding of single frames, byte-exact to docs/PROTOCOL.md.
//! All integers are little-endian.

use super::message::*;
use super::{MAGIC, MAX_BODY_LEN, MAX_NAME_LEN, MAX_PAYLOAD_LEN, PREFIX_LEN, VERSION};
use crate::auth::{NONCE_LEN, PROOF_LEN};
use bytes::Bytes;
use std::fmt;
use std::fs::File;
use std::sync::Arc;

/// Body length of an IO request without / with a remote buffer.
const REQUEST_BODY_LEN: usize = 32;
const REQUEST_BODY_LEN_REMOTE: usize = 48;
const REPLY_BODY_LEN: usize = 24;
const INLINE_HEAD: usize = PREFIX_LEN + REQUEST_BODY_LEN_REMOTE;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the prefix and body need.
    Truncated,
    /// The first four bytes are not `BRD1`.
    BadMagic,
    /// A protocol version this code does not speak.
    BadVersion(u8),
    /// The prefix and body fail their checksum; on a stream the framing can
    /// no longer be trusted.
    HeaderChecksum,
    /// Lengths in the prefix disagree with the frame or exceed limits.
    BadLength,
    /// A kind byte this version does not know.
    UnknownKind(u8),
    /// The body does not have the layout its kind requires.
    Malformed(&'static str),
    /// The header is sound but the payload failed its checksum. The request
    /// or reply named here must not be acted upon; its id is trustworthy.
    PayloadChecksum {
        /// The frame's kind.
        kind: Kind,
        /// Request id from the (verified) body, 0 if the kind has none.
        id: u64,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated frame"),
            DecodeError::BadMagic => f.write_str("bad magic (not a braid frame)"),
            DecodeError::BadVersion(v) => write!(f, "unsupported frame version {v}"),
            DecodeError::HeaderChecksum => f.write_str("header checksum mismatch"),
            DecodeError::BadLength => f.write_str("frame lengths inconsistent or over limit"),
            DecodeError::UnknownKind(k) => write!(f, "unknown frame kind {k:#04x}"),
            DecodeError::Malformed(what) => write!(f, "malformed body: {what}"),
            DecodeError::PayloadChecksum { kind, id } => {
                write!(f, "payload checksum mismatch in {kind:?} id {id}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// An encoded frame ready for a vectored write: the prefix and body, and the
/// payload, which is shared rather than copied.
#[derive(Clone)]
pub struct OutFrame {
    head: Head,
    /// The payload (write data or read data), possibly empty.
    pub payload: Bytes,
    /// Or the payload's bytes are in a file: see [`encode_reply_from_file`].
    file: Option<FileSlice>,
}

/// Bytes of a file a frame carries as its payload, for a driver to send
/// with `sendfile` straight from the page cache: no copy through the
/// process (over TCP the socket takes references to the cached pages).
#[derive(Debug, Clone)]
pub struct FileSlice {
    /// The file, open for reading.
    pub file: Arc<File>,
    /// Where the bytes start in it.
    pub offset: u64,
    /// How many.
    pub len: u32,
}

#[derive(Clone)]
enum Head {
    Inline { len: u8, buf: [u8; INLINE_HEAD] },
    Heap(Vec<u8>),
}

impl OutFrame {
    /// Prefix and body.
    pub fn head(&self) -> &[u8] {
        match &self.head {
            Head::Inline { len, buf } => &buf[..*len as usize],
            Head::Heap(v) => v,
        }
    }

    /// Total length on the wire.
    pub fn len(&self) -> usize {
        let from_file = self.file.as_ref().map_or(0, |f| f.len as usize);
        self.head().len() + self.payload.len() + from_file
    }

    /// The file bytes that are this frame's payload, if they are to be
    /// sent from a file; they follow [`OutFrame::head`] on the wire.
    pub fn file_payload(&self) -> Option<&FileSlice> {
        self.file.as_ref()
    }

    /// Puts a file payload's bytes, read by the driver, in memory, for a
    /// link that cannot send from a file (TLS, RDMA). Refuses bytes of
    /// another length: the head already announced the payload's.
    pub fn fill_file_payload(&mut self, data: Bytes) -> Result<(), Bytes> {
        match &self.file {
            Some(f) if f.len as usize == data.len() => {
                self.file = None;
                self.payload = data;
                Ok(())
            }
            _ => Err(data),
        }
    }

    /// Never true: a frame has at least its prefix.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole frame in one buffer (copies; for tests and datagram sinks).
    /// A frame whose payload is still in a file must be filled first.
    pub fn to_bytes(&self) -> Bytes {
        assert!(
            self.file.is_none(),
            "to_bytes on a frame whose payload is in a file"
        );
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(self.head());
        v.extend_from_slice(&self.payload);
        Bytes::from(v)
    }
}

impl fmt::Debug for OutFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutFrame")
            .field("head_len", &self.head().len())
            .field("payload_len", &self.payload.len())
            .field("file", &self.file)
            .finish()
    }
}

/// Accumulates a body: IO bodies (at most 48 bytes) stay on the stack;
/// the longer handshake bodies spill to the heap.
struct BodyWriter {
    buf: [u8; REQUEST_BODY_LEN_REMOTE],
    len: usize,
    spill: Vec<u8>,
}

impl BodyWriter {
    fn new() -> Self {
        BodyWriter {
            buf: [0; REQUEST_BODY_LEN_REMOTE],
            len: 0,
            spill: Vec::new(),
        }
    }
    fn put(&mut self, bytes: &[u8]) {
        if self.spill.is_empty() && self.len + bytes.len() <= self.buf.len() {
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.buf[..self.len]);
            }
            self.spill.extend_from_slice(bytes);
        }
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn name(&mut self, s: &str) {
        let bytes = &s.as_bytes()[..s.len().min(MAX_NAME_LEN)];
        self.u8(bytes.len() as u8);
        self.put(bytes);
    }
    fn body(&self) -> &[u8] {
        if self.spill.is_empty() {
            &self.buf[..self.len]
        } else {
            &self.spill
        }
    }
}

/// The CRC32C of a payload. Payloads are nearly all of a frame's bytes, so
/// this takes the fastest implementation the CPU allows (see
/// [`Hasher::fastest`]). The same checksum as the crc32c crate, which the
/// short header CRCs keep using (a test holds them equal).
fn payload_crc(payload: &[u8]) -> u32 {
    Hasher::fastest().checksum(payload)
}

/// How payload CRCs are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hasher {
    /// crc-fast, which folds with VPCLMULQDQ on 512-bit registers where
    /// the CPU has AVX-512 (`cargo bench -p braid-core --bench engine --
    /// codec`, 1 MiB: 18.1 µs against the crc32c crate's 37.5 µs; 4 KiB
    /// write encode 165 against 261 ns), and on aarch64.
    Folding,
    /// The crc32c crate: three interleaved streams of the CRC32
    /// instruction. On x86 without AVX-512 crc-fast falls back to 128-bit
    /// folds, and there this wins (AMD EPYC, Zen 3: 1 MiB 48-58 µs against
    /// 62-87 in a loop; under `braid bench` 1 MiB writes, both processes'
    /// passes 204 -> 175 µs per MiB by perf).
    Interleaved,
}

impl Hasher {
    fn fastest() -> Hasher {
        #[cfg(target_arch = "x86_64")]
        {
            // The same test crc-fast makes for its 512-bit path.
            if !(std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("vpclmulqdq"))
            {
                return Hasher::Interleaved;
            }
        }
        Hasher::Folding
    }

    fn checksum(self, bytes: &[u8]) -> u32 {
        match self {
            Hasher::Folding => crc_fast::crc32_iscsi(bytes),
            Hasher::Interleaved => crc32c::crc32c(bytes),
        }
    }
}

/// A payload CRC computed piece by piece: for payload bytes that are never
/// in memory all at once (a reply sent from a file), or that arrive over
/// time (see [`super::FrameReader`]).
#[derive(Debug, Clone)]
pub struct PayloadCrc(Running);

// One per frame being read or file reply being hashed, as large as
// crc-fast's digest always was: boxing it would allocate per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Running {
    Folding(crc_fast::Digest),
    /// The checksum of what was hashed so far, which the crc32c crate
    /// carries on from.
    Interleaved(u32),
}

impl PayloadCrc {
    /// Nothing hashed yet.
    pub fn new() -> PayloadCrc {
        PayloadCrc::with(Hasher::fastest())
    }

    fn with(hasher: Hasher) -> PayloadCrc {
        PayloadCrc(match hasher {
            Hasher::Folding => {
                Running::Folding(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
            }
            Hasher::Interleaved => Running::Interleaved(0),
        })
    }

    /// Hashes the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.0 {
            Running::Folding(digest) => digest.update(bytes),
            Running::Interleaved(crc) => *crc = crc32c::crc32c_append(*crc, bytes),
        }
    }

    /// The checksum of everything hashed.
    pub fn finish(&self) -> u32 {
        match &self.0 {
            Running::Folding(digest) => digest.finalize() as u32,
            Running::Interleaved(crc) => *crc,
        }
    }
}

impl Default for PayloadCrc {
    fn default() -> Self {
        PayloadCrc::new()
    }
}

/// Encodes a message. Names longer than 255 bytes are truncated; callers
/// validate configuration before it reaches the wire.
pub fn encode(msg: &Message) -> OutFrame {
    let payload = match msg {
        Message::Request(r) => r.payload.clone(),
        Message::Reply(r) => r.payload.clone(),
        _ => Bytes::new(),
    };
    let head = encode_head(msg, payload.len(), payload_crc(&payload));
    OutFrame {
        head,
        payload,
        file: None,
    }
}

/// Encodes a reply whose data the driver sends from `data` (see
/// [`FileSlice`]); `crc` is the payload CRC of those bytes as they were
/// read. Should the file change before they leave, the client sees a
/// payload checksum mismatch and asks again, as for any damaged reply.
pub fn encode_reply_from_file(
    id: u64,
    status: Status,
    exec_seq: u64,
    data: FileSlice,
    crc: u32,
) -> OutFrame {
    let msg = Message::Reply(Reply {
        id,
        status,
        exec_seq,
        payload: Bytes::new(),
    });
    OutFrame {
        head: encode_head(&msg, data.len as usize, crc),
        payload: Bytes::new(),
        file: Some(data),
    }
}

/// The prefix and body of `msg`, announcing a payload of `payload_len`
/// bytes with checksum `crc` (the message's own payload is not looked at).
fn encode_head(msg: &Message, payload_len: usize, crc: u32) -> Head {
    let mut b = BodyWriter::new();
    match msg {
        Message::Hello(h) => {
            b.u16(h.version_min);
            b.u16(h.version_max);
            b.u32(h.features);
            b.u64(h.session_id);
            b.put(&h.client_nonce);
            b.u64(h.owner);
            b.u64(h.epoch);
            b.name(&h.key_id);
            b.name(&h.export);
        }
        Message::Challenge(c) => {
            b.u16(c.version);
            b.u16(0);
            b.u32(c.features);
            b.u64(c.boot_id);
            b.put(&c.server_nonce);
            b.put(&c.server_proof);
        }
        Message::Auth(a) => b.put(&a.client_proof),
        Message::Welcome(w) => {
            b.u64(w.session_id);
            b.u64(w.boot_id);
            b.u64(w.export_size);
            b.u32(w.block_size);
            b.u32(w.max_payload);
            b.u32(w.max_inflight);
            b.u32(w.id_window);
            b.u32(w.export_flags);
            b.u32(w.flags);
        }
        Message::Reject(r) => {
            b.u32(r.code.code());
            b.name(&r.message);
        }
        Message::Request(r) => {
            let mut flags = r.flags & !FLAG_REMOTE_BUF;
            if r.remote.is_some() {
                flags |= FLAG_REMOTE_BUF;
            }
            b.u64(r.id);
            b.u64(r.floor);
            b.u64(r.offset);
            b.u32(r.length);
            b.u16(flags);
            b.u16(0);
            if let Some(rb) = r.remote {
                b.u64(rb.addr);
                b.u32(rb.rkey);
                b.u32(0);
            }
        }
        Message::Reply(r) => {
            b.u64(r.id);
            b.u32(r.status.code());
            b.u32(0);
            b.u64(r.exec_seq);
        }
        Message::Ping { token } | Message::Pong { token } => b.u64(*token),
        Message::Goodbye => {}
    }
    let body = b.body();
    let mut prefix = [0u8; PREFIX_LEN];
    prefix[0..4].copy_from_slice(&MAGIC);
    prefix[4] = VERSION;
    prefix[5] = msg.kind() as u8;
    prefix[6..8].copy_from_slice(&(body.len() as u16).to_le_bytes());
    prefix[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    prefix[12..16].copy_from_slice(&crc.to_le_bytes());
    let header_crc = crc32c::crc32c_append(crc32c::crc32c(&prefix[..16]), body);
    prefix[16..20].copy_from_slice(&header_crc.to_le_bytes());

    let head_len = PREFIX_LEN + body.len();
    if head_len <= INLINE_HEAD {
        let mut buf = [0u8; INLINE_HEAD];
        buf[..PREFIX_LEN].copy_from_slice(&prefix);
        buf[PREFIX_LEN..head_len].copy_from_slice(body);
        Head::Inline {
            len: head_len as u8,
            buf,
        }
    } else {
        let mut v = Vec::with_capacity(head_len);
        v.extend_from_slice(&prefix);
        v.extend_from_slice(body);
        Head::Heap(v)
    }
}

/// The fields of a prefix, read without trusting them yet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Prefix {
    pub(super) kind: u8,
    pub(super) body_len: usize,
    pub(super) payload_len: usize,
    pub(super) payload_crc: u32,
    pub(super) header_crc: u32,
}

/// Parses and sanity-checks the 20-byte prefix.
pub(super) fn parse_prefix(bytes: &[u8]) -> Result<Prefix, DecodeError> {
    if bytes.len() < PREFIX_LEN {
        return Err(DecodeError::Truncated);
    }
    if bytes[0..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(DecodeError::BadVersion(bytes[4]));
    }
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let body_len = u16::from_le_bytes([bytes[6], bytes[7]]) as usize;
    let payload_len = le32(8);
    if body_len > MAX_BODY_LEN || payload_len > MAX_PAYLOAD_LEN {
        return Err(DecodeError::BadLength);
    }
    Ok(Prefix {
        kind: bytes[5],
        body_len,
        payload_len: payload_len as usize,
        payload_crc: le32(12),
        header_crc: le32(16),
    })
}

/// Verifies the header checksum given the prefix and body bytes.
pub(super) fn header_ok(prefix: &Prefix, head: &[u8]) -> bool {
    let body = &head[PREFIX_LEN..PREFIX_LEN + prefix.body_len];
    crc32c::crc32c_append(crc32c::crc32c(&head[..16]), body) == prefix.header_crc
}

struct BodyReader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> BodyReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.body.len());
        let end = end.ok_or(DecodeError::Malformed("body too short"))?;
        let s = &self.body[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn name(&mut self) -> Result<String, DecodeError> {
        let len = self.u8()? as usize;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Malformed("name is not UTF-8"))
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.at == self.body.len() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("trailing bytes in body"))
        }
    }
}

/// A frame as received: its bytes, and whether its payload's checksum
/// was already verified on the way in ([`super::FrameReader`] does so as
/// the bytes arrive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFrame {
    bytes: Bytes,
    payload_ok: Option<bool>,
}

impl InFrame {
    /// Bytes whose payload checksum `payload_ok` says whether they match.
    pub(super) fn checked(bytes: Bytes, payload_ok: bool) -> InFrame {
        InFrame {
            bytes,
            payload_ok: Some(payload_ok),
        }
    }

    /// The frame's bytes.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

/// Bytes nobody has checked yet.
impl From<Bytes> for InFrame {
    fn from(bytes: Bytes) -> InFrame {
        InFrame {
            bytes,
            payload_ok: None,
        }
    }
}

/// Decodes exactly one frame. The payload of the returned message shares
/// `frame`'s memory.
pub fn decode(frame: Bytes) -> Result<Message, DecodeError> {
    decode_in(frame.into())
}

/// [`decode`], taking the payload checksum's verdict from the frame where
/// it was already verified.
pub fn decode_in(frame: InFrame) -> Result<Message, DecodeError> {
    let InFrame {
        bytes: frame,
        payload_ok,
    } = frame;
    let prefix = parse_prefix(&frame)?;
    let head_len = PREFIX_LEN + prefix.body_len;
    if frame.len() < head_len {
        return Err(DecodeError::Truncated);
    }
    if frame.len() != head_len + prefix.payload_len {
        return Err(DecodeError::BadLength);
    }
    if !header_ok(&prefix, &frame) {
        return Err(DecodeError::HeaderChecksum);
    }
    let kind = Kind::from_u8(prefix.kind).ok_or(DecodeError::UnknownKind(prefix.kind))?;
    let mut r = BodyReader {
        body: &frame[PREFIX_LEN..head_len],
        at: 0,
    };
    let payload = frame.slice(head_len..);
    let payload_ok = payload_ok.unwrap_or_else(|| payload_crc(&payload) == prefix.payload_crc);
    let no_payload = |p: &Bytes| {
        if p.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("unexpected payload"))
        }
    };
    let msg = match kind {
        Kind::Hello => {
            let hello = Hello {
                version_min: r.u16()?,
                version_max: r.u16()?,
                features: r.u32()?,
                session_id: r.u64()?,
                client_nonce: r.array::<NONCE_LEN>()?,
                owner: r.u64()?,
                epoch: r.u64()?,
                key_id: r.name()?,
                export: r.name()?,
            };
            Message::Hello(hello)
        }
        Kind::Challenge => {
            let version = r.u16()?;
            let _reserved = r.u16()?;
            Message::Challenge(Challenge {
                version,
                features: r.u32()?,
                boot_id: r.u64()?,
                server_nonce: r.array::<NONCE_LEN>()?,
                server_proof: r.array::<PROOF_LEN>()?,
            })
        }
        Kind::Auth => Message::Auth(Auth {
            client_proof: r.array::<PROOF_LEN>()?,
        }),
        Kind::Welcome => Message::Welcome(Welcome {
            session_id: r.u64()?,
            boot_id: r.u64()?,
            export_size: r.u64()?,
            block_size: r.u32()?,
            max_payload: r.u32()?,
            max_inflight: r.u32()?,
            id_window: r.u32()?,
            export_flags: r.u32()?,
            flags: r.u32()?,
        }),
        Kind::Reject => Message::Reject(Reject {
            code: RejectCode::from_code(r.u32()?),
            message: r.name()?,
        }),
        Kind::Read | Kind::Write | Kind::Flush | Kind::Trim | Kind::WriteZeroes => {
            let op = match kind {
                Kind::Read => Op::Read,
                Kind::Write => Op::Write,
                Kind::Flush => Op::Flush,
                Kind::Trim => Op::Trim,
                _ => Op::WriteZeroes,
            };
            if prefix.body_len != REQUEST_BODY_LEN && prefix.body_len != REQUEST_BODY_LEN_REMOTE {
                return Err(DecodeError::Malformed("request body length"));
            }
            let id = r.u64()?;
            if !payload_ok {
                return Err(DecodeError::PayloadChecksum { kind, id });
            }
            let floor = r.u64()?;
            let offset = r.u64()?;
            let length = r.u32()?;
            let flags = r.u16()?;
            let _reserved = r.u16()?;
            if flags & !REQUEST_FLAGS_KNOWN != 0 {
                return Err(DecodeError::Malformed("unknown request flags"));
            }
            let remote = if flags & FLAG_REMOTE_BUF != 0 {
                let addr = r.u64()?;
                let rkey = r.u32()?;
                let _reserved = r.u32()?;
                Some(RemoteBuf { addr, rkey })
            } else {
                None
            };
            if op != Op::Write || remote.is_some() {
                no_payload(&payload)?;
            }
            Message::Request(Request {
                op,
                id,
                floor,
                offset,
                length,
                flags: flags & !FLAG_REMOTE_BUF,
                remote,
                payload: payload.clone(),
            })
        }
        Kind::Reply => {
            if prefix.body_len != REPLY_BODY_LEN {
                return Err(DecodeError::Malformed("reply body length"));
            }
            let id = r.u64()?;
            if !payload_ok {
                return Err(DecodeError::PayloadChecksum { kind, id });
            }
            let status = Status::from_code(r.u32()?);
            let _reserved = r.u32()?;
            Message::Reply(Reply {
                id,
                status,
                exec_seq: r.u64()?,
                payload: payload.clone(),
            })
        }
        Kind::Ping => Message::Ping { token: r.u64()? },
        Kind::Pong => Message::Pong { token: r.u64()? },
        Kind::Goodbye => Message::Goodbye,
    };
    r.finish()?;
    if !payload_ok {
        return Err(DecodeError::PayloadChecksum { kind, id: 0 });
    }
    if !matches!(msg, Message::Request(_) | Message::Reply(_)) {
        no_payload(&payload)?;
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Every peer computes payload CRCs with the crc32c crate or another
    /// CRC32C: the fast path must agree on every length, including the
    /// short tails and the sizes where its folding loops change.
    #[test]
    fn the_payload_crc_is_crc32c_at_every_length() {
        let mut rng = SplitMix64::new(7);
        let data: Vec<u8> = (0..(1 << 20) + 3).map(|_| rng.next_u64() as u8).collect();
        let mut lengths: Vec<usize> = (0..=300).collect();
        lengths.extend([
            511,
            512,
            1023,
            1024,
            4095,
            4096,
            4097,
            65536,
            1 << 20,
            (1 << 20) + 3,
        ]);
        for len in lengths {
            for start in [0, 1, 3] {
                let slice = &data[start.min(data.len() - len)..][..len];
                for hasher in [Hasher::Folding, Hasher::Interleaved] {
                    assert_eq!(
                        hasher.checksum(slice),
                        crc32c::crc32c(slice),
                        "{hasher:?}, length {len} at {start}"
                    );
                }
            }
        }
    }

    /// A payload hashed in pieces of any size has the checksum of the whole.
    #[test]
    fn a_payload_crc_taken_piece_by_piece_is_the_whole_ones() {
        let mut rng = SplitMix64::new(11);
        let data: Vec<u8> = (0..(1 << 20) + 5).map(|_| rng.next_u64() as u8).collect();
        for hasher in [Hasher::Folding, Hasher::Interleaved] {
            for piece in [1, 7, 4096, 65536, 300_000] {
                let mut crc = PayloadCrc::with(hasher);
                for chunk in data.chunks(piece) {
                    crc.update(chunk);
                }
                let whole = crc32c::crc32c(&data);
                assert_eq!(crc.finish(), whole, "{hasher:?}, pieces of {piece}");
            }
            assert_eq!(PayloadCrc::with(hasher).finish(), 0, "{hasher:?}");
        }
    }

    /// A reply sent from a file is, once its bytes are read in, the very
    /// frame the same reply encodes to from memory.
    #[test]
    fn a_reply_from_a_file_is_the_same_frame_as_from_memory() {
        use std::io::Write;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut file = tempfile().unwrap();
        file.write_all(&[0xEE; 4096]).unwrap();
        file.write_all(&data).unwrap();
        let slice = FileSlice {
            file: Arc::new(file),
            offset: 4096,
            len: data.len() as u32,
        };
        let mut from_file = encode_reply_from_file(9, Status::Ok, 3, slice, payload_crc(&data));
        let from_memory = encode(&Message::Reply(Reply {
            id: 9,
            status: Status::Ok,
            exec_seq: 3,
            payload: Bytes::from(data.clone()),
        }));
        assert_eq!(from_file.head(), from_memory.head());
        assert_eq!(from_file.len(), from_memory.len());
        assert!(from_file.payload.is_empty());
        assert_eq!(from_file.file_payload().map(|f| f.len), Some(300_000));

        assert!(
            from_file
                .fill_file_payload(Bytes::from_static(b"short"))
                .is_err(),
            "bytes of another length are refused"
        );
        from_file.fill_file_payload(Bytes::from(data)).unwrap();
        assert!(from_file.file_payload().is_none());
        assert_eq!(from_file.to_bytes(), from_memory.to_bytes());
    }

    /// A temporary file, gone when closed.
    fn tempfile() -> std::io::Result<File> {
        let path = std::env::temp_dir().join(format!(
            "braid-codec-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(file)
    }
}
