//! The volume engine in a seeded world of in-memory legs: random IO, legs
//! failing, erroring, suspended and returning, answers in any order (but
//! in order per leg for overlapping mutations, as a leg's client keeps
//! them). The testkit checker judges every read; at the end, with faults
//! healed, every leg of every mirror holds the same bytes. Swarm seeds
//! also restart the client, and cut legs' power, which takes what a dead
//! run left in a leg's cache.

use super::*;
use crate::client::{IoErrorKind, IoRequest};
use crate::rng::SplitMix64;
use crate::testkit::{stamp, Checker, Violation, SECTOR};
use crate::wire::Op;
use crate::Instant;
use std::collections::BTreeSet;
use std::time::Duration;

const LEAF: u64 = 256 << 10;

struct World {
    engine: VolumeEngine,
    /// Each leg's bytes as its reads see them.
    legs: Vec<Vec<u8>>,
    /// Beneath them, what each leg's media holds and what its server
    /// holds only in its cache: a power cut there keeps some of it.
    media: Vec<LegMedia>,
    /// (token, leg, io), in issue order.
    pending: Vec<(u64, usize, IoRequest)>,
    /// Pending mutations a FLUSH issued after them on their leg has
    /// answered: a leg's client covers what it was given before, so
    /// their server has them on media when they answer.
    flushed_ahead: std::collections::BTreeSet<u64>,
    /// Legs whose server is unreachable: their IO waits.
    down: Vec<bool>,
    persist: Option<u64>,
    /// Each leg's log (by name) as encoded when the engine asked for the
    /// store in flight, and as last stored: what a restarted client loads.
    storing: Option<Vec<(String, Vec<u8>)>>,
    stored: Option<Vec<(String, Vec<u8>)>>,
    /// Client restarts so far: the number of the run going on.
    restarts: u64,
    /// Draws the power cuts (its own stream: worlds without them replay
    /// as before).
    power_rng: SplitMix64,
    /// Draws which legs' files a torn log store reached.
    torn_rng: SplitMix64,
    /// Draws whether a retired leg's server is shut down for good (it
    /// never answers what is still out on it).
    gone_rng: SplitMix64,
    /// Retired legs whose server was shut down so.
    gone: u64,
    /// Writes of dead runs that power cuts took from a leg's cache.
    lost_to_power: u64,
    /// Log stores a restart tore, leaving some legs without their newest
    /// log.
    torn_stores: u64,
    config: VolumeConfig,
    /// A migration's switch waits for its map to be stored: (from, to).
    store_map: Option<(usize, usize)>,
    /// The volume as stored (its leaves renamed as migrations switch):
    /// what a restarted client opens.
    spec: VolumeSpec,
    /// The number in the next migration's new leaf's name.
    next_leaf: usize,
    /// Migrations started, finished and rolled back.
    migrations: (u64, u64, u64),
    checker: Checker,
    now: Instant,
    rng: SplitMix64,
    next_user: u64,
    /// Per user IO: its fua flag, for the checker.
    fua: std::collections::BTreeMap<u64, bool>,
    /// Per user IO: when it was submitted and the bytes it covers, and
    /// whether a media error became its due at some moment since (see
    /// [`World::unmasked`]).
    submitted: std::collections::BTreeMap<u64, ((Instant, u64, u64), bool)>,
    /// Per leg: when it last refused an IO (a media error, a full disk).
    last_refused: Vec<Option<Instant>>,
    completed: u64,
    /// Largest IO the engine sends a leg (the read-back's piece size).
    max_leg_io: u64,
    swarm: Swarm,
}

/// Which fault classes a world injects and how large its IO gets. Swarm
/// testing: most seeds run every class at once; a swarm seed switches
/// some off, so the ones left on happen in patterns the full mix rarely
/// reaches (a leg that fails and is never suspended, a migration with no
/// media errors around it...).
#[derive(Debug, Clone, Copy)]
struct Swarm {
    max_sectors: u64,
    leg_down: bool,
    leg_up: bool,
    suspend: bool,
    resume: bool,
    migrate: bool,
    media_errors: bool,
    /// Writes a leg refuses for a full disk.
    disk_full: bool,
    /// The client dies now and then and a new run starts on the stored
    /// logs and volume description.
    restart: bool,
    /// Legs lose power now and then, and with it what a dead run wrote
    /// that no FLUSH had covered (a live run's leg clients write theirs
    /// again), and the client dies once more just before the run settles
    /// (see `run_world`). Only with `restart`.
    power: bool,
    /// A log store the client died under may have reached some legs'
    /// files and not others (the daemon writes a file per leg). Only with
    /// `restart`.
    torn_logs: bool,
    /// One user IO in this many is a FLUSH (10 in most seeds; 100 leaves
    /// a dead run's writes in the legs' caches for longer, as a workload
    /// that rarely syncs does).
    flush_every: u64,
}

/// A leg's media, under its cache.
#[derive(Clone)]
struct LegMedia {
    bytes: Vec<u8>,
    /// Mutations answered but not yet flushed, in order: the run that
    /// sent each, where, its bytes, and whether it was FUA.
    cached: Vec<(u64, usize, Vec<u8>, bool)>,
}

impl LegMedia {
    fn new(bytes: Vec<u8>) -> LegMedia {
        LegMedia {
            bytes,
            cached: Vec::new(),
        }
    }

    fn apply(bytes: &mut [u8], (_, at, data, _): &(u64, usize, Vec<u8>, bool)) {
        bytes[*at..*at + data.len()].copy_from_slice(data);
    }
}

impl Default for Swarm {
    fn default() -> Swarm {
        Swarm {
            max_sectors: 32,
            leg_down: true,
            leg_up: true,
            suspend: true,
            resume: true,
            migrate: true,
            media_errors: true,
            disk_full: false,
            restart: false,
            power: false,
            torn_logs: false,
            flush_every: 10,
        }
    }
}

fn e(name: &str) -> VolumeSpec {
    VolumeSpec::Export(name.into())
}

/// What every leaf of the world says it is.
fn leaf_info() -> LegInfo {
    LegInfo {
        size: LEAF,
        block_size: 512,
        read_only: false,
    }
}

/// The world's volume tunables (small regions, so IO spans several).
fn world_config() -> VolumeConfig {
    VolumeConfig {
        region: 16 << 10,
        resync_rate: 8 << 20,
        max_leg_io: 64 << 10,
        sabotage: VolumeSabotage::default(),
    }
}

impl World {
    fn new(spec: VolumeSpec, seed: u64) -> World {
        World::sabotaged(spec, seed, VolumeSabotage::default())
    }

    fn sabotaged(spec: VolumeSpec, seed: u64, sabotage: VolumeSabotage) -> World {
        let map = VolumeMap::new(&spec, |_| {
            Some(LegInfo {
                size: LEAF,
                block_size: 512,
                read_only: false,
            })
        })
        .unwrap();
        let mut config = VolumeConfig {
            sabotage,
            ..world_config()
        };
        if seed % 2 == 1 {
            // Regions larger than one leg IO: a resync copies a region in
            // several pieces, each to its own place.
            config.region = 2 * config.max_leg_io;
        }
        World::build(spec, map, seed, config, Swarm::default())
    }

    /// A world whose shape the seed draws too: the volume's layout, its
    /// tunables, the IO sizes and which fault classes are on. Returns
    /// the shape as text for failure messages.
    fn swarm(seed: u64) -> (World, String) {
        World::swarm_sabotaged(seed, VolumeSabotage::default())
    }

    /// [`World::swarm`]'s world with `sabotage` switched off in it.
    fn swarm_sabotaged(seed: u64, sabotage: VolumeSabotage) -> (World, String) {
        let mut draw = SplitMix64::new(seed ^ 0x5741_524d);
        let mut pick = |n: usize| draw.below(n as u64) as usize;
        let specs = [
            ("mirror of 2", mirror(2)),
            ("mirror of 3", mirror(3)),
            ("mirror of 3, quorum 2", mirror_with_quorum(3, 2)),
            ("mirror of 3, quorum 1", mirror_with_quorum(3, 1)),
            ("stripe of mirrors", stripe_of_mirrors()),
        ];
        let (mut name, mut spec) = specs[pick(specs.len())].clone();
        let max_leg_io = [16u64 << 10, 32 << 10, 64 << 10, 128 << 10][pick(4)];
        let regions: Vec<u64> = (12..=18)
            .map(|b| 1u64 << b)
            .filter(|r| *r <= 4 * max_leg_io)
            .collect();
        let config = VolumeConfig {
            region: regions[pick(regions.len())],
            resync_rate: [256u64 << 10, 8 << 20, 1 << 30][pick(3)],
            max_leg_io,
            sabotage,
        };
        let mut swarm = Swarm {
            max_sectors: [1, 8, 32, (max_leg_io / 512).min(128)][pick(4)],
            leg_down: pick(2) == 0,
            leg_up: pick(2) == 0,
            suspend: pick(2) == 0,
            resume: pick(2) == 0,
            migrate: pick(2) == 0,
            media_errors: pick(2) == 0,
            disk_full: false,
            restart: false,
            power: false,
            torn_logs: false,
            flush_every: 10,
        };
        // Later additions draw from a stream of their own, and only in
        // half the seeds, the others keeping the shapes they drew before;
        // its constant leaves the pinned seeds among those (checked by
        // `pinned_swarm_seeds_hold`).
        let mut later = SplitMix64::new(seed ^ 0x4c41_544c);
        if later.chance(0.5) {
            let specs = [
                ("mirror then export", mirror_then_export()),
                ("stripe of quorum mirrors", stripe_of_quorum_mirrors()),
                ("mirror of 4, quorum 2", mirror_with_quorum(4, 2)),
            ];
            if later.chance(0.6) {
                (name, spec) = specs[later.below(specs.len() as u64) as usize].clone();
            }
            swarm.disk_full = later.chance(0.5);
            swarm.restart = later.chance(0.5);
        }
        // A volume of plain exports, restarted: no dirty log is ever
        // stored, and a dead run's writes sit in the legs' caches (its
        // own stream, whose constant leaves the pinned seeds alone).
        if SplitMix64::new(seed ^ PLAIN_DRAW).chance(0.125) {
            (name, spec) = ("stripe of exports", stripe_of_exports());
            swarm.restart = true;
        }
        // Its own stream too, so seeds that draw no power cuts replay
        // as before; its constant leaves the pinned seeds among those.
        swarm.power = swarm.restart && SplitMix64::new(seed ^ 0x504f_5783).chance(0.5);
        swarm.torn_logs = swarm.restart && SplitMix64::new(seed ^ TORN_DRAW).chance(0.5);
        if swarm.power && SplitMix64::new(seed ^ LAZY_DRAW).chance(0.5) {
            swarm.flush_every = 100;
        }
        let shape = format!("{name}, {config:?}, {swarm:?}");
        let map = VolumeMap::new(&spec, |_| Some(leaf_info())).unwrap();
        (World::build(spec, map, seed, config, swarm), shape)
    }

    fn build(
        spec: VolumeSpec,
        map: VolumeMap,
        seed: u64,
        config: VolumeConfig,
        swarm: Swarm,
    ) -> World {
        let n = map.leaves().len();
        let sectors = map.size() / SECTOR as u64;
        let max_leg_io = config.max_leg_io;
        // Media errors on the last copy of a region reach the frontend, as
        // a single disk's do; the checker then allows either outcome.
        let mut checker = Checker::new(sectors);
        checker.errors_allowed = true;
        checker.unacked_reads_may_revert = swarm.restart;
        World {
            engine: VolumeEngine::new(map, config.clone(), None).unwrap(),
            legs: vec![vec![0; LEAF as usize]; n],
            media: vec![LegMedia::new(vec![0; LEAF as usize]); n],
            flushed_ahead: Default::default(),
            lost_to_power: 0,
            torn_stores: 0,
            power_rng: SplitMix64::new(seed ^ 0x5057_5257),
            torn_rng: SplitMix64::new(seed ^ 0x544f_524e),
            gone_rng: SplitMix64::new(seed ^ 0x474f_4e45),
            gone: 0,
            pending: Vec::new(),
            down: vec![false; n],
            persist: None,
            storing: None,
            stored: None,
            restarts: 0,
            config,
            store_map: None,
            spec,
            next_leaf: n,
            migrations: (0, 0, 0),
            checker,
            now: Instant::ZERO,
            rng: SplitMix64::new(seed),
            next_user: 1,
            fua: Default::default(),
            submitted: Default::default(),
            last_refused: vec![None; n],
            completed: 0,
            max_leg_io,
            swarm,
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.engine.poll_action() {
            if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
                match &a {
                    VolumeAction::LegIo { leg, token, io } => eprintln!(
                        "{:?} issue t{token} leg{leg} {:?} {}+{} tag {:?}",
                        self.now,
                        io.op,
                        io.offset,
                        io.len,
                        (io.op == Op::Write)
                            .then(|| u64::from_le_bytes(io.data[0..8].try_into().unwrap()))
                    ),
                    VolumeAction::Complete { user, result } => eprintln!(
                        "{:?} complete user {user} {:?}",
                        self.now,
                        result.as_ref().map(|d| d.len())
                    ),
                    other => eprintln!("{:?} {other:?}", self.now),
                }
            }
            match a {
                VolumeAction::LegIo { leg, token, io } => self.pending.push((token, leg, io)),
                VolumeAction::PersistLogs { generation } => {
                    self.persist = Some(generation);
                    let leaves = self.engine.map().leaves();
                    let logs: Vec<(String, Vec<u8>)> = (0..self.legs.len())
                        .map(|l| (leaves[l].clone(), self.engine.log_to_store(l)))
                        .collect();
                    if let Some(set) = self.store_tears_to_all_behind(&logs) {
                        panic!("volume log store {generation}: torn, it can leave every leg of {set:?} behind");
                    }
                    self.storing = Some(logs);
                }
                VolumeAction::StoreMap { from, to } => self.store_map = Some((from, to)),
                VolumeAction::Complete { user, result } => {
                    self.completed += 1;
                    let fua = self.fua.remove(&user).unwrap_or(false);
                    let submitted = self.submitted.remove(&user);
                    let refused = matches!(result, Err(IoErrorKind::Media | IoErrorKind::NoSpace));
                    if let (true, Some((sent, false))) = (refused, submitted) {
                        if let Some(error) = self.unmasked(sent) {
                            self.checker
                                .report(Violation::UnexpectedError { op: user, error });
                        }
                    }
                    match &result {
                        Ok(data) => self.checker.complete(user, Ok(&data[..]), fua),
                        Err(e) => self.checker.complete(user, Err(format!("{e:?}")), fua),
                    }
                }
                VolumeAction::LegChanged { .. } => {}
            }
        }
        self.excuse_refusals();
        if let Err(e) = self.engine.check() {
            panic!("volume engine check: {e}");
        }
    }

    /// A copy set a restart may open (by leg names) in which every leg
    /// could be behind after a crash tore the store of `logs`, keeping
    /// each leg's new log or the stored one, while the stored logs and
    /// `logs` each have a leg of it clear. The restart would then trust
    /// the first leg, which may lack acknowledged writes. (A set with
    /// no leg clear in `logs` has lost every copy in sync; the restart
    /// falls back on its first leg whatever the tear.)
    fn store_tears_to_all_behind(&self, logs: &[(String, Vec<u8>)]) -> Option<Vec<String>> {
        let stored = self.stored.as_ref()?;
        let clear = |logs: &[(String, Vec<u8>)], name: &str| {
            logs.iter()
                .any(|(n, b)| n == name && !DirtyRegions::decode(b).unwrap().behind())
        };
        let map = self.engine.map();
        let leaves = map.leaves();
        let mut views = BTreeSet::new();
        for seg in map.map(0, map.size()) {
            let set: Vec<usize> = seg.copies.iter().map(|c| c.leaf).collect();
            match self.engine.migration() {
                None => {
                    views.insert(set);
                }
                Some(m) => {
                    views.insert(set.iter().copied().filter(|&l| l != m.to).collect());
                    if m.switching {
                        views.insert(set.iter().copied().filter(|&l| l != m.from).collect());
                    }
                }
            }
        }
        views
            .into_iter()
            .filter(|v: &Vec<usize>| v.len() > 1)
            .map(|v| v.iter().map(|&l| leaves[l].clone()).collect::<Vec<_>>())
            .find(|v| {
                v.iter().any(|n| clear(stored, n))
                    && v.iter().any(|n| clear(logs, n))
                    && !v.iter().any(|n| clear(stored, n) && clear(logs, n))
            })
    }

    /// Marks each IO still out for which a media error (or a full disk)
    /// is now due: the
    /// engine may decide it at one moment and answer later (once a log
    /// is stored), when a leg has come back in sync (swarm seed 2432: a
    /// write failed on the last leg in sync, the legs that took it were
    /// sent away to be copied back, and one was back before the answer).
    fn excuse_refusals(&mut self) {
        let Some(&last_refused) = self.last_refused.iter().flatten().max() else {
            return;
        };
        let due: Vec<u64> = self
            .submitted
            .iter()
            .filter(|(_, &(sent, excused))| {
                !excused && sent.0 <= last_refused && self.unmasked(sent).is_none()
            })
            .map(|(&user, _)| user)
            .collect();
        for user in due {
            self.submitted.get_mut(&user).expect("listed").1 = true;
        }
    }

    /// Whether a draw that would be a FLUSH at one in ten stays one at
    /// one in `flush_every` (from the power stream, so seeds at ten draw
    /// the same IO as before).
    fn flush_drawn(&mut self) -> bool {
        self.swarm.flush_every == 10 || self.power_rng.below(self.swarm.flush_every / 10) == 0
    }

    fn submit(&mut self) {
        let size = self.engine.map().size();
        let sectors = (1 + self.rng.below(self.swarm.max_sectors)).min(size / 512);
        let first = self.rng.below(size / 512 - sectors + 1);
        let (offset, len) = (first * 512, (sectors * 512) as u32);
        let user = self.next_user;
        self.next_user += 1;
        let io = match self.rng.below(10) {
            0..=3 => IoRequest::read(offset, len),
            4..=7 => IoRequest::write(offset, stamp(user, first, sectors), self.rng.chance(0.2)),
            // The draw is made in every seed, so those that flush every
            // tenth IO replay as before.
            8 if self.flush_drawn() => IoRequest::flush(),
            8 => IoRequest::write(offset, stamp(user, first, sectors), false),
            _ => IoRequest {
                op: Op::WriteZeroes,
                ..IoRequest::read(offset, len)
            },
        };
        let (c_off, c_len) = if io.op == Op::Flush {
            (0, 0)
        } else {
            (offset, len)
        };
        self.checker.submit(user, io.op, c_off, c_len);
        if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
            eprintln!(
                "{:?} submit user {user} {:?} {}+{}",
                self.now, io.op, io.offset, io.len
            );
        }
        self.fua.insert(user, io.fua);
        self.submitted
            .insert(user, ((self.now, c_off, u64::from(c_len)), false));
        self.engine.submit(user, io, self.now);
    }

    /// Answers one pending leg IO: the oldest overlapping mutation on a
    /// leg goes first (a leg's client keeps overlapping mutations in
    /// order); a down leg answers nothing.
    fn answer_one(&mut self, media_errors: bool) -> bool {
        let ready: Vec<usize> = (0..self.pending.len())
            .filter(|&i| {
                let (_, leg, io) = &self.pending[i];
                !self.down[*leg]
                    && !self.pending[..i].iter().any(|(_, l, o)| {
                        l == leg
                            && (o.op.mutates() || io.op.mutates())
                            && o.op != Op::Flush
                            && io.op != Op::Flush
                            && o.offset < io.offset + u64::from(io.len)
                            && io.offset < o.offset + u64::from(o.len)
                    })
            })
            .collect();
        if ready.is_empty() {
            return false;
        }
        let i = ready[self.rng.below(ready.len() as u64) as usize];
        if self.pending[i].2.op == Op::Flush {
            let leg = self.pending[i].1;
            let before = self.pending[..i]
                .iter()
                .filter(|p| p.1 == leg && p.2.op.mutates());
            self.flushed_ahead.extend(before.map(|p| p.0));
        }
        let (token, leg, io) = self.pending.remove(i);
        if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
            eprintln!(
                "{:?} answer t{token} leg{leg} {:?} {}+{}",
                self.now, io.op, io.offset, io.len
            );
        }
        let result = if media_errors
            && self.swarm.media_errors
            && io.op != Op::Flush
            && self.rng.chance(0.01)
        {
            Err(IoErrorKind::Media)
        } else if media_errors
            && self.swarm.disk_full
            && io.op.mutates()
            && io.op != Op::Flush
            && self.rng.chance(0.01)
        {
            Err(IoErrorKind::NoSpace)
        } else {
            Ok(self.land(token, leg, &io))
        };
        if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
            if let Err(e) = &result {
                eprintln!("    refused: {e:?}");
            }
            if let Ok(d) = &result {
                if d.len() >= 8 {
                    eprintln!(
                        "    data tag {}",
                        u64::from_le_bytes(d[0..8].try_into().unwrap())
                    );
                }
            }
        }
        if matches!(result, Err(IoErrorKind::Media | IoErrorKind::NoSpace)) {
            self.last_refused[leg] = Some(self.now);
        }
        self.engine.leg_complete(token, result, self.now);
        true
    }

    /// Does leg IO `token` (`io` on leg `leg`); what a read read.
    fn land(&mut self, token: u64, leg: usize, io: &IoRequest) -> bytes::Bytes {
        let read = self.carry_out(leg, io);
        if self.flushed_ahead.remove(&token) && io.op != Op::Flush {
            self.media[leg].cached.last_mut().expect("just cached").3 = true;
        }
        read
    }

    /// Does `io` on leg `leg`'s bytes; what a read read.
    fn carry_out(&mut self, leg: usize, io: &IoRequest) -> bytes::Bytes {
        let mem = &mut self.legs[leg];
        let range = io.offset as usize..(io.offset + u64::from(io.len)) as usize;
        match io.op {
            Op::Read => return bytes::Bytes::copy_from_slice(&mem[range.clone()]),
            Op::Write => mem[range.clone()].copy_from_slice(&io.data),
            Op::WriteZeroes | Op::Trim => mem[range.clone()].fill(0),
            Op::Flush => {
                let media = &mut self.media[leg];
                for w in std::mem::take(&mut media.cached) {
                    LegMedia::apply(&mut media.bytes, &w);
                }
            }
        }
        if io.op.mutates() && io.op != Op::Flush {
            let written = (self.restarts, range.start, mem[range].to_vec(), io.fua);
            self.media[leg].cached.push(written);
        }
        bytes::Bytes::new()
    }

    /// Leg `leg`'s server loses power: of what dead runs wrote and no
    /// FLUSH covered, each write reached the media (FUA ones did) or, with
    /// chance `keep`, not; what this run wrote its leg client sends again.
    fn power_cut(&mut self, leg: usize, keep: f64) {
        if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
            eprintln!("{:?} leg{leg} loses power", self.now);
        }
        let media = &mut self.media[leg];
        let mut live = Vec::new();
        for w in std::mem::take(&mut media.cached) {
            if w.0 == self.restarts {
                live.push(w);
            } else if w.3 || self.power_rng.chance(keep) {
                LegMedia::apply(&mut media.bytes, &w);
            } else {
                self.lost_to_power += 1;
            }
        }
        let mut seen = media.bytes.clone();
        for w in &live {
            LegMedia::apply(&mut seen, w);
        }
        media.cached = live;
        self.legs[leg] = seen;
    }

    /// The log store in flight lands, if one is: the engine hears so.
    fn logs_stored(&mut self) -> bool {
        let Some(generation) = self.persist.take() else {
            return false;
        };
        self.stored = self.storing.take();
        if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
            eprintln!("{:?} logs stored, generation {generation}", self.now);
            let stored = self.stored.iter().flatten();
            let logs: Vec<DirtyRegions> = stored
                .map(|(_, b)| DirtyRegions::decode(b).expect("just encoded"))
                .collect();
            trace_logs(&logs);
        }
        self.engine.logs_stable(generation, self.now);
        true
    }

    /// The engine hears that the map store in flight landed (the spec
    /// left as it was: a test that asks this restarts no client after).
    fn map_store_lands(&mut self) {
        self.store_map = None;
        self.engine.map_stored(self.now);
        self.drain();
    }

    /// Answers the first IO out on `leg`, from its bytes.
    fn answer_first_on(&mut self, leg: usize) {
        let at = self.pending.iter().position(|p| p.1 == leg);
        let (token, leg, io) = self.pending.remove(at.expect("an IO out on the leg"));
        let data = self.carry_out(leg, &io);
        self.engine.leg_complete(token, Ok(data), self.now);
        self.drain();
    }

    /// The map store in flight lands: the stored description names the
    /// new leg where it named the old one. Returns the old leg.
    fn map_stored_now(&mut self) -> usize {
        let (from, to) = self.store_map.take().expect("a map store in flight");
        let leaves = self.engine.map().leaves();
        self.spec = renamed(&self.spec, &leaves[from], &leaves[to]);
        from
    }

    /// The map store in flight lands and the engine hears of it: the old
    /// leg retires. In half the switches its server is then shut down
    /// for good, and what is still out on it is never answered: nothing
    /// may wait on it (before session 61 a FLUSH did, for ever).
    fn switch_over(&mut self) {
        let from = self.map_stored_now();
        self.migrations.1 += 1;
        self.engine.map_stored(self.now);
        if self.gone_rng.chance(0.5) {
            self.gone += 1;
            let flushed_ahead = &mut self.flushed_ahead;
            self.pending.retain(|(token, leg, _)| {
                if *leg == from {
                    flushed_ahead.remove(token);
                }
                *leg != from
            });
        }
    }

    /// The client dies and a new run starts on the volume's description
    /// and logs as stored. Each leg IO still out lands or not (the
    /// servers fence the dead run's sessions before the new run's IO
    /// reaches them), as does a log or map store in flight; the user IO
    /// still out is never answered; legs that are down stay down, and
    /// the new run starts without them. A migration not yet stored is
    /// gone (its new leg forgotten); one stored opens its new leg.
    fn restart(&mut self) {
        if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
            eprintln!("{:?} client restart", self.now);
        }
        for (token, leg, io) in std::mem::take(&mut self.pending) {
            // A FLUSH after it answered: its server had it.
            let flushed = self.flushed_ahead.contains(&token);
            if io.op.mutates() && (self.rng.chance(0.5) || flushed) {
                self.land(token, leg, &io);
            }
        }
        self.flushed_ahead.clear();
        if self.persist.take().is_some() && self.rng.chance(0.5) {
            let storing = self.storing.take().expect("stored as the store began");
            self.stored = Some(if self.swarm.torn_logs && self.torn_rng.chance(0.5) {
                self.torn(storing)
            } else {
                storing
            });
        }
        self.storing = None;
        if self.store_map.is_some() && self.rng.chance(0.5) {
            self.map_stored_now();
        }
        self.store_map = None;
        if self.swarm.power {
            self.checker.unflushed_may_revert();
        } else {
            self.checker.client_died();
        }
        self.submitted.clear();
        self.fua.clear();
        let map = VolumeMap::new(&self.spec, |_| Some(leaf_info())).unwrap();
        // Each leg of the new run is the leg of the dead run of its name
        // (a migration's new leg has a name never used before).
        let before = self.engine.map().leaves().to_vec();
        let was: Vec<usize> = map
            .leaves()
            .iter()
            .map(|name| {
                before
                    .iter()
                    .position(|b| b == name)
                    .expect("a leg of the volume")
            })
            .collect();
        self.legs = was.iter().map(|&i| self.legs[i].clone()).collect();
        self.media = was.iter().map(|&i| self.media[i].clone()).collect();
        self.down = was.iter().map(|&i| self.down[i]).collect();
        self.last_refused = was.iter().map(|&i| self.last_refused[i]).collect();
        let stored = self.stored.iter().flatten();
        let region = self.config.region;
        let (logs, _) = logs_as_stored(map.leaves(), map.size(), region, true, |name| {
            Ok(stored
                .clone()
                .find(|(n, _)| n == name)
                .map(|(_, b)| b.clone()))
        })
        .unwrap();
        if let Some(logs) = &logs {
            trace_logs(logs);
        }
        self.engine = VolumeEngine::new(map, self.config.clone(), logs).unwrap();
        for leg in 0..self.legs.len() {
            if self.down[leg] {
                self.engine.leg_failed(leg);
            }
        }
        self.restarts += 1;
    }

    /// What a log store the client died under left: each leg's new log
    /// or the one before it (none, if it had none).
    fn torn(&mut self, storing: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
        self.torn_stores += 1;
        let before = self.stored.take().unwrap_or_default();
        let mut left: Vec<(String, Vec<u8>)> = before
            .iter()
            .filter(|(n, _)| !storing.iter().any(|(s, _)| s == n))
            .cloned()
            .collect();
        for (name, log) in storing {
            if self.torn_rng.chance(0.5) {
                left.push((name, log));
            } else if let Some(old) = before.iter().find(|(n, _)| *n == name) {
                left.push(old.clone());
            }
        }
        left
    }

    /// The client dies (see [`World::restart`]) and, with power cuts on,
    /// some legs lose power then too.
    fn crash(&mut self) {
        self.restart();
        if self.swarm.power {
            for leg in 0..self.legs.len() {
                if self.power_rng.chance(0.25) {
                    self.power_cut(leg, 0.5);
                }
            }
        }
    }

    /// A mirror hides one copy's media error or full disk while another
    /// copy is in sync (invariant 5): an IO (`sent`: when, and its bytes)
    /// may fail with one only if, at some moment while it was out, under
    /// some of its bytes every copy was out of sync or had refused it
    /// itself (this tells whether now is such a moment). Else, what went
    /// wrong.
    fn unmasked(&self, (sent, offset, len): (Instant, u64, u64)) -> Option<String> {
        let map = self.engine.map();
        let segments = map.map(offset, len);
        let failing = segments.iter().any(|seg| {
            seg.copies.iter().all(|c| {
                self.engine.leg_state(c.leaf) != LegState::InSync
                    || self.last_refused[c.leaf] >= Some(sent)
            })
        });
        (!failing).then(|| {
            format!(
                "media error or full disk on {offset}+{len}, though from when it was sent until \
                 answered a copy of each piece was in sync and had refused nothing since it was \
                 sent"
            )
        })
    }

    fn step(&mut self, faults: bool) {
        self.now = self.now + Duration::from_micros(50 + self.rng.below(500));
        // After a restart, what the dead run left in a cache is lost to
        // a power cut until a FLUSH covers it, whenever the cut comes.
        if faults && self.swarm.power && self.power_rng.chance(0.003) {
            let leg = self.power_rng.below(self.legs.len() as u64) as usize;
            self.power_cut(leg, 0.5);
        }
        match self.rng.below(100) {
            0..=29 => self.submit(),
            30..=84 => {
                self.answer_one(faults);
            }
            // The window between a migration's map store and its news is
            // short: a restart is aimed at it.
            85 if self.swarm.restart && self.store_map.is_some() && self.rng.chance(0.05) => {
                self.crash()
            }
            85 if self.store_map.is_some() && self.rng.chance(0.1) => self.switch_over(),
            85..=89 => {
                self.logs_stored();
            }
            90..=93 if faults && self.swarm.leg_down => {
                let leg = self.pick(false);
                if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
                    eprintln!("{:?} leg{leg} down", self.now);
                }
                self.down[leg] = true;
                self.engine.leg_failed(leg);
            }
            94..=96 if faults && self.swarm.leg_up => {
                // A leg that is down comes back (or any, if none is).
                let leg = self.pick(true);
                if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
                    eprintln!("{:?} leg{leg} up", self.now);
                }
                self.down[leg] = false;
                self.engine.leg_returned(leg, self.now);
            }
            97 if faults && self.swarm.suspend => {
                let leg = self.pick(false);
                let _ = self.engine.suspend(leg);
            }
            98 if faults && self.swarm.restart && self.rng.chance(0.05) => self.crash(),
            98 if faults && self.swarm.resume => {
                let leg = self.pick(false);
                self.engine.resume(leg, self.now);
            }
            99 if faults && self.swarm.migrate => self.migrate_or_cancel(),

            _ => self.engine.handle_timeout(self.now),
        }
        self.drain();
        // The engine's count of each leg's unanswered IO (drivers close a
        // retired leg's session on zero) is at most what the leg holds:
        // IO it gave up on when the leg went away is no longer counted.
        for leg in 0..self.legs.len() {
            let held = self.pending.iter().filter(|p| p.1 == leg).count();
            let counted = self.engine.leg_outstanding(leg);
            assert!(counted <= held, "leg {leg}: {counted} counted, {held} held");
        }
    }

    /// A random leg the volume still has (retired ones are left alone),
    /// among those that are down if `down_only` and any is.
    fn pick(&mut self, down_only: bool) -> usize {
        let live: Vec<usize> = (0..self.legs.len())
            .filter(|&l| self.engine.leg_state(l) != LegState::Retired)
            .collect();
        let down: Vec<usize> = live.iter().copied().filter(|&l| self.down[l]).collect();
        let from = if down_only && !down.is_empty() {
            down
        } else {
            live
        };
        from[self.rng.below(from.len() as u64) as usize]
    }

    /// Starts moving leg `from` to a new leg `name`, whose disk starts
    /// full of junk a read must never see. Returns the new leg.
    fn migrate_to_new(&mut self, from: usize, name: &str) -> usize {
        let to = self
            .engine
            .migrate(from, name, leaf_info(), self.now)
            .expect("no migration was running");
        assert_eq!(to, self.legs.len());
        self.legs.push(vec![0xee; LEAF as usize]);
        self.media.push(LegMedia::new(vec![0xee; LEAF as usize]));
        self.down.push(false);
        self.last_refused.push(None);
        to
    }

    /// Answers everything, log stores included, until the migration's
    /// new leg is in sync and the engine asks for the map to be stored.
    fn copy_until_switch(&mut self) {
        self.run_until("the new leg never got in sync", |w| w.store_map.is_some());
    }

    /// m2 away and m1 moving to a new leg, copied past region `past`, so
    /// that the new leg takes writes there too: the new leg.
    fn m1_moving_with_m2_away(&mut self, past: u64) -> usize {
        self.engine.leg_failed(2);
        self.drain();
        let to = self.migrate_to_new(1, "new");
        self.run_until(
            "the copy stopped",
            |w| matches!(w.engine.leg_state(to), LegState::Resyncing { cursor } if cursor > past),
        );
        to
    }

    /// Answers everything, log stores included, a millisecond at a time,
    /// until `done`.
    fn run_until(&mut self, stuck: &str, done: impl Fn(&World) -> bool) {
        for _ in 0..100_000 {
            if done(self) {
                return;
            }
            self.now = self.now + Duration::from_millis(1);
            self.engine.handle_timeout(self.now);
            self.drain();
            while self.answer_one(false) || self.logs_stored() {
                self.drain();
            }
        }
        panic!("{stuck}");
    }

    /// Starts moving a random leg to a new one (full of junk a read must
    /// never see), or rolls the running migration back.
    fn migrate_or_cancel(&mut self) {
        if self.engine.fenced_by().is_some() {
            let refused = self.engine.migrate(0, "late", leaf_info(), self.now);
            assert!(refused.is_err(), "a fenced run started a migration");
            return;
        }
        if self.engine.migration().is_some() {
            if self.rng.chance(0.02) && self.engine.cancel_migration(self.now).is_ok() {
                self.migrations.2 += 1;
            }
            return;
        }
        let held: Vec<usize> = (0..self.legs.len())
            .filter(|&l| self.engine.leg_state(l) != LegState::Retired)
            .collect();
        let from = held[self.rng.below(held.len() as u64) as usize];
        let name = format!("new{}", self.next_leaf);
        self.next_leaf += 1;
        if std::env::var("BRAID_TRACE_VOLUME").is_ok() {
            eprintln!("{:?} migrate leg{from} to {name}", self.now);
        }
        self.migrate_to_new(from, &name);
        self.migrations.0 += 1;
    }

    /// Submits a 4 KiB write of `byte` at `offset` and lets its
    /// write-intent marks become stable, so its copies go out.
    /// Answers every leg IO and log store, rounds over, but never says
    /// the map is stored: a switching migration stays switching.
    fn answer_all_but_the_map(&mut self) {
        for _ in 0..10 {
            while self.answer_one(false) {
                self.drain();
            }
            self.logs_stored();
            self.drain();
        }
    }

    fn write_marked(&mut self, user: u64, offset: u64, byte: u8) {
        let data = bytes::Bytes::from(vec![byte; 4096]);
        self.engine
            .submit(user, IoRequest::write(offset, data, false), self.now);
        self.drain();
        assert!(self.logs_stored(), "write intent is stored first");
        self.drain();
    }

    /// Writes `len` bytes of `byte` at `offset` and answers everything,
    /// log stores included, until nothing is left to answer.
    fn write_through(&mut self, user: u64, offset: u64, len: usize, byte: u8) {
        let data = bytes::Bytes::from(vec![byte; len]);
        self.engine
            .submit(user, IoRequest::write(offset, data, false), self.now);
        self.drain();
        while self.answer_one(false) || self.logs_stored() {
            self.drain();
        }
    }

    /// Submits a 4 KiB stamped write at `offset`, stores every log it asks
    /// for, and answers it on `leg`; the other legs' copies stay pending
    /// and nothing after the answer is drained.
    fn write_taken_by(&mut self, user: u64, offset: u64, leg: usize) {
        self.engine.submit(
            user,
            IoRequest::write(offset, stamp(user, 0, 8), false),
            self.now,
        );
        self.store_every_log();
        let token = self.take_pending(leg, Op::Write);
        self.engine
            .leg_complete(token, Ok(bytes::Bytes::new()), self.now);
    }

    /// A 4 KiB write at 8192 answered on `leg` alone, every log store done
    /// before and after.
    fn write_answered_only_by(&mut self, user: u64, leg: usize) {
        self.write_taken_by(user, 8192, leg);
        self.store_every_log();
    }

    /// Drains the engine's actions and completes its log stores until it
    /// asks for none.
    fn store_every_log(&mut self) {
        self.drain();
        while self.logs_stored() {
            self.drain();
        }
    }

    /// Carries out the first `op` pending on `leg` on its bytes and
    /// answers it.
    fn land_pending(&mut self, leg: usize, op: Op) {
        let at = self
            .pending
            .iter()
            .position(|p| p.1 == leg && p.2.op == op)
            .unwrap_or_else(|| panic!("no {op:?} pending on leg {leg}: {:?}", self.pending));
        let (token, _, io) = self.pending.remove(at);
        let read = self.land(token, leg, &io);
        self.engine.leg_complete(token, Ok(read), self.now);
    }

    /// The token of the first `op` pending on `leg`, no longer pending.
    fn take_pending(&mut self, leg: usize, op: Op) -> u64 {
        let at = self
            .pending
            .iter()
            .position(|p| p.1 == leg && p.2.op == op)
            .unwrap_or_else(|| panic!("no {op:?} pending on leg {leg}: {:?}", self.pending));
        self.pending.remove(at).0
    }

    /// What the engine answered user IO `user`, among the actions it has
    /// not yet been asked for.
    fn answer_to(&mut self, user: u64) -> Option<Result<bytes::Bytes, IoErrorKind>> {
        std::iter::from_fn(|| self.engine.poll_action()).find_map(|a| match a {
            VolumeAction::Complete { user: u, result } if u == user => Some(result),
            VolumeAction::LegIo { leg, token, io } => {
                self.pending.push((token, leg, io));
                None
            }
            _ => None,
        })
    }

    /// Answers the pending copy on `leg` successfully.
    fn answer_leg(&mut self, leg: usize) {
        let at = self.pending.iter().position(|p| p.1 == leg).unwrap();
        let (token, _, _) = self.pending.remove(at);
        self.engine
            .leg_complete(token, Ok(bytes::Bytes::new()), self.now);
    }

    /// A client restarted on the logs as they would be stored now.
    fn restarted(&self) -> VolumeEngine {
        let stored: Vec<DirtyRegions> = (0..self.legs.len())
            .map(|i| DirtyRegions::decode(&self.engine.log(i).encode()).unwrap())
            .collect();
        VolumeEngine::new(self.engine.map().clone(), world_config(), Some(stored)).unwrap()
    }

    /// Heals every fault and lets everything finish, resync included.
    fn settle(&mut self) {
        self.down.iter_mut().for_each(|d| *d = false);
        for leg in 0..self.legs.len() {
            self.engine.resume(leg, self.now);
            self.engine.leg_returned(leg, self.now);
        }
        self.drain();
        for _ in 0..2_000_000 {
            let mut progressed = false;
            progressed |= self.logs_stored();
            if self.store_map.is_some() {
                self.switch_over();
                progressed = true;
            }
            progressed |= self.answer_one(false);
            self.now = self.now + Duration::from_millis(1);
            self.engine.handle_timeout(self.now);
            self.drain();
            let synced = (0..self.legs.len()).all(|l| {
                matches!(
                    self.engine.leg_state(l),
                    LegState::InSync | LegState::Retired
                )
            });
            if !progressed
                && self.pending.is_empty()
                && synced
                && self.persist.is_none()
                && self.engine.migration().is_none()
                // Every IO answered and done with, none kept for ever.
                && self.engine.in_flight().is_empty()
            {
                return;
            }
        }
        panic!(
            "never settled: states {:?}, in flight {:?}",
            (0..self.legs.len())
                .map(|l| self.engine.leg_state(l))
                .collect::<Vec<_>>(),
            self.engine.in_flight()
        );
    }

    /// No violation, and every mirror converged.
    fn assert_clean(&self, seed: u64) {
        if let Some(v) = self.checker.violations().first() {
            panic!("seed {seed}: {v}");
        }
        self.converged()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }

    /// Every copy of every byte is the same.
    fn converged(&self) -> Result<(), String> {
        let map = self.engine.map();
        for seg in map.map(0, map.size()) {
            let first = &seg.copies[0];
            let want =
                &self.legs[first.leaf][first.offset as usize..(first.offset + seg.len) as usize];
            for c in &seg.copies[1..] {
                let got = &self.legs[c.leaf][c.offset as usize..(c.offset + seg.len) as usize];
                if got != want {
                    let i = (0..got.len()).find(|i| got[*i] != want[*i]).unwrap() / 512 * 512;
                    let tag = |b: &[u8]| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
                    return Err(format!(
                        "leg {} differs from leg {} at volume offset {} (tag {} vs {})",
                        map.leaves()[c.leaf],
                        map.leaves()[first.leaf],
                        seg.at + i as u64,
                        tag(got),
                        tag(want)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// With `BRAID_TRACE_VOLUME`: each leg's log, its behind flag and first
/// marked regions.
fn trace_logs(logs: &[DirtyRegions]) {
    if std::env::var("BRAID_TRACE_VOLUME").is_err() {
        return;
    }
    for (leg, log) in logs.iter().enumerate() {
        let marked: Vec<u64> = log.dirty_from(0).take(12).collect();
        eprintln!(
            "    log leg{leg}: behind {}, marked {marked:?}",
            log.behind()
        );
    }
}

fn run(spec: VolumeSpec, seed: u64, steps: usize) -> World {
    run_sabotaged(spec, seed, steps, VolumeSabotage::default())
}

fn run_sabotaged(spec: VolumeSpec, seed: u64, steps: usize, sabotage: VolumeSabotage) -> World {
    run_world(World::sabotaged(spec, seed, sabotage), steps)
}

/// Runs `steps` steps with faults, settles, and reads everything back.
fn run_world(mut w: World, steps: usize) -> World {
    for _ in 0..steps {
        w.step(true);
    }
    if w.swarm.power {
        // The new run reads what the dead one left before legs lose power
        // again: a read (or a copy) of a leg's cache no FLUSH has made
        // stable would then go back in time (or leave legs disagreeing).
        w.crash();
        w.read_all();
        for leg in 0..w.legs.len() {
            if w.power_rng.chance(0.5) {
                w.power_cut(leg, 0.5);
            }
        }
    }
    w.settle();
    w.read_all();
    w
}

impl World {
    /// Reads the whole volume back through the engine, answering leg IO
    /// as it goes: the checker judges what each read saw.
    fn read_all(&mut self) {
        let size = self.engine.map().size();
        let mut at = 0;
        while at < size {
            let len = (size - at).min(self.max_leg_io) as u32;
            let user = self.next_user;
            self.next_user += 1;
            self.checker.submit(user, Op::Read, at, len);
            self.engine.submit(user, IoRequest::read(at, len), self.now);
            self.drain();
            while self.answer_one(false) {
                self.drain();
            }
            at += u64::from(len);
        }
    }
}

/// Seeds the stream that decides which seeds tear log stores: it leaves
/// the pinned seeds without (checked by `pinned_swarm_seeds_hold`).
const TORN_DRAW: u64 = 0x5445_4158;

/// Seeds the stream that decides which seeds are a restarted stripe of
/// plain exports: it leaves the pinned seeds out.
const PLAIN_DRAW: u64 = 0x504c_4160;

/// Seeds the stream that decides which seeds with power cuts flush
/// rarely: it leaves the pinned seeds out.
const LAZY_DRAW: u64 = 0x4c41_5a59;

fn mirror(n: usize) -> VolumeSpec {
    VolumeSpec::Mirror {
        quorum: None,
        legs: (0..n).map(|i| e(&format!("m{i}"))).collect(),
    }
}

/// A mirror of `n` acknowledging writes once one leg has them.
fn quorum_one_mirror(n: usize) -> VolumeSpec {
    VolumeSpec::Mirror {
        quorum: Some(1),
        legs: (0..n).map(|i| e(&format!("m{i}"))).collect(),
    }
}

#[test]
fn mirrors_hold_reads_and_converge_through_every_fault() {
    for seed in 0..40 {
        let w = run(mirror(2 + (seed as usize % 2)), seed, 3_000);
        w.assert_clean(seed);
        assert!(w.completed > 500, "seed {seed}: only {} IOs", w.completed);
    }
}

fn stripe_of_mirrors() -> VolumeSpec {
    VolumeSpec::Stripe {
        chunk: 8192,
        legs: vec![
            VolumeSpec::Mirror {
                quorum: None,
                legs: vec![e("a0"), e("a1")],
            },
            VolumeSpec::Mirror {
                quorum: None,
                legs: vec![e("b0"), e("b1"), e("b2")],
            },
        ],
    }
}

/// `spec` with export `old` named `new` (a migration's switch stored).
fn renamed(spec: &VolumeSpec, old: &str, new: &str) -> VolumeSpec {
    let all = |legs: &[VolumeSpec]| legs.iter().map(|l| renamed(l, old, new)).collect();
    match spec {
        VolumeSpec::Export(name) if name == old => VolumeSpec::Export(new.into()),
        VolumeSpec::Export(_) => spec.clone(),
        VolumeSpec::Linear(legs) => VolumeSpec::Linear(all(legs)),
        VolumeSpec::Stripe { chunk, legs } => VolumeSpec::Stripe {
            chunk: *chunk,
            legs: all(legs),
        },
        VolumeSpec::Mirror { quorum, legs } => VolumeSpec::Mirror {
            quorum: *quorum,
            legs: all(legs),
        },
    }
}

/// A mirror of two, then a plain export: the export's errors are the
/// user's, the mirror's are hidden.
fn mirror_then_export() -> VolumeSpec {
    VolumeSpec::Linear(vec![
        VolumeSpec::Mirror {
            quorum: None,
            legs: vec![e("m0"), e("m1")],
        },
        e("x"),
    ])
}

/// Three plain exports striped: each the only copy of its chunks.
fn stripe_of_exports() -> VolumeSpec {
    VolumeSpec::Stripe {
        chunk: 8192,
        legs: vec![e("s0"), e("s1"), e("s2")],
    }
}

/// Quorum mirrors striped: writes acknowledged at quorum in each.
fn stripe_of_quorum_mirrors() -> VolumeSpec {
    VolumeSpec::Stripe {
        chunk: 8192,
        legs: vec![
            VolumeSpec::Mirror {
                quorum: Some(1),
                legs: vec![e("a0"), e("a1")],
            },
            VolumeSpec::Mirror {
                quorum: Some(2),
                legs: vec![e("b0"), e("b1"), e("b2")],
            },
        ],
    }
}

#[test]
fn legs_migrate_under_io_and_faults_and_the_volume_stays_whole() {
    // Mirrored legs and legs that are the only copy (linear, stripe):
    // each migration either finishes (the old leg retired) or is rolled
    // back, and every read sees the last acknowledged write throughout.
    // About half the retired legs' servers are then gone for good.
    let linear_of_stripe = VolumeSpec::Linear(vec![
        e("l0"),
        VolumeSpec::Stripe {
            chunk: 8192,
            legs: vec![e("s0"), e("s1")],
        },
    ]);
    let (mut totals, mut gone) = ((0, 0, 0), 0);
    for seed in 0..24 {
        let spec = match seed % 3 {
            0 => mirror(2),
            1 => stripe_of_mirrors(),
            _ => linear_of_stripe.clone(),
        };
        let w = run(spec, seed, 6_000);
        w.assert_clean(seed);
        totals.0 += w.migrations.0;
        totals.1 += w.migrations.1;
        totals.2 += w.migrations.2;
        gone += w.gone;
    }
    let (started, finished, cancelled) = totals;
    assert!(
        finished >= 15 && cancelled >= 3 && started == finished + cancelled,
        "migrations started {started}, finished {finished}, rolled back {cancelled}"
    );
    assert!(
        gone > 0 && gone < finished,
        "{gone} of {finished} retired legs' servers gone"
    );
}

#[test]
fn stripes_of_mirrors_hold_too() {
    let stripe_of_mirrors = stripe_of_mirrors();
    for seed in 0..20 {
        let w = run(stripe_of_mirrors.clone(), seed, 3_000);
        w.assert_clean(seed);
    }
}

#[test]
fn a_returning_leg_is_copied_only_where_it_missed_writes() {
    let mut w = World::new(mirror(2), 7);
    w.engine.leg_failed(1);
    w.down[1] = true;
    w.drain();
    // One write while leg 1 is away: one region marked on it.
    w.checker.submit(1, Op::Write, 0, 4096);
    w.engine
        .submit(1, IoRequest::write(0, stamp(1, 0, 8), false), w.now);
    w.drain();
    assert_eq!(w.engine.log(1).dirty_count(), 1);
    w.settle();
    assert_eq!(w.engine.log(1).dirty_count(), 0);
    w.converged().unwrap();
    assert!(w.checker.violations().is_empty());
}

#[test]
#[ignore]
fn replay_one() {
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let spec = if std::env::var("STRIPE").is_ok() {
        stripe_of_mirrors()
    } else {
        mirror(2 + (seed as usize % 2))
    };
    let w = run(spec, seed, 3_000);
    assert!(
        w.checker.violations().is_empty(),
        "seed {seed}: {}",
        w.checker.violations()[0]
    );
    w.converged().unwrap();
}

/// `SEEDS=N cargo test ... volume::tests::sweep -- --ignored`: more seeds
/// of both shapes than CI runs.
#[test]
#[ignore]
fn sweep() {
    let n: u64 = std::env::var("SEEDS").map_or(200, |s| s.parse().unwrap());
    for seed in 0..n {
        for spec in [mirror(2 + (seed as usize % 2)), stripe_of_mirrors()] {
            let w = run(spec, seed, 3_000);
            w.assert_clean(seed);
        }
    }
}

/// Swarm seeds that found bugs: 32, a read failed on the only leg with a
/// quorum write while another leg in sync was about to have it; 827, a
/// quorum write acknowledged by a switching migration's old leg alone,
/// which the new leg then failed, left the old leg the only one in sync;
/// 806, a write acknowledged by a switching migration's new leg alone
/// (the old one suspended) was lost to a restart on the old map. And
/// one that found the judge wrong: 2432, a write failed on the last leg
/// in sync and was answered only once a leg sent away for taking it was
/// back in sync; the judge looked only at the moment of the answer. And
/// 2090: a leg of a 4-way mirror left mid-switch, the new leg vouching
/// for it, and a restart on the old map trusted a leg that had missed a
/// write the leaving one held. 232: a write went out on a mark whose
/// store was still under way, and a restart found the region clean on
/// both legs. 332: a leg finished its resync under a write acknowledged
/// without it and vouched for the next write alone. 4067: mid-switch, a
/// resyncing leg's full disk sent every leg in sync away. 8359: a
/// restart mid-switch found every leg of a copy set behind and trusted
/// one that lacked acknowledged writes (on the new map first; once
/// that was fixed, on the old map with the old leg gone). And 11901
/// found the checker wrong: a FLUSH answered just after a write it
/// covered was refused, and the checker took the write the refused one
/// never replaced for lost to the power cut that followed. 11909: a
/// restart read a dead run's write from an unmirrored export's cache
/// before flushing it, and a power cut then took it. 6628: mid-switch,
/// the new leg's full disk sent the old leg away, a FLUSH was answered
/// without it, and a restart on the old map after a power cut there
/// lost a write the FLUSH had promised. 20548: mid-switch, a quorum-1
/// write was acknowledged on the new leg's word alone, every leg of the
/// old map lagging on it was marked behind, and a restart on the old map
/// trusted the first of them, which had been away. 26548: mid-switch,
/// the old leg's bad block refused a write while only its log was not
/// behind, and the new leg that took the write was sent away, leaving
/// the old leg to retire as the only copy in sync. 48797: mid-switch,
/// the old leg's bad block refused a zeroing the new leg took, and a
/// resyncing leg copied the old leg's stale bytes there, then served
/// them in sync once the old leg retired. Each must still draw its
/// shape, or it no longer replays its case.
#[test]
fn pinned_swarm_seeds_hold() {
    let before_later_draws = ["disk_full: false", "restart: false"];
    for (seed, shape, draws) in [
        (32, "mirror of 3, quorum 1,", &before_later_draws[..]),
        (827, "mirror of 3, quorum 1,", &before_later_draws[..]),
        (2432, "mirror of 3, quorum 2,", &before_later_draws[..]),
        (
            806,
            "mirror then export,",
            &[
                "migrate: true",
                "restart: true",
                "power: false",
                "torn_logs: false",
            ][..],
        ),
        (
            2090,
            "mirror of 4, quorum 2,",
            &[
                "migrate: true",
                "restart: true",
                "power: false",
                "torn_logs: false",
            ][..],
        ),
        (
            232,
            "mirror then export,",
            &[
                "disk_full: true",
                "restart: true",
                "power: false",
                "torn_logs: false",
            ][..],
        ),
        (
            332,
            "stripe of quorum mirrors,",
            &["media_errors: true", "disk_full: true", "power: false"][..],
        ),
        (
            4067,
            "mirror of 3,",
            &["migrate: true", "disk_full: true", "power: false"][..],
        ),
        (
            11901,
            "mirror of 3, quorum 1,",
            &[
                "disk_full: true",
                "restart: true",
                "power: true",
                "flush_every: 10",
            ][..],
        ),
        (
            11909,
            "mirror then export,",
            &[
                "restart: true",
                "power: true",
                "torn_logs: false",
                "flush_every: 10",
            ][..],
        ),
        (
            8359,
            "mirror of 2,",
            &[
                "migrate: true",
                "restart: true",
                "power: false",
                "torn_logs: false",
            ][..],
        ),
        (
            6628,
            "mirror then export,",
            &[
                "migrate: true",
                "disk_full: true",
                "restart: true",
                "power: true",
            ][..],
        ),
        (
            20548,
            "mirror of 3, quorum 1,",
            &[
                "migrate: true",
                "restart: true",
                "power: true",
                "torn_logs: true",
            ][..],
        ),
        (
            26548,
            "mirror of 3, quorum 1,",
            &["migrate: true", "media_errors: true", "restart: true"][..],
        ),
        (
            48797,
            "mirror of 3, quorum 1,",
            &["leg_up: true", "migrate: true", "media_errors: true"][..],
        ),
    ] {
        let drawn = World::swarm(seed).1;
        assert!(
            drawn.starts_with(shape) && draws.iter().all(|d| drawn.contains(d)),
            "swarm seed {seed} no longer draws its shape: {drawn}"
        );
        swarm_seed_holds(seed);
    }
}

/// Swarm seeds: every shape the world can draw holds its reads and
/// converges. `SWARM_SEEDS=N` runs more (CI runs 24), from
/// `SWARM_FIRST=F` (default 0; one seed: `SWARM_FIRST=S SWARM_SEEDS=1`).
/// `SWARM_SABOTAGE=NAME` (`no-settle`, ...) switches a volume mechanism
/// off instead and lists the seeds that catch it (at least one must).
#[test]
fn swarm_shapes_hold_reads_and_converge() {
    let n: u64 = std::env::var("SWARM_SEEDS").map_or(24, |s| s.parse().unwrap());
    let first: u64 = std::env::var("SWARM_FIRST").map_or(0, |s| s.parse().unwrap());
    if let Ok(name) = std::env::var("SWARM_SABOTAGE") {
        let sabotage = sabotage_named(&name);
        let caught: Vec<u64> = (first..first + n)
            .filter(|&seed| swarm_seed_fails(seed, sabotage).is_some())
            .collect();
        eprintln!(
            "{name} off: {} of {n} seeds caught it: {caught:?}",
            caught.len()
        );
        assert!(!caught.is_empty(), "{name} off went unnoticed");
        return;
    }
    let (mut restarts, mut lost, mut torn) = (0, 0, 0);
    for (r, l, t) in (first..first + n).map(swarm_seed_holds) {
        (restarts, lost, torn) = (restarts + r, lost + l, torn + t);
    }
    assert!(n < 24 || restarts > 0, "no swarm seed restarted its client");
    assert!(n < 24 || lost > 0, "no power cut took a dead run's write");
    assert!(n < 24 || torn > 0, "no restart tore a log store");
}

/// The volume mechanisms the sweeps call `names` (`no-settle`, ...; a
/// comma between several) switched off.
fn sabotage_named(names: &str) -> VolumeSabotage {
    let mut s = VolumeSabotage::default();
    for name in names.split(',') {
        let before = s;
        crate::testkit::Sabotage::parse(name)
            .unwrap_or_else(|| panic!("no sabotage {name:?}"))
            .apply_volume(&mut s);
        assert_ne!(s, before, "{name} is no volume mechanism");
    }
    s
}

/// Runs swarm seed `seed` with `sabotage`: what went wrong, if anything
/// (a violation, legs that differ, or a panic such as a failed engine
/// check).
fn swarm_seed_fails(seed: u64, sabotage: VolumeSabotage) -> Option<String> {
    let (w, _) = World::swarm_sabotaged(seed, sabotage);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_world(w, 3_000)));
    let w = match run {
        Ok(w) => w,
        Err(_) => return Some("panicked".into()),
    };
    if let Some(v) = w.checker.violations().first() {
        return Some(v.to_string());
    }
    w.converged().err()
}

/// Runs swarm seed `seed`: no violation, and the legs converge. Returns
/// how often the client restarted, and how many of a dead run's writes
/// power cuts took.
fn swarm_seed_holds(seed: u64) -> (u64, u64, u64) {
    let (w, shape) = World::swarm(seed);
    let w = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_world(w, 3_000)))
        .unwrap_or_else(|_| panic!("swarm seed {seed} ({shape}) panicked"));
    if let Some(v) = w.checker.violations().first() {
        panic!("swarm seed {seed} ({shape}): {v}");
    }
    if let Err(e) = w.converged() {
        panic!("swarm seed {seed} ({shape}): {e}");
    }
    (w.restarts, w.lost_to_power, w.torn_stores)
}

/// The swarm notices a restart's own mechanisms switched off, in seeds
/// CI runs anyway. Measured with `SWARM_SABOTAGE=NAME SWARM_SEEDS=300`
/// (session 60): settling caught in 19 of the first 300 seeds (14 and 16
/// among them), marks kept until flushed in 4 (19 among them), both in
/// seeds that crash once more at the end (those with power cuts). The
/// old map's hold while a migration switches, in 1 of the first 600
/// (11; session 63). A log store's anchor (session 65), in 56 of the
/// first 300 (2 and 6 among them): the world checks each store it is
/// asked for against the one before (`store_tears_to_all_behind`). A
/// leg of each map vouching for a quorum write mid-switch is not here:
/// the anchor holds that write too, and only the pinned seed that found
/// it (20548) was ever caught; madsim's `migrate-quorum` catches the two
/// off together. If a change moves them, measure again and list seeds
/// that catch.
#[test]
fn the_swarm_catches_a_restarts_mechanisms_switched_off() {
    for (name, seeds) in [
        ("no-settle", &[14, 16][..]),
        ("no-unflushed-marks", &[19][..]),
        ("no-old-map-hold", &[11][..]),
        ("no-store-anchor", &[2, 6][..]),
    ] {
        let sabotage = sabotage_named(name);
        assert!(
            seeds
                .iter()
                .any(|&seed| swarm_seed_fails(seed, sabotage).is_some()),
            "{name} went unnoticed in swarm seeds {seeds:?}"
        );
    }
}

#[test]
fn each_safety_mechanism_switched_off_is_caught() {
    let off = |f: fn(&mut VolumeSabotage)| {
        let mut s = VolumeSabotage::default();
        f(&mut s);
        s
    };
    for (name, sabotage) in [
        ("dirty log", off(|s| s.no_dirty_log = true)),
        ("in-sync gate", off(|s| s.no_in_sync_gate = true)),
        ("write fan-out", off(|s| s.no_fan_out = true)),
        ("error failover", off(|s| s.no_error_failover = true)),
    ] {
        let caught = (0..20).any(|seed| {
            let w = run_sabotaged(mirror(2), seed, 3_000, sabotage);
            !w.checker.violations().is_empty() || w.converged().is_err()
        });
        assert!(
            caught,
            "switching off the {name} went unnoticed in 20 seeds"
        );
    }
}

#[test]
fn after_a_client_restart_a_leg_that_was_in_sync_is_the_source() {
    // Region 3 is marked on both legs' logs. On a leg that was in sync
    // that is write intent (a write in flight when the client died); on
    // one that was behind it is a write the leg missed. Before the
    // `behind` flag both legs resynced, from nowhere, for ever (found by
    // killing `braid attach` -9 mid-resync, daemon/tests/volume.rs).
    let spec = VolumeSpec::Mirror {
        quorum: None,
        legs: vec![e("a"), e("b")],
    };
    let info = |_: &str| {
        Some(LegInfo {
            size: 1 << 20,
            block_size: 512,
            read_only: false,
        })
    };
    let map = VolumeMap::new(&spec, info).unwrap();
    let config = VolumeConfig {
        region: 64 << 10,
        ..VolumeConfig::default()
    };
    let mut intent = DirtyRegions::new(1 << 20, 64 << 10).unwrap();
    intent.mark(3 * (64 << 10), 1);
    let mut missed = intent.clone();
    missed.set_behind(true);
    let states = |logs: Vec<DirtyRegions>| {
        let e = VolumeEngine::new(map.clone(), config.clone(), Some(logs)).unwrap();
        e.check().unwrap();
        (
            matches!(e.leg_state(0), LegState::InSync),
            matches!(e.leg_state(1), LegState::InSync),
            e.log(0).dirty_count() + e.log(1).dirty_count(),
        )
    };
    assert_eq!(
        states(vec![intent.clone(), missed.clone()]),
        (true, false, 1)
    );
    assert_eq!(
        states(vec![missed.clone(), intent.clone()]),
        (false, true, 1)
    );
    // Both in sync: they must still agree, so the first is the source.
    assert_eq!(
        states(vec![intent.clone(), intent.clone()]),
        (true, false, 1)
    );
    // Both behind (a lost log): one is trusted rather than none.
    assert_eq!(states(vec![missed.clone(), missed]), (true, false, 1));
}

#[test]
fn a_switching_migration_keeps_its_new_leg_as_the_map_after_the_switch_will() {
    // Leg s0 of a stripe is the only copy of its bytes. Once its
    // replacement holds everything the stored map may name only the new
    // leg, so from then on the new leg may not be left behind: a write
    // acknowledged without it would be lost if the client restarted.
    let spec = VolumeSpec::Stripe {
        chunk: 8192,
        legs: vec![e("s0"), e("s1")],
    };
    let mut w = World::new(spec, 3);
    let info = leaf_info();
    let bad = |size, block_size, read_only| LegInfo {
        size,
        block_size,
        read_only,
    };
    for (wrong, needle) in [
        (bad(LEAF * 2, 512, false), "same size"),
        (bad(LEAF, 4096, false), "4096-byte blocks"),
        (bad(LEAF, 512, true), "read-only"),
    ] {
        let err = w.engine.migrate(0, "n", wrong, w.now).unwrap_err();
        assert!(err.contains(needle), "{err}");
    }
    let err = w.engine.migrate(0, "s1", info, w.now).unwrap_err();
    assert!(err.contains("already in the volume"), "{err}");
    let to = w.migrate_to_new(0, "n");
    assert!(w
        .engine
        .migrate(1, "m", info, w.now)
        .unwrap_err()
        .contains("already"));
    // Copy until the engine asks for the map.
    w.copy_until_switch();
    assert_eq!(w.engine.migration().map(|m| m.switching), Some(true));
    w.engine.leg_failed(to);
    w.drain();
    assert_eq!(w.engine.leg_state(to), LegState::InSync);
    assert!(w.engine.suspend(to).is_err());
    assert!(w
        .engine
        .cancel_migration(w.now)
        .unwrap_err()
        .contains("too late"));
    w.engine.map_stored(w.now);
    w.drain();
    assert_eq!(w.engine.leg_state(0), LegState::Retired);
    assert_eq!(w.engine.migration(), None);
    assert_eq!(w.engine.stats().migrations, 1);
    let map = w.engine.map();
    assert!(!map.holds(0) && map.holds(to));
    assert!(map
        .map(0, map.size())
        .iter()
        .all(|s| s.copies.len() == 1 && s.copies[0].leaf != 0));
    // Every byte s0 held is now on the new leg.
    assert_eq!(w.legs[to], w.legs[0]);
}

#[test]
fn while_a_migration_switches_the_old_leg_vouches_for_no_one() {
    // Found by madsim (`migrate` seed 271): m0 of a mirror moves to a new
    // leg. During the switch the new leg's disk filled and it left (m1
    // held its bytes), then m1 left too, trusting m0, the leg about to be
    // retired. Retiring it left no leg in sync and the volume hung.
    let mut w = World::new(mirror(2), 5);
    let to = w.migrate_to_new(0, "new");
    w.copy_until_switch();
    w.engine.leg_failed(to);
    w.drain();
    assert_eq!(w.engine.leg_state(to), LegState::Away, "m1 holds its bytes");
    w.engine.leg_failed(1);
    w.drain();
    assert_eq!(
        w.engine.leg_state(1),
        LegState::InSync,
        "m1 is the last leg in sync that stays"
    );
    w.engine.map_stored(w.now);
    w.drain();
    assert_eq!(w.engine.leg_state(0), LegState::Retired);
    w.settle();
    w.converged().unwrap();
}

/// Swarm seed 806: a linear volume's export moves, and is suspended
/// while the migration switches; a write to its bytes then lands on the
/// new leg alone. Until the new map is stored a restarted client opens
/// the old one, without the new leg: the write is answered only once
/// the new map is stored, so a restart before that loses nothing
/// acknowledged.
#[test]
fn while_a_migration_switches_a_write_the_old_leg_missed_waits_for_the_new_map() {
    let mut w = World::new(mirror_then_export(), 3);
    let to = w.migrate_to_new(2, "new");
    w.copy_until_switch();
    w.engine.suspend(2).expect("the new leg holds its bytes");
    w.drain();
    let answered = w.completed;
    w.write_marked(100, LEAF + 8192, 0x5a);
    // The mirror's bytes are no business of the migration's.
    w.write_marked(101, 8192, 0xa5);
    w.answer_all_but_the_map();
    assert!(w.pending.is_empty(), "the new leg took it");
    assert_eq!(
        w.completed,
        answered + 1,
        "the mirror's write answered, the export's not while only the new leg held it"
    );
    w.engine.map_stored(w.now);
    w.drain();
    assert_eq!(
        w.completed,
        answered + 2,
        "answered once the new map is stored"
    );
    assert_eq!(w.engine.leg_state(2), LegState::Retired);
    assert_eq!(w.engine.leg_state(to), LegState::InSync);
}

/// Swarm seed 6628: while a migration switches, a write reaches the old
/// and the new leg and is answered; then the old leg leaves (here
/// suspended; there, sent away when the new leg's disk filled). A FLUSH
/// after reaches the new leg, not the old one, whose cache holds the
/// only copy of that write on the old map, the one a restart opens
/// until the new map is stored. The FLUSH is answered only once the new
/// map is stored: answered before, a restart on the old map after a
/// power cut there lost the write it had promised durable.
#[test]
fn while_a_migration_switches_a_flush_the_old_leg_missed_waits_for_the_new_map() {
    let mut w = World::new(mirror_then_export(), 3);
    let to = w.migrate_to_new(2, "new");
    w.copy_until_switch();
    w.write_through(100, LEAF + 8192, 4096, 0x5a);
    let answered = w.completed;
    w.engine.suspend(2).expect("the new leg holds its bytes");
    w.drain();
    w.engine.submit(101, IoRequest::flush(), w.now);
    w.drain();
    w.answer_all_but_the_map();
    assert!(w.pending.is_empty(), "the legs in service took the FLUSH");
    assert_eq!(
        w.completed, answered,
        "the FLUSH waits while the old map's copy of the write is unflushed"
    );
    w.engine.map_stored(w.now);
    w.drain();
    assert_eq!(
        w.completed,
        answered + 1,
        "answered once the new map is stored"
    );
    assert_eq!(w.engine.leg_state(2), LegState::Retired);
    assert_eq!(w.engine.leg_state(to), LegState::InSync);
}

/// Swarm seed 2090: while a migration switches, the new leg is not yet
/// in the stored map, so it vouches for no leg of the old map leaving
/// (a restart on the old map would trust a leg that missed what the
/// leaving one held). A leg reported failed then stays in service until
/// the new map is stored, and leaves then.
#[test]
fn while_a_migration_switches_the_new_leg_vouches_only_for_the_old_one() {
    let mut w = World::new(mirror(2), 5);
    let to = w.migrate_to_new(1, "new");
    w.copy_until_switch();
    w.engine.leg_failed(0);
    w.drain();
    assert_eq!(
        w.engine.leg_state(0),
        LegState::InSync,
        "the new leg vouched for leg 0 before the new map was stored"
    );
    assert!(
        w.engine.suspend(0).is_err(),
        "suspended on the new leg's word"
    );
    w.engine.map_stored(w.now);
    w.drain();
    assert_eq!(w.engine.leg_state(1), LegState::Retired);
    assert_eq!(w.engine.leg_state(0), LegState::Away, "leaves once it may");
    w.engine.leg_returned(0, w.now);
    w.settle();
    assert_eq!(w.engine.leg_state(to), LegState::InSync);
    w.converged().unwrap();
}

/// The stored log of leg `name`, as a restarted client would load it.
fn stored_log(w: &World, name: &str) -> DirtyRegions {
    let stored = w.stored.as_ref().expect("logs stored");
    let (_, bytes) = stored.iter().find(|(n, _)| n == name).expect("its log");
    DirtyRegions::decode(bytes).unwrap()
}

/// A world over `spec` (of legs m0 and m1), m0 suspended.
fn with_m0_suspended(spec: VolumeSpec, seed: u64) -> World {
    let mut w = World::new(spec, seed);
    w.engine.suspend(0).expect("m1 holds every byte");
    w.drain();
    w
}

/// A leg's log unreadable (torn, foreign) or missing while the other
/// legs' are there knows nothing: it is copied to in full, never from.
/// Before, it was read as marked everywhere but not behind, and as the
/// first leg of its set it became the source of the copy, though it had
/// been away: the write only the other leg held was lost.
#[test]
fn a_leg_whose_log_is_lost_is_copied_to_never_from() {
    for damage in ["torn", "missing"] {
        let mut w = with_m0_suspended(mirror(2), 19);
        w.write_through(100, 8192, 4096, 0x6b);
        assert_eq!(w.completed, 1, "m1 alone took it");
        let stored = w.stored.as_mut().expect("logs stored");
        let m0 = stored.iter().position(|(n, _)| n == "m0").unwrap();
        match damage {
            "torn" => {
                let bytes = &mut stored[m0].1;
                let last = bytes.len() - 1;
                bytes[last] ^= 0xff;
            }
            _ => {
                stored.remove(m0);
            }
        }
        w.restart();
        w.settle();
        assert_eq!(w.legs[0][8192], 0x6b, "{damage}: m0 copied from m1");
        w.converged().unwrap();
    }
}

/// Swarm seed 8359, first half: a migration's new leg starts with a log
/// that says behind, and coming in sync did not store it. The map naming
/// it was stored anyway; a restart on that map found every leg behind (the
/// other was away) and trusted the away one, which lacked acknowledged
/// writes. The map store now waits for a log store saying the new leg is
/// in sync.
#[test]
fn a_migrations_map_is_stored_only_after_a_log_saying_its_new_leg_is_in_sync() {
    let mut w = with_m0_suspended(mirror(2), 11);
    w.write_through(100, 0, 8192, 0x77);
    assert_eq!(w.completed, 1, "m1 alone took it");
    let to = w.migrate_to_new(1, "new");
    // A write while the copy runs marks the new leg's log, which is
    // stored saying behind. Log stores land until it is answered, and
    // not after.
    let data = bytes::Bytes::from(vec![0x78; 4096]);
    w.engine
        .submit(101, IoRequest::write(0, data, false), w.now);
    w.drain();
    for _ in 0..100_000 {
        if w.engine.leg_state(to) == LegState::InSync {
            break;
        }
        let progressed = w.answer_one(false) || (w.completed < 2 && w.logs_stored());
        if !progressed {
            w.now = w.now + Duration::from_millis(1);
            w.engine.handle_timeout(w.now);
        }
        w.drain();
    }
    assert_eq!(w.completed, 2, "the write during the copy was answered");
    assert!(stored_log(&w, "new").behind());
    assert_eq!(w.engine.leg_state(to), LegState::InSync);
    assert_eq!(w.store_map, None, "the map store went ahead of the log");
    while w.store_map.is_none() {
        assert!(w.logs_stored(), "a log store is under way");
        w.drain();
    }
    assert!(!stored_log(&w, "new").behind());
    // A restart on the new map trusts the new leg, not the away one.
    w.map_stored_now();
    w.store_map = None;
    w.restart();
    w.settle();
    assert_eq!(w.engine.map().leaves(), ["m0", "new"]);
    assert_eq!(w.legs[1][0], 0x78, "the new leg kept the writes m0 missed");
    assert_eq!(w.legs[1][4096], 0x77);
    w.converged().unwrap();
}

/// Swarm seed 8359, second half: while the map store is in flight, the
/// old leg leaves with the other leg of the old map away. It holds every
/// acknowledged write (the ones it misses wait for the new map), so its
/// log must not say behind: a restart on the old map that found both legs
/// behind trusted the first, the away one.
#[test]
fn while_a_migration_switches_the_old_leg_leaving_alone_stays_trusted_on_the_old_map() {
    let mut w = with_m0_suspended(mirror(2), 13);
    w.migrate_to_new(1, "new");
    w.copy_until_switch();
    w.write_through(100, 8192, 4096, 0x5a);
    assert_eq!(w.completed, 1, "m1 and the new leg took it");
    w.engine.leg_failed(1);
    w.drain();
    assert_eq!(w.engine.leg_state(1), LegState::Away);
    w.write_through(101, 16384, 4096, 0xa5);
    assert_eq!(w.completed, 1, "held while only the new map holds it");
    assert!(!stored_log(&w, "m1").behind());
    assert!(stored_log(&w, "m0").behind());
    // The map store is lost with the client: the restart opens the old map.
    w.store_map = None;
    w.restart();
    w.settle();
    assert_eq!(w.engine.map().leaves(), ["m0", "m1"]);
    assert_eq!(w.legs[0][8192], 0x5a, "m0 copied back from m1");
    w.converged().unwrap();
}

/// The quorum side of seed 8359: mid-switch, with the other leg of the
/// old map away, a quorum write may not be acknowledged on the new leg's
/// word alone. The old leg would lag on it, its log would say behind, and
/// a restart on the old map would find every leg behind.
#[test]
fn while_a_migration_switches_a_quorum_write_waits_for_the_old_leg_if_the_old_map_needs_it() {
    let spec = quorum_one_mirror(2);
    let mut w = with_m0_suspended(spec, 17);
    let to = w.migrate_to_new(1, "new");
    w.copy_until_switch();
    w.write_answered_only_by(100, to);
    assert_eq!(w.completed, 0, "acknowledged while m1 lagged");
    assert!(!stored_log(&w, "m1").behind());
    w.answer_leg(1);
    w.store_every_log();
    assert_eq!(w.completed, 1);
    assert!(!w.engine.log(1).behind());
}

/// Swarm seed 20548: the same with every leg of the old map in service.
/// A quorum-1 write the new leg alone answered mid-switch was
/// acknowledged on its word, and every leg of the old map, lagging on
/// it, was marked behind: a restart on the old map trusted the first of
/// them, which had been away, and read older data. A leg of the old map
/// must have it too.
#[test]
fn while_a_migration_switches_a_quorum_write_needs_a_leg_of_each_map() {
    let spec = quorum_one_mirror(3);
    let mut w = World::new(spec, 19);
    let to = w.migrate_to_new(1, "new");
    w.copy_until_switch();
    w.write_answered_only_by(100, to);
    assert_eq!(w.completed, 0, "acknowledged on the new leg's word alone");
    for name in ["m0", "m1", "m2"] {
        assert!(!stored_log(&w, name).behind(), "{name} stored as behind");
    }
    w.answer_leg(2);
    w.store_every_log();
    assert_eq!(w.completed, 1, "m2 holds it on both maps");
    assert!(!w.engine.log(2).behind());
}

/// Swarm seed 26548: mid-switch, a quorum-1 mirror's old leg is the only
/// leg whose log is not behind (the new leg and m0 still lack a write
/// acknowledged on the old leg's word before the switch), and the old
/// leg's bad block refuses a write the new leg takes. It cannot leave,
/// so its refusal was taken for the last copy's: the new leg was sent
/// away to be copied back from the old one, which was about to retire
/// as the only copy in sync. The new leg must keep the write, and it is
/// answered once the new map is stored.
#[test]
fn while_a_migration_switches_the_old_legs_refusal_does_not_send_the_new_leg_away() {
    let spec = quorum_one_mirror(3);
    let mut w = World::new(spec, 5);
    let to = w.m1_moving_with_m2_away(1);
    w.write_taken_by(100, 0, 1);
    w.store_every_log();
    assert_eq!(
        w.completed, 1,
        "acknowledged on m1's word before the switch"
    );
    let late_m0 = w.take_pending(0, Op::Write);
    let late_to = w.take_pending(to, Op::Write);
    // The copy ends; the switch begins, its map store waiting for the
    // new leg to catch up.
    w.run_until("the switch never began", |w| {
        w.engine.migration().is_some_and(|m| m.switching)
    });
    assert!(w.store_map.is_none());
    assert_eq!(w.engine.leg_state(to), LegState::InSync);
    assert!(w.engine.log(0).behind() && w.engine.log(to).behind());
    w.engine
        .submit(101, IoRequest::write(65536, stamp(101, 0, 8), false), w.now);
    w.store_every_log();
    let refused = w.take_pending(1, Op::Write);
    let taken = w.take_pending(to, Op::Write);
    w.engine.leg_complete(taken, Ok(bytes::Bytes::new()), w.now);
    w.engine
        .leg_complete(refused, Err(IoErrorKind::Media), w.now);
    w.answer_leg(0);
    w.store_every_log();
    assert_eq!(w.engine.leg_state(to), LegState::InSync, "the new leg left");
    assert_eq!(w.completed, 1, "answered before the new map was stored");
    // A read the old leg refuses is no write the new leg took: it waits
    // for the new leg to catch up on the bytes m0 lags on too.
    w.engine.submit(102, IoRequest::read(0, 4096), w.now);
    w.store_every_log();
    let refused = w.take_pending(1, Op::Read);
    w.engine
        .leg_complete(refused, Err(IoErrorKind::Media), w.now);
    w.store_every_log();
    assert_eq!(
        w.completed, 1,
        "the read ended before the new leg caught up"
    );
    w.engine
        .leg_complete(late_m0, Ok(bytes::Bytes::new()), w.now);
    w.engine
        .leg_complete(late_to, Ok(bytes::Bytes::new()), w.now);
    w.store_every_log();
    while w.answer_one(false) {
        w.drain();
    }
    assert_eq!(w.completed, 2, "the new leg serves the read");
    w.engine.map_stored(w.now);
    w.store_every_log();
    assert_eq!(w.completed, 3, "the new leg's copy answers the write");
    assert_eq!(w.engine.leg_state(1), LegState::Retired);
    assert!(w.engine.check().is_ok());
}

/// Swarm seed 48797: mid-switch, the old leg's bad block refused a write
/// the new leg took, which then waits for the new map; a leg resyncing
/// meanwhile copied that region from the old leg, got its stale bytes,
/// and served them in sync once the old leg retired. Nothing is copied
/// from such an old leg.
#[test]
fn while_a_migration_switches_nothing_is_copied_from_an_old_leg_that_refused_a_write() {
    let at = 3 * world_config().region;
    let mut w = with_m0_suspended(quorum_one_mirror(3), 29);
    let to = w.m1_moving_with_m2_away(0);
    // Acknowledged on m1's word: the new leg lags on it, so it cannot
    // vouch for m1 leaving, and m1 is the only leg of the old map left.
    w.write_taken_by(100, 0, 1);
    let late = w.take_pending(to, Op::Write);
    w.store_every_log();
    assert_eq!(w.completed, 1);
    w.run_until("the switch never began", |w| {
        w.engine.migration().is_some_and(|m| m.switching)
    });
    w.engine
        .submit(101, IoRequest::write(at, stamp(101, 0, 8), false), w.now);
    w.store_every_log();
    let refused = w.take_pending(1, Op::Write);
    w.engine
        .leg_complete(refused, Err(IoErrorKind::Media), w.now);
    w.land_pending(to, Op::Write);
    w.engine.leg_complete(late, Ok(bytes::Bytes::new()), w.now);
    w.store_every_log();
    assert_eq!(w.engine.leg_state(1), LegState::InSync, "m1 left");
    assert_eq!(w.completed, 1, "answered before the new map was stored");
    w.engine.leg_returned(2, w.now);
    w.run_until("m2 never got back in sync", |w| {
        w.engine.leg_state(2) == LegState::InSync
    });
    w.engine.map_stored(w.now);
    w.store_every_log();
    assert_eq!(w.completed, 2);
    assert_eq!(w.engine.leg_state(1), LegState::Retired);
    let held = &w.legs[2][at as usize..][..4096];
    assert!(
        held == &stamp(101, 0, 8)[..],
        "m2 copied the old leg's stale bytes"
    );
    assert!(w.engine.check().is_ok());
}

/// madsim migrate-quorum seeds 2208, 2330 and 2952: in a quorum-1
/// mirror, m2 caught up on a write acknowledged on m1's word (its log
/// clear in memory, still stored as behind) and at once vouched for a
/// write m1 lagged on. One store then carried m2 clear and m1 behind; the
/// crash tore it, keeping m2's old log and m1's new, so every leg said
/// behind and the restart trusted m0, away since before writes only m1
/// held. m1's fall behind must wait for a store after the one that makes
/// m2 clear. (The world checks every store so: `store_tears_to_all_behind`.)
#[test]
fn a_log_store_keeps_a_leg_clear_in_it_and_in_the_store_before() {
    let mut w = with_m0_suspended(quorum_one_mirror(3), 23);
    w.write_taken_by(100, 0, 1);
    let late_m2 = w.take_pending(2, Op::Write);
    w.store_every_log();
    assert_eq!(w.completed, 1, "acknowledged on m1's word");
    assert!(stored_log(&w, "m2").behind() && !stored_log(&w, "m1").behind());
    w.engine
        .leg_complete(late_m2, Ok(bytes::Bytes::new()), w.now);
    w.store_every_log();
    assert!(!w.engine.log(2).behind(), "m2 caught up");
    assert!(stored_log(&w, "m2").behind(), "m2's return already stored");
    w.write_taken_by(101, 8192, 2);
    w.drain();
    assert!(w.engine.log(1).behind(), "m1 lags on the write m2 took");
    let storing = |w: &World, name: &str| {
        let logs = w.storing.as_ref().expect("a store in flight");
        let (_, bytes) = logs.iter().find(|(n, _)| n == name).expect("its log");
        DirtyRegions::decode(bytes).unwrap().behind()
    };
    assert!(
        !storing(&w, "m1") && !storing(&w, "m2"),
        "m2 clear and m1 behind in one store"
    );
    assert!(w.logs_stored());
    w.drain();
    assert!(storing(&w, "m1") && !storing(&w, "m2"));
    assert_eq!(w.completed, 1, "acknowledged before a store said m1 lags");
    w.store_every_log();
    assert_eq!(w.completed, 2);
    assert!(stored_log(&w, "m1").behind() && !stored_log(&w, "m2").behind());
}

#[test]
fn while_a_migration_switches_a_resyncing_legs_refusal_sends_only_it_away() {
    // Swarm seed 4067: mid-switch, with the old leg the only leg of the
    // old map in sync, a resyncing leg's disk was full under a write.
    // No one could vouch for it leaving, so its refusal was taken for
    // the last copy's, and the legs in sync that took the write were
    // sent away to be copied back from it: none was left in sync.
    let region = world_config().region;
    let mut w = World::new(mirror(3), 2);
    w.engine.leg_failed(0);
    w.engine.leg_failed(1);
    w.drain();
    let finish = |w: &mut World| {
        for _ in 0..100 {
            w.logs_stored();
            w.drain();
            while w.answer_one(false) {
                w.drain();
            }
        }
    };
    w.write_marked(1, 3 * region, 7);
    finish(&mut w);
    assert_eq!(w.completed, 1);
    let to = w.migrate_to_new(2, "new");
    w.copy_until_switch();
    w.engine.leg_returned(1, w.now);
    w.drain();
    assert!(matches!(w.engine.leg_state(1), LegState::Resyncing { cursor } if cursor > 0));
    w.engine
        .submit(2, IoRequest::write(0, stamp(2, 0, 8), false), w.now);
    w.drain();
    w.logs_stored();
    w.drain();
    let token = w.take_pending(1, Op::Write);
    w.engine
        .leg_complete(token, Err(IoErrorKind::NoSpace), w.now);
    w.drain();
    assert_eq!(
        w.engine.leg_state(1),
        LegState::Away,
        "the refusing leg left"
    );
    assert_eq!(w.engine.leg_state(2), LegState::InSync);
    assert_eq!(w.engine.leg_state(to), LegState::InSync);
    finish(&mut w);
    assert_eq!(w.completed, 2, "the write succeeded on the legs in sync");
    assert!(w.checker.violations().is_empty());
}

#[test]
fn a_flush_does_not_wait_for_a_leg_that_left() {
    // Found by `braid soak --volume mirror3`: a FLUSH sent to a leg whose
    // server then died waited for that server's return, ten seconds.
    let mut w = World::new(mirror(2), 11);
    w.checker.submit(1, Op::Flush, 0, 0);
    w.engine.submit(1, IoRequest::flush(), w.now);
    w.drain();
    assert_eq!(w.pending.len(), 2, "one FLUSH per leg");
    w.down[1] = true;
    while w.answer_one(false) {
        w.drain();
    }
    assert_eq!(w.completed, 0, "leg 1 has not answered");
    w.engine.leg_failed(1);
    w.drain();
    assert_eq!(
        w.completed, 0,
        "held until the logs say leg 1 missed it (a restart would trust it)"
    );
    let generation = w.persist.take().expect("leg 1 leaving is stored");
    w.engine.logs_stable(generation, w.now);
    w.drain();
    assert_eq!(
        w.completed, 1,
        "the FLUSH completes on the leg still in sync"
    );
    w.settle();
    assert!(w.checker.violations().is_empty());
}

#[test]
fn a_read_whose_legs_left_is_served_when_one_returns_even_after_a_migration() {
    // A read of a 3-way mirror goes to m1, which leaves; then to m2, which
    // leaves; then to m0, which a migration retires. Legs it was taken
    // from because they left (not because they failed it) must be tried
    // again once back: before, the read waited for ever once m0 retired.
    let mut w = World::new(mirror(3), 13);
    let info = leaf_info();
    // The read's copies go unanswered (held aside) wherever it is sent.
    let mut held = Vec::new();
    let hold = |w: &mut World, held: &mut Vec<(u64, usize, IoRequest)>| {
        let (mine, rest): (Vec<_>, Vec<_>) = w
            .pending
            .drain(..)
            .partition(|(_, _, io)| io.op == Op::Read && io.offset == 0 && io.len == 4096);
        w.pending = rest;
        held.extend(mine);
    };
    let run_until = |w: &mut World, held: &mut Vec<_>, done: &dyn Fn(&World) -> bool| {
        for _ in 0..100_000 {
            if done(w) {
                return;
            }
            w.now = w.now + Duration::from_millis(1);
            w.engine.handle_timeout(w.now);
            if let Some(g) = w.persist.take() {
                w.engine.logs_stable(g, w.now);
            }
            w.drain();
            hold(w, held);
            while w.answer_one(false) {
                w.drain();
                hold(w, held);
            }
        }
        panic!("never got there: {:?}", w.engine.in_flight());
    };
    w.engine.suspend(0).unwrap();
    w.checker.submit(1, Op::Read, 0, 4096);
    w.engine.submit(1, IoRequest::read(0, 4096), w.now);
    w.drain();
    hold(&mut w, &mut held);
    w.engine.leg_failed(1);
    w.drain();
    hold(&mut w, &mut held);
    // Late answers from a leg that left are ignored (and let it drain).
    let late = |w: &mut World, held: &mut Vec<(u64, usize, IoRequest)>, leg: usize| {
        for (token, _, io) in held.iter().filter(|h| h.1 == leg) {
            let data = bytes::Bytes::from(vec![0; io.len as usize]);
            w.engine.leg_complete(*token, Ok(data), w.now);
        }
        held.retain(|h| h.1 != leg);
        w.drain();
    };
    late(&mut w, &mut held, 1);
    w.engine.resume(0, w.now);
    w.engine.leg_returned(1, w.now);
    let in_sync = |w: &World, l: usize| w.engine.leg_state(l) == LegState::InSync;
    run_until(&mut w, &mut held, &|w| in_sync(w, 0) && in_sync(w, 1));
    w.engine.leg_failed(2);
    w.drain();
    hold(&mut w, &mut held);
    assert_eq!(held.iter().map(|h| h.1).collect::<Vec<_>>(), vec![2, 0]);
    late(&mut w, &mut held, 2);
    w.engine.migrate(0, "new", info, w.now).unwrap();
    w.legs.push(vec![0xee; LEAF as usize]);
    w.media.push(LegMedia::new(vec![0xee; LEAF as usize]));
    w.down.push(false);
    w.engine.leg_returned(2, w.now);
    run_until(&mut w, &mut held, &|w| w.store_map.is_some());
    w.map_store_lands();
    assert_eq!(w.engine.leg_state(0), LegState::Retired);
    w.settle();
    assert_eq!(
        w.completed,
        1,
        "the read was never served: {:?}",
        w.engine.in_flight()
    );
    assert!(w.checker.violations().is_empty());
}

#[test]
fn a_write_intent_mark_stays_until_a_flush_covers_the_write() {
    // A leg that loses power after the client died loses what it had not
    // flushed; only a mark left in the log makes the restart copy that
    // region, so the mark outlives the write until a FLUSH (or FUA).
    let mut w = World::new(mirror(2), 17);
    let finish = |w: &mut World| {
        for _ in 0..100 {
            if let Some(g) = w.persist.take() {
                w.engine.logs_stable(g, w.now);
            }
            w.drain();
            while w.answer_one(false) {
                w.drain();
            }
        }
    };
    w.checker.submit(1, Op::Write, 0, 4096);
    w.engine
        .submit(1, IoRequest::write(0, stamp(1, 0, 8), false), w.now);
    finish(&mut w);
    assert_eq!(w.completed, 1);
    assert_eq!(w.engine.log(0).dirty_count(), 1, "unflushed: marked");
    w.checker.submit(2, Op::Flush, 0, 0);
    w.engine.submit(2, IoRequest::flush(), w.now);
    finish(&mut w);
    assert_eq!(w.completed, 2);
    assert_eq!(w.engine.log(0).dirty_count(), 0, "flushed: clear");
    // FUA is durable at once.
    w.checker.submit(3, Op::Write, 65536, 4096);
    w.engine
        .submit(3, IoRequest::write(65536, stamp(3, 128, 8), true), w.now);
    finish(&mut w);
    assert_eq!(w.engine.log(1).dirty_count(), 0, "FUA: clear");
    assert!(w.checker.violations().is_empty());
}

#[test]
fn a_write_to_a_region_whose_mark_is_still_being_stored_waits_for_it() {
    // Swarm seed 232: a write found its region already marked and went
    // out, but the store of that mark was still under way; the client
    // died before it landed, and the restart found the region clean on
    // both legs while the write had reached one of them.
    let mut w = World::new(mirror(2), 14);
    w.engine
        .submit(1, IoRequest::write(0, stamp(1, 0, 8), false), w.now);
    w.drain();
    let marking = w.persist.take().expect("the first write's mark is stored");
    w.engine
        .submit(2, IoRequest::write(512, stamp(2, 1, 1), false), w.now);
    w.drain();
    assert!(
        w.pending.is_empty(),
        "no write leaves before its mark is stable: {:?}",
        w.pending
    );
    w.engine.logs_stable(marking, w.now);
    w.drain();
    assert_eq!(w.pending.len(), 4, "both writes, to both legs");
}

#[test]
fn a_write_one_leg_loses_to_a_power_cut_after_the_client_died_is_copied_back() {
    // What the write-intent marks kept until a FLUSH are for: the client
    // dies with a write acknowledged by both legs and flushed by
    // neither, and one leg's server then loses power and the write with
    // it. The restart must copy that region, or the legs disagree.
    let marks_cleared_early = VolumeSabotage {
        no_unflushed_marks: true,
        ..VolumeSabotage::default()
    };
    let caught = std::panic::catch_unwind(|| power_cut_after_the_client_died(marks_cleared_early));
    assert!(
        caught.is_err(),
        "marks cleared before a FLUSH went unnoticed"
    );
    power_cut_after_the_client_died(VolumeSabotage::default());
}

fn power_cut_after_the_client_died(sabotage: VolumeSabotage) {
    let region = world_config().region;
    let mut w = World::sabotaged(mirror(2), 2, sabotage);
    w.swarm.restart = true;
    w.swarm.power = true;
    w.checker.unacked_reads_may_revert = true;
    let finish = |w: &mut World| {
        for _ in 0..100 {
            w.logs_stored();
            w.drain();
            while w.answer_one(false) {
                w.drain();
            }
        }
    };
    // The second write's mark stores the logs again, after the first
    // write's region went quiet.
    for (user, at) in [(1, 0), (2, 5 * region)] {
        w.checker.submit(user, Op::Write, at, 4096);
        let data = stamp(user, at / 512, 8);
        w.engine
            .submit(user, IoRequest::write(at, data, false), w.now);
        finish(&mut w);
    }
    assert_eq!(w.completed, 2);
    w.restart();
    w.power_cut(0, 0.0);
    assert_ne!(w.legs[0][..4096], w.legs[1][..4096], "leg 0 lost the write");
    w.settle();
    w.converged().unwrap();
    w.checker.submit(3, Op::Read, 0, 4096);
    w.engine.submit(3, IoRequest::read(0, 4096), w.now);
    finish(&mut w);
    assert_eq!(w.completed, 3);
    assert!(
        w.checker.violations().is_empty(),
        "{:?}",
        w.checker.violations()
    );
}

#[test]
fn a_write_a_leg_missed_is_acknowledged_only_once_the_log_says_so() {
    // Found by madsim (mirror-restart seed 103): a leg's disk filled under
    // a write, the write was acknowledged from the other leg, the client
    // died before the log said the first leg was behind, and the restart
    // trusted that leg and copied its older data over the write.
    let mut w = World::new(mirror(2), 14);
    w.write_marked(1, 0, 7);
    assert_eq!(w.pending.len(), 2, "one copy per leg");
    w.engine.leg_failed(0);
    w.answer_leg(1);
    w.drain();
    assert_eq!(w.completed, 0, "held until leg 0 is stored as behind");
    let leaving = w.persist.take().expect("leg 0 leaving is stored");
    // What a restart would load once that store lands: leg 1 is the
    // source, leg 0 copies from it.
    let restarted = w.restarted();
    assert_eq!(restarted.leg_state(0), LegState::Resyncing { cursor: 0 });
    assert_eq!(restarted.leg_state(1), LegState::InSync);
    w.engine.logs_stable(leaving, w.now);
    w.drain();
    assert_eq!(w.completed, 1, "acknowledged once the log is stable");
}

#[test]
fn a_restarted_volume_flushes_the_legs_it_trusts_before_any_io_or_copy() {
    // What the dead run wrote may sit in the trusted leg's cache. Copied
    // to the other leg, then lost to a power cut on the trusted one, it
    // would leave the legs disagreeing with no mark left to repair them.
    let spec = VolumeSpec::Mirror {
        quorum: None,
        legs: vec![e("a"), e("b")],
    };
    let map = VolumeMap::new(&spec, |_| Some(leaf_info())).unwrap();
    let config = VolumeConfig {
        region: 16 << 10,
        ..VolumeConfig::default()
    };
    let mut intent = DirtyRegions::new(LEAF, 16 << 10).unwrap();
    intent.mark(0, 1);
    let mut missed = intent.clone();
    missed.set_behind(true);
    let mut engine = VolumeEngine::new(map, config, Some(vec![intent, missed])).unwrap();
    let mut actions: Vec<VolumeAction> = std::iter::from_fn(|| engine.poll_action()).collect();
    let settle = actions.iter().find_map(|a| match a {
        VolumeAction::LegIo { leg: 0, token, io } if io.op == Op::Flush => Some(*token),
        _ => None,
    });
    let Some(settle) = settle else {
        panic!("a FLUSH of the trusted leg first: {actions:?}")
    };
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, VolumeAction::LegIo { io, .. } if io.op != Op::Flush)),
        "nothing is copied before it lands: {actions:?}"
    );
    engine.submit(1, IoRequest::read(0, 4096), Instant::ZERO);
    engine.check().unwrap();
    assert!(engine.poll_action().is_none(), "the read waits too");
    assert_eq!(
        engine.poll_timeout(),
        None,
        "no timer while settling (a past one would spin the driver)"
    );
    engine.leg_complete(settle, Ok(bytes::Bytes::new()), Instant::ZERO);
    engine.check().unwrap();
    actions = std::iter::from_fn(|| engine.poll_action()).collect();
    let reads_to_a = actions
        .iter()
        .filter(|a| matches!(a, VolumeAction::LegIo { leg: 0, io, .. } if io.op == Op::Read))
        .count();
    assert_eq!(
        reads_to_a, 2,
        "the user's read and the copy of region 0 go to the trusted leg: {actions:?}"
    );
}

/// The leg each LegIo of `op` went to, in order.
fn legs_sent(actions: &[VolumeAction], op: Op) -> Vec<usize> {
    actions
        .iter()
        .filter_map(|a| match a {
            VolumeAction::LegIo { leg, io, .. } if io.op == op => Some(*leg),
            _ => None,
        })
        .collect()
}

/// An engine over `spec` restarted with every log clean, and the FLUSH
/// it sent each leg first: (leg, token).
fn restarted_after_a_clean_stop(spec: VolumeSpec) -> (VolumeEngine, Vec<(usize, u64)>) {
    let map = VolumeMap::new(&spec, |_| Some(leaf_info())).unwrap();
    let config = VolumeConfig {
        region: 16 << 10,
        ..VolumeConfig::default()
    };
    let clean = DirtyRegions::new(map.size(), config.region).unwrap();
    let logs = vec![clean; map.leaves().len()];
    let mut engine = VolumeEngine::new(map, config, Some(logs)).unwrap();
    let settles = std::iter::from_fn(|| engine.poll_action())
        .filter_map(|a| match a {
            VolumeAction::LegIo { leg, token, io } if io.op == Op::Flush => Some((leg, token)),
            _ => None,
        })
        .collect();
    (engine, settles)
}

#[test]
fn a_restarted_unmirrored_leg_serves_nothing_before_its_flush_and_holds_up_no_other() {
    // A dead run's write may sit in an export's cache. Read from there
    // and then lost to a power cut, it would be seen and then unseen
    // (swarm seed 11909). The other export's bytes need not wait.
    let (mut engine, settles) =
        restarted_after_a_clean_stop(VolumeSpec::Linear(vec![e("a"), e("b")]));
    assert_eq!(
        settles.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 1],
        "each export settles"
    );
    let write =
        |offset: u64, len: usize| IoRequest::write(offset, bytes::Bytes::from(vec![1; len]), false);
    engine.submit(1, IoRequest::read(0, 4096), Instant::ZERO);
    engine.submit(2, IoRequest::flush(), Instant::ZERO);
    engine.submit(3, IoRequest::read(LEAF + 8192, 4096), Instant::ZERO);
    engine.submit(4, write(0, 4096), Instant::ZERO);
    // Across the seam, so it waits for a; the read after it of b's side
    // waits behind it, or it could see b's bytes from before the write.
    engine.submit(5, write(LEAF - 4096, 8192), Instant::ZERO);
    engine.submit(6, IoRequest::read(LEAF, 4096), Instant::ZERO);
    engine.check().unwrap();
    assert!(engine.poll_action().is_none(), "nothing runs yet");
    engine.leg_complete(settles[1].1, Ok(bytes::Bytes::new()), Instant::ZERO);
    engine.check().unwrap();
    let actions: Vec<VolumeAction> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert_eq!(
        (
            legs_sent(&actions, Op::Read),
            legs_sent(&actions, Op::Flush)
        ),
        (vec![1], vec![]),
        "b settled: its first read goes; what reaches a, the FLUSH and the read behind the \
         write across the seam wait: {actions:?}"
    );
    assert!(legs_sent(&actions, Op::Write).is_empty(), "{actions:?}");
    engine.leg_complete(settles[0].1, Ok(bytes::Bytes::new()), Instant::ZERO);
    engine.check().unwrap();
    let actions: Vec<VolumeAction> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert_eq!(
        (
            legs_sent(&actions, Op::Read),
            legs_sent(&actions, Op::Flush)
        ),
        (vec![0], vec![0, 1]),
        "a settled: the rest goes, in order: {actions:?}"
    );
    assert_eq!(
        legs_sent(&actions, Op::Write),
        [0, 1],
        "the write across the seam goes; the one behind the read it overlaps, and the read \
         behind the write, wait: {actions:?}"
    );
}

#[test]
fn an_export_that_starts_to_move_while_it_settles_holds_up_no_other_bytes() {
    // madsim migrate-restart seed 958: a restarted linear volume, its
    // export away at the restart, so its settling FLUSH is still out when
    // the operator moves it. The move gives it a second copy; then the
    // mirror beside it waited for that FLUSH too (the export's disk was
    // stalled: 1.1 s without an answer to the mirror's own IO).
    let (mut engine, settles) = restarted_after_a_clean_stop(VolumeSpec::Linear(vec![
        VolumeSpec::Mirror {
            quorum: None,
            legs: vec![e("a"), e("b")],
        },
        e("c"),
    ]));
    assert_eq!(
        settles.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 1, 2],
        "every leg settles"
    );
    for (_, token) in &settles[..2] {
        engine.leg_complete(*token, Ok(bytes::Bytes::new()), Instant::ZERO);
    }
    engine.migrate(2, "d", leaf_info(), Instant::ZERO).unwrap();
    engine.check().unwrap();
    let _ = std::iter::from_fn(|| engine.poll_action()).count();
    engine.submit(1, IoRequest::read(LEAF + 4096, 4096), Instant::ZERO);
    engine.submit(2, IoRequest::read(0, 4096), Instant::ZERO);
    engine.check().unwrap();
    let actions: Vec<VolumeAction> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert_eq!(
        legs_sent(&actions, Op::Read).len(),
        1,
        "the mirror's read goes; the export's waits for its FLUSH: {actions:?}"
    );
    assert!(legs_sent(&actions, Op::Read)[0] < 2, "{actions:?}");
    engine.leg_complete(settles[2].1, Ok(bytes::Bytes::new()), Instant::ZERO);
    engine.check().unwrap();
    let actions: Vec<VolumeAction> = std::iter::from_fn(|| engine.poll_action()).collect();
    assert!(
        legs_sent(&actions, Op::Read).contains(&2),
        "the export settled: its read goes: {actions:?}"
    );
}

#[test]
fn a_trusted_leg_lost_while_it_settles_is_no_longer_waited_for() {
    // A restart after a clean stop: every leg is trusted and settles.
    let (mut engine, settles) = restarted_after_a_clean_stop(VolumeSpec::Mirror {
        quorum: None,
        legs: vec![e("a"), e("b"), e("c")],
    });
    assert_eq!(
        settles.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 1, 2],
        "every trusted leg settles"
    );
    assert_eq!(engine.leg_outstanding(0), 1);
    engine.leg_failed(0);
    engine.check().unwrap();
    assert_eq!(engine.leg_outstanding(0), 0, "its FLUSH is given up on");
    engine.submit(1, IoRequest::read(0, 4096), Instant::ZERO);
    for (_, token) in &settles[1..] {
        engine.leg_complete(*token, Ok(bytes::Bytes::new()), Instant::ZERO);
    }
    engine.check().unwrap();
    let reads: Vec<usize> = std::iter::from_fn(|| engine.poll_action())
        .filter_map(|a| match a {
            VolumeAction::LegIo { leg, io, .. } if io.op == Op::Read => Some(leg),
            _ => None,
        })
        .collect();
    assert!(
        matches!(reads[..], [1] | [2]),
        "the others settled, so the read goes on: {reads:?}"
    );
}

fn mirror_with_quorum(n: usize, quorum: usize) -> VolumeSpec {
    VolumeSpec::Mirror {
        quorum: Some(quorum),
        legs: (0..n).map(|i| e(&format!("m{i}"))).collect(),
    }
}

#[test]
fn quorum_mirrors_hold_reads_and_converge_through_every_fault() {
    // BRAID_VOLUME_SEEDS=N runs more (300 clean when quorum writes landed).
    let seeds: u64 = std::env::var("BRAID_VOLUME_SEEDS").map_or(30, |v| v.parse().unwrap());
    for seed in 0..seeds {
        let spec = if seed % 2 == 0 {
            mirror_with_quorum(3, 2)
        } else {
            mirror_with_quorum(3, 1)
        };
        let w = run(spec, 500 + seed, 3_000);
        w.assert_clean(seed);
        assert!(w.completed > 500, "seed {seed}: only {} IOs", w.completed);
    }
}

#[test]
fn a_write_acknowledged_at_quorum_leaves_the_slow_leg_behind_in_the_stored_log() {
    let mut w = World::new(mirror_with_quorum(3, 2), 15);
    w.write_marked(1, 0, 9);
    assert_eq!(w.pending.len(), 3);
    w.answer_leg(0);
    w.answer_leg(1);
    w.drain();
    assert_eq!(w.completed, 0, "held until leg 2 is stored as behind");
    let flagged = w.persist.take().expect("leg 2 lagging is stored");
    // A restart from the logs as now stored copies leg 2's region from a
    // leg that has the write.
    let restarted = w.restarted();
    assert_eq!(restarted.leg_state(0), LegState::InSync);
    assert_eq!(restarted.leg_state(2), LegState::Resyncing { cursor: 0 });
    w.engine.logs_stable(flagged, w.now);
    w.drain();
    assert_eq!(w.completed, 1, "acknowledged at quorum, before leg 2");
    // Leg 2 lands the write: it is in step again.
    w.answer_leg(2);
    w.drain();
    assert!(!w.engine.log(2).behind());
    w.engine.check().unwrap();
}

/// A 2-way mirror at quorum 1 where leg 0 has a write that leg 1 is still
/// writing (lagging), and a read of it that leg 0 has just failed with a
/// media error.
fn a_read_failed_on_the_only_leg_with_a_quorum_write(seed: u64) -> World {
    let mut w = World::new(mirror_with_quorum(2, 1), seed);
    w.write_marked(1, 0, 9);
    w.answer_leg(0);
    w.drain();
    let flagged = w.persist.take().expect("leg 1 lagging is stored");
    w.engine.logs_stable(flagged, w.now);
    w.drain();
    assert_eq!(w.completed, 1, "acknowledged at quorum, before leg 1");
    w.engine.submit(2, IoRequest::read(0, 4096), w.now);
    w.drain();
    let token = w.take_pending(0, Op::Read);
    w.engine.leg_complete(token, Err(IoErrorKind::Media), w.now);
    w
}

#[test]
fn a_read_the_only_leg_with_a_quorum_write_fails_waits_for_the_lagging_copy() {
    // Swarm seed 32 (a 3-way mirror at quorum 1): a read failed with a
    // media error on the one leg that had a write acknowledged at quorum,
    // while another leg in sync was still writing it; the error went to
    // the user, though that leg would hold the bytes a moment later.
    let mut w = a_read_failed_on_the_only_leg_with_a_quorum_write(17);
    assert_eq!(
        w.answer_to(2),
        None,
        "the read waits for leg 1 rather than failing"
    );
    // Leg 1 lands the write, and then serves the read.
    let token = w.take_pending(1, Op::Write);
    w.engine.leg_complete(token, Ok(bytes::Bytes::new()), w.now);
    assert_eq!(w.answer_to(2), None);
    let token = w.take_pending(1, Op::Read);
    let nines = bytes::Bytes::from(vec![9u8; 4096]);
    w.engine.leg_complete(token, Ok(nines.clone()), w.now);
    assert_eq!(w.answer_to(2), Some(Ok(nines)));
    w.engine.check().unwrap();
}

#[test]
fn a_leg_back_in_sync_under_a_write_acknowledged_without_it_stays_behind() {
    // Swarm seed 332 (quorum 1): leg 0 finished its resync while a write
    // acknowledged by leg 1 alone was still on its way to it, was counted
    // in sync and not behind, and vouched alone for a later write leg 1
    // had not landed. A failure on each leg then left neither holding
    // every acknowledged write, and both were sent away.
    let region = world_config().region;
    let mut w = World::new(mirror_with_quorum(2, 1), 2);
    // Everything but leg 0's copy of the write at offset 0 lands.
    let run = |w: &mut World| {
        for _ in 0..200 {
            w.now = w.now + Duration::from_millis(1);
            w.engine.handle_timeout(w.now);
            w.drain();
            w.logs_stored();
            w.drain();
            let held =
                |p: &(u64, usize, IoRequest)| p.1 == 0 && p.2.op == Op::Write && p.2.offset == 0;
            while let Some(i) = w.pending.iter().position(|p| !held(p)) {
                let (token, leg, io) = w.pending.remove(i);
                let data = w.carry_out(leg, &io);
                w.engine.leg_complete(token, Ok(data), w.now);
                w.drain();
            }
        }
    };
    w.engine.leg_failed(0);
    w.engine.submit(
        1,
        IoRequest::write(3 * region, stamp(1, 0, 8), false),
        w.now,
    );
    run(&mut w);
    assert_eq!(w.completed, 1);
    w.engine.leg_returned(0, w.now);
    w.drain();
    assert!(matches!(w.engine.leg_state(0), LegState::Resyncing { cursor } if cursor > 0));
    w.engine
        .submit(2, IoRequest::write(0, stamp(2, 0, 8), false), w.now);
    run(&mut w);
    assert_eq!(w.completed, 2, "acknowledged by leg 1 alone");
    assert_eq!(w.engine.leg_state(0), LegState::InSync, "resync done");
    assert!(
        w.engine.log(0).behind(),
        "leg 0 still lacks an acknowledged write"
    );
    let token = w.take_pending(0, Op::Write);
    w.engine.leg_complete(token, Ok(bytes::Bytes::new()), w.now);
    w.drain();
    assert!(!w.engine.log(0).behind(), "caught up");
    w.engine.check().unwrap();
}

#[test]
fn a_read_waiting_for_a_lagging_copy_fails_once_that_copy_leaves() {
    // As above, but leg 1 goes away before it lands the write: no copy
    // is left to catch up, and the read fails as one disk's would, rather
    // than waiting for a leg that may never come back.
    let mut w = a_read_failed_on_the_only_leg_with_a_quorum_write(18);
    assert_eq!(w.answer_to(2), None, "it waits while leg 1 catches up");
    w.engine.leg_failed(1);
    assert_eq!(w.answer_to(2), Some(Err(IoErrorKind::Media)));
    w.engine.check().unwrap();
}

#[test]
fn a_flush_covers_writes_submitted_before_it_that_still_wait_for_their_marks() {
    // madsim mirror-quorum seed 41: the FLUSH went out while an earlier
    // write waited (there for a region being copied), so the legs'
    // clients were never asked to cover it.
    let mut w = World::new(mirror(2), 16);
    let data = bytes::Bytes::from(vec![5u8; 4096]);
    w.engine.submit(1, IoRequest::write(0, data, false), w.now);
    w.engine.submit(2, IoRequest::flush(), w.now);
    w.drain();
    assert!(
        w.pending.is_empty(),
        "neither goes out before the marks are stable: {:?}",
        w.pending
    );
    let marks = w.persist.take().expect("write intent first");
    w.engine.logs_stable(marks, w.now);
    w.drain();
    let ops: Vec<Op> = w.pending.iter().map(|p| p.2.op).collect();
    assert_eq!(ops, [Op::Write, Op::Write, Op::Flush, Op::Flush]);
    w.engine.check().unwrap();
}

/// Pinned: with regions of two leg IOs, write-zeroes landed on a resyncing
/// leg where it had caught up, a read saw them there, the last in-sync
/// leg refused them (media error) and the volume went back to the old
/// bytes: the next read, from the in-sync leg, went back in time. Reads
/// now come from in-sync legs only.
#[test]
fn a_read_never_sees_what_the_last_in_sync_leg_then_refused() {
    let w = run(mirror(3), 13, 3_000);
    w.assert_clean(13);
}

#[test]
fn a_run_fenced_on_one_leg_stops_on_every_leg() {
    // A newer run of this volume (started from a copy of its data dir
    // while this one was paused) has reached leg 0 but not leg 1. Dropping
    // only leg 0, as for any other error, this run would go on writing to
    // leg 1, and the newer run's log would never know to repair that.
    let mut w = World::new(mirror(2), 21);
    w.write_marked(1, 0, 7);
    w.engine.submit(2, IoRequest::read(65536, 4096), w.now);
    w.drain();
    assert_eq!(w.pending.len(), 3, "a copy per leg and the read");
    let actions = |w: &mut World| std::iter::from_fn(|| w.engine.poll_action()).collect::<Vec<_>>();
    let fenced = |user| VolumeAction::Complete {
        user,
        result: Err(IoErrorKind::Fenced),
    };

    let at = w
        .pending
        .iter()
        .position(|p| p.1 == 0 && p.2.op == Op::Write)
        .unwrap();
    let (token, _, _) = w.pending.remove(at);
    w.engine
        .leg_complete(token, Err(IoErrorKind::Fenced), w.now);
    assert_eq!(w.engine.fenced_by(), Some(0));
    assert_eq!(
        actions(&mut w),
        [fenced(1), fenced(2)],
        "nothing unanswered is left"
    );
    w.engine.check().unwrap();

    // What was already on the wire still answers; nothing comes of it.
    for (token, _, _) in std::mem::take(&mut w.pending) {
        w.engine.leg_complete(token, Ok(bytes::Bytes::new()), w.now);
    }
    assert_eq!(actions(&mut w), []);
    assert_eq!(
        (w.engine.leg_outstanding(0), w.engine.leg_outstanding(1)),
        (0, 0)
    );

    // Nothing new reaches any leg, the logs included.
    w.engine.submit(
        3,
        IoRequest::write(131072, bytes::Bytes::from(vec![9; 4096]), false),
        w.now,
    );
    w.engine.submit(4, IoRequest::flush(), w.now);
    w.engine.leg_failed(1);
    w.engine.leg_returned(1, w.now);
    w.engine.handle_timeout(w.now + Duration::from_secs(1));
    assert_eq!(actions(&mut w), [fenced(3), fenced(4)]);
    assert_eq!(w.engine.poll_timeout(), None);
    assert!(w.engine.suspend(1).unwrap_err().contains("newer run"));
    w.engine.check().unwrap();
}

/// A newer run may take a leg over at any moment: wherever the engine
/// stands (resyncing, migrating, settling, writes waiting for their
/// marks), the first FENCED answer ends the run whole. Nothing more goes
/// to any leg, its logs included, every IO is answered, and no read
/// before it saw anything wrong.
#[test]
fn a_fence_at_any_moment_ends_the_run_whole() {
    for seed in 0..24 {
        let (mut w, shape) = World::swarm(seed);
        // The fenced run must stop; a new run after it is another matter.
        w.swarm.restart = false;
        let steps = 200 + w.rng.below(2_800);
        for _ in 0..steps {
            w.step(true);
        }
        let leg = if w.pending.is_empty() {
            let leg = w.pick(false);
            w.engine.leg_fenced(leg);
            leg
        } else {
            let (token, leg, _) = w
                .pending
                .remove(w.rng.below(w.pending.len() as u64) as usize);
            w.engine
                .leg_complete(token, Err(IoErrorKind::Fenced), w.now);
            leg
        };
        w.drain();
        if w.engine.fenced_by().is_none() {
            // That IO was given up on when its leg went away, and the
            // engine no longer knows whose it was: the driver tells it
            // too, once the leg's client is fenced (`when_fenced`).
            assert_ne!(w.engine.leg_state(leg), LegState::InSync, "seed {seed}");
            w.engine.leg_fenced(leg);
            w.drain();
        }
        assert_eq!(w.engine.fenced_by(), Some(leg), "seed {seed} ({shape})");
        w.persist = None;
        let on_the_wire: std::collections::BTreeSet<u64> = w.pending.iter().map(|p| p.0).collect();
        for _ in 0..1_000 {
            w.step(true);
            assert!(
                w.pending.iter().all(|p| on_the_wire.contains(&p.0)) && w.persist.is_none(),
                "seed {seed} ({shape}): a fenced run sent leg IO or stored its logs"
            );
        }
        w.down.fill(false);
        while w.answer_one(false) {
            w.drain();
        }
        assert_eq!(
            w.completed,
            w.next_user - 1,
            "seed {seed} ({shape}): IO left unanswered"
        );
        assert!(
            (0..w.legs.len()).all(|l| w.engine.leg_outstanding(l) == 0),
            "seed {seed} ({shape})"
        );
        assert_eq!(w.engine.poll_timeout(), None, "seed {seed} ({shape})");
        if let Some(v) = w.checker.violations().first() {
            panic!("seed {seed} ({shape}): {v}");
        }
    }
}

#[test]
fn a_copy_waiting_for_its_source_holds_up_no_other_legs_writes() {
    // 4 KiB chunks in 16 KiB regions: region 0 holds chunks 0 and 2 of s0,
    // 1 and 3 of s1. s0 moves to n, and stops answering while region 0
    // is copied from it.
    let spec = VolumeSpec::Stripe {
        chunk: 4096,
        legs: vec![e("s0"), e("s1")],
    };
    let mut w = World::new(spec, 11);
    let to = w.migrate_to_new(0, "n");
    w.down[0] = true;
    w.engine.handle_timeout(w.now);
    w.drain();
    let writes_to = |w: &World, legs: &[usize], offset: u64| {
        w.pending
            .iter()
            .any(|(_, leg, io)| legs.contains(leg) && io.op == Op::Write && io.offset == offset)
    };
    assert!(
        w.pending
            .iter()
            .any(|(_, leg, io)| *leg == 0 && io.op == Op::Read && io.offset == 0),
        "the copy of region 0 reads s0: {:?}",
        w.pending
    );
    // Chunk 1 is s1's first: nothing of it is being copied.
    let block = |b| bytes::Bytes::from(vec![b; 4096]);
    w.engine
        .submit(1, IoRequest::write(4096, block(1), false), w.now);
    w.drain();
    assert!(writes_to(&w, &[1], 0), "the write to s1 goes out at once");
    // Chunk 0 is what the copy writes to n: that write waits for it.
    w.engine
        .submit(2, IoRequest::write(0, block(2), false), w.now);
    w.drain();
    if let Some(marks) = w.persist.take() {
        w.engine.logs_stable(marks, w.now);
        w.drain();
    }
    assert!(
        !writes_to(&w, &[0, to], 0),
        "the write to chunk 0 waits for the copy"
    );
    // s0 answers: the copy lands, then the held write goes to both.
    w.down[0] = false;
    while w.answer_one(false) {
        w.drain();
        if let Some(marks) = w.persist.take() {
            w.engine.logs_stable(marks, w.now);
            w.drain();
        }
        if writes_to(&w, &[0], 0) && writes_to(&w, &[to], 0) {
            return;
        }
    }
    panic!("the held write never went out: {:?}", w.pending);
}

#[test]
fn a_write_waiting_on_a_leg_that_is_down_holds_up_no_copy_to_another() {
    // madsim's striped-mirrors seed 191127: a write spanning both halves
    // of a stripe waited on the half that was cut off; a leg of the other
    // half moved, and the copy of the region waited for all of the write,
    // holding writes to the bytes it copies on the half with nothing
    // wrong. 4 KiB chunks in 16 KiB regions: region 0 holds chunks 0 and
    // 2 of s0, 1 and 3 of s1.
    let spec = VolumeSpec::Stripe {
        chunk: 4096,
        legs: vec![e("s0"), e("s1")],
    };
    let mut w = World::new(spec, 12);
    let submit = |w: &mut World, user: u64, io: IoRequest| {
        w.checker.submit(user, io.op, io.offset, io.len);
        w.fua.insert(user, false);
        w.engine.submit(user, io, w.now);
        w.drain();
    };
    // Until nothing more moves, time passing for the copy's pacing.
    let run = |w: &mut World| {
        for _ in 0..1000 {
            w.now = w.now + Duration::from_millis(1);
            w.engine.handle_timeout(w.now);
            w.drain();
            if let Some(marks) = w.persist.take() {
                w.engine.logs_stable(marks, w.now);
                w.drain();
            }
            while w.answer_one(false) {
                w.drain();
            }
        }
    };
    // s0 is cut off (not yet known to be away): the write's part on
    // chunk 0 waits, its part on chunk 1 lands on s1.
    w.down[0] = true;
    submit(&mut w, 1, IoRequest::write(0, stamp(1, 0, 16), false));
    run(&mut w);
    assert_eq!(w.completed, 0, "the write waits for s0");
    // s1 moves: region 0's copy to the new leg is chunks 1 and 3.
    let to = w.migrate_to_new(1, "n");
    run(&mut w);
    // A write to chunk 3 waits only for that copy.
    submit(
        &mut w,
        2,
        IoRequest::write(12 << 10, stamp(2, 24, 8), false),
    );
    run(&mut w);
    assert_eq!(
        w.completed,
        1,
        "the write to s1's chunk 3 is answered while s0 is cut off: {:?}",
        w.engine.in_flight()
    );
    assert_eq!(
        w.legs[to][4096..8192],
        stamp(2, 24, 8)[..],
        "and it reached the new leg"
    );
}

#[test]
fn overlapping_reads_and_writes_run_in_the_order_they_came() {
    // madsim's mirror-errors seed 141285: a read and an overlapping write
    // ran together, one leg took the write first and served the read
    // from it, then left; the last leg in sync failed the write (its disk
    // full), and later reads no longer saw what the first one had.
    let mut w = World::new(mirror(2), 5);
    let submit = |w: &mut World, user: u64, io: IoRequest| {
        w.checker.submit(user, io.op, io.offset, io.len);
        w.fua.insert(user, false);
        w.engine.submit(user, io, w.now);
        w.drain();
        if let Some(marks) = w.persist.take() {
            w.engine.logs_stable(marks, w.now);
            w.drain();
        }
    };
    let sent = |w: &World, op: Op| w.pending.iter().any(|(_, _, io)| io.op == op);
    let answer_all = |w: &mut World| loop {
        if let Some(marks) = w.persist.take() {
            w.engine.logs_stable(marks, w.now);
            w.drain();
        } else if w.answer_one(false) {
            w.drain();
        } else {
            break;
        }
    };
    submit(&mut w, 1, IoRequest::read(0, 4096));
    let data = stamp(2, 0, 8);
    submit(&mut w, 2, IoRequest::write(0, data, false));
    assert!(
        sent(&w, Op::Read) && !sent(&w, Op::Write),
        "the write waits for the read"
    );
    // A read of other blocks is not held up by either.
    submit(&mut w, 3, IoRequest::read(8192, 4096));
    assert_eq!(w.pending.len(), 2, "{:?}", w.pending);
    answer_all(&mut w);
    // The read answered, the write went out, and was answered too.
    assert_eq!(w.completed, 3);
    submit(&mut w, 4, IoRequest::write(0, stamp(4, 0, 8), false));
    assert!(sent(&w, Op::Write));
    submit(&mut w, 5, IoRequest::read(512, 1024));
    assert!(!sent(&w, Op::Read), "the read waits for the write");
    answer_all(&mut w);
    assert_eq!(w.completed, 5);
    assert!(
        w.checker.violations().is_empty(),
        "{:?}",
        w.checker.violations()
    );
}

#[test]
fn a_leg_leaving_touches_no_read_out_on_another_leg() {
    // Reads of the plain export x and of the mirror's leg m0 are out
    // when the other mirror leg, m1, leaves. Only the parts waiting on
    // the leaving leg are its business: taken up too, each of these
    // would look for a copy it has not tried and is in sync, find none
    // (x is its only copy, m1 just left) and stall, deaf to the answer
    // on its way.
    let mut w = World::new(mirror_then_export(), 5);
    for (user, offset) in [(1, LEAF), (2, 0)] {
        w.checker.submit(user, Op::Read, offset, 4096);
        w.engine.submit(user, IoRequest::read(offset, 4096), w.now);
    }
    w.drain();
    let out = std::mem::take(&mut w.pending);
    let legs: Vec<usize> = out.iter().map(|p| p.1).collect();
    assert_eq!(legs, [2, 0], "to x, and to m0");
    w.engine.leg_failed(1);
    w.drain();
    assert_eq!(w.engine.leg_state(1), LegState::Away);
    assert!(w.pending.is_empty(), "sent again: {:?}", w.pending);
    for (token, leg, io) in out {
        let data = w.carry_out(leg, &io);
        w.engine.leg_complete(token, Ok(data), w.now);
    }
    w.drain();
    assert_eq!(w.completed, 2, "{:?}", w.engine.in_flight());
    w.settle();
    assert!(w.checker.violations().is_empty());
}

#[test]
fn a_read_sent_to_a_leg_before_its_migration_is_served_after_the_leg_fails_mid_switch() {
    // As below, but s0's server goes down while the switch waits for its
    // map store, so s0 leaves (the new leg holds its bytes) before it
    // retires. The read, planned when s0 was its only copy, must still
    // be waiting on s0 when s0 retires, to be planned afresh then: taken
    // off s0 as it left, it would find no copy to go to and stall for
    // good, the retiring giving it no second look.
    let mut w = World::new(stripe_of_exports(), 17);
    w.checker.submit(1, Op::Read, 0, 4096);
    w.engine.submit(1, IoRequest::read(0, 4096), w.now);
    w.drain();
    let (_, leg, _) = w.pending.pop().expect("the read went out");
    assert!(w.pending.is_empty() && leg == 0);
    let new = w.migrate_to_new(0, "new");
    w.copy_until_switch();
    w.engine.leg_failed(0);
    w.drain();
    assert_eq!(
        w.engine.leg_state(0),
        LegState::Away,
        "the new leg holds its bytes"
    );
    w.map_store_lands();
    w.answer_first_on(new);
    assert_eq!(w.completed, 1, "{:?}", w.engine.in_flight());
    w.settle();
    assert!(w.checker.violations().is_empty());
}

#[test]
fn a_read_and_a_flush_sent_to_a_leg_before_its_migration_do_not_wait_on_it_once_it_retires() {
    // A read and a FLUSH of s0, an export with no other copy, are sent
    // before s0 moves to a new leg, and s0's server never answers them.
    // Once s0 retires its successor holds every byte it held (copied with
    // FUA): the read goes there instead, and the FLUSH needs only the legs
    // still in the map. Waiting on s0, both would hang for good (no
    // io_timeout by default), as would every overlapping write behind the
    // read. The read's part has s0 as its only copy: giving it up without
    // planning it afresh on the new map would stall it for ever too. And
    // nothing is left out on s0, so its session closes.
    let mut w = World::new(stripe_of_exports(), 17);
    w.checker.submit(1, Op::Read, 0, 4096);
    w.engine.submit(1, IoRequest::read(0, 4096), w.now);
    w.checker.submit(2, Op::Flush, 0, 0);
    w.engine.submit(2, IoRequest::flush(), w.now);
    w.drain();
    let on_s0: Vec<_> = w.pending.iter().filter(|p| p.1 == 0).cloned().collect();
    assert_eq!(on_s0.len(), 2, "{:?}", w.pending);
    w.pending.retain(|p| p.1 != 0);
    let new = w.migrate_to_new(0, "new");
    w.copy_until_switch();
    assert_eq!(w.completed, 0, "both still wait on s0");
    w.map_store_lands();
    assert_eq!(w.engine.leg_state(0), LegState::Retired);
    assert_eq!(w.engine.leg_outstanding(0), 0, "s0's session may close");
    assert_eq!(w.completed, 1, "the FLUSH: {:?}", w.engine.in_flight());
    w.answer_first_on(new);
    assert_eq!(w.completed, 2, "{:?}", w.engine.in_flight());
    // s0's answers after all, late: not ours any more.
    for (token, _, io) in on_s0 {
        let data = w.carry_out(0, &io);
        w.engine.leg_complete(token, Ok(data), w.now);
    }
    w.drain();
    assert_eq!(w.completed, 2);
    w.settle();
    assert!(w.checker.violations().is_empty());
}
