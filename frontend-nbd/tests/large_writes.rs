//! Large WRITEs on a file that takes them at once: over TCP they are
//! written by the connection that received them (its client goes on
//! sending into the socket's large buffer meanwhile), over a unix socket
//! handed on (its small buffer would leave the client waiting). The bytes
//! land the same either way, and each WRITE is answered once.

mod common;

use braid_core::server::BackendOp;
use braid_core::wire::Status;
use braid_frontend_nbd::{
    serve, BackendTarget, Completion, ExtentsCompletion, NbdConfig, NbdListener, Target,
};
use bytes::Bytes;
use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, UnixStream};

const LARGE: u32 = 1 << 20;
const WRITES: u64 = 3;

/// Counts the large WRITEs finished where they arrived and those handed
/// to `submit`.
struct Counting {
    inner: BackendTarget,
    inline: Arc<AtomicUsize>,
    handed: Arc<AtomicUsize>,
}

fn is_large_write(op: &BackendOp) -> bool {
    matches!(op, BackendOp::Write { data, .. } if data.len() == LARGE as usize)
}

impl Target for Counting {
    fn submit(&self, export: usize, op: BackendOp, done: Completion) {
        if is_large_write(&op) {
            self.handed.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.submit(export, op, done)
    }
    fn try_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        let result = self.inner.try_now(export, op);
        if result.is_some() && is_large_write(op) {
            self.inline.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
    fn allocation(&self, export: usize, offset: u64, len: u64, done: ExtentsCompletion) {
        self.inner.allocation(export, offset, len, done)
    }
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }
}

/// Serves the common exports from tmpfs (whose page cache takes any
/// write at once) on `listener`; returns the two counters.
fn start_counting(
    dir: &std::path::Path,
    listener: NbdListener,
) -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (backend, exports) = exports(dir);
    let inline = Arc::new(AtomicUsize::new(0));
    let handed = Arc::new(AtomicUsize::new(0));
    let target = Counting {
        inner: BackendTarget::new(backend),
        inline: inline.clone(),
        handed: handed.clone(),
    };
    tokio::spawn(serve(
        listener,
        NbdConfig::new(exports),
        Arc::new(target),
        std::future::pending(),
    ));
    (inline, handed)
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
    let (inline, handed) = start_counting(dir.path(), NbdListener::Tcp(listener));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    write_and_read_back(&mut s).await;
    assert_eq!(inline.load(Ordering::Relaxed), WRITES as usize);
    assert_eq!(handed.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn large_writes_over_a_unix_socket_are_handed_on() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = NbdListener::bind(path.to_str().unwrap()).await.unwrap();
    let (inline, handed) = start_counting(dir.path(), listener);
    let mut s = UnixStream::connect(&path).await.unwrap();
    write_and_read_back(&mut s).await;
    assert_eq!(inline.load(Ordering::Relaxed), 0);
    assert_eq!(handed.load(Ordering::Relaxed), WRITES as usize);
}
