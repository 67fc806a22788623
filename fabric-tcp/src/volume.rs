//! The volume driver: one [`VolumeEngine`] in one task, over a [`Client`]
//! per leg (each with its own channels, failover and replay). Leg IO runs
//! as tasks on the legs' clients; a leg whose channels stay down past
//! `leg_timeout` is reported failed, and reported back when it returns.
//! Dirty logs are made stable through a [`LogStore`] before the writes
//! they cover go out.

use crate::client::Client;
use crate::clock::Clock;
use braid_core::client::{IoErrorKind, IoRequest};
use braid_core::volume::{
    DirtyRegions, LegState, VolumeAction, VolumeConfig, VolumeEngine, VolumeMap,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Where dirty logs live between runs (a file per leg for `braid attach`).
pub trait LogStore: Send + Sync + 'static {
    /// The stored log of leg `name`, if any.
    fn load(&self, name: &str) -> Option<Vec<u8>>;
    /// Stores every leg's log durably (returns once on stable storage).
    fn store(&self, logs: &[(String, Vec<u8>)]) -> std::io::Result<()>;
}

/// A snapshot for status output.
#[derive(Debug, Clone, Default)]
pub struct VolumeStatus {
    /// Per leg: name, state, regions marked dirty, regions in all.
    pub legs: Vec<(String, Option<LegState>, usize, u64)>,
    /// What the engine did.
    pub stats: braid_core::volume::VolumeStats,
}

enum Cmd {
    Io(IoRequest, oneshot::Sender<Result<Bytes, IoErrorKind>>),
    Suspend(usize, oneshot::Sender<Result<(), String>>),
    Resume(usize),
}

enum Event {
    LegDone(u64, Result<Bytes, IoErrorKind>),
    Stored(u64, Result<(), String>),
}

/// A volume over several legs: cheap to clone.
#[derive(Clone)]
pub struct Volume {
    cmds: mpsc::Sender<Cmd>,
    size: u64,
    block_size: u32,
    names: Arc<Vec<String>>,
    status: Arc<Mutex<VolumeStatus>>,
}

impl Volume {
    /// Starts the driver over `legs` (name → connected client, in any
    /// order), with logs from `store`.
    pub fn start(
        map: VolumeMap,
        mut legs: HashMap<String, Client>,
        config: VolumeConfig,
        store: Arc<dyn LogStore>,
        leg_timeout: Duration,
    ) -> Result<Volume, String> {
        let names: Vec<String> = map.leaves().to_vec();
        let clients: Vec<Client> = names
            .iter()
            .map(|n| {
                legs.remove(n)
                    .ok_or_else(|| format!("no client for leg {n:?}"))
            })
            .collect::<Result<_, _>>()?;
        let mut logs = Vec::new();
        let mut any = false;
        for n in &names {
            match store.load(n).map(|b| DirtyRegions::decode(&b)) {
                Some(Ok(log))
                    if log.region_size() == config.region
                        && log.regions() == map.size().div_ceil(config.region) =>
                {
                    any = true;
                    logs.push(log);
                }
                Some(Ok(_)) | Some(Err(_)) => {
                    // A torn or foreign log: trust nothing, copy everything.
                    tracing::warn!(leg = n, "dirty log unreadable: the leg is copied in full");
                    let mut log = DirtyRegions::new(map.size(), config.region)?;
                    log.mark(0, map.size());
                    any = true;
                    logs.push(log);
                }
                None => logs.push(DirtyRegions::new(map.size(), config.region)?),
            }
        }
        let (size, block_size) = (map.size(), map.block_size());
        let engine = VolumeEngine::new(map, config, any.then_some(logs))?;
        let (tx, rx) = mpsc::channel(1024);
        let status = Arc::new(Mutex::new(VolumeStatus::default()));
        let driver = Driver {
            engine,
            clients,
            queues: Vec::new(),
            names: names.clone(),
            store,
            waiters: HashMap::new(),
            next_user: 1,
            status: status.clone(),
            leg_timeout,
            down_since: vec![None; names.len()],
            reported_down: vec![false; names.len()],
            retry_at: vec![None; names.len()],
        };
        tokio::spawn(driver.run(rx));
        Ok(Volume {
            cmds: tx,
            size,
            block_size,
            names: Arc::new(names),
            status,
        })
    }

    /// Bytes the volume holds.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// One IO, at most the engine's `max_leg_io` bytes.
    pub async fn io(&self, io: IoRequest) -> Result<Bytes, IoErrorKind> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Io(io, tx))
            .await
            .map_err(|_| IoErrorKind::Closed)?;
        rx.await.unwrap_or(Err(IoErrorKind::Closed))
    }

    fn leg(&self, name: &str) -> Result<usize, String> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("no leg {name:?} (legs: {})", self.names.join(", ")))
    }

    /// Takes leg `name` out of service (IO goes to the other legs).
    pub async fn suspend(&self, name: &str) -> Result<(), String> {
        let leg = self.leg(name)?;
        let (tx, rx) = oneshot::channel();
        let _ = self.cmds.send(Cmd::Suspend(leg, tx)).await;
        rx.await.map_err(|_| "the volume is closing".to_string())?
    }

    /// Returns a suspended leg to service (it resyncs what it missed).
    pub async fn resume(&self, name: &str) -> Result<(), String> {
        let leg = self.leg(name)?;
        self.cmds
            .send(Cmd::Resume(leg))
            .await
            .map_err(|_| "the volume is closing".to_string())
    }

    /// A fresh snapshot.
    pub fn status(&self) -> VolumeStatus {
        self.status.lock().unwrap().clone()
    }
}

struct Driver {
    engine: VolumeEngine,
    clients: Vec<Client>,
    /// Per leg: IO to hand to its client, in order.
    queues: Vec<mpsc::UnboundedSender<(u64, IoRequest)>>,
    names: Vec<String>,
    store: Arc<dyn LogStore>,
    waiters: HashMap<u64, oneshot::Sender<Result<Bytes, IoErrorKind>>>,
    next_user: u64,
    status: Arc<Mutex<VolumeStatus>>,
    leg_timeout: Duration,
    down_since: Vec<Option<tokio::time::Instant>>,
    reported_down: Vec<bool>,
    /// Legs left behind for their errors (a full disk, media errors)
    /// while still reachable: when to try them again, and the backoff.
    retry_at: Vec<Option<(tokio::time::Instant, Duration)>>,
}

/// The first wait before a leg that failed IO while reachable is tried
/// again; doubled on each failure up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl Driver {
    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        let (tx, mut events) = mpsc::unbounded_channel::<Event>();
        for client in &self.clients {
            let (queue, mut pending) = mpsc::unbounded_channel::<(u64, IoRequest)>();
            let (client, tx) = (client.clone(), tx.clone());
            tokio::spawn(async move {
                while let Some((token, io)) = pending.recv().await {
                    let answer = client.enqueue(io).await;
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let result = answer.await.map_err(|e| e.kind);
                        let _ = tx.send(Event::LegDone(token, result));
                    });
                }
            });
            self.queues.push(queue);
        }
        let clock = Clock::new();
        let mut health = tokio::time::interval(Duration::from_millis(100));
        loop {
            self.drain(&tx);
            let deadline = clock.deadline(self.engine.poll_timeout());
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline) => self.engine.handle_timeout(clock.now()),
                Some(ev) = events.recv() => match ev {
                    Event::LegDone(token, result) => self.engine.leg_complete(token, result, clock.now()),
                    Event::Stored(generation, result) => match result {
                        Ok(()) => self.engine.logs_stable(generation, clock.now()),
                        // Writes wait rather than go out unrecorded.
                        Err(e) => tracing::error!(error = %e, "dirty log not stored; writes wait"),
                    },
                },
                _ = health.tick() => self.check_legs(clock.now()),
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Io(io, reply)) => {
                        let user = self.next_user;
                        self.next_user += 1;
                        self.waiters.insert(user, reply);
                        self.engine.submit(user, io, clock.now());
                    }
                    Some(Cmd::Suspend(leg, reply)) => {
                        let _ = reply.send(self.engine.suspend(leg));
                    }
                    Some(Cmd::Resume(leg)) => self.engine.resume(leg, clock.now()),
                    None => return,
                },
            }
        }
    }

    /// A leg whose channels are all down past `leg_timeout` is failed;
    /// one that has channels again is back.
    fn check_legs(&mut self, now: braid_core::Instant) {
        for leg in 0..self.clients.len() {
            let up = self.clients[leg].status().channels.iter().any(|c| c.1);
            if up {
                self.down_since[leg] = None;
                if self.reported_down[leg] {
                    self.reported_down[leg] = false;
                    self.retry_at[leg] = None;
                    tracing::info!(leg = self.names[leg], "leg reachable again: resyncing");
                    self.engine.leg_returned(leg, now);
                } else {
                    self.retry_errored(leg, now);
                }
            } else {
                let since = *self.down_since[leg].get_or_insert_with(tokio::time::Instant::now);
                if !self.reported_down[leg] && since.elapsed() >= self.leg_timeout {
                    self.reported_down[leg] = true;
                    tracing::warn!(
                        leg = self.names[leg],
                        "leg unreachable: IO goes on without it"
                    );
                    self.engine.leg_failed(leg);
                }
            }
        }
    }

    /// A reachable leg the engine left behind for its errors (its disk
    /// was full, or failed writes) is tried again with backoff: the resync
    /// copies what it missed, and if it still fails it is left again.
    fn retry_errored(&mut self, leg: usize, now: braid_core::Instant) {
        if self.engine.leg_state(leg) != LegState::Away {
            if self.engine.leg_state(leg) == LegState::InSync {
                self.retry_at[leg] = None;
            }
            return;
        }
        let clock = tokio::time::Instant::now();
        match self.retry_at[leg] {
            None => self.retry_at[leg] = Some((clock + RETRY_MIN, RETRY_MIN)),
            Some((at, wait)) if clock >= at => {
                let next = (wait * 2).min(RETRY_MAX);
                self.retry_at[leg] = Some((clock + next, next));
                tracing::info!(
                    leg = self.names[leg],
                    "leg left behind for errors: trying it again"
                );
                self.engine.leg_returned(leg, now);
            }
            Some(_) => {}
        }
    }

    fn drain(&mut self, tx: &mpsc::UnboundedSender<Event>) {
        while let Some(a) = self.engine.poll_action() {
            match a {
                VolumeAction::LegIo { leg, token, io } => {
                    // Through the leg's queue, in the engine's order: a
                    // task per IO would let two overlapping writes reach
                    // the leg in either order, and legs would diverge.
                    let _ = self.queues[leg].send((token, io));
                }
                VolumeAction::PersistLogs { generation } => {
                    let logs: Vec<(String, Vec<u8>)> = (0..self.names.len())
                        .map(|l| (self.names[l].clone(), self.engine.log(l).encode()))
                        .collect();
                    let (store, tx) = (self.store.clone(), tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let result = store.store(&logs).map_err(|e| e.to_string());
                        let _ = tx.send(Event::Stored(generation, result));
                    });
                }
                VolumeAction::Complete { user, result } => {
                    if let Some(w) = self.waiters.remove(&user) {
                        let _ = w.send(result);
                    }
                }
                VolumeAction::LegChanged { leg, state } => {
                    tracing::info!(leg = self.names[leg], ?state, "leg state");
                }
            }
        }
        let mut s = self.status.lock().unwrap();
        s.stats = self.engine.stats();
        s.legs = (0..self.names.len())
            .map(|l| {
                let log = self.engine.log(l);
                (
                    self.names[l].clone(),
                    Some(self.engine.leg_state(l)),
                    log.dirty_count(),
                    log.regions(),
                )
            })
            .collect();
    }
}
