//! The faults the legs take: crashes, power loss, partitions, stalls, slow
//! or full disks, bad blocks, and one group taken down alone first.

use super::servers::{DiskFlags, LegServer};
use crate::judge::{Outage, UNREACHABLE};
use crate::layout::Layout;
use crate::world::between_ms;
use braid_core::rng::SplitMix64;
use braid_core::testkit::{Fault, MemDisk, Scenario};
use madsim::net::NetSim;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which nodes grow bad blocks: every one in `mirror-errors` and
/// `migrate-errors` (the node a leg moves to aside), where the mirror
/// hides them. In `linear` the plain export, whose bad blocks fail
/// IO there as one disk's would, and the mirror's legs too in the seeds
/// that take none of them down alone first: in those a leg's bad blocks
/// would leave its partner's outage nothing for the degraded check to
/// judge.
pub(super) fn bad_blocks(scenario: Scenario, layout: Layout, seed: u64) -> Option<Vec<usize>> {
    let legs = 0..layout.legs();
    match scenario {
        Scenario::MirrorErrors | Scenario::MigrateErrors => Some(legs.collect()),
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

/// What a fault on one leg acts on.
#[derive(Clone)]
pub(super) struct LegTarget {
    pub(super) net: Arc<NetSim>,
    pub(super) server: LegServer,
    /// The node the client runs on now.
    pub(super) client: Arc<Mutex<madsim::task::NodeId>>,
    pub(super) flags: DiskFlags,
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
pub(super) async fn inject(
    targets: &[LegTarget],
    rng: &mut SplitMix64,
    lone_first: Option<(u64, Layout)>,
    end: tokio::time::Instant,
) -> (BTreeMap<Fault, u64>, Vec<Outage>) {
    let mut faults = BTreeMap::new();
    let outages: Arc<Mutex<Vec<Outage>>> = Arc::default();
    if let Some((seed, layout)) = lone_first {
        strike_alone_first(targets, &outages, &mut faults, seed, layout).await;
    }
    let mut pending = Vec::new();
    // Faults on different legs overlap; on one leg they take turns.
    loop {
        tokio::time::sleep(between_ms(rng, 200, 1500)).await;
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
        let hold = between_ms(rng, 100, 3000);
        // Faults overlap: each heals in its own task.
        pending.push(tokio::spawn(strike_leg(
            targets[i].clone(),
            outages.clone(),
            i,
            kind,
            hold,
        )));
    }
    for p in pending {
        let _ = p.await;
    }
    let outages = outages.lock().unwrap().clone();
    (faults, outages)
}

/// Strikes leg `i` (`target`) with `kind` once the faults before on it
/// have healed, heals it after `hold`, and records the outage.
async fn strike_leg(
    target: LegTarget,
    outages: Arc<Mutex<Vec<Outage>>>,
    i: usize,
    kind: Fault,
    hold: Duration,
) {
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

/// One group of legs taken down alone, all of its legs together, before
/// the mix starts (in half the seeds of a linear layout, one mirror leg
/// alone before that): each from a stream of its own.
async fn strike_alone_first(
    targets: &[LegTarget],
    outages: &Arc<Mutex<Vec<Outage>>>,
    faults: &mut BTreeMap<Fault, u64>,
    seed: u64,
    layout: Layout,
) {
    if let Some(mut solo) = lone_mirror_leg_first(seed, layout) {
        tokio::time::sleep(between_ms(&mut solo, 300, 800)).await;
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
        let hold = between_ms(&mut solo, 2700, 3500);
        strike_leg(targets[leg].clone(), outages.clone(), leg, kind, hold).await;
    }
    let mut lone = SplitMix64::new(seed ^ 0x0a1e_0e00);
    tokio::time::sleep(between_ms(&mut lone, 300, 800)).await;
    let i = lone.below(targets.len() as u64) as usize;
    let kind = UNREACHABLE[lone.below(4) as usize];
    // The node a leg moves to stands alone; the others, with the
    // rest of their group.
    let group = if i < layout.legs() {
        layout.groups[layout.group_of(i)]
    } else {
        std::slice::from_ref(&i)
    };
    let hold = between_ms(&mut lone, 1500, 2500);
    *faults.entry(kind).or_insert(0) += group.len() as u64;
    // A lone leg is struck in this task, as before groups existed,
    // so the stripe's pinned seeds keep their schedules.
    match group {
        [leg] => strike_leg(targets[*leg].clone(), outages.clone(), *leg, kind, hold).await,
        _ => {
            let together: Vec<_> = group
                .iter()
                .map(|&leg| {
                    let target = targets[leg].clone();
                    tokio::spawn(strike_leg(target, outages.clone(), leg, kind, hold))
                })
                .collect();
            for t in together {
                let _ = t.await;
            }
        }
    }
}

/// Bad blocks on one of `legs` at a time (64 KiB of its disk, at a
/// multiple of 64 KiB, for up to three seconds) until two seconds before
/// the end; returns when and where each was.
pub(super) async fn inject_media_errors(
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
