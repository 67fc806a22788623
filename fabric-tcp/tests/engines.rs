//! A server of several engines over real loopback sockets: clients on
//! every engine, and an engine that dies taking the server down with it
//! rather than leaving its clients routed to nothing.

use braid_core::auth::Key;
use braid_core::client::{ClientConfig, IoRequest};
use braid_core::server::{Backend, BackendOp, ExportConfig, ServerConfig, ServerEngine};
use braid_core::wire::Status;
use braid_fabric_tcp::{Client, ClientSecurity, Server, ServerSecurity};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const SIZE: u64 = 16 << 20;

/// Blocks in memory; a write of `trip` bytes panics on the engine's own
/// task (the inline path), as a bug in an engine would.
struct Tripwire {
    blocks: Mutex<HashMap<u64, Bytes>>,
    trip: Option<usize>,
}

impl Backend for Tripwire {
    fn execute(&self, _export: usize, op: &BackendOp) -> Result<Bytes, Status> {
        let mut blocks = self.blocks.lock().unwrap();
        match op {
            BackendOp::Write { offset, data, .. } => {
                blocks.insert(*offset, data.clone());
                Ok(Bytes::new())
            }
            BackendOp::Read { offset, len } => Ok(blocks
                .get(offset)
                .filter(|d| d.len() == *len as usize)
                .cloned()
                .unwrap_or_else(|| Bytes::from(vec![0; *len as usize]))),
            _ => Ok(Bytes::new()),
        }
    }

    fn try_execute_now(&self, export: usize, op: &BackendOp) -> Option<Result<Bytes, Status>> {
        if let (BackendOp::Write { data, .. }, Some(trip)) = (op, self.trip) {
            assert_ne!(data.len(), trip, "the tripwire");
        }
        Some(self.execute(export, op))
    }
}

/// Serves disk0 of `backend` with `engines` engines; its address, a
/// trigger that stops it and its task's outcome.
async fn serve(
    engines: usize,
    backend: Arc<dyn Backend>,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    serve_with(engines, backend, |_| {}).await
}

/// [`serve`] with the configuration changed by `tweak`.
async fn serve_with(
    engines: usize,
    backend: Arc<dyn Backend>,
    tweak: impl FnOnce(&mut ServerConfig),
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let mut config = ServerConfig::new(
        5,
        [5; 32],
        vec![("test".into(), Key::new(*b"test key"))],
        vec![ExportConfig::new("disk0", SIZE)],
    );
    tweak(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let engines = ServerEngine::several(&config, engines).unwrap();
    let task = tokio::spawn(Server::run_engines(
        listener,
        ServerSecurity::Plain,
        engines,
        None,
        backend,
        async {
            let _ = stopped.await;
        },
        |_| {},
    ));
    (addr, stop, task)
}

/// Stops the server [`serve`] started; it must drain and stop cleanly.
async fn stop_cleanly(
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the server drains and stops")
        .unwrap()
        .expect("a clean stop");
}

async fn client(addr: SocketAddr, seed: u8) -> Client {
    let config = ClientConfig::new("disk0", "test", Key::new(b"test key".to_vec()), [seed; 32]);
    Client::connect(
        addr.to_string(),
        ClientSecurity::Plain,
        config,
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_every_engine_read_back_what_they_wrote() {
    let backend = Arc::new(Tripwire {
        blocks: Mutex::default(),
        trip: None,
    });
    let (addr, stop, task) = serve(3, backend).await;
    let mut clients = Vec::new();
    for seed in 0..6u8 {
        clients.push(client(addr, seed).await);
    }
    for (i, c) in clients.iter().enumerate() {
        let data = Bytes::from(vec![i as u8 + 1; 4096]);
        c.io(IoRequest::write(i as u64 * 4096, data, false))
            .await
            .unwrap();
    }
    for (i, c) in clients.iter().enumerate() {
        let got = c.io(IoRequest::read(i as u64 * 4096, 4096)).await.unwrap();
        assert_eq!(got, Bytes::from(vec![i as u8 + 1; 4096]), "client {i}");
    }
    drop(clients);
    stop_cleanly(stop, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_dies_stops_the_server() {
    let backend = Arc::new(Tripwire {
        blocks: Mutex::default(),
        trip: Some(512),
    });
    let (addr, _stop, task) = serve(2, backend).await;
    let c = client(addr, 1).await;
    // The engine panics handling it; the write is never answered.
    let write = c.io(IoRequest::write(0, Bytes::from(vec![7; 512]), false));
    let _ = tokio::time::timeout(Duration::from_millis(500), write).await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the server stopped rather than serve on without an engine")
        .unwrap();
    assert!(
        outcome.is_err(),
        "the dead engine's panic is the server's error"
    );
}

/// Waits for the server to close `conn`: true if it did within `limit`.
async fn closed_within(conn: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let drained = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, drained).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_hello_are_closed_and_the_rest_served() {
    let backend = Arc::new(Tripwire {
        blocks: Mutex::default(),
        trip: None,
    });
    let (addr, stop, task) = serve_with(2, backend, |c| {
        c.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    // Silent; half a frame prefix, then silent; bytes that are no frame.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial.write_all(&[0x42; 5]).await.unwrap();
    let mut garbage = tokio::net::TcpStream::connect(addr).await.unwrap();
    garbage.write_all(&[0xff; 200]).await.unwrap();
    let c = client(addr, 9).await;
    let data = Bytes::from(vec![9; 4096]);
    c.io(IoRequest::write(0, data.clone(), false))
        .await
        .unwrap();
    assert_eq!(c.io(IoRequest::read(0, 4096)).await.unwrap(), data);
    for (what, conn) in [
        ("silent", &mut silent),
        ("half a prefix", &mut partial),
        ("garbage", &mut garbage),
    ] {
        assert!(
            closed_within(conn, Duration::from_secs(10)).await,
            "a {what} connection is closed"
        );
    }
    // The client's session is untouched by them.
    assert_eq!(c.io(IoRequest::read(0, 4096)).await.unwrap(), data);
    drop(c);
    stop_cleanly(stop, task).await;
}
