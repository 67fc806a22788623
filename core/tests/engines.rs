//! The engines against each other over perfect in-memory links, one step at
//! a time, and against a hand-driven peer for the paths a well-behaved
//! engine never takes: wrong keys, replayed handshakes, garbage, and
//! requests the export must refuse.

use braid_core::auth::Key;
use braid_core::client::*;
use braid_core::server::*;
use braid_core::wire::{self, *};
use braid_core::Instant;
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn server_config() -> ServerConfig {
    let mut ro = ExportConfig::new("ro", MIB);
    ro.read_only = true;
    let mut plain = ExportConfig::new("plain", MIB);
    plain.trim = false;
    ServerConfig::new(
        0xB007,
        [7; 32],
        vec![
            ("alice".into(), Key::new(*b"alice's key")),
            ("bob".into(), Key::new(*b"bob's key")),
        ],
        vec![ExportConfig::new("disk0", MIB), ro, plain],
    )
}

fn client_config(export: &str, key_id: &str, key: &[u8]) -> ClientConfig {
    let mut c = ClientConfig::new(export, key_id, Key::new(key.to_vec()), [9; 32]);
    c.channels = 2;
    c
}

/// A client and a server joined by perfect links; the clock moves only
/// when a test says so.
struct Pair {
    client: ClientEngine,
    server: ServerEngine,
    now: Instant,
    conns: BTreeMap<ChannelId, ConnId>,
    chans: BTreeMap<ConnId, ChannelId>,
    next_conn: ConnId,
    to_server: VecDeque<(ConnId, Bytes)>,
    to_client: VecDeque<(ChannelId, Bytes)>,
    completions: Vec<Completion>,
    notices: Vec<Notice>,
    /// How many times the client said Room.
    rooms: usize,
    disk: Vec<u8>,
    /// While set, every mutation fails with NO_SPACE.
    full: bool,
    /// Tokens of the pings the client sent, in order.
    ping_tokens: Vec<u64>,
    /// Requests the client sent on each connection, and the connections
    /// whose frames vanish (both ways).
    sent_to: BTreeMap<ConnId, usize>,
    blackhole: std::collections::BTreeSet<ConnId>,
}

impl Pair {
    fn new(client: ClientConfig) -> Self {
        Pair {
            client: ClientEngine::new(client).expect("a valid config"),
            server: ServerEngine::new(server_config()).expect("a valid config"),
            now: Instant::ZERO,
            conns: BTreeMap::new(),
            chans: BTreeMap::new(),
            next_conn: 1,
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            completions: Vec::new(),
            notices: Vec::new(),
            rooms: 0,
            disk: vec![0; MIB as usize],
            full: false,
            ping_tokens: Vec::new(),
            sent_to: BTreeMap::new(),
            blackhole: Default::default(),
        }
    }

    /// Runs until neither side has anything to do (bounded, so a livelock
    /// fails the test instead of hanging it).
    fn drive(&mut self) {
        self.client.handle_timeout(self.now);
        for _ in 0..10_000 {
            let mut busy = false;
            while let Some(a) = self.client.poll_action() {
                busy = true;
                match a {
                    ClientAction::Connect(ch) => self.connect(ch),
                    ClientAction::Close(ch) => {
                        if let Some(conn) = self.conns.remove(&ch) {
                            // A graceful close: what was sent arrives first.
                            while let Some((c, f)) = self.to_server.pop_front() {
                                self.server.handle_frame(c, f, self.now);
                            }
                            self.chans.remove(&conn);
                            self.server.connection_closed(conn, self.now);
                        }
                    }
                    ClientAction::Send(ch, f) => {
                        let f = f.to_bytes();
                        let decoded = wire::decode(f.clone());
                        if let Ok(Message::Ping { token }) = decoded {
                            self.ping_tokens.push(token);
                        }
                        if let Some(conn) = self.conns.get(&ch) {
                            if let Ok(Message::Request(_)) = decoded {
                                *self.sent_to.entry(*conn).or_default() += 1;
                            }
                            if !self.blackhole.contains(conn) {
                                self.to_server.push_back((*conn, f));
                            }
                        }
                    }
                    ClientAction::Complete(c) => self.completions.push(c),
                    ClientAction::Notice(n) => self.notices.push(n),
                    ClientAction::Room => self.rooms += 1,
                }
            }
            while let Some(a) = self.server.poll_action() {
                busy = true;
                match a {
                    ServerAction::Send { conn, frame } => {
                        if let Some(ch) = self.chans.get(&conn) {
                            if !self.blackhole.contains(&conn) {
                                self.to_client.push_back((*ch, frame.to_bytes()));
                            }
                        }
                    }
                    ServerAction::Close { conn, .. } => {
                        if let Some(ch) = self.chans.remove(&conn) {
                            self.conns.remove(&ch);
                            // Deliver what was sent before the close first.
                            while let Some((c, f)) = self.to_client.pop_front() {
                                self.client.handle_frame(c, f, self.now);
                            }
                            self.client.channel_closed(ch, self.now);
                        }
                        self.server.connection_closed(conn, self.now);
                    }
                    ServerAction::Backend(req) => {
                        let result = self.apply(&req.op);
                        self.server.backend_complete(req.token, result, self.now);
                    }
                }
            }
            self.client.check().expect("client consistent");
            self.server.check().expect("server consistent");
            if let Some((conn, f)) = self.to_server.pop_front() {
                busy = true;
                self.server.handle_frame(conn, f, self.now);
            }
            if let Some((ch, f)) = self.to_client.pop_front() {
                busy = true;
                self.client.handle_frame(ch, f, self.now);
            }
            if !busy {
                if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.client.handle_timeout(self.now);
                    continue;
                }
                return;
            }
        }
        panic!("the engines never went quiet");
    }

    /// The transport of `ch` connects: a new connection on the server.
    fn connect(&mut self, ch: ChannelId) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(ch, conn);
        self.chans.insert(conn, ch);
        self.server.connection_opened(conn, self.now);
        self.client.channel_connected(ch, self.now);
    }

    fn apply(&mut self, op: &BackendOp) -> Result<Bytes, Status> {
        let mutates = !matches!(op, BackendOp::Read { .. } | BackendOp::Flush);
        if self.full && mutates {
            return Err(Status::NoSpace);
        }
        match op {
            BackendOp::Read { offset, len } => Ok(Bytes::copy_from_slice(
                &self.disk[*offset as usize..(*offset + u64::from(*len)) as usize],
            )),
            BackendOp::Write { offset, data, .. } => {
                self.disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                Ok(Bytes::new())
            }
            BackendOp::Trim { offset, len, .. } | BackendOp::WriteZeroes { offset, len, .. } => {
                self.disk[*offset as usize..(*offset + u64::from(*len)) as usize].fill(0);
                Ok(Bytes::new())
            }
            BackendOp::Flush => Ok(Bytes::new()),
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now = self.now + by;
        self.server.handle_timeout(self.now);
        self.drive();
    }

    fn io(&mut self, user: u64, io: IoRequest) -> Result<Bytes, IoError> {
        self.client.submit(user, io, self.now).expect("accepted");
        self.drive();
        let pos = self
            .completions
            .iter()
            .position(|c| c.user == user)
            .expect("completed");
        self.completions.remove(pos).result
    }
}

#[test]
fn check_fires_when_a_counter_is_corrupted() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    p.client
        .submit(
            1,
            IoRequest::write(0, Bytes::from(vec![7u8; 512]), false),
            p.now,
        )
        .unwrap();
    // Half-way: the write is journaled and on the server, not answered.
    while let Some(a) = p.client.poll_action() {
        if let ClientAction::Send(ch, f) = a {
            let conn = p.conns[&ch];
            p.server.handle_frame(conn, f.to_bytes(), p.now);
        }
    }
    p.client.check().expect("consistent before");
    p.client.corrupt_for_test();
    let e = p.client.check().expect_err("a broken counter is seen");
    assert!(e.contains("user_count"), "{e}");

    let mut q = Pair::new(client_config("disk0", "alice", b"alice's key"));
    q.drive();
    q.server.check().expect("consistent before");
    q.server.corrupt_for_test();
    let e = q.server.check().expect_err("a broken counter is seen");
    assert!(e.contains("ops_in_backend"), "{e}");
}

#[test]
fn a_session_listing_another_sessions_channel_is_caught_by_check() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    assert!(open_on(&mut server, 1, "disk0", (1, 1)));
    assert!(open_on(&mut server, 2, "disk0", (2, 1)));
    assert_eq!(server.session_count(), 2);
    server.check().expect("consistent before");
    server.corrupt_bindings_for_test();
    let e = server
        .check()
        .expect_err("a channel bound elsewhere is seen");
    assert!(e.contains("lists conn"), "{e}");
}

#[test]
fn handshake_brings_every_channel_up_in_one_session() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    assert_eq!(p.client.ready_channels(), 2);
    assert_eq!(p.server.session_count(), 1);
    assert_eq!(p.server.stats().handshakes, 2);
    let (session, boot) = p.client.session().expect("a session");
    assert!(p.notices.iter().any(|n| matches!(
        n,
        Notice::SessionStarted { session_id: s, boot_id: b, .. } if (*s, *b) == (session, boot)
    )));
    let info = p.client.export_info().unwrap();
    assert_eq!((info.size, info.block_size), (MIB, 512));
    assert!(p.notices.iter().any(|n| matches!(
        n,
        Notice::SessionStarted {
            replaced: false,
            ..
        }
    )));
}

#[test]
fn data_written_reads_back_and_every_op_works() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    let rtts = |p: &Pair| {
        p.client
            .channel_summary()
            .iter()
            .filter(|c| c.3.is_some())
            .count()
    };
    assert_eq!(rtts(&p), 0, "nothing measured yet");
    let data = Bytes::from(vec![0xAB; 4096]);
    p.io(1, IoRequest::write(8192, data.clone(), false))
        .unwrap();
    assert_eq!(rtts(&p), 1, "a reply times its channel's round trip");
    assert_eq!(p.io(2, IoRequest::read(8192, 4096)).unwrap(), data);
    p.io(3, IoRequest::flush()).unwrap();
    p.io(4, IoRequest::trim(8192, 1024)).unwrap();
    p.io(5, IoRequest::write_zeroes(9216, 512, true)).unwrap();
    let back = p.io(6, IoRequest::read(8192, 4096)).unwrap();
    assert!(back[..1536].iter().all(|b| *b == 0));
    assert!(back[1536..].iter().all(|b| *b == 0xAB));
    assert_eq!(p.client.stats().completed, 6);
    // Each operation's latency is counted where it was timed: by the
    // client from submission to completion, by the server per export.
    for (op, n) in [
        (Op::Read, 2),
        (Op::Write, 1),
        (Op::Flush, 1),
        (Op::Trim, 1),
        (Op::WriteZeroes, 1),
    ] {
        assert_eq!(p.client.latency().get(op).count(), n, "client {op:?}");
        assert_eq!(p.server.latency()[0].get(op).count(), n, "server {op:?}");
    }
    // The other exports saw nothing.
    for l in &p.server.latency()[1..] {
        assert_eq!(l.get(Op::Read).count() + l.get(Op::Write).count(), 0);
    }
}

#[test]
fn refused_requests_fail_with_clear_errors_and_the_session_goes_on() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    let past_end = p.io(1, IoRequest::read(MIB, 512)).unwrap_err();
    assert_eq!(past_end.kind, IoErrorKind::OutOfRange);
    assert_eq!((past_end.export.as_str(), past_end.offset), ("disk0", MIB));
    assert!(
        past_end.to_string().contains("offset 1048576"),
        "{past_end}"
    );
    assert_eq!(
        p.io(2, IoRequest::read(100, 512)).unwrap_err().kind,
        IoErrorKind::Invalid
    );
    assert_eq!(
        p.io(3, IoRequest::read(u64::MAX - 511, 512))
            .unwrap_err()
            .kind,
        IoErrorKind::OutOfRange
    );
    assert!(
        p.io(4, IoRequest::read(0, 512)).is_ok(),
        "the session survives"
    );
    assert_eq!(
        p.client.submit(5, IoRequest::read(0, 0), p.now),
        Err(SubmitError::Invalid("zero-length request"))
    );
    let short = IoRequest {
        len: 1024,
        ..IoRequest::write(0, Bytes::from(vec![1; 512]), false)
    };
    assert_eq!(
        p.client.submit(8, short, p.now),
        Err(SubmitError::Invalid("write data length differs from len"))
    );
    for ranged in [(0, 512), (512, 0)] {
        let flush = IoRequest {
            offset: ranged.0,
            len: ranged.1,
            ..IoRequest::flush()
        };
        assert_eq!(
            p.client.submit(7, flush, p.now),
            Err(SubmitError::Invalid("flush has no range"))
        );
    }
    let long = p.client.submit(6, IoRequest::read(0, 2 << 20), p.now);
    assert_eq!(
        long,
        Err(SubmitError::Invalid("longer than the server's max payload"))
    );
    // What a frontend logs says why, and what to do about Busy.
    assert_eq!(
        long.unwrap_err().to_string(),
        "invalid request: longer than the server's max payload"
    );
    assert!(SubmitError::Busy.to_string().contains("retry"));
}

#[test]
fn a_garbled_frame_to_the_client_is_counted_and_its_channel_replaced() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    let ch = *p.conns.keys().next().unwrap();
    let before = p.client.stats().corrupt_frames;
    p.client
        .handle_frame(ch, Bytes::from_static(&[0xEE; 64]), p.now);
    assert_eq!(p.client.stats().corrupt_frames, before + 1);
    p.advance(Duration::from_millis(100));
    assert!(p.notices.iter().any(|n| matches!(
        n,
        Notice::ChannelDown {
            reason: DownReason::BadFrame(_),
            ..
        }
    )));
    assert!(
        p.io(1, IoRequest::read(0, 512)).is_ok(),
        "the session goes on over the other channels"
    );
}

#[test]
fn read_only_and_unsupported_ops_are_refused() {
    let mut p = Pair::new(client_config("ro", "alice", b"alice's key"));
    p.drive();
    let e = p
        .io(1, IoRequest::write(0, Bytes::from(vec![1; 512]), false))
        .unwrap_err();
    assert_eq!(e.kind, IoErrorKind::ReadOnly);
    assert!(p.io(2, IoRequest::read(0, 512)).is_ok());

    let mut p = Pair::new(client_config("plain", "alice", b"alice's key"));
    p.drive();
    assert_eq!(
        p.io(1, IoRequest::trim(0, 512)).unwrap_err().kind,
        IoErrorKind::Unsupported
    );
}

#[test]
fn wrong_key_is_refused_and_retried_with_backoff() {
    let mut p = Pair::new(client_config("disk0", "alice", b"not alice's key"));
    p.drive();
    assert_eq!(p.client.ready_channels(), 0);
    // The server's proof fails the client's check before the client proves
    // anything, so the client refuses to talk to it.
    assert!(p
        .notices
        .iter()
        .any(|n| matches!(n, Notice::AuthFailed { .. })));
    assert_eq!(p.server.session_count(), 0);
    let attempts = p.server.stats().connections;
    p.advance(Duration::from_millis(5));
    assert_eq!(
        p.server.stats().connections,
        attempts,
        "no retry before the backoff"
    );
    p.advance(Duration::from_millis(100));
    assert!(
        p.server.stats().connections > attempts,
        "retried after the backoff"
    );
}

#[test]
fn unknown_key_id_and_unknown_export_are_refused() {
    let mut p = Pair::new(client_config("disk0", "mallory", b"whatever"));
    p.drive();
    assert!(p
        .notices
        .iter()
        .any(|n| matches!(n, Notice::AuthFailed { .. })));
    eprintln!("{:#?}", p.notices);
    assert_eq!(p.server.stats().auth_failures, 1);
    let mut p = Pair::new(client_config("nope", "alice", b"alice's key"));
    p.drive();
    assert!(p.notices.iter().any(|n| matches!(
        n,
        Notice::Rejected {
            code: RejectCode::NoSuchExport,
            ..
        }
    )));
}

fn keys(table: &[(&str, &[u8])]) -> Vec<(String, Key)> {
    table
        .iter()
        .map(|(id, k)| (id.to_string(), Key::new(k.to_vec())))
        .collect()
}

#[test]
fn a_withdrawn_key_closes_its_channels_and_given_back_resumes_the_session() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    assert_eq!(p.client.ready_channels(), 2);
    let first = Bytes::from(vec![0xA1; 4096]);
    p.io(1, IoRequest::write(0, first.clone(), false)).unwrap();
    let session = p.client.session();

    // A table the server cannot use changes nothing.
    assert!(p.server.set_keys(Vec::new(), p.now).is_err());
    assert!(p.server.poll_action().is_none());

    // alice's key withdrawn: both her channels close at once, and her
    // reconnects are refused.
    let change = p
        .server
        .set_keys(keys(&[("bob", b"bob's key")]), p.now)
        .unwrap();
    assert_eq!(
        change,
        KeyChange {
            added: vec![],
            withdrawn: vec!["alice".into()],
            channels_closed: 2
        }
    );
    p.drive();
    assert_eq!(p.client.ready_channels(), 0);
    assert_eq!(p.server.session_count(), 1, "the session lingers");
    // A write submitted meanwhile waits rather than fails.
    let second = Bytes::from(vec![0xB2; 4096]);
    p.client
        .submit(2, IoRequest::write(4096, second.clone(), false), p.now)
        .unwrap();
    p.advance(Duration::from_millis(300));
    assert!(p.completions.is_empty());
    assert_eq!(p.client.ready_channels(), 0);
    assert!(p
        .notices
        .iter()
        .any(|n| matches!(n, Notice::AuthFailed { .. })));

    // Given back within the linger: the same session resumes, and the
    // write lands once.
    let change = p
        .server
        .set_keys(
            keys(&[("alice", b"alice's key"), ("bob", b"bob's key")]),
            p.now,
        )
        .unwrap();
    assert_eq!(change.added, ["alice"]);
    assert!(change.withdrawn.is_empty());
    p.advance(Duration::from_secs(2));
    assert_eq!(p.client.ready_channels(), 2);
    assert_eq!(p.client.session(), session, "the session resumed");
    assert_eq!(p.server.stats().sessions_created, 1);
    let done = p.completions.remove(0);
    assert_eq!((done.user, done.result.is_ok()), (2, true));
    assert_eq!(
        p.io(3, IoRequest::read(0, 8192)).unwrap(),
        [first, second].concat()
    );
    assert_eq!(p.server.stats().channels_revoked, 2);

    // The same id with other bytes is a withdrawn key too.
    let change = p
        .server
        .set_keys(
            keys(&[("alice", b"alice's new key"), ("bob", b"bob's key")]),
            p.now,
        )
        .unwrap();
    assert_eq!(
        (change.withdrawn, change.channels_closed),
        (vec!["alice".into()], 2)
    );
    p.drive();
    assert_eq!(p.client.ready_channels(), 0);
}

/// A key rotated with no outage: the server holds the old and the new,
/// the client takes the new for its next handshakes, the old is
/// withdrawn, and the client's channels come back under the new one in
/// the same session, IO going on.
#[test]
fn a_key_rotates_with_the_session_kept() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    let both = keys(&[("alice", b"alice's key"), ("carol", b"carol's key")]);
    p.server.set_keys(both, p.now).unwrap();
    let one = Bytes::from(vec![0x11; 4096]);
    p.io(1, IoRequest::write(0, one.clone(), false)).unwrap();
    assert!(p
        .client
        .set_key(String::new(), Key::new(*b"no id"))
        .is_err());

    // A channel added now sends its HELLO under alice's key; the client
    // takes carol's before the challenge comes: that handshake still
    // proves alice's, and only later ones use carol's.
    let tuning = ClientTuning {
        channels: Some(3),
        ..ClientTuning::default()
    };
    p.client.tune(&tuning, p.now).unwrap();
    while let Some(a) = p.client.poll_action() {
        match a {
            ClientAction::Connect(ch) => p.connect(ch),
            ClientAction::Send(ch, f) => p.to_server.push_back((p.conns[&ch], f.to_bytes())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(p.to_server.len(), 1, "the new channel's HELLO");
    p.client
        .set_key("carol".into(), Key::new(*b"carol's key"))
        .unwrap();
    p.drive();
    assert_eq!(p.client.ready_channels(), 3);
    assert!(
        !p.notices
            .iter()
            .any(|n| matches!(n, Notice::AuthFailed { .. })),
        "{:?}",
        p.notices
    );

    // alice's key withdrawn: every channel closes and comes back under
    // carol's, in the same session.
    let session = p.client.session();
    let change = p
        .server
        .set_keys(keys(&[("carol", b"carol's key")]), p.now)
        .unwrap();
    assert_eq!(change.channels_closed, 3);
    p.drive();
    assert_eq!(p.client.ready_channels(), 0);
    p.advance(Duration::from_secs(1));
    assert_eq!(p.client.ready_channels(), 3);
    assert_eq!(p.client.session(), session);
    let two = Bytes::from(vec![0x22; 4096]);
    p.io(2, IoRequest::write(4096, two.clone(), false)).unwrap();
    assert_eq!(
        p.io(3, IoRequest::read(0, 8192)).unwrap(),
        [one, two].concat()
    );
    assert_eq!(p.server.stats().sessions_created, 1);
    assert_eq!(p.server.stats().auth_failures, 0);
}

#[test]
fn a_key_withdrawn_between_challenge_and_proof_fails_the_proof() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    let key = Key::new(*b"alice's key");
    let (nonce, now) = ([3; 16], Instant::ZERO);
    for (conn, table) in [
        (1, keys(&[("bob", b"bob's key")])),
        (2, keys(&[("alice", b"alice's other key")])),
    ] {
        server
            .set_keys(keys(&[("alice", b"alice's key")]), now)
            .unwrap();
        let c = hello(&mut server, conn, nonce, now).unwrap();
        let change = server.set_keys(table, now).unwrap();
        assert_eq!(
            change.channels_closed, 0,
            "a handshake is not a channel yet"
        );
        let auth = alice_auth(&key, nonce, &c);
        server.handle_frame(conn, wire::encode(&auth).to_bytes(), now);
        let replies = drain(&mut server);
        assert!(
            replies
                .iter()
                .any(|m| matches!(m, Message::Reject(r) if r.code == RejectCode::AuthFailed)),
            "{replies:?}"
        );
        server.check().unwrap();
    }
    assert_eq!(server.session_count(), 0);
    assert_eq!(server.stats().auth_failures, 2);
}

/// Runs a handshake by hand so a test can record and replay it.
/// alice's HELLO for disk0, version 1, no identity, no session.
fn alice_hello(nonce: [u8; 16]) -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        features: 0,
        session_id: 0,
        client_nonce: nonce,
        owner: 0,
        epoch: 0,
        key_id: "alice".into(),
        export: "disk0".into(),
    }
}

fn hello(
    server: &mut ServerEngine,
    conn: ConnId,
    nonce: [u8; 16],
    now: Instant,
) -> Option<Challenge> {
    server.connection_opened(conn, now);
    let msg = Message::Hello(alice_hello(nonce));
    server.handle_frame(conn, wire::encode(&msg).to_bytes(), now);
    match server.poll_action() {
        Some(ServerAction::Send { frame, .. }) => match wire::decode(frame.to_bytes()).unwrap() {
            Message::Challenge(c) => Some(c),
            _ => None,
        },
        _ => None,
    }
}

/// The AUTH answering challenge `c` to [`alice_hello`] with `nonce`,
/// proved with `key`.
fn alice_auth(key: &Key, nonce: [u8; 16], c: &Challenge) -> Message {
    let t = braid_core::auth::Transcript {
        key_id: "alice",
        export: "disk0",
        session_id: 0,
        owner_epoch: (0, 0),
        client_nonce: &nonce,
        server_nonce: &c.server_nonce,
        boot_id: c.boot_id,
    };
    Message::Auth(Auth {
        client_proof: braid_core::auth::client_proof(key, &t),
    })
}

fn drain(server: &mut ServerEngine) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(a) = server.poll_action() {
        if let ServerAction::Send { frame, .. } = a {
            out.push(wire::decode(frame.to_bytes()).unwrap());
        }
    }
    out
}

#[test]
fn a_recorded_handshake_cannot_be_replayed() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    let key = Key::new(*b"alice's key");
    let nonce = [5; 16];
    let now = Instant::ZERO;
    let c1 = hello(&mut server, 1, nonce, now).unwrap();
    let recorded = wire::encode(&alice_auth(&key, nonce, &c1));
    server.handle_frame(1, recorded.to_bytes(), now);
    assert!(
        drain(&mut server)
            .iter()
            .any(|m| matches!(m, Message::Welcome(_))),
        "the genuine handshake works"
    );

    // An eavesdropper replays the same HELLO and AUTH on a new connection.
    let c2 = hello(&mut server, 2, nonce, now).unwrap();
    assert_ne!(c1.server_nonce, c2.server_nonce, "every challenge is fresh");
    server.handle_frame(2, recorded.to_bytes(), now);
    let replies = drain(&mut server);
    assert!(
        replies
            .iter()
            .any(|m| matches!(m, Message::Reject(r) if r.code == RejectCode::AuthFailed)),
        "{replies:?}"
    );
    assert_eq!(server.stats().auth_failures, 1);
    assert_eq!(server.session_count(), 1);
}

#[test]
fn garbage_on_one_connection_leaves_other_sessions_alone() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    let before = p.server.stats().protocol_errors;
    for (conn, junk) in [
        (900, &b"GET / HTTP/1.1\r\n\r\n"[..]),
        (901, &[0u8; 64][..]),
        (902, b"BRD1"),
    ] {
        p.server.connection_opened(conn, p.now);
        p.server
            .handle_frame(conn, Bytes::copy_from_slice(junk), p.now);
    }
    // A request before any handshake.
    p.server.connection_opened(903, p.now);
    let early = Message::Request(Request {
        op: Op::Read,
        id: 1,
        floor: 1,
        offset: 0,
        length: 512,
        flags: 0,
        remote: None,
        payload: Bytes::new(),
    });
    p.server
        .handle_frame(903, wire::encode(&early).to_bytes(), p.now);
    // A server's message, sent by a client.
    p.server.connection_opened(904, p.now);
    let pong = Message::Pong { token: 7 };
    p.server
        .handle_frame(904, wire::encode(&pong).to_bytes(), p.now);
    let mut closed = Vec::new();
    while let Some(a) = p.server.poll_action() {
        if let ServerAction::Close { conn, reason } = a {
            closed.push((conn, reason));
        }
    }
    closed.sort_by_key(|c| c.0);
    let conns: Vec<ConnId> = closed.iter().map(|c| c.0).collect();
    assert_eq!(conns, vec![900, 901, 902, 903, 904]);
    assert_eq!(
        closed[3].1,
        CloseReason::ProtocolViolation("request before the handshake finished")
    );
    assert_eq!(
        closed[4].1,
        CloseReason::ProtocolViolation("server-to-client message sent by the client"),
        "the reason says what was wrong"
    );
    assert_eq!(p.server.stats().protocol_errors, before + 5);
    assert!(
        p.io(1, IoRequest::read(0, 512)).is_ok(),
        "the real session is untouched"
    );
}

#[test]
fn half_open_connections_are_closed_after_the_handshake_timeout() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    server.connection_opened(1, Instant::ZERO);
    server.handle_timeout(Instant::ZERO + Duration::from_secs(5));
    assert!(server.poll_action().is_none());
    server.handle_timeout(Instant::ZERO + Duration::from_secs(11));
    assert!(matches!(
        server.poll_action(),
        Some(ServerAction::Close {
            conn: 1,
            reason: CloseReason::HandshakeTimeout
        })
    ));
}

#[test]
fn the_server_wakes_exactly_when_a_timer_is_due_and_never_when_idle() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    assert_eq!(server.poll_timeout(), None, "nothing to time");
    let t0 = Instant::ZERO + Duration::from_millis(3);
    server.connection_opened(1, t0);
    // The handshake deadline, exactly (no periodic sweep).
    assert_eq!(server.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    server.connection_closed(1, t0);
    // A stale timer may fire once, finds nothing and leaves none behind.
    server.handle_timeout(t0 + Duration::from_secs(10));
    assert!(server.poll_action().is_none());
    assert_eq!(server.poll_timeout(), None);
}

#[test]
fn close_finishes_io_in_flight_and_flushes_before_goodbye() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    let data = Bytes::from(vec![0xC3; 4096]);
    p.io(1, IoRequest::write(0, data.clone(), false)).unwrap();
    p.client.submit(2, IoRequest::read(0, 4096), p.now).unwrap();
    let backend_ops = p.server.stats().backend_ops;
    p.client.close(p.now);
    assert!(
        !p.client.is_closed(),
        "a read is in flight and a write unflushed"
    );
    assert!(matches!(
        p.client.submit(3, IoRequest::read(0, 512), p.now),
        Err(SubmitError::Invalid(_))
    ));
    p.drive();
    assert!(p.client.is_closed());
    assert_eq!(p.completions.len(), 1);
    assert_eq!(p.completions[0].result.as_ref().unwrap(), &data);
    assert_eq!(
        p.server.stats().backend_ops,
        backend_ops + 2,
        "the read, then the client's own FLUSH of the write"
    );
    assert_eq!(p.client.stats().dirty_flushes, 1);
    assert_eq!(p.server.session_count(), 0, "GOODBYE after the flush");
}

#[test]
fn abandon_fails_what_is_unfinished_and_reports_unflushed_bytes() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    p.io(1, IoRequest::write(0, Bytes::from(vec![1; 4096]), false))
        .unwrap();
    // The server never hears of this one.
    p.client.submit(2, IoRequest::read(0, 512), p.now).unwrap();
    p.client.close(p.now);
    let unflushed = p.client.abandon(p.now);
    assert!(
        unflushed >= 4096,
        "the unflushed write is reported: {unflushed}"
    );
    assert!(p.client.is_closed());
    p.client
        .check()
        .expect("nothing left pointing at closed channels");
    let failed: Vec<Completion> = std::iter::from_fn(|| p.client.poll_action())
        .filter_map(|a| match a {
            ClientAction::Complete(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0].result.as_ref().unwrap_err().kind,
        IoErrorKind::Closed
    );
}

#[test]
fn goodbye_frees_the_session_and_linger_expiry_frees_an_abandoned_one() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    p.client.close(p.now);
    p.drive();
    assert_eq!(p.server.session_count(), 0);
    assert_eq!(p.server.stats().sessions_freed, 1);

    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    // The client vanishes without a word.
    let conns: Vec<ConnId> = p.chans.keys().copied().collect();
    for c in conns {
        p.server.connection_closed(c, p.now);
    }
    p.now = p.now + Duration::from_secs(299);
    p.server.handle_timeout(p.now);
    assert_eq!(p.server.session_count(), 1, "kept for its client to return");
    p.now = p.now + Duration::from_secs(2);
    p.server.handle_timeout(p.now);
    assert_eq!(p.server.session_count(), 0);
}

/// Requests the client sent on each connection since `before`, largest
/// count first.
fn sent_since(p: &Pair, before: &BTreeMap<ConnId, usize>) -> Vec<usize> {
    let mut counts: Vec<usize> = p
        .conns
        .values()
        .map(|c| p.sent_to.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0))
        .collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    counts
}

#[test]
fn small_requests_stay_on_one_channel_until_it_is_well_ahead() {
    let mut config = client_config("disk0", "alice", b"alice's key");
    config.channels = 4;
    let mut p = Pair::new(config);
    p.drive();
    // Nothing comes back: every request stays in flight.
    let conns: Vec<ConnId> = p.conns.values().copied().collect();
    assert_eq!(conns.len(), 4);
    p.blackhole.extend(conns);
    let mut user = 0;
    let mut read = |p: &mut Pair, len: u32| {
        user += 1;
        p.client
            .submit(user, IoRequest::read(0, len), p.now)
            .unwrap();
    };
    for _ in 0..4 {
        read(&mut p, 1 << 20);
    }
    p.drive();
    assert_eq!(
        sent_since(&p, &BTreeMap::new()),
        [1, 1, 1, 1],
        "large requests go to the least loaded channel each"
    );
    let before = p.sent_to.clone();
    for _ in 0..10 {
        read(&mut p, 4096);
    }
    p.drive();
    assert_eq!(
        sent_since(&p, &before),
        [10, 0, 0, 0],
        "a burst of small requests leaves on one channel"
    );
    for _ in 0..24 {
        read(&mut p, 4096);
    }
    p.drive();
    assert_eq!(
        sent_since(&p, &before),
        [16, 16, 2, 0],
        "a channel takes small requests until it is 16 ahead of the least loaded"
    );
}

#[test]
fn small_requests_leave_a_channel_that_has_gone_quiet() {
    let mut config = client_config("disk0", "alice", b"alice's key");
    config.channels = 4;
    let mut p = Pair::new(config);
    p.drive();
    p.client.submit(1, IoRequest::read(0, 4096), p.now).unwrap();
    p.drive();
    let (&first, _) = p.sent_to.iter().find(|(_, n)| **n == 1).unwrap();
    // The channel that carried the first read falls silent.
    p.blackhole.insert(first);
    p.client.submit(2, IoRequest::read(0, 4096), p.now).unwrap();
    p.drive();
    assert_eq!(
        p.sent_to[&first], 2,
        "an answering channel keeps the next one"
    );
    p.advance(Duration::from_millis(5));
    let before = p.sent_to.clone();
    for user in 3..=5 {
        p.client
            .submit(user, IoRequest::read(0, 4096), p.now)
            .unwrap();
    }
    p.drive();
    assert_eq!(
        p.sent_to[&first], 2,
        "a silent channel takes no more by stickiness"
    );
    assert_eq!(
        sent_since(&p, &before),
        [3, 0, 0, 0],
        "the burst moves on together to one other channel"
    );
}

#[test]
fn overlapping_writes_go_out_one_at_a_time() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    // Nothing comes back, so whatever may go out, goes out now.
    let conns: Vec<ConnId> = p.conns.values().copied().collect();
    p.blackhole.extend(conns);
    for (user, offset) in [(1, 0), (2, 512), (3, 8192)] {
        p.client
            .submit(
                user,
                IoRequest::write(offset, Bytes::from(vec![user as u8; 1024]), false),
                p.now,
            )
            .unwrap();
    }
    p.drive();
    assert_eq!(
        p.sent_to.values().sum::<usize>(),
        2,
        "the write overlapping an unanswered one waits; the disjoint one goes"
    );
}

#[test]
fn a_suspect_channel_still_carries_io_when_it_is_the_only_one_up() {
    let mut config = client_config("disk0", "alice", b"alice's key");
    // Least-in-flight would keep both small writes on one channel.
    config.policy = Policy::RoundRobin;
    let mut p = Pair::new(config);
    p.drive();
    let conn_of = |p: &Pair, slot: u16| {
        p.conns
            .iter()
            .find(|(ch, _)| ch.slot == slot)
            .map(|(ch, conn)| (*ch, *conn))
            .unwrap()
    };
    let (_, a) = conn_of(&p, 0);
    p.blackhole.insert(a);
    // Later than the last frame the channel brought.
    p.advance(Duration::from_millis(10));
    // Round robin puts one of two writes on the silent channel.
    for user in 1..=2 {
        p.client
            .submit(
                user,
                IoRequest::write(user * 4096, Bytes::from(vec![user as u8; 512]), false),
                p.now,
            )
            .unwrap();
    }
    p.drive();
    assert_eq!(
        p.completions.len(),
        1,
        "one write is lost on the silent channel"
    );
    // It ages, goes again on the other channel, and the silent one is
    // suspect from now on.
    p.advance(Duration::from_millis(250));
    assert_eq!(p.completions.len(), 2);
    assert_eq!(p.client.ready_channels(), 2);
    // The trusted channel breaks; the suspect one is all that is up.
    let (b_ch, b) = conn_of(&p, 1);
    p.conns.remove(&b_ch);
    p.chans.remove(&b);
    p.server.connection_closed(b, p.now);
    p.client.channel_closed(b_ch, p.now);
    p.drive();
    assert_eq!(p.client.ready_channels(), 1);
    let before = p.sent_to.get(&a).copied().unwrap_or(0);
    p.client.submit(9, IoRequest::read(0, 512), p.now).unwrap();
    p.drive();
    assert!(
        p.sent_to.get(&a).copied().unwrap_or(0) > before,
        "IO waits for the reconnect instead of trying the channel that is up"
    );
}

#[test]
fn a_quiet_channel_is_pinged_and_a_silent_one_declared_dead() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    p.advance(Duration::from_millis(250));
    assert!(p.client.stats().pings >= 2, "one ping per quiet channel");
    p.advance(Duration::from_millis(250));
    let mut tokens = p.ping_tokens.clone();
    tokens.sort();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        p.ping_tokens.len(),
        "every ping its own token, so a late pong answers only its own: {:?}",
        p.ping_tokens
    );
    assert_eq!(p.client.ready_channels(), 2, "pongs keep them alive");
    // Now the server goes silent: frames to it vanish.
    let pings = p.client.stats().pings;
    p.now = p.now + Duration::from_millis(250);
    p.client.handle_timeout(p.now);
    while let Some(a) = p.client.poll_action() {
        assert!(!matches!(a, ClientAction::Complete(_)));
    }
    assert!(p.client.stats().pings > pings);
    p.now = p.now + Duration::from_millis(900);
    p.client.handle_timeout(p.now);
    assert_eq!(p.client.ready_channels(), 0);
    assert_eq!(p.client.stats().channel_failures, 2);
}

#[test]
fn back_pressure_refuses_io_beyond_the_journal_bound() {
    let mut cfg = client_config("disk0", "alice", b"alice's key");
    cfg.max_queued = 3;
    let mut client = ClientEngine::new(cfg).expect("a valid config");
    let now = Instant::ZERO;
    for user in 0..3 {
        client.submit(user, IoRequest::read(0, 512), now).unwrap();
    }
    assert_eq!(
        client.submit(3, IoRequest::read(0, 512), now),
        Err(SubmitError::Busy)
    );
    assert_eq!(client.journal_len(), 3, "no channel is up: nothing grows");
    assert_eq!(client.journal_bytes(), 0, "reads journal no payload");
    let mut cfg = client_config("disk0", "alice", b"alice's key");
    cfg.max_queued = 8;
    let mut writer = ClientEngine::new(cfg).expect("a valid config");
    for user in 0..3 {
        let data = Bytes::from(vec![7; 512]);
        writer
            .submit(user, IoRequest::write(0, data, false), now)
            .unwrap();
    }
    assert_eq!(writer.journal_bytes(), 3 * 512, "the payloads journaled");
}

#[test]
fn a_write_refused_for_a_full_dirty_window_hears_room_with_nothing_in_flight() {
    // A QD1 writer that never flushes: the dirty window fills, the next
    // write is refused, and the only thing in flight is the client's own
    // FLUSH, which completes no user IO. Without Room its driver would
    // wait forever (seen as a hung NBD write under `braid attach`).
    let mut cfg = client_config("disk0", "alice", b"alice's key");
    cfg.max_dirty_bytes = 4096;
    let mut p = Pair::new(cfg);
    p.drive();
    let data = Bytes::from(vec![0x5A; 4096]);
    p.io(1, IoRequest::write(0, data.clone(), false)).unwrap();
    assert_eq!(
        p.client
            .submit(2, IoRequest::write(4096, data.clone(), false), p.now),
        Err(SubmitError::Busy)
    );
    assert_eq!(p.rooms, 0);
    p.drive();
    assert!(p.completions.is_empty(), "no user IO was in flight");
    assert_eq!(p.rooms, 1, "the window drained: say so once");
    p.io(2, IoRequest::write(4096, data, false)).unwrap();
    // Reads never wait for the dirty window, so they are never refused
    // for it and never owed a Room.
    p.io(3, IoRequest::read(0, 4096)).unwrap();
    assert_eq!(p.rooms, 1);
}

#[test]
fn a_request_refused_for_a_full_journal_hears_room_when_one_completes() {
    let mut cfg = client_config("disk0", "alice", b"alice's key");
    cfg.max_queued = 2;
    let mut p = Pair::new(cfg);
    for user in 0..2 {
        p.client
            .submit(user, IoRequest::read(0, 512), p.now)
            .unwrap();
    }
    assert_eq!(
        p.client.submit(2, IoRequest::read(0, 512), p.now),
        Err(SubmitError::Busy)
    );
    p.drive();
    assert_eq!((p.completions.len(), p.rooms), (2, 1));
    p.io(2, IoRequest::read(0, 512)).unwrap();
}

#[test]
fn a_write_larger_than_the_journal_is_invalid_not_busy_forever() {
    let mut cfg = client_config("disk0", "alice", b"alice's key");
    cfg.max_journal_bytes = 4096;
    let mut client = ClientEngine::new(cfg).expect("a valid config");
    assert!(matches!(
        client.submit(
            1,
            IoRequest::write(0, Bytes::from(vec![1; 8192]), false),
            Instant::ZERO
        ),
        Err(SubmitError::Invalid(_))
    ));
    assert!(client
        .poll_action()
        .is_none_or(|a| !matches!(a, ClientAction::Room)));
}

#[test]
fn an_io_timeout_fails_io_with_an_error_instead_of_hanging() {
    let mut cfg = client_config("disk0", "alice", b"alice's key");
    cfg.io_timeout = Some(Duration::from_secs(5));
    let mut client = ClientEngine::new(cfg).expect("a valid config");
    client
        .submit(1, IoRequest::read(0, 512), Instant::ZERO)
        .unwrap();
    let later = Instant::ZERO + Duration::from_secs(6);
    client.handle_timeout(later);
    let done: Vec<Completion> = std::iter::from_fn(|| client.poll_action())
        .filter_map(|a| {
            if let ClientAction::Complete(c) = a {
                Some(c)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0].result.as_ref().unwrap_err().kind,
        IoErrorKind::TimedOut
    );
}

#[test]
fn server_restart_is_detected_and_unflushed_data_replayed() {
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    let data = Bytes::from(vec![0x5A; 1024]);
    p.io(1, IoRequest::write(0, data.clone(), false)).unwrap();
    assert!(p.client.dirty_bytes() >= 1024);
    // Power loss: a new server process, and the unflushed write is gone.
    let conns: Vec<(ConnId, ChannelId)> = p.chans.iter().map(|(c, ch)| (*c, *ch)).collect();
    p.chans.clear();
    p.conns.clear();
    let mut cfg = server_config();
    cfg.boot_id = 0xB008;
    p.server = ServerEngine::new(cfg).expect("a valid config");
    p.disk[..1024].fill(0);
    for (_, ch) in conns {
        p.client.channel_closed(ch, p.now);
    }
    p.advance(Duration::from_millis(100));
    assert_eq!(p.client.ready_channels(), 2);
    assert!(p.notices.iter().any(|n| matches!(
        n,
        Notice::SessionStarted {
            replaced: true,
            replay_extents: 1,
            ..
        }
    )));
    assert_eq!(
        p.io(2, IoRequest::read(0, 1024)).unwrap(),
        data,
        "nothing acknowledged was lost"
    );
    p.io(3, IoRequest::flush()).unwrap();
    assert_eq!(
        p.client.dirty_bytes(),
        0,
        "a completed flush empties the dirty window"
    );
    assert_eq!(p.client.replays_pending(), 0, "the replay is done");
}

#[test]
fn a_replay_the_restarted_server_refuses_is_held_and_lands_later() {
    // Found by the madsim mirror (seed 77): the server lost power with an
    // acknowledged write unflushed and came back with its disk full; the
    // replay failed with NO_SPACE and was dropped, and a read then saw the
    // older data.
    let mut p = Pair::new(client_config("disk0", "alice", b"alice's key"));
    p.drive();
    let data = Bytes::from(vec![0x77; 1024]);
    p.io(1, IoRequest::write(0, data.clone(), false)).unwrap();
    let conns: Vec<ChannelId> = p.chans.values().copied().collect();
    p.chans.clear();
    p.conns.clear();
    let mut cfg = server_config();
    cfg.boot_id = 0xB009;
    p.server = ServerEngine::new(cfg).expect("a valid config");
    p.disk[..1024].fill(0);
    p.full = true;
    for ch in conns {
        p.client.channel_closed(ch, p.now);
    }
    p.advance(Duration::from_millis(100));
    assert!(
        p.client.stats().replay_retries >= 1,
        "the replay was refused"
    );
    // A read waits behind the held replay instead of seeing old data.
    p.client.submit(2, IoRequest::read(0, 1024), p.now).unwrap();
    p.drive();
    assert!(
        p.completions.is_empty(),
        "the read must wait for the replay"
    );
    // Room again: the replay lands on the next try, then the read runs.
    p.full = false;
    p.advance(Duration::from_secs(2));
    let read = p
        .completions
        .iter()
        .find(|c| c.user == 2)
        .expect("the read completed");
    assert_eq!(
        read.result.as_ref().unwrap(),
        &data,
        "nothing acknowledged was lost"
    );
    assert_eq!(&p.disk[..1024], &data[..]);
}

#[test]
fn fua_only_traffic_keeps_the_dirty_window_bounded() {
    let mut cfg = client_config("disk0", "alice", b"alice's key");
    cfg.max_dirty_bytes = 64 * 1024;
    let mut p = Pair::new(cfg);
    p.drive();
    for user in 0..5000u64 {
        let data = Bytes::from(vec![user as u8; 512]);
        p.io(user, IoRequest::write((user % 64) * 512, data, true))
            .unwrap();
        assert!(
            p.client.dirty_bytes() <= 64 * 1024,
            "after {user} FUA writes"
        );
    }
    assert!(
        p.client.stats().dirty_flushes > 0,
        "durable-mask entries are flushed away too"
    );
}

mod arbitrary_input {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// The same harness `cargo fuzz run server_frames` drives: garbage,
        /// checksummed garbage, requests, closes, time and backend results
        /// in any order never panic the server or break its bounds.
        #[test]
        fn the_server_survives_arbitrary_input(data in prop::collection::vec(any::<u8>(), 0..1500)) {
            braid_core::testkit::exercise_server(&data);
        }
    }

    #[test]
    fn random_input_reaches_authenticated_request_handling() {
        use braid_core::rng::SplitMix64;
        let mut rng = SplitMix64::new(1);
        let (mut handshakes, mut requests, mut backend, mut rejected) = (0, 0, 0, 0);
        for _ in 0..2000 {
            let len = rng.below(1500) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let s = braid_core::testkit::exercise_server(&data);
            handshakes += s.handshakes;
            requests += s.requests;
            backend += s.backend_ops;
            rejected += s.protocol_errors;
        }
        assert!(
            handshakes > 0 && requests > 0 && backend > 0 && rejected > 0,
            "{handshakes} {requests} {backend} {rejected}"
        );
    }
}

#[test]
fn a_client_ignoring_max_inflight_cannot_pin_server_memory() {
    let mut cfg = server_config();
    cfg.max_inflight = 4;
    let mut server = ServerEngine::new(cfg).expect("a valid config");
    let now = Instant::ZERO;
    // Authenticate, then flood reads the backend never finishes.
    server.connection_opened(1, now);
    assert!(braid_core::testkit::authenticate(
        &mut server,
        1,
        "alice",
        &Key::new(*b"alice's key"),
        "disk0",
        now
    ));
    while server.poll_action().is_some() {}
    for id in 1..=100u64 {
        let req = Message::Request(Request {
            op: Op::Read,
            id,
            floor: 1,
            offset: 0,
            length: 512,
            flags: 0,
            remote: None,
            payload: Bytes::new(),
        });
        server.handle_frame(1, wire::encode(&req).to_bytes(), now);
    }
    let issued = std::iter::from_fn(|| server.poll_action())
        .filter(|a| matches!(a, ServerAction::Backend(_)))
        .count();
    assert_eq!(issued, 8, "at most twice max_inflight execute at once");
    assert_eq!(server.stats().overload_dropped, 92);
    assert!(
        server.cached_results() <= 8,
        "dropped requests are forgotten, not remembered"
    );
}

fn write_request(id: u64, offset: u64, byte: u8) -> Message {
    Message::Request(Request {
        op: Op::Write,
        id,
        floor: 1,
        offset,
        length: 512,
        flags: 0,
        remote: None,
        payload: Bytes::from(vec![byte; 512]),
    })
}

/// Opens `conn` and authenticates it as run `epoch` of alice's client
/// `owner` on disk0; whether a CHALLENGE came.
fn open_as(server: &mut ServerEngine, conn: ConnId, run: (u64, u64)) -> bool {
    open_on(server, conn, "disk0", run)
}

/// Like [`open_as`], on `export`.
fn open_on(
    server: &mut ServerEngine,
    conn: ConnId,
    export: &str,
    (owner, epoch): (u64, u64),
) -> bool {
    server.connection_opened(conn, Instant::ZERO);
    let key = Key::new(*b"alice's key");
    braid_core::testkit::authenticate_as(
        server,
        conn,
        ("alice", &key),
        export,
        (owner, epoch),
        Instant::ZERO,
    )
}

/// Every backend operation the server asks for, answered at once.
fn run_backend(server: &mut ServerEngine, now: Instant) -> (Vec<BackendOp>, Vec<Message>) {
    let (mut ops, mut sent) = (Vec::new(), Vec::new());
    while let Some(a) = server.poll_action() {
        match a {
            ServerAction::Backend(req) => {
                ops.push(req.op.clone());
                server.backend_complete(req.token, Ok(Bytes::new()), now);
            }
            ServerAction::Send { frame, .. } => sent.push(wire::decode(frame.to_bytes()).unwrap()),
            _ => {}
        }
    }
    (ops, sent)
}

#[test]
fn a_hello_without_a_version_in_common_is_refused() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    let now = Instant::ZERO;
    for (conn, (min, max)) in [(1, (2, 3)), (2, (0, 0))] {
        server.connection_opened(conn, now);
        let hello = Message::Hello(Hello {
            version_min: min,
            version_max: max,
            ..alice_hello([1; 16])
        });
        server.handle_frame(conn, wire::encode(&hello).to_bytes(), now);
        let answer = drain(&mut server);
        assert!(
            matches!(&answer[..], [Message::Reject(r)] if r.code == RejectCode::VersionMismatch),
            "versions {min}..={max}: {answer:?}"
        );
    }
}

#[test]
fn a_request_seen_again_is_answered_from_its_record_not_executed_again() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    let now = Instant::ZERO;
    assert!(open_as(&mut server, 1, (7, 1)));
    drain(&mut server);
    let first = wire::encode(&write_request(1, 0, 0xaa)).to_bytes();
    server.handle_frame(1, first.clone(), now);
    let (ops, _) = run_backend(&mut server, now);
    assert_eq!(ops.len(), 1);
    server.handle_frame(1, wire::encode(&write_request(2, 0, 0xbb)).to_bytes(), now);
    assert_eq!(run_backend(&mut server, now).0.len(), 1);
    // Write 1 again (a resend that crossed its reply): executing it now
    // would put 0xaa back over the newer 0xbb.
    server.handle_frame(1, first, now);
    let (ops, sent) = run_backend(&mut server, now);
    assert!(ops.is_empty(), "executed again: {ops:?}");
    assert!(
        matches!(&sent[..], [Message::Reply(r)] if r.id == 1 && r.status == Status::Ok),
        "{sent:?}"
    );
    // An id past the window the server remembers (floor 1 + id_window)
    // could never be told from a duplicate later: refused, not executed.
    let far = u64::from(server_config().id_window) + 1;
    server.handle_frame(
        1,
        wire::encode(&write_request(far, 0, 0xcc)).to_bytes(),
        now,
    );
    let (ops, sent) = run_backend(&mut server, now);
    assert!(ops.is_empty(), "executed out of window: {ops:?}");
    assert!(
        matches!(&sent[..], [Message::Reply(r)] if r.id == far && r.status == Status::Invalid),
        "{sent:?}"
    );
    server.check().unwrap();
}

/// A read the driver answers from a file goes out as a frame that names
/// the file; the same read asked for again (its last reply may have
/// failed its checksum because the file changed under it) is not offered
/// the file again, so it cannot be starved by a busy region.
#[test]
fn a_read_asked_for_again_is_answered_from_memory() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    let now = Instant::ZERO;
    assert!(open_as(&mut server, 1, (7, 1)));
    drain(&mut server);
    let read = wire::encode(&Message::Request(Request {
        op: Op::Read,
        id: 1,
        floor: 1,
        offset: 0,
        length: 4096,
        flags: 0,
        remote: None,
        payload: Bytes::new(),
    }))
    .to_bytes();
    let file = Arc::new(std::fs::File::open("/dev/zero").unwrap());
    for attempt in 0..3 {
        server.handle_frame(1, read.clone(), now);
        let Some(ServerAction::Backend(req)) = server.poll_action() else {
            panic!("attempt {attempt}: no backend read");
        };
        match (attempt, server.file_reply_conn(req.token)) {
            (0, Some(1)) => {
                let data = wire::FileSlice {
                    file: file.clone(),
                    offset: 0,
                    len: 4096,
                };
                server.backend_complete_from_file(req.token, data, 0x5EED, now);
                let Some(ServerAction::Send { conn: 1, frame }) = server.poll_action() else {
                    panic!("no reply");
                };
                assert_eq!(frame.file_payload().map(|f| f.len), Some(4096));
                assert_eq!(frame.len(), frame.head().len() + 4096);
            }
            (0, other) => panic!("a first read may go from a file on conn 1, got {other:?}"),
            (_, None) => server.backend_complete(req.token, Ok(Bytes::from(vec![0; 4096])), now),
            (_, Some(conn)) => panic!("attempt {attempt} offered the file again (conn {conn})"),
        }
        drain(&mut server);
    }
    assert_eq!(server.stats().file_replies, 1);
    server.check().unwrap();
}

#[test]
fn write_zeroes_may_unmap_unless_the_client_says_no_unmap() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    let now = Instant::ZERO;
    assert!(open_as(&mut server, 1, (7, 1)));
    drain(&mut server);
    for (id, flags, may) in [(1, 0, true), (2, FLAG_NO_UNMAP, false)] {
        let zeroes = Message::Request(Request {
            op: Op::WriteZeroes,
            id,
            floor: 1,
            offset: 0,
            length: 4096,
            flags,
            remote: None,
            payload: Bytes::new(),
        });
        server.handle_frame(1, wire::encode(&zeroes).to_bytes(), now);
        let (ops, _) = run_backend(&mut server, now);
        assert!(
            matches!(&ops[..], [BackendOp::WriteZeroes { may_unmap, .. }] if *may_unmap == may),
            "flags {flags:#x}: {ops:?}"
        );
    }
}

#[test]
fn a_newer_run_fences_only_its_own_client_on_its_own_export() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    let now = Instant::ZERO;
    let (alice, bob) = (0x5eed, 0xb0b);
    assert!(open_on(&mut server, 1, "disk0", (alice, 1)));
    assert!(open_on(&mut server, 2, "disk0", (bob, 1)));
    assert!(open_on(&mut server, 3, "plain", (alice, 1)));
    drain(&mut server);
    let mut exports: Vec<String> = server.sessions().into_iter().map(|s| s.export).collect();
    exports.sort();
    assert_eq!(
        exports,
        ["disk0", "disk0", "plain"],
        "one summary per session"
    );
    server.handle_frame(2, wire::encode(&write_request(1, 0, 0xb0)).to_bytes(), now);
    let Some(ServerAction::Backend(bobs_write)) = server.poll_action() else {
        panic!("bob's write reaches the backend")
    };
    assert_eq!(server.backend_inflight(), 1);
    assert!(open_on(&mut server, 4, "disk0", (alice, 2)));
    let actions: Vec<ServerAction> = std::iter::from_fn(|| server.poll_action()).collect();
    let closed: Vec<ConnId> = actions
        .iter()
        .filter_map(|a| match a {
            ServerAction::Close { conn, reason } => {
                assert_eq!(*reason, CloseReason::Fenced);
                Some(*conn)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        closed,
        [1],
        "bob, and alice on another export, keep their sessions"
    );
    // Clients without an identity (owner 0) are no one's older run, even
    // when one of them sends an epoch.
    assert!(open_on(&mut server, 5, "disk0", (0, 0)));
    assert!(open_on(&mut server, 6, "disk0", (0, 5)));
    assert!(
        !std::iter::from_fn(|| server.poll_action())
            .any(|a| matches!(a, ServerAction::Close { .. })),
        "an anonymous session was fenced"
    );
    assert_eq!(server.session_count(), 5);
    assert_eq!(server.stats().sessions_fenced, 1);
    server.backend_complete(bobs_write.token, Ok(Bytes::new()), now);
    assert_eq!(server.backend_inflight(), 0);
    assert!(
        matches!(&drain(&mut server)[..], [Message::Reply(r)] if r.id == 1 && r.status == Status::Ok),
        "bob's session still answers"
    );
    server.check().unwrap();
}

#[test]
fn a_newer_run_fences_the_older_and_waits_for_its_backend_work() {
    let mut server = ServerEngine::new(server_config()).expect("a valid config");
    let now = Instant::ZERO;
    let owner = 0x5eed;
    assert!(open_as(&mut server, 1, (owner, 1)));
    assert!(matches!(drain(&mut server)[..], [Message::Welcome(_)]));
    server.handle_frame(1, wire::encode(&write_request(1, 0, 0xaa)).to_bytes(), now);
    let Some(ServerAction::Backend(old_write)) = server.poll_action() else {
        panic!("the write reaches the backend")
    };
    // Run 2 of the same client: run 1's channel closes at once, but its
    // write is still in the backend, so run 2 is not welcomed yet.
    assert!(open_as(&mut server, 2, (owner, 2)));
    let actions: Vec<ServerAction> = std::iter::from_fn(|| server.poll_action()).collect();
    assert!(
        matches!(
            &actions[..],
            [ServerAction::Close {
                conn: 1,
                reason: CloseReason::Fenced
            }]
        ),
        "{actions:?}"
    );
    server.check().unwrap();
    assert_eq!(server.stats().sessions_fenced, 1);
    // A frame of run 1 arriving late lands nowhere.
    server.handle_frame(1, wire::encode(&write_request(2, 0, 0xbb)).to_bytes(), now);
    assert!(server.poll_action().is_none());
    server.backend_complete(old_write.token, Ok(Bytes::new()), now);
    let answers: Vec<(ConnId, Message)> = std::iter::from_fn(|| server.poll_action())
        .filter_map(|a| match a {
            ServerAction::Send { conn, frame } => {
                Some((conn, wire::decode(frame.to_bytes()).unwrap()))
            }
            _ => None,
        })
        .collect();
    assert!(
        matches!(&answers[..], [(2, Message::Welcome(w))] if w.flags & WELCOME_RESUMED == 0),
        "run 2 is welcomed once run 1's write finished, and run 1 hears nothing: {answers:?}"
    );
    server.check().unwrap();
    assert_eq!(server.session_count(), 1);
    // Run 1 cannot come back beside run 2: refused at its HELLO.
    server.connection_opened(3, now);
    let hello = Message::Hello(Hello {
        owner,
        epoch: 1,
        ..alice_hello([3; 16])
    });
    server.handle_frame(3, wire::encode(&hello).to_bytes(), now);
    let refused = drain(&mut server);
    assert!(
        matches!(&refused[..], [Message::Reject(r)] if r.code == RejectCode::Fenced),
        "{refused:?}"
    );
}

#[test]
fn a_fenced_client_fails_its_io_and_takes_no_more() {
    let mut config = client_config("disk0", "alice", b"alice's key");
    config.identity = Some(Identity { owner: 9, epoch: 1 });
    let mut pair = Pair::new(config);
    let first = IoRequest::write(0, Bytes::from(vec![1u8; 512]), false);
    pair.io(1, first).expect("run 1 writes");
    // Run 2 appears (the operator started the client again elsewhere).
    assert!(open_as(&mut pair.server, 999, (9, 2)));
    pair.client
        .submit(
            2,
            IoRequest::write(512, Bytes::from(vec![2u8; 512]), false),
            pair.now,
        )
        .expect("accepted while run 1 does not know yet");
    for _ in 0..20 {
        pair.advance(Duration::from_millis(500));
    }
    assert!(pair.client.is_fenced());
    let failed = pair
        .completions
        .iter()
        .find(|c| c.user == 2)
        .expect("completed");
    assert_eq!(
        failed.result.as_ref().map_err(|e| e.kind),
        Err(IoErrorKind::Fenced)
    );
    assert_eq!(
        &pair.disk[512..1024],
        &[0u8; 512][..],
        "nothing of run 1 lands"
    );
    assert!(pair.notices.iter().any(|n| matches!(
        n,
        Notice::Rejected {
            code: RejectCode::Fenced,
            ..
        }
    )));
    assert!(pair
        .client
        .submit(3, IoRequest::read(0, 512), pair.now)
        .is_err());
}
