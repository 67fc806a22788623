//! Keeps overlapping mutations to one export in arrival order: a mutation
//! waits while an earlier one to an overlapping range is in the backend.
//! Without this the final content of a twice-written sector would depend on
//! backend scheduling, and the exec sequence numbers clients rely on to
//! replay unflushed data would not match what is on disk.

use std::collections::VecDeque;

#[derive(Debug)]
pub(crate) struct OverlapGate<T> {
    running: Vec<(u64, u64, u64)>,
    waiting: VecDeque<(u64, u64, T)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl<T> Default for OverlapGate<T> {
    fn default() -> Self {
        OverlapGate {
            running: Vec::new(),
            waiting: VecDeque::new(),
        }
    }
}

impl<T> OverlapGate<T> {
    /// Admits a mutation on `[start, end)` identified by `token`: returns the
    /// item back if it may run now, otherwise holds it.
    pub(crate) fn admit(&mut self, token: u64, start: u64, end: u64, item: T) -> Option<T> {
        let blocked = self
            .running
            .iter()
            .any(|r| overlaps((r.1, r.2), (start, end)))
            || self
                .waiting
                .iter()
                .any(|w| overlaps((w.0, w.1), (start, end)));
        if blocked {
            self.waiting.push_back((start, end, item));
            None
        } else {
            self.running.push((token, start, end));
            Some(item)
        }
    }

    /// A mutation finished; returns the held ones that may now run, in
    /// arrival order. `token_of` names each released item's token.
    pub(crate) fn finish(&mut self, token: u64, mut token_of: impl FnMut(&T) -> u64) -> Vec<T> {
        if let Some(pos) = self.running.iter().position(|r| r.0 == token) {
            self.running.swap_remove(pos);
        } else {
            return Vec::new();
        }
        let mut released = Vec::new();
        let mut still = VecDeque::new();
        while let Some((start, end, item)) = self.waiting.pop_front() {
            let blocked = self
                .running
                .iter()
                .any(|r| overlaps((r.1, r.2), (start, end)))
                || still
                    .iter()
                    .any(|w: &(u64, u64, T)| overlaps((w.0, w.1), (start, end)));
            if blocked {
                still.push_back((start, end, item));
            } else {
                self.running.push((token_of(&item), start, end));
                released.push(item);
            }
        }
        self.waiting = still;
        released
    }

    /// Tokens admitted and not finished, and how many wait.
    pub(crate) fn census(&self) -> (impl Iterator<Item = u64> + '_, usize) {
        (self.running.iter().map(|r| r.0), self.waiting.len())
    }

    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_mutations_run_in_arrival_order() {
        let mut g = OverlapGate::default();
        assert_eq!(g.admit(1, 0, 10, 1u64), Some(1));
        assert_eq!(g.admit(2, 5, 15, 2u64), None);
        assert_eq!(g.admit(3, 12, 20, 3u64), None, "overlaps a waiting one");
        assert_eq!(g.admit(4, 30, 40, 4u64), Some(4));
        assert_eq!(g.finish(1, |t| *t), vec![2]);
        assert_eq!(g.finish(2, |t| *t), vec![3]);
        assert_eq!(g.finish(3, |t| *t), Vec::<u64>::new());
        assert_eq!(g.finish(4, |t| *t), Vec::<u64>::new());
        assert!(g.is_idle());
    }
}
