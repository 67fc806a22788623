//! Builds with debug assertions mark a fetch's destination before the
//! RDMA READ is posted and look for the marks when it completes: a fetch
//! that reports success with its data not (or not all) landed is named
//! where it happens, with its work request, instead of surfacing later as
//! a block stored at the wrong place. (Soft-RoCE under packet loss was
//! seen to complete fetches whose destination still held the bytes of the
//! buffer's previous use.) The payload CRC still refuses such data; the
//! marks say which layer lost it.

/// One mark per this many bytes: a sector, the smallest a fabric moves.
pub const MARK_EVERY: usize = 512;
const MAGIC: u64 = 0xb4a1_d0fe_7c4e_5a11;

/// The mark for work request `wr`: tied to the request, so the marks of
/// an earlier fetch into the same memory never count.
fn mark(wr: u64) -> [u8; 8] {
    (MAGIC ^ wr.rotate_left(17)).to_le_bytes()
}

/// Where, in a destination of `len` bytes, to put which mark.
pub fn marks(len: usize, wr: u64) -> impl Iterator<Item = (usize, [u8; 8])> {
    let m = mark(wr);
    (0..len)
        .step_by(MARK_EVERY)
        .filter(move |at| at + 8 <= len)
        .map(move |at| (at, m))
}

/// How many of the marks `marks(dest.len(), wr)` put are still there.
pub fn marks_left(dest: &[u8], wr: u64) -> usize {
    marks(dest.len(), wr)
        .filter(|(at, m)| dest[*at..*at + 8] == m[..])
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(len: usize, wr: u64) -> Vec<u8> {
        let mut dest = vec![0u8; len];
        for (at, m) in marks(len, wr) {
            dest[at..at + 8].copy_from_slice(&m);
        }
        dest
    }

    #[test]
    fn a_fetch_that_landed_leaves_no_mark() {
        let mut dest = marked(4096, 7);
        assert_eq!(marks_left(&dest, 7), 8);
        dest.copy_from_slice(&[0x5a; 4096]);
        assert_eq!(marks_left(&dest, 7), 0);
    }

    #[test]
    fn a_fetch_that_landed_in_part_leaves_the_rest_marked() {
        let mut dest = marked(8192, 7);
        dest[..4096].fill(1);
        assert_eq!(marks_left(&dest, 7), 8);
    }

    #[test]
    fn an_earlier_fetchs_marks_are_not_this_ones() {
        let dest = marked(4096, 7);
        assert_eq!(marks_left(&dest, 8), 0);
    }

    #[test]
    fn short_destinations_get_a_mark_where_one_fits() {
        assert_eq!(marks(7, 1).count(), 0);
        assert_eq!(marks(8, 1).count(), 1);
        assert_eq!(marks(520, 1).count(), 2);
        assert_eq!(marks(519, 1).count(), 1);
    }
}
