//! The dirty window: data the server acknowledged but has not yet made
//! durable. If the server loses power, those writes are gone from its disk
//! while the filesystem above us believes them written; so the client keeps
//! them until a FLUSH covers them, and after a server restart replays them,
//! in the order the server executed them, before anything else runs.

use bytes::Bytes;
use std::collections::BTreeMap;

/// What an acknowledged mutation left on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Content {
    /// Written data (unflushed).
    Data(Bytes),
    /// Zeroes (TRIM or WRITE_ZEROES, unflushed).
    Zero,
    /// Already durable (FUA): nothing to replay, but it hides older dirty
    /// data underneath it.
    Durable,
}

impl Content {
    fn slice(&self, from: u64, to: u64) -> Content {
        match self {
            Content::Data(b) => Content::Data(b.slice(from as usize..to as usize)),
            other => other.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct DirtyEntry {
    offset: u64,
    content: Content,
    len: u64,
    /// Acknowledgement generation: which flushes cover it.
    gen: u64,
}

/// A range to rewrite after a server restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// `None` for zeroes.
    pub(crate) data: Option<Bytes>,
}

/// What one entry costs beyond its data. Counting it keeps the window
/// bounded even under FUA-only or trim-only traffic, whose entries hold no
/// data but must stay until a FLUSH (they mask older data on replay).
const ENTRY_COST: u64 = 64;

#[derive(Debug, Default)]
pub(crate) struct DirtyWindow {
    /// Keyed by (server session epoch, exec sequence): the order the server
    /// applied them in.
    entries: BTreeMap<(u64, u64), DirtyEntry>,
    bytes: u64,
    gen: u64,
    /// Every mutation executed at or before this (epoch, exec sequence) is
    /// durable: a completed FLUSH covered it.
    durable_through: (u64, u64),
}

impl DirtyWindow {
    /// Memory held: data plus a fixed cost per entry.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The acknowledgement generation so far; a FLUSH first sent now covers
    /// every entry up to it.
    pub(crate) fn gen(&self) -> u64 {
        self.gen
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The byte total matches the entries, and no entry is from a later
    /// generation than the window has counted.
    pub(crate) fn check(&self) -> Result<(), String> {
        let bytes: u64 = self.entries.values().map(|e| cost(&e.content)).sum();
        if bytes != self.bytes {
            return Err(format!(
                "dirty window: bytes is {}, entries say {bytes}",
                self.bytes
            ));
        }
        if let Some(e) = self
            .entries
            .values()
            .find(|e| e.gen > self.gen || e.gen == 0)
        {
            return Err(format!(
                "dirty window: entry of generation {} (window at {})",
                e.gen, self.gen
            ));
        }
        Ok(())
    }

    /// Records an acknowledged mutation.
    pub(crate) fn acknowledged(
        &mut self,
        epoch: u64,
        exec_seq: u64,
        offset: u64,
        len: u64,
        content: Content,
    ) {
        self.gen += 1;
        if (epoch, exec_seq) <= self.durable_through {
            // Its answer was late: a FLUSH that covers a mutation executed
            // after it already completed, so it is on stable storage, and
            // replaying it would put older data over newer.
            return;
        }
        self.bytes += cost(&content);
        self.entries.insert(
            (epoch, exec_seq),
            DirtyEntry {
                offset,
                content,
                len,
                gen: self.gen,
            },
        );
    }

    /// A FLUSH first sent at generation `gen` completed: everything
    /// acknowledged before it is durable, and so is everything the server
    /// executed before any of those (answers arrive out of order: a
    /// mutation executed earlier may be acknowledged later, and keeping it
    /// would replay it over the newer data the FLUSH made durable).
    /// `frontier` false frees by acknowledgement only (test sabotage).
    pub(crate) fn flushed(&mut self, gen: u64, frontier: bool) {
        let frontier = if frontier {
            self.entries
                .iter()
                .filter(|(_, e)| e.gen <= gen)
                .map(|(k, _)| *k)
                .next_back()
                .unwrap_or_default()
                .max(self.durable_through)
        } else {
            (0, 0)
        };
        self.durable_through = frontier;
        let mut freed = 0;
        self.entries.retain(|k, e| {
            let keep = e.gen > gen && *k > frontier;
            if !keep {
                freed += cost(&e.content);
            }
            keep
        });
        self.bytes -= freed;
    }

    /// Empties the window into the non-overlapping extents that, written in
    /// any order, recreate its final content. `unacked_replays` (replays
    /// that were still in flight when the server restarted again) go on top.
    pub(crate) fn take_replay(&mut self, unacked_replays: Vec<Extent>) -> Vec<Extent> {
        let mut map: BTreeMap<u64, (u64, Content)> = BTreeMap::new();
        let entries = std::mem::take(&mut self.entries);
        self.bytes = 0;
        let later = unacked_replays.into_iter().map(|e| {
            let content = e.data.map(Content::Data).unwrap_or(Content::Zero);
            (e.offset, e.len, content)
        });
        for (offset, len, content) in entries
            .into_values()
            .map(|e| (e.offset, e.len, e.content))
            .chain(later)
        {
            overwrite(&mut map, offset, offset + len, content);
        }
        map.into_iter()
            .filter_map(|(start, (end, content))| match content {
                Content::Data(d) => Some(Extent {
                    offset: start,
                    len: end - start,
                    data: Some(d),
                }),
                Content::Zero => Some(Extent {
                    offset: start,
                    len: end - start,
                    data: None,
                }),
                Content::Durable => None,
            })
            .collect()
    }
}

fn cost(content: &Content) -> u64 {
    ENTRY_COST
        + match content {
            Content::Data(d) => d.len() as u64,
            _ => 0,
        }
}

/// Lays `content` over `[start, end)`, trimming whatever it covers.
fn overwrite(map: &mut BTreeMap<u64, (u64, Content)>, start: u64, end: u64, content: Content) {
    let covered: Vec<u64> = map
        .range(..end)
        .rev()
        .take_while(|(_, (e, _))| *e > start)
        .map(|(s, _)| *s)
        .collect();
    for s in covered {
        let (e, old) = map.remove(&s).expect("listed above");
        if s < start {
            map.insert(s, (start, old.slice(0, start - s)));
        }
        if e > end {
            map.insert(end, (e, old.slice(end - s, e - s)));
        }
    }
    map.insert(start, (end, content));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(byte: u8, len: usize) -> Content {
        Content::Data(Bytes::from(vec![byte; len]))
    }

    #[test]
    fn check_notices_a_wrong_total_and_entries_outside_the_generations() {
        let mut w = DirtyWindow::default();
        w.acknowledged(0, 1, 0, 8, data(b'A', 8));
        w.acknowledged(0, 2, 8, 8, data(b'B', 8));
        w.check().unwrap();
        w.bytes += 1;
        assert!(w.check().unwrap_err().contains("bytes"));
        w.bytes -= 1;
        let gen = w.gen;
        let entry = w.entries.values_mut().next().unwrap();
        entry.gen = gen + 1;
        assert!(
            w.check().unwrap_err().contains("generation"),
            "from the future"
        );
        let entry = w.entries.values_mut().next().unwrap();
        entry.gen = 0;
        assert!(
            w.check().unwrap_err().contains("generation"),
            "never counted"
        );
    }

    #[test]
    fn a_flush_covers_what_executed_before_what_it_covers() {
        let mut w = DirtyWindow::default();
        // The server ran B (seq 1) then A (seq 2) on one range; A's answer
        // came first, then a FLUSH was sent, then B's answer.
        w.acknowledged(0, 2, 0, 8, data(b'A', 8));
        let flush_gen = w.gen();
        w.acknowledged(0, 1, 0, 8, data(b'B', 8));
        w.flushed(flush_gen, true);
        // B executed before A, which the FLUSH covered: both are durable,
        // and replaying B would put it over A.
        assert!(w.take_replay(Vec::new()).is_empty());
        // A late answer below the durable point is not kept either.
        let mut w = DirtyWindow::default();
        w.acknowledged(0, 2, 0, 8, data(b'A', 8));
        let g = w.gen();
        w.flushed(g, true);
        w.acknowledged(0, 1, 0, 8, data(b'B', 8));
        assert!(w.is_empty());
        w.check().unwrap();
    }

    #[test]
    fn replay_follows_execution_order_and_durable_writes_mask_older_data() {
        let mut w = DirtyWindow::default();
        // Acknowledged out of execution order: seq 2 arrives first.
        w.acknowledged(0, 2, 4, 8, data(b'B', 8));
        w.acknowledged(0, 1, 0, 8, data(b'A', 8));
        w.acknowledged(0, 3, 10, 4, Content::Durable);
        w.acknowledged(0, 4, 14, 2, Content::Zero);
        assert_eq!(w.bytes(), 16 + 4 * ENTRY_COST);
        let ext = w.take_replay(vec![]);
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 0,
                    len: 4,
                    data: Some(Bytes::from(vec![b'A'; 4]))
                },
                Extent {
                    offset: 4,
                    len: 6,
                    data: Some(Bytes::from(vec![b'B'; 6]))
                },
                Extent {
                    offset: 14,
                    len: 2,
                    data: None
                },
            ]
        );
        assert!(w.is_empty());
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn flush_frees_only_what_it_covers() {
        let mut w = DirtyWindow::default();
        w.acknowledged(0, 1, 0, 4, data(1, 4));
        let gen = w.gen();
        w.acknowledged(0, 2, 8, 4, data(2, 4));
        w.flushed(gen, true);
        assert_eq!(w.bytes(), 4 + ENTRY_COST);
        assert_eq!(w.take_replay(vec![]).len(), 1);
    }
}
