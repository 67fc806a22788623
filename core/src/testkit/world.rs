//! The event loop of the in-memory world.

use super::checker::{Checker, Violation};
use super::disk::MemDisk;
use super::pattern::{stamp, SECTOR};
use super::vocabulary::Fault;
use crate::auth::Key;
use crate::client::{
    ChannelId, ClientAction, ClientConfig, ClientEngine, ClientStats, ClientTuning, IoRequest,
    Policy, Sabotage, SubmitError,
};
use crate::rng::SplitMix64;
use crate::server::{
    engine_for_frame, BackendOp, BackendRequest, ConnId, ExportConfig, ServerAction, ServerConfig,
    ServerEngine, ServerStats, ServerTuning,
};
use crate::wire::{decode_in, Message};
use crate::Instant;
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

/// How often each fault happens. Per-frame rates are probabilities; the
/// rest are expected events per virtual second.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRates {
    /// A frame vanishes.
    pub loss: f64,
    /// A frame arrives twice.
    pub duplicate: f64,
    /// One bit of a frame flips.
    pub corrupt: f64,
    /// A channel's connection is reset.
    pub kill_channel_per_sec: f64,
    /// A channel silently stops delivering (both ways).
    pub blackhole_per_sec: f64,
    /// The server becomes unreachable for a while.
    pub partition_per_sec: f64,
    /// The server process crashes and restarts (disk cache survives).
    pub crash_per_sec: f64,
    /// The server loses power (disk cache lost).
    pub power_loss_per_sec: f64,
    /// The disk stalls for a while.
    pub disk_stall_per_sec: f64,
    /// Longest outage (partition, server downtime, disk stall).
    pub outage_max: Duration,
}

impl FaultRates {
    /// No faults at all.
    pub fn none() -> Self {
        FaultRates {
            loss: 0.0,
            duplicate: 0.0,
            corrupt: 0.0,
            kill_channel_per_sec: 0.0,
            blackhole_per_sec: 0.0,
            partition_per_sec: 0.0,
            crash_per_sec: 0.0,
            power_loss_per_sec: 0.0,
            disk_stall_per_sec: 0.0,
            outage_max: Duration::from_millis(500),
        }
    }

    /// Every fault class at once, often.
    pub fn all() -> Self {
        FaultRates {
            loss: 0.01,
            duplicate: 0.01,
            corrupt: 0.005,
            kill_channel_per_sec: 1.0,
            blackhole_per_sec: 0.5,
            partition_per_sec: 0.2,
            crash_per_sec: 0.2,
            power_loss_per_sec: 0.2,
            disk_stall_per_sec: 0.3,
            outage_max: Duration::from_millis(800),
        }
    }
}

/// The shape of one run.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    /// Everything random in the run derives from this.
    pub seed: u64,
    /// Channels per session.
    pub channels: usize,
    /// Disk size in sectors (small, so IOs overlap).
    pub disk_sectors: u64,
    /// IOs the workload keeps outstanding.
    pub queue_depth: usize,
    /// Largest IO in sectors.
    pub io_sectors_max: u64,
    /// Workload and faults run this long...
    pub run_for: Duration,
    /// ...then faults heal and every IO must finish within this.
    pub heal_within: Duration,
    /// Faults.
    pub faults: FaultRates,
    /// One-way link delay range.
    pub link_delay: (Duration, Duration),
    /// Disk latency range.
    pub disk_latency: (Duration, Duration),
    /// Channel selection.
    pub policy: Policy,
    /// The client's `sticky_slack` (0: every request to the least loaded).
    pub sticky_slack: u32,
    /// Client dirty window.
    pub max_dirty_bytes: u64,
    /// Test-only client sabotage.
    pub sabotage: Sabotage,
    /// Test-only server sabotage.
    pub no_dedup: bool,
    /// Test-only: the server runs overlapping mutations in any order.
    pub no_overlap_gate: bool,
    /// Record every step in [`Report::steps`] (costs memory; for finding
    /// where two runs of a seed diverge).
    pub record_steps: bool,
    /// The workload stops submitting after this many IOs (faults go on
    /// until `run_for`): bounds the work of a run whose drawn latencies are
    /// tiny, as the VOPR bounds its runs by ticks.
    pub ios_max: u64,
    /// Client timers: keep-alive, dead-channel timeout, resend bounds.
    pub keepalive_interval: Duration,
    /// See `keepalive_interval`.
    pub channel_timeout: Duration,
    /// See `keepalive_interval`.
    pub resend_min: Duration,
    /// See `keepalive_interval`.
    pub resend_max: Duration,
    /// The server's limit on requests in flight per session.
    pub server_max_inflight: u32,
    /// The server's payload limit (at least the largest IO).
    pub server_max_payload: u32,
    /// The server's clock against the client's: it starts `offset` ahead
    /// and runs `rate` times as fast (1.0: no skew). braid's frames carry
    /// no timestamps, so each side's timers must work on its own clock.
    pub server_clock: (Duration, f64),
    /// Runtime tuning at virtual times after the start, as an operator's
    /// `braid set` would do it: (when, client changes, server changes).
    pub tunings: Vec<(Duration, ClientTuning, ServerTuning)>,
    /// The client's key withdrawn from the server at virtual times after
    /// the start, each for a while, as an operator rotating keys by
    /// mistake would: (when, for how long). The server holds another
    /// client's key meanwhile, so its table is never empty.
    pub key_withdrawals: Vec<(Duration, Duration)>,
    /// Protocol engines the server runs (`braid serve --engines`): each
    /// connection goes to the one its first frame names, as the driver's
    /// acceptor routes it.
    pub engines: usize,
    /// How the workload meets Busy. True: as the production driver does,
    /// it submits nothing more until the client says Room, so a lost
    /// wake-up hangs the run and shows as a liveness violation. False: it
    /// draws another IO at the next event (an unordered driver; the
    /// queue stays deeper, which the teeth runs rely on).
    pub hold_refused: bool,
}

impl WorldConfig {
    /// A busy 4-channel workload under every fault class.
    pub fn new(seed: u64) -> Self {
        let defaults = ClientConfig::new(EXPORT, KEY_ID, Key::new(Vec::new()), [0; 32]);
        WorldConfig {
            seed,
            channels: 4,
            disk_sectors: 128,
            queue_depth: 16,
            io_sectors_max: 8,
            run_for: Duration::from_secs(5),
            heal_within: Duration::from_secs(30),
            faults: FaultRates::all(),
            link_delay: (Duration::from_micros(20), Duration::from_micros(400)),
            disk_latency: (Duration::from_micros(10), Duration::from_micros(300)),
            policy: Policy::LeastInflight,
            sticky_slack: defaults.sticky_slack,
            max_dirty_bytes: 32 * 1024,
            sabotage: Sabotage::default(),
            no_dedup: false,
            no_overlap_gate: false,
            ios_max: u64::MAX,
            record_steps: false,
            keepalive_interval: defaults.keepalive_interval,
            channel_timeout: defaults.channel_timeout,
            resend_min: defaults.resend_min,
            resend_max: defaults.resend_max,
            server_max_inflight: 256,
            server_max_payload: 1 << 20,
            server_clock: (Duration::ZERO, 1.0),
            tunings: Vec::new(),
            key_withdrawals: Vec::new(),
            engines: 1,
            hold_refused: false,
        }
    }
}

/// What a run did and found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Broken invariants (empty is a pass).
    pub violations: Vec<Violation>,
    /// IOs completed.
    pub ios: u64,
    /// Faults injected, by class.
    pub faults: BTreeMap<Fault, u64>,
    /// Client counters.
    pub client: ClientStats,
    /// Server counters, summed over restarts.
    pub server: ServerStats,
    /// Hash of everything that happened, in order (determinism check).
    pub trace_hash: u64,
    /// With [`WorldConfig::record_steps`]: every step's virtual time,
    /// event and running hash, to find where two runs of a seed diverge.
    pub steps: Vec<Step>,
    /// Virtual time simulated.
    pub virtual_time: Duration,
}

/// One step of a run, as [`Report::steps`] records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Virtual time, in nanoseconds.
    pub at_nanos: u64,
    /// The event's kind.
    pub event: &'static str,
    /// The run's hash after the step.
    pub hash: u64,
}

/// The first step where two recordings of one seed differ: its index and
/// each run's step there (`None` where a run had ended).
pub fn first_divergence(a: &[Step], b: &[Step]) -> Option<(usize, Option<Step>, Option<Step>)> {
    let n = a.len().max(b.len());
    (0..n)
        .find(|&i| a.get(i) != b.get(i))
        .map(|i| (i, a.get(i).copied(), b.get(i).copied()))
}

#[derive(Debug)]
enum Ev {
    ClientTimer,
    ServerTimer,
    Connected { ch: ChannelId, boot: u64 },
    ToServer { conn: ConnId, frame: Bytes },
    ToClient { conn: ConnId, frame: Bytes },
    ServerSideClosed { conn: ConnId, boot: u64 },
    ClientSideClosed { ch: ChannelId },
    DiskLand { op: DiskOpId, boot: u64 },
    DiskDone { op: DiskOpId, boot: u64 },
    FaultTick,
    ServerStart,
    PartitionEnds,
    HealAll,
    Tune(usize),
    KeyWithdrawn,
    KeyReturned,
}

impl Ev {
    fn code(&self) -> u64 {
        match self {
            Ev::ClientTimer => 1,
            Ev::ServerTimer => 2,
            Ev::Connected { .. } => 3,
            Ev::ToServer { .. } => 4,
            Ev::ToClient { .. } => 5,
            Ev::ServerSideClosed { .. } => 6,
            Ev::ClientSideClosed { .. } => 7,
            Ev::DiskDone { .. } => 8,
            Ev::FaultTick => 9,
            Ev::ServerStart => 10,
            Ev::PartitionEnds => 11,
            Ev::HealAll => 13,
            Ev::DiskLand { .. } => 14,
            Ev::Tune(_) => 15,
            Ev::KeyWithdrawn => 16,
            Ev::KeyReturned => 17,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Ev::ClientTimer => "client timer",
            Ev::ServerTimer => "server timer",
            Ev::Connected { .. } => "connected",
            Ev::ToServer { .. } => "frame to server",
            Ev::ToClient { .. } => "frame to client",
            Ev::ServerSideClosed { .. } => "server side closed",
            Ev::ClientSideClosed { .. } => "client side closed",
            Ev::DiskLand { .. } => "disk op lands",
            Ev::DiskDone { .. } => "disk op completes",
            Ev::FaultTick => "fault tick",
            Ev::ServerStart => "server start",
            Ev::PartitionEnds => "partition ends",
            Ev::HealAll => "heal",
            Ev::Tune(_) => "runtime tuning",
            Ev::KeyWithdrawn => "key withdrawn",
            Ev::KeyReturned => "key given back",
        }
    }
}

struct Scheduled {
    at: Instant,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// A backend operation between its start and its completion. It takes
/// effect on the disk (lands) at a random moment in between, as on a real
/// device: two overlapping writes in flight together may land in one
/// order and complete in the other.
struct DiskOp {
    req: BackendRequest,
    landed: Option<Result<Bytes, crate::wire::Status>>,
}

/// A backend operation: the engine that asked for it, and its token
/// there (each engine numbers its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct DiskOpId {
    engine: usize,
    token: u64,
}

struct Link {
    ch: ChannelId,
    blackholed: bool,
    closing: bool,
}

const FAULT_TICK: Duration = Duration::from_millis(50);
const KEY_ID: &str = "sim";
const SIM_KEY: &[u8] = b"simulated pre-shared key";

/// The operator's key file with `withdrawals` withdrawals of the client's
/// key in force: the client's key, or only another client's.
fn key_table(withdrawals: usize) -> Vec<(String, Key)> {
    if withdrawals > 0 {
        vec![("another client".into(), Key::new(b"not yours".to_vec()))]
    } else {
        vec![(KEY_ID.into(), Key::new(SIM_KEY.to_vec()))]
    }
}
const EXPORT: &str = "disk0";

/// One seeded run.
pub struct World {
    cfg: WorldConfig,
    rng: SplitMix64,
    now: Instant,
    /// `now` as the server's skewed clock reads it.
    server_now: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    client: ClientEngine,
    /// The server's engines; one unless `engines` says more.
    servers: Vec<ServerEngine>,
    /// The engine serving each connection, from its first frame on.
    conn_engine: BTreeMap<ConnId, usize>,
    /// Whose turn the next new anonymous session is.
    next_anonymous: usize,
    server_stats: ServerStats,
    server_up: bool,
    boot: u64,
    /// Withdrawals of the client's key in force (they may overlap).
    keys_withdrawn: usize,
    disk: MemDisk,
    /// Backend operations in flight, with their result once they landed.
    disk_ops: BTreeMap<DiskOpId, DiskOp>,
    disk_stalled_until: Instant,
    links: BTreeMap<ConnId, Link>,
    by_ch: BTreeMap<ChannelId, ConnId>,
    next_conn: ConnId,
    partitioned: bool,
    faulty: bool,
    checker: Checker,
    next_op: u64,
    outstanding: BTreeMap<u64, IoRequest>,
    /// The client said Busy and `hold_refused` is on: submit nothing
    /// more until it says Room, then `held` first.
    blocked: bool,
    held: Option<IoRequest>,
    client_timer: Option<Instant>,
    server_timer: Option<Instant>,
    faults: BTreeMap<Fault, u64>,
    ios: u64,
    hash: u64,
    steps: Vec<Step>,
}

impl World {
    /// World time `world` as the server's clock reads it.
    fn server_clock(&self, world: Instant) -> Instant {
        let (offset, rate) = self.cfg.server_clock;
        Instant::from_nanos(offset.as_nanos() as u64 + (world.as_nanos() as f64 * rate) as u64)
    }

    /// The world time at which the server's clock reads `t` (never early:
    /// a timer that fired before its deadline would do nothing and be
    /// scheduled again at once, forever).
    fn world_time_of_server(&self, t: Instant) -> Instant {
        let (offset, rate) = self.cfg.server_clock;
        let since = t.as_nanos().saturating_sub(offset.as_nanos() as u64);
        Instant::from_nanos(((since as f64 / rate).ceil() as u64).saturating_add(1))
    }

    /// Builds the world for `cfg`; nothing runs until [`World::run`].
    pub fn new(cfg: WorldConfig) -> Self {
        let mut rng = SplitMix64::new(cfg.seed);
        let mut seed32 = || {
            let mut s = [0u8; 32];
            for chunk in s.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            s
        };
        let (client_seed, server_seed) = (seed32(), seed32());
        let server_start = Instant::from_nanos(cfg.server_clock.0.as_nanos() as u64);
        let key = Key::new(SIM_KEY.to_vec());
        let mut cc = ClientConfig::new(EXPORT, KEY_ID, key.clone(), client_seed);
        cc.channels = cfg.channels;
        cc.policy = cfg.policy;
        cc.sticky_slack = cfg.sticky_slack;
        cc.max_dirty_bytes = cfg.max_dirty_bytes;
        cc.max_queued = cfg.queue_depth.max(1);
        cc.sabotage = cfg.sabotage;
        cc.keepalive_interval = cfg.keepalive_interval;
        cc.channel_timeout = cfg.channel_timeout;
        cc.resend_min = cfg.resend_min;
        cc.resend_max = cfg.resend_max;
        let boot = rng.next_u64();
        let servers = Self::engines(&cfg, boot, server_seed, key_table(0));
        let disk = MemDisk::new(cfg.disk_sectors * SECTOR as u64);
        let checker = Checker::new(cfg.disk_sectors);
        World {
            rng,
            now: Instant::ZERO,
            server_now: server_start,
            seq: 0,
            queue: BinaryHeap::new(),
            client: ClientEngine::new(cc).expect("a valid config"),
            servers,
            conn_engine: BTreeMap::new(),
            next_anonymous: 0,
            server_stats: ServerStats::default(),
            server_up: true,
            boot,
            keys_withdrawn: 0,
            disk,
            disk_ops: BTreeMap::new(),
            disk_stalled_until: Instant::ZERO,
            links: BTreeMap::new(),
            by_ch: BTreeMap::new(),
            next_conn: 1,
            partitioned: false,
            faulty: true,
            checker,
            next_op: 1,
            outstanding: BTreeMap::new(),
            blocked: false,
            held: None,
            client_timer: None,
            server_timer: None,
            faults: BTreeMap::new(),
            ios: 0,
            hash: 0xcbf2_9ce4_8422_2325,
            steps: Vec::new(),
            cfg,
        }
    }

    /// The server's engines for one boot, as the daemon builds them.
    fn engines(
        cfg: &WorldConfig,
        boot: u64,
        seed: [u8; 32],
        keys: Vec<(String, Key)>,
    ) -> Vec<ServerEngine> {
        let config = Self::server_config(cfg, boot, seed, keys);
        let mut engines = ServerEngine::several(&config, cfg.engines).expect("a valid config");
        for (index, engine) in engines.iter_mut().enumerate() {
            engine.set_shard(index, cfg.engines);
        }
        engines
    }

    fn server_config(
        cfg: &WorldConfig,
        boot: u64,
        seed: [u8; 32],
        keys: Vec<(String, Key)>,
    ) -> ServerConfig {
        let export = ExportConfig::new(EXPORT, cfg.disk_sectors * SECTOR as u64);
        let mut sc = ServerConfig::new(boot, seed, keys, vec![export]);
        sc.sabotage_no_dedup = cfg.no_dedup;
        sc.sabotage_no_overlap_gate = cfg.no_overlap_gate;
        sc.max_inflight = cfg.server_max_inflight;
        sc.max_payload = cfg.server_max_payload;
        sc
    }

    /// Makes IO errors acceptable (for scenarios that inject disk errors).
    pub fn allow_errors(&mut self) {
        self.checker.errors_allowed = true;
    }

    /// Byte ranges of the disk that fail every access.
    pub fn set_bad_ranges(&mut self, ranges: Vec<(u64, u64)>) {
        self.disk.bad_ranges = ranges;
    }

    fn mix(&mut self, v: u64) {
        self.hash = (self.hash ^ v).wrapping_mul(0x0100_0000_01b3);
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        let at = self.now + after;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn between(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
        let span = hi.saturating_sub(lo).as_nanos() as u64;
        lo + Duration::from_nanos(self.rng.below(span + 1))
    }

    fn count_fault(&mut self, what: Fault) {
        *self.faults.entry(what).or_default() += 1;
    }

    /// Runs the workload under faults, heals, and checks liveness.
    pub fn run(mut self) -> Report {
        let end = self.now + self.cfg.run_for;
        let deadline = end + self.cfg.heal_within;
        self.schedule(Duration::ZERO, Ev::ClientTimer);
        self.schedule(FAULT_TICK, Ev::FaultTick);
        self.schedule(self.cfg.run_for, Ev::HealAll);
        for i in 0..self.cfg.tunings.len() {
            self.schedule(self.cfg.tunings[i].0, Ev::Tune(i));
        }
        for i in 0..self.cfg.key_withdrawals.len() {
            let (at, lasting) = self.cfg.key_withdrawals[i];
            self.schedule(at, Ev::KeyWithdrawn);
            self.schedule(at + lasting, Ev::KeyReturned);
        }
        self.client_timer = Some(self.now);
        self.fill_queue();
        while let Some(Reverse(s)) = self.queue.pop() {
            if s.at > deadline {
                break;
            }
            self.now = s.at;
            self.server_now = self.server_clock(self.now);
            self.mix(s.at.as_nanos());
            self.mix(s.ev.code());
            let event = s.ev.name();
            self.dispatch(s.ev);
            self.drain();
            if self.cfg.record_steps {
                self.steps.push(Step {
                    at_nanos: self.now.as_nanos(),
                    event,
                    hash: self.hash,
                });
            }
            self.check_bounds();
            self.check_engines();
            if !self.faulty && self.outstanding.is_empty() && self.held.is_none() {
                break;
            }
        }
        let outstanding = self.outstanding.len() + usize::from(self.held.is_some());
        if outstanding > 0 {
            self.checker.report(Violation::Liveness { outstanding });
        }
        let mut server = self.server_stats.clone();
        for engine in &self.servers {
            server.add(engine.stats());
        }
        Report {
            seed: self.cfg.seed,
            violations: self.checker.violations().to_vec(),
            ios: self.ios,
            faults: self.faults,
            client: self.client.stats().clone(),
            server,
            trace_hash: self.hash,
            steps: self.steps,
            virtual_time: self.now - Instant::ZERO,
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::ClientTimer => {
                self.client_timer = None;
                self.client.handle_timeout(self.now);
            }
            Ev::ServerTimer => {
                self.server_timer = None;
                if self.server_up {
                    for engine in &mut self.servers {
                        engine.handle_timeout(self.server_now);
                    }
                }
            }
            Ev::Connected { ch, boot } => {
                if !self.server_up || boot != self.boot || self.partitioned {
                    self.client.channel_closed(ch, self.now);
                    return;
                }
                let conn = self.next_conn;
                self.next_conn += 1;
                self.links.insert(
                    conn,
                    Link {
                        ch,
                        blackholed: false,
                        closing: false,
                    },
                );
                self.by_ch.insert(ch, conn);
                if self.servers.len() == 1 {
                    // Alone, the engine takes the connection as it opens;
                    // several wait for its first frame to name theirs.
                    self.conn_engine.insert(conn, 0);
                    self.servers[0].connection_opened(conn, self.server_now);
                }
                self.client.channel_connected(ch, self.now);
            }
            Ev::ToServer { conn, frame } => {
                if self.server_up && self.links.contains_key(&conn) {
                    self.mix(frame.len() as u64);
                    let engine = self.engine_of(conn, &frame);
                    self.servers[engine].handle_frame(conn, frame, self.server_now);
                }
            }
            Ev::ToClient { conn, frame } => {
                if let Some(link) = self.links.get(&conn) {
                    let ch = link.ch;
                    self.mix(frame.len() as u64);
                    self.client.handle_frame(ch, frame, self.now);
                }
            }
            Ev::ServerSideClosed { conn, boot } => {
                if self.server_up && boot == self.boot {
                    if let Some(engine) = self.conn_engine.remove(&conn) {
                        self.servers[engine].connection_closed(conn, self.server_now);
                    }
                }
                self.remove_link(conn);
            }
            Ev::ClientSideClosed { ch } => {
                if let Some(conn) = self.by_ch.get(&ch).copied() {
                    self.remove_link(conn);
                }
                self.client.channel_closed(ch, self.now);
            }
            Ev::DiskLand { op, boot } => {
                if boot == self.boot && self.server_up {
                    self.land_disk_op(op);
                }
            }
            Ev::DiskDone { op, boot } => {
                if boot == self.boot && self.server_up {
                    self.finish_disk_op(op);
                }
            }
            Ev::FaultTick => self.fault_tick(),
            Ev::ServerStart => self.start_server(),
            Ev::PartitionEnds => self.partitioned = false,
            Ev::Tune(i) => {
                let (_, client, server) = self.cfg.tunings[i].clone();
                if let Err(e) = self.client.tune(&client, self.now) {
                    self.checker.report(Violation::Internal {
                        engine: "client",
                        what: format!("tuning refused: {e}"),
                    });
                }
                if self.server_up {
                    for engine in 0..self.servers.len() {
                        if let Err(e) = self.servers[engine].tune(&server) {
                            self.checker.report(Violation::Internal {
                                engine: "server",
                                what: format!("tuning refused by engine {engine}: {e}"),
                            });
                        }
                    }
                }
            }
            Ev::KeyWithdrawn => {
                self.count_fault(Fault::KeyWithdrawn);
                self.keys_withdrawn += 1;
                self.give_server_keys();
            }
            Ev::KeyReturned => {
                self.keys_withdrawn = self.keys_withdrawn.saturating_sub(1);
                self.give_server_keys();
            }
            Ev::HealAll => {
                if self.keys_withdrawn > 0 {
                    self.keys_withdrawn = 0;
                    self.give_server_keys();
                }
                self.faulty = false;
                self.partitioned = false;
                self.disk_stalled_until = self.now;
                if !self.server_up {
                    self.start_server();
                }
            }
        }
    }

    /// The engine serving `conn`, whose next frame is `frame`: the first
    /// frame chooses it, as the driver's acceptor does, and the engine is
    /// told of the connection then.
    fn engine_of(&mut self, conn: ConnId, frame: &Bytes) -> usize {
        let engine = match self.conn_engine.get(&conn) {
            Some(&engine) => engine,
            None => {
                let count = self.servers.len();
                let engine = engine_for_frame(frame.clone(), count).unwrap_or_else(|| {
                    let turn = self.next_anonymous;
                    self.next_anonymous = (turn + 1) % count;
                    turn
                });
                self.check_join_route(frame, engine);
                self.conn_engine.insert(conn, engine);
                self.servers[engine].connection_opened(conn, self.server_now);
                engine
            }
        };
        if self.servers.len() > 1 {
            let elsewhere = (self.servers.iter().map(ServerEngine::session_count))
                .enumerate()
                .filter(|&(other, _)| other != engine)
                .map(|(_, sessions)| sessions)
                .sum();
            self.servers[engine].set_sessions_elsewhere(elsewhere);
        }
        engine
    }

    /// A connection joining a session must reach the engine that holds
    /// it: anywhere else the join is refused as for a session long gone,
    /// and the client starts over in a new one.
    fn check_join_route(&mut self, first: &Bytes, routed: usize) {
        let Ok(Message::Hello(hello)) = decode_in(first.clone().into()) else {
            return;
        };
        if hello.session_id == 0 {
            return;
        }
        let holder = self
            .servers
            .iter()
            .position(|e| e.sessions().iter().any(|s| s.id == hello.session_id));
        if let Some(holder) = holder.filter(|&h| h != routed) {
            self.checker.report(Violation::Internal {
                engine: "server",
                what: format!(
                    "a join of session {:#x} went to engine {routed}; engine {holder} holds it",
                    hello.session_id
                ),
            });
        }
    }

    fn remove_link(&mut self, conn: ConnId) {
        if let Some(link) = self.links.remove(&conn) {
            self.by_ch.remove(&link.ch);
        }
    }

    /// Processes every action both engines have queued, until both are
    /// quiet, then re-arms their timers.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            while let Some(a) = self.client.poll_action() {
                any = true;
                self.client_action(a);
            }
            for engine in 0..self.servers.len() {
                while self.server_up {
                    let Some(a) = self.servers[engine].poll_action() else {
                        break;
                    };
                    any = true;
                    self.server_action(engine, a);
                }
            }
            if !any {
                break;
            }
        }
        if self.faulty || self.held.is_some() {
            self.fill_queue();
            while let Some(a) = self.client.poll_action() {
                self.client_action(a);
            }
        }
        if let Some(t) = self.client.poll_timeout() {
            if self.client_timer.is_none_or(|c| t < c) {
                self.client_timer = Some(t);
                let after = t - self.now;
                self.schedule(after, Ev::ClientTimer);
            }
        }
        if self.server_up {
            let next = self.servers.iter().filter_map(|e| e.poll_timeout()).min();
            if let Some(t) = next {
                if self.server_timer.is_none_or(|c| t < c) {
                    self.server_timer = Some(t);
                    let after = self.world_time_of_server(t).saturating_since(self.now);
                    self.schedule(after, Ev::ServerTimer);
                }
            }
        }
    }

    fn client_action(&mut self, a: ClientAction) {
        match a {
            ClientAction::Connect(ch) => {
                let delay = self.between(self.cfg.link_delay) * 2;
                let boot = self.boot;
                self.schedule(delay, Ev::Connected { ch, boot });
            }
            ClientAction::Close(ch) => {
                if let Some(conn) = self.by_ch.get(&ch).copied() {
                    let link = self.links.get_mut(&conn).unwrap();
                    if !link.closing {
                        link.closing = true;
                        // After every frame already in flight.
                        let after = self.cfg.link_delay.1 + Duration::from_micros(1);
                        let boot = self.boot;
                        self.schedule(after, Ev::ServerSideClosed { conn, boot });
                    }
                }
            }
            ClientAction::Send(ch, frame) => {
                let Some(conn) = self.by_ch.get(&ch).copied() else {
                    return;
                };
                if self.links[&conn].closing {
                    return;
                }
                self.transmit(conn, frame.to_bytes(), true);
            }
            ClientAction::Complete(c) => {
                let io = self
                    .outstanding
                    .remove(&c.user)
                    .expect("completion for a submitted IO");
                self.ios += 1;
                self.mix(c.user);
                let result = c.result.as_ref().map(|b| &b[..]).map_err(|e| e.to_string());
                self.mix(result.is_ok() as u64);
                self.checker.complete(c.user, result, io.fua);
            }
            ClientAction::Notice(_) => {}
            ClientAction::Room => self.blocked = false,
        }
    }

    fn server_action(&mut self, engine: usize, a: ServerAction) {
        match a {
            ServerAction::Send { conn, frame } => {
                if self.links.get(&conn).is_some_and(|l| !l.closing) {
                    self.transmit(conn, frame.to_bytes(), false);
                }
            }
            ServerAction::Close { conn, .. } => {
                if let Some(link) = self.links.get_mut(&conn) {
                    if !link.closing {
                        link.closing = true;
                        let ch = link.ch;
                        let after = self.cfg.link_delay.1 + Duration::from_micros(1);
                        self.schedule(after, Ev::ClientSideClosed { ch });
                    }
                }
                self.conn_engine.remove(&conn);
                self.servers[engine].connection_closed(conn, self.server_now);
            }
            ServerAction::Backend(req) => {
                let mut latency = self.between(self.cfg.disk_latency);
                if self.disk_stalled_until > self.now {
                    latency += self.disk_stalled_until - self.now;
                }
                let op = DiskOpId {
                    engine,
                    token: req.token,
                };
                let boot = self.boot;
                let lands = Duration::from_nanos(self.rng.below(latency.as_nanos() as u64 + 1));
                self.disk_ops.insert(op, DiskOp { req, landed: None });
                self.schedule(lands, Ev::DiskLand { op, boot });
                self.schedule(latency, Ev::DiskDone { op, boot });
            }
        }
    }

    /// Puts a frame on a link, through the per-frame faults.
    fn transmit(&mut self, conn: ConnId, mut frame: Bytes, to_server: bool) {
        if self.links[&conn].blackholed || self.partitioned {
            return;
        }
        let f = &self.cfg.faults;
        let (loss, dup, corrupt) = if self.faulty {
            (f.loss, f.duplicate, f.corrupt)
        } else {
            (0.0, 0.0, 0.0)
        };
        if self.rng.chance(loss) {
            self.count_fault(Fault::FrameLost);
            return;
        }
        if self.rng.chance(corrupt) {
            self.count_fault(Fault::FrameCorrupted);
            let mut v = frame.to_vec();
            let bit = self.rng.below(v.len() as u64 * 8);
            v[(bit / 8) as usize] ^= 1 << (bit % 8);
            frame = Bytes::from(v);
        }
        let copies = if self.rng.chance(dup) {
            self.count_fault(Fault::FrameDuplicated);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.between(self.cfg.link_delay);
            let ev = if to_server {
                Ev::ToServer {
                    conn,
                    frame: frame.clone(),
                }
            } else {
                Ev::ToClient {
                    conn,
                    frame: frame.clone(),
                }
            };
            self.schedule(delay, ev);
        }
    }

    fn land_disk_op(&mut self, id: DiskOpId) {
        let Some(req) = self.disk_ops.get(&id).map(|o| o.req.clone()) else {
            return;
        };
        let result = self.apply(&req);
        if let Some(op) = self.disk_ops.get_mut(&id) {
            op.landed = Some(result);
        }
    }

    fn finish_disk_op(&mut self, id: DiskOpId) {
        // Landing is scheduled no later than completion, and events at one
        // instant run in the order scheduled.
        let Some(DiskOp {
            landed: Some(result),
            ..
        }) = self.disk_ops.remove(&id)
        else {
            unreachable!("disk op {id:?} completes before it landed");
        };
        self.servers[id.engine].backend_complete(id.token, result, self.server_now);
    }

    fn apply(&mut self, req: &BackendRequest) -> Result<Bytes, crate::wire::Status> {
        match &req.op {
            BackendOp::Write { offset, data, .. } => self.checker.backend_mutation(
                self.boot,
                req.session_id,
                req.request_id,
                *offset,
                Some(data),
            ),
            BackendOp::Trim { offset, len, .. } | BackendOp::WriteZeroes { offset, len, .. } => {
                self.checker.trace(format_args!(
                    "backend lands zeroing request {} of session {:#x} at sectors {}..{}",
                    req.request_id,
                    req.session_id,
                    offset / SECTOR as u64,
                    (offset + u64::from(*len)) / SECTOR as u64
                ));
                self.checker.backend_mutation(
                    self.boot,
                    req.session_id,
                    req.request_id,
                    *offset,
                    None,
                )
            }
            _ => {}
        }
        self.disk.apply(&req.op)
    }

    fn fill_queue(&mut self) {
        if self.blocked {
            return;
        }
        // A held IO goes first, and even after the faults stop: the
        // driver owes it to its caller.
        if let Some(io) = self.held.take() {
            if !self.try_submit(io) {
                return;
            }
        }
        while self.faulty
            && self.outstanding.len() < self.cfg.queue_depth
            && self.next_op <= self.cfg.ios_max
        {
            let io = self.next_io();
            if !self.try_submit(io) {
                break;
            }
        }
    }

    /// Submits `io` as the next operation; false if the client refused it
    /// (then, with `hold_refused`, it is held until Room).
    fn try_submit(&mut self, io: IoRequest) -> bool {
        let id = self.next_op;
        match self.client.submit(id, io.clone(), self.now) {
            Ok(()) => {
                self.next_op += 1;
                self.checker.submit(id, io.op, io.offset, io.len);
                self.outstanding.insert(id, io);
                true
            }
            Err(SubmitError::Busy) => {
                if self.cfg.hold_refused {
                    self.held = Some(io);
                    self.blocked = true;
                }
                false
            }
            Err(SubmitError::Invalid(_) | SubmitError::Fenced) => false,
        }
    }

    fn next_io(&mut self) -> IoRequest {
        let sectors = self.cfg.disk_sectors;
        let count = 1 + self.rng.below(self.cfg.io_sectors_max.min(sectors));
        let first = self.rng.below(sectors - count + 1);
        let (offset, len) = (first * SECTOR as u64, (count as usize * SECTOR) as u32);
        match self.rng.below(100) {
            0..=39 => IoRequest::read(offset, len),
            40..=69 => IoRequest::write(offset, stamp(self.next_op, first, count), false),
            70..=77 => IoRequest::write(offset, stamp(self.next_op, first, count), true),
            78..=85 => IoRequest::flush(),
            86..=92 => IoRequest::trim(offset, len),
            _ => IoRequest::write_zeroes(offset, len, self.rng.chance(0.3)),
        }
    }

    fn fault_tick(&mut self) {
        if !self.faulty {
            return;
        }
        self.schedule(FAULT_TICK, Ev::FaultTick);
        let f = self.cfg.faults.clone();
        let p = |rate: f64| rate * FAULT_TICK.as_secs_f64();
        let outage = (Duration::from_millis(1), f.outage_max);
        if self.rng.chance(p(f.kill_channel_per_sec)) {
            if let Some(conn) = self.pick_link() {
                self.count_fault(Fault::ChannelReset);
                let ch = self.links[&conn].ch;
                self.links.get_mut(&conn).unwrap().closing = true;
                let boot = self.boot;
                let a = self.between(self.cfg.link_delay);
                let b = self.between(self.cfg.link_delay);
                self.schedule(a, Ev::ServerSideClosed { conn, boot });
                self.schedule(b, Ev::ClientSideClosed { ch });
            }
        }
        if self.rng.chance(p(f.blackhole_per_sec)) {
            if let Some(conn) = self.pick_link() {
                self.count_fault(Fault::ChannelBlackholed);
                self.links.get_mut(&conn).unwrap().blackholed = true;
            }
        }
        if self.server_up && !self.partitioned && self.rng.chance(p(f.partition_per_sec)) {
            self.count_fault(Fault::Partition);
            self.partitioned = true;
            let d = self.between(outage);
            self.schedule(d, Ev::PartitionEnds);
        }
        if self.rng.chance(p(f.disk_stall_per_sec)) {
            self.count_fault(Fault::DiskStall);
            let d = self.between(outage);
            self.disk_stalled_until = self.disk_stalled_until.max(self.now + d);
        }
        if self.server_up && self.rng.chance(p(f.crash_per_sec)) {
            self.count_fault(Fault::ServerCrash);
            self.checker.trace(format_args!("SERVER CRASH"));
            self.stop_server(false);
        } else if self.server_up && self.rng.chance(p(f.power_loss_per_sec)) {
            self.count_fault(Fault::PowerLoss);
            self.stop_server(true);
        }
    }

    fn pick_link(&mut self) -> Option<ConnId> {
        let open: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, l)| !l.closing)
            .map(|(c, _)| *c)
            .collect();
        if open.is_empty() {
            return None;
        }
        Some(open[self.rng.below(open.len() as u64) as usize])
    }

    /// The server process dies. Backend operations in flight may or may not
    /// have reached the disk; with `power`, the disk cache is lost too.
    fn stop_server(&mut self, power: bool) {
        for (_, op) in std::mem::take(&mut self.disk_ops) {
            if op.landed.is_none() && op.req.op != BackendOp::Flush && self.rng.chance(0.5) {
                let _ = self.apply(&op.req);
            }
        }
        if power {
            self.disk.lose_power();
            self.checker.power_lost(self.disk.media());
        }
        let conns: Vec<ConnId> = self.links.keys().copied().collect();
        for conn in conns {
            let ch = self.links[&conn].ch;
            self.links.get_mut(&conn).unwrap().closing = true;
            let d = self.between(self.cfg.link_delay);
            self.schedule(d, Ev::ClientSideClosed { ch });
        }
        for engine in &self.servers {
            self.server_stats.add(engine.stats());
        }
        self.conn_engine.clear();
        self.server_up = false;
        self.server_timer = None;
        let down = self.between((Duration::from_millis(1), self.cfg.faults.outage_max));
        self.schedule(down, Ev::ServerStart);
    }

    fn start_server(&mut self) {
        if self.server_up {
            return;
        }
        self.boot = self.rng.next_u64();
        let mut seed = [0u8; 32];
        for chunk in seed.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        // A restarted server reads its operator's key file as it is now.
        let keys = key_table(self.keys_withdrawn);
        self.servers = Self::engines(&self.cfg, self.boot, seed, keys);
        self.server_up = true;
    }

    /// Gives every server engine the key table in force.
    fn give_server_keys(&mut self) {
        if !self.server_up {
            return;
        }
        let table = key_table(self.keys_withdrawn);
        for engine in 0..self.servers.len() {
            if let Err(e) = self.servers[engine].set_keys(table.clone(), self.server_now) {
                self.checker.report(Violation::Internal {
                    engine: "server",
                    what: format!("key table refused by engine {engine}: {e}"),
                });
            }
        }
    }

    /// Each engine's own consistency check, after every step: a broken
    /// counter is caught where it broke, not when the damage shows.
    fn check_engines(&mut self) {
        if let Err(what) = self.client.check() {
            self.checker.report(Violation::Internal {
                engine: "client",
                what,
            });
        }
        if self.server_up {
            for engine in 0..self.servers.len() {
                if let Err(what) = self.servers[engine].check() {
                    self.checker.report(Violation::Internal {
                        engine: "server",
                        what: format!("engine {engine}: {what}"),
                    });
                }
            }
        }
    }

    fn check_bounds(&mut self) {
        let cc = self.client.config();
        let checks = [
            (
                "client journaled IOs",
                self.outstanding.len() as u64,
                cc.max_queued as u64,
            ),
            (
                "client requests in flight",
                self.client.inflight() as u64,
                u64::from(cc.max_inflight),
            ),
            (
                "client journal bytes",
                self.client.journal_bytes(),
                cc.max_journal_bytes,
            ),
            (
                "client dirty bytes",
                self.client.dirty_bytes(),
                // In-flight writes may land after the window filled: at most
                // the journal's worth, each with its entry cost.
                cc.max_dirty_bytes + cc.max_journal_bytes + 64 * cc.max_queued as u64,
            ),
        ];
        for (what, value, bound) in checks {
            if value > bound {
                self.checker.report(Violation::Bound { what, value, bound });
            }
        }
        if self.server_up {
            for engine in &self.servers {
                let window = u64::from(engine.config().id_window);
                let bound = engine.session_count() as u64 * window;
                let value = engine.cached_results() as u64;
                if value > bound {
                    self.checker.report(Violation::Bound {
                        what: "server cached results",
                        value,
                        bound,
                    });
                }
            }
        }
    }
}
