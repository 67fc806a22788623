//! Large READs to a client on this machine over TCP (no sendfile) are sent
//! whole on a pool thread, from the file's mapping when cached, while the
//! connection reads on: their replies and the small ones sent meanwhile
//! never interleave, a READ that fails there is answered with its error,
//! and a client that leaves without reading its replies costs nobody else
//! anything. The same over a unix socket, whose client is on this machine
//! too. A file shrunk behind the server's back ends the connection whose
//! READ was being sent from the lost pages, and nothing else.
//!
//! A target with no backend here (`braid attach`) answers READs with data
//! in memory; the large ones are sent from a pool thread. The same holds
//! for them: whole replies, errors answered, a client that leaves costs
//! nobody else anything.

mod common;

use braid_backend_file::FileBackend;
use braid_core::server::Extent;
use braid_core::server::{Backend, BackendOp, MappedRange, SpliceSource};
use braid_core::wire::Status;
use braid_frontend_nbd::{
    serve, BackendTarget, Completion, ExtentsCompletion, NbdConfig, NbdExport, NbdListener, Target,
};
use bytes::Bytes;
use common::*;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

const LARGE: u32 = 1 << 20;
const SMALL: u32 = 4096;
/// READs here fail in the backend, whichever way they run.
const FAILING: u64 = 12 << 20;
const EIO: u32 = 5;

/// The file backend, counting the large READs it ran on a thread that may
/// block (`execute`), those it offered mapped (`mapped_source`) and those
/// the connection's thread tried itself (`try_execute_now`), and failing
/// those at [`FAILING`].
struct Recording {
    inner: Arc<FileBackend>,
    counts: Counts,
}

#[derive(Clone, Default)]
struct Counts {
    large_executed: Arc<AtomicUsize>,
    large_tried_inline: Arc<AtomicUsize>,
    large_mapped: Arc<AtomicUsize>,
    /// A file to shrink to nothing as the next range is mapped: between
    /// the backend's check that the range is cached and the send.
    shrink_on_map: Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

impl Counts {
    fn executed(&self) -> usize {
        self.large_executed.load(Ordering::Relaxed)
    }
    fn tried_inline(&self) -> usize {
        self.large_tried_inline.load(Ordering::Relaxed)
    }
    fn mapped(&self) -> usize {
        self.large_mapped.load(Ordering::Relaxed)
    }
    /// Large READs that went to a pool thread, either way.
    fn whole(&self) -> usize {
        self.executed() + self.mapped()
    }
}

fn is_large_read(op: &BackendOp) -> bool {
    matches!(op, BackendOp::Read { len, .. } if *len == LARGE)
}

fn reads_failing(op: &BackendOp) -> bool {
    matches!(op, BackendOp::Read { offset, .. } if *offset == FAILING)
}

impl Backend for Recording {
    fn execute(&self, export: usize, op: &BackendOp) -> Result<Bytes, Status> {
        if is_large_read(op) {
            self.counts.large_executed.fetch_add(1, Ordering::Relaxed);
        }
        if reads_failing(op) {
            return Err(Status::Io);
        }
        self.inner.execute(export, op)
    }
    fn try_execute_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        if is_large_read(op) {
            self.counts
                .large_tried_inline
                .fetch_add(1, Ordering::Relaxed);
        }
        if reads_failing(op) {
            return Some(Err(Status::Io));
        }
        self.inner.try_execute_now(export, op)
    }
    fn splice_source(&self, export: usize, offset: u64, len: u32) -> Option<SpliceSource> {
        if offset == FAILING {
            return None;
        }
        self.inner.splice_source(export, offset, len)
    }
    fn mapped_source(&self, export: usize, offset: u64, len: u32) -> Option<MappedRange> {
        if offset == FAILING {
            return None;
        }
        let mapped = self.inner.mapped_source(export, offset, len);
        if let Some(file) = self.counts.shrink_on_map.lock().unwrap().take() {
            file.set_len(0).unwrap();
        }
        if mapped.is_some() && len == LARGE {
            self.counts.large_mapped.fetch_add(1, Ordering::Relaxed);
        }
        mapped
    }
}

fn byte_at(pos: u64) -> u8 {
    (pos.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Serves disk0 (filled with a pattern) from tmpfs on `listener`; returns
/// the counts of where its large READs ran.
fn start_recording(dir: &std::path::Path, listener: NbdListener) -> Counts {
    let (backend, exports) = exports(dir);
    fill_disk0(dir, byte_at);
    let counts = Counts::default();
    let recording = Recording {
        inner: backend,
        counts: counts.clone(),
    };
    tokio::spawn(serve(
        listener,
        NbdConfig::new(exports),
        Arc::new(BackendTarget::new(Arc::new(recording))),
        std::future::pending(),
    ));
    counts
}

/// [`start_recording`] on a loopback TCP port; returns its address too.
async fn start_recording_tcp(dir: &std::path::Path) -> (std::net::SocketAddr, Counts) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, start_recording(dir, NbdListener::Tcp(listener)))
}

/// Large READs [`read_mixed`] asks for, the failing one included.
const LARGE_READS_MIXED: usize = 9;

/// Pipelines eight large READs with a small one after each and one large
/// READ that fails, then checks every reply: framing, handle, data.
async fn read_mixed(s: &mut (impl Io + ?Sized)) {
    greet(s).await;
    go(s, "disk0").await;
    let mut asked: HashMap<u64, (u64, u32)> = HashMap::new();
    for n in 0..8u64 {
        let large = (n, (n * u64::from(LARGE), LARGE));
        let small = (
            100 + n,
            (n * u64::from(LARGE) + 3 * u64::from(SMALL), SMALL),
        );
        for (handle, (offset, len)) in [large, small] {
            request(s, 0, 0, handle, offset, len, &[]).await;
            asked.insert(handle, (offset, len));
        }
    }
    request(s, 0, 0, 50, FAILING, LARGE, &[]).await;
    for _ in 0..asked.len() + 1 {
        assert_eq!(s.read_u32().await.unwrap(), 0x6744_6698, "reply magic");
        let error = s.read_u32().await.unwrap();
        let handle = s.read_u64().await.unwrap();
        if handle == 50 {
            assert_eq!(error, EIO, "the failed READ answered with EIO");
            continue;
        }
        assert_eq!(error, 0, "READ {handle} succeeded");
        let (offset, len) = asked.remove(&handle).expect("a handle asked for, once");
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await.unwrap();
        let expected: Vec<u8> = (offset..offset + u64::from(len)).map(byte_at).collect();
        assert!(data == expected, "READ {handle}'s bytes");
    }
    assert!(asked.is_empty(), "every READ answered");
}

#[tokio::test]
async fn large_reads_over_loopback_tcp_run_whole_on_a_pool_thread() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (addr, counts) = start_recording_tcp(dir.path()).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    read_mixed(&mut s).await;
    assert_all_ran_whole(&counts);
}

/// READs of a MiB run on the pool thread one after another, those that
/// found it busy waiting for it: none ran on the connection's thread.
/// Every one that succeeded (all cached, on tmpfs) went from the mapping.
fn assert_all_ran_whole(counts: &Counts) {
    assert_eq!(
        counts.whole(),
        LARGE_READS_MIXED,
        "every large READ ran on a pool thread"
    );
    assert_eq!(
        counts.mapped(),
        LARGE_READS_MIXED - 1,
        "every cached large READ was sent from the file's mapping"
    );
    assert_eq!(
        counts.tried_inline(),
        0,
        "no large READ ran on the connection's thread"
    );
}

#[tokio::test]
async fn large_reads_over_a_unix_socket_run_whole_on_a_pool_thread() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = NbdListener::bind(path.to_str().unwrap()).await.unwrap();
    let counts = start_recording(dir.path(), listener);
    let mut s = UnixStream::connect(&path).await.unwrap();
    read_mixed(&mut s).await;
    assert_all_ran_whole(&counts);
}

#[tokio::test]
async fn a_client_that_leaves_without_reading_costs_others_nothing() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (addr, counts) = start_recording_tcp(dir.path()).await;
    let mut rude = tokio::net::TcpStream::connect(addr).await.unwrap();
    greet(&mut rude).await;
    go(&mut rude, "disk0").await;
    // More replies than the sockets' buffers hold: a sender blocks.
    for n in 0..48u64 {
        let offset = (n % 8) * u64::from(LARGE);
        request(&mut rude, 0, 0, n, offset, LARGE, &[]).await;
    }
    let started = async {
        while counts.whole() == 0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), started)
        .await
        .expect("a large READ went to a pool thread");
    rude.shutdown().await.unwrap();
    drop(rude);
    let mut polite = tokio::net::TcpStream::connect(addr).await.unwrap();
    read_mixed(&mut polite).await;
}

#[tokio::test]
async fn a_file_shrunk_under_the_export_ends_only_the_connection_sending_from_it() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = NbdListener::bind(path.to_str().unwrap()).await.unwrap();
    let counts = start_recording(dir.path(), listener);
    let mut s = UnixStream::connect(&path).await.unwrap();
    greet(&mut s).await;
    go(&mut s, "disk0").await;
    // Out of contract (the export is locked), but a daemon serving other
    // clients must survive it: a user-space read of the lost pages would
    // be SIGBUS, the kernel's copy into the socket fails instead.
    let file = std::fs::File::options()
        .write(true)
        .open(dir.path().join("disk0"))
        .unwrap();
    *counts.shrink_on_map.lock().unwrap() = Some(file.try_clone().unwrap());
    request(&mut s, 0, 0, 1, 0, LARGE, &[]).await;
    let mut reply = Vec::new();
    let got = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut reply),
    )
    .await
    .expect("the connection ended");
    assert!(got.is_ok());
    assert_eq!(counts.mapped(), 1, "the READ was sent from the mapping");
    assert!(
        reply.len() < 16 + LARGE as usize,
        "no whole reply of the lost bytes ({} bytes arrived)",
        reply.len()
    );
    // The file back as it was: a new connection reads it all.
    file.set_len(SIZE).unwrap();
    let pattern: Vec<u8> = (0..SIZE).map(byte_at).collect();
    file.write_all_at(&pattern, 0).unwrap();
    let mut again = UnixStream::connect(&path).await.unwrap();
    read_mixed(&mut again).await;
}

/// A target like `braid attach`'s: no backend here, READs answered later
/// from another task with the pattern's bytes (or an error at
/// [`FAILING`]), as replies arrive from a server.
struct Remote;

impl Target for Remote {
    fn submit(&self, _export: usize, op: BackendOp, done: Completion) {
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            done(match op {
                BackendOp::Read { offset, .. } if offset == FAILING => Err(Status::Io),
                BackendOp::Read { offset, len } => Ok((offset..offset + u64::from(len))
                    .map(byte_at)
                    .collect::<Vec<u8>>()
                    .into()),
                _ => Err(Status::Unsupported),
            })
        });
    }

    fn allocation(&self, _export: usize, _offset: u64, len: u64, done: ExtentsCompletion) {
        done(Ok(vec![Extent { len, hole: false }]))
    }

    fn fast_zero(&self) -> bool {
        false
    }
}

/// Serves [`Remote`] as disk0 on a unix socket in `dir`; returns its path.
async fn start_remote(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("remote.sock");
    let listener = NbdListener::bind(path.to_str().unwrap()).await.unwrap();
    tokio::spawn(serve(
        listener,
        NbdConfig::new(vec![NbdExport::new("disk0", SIZE, 0)]),
        Arc::new(Remote),
        std::future::pending(),
    ));
    path
}

#[tokio::test]
async fn large_reads_from_memory_arrive_whole_between_small_ones() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = start_remote(dir.path()).await;
    let clients = async {
        for _ in 0..3 {
            let mut s = UnixStream::connect(&path).await.unwrap();
            read_mixed(&mut s).await;
            // One at a time: each finds the previous one's sender gone.
            for n in 0..3u64 {
                let offset = n * u64::from(LARGE) + 512;
                request(&mut s, 0, 0, 200 + n, offset, LARGE, &[]).await;
                assert_eq!(s.read_u32().await.unwrap(), 0x6744_6698, "reply magic");
                assert_eq!(s.read_u32().await.unwrap(), 0, "READ succeeded");
                assert_eq!(s.read_u64().await.unwrap(), 200 + n, "its handle");
                let mut data = vec![0; LARGE as usize];
                s.read_exact(&mut data).await.unwrap();
                let expected: Vec<u8> = (offset..offset + u64::from(LARGE)).map(byte_at).collect();
                assert!(data == expected, "READ {n}'s bytes");
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), clients)
        .await
        .expect("every reply sent");
}

#[tokio::test]
async fn a_client_that_leaves_without_reading_large_replies_from_memory_costs_others_nothing() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = start_remote(dir.path()).await;
    let mut rude = UnixStream::connect(&path).await.unwrap();
    greet(&mut rude).await;
    go(&mut rude, "disk0").await;
    // Far more than the socket's buffer holds: the sender blocks on it.
    for n in 0..48u64 {
        let offset = (n % 8) * u64::from(LARGE);
        request(&mut rude, 0, 0, n, offset, LARGE, &[]).await;
    }
    // Some of the replies have started: the socket holds their first bytes.
    assert_eq!(rude.read_u32().await.unwrap(), 0x6744_6698, "reply magic");
    drop(rude);
    let polite = async {
        let mut s = UnixStream::connect(&path).await.unwrap();
        read_mixed(&mut s).await;
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), polite)
        .await
        .expect("another client is served while the first one's replies are abandoned");
}
