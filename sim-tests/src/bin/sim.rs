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
use std::sync::{Arc, Mutex};
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
    let runs = Arc::new(args.runs());
    if let [(sc, seed)] = runs[..] {
        let c = scenario(sc, seed, args.virtual_secs).expect("parse checked the level");
        println!("world: {}", describe(&c));
    }
    let total = runs.len() as u64;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.jobs)
        .map(|_| {
            let (next, done, bad, results, runs) = (
                next.clone(),
                done.clone(),
                bad.clone(),
                results.clone(),
                runs.clone(),
            );
            let (secs, det, sabotage, engines) = (
                args.virtual_secs,
                args.determinism,
                args.sabotage.clone(),
                args.engines,
            );
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(sc, seed)) = runs.get(i as usize) else {
                    return;
                };
                let run = |seed| {
                    run_with_engines(sc, seed, secs, &sabotage, engines)
                        .expect("parse checked the level")
                };
                let report = run(seed);
                let nondeterministic = if det {
                    let again = run(seed);
                    (again.trace_hash != report.trace_hash)
                        .then_some((report.trace_hash, again.trace_hash))
                } else {
                    None
                };
                if !report.violations.is_empty() || nondeterministic.is_some() {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                results.lock().unwrap().push(Outcome {
                    scenario: sc,
                    report,
                    nondeterministic,
                });
                done.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    // A bar on a terminal; in a log (CI), a line per tenth of the sweep.
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
    for w in workers {
        let _ = w.join();
    }
    if tty {
        eprintln!();
    }
    let wall = started.elapsed().as_secs_f64();
    let mut outcomes = std::mem::take(&mut *results.lock().unwrap());
    outcomes.sort_by_key(|o| (o.scenario, o.report.seed));
    let mut faults: BTreeMap<braid_core::testkit::Fault, u64> = BTreeMap::new();
    let (mut ios, mut virt, mut failovers, mut resends, mut dups, mut resets, mut replays) =
        (0, 0.0, 0, 0, 0, 0, 0);
    let mut revoked = 0;
    for o in &outcomes {
        let r = &o.report;
        ios += r.ios;
        virt += r.virtual_time.as_secs_f64();
        failovers += r.client.failovers;
        resends += r.client.resends;
        dups += r.client.duplicates_dropped
            + r.server.recorded_replies
            + r.server.joined
            + r.server.stale_dropped;
        resets += r.client.session_resets;
        replays += r.client.replayed_extents;
        revoked += r.server.channels_revoked;
        for (k, v) in &r.faults {
            *faults.entry(*k).or_default() += v;
        }
    }
    let runs = if args.determinism { 2.0 } else { 1.0 };
    println!("runs                    {}", outcomes.len());
    println!("virtual seconds         {virt:.0}");
    println!("IOs checked             {ios}");
    for (k, v) in &faults {
        println!("fault: {k:<17} {v}");
    }
    println!("requests failed over    {failovers}");
    println!("requests resent         {resends}");
    println!("duplicates dropped      {dups}");
    println!("server sessions replaced {resets}");
    println!("unflushed extents replayed {replays}");
    println!("channels closed, key withdrawn {revoked}");
    println!(
        "speed                   {:.0} simulated s per wall s, {:.0} runs per minute (wall {wall:.1}s, {} jobs)",
        virt * runs / wall,
        outcomes.len() as f64 * 60.0 / wall,
        args.jobs
    );
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
    ExitCode::FAILURE
}
