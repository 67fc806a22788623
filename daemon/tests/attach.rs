//! `braid attach` as a user runs it: real processes, an NBD client on the
//! unix socket, and the server killed and restarted under it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{attach, free_port, pattern, serve, wait_for, Nbd, BRAID};

#[test]
fn an_attached_volume_survives_a_server_kill_and_detaches_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d: PathBuf = dir.path().to_path_buf();
    let port = free_port();
    let mut server = serve(&d, port, "64M", &[]);
    wait_for(&d.join("keys.toml"));
    let (sock, control) = (d.join("nbd.sock"), d.join("attach.sock"));
    let server_addr = format!("127.0.0.1:{port}");
    let keys = d.join("keys.toml");
    let keys = keys.to_str().unwrap();
    let mut attach = attach(
        &["--server", &server_addr, "--key-file", keys],
        &sock,
        &control,
        &[],
    );
    let (mut nbd, size) = Nbd::connect(&sock, "disk0");
    assert_eq!(size, 64 << 20);

    // 3 MiB: more than one braid request, so the split path runs too.
    let first = pattern(1, 3 << 20);
    assert_eq!(nbd.io(1, 1 << 20, first.len() as u32, &first).0, 0);
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");

    // kill -9 the server and start it again on the same port and files.
    drop(server);
    server = serve(&d, port, "64M", &[]);
    let second = pattern(2, 256 << 10);
    assert_eq!(nbd.io(1, 8 << 20, second.len() as u32, &second).0, 0);
    let (e, back) = nbd.io(0, 1 << 20, first.len() as u32, &[]);
    assert_eq!(e, 0);
    assert!(back == first, "flushed data survives the restart");
    let (e, back) = nbd.io(0, 8 << 20, second.len() as u32, &[]);
    assert_eq!((e, back == second), (0, true));
    // Errors keep their NBD meaning through braid: past the end is ENOSPC
    // for a write, and the connection goes on.
    assert_eq!(nbd.io(1, size, 512, &[0; 512]).0, 28);

    let status = Command::new(BRAID)
        .args(["status", "--json", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["role"], "client");
    assert_eq!(v["channels"].as_array().map(Vec::len), Some(4));
    assert!(v["session_resets"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["failed"].as_u64(), Some(0), "no IO failed: {v}");

    let detach = Command::new(BRAID)
        .args(["detach", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(detach.status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(code) = attach.0.try_wait().unwrap() {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "attach did not exit after detach"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success());
    assert!(!sock.exists() && !control.exists(), "sockets removed");
    drop(server);
}

#[test]
fn a_writer_that_never_flushes_gets_past_a_full_dirty_window() {
    let dir = tempfile::tempdir().unwrap();
    let d: PathBuf = dir.path().to_path_buf();
    let port = free_port();
    let _server = serve(&d, port, "64M", &[]);
    wait_for(&d.join("keys.toml"));
    let server_addr = format!("127.0.0.1:{port}");
    let keys = d.join("keys.toml");
    let keys = keys.to_str().unwrap();

    // Too small to hold one write: refused before anything starts.
    let out = Command::new(BRAID)
        .args(["attach", "--server", &server_addr, "--key-file", keys])
        .args(["--dirty-window", "1K", "--nbd"])
        .arg(d.join("refused.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("max_dirty_bytes"),
        "{err}"
    );

    // One write at a time, never a FLUSH, with room for one write: every
    // other write is refused until the client's own FLUSH drains the
    // window, and nothing of the writer's is in flight to wake it.
    let (sock, control) = (d.join("nbd.sock"), d.join("attach.sock"));
    let _attach = attach(
        &[
            "--server",
            &server_addr,
            "--key-file",
            keys,
            "--dirty-window",
            "64K",
        ],
        &sock,
        &control,
        &[],
    );
    let (mut nbd, _) = Nbd::connect(&sock, "disk0");
    for round in 0..200u64 {
        let data = pattern(round as u8, 64 << 10);
        assert_eq!(
            nbd.io(1, (round % 64) << 16, 64 << 10, &data).0,
            0,
            "write {round}"
        );
    }
    let (e, back) = nbd.io(0, 0, 64 << 10, &[]);
    assert_eq!((e, back == pattern(192, 64 << 10)), (0, true));
    let v = common::status(&control);
    assert!(v["busy"].as_u64().unwrap() > 0, "the window filled: {v}");
    assert_eq!(v["failed"], 0, "{v}");
}
