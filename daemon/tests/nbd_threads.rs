//! `braid serve --nbd-threads`: NBD connections spread over the threads,
//! each to the one serving the fewest, all of them seeing one export; and
//! `braid status` and the metrics count them per thread.

use std::time::{Duration, Instant};

mod common;
use common::{free_port, get, pattern, serve, status, wait_for, Nbd};

fn nbd_connections(control: &std::path::Path) -> Vec<u64> {
    let v = status(control);
    let per_thread = v["nbd_connections"].as_array().expect("nbd_connections");
    per_thread.iter().map(|c| c.as_u64().unwrap()).collect()
}

#[test]
fn connections_spread_over_the_nbd_threads_and_share_one_export() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let sock_arg = sock.to_str().unwrap();
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _server = serve(
        dir.path(),
        free_port(),
        "16MiB",
        &[
            "--nbd",
            sock_arg,
            "--nbd-threads",
            "2",
            "--metrics",
            &metrics_addr,
        ],
    );
    let control = dir.path().join("control.sock");
    wait_for(&control);
    wait_for(&sock);
    assert_eq!(nbd_connections(&control), [0, 0]);

    let block = 64 * 1024;
    let mut clients: Vec<Nbd> = (0..3u8)
        .map(|i| {
            let (mut nbd, _) = Nbd::connect(&sock, "disk0");
            let data = pattern(i, block);
            let at = u64::from(i) * block as u64;
            assert_eq!(nbd.io(1, at, block as u32, &data).0, 0, "write {i}");
            nbd
        })
        .collect();
    // Each went to the thread with the fewest, the first on a tie.
    assert_eq!(nbd_connections(&control), [2, 1]);
    // Every connection reads what every other wrote, whichever thread
    // each runs on.
    for (reader, nbd) in clients.iter_mut().enumerate() {
        for writer in 0..3u8 {
            let at = u64::from(writer) * block as u64;
            let (error, back) = nbd.io(0, at, block as u32, &[]);
            assert_eq!(error, 0, "read by {reader}");
            assert!(
                back == pattern(writer, block),
                "connection {reader} reads connection {writer}'s block"
            );
        }
    }

    // The first leaves; its thread is counted down once its connection
    // has ended on the server.
    drop(clients.remove(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while nbd_connections(&control) != [1, 1] {
        assert!(
            Instant::now() < deadline,
            "still {:?} after a connection closed",
            nbd_connections(&control)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let printed = std::process::Command::new(common::BRAID)
        .args(["status", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains("NBD connections") && printed.contains("2 (per thread: 1 1)"),
        "{printed}"
    );
    let (_, _, scraped) = get(metrics_port, "/metrics");
    for thread in ["0", "1"] {
        let series = format!("braid_server_nbd_connections{{thread=\"{thread}\"}} ");
        let value = scraped
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("no {series:?} in\n{scraped}"));
        assert_eq!(value.parse::<f64>().unwrap(), 1.0, "{series}");
    }
}
