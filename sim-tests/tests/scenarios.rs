//! Every scenario passes a handful of seeds, and the seeds of bugs found
//! stay pinned here as regressions.

use braid_sim_tests::{run, SCENARIOS};

#[test]
fn every_scenario_holds_its_invariants() {
    for (name, _) in SCENARIOS {
        for seed in 0..3 {
            let r = run(name, seed, 3.0).unwrap();
            assert!(
                r.violations.is_empty(),
                "scenario {name} seed {seed}: {}",
                r.violations[0]
            );
            assert!(r.ios > 0, "scenario {name} seed {seed} did no IO");
        }
    }
}

#[test]
fn disk_errors_surface_as_errors_and_nothing_else() {
    let r = run("disk-errors", 1, 2.0).unwrap();
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert!(r.client.failed > 0);
}

/// Seeds that found bugs during development, with what they found. Each
/// must stay clean.
const REGRESSIONS: &[(&str, u64, f64, &str)] = &[
    // Found once the checker held a sector to what a read saw and the disk
    // landed writes before completing them. A read saw an unanswered
    // write; power loss took it; a new read ran before its resend landed.
    (
        "all-faults",
        190,
        5.0,
        "read older than an earlier read (restart gate)",
    ),
    ("all-faults", 21, 5.0, "read older than an earlier read"),
    ("all-faults", 156, 5.0, "read older than an earlier read"),
    ("all-faults", 249, 5.0, "read older than an earlier read"),
    // Two overlapping writes executed in one order, answered in the
    // other; a FLUSH freed the later one only, and replay put the earlier
    // one over it (flush frontier, overlap order).
    (
        "deep-queue",
        64,
        5.0,
        "replay put older data over flushed data",
    ),
    ("deep-queue", 5, 5.0, "read older than an earlier read"),
    ("deep-queue", 15, 5.0, "read older than an earlier read"),
    ("deep-queue", 81, 5.0, "read older than an earlier read"),
    ("deep-queue", 102, 5.0, "read older than an earlier read"),
    ("deep-queue", 108, 5.0, "read older than an earlier read"),
    ("deep-queue", 118, 5.0, "read older than an earlier read"),
];

#[test]
fn pinned_regression_seeds_stay_fixed() {
    for (name, seed, secs, what) in REGRESSIONS {
        let r = run(name, *seed, *secs).unwrap();
        assert!(
            r.violations.is_empty(),
            "regression {what} (scenario {name} seed {seed}) is back: {}",
            r.violations[0]
        );
    }
}
