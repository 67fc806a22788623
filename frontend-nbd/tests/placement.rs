//! Connections spread over runtimes: each runs on the one with the fewest
//! connections when it arrives, and stays there.

mod common;

use braid_core::server::BackendOp;
use braid_core::wire::Status;
use braid_frontend_nbd::{
    serve, BackendTarget, Completion, ExtentsCompletion, NbdConfig, NbdListener, Placement, Target,
};
use bytes::Bytes;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::Handle;

/// A target that notes the thread each operation arrives on.
struct ThreadNoting {
    inner: BackendTarget,
    threads: Mutex<Vec<String>>,
}

impl ThreadNoting {
    fn note(&self) {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        self.threads.lock().unwrap().push(name);
    }

    fn threads(&self) -> Vec<String> {
        let mut t = self.threads.lock().unwrap().clone();
        t.dedup();
        t
    }

    fn count(&self) -> usize {
        self.threads.lock().unwrap().len()
    }
}

impl Target for ThreadNoting {
    fn submit(&self, export: usize, op: BackendOp, done: Completion) {
        self.note();
        self.inner.submit(export, op, done)
    }

    fn allocation(&self, export: usize, offset: u64, len: u64, done: ExtentsCompletion) {
        self.inner.allocation(export, offset, len, done)
    }

    fn fast_zero(&self) -> bool {
        self.inner.fast_zero()
    }

    fn try_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        self.note();
        self.inner.try_now(export, op)
    }
}

/// A runtime on a thread of its own, named `name`, running until the
/// returned sender is dropped.
fn runtime_thread(name: &str) -> (Handle, tokio::sync::oneshot::Sender<()>) {
    let (ready, started) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                ready.send(Handle::current()).unwrap();
                let _ = stopped.await;
            });
        })
        .unwrap();
    (started.recv().unwrap(), stop)
}

/// Writes a block at `offset` and reads it back.
async fn write_and_read_back(s: &mut (impl AsyncRead + AsyncWrite + Unpin), offset: u64, seed: u8) {
    let data: Vec<u8> = (0..4096u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
    request(s, 1, 0, 1, offset, 4096, &data).await;
    assert_eq!(reply(s, 0).await.1, 0, "write at {offset}");
    request(s, 0, 0, 2, offset, 4096, &[]).await;
    let (handle, error, read) = reply(s, 4096).await;
    assert_eq!((handle, error), (2, 0), "read at {offset}");
    assert!(read == data, "read at {offset} returns what was written");
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

#[tokio::test]
async fn each_connection_runs_on_the_least_busy_runtime_and_stays_there() {
    let dir = tempfile::tempdir_in(".").unwrap();
    let (backend, exports) = exports(dir.path());
    let (first, _stop_first) = runtime_thread("place-0");
    let (second, _stop_second) = runtime_thread("place-1");
    let noting = || {
        Arc::new(ThreadNoting {
            inner: BackendTarget::new(backend.clone()),
            threads: Mutex::default(),
        })
    };
    let (on_first, on_second) = (noting(), noting());
    let placement = Placement::spread(vec![
        (first, on_first.clone() as Arc<dyn Target>),
        (second, on_second.clone() as Arc<dyn Target>),
    ]);
    // One placement behind two listeners, TCP and unix: they share the
    // count of connections on each runtime.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let unix_path = dir.path().join("nbd.sock");
    let unix = NbdListener::bind(unix_path.to_str().unwrap())
        .await
        .unwrap();
    for listener in [NbdListener::Tcp(tcp), unix] {
        let config = NbdConfig::new(exports.clone());
        tokio::spawn(serve(
            listener,
            config,
            placement.clone(),
            std::future::pending(),
        ));
    }

    let (mut over_tcp, _, _) = connect(tcp_addr, "disk0").await;
    write_and_read_back(&mut over_tcp, 0, 3).await;
    assert_eq!(placement.connections(), [1, 0]);
    let mut over_unix = tokio::net::UnixStream::connect(&unix_path).await.unwrap();
    greet(&mut over_unix).await;
    go(&mut over_unix, "disk0").await;
    write_and_read_back(&mut over_unix, 4096, 5).await;
    assert_eq!(placement.connections(), [1, 1]);
    assert_eq!(on_first.threads(), ["place-0"], "the first connection's IO");
    assert_eq!(
        on_second.threads(),
        ["place-1"],
        "the second connection's IO"
    );

    // The first leaves: the next connection takes its runtime.
    drop(over_tcp);
    until("the closed connection is no longer counted", || {
        placement.connections() == [0, 1]
    })
    .await;
    let before = on_first.count();
    let (mut again, _, _) = connect(tcp_addr, "disk0").await;
    write_and_read_back(&mut again, 8192, 7).await;
    write_and_read_back(&mut over_unix, 12288, 9).await;
    assert_eq!(placement.connections(), [1, 1]);
    assert!(
        on_first.count() > before,
        "the new connection runs on place-0"
    );
    assert_eq!(on_first.threads(), ["place-0"]);
    assert_eq!(on_second.threads(), ["place-1"]);
}
