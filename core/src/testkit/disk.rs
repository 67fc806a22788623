//! An in-memory disk with a volatile write cache over durable media, as a
//! real drive has: writes land in the cache, FLUSH or FUA makes them
//! durable, and power loss drops whatever was not.

use super::pattern::SECTOR;
use crate::server::BackendOp;
use crate::wire::Status;
use bytes::Bytes;
use std::collections::BTreeSet;

/// The disk.
#[derive(Debug, Clone)]
pub struct MemDisk {
    current: Vec<u8>,
    media: Vec<u8>,
    unflushed: BTreeSet<u64>,
    /// Byte ranges whose every access fails with a media error.
    pub bad_ranges: Vec<(u64, u64)>,
}

impl MemDisk {
    /// A zeroed disk of `size` bytes (a multiple of 512).
    pub fn new(size: u64) -> Self {
        MemDisk {
            current: vec![0; size as usize],
            media: vec![0; size as usize],
            unflushed: BTreeSet::new(),
            bad_ranges: Vec::new(),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.current.len() as u64
    }

    /// What a read would return now.
    pub fn current(&self) -> &[u8] {
        &self.current
    }

    /// What survives a power loss now.
    pub fn media(&self) -> &[u8] {
        &self.media
    }

    /// Sectors written but not yet durable.
    pub fn unflushed_sectors(&self) -> usize {
        self.unflushed.len()
    }

    fn bad(&self, offset: u64, len: u64) -> bool {
        self.bad_ranges
            .iter()
            .any(|(s, e)| offset < *e && *s < offset + len)
    }

    /// Performs one backend operation (already validated by the server).
    pub fn apply(&mut self, op: &BackendOp) -> Result<Bytes, Status> {
        match op {
            BackendOp::Read { offset, len } => {
                if self.bad(*offset, u64::from(*len)) {
                    return Err(Status::Io);
                }
                let s = *offset as usize;
                Ok(Bytes::copy_from_slice(&self.current[s..s + *len as usize]))
            }
            BackendOp::Write { offset, data, fua } => {
                if self.bad(*offset, data.len() as u64) {
                    return Err(Status::Io);
                }
                self.store(*offset, data, *fua);
                Ok(Bytes::new())
            }
            BackendOp::Trim { offset, len, fua }
            | BackendOp::WriteZeroes {
                offset, len, fua, ..
            } => {
                if self.bad(*offset, u64::from(*len)) {
                    return Err(Status::Io);
                }
                self.store(*offset, &vec![0; *len as usize], *fua);
                Ok(Bytes::new())
            }
            BackendOp::Flush => {
                for sector in std::mem::take(&mut self.unflushed) {
                    let s = sector as usize * SECTOR;
                    self.media[s..s + SECTOR].copy_from_slice(&self.current[s..s + SECTOR]);
                }
                Ok(Bytes::new())
            }
        }
    }

    fn store(&mut self, offset: u64, data: &[u8], fua: bool) {
        let s = offset as usize;
        self.current[s..s + data.len()].copy_from_slice(data);
        let sectors = offset / SECTOR as u64..(offset + data.len() as u64) / SECTOR as u64;
        if fua {
            self.media[s..s + data.len()].copy_from_slice(data);
            for sector in sectors {
                self.unflushed.remove(&sector);
            }
        } else {
            self.unflushed.extend(sectors);
        }
    }

    /// Power loss: the cache is gone.
    pub fn lose_power(&mut self) {
        self.current.copy_from_slice(&self.media);
        self.unflushed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flushed_or_fua_data_survives_power_loss() {
        let mut d = MemDisk::new(4 * SECTOR as u64);
        let w = |offset: u64, byte: u8, fua: bool| BackendOp::Write {
            offset,
            data: Bytes::from(vec![byte; SECTOR]),
            fua,
        };
        d.apply(&w(0, 1, false)).unwrap();
        d.apply(&BackendOp::Flush).unwrap();
        d.apply(&w(0, 2, false)).unwrap();
        d.apply(&w(512, 3, true)).unwrap();
        d.apply(&w(1024, 4, false)).unwrap();
        d.lose_power();
        assert_eq!(d.current()[0], 1);
        assert_eq!(d.current()[512], 3);
        assert_eq!(d.current()[1024], 0);
    }
}
