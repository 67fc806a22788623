//! `braid attach` as a user runs it: real processes, an NBD client on the
//! unix socket, and the server killed and restarted under it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{wait_for, Killed, BRAID};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(dir: &Path, port: u16) -> Killed {
    Killed(
        Command::new(BRAID)
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--export"])
            .arg(format!(
                "disk0={},size=64M",
                dir.join("disk0.img").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The smallest NBD client: fixed newstyle, GO, simple replies.
struct Nbd(UnixStream);

impl Nbd {
    fn connect(path: &Path, export: &str) -> (Nbd, u64) {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).unwrap();
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0; len as usize];
            s.read_exact(&mut d).unwrap();
            match ty {
                1 => break,
                3 if d[..2] == [0, 0] => size = u64::from_be_bytes(d[2..10].try_into().unwrap()),
                3 => {}
                other => panic!("GO refused: {other:#x}"),
            }
        }
        (Nbd(s), size)
    }

    /// One request; returns (error, data).
    fn io(&mut self, cmd: u16, offset: u64, len: u32, data: &[u8]) -> (u32, Vec<u8>) {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&7u64.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.0.write_all(&r).unwrap();
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut d = vec![
            0;
            if cmd == 0 && error == 0 {
                len as usize
            } else {
                0
            }
        ];
        self.0.read_exact(&mut d).unwrap();
        (error, d)
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn an_attached_volume_survives_a_server_kill_and_detaches_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d: PathBuf = dir.path().to_path_buf();
    let port = free_port();
    let mut server = serve(&d, port);
    wait_for(&d.join("keys.toml"));
    let (sock, control) = (d.join("nbd.sock"), d.join("attach.sock"));
    let mut attach = Killed(
        Command::new(BRAID)
            .args([
                "attach",
                "--server",
                &format!("127.0.0.1:{port}"),
                "--key-file",
            ])
            .arg(d.join("keys.toml"))
            .arg("--nbd")
            .arg(&sock)
            .arg("--control")
            .arg(&control)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&control);
    let (mut nbd, size) = Nbd::connect(&sock, "disk0");
    assert_eq!(size, 64 << 20);

    // 3 MiB: more than one braid request, so the split path runs too.
    let first = pattern(1, 3 << 20);
    assert_eq!(nbd.io(1, 1 << 20, first.len() as u32, &first).0, 0);
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");

    // kill -9 the server and start it again on the same port and files.
    drop(server);
    server = serve(&d, port);
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
