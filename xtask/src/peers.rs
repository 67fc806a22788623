//! `cargo xtask bench --peers`: braid's NBD face against nbdkit (file
//! plugin), qemu-nbd and nbd-server, each serving the same kind of file
//! (1 GiB on tmpfs), over TCP and a unix socket, measured in the same run
//! by `../shared/tools/peerbench` (fio's nbd engine). Prints one table with
//! braid's ratio to the best peer per workload.

use crate::free_port;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: cargo xtask bench --peers [--runtime SECS] [--only SERVER,...] [--transport tcp|unix|both]";

const SERVERS: [&str; 4] = ["braid", "nbdkit", "qemu-nbd", "nbd-server"];

/// A server under test, stopped when dropped: our child, or (nbd-server,
/// which serves more than one client only as a daemon) a pid from its
/// pid file.
enum Killed {
    Child(Child),
    Daemon(u32),
}

impl Killed {
    fn pid(&self) -> u32 {
        match self {
            Killed::Child(c) => c.id(),
            Killed::Daemon(pid) => *pid,
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        match self {
            Killed::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Killed::Daemon(pid) => {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

/// Starts `server` on a fresh 1 GiB file; returns it and its URI.
fn start(server: &str, unix: bool, dir: &Path, braid: &Path) -> Result<(Killed, String), String> {
    let sdir = dir.join(format!("{server}-{}", if unix { "unix" } else { "tcp" }));
    let _ = fs::remove_dir_all(&sdir);
    fs::create_dir_all(&sdir).map_err(|e| e.to_string())?;
    let img = sdir.join("disk0.img");
    fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 30))
        .map_err(|e| format!("{}: {e}", img.display()))?;
    let sock = sdir.join("nbd.sock");
    let port = free_port();
    let uri = if unix {
        format!("nbd+unix:///disk0?socket={}", sock.display())
    } else {
        format!("nbd://127.0.0.1:{port}/disk0")
    };
    let addr = if unix {
        sock.display().to_string()
    } else {
        format!("127.0.0.1:{port}")
    };
    let img_s = img.display().to_string();
    let mut cmd = match server {
        "braid" => {
            let mut c = Command::new(braid);
            c.args(["serve", "--data-dir"])
                .arg(&sdir)
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .args(["--export", &format!("disk0={img_s}"), "--nbd", &addr]);
            c
        }
        "nbdkit" => {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "--exportname", "disk0"]);
            if unix {
                c.args(["-U", &addr]);
            } else {
                c.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
            }
            c.args(["file", &img_s]);
            c
        }
        "qemu-nbd" => {
            let mut c = Command::new("qemu-nbd");
            // -t: stay up between clients; -e 4: up to 4 connections (and
            // multi-conn advertised, as the others do).
            c.args(["-f", "raw", "-x", "disk0", "-t", "-e", "4"]);
            if unix {
                c.args(["-k", &addr]);
            } else {
                c.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
            }
            c.arg(&img_s);
            c
        }
        "nbd-server" => {
            let conf = sdir.join("nbd-server.conf");
            let listen = if unix {
                // port = 0 would mean inetd mode: give it an unused one.
                format!("unixsock = {addr}\nlistenaddr = 127.0.0.1\nport = {port}\n")
            } else {
                format!("listenaddr = 127.0.0.1\nport = {port}\n")
            };
            fs::write(
                &conf,
                format!("[generic]\n{listen}allowlist = true\n[disk0]\nexportname = {img_s}\nmulticonn = true\n"),
            )
            .map_err(|e| e.to_string())?;
            let mut c = Command::new("nbd-server");
            c.arg("-C").arg(&conf).arg("-p").arg(sdir.join("pid"));
            c
        }
        other => return Err(format!("unknown server {other}")),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            fs::File::create(sdir.join("server.log"))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        )
        .spawn()
        .map_err(|e| {
            format!("{server}: {e} (install peers with ../shared/tools/peerbench --install-only)")
        })?;
    let killed = if server == "nbd-server" {
        // It forks into the background; the pid file names the daemon.
        let mut child = child;
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = fs::read_to_string(sdir.join("pid"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break Killed::Daemon(pid);
            }
            if Instant::now() > deadline {
                return Err("nbd-server wrote no pid file".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        Killed::Child(child)
    };
    // Ready when an NBD client gets through the handshake.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("nbdinfo")
            .args(["--size", &uri])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok((killed, uri));
        }
        if Instant::now() > deadline {
            return Err(format!("{server} never answered on {uri}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One peerbench line: workload, IOPS, MiB/s, mean and p99 latency (µs),
/// client and server CPU (% of one core).
#[derive(Clone, Debug)]
struct Row {
    iops: f64,
    mib: f64,
    lat: f64,
    srv: f64,
}

fn parse(out: &str) -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    for line in out.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        rows.insert(
            f[0].to_string(),
            Row {
                iops: num(1),
                mib: num(2),
                lat: num(3),
                srv: num(6),
            },
        );
    }
    rows
}

pub(crate) fn run(args: &[String], root: &Path, braid: &Path) -> Result<(), String> {
    let mut runtime = "5".to_string();
    let mut only: Vec<String> = SERVERS.iter().map(|s| s.to_string()).collect();
    let mut transports = vec![false, true];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--peers" => {}
            "--runtime" => runtime = it.next().ok_or(USAGE)?.clone(),
            "--only" => {
                only = it
                    .next()
                    .ok_or(USAGE)?
                    .split(',')
                    .map(String::from)
                    .collect()
            }
            "--transport" => {
                transports = match it.next().map(String::as_str) {
                    Some("tcp") => vec![false],
                    Some("unix") => vec![true],
                    Some("both") => vec![false, true],
                    _ => return Err(USAGE.into()),
                }
            }
            _ => return Err(USAGE.into()),
        }
    }
    let peerbench = root.join("../shared/tools/peerbench");
    if !peerbench.exists() {
        return Err(format!("{} not found", peerbench.display()));
    }
    // tmpfs, as the anchor figures: the medium is the page cache either way.
    let dir = PathBuf::from("/dev/shm/braid-peerbench");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut results: BTreeMap<(bool, String), BTreeMap<String, Row>> = BTreeMap::new();
    for &unix in &transports {
        for server in only.iter() {
            let t = if unix { "unix" } else { "tcp" };
            eprintln!("==> {server} over {t} ({runtime} s per workload)");
            let (daemon, uri) = start(server, unix, &dir, braid)?;
            let out = Command::new(&peerbench)
                .args(["--runtime", &runtime, "--jobs", "4", "--server-pid"])
                .arg(daemon.pid().to_string())
                .arg(&uri)
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("peerbench: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            eprint!("{text}");
            results.insert((unix, server.clone()), parse(&text));
            drop(daemon);
        }
    }
    let _ = fs::remove_dir_all(&dir);
    print_table(&results, &only, &transports);
    Ok(())
}

fn print_table(
    results: &BTreeMap<(bool, String), BTreeMap<String, Row>>,
    servers: &[String],
    transports: &[bool],
) {
    let workloads = [
        "randread-4k-qd1",
        "randread-4k-qd32",
        "randwrite-4k-qd1",
        "randwrite-4k-qd32",
        "seqread-1m-qd8",
        "seqwrite-1m-qd8",
        "randread-4k-qd32-j4",
    ];
    println!();
    print!("{:<6} {:<22}", "", "workload (IOPS; MiB/s)");
    for s in servers {
        print!(" {s:>11}");
    }
    println!(" {:>7} {:>10}", "braid/", "braid srv");
    print!("{:<6} {:<22}", "", "");
    for _ in servers {
        print!(" {:>11}", "");
    }
    println!(" {:>7} {:>10}", "best", "CPU, lat");
    for &unix in transports {
        let t = if unix { "unix" } else { "tcp" };
        for w in workloads {
            let seq = w.starts_with("seq");
            let value = |s: &str| {
                results
                    .get(&(unix, s.to_string()))
                    .and_then(|r| r.get(w))
                    .map(|r| if seq { r.mib } else { r.iops })
            };
            print!("{t:<6} {w:<22}");
            for s in servers {
                match value(s) {
                    Some(v) => print!(" {v:>11.0}"),
                    None => print!(" {:>11}", "-"),
                }
            }
            let best_peer = servers
                .iter()
                .filter(|s| *s != "braid")
                .filter_map(|s| value(s))
                .fold(0.0f64, f64::max);
            let braid = results.get(&(unix, "braid".into())).and_then(|r| r.get(w));
            match (value("braid"), braid) {
                (Some(b), Some(r)) if best_peer > 0.0 => {
                    println!(" {:>6.2}x {:>4.0}% {:>4.0}µs", b / best_peer, r.srv, r.lat)
                }
                _ => println!(),
            }
        }
    }
}
