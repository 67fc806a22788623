//! `cargo xtask sim`: sweeps seeds of a scenario across all cores, shows
//! progress, and ends with a summary; exits 1 on any violation, naming the
//! command that replays it.

use braid_core::testkit::Report;
use braid_core::testkit::Sabotage;
use braid_sim_tests::{describe, divergence, run_sabotaged, scenario, SCENARIOS};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const USAGE: &str = "\
usage: cargo xtask sim [--seeds N | --seed S] [--first F] [--scenario NAME]
                       [--virtual-secs T] [--check-determinism] [--jobs J]
                       [--sabotage NAME --expect-violation] [--list]

  --seeds N            sweep N seeds (default 100), starting at --first (default 0)
  --seed S             run one seed (replay)
  --scenario NAME      which fault scenario (default all-faults; --list shows them)
  --virtual-secs T     simulated seconds of faulty workload per seed (default 10)
  --check-determinism  run every seed twice and compare trace hashes
  --jobs J             worker threads (default: every core)
  --sabotage A[,B]     switch safety mechanisms off (--list names them)
  --expect-violation   succeed only if some seed finds a violation (with
                       --sabotage: the checks notice the missing mechanism)
";

struct Args {
    first: u64,
    count: u64,
    scenario: String,
    virtual_secs: f64,
    determinism: bool,
    jobs: usize,
    sabotage: Vec<Sabotage>,
    expect_violation: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        first: 0,
        count: 100,
        scenario: "all-faults".into(),
        virtual_secs: 10.0,
        determinism: false,
        sabotage: Vec::new(),
        expect_violation: false,
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--seeds" => a.count = value()?.parse().map_err(|e| format!("--seeds: {e}"))?,
            "--first" => a.first = value()?.parse().map_err(|e| format!("--first: {e}"))?,
            "--seed" => {
                a.first = value()?.parse().map_err(|e| format!("--seed: {e}"))?;
                a.count = 1;
            }
            "--scenario" => a.scenario = value()?,
            "--virtual-secs" => {
                a.virtual_secs = value()?
                    .parse()
                    .map_err(|e| format!("--virtual-secs: {e}"))?
            }
            "--check-determinism" => a.determinism = true,
            "--expect-violation" => a.expect_violation = true,
            "--sabotage" => {
                for name in value()?.split(',') {
                    a.sabotage.push(
                        Sabotage::parse(name)
                            .ok_or_else(|| format!("no sabotage {name:?} (--list names them)"))?,
                    );
                }
            }
            "--jobs" => {
                a.jobs = value()?
                    .parse::<usize>()
                    .map_err(|e| format!("--jobs: {e}"))?
                    .max(1)
            }
            "--list" => {
                println!("scenarios:");
                for (name, what) in SCENARIOS {
                    println!("  {name:<14} {what}");
                }
                println!("sabotage (--sabotage):");
                for s in Sabotage::ALL {
                    println!("  {}", s.name());
                }
                std::process::exit(0);
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other:?}\n{USAGE}")),
        }
    }
    if scenario(&a.scenario, 0, 1.0).is_none() {
        return Err(format!(
            "unknown scenario {:?} (--list shows them)",
            a.scenario
        ));
    }
    Ok(a)
}

struct Outcome {
    report: Report,
    nondeterministic: Option<(u64, u64)>,
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sim: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "SEED={}..{} scenario={} virtual_secs={} jobs={}{}{}",
        args.first,
        args.first + args.count,
        args.scenario,
        args.virtual_secs,
        args.jobs,
        if args.determinism {
            " check-determinism"
        } else {
            ""
        },
        sabotage_flag(&args.sabotage, " sabotage=")
    );
    if args.count == 1 {
        let c = scenario(&args.scenario, args.first, args.virtual_secs).expect("checked");
        println!("world: {}", describe(&c));
    }
    let next = Arc::new(AtomicU64::new(args.first));
    let done = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let end = args.first + args.count;
    let workers: Vec<_> = (0..args.jobs)
        .map(|_| {
            let (next, done, bad, results) =
                (next.clone(), done.clone(), bad.clone(), results.clone());
            let (name, secs, det, sabotage) = (
                args.scenario.clone(),
                args.virtual_secs,
                args.determinism,
                args.sabotage.clone(),
            );
            std::thread::spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let run = |seed| {
                    run_sabotaged(&name, seed, secs, &sabotage).expect("scenario checked above")
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
    while done.load(Ordering::Relaxed) < args.count {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let d = done.load(Ordering::Relaxed);
        let tenth = d * 10 / args.count.max(1);
        if !tty && tenth == last_tenth {
            continue;
        }
        last_tenth = tenth;
        let width = 40;
        let filled = (d * width / args.count.max(1)) as usize;
        eprint!(
            "{}[{}{}] {d}/{} seeds  {:.0}s  failing: {}   {}",
            if tty { "\r" } else { "" },
            "#".repeat(filled),
            ".".repeat(width as usize - filled),
            args.count,
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
    outcomes.sort_by_key(|o| o.report.seed);
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut ios, mut virt, mut failovers, mut resends, mut dups, mut resets, mut replays) =
        (0, 0.0, 0, 0, 0, 0, 0);
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
        for (k, v) in &r.faults {
            *faults.entry(k).or_default() += v;
        }
    }
    let runs = if args.determinism { 2.0 } else { 1.0 };
    println!("seeds                   {}", outcomes.len());
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
    println!(
        "speed                   {:.0} simulated s per wall s, {:.0} seeds per minute (wall {wall:.1}s, {} jobs)",
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
                "as expected, {} of {} seeds found a violation",
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
        let seed = o.report.seed;
        if let Some((a, b)) = o.nondeterministic {
            println!("seed {seed}: NONDETERMINISTIC trace {a:#x} then {b:#x}");
            if let Some(d) = divergence(&args.scenario, seed, args.virtual_secs, &args.sabotage) {
                println!("  {d}");
            }
        }
        for v in o.report.violations.iter().take(3) {
            println!("seed {seed}: {v}");
        }
        if let Some(c) = scenario(&args.scenario, seed, args.virtual_secs) {
            println!("  world: {}", describe(&c));
        }
        println!(
            "  replay: cargo xtask sim --seed {seed} --scenario {} --virtual-secs {}{}",
            args.scenario,
            args.virtual_secs,
            sabotage_flag(&args.sabotage, " --sabotage ")
        );
    }
    ExitCode::FAILURE
}

fn sabotage_flag(list: &[Sabotage], prefix: &str) -> String {
    if list.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = list.iter().map(|s| s.name()).collect();
    format!("{prefix}{}", names.join(","))
}
