//! Self-describing sector contents: each written sector names the write it
//! came from, so a read can be checked sector by sector, and a sector mixing
//! two writes (or holding garbage) is recognised.

use bytes::{Bytes, BytesMut};

/// The checker's unit.
pub const SECTOR: usize = 512;

/// What a sector holds, as far as the checker can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectorContent {
    /// All zeroes (never written, trimmed or zeroed).
    Zero,
    /// Written by the write with this tag.
    Tag(u64),
    /// Neither: torn, corrupted, or from nowhere.
    Garbage,
}

fn filler(tag: u64, sector: u64) -> u8 {
    let x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sector.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    (x >> 56) as u8 | 1
}

/// Data for a write with `tag` (non-zero) covering sectors
/// `first..first + count`.
pub fn stamp(tag: u64, first: u64, count: u64) -> Bytes {
    assert!(tag != 0);
    let mut out = BytesMut::with_capacity(count as usize * SECTOR);
    for sector in first..first + count {
        let start = out.len();
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&sector.to_le_bytes());
        out.resize(start + SECTOR, filler(tag, sector));
    }
    out.freeze()
}

/// Classifies one sector's bytes, read from sector number `sector`.
pub fn sector_tag(bytes: &[u8], sector: u64) -> SectorContent {
    debug_assert_eq!(bytes.len(), SECTOR);
    if bytes.iter().all(|b| *b == 0) {
        return SectorContent::Zero;
    }
    let tag = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
    let at = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let fill = filler(tag, sector);
    if tag == 0 || at != sector || bytes[16..].iter().any(|b| *b != fill) {
        return SectorContent::Garbage;
    }
    SectorContent::Tag(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_classify_and_mixes_are_caught() {
        let a = stamp(7, 10, 2);
        assert_eq!(sector_tag(&a[..SECTOR], 10), SectorContent::Tag(7));
        assert_eq!(sector_tag(&a[SECTOR..], 11), SectorContent::Tag(7));
        assert_eq!(
            sector_tag(&a[..SECTOR], 11),
            SectorContent::Garbage,
            "wrong place"
        );
        let b = stamp(8, 10, 1);
        let mut mixed = a[..SECTOR].to_vec();
        mixed[300..].copy_from_slice(&b[300..SECTOR]);
        assert_eq!(sector_tag(&mixed, 10), SectorContent::Garbage);
        assert_eq!(sector_tag(&[0; SECTOR], 3), SectorContent::Zero);
    }
}
