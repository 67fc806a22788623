//! The sweep command line, one for both levels: `cargo xtask sim` (the
//! engine world) and `cargo xtask sim --madsim` (the real drivers) take the
//! same flags with the same defaults, and print the same replay line.

use super::sabotage::Sabotage;
use super::vocabulary::{Level, Scenario};

/// The flags, shown by `--help` at either level.
pub const SWEEP_USAGE: &str = "\
usage: cargo xtask sim [--madsim] [--seeds N [--first F] | --seed S]...
                       [--scenario NAME[,NAME]|all] [--virtual-secs T]
                       [--check-determinism] [--jobs J] [--engines E]
                       [--sabotage NAME[,NAME] --expect-violation]
                       [--traces FILE] [--list]

  --madsim             the real fabric-tcp drivers on madsim instead of the
                       engines in the seeded world
  --seeds N            sweep N seeds (default 100), starting at --first (default 0)
  --seed S             run one seed (replay); repeatable
  --scenario NAMES     which scenarios (default all-faults; `all`: every one
                       this level has; --list shows them)
  --virtual-secs T     simulated seconds of faulty workload per run (default 10)
  --check-determinism  run everything twice and compare; name the first step
                       where two runs part
  --jobs J             worker threads (default: every core)
  --engines E          each server runs E protocol engines (`braid serve
                       --engines`), connections routed by their first frame
  --sabotage A[,B]     switch safety mechanisms off (--list names them)
  --expect-violation   succeed only if some run finds a violation (with
                       --sabotage: the checks notice the missing mechanism)
  --traces FILE        write each run's trace hash and IO count to FILE, a
                       line a run in a fixed order: a change meant to alter
                       no run (a refactor) leaves the file the same
";

/// A parsed sweep command line.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepArgs {
    /// The level the sweep runs at.
    pub level: Level,
    /// Seeds, in order.
    pub seeds: Vec<u64>,
    /// Scenarios, each run with every seed.
    pub scenarios: Vec<Scenario>,
    /// Simulated seconds of faulty workload per run.
    pub virtual_secs: f64,
    /// Run everything twice and compare.
    pub determinism: bool,
    /// Worker threads.
    pub jobs: usize,
    /// Safety mechanisms switched off.
    pub sabotage: Vec<Sabotage>,
    /// Succeed only if some run finds a violation.
    pub expect_violation: bool,
    /// Protocol engines each simulated server runs.
    pub engines: usize,
    /// Where to write each run's trace hash and IO count.
    pub traces: Option<std::path::PathBuf>,
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum SweepCommand {
    /// Run a sweep.
    Run(SweepArgs),
    /// Print this text and exit successfully (`--help`, `--list`).
    Print(String),
}

impl SweepArgs {
    /// Parses the flags (without the program name) for `level`.
    pub fn parse(
        level: Level,
        args: impl IntoIterator<Item = String>,
    ) -> Result<SweepCommand, String> {
        let mut a = SweepArgs {
            level,
            seeds: Vec::new(),
            scenarios: vec![Scenario::AllFaults],
            virtual_secs: 10.0,
            determinism: false,
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            sabotage: Vec::new(),
            expect_violation: false,
            engines: 1,
            traces: None,
        };
        let (mut first, mut count) = (0u64, 100u64);
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            let number = |v: String, what: &str| -> Result<u64, String> {
                v.parse().map_err(|e| format!("{what} {v:?}: {e}"))
            };
            match flag.as_str() {
                "--madsim" if level == Level::Madsim => {}
                "--seeds" => count = number(value()?, "--seeds")?,
                "--first" => first = number(value()?, "--first")?,
                "--seed" => a.seeds.push(number(value()?, "--seed")?),
                "--scenario" => a.scenarios = scenarios(level, &value()?)?,
                "--virtual-secs" => {
                    let v = value()?;
                    a.virtual_secs = v
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s > 0.0)
                        .ok_or_else(|| format!("--virtual-secs {v:?}: a positive number"))?;
                }
                "--check-determinism" => a.determinism = true,
                "--expect-violation" => a.expect_violation = true,
                "--jobs" => a.jobs = number(value()?, "--jobs")?.max(1) as usize,
                "--engines" => a.engines = number(value()?, "--engines")?.clamp(1, 64) as usize,
                "--traces" => a.traces = Some(value()?.into()),
                "--sabotage" => {
                    for name in value()?.split(',') {
                        a.sabotage.push(
                            Sabotage::parse(name).ok_or_else(|| {
                                format!("no sabotage {name:?} (--list names them)")
                            })?,
                        );
                    }
                }
                "--list" => return Ok(SweepCommand::Print(list(level))),
                "-h" | "--help" => return Ok(SweepCommand::Print(SWEEP_USAGE.into())),
                other => return Err(format!("unknown flag {other:?}")),
            }
        }
        if a.seeds.is_empty() {
            a.seeds = (first..first.saturating_add(count)).collect();
        }
        // A mechanism no chosen scenario exercises would be switched off
        // in nothing, and the sweep would pass for the wrong reason.
        if let Some(s) = a
            .sabotage
            .iter()
            .find(|s| !a.scenarios.iter().any(|sc| s.exercised_by(*sc)))
        {
            let exercising: Vec<&str> = Scenario::ALL
                .into_iter()
                .filter(|sc| s.exercised_by(*sc) && sc.runs_at(level))
                .map(|sc| sc.name())
                .collect();
            return Err(format!(
                "--sabotage {}: no scenario chosen exercises it (these do: {})",
                s.name(),
                exercising.join(", ")
            ));
        }
        Ok(SweepCommand::Run(a))
    }

    /// Every run: each scenario with each seed, scenario-major.
    pub fn runs(&self) -> Vec<(Scenario, u64)> {
        self.scenarios
            .iter()
            .flat_map(|&sc| self.seeds.iter().map(move |&seed| (sc, seed)))
            .collect()
    }

    /// The command that replays one run of this sweep.
    pub fn replay(&self, scenario: Scenario, seed: u64) -> String {
        format!(
            "cargo xtask sim{} --scenario {scenario} --seed {seed} --virtual-secs {}{}{}",
            self.level.flag(),
            self.virtual_secs,
            self.sabotage_flag(" --sabotage "),
            self.engines_flag(),
        )
    }

    /// ` --engines N` when the servers run more than one engine.
    fn engines_flag(&self) -> String {
        if self.engines == 1 {
            return String::new();
        }
        format!(" --engines {}", self.engines)
    }

    /// `prefix` and the sabotaged mechanisms' names, or nothing.
    pub fn sabotage_flag(&self, prefix: &str) -> String {
        if self.sabotage.is_empty() {
            return String::new();
        }
        let names: Vec<&str> = self.sabotage.iter().map(|s| s.name()).collect();
        format!("{prefix}{}", names.join(","))
    }

    /// With `--traces`, writes a line per run (scenario, seed, trace hash,
    /// IOs) to its file, sorted, so that the file does not depend on the
    /// order the jobs finished in.
    pub fn write_traces(
        &self,
        runs: impl IntoIterator<Item = (Scenario, u64, u64, u64)>,
    ) -> Result<(), String> {
        let Some(path) = &self.traces else {
            return Ok(());
        };
        let mut runs: Vec<_> = runs.into_iter().collect();
        runs.sort();
        let text: String = runs
            .iter()
            .map(|(sc, seed, hash, ios)| format!("{sc} {seed} {hash:#018x} {ios}\n"))
            .collect();
        std::fs::write(path, text).map_err(|e| format!("--traces {}: {e}", path.display()))
    }

    /// One line describing the sweep, printed before it starts.
    pub fn banner(&self) -> String {
        let names: Vec<&str> = self.scenarios.iter().map(|s| s.name()).collect();
        let seeds = match (self.seeds.first(), self.seeds.last()) {
            (Some(a), Some(b)) if self.seeds.len() > 1 && b - a + 1 == self.seeds.len() as u64 => {
                format!("{a}..={b}")
            }
            _ => format!("{:?}", self.seeds),
        };
        format!(
            "{} sweep: {} runs (seeds {seeds} x scenarios {}), {} virtual s each, {} jobs{}{}{}",
            self.level.name(),
            self.seeds.len() * self.scenarios.len(),
            names.join(","),
            self.virtual_secs,
            self.jobs,
            if self.determinism {
                ", each run twice"
            } else {
                ""
            },
            self.sabotage_flag(", sabotage "),
            if self.engines == 1 {
                String::new()
            } else {
                format!(", {} engines per server", self.engines)
            },
        )
    }
}

fn scenarios(level: Level, names: &str) -> Result<Vec<Scenario>, String> {
    if names == "all" {
        return Ok(Scenario::at(level));
    }
    names
        .split(',')
        .map(|name| {
            let s = Scenario::parse(name)
                .ok_or_else(|| format!("no scenario {name:?} (--list shows them)"))?;
            if !s.runs_at(level) {
                let other: Vec<&str> = s.levels().iter().map(|l| l.name()).collect();
                return Err(format!(
                    "scenario {name} runs only at the {} level (`cargo xtask sim{}`)",
                    other.join(" and "),
                    s.levels()[0].flag()
                ));
            }
            Ok(s)
        })
        .collect()
}

fn list(level: Level) -> String {
    let mut out = format!("scenarios at the {} level:\n", level.name());
    for s in Scenario::at(level) {
        out += &format!("  {:<14} {}\n", s.name(), s.about());
    }
    let elsewhere: Vec<&str> = Scenario::ALL
        .into_iter()
        .filter(|s| !s.runs_at(level))
        .map(|s| s.name())
        .collect();
    if !elsewhere.is_empty() {
        out += &format!("only at the other level: {}\n", elsewhere.join(", "));
    }
    out += "sabotage (--sabotage):\n";
    for s in Sabotage::ALL {
        out += &format!("  {}\n", s.name());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(level: Level, args: &str) -> Result<SweepArgs, String> {
        match SweepArgs::parse(level, args.split_whitespace().map(String::from))? {
            SweepCommand::Run(a) => Ok(a),
            SweepCommand::Print(_) => Err("printed".into()),
        }
    }

    #[test]
    fn traces_are_a_line_a_run_in_an_order_the_jobs_do_not_change() {
        let path = std::env::temp_dir().join(format!("braid-traces-{}.txt", std::process::id()));
        let a = parse(
            Level::Engine,
            &format!("--seeds 2 --traces {}", path.display()),
        )
        .unwrap();
        assert_eq!(a.traces.as_deref(), Some(path.as_path()));
        a.write_traces([
            (Scenario::Steady, 1, 0xab, 7),
            (Scenario::AllFaults, 3, 1, 2),
            (Scenario::Steady, 0, 0x1_0000_0000, 3),
        ])
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            text,
            "all-faults 3 0x0000000000000001 2\n\
             steady 0 0x0000000100000000 3\n\
             steady 1 0x00000000000000ab 7\n"
        );
        assert_eq!(parse(Level::Engine, "--seeds 2").unwrap().traces, None);
    }

    #[test]
    fn both_levels_share_flags_and_defaults() {
        let e = parse(Level::Engine, "").unwrap();
        let m = parse(Level::Madsim, "--madsim").unwrap();
        assert_eq!(e.seeds, (0..100).collect::<Vec<_>>());
        assert_eq!(
            (e.seeds.clone(), e.scenarios.clone()),
            (m.seeds, m.scenarios)
        );
        let a = parse(
            Level::Madsim,
            "--seeds 3 --first 7 --scenario crash,power-loss --sabotage no-replay --virtual-secs 2.5",
        )
        .unwrap();
        assert_eq!(a.runs().len(), 6);
        assert_eq!(a.runs()[0], (Scenario::Crash, 7));
        assert_eq!(
            a.replay(Scenario::Crash, 8),
            "cargo xtask sim --madsim --scenario crash --seed 8 --virtual-secs 2.5 --sabotage no-replay"
        );
    }

    #[test]
    fn a_scenario_of_the_other_level_is_refused_by_name() {
        let e = parse(Level::Madsim, "--scenario swarm").unwrap_err();
        assert!(e.contains("only at the engine level"), "{e}");
        let e = parse(Level::Engine, "--scenario disk-full").unwrap_err();
        assert!(e.contains("--madsim"), "{e}");
        assert!(parse(Level::Engine, "--scenario nope").is_err());
        assert!(parse(Level::Engine, "--virtual-secs 0").is_err());
        let all = parse(Level::Engine, "--scenario all").unwrap();
        assert_eq!(all.scenarios, Scenario::at(Level::Engine));
        assert!(parse(Level::Engine, "--madsim").is_err());
    }

    #[test]
    fn a_mirror_mechanism_is_switched_off_only_where_a_mirror_runs() {
        for name in [
            "no-fencing",
            "no-dirty-log",
            "no-in-sync-gate",
            "no-fan-out",
        ] {
            let e = parse(Level::Engine, &format!("--scenario all --sabotage {name}")).unwrap_err();
            assert!(e.contains("no scenario chosen exercises it"), "{name}: {e}");
            // A stripe runs a volume, but has a second copy only while a
            // leg moves (half its seeds) and no restart to fence: with
            // fan-out or the in-sync gate off, 8 stripe seeds passed.
            for alone in ["crash", "stripe"] {
                let e = parse(
                    Level::Madsim,
                    &format!("--scenario {alone} --sabotage {name}"),
                );
                assert!(e.is_err(), "{name} with {alone}");
            }
            let ok = parse(
                Level::Madsim,
                &format!("--scenario crash,mirror-restart --sabotage {name}"),
            );
            assert!(ok.is_ok(), "{name}: {ok:?}");
        }
        assert!(parse(Level::Engine, "--scenario all --sabotage no-replay").is_ok());
        // Fencing needs a restart, of a stripe as well as of a mirror.
        let fencing = |scenario: &str| {
            parse(
                Level::Madsim,
                &format!("--scenario {scenario} --sabotage no-fencing"),
            )
        };
        assert!(fencing("stripe-restart").is_ok());
        assert!(fencing("mirror").is_err());
    }
}
