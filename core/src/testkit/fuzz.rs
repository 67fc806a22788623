//! Drives a server engine with arbitrary input, for `cargo fuzz` and for
//! property tests. Input bytes choose, chunk by chunk, between raw bytes and
//! frames with valid checksums around arbitrary kinds and bodies (so the
//! parsers and state machines are reached, not just the checksum), across
//! several connections, with backend completions and time interleaved. A
//! genuine handshake can be performed first so request handling is reached.

use crate::auth::Key;
use crate::server::{ExportConfig, ServerAction, ServerConfig, ServerEngine};
use crate::wire::{self, Message, Op, Status, MAGIC, VERSION};
use crate::Instant;
use bytes::Bytes;
use std::time::Duration;

const KEY: &[u8] = b"fuzz key";

fn framed(kind: u8, body: &[u8], payload: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(20 + body.len() + payload.len());
    f.extend_from_slice(&MAGIC);
    f.push(VERSION);
    f.push(kind);
    f.extend_from_slice(&(body.len() as u16).to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f), body);
    f.extend_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(body);
    f.extend_from_slice(payload);
    Bytes::from(f)
}

/// Feeds `data` to a fresh server engine. Panics only if the engine does
/// (or breaks a bound it promises). Returns the server's counters, so tests
/// can check the input reached deep states.
pub fn exercise_server(data: &[u8]) -> crate::server::ServerStats {
    let mut cfg = ServerConfig::new(
        1,
        [5; 32],
        vec![("fuzz".into(), Key::new(KEY.to_vec()))],
        vec![ExportConfig::new("disk0", 1 << 20)],
    );
    cfg.id_window = 64;
    cfg.max_inflight = 32;
    let window = cfg.id_window as usize;
    let mut server = ServerEngine::new(cfg).expect("a valid config");
    let mut now = Instant::ZERO;
    let conns = [1u64, 2, 3];
    for c in conns {
        server.connection_opened(c, now);
    }
    if data.first().is_some_and(|b| b & 1 == 1) {
        let key = Key::new(KEY.to_vec());
        super::authenticate(&mut server, 1, "fuzz", &key, "disk0", now);
        super::authenticate(&mut server, 2, "fuzz", &key, "disk0", now);
    }
    let mut pending = Vec::new();
    let mut rest = data.get(1..).unwrap_or_default();
    while rest.len() >= 3 {
        let (ctl, arg, len) = (rest[0], rest[1], rest[2] as usize);
        rest = &rest[3..];
        let take = len.min(rest.len());
        let chunk = &rest[..take];
        rest = &rest[take..];
        let conn = conns[(ctl as usize >> 4) % conns.len()];
        match ctl & 0x7 {
            0 => server.handle_frame(conn, Bytes::copy_from_slice(chunk), now),
            1..=3 => {
                let split = (arg as usize).min(chunk.len());
                let (body, payload) = chunk.split_at(split);
                server.handle_frame(
                    conn,
                    framed(((ctl >> 3) & 0x1f) | (0x10 * (ctl & 1)), body, payload),
                    now,
                )
            }
            4 => {
                // A mostly valid request, so exactly-once and validation
                // are reached; the input bends one field at a time.
                let byte = |i: usize| chunk.get(i).copied().unwrap_or(0);
                let op =
                    [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes][arg as usize % 5];
                let blocks = u32::from(byte(0) % 8) + 1;
                let mut req = wire::Request {
                    op,
                    id: u64::from(byte(1) % 80),
                    floor: u64::from(byte(2) % 40),
                    offset: u64::from(byte(3)) * 4096,
                    length: blocks * 512,
                    flags: u16::from(byte(4) & 0x3),
                    remote: None,
                    payload: Bytes::new(),
                };
                match byte(5) % 16 {
                    0 => req.offset += 1,
                    1 => req.offset = u64::MAX - 100,
                    2 => req.length = 0,
                    _ => {}
                }
                if op == Op::Flush {
                    req.offset = 0;
                    req.length = 0;
                }
                if op == Op::Write {
                    let n = if byte(6) % 16 == 0 {
                        7
                    } else {
                        req.length as usize
                    };
                    req.payload = Bytes::from(vec![byte(7); n]);
                }
                server.handle_frame(conn, wire::encode(&Message::Request(req)).to_bytes(), now)
            }
            5 => server.connection_closed(conn, now),
            6 => {
                now = now + Duration::from_millis(u64::from(arg) * 50);
                server.handle_timeout(now);
            }
            _ => {
                // Finish backend work in an input-chosen order and outcome.
                if !pending.is_empty() {
                    let (token, read_len) = pending.remove(arg as usize % pending.len());
                    let result = match chunk.first() {
                        Some(b) if b % 5 == 0 => Err(Status::Io),
                        Some(b) if b % 7 == 0 => Err(Status::NoSpace),
                        _ => Ok(Bytes::from(vec![0; read_len])),
                    };
                    server.backend_complete(token, result, now);
                }
            }
        }
        while let Some(a) = server.poll_action() {
            if let ServerAction::Backend(req) = a {
                let read_len = match req.op {
                    crate::server::BackendOp::Read { len, .. } => len as usize,
                    _ => 0,
                };
                pending.push((req.token, read_len));
            }
        }
        assert!(server.cached_results() <= server.session_count().max(1) * window);
        if let Err(e) = server.check() {
            panic!("server inconsistent after arbitrary input: {e}");
        }
    }
    server.stats().clone()
}
