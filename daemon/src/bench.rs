//! `braid bench`: fio-like workloads through the whole protocol.

use crate::client_args::{print_channels, ClientArgs};
use crate::config;
use crate::histogram::Histogram;
use braid_core::client::IoRequest;
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
    // One payload every write sends: in registered memory when the
    // channels are RDMA ones, so no write is copied.
    let payload = crate::rdma::payload(bs as usize, |b| {
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i * 131 % 251) as u8;
        }
    });
    let started = Instant::now();
    let cpu_start = cpu_time();
    let mut workers = Vec::new();
    for w in 0..args.qd {
        let (client, shared, payload) = (client.clone(), shared.clone(), payload.clone());
        let rw = args.rw;
        workers.push(tokio::spawn(async move {
            let mut rng = SplitMix64::new(0x5EED ^ w as u64);
            let mut hist = Histogram::new();
            let mut seq = (w as u64 * blocks / 64) % blocks;
            while !shared.stop.load(Ordering::Relaxed) {
                let block = match rw {
                    Rw::Read | Rw::Write => {
                        seq = (seq + 1) % blocks;
                        seq
                    }
                    _ => rng.below(blocks),
                };
                let write = match rw {
                    Rw::Randwrite | Rw::Write => true,
                    Rw::Randrw => rng.chance(0.5),
                    _ => false,
                };
                let io = if write {
                    IoRequest::write(block * bs, payload.clone(), false)
                } else {
                    IoRequest::read(block * bs, bs as u32)
                };
                let t = Instant::now();
                let result = client.io(io).await;
                crate::busy_poll::mark_io(bs as usize);
                match result {
                    Ok(_) => {
                        hist.record(t.elapsed());
                        shared.ios.fetch_add(1, Ordering::Relaxed);
                        shared.bytes.fetch_add(bs, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if shared.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("\nIO error: {e}");
                        }
                    }
                }
            }
            hist
        }));
    }
    let deadline = started + Duration::from_secs_f64(args.time);
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
    shared.stop.store(true, Ordering::Relaxed);
    line.finish();
    let mut hist = Histogram::new();
    for w in workers {
        hist.merge(&w.await.map_err(|e| e.to_string())?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time() - cpu_start;
    let ios = hist.count();
    println!(
        "\n{ios} IOs in {elapsed:.1}s: {:.0} IOPS, {:.1} MiB/s, client CPU {:.1} µs/IO, errors {}",
        ios as f64 / elapsed,
        (ios * bs) as f64 / elapsed / (1 << 20) as f64,
        cpu.as_secs_f64() * 1e6 / ios.max(1) as f64,
        shared.errors.load(Ordering::Relaxed)
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
    print_channels(&client);
    let errors = shared.errors.load(Ordering::Relaxed);
    client.close().await;
    if errors > 0 {
        return Err(format!("{errors} IOs failed"));
    }
    Ok(())
}
