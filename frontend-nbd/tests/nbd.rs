//! The NBD face against a hand-driven client (spec clauses) and against
//! qemu-img / qemu-io (interoperability).

mod common;

use common::*;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn negotiation_follows_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_u32(3).await.unwrap();
    // An unknown option: ERR_UNSUP, and negotiation goes on (MUST).
    option(&mut s, 99, b"whatever").await;
    assert_eq!(option_reply(&mut s).await.1, (1 << 31) + 1);
    // LIST names every export, then ACK.
    option(&mut s, 3, &[]).await;
    let mut names = Vec::new();
    loop {
        let (_, ty, d) = option_reply(&mut s).await;
        if ty == 1 {
            break;
        }
        assert_eq!(ty, 2);
        names.push(String::from_utf8(d[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk0", "ro"]);
    // INFO on an unknown export: ERR_UNKNOWN; on a real one: INFO_EXPORT
    // with its size, and BLOCK_SIZE.
    option(&mut s, 6, &go_data("nope")).await;
    assert_eq!(option_reply(&mut s).await.1, (1 << 31) + 6);
    option(&mut s, 6, &go_data("ro")).await;
    let (_, ty, d) = option_reply(&mut s).await;
    assert_eq!(
        (ty, u64::from_be_bytes(d[2..10].try_into().unwrap())),
        (3, SIZE)
    );
    assert_ne!(u16::from_be_bytes([d[10], d[11]]) & 2, 0, "read-only flag");
    let (_, ty, d) = option_reply(&mut s).await;
    assert_eq!(
        (ty, u16::from_be_bytes([d[0], d[1]])),
        (3, 3),
        "block size info"
    );
    assert_eq!(option_reply(&mut s).await.1, 1);
    // ABORT is acknowledged and the server closes.
    option(&mut s, 2, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, 1);
    assert_eq!(s.read(&mut [0u8; 1]).await.unwrap(), 0);
}

#[tokio::test]
async fn commands_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let (mut s, size, flags) = connect(addr, "disk0").await;
    assert_eq!(size, SIZE);
    assert_ne!(flags & (1 << 8), 0, "CAN_MULTI_CONN");
    let data = vec![0xAB; 8192];
    request(&mut s, 1, 1, 1, 4096, 8192, &data).await; // WRITE with FUA
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 0, 0, 2, 4096, 8192, &[]).await;
    assert_eq!(reply(&mut s, 8192).await.2, data);
    request(&mut s, 4, 0, 3, 4096, 4096, &[]).await; // TRIM
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 6, 0, 4, 8192, 512, &[]).await; // WRITE_ZEROES
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 3, 0, 5, 0, 0, &[]).await; // FLUSH
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 0, 0, 6, 4096, 8192, &[]).await;
    let back = reply(&mut s, 8192).await.2;
    assert!(back[..4608].iter().all(|b| *b == 0) && back[4608..].iter().all(|b| *b == 0xAB));
    // Errors the spec names, and the connection survives them.
    request(&mut s, 0, 0, 7, SIZE, 512, &[]).await;
    assert_eq!(reply(&mut s, 512).await.1, 22, "read past the end: EINVAL");
    request(&mut s, 1, 0, 8, SIZE - 256, 512, &[0; 512]).await;
    assert_eq!(reply(&mut s, 0).await.1, 28, "write past the end: ENOSPC");
    request(&mut s, 42, 0, 9, 0, 512, &[]).await;
    assert_eq!(reply(&mut s, 0).await.1, 22, "unknown command: EINVAL");
    // Many requests in flight come back, each with its own handle.
    for h in 100..164u64 {
        request(&mut s, 0, 0, h, h * 4096, 4096, &[]).await;
    }
    let mut seen: Vec<u64> = Vec::new();
    for _ in 100..164 {
        seen.push(reply(&mut s, 4096).await.0);
    }
    seen.sort();
    assert_eq!(seen, (100..164).collect::<Vec<_>>());
    request(&mut s, 2, 0, 10, 0, 0, &[]).await; // DISC
    assert_eq!(s.read(&mut [0u8; 1]).await.unwrap(), 0, "closed after DISC");

    let (mut ro, _, _) = connect(addr, "ro").await;
    request(&mut ro, 1, 0, 1, 0, 512, &[1; 512]).await;
    assert_eq!(
        reply(&mut ro, 0).await.1,
        1,
        "write to a read-only export: EPERM"
    );
}

fn tool(name: &str) -> bool {
    let found = std::process::Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required in CI (.ci/run installs qemu-utils)"
        );
        eprintln!("skipping: {name} not installed");
    }
    found
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tools_read_write_and_copy_through_braid() {
    if !tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let uri = format!("nbd://{addr}/disk0");
    let (uri2, dir2) = (uri.clone(), dir.path().to_path_buf());
    tokio::task::spawn_blocking(move || {
        let info = run("qemu-img", &["info", "--output=json", &uri2]);
        assert!(
            info.contains(&format!("\"virtual-size\": {SIZE}")),
            "{info}"
        );
        let io = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                &uri2,
                "-c",
                "write -P 0x5c 1M 256k",
                "-c",
                "read -P 0x5c 1M 256k",
                "-c",
                "flush",
                "-c",
                "discard 1M 64k",
                "-c",
                "read -P 0 1M 64k",
            ],
        );
        assert!(!io.contains("Pattern verification failed"), "{io}");
        // A whole image in and back out, byte for byte.
        let src = dir2.join("src.img");
        std::fs::write(
            &src,
            (0..SIZE).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>(),
        )
        .unwrap();
        run(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                src.to_str().unwrap(),
                &uri2,
            ],
        );
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                src.to_str().unwrap(),
                &uri2,
            ],
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn block_size_constraints_are_advertised_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    start_with(dir.path(), listener.into(), |mut c| {
        c.exports[0].block_min = 512;
        c.exports[0].block_max = 64 << 10;
        c
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    option(&mut s, 6, &go_data("disk0")).await;
    let mut block_size = None;
    loop {
        let (_, ty, d) = option_reply(&mut s).await;
        if ty == 1 {
            break;
        }
        if u16::from_be_bytes([d[0], d[1]]) == 3 {
            let at = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
            block_size = Some((at(2), at(6), at(10)));
        }
    }
    assert_eq!(block_size, Some((512, 4096, 64 << 10)));
    go(&mut s, "disk0").await;
    // Misaligned: EINVAL (SHOULD); over the maximum: EINVAL, and a write's
    // data is skipped so the connection stays in step.
    request(&mut s, 0, 0, 1, 100, 512, &[]).await;
    assert_eq!(reply(&mut s, 0).await.1, 22);
    request(&mut s, 0, 0, 2, 0, 128 << 10, &[]).await;
    assert_eq!(reply(&mut s, 0).await.1, 22);
    request(&mut s, 1, 0, 3, 0, 128 << 10, &vec![1; 128 << 10]).await;
    assert_eq!(reply(&mut s, 0).await.1, 22);
    // TRIM and WRITE_ZEROES may exceed the maximum block size.
    request(&mut s, 6, 0, 4, 0, 1 << 20, &[]).await;
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 0, 0, 5, 512, 512, &[]).await;
    assert_eq!(reply(&mut s, 512).await, (5, 0, vec![0; 512]));
}

/// EXPORT_NAME: the default (empty) name, the 124 zero bytes unless
/// NO_ZEROES, and an unknown client flag closing the connection.
#[tokio::test]
async fn export_name_and_client_flags() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    for (client_flags, zeroes) in [(1u32, 124usize), (3, 0)] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_u32(client_flags).await.unwrap();
        option(&mut s, 1, b"").await; // the default export
        assert_eq!(s.read_u64().await.unwrap(), SIZE, "disk0 is the default");
        let flags = s.read_u16().await.unwrap();
        assert_eq!(flags & 3, 1, "has flags, writable");
        let mut pad = vec![0u8; zeroes];
        s.read_exact(&mut pad).await.unwrap();
        assert!(pad.iter().all(|b| *b == 0));
        // The very next bytes are a reply to our first request.
        request(&mut s, 0, 0, 9, 0, 512, &[]).await;
        assert_eq!(reply(&mut s, 512).await.0, 9);
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    s.write_u32(1 << 7).await.unwrap();
    assert_eq!(
        s.read(&mut [0u8; 1]).await.unwrap_or(0),
        0,
        "unknown flag: closed"
    );
}

/// On shutdown the server stops taking requests, answers everything in
/// flight, then closes (the spec's SHOULD; braid serve does this on SIGTERM).
#[tokio::test]
async fn shutdown_answers_in_flight_requests_before_closing() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, exports) = exports(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(braid_frontend_nbd::serve(
        listener.into(),
        braid_frontend_nbd::NbdConfig::new(exports),
        std::sync::Arc::new(braid_frontend_nbd::BackendTarget::new(backend)),
        async {
            let _ = stopped.await;
        },
    ));
    let (mut s, _, _) = connect(addr, "disk0").await;
    for h in 0..32u64 {
        request(&mut s, 1, 1, h, h * 65536, 65536, &vec![h as u8; 65536]).await;
    }
    // Let the server read them all before asking it to stop.
    request(&mut s, 3, 0, 99, 0, 0, &[]).await;
    let mut seen = 0;
    let mut flushed = false;
    while !flushed {
        let (h, e, _) = reply(&mut s, 0).await;
        assert_eq!(e, 0);
        flushed = h == 99;
        seen += 1;
    }
    for h in 100..108u64 {
        request(&mut s, 1, 1, h, h * 65536, 65536, &vec![1; 65536]).await;
    }
    tokio::task::yield_now().await;
    stop.send(()).unwrap();
    // Whatever the server took in is answered; then the connection closes.
    loop {
        let mut magic = [0u8; 4];
        match s.read_exact(&mut magic).await {
            Ok(_) => {
                let mut rest = [0u8; 12];
                s.read_exact(&mut rest).await.unwrap();
                assert_eq!(&rest[..4], &[0, 0, 0, 0], "no error");
                seen += 1;
            }
            Err(_) => break,
        }
    }
    assert!(seen >= 33, "all requests before the flush were answered");
    server.await.unwrap().unwrap();
}

/// A target that holds every completion until told to let go, and notes
/// whether more requests were ever outstanding than the budget allows.
#[derive(Default)]
struct Holding {
    held: std::sync::Mutex<Vec<braid_frontend_nbd::Completion>>,
    submitted: std::sync::atomic::AtomicUsize,
    released: std::sync::atomic::AtomicBool,
    most_outstanding: std::sync::atomic::AtomicUsize,
}

impl braid_frontend_nbd::Target for Holding {
    fn submit(
        &self,
        _export: usize,
        _op: braid_core::server::BackendOp,
        done: braid_frontend_nbd::Completion,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        self.submitted.fetch_add(1, SeqCst);
        if self.released.load(SeqCst) {
            return done(Ok(bytes::Bytes::from(vec![0u8; 4096])));
        }
        let mut held = self.held.lock().unwrap();
        held.push(done);
        self.most_outstanding.fetch_max(held.len(), SeqCst);
    }

    fn allocation(
        &self,
        _export: usize,
        _offset: u64,
        len: u64,
        done: braid_frontend_nbd::ExtentsCompletion,
    ) {
        done(Ok(vec![braid_core::server::Extent { len, hole: false }]))
    }

    fn fast_zero(&self) -> bool {
        false
    }
}

/// A client that pipelines far more than it lets the server answer cannot
/// make the server take them all in: reading stops at the per-connection
/// budget (4096 small requests) until replies go out.
#[tokio::test]
async fn a_flooding_client_is_held_to_the_in_flight_budget() {
    use std::sync::atomic::Ordering::SeqCst;
    let target = std::sync::Arc::new(Holding::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = braid_frontend_nbd::NbdConfig::new(vec![braid_frontend_nbd::NbdExport::new(
        "disk0", SIZE, 0,
    )]);
    tokio::spawn(braid_frontend_nbd::serve(
        listener.into(),
        config,
        target.clone(),
        std::future::pending(),
    ));
    let (s, _, _) = connect(addr, "disk0").await;
    let (mut rd, mut wr) = s.into_split();
    const N: u64 = 5000;
    let flood = tokio::spawn(async move {
        for h in 0..N {
            request(&mut wr, 0, 0, h, (h % 4096) * 4096, 4096, &[]).await;
        }
        wr
    });
    // The server takes requests in until its budget is spent...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while target.submitted.load(SeqCst) < 4096 {
        assert!(
            std::time::Instant::now() < deadline,
            "requests never arrived"
        );
        tokio::task::yield_now().await;
    }
    // ...then answers everything once the target lets go.
    target.released.store(true, SeqCst);
    let held: Vec<_> = std::mem::take(&mut *target.held.lock().unwrap());
    for done in held {
        done(Ok(bytes::Bytes::from(vec![0u8; 4096])));
    }
    for _ in 0..N {
        assert_eq!(reply(&mut rd, 4096).await.1, 0);
    }
    let _wr = flood.await.unwrap();
    assert_eq!(target.submitted.load(SeqCst), N as usize);
    assert!(
        target.most_outstanding.load(SeqCst) <= 4096,
        "{} requests were taken in at once",
        target.most_outstanding.load(SeqCst)
    );
}

/// Staging that lends heap buffers of at most `largest` bytes, remembering
/// where each one lies so the target can tell staged data from the heap's.
struct Lender {
    largest: usize,
    lent: Arc<std::sync::Mutex<std::collections::HashSet<usize>>>,
}

struct Loan {
    data: Vec<u8>,
    lent: Arc<std::sync::Mutex<std::collections::HashSet<usize>>>,
}

impl AsRef<[u8]> for Loan {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        self.lent
            .lock()
            .unwrap()
            .remove(&(self.data.as_ptr() as usize));
    }
}

impl braid_core::staging::StagedBuffer for Loan {
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    fn into_bytes(self: Box<Self>) -> bytes::Bytes {
        bytes::Bytes::from_owner(*self)
    }
}

impl braid_core::staging::Staging for Lender {
    fn buffer(&self, len: usize) -> Option<Box<dyn braid_core::staging::StagedBuffer>> {
        if len > self.largest {
            return None;
        }
        let data = vec![0u8; len];
        self.lent.lock().unwrap().insert(data.as_ptr() as usize);
        Some(Box::new(Loan {
            data,
            lent: self.lent.clone(),
        }))
    }
}

/// A file-backed target that offers staging and counts the WRITEs whose
/// data arrived in it.
struct Staged {
    inner: braid_frontend_nbd::BackendTarget,
    staging: Arc<Lender>,
    writes_staged: std::sync::atomic::AtomicUsize,
    writes_heap: std::sync::atomic::AtomicUsize,
}

impl braid_frontend_nbd::Target for Staged {
    fn submit(
        &self,
        export: usize,
        op: braid_core::server::BackendOp,
        done: braid_frontend_nbd::Completion,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        if let braid_core::server::BackendOp::Write { data, .. } = &op {
            let staged = self
                .staging
                .lent
                .lock()
                .unwrap()
                .contains(&(data.as_ptr() as usize));
            let count = if staged {
                &self.writes_staged
            } else {
                &self.writes_heap
            };
            count.fetch_add(1, SeqCst);
        }
        self.inner.submit(export, op, done)
    }

    fn allocation(
        &self,
        export: usize,
        offset: u64,
        len: u64,
        done: braid_frontend_nbd::ExtentsCompletion,
    ) {
        self.inner.allocation(export, offset, len, done)
    }

    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }

    fn write_staging(&self) -> Option<Arc<dyn braid_core::staging::Staging>> {
        Some(self.staging.clone())
    }
}

/// WRITE data is received straight into the buffers the target stages
/// (RDMA's registered memory, for `braid attach`), or onto the heap when
/// staging has none that big; both land intact, and every staged buffer
/// comes back.
#[tokio::test]
async fn write_data_is_received_into_the_targets_staging() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let (backend, exports) = exports(dir.path());
    let target = Arc::new(Staged {
        inner: braid_frontend_nbd::BackendTarget::new(backend),
        staging: Arc::new(Lender {
            largest: 16384,
            lent: Default::default(),
        }),
        writes_staged: Default::default(),
        writes_heap: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(braid_frontend_nbd::serve(
        listener.into(),
        braid_frontend_nbd::NbdConfig::new(exports),
        target.clone(),
        std::future::pending(),
    ));
    let (mut s, _, _) = connect(addr, "disk0").await;
    let block = |h: u64, len: usize| -> Vec<u8> {
        (0..len).map(|i| (i as u64 * 31 + h * 7) as u8).collect()
    };
    let sizes = [4096usize, 16384, 65536, 512, 8192];
    let mut at = 0u64;
    for (h, &len) in sizes.iter().enumerate() {
        request(
            &mut s,
            1,
            0,
            h as u64,
            at,
            len as u32,
            &block(h as u64, len),
        )
        .await;
        at += len as u64;
    }
    for _ in sizes {
        assert_eq!(reply(&mut s, 0).await.1, 0);
    }
    assert_eq!(
        (
            target.writes_staged.load(SeqCst),
            target.writes_heap.load(SeqCst)
        ),
        (4, 1),
        "the 64 KiB write is bigger than any staged buffer"
    );
    let mut at = 0u64;
    for (h, &len) in sizes.iter().enumerate() {
        request(&mut s, 0, 0, 100 + h as u64, at, len as u32, &[]).await;
        let (_, error, data) = reply(&mut s, len).await;
        assert_eq!(error, 0);
        assert!(data == block(h as u64, len), "write {h} read back wrong");
        at += len as u64;
    }
    // A WRITE is answered from inside its completion, and its buffer goes
    // back when the thread that ran it drops the operation just after: so
    // wait for that, boundedly.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !target.staging.lent.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "every buffer came back: {} still lent",
            target.staging.lent.lock().unwrap().len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// WRITE payloads are read partly from the connection's buffer and partly
/// straight from the socket, and after a large WRITE the next header is
/// read on its own: whichever way each request arrives (pipelined in one
/// burst, a header alone with its payload in pieces, or a header with part
/// of its payload and the rest after a pause), every byte lands where it
/// was sent.
#[tokio::test]
async fn writes_of_every_size_land_whole_however_they_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path()).await;
    let (s, _, _) = connect(addr, "disk0").await;
    let (mut rd, mut wr) = s.into_split();
    let fill = |seed: u64, len: usize| -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11 ^ seed) as u8)
            .collect()
    };
    let mut image = vec![0u8; 8 << 20];
    // A small WRITE's header brings the next ones into the buffer: the
    // 64 KiB payload after it is read from there, and so is the header
    // after that.
    let sizes = [
        1 << 20,
        4096,
        64 << 10,
        4096,
        (256 << 10) + 512,
        64 << 10,
        512,
        2 << 20,
        4096,
        128 << 10,
    ];
    let mut burst = Vec::new();
    let mut at = 0usize;
    for (h, &len) in sizes.iter().enumerate() {
        let data = fill(h as u64, len);
        image[at..at + len].copy_from_slice(&data);
        request(&mut burst, 1, 0, h as u64, at as u64, len as u32, &data).await;
        at += len;
    }
    // One burst, written while the replies are read (it is larger than
    // the socket buffers).
    let sending = tokio::spawn(async move {
        wr.write_all(&burst).await.unwrap();
        wr
    });
    for _ in sizes {
        assert_eq!(reply(&mut rd, 0).await.1, 0);
    }
    let mut wr = sending.await.unwrap();
    // Each of these follows an answered large WRITE, so the server's
    // buffer is empty: a header alone, then its payload in two pieces.
    for (h, len) in [(20u64, 192 << 10), (21, 4096), (22, 1 << 20)] {
        let data = fill(h, len);
        image[at..at + len].copy_from_slice(&data);
        request(&mut wr, 1, 0, h, at as u64, len as u32, &[]).await;
        tokio::task::yield_now().await;
        wr.write_all(&data[..len / 3]).await.unwrap();
        tokio::task::yield_now().await;
        wr.write_all(&data[len / 3..]).await.unwrap();
        assert_eq!(reply(&mut rd, 0).await, (h, 0, vec![]));
        at += len;
    }
    // A header with the start of its payload, then the rest after a pause:
    // the server holds part of the payload when it starts waiting for the
    // rest, and must be woken for what is left, however much that is.
    for (h, len, first) in [(23u64, 1 << 20, 300 << 10), (24, 512 << 10, 200 << 10)] {
        let data = fill(h, len);
        image[at..at + len].copy_from_slice(&data);
        request(&mut wr, 1, 0, h, at as u64, len as u32, &data[..first]).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        wr.write_all(&data[first..]).await.unwrap();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), reply(&mut rd, 0))
            .await
            .expect("the WRITE is answered once its last bytes arrive");
        assert_eq!(answered, (h, 0, vec![]));
        at += len;
    }
    let mut read_at = 0usize;
    while read_at < at {
        let len = (at - read_at).min(1 << 20);
        request(&mut wr, 0, 0, 99, read_at as u64, len as u32, &[]).await;
        let (_, error, data) = reply(&mut rd, len).await;
        assert_eq!(error, 0);
        assert!(
            data == image[read_at..read_at + len],
            "bytes at {read_at}..{} read back wrong",
            read_at + len
        );
        read_at += len;
    }
}
