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
    /// Offset from the start of the region.
    pub offset: u64,
    /// Bytes asked for (the arena reserves it rounded up to [`ALIGN`]).
    pub len: u32,
}

impl Extent {
    fn reserved(&self) -> u64 {
        (self.len as u64).div_ceil(ALIGN) * ALIGN
    }
}

/// First-fit over free ranges kept merged, so freeing everything always
/// leaves one range the size of the region.
#[derive(Debug)]
pub struct Arena {
    capacity: u64,
    /// Free ranges: start -> length, never adjacent.
    free: BTreeMap<u64, u64>,
    in_use: u64,
    extents: usize,
}

impl Arena {
    /// An arena over `capacity` bytes (rounded down to [`ALIGN`]).
    pub fn new(capacity: u64) -> Arena {
        let capacity = capacity / ALIGN * ALIGN;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Arena {
            capacity,
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

    /// Whether `len` bytes could ever fit, however much is freed.
    pub fn fits_at_all(&self, len: u32) -> bool {
        len > 0 && (len as u64).div_ceil(ALIGN) * ALIGN <= self.capacity
    }

    /// Reserves `len` bytes (`len > 0`), or None while they do not fit.
    pub fn alloc(&mut self, len: u32) -> Option<Extent> {
        if len == 0 {
            return None;
        }
        let extent = Extent { offset: 0, len };
        let want = extent.reserved();
        let (&start, &size) = self.free.iter().find(|(_, &size)| size >= want)?;
        self.free.remove(&start);
        if size > want {
            self.free.insert(start + want, size - want);
        }
        self.in_use += want;
        self.extents += 1;
        Some(Extent { offset: start, len })
    }

    /// Returns an extent this arena handed out.
    pub fn free(&mut self, extent: Extent) {
        let mut start = extent.offset;
        let mut size = extent.reserved();
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
            steps in proptest::collection::vec((any::<bool>(), 1u32..40_000, any::<prop::sample::Index>()), 1..200)
        ) {
            let mut arena = Arena::new(64 * ALIGN);
            let mut held: Vec<Extent> = Vec::new();
            for (alloc, len, pick) in steps {
                if alloc || held.is_empty() {
                    if let Some(e) = arena.alloc(len) {
                        for h in &held {
                            let apart = e.offset + e.reserved() <= h.offset
                                || h.offset + h.reserved() <= e.offset;
                            prop_assert!(apart, "{e:?} overlaps {h:?}");
                        }
                        prop_assert_eq!(e.offset % ALIGN, 0);
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
            prop_assert!(arena.alloc(64 * ALIGN as u32).is_some());
        }
    }
}
