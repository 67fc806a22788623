//! Large WRITEs on a file that takes them at once: over TCP they are
//! written by the connection that received them (its client goes on
//! sending into the socket's large buffer meanwhile), over a unix socket
//! handed on (its small buffer would leave the client waiting). The bytes
//! land the same either way, and each WRITE is answered once.
//!
//! Where the file's pages are in memory already (tmpfs), a large WRITE's
//! payload is received straight into them through the file's mapping. A
//! file shrunk behind the export's back fails that receive, and the rest
//! of the payload is written from memory; a client that leaves mid-payload
//! leaves its range partly written, as a device would, and costs nobody
//! else anything.

mod common;

use braid_core::server::{BackendOp, MappedSink};
use braid_core::wire::Status;
use braid_frontend_nbd::{
    serve, BackendTarget, Completion, ExtentsCompletion, NbdConfig, NbdListener, Target,
};
use bytes::Bytes;
use common::*;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixStream};

const LARGE: u32 = 1 << 20;
const WRITES: u64 = 3;

/// Counts the large WRITEs finished where they arrived, those handed to
/// `submit` and those received into the file's mapping.
struct Counting {
    inner: BackendTarget,
    counts: Counts,
}

#[derive(Clone, Default)]
struct Counts {
    inline: Arc<AtomicUsize>,
    handed: Arc<AtomicUsize>,
    mapped: Arc<AtomicUsize>,
    /// The export's file, to cut off halfway through the next mapped
    /// range: between the backend's check that the range is cached and the
    /// receive.
    shrink_on_sink: Arc<Mutex<Option<std::fs::File>>>,
}

impl Counts {
    fn get(&self) -> (usize, usize, usize) {
        let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
        (n(&self.inline), n(&self.handed), n(&self.mapped))
    }
}

fn is_large_write(op: &BackendOp) -> bool {
    matches!(op, BackendOp::Write { data, .. } if data.len() == LARGE as usize)
}

impl Target for Counting {
    fn submit(&self, export: usize, op: BackendOp, done: Completion) {
        if is_large_write(&op) {
            self.counts.handed.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.submit(export, op, done)
    }
    fn try_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        let result = self.inner.try_now(export, op);
        if result.is_some() && is_large_write(op) {
            self.counts.inline.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
    fn mapped_write(&self, export: usize, offset: u64, len: u32) -> Option<MappedSink> {
        let sink = self.inner.mapped_write(export, offset, len)?;
        self.counts.mapped.fetch_add(1, Ordering::Relaxed);
        if let Some(file) = self.counts.shrink_on_sink.lock().unwrap().take() {
            file.set_len(offset + u64::from(len) / 2).unwrap();
        }
        Some(sink)
    }
    fn allocation(&self, export: usize, offset: u64, len: u64, done: ExtentsCompletion) {
        self.inner.allocation(export, offset, len, done)
    }
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }
}

/// Serves the common exports from tmpfs (whose page cache takes any
/// write at once) on `listener`; returns the counters. The files start
/// sparse, so nothing is received into their mapping until `fill` has
/// written them.
fn start_counting(dir: &std::path::Path, listener: NbdListener) -> Counts {
    let (backend, exports) = exports(dir);
    let counts = Counts::default();
    let target = Counting {
        inner: BackendTarget::new(backend),
        counts: counts.clone(),
    };
    tokio::spawn(serve(
        listener,
        NbdConfig::new(exports),
        Arc::new(target),
        std::future::pending(),
    ));
    counts
}

/// Writes all of disk0, so its pages are in memory.
fn fill(dir: &std::path::Path) -> std::fs::File {
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(dir.join("disk0"))
        .unwrap();
    file.write_all_at(&vec![0xEE; SIZE as usize], 0).unwrap();
    file
}

fn pattern(n: u64) -> Vec<u8> {
    (0..LARGE)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ n as u8)
        .collect()
}

/// Sends the WRITEs back to back, then reads every one back.
async fn write_and_read_back(s: &mut (impl Io + ?Sized)) {
    greet(s).await;
    go(s, "disk0").await;
    for n in 0..WRITES {
        request(s, 1, 0, n, n * u64::from(LARGE), LARGE, &pattern(n)).await;
    }
    let mut answered: Vec<u64> = Vec::new();
    for _ in 0..WRITES {
        let (handle, error, _) = reply(s, 0).await;
        assert_eq!(error, 0, "WRITE {handle} succeeded");
        answered.push(handle);
    }
    answered.sort_unstable();
    assert_eq!(
        answered,
        (0..WRITES).collect::<Vec<_>>(),
        "each answered once"
    );
    for n in 0..WRITES {
        request(s, 0, 0, 10 + n, n * u64::from(LARGE), LARGE, &[]).await;
        let (handle, error, data) = reply(s, LARGE as usize).await;
        assert_eq!((handle, error), (10 + n, 0));
        assert!(data == pattern(n), "WRITE {n}'s bytes read back");
    }
}

#[tokio::test]
async fn large_writes_over_tcp_are_written_where_they_arrive() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = start_counting(dir.path(), NbdListener::Tcp(listener));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    write_and_read_back(&mut s).await;
    assert_eq!(counts.get(), (WRITES as usize, 0, 0));
}

#[tokio::test]
async fn large_writes_over_a_unix_socket_are_handed_on() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = NbdListener::bind(path.to_str().unwrap()).await.unwrap();
    let counts = start_counting(dir.path(), listener);
    let mut s = UnixStream::connect(&path).await.unwrap();
    write_and_read_back(&mut s).await;
    assert_eq!(counts.get(), (0, WRITES as usize, 0));
}

/// The first WRITE of a run arrives partly in the connection's buffer
/// with its header, and goes the ordinary way; after a large WRITE the
/// next header is read alone, and its payload straight into the file.
fn assert_mapped_after_the_first(counts: &Counts, first_went: (usize, usize)) {
    let mapped = WRITES as usize - 1;
    assert_eq!(counts.get(), (first_went.0, first_went.1, mapped));
}

#[tokio::test]
async fn large_writes_over_tcp_onto_pages_in_memory_are_received_into_the_file() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = start_counting(dir.path(), NbdListener::Tcp(listener));
    fill(dir.path());
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    write_and_read_back(&mut s).await;
    assert_mapped_after_the_first(&counts, (1, 0));
}

#[tokio::test]
async fn large_writes_over_a_unix_socket_onto_pages_in_memory_are_received_into_the_file() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = NbdListener::bind(path.to_str().unwrap()).await.unwrap();
    let counts = start_counting(dir.path(), listener);
    fill(dir.path());
    let mut s = UnixStream::connect(&path).await.unwrap();
    write_and_read_back(&mut s).await;
    assert_mapped_after_the_first(&counts, (0, 1));
}

#[tokio::test]
async fn a_file_shrunk_under_a_write_into_its_mapping_gets_the_rest_from_memory() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = start_counting(dir.path(), NbdListener::Tcp(listener));
    let file = fill(dir.path());
    // Out of contract (the export is locked), but the daemon must survive
    // it: the kernel cannot write pages past the end, and says EFAULT
    // once it has received the half before them.
    *counts.shrink_on_sink.lock().unwrap() = Some(file.try_clone().unwrap());
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    write_and_read_back(&mut s).await;
    assert_eq!(counts.get().2, 1, "one WRITE began in the mapping");
    assert!(
        counts.shrink_on_sink.lock().unwrap().is_none(),
        "and the file was cut off under it"
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_payload_leaves_its_range_partly_written() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = start_counting(dir.path(), NbdListener::Tcp(listener));
    let file = fill(dir.path());
    let mut rude = tokio::net::TcpStream::connect(addr).await.unwrap();
    greet(&mut rude).await;
    go(&mut rude, "disk0").await;
    request(&mut rude, 1, 0, 1, 0, LARGE, &pattern(1)).await;
    assert_eq!(reply(&mut rude, 0).await.1, 0);
    let half = LARGE as usize / 2;
    request(
        &mut rude,
        1,
        0,
        2,
        u64::from(LARGE),
        LARGE,
        &pattern(2)[..half],
    )
    .await;
    rude.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut rude, &mut rest),
    )
    .await
    .expect("the server ended the connection");
    assert!(
        ended.is_ok() && rest.is_empty(),
        "no reply to the cut WRITE"
    );
    assert_eq!(
        counts.get().2,
        1,
        "the cut WRITE was being received into the file"
    );
    // What arrived is in the file; what never came is not.
    let mut range = vec![0; LARGE as usize];
    file.read_exact_at(&mut range, u64::from(LARGE)).unwrap();
    assert!(range[..half] == pattern(2)[..half]);
    assert!(range[half..].iter().all(|&b| b == 0xEE));
    // Everyone else is served as before.
    let mut polite = tokio::net::TcpStream::connect(addr).await.unwrap();
    write_and_read_back(&mut polite).await;
}
