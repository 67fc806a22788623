//! The safety mechanisms a simulation can switch off, one vocabulary for
//! both levels (the engine-level world here and the real drivers on
//! madsim), so a sweep at either level names them the same way and proves
//! its checks notice each one missing.

use super::world::WorldConfig;
use super::Scenario;
use crate::client::ClientConfig;
use crate::server::ServerConfig;

/// A safety mechanism, named for what goes missing when it is switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sabotage {
    /// The server executes every copy of a request.
    NoDedup,
    /// The client never resends an unanswered request.
    NoResend,
    /// The client forgets unflushed data after a server restart.
    NoReplay,
    /// The client sends a FLUSH without waiting for the writes it covers.
    NoFlushBarrier,
    /// The client sends overlapping mutations together.
    NoOverlapOrder,
    /// After a server restart, new IO runs beside the resends of mutations
    /// the server left unanswered.
    NoRestartGate,
    /// A completed FLUSH frees only what it covered by acknowledgement.
    NoFlushFrontier,
    /// The server runs overlapping mutations in any order.
    NoOverlapGate,
    /// A volume never marks its dirty-region logs (returning legs are
    /// copied nothing).
    NoDirtyLog,
    /// A volume reads from legs not in sync.
    NoInSyncGate,
    /// A volume sends each write to one mirror leg only.
    NoFanOut,
    /// The client never says Room after refusing an IO with Busy, so a
    /// driver holding that IO waits forever.
    NoRoom,
    /// The server never ends a client's older sessions when a newer run
    /// of it opens one, so a dead run's writes may land after the new
    /// run's.
    NoFencing,
    /// A volume's driver waits a minute, not a second, before it goes
    /// on without a leg that does not answer, so a mirror with one leg
    /// unreachable stops instead of serving from the others.
    NoLegTimeout,
    /// A mirror answers a leg's media error or full disk as the IO's,
    /// instead of reading from another leg in sync or leaving the failing
    /// leg behind, so bad blocks or a full disk under one copy reach the
    /// user.
    NoErrorFailover,
    /// A restarted volume serves from every leg at once, before a FLUSH
    /// has made what the dead run left in each leg's cache stable, so a
    /// power cut can take back what a read already saw (or what a copy
    /// took to the other legs).
    NoSettle,
    /// A volume clears a quiet region's write-intent mark before a FLUSH
    /// covered its writes, so a leg that loses them to a power cut after
    /// the client died is never copied back.
    NoUnflushedMarks,
    /// While a migration switches over and the old map holds some bytes
    /// only on the old leg, which is away, a volume answers writes to
    /// them and FLUSHes before the new map is stored: a client that dies
    /// then restarts on the old map without what they promised.
    NoOldMapHold,
    /// While a migration switches over, a volume acknowledges a write at
    /// its quorum once a leg of the new map vouches for it, though no
    /// leg of the old map does: the acknowledgement marks the old map's
    /// lagging legs behind, and a restart on the old map may trust one
    /// that lacks the write.
    NoBothMapsVouch,
    /// A volume stores one leg fallen behind in the same log store as
    /// another back in sync, though no leg is clear in both that store
    /// and the one before: a crash that tears the store, keeping some
    /// legs' new logs and others' old, can leave every leg behind, and
    /// the restart trusts one that lacks acknowledged writes.
    NoStoreAnchor,
}

impl Sabotage {
    /// Every mechanism.
    pub const ALL: [Sabotage; 20] = [
        Sabotage::NoDedup,
        Sabotage::NoResend,
        Sabotage::NoReplay,
        Sabotage::NoFlushBarrier,
        Sabotage::NoOverlapOrder,
        Sabotage::NoRestartGate,
        Sabotage::NoFlushFrontier,
        Sabotage::NoOverlapGate,
        Sabotage::NoDirtyLog,
        Sabotage::NoInSyncGate,
        Sabotage::NoFanOut,
        Sabotage::NoRoom,
        Sabotage::NoFencing,
        Sabotage::NoLegTimeout,
        Sabotage::NoErrorFailover,
        Sabotage::NoSettle,
        Sabotage::NoUnflushedMarks,
        Sabotage::NoOldMapHold,
        Sabotage::NoBothMapsVouch,
        Sabotage::NoStoreAnchor,
    ];

    /// The command-line name (`no-dedup`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Sabotage::NoDedup => "no-dedup",
            Sabotage::NoResend => "no-resend",
            Sabotage::NoReplay => "no-replay",
            Sabotage::NoFlushBarrier => "no-flush-barrier",
            Sabotage::NoOverlapOrder => "no-overlap-order",
            Sabotage::NoRestartGate => "no-restart-gate",
            Sabotage::NoFlushFrontier => "no-flush-frontier",
            Sabotage::NoOverlapGate => "no-overlap-gate",
            Sabotage::NoDirtyLog => "no-dirty-log",
            Sabotage::NoInSyncGate => "no-in-sync-gate",
            Sabotage::NoFanOut => "no-fan-out",
            Sabotage::NoRoom => "no-room",
            Sabotage::NoFencing => "no-fencing",
            Sabotage::NoLegTimeout => "no-leg-timeout",
            Sabotage::NoErrorFailover => "no-error-failover",
            Sabotage::NoSettle => "no-settle",
            Sabotage::NoUnflushedMarks => "no-unflushed-marks",
            Sabotage::NoOldMapHold => "no-old-map-hold",
            Sabotage::NoBothMapsVouch => "no-both-maps-vouch",
            Sabotage::NoStoreAnchor => "no-store-anchor",
        }
    }

    /// Whether scenario `scenario` exercises the mechanism: a mirror's
    /// own only a scenario with a mirror (the leg timeout is the madsim
    /// driver's), fencing only a volume whose client restarts (it needs
    /// the owner and epoch only a volume's runs send), as does settling;
    /// marks kept until flushed and a log store's anchor a mirror whose
    /// client restarts; the old map's hold, a volume that restarts
    /// mid-switch. The rest any.
    pub fn exercised_by(self, scenario: Scenario) -> bool {
        match self {
            Sabotage::NoFencing | Sabotage::NoSettle => scenario.restarts_its_client(),
            Sabotage::NoUnflushedMarks | Sabotage::NoStoreAnchor => {
                scenario.restarts_its_client() && scenario.runs_a_mirror()
            }
            Sabotage::NoOldMapHold => {
                matches!(
                    scenario,
                    Scenario::MigrateRestart | Scenario::MigrateQuorum | Scenario::MigrateErrors
                )
            }
            Sabotage::NoBothMapsVouch => {
                matches!(scenario, Scenario::MigrateQuorum | Scenario::MigrateErrors)
            }
            Sabotage::NoDirtyLog
            | Sabotage::NoInSyncGate
            | Sabotage::NoFanOut
            | Sabotage::NoLegTimeout
            | Sabotage::NoErrorFailover => scenario.runs_a_mirror(),
            _ => true,
        }
    }

    /// By command-line name.
    pub fn parse(name: &str) -> Option<Sabotage> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Switches the mechanism off in an engine-level world.
    pub fn apply(self, c: &mut WorldConfig) {
        match self {
            Sabotage::NoDedup => c.no_dedup = true,
            Sabotage::NoOverlapGate => c.no_overlap_gate = true,
            client_side => client_side.switch_off(&mut c.sabotage),
        }
    }

    /// Switches the mechanism off in a client configuration (no effect
    /// for a server-side one).
    pub fn apply_client(self, c: &mut ClientConfig) {
        self.switch_off(&mut c.sabotage);
    }

    fn switch_off(self, s: &mut crate::client::Sabotage) {
        match self {
            Sabotage::NoResend => s.no_resend = true,
            Sabotage::NoReplay => s.no_replay = true,
            Sabotage::NoFlushBarrier => s.no_flush_barrier = true,
            Sabotage::NoOverlapOrder => s.no_overlap_order = true,
            Sabotage::NoRestartGate => s.no_restart_gate = true,
            Sabotage::NoFlushFrontier => s.no_flush_frontier = true,
            Sabotage::NoRoom => s.no_room = true,
            Sabotage::NoDedup
            | Sabotage::NoOverlapGate
            | Sabotage::NoFencing
            | Sabotage::NoLegTimeout
            | Sabotage::NoErrorFailover
            | Sabotage::NoDirtyLog
            | Sabotage::NoInSyncGate
            | Sabotage::NoFanOut
            | Sabotage::NoSettle
            | Sabotage::NoUnflushedMarks
            | Sabotage::NoOldMapHold
            | Sabotage::NoBothMapsVouch
            | Sabotage::NoStoreAnchor => {}
        }
    }

    /// Switches the mechanism off in a volume's configuration (no effect
    /// for the others).
    pub fn apply_volume(self, v: &mut crate::volume::VolumeSabotage) {
        match self {
            Sabotage::NoDirtyLog => v.no_dirty_log = true,
            Sabotage::NoInSyncGate => v.no_in_sync_gate = true,
            Sabotage::NoFanOut => v.no_fan_out = true,
            Sabotage::NoErrorFailover => v.no_error_failover = true,
            Sabotage::NoFlushBarrier => v.no_flush_barrier = true,
            Sabotage::NoSettle => v.no_settle = true,
            Sabotage::NoUnflushedMarks => v.no_unflushed_marks = true,
            Sabotage::NoOldMapHold => v.no_old_map_hold = true,
            Sabotage::NoBothMapsVouch => v.no_both_maps_vouch = true,
            Sabotage::NoStoreAnchor => v.no_store_anchor = true,
            _ => {}
        }
    }

    /// Switches the mechanism off in a server configuration (no effect
    /// for a client-side one).
    pub fn apply_server(self, c: &mut ServerConfig) {
        match self {
            Sabotage::NoDedup => c.sabotage_no_dedup = true,
            Sabotage::NoOverlapGate => c.sabotage_no_overlap_gate = true,
            Sabotage::NoFencing => c.sabotage_no_fencing = true,
            _ => {}
        }
    }
}
