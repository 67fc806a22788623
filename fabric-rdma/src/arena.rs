//! Accounting of one registered memory region: which byte ranges carry a
//! payload in flight. The region is registered once, so no IO pays for
//! `ibv_reg_mr`; its size is the configured bound on registered memory.

use std::collections::BTreeMap;

/// Every extent starts on this boundary (a page: what the NIC and the
/// backend's O_DIRECT both like).
pub const ALIGN: u64 = 4096;

/// A byte range of the region, handed out by [`Arena::alloc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    /// Offset from the start of the region (page-aligned, after the
    /// arena's head room).
    pub offset: u64,
    /// Bytes asked for.
    pub len: u32,
}

/// First-fit over free ranges kept merged, so freeing everything always
/// leaves one range the size of the region.
#[derive(Debug)]
pub struct Arena {
    capacity: u64,
    /// Bytes reserved before every extent, so a frame's head can be put
    /// right in front of its payload and the two handed on as one buffer.
    head_room: u64,
    /// Free ranges: start -> length, never adjacent.
    free: BTreeMap<u64, u64>,
    in_use: u64,
    extents: usize,
}

impl Arena {
    /// An arena over `capacity` bytes (rounded down to [`ALIGN`]).
    pub fn new(capacity: u64) -> Arena {
        Arena::with_head_room(capacity, 0)
    }

    /// An arena that keeps `head_room` bytes (rounded up to [`ALIGN`]) free
    /// in front of every extent.
    pub fn with_head_room(capacity: u64, head_room: u64) -> Arena {
        let capacity = capacity / ALIGN * ALIGN;
        let head_room = head_room.div_ceil(ALIGN) * ALIGN;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Arena {
            capacity,
            head_room,
            free,
            in_use: 0,
            extents: 0,
        }
    }

    /// Bytes the region holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes reserved by extents not yet freed.
    pub fn in_use(&self) -> u64 {
        self.in_use
    }

    /// Bytes an extent of `len` takes from the region.
    fn reserved(&self, len: u32) -> u64 {
        self.head_room + (len as u64).div_ceil(ALIGN) * ALIGN
    }

    /// Whether `len` bytes could ever fit, however much is freed.
    pub fn fits_at_all(&self, len: u32) -> bool {
        len > 0 && self.reserved(len) <= self.capacity
    }

    /// Reserves `len` bytes (`len > 0`), or None while they do not fit.
    pub fn alloc(&mut self, len: u32) -> Option<Extent> {
        if len == 0 {
            return None;
        }
        let want = self.reserved(len);
        let (&start, &size) = self.free.iter().find(|(_, &size)| size >= want)?;
        self.free.remove(&start);
        if size > want {
            self.free.insert(start + want, size - want);
        }
        self.in_use += want;
        self.extents += 1;
        Some(Extent {
            offset: start + self.head_room,
            len,
        })
    }

    /// Returns an extent this arena handed out.
    pub fn free(&mut self, extent: Extent) {
        let mut start = extent.offset - self.head_room;
        let mut size = self.reserved(extent.len);
        debug_assert!(start + size <= self.capacity, "extent outside the arena");
        self.in_use -= size;
        self.extents -= 1;
        if let Some((&before, &before_size)) = self.free.range(..start).next_back() {
            debug_assert!(before + before_size <= start, "double free at {start}");
            if before + before_size == start {
                self.free.remove(&before);
                start = before;
                size += before_size;
            }
        }
        if let Some(after_size) = self.free.remove(&(start + size)) {
            size += after_size;
        }
        self.free.insert(start, size);
    }

    /// Verifies the accounting: free ranges are in bounds, apart and
    /// merged, and with the bytes in use they make up the region.
    pub fn check(&self) -> Result<(), String> {
        let mut end = 0;
        let mut free = 0;
        for (i, (&start, &size)) in self.free.iter().enumerate() {
            if size == 0 || start % ALIGN != 0 || size % ALIGN != 0 {
                return Err(format!("free range {start}+{size} empty or unaligned"));
            }
            if i > 0 && start <= end {
                return Err(format!(
                    "free range at {start} overlaps or touches the one before"
                ));
            }
            end = start + size;
            free += size;
        }
        if end > self.capacity {
            return Err(format!("free range ends at {end}, past {}", self.capacity));
        }
        if free + self.in_use != self.capacity {
            return Err(format!(
                "{free} free + {} in use != {} capacity",
                self.in_use, self.capacity
            ));
        }
        if (self.extents == 0) != (self.in_use == 0) {
            return Err(format!(
                "{} extents hold {} bytes",
                self.extents, self.in_use
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn freed_neighbours_merge_back_into_one_range() {
        let mut arena = Arena::new(4 * ALIGN);
        let a = arena.alloc(1).unwrap();
        let b = arena.alloc(ALIGN as u32 + 1).unwrap();
        let c = arena.alloc(ALIGN as u32).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, ALIGN, 3 * ALIGN));
        assert_eq!(arena.alloc(1), None, "full");
        arena.free(b);
        arena.free(a);
        arena.free(c);
        arena.check().unwrap();
        assert_eq!(arena.alloc(4 * ALIGN as u32).map(|e| e.offset), Some(0));
    }

    #[test]
    fn what_can_never_fit_is_told_apart_from_what_must_wait() {
        let mut arena = Arena::new(2 * ALIGN + 5);
        assert_eq!(arena.capacity(), 2 * ALIGN);
        assert!(arena.fits_at_all(2 * ALIGN as u32));
        assert!(!arena.fits_at_all(2 * ALIGN as u32 + 1));
        assert!(!arena.fits_at_all(0));
        let held = arena.alloc(ALIGN as u32).unwrap();
        assert_eq!(arena.alloc(2 * ALIGN as u32), None);
        arena.free(held);
        assert!(arena.alloc(2 * ALIGN as u32).is_some());
    }

    #[test]
    fn a_corrupt_count_is_caught_by_check() {
        let mut arena = Arena::new(8 * ALIGN);
        arena.alloc(100).unwrap();
        arena.check().unwrap();
        arena.in_use += 1;
        assert!(arena.check().is_err());
    }

    proptest! {
        #[test]
        fn extents_never_overlap_and_the_books_always_balance(
            room in prop::sample::select(vec![0u32, 1, 4096]),
            steps in proptest::collection::vec((any::<bool>(), 1u32..40_000, any::<prop::sample::Index>()), 1..200)
        ) {
            let mut arena = Arena::with_head_room(64 * ALIGN, room as u64);
            let mut held: Vec<Extent> = Vec::new();
            for (alloc, len, pick) in steps {
                if alloc || held.is_empty() {
                    if let Some(e) = arena.alloc(len) {
                        for h in &held {
                            let span = |x: &Extent| {
                                let start = x.offset - arena.head_room;
                                (start, start + arena.reserved(x.len))
                            };
                            let ((es, ee), (hs, he)) = (span(&e), span(h));
                            let apart = ee <= hs || he <= es;
                            prop_assert!(apart, "{e:?} overlaps {h:?}");
                        }
                        prop_assert_eq!(e.offset % ALIGN, 0);
                        prop_assert!(e.offset >= arena.head_room);
                        held.push(e);
                    }
                } else {
                    let e = held.swap_remove(pick.index(held.len()));
                    arena.free(e);
                }
                prop_assert!(arena.check().is_ok(), "{:?}", arena.check());
            }
            for e in held.drain(..) {
                arena.free(e);
            }
            prop_assert_eq!(arena.in_use(), 0);
            let whole = (64 * ALIGN - arena.head_room) as u32;
            prop_assert!(arena.alloc(whole).is_some());
        }
    }
}
