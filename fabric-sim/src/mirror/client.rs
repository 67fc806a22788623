//! The client node on each boot: a client per leg, the volume driver over
//! them, the workers, a migration, and the wait for every leg to settle.

use super::servers::{server_ip, LegServer};
use super::{PORT, POWER_CUT_HOLD, WORKERS};
use crate::judge::{LegHistory, Window};
use crate::layout::{Layout, Zones};
use crate::logs::MemLogs;
use crate::workload::{shared_worker, Failed, Outcome, SharedPlan};
use braid_core::auth::Key;
use braid_core::client::ClientConfig;
use braid_core::rng::SplitMix64;
use braid_core::testkit::Sabotage;
use braid_core::volume::{LegInfo, LegState, VolumeConfig, VolumeMap};
use braid_fabric_tcp::{Client, ClientSecurity, Volume};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the client node needs, on each boot.
#[derive(Clone)]
pub(super) struct ClientCtx {
    pub(super) seed: u64,
    pub(super) key: Key,
    /// Which legs hold which chunks.
    pub(super) layout: Layout,
    /// The checkers of the striped volume's workers that each keep to
    /// one group of legs (none for a mirror).
    pub(super) own_checkers: Vec<Arc<Mutex<braid_core::testkit::Checker>>>,
    /// The mirror's write quorum (`None`: every live leg).
    pub(super) quorum: Option<usize>,
    pub(super) sabotage: Vec<Sabotage>,
    /// When a leg moves, which, and how many stores of the new map fail.
    pub(super) migration: Option<(Duration, usize, u64)>,
    /// The migrated leg's server, to shut down for good once it retired.
    pub(super) decommission: Option<LegServer>,
    /// The restarted client is killed again as its workers stop, with
    /// writes left unflushed; the run after it reads everything back
    /// across power cuts (see [`read_back_across_power_cuts`]).
    pub(super) end_crash: bool,
    /// Set by the boot that is to be killed so, once its workers stopped.
    pub(super) workers_stopped: Arc<AtomicBool>,
    /// Each leg's server, for the end crash's power cuts.
    pub(super) leg_servers: Vec<LegServer>,
    /// Power cuts the last boot made between its read-backs.
    pub(super) end_power_cuts: Arc<AtomicU64>,
    pub(super) checker: Arc<Mutex<braid_core::testkit::Checker>>,
    pub(super) next_io: Arc<AtomicU64>,
    /// The dirty logs, outside the node: they outlast its restarts.
    pub(super) logs: Arc<MemLogs>,
    /// Which map a boot opens, outside the node likewise.
    pub(super) map: Arc<StoredMap>,
    /// Kill the client while the migration switches over.
    pub(super) mid_switch_crash: bool,
    /// Times the node started.
    pub(super) boots: Arc<AtomicU64>,
    pub(super) run_for: Duration,
    /// When the workers stop, if fixed before the client starts.
    pub(super) until: Option<tokio::time::Instant>,
    /// Set once every fault has healed. Faults waiting their turn on a
    /// leg can strike after the workers stop: the legs are judged only
    /// after they have come back in sync from the last of them (seed
    /// 140584 of `mirror-errors` lost a leg's cache to power after the
    /// legs had settled, and was compared mid-repair).
    pub(super) faults_over: Arc<AtomicBool>,
    /// Set once every fault on the legs has healed (the client's restarts
    /// aside): the end crash's power cuts wait for it, so no fault still
    /// holding a server down brings it back under them.
    pub(super) strikes_over: Arc<AtomicBool>,
    /// What each boot's volume did, kept outside the node: a boot the
    /// restart kills is judged too.
    pub(super) boots_seen: Arc<Mutex<Vec<BootSeen>>>,
}

impl ClientCtx {
    /// The leg that moves to node `layout.legs()`, if one does.
    pub(super) fn moved_from(&self) -> Option<usize> {
        self.migration.map(|(_, from, _)| from)
    }
}

/// The volume's map as `braid attach` keeps it in its volume file: the
/// layout's, or once a migration's switch is stored, with the new leg in
/// the old one's place. Outside the client node: it outlasts restarts.
#[derive(Default)]
pub(super) struct StoredMap {
    pub(super) switched: AtomicBool,
    /// Told each time a store of the new map fails.
    pub(super) store_failed: tokio::sync::Notify,
}

/// One boot of the client: its volume's leg changes as they are told
/// (read once the run is over), and the IOs it refused.
pub(super) struct BootSeen {
    legs: tokio::sync::mpsc::UnboundedReceiver<braid_fabric_tcp::LegChange>,
    pub(super) refused: Arc<Mutex<Vec<Failed>>>,
}

impl BootSeen {
    /// Its legs' states at the start and each change, by leg number
    /// (the volume names leg `n` "legn").
    pub(super) fn history(&mut self, legs: usize) -> Result<LegHistory, String> {
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
pub(super) struct ClientEnd {
    /// The shared workers' outcomes, then the checkers'.
    pub(super) outcomes: Vec<Outcome>,
    /// A volume of several groups: the outcomes of the workers of a
    /// group's own zone, each with its group.
    pub(super) own: Vec<(usize, Outcome)>,
    pub(super) stats: braid_core::volume::VolumeStats,
    /// The legs retired, by node.
    pub(super) retired: Vec<usize>,
    /// Its last boot opened a map a boot before had switched.
    pub(super) opened_switched: bool,
    /// When its workers ran.
    pub(super) window: Window,
}

pub(super) type ClientResult = Result<ClientEnd, String>;

/// The client node's task on each boot: [`client_body`], its result left
/// where `slot` says.
pub(super) fn client_boot(
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
pub(super) type BootSlot = Arc<Mutex<Option<(ClientCtx, Arc<Mutex<Option<ClientResult>>>)>>>;

/// The client node: a client per leg, the volume driver over them (its
/// logs from before a restart), the workers until `until`, then the wait
/// for every leg to be back in sync.
pub(super) async fn client_body(ctx: ClientCtx) -> ClientResult {
    // A restarted client is a new process: new client nonces.
    let boot = ctx.boots.fetch_add(1, Ordering::SeqCst);
    trace_stored_logs(&ctx.logs, boot);
    let run = braid_fabric_tcp::next_run(&*ctx.logs, ctx.seed | 1).map_err(|e| e.to_string())?;
    let layout = ctx.layout;
    // The map this boot opens: the new leg in the old one's place once a
    // boot before stored the switch.
    let switched = ctx.map.switched.load(Ordering::SeqCst);
    let moved_from = ctx.moved_from();
    let (volume, leg_clients) = open_volume(&ctx, run, boot, switched).await?;
    let refused: Arc<Mutex<Vec<Failed>>> = Arc::default();
    ctx.boots_seen.lock().unwrap().push(BootSeen {
        legs: volume.watch_legs(),
        refused: refused.clone(),
    });
    let mover = (!switched)
        .then(|| start_migration(&ctx, &volume, run, boot))
        .flatten();
    decommission_once_retired(&ctx, &volume);
    let zones = Zones::of(ctx.layout);
    // Fixed from the start when the client restarts; else from now.
    let until = ctx
        .until
        .unwrap_or_else(|| tokio::time::Instant::now() + ctx.run_for);
    let workers_from = tokio::time::Instant::now();
    let (mut outcomes, own) = run_workers(&ctx, &volume, &zones, until, refused).await?;
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

/// The volume this boot opens, over a client per leg (`switched`: a
/// boot before stored the migration's switch), and those clients.
async fn open_volume(
    ctx: &ClientCtx,
    run: braid_core::client::Identity,
    boot: u64,
    switched: bool,
) -> Result<(Volume, HashMap<String, Client>), String> {
    let layout = ctx.layout;
    let moved_from = ctx.moved_from();
    let node_of = |leg: usize| match moved_from {
        Some(from) if switched && leg == from => layout.legs(),
        _ => leg,
    };
    let legs = connect_legs(ctx, run, boot, node_of).await?;
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
    Ok((volume, leg_clients))
}

/// A boot that opens the old map moves the leg (again, if a boot before
/// died before its switch was stored: an operator would run the
/// migration again), later boots soon after they start.
fn start_migration(
    ctx: &ClientCtx,
    volume: &Volume,
    run: braid_core::client::Identity,
    boot: u64,
) -> Option<tokio::task::JoinHandle<Result<(), String>>> {
    ctx.migration.map(|plan| {
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
    })
}

/// In the seeds that decommission it, the moved leg's server is shut
/// down for good the moment the volume retires that leg.
fn decommission_once_retired(ctx: &ClientCtx, volume: &Volume) {
    let (Some(old_server), Some((_, from, _))) = (ctx.decommission.clone(), ctx.migration) else {
        return;
    };
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

/// The workers until `until`: the shared ones over the whole volume, and
/// one per group of legs over that group's own zone; their outcomes, the
/// own zones' with their group.
async fn run_workers(
    ctx: &ClientCtx,
    volume: &Volume,
    zones: &Zones,
    until: tokio::time::Instant,
    refused: Arc<Mutex<Vec<Failed>>>,
) -> Result<(Vec<Outcome>, Vec<(usize, Outcome)>), String> {
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
    Ok((outcomes, own))
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
pub(super) async fn read_back_across_power_cuts(
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
