//! The volume driver over real loopback sockets and real files.

use braid_backend_file::{ExportFile, FileBackend, OpenOptions};
use braid_core::auth::Key;
use braid_core::client::{ClientConfig, IoRequest};
use braid_core::server::{ExportConfig, ServerConfig, ServerEngine};
use braid_core::volume::{DirtyRegions, LegInfo, LegState, VolumeConfig, VolumeMap, VolumeSpec};
use braid_fabric_tcp::{Client, ClientSecurity, LogStore, Server, ServerSecurity, Volume};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

const SIZE: u64 = 4 << 20;

/// Logs and identity in memory.
#[derive(Default)]
struct MemLogs(Mutex<HashMap<String, Vec<u8>>>);

impl LogStore for MemLogs {
    fn load(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.0.lock().unwrap().get(name).cloned())
    }

    fn store(&self, logs: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        self.0.lock().unwrap().extend(logs.iter().cloned());
        Ok(())
    }

    fn load_identity(&self) -> std::io::Result<Option<Vec<u8>>> {
        self.load("\0identity")
    }

    fn store_identity(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.store(&[("\0identity".into(), bytes.to_vec())])
    }
}

/// `MemLogs` whose next stores fail after writing only the first leg's
/// log, as a data dir whose disk fails mid-store would.
#[derive(Default)]
struct FailingLogs {
    logs: MemLogs,
    fail_next: AtomicUsize,
    tries: AtomicUsize,
}

impl LogStore for FailingLogs {
    fn load(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        self.logs.load(name)
    }

    fn store(&self, logs: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        self.tries.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            self.logs.store(&logs[..1])?;
            return Err(std::io::Error::other("injected: the disk failed mid-store"));
        }
        self.logs.store(logs)
    }

    fn load_identity(&self) -> std::io::Result<Option<Vec<u8>>> {
        self.logs.load_identity()
    }

    fn store_identity(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.logs.store_identity(bytes)
    }
}

/// Clients of export disk0 at each of `addrs`, by leg name ("a", "b").
async fn connect(addrs: &[std::net::SocketAddr], run: u8) -> HashMap<String, Client> {
    let mut legs = HashMap::new();
    for (i, addr) in addrs.iter().enumerate() {
        let config =
            ClientConfig::new("disk0", "test", Key::new(*b"test key"), [run + i as u8; 32]);
        let client = Client::connect(
            addr.to_string(),
            ClientSecurity::Plain,
            config,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        legs.insert(["a", "b"][i].to_string(), client);
    }
    legs
}

fn mirror_of_a_and_b() -> VolumeMap {
    map_of_a_and_b(&[&[0, 1]])
}

/// Legs a and b (indices 0 and 1) grouped as `groups`: one group is a
/// mirror, one leg per group a linear volume.
fn map_of_a_and_b(groups: &[&[usize]]) -> VolumeMap {
    let spec = VolumeSpec::grouped(groups, None, None, |i| ["a", "b"][i].to_string());
    VolumeMap::new(&spec, |_| {
        Some(LegInfo {
            size: SIZE,
            block_size: 512,
            read_only: false,
        })
    })
    .unwrap()
}

/// A log store that fails holds the writes it covers (none goes out
/// unrecorded) until the store is tried again and works. And the next run,
/// finding b's log gone while a's is there, copies b in full from a rather
/// than trusting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_store_holds_writes_and_a_lost_log_is_copied_to() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = [serve(dir.path(), 1).await, serve(dir.path(), 2).await];
    let config = VolumeConfig {
        region: 64 << 10,
        ..VolumeConfig::default()
    };
    let logs = Arc::new(FailingLogs::default());
    let volume = Volume::start(
        mirror_of_a_and_b(),
        connect(&addrs, 10).await,
        config.clone(),
        logs.clone(),
        Duration::from_secs(5),
    )
    .unwrap();
    volume.suspend("b").await.unwrap();
    let tries = logs.tries.load(Ordering::SeqCst);
    logs.fail_next.store(1, Ordering::SeqCst);
    let data = Bytes::from(vec![0x5a; 8192]);
    volume
        .io(IoRequest::write(1 << 20, data.clone(), false))
        .await
        .unwrap();
    assert!(
        logs.tries.load(Ordering::SeqCst) >= tries + 2,
        "answered only after the failed store was tried again"
    );
    assert_eq!(logs.fail_next.load(Ordering::SeqCst), 0);
    let b_log = logs
        .logs
        .load("b")
        .unwrap()
        .expect("stored once the store worked");
    assert!(DirtyRegions::decode(&b_log).unwrap().behind());
    volume.close().await;

    // b's log is lost: the next run must not take b for clean.
    logs.logs.0.lock().unwrap().remove("b");
    let volume = Volume::start(
        mirror_of_a_and_b(),
        connect(&addrs, 20).await,
        config,
        logs.clone(),
        Duration::from_secs(5),
    )
    .unwrap();
    every_leg_in_sync(&volume).await;
    assert_eq!(
        volume.status().stats.regions_resynced,
        SIZE / (64 << 10),
        "b in full"
    );
    volume.suspend("a").await.unwrap();
    assert_eq!(
        volume.io(IoRequest::read(1 << 20, 8192)).await.unwrap(),
        data,
        "b was copied from a"
    );
    volume.close().await;
}

/// Waits until every leg is in sync (10 s at most: a resync of these
/// few MiB that takes longer is stuck).
async fn every_leg_in_sync(volume: &Volume) {
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
    let addrs = [serve(dir.path(), 1).await, serve(dir.path(), 2).await];
    let legs = connect(&addrs, 0).await;
    let map = mirror_of_a_and_b();
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
    every_leg_in_sync(&volume).await;
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

/// A volume of plain exports never stores a dirty log, yet a run after
/// the first is a restart: what the dead run left in a leg's cache is
/// flushed before the new run serves it (read, then lost to a power cut,
/// it would go back in time). A first run sends no such FLUSH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_volume_of_plain_exports_flushes_each_leg_before_serving_it() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = [serve(dir.path(), 1).await, serve(dir.path(), 2).await];
    let logs = Arc::new(MemLogs::default());
    let map = map_of_a_and_b(&[&[0], &[1]]);
    // What each leg's client sent for a run that reads a block of each.
    let sent_for_a_read_of_each = |run: u8| {
        let (logs, map) = (logs.clone(), map.clone());
        async move {
            braid_fabric_tcp::next_run(&*logs, 7).unwrap();
            let legs = connect(&addrs, run).await;
            let clients: Vec<Client> = ["a", "b"].map(|n| legs[n].clone()).to_vec();
            let volume = Volume::start(
                map,
                legs,
                VolumeConfig::default(),
                logs,
                Duration::from_secs(5),
            )
            .unwrap();
            for at in [0, SIZE] {
                volume.io(IoRequest::read(at, 4096)).await.unwrap();
            }
            let sent: Vec<u64> = clients.iter().map(|c| c.status().stats.submitted).collect();
            volume.close().await;
            sent
        }
    };
    assert_eq!(
        sent_for_a_read_of_each(10).await,
        vec![1, 1],
        "a first run: the reads alone"
    );
    assert!(logs.load("a").unwrap().is_none(), "no dirty log was stored");
    assert_eq!(
        sent_for_a_read_of_each(20).await,
        vec![2, 2],
        "a restart: each leg's FLUSH, then its read"
    );
    logs.store_identity(b"torn").unwrap();
    assert_eq!(
        sent_for_a_read_of_each(30).await,
        vec![2, 2],
        "an unreadable identity still says runs came before"
    );
}

/// `MemLogs` that cannot read leg b's log, as a data dir with a bad
/// sector under it would not.
#[derive(Default)]
struct UnreadableLogOfB(MemLogs);

impl LogStore for UnreadableLogOfB {
    fn load(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        match name {
            "b" => Err(std::io::Error::other("injected: Input/output error")),
            _ => self.0.load(name),
        }
    }

    fn store(&self, logs: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        self.0.store(logs)
    }

    fn load_identity(&self) -> std::io::Result<Option<Vec<u8>>> {
        self.0.load_identity()
    }

    fn store_identity(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.store_identity(bytes)
    }
}

/// A log that is there but cannot be read is not "no log": read as none
/// (and a first run), a mirror would take legs that disagree for in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_read_stops_the_volume_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = [serve(dir.path(), 1).await, serve(dir.path(), 2).await];
    let legs = connect(&addrs, 10).await;
    let logs = Arc::new(UnreadableLogOfB::default());
    let err = Volume::start(
        mirror_of_a_and_b(),
        legs,
        VolumeConfig::default(),
        logs,
        Duration::from_secs(5),
    )
    .err()
    .expect("leg b's log could not be read");
    assert!(
        err.contains("dirty log of leg b") && err.contains("Input/output error"),
        "{err}"
    );
}
