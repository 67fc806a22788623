//! The volume driver: one [`VolumeEngine`] in one task, over a [`Client`]
//! per leg (each with its own channels, failover and replay). Leg IO goes
//! to the legs' clients in the engine's order; a leg whose channels stay
//! down past `leg_timeout` is reported failed, and reported back when it
//! returns.
//! Dirty logs are made stable through a [`LogStore`] before the writes
//! they cover go out.

use crate::client::Client;
use crate::clock::{Alarm, Clock};
use braid_core::client::{Identity, IoErrorKind, IoRequest};
use braid_core::volume::{
    logs_as_stored, LegState, VolumeAction, VolumeConfig, VolumeEngine, VolumeMap,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Where dirty logs live between runs (a file per leg for `braid attach`).
pub trait LogStore: Send + Sync + 'static {
    /// The stored log of leg `name`; `None` only if none was ever stored
    /// (a store that cannot tell errs: a volume would otherwise take its
    /// legs for new, and resync nothing).
    fn load(&self, name: &str) -> std::io::Result<Option<Vec<u8>>>;
    /// Stores every leg's log durably (returns once on stable storage).
    fn store(&self, logs: &[(String, Vec<u8>)]) -> std::io::Result<()>;
    /// The stored identity of the volume's last run; `None` only if none
    /// was ever stored.
    fn load_identity(&self) -> std::io::Result<Option<Vec<u8>>>;
    /// Stores this run's identity durably.
    fn store_identity(&self, bytes: &[u8]) -> std::io::Result<()>;
}

/// Claims the volume's next run: its legs' clients carry this identity,
/// so each leg's server ends the sessions of every earlier run (a killed
/// process's writes still in the network must not land after this run
/// resyncs). Stored before any leg connects. `fresh_owner` names the
/// volume's client if no earlier run was stored.
pub fn next_run(store: &dyn LogStore, fresh_owner: u64) -> std::io::Result<Identity> {
    let stored = store.load_identity()?;
    let run = Identity::next_run(stored.as_deref(), fresh_owner);
    if stored.is_some_and(|b| Identity::decode(&b).is_none()) {
        tracing::warn!(
            "the volume's stored identity is unreadable: earlier runs are not fenced, and every \
             leg is flushed before it serves"
        );
    }
    store.store_identity(&run.encode())?;
    Ok(run)
}

/// A snapshot for status output.
#[derive(Debug, Clone, Default)]
pub struct VolumeStatus {
    /// Per leg: name, state, regions marked dirty, regions in all.
    pub legs: Vec<(String, Option<LegState>, usize, u64)>,
    /// What the engine did.
    pub stats: braid_core::volume::VolumeStats,
    /// The migration running: (from, to, switching over).
    pub migration: Option<(String, String, bool)>,
    /// Why the last migration ended without switching, if it did.
    pub migration_error: Option<String>,
    /// The leg whose server answered FENCED: a newer run of the volume
    /// holds it, and this run has stopped.
    pub fenced_by: Option<String>,
}

/// One leg's new state, as the engine decided it, and when.
#[derive(Debug, Clone)]
pub struct LegChange {
    /// When the engine changed it (for the first of each leg's: when the
    /// watch began).
    pub at: tokio::time::Instant,
    /// The leg's name in the volume's map.
    pub leg: String,
    /// What it is now.
    pub state: LegState,
}

/// Makes a finished migration last: stores the volume's description with
/// leg `from` replaced by the new one (for `braid attach`, the volume
/// file rewritten), durably, before the old leg is let go.
pub type StoreMap = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

enum Cmd {
    Io(IoRequest, oneshot::Sender<Result<Bytes, IoErrorKind>>),
    Suspend(String, oneshot::Sender<Result<(), String>>),
    Resume(String, oneshot::Sender<Result<(), String>>),
    Migrate {
        from: String,
        to: String,
        client: Client,
        store: StoreMap,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Cancel(oneshot::Sender<Result<(), String>>),
    InFlight(oneshot::Sender<Vec<String>>),
    Close(oneshot::Sender<()>),
}

enum Event {
    LegDone(u64, Result<Bytes, IoErrorKind>),
    Stored(u64, Result<(), String>),
    /// Store the logs of this generation again (the last try failed).
    StoreAgain(u64),
    MapStored(Result<(), String>),
    /// A leg's client was fenced (perhaps with none of our IO on it).
    LegFenced(usize),
}

/// A volume over several legs: cheap to clone.
#[derive(Clone)]
pub struct Volume {
    cmds: mpsc::Sender<Cmd>,
    size: u64,
    block_size: u32,
    status: Arc<Mutex<VolumeStatus>>,
    leg_watchers: Watchers,
}

/// Who hears of each leg's changes. Locked only with the status held, so
/// that a new watcher's first look and the changes after it line up.
type Watchers = Arc<Mutex<Vec<mpsc::UnboundedSender<LegChange>>>>;

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
        // `next_run` stored this run's identity: an epoch past the first
        // says runs came before.
        let restarted = store
            .load_identity()
            .map_err(|e| format!("reading the volume's run identity: {e}"))?
            .as_deref()
            .and_then(Identity::decode)
            .is_some_and(|run| run.restarted());
        let (logs, unknown) = logs_as_stored(&names, map.size(), config.region, restarted, |n| {
            store
                .load(n)
                .map_err(|e| format!("reading the dirty log of leg {n}: {e}"))
        })?;
        for why in unknown {
            tracing::warn!("dirty log unusable, so the leg is copied in full: {why}");
        }
        let (size, block_size) = (map.size(), map.block_size());
        let engine = VolumeEngine::new(map, config, logs)?;
        let (tx, rx) = mpsc::channel(1024);
        let status = Arc::new(Mutex::new(VolumeStatus::default()));
        let leg_watchers = Watchers::default();
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut driver = Driver {
            engine,
            legs: Vec::new(),
            store,
            store_map: None,
            waiters: HashMap::new(),
            next_user: 1,
            status: status.clone(),
            leg_timeout,
            events: events_tx,
            leg_watchers: leg_watchers.clone(),
        };
        for (name, client) in names.into_iter().zip(clients) {
            driver.add_leg(name, client);
        }
        // Before anyone asks: an empty snapshot would read as "every leg
        // in sync" (the madsim restart scenario settled on it at once).
        driver.publish_status();
        tokio::spawn(driver.run(rx, events));
        Ok(Volume {
            cmds: tx,
            size,
            block_size,
            status,
            leg_watchers,
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

    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        let gone = || "the volume is closing".to_string();
        self.cmds.send(cmd(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Takes leg `name` out of service (IO goes to the other legs).
    pub async fn suspend(&self, name: &str) -> Result<(), String> {
        self.ask(|tx| Cmd::Suspend(name.to_string(), tx)).await?
    }

    /// Returns a suspended leg to service (it resyncs what it missed).
    pub async fn resume(&self, name: &str) -> Result<(), String> {
        self.ask(|tx| Cmd::Resume(name.to_string(), tx)).await?
    }

    /// Starts moving leg `from`'s bytes to the export `client` is attached
    /// to, named `to` from then on, while IO goes on. Returns once the
    /// copy has started; `status().migration` follows it. When the new leg
    /// holds every byte, `store` makes the switch durable and the old
    /// leg's session is closed.
    pub async fn migrate(
        &self,
        from: &str,
        to: &str,
        client: Client,
        store: StoreMap,
    ) -> Result<(), String> {
        self.ask(|reply| Cmd::Migrate {
            from: from.to_string(),
            to: to.to_string(),
            client,
            store,
            reply,
        })
        .await?
    }

    /// Rolls the running migration back (before it switches over).
    pub async fn cancel_migration(&self) -> Result<(), String> {
        self.ask(Cmd::Cancel).await?
    }

    /// Every IO in the engine, with where each part stands (diagnostics).
    pub async fn in_flight(&self) -> Vec<String> {
        self.ask(Cmd::InFlight).await.unwrap_or_default()
    }

    /// Every leg's state from now on: first each leg's state now, then
    /// each change as the engine makes it (a snapshot from
    /// [`Volume::status`] can miss a leg that left and came back between
    /// two looks). The receiver ends once every handle to the volume
    /// and its driver are gone.
    pub fn watch_legs(&self) -> mpsc::UnboundedReceiver<LegChange> {
        let (tx, rx) = mpsc::unbounded_channel();
        let status = self.status.lock().unwrap();
        let at = tokio::time::Instant::now();
        for (leg, state, _, _) in &status.legs {
            if let Some(state) = *state {
                let leg = leg.clone();
                let _ = tx.send(LegChange { at, leg, state });
            }
        }
        self.leg_watchers.lock().unwrap().push(tx);
        rx
    }

    /// Closes every leg's session (each flushes and says goodbye).
    pub async fn close(&self) {
        let _ = self.ask(Cmd::Close).await;
    }

    /// A fresh snapshot.
    pub fn status(&self) -> VolumeStatus {
        self.status.lock().unwrap().clone()
    }
}

/// One leg as the driver keeps it.
struct LegSlot {
    name: String,
    client: Client,
    /// IO its client's queue had no room for, handed on in order by a
    /// task that waits for room.
    queue: mpsc::UnboundedSender<(u64, IoRequest)>,
    /// IO sent to `queue` and not yet handed to the client: while any is,
    /// later IO must go the same way, or it could overtake.
    queued: Arc<AtomicUsize>,
    down_since: Option<tokio::time::Instant>,
    reported_down: bool,
    /// Left behind for its errors (a full disk, media errors) while still
    /// reachable: when to try it again, and the backoff.
    retry_at: Option<(tokio::time::Instant, Duration)>,
    /// Retired and its session closed.
    closed: bool,
}

struct Driver {
    engine: VolumeEngine,
    legs: Vec<LegSlot>,
    store: Arc<dyn LogStore>,
    /// The running migration's way to make its switch last.
    store_map: Option<StoreMap>,
    waiters: HashMap<u64, oneshot::Sender<Result<Bytes, IoErrorKind>>>,
    next_user: u64,
    status: Arc<Mutex<VolumeStatus>>,
    leg_timeout: Duration,
    events: mpsc::UnboundedSender<Event>,
    leg_watchers: Watchers,
}

/// Tells the driver of leg IO `token`'s answer.
fn answer_to(events: &mpsc::UnboundedSender<Event>, token: u64) -> crate::client::IoCallback {
    let events = events.clone();
    Box::new(move |result| {
        let _ = events.send(Event::LegDone(token, result.map_err(|e| e.kind)));
    })
}

/// The first wait before a leg that failed IO while reachable is tried
/// again; doubled on each failure up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl Driver {
    /// A leg's client, with a task to hand it IO in the engine's order
    /// when its queue is full.
    fn add_leg(&mut self, name: String, client: Client) {
        // Fenced while idle, or while away, a leg's client has no IO of
        // ours to fail with FENCED; its channels just stay down, and
        // reported unreachable the leg would be dropped alone while the
        // others take this run's writes. Told at once instead.
        let (fenced, events, leg) = (client.when_fenced(), self.events.clone(), self.legs.len());
        tokio::spawn(async move {
            if fenced.await {
                let _ = events.send(Event::LegFenced(leg));
            }
        });
        let (queue, mut pending) = mpsc::unbounded_channel::<(u64, IoRequest)>();
        let queued = Arc::new(AtomicUsize::new(0));
        let (c, tx, left) = (client.clone(), self.events.clone(), queued.clone());
        tokio::spawn(async move {
            while let Some((token, io)) = pending.recv().await {
                // Only IO the client had no room for comes here: wait
                // for room, in order.
                let answer = c.enqueue(io).await;
                left.fetch_sub(1, Ordering::AcqRel);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let result = answer.await.map_err(|e| e.kind);
                    let _ = tx.send(Event::LegDone(token, result));
                });
            }
        });
        self.legs.push(LegSlot {
            name,
            client,
            queue,
            queued,
            down_since: None,
            reported_down: false,
            retry_at: None,
            closed: false,
        });
    }

    /// The leg named `name`, among those not retired.
    fn leg(&self, name: &str) -> Result<usize, String> {
        let live: Vec<usize> = (0..self.legs.len())
            .filter(|&i| self.engine.leg_state(i) != LegState::Retired)
            .collect();
        live.iter()
            .copied()
            .find(|&i| self.legs[i].name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = live.iter().map(|&i| self.legs[i].name.as_str()).collect();
                format!("no leg {name:?} (legs: {})", names.join(", "))
            })
    }

    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let clock = Clock::new();
        let mut health = tokio::time::interval(Duration::from_millis(100));
        let mut alarm = Alarm::new(&clock);
        loop {
            self.drain();
            alarm.set(clock.deadline(self.engine.poll_timeout()));
            tokio::select! {
                biased;
                _ = alarm.rung() => self.engine.handle_timeout(clock.now()),
                Some(ev) = events.recv() => self.on_event(ev, &clock),
                _ = health.tick() => self.check_legs(clock.now()),
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd, &clock),
                    None => return,
                },
            }
        }
    }

    /// What a leg, a store or a timer reports to the driver.
    fn on_event(&mut self, ev: Event, clock: &Clock) {
        match ev {
            Event::LegDone(token, result) => {
                tracing::trace!(token, ok = result.is_ok(), "leg io done");
                self.engine.leg_complete(token, result, clock.now())
            }
            Event::Stored(generation, result) => match result {
                Ok(()) => self.engine.logs_stable(generation, clock.now()),
                Err(e) => {
                    // Writes wait rather than go out unrecorded, and
                    // the store is tried again (a full disk frees up).
                    tracing::error!(error = %e, "dirty log not stored; writes wait; trying again in 1 s");
                    let tx = self.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let _ = tx.send(Event::StoreAgain(generation));
                    });
                }
            },
            // The logs now hold at least what that generation did.
            Event::StoreAgain(generation) => self.store_logs(generation),
            Event::LegFenced(leg) => self.engine.leg_fenced(leg),
            Event::MapStored(Ok(())) => {
                self.store_map = None;
                self.engine.map_stored(clock.now());
                tracing::info!("migration switched over: the old leg is retired");
            }
            Event::MapStored(Err(e)) => {
                // Both legs keep every write meanwhile; try again.
                tracing::error!(error = %e, "migration: the new map was not stored; trying again in 1 s");
                let tx = self.events.clone();
                let store = self.store_map.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Some(store) = store {
                        let result = tokio::task::spawn_blocking(move || store()).await;
                        let _ = tx.send(Event::MapStored(
                            result.unwrap_or_else(|e| Err(e.to_string())),
                        ));
                    }
                });
            }
        }
    }

    /// What the volume's handle asks of the driver.
    fn on_command(&mut self, cmd: Cmd, clock: &Clock) {
        match cmd {
            Cmd::Io(io, reply) => {
                let user = self.next_user;
                self.next_user += 1;
                self.waiters.insert(user, reply);
                self.engine.submit(user, io, clock.now());
            }
            Cmd::Suspend(name, reply) => {
                let _ = reply.send(self.leg(&name).and_then(|leg| self.engine.suspend(leg)));
            }
            Cmd::Resume(name, reply) => {
                let _ = reply.send(
                    self.leg(&name)
                        .map(|leg| self.engine.resume(leg, clock.now())),
                );
            }
            Cmd::Migrate {
                from,
                to,
                client,
                store,
                reply,
            } => {
                let _ = reply.send(self.migrate(&from, to, client, store, clock.now()));
            }
            Cmd::Cancel(reply) => {
                let result = self.engine.cancel_migration(clock.now());
                if result.is_ok() {
                    self.store_map = None;
                    self.status.lock().unwrap().migration_error =
                        Some("cancelled by the operator".into());
                }
                let _ = reply.send(result);
            }
            Cmd::InFlight(reply) => {
                let mut v = self.engine.in_flight();
                v.extend((0..self.legs.len()).map(|l| {
                    format!(
                        "leg {} {:?} outstanding {}",
                        self.legs[l].name,
                        self.engine.leg_state(l),
                        self.engine.leg_outstanding(l)
                    )
                }));
                let _ = reply.send(v);
            }
            Cmd::Close(reply) => {
                let clients: Vec<Client> = self
                    .legs
                    .iter()
                    .filter(|l| !l.closed)
                    .map(|l| l.client.clone())
                    .collect();
                tokio::spawn(async move {
                    for c in clients {
                        c.close().await;
                    }
                    let _ = reply.send(());
                });
            }
        }
    }

    fn migrate(
        &mut self,
        from: &str,
        to: String,
        client: Client,
        store: StoreMap,
        now: braid_core::Instant,
    ) -> Result<(), String> {
        let from = self.leg(from)?;
        // A retired leg's name may be used again (a migration rolled back).
        if self.leg(&to).is_ok() {
            return Err(format!("the volume already has a leg named {to:?}"));
        }
        let i = client.info();
        let info = braid_core::volume::LegInfo {
            size: i.size,
            block_size: i.block_size,
            read_only: i.flags & braid_core::wire::EXPORT_READ_ONLY != 0,
        };
        let index = self.engine.migrate(from, &to, info, now)?;
        debug_assert_eq!(index, self.legs.len());
        tracing::info!(from = self.legs[from].name, to, "migration started");
        self.add_leg(to, client);
        self.store_map = Some(store);
        self.status.lock().unwrap().migration_error = None;
        Ok(())
    }

    /// A leg whose channels are all down past `leg_timeout` is failed;
    /// one that has channels again is back. A retired leg's session is
    /// let go once no volume IO waits on it.
    fn check_legs(&mut self, now: braid_core::Instant) {
        if self.engine.fenced_by().is_some() {
            return;
        }
        for leg in 0..self.legs.len() {
            if self.engine.leg_state(leg) == LegState::Retired {
                let slot = &mut self.legs[leg];
                if !slot.closed && self.engine.leg_outstanding(leg) == 0 {
                    slot.closed = true;
                    tracing::info!(leg = slot.name, "leg retired: leaving its session");
                    // Not a close: its successor holds every byte, so there
                    // is nothing to flush, and a server shut down after the
                    // migration must not be waited for.
                    let client = slot.client.clone();
                    tokio::spawn(client.let_go());
                }
                continue;
            }
            let slot = &mut self.legs[leg];
            let up = slot.client.status().channels.iter().any(|c| c.1);
            if up {
                slot.down_since = None;
                if slot.reported_down {
                    slot.reported_down = false;
                    slot.retry_at = None;
                    tracing::info!(leg = slot.name, "leg reachable again: resyncing");
                    self.engine.leg_returned(leg, now);
                } else {
                    self.retry_errored(leg, now);
                }
            } else {
                let since = *slot
                    .down_since
                    .get_or_insert_with(tokio::time::Instant::now);
                if !slot.reported_down && since.elapsed() >= self.leg_timeout {
                    slot.reported_down = true;
                    tracing::warn!(leg = slot.name, "leg unreachable: IO goes on without it");
                    self.engine.leg_failed(leg);
                }
            }
        }
    }

    /// A reachable leg the engine left behind for its errors (its disk
    /// was full, or failed writes) is tried again with backoff: the resync
    /// copies what it missed, and if it still fails it is left again.
    fn retry_errored(&mut self, leg: usize, now: braid_core::Instant) {
        let slot = &mut self.legs[leg];
        if self.engine.leg_state(leg) != LegState::Away {
            if self.engine.leg_state(leg) == LegState::InSync {
                slot.retry_at = None;
            }
            return;
        }
        let clock = tokio::time::Instant::now();
        match slot.retry_at {
            None => slot.retry_at = Some((clock + RETRY_MIN, RETRY_MIN)),
            Some((at, wait)) if clock >= at => {
                let next = (wait * 2).min(RETRY_MAX);
                slot.retry_at = Some((clock + next, next));
                tracing::info!(
                    leg = slot.name,
                    "leg left behind for errors: trying it again"
                );
                self.engine.leg_returned(leg, now);
            }
            Some(_) => {}
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.engine.poll_action() {
            match a {
                VolumeAction::LegIo { leg, token, io } => {
                    tracing::trace!(leg = self.legs[leg].name, token, op = ?io.op, io.offset, io.len, "leg io");
                    // In the engine's order: two overlapping writes
                    // reaching a leg in either order would let legs
                    // diverge. Straight to the client when nothing waits
                    // in the leg's queue: the queue task's hop and a task
                    // spawned per answer cost a mirror's braid attach 2-3
                    // us of CPU per 4k IO (PERFORMANCE.md).
                    let slot = &self.legs[leg];
                    let io = if slot.queued.load(Ordering::Acquire) == 0 {
                        match slot.client.try_io_with(io, answer_to(&self.events, token)) {
                            Ok(()) => continue,
                            Err((io, _)) => io,
                        }
                    } else {
                        io
                    };
                    slot.queued.fetch_add(1, Ordering::AcqRel);
                    let _ = slot.queue.send((token, io));
                }
                VolumeAction::PersistLogs { generation } => self.store_logs(generation),
                VolumeAction::StoreMap { from, to } => {
                    tracing::info!(
                        from = self.legs[from].name,
                        to = self.legs[to].name,
                        "migration copied: storing the new map"
                    );
                    // Only the map: the logs are stored by one writer at a
                    // time (two at once raced on the same files, the soak
                    // found, and writes waited for ever). The new leg's
                    // stored log may still say it is behind; a restart on
                    // the new map then copies those regions once more.
                    let tx = self.events.clone();
                    let map = self.store_map.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = map.map_or(Ok(()), |m| m());
                        let _ = tx.send(Event::MapStored(result));
                    });
                }
                VolumeAction::Complete { user, result } => {
                    if let Some(w) = self.waiters.remove(&user) {
                        let _ = w.send(result);
                    }
                }
                VolumeAction::LegChanged { leg, state } => {
                    tracing::info!(leg = self.legs[leg].name, ?state, "leg state");
                    self.tell_watchers(leg, state);
                }
            }
        }
        if let Some(leg) = self.engine.fenced_by() {
            self.stop_fenced(leg);
        }
        self.publish_status();
    }

    /// The engine stopped for good: a newer run holds leg `leg`. Every
    /// leg's session is let go (the servers free them; the fenced one is
    /// closed already), once.
    fn stop_fenced(&mut self, leg: usize) {
        if self.legs.iter().all(|l| l.closed) {
            return;
        }
        tracing::error!(
            leg = self.legs[leg].name,
            "a newer run of this volume holds this leg: this run has stopped on every leg, \
             and its IO fails (is a copy of its data dir attached elsewhere?)"
        );
        for slot in self.legs.iter_mut().filter(|l| !l.closed) {
            slot.closed = true;
            tokio::spawn(slot.client.clone().close());
        }
    }

    /// Tells the watchers of leg `leg`'s new state, and puts it in the
    /// status at once, where a new watcher takes its first look.
    fn tell_watchers(&self, leg: usize, state: LegState) {
        let mut status = self.status.lock().unwrap();
        let name = self.legs[leg].name.clone();
        match status.legs.get_mut(leg) {
            Some(entry) => entry.1 = Some(state),
            None => status.legs.push((name.clone(), Some(state), 0, 0)),
        }
        let change = LegChange {
            at: tokio::time::Instant::now(),
            leg: name,
            state,
        };
        let mut watchers = self.leg_watchers.lock().unwrap();
        watchers.retain(|w| w.send(change.clone()).is_ok());
    }

    fn publish_status(&self) {
        let mut s = self.status.lock().unwrap();
        s.stats = self.engine.stats();
        s.fenced_by = self.engine.fenced_by().map(|l| self.legs[l].name.clone());
        s.migration = self.engine.migration().map(|m| {
            (
                self.legs[m.from].name.clone(),
                self.legs[m.to].name.clone(),
                m.switching,
            )
        });
        s.legs = (0..self.legs.len())
            .map(|l| {
                let log = self.engine.log(l);
                (
                    self.legs[l].name.clone(),
                    Some(self.engine.leg_state(l)),
                    log.dirty_count(),
                    log.regions(),
                )
            })
            .collect();
    }

    /// Stores every leg's log as it is now, and reports it as `generation`
    /// (the engine asks for one store at a time).
    fn store_logs(&self, generation: u64) {
        let logs = self.encoded_logs();
        let (store, tx) = (self.store.clone(), self.events.clone());
        tokio::task::spawn_blocking(move || {
            let result = store.store(&logs).map_err(|e| e.to_string());
            let _ = tx.send(Event::Stored(generation, result));
        });
    }

    fn encoded_logs(&self) -> Vec<(String, Vec<u8>)> {
        (0..self.legs.len())
            .filter(|&l| self.engine.leg_state(l) != LegState::Retired)
            .map(|l| (self.legs[l].name.clone(), self.engine.log_to_store(l)))
            .collect()
    }
}
