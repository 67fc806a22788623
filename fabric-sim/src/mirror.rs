//! The `mirror` scenario: a volume mirrored over three server nodes, the
//! real volume driver over a real client per leg, and faults on the legs
//! one at a time or overlapping (crash, power loss, partition, stall).
//! Every read is judged by the checker; once the faults heal, every leg
//! must be back in sync and hold the same bytes. The `migrate` scenario
//! adds a fourth server node and moves one leg to it mid-run, with every
//! node (the new one too) taking faults: the migration must finish, and
//! the legs the volume ends with must converge. In half the seeds that
//! move a leg (here, or in the layouts below that do), the old leg's
//! server is shut down for good the moment it retires, as an operator
//! decommissions it: nothing may wait on it after. The `stripe` scenario
//! stripes the volume over the three instead, each leg the only copy of
//! its chunks, with one leg taken down alone first: IO to a leg that is
//! down waits for it, and IO kept to the other legs must go on meanwhile.
//! `striped-mirrors` stripes it over two mirrors of two nodes each, with
//! one whole mirror taken down first: the stripe's check between the
//! mirrors, the mirror's checks within each. `linear` puts a mirror of
//! two nodes and a third node's smaller export one after the other,
//! with the same checks across the seam (a quarter of the shared
//! workers' IOs aimed across it), and bad blocks on the export, and in
//! half the seeds on the mirror's legs too. `stripe-restart` kills and
//! restarts the stripe's client, as `mirror-restart` does the mirror's
//! (in half of the mirror's seeds, in the middle of a log store:
//! `logs.rs`);
//! in half the seeds of each the restarted client is killed again as its
//! workers stop, and the run after it reads everything back across power
//! cuts (`read_back_across_power_cuts`). `migrate-restart` restarts the
//! `linear` layout's client while a leg moves: each boot opens the map
//! the last one stored ([`StoredMap`]), and in half the seeds the client
//! dies mid-switch ([`MidSwitch`]).
//! The layouts are in `layout.rs`; what is judged once a run is over
//! (besides each read), in `judge.rs`.

use crate::disk::SimDisk;
use crate::judge::{
    degraded, divergence, isolation, masking, LegHistory, Outage, Window, UNREACHABLE,
};
use crate::layout::{Layout, Zones};
use crate::logs::MemLogs;
use crate::workload::{shared_worker, Failed, SharedPlan, BLOCK};
use crate::world::Report;
use braid_core::auth::Key;
use braid_core::client::ClientConfig;
use braid_core::rng::SplitMix64;
use braid_core::server::{ExportConfig, ServerConfig};
use braid_core::testkit::{Fault, MemDisk, Sabotage, Scenario};
use braid_core::volume::{LegInfo, LegState, VolumeConfig, VolumeMap};
use braid_fabric_tcp::{Client, ClientSecurity, Volume};
use madsim::net::NetSim;
use madsim::runtime::Handle;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PORT: u16 = 7410;
const WORKERS: u64 = 12;

/// Seeds the stream that decides which restarting seeds crash the client
/// once more at the end: it leaves the pinned restart seeds out.
const END_CRASH_DRAW: u64 = 0x454e_5525;

/// Seeds the stream that decides which restarting seeds kill the client
/// mid-run in the middle of a log store: it leaves the pinned restart
/// seeds out.
const TORN_STORE_DRAW: u64 = 0x544f_524e_0b29;

/// Seeds the stream that decides which `migrate-restart` seeds kill the
/// client mid-switch.
const MID_SWITCH_DRAW: u64 = 0x5357_4954_4348;

/// Seeds the stream that decides each `migrate-quorum` seed's quorum.
const QUORUM_DRAW: u64 = 0x5155_4f52_554d;

/// How many stores of the new map fail in a seed that kills the client
/// mid-switch: the driver tries again each second, so the switch stays
/// open for as many seconds (the old leg, cut off in it, must time out
/// first).
const MID_SWITCH_STORE_FAILS: u64 = 4;

/// How long a server the end crash cuts power to stays down.
const POWER_CUT_HOLD: Duration = Duration::from_millis(50);

/// One leg's server node and its disk, as the faults, the end crash and
/// the operator act on them.
#[derive(Clone)]
struct LegServer {
    handle: Handle,
    node: madsim::task::NodeId,
    disk: Arc<Mutex<MemDisk>>,
    /// Shut down for good: a fault that struck before must not bring it
    /// back when it heals.
    gone: Arc<AtomicBool>,
    /// Held by whatever strikes it: faults on one leg take turns (two
    /// restarts at once would find the port taken).
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl LegServer {
    /// Killed, started again after `hold`.
    async fn crash(&self, hold: Duration) {
        self.handle.kill(self.node);
        tokio::time::sleep(hold).await;
        self.restart_unless_gone();
    }

    /// Killed with its disk's cache lost, started again after `hold` (a
    /// node restarted at once can find its port still held by the one
    /// killed).
    async fn lose_power(&self, hold: Duration) {
        self.handle.kill(self.node);
        self.disk.lock().unwrap().lose_power();
        tokio::time::sleep(hold).await;
        self.restart_unless_gone();
    }

    /// Paused, resumed after `hold`.
    async fn stall(&self, hold: Duration) {
        self.handle.pause(self.node);
        tokio::time::sleep(hold).await;
        if !self.gone.load(Ordering::SeqCst) {
            self.handle.resume(self.node);
        }
    }

    fn restart_unless_gone(&self) {
        if !self.gone.load(Ordering::SeqCst) {
            self.handle.restart(self.node);
        }
    }

    /// Shut down for good, as an operator decommissions a server.
    fn decommission(&self) {
        self.gone.store(true, Ordering::SeqCst);
        self.handle.kill(self.node);
    }
}

/// Per leg: its disk is full, its disk is slow. Outside the server node,
/// so they outlast its crashes.
type DiskFlags = (Arc<AtomicBool>, Arc<AtomicBool>);

fn server_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1 + i as u8))
}

pub(crate) async fn simulate(
    scenario: Scenario,
    seed: u64,
    run_for: Duration,
    sabotage: Vec<Sabotage>,
    engines: usize,
) -> Report {
    let handle = Handle::current();
    let mut rng = SplitMix64::new(seed ^ 0x3141_5926);
    let key = Key::new(crate::world::seed_bytes(seed, 1).to_vec());
    let layout = Layout::of(scenario);
    let restart = scenario.restarts_its_client();
    // Half the seeds of several groups move a leg too (their own stream
    // decides). Of the scenarios whose client restarts only
    // `migrate-restart` does, so that the others keep their pinned seeds.
    let restarts_moving = matches!(scenario, Scenario::MigrateRestart | Scenario::MigrateQuorum);
    let migrate = scenario == Scenario::Migrate
        || restarts_moving
        || (layout.grouped() && !restart && SplitMix64::new(seed ^ 0x0057_21fe).chance(0.5));
    // In half the seeds of a restarting client whose leg moves it dies
    // mid-switch, after the first store of the new map failed.
    let mid_switch_crash = restarts_moving && SplitMix64::new(seed ^ MID_SWITCH_DRAW).chance(0.5);
    // When, from which leg, and how many of the first stores of the new
    // map fail (the driver must try again, writing to both meanwhile).
    // A copy under the faults' disk stalls can take seconds: a seed that
    // is to die in its switch starts it in the run's first quarter.
    let start_within = run_for.as_millis() as u64 / if mid_switch_crash { 4 } else { 2 };
    let migration = migrate.then(|| {
        let at = Duration::from_millis(500 + rng.below(start_within));
        (
            at,
            rng.below(layout.legs() as u64) as usize,
            if mid_switch_crash {
                MID_SWITCH_STORE_FAILS
            } else {
                u64::from(rng.chance(0.5))
            },
        )
    });
    // The migration's target is one more server node, of its leg's size.
    let sizes: Vec<u64> = (0..layout.legs())
        .chain(migration.map(|(_, from, _)| from))
        .map(|leg| layout.leg_size(leg))
        .collect();
    let disks: Vec<Arc<Mutex<MemDisk>>> = sizes
        .iter()
        .map(|&size| Arc::new(Mutex::new(MemDisk::new(size))))
        .collect();
    let disk_flags: Vec<DiskFlags> = disks.iter().map(|_| DiskFlags::default()).collect();
    let servers = start_servers(&handle, seed, &key, &sabotage, engines, &disks, &disk_flags);
    let leg_servers: Vec<LegServer> = (0..disks.len())
        .map(|i| LegServer {
            handle: handle.clone(),
            node: servers[i],
            disk: disks[i].clone(),
            gone: Arc::default(),
            turn: Arc::default(),
        })
        .collect();
    // In half the seeds that move a leg (their own stream decides) the
    // operator shuts the old server down for good once it is retired:
    // nothing the volume does after may wait on it.
    let decommission = migration
        .filter(|_| SplitMix64::new(seed ^ 0x0de0_c0de).chance(0.5))
        .map(|(_, from, _)| leg_servers[from].clone());

    let client_node = handle
        .create_node()
        .name("client")
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 100)));
    let zones = Zones::of(layout);
    let bad = bad_blocks(scenario, layout, seed);
    // Only legs holding the same bytes can disagree on a write in flight
    // at the crash; a stripe's reads of such a write must stand.
    let may_revert = restart && layout.groups.iter().any(|g| g.len() > 1);
    let checker = volume_checker(bad.is_some(), may_revert, zones.shared.1);
    let own_checkers = zones
        .own
        .iter()
        .map(|&(_, (_, sectors))| volume_checker(bad.is_some(), may_revert, sectors))
        .collect();
    let next_io = Arc::new(AtomicU64::new(1));
    let ctx = ClientCtx {
        seed,
        key,
        layout,
        own_checkers,
        quorum: match scenario {
            Scenario::MirrorQuorum => Some(2),
            // A quorum of one lets a write be acknowledged on the moving
            // leg's word or the new one's alone (engine swarm seed
            // 20548), a quorum of two on one leg of each.
            Scenario::MigrateQuorum => {
                Some(1 + usize::from(SplitMix64::new(seed ^ QUORUM_DRAW).chance(0.5)))
            }
            _ => None,
        },
        sabotage,
        migration,
        decommission,
        end_crash: restart && SplitMix64::new(seed ^ END_CRASH_DRAW).chance(0.5),
        workers_stopped: Arc::default(),
        leg_servers: leg_servers.clone(),
        end_power_cuts: Arc::default(),
        checker: checker.clone(),
        next_io: next_io.clone(),
        logs: Arc::new(MemLogs::default()),
        map: Arc::default(),
        mid_switch_crash,
        boots: Arc::new(AtomicU64::new(0)),
        run_for,
        until: restart.then(|| tokio::time::Instant::now() + run_for),
        faults_over: Arc::default(),
        strikes_over: Arc::default(),
        boots_seen: Arc::default(),
    };
    // Where a restartable client leaves its result.
    let done: Arc<Mutex<Option<ClientResult>>> = Arc::default();
    // The node keeps its boot closure, and through the leg servers the
    // context holds a handle on the runtime that holds the node: a cycle
    // that kept every restarting run's disks and logs alive (9-12 MB a
    // run; a sweep of 1,800 `migrate-quorum` runs was killed for want of
    // memory). The closure reaches the context through this slot, which
    // the run empties when it ends.
    let boot_slot: BootSlot = Arc::new(Mutex::new(Some((ctx.clone(), done.clone()))));
    let client_node = if restart {
        client_node.init(client_boot(boot_slot.clone()))
    } else {
        client_node
    }
    .build();
    // The node the client runs on now: partitions cut that one off.
    let client_now = Arc::new(Mutex::new(client_node.id()));
    let work = (!restart).then(|| client_node.spawn(client_body(ctx.clone())));
    // The client killed and restarted mid-run (its own random stream).
    let restarter = restart.then(|| {
        kill_and_restart(
            &handle,
            client_node.id(),
            &servers,
            &client_now,
            &ctx,
            boot_slot.clone(),
        )
    });
    // Bad blocks come from their own stream, so the other faults of a
    // seed stay as they are in `mirror`.
    let media = bad.map(|legs| {
        let disks = disks.clone();
        tokio::spawn(inject_media_errors(seed, disks, legs, run_for))
    });
    let targets: Vec<LegTarget> = (0..disks.len())
        .map(|i| LegTarget {
            net: NetSim::current(),
            server: leg_servers[i].clone(),
            client: client_now.clone(),
            flags: disk_flags[i].clone(),
        })
        .collect();
    let started = tokio::time::Instant::now();
    let (mut faults, mut outages) = inject(
        &targets,
        &mut rng,
        layout.grouped().then_some((seed, layout)),
        started + run_for,
    )
    .await;
    if let Some(m) = media {
        let bad = m.await.unwrap_or_default();
        faults.insert(Fault::MediaErrors, bad.len() as u64);
        // A leg with bad blocks leaves its mirror until resynced: the
        // judges count it as troubled then, as with any other fault.
        outages.extend(bad);
    }
    ctx.strikes_over.store(true, Ordering::SeqCst);
    let mut report = Report {
        faults,
        ..Report::empty(seed, scenario)
    };
    if let Some(r) = restarter {
        let restarts = r.await.unwrap_or_default();
        outages.extend(restarts.outage);
        let mut count = |fault, n| *report.faults.entry(fault).or_insert(0) += n;
        if restarts.cut {
            count(Fault::Partition, 1);
        }
        if restarts.late {
            count(Fault::LateFrames, 1);
        }
        if restarts.torn {
            count(Fault::TornLogStore, 1);
        }
        if let Some((cut, power)) = restarts.mid_switch {
            count(Fault::MidSwitchCrash, 1);
            count(Fault::Partition, u64::from(cut));
            count(Fault::PowerLoss, u64::from(power));
        }
        count(Fault::ClientCrash, 1);
        if let Some(cuts) = restarts.end_power_cuts {
            count(Fault::ClientCrash, 1);
            count(Fault::PowerLoss, cuts);
        }
    }
    ctx.faults_over.store(true, Ordering::SeqCst);
    let result = match work {
        Some(work) => work.await.map_err(|e| e.to_string()),
        None => loop {
            if let Some(r) = done.lock().unwrap().take() {
                break Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        },
    };
    if leg_servers.iter().any(|l| l.gone.load(Ordering::SeqCst)) {
        report.faults.insert(Fault::RetiredLegGone, 1);
    }
    let cuts = ctx.end_power_cuts.load(Ordering::SeqCst);
    if cuts > 0 {
        *report.faults.entry(Fault::PowerLoss).or_insert(0) += cuts;
    }
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let moved_from = migration.map(|(_, from, _)| from);
    let retired = report.add_volume_client(result, layout, moved_from, &mut hash, &outages);
    // Bad blocks and full disks reach the user only where no copy in
    // sync could have served, in every boot of the client.
    for seen in ctx.boots_seen.lock().unwrap().iter_mut() {
        match seen.history(layout.legs()) {
            Ok(history) => {
                let refused = seen.refused.lock().unwrap();
                let judged = masking(&outages, &refused, layout, moved_from, &history);
                report.violations.extend(judged.violations);
            }
            Err(e) => report.violations.push(format!("client: {e}")),
        }
    }
    // Every mirror's legs that the volume ends with hold the same bytes.
    report
        .violations
        .extend(divergence(&disks, layout, moved_from, &retired));
    if restart {
        // The first boot's workers died with it: count what the checkers
        // saw complete instead.
        let outstanding: usize = [&checker]
            .into_iter()
            .chain(&ctx.own_checkers)
            .map(|c| c.lock().unwrap().outstanding())
            .sum();
        report.ios = next_io.load(Ordering::SeqCst) - 1 - outstanding as u64;
    }
    report.trace_hash = hash ^ report.ios;
    if report.longest_io > crate::world::STALL_LIMIT {
        report.violations.push(format!(
            "liveness: an IO took {:?} of virtual time",
            report.longest_io
        ));
    }
    if report.ios == 0 {
        report.violations.push("liveness: no IO completed".into());
    }
    let moved = *client_now.lock().unwrap();
    let nodes = servers
        .into_iter()
        .chain([client_node.id()])
        .chain((moved != client_node.id()).then_some(moved));
    report
        .violations
        .extend(crate::world::tear_down(&handle, nodes).await);
    boot_slot.lock().unwrap().take();
    report
}

/// Which nodes grow bad blocks: every one in `mirror-errors`, where the
/// mirror hides them. In `linear` the plain export, whose bad blocks fail
/// IO there as one disk's would, and the mirror's legs too in the seeds
/// that take none of them down alone first: in those a leg's bad blocks
/// would leave its partner's outage nothing for the degraded check to
/// judge.
fn bad_blocks(scenario: Scenario, layout: Layout, seed: u64) -> Option<Vec<usize>> {
    let legs = 0..layout.legs();
    match scenario {
        Scenario::MirrorErrors => Some(legs.collect()),
        Scenario::Linear if lone_mirror_leg_first(seed, layout).is_none() => Some(legs.collect()),
        Scenario::Linear => Some(
            legs.filter(|&leg| layout.groups[layout.group_of(leg)].len() == 1)
                .collect(),
        ),
        _ => None,
    }
}

/// Whether seed `seed` first takes one mirror leg down alone for longer
/// than the mirror may wait for it, its partner in sync, so that the
/// degraded check has an outage to judge (faults drawn from the mix leave
/// one in about 1% of seeds): in half the seeds of a linear volume, and
/// only there, so that the other layouts' pinned seeds keep their
/// schedules. If so, the rest of that choice's random stream.
fn lone_mirror_leg_first(seed: u64, layout: Layout) -> Option<SplitMix64> {
    let mut solo = SplitMix64::new(seed ^ 0x5010_1e90);
    (layout.linear && solo.chance(0.5)).then_some(solo)
}

/// The checker of every read through the volume: errors only where one
/// disk would give them (the last leg in sync full, or with bad blocks
/// where legs grow them); reads of writes not yet acknowledged may go back
/// if `unacked_may_revert`.
fn volume_checker(
    bad_blocks: bool,
    unacked_may_revert: bool,
    sectors: u64,
) -> Arc<Mutex<braid_core::testkit::Checker>> {
    let mut checker = braid_core::testkit::Checker::new(sectors);
    // The last copy in sync may report a media error; none are injected.
    checker.errors_allowed = false;
    // Except a full disk on the last leg in sync: its writes fail with
    // NoSpace, as one full disk's do (the other legs are away then).
    checker.allowed_errors = vec!["NoSpace"];
    if bad_blocks {
        // Bad blocks on the last leg in sync (or on a plain export) fail
        // IO there, as on one disk.
        checker.allowed_errors.push("Media");
    }
    checker.unacked_reads_may_revert = unacked_may_revert;
    Arc::new(Mutex::new(checker))
}

impl Report {
    /// Adds what the volume's client reported (`result`: its node's, then
    /// its own); returns the legs it retired. `moved_from`: the leg
    /// migrated to node `layout.legs()`, if one was; `hash` gathers the
    /// workers' traces; `outages` are the faults the legs took.
    fn add_volume_client(
        &mut self,
        result: Result<ClientResult, String>,
        layout: Layout,
        moved_from: Option<usize>,
        hash: &mut u64,
        outages: &[Outage],
    ) -> Vec<usize> {
        let ClientEnd {
            outcomes,
            own,
            stats,
            retired,
            opened_switched,
            window,
        } = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.violations.push(format!("client: {e}"));
                return Vec::new();
            }
            Err(e) => {
                self.violations.push(format!("client node: {e}"));
                return Vec::new();
            }
        };
        self.legs_left = stats.legs_left;
        self.regions_resynced = stats.regions_resynced;
        // Switched over by this boot, or by one before it.
        self.migrations = stats.migrations + u64::from(opened_switched);
        if moved_from.is_some() && (self.migrations != 1 || retired.len() != 1) {
            self.violations.push(format!(
                "migration: {} finished, legs retired {retired:?}",
                self.migrations
            ));
        }
        if !own.is_empty() {
            let answered: Vec<_> = own
                .iter()
                .map(|(group, o)| (*group, o.answered_at.clone()))
                .collect();
            let apart = isolation(outages, &answered, &window, layout, moved_from);
            self.violations.extend(apart.violations);
            self.isolation_checks = apart.judged;
            self.isolation_pause = apart.longest;
            let degraded = degraded(outages, &answered, &window, layout);
            self.violations.extend(degraded.violations);
            self.degraded_checks = degraded.judged;
            self.degraded_pause = degraded.longest;
        }
        for o in outcomes.into_iter().chain(own.into_iter().map(|(_, o)| o)) {
            self.ios += o.ios;
            self.media_errors += o.media_errors;
            self.no_space_errors += o.no_space_errors;
            self.violations.extend(o.violations);
            self.longest_io = self.longest_io.max(o.longest);
            self.steps.push(o.steps);
            *hash = (*hash ^ o.trace).wrapping_mul(0x0100_0000_01b3);
        }
        retired
    }
}

/// A server node per disk, each serving it as export `disk0` (its disks'
/// full and slow flags outlast its crashes), in node order.
fn start_servers(
    handle: &Handle,
    seed: u64,
    key: &Key,
    sabotage: &[Sabotage],
    engines: usize,
    disks: &[Arc<Mutex<MemDisk>>],
    disk_flags: &[DiskFlags],
) -> Vec<madsim::task::NodeId> {
    let mut servers = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let (disk, key, sabotage) = (disk.clone(), key.clone(), sabotage.to_vec());
        let (full, slow) = disk_flags[i].clone();
        let size = disk.lock().unwrap().size();
        let boots = Arc::new(AtomicU64::new(0));
        let node = handle
            .create_node()
            .name(format!("server{i}"))
            .ip(server_ip(i))
            .init(move || {
                let (disk, key, sabotage) = (disk.clone(), key.clone(), sabotage.clone());
                let (full, slow) = (full.clone(), slow.clone());
                let boot = boots.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    let config = ServerConfig::new(
                        seed.rotate_left(i as u32 + 3) ^ boot,
                        crate::world::seed_bytes(seed, 50 + 8 * i as u64 + boot),
                        vec![("sim".into(), key)],
                        vec![ExportConfig::new("disk0", size)],
                    );
                    let disk = SimDisk {
                        disks: vec![disk],
                        full,
                        slow,
                        rng: Mutex::new(SplitMix64::new(seed ^ (boot << 8) ^ i as u64)),
                        late_completions: false,
                    };
                    crate::world::serve_sim(server_ip(i), config, &sabotage, engines, disk, |_| {})
                        .await;
                }
            })
            .build();
        servers.push(node.id());
    }

    servers
}

/// What [`kill_and_restart`] did.
#[derive(Default)]
struct Restarts {
    /// A leg was cut off as the client died.
    cut: bool,
    /// The dead run's frames to it were held until the new run had its
    /// session there.
    late: bool,
    /// The client died in the middle of a log store.
    torn: bool,
    /// The client died while the migration switched over; whether the old
    /// leg was cut off then, and whether it lost power as the client died.
    mid_switch: Option<(bool, bool)>,
    /// The legs the kill cut off, as the new run found them.
    outage: Vec<Outage>,
    /// The client was killed again at the end, and this many legs lost
    /// power then.
    end_power_cuts: Option<u64>,
}

/// Kills the client node once, mid-run, and boots the volume's next run
/// (on the same node, or in late seeds on a second one).
fn kill_and_restart(
    handle: &Handle,
    client: madsim::task::NodeId,
    servers: &[madsim::task::NodeId],
    client_now: &Arc<Mutex<madsim::task::NodeId>>,
    ctx: &ClientCtx,
    boot_slot: BootSlot,
) -> tokio::task::JoinHandle<Restarts> {
    let (handle, seed, run_for) = (handle.clone(), ctx.seed, ctx.run_for);
    let checkers: Vec<_> = [ctx.checker.clone()]
        .into_iter()
        .chain(ctx.own_checkers.iter().cloned())
        .collect();
    let mut rng = SplitMix64::new(seed ^ 0x00c1_1e47);
    // In half the seeds one leg is cut off as the client dies, with
    // its writes still in the network, and the cut heals after the
    // restarted client is running: the dead run's frames then arrive
    // late, which only fencing makes harmless (seed 90 found it).
    let mut cut_rng = SplitMix64::new(seed ^ 0x0f3e_ce00);
    let legs = ctx.layout.legs() as u64;
    // (A seed that dies mid-switch cuts off the old leg its own way.)
    let cut_leg =
        (cut_rng.below(2) == 0 && !ctx.mid_switch_crash).then(|| cut_rng.below(legs) as usize);
    let cut = cut_leg.map(|leg| servers[leg]);
    // In half of those the dead run's frames are held until the new
    // run has its session on that leg. madsim holds a link between
    // two nodes, where a real network holds one connection's segments
    // and lets a new connection's through; so the new run starts on a
    // second client node, and only the dead run's link stays cut.
    let mut late_rng = SplitMix64::new(seed ^ 0x1a7e_f4a3);
    let late = cut.is_some() && late_rng.below(2) == 0;
    let (client_now, boot) = (client_now.clone(), client_boot(boot_slot));
    let (end_crash, workers_stopped) = (ctx.end_crash, ctx.workers_stopped.clone());
    let (leg_servers, strikes_over) = (ctx.leg_servers.clone(), ctx.strikes_over.clone());
    // In half the seeds the client dies in the middle of storing its
    // legs' logs (the first store after the drawn moment). Only copies
    // keep logs: a stripe of single legs stores none.
    let mirrored = ctx.layout.groups.iter().any(|g| g.len() > 1);
    let tear =
        mirrored && !ctx.mid_switch_crash && SplitMix64::new(seed ^ TORN_STORE_DRAW).chance(0.5);
    let logs = ctx.logs.clone();
    let mid_switch = ctx
        .migration
        .filter(|_| ctx.mid_switch_crash)
        .map(|(_, from, _)| MidSwitch {
            map: ctx.map.clone(),
            old_leg: from,
            old: ctx.leg_servers[from].clone(),
            rng: SplitMix64::new(seed ^ 0x0c07_0ff5),
            cut_from: None,
            power_cut: None,
        });
    tokio::spawn(async move {
        let net = NetSim::current();
        let span = run_for.as_millis() as u64 - 4000;
        let draw = rng.below(span);
        let mut cut_from = None;
        // Late seeds kill the client in the run's last few seconds, so
        // what the held writes put back has had the new run's writes
        // before it and has few after it to hide it (400 seeds with
        // fencing off: 3 of 106 late seeds failed when killed in the
        // first 2.5 s, 10 when in the last 4.5-3 s, 8 in the last
        // 3.5-2.5 s). madsim retries a held frame at doubling
        // intervals, so they land within about twice as long as they
        // were held, while the run still checks.
        let kill_at = if late {
            span.saturating_sub(500) + draw % 1500
        } else {
            1500 + draw
        };
        // From here on, only a client that dies mid-switch has one.
        let mut mid_switch = match mid_switch {
            Some(mut m) => m.wait_for_the_switch(&net, run_for).await.then_some(m),
            None => {
                tokio::time::sleep(Duration::from_millis(kill_at)).await;
                None
            }
        };
        if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
            eprintln!(
                "{:?} client kill -9 (cut off: {cut:?}, frames held until the next run: {late})",
                tokio::time::Instant::now()
            );
        }
        if let Some(server) = cut {
            // A little before the kill, so frames sent meanwhile are
            // held in the network (those sent earlier arrive anyway).
            // The node, not the link: a partition fault on the same
            // link would otherwise heal it early. Late seeds hold the
            // dead run's link only (a partition fault there may heal
            // it early: that seed then tests less).
            if late {
                net.clog_link(client, server);
                net.clog_link(server, client);
            } else {
                net.clog_node(server);
                cut_from = Some(tokio::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20 + cut_rng.below(400))).await;
        }
        let mut torn = false;
        if tear {
            logs.tear_next_store(client, SplitMix64::new(seed ^ 0x0054_4541));
            // Under the workers' writes a store comes with nearly every
            // change of a leg's marks; a run with none for a second (a
            // leg out for long, the workers waiting) dies as the others.
            torn = tokio::time::timeout(Duration::from_secs(1), logs.torn())
                .await
                .is_ok();
            if !torn {
                logs.tear_no_store();
            }
        }
        if !torn {
            handle.kill(client);
        }
        for checker in &checkers {
            checker.lock().unwrap().unflushed_may_revert();
        }
        if let Some(m) = mid_switch.as_mut() {
            m.maybe_cut_power().await;
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.below(900))).await;
        if late {
            let again = handle
                .create_node()
                .name("client-again")
                .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 101)))
                .init(boot)
                .build();
            *client_now.lock().unwrap() = again.id();
        } else {
            handle.restart(client);
        }
        match cut {
            Some(server) if late => {
                // The new run connects to every leg at once; its
                // session there ends the dead run's before these
                // frames arrive.
                tokio::time::sleep(Duration::from_millis(500 + late_rng.below(1500))).await;
                net.unclog_link(client, server);
                net.unclog_link(server, client);
            }
            Some(server) => {
                // The restarted client attaches without the leg
                // meanwhile (as `braid attach` does) and resyncs it on
                // return. The held frames land on their next retry
                // (madsim doubles the interval); with fencing off some
                // of these seeds fail too (46, 154 and 174 of the first
                // 200), but the late seeds are the ones made for it.
                tokio::time::sleep(Duration::from_millis(1000 + cut_rng.below(3000))).await;
                net.unclog_node(server);
            }
            None => {}
        }
        // The new run judged as any run is: that leg was out meanwhile.
        let mut outage: Vec<Outage> = cut_leg
            .zip(cut_from)
            .map(|(leg, from)| Outage {
                leg,
                kind: Fault::Partition,
                from,
                to: tokio::time::Instant::now(),
                bad_bytes: None,
            })
            .into_iter()
            .collect();
        if let Some(m) = mid_switch.as_mut() {
            outage.extend(m.heal(&net).await);
        }
        let mut end = None;
        if end_crash {
            while !workers_stopped.load(Ordering::SeqCst) || !strikes_over.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let node = *client_now.lock().unwrap();
            handle.kill(node);
            for checker in &checkers {
                checker.lock().unwrap().unflushed_may_revert();
            }
            // Each leg loses power with even odds as the client dies: a
            // cache the dead run left is lost or kept whole.
            let mut power_rng = SplitMix64::new(seed ^ 0x0e4d_c0a7);
            let mut cuts = 0;
            for leg in &leg_servers {
                if power_rng.chance(0.5) {
                    leg.lose_power(POWER_CUT_HOLD).await;
                    cuts += 1;
                }
            }
            if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
                eprintln!(
                    "{:?} client kill -9 as its workers stop; {cuts} legs lost power",
                    tokio::time::Instant::now()
                );
            }
            tokio::time::sleep(Duration::from_millis(100 + rng.below(900))).await;
            handle.restart(node);
            end = Some(cuts);
        }
        Restarts {
            cut: cut.is_some(),
            late,
            torn,
            mid_switch: mid_switch.map(|m| (m.cut_from.is_some(), m.power_cut.is_some())),
            outage,
            end_power_cuts: end,
        }
    })
}

/// The death of a `migrate-restart` client mid-switch, and what it does
/// to the old leg: the sequence swarm seed 6628 found in the engine. With
/// the old leg away, the old map holds some bytes only in its cache, and
/// a FLUSH answered then must not have promised them: the old leg then
/// loses power, and the next boot opens the old map.
struct MidSwitch {
    map: Arc<StoredMap>,
    old_leg: usize,
    old: LegServer,
    rng: SplitMix64,
    /// Since when the old leg is cut off.
    cut_from: Option<tokio::time::Instant>,
    /// When the old leg lost power.
    power_cut: Option<tokio::time::Instant>,
}

impl MidSwitch {
    /// Waits for the first store of the new map to fail; in half the
    /// seeds cuts the old leg off then, for longer than the volume waits
    /// for a leg. Returns once the client is to die, and whether that is
    /// mid-switch: a migration whose copy the faults hold up past the
    /// workers' run leaves the client to die as others do.
    async fn wait_for_the_switch(&mut self, net: &NetSim, run_for: Duration) -> bool {
        let workers_run = run_for - Duration::from_secs(1);
        let store_failed = self.map.store_failed.notified();
        if tokio::time::timeout(workers_run, store_failed)
            .await
            .is_err()
        {
            return false;
        }
        let hold = if self.rng.chance(0.5) {
            net.clog_node(self.old.node);
            self.cut_from = Some(tokio::time::Instant::now());
            // Past the leg timeout (1 s), with FLUSHes going on.
            1200 + self.rng.below(1500)
        } else {
            self.rng.below(900)
        };
        // Before the last failing store's retry succeeds.
        debug_assert!(hold < (MID_SWITCH_STORE_FAILS - 1) * 1000);
        tokio::time::sleep(Duration::from_millis(hold)).await;
        if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
            eprintln!(
                "{:?} the client dies mid-switch (leg{} cut off: {})",
                tokio::time::Instant::now(),
                self.old_leg,
                self.cut_from.is_some()
            );
        }
        true
    }

    /// With even odds the old leg loses power as the client dies, unless
    /// a fault has it already.
    async fn maybe_cut_power(&mut self) {
        if !self.rng.chance(0.5) {
            return;
        }
        let turn = self.old.turn.clone();
        let Ok(_turn) = turn.try_lock() else {
            return;
        };
        self.power_cut = Some(tokio::time::Instant::now());
        self.old.lose_power(POWER_CUT_HOLD).await;
    }

    /// Heals the cut once the next boot runs; what the old leg went
    /// through, for the judges.
    async fn heal(&mut self, net: &NetSim) -> Vec<Outage> {
        let mut outages = Vec::new();
        if let Some(from) = self.cut_from {
            tokio::time::sleep(Duration::from_millis(500 + self.rng.below(1000))).await;
            net.unclog_node(self.old.node);
            outages.push(Outage {
                leg: self.old_leg,
                kind: Fault::Partition,
                from,
                to: tokio::time::Instant::now(),
                bad_bytes: None,
            });
        }
        if let Some(at) = self.power_cut {
            outages.push(Outage {
                leg: self.old_leg,
                kind: Fault::PowerLoss,
                from: at,
                to: at + POWER_CUT_HOLD,
                bad_bytes: None,
            });
        }
        outages
    }
}

/// What the client node needs, on each boot.
#[derive(Clone)]
struct ClientCtx {
    seed: u64,
    key: Key,
    /// Which legs hold which chunks.
    layout: Layout,
    /// The checkers of the striped volume's workers that each keep to
    /// one group of legs (none for a mirror).
    own_checkers: Vec<Arc<Mutex<braid_core::testkit::Checker>>>,
    /// The mirror's write quorum (`None`: every live leg).
    quorum: Option<usize>,
    sabotage: Vec<Sabotage>,
    /// When a leg moves, which, and how many stores of the new map fail.
    migration: Option<(Duration, usize, u64)>,
    /// The migrated leg's server, to shut down for good once it retired.
    decommission: Option<LegServer>,
    /// The restarted client is killed again as its workers stop, with
    /// writes left unflushed; the run after it reads everything back
    /// across power cuts (see [`read_back_across_power_cuts`]).
    end_crash: bool,
    /// Set by the boot that is to be killed so, once its workers stopped.
    workers_stopped: Arc<AtomicBool>,
    /// Each leg's server, for the end crash's power cuts.
    leg_servers: Vec<LegServer>,
    /// Power cuts the last boot made between its read-backs.
    end_power_cuts: Arc<AtomicU64>,
    checker: Arc<Mutex<braid_core::testkit::Checker>>,
    next_io: Arc<AtomicU64>,
    /// The dirty logs, outside the node: they outlast its restarts.
    logs: Arc<MemLogs>,
    /// Which map a boot opens, outside the node likewise.
    map: Arc<StoredMap>,
    /// Kill the client while the migration switches over.
    mid_switch_crash: bool,
    /// Times the node started.
    boots: Arc<AtomicU64>,
    run_for: Duration,
    /// When the workers stop, if fixed before the client starts.
    until: Option<tokio::time::Instant>,
    /// Set once every fault has healed. Faults waiting their turn on a
    /// leg can strike after the workers stop: the legs are judged only
    /// after they have come back in sync from the last of them (seed
    /// 140584 of `mirror-errors` lost a leg's cache to power after the
    /// legs had settled, and was compared mid-repair).
    faults_over: Arc<AtomicBool>,
    /// Set once every fault on the legs has healed (the client's restarts
    /// aside): the end crash's power cuts wait for it, so no fault still
    /// holding a server down brings it back under them.
    strikes_over: Arc<AtomicBool>,
    /// What each boot's volume did, kept outside the node: a boot the
    /// restart kills is judged too.
    boots_seen: Arc<Mutex<Vec<BootSeen>>>,
}

/// The volume's map as `braid attach` keeps it in its volume file: the
/// layout's, or once a migration's switch is stored, with the new leg in
/// the old one's place. Outside the client node: it outlasts restarts.
#[derive(Default)]
struct StoredMap {
    switched: AtomicBool,
    /// Told each time a store of the new map fails.
    store_failed: tokio::sync::Notify,
}

/// One boot of the client: its volume's leg changes as they are told
/// (read once the run is over), and the IOs it refused.
struct BootSeen {
    legs: tokio::sync::mpsc::UnboundedReceiver<braid_fabric_tcp::LegChange>,
    refused: Arc<Mutex<Vec<Failed>>>,
}

impl BootSeen {
    /// Its legs' states at the start and each change, by leg number
    /// (the volume names leg `n` "legn").
    fn history(&mut self, legs: usize) -> Result<LegHistory, String> {
        let mut history = LegHistory::default();
        while let Ok(change) = self.legs.try_recv() {
            let leg = change.leg.strip_prefix("leg").and_then(|n| n.parse().ok());
            let leg = leg.ok_or_else(|| format!("a leg the volume names {:?}", change.leg))?;
            let in_sync = change.state == LegState::InSync;
            if history.start.len() < legs {
                history.start.push((leg, in_sync));
            } else {
                history.changes.push((change.at, leg, in_sync));
            }
        }
        Ok(history)
    }
}

/// What the client node reports.
struct ClientEnd {
    /// The shared workers' outcomes, then the checkers'.
    outcomes: Vec<crate::workload::Outcome>,
    /// A volume of several groups: the outcomes of the workers of a
    /// group's own zone, each with its group.
    own: Vec<(usize, crate::workload::Outcome)>,
    stats: braid_core::volume::VolumeStats,
    /// The legs retired, by node.
    retired: Vec<usize>,
    /// Its last boot opened a map a boot before had switched.
    opened_switched: bool,
    /// When its workers ran.
    window: Window,
}

type ClientResult = Result<ClientEnd, String>;

/// The client node's task on each boot: [`client_body`], its result left
/// where `slot` says.
fn client_boot(
    slot: BootSlot,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send + Sync + 'static {
    move || {
        let boot = slot.lock().unwrap().clone();
        Box::pin(async move {
            // Empty once the run has ended: nothing left to boot.
            let Some((ctx, done)) = boot else { return };
            let result = client_body(ctx).await;
            *done.lock().unwrap() = Some(result);
        })
    }
}

/// What a restartable client boots with, and where it leaves its result
/// (see where the run makes it).
type BootSlot = Arc<Mutex<Option<(ClientCtx, Arc<Mutex<Option<ClientResult>>>)>>>;

/// The client node: a client per leg, the volume driver over them (its
/// logs from before a restart), the workers until `until`, then the wait
/// for every leg to be back in sync.
async fn client_body(ctx: ClientCtx) -> ClientResult {
    // A restarted client is a new process: new client nonces.
    let boot = ctx.boots.fetch_add(1, Ordering::SeqCst);
    trace_stored_logs(&ctx.logs, boot);
    let run = braid_fabric_tcp::next_run(&*ctx.logs, ctx.seed | 1).map_err(|e| e.to_string())?;
    let layout = ctx.layout;
    // The map this boot opens: the new leg in the old one's place once a
    // boot before stored the switch.
    let switched = ctx.map.switched.load(Ordering::SeqCst);
    let moved_from = ctx.migration.map(|(_, from, _)| from);
    let node_of = |leg: usize| match moved_from {
        Some(from) if switched && leg == from => layout.legs(),
        _ => leg,
    };
    let legs = connect_legs(&ctx, run, boot, node_of).await?;
    let map = VolumeMap::new(&layout.spec(ctx.quorum, node_of), |name| {
        let node: usize = name.strip_prefix("leg")?.parse().ok()?;
        // The new leg's node has the size of the leg it replaces.
        let leg = match moved_from {
            Some(from) if node == layout.legs() => from,
            _ => node,
        };
        Some(LegInfo {
            size: layout.leg_size(leg),
            block_size: 512,
            read_only: false,
        })
    })
    .map_err(|e| e.to_string())?;
    let mut config = VolumeConfig {
        region: 64 << 10,
        resync_rate: 16 << 20,
        max_leg_io: 256 << 10,
        ..VolumeConfig::default()
    };
    for s in &ctx.sabotage {
        s.apply_volume(&mut config.sabotage);
    }
    let leg_timeout = if ctx.sabotage.contains(&Sabotage::NoLegTimeout) {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(1)
    };
    // Kept to see that a retired leg's session is let go.
    let leg_clients = legs.clone();
    let volume = Volume::start(map, legs, config, ctx.logs.clone(), leg_timeout)?;
    let refused: Arc<Mutex<Vec<Failed>>> = Arc::default();
    ctx.boots_seen.lock().unwrap().push(BootSeen {
        legs: volume.watch_legs(),
        refused: refused.clone(),
    });
    // A boot that opens the old map moves the leg (again, if a boot
    // before died before its switch was stored: an operator would run
    // the migration again), later boots soon after they start.
    let mover = ctx.migration.filter(|_| !switched).map(|plan| {
        let (volume, key) = (volume.clone(), ctx.key.clone());
        let plan = match plan {
            plan if boot == 0 => plan,
            (_, from, _) => (Duration::from_millis(300), from, 0),
        };
        let to = Mover {
            node: ctx.layout.legs(),
            boot,
            map: ctx.map.clone(),
        };
        tokio::spawn(migrate(volume, key, ctx.seed, run, plan, to))
    });
    if let (Some(old_server), Some((_, from, _))) = (ctx.decommission.clone(), ctx.migration) {
        let mut legs = volume.watch_legs();
        let old = format!("leg{from}");
        tokio::spawn(async move {
            while let Some(change) = legs.recv().await {
                if change.leg == old && change.state == LegState::Retired {
                    if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
                        eprintln!(
                            "{:?} {old} retired: its server shut down for good",
                            change.at
                        );
                    }
                    return old_server.decommission();
                }
            }
        });
    }
    let zones = Zones::of(ctx.layout);
    // Fixed from the start when the client restarts; else from now.
    let until = ctx
        .until
        .unwrap_or_else(|| tokio::time::Instant::now() + ctx.run_for);
    let plan =
        |id: u64, (zone_start, zone_sectors), checker: &Arc<Mutex<_>>, flushes, seams| SharedPlan {
            id,
            zone_start,
            zone_sectors,
            checker: checker.clone(),
            next_io: ctx.next_io.clone(),
            seed: ctx.seed,
            until,
            flushes,
            seams,
            refusals_to: Some(refused.clone()),
        };
    let workers_from = tokio::time::Instant::now();
    // A FLUSH waits for every leg: a worker of one leg's own sends none.
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            plan(
                0x80 | w,
                zones.shared,
                &ctx.checker,
                true,
                zones.seams.clone(),
            )
        })
        .chain(
            zones
                .own
                .iter()
                .zip(&ctx.own_checkers)
                .map(|(&(group, zone), checker)| {
                    plan(0x40 | group as u64, zone, checker, false, Vec::new())
                }),
        )
        .map(|plan| tokio::spawn(shared_worker(volume.clone(), plan)))
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.map_err(|e| format!("worker panicked: {e}"))?);
    }
    let own = zones
        .own
        .iter()
        .map(|&(group, _)| group)
        .zip(outcomes.split_off(WORKERS as usize))
        .collect();
    if let Some(m) = mover {
        m.await.map_err(|e| format!("migration task: {e}"))??;
    }
    match boot {
        1 if ctx.end_crash => {
            // Killed here, its last writes not yet flushed.
            ctx.workers_stopped.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        2 if ctx.end_crash => read_back_across_power_cuts(&volume, &ctx, &zones).await?,
        _ => {}
    }
    while !ctx.faults_over.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settle(&volume).await?;
    if let (Some(from), false) = (moved_from, switched) {
        retired_leg_let_go(&volume, &leg_clients, from).await?;
    }
    // By node; the old leg is not in a map stored after the switch.
    let retired: Vec<usize> = volume
        .status()
        .legs
        .iter()
        .filter(|l| l.1 == Some(LegState::Retired))
        .filter_map(|l| l.0.strip_prefix("leg")?.parse().ok())
        .chain(moved_from.filter(|_| switched))
        .collect();
    // A FLUSH through the volume, so every leg's cache is on media.
    let _ = crate::workload::Device::io(&volume, braid_core::client::IoRequest::flush()).await;
    outcomes.push(crate::workload::checker_outcome(&ctx.checker, "volume"));
    for (&(group, _), checker) in zones.own.iter().zip(&ctx.own_checkers) {
        outcomes.push(crate::workload::checker_outcome(
            checker,
            &format!("{}'s own zone", layout.name(group)),
        ));
    }
    Ok(ClientEnd {
        outcomes,
        own,
        stats: volume.status().stats,
        retired,
        opened_switched: switched,
        window: Window {
            from: ctx.until.is_some().then_some(workers_from),
            until,
        },
    })
}

/// A migrated leg's session is let go once it retires: nothing is left
/// reconnecting to its server, which may be gone for good (a close would
/// wait 30 s for it, and warn of writes lost that its successor holds).
async fn retired_leg_let_go(
    volume: &Volume,
    leg_clients: &HashMap<String, Client>,
    from: usize,
) -> Result<(), String> {
    let old = format!("leg{from}");
    let retired = volume
        .status()
        .legs
        .iter()
        .any(|l| l.0 == old && l.1 == Some(LegState::Retired));
    let Some(client) = leg_clients.get(&old).filter(|_| retired) else {
        return Ok(());
    };
    // The driver lets go on its next look at the legs (every 100 ms).
    for _ in 0..20 {
        if client.has_left() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{old} retired, but its session is still open"))
}

/// The run after the end crash: reads every zone back, cuts each leg's
/// power with even odds, waits for every leg to be in sync, and reads it
/// all again. What the dead run left in a leg's cache is on media only
/// once this run flushed it (its settling), before serving any of it: a
/// read of a cache no FLUSH made stable would go back in time after the
/// cut, or leave the legs disagreeing. The mid-run crash alone seldom
/// shows that: the writes after it cover what it left.
async fn read_back_across_power_cuts(
    volume: &Volume,
    ctx: &ClientCtx,
    zones: &Zones,
) -> Result<(), String> {
    while !ctx.faults_over.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read_back(volume, ctx, zones).await;
    let mut rng = SplitMix64::new(ctx.seed ^ 0x0e4d_0b5e);
    for (leg, server) in ctx.leg_servers.iter().enumerate() {
        if rng.chance(0.5) {
            if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
                eprintln!(
                    "{:?} leg{leg} loses power after the read-back",
                    tokio::time::Instant::now()
                );
            }
            server.lose_power(POWER_CUT_HOLD).await;
            ctx.end_power_cuts.fetch_add(1, Ordering::SeqCst);
        }
    }
    settle(volume).await?;
    read_back(volume, ctx, zones).await;
    Ok(())
}

/// Reads each zone whole, in pieces, judged by its checker.
async fn read_back(volume: &Volume, ctx: &ClientCtx, zones: &Zones) {
    use braid_core::testkit::SECTOR;
    let each = [(zones.shared, &ctx.checker)].into_iter().chain(
        zones
            .own
            .iter()
            .map(|(_, zone)| *zone)
            .zip(&ctx.own_checkers),
    );
    for ((start, sectors), checker) in each {
        let end = sectors * SECTOR as u64;
        let mut rel = 0;
        while rel < end {
            let len = (end - rel).min(64 << 10) as u32;
            let id = ctx.next_io.fetch_add(1, Ordering::SeqCst);
            let op = braid_core::wire::Op::Read;
            checker.lock().unwrap().submit(id, op, rel, len);
            let io = braid_core::client::IoRequest::read(start + rel, len);
            let result = crate::workload::Device::io(volume, io).await;
            let mut checker = checker.lock().unwrap();
            match &result {
                Ok(data) => checker.complete(id, Ok(&data[..]), false),
                Err(e) => checker.complete(id, Err(e.clone()), false),
            }
            rel += u64::from(len);
        }
    }
}

/// With BRAID_TRACE_VOLUME set, what each leg's stored log says at boot.
fn trace_stored_logs(logs: &MemLogs, boot: u64) {
    if std::env::var_os("BRAID_TRACE_VOLUME").is_none() {
        return;
    }
    for (leg, bytes) in logs.stored() {
        let log = braid_core::volume::DirtyRegions::decode(&bytes);
        eprintln!(
            "{:?} boot {boot}: stored log {leg}: {:?}",
            tokio::time::Instant::now(),
            log.map(|l| (l.behind(), l.dirty_from(0).collect::<Vec<_>>()))
        );
    }
}

/// A client per leg, as `braid attach` makes them: a leg that does not
/// answer is attached without, and resynced when it does.
async fn connect_legs(
    ctx: &ClientCtx,
    run: braid_core::client::Identity,
    boot: u64,
    node_of: impl Fn(usize) -> usize,
) -> Result<HashMap<String, Client>, String> {
    let mut legs = HashMap::new();
    for i in 0..ctx.layout.legs() {
        let node = node_of(i);
        let mut config = ClientConfig::new(
            "disk0",
            "sim",
            ctx.key.clone(),
            crate::world::seed_bytes(ctx.seed, 200 + i as u64 + 16 * boot),
        );
        config.identity = Some(run);
        // The pinned seeds below were found with every request spread.
        config.sticky_slack = 0;
        for s in &ctx.sabotage {
            s.apply_client(&mut config);
        }
        let addr = SocketAddr::new(server_ip(node), PORT).to_string();
        let client = match Client::connect(
            addr.clone(),
            ClientSecurity::Plain,
            config.clone(),
            Duration::from_secs(2),
        )
        .await
        {
            Ok(client) => client,
            Err(_) => {
                let expected = braid_core::client::ExportInfo {
                    size: ctx.layout.leg_size(i),
                    block_size: 512,
                    max_payload: 1 << 20,
                    flags: 0,
                };
                Client::connect_later(addr, ClientSecurity::Plain, config, expected)
                    .map_err(|e| e.to_string())?
            }
        };
        legs.insert(format!("leg{node}"), client);
    }
    Ok(legs)
}

/// Where a migration moves its leg: to server node `node`, by the client's
/// boot `boot`, the switch stored in `map`.
struct Mover {
    node: usize,
    boot: u64,
    map: Arc<StoredMap>,
}

/// The migration of `plan` (when, from which leg, how many of the first
/// stores of the new map fail) to `to`.
async fn migrate(
    volume: Volume,
    key: Key,
    seed: u64,
    run: braid_core::client::Identity,
    (at, from, fails): (Duration, usize, u64),
    to: Mover,
) -> Result<(), String> {
    tokio::time::sleep(at).await;
    // A restarted client is a new process: new client nonces.
    let nonce = crate::world::seed_bytes(seed, 300 + to.boot);
    let mut config = ClientConfig::new("disk0", "sim", key, nonce);
    config.identity = Some(run);
    config.sticky_slack = 0;
    // The new server may be down right now: connecting waits.
    let client = Client::connect(
        SocketAddr::new(server_ip(to.node), PORT).to_string(),
        ClientSecurity::Plain,
        config,
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| format!("migration: {e}"))?;
    let stores = Arc::new(AtomicU64::new(0));
    let map = to.map.clone();
    let store: braid_fabric_tcp::StoreMap = Arc::new(move || {
        let store = stores.fetch_add(1, Ordering::SeqCst);
        if store < fails {
            if store == 0 {
                map.store_failed.notify_one();
            }
            return Err(format!(
                "the map store failed (injected, {} of {fails})",
                store + 1
            ));
        }
        map.switched.store(true, Ordering::SeqCst);
        Ok(())
    });
    let to = to.node;
    if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
        eprintln!(
            "{:?} migrate leg{from} to leg{to}",
            tokio::time::Instant::now()
        );
    }
    volume
        .migrate(&format!("leg{from}"), &format!("leg{to}"), client, store)
        .await
        .map_err(|e| format!("migration refused: {e}"))
}

/// Once healed, every leg must come back in sync and a migration finish,
/// within a minute.
async fn settle(volume: &Volume) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = volume.status();
        let settled = s
            .legs
            .iter()
            .all(|l| matches!(l.1, Some(LegState::InSync | LegState::Retired)));
        if settled && s.migration.is_none() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "legs never back in sync: {:?}, migration {:?}",
                s.legs, s.migration
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a fault on one leg acts on.
#[derive(Clone)]
struct LegTarget {
    net: Arc<NetSim>,
    server: LegServer,
    /// The node the client runs on now.
    client: Arc<Mutex<madsim::task::NodeId>>,
    flags: DiskFlags,
}

impl LegTarget {
    /// Strikes the leg with `kind`, heals it after `hold`.
    async fn strike(&self, kind: Fault, hold: Duration) {
        let (full, slow) = &self.flags;
        match kind {
            Fault::ServerCrash => self.server.crash(hold).await,
            Fault::PowerLoss => self.server.lose_power(hold).await,
            Fault::DiskFull => {
                full.store(true, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                full.store(false, Ordering::SeqCst);
            }
            Fault::DiskStall => {
                slow.store(true, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                slow.store(false, Ordering::SeqCst);
            }
            Fault::Partition => {
                let (client, server) = (*self.client.lock().unwrap(), self.server.node);
                self.net.clog_link(client, server);
                self.net.clog_link(server, client);
                tokio::time::sleep(hold).await;
                self.net.unclog_link(client, server);
                self.net.unclog_link(server, client);
            }
            _ => self.server.stall(hold).await,
        }
    }
}

/// Faults on the legs until two seconds before `end`, and when each
/// struck and healed. With `lone_first` (a seed and the layout), one
/// group of legs is first taken down alone, all of its legs together
/// (crashed, powered off, cut off or stalled for 1.5 to 2.5 s, drawn
/// from a stream of its own), before the others start; in half the
/// seeds of a linear layout, one mirror leg alone before that.
async fn inject(
    targets: &[LegTarget],
    rng: &mut SplitMix64,
    lone_first: Option<(u64, Layout)>,
    end: tokio::time::Instant,
) -> (BTreeMap<Fault, u64>, Vec<Outage>) {
    let mut faults = BTreeMap::new();
    let outages: Arc<Mutex<Vec<Outage>>> = Arc::default();
    let ms =
        |rng: &mut SplitMix64, lo: u64, hi: u64| Duration::from_millis(lo + rng.below(hi - lo));
    let strike = |i: usize, kind: Fault, hold: Duration| {
        let (target, outages) = (targets[i].clone(), outages.clone());
        async move {
            let turn = target.server.turn.clone();
            let _turn = turn.lock().await;
            if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
                eprintln!(
                    "{:?} fault {kind} on server{i} for {hold:?}",
                    tokio::time::Instant::now()
                );
            }
            let from = tokio::time::Instant::now();
            target.strike(kind, hold).await;
            let to = tokio::time::Instant::now();
            outages.lock().unwrap().push(Outage {
                leg: i,
                kind,
                from,
                to,
                bad_bytes: None,
            });
        }
    };
    if let Some((seed, layout)) = lone_first {
        if let Some(mut solo) = lone_mirror_leg_first(seed, layout) {
            tokio::time::sleep(ms(&mut solo, 300, 800)).await;
            let mirrors: Vec<&[usize]> = layout
                .groups
                .iter()
                .copied()
                .filter(|g| g.len() > 1)
                .collect();
            let group = mirrors[solo.below(mirrors.len() as u64) as usize];
            let leg = group[solo.below(group.len() as u64) as usize];
            let kind = UNREACHABLE[solo.below(4) as usize];
            *faults.entry(kind).or_insert(0) += 1;
            strike(leg, kind, ms(&mut solo, 2700, 3500)).await;
        }
        let mut lone = SplitMix64::new(seed ^ 0x0a1e_0e00);
        tokio::time::sleep(ms(&mut lone, 300, 800)).await;
        let i = lone.below(targets.len() as u64) as usize;
        let kind = UNREACHABLE[lone.below(4) as usize];
        // The node a leg moves to stands alone; the others, with the
        // rest of their group.
        let group = if i < layout.legs() {
            layout.groups[layout.group_of(i)]
        } else {
            std::slice::from_ref(&i)
        };
        let hold = ms(&mut lone, 1500, 2500);
        *faults.entry(kind).or_insert(0) += group.len() as u64;
        // A lone leg is struck in this task, as before groups existed,
        // so the stripe's pinned seeds keep their schedules.
        match group {
            [leg] => strike(*leg, kind, hold).await,
            _ => {
                let together: Vec<_> = group
                    .iter()
                    .map(|&leg| tokio::spawn(strike(leg, kind, hold)))
                    .collect();
                for t in together {
                    let _ = t.await;
                }
            }
        }
    }
    let mut pending = Vec::new();
    // Faults on different legs overlap; on one leg they take turns.
    loop {
        tokio::time::sleep(ms(rng, 200, 1500)).await;
        if tokio::time::Instant::now() + Duration::from_secs(2) >= end {
            break;
        }
        let i = rng.below(targets.len() as u64) as usize;
        let kind = [
            Fault::ServerCrash,
            Fault::PowerLoss,
            Fault::Partition,
            Fault::ServerStall,
            Fault::DiskStall,
            Fault::DiskFull,
        ][rng.below(6) as usize];
        *faults.entry(kind).or_insert(0) += 1;
        let hold = ms(rng, 100, 3000);
        // Faults overlap: each heals in its own task.
        pending.push(tokio::spawn(strike(i, kind, hold)));
    }
    for p in pending {
        let _ = p.await;
    }
    let outages = outages.lock().unwrap().clone();
    (faults, outages)
}

/// Bad blocks on one of `legs` at a time (64 KiB of its disk, at a
/// multiple of 64 KiB, for up to three seconds) until two seconds before
/// the end; returns when and where each was.
async fn inject_media_errors(
    seed: u64,
    disks: Vec<Arc<Mutex<MemDisk>>>,
    legs: Vec<usize>,
    run_for: Duration,
) -> Vec<Outage> {
    let mut rng = SplitMix64::new(seed ^ 0x0bad_b10c);
    let end = tokio::time::Instant::now() + run_for;
    let mut outages = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(1300))).await;
        let hold = Duration::from_millis(100 + rng.below(2900));
        if tokio::time::Instant::now() + hold + Duration::from_secs(2) >= end {
            return outages;
        }
        let leg = legs[rng.below(legs.len() as u64) as usize];
        let size = disks[leg].lock().unwrap().size();
        let start = rng.below(size / (64 << 10)) * (64 << 10);
        if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
            eprintln!(
                "{:?} fault media errors on server{leg} at {start}+64K for {hold:?}",
                tokio::time::Instant::now()
            );
        }
        disks[leg].lock().unwrap().bad_ranges = vec![(start, start + (64 << 10))];
        let from = tokio::time::Instant::now();
        tokio::time::sleep(hold).await;
        disks[leg].lock().unwrap().bad_ranges.clear();
        outages.push(Outage {
            leg,
            kind: Fault::MediaErrors,
            from,
            to: tokio::time::Instant::now(),
            bad_bytes: Some((start, start + (64 << 10))),
        });
    }
}

const _: () = assert!(BLOCK == 4096);

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `seed` of `scenario` for 10 virtual seconds; it must hold
    /// every check.
    fn clean(scenario: Scenario, seed: u64) -> Report {
        let r = crate::world::run(scenario, seed, 10.0);
        assert!(
            r.violations.is_empty(),
            "{scenario} seed {seed}: {:?}",
            r.violations
        );
        r
    }

    /// Runs `seed` of `scenario` with `sabotage`: some violation must
    /// start with `what`.
    fn caught(scenario: Scenario, seed: u64, sabotage: Sabotage, what: &str) {
        caught_without_all(scenario, seed, &[sabotage], what);
    }

    /// The same with every mechanism of `sabotage` switched off.
    fn caught_without_all(scenario: Scenario, seed: u64, sabotage: &[Sabotage], what: &str) {
        let r = crate::world::run_sabotaged(scenario, seed, 10.0, sabotage);
        let names: Vec<&str> = sabotage.iter().map(|s| s.name()).collect();
        assert!(
            r.violations.iter().any(|v| v.starts_with(what)),
            "{scenario} seed {seed} with {}: {:?}",
            names.join(","),
            r.violations
        );
    }

    /// 160046, 160117, 160268: a leg moving, and a copy of one of its
    /// regions waiting on a source (or target) that had gone quiet held
    /// up writes to the other legs' chunks in the region, until the
    /// engine held only what the copy writes.
    #[test]
    fn a_moving_stripe_leg_holds_up_no_other_legs_io() {
        for seed in [160_046, 160_117, 160_268] {
            let r = clean(Scenario::Stripe, seed);
            assert_eq!(r.migrations, 1, "stripe seed {seed}");
        }
    }

    /// 141285: a read and an overlapping write ran together; leg 1 took
    /// the write first and served the read from it, then left for a
    /// media error; leg 2, the last in sync, failed the write (its disk
    /// full), and later reads no longer saw what the first had. The
    /// volume now runs overlapping reads and writes in submission order.
    #[test]
    fn a_read_never_sees_a_write_that_then_fails() {
        clean(Scenario::MirrorErrors, 141_285);
    }

    /// 140584: a fault waiting its turn on leg 1 cut its power after
    /// the legs had settled, with writes it had acknowledged still in its
    /// cache; the disks were compared while its client's replay of them
    /// waited out a full disk. The legs are judged once every fault has
    /// healed.
    #[test]
    fn the_legs_are_judged_after_the_last_fault_heals() {
        clean(Scenario::MirrorErrors, 140_584);
    }

    /// A stripe keeps every read right through its legs' faults, and IO
    /// kept to the legs that are up goes on while one is down: each seed
    /// judges that at least for its lone first outage, on both other legs.
    /// Seed 0 also moves a leg to a fourth node.
    #[test]
    fn a_stripe_leg_down_holds_up_only_its_own_io() {
        for seed in [0, 1, 2] {
            let r = clean(Scenario::Stripe, seed);
            assert!(
                r.isolation_checks >= 2,
                "stripe seed {seed} judged {} outages",
                r.isolation_checks
            );
            assert_eq!(r.migrations, u64::from(seed == 0), "stripe seed {seed}");
        }
    }

    /// 191127, 191236: a write spanning both mirrors waited on the one
    /// cut off; a leg of the other moved, and the copy of the region
    /// waited for all of the write, holding that mirror's own writes for
    /// 1.8 and 1.5 s, until the engine waited only for the write's parts
    /// on what the copy writes.
    #[test]
    fn a_write_stuck_on_one_mirror_holds_up_no_copy_on_the_other() {
        for seed in [191_127, 191_236] {
            let r = clean(Scenario::StripedMirrors, seed);
            assert_eq!(r.migrations, 1, "striped-mirrors seed {seed}");
        }
    }

    /// A mirror with one leg unreachable for over 2.5 s (cut off,
    /// stalled, or down) gives it up and goes on: each of these seeds
    /// judges at least one such outage. With `no-leg-timeout` (the
    /// driver waiting a minute before giving a leg up), all four fail.
    #[test]
    fn a_mirror_with_one_leg_unreachable_goes_on_without_it() {
        for seed in [28, 61, 82, 85] {
            let r = clean(Scenario::StripedMirrors, seed);
            assert!(
                r.degraded_checks >= 1,
                "striped-mirrors seed {seed} judged no outage of one mirror leg"
            );
        }
    }

    /// A stripe over two mirrors keeps every read right while one whole
    /// mirror is down (each seed starts so), IO kept to the other mirror
    /// goes on meanwhile, and each mirror's legs converge after. Seed 0
    /// also moves a leg to a fifth node.
    #[test]
    fn a_whole_mirror_down_holds_up_only_its_own_chunks() {
        for seed in [0, 1, 2] {
            let r = clean(Scenario::StripedMirrors, seed);
            assert!(
                r.isolation_checks >= 2,
                "striped-mirrors seed {seed} judged {} outages",
                r.isolation_checks
            );
            assert_eq!(
                r.migrations,
                u64::from(seed == 0),
                "striped-mirrors seed {seed}"
            );
        }
    }

    /// A mirror followed by a smaller plain export (linear), the seam
    /// and both sizes off every chunk and region, bad blocks on the
    /// export: each group's IO goes on while the other's legs are down,
    /// and a leg of either moves to a fourth node (a mirror leg in seed
    /// 0, the plain export in 6).
    #[test]
    fn a_linear_volume_of_a_mirror_and_an_export_holds_every_check() {
        for seed in [0, 6] {
            let r = clean(Scenario::Linear, seed);
            assert!(r.isolation_checks >= 1, "linear seed {seed} judged none");
            assert_eq!(r.migrations, 1, "linear seed {seed}");
        }
    }

    /// The mirror in a linear volume goes on without a leg that is
    /// unreachable for over 2.5 s (each of these seeds takes one down
    /// alone first), and stops for it with `no-leg-timeout`.
    #[test]
    fn a_linear_volumes_mirror_goes_on_without_an_unreachable_leg() {
        for seed in [1, 2, 3] {
            let r = clean(Scenario::Linear, seed);
            assert_eq!(r.degraded_checks, 1, "linear seed {seed}");
            caught(Scenario::Linear, seed, Sabotage::NoLegTimeout, "degraded:");
        }
    }

    /// A mirror hides one leg's bad blocks while another leg is in sync
    /// (seeds 0, 4, 5 of `mirror-errors`: no media error reaches the
    /// user), and with `no-error-failover` they reach the user; in
    /// `linear` too (seed 5: its mirror's legs get bad blocks, and its
    /// export's reach the user rightly). And in seed 260249 they reach it
    /// rightly: leg0 was still being copied back 5 s after its faults
    /// when leg2, the copy's source and the last leg in sync, grew bad
    /// blocks; the judge first allowed a leg 5 s to be copied back, and
    /// blamed the volume.
    #[test]
    fn a_mirror_hides_one_legs_bad_blocks_while_another_is_in_sync() {
        for seed in [0, 4, 5] {
            let r = clean(Scenario::MirrorErrors, seed);
            assert!(r.faults.get(&Fault::MediaErrors) > Some(&0), "seed {seed}");
            assert_eq!(r.media_errors, 0, "mirror-errors seed {seed}");
            caught(
                Scenario::MirrorErrors,
                seed,
                Sabotage::NoErrorFailover,
                "masking:",
            );
        }
        clean(Scenario::Linear, 5);
        caught(Scenario::Linear, 5, Sabotage::NoErrorFailover, "masking:");
        let r = clean(Scenario::MirrorErrors, 260249);
        assert!(r.media_errors > 0, "seed 260249 no longer reaches the case");
    }

    /// A restart's own mechanisms, on the real driver: with the settling
    /// FLUSHes off (seed 643, the only one of the first 700 to catch it
    /// before the crash at the end) or with marks cleared before a FLUSH
    /// covered their writes (seed 7), what a power cut took from one
    /// leg's cache after the kill is never copied back, and the legs end
    /// up differing. With the crash at the end, what the run after it
    /// read of a dead run's cache goes back in time at the power cut
    /// that follows, unless it settled first: mirror seed 29, stripe
    /// seed 23 (of the first 200: 10 mirror seeds, 29 stripe seeds).
    #[test]
    fn a_restarted_volume_needs_its_settling_and_its_unflushed_marks() {
        for (seed, sabotage) in [(643, Sabotage::NoSettle), (7, Sabotage::NoUnflushedMarks)] {
            clean(Scenario::MirrorRestart, seed);
            caught(Scenario::MirrorRestart, seed, sabotage, "convergence:");
        }
        for (scenario, seed) in [(Scenario::MirrorRestart, 29), (Scenario::StripeRestart, 23)] {
            let r = clean(scenario, seed);
            assert_eq!(
                r.faults.get(&Fault::ClientCrash),
                Some(&2),
                "{scenario} {seed}"
            );
            caught(
                scenario,
                seed,
                Sabotage::NoSettle,
                "volume: read correctness:",
            );
        }
    }

    /// `migrate-restart` 109 and 166: the client dies mid-switch, the
    /// first stores of the new map failed, with the old leg (a mirror
    /// leg) cut off and its partner away: the old map holds some bytes
    /// only in the old leg's cache. With the old map's hold off, a FLUSH
    /// is answered without the old leg; it then loses power, the next
    /// boot opens the old map, and reads go back before that FLUSH. (Both
    /// fail with only the FLUSH's hold off, as swarm seed 6628 did in the
    /// engine; of the first 200 seeds, 3 then and 14 with both holds
    /// off.)
    #[test]
    fn a_client_killed_mid_switch_finds_every_flushed_write_on_the_old_map() {
        killed_mid_switch_and_caught(
            Scenario::MigrateRestart,
            &[109, 166],
            &[Sabotage::NoOldMapHold],
        );
    }

    /// Each of `seeds` is clean, kills the client mid-switch once and
    /// finishes its migration, and with `sabotage` reads older data after
    /// the restart.
    fn killed_mid_switch_and_caught(scenario: Scenario, seeds: &[u64], sabotage: &[Sabotage]) {
        for &seed in seeds {
            let r = clean(scenario, seed);
            assert_eq!(
                r.faults.get(&Fault::MidSwitchCrash),
                Some(&1),
                "seed {seed}"
            );
            assert_eq!(r.migrations, 1, "seed {seed}: moved again and switched");
            caught_without_all(scenario, seed, sabotage, "volume: read correctness:");
        }
    }

    /// `migrate-quorum` 2 and 210: a write at quorum one is acknowledged
    /// mid-switch on the new leg's word, while the store of the new map
    /// fails. With a leg of each map not required to vouch for it, the
    /// acknowledgement marks every lagging leg of the old map behind; the
    /// client dies before the store, and the next boot, on the old map,
    /// trusts a leg that never had the write (engine swarm seed 20548,
    /// here through the real driver: 9 of the first 400 seeds catch it,
    /// 2 the only one of the first 200 with the fix reverted by hand).
    /// Since session 65 a log store's anchor (`no-store-anchor`) holds
    /// such a write too, until a leg of the old map is stored clear, so
    /// only the two switched off together read older data (the same 9
    /// of 400; neither alone, in any).
    #[test]
    fn a_quorum_write_acknowledged_mid_switch_is_on_both_maps() {
        killed_mid_switch_and_caught(
            Scenario::MigrateQuorum,
            &[2, 210],
            &[Sabotage::NoBothMapsVouch, Sabotage::NoStoreAnchor],
        );
    }

    /// `migrate-quorum` 2208, 2330 and 2952: a quorum mirror's leg
    /// back in sync, its log clear only in memory, vouched for a quorum
    /// write the only leg stored clear lagged on, and one log store
    /// carried both. The client died in the middle of it; each leg kept
    /// its new log or its old one, and the mix said every leg was
    /// behind, so the restart trusted the first, which lacked writes.
    /// A leg's fall behind now waits for a store after the one that
    /// makes another clear (`no-store-anchor` switches that off). 2952
    /// is left out: with the fix its kill no longer lands in a store.
    #[test]
    fn a_torn_log_store_leaves_a_leg_clear_in_every_mix() {
        faulted_once_and_caught(
            Scenario::MigrateQuorum,
            &[2208, 2330],
            Fault::TornLogStore,
            Sabotage::NoStoreAnchor,
            "volume: read correctness:",
        );
    }

    /// 350079: the export moves, and bad blocks send it away while the
    /// switch waits for its map (the first store fails): writes to the
    /// export wait for the store, 604 ms, which the isolation check must
    /// not take for the export held up by the mirror's stalled leg.
    #[test]
    fn a_moving_leg_sent_away_mid_switch_holds_only_its_own_writes() {
        let r = clean(Scenario::Linear, 350_079);
        assert_eq!(r.migrations, 1);
    }

    /// A full disk under one leg is hidden the same way: its writes leave
    /// the leg behind while another is in sync. With `no-error-failover`
    /// the full disk reaches the user (seeds 1 and 2 of `mirror`).
    #[test]
    fn a_mirror_hides_one_legs_full_disk_while_another_is_in_sync() {
        for seed in [1, 2] {
            let r = clean(Scenario::Mirror, seed);
            assert!(r.faults.get(&Fault::DiskFull) > Some(&0), "seed {seed}");
            caught(
                Scenario::Mirror,
                seed,
                Sabotage::NoErrorFailover,
                "masking:",
            );
        }
    }

    /// And in every boot of a client that restarts: the first boot's
    /// refusals are judged against its own legs' history, though its
    /// workers die with it. With `no-error-failover`, seed 3 of
    /// `mirror-restart` hands a full disk to the user in the first boot
    /// (judging only the last boot missed it).
    #[test]
    fn a_restarting_clients_first_boot_is_judged_for_masking_too() {
        let r = clean(Scenario::MirrorRestart, 3);
        assert_eq!(r.faults.get(&Fault::ClientCrash), Some(&1));
        caught(
            Scenario::MirrorRestart,
            3,
            Sabotage::NoErrorFailover,
            "masking:",
        );
    }

    /// Seeds where legs diverged (or a read went back) while the driver
    /// handed each leg its IO from a task per request: two overlapping
    /// writes reached the legs in different orders (28, 67, 126, 147,
    /// 162). And 77: leg 0 lost power with an acknowledged write unflushed
    /// and came back with its disk full, so the client's replay was
    /// refused and dropped; a read then saw the older data.
    #[test]
    fn pinned_seeds_converge() {
        for seed in [28, 67, 77, 126, 147, 162] {
            let r = clean(Scenario::Mirror, seed);
            assert!(
                r.regions_resynced > 0,
                "mirror seed {seed} resynced nothing"
            );
        }
    }

    /// 201: a read saw a WriteZeroes in flight on one leg when the client
    /// was killed; the restart made the legs agree on the version from
    /// before it, which is allowed (the write was never acknowledged; md
    /// does the same) and which the checker now allows after a client
    /// restart. 4: the restarted client saw an empty status snapshot as
    /// "every leg in sync" and stopped before its resync. 90: leg 0 was
    /// cut off when the client died, with the dead client's writes to it
    /// in the network; they landed after the restart had resynced (now
    /// fenced). 103: a leg's disk filled under a write, the write was
    /// acknowledged from the other legs before the log said that leg was
    /// behind, the client died, and the restart trusted the leg and
    /// copied its older data over the write.
    #[test]
    fn pinned_restart_seeds_hold() {
        for seed in [4, 90, 103, 201] {
            clean(Scenario::MirrorRestart, seed);
        }
    }

    /// Seeds where the dead run's writes to one leg were held in the
    /// network until the new run had its session there: with fencing
    /// each holds, and with fencing switched off on the servers each
    /// ends with that leg holding older data than the others. Until the
    /// mirror scenarios applied server-side sabotage, switching fencing
    /// off here changed nothing.
    #[test]
    fn late_frames_of_a_dead_run_are_fenced_off() {
        // Re-pinned when the volume driver gained a task per leg (to
        // hear of a fence at once), which moved madsim's schedule: 62 and
        // 125 no longer fail without fencing, 98 and 149 do. And again
        // when overlapping reads and writes came to run in order (session
        // 52): 98 no longer fails without fencing, 62 and 132 do (and
        // 149 breaks a read before the legs can differ). And again when
        // a write came to wait for a mark whose store was under way
        // (session 57): 62 and 132 no longer fail without fencing; of
        // seeds 0-599, 66, 281, 308, 309, 431 and 495 do, with late frames.
        faulted_once_and_caught(
            Scenario::MirrorRestart,
            &[66, 281, 308],
            Fault::LateFrames,
            Sabotage::NoFencing,
            "convergence",
        );
    }

    /// Each of `seeds` is clean with `fault` drawn once, and with
    /// `sabotage` some violation starts with `what`.
    fn faulted_once_and_caught(
        scenario: Scenario,
        seeds: &[u64],
        fault: Fault,
        sabotage: Sabotage,
        what: &str,
    ) {
        for &seed in seeds {
            let r = clean(scenario, seed);
            assert_eq!(r.faults.get(&fault), Some(&1), "seed {seed}");
            caught(scenario, seed, sabotage, what);
        }
    }

    /// The pinned restart seeds keep the runs they were pinned for: none
    /// draws the crash at the end, nor the death in a log store.
    #[test]
    fn pinned_restart_seeds_do_not_crash_at_the_end_or_in_a_store() {
        for seed in [3, 4, 7, 34, 41, 66, 90, 103, 201, 281, 308, 643] {
            for draw in [END_CRASH_DRAW, TORN_STORE_DRAW] {
                let drawn = SplitMix64::new(seed ^ draw).chance(0.5);
                assert!(!drawn, "seed {seed}, draw {draw:#x}");
            }
        }
    }

    /// mirror-quorum 41: a FLUSH went out while a write submitted before
    /// it waited for a region being copied, so the FLUSH did not cover
    /// it; a power cut then lost that write on the leg the restart
    /// trusted. 34: a leg resynced before the crash kept a write the
    /// trusted leg lost to a power cut before the restarted client
    /// reached it; the source's marks were not copied to that leg.
    #[test]
    fn pinned_quorum_seeds_hold() {
        for seed in [34, 41] {
            clean(Scenario::MirrorQuorum, seed);
        }
    }

    /// The operator shuts the old server down for good the moment its
    /// leg retires. Before session 61 a FLUSH still out on it then
    /// waited on it for ever, and so did its worker: each of these
    /// seeds hung until madsim's time limit (18 of 240 runs of the four
    /// moving scenarios, seeds 490000-490059). The engine test
    /// `a_read_and_a_flush_sent_to_a_leg_before_its_migration_do_not_wait_on_it_once_it_retires`
    /// holds the read's half, which these runs do not reach.
    #[test]
    fn a_retired_legs_server_shut_down_for_good_holds_up_nothing() {
        for (scenario, seed) in [(Scenario::Migrate, 490014), (Scenario::Stripe, 490023)] {
            let r = clean(scenario, seed);
            assert_eq!(r.migrations, 1, "{scenario} seed {seed}");
            assert_eq!(
                r.faults.get(&Fault::RetiredLegGone),
                Some(&1),
                "{scenario} seed {seed}"
            );
        }
    }

    /// The client dies in the middle of a log store: each leg keeps its
    /// new log or its old one, and the driver never heard the store
    /// return. The restarted client must still read every write back.
    #[test]
    fn a_client_killed_in_the_middle_of_a_log_store_restarts_whole() {
        for seed in [1, 8] {
            let r = clean(Scenario::MirrorRestart, seed);
            assert_eq!(r.faults.get(&Fault::TornLogStore), Some(&1), "seed {seed}");
        }
    }

    /// 271: during the switch the new leg's disk filled and it left, then
    /// the other legs left trusting the leg being retired; retiring it
    /// left no leg in sync and the volume hung.
    #[test]
    fn pinned_migration_seed_finishes() {
        let seed = 271;
        let r = clean(Scenario::Migrate, seed);
        assert_eq!(r.migrations, 1, "migrate seed {seed}");
    }
}
