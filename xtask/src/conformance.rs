//! `cargo xtask conformance`: braid's NBD face against real NBD clients.
//!
//! Host part: a `braid serve --nbd` (TCP and unix socket), a TLS-only one
//! (STARTTLS), and a `braid attach --nbd` volume on top of the first, each
//! driven by nbdinfo, a scripted libnbd session (conformance/nbdsh_session.py),
//! qemu-img, qemu-io, nbdcopy and fio with verification. VM part: the
//! kernel's nbd-client in `../shared/tools/vmlab`: mkfs.ext4, mount, write,
//! fsck, straight to `braid serve` and through `braid attach` with the
//! server killed under it; and `braid attach --ublk` (conformance/ublk.sh:
//! /dev/ublkbN with raw IO, discard, fio verify, ext4 across a server
//! kill, detach), in the same boot. Every row names the spec clause it checks; the
//! run fails on any failed row. Missing tools fail the run under CI (the
//! `CI` environment variable) and are skipped elsewhere.

use crate::free_port;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: cargo xtask conformance [--host-only | --vm-only]";

/// How a row ended.
#[derive(PartialEq)]
enum Verdict {
    Pass,
    Fail(String),
    Skip(String),
}

struct Report {
    rows: Vec<(String, String, String, Verdict)>,
}

impl Report {
    fn add(&mut self, target: &str, clause: &str, what: &str, v: Verdict) {
        let (tag, why) = match &v {
            Verdict::Pass => ("PASS", String::new()),
            Verdict::Fail(w) => (
                "FAIL",
                format!("\n        {}", w.trim().replace('\n', "\n        ")),
            ),
            Verdict::Skip(w) => ("SKIP", format!(" ({w})")),
        };
        println!("{tag}  {target:<12} {clause}: {what}{why}");
        self.rows
            .push((target.into(), clause.into(), what.into(), v));
    }

    fn failed(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| matches!(r.3, Verdict::Fail(_)))
            .count()
    }
}

/// A child process killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd`; passes if it succeeds and `check` accepts its output.
fn verdict(cmd: &mut Command, check: impl Fn(&str) -> Result<(), String>) -> Verdict {
    match output(cmd) {
        Err(e) => Verdict::Fail(e),
        Ok(o) if !o.status.success() => {
            Verdict::Fail(format!("{cmd:?} exited {}:\n{}", o.status, text(&o)))
        }
        Ok(o) => match check(&text(&o)) {
            Ok(()) => Verdict::Pass,
            Err(e) => Verdict::Fail(format!("{e}\n{}", text(&o))),
        },
    }
}

fn contains_all(out: &str, needles: &[&str]) -> Result<(), String> {
    match needles.iter().find(|n| !out.contains(*n)) {
        Some(n) => Err(format!("output lacks {n:?}")),
        None => Ok(()),
    }
}

fn wait_for(path: &Path, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{what}: {} never appeared", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Deterministic, incompressible test data.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len).map(|_| crate::xorshift64(&mut x) as u8).collect()
}

fn spawn(braid: &Path, args: &[String], log: &Path, name: &'static str) -> Result<Daemon, String> {
    let log = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(braid)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(Daemon(child))
}

pub(crate) fn run(args: &[String], root: &Path, braid: &Path) -> Result<(), String> {
    let (mut host, mut vm) = (true, true);
    for a in args {
        match a.as_str() {
            "--host-only" => vm = false,
            "--vm-only" => host = false,
            _ => return Err(USAGE.into()),
        }
    }
    let mut report = Report { rows: Vec::new() };
    let work = root.join("target").join("conformance");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    if host {
        host_checks(&mut report, root, braid, &work)?;
    }
    if vm {
        vm_checks(&mut report, root, braid, &work)?;
    }
    let (pass, skip) = (
        report.rows.iter().filter(|r| r.3 == Verdict::Pass).count(),
        report
            .rows
            .iter()
            .filter(|r| matches!(r.3, Verdict::Skip(_)))
            .count(),
    );
    println!(
        "\nconformance: {pass} passed, {} failed, {skip} skipped",
        report.failed()
    );
    if report.failed() > 0 {
        return Err(format!("{} conformance checks failed", report.failed()));
    }
    Ok(())
}

/// Tools a host row needs; missing ones skip the row (fail it in CI).
fn need(report: &mut Report, tools: &[&str], target: &str, clause: &str, what: &str) -> bool {
    if let Some(t) = tools.iter().find(|t| !have(t)) {
        let v = if in_ci() {
            Verdict::Fail(format!("{t} not installed (CI installs it)"))
        } else {
            Verdict::Skip(format!(
                "{t} not installed; `../shared/tools/peerbench --install-only`"
            ))
        };
        report.add(target, clause, what, v);
        return false;
    }
    true
}

fn host_checks(report: &mut Report, root: &Path, braid: &Path, work: &Path) -> Result<(), String> {
    let dir = work.join("host");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let ro = dir.join("ro.img");
    fs::write(&ro, pattern(16 << 20, 9)).map_err(|e| e.to_string())?;
    let (braid_port, nbd_port) = (free_port(), free_port());
    let unix = dir.join("nbd.sock");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let _server = spawn(
        braid,
        &s(&[
            "serve",
            "--data-dir",
            &dir.display().to_string(),
            "--listen",
            &format!("127.0.0.1:{braid_port}"),
            "--export",
            &format!("disk0={},size=64M", dir.join("disk0.img").display()),
            "--export",
            &format!("ro={},ro", ro.display()),
            "--nbd",
            &format!("127.0.0.1:{nbd_port}"),
            "--nbd",
            &unix.display().to_string(),
        ]),
        &dir.join("serve.log"),
        "braid serve",
    )?;
    wait_for(&unix, "braid serve")?;
    let attach_sock = dir.join("attach.sock");
    let _attach = spawn(
        braid,
        &s(&[
            "attach",
            "--server",
            &format!("127.0.0.1:{braid_port}"),
            "--key-file",
            &dir.join("keys.toml").display().to_string(),
            "--nbd",
            &attach_sock.display().to_string(),
            "--control",
            &dir.join("attach.ctl").display().to_string(),
        ]),
        &dir.join("attach.log"),
        "braid attach",
    )?;
    wait_for(&attach_sock, "braid attach")?;
    protocol_check(
        report,
        braid,
        "braid/tcp",
        braid_port,
        &dir,
        &["--read-only-export", "ro"],
    );

    let tcp = format!("nbd://127.0.0.1:{nbd_port}");
    let targets = [
        (
            "serve/tcp",
            format!("{tcp}/disk0"),
            Some(format!("{tcp}/ro")),
        ),
        (
            "serve/unix",
            format!("nbd+unix:///disk0?socket={}", unix.display()),
            None,
        ),
        (
            "attach/unix",
            format!("nbd+unix:///disk0?socket={}", attach_sock.display()),
            None,
        ),
    ];

    let (clause, what) = ("NBD_OPT_LIST", "nbdinfo --list names every export");
    if need(report, &["nbdinfo"], "serve/tcp", clause, what) {
        let v = verdict(Command::new("nbdinfo").args(["--list", &tcp]), |o| {
            contains_all(
                o,
                &["export=\"disk0\"", "export=\"ro\"", "is_read_only: true"],
            )
        });
        report.add("serve/tcp", clause, what, v);
    }

    for (target, uri, ro_uri) in &targets {
        let (clause, what) = (
            "NBD_OPT_GO / NBD_INFO_EXPORT / NBD_INFO_BLOCK_SIZE",
            "nbdinfo --json: size, flags, contexts",
        );
        if need(report, &["nbdinfo"], target, clause, what) {
            let v = verdict(Command::new("nbdinfo").args(["--json", uri]), |o| {
                contains_all(
                    o,
                    &[
                        "\"export-size\": 67108864",
                        "\"structured\": true",
                        "\"base:allocation\"",
                        "\"can_multi_conn\": true",
                        "\"can_flush\": true",
                        "\"can_fua\": true",
                    ],
                )
            });
            report.add(target, clause, what, v);
        }

        let script = root.join("xtask/conformance/nbdsh_session.py");
        let what = "scripted libnbd session";
        if need(
            report,
            &["/usr/bin/python3", "nbdsh"],
            target,
            "libnbd",
            what,
        ) {
            // nbdsh runs the script; it runs `python3` from PATH, which must
            // be the system one that has libnbd's module (not a pyenv shim).
            let mut argv = format!("['nbdsh_session.py', {uri:?}");
            if let Some(r) = ro_uri {
                argv.push_str(&format!(", {r:?}"));
            }
            let code = format!(
                "import sys; sys.argv = {argv}]; exec(compile(open({:?}).read(), 'nbdsh_session.py', 'exec'))",
                script.display().to_string()
            );
            let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
            let mut cmd = Command::new("nbdsh");
            cmd.env("PATH", path).args(["-c", &code]);
            match output(&mut cmd) {
                Err(e) => report.add(target, "libnbd", what, Verdict::Fail(e)),
                Ok(o) => {
                    let out = text(&o);
                    let mut rows = 0;
                    for line in out.lines() {
                        let (v, rest) = if let Some(r) = line.strip_prefix("ok ") {
                            (Verdict::Pass, r)
                        } else if let Some(r) = line.strip_prefix("FAIL ") {
                            (Verdict::Fail(r.to_string()), r)
                        } else {
                            continue;
                        };
                        rows += 1;
                        let (clause, what) = rest.split_once(": ").unwrap_or((rest, ""));
                        let what = what.split(": ").next().unwrap_or(what);
                        report.add(target, clause, &format!("nbdsh: {what}"), v);
                    }
                    if rows == 0 || (!o.status.success() && report.failed() == 0) {
                        report.add(target, "libnbd", what, Verdict::Fail(out));
                    }
                }
            }
        }

        qemu_checks(report, target, uri, &dir)?;
        copy_checks(report, target, uri, &dir)?;
    }

    tls_checks(report, braid, work)?;
    direct_io_checks(report, braid, work)?;
    tmpfs_checks(report, braid, work)?;
    Ok(())
}

fn qemu_checks(report: &mut Report, target: &str, uri: &str, dir: &Path) -> Result<(), String> {
    let (clause, what) = ("NBD_OPT_GO", "qemu-img info reports the size");
    if need(report, &["qemu-img"], target, clause, what) {
        let v = verdict(
            Command::new("qemu-img").args(["info", "--output=json", uri]),
            |o| contains_all(o, &["\"virtual-size\": 67108864"]),
        );
        report.add(target, clause, what, v);
    }
    let (clause, what) = (
        "NBD_CMD_WRITE / READ / TRIM / WRITE_ZEROES / FLUSH",
        "qemu-io pattern write, read, discard, write -z, flush",
    );
    if need(report, &["qemu-io"], target, clause, what) {
        let v = verdict(
            Command::new("qemu-io").args([
                "-f",
                "raw",
                uri,
                "-c",
                "write -P 0x5c 32M 1M",
                "-c",
                "read -P 0x5c 32M 1M",
                "-c",
                "discard 32M 256k",
                "-c",
                "read -P 0 32M 256k",
                "-c",
                "write -z 33M 4k",
                "-c",
                "read -P 0 33M 4k",
                "-c",
                "read -P 0x5c 33816576 512k",
                "-c",
                "flush",
            ]),
            |o| {
                if o.contains("Pattern verification failed") || o.contains("failed:") {
                    Err("pattern mismatch".into())
                } else {
                    Ok(())
                }
            },
        );
        report.add(target, clause, what, v);
    }
    // As large as the export, so compare sees no size mismatch and every
    // byte other checks wrote is overwritten.
    let src = dir.join("src.img");
    fs::write(&src, pattern(64 << 20, 0x5eed)).map_err(|e| e.to_string())?;
    let (clause, what) = (
        "NBD_CMD_WRITE / NBD_CMD_READ / NBD_CMD_BLOCK_STATUS",
        "qemu-img convert in and out, qemu-img compare",
    );
    if need(report, &["qemu-img"], target, clause, what) {
        let src_s = src.display().to_string();
        let out = dir.join("qemu-out.img");
        let out_s = out.display().to_string();
        let steps: [&[&str]; 3] = [
            &["convert", "-n", "-f", "raw", "-O", "raw", &src_s, uri],
            &["compare", "-f", "raw", "-F", "raw", &src_s, uri],
            &["convert", "-f", "raw", "-O", "raw", uri, &out_s],
        ];
        let mut v = Verdict::Pass;
        for step in steps {
            if let Verdict::Fail(e) = verdict(Command::new("qemu-img").args(step), |_| Ok(())) {
                v = Verdict::Fail(e);
                break;
            }
        }
        if v == Verdict::Pass {
            v = same_prefix(&src, &out, 64 << 20);
        }
        report.add(target, clause, what, v);
    }
    Ok(())
}

/// Passes if `copy` starts with `src` and has `size` bytes.
fn same_prefix(src: &Path, copy: &Path, size: u64) -> Verdict {
    let (a, b) = match (fs::read(src), fs::read(copy)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Verdict::Fail(e.to_string()),
    };
    if b.len() as u64 != size {
        return Verdict::Fail(format!("copy is {} bytes, want {size}", b.len()));
    }
    if b[..a.len()] != a[..] {
        return Verdict::Fail("copy differs from the source".into());
    }
    Verdict::Pass
}

fn copy_checks(report: &mut Report, target: &str, uri: &str, dir: &Path) -> Result<(), String> {
    let src = dir.join("src.img");
    let (clause, what) = (
        "NBD_CMD_WRITE / READ / BLOCK_STATUS, multi-conn",
        "nbdcopy file to export and back, byte for byte",
    );
    if need(report, &["nbdcopy"], target, clause, what) {
        let back = dir.join("nbdcopy-back.img");
        let _ = fs::remove_file(&back);
        let mut v = verdict(Command::new("nbdcopy").arg(&src).arg(uri), |_| Ok(()));
        if v == Verdict::Pass {
            v = verdict(Command::new("nbdcopy").arg(uri).arg(&back), |_| Ok(()));
        }
        if v == Verdict::Pass {
            v = same_prefix(&src, &back, 64 << 20);
        }
        report.add(target, clause, what, v);
    }
    let (clause, what) = (
        "Ordering of messages and writes",
        "fio nbd engine: random writes at QD16, every block verified",
    );
    if need(report, &["fio"], target, clause, what) {
        let v = fio_verified(
            uri,
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--size=16m",
                "--offset=40m",
                "--iodepth=16",
            ],
        );
        report.add(target, clause, what, v);
    }
    Ok(())
}

/// `braid serve` with its data in `dir`, braid's protocol on `port`, one
/// `export` and an NBD face on each of `nbd`.
fn serve_args(dir: &Path, port: u16, export: &str, nbd: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["serve", "--data-dir", &dir.display().to_string()]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
    args.extend(["--export".into(), export.to_string()]);
    for face in nbd {
        args.extend(["--nbd".into(), face.clone()]);
    }
    args
}

/// An O_DIRECT export, whose every operation waits for the device and so
/// runs on io_uring (the default engine): braid's protocol and the NBD face
/// both read back what they wrote, and the server says io_uring ran them.
fn direct_io_checks(report: &mut Report, braid: &Path, work: &Path) -> Result<(), String> {
    let target = "serve/direct";
    let (clause, what) = (
        "--io-engine uring, O_DIRECT export",
        "braid verify, then fio randrw 4k-1M QD32 over NBD with every block verified; braid status counts io_uring operations",
    );
    if !need(report, &["fio"], target, clause, what) {
        return Ok(());
    }
    let dir = work.join("direct");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port();
    let unix = dir.join("nbd.sock");
    let control = dir.join("control.sock");
    let export = format!("disk0={},size=64M,direct", dir.join("disk0.img").display());
    let args = serve_args(&dir, port, &export, &[unix.display().to_string()]);
    let log = dir.join("serve.log");
    let _server = spawn(braid, &args, &log, "braid serve --export ...,direct")?;
    if let Err(e) = wait_for(&unix, "braid serve") {
        let why = fs::read_to_string(&log).unwrap_or_default();
        let v = if why.contains("Invalid argument") {
            Verdict::Skip("this file system refuses O_DIRECT".into())
        } else {
            Verdict::Fail(format!("{e}\n{why}"))
        };
        report.add(target, clause, what, v);
        return Ok(());
    }
    let mut v = verdict(
        Command::new(braid)
            .args([
                "verify",
                "--server",
                &format!("127.0.0.1:{port}"),
                "--key-file",
            ])
            .arg(dir.join("keys.toml"))
            .args(["--time", "3", "--qd", "16"]),
        |o| contains_all(o, &["0 verification failures, 0 IO errors"]),
    );
    if v == Verdict::Pass {
        v = fio_verified(
            &format!("nbd+unix:///disk0?socket={}", unix.display()),
            &[
                "--rw=randrw",
                "--bsrange=4k-1m",
                "--size=32m",
                "--iodepth=32",
            ],
        );
    }
    if v == Verdict::Pass {
        v = server_status(braid, &control, |o| {
            let ops = count_in(o, "io_uring_ops");
            if o.contains("io_uring refused") {
                Err("the kernel refused io_uring".into())
            } else if ops == 0 {
                Err(format!("no operation ran on io_uring: {o}"))
            } else {
                Ok(())
            }
        });
    }
    report.add(target, clause, what, v);
    Ok(())
}

/// fio's nbd engine on `uri` running the `job` options, every block it
/// wrote read back and checked.
fn fio_verified(uri: &str, job: &[&str]) -> Verdict {
    verdict(
        Command::new("fio")
            .args([
                "--name=conformance",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
            ])
            .args(job)
            .args([
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                // Else fio leaves local-conformance-0-verify.state in the cwd.
                "--verify_state_save=0",
                "--output-format=terse",
            ]),
        |o| {
            if o.contains("verify:") || o.contains("bad magic") {
                Err("fio reported a verification failure".into())
            } else {
                Ok(())
            }
        },
    )
}

/// An export on tmpfs whose pages are all in memory: large READs leave
/// from the file's mapping and large WRITEs are received straight into it
/// (backend-file's `mapping.rs`). Real clients write and read it back over
/// TCP and a unix socket, and the server says both mapped paths ran.
fn tmpfs_checks(report: &mut Report, braid: &Path, work: &Path) -> Result<(), String> {
    let target = "serve/tmpfs";
    let (clause, what) = (
        "NBD_CMD_WRITE / NBD_CMD_READ from and into the file's mapping",
        "fio 1 MiB writes and randrw 4k-1M, every block verified, nbdcopy in and back; braid status counts mapped READs and WRITEs",
    );
    if !need(report, &["fio", "nbdcopy"], target, clause, what) {
        return Ok(());
    }
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        report.add(target, clause, what, Verdict::Skip("no /dev/shm".into()));
        return Ok(());
    }
    let dir = work.join("tmpfs");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let image_dir = shm.join(format!("braid-conformance-{}", std::process::id()));
    fs::create_dir_all(&image_dir).map_err(|e| format!("{}: {e}", image_dir.display()))?;
    let v = tmpfs_run(braid, &dir, &image_dir);
    let _ = fs::remove_dir_all(&image_dir);
    report.add(target, clause, what, v?);
    Ok(())
}

fn tmpfs_run(braid: &Path, dir: &Path, image_dir: &Path) -> Result<Verdict, String> {
    // Written whole, so every page is in memory (a hole takes the
    // ordinary path).
    let image = image_dir.join("disk0.img");
    fs::write(&image, pattern(64 << 20, 0x7e57)).map_err(|e| e.to_string())?;
    let src = dir.join("src.img");
    fs::write(&src, pattern(64 << 20, 0xc0de)).map_err(|e| e.to_string())?;
    let port = free_port();
    let unix = dir.join("nbd.sock");
    let control = dir.join("control.sock");
    let export = format!("disk0={}", image.display());
    let nbd = [format!("127.0.0.1:{port}"), unix.display().to_string()];
    let args = serve_args(dir, free_port(), &export, &nbd);
    let _server = spawn(braid, &args, &dir.join("serve.log"), "braid serve (tmpfs)")?;
    wait_for(&unix, "braid serve")?;
    let tcp = format!("nbd://127.0.0.1:{port}/disk0");
    let unix_uri = format!("nbd+unix:///disk0?socket={}", unix.display());
    let mut v = fio_verified(
        &tcp,
        &["--rw=write", "--bs=1m", "--size=32m", "--iodepth=8"],
    );
    if v == Verdict::Pass {
        v = fio_verified(
            &unix_uri,
            &[
                "--rw=randrw",
                "--bsrange=4k-1m",
                "--size=32m",
                "--offset=32m",
                "--iodepth=32",
            ],
        );
    }
    if v == Verdict::Pass {
        let back = dir.join("nbdcopy-back.img");
        v = verdict(Command::new("nbdcopy").arg(&src).arg(&tcp), |_| Ok(()));
        if v == Verdict::Pass {
            v = verdict(
                Command::new("nbdcopy").arg(&unix_uri).arg(&back),
                |_| Ok(()),
            );
        }
        if v == Verdict::Pass {
            v = same_prefix(&src, &back, 64 << 20);
        }
    }
    if v == Verdict::Pass {
        v = server_status(braid, &control, |o| {
            let (reads, writes) = (
                count_in(o, "nbd_reads_mapped"),
                count_in(o, "nbd_writes_mapped"),
            );
            if reads == 0 || writes == 0 {
                Err(format!(
                    "READs sent from the mapping {reads}, WRITEs received into it {writes}: {o}"
                ))
            } else {
                Ok(())
            }
        });
    }
    Ok(v)
}

/// `braid status --json` of the server whose control socket is `control`,
/// judged by `check`.
fn server_status(
    braid: &Path,
    control: &Path,
    check: impl Fn(&str) -> Result<(), String>,
) -> Verdict {
    verdict(
        Command::new(braid)
            .args(["status", "--json", "--control"])
            .arg(control),
        check,
    )
}

/// The number after `"key":` in a JSON document, 0 if there is none.
fn count_in(json: &str, key: &str) -> u64 {
    json.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn tls_checks(report: &mut Report, braid: &Path, work: &Path) -> Result<(), String> {
    let target = "serve/tls";
    let (clause, what) = (
        "TLS: FORCEDTLS mode, NBD_OPT_STARTTLS",
        "nbdinfo over nbds:// works; plain nbd:// is refused",
    );
    if !need(report, &["nbdinfo"], target, clause, what) {
        return Ok(());
    }
    let dir = work.join("tls");
    let (_server, nbd_port, braid_port) =
        tls_nbd_server(braid, &dir, &["--tls"], "braid serve --tls")?;
    protocol_check(
        report,
        braid,
        "braid/tls",
        braid_port,
        &dir,
        &[
            "--tls-ca",
            &dir.join("tls-cert.pem").display().to_string(),
            "--tls-name",
            "localhost",
        ],
    );
    // libnbd (GnuTLS) wants a directory holding ca-cert.pem: the server's
    // self-signed certificate is its own CA.
    let certs = dir.join("client-certs");
    fs::create_dir_all(&certs).map_err(|e| e.to_string())?;
    fs::copy(dir.join("tls-cert.pem"), certs.join("ca-cert.pem")).map_err(|e| e.to_string())?;
    let tls_uri = format!(
        "nbds://localhost:{nbd_port}/disk0?tls-certificates={}",
        certs.display()
    );
    let mut v = verdict(Command::new("nbdinfo").args(["--json", &tls_uri]), |o| {
        contains_all(o, &["\"TLS\": true", "\"export-size\": 67108864"])
    });
    if v == Verdict::Pass {
        let plain =
            output(Command::new("nbdinfo").arg(format!("nbd://localhost:{nbd_port}/disk0")))?;
        if plain.status.success() {
            v = Verdict::Fail("a plain-text client got in to a TLS-only server".into());
        }
    }
    report.add(target, clause, what, v);
    client_certificate_check(report, braid, &dir, &certs)
}

/// `--tls-client-ca` holds for the NBD face as for braid's own protocol.
/// The first TLS server's self-signed certificate serves as the CA, the
/// server certificate and the client certificate alike.
fn client_certificate_check(
    report: &mut Report,
    braid: &Path,
    first: &Path,
    certs: &Path,
) -> Result<(), String> {
    let (target, clause, what) = (
        "serve/tls-client-ca",
        "TLS: client certificates (braid: --tls-client-ca)",
        "nbdinfo without a client certificate is refused, with one it gets in",
    );
    let dir = first.join("client-ca");
    let (cert, key) = (first.join("tls-cert.pem"), first.join("tls-key.pem"));
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let tls = [
        "--tls-cert",
        &cert_arg,
        "--tls-key",
        &key_arg,
        "--tls-client-ca",
        &cert_arg,
    ];
    let (_server, nbd_port, _) = tls_nbd_server(braid, &dir, &tls, "braid serve --tls-client-ca")?;
    let uri = |d: &Path| {
        format!(
            "nbds://localhost:{nbd_port}/disk0?tls-certificates={}",
            d.display()
        )
    };
    let without = output(Command::new("nbdinfo").arg(uri(certs)))?;
    let with_dir = dir.join("with-client-cert");
    fs::create_dir_all(&with_dir).map_err(|e| e.to_string())?;
    for (from, to) in [
        (&cert, "ca-cert.pem"),
        (&cert, "client-cert.pem"),
        (&key, "client-key.pem"),
    ] {
        fs::copy(from, with_dir.join(to)).map_err(|e| e.to_string())?;
    }
    let v = if without.status.success() {
        Verdict::Fail("a client without a certificate got in".into())
    } else {
        verdict(
            Command::new("nbdinfo").args(["--json", &uri(&with_dir)]),
            |o| contains_all(o, &["\"TLS\": true", "\"export-size\": 67108864"]),
        )
    };
    report.add(target, clause, what, v);
    Ok(())
}

/// A `braid serve` with `tls` flags and a 64 MiB export, also on NBD; its
/// NBD port once it accepts connections.
fn tls_nbd_server(
    braid: &Path,
    dir: &Path,
    tls: &[&str],
    name: &'static str,
) -> Result<(Daemon, u16, u16), String> {
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let (nbd_port, braid_port) = (free_port(), free_port());
    let mut args: Vec<String> = vec!["serve".into()];
    args.extend(tls.iter().map(|a| a.to_string()));
    args.extend([
        "--data-dir".into(),
        dir.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{braid_port}"),
        "--export".into(),
        format!("disk0={},size=64M", dir.join("disk0.img").display()),
        "--nbd".into(),
        format!("127.0.0.1:{nbd_port}"),
    ]);
    let server = spawn(braid, &args, &dir.join("serve.log"), name)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", nbd_port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{name}: NBD port never opened"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, nbd_port, braid_port))
}

/// `braid conformance` against a braid server: braid's own protocol,
/// clause by clause (docs/PROTOCOL.md); one row, the checker's table in
/// its failure.
fn protocol_check(
    report: &mut Report,
    braid: &Path,
    target: &str,
    port: u16,
    dir: &Path,
    extra: &[&str],
) {
    let mut cmd = Command::new(braid);
    cmd.args([
        "conformance",
        "--server",
        &format!("127.0.0.1:{port}"),
        "--key-file",
    ])
    .arg(dir.join("keys.toml"))
    .args(extra);
    let v = verdict(&mut cmd, |o| contains_all(o, &["0 fail"]));
    report.add(
        target,
        "PROTOCOL.md [2.1]..[7.3]",
        "braid conformance: every numbered clause of braid's protocol",
        v,
    );
}

fn vm_checks(report: &mut Report, root: &Path, braid: &Path, work: &Path) -> Result<(), String> {
    let target = "vm/kernel";
    let vmlab = root.join("../shared/tools/vmlab");
    let (clause, what) = (
        "kernel nbd-client",
        "mkfs.ext4, mount, write, fsck: via serve --nbd (TCP) and via attach (unix) across a server kill -9",
    );
    if !vmlab.exists() {
        let v = if in_ci() {
            Verdict::Fail(format!("{} not found", vmlab.display()))
        } else {
            Verdict::Skip(format!("{} not found", vmlab.display()))
        };
        report.add(target, clause, what, v);
        return Ok(());
    }
    let dir = work.join("vm");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let scripts = root.join("xtask/conformance");
    eprintln!("==> booting the VM for the kernel nbd-client, ublk and RDMA checks (about five minutes under TCG)");
    let o = output(
        Command::new(&vmlab)
            .arg("run")
            .arg(root)
            .arg("bash")
            .arg(scripts.join("vm.sh"))
            .arg(braid)
            .arg(&dir)
            .env("VMLAB_TIMEOUT", "900"),
    )?;
    let out = text(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let mut rows = 0;
    let mut failed_rows = 0;
    let mut lines = stdout.lines().peekable();
    while let Some(line) = lines.next() {
        let (row, verdict) = if let Some(r) = line.strip_prefix("ok ") {
            (r, Verdict::Pass)
        } else if let Some(r) = line.strip_prefix("FAIL ") {
            failed_rows += 1;
            (r, Verdict::Fail(fail_detail(&mut lines)))
        } else if let Some(r) = line.strip_prefix("SKIP ") {
            let why = "built without the RDMA fabric (needs cmake and clang)".to_string();
            (
                r,
                if in_ci() {
                    Verdict::Fail(why)
                } else {
                    Verdict::Skip(why)
                },
            )
        } else {
            if let Some(f) = line.strip_prefix("figure ") {
                println!("figure: {f}");
            }
            continue;
        };
        rows += 1;
        let row = strip_ansi(row);
        if let Some(r) = row.strip_prefix("ublk: ") {
            report.add("vm/ublk", "ublk block device", r, verdict);
        } else if let Some(r) = row.strip_prefix("rdma: ") {
            report.add("vm/rdma", "RDMA fabric (soft-RoCE)", r, verdict);
        } else {
            report.add(target, "kernel nbd-client", &row, verdict);
        }
    }
    // A failed row already says what went wrong; the VM's whole tail is
    // for a script that stopped without saying (CI shows only so much).
    if (!o.status.success() && failed_rows == 0) || rows == 0 {
        report.add(
            target,
            clause,
            what,
            Verdict::Fail(format!("vmlab exited {}:\n{}", o.status, tail(&out, 60))),
        );
    }
    Ok(())
}

/// The lines a VM script printed after a FAIL row (the log tail its
/// message quotes), up to the next row, without colours: they are what
/// a reader of CI's output needs to tell why, so they go with the row.
fn fail_detail<'a>(lines: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>) -> String {
    let mut detail = Vec::new();
    while let Some(next) = lines.peek() {
        if ["ok ", "FAIL ", "SKIP ", "figure "]
            .iter()
            .any(|p| next.starts_with(p))
        {
            break;
        }
        let next = strip_ansi(lines.next().unwrap_or_default());
        if !next.trim().is_empty() && detail.len() < 40 {
            detail.push(next);
        }
    }
    detail.join("\n")
}

/// `tracing`'s colour escapes (ESC [ ... m) make CI's text unreadable.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The braid binary `cargo xtask conformance` tests.
pub(crate) fn braid_binary(root: &Path, profile: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    dir.join(profile).join("braid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_vm_row_keeps_the_lines_it_quoted_without_colours() {
        let out = "ok rdma: first\nFAIL rdma: link down: \x1b[2mchannel down\x1b[0m\n\n\
                   verified 9 reads: 2 verification failures, 0 IO errors\n\
                   protocol: 0 resent\nfigure rdma: x\nok rdma: last\n";
        let mut lines = out.lines().peekable();
        assert_eq!(lines.next(), Some("ok rdma: first"));
        assert!(lines.next().is_some_and(|l| l.starts_with("FAIL ")));
        assert_eq!(
            fail_detail(&mut lines),
            "verified 9 reads: 2 verification failures, 0 IO errors\nprotocol: 0 resent"
        );
        assert_eq!(lines.next(), Some("figure rdma: x"));
        assert_eq!(
            strip_ansi("link down: \x1b[2mchannel down\x1b[0m"),
            "link down: channel down"
        );
    }
}
