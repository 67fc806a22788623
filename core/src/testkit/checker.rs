//! The invariants of `shared/guide/semantics.md`, checked against a model
//! of every IO: which values each sector may hold, which are durable, and
//! which request copies the backend executed.

use super::pattern::{sector_tag, SectorContent, SECTOR};
use crate::wire::Op;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

/// A broken promise, with what is needed to understand it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A read returned a value it may not (invariant 1).
    ReadMismatch {
        /// The read.
        op: u64,
        /// The sector.
        sector: u64,
        /// What came back.
        got: SectorContent,
        /// What could have.
        allowed: Vec<SectorContent>,
    },
    /// The backend executed one request id twice in a session (invariant 2).
    DoubleExecution {
        /// Server boot.
        boot: u64,
        /// Session.
        session: u64,
        /// Request id.
        request: u64,
    },
    /// A write's copy landed after a newer acknowledged write (invariant 2).
    StaleApply {
        /// The sector.
        sector: u64,
        /// The stale write's tag.
        tag: u64,
        /// The newer write it overwrote.
        newer: u64,
    },
    /// After power loss a sector holds less than what was made durable
    /// (invariant 3).
    Durability {
        /// The sector.
        sector: u64,
        /// What the media held.
        got: SectorContent,
        /// What it could have.
        allowed: Vec<SectorContent>,
    },
    /// IO still outstanding after faults healed (invariant 4).
    Liveness {
        /// How many.
        outstanding: usize,
    },
    /// An IO failed though no fault outlasted the IO timeout (invariant 5).
    UnexpectedError {
        /// The IO.
        op: u64,
        /// Its error.
        error: String,
    },
    /// An engine's own consistency check failed (its `check()`): a counter,
    /// index or timer disagrees with the state it summarizes.
    Internal {
        /// Which engine.
        engine: &'static str,
        /// What disagreed.
        what: String,
    },
    /// A configured bound was exceeded (invariant 6).
    Bound {
        /// Which resource.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The bound.
        bound: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::ReadMismatch { op, sector, got, allowed } => {
                write!(f, "read correctness: IO {op} saw {got:?} in sector {sector}, allowed {allowed:?}")
            }
            Violation::DoubleExecution { boot, session, request } => write!(
                f,
                "exactly-once: request {request} of session {session:#x} (boot {boot:#x}) executed twice"
            ),
            Violation::StaleApply { sector, tag, newer } => write!(
                f,
                "exactly-once: stale copy of write {tag} landed on sector {sector} after newer write {newer}"
            ),
            Violation::Durability { sector, got, allowed } => {
                write!(f, "durability: after power loss sector {sector} holds {got:?}, allowed {allowed:?}")
            }
            Violation::Liveness { outstanding } => {
                write!(f, "liveness: {outstanding} IOs still outstanding after faults healed")
            }
            Violation::UnexpectedError { op, error } => {
                write!(f, "no error for transient faults: IO {op} failed: {error}")
            }
            Violation::Internal { engine, what } => write!(f, "internal consistency ({engine}): {what}"),
            Violation::Bound { what, value, bound } => write!(f, "bounded resources: {what} = {value} > {bound}"),
        }
    }
}

#[derive(Debug, Clone)]
struct OpRec {
    op: Op,
    first: u64,
    count: u64,
    content: SectorContent,
    submit: u64,
    ack: Option<u64>,
    failed: bool,
    /// Reads: the possible values of each sector at submission.
    snapshot: Vec<Vec<SectorContent>>,
    /// Flushes: the possible values of every sector at submission, and the
    /// mutations then in flight, which the FLUSH also covers (braid's FLUSH
    /// waits for every mutation submitted before it).
    flush_base: Vec<Vec<Possible>>,
    flush_covers: Vec<u64>,
}

/// (op, content, acknowledged at)
type Possible = (u64, SectorContent, u64);

/// A write a FLUSH covered, as that FLUSH's durable values in one sector
/// see it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Covered {
    /// Answered OK, or never to be answered (its run died): the FLUSH's
    /// answer promised it durable.
    Replaced,
    /// Refused: it replaced nothing.
    Refused,
    /// Not answered yet: taken as replacing until refused.
    Waiting,
}

/// What a FLUSH made durable in one sector while a write it covered was
/// still out: if that write is refused after the FLUSH's answer, what it
/// would have replaced is durable after all.
#[derive(Debug)]
struct DurableUntilRefused {
    sector: usize,
    /// The FLUSH's submission: the sector's `durable_tick` until a later
    /// FLUSH decides it.
    flush_tick: u64,
    /// The values the FLUSH found possible, before any was replaced.
    base: Vec<Possible>,
    /// (op, submitted at, outcome) of each covered write to this sector.
    covers: Vec<(u64, u64, Covered)>,
}

impl DurableUntilRefused {
    /// The durable contents: every value but those a covered write not
    /// refused certainly overwrote (it started after the value was
    /// acknowledged).
    fn durable(&self) -> Vec<SectorContent> {
        self.base
            .iter()
            .filter(|v| {
                !self.covers.iter().any(|&(w, submit, outcome)| {
                    outcome != Covered::Refused && submit > v.2 && w != v.0
                })
            })
            .map(|v| v.1)
            .collect()
    }
}

#[derive(Debug, Clone)]
struct SectorModel {
    possible: Vec<Possible>,
    /// Writes to this sector not yet known to be irrelevant.
    history: Vec<u64>,
    durable: Vec<SectorContent>,
    durable_tick: u64,
}

/// The model and its checks.
#[derive(Debug)]
pub struct Checker {
    tick: u64,
    ops: BTreeMap<u64, OpRec>,
    sectors: Vec<SectorModel>,
    executed: HashSet<(u64, u64, u64)>,
    reads_outstanding: BTreeSet<(u64, u64)>,
    /// Sectors a FLUSH decided while writes it covered were still out.
    durable_until_refused: Vec<DurableUntilRefused>,
    violations: Vec<Violation>,
    /// Errors are expected (injected disk errors, finite IO timeout).
    pub errors_allowed: bool,
    /// Errors whose text contains one of these are expected (and no
    /// others): a mirror whose last leg in sync is full fails writes with
    /// NoSpace, as one full disk does (and with Media where it has bad
    /// blocks).
    pub allowed_errors: Vec<&'static str>,
    /// A read that saw a write not yet acknowledged does not pin that
    /// write: it may still be undone. True for a volume whose client
    /// restarts: legs may disagree on a write in flight at the crash, and
    /// the restart makes them agree on either version (docs/VOLUMES.md).
    pub unacked_reads_may_revert: bool,
    /// `BRAID_TRACE_SECTOR=N`: print every event touching sector N (to
    /// explain a violation found by a sweep).
    trace_sector: Option<u64>,
}

impl Checker {
    /// A model of a zeroed disk of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        let s = SectorModel {
            possible: vec![(0, SectorContent::Zero, 0)],
            history: Vec::new(),
            durable: vec![SectorContent::Zero],
            durable_tick: 0,
        };
        Checker {
            tick: 1,
            ops: BTreeMap::new(),
            sectors: vec![s; sectors as usize],
            executed: HashSet::new(),
            reads_outstanding: BTreeSet::new(),
            durable_until_refused: Vec::new(),
            violations: Vec::new(),
            errors_allowed: false,
            allowed_errors: Vec::new(),
            unacked_reads_may_revert: false,
            trace_sector: std::env::var("BRAID_TRACE_SECTOR")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }

    /// Violations found so far.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Records a violation found outside the model (liveness, bounds).
    pub fn report(&mut self, v: Violation) {
        if self.violations.len() < 100 {
            self.violations.push(v);
        }
    }

    /// IOs submitted and not completed.
    pub fn outstanding(&self) -> usize {
        self.ops
            .values()
            .filter(|o| o.ack.is_none() && !o.failed)
            .count()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Whether an event of `op` on `first..first + count` is traced (a
    /// FLUSH touches every sector). False unless tracing is on, so the
    /// sweeps build no trace text.
    fn traces(&self, op: Op, first: u64, count: u64) -> bool {
        self.trace_sector
            .is_some_and(|t| op == Op::Flush || (t >= first && t < first + count))
    }

    /// Prints a line about the traced sector (see `BRAID_TRACE_SECTOR`).
    pub fn trace(&self, what: std::fmt::Arguments<'_>) {
        if let Some(t) = self.trace_sector {
            let possible = self.sectors.get(t as usize).map(|m| m.possible.clone());
            eprintln!(
                "tick {} sector {t}: {what}   possible now {possible:?}",
                self.tick
            );
        }
    }

    /// The frontend submitted IO `op` (data writes carry tag `op`).
    pub fn submit(&mut self, id: u64, op: Op, offset: u64, len: u32) {
        let tick = self.next_tick();
        let first = offset / SECTOR as u64;
        let count = u64::from(len) / SECTOR as u64;
        if self.traces(op, first, count) {
            self.trace(format_args!("submit {id} {op:?}"));
        }
        let content = match op {
            Op::Write => SectorContent::Tag(id),
            _ => SectorContent::Zero,
        };
        let mut snapshot = Vec::new();
        let mut flush_base = Vec::new();
        let mut flush_covers = Vec::new();
        match op {
            Op::Read => {
                self.reads_outstanding.insert((tick, id));
                snapshot = (first..first + count)
                    .map(|s| self.possible_contents(s))
                    .collect();
            }
            Op::Flush => {
                flush_base = self.sectors.iter().map(|m| m.possible.clone()).collect();
                flush_covers = self
                    .ops
                    .iter()
                    .filter(|(_, o)| o.op.mutates() && o.ack.is_none() && !o.failed)
                    .map(|(id, _)| *id)
                    .collect();
            }
            _ => {}
        }
        if op.mutates() {
            for s in first..first + count {
                self.sectors[s as usize].history.push(id);
            }
        }
        let rec = OpRec {
            op,
            first,
            count,
            content,
            submit: tick,
            ack: None,
            failed: false,
            snapshot,
            flush_base,
            flush_covers,
        };
        self.ops.insert(id, rec);
    }

    fn possible_contents(&self, sector: u64) -> Vec<SectorContent> {
        let mut v: Vec<SectorContent> = self.sectors[sector as usize]
            .possible
            .iter()
            .map(|p| p.1)
            .collect();
        v.dedup();
        v
    }

    /// IO `id` completed; `result` is the read data or an error text.
    pub fn complete(&mut self, id: u64, result: Result<&[u8], String>, fua: bool) {
        let tick = self.next_tick();
        let Some(rec) = self.ops.get(&id).cloned() else {
            return;
        };
        if rec.op == Op::Read {
            self.reads_outstanding.remove(&(rec.submit, id));
        }
        if self.traces(rec.op, rec.first, rec.count) {
            let got = match (&result, self.trace_sector) {
                (Ok(d), Some(t)) if rec.op == Op::Read => {
                    let i = (t - rec.first) as usize;
                    format!("{:?}", sector_tag(&d[i * SECTOR..(i + 1) * SECTOR], t))
                }
                (Ok(_), _) => "ok".into(),
                (Err(e), _) => e.clone(),
            };
            self.trace(format_args!(
                "complete {id} {:?} (submitted tick {}) -> {got}",
                rec.op, rec.submit
            ));
        }
        let data = match result {
            Ok(d) => d,
            Err(error) => {
                let expected =
                    self.errors_allowed || self.allowed_errors.iter().any(|a| error.contains(a));
                if !expected {
                    self.report(Violation::UnexpectedError { op: id, error });
                }
                self.ops.get_mut(&id).unwrap().failed = true;
                if rec.op.mutates() {
                    self.decided(id, true);
                }
                return;
            }
        };
        self.ops.get_mut(&id).unwrap().ack = Some(tick);
        match rec.op {
            Op::Read => self.check_read(id, &rec, data),
            Op::Flush => {
                self.flushed(&rec);
                self.ops.remove(&id);
            }
            _ => {
                self.decided(id, false);
                for s in rec.first..rec.first + rec.count {
                    let m = &mut self.sectors[s as usize];
                    m.possible.retain(|p| p.2 > rec.submit);
                    m.possible.push((id, rec.content, tick));
                    if fua && rec.submit > m.durable_tick {
                        m.durable = m.possible.iter().map(|p| p.1).collect();
                        m.durable_tick = rec.submit;
                    }
                }
            }
        }
        self.prune();
    }

    /// What a completed FLUSH made durable: per sector, the values the
    /// writes submitted before it can have left, in flight ones included.
    fn flushed(&mut self, rec: &OpRec) {
        let mut base = rec.flush_base.clone();
        for w in &rec.flush_covers {
            let Some(o) = self.ops.get(w) else { continue };
            // A covered write the FLUSH overtook still counts as covered:
            // that is the promise being checked.
            let ack = o.ack.unwrap_or(u64::MAX);
            for s in o.first..o.first + o.count {
                base[s as usize].push((*w, o.content, ack));
            }
        }
        for (s, vals) in base.into_iter().enumerate() {
            if rec.submit <= self.sectors[s].durable_tick {
                continue;
            }
            // Only the covered writes to this sector replace anything.
            // One refused replaced nothing: the bytes it would have
            // replaced are still there (engine swarm seed 11901: a write
            // refused for a full disk, the FLUSH submitted while it was
            // out answered just after, and the older write it never
            // replaced was taken for lost). One still out when the FLUSH
            // is answered may yet be refused: `decided` undoes it then.
            let covers: Vec<(u64, u64, Covered)> = rec
                .flush_covers
                .iter()
                .filter(|w| vals.iter().any(|v| v.0 == **w))
                .filter_map(|w| {
                    let o = self.ops.get(w)?;
                    let outcome = if o.failed {
                        Covered::Refused
                    } else if o.ack.is_some() {
                        Covered::Replaced
                    } else {
                        Covered::Waiting
                    };
                    Some((*w, o.submit, outcome))
                })
                .collect();
            let decided = DurableUntilRefused {
                sector: s,
                flush_tick: rec.submit,
                base: vals,
                covers,
            };
            let m = &mut self.sectors[s];
            m.durable = decided.durable();
            m.durable_tick = rec.submit;
            if decided.covers.iter().any(|c| c.2 == Covered::Waiting) {
                self.durable_until_refused.push(decided);
            }
        }
    }

    /// Mutation `id` was answered (or its run died): a FLUSH answered
    /// before it took it as replacing what it overwrote, which holds
    /// unless it was `refused`.
    fn decided(&mut self, id: u64, refused: bool) {
        if self.durable_until_refused.is_empty() {
            return;
        }
        for d in &mut self.durable_until_refused {
            let Some(c) = d.covers.iter_mut().find(|c| c.0 == id) else {
                continue;
            };
            if refused {
                c.2 = Covered::Refused;
                let m = &mut self.sectors[d.sector];
                if m.durable_tick == d.flush_tick {
                    m.durable = d.durable();
                }
            } else {
                c.2 = Covered::Replaced;
            }
        }
        self.durable_until_refused
            .retain(|d| d.covers.iter().any(|c| c.2 == Covered::Waiting));
    }

    fn check_read(&mut self, id: u64, rec: &OpRec, data: &[u8]) {
        for (i, s) in (rec.first..rec.first + rec.count).enumerate() {
            let got = sector_tag(&data[i * SECTOR..(i + 1) * SECTOR], s);
            let mut allowed = rec.snapshot[i].clone();
            for w in &self.sectors[s as usize].history {
                let o = &self.ops[w];
                if o.failed || o.ack.is_none_or(|a| a > rec.submit) {
                    allowed.push(o.content);
                }
            }
            if allowed.contains(&got) {
                self.observed(s, got, rec.submit);
            } else {
                allowed.dedup();
                self.report(Violation::ReadMismatch {
                    op: id,
                    sector: s,
                    got,
                    allowed,
                });
            }
        }
        self.ops.remove(&id);
    }

    /// A read submitted at `submit` saw `got` in `sector`. Every write
    /// acknowledged before then had landed before the read looked, so the
    /// ones it did not see were overwritten, for good: a later read may
    /// see `got` or a write that could still land after the read (one not
    /// yet acknowledged when the read was submitted), never one of those.
    /// Without this narrowing, two overlapping writes that land in one
    /// order and are replayed in the other after a power loss would go
    /// unnoticed.
    fn observed(&mut self, sector: u64, got: SectorContent, submit: u64) {
        let m = &mut self.sectors[sector as usize];
        if self.unacked_reads_may_revert && !m.possible.iter().any(|p| p.1 == got) {
            return;
        }
        m.possible.retain(|p| p.2 > submit || p.1 == got);
    }

    /// Forgets writes no outstanding read or durability check can need.
    fn prune(&mut self) {
        if self.tick % 64 != 0 {
            return;
        }
        let oldest_read = self.reads_outstanding.first().map_or(u64::MAX, |r| r.0);
        let ops = &self.ops;
        let mut live: HashSet<u64> = HashSet::new();
        for m in &mut self.sectors {
            m.history.retain(|w| {
                // Still needed by an outstanding read, or by a durability
                // check (acknowledged after the last durable point).
                let o = &ops[w];
                o.failed
                    || o.ack
                        .is_none_or(|a| a >= oldest_read || a >= m.durable_tick)
            });
            live.extend(m.history.iter().copied());
            live.extend(m.possible.iter().map(|p| p.0));
        }
        self.ops
            .retain(|id, o| live.contains(id) || o.op == Op::Read || o.op == Op::Flush);
    }

    /// The backend is about to execute a mutation: check exactly-once, and
    /// that a data write is not a stale copy of an acknowledged one.
    pub fn backend_mutation(
        &mut self,
        boot: u64,
        session: u64,
        request: u64,
        offset: u64,
        data: Option<&[u8]>,
    ) {
        if !self.executed.insert((boot, session, request)) {
            self.report(Violation::DoubleExecution {
                boot,
                session,
                request,
            });
        }
        let Some(data) = data else { return };
        let first = offset / SECTOR as u64;
        if self.traces(Op::Write, first, (data.len() / SECTOR) as u64) {
            let t = self.trace_sector.unwrap_or(0);
            let i = (t - first) as usize;
            let tag = sector_tag(&data[i * SECTOR..(i + 1) * SECTOR], t);
            self.trace(format_args!(
                "backend lands request {request} of session {session:#x} carrying {tag:?}"
            ));
        }
        for (i, chunk) in data.chunks(SECTOR).enumerate() {
            let s = first + i as u64;
            let SectorContent::Tag(tag) = sector_tag(chunk, s) else {
                continue;
            };
            let Some(acked) = self.ops.get(&tag).and_then(|o| o.ack) else {
                continue;
            };
            let newer = self.sectors[s as usize].history.iter().copied().find(|w| {
                let o = &self.ops[w];
                o.submit > acked && o.ack.is_some()
            });
            if let Some(newer) = newer {
                self.report(Violation::StaleApply {
                    sector: s,
                    tag,
                    newer,
                });
            }
        }
    }

    /// A volume's client died, and no leg lost power: the run's IO still
    /// out never answers, and each of its mutations landed or did not.
    pub fn client_died(&mut self) {
        self.trace(format_args!("CLIENT CRASH"));
        self.run_ended();
    }

    /// A volume's client died: a leg that then loses power loses the
    /// acknowledged writes it had not flushed, with no client left to
    /// replay them, and the restart may take that leg's bytes. So every
    /// acknowledged write no FLUSH made durable may be undone, to any
    /// version since the last durable one, as on one disk that loses
    /// power (the contract for unflushed writes).
    pub fn unflushed_may_revert(&mut self) {
        self.trace(format_args!("CLIENT CRASH: unflushed writes may revert"));
        self.run_ended();
        for m in &mut self.sectors {
            // Any version since the last durable one: a disk that loses
            // power may have written some of its cached writes and not
            // others (madsim mirror-restart seed 622 with power loss).
            let mut since: Vec<SectorContent> = m.durable.clone();
            for w in &m.history {
                let o = &self.ops[w];
                if o.op.mutates() && o.ack.is_some_and(|a| a > m.durable_tick) {
                    since.push(o.content);
                }
            }
            for c in since {
                if !m.possible.iter().any(|p| p.1 == c) {
                    m.possible.push((0, c, 0));
                }
            }
        }
    }

    /// The client process died with IO outstanding: its reads and FLUSHes
    /// never answer, and each of its mutations either landed or did not,
    /// *now*. A later run must not see one land after the run's own
    /// writes to the same sectors (servers fence the dead run's sessions
    /// before the new run uses them), so from here on a mutation of the
    /// dead run counts as finished: possible until overwritten, never in
    /// flight for a read the new run submits.
    fn run_ended(&mut self) {
        let tick = self.next_tick();
        let unanswered: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| o.ack.is_none() && !o.failed)
            .map(|(id, _)| *id)
            .collect();
        for id in unanswered {
            let o = self.ops.get_mut(&id).expect("listed");
            if o.op.mutates() {
                o.ack = Some(tick);
                let (first, count, content) = (o.first, o.count, o.content);
                for s in first..first + count {
                    let m = &mut self.sectors[s as usize];
                    if !m.possible.iter().any(|p| p.1 == content) {
                        m.possible.push((id, content, tick));
                    }
                }
                // A FLUSH answered before it promised it landed.
                self.decided(id, false);
            } else {
                o.failed = true;
                let submit = o.submit;
                self.reads_outstanding.remove(&(submit, id));
            }
        }
    }

    /// The server lost power; `media` is what its disk kept.
    pub fn power_lost(&mut self, media: &[u8]) {
        if let Some(t) = self.trace_sector {
            let got = sector_tag(&media[t as usize * SECTOR..(t as usize + 1) * SECTOR], t);
            self.trace(format_args!("POWER LOSS: media holds {got:?}"));
        }
        for s in 0..self.sectors.len() {
            let got = sector_tag(&media[s * SECTOR..(s + 1) * SECTOR], s as u64);
            let m = &self.sectors[s];
            let mut allowed = m.durable.clone();
            for w in &m.history {
                let o = &self.ops[w];
                if o.failed || o.ack.is_none_or(|a| a > m.durable_tick) {
                    allowed.push(o.content);
                }
            }
            if !allowed.contains(&got) {
                allowed.dedup();
                self.report(Violation::Durability {
                    sector: s as u64,
                    got,
                    allowed,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::stamp;

    /// A FLUSH submitted while a write is out makes that write durable,
    /// and what it replaced gone for good, but only if it succeeds: a
    /// write refused (here for a full disk) replaced nothing, so a power
    /// cut that undoes a later unflushed write leaves the one before. The
    /// write may be answered before the FLUSH or after it: refused after
    /// the FLUSH's answer, it must undo what the FLUSH took it to replace.
    #[test]
    fn a_flush_makes_a_covered_write_durable_only_if_it_succeeded() {
        for (refused, flush_answered_first) in
            [(true, false), (false, false), (true, true), (false, true)]
        {
            let mut c = Checker::new(8);
            c.errors_allowed = true;
            c.submit(1, Op::Write, 0, 512);
            c.complete(1, Ok(&[]), false);
            c.submit(2, Op::Write, 0, 512);
            c.submit(3, Op::Flush, 0, 0);
            let answer = if refused {
                Err("NoSpace".into())
            } else {
                Ok(&[][..])
            };
            if flush_answered_first {
                c.complete(3, Ok(&[]), false);
                c.complete(2, answer, false);
            } else {
                c.complete(2, answer, false);
                c.complete(3, Ok(&[]), false);
            }
            // Overwritten, but not flushed: a power cut may undo it.
            c.submit(4, Op::Write, 0, 512);
            c.complete(4, Ok(&[]), false);
            c.unflushed_may_revert();
            c.submit(5, Op::Read, 0, 512);
            c.complete(5, Ok(&stamp(1, 0, 1)), false);
            assert_eq!(
                c.violations().is_empty(),
                refused,
                "refused {refused}, FLUSH answered first {flush_answered_first}: {:?}",
                c.violations()
            );
        }
    }
}
