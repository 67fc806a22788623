//! A server run as several engines: each creates only sessions that route
//! back to it, and `max_sessions` bounds the server, not each engine.

use braid_core::auth::Key;
use braid_core::server::ExportConfig;
use braid_core::server::{engine_for, ServerAction, ServerConfig, ServerEngine};
use braid_core::wire::{self, Hello, Message, RejectCode};
use braid_core::Instant;

fn engine(index: usize, count: usize, max_sessions: usize) -> ServerEngine {
    let mut config = ServerConfig::new(
        0x5AAD,
        [3; 32],
        vec![("alice".into(), Key::new(*b"alice's key"))],
        vec![ExportConfig::new("disk0", 1 << 20)],
    );
    config.max_sessions = max_sessions;
    let mut e = ServerEngine::new(config).expect("a valid config");
    e.set_shard(index, count);
    e
}

/// Opens `conn` on `server` as alice's anonymous client: the session id
/// its WELCOME names.
fn open(server: &mut ServerEngine, conn: u64) -> u64 {
    server.connection_opened(conn, Instant::ZERO);
    let key = Key::new(*b"alice's key");
    let challenged = braid_core::testkit::authenticate_as(
        server,
        conn,
        ("alice", &key),
        "disk0",
        (0, 0),
        Instant::ZERO,
    );
    assert!(challenged, "refused at HELLO");
    let mut welcomed = None;
    while let Some(a) = server.poll_action() {
        if let ServerAction::Send { frame, .. } = a {
            if let Message::Welcome(w) = wire::decode(frame.to_bytes()).unwrap() {
                welcomed = Some(w.session_id);
            }
        }
    }
    welcomed.expect("a WELCOME")
}

/// What `server` answers a new session's HELLO on `conn`.
fn hello_answer(server: &mut ServerEngine, conn: u64) -> Message {
    server.connection_opened(conn, Instant::ZERO);
    let hello = Message::Hello(join_hello(0));
    server.handle_frame(conn, wire::encode(&hello).to_bytes(), Instant::ZERO);
    match server.poll_action() {
        Some(ServerAction::Send { frame, .. }) => wire::decode(frame.to_bytes()).unwrap(),
        other => panic!("no answer: {other:?}"),
    }
}

fn join_hello(session_id: u64) -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        features: 0,
        session_id,
        client_nonce: [1; 16],
        owner: 0,
        epoch: 0,
        key_id: "alice".into(),
        export: "disk0".into(),
    }
}

#[test]
fn each_engine_creates_only_sessions_whose_joins_route_back_to_it() {
    let count = 3;
    let mut engines: Vec<ServerEngine> = (0..count).map(|i| engine(i, count, 64)).collect();
    for (index, e) in engines.iter_mut().enumerate() {
        for conn in 1..=5 {
            let id = open(e, conn);
            assert_eq!(
                engine_for(&join_hello(id), count),
                Some(index),
                "session {id:#x} from engine {index}"
            );
        }
        assert_eq!(e.session_count(), 5);
        e.check().expect("engine invariants");
    }
}

#[test]
fn max_sessions_counts_the_other_engines_sessions() {
    let mut e = engine(1, 2, 4);
    e.set_sessions_elsewhere(3);
    open(&mut e, 1);
    match hello_answer(&mut e, 2) {
        Message::Reject(r) => assert_eq!(r.code, RejectCode::Busy, "the fifth session"),
        other => panic!("the fifth session was answered {other:?}"),
    }
    e.set_sessions_elsewhere(2);
    open(&mut e, 3);
    assert_eq!(
        e.session_count(),
        2,
        "room again once another engine's session ended"
    );
    e.check().expect("engine invariants");
}

#[test]
#[should_panic(expected = "engine 2 of 2")]
fn an_engine_index_past_the_count_is_refused() {
    engine(2, 2, 4);
}

#[test]
fn engines_built_from_one_configuration_never_share_a_nonce() {
    let (mut a, mut b) = (engine(0, 2, 8), engine(1, 2, 8));
    let mut nonces = std::collections::HashSet::new();
    for conn in 1..=20 {
        for e in [&mut a, &mut b] {
            match hello_answer(e, conn) {
                Message::Challenge(c) => {
                    assert!(nonces.insert(c.server_nonce), "a nonce handed out twice")
                }
                other => panic!("no CHALLENGE: {other:?}"),
            }
        }
    }
}
