//! A session's exactly-once bookkeeping: the result cache keyed by request
//! id, pruned by the client's floor.

use crate::wire::{Op, Status};
use crate::Instant;
use std::collections::BTreeMap;

/// Transport-level connection id chosen by the driver.
pub type ConnId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryState {
    /// In the backend; the reply goes to the channel the latest copy came on.
    InProgress { reply_to: ConnId },
    /// Finished; a resent copy gets this answer without re-executing.
    Done { status: Status, exec_seq: u64 },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub(crate) op: Op,
    pub(crate) state: EntryState,
}

/// What to do with an arriving request id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Below the floor: a stale copy; drop it silently.
    Stale,
    /// Beyond the window the server agreed to remember.
    OutOfWindow,
    /// Already executing: the reply will go to this channel.
    Joined,
    /// Already done: answer with the recorded result.
    Recorded { status: Status, exec_seq: u64 },
    /// New (or a read to run again): execute it.
    Execute,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) export: usize,
    /// The client's owner and epoch from its HELLO ((0, 0): anonymous).
    pub(crate) owner_epoch: (u64, u64),
    /// Ended by a newer run of its owner: it takes no more channels, and
    /// the newer session waits for its backend operations to finish.
    pub(crate) fenced: bool,
    pub(crate) conns: Vec<ConnId>,
    floor: u64,
    entries: BTreeMap<u64, Entry>,
    exec_seq: u64,
    pub(crate) orphaned_since: Option<Instant>,
    pub(crate) ops_in_backend: usize,
    pub(crate) leaving: bool,
    /// Requests it may have outstanding, as announced when it was created
    /// (tuning the server changes it for new sessions only).
    pub(crate) max_inflight: u32,
}

impl Session {
    pub(crate) fn new(id: u64, export: usize, owner_epoch: (u64, u64), max_inflight: u32) -> Self {
        Session {
            id,
            export,
            owner_epoch,
            fenced: false,
            conns: Vec::new(),
            floor: 0,
            entries: BTreeMap::new(),
            exec_seq: 0,
            orphaned_since: None,
            ops_in_backend: 0,
            leaving: false,
            max_inflight,
        }
    }

    /// Decides the fate of request `id` arriving on `conn` and records it.
    pub(crate) fn admit(
        &mut self,
        id: u64,
        floor: u64,
        op: Op,
        conn: ConnId,
        window: u32,
    ) -> Admission {
        if floor > self.floor {
            self.floor = floor;
            // Ids below the floor are finished for the client; forget them.
            let keep = self.entries.split_off(&floor);
            self.entries = keep;
        }
        if id < self.floor {
            return Admission::Stale;
        }
        if id - self.floor >= u64::from(window) {
            return Admission::OutOfWindow;
        }
        match self.entries.get_mut(&id) {
            None => {
                self.entries.insert(
                    id,
                    Entry {
                        op,
                        state: EntryState::InProgress { reply_to: conn },
                    },
                );
                Admission::Execute
            }
            Some(entry) => match entry.state {
                EntryState::InProgress { .. } => {
                    entry.state = EntryState::InProgress { reply_to: conn };
                    Admission::Joined
                }
                // Reads are idempotent, and caching their data would cost
                // memory, so a resent read simply runs again.
                EntryState::Done { .. } if entry.op == Op::Read => {
                    entry.state = EntryState::InProgress { reply_to: conn };
                    Admission::Execute
                }
                EntryState::Done { status, exec_seq } => Admission::Recorded { status, exec_seq },
            },
        }
    }

    /// Whether request `id` has been answered already (a resent copy).
    pub(crate) fn answered(&self, id: u64) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| matches!(e.state, EntryState::Done { .. }))
    }

    /// The channel a request still executing will be answered on.
    pub(crate) fn reply_to(&self, id: u64) -> Option<ConnId> {
        match self.entries.get(&id)?.state {
            EntryState::InProgress { reply_to } => Some(reply_to),
            EntryState::Done { .. } => None,
        }
    }

    /// Forgets an admitted request that was not executed, so a later copy
    /// is treated as new.
    pub(crate) fn forget(&mut self, id: u64) {
        self.entries.remove(&id);
    }

    /// Records a result decided without the backend (validation errors).
    pub(crate) fn record(&mut self, id: u64, status: Status, exec_seq: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.state = EntryState::Done { status, exec_seq };
        }
    }

    /// The backend finished `id`. Returns the exec sequence number (for a
    /// successful mutation) and where the reply should go, if anywhere.
    pub(crate) fn complete(&mut self, id: u64, op: Op, status: Status) -> (u64, Option<ConnId>) {
        let exec_seq = if op.mutates() && status == Status::Ok {
            self.exec_seq += 1;
            self.exec_seq
        } else {
            0
        };
        let reply_to = match self.entries.get_mut(&id) {
            Some(e) => {
                let to = match e.state {
                    EntryState::InProgress { reply_to } => Some(reply_to),
                    EntryState::Done { .. } => None,
                };
                e.state = EntryState::Done { status, exec_seq };
                to
            }
            // Pruned by the floor meanwhile: the client has moved on.
            None => None,
        };
        (exec_seq, reply_to)
    }

    /// Every remembered id is at or above the floor and inside the window.
    pub(crate) fn check(&self, window: u32) -> Result<(), String> {
        if let Some((&lo, _)) = self.entries.first_key_value() {
            if lo < self.floor {
                return Err(format!(
                    "session {:#x}: id {lo} kept below floor {}",
                    self.id, self.floor
                ));
            }
        }
        if let Some((&hi, _)) = self.entries.last_key_value() {
            if hi - self.floor >= u64::from(window) {
                return Err(format!(
                    "session {:#x}: id {hi} outside the window above {}",
                    self.id, self.floor
                ));
            }
        }
        Ok(())
    }

    /// Ids executing now (their reply goes out on completion).
    pub(crate) fn in_progress(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            .filter(|(_, e)| matches!(e.state, EntryState::InProgress { .. }))
            .map(|(id, _)| *id)
    }

    /// Number of remembered request results (bounded by the id window).
    pub(crate) fn cached(&self) -> usize {
        self.entries.len()
    }

    /// Where to send a reply when `preferred` is gone.
    pub(crate) fn route(&self, preferred: Option<ConnId>) -> Option<ConnId> {
        match preferred {
            Some(c) if self.conns.contains(&c) => Some(c),
            _ => self.conns.first().copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resent_write_gets_recorded_result_and_stale_copy_is_dropped() {
        let mut s = Session::new(1, 0, (0, 0), 64);
        assert_eq!(s.admit(5, 5, Op::Write, 1, 100), Admission::Execute);
        assert_eq!(s.admit(5, 5, Op::Write, 2, 100), Admission::Joined);
        assert_eq!(s.complete(5, Op::Write, Status::Ok), (1, Some(2)));
        assert_eq!(
            s.admit(5, 5, Op::Write, 1, 100),
            Admission::Recorded {
                status: Status::Ok,
                exec_seq: 1
            }
        );
        assert_eq!(s.admit(6, 6, Op::Write, 1, 100), Admission::Execute);
        assert_eq!(s.admit(5, 6, Op::Write, 1, 100), Admission::Stale);
        assert_eq!(s.cached(), 1);
        assert_eq!(s.admit(106, 6, Op::Write, 1, 100), Admission::OutOfWindow);
    }

    #[test]
    fn exec_seq_numbers_successful_mutations_only() {
        let mut s = Session::new(1, 0, (0, 0), 64);
        for id in 1..=4 {
            s.admit(id, 1, Op::Write, 1, 100);
        }
        assert_eq!(s.cached(), 4);
        assert_eq!(s.in_progress().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(s.complete(1, Op::Read, Status::Ok).0, 0, "reads get none");
        assert_eq!(
            s.complete(2, Op::Write, Status::Io).0,
            0,
            "failures get none"
        );
        assert_eq!(s.complete(3, Op::Write, Status::Ok).0, 1);
        assert_eq!(s.complete(4, Op::Trim, Status::Ok).0, 2);
        assert_eq!(s.in_progress().count(), 0, "all four answered");
    }

    #[test]
    fn check_sees_ids_outside_the_window() {
        let mut s = Session::new(1, 0, (0, 0), 64);
        s.admit(5, 5, Op::Write, 1, 100);
        s.check(100).unwrap();
        s.floor = 6; // as if the floor moved without pruning
        assert!(s.check(100).unwrap_err().contains("below floor"));
        s.floor = 0;
        assert!(s.check(5).unwrap_err().contains("outside the window"));
    }

    #[test]
    fn resent_read_runs_again() {
        let mut s = Session::new(1, 0, (0, 0), 64);
        assert_eq!(s.admit(1, 1, Op::Read, 1, 100), Admission::Execute);
        s.complete(1, Op::Read, Status::Ok);
        assert_eq!(s.admit(1, 1, Op::Read, 1, 100), Admission::Execute);
    }
}
