//! Work-request bookkeeping of one queue pair, without verbs: which head
//! slots are free, how much room the send queue has, which work request id
//! names what, and the order work waits in when either runs out. The verbs
//! driver posts what [`SendQueue::next_step`] hands it and reports each
//! completion to [`SendQueue::completed`].

use crate::arena::Extent;
use crate::link::Work;
use braid_core::wire::RemoteBuf;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};

/// Work request ids carry their kind in the top byte: a receive names its
/// slot, anything on the send queue a sequence number.
const WR_RECV: u64 = 1;
const WR_SEND: u64 = 2;
const KIND_SHIFT: u32 = 56;
const VALUE_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// The id of the receive posted in `slot`.
pub fn recv_id(slot: usize) -> u64 {
    WR_RECV << KIND_SHIFT | slot as u64
}

/// The slot a receive's id names, or None for a send-queue id.
pub fn recv_slot(wr: u64) -> Option<usize> {
    (wr >> KIND_SHIFT == WR_RECV).then_some((wr & VALUE_MASK) as usize)
}

/// What a send-queue work request was for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Posted {
    Send(usize),
    Fetch(u64, Extent),
    Place(Extent),
    /// A placement out of memory a frame owns: the frame goes when the
    /// write does.
    PlaceHeld(Bytes),
}

/// One step for the driver, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Post a SEND of `message` from head slot `slot`, signalled as `wr`.
    Send {
        /// Work request id.
        wr: u64,
        /// Head slot to copy the message into.
        slot: usize,
        /// Prefix and body.
        message: Vec<u8>,
    },
    /// Post an RDMA READ of the peer's `remote` into `extent`.
    Fetch {
        /// Work request id.
        wr: u64,
        /// Local destination.
        extent: Extent,
        /// The peer's buffer.
        remote: RemoteBuf,
    },
    /// Post an RDMA WRITE of `extent` to the peer's `remote`.
    Place {
        /// Work request id.
        wr: u64,
        /// Local source.
        extent: Extent,
        /// The peer's buffer.
        remote: RemoteBuf,
    },
    /// Work that needs no queue room (fills, deliveries, frees), as the
    /// link gave it.
    Local(Work),
}

/// What a completed send-queue work request means.
#[derive(Debug, PartialEq, Eq)]
pub enum Completed {
    /// A SEND left: its slot is free again.
    Sent,
    /// A fetch finished: tell the link (`extent` is where it landed).
    Fetched {
        /// The link's name for it.
        token: u64,
        /// Its destination.
        extent: Extent,
    },
    /// A placement finished: free its extent.
    Placed(Extent),
    /// A placement out of a frame's memory finished: here is the frame's
    /// payload, to drop once the arena is not held.
    Released(Bytes),
}

/// Head slots, send-queue room and the work waiting for them.
#[derive(Debug)]
pub struct SendQueue {
    free_slots: Vec<usize>,
    posted: HashMap<u64, Posted>,
    depth: usize,
    next_seq: u64,
    backlog: VecDeque<Work>,
}

impl SendQueue {
    /// `slots` head slots and a send queue `depth` deep.
    pub fn new(slots: usize, depth: usize) -> SendQueue {
        SendQueue {
            free_slots: (0..slots).rev().collect(),
            posted: HashMap::new(),
            depth,
            next_seq: 0,
            backlog: VecDeque::new(),
        }
    }

    /// Work from the link, behind anything still waiting.
    pub fn push(&mut self, work: impl IntoIterator<Item = Work>) {
        self.backlog.extend(work);
    }

    /// Whether work waits for a slot or queue room.
    pub fn is_backed_up(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// The next step, if the front of the backlog can go now. Nothing
    /// overtakes work that waits, so frames keep their order.
    pub fn next_step(&mut self) -> Option<Step> {
        let front = self.backlog.front()?;
        let needs_queue = matches!(
            front,
            Work::Send(_) | Work::Fetch { .. } | Work::Place { .. }
        );
        if needs_queue && self.posted.len() >= self.depth {
            return None;
        }
        if matches!(front, Work::Send(_)) && self.free_slots.is_empty() {
            return None;
        }
        Some(match self.backlog.pop_front().unwrap() {
            Work::Send(message) => {
                let slot = self.free_slots.pop().unwrap();
                Step::Send {
                    wr: self.post(Posted::Send(slot)),
                    slot,
                    message,
                }
            }
            Work::Fetch {
                token,
                extent,
                remote,
            } => Step::Fetch {
                wr: self.post(Posted::Fetch(token, extent)),
                extent,
                remote,
            },
            Work::Place {
                extent,
                remote,
                held,
            } => Step::Place {
                wr: self.post(match held {
                    Some(payload) => Posted::PlaceHeld(payload),
                    None => Posted::Place(extent),
                }),
                extent,
                remote,
            },
            local => Step::Local(local),
        })
    }

    fn post(&mut self, what: Posted) -> u64 {
        self.next_seq = (self.next_seq + 1) & VALUE_MASK;
        let wr = WR_SEND << KIND_SHIFT | self.next_seq;
        let clash = self.posted.insert(wr, what);
        debug_assert!(
            clash.is_none(),
            "work request id {wr:#x} reused while in flight"
        );
        wr
    }

    /// A send-queue completion arrived.
    pub fn completed(&mut self, wr: u64) -> Result<Completed, String> {
        match self.posted.remove(&wr) {
            Some(Posted::Send(slot)) => {
                self.free_slots.push(slot);
                Ok(Completed::Sent)
            }
            Some(Posted::Fetch(token, extent)) => Ok(Completed::Fetched { token, extent }),
            Some(Posted::Place(extent)) => Ok(Completed::Placed(extent)),
            Some(Posted::PlaceHeld(payload)) => Ok(Completed::Released(payload)),
            None => Err(format!("completion for unknown work request {wr:#x}")),
        }
    }

    /// The queue pair is gone: the extents of placements it never
    /// finished, to free, and the work and payloads it still held, to drop
    /// once the arena is not held (a staged payload frees itself into it).
    /// (Fetches' extents belong to the link.)
    pub fn close(&mut self) -> (Vec<Extent>, Vec<Work>, Vec<Bytes>) {
        let backlog = self.backlog.drain(..).collect();
        let mut extents = Vec::new();
        let mut held = Vec::new();
        for (_, p) in self.posted.drain() {
            match p {
                Posted::Place(e) => extents.push(e),
                Posted::PlaceHeld(b) => held.push(b),
                _ => {}
            }
        }
        (extents, backlog, held)
    }

    /// Internal consistency: every slot is free or in flight, exactly once.
    pub fn check(&self, slots: usize) -> Result<(), String> {
        let mut seen = vec![false; slots];
        let in_flight = self.posted.values().filter_map(|p| match p {
            Posted::Send(s) => Some(*s),
            _ => None,
        });
        for s in self.free_slots.iter().copied().chain(in_flight) {
            if s >= slots || std::mem::replace(&mut seen[s], true) {
                return Err(format!(
                    "head slot {s} free or in flight twice, or out of range"
                ));
            }
        }
        if seen.iter().any(|s| !s) {
            return Err("a head slot is neither free nor in flight".into());
        }
        if self.posted.len() > self.depth {
            return Err(format!(
                "{} work requests on a queue {} deep",
                self.posted.len(),
                self.depth
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REMOTE: RemoteBuf = RemoteBuf {
        addr: 4096,
        rkey: 7,
    };

    fn extent(n: u64) -> Extent {
        Extent {
            offset: n * 8192,
            len: 4096,
        }
    }

    /// What each step carries, to compare with what was pushed.
    fn label(step: &Step) -> String {
        match step {
            Step::Send { message, .. } => format!("send {}", message[0]),
            Step::Fetch { extent, .. } => format!("fetch {}", extent.offset),
            Step::Place { extent, .. } => format!("place {}", extent.offset),
            Step::Local(Work::Free(e)) => format!("free {}", e.offset),
            Step::Local(w) => format!("{w:?}"),
        }
    }

    fn wr_of(step: &Step) -> Option<u64> {
        match step {
            Step::Send { wr, .. } | Step::Fetch { wr, .. } | Step::Place { wr, .. } => Some(*wr),
            Step::Local(_) => None,
        }
    }

    #[test]
    fn a_full_send_queue_holds_back_everything_behind_it_in_order() {
        let mut q = SendQueue::new(8, 2);
        q.push([
            Work::Send(vec![1]),
            Work::Fetch {
                token: 9,
                extent: extent(1),
                remote: REMOTE,
            },
            Work::Send(vec![2]),
            Work::Free(extent(2)),
        ]);
        let first = q.next_step().unwrap();
        let second = q.next_step().unwrap();
        assert_eq!(
            (label(&first), label(&second)),
            ("send 1".into(), "fetch 8192".into())
        );
        assert_eq!(q.next_step(), None, "two work requests on a queue two deep");
        assert!(
            q.is_backed_up(),
            "and the free waits behind them, though it needs no room"
        );
        assert_eq!(
            q.completed(wr_of(&second).unwrap()),
            Ok(Completed::Fetched {
                token: 9,
                extent: extent(1)
            })
        );
        assert_eq!(label(&q.next_step().unwrap()), "send 2");
        assert_eq!(label(&q.next_step().unwrap()), "free 16384");
        assert_eq!(q.next_step(), None);
        q.check(8).unwrap();
    }

    #[test]
    fn head_slots_run_out_before_the_queue_does_and_come_back_when_sent() {
        let mut q = SendQueue::new(1, 64);
        q.push([Work::Send(vec![1]), Work::Send(vec![2])]);
        let Step::Send { wr, slot, .. } = q.next_step().unwrap() else {
            panic!()
        };
        assert_eq!(q.next_step(), None);
        assert_eq!(q.completed(wr), Ok(Completed::Sent));
        let Step::Send { slot: again, .. } = q.next_step().unwrap() else {
            panic!()
        };
        assert_eq!(slot, again);
    }

    #[test]
    fn receive_and_send_queue_ids_never_collide() {
        let mut q = SendQueue::new(4, 4);
        q.push([Work::Send(vec![1])]);
        let wr = wr_of(&q.next_step().unwrap()).unwrap();
        assert_eq!(recv_slot(recv_id(5)), Some(5));
        assert_eq!(recv_slot(wr), None);
        assert!(
            q.completed(recv_id(0)).is_err(),
            "a receive is not the send queue's"
        );
        assert!(q.completed(wr).is_ok());
        assert!(q.completed(wr).is_err(), "a completion counts once");
    }

    #[test]
    fn closing_returns_the_placements_in_flight() {
        let mut q = SendQueue::new(4, 4);
        q.push([
            Work::Place {
                extent: extent(3),
                remote: REMOTE,
                held: None,
            },
            Work::Place {
                extent: extent(5),
                remote: REMOTE,
                held: Some(Bytes::from_static(b"staged")),
            },
            Work::Fill {
                extent: extent(4),
                data: Bytes::from_static(b"x"),
            },
        ]);
        q.next_step().unwrap();
        q.next_step().unwrap();
        let (extents, backlog, held) = q.close();
        assert_eq!(extents, vec![extent(3)]);
        assert_eq!(held, vec![Bytes::from_static(b"staged")]);
        assert_eq!(backlog.len(), 1, "the fill never ran");
        assert!(!q.is_backed_up());
    }

    #[test]
    fn a_placement_out_of_a_frame_hands_the_frame_back_when_done() {
        let mut q = SendQueue::new(4, 4);
        q.push([Work::Place {
            extent: extent(2),
            remote: REMOTE,
            held: Some(Bytes::from_static(b"data")),
        }]);
        let wr = wr_of(&q.next_step().unwrap()).unwrap();
        assert_eq!(
            q.completed(wr),
            Ok(Completed::Released(Bytes::from_static(b"data")))
        );
    }

    #[test]
    fn a_slot_counted_twice_is_caught_by_check() {
        let mut q = SendQueue::new(2, 2);
        q.check(2).unwrap();
        q.free_slots.push(0);
        assert!(q.check(2).is_err());
    }

    proptest! {
        /// Whatever the depth, slots and completion order, the steps come
        /// out in the order the work went in, and the books balance.
        #[test]
        fn steps_keep_the_order_of_the_work(
            slots in 1usize..4,
            depth in 1usize..4,
            work in proptest::collection::vec(0u8..3, 1..60),
            finish in proptest::collection::vec(any::<prop::sample::Index>(), 0..200),
        ) {
            let mut q = SendQueue::new(slots, depth);
            let pushed: Vec<String> = work.iter().enumerate().map(|(i, k)| match k {
                0 => format!("send {}", i as u8),
                1 => format!("fetch {}", i as u64 * 8192),
                _ => format!("free {}", i as u64 * 8192),
            }).collect();
            q.push(work.iter().enumerate().map(|(i, k)| match k {
                0 => Work::Send(vec![i as u8]),
                1 => Work::Fetch { token: i as u64, extent: extent(i as u64), remote: REMOTE },
                _ => Work::Free(extent(i as u64)),
            }));
            let mut out = Vec::new();
            let mut in_flight: Vec<u64> = Vec::new();
            let mut finish = finish.into_iter();
            loop {
                while let Some(step) = q.next_step() {
                    if let Some(wr) = wr_of(&step) {
                        in_flight.push(wr);
                    }
                    out.push(label(&step));
                    prop_assert!(in_flight.len() <= depth);
                }
                prop_assert!(q.check(slots).is_ok(), "{:?}", q.check(slots));
                if in_flight.is_empty() {
                    break;
                }
                let pick = finish.next().map_or(0, |i| i.index(in_flight.len()));
                let wr = in_flight.swap_remove(pick);
                prop_assert!(q.completed(wr).is_ok());
            }
            prop_assert_eq!(out, pushed);
        }
    }
}
