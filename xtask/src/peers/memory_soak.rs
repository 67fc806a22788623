//! `cargo xtask bench --memory-soak SECS [--mirror]`: braid serve and
//! braid attach under fio's QD32 x4 random reads and writes through the
//! attached NBD socket for SECS seconds, their resident size sampled
//! throughout; a daemon that leaks grows from the first minute to the
//! last. With `--mirror` the attach is a 2-way mirror over two braid
//! serve (`attach --volume`), which runs the volume driver and its dirty
//! log, not the single-export one.

use super::rss::rss_kib;
use super::{start, Killed};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn run(seconds: u64, braid: &Path, mirror: bool) -> Result<(), String> {
    let dir = Path::new("/dev/shm/braid-memory-soak");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (shape, described) = if mirror {
        ("mirror", "braid attach --volume, a 2-way mirror")
    } else {
        ("attach", "braid attach")
    };
    let (daemon, uri) = start(shape, true, dir, braid)?;
    let pids = match &daemon {
        Killed::Group(_) => daemon.braid_pids(shape),
        _ => unreachable!("{shape} runs as a group"),
    };
    let idle: Vec<u64> = pids.iter().map(|&(_, p)| rss_kib(p).unwrap_or(0)).collect();
    let mut fio = Command::new("fio")
        .args([
            "--name=soak",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=4",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--group_reporting",
            "--output-format=terse",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("fio: {e}"))?;
    let started = Instant::now();
    // Peak per process per minute.
    let mut minutes: Vec<Vec<u64>> = Vec::new();
    while fio.try_wait().map_err(|e| e.to_string())?.is_none() {
        let minute = (started.elapsed().as_secs() / 60) as usize;
        if minutes.len() <= minute {
            if let Some(last) = minutes.last() {
                eprintln!("  minute {:>2}: {}", minutes.len(), describe(&pids, last));
            }
            minutes.push(vec![0; pids.len()]);
        }
        for (peak, &(_, pid)) in minutes[minute].iter_mut().zip(&pids) {
            *peak = (*peak).max(rss_kib(pid).unwrap_or(0));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let out = fio.wait_with_output().map_err(|e| e.to_string())?;
    let terse = String::from_utf8_lossy(&out.stdout);
    // Terse v3: field 7 is read KiB/s... 8 read IOPS; 48 write IOPS; errors at 4.
    let f: Vec<&str> = terse.trim().split(';').collect();
    let iops = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let errors = f.get(4).copied().unwrap_or("?");
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
    let (first, last) = match (minutes.first(), minutes.last()) {
        (Some(f), Some(l)) => (f.clone(), l.clone()),
        _ => return Err("the soak ended before its first sample".into()),
    };
    println!(
        "memory soak, {seconds} s of fio randrw 4k QD32 x4 through {described} (unix): {:.0} IOPS, fio errors {errors}",
        iops(7) + iops(48)
    );
    println!("resident MiB   idle   first minute peak   last minute peak   growth");
    for (i, (name, _)) in pids.iter().enumerate() {
        println!(
            "braid {name:<7} {:>6.1} {:>19.1} {:>18.1} {:>+8.1}",
            idle[i] as f64 / 1024.0,
            first[i] as f64 / 1024.0,
            last[i] as f64 / 1024.0,
            (last[i] as f64 - first[i] as f64) / 1024.0
        );
    }
    if out.status.success() {
        Ok(())
    } else {
        Err("fio failed".into())
    }
}

fn describe(pids: &[(String, u32)], peaks: &[u64]) -> String {
    pids.iter()
        .zip(peaks)
        .map(|((name, _), kib)| format!("{name} {:.1} MiB", *kib as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(", ")
}
