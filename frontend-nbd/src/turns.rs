//! Work of one connection that a single pool thread at a time runs in the
//! order it arrived: large READs run whole (`whole_read`), large replies
//! sent from memory (`whole_send`). Whether a thread is running and what
//! waits for it are decided under one lock, so an item offered just as
//! the thread finishes either joins its run or starts a new one.

use std::collections::VecDeque;
use std::sync::Mutex;

/// A connection's items waiting for their turn on its pool thread.
pub(crate) struct Turns<T>(Mutex<State<T>>);

struct State<T> {
    waiting: VecDeque<T>,
    /// A pool thread is running items; while it is, `waiting` drains into it.
    running: bool,
}

/// What became of an offered item.
pub(crate) enum Offer<T> {
    /// No thread was running: the caller must start one with the item
    /// and [`Turns::run`].
    Start(T),
    /// A thread is running and will take the item after those before it.
    Queued,
    /// A thread is running and the item may not wait: it comes back.
    Busy(T),
}

impl<T> Default for Turns<T> {
    fn default() -> Self {
        Turns(Mutex::new(State {
            waiting: VecDeque::new(),
            running: false,
        }))
    }
}

impl<T> Turns<T> {
    /// Offers `item`; one that finds a thread running joins its queue if
    /// `may_wait`, and comes back otherwise.
    pub(crate) fn offer(&self, item: T, may_wait: bool) -> Offer<T> {
        let mut state = self.0.lock().unwrap();
        if !state.running {
            state.running = true;
            return Offer::Start(item);
        }
        if !may_wait {
            return Offer::Busy(item);
        }
        state.waiting.push_back(item);
        Offer::Queued
    }

    /// Runs `first`, then every item queued meanwhile, with `each`; called
    /// on the thread an [`Offer::Start`] asked for.
    pub(crate) fn run(&self, first: T, mut each: impl FnMut(T)) {
        let mut item = first;
        loop {
            each(item);
            let mut state = self.0.lock().unwrap();
            match state.waiting.pop_front() {
                Some(next) => item = next,
                None => {
                    state.running = false;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_run_at_a_time_takes_what_queued_in_order() {
        let turns = Turns::default();
        let Offer::Start(first) = turns.offer(1, true) else {
            panic!("the first item starts a run");
        };
        assert!(matches!(turns.offer(2, true), Offer::Queued));
        assert!(matches!(turns.offer(9, false), Offer::Busy(9)));
        assert!(matches!(turns.offer(3, true), Offer::Queued));
        let mut ran = Vec::new();
        turns.run(first, |n| ran.push(n));
        assert_eq!(ran, [1, 2, 3]);
        assert!(
            matches!(turns.offer(4, false), Offer::Start(4)),
            "after the run ends the next item starts another"
        );
    }
}
