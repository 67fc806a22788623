//! One check per numbered clause of docs/PROTOCOL.md. Each opens its own
//! connections (a clause that closes one cannot spoil the next) and says
//! what it saw when the server falls short.

use super::probe::{
    describe, fix_header_crc, fresh_nonce, request, Probe, Recv, Target, PROMPT, QUIET,
};
use braid_core::wire::{self, Auth, Message, Op, RejectCode, Status, Welcome};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// How long a connection that must close is given.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

type Check = for<'a> fn(&'a Target) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// (clause, what it requires, its check).
pub(crate) const CLAUSES: &[(&str, &str, Check)] = &[
    ("2.1", "framing errors (magic, version, lengths, header CRC) close the connection", |t| Box::pin(framing_errors_close(t))),
    ("2.2", "unknown kinds, bad bodies, unknown flags, stray payloads close the connection", |t| Box::pin(malformed_frames_close(t))),
    ("2.3", "a request with a bad payload CRC is answered CORRUPT, not executed, and the channel stays", |t| Box::pin(corrupt_payload(t))),
    ("3.1", "refused handshakes get REJECT with their own code", |t| Box::pin(reject_codes(t))),
    ("3.2", "misaligned, empty, oversized, out-of-range, read-only requests and ranged FLUSHes get their status; the channel stays", |t| Box::pin(request_validation(t))),
    ("3.3", "READ returns what was written; exec_seq numbers successful mutations from 1", |t| Box::pin(read_back_and_exec_seq(t))),
    ("3.4", "PING is answered with PONG carrying its token", |t| Box::pin(ping_pong(t))),
    ("3.5", "GOODBYE ends the session and closes its channels", |t| Box::pin(goodbye(t))),
    ("4.1", "a request before WELCOME closes the connection", |t| Box::pin(request_before_welcome(t))),
    ("5.1", "CHALLENGE carries the server's proof of the key", |t| Box::pin(server_proof(t))),
    ("5.2", "a wrong client proof is refused with AUTH_FAILED", |t| Box::pin(wrong_client_proof(t))),
    ("5.3", "server nonces are fresh: a recorded handshake does not replay", |t| Box::pin(replayed_handshake(t))),
    ("6.1", "a finished id sent again gets its recorded answer and does not run again", |t| Box::pin(duplicate_finished(t))),
    ("6.2", "a resent id is answered on the channel its latest copy came on", |t| Box::pin(resent_on_other_channel(t))),
    ("6.3", "ids below the floor are dropped silently", |t| Box::pin(stale_ids(t))),
    ("6.4", "ids past floor + id_window are answered INVALID", |t| Box::pin(window(t))),
    ("7.1", "a HELLO naming an unknown session gets SESSION_UNKNOWN", |t| Box::pin(unknown_session(t))),
    ("7.2", "a client's newer run ends its older run's sessions", |t| Box::pin(newer_run_fences(t))),
    ("7.3", "an older run gets FENCED beside a newer one; equal runs are left alone", |t| Box::pin(older_run_refused(t))),
];

fn outcome(r: Result<(), String>) -> Outcome {
    match r {
        Ok(()) => Outcome::Pass,
        Err(e) => Outcome::Fail(e),
    }
}

/// Whether the export takes writes (checks that write need it).
fn writable(w: &Welcome) -> Result<(), String> {
    if w.export_flags & wire::EXPORT_READ_ONLY != 0 {
        return Err("the export is read-only: give a writable one with --export".into());
    }
    Ok(())
}

/// Bytes that name their block and a generation, so a read shows which
/// write it saw.
fn pattern(block: u32, blocks: u32, generation: u8) -> Bytes {
    let mut v = Vec::with_capacity((block * blocks) as usize);
    for b in 0..blocks {
        for i in 0..block {
            v.push((i as u8).wrapping_mul(31) ^ (b as u8) ^ generation.wrapping_mul(97));
        }
    }
    Bytes::from(v)
}

/// A PING frame edited by `edit` on a fresh session; the connection must close.
async fn edited_ping_closes(
    t: &Target,
    what: &str,
    edit: impl FnOnce(&mut Vec<u8>),
) -> Result<(), String> {
    let (mut p, _) = Probe::session(t).await?;
    let mut frame = wire::encode(&Message::Ping { token: 7 })
        .to_bytes()
        .to_vec();
    edit(&mut frame);
    p.send_raw(&frame).await?;
    if p.closes_within(CLOSE_WAIT).await {
        Ok(())
    } else {
        Err(format!("{what}: the connection stayed open"))
    }
}

async fn framing_errors_close(t: &Target) -> Outcome {
    outcome(
        async {
            edited_ping_closes(t, "wrong magic", |f| {
                f[0] = b'X';
                fix_header_crc(f);
            })
            .await?;
            edited_ping_closes(t, "version 2", |f| {
                f[4] = 2;
                fix_header_crc(f);
            })
            .await?;
            edited_ping_closes(t, "body_len 641", |f| {
                f[6..8].copy_from_slice(&641u16.to_le_bytes());
            })
            .await?;
            edited_ping_closes(t, "payload_len 64 MiB", |f| {
                f[8..12].copy_from_slice(&(64u32 << 20).to_le_bytes());
                fix_header_crc(f);
            })
            .await?;
            edited_ping_closes(t, "header CRC", |f| f[16] ^= 0xff).await
        }
        .await,
    )
}

async fn malformed_frames_close(t: &Target) -> Outcome {
    outcome(
        async {
            edited_ping_closes(t, "unknown kind 0x7f", |f| {
                f[5] = 0x7f;
                fix_header_crc(f);
            })
            .await?;
            edited_ping_closes(t, "PING with a 4-byte body", |f| {
                f.truncate(24);
                f[6..8].copy_from_slice(&4u16.to_le_bytes());
                fix_header_crc(f);
            })
            .await?;
            edited_ping_closes(t, "PING with a payload", |f| {
                let payload = [1u8, 2, 3, 4];
                f[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
                f[12..16].copy_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
                fix_header_crc(f);
                f.extend_from_slice(&payload);
            })
            .await?;
            let (mut p, w) = Probe::session(t).await?;
            let mut r = request(Op::Read, 1, 0, 0, w.block_size, Bytes::new());
            r.flags = 0x8000;
            p.send(&Message::Request(r)).await?;
            if !p.closes_within(CLOSE_WAIT).await {
                return Err("a READ with unknown flag bit 15: the connection stayed open".into());
            }
            Ok(())
        }
        .await,
    )
}

async fn corrupt_payload(t: &Target) -> Outcome {
    outcome(
        async {
            let (mut p, w) = Probe::session(t).await?;
            writable(&w)?;
            let bs = w.block_size;
            let (a, b) = (pattern(bs, 1, 1), pattern(bs, 1, 2));
            let ok = p.call(request(Op::Write, 1, 0, 0, bs, a.clone())).await?;
            if ok.status != Status::Ok {
                return Err(format!("a plain WRITE failed: {:?}", ok.status));
            }
            let mut frame = wire::encode(&Message::Request(request(
                Op::Write,
                2,
                0,
                0,
                bs,
                b.clone(),
            )))
            .to_bytes()
            .to_vec();
            *frame.last_mut().unwrap() ^= 0xff;
            p.send_raw(&frame).await?;
            let r = p.reply_to(2, PROMPT).await?;
            if r.status != Status::Corrupt {
                return Err(format!(
                    "damaged WRITE answered {:?}, not CORRUPT",
                    r.status
                ));
            }
            let read = p.call(request(Op::Read, 3, 0, 0, bs, Bytes::new())).await?;
            if read.payload != a {
                return Err("the damaged WRITE was executed (a read shows its data)".into());
            }
            let again = p.call(request(Op::Write, 2, 0, 0, bs, b.clone())).await?;
            if again.status != Status::Ok {
                return Err(format!(
                    "the same id sent again intact got {:?}",
                    again.status
                ));
            }
            Ok(())
        }
        .await,
    )
}

/// Sends a HELLO and expects REJECT `code`, then a close.
async fn rejected(
    t: &Target,
    hello: wire::Hello,
    code: RejectCode,
    what: &str,
) -> Result<(), String> {
    let mut p = Probe::open(t).await?;
    p.send(&Message::Hello(hello)).await?;
    match p.recv(PROMPT).await {
        Recv::Msg(Message::Reject(r)) if r.code == code => {}
        other => {
            return Err(format!(
                "{what}: expected REJECT {code:?}, got {}",
                describe(&other)
            ))
        }
    }
    if !p.closes_within(CLOSE_WAIT).await {
        return Err(format!("{what}: REJECT, but the connection stayed open"));
    }
    Ok(())
}

fn hello(t: &Target) -> wire::Hello {
    wire::Hello {
        version_min: 1,
        version_max: 1,
        features: 0,
        session_id: 0,
        client_nonce: fresh_nonce(),
        owner: 0,
        epoch: 0,
        key_id: t.key_id.clone(),
        export: t.export.clone(),
    }
}

async fn reject_codes(t: &Target) -> Outcome {
    outcome(
        async {
            let h = wire::Hello {
                export: "no-such-export-braid-conformance".into(),
                ..hello(t)
            };
            rejected(t, h, RejectCode::NoSuchExport, "unknown export").await?;
            let h = wire::Hello {
                key_id: "no-such-key-braid-conformance".into(),
                ..hello(t)
            };
            rejected(t, h, RejectCode::AuthFailed, "unknown key id").await?;
            let h = wire::Hello {
                version_min: 2,
                version_max: 3,
                ..hello(t)
            };
            rejected(t, h, RejectCode::VersionMismatch, "versions 2 to 3 only").await
        }
        .await,
    )
}

async fn request_validation(t: &Target) -> Outcome {
    let r = async {
        let (mut p, w) = Probe::session(t).await?;
        let bs = w.block_size;
        let mut id = 0;
        let mut expect = |op, offset: u64, len: u32, want: Status, what: &str| {
            id += 1;
            (
                request(op, id, 0, offset, len, Bytes::new()),
                want,
                what.to_string(),
            )
        };
        let cases = [
            expect(Op::Read, 1, bs, Status::Invalid, "a misaligned READ"),
            expect(Op::Read, 0, 0, Status::Invalid, "a zero-length READ"),
            expect(
                Op::Read,
                0,
                w.max_payload + bs,
                Status::Invalid,
                "a READ over max_payload",
            ),
            expect(
                Op::Read,
                w.export_size,
                bs,
                Status::OutOfRange,
                "a READ at the end",
            ),
            expect(
                Op::Read,
                w.export_size - u64::from(bs),
                2 * bs,
                Status::OutOfRange,
                "a READ across the end",
            ),
        ];
        for (req, want, what) in cases {
            let r = p.call(req).await?;
            if r.status != want {
                return Err(format!("{what}: {:?}, not {want:?}", r.status));
            }
        }
        let flush = p
            .call(request(Op::Flush, id + 1, 0, 0, bs, Bytes::new()))
            .await?;
        if flush.status != Status::Invalid {
            return Err(format!(
                "a FLUSH with a length: {:?}, not Invalid",
                flush.status
            ));
        }
        let ok = p
            .call(request(Op::Read, id + 2, 0, 0, bs, Bytes::new()))
            .await?;
        if ok.status != Status::Ok {
            return Err(format!(
                "after the errors, a valid READ got {:?}",
                ok.status
            ));
        }
        let Some(ro) = &t.read_only_export else {
            return Ok(Some("read-only part not run: no --read-only-export"));
        };
        let (mut p, w) = Probe::join(t, ro, 0).await?;
        let r = p
            .call(request(
                Op::Write,
                1,
                0,
                0,
                w.block_size,
                pattern(w.block_size, 1, 3),
            ))
            .await?;
        if r.status != Status::ReadOnly {
            return Err(format!(
                "a WRITE to read-only {ro:?}: {:?}, not ReadOnly",
                r.status
            ));
        }
        Ok(None)
    }
    .await;
    match r {
        Ok(None) => Outcome::Pass,
        Ok(Some(note)) => Outcome::Skip(note.into()),
        Err(e) => Outcome::Fail(e),
    }
}

async fn read_back_and_exec_seq(t: &Target) -> Outcome {
    outcome(
        async {
            let (mut p, w) = Probe::session(t).await?;
            writable(&w)?;
            let bs = w.block_size;
            let at = u64::from(bs) * 8;
            let (a, b) = (pattern(bs, 2, 4), pattern(bs, 2, 5));
            let first = p.call(request(Op::Write, 1, 0, at, 2 * bs, a)).await?;
            let second = p
                .call(request(Op::Write, 2, 0, at, 2 * bs, b.clone()))
                .await?;
            if (first.status, second.status) != (Status::Ok, Status::Ok) {
                return Err(format!(
                    "WRITEs failed: {:?}, {:?}",
                    first.status, second.status
                ));
            }
            if first.exec_seq == 0 || second.exec_seq <= first.exec_seq {
                return Err(format!(
                    "exec_seq {} then {}: not numbered from 1 in order",
                    first.exec_seq, second.exec_seq
                ));
            }
            let read = p
                .call(request(Op::Read, 3, 0, at, 2 * bs, Bytes::new()))
                .await?;
            if read.status != Status::Ok || read.payload != b {
                return Err(format!(
                    "READ got {:?} with {} bytes, not the {} bytes last written",
                    read.status,
                    read.payload.len(),
                    b.len()
                ));
            }
            if read.exec_seq != 0 {
                return Err(format!("READ carried exec_seq {}", read.exec_seq));
            }
            let flush = p.call(request(Op::Flush, 4, 0, 0, 0, Bytes::new())).await?;
            if (flush.status, flush.exec_seq) != (Status::Ok, 0) {
                return Err(format!(
                    "FLUSH: {:?} exec_seq {}",
                    flush.status, flush.exec_seq
                ));
            }
            Ok(())
        }
        .await,
    )
}

async fn ping_pong(t: &Target) -> Outcome {
    outcome(
        async {
            let (mut p, _) = Probe::session(t).await?;
            let token = 0x0123_4567_89ab_cdef;
            p.send(&Message::Ping { token }).await?;
            match p.recv(PROMPT).await {
                Recv::Msg(Message::Pong { token: got }) if got == token => Ok(()),
                other => Err(format!("PING {token:#x}: got {}", describe(&other))),
            }
        }
        .await,
    )
}

async fn goodbye(t: &Target) -> Outcome {
    outcome(
        async {
            let (mut p, w) = Probe::session(t).await?;
            p.send(&Message::Goodbye).await?;
            if !p.closes_within(CLOSE_WAIT).await {
                return Err("after GOODBYE the channel stayed open".into());
            }
            let h = wire::Hello {
                session_id: w.session_id,
                ..hello(t)
            };
            rejected(
                t,
                h,
                RejectCode::SessionUnknown,
                "joining the session after GOODBYE",
            )
            .await
        }
        .await,
    )
}

async fn request_before_welcome(t: &Target) -> Outcome {
    outcome(
        async {
            let mut p = Probe::open(t).await?;
            p.hello(t, &t.export, 0, fresh_nonce()).await?;
            p.send(&Message::Request(request(
                Op::Read,
                1,
                0,
                0,
                512,
                Bytes::new(),
            )))
            .await?;
            if p.closes_within(CLOSE_WAIT).await {
                Ok(())
            } else {
                Err("a READ instead of AUTH: the connection stayed open".into())
            }
        }
        .await,
    )
}

async fn server_proof(t: &Target) -> Outcome {
    outcome(async {
        let mut p = Probe::open(t).await?;
        let nonce = fresh_nonce();
        let c = p.hello(t, &t.export, 0, nonce).await?;
        let want = braid_core::auth::server_proof(
            &t.key,
            &braid_core::auth::Transcript {
                key_id: &t.key_id,
                export: &t.export,
                session_id: 0,
                owner_epoch: (0, 0),
                client_nonce: &nonce,
                server_nonce: &c.server_nonce,
                boot_id: c.boot_id,
            },
        );
        if c.server_proof == want {
            Ok(())
        } else {
            Err("the CHALLENGE's server_proof is not HMAC-SHA256 of the transcript under the key".into())
        }
    }
    .await)
}

async fn wrong_client_proof(t: &Target) -> Outcome {
    outcome(
        async {
            let mut p = Probe::open(t).await?;
            let nonce = fresh_nonce();
            let c = p.hello(t, &t.export, 0, nonce).await?;
            let mut client_proof = Probe::proof(t, &t.export, 0, &nonce, &c);
            client_proof[31] ^= 1;
            p.send(&Message::Auth(Auth { client_proof })).await?;
            match p.recv(PROMPT).await {
                Recv::Msg(Message::Reject(r)) if r.code == RejectCode::AuthFailed => {}
                other => return Err(format!("a wrong proof got {}", describe(&other))),
            }
            if !p.closes_within(CLOSE_WAIT).await {
                return Err("AUTH_FAILED, but the connection stayed open".into());
            }
            Ok(())
        }
        .await,
    )
}

async fn replayed_handshake(t: &Target) -> Outcome {
    outcome(
        async {
            // A recording of A's handshake, played on B with the same nonce.
            let nonce = fresh_nonce();
            let mut a = Probe::open(t).await?;
            let ca = a.hello(t, &t.export, 0, nonce).await?;
            let recorded = Probe::proof(t, &t.export, 0, &nonce, &ca);
            let mut b = Probe::open(t).await?;
            let cb = b.hello(t, &t.export, 0, nonce).await?;
            if ca.server_nonce == cb.server_nonce {
                return Err("two CHALLENGEs carried the same server nonce".into());
            }
            b.send(&Message::Auth(Auth {
                client_proof: recorded,
            }))
            .await?;
            match b.recv(PROMPT).await {
                Recv::Msg(Message::Reject(r)) if r.code == RejectCode::AuthFailed => Ok(()),
                other => Err(format!("a replayed AUTH got {}", describe(&other))),
            }
        }
        .await,
    )
}

async fn duplicate_finished(t: &Target) -> Outcome {
    outcome(
        async {
            let (mut p, w) = Probe::session(t).await?;
            writable(&w)?;
            let bs = w.block_size;
            let at = u64::from(bs) * 16;
            let (a, b) = (pattern(bs, 1, 6), pattern(bs, 1, 7));
            let first = p.call(request(Op::Write, 1, 0, at, bs, a.clone())).await?;
            p.call(request(Op::Write, 2, 0, at, bs, b.clone())).await?;
            let again = p.call(request(Op::Write, 1, 0, at, bs, a)).await?;
            if (again.status, again.exec_seq) != (first.status, first.exec_seq) {
                return Err(format!(
                    "id 1 again: {:?} exec_seq {}, first answer was {:?} exec_seq {}",
                    again.status, again.exec_seq, first.status, first.exec_seq
                ));
            }
            let read = p
                .call(request(Op::Read, 3, 0, at, bs, Bytes::new()))
                .await?;
            if read.payload != b {
                return Err("id 1 ran again: a read shows its data over id 2's".into());
            }
            Ok(())
        }
        .await,
    )
}

async fn resent_on_other_channel(t: &Target) -> Outcome {
    outcome(
        async {
            let (mut a, w) = Probe::session(t).await?;
            writable(&w)?;
            let (mut b, joined) = Probe::join(t, &t.export, w.session_id).await?;
            if joined.flags & wire::WELCOME_RESUMED == 0 || joined.session_id != w.session_id {
                return Err(
                    "a second channel did not join the session (no RESUMED WELCOME)".into(),
                );
            }
            let bs = w.block_size;
            let data = pattern(bs, 1, 8);
            let first = a
                .call(request(Op::Write, 1, 0, 0, bs, data.clone()))
                .await?;
            let on_b = b.call(request(Op::Write, 1, 0, 0, bs, data)).await?;
            if (on_b.status, on_b.exec_seq) != (first.status, first.exec_seq) {
                return Err(format!(
                    "on the second channel: {:?} exec_seq {}",
                    on_b.status, on_b.exec_seq
                ));
            }
            Ok(())
        }
        .await,
    )
}

async fn stale_ids(t: &Target) -> Outcome {
    outcome(
        async {
            let (mut p, w) = Probe::session(t).await?;
            let bs = w.block_size;
            for id in 1..=3 {
                p.call(request(Op::Read, id, 0, 0, bs, Bytes::new()))
                    .await?;
            }
            p.call(request(Op::Read, 4, 4, 0, bs, Bytes::new())).await?;
            p.send(&Message::Request(request(
                Op::Read,
                2,
                4,
                0,
                bs,
                Bytes::new(),
            )))
            .await?;
            match p.reply_to(2, QUIET).await {
                Err(_) => {}
                Ok(r) => return Err(format!("id 2 below floor 4 was answered {:?}", r.status)),
            }
            let token = 42;
            p.send(&Message::Ping { token }).await?;
            match p.recv(PROMPT).await {
                Recv::Msg(Message::Pong { .. }) => Ok(()),
                other => Err(format!(
                    "after the stale id, a PING got {}",
                    describe(&other)
                )),
            }
        }
        .await,
    )
}

async fn window(t: &Target) -> Outcome {
    outcome(
        async {
            let (mut p, w) = Probe::session(t).await?;
            let id = u64::from(w.id_window) + 10;
            let r = p
                .call(request(Op::Read, id, 0, 0, w.block_size, Bytes::new()))
                .await?;
            if r.status == Status::Invalid {
                Ok(())
            } else {
                Err(format!(
                    "id {id} with floor 0 and id_window {}: {:?}",
                    w.id_window, r.status
                ))
            }
        }
        .await,
    )
}

async fn unknown_session(t: &Target) -> Outcome {
    outcome(
        async {
            let session_id =
                u64::from_le_bytes(crate::config::random_bytes().map_err(|e| e.to_string())?) | 1;
            let mut p = Probe::open(t).await?;
            let nonce = fresh_nonce();
            p.send(&Message::Hello(wire::Hello {
                session_id,
                client_nonce: nonce,
                ..hello(t)
            }))
            .await?;
            // Refused at HELLO, or (the session may vanish between) at AUTH.
            match p.recv(PROMPT).await {
                Recv::Msg(Message::Reject(r)) if r.code == RejectCode::SessionUnknown => Ok(()),
                Recv::Msg(Message::Challenge(c)) => {
                    let client_proof = Probe::proof(t, &t.export, session_id, &nonce, &c);
                    p.send(&Message::Auth(Auth { client_proof })).await?;
                    match p.recv(PROMPT).await {
                        Recv::Msg(Message::Reject(r)) if r.code == RejectCode::SessionUnknown => {
                            Ok(())
                        }
                        other => Err(format!(
                            "joining an unknown session got {}",
                            describe(&other)
                        )),
                    }
                }
                other => Err(format!(
                    "joining an unknown session got {}",
                    describe(&other)
                )),
            }
        }
        .await,
    )
}

/// A client identity no other probe (or client) uses.
fn fresh_owner() -> Result<u64, String> {
    Ok(u64::from_le_bytes(crate::config::random_bytes().map_err(|e| e.to_string())?) | 1)
}

fn welcomed(answer: Recv, what: &str) -> Result<Welcome, String> {
    match answer {
        Recv::Msg(Message::Welcome(w)) => Ok(w),
        other => Err(format!(
            "{what}: expected WELCOME, got {}",
            describe(&other)
        )),
    }
}

async fn newer_run_fences(t: &Target) -> Outcome {
    outcome(
        async {
            let owner = fresh_owner()?;
            let (mut old, answer) = Probe::handshake_as(t, 0, (owner, 1)).await?;
            let w = welcomed(answer, "run 1")?;
            let (_new, answer) = Probe::handshake_as(t, 0, (owner, 2)).await?;
            welcomed(answer, "run 2")?;
            if !old.closes_within(PROMPT).await {
                return Err("run 1's channel stayed open after run 2's session began".into());
            }
            let (_, answer) = Probe::handshake_as(t, w.session_id, (owner, 1)).await?;
            match answer {
                Recv::Msg(Message::Reject(r)) if r.code == RejectCode::SessionUnknown => Ok(()),
                other => Err(format!(
                    "rejoining run 1's session got {}",
                    describe(&other)
                )),
            }
        }
        .await,
    )
}

async fn older_run_refused(t: &Target) -> Outcome {
    outcome(
        async {
            let owner = fresh_owner()?;
            let (mut first, answer) = Probe::handshake_as(t, 0, (owner, 2)).await?;
            welcomed(answer, "run 2")?;
            let (_, answer) = Probe::handshake_as(t, 0, (owner, 1)).await?;
            match answer {
                Recv::Msg(Message::Reject(r)) if r.code == RejectCode::Fenced => {}
                other => return Err(format!("run 1 beside run 2 got {}", describe(&other))),
            }
            let (_second, answer) = Probe::handshake_as(t, 0, (owner, 2)).await?;
            welcomed(answer, "a second session of run 2")?;
            first.send(&Message::Ping { token: 72 }).await?;
            match first.recv(PROMPT).await {
                Recv::Msg(Message::Pong { token: 72 }) => Ok(()),
                other => Err(format!(
                    "run 2's first session, after its second began: PING got {}",
                    describe(&other)
                )),
            }
        }
        .await,
    )
}
