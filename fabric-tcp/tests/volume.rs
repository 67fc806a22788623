//! The volume driver over real loopback sockets and real files.

use braid_backend_file::{ExportFile, FileBackend, OpenOptions};
use braid_core::auth::Key;
use braid_core::client::{ClientConfig, IoRequest};
use braid_core::server::{ExportConfig, ServerConfig, ServerEngine};
use braid_core::volume::{LegInfo, LegState, VolumeConfig, VolumeMap, VolumeSpec};
use braid_fabric_tcp::{Client, ClientSecurity, LogStore, Server, ServerSecurity, Volume};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

const SIZE: u64 = 4 << 20;

/// Logs and identity in memory.
#[derive(Default)]
struct MemLogs(Mutex<HashMap<String, Vec<u8>>>);

impl LogStore for MemLogs {
    fn load(&self, name: &str) -> Option<Vec<u8>> {
        self.0.lock().unwrap().get(name).cloned()
    }

    fn store(&self, logs: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        self.0.lock().unwrap().extend(logs.iter().cloned());
        Ok(())
    }

    fn load_identity(&self) -> Option<Vec<u8>> {
        self.load("\0identity")
    }

    fn store_identity(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.store(&[("\0identity".into(), bytes.to_vec())])
    }
}

/// A server of export disk0 over a new file in `dir`; its address.
async fn serve(dir: &std::path::Path, boot_id: u64) -> std::net::SocketAddr {
    let file = ExportFile::open(
        dir.join(format!("leg{boot_id}")),
        &OpenOptions {
            create_size: Some(SIZE),
            ..Default::default()
        },
    )
    .unwrap();
    let config = ServerConfig::new(
        boot_id,
        [boot_id as u8; 32],
        vec![("test".into(), Key::new(*b"test key"))],
        vec![ExportConfig::new("disk0", SIZE)],
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Server::run(
        listener,
        ServerSecurity::Plain,
        ServerEngine::new(config).expect("a valid config"),
        Arc::new(FileBackend::new(vec![file])),
        std::future::pending(),
        |_| {},
    ));
    addr
}

/// A watcher hears each leg's state when it starts watching, then every
/// change in the order the engine made it: here leg b suspended, then
/// copied back after resuming, the write it missed meanwhile included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_hears_every_legs_state_then_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut legs = HashMap::new();
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let addr = serve(dir.path(), i as u64 + 1).await;
        let config = ClientConfig::new("disk0", "test", Key::new(*b"test key"), [i as u8; 32]);
        let client = Client::connect(
            addr.to_string(),
            ClientSecurity::Plain,
            config,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        legs.insert(name.to_string(), client);
    }
    let spec = VolumeSpec::grouped(&[&[0, 1]], None, None, |i| ["a", "b"][i].to_string());
    let map = VolumeMap::new(&spec, |_| {
        Some(LegInfo {
            size: SIZE,
            block_size: 512,
            read_only: false,
        })
    })
    .unwrap();
    let config = VolumeConfig {
        region: 64 << 10,
        ..VolumeConfig::default()
    };
    let logs = Arc::new(MemLogs::default());
    let volume = Volume::start(map, legs, config, logs, Duration::from_secs(5)).unwrap();
    let mut watch = volume.watch_legs();
    let mut next = || {
        let change = watch.try_recv().expect("a change was told");
        (change.leg, change.state)
    };
    assert_eq!(next(), ("a".into(), LegState::InSync));
    assert_eq!(next(), ("b".into(), LegState::InSync));

    volume.suspend("b").await.unwrap();
    let data = Bytes::from(vec![0x5a; 8192]);
    volume
        .io(IoRequest::write(1 << 20, data.clone(), false))
        .await
        .unwrap();
    volume.resume("b").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while volume
        .status()
        .legs
        .iter()
        .any(|l| l.1 != Some(LegState::InSync))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            volume.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen = Vec::new();
    while let Ok(change) = watch.try_recv() {
        assert_eq!(change.leg, "b", "only b changed: {change:?}");
        seen.push(change);
    }
    let states: Vec<LegState> = seen.iter().map(|c| c.state).collect();
    assert_eq!(states.first(), Some(&LegState::Suspended), "{states:?}");
    assert_eq!(states.last(), Some(&LegState::InSync), "{states:?}");
    assert!(
        states
            .iter()
            .any(|s| matches!(s, LegState::Resyncing { .. })),
        "b was copied back: {states:?}"
    );
    assert!(seen.windows(2).all(|w| w[0].at <= w[1].at), "in order");

    volume.suspend("a").await.unwrap();
    assert_eq!(
        volume.io(IoRequest::read(1 << 20, 8192)).await.unwrap(),
        data,
        "b holds the write it missed"
    );
    volume.close().await;
}
