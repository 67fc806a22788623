//! The volume engine: frontend IO in, IO for each leg's session out
//! (sans-IO, like the client engine each leg runs). It fans mutations out
//! to mirror legs and acknowledges at quorum, reads only from legs in sync
//! for the region, marks each leg's dirty-region log before a write leaves
//! (and has it made stable first), and resyncs a returning leg region by
//! region under a rate limit while IO goes on. docs/VOLUMES.md has the
//! design; this is its core.

use super::map::{Segment, VolumeMap};
use super::regions::DirtyRegions;
use crate::client::{IoErrorKind, IoRequest};
use crate::wire::Op;
use crate::Instant;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Where a leg stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegState {
    /// Holds every acknowledged write: reads may go here.
    InSync,
    /// Failed or unreachable: writes skip it (its log marks them).
    Away,
    /// Suspended by the operator: as `Away` until resumed.
    Suspended,
    /// Back, waiting for IO abandoned while it was away to finish before
    /// resync may start (a late copy must not land after a resync copy).
    Draining,
    /// Being copied to: regions below `cursor` are in sync.
    Resyncing {
        /// The first region not yet copied.
        cursor: u64,
    },
    /// Out of the map: migrated away from, or the target of a migration
    /// rolled back. No new IO goes here.
    Retired,
}

/// A leg being copied to a new export (`braid volume migrate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// The leg whose bytes move.
    pub from: usize,
    /// The new leg (the map's last leaf when it started).
    pub to: usize,
    /// `to` holds every byte and the driver is storing the map that names
    /// it instead of `from` ([`VolumeAction::StoreMap`]). From here on
    /// legs are treated as the map after the switch will treat them: a
    /// leg may leave only if another leg, not `from`, holds its bytes.
    pub switching: bool,
}

/// How far a switching migration is from asking for its map to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MapStore {
    /// The new leg's log says behind (it lags on a write acknowledged
    /// without it), or says in sync only in memory: no log store has
    /// begun since.
    AwaitingLog,
    /// This log generation records the new leg in sync.
    AwaitingStable(u64),
    /// [`VolumeAction::StoreMap`] was emitted.
    Requested,
}

/// What the engine asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeAction {
    /// Send `io` on leg `leg`'s session; answer with
    /// [`VolumeEngine::leg_complete`] and `token`. Each leg's IO must reach
    /// its session in the order the engine emits it: legs apply
    /// overlapping writes in arrival order, and two legs given them in
    /// different orders diverge.
    LegIo {
        /// Which leaf of the map.
        leg: usize,
        /// Names the IO in the answer.
        token: u64,
        /// The IO, in the leg's own offsets.
        io: IoRequest,
    },
    /// Make every leg's dirty log (`VolumeEngine::log`) stable, then call
    /// [`VolumeEngine::logs_stable`] with `generation`.
    PersistLogs {
        /// What the persisted logs include.
        generation: u64,
    },
    /// A frontend IO finished.
    Complete {
        /// The frontend's tag.
        user: u64,
        /// Read data, or why it failed.
        result: Result<Bytes, IoErrorKind>,
    },
    /// A migration's new leg holds every byte: durably store the
    /// volume's description naming leg `to` where it named `from` (so a
    /// restart opens the new leg), then call [`VolumeEngine::map_stored`].
    /// Until then writes go to both.
    StoreMap {
        /// The leg moved away from.
        from: usize,
        /// Its replacement.
        to: usize,
    },
    /// A leg changed state.
    LegChanged {
        /// Which leaf.
        leg: usize,
        /// Its new state.
        state: LegState,
    },
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Bytes per dirty-log region.
    pub region: u64,
    /// Resync bandwidth, bytes per second.
    pub resync_rate: u64,
    /// Largest IO sent to a leg (the legs' smallest max payload); frontend
    /// IO must not be larger.
    pub max_leg_io: u64,
    #[doc(hidden)]
    pub sabotage: VolumeSabotage,
}

/// Safety mechanisms tests switch off to show the checks notice.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeSabotage {
    /// Never mark the dirty-region log: a returning leg is copied nothing.
    pub no_dirty_log: bool,
    /// Read from any leg, in sync or not.
    pub no_in_sync_gate: bool,
    /// Send a mutation to one copy only.
    pub no_fan_out: bool,
    /// Send a FLUSH before mutations submitted earlier reach the legs.
    pub no_flush_barrier: bool,
    /// Answer a leg's media error or full disk as the IO's, as if no
    /// other leg held the bytes.
    pub no_error_failover: bool,
    /// On restart, serve from every leg at once: no FLUSH first makes
    /// what a dead run left in a leg's cache stable.
    pub no_settle: bool,
    /// Clear a quiet region's mark even if no FLUSH covered its writes,
    /// so a power cut after the client died can undo one leg's copy
    /// with no mark left to repair it.
    pub no_unflushed_marks: bool,
    /// Answer writes to a switching migration's old leg and FLUSHes
    /// while the old map is short, before the new map is stored: a
    /// restart on the old map can lose what they promised.
    pub no_old_map_hold: bool,
    /// While a migration switches over, acknowledge a quorum write on
    /// the word of a leg of the new map alone: a restart on the old map
    /// can trust a leg that lacks it.
    pub no_both_maps_vouch: bool,
    /// Store a leg's fall behind in the same log store as another leg's
    /// return, with no leg of its copy set clear in both that store and
    /// the one before: a store torn between the two can say every leg
    /// is behind.
    pub no_store_anchor: bool,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            region: 1 << 20,
            resync_rate: 64 << 20,
            max_leg_io: 1 << 20,
            sabotage: VolumeSabotage::default(),
        }
    }
}

#[derive(Debug)]
struct Leg {
    state: LegState,
    /// Its IO not yet answered, abandoned copies included.
    outstanding: usize,
    /// Part of a mirror (a single-copy leaf is never skipped).
    mirrored: bool,
    /// The sets of leaves holding the same bytes as this one (one set per
    /// distinct way the map pairs it).
    copy_sets: Vec<Vec<usize>>,
}

#[derive(Debug)]
enum PartState {
    /// Not started: its IO waits for a locked region, or is being set up.
    New,
    /// Marked; waiting for the logs of this generation to be stable.
    Persisting(u64),
    /// Waiting for a leg it may use (every copy away, or none readable).
    Stalled,
    /// Copies on the wire.
    Sent {
        acked: usize,
        needed: usize,
        /// Copies (legs) not yet answered and not abandoned.
        waiting: BTreeSet<usize>,
    },
    Done,
}

#[derive(Debug)]
struct Part {
    seg: Segment,
    state: PartState,
    /// For a read, the legs already tried.
    tried: BTreeSet<usize>,
    /// Counted in its IO's `unacked` as done.
    acknowledged: bool,
    /// Legs it made lagging (acknowledged without them) in `lagging`.
    lagging: Vec<usize>,
    /// For a read the last leg in sync failed: the error, its answer if
    /// no copy it has not tried is still in sync to catch up.
    failed: Option<IoErrorKind>,
}

#[derive(Debug)]
struct VolIo {
    user: u64,
    io: IoRequest,
    parts: Vec<Part>,
    /// Parts not yet acknowledged (quorum reached, or read done).
    unacked: usize,
    /// Parts not yet finished (every copy answered or abandoned).
    unfinished: usize,
    error: Option<IoErrorKind>,
    /// For a read, each part's data as it arrived (by part index).
    read: Vec<Option<Bytes>>,
    /// Regions this IO counts as busy in.
    regions: Vec<u64>,
    completed: bool,
    /// A FLUSH: the regions with unflushed writes when it was submitted
    /// (and their `unflushed` numbers), whose marks it may clear.
    covers: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Copy {
        io: u64,
        part: usize,
    },
    ResyncRead {
        run: u64,
        piece: usize,
    },
    ResyncWrite {
        run: u64,
        piece: usize,
    },
    Flush {
        io: u64,
    },
    /// A restarted client's FLUSH of a leg it trusts, before anything is
    /// read from or copied off that leg.
    Settle,
}

/// One region being copied to a leg.
#[derive(Debug)]
struct Resync {
    /// Numbers the copy, so answers from one given up are not taken for
    /// another's.
    run: u64,
    leg: usize,
    region: u64,
    /// (source leg, source offset, target offset, len, data once read).
    pieces: Vec<(usize, u64, u64, u64, Option<Bytes>)>,
    /// The volume ranges (offset, len) the pieces copy: where the region
    /// has a copy on the leg. Only mutations there wait for the copy. In
    /// a stripe (of mirrors, or with a leg moving) the rest of the region
    /// lies on other legs, whose IO must not wait for this leg's source.
    spans: Vec<(u64, u64)>,
    left: usize,
    started: bool,
}

impl Resync {
    /// Whether a mutation of `len` bytes at volume offset `offset` touches
    /// what this copy writes.
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.spans
            .iter()
            .any(|&(at, n)| offset < at + n && at < offset + len)
    }
}

/// An IO's parts under `map`: one region per part, since whether a leg
/// may take or serve a piece is decided per region, so no piece straddles
/// two. A FLUSH has none.
fn plan(map: &VolumeMap, io: &IoRequest, region: u64) -> Vec<Part> {
    if io.op == Op::Flush {
        return Vec::new();
    }
    map.map(io.offset, u64::from(io.len))
        .into_iter()
        .flat_map(|seg| split_at_regions(seg, io.offset, region))
        .map(|seg| Part {
            seg,
            state: PartState::New,
            tried: BTreeSet::new(),
            failed: None,
            acknowledged: false,
            lagging: Vec::new(),
        })
        .collect()
}

/// Cuts a segment of an IO at `offset` where volume regions end.
fn split_at_regions(seg: Segment, offset: u64, region: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let (mut at, end) = (seg.at, seg.at + seg.len);
    while at < end {
        let volume = offset + at;
        let len = (region - volume % region).min(end - at);
        let delta = at - seg.at;
        out.push(Segment {
            at,
            len,
            copies: seg
                .copies
                .iter()
                .map(|c| super::map::Copy {
                    leaf: c.leaf,
                    offset: c.offset + delta,
                })
                .collect(),
            quorum: seg.quorum,
        });
        at += len;
    }
    out
}

/// A read's data from its parts' answers: a part that is the whole IO is
/// handed on as it arrived, else the parts are laid out in one buffer.
/// Copying every read into a zeroed buffer cost a mirror's `braid attach`
/// 23% of its CPU on 1 MiB reads (perf: memset 8%, memmove 15%).
fn assemble_read(len: usize, parts: &[Part], mut pieces: Vec<Option<Bytes>>) -> Bytes {
    if let [Some(whole)] = pieces.as_slice() {
        if whole.len() == len {
            return pieces.pop().flatten().expect("one piece");
        }
    }
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_unstable_by_key(|&p| parts[p].seg.at);
    let mut buf = bytes::BytesMut::with_capacity(len);
    for p in order {
        let Some(data) = pieces[p].take() else {
            continue;
        };
        let at = (parts[p].seg.at as usize).min(len);
        if buf.len() < at {
            // Not reached by a well-formed answer; zeros, as a fresh buffer had.
            buf.resize(at, 0);
        }
        buf.truncate(at);
        buf.extend_from_slice(&data[..data.len().min(len - at)]);
    }
    buf.resize(len, 0);
    buf.freeze()
}

/// Per leaf of `map`, the sets of leaves holding the same bytes (one per
/// distinct way the map pairs it; none for a leaf that is the only copy).
fn copy_sets(map: &VolumeMap) -> Vec<BTreeSet<Vec<usize>>> {
    let mut sets = vec![BTreeSet::new(); map.leaves().len()];
    for seg in map.map(0, map.size()) {
        if seg.copies.len() > 1 {
            let set: Vec<usize> = seg.copies.iter().map(|c| c.leaf).collect();
            for c in &seg.copies {
                sets[c.leaf].insert(set.clone());
            }
        }
    }
    sets
}

/// What the engine did, for status and the simulators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Times a leg was left behind (failed, unreachable or suspended).
    pub legs_left: u64,
    /// Regions copied to returning legs.
    pub regions_resynced: u64,
    /// Bytes copied doing so.
    pub bytes_resynced: u64,
    /// Migrations finished (the old leg retired).
    pub migrations: u64,
}

/// The volume engine.
#[derive(Debug)]
pub struct VolumeEngine {
    map: VolumeMap,
    config: VolumeConfig,
    legs: Vec<Leg>,
    logs: Vec<DirtyRegions>,
    ios: BTreeMap<u64, VolIo>,
    next_io: u64,
    tokens: BTreeMap<u64, (usize, Token)>,
    next_token: u64,
    /// Parts (io, part) in flight per region.
    busy: BTreeMap<u64, usize>,
    /// Regions being copied: new mutations of what the copy writes
    /// (`Resync::spans`) wait.
    locked: BTreeSet<u64>,
    /// IOs held (unmarked) because they touch what a copy writes, or an
    /// earlier read or mutation of theirs has not been answered.
    held: VecDeque<u64>,
    /// Logs changed since the last persist began.
    log_generation: u64,
    /// Regions whose latest write-intent mark is not yet known stable,
    /// with the log generation that records it. A write finding its
    /// region already marked must still wait for that generation (swarm
    /// seed 232: a write went out to one leg on a mark whose store was
    /// in flight, the client died before it landed, and the restart
    /// trusted both legs' older logs, which said the region was clean).
    marks_in_flight: BTreeMap<u64, u64>,
    persisting: Option<u64>,
    stable_generation: u64,
    /// The log generation recording the last mirrored leg that fell out
    /// of sync. No write or FLUSH is acknowledged before it is stable: a
    /// restarted client trusts a leg whose stored log does not say it was
    /// behind, so an acknowledged write it missed would be lost (madsim
    /// mirror-restart seed 103: a leg's disk filled under a write, the
    /// write was acknowledged from the others, the client died before the
    /// log said so, and the restart copied the leg's older data over).
    behind_generation: u64,
    /// Each leg's behind flag as of the last stable log store (as loaded,
    /// after a restart; every leg behind before a first run's first
    /// store, as nothing says otherwise).
    stored_behind: Vec<bool>,
    /// Each leg's behind flag in the store in flight, or last sent: what
    /// `log_to_store` writes. It can lag a flag set in memory (see
    /// `behind_deferred`).
    storing_behind: Vec<bool>,
    /// A leg fell behind whose flag the last store sent could not carry
    /// yet (see `image_to_store`): no write or FLUSH is acknowledged
    /// until a later store carries it.
    behind_deferred: bool,
    /// After a restart: the FLUSHes of trusted legs still outstanding.
    /// What the dead run wrote may sit in a trusted leg's cache; copied to
    /// the other legs and then lost to a power cut, it would leave the
    /// legs disagreeing with no mark to repair it. Until a mirrored leg's
    /// lands nothing is copied. An unmirrored leg settles too: read from
    /// its cache and then lost to a power cut, a dead run's write would
    /// be seen and then unseen (swarm seed 11909). Either holds only the
    /// IO to bytes it holds a copy of: the other legs' bytes have nothing
    /// to wait for (madsim migrate-restart seed 958: an export that began
    /// to move while it settled held up the mirror beside it too).
    settling: BTreeSet<u64>,
    /// User IO submitted while settling, in order.
    parked: VecDeque<(u64, IoRequest)>,
    resync: Option<Resync>,
    resync_runs: u64,
    resync_not_before: Instant,
    migration: Option<Migration>,
    /// Where a switching migration is on the way to storing its map. The
    /// map is stored only once a log store recording the new leg in sync
    /// is stable: the new leg's log starts out saying behind, and a
    /// restart on the new map that found every leg of a copy set behind
    /// trusted the first, an away leg lacking acknowledged writes (swarm
    /// seed 8359).
    map_store: Option<MapStore>,
    /// A switching migration's old leg left while no other leg of the old
    /// map held its bytes in sync: until the new map is stored, its log
    /// keeps saying it is not behind and the writes it misses are held
    /// (`old_map_short`). It holds every write acknowledged so far, and a
    /// restart on the old map must trust it: had its log said behind, as
    /// the other legs' did, the restart trusted the first, a leg away
    /// since before writes only the old and new legs took (swarm seed
    /// 8359, once the map store waited for the new leg's log).
    old_leg_kept: bool,
    /// A switching migration's old leg refused a write the new leg took
    /// while it could not leave (no other leg vouched for it yet): as
    /// with `old_leg_kept`, the old map lacks a write, so its writes and
    /// FLUSHes are held until the new map is stored (swarm seed 26548).
    old_leg_refused: bool,
    /// Legs reported failed while a migration switched that could not
    /// leave then (see `can_leave`): they leave once the new map is
    /// stored, if they still may, unless they came back meanwhile.
    failed_mid_switch: BTreeSet<usize>,
    /// (leg, region): acknowledged mutations the leg has not answered
    /// yet (quorum writes). Reads avoid such a leg for that region.
    lagging: BTreeMap<(usize, u64), usize>,
    /// Flushes waiting for any leg to be usable.
    stalled_flushes: Vec<u64>,
    /// FLUSHes waiting for mutations submitted before them to reach their
    /// legs' clients (held by a locked region or their log marks): a
    /// FLUSH covers every mutation submitted before it, as one export's
    /// client promises, and a leg's client covers only what it was given.
    barrier_flushes: Vec<u64>,
    /// Regions whose last writes completed but no FLUSH has covered yet,
    /// each with a number that changes on every such write. Their marks
    /// stay: if the client dies and a leg then loses power, the leg loses
    /// them, and only a mark makes the restart copy the region.
    unflushed: BTreeMap<u64, u64>,
    unflushed_seq: u64,
    /// The time of the latest input.
    now: Instant,
    stats: VolumeStats,
    /// The leg that answered FENCED: a newer run of this volume holds it,
    /// and this run sends nothing more to any leg (`fence`).
    fenced: Option<usize>,
    actions: VecDeque<VolumeAction>,
}

impl VolumeEngine {
    /// An engine over `map`, every leg in sync, logs clean. `logs` from a
    /// previous run (read back from stable storage) may be given per leg;
    /// their marks make those legs resync before they serve reads.
    pub fn new(
        map: VolumeMap,
        config: VolumeConfig,
        logs: Option<Vec<DirtyRegions>>,
    ) -> Result<Self, String> {
        let n = map.leaves().len();
        let copy_sets = copy_sets(&map);
        let mirrored: Vec<bool> = copy_sets.iter().map(|s| !s.is_empty()).collect();
        let restarted = logs.is_some();
        let logs = match logs {
            Some(l) if l.len() == n => l,
            Some(l) => return Err(format!("{} logs for {n} legs", l.len())),
            None => (0..n)
                .map(|_| DirtyRegions::new(map.size(), config.region))
                .collect::<Result<_, _>>()?,
        };
        let stored_behind: Vec<bool> = logs.iter().map(|l| !restarted || l.behind()).collect();
        let (logs, trusted, newly_behind) = Self::logs_for_this_run(logs, &copy_sets, &mirrored);
        let legs = (0..n)
            .map(|i| Leg {
                state: if logs[i].dirty_count() > 0 && mirrored[i] {
                    LegState::Resyncing { cursor: 0 }
                } else {
                    LegState::InSync
                },
                outstanding: 0,
                mirrored: mirrored[i],
                copy_sets: copy_sets[i].iter().cloned().collect(),
            })
            .collect();
        let mut engine = VolumeEngine {
            map,
            config,
            legs,
            logs,
            ios: BTreeMap::new(),
            next_io: 1,
            tokens: BTreeMap::new(),
            next_token: 1,
            busy: BTreeMap::new(),
            locked: BTreeSet::new(),
            held: VecDeque::new(),
            log_generation: u64::from(newly_behind),
            marks_in_flight: BTreeMap::new(),
            persisting: None,
            stable_generation: 0,
            behind_generation: u64::from(newly_behind),
            storing_behind: stored_behind.clone(),
            stored_behind,
            behind_deferred: false,
            settling: BTreeSet::new(),
            parked: VecDeque::new(),
            resync: None,
            resync_runs: 0,
            resync_not_before: Instant::ZERO,
            migration: None,
            map_store: None,
            old_leg_kept: false,
            old_leg_refused: false,
            failed_mid_switch: BTreeSet::new(),
            lagging: BTreeMap::new(),
            stalled_flushes: Vec::new(),
            barrier_flushes: Vec::new(),
            unflushed: BTreeMap::new(),
            unflushed_seq: 0,
            now: Instant::ZERO,
            stats: VolumeStats::default(),
            fenced: None,
            actions: VecDeque::new(),
        };
        engine.persist();
        if restarted && !engine.config.sabotage.no_settle {
            for leg in (0..n).filter(|&l| trusted[l] || !mirrored[l]) {
                let token = engine.issue(leg, Token::Settle, IoRequest::flush());
                engine.settling.insert(token);
            }
        }
        Ok(engine)
    }

    /// The legs' logs as this run starts from those of the last (fresh
    /// logs on a first start mark nothing), which legs it trusts as the
    /// source of their copy sets, and whether a leg starts behind that
    /// was not stored so.
    fn logs_for_this_run(
        mut logs: Vec<DirtyRegions>,
        copy_sets: &[BTreeSet<Vec<usize>>],
        mirrored: &[bool],
    ) -> (Vec<DirtyRegions>, Vec<bool>, bool) {
        let mut trusted = Self::trusted_after_restart(&logs, copy_sets, mirrored);
        // A source with marks may hold there what no other leg has (or
        // lack what one has: an unflushed write lost to a power cut while
        // no client was left to replay it). Its marks are copied to every
        // other leg of its set, whatever their own logs say, so the legs
        // agree on the source's version (madsim mirror-quorum seed 34: a
        // leg resynced before the crash kept a write the source lost).
        for set in copy_sets.iter().flatten().collect::<BTreeSet<_>>() {
            let sources: Vec<usize> = set.iter().copied().filter(|&l| trusted[l]).collect();
            for source in sources {
                let marked: Vec<u64> = logs[source].dirty_from(0).collect();
                if marked.is_empty() {
                    continue;
                }
                let size = logs[source].region_size();
                for &l in set.iter().filter(|&&l| l != source) {
                    for r in &marked {
                        logs[l].mark(r * size, 1);
                    }
                    trusted[l] = false;
                }
            }
        }
        // A leg this run starts behind must be stored as behind before any
        // write it misses is acknowledged, or the next restart could trust
        // it again.
        let mut newly_behind = false;
        for (i, log) in logs.iter_mut().enumerate() {
            if trusted[i] {
                // The source of its copy sets: its intent marks name
                // regions the others copy from it, not the other way.
                for r in log.dirty_from(0).collect::<Vec<_>>() {
                    log.clear(r);
                }
            }
            let behind = mirrored[i] && !trusted[i] && log.dirty_count() > 0;
            newly_behind |= behind && !log.behind();
            log.set_behind(behind);
        }
        (logs, trusted, newly_behind)
    }

    /// A settling FLUSH landed (or its leg left): run what no longer
    /// waits; the rest parks again, in order.
    fn settled(&mut self) {
        let now = self.now;
        for (user, io) in std::mem::take(&mut self.parked) {
            self.submit(user, io, now);
        }
        self.drive_resync();
    }

    fn settling_legs(&self) -> impl Iterator<Item = usize> + '_ {
        self.settling
            .iter()
            .filter_map(|t| self.tokens.get(t).map(|(l, _)| *l))
    }

    fn mirrored_settling(&self) -> bool {
        self.settling_legs().any(|l| self.legs[l].mirrored)
    }

    /// Whether `io` must wait for settling FLUSHes: one whose bytes a leg
    /// still settling holds a copy of (a FLUSH reaches every leg), or
    /// that overlaps an IO parked before it.
    fn must_park(&self, io: &IoRequest, parts: &[Part]) -> bool {
        if self.settling.is_empty() {
            return false;
        }
        if io.op == Op::Flush {
            return true;
        }
        let settling: BTreeSet<usize> = self.settling_legs().collect();
        let reaches_settling = parts
            .iter()
            .any(|p| p.seg.copies.iter().any(|c| settling.contains(&c.leaf)));
        let end = io.offset + u64::from(io.len);
        // Nothing need wait for a parked FLUSH: it covers only what was
        // answered before it, and covering more does no harm.
        reaches_settling
            || self.parked.iter().any(|(_, p)| {
                p.op != Op::Flush && p.offset < end && io.offset < p.offset + u64::from(p.len)
            })
    }

    /// Which legs a restarted client trusts as they are. A leg whose log
    /// says it was behind copies its marked regions from a trusted leg. Of
    /// legs that were in sync, marks are only write intent: a write that
    /// may have been in flight when the client died, and whichever
    /// version a leg holds is acceptable (it was never acknowledged, or
    /// every leg had it). But the legs must agree, so in each copy set the
    /// first leg in sync is the source and the others with marks copy
    /// from it. If every leg of a set was behind (a log lost or torn), the
    /// first is trusted rather than none: a volume that never serves again
    /// helps no one.
    fn trusted_after_restart(
        logs: &[DirtyRegions],
        copy_sets: &[BTreeSet<Vec<usize>>],
        mirrored: &[bool],
    ) -> Vec<bool> {
        let n = logs.len();
        let sets: BTreeSet<&Vec<usize>> = copy_sets.iter().flatten().collect();
        let mut trusted: Vec<bool> = (0..n)
            .map(|i| !mirrored[i] || logs[i].dirty_count() == 0)
            .collect();
        for set in sets {
            if set.iter().any(|&l| trusted[l]) {
                continue;
            }
            let source = set
                .iter()
                .copied()
                .find(|&l| !logs[l].behind())
                .unwrap_or(set[0]);
            trusted[source] = true;
        }
        trusted
    }

    /// The map.
    pub fn map(&self) -> &VolumeMap {
        &self.map
    }

    /// Counters so far.
    pub fn stats(&self) -> VolumeStats {
        self.stats
    }

    /// The leg that answered FENCED, if one did: a newer run of this
    /// volume took it over, and every IO of this run fails from then on.
    pub fn fenced_by(&self) -> Option<usize> {
        self.fenced
    }

    /// Leg `leg`'s state.
    pub fn leg_state(&self, leg: usize) -> LegState {
        self.legs[leg].state
    }

    /// Leg `leg`'s dirty-region log (for persisting and status).
    pub fn log(&self, leg: usize) -> &DirtyRegions {
        &self.logs[leg]
    }

    /// Leg IO sent and not yet answered (a retired leg's session may close
    /// once this is zero).
    pub fn leg_outstanding(&self, leg: usize) -> usize {
        self.legs[leg].outstanding
    }

    /// The migration running, if any.
    pub fn migration(&self) -> Option<Migration> {
        self.migration
    }

    /// Starts copying leg `from` to the new export `name` (whose session
    /// is up and described it as `info`), while IO goes on: the new leg
    /// takes every write to a region already copied and is read from only
    /// once in sync. Returns the new leg's index. When it holds every byte
    /// the engine asks for the map to be stored ([`VolumeAction::StoreMap`])
    /// and, once it is, retires `from`.
    pub fn migrate(
        &mut self,
        from: usize,
        name: &str,
        info: super::map::LegInfo,
        now: Instant,
    ) -> Result<usize, String> {
        self.now = now;
        self.refuse_if_fenced()?;
        let old = &self.map.leaves()[from];
        if let Some(m) = self.migration {
            return Err(format!(
                "leg {} is already being migrated to {}",
                self.map.leaves()[m.from],
                self.map.leaves()[m.to]
            ));
        }
        if self.legs[from].state == LegState::Retired {
            return Err(format!("leg {old} is retired"));
        }
        let map = self
            .map
            .migrating(from, name, info)
            .map_err(|e| e.to_string())?;
        let to = map.leaves().len() - 1;
        let mut log = DirtyRegions::new(map.size(), self.logs[0].region_size())?;
        for seg in map.map(0, map.size()) {
            if seg.copies.iter().any(|c| c.leaf == from) {
                log.mark(seg.at, seg.len);
            }
        }
        log.set_behind(true);
        self.logs.push(log);
        self.stored_behind.push(true);
        self.storing_behind.push(true);
        self.legs.push(Leg {
            state: LegState::Resyncing { cursor: 0 },
            outstanding: 0,
            mirrored: true,
            copy_sets: Vec::new(),
        });
        self.map = map;
        self.refresh_copy_sets();
        self.migration = Some(Migration {
            from,
            to,
            switching: false,
        });
        self.actions.push_back(VolumeAction::LegChanged {
            leg: to,
            state: LegState::Resyncing { cursor: 0 },
        });
        self.drive_resync();
        Ok(to)
    }

    /// The map naming the new leg is stored: `from` retires, and the
    /// migration is done.
    pub fn map_stored(&mut self, now: Instant) {
        self.now = now;
        if self.fenced.is_some() {
            return;
        }
        let Some(m) = self.migration.filter(|m| m.switching) else {
            return;
        };
        self.migration = None;
        self.map_store = None;
        self.old_leg_kept = false;
        self.old_leg_refused = false;
        self.map = self.map.migration_ended(m.to);
        self.refresh_copy_sets();
        self.stats.migrations += 1;
        self.set_state(m.from, LegState::Retired);
        for leg in std::mem::take(&mut self.failed_mid_switch) {
            if self.legs[leg].state == LegState::InSync && self.can_leave(leg) {
                self.set_state(leg, LegState::Away);
            }
        }
        self.retry_stalled();
        self.finish_held();
    }

    /// Rolls a migration back before the switch: the new leg retires and
    /// `from` holds its bytes alone again, as before.
    pub fn cancel_migration(&mut self, now: Instant) -> Result<(), String> {
        self.now = now;
        self.refuse_if_fenced()?;
        let Some(m) = self.migration else {
            return Err("no migration is running".into());
        };
        if m.switching {
            return Err(format!(
                "the migration to {} is switching over: too late to cancel",
                self.map.leaves()[m.to]
            ));
        }
        self.migration = None;
        self.map = self.map.migration_ended(m.from);
        self.refresh_copy_sets();
        self.set_state(m.to, LegState::Retired);
        self.retry_stalled();
        Ok(())
    }

    /// Which legs are mirrored, and with whom, under the current map; and
    /// the IOs held since before it changed go where it says (held behind
    /// a read, a write would otherwise miss a leg a migration just added,
    /// whose copy of the region it does not wait for).
    fn refresh_copy_sets(&mut self) {
        let region = self.logs[0].region_size();
        for id in &self.held {
            let io = self.ios.get_mut(id).expect("held IOs are unanswered");
            io.parts = plan(&self.map, &io.io, region);
            let n = io.parts.len();
            (io.unacked, io.unfinished) = (n, n);
            if io.io.op == Op::Read {
                io.read = vec![None; n];
            }
        }
        let sets = copy_sets(&self.map);
        for (i, (leg, sets)) in self.legs.iter_mut().zip(sets).enumerate() {
            leg.mirrored = !sets.is_empty();
            leg.copy_sets = sets.into_iter().collect();
            if !leg.mirrored {
                // The only copy now: its marks (write intent from while it
                // had a second) mean nothing, and status would show them
                // as regions to copy.
                let log = &mut self.logs[i];
                for r in log.dirty_from(0).collect::<Vec<_>>() {
                    log.clear(r);
                }
            }
        }
    }

    /// The next action.
    pub fn poll_action(&mut self) -> Option<VolumeAction> {
        self.actions.pop_front()
    }

    /// When [`VolumeEngine::handle_timeout`] wants to run (resync pacing).
    pub fn poll_timeout(&self) -> Option<Instant> {
        // Not while settling: nothing may start then, and a deadline
        // already past would have the driver call back at once, forever
        // (`braid attach` restarted mid-resync spun so, starving the
        // answer that would have ended the settling).
        let waiting = self.resync.is_none()
            && self.fenced.is_none()
            && !self.mirrored_settling()
            && self
                .legs
                .iter()
                .any(|l| matches!(l.state, LegState::Resyncing { .. }));
        waiting.then_some(self.resync_not_before)
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.fenced.is_some() {
            return;
        }
        self.drive_resync();
    }

    /// A frontend IO. The caller checked range and alignment against the
    /// map's size and block size.
    pub fn submit(&mut self, user: u64, io: IoRequest, now: Instant) {
        self.now = now;
        if self.fenced.is_some() {
            self.actions.push_back(VolumeAction::Complete {
                user,
                result: Err(IoErrorKind::Fenced),
            });
            return;
        }
        debug_assert!(u64::from(io.len) <= self.config.max_leg_io);
        let parts = plan(&self.map, &io, self.logs[0].region_size());
        if self.must_park(&io, &parts) {
            self.parked.push_back((user, io));
            return;
        }
        let id = self.next_io;
        self.next_io += 1;
        let n = parts.len();
        let read = if io.op == Op::Read {
            vec![None; n]
        } else {
            Vec::new()
        };
        self.ios.insert(
            id,
            VolIo {
                user,
                io,
                parts,
                unacked: n,
                unfinished: n,
                error: None,
                read,
                regions: Vec::new(),
                completed: false,
                covers: Vec::new(),
            },
        );
        self.start(id);
    }

    /// Starts (or, after a lock, restarts) an IO.
    fn start(&mut self, id: u64) {
        let io = &self.ios[&id];
        let op = io.io.op;
        if op == Op::Flush {
            return self.start_flush(id);
        }
        if self.ordered_behind(id).is_some() {
            self.held.push_back(id);
            return;
        }
        if op.mutates() {
            let (offset, len) = (io.io.offset, u64::from(io.io.len));
            let copying = self
                .resync
                .as_ref()
                .is_some_and(|r| self.locked.contains(&r.region) && r.overlaps(offset, len));
            if copying {
                self.held.push_back(id);
                return;
            }
            let span = self.region_span(offset, len);
            let regions: Vec<u64> = span.collect();
            for r in &regions {
                *self.busy.entry(*r).or_default() += 1;
            }
            // Write intent on every mirrored copy's log; a mark must be
            // stable before the write leaves, a new one or one whose
            // store is still under way.
            let mut marked = false;
            let mut mirrored = Vec::new();
            let io = self.ios.get_mut(&id).expect("just looked up");
            for part in &io.parts {
                if part.seg.copies.len() < 2 || self.config.sabotage.no_dirty_log {
                    continue;
                }
                let (at, len) = (io.io.offset + part.seg.at, part.seg.len);
                for c in &part.seg.copies {
                    marked |= self.logs[c.leaf].mark(at, len);
                }
                mirrored.extend(self.logs[0].span(at, len));
            }
            io.regions = regions;
            let mut waits_for = mirrored
                .iter()
                .filter_map(|r| self.marks_in_flight.get(r).copied())
                .max()
                .unwrap_or(0);
            if marked {
                self.log_generation += 1;
                waits_for = self.log_generation;
                for r in mirrored {
                    self.marks_in_flight.insert(r, waits_for);
                }
            }
            if waits_for > self.stable_generation {
                for part in &mut io.parts {
                    part.state = PartState::Persisting(waits_for);
                }
                self.persist();
                return;
            }
        }
        for p in 0..self.ios[&id].parts.len() {
            self.send_part(id, p);
        }
    }

    fn region_span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        self.logs[0].span(offset, len)
    }

    fn persist(&mut self) {
        if self.persisting.is_none() && self.stable_generation < self.log_generation {
            let generation = self.log_generation;
            self.persisting = Some(generation);
            if let (Some(MapStore::AwaitingLog), Some(m)) = (self.map_store, self.migration) {
                if !self.logs[m.to].behind() {
                    self.map_store = Some(MapStore::AwaitingStable(generation));
                }
            }
            let (image, deferred) = self.image_to_store();
            self.storing_behind = image;
            self.actions
                .push_back(VolumeAction::PersistLogs { generation });
            if deferred {
                // Once this store is stable, the next can carry it.
                self.behind_deferred = true;
                self.log_generation += 1;
            } else if self.behind_deferred {
                self.behind_deferred = false;
                self.behind_generation = self.behind_generation.max(generation);
            }
        }
    }

    /// The behind flags the next log store carries: the flags in memory,
    /// except a leg fallen behind since the last stable store stays not
    /// behind where no leg of its copy set is clear both in that store
    /// and now. Each leg's log is its own file, and a store torn by a
    /// crash keeps any of them new and the others old; unless some leg
    /// is clear in both, the mix can say every leg is behind, and the
    /// restart then trusts the first, which may lack acknowledged writes
    /// (madsim migrate-quorum seeds 2208, 2330, 2952: a leg back in sync
    /// vouched for a quorum write the only leg clear before it lagged
    /// on, both in one store, and the tear kept the returning leg's old
    /// log beside the lagging leg's new one). A leg kept clear this way
    /// holds every acknowledged write: none is acknowledged without it
    /// until a store carries its flag (`behind_deferred`), and one can
    /// once this store, which makes the returning leg clear, is stable.
    /// A set with no leg clear now is stored as it is: nothing on it can
    /// be acknowledged, and holding every write of the volume for it
    /// would stop the other sets' too. Returns the flags, and whether
    /// any was kept back.
    fn image_to_store(&self) -> (Vec<bool>, bool) {
        let mut image: Vec<bool> = self.logs.iter().map(DirtyRegions::behind).collect();
        let mut deferred = false;
        if self.config.sabotage.no_store_anchor {
            return (image, deferred);
        }
        for set in self.sets_a_restart_may_open() {
            let clear_now = |l: usize| !self.logs[l].behind();
            let anchored = set.iter().any(|&l| clear_now(l) && !self.stored_behind[l]);
            if anchored || !set.iter().any(|&l| clear_now(l)) {
                continue;
            }
            for &l in &set {
                if !clear_now(l) && !self.stored_behind[l] {
                    image[l] = false;
                    deferred = true;
                }
            }
        }
        (image, deferred)
    }

    /// The copy sets a restart may find, each as it would: while a
    /// migration runs, the old map's (without the new leg), and once it
    /// switches the new map's too (without the old leg).
    fn sets_a_restart_may_open(&self) -> BTreeSet<Vec<usize>> {
        let mut views = BTreeSet::new();
        for set in self.legs.iter().flat_map(|l| &l.copy_sets) {
            let without = |gone: usize| set.iter().copied().filter(|&l| l != gone).collect();
            match self.migration {
                None => {
                    views.insert(set.clone());
                }
                Some(m) => {
                    views.insert(without(m.to));
                    if m.switching {
                        views.insert(without(m.from));
                    }
                }
            }
        }
        views
    }

    /// Leg `leg`'s log as the store in flight stores it (see
    /// `image_to_store`): the driver writes this, not `log`.
    pub fn log_to_store(&self, leg: usize) -> Vec<u8> {
        let mut log = self.logs[leg].clone();
        log.set_behind(self.storing_behind[leg]);
        log.encode()
    }

    /// The logs as of `generation` are stable.
    pub fn logs_stable(&mut self, generation: u64, now: Instant) {
        self.now = now;
        if self.fenced.is_some() || self.persisting != Some(generation) {
            return;
        }
        self.persisting = None;
        self.stable_generation = generation;
        self.stored_behind.clone_from(&self.storing_behind);
        self.marks_in_flight.retain(|_, g| *g > generation);
        if let (Some(MapStore::AwaitingStable(g)), Some(m)) = (self.map_store, self.migration) {
            if g <= generation {
                self.map_store = Some(MapStore::Requested);
                self.actions.push_back(VolumeAction::StoreMap {
                    from: m.from,
                    to: m.to,
                });
            }
        }
        if generation >= self.behind_generation {
            self.finish_held();
        }
        let ready: Vec<(u64, usize)> = self
            .ios
            .iter()
            .flat_map(|(id, io)| {
                io.parts.iter().enumerate().filter_map(move |(p, part)| {
                    matches!(part.state, PartState::Persisting(g) if g <= generation)
                        .then_some((*id, p))
                })
            })
            .collect();
        for (id, p) in ready {
            self.send_part(id, p);
        }
        self.persist();
    }

    /// Whether `leg` may receive a mutation to, or serve a read of,
    /// volume region `region`.
    fn usable(&self, leg: usize, region: u64) -> bool {
        match self.legs[leg].state {
            LegState::InSync => true,
            LegState::Resyncing { cursor } => region < cursor,
            LegState::Retired => false,
            _ => !self.legs[leg].mirrored,
        }
    }

    /// Whether `leg` may serve a read of volume region `region`. Not while
    /// it resyncs, even where it caught up: if the last in-sync copy then
    /// refuses a mutation the resyncing leg took, the volume goes back to
    /// the old bytes (`copy_done`), and a read must not have seen the new
    /// ones (found by the engine sweep, mirror seed 13 with regions of two
    /// leg IOs: a read saw write-zeroes land on the resyncing leg, the
    /// in-sync leg refused them, and the next read went back in time).
    fn readable(&self, leg: usize, region: u64) -> bool {
        !matches!(self.legs[leg].state, LegState::Resyncing { .. }) && self.usable(leg, region)
    }

    /// Starts the FLUSHes whose earlier mutations have all gone out.
    fn release_barrier_flushes(&mut self) {
        if self.barrier_flushes.is_empty() {
            return;
        }
        for id in std::mem::take(&mut self.barrier_flushes) {
            self.start_flush(id);
        }
    }

    /// Whether a copy of read part `part` that it has not tried is in
    /// sync: it can serve the read, now or once writes acknowledged
    /// without it (at quorum) land.
    fn untried_copy_in_sync(&self, part: &Part) -> bool {
        part.seg
            .copies
            .iter()
            .any(|c| !part.tried.contains(&c.leaf) && self.legs[c.leaf].state == LegState::InSync)
    }

    fn send_part(&mut self, id: u64, p: usize) {
        self.send_part_now(id, p);
        self.release_barrier_flushes();
    }

    fn send_part_now(&mut self, id: u64, p: usize) {
        let io = &self.ios[&id];
        let part = &io.parts[p];
        let start = io.io.offset + part.seg.at;
        let region_size = self.logs[0].region_size();
        let regions = start / region_size..=(start + part.seg.len - 1) / region_size;
        let (op, fua, no_unmap) = (io.io.op, io.io.fua, io.io.no_unmap);
        if op == Op::Read {
            // Every region the piece touches must be in sync on the leg.
            let choice = part
                .seg
                .copies
                .iter()
                .find(|c| {
                    !part.tried.contains(&c.leaf)
                        && (self.config.sabotage.no_in_sync_gate
                            || regions.clone().all(|r| {
                                self.readable(c.leaf, r) && !self.lagging.contains_key(&(c.leaf, r))
                            }))
                })
                .copied();
            let Some(c) = choice else {
                let catching_up = self.untried_copy_in_sync(part);
                let io = self.ios.get_mut(&id).unwrap();
                match io.parts[p].failed {
                    // No copy left to catch up: the failure stands.
                    Some(e) if !catching_up => {
                        io.error.get_or_insert(e);
                        io.parts[p].state = PartState::Sent {
                            acked: 0,
                            needed: 0,
                            waiting: BTreeSet::new(),
                        };
                        self.part_progress(id, p);
                    }
                    _ => io.parts[p].state = PartState::Stalled,
                }
                return;
            };
            let len = part.seg.len as u32;
            self.issue(
                c.leaf,
                Token::Copy { io: id, part: p },
                IoRequest::read(c.offset, len),
            );
            let part = &mut self.ios.get_mut(&id).unwrap().parts[p];
            part.tried.insert(c.leaf);
            part.state = PartState::Sent {
                acked: 0,
                needed: 1,
                waiting: [c.leaf].into(),
            };
            return;
        }
        let targets: Vec<_> = part
            .seg
            .copies
            .iter()
            .filter(|c| regions.clone().all(|r| self.usable(c.leaf, r)))
            .take(if self.config.sabotage.no_fan_out {
                1
            } else {
                usize::MAX
            })
            .copied()
            .collect();
        if targets.is_empty() {
            self.ios.get_mut(&id).unwrap().parts[p].state = PartState::Stalled;
            return;
        }
        let quorum = part.seg.quorum.unwrap_or(usize::MAX);
        let data = io.io.data.clone();
        let (at, len) = (part.seg.at as usize, part.seg.len as usize);
        let mut waiting = BTreeSet::new();
        for c in &targets {
            let leg_io = IoRequest {
                op,
                offset: c.offset,
                len: len as u32,
                fua,
                no_unmap,
                data: if op == Op::Write {
                    data.slice(at..at + len)
                } else {
                    Bytes::new()
                },
            };
            self.issue(c.leaf, Token::Copy { io: id, part: p }, leg_io);
            waiting.insert(c.leaf);
        }
        let needed = quorum.min(targets.len());
        self.ios.get_mut(&id).unwrap().parts[p].state = PartState::Sent {
            acked: 0,
            needed,
            waiting,
        };
    }

    fn issue(&mut self, leg: usize, what: Token, io: IoRequest) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.tokens.insert(token, (leg, what));
        self.legs[leg].outstanding += 1;
        self.actions
            .push_back(VolumeAction::LegIo { leg, token, io });
        token
    }

    fn start_flush(&mut self, id: u64) {
        let unsent_before = self.ios.range(..id).any(|(_, io)| {
            io.io.op.mutates()
                && io.parts.iter().any(|p| {
                    matches!(
                        p.state,
                        PartState::New | PartState::Persisting(_) | PartState::Stalled
                    )
                })
        });
        if unsent_before && !self.config.sabotage.no_flush_barrier {
            // Unanswered, and so not finished, while it waits.
            let io = self.ios.get_mut(&id).expect("submitted");
            (io.unacked, io.unfinished) = (1, 1);
            self.barrier_flushes.push(id);
            return;
        }
        let covers: Vec<(u64, u64)> = self.unflushed.iter().map(|(r, n)| (*r, *n)).collect();
        self.ios.get_mut(&id).expect("submitted").covers = covers;
        let legs: Vec<usize> = (0..self.legs.len())
            .filter(|l| match self.legs[*l].state {
                LegState::InSync | LegState::Resyncing { .. } => true,
                LegState::Retired => false,
                _ => !self.legs[*l].mirrored,
            })
            .collect();
        let io = self.ios.get_mut(&id).expect("submitted");
        io.unacked = legs.len();
        io.unfinished = legs.len();
        if legs.is_empty() {
            // Nothing usable: wait, as a disk would, for a leg to return.
            self.stalled_flushes.push(id);
            return;
        }
        for leg in legs {
            self.issue(leg, Token::Flush { io: id }, IoRequest::flush());
        }
    }

    /// A leg answered IO `token`.
    pub fn leg_complete(&mut self, token: u64, result: Result<Bytes, IoErrorKind>, now: Instant) {
        self.now = now;
        let Some((leg, what)) = self.tokens.remove(&token) else {
            return;
        };
        self.legs[leg].outstanding -= 1;
        if self.fenced.is_some() {
            return;
        }
        if matches!(result, Err(IoErrorKind::Fenced)) {
            self.fence(leg);
            return;
        }
        match what {
            Token::Copy { io, part } => self.copy_done(io, part, leg, result),
            Token::Flush { io } => {
                if let Some(v) = self.ios.get_mut(&io) {
                    if let Err(e) = result {
                        if self.legs[leg].mirrored {
                            self.set_state(leg, LegState::Away);
                        } else {
                            v.error.get_or_insert(e);
                        }
                    }
                    let v = self.ios.get_mut(&io).unwrap();
                    v.unacked -= 1;
                    v.unfinished -= 1;
                    self.finish_if_done(io);
                }
            }
            Token::ResyncRead { run, piece } => self.resync_read_done(run, piece, result),
            Token::ResyncWrite { run, .. } => self.resync_write_done(run, leg, result),
            Token::Settle => {
                // An error leaves the leg as it is: a FLUSH the backend
                // refused is the leg's own failure, as on one disk.
                self.settling.remove(&token);
                self.settled();
            }
        }
        if self.legs[leg].state == LegState::Draining && self.legs[leg].outstanding == 0 {
            self.set_state(leg, LegState::Resyncing { cursor: 0 });
            self.drive_resync();
        }
        // A lagging leg caught up, or a copy freed a read: retry waiters.
        self.retry_stalled();
    }

    /// Leg `leg`'s server answered FENCED: a newer run of this volume (the
    /// same owner at a higher epoch) holds it. Dropping only that leg, as
    /// for any other error, would let this run go on writing to the legs
    /// the newer run has not reached yet; the newer run's log knows
    /// nothing of those writes, so its resync would never repair them and
    /// the legs would disagree. So the whole run stops here: every IO not
    /// yet answered fails, as does every IO after it, and nothing more
    /// goes to any leg, logs included (the run they record is over).
    fn fence(&mut self, leg: usize) {
        self.fenced = Some(leg);
        for action in std::mem::take(&mut self.actions) {
            match action {
                VolumeAction::LegIo { leg: to, token, .. } => {
                    self.tokens.remove(&token);
                    self.legs[to].outstanding -= 1;
                }
                VolumeAction::PersistLogs { .. } | VolumeAction::StoreMap { .. } => {}
                kept @ (VolumeAction::Complete { .. } | VolumeAction::LegChanged { .. }) => {
                    self.actions.push_back(kept)
                }
            }
        }
        let unanswered = std::mem::take(&mut self.ios)
            .into_values()
            .filter(|io| !io.completed)
            .map(|io| io.user);
        let parked = std::mem::take(&mut self.parked)
            .into_iter()
            .map(|(user, _)| user);
        for user in unanswered.chain(parked).collect::<Vec<_>>() {
            self.actions.push_back(VolumeAction::Complete {
                user,
                result: Err(IoErrorKind::Fenced),
            });
        }
        self.busy.clear();
        self.locked.clear();
        self.held.clear();
        self.settling.clear();
        self.stalled_flushes.clear();
        self.barrier_flushes.clear();
        self.lagging.clear();
        self.resync = None;
        self.persisting = None;
    }

    /// Leg `leg`'s client was fenced while none of this engine's IO was
    /// on it (idle, or away): as if an IO had been answered FENCED.
    pub fn leg_fenced(&mut self, leg: usize) {
        if self.fenced.is_none() {
            self.fence(leg);
        }
    }

    /// An operator's command to a fenced run.
    fn refuse_if_fenced(&self) -> Result<(), String> {
        if self.fenced.is_some() {
            return Err("a newer run of this volume took it over: this run has stopped".into());
        }
        Ok(())
    }

    fn copy_done(&mut self, id: u64, p: usize, leg: usize, result: Result<Bytes, IoErrorKind>) {
        // A failing copy drops its leg only if the others hold its bytes;
        // the last copy's errors are the IO's, as a single disk's are.
        let sabotaged = self.config.sabotage.no_error_failover
            && matches!(result, Err(IoErrorKind::Media | IoErrorKind::NoSpace));
        let leave = self.can_leave(leg);
        let successor_takes_it = !leave && self.successor_takes_it(id, leg);
        // A read the last leg in sync failed, where another copy is in
        // sync but for writes acknowledged without it (at quorum) that
        // have not reached it yet: once they land it holds these bytes.
        let another_catching_up = self
            .ios
            .get(&id)
            .is_some_and(|io| io.io.op == Op::Read && self.untried_copy_in_sync(&io.parts[p]));
        let Some(io) = self.ios.get_mut(&id) else {
            return;
        };
        let is_read = io.io.op == Op::Read;
        let part = &mut io.parts[p];
        let mirrored = part.seg.copies.len() > 1;
        let every_copy_tried = part.seg.copies.iter().all(|c| part.tried.contains(&c.leaf));
        let PartState::Sent {
            acked,
            needed,
            waiting,
        } = &mut part.state
        else {
            return;
        };
        if !waiting.remove(&leg) {
            return; // abandoned when the leg went away
        }
        if result.is_err() {
            // The copies left make up the quorum, if they can.
            *needed = (*needed).min(*acked + waiting.len());
        }
        let mut leg_failed = false;
        match result {
            Ok(data) => {
                *acked += 1;
                if is_read {
                    io.read[p] = Some(data);
                }
            }
            Err(_) if mirrored && !is_read && part.acknowledged => {
                // A copy the write was acknowledged without (at quorum)
                // failed: the others hold it; this leg must not serve the
                // region until it is copied back, last in sync or not.
                leg_failed = true;
            }
            Err(e) if mirrored && leave => {
                leg_failed = true;
                if is_read && !every_copy_tried && !sabotaged {
                    // Another copy serves it; this leg resyncs later.
                    self.set_state(leg, LegState::Away);
                    return self.send_part(id, p);
                }
                // Sabotaged, the error is the IO's though another copy
                // holds the bytes (the leg still leaves, as it should).
                if *needed == 0 || sabotaged {
                    io.error.get_or_insert(e);
                }
            }
            Err(e) if successor_takes_it => {
                self.old_leg_refused = true;
                if sabotaged {
                    io.error.get_or_insert(e);
                }
            }
            // It waits for that copy (stalled until the writes land)
            // rather than fail: a single disk would have had one copy,
            // but this volume has another in a moment.
            Err(e) if another_catching_up => {
                part.failed = Some(e);
                return self.send_part(id, p);
            }
            Err(e) => {
                io.error.get_or_insert(e);
                *needed = 0;
                if mirrored && !is_read {
                    // The last copy in sync refused the write: the IO fails,
                    // and legs that took it must be copied back from this
                    // one, so every leg converges on the old bytes.
                    let others: Vec<usize> = part
                        .seg
                        .copies
                        .iter()
                        .map(|c| c.leaf)
                        .filter(|&l| l != leg)
                        .collect();
                    for other in others {
                        self.set_state(other, LegState::Away);
                    }
                }
            }
        }
        if leg_failed {
            self.set_state(leg, LegState::Away);
        }
        self.part_progress(id, p);
    }

    /// Whether a refusal of IO `id` by leg `leg`, which nothing lets it
    /// leave over, is a write a switching migration's new leg takes from
    /// it as the old one: the new leg holds it, the old leg is about to
    /// retire, and the write is answered once the new map is stored
    /// (`old_leg_refused`). Failing it instead, the new leg was sent away
    /// to be copied back from the old one, which then retired as the only
    /// copy in sync (swarm seed 26548: a quorum-1 mirror, the old leg's
    /// bad block refused a write the new leg, still catching up on writes
    /// acknowledged without it, had taken). The new leg is a copy of
    /// every byte the old one holds.
    fn successor_takes_it(&self, id: u64, leg: usize) -> bool {
        self.migration.is_some_and(|m| {
            m.switching
                && m.from == leg
                && self.legs[m.to].state == LegState::InSync
                && self.ios.get(&id).is_some_and(|io| io.io.op.mutates())
        })
    }

    /// Acknowledges and finishes a part as its copies answer.
    fn part_progress(&mut self, id: u64, p: usize) {
        let Some(vouched) = self.part_vouched(id, p) else {
            return;
        };
        let region_size = self.logs[0].region_size();
        let Some(io) = self.ios.get_mut(&id) else {
            return;
        };
        let offset = io.io.offset;
        let mutates = io.io.op.mutates();
        let part = &mut io.parts[p];
        let PartState::Sent {
            acked,
            needed,
            waiting,
        } = &part.state
        else {
            return;
        };
        let start = offset + part.seg.at;
        let regions = start / region_size..=(start + part.seg.len - 1) / region_size;
        let mut flagged = false;
        if *acked >= *needed && !part.acknowledged && vouched {
            part.acknowledged = true;
            io.unacked -= 1;
            // Acknowledged without these legs: reads avoid them here, and
            // their logs say they are behind (stored before the answer
            // goes out) until they have caught up.
            if mutates {
                part.lagging = waiting.iter().copied().collect();
                for &leg in &part.lagging {
                    for r in regions.clone() {
                        *self.lagging.entry((leg, r)).or_default() += 1;
                    }
                    if !self.logs[leg].behind() {
                        self.logs[leg].set_behind(true);
                        flagged = true;
                    }
                }
            }
        }
        // Legs that answered (or were abandoned) stop lagging.
        let still: Vec<usize> = part
            .lagging
            .iter()
            .copied()
            .filter(|l| waiting.contains(l))
            .collect();
        let mut caught_up = Vec::new();
        for leg in part.lagging.iter().filter(|l| !still.contains(l)) {
            for r in regions.clone() {
                let n = self.lagging.get_mut(&(*leg, r)).expect("counted");
                *n -= 1;
                if *n == 0 {
                    self.lagging.remove(&(*leg, r));
                }
            }
            caught_up.push(*leg);
        }
        part.lagging = still;
        let mut back_in_sync = false;
        for leg in caught_up {
            // Holds every write again: stored with the next log write (a
            // restart before that copies its marked regions, which costs
            // only time).
            if !Self::lags(&self.lagging, leg) && self.legs[leg].state == LegState::InSync {
                self.logs[leg].set_behind(false);
                back_in_sync = true;
            }
        }
        let finished = waiting.is_empty();
        if finished {
            if !part.acknowledged {
                part.acknowledged = true;
                io.unacked -= 1;
            }
            part.state = PartState::Done;
            io.unfinished -= 1;
        }
        if flagged {
            self.log_generation += 1;
            self.behind_generation = self.log_generation;
            self.persist();
        }
        if back_in_sync {
            self.store_new_leg_in_sync();
        }
        self.finish_if_done(id);
        if finished {
            // A copy waiting for this part's bytes may start.
            self.continue_resync();
        }
    }

    /// Whether part `p` of IO `id` may be acknowledged on the answers
    /// so far (`None`: it is not in flight). A write acknowledged at
    /// quorum, without the legs still writing it, needs a leg that
    /// answered and that no stored log calls behind: a restarted
    /// client trusts that one. Else it waits for every leg, as
    /// without a quorum. A switching migration's old leg vouches for
    /// no one, as in `can_leave`: it is about to retire, and if a leg
    /// the write went on without then failed it, the old leg would be
    /// the only one to hold it (swarm seed 827). Nor does the new leg
    /// vouch for the old one while no other leg of the old map could:
    /// a restart on the old map would find no leg that holds the
    /// write with a log that says so. And until the new map is stored
    /// a restart may open either map, so a leg of each must vouch:
    /// the new leg alone would leave the old map with every leg that
    /// lagged on this write behind, and a restart trusting the first
    /// of them (swarm seed 20548: a quorum-1 mirror, its one leg the
    /// old map trusted marked behind by this very write, and the
    /// restart read older data from a leg that had been away).
    fn part_vouched(&self, id: u64, p: usize) -> Option<bool> {
        let io = self.ios.get(&id)?;
        let part = &io.parts[p];
        let PartState::Sent { waiting, .. } = &part.state else {
            return None;
        };
        let mutates = io.io.op.mutates();
        let switching = self.migration.filter(|m| m.switching);
        let old_leg_unvouched = switching.is_some_and(|m| {
            waiting.contains(&m.from)
                && (self.old_leg_kept || !Self::old_map_covered(&self.legs, &self.logs, m))
        });
        let vouches_on_a_map_without = |left_out: Option<usize>| {
            part.seg.copies.iter().any(|c| {
                !waiting.contains(&c.leaf)
                    && Some(c.leaf) != left_out
                    && self.legs[c.leaf].state == LegState::InSync
                    && !self.logs[c.leaf].behind()
            })
        };
        Some(
            !mutates
                || waiting.is_empty()
                || (!old_leg_unvouched
                    && vouches_on_a_map_without(switching.map(|m| m.from))
                    && (self.config.sabotage.no_both_maps_vouch
                        || switching.is_none_or(|m| vouches_on_a_map_without(Some(m.to))))),
        )
    }

    /// Answers the IOs the legs have answered that were held back.
    fn finish_held(&mut self) {
        let held: Vec<u64> = self
            .ios
            .iter()
            .filter(|(_, io)| io.unacked == 0 && !io.completed)
            .map(|(id, _)| *id)
            .collect();
        for id in held {
            self.finish_if_done(id);
        }
    }

    /// While a migration switches, the stored map is the old one until
    /// the driver says the new one is stored, and a restart meanwhile
    /// opens the old one, without the new leg. If the old leg left
    /// meanwhile (suspended, failed, unreachable) and no other leg of the
    /// old map holds its bytes in sync, the writes to them it missed are
    /// held by the new leg alone: they are answered only once the new map
    /// is stored, while writes elsewhere go on (swarm seed 806: a linear
    /// volume's export moving, suspended while switching, and the client
    /// restarted on the old map). Returns that old leg, if so.
    ///
    /// Once that happens the writes stay held until the map is stored,
    /// even if another leg of the old map comes back in sync (see
    /// `old_leg_kept`).
    fn old_map_short(&self) -> Option<usize> {
        let m = self.migration.filter(|m| m.switching)?;
        let short = self.old_leg_kept
            || self.old_leg_refused
            || (self.legs[m.from].state != LegState::InSync
                && !Self::old_map_covered(&self.legs, &self.logs, m));
        short.then_some(m.from)
    }

    /// Whether every copy set of a switching migration's old leg has
    /// another leg of the old map in sync, whose log does not say behind.
    fn old_map_covered(legs: &[Leg], logs: &[DirtyRegions], m: Migration) -> bool {
        legs[m.from].copy_sets.iter().all(|set| {
            set.iter().any(|&l| {
                l != m.from && l != m.to && legs[l].state == LegState::InSync && !logs[l].behind()
            })
        })
    }

    fn finish_if_done(&mut self, id: u64) {
        let old_map_short = self.old_map_short();
        let Some(io) = self.ios.get_mut(&id) else {
            return;
        };
        // A FLUSH too: the old leg, away, is not flushed, and on the old
        // map its cache holds the only copy of writes acknowledged before
        // it left; a restart on that map after a power cut there would
        // lose writes this FLUSH had promised (swarm seed 6628).
        let only_on_the_new_map = !self.config.sabotage.no_old_map_hold
            && old_map_short.is_some_and(|from| {
                io.io.op == Op::Flush
                    || (io.io.op.mutates()
                        && io
                            .parts
                            .iter()
                            .any(|p| p.seg.copies.iter().any(|c| c.leaf == from)))
            });
        let durability = io.io.op.mutates() || io.io.op == Op::Flush;
        // Answered by the legs, held until the logs say which leg missed
        // it (see `behind_generation`); `logs_stable` comes back for it.
        // And held while only the map being stored holds it (see
        // `old_map_short`); `map_stored` comes back for it.
        let held = (durability
            && (self.stable_generation < self.behind_generation || self.behind_deferred))
            || only_on_the_new_map;
        // Answered: IOs ordered behind it may start.
        let mut answered = false;
        if io.unacked == 0 && !io.completed && !held {
            io.completed = true;
            answered = io.io.op != Op::Flush;
            let result = match io.error {
                Some(e) => Err(e),
                None if io.io.op == Op::Read => Ok(assemble_read(
                    io.io.len as usize,
                    &io.parts,
                    std::mem::take(&mut io.read),
                )),
                None => Ok(Bytes::new()),
            };
            self.actions.push_back(VolumeAction::Complete {
                user: io.user,
                result,
            });
        }
        if io.unfinished == 0 && io.completed {
            let io = self.ios.remove(&id).expect("present");
            if io.io.op == Op::Flush && io.error.is_none() {
                for (r, n) in &io.covers {
                    if self.unflushed.get(r) == Some(n) {
                        self.unflushed.remove(r);
                        if !self.busy.contains_key(r) {
                            self.region_quiet(*r);
                        }
                    }
                }
            }
            let durable = io.io.fua && io.error.is_none();
            for &r in &io.regions {
                if !durable && io.io.op.mutates() {
                    self.unflushed_seq += 1;
                    self.unflushed.insert(r, self.unflushed_seq);
                }
            }
            for r in io.regions {
                let n = self.busy.get_mut(&r).expect("counted");
                *n -= 1;
                if *n == 0 {
                    self.busy.remove(&r);
                    self.region_quiet(r);
                }
                if self.resync.as_ref().is_some_and(|x| x.region == r) {
                    self.continue_resync();
                }
            }
        }
        if answered && !self.held.is_empty() {
            self.release_held();
        }
    }

    /// No mutation is in flight in region `r`: legs that hold it lose
    /// their write-intent mark (lazily: a stale mark costs only a copy).
    fn region_quiet(&mut self, r: u64) {
        if self.unflushed.contains_key(&r) && !self.config.sabotage.no_unflushed_marks {
            return;
        }
        for leg in 0..self.legs.len() {
            let holds = match self.legs[leg].state {
                LegState::InSync => true,
                LegState::Resyncing { cursor } => r < cursor,
                _ => false,
            };
            if holds && self.legs[leg].mirrored {
                self.logs[leg].clear(r);
            }
        }
    }

    /// A switching migration's new leg holds every byte: store a log
    /// saying so, which its map store waits for.
    fn store_new_leg_in_sync(&mut self) {
        let Some(m) = self.migration else { return };
        if self.map_store == Some(MapStore::AwaitingLog) && !self.logs[m.to].behind() {
            self.log_generation += 1;
            self.persist();
        }
    }

    /// Whether `leg` still lacks a write acknowledged without it (a
    /// field borrow, as callers hold an IO mutably).
    fn lags(lagging: &BTreeMap<(usize, u64), usize>, leg: usize) -> bool {
        lagging.range((leg, 0)..(leg + 1, 0)).next().is_some()
    }

    fn set_state(&mut self, leg: usize, state: LegState) {
        // Retired is for good: answers to IO sent before may still fail.
        if self.legs[leg].state == state || self.legs[leg].state == LegState::Retired {
            return;
        }
        let was_in_sync = self.legs[leg].state == LegState::InSync;
        let old_leg = self
            .migration
            .filter(|m| m.switching && m.from == leg && self.legs[leg].mirrored);
        if let Some(m) = old_leg.filter(|_| state != LegState::Retired && !self.old_leg_kept) {
            self.old_leg_kept = was_in_sync
                && state != LegState::InSync
                && !Self::old_map_covered(&self.legs, &self.logs, m);
        }
        self.legs[leg].state = state;
        let keep_log = old_leg.is_some() && self.old_leg_kept;
        // A leg that comes back in sync while writes acknowledged without
        // it are still on their way to it stays behind until they land:
        // else it could vouch for a write only it holds while it lacks
        // one only another holds, and a failure then leaves no leg with
        // both (swarm seed 332: a resync finished under such a write,
        // and both legs of a quorum-1 mirror ended up away).
        let behind = state != LegState::InSync || Self::lags(&self.lagging, leg);
        if !keep_log {
            self.logs[leg].set_behind(self.legs[leg].mirrored && behind);
        }
        if was_in_sync && self.legs[leg].mirrored && state != LegState::InSync && !keep_log {
            self.log_generation += 1;
            self.behind_generation = self.log_generation;
            self.persist();
        }
        if state == LegState::InSync {
            self.store_new_leg_in_sync();
        }
        self.actions
            .push_back(VolumeAction::LegChanged { leg, state });
        if matches!(
            state,
            LegState::Away | LegState::Suspended | LegState::Retired
        ) {
            if state != LegState::Retired {
                self.stats.legs_left += 1;
            }
            self.abandon(leg);
            // A copy to or from it is given up (and tried again later):
            // its region must not stay locked while the leg is gone.
            let involved = self
                .resync
                .as_ref()
                .is_some_and(|r| r.leg == leg || r.pieces.iter().any(|p| p.0 == leg));
            if involved {
                let r = self.resync.take().expect("checked");
                self.locked.remove(&r.region);
                self.release_held();
            }
        }
    }

    /// Stops waiting for `leg`'s copies: parts complete on the others.
    fn abandon(&mut self, leg: usize) {
        self.abandon_settles(leg);
        let retired = self.legs[leg].state == LegState::Retired;
        self.abandon_flushes(leg, retired);
        self.abandon_parts(leg, retired);
        if retired {
            // Nothing out on it matters any more (the map no longer names
            // it, and its parts went elsewhere above): its session may
            // close now rather than wait on a server that may never
            // answer, and answers that still come are not ours.
            self.tokens.retain(|_, (l, _)| *l != leg);
            self.legs[leg].outstanding = 0;
        }
    }

    /// Drops leg `leg`'s settling FLUSHes: it is copied before it serves.
    fn abandon_settles(&mut self, leg: usize) {
        let settles: Vec<u64> = self
            .tokens
            .iter()
            .filter(|(t, (l, what))| {
                *l == leg && matches!(what, Token::Settle) && self.settling.contains(t)
            })
            .map(|(t, _)| *t)
            .collect();
        for token in &settles {
            self.tokens.remove(token);
            self.settling.remove(token);
            self.legs[leg].outstanding -= 1;
        }
        if !settles.is_empty() {
            self.settled();
        }
    }

    /// Drops the FLUSHes out on leg `leg`, a mirror's leg or
    /// `retired`: what it acknowledged is on the legs still in sync
    /// (they flush), and it is resynced before it serves again.
    /// Waiting would hold every FLUSH for as long as it is away (the
    /// soak saw a 10 s stall with a server down for 10 s). A retired
    /// leg's successor got every byte it held by FUA copies, or by
    /// writes sent to both, which later FLUSHes reach.
    fn abandon_flushes(&mut self, leg: usize, retired: bool) {
        let flushes: Vec<(u64, u64)> = self
            .tokens
            .iter()
            .filter_map(|(t, (l, what))| match what {
                Token::Flush { io } if *l == leg && (self.legs[leg].mirrored || retired) => {
                    Some((*t, *io))
                }
                _ => None,
            })
            .collect();
        for (token, io) in flushes {
            self.tokens.remove(&token);
            self.legs[leg].outstanding -= 1;
            if let Some(v) = self.ios.get_mut(&io) {
                v.unacked -= 1;
                v.unfinished -= 1;
                self.finish_if_done(io);
            }
        }
    }

    /// Goes on without leg `leg` in every part still waiting for it: a
    /// mirrored part's other copies make up its quorum, a read is re-sent
    /// elsewhere (`retired`: on the current map, as is a retired leg's
    /// read of a single copy).
    fn abandon_parts(&mut self, leg: usize, retired: bool) {
        let affected: Vec<(u64, usize)> = self
            .ios
            .iter()
            .flat_map(|(id, io)| {
                let read = io.io.op == Op::Read;
                io.parts
                    .iter()
                    .enumerate()
                    .filter_map(move |(p, part)| match &part.state {
                        PartState::Sent { waiting, .. }
                            if waiting.contains(&leg)
                                && (part.seg.copies.len() > 1 || retired && read) =>
                        {
                            Some((*id, p))
                        }
                        _ => None,
                    })
            })
            .collect();
        if retired {
            for &(id, p) in &affected {
                if self.ios[&id].io.op == Op::Read {
                    self.replan_on_current_map(id, p);
                }
            }
        }
        for (id, p) in affected {
            let io = self.ios.get_mut(&id).unwrap();
            let is_read = io.io.op == Op::Read;
            if let PartState::Sent {
                acked,
                needed,
                waiting,
            } = &mut io.parts[p].state
            {
                waiting.remove(&leg);
                *needed = (*needed).min(*acked + waiting.len()).max(1);
            }
            if is_read {
                // Re-sent elsewhere; the away leg's answer is ignored. It
                // left; it did not fail this read, so once back it may
                // serve it (else a read whose every copy left in turn
                // waits for ever, as when the last is retired).
                self.ios.get_mut(&id).unwrap().parts[p].tried.remove(&leg);
                let done = matches!(&self.ios[&id].parts[p].state, PartState::Sent { acked, .. } if *acked > 0);
                if !done {
                    self.send_part(id, p);
                    continue;
                }
            }
            self.part_progress(id, p);
        }
    }

    /// Gives a part the copies the current map names for its bytes. A
    /// read planned before a migration names only the leg that has since
    /// retired; its successor holds the same bytes at the same offsets
    /// (a migration keeps the map's shape), so the part stays one piece.
    /// Waiting on the retired leg instead would hang the read for good if
    /// that leg's server never answers again.
    fn replan_on_current_map(&mut self, id: u64, p: usize) {
        let io = &self.ios[&id];
        let seg = &io.parts[p].seg;
        let mut now = self.map.map(io.io.offset + seg.at, seg.len);
        debug_assert!(now.len() == 1 && now[0].len == seg.len, "{now:?}");
        if let [one] = now.as_mut_slice() {
            let part = &mut self.ios.get_mut(&id).unwrap().parts[p];
            part.seg.copies = std::mem::take(&mut one.copies);
            part.seg.quorum = one.quorum;
        }
    }

    /// Whether every byte `leg` holds is also on a leg in sync, so IO can
    /// go on without it. The last copy never leaves: IO waits on it (or
    /// fails with its errors), as on a single disk.
    fn can_leave(&self, leg: usize) -> bool {
        // While a migration switches, the stored map may already leave
        // the old leg out: it vouches for no one, or once it retires a
        // copy set could be left with no leg in sync (found by madsim:
        // the new leg's disk filled, the others left trusting the old
        // leg, and retiring it left nothing to copy from). And the stored
        // map may still be the old one, without the new leg: it vouches
        // for no leg of the old map but the old leg itself (whose writes
        // it missed wait for the new map, see `old_map_short`), or a
        // restart on the old map could trust a leg that missed a write
        // the leaving one held (swarm seed 2090).
        //
        // A leg out of sync (draining or resyncing) needs no one to vouch:
        // it serves no read, no write was acknowledged on it alone, and
        // its log already says it is behind (swarm seed 4067: mid-switch,
        // a resyncing leg's full disk was taken for the last copy's, and
        // every leg in sync was sent away to be copied back from it).
        if self.legs[leg].mirrored
            && matches!(
                self.legs[leg].state,
                LegState::Draining | LegState::Resyncing { .. }
            )
        {
            return true;
        }
        let switching = self.migration.filter(|m| m.switching);
        let vouches =
            |l: usize| switching.is_none_or(|m| l != m.from && (l != m.to || leg == m.from));
        self.legs[leg].mirrored
            && self.legs[leg].copy_sets.iter().all(|set| {
                set.iter().any(|&l| {
                    l != leg
                        && vouches(l)
                        && self.legs[l].state == LegState::InSync
                        && !self.logs[l].behind()
                })
            })
    }

    /// Leg `leg`'s session failed (or stayed down past the driver's
    /// patience). Its IO goes on without it if the others hold every byte.
    pub fn leg_failed(&mut self, leg: usize) {
        if self.fenced.is_some() {
            return;
        }
        if !matches!(self.legs[leg].state, LegState::Away | LegState::Suspended)
            && self.can_leave(leg)
        {
            self.set_state(leg, LegState::Away);
            // A read waiting for it to catch up fails now.
            self.retry_stalled();
        } else if self.migration.is_some_and(|m| m.switching) {
            self.failed_mid_switch.insert(leg);
        }
    }

    /// Leg `leg` is reachable again: resync what it missed.
    pub fn leg_returned(&mut self, leg: usize, now: Instant) {
        self.now = now;
        self.failed_mid_switch.remove(&leg);
        if self.fenced.is_some() || self.legs[leg].state != LegState::Away {
            return;
        }
        self.set_state(leg, LegState::Draining);
        if self.legs[leg].outstanding == 0 {
            self.set_state(leg, LegState::Resyncing { cursor: 0 });
        }
        self.drive_resync();
        self.retry_stalled();
    }

    /// The operator suspends leg `leg` (IO goes to the other legs).
    pub fn suspend(&mut self, leg: usize) -> Result<(), String> {
        self.refuse_if_fenced()?;
        if self.legs[leg].state == LegState::Retired {
            return Err(format!("leg {} is retired", self.map.leaves()[leg]));
        }
        if !self.legs[leg].mirrored {
            return Err(format!(
                "leg {} is not mirrored: suspending it would stop IO",
                self.map.leaves()[leg]
            ));
        }
        if !self.can_leave(leg) {
            return Err(format!(
                "leg {} holds bytes no leg in sync has",
                self.map.leaves()[leg]
            ));
        }
        self.set_state(leg, LegState::Suspended);
        self.retry_stalled();
        Ok(())
    }

    /// The operator resumes a suspended leg.
    pub fn resume(&mut self, leg: usize, now: Instant) {
        self.now = now;
        if self.fenced.is_none() && self.legs[leg].state == LegState::Suspended {
            self.legs[leg].state = LegState::Away;
            self.leg_returned(leg, now);
        }
    }

    fn retry_stalled(&mut self) {
        let stalled: Vec<(u64, usize)> = self
            .ios
            .iter()
            .flat_map(|(id, io)| {
                io.parts.iter().enumerate().filter_map(move |(p, part)| {
                    matches!(part.state, PartState::Stalled).then_some((*id, p))
                })
            })
            .collect();
        for (id, p) in stalled {
            self.send_part(id, p);
        }
        for id in std::mem::take(&mut self.stalled_flushes) {
            self.start_flush(id);
        }
    }

    fn drive_resync(&mut self) {
        let now = self.now;
        if self.resync.is_some() || now < self.resync_not_before || self.mirrored_settling() {
            return;
        }
        let Some((leg, cursor)) = self
            .legs
            .iter()
            .enumerate()
            .find_map(|(i, l)| match l.state {
                LegState::Resyncing { cursor } => Some((i, cursor)),
                _ => None,
            })
        else {
            return;
        };
        let Some(region) = self.logs[leg].dirty_from(cursor).next() else {
            self.set_state(leg, LegState::InSync);
            if let Some(m) = self
                .migration
                .as_mut()
                .filter(|m| m.to == leg && !m.switching)
            {
                m.switching = true;
                self.map_store = Some(MapStore::AwaitingLog);
                self.store_new_leg_in_sync();
            }
            self.retry_stalled();
            return self.drive_resync();
        };
        self.set_state(leg, LegState::Resyncing { cursor: region });
        self.locked.insert(region);
        let size = self.logs[leg].region_size();
        let (start, end) = (region * size, ((region + 1) * size).min(self.map.size()));
        // Never a switching migration's old leg that refused a write the
        // new leg took: it lacks that write until it retires (swarm seed
        // 48797: a resyncing leg copied its stale bytes, and once the old
        // leg retired served them as in sync).
        let refused_old_leg = self
            .migration
            .filter(|m| m.switching && self.old_leg_refused)
            .map(|m| m.from);
        let (mut pieces, mut spans) = (Vec::new(), Vec::new());
        for seg in self.map.map(start, end - start) {
            let Some(target) = seg.copies.iter().find(|c| c.leaf == leg) else {
                continue;
            };
            spans.push((start + seg.at, seg.len));
            let Some(source) = seg.copies.iter().find(|c| {
                c.leaf != leg
                    && Some(c.leaf) != refused_old_leg
                    && self.legs[c.leaf].state == LegState::InSync
                    && !self.lagging.contains_key(&(c.leaf, region))
            }) else {
                // No in-sync source now: look again in a while.
                self.locked.remove(&region);
                self.resync_not_before = now + Duration::from_millis(100);
                return;
            };
            let mut at = 0;
            while at < seg.len {
                let len = (seg.len - at).min(self.config.max_leg_io);
                pieces.push((
                    source.leaf,
                    source.offset + at,
                    target.offset + at,
                    len,
                    None,
                ));
                at += len;
            }
        }
        let left = pieces.len();
        self.resync_runs += 1;
        self.resync = Some(Resync {
            run: self.resync_runs,
            leg,
            region,
            pieces,
            spans,
            left,
            started: false,
        });
        self.continue_resync();
    }

    /// Whether a mutation already started is still writing what `r`
    /// copies. Only its parts there count: in a stripe, a write that also
    /// spans a leg that is down stays unanswered until that leg returns,
    /// and waiting for all of it held the copy, and with it the writes to
    /// the bytes the copy holds, on legs with nothing wrong (seed 191127
    /// of `striped-mirrors`: a mirror's own IO paused 1.8 s while the
    /// other mirror was cut off and a leg moved).
    fn mutation_under(&self, r: &Resync) -> bool {
        self.ios.values().any(|io| {
            !io.regions.is_empty()
                && io.parts.iter().any(|p| {
                    !matches!(p.state, PartState::Done)
                        && r.overlaps(io.io.offset + p.seg.at, p.seg.len)
                })
        })
    }

    /// Starts the copy once no mutation of what it copies is in flight.
    fn continue_resync(&mut self) {
        let Some(r) = &self.resync else { return };
        if r.started || self.mutation_under(r) {
            return;
        }
        if r.pieces.is_empty() {
            return self.resync_region_done();
        }
        let run = r.run;
        let reads: Vec<(usize, usize, u64, u64)> = r
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.0, p.1, p.3))
            .collect();
        self.resync.as_mut().unwrap().started = true;
        for (i, src, off, len) in reads {
            self.issue(
                src,
                Token::ResyncRead { run, piece: i },
                IoRequest::read(off, len as u32),
            );
        }
    }

    fn resync_read_done(&mut self, run: u64, piece: usize, result: Result<Bytes, IoErrorKind>) {
        let Some(r) = self.resync.as_mut().filter(|r| r.run == run) else {
            return;
        };
        match result {
            Ok(data) => {
                let (_, _, target_offset, _, slot) = &mut r.pieces[piece];
                *slot = Some(data.clone());
                let (leg, off) = (r.leg, *target_offset);
                self.issue(
                    leg,
                    Token::ResyncWrite { run, piece },
                    // FUA: the copy must outlast a power loss of the leg
                    // even if the client dies before the next FLUSH, since
                    // the leg's mark is cleared when the copy lands.
                    IoRequest::write(off, data, true),
                );
            }
            Err(_) => {
                // The source failed: give the region up for now.
                let r = self.resync.take().unwrap();
                self.locked.remove(&r.region);
                self.resync_not_before = self.now + Duration::from_millis(100);
                self.release_held();
            }
        }
    }

    fn resync_write_done(&mut self, run: u64, leg: usize, result: Result<Bytes, IoErrorKind>) {
        let Some(r) = self.resync.as_mut().filter(|r| r.run == run) else {
            return;
        };
        if result.is_err() {
            return self.set_state(leg, LegState::Away);
        }
        r.left -= 1;
        if r.left == 0 {
            self.resync_region_done();
        }
    }

    fn resync_region_done(&mut self) {
        let now = self.now;
        let r = self.resync.take().expect("a resync");
        self.stats.regions_resynced += 1;
        self.stats.bytes_resynced += r.pieces.iter().map(|p| p.3).sum::<u64>();
        self.logs[r.leg].clear(r.region);
        self.locked.remove(&r.region);
        self.set_state(
            r.leg,
            LegState::Resyncing {
                cursor: r.region + 1,
            },
        );
        let bytes: u64 = r.pieces.iter().map(|p| p.3).sum();
        let nanos = bytes.saturating_mul(1_000_000_000) / self.config.resync_rate.max(1);
        self.resync_not_before = now + Duration::from_nanos(nanos);
        self.release_held();
        self.retry_stalled();
        self.drive_resync();
    }

    /// An earlier IO that `id` must wait for. Overlapping reads and
    /// mutations run in the order they were submitted: otherwise a read
    /// may see a write a leg took first that then fails on the legs that
    /// count, and the data it saw is gone (seed 141285 of mirror-errors:
    /// the leg that served the read left, and the last in-sync leg's
    /// disk was full). And overlapping mutations start in that order,
    /// which is the order every leg's client keeps them in: one held
    /// (behind a read, or a copy) holds those after it too.
    fn ordered_behind(&self, id: u64) -> Option<u64> {
        let io = &self.ios[&id].io;
        let (offset, end, read) = (io.offset, io.offset + u64::from(io.len), io.op == Op::Read);
        self.ios
            .range(..id)
            .find(|(earlier, e)| {
                let overlaps = e.io.op != Op::Flush
                    && e.io.offset < end
                    && offset < e.io.offset + u64::from(e.io.len);
                let earlier_read = e.io.op == Op::Read;
                overlaps
                    && if earlier_read != read {
                        !e.completed
                    } else {
                        !read && self.held.contains(earlier)
                    }
            })
            .map(|(earlier, _)| *earlier)
    }

    fn release_held(&mut self) {
        let mut held: Vec<u64> = self.held.drain(..).collect();
        // In submission order, so each sees whether those before it that
        // it overlaps are held again (see `ordered_behind`).
        held.sort_unstable();
        for id in held {
            self.start(id);
        }
    }

    /// Every frontend IO not finished, with its parts' states: what to
    /// look at when IO seems stuck.
    pub fn in_flight(&self) -> Vec<String> {
        self.ios
            .iter()
            .map(|(id, io)| {
                let parts: Vec<String> = io
                    .parts
                    .iter()
                    .map(|p| {
                        let copies: Vec<usize> = p.seg.copies.iter().map(|c| c.leaf).collect();
                        format!("{:?} copies {copies:?} tried {:?}", p.state, p.tried)
                    })
                    .collect();
                format!(
                    "io {id} {:?} {}+{} unacked {} unfinished {}: {}",
                    io.io.op,
                    io.io.offset,
                    io.io.len,
                    io.unacked,
                    io.unfinished,
                    parts.join("; ")
                )
            })
            .collect()
    }

    /// Called after every input in tests: no mutation of what a copy
    /// writes runs while the copy does, and counts match the IOs.
    pub fn check(&self) -> Result<(), String> {
        if let Some(t) = self
            .settling
            .iter()
            .find(|t| !matches!(self.tokens.get(t), Some((_, Token::Settle))))
        {
            return Err(format!(
                "settling on token {t}, which is no FLUSH in flight"
            ));
        }
        if self.settling.is_empty() && !self.parked.is_empty() {
            return Err(format!(
                "{} IOs parked with nothing settling",
                self.parked.len()
            ));
        }
        let mut busy: BTreeMap<u64, usize> = BTreeMap::new();
        for io in self.ios.values() {
            for r in &io.regions {
                *busy.entry(*r).or_default() += 1;
            }
        }
        if busy != self.busy {
            return Err(format!("busy regions {:?}, IOs say {:?}", self.busy, busy));
        }
        for (&id, io) in &self.ios {
            if io.io.op == Op::Flush || self.held.contains(&id) {
                continue;
            }
            if let Some(earlier) = self.ordered_behind(id) {
                return Err(format!(
                    "io {id} ({:?}) runs ahead of io {earlier}, which it overlaps",
                    io.io.op
                ));
            }
        }
        if let Some(r) = &self.resync {
            if r.started && self.mutation_under(r) {
                return Err(format!(
                    "region {} copied to leg {} while a mutation of what it copies runs",
                    r.region, r.leg
                ));
            }
        }
        for (i, leg) in self.legs.iter().enumerate() {
            if (leg.state == LegState::Retired) == self.map.holds(i) {
                return Err(format!(
                    "leg {i} is {:?} but the map {} it",
                    leg.state,
                    if self.map.holds(i) {
                        "holds"
                    } else {
                        "leaves out"
                    }
                ));
            }
        }
        if let Some(m) = self.migration.filter(|m| m.switching) {
            for set in &self.legs[m.from].copy_sets {
                if !set
                    .iter()
                    .any(|&l| l != m.from && self.legs[l].state == LegState::InSync)
                {
                    return Err(format!(
                        "switching away from leg {} while it is the only leg in sync of {set:?}",
                        m.from
                    ));
                }
            }
        }
        // Swarm seed 332: a leg short of a write acknowledged without it
        // must not vouch for another, nor be trusted by a restart.
        if let Some((leg, r)) = self.lagging.keys().find(|(l, _)| !self.logs[*l].behind()) {
            return Err(format!(
                "leg {leg} lags on region {r} (a write acknowledged without it) but its log is \
                 not behind"
            ));
        }
        let outstanding: usize = self.legs.iter().map(|l| l.outstanding).sum();
        if outstanding != self.tokens.len() {
            return Err(format!(
                "{outstanding} leg IOs counted, {} tokens",
                self.tokens.len()
            ));
        }
        Ok(())
    }
}
