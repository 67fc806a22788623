//! `cargo xtask sim`: sweeps seeds of scenarios across all cores, shows
//! progress, and ends with a summary; exits 1 on any violation, naming the
//! command that replays it. The flags are the madsim sweep's too
//! ([`SweepArgs`]).

use braid_core::testkit::{Level, Report, Scenario, SweepArgs, SweepCommand};
use braid_sim_tests::{describe, divergence, run_with_engines, scenario};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

struct Outcome {
    scenario: Scenario,
    report: Report,
    nondeterministic: Option<(u64, u64)>,
}

fn main() -> ExitCode {
    let args = match SweepArgs::parse(Level::Engine, std::env::args().skip(1)) {
        Ok(SweepCommand::Run(a)) => a,
        Ok(SweepCommand::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("sim: {e}\n{}", braid_core::testkit::SWEEP_USAGE);
            return ExitCode::from(2);
        }
    };
    println!("{}", args.banner());
    let runs = args.runs();
    if let [(sc, seed)] = runs[..] {
        let c = scenario(sc, seed, args.virtual_secs).expect("parse checked the level");
        println!("world: {}", describe(&c));
    }
    let started = Instant::now();
    let mut outcomes = run_all(&args, runs);
    let wall = started.elapsed().as_secs_f64();
    outcomes.sort_by_key(|o| (o.scenario, o.report.seed));
    let traces = outcomes.iter().map(|o| {
        let r = &o.report;
        (o.scenario, r.seed, r.trace_hash, r.ios)
    });
    if let Err(e) = args.write_traces(traces) {
        eprintln!("sim: {e}");
        return ExitCode::from(2);
    }
    Totals::of(&outcomes).print(&args, wall);
    let failing: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.report.violations.is_empty() || o.nondeterministic.is_some())
        .collect();
    println!(
        "violations              {}",
        failing
            .iter()
            .map(|o| o.report.violations.len())
            .sum::<usize>()
    );
    if args.expect_violation {
        return if failing.is_empty() {
            println!("expected a violation, found none");
            ExitCode::FAILURE
        } else {
            println!(
                "as expected, {} of {} runs found a violation",
                failing.len(),
                outcomes.len()
            );
            ExitCode::SUCCESS
        };
    }
    if failing.is_empty() {
        return ExitCode::SUCCESS;
    }
    for o in failing.iter().take(20) {
        explain(o, &args);
    }
    ExitCode::FAILURE
}

/// Every run on `args.jobs` threads (each seed twice with
/// `--check-determinism`), with a progress bar.
fn run_all(args: &SweepArgs, runs: Vec<(Scenario, u64)>) -> Vec<Outcome> {
    let total = runs.len() as u64;
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let bad = AtomicU64::new(0);
    let results: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.jobs {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(sc, seed)) = runs.get(i as usize) else {
                    return;
                };
                let outcome = run_one(args, sc, seed);
                if !outcome.report.violations.is_empty() || outcome.nondeterministic.is_some() {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                results.lock().unwrap().push(outcome);
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
        show_progress(total, &done, &bad, started);
    });
    results.into_inner().unwrap()
}

/// One run of `sc` from `seed`, and again to compare traces with
/// `--check-determinism`.
fn run_one(args: &SweepArgs, sc: Scenario, seed: u64) -> Outcome {
    let run = |seed| {
        run_with_engines(sc, seed, args.virtual_secs, &args.sabotage, args.engines)
            .expect("parse checked the level")
    };
    let report = run(seed);
    let nondeterministic = if args.determinism {
        let again = run(seed);
        (again.trace_hash != report.trace_hash).then_some((report.trace_hash, again.trace_hash))
    } else {
        None
    };
    Outcome {
        scenario: sc,
        report,
        nondeterministic,
    }
}

/// A bar on a terminal; in a log (CI), a line per tenth of the sweep.
/// Returns once `done` reaches `total`.
fn show_progress(total: u64, done: &AtomicU64, bad: &AtomicU64, started: Instant) {
    let tty = std::io::stderr().is_terminal();
    let mut last_tenth = 0;
    while done.load(Ordering::Relaxed) < total {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let d = done.load(Ordering::Relaxed);
        let tenth = d * 10 / total.max(1);
        if !tty && tenth == last_tenth {
            continue;
        }
        last_tenth = tenth;
        let width = 40;
        let filled = (d * width / total.max(1)) as usize;
        eprint!(
            "{}[{}{}] {d}/{} runs  {:.0}s  failing: {}   {}",
            if tty { "\r" } else { "" },
            "#".repeat(filled),
            ".".repeat(width as usize - filled),
            total,
            started.elapsed().as_secs_f64(),
            bad.load(Ordering::Relaxed),
            if tty { "" } else { "\n" },
        );
        let _ = std::io::stderr().flush();
    }
    if tty {
        eprintln!();
    }
}

/// What the whole sweep did.
#[derive(Default)]
struct Totals {
    runs: usize,
    ios: u64,
    virtual_secs: f64,
    faults: BTreeMap<braid_core::testkit::Fault, u64>,
    failovers: u64,
    resends: u64,
    duplicates: u64,
    session_resets: u64,
    replays: u64,
    revoked: u64,
}

impl Totals {
    fn of(outcomes: &[Outcome]) -> Totals {
        let mut t = Totals {
            runs: outcomes.len(),
            ..Totals::default()
        };
        for o in outcomes {
            let r = &o.report;
            t.ios += r.ios;
            t.virtual_secs += r.virtual_time.as_secs_f64();
            t.failovers += r.client.failovers;
            t.resends += r.client.resends;
            t.duplicates += r.client.duplicates_dropped
                + r.server.recorded_replies
                + r.server.joined
                + r.server.stale_dropped;
            t.session_resets += r.client.session_resets;
            t.replays += r.client.replayed_extents;
            t.revoked += r.server.channels_revoked;
            for (k, v) in &r.faults {
                *t.faults.entry(*k).or_default() += v;
            }
        }
        t
    }

    fn print(&self, args: &SweepArgs, wall: f64) {
        let each = if args.determinism { 2.0 } else { 1.0 };
        println!("runs                    {}", self.runs);
        println!("virtual seconds         {:.0}", self.virtual_secs);
        println!("IOs checked             {}", self.ios);
        for (k, v) in &self.faults {
            println!("fault: {k:<17} {v}");
        }
        println!("requests failed over    {}", self.failovers);
        println!("requests resent         {}", self.resends);
        println!("duplicates dropped      {}", self.duplicates);
        println!("server sessions replaced {}", self.session_resets);
        println!("unflushed extents replayed {}", self.replays);
        println!("channels closed, key withdrawn {}", self.revoked);
        println!(
            "speed                   {:.0} simulated s per wall s, {:.0} runs per minute (wall {wall:.1}s, {} jobs)",
            self.virtual_secs * each / wall,
            self.runs as f64 * 60.0 / wall,
            args.jobs
        );
    }
}

/// A failing run: its violations (or where its two traces part), its
/// world, and the command that replays it.
fn explain(o: &Outcome, args: &SweepArgs) {
    let (sc, seed) = (o.scenario, o.report.seed);
    if let Some((a, b)) = o.nondeterministic {
        println!("{sc} seed {seed}: NONDETERMINISTIC trace {a:#x} then {b:#x}");
        if let Some(d) = divergence(sc, seed, args.virtual_secs, &args.sabotage, args.engines) {
            println!("  {d}");
        }
    }
    for v in o.report.violations.iter().take(3) {
        println!("{sc} seed {seed}: {v}");
    }
    if let Some(c) = scenario(sc, seed, args.virtual_secs) {
        println!("  world: {}", describe(&c));
    }
    println!("  replay: {}", args.replay(sc, seed));
}
