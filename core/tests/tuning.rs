//! Runtime tuning: every knob changed while IO runs, under faults, with the
//! invariant checker watching; a bad value is refused as at start-up and
//! changes nothing.

use braid_core::auth::Key;
use braid_core::client::{ClientConfig, ClientEngine, ClientTuning, Policy};
use braid_core::server::{ExportConfig, ServerConfig, ServerEngine, ServerTuning};
use braid_core::testkit::{FaultRates, World, WorldConfig};
use braid_core::Instant;
use std::time::Duration;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn channels(n: usize) -> ClientTuning {
    ClientTuning {
        channels: Some(n),
        ..ClientTuning::default()
    }
}

#[test]
fn channels_grow_and_shrink_under_load_without_errors() {
    // No faults: every handshake is one the tuning asked for.
    let mut c = WorldConfig::new(3);
    c.faults = FaultRates::none();
    c.run_for = Duration::from_secs(3);
    c.tunings = vec![
        (ms(500), channels(8), ServerTuning::default()),
        (ms(1500), channels(2), ServerTuning::default()),
        (ms(2500), channels(4), ServerTuning::default()),
    ];
    let r = World::new(c).run();
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.client.failed, 0);
    // 4 at the start, 4 added, 2 added back after dropping to 2.
    assert_eq!(r.client.handshakes, 10, "{:?}", r.client);
    // No faults: every failover is a request a retired channel handed on.
    assert!(r.client.failovers > 0, "{:?}", r.client);
    assert!(r.ios > 1_000);
}

#[test]
fn every_knob_changes_under_every_fault_class() {
    for seed in 0..12 {
        let mut c = WorldConfig::new(seed);
        c.run_for = Duration::from_secs(3);
        c.tunings = vec![
            (
                ms(400),
                ClientTuning {
                    channels: Some(8),
                    policy: Some(Policy::RoundRobin),
                    keepalive_interval: Some(ms(100)),
                    channel_timeout: Some(ms(400)),
                    resend_min: Some(ms(50)),
                    resend_max: Some(ms(500)),
                },
                ServerTuning {
                    max_inflight: Some(8),
                    idle_timeout: Some(ms(2_000)),
                    session_linger: Some(ms(500)),
                    ..ServerTuning::default()
                },
            ),
            (
                ms(1_600),
                ClientTuning {
                    channels: Some(1),
                    policy: Some(Policy::LowestLatency),
                    ..ClientTuning::default()
                },
                ServerTuning {
                    max_sessions: Some(4),
                    max_channels_per_session: Some(2),
                    ..ServerTuning::default()
                },
            ),
            (ms(2_400), channels(3), ServerTuning::default()),
        ];
        let r = World::new(c).run();
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        assert!(r.ios > 0, "seed {seed}");
    }
}

fn client() -> ClientEngine {
    ClientEngine::new(ClientConfig::new("disk0", "k", Key::new(*b"key"), [1; 32])).unwrap()
}

#[test]
fn a_bad_client_value_is_refused_and_changes_nothing() {
    let mut e = client();
    let now = Instant::ZERO;
    let before = e.config().clone();
    for (t, field) in [
        (channels(0), "channels"),
        (channels(65), "channels"),
        (
            ClientTuning {
                keepalive_interval: Some(ms(900)),
                ..ClientTuning::default()
            },
            "channel_timeout",
        ),
        (
            ClientTuning {
                resend_min: Some(Duration::ZERO),
                ..ClientTuning::default()
            },
            "resend_min",
        ),
    ] {
        let err = e.tune(&t, now).expect_err("refused");
        assert_eq!(err.field, field, "{err}");
    }
    assert_eq!(e.config().channels, before.channels);
    assert_eq!(e.config().keepalive_interval, before.keepalive_interval);
    e.tune(&channels(6), now).unwrap();
    assert_eq!(e.config().channels, 6);
    assert_eq!(e.channel_summary().len(), 6);
}

#[test]
fn a_bad_server_value_is_refused_and_changes_nothing() {
    let config = ServerConfig::new(
        1,
        [2; 32],
        vec![("k".into(), Key::new(*b"key"))],
        vec![ExportConfig::new("disk0", 1 << 20)],
    );
    let window = config.id_window;
    let mut s = ServerEngine::new(config).unwrap();
    let err = s
        .tune(&ServerTuning {
            max_inflight: Some(window + 1),
            ..ServerTuning::default()
        })
        .expect_err("above the id window");
    assert_eq!(err.field, "id_window", "{err}");
    let err = s
        .tune(&ServerTuning {
            max_sessions: Some(0),
            ..ServerTuning::default()
        })
        .expect_err("no sessions");
    assert_eq!(err.field, "max_sessions");
    s.tune(&ServerTuning {
        max_inflight: Some(16),
        ..ServerTuning::default()
    })
    .unwrap();
    assert_eq!(s.config().max_inflight, 16);
}
