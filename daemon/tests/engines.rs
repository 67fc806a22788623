//! `braid serve --engines N` as an operator runs it: clients on several
//! exports at once, each checking every block it wrote, spread over the
//! engines, plain and over TLS; `braid status` shows each engine's work.

use std::path::Path;
use std::process::{Command, Stdio};

mod common;
use common::{free_port, get, serve, status, wait_for, Killed, BRAID};

const EXPORTS: [&str; 3] = ["disk0", "disk1", "disk2"];

/// Three `braid verify` runs at once, one per export, with `extra` flags;
/// each must find every block as it wrote it.
fn verify_all_exports(d: &Path, port: u16, extra: &[&str]) {
    let runs: Vec<Killed> = EXPORTS
        .iter()
        .map(|export| {
            Killed(
                Command::new(BRAID)
                    .args(["verify", "--server", &format!("127.0.0.1:{port}")])
                    .arg("--key-file")
                    .arg(d.join("keys.toml"))
                    .args(["--export", export, "--blocks", "512", "--time", "2"])
                    .args(extra)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    for (mut run, export) in runs.into_iter().zip(EXPORTS) {
        assert!(run.0.wait().unwrap().success(), "verify of {export}");
    }
}

/// `--export` flags for disk1 and disk2 beside the common disk0.
fn more_exports(d: &Path) -> Vec<String> {
    EXPORTS[1..]
        .iter()
        .flat_map(|e| {
            [
                "--export".to_string(),
                format!("{e}={},size=16M", d.join(format!("{e}.img")).display()),
            ]
        })
        .collect()
}

/// Each engine's (busy µs, turns) from `braid status --json`.
fn engine_loads(control: &Path) -> Vec<(u64, u64)> {
    let v = status(control);
    v["engines"]
        .as_array()
        .expect("an engines list")
        .iter()
        .map(|e| (e["busy_us"].as_u64().unwrap(), e["turns"].as_u64().unwrap()))
        .collect()
}

fn serve_engines(d: &Path, port: u16, engines: &str, extra: &[&str]) -> Killed {
    let exports = more_exports(d);
    let mut args: Vec<&str> = vec!["--engines", engines];
    args.extend(extra);
    args.extend(exports.iter().map(String::as_str));
    let server = serve(d, port, "16M", &args);
    wait_for(&d.join("control.sock"));
    server
}

#[test]
fn three_engines_each_serve_a_client_whose_data_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (port, metrics) = (free_port(), free_port());
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let _server = serve_engines(d, port, "3", &["--metrics", &metrics_addr]);
    let control = d.join("control.sock");
    let idle = engine_loads(&control);
    assert_eq!(idle.len(), 3, "one entry per engine: {idle:?}");

    verify_all_exports(d, port, &[]);

    // New anonymous sessions take the engines in turn: each got one
    // client, and worked for it.
    let after = engine_loads(&control);
    for (i, ((_, turns_before), (busy, turns))) in idle.iter().zip(&after).enumerate() {
        assert!(
            turns - turns_before >= 100 && *busy > 0,
            "engine {i} did no client's work: {idle:?} -> {after:?}"
        );
    }
    let v = status(&control);
    assert_eq!(v["sessions_created"].as_u64(), Some(3), "{v}");
    assert_eq!(v["protocol_errors"].as_u64(), Some(0), "{v}");
    let total: u64 = after.iter().map(|e| e.1).sum();
    assert_eq!(
        v["engine_turns"].as_u64(),
        Some(total),
        "the sum of the engines"
    );

    // Each engine's busy time is its own series in the metrics.
    let (_, _, body) = get(metrics, "/metrics");
    for i in 0..3 {
        let series = format!("braid_engine_busy_seconds_total{{engine=\"{i}\"}} ");
        let value: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
            .parse()
            .unwrap();
        assert!(value > 0.0, "engine {i} busy {value} s");
    }
    assert!(
        body.contains("braid_engine_sessions{engine=\"2\"} 0"),
        "{body}"
    );
}

#[test]
fn two_engines_serve_clients_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let _server = serve_engines(d, port, "2", &["--tls"]);
    let cert = d.join("tls-cert.pem");
    verify_all_exports(
        d,
        port,
        &[
            "--tls-ca",
            cert.to_str().unwrap(),
            "--tls-name",
            "localhost",
        ],
    );
    let loads = engine_loads(&d.join("control.sock"));
    assert!(
        loads.iter().all(|&(busy, _)| busy > 0),
        "both engines served a TLS client: {loads:?}"
    );
}

#[test]
fn an_engine_count_out_of_range_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BRAID)
        .args(["serve", "--engines", "0", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--engines (engines) 0"), "{stderr}");
}
