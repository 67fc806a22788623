//! What one RDMA channel does with frames, without touching verbs: the
//! engines hand it and take from it stream-form frames; it turns them into
//! messages of head only plus one-sided moves of the payload, and back
//! (docs/PROTOCOL.md §9.2). The verbs driver executes the [`Work`] it asks
//! for, in order, and tells it what completed.
//!
//! A channel is as transparent as a stream: frames reach the engine in
//! the order they were sent, even when one must wait for registered memory
//! or for its data to be fetched.

use crate::arena::{Arena, Extent};
use braid_core::wire::onesided::{self, Carried, Window};
use braid_core::wire::{encode, Kind, Message, OutFrame, RemoteBuf, Reply, Status, PREFIX_LEN};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::fmt;

/// What the driver must do, in the order given.
#[derive(Debug, PartialEq, Eq)]
pub enum Work {
    /// Copy `data` into the region at `extent`.
    Fill {
        /// Where.
        extent: Extent,
        /// What.
        data: Bytes,
    },
    /// SEND this message.
    Send(Vec<u8>),
    /// RDMA-READ `extent.len` bytes of the peer's `remote` into `extent`,
    /// then call [`ServerLink::fetched`] with `token`.
    Fetch {
        /// Names the fetch in [`ServerLink::fetched`].
        token: u64,
        /// Local destination.
        extent: Extent,
        /// The peer's buffer.
        remote: RemoteBuf,
    },
    /// RDMA-WRITE `extent` into the peer's `remote`; once the write
    /// completes, free `extent`, or drop `held` if it owns the extent.
    Place {
        /// Local source.
        extent: Extent,
        /// The peer's buffer.
        remote: RemoteBuf,
        /// The frame payload whose memory `extent` is (data the backend
        /// read straight into registered memory), kept until the write
        /// completes; `None` if the link allocated `extent` itself.
        held: Option<Bytes>,
    },
    /// Give the engine the frame `head` followed by the bytes at `payload`.
    /// If `owned`, the frame takes the extent: the driver may put the head
    /// in the head room before it and hand the engine the registered
    /// memory itself, freeing the extent when the engine drops the frame.
    /// Otherwise the driver copies the payload out before the next call
    /// into the link, which frees the extent later.
    Deliver {
        /// Prefix and body, stream form.
        head: Vec<u8>,
        /// The payload: the first `.1` bytes of the extent `.0`.
        payload: Option<(Extent, u32)>,
        /// Whether the frame now owns the payload's extent.
        owned: bool,
    },
    /// Free this extent (its payload was copied out).
    Free(Extent),
    /// Drop this payload, which lay in registered memory the server may
    /// no longer touch (not while holding the arena: dropping it may free
    /// its memory).
    Release(Bytes),
}

/// The peer broke the rules of §9.2: the channel must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkError(pub String);

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LinkError {}

/// Where the client's region sits, as the server must name it.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Virtual address of the region's first byte.
    pub base: u64,
    /// Bytes registered from `base`.
    pub len: u64,
    /// Remote key the server uses to reach it.
    pub rkey: u32,
}

/// A client buffer named to the server, kept until every copy of the
/// request sent on this channel is answered (or the channel closes), so
/// no late one-sided move can touch memory reused for another request.
#[derive(Debug)]
struct Named {
    memory: Memory,
    sent: u32,
    /// Named outside the region (a forging test client): every copy
    /// names the same wrong address.
    forged: bool,
}

/// Where a named buffer's bytes are.
#[derive(Debug)]
enum Memory {
    /// An extent the link took from the arena (and, for a WRITE, filled).
    Allocated(Extent),
    /// A WRITE's payload that already sat in registered memory at
    /// `offset` (the frontend received it there): named in place, and
    /// kept alive until the server can no longer fetch it.
    Staged { offset: u64, payload: Bytes },
}

impl Memory {
    fn offset(&self) -> u64 {
        match self {
            Memory::Allocated(e) => e.offset,
            Memory::Staged { offset, .. } => *offset,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Memory::Allocated(e) => e.len as u64,
            Memory::Staged { payload, .. } => payload.len() as u64,
        }
    }

    /// What the driver must do once nothing can touch it any more.
    fn release(self) -> Work {
        match self {
            Memory::Allocated(e) => Work::Free(e),
            Memory::Staged { payload, .. } => Work::Release(payload),
        }
    }
}

/// The client end of one channel.
#[derive(Debug)]
pub struct ClientLink {
    region: Region,
    named: HashMap<u64, Named>,
    /// Frames waiting for registered memory, and every frame after them,
    /// each with where its payload already sits in the region, if it does.
    waiting: VecDeque<(OutFrame, Option<u64>)>,
    /// Whether the WINDOW message went out (the first call to `retry` or
    /// `send` sends it, ahead of every frame).
    announced: bool,
    /// A hostile client for tests: every second buffer it names lies
    /// past the end of its registration.
    forge: bool,
    named_so_far: u64,
    writes_in_place: u64,
    writes_copied: u64,
}

impl ClientLink {
    /// A link naming buffers in `region`.
    pub fn new(region: Region) -> ClientLink {
        ClientLink {
            region,
            named: HashMap::new(),
            waiting: VecDeque::new(),
            announced: false,
            forge: false,
            named_so_far: 0,
            writes_in_place: 0,
            writes_copied: 0,
        }
    }

    /// A link that names every second buffer outside `region`, as a
    /// forged REMOTE_BUF would: only those requests may fail.
    pub fn forging(region: Region) -> ClientLink {
        ClientLink {
            forge: true,
            ..ClientLink::new(region)
        }
    }

    /// Frames waiting for registered memory.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sends a stream-form frame from the engine.
    pub fn send(&mut self, frame: OutFrame, arena: &mut Arena, out: &mut Vec<Work>) {
        self.send_staged(frame, None, arena, out)
    }

    /// Sends a frame whose payload, if `staged_at` says so, already sits
    /// in the region at that offset (a WRITE the frontend received into
    /// registered memory): the server fetches it from there, with no copy.
    /// The payload must not be memory `arena` hands out: the link drops
    /// its hold on it while the caller may hold the arena.
    pub fn send_staged(
        &mut self,
        frame: OutFrame,
        staged_at: Option<u64>,
        arena: &mut Arena,
        out: &mut Vec<Work>,
    ) {
        let staged_at = staged_at.filter(|at| {
            !frame.payload.is_empty() && at + frame.payload.len() as u64 <= self.region.len
        });
        self.waiting.push_back((frame, staged_at));
        self.retry(arena, out);
    }

    /// WRITE payloads named where they sat, and those copied into
    /// registered memory first.
    pub fn writes_named(&self) -> (u64, u64) {
        (self.writes_in_place, self.writes_copied)
    }

    /// Sends what waited, in order, while memory lasts (call it when
    /// another channel freed some).
    pub fn retry(&mut self, arena: &mut Arena, out: &mut Vec<Work>) {
        if !self.announced {
            self.announced = true;
            let window = Window {
                base: self.region.base,
                len: self.region.len,
                rkey: self.region.rkey,
            };
            out.push(Work::Send(window.message()));
        }
        while let Some((frame, staged_at)) = self.waiting.front() {
            let head = frame.head();
            let kind = Kind::from_u8(head[5]);
            if !matches!(kind, Some(Kind::Read | Kind::Write)) {
                out.push(Work::Send(head.to_vec()));
                self.waiting.pop_front();
                continue;
            }
            let id = u64::from_le_bytes(head[PREFIX_LEN..PREFIX_LEN + 8].try_into().unwrap());
            let length =
                u32::from_le_bytes(head[PREFIX_LEN + 24..PREFIX_LEN + 28].try_into().unwrap());
            let (offset, forged) = match self.named.get_mut(&id) {
                // Sent again on this channel: the same buffer, so whichever
                // copy the server answers lands where we look.
                Some(named) => {
                    named.sent += 1;
                    (named.memory.offset(), named.forged)
                }
                None => {
                    let memory = match staged_at {
                        Some(offset) if kind == Some(Kind::Write) => Memory::Staged {
                            offset: *offset,
                            payload: frame.payload.clone(),
                        },
                        _ => match arena.alloc(length) {
                            Some(extent) => Memory::Allocated(extent),
                            None => return,
                        },
                    };
                    self.named_so_far += 1;
                    let forged = self.forge && self.named_so_far % 2 == 0;
                    let offset = memory.offset();
                    if !frame.payload.is_empty() {
                        match &memory {
                            Memory::Allocated(extent) => {
                                out.push(Work::Fill {
                                    extent: *extent,
                                    data: frame.payload.clone(),
                                });
                                self.writes_copied += 1;
                            }
                            Memory::Staged { .. } => self.writes_in_place += 1,
                        }
                    }
                    let named = Named {
                        memory,
                        sent: 1,
                        forged,
                    };
                    self.named.insert(id, named);
                    (offset, forged)
                }
            };
            let remote = RemoteBuf {
                addr: self.region.base + offset + if forged { self.region.len } else { 0 },
                rkey: self.region.rkey,
            };
            let message = onesided::attach_remote(head, remote)
                .expect("the engine sends stream-form requests");
            self.waiting.pop_front();
            out.push(Work::Send(message));
        }
    }

    /// A message arrived from the server.
    pub fn received(&mut self, message: &[u8], out: &mut Vec<Work>) -> Result<(), LinkError> {
        let carried = onesided::inspect(message)
            .map_err(|e| LinkError(format!("message from the server: {e}")))?;
        match carried {
            Carried::Reply { id, payload_len } => {
                let Some(named) = self.named.get_mut(&id) else {
                    if payload_len > 0 {
                        return Err(LinkError(format!(
                            "reply {id} says it placed {payload_len} bytes in no buffer we named"
                        )));
                    }
                    out.push(Work::Deliver {
                        head: message.to_vec(),
                        payload: None,
                        owned: false,
                    });
                    return Ok(());
                };
                let placed_in = match &named.memory {
                    Memory::Allocated(extent) => Some(*extent),
                    Memory::Staged { .. } => None,
                };
                if payload_len as u64 > placed_in.map_or(0, |e| e.len as u64) {
                    return Err(LinkError(format!(
                        "reply {id} placed {payload_len} bytes in a {}-byte {}buffer",
                        named.memory.len(),
                        if placed_in.is_none() { "WRITE's " } else { "" }
                    )));
                }
                named.sent = named.sent.saturating_sub(1);
                // The last copy answered: no placement can come any more,
                // so the frame may own the buffer (and the engine read the
                // data where the server put it). Else it is copied out and
                // the buffer stays named.
                let owned = named.sent == 0;
                let named = if owned { self.named.remove(&id) } else { None };
                match (placed_in, payload_len > 0) {
                    (Some(extent), true) => {
                        out.push(Work::Deliver {
                            head: message.to_vec(),
                            payload: Some((extent, payload_len)),
                            owned,
                        });
                    }
                    _ => {
                        out.push(Work::Deliver {
                            head: message.to_vec(),
                            payload: None,
                            owned: false,
                        });
                        if let Some(named) = named {
                            out.push(named.memory.release());
                        }
                    }
                }
                Ok(())
            }
            Carried::Plain => {
                out.push(Work::Deliver {
                    head: message.to_vec(),
                    payload: None,
                    owned: false,
                });
                Ok(())
            }
            Carried::Remote { id, .. } => Err(LinkError(format!(
                "the server sent request {id} naming a buffer"
            ))),
            Carried::Window(_) => Err(LinkError("the server sent a window".into())),
        }
    }

    /// The channel is gone (its queue pair can touch no memory now):
    /// every buffer it allocated returns to the arena. Staged payloads and
    /// unsent frames come back, to be dropped once the arena is let go.
    pub fn close(&mut self, arena: &mut Arena) -> Vec<Bytes> {
        let mut held = Vec::new();
        for (_, named) in self.named.drain() {
            match named.memory {
                Memory::Allocated(extent) => arena.free(extent),
                Memory::Staged { payload, .. } => held.push(payload),
            }
        }
        held.extend(self.waiting.drain(..).map(|(frame, _)| frame.payload));
        held
    }

    /// Registered bytes this channel holds.
    pub fn held(&self) -> u64 {
        self.named.values().map(|n| n.memory.len()).sum()
    }

    /// Internal consistency: every named buffer is still expected.
    pub fn check(&self) -> Result<(), String> {
        for (id, named) in &self.named {
            if named.sent == 0 {
                return Err(format!("request {id} answered but its buffer kept"));
            }
        }
        Ok(())
    }
}

/// An incoming frame on its way to the engine.
#[derive(Debug)]
enum Arriving {
    Ready(Vec<u8>),
    /// A WRITE whose data is not here yet.
    Fetching {
        token: u64,
        head: Vec<u8>,
        extent: Option<Extent>,
        remote: RemoteBuf,
        len: u32,
        done: bool,
    },
}

/// The server end of one channel.
#[derive(Debug, Default)]
pub struct ServerLink {
    /// What the client lets us reach, once its first message said so.
    window: Option<Window>,
    /// Requests answered INVALID for naming memory outside the window.
    refused: u64,
    /// In arrival order: nothing overtakes a WRITE still fetching.
    arriving: VecDeque<Arriving>,
    next_token: u64,
    /// READs whose data goes one-sided: id -> the client's buffer and
    /// how many copies of the request await a reply.
    reads: HashMap<u64, (RemoteBuf, u32, u32)>,
    /// Replies waiting for registered memory, and every reply after them,
    /// each with where its data already sits in registered memory, if it
    /// does.
    replies: VecDeque<(OutFrame, Option<u64>)>,
}

impl ServerLink {
    /// A fresh link.
    pub fn new() -> ServerLink {
        ServerLink::default()
    }

    /// A message arrived from the client.
    pub fn received(
        &mut self,
        message: &[u8],
        arena: &mut Arena,
        out: &mut Vec<Work>,
    ) -> Result<(), LinkError> {
        let carried = onesided::inspect(message);
        if let Ok(Carried::Remote {
            kind,
            id,
            length,
            payload_len,
            remote,
            ..
        }) = carried
        {
            let moves = if kind == Kind::Write {
                payload_len
            } else {
                length
            };
            if !self.window.is_some_and(|w| w.holds(remote, moves)) {
                // Posting it would fail on the NIC and take the queue pair,
                // and every request on it, down with it: only this request
                // fails, and it never reaches the engine.
                // Sent at once, not queued with the engine's replies: it
                // must not count as the answer to an honest copy of the
                // same request still waiting for its data.
                self.refused += 1;
                let refusal = encode(&Message::Reply(Reply {
                    id,
                    status: Status::Invalid,
                    exec_seq: 0,
                    payload: Bytes::new(),
                }));
                out.push(Work::Send(refusal.head().to_vec()));
                return Ok(());
            }
        }
        match carried {
            Ok(Carried::Window(w)) => {
                if self.window.replace(w).is_some() {
                    return Err(LinkError("a second window on one channel".into()));
                }
            }
            Ok(Carried::Remote {
                kind: Kind::Write,
                payload_len,
                remote,
                stream_head,
                ..
            }) => {
                self.next_token += 1;
                self.arriving.push_back(Arriving::Fetching {
                    token: self.next_token,
                    head: stream_head,
                    extent: None,
                    remote,
                    len: payload_len,
                    done: false,
                });
            }
            Ok(Carried::Remote {
                id,
                length,
                remote,
                stream_head,
                ..
            }) => {
                let entry = self.reads.entry(id).or_insert((remote, length, 0));
                *entry = (remote, length, entry.2 + 1);
                self.arriving.push_back(Arriving::Ready(stream_head));
            }
            // Anything else goes to the engine as it came: a malformed
            // frame is the engine's to refuse, with the same rules as on
            // a stream (it closes the connection).
            Ok(Carried::Reply { .. } | Carried::Plain) | Err(_) => {
                self.arriving.push_back(Arriving::Ready(message.to_vec()))
            }
        }
        self.progress(arena, out);
        Ok(())
    }

    /// A fetch finished: its data is in its extent.
    pub fn fetched(&mut self, token: u64, arena: &mut Arena, out: &mut Vec<Work>) {
        for a in self.arriving.iter_mut() {
            if let Arriving::Fetching { token: t, done, .. } = a {
                if *t == token {
                    *done = true;
                }
            }
        }
        self.progress(arena, out);
    }

    /// Starts fetches that have memory now, and delivers what is ready
    /// from the front (call it too when another channel freed memory).
    pub fn progress(&mut self, arena: &mut Arena, out: &mut Vec<Work>) {
        // Fetch in arrival order, so memory goes to the oldest first.
        for a in self.arriving.iter_mut() {
            if let Arriving::Fetching {
                token,
                extent: extent @ None,
                remote,
                len,
                ..
            } = a
            {
                let Some(got) = arena.alloc(*len) else { break };
                *extent = Some(got);
                out.push(Work::Fetch {
                    token: *token,
                    extent: got,
                    remote: *remote,
                });
            }
        }
        while let Some(front) = self.arriving.front() {
            match front {
                Arriving::Ready(_) => {
                    let Some(Arriving::Ready(head)) = self.arriving.pop_front() else {
                        unreachable!()
                    };
                    out.push(Work::Deliver {
                        head,
                        payload: None,
                        owned: false,
                    });
                }
                Arriving::Fetching { done: true, .. } => {
                    let Some(Arriving::Fetching {
                        head,
                        extent: Some(extent),
                        ..
                    }) = self.arriving.pop_front()
                    else {
                        unreachable!("a fetch is done only once it had memory")
                    };
                    out.push(Work::Deliver {
                        head,
                        payload: Some((extent, extent.len)),
                        owned: true,
                    });
                }
                Arriving::Fetching { .. } => break,
            }
        }
        self.flush_replies(arena, out);
    }

    /// Sends a stream-form frame from the engine.
    pub fn send(
        &mut self,
        frame: OutFrame,
        arena: &mut Arena,
        out: &mut Vec<Work>,
    ) -> Result<(), LinkError> {
        self.send_staged(frame, None, arena, out)
    }

    /// Sends a frame whose payload, if `staged_at` says so, already sits
    /// in registered memory at that offset (the backend read into it):
    /// it is placed from there, with no copy.
    pub fn send_staged(
        &mut self,
        frame: OutFrame,
        staged_at: Option<u64>,
        arena: &mut Arena,
        out: &mut Vec<Work>,
    ) -> Result<(), LinkError> {
        if !frame.payload.is_empty() {
            let head = frame.head();
            if Kind::from_u8(head[5]) != Some(Kind::Reply) {
                return Err(LinkError("a payload on a frame other than a reply".into()));
            }
            let id = u64::from_le_bytes(head[PREFIX_LEN..PREFIX_LEN + 8].try_into().unwrap());
            let named = self.reads.get(&id);
            if named.is_none_or(|(_, length, _)| frame.payload.len() > *length as usize) {
                return Err(LinkError(format!(
                    "read {id}: {} bytes of data and no client buffer that big",
                    frame.payload.len()
                )));
            }
        }
        let staged_at = staged_at.filter(|_| !frame.payload.is_empty());
        self.replies.push_back((frame, staged_at));
        self.flush_replies(arena, out);
        Ok(())
    }

    fn flush_replies(&mut self, arena: &mut Arena, out: &mut Vec<Work>) {
        while let Some((frame, staged_at)) = self.replies.front() {
            let head = frame.head();
            let reply_id = (Kind::from_u8(head[5]) == Some(Kind::Reply))
                .then(|| u64::from_le_bytes(head[PREFIX_LEN..PREFIX_LEN + 8].try_into().unwrap()));
            let named = reply_id.and_then(|id| self.reads.get(&id).map(|n| (id, *n)));
            if let Some(offset) = *staged_at {
                let (_, (remote, _, _)) = named.expect("checked in send");
                let (frame, _) = self.replies.pop_front().unwrap();
                let extent = Extent {
                    offset,
                    len: frame.payload.len() as u32,
                };
                out.push(Work::Place {
                    extent,
                    remote,
                    held: Some(frame.payload.clone()),
                });
                out.push(Work::Send(frame.head().to_vec()));
            } else if !frame.payload.is_empty() {
                let Some(extent) = arena.alloc(frame.payload.len() as u32) else {
                    return;
                };
                let (_, (remote, _, _)) = named.expect("checked in send");
                let (frame, _) = self.replies.pop_front().unwrap();
                out.push(Work::Fill {
                    extent,
                    data: frame.payload.clone(),
                });
                out.push(Work::Place {
                    extent,
                    remote,
                    held: None,
                });
                out.push(Work::Send(frame.head().to_vec()));
            } else {
                let (frame, _) = self.replies.pop_front().unwrap();
                out.push(Work::Send(frame.head().to_vec()));
            }
            if let Some((id, _)) = named {
                let left = self.reads.get_mut(&id).map(|n| {
                    n.2 -= 1;
                    n.2
                });
                if left == Some(0) {
                    self.reads.remove(&id);
                }
            }
        }
    }

    /// The channel is gone: memory held for fetches returns to the arena.
    /// (Extents of placements in flight are freed by their completions,
    /// which a dead queue pair still reports, flushed.) Returns the replies
    /// never sent, for the caller to drop once it let go of the arena: a
    /// staged payload returns its memory to the arena itself.
    #[must_use = "drop them after releasing the arena"]
    pub fn close(&mut self, arena: &mut Arena) -> Vec<OutFrame> {
        for a in self.arriving.drain(..) {
            if let Arriving::Fetching {
                extent: Some(e), ..
            } = a
            {
                arena.free(e);
            }
        }
        self.reads.clear();
        self.replies.drain(..).map(|(frame, _)| frame).collect()
    }

    /// Frames held back for a fetch or for memory.
    pub fn waiting(&self) -> usize {
        self.arriving.len() + self.replies.len()
    }

    /// Requests answered INVALID so far for naming memory outside the
    /// client's window.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests;
