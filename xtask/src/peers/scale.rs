//! `cargo xtask bench --scale`: how braid's own protocol grows with
//! channels (1, 2, 4, 8 in one `braid bench`) and with clients (1, 4, 16
//! `braid bench` processes at once), 4 KiB random reads at QD32 per client,
//! with the server's CPU beside each row, and how busy its protocol
//! engines' tasks were (`engines` in `braid status`): a row where the
//! busiest nears 100% is where that task saturates. The IOPS at which it
//! would (the IOs the benches completed over the busiest task's busy
//! seconds) is the server's ceiling on a machine whose cores are not
//! shared with the clients, as here they are. The whole table runs once
//! per engine count (`braid serve --engines`): a session stays on one
//! engine, so the rows with several clients are the ones more engines can
//! lift.

use super::{clock_ticks, cpu_ticks, start_with, steal};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

pub(crate) fn run(braid: &Path, runtime: &str, engine_counts: &[usize]) -> Result<(), String> {
    let mut tables = Vec::new();
    for &engines in engine_counts {
        tables.push((engines, table(braid, runtime, engines)?));
    }
    let seconds: f64 = runtime
        .trim_end_matches('s')
        .parse()
        .map_err(|e| format!("--runtime {runtime}: {e}"))?;
    println!();
    println!("scale: 4k random read, QD32 per client, braid's protocol over TCP");
    println!(
        "{:<42} {:>10} {:>12} {:>14} {:>12} {:>14} {:>12}",
        "", "IOPS", "server CPU", "server µs/IO", "busiest eng.", "engine µs/IO", "engine cap"
    );
    for (engines, rows) in tables {
        for (name, row) in rows {
            // Per IO from the seconds the benches ran, not the wall time
            // around them (process start, handshakes), which the % columns use.
            let ios = (row.iops * seconds).max(1.0);
            let busiest = row.engine_busy_secs.iter().copied().fold(0.0, f64::max);
            let all: f64 = row.engine_busy_secs.iter().sum();
            println!(
                "{:<42} {:>10.0} {:>11.0}% {:>14.1} {:>11.0}% {:>14.2} {:>12.0}",
                format!("{engines} engine(s), {name}"),
                row.iops,
                row.server_cpu_secs * 100.0 / row.wall,
                row.server_cpu_secs / ios * 1e6,
                busiest * 100.0 / row.wall,
                all / ios * 1e6,
                ios / busiest.max(1e-9),
            );
        }
    }
    Ok(())
}

/// Every row against one server running `engines` engines.
fn table(braid: &Path, runtime: &str, engines: usize) -> Result<Vec<(String, Row)>, String> {
    let dir = Path::new("/dev/shm/braid-scale");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let serve_extra = ["--engines".to_string(), engines.to_string()];
    let (daemon, _) = start_with("braid", false, dir, braid, &serve_extra)?;
    let sdir = dir.join("braid-tcp");
    let listen = std::fs::read_to_string(sdir.join("listen")).map_err(|e| e.to_string())?;
    let keys = sdir.join("keys.toml");
    let control = sdir.join("control.sock");
    let server = Server {
        pid: daemon.pid(),
        control: &control,
    };
    let mut rows = Vec::new();
    for channels in [1, 2, 4, 8] {
        rows.push((
            format!("1 client, {channels} channel(s)"),
            measure(braid, &listen, &keys, &server, 1, channels, runtime)?,
        ));
    }
    for clients in [4, 16] {
        rows.push((
            format!("{clients} clients, 4 channels each"),
            measure(braid, &listen, &keys, &server, clients, 4, runtime)?,
        ));
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
    Ok(rows)
}

struct Server<'a> {
    pid: u32,
    control: &'a Path,
}

struct Row {
    iops: f64,
    wall: f64,
    server_cpu_secs: f64,
    /// Per engine.
    engine_busy_secs: Vec<f64>,
}

/// Seconds each of the server's engine tasks has worked so far, from
/// `braid status` (its `engines` list, each entry's `busy_us`).
fn engine_busy(braid: &Path, control: &Path) -> Result<Vec<f64>, String> {
    let out = std::process::Command::new(braid)
        .args(["status", "--json", "--control"])
        .arg(control)
        .output()
        .map_err(|e| format!("braid status: {e}"))?;
    let text: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let list = text
        .split_once("\"engines\":[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .ok_or_else(|| format!("braid status: no engines list in {text}"))?;
    let key = "\"busy_us\":";
    list.split(key)
        .skip(1)
        .map(|after| {
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            digits
                .parse::<u64>()
                .map(|us| us as f64 / 1e6)
                .map_err(|e| format!("braid status: {key} {digits:?}: {e}"))
        })
        .collect()
}

/// Total IOPS of `clients` concurrent benches, the server's CPU and its
/// engine task's busy time meanwhile, from a run that lost little to steal.
fn measure(
    braid: &Path,
    listen: &str,
    keys: &Path,
    server: &Server<'_>,
    clients: usize,
    channels: usize,
    runtime: &str,
) -> Result<Row, String> {
    let label = format!("{clients} client(s) x {channels} channel(s)");
    let (figures, _) = steal::least_stolen(&label, || {
        let ticks = cpu_ticks(server.pid);
        let busy = engine_busy(braid, server.control)?;
        let started = Instant::now();
        let children: Vec<_> = (0..clients)
            .map(|_| {
                super::proto::bench_command(braid, listen.trim(), keys)
                    .args(["--rw", "randread", "--bs", "4k", "--qd", "32"])
                    .args(["--channels", &channels.to_string(), "--time", runtime])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("braid bench: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let mut iops = 0.0;
        for child in children {
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                return Err(format!("braid bench failed:\n{text}"));
            }
            iops += super::proto::parse(&text)
                .ok_or_else(|| format!("braid bench: no summary in\n{text}"))?
                .iops;
        }
        let wall = started.elapsed().as_secs_f64();
        let server_cpu_secs = (cpu_ticks(server.pid) - ticks) as f64 / clock_ticks();
        let engine_busy_secs: Vec<f64> = engine_busy(braid, server.control)?
            .iter()
            .zip(&busy)
            .map(|(after, before)| after - before)
            .collect();
        let each: Vec<String> = engine_busy_secs
            .iter()
            .map(|b| format!("{:.0}%", b * 100.0 / wall))
            .collect();
        eprintln!(
            "{label}: {iops:.0} IOPS, server {:.0}% of a core, its engine tasks busy {}",
            server_cpu_secs * 100.0 / wall,
            each.join(" ")
        );
        Ok(Row {
            iops,
            wall,
            server_cpu_secs,
            engine_busy_secs,
        })
    })?;
    Ok(figures)
}
