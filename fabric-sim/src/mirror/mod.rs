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
//! the last one stored ([`client::StoredMap`]), and in half the seeds the client
//! dies mid-switch ([`restart::MidSwitch`]).
//! The layouts are in `layout.rs`; what is judged once a run is over
//! (besides each read), in `judge.rs`. Here, a run is put together;
//! the leg servers are in `servers.rs`, the faults on them in
//! `faults.rs`, the client node's boots in `client.rs` and its deaths
//! in `restart.rs`.

mod client;
mod faults;
mod restart;
mod servers;
#[cfg(test)]
mod tests;

use crate::judge::{degraded, divergence, isolation, masking, Outage};
use crate::layout::{Layout, Zones};
use crate::logs::MemLogs;
use crate::workload::BLOCK;
use crate::world::Report;
use braid_core::auth::Key;
use braid_core::rng::SplitMix64;
use braid_core::testkit::{Fault, MemDisk, Sabotage, Scenario};
use client::{client_body, client_boot, BootSlot, ClientCtx, ClientEnd, ClientResult};
use faults::{bad_blocks, inject, inject_media_errors, LegTarget};
use madsim::net::NetSim;
use madsim::runtime::Handle;
use restart::{kill_and_restart, Restarts};
use servers::start_servers;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Seeds the stream that decides each `migrate-quorum` (and
/// `migrate-errors`) seed's quorum.
const QUORUM_DRAW: u64 = 0x5155_4f52_554d;

/// How many stores of the new map fail in a seed that kills the client
/// mid-switch: the driver tries again each second, so the switch stays
/// open for as many seconds (the old leg, cut off in it, must time out
/// first).
const MID_SWITCH_STORE_FAILS: u64 = 4;

/// How long a server the end crash cuts power to stays down.
const POWER_CUT_HOLD: Duration = Duration::from_millis(50);

/// One run of a volume scenario from `seed`: the leg servers, the client
/// (killed and booted again where the scenario restarts it), the faults,
/// and the judges' verdicts.
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
    let (migration, mid_switch_crash) = draw_migration(scenario, seed, layout, run_for, &mut rng);
    // The migration's target is one more server node, of its leg's size.
    let sizes: Vec<u64> = (0..layout.legs())
        .chain(migration.map(|(_, from, _)| from))
        .map(|leg| layout.leg_size(leg))
        .collect();
    let (leg_servers, disk_flags) = start_servers(&handle, seed, &key, &sabotage, engines, &sizes);
    let disks: Vec<_> = leg_servers.iter().map(|l| l.disk.clone()).collect();
    let servers: Vec<_> = leg_servers.iter().map(|l| l.node).collect();
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
        quorum: quorum_of(scenario, seed),
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
    let targets: Vec<LegTarget> = (0..disks.len())
        .map(|i| LegTarget {
            net: NetSim::current(),
            server: leg_servers[i].clone(),
            client: client_now.clone(),
            flags: disk_flags[i].clone(),
        })
        .collect();
    let (faults, mut outages) = strike_legs(&targets, &mut rng, seed, layout, bad, run_for).await;
    ctx.strikes_over.store(true, Ordering::SeqCst);
    let mut report = Report {
        faults,
        ..Report::empty(seed, scenario)
    };
    if let Some(r) = restarter {
        let restarts = r.await.unwrap_or_default();
        report.count_restarts(&restarts);
        outages.extend(restarts.outage);
    }
    ctx.faults_over.store(true, Ordering::SeqCst);
    let result = client_result(work, &done).await;
    if leg_servers.iter().any(|l| l.gone.load(Ordering::SeqCst)) {
        report.faults.insert(Fault::RetiredLegGone, 1);
    }
    let cuts = ctx.end_power_cuts.load(Ordering::SeqCst);
    if cuts > 0 {
        *report.faults.entry(Fault::PowerLoss).or_insert(0) += cuts;
    }
    let moved_from = ctx.moved_from();
    report.judge_client(result, &ctx, &disks, moved_from, &outages, restart);
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

/// The mirror's write quorum in `scenario` (`None`: every live leg).
fn quorum_of(scenario: Scenario, seed: u64) -> Option<usize> {
    match scenario {
        Scenario::MirrorQuorum => Some(2),
        // A quorum of one lets a write be acknowledged on the moving
        // leg's word or the new one's alone (engine swarm seed 20548), a
        // quorum of two on one leg of each.
        Scenario::MigrateQuorum | Scenario::MigrateErrors => {
            Some(1 + usize::from(SplitMix64::new(seed ^ QUORUM_DRAW).chance(0.5)))
        }
        _ => None,
    }
}

/// The faults on the legs for `run_for`, drawn from `rng` (and bad
/// blocks on the legs `bad` names, if any, from a stream of their own):
/// how many of each kind struck, and when each leg was out.
async fn strike_legs(
    targets: &[LegTarget],
    rng: &mut SplitMix64,
    seed: u64,
    layout: Layout,
    bad: Option<Vec<usize>>,
    run_for: Duration,
) -> (BTreeMap<Fault, u64>, Vec<Outage>) {
    // Bad blocks come from their own stream, so the other faults of a
    // seed stay as they are in `mirror`.
    let media = bad.map(|legs| {
        let disks = targets.iter().map(|t| t.server.disk.clone()).collect();
        tokio::spawn(inject_media_errors(seed, disks, legs, run_for))
    });
    let started = tokio::time::Instant::now();
    let (mut faults, mut outages) = inject(
        targets,
        rng,
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
    (faults, outages)
}

/// Whether a leg moves, drawn from `seed`'s stream `rng` and streams of
/// its own: when, from which leg, and how many of the first stores of
/// the new map fail; and whether the client dies mid-switch.
fn draw_migration(
    scenario: Scenario,
    seed: u64,
    layout: Layout,
    run_for: Duration,
    rng: &mut SplitMix64,
) -> (Option<(Duration, usize, u64)>, bool) {
    let restart = scenario.restarts_its_client();
    // Half the seeds of several groups move a leg too (their own stream
    // decides). Of the scenarios whose client restarts only
    // `migrate-restart` does, so that the others keep their pinned seeds.
    let restarts_moving = matches!(
        scenario,
        Scenario::MigrateRestart | Scenario::MigrateQuorum | Scenario::MigrateErrors
    );
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
    (migration, mid_switch_crash)
}

/// What the client reported: from its task (`work`), or from the last
/// boot of a client that restarts (`done`).
async fn client_result(
    work: Option<tokio::task::JoinHandle<ClientResult>>,
    done: &Mutex<Option<ClientResult>>,
) -> Result<ClientResult, String> {
    match work {
        Some(work) => work.await.map_err(|e| e.to_string()),
        None => loop {
            if let Some(r) = done.lock().unwrap().take() {
                break Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        },
    }
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

    /// Counts the faults the client's deaths brought.
    fn count_restarts(&mut self, restarts: &Restarts) {
        let mut count = |fault, n| *self.faults.entry(fault).or_insert(0) += n;
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

    /// Bad blocks and full disks reach the user only where no copy in
    /// sync could have served, in every boot of the client.
    fn judge_refusals(&mut self, ctx: &ClientCtx, outages: &[Outage], moved_from: Option<usize>) {
        let layout = ctx.layout;
        for seen in ctx.boots_seen.lock().unwrap().iter_mut() {
            match seen.history(layout.legs()) {
                Ok(history) => {
                    let refused = seen.refused.lock().unwrap();
                    let judged = masking(outages, &refused, layout, moved_from, &history);
                    self.violations.extend(judged.violations);
                }
                Err(e) => self.violations.push(format!("client: {e}")),
            }
        }
    }

    /// Judges what the client reported and the legs it left: the
    /// checkers' verdicts, each boot's refusals, the legs' bytes, the IOs
    /// done and the longest.
    fn judge_client(
        &mut self,
        result: Result<ClientResult, String>,
        ctx: &ClientCtx,
        disks: &[Arc<Mutex<MemDisk>>],
        moved_from: Option<usize>,
        outages: &[Outage],
        restarted: bool,
    ) {
        let layout = ctx.layout;
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let retired = self.add_volume_client(result, layout, moved_from, &mut hash, outages);
        self.judge_refusals(ctx, outages, moved_from);
        // Every mirror's legs that the volume ends with hold the same bytes.
        self.violations
            .extend(divergence(disks, layout, moved_from, &retired));
        if restarted {
            // The first boot's workers died with it: count what the checkers
            // saw complete instead.
            let outstanding: usize = [&ctx.checker]
                .into_iter()
                .chain(&ctx.own_checkers)
                .map(|c| c.lock().unwrap().outstanding())
                .sum();
            self.ios = ctx.next_io.load(Ordering::SeqCst) - 1 - outstanding as u64;
        }
        self.trace_hash = hash ^ self.ios;
        if self.longest_io > crate::world::STALL_LIMIT {
            self.violations.push(format!(
                "liveness: an IO took {:?} of virtual time",
                self.longest_io
            ));
        }
        if self.ios == 0 {
            self.violations.push("liveness: no IO completed".into());
        }
    }
}

const _: () = assert!(BLOCK == 4096);
