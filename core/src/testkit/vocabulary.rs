//! One vocabulary for both simulation levels: the scenarios a sweep runs
//! and the faults a run injects, named the same way whether the engines
//! run in the seeded world here or the real drivers run on madsim. A
//! scenario names the levels that implement it, so asking a level for one
//! it lacks is an error naming the level that has it.

use std::fmt;

/// Where a simulated run executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// The engines in the single-threaded seeded world (`sim-tests`).
    Engine,
    /// The real fabric-tcp drivers on madsim (`fabric-sim`).
    Madsim,
}

impl Level {
    /// The command-line spelling (`cargo xtask sim` or `sim --madsim`).
    pub fn name(self) -> &'static str {
        match self {
            Level::Engine => "engine",
            Level::Madsim => "madsim",
        }
    }

    /// The flag that selects this level in `cargo xtask sim`.
    pub fn flag(self) -> &'static str {
        match self {
            Level::Engine => "",
            Level::Madsim => " --madsim",
        }
    }
}

const BOTH: &[Level] = &[Level::Engine, Level::Madsim];
const ENGINE: &[Level] = &[Level::Engine];
const MADSIM: &[Level] = &[Level::Madsim];

/// A named shape of faulty world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// Every fault class the level has, mixed.
    AllFaults,
    /// No faults.
    Steady,
    /// Lost, duplicated, corrupted and reordered frames.
    Frames,
    /// Channel resets and black holes.
    ChannelChurn,
    /// The server unreachable for a while.
    Partitions,
    /// Server process crashes and restarts.
    Crash,
    /// Server power loss: the disk's volatile cache is lost.
    PowerLoss,
    /// The server process stops running for a while.
    Stalls,
    /// The disk stalls or answers slowly for a while.
    SlowDisk,
    /// Media errors on some blocks.
    DiskErrors,
    /// The disk fills up, then has room again.
    DiskFull,
    /// The client process stops for a while.
    ClientStall,
    /// Every fault class over a single channel.
    OneChannel,
    /// Every fault class at queue depth 64 over a small disk.
    DeepQueue,
    /// The whole shape of the world drawn from the seed.
    Swarm,
    /// The server's clock offset and running fast or slow.
    ClockSkew,
    /// Several clients, two exports, every fault mixed.
    ManyClients,
    /// A volume mirrored over three servers, faults on the legs.
    Mirror,
    /// The mirror, with one leg migrated to a fourth server under faults.
    Migrate,
    /// The mirror, with bad blocks appearing on legs and healing.
    MirrorErrors,
    /// The mirror, with the client killed and restarted mid-run.
    MirrorRestart,
    /// The restarting mirror, acknowledging writes at a quorum of two.
    MirrorQuorum,
    /// The restarting mirror with one leg migrated, each boot opening the
    /// map the last one stored; in half the seeds killed mid-switch.
    MigrateRestart,
    /// The restarting three-way mirror with one leg migrated, writes
    /// acknowledged at a quorum drawn from the seed; in half the seeds
    /// killed mid-switch.
    MigrateQuorum,
    /// `MigrateQuorum` with bad blocks appearing on legs and healing.
    MigrateErrors,
    /// A volume striped over three servers, each the only copy of its
    /// chunks, faults on the legs.
    Stripe,
    /// The stripe, with the client killed and restarted mid-run.
    StripeRestart,
    /// A stripe over two mirrors of two servers each (RAID 10), faults on
    /// the legs.
    StripedMirrors,
    /// A mirror of two servers and a third server's export of another
    /// size, one after another (linear), faults on the legs.
    Linear,
    /// The client's key withdrawn from the server for a while, then given
    /// back, among crashes and partitions.
    KeyWithdrawn,
}

impl Scenario {
    /// Every scenario, at any level.
    pub const ALL: [Scenario; 30] = [
        Scenario::AllFaults,
        Scenario::Steady,
        Scenario::Frames,
        Scenario::ChannelChurn,
        Scenario::Partitions,
        Scenario::Crash,
        Scenario::PowerLoss,
        Scenario::Stalls,
        Scenario::SlowDisk,
        Scenario::DiskErrors,
        Scenario::DiskFull,
        Scenario::ClientStall,
        Scenario::OneChannel,
        Scenario::DeepQueue,
        Scenario::Swarm,
        Scenario::ClockSkew,
        Scenario::ManyClients,
        Scenario::Mirror,
        Scenario::Migrate,
        Scenario::MirrorErrors,
        Scenario::MirrorRestart,
        Scenario::MirrorQuorum,
        Scenario::MigrateRestart,
        Scenario::MigrateQuorum,
        Scenario::MigrateErrors,
        Scenario::Stripe,
        Scenario::StripeRestart,
        Scenario::StripedMirrors,
        Scenario::Linear,
        Scenario::KeyWithdrawn,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::AllFaults => "all-faults",
            Scenario::Steady => "steady",
            Scenario::Frames => "frames",
            Scenario::ChannelChurn => "channel-churn",
            Scenario::Partitions => "partitions",
            Scenario::Crash => "crash",
            Scenario::PowerLoss => "power-loss",
            Scenario::Stalls => "stalls",
            Scenario::SlowDisk => "slow-disk",
            Scenario::DiskErrors => "disk-errors",
            Scenario::DiskFull => "disk-full",
            Scenario::ClientStall => "client-stall",
            Scenario::OneChannel => "one-channel",
            Scenario::DeepQueue => "deep-queue",
            Scenario::Swarm => "swarm",
            Scenario::ClockSkew => "clock-skew",
            Scenario::ManyClients => "many-clients",
            Scenario::Mirror => "mirror",
            Scenario::Migrate => "migrate",
            Scenario::MirrorErrors => "mirror-errors",
            Scenario::MirrorRestart => "mirror-restart",
            Scenario::MirrorQuorum => "mirror-quorum",
            Scenario::MigrateRestart => "migrate-restart",
            Scenario::MigrateQuorum => "migrate-quorum",
            Scenario::MigrateErrors => "migrate-errors",
            Scenario::Stripe => "stripe",
            Scenario::StripeRestart => "stripe-restart",
            Scenario::StripedMirrors => "striped-mirrors",
            Scenario::Linear => "linear",
            Scenario::KeyWithdrawn => "key-withdrawn",
        }
    }

    /// By command-line name.
    pub fn parse(name: &str) -> Option<Scenario> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// What it stresses, for `--list`.
    pub fn about(self) -> &'static str {
        match self {
            Scenario::AllFaults => "every fault class the level has, mixed (the default)",
            Scenario::Steady => "no faults: the baseline every other scenario is compared with",
            Scenario::Frames => "lost, duplicated, corrupted and reordered frames",
            Scenario::ChannelChurn => "channel resets and black holes",
            Scenario::Partitions => {
                "client and server cut off for up to a few seconds (at the madsim level one way, too)"
            }
            Scenario::Crash => "server process crashes and restarts; the disk keeps its cache",
            Scenario::PowerLoss => "server power loss: the disk's volatile cache is lost",
            Scenario::Stalls => "the server process stops running (a long pause), then goes on",
            Scenario::SlowDisk => "the disk stalls or answers in hundreds of ms for a while",
            Scenario::DiskErrors => {
                "media errors on some blocks: clear errors there, nothing lost elsewhere"
            }
            Scenario::DiskFull => "the disk fills up for a while, then has room again",
            Scenario::ClientStall => "the client process stops (a starved daemon), then goes on",
            Scenario::OneChannel => "every fault class with a single channel",
            Scenario::DeepQueue => "every fault class at queue depth 64 over a small disk",
            Scenario::Swarm => {
                "the whole shape drawn from the seed: channels, queue depth, disk size, timers, \
                 server limits, latencies, and which fault classes are on at what rates"
            }
            Scenario::ClockSkew => {
                "every fault class with the server's clock up to an hour ahead, 10% fast or slow"
            }
            Scenario::ManyClients => {
                "three client nodes over two exports (two share one), every fault mixed"
            }
            Scenario::Mirror => {
                "a volume mirrored over three server nodes; legs crash, lose power, are cut off \
                 or stall, overlapping; reads checked, legs converge after"
            }
            Scenario::Migrate => {
                "the mirror, with one leg migrated to a fourth server node mid-run while \
                 every node (the new one too) takes faults; the migration must finish, \
                 reads checked, the final legs converge; in half the seeds the old leg's \
                 server is shut down for good as it retires"
            }
            Scenario::MirrorErrors => {
                "the mirror, with bad blocks appearing on one leg at a time (reads and writes \
                 there fail with media errors) and healing, on top of its other faults; the \
                 volume hides them while another leg is in sync"
            }
            Scenario::MirrorRestart => {
                "the mirror, with the client node killed mid-run and restarted on its dirty \
                 logs (often mid-resync; in half the seeds in the middle of storing them, \
                 each leg's log left new or old): IO in flight is lost, nothing acknowledged \
                 is; in half the seeds killed again as its workers stop, the run after \
                 reading everything back across power cuts"
            }
            Scenario::MirrorQuorum => {
                "mirror-restart with writes acknowledged once two of the three legs have \
                 them: a leg left lagging must not serve the write, nor be trusted after \
                 the restart"
            }
            Scenario::MigrateRestart => {
                "mirror-restart with one leg migrated to a fourth server node: each boot \
                 opens the map the last one stored (the new leg once the switch was stored, \
                 else the old one, and moves it again); in half the seeds the client is \
                 killed mid-switch, its first store of the new map failed and the retry \
                 not yet come, so the next boot must find on the old map every write the \
                 dead one acknowledged or flushed"
            }
            Scenario::MigrateQuorum => {
                "migrate-restart over the three-way mirror, writes acknowledged once one \
                 leg (half the seeds) or two have them: mid-switch, an acknowledgement must \
                 leave a leg of each map holding the write, so that a boot on either map \
                 finds it"
            }
            Scenario::MigrateErrors => {
                "migrate-quorum with bad blocks appearing on one leg at a time and healing, \
                 as in mirror-errors: a leg's refusal meets a switch, a write acknowledged \
                 without a lagging leg, or a boot on logs; the volume hides them while \
                 another leg is in sync"
            }
            Scenario::Stripe => {
                "a volume striped over three server nodes, each the only copy of its chunks; \
                 legs crash, lose power, are cut off, stall or fill, one alone first, and in \
                 half the seeds one moves to a fourth node; IO to a leg that is down waits for \
                 it, IO to the others goes on; reads checked"
            }
            Scenario::StripeRestart => {
                "the stripe, with the client node killed mid-run and restarted (no leg moves): \
                 each leg is the only copy, so what the dead run left in a leg's cache must \
                 be flushed before the new run serves it, and the dead run's late frames \
                 fenced off; nothing acknowledged is lost; the crash at the end as in \
                 mirror-restart"
            }
            Scenario::StripedMirrors => {
                "a volume striped over two mirrors of two server nodes each (RAID 10); every \
                 node takes the stripe's faults, a whole mirror is down at times, and in half \
                 the seeds one node's leg moves to a fifth; IO to the other mirror goes on, \
                 reads checked, each mirror's legs converge after"
            }
            Scenario::Linear => {
                "a volume of a mirror over two server nodes followed (linear) by a third \
                 node's smaller export, the seam and the sizes off every chunk and region; \
                 the stripe's faults, bad blocks on the export (in half the seeds on the \
                 mirror's legs too), IO aimed across the seam, one group down alone first, \
                 in half the seeds one leg moving to a fourth node; IO to the other group \
                 goes on, reads checked, the mirror's legs converge after"
            }
            Scenario::KeyWithdrawn => {
                "the operator withdraws the client's key (its channels close, reconnects are \
                 refused) for up to seconds, sometimes past the session linger, then gives it \
                 back; server crashes and partitions meanwhile; nothing lost or applied twice"
            }
        }
    }

    /// The levels that implement it.
    pub fn levels(self) -> &'static [Level] {
        match self {
            Scenario::AllFaults
            | Scenario::Steady
            | Scenario::Partitions
            | Scenario::Crash
            | Scenario::PowerLoss
            | Scenario::SlowDisk
            | Scenario::DiskErrors
            | Scenario::KeyWithdrawn => BOTH,
            Scenario::Frames
            | Scenario::ChannelChurn
            | Scenario::OneChannel
            | Scenario::DeepQueue
            | Scenario::Swarm
            | Scenario::ClockSkew => ENGINE,
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
            | Scenario::Linear => MADSIM,
        }
    }

    /// Whether it runs a volume (`braid attach --volume`'s driver) over
    /// several servers.
    pub fn runs_a_volume(self) -> bool {
        self.runs_a_mirror() || matches!(self, Scenario::Stripe | Scenario::StripeRestart)
    }

    /// Whether its volume's client is killed and restarted mid-run (so
    /// that its runs fence each other).
    pub fn restarts_its_client(self) -> bool {
        matches!(
            self,
            Scenario::MirrorRestart
                | Scenario::MirrorQuorum
                | Scenario::MigrateRestart
                | Scenario::MigrateQuorum
                | Scenario::MigrateErrors
                | Scenario::StripeRestart
        )
    }

    /// Whether that volume is or holds mirrors, restarted in some, so that
    /// its dirty logs, in-sync gate, fan-out and fencing are exercised (a
    /// stripe has a second copy only while a leg moves).
    pub fn runs_a_mirror(self) -> bool {
        matches!(
            self,
            Scenario::Mirror
                | Scenario::Migrate
                | Scenario::MirrorErrors
                | Scenario::MirrorRestart
                | Scenario::MirrorQuorum
                | Scenario::MigrateRestart
                | Scenario::MigrateQuorum
                | Scenario::MigrateErrors
                | Scenario::StripedMirrors
                | Scenario::Linear
        )
    }

    /// Whether `level` implements it.
    pub fn runs_at(self, level: Level) -> bool {
        self.levels().contains(&level)
    }

    /// Every scenario `level` implements.
    pub fn at(level: Level) -> Vec<Scenario> {
        Self::ALL.into_iter().filter(|s| s.runs_at(level)).collect()
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// A fault a run injected, counted in its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// A frame dropped on the link.
    FrameLost,
    /// A frame's bytes changed on the link.
    FrameCorrupted,
    /// A frame delivered twice.
    FrameDuplicated,
    /// One channel reset.
    ChannelReset,
    /// One channel silently dropping everything.
    ChannelBlackholed,
    /// Client and server cut off from each other both ways.
    Partition,
    /// One direction between client and server cut.
    OneWayLoss,
    /// The server process killed and restarted.
    ServerCrash,
    /// The server killed with its disk's volatile cache lost, restarted.
    PowerLoss,
    /// The server process paused.
    ServerStall,
    /// The disk slow or stalled.
    DiskStall,
    /// The disk out of space.
    DiskFull,
    /// The client process paused.
    ClientStall,
    /// Bad blocks on a disk for a while (media errors there).
    MediaErrors,
    /// The client process killed and restarted.
    ClientCrash,
    /// A killed client's frames held in the network until its next run
    /// had opened its session on that server, then delivered.
    LateFrames,
    /// The client's key withdrawn from the server by its operator for a
    /// while, then given back.
    KeyWithdrawn,
    /// A migrated leg's server shut down for good as soon as the
    /// migration switched over (the operator decommissions it).
    RetiredLegGone,
    /// The client killed part way through storing its legs' dirty logs:
    /// each leg kept its new log or its old one.
    TornLogStore,
    /// The client killed while a migration switched over: the first
    /// store of the new map had failed, its retry not yet come.
    MidSwitchCrash,
}

impl Fault {
    /// How reports name it.
    pub fn name(self) -> &'static str {
        match self {
            Fault::FrameLost => "frame lost",
            Fault::FrameCorrupted => "frame corrupted",
            Fault::FrameDuplicated => "frame duplicated",
            Fault::ChannelReset => "channel reset",
            Fault::ChannelBlackholed => "channel black-holed",
            Fault::Partition => "partition",
            Fault::OneWayLoss => "one-way loss",
            Fault::ServerCrash => "server crash",
            Fault::PowerLoss => "power loss",
            Fault::ServerStall => "server stall",
            Fault::DiskStall => "disk stall",
            Fault::DiskFull => "disk full",
            Fault::ClientStall => "client stall",
            Fault::MediaErrors => "media errors",
            Fault::ClientCrash => "client crash",
            Fault::LateFrames => "dead run's frames late",
            Fault::KeyWithdrawn => "key withdrawn",
            Fault::RetiredLegGone => "retired leg's server gone",
            Fault::TornLogStore => "log store torn",
            Fault::MidSwitchCrash => "client killed mid-switch",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_every_scenario_runs_somewhere() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::parse(s.name()), Some(s));
            assert!(!s.levels().is_empty(), "{s} runs at no level");
            assert!(!s.about().is_empty());
        }
        let mut names: Vec<_> = Scenario::ALL.iter().map(|s| s.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Scenario::ALL.len());
        assert!(Scenario::at(Level::Engine).contains(&Scenario::Swarm));
        assert!(!Scenario::at(Level::Madsim).contains(&Scenario::Swarm));
    }
}
