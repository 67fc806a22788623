//! The wire format against its specification: golden vectors read from
//! docs/PROTOCOL.md, round trips, arbitrary bytes, stream framing, and
//! corruption detection.

use braid_core::wire::*;
use bytes::Bytes;
use proptest::prelude::*;

/// The messages the golden vectors in docs/PROTOCOL.md encode, by name.
fn vector_messages() -> Vec<(&'static str, Message)> {
    vec![
        (
            "hello",
            Message::Hello(Hello {
                version_min: 1,
                version_max: 1,
                features: 0,
                session_id: 0,
                client_nonce: [0x11; 16],
                owner: 0x0a0b_0c0d_0e0f_1011,
                epoch: 3,
                key_id: "client".into(),
                export: "disk0".into(),
            }),
        ),
        (
            "challenge",
            Message::Challenge(Challenge {
                version: 1,
                features: 0,
                boot_id: 0x0102_0304_0506_0708,
                server_nonce: [0x22; 16],
                server_proof: [0x33; 32],
            }),
        ),
        (
            "auth",
            Message::Auth(Auth {
                client_proof: [0x44; 32],
            }),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                session_id: 0xAABB_CCDD_EEFF_0011,
                boot_id: 0x0102_0304_0506_0708,
                export_size: 1 << 30,
                block_size: 512,
                max_payload: 1 << 20,
                max_inflight: 256,
                id_window: 65536,
                export_flags: EXPORT_SEND_FLUSH
                    | EXPORT_SEND_FUA
                    | EXPORT_TRIM
                    | EXPORT_WRITE_ZEROES,
                flags: 0,
            }),
        ),
        (
            "reject",
            Message::Reject(Reject {
                code: RejectCode::AuthFailed,
                message: "authentication failed".into(),
            }),
        ),
        (
            "read",
            Message::Request(Request {
                op: Op::Read,
                id: 7,
                floor: 5,
                offset: 4096,
                length: 4096,
                flags: 0,
                remote: None,
                payload: Bytes::new(),
            }),
        ),
        (
            "write-fua",
            Message::Request(Request {
                op: Op::Write,
                id: 8,
                floor: 5,
                offset: 0,
                length: 8,
                flags: FLAG_FUA,
                remote: None,
                payload: Bytes::from_static(b"braid!\n\0"),
            }),
        ),
        (
            "flush",
            Message::Request(Request {
                op: Op::Flush,
                id: 9,
                floor: 5,
                offset: 0,
                length: 0,
                flags: 0,
                remote: None,
                payload: Bytes::new(),
            }),
        ),
        (
            "trim",
            Message::Request(Request {
                op: Op::Trim,
                id: 10,
                floor: 9,
                offset: 1 << 20,
                length: 1 << 16,
                flags: 0,
                remote: None,
                payload: Bytes::new(),
            }),
        ),
        (
            "write-zeroes",
            Message::Request(Request {
                op: Op::WriteZeroes,
                id: 11,
                floor: 9,
                offset: 512,
                length: 1024,
                flags: FLAG_NO_UNMAP,
                remote: None,
                payload: Bytes::new(),
            }),
        ),
        (
            "read-rdma",
            Message::Request(Request {
                op: Op::Read,
                id: 12,
                floor: 9,
                offset: 0,
                length: 4096,
                flags: 0,
                remote: Some(RemoteBuf {
                    addr: 0x7f00_0000_1000,
                    rkey: 0x1234,
                }),
                payload: Bytes::new(),
            }),
        ),
        (
            "reply-read",
            Message::Reply(Reply {
                id: 7,
                status: Status::Ok,
                exec_seq: 0,
                payload: Bytes::from_static(b"data"),
            }),
        ),
        (
            "reply-write",
            Message::Reply(Reply {
                id: 8,
                status: Status::Ok,
                exec_seq: 42,
                payload: Bytes::new(),
            }),
        ),
        (
            "reply-error",
            Message::Reply(Reply {
                id: 13,
                status: Status::OutOfRange,
                exec_seq: 0,
                payload: Bytes::new(),
            }),
        ),
        ("ping", Message::Ping { token: 3 }),
        ("pong", Message::Pong { token: 3 }),
        ("goodbye", Message::Goodbye),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Vectors from the spec: a `#### Vector `name`` heading, then a fenced
/// block of hex.
fn spec_vectors() -> Vec<(String, Vec<u8>)> {
    let spec = include_str!("../../docs/PROTOCOL.md");
    let mut out = Vec::new();
    let mut lines = spec.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("#### Vector `") else {
            continue;
        };
        let name = rest.trim_end_matches('`').to_string();
        let mut hex_text = String::new();
        let mut inside = false;
        for l in lines.by_ref() {
            if l.starts_with("```") {
                if inside {
                    break;
                }
                inside = true;
                continue;
            }
            if inside {
                hex_text.push_str(l);
            }
        }
        out.push((name, unhex(&hex_text)));
    }
    out
}

/// `BRAID_PRINT_VECTORS=1 cargo test --test wire print_vectors -- --nocapture`
/// prints the vectors in the spec's format (for writing the spec, not for
/// updating it to match a regression).
#[test]
fn print_vectors() {
    if std::env::var_os("BRAID_PRINT_VECTORS").is_none() {
        return;
    }
    for (name, msg) in vector_messages() {
        let bytes = encode(&msg).to_bytes();
        println!("#### Vector `{name}`\n\n```");
        for chunk in bytes.chunks(20) {
            println!("{}", chunk.chunks(4).map(hex).collect::<Vec<_>>().join(" "));
        }
        println!("```\n");
    }
}

#[test]
fn golden_vectors_in_the_spec_match_the_code() {
    let spec = spec_vectors();
    let messages = vector_messages();
    assert_eq!(
        spec.len(),
        messages.len(),
        "every message has a vector in docs/PROTOCOL.md"
    );
    for (name, msg) in messages {
        let (_, bytes) = spec
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no vector {name}"));
        assert_eq!(
            hex(&encode(&msg).to_bytes()),
            hex(bytes),
            "encoding of {name}"
        );
        assert_eq!(
            decode(Bytes::from(bytes.clone())).unwrap(),
            msg,
            "decoding of {name}"
        );
    }
}

#[test]
fn every_single_bit_flip_is_detected() {
    for (name, msg) in vector_messages() {
        let good = encode(&msg).to_bytes();
        for bit in 0..good.len() * 8 {
            let mut bad = good.to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            let result = decode(Bytes::from(bad));
            assert!(
                result.is_err(),
                "{name}: flip of bit {bit} went unnoticed: {result:?}"
            );
            if bit / 8 >= good.len() - msg_payload_len(&msg) {
                assert!(
                    matches!(result, Err(DecodeError::PayloadChecksum { .. })),
                    "{name}: payload flip must be a payload error (resend, not close)"
                );
            }
        }
    }
}

fn msg_payload_len(msg: &Message) -> usize {
    match msg {
        Message::Request(r) => r.payload.len(),
        Message::Reply(r) => r.payload.len(),
        _ => 0,
    }
}

#[test]
fn payload_checksum_error_names_the_request() {
    let msg = vector_messages()
        .into_iter()
        .find(|(n, _)| *n == "write-fua")
        .unwrap()
        .1;
    let mut bad = encode(&msg).to_bytes().to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x80;
    assert_eq!(
        decode(Bytes::from(bad)),
        Err(DecodeError::PayloadChecksum {
            kind: Kind::Write,
            id: 8
        })
    );
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{0,40}"
}

fn any_message() -> impl Strategy<Value = Message> {
    let op = prop_oneof![
        Just(Op::Read),
        Just(Op::Write),
        Just(Op::Flush),
        Just(Op::Trim),
        Just(Op::WriteZeroes)
    ];
    let request = (
        op,
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        0u16..4,
        any::<Option<(u64, u32)>>(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(op, id, floor, offset, length, flags, remote, data)| {
            let remote = remote.map(|(addr, rkey)| RemoteBuf { addr, rkey });
            let payload = if op == Op::Write && remote.is_none() {
                Bytes::from(data)
            } else {
                Bytes::new()
            };
            Message::Request(Request {
                op,
                id,
                floor,
                offset,
                length,
                flags,
                remote,
                payload,
            })
        });
    let reply = (
        any::<u64>(),
        0u32..12,
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(id, status, exec_seq, data)| {
            Message::Reply(Reply {
                id,
                status: Status::from_code(status),
                exec_seq,
                payload: Bytes::from(data),
            })
        });
    let hello = (
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<(u64, u64)>(),
        name(),
        name(),
    )
        .prop_map(
            |(
                version_min,
                version_max,
                features,
                session_id,
                client_nonce,
                (owner, epoch),
                key_id,
                export,
            )| {
                Message::Hello(Hello {
                    version_min,
                    version_max,
                    features,
                    session_id,
                    client_nonce,
                    owner,
                    epoch,
                    key_id,
                    export,
                })
            },
        );
    let challenge = (
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(version, features, boot_id, server_nonce, server_proof)| {
            Message::Challenge(Challenge {
                version,
                features,
                boot_id,
                server_nonce,
                server_proof,
            })
        });
    let welcome = any::<(u64, u64, u64, u32, u32, u32, u32, u32, u32)>().prop_map(|t| {
        Message::Welcome(Welcome {
            session_id: t.0,
            boot_id: t.1,
            export_size: t.2,
            block_size: t.3,
            max_payload: t.4,
            max_inflight: t.5,
            id_window: t.6,
            export_flags: t.7,
            flags: t.8,
        })
    });
    let reject = (0u32..10, name()).prop_map(|(code, message)| {
        Message::Reject(Reject {
            code: RejectCode::from_code(code),
            message,
        })
    });
    prop_oneof![
        request,
        reply,
        hello,
        challenge,
        welcome,
        reject,
        any::<[u8; 32]>().prop_map(|client_proof| Message::Auth(Auth { client_proof })),
        any::<u64>().prop_map(|token| Message::Ping { token }),
        any::<u64>().prop_map(|token| Message::Pong { token }),
        Just(Message::Goodbye),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in any_message()) {
        let bytes = encode(&msg).to_bytes();
        prop_assert_eq!(decode(bytes).unwrap(), msg);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode(Bytes::from(bytes.clone()));
        let mut reader = FrameReader::new(1 << 20);
        reader.extend(&bytes);
        while let Ok(Some(frame)) = reader.next_frame() {
            let _ = decode(frame);
        }
    }

    #[test]
    fn valid_prefixes_with_garbage_bodies_never_panic(
        kind in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..100), payload in prop::collection::vec(any::<u8>(), 0..50)
    ) {
        // Build frames whose checksums are right but whose bodies are
        // arbitrary, so decoding gets past the checksum into the parsers.
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.push(VERSION);
        head.push(kind);
        head.extend_from_slice(&(body.len() as u16).to_le_bytes());
        head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        head.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &body);
        head.extend_from_slice(&crc.to_le_bytes());
        head.extend_from_slice(&body);
        head.extend_from_slice(&payload);
        let _ = decode(Bytes::from(head));
    }

    #[test]
    fn stream_reader_reassembles_any_split(
        msgs in prop::collection::vec(any_message(), 1..8), cuts in prop::collection::vec(1usize..64, 1..40)
    ) {
        let stream: Vec<u8> = msgs.iter().flat_map(|m| encode(m).to_bytes().to_vec()).collect();
        let mut got = Vec::new();
        let reader = read_in_cuts(&stream, &cuts, |frame| {
            got.push(decode(frame.into_bytes()).unwrap())
        });
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(reader.pending(), 0);
    }

    /// The payload checksum the reader takes piece by piece, whatever the
    /// pieces, gives the verdict decoding the whole frame gives, on sound
    /// payloads and on damaged ones.
    #[test]
    fn a_checksum_taken_as_bytes_arrive_agrees_with_decoding(
        msgs in prop::collection::vec(any_message(), 1..8),
        cuts in prop::collection::vec(1usize..700, 1..40),
        flip in any::<Option<(prop::sample::Index, u8)>>(),
    ) {
        let mut stream = Vec::new();
        let mut payloads = Vec::new();
        for m in &msgs {
            let frame = encode(m);
            let start = stream.len() + frame.head().len();
            stream.extend_from_slice(&frame.to_bytes());
            payloads.extend(start..stream.len());
        }
        if let (Some((at, bit)), false) = (flip, payloads.is_empty()) {
            stream[payloads[at.index(payloads.len())]] ^= 1 << (bit % 8);
        }
        let (mut checked, mut whole) = (Vec::new(), Vec::new());
        read_in_cuts(&stream, &cuts, |frame| {
            whole.push(decode(frame.clone().into_bytes()));
            checked.push(decode_in(frame));
        });
        prop_assert_eq!(checked.len(), msgs.len());
        prop_assert_eq!(checked, whole);
    }
}

/// Feeds `stream` to a frame reader in pieces of the sizes in `cuts`
/// (repeated as needed), handing `each` every frame as soon as it is whole.
fn read_in_cuts(stream: &[u8], cuts: &[usize], mut each: impl FnMut(InFrame)) -> FrameReader {
    let mut reader = FrameReader::new(1 << 20);
    let mut at = 0;
    let mut cut = cuts.iter().cycle();
    while at < stream.len() {
        let n = (*cut.next().unwrap()).min(stream.len() - at);
        reader.extend(&stream[at..at + n]);
        at += n;
        while let Some(frame) = reader.next_checked_frame().unwrap() {
            each(frame);
        }
    }
    reader
}

#[test]
fn stream_reader_rejects_a_corrupt_length_before_waiting_for_it() {
    let msg = vector_messages()
        .into_iter()
        .find(|(n, _)| *n == "read")
        .unwrap()
        .1;
    let mut bytes = encode(&msg).to_bytes().to_vec();
    bytes[9] ^= 0x10; // payload_len grows by 1 MiB
    let mut reader = FrameReader::new(32 << 20);
    reader.extend(&bytes);
    assert_eq!(reader.next_frame(), Err(DecodeError::HeaderChecksum));
}

#[test]
fn oversized_payloads_are_refused() {
    let big = Message::Reply(Reply {
        id: 1,
        status: Status::Ok,
        exec_seq: 0,
        payload: Bytes::from(vec![0; 4096]),
    });
    let mut reader = FrameReader::new(1024);
    reader.extend(&encode(&big).to_bytes());
    assert_eq!(reader.next_frame(), Err(DecodeError::BadLength));
}

#[test]
fn the_reader_says_how_much_of_a_frame_is_still_to_come() {
    let reply = |fill: u8| {
        encode(&Message::Reply(Reply {
            id: 7,
            status: Status::Ok,
            exec_seq: 0,
            payload: Bytes::from(vec![fill; 300_000]),
        }))
        .to_bytes()
    };
    let (first, second) = (reply(1), reply(2));
    let mut reader = FrameReader::new(1 << 20);
    assert_eq!(reader.awaited(), 0, "nothing parsed yet");
    reader.extend(&first[..10]);
    assert_eq!(reader.next_frame(), Ok(None));
    assert_eq!(reader.awaited(), 0, "the head is not in yet");
    reader.extend(&first[10..100_000]);
    assert_eq!(reader.next_frame(), Ok(None));
    assert_eq!(reader.awaited(), first.len() - 100_000);
    // The rest of the first and the start of the second.
    reader.extend(&first[100_000..]);
    reader.extend(&second[..second.len() - 5]);
    assert!(reader.next_frame().unwrap().is_some());
    assert_eq!(reader.next_frame(), Ok(None));
    assert_eq!(reader.awaited(), 5);
    reader.extend(&second[second.len() - 5..]);
    assert!(reader.next_frame().unwrap().is_some());
    assert_eq!(reader.awaited(), 0, "whole frames leave nothing awaited");
}
