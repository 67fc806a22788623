//! `cargo xtask <command>`: the project's workflows in one place.
//! Standard library only, so it builds in seconds on a fresh machine.

mod conformance;
mod peers;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  ci        everything CI checks: format, lints, build of every crate and
            target, the whole test suite (the `sim` profile: release
            speed for the CPU-bound sweeps, with debug assertions and
            overflow checks on), NBD conformance (host and
            VM), a simulation sweep and a short soak
  test      the test suite only (cargo nextest if installed, else cargo test);
            extra arguments go to the test runner
  bench     criterion benchmarks of the codec and engines; extra arguments
            go to criterion (e.g. `cargo xtask bench -- round`).
            `cargo xtask bench --peers [--runtime S] [--only braid,nbdkit]
            [--transport tcp|unix|both] [--vm]`: braid's NBD face against nbdkit,
            qemu-nbd and nbd-server with ../shared/tools/peerbench (fio),
            beside the limit, braid bench, braid attach (one export, a
            2-way mirror, and --ublk where the kernel has ublk) and a TCP
            floor; --vm runs it in ../shared/tools/vmlab (ublk, timings
            under TCG mean little);
            `cargo xtask bench --scale [--runtime S] [--engines 1,2]`:
            braid's protocol with 1-8 channels and 1-16 clients, server
            CPU and engine busy time per row, for each engine count;
            `cargo xtask bench --memory-soak SECS [--mirror]`: resident
            memory of braid serve and attach (--mirror: attach --volume
            of a 2-way mirror) under QD32 x4 for SECS seconds
  sim       seeded simulation sweeps with invariant checks; arguments go
            to the runner (`cargo xtask sim --help`). With --madsim: the
            real fabric-tcp drivers on madsim (`cargo xtask sim --madsim
            --seeds N | --seed S [--scenario X] [--virtual-secs T]
            [--check-determinism]`)
  conformance
            braid's NBD face against nbdinfo, nbdsh, qemu-img, qemu-io,
            nbdcopy, fio and (in ../shared/tools/vmlab) the kernel's
            nbd-client: `cargo xtask conformance [--host-only|--vm-only]`
  mutants   mutation testing of the engines with cargo-mutants (installs
            it if missing): each mutant of the named files (default: the
            exactly-once and ordering code) must fail the engine tests and
            invariant sweeps. `cargo xtask mutants [FILE...] [--shard K/N]
            [--output DIR]` (flags go to cargo-mutants; --shard samples
            every Nth mutant); results in target/mutants/mutants.out
            (caught.txt, missed.txt)
  soak      real braid processes under a fault proxy and kill -9, with the
            verifier throughout (`--volume mirror3|mirror2|stripe|striped-mirrors|linear`: a volume
            over several servers, with a live migration): `cargo xtask soak [--duration SECS]
            [--seed S] [--measure-failover N]`
";

/// The cargo profile of tests, sweeps, conformance and soak (Cargo.toml):
/// optimized, with debug assertions and overflow checks, so a broken
/// invariant stops the run where it breaks instead of wrapping silently.
const CHECKED: &str = "sim";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r.to_vec()),
        None => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd {
        "ci" => ci(),
        "test" => test(&rest),
        "bench" => bench(&rest),
        "soak" => soak(&rest),
        "sim" => sim(&rest),
        "conformance" => conformance(&rest),
        "mutants" => mutants(&rest),
        // The echo side of the bench's TCP ping-pong floor, in its own process.
        "__pingpong-echo" => peers::pingpong_echo(&rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(what: &str, mut cmd: Command) -> Result<(), String> {
    let start = Instant::now();
    eprintln!("==> {what}");
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: could not start: {e}"))?;
    eprintln!(
        "<== {what}: {} in {:.1}s",
        if status.success() { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ci() -> Result<(), String> {
    lint()?;
    build_like_ci()?;
    check_fuzz_targets()?;
    test(&[])?;
    conformance(&[])?;
    simulations()?;
    madsim_unit_tests()?;
    madsim_teeth()?;
    soaks()
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Formatting and clippy, with and without TLS.
fn lint() -> Result<(), String> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run("format check", fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--profile",
        CHECKED,
    ]);
    clippy.args(rdma_features()?);
    clippy.args(["--", "-D", "warnings"]);
    run("clippy", clippy)?;
    // TLS is a default feature of these two; a build without it must still
    // compile and lint clean, which the workspace build never tries.
    let mut without_tls = cargo();
    without_tls.args([
        "clippy",
        "-p",
        "braid-fabric-tcp",
        "-p",
        "braid-frontend-nbd",
        "--no-default-features",
        "--all-targets",
        "--profile",
        CHECKED,
        "--",
        "-D",
        "warnings",
    ]);
    run("clippy without TLS", without_tls)
}

/// The seeded sweeps at both levels, each run twice to check determinism.
fn simulations() -> Result<(), String> {
    sim(&args(&[
        "--seeds",
        "300",
        "--virtual-secs",
        "5",
        "--check-determinism",
    ]))?;
    // Swarm: the world's whole shape drawn from each seed.
    sim(&args(&[
        "--scenario",
        "swarm",
        "--seeds",
        "200",
        "--virtual-secs",
        "3",
        "--check-determinism",
    ]))?;
    // Swarm again with the server as three engines: every join must reach
    // the engine that holds its session.
    sim(&args(&[
        "--scenario",
        "swarm",
        "--seeds",
        "100",
        "--first",
        "5000",
        "--virtual-secs",
        "3",
        "--engines",
        "3",
        "--check-determinism",
    ]))?;
    // The real fabric-tcp drivers on madsim: every scenario, replayed twice.
    sim(&args(&[
        "--madsim",
        "--scenario",
        "all",
        "--seeds",
        "10",
        "--virtual-secs",
        "10",
        "--check-determinism",
    ]))?;
    // The same with every server running three engines, sessions spread
    // over them by the acceptor (`braid serve --engines`).
    sim(&args(&[
        "--madsim",
        "--scenario",
        "all",
        "--seeds",
        "5",
        "--first",
        "1000",
        "--virtual-secs",
        "10",
        "--engines",
        "3",
        "--check-determinism",
    ]))
}

/// Teeth at the madsim level: each mechanism switched off must be
/// noticed within a few seeds of its scenario.
fn madsim_teeth() -> Result<(), String> {
    // The restart gate's window needs a write seen but unanswered when
    // the power goes: about one power-loss seed in 16 opens it (see
    // fabric-sim's disk), so it runs a hundred, where a single pinned
    // seed would lose its teeth with any change to the drivers' timing.
    for (sabotage, scenario, seeds, virtual_secs) in [
        ("no-replay", "power-loss", "5", "10"),
        ("no-dedup", "partitions", "5", "10"),
        ("no-restart-gate", "power-loss", "100", "20"),
        ("no-dirty-log", "mirror", "4", "10"),
        ("no-in-sync-gate", "mirror", "4", "10"),
        ("no-fan-out", "mirror", "4", "10"),
        // The same logs one level down, in each mirror of a stripe.
        ("no-dirty-log", "striped-mirrors", "4", "10"),
        // And writes reaching both legs of the mirror in a linear volume.
        ("no-fan-out", "linear", "4", "10"),
        // A mirror going on without a leg that does not answer: half the
        // linear seeds take one mirror leg down alone for 2.7-3.5 s.
        ("no-leg-timeout", "linear", "8", "10"),
        // Bad blocks on one leg reaching the user while another is in
        // sync (15 of the first 16 seeds, 7 of these 8; in linear, whose
        // mirror has bad blocks in half the seeds, 5 of 16).
        ("no-error-failover", "mirror-errors", "8", "10"),
        ("no-error-failover", "linear", "16", "10"),
        // And a full disk under one leg (4 of these 8).
        ("no-error-failover", "mirror", "8", "10"),
        // In every boot of a client that restarts (5 of these 16; none
        // when only the last boot's refusals were judged).
        ("no-error-failover", "mirror-restart", "16", "10"),
        // And where the refusals meet a switch, quorum writes left
        // lagging and boots on logs (10 of the first 16 seeds, 3 of
        // these 4).
        ("no-error-failover", "migrate-errors", "4", "10"),
        // 6 of the first 200 seeds end with legs differing or a read
        // going back in time (35, 66, 98, 125, 149, 192 since session
        // 62's kills in a log store; 5 from session 57's wait for marks
        // in flight; 6 before, and 7 before session 53's change to when
        // a copy may start).
        ("no-fencing", "mirror-restart", "200", "10"),
        // A stripe's too: a dead run's late write lands over a newer one
        // (2 of the first 200 seeds since session 61's crash at the end:
        // 125, 126; 94 too before).
        ("no-fencing", "stripe-restart", "200", "10"),
        // A mirror's write-intent marks kept until a FLUSH covers their
        // writes: cleared early, a power cut after the kill leaves the
        // legs differing with no mark to repair them (4 of the first 50
        // seeds: 7, 30, 40, 45).
        ("no-unflushed-marks", "mirror-restart", "50", "10"),
        // A restart serving before its settling FLUSHes: what it read
        // of a dead run's cache goes back in time at the next power cut
        // (since session 61's crash at the end: 29, 74 and 92 of the
        // first 100 mirror seeds, 23, 24 and 29 of the first 30 stripe
        // seeds; 1 mirror seed in 700 before, no stripe seed in 600).
        ("no-settle", "mirror-restart", "100", "10"),
        ("no-settle", "stripe-restart", "30", "10"),
        // Writes and FLUSHes held while a switch's old map lacks a copy:
        // answered instead, a client killed mid-switch restarts on the
        // old map without them (5 of the first 60 seeds: 0, 26, 28, 45,
        // 57).
        ("no-old-map-hold", "migrate-restart", "30", "10"),
        // Mid-switch, a quorum write acknowledged on the new map's word
        // alone: a client killed before the store restarts on the old
        // map and trusts a leg without it (seed 2 of these 3; 9 of the
        // first 400). A log store's anchor holds that write too, so
        // only the two off together are caught (since session 65; the
        // anchor alone is caught in two pinned seeds by fabric-sim's
        // `a_torn_log_store_leaves_a_leg_clear_in_every_mix`).
        (
            "no-both-maps-vouch,no-store-anchor",
            "migrate-quorum",
            "3",
            "10",
        ),
        ("no-room", "steady", "10", "10"),
    ] {
        sim(&args(&[
            "--madsim",
            "--seeds",
            seeds,
            "--virtual-secs",
            virtual_secs,
            "--scenario",
            scenario,
            "--sabotage",
            sabotage,
            "--expect-violation",
        ]))?;
    }
    Ok(())
}

/// The real daemon under kill -9 and the fault proxy, on one export and
/// on each volume layout.
fn soaks() -> Result<(), String> {
    soak(&args(&["--duration", "20"]))?;
    // The same with the server as three engines, under kill -9 too.
    soak(&args(&["--duration", "15", "--engines", "3"]))?;
    // Three servers and a spare under kill -9, black holes and a live
    // migration, the verifier on the volume throughout.
    soak(&args(&["--volume", "mirror3", "--duration", "20"]))?;
    // The same over two mirrors striped (RAID 10): leg1's mirror keeps
    // serving while it is away, leg0 moves within its mirror.
    soak(&args(&["--volume", "striped-mirrors", "--duration", "15"]))?;
    // A mirror and a smaller export concatenated, the seam mid-block.
    soak(&args(&["--volume", "linear", "--duration", "10"]))
}

fn test(extra: &[String]) -> Result<(), String> {
    let mut cmd = cargo();
    if has_nextest() {
        cmd.args([
            "nextest",
            "run",
            "--workspace",
            "--cargo-profile",
            CHECKED,
            "--no-fail-fast",
        ]);
        cmd.args(rdma_features()?);
    } else {
        eprintln!("(cargo-nextest not installed: using cargo test)");
        cmd.args([
            "test",
            "--workspace",
            "--profile",
            CHECKED,
            "--no-fail-fast",
        ]);
        cmd.args(rdma_features()?);
    }
    cmd.args(extra);
    run("tests", cmd)
}

fn sim(extra: &[String]) -> Result<(), String> {
    if extra.iter().any(|a| a == "--madsim") {
        return madsim_sim(extra);
    }
    let mut cmd = cargo();
    run_checked(&mut cmd, "braid-sim-tests", Some("sim"));
    cmd.args(extra);
    run("simulation sweep", cmd)
}

/// `cargo run` of a package's binary in the checked profile; what follows
/// goes to the binary.
fn run_checked(cmd: &mut Command, package: &str, bin: Option<&str>) {
    cmd.args(["run", "--profile", CHECKED, "--quiet", "--package", package]);
    if let Some(bin) = bin {
        cmd.args(["--bin", bin]);
    }
    cmd.arg("--");
}

fn soak(extra: &[String]) -> Result<(), String> {
    let mut cmd = cargo();
    run_checked(&mut cmd, "braid", None);
    cmd.arg("soak").args(extra);
    run("soak", cmd)
}

fn bench(extra: &[String]) -> Result<(), String> {
    if extra.iter().any(|a| a == "--peers") {
        let root = root();
        // Inside the VM: the host built the binary, and there is no cargo.
        if let Some(at) = extra.iter().position(|a| a == "--braid") {
            let braid = extra.get(at + 1).ok_or("--braid PATH")?;
            return peers::run(extra, &root, Path::new(braid));
        }
        // Speed is measured as users build it: release, assertions off.
        build_workspace("release")?;
        let braid = conformance::braid_binary(&root, "release");
        if extra.iter().any(|a| a == "--vm") {
            return peers::run_in_vm(extra, &root, &braid);
        }
        return peers::run(extra, &root, &braid);
    }
    if extra.iter().any(|a| a == "--scale") {
        let runtime = match extra.iter().position(|a| a == "--runtime") {
            Some(at) => extra.get(at + 1).ok_or("--runtime SECS")?.clone(),
            None => "5".into(),
        };
        let engines: Vec<usize> = match extra.iter().position(|a| a == "--engines") {
            Some(at) => extra
                .get(at + 1)
                .ok_or("--engines N[,N]")?
                .split(',')
                .map(|n| n.parse().map_err(|e| format!("--engines {n:?}: {e}")))
                .collect::<Result<_, String>>()?,
            None => vec![1, 2],
        };
        build_workspace("release")?;
        let root = root();
        return peers::scale(
            &conformance::braid_binary(&root, "release"),
            &runtime,
            &engines,
        );
    }
    if let Some(at) = extra.iter().position(|a| a == "--memory-soak") {
        let seconds = extra
            .get(at + 1)
            .and_then(|s| s.parse().ok())
            .ok_or("usage: cargo xtask bench --memory-soak SECS [--mirror]")?;
        let mirror = extra.iter().any(|a| a == "--mirror");
        build_workspace("release")?;
        let root = root();
        return peers::memory_soak(
            seconds,
            &conformance::braid_binary(&root, "release"),
            mirror,
        );
    }
    let mut cmd = cargo();
    cmd.args(["bench", "--package", "braid-core", "--bench", "engine"]);
    cmd.args(extra);
    run("benchmarks", cmd)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn conformance(extra: &[String]) -> Result<(), String> {
    build_like_ci()?;
    let root = root();
    let braid = conformance::braid_binary(&root, CHECKED);
    let start = Instant::now();
    eprintln!("==> conformance");
    let result = conformance::run(extra, &root, &braid);
    eprintln!(
        "<== conformance: {} in {:.1}s",
        if result.is_ok() { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    result
}

/// The madsim world: every crate is built with `--cfg madsim` (tokio's
/// net, time and tasks become simulated), in a target dir of its own so
/// the normal build is not invalidated.
fn madsim_sim(extra: &[String]) -> Result<(), String> {
    let rest: Vec<&String> = extra.iter().filter(|a| *a != "--madsim").collect();
    let mut cmd = madsim_cargo();
    run_checked(&mut cmd, "braid-fabric-sim", Some("madsim-sweep"));
    cmd.args(rest);
    run("madsim sweep (real fabric-tcp drivers)", cmd)
}

/// The engine files whose every mutant a sweep should catch, smallest
/// first; `cargo xtask mutants FILE...` picks others.
const MUTANT_FILES: &[&str] = &[
    "core/src/server/overlap.rs",
    "core/src/server/session.rs",
    "core/src/client/dirty.rs",
    "core/src/client/journal.rs",
];

fn mutants(extra: &[String]) -> Result<(), String> {
    let installed = cargo()
        .args(["mutants", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        let mut install = cargo();
        install.args(["install", "cargo-mutants", "--locked"]);
        run("install cargo-mutants", install)?;
    }
    // Flags (and the value after each) go to cargo-mutants; the rest are files.
    let mut files = Vec::new();
    let mut flags = Vec::new();
    let mut args = extra.iter();
    while let Some(a) = args.next() {
        if a.starts_with("--") {
            flags.push(a.clone());
            // A flag's value follows it, unless what follows is another
            // flag or a file (--in-place takes none).
            let valued = !a.contains('=')
                && args
                    .as_slice()
                    .first()
                    .is_some_and(|v| !v.starts_with("--") && !v.ends_with(".rs"));
            if valued {
                flags.extend(args.next().cloned());
            }
        } else {
            files.push(a.clone());
        }
    }
    if files.is_empty() {
        files = MUTANT_FILES.iter().map(|f| f.to_string()).collect();
    }
    let output = if flags.iter().any(|f| f.starts_with("--output")) {
        None
    } else {
        Some("target/mutants")
    };
    let mut cmd = cargo();
    // The sim profile's assertions, built incrementally without debug info:
    // a mutant rebuilds in about 2 s instead of 30-190 s.
    cmd.args(["mutants", "--package", "braid-core", "--profile", "mutants"]);
    // Sampling takes every Nth mutant, so a shard spreads over the files.
    if flags.iter().any(|f| f.starts_with("--shard")) {
        cmd.args(["--sharding", "round-robin"]);
    }
    // nextest stops at the first failing test: a caught mutant costs its
    // build and one test, not the whole suite.
    cmd.args(["--test-tool", "nextest"]);
    // A mutant that breaks liveness runs the sweeps to their virtual-time
    // limits: three times the clean run calls it caught instead of waiting
    // out cargo-mutants' default. Relative, not fixed: with every core
    // test a clean run takes 90 s on an idle 2-core machine, and a fixed
    // 150 s called mutants "timeouts" when the machine was merely busy.
    cmd.args(["--no-shuffle", "--timeout-multiplier", "3"]);
    cmd.args(output.iter().flat_map(|o| ["--output", o]));
    for f in &files {
        cmd.args(["--file", f]);
    }
    cmd.args(&flags);
    // The test: every test of braid-core: the engine tests, the seeded
    // invariant sweeps with their teeth, the tuning and configuration
    // tests, and the unit tests of the file itself (with only the first
    // two, every mutant of runtime tuning went unnoticed).
    run("mutation testing", cmd)
}

/// fabric-sim's own unit tests, which exist only under `--cfg madsim`.
fn madsim_unit_tests() -> Result<(), String> {
    let mut cmd = madsim_cargo();
    cmd.args([
        "test",
        "--profile",
        CHECKED,
        "--package",
        "braid-fabric-sim",
        "--lib",
    ]);
    run("fabric-sim unit tests (madsim)", cmd)
}

/// Cargo with every crate built under `--cfg madsim`, in its own target dir.
fn madsim_cargo() -> Command {
    let mut cmd = cargo();
    let flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    cmd.env("RUSTFLAGS", format!("{flags} --cfg madsim").trim())
        .env("CARGO_TARGET_DIR", root().join("target").join("madsim"));
    cmd
}

/// The RDMA fabric's verbs driver needs cmake and clang to build (its
/// rdma-core bindings). With them, every build, lint and test includes it
/// (`braid` with `--features rdma`); without them it is left out, with a
/// note, except in CI, which installs them.
fn rdma_features() -> Result<Vec<&'static str>, String> {
    let found = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found("cmake") && found("clang") {
        return Ok(vec!["--features", "braid/rdma"]);
    }
    if std::env::var_os("CI").is_some() {
        return Err("CI builds the RDMA fabric: cmake and clang must be installed".into());
    }
    static NOTED: std::sync::Once = std::sync::Once::new();
    NOTED.call_once(|| {
        eprintln!("(cmake or clang not installed: building without the RDMA fabric)")
    });
    Ok(Vec::new())
}

/// The build `ci` makes, so after `ci` it is a no-op (building only the
/// braid package would unify features differently and rebuild).
fn build_like_ci() -> Result<(), String> {
    build_workspace(CHECKED)
}

fn build_workspace(profile: &str) -> Result<(), String> {
    let mut build = cargo();
    build.args([
        "build",
        "--workspace",
        "--all-targets",
        "--profile",
        profile,
    ]);
    build.args(rdma_features()?);
    run("build every crate and target", build)
}

/// The fuzz targets live outside the workspace (cargo-fuzz builds them on
/// nightly with sanitizers), so nothing else compiles them: until session
/// 31 one had stopped building unnoticed. Checking them on stable, with the
/// cfg cargo-fuzz sets, keeps them in step with the code they include.
fn check_fuzz_targets() -> Result<(), String> {
    let mut check = cargo();
    check.args(["check", "--manifest-path", "fuzz/Cargo.toml", "--bins"]);
    // Their own target dir: the cfg changes every crate's flags, and would
    // otherwise throw away the workspace's build.
    check.env("CARGO_TARGET_DIR", "target/fuzz-check");
    check.env("RUSTFLAGS", "--cfg fuzzing -D warnings");
    run("fuzz targets check", check)
}

/// One step of xorshift64: cheap deterministic data and orders, never zero
/// from a nonzero state.
pub(crate) fn xorshift64(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// A TCP port nothing listens on right now (for servers the checks start).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(10809)
}
