//! Checksums of an export's 4 KiB blocks, kept from one large read to the
//! next. A reply that leaves by `sendfile` still needs the payload's
//! CRC32C, and reading the data only to hash it was most of the server's
//! cost of a cached 1 MiB read (the copy into a scratch buffer, then the
//! pass). A read whose blocks were all hashed before is answered by
//! combining their checksums, without touching the data.
//!
//! A stored checksum must never outlive the bytes it describes, yet a
//! write may land while a read is hashing. Every change to the export
//! (write, TRIM, zeroing) drops the checksums of its range and moves the
//! export's epoch on, both when it starts and when it has finished; a read
//! keeps what it hashed only if the epoch did not move while it read. A
//! checksum that is wrong anyway (the file written behind braid's back) is
//! no silent corruption: the client finds the payload damaged and asks
//! again, and a read asked for again is answered from memory.

use braid_core::wire::PayloadCrc;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

/// The unit checksums are kept for.
const BLOCK: u64 = 4096;
/// Blocks per entry of the map.
const REGION_BLOCKS: u64 = 256;
/// At most this many regions (4 GiB of data, about 4 MiB of memory); past
/// it the map starts over.
const MAX_REGIONS: usize = 4096;
/// Bytes read at a time to hash blocks not seen before: small enough to
/// stay in the core's cache between the read and the pass.
const PIECE: usize = 64 * 1024;

#[derive(Debug, Default)]
pub(crate) struct BlockCrcs {
    inner: Mutex<Inner>,
    /// Blocks whose kept checksum spared reading them.
    reused: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Moves on at the start and at the end of every change.
    epoch: u64,
    regions: HashMap<u64, Region>,
}

#[derive(Debug)]
struct Region {
    crc: [u32; REGION_BLOCKS as usize],
    known: [u64; REGION_BLOCKS as usize / 64],
}

impl Region {
    fn get(&self, i: usize) -> Option<u32> {
        (self.known[i / 64] & (1 << (i % 64)) != 0).then_some(self.crc[i])
    }
}

impl BlockCrcs {
    /// How many blocks a kept checksum spared reading.
    pub(crate) fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// `[offset, offset + len)` is about to change, or has just changed:
    /// call both times.
    pub(crate) fn changing(&self, offset: u64, len: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.epoch += 1;
        if len == 0 || inner.regions.is_empty() {
            return;
        }
        let first = offset / BLOCK;
        let end = offset.saturating_add(len).div_ceil(BLOCK);
        let (low, high) = (first / REGION_BLOCKS, (end - 1) / REGION_BLOCKS);
        let forget = |region: u64, r: &mut Region| {
            let base = region * REGION_BLOCKS;
            let from = first.max(base) - base;
            let to = end.min(base + REGION_BLOCKS) - base;
            for i in from as usize..to as usize {
                r.known[i / 64] &= !(1 << (i % 64));
            }
        };
        // A TRIM of a whole device spans billions of blocks: walk the
        // regions kept, not the range, when they are fewer.
        if high - low >= inner.regions.len() as u64 {
            inner.regions.retain(|&region, r| {
                if (low..=high).contains(&region) {
                    forget(region, r);
                }
                r.known.iter().any(|&w| w != 0)
            });
        } else {
            for region in low..=high {
                if let Some(r) = inner.regions.get_mut(&region) {
                    forget(region, r);
                }
            }
        }
    }

    /// The payload checksum of `len` bytes of `file` from `offset`: from
    /// the blocks' kept checksums where there are some, reading the rest.
    pub(crate) fn checksum(&self, file: &File, offset: u64, len: u32) -> io::Result<u32> {
        self.checksum_then(file, offset, len, || {})
    }

    /// [`BlockCrcs::checksum`], running `before_keeping` between hashing
    /// and keeping what it hashed (where a write may land).
    fn checksum_then(
        &self,
        file: &File,
        offset: u64,
        len: u32,
        before_keeping: impl FnOnce(),
    ) -> io::Result<u32> {
        if offset % BLOCK != 0 || u64::from(len) % BLOCK != 0 {
            return Self::read_and_hash(file, offset, len);
        }
        let first = offset / BLOCK;
        let count = u64::from(len) / BLOCK;
        let (epoch, mut crcs) = {
            let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let crcs: Vec<Option<u32>> = (first..first + count)
                .map(|b| {
                    let r = inner.regions.get(&(b / REGION_BLOCKS))?;
                    r.get((b % REGION_BLOCKS) as usize)
                })
                .collect();
            (inner.epoch, crcs)
        };
        let known = crcs.iter().filter(|c| c.is_some()).count();
        self.reused.fetch_add(known as u64, Ordering::Relaxed);
        let mut hashed = Vec::new();
        let mut at = 0;
        while at < crcs.len() {
            if crcs[at].is_some() {
                at += 1;
                continue;
            }
            let run = crcs[at..].iter().take_while(|c| c.is_none()).count();
            let from = first + at as u64;
            hash_blocks(file, from * BLOCK, run, |i, crc| {
                crcs[at + i] = Some(crc);
                hashed.push((from + i as u64, crc));
            })?;
            at += run;
        }
        let combined = crcs
            .iter()
            .fold(0, |acc, crc| after_a_block(acc) ^ crc.unwrap_or(0));
        before_keeping();
        if !hashed.is_empty() {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if inner.epoch == epoch {
                inner.keep(&hashed);
            }
        }
        Ok(combined)
    }
}

impl Inner {
    fn keep(&mut self, hashed: &[(u64, u32)]) {
        for &(block, crc) in hashed {
            let region = block / REGION_BLOCKS;
            if !self.regions.contains_key(&region) && self.regions.len() >= MAX_REGIONS {
                self.regions.clear();
            }
            let r = self.regions.entry(region).or_insert_with(|| Region {
                crc: [0; REGION_BLOCKS as usize],
                known: [0; REGION_BLOCKS as usize / 64],
            });
            let i = (block % REGION_BLOCKS) as usize;
            r.crc[i] = crc;
            r.known[i / 64] |= 1 << (i % 64);
        }
    }
}

/// Reads `blocks` whole blocks from `offset` and hands each block's
/// checksum to `each` with its index.
fn hash_blocks(
    file: &File,
    offset: u64,
    blocks: usize,
    mut each: impl FnMut(usize, u32),
) -> io::Result<()> {
    let mut index = 0;
    in_pieces(file, offset, blocks as u64 * BLOCK, |piece| {
        for block in piece.chunks_exact(BLOCK as usize) {
            let mut crc = PayloadCrc::new();
            crc.update(block);
            each(index, crc.finish());
            index += 1;
        }
    })
}

impl BlockCrcs {
    /// The checksum of `len` bytes of `file` from `offset`, read and
    /// hashed, nothing kept.
    pub(crate) fn read_and_hash(file: &File, offset: u64, len: u32) -> io::Result<u32> {
        let mut crc = PayloadCrc::new();
        in_pieces(file, offset, u64::from(len), |piece| crc.update(piece))?;
        Ok(crc.finish())
    }
}

/// Reads `len` bytes of `file` from `offset` into this thread's scratch
/// buffer, [`PIECE`] bytes at a time (whole blocks, since `PIECE` is a
/// multiple of [`BLOCK`]), handing each piece to `take`.
fn in_pieces(
    file: &File,
    mut offset: u64,
    len: u64,
    mut take: impl FnMut(&[u8]),
) -> io::Result<()> {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        buf.resize(PIECE, 0);
        let mut left = len;
        while left > 0 {
            let piece = &mut buf[..left.min(PIECE as u64) as usize];
            file.read_exact_at(piece, offset)?;
            take(piece);
            offset += piece.len() as u64;
            left -= piece.len() as u64;
        }
        Ok(())
    })
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// CRC32C (reflected, init and final XOR all ones) of `A ‖ B`, where `B`
/// is one block, is `after_a_block(crc(A)) ^ crc(B)`: the init and final
/// XOR cancel, and what remains is `crc(A)` carried through a block of
/// zero bits, a linear map. It is applied a byte of its input at a time
/// from tables built once.
fn after_a_block(crc: u32) -> u32 {
    let t = block_shift_tables();
    t[0][(crc & 0xff) as usize]
        ^ t[1][((crc >> 8) & 0xff) as usize]
        ^ t[2][((crc >> 16) & 0xff) as usize]
        ^ t[3][(crc >> 24) as usize]
}

fn block_shift_tables() -> &'static [[u32; 256]; 4] {
    static TABLES: OnceLock<Box<[[u32; 256]; 4]>> = OnceLock::new();
    TABLES.get_or_init(|| {
        // CRC32C's polynomial, reflected.
        const POLY: u32 = 0x82f6_3b78;
        let through_zeroes = |mut reg: u32| {
            for _ in 0..BLOCK * 8 {
                reg = (reg >> 1) ^ if reg & 1 != 0 { POLY } else { 0 };
            }
            reg
        };
        let columns: Vec<u32> = (0..32).map(|bit| through_zeroes(1 << bit)).collect();
        let mut tables = Box::new([[0u32; 256]; 4]);
        for (k, table) in tables.iter_mut().enumerate() {
            for (v, entry) in table.iter_mut().enumerate() {
                *entry = (0..8)
                    .filter(|j| v & (1 << j) != 0)
                    .fold(0, |acc, j| acc ^ columns[8 * k + j]);
            }
        }
        tables
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn crc_of(bytes: &[u8]) -> u32 {
        let mut crc = PayloadCrc::new();
        crc.update(bytes);
        crc.finish()
    }

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(bytes, 0).unwrap();
        (dir, f)
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    }

    #[test]
    fn combined_block_checksums_are_the_checksum_of_the_whole() {
        let bytes = data(40 * 4096, 7);
        let blocks: Vec<u32> = bytes.chunks(4096).map(crc_of).collect();
        let combined = blocks.iter().fold(0, |acc, c| after_a_block(acc) ^ c);
        assert_eq!(combined, crc_of(&bytes));
        assert_eq!(after_a_block(0), 0);
    }

    #[test]
    fn kept_checksums_answer_again_and_a_change_drops_them() {
        let mut bytes = data(1 << 20, 1);
        let (_dir, f) = file_of(&bytes);
        let crcs = BlockCrcs::default();
        let whole = crcs.checksum(&f, 0, 1 << 20).unwrap();
        assert_eq!(whole, crc_of(&bytes));
        let kept = crcs.inner.lock().unwrap().regions.len();
        assert_eq!(kept, 1, "256 blocks, one region");
        // A part of what was hashed, now answered from the map alone.
        assert_eq!(crcs.reused(), 0);
        assert_eq!(
            crcs.checksum(&f, 8192, 128 * 1024).unwrap(),
            crc_of(&bytes[8192..8192 + 128 * 1024])
        );
        assert_eq!(crcs.reused(), 32, "none of its 32 blocks read");

        // Written behind the map's back: the kept checksum is stale, which
        // is what the client's check then catches. Through `changing`, the
        // next read sees the new bytes.
        bytes[5000] ^= 0xff;
        f.write_all_at(&bytes[4096..8192], 4096).unwrap();
        assert_ne!(crcs.checksum(&f, 0, 1 << 20).unwrap(), crc_of(&bytes));
        crcs.changing(5000, 1);
        crcs.changing(5000, 1);
        assert_eq!(crcs.checksum(&f, 0, 1 << 20).unwrap(), crc_of(&bytes));
    }

    #[test]
    fn a_change_while_a_read_hashes_keeps_nothing() {
        let bytes = data(256 * 1024, 3);
        let (_dir, f) = file_of(&bytes);
        let crcs = BlockCrcs::default();
        let crc = crcs
            .checksum_then(&f, 0, 256 * 1024, || crcs.changing(1 << 30, 4096))
            .unwrap();
        assert_eq!(crc, crc_of(&bytes), "the answer itself is the data's");
        assert!(
            crcs.inner.lock().unwrap().regions.is_empty(),
            "a change anywhere in the export while hashing: nothing kept"
        );
        crcs.checksum_then(&f, 0, 256 * 1024, || {}).unwrap();
        assert_eq!(crcs.inner.lock().unwrap().regions.len(), 1);
    }

    #[test]
    fn a_change_forgets_exactly_the_blocks_it_touches() {
        let bytes = data(2 << 20, 5);
        let (_dir, f) = file_of(&bytes);
        let crcs = BlockCrcs::default();
        crcs.checksum(&f, 0, 2 << 20).unwrap();
        let known = |crcs: &BlockCrcs| -> u32 {
            let inner = crcs.inner.lock().unwrap();
            inner
                .regions
                .values()
                .map(|r| r.known.iter().map(|w| w.count_ones()).sum::<u32>())
                .sum()
        };
        assert_eq!(known(&crcs), 512);
        // Bytes 4095..4097 straddle blocks 0 and 1.
        crcs.changing(4095, 2);
        assert_eq!(known(&crcs), 510);
        // Across the two regions' boundary: blocks 255 and 256.
        crcs.changing((1 << 20) - 1, 2);
        assert_eq!(known(&crcs), 508);
        // A TRIM of a whole (huge) device, walked region by region kept.
        crcs.changing(0, 1 << 50);
        assert_eq!(known(&crcs), 0);
        assert!(crcs.inner.lock().unwrap().regions.is_empty());
    }

    #[test]
    fn ranges_not_of_whole_blocks_are_read_and_kept_nowhere() {
        let bytes = data(64 * 1024, 9);
        let (_dir, f) = file_of(&bytes);
        let crcs = BlockCrcs::default();
        assert_eq!(
            crcs.checksum(&f, 512, 8192).unwrap(),
            crc_of(&bytes[512..512 + 8192])
        );
        assert!(crcs.inner.lock().unwrap().regions.is_empty());
        assert!(
            crcs.checksum(&f, 60 * 1024, 8192).is_err(),
            "past the end of the file"
        );
    }
}
