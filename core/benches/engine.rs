//! Engine and codec CPU cost per 4 KiB IO (`cargo xtask bench`).
//!
//! The engine round trip runs one IO through client submit, the request
//! frame, server admission and backend dispatch, the reply frame and the
//! client completion, with the backend answering at once. It measures the
//! protocol's CPU cost, not IO: the only data copies are the checksum passes
//! and the one concatenation a transport would do when reading a frame.
//!
//! The volume round trip runs one IO through a 2-way mirror's engine alone
//! (the legs answer at once): what a mirror adds on top of each leg's own
//! client engine.

use braid_core::auth::Key;
use braid_core::client::{ChannelId, ClientAction, ClientConfig, ClientEngine, IoRequest};
use braid_core::server::{BackendOp, ExportConfig, ServerAction, ServerConfig, ServerEngine};
use braid_core::volume::{
    LegInfo, VolumeAction, VolumeConfig, VolumeEngine, VolumeMap, VolumeSpec,
};
use braid_core::wire::{decode, encode, Message, Op, Request};
use braid_core::Instant;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

const BLOCK: usize = 4096;

fn codec(c: &mut Criterion) {
    let req = Message::Request(Request {
        op: Op::Write,
        id: 1,
        floor: 1,
        offset: 4096,
        length: BLOCK as u32,
        flags: 0,
        remote: None,
        payload: Bytes::from(vec![7u8; BLOCK]),
    });
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode write 4k", |b| {
        b.iter(|| black_box(encode(black_box(&req))))
    });
    let bytes = encode(&req).to_bytes();
    g.bench_function("decode write 4k", |b| {
        b.iter(|| black_box(decode(black_box(bytes.clone())).unwrap()))
    });
    let read = Message::Request(Request {
        op: Op::Read,
        payload: Bytes::new(),
        ..match &req {
            Message::Request(r) => r.clone(),
            _ => unreachable!(),
        }
    });
    g.bench_function("encode+decode read header", |b| {
        b.iter(|| black_box(decode(encode(black_box(&read)).to_bytes()).unwrap()))
    });
    g.finish();

    // A payload's CRC is most of a large frame's cost (the socket copies
    // are the kernel's): measured per byte.
    let large = 1 << 20;
    let req = Message::Request(Request {
        op: Op::Write,
        length: large as u32,
        payload: Bytes::from((0..large).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>()),
        ..match &req {
            Message::Request(r) => r.clone(),
            _ => unreachable!(),
        }
    });
    let mut g = c.benchmark_group("codec 1 MiB");
    g.throughput(Throughput::Bytes(large as u64));
    g.bench_function("encode write 1M", |b| {
        b.iter(|| black_box(encode(black_box(&req))))
    });
    let bytes = encode(&req).to_bytes();
    g.bench_function("decode write 1M", |b| {
        b.iter(|| black_box(decode(black_box(bytes.clone())).unwrap()))
    });
    g.finish();
}

struct Connected {
    client: ClientEngine,
    server: ServerEngine,
    now: Instant,
    /// The one channel, looked up once so the measured loop does not.
    ch: ChannelId,
}

/// A client and server with one channel, handshake done.
fn connected() -> Connected {
    let key = Key::new(*b"bench key");
    let mut cc = ClientConfig::new("disk0", "bench", key.clone(), [1; 32]);
    cc.channels = 1;
    let sc = ServerConfig::new(
        1,
        [2; 32],
        vec![("bench".into(), key)],
        vec![ExportConfig::new("disk0", 1 << 30)],
    );
    let mut p = Connected {
        client: ClientEngine::new(cc).expect("a valid config"),
        server: ServerEngine::new(sc).expect("a valid config"),
        now: Instant::ZERO,
        ch: ChannelId { slot: 0, gen: 0 },
    };
    p.client.handle_timeout(p.now);
    for _ in 0..10 {
        while let Some(a) = p.client.poll_action() {
            match a {
                ClientAction::Connect(ch) => {
                    p.ch = ch;
                    p.server.connection_opened(1, p.now);
                    p.client.channel_connected(ch, p.now);
                }
                ClientAction::Send(_, f) => p.server.handle_frame(1, f.to_bytes(), p.now),
                _ => {}
            }
        }
        while let Some(a) = p.server.poll_action() {
            if let ServerAction::Send { frame, .. } = a {
                p.client.handle_frame(p.ch, frame.to_bytes(), p.now);
            }
        }
    }
    assert_eq!(p.client.ready_channels(), 1);
    p
}

/// Runs both engines, the backend answering at once, until `count` IOs
/// have completed.
fn drive(p: &mut Connected, count: usize, read_data: &Bytes) {
    let mut left = count;
    while left > 0 {
        while let Some(a) = p.client.poll_action() {
            match a {
                ClientAction::Send(_, f) => p.server.handle_frame(1, f.to_bytes(), p.now),
                ClientAction::Complete(c) => {
                    black_box(c);
                    left -= 1;
                }
                _ => {}
            }
        }
        while let Some(a) = p.server.poll_action() {
            match a {
                ServerAction::Send { frame, .. } => {
                    p.client.handle_frame(p.ch, frame.to_bytes(), p.now)
                }
                ServerAction::Backend(req) => {
                    let data = if matches!(req.op, BackendOp::Read { .. }) {
                        read_data.clone()
                    } else {
                        Bytes::new()
                    };
                    p.server.backend_complete(req.token, Ok(data), p.now);
                }
                _ => {}
            }
        }
    }
}

/// One IO all the way through both engines.
fn round_trip(p: &mut Connected, user: u64, io: IoRequest, read_data: &Bytes) {
    p.client.submit(user, io, p.now).unwrap();
    drive(p, 1, read_data);
}

fn engines(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine round trip");
    g.throughput(Throughput::Elements(1));
    let data = Bytes::from(vec![9u8; BLOCK]);
    let mut p = connected();
    let mut user = 0;
    g.bench_function("read 4k", |b| {
        b.iter(|| {
            user += 1;
            round_trip(
                &mut p,
                user,
                IoRequest::read((user % 1000) * 4096, BLOCK as u32),
                &data,
            )
        })
    });
    // Writes fill the dirty window, whose internal FLUSH is part of the cost.
    g.bench_function("write 4k", |b| {
        b.iter(|| {
            user += 1;
            round_trip(
                &mut p,
                user,
                IoRequest::write((user % 1000) * 4096, data.clone(), false),
                &data,
            )
        })
    });
    g.bench_function("write 4k fua", |b| {
        b.iter(|| {
            user += 1;
            round_trip(
                &mut p,
                user,
                IoRequest::write((user % 1000) * 4096, data.clone(), true),
                &data,
            )
        })
    });
    g.finish();

    // Many IOs in flight at once: the journal and the server's result cache
    // hold 128 entries while the batch completes.
    batch_of_128(c, "reads", &mut p, &mut user, &data, |at| {
        IoRequest::read(at, BLOCK as u32)
    });
    // Each write in a deep queue asks whether an earlier unanswered write
    // overlaps it: the cost of that question as the queue grows.
    batch_of_128(c, "writes", &mut p, &mut user, &data, |at| {
        IoRequest::write(at, data.clone(), false)
    });
}

/// 128 IOs made by `io` (given an offset) submitted at once, then driven
/// until all have completed.
fn batch_of_128(
    c: &mut Criterion,
    what: &str,
    p: &mut Connected,
    user: &mut u64,
    data: &Bytes,
    io: impl Fn(u64) -> IoRequest,
) {
    let mut g = c.benchmark_group(format!("engine batch of 128 {what}"));
    g.throughput(Throughput::Elements(128));
    g.bench_function(format!("qd128 {} 4k", what.trim_end_matches('s')), |b| {
        b.iter_batched(
            || (),
            |_| {
                for _ in 0..128 {
                    *user += 1;
                    let request = io((*user % 1000) * 4096);
                    p.client.submit(*user, request, p.now).unwrap();
                }
                drive(p, 128, data);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A 2-way mirror over two 1 GiB legs, both in sync.
fn mirror() -> VolumeEngine {
    let spec = VolumeSpec::Mirror {
        quorum: None,
        legs: vec![
            VolumeSpec::Export("a".into()),
            VolumeSpec::Export("b".into()),
        ],
    };
    let map = VolumeMap::new(&spec, |_| {
        Some(LegInfo {
            size: 1 << 30,
            block_size: 512,
            read_only: false,
        })
    })
    .unwrap();
    VolumeEngine::new(map, VolumeConfig::default(), None).unwrap()
}

/// Submits `io` and answers every leg IO at once (reads with `data`)
/// until the volume completes it.
fn volume_round_trip(v: &mut VolumeEngine, user: u64, io: IoRequest, data: &Bytes, now: Instant) {
    v.submit(user, io, now);
    loop {
        let mut answered = false;
        while let Some(action) = v.poll_action() {
            match action {
                VolumeAction::LegIo { token, io, .. } => {
                    let answer = if io.op == Op::Read {
                        data.slice(..io.len as usize)
                    } else {
                        Bytes::new()
                    };
                    v.leg_complete(token, Ok(answer), now);
                    answered = true;
                }
                VolumeAction::PersistLogs { generation } => {
                    v.logs_stable(generation, now);
                    answered = true;
                }
                VolumeAction::Complete { user: done, result } => {
                    assert_eq!(done, user);
                    black_box(result.unwrap());
                    return;
                }
                VolumeAction::StoreMap { .. } | VolumeAction::LegChanged { .. } => {}
            }
        }
        assert!(answered, "the volume stopped short of completing IO {user}");
    }
}

fn volume(c: &mut Criterion) {
    let mut g = c.benchmark_group("volume round trip, 2-way mirror");
    g.throughput(Throughput::Elements(1));
    let data = Bytes::from(vec![9u8; 1 << 20]);
    let block = data.slice(..BLOCK);
    let mut v = mirror();
    let now = Instant::ZERO;
    let mut user = 0;
    g.bench_function("read 4k", |b| {
        b.iter(|| {
            user += 1;
            let io = IoRequest::read((user % 1000) * 4096, BLOCK as u32);
            volume_round_trip(&mut v, user, io, &data, now)
        })
    });
    g.bench_function("write 4k", |b| {
        b.iter(|| {
            user += 1;
            let io = IoRequest::write((user % 1000) * 4096, block.clone(), false);
            volume_round_trip(&mut v, user, io, &data, now)
        })
    });
    g.bench_function("read 1M", |b| {
        b.iter(|| {
            user += 1;
            let io = IoRequest::read((user % 1000) << 20, 1 << 20);
            volume_round_trip(&mut v, user, io, &data, now)
        })
    });
    g.finish();
}

criterion_group!(benches, codec, engines, volume);
criterion_main!(benches);
