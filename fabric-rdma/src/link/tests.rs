//! Both ends of a channel wired together over simulated memory and a
//! simulated queue pair, with a toy server engine behind: what the engines
//! exchange must be exactly what a stream would have carried.

use super::*;
use braid_core::wire::{decode, encode, Message, Op, Reply, Request, Status};
use proptest::prelude::*;
use std::collections::BTreeMap;

const CLIENT_BASE: u64 = 0x10_0000;
const RKEY: u32 = 77;

/// One queue pair and the memory on both sides. Completions come back in
/// the order work was posted, as on a reliable connection.
struct Pair {
    client: ClientLink,
    client_arena: Arena,
    client_mem: Vec<u8>,
    /// The client's staging part, past the arena's: the frontend received
    /// these WRITEs' data there (keyed by the payload's address).
    staging: Arena,
    staging_base: u64,
    staged_live: HashMap<usize, Extent>,
    server: ServerLink,
    server_arena: Arena,
    server_mem: Vec<u8>,
    to_server: VecDeque<Vec<u8>>,
    to_client: VecDeque<Vec<u8>>,
    fetches: VecDeque<(u64, Extent, RemoteBuf)>,
    /// Frames as the server engine got them, and as the client engine did.
    server_got: Vec<Bytes>,
    client_got: Vec<Bytes>,
}

impl Pair {
    fn new(client_bytes: u64, server_bytes: u64) -> Pair {
        Pair::staged(client_bytes, 0, server_bytes)
    }

    /// A client region of `client_bytes` for the link's own buffers and
    /// `staging_bytes` after them for WRITE data received in place.
    fn staged(client_bytes: u64, staging_bytes: u64, server_bytes: u64) -> Pair {
        let mut p = Pair::unannounced(client_bytes, server_bytes);
        p.client.region.len += staging_bytes;
        p.client_mem
            .resize((client_bytes + staging_bytes) as usize, 0);
        p.staging = Arena::new(staging_bytes);
        // The client's window goes first, as the driver sends it.
        let mut out = Vec::new();
        p.client.retry(&mut p.client_arena, &mut out);
        p.run_client(out);
        assert_eq!(p.to_server.len(), 1);
        p.step(0);
        assert!(p.server_got.is_empty(), "the window is no engine's");
        p
    }

    fn unannounced(client_bytes: u64, server_bytes: u64) -> Pair {
        Pair {
            client: ClientLink::new(Region {
                base: CLIENT_BASE,
                len: client_bytes,
                rkey: RKEY,
            }),
            client_arena: Arena::with_head_room(client_bytes, 4096),
            client_mem: vec![0; client_bytes as usize],
            staging: Arena::new(0),
            staging_base: client_bytes,
            staged_live: HashMap::new(),
            server: ServerLink::new(),
            server_arena: Arena::with_head_room(server_bytes, 4096),
            server_mem: vec![0; server_bytes as usize],
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            fetches: VecDeque::new(),
            server_got: Vec::new(),
            client_got: Vec::new(),
        }
    }

    fn client_send(&mut self, frame: OutFrame) {
        let mut out = Vec::new();
        self.client.send(frame, &mut self.client_arena, &mut out);
        self.run_client(out);
    }

    /// Sends a WRITE as a frontend that received its data into staging
    /// would; with no room there, as any other frame.
    fn client_send_staged(&mut self, frame: OutFrame) {
        let Some(extent) = self.staging.alloc(frame.payload.len() as u32) else {
            return self.client_send(frame);
        };
        let at = self.staging_base + extent.offset;
        fill(
            &mut self.client_mem,
            Extent {
                offset: at,
                len: extent.len,
            },
            &frame.payload,
        );
        self.staged_live
            .insert(frame.payload.as_ptr() as usize, extent);
        let mut out = Vec::new();
        self.client
            .send_staged(frame, Some(at), &mut self.client_arena, &mut out);
        self.run_client(out);
    }

    /// The link let go of a staged payload: as if it held the last
    /// reference, the memory is reused at once (scribbled over, so a
    /// fetch that still came would carry the wrong data).
    fn release_staged(&mut self, payload: &Bytes) {
        let extent = self
            .staged_live
            .remove(&(payload.as_ptr() as usize))
            .expect("released a payload that was never staged, or twice");
        let at = (self.staging_base + extent.offset) as usize;
        self.client_mem[at..at + extent.len as usize].fill(0xee);
        self.staging.free(extent);
    }

    fn server_send(&mut self, frame: OutFrame) {
        let mut out = Vec::new();
        self.server
            .send(frame, &mut self.server_arena, &mut out)
            .unwrap();
        self.run_server(out);
    }

    fn run_client(&mut self, out: Vec<Work>) {
        for w in out {
            match w {
                Work::Fill { extent, data } => fill(&mut self.client_mem, extent, &data),
                Work::Send(m) => self.to_server.push_back(m),
                Work::Deliver {
                    head,
                    payload,
                    owned,
                } => {
                    self.client_got.push(frame(&self.client_mem, head, payload));
                    // As if the engine dropped the frame at once.
                    if let (Some((e, _)), true) = (payload, owned) {
                        self.client_arena.free(e);
                    }
                }
                Work::Free(e) => self.client_arena.free(e),
                Work::Release(payload) => self.release_staged(&payload),
                other => panic!("client asked for {other:?}"),
            }
        }
    }

    fn run_server(&mut self, out: Vec<Work>) {
        for w in out {
            match w {
                Work::Fill { extent, data } => fill(&mut self.server_mem, extent, &data),
                Work::Send(m) => self.to_client.push_back(m),
                Work::Fetch {
                    token,
                    extent,
                    remote,
                } => self.fetches.push_back((token, extent, remote)),
                Work::Place {
                    extent,
                    remote,
                    held,
                } => {
                    assert_eq!(remote.rkey, RKEY);
                    let from = extent.offset as usize;
                    let to = (remote.addr - CLIENT_BASE) as usize;
                    let n = extent.len as usize;
                    let data = match &held {
                        // Staged: the frame's payload is that memory.
                        Some(payload) => payload.to_vec(),
                        None => self.server_mem[from..from + n].to_vec(),
                    };
                    assert_eq!(data.len(), n);
                    self.client_mem[to..to + n].copy_from_slice(&data);
                    if held.is_none() {
                        self.server_arena.free(extent);
                    }
                }
                Work::Deliver {
                    head,
                    payload,
                    owned,
                } => {
                    self.server_got.push(frame(&self.server_mem, head, payload));
                    if let Some((e, _)) = payload {
                        assert!(owned, "the server hands fetched data on");
                        self.server_arena.free(e);
                    }
                }
                Work::Free(e) => self.server_arena.free(e),
                Work::Release(_) => panic!("the server link releases nothing"),
            }
        }
    }

    /// One step of the fabric: `which` picks among what can happen.
    fn step(&mut self, which: usize) -> bool {
        let mut ready = Vec::new();
        if !self.to_server.is_empty() {
            ready.push(0);
        }
        if !self.to_client.is_empty() {
            ready.push(1);
        }
        if !self.fetches.is_empty() {
            ready.push(2);
        }
        if ready.is_empty() {
            return false;
        }
        let mut out = Vec::new();
        match ready[which % ready.len()] {
            0 => {
                let m = self.to_server.pop_front().unwrap();
                self.server
                    .received(&m, &mut self.server_arena, &mut out)
                    .unwrap();
                self.run_server(out);
            }
            1 => {
                let m = self.to_client.pop_front().unwrap();
                self.client.received(&m, &mut out).unwrap();
                self.run_client(out);
                // Memory came back: what waited may go.
                let mut out = Vec::new();
                self.client.retry(&mut self.client_arena, &mut out);
                self.run_client(out);
            }
            _ => {
                let (token, extent, remote) = self.fetches.pop_front().unwrap();
                assert_eq!(remote.rkey, RKEY);
                let from = (remote.addr - CLIENT_BASE) as usize;
                let to = extent.offset as usize;
                let n = extent.len as usize;
                if from as u64 >= self.staging_base {
                    let base = self.staging_base as usize;
                    assert!(
                        self.staged_live.values().any(|e| {
                            let at = base + e.offset as usize;
                            at <= from && from + n <= at + e.len as usize
                        }),
                        "a fetch from staged memory the link had let go"
                    );
                }
                let data = self.client_mem[from..from + n].to_vec();
                self.server_mem[to..to + n].copy_from_slice(&data);
                self.server.fetched(token, &mut self.server_arena, &mut out);
                self.run_server(out);
            }
        }
        // As the driver does after every completion: memory freed by one
        // piece of work may let waiting ones go.
        let mut out = Vec::new();
        self.server.progress(&mut self.server_arena, &mut out);
        self.run_server(out);
        true
    }
}

/// What a Fill does to one side's memory.
fn fill(mem: &mut [u8], extent: Extent, data: &[u8]) {
    let at = extent.offset as usize;
    mem[at..at + data.len()].copy_from_slice(data);
}

/// The frame a Deliver hands the engine, read out of one side's memory.
fn frame(mem: &[u8], head: Vec<u8>, payload: Option<(Extent, u32)>) -> Bytes {
    let mut frame = head;
    if let Some((e, n)) = payload {
        let at = e.offset as usize;
        frame.extend_from_slice(&mem[at..at + n as usize]);
    }
    Bytes::from(frame)
}

fn request(op: Op, id: u64, offset: u64, length: u32, payload: Vec<u8>) -> OutFrame {
    encode(&Message::Request(Request {
        op,
        id,
        floor: 0,
        offset,
        length,
        flags: 0,
        remote: None,
        payload: Bytes::from(payload),
    }))
}

fn write(id: u64, offset: u64, data: Vec<u8>) -> OutFrame {
    request(Op::Write, id, offset, data.len() as u32, data)
}

fn read(id: u64, offset: u64, length: u32) -> OutFrame {
    request(Op::Read, id, offset, length, Vec::new())
}

fn trim(id: u64, offset: u64, length: u32) -> OutFrame {
    request(Op::Trim, id, offset, length, Vec::new())
}

fn reply(id: u64, data: Vec<u8>) -> OutFrame {
    encode(&Message::Reply(Reply {
        id,
        status: Status::Ok,
        exec_seq: 0,
        payload: Bytes::from(data),
    }))
}

#[test]
fn a_write_and_a_read_cost_two_messages_each_and_carry_their_data() {
    let mut p = Pair::new(1 << 20, 1 << 20);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    p.client_send(write(1, 4096, data.clone()));
    p.client_send(read(2, 0, 8192));
    assert_eq!(
        p.to_server.len(),
        2,
        "one message per request, data stays put"
    );
    while p.step(0) {}
    assert_eq!(p.server_got.len(), 2);
    let Message::Request(w) = decode(p.server_got[0].clone()).unwrap() else {
        panic!()
    };
    assert_eq!(
        (w.op, w.remote, &w.payload[..]),
        (Op::Write, None, &data[..])
    );
    let Message::Request(r) = decode(p.server_got[1].clone()).unwrap() else {
        panic!()
    };
    assert_eq!((r.op, r.remote, r.length), (Op::Read, None, 8192));
    p.server_send(reply(1, vec![]));
    p.server_send(reply(2, data.clone()));
    assert_eq!(p.to_client.len(), 2, "one message per reply");
    while p.step(0) {}
    let Message::Reply(got) = decode(p.client_got[1].clone()).unwrap() else {
        panic!()
    };
    assert_eq!((got.id, &got.payload[..]), (2, &data[..]));
    assert_eq!((p.client_arena.in_use(), p.server_arena.in_use()), (0, 0));
}

/// One-sided data carries no checksum of its own on the way: the CRC the
/// request carries is what catches a damaged fetch (PROTOCOL.md §9.2), and
/// the engine answers CORRUPT.
#[test]
fn a_write_damaged_between_the_memories_fails_its_crc_at_the_server() {
    let mut p = Pair::new(1 << 20, 1 << 20);
    p.client_send(write(1, 0, vec![0x42; 4096]));
    p.step(0);
    assert_eq!(p.fetches.len(), 1);
    let (_, _, remote) = p.fetches[0];
    p.client_mem[(remote.addr - CLIENT_BASE) as usize + 100] ^= 0x10;
    p.step(0);
    assert!(
        matches!(
            decode(p.server_got[0].clone()),
            Err(braid_core::wire::DecodeError::PayloadChecksum {
                kind: braid_core::wire::Kind::Write,
                id: 1
            })
        ),
        "{:?}",
        decode(p.server_got[0].clone())
    );
}

#[test]
fn nothing_overtakes_a_write_still_being_fetched() {
    let mut p = Pair::new(1 << 20, 1 << 20);
    p.client_send(write(1, 0, vec![1; 4096]));
    p.client_send(trim(2, 0, 4096));
    p.step(0);
    p.step(0);
    assert!(p.server_got.is_empty(), "the TRIM waits behind the WRITE");
    p.step(0); // the fetch
    let ops: Vec<Op> = p
        .server_got
        .iter()
        .map(|f| match decode(f.clone()).unwrap() {
            Message::Request(r) => r.op,
            m => panic!("{m:?}"),
        })
        .collect();
    assert_eq!(ops, [Op::Write, Op::Trim]);
}

#[test]
fn a_request_that_waits_for_memory_holds_back_the_ones_after_it() {
    // Room for the first WRITE (and its head room) only.
    let mut p = Pair::new(8192 + 4096, 1 << 20);
    p.client_send(write(1, 0, vec![1; 8192]));
    p.client_send(write(2, 0, vec![2; 4096]));
    p.client_send(trim(3, 0, 4096));
    assert_eq!((p.to_server.len(), p.client.waiting()), (1, 2));
    while p.step(0) {}
    p.server_send(reply(1, vec![]));
    while p.step(1) {}
    assert_eq!(p.client.waiting(), 0, "freed memory let both go, in order");
    while p.step(0) {}
    assert_eq!(p.server_got.len(), 3);
}

#[test]
fn a_request_sent_twice_on_one_channel_names_one_buffer_until_both_are_answered() {
    let mut p = Pair::new(1 << 20, 1 << 20);
    p.client_send(read(5, 0, 4096));
    p.client_send(read(5, 0, 4096));
    let named: Vec<_> = p
        .to_server
        .iter()
        .map(|m| match onesided::inspect(m).unwrap() {
            Carried::Remote { remote, .. } => remote,
            c => panic!("{c:?}"),
        })
        .collect();
    assert_eq!(named[0], named[1]);
    while p.step(0) {}
    p.server_send(reply(5, vec![9; 4096]));
    while p.step(0) {}
    assert!(
        p.client_arena.in_use() > 0,
        "the second copy may still be answered"
    );
    p.server_send(reply(5, vec![9; 4096]));
    while p.step(0) {}
    assert_eq!(p.client_arena.in_use(), 0);
    assert_eq!(p.client_got.len(), 2);
}

#[test]
fn a_reply_claiming_data_in_a_buffer_never_named_closes_the_channel() {
    let mut p = Pair::new(1 << 20, 1 << 20);
    let bogus = reply(9, vec![1; 4096]);
    let mut out = Vec::new();
    let err = p.client.received(bogus.head(), &mut out).unwrap_err();
    assert!(err.0.contains("no buffer"), "{err}");
    // And the server refuses to place data for a read nobody named.
    let err = p
        .server
        .send(reply(9, vec![1; 4096]), &mut p.server_arena, &mut out)
        .unwrap_err();
    assert!(err.0.contains("no client buffer"), "{err}");
}

#[test]
fn a_request_naming_memory_outside_the_window_fails_alone() {
    let mut p = Pair::new(1 << 20, 1 << 20);
    p.client = ClientLink::forging(Region {
        base: CLIENT_BASE,
        len: 1 << 20,
        rkey: RKEY,
    });
    let mut out = Vec::new();
    p.client.retry(&mut p.client_arena, &mut out);
    assert!(matches!(&out[..], [Work::Send(_)]), "{out:?}");
    // The forging link's window is this channel's second: refused.
    let err = p
        .server
        .received(
            &match &out[0] {
                Work::Send(m) => m.clone(),
                _ => unreachable!(),
            },
            &mut p.server_arena,
            &mut Vec::new(),
        )
        .unwrap_err();
    assert!(err.0.contains("second window"), "{err}");
    // Honest and forged buffers alternate, on writes and reads alike.
    for id in 1..=4 {
        if id % 2 == 1 {
            p.client_send(write(id, 0, vec![id as u8; 4096]));
        } else {
            p.client_send(read(id, 0, 4096));
        }
    }
    while p.step(0) {}
    let reached: Vec<u64> = p
        .server_got
        .iter()
        .map(|f| match decode(f.clone()).unwrap() {
            Message::Request(r) => r.id,
            m => panic!("{m:?}"),
        })
        .collect();
    assert_eq!(reached, [1, 3], "forged requests never reach the engine");
    assert_eq!(p.server.refused(), 2);
    p.server_send(reply(1, vec![]));
    p.server_send(reply(3, vec![]));
    while p.step(0) {}
    let mut answers: Vec<(u64, Status)> = p
        .client_got
        .iter()
        .map(|f| match decode(f.clone()).unwrap() {
            Message::Reply(r) => (r.id, r.status),
            m => panic!("{m:?}"),
        })
        .collect();
    answers.sort_by_key(|a| a.0);
    assert_eq!(
        answers,
        [
            (1, Status::Ok),
            (2, Status::Invalid),
            (3, Status::Ok),
            (4, Status::Invalid)
        ]
    );
    assert_eq!((p.client_arena.in_use(), p.server_arena.in_use()), (0, 0));
}

#[test]
fn a_forged_copy_of_a_read_leaves_the_honest_copy_its_answer() {
    let mut p = Pair::new(1 << 20, 1 << 20);
    p.client_send(read(7, 0, 4096));
    while p.step(0) {}
    assert_eq!(p.server_got.len(), 1);
    let forged = onesided::attach_remote(
        read(7, 0, 4096).head(),
        RemoteBuf {
            addr: CLIENT_BASE + (2 << 20),
            rkey: RKEY,
        },
    )
    .unwrap();
    let mut out = Vec::new();
    p.server
        .received(&forged, &mut p.server_arena, &mut out)
        .unwrap();
    assert_eq!(p.server.refused(), 1);
    // The engine's answer to the honest copy still finds its buffer.
    p.server_send(reply(7, vec![3; 4096]));
    assert!(p.to_client.len() == 1);
}

#[test]
fn without_a_window_every_one_sided_request_is_refused() {
    let mut p = Pair::unannounced(1 << 20, 1 << 20);
    p.client.announced = true;
    p.client_send(write(1, 0, vec![1; 4096]));
    while p.step(0) {}
    assert!(p.server_got.is_empty());
    assert_eq!(p.server.refused(), 1);
}

#[test]
fn data_the_backend_read_into_registered_memory_is_placed_from_there() {
    let mut p = Pair::new(1 << 20, 1 << 20);
    p.client_send(read(4, 0, 8192));
    while p.step(0) {}
    let data = Bytes::from(vec![0x5a; 8192]);
    let mut out = Vec::new();
    p.server
        .send_staged(
            encode(&Message::Reply(Reply {
                id: 4,
                status: Status::Ok,
                exec_seq: 0,
                payload: data.clone(),
            })),
            Some(3 * 4096),
            &mut p.server_arena,
            &mut out,
        )
        .unwrap();
    assert!(
        matches!(
            &out[..],
            [Work::Place { extent, held: Some(h), .. }, Work::Send(_)]
                if extent.offset == 3 * 4096 && extent.len == 8192 && *h == data
        ),
        "no fill, no memory of the link's own: {out:?}"
    );
    assert_eq!(p.server_arena.in_use(), 0);
    p.run_server(out);
    while p.step(0) {}
    let Message::Reply(got) = decode(p.client_got[0].clone()).unwrap() else {
        panic!()
    };
    assert_eq!(got.payload, data);
}

#[test]
fn closing_hands_back_the_replies_never_sent() {
    // No room for the reply's data: it waits, and closing returns it.
    let mut p = Pair::new(1 << 20, 4096);
    p.client_send(read(1, 0, 8192));
    while p.step(0) {}
    p.server_send(reply(1, vec![1; 8192]));
    assert_eq!(p.server.waiting(), 1);
    let unsent = p.server.close(&mut p.server_arena);
    assert_eq!(unsent.len(), 1);
}

#[test]
fn closing_returns_every_buffer() {
    let mut p = Pair::new(1 << 20, 1 << 20);
    p.client_send(write(1, 0, vec![1; 4096]));
    p.client_send(read(2, 0, 4096));
    p.step(0);
    assert!(p.client_arena.in_use() > 0 && p.server_arena.in_use() > 0);
    p.client.close(&mut p.client_arena);
    let unsent = p.server.close(&mut p.server_arena);
    assert!(unsent.is_empty());
    assert_eq!((p.client_arena.in_use(), p.server_arena.in_use()), (0, 0));
    p.client_arena.check().unwrap();
    p.server_arena.check().unwrap();
}

fn remote_of(message: &[u8]) -> RemoteBuf {
    match onesided::inspect(message).unwrap() {
        Carried::Remote { remote, .. } => remote,
        c => panic!("{c:?}"),
    }
}

#[test]
fn a_write_received_into_registered_memory_is_fetched_from_there() {
    let mut p = Pair::staged(1 << 20, 1 << 20, 1 << 20);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    let mut out = Vec::new();
    let frame = write(1, 0, data.clone());
    let payload = frame.payload.clone();
    p.staged_live
        .insert(payload.as_ptr() as usize, p.staging.alloc(8192).unwrap());
    let at = p.staging_base;
    p.client_mem[at as usize..at as usize + 8192].copy_from_slice(&data);
    p.client
        .send_staged(frame, Some(at), &mut p.client_arena, &mut out);
    assert!(
        matches!(&out[..], [Work::Send(m)] if remote_of(m).addr == CLIENT_BASE + at),
        "no fill, named where it lies: {out:?}"
    );
    assert_eq!(p.client_arena.in_use(), 0, "no memory of the link's own");
    assert_eq!(p.client.held(), 8192);
    assert_eq!(p.client.writes_named(), (1, 0));
    p.run_client(out);
    while p.step(0) {}
    let Message::Request(w) = decode(p.server_got[0].clone()).unwrap() else {
        panic!()
    };
    assert_eq!(&w.payload[..], &data[..]);
    assert_eq!(p.staged_live.len(), 1, "held until answered");
    p.server_send(reply(1, vec![]));
    while p.step(0) {}
    assert!(p.staged_live.is_empty(), "let go once answered");
    assert_eq!(p.client.held(), 0);
    // A copied write still counts as copied.
    p.client_send(write(2, 0, vec![1; 4096]));
    assert_eq!(p.client.writes_named(), (1, 1));
}

#[test]
fn a_staged_write_sent_twice_is_held_until_both_copies_are_answered() {
    let mut p = Pair::staged(1 << 20, 1 << 20, 1 << 20);
    let frame = write(3, 0, vec![4; 4096]);
    p.client_send_staged(frame.clone());
    // The engine resends the same frame (same payload) on this channel.
    let at = p.staging_base + p.staged_live[&(frame.payload.as_ptr() as usize)].offset;
    let mut out = Vec::new();
    p.client
        .send_staged(frame, Some(at), &mut p.client_arena, &mut out);
    p.run_client(out);
    let remotes: Vec<_> = p.to_server.iter().map(|m| remote_of(m)).collect();
    assert_eq!(remotes[0], remotes[1]);
    assert_eq!(p.client.writes_named(), (1, 0), "named once");
    while p.step(0) {}
    p.server_send(reply(3, vec![]));
    while p.step(0) {}
    assert_eq!(p.staged_live.len(), 1, "the second copy may still fetch");
    p.server_send(reply(3, vec![]));
    while p.step(0) {}
    assert!(p.staged_live.is_empty());
}

#[test]
fn a_reply_placing_data_in_a_writes_buffer_closes_the_channel() {
    let mut p = Pair::staged(1 << 20, 1 << 20, 1 << 20);
    p.client_send_staged(write(1, 0, vec![1; 4096]));
    while p.step(0) {}
    let mut out = Vec::new();
    let placed = reply(1, vec![0; 4096]);
    let err = p.client.received(placed.head(), &mut out).unwrap_err();
    assert!(err.0.contains("WRITE's buffer"), "{err}");
}

#[test]
fn a_staged_offset_past_the_region_is_copied_instead() {
    let mut p = Pair::staged(1 << 20, 4096, 1 << 20);
    let mut out = Vec::new();
    let at = p.staging_base;
    p.client.send_staged(
        write(1, 0, vec![1; 8192]),
        Some(at),
        &mut p.client_arena,
        &mut out,
    );
    assert!(
        matches!(&out[..], [Work::Fill { .. }, Work::Send(_)]),
        "{out:?}"
    );
    assert_eq!(p.client.writes_named(), (0, 1));
}

#[test]
fn closing_hands_back_staged_payloads_and_unsent_frames() {
    // Room in the arena for one read: the write behind it waits.
    let mut p = Pair::staged(8192, 1 << 20, 1 << 20);
    p.client_send_staged(write(1, 0, vec![1; 4096]));
    p.client_send(read(2, 0, 4096));
    p.client_send(read(3, 0, 4096));
    assert_eq!(p.client.waiting(), 1);
    let held = p.client.close(&mut p.client_arena);
    assert_eq!(held.len(), 2, "the staged payload and the waiting read's");
    assert_eq!(p.client_arena.in_use(), 0);
    p.client_arena.check().unwrap();
}

proptest! {
    /// Random writes and reads of random sizes through tight arenas, with
    /// the fabric's events in random order: the server engine sees the
    /// frames a stream would carry, in order, the client reads back what
    /// the toy disk holds, and all memory comes back.
    #[test]
    fn the_channel_is_as_transparent_as_a_stream(
        ops in proptest::collection::vec((any::<bool>(), 0u64..16, 1u32..5, any::<u8>()), 1..40),
        schedule in proptest::collection::vec(0usize..3, 0..400),
        staged in proptest::collection::vec(any::<bool>(), 40),
    ) {
        // Staging is tight too: some staged writes find no room there.
        let mut p = Pair::staged(16 * 4096, 8 * 4096, 12 * 4096);
        let mut disk: BTreeMap<u64, u8> = BTreeMap::new();
        let mut sent = Vec::new();
        for (i, (is_write, block, blocks, fill)) in ops.iter().enumerate() {
            let id = i as u64 + 1;
            let frame = if *is_write {
                write(id, block * 4096, vec![*fill; (*blocks * 4096) as usize])
            } else {
                read(id, block * 4096, blocks * 4096)
            };
            sent.push(frame.to_bytes());
            if *is_write && staged[i] {
                p.client_send_staged(frame);
            } else {
                p.client_send(frame);
            }
        }
        let mut schedule = schedule.into_iter();
        let mut served = 0;
        loop {
            // The toy engine answers what reached it, at once.
            while served < p.server_got.len() {
                let frame = p.server_got[served].clone();
                prop_assert_eq!(&frame, &sent[served], "the engine got what a stream carries");
                let Message::Request(r) = decode(frame).unwrap() else { panic!() };
                let blocks = r.length as u64 / 4096;
                let answer = if r.op == Op::Write {
                    for b in 0..blocks {
                        disk.insert(r.offset / 4096 + b, r.payload[0]);
                    }
                    vec![]
                } else {
                    let mut data = Vec::new();
                    for b in 0..blocks {
                        let v = disk.get(&(r.offset / 4096 + b)).copied().unwrap_or(0);
                        data.extend(std::iter::repeat_n(v, 4096));
                    }
                    data
                };
                served += 1;
                p.server_send(reply(r.id, answer));
            }
            if !p.step(schedule.next().unwrap_or(0)) {
                break;
            }
            p.client_arena.check().unwrap();
            p.server_arena.check().unwrap();
        }
        prop_assert_eq!(served, ops.len());
        prop_assert_eq!(p.client_got.len(), ops.len());
        // Requests reach the server in order and are answered at once, so
        // a read sees every write sent before it.
        let mut model: BTreeMap<u64, u8> = BTreeMap::new();
        let replies: HashMap<u64, Bytes> = p.client_got.iter().map(|f| match decode(f.clone()).unwrap() {
            Message::Reply(r) => (r.id, r.payload),
            m => panic!("{m:?}"),
        }).collect();
        for (i, (is_write, block, blocks, fill)) in ops.iter().enumerate() {
            if *is_write {
                for b in 0..*blocks as u64 {
                    model.insert(block + b, *fill);
                }
            } else {
                let got = &replies[&(i as u64 + 1)];
                for b in 0..*blocks as u64 {
                    let want = model.get(&(block + b)).copied().unwrap_or(0);
                    prop_assert_eq!(got[(b * 4096) as usize], want);
                }
            }
        }
        prop_assert_eq!(p.client_arena.in_use(), 0);
        prop_assert_eq!(p.server_arena.in_use(), 0);
        prop_assert!(p.staged_live.is_empty(), "every staged payload let go");
        prop_assert_eq!(p.staging.in_use(), 0);
    }
}

proptest! {
    /// The queue pair dies at a random point of random traffic: closing
    /// both ends gives back every extent either arena lent and every
    /// staged payload the client link held, whatever was in flight.
    #[test]
    fn a_channel_closed_at_any_point_gives_back_all_its_memory(
        ops in proptest::collection::vec((any::<bool>(), 0u64..16, 1u32..5, any::<bool>()), 1..30),
        schedule in proptest::collection::vec(0usize..3, 0..200),
    ) {
        let mut p = Pair::staged(16 * 4096, 8 * 4096, 12 * 4096);
        for (i, (is_write, block, blocks, staged)) in ops.iter().enumerate() {
            let id = i as u64 + 1;
            if *is_write {
                let frame = write(id, block * 4096, vec![id as u8; (*blocks * 4096) as usize]);
                if *staged {
                    p.client_send_staged(frame);
                } else {
                    p.client_send(frame);
                }
            } else {
                p.client_send(read(id, block * 4096, blocks * 4096));
            }
        }
        let mut served = 0;
        for which in schedule {
            while served < p.server_got.len() {
                let Message::Request(r) = decode(p.server_got[served].clone()).unwrap() else {
                    panic!()
                };
                served += 1;
                let data = if r.op == Op::Read { vec![0; r.length as usize] } else { vec![] };
                p.server_send(reply(r.id, data));
            }
            if !p.step(which) {
                break;
            }
        }
        // The queue pair is gone: nothing more moves.
        p.fetches.clear();
        p.to_server.clear();
        p.to_client.clear();
        for payload in p.client.close(&mut p.client_arena) {
            if p.staged_live.contains_key(&(payload.as_ptr() as usize)) {
                p.release_staged(&payload);
            }
        }
        drop(p.server.close(&mut p.server_arena));
        prop_assert_eq!(p.client_arena.in_use(), 0);
        prop_assert_eq!(p.server_arena.in_use(), 0);
        prop_assert!(p.staged_live.is_empty(), "a staged payload was never given back");
        prop_assert_eq!(p.staging.in_use(), 0);
        prop_assert_eq!(p.client.held(), 0);
        p.client_arena.check().unwrap();
        p.server_arena.check().unwrap();
    }
}
