//! One peerbench workload, run by fio's nbd engine against one NBD server,
//! with the options `../shared/tools/peerbench` uses, so that the table can
//! run one workload against every server before going on to the next: this
//! machine changes speed from one minute to the next, and a ratio is only
//! fair between runs seconds apart.

use super::{cpu_ticks, steal, Row};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// fio's `--rw`, `--bs`, `--iodepth` and `--numjobs` (NBD connections) of
/// each workload.
fn shape(workload: &str) -> Option<(&'static str, &'static str, u32, u32)> {
    Some(match workload {
        "randread-4k-qd1" => ("randread", "4k", 1, 1),
        "randread-4k-qd32" => ("randread", "4k", 32, 1),
        "randwrite-4k-qd1" => ("randwrite", "4k", 1, 1),
        "randwrite-4k-qd32" => ("randwrite", "4k", 32, 1),
        "seqread-1m-qd8" => ("read", "1M", 8, 1),
        "seqwrite-1m-qd8" => ("write", "1M", 8, 1),
        "randread-4k-qd32-j4" => ("randread", "4k", 32, 4),
        _ => return None,
    })
}

/// What fio's JSON report says, summed over its jobs as peerbench does:
/// IOPS, MiB/s, mean latency (µs, weighted by IOs), the worst job's p99
/// (µs) and fio's CPU (% of one core).
const SUMMARY: &str = r#"
import json, sys
path, side = sys.argv[1], sys.argv[2]
s = open(path).read()
d = json.loads(s[s.index('{'):])
iops = bw = lat_w = p99 = cli = 0.0
n = 0
for j in d['jobs']:
    if j.get('error'):
        sys.exit('fio job error %s' % j['error'])
    x = j[side]
    iops += x['iops']; bw += x['bw_bytes']
    lat_w += x['lat_ns']['mean'] * x['total_ios']; n += x['total_ios']
    p99 = max(p99, x['lat_ns'].get('percentile', {}).get('99.000000', 0))
    cli += j['usr_cpu'] + j['sys_cpu']
print(iops, bw / 1048576, (lat_w / n if n else 0) / 1000, p99 / 1000, cli)
"#;

/// How fio reaches `uri`: an NBD URI through its nbd engine, or a block
/// device (a path) through io_uring, bypassing the client's page cache so
/// every IO reaches the device's server.
fn target_args(uri: &str) -> Vec<String> {
    if uri.starts_with('/') {
        vec![
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--filename={uri}"),
        ]
    } else {
        vec!["--ioengine=nbd".into(), format!("--uri={uri}")]
    }
}

/// Runs `workload` against `uri` (or a block device's path) for `runtime` seconds (after a second of
/// ramp), charging `server_pid` and its children with the server's CPU;
/// fio's JSON report goes to `report`.
fn run(
    workload: &str,
    uri: &str,
    server_pid: u32,
    runtime: &str,
    report: &Path,
) -> Result<Row, String> {
    let (rw, bs, qd, jobs) =
        shape(workload).ok_or_else(|| format!("unknown workload {workload}"))?;
    let ticks = cpu_ticks(server_pid);
    let started = Instant::now();
    let out = Command::new("fio")
        .arg(format!("--name={workload}"))
        .args(target_args(uri))
        .arg(format!("--numjobs={jobs}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .args([
            "--time_based",
            &format!("--runtime={runtime}"),
            "--ramp_time=1",
        ])
        .args(["--lat_percentiles=1", "--group_reporting=0"])
        .args([
            "--output-format=json",
            &format!("--output={}", report.display()),
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    let wall = started.elapsed().as_secs_f64();
    let srv = (cpu_ticks(server_pid) - ticks) as f64 / super::clock_ticks() * 100.0 / wall;
    if !out.status.success() {
        return Err(format!(
            "fio {workload} against {uri}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let summary = Command::new("python3")
        .args(["-c", SUMMARY])
        .arg(report)
        .arg(side)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !summary.status.success() {
        return Err(format!(
            "{}: {}",
            report.display(),
            String::from_utf8_lossy(&summary.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&summary.stdout);
    let f: Vec<f64> = text
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let [iops, mib, lat, p99, cli] = f[..] else {
        return Err(format!("{}: unexpected summary {text:?}", report.display()));
    };
    Ok(Row {
        iops,
        mib,
        lat,
        p50: None,
        p99,
        cli,
        srv,
        steal: 0.0,
    })
}

/// [`run`], taken again while the hypervisor took more than
/// [`steal::LIMIT_PERCENT`] of the machine's CPU during it; the run that
/// lost the least is kept. `label` names the cell in the log.
pub(crate) fn run_least_stolen(
    workload: &str,
    uri: &str,
    server_pid: u32,
    runtime: &str,
    report: &Path,
    label: &str,
) -> Result<Row, String> {
    let (row, steal) =
        steal::least_stolen(label, || run(workload, uri, server_pid, runtime, report))?;
    Ok(Row { steal, ..row })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_workload_has_a_fio_shape_and_j4_has_four_connections() {
        assert!(super::super::WORKLOADS.iter().all(|w| shape(w).is_some()));
        assert_eq!(
            shape("randread-4k-qd32-j4"),
            Some(("randread", "4k", 32, 4))
        );
        assert_eq!(shape("seqwrite-1m-qd8"), Some(("write", "1M", 8, 1)));
        assert_eq!(shape("nonsense"), None);
    }

    #[test]
    fn a_block_device_is_reached_with_direct_io_and_a_uri_over_nbd() {
        let device = target_args("/dev/ublkb0");
        assert!(device.contains(&"--direct=1".to_string()), "{device:?}");
        assert!(device.contains(&"--filename=/dev/ublkb0".to_string()));
        assert!(!device.iter().any(|a| a.starts_with("--uri")));
        let nbd = target_args("nbd://127.0.0.1:10809/disk0");
        assert_eq!(nbd, ["--ioengine=nbd", "--uri=nbd://127.0.0.1:10809/disk0"]);
    }
}
