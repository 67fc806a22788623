//! Every scenario passes a handful of seeds, and the seeds of bugs found
//! stay pinned here as regressions.

use braid_core::testkit::{Level, Scenario};
use braid_sim_tests::{run, run_as_found, run_with_engines};

#[test]
fn every_scenario_holds_its_invariants() {
    for name in Scenario::at(Level::Engine) {
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
    let r = run(Scenario::DiskErrors, 1, 2.0).unwrap();
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert!(r.client.failed > 0);
}

/// A server of three engines, as `braid serve --engines 3` runs it: each
/// connection reaches the engine its first frame names, so every join
/// finds its session (the world reports one that does not) through
/// resets, corruption and restarts.
#[test]
fn three_engines_route_every_join_to_its_session() {
    for name in [Scenario::AllFaults, Scenario::Swarm, Scenario::ChannelChurn] {
        for seed in 0..3 {
            let r = run_with_engines(name, seed, 3.0, &[], 3).unwrap();
            assert!(
                r.violations.is_empty(),
                "scenario {name} seed {seed}: {}",
                r.violations[0]
            );
            assert!(r.ios > 0, "scenario {name} seed {seed} did no IO");
            // Completed handshakes beyond the new sessions joined one.
            assert!(
                r.server.handshakes > r.server.sessions_created,
                "scenario {name} seed {seed}: no channel joined a session"
            );
        }
    }
}

/// Seeds that found bugs during development, with what they found. Each
/// must stay clean.
const REGRESSIONS: &[(Scenario, u64, f64, &str)] = &[
    // Found once the checker held a sector to what a read saw and the disk
    // landed writes before completing them. A read saw an unanswered
    // write; power loss took it; a new read ran before its resend landed.
    (
        Scenario::AllFaults,
        190,
        5.0,
        "read older than an earlier read (restart gate)",
    ),
    (
        Scenario::AllFaults,
        21,
        5.0,
        "read older than an earlier read",
    ),
    (
        Scenario::AllFaults,
        156,
        5.0,
        "read older than an earlier read",
    ),
    (
        Scenario::AllFaults,
        249,
        5.0,
        "read older than an earlier read",
    ),
    // Two overlapping writes executed in one order, answered in the
    // other; a FLUSH freed the later one only, and replay put the earlier
    // one over it (flush frontier, overlap order).
    (
        Scenario::DeepQueue,
        64,
        5.0,
        "replay put older data over flushed data",
    ),
    (
        Scenario::DeepQueue,
        5,
        5.0,
        "read older than an earlier read",
    ),
    (
        Scenario::DeepQueue,
        15,
        5.0,
        "read older than an earlier read",
    ),
    (
        Scenario::DeepQueue,
        81,
        5.0,
        "read older than an earlier read",
    ),
    (
        Scenario::DeepQueue,
        102,
        5.0,
        "read older than an earlier read",
    ),
    (
        Scenario::DeepQueue,
        108,
        5.0,
        "read older than an earlier read",
    ),
    (
        Scenario::DeepQueue,
        118,
        5.0,
        "read older than an earlier read",
    ),
];

#[test]
fn pinned_regression_seeds_stay_fixed() {
    for (name, seed, secs, what) in REGRESSIONS {
        // The run that found it, then the same seed as the client runs now.
        for (how, r) in [
            ("as found", run_as_found(*name, *seed, *secs).unwrap()),
            ("as now", run(*name, *seed, *secs).unwrap()),
        ] {
            assert!(
                r.violations.is_empty(),
                "regression {what} (scenario {name} seed {seed}, {how}) is back: {}",
                r.violations[0]
            );
        }
    }
}

#[test]
fn a_divergence_is_reported_at_its_first_step() {
    use braid_core::testkit::{first_divergence, World};
    let record = || {
        let mut c = braid_sim_tests::scenario(Scenario::AllFaults, 11, 1.0).unwrap();
        c.record_steps = true;
        World::new(c).run()
    };
    let (a, mut b) = (record(), record());
    assert!(a.steps.len() > 100, "a run has steps");
    assert_eq!(first_divergence(&a.steps, &b.steps), None, "a seed replays");
    assert_eq!(
        braid_sim_tests::divergence(Scenario::AllFaults, 11, 1.0, &[], 1),
        None
    );
    // A run that went another way from step 57 on is reported there.
    let i = 57;
    for s in &mut b.steps[i..] {
        s.hash ^= 1;
    }
    let (at, x, y) = first_divergence(&a.steps, &b.steps).unwrap();
    assert_eq!(at, i);
    assert_ne!(x, y);
    b.steps.truncate(i);
    assert_eq!(
        first_divergence(&a.steps, &b.steps).map(|d| (d.0, d.2)),
        Some((i, None))
    );
}

/// The operator withdraws the client's key twice under every fault class,
/// the second time for longer than the session linger it set just
/// before: each channel that used the key closes at once, the session
/// expires while the client cannot reach it, and once the key is back no
/// IO is lost or applied twice (the checker's invariants).
#[test]
fn a_withdrawn_key_closes_its_channels_and_loses_no_io() {
    use braid_core::client::ClientTuning;
    use braid_core::server::ServerTuning;
    use braid_core::testkit::{Fault, World};
    use std::time::Duration;
    let ms = Duration::from_millis;
    for seed in 0..4 {
        let mut c = braid_sim_tests::scenario(Scenario::AllFaults, seed, 5.0).unwrap();
        c.key_withdrawals = vec![(ms(500), ms(300)), (ms(2_000), ms(1_500))];
        let linger = ServerTuning {
            session_linger: Some(ms(500)),
            ..ServerTuning::default()
        };
        c.tunings.push((ms(1_900), ClientTuning::default(), linger));
        let r = World::new(c).run();
        assert!(r.violations.is_empty(), "seed {seed}: {}", r.violations[0]);
        assert_eq!(r.faults.get(&Fault::KeyWithdrawn), Some(&2), "seed {seed}");
        assert!(
            r.server.channels_revoked > 0,
            "seed {seed}: no channel closed"
        );
        assert!(
            r.client.session_resets > 0,
            "seed {seed}: the session outlived its linger"
        );
        assert!(r.ios > 1_000, "seed {seed}: {} IOs", r.ios);
    }
}
