//! Large READs sent with `sendfile` from the backing file's page cache:
//! the bytes, framing and order are the same as for copied replies, over
//! TCP to other machines (peers on this machine, over loopback or a unix
//! socket, get copies), in simple and structured replies; a backing file that turns out shorter
//! than the export closes the connection rather than send a reply it
//! cannot finish. A transfer that has to wait for its
//! client in the middle tells the target (the daemon polls through it).

mod common;

use braid_backend_file::{ExportFile, FileBackend, OpenOptions};
use braid_core::server::{BackendOp, SpliceSource};
use braid_frontend_nbd::{
    serve, BackendTarget, Completion, ExtentsCompletion, NbdConfig, NbdExport, NbdListener, Target,
};
use common::*;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

/// A file target that counts the READs it offered to `sendfile` and the
/// times a reply waited for its client, and can offer a different file
/// for READs (one shorter than the export).
struct Counting {
    inner: BackendTarget,
    spliced: Arc<AtomicUsize>,
    waits: Arc<AtomicUsize>,
    short: Option<Arc<std::fs::File>>,
}

impl Target for Counting {
    fn submit(&self, export: usize, op: BackendOp, done: Completion) {
        self.inner.submit(export, op, done)
    }
    fn allocation(&self, export: usize, offset: u64, len: u64, done: ExtentsCompletion) {
        self.inner.allocation(export, offset, len, done)
    }
    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }
    fn splice_read(&self, export: usize, offset: u64, len: u32) -> Option<SpliceSource> {
        let src = match &self.short {
            Some(file) => Some(SpliceSource {
                file: file.clone(),
                offset,
            }),
            None => self.inner.splice_read(export, offset, len),
        };
        if src.is_some() {
            self.spliced.fetch_add(1, Ordering::Relaxed);
        }
        src
    }
    fn client_wait(&self) {
        self.waits.fetch_add(1, Ordering::Relaxed);
    }
}

/// A directory on tmpfs, where every page is cached, so large READs are
/// always offered to `sendfile` (on a disk it depends on the page cache).
fn memory_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap()
}

/// Serves a SIZE export filled with a known pattern; returns the pattern
/// and the counters of spliced READs and of waits.
fn start_counting(
    dir: &std::path::Path,
    listener: NbdListener,
    short: Option<Arc<std::fs::File>>,
) -> (Vec<u8>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let path = dir.join("disk");
    let pattern: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &pattern).unwrap();
    let file = ExportFile::open(&path, &OpenOptions::default()).unwrap();
    let spliced = Arc::new(AtomicUsize::new(0));
    let waits = Arc::new(AtomicUsize::new(0));
    let target = Counting {
        inner: BackendTarget::new(Arc::new(FileBackend::new(vec![file]))),
        spliced: spliced.clone(),
        waits: waits.clone(),
        short,
    };
    tokio::spawn(serve(
        listener,
        NbdConfig::new(vec![NbdExport::new("disk0", SIZE, 0)]),
        Arc::new(target),
        std::future::pending(),
    ));
    (pattern, spliced, waits)
}

/// [`start_counting`] on a fresh TCP port of `ip`: its address as well.
async fn start_counting_tcp_on(
    ip: IpAddr,
    dir: &std::path::Path,
    short: Option<Arc<std::fs::File>>,
) -> (std::net::SocketAddr, Vec<u8>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (pattern, spliced, _) = start_counting(dir, NbdListener::Tcp(listener), short);
    (addr, pattern, spliced)
}

/// [`start_counting_tcp_on`] this machine's address toward the network, so
/// READs go by `sendfile` as they do for clients on other machines (the
/// server copies for loopback peers). `None`, said on stderr, where the
/// machine has no such address; CI always has one.
async fn start_counting_tcp(
    dir: &std::path::Path,
    short: Option<Arc<std::fs::File>>,
) -> Option<(std::net::SocketAddr, Vec<u8>, Arc<AtomicUsize>)> {
    let Some(ip) = outward_address() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI machines have an address besides loopback"
        );
        eprintln!("no address besides loopback here: TCP sendfile not exercised");
        return None;
    };
    Some(start_counting_tcp_on(ip, dir, short).await)
}

/// The source address this machine would use toward a documentation
/// address (a UDP "connect" sends nothing), if it is not loopback.
fn outward_address() -> Option<IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("203.0.113.1:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Reads in flight together: large ones (spliced), a small one between
/// them (copied), one ending at the export's end, one unaligned.
const READS: [(u64, u32); 5] = [
    (0, 1 << 20),
    (4096, 4096),
    ((1 << 20) + 512, 3 << 20),
    (SIZE - (64 << 10), 64 << 10),
    (12345, (64 << 10) + 1),
];

/// Connects to `addr`, sends every READ of [`READS`] at once and checks
/// each answer against `pattern`; returns the connection.
async fn read_all_of_reads(addr: std::net::SocketAddr, pattern: &[u8]) -> tokio::net::TcpStream {
    let (mut s, _, _) = connect(addr, "disk0").await;
    for (h, (offset, len)) in READS.iter().enumerate() {
        request(&mut s, 0, 0, h as u64, *offset, *len, &[]).await;
    }
    // Simple replies carry no length: answers come in the order sent here
    // because each is answered inline, so each is read at its own size.
    for (h, (offset, len)) in READS.iter().enumerate() {
        let (handle, error, data) = reply(&mut s, *len as usize).await;
        assert_eq!((handle, error), (h as u64, 0));
        let at = *offset as usize;
        assert!(data == pattern[at..at + *len as usize], "read {h} differs");
    }
    s
}

#[tokio::test]
async fn large_reads_over_tcp_come_from_the_page_cache_byte_for_byte() {
    let dir = memory_dir();
    let Some((addr, pattern, spliced)) = start_counting_tcp(dir.path(), None).await else {
        return;
    };
    let mut s = read_all_of_reads(addr, &pattern).await;
    assert_eq!(
        spliced.load(Ordering::Relaxed),
        4,
        "every READ of 64 KiB or more"
    );
    // The connection goes on as before.
    request(&mut s, 0, 0, 99, 8192, 4096, &[]).await;
    assert_eq!(reply(&mut s, 4096).await.2, pattern[8192..12288]);
}

#[tokio::test]
async fn large_reads_to_a_client_on_loopback_are_copied() {
    let dir = memory_dir();
    let (addr, pattern, spliced) =
        start_counting_tcp_on(IpAddr::from([127, 0, 0, 1]), dir.path(), None).await;
    read_all_of_reads(addr, &pattern).await;
    assert_eq!(
        spliced.load(Ordering::Relaxed),
        0,
        "no READ went by sendfile"
    );
}

#[tokio::test]
async fn large_reads_to_a_client_over_a_unix_socket_are_copied() {
    let dir = memory_dir();
    let path = dir.path().join("nbd.sock");
    let listener = NbdListener::bind(path.to_str().unwrap()).await.unwrap();
    let (pattern, spliced, _) = start_counting(dir.path(), listener, None);
    let mut s = UnixStream::connect(&path).await.unwrap();
    greet(&mut s).await;
    go(&mut s, "disk0").await;
    for (h, (offset, len)) in READS.iter().enumerate() {
        request(&mut s, 0, 0, h as u64, *offset, *len, &[]).await;
        let (handle, error, data) = reply(&mut s, *len as usize).await;
        assert_eq!((handle, error), (h as u64, 0));
        let at = *offset as usize;
        assert!(data == pattern[at..at + *len as usize], "read {h} differs");
    }
    assert_eq!(
        spliced.load(Ordering::Relaxed),
        0,
        "no READ went by sendfile"
    );
}

#[tokio::test]
async fn large_structured_reads_over_tcp_carry_their_offsets() {
    let dir = memory_dir();
    let Some((addr, pattern, spliced)) = start_counting_tcp(dir.path(), None).await else {
        return;
    };
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    option(&mut s, 8, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, 1, "STRUCTURED_REPLY acked");
    go(&mut s, "disk0").await;
    for (h, (offset, len)) in READS.iter().enumerate() {
        request(&mut s, 0, 0, h as u64, *offset, *len, &[]).await;
    }
    for _ in READS {
        let AnyReply::Chunk {
            flags,
            ty,
            handle,
            payload,
        } = any_reply(&mut s).await
        else {
            panic!("a structured READ answered with a simple reply");
        };
        let (offset, len) = READS[handle as usize];
        assert_eq!((ty, flags & 1), (1, 1), "one final OFFSET_DATA chunk");
        assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), offset);
        let at = offset as usize;
        assert!(
            payload[8..] == pattern[at..at + len as usize],
            "read {handle} differs"
        );
    }
    assert_eq!(spliced.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_backing_file_shorter_than_a_spliced_read_closes_the_connection() {
    let dir = memory_dir();
    let short = dir.path().join("short");
    std::fs::write(&short, vec![5u8; 100 << 10]).unwrap();
    let short = Arc::new(std::fs::File::open(&short).unwrap());
    let Some((addr, _, spliced)) = start_counting_tcp(dir.path(), Some(short)).await else {
        return;
    };
    let (mut s, _, _) = connect(addr, "disk0").await;
    request(&mut s, 0, 0, 1, 0, 1 << 20, &[]).await;
    // The header promised 1 MiB; 100 KiB exist. The server must not send
    // anything else in their place: the stream ends after the file does.
    let mut got = Vec::new();
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the connection is closed, not left hanging")
        .unwrap_or(got.len());
    assert_eq!(
        n,
        16 + (100 << 10),
        "the header and the file's bytes, then the end"
    );
    assert!(got[16..].iter().all(|b| *b == 5));
    assert_eq!(spliced.load(Ordering::Relaxed), 1);
    // Other connections are served as before.
    let (mut other, _, _) = connect(addr, "disk0").await;
    request(&mut other, 0, 0, 2, 0, 4096, &[]).await;
    assert_eq!(reply(&mut other, 4096).await.1, 0);
}

#[tokio::test]
async fn a_client_leaving_in_the_middle_of_spliced_reads_costs_nobody_else() {
    let dir = memory_dir();
    let Some((addr, pattern, spliced)) = start_counting_tcp(dir.path(), None).await else {
        return;
    };
    let (mut leaving, _, _) = connect(addr, "disk0").await;
    // More than the sockets hold: the server is still sending when the
    // client goes.
    for h in 0..8u64 {
        request(&mut leaving, 0, 0, h, h << 20, 4 << 20, &[]).await;
    }
    let mut some = vec![0u8; 100_000];
    leaving.read_exact(&mut some).await.unwrap();
    drop(leaving);
    let (mut s, _, _) = connect(addr, "disk0").await;
    request(&mut s, 0, 0, 1, 5 << 20, 2 << 20, &[]).await;
    let (_, error, data) = reply(&mut s, 2 << 20).await;
    assert_eq!(error, 0);
    assert!(data == pattern[5 << 20..7 << 20]);
    assert!(spliced.load(Ordering::Relaxed) >= 2);
}

/// [`start_counting`] on a unix socket in `dir`, and a client connected
/// to "disk0" (simple replies); the pattern and the counter of waits.
async fn connect_counting_unix(dir: &std::path::Path) -> (UnixStream, Vec<u8>, Arc<AtomicUsize>) {
    let path = dir.join("nbd.sock");
    let listener = NbdListener::bind(path.to_str().unwrap()).await.unwrap();
    let (pattern, _, waits) = start_counting(dir, listener, None);
    let mut s = UnixStream::connect(&path).await.unwrap();
    greet(&mut s).await;
    go(&mut s, "disk0").await;
    (s, pattern, waits)
}

/// A reply bigger than the client's socket holds waits for the client to
/// read, and tells the target each time (the daemon polls through such
/// waits instead of sleeping); replies that fit never wait. The test's
/// runtime has one thread, so the client reads nothing while the server
/// sends: the socket is sure to fill.
#[tokio::test]
async fn a_reply_that_waits_for_its_client_tells_the_target() {
    let dir = memory_dir();
    let (mut s, pattern, waits) = connect_counting_unix(dir.path()).await;
    for h in 0..4u64 {
        request(&mut s, 0, 0, h, h * 4096, 4096, &[]).await;
        assert_eq!(reply(&mut s, 4096).await.1, 0);
    }
    assert_eq!(waits.load(Ordering::Relaxed), 0, "small replies never wait");
    // Over twice a unix socket's buffer, and small enough for the
    // connection's writer to send it (not a pool thread).
    let len = (512 << 10) - 4096;
    request(&mut s, 0, 0, 9, 0, len as u32, &[]).await;
    let (handle, error, data) = reply(&mut s, len).await;
    assert_eq!((handle, error), (9, 0));
    assert!(data == pattern[..len]);
    assert!(
        waits.load(Ordering::Relaxed) >= 1,
        "{len} bytes cannot leave without the client reading"
    );
}

/// A WRITE whose data arrives in two parts tells the target that it waits
/// for the rest, and then lands whole.
#[tokio::test]
async fn a_write_whose_data_is_still_arriving_tells_the_target() {
    let dir = memory_dir();
    let (mut s, _, waits) = connect_counting_unix(dir.path()).await;
    let data: Vec<u8> = (0..64u32 << 10).map(|i| (i * 7 + 3) as u8).collect();
    request(&mut s, 1, 0, 1, 8192, data.len() as u32, &data[..20_000]).await;
    // Nothing times this: the server has the first part and must wait, so
    // the count moves once it has run.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while waits.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the server said it waits for the rest of the data");
    s.write_all(&data[20_000..]).await.unwrap();
    assert_eq!(reply(&mut s, 0).await, (1, 0, vec![]));
    request(&mut s, 0, 0, 2, 8192, data.len() as u32, &[]).await;
    assert!(reply(&mut s, data.len()).await.2 == data);
}
