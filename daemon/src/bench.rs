//! `braid bench`: fio-like workloads through the whole protocol.

use crate::client_args::{print_channels, ClientArgs};
use crate::config;
use crate::histogram::Histogram;
use braid_core::client::{ExportInfo, IoRequest};
use braid_core::rng::SplitMix64;
use clap::{Args, ValueEnum};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Rw {
    Randread,
    Randwrite,
    Randrw,
    Read,
    Write,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Block size ("4k", "1M").
    #[arg(long, default_value = "4k")]
    bs: String,
    /// IOs kept in flight.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    time: f64,
    /// Bytes of the export to touch [default: all of it, at most 1 GiB].
    #[arg(long)]
    span: Option<String>,
}

struct Shared {
    ios: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// One of the IOs kept in flight: each answer, heard on the client's
/// driver task, records its latency and hands the next IO over at once. A
/// task per IO in flight, woken by each answer and then waking the driver
/// with the next request, put two task hops on every IO's path that no
/// frontend pays (the NBD and ublk faces hand IO over the same way).
struct Chain {
    rng: SplitMix64,
    seq: u64,
    hist: Histogram,
    rw: Rw,
    bs: u64,
    blocks: u64,
    payload: bytes::Bytes,
    client: braid_fabric_tcp::Client,
    shared: Arc<Shared>,
    /// Where the histogram goes once the run stops.
    finished: tokio::sync::mpsc::UnboundedSender<Histogram>,
}

impl Chain {
    fn next_io(&mut self) -> IoRequest {
        let block = match self.rw {
            Rw::Read | Rw::Write => {
                self.seq = (self.seq + 1) % self.blocks;
                self.seq
            }
            _ => self.rng.below(self.blocks),
        };
        let write = match self.rw {
            Rw::Randwrite | Rw::Write => true,
            Rw::Randrw => self.rng.chance(0.5),
            _ => false,
        };
        if write {
            IoRequest::write(block * self.bs, self.payload.clone(), false)
        } else {
            IoRequest::read(block * self.bs, self.bs as u32)
        }
    }

    /// Issues the next IO, or hands the histogram back once stopped.
    fn issue(mut self: Box<Self>) {
        if self.shared.stop.load(Ordering::Relaxed) {
            let Chain { hist, finished, .. } = *self;
            let _ = finished.send(hist);
            return;
        }
        let io = self.next_io();
        let client = self.client.clone();
        let t = Instant::now();
        let answered: braid_fabric_tcp::IoCallback = Box::new(move |result| {
            crate::busy_poll::mark_io(self.bs as usize);
            match result {
                Ok(_) => {
                    self.hist.record(t.elapsed());
                    self.shared.ios.fetch_add(1, Ordering::Relaxed);
                    self.shared.bytes.fetch_add(self.bs, Ordering::Relaxed);
                }
                Err(e) => {
                    if self.shared.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("\nIO error: {e}");
                    }
                }
            }
            self.issue();
        });
        // The driver's queue is full: wait for room on a task of its own.
        if let Err((io, answered)) = client.try_io_with(io, answered) {
            tokio::spawn(async move { answered(client.io(io).await) });
        }
    }
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub(crate) async fn run(args: BenchArgs) -> Result<(), String> {
    let bs = config::parse_size(&args.bs)?;
    let client = args.client.connect().await?;
    let info = client.info();
    let span = span_of(&args, bs, &info)?;
    let blocks = span / bs;
    if blocks == 0 {
        return Err("the export is smaller than one block".into());
    }
    println!(
        "braid bench: {:?} bs={} qd={} for {}s on {} ({} of {}), {} channels",
        args.rw,
        args.bs,
        args.qd,
        args.time,
        args.client.export,
        config::human_size(span),
        config::human_size(info.size),
        args.client.channels
    );
    let shared = Arc::new(Shared {
        ios: 0.into(),
        bytes: 0.into(),
        errors: 0.into(),
        stop: false.into(),
    });
    let started = Instant::now();
    let cpu_start = cpu_time();
    let mut finished = start_chains(&args, &client, &shared, bs, blocks);
    show_progress(
        &shared,
        started,
        started + Duration::from_secs_f64(args.time),
    )
    .await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::new();
    while let Some(chain_hist) = finished.recv().await {
        hist.merge(&chain_hist);
    }
    let errors = shared.errors.load(Ordering::Relaxed);
    print_results(&hist, started.elapsed(), cpu_time() - cpu_start, bs, errors);
    print_channels(&client);
    client.close().await;
    if errors > 0 {
        return Err(format!("{errors} IOs failed"));
    }
    Ok(())
}

/// The bytes of the export to touch, with `bs` checked against what the
/// export takes.
fn span_of(args: &BenchArgs, bs: u64, info: &ExportInfo) -> Result<u64, String> {
    if bs == 0 || bs % u64::from(info.block_size) != 0 || bs > u64::from(info.max_payload) {
        return Err(format!(
            "--bs {} must be a multiple of {} up to {}",
            args.bs, info.block_size, info.max_payload
        ));
    }
    let span = match &args.span {
        Some(s) => config::parse_size(s)?.min(info.size),
        None => info.size.min(1 << 30),
    };
    Ok(span)
}

/// `--qd` chains of IO; each sends its histogram to the returned
/// receiver once `shared.stop` is set.
fn start_chains(
    args: &BenchArgs,
    client: &braid_fabric_tcp::Client,
    shared: &Arc<Shared>,
    bs: u64,
    blocks: u64,
) -> tokio::sync::mpsc::UnboundedReceiver<Histogram> {
    // One payload every write sends: in registered memory when the
    // channels are RDMA ones, so no write is copied.
    let payload = crate::rdma::payload(bs as usize, |b| {
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i * 131 % 251) as u8;
        }
    });
    let (finished_tx, finished) = tokio::sync::mpsc::unbounded_channel();
    for w in 0..args.qd {
        let chain = Chain {
            rng: SplitMix64::new(0x5EED ^ w as u64),
            seq: (w as u64 * blocks / 64) % blocks,
            hist: Histogram::new(),
            rw: args.rw,
            bs,
            blocks,
            payload: payload.clone(),
            client: client.clone(),
            shared: shared.clone(),
            finished: finished_tx.clone(),
        };
        Box::new(chain).issue();
    }
    finished
}

/// A line a second with the last second's rates, until `deadline`.
async fn show_progress(shared: &Shared, started: Instant, deadline: Instant) {
    let mut last = (Instant::now(), 0u64, 0u64);
    let mut line = crate::progress::ProgressLine::new();
    while Instant::now() < deadline {
        tokio::time::sleep(
            Duration::from_millis(1000).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
        let (ios, bytes) = (
            shared.ios.load(Ordering::Relaxed),
            shared.bytes.load(Ordering::Relaxed),
        );
        let dt = last.0.elapsed().as_secs_f64().max(1e-9);
        line.show(format_args!(
            "  {:>5.1}s  {:>9.0} IOPS  {:>8.1} MiB/s  errors {}",
            started.elapsed().as_secs_f64(),
            (ios - last.1) as f64 / dt,
            (bytes - last.2) as f64 / dt / (1 << 20) as f64,
            shared.errors.load(Ordering::Relaxed)
        ));
        last = (Instant::now(), ios, bytes);
    }
    line.finish();
}

/// The run's rates, client CPU per IO, latency percentiles and a
/// histogram by octave.
fn print_results(hist: &Histogram, elapsed: Duration, cpu: Duration, bs: u64, errors: u64) {
    let elapsed = elapsed.as_secs_f64();
    let ios = hist.count();
    println!(
        "\n{ios} IOs in {elapsed:.1}s: {:.0} IOPS, {:.1} MiB/s, client CPU {:.1} µs/IO, errors {errors}",
        ios as f64 / elapsed,
        (ios * bs) as f64 / elapsed / (1 << 20) as f64,
        cpu.as_secs_f64() * 1e6 / ios.max(1) as f64,
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "latency µs: mean {:.0}  p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        us(hist.mean()),
        us(hist.percentile(50.0)),
        us(hist.percentile(90.0)),
        us(hist.percentile(99.0)),
        us(hist.percentile(99.9)),
        us(hist.max())
    );
    let rows = hist.octaves();
    let peak = rows.iter().map(|r| r.1).max().unwrap_or(1);
    for (low, n) in rows {
        let bar = "#".repeat(((n * 50) / peak).max(1) as usize);
        println!("  ≥{:>8.0} µs {:>9} {bar}", us(low), n);
    }
}
