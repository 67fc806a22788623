//! What the daemon's process tests share: the binary, a child that is
//! killed when the test ends, waiting for a daemon's socket or file, a
//! free port, the smallest NBD client and one HTTP GET. Not every test
//! uses each.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BRAID: &str = env!("CARGO_BIN_EXE_braid");

/// A child process killed (and reaped) when it goes out of scope.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls for `path` to appear, up to a deadline (process start-up).
pub fn wait_for(path: &Path) {
    assert!(appeared(path), "{} never appeared", path.display());
}

/// As [`wait_for`], showing the log at `log` if `path` never appears.
pub fn wait_for_showing(path: &Path, log: &Path) {
    if !appeared(path) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        panic!(
            "{} never appeared; {}:\n{text}",
            path.display(),
            log.display()
        );
    }
}

/// Whether `path` exists within 20 s.
fn appeared(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Where a child's log goes: a file named `NAME.log` in
/// BRAID_TEST_LOG_DIR when that is set (for a failure to read), else
/// nowhere.
fn log_for(name: &str) -> Stdio {
    match std::env::var_os("BRAID_TEST_LOG_DIR") {
        Some(dir) => {
            Stdio::from(std::fs::File::create(Path::new(&dir).join(format!("{name}.log"))).unwrap())
        }
        None => Stdio::null(),
    }
}

/// `braid serve` of one export `disk0` of `size` in `dir` on `port`, with
/// `extra` flags, its log kept only as `log_for` says.
pub fn serve(dir: &Path, port: u16, size: &str, extra: &[&str]) -> Killed {
    Killed(
        Command::new(BRAID)
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .arg("--export")
            .arg(format!(
                "disk0={},size={size}",
                dir.join("disk0.img").display()
            ))
            .stdout(Stdio::null())
            .stderr(log_for(&format!("serve-{port}")))
            .spawn()
            .unwrap(),
    )
}

/// `braid attach ARGS --nbd SOCK --control CONTROL` with `env`, output
/// discarded; returns once its control socket exists.
pub fn attach(args: &[&str], sock: &Path, control: &Path, env: &[(&str, &Path)]) -> Killed {
    let mut cmd = Command::new(BRAID);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let log = log_for(&control.file_name().unwrap().to_string_lossy());
    let child = cmd
        .arg("attach")
        .args(args)
        .arg("--nbd")
        .arg(sock)
        .arg("--control")
        .arg(control)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let child = Killed(child);
    wait_for(control);
    child
}

/// `braid attach --server 127.0.0.1:PORT --key-file KEYS` of export
/// disk0, with its NBD socket and control socket named `name` in `d`;
/// returns once it serves, with those two paths.
pub fn attach_export(
    d: &Path,
    port: u16,
    name: &str,
    keys: &Path,
) -> (Killed, std::path::PathBuf, std::path::PathBuf) {
    let (sock, control) = (
        d.join(format!("{name}.sock")),
        d.join(format!("{name}.ctl")),
    );
    let server = format!("127.0.0.1:{port}");
    let child = attach(
        &["--server", &server, "--key-file", keys.to_str().unwrap()],
        &sock,
        &control,
        &[],
    );
    (child, sock, control)
}

/// `braid reload --control CONTROL`: whether it succeeded, and what it
/// printed (stdout, then stderr).
pub fn reload(control: &Path) -> (bool, String) {
    let out = Command::new(BRAID)
        .args(["reload", "--control"])
        .arg(control)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.success(),
        said + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `braid status --json` of the process behind `control`.
pub fn status(control: &Path) -> serde_json::Value {
    let out = Command::new(BRAID)
        .args(["status", "--json", "--control"])
        .arg(control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A port for a child to listen on. Each test process takes ports from a
/// block of 20 of its own, held by a lock file for as long as it runs:
/// binding port 0 and dropping it let two test processes running at once
/// be handed the same port, and one test's client then reached the other
/// test's server; blocks picked by pid alone could still meet. The blocks
/// lie below Linux's ephemeral range (32768 up), where the kernel picks
/// the local port of every outgoing connection: a port checked free
/// there could be taken by one before the child binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = port_block();
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < PORTS_PER_BLOCK,
            "a test process needs more than 20 ports"
        );
        let port = base + n;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

const PORTS_PER_BLOCK: u16 = 20;

/// The first port of this process's block, locked on first use.
fn port_block() -> u16 {
    static HELD: std::sync::OnceLock<(u16, std::fs::File)> = std::sync::OnceLock::new();
    HELD.get_or_init(|| {
        let (first_port, ephemeral) = (20_000u16, 32_768u16);
        let blocks = u32::from((ephemeral - first_port) / PORTS_PER_BLOCK);
        let start = std::process::id() % blocks;
        for i in 0..blocks {
            let block = (start + i) % blocks;
            let path = std::env::temp_dir().join(format!("braid-test-ports-{block}.lock"));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Released when this process exits, however it ends (flock,
            // not File::try_lock: the workspace's MSRV predates it).
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this function owns.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked == 0 {
                return (first_port + block as u16 * PORTS_PER_BLOCK, file);
            }
        }
        panic!("every block of test ports is held by another test process");
    })
    .0
}

/// The smallest NBD client: fixed newstyle, GO, simple replies.
pub struct Nbd(pub UnixStream);

impl Nbd {
    /// Writes `data` at `at` and reads it back, asserting both succeed and
    /// the read returns what was written (`round` names it in a failure).
    pub fn round_trip(&mut self, at: u64, data: &[u8], round: u64) {
        assert_eq!(
            self.io(1, at, data.len() as u32, data).0,
            0,
            "write {round}"
        );
        let (e, back) = self.io(0, at, data.len() as u32, &[]);
        assert!(e == 0 && back == data, "read {round}");
    }

    pub fn connect(path: &Path, export: &str) -> (Nbd, u64) {
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
    pub fn io(&mut self, cmd: u16, offset: u64, len: u32, data: &[u8]) -> (u32, Vec<u8>) {
        self.send(cmd, 7, offset, len, data);
        let (handle, error, d) = self.reply(cmd == 0, len);
        assert_eq!(handle, 7);
        (error, d)
    }

    /// Sends one request under `handle` without waiting for its reply.
    pub fn send(&mut self, cmd: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.0.write_all(&r).unwrap();
    }

    /// The next simple reply: (handle, error, data), `len` bytes of data
    /// if it answers a READ that succeeded.
    pub fn reply(&mut self, read: bool, len: u32) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0; if read && error == 0 { len as usize } else { 0 }];
        self.0.read_exact(&mut d).unwrap();
        (handle, error, d)
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// One HTTP GET; returns (status line, content type, body).
pub fn get(port: u16, path: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: braid\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a header");
    let status = head.lines().next().unwrap().to_string();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    (status, content_type, body.to_string())
}
