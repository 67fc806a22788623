//! One server as several engines, each driven on a task of its own, so
//! that no single task is the ceiling of the whole server.
//!
//! A session lives on one engine for its whole life, and everything the
//! engine ties across sessions must stay on one engine too:
//!
//! - **A session's channels.** A HELLO that joins names its session, and
//!   an engine only draws session ids that name it (`id % count ==
//!   index`), so every channel of a session reaches the engine holding it.
//! - **A client's runs.** The owner fence (PROTOCOL.md §7.3) compares an
//!   owner's sessions on one export, so every new session of one (owner,
//!   export) goes to the same engine.
//! - **Anonymous clients** (owner 0) are never fenced: the driver puts
//!   their new sessions wherever it likes.
//!
//! What is given up: the overlap gate orders overlapping mutations of one
//! export within one engine only. Two clients whose writes overlap while
//! both are in flight may now have them reach the backend in either order
//! (and, without a gate between them, mixed page by page). Neither client
//! can have seen the other's write complete before sending its own, so
//! either order is one the clients could not tell from a single engine's.
//! A client's own overlapping writes, the order its replay after a server
//! restart depends on, are all on its session's engine.

use crate::rng::SplitMix64;
use crate::wire::{decode_in, Hello, InFrame, Message};

/// Which engine of `count` must take the connection whose first frame is
/// `hello`; `None` when any may (a new anonymous session).
pub fn engine_for(hello: &Hello, count: usize) -> Option<usize> {
    if count <= 1 {
        return Some(0);
    }
    let count = count as u64;
    if hello.session_id != 0 {
        return Some((hello.session_id % count) as usize);
    }
    if hello.owner != 0 {
        // SplitMix64's output: owners that differ in a few low bits still
        // spread over the engines.
        let spread = SplitMix64::new(hello.owner ^ name_hash(&hello.export)).next_u64();
        return Some((spread % count) as usize);
    }
    None
}

/// The engine of `count` that must take the connection whose first frame
/// is `frame`: [`engine_for`] its HELLO; `None` (any engine) for anything
/// else, which whichever engine gets it refuses.
pub fn engine_for_frame(frame: impl Into<InFrame>, count: usize) -> Option<usize> {
    if count <= 1 {
        return Some(0);
    }
    match decode_in(frame.into()) {
        Ok(Message::Hello(hello)) => engine_for(&hello, count),
        _ => None,
    }
}

/// FNV-1a: stable across builds and processes, unlike std's hasher, so a
/// client's sessions land on the same engine whichever process routes them.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Where one engine sits among its server's engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shard {
    pub(crate) index: u64,
    pub(crate) count: u64,
}

impl Shard {
    pub(crate) const ALONE: Shard = Shard { index: 0, count: 1 };

    /// Whether `session_id` routes to this engine (see [`engine_for`]).
    pub(crate) fn owns(self, session_id: u64) -> bool {
        session_id % self.count == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(session_id: u64, owner: u64, export: &str) -> Hello {
        Hello {
            version_min: 1,
            version_max: 1,
            features: 0,
            session_id,
            client_nonce: [0; 16],
            owner,
            epoch: 1,
            key_id: "k".into(),
            export: export.into(),
        }
    }

    #[test]
    fn a_join_goes_to_the_engine_its_session_id_names() {
        for id in [1u64, 2, 3, 4, 5, u64::MAX] {
            assert_eq!(engine_for(&hello(id, 77, "d"), 3), Some((id % 3) as usize));
        }
    }

    #[test]
    fn an_owners_new_sessions_on_one_export_always_go_to_one_engine() {
        let first = engine_for(&hello(0, 0xfeed, "disk0"), 4);
        assert!(first.is_some());
        for epoch_run in 0..5 {
            let mut h = hello(0, 0xfeed, "disk0");
            h.epoch = epoch_run;
            assert_eq!(engine_for(&h, 4), first, "the fence needs every run here");
        }
    }

    #[test]
    fn owners_spread_over_the_engines() {
        let mut seen = [0usize; 4];
        for owner in 1..=400u64 {
            seen[engine_for(&hello(0, owner, "disk0"), 4).unwrap()] += 1;
        }
        assert!(
            seen.iter().all(|&n| n > 60),
            "400 owners over 4 engines: {seen:?}"
        );
    }

    #[test]
    fn anonymous_new_sessions_may_go_anywhere_but_one_engine_takes_all() {
        assert_eq!(engine_for(&hello(0, 0, "d"), 2), None);
        assert_eq!(engine_for(&hello(0, 0, "d"), 1), Some(0));
        assert_eq!(engine_for(&hello(9, 5, "d"), 1), Some(0));
    }
}
