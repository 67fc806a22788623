//! A checked workload on the client node: workers own disjoint block
//! ranges, so each knows exactly what every read must return: the last
//! write, trim or write-zeroes it saw acknowledged. braid promises that an
//! acknowledged write survives server crashes and power loss (the client
//! replays its unflushed window), so this holds through every fault.
//!
//! A mutation that failed may still have landed, as on any block device:
//! its first copy can reach the disk before the server crashes, and the
//! resend to the restarted server find the disk full. Its blocks then hold
//! the old content or the failed one's until a read says which (the
//! engine-level checker allows the same).

use braid_core::client::{IoErrorKind, IoRequest};
use braid_core::rng::SplitMix64;
use braid_core::testkit::Fault;
use braid_fabric_tcp::Client;
use bytes::Bytes;
use std::time::Duration;

pub(crate) const BLOCK: u64 = 4096;

/// What a worker did and saw.
#[derive(Default)]
pub(crate) struct Outcome {
    pub ios: u64,
    /// Errors where none may happen.
    pub violations: Vec<String>,
    /// Errors expected from media faults.
    pub media_errors: u64,
    /// NO_SPACE errors while the disk was full (expected then).
    pub no_space_errors: u64,
    /// Longest time one IO took, in virtual time.
    pub longest: Duration,
    /// Folded over every completion: equal seeds give equal traces.
    pub trace: u64,
    /// (virtual nanoseconds since the start, `trace`) after each IO, so
    /// two runs that differ can be compared step by step.
    pub steps: Vec<(u64, u64)>,
    /// When each IO was answered (shared workers only), to tell what went
    /// on during a fault elsewhere.
    pub answered_at: Vec<tokio::time::Instant>,
    /// The IOs answered with a media error or a full disk (a private
    /// worker's full disks only), to tell whether the fault was there
    /// then, or a copy elsewhere should have hidden it.
    pub refused: Vec<Failed>,
}

/// An IO that failed: when it was sent and answered, the bytes of the
/// device it covered, and the fault that refuses IO so
/// ([`Fault::MediaErrors`] or [`Fault::DiskFull`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Failed {
    pub began: tokio::time::Instant,
    pub answered: tokio::time::Instant,
    pub offset: u64,
    pub len: u64,
    pub kind: Fault,
}

fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x0100_0000_01b3).rotate_left(17)
}

/// Block content for (block, generation); generation 0 is zeroes.
fn content(block: u64, generation: u64, blocks: u64) -> Vec<u8> {
    if generation == 0 {
        return vec![0; (blocks * BLOCK) as usize];
    }
    let mut v = Vec::with_capacity((blocks * BLOCK) as usize);
    for b in block..block + blocks {
        for _ in 0..BLOCK / 16 {
            v.extend_from_slice(&b.to_le_bytes());
            v.extend_from_slice(&generation.to_le_bytes());
        }
    }
    v
}

/// What one worker does: blocks `first..first + count` are its own; `bad`
/// blocks fail with media errors (and are never checked); with `may_fill`
/// the disk may be full for a while.
pub(crate) struct Plan {
    pub id: u64,
    pub first: u64,
    pub count: u64,
    pub bad: Vec<u64>,
    pub may_fill: bool,
    pub seed: u64,
    pub until: tokio::time::Instant,
}

/// Runs one worker's plan to its end.
pub(crate) async fn worker(client: Client, plan: Plan) -> Outcome {
    let Plan {
        id,
        first,
        count,
        bad,
        may_fill,
        seed,
        until,
    } = plan;
    let mut rng = SplitMix64::new(seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // The generations each block may hold (one, unless a mutation on it
    // failed since a read last looked); a generation names its content.
    let mut model = vec![vec![0u64]; count as usize];
    let mut next_generation = 1u64;
    let mut out = Outcome::default();
    let start = tokio::time::Instant::now();
    while tokio::time::Instant::now() < until {
        let Drawn {
            io,
            at,
            n,
            roll,
            effect,
        } = Drawn::next(&mut rng, first, count, &mut next_generation);
        let (offset, len) = ((first + at) * BLOCK, (n * BLOCK) as u32);
        let touches_bad = (first + at..first + at + n).any(|b| bad.contains(&b));
        let op = io.op;
        let expect_error = touches_bad && !(75..=84).contains(&roll);
        let began = tokio::time::Instant::now();
        let result = client.io(io).await;
        out.longest = out.longest.max(began.elapsed());
        out.ios += 1;
        let since = began.duration_since(start).as_nanos() as u64;
        out.trace = mix(mix(out.trace, since), roll ^ (at << 8) ^ (n << 40));
        out.steps.push((since, out.trace));
        match result {
            Ok(data) => {
                if expect_error {
                    out.violations.push(format!(
                        "worker {id}: {op:?} at {offset} touching a bad range succeeded"
                    ));
                }
                if let Some(generation) = effect {
                    for b in 0..n {
                        model[(at + b) as usize] = vec![generation];
                    }
                } else if roll < 40 && !touches_bad {
                    for wrong in read_back(&mut model, first, (at, n), &data) {
                        out.violations.push(format!("worker {id}: {wrong}"));
                    }
                    out.trace = mix(out.trace, data.iter().map(|x| u64::from(*x)).sum());
                }
            }
            // The disk checks the whole range before changing anything, but
            // an earlier copy of the mutation may have landed (see above).
            Err(e) if expect_error && e.kind == IoErrorKind::Media => {
                out.media_errors += 1;
                may_have_landed(&mut model, at, n, effect);
            }
            // A full disk fails that one mutation; the error is the disk's,
            // so it must reach the caller.
            Err(e) if may_fill && effect.is_some() && e.kind == IoErrorKind::NoSpace => {
                out.no_space_errors += 1;
                out.refused.push(Failed {
                    began,
                    answered: tokio::time::Instant::now(),
                    offset,
                    len: u64::from(len),
                    kind: Fault::DiskFull,
                });
                may_have_landed(&mut model, at, n, effect);
            }
            Err(e) => out
                .violations
                .push(format!("worker {id}: error surfaced: {e}")),
        }
    }
    out
}

/// A private worker's next IO: `n` blocks at `at` in its range, the
/// roll that chose the op, and the generation a mutation leaves there
/// (0 for zeroes; none for a read or a FLUSH).
struct Drawn {
    io: IoRequest,
    at: u64,
    n: u64,
    roll: u64,
    effect: Option<u64>,
}

impl Drawn {
    fn next(rng: &mut SplitMix64, first: u64, count: u64, next_generation: &mut u64) -> Drawn {
        let n = 1 + rng.below(4).min(count - 1);
        let at = rng.below(count - n + 1);
        let (offset, len) = ((first + at) * BLOCK, (n * BLOCK) as u32);
        let roll = rng.below(100);
        let (io, effect) = match roll {
            0..=39 => (IoRequest::read(offset, len), None),
            40..=74 => {
                let generation = *next_generation;
                *next_generation += 1;
                // A write's content is generation-stamped per block.
                let mut data = Vec::with_capacity(len as usize);
                for b in 0..n {
                    data.extend(content(first + at + b, generation, 1));
                }
                let fua = rng.chance(0.2);
                (
                    IoRequest::write(offset, Bytes::from(data), fua),
                    Some(generation),
                )
            }
            75..=84 => (IoRequest::flush(), None),
            85..=92 => (IoRequest::trim(offset, len), Some(0)),
            _ => (
                IoRequest::write_zeroes(offset, len, rng.chance(0.3)),
                Some(0),
            ),
        };
        Drawn {
            io,
            at,
            n,
            roll,
            effect,
        }
    }
}

/// Checks what a read of blocks `at..at + n` of the range from `first`
/// gave against the generations each may hold, and pins those it saw;
/// says which blocks held none of them.
fn read_back(model: &mut [Vec<u64>], first: u64, (at, n): (u64, u64), data: &[u8]) -> Vec<String> {
    let mut wrong = Vec::new();
    for b in 0..n {
        let may = &mut model[(at + b) as usize];
        let got = &data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
        match may
            .iter()
            .find(|g| got == &content(first + at + b, **g, 1)[..])
        {
            // Seen: the other candidates were overwritten.
            Some(&seen) => *may = vec![seen],
            None => wrong.push(format!(
                "block {} read back something other than generation {may:?}",
                first + at + b,
            )),
        }
    }
    wrong
}

/// A mutation of blocks `at..at + n` failed: they may hold its content too.
fn may_have_landed(model: &mut [Vec<u64>], at: u64, n: u64, effect: Option<u64>) {
    let Some(generation) = effect else { return };
    for may in &mut model[at as usize..(at + n) as usize] {
        if !may.contains(&generation) {
            may.push(generation);
        }
    }
}

/// Sectors of the zone every shared worker of one client writes and reads
/// at once (the last blocks of the export).
pub(crate) const SHARED_ZONE_BLOCKS: u64 = 2;

/// One worker of several that share a zone: their IOs overlap while in
/// flight, as a filesystem's or database's do with O_DIRECT, so what a read
/// may return is judged by the engine-level checker's model of every IO
/// (acknowledged, in flight, and what earlier reads saw).
pub(crate) struct SharedPlan {
    pub id: u64,
    /// First byte of the zone on the export.
    pub zone_start: u64,
    /// Its size in sectors.
    pub zone_sectors: u64,
    pub checker: std::sync::Arc<std::sync::Mutex<braid_core::testkit::Checker>>,
    /// Numbers IOs across the workers of one zone (the checker's ids).
    pub next_io: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub seed: u64,
    pub until: tokio::time::Instant,
    /// Whether it sends FLUSHes, which reach every leg of a volume: a
    /// worker that should touch one leg only sends reads there instead.
    pub flushes: bool,
    /// Sectors of the zone where IO splits between groups of legs and
    /// which IOs at random offsets would rarely cross: a quarter of the
    /// IOs of two sectors or more are put across one.
    pub seams: Vec<u64>,
    /// Where its refused IOs go as they are answered, if not in its
    /// outcome: outside a client node that may die before the worker
    /// ends, so the judge still sees them.
    pub refusals_to: Option<std::sync::Arc<std::sync::Mutex<Vec<Failed>>>>,
}

/// The checker's findings as an outcome, each prefixed with `what`.
pub(crate) fn checker_outcome(
    checker: &std::sync::Mutex<braid_core::testkit::Checker>,
    what: &str,
) -> Outcome {
    Outcome {
        violations: checker
            .lock()
            .unwrap()
            .violations()
            .iter()
            .map(|v| format!("{what}: {v}"))
            .collect(),
        ..Outcome::default()
    }
}

/// A block device a shared worker drives: one export's client, or a
/// volume over several.
pub(crate) trait Device: Clone + Send + Sync + 'static {
    fn io(&self, io: IoRequest) -> impl std::future::Future<Output = Result<Bytes, String>> + Send;
}

impl Device for Client {
    async fn io(&self, io: IoRequest) -> Result<Bytes, String> {
        Client::io(self, io).await.map_err(|e| e.to_string())
    }
}

impl Device for braid_fabric_tcp::Volume {
    async fn io(&self, io: IoRequest) -> Result<Bytes, String> {
        braid_fabric_tcp::Volume::io(self, io)
            .await
            .map_err(|e| format!("{e:?}"))
    }
}

pub(crate) async fn shared_worker<D: Device>(client: D, plan: SharedPlan) -> Outcome {
    use braid_core::testkit::{stamp, SECTOR};
    use std::sync::atomic::Ordering;
    let sectors = plan.zone_sectors;
    let mut rng = SplitMix64::new(plan.seed ^ plan.id.wrapping_mul(0xa076_1d64_78bd_642f));
    let mut out = Outcome::default();
    let start = tokio::time::Instant::now();
    while tokio::time::Instant::now() < plan.until {
        let io_id = plan.next_io.fetch_add(1, Ordering::Relaxed);
        let count = 1 + rng.below(8);
        let first = match plan.seams.as_slice() {
            seams if count > 1 && !seams.is_empty() && rng.below(4) == 0 => {
                let seam = seams[rng.below(seams.len() as u64) as usize];
                // Sectors seam - 1 and seam both in the IO.
                (seam + 1 + rng.below(count - 1))
                    .saturating_sub(count)
                    .min(sectors - count)
            }
            _ => rng.below(sectors - count + 1),
        };
        let (rel, len) = (first * SECTOR as u64, (count as usize * SECTOR) as u32);
        let offset = plan.zone_start + rel;
        let roll = rng.below(100);
        let io = match roll {
            0..=39 => IoRequest::read(offset, len),
            40..=69 => IoRequest::write(offset, stamp(io_id, first, count), false),
            70..=77 => IoRequest::write(offset, stamp(io_id, first, count), true),
            78..=85 if plan.flushes => IoRequest::flush(),
            78..=85 => IoRequest::read(offset, len),
            86..=92 => IoRequest::trim(offset, len),
            _ => IoRequest::write_zeroes(offset, len, rng.chance(0.3)),
        };
        let (op, fua) = (io.op, io.fua);
        let (c_off, c_len) = if op == braid_core::wire::Op::Flush {
            (0, 0)
        } else {
            (rel, len)
        };
        plan.checker.lock().unwrap().submit(io_id, op, c_off, c_len);
        let began = tokio::time::Instant::now();
        let result = Device::io(&client, io).await;
        out.ios += 1;
        let answered = tokio::time::Instant::now();
        out.longest = out.longest.max(answered - began);
        out.answered_at.push(answered);
        let since = answered.duration_since(start).as_nanos() as u64;
        out.trace = mix(mix(out.trace, since), roll ^ (first << 8) ^ (count << 40));
        out.steps.push((since, out.trace));
        // Whether an error was allowed is the checker's to say (by its
        // kind's name, as here); these count what reached the caller, for
        // the sweep's totals.
        if let Err(e) = &result {
            out.media_errors += u64::from(e.contains("Media"));
            out.no_space_errors += u64::from(e.contains("NoSpace"));
            let kind = if e.contains("Media") {
                Some(Fault::MediaErrors)
            } else if e.contains("NoSpace") {
                Some(Fault::DiskFull)
            } else {
                None
            };
            if let Some(kind) = kind {
                let failed = Failed {
                    began,
                    answered,
                    offset: plan.zone_start + c_off,
                    len: u64::from(c_len),
                    kind,
                };
                match &plan.refusals_to {
                    Some(to) => to.lock().unwrap().push(failed),
                    None => out.refused.push(failed),
                }
            }
        }
        let mut checker = plan.checker.lock().unwrap();
        match &result {
            Ok(data) => checker.complete(io_id, Ok(&data[..]), fua),
            Err(e) => checker.complete(io_id, Err(e.clone()), fua),
        }
    }
    out
}
