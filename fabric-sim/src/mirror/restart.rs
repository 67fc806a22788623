//! The client killed mid-run and restarted on its logs: a leg cut off as it
//! dies, its late frames, a torn log store, a death mid-switch, the end crash.

use super::client::{client_boot, BootSlot, ClientCtx, StoredMap};
use super::servers::LegServer;
use super::{MID_SWITCH_STORE_FAILS, POWER_CUT_HOLD, TORN_STORE_DRAW};
use crate::judge::Outage;
use braid_core::rng::SplitMix64;
use braid_core::testkit::Fault;
use madsim::net::NetSim;
use madsim::runtime::Handle;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What [`kill_and_restart`] did.
#[derive(Default)]
pub(super) struct Restarts {
    /// A leg was cut off as the client died.
    pub(super) cut: bool,
    /// The dead run's frames to it were held until the new run had its
    /// session there.
    pub(super) late: bool,
    /// The client died in the middle of a log store.
    pub(super) torn: bool,
    /// The client died while the migration switched over; whether the old
    /// leg was cut off then, and whether it lost power as the client died.
    pub(super) mid_switch: Option<(bool, bool)>,
    /// The legs the kill cut off, as the new run found them.
    pub(super) outage: Vec<Outage>,
    /// The client was killed again at the end, and this many legs lost
    /// power then.
    pub(super) end_power_cuts: Option<u64>,
}

/// Kills the client node once, mid-run, and boots the volume's next run
/// (on the same node, or in late seeds on a second one).
pub(super) fn kill_and_restart(
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
