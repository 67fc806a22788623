//! `braid verify`: writes checksummed, generation-stamped blocks and checks
//! every read against the last acknowledged generation of its block, for as
//! long as it runs, across reconnects and server restarts.

use crate::client_args::{print_channels, ClientArgs};
use braid_core::client::IoRequest;
use braid_core::rng::SplitMix64;
use braid_fabric_tcp::Client;
use bytes::Bytes;
use clap::Args;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"BRAIDVFY";

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,
    /// Blocks of 4 KiB to exercise (from offset 0).
    #[arg(long, default_value_t = 4096)]
    pub(crate) blocks: u64,
    /// IOs kept in flight.
    #[arg(long, default_value_t = 16)]
    pub(crate) qd: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) time: f64,
}

/// One block's content: magic, block number, generation, run id, then a
/// pattern, and a CRC32C over all of it in the last four bytes.
fn block_data(run: u64, block: u64, generation: u64) -> Bytes {
    crate::rdma::payload(BLOCK, |b| {
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&block.to_le_bytes());
        b[16..24].copy_from_slice(&generation.to_le_bytes());
        b[24..32].copy_from_slice(&run.to_le_bytes());
        let mut x = run ^ block.rotate_left(17) ^ generation.rotate_left(41);
        for chunk in b[32..BLOCK - 4].chunks_mut(8) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let crc = crc(&b[..BLOCK - 4]);
        b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    })
}

const BLOCK: usize = 4096;

fn crc(b: &[u8]) -> u32 {
    // CRC-32 (IEEE), computed here so a codec bug cannot hide itself, and
    // deliberately not the protocol's CRC32C: a block ending in the CRC32C
    // of the rest has the same CRC32C as every other such block (the
    // CRC's residue), so the protocol's payload checksum could not tell
    // one verify block from another, and data that went astray between
    // two of them would pass it (it did: misdirected blocks over RDMA
    // when a one-sided read completed with stale data).
    let mut c = !0u32;
    for &byte in b {
        c ^= u32::from(byte);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// What a read found.
fn check(data: &[u8], run: u64, block: u64, expected: u64) -> Result<(), String> {
    if expected == 0 {
        // Never written in this run: anything from before the run is fine
        // except a block of this run.
        if data.len() >= 32 && &data[..8] == MAGIC && data[24..32] == run.to_le_bytes() {
            return Err(format!(
                "block {block}: holds data of this run but none was acknowledged"
            ));
        }
        return Ok(());
    }
    if &data[..8] != MAGIC {
        return Err(format!(
            "block {block}: not a verify block (expected generation {expected})"
        ));
    }
    let stored = u32::from_le_bytes(data[BLOCK - 4..].try_into().unwrap());
    if crc(&data[..BLOCK - 4]) != stored {
        return Err(format!(
            "block {block}: checksum mismatch (torn or corrupted data)"
        ));
    }
    let at = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let generation = u64::from_le_bytes(data[16..24].try_into().unwrap());
    let r = u64::from_le_bytes(data[24..32].try_into().unwrap());
    if at != block || r != run {
        return Err(format!(
            "block {block}: holds block {at} (generation {generation}) of run {r:#x} (misdirected)"
        ));
    }
    if generation != expected {
        return Err(format!(
            "block {block}: generation {generation}, expected {expected} (lost or stale write)"
        ));
    }
    Ok(())
}

/// Latency is kept as the worst IO per 10 ms of completion time, so a
/// caller can ask how long IO stalled around any moment.
const BUCKET_MS: u64 = 10;

/// Counters a caller can watch while verification runs.
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) started: Mutex<Option<Instant>>,
    worst_per_bucket: Mutex<Vec<u64>>,
    pub(crate) reads: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) stop: AtomicBool,
    pub(crate) first_problems: Mutex<Vec<String>>,
}

impl Progress {
    fn observe(&self, submitted: Instant) {
        let done = Instant::now();
        let start = *self.started.lock().unwrap().get_or_insert(submitted);
        let bucket =
            (done.saturating_duration_since(start).as_millis() as u64 / BUCKET_MS) as usize;
        let latency = done.saturating_duration_since(submitted).as_nanos() as u64;
        let mut w = self.worst_per_bucket.lock().unwrap();
        if w.len() <= bucket {
            w.resize(bucket + 1, 0);
        }
        w[bucket] = w[bucket].max(latency);
    }

    /// The slowest IO that completed between `from` and `to`.
    pub(crate) fn worst_between(&self, from: Instant, to: Instant) -> Duration {
        let Some(start) = *self.started.lock().unwrap() else {
            return Duration::ZERO;
        };
        let b = |t: Instant| {
            (t.saturating_duration_since(start).as_millis() as u64 / BUCKET_MS) as usize
        };
        let w = self.worst_per_bucket.lock().unwrap();
        let hi = b(to).min(w.len().saturating_sub(1));
        let worst = w
            .get(b(from)..=hi)
            .map_or(0, |s| s.iter().copied().max().unwrap_or(0));
        Duration::from_nanos(worst)
    }

    /// The slowest IO of the whole run.
    pub(crate) fn worst(&self) -> Duration {
        Duration::from_nanos(
            self.worst_per_bucket
                .lock()
                .unwrap()
                .iter()
                .copied()
                .max()
                .unwrap_or(0),
        )
    }

    pub(crate) fn ios(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
            + self.writes.load(Ordering::Relaxed)
            + self.flushes.load(Ordering::Relaxed)
    }

    fn problem(&self, p: String) {
        let mut v = self.first_problems.lock().unwrap();
        if v.len() < 10 {
            v.push(p);
        }
    }
}

/// Runs the verifying workload until `progress.stop` is set.
/// What the verifier drives: one export's client, or a volume over
/// several.
pub(crate) trait BlockDevice: Clone + Send + Sync + 'static {
    /// One IO; the error says what failed.
    fn submit(
        &self,
        io: IoRequest,
    ) -> impl std::future::Future<Output = Result<Bytes, String>> + Send;
}

impl BlockDevice for Client {
    async fn submit(&self, io: IoRequest) -> Result<Bytes, String> {
        self.io(io).await.map_err(|e| e.to_string())
    }
}

impl BlockDevice for braid_fabric_tcp::Volume {
    async fn submit(&self, io: IoRequest) -> Result<Bytes, String> {
        let (op, offset, len) = (io.op, io.offset, io.len);
        self.io(io)
            .await
            .map_err(|e| format!("volume {op:?} at {offset}+{len}: {e:?}"))
    }
}

pub(crate) async fn workload(
    client: impl BlockDevice,
    blocks: u64,
    qd: usize,
    progress: Arc<Progress>,
) {
    let run = u64::from_le_bytes(crate::config::random_bytes().unwrap_or([7; 8]));
    progress
        .started
        .lock()
        .unwrap()
        .get_or_insert_with(Instant::now);
    // Per block: last acknowledged generation, and whether an IO is on it.
    let state = Arc::new(Mutex::new(vec![(0u64, false); blocks as usize]));
    let mut workers = Vec::new();
    for w in 0..qd {
        let (client, state, progress) = (client.clone(), state.clone(), progress.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = SplitMix64::new(run ^ w as u64);
            let mut ops = 0u64;
            while !progress.stop.load(Ordering::Relaxed) {
                ops += 1;
                if ops % 97 == 0 {
                    let t = Instant::now();
                    let r = client.submit(IoRequest::flush()).await;
                    progress.observe(t);
                    match r {
                        Ok(_) => progress.flushes.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            progress.problem(format!("flush failed: {e}"));
                            progress.errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    continue;
                }
                // Claim an idle block so its expected content is exact.
                let claimed = {
                    let mut s = state.lock().unwrap();
                    let mut found = None;
                    for _ in 0..8 {
                        let b = rng.below(blocks);
                        if !s[b as usize].1 {
                            s[b as usize].1 = true;
                            found = Some((b, s[b as usize].0));
                            break;
                        }
                    }
                    found
                };
                let Some((block, acked)) = claimed else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let offset = block * BLOCK as u64;
                if rng.chance(0.4) {
                    let generation = acked + 1;
                    let fua = rng.chance(0.1);
                    let t = Instant::now();
                    let data = block_data(run, block, generation);
                    let r = client
                        .submit(IoRequest::write(offset, data.clone(), fua))
                        .await;
                    progress.observe(t);
                    // The buffer may sit in memory shared with the fabric
                    // (registered for RDMA): if anything wrote into it while
                    // the write was in flight, the server may have stored
                    // that instead, so say so here, where it happened.
                    if let Err(p) = check(&data, run, block, generation) {
                        progress.failures.fetch_add(1, Ordering::Relaxed);
                        progress.problem(format!("write buffer changed in flight: {p}"));
                    }
                    match r {
                        Ok(_) => {
                            state.lock().unwrap()[block as usize].0 = generation;
                            progress.writes.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            progress.problem(format!("write failed: {e}"));
                            progress.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else {
                    let t = Instant::now();
                    let r = client.submit(IoRequest::read(offset, BLOCK as u32)).await;
                    progress.observe(t);
                    match r {
                        Ok(data) => {
                            progress.reads.fetch_add(1, Ordering::Relaxed);
                            if let Err(p) = check(&data, run, block, acked) {
                                progress.failures.fetch_add(1, Ordering::Relaxed);
                                // The block is still claimed, so nothing wrote
                                // it since: a second read tells a wrong read
                                // (the data went astray on its way back) from
                                // wrong data stored.
                                let again = client
                                    .submit(IoRequest::read(offset, BLOCK as u32))
                                    .await
                                    .map_err(|e| format!("failed: {e}"))
                                    .and_then(|d| check(&d, run, block, acked));
                                progress.problem(match again {
                                    Ok(()) => {
                                        format!("{p}; read again: right (the read went astray)")
                                    }
                                    Err(q) => format!("{p}; read again: {q}"),
                                });
                            }
                        }
                        Err(e) => {
                            progress.problem(format!("read failed: {e}"));
                            progress.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                state.lock().unwrap()[block as usize].1 = false;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

pub(crate) async fn run(args: VerifyArgs) -> Result<(), String> {
    let client = args.client.connect().await?;
    let blocks = args.blocks.min(client.info().size / BLOCK as u64);
    println!(
        "braid verify: {blocks} blocks of 4 KiB, qd {}, {}s, on {}",
        args.qd, args.time, args.client.export
    );
    let progress = Arc::new(Progress::default());
    let task = tokio::spawn(workload(client.clone(), blocks, args.qd, progress.clone()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.time);
    let mut line = crate::progress::ProgressLine::new();
    while Instant::now() < deadline {
        tokio::time::sleep(
            Duration::from_millis(500).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
        let s = client.status();
        line.show(format_args!(
            "  {:>5.1}s  reads {:>8} writes {:>8} flushes {:>6}  failures {}  errors {}  failovers {}  session resets {}",
            started.elapsed().as_secs_f64(),
            progress.reads.load(Ordering::Relaxed),
            progress.writes.load(Ordering::Relaxed),
            progress.flushes.load(Ordering::Relaxed),
            progress.failures.load(Ordering::Relaxed),
            progress.errors.load(Ordering::Relaxed),
            s.stats.failovers,
            s.stats.session_resets,
        ));
    }
    progress.stop.store(true, Ordering::Relaxed);
    task.await.map_err(|e| e.to_string())?;
    line.finish();
    let (failures, errors) = (
        progress.failures.load(Ordering::Relaxed),
        progress.errors.load(Ordering::Relaxed),
    );
    println!(
        "verified {} reads against {} writes and {} flushes: {failures} verification failures, {errors} IO errors",
        progress.reads.load(Ordering::Relaxed),
        progress.writes.load(Ordering::Relaxed),
        progress.flushes.load(Ordering::Relaxed)
    );
    for p in progress.first_problems.lock().unwrap().iter() {
        println!("  {p}");
    }
    print_channels(&client);
    client.close().await;
    if failures + errors > 0 {
        return Err("verification failed".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_accepts_the_right_block_and_names_every_wrong_one() {
        let good = block_data(1, 5, 3);
        assert!(check(&good, 1, 5, 3).is_ok());
        assert!(check(&good, 1, 5, 4)
            .unwrap_err()
            .contains("generation 3, expected 4"));
        assert!(check(&good, 1, 6, 3).unwrap_err().contains("misdirected"));
        let mut torn = good.to_vec();
        torn[2000] ^= 1;
        assert!(check(&torn, 1, 5, 3).unwrap_err().contains("checksum"));
        assert!(check(&[0; BLOCK], 1, 5, 0).is_ok());
        assert!(
            check(&good, 1, 5, 0).is_err(),
            "data of this run where none was acknowledged"
        );
        assert_eq!(crc(b"123456789"), 0xCBF4_3926, "CRC-32 check value");
    }

    /// The protocol's payload checksum must tell verify blocks apart, or a
    /// block that went astray would pass it: with a CRC32C of the rest in
    /// their last bytes, every block had the same CRC32C.
    #[test]
    fn blocks_differ_under_the_protocols_payload_checksum() {
        let crcs: std::collections::HashSet<u32> = (0..64)
            .map(|b| crc32c::crc32c(&block_data(9, b, 1 + b % 3)))
            .collect();
        assert_eq!(crcs.len(), 64);
    }
}
