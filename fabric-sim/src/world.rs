//! One simulated run: a server node and a client node on madsim, the real
//! fabric-tcp drivers on both, a fault plan from the seed, and the checks.

use crate::disk::SimDisk;
use crate::keys::{OperatorKeys, KEY_ID};
use crate::workload::{
    shared_worker, worker, Failed, Outcome, Plan, SharedPlan, BLOCK, SHARED_ZONE_BLOCKS,
};
use braid_core::auth::Key;
use braid_core::client::ClientConfig;
use braid_core::rng::SplitMix64;
use braid_core::server::{ExportConfig, ServerConfig, ServerEngine};
use braid_core::testkit::{Fault, Level, MemDisk, Sabotage, Scenario};
use braid_fabric_tcp::client::ClientStatus;
use braid_fabric_tcp::{Client, ClientSecurity, Server, ServerSecurity};
use madsim::net::NetSim;
use madsim::runtime::{Handle, Runtime};
use madsim::task::NodeId;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SIZE: u64 = 8 << 20;
const WORKERS: u64 = 8;
/// Workers of one client overlapping in its shared zone.
const SHARED_WORKERS: u64 = 32;
const PORT: u16 = 7410;
const SERVER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
/// An IO slower than this is a liveness violation (braid's default IO
/// timeout is infinite, so nothing else would notice).
pub(crate) const STALL_LIMIT: Duration = Duration::from_secs(30);
/// A dirty window of a few writes: the workers' writes outrun their
/// flushes, so the driver holds refused IO and waits for Room (with the
/// 64 MiB default it never would).
const SMALL_DIRTY_WINDOW: u64 = 32 << 10;

/// Which clients run with the small window: every client of the
/// scenarios no teeth run depends on, and one of the three in
/// many-clients (where every fault class is mixed). The scenarios the
/// teeth use keep the default, whose deep unflushed window they need.
fn small_dirty_window(scenario: Scenario, client: usize) -> bool {
    match scenario {
        Scenario::ManyClients => client == 1,
        Scenario::Steady
        | Scenario::SlowDisk
        | Scenario::Stalls
        | Scenario::ClientStall
        | Scenario::DiskFull
        | Scenario::DiskErrors => true,
        _ => false,
    }
}

/// What one seed did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The scenario.
    pub scenario: Scenario,
    /// IOs completed.
    pub ios: u64,
    /// Media errors surfaced where the disk had bad blocks (expected).
    pub media_errors: u64,
    /// NO_SPACE errors surfaced while the disk was full (expected).
    pub no_space_errors: u64,
    /// Broken promises; empty on a good run.
    pub violations: Vec<String>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<Fault, u64>,
    /// Requests resent after aging out.
    pub resends: u64,
    /// Requests moved off failed channels.
    pub failovers: u64,
    /// Duplicate answers dropped.
    pub duplicates_dropped: u64,
    /// Server sessions lost and replaced.
    pub session_resets: u64,
    /// Volume legs left behind (the mirror scenario).
    pub legs_left: u64,
    /// Regions copied to returning legs (the mirror scenario).
    pub regions_resynced: u64,
    /// Volume legs migrated to a new server.
    pub migrations: u64,
    /// Times a stripe leg's own IO was checked to go on while another
    /// leg was down (the striped scenarios).
    pub isolation_checks: u64,
    /// The longest such leg's own IO paused meanwhile.
    pub isolation_pause: Duration,
    /// Times a mirror's own IO was checked to go on while one of its
    /// legs was unreachable (striped-mirrors).
    pub degraded_checks: u64,
    /// The longest such mirror's own IO paused meanwhile.
    pub degraded_pause: Duration,
    /// Unflushed extents replayed after restarts.
    pub replayed_extents: u64,
    /// Channels the server closed when the client's key was withdrawn.
    pub channels_revoked: u64,
    /// The slowest IO, in virtual time.
    pub longest_io: Duration,
    /// A digest of every completion and its virtual time: equal seeds give
    /// equal hashes.
    pub trace_hash: u64,
    /// Each worker's steps (see `first_divergence`).
    pub steps: Vec<Vec<(u64, u64)>>,
}

/// Where two runs of one seed first part: the worker and IO whose trace
/// differs earliest in virtual time.
pub fn first_divergence(a: &Report, b: &Report) -> Option<String> {
    let workers = a.steps.len().max(b.steps.len());
    let mut first: Option<(u64, usize, usize)> = None;
    for w in 0..workers {
        let (x, y) = (a.steps.get(w), b.steps.get(w));
        let (x, y) = (x.map_or(&[][..], |v| &v[..]), y.map_or(&[][..], |v| &v[..]));
        let Some(i) = (0..x.len().max(y.len())).find(|&i| x.get(i) != y.get(i)) else {
            continue;
        };
        let at = x.get(i).or(y.get(i)).map_or(0, |s| s.0);
        if first.is_none_or(|f| at < f.0) {
            first = Some((at, w, i));
        }
    }
    first.map(|(at, w, i)| {
        format!(
            "first divergence: worker {w}, IO {i}, at {:.6}s virtual ({:?} then {:?})",
            at as f64 / 1e9,
            a.steps.get(w).and_then(|v| v.get(i)),
            b.steps.get(w).and_then(|v| v.get(i)),
        )
    })
}

impl Report {
    /// A run that did nothing yet.
    pub fn empty(seed: u64, scenario: Scenario) -> Report {
        Report {
            seed,
            scenario,
            ios: 0,
            media_errors: 0,
            no_space_errors: 0,
            violations: Vec::new(),
            faults: BTreeMap::new(),
            resends: 0,
            failovers: 0,
            duplicates_dropped: 0,
            session_resets: 0,
            legs_left: 0,
            regions_resynced: 0,
            migrations: 0,
            isolation_checks: 0,
            isolation_pause: Duration::ZERO,
            degraded_checks: 0,
            degraded_pause: Duration::ZERO,
            replayed_extents: 0,
            channels_revoked: 0,
            longest_io: Duration::ZERO,
            trace_hash: 0,
            steps: Vec::new(),
        }
    }
}

/// Runs `scenario` for `virtual_secs` of simulated time from `seed`.
///
/// Each run gets a thread of its own: std's `HashMap` seeds its hasher
/// from per-thread keys drawn once, so a second run on the same thread
/// would iterate maps in another order and stop being a replay.
pub fn run(scenario: Scenario, seed: u64, virtual_secs: f64) -> Report {
    run_sabotaged(scenario, seed, virtual_secs, &[])
}

/// [`run`] with safety mechanisms switched off.
pub fn run_sabotaged(
    scenario: Scenario,
    seed: u64,
    virtual_secs: f64,
    sabotage: &[Sabotage],
) -> Report {
    run_with_engines(scenario, seed, virtual_secs, sabotage, 1)
}

/// [`run_sabotaged`] with every server running `engines` protocol engines
/// (`braid serve --engines`). With one, the runs are those of
/// [`run_sabotaged`], seed for seed.
pub fn run_with_engines(
    scenario: Scenario,
    seed: u64,
    virtual_secs: f64,
    sabotage: &[Sabotage],
    engines: usize,
) -> Report {
    assert!(
        scenario.runs_at(Level::Madsim),
        "scenario {scenario} has no madsim world (it runs at the engine level)"
    );
    let run_for = Duration::from_secs_f64(virtual_secs);
    let sabotage = sabotage.to_vec();
    let run = move || {
        let mut rt = Runtime::with_seed_and_config(seed, madsim::Config::default());
        // Far beyond any healthy run: a deadlock ends as a panic, not a hang.
        rt.set_time_limit(run_for + Duration::from_secs(300));
        if scenario.runs_a_volume() {
            return rt.block_on(crate::mirror::simulate(
                scenario, seed, run_for, sabotage, engines,
            ));
        }
        rt.block_on(simulate(scenario, seed, run_for, sabotage, engines))
    };
    match std::thread::spawn(run).join() {
        Ok(report) => report,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

pub(crate) fn seed_bytes(seed: u64, salt: u64) -> [u8; 32] {
    let mut rng = SplitMix64::new(seed ^ salt);
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    out
}

/// One client node: which export it opens, which blocks its workers own,
/// and where the zone its shared workers overlap in starts, if it has one.
struct ClientSpec {
    export: usize,
    first_block: u64,
    blocks: u64,
    shared_zone: Option<u64>,
}

/// The layout of a scenario: exports, and client nodes over them.
fn layout(scenario: Scenario) -> (usize, Vec<ClientSpec>) {
    let blocks = SIZE / BLOCK;
    if scenario == Scenario::ManyClients {
        // Two clients share disk0 (halves of it), a third has disk1.
        let half = blocks / 2;
        let spec = |export, first_block, blocks| ClientSpec {
            export,
            first_block,
            blocks,
            shared_zone: None,
        };
        return (
            2,
            vec![spec(0, 0, half), spec(0, half, half), spec(1, 0, blocks)],
        );
    }
    (
        1,
        vec![ClientSpec {
            export: 0,
            first_block: 0,
            blocks: blocks - SHARED_ZONE_BLOCKS,
            shared_zone: Some((blocks - SHARED_ZONE_BLOCKS) * BLOCK),
        }],
    )
}

async fn simulate(
    scenario: Scenario,
    seed: u64,
    run_for: Duration,
    sabotage: Vec<Sabotage>,
    engines: usize,
) -> Report {
    let handle = Handle::current();
    let mut rng = SplitMix64::new(seed ^ 0x5eed_fa17);
    let (export_count, clients) = layout(scenario);
    let (disks, bad) = disks_for(scenario, export_count, &mut rng);
    let key = Key::new(seed_bytes(seed, 1).to_vec());
    let shared = ServerShared {
        disks,
        full: Arc::new(AtomicBool::new(false)),
        slow: Arc::new(AtomicBool::new(false)),
        keys: Arc::new(OperatorKeys::new(key.clone())),
        boots: Arc::new(AtomicU64::new(0)),
    };
    let server = server_node(&handle, seed, &sabotage, engines, &shared);
    let run = ClientRun {
        scenario,
        seed,
        run_for,
        sabotage,
        key,
        bad,
        workers_each: WORKERS / clients.len() as u64,
    };
    let (client_nodes, works): (Vec<_>, Vec<_>) = clients
        .into_iter()
        .enumerate()
        .map(|(c, spec)| {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2 + c as u8));
            let node = handle
                .create_node()
                .name(format!("client{c}"))
                .ip(ip)
                .build();
            let work = node.spawn(run_client(c, spec, run.clone()));
            (node, work)
        })
        .unzip();
    let client_ids: Vec<_> = client_nodes.iter().map(|n| n.id()).collect();

    let targets = Targets {
        handle: &handle,
        server: server.id(),
        clients: &client_ids,
        disks: &shared.disks,
        full: &shared.full,
        slow: &shared.slow,
        keys: &shared.keys,
    };
    let mut full_windows = Vec::new();
    let faults = inject(scenario, &mut rng, &targets, run_for, &mut full_windows).await;

    let mut report = Report {
        faults,
        channels_revoked: shared.keys.channels_revoked(),
        ..Report::empty(seed, scenario)
    };
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut refused = Vec::new();
    for (c, work) in works.into_iter().enumerate() {
        match work.await {
            Ok(Ok((outcomes, status))) => {
                report.add_client(outcomes, &status, &mut hash, &mut refused)
            }
            Ok(Err(e)) => report.violations.push(format!("client {c}: {e}")),
            Err(e) => report.violations.push(format!("client node {c}: {e}")),
        }
    }
    report.trace_hash = hash ^ report.ios;
    let no_space: Vec<_> = refused
        .iter()
        .filter(|f| f.kind == Fault::DiskFull)
        .map(|f| (f.began, f.answered, f.offset, f.len))
        .collect();
    report
        .violations
        .extend(crate::judge::full_disk_refusals(&full_windows, &no_space));
    if report.longest_io > STALL_LIMIT {
        report.violations.push(format!(
            "liveness: an IO took {:?} of virtual time",
            report.longest_io
        ));
    }
    if report.ios == 0 {
        report.violations.push("liveness: no IO completed".into());
    }
    let nodes = client_ids.into_iter().chain([server.id()]);
    report.violations.extend(tear_down(&handle, nodes).await);
    report
}

/// The exports' disks, with three bad blocks drawn in export 0 where the
/// scenario has media errors (their block numbers returned).
fn disks_for(
    scenario: Scenario,
    export_count: usize,
    rng: &mut SplitMix64,
) -> (Vec<Arc<Mutex<MemDisk>>>, Vec<u64>) {
    let mut disks: Vec<MemDisk> = (0..export_count).map(|_| MemDisk::new(SIZE)).collect();
    let mut bad = Vec::new();
    if scenario == Scenario::DiskErrors {
        for _ in 0..3 {
            let b = rng.below(SIZE / BLOCK);
            bad.push(b);
            disks[0].bad_ranges.push((b * BLOCK, (b + 1) * BLOCK));
        }
    }
    let disks = disks.into_iter().map(|d| Arc::new(Mutex::new(d))).collect();
    (disks, bad)
}

/// What outlives the server's restarts, shared with the fault injector:
/// the disks and their switches, the operator's key file, the boot count.
struct ServerShared {
    disks: Vec<Arc<Mutex<MemDisk>>>,
    full: Arc<AtomicBool>,
    slow: Arc<AtomicBool>,
    keys: Arc<OperatorKeys>,
    boots: Arc<AtomicU64>,
}

/// The server node: each boot (the first, and every restart after a
/// crash) serves the disks as they are, with the key file as it is then.
fn server_node(
    handle: &Handle,
    seed: u64,
    sabotage: &[Sabotage],
    engines: usize,
    shared: &ServerShared,
) -> madsim::runtime::NodeHandle {
    let ServerShared {
        disks,
        full,
        slow,
        keys,
        boots,
    } = shared;
    let (disks, full, slow, keys, boots, sabotage) = (
        disks.clone(),
        full.clone(),
        slow.clone(),
        keys.clone(),
        boots.clone(),
        sabotage.to_vec(),
    );
    handle
        .create_node()
        .name("server")
        .ip(SERVER_IP)
        .init(move || {
            let (disks, full, slow, keys, sabotage) = (
                disks.clone(),
                full.clone(),
                slow.clone(),
                keys.clone(),
                sabotage.clone(),
            );
            let boot = boots.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let exports = (0..disks.len())
                    .map(|i| ExportConfig::new(format!("disk{i}"), SIZE))
                    .collect();
                let config = ServerConfig::new(
                    seed.rotate_left(17) ^ boot,
                    seed_bytes(seed, 2 + boot),
                    keys.table(),
                    exports,
                );
                let disk = SimDisk {
                    disks,
                    full,
                    slow,
                    rng: Mutex::new(SplitMix64::new(seed ^ boot.rotate_left(32))),
                    late_completions: true,
                };
                serve_sim(SERVER_IP, config, &sabotage, engines, disk, |server| {
                    keys.serving(server)
                })
                .await;
            }
        })
        .build()
}

/// What every client node of a run is given.
#[derive(Clone)]
struct ClientRun {
    scenario: Scenario,
    seed: u64,
    run_for: Duration,
    sabotage: Vec<Sabotage>,
    key: Key,
    /// Bad blocks of export 0.
    bad: Vec<u64>,
    workers_each: u64,
}

/// Client node `c`: connects, runs its workers over its blocks (and its
/// shared zone's, with a checker) until the run ends, and reports what
/// each saw and the driver's counters.
async fn run_client(
    c: usize,
    spec: ClientSpec,
    run: ClientRun,
) -> Result<(Vec<Outcome>, ClientStatus), String> {
    let ClientRun {
        scenario,
        seed,
        run_for,
        sabotage,
        key,
        bad,
        workers_each,
    } = run;
    let bad = if spec.export == 0 { bad } else { Vec::new() };
    let may_fill = matches!(
        scenario,
        Scenario::DiskFull | Scenario::AllFaults | Scenario::ManyClients
    );
    // Media errors and a full disk are expected where injected.
    let errors_expected = may_fill || scenario == Scenario::DiskErrors;
    let mut config = ClientConfig::new(
        format!("disk{}", spec.export),
        KEY_ID,
        key,
        seed_bytes(seed, 100 + c as u64),
    );
    if small_dirty_window(scenario, c) {
        config.max_dirty_bytes = SMALL_DIRTY_WINDOW;
    }
    for s in &sabotage {
        s.apply_client(&mut config);
    }
    let client = Client::connect(
        SocketAddr::new(SERVER_IP, PORT).to_string(),
        ClientSecurity::Plain,
        config,
        Duration::from_secs(30),
    )
    .await
    .map_err(|e| e.to_string())?;
    let until = tokio::time::Instant::now() + run_for;
    let per = spec.blocks / workers_each;
    let tasks: Vec<_> = (0..workers_each)
        .map(|w| {
            let plan = Plan {
                id: (c as u64) << 8 | w,
                first: spec.first_block + w * per,
                count: per,
                bad: bad.clone(),
                may_fill,
                seed,
                until,
            };
            tokio::spawn(worker(client.clone(), plan))
        })
        .collect();
    let sectors = SHARED_ZONE_BLOCKS * BLOCK / braid_core::testkit::SECTOR as u64;
    let checker = spec.shared_zone.map(|_| {
        let mut c = braid_core::testkit::Checker::new(sectors);
        c.errors_allowed = errors_expected;
        Arc::new(Mutex::new(c))
    });
    let next_io = Arc::new(AtomicU64::new(1));
    let shared: Vec<_> = spec
        .shared_zone
        .zip(checker.clone())
        .map(|(zone_start, checker)| {
            (0..SHARED_WORKERS)
                .map(|w| {
                    let plan = SharedPlan {
                        id: (c as u64) << 8 | 0x80 | w,
                        zone_start,
                        zone_sectors: sectors,
                        checker: checker.clone(),
                        next_io: next_io.clone(),
                        seed,
                        until,
                        flushes: true,
                        seams: Vec::new(),
                        refusals_to: None,
                    };
                    tokio::spawn(shared_worker(client.clone(), plan))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut outcomes = Vec::new();
    for t in tasks.into_iter().chain(shared) {
        outcomes.push(t.await.map_err(|e| format!("worker panicked: {e}"))?);
    }
    if let Some(checker) = checker {
        outcomes.push(crate::workload::checker_outcome(&checker, "shared zone"));
    }
    let status = client.status();
    client.close().await;
    Ok((outcomes, status))
}

impl Report {
    /// Adds one client's workers' outcomes and its driver's counters;
    /// `hash` gathers the workers' traces, `refused` their refused IOs.
    fn add_client(
        &mut self,
        outcomes: Vec<Outcome>,
        status: &ClientStatus,
        hash: &mut u64,
        refused: &mut Vec<Failed>,
    ) {
        for o in outcomes {
            let Outcome {
                ios,
                violations,
                media_errors,
                no_space_errors,
                longest,
                trace,
                steps,
                answered_at: _,
                refused: mine,
            } = o;
            refused.extend(mine);
            self.steps.push(steps);
            self.ios += ios;
            self.media_errors += media_errors;
            self.no_space_errors += no_space_errors;
            self.violations.extend(violations);
            self.longest_io = self.longest_io.max(longest);
            *hash = (*hash ^ trace).wrapping_mul(0x0100_0000_01b3);
        }
        let st = &status.stats;
        self.resends += st.resends;
        self.failovers += st.failovers;
        self.duplicates_dropped += st.duplicates_dropped;
        self.session_resets += st.session_resets;
        self.replayed_extents += st.replayed_extents;
    }
}

/// Ends every task of `nodes` before the run's runtime goes, and says so
/// if any outlives it. Dropping a madsim runtime does not end the tasks
/// still waiting in it: tasks that wait on each other (a connection's
/// reader and its engine, a server and its listener) keep each other
/// alive through the wakers they hold, with all they own: disks, engines,
/// buffers. A sweep kept about 10 MiB per run that way and was killed for
/// want of memory 1,500 runs in. Killing a node wakes its tasks, and the
/// executor drops a woken task of a killed node.
pub(crate) async fn tear_down(
    handle: &Handle,
    nodes: impl IntoIterator<Item = NodeId>,
) -> Option<String> {
    for node in nodes {
        handle.kill(node);
    }
    // Time moves only once nothing is runnable: every woken task has
    // been dropped by then.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let metrics = handle.metrics();
    (metrics.num_tasks() != 0).then(|| {
        format!(
            "harness: {} tasks outlived their killed nodes, and would keep their memory past the run: {}",
            metrics.num_tasks(),
            metrics
                .num_tasks_by_node_by_spawn()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        )
    })
}

/// What faults act on.
#[derive(Clone, Copy)]
struct Targets<'a> {
    handle: &'a Handle,
    server: madsim::task::NodeId,
    clients: &'a [madsim::task::NodeId],
    disks: &'a [Arc<Mutex<MemDisk>>],
    full: &'a AtomicBool,
    slow: &'a AtomicBool,
    keys: &'a OperatorKeys,
}

/// A time drawn from `rng` of `lo` up to `hi` milliseconds.
pub(crate) fn between_ms(rng: &mut SplitMix64, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(lo + rng.below(hi - lo))
}

/// Draws and applies faults until two seconds before the end (so the last
/// one heals while the workload still runs); returns what it did. Each
/// time the disk filled, until it had room again, goes in `full_windows`.
async fn inject(
    scenario: Scenario,
    rng: &mut SplitMix64,
    targets: &Targets<'_>,
    run_for: Duration,
    full_windows: &mut Vec<(tokio::time::Instant, tokio::time::Instant)>,
) -> BTreeMap<Fault, u64> {
    let clients = targets.clients;
    let mut faults = BTreeMap::new();
    let end = tokio::time::Instant::now() + run_for;
    let quiet = Duration::from_secs(2);
    loop {
        tokio::time::sleep(between_ms(rng, 300, 2000)).await;
        if tokio::time::Instant::now() + quiet >= end {
            break;
        }
        let kinds = fault_kinds(scenario);
        if kinds.is_empty() {
            continue;
        }
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        // Link faults and client stalls hit one client (of several).
        let client = clients[rng.below(clients.len() as u64) as usize];
        *faults.entry(kind).or_insert(0) += 1;
        strike(kind, client, rng, targets, full_windows).await;
    }
    faults
}

/// The faults `scenario` draws from (a kind listed twice is drawn twice
/// as often); none for the scenarios without faults in the mix.
fn fault_kinds(scenario: Scenario) -> &'static [Fault] {
    match scenario {
        Scenario::Partitions => &[Fault::Partition, Fault::OneWayLoss],
        Scenario::Crash => &[Fault::ServerCrash],
        Scenario::PowerLoss => &[Fault::PowerLoss],
        Scenario::Stalls => &[Fault::ServerStall],
        Scenario::DiskFull => &[Fault::DiskFull],
        Scenario::SlowDisk => &[Fault::DiskStall],
        Scenario::ClientStall => &[Fault::ClientStall],
        Scenario::KeyWithdrawn => &[
            Fault::KeyWithdrawn,
            Fault::KeyWithdrawn,
            Fault::ServerCrash,
            Fault::Partition,
        ],
        Scenario::AllFaults | Scenario::ManyClients => &[
            Fault::Partition,
            Fault::OneWayLoss,
            Fault::ServerCrash,
            Fault::PowerLoss,
            Fault::ServerStall,
            Fault::DiskFull,
            Fault::DiskStall,
            Fault::ClientStall,
        ],
        // Steady, DiskErrors (bad blocks from the start), and the
        // engine-only scenarios run_sabotaged refused.
        _ => &[],
    }
}

/// Strikes with `kind` (on `client`'s link or node, where it acts on one)
/// and heals it after a hold drawn from `rng`; a full disk's window goes
/// into `full_windows`.
async fn strike(
    kind: Fault,
    client: NodeId,
    rng: &mut SplitMix64,
    targets: &Targets<'_>,
    full_windows: &mut Vec<(tokio::time::Instant, tokio::time::Instant)>,
) {
    let Targets {
        handle,
        server,
        disks,
        full,
        slow,
        keys,
        ..
    } = *targets;
    let net = NetSim::current();
    match kind {
        Fault::Partition => {
            net.clog_link(client, server);
            net.clog_link(server, client);
            tokio::time::sleep(between_ms(rng, 200, 3000)).await;
            net.unclog_link(client, server);
            net.unclog_link(server, client);
        }
        Fault::OneWayLoss => {
            // Either direction: requests held back on the way in can
            // arrive after the client gave up on their channel.
            let (from, to) = if rng.chance(0.5) {
                (server, client)
            } else {
                (client, server)
            };
            net.clog_link(from, to);
            tokio::time::sleep(between_ms(rng, 200, 2000)).await;
            net.unclog_link(from, to);
        }
        Fault::ServerCrash => {
            handle.kill(server);
            tokio::time::sleep(between_ms(rng, 50, 1500)).await;
            handle.restart(server);
        }
        Fault::PowerLoss => {
            handle.kill(server);
            for disk in disks {
                disk.lock().unwrap().lose_power();
            }
            tokio::time::sleep(between_ms(rng, 50, 1500)).await;
            handle.restart(server);
        }
        Fault::DiskFull => {
            let from = tokio::time::Instant::now();
            full.store(true, Ordering::SeqCst);
            tokio::time::sleep(between_ms(rng, 100, 1500)).await;
            full.store(false, Ordering::SeqCst);
            full_windows.push((from, tokio::time::Instant::now()));
        }
        Fault::DiskStall => {
            slow.store(true, Ordering::SeqCst);
            tokio::time::sleep(between_ms(rng, 300, 2500)).await;
            slow.store(false, Ordering::SeqCst);
        }
        Fault::ClientStall => {
            handle.pause(client);
            tokio::time::sleep(between_ms(rng, 100, 2500)).await;
            handle.resume(client);
        }
        Fault::KeyWithdrawn => {
            keys.withdraw().await;
            tokio::time::sleep(between_ms(rng, 100, 3000)).await;
            keys.give_back().await;
        }
        Fault::ServerStall => {
            handle.pause(server);
            tokio::time::sleep(between_ms(rng, 100, 2500)).await;
            handle.resume(server);
        }
        engine_only => unreachable!("{engine_only} is drawn only from the lists above"),
    }
}

/// A simulated server node's one life: `config` with `sabotage` applied,
/// `engines` engines over `disk`, listening on `ip` until the node dies.
pub(crate) async fn serve_sim(
    ip: IpAddr,
    mut config: ServerConfig,
    sabotage: &[Sabotage],
    engines: usize,
    disk: SimDisk,
    on_start: impl FnOnce(Server),
) {
    for s in sabotage {
        s.apply_server(&mut config);
    }
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, PORT))
        .await
        .expect("bind the simulated server");
    let _ = Server::run_engines(
        listener,
        ServerSecurity::Plain,
        ServerEngine::several(&config, engines).expect("a valid config"),
        None,
        Arc::new(disk),
        std::future::pending(),
        on_start,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write reached the disk, the server crashed before answering, and
    /// its resend to the restarted server found the disk full: the client
    /// reported NO_SPACE for a write whose data had landed, and a private
    /// worker's model, which took a failed write to change nothing, called
    /// the read that saw it wrong. All-faults seed 3 with client overlap
    /// order off recorded it (the sabotage only shaped the interleaving:
    /// the worker waits for each IO, so nothing of its own overlaps).
    #[test]
    fn a_failed_write_that_landed_is_no_violation() {
        let r = run_sabotaged(Scenario::AllFaults, 3, 10.0, &[Sabotage::NoOverlapOrder]);
        assert!(r.no_space_errors > 0, "the disk filled in this run");
        assert!(r.violations.is_empty(), "{:?}", r.violations);
    }

    /// Servers of three engines, their sessions spread by the acceptor:
    /// clients on two exports (many-clients) and every fault at once.
    #[test]
    fn three_engines_hold_every_invariant() {
        for (scenario, seed) in [
            (Scenario::ManyClients, 95_000),
            (Scenario::ManyClients, 95_001),
            (Scenario::AllFaults, 95_002),
        ] {
            let r = run_with_engines(scenario, seed, 10.0, &[], 3);
            assert!(r.ios > 0, "{scenario} seed {seed}: no IO checked");
            assert!(
                r.violations.is_empty(),
                "{scenario} seed {seed}: {:?}",
                r.violations
            );
        }
    }

    /// The real server driver's `set_keys`, reached as `braid reload`
    /// reaches it: the client's channels close when its key is withdrawn,
    /// its reconnects are refused until the key is back, and its IO then
    /// goes on with nothing lost or applied twice (the workers' checks),
    /// through server crashes that boot with the key file as it is then.
    #[test]
    fn a_withdrawn_key_closes_the_clients_channels_and_loses_nothing() {
        let mut revoked = 0;
        for seed in 0..4 {
            let r = run(Scenario::KeyWithdrawn, seed, 10.0);
            assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
            assert!(r.ios > 0, "seed {seed}: no IO checked");
            assert!(r.faults.get(&Fault::KeyWithdrawn) > Some(&0), "seed {seed}");
            revoked += r.channels_revoked;
        }
        assert!(revoked > 0, "no withdrawal closed a channel");
    }

    #[test]
    fn the_earliest_differing_step_is_named() {
        let mut a = Report::empty(1, Scenario::Steady);
        a.steps = vec![vec![(10, 1), (20, 2), (30, 3)], vec![(15, 7), (25, 8)]];
        let mut b = a.clone();
        assert_eq!(first_divergence(&a, &b), None);
        b.steps[0][2].1 = 99; // worker 0 parts at 30 ns
        b.steps[1][1].1 = 99; // worker 1 parts at 25 ns: earlier
        let d = first_divergence(&a, &b).unwrap();
        assert!(d.contains("worker 1, IO 1"), "{d}");
        b.steps[1].truncate(1); // a run that stopped early parts there too
        assert!(first_divergence(&a, &b).unwrap().contains("worker 1, IO 1"));
    }
}
