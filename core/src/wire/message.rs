//! Messages as values. Field order and sizes are fixed by docs/PROTOCOL.md.

use crate::auth::{NONCE_LEN, PROOF_LEN};
use bytes::Bytes;

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Client opens a channel.
    Hello = 0x01,
    /// Server's nonce and proof.
    Challenge = 0x02,
    /// Client's proof.
    Auth = 0x03,
    /// Channel joined a session.
    Welcome = 0x04,
    /// Handshake refused.
    Reject = 0x05,
    /// Read request.
    Read = 0x10,
    /// Write request.
    Write = 0x11,
    /// Flush request.
    Flush = 0x12,
    /// Trim (deallocate, reads return zeroes).
    Trim = 0x13,
    /// Write zeroes.
    WriteZeroes = 0x14,
    /// Reply to any request.
    Reply = 0x20,
    /// Keep-alive probe.
    Ping = 0x30,
    /// Keep-alive answer.
    Pong = 0x31,
    /// Client leaves the session for good.
    Goodbye = 0x32,
}

impl Kind {
    /// Parses a kind byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::Hello,
            0x02 => Kind::Challenge,
            0x03 => Kind::Auth,
            0x04 => Kind::Welcome,
            0x05 => Kind::Reject,
            0x10 => Kind::Read,
            0x11 => Kind::Write,
            0x12 => Kind::Flush,
            0x13 => Kind::Trim,
            0x14 => Kind::WriteZeroes,
            0x20 => Kind::Reply,
            0x30 => Kind::Ping,
            0x31 => Kind::Pong,
            0x32 => Kind::Goodbye,
            _ => return None,
        })
    }
}

/// A block operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read `length` bytes.
    Read,
    /// Write the payload.
    Write,
    /// Make every write acknowledged so far durable.
    Flush,
    /// Deallocate; afterwards the range reads as zeroes.
    Trim,
    /// Write zeroes (the server may deallocate unless `NO_UNMAP`).
    WriteZeroes,
}

impl Op {
    /// The frame kind that carries this op.
    pub fn kind(self) -> Kind {
        match self {
            Op::Read => Kind::Read,
            Op::Write => Kind::Write,
            Op::Flush => Kind::Flush,
            Op::Trim => Kind::Trim,
            Op::WriteZeroes => Kind::WriteZeroes,
        }
    }

    /// Whether executing it changes the device (and so must happen once).
    pub fn mutates(self) -> bool {
        matches!(self, Op::Write | Op::Trim | Op::WriteZeroes)
    }
}

/// Request flag: stable storage before the reply.
pub const FLAG_FUA: u16 = 1 << 0;
/// Request flag (write-zeroes): keep the range allocated.
pub const FLAG_NO_UNMAP: u16 = 1 << 1;
/// Request flag: body carries a remote buffer (RDMA transport).
pub const FLAG_REMOTE_BUF: u16 = 1 << 2;
/// Every request flag this version knows.
pub const REQUEST_FLAGS_KNOWN: u16 = FLAG_FUA | FLAG_NO_UNMAP | FLAG_REMOTE_BUF;

/// Feature bit: the client can register buffers for RDMA data movement.
pub const FEATURE_RDMA: u32 = 1 << 0;

/// Export flag: writes are refused.
pub const EXPORT_READ_ONLY: u32 = 1 << 0;
/// Export flag: FLUSH is meaningful (backend has a volatile cache).
pub const EXPORT_SEND_FLUSH: u32 = 1 << 1;
/// Export flag: FUA honoured natively.
pub const EXPORT_SEND_FUA: u32 = 1 << 2;
/// Export flag: TRIM supported.
pub const EXPORT_TRIM: u32 = 1 << 3;
/// Export flag: WRITE_ZEROES supported.
pub const EXPORT_WRITE_ZEROES: u32 = 1 << 4;

/// Welcome flag: the channel joined an existing session.
pub const WELCOME_RESUMED: u32 = 1 << 0;

/// First message on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub version_min: u16,
    /// Highest protocol version the client speaks.
    pub version_max: u16,
    /// Feature bits the client offers.
    pub features: u32,
    /// Session to join, 0 to create one.
    pub session_id: u64,
    /// Fresh client nonce.
    pub client_nonce: [u8; NONCE_LEN],
    /// Who the client is across restarts (0: anonymous, never fenced).
    pub owner: u64,
    /// Which run of `owner` this is: a session opened with a higher epoch
    /// ends the owner's older sessions on that export (docs/PROTOCOL.md §7).
    pub epoch: u64,
    /// Which pre-shared key the client holds.
    pub key_id: String,
    /// Which export it wants.
    pub export: String,
}

/// Server's answer to Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Version chosen.
    pub version: u16,
    /// Features accepted (a subset of those offered).
    pub features: u32,
    /// Changes every time the server process starts.
    pub boot_id: u64,
    /// Fresh server nonce.
    pub server_nonce: [u8; NONCE_LEN],
    /// Server's proof over the transcript.
    pub server_proof: [u8; PROOF_LEN],
}

/// Client's proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Client's proof over the transcript.
    pub client_proof: [u8; PROOF_LEN],
}

/// The channel is part of a session and may carry requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The session.
    pub session_id: u64,
    /// The server's boot id (repeated for clarity).
    pub boot_id: u64,
    /// Export size in bytes.
    pub export_size: u64,
    /// Offsets and lengths must be multiples of this.
    pub block_size: u32,
    /// Largest payload of one request.
    pub max_payload: u32,
    /// Most requests the client may have outstanding.
    pub max_inflight: u32,
    /// Highest id - floor the server accepts.
    pub id_window: u32,
    /// EXPORT_* bits.
    pub export_flags: u32,
    /// WELCOME_* bits.
    pub flags: u32,
}

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// Unknown key id or wrong proof.
    AuthFailed,
    /// No export of that name.
    NoSuchExport,
    /// No common protocol version.
    VersionMismatch,
    /// The session to join does not exist (anymore).
    SessionUnknown,
    /// Too many sessions or channels.
    Busy,
    /// The handshake frame made no sense.
    Malformed,
    /// The server is shutting down.
    ShuttingDown,
    /// A newer run of the same client (a higher epoch) holds the export.
    Fenced,
    /// A code this version does not know.
    Other(u32),
}

impl RejectCode {
    /// Wire value.
    pub fn code(self) -> u32 {
        match self {
            RejectCode::AuthFailed => 1,
            RejectCode::NoSuchExport => 2,
            RejectCode::VersionMismatch => 3,
            RejectCode::SessionUnknown => 4,
            RejectCode::Busy => 5,
            RejectCode::Malformed => 6,
            RejectCode::ShuttingDown => 7,
            RejectCode::Fenced => 8,
            RejectCode::Other(c) => c,
        }
    }

    /// From wire value.
    pub fn from_code(c: u32) -> Self {
        match c {
            1 => RejectCode::AuthFailed,
            2 => RejectCode::NoSuchExport,
            3 => RejectCode::VersionMismatch,
            4 => RejectCode::SessionUnknown,
            5 => RejectCode::Busy,
            6 => RejectCode::Malformed,
            7 => RejectCode::ShuttingDown,
            8 => RejectCode::Fenced,
            other => RejectCode::Other(other),
        }
    }
}

/// Handshake refused; the server closes the connection after sending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Why.
    pub code: RejectCode,
    /// Human-readable detail (UTF-8, at most 255 bytes).
    pub message: String,
}

/// Where the client registered a buffer for RDMA data movement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuf {
    /// Virtual address in the client's registration.
    pub addr: u64,
    /// Remote key of the registration.
    pub rkey: u32,
}

/// A block request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Session-unique request id, never reused.
    pub id: u64,
    /// Every id below this is finished for the client and will not be sent
    /// again; the server may forget them.
    pub floor: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (0 for FLUSH).
    pub length: u32,
    /// FLAG_* bits.
    pub flags: u16,
    /// RDMA buffer (with FLAG_REMOTE_BUF).
    pub remote: Option<RemoteBuf>,
    /// Write data on a stream transport.
    pub payload: Bytes,
}

/// Outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Done.
    Ok,
    /// The backend reported a media error.
    Io,
    /// The backend is full.
    NoSpace,
    /// Offset + length past the end of the export.
    OutOfRange,
    /// Write to a read-only export.
    ReadOnly,
    /// Misaligned, zero-length, too long or inconsistent request.
    Invalid,
    /// The export does not support this op.
    Unsupported,
    /// The request's payload failed its checksum: not executed, resend it.
    Corrupt,
    /// A code this version does not know.
    Other(u32),
}

impl Status {
    /// Wire value.
    pub fn code(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::Io => 1,
            Status::NoSpace => 2,
            Status::OutOfRange => 3,
            Status::ReadOnly => 4,
            Status::Invalid => 5,
            Status::Unsupported => 6,
            Status::Corrupt => 7,
            Status::Other(c) => c,
        }
    }

    /// From wire value.
    pub fn from_code(c: u32) -> Self {
        match c {
            0 => Status::Ok,
            1 => Status::Io,
            2 => Status::NoSpace,
            3 => Status::OutOfRange,
            4 => Status::ReadOnly,
            5 => Status::Invalid,
            6 => Status::Unsupported,
            7 => Status::Corrupt,
            other => Status::Other(other),
        }
    }
}

/// Answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's id.
    pub id: u64,
    /// Outcome.
    pub status: Status,
    /// For a successful mutating request, its position in the order the
    /// session's writes reached the backend (orders the client's replay of
    /// unflushed data after a server power loss); 0 otherwise.
    pub exec_seq: u64,
    /// Read data on a stream transport.
    pub payload: Bytes,
}

/// Every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Challenge`].
    Challenge(Challenge),
    /// See [`Auth`].
    Auth(Auth),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Reject`].
    Reject(Reject),
    /// See [`Request`].
    Request(Request),
    /// See [`Reply`].
    Reply(Reply),
    /// Keep-alive probe; the token comes back in the Pong.
    Ping {
        /// Echoed.
        token: u64,
    },
    /// Keep-alive answer.
    Pong {
        /// The Ping's token.
        token: u64,
    },
    /// The client is done with the session; the server frees it.
    Goodbye,
}

impl Message {
    /// The frame kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Challenge(_) => Kind::Challenge,
            Message::Auth(_) => Kind::Auth,
            Message::Welcome(_) => Kind::Welcome,
            Message::Reject(_) => Kind::Reject,
            Message::Request(r) => r.op.kind(),
            Message::Reply(_) => Kind::Reply,
            Message::Ping { .. } => Kind::Ping,
            Message::Pong { .. } => Kind::Pong,
            Message::Goodbye => Kind::Goodbye,
        }
    }
}
