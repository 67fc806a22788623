//! `braid soak` and `braid demo`: a real `braid serve` process, a fault
//! proxy in front of it, and the verifier running through resets, stalls,
//! black holes, corrupted bytes, one-way drops and `kill -9` of the server.

use crate::client_args::{ClientArgs, PolicyArg};
use crate::faultproxy::{FaultProxy, Way};
use crate::verify::{self, Progress};
use braid_core::rng::SplitMix64;
use braid_fabric_tcp::Client;
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The soaked server's export (sparse): more than the verifier's 32 MiB.
pub(crate) const EXPORT_SIZE: u64 = 256 << 20;

#[derive(Args, Debug)]
pub(crate) struct SoakArgs {
    /// Seconds of faults.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Seed of the fault plan [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Instead of the mixed plan: black-hole a channel this many times and
    /// report how long IO took to flow again.
    #[arg(long)]
    measure_failover: Option<usize>,
    /// Soak a volume over several servers instead of one export: legs
    /// killed and restarted, channels black-holed, a live migration to a
    /// spare server, resync and mirror costs measured.
    #[arg(long, value_enum)]
    volume: Option<crate::soak_volume::VolumeShape>,
    /// Protocol engines each soaked server runs (`braid serve --engines`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    engines: u16,
}

impl SoakArgs {
    /// The command line that runs this soak again.
    fn replay(&self, seed: u64) -> String {
        let mut line = format!("braid soak --seed {seed}");
        if let Some(shape) = self.volume {
            line += &format!(" --volume {}", shape.name());
        }
        if self.engines > 1 {
            line += &format!(" --engines {}", self.engines);
        }
        line
    }
}

/// One `braid serve` process on a port, which the soaks kill -9 and
/// start again on the same data dir.
pub(crate) struct ServerProcess {
    pub(crate) dir: PathBuf,
    pub(crate) port: u16,
    engines: u16,
    /// Its export's bytes.
    size: u64,
    child: Option<Child>,
}

impl ServerProcess {
    pub(crate) async fn start(
        dir: PathBuf,
        engines: u16,
        size: u64,
    ) -> Result<ServerProcess, String> {
        let port = free_port()?;
        let child = Some(spawn_server(&dir, port, engines, size).await?);
        Ok(ServerProcess {
            dir,
            port,
            engines,
            size,
            child,
        })
    }

    /// kill -9, and wait for it to be gone.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            reaped(&mut c, Duration::from_secs(10)).await;
        }
    }

    pub(crate) async fn restart(&mut self) -> Result<(), String> {
        self.child = Some(spawn_server(&self.dir, self.port, self.engines, self.size).await?);
        Ok(())
    }

    /// SIGTERM: the server drains and exits on its own (5 s at most, then
    /// kill -9).
    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            if !reaped(&mut c, Duration::from_secs(5)).await {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for ServerProcess {
    /// No server outlives its soak, however the soak ends.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits up to `limit` for `c` to exit; whether it did. It polls rather
/// than waiting in `waitpid`, which would hold a runtime thread: braid
/// leaves tokio's process driver out, as its every turn took 4% of a
/// polling daemon's time.
async fn reaped(c: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !matches!(c.try_wait(), Ok(None)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server process and the fault proxy every client goes through.
pub(crate) struct ProxiedServer {
    pub(crate) server: ServerProcess,
    pub(crate) proxy: FaultProxy,
    proxy_addr: String,
}

impl ProxiedServer {
    /// `braid serve` of `engines` engines on `dir` (which must exist),
    /// exporting `size` bytes, and a proxy before it.
    pub(crate) async fn start(
        dir: PathBuf,
        engines: u16,
        size: u64,
    ) -> Result<ProxiedServer, String> {
        let server = ServerProcess::start(dir, engines, size).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let proxy_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let proxy = FaultProxy::start(listener, format!("127.0.0.1:{}", server.port));
        Ok(ProxiedServer {
            server,
            proxy,
            proxy_addr: proxy_addr.to_string(),
        })
    }

    /// A client of its export over `channels` channels, through the proxy.
    pub(crate) async fn connect(&self, channels: usize) -> Result<Client, String> {
        ClientArgs {
            servers: vec![self.proxy_addr.clone()],
            key_file: Some(self.server.dir.join("keys.toml")),
            key_id: None,
            export: "disk0".into(),
            channels,
            policy: PolicyArg::LeastInflight,
            io_timeout: None,
            // Small, so writes also wait for the window under the faults.
            dirty_window: "1M".into(),
            tls_ca: None,
            tls_name: None,
            tls_client_cert: None,
            tls_client_key: None,
            rdma_memory: None,
            // The verifier is not measured for latency: no spinning beside
            // the servers it checks.
            poll_us: 0,
            identity: None,
        }
        .connect()
        .await
    }
}

/// A server process, a proxy in front of it, and a verifying client.
struct Rig {
    dir: PathBuf,
    node: ProxiedServer,
    client: Client,
    progress: Arc<Progress>,
    workload: tokio::task::JoinHandle<()>,
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

async fn spawn_server(
    dir: &std::path::Path,
    port: u16,
    engines: u16,
    size: u64,
) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--engines",
            &engines.to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .arg("--export")
        .arg(format!(
            "disk0={},size={size}",
            dir.join("disk0.img").display()
        ))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("start braid serve: {e}"))?;
    // Ready when it accepts connections (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err("braid serve did not start listening within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(child)
}

impl Rig {
    async fn start(engines: u16) -> Result<Rig, String> {
        let dir = std::env::temp_dir().join(format!("braid-soak-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let node = ProxiedServer::start(dir.clone(), engines, EXPORT_SIZE).await?;
        let client = node.connect(4).await?;
        let progress = Arc::new(Progress::default());
        let workload = tokio::spawn(verify::workload(client.clone(), 8192, 16, progress.clone()));
        Ok(Rig {
            dir,
            node,
            client,
            progress,
            workload,
        })
    }

    async fn finish(mut self) -> Result<Summary, String> {
        self.progress.stop.store(true, Ordering::Relaxed);
        let _ = self.workload.await;
        let stats = self.client.status().stats;
        self.client.close().await;
        self.node.server.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
        let p = &self.progress;
        Ok(Summary {
            ios: p.ios(),
            reads: p.reads.load(Ordering::Relaxed),
            failures: p.failures.load(Ordering::Relaxed),
            errors: p.errors.load(Ordering::Relaxed),
            worst: p.worst(),
            problems: p.first_problems.lock().unwrap().clone(),
            failovers: stats.failovers,
            resends: stats.resends,
            session_resets: stats.session_resets,
            channel_failures: stats.channel_failures,
            replayed: stats.replayed_extents,
            duplicates: stats.duplicates_dropped,
            corrupt: stats.corrupt_frames,
        })
    }
}

struct Summary {
    ios: u64,
    reads: u64,
    failures: u64,
    errors: u64,
    worst: Duration,
    problems: Vec<String>,
    failovers: u64,
    resends: u64,
    session_resets: u64,
    channel_failures: u64,
    replayed: u64,
    duplicates: u64,
    corrupt: u64,
}

impl Summary {
    fn print(&self, faults: &BTreeMap<&str, u64>) {
        println!("  {:<40} {:>10}", "IOs completed", self.ios);
        println!("  {:<40} {:>10}", "reads verified", self.reads);
        for (k, v) in faults {
            println!("  fault: {k:<33} {v:>10}");
        }
        println!(
            "  {:<40} {:>10}",
            "channel failures detected", self.channel_failures
        );
        println!("  {:<40} {:>10}", "requests failed over", self.failovers);
        println!(
            "  {:<40} {:>10}",
            "requests resent after aging", self.resends
        );
        println!(
            "  {:<40} {:>10}",
            "duplicate answers dropped", self.duplicates
        );
        println!("  {:<40} {:>10}", "corrupt frames caught", self.corrupt);
        println!(
            "  {:<40} {:>10}",
            "server sessions replaced", self.session_resets
        );
        println!(
            "  {:<40} {:>10}",
            "unflushed extents replayed", self.replayed
        );
        println!(
            "  {:<40} {:>7} ms",
            "longest IO stall",
            self.worst.as_millis()
        );
        println!(
            "  {:<40} {:>10}   (must be 0)",
            "IO errors surfaced", self.errors
        );
        println!(
            "  {:<40} {:>10}   (must be 0)",
            "verification failures", self.failures
        );
        for p in &self.problems {
            println!("    {p}");
        }
    }

    fn ok(&self) -> bool {
        self.errors == 0 && self.failures == 0
    }
}

fn line(out: &mut crate::progress::ProgressLine, started: Instant, rig: &Rig) {
    let s = rig.client.status().stats;
    out.show(format_args!(
        "  {:>6.1}s  IOs {:>8}  failures {}  errors {}  failovers {}  resends {}  session resets {}",
        started.elapsed().as_secs_f64(),
        rig.progress.ios(),
        rig.progress.failures.load(Ordering::Relaxed),
        rig.progress.errors.load(Ordering::Relaxed),
        s.failovers,
        s.resends,
        s.session_resets
    ));
}

pub(crate) async fn run(args: SoakArgs) -> Result<(), String> {
    let seed = args
        .seed
        .unwrap_or_else(|| u64::from_le_bytes(crate::config::random_bytes().unwrap_or([1; 8])));
    let replay = args.replay(seed);
    if let Some(shape) = args.volume {
        return crate::soak_volume::run(shape, args.duration, seed, args.engines, &replay).await;
    }
    let mut rng = SplitMix64::new(seed);
    let mut rig = Rig::start(args.engines).await?;
    let started = Instant::now();
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut out = crate::progress::ProgressLine::new();
    if let Some(n) = args.measure_failover {
        println!("braid soak: measuring failover over {n} black-holed channels (seed {seed})");
        let mut times = Vec::new();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let baseline = rig.progress.worst_between(started, Instant::now());
        for _ in 0..n {
            let t0 = Instant::now();
            if rig.node.proxy.blackhole_one(rng.next_u64()) {
                *faults.entry("channel black-holed").or_default() += 1;
            }
            tokio::time::sleep(Duration::from_millis(2500)).await;
            times.push(rig.progress.worst_between(t0, Instant::now()));
            line(&mut out, started, &rig);
        }
        out.finish();
        times.sort();
        let pct = |p: f64| times[((p / 100.0) * (times.len() - 1) as f64).round() as usize];
        println!(
            "failover (worst IO latency after a black hole): p50 {} ms  p90 {} ms  p99 {} ms  max {} ms  (no-fault worst before: {} ms)",
            pct(50.0).as_millis(),
            pct(90.0).as_millis(),
            pct(99.0).as_millis(),
            times.last().unwrap().as_millis(),
            baseline.as_millis()
        );
    } else {
        println!(
            "braid soak: {}s of faults, seed {seed}{} (replay: {replay})",
            args.duration,
            match args.engines {
                1 => String::new(),
                n => format!(", a server of {n} engines"),
            }
        );
        let end = started + Duration::from_secs_f64(args.duration);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(200 + rng.below(800))).await;
            let r = rng.next_u64();
            let kind = match rng.below(100) {
                0..=19 => rig.node.proxy.reset_one(r).then_some("channel reset"),
                20..=27 => (rig.node.proxy.reset_all() > 0).then_some("all channels reset"),
                28..=42 => {
                    let d = Duration::from_millis(100 + rng.below(1400));
                    rig.node.proxy.stall_one(r, d).then_some("channel stalled")
                }
                43..=54 => rig
                    .node
                    .proxy
                    .blackhole_one(r)
                    .then_some("channel black-holed"),
                55..=64 => rig
                    .node
                    .proxy
                    .corrupt_one(r, Way::ToServer)
                    .then_some("byte corrupted (to server)"),
                65..=74 => rig
                    .node
                    .proxy
                    .corrupt_one(r, Way::ToClient)
                    .then_some("byte corrupted (to client)"),
                75..=84 => {
                    let way = if rng.chance(0.5) {
                        Way::ToServer
                    } else {
                        Way::ToClient
                    };
                    rig.node
                        .proxy
                        .drop_one_way(r, way)
                        .then_some("one-way drop")
                }
                _ => {
                    rig.node.server.kill().await;
                    tokio::time::sleep(Duration::from_millis(100 + rng.below(700))).await;
                    rig.node.server.restart().await?;
                    Some("server kill -9 + restart")
                }
            };
            if let Some(k) = kind {
                *faults.entry(k).or_default() += 1;
            }
            line(&mut out, started, &rig);
        }
        // Faults stop; the verifier goes on a little so the end state is
        // checked too.
        tokio::time::sleep(Duration::from_secs(2)).await;
        line(&mut out, started, &rig);
        out.finish();
    }
    let summary = rig.finish().await?;
    println!("\nsoak summary (seed {seed}):");
    summary.print(&faults);
    if summary.ok() {
        Ok(())
    } else {
        Err(format!("soak failed (replay: {replay})"))
    }
}

/// `braid demo`: a short scripted tour of the same machinery, narrated.
pub(crate) async fn demo() -> Result<(), String> {
    println!("braid demo: a real `braid serve` process, a fault proxy, and a verifying client\n");
    let mut rig = Rig::start(1).await?;
    let started = Instant::now();
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let step = |t: Instant, what: &str| println!("[{:>5.1}s] {what}", t.elapsed().as_secs_f64());
    step(
        started,
        "client connected over 4 channels; verifier writing and checking blocks",
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = rig.node.proxy.reset_all();
    *faults.entry("all channels reset").or_default() += 1;
    step(started, &format!("reset all {n} connections"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.node.proxy.blackhole_one(1);
    *faults.entry("channel black-holed").or_default() += 1;
    step(
        started,
        "black-holed one channel (it goes silent, no reset)",
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.node.proxy.corrupt_one(2, Way::ToServer);
    rig.node.proxy.corrupt_one(3, Way::ToClient);
    *faults.entry("byte corrupted").or_default() += 2;
    step(started, "flipped a bit each way on two channels");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.node.server.kill().await;
    *faults.entry("server kill -9 + restart").or_default() += 1;
    step(started, "kill -9 the server process");
    tokio::time::sleep(Duration::from_millis(700)).await;
    rig.node.server.restart().await?;
    step(
        started,
        "server restarted (new boot id); client renegotiates and replays",
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    rig.node.proxy.stall_one(4, Duration::from_millis(1000));
    *faults.entry("channel stalled").or_default() += 1;
    step(started, "stalled one channel for 1 s");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    step(started, "faults over; stopping");
    let summary = rig.finish().await?;
    println!("\nwhat happened:");
    summary.print(&faults);
    if summary.ok() {
        println!("\nno IO failed and every read matched the last acknowledged write");
        Ok(())
    } else {
        Err("demo found a problem (see above)".into())
    }
}
