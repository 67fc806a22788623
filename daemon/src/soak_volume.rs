//! `braid soak --volume mirror3` (or `mirror2`, `stripe`,
//! `striped-mirrors`, `linear`): real `braid serve` processes behind
//! fault proxies, a volume over them driven in this process exactly as
//! `braid attach --volume` drives it, and the verifier on the volume
//! throughout. First, where legs have copies, one leg's server is killed
//! for ten seconds under load and its resync timed; then servers are
//! killed (one at a time) and restarted, channels black-holed, reset and
//! stalled, while one leg migrates live to a spare server. At the end each
//! mirror's legs the volume ends with must hold the same bytes, and where
//! every leg has a copy the IOPS of one export, a 2-way and a 3-way mirror
//! are measured in the same run.

use crate::soak::ProxiedServer;
use crate::verify::{self, Progress};
use braid_core::rng::SplitMix64;
use braid_core::volume::{LegInfo, LegState, VolumeConfig, VolumeMap, VolumeSpec};
use braid_fabric_tcp::{Client, Volume};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The volume the soak builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum VolumeShape {
    /// Two legs, each a full copy.
    Mirror2,
    /// Three legs, each a full copy.
    Mirror3,
    /// Three legs, 64 KiB chunks dealt round-robin (no copy: a leg's
    /// server down means its IO waits).
    Stripe,
    /// 64 KiB chunks dealt over two mirrors of two legs each (RAID 10).
    StripedMirrors,
    /// A mirror of two legs followed by a third, smaller leg; the seam
    /// falls inside one of the verifier's blocks.
    Linear,
}

impl VolumeShape {
    /// As given to `--volume`.
    pub(crate) fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// The legs in groups that hold the same bytes: one mirror, or what
    /// the stripe deals its chunks over.
    fn groups(self) -> &'static [&'static [usize]] {
        match self {
            VolumeShape::Mirror2 => &[&[0, 1]],
            VolumeShape::Mirror3 => &[&[0, 1, 2]],
            VolumeShape::Stripe => &[&[0], &[1], &[2]],
            VolumeShape::StripedMirrors => &[&[0, 1], &[2, 3]],
            VolumeShape::Linear => &[&[0, 1], &[2]],
        }
    }

    /// Leg `leg`'s export (the spare's is leg0's, which moves to it).
    /// Linear legs are small, so the verifier's 32 MiB reach the second.
    fn leg_size(self, leg: usize) -> u64 {
        match (self, leg) {
            (VolumeShape::Linear, 2) => 13 << 20,
            (VolumeShape::Linear, _) => (20 << 20) + (2 << 10),
            _ => crate::soak::EXPORT_SIZE,
        }
    }

    fn legs(self) -> usize {
        self.groups().iter().map(|g| g.len()).sum()
    }

    fn mirrored(self) -> bool {
        self.groups().iter().any(|g| g.len() > 1)
    }

    /// Every leg has a copy: the cost rows can build mirrors over the
    /// legs it ends with (all of one size).
    fn all_mirrored(self) -> bool {
        self.groups().iter().all(|g| g.len() > 1)
    }

    fn spec(self, legs: &[String]) -> VolumeSpec {
        let chunk = (self != VolumeShape::Linear).then_some(64 << 10);
        VolumeSpec::grouped(self.groups(), chunk, None, |i| legs[i].clone())
    }
}

/// How long a leg's server may be unreachable before IO goes on without it.
const LEG_TIMEOUT: Duration = Duration::from_secs(1);
/// The absence whose resync is timed.
const AWAY: Duration = Duration::from_secs(10);
/// Seconds of load per row of the IOPS comparison.
const COST_SECS: f64 = 5.0;
/// 4 KiB blocks the verifier exercises (32 MiB).
const BLOCKS: u64 = 8192;

/// Server `i`'s data dir under `root`, with its server (exporting
/// `size` bytes) and proxy.
async fn start_node(
    root: &Path,
    i: usize,
    engines: u16,
    size: u64,
) -> Result<ProxiedServer, String> {
    let dir = root.join(format!("server{i}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    ProxiedServer::start(dir, engines, size).await
}

/// A leg's client: two channels through its proxy.
const LEG_CHANNELS: usize = 2;

fn leg_name(i: usize) -> String {
    format!("leg{i}")
}

/// A volume over `clients` (named `leg0`...), logs in `root`.
fn start_volume(
    shape: VolumeShape,
    clients: Vec<(String, Client)>,
    root: &Path,
    name: &str,
) -> Result<Volume, String> {
    let names: Vec<String> = clients.iter().map(|c| c.0.clone()).collect();
    let infos: HashMap<String, LegInfo> = clients
        .iter()
        .map(|(n, c)| {
            let i = c.info();
            let info = LegInfo {
                size: i.size,
                block_size: i.block_size,
                read_only: false,
            };
            (n.clone(), info)
        })
        .collect();
    let max_payload = clients
        .iter()
        .map(|(_, c)| c.info().max_payload)
        .min()
        .unwrap_or(1 << 20);
    let map = VolumeMap::new(&shape.spec(&names), |n| infos.get(n).copied())
        .map_err(|e| e.to_string())?;
    let config = VolumeConfig {
        max_leg_io: u64::from(max_payload),
        ..VolumeConfig::default()
    };
    let store = Arc::new(crate::volume::FileLogStore {
        dir: root.to_path_buf(),
        volume: name.to_string(),
    });
    Volume::start(
        map,
        clients.into_iter().collect(),
        config,
        store,
        LEG_TIMEOUT,
    )
}

fn leg_state(volume: &Volume, leg: &str) -> Option<LegState> {
    volume
        .status()
        .legs
        .iter()
        .rev()
        .find(|l| l.0 == leg)
        .and_then(|l| l.1)
}

/// Waits until every leg is in sync (or retired) and no migration runs.
async fn settled(volume: &Volume, patience: Duration) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    loop {
        let s = volume.status();
        let synced = s
            .legs
            .iter()
            .all(|l| matches!(l.1, Some(LegState::InSync | LegState::Retired)));
        if synced && s.migration.is_none() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "legs not back in sync after {patience:?}: {:?}, migration {:?}",
                s.legs, s.migration
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// IOs per second of the verifier on `device` over `secs`.
async fn iops(device: impl verify::BlockDevice, secs: f64) -> (f64, u64) {
    let progress = Arc::new(Progress::default());
    let task = tokio::spawn(verify::workload(device, BLOCKS, 16, progress.clone()));
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    progress.stop.store(true, Ordering::Relaxed);
    let _ = task.await;
    let bad = progress.errors.load(Ordering::Relaxed) + progress.failures.load(Ordering::Relaxed);
    (progress.ios() as f64 / secs, bad)
}

/// Soaks a volume of `shape`, each server of `engines` engines; `replay`
/// is the command line that runs this soak again.
pub(crate) async fn run(
    shape: VolumeShape,
    duration: f64,
    seed: u64,
    engines: u16,
    replay: &str,
) -> Result<(), String> {
    let root = std::env::temp_dir().join(format!("braid-soak-volume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let n = shape.legs();
    println!(
        "braid soak --volume {shape:?}: {n} servers and a spare, {duration}s of faults, seed {seed} \
         (replay: {replay})"
    );
    // Every node at once; the spare (the last) is the migration's target.
    let mut nodes = Vec::new();
    for i in 0..=n {
        let leg = if i == n { 0 } else { i };
        nodes.push(start_node(&root, i, engines, shape.leg_size(leg)).await?);
    }
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().take(n).enumerate() {
        clients.push((leg_name(i), node.connect(LEG_CHANNELS).await?));
    }
    let volume = start_volume(shape, clients, &root, "soak")?;
    let mut soak = Soak::start(volume, SplitMix64::new(seed));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 1. One leg away ten seconds under load, then its resync timed.
    let resync = match shape.mirrored() {
        true => Some(soak.leg_away(&mut nodes[1]).await?),
        false => None,
    };
    // 2. Mixed faults, with a live migration of leg0 to the spare.
    let mut migration = soak.mixed_faults(&mut nodes, duration).await?;
    // 3. Faults over: everything back in sync, the migration done, and
    // the verifier on a little longer so the end state is checked too.
    soak.heal(&mut migration).await?;
    let end = soak.stop(replay).await?;
    let diverged = divergence(shape, &nodes, &end.final_legs)?;
    // 4. What a mirror costs: the same verifier on one export, a 2-way
    // and a 3-way mirror, over the legs now in sync, in this run.
    let cost = match shape.all_mirrored() {
        true => mirror_cost(&nodes, &end.final_legs, &root).await?,
        false => Vec::new(),
    };
    for node in &mut nodes {
        node.server.kill().await;
    }
    let _ = std::fs::remove_dir_all(&root);
    let summary = Summary {
        shape,
        seed,
        progress: &end.progress,
        faults: &end.faults,
        status: &end.status,
        resync,
        migration: migration.map(|m| (m.took, n)),
        cost: &cost,
        diverged: &diverged,
    };
    summary.print();
    if summary.passed() {
        Ok(())
    } else {
        Err(format!("volume soak failed (replay: {replay})"))
    }
}

/// The soak while it runs: the volume under the verifier, the faults
/// counted, and the progress line.
struct Soak {
    volume: Volume,
    rng: SplitMix64,
    progress: Arc<Progress>,
    workload: tokio::task::JoinHandle<()>,
    started: Instant,
    faults: BTreeMap<&'static str, u64>,
    out: crate::progress::ProgressLine,
}

/// The live migration of leg0 to the spare: when it started, and how
/// long it took once done.
struct Migration {
    started: Instant,
    took: Option<Duration>,
}

/// How the soak's load ended.
struct Ended {
    progress: Arc<Progress>,
    faults: BTreeMap<&'static str, u64>,
    status: braid_fabric_tcp::VolumeStatus,
    /// The legs the volume ends with.
    final_legs: Vec<usize>,
}

impl Soak {
    fn start(volume: Volume, rng: SplitMix64) -> Soak {
        let progress = Arc::new(Progress::default());
        let workload = tokio::spawn(verify::workload(
            volume.clone(),
            BLOCKS,
            16,
            progress.clone(),
        ));
        Soak {
            volume,
            rng,
            progress,
            workload,
            started: Instant::now(),
            faults: BTreeMap::new(),
            out: crate::progress::ProgressLine::new(),
        }
    }

    fn show(&mut self, what: &str) {
        let s = self.volume.status();
        self.out.show(format_args!(
            "  {:>6.1}s  {what:<22} IOs {:>8}  failures {}  errors {}  legs left {}  resynced {}",
            self.started.elapsed().as_secs_f64(),
            self.progress.ios(),
            self.progress.failures.load(Ordering::Relaxed),
            self.progress.errors.load(Ordering::Relaxed),
            s.stats.legs_left,
            crate::config::human_size(s.stats.bytes_resynced)
        ));
    }

    fn count(&mut self, fault: &'static str) {
        *self.faults.entry(fault).or_default() += 1;
    }

    /// Kills leg1's server for ten seconds under load, restarts it and
    /// times its resync: how long, regions and bytes.
    async fn leg_away(&mut self, node: &mut ProxiedServer) -> Result<(Duration, u64, u64), String> {
        node.server.kill().await;
        self.count("server kill -9 (10 s away)");
        let until = Instant::now() + AWAY;
        while Instant::now() < until {
            self.show("leg1 away");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let before = self.volume.status().stats;
        node.server.restart().await?;
        let back = Instant::now();
        while leg_state(&self.volume, "leg1") != Some(LegState::InSync) {
            if back.elapsed() > Duration::from_secs(120) {
                return Err(format!(
                    "leg1 not in sync 120 s after its return: {:?}",
                    self.volume.status().legs
                ));
            }
            self.show("leg1 resyncing");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let after = self.volume.status().stats;
        Ok((
            back.elapsed(),
            after.regions_resynced - before.regions_resynced,
            after.bytes_resynced - before.bytes_resynced,
        ))
    }

    /// `duration` seconds of faults drawn from the seed on the legs in
    /// use, leg0 migrating to the spare (the last node) from a third of
    /// the way in.
    async fn mixed_faults(
        &mut self,
        nodes: &mut [ProxiedServer],
        duration: f64,
    ) -> Result<Option<Migration>, String> {
        let spare = nodes.len() - 1;
        let faults_from = Instant::now();
        let end = faults_from + Duration::from_secs_f64(duration);
        let migrate_at = faults_from + Duration::from_secs_f64(duration / 3.0);
        let mut migration: Option<Migration> = None;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(300 + self.rng.below(1000))).await;
            if migration.is_none() && Instant::now() >= migrate_at {
                let client = nodes[spare].connect(LEG_CHANNELS).await?;
                let store: braid_fabric_tcp::StoreMap = Arc::new(|| Ok(()));
                self.volume
                    .migrate("leg0", &leg_name(spare), client, store)
                    .await
                    .map_err(|e| format!("migration refused: {e}"))?;
                migration = Some(Migration {
                    started: Instant::now(),
                    took: None,
                });
            }
            if let Some(m @ Migration { took: None, .. }) = &mut migration {
                if self.volume.status().migration.is_none() {
                    m.took = Some(m.started.elapsed());
                }
            }
            // Faults on the legs in use: the spare once it is one.
            let candidates = if migration.is_some() {
                spare + 1
            } else {
                spare
            };
            let i = self.rng.below(candidates as u64) as usize;
            if let Some(fault) = self.one_fault(&mut nodes[i]).await? {
                self.count(fault);
            }
            self.show("faults");
        }
        Ok(migration)
    }

    /// One fault on `node`, drawn from the seed; what it was, if it took.
    async fn one_fault(
        &mut self,
        node: &mut ProxiedServer,
    ) -> Result<Option<&'static str>, String> {
        let rng = &mut self.rng;
        let r = rng.next_u64();
        Ok(match rng.below(100) {
            0..=24 => {
                node.server.kill().await;
                tokio::time::sleep(Duration::from_millis(200 + rng.below(2300))).await;
                node.server.restart().await?;
                Some("server kill -9 + restart")
            }
            25..=44 => node.proxy.blackhole_one(r).then_some("channel black-holed"),
            45..=64 => node.proxy.reset_one(r).then_some("channel reset"),
            65..=79 => {
                let d = Duration::from_millis(100 + rng.below(1400));
                node.proxy.stall_one(r, d).then_some("channel stalled")
            }
            _ => (node.proxy.reset_all() > 0).then_some("all of a leg's channels reset"),
        })
    }

    /// Waits (up to three minutes) for every leg to be back in sync and
    /// the migration done, then keeps the verifier on two seconds more.
    async fn heal(&mut self, migration: &mut Option<Migration>) -> Result<(), String> {
        let healing = Instant::now();
        while settled(&self.volume, Duration::from_millis(1))
            .await
            .is_err()
        {
            if healing.elapsed() > Duration::from_secs(180) {
                settled(&self.volume, Duration::ZERO).await?;
            }
            self.show("healing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Some(m @ Migration { took: None, .. }) = migration {
            m.took = Some(m.started.elapsed());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.show("done");
        self.out.finish();
        Ok(())
    }

    /// Stops the load (every IO must end within 30 s: one that does not
    /// is a liveness bug, shown with where it waits), flushes and closes
    /// the volume.
    async fn stop(mut self, replay: &str) -> Result<Ended, String> {
        self.progress.stop.store(true, Ordering::Relaxed);
        if tokio::time::timeout(Duration::from_secs(30), &mut self.workload)
            .await
            .is_err()
        {
            for line in self.volume.in_flight().await {
                println!("  stuck: {line}");
            }
            return Err(format!(
                "IO still in flight 30 s after the load stopped (replay: {replay})"
            ));
        }
        let _ =
            verify::BlockDevice::submit(&self.volume, braid_core::client::IoRequest::flush()).await;
        let status = self.volume.status();
        let final_legs = status
            .legs
            .iter()
            .enumerate()
            .filter(|(_, l)| l.1 != Some(LegState::Retired))
            .map(|(i, _)| i)
            .collect();
        self.volume.close().await;
        Ok(Ended {
            progress: self.progress,
            faults: self.faults,
            status,
            final_legs,
        })
    }
}

/// Which of each mirror's final legs hold other bytes than its first.
/// `final_legs`: the legs the volume ends with, by index in its map (the
/// spare that leg0 migrated to is the last).
fn divergence(
    shape: VolumeShape,
    nodes: &[ProxiedServer],
    final_legs: &[usize],
) -> Result<Vec<String>, String> {
    let image =
        |l: usize| std::fs::read(nodes[l].server.dir.join("disk0.img")).map_err(|e| e.to_string());
    let spare = shape.legs();
    let mut diverged = Vec::new();
    for group in shape.groups() {
        // The spare holds leg0's copy once leg0 has moved to it.
        let moved = group.contains(&0).then_some(spare);
        let legs: Vec<usize> = group
            .iter()
            .copied()
            .chain(moved)
            .filter(|l| final_legs.contains(l))
            .collect();
        let Some((&first, rest)) = legs.split_first() else {
            continue;
        };
        let bytes = image(first)?;
        for &l in rest {
            if image(l)? != bytes {
                diverged.push(format!("leg{l} differs from leg{first}"));
            }
        }
    }
    Ok(diverged)
}

/// The verifier's IOPS on one export, then on a 2-way and a 3-way mirror
/// over the final legs.
async fn mirror_cost(
    nodes: &[ProxiedServer],
    final_legs: &[usize],
    root: &Path,
) -> Result<Vec<(&'static str, (f64, u64))>, String> {
    let mut c = Vec::new();
    for &l in final_legs {
        c.push(nodes[l].connect(LEG_CHANNELS).await?);
    }
    let mut cost = vec![("one export", iops(c[0].clone(), COST_SECS).await)];
    for (ways, label, shape) in [
        (2, "2-way mirror", VolumeShape::Mirror2),
        (3, "3-way mirror", VolumeShape::Mirror3),
    ] {
        if ways > c.len() {
            break;
        }
        let legs = (0..ways).map(|i| (leg_name(i), c[i].clone())).collect();
        let v = start_volume(shape, legs, root, &format!("cost{ways}"))?;
        cost.push((label, iops(v.clone(), COST_SECS).await));
        v.close().await;
    }
    for client in c {
        client.close().await;
    }
    Ok(cost)
}

/// What the soak found.
struct Summary<'a> {
    shape: VolumeShape,
    seed: u64,
    progress: &'a Progress,
    faults: &'a BTreeMap<&'static str, u64>,
    status: &'a braid_fabric_tcp::VolumeStatus,
    /// The timed resync: how long, regions, bytes.
    resync: Option<(Duration, u64, u64)>,
    /// How long the migration took (if it finished) and the spare's index.
    migration: Option<(Option<Duration>, usize)>,
    cost: &'a [(&'static str, (f64, u64))],
    diverged: &'a [String],
}

impl Summary<'_> {
    fn passed(&self) -> bool {
        let migrated = self.status.stats.migrations == 1 || self.migration.is_none();
        self.progress.errors.load(Ordering::Relaxed) == 0
            && self.progress.failures.load(Ordering::Relaxed) == 0
            && self.diverged.is_empty()
            && migrated
    }

    fn print(&self) {
        let (progress, stats) = (self.progress, &self.status.stats);
        println!(
            "\nvolume soak summary ({:?}, seed {}):",
            self.shape, self.seed
        );
        println!("  {:<40} {:>10}", "IOs completed", progress.ios());
        println!(
            "  {:<40} {:>10}",
            "reads verified",
            progress.reads.load(Ordering::Relaxed)
        );
        for (k, v) in self.faults {
            println!("  fault: {k:<33} {v:>10}");
        }
        println!("  {:<40} {:>10}", "legs left behind", stats.legs_left);
        println!(
            "  {:<40} {:>10}",
            "regions resynced", stats.regions_resynced
        );
        println!(
            "  {:<40} {:>10}",
            "bytes resynced",
            crate::config::human_size(stats.bytes_resynced)
        );
        if let Some((t, regions, bytes)) = self.resync {
            println!(
                "  {:<40} {:>7} ms   ({regions} regions, {})",
                "resync after 10 s away under load",
                t.as_millis(),
                crate::config::human_size(bytes)
            );
        }
        match self.migration {
            Some((Some(t), spare)) => println!(
                "  {:<40} {:>7} ms   (leg0 to leg{spare}, {} leg, under faults)",
                "live migration",
                t.as_millis(),
                crate::config::human_size(self.shape.leg_size(0))
            ),
            _ => println!(
                "  live migration                           not started (the run was too short)"
            ),
        }
        println!(
            "  {:<40} {:>7} ms",
            "longest IO stall",
            progress.worst().as_millis()
        );
        for (label, (rate, bad)) in self.cost {
            println!("  IOPS, verifier qd16, {label:<19} {rate:>10.0}   ({bad} errors)");
        }
        println!(
            "  {:<40} {:>10}   (must be 0)",
            "IO errors surfaced",
            progress.errors.load(Ordering::Relaxed)
        );
        println!(
            "  {:<40} {:>10}   (must be 0)",
            "verification failures",
            progress.failures.load(Ordering::Relaxed)
        );
        for p in progress.first_problems.lock().unwrap().iter() {
            println!("    {p}");
        }
        for d in self.diverged {
            println!("  divergence: {d}");
        }
    }
}
