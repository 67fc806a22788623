//! `cargo xtask bench --scale`: how braid's own protocol grows with
//! channels (1, 2, 4, 8 in one `braid bench`) and with clients (1, 4, 16
//! `braid bench` processes at once), 4 KiB random reads at QD32 per client,
//! with the server's CPU beside each row, and how busy the protocol
//! engine's one task was (`engine_busy_us` in `braid status`): a row where
//! that nears 100% is where the task saturates. The IOPS at which it would
//! (the IOs the benches completed over the task's busy seconds) is the
//! server's ceiling on a machine whose cores are not shared with the
//! clients, as here they are.

use super::{clock_ticks, cpu_ticks, start, steal};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

pub(crate) fn run(braid: &Path, runtime: &str) -> Result<(), String> {
    let dir = Path::new("/dev/shm/braid-scale");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (daemon, _) = start("braid", false, dir, braid)?;
    let sdir = dir.join("braid-tcp");
    let listen = std::fs::read_to_string(sdir.join("listen")).map_err(|e| e.to_string())?;
    let keys = sdir.join("keys.toml");
    let control = sdir.join("control.sock");
    let server = Server {
        pid: daemon.pid(),
        control: &control,
    };
    let seconds: f64 = runtime
        .trim_end_matches('s')
        .parse()
        .map_err(|e| format!("--runtime {runtime}: {e}"))?;
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
    println!();
    println!("scale: 4k random read, QD32 per client, braid's protocol over TCP");
    println!(
        "{:<28} {:>10} {:>12} {:>14} {:>12} {:>14} {:>12}",
        "", "IOPS", "server CPU", "server µs/IO", "engine busy", "engine µs/IO", "engine cap"
    );
    for (name, row) in rows {
        // Per IO from the seconds the benches ran, not the wall time
        // around them (process start, handshakes), which the % columns use.
        let ios = (row.iops * seconds).max(1.0);
        println!(
            "{name:<28} {:>10.0} {:>11.0}% {:>14.1} {:>11.0}% {:>14.2} {:>12.0}",
            row.iops,
            row.server_cpu_secs * 100.0 / row.wall,
            row.server_cpu_secs / ios * 1e6,
            row.engine_busy_secs * 100.0 / row.wall,
            row.engine_busy_secs / ios * 1e6,
            ios / row.engine_busy_secs.max(1e-9),
        );
    }
    Ok(())
}

struct Server<'a> {
    pid: u32,
    control: &'a Path,
}

struct Row {
    iops: f64,
    wall: f64,
    server_cpu_secs: f64,
    engine_busy_secs: f64,
}

/// Seconds the server's engine task has worked so far, from `braid status`.
fn engine_busy(braid: &Path, control: &Path) -> Result<f64, String> {
    let out = std::process::Command::new(braid)
        .args(["status", "--json", "--control"])
        .arg(control)
        .output()
        .map_err(|e| format!("braid status: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let key = "\"engine_busy_us\":";
    let at = text
        .find(key)
        .ok_or_else(|| format!("braid status: no {key} in {text}"))?;
    let digits: String = text[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let us: u64 = digits
        .parse()
        .map_err(|e| format!("braid status: {key} {digits:?}: {e}"))?;
    Ok(us as f64 / 1e6)
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
        let engine_busy_secs = engine_busy(braid, server.control)? - busy;
        eprintln!(
            "{label}: {iops:.0} IOPS, server {:.0}% of a core, its engine task busy {:.0}%",
            server_cpu_secs * 100.0 / wall,
            engine_busy_secs * 100.0 / wall
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
