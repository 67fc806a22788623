//! The drivers over real loopback sockets and a real file.

use braid_backend_file::{ExportFile, FileBackend, IoEngine, OpenOptions};
use braid_core::auth::Key;
use braid_core::client::{ClientConfig, IoRequest};
use braid_core::server::{
    Backend, BackendOp, ExportConfig, ServerConfig, ServerEngine, SpliceSource,
};
use braid_core::wire::Status;
use braid_fabric_tcp::{Client, ClientSecurity, Server, ServerSecurity};
use bytes::Bytes;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const SIZE: u64 = 64 << 20;

/// Starts a server on `addr` over the file at `path`; returns its address
/// and a trigger that shuts it down.
async fn start_server(
    addr: &str,
    path: &Path,
    boot_id: u64,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    start_secure_server(addr, path, boot_id, ServerSecurity::Plain).await
}

async fn start_secure_server(
    addr: &str,
    path: &Path,
    boot_id: u64,
    security: ServerSecurity,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let backend = Arc::new(FileBackend::new(vec![export_file(path)]));
    let (local, stop, task, _server) = serve(addr, backend, boot_id, security).await;
    (local, stop, task)
}

/// The export file at `path`, created at [`SIZE`] if it is not there.
fn export_file(path: &Path) -> ExportFile {
    ExportFile::open(
        path,
        &OpenOptions {
            create_size: Some(SIZE),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Serves export disk0 of `backend` on `addr`; returns its address, a
/// trigger that shuts it down, its task and its handle.
async fn serve(
    addr: &str,
    backend: Arc<dyn Backend>,
    boot_id: u64,
    security: ServerSecurity,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    Server,
) {
    let config = ServerConfig::new(
        boot_id,
        [boot_id as u8; 32],
        vec![("test".into(), Key::new(*b"test key"))],
        vec![ExportConfig::new("disk0", SIZE)],
    );
    let listener = TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (started_tx, started) = oneshot::channel::<Server>();
    let task = tokio::spawn(async move {
        Server::run(
            listener,
            security,
            ServerEngine::new(config).expect("a valid config"),
            backend,
            async {
                let _ = stop_rx.await;
            },
            |s: Server| {
                let _ = started_tx.send(s);
            },
        )
        .await
        .unwrap();
    });
    (local, stop_tx, task, started.await.unwrap())
}

/// A file backend that says every range of its file is in the page cache,
/// so large reads may go by `sendfile` whatever the test's file system.
struct AllCached {
    files: FileBackend,
    file: Arc<std::fs::File>,
}

impl AllCached {
    fn open(path: &Path) -> Arc<AllCached> {
        Arc::new(AllCached {
            files: FileBackend::new(vec![export_file(path)]),
            file: Arc::new(std::fs::File::open(path).unwrap()),
        })
    }
}

impl Backend for AllCached {
    fn execute(&self, export: usize, op: &BackendOp) -> Result<Bytes, Status> {
        self.files.execute(export, op)
    }

    fn splice_source(&self, _export: usize, offset: u64, len: u32) -> Option<SpliceSource> {
        (offset + u64::from(len) <= SIZE).then(|| SpliceSource {
            file: self.file.clone(),
            offset,
        })
    }

    fn payload_crc(&self, export: usize, offset: u64, len: u32) -> Option<u32> {
        self.files.payload_crc(export, offset, len)
    }
}

/// Large reads on a plain connection leave straight from the file, with
/// their checksum taken as they were read; small ones, and every read over
/// TLS, go through memory. The data is the same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_reads_go_from_the_file_and_arrive_intact() {
    let dir = tempfile::tempdir().unwrap();
    let backend = AllCached::open(&dir.path().join("d"));
    let (addr, _stop, _task, server) =
        serve("127.0.0.1:0", backend.clone(), 1, ServerSecurity::Plain).await;
    let client = plain_client(addr).await;
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    let data = Bytes::from(data);
    for at in (0..3 << 20).step_by(1 << 20) {
        let piece = data.slice(at..at + (1 << 20));
        client
            .io(IoRequest::write((1 << 20) + at as u64, piece, true))
            .await
            .unwrap();
    }

    let mut expected_file_replies = 0;
    for (offset, len) in [
        (1 << 20, 1 << 20),
        (3 << 20, 300 << 10),
        (1 << 20, 64 << 10),
    ] {
        let got = client.io(IoRequest::read(offset, len)).await.unwrap();
        let at = (offset - (1 << 20)) as usize;
        assert!(
            got == data.slice(at..at + len as usize),
            "{len} bytes at {offset}"
        );
        if len >= 128 << 10 {
            expected_file_replies += 1;
        }
    }
    let stats = server.status().stats;
    assert_eq!(stats.file_replies, expected_file_replies);
    assert_eq!(client.status().stats.corrupt_frames, 0);

    // Reads racing writes to the same region: a reply sent from the file
    // may carry bytes newer than its checksum; the client then asks again.
    // Every read completes with bytes the writes put there (a read racing
    // a write may mix them: the page cache gives no atomicity).
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            for round in 0..150u8 {
                let data = Bytes::from(vec![round; 1 << 20]);
                client.io(IoRequest::write(0, data, false)).await.unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads == 0 {
        let got = client.io(IoRequest::read(0, 1 << 20)).await.unwrap();
        assert_eq!(got.len(), 1 << 20);
        if let Some(at) = got.iter().position(|b| *b >= 150) {
            panic!("byte {at} is {}, which no write put there", got[at]);
        }
        reads += 1;
    }
    writer.await.unwrap();
    // A read asked for again is answered from memory: one retry at most.
    let retried = client.status().stats.corrupt_frames;
    assert!(retried <= reads, "{retried} retries for {reads} reads");
    assert!(server.status().stats.file_replies >= expected_file_replies + reads);
    // The checksums the server kept of the region while it was rewritten
    // are the last write's: reads of it now pass the first time.
    for _ in 0..3 {
        let got = client.io(IoRequest::read(0, 1 << 20)).await.unwrap();
        assert!(got.iter().all(|b| *b == 149), "the last write's bytes");
    }
    assert_eq!(
        client.status().stats.corrupt_frames,
        retried,
        "no checksum outlived the bytes it was kept for"
    );
    assert!(
        backend.files.checksums_reused() >= 3 * 256,
        "the last reads were not read again for their checksums"
    );

    #[cfg(feature = "tls")]
    {
        let (c, k) = (dir.path().join("s.pem"), dir.path().join("s.key"));
        braid_fabric_tcp::tls::generate_self_signed(&["localhost".into()], &c, &k).unwrap();
        let acceptor = braid_fabric_tcp::tls::acceptor(&c, &k, None).unwrap();
        let (addr, _stop, _task, server) =
            serve("127.0.0.1:0", backend, 2, ServerSecurity::Tls(acceptor)).await;
        let (connector, name) = braid_fabric_tcp::tls::connector(&c, "localhost", None).unwrap();
        let client = connect(
            addr,
            ClientSecurity::Tls(connector, name),
            b"test key",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let got = client.io(IoRequest::read(1 << 20, 1 << 20)).await.unwrap();
        assert!(got == data.slice(..1 << 20), "1 MiB over TLS");
        assert_eq!(
            server.status().stats.file_replies,
            0,
            "TLS must see the bytes"
        );
    }
}

fn client_config(key: &[u8]) -> ClientConfig {
    ClientConfig::new("disk0", "test", Key::new(key.to_vec()), [3; 32])
}

/// A client of export disk0 with the test key id and `key`.
/// A client of `addr` over plain TCP with the test key.
async fn plain_client(addr: SocketAddr) -> Client {
    connect(
        addr,
        ClientSecurity::Plain,
        b"test key",
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

async fn connect(
    addr: impl ToString,
    security: ClientSecurity,
    key: &[u8],
    wait: Duration,
) -> Result<Client, braid_fabric_tcp::ConnectError> {
    Client::connect(addr.to_string(), security, client_config(key), wait).await
}

/// With the io_uring engine the server's loop starts what would wait on
/// the pool (here every operation: the export is O_DIRECT where the file
/// system allows it, else large writes) and answers each when the kernel
/// is done; concurrent writes and reads of both sizes keep every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_io_uring_arrive_intact() {
    let dir = tempfile::tempdir_in(".").unwrap();
    let path = dir.path().join("d");
    let direct = OpenOptions {
        create_size: Some(SIZE),
        direct: true,
        ..Default::default()
    };
    let file = ExportFile::open(&path, &direct).unwrap_or_else(|_| export_file(&path));
    let backend = Arc::new(FileBackend::new(vec![file]).with_io_engine(IoEngine::Uring));
    let (addr, _stop, _task, _server) =
        serve("127.0.0.1:0", backend.clone(), 1, ServerSecurity::Plain).await;
    let client = plain_client(addr).await;
    let piece = |i: u64, len: usize| -> Bytes {
        (0..len)
            .map(|b| (b as u64 * 7 + i * 13) as u8)
            .collect::<Vec<u8>>()
            .into()
    };
    // Sixteen 1 MiB regions, each written whole then in 4 KiB pieces over
    // its second half, all at once.
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let at = i << 20;
            c.io(IoRequest::write(at, piece(i, 1 << 20), false))
                .await
                .unwrap();
            for k in 128..256u64 {
                c.io(IoRequest::write(
                    at + k * 4096,
                    piece(i + k, 4096),
                    k % 32 == 0,
                ))
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    client.io(IoRequest::flush()).await.unwrap();
    for i in 0..16u64 {
        let at = i << 20;
        let got = client.io(IoRequest::read(at, 1 << 20)).await.unwrap();
        assert!(
            got.slice(..512 << 10) == piece(i, 1 << 20).slice(..512 << 10),
            "region {i}"
        );
        for k in 128..256u64 {
            let small = client
                .io(IoRequest::read(at + k * 4096, 4096))
                .await
                .unwrap();
            let expect = piece(i + k, 4096);
            assert!(small == expect, "4 KiB {k} of region {i}");
            let off = (k * 4096) as usize;
            assert!(
                got.slice(off..off + 4096) == expect,
                "region {i} read whole, at {k}"
            );
        }
    }
    let on_ring = backend.ops_on_io_uring();
    assert!(on_ring >= 16, "the ring ran {on_ring}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_flows_over_four_tcp_channels() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop, _task) = start_server("127.0.0.1:0", &dir.path().join("d"), 1).await;
    let client = connect(
        addr.to_string(),
        ClientSecurity::Plain,
        b"test key",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(client.info().size, SIZE);
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let data = Bytes::from(vec![i as u8; 4096]);
            c.io(IoRequest::write(i * 4096, data.clone(), false))
                .await
                .unwrap();
            assert_eq!(c.io(IoRequest::read(i * 4096, 4096)).await.unwrap(), data);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    client.io(IoRequest::flush()).await.unwrap();
    // connect() returns once the first channel has a session; the other
    // three join right after.
    let all_up = async {
        while client.status().channels.iter().filter(|c| c.1).count() < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), all_up)
        .await
        .expect("all 4 channels join the session");
    let status = client.status();
    assert_eq!(status.stats.completed, 129);
    let past_end = client.io(IoRequest::read(SIZE, 512)).await.unwrap_err();
    assert!(past_end.to_string().contains("OutOfRange"), "{past_end}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_hears_its_answer_and_a_closed_client_hands_the_io_back() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop, _task) = start_server("127.0.0.1:0", &dir.path().join("d"), 1).await;
    let client = plain_client(addr).await;
    let data = Bytes::from(vec![0x3C; 4096]);
    let (tx, rx) = oneshot::channel();
    let write = IoRequest::write(8192, data.clone(), false);
    let sent = client.try_io_with(write, Box::new(move |r| drop(tx.send(r))));
    assert!(sent.is_ok(), "an idle client has room");
    rx.await.unwrap().unwrap();
    let (tx, rx) = oneshot::channel();
    let read = IoRequest::read(8192, 4096);
    assert!(client
        .try_io_with(read, Box::new(move |r| drop(tx.send(r))))
        .is_ok());
    assert_eq!(
        rx.await.unwrap().unwrap(),
        data,
        "the callback got the data"
    );

    let closed = client.clone();
    client.close().await;
    let (tx, mut rx) = oneshot::channel::<()>();
    let back = closed.try_io_with(
        IoRequest::read(0, 512),
        Box::new(move |_| {
            let _ = tx.send(());
        }),
    );
    let (io, answer) = back.expect_err("a closed client hands the IO back");
    assert_eq!((io.offset, io.len), (0, 512));
    assert!(rx.try_recv().is_err(), "nothing answered yet");
    answer(Ok(Bytes::new()));
    rx.await.unwrap();
}

/// A volume lets a retired leg's session go this way: the server frees
/// the session at once (GOODBYE), with writes not yet flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_let_go_leaves_its_session_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FileBackend::new(vec![export_file(&dir.path().join("d"))]));
    let (addr, _stop, _task, server) =
        serve("127.0.0.1:0", backend, 1, ServerSecurity::Plain).await;
    let client = plain_client(addr).await;
    client
        .io(IoRequest::write(0, Bytes::from(vec![7; 4096]), false))
        .await
        .unwrap();
    assert_eq!(server.status().sessions, 1);
    client.clone().let_go().await;
    let mut waited = Duration::ZERO;
    while server.status().sessions > 0 {
        assert!(
            waited < Duration::from_secs(10),
            "the server still holds the session"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }
    let handed_back = client.try_io_with(IoRequest::read(0, 512), Box::new(|_| {}));
    assert!(handed_back.is_err(), "a client let go takes no more IO");
}

/// A close waits up to 30 s for a server that is gone, to flush what it
/// acknowledged; a let go does not (a retired leg's server may be shut
/// down for good once the migration is over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_let_go_does_not_wait_for_a_server_that_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop, task) = start_server("127.0.0.1:0", &dir.path().join("d"), 1).await;
    let client = plain_client(addr).await;
    client
        .io(IoRequest::write(0, Bytes::from(vec![7; 4096]), false))
        .await
        .unwrap();
    stop.send(()).unwrap();
    task.await.unwrap();
    let unanswered = {
        let c = client.clone();
        tokio::spawn(async move { c.io(IoRequest::read(0, 4096)).await })
    };
    tokio::time::timeout(Duration::from_secs(10), client.let_go())
        .await
        .expect("let go returns without the server (a close would wait 30 s)");
    let failed = unanswered.await.unwrap().unwrap_err();
    assert!(failed.to_string().contains("Closed"), "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_is_invisible_to_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    let (addr, stop, task) = start_server("127.0.0.1:0", &path, 1).await;
    let client = connect(
        addr.to_string(),
        ClientSecurity::Plain,
        b"test key",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let before = Bytes::from(vec![0x11; 8192]);
    client
        .io(IoRequest::write(0, before.clone(), false))
        .await
        .unwrap();

    // IO keeps being submitted while the server goes away and comes back.
    let writer = {
        let c = client.clone();
        tokio::spawn(async move {
            for i in 1..200u64 {
                let data = Bytes::from(vec![i as u8; 4096]);
                c.io(IoRequest::write(i * 4096 + 65536, data, false))
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_addr, _stop2, _task2) = start_server(&addr.to_string(), &path, 2).await;
    writer.await.unwrap();
    assert_eq!(client.io(IoRequest::read(0, 8192)).await.unwrap(), before);
    for i in 1..200u64 {
        let back = client
            .io(IoRequest::read(i * 4096 + 65536, 4096))
            .await
            .unwrap();
        assert!(back.iter().all(|b| *b == i as u8), "block {i}");
    }
    let s = client.status();
    assert!(s.stats.session_resets >= 1, "{:?}", s.stats);
    assert_eq!(s.stats.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_a_clear_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop, _task) = start_server("127.0.0.1:0", &dir.path().join("d"), 1).await;
    let err = connect(
        addr.to_string(),
        ClientSecurity::Plain,
        b"wrong",
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_is_a_clear_connect_error() {
    let err = connect(
        "127.0.0.1:1",
        ClientSecurity::Plain,
        b"test key",
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use braid_fabric_tcp::tls;

    /// TLS that trusts `ca` and expects the name localhost.
    fn trusting(ca: &Path, client: Option<(&Path, &Path)>) -> ClientSecurity {
        let (connector, name) = tls::connector(ca, "localhost", client).unwrap();
        ClientSecurity::Tls(connector, name)
    }

    fn cert(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        tls::generate_self_signed(&["localhost".into(), "127.0.0.1".into()], &c, &k).unwrap();
        (c, k)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn io_flows_over_tls_and_an_untrusted_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = cert(dir.path(), "server");
        let acceptor = tls::acceptor(&c, &k, None).unwrap();
        let (addr, _stop, _task) = start_secure_server(
            "127.0.0.1:0",
            &dir.path().join("d"),
            1,
            ServerSecurity::Tls(acceptor),
        )
        .await;
        let security = trusting(&c, None);
        let client = connect(
            addr.to_string(),
            security,
            b"test key",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let data = Bytes::from(vec![0x7E; 65536]);
        client
            .io(IoRequest::write(0, data.clone(), true))
            .await
            .unwrap();
        assert_eq!(client.io(IoRequest::read(0, 65536)).await.unwrap(), data);

        // A client trusting some other certificate refuses this server.
        let (other, _) = cert(dir.path(), "other");
        let security = trusting(&other, None);
        let err = connect(
            addr.to_string(),
            security,
            b"test key",
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_certificates_can_be_required() {
        let dir = tempfile::tempdir().unwrap();
        let (sc, sk) = cert(dir.path(), "server");
        let (cc, ck) = cert(dir.path(), "client");
        let acceptor = tls::acceptor(&sc, &sk, Some(&cc)).unwrap();
        let (addr, _stop, _task) = start_secure_server(
            "127.0.0.1:0",
            &dir.path().join("d"),
            1,
            ServerSecurity::Tls(acceptor),
        )
        .await;
        let without = trusting(&sc, None);
        assert!(
            connect(
                addr.to_string(),
                without,
                b"test key",
                Duration::from_secs(5)
            )
            .await
            .is_err(),
            "no client certificate, no session"
        );
        let with = trusting(&sc, Some((&cc, &ck)));
        let client = connect(addr.to_string(), with, b"test key", Duration::from_secs(5))
            .await
            .unwrap();
        client.io(IoRequest::read(0, 4096)).await.unwrap();
        // TLS does not replace the session key: a wrong key still fails.
        let wrong_key = trusting(&sc, Some((&cc, &ck)));
        let err = connect(
            addr.to_string(),
            wrong_key,
            b"wrong",
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("key"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_client_ca_changes_while_serving_and_no_session_resumes_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let (sc, sk) = cert(dir.path(), "server");
        let (c1, k1) = cert(dir.path(), "client1");
        let (c2, k2) = cert(dir.path(), "client2");
        let ca = dir.path().join("client-ca.pem");
        std::fs::copy(&c1, &ca).unwrap();
        let (acceptor, served) = tls::reloadable_acceptor(&sc, &sk, Some(&ca)).unwrap();
        assert_eq!(served.client_ca_path(), Some(ca.as_path()));
        let (addr, _stop, _task) = start_secure_server(
            "127.0.0.1:0",
            &dir.path().join("d"),
            1,
            ServerSecurity::Tls(acceptor),
        )
        .await;
        // A bound, not a sleep: a connect that succeeds returns as soon
        // as its session is up (2 s was too short on a loaded CI box).
        let wait = Duration::from_secs(30);
        // A refusal is retried until its wait runs out, so it gets less.
        let refused_within = Duration::from_secs(2);
        // One connector throughout: it would resume a TLS session it was
        // given before the change, were any kept.
        let first = trusting(&sc, Some((&c1, &k1)));
        let one = connect(addr.to_string(), first.clone(), b"test key", wait)
            .await
            .unwrap();
        one.io(IoRequest::read(0, 4096)).await.unwrap();

        // The CA now signs client2 only.
        std::fs::copy(&c2, &ca).unwrap();
        served.reload().unwrap();
        // Channels secured before keep going ...
        one.io(IoRequest::read(0, 4096)).await.unwrap();
        // ... but client1 gets no new one, not even by resuming a session
        // it was given under the old CA.
        let err = connect(addr.to_string(), first, b"test key", refused_within)
            .await
            .expect_err("client1 refused under the new CA, resumption or not");
        // The server's alert: the certificate does not verify.
        assert!(err.to_string().contains("alert"), "{err}");
        let client2 = || {
            let security = trusting(&sc, Some((&c2, &k2)));
            connect(addr.to_string(), security, b"test key", wait)
        };
        let two = client2().await.unwrap();
        two.io(IoRequest::read(0, 4096)).await.unwrap();

        // A CA file that does not parse changes nothing.
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let err = served.reload().unwrap_err();
        assert!(err.contains("client-ca.pem"), "{err}");
        client2().await.unwrap();
    }
}

/// A raw connection to the server at `addr`, past Hello and Auth as
/// session 0 with the test key: frames are the caller's to write.
async fn raw_session(addr: SocketAddr) -> tokio::net::TcpStream {
    use braid_core::wire::{self, Auth, Hello, Message};
    use tokio::io::AsyncWriteExt;
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let nonce = [4u8; 16];
    let hello = Message::Hello(Hello {
        version_min: 1,
        version_max: 1,
        features: 0,
        session_id: 0,
        client_nonce: nonce,
        owner: 0,
        epoch: 0,
        key_id: "test".into(),
        export: "disk0".into(),
    });
    sock.write_all(&wire::encode(&hello).to_bytes())
        .await
        .unwrap();
    let mut reader = wire::FrameReader::new(1 << 20);
    let Some(Message::Challenge(c)) = raw_frame(&mut sock, &mut reader).await else {
        panic!("expected a challenge")
    };
    let t = braid_core::auth::Transcript {
        key_id: "test",
        export: "disk0",
        session_id: 0,
        owner_epoch: (0, 0),
        client_nonce: &nonce,
        server_nonce: &c.server_nonce,
        boot_id: c.boot_id,
    };
    let proof = braid_core::auth::client_proof(&Key::new(*b"test key"), &t);
    sock.write_all(
        &wire::encode(&Message::Auth(Auth {
            client_proof: proof,
        }))
        .to_bytes(),
    )
    .await
    .unwrap();
    let welcome = raw_frame(&mut sock, &mut reader).await;
    assert!(
        matches!(welcome, Some(Message::Welcome(_))),
        "expected a welcome, got {welcome:?}"
    );
    sock
}

/// A request frame of 1 MiB at offset 0 (with `payload` for a WRITE),
/// encoded for a raw connection.
fn raw_request(op: braid_core::wire::Op, id: u64, payload: Bytes) -> Bytes {
    use braid_core::wire::{encode, Message, Request};
    encode(&Message::Request(Request {
        op,
        id,
        floor: 1,
        offset: 0,
        length: 1 << 20,
        flags: 0,
        remote: None,
        payload,
    }))
    .to_bytes()
}

/// The next frame on a raw connection, `None` once the server closed it.
async fn raw_frame(
    sock: &mut tokio::net::TcpStream,
    reader: &mut braid_core::wire::FrameReader,
) -> Option<braid_core::wire::Message> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(f) = reader.next_frame().unwrap() {
            return Some(braid_core::wire::decode(f).unwrap());
        }
        let mut buf = [0u8; 4096];
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => reader.extend(&buf[..n]),
        }
    }
}

/// A large frame's reader is woken only once the frame is whole (the
/// receive low-water mark): a WRITE whose data comes in two parts with a
/// pause between is still answered, and one whose sender closes halfway
/// ends the connection instead of leaving it waiting for bytes that will
/// never come.
#[tokio::test]
async fn a_large_frame_arriving_in_parts_or_cut_short_is_never_left_waiting() {
    use braid_core::wire::{self, Message, Op};
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop, _task) = start_server("127.0.0.1:0", &dir.path().join("d"), 1).await;
    let write = |id: u64| raw_request(Op::Write, id, Bytes::from(vec![id as u8; 1 << 20]));
    let mut sock = raw_session(addr).await;
    let mut reader = wire::FrameReader::new(1 << 20);
    let first = write(1);
    sock.write_all(&first[..100 << 10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    sock.write_all(&first[100 << 10..]).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), raw_frame(&mut sock, &mut reader))
        .await
        .expect("the WRITE is answered once its last part arrives");
    let Some(Message::Reply(r)) = answered else {
        panic!("expected a reply, got {answered:?}")
    };
    assert_eq!((r.id, r.status), (1, Status::Ok));

    let second = write(2);
    sock.write_all(&second[..300 << 10]).await.unwrap();
    sock.shutdown().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), raw_frame(&mut sock, &mut reader))
        .await
        .expect("the server closes the connection");
    assert!(ended.is_none(), "no answer to half a WRITE: {ended:?}");
}

/// A peer that authenticates, floods large reads and never reads the
/// replies is cut off; everyone else keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_cut_off_and_others_are_untouched() {
    use braid_core::wire::Op;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop, _task) = start_server("127.0.0.1:0", &dir.path().join("d"), 1).await;
    let mut sock = raw_session(addr).await;
    // 400 reads of 1 MiB, never reading a byte back: far past the send
    // queue bound.
    let mut cut_off = false;
    for id in 1..=400u64 {
        if sock
            .write_all(&raw_request(Op::Read, id, Bytes::new()))
            .await
            .is_err()
        {
            cut_off = true;
            break;
        }
    }
    // Meanwhile a polite client is served normally.
    let client = connect(
        addr.to_string(),
        ClientSecurity::Plain,
        b"test key",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let data = Bytes::from(vec![9; 4096]);
    client
        .io(IoRequest::write(4096, data.clone(), false))
        .await
        .unwrap();
    assert_eq!(client.io(IoRequest::read(4096, 4096)).await.unwrap(), data);
    if !cut_off {
        // Drain: the server must have closed us, so this ends (bounded).
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            let mut buf = vec![0u8; 1 << 20];
            while sock.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
        })
        .await;
        assert!(
            drained.is_ok(),
            "the server never closed the peer that stopped reading"
        );
    }
}
