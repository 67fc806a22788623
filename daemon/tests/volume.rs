//! `braid attach --volume` as a user runs it: a mirror over two real
//! servers, one killed under IO and started again; the volume keeps
//! serving, the returning leg is resynced, and both legs end identical.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{free_port, pattern, reload, serve, status, wait_for, Nbd, BRAID};

/// The metrics text (the metrics test parses it properly; here a line
/// or two is enough).
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: braid\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn leg_state(control: &Path, leg: &str) -> String {
    let v = status(control);
    // The newest leg of that name (a retired one may share it).
    v["legs"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|l| l["name"] == leg)
        .map(|l| l["state"].as_str().unwrap_or("").to_string())
        .unwrap()
}

fn wait_state(control: &Path, leg: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = leg_state(control, leg);
        if s.starts_with(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leg {leg} never {want}: {}",
            status(control)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temporary dir with `a`, `b` (the two servers' data dirs) and
/// `state` (the attach's), and a port for each server.
struct Rig {
    dir: tempfile::TempDir,
    ports: (u16, u16),
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        for d in ["a", "b", "state"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        Rig {
            dir,
            ports: (free_port(), free_port()),
        }
    }

    /// Both servers, 16 MiB each, once their key files exist.
    fn serve_both(&self) -> (common::Killed, common::Killed) {
        let (a, b) = (self.path("a"), self.path("b"));
        let servers = (
            serve(&a, self.ports.0, "16M", &[]),
            serve(&b, self.ports.1, "16M", &[]),
        );
        wait_for(&a.join("keys.toml"));
        wait_for(&b.join("keys.toml"));
        servers
    }

    /// v.toml: a stripe of a and b, so leg a is the only copy of half
    /// the volume, copied at 4 MiB/s when it moves, so that writes land
    /// before, during and after the copy.
    fn slowly_copied_stripe(&self) -> std::path::PathBuf {
        self.volume_file(
            r#"stripe = { chunk = "64KiB", legs = ["a", "b"] }"#,
            "resync_rate = \"4MiB\"",
        )
    }

    /// A third server, `c`, 16 MiB, once its key file exists: the server,
    /// its port and its data dir.
    fn serve_a_third(&self) -> (common::Killed, u16, std::path::PathBuf) {
        let (dc, pc) = (self.path("c"), free_port());
        std::fs::create_dir_all(&dc).unwrap();
        let server = serve(&dc, pc, "16M", &[]);
        wait_for(&dc.join("keys.toml"));
        (server, pc, dc)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// `braid attach --volume SPEC` (run `n`, with its own NBD socket and
    /// control socket, the shared state dir) and `extra` flags.
    fn attach(
        &self,
        n: u32,
        spec: &Path,
        extra: &[&str],
    ) -> (common::Killed, std::path::PathBuf, std::path::PathBuf) {
        let (sock, control) = (
            self.path(&format!("v{n}.sock")),
            self.path(&format!("v{n}.ctl")),
        );
        let mut args = vec!["--volume", spec.to_str().unwrap()];
        args.extend_from_slice(extra);
        let state = self.path("state");
        let attach = common::attach(&args, &sock, &control, &[("STATE_DIRECTORY", &state)]);
        (attach, sock, control)
    }

    /// `braid attach --volume SPEC` with sockets named `name` and the
    /// shared state dir, which must refuse to start: what it said.
    /// Bounded, as one that wrongly starts would serve forever.
    fn refused_attach(&self, spec: &Path, name: &str) -> String {
        let out = Command::new("timeout")
            .args(["20", BRAID, "attach", "--volume", spec.to_str().unwrap()])
            .arg("--nbd")
            .arg(self.path(&format!("{name}.sock")))
            .arg("--control")
            .arg(self.path(&format!("{name}.ctl")))
            .env("STATE_DIRECTORY", self.path("state"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{err}");
        err
    }

    /// v.toml: legs a and b (each with its own server's key file), the
    /// `map` line, and `extra` settings.
    fn volume_file(&self, map: &str, extra: &str) -> std::path::PathBuf {
        let (pa, pb) = self.ports;
        let spec = self.path("v.toml");
        std::fs::write(
            &spec,
            format!(
                r#"name = "v"
region = "64KiB"
leg_timeout = "300ms"
{extra}
[[leg]]
name = "a"
server = "127.0.0.1:{pa}"
export = "disk0"
key_file = "{}"
[[leg]]
name = "b"
server = "127.0.0.1:{pb}"
export = "disk0"
key_file = "{}"
[map]
{map}
"#,
                self.path("a").join("keys.toml").display(),
                self.path("b").join("keys.toml").display()
            ),
        )
        .unwrap();
        spec
    }
}

/// Writes 64 KiB chunk `n` (a pattern of its own, at a place drawn from
/// `n` among the first 500 chunks) and records it in `model`.
fn write_chunk(nbd: &mut Nbd, model: &mut [u8], n: u64) {
    let offset = (n * 7919 % 500) * (64 << 10);
    let data = pattern(n as u8, 64 << 10);
    assert_eq!(nbd.io(1, offset, data.len() as u32, &data).0, 0);
    model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
}

/// The whole volume of `size` bytes, read in 1 MiB pieces.
fn read_whole(nbd: &mut Nbd, size: u64) -> Vec<u8> {
    let mut all = Vec::new();
    for off in (0..size).step_by(1 << 20) {
        let (e, data) = nbd.io(0, off, 1 << 20, &[]);
        assert_eq!(e, 0);
        all.extend(data);
    }
    all
}

#[test]
fn a_mirror_keeps_serving_through_a_server_kill_and_resyncs_the_leg() {
    let rig = Rig::new();
    let (da, db, state) = (rig.path("a"), rig.path("b"), rig.path("state"));
    let pb = rig.ports.1;
    let (_a, mut b) = rig.serve_both();
    let spec = rig.volume_file(r#"mirror = ["a", "b"]"#, "");
    let (sock, control) = (rig.path("v.sock"), rig.path("v.ctl"));
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _attach = common::attach(
        &[
            "--volume",
            spec.to_str().unwrap(),
            "--metrics",
            &metrics_addr,
        ],
        &sock,
        &control,
        &[("STATE_DIRECTORY", &state)],
    );
    let (mut nbd, size) = Nbd::connect(&sock, "v");
    assert_eq!(size, 16 << 20);
    let first = pattern(1, 1 << 20);
    assert_eq!(nbd.io(1, 0, first.len() as u32, &first).0, 0);
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");

    // kill -9 leg b's server: writes go on, on a alone.
    drop(b);
    let second = pattern(2, 1 << 20);
    assert_eq!(nbd.io(1, 4 << 20, second.len() as u32, &second).0, 0);
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
    wait_state(&control, "b", "Away");
    let dirty = status(&control)["legs"][1]["dirty_regions"]
        .as_u64()
        .unwrap();
    assert!(
        dirty >= 16,
        "the megabyte written without b is marked: {dirty} regions"
    );
    assert!(state.join("v.b.dirty").exists(), "the log is on disk");

    // b returns: only what it missed is copied, and it is back in sync.
    b = serve(&db, pb, "16M", &[]);
    wait_state(&control, "b", "InSync");
    let (e, back) = nbd.io(0, 4 << 20, second.len() as u32, &[]);
    assert_eq!((e, back == second), (0, true));
    let text = scrape(metrics_port);
    assert!(
        text.contains("braid_volume_leg_in_sync{leg=\"b\"} 1"),
        "{text}"
    );
    let resynced = text
        .lines()
        .find_map(|l| l.strip_prefix("braid_volume_regions_resynced_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(resynced >= 16.0, "{text}");
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
    let (fa, fb) = (
        std::fs::read(da.join("disk0.img")).unwrap(),
        std::fs::read(db.join("disk0.img")).unwrap(),
    );
    assert!(fa == fb, "both legs hold the same bytes");

    // DST's suspend: leg a out of service, IO on b alone, then back.
    let volume = |action: &str, leg: &str| {
        Command::new(BRAID)
            .args(["volume", action, leg, "--control"])
            .arg(&control)
            .output()
            .unwrap()
    };
    assert!(volume("suspend", "a").status.success());
    wait_state(&control, "a", "Suspended");
    let third = pattern(3, 256 << 10);
    assert_eq!(nbd.io(1, 8 << 20, third.len() as u32, &third).0, 0);
    let refused = volume("suspend", "b");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no leg in sync"),
        "the last leg in sync cannot be suspended"
    );
    assert!(volume("resume", "a").status.success());
    wait_state(&control, "a", "InSync");
    let (e, back) = nbd.io(0, 8 << 20, third.len() as u32, &[]);
    assert_eq!((e, back == third), (0, true));
    drop(b);
}

#[test]
fn a_mirror_attaches_with_a_leg_down_and_resyncs_it_when_it_answers() {
    let rig = Rig::new();
    let (da, db, state) = (rig.path("a"), rig.path("b"), rig.path("state"));
    let (pa, pb) = rig.ports;
    let _a = serve(&da, pa, "16M", &[]);
    wait_for(&da.join("keys.toml"));
    // b's server is not running when the volume attaches. Its key file is
    // a's (the same key serves both once b starts).
    std::fs::copy(da.join("keys.toml"), db.join("keys.toml")).unwrap();

    // Linear: b holds data nobody else has, so attaching without it is
    // refused, naming the leg.
    let spec = rig.volume_file(r#"linear = ["a", "b"]"#, "");
    let err = rig.refused_attach(&spec, "refused");
    assert!(
        err.contains("leg \"b\"") && err.contains("no other leg"),
        "{err}"
    );

    let spec = rig.volume_file(r#"mirror = ["a", "b"]"#, "");
    let (sock, control) = (rig.path("v.sock"), rig.path("v.ctl"));
    let _attach = common::attach(
        &["--volume", spec.to_str().unwrap()],
        &sock,
        &control,
        &[("STATE_DIRECTORY", &state)],
    );
    let (mut nbd, size) = Nbd::connect(&sock, "v");
    assert_eq!(size, 16 << 20);
    let data = pattern(7, 1 << 20);
    assert_eq!(nbd.io(1, 2 << 20, data.len() as u32, &data).0, 0);
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
    wait_state(&control, "b", "Away");

    // b's server starts: the leg is reached, resynced and in sync.
    let _b = serve(&db, pb, "16M", &[]);
    wait_state(&control, "b", "InSync");
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
    let (fa, fb) = (
        std::fs::read(da.join("disk0.img")).unwrap(),
        std::fs::read(db.join("disk0.img")).unwrap(),
    );
    assert!(fa == fb, "both legs hold the same bytes");
    assert_eq!(&fb[2 << 20..3 << 20], &data[..]);

    // A second run of the volume on the same data dir, with sockets of its
    // own, is refused before it claims a run: the first keeps its epoch
    // (nothing fenced) and its IO goes on.
    let run = std::fs::read(state.join("v.run")).unwrap();
    let err = rig.refused_attach(&spec, "second");
    assert!(
        err.contains("volume v:") && err.contains("in use by braid"),
        "{err}"
    );
    assert_eq!(std::fs::read(state.join("v.run")).unwrap(), run);
    assert_eq!(nbd.io(1, 0, data.len() as u32, &data).0, 0);
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
}

#[test]
fn a_late_leg_whose_server_has_another_export_is_left_out() {
    let rig = Rig::new();
    let (da, db, state) = (rig.path("a"), rig.path("b"), rig.path("state"));
    let logs = rig.path("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let (pa, pb) = rig.ports;
    let _a = serve(&da, pa, "16M", &[]);
    wait_for(&da.join("keys.toml"));
    std::fs::copy(da.join("keys.toml"), db.join("keys.toml")).unwrap();
    let spec = rig.volume_file(r#"mirror = ["a", "b"]"#, "");
    let (sock, control) = (rig.path("v.sock"), rig.path("v.ctl"));
    let log = std::fs::File::create(logs.join("attach.log")).unwrap();
    let _attach = common::Killed(
        Command::new(BRAID)
            .args(["attach", "--volume", spec.to_str().unwrap(), "--nbd"])
            .arg(&sock)
            .arg("--control")
            .arg(&control)
            .env("STATE_DIRECTORY", &state)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    common::wait_for_showing(&control, &logs.join("attach.log"));
    // b's server is not running: the volume did not wait out the connect
    // patience for it, only the leg timeout (at least a second) after a.
    let log = std::fs::read_to_string(logs.join("attach.log")).unwrap();
    assert!(
        log.contains(r#"leg "b""#) && log.contains(r#"no answer 1s after leg "a" answered"#),
        "{log}"
    );
    // b answers at last, with an export of another size.
    let _b = serve(&db, pb, "8M", &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(logs.join("attach.log"))
        .unwrap()
        .contains("leaving this server out")
    {
        assert!(Instant::now() < deadline, "the mismatch was never reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(logs.join("attach.log")).unwrap();
    assert!(text.contains("8388608 bytes"), "{text}");
    // The volume goes on, on a.
    let (mut nbd, _) = Nbd::connect(&sock, "v");
    let data = pattern(9, 256 << 10);
    assert_eq!(nbd.io(1, 0, data.len() as u32, &data).0, 0);
    let (e, back) = nbd.io(0, 0, data.len() as u32, &[]);
    assert_eq!((e, back == data), (0, true));
    assert!(!leg_state(&control, "b").starts_with("InSync"));
}

#[test]
fn a_resync_interrupted_by_kill_9_of_attach_resumes_from_the_log_after_restart() {
    let rig = Rig::new();
    let (da, db) = (rig.path("a"), rig.path("b"));
    let pb = rig.ports.1;
    let (_a, mut b) = rig.serve_both();
    // A slow resync (1 MiB/s), so the restart lands in the middle of it.
    let spec = rig.volume_file(r#"mirror = ["a", "b"]"#, "resync_rate = \"1MiB\"");
    let start = |n: u32| rig.attach(n, &spec, &[]);
    let (attach, sock, control) = start(1);
    let (mut nbd, _) = Nbd::connect(&sock, "v");
    drop(b);
    let missed = pattern(5, 4 << 20);
    assert_eq!(nbd.io(1, 2 << 20, missed.len() as u32, &missed).0, 0);
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
    wait_state(&control, "b", "Away");
    b = serve(&db, pb, "16M", &[]);
    wait_state(&control, "b", "Resyncing");

    // kill -9 in the middle of the copy; a new attach reads the logs.
    drop(nbd);
    drop(attach);
    let (_attach, sock, control) = start(2);
    let s = leg_state(&control, "b");
    assert!(
        !s.starts_with("InSync"),
        "b must not be trusted before its copy ends: {s}"
    );
    wait_state(&control, "b", "InSync");
    let (mut nbd, _) = Nbd::connect(&sock, "v");
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
    let (fa, fb) = (
        std::fs::read(da.join("disk0.img")).unwrap(),
        std::fs::read(db.join("disk0.img")).unwrap(),
    );
    assert!(fb[2 << 20..6 << 20] == missed[..], "b holds what it missed");
    assert!(fa == fb, "both legs hold the same bytes");
    drop(b);
}

#[test]
fn a_leg_migrates_to_a_new_server_under_io_and_the_volume_file_follows() {
    let rig = Rig::new();
    let (_a, _b) = rig.serve_both();
    let (_c, pc, dc) = rig.serve_a_third();
    let spec = rig.slowly_copied_stripe();
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let start = |n: u32| rig.attach(n, &spec, &["--metrics", &metrics_addr]);
    let (attach, sock, control) = start(1);
    let (mut nbd, size) = Nbd::connect(&sock, "v");
    assert_eq!(size, 32 << 20);
    let mut model = vec![0u8; size as usize];
    for n in 0..40 {
        write_chunk(&mut nbd, &mut model, n);
    }
    let migrate = |args: &[&str]| {
        let mut c = Command::new(BRAID);
        c.args(["volume", "migrate"])
            .args(args)
            .arg("--control")
            .arg(&control);
        c
    };
    // Refused before anything is copied: an export already in the volume.
    let b_addr = format!("127.0.0.1:{}", rig.ports.1);
    let out = migrate(&["a", &b_addr]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already disk0 on"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let c_addr = format!("127.0.0.1:{pc}");
    let keys = dc.join("keys.toml");
    // Started and rolled back: the old leg stays, the file is untouched.
    let before = std::fs::read_to_string(&spec).unwrap();
    let out = migrate(&[
        "a",
        &c_addr,
        "--key-file",
        keys.to_str().unwrap(),
        "--no-wait",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // While it copies (a slow copy: 16 MiB at 4 MiB/s), a reload rereads
    // the new leg's key file too, though the volume file names it only
    // once it switches over.
    let (reloaded, said) = common::reload(&control);
    assert!(
        reloaded && said.contains("(migrating to it)") && said.contains(keys.to_str().unwrap()),
        "{said}"
    );
    let out = Command::new(BRAID)
        .args(["volume", "cancel", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rolled back"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(leg_state(&control, "a"), "InSync");
    assert_eq!(status(&control)["migration"], serde_json::Value::Null);
    assert_eq!(std::fs::read_to_string(&spec).unwrap(), before);
    let mut child = migrate(&["a", &c_addr, "--key-file", keys.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut n = 40;
    let deadline = Instant::now() + Duration::from_secs(120);
    let ok = loop {
        write_chunk(&mut nbd, &mut model, n);
        n += 1;
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        assert!(Instant::now() < deadline, "the migration never finished");
    };
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(ok && out.contains("migrated to a.1"), "{out}");
    assert!(n > 60, "writes went on during the copy: {n}");
    for k in n..n + 20 {
        write_chunk(&mut nbd, &mut model, k);
    }
    let v = status(&control);
    assert_eq!(v["migrations"], 1, "{v}");
    let text = scrape(metrics_port);
    assert!(text.contains("braid_volume_migrations_total 1"), "{text}");
    assert!(text.contains("braid_volume_migrating 0"), "{text}");
    assert!(
        !text.contains("leg=\"a\"") && text.contains("braid_volume_leg_in_sync{leg=\"a.1\"} 1"),
        "the retired leg is gone from the gauges: {text}"
    );
    assert_eq!(leg_state(&control, "a"), "Retired");
    wait_state(&control, "a.1", "InSync");
    let legs = status(&control)["legs"].clone();
    let new = legs.as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        new["dirty_regions"], 0,
        "the only copy has nothing to copy: {legs}"
    );
    assert!(
        read_whole(&mut nbd, size) == model,
        "the volume reads back as written"
    );
    let file = std::fs::read_to_string(&spec).unwrap();
    assert!(
        file.contains(&format!("server = \"{c_addr}\"")) && file.contains("\"a.1\", \"b\""),
        "{file}"
    );

    // A restart opens the new leg, and the volume is whole.
    drop(nbd);
    drop(attach);
    let (_attach, sock, control) = start(2);
    let (mut nbd, _) = Nbd::connect(&sock, "v");
    assert_eq!(leg_state(&control, "a.1"), "InSync");
    assert!(read_whole(&mut nbd, size) == model, "after restart, too");
}

#[test]
fn a_migration_interrupted_by_kill_9_of_attach_is_rolled_back_and_can_run_again() {
    let rig = Rig::new();
    let (_a, _b) = rig.serve_both();
    let (_c, pc, dc) = rig.serve_a_third();
    // The copy of a's 16 MiB takes 4 s: the kill lands in the middle of it.
    let spec = rig.slowly_copied_stripe();
    let start = |n: u32| rig.attach(n, &spec, &[]);
    let (attach, sock, control) = start(1);
    let (mut nbd, size) = Nbd::connect(&sock, "v");
    let mut model = vec![0u8; size as usize];
    for n in 0..40 {
        write_chunk(&mut nbd, &mut model, n);
    }
    let (c_addr, keys) = (format!("127.0.0.1:{pc}"), dc.join("keys.toml"));
    let migrate = |control: &Path, wait: bool| {
        let mut c = Command::new(BRAID);
        c.args(["volume", "migrate", "a", &c_addr, "--key-file"])
            .arg(&keys)
            .arg("--control")
            .arg(control);
        if !wait {
            c.arg("--no-wait");
        }
        c.output().unwrap()
    };
    let before = std::fs::read_to_string(&spec).unwrap();
    let out = migrate(&control, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_state(&control, "a.1", "Resyncing");
    // Written to both legs while the copy runs; acknowledged, so the old
    // leg must hold them after the restart.
    for n in 40..60 {
        write_chunk(&mut nbd, &mut model, n);
    }
    assert_eq!(status(&control)["migrations"], 0, "still copying");

    // kill -9 in the middle of the copy: the volume file still names a,
    // so the next run opens a, and the half-copied new leg is nobody's.
    drop(nbd);
    drop(attach);
    assert_eq!(std::fs::read_to_string(&spec).unwrap(), before);
    let (_attach, sock, control) = start(2);
    let (mut nbd, _) = Nbd::connect(&sock, "v");
    wait_state(&control, "a", "InSync");
    assert_eq!(status(&control)["migration"], serde_json::Value::Null);
    assert!(
        read_whole(&mut nbd, size) == model,
        "the old map holds every write"
    );

    // The same move again, to the same server's export, now holding the
    // first attempt's half copy: copied whole, and the file follows.
    let out = migrate(&control, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in 60..80 {
        write_chunk(&mut nbd, &mut model, n);
    }
    assert_eq!(status(&control)["migrations"], 1);
    assert!(
        read_whole(&mut nbd, size) == model,
        "the new leg holds every write"
    );
    let file = std::fs::read_to_string(&spec).unwrap();
    assert!(file.contains(&format!("server = \"{c_addr}\"")), "{file}");
}

/// Sends `sig` (STOP, CONT) to the server process.
fn signal(server: &common::Killed, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(server.0.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

#[test]
fn a_stripe_answers_io_to_one_leg_while_the_other_legs_server_is_stopped() {
    let rig = Rig::new();
    let db = rig.path("b");
    let (_a, b) = rig.serve_both();
    let spec = rig.volume_file(r#"stripe = { chunk = "64KiB", legs = ["a", "b"] }"#, "");
    let (_attach, sock, _control) = rig.attach(1, &spec, &[]);
    let (mut nbd, _) = Nbd::connect(&sock, "v");
    const CHUNK: u32 = 64 << 10;
    let (on_a, on_b) = (pattern(3, CHUNK as usize), pattern(4, CHUNK as usize));
    signal(&b, "STOP");
    // Chunk 1 lies on b, whose server cannot answer: that write waits ...
    nbd.send(1, 1, u64::from(CHUNK), CHUNK, &on_b);
    // ... and IO to chunk 0, on a, is answered meanwhile, out of order.
    nbd.send(1, 2, 0, CHUNK, &on_a);
    assert_eq!(nbd.reply(false, 0), (2, 0, Vec::new()), "the write to a");
    nbd.send(0, 3, 0, CHUNK, &[]);
    assert_eq!(
        nbd.reply(true, CHUNK),
        (3, 0, on_a.clone()),
        "a read from a"
    );
    // b is stopped, so nothing can have answered the write to it.
    nbd.0.set_nonblocking(true).unwrap();
    let waiting = nbd.0.read(&mut [0u8; 1]).unwrap_err().kind();
    assert_eq!(
        waiting,
        std::io::ErrorKind::WouldBlock,
        "the write to b waits"
    );
    nbd.0.set_nonblocking(false).unwrap();
    signal(&b, "CONT");
    assert_eq!(
        nbd.reply(false, 0),
        (1, 0, Vec::new()),
        "the write to b, once b runs"
    );
    let (e, back) = nbd.io(0, u64::from(CHUNK), CHUNK, &[]);
    assert_eq!((e, back == on_b), (0, true));
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
    let fb = std::fs::read(db.join("disk0.img")).unwrap();
    assert!(
        fb[..CHUNK as usize] == on_b[..],
        "b holds chunk 1 at its start"
    );
}

#[test]
fn a_quorum_mirror_acknowledges_writes_while_one_server_is_stopped() {
    let rig = Rig::new();
    let (da, db) = (rig.path("a"), rig.path("b"));
    let (_a, b) = rig.serve_both();
    let spec = rig.volume_file(r#"mirror = { quorum = 1, legs = ["a", "b"] }"#, "");
    // b must not be left behind for being slow: only the quorum lets
    // writes go on without it.
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("leg_timeout = \"300ms\"", "leg_timeout = \"600s\"");
    std::fs::write(&spec, text).unwrap();
    let (_attach, sock, control) = rig.attach(1, &spec, &[]);
    let (mut nbd, _) = Nbd::connect(&sock, "v");
    signal(&b, "STOP");
    let data = pattern(7, 1 << 20);
    assert_eq!(
        nbd.io(1, 0, data.len() as u32, &data).0,
        0,
        "acknowledged by a alone while b's server cannot answer"
    );
    let (e, back) = nbd.io(0, 0, data.len() as u32, &[]);
    assert_eq!((e, back == data), (0, true), "read from a, not from b");
    assert!(
        leg_state(&control, "b").starts_with("InSync"),
        "b lags; it did not leave"
    );
    signal(&b, "CONT");
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH, which b answers too");
    let (fa, fb) = (
        std::fs::read(da.join("disk0.img")).unwrap(),
        std::fs::read(db.join("disk0.img")).unwrap(),
    );
    assert!(fb[..1 << 20] == data[..], "b caught up");
    assert!(fa == fb, "both legs hold the same bytes");
}

#[test]
fn a_run_fenced_on_one_leg_writes_to_no_leg_after() {
    // A copy of the data dir attached elsewhere while this run still
    // runs: the newer run reaches leg a but not b. This run must stop on
    // both, not go on writing to b behind the newer run's back.
    let rig = Rig::new();
    let (_a, _b) = rig.serve_both();
    let spec = rig.volume_file(r#"mirror = ["a", "b"]"#, "");
    let (_older, sock, control) = rig.attach(1, &spec, &[]);
    let (mut nbd, _) = Nbd::connect(&sock, "v");
    let data = pattern(5, 64 << 10);
    assert_eq!(nbd.io(1, 0, data.len() as u32, &data).0, 0);
    assert_eq!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");

    let copy = rig.path("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(rig.path("state")).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
        }
    }
    let out_of_reach = std::fs::read_to_string(&spec).unwrap().replace(
        &format!("127.0.0.1:{}", rig.ports.1),
        &format!("127.0.0.1:{}", free_port()),
    );
    let spec2 = rig.path("v2.toml");
    std::fs::write(&spec2, out_of_reach).unwrap();
    let (sock2, control2) = (rig.path("v2.sock"), rig.path("v2.ctl"));
    let _newer = common::attach(
        &["--volume", spec2.to_str().unwrap()],
        &sock2,
        &control2,
        &[("STATE_DIRECTORY", &copy)],
    );
    let (mut newer, _) = Nbd::connect(&sock2, "v");

    // The older run's next write hears FENCED from a: it fails, and so
    // does every write after it, none of them reaching b.
    let b_image = rig.path("b").join("disk0.img");
    let before = std::fs::read(&b_image).unwrap();
    let fresh = pattern(6, 64 << 10);
    assert_ne!(nbd.io(1, 1 << 20, fresh.len() as u32, &fresh).0, 0);
    for at in [2u64 << 20, 3 << 20] {
        assert_ne!(nbd.io(1, at, fresh.len() as u32, &fresh).0, 0);
        let after = std::fs::read(&b_image).unwrap();
        let range = at as usize..at as usize + fresh.len();
        assert_eq!(
            after[range.clone()],
            before[range],
            "a fenced run wrote to b"
        );
    }
    assert_ne!(nbd.io(3, 0, 0, &[]).0, 0, "FLUSH");
    let v = status(&control);
    assert_eq!(v["fenced_by"], "a", "{v}");

    // The newer run serves on.
    assert_eq!(newer.io(1, 4 << 20, fresh.len() as u32, &fresh).0, 0);
    assert_eq!(newer.io(0, 0, data.len() as u32, &[]), (0, data));
}

/// A volume's legs reread their key files on `braid reload` (as on
/// SIGHUP): leg a's key is rotated, its server withdraws the old one, and
/// the leg's channels come back under the new key while the volume
/// serves; a leg key file that does not parse changes no leg.
#[test]
fn a_volume_leg_key_rotates_while_the_volume_serves() {
    let rig = Rig::new();
    let (_a, _b) = rig.serve_both();
    let spec = rig.volume_file(r#"mirror = ["a", "b"]"#, "");
    let (_attach, sock, control) = rig.attach(1, &spec, &[]);
    let (mut nbd, _) = Nbd::connect(&sock, "v");
    let data = pattern(9, 256 << 10);
    assert_eq!(nbd.io(1, 0, data.len() as u32, &data).0, 0);
    wait_state(&control, "a", "InSync");
    wait_state(&control, "b", "InSync");

    // Leg a's key file (which its server reads too) now holds only a new
    // key: the volume takes it for leg a's next handshakes.
    let keys_a = rig.path("a").join("keys.toml");
    std::fs::write(&keys_a, format!("rotated = \"{}\"\n", "5a".repeat(32))).unwrap();
    let (ok, said) = reload(&control);
    assert!(ok, "{said}");
    assert!(
        said.contains("leg a: key rotated") && said.contains("leg b: key default"),
        "{said}"
    );
    let keys: Vec<_> = status(&control)["legs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["key_id"].clone())
        .collect();
    assert_eq!(
        keys,
        [serde_json::json!("rotated"), serde_json::json!("default")]
    );
    // Server a rereads it: the old key is withdrawn, and leg a's channels
    // return under the new one.
    let server_a = rig.path("a").join("control.sock");
    let (ok, said) = reload(&server_a);
    assert!(ok && said.contains("withdrawn default"), "{said}");
    for round in 0..20u64 {
        let at = (round % 8) * (256 << 10);
        nbd.round_trip(at, &data, round);
    }
    wait_state(&control, "a", "InSync");
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&server_a)["connections"].as_u64() < Some(1) {
        assert!(Instant::now() < deadline, "leg a never reconnected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = status(&server_a);
    assert_eq!(
        s["auth_failures"], 0,
        "leg a reconnected under the new key: {s}"
    );
    assert!(s["channels_revoked"].as_u64() > Some(0), "{s}");

    // Leg b's key file broken: the reload is refused, naming the leg.
    std::fs::write(rig.path("b").join("keys.toml"), "default = \"zz\"\n").unwrap();
    let (ok, said) = reload(&control);
    assert!(!ok && said.contains("leg \"b\""), "{said}");
    assert_eq!(
        nbd.io(1, 0, data.len() as u32, &data).0,
        0,
        "the volume serves"
    );
}
