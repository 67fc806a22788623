//! Named fault scenarios over braid's seeded world. Each is a function of
//! the seed and the virtual run time; `cargo xtask sim` sweeps them, and the
//! tests pin the seeds of every bug found.

use braid_core::client::{ClientTuning, Policy};
use braid_core::server::ServerTuning;
use braid_core::testkit::{FaultRates, Sabotage, Scenario, WorldConfig};
use std::time::Duration;

/// The world for `scenario` and `seed`, running `virtual_secs` of faulty
/// workload; `None` for a scenario only the madsim level has.
pub fn scenario(scenario: Scenario, seed: u64, virtual_secs: f64) -> Option<WorldConfig> {
    let mut c = WorldConfig::new(seed);
    c.run_for = Duration::from_secs_f64(virtual_secs);
    let only = |f: FaultRates| f;
    match scenario {
        Scenario::AllFaults => {}
        Scenario::Steady => c.faults = FaultRates::none(),
        Scenario::Frames => {
            c.faults = only(FaultRates {
                loss: 0.03,
                duplicate: 0.03,
                corrupt: 0.02,
                ..FaultRates::none()
            })
        }
        Scenario::ChannelChurn => {
            c.faults = only(FaultRates {
                kill_channel_per_sec: 3.0,
                blackhole_per_sec: 2.0,
                ..FaultRates::none()
            })
        }
        Scenario::Partitions => {
            c.faults = only(FaultRates {
                partition_per_sec: 1.0,
                ..FaultRates::none()
            })
        }
        Scenario::Crash => {
            c.faults = only(FaultRates {
                crash_per_sec: 1.0,
                ..FaultRates::none()
            })
        }
        Scenario::PowerLoss => {
            c.faults = only(FaultRates {
                power_loss_per_sec: 1.0,
                ..FaultRates::none()
            })
        }
        Scenario::SlowDisk => {
            c.faults = only(FaultRates {
                disk_stall_per_sec: 2.0,
                ..FaultRates::none()
            })
        }
        Scenario::DiskErrors => c.faults = FaultRates::none(),
        Scenario::OneChannel => c.channels = 1,
        Scenario::DeepQueue => {
            c.queue_depth = 64;
            c.disk_sectors = 64;
        }
        Scenario::Swarm => c = swarm(seed, virtual_secs),
        Scenario::KeyWithdrawn => key_withdrawals(&mut c),
        Scenario::ClockSkew => {
            // Drawn from the seed, apart from the world's own stream.
            let mut rng = braid_core::rng::SplitMix64::new(seed ^ 0xc10c_5ce3);
            let offset = Duration::from_millis(rng.below(3_600_000));
            let rate = 0.9 + rng.below(2001) as f64 / 10_000.0;
            c.server_clock = (offset, rate);
        }
        Scenario::Stalls
        | Scenario::DiskFull
        | Scenario::ClientStall
        | Scenario::ManyClients
        | Scenario::Mirror
        | Scenario::Migrate
        | Scenario::MirrorErrors
        | Scenario::MirrorRestart
        | Scenario::MirrorQuorum
        | Scenario::MigrateRestart
        | Scenario::MigrateQuorum
        | Scenario::MigrateErrors
        | Scenario::Stripe
        | Scenario::StripeRestart
        | Scenario::StripedMirrors
        | Scenario::Linear => return None,
    }
    Some(c)
}

/// Two to four withdrawals of the client's key at times drawn from the
/// seed, each for 10 ms to 4 s, among every fault class; in half the
/// seeds the session linger is cut to 500 ms first, so some withdrawals
/// outlast the session. A stream of its own keeps the world's untouched.
fn key_withdrawals(c: &mut WorldConfig) {
    let mut rng = braid_core::rng::SplitMix64::new(c.seed ^ 0x6b65_7973);
    let run_ms = c.run_for.as_millis() as u64;
    let ms = Duration::from_millis;
    for _ in 0..2 + rng.below(3) {
        let at = ms(rng.below(run_ms.max(1)));
        c.key_withdrawals.push((at, ms(pick_key_outage(&mut rng))));
    }
    if rng.chance(0.5) {
        let linger = ServerTuning {
            session_linger: Some(ms(500)),
            ..ServerTuning::default()
        };
        c.tunings
            .push((Duration::ZERO, ClientTuning::default(), linger));
    }
}

/// Whether a scenario injects media errors (so IO errors are expected).
pub fn expects_errors(scenario: Scenario) -> bool {
    scenario == Scenario::DiskErrors
}

/// Byte ranges that fail in `disk-errors`.
pub fn bad_ranges(scenario: Scenario) -> Vec<(u64, u64)> {
    if expects_errors(scenario) {
        vec![(8 * 512, 16 * 512)]
    } else {
        Vec::new()
    }
}

/// Builds and runs one seed of a scenario.
pub fn run(
    scenario: Scenario,
    seed: u64,
    virtual_secs: f64,
) -> Option<braid_core::testkit::Report> {
    run_sabotaged(scenario, seed, virtual_secs, &[])
}

/// [`run`] with safety mechanisms switched off.
pub fn run_sabotaged(
    scenario: Scenario,
    seed: u64,
    virtual_secs: f64,
    sabotage: &[Sabotage],
) -> Option<braid_core::testkit::Report> {
    run_with_engines(scenario, seed, virtual_secs, sabotage, 1)
}

/// [`run_sabotaged`] with the server running `engines` protocol engines
/// (`braid serve --engines`). With one, the runs are those of
/// [`run_sabotaged`], seed for seed.
pub fn run_with_engines(
    scenario: Scenario,
    seed: u64,
    virtual_secs: f64,
    sabotage: &[Sabotage],
    engines: usize,
) -> Option<braid_core::testkit::Report> {
    run_with(scenario, seed, virtual_secs, sabotage, engines, false)
}

/// [`run`] as the client ran when the pinned seeds were found: every
/// request to the least loaded channel (`sticky_slack` 0), so a seed
/// replays the very run that found its bug.
pub fn run_as_found(
    scenario: Scenario,
    seed: u64,
    virtual_secs: f64,
) -> Option<braid_core::testkit::Report> {
    let mut cfg = self::scenario(scenario, seed, virtual_secs)?;
    cfg.sticky_slack = 0;
    Some(world(scenario, cfg).run())
}

/// Where two runs of a seed first differ: runs it twice recording every
/// step, and names the step, its virtual time and each run's event there.
/// `None` if the recordings agree.
pub fn divergence(
    scenario: Scenario,
    seed: u64,
    virtual_secs: f64,
    sabotage: &[Sabotage],
    engines: usize,
) -> Option<String> {
    let a = run_with(scenario, seed, virtual_secs, sabotage, engines, true)?;
    let b = run_with(scenario, seed, virtual_secs, sabotage, engines, true)?;
    let (i, x, y) = braid_core::testkit::first_divergence(&a.steps, &b.steps)?;
    let show = |s: Option<braid_core::testkit::Step>| match s {
        Some(s) => format!(
            "{} at {:.6}s (hash {:#x})",
            s.event,
            s.at_nanos as f64 / 1e9,
            s.hash
        ),
        None => "the run had ended".to_string(),
    };
    Some(format!(
        "runs diverge at step {i} of {}: first run {}, second run {}",
        a.steps.len().max(b.steps.len()),
        show(x),
        show(y)
    ))
}

fn run_with(
    scenario: Scenario,
    seed: u64,
    virtual_secs: f64,
    sabotage: &[Sabotage],
    engines: usize,
    record_steps: bool,
) -> Option<braid_core::testkit::Report> {
    let mut cfg = self::scenario(scenario, seed, virtual_secs)?;
    cfg.record_steps = record_steps;
    cfg.engines = engines;
    for s in sabotage {
        s.apply(&mut cfg);
    }
    Some(world(scenario, cfg).run())
}

fn world(scenario: Scenario, cfg: WorldConfig) -> braid_core::testkit::World {
    let mut world = braid_core::testkit::World::new(cfg);
    if expects_errors(scenario) {
        world.allow_errors();
        world.set_bad_ranges(bad_ranges(scenario));
    }
    world
}

/// A world whose every knob is drawn from the seed, as TigerBeetle's VOPR
/// draws its cluster: sweeps then cover shapes nobody wrote down. The draw
/// uses a stream of its own, so the world's stream is untouched.
pub fn swarm(seed: u64, virtual_secs: f64) -> WorldConfig {
    let mut rng = braid_core::rng::SplitMix64::new(seed ^ 0x5a4d_5741_524d);
    let mut c = WorldConfig::new(seed);
    c.run_for = Duration::from_secs_f64(virtual_secs);
    c.ios_max = 20_000 * virtual_secs.ceil() as u64;
    let mut pick = |choices: &[u64]| choices[rng.below(choices.len() as u64) as usize];
    c.channels = pick(&[1, 2, 3, 4, 6, 8]) as usize;
    c.queue_depth = pick(&[1, 2, 4, 8, 16, 32, 64, 128]) as usize;
    c.disk_sectors = pick(&[16, 32, 64, 128, 256, 1024]);
    c.io_sectors_max = pick(&[1, 2, 4, 8, 16]).min(c.disk_sectors);
    c.max_dirty_bytes = 4096 << pick(&[0, 1, 2, 3, 4, 5]);
    c.server_max_inflight = pick(&[1, 2, 4, 8, 16, 64, 256]) as u32;
    c.server_max_payload = if pick(&[0, 1]) == 0 {
        (c.io_sectors_max * SECTOR_BYTES) as u32
    } else {
        1 << 20
    };
    c.policy = match pick(&[0, 1, 2]) {
        0 => Policy::LeastInflight,
        1 => Policy::RoundRobin,
        _ => Policy::LowestLatency,
    };
    let us = Duration::from_micros;
    let lo = us(pick(&[1, 20, 100, 500]));
    c.link_delay = (lo, lo + us(pick(&[0, 50, 400, 2_000, 5_000])));
    let lo = us(pick(&[1, 10, 100, 1_000]));
    c.disk_latency = (lo, lo + us(pick(&[0, 100, 300, 2_000, 5_000])));
    let ms = Duration::from_millis;
    c.keepalive_interval = ms(pick(&[50, 100, 200, 500]));
    c.channel_timeout = c.keepalive_interval * pick(&[2, 3, 4, 6]) as u32;
    c.resend_min = ms(pick(&[20, 50, 200, 500]));
    c.resend_max = c.resend_min * pick(&[1, 2, 4, 10]) as u32;
    // Each fault class on or off, and if on, at a drawn rate.
    let mut rate = |max: f64| {
        if rng.chance(0.5) {
            max * (1 + rng.below(100)) as f64 / 100.0
        } else {
            0.0
        }
    };
    c.faults = FaultRates {
        loss: rate(0.05),
        duplicate: rate(0.05),
        corrupt: rate(0.02),
        kill_channel_per_sec: rate(3.0),
        blackhole_per_sec: rate(2.0),
        partition_per_sec: rate(1.0),
        crash_per_sec: rate(1.0),
        power_loss_per_sec: rate(1.0),
        disk_stall_per_sec: rate(2.0),
        outage_max: ms(50 + rng.below(1_450)),
    };
    if rng.chance(0.3) {
        let offset = ms(rng.below(3_600_000));
        let rate = 0.9 + rng.below(2001) as f64 / 10_000.0;
        c.server_clock = (offset, rate);
    }
    // An operator retuning the volume and the server mid-run.
    let run_ms = c.run_for.as_millis() as u64;
    for _ in 0..rng.below(3) {
        let at = ms(rng.below(run_ms.max(1)));
        let mut pick = |choices: &[u64]| choices[rng.below(choices.len() as u64) as usize];
        let keepalive = ms(pick(&[50, 100, 200, 500]));
        let resend_min = ms(pick(&[20, 50, 200, 500]));
        let client = ClientTuning {
            channels: Some(pick(&[1, 2, 3, 4, 6, 8]) as usize),
            policy: Some(match pick(&[0, 1, 2]) {
                0 => Policy::LeastInflight,
                1 => Policy::RoundRobin,
                _ => Policy::LowestLatency,
            }),
            keepalive_interval: Some(keepalive),
            channel_timeout: Some(keepalive * pick(&[2, 3, 4, 6]) as u32),
            resend_min: Some(resend_min),
            resend_max: Some(resend_min * pick(&[1, 2, 4, 10]) as u32),
        };
        let server = ServerTuning {
            max_inflight: Some(pick(&[1, 2, 4, 8, 16, 64, 256]) as u32),
            max_channels_per_session: Some(pick(&[1, 2, 8, 64]) as usize),
            session_linger: Some(ms(pick(&[100, 1_000, 30_000]))),
            ..ServerTuning::default()
        };
        c.tunings.push((at, client, server));
    }
    // Drawn last, so every earlier draw of a seed stays what it was.
    c.hold_refused = rng.chance(0.5);
    c.sticky_slack = [0, 1, 4, 16, 64][rng.below(5) as usize];
    // An operator withdrawing the client's key for a while, some outages
    // longer than the session linger a tuning above may set (100 ms, 1 s),
    // so the session expires while the client cannot reach it.
    if rng.chance(0.3) {
        for _ in 0..1 + rng.below(2) {
            let at = ms(rng.below(run_ms.max(1)));
            c.key_withdrawals.push((at, ms(pick_key_outage(&mut rng))));
        }
    }
    c
}

fn pick_key_outage(rng: &mut braid_core::rng::SplitMix64) -> u64 {
    [10, 200, 1_500, 4_000][rng.below(4) as usize]
}

/// One line naming every drawn knob of a world, printed with its seed.
pub fn describe(c: &WorldConfig) -> String {
    let f = &c.faults;
    let mut on = Vec::new();
    for (name, r) in [
        ("loss", f.loss),
        ("dup", f.duplicate),
        ("corrupt", f.corrupt),
        ("kill/s", f.kill_channel_per_sec),
        ("blackhole/s", f.blackhole_per_sec),
        ("partition/s", f.partition_per_sec),
        ("crash/s", f.crash_per_sec),
        ("power/s", f.power_loss_per_sec),
        ("stall/s", f.disk_stall_per_sec),
    ] {
        if r > 0.0 {
            on.push(format!("{name}={r:.3}"));
        }
    }
    format!(
        "channels={} qd={} hold_refused={} disk_sectors={} io_sectors_max={} dirty_bytes={} policy={:?} \
         sticky_slack={} server_max_inflight={} server_max_payload={} link_delay={:?}..{:?} disk_latency={:?}..{:?} \
         keepalive={:?} channel_timeout={:?} resend={:?}..{:?} outage_max={:?} clock={:?}x{} faults=[{}] tunings=[{}] key_withdrawals={:?}",
        c.channels,
        c.queue_depth,
        c.hold_refused,
        c.disk_sectors,
        c.io_sectors_max,
        c.max_dirty_bytes,
        c.policy,
        c.sticky_slack,
        c.server_max_inflight,
        c.server_max_payload,
        c.link_delay.0,
        c.link_delay.1,
        c.disk_latency.0,
        c.disk_latency.1,
        c.keepalive_interval,
        c.channel_timeout,
        c.resend_min,
        c.resend_max,
        f.outage_max,
        c.server_clock.0,
        c.server_clock.1,
        on.join(" "),
        c.tunings
            .iter()
            .map(|(at, cl, sv)| format!(
                "at {at:?}: channels={:?} policy={:?} keepalive={:?} timeout={:?} resend={:?}..{:?} server max_inflight={:?} max_channels={:?} linger={:?}",
                cl.channels, cl.policy, cl.keepalive_interval, cl.channel_timeout, cl.resend_min, cl.resend_max,
                sv.max_inflight, sv.max_channels_per_session, sv.session_linger
            ))
            .collect::<Vec<_>>()
            .join("; "),
        c.key_withdrawals
    )
}

const SECTOR_BYTES: u64 = braid_core::testkit::SECTOR as u64;
