//! The dirty-region log of one mirror leg: a bit per region that the leg
//! may lack writes to. A bit is set before a write to its region leaves
//! the client (write intent, as md's bitmap), stays set while the leg is
//! away, and is cleared only once the leg is known to hold the region
//! (every copy of every write to it acknowledged, or the region copied to
//! it by resync). A client that restarts reads the log back and resyncs
//! exactly the regions marked: nothing written in between can be lost
//! and nothing else is copied.

/// What a log file starts with.
const MAGIC: [u8; 4] = *b"BRDL";
const VERSION: u8 = 1;
/// magic, version, flags, 2 reserved, region size, volume size.
const HEADER: usize = 4 + 1 + 3 + 8 + 8;
/// Flag: the leg was behind the others when the log was stored, so its
/// marks are writes it missed; without it they are only write intent.
const FLAG_BEHIND: u8 = 1;

/// Regions of one leg that may be behind the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRegions {
    region: u64,
    volume_size: u64,
    words: Vec<u64>,
    dirty: usize,
    behind: bool,
}

impl DirtyRegions {
    /// A clean log for a volume of `volume_size` bytes in regions of
    /// `region` bytes (a power of two, at least 4 KiB).
    pub fn new(volume_size: u64, region: u64) -> Result<Self, String> {
        if !region.is_power_of_two() || region < 4096 {
            return Err(format!(
                "region size {region} is not a power of two of at least 4096"
            ));
        }
        let regions = volume_size.div_ceil(region);
        Ok(DirtyRegions {
            region,
            volume_size,
            words: vec![0; regions.div_ceil(64) as usize],
            dirty: 0,
            behind: false,
        })
    }

    /// Whether the leg is behind the others (away, suspended, resyncing):
    /// its marks are then writes it missed, which another leg holds. A
    /// leg in sync has only write-intent marks: after a client crash its
    /// bytes there are as good as any other leg's.
    pub fn behind(&self) -> bool {
        self.behind
    }

    /// Records whether the leg is behind (stored with the marks).
    pub fn set_behind(&mut self, behind: bool) {
        self.behind = behind;
    }

    /// Bytes per region.
    pub fn region_size(&self) -> u64 {
        self.region
    }

    /// Regions the volume has.
    pub fn regions(&self) -> u64 {
        self.volume_size.div_ceil(self.region)
    }

    /// Regions marked.
    pub fn dirty_count(&self) -> usize {
        self.dirty
    }

    /// The regions `[offset, offset + len)` touches.
    pub fn span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / self.region..(offset + len - 1) / self.region + 1
    }

    /// Marks every region the range touches; true if any was clean (the
    /// log must then reach stable storage before the write goes out).
    pub fn mark(&mut self, offset: u64, len: u64) -> bool {
        let mut changed = false;
        for r in self.span(offset, len) {
            let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
            if self.words[w] & bit == 0 {
                self.words[w] |= bit;
                self.dirty += 1;
                changed = true;
            }
        }
        changed
    }

    /// The leg holds region `r` again.
    pub fn clear(&mut self, r: u64) {
        let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
        if let Some(word) = self.words.get_mut(w) {
            if *word & bit != 0 {
                *word &= !bit;
                self.dirty -= 1;
            }
        }
    }

    /// Whether region `r` is marked.
    pub fn is_dirty(&self, r: u64) -> bool {
        self.words
            .get((r / 64) as usize)
            .is_some_and(|w| w & (1 << (r % 64)) != 0)
    }

    /// Marked regions in order, from `from` on.
    pub fn dirty_from(&self, from: u64) -> impl Iterator<Item = u64> + '_ {
        (from..self.regions()).filter(|r| self.is_dirty(*r))
    }

    /// The log as stored: header, bits, CRC32C of both.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + self.words.len() * 8 + 4);
        v.extend_from_slice(&MAGIC);
        v.push(VERSION);
        v.push(if self.behind { FLAG_BEHIND } else { 0 });
        v.extend_from_slice(&[0; 2]);
        v.extend_from_slice(&self.region.to_le_bytes());
        v.extend_from_slice(&self.volume_size.to_le_bytes());
        for w in &self.words {
            v.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Reads a stored log back, refusing a torn or foreign one (whose
    /// regions then cannot be trusted: the caller resyncs everything).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < HEADER + 4 {
            return Err(format!("dirty log of {} bytes is truncated", bytes.len()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err("dirty log checksum mismatch (torn write?)".into());
        }
        if body[..4] != MAGIC || body[4] != VERSION {
            return Err("not a braid dirty log (or a newer version)".into());
        }
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        let (region, volume_size) = (u64_at(8), u64_at(16));
        let mut log = DirtyRegions::new(volume_size, region)?;
        log.behind = body[5] & FLAG_BEHIND != 0;
        let words = &body[HEADER..];
        if words.len() != log.words.len() * 8 {
            return Err(format!(
                "dirty log holds {} bytes of bits, a volume of {volume_size} bytes needs {}",
                words.len(),
                log.words.len() * 8
            ));
        }
        for (i, w) in words.chunks_exact(8).enumerate() {
            log.words[i] = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        }
        let valid = log.regions();
        if log.words.iter().enumerate().any(|(i, w)| {
            let first = i as u64 * 64;
            (0..64).any(|b| w & (1 << b) != 0 && first + b >= valid)
        }) {
            return Err("dirty log marks regions past the end of the volume".into());
        }
        log.dirty = log.words.iter().map(|w| w.count_ones() as usize).sum();
        Ok(log)
    }
}

/// The logs a run of a volume starts from: each leg's as stored (`load`
/// gives its bytes by leg name), or `None` if no leg has one and no run
/// came before (a volume's first run). If runs came before (`restarted`)
/// but none stored a log, every leg's is clean: nothing was marked, so no
/// mirrored write went out, but a dead run's unmirrored writes may sit in
/// a leg's cache, and a restarted engine flushes them before it serves
/// them (a volume of plain exports never stores a log). A leg whose log
/// is unreadable, foreign (another region or volume size), or missing
/// while others are there is taken as knowing
/// nothing: every region marked and behind, so it is copied in full from
/// a leg whose log is sound, and never the one copied from while such a
/// leg exists. Also returns why each such leg's log was not used. A log
/// that could not be read at all (`load` errs) fails the whole load: only
/// a store that knows nothing was stored may say `None`.
pub fn logs_as_stored(
    legs: &[String],
    volume_size: u64,
    region: u64,
    restarted: bool,
    mut load: impl FnMut(&str) -> Result<Option<Vec<u8>>, String>,
) -> Result<(Option<Vec<DirtyRegions>>, Vec<String>), String> {
    let loaded: Vec<Option<Vec<u8>>> =
        legs.iter().map(|leg| load(leg)).collect::<Result<_, _>>()?;
    if loaded.iter().all(Option::is_none) {
        let clean = DirtyRegions::new(volume_size, region)?;
        let logs = restarted.then(|| vec![clean; legs.len()]);
        return Ok((logs, Vec::new()));
    }
    let mut unknown = Vec::new();
    let mut logs = Vec::with_capacity(legs.len());
    for (leg, bytes) in legs.iter().zip(loaded) {
        let why = match bytes.map(|b| DirtyRegions::decode(&b)) {
            Some(Ok(log)) if log.region == region && log.volume_size == volume_size => {
                logs.push(log);
                continue;
            }
            Some(Ok(log)) => format!(
                "its log is of regions of {} bytes over {} bytes, not {region} over {volume_size}",
                log.region, log.volume_size
            ),
            Some(Err(e)) => e,
            None => "it has no log, while other legs have".into(),
        };
        unknown.push(format!("leg {leg}: {why}"));
        let mut knows_nothing = DirtyRegions::new(volume_size, region)?;
        knows_nothing.mark(0, volume_size);
        knows_nothing.set_behind(true);
        logs.push(knows_nothing);
    }
    Ok((Some(logs), unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_clear_and_survive_a_round_trip() {
        let mut log = DirtyRegions::new((100 << 20) + 512, 1 << 20).unwrap();
        assert_eq!(log.regions(), 101);
        assert!(log.mark((1 << 20) - 512, 1024), "two regions, both new");
        assert!(!log.mark(1 << 20, 4096), "already marked");
        assert!(log.mark(100 << 20, 512), "the partial last region");
        assert_eq!(log.dirty_count(), 3);
        assert_eq!(log.dirty_from(0).collect::<Vec<_>>(), vec![0, 1, 100]);
        log.clear(1);
        log.clear(1);
        assert_eq!(log.dirty_count(), 2);
        let back = DirtyRegions::decode(&log.encode()).unwrap();
        assert_eq!(back, log);
        assert!(!back.behind());
        log.set_behind(true);
        assert!(DirtyRegions::decode(&log.encode()).unwrap().behind());
    }

    #[test]
    fn a_leg_without_a_sound_log_knows_nothing_unless_none_has_one() {
        let legs: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let (size, region) = (64 << 20, 1 << 20);
        let (logs, unknown) = logs_as_stored(&legs, size, region, false, |_| Ok(None)).unwrap();
        assert!(logs.is_none() && unknown.is_empty(), "a first run");
        let (logs, _) = logs_as_stored(&legs, size, region, true, |_| Ok(None)).unwrap();
        let logs = logs.expect("a restart, if none stored a log");
        assert!(logs.iter().all(|l| l.dirty_count() == 0 && !l.behind()));
        let mut sound = DirtyRegions::new(size, region).unwrap();
        sound.mark(3 << 20, 1);
        let mut torn = sound.encode();
        torn[HEADER] ^= 1;
        let foreign = DirtyRegions::new(size, region * 2).unwrap().encode();
        let (logs, unknown) = logs_as_stored(&legs, size, region, false, |leg| match leg {
            "a" => Ok(Some(sound.encode())),
            "b" => Ok(Some(torn.clone())),
            "c" => Ok(Some(foreign.clone())),
            _ => Ok(None),
        })
        .unwrap();
        let logs = logs.expect("leg a has one");
        assert_eq!(logs[0], sound);
        for log in &logs[1..] {
            assert!(log.behind() && log.dirty_count() as u64 == log.regions());
        }
        assert_eq!(unknown.len(), 3);
        assert!(unknown[0].starts_with("leg b: ") && unknown[0].contains("checksum"));
        assert!(unknown[1].starts_with("leg c: ") && unknown[1].contains("2097152"));
        assert!(unknown[2].starts_with("leg d: ") && unknown[2].contains("no log"));
        let unreadable = logs_as_stored(&legs, size, region, false, |leg| match leg {
            "c" => Err("leg c: Input/output error".into()),
            _ => Ok(None),
        });
        assert_eq!(
            unreadable.unwrap_err(),
            "leg c: Input/output error",
            "not a first run: one log could not be read"
        );
    }

    #[test]
    fn a_torn_or_foreign_log_is_refused() {
        let mut log = DirtyRegions::new(1 << 30, 1 << 20).unwrap();
        log.mark(5 << 20, 1);
        let good = log.encode();
        let mut torn = good.clone();
        torn[HEADER] ^= 1;
        assert!(DirtyRegions::decode(&torn)
            .unwrap_err()
            .contains("checksum"));
        assert!(DirtyRegions::decode(&good[..10])
            .unwrap_err()
            .contains("truncated"));
        let mut foreign = good.clone();
        foreign[0] = b'X';
        let n = foreign.len() - 4;
        let crc = crc32c::crc32c(&foreign[..n]).to_le_bytes();
        foreign[n..].copy_from_slice(&crc);
        assert!(DirtyRegions::decode(&foreign)
            .unwrap_err()
            .contains("not a braid"));
        assert!(DirtyRegions::new(1 << 20, 3000).is_err());
    }
}
