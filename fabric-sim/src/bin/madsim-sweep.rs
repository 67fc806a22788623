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
        init_tracing();
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
        // A panicking run is reported with its seed in the summary; the
        // default hook's backtrace per run would bury it.
        std::panic::set_hook(Box::new(|_| {}));
        let runs = args.runs();
        println!("{} (real fabric-tcp drivers)", args.banner());
        let started = Instant::now();
        let (totals, mut failures) = run_all(&args, &runs, started);
        failures.sort_by_key(|f| f.0);
        println!();
        if let Err(e) = args.write_traces(totals.traces.iter().copied()) {
            eprintln!("madsim-sweep: {e}");
            return 2;
        }
        let wall = started.elapsed().as_secs_f64();
        let each = if args.determinism { 2.0 } else { 1.0 };
        totals.print();
        println!(
            "speed                    {:.1} simulated s per wall s, {:.0} runs/min",
            runs.len() as f64 * args.virtual_secs * each / wall,
            runs.len() as f64 * 60.0 / wall
        );
        println!("violations               {}", failures.len());
        for (_, r, problems) in &failures {
            println!("\nFAILED scenario {} seed {}:", r.scenario.name(), r.seed);
            for p in problems
                .iter()
                .take(if args.expect_violation { 2 } else { 5 })
            {
                println!("  {p}");
            }
            println!("  replay: {}", args.replay(r.scenario, r.seed));
        }
        if args.expect_violation {
            // Teeth: with a safety mechanism off, the sweep must notice.
            let sabotage = &args.sabotage;
            if failures.is_empty() {
                println!("expected a violation with {sabotage:?} switched off, found none");
                return 1;
            }
            println!("as expected, switching off {sabotage:?} was caught");
            return 0;
        }
        i32::from(!failures.is_empty())
    }

    /// The drivers' own logs (leg states, resyncs, migrations) with
    /// BRAID_TRACE_VOLUME set, in order with the checker's trace; a
    /// polling task would change the schedule being traced.
    fn init_tracing() {
        let Some(level) = std::env::var_os("BRAID_TRACE_VOLUME") else {
            return;
        };
        use tracing_subscriber::filter::LevelFilter;
        tracing_subscriber::fmt()
            .with_max_level(if level == "trace" {
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

    /// A run's index, its report, and what was wrong with it.
    type Failure = (usize, Report, Vec<String>);

    /// Every run on `args.jobs` threads, with a progress bar: what they
    /// did together, and the runs that failed.
    fn run_all(
        args: &SweepArgs,
        runs: &[(Scenario, u64)],
        started: Instant,
    ) -> (Totals, Vec<Failure>) {
        let mut totals = Totals::default();
        let mut failures = Vec::new();
        let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (tx, rx) = std::sync::mpsc::channel::<Failure>();
        std::thread::scope(|scope| {
            for _ in 0..args.jobs {
                let (tx, next) = (tx.clone(), &next);
                scope.spawn(move || loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(scenario, seed)) = runs.get(i) else {
                        break;
                    };
                    let (report, problems) = run_one(args, scenario, seed);
                    if tx.send((i, report, problems)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (done, (i, report, problems)) in rx.iter().enumerate() {
                totals.add(&report);
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
        (totals, failures)
    }

    /// One run, and with `--check-determinism` a second to compare: its
    /// report and what was wrong with it.
    fn run_one(args: &SweepArgs, scenario: Scenario, seed: u64) -> (Report, Vec<String>) {
        let (secs, sabotage, engines) = (args.virtual_secs, &args.sabotage, args.engines);
        let report = catch(scenario, seed, secs, sabotage, engines);
        let mut problems = report.violations.clone();
        if args.determinism && problems.is_empty() {
            let again = catch(scenario, seed, secs, sabotage, engines);
            if (again.trace_hash, again.ios) != (report.trace_hash, report.ios) {
                problems.push(format!(
                    "nondeterminism: trace {:#x}/{} IOs, then {:#x}/{} IOs; {}",
                    report.trace_hash,
                    report.ios,
                    again.trace_hash,
                    again.ios,
                    first_divergence(&report, &again)
                        .unwrap_or_else(|| "the steps agree (only totals differ)".into())
                ));
            }
        }
        (report, problems)
    }

    /// What every run of the sweep did together.
    #[derive(Default)]
    struct Totals {
        ios: u64,
        media_errors: u64,
        no_space_errors: u64,
        resends: u64,
        failovers: u64,
        duplicates_dropped: u64,
        session_resets: u64,
        replayed_extents: u64,
        channels_revoked: u64,
        legs_left: u64,
        regions_resynced: u64,
        migrations: u64,
        isolation_checks: u64,
        isolation_pause: Duration,
        degraded_checks: u64,
        degraded_pause: Duration,
        longest_io: Duration,
        faults: BTreeMap<Fault, u64>,
        /// Each run's scenario, seed, trace hash and IOs, for `--traces`.
        traces: Vec<(Scenario, u64, u64, u64)>,
    }

    impl Totals {
        fn add(&mut self, r: &Report) {
            self.traces.push((r.scenario, r.seed, r.trace_hash, r.ios));
            self.ios += r.ios;
            self.media_errors += r.media_errors;
            self.no_space_errors += r.no_space_errors;
            self.resends += r.resends;
            self.failovers += r.failovers;
            self.duplicates_dropped += r.duplicates_dropped;
            self.session_resets += r.session_resets;
            self.replayed_extents += r.replayed_extents;
            self.channels_revoked += r.channels_revoked;
            self.legs_left += r.legs_left;
            self.regions_resynced += r.regions_resynced;
            self.migrations += r.migrations;
            self.isolation_checks += r.isolation_checks;
            self.isolation_pause = self.isolation_pause.max(r.isolation_pause);
            self.degraded_checks += r.degraded_checks;
            self.degraded_pause = self.degraded_pause.max(r.degraded_pause);
            self.longest_io = self.longest_io.max(r.longest_io);
            for (k, v) in &r.faults {
                *self.faults.entry(*k).or_insert(0) += v;
            }
        }

        fn print(&self) {
            println!("IOs checked              {}", self.ios);
            for (k, v) in &self.faults {
                println!("fault: {k:<19} {v}");
            }
            println!(
                "expected errors          {} media (bad blocks), {} no space (disk full)",
                self.media_errors, self.no_space_errors
            );
            println!("requests resent          {}", self.resends);
            println!("requests failed over     {}", self.failovers);
            println!("duplicates dropped       {}", self.duplicates_dropped);
            println!("sessions replaced        {}", self.session_resets);
            println!("extents replayed         {}", self.replayed_extents);
            if self.channels_revoked > 0 {
                println!("channels closed, key withdrawn {}", self.channels_revoked);
            }
            if (self.legs_left, self.regions_resynced, self.migrations) != (0, 0, 0) {
                println!("volume legs left behind  {}", self.legs_left);
                println!("volume regions resynced  {}", self.regions_resynced);
                println!("volume legs migrated     {}", self.migrations);
            }
            if self.isolation_checks > 0 {
                println!(
                    "legs' own IO going on while another leg was down: {} checked, longest \
                     pause {:?} (virtual)",
                    self.isolation_checks, self.isolation_pause
                );
            }
            if self.degraded_checks > 0 {
                println!(
                    "mirrors' own IO going on while one of their legs was unreachable: {} \
                     checked, longest pause {:?} (virtual)",
                    self.degraded_checks, self.degraded_pause
                );
            }
            println!("slowest IO               {:?} (virtual)", self.longest_io);
        }
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
