//! `--metrics` as an operator uses it: a server under load and an
//! attached volume, each scraped over HTTP and parsed with a real
//! Prometheus text parser.

use prometheus_parse::{Scrape, Value};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{free_port, get, pattern, serve, wait_for, Killed, Nbd, BRAID};

fn scrape(port: u16) -> Scrape {
    let (status, content_type, body) = get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(content_type.starts_with("application/openmetrics-text"));
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of `metric` whose labels include every pair of `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {metric} {labels:?}"));
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{metric}: {other:?}"),
    }
}

/// The bucket counts of a histogram: (upper bound, cumulative count).
fn histogram(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no histogram {metric} {labels:?}"));
    match &sample.value {
        Value::Histogram(b) => b.iter().map(|h| (h.less_than, h.count)).collect(),
        other => panic!("{metric}: {other:?}"),
    }
}

#[test]
fn a_server_under_load_and_an_attached_volume_are_scraped_and_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (port, server_metrics, client_metrics) = (free_port(), free_port(), free_port());
    let metrics_addr = format!("127.0.0.1:{server_metrics}");
    let _server = serve(d, port, "64M", &["--metrics", &metrics_addr]);
    let started = std::time::Instant::now();
    wait_for(&d.join("control.sock"));
    let idle = scrape(server_metrics);
    assert_eq!(value(&idle, "braid_server_requests_total", &[]), 0.0);
    assert_eq!(
        value(&idle, "braid_export_size_bytes", &[("export", "disk0")]),
        (64 << 20) as f64
    );

    // Load: braid bench writing for a second, scraped while it runs.
    let mut bench = Killed(
        Command::new(BRAID)
            .args([
                "bench",
                "--server",
                &format!("127.0.0.1:{port}"),
                "--key-file",
            ])
            .arg(d.join("keys.toml"))
            .args(["--rw", "randwrite", "--qd", "8", "--time", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut busy = None;
    for _ in 0..400 {
        let s = scrape(server_metrics);
        if value(&s, "braid_server_sessions", &[]) >= 1.0
            && value(&s, "braid_server_requests_total", &[]) > 0.0
        {
            busy = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let busy = busy.expect("a scrape during the bench saw its session and requests");
    assert!(value(&busy, "braid_export_sessions", &[("export", "disk0")]) >= 1.0);
    assert!(value(&busy, "braid_export_channels", &[("export", "disk0")]) >= 1.0);
    assert!(bench.0.wait().unwrap().success());

    let after = scrape(server_metrics);
    let requests = value(&after, "braid_server_requests_total", &[]);
    assert!(requests > value(&busy, "braid_server_requests_total", &[]));
    // The engine's one task worked for the bench, and never longer than
    // the server has been up: it is one task, its turns do not overlap.
    let engine_busy = value(&after, "braid_server_engine_busy_seconds_total", &[]);
    assert!(engine_busy > value(&idle, "braid_server_engine_busy_seconds_total", &[]));
    assert!(
        engine_busy < started.elapsed().as_secs_f64(),
        "{engine_busy}"
    );
    assert!(
        value(&after, "braid_server_engine_turns_total", &[])
            > value(&busy, "braid_server_engine_turns_total", &[])
    );
    let writes = histogram(
        &after,
        "braid_server_op_latency_seconds",
        &[("export", "disk0"), ("op", "write")],
    );
    let total = writes.last().unwrap();
    assert!(total.0.is_infinite() && total.1 > 0.0, "{writes:?}");
    assert!(
        writes.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative: {writes:?}"
    );
    assert_eq!(writes.len(), 22, "21 bounds and +Inf");
    // The bench's GOODBYE frees its session a moment after it exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(server_metrics);
        if value(&s, "braid_server_sessions", &[]) == 0.0 {
            assert_eq!(
                value(&s, "braid_export_sessions", &[("export", "disk0")]),
                0.0
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bench's session never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // An attached volume: IO through NBD shows in the client's metrics.
    let (sock, control) = (d.join("nbd.sock"), d.join("attach.sock"));
    let (server_addr, metrics_addr) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{client_metrics}"),
    );
    let keys = d.join("keys.toml");
    let attach_started = std::time::Instant::now();
    let _attach = common::attach(
        &[
            "--server",
            &server_addr,
            "--key-file",
            keys.to_str().unwrap(),
            "--metrics",
            &metrics_addr,
        ],
        &sock,
        &control,
        &[],
    );
    let (mut nbd, _) = Nbd::connect(&sock, "disk0");
    let data = pattern(7, 64 << 10);
    for i in 0..10 {
        assert_eq!(nbd.io(1, i << 16, data.len() as u32, &data).0, 0);
    }
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
    assert_eq!(nbd.io(0, 0, data.len() as u32, &[]).1, data);
    assert_eq!(nbd.io(4, 0, 4096, &[]).0, 0, "TRIM");
    let c = scrape(client_metrics);
    assert_eq!(value(&c, "braid_client_channels_up", &[]), 4.0);
    assert_eq!(value(&c, "braid_client_failed_total", &[]), 0.0);
    assert!(value(&c, "braid_client_completed_total", &[]) >= 13.0);
    // The driver's one task worked for those IOs, for no longer than the
    // volume has been attached.
    let driver_busy = value(&c, "braid_client_driver_busy_seconds_total", &[]);
    assert!(
        driver_busy > 0.0 && driver_busy < attach_started.elapsed().as_secs_f64(),
        "{driver_busy}"
    );
    for (op, at_least) in [
        ("write", 10.0),
        ("flush", 1.0),
        ("read", 1.0),
        ("trim", 1.0),
    ] {
        let h = histogram(
            &c,
            "braid_client_io_latency_seconds",
            &[("export", "disk0"), ("op", op)],
        );
        assert!(h.last().unwrap().1 >= at_least, "{op}: {h:?}");
    }
    for ch in ["0", "1", "2", "3"] {
        assert_eq!(
            value(&c, "braid_client_channel_up", &[("channel", ch)]),
            1.0
        );
    }
    let (status, _, _) = get(client_metrics, "/nothing");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn a_tls_server_says_when_its_certificate_expires() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (port, metrics) = (free_port(), free_port());
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let (ca, ca_key) = (d.join("client-ca.pem"), d.join("client-ca-key.pem"));
    braid_fabric_tcp::tls::generate_self_signed(&["client".into()], &ca, &ca_key).unwrap();
    let ca_arg = ca.to_str().unwrap();
    let flags = [
        "--tls",
        "--tls-client-ca",
        ca_arg,
        "--metrics",
        &metrics_addr,
    ];
    let _server = serve(d, port, "16M", &flags);
    let control = d.join("control.sock");
    wait_for(&control);
    // The certificates braid makes are valid until 4096-01-01.
    const NOT_AFTER: i64 = 67_090_118_400;
    let scraped = scrape(metrics);
    let status = common::status(&control);
    for (metric, field) in [
        ("braid_server_tls_cert_not_after", "tls_cert_not_after"),
        (
            "braid_server_tls_client_ca_not_after",
            "tls_client_ca_not_after",
        ),
    ] {
        assert_eq!(value(&scraped, metric, &[]), NOT_AFTER as f64, "{metric}");
        assert_eq!(status[field].as_i64(), Some(NOT_AFTER), "{field}");
    }
    let out = Command::new(BRAID)
        .args(["status", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "TLS certificate: expires in 7",
        "TLS client CA: expires in 7",
    ] {
        assert!(text.contains(line), "some 7xx,xxx days from now: {text}");
    }
}
