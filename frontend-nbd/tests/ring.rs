//! The NBD face on a backend's io_uring.

mod common;

use braid_backend_file::{ExportFile, FileBackend, IoEngine, OpenOptions};
use braid_frontend_nbd::{serve, BackendTarget, NbdConfig, NbdExport, NbdListener};
use common::*;
use std::sync::Arc;

/// What would block a pool thread goes to the ring (here everything but
/// TRIM and zeroing: the export is O_DIRECT where the file system allows
/// it, else large writes and FLUSH), and every byte written reads back,
/// with many requests in flight at once.
#[tokio::test]
async fn requests_on_io_uring_read_back_what_was_written() {
    let dir = tempfile::tempdir_in(".").unwrap();
    let path = dir.path().join("disk0");
    let create = |direct| OpenOptions {
        create_size: Some(SIZE),
        direct,
        ..Default::default()
    };
    let file = ExportFile::open(&path, &create(true))
        .or_else(|_| ExportFile::open(&path, &create(false)))
        .unwrap();
    let backend = Arc::new(FileBackend::new(vec![file]).with_io_engine(IoEngine::Uring));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        NbdListener::Tcp(listener),
        NbdConfig::new(vec![NbdExport::new("disk0", SIZE, 0)]),
        Arc::new(BackendTarget::new(backend.clone()).with_io_queue()),
        std::future::pending(),
    ));
    let (mut s, _, _) = connect(addr, "disk0").await;

    let block = |i: u64, len: usize| -> Vec<u8> {
        (0..len).map(|b| (b as u64 * 5 + i * 11) as u8).collect()
    };
    // 1 MiB writes, then 4 KiB ones over their second halves, all sent
    // before any reply is read.
    let mut handle = 0;
    for i in 0..8u64 {
        handle += 1;
        request(&mut s, 1, 0, handle, i << 20, 1 << 20, &block(i, 1 << 20)).await;
    }
    for _ in 0..8 {
        assert_eq!(reply(&mut s, 0).await.1, 0, "1 MiB write");
    }
    for i in 0..8u64 {
        for k in 128..160u64 {
            handle += 1;
            let fua = if k % 8 == 0 { 1 } else { 0 };
            request(
                &mut s,
                1,
                fua,
                handle,
                (i << 20) + k * 4096,
                4096,
                &block(i + k, 4096),
            )
            .await;
        }
    }
    for _ in 0..8 * 32 {
        assert_eq!(reply(&mut s, 0).await.1, 0, "4 KiB write");
    }
    request(&mut s, 3, 0, 0, 0, 0, &[]).await; // FLUSH
    assert_eq!(reply(&mut s, 0).await.1, 0);
    request(&mut s, 6, 0, 0, 7 << 20, 8192, &[]).await; // WRITE_ZEROES: the pool
    assert_eq!(reply(&mut s, 0).await.1, 0);

    for i in 0..8u64 {
        request(&mut s, 0, 0, i, i << 20, 1 << 20, &[]).await;
        let (h, error, got) = reply(&mut s, 1 << 20).await;
        assert_eq!((h, error), (i, 0));
        let whole = block(i, 1 << 20);
        for k in 0..256u64 {
            let at = (k * 4096) as usize;
            let expect = if (128..160).contains(&k) {
                block(i + k, 4096)
            } else if i == 7 && k < 2 {
                vec![0; 4096]
            } else {
                whole[at..at + 4096].to_vec()
            };
            assert!(got[at..at + 4096] == expect[..], "block {k} of MiB {i}");
        }
    }
    let on_ring = backend.ops_on_io_uring();
    assert!(on_ring >= 9, "the ring ran {on_ring}");
}
