//! One NBD connection: negotiation, then transmission.

use crate::proto::*;
use crate::NbdExport;
use braid_core::server::{Backend, BackendOp};
use braid_core::wire::Status;
use bytes::{BufMut, Bytes, BytesMut};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

pub(crate) async fn run(
    mut stream: TcpStream,
    exports: Arc<Vec<NbdExport>>,
    backend: Arc<dyn Backend>,
) -> io::Result<()> {
    let Some(export) = negotiate(&mut stream, &exports).await? else {
        return Ok(());
    };
    transmit(stream, export, backend).await
}

async fn send_option_reply(
    s: &mut TcpStream,
    option: u32,
    reply: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPT_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(reply);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    s.write_all(&b).await
}

fn transmission_flags(e: &NbdExport) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_CACHE
        // FLUSH is fdatasync of the whole export, so a flush on one
        // connection covers writes completed on every other: the spec's
        // condition for CAN_MULTI_CONN.
        | TFLAG_CAN_MULTI_CONN;
    if e.read_only {
        f |= TFLAG_READ_ONLY;
    }
    f
}

fn find<'a>(exports: &'a [NbdExport], name: &str) -> Option<&'a NbdExport> {
    if name.is_empty() {
        return exports.first();
    }
    exports.iter().find(|e| e.name == name)
}

/// Fixed newstyle negotiation. Returns the chosen export, or `None` if the
/// client aborted.
async fn negotiate(s: &mut TcpStream, exports: &[NbdExport]) -> io::Result<Option<NbdExport>> {
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&hello).await?;
    let client_flags = s.read_u32().await?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        // "If the client sets flags the server does not know, the server
        // MUST close the connection."
        return Err(protocol_error(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        if s.read_u64().await? != IHAVEOPT {
            return Err(protocol_error("option without IHAVEOPT"));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > OPT_LEN_MAX {
            return Err(protocol_error(format!("option {option} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No way to report an error here: the spec says close.
                let Some(e) = find(exports, &name) else {
                    return Err(protocol_error(format!(
                        "EXPORT_NAME for unknown export {name:?}"
                    )));
                };
                let mut b = BytesMut::new();
                b.put_u64(e.size);
                b.put_u16(transmission_flags(e));
                if !no_zeroes {
                    b.put_bytes(0, 124);
                }
                s.write_all(&b).await?;
                return Ok(Some(e.clone()));
            }
            OPT_ABORT => {
                let _ = send_option_reply(s, option, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_option_reply(s, option, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for e in exports {
                    let mut d = BytesMut::new();
                    d.put_u32(e.name.len() as u32);
                    d.put_slice(e.name.as_bytes());
                    send_option_reply(s, option, REP_SERVER, &d).await?;
                }
                send_option_reply(s, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info_request(&data) else {
                    send_option_reply(s, option, REP_ERR_INVALID, b"malformed INFO/GO request")
                        .await?;
                    continue;
                };
                let Some(e) = find(exports, &name) else {
                    send_option_reply(s, option, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                };
                let mut info = BytesMut::new();
                info.put_u16(INFO_EXPORT);
                info.put_u64(e.size);
                info.put_u16(transmission_flags(e));
                send_option_reply(s, option, REP_INFO, &info).await?;
                // Block sizes go out whether asked for or not (a client that
                // did not ask ignores them), so the requests need no reading.
                let _requests = requests;
                let mut bs = BytesMut::new();
                bs.put_u16(INFO_BLOCK_SIZE);
                bs.put_u32(BLOCK_MIN);
                bs.put_u32(BLOCK_PREFERRED);
                bs.put_u32(BLOCK_MAX);
                send_option_reply(s, option, REP_INFO, &bs).await?;
                send_option_reply(s, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    return Ok(Some(e.clone()));
                }
            }
            // Everything else, including STARTTLS and STRUCTURED_REPLY for
            // now: "the server MUST reply with NBD_REP_ERR_UNSUP" and
            // negotiation goes on.
            _ => send_option_reply(s, option, REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
}

/// INFO/GO data: u32 name length, name, u16 count, count × u16.
fn parse_info_request(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(d.get(4..4 + n)?).ok()?.to_string();
    let rest = d.get(4 + n..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let reqs = rest.get(2..2 + 2 * count)?;
    if rest.len() != 2 + 2 * count {
        return None;
    }
    Some((
        name,
        reqs.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

fn errno(status: Status) -> u32 {
    match status {
        Status::Ok => 0,
        Status::NoSpace => ENOSPC,
        Status::ReadOnly => EPERM,
        Status::Invalid | Status::OutOfRange => EINVAL,
        Status::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

struct Reply {
    handle: u64,
    error: u32,
    data: Bytes,
}

/// The transmission phase: requests are read in order and may complete out
/// of order; a writer task sends replies as they finish.
async fn transmit(
    stream: TcpStream,
    export: NbdExport,
    backend: Arc<dyn Backend>,
) -> io::Result<()> {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            let mut head = [0u8; 16];
            head[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            head[4..8].copy_from_slice(&r.error.to_be_bytes());
            head[8..16].copy_from_slice(&r.handle.to_be_bytes());
            wr.write_all(&head).await?;
            if !r.data.is_empty() {
                wr.write_all(&r.data).await?;
            }
        }
        wr.shutdown().await
    });
    loop {
        let mut h = [0u8; 28];
        if let Err(e) = rd.read_exact(&mut h).await {
            drop(tx);
            let _ = writer.await;
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(protocol_error(format!("bad request magic {magic:#x}")));
        }
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let cmd = u16::from_be_bytes([h[6], h[7]]);
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
        let mut payload = Bytes::new();
        if cmd == CMD_WRITE {
            if len > BLOCK_MAX {
                // Too big to take in; the spec lets the server disconnect.
                return Err(protocol_error(format!("write of {len} bytes")));
            }
            let mut buf = vec![0u8; len as usize];
            rd.read_exact(&mut buf).await?;
            payload = Bytes::from(buf);
        }
        if cmd == CMD_DISC {
            // Finish what is in flight, then close.
            drop(tx);
            let _ = writer.await;
            return Ok(());
        }
        let op = match check(&export, cmd, flags, offset, len) {
            Err(error) => {
                let _ = tx.send(Reply {
                    handle,
                    error,
                    data: Bytes::new(),
                });
                continue;
            }
            Ok(None) => {
                let _ = tx.send(Reply {
                    handle,
                    error: 0,
                    data: Bytes::new(),
                });
                continue;
            }
            Ok(Some(op)) => match op {
                BackendOp::Write { offset, fua, .. } => BackendOp::Write {
                    offset,
                    data: payload,
                    fua,
                },
                other => other,
            },
        };
        let index = export.backend_index;
        let respond = move |result: Result<Bytes, Status>| match result {
            Ok(data) => Reply {
                handle,
                error: 0,
                data,
            },
            Err(status) => Reply {
                handle,
                error: errno(status),
                data: Bytes::new(),
            },
        };
        if let Some(result) = backend.try_execute_now(index, &op) {
            let _ = tx.send(respond(result));
            continue;
        }
        let (backend, tx) = (backend.clone(), tx.clone());
        tokio::task::spawn_blocking(move || {
            let result = backend.execute(index, &op);
            let _ = tx.send(respond(result));
        });
    }
}

/// Validates a request: `Ok(None)` for a no-op success (CACHE),
/// `Err(errno)` for the spec's error.
fn check(
    e: &NbdExport,
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
) -> Result<Option<BackendOp>, u32> {
    let fua = flags & CMD_FLAG_FUA != 0;
    let end = offset.checked_add(u64::from(len)).ok_or(EINVAL)?;
    let mutates = matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if mutates && e.read_only {
        return Err(EPERM);
    }
    if cmd != CMD_FLUSH && end > e.size {
        // Writes past the end are ENOSPC, everything else EINVAL (spec,
        // "Error values").
        return Err(if matches!(cmd, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        });
    }
    if matches!(cmd, CMD_READ | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE) && len > BLOCK_MAX {
        return Err(EINVAL);
    }
    Ok(Some(match cmd {
        CMD_READ => BackendOp::Read { offset, len },
        CMD_WRITE => BackendOp::Write {
            offset,
            data: Bytes::new(),
            fua,
        },
        CMD_FLUSH => BackendOp::Flush,
        CMD_TRIM => BackendOp::Trim { offset, len, fua },
        CMD_WRITE_ZEROES => BackendOp::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap: flags & CMD_FLAG_NO_HOLE == 0,
        },
        // A hint; the page cache does this for us.
        CMD_CACHE => return Ok(None),
        _ => return Err(EINVAL),
    }))
}
