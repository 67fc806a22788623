//! The client killed mid-run and restarted on its logs: a leg cut off as it
//! dies, its late frames, a torn log store, a death mid-switch, the end crash.

use super::client::{client_boot, BootSlot, ClientCtx, StoredMap};
use super::servers::LegServer;
use super::{MID_SWITCH_STORE_FAILS, POWER_CUT_HOLD, TORN_STORE_DRAW};
use crate::judge::Outage;
use braid_core::rng::SplitMix64;
use braid_core::testkit::{Checker, Fault};
use madsim::net::NetSim;
use madsim::runtime::Handle;
use madsim::task::NodeId;
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
    client: NodeId,
    servers: &[NodeId],
    client_now: &Arc<Mutex<NodeId>>,
    ctx: &ClientCtx,
    boot_slot: BootSlot,
) -> tokio::task::JoinHandle<Restarts> {
    let seed = ctx.seed;
    let checkers = [ctx.checker.clone()]
        .into_iter()
        .chain(ctx.own_checkers.iter().cloned())
        .collect();
    // In half the seeds one leg is cut off as the client dies, with
    // its writes still in the network, and the cut heals after the
    // restarted client is running: the dead run's frames then arrive
    // late, which only fencing makes harmless (seed 90 found it).
    let mut cut_rng = SplitMix64::new(seed ^ 0x0f3e_ce00);
    let legs = ctx.layout.legs() as u64;
    // (A seed that dies mid-switch cuts off the old leg its own way.)
    let cut_leg =
        (cut_rng.below(2) == 0 && !ctx.mid_switch_crash).then(|| cut_rng.below(legs) as usize);
    // In half of those the dead run's frames are held until the new
    // run has its session on that leg. madsim holds a link between
    // two nodes, where a real network holds one connection's segments
    // and lets a new connection's through; so the new run starts on a
    // second client node, and only the dead run's link stays cut.
    let mut late_rng = SplitMix64::new(seed ^ 0x1a7e_f4a3);
    let late = cut_leg.is_some() && late_rng.below(2) == 0;
    // In half the seeds the client dies in the middle of storing its
    // legs' logs (the first store after the drawn moment). Only copies
    // keep logs: a stripe of single legs stores none.
    let mirrored = ctx.layout.groups.iter().any(|g| g.len() > 1);
    let tear =
        mirrored && !ctx.mid_switch_crash && SplitMix64::new(seed ^ TORN_STORE_DRAW).chance(0.5);
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
    let death = Death {
        handle: handle.clone(),
        client,
        ctx: ctx.clone(),
        boot_slot,
        client_now: client_now.clone(),
        checkers,
        rng: SplitMix64::new(seed ^ 0x00c1_1e47),
        cut_rng,
        late_rng,
        cut: cut_leg.map(|leg| (leg, servers[leg])),
        late,
        tear,
        mid_switch,
    };
    tokio::spawn(death.run())
}

/// How the client dies mid-run and comes back: drawn before the run
/// starts, each choice from a stream of its own.
struct Death {
    handle: Handle,
    /// The client's first node.
    client: NodeId,
    ctx: ClientCtx,
    boot_slot: BootSlot,
    /// The node the client runs on now.
    client_now: Arc<Mutex<NodeId>>,
    /// Every checker of the workload: writes not yet flushed may go back
    /// once the client dies.
    checkers: Vec<Arc<Mutex<Checker>>>,
    rng: SplitMix64,
    cut_rng: SplitMix64,
    late_rng: SplitMix64,
    /// The leg cut off as the client dies, and its server.
    cut: Option<(usize, NodeId)>,
    /// The dead run's frames to that leg are held until the new run has
    /// its session there.
    late: bool,
    /// The client dies in the middle of a log store.
    tear: bool,
    /// The client dies mid-switch, if it is to and the switch comes.
    mid_switch: Option<MidSwitch>,
}

impl Death {
    async fn run(mut self) -> Restarts {
        let net = NetSim::current();
        self.wait_to_kill(&net).await;
        let (torn, cut_from) = self.kill(&net).await;
        let mut outage = self.boot_again(&net, cut_from).await;
        if let Some(m) = self.mid_switch.as_mut() {
            outage.extend(m.heal(&net).await);
        }
        let end_power_cuts = if self.ctx.end_crash {
            Some(self.end_crash().await)
        } else {
            None
        };
        Restarts {
            cut: self.cut.is_some(),
            late: self.late,
            torn,
            mid_switch: self
                .mid_switch
                .map(|m| (m.cut_from.is_some(), m.power_cut.is_some())),
            outage,
            end_power_cuts,
        }
    }

    /// Until the moment drawn, or for a client to die mid-switch, until
    /// the switch (from here on it has a [`MidSwitch`] only then).
    async fn wait_to_kill(&mut self, net: &NetSim) {
        let span = self.ctx.run_for.as_millis() as u64 - 4000;
        let draw = self.rng.below(span);
        // Late seeds kill the client in the run's last few seconds, so
        // what the held writes put back has had the new run's writes
        // before it and has few after it to hide it (400 seeds with
        // fencing off: 3 of 106 late seeds failed when killed in the
        // first 2.5 s, 10 when in the last 4.5-3 s, 8 in the last
        // 3.5-2.5 s). madsim retries a held frame at doubling
        // intervals, so they land within about twice as long as they
        // were held, while the run still checks.
        let kill_at = if self.late {
            span.saturating_sub(500) + draw % 1500
        } else {
            1500 + draw
        };
        self.mid_switch = match self.mid_switch.take() {
            Some(mut m) => m
                .wait_for_the_switch(net, self.ctx.run_for)
                .await
                .then_some(m),
            None => {
                tokio::time::sleep(Duration::from_millis(kill_at)).await;
                None
            }
        };
        if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
            eprintln!(
                "{:?} client kill -9 (cut off: {:?}, frames held until the next run: {})",
                tokio::time::Instant::now(),
                self.cut.map(|(_, server)| server),
                self.late
            );
        }
    }

    /// Cuts the leg off, kills the client (in the middle of a log store
    /// if it is to tear one), and cuts the old leg's power in a seed
    /// dying mid-switch: whether a store was torn, and since when the
    /// leg is cut off (a late seed's link does not count: the new run
    /// reaches it).
    async fn kill(&mut self, net: &NetSim) -> (bool, Option<tokio::time::Instant>) {
        let mut cut_from = None;
        if let Some((_, server)) = self.cut {
            // A little before the kill, so frames sent meanwhile are
            // held in the network (those sent earlier arrive anyway).
            // The node, not the link: a partition fault on the same
            // link would otherwise heal it early. Late seeds hold the
            // dead run's link only (a partition fault there may heal
            // it early: that seed then tests less).
            if self.late {
                net.clog_link(self.client, server);
                net.clog_link(server, self.client);
            } else {
                net.clog_node(server);
                cut_from = Some(tokio::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20 + self.cut_rng.below(400))).await;
        }
        let mut torn = false;
        if self.tear {
            let logs = &self.ctx.logs;
            logs.tear_next_store(self.client, SplitMix64::new(self.ctx.seed ^ 0x0054_4541));
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
            self.handle.kill(self.client);
        }
        for checker in &self.checkers {
            checker.lock().unwrap().unflushed_may_revert();
        }
        if let Some(m) = self.mid_switch.as_mut() {
            m.maybe_cut_power().await;
        }
        (torn, cut_from)
    }

    /// Boots the next run, and heals the cut once it runs: the leg's
    /// outage, for the judges (the new run is judged as any run is).
    async fn boot_again(
        &mut self,
        net: &NetSim,
        cut_from: Option<tokio::time::Instant>,
    ) -> Vec<Outage> {
        tokio::time::sleep(Duration::from_millis(100 + self.rng.below(900))).await;
        if self.late {
            let again = self
                .handle
                .create_node()
                .name("client-again")
                .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 101)))
                .init(client_boot(self.boot_slot.clone()))
                .build();
            *self.client_now.lock().unwrap() = again.id();
        } else {
            self.handle.restart(self.client);
        }
        match self.cut {
            Some((_, server)) if self.late => {
                // The new run connects to every leg at once; its
                // session there ends the dead run's before these
                // frames arrive.
                let hold = 500 + self.late_rng.below(1500);
                tokio::time::sleep(Duration::from_millis(hold)).await;
                net.unclog_link(self.client, server);
                net.unclog_link(server, self.client);
            }
            Some((_, server)) => {
                // The restarted client attaches without the leg
                // meanwhile (as `braid attach` does) and resyncs it on
                // return. The held frames land on their next retry
                // (madsim doubles the interval); with fencing off some
                // of these seeds fail too (46, 154 and 174 of the first
                // 200), but the late seeds are the ones made for it.
                let hold = 1000 + self.cut_rng.below(3000);
                tokio::time::sleep(Duration::from_millis(hold)).await;
                net.unclog_node(server);
            }
            None => {}
        }
        self.cut
            .zip(cut_from)
            .map(|((leg, _), from)| Outage {
                leg,
                kind: Fault::Partition,
                from,
                to: tokio::time::Instant::now(),
                bad_bytes: None,
            })
            .into_iter()
            .collect()
    }

    /// Once the workers have stopped and every fault has healed, kills
    /// the client again, its last writes unflushed, with each leg losing
    /// power at even odds (a cache the dead run left is lost or kept
    /// whole), and boots the run that reads everything back: how many
    /// legs lost power.
    async fn end_crash(&mut self) -> u64 {
        let ctx = &self.ctx;
        while !ctx.workers_stopped.load(Ordering::SeqCst)
            || !ctx.strikes_over.load(Ordering::SeqCst)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let node = *self.client_now.lock().unwrap();
        self.handle.kill(node);
        for checker in &self.checkers {
            checker.lock().unwrap().unflushed_may_revert();
        }
        let mut power_rng = SplitMix64::new(ctx.seed ^ 0x0e4d_c0a7);
        let mut cuts = 0;
        for leg in &ctx.leg_servers {
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
        tokio::time::sleep(Duration::from_millis(100 + self.rng.below(900))).await;
        self.handle.restart(node);
        cuts
    }
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
