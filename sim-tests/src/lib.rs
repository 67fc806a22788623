//! Named fault scenarios over braid's seeded world. Each is a function of
//! the seed and the virtual run time; `cargo xtask sim` sweeps them, and the
//! tests pin the seeds of every bug found.

use braid_core::testkit::{FaultRates, WorldConfig};
use std::time::Duration;

/// Every scenario, with what it stresses.
pub const SCENARIOS: &[(&str, &str)] = &[
    (
        "all-faults",
        "every fault class at once, 4 channels, mixed IO (the default)",
    ),
    (
        "steady",
        "no faults: the baseline every other scenario is compared with",
    ),
    ("frames", "lost, duplicated, corrupted and reordered frames"),
    ("channel-churn", "channel resets and black holes"),
    (
        "partitions",
        "the server unreachable for up to a second at a time",
    ),
    ("crash", "server process crashes and restarts"),
    ("power-loss", "server power loss: the disk cache is lost"),
    ("slow-disk", "disk stalls up to a second"),
    (
        "disk-errors",
        "media errors on a range: clear errors there, nothing lost elsewhere",
    ),
    ("one-channel", "every fault class with a single channel"),
    (
        "deep-queue",
        "every fault class at queue depth 64 over a small disk",
    ),
    (
        "clock-skew",
        "every fault class with the server's clock up to an hour ahead, running 10% fast or slow",
    ),
];

/// The world for `name` and `seed`, running `virtual_secs` of faulty
/// workload; `None` for an unknown name.
pub fn scenario(name: &str, seed: u64, virtual_secs: f64) -> Option<WorldConfig> {
    let mut c = WorldConfig::new(seed);
    c.run_for = Duration::from_secs_f64(virtual_secs);
    let only = |f: FaultRates| f;
    match name {
        "all-faults" => {}
        "steady" => c.faults = FaultRates::none(),
        "frames" => {
            c.faults = only(FaultRates {
                loss: 0.03,
                duplicate: 0.03,
                corrupt: 0.02,
                ..FaultRates::none()
            })
        }
        "channel-churn" => {
            c.faults = only(FaultRates {
                kill_channel_per_sec: 3.0,
                blackhole_per_sec: 2.0,
                ..FaultRates::none()
            })
        }
        "partitions" => {
            c.faults = only(FaultRates {
                partition_per_sec: 1.0,
                ..FaultRates::none()
            })
        }
        "crash" => {
            c.faults = only(FaultRates {
                crash_per_sec: 1.0,
                ..FaultRates::none()
            })
        }
        "power-loss" => {
            c.faults = only(FaultRates {
                power_loss_per_sec: 1.0,
                ..FaultRates::none()
            })
        }
        "slow-disk" => {
            c.faults = only(FaultRates {
                disk_stall_per_sec: 2.0,
                ..FaultRates::none()
            })
        }
        "disk-errors" => c.faults = FaultRates::none(),
        "one-channel" => c.channels = 1,
        "deep-queue" => {
            c.queue_depth = 64;
            c.disk_sectors = 64;
        }
        "clock-skew" => {
            // Drawn from the seed, apart from the world's own stream.
            let mut rng = braid_core::rng::SplitMix64::new(seed ^ 0xc10c_5ce3);
            let offset = Duration::from_millis(rng.below(3_600_000));
            let rate = 0.9 + rng.below(2001) as f64 / 10_000.0;
            c.server_clock = (offset, rate);
        }
        _ => return None,
    }
    Some(c)
}

/// Whether a scenario injects media errors (so IO errors are expected).
pub fn expects_errors(name: &str) -> bool {
    name == "disk-errors"
}

/// Byte ranges that fail in `disk-errors`.
pub fn bad_ranges(name: &str) -> Vec<(u64, u64)> {
    if expects_errors(name) {
        vec![(8 * 512, 16 * 512)]
    } else {
        Vec::new()
    }
}

/// Builds and runs one seed of a scenario.
pub fn run(name: &str, seed: u64, virtual_secs: f64) -> Option<braid_core::testkit::Report> {
    let cfg = scenario(name, seed, virtual_secs)?;
    let mut world = braid_core::testkit::World::new(cfg);
    if expects_errors(name) {
        world.allow_errors();
        world.set_bad_ranges(bad_ranges(name));
    }
    Some(world.run())
}
