//! braid's own protocol in the peer table: `braid bench` with the same
//! workloads against a `braid serve`, so the cost of the NBD translation
//! shows beside the NBD rows.

use super::{cpu_ticks, steal, Row, WORKLOADS};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// `braid bench` arguments for each peerbench workload: the j4 row's four
/// connections at QD32 are four channels at QD128.
fn bench_args(workload: &str) -> Option<[&'static str; 8]> {
    let (rw, bs, qd, channels) = match workload {
        "randread-4k-qd1" => ("randread", "4k", "1", "4"),
        "randread-4k-qd32" => ("randread", "4k", "32", "4"),
        "randwrite-4k-qd1" => ("randwrite", "4k", "1", "4"),
        "randwrite-4k-qd32" => ("randwrite", "4k", "32", "4"),
        "seqread-1m-qd8" => ("read", "1M", "8", "4"),
        "seqwrite-1m-qd8" => ("write", "1M", "8", "4"),
        "randread-4k-qd32-j4" => ("randread", "4k", "128", "4"),
        _ => return None,
    };
    Some(["--rw", rw, "--bs", bs, "--qd", qd, "--channels", channels])
}

/// Runs every workload through `braid bench` against the server `pid`
/// listening on `addr`.
pub(crate) fn run(
    braid: &Path,
    addr: &str,
    keys: &Path,
    server_pid: u32,
    runtime: &str,
) -> Result<Vec<(String, Row)>, String> {
    let mut rows = Vec::new();
    for w in WORKLOADS {
        let Some(args) = bench_args(w) else { continue };
        let (row, steal) = steal::least_stolen(&format!("braid-proto {w}"), || {
            let ticks = cpu_ticks(server_pid);
            let started = Instant::now();
            let mut row = bench(braid, addr, keys, w, &args, runtime)?;
            let wall = started.elapsed().as_secs_f64();
            row.srv = (cpu_ticks(server_pid) - ticks) as f64 / super::clock_ticks() * 100.0 / wall;
            Ok(row)
        })?;
        let row = Row { steal, ..row };
        eprintln!(
            "braid-proto {w:<22} {:>10.0} {:>9.1} {:>10.1} {:>10.1} {:>6.0} {:>6.0}  steal {:>3.0}%",
            row.iops, row.mib, row.lat, row.p99, row.cli, row.srv, row.steal
        );
        rows.push((w.to_string(), row));
    }
    Ok(rows)
}

/// braid's QD1 p50 (µs) for 4 KiB random reads or writes over one second.
pub(crate) fn qd1_p50(braid: &Path, addr: &str, keys: &Path, write: bool) -> Result<f64, String> {
    let w = if write {
        "randwrite-4k-qd1"
    } else {
        "randread-4k-qd1"
    };
    let args = bench_args(w).expect("a QD1 workload");
    bench(braid, addr, keys, w, &args, "1")?
        .p50
        .ok_or_else(|| format!("braid bench {w}: no p50"))
}

/// One `braid bench` run of workload `w` for `seconds`, its summary read.
fn bench(
    braid: &Path,
    addr: &str,
    keys: &Path,
    w: &str,
    args: &[&str],
    seconds: &str,
) -> Result<Row, String> {
    let out = bench_command(braid, addr, keys)
        .args(args)
        .args(["--time", seconds])
        .output()
        .map_err(|e| format!("braid bench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "braid bench {w}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse(&text).ok_or_else(|| format!("braid bench {w}: no summary in\n{text}"))
}

/// `braid bench` against export disk0 of the server at `addr`.
pub(super) fn bench_command(braid: &Path, addr: &str, keys: &Path) -> Command {
    let mut cmd = Command::new(braid);
    cmd.args(["bench", "--server", addr, "--export", "disk0", "--key-file"])
        .arg(keys);
    cmd
}

/// The summary lines of `braid bench`: "N IOs in Ts: X IOPS, Y MiB/s, client
/// CPU Z µs/IO, errors E" and "latency µs: mean M  p50 P ... p99 Q ...".
pub(super) fn parse(text: &str) -> Option<Row> {
    let summary = text.lines().find(|l| l.contains(" IOPS, "))?;
    let number_before = |line: &str, unit: &str| -> Option<f64> {
        let end = line.find(unit)?;
        line[..end].split_whitespace().last()?.parse().ok()
    };
    let iops = number_before(summary, " IOPS")?;
    let mib = number_before(summary, " MiB/s")?;
    let cli_per_io = number_before(summary, " µs/IO")?;
    let latency = text.lines().find(|l| l.starts_with("latency µs:"))?;
    let after = |key: &str| -> Option<f64> {
        let at = latency.find(key)? + key.len();
        latency[at..].split_whitespace().next()?.parse().ok()
    };
    Some(Row {
        iops,
        mib,
        lat: after("mean ")?,
        p50: after("p50 "),
        p99: after("p99 ")?,
        cli: cli_per_io * iops / 1e6 * 100.0,
        srv: 0.0,
        steal: 0.0,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_bench_summary() {
        let text = "\n1000 IOs in 2.0s: 500 IOPS, 1.9 MiB/s, client CPU 40.0 µs/IO, errors 0\n\
                    latency µs: mean 60  p50 55  p90 70  p99 120  p99.9 300  max 900\n";
        let row = super::parse(text).unwrap();
        assert_eq!(
            (row.iops, row.mib, row.lat, row.p99),
            (500.0, 1.9, 60.0, 120.0)
        );
        assert_eq!(row.p50, Some(55.0));
        assert!(
            (row.cli - 2.0).abs() < 1e-9,
            "40 µs × 500/s is 2% of a core"
        );
    }
}
