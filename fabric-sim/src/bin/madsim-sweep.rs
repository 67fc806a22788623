//! Seeded sweeps of the madsim world: `cargo xtask sim --madsim`, with the
//! engine sweep's flags (`SweepArgs`).

#[cfg(not(madsim))]
fn main() {
    eprintln!(
        "madsim-sweep must be built with --cfg madsim: use `cargo xtask sim --madsim`, which sets \
         RUSTFLAGS=\"--cfg madsim\" and CARGO_TARGET_DIR=target/madsim"
    );
    std::process::exit(2);
}

#[cfg(madsim)]
fn main() {
    std::process::exit(sweep::main());
}

#[cfg(madsim)]
mod sweep {
    use braid_core::testkit::{
        Fault, Level, Sabotage, Scenario, SweepArgs, SweepCommand, SWEEP_USAGE,
    };
    use braid_fabric_sim::{first_divergence, run_with_engines, Report};
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::time::{Duration, Instant};

    pub(crate) fn main() -> i32 {
        // The drivers' own logs (leg states, resyncs, migrations), in
        // order with the checker's trace; a polling task would change the
        // schedule being traced.
        if std::env::var_os("BRAID_TRACE_VOLUME").is_some() {
            let detail = std::env::var("BRAID_TRACE_VOLUME").is_ok_and(|v| v == "trace");
            use tracing_subscriber::filter::LevelFilter;
            tracing_subscriber::fmt()
                .with_max_level(if detail {
                    LevelFilter::TRACE
                } else {
                    LevelFilter::INFO
                })
                .with_writer(std::io::stderr)
                .without_time()
                .with_ansi(false)
                .with_target(false)
                .init();
        }
        let args = match SweepArgs::parse(Level::Madsim, std::env::args().skip(1)) {
            Ok(SweepCommand::Run(a)) => a,
            Ok(SweepCommand::Print(text)) => {
                print!("{text}");
                return 0;
            }
            Err(e) => {
                eprintln!("madsim-sweep: {e}\n{SWEEP_USAGE}");
                return 2;
            }
        };
        let SweepArgs {
            jobs,
            determinism,
            expect_violation,
            virtual_secs: secs,
            engines,
            ..
        } = args;
        let sabotage = args.sabotage.clone();
        // A panicking run is reported with its seed in the summary; the
        // default hook's backtrace per run would bury it.
        std::panic::set_hook(Box::new(|_| {}));
        let runs = args.runs();
        println!("{} (real fabric-tcp drivers)", args.banner());
        let started = Instant::now();
        let mut failures: Vec<(usize, Report, Vec<String>)> = Vec::new();
        let mut totals = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        let mut revoked = 0u64;
        let mut volume_totals = (0u64, 0u64, 0u64);
        let mut expected_errors = (0u64, 0u64);
        let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
        let mut longest = Duration::ZERO;
        let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Report, Vec<String>)>();
        std::thread::scope(|scope| {
            for _ in 0..jobs {
                let (tx, next, runs, sabotage) = (tx.clone(), &next, &runs, &sabotage);
                scope.spawn(move || loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(scenario, seed)) = runs.get(i) else {
                        break;
                    };
                    let report = catch(scenario, seed, secs, sabotage, engines);
                    let mut problems = report.violations.clone();
                    if determinism && problems.is_empty() {
                        let again = catch(scenario, seed, secs, sabotage, engines);
                        if (again.trace_hash, again.ios) != (report.trace_hash, report.ios) {
                            problems.push(format!(
                                "nondeterminism: trace {:#x}/{} IOs, then {:#x}/{} IOs; {}",
                                report.trace_hash,
                                report.ios,
                                again.trace_hash,
                                again.ios,
                                first_divergence(&report, &again).unwrap_or_else(|| {
                                    "the steps agree (only totals differ)".into()
                                })
                            ));
                        }
                    }
                    if tx.send((i, report, problems)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (done, (i, report, problems)) in rx.iter().enumerate() {
                totals.0 += report.ios;
                expected_errors.0 += report.media_errors;
                expected_errors.1 += report.no_space_errors;
                totals.1 += report.resends;
                totals.2 += report.failovers;
                totals.3 += report.duplicates_dropped;
                totals.4 += report.session_resets;
                totals.5 += report.replayed_extents;
                revoked += report.channels_revoked;
                volume_totals.0 += report.legs_left;
                volume_totals.1 += report.regions_resynced;
                volume_totals.2 += report.migrations;
                longest = longest.max(report.longest_io);
                for (k, v) in &report.faults {
                    *faults.entry(*k).or_insert(0) += v;
                }
                if !problems.is_empty() {
                    failures.push((i, report, problems));
                }
                let done = done + 1;
                // A bar on a terminal; in a log, a line per tenth.
                if !tty && done * 10 / runs.len() == (done - 1) * 10 / runs.len() {
                    continue;
                }
                let width = 30;
                let filled = done * width / runs.len();
                print!(
                    "{}[{}{}] {done}/{} runs, {} violations, {:.0}s{}",
                    if tty { "\r" } else { "" },
                    "#".repeat(filled),
                    " ".repeat(width - filled),
                    runs.len(),
                    failures.len(),
                    started.elapsed().as_secs_f64(),
                    if tty { "" } else { "\n" },
                );
                let _ = std::io::stdout().flush();
            }
        });
        failures.sort_by_key(|f| f.0);
        println!();
        let wall = started.elapsed().as_secs_f64();
        let virtual_total = runs.len() as f64 * secs * if determinism { 2.0 } else { 1.0 };
        println!("IOs checked              {}", totals.0);
        for (k, v) in &faults {
            println!("fault: {k:<19} {v}");
        }
        println!(
            "expected errors          {} media (bad blocks), {} no space (disk full)",
            expected_errors.0, expected_errors.1
        );
        println!("requests resent          {}", totals.1);
        println!("requests failed over     {}", totals.2);
        println!("duplicates dropped       {}", totals.3);
        println!("sessions replaced        {}", totals.4);
        println!("extents replayed         {}", totals.5);
        if revoked > 0 {
            println!("channels closed, key withdrawn {revoked}");
        }
        if volume_totals != (0, 0, 0) {
            println!("volume legs left behind  {}", volume_totals.0);
            println!("volume regions resynced  {}", volume_totals.1);
            println!("volume legs migrated     {}", volume_totals.2);
        }
        println!("slowest IO               {longest:?} (virtual)");
        println!(
            "speed                    {:.1} simulated s per wall s, {:.0} runs/min",
            virtual_total / wall,
            runs.len() as f64 * 60.0 / wall
        );
        println!("violations               {}", failures.len());
        for (_, r, problems) in &failures {
            println!("\nFAILED scenario {} seed {}:", r.scenario.name(), r.seed);
            for p in problems.iter().take(if expect_violation { 2 } else { 5 }) {
                println!("  {p}");
            }
            println!("  replay: {}", args.replay(r.scenario, r.seed));
        }
        if expect_violation {
            // Teeth: with a safety mechanism off, the sweep must notice.
            if failures.is_empty() {
                println!("expected a violation with {sabotage:?} switched off, found none");
                return 1;
            }
            println!("as expected, switching off {sabotage:?} was caught");
            return 0;
        }
        i32::from(!failures.is_empty())
    }

    /// A run that panics (a deadlock hitting the time limit, a driver
    /// bug) is a failed run, not a failed sweep.
    fn catch(
        scenario: Scenario,
        seed: u64,
        secs: f64,
        sabotage: &[Sabotage],
        engines: usize,
    ) -> Report {
        std::panic::catch_unwind(|| run_with_engines(scenario, seed, secs, sabotage, engines))
            .unwrap_or_else(|e| {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Report {
                    violations: vec![format!("panicked: {msg}")],
                    ..Report::empty(seed, scenario)
                }
            })
    }
}
