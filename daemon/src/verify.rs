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

    /// A verification failure: counted, and listed even when ten IO
    /// errors came first (a run that expects errors, like the forging
    /// client's, must still show what did not verify).
    fn mismatch(&self, p: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut v = self.first_problems.lock().unwrap();
        if v.len() < 20 {
            v.push(p);
        }
    }
}

/// What the verifier knows of one block's content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BlockState {
    /// The generation last acknowledged (or seen, once a failed write
    /// was read back).
    acked: u64,
    /// The newest write that failed: a block device promises nothing of
    /// the range a failed write covered, so it may or may not have
    /// landed (over several channels, the copy of a write that failed
    /// may have raced one that was stored). Every generation from
    /// `acked` to this one may be stored (those between failed too);
    /// the next read pins which.
    unsure: Option<u64>,
    /// An IO is on the block, so nothing else may touch it.
    busy: bool,
}

impl BlockState {
    /// Above every generation that may be stored, so no two writes of
    /// a block carry the same one.
    fn next_generation(&self) -> u64 {
        self.acked.max(self.unsure.unwrap_or(0)) + 1
    }

    fn written(&mut self, generation: u64) {
        self.acked = generation;
        self.unsure = None;
    }

    fn write_failed(&mut self, generation: u64) {
        self.unsure = Some(generation);
    }

    /// After failed writes, the generation a read found becomes the one
    /// every later read must find (so two copies that disagree, as
    /// mirror legs could, are still caught): the new state, or the
    /// generation to check against when the read fits none that may be
    /// stored.
    fn read(&self, data: &[u8], run: u64, block: u64) -> Result<Self, u64> {
        let Some(unsure) = self.unsure else {
            return Err(self.acked);
        };
        (self.acked..=unsure)
            .find(|generation| check(data, run, block, *generation).is_ok())
            .map(|acked| Self {
                acked,
                unsure: None,
                busy: true,
            })
            .ok_or(self.acked)
    }
}

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

/// Runs the verifying workload until `progress.stop` is set: `qd`
/// workers, each with one IO in flight on a block no other touches.
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
    let state = Arc::new(Mutex::new(vec![BlockState::default(); blocks as usize]));
    let mut workers = Vec::new();
    for w in 0..qd {
        let worker = Worker {
            client: client.clone(),
            state: state.clone(),
            progress: progress.clone(),
            run,
            blocks,
            rng: SplitMix64::new(run ^ w as u64),
        };
        workers.push(tokio::spawn(worker.go()));
    }
    for w in workers {
        let _ = w.await;
    }
}

/// One of the workload's IOs in flight, again and again.
struct Worker<C> {
    client: C,
    /// Every block's, shared by the workers.
    state: Arc<Mutex<Vec<BlockState>>>,
    progress: Arc<Progress>,
    /// This run's mark in every block it writes.
    run: u64,
    blocks: u64,
    rng: SplitMix64,
}

impl<C: BlockDevice> Worker<C> {
    async fn go(mut self) {
        let mut ops = 0u64;
        while !self.progress.stop.load(Ordering::Relaxed) {
            ops += 1;
            if ops % 97 == 0 {
                self.flush().await;
                continue;
            }
            let Some((block, known)) = self.claim() else {
                tokio::task::yield_now().await;
                continue;
            };
            if self.rng.chance(0.4) {
                self.write(block, known).await;
            } else {
                self.read(block, known).await;
            }
            self.state.lock().unwrap()[block as usize].busy = false;
        }
    }

    async fn flush(&self) {
        let progress = &self.progress;
        let t = Instant::now();
        let r = self.client.submit(IoRequest::flush()).await;
        progress.observe(t);
        match r {
            Ok(_) => progress.flushes.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                progress.problem(format!("flush failed: {e}"));
                progress.errors.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    /// An idle block, marked busy so its expected content is exact, and
    /// what was known of it; none if a few tries found only busy ones.
    fn claim(&mut self) -> Option<(u64, BlockState)> {
        let mut s = self.state.lock().unwrap();
        for _ in 0..8 {
            let b = self.rng.below(self.blocks);
            let block = &mut s[b as usize];
            if !block.busy {
                block.busy = true;
                return Some((b, *block));
            }
        }
        None
    }

    async fn write(&mut self, block: u64, known: BlockState) {
        let (progress, run) = (&self.progress, self.run);
        let generation = known.next_generation();
        let fua = self.rng.chance(0.1);
        let t = Instant::now();
        let data = block_data(run, block, generation);
        let r = self
            .client
            .submit(IoRequest::write(block * BLOCK as u64, data.clone(), fua))
            .await;
        progress.observe(t);
        // The buffer may sit in memory shared with the fabric
        // (registered for RDMA): if anything wrote into it while
        // the write was in flight, the server may have stored
        // that instead, so say so here, where it happened.
        if let Err(p) = check(&data, run, block, generation) {
            progress.mismatch(format!("write buffer changed in flight: {p}"));
        }
        match r {
            Ok(_) => {
                self.state.lock().unwrap()[block as usize].written(generation);
                progress.writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.state.lock().unwrap()[block as usize].write_failed(generation);
                progress.problem(format!("write failed: {e}"));
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn read(&self, block: u64, known: BlockState) {
        let (progress, run) = (&self.progress, self.run);
        let offset = block * BLOCK as u64;
        let t = Instant::now();
        let r = self
            .client
            .submit(IoRequest::read(offset, BLOCK as u32))
            .await;
        progress.observe(t);
        let data = match r {
            Ok(data) => data,
            Err(e) => {
                progress.problem(format!("read failed: {e}"));
                progress.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        progress.reads.fetch_add(1, Ordering::Relaxed);
        let acked = match known.read(&data, run, block) {
            Ok(found) => {
                self.state.lock().unwrap()[block as usize] = found;
                found.acked
            }
            Err(acked) => acked,
        };
        if let Err(p) = check(&data, run, block, acked) {
            // The block is still claimed, so nothing wrote it since: a
            // second read tells a wrong read (the data went astray on its
            // way back) from wrong data stored.
            let again = self
                .client
                .submit(IoRequest::read(offset, BLOCK as u32))
                .await
                .map_err(|e| format!("failed: {e}"))
                .and_then(|d| check(&d, run, block, acked));
            progress.mismatch(match again {
                Ok(()) => format!("{p}; read again: right (the read went astray)"),
                Err(q) => format!("{p}; read again: {q}"),
            });
        }
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

    /// A failed write may or may not have landed; the first read pins
    /// which, and a later read of the other is a failure again.
    #[test]
    fn a_failed_write_is_either_generation_until_a_read_pins_one() {
        let mut b = BlockState {
            acked: 2,
            ..Default::default()
        };
        b.write_failed(3);
        assert_eq!(b.next_generation(), 4);
        let landed = block_data(1, 5, 3);
        let pinned = b.read(&landed, 1, 5).unwrap();
        assert_eq!((pinned.acked, pinned.unsure), (3, None));
        assert_eq!(pinned.read(&block_data(1, 5, 2), 1, 5), Err(3));
        let old = b.read(&block_data(1, 5, 2), 1, 5).unwrap();
        assert_eq!((old.acked, old.unsure), (2, None));
        assert_eq!(
            b.read(&block_data(1, 5, 1), 1, 5),
            Err(2),
            "neither generation"
        );
        // Two failed writes in a row: either may have landed.
        let mut twice = b;
        twice.write_failed(twice.next_generation());
        assert_eq!(twice.read(&landed, 1, 5).unwrap().acked, 3);
        assert_eq!(twice.read(&block_data(1, 5, 4), 1, 5).unwrap().acked, 4);
        let mut fresh = BlockState::default();
        fresh.write_failed(1);
        assert_eq!(fresh.read(&block_data(1, 5, 1), 1, 5).unwrap().acked, 1);
        fresh.written(4);
        assert_eq!((fresh.acked, fresh.unsure), (4, None));
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
