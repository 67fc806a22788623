//! `cargo xtask bench --scale`: how braid's own protocol grows with
//! channels (1, 2, 4, 8 in one `braid bench`) and with clients (1, 4, 16
//! `braid bench` processes at once), 4 KiB random reads at QD32 per client,
//! with the server's CPU beside each row: the server runs its protocol
//! engine on one task, so a row where it nears 100% of a core is where that
//! task saturates.

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
    let mut rows = Vec::new();
    for channels in [1, 2, 4, 8] {
        rows.push((
            format!("1 client, {channels} channel(s)"),
            measure(braid, &listen, &keys, daemon.pid(), 1, channels, runtime)?,
        ));
    }
    for clients in [4, 16] {
        rows.push((
            format!("{clients} clients, 4 channels each"),
            measure(braid, &listen, &keys, daemon.pid(), clients, 4, runtime)?,
        ));
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
    println!();
    println!("scale: 4k random read, QD32 per client, braid's protocol over TCP");
    println!(
        "{:<28} {:>10} {:>12} {:>14}",
        "", "IOPS", "server CPU", "server µs/IO"
    );
    for (name, (iops, srv)) in rows {
        println!(
            "{name:<28} {iops:>10.0} {:>11.0}% {:>14.1}",
            srv,
            srv / 100.0 / iops.max(1.0) * 1e6
        );
    }
    Ok(())
}

/// Total IOPS of `clients` concurrent benches and the server's CPU (% of
/// one core) meanwhile, from a run that lost little to steal.
fn measure(
    braid: &Path,
    listen: &str,
    keys: &Path,
    server: u32,
    clients: usize,
    channels: usize,
    runtime: &str,
) -> Result<(f64, f64), String> {
    let label = format!("{clients} client(s) x {channels} channel(s)");
    let (figures, _) = steal::least_stolen(&label, || {
        let ticks = cpu_ticks(server);
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
        let srv = (cpu_ticks(server) - ticks) as f64 / clock_ticks() * 100.0 / wall;
        eprintln!("{label}: {iops:.0} IOPS, server {srv:.0}% of a core");
        Ok((iops, srv))
    })?;
    Ok(figures)
}
