//! `cargo xtask bench --peers`: braid's NBD face against nbdkit (file
//! plugin), qemu-nbd and nbd-server, each serving the same kind of file
//! (1 GiB on tmpfs), over TCP and a unix socket, measured in the same run
//! by fio's nbd engine with `../shared/tools/peerbench`'s workloads, every
//! server up at once and each workload run against each in turn. Beside
//! them: the limit (fio's io_uring engine straight on the file), braid's
//! own protocol (`braid bench`), the client path (fio over NBD into `braid
//! attach`, which carries the IO to `braid serve`), the same through a
//! 2-way mirror (`braid attach --volume` over two servers), the client
//! path as a block device (fio on /dev/ublkbN of `braid attach --ublk`,
//! where the kernel has ublk), a bare TCP ping-pong as the floor under QD1
//! latency, CPU per IO for every row and the resident memory of the braid
//! processes.

mod fio;
mod floor;
mod memory_soak;
mod pairs;
mod proto;
mod rss;
mod scale;
mod steal;
mod table;

pub(crate) use floor::echo as pingpong_echo;
pub(crate) use memory_soak::run as memory_soak;
pub(crate) use scale::run as scale;

use crate::{free_port, xorshift64};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: cargo xtask bench --peers [--runtime SECS] [--rounds N] [--pairs P] [--only SERVER,...] [--transport tcp|unix|both] [--vm]
  SERVER: braid nbdkit qemu-nbd nbd-server (NBD servers), attach (fio into braid attach),
          mirror (fio into braid attach --volume, a 2-way mirror over two braid serve),
          ublk (fio's io_uring engine on /dev/ublkbN of braid attach --ublk; TCP pass only,
          needs ublk_drv and root: left out by default where the kernel has none),
          proto (braid bench), limit (fio on the file), floor (TCP ping-pong)
  N: measure every column N times (default 1) and report each cell's median round:
     on shared cores one run can be off by 2x. Within a round every NBD server is up
     at once and each workload runs against each in turn, seconds apart
  P: after each round's runs, run braid and that round's best peer back to back P times
     per workload (the order alternating) and report braid/best per pair (default 0); in
     the unix pass, attach over unix and braid's NBD face over TCP the same way (the client path)";

/// What fio reaches in a transport's pass: NBD servers, and the ublk
/// device (its link to the server is TCP, so it runs in the TCP pass only).
const SERVED: [&str; 7] = [
    "braid",
    "nbdkit",
    "qemu-nbd",
    "nbd-server",
    "attach",
    "mirror",
    "ublk",
];
/// Every column, in table order.
const COLUMNS: [&str; 10] = [
    "limit",
    "braid",
    "nbdkit",
    "qemu-nbd",
    "nbd-server",
    "proto",
    "attach",
    "ublk",
    "mirror",
    "floor",
];

/// peerbench's workloads, in its order.
pub(crate) const WORKLOADS: [&str; 7] = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
    "seqread-1m-qd8",
    "seqwrite-1m-qd8",
    "randread-4k-qd32-j4",
];

/// A server under test, stopped when dropped: our child, or (nbd-server,
/// which serves more than one client only as a daemon) a pid from its
/// pid file.
enum Killed {
    Child(Child),
    Daemon(u32),
    /// A shell leading its own process group (braid serve and braid
    /// attach, or two braid serve and a volume's braid attach): the table
    /// charges it and its children, and the whole group goes at the end.
    Group(Child),
}

impl Killed {
    fn pid(&self) -> u32 {
        match self {
            Killed::Child(c) | Killed::Group(c) => c.id(),
            Killed::Daemon(pid) => *pid,
        }
    }

    /// The braid processes whose memory the table reports, by name.
    fn braid_pids(&self, server: &str) -> Vec<(String, u32)> {
        match self {
            Killed::Child(c) if server == "braid" => vec![("serve".into(), c.id())],
            Killed::Group(c) => children(c.id()),
            Killed::Child(_) | Killed::Daemon(_) => Vec::new(),
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
            Killed::Group(c) => {
                let _ = Command::new("kill")
                    .args(["-TERM", "--", &format!("-{}", c.id())])
                    .status();
                let _ = c.wait();
            }
        }
    }
}

/// One field of /proc/PID/stat after the command name (0 is the state).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// The braid children of `parent`, named by their subcommand.
fn children(parent: u32) -> Vec<(String, u32)> {
    let mut found = Vec::new();
    for (pid, _) in child_stats(parent) {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if let Some(sub) = args.get(1).and_then(|a| std::str::from_utf8(a).ok()) {
            found.push((sub.to_string(), pid));
        }
    }
    found.sort();
    // A mirror's two servers: the table keeps one memory row per name.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (name, _) in &mut found {
        let n = seen.entry(name.clone()).or_default();
        *n += 1;
        if *n > 1 {
            *name = format!("{name} {n}");
        }
    }
    found
}

/// Every process whose parent is `parent`, with its stat fields.
fn child_stats(parent: u32) -> Vec<(u32, Vec<u64>)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat_fields(pid).filter(|f| f.first() == Some(&u64::from(parent))) {
            found.push((pid, f));
        }
    }
    found
}

/// CPU clock ticks (user + system) of `pid`, of its children it has
/// reaped, and of those still there: nbd-server forks a process per client,
/// which is gone by the time a run is charged.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    // Fields after the state: ppid is 0, utime 10, stime 11, cutime 12,
    // cstime 13.
    let own = stat_fields(pid).map_or(0, |f| f[10] + f[11] + f[12] + f[13]);
    own + child_stats(pid)
        .iter()
        .map(|(_, f)| f[10] + f[11])
        .sum::<u64>()
}

/// Clock ticks per second (USER_HZ).
pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A 1 GiB file holding data in every block, as a disk in use does. A
/// sparse file is no fair test: qemu-nbd answers reads of holes without
/// reading (measured: 4k random reads at QD32 over a unix socket, 170k
/// IOPS from a sparse file, 37-49k from one full of data), so which
/// server leads would depend on what the file never held.
fn filled_image(path: &Path) -> Result<(), String> {
    use std::io::Write;
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::io::BufWriter::new(fs::File::create(path).map_err(fail)?);
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..1024 {
        for word in chunk.chunks_exact_mut(8) {
            // No block of it is all zeroes.
            word.copy_from_slice(&xorshift64(&mut x).to_le_bytes());
        }
        file.write_all(&chunk).map_err(fail)?;
    }
    file.flush().map_err(fail)
}

/// `braid serve` on `img` (braid's protocol only) and `braid attach`
/// with `face` (how fio reaches it) in front of it, under one shell; what
/// attach prints goes to `attach.out` in `sdir`.
fn attached(braid: &Path, sdir: &Path, img: &str, face: &str) -> Command {
    let listen = format!("127.0.0.1:{}", free_port());
    let sh = |p: &Path| p.display().to_string();
    let script = format!(
        "'{braid}' serve --data-dir '{dir}' --listen {listen} --export 'disk0={img}' &\n\
         until [ -s '{dir}/keys.toml' ]; do sleep 0.1; done\n\
         '{braid}' attach --server {listen} --export disk0 --key-file '{dir}/keys.toml' \
         {face} --control '{dir}/attach.ctl' > '{dir}/attach.out' &\n\
         wait",
        braid = sh(braid),
        dir = sh(sdir),
    );
    let mut c = Command::new("sh");
    c.args(["-c", &script]).process_group(0);
    c
}

/// fio's way into a 2-way mirror, to show what a mirror costs over
/// attach's one export (every write goes to both servers, a read to one):
/// two `braid serve`, each on its own copy of the image, and `braid attach
/// --volume` over them serving NBD at `addr`, all under one shell.
fn mirror_command(braid: &Path, sdir: &Path, img_s: &str, addr: &str) -> Result<Command, String> {
    // Both legs start as the same bytes, so the volume starts in sync.
    let second = sdir.join("disk1.img");
    filled_image(&second)?;
    let sh = |p: &Path| p.display().to_string();
    let legs = [
        ("a", img_s.to_string(), free_port()),
        ("b", sh(&second), free_port()),
    ];
    let mut volume = "name = \"disk0\"\nleg_timeout = \"3s\"\n".to_string();
    let mut servers = String::new();
    for (leg, image, port) in &legs {
        let leg_dir = sdir.join(leg);
        fs::create_dir_all(&leg_dir).map_err(|e| e.to_string())?;
        let keys = leg_dir.join("keys.toml");
        volume += &format!(
            "[[leg]]\nname = \"{leg}\"\nserver = \"127.0.0.1:{port}\"\nexport = \"disk0\"\nkey_file = \"{}\"\n",
            sh(&keys)
        );
        servers += &format!(
            "'{braid}' serve --data-dir '{leg_dir}' --listen 127.0.0.1:{port} --export 'disk0={image}' &\n\
             until [ -s '{keys}' ]; do sleep 0.1; done\n",
            braid = sh(braid),
            leg_dir = sh(&leg_dir),
            keys = sh(&keys),
        );
    }
    volume += "[map]\nmirror = [\"a\", \"b\"]\n";
    let toml = sdir.join("volume.toml");
    fs::write(&toml, volume).map_err(|e| e.to_string())?;
    // The volume's dirty-region logs go to the data dir.
    let script = format!(
        "{servers}STATE_DIRECTORY='{dir}' '{braid}' attach --volume '{toml}' \
         --nbd '{addr}' --control '{dir}/attach.ctl' &\n\
         wait",
        braid = sh(braid),
        dir = sh(sdir),
        toml = sh(&toml),
    );
    let mut c = Command::new("sh");
    c.args(["-c", &script]).process_group(0);
    Ok(c)
}

/// Starts `server` on a fresh 1 GiB file of data; returns it and its URI.
fn start(server: &str, unix: bool, dir: &Path, braid: &Path) -> Result<(Killed, String), String> {
    start_with(server, unix, dir, braid, &[])
}

/// [`start`], with `serve_extra` added to `braid serve`'s flags.
fn start_with(
    server: &str,
    unix: bool,
    dir: &Path,
    braid: &Path,
    serve_extra: &[String],
) -> Result<(Killed, String), String> {
    let sdir = dir.join(format!("{server}-{}", if unix { "unix" } else { "tcp" }));
    let _ = fs::remove_dir_all(&sdir);
    fs::create_dir_all(&sdir).map_err(|e| e.to_string())?;
    let img = sdir.join("disk0.img");
    filled_image(&img)?;
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
    let mut cmd = server_command(
        server,
        unix,
        &Endpoint {
            sdir: &sdir,
            addr: &addr,
            port,
            img: &img_s,
        },
        braid,
        serve_extra,
    )?;
    let killed = spawned(server, &mut cmd, &sdir)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    if server == "ublk" {
        return ublk_device(&sdir, deadline).map(|dev| (killed, dev));
    }
    wait_ready(server, &uri, deadline)?;
    Ok((killed, uri))
}

/// Where a server under test keeps its files and listens.
struct Endpoint<'a> {
    sdir: &'a Path,
    /// The NBD unix socket's path, or 127.0.0.1:`port`.
    addr: &'a str,
    port: u16,
    /// Its 1 GiB image.
    img: &'a str,
}

/// The command that runs `server` on `at`.
fn server_command(
    server: &str,
    unix: bool,
    at: &Endpoint<'_>,
    braid: &Path,
    serve_extra: &[String],
) -> Result<Command, String> {
    let Endpoint {
        sdir,
        addr,
        port,
        img: img_s,
    } = *at;
    let cmd = match server {
        // The client path: the server exports the file over braid's
        // protocol only, and fio reaches it through braid attach.
        "attach" => attached(braid, sdir, img_s, &format!("--nbd '{addr}'")),
        "mirror" => mirror_command(braid, sdir, img_s, addr)?,
        // The client path as a block device: fio on /dev/ublkbN.
        "ublk" => attached(braid, sdir, img_s, "--ublk"),
        "braid" => {
            // braid's own protocol listens here too; proto's rows use it.
            let listen = format!("127.0.0.1:{}", free_port());
            fs::write(sdir.join("listen"), &listen).map_err(|e| e.to_string())?;
            let mut c = Command::new(braid);
            c.args(["serve", "--data-dir"])
                .arg(sdir)
                .args(["--listen", &listen])
                .args(["--export", &format!("disk0={img_s}"), "--nbd", addr])
                .args(serve_extra);
            if unix {
                // The face over TCP as well, which the client path's pairs
                // run against beside attach over unix (see `run_client_pairs`).
                let face = format!("127.0.0.1:{}", free_port());
                fs::write(sdir.join("tcp-uri"), format!("nbd://{face}/disk0"))
                    .map_err(|e| e.to_string())?;
                c.args(["--nbd", &face]);
            }
            c
        }
        "nbdkit" => {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "--exportname", "disk0"]);
            if unix {
                c.args(["-U", addr]);
            } else {
                c.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
            }
            c.args(["file", img_s]);
            c
        }
        "qemu-nbd" => {
            let mut c = Command::new("qemu-nbd");
            // -t: stay up between clients; -e 4: up to 4 connections (and
            // multi-conn advertised, as the others do).
            c.args(["-f", "raw", "-x", "disk0", "-t", "-e", "4"]);
            if unix {
                c.args(["-k", addr]);
            } else {
                c.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
            }
            c.arg(img_s);
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
    Ok(cmd)
}

/// `cmd` started, its output in `sdir`'s server.log, as what ends it:
/// its process group for braid's attach, the daemon nbd-server forks.
fn spawned(server: &str, cmd: &mut Command, sdir: &Path) -> Result<Killed, String> {
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
    Ok(if matches!(server, "attach" | "mirror" | "ublk") {
        Killed::Group(child)
    } else if server == "nbd-server" {
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
    })
}

/// Waits until an NBD client gets through the handshake at `uri`.
fn wait_ready(server: &str, uri: &str, deadline: Instant) -> Result<(), String> {
    loop {
        let ok = Command::new("nbdinfo")
            .args(["--size", uri])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{server} never answered on {uri}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether this process can make ublk devices: the kernel has ublk_drv
/// (loaded here if it is not) and we may open its control device.
fn ublk_available() -> bool {
    let _ = Command::new("modprobe")
        .arg("ublk_drv")
        .stderr(Stdio::null())
        .status();
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/ublk-control")
        .is_ok()
}

/// The block device `braid attach --ublk` announced in `sdir`, once it
/// is there.
fn ublk_device(sdir: &Path, deadline: Instant) -> Result<String, String> {
    let out = sdir.join("attach.out");
    loop {
        let announced = fs::read_to_string(&out).unwrap_or_default();
        if let Some(dev) = announced
            .lines()
            .find_map(|l| l.strip_prefix("device:"))
            .map(str::trim)
            .filter(|dev| Path::new(dev).exists())
        {
            return Ok(dev.to_string());
        }
        if Instant::now() > deadline {
            let log = fs::read_to_string(sdir.join("server.log")).unwrap_or_default();
            return Err(format!(
                "braid attach --ublk announced no device:\n{}",
                log.lines().rev().take(10).collect::<Vec<_>>().join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One workload's figures: IOPS, MiB/s, mean, median and p99 latency
/// (µs), client and server CPU (% of one core).
#[derive(Clone, Debug, Default)]
pub(crate) struct Row {
    pub(crate) iops: f64,
    pub(crate) mib: f64,
    pub(crate) lat: f64,
    pub(crate) p50: Option<f64>,
    pub(crate) p99: f64,
    pub(crate) cli: f64,
    pub(crate) srv: f64,
    /// Percent of the machine's CPU time the hypervisor took during the
    /// run (see `steal`).
    pub(crate) steal: f64,
}

impl Row {
    /// Client and server CPU per IO, in µs: the figure that transfers to
    /// a machine where they do not share two cores.
    pub(crate) fn cpu_per_io(&self) -> f64 {
        if self.iops > 0.0 {
            (self.cli + self.srv) / 100.0 / self.iops * 1e6
        } else {
            0.0
        }
    }
}

/// peerbench's lines (with CPU columns): workload, IOPS, MiB/s, mean and
/// p99 latency, client, server and other CPU. File mode prefixes the
/// workload with the engine ("io_uring-randread-4k-qd1").
fn parse(out: &str) -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    for line in out.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        let name = f[0].strip_prefix("io_uring-").unwrap_or(f[0]);
        rows.insert(
            name.to_string(),
            Row {
                iops: num(1),
                mib: num(2),
                lat: num(3),
                p50: None,
                p99: num(4),
                cli: num(5),
                srv: num(6),
                steal: 0.0,
            },
        );
    }
    rows
}

/// Resident size of one braid process through one column's run.
#[derive(Clone)]
pub(crate) struct Memory {
    pub(crate) column: String,
    pub(crate) transport: &'static str,
    pub(crate) process: String,
    pub(crate) idle_kib: u64,
    pub(crate) peak_kib: u64,
}

/// Everything one run measured.
#[derive(Default)]
pub(crate) struct Results {
    /// (transport is unix, column) -> workload -> figures.
    pub(crate) rows: BTreeMap<(bool, String), BTreeMap<String, Row>>,
    pub(crate) floor: Option<floor::Floor>,
    /// braid's QD1 p50 paired with the polling floor just before it.
    pub(crate) floor_pairs: Option<floor::Pairs>,
    /// Resident memory of the braid processes per column and transport.
    pub(crate) memory: Vec<Memory>,
    /// braid against the round's best peer, back to back.
    pub(crate) pairs: Vec<pairs::Pair>,
    /// attach over unix against braid's NBD face over TCP, back to back.
    pub(crate) client_pairs: Vec<pairs::Pair>,
}

pub(crate) fn run(args: &[String], root: &Path, braid: &Path) -> Result<(), String> {
    let mut runtime = "5".to_string();
    let mut rounds = 1usize;
    let mut pair_count = 0usize;
    let mut only: Vec<String> = COLUMNS.iter().map(|s| s.to_string()).collect();
    let mut transports = vec![false, true];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--peers" => {}
            "--runtime" => runtime = it.next().ok_or(USAGE)?.clone(),
            // The binary the host built, when the table runs in the VM.
            "--braid" => {
                it.next().ok_or(USAGE)?;
            }
            "--rounds" => rounds = it.next().and_then(|n| n.parse().ok()).ok_or(USAGE)?,
            "--pairs" => pair_count = it.next().and_then(|n| n.parse().ok()).ok_or(USAGE)?,
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
    if let Some(bad) = only.iter().find(|c| !COLUMNS.contains(&c.as_str())) {
        return Err(format!("unknown column {bad:?}\n{USAGE}"));
    }
    if only.iter().any(|c| c == "ublk") && !ublk_available() {
        if !args.iter().any(|a| a == "--only") {
            eprintln!(
                "==> no ublk column: this kernel has no ublk_drv, or we may not use it (root)"
            );
            only.retain(|c| c != "ublk");
        } else {
            return Err(
                "ublk: no /dev/ublk-control to open (modprobe ublk_drv, as root; \
                 Linux 6.0 or later)"
                    .into(),
            );
        }
    }
    let peerbench = root.join("../shared/tools/peerbench");
    if !peerbench.exists() {
        return Err(format!("{} not found", peerbench.display()));
    }
    let seconds: f64 = runtime.parse().map_err(|_| USAGE)?;
    if rounds == 0 {
        return Err(USAGE.into());
    }
    // tmpfs, as the anchor figures: the medium is the page cache either way.
    let dir = PathBuf::from("/dev/shm/braid-peerbench");
    let wanted = |c: &str| only.iter().any(|o| o == c);
    let plan = Plan {
        runtime: &runtime,
        seconds,
        transports: &transports,
        wanted: &wanted,
        dir: &dir,
        peerbench: &peerbench,
        braid,
        pairs: pair_count,
    };
    let mut measured = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        if rounds > 1 {
            eprintln!("==== round {round} of {rounds}");
        }
        measured.push(measure(&plan, round)?);
    }
    let results = median_round(&measured);
    let _ = fs::remove_dir_all(&dir);
    let columns: Vec<&str> = COLUMNS.iter().copied().filter(|c| wanted(c)).collect();
    if rounds > 1 {
        println!(
            "each cell: the round with the median IOPS of {rounds}, the lower of the middle \
             two for an even count (its CPU and latency with it); floor: the median; \
             memory: the highest peak"
        );
    }
    table::print(&results, &columns, &transports);
    table::print_round_ratios(&measured, &transports);
    table::print_client_path(&measured);
    table::print_mirror_cost(&measured, &transports);
    pairs::print(&results.pairs);
    pairs::print_client(&results.client_pairs);
    Ok(())
}

/// The table inside `../shared/tools/vmlab`'s VM, whose kernel has
/// ublk_drv: the binaries built here run there, with the host's programs
/// (fio, nbdkit, ...). Timings under TCG emulation mean little; the
/// ratios between columns of one run, and that every column works under
/// load, are what it shows.
pub(crate) fn run_in_vm(args: &[String], root: &Path, braid: &Path) -> Result<(), String> {
    let vmlab = root.join("../shared/tools/vmlab");
    let xtask = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let dir_of = |p: &Path| p.parent().map(|d| d.display().to_string());
    let shares: Vec<String> = [dir_of(braid), dir_of(&xtask)]
        .into_iter()
        .flatten()
        .chain([root.join("../shared").display().to_string()])
        .collect();
    let inner: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--vm")
        .collect();
    let command = format!(
        "{} bench {} --braid {}",
        xtask.display(),
        inner.join(" "),
        braid.display()
    );
    eprintln!("==> booting the VM (a 6.12 kernel with ublk_drv) for: {command}");
    let status = Command::new(&vmlab)
        .arg("run")
        .arg(root)
        .arg(&command)
        // Each served column holds a 1 GiB image on the guest's tmpfs.
        .env("VMLAB_MEM", "8192")
        .env("VMLAB_SHARES", shares.join(":"))
        .env("VMLAB_TIMEOUT", "3600")
        .status()
        .map_err(|e| format!("{}: {e}", vmlab.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the table in the VM: vmlab exited {status}"))
    }
}

/// Floor-then-braid pairs per QD1 shape and round (1 s each).
const FLOOR_PAIRS: usize = 4;

/// What one round measures, and with what.
struct Plan<'a> {
    runtime: &'a str,
    seconds: f64,
    transports: &'a [bool],
    wanted: &'a dyn Fn(&str) -> bool,
    dir: &'a Path,
    peerbench: &'a Path,
    braid: &'a Path,
    /// Back-to-back runs of braid and the best peer per workload.
    pairs: usize,
}

/// Every wanted column, once.
fn measure(plan: &Plan<'_>, round: usize) -> Result<Results, String> {
    let dir = plan.dir;
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut results = Results::default();
    if (plan.wanted)("floor") {
        measure_floor(plan, &mut results)?;
    }
    if (plan.wanted)("limit") {
        measure_limit(plan, &mut results)?;
    }
    if (plan.wanted)("proto") {
        measure_proto(plan, &mut results)?;
    }
    for &unix in plan.transports {
        measure_served(plan, round, unix, &mut results)?;
    }
    Ok(results)
}

/// The floor column: a TCP ping-pong between two processes.
fn measure_floor(plan: &Plan<'_>, results: &mut Results) -> Result<(), String> {
    let (runtime, seconds) = (plan.runtime, plan.seconds);
    eprintln!("==> floor: TCP ping-pong between two processes ({runtime} s per shape)");
    let f = floor::measure(std::time::Duration::from_secs_f64(seconds))?;
    eprintln!(
        "read-shaped p50 {:.1} µs, write-shaped p50 {:.1} µs",
        f.read_p50, f.write_p50
    );
    results.floor = Some(f);
    Ok(())
}

/// The limit column: fio with io_uring straight on a file, no network.
fn measure_limit(plan: &Plan<'_>, results: &mut Results) -> Result<(), String> {
    let (runtime, dir, peerbench) = (plan.runtime, plan.dir, plan.peerbench);
    eprintln!("==> limit: fio io_uring straight on the file ({runtime} s per workload)");
    let img = dir.join("limit.img");
    filled_image(&img)?;
    let out = Command::new(peerbench)
        .args([
            "--runtime",
            runtime,
            "--cpu",
            "--engines",
            "io_uring",
            "--file",
        ])
        .arg(&img)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("peerbench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{text}");
    let _ = fs::remove_file(&img);
    for unix in [false, true] {
        results.rows.insert((unix, "limit".into()), parse(&text));
    }
    Ok(())
}

/// The proto column: `braid bench` over braid's own protocol, and the
/// floor's pairs against it when the floor is wanted.
fn measure_proto(plan: &Plan<'_>, results: &mut Results) -> Result<(), String> {
    let (runtime, dir, braid, wanted) = (plan.runtime, plan.dir, plan.braid, plan.wanted);
    eprintln!("==> proto: braid bench over braid's protocol ({runtime} s per workload)");
    let (daemon, _) = start("braid", false, dir, braid)?;
    let sdir = dir.join("braid-tcp");
    let listen = fs::read_to_string(sdir.join("listen")).map_err(|e| e.to_string())?;
    let sampler = rss::PeakSampler::start(vec![daemon.pid()]);
    let idle = rss::rss_kib(daemon.pid()).unwrap_or(0);
    let rows = proto::run(
        braid,
        listen.trim(),
        &sdir.join("keys.toml"),
        daemon.pid(),
        runtime,
    )?;
    if wanted("floor") {
        eprintln!("==> floor pairs: polling ping-pong, then braid bench at QD1, {FLOOR_PAIRS} times per shape");
        let pairs = floor::pairs(FLOOR_PAIRS, std::time::Duration::from_secs(1), |write| {
            proto::qd1_p50(braid, listen.trim(), &sdir.join("keys.toml"), write)
        })?;
        results.floor_pairs = Some(pairs);
    }
    let peak = sampler.finish();
    results.memory.push(Memory {
        column: "proto".into(),
        transport: "tcp",
        process: "serve".into(),
        idle_kib: idle,
        peak_kib: peak[0],
    });
    // braid's protocol runs over TCP only: no unix rows.
    results
        .rows
        .insert((false, "proto".into()), rows.into_iter().collect());
    Ok(())
}

/// Every wanted NBD server over one transport, serving at once, each
/// workload run against each in turn; then the pairs and memory.
fn measure_served(
    plan: &Plan<'_>,
    round: usize,
    unix: bool,
    results: &mut Results,
) -> Result<(), String> {
    let (runtime, dir, braid, wanted, pairs) =
        (plan.runtime, plan.dir, plan.braid, plan.wanted, plan.pairs);
    let servers: Vec<&str> = SERVED
        .iter()
        .copied()
        .filter(|&s| wanted(s) && !(unix && s == "ublk"))
        .collect();
    if servers.is_empty() {
        return Ok(());
    }
    let t = if unix { "unix" } else { "tcp" };
    eprintln!(
        "==> over {t}: {} serving at once, each workload run against each in turn ({runtime} s per run)",
        servers.join(", ")
    );
    let mut live = Vec::with_capacity(servers.len());
    for &server in &servers {
        let (daemon, uri) = start(server, unix, dir, braid)?;
        let braids = daemon.braid_pids(server);
        let idle: Vec<u64> = braids
            .iter()
            .map(|&(_, p)| rss::rss_kib(p).unwrap_or(0))
            .collect();
        live.push(Serving {
            server,
            daemon,
            uri,
            braids,
            idle,
        });
    }
    let sampler = rss::PeakSampler::start(
        live.iter()
            .flat_map(|s| s.braids.iter().map(|&(_, p)| p))
            .collect(),
    );
    for (i, workload) in WORKLOADS.iter().enumerate() {
        for k in turns(live.len(), round * WORKLOADS.len() + i) {
            let Serving {
                server,
                daemon,
                uri,
                ..
            } = &live[k];
            let report = dir.join(format!("{server}-{t}-{workload}.json"));
            let label = format!("{server} {t} {workload}");
            let row = fio::run_least_stolen(workload, uri, daemon.pid(), runtime, &report, &label)?;
            eprintln!(
                "{server:<10} {t:<4} {workload:<22} {:>10.0} IOPS {:>9.1} MiB/s  mean {:>8.1} µs  p99 {:>8.1} µs  cpu fio {:>4.0}% server {:>4.0}%  steal {:>3.0}%",
                row.iops, row.mib, row.lat, row.p99, row.cli, row.srv, row.steal
            );
            results
                .rows
                .entry((unix, server.to_string()))
                .or_default()
                .insert(workload.to_string(), row);
        }
    }
    if pairs > 0 {
        run_pairs(results, &live, unix, pairs, runtime, dir)?;
        if unix {
            run_client_pairs(results, &live, pairs, runtime, dir)?;
        }
    }
    let mut peaks = sampler.finish().into_iter();
    for s in &live {
        for ((process, _), &idle_kib) in s.braids.iter().zip(&s.idle) {
            results.memory.push(Memory {
                column: s.server.to_string(),
                transport: t,
                process: process.clone(),
                idle_kib,
                peak_kib: peaks.next().unwrap_or(0),
            });
        }
    }
    Ok(())
}

/// Runs braid and this round's best peer back to back `count` times per
/// workload over one transport, the order alternating.
fn run_pairs(
    results: &mut Results,
    live: &[Serving<'_>],
    unix: bool,
    count: usize,
    runtime: &str,
    dir: &Path,
) -> Result<(), String> {
    let Some(braid) = live.iter().find(|s| s.server == "braid") else {
        return Ok(());
    };
    let t = if unix { "unix" } else { "tcp" };
    eprintln!(
        "==> pairs over {t}: braid and the best peer back to back, {count} times per workload"
    );
    for workload in WORKLOADS {
        let Some(best) = pairs::best_peer(results, unix, workload) else {
            continue;
        };
        let Some(peer) = live.iter().find(|s| s.server == best) else {
            continue;
        };
        for index in 0..count {
            let sides = [
                (braid.server, braid.uri.as_str(), braid.daemon.pid()),
                (peer.server, peer.uri.as_str(), peer.daemon.pid()),
            ];
            if let Some(ratio) = back_to_back(sides, index, workload, runtime, dir, t)? {
                results.pairs.push(pairs::Pair {
                    unix,
                    workload: workload.to_string(),
                    peer: best.to_string(),
                    ratio,
                });
            }
        }
    }
    Ok(())
}

/// The client path's figure, measured as the peers' are: fio through
/// `braid attach` over unix and fio over TCP straight to braid's NBD face,
/// back to back `count` times per workload, the order alternating. Its
/// per-round ratio sets runs of two transports' passes against each other,
/// minutes apart, and on these shared cores a slow spell in between moved
/// it by a third (session 41: QD1 reads 0.59x and 0.67x in full tables,
/// 0.96x with only braid and attach running).
fn run_client_pairs(
    results: &mut Results,
    live: &[Serving<'_>],
    count: usize,
    runtime: &str,
    dir: &Path,
) -> Result<(), String> {
    let attach = live.iter().find(|s| s.server == "attach");
    let face = live.iter().find(|s| s.server == "braid");
    let (Some(attach), Some(face)) = (attach, face) else {
        return Ok(());
    };
    let tcp_uri = fs::read_to_string(dir.join("braid-unix").join("tcp-uri"))
        .map_err(|e| format!("braid's NBD face over TCP: {e}"))?;
    eprintln!(
        "==> client path pairs: attach over unix and braid's NBD face over TCP back to back, {count} times per workload"
    );
    for workload in WORKLOADS {
        for index in 0..count {
            let sides = [
                ("attach", attach.uri.as_str(), attach.daemon.pid()),
                ("braid", tcp_uri.trim(), face.daemon.pid()),
            ];
            if let Some(ratio) = back_to_back(sides, index, workload, runtime, dir, "client")? {
                results.client_pairs.push(pairs::Pair {
                    unix: true,
                    workload: workload.to_string(),
                    peer: "braid".into(),
                    ratio,
                });
            }
        }
    }
    Ok(())
}

/// One pair: fio on each of two sides (name, URI, the pid charged as its
/// server), the first side first in even pairs and second in odd ones.
/// Logs both and returns the first side's throughput over the second's
/// (`None` if the second did no IO).
fn back_to_back(
    sides: [(&str, &str, u32); 2],
    index: usize,
    workload: &str,
    runtime: &str,
    dir: &Path,
    pass: &str,
) -> Result<Option<f64>, String> {
    let order = if pairs::first_side_first(index) {
        [0, 1]
    } else {
        [1, 0]
    };
    let mut iops = [0.0; 2];
    let mut stolen = [0.0; 2];
    for i in order {
        let (server, uri, pid) = sides[i];
        let report = dir.join(format!("pair-{server}-{pass}-{workload}.json"));
        let label = format!("pair {} {server} {pass} {workload}", index + 1);
        let row = fio::run_least_stolen(workload, uri, pid, runtime, &report, &label)?;
        iops[i] = row.iops;
        stolen[i] = row.steal;
    }
    if iops[1] <= 0.0 {
        return Ok(None);
    }
    let ratio = iops[0] / iops[1];
    eprintln!(
        "pair {} {pass:<6} {workload:<22} {:<10} {:>10.0} {:<10} {:>10.0} IOPS  {ratio:.2}x  steal {:.0}% and {:.0}%",
        index + 1,
        sides[0].0,
        iops[0],
        sides[1].0,
        iops[1],
        stolen[0],
        stolen[1]
    );
    Ok(Some(ratio))
}

/// An NBD server up for a round of the table.
struct Serving<'a> {
    server: &'a str,
    daemon: Killed,
    uri: String,
    /// Its braid processes, by subcommand, and their idle resident KiB.
    braids: Vec<(String, u32)>,
    idle: Vec<u64>,
}

/// The order `n` servers take one workload in, different for each `seed`
/// (a round's workload): a rotation would change who goes first but keep
/// each server right behind the same one, and a heavy run can leave the
/// machine slow for the next (session 19: braid's 1 MiB writes always
/// followed attach's, and lost two rounds of three).
fn turns(n: usize, seed: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = (seed as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // A fixed shuffle per seed, so a table can be rerun.
    for i in (1..n).rev() {
        order.swap(i, (xorshift64(&mut x) % (i as u64 + 1)) as usize);
    }
    order
}

/// One table out of several rounds: each cell is the round with the median
/// IOPS (the lower middle of an even count; its CPU and latency come from
/// the same run), the floor is the median of each shape, and memory keeps
/// the highest peak seen.
fn median_round(rounds: &[Results]) -> Results {
    let mut combined = Results::default();
    let keys: Vec<(bool, String)> = rounds[0].rows.keys().cloned().collect();
    for key in keys {
        let workloads: Vec<String> = rounds[0].rows[&key].keys().cloned().collect();
        let mut cells = BTreeMap::new();
        for w in workloads {
            let mut seen: Vec<Row> = rounds
                .iter()
                .filter_map(|r| r.rows.get(&key).and_then(|rows| rows.get(&w)).cloned())
                .collect();
            seen.sort_by(|a, b| a.iops.total_cmp(&b.iops));
            // Of an even count, the lower middle: a whole round's figures
            // must stay together, and the table should not flatter.
            let middle = (seen.len() - 1) / 2;
            cells.insert(w, seen.swap_remove(middle));
        }
        combined.rows.insert(key, cells);
    }
    let floors: Vec<&floor::Floor> = rounds.iter().filter_map(|r| r.floor.as_ref()).collect();
    if !floors.is_empty() {
        let median = |shape: fn(&floor::Floor) -> f64| {
            let v: Vec<f64> = floors.iter().map(|f| shape(f)).collect();
            table::median(&v).unwrap_or(0.0)
        };
        combined.floor = Some(floor::Floor {
            read_p50: median(|f| f.read_p50),
            write_p50: median(|f| f.write_p50),
            read_p50_polling: median(|f| f.read_p50_polling),
            write_p50_polling: median(|f| f.write_p50_polling),
        });
    }
    for round in rounds {
        if let Some(p) = &round.floor_pairs {
            combined
                .floor_pairs
                .get_or_insert_with(Default::default)
                .extend(p);
        }
    }
    for round in rounds {
        combined.pairs.extend(round.pairs.iter().cloned());
        combined
            .client_pairs
            .extend(round.client_pairs.iter().cloned());
    }
    for (i, round) in rounds.iter().enumerate() {
        for m in &round.memory {
            let same = |c: &&mut Memory| {
                c.column == m.column && c.transport == m.transport && c.process == m.process
            };
            match combined.memory.iter_mut().find(same) {
                Some(seen) => seen.peak_kib = seen.peak_kib.max(m.peak_kib),
                None if i == 0 => combined.memory.push(m.clone()),
                None => {}
            }
        }
    }
    combined
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(iops: f64, srv: f64, floor_p50: f64, peak_kib: u64) -> Results {
        let row = Row {
            iops,
            srv,
            ..Row::default()
        };
        let mut results = Results::default();
        let cells = BTreeMap::from([("randread-4k-qd1".to_string(), row)]);
        results.rows.insert((false, "braid".into()), cells);
        results.floor = Some(floor::Floor {
            read_p50: floor_p50,
            write_p50: floor_p50,
            read_p50_polling: floor_p50,
            write_p50_polling: floor_p50,
        });
        results.floor_pairs = Some(floor::Pairs {
            read: vec![(floor_p50, 2.0 * floor_p50)],
            write: vec![],
        });
        results.memory.push(Memory {
            column: "braid".into(),
            transport: "tcp",
            process: "serve".into(),
            idle_kib: 100,
            peak_kib,
        });
        results.pairs.push(pairs::Pair {
            unix: false,
            workload: "randread-4k-qd1".into(),
            peer: "nbdkit".into(),
            ratio: iops / 20_000.0,
        });
        results
    }

    #[test]
    fn every_server_takes_each_turn_once_and_not_always_behind_the_same_one() {
        let mut followers = std::collections::BTreeSet::new();
        for seed in 0..21 {
            let order = turns(5, seed);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4], "seed {seed}: {order:?}");
            // Who runs right after server 4 (attach in the full table).
            if let Some(p) = order.iter().position(|&s| s == 4) {
                if let Some(&next) = order.get(p + 1) {
                    followers.insert(next);
                }
            }
        }
        assert!(followers.len() >= 3, "followers of server 4: {followers:?}");
        assert_eq!(turns(1, 7), vec![0]);
        assert!(turns(0, 7).is_empty());
    }

    #[test]
    fn each_cell_is_its_median_round_whole_memory_keeps_the_highest_peak_and_every_pair_counts() {
        let combined = median_round(&[
            round(30_000.0, 90.0, 9.0, 500),
            round(10_000.0, 50.0, 12.0, 900),
            round(20_000.0, 70.0, 7.0, 700),
        ]);
        let cell = &combined.rows[&(false, "braid".to_string())]["randread-4k-qd1"];
        assert_eq!(cell.iops, 20_000.0);
        assert_eq!(cell.srv, 70.0, "CPU comes from the same round as the IOPS");
        assert_eq!(combined.floor.unwrap().read_p50, 9.0);
        let pairs = combined.floor_pairs.unwrap();
        assert_eq!(pairs.read.len(), 3, "every round's pairs count");
        assert_eq!(floor::median_ratio(&pairs.read), Some(2.0));
        assert_eq!(combined.memory.len(), 1);
        assert_eq!(combined.memory[0].peak_kib, 900);
        let ratios: Vec<f64> = combined.pairs.iter().map(|p| p.ratio).collect();
        assert_eq!(
            ratios,
            [1.5, 0.5, 1.0],
            "every round's pairs, in round order"
        );
    }
}
