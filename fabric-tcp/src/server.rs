//! The server driver: accepts TCP connections and runs a
//! [`ServerEngine`] and a [`Backend`] behind them.

use crate::clock::{Alarm, Clock};
use crate::conn::{self, ConnEvent};
use crate::engines::{self, Accepted, Handoff};
use crate::ServerSecurity;
use braid_core::auth::Key;
use braid_core::latency::OpLatency;
use braid_core::server::{
    Backend, BackendOp, BackendRequest, ConnId, KeyChange, ServerAction, ServerEngine, ServerStats,
    ServerTuning, SessionSummary,
};
use braid_core::wire::{FileSlice, FrameReader, InFrame, Status};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// A snapshot of the server for `braid status`.
#[derive(Debug, Clone, Default)]
pub struct ServerStatus {
    /// Counters.
    pub stats: ServerStats,
    /// Live sessions.
    pub sessions: usize,
    /// Open connections.
    pub connections: usize,
    /// Backend operations running.
    pub backend_inflight: usize,
    /// Per session.
    pub session_list: Vec<SessionSummary>,
    /// Per export, per operation.
    pub latency: Vec<OpLatency>,
    /// The tunable limits in force.
    pub tuning: ServerTuning,
    /// The ids of the pre-shared keys it holds (every engine holds the
    /// same).
    pub key_ids: Vec<String>,
    /// Wall time the engine's task has spent working, from each wake-up to
    /// its next wait: all of it, against the time passed, says the one
    /// task is what limits the server (time the thread was descheduled
    /// mid-turn counts too).
    pub engine_busy: std::time::Duration,
    /// How many times the engine's task woke to work.
    pub engine_turns: u64,
    /// Each engine's share of the two above, when the server runs several
    /// (`engine_busy` and `engine_turns` are then their sums).
    pub engines: Vec<EngineLoad>,
}

/// One engine task's work so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineLoad {
    /// Wall time from each wake-up to the next wait.
    pub busy: std::time::Duration,
    /// Wake-ups.
    pub turns: u64,
    /// Live sessions it holds.
    pub sessions: usize,
}

impl ServerStatus {
    /// Adds another engine's snapshot into this one.
    fn add(&mut self, other: &ServerStatus) {
        self.stats.add(&other.stats);
        self.sessions += other.sessions;
        self.connections += other.connections;
        self.backend_inflight += other.backend_inflight;
        self.session_list.extend_from_slice(&other.session_list);
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            mine.add(theirs);
        }
        self.engine_busy += other.engine_busy;
        self.engine_turns += other.engine_turns;
        self.engines.extend_from_slice(&other.engines);
    }
}

fn key_ids(config: &braid_core::server::ServerConfig) -> Vec<String> {
    config.keys.iter().map(|(id, _)| id.clone()).collect()
}

/// Unsent reply bytes one connection may hold before the server decides
/// its peer stopped reading (a few max-size replies in flight, with room).
const SEND_QUEUE_MAX: usize = 64 << 20;
/// How far past `max_payload` a request may be and still get an answer.
const OVERSIZE_ANSWERED: usize = 4096;
/// READs at least this large are answered from the page cache by
/// `sendfile` where the connection allows it (see [`file_reply`]).
const FILE_REPLY_MIN: u32 = 128 * 1024;

/// What woke the engine's task.
enum Woken {
    Alarm,
    Accepted(std::io::Result<(tokio::net::TcpStream, SocketAddr)>),
    Shutdown,
    Event(Event),
    Completions,
    Conn(ConnEvent<ConnId>),
    Replies,
}

pub(crate) enum Event {
    BackendDone(u64, Result<Bytes, Status>),
    /// A TLS handshake finished: the connection's writer.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Secured(ConnId, conn::Writer),
    /// An operator's runtime tuning; the answer says whether it applied.
    Tune(ServerTuning, oneshot::Sender<Result<(), String>>),
    /// A new table of pre-shared keys; the answer says what it changed.
    SetKeys(
        Vec<(String, Key)>,
        oneshot::Sender<Result<KeyChange, String>>,
    ),
    /// A connection another fabric accepted (see [`Server::adopt`]).
    Adopt(Adoption),
    /// A connection the acceptor of a server with several engines read
    /// the first frame of and found to be this engine's.
    Handoff(Box<Handoff>),
    /// Like `Handoff`, for a connection another fabric accepted: its
    /// writer and first frame; its later frames follow on the engine's
    /// connection queue.
    Adopted(ConnId, conn::Writer, InFrame),
}

/// Starts a connection accepted by another fabric: given its id and where
/// its frames go, returns the writer that takes its replies.
pub type Adoption =
    Box<dyn FnOnce(ConnId, mpsc::UnboundedSender<ConnEvent<ConnId>>) -> conn::Writer + Send>;

/// What the rest of the server holds of one engine's task.
pub(crate) struct EngineSlot {
    pub(crate) status: Arc<Mutex<ServerStatus>>,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub(crate) conns: mpsc::UnboundedSender<ConnEvent<ConnId>>,
}

/// A running server: a handle to its status and tuning, cheap to clone.
#[derive(Clone)]
pub struct Server {
    engines: Arc<[EngineSlot]>,
    local_addr: SocketAddr,
    handshake_timeout: std::time::Duration,
    /// Ids for connections adopted by a server with several engines,
    /// apart from those the engines number themselves.
    adopted: Arc<AtomicU64>,
}

/// An engine's task, for an [`EngineSpawner`] to start.
pub type EngineTask = std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// Starts engine number `index`'s task (and so the tasks of its
/// connections) where the caller wants it. A single-threaded runtime per
/// engine keeps each session's reads, backend operations and replies on
/// one thread; without a spawner the engines share the caller's runtime.
pub type EngineSpawner =
    Arc<dyn Fn(usize, EngineTask) -> tokio::task::JoinHandle<std::io::Result<()>> + Send + Sync>;

/// Adopted connections of a server with several engines are numbered from
/// here; each engine numbers its own from its index up, in steps of the
/// engine count, and never gets this far.
const FIRST_ADOPTED: ConnId = 1 << 62;

impl Server {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A fresh snapshot, summed over the engines.
    pub fn status(&self) -> ServerStatus {
        let mut all = self.engines[0].status.lock().unwrap().clone();
        for e in &self.engines[1..] {
            all.add(&e.status.lock().unwrap());
        }
        all
    }

    /// Serves a connection another fabric (RDMA) accepted, like one from
    /// the TCP listener; false if the server is stopping.
    pub fn adopt(&self, start: Adoption) -> bool {
        if self.engines.len() == 1 {
            return self.engines[0].events.send(Event::Adopt(start)).is_ok();
        }
        if self.engines[0].events.is_closed() {
            return false;
        }
        let conn = FIRST_ADOPTED + self.adopted.fetch_add(1, Ordering::Relaxed);
        engines::adopt(conn, start, self.engines.clone(), self.handshake_timeout);
        true
    }

    /// Applies runtime tuning between two events of each engine, so
    /// nothing in flight is disturbed; refused values change nothing and
    /// the error names the field.
    pub async fn tune(&self, tuning: ServerTuning) -> Result<(), String> {
        // Every engine checks the same values against the same
        // configuration, so they all agree.
        let answers = self
            .ask_every_engine(|reply| Event::Tune(tuning.clone(), reply))
            .await?;
        answers.into_iter().collect()
    }

    /// Replaces every engine's pre-shared keys between two of its events
    /// (see [`ServerEngine::set_keys`]): channels that authenticated with
    /// a withdrawn key close. A table an engine refuses changes nothing
    /// anywhere, as every engine checks it against the same configuration.
    /// The change is summed over the engines.
    pub async fn set_keys(&self, keys: Vec<(String, Key)>) -> Result<KeyChange, String> {
        let answers = self
            .ask_every_engine(|reply| Event::SetKeys(keys.clone(), reply))
            .await?;
        let mut change = KeyChange::default();
        for one in answers {
            let one = one?;
            change.added = one.added;
            change.withdrawn = one.withdrawn;
            change.channels_closed += one.channels_closed;
        }
        Ok(change)
    }

    /// Sends every engine the event `ask` makes around a reply channel,
    /// then waits for every answer: all the events are queued before the
    /// first answer is awaited, so the engines work on them together.
    async fn ask_every_engine<T>(
        &self,
        ask: impl Fn(oneshot::Sender<T>) -> Event,
    ) -> Result<Vec<T>, String> {
        let stopping = || "the server is stopping".to_string();
        let mut answers = Vec::with_capacity(self.engines.len());
        for e in self.engines.iter() {
            let (tx, rx) = oneshot::channel();
            e.events.send(ask(tx)).map_err(|_| stopping())?;
            answers.push(rx);
        }
        let mut out = Vec::with_capacity(answers.len());
        for rx in answers {
            out.push(rx.await.map_err(|_| stopping())?);
        }
        Ok(out)
    }

    /// Serves `listener` with one engine; see [`Server::run_engines`].
    pub async fn run(
        listener: TcpListener,
        security: ServerSecurity,
        engine: ServerEngine,
        backend: Arc<dyn Backend>,
        shutdown: impl Future<Output = ()>,
        on_start: impl FnOnce(Server),
    ) -> std::io::Result<()> {
        Self::run_engines(
            listener,
            security,
            vec![engine],
            None,
            backend,
            shutdown,
            on_start,
        )
        .await
    }

    /// Serves `listener` until `shutdown` completes, then stops accepting,
    /// lets backend operations in flight finish and their replies go out,
    /// and returns.
    ///
    /// Each engine runs on a task of its own and holds its own sessions
    /// (see [`braid_core::server::engine_for`]). With one, its task also
    /// accepts connections; with several, an acceptor task reads each
    /// connection's first frame and hands the connection to the engine it
    /// names, and `spawner` (if given) says where each engine's task runs
    /// (a single engine runs on the caller's task).
    pub async fn run_engines(
        listener: TcpListener,
        security: ServerSecurity,
        mut engines: Vec<ServerEngine>,
        spawner: Option<EngineSpawner>,
        backend: Arc<dyn Backend>,
        shutdown: impl Future<Output = ()>,
        on_start: impl FnOnce(Server),
    ) -> std::io::Result<()> {
        assert!(!engines.is_empty(), "a server needs an engine");
        let count = engines.len();
        let first_config = engines[0].config().clone();
        // A request a little over the limit still decodes, so its sender
        // gets INVALID for that request instead of losing the channel.
        let max_payload = first_config.max_payload as usize + OVERSIZE_ANSWERED;
        let session_counts: Option<Arc<[AtomicUsize]>> =
            (count > 1).then(|| (0..count).map(|_| AtomicUsize::new(0)).collect());
        let mut slots = Vec::with_capacity(count);
        let mut loops = Vec::with_capacity(count);
        for (index, mut engine) in engines.drain(..).enumerate() {
            engine.set_shard(index, count);
            let status = Arc::new(Mutex::new(ServerStatus {
                tuning: ServerTuning::of(engine.config()),
                key_ids: key_ids(engine.config()),
                engines: vec![EngineLoad::default()],
                ..ServerStatus::default()
            }));
            let (tx, rx) = mpsc::unbounded_channel::<Event>();
            let (conn_tx, conn_rx) = mpsc::unbounded_channel::<ConnEvent<ConnId>>();
            slots.push(EngineSlot {
                status: status.clone(),
                events: tx.clone(),
                conns: conn_tx.clone(),
            });
            loops.push(EngineLoop {
                index,
                count,
                engine,
                backend: backend.clone(),
                security: security.clone(),
                max_payload,
                events: (tx, rx),
                conns: (conn_tx, conn_rx),
                status,
                session_counts: session_counts.clone(),
            });
        }
        let slots: Arc<[EngineSlot]> = slots.into();
        on_start(Server {
            engines: slots.clone(),
            local_addr: listener.local_addr()?,
            handshake_timeout: first_config.handshake_timeout,
            adopted: Arc::new(AtomicU64::new(0)),
        });
        if count == 1 {
            let only = loops.pop().expect("one engine");
            return run_engine(only, Some(listener), shutdown).await;
        }
        let mut stops = Vec::with_capacity(count);
        let mut tasks = Vec::with_capacity(count);
        for l in loops {
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            let index = l.index;
            let task: EngineTask = Box::pin(run_engine(l, None, async move {
                let _ = stopped.await;
            }));
            tasks.push(match &spawner {
                Some(spawn) => spawn(index, task),
                None => tokio::spawn(task),
            });
        }
        engines::accept(
            &listener,
            &security,
            &slots,
            engines::Limits {
                handshake: first_config.handshake_timeout,
                max_payload,
            },
            shutdown,
        )
        .await;
        drop(stops);
        let mut result = Ok(());
        for t in tasks {
            match t.await {
                Ok(r) => result = result.and(r),
                Err(e) => result = result.and(Err(std::io::Error::other(e.to_string()))),
            }
        }
        result
    }
}

/// One engine's task: what it needs to start.
struct EngineLoop {
    index: usize,
    count: usize,
    engine: ServerEngine,
    backend: Arc<dyn Backend>,
    security: ServerSecurity,
    max_payload: usize,
    events: (mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>),
    conns: (
        mpsc::UnboundedSender<ConnEvent<ConnId>>,
        mpsc::UnboundedReceiver<ConnEvent<ConnId>>,
    ),
    status: Arc<Mutex<ServerStatus>>,
    /// Each engine's session count, when there are several.
    session_counts: Option<Arc<[AtomicUsize]>>,
}

/// Runs one engine until `shutdown`, then until its backend operations
/// have finished and their replies gone out. Accepts from `listener` when
/// given one (the server's only engine).
async fn run_engine(
    setup: EngineLoop,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let EngineLoop {
        index,
        count,
        mut engine,
        backend,
        security,
        max_payload,
        events: (tx, mut rx),
        conns: (conn_tx, mut conn_rx),
        status,
        session_counts,
    } = setup;
    let clock = Clock::new();
    let mut writers: HashMap<ConnId, conn::Writer> = HashMap::new();
    // Connections whose writer sends file payloads with `sendfile`.
    let mut file_conns: HashSet<ConnId> = HashSet::new();
    // Each engine numbers its connections apart from the others'.
    let mut next_conn: ConnId = index as ConnId + 1;
    let conn_step = count as ConnId;
    let mut draining = false;
    let mut listed = (tokio::time::Instant::now(), (0, 0));
    let (mut completions, readiness) = match crate::completions::Completions::open(&*backend) {
        Some((c, r)) => (Some(c), Some(r)),
        None => (None, None),
    };
    tokio::pin!(shutdown);
    let mut replies = conn::Gathered::new();
    let mut alarm = Alarm::new(&clock);
    let mut engine_busy = std::time::Duration::ZERO;
    let mut turns: u64 = 0;
    loop {
        crate::check_engine("server", || engine.check());
        alarm.set(clock.deadline(engine.poll_timeout()));
        // Biased, in a fixed order, so a seed replays exactly under the
        // simulator: timers (only when due), new connections (rare,
        // and never kept waiting behind a busy client), shutdown,
        // finished backend operations, then frames. Frames cannot
        // starve: everything ahead of them is bounded by them.
        let woken = tokio::select! {
            biased;
            _ = alarm.rung() => Woken::Alarm,
            accepted = accept_on(listener.as_ref()), if !draining && listener.is_some() => {
                Woken::Accepted(accepted)
            }
            _ = &mut shutdown, if !draining => Woken::Shutdown,
            Some(ev) = rx.recv() => Woken::Event(ev),
            _ = crate::completions::ready(readiness.as_ref()) => Woken::Completions,
            Some(ev) = conn_rx.recv() => Woken::Conn(ev),
            // Last: replies wait while anything else is ready, so
            // those of requests read together leave together.
            _ = std::future::ready(()), if !replies.is_empty() => Woken::Replies,
        };
        let mut turn_started = tokio::time::Instant::now();
        turns += 1;
        if let Some(counts) = &session_counts {
            let elsewhere = counts
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != index)
                .map(|(_, n)| n.load(Ordering::Relaxed))
                .sum();
            engine.set_sessions_elsewhere(elsewhere);
        }
        match woken {
            Woken::Alarm => engine.handle_timeout(clock.now()),
            Woken::Accepted(Ok((stream, peer))) => {
                let _ = stream.set_nodelay(true);
                let conn = next_conn;
                next_conn += conn_step;
                tracing::debug!(conn, %peer, "connection accepted");
                engine.connection_opened(conn, clock.now());
                match &security {
                    ServerSecurity::Plain => {
                        let handoff = Handoff {
                            stream: Accepted::Plain(stream),
                            frames: FrameReader::new(max_payload),
                        };
                        start_conn(conn, handoff, &conn_tx, &mut writers, &mut file_conns);
                    }
                    #[cfg(feature = "tls")]
                    ServerSecurity::Tls(acceptor) => {
                        // Off the engine loop: a slow or hostile TLS
                        // handshake holds up nobody else.
                        tokio::spawn(secure(
                            acceptor.clone(),
                            stream,
                            conn,
                            engine.config().handshake_timeout,
                            FrameReader::new(max_payload),
                            (tx.clone(), conn_tx.clone()),
                        ));
                    }
                }
            }
            Woken::Accepted(Err(e)) => {
                // Out of descriptors and the like: keep serving the
                // sessions we have, try again shortly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                turn_started = tokio::time::Instant::now();
            }
            Woken::Shutdown => {
                tracing::info!(
                    inflight = engine.backend_inflight(),
                    "shutting down: draining backend operations"
                );
                draining = true;
            }
            Woken::Event(ev) => {
                let starting = Starting {
                    next_conn: &mut next_conn,
                    conn_step,
                    conn_tx: &conn_tx,
                    file_conns: &mut file_conns,
                    draining,
                };
                handle(&mut engine, &mut writers, ev, &clock, &status, starting);
            }
            Woken::Completions => {}
            Woken::Conn(ev) => handle_conn(&mut engine, &mut writers, &mut file_conns, ev, &clock),
            Woken::Replies => {
                send_replies(
                    &mut replies,
                    &mut engine,
                    &mut writers,
                    &mut file_conns,
                    &clock,
                );
            }
        }
        if let Some(c) = completions.as_mut() {
            c.collect(&mut |token, result| engine.backend_complete(token, result, clock.now()));
        }
        while let Ok(ev) = conn_rx.try_recv() {
            handle_conn(&mut engine, &mut writers, &mut file_conns, ev, &clock);
        }
        while let Ok(ev) = rx.try_recv() {
            let starting = Starting {
                next_conn: &mut next_conn,
                conn_step,
                conn_tx: &conn_tx,
                file_conns: &mut file_conns,
                draining,
            };
            handle(&mut engine, &mut writers, ev, &clock, &status, starting);
        }
        while let Some(action) = engine.poll_action() {
            match action {
                ServerAction::Send { conn, mut frame } => {
                    if frame.file_payload().is_some() && !file_conns.contains(&conn) {
                        // The engine routes a reply where `file_reply_conn`
                        // said it would; should that ever be another
                        // kind of link, the bytes go through memory.
                        if let Err(e) = conn::fill_file_payload(&mut frame) {
                            tracing::warn!(conn, error = %e, "cannot send a reply");
                            continue;
                        }
                    }
                    if writers.contains_key(&conn) {
                        replies.push(conn, frame);
                    }
                }
                ServerAction::Close { conn, reason } => {
                    tracing::debug!(conn, ?reason, "closing connection");
                    if let Some(w) = writers.remove(&conn) {
                        if let Some(frames) = replies.of(conn) {
                            let _ = w.send_all(frames);
                        }
                        w.close();
                    }
                    file_conns.remove(&conn);
                }
                ServerAction::Backend(req) => start_backend_op(
                    req,
                    &mut engine,
                    &backend,
                    completions.as_mut(),
                    &file_conns,
                    &tx,
                    &clock,
                ),
            }
        }
        // Nothing else has come in meanwhile (at low depth, nearly
        // always): the replies leave now rather than after another
        // round of the loop.
        if conn_rx.is_empty() && rx.is_empty() {
            send_replies(
                &mut replies,
                &mut engine,
                &mut writers,
                &mut file_conns,
                &clock,
            );
        }
        if let Some(c) = completions.as_mut() {
            c.submit();
        }
        engine_busy += turn_started.elapsed();
        publish_status(&status, &engine, (engine_busy, turns), &mut listed);
        if let Some(counts) = &session_counts {
            counts[index].store(engine.session_count(), Ordering::Relaxed);
        }
        if draining && engine.backend_inflight() == 0 {
            send_replies(
                &mut replies,
                &mut engine,
                &mut writers,
                &mut file_conns,
                &clock,
            );
            for (_, w) in writers.drain() {
                w.close();
            }
            // Let the writers flush their last replies.
            tokio::task::yield_now().await;
            return Ok(());
        }
    }
}

/// The TLS handshake of accepted connection `conn`, within `limit`: the
/// secured connection goes to the engine loop, a failed one is closed.
#[cfg(feature = "tls")]
async fn secure(
    acceptor: crate::tls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    conn: ConnId,
    limit: std::time::Duration,
    frames: FrameReader,
    (tx, conn_tx): (
        mpsc::UnboundedSender<Event>,
        mpsc::UnboundedSender<ConnEvent<ConnId>>,
    ),
) {
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let w = conn::spawn(tls, conn, frames, SEND_QUEUE_MAX, conn_tx);
            let _ = tx.send(Event::Secured(conn, w));
        }
        Ok(Err(e)) => {
            let _ = conn_tx.send(ConnEvent::Closed(conn, format!("TLS: {e}")));
        }
        Err(_) => {
            let _ = conn_tx.send(ConnEvent::Closed(conn, "TLS handshake timed out".into()));
        }
    }
}

/// Starts request `req`'s backend operation the cheapest way it can run:
/// with the simulator's latency, straight from the file into the reply,
/// at once where nothing blocks, on io_uring, or on the pool.
fn start_backend_op(
    req: BackendRequest,
    engine: &mut ServerEngine,
    backend: &Arc<dyn Backend>,
    completions: Option<&mut crate::completions::Completions>,
    file_conns: &HashSet<ConnId>,
    tx: &mpsc::UnboundedSender<Event>,
    clock: &Clock,
) {
    if let Some(delay) = backend.latency(req.export, &req.op) {
        let (backend, tx) = (backend.clone(), tx.clone());
        let reported = backend.completion_delay(req.export, &req.op);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = backend.execute(req.export, &req.op);
            if !reported.is_zero() {
                tokio::time::sleep(reported).await;
            }
            let _ = tx.send(Event::BackendDone(req.token, result));
        });
        return;
    }
    if let Some((data, crc)) = file_reply(engine, &req, &**backend, file_conns) {
        engine.backend_complete_from_file(req.token, data, crc, clock.now());
        return;
    }
    // Cached reads and unthrottled writes finish here and now; anything
    // that might block goes to the pool.
    if let Some(result) = backend.try_execute_now(req.export, &req.op) {
        engine.backend_complete(req.token, result, clock.now());
        return;
    }
    let op = match completions {
        Some(c) => match c.start(req.export, req.op, req.token) {
            Ok(()) => return,
            Err(op) => op,
        },
        None => req.op,
    };
    let (backend, tx, export, token) = (backend.clone(), tx.clone(), req.export, req.token);
    tokio::task::spawn_blocking(move || {
        let result = backend.execute(export, &op);
        let _ = tx.send(Event::BackendDone(token, result));
    });
}

/// The engine's figures for `braid status` and metrics after a turn;
/// `listed` is when the session list was last refreshed, and the counts
/// it had.
fn publish_status(
    status: &Mutex<ServerStatus>,
    engine: &ServerEngine,
    (engine_busy, turns): (std::time::Duration, u64),
    listed: &mut (tokio::time::Instant, (usize, usize)),
) {
    let mut s = status.lock().unwrap();
    s.engine_busy = engine_busy;
    s.engine_turns = turns;
    s.engines[0] = EngineLoad {
        busy: engine_busy,
        turns,
        sessions: engine.session_count(),
    };
    s.stats.clone_from(engine.stats());
    s.sessions = engine.session_count();
    s.connections = engine.connection_count();
    s.backend_inflight = engine.backend_inflight();
    // Fixed-size copies (under a kilobyte per export), so a
    // scrape never misses the last requests before a quiet spell.
    s.latency.clear();
    s.latency.extend_from_slice(engine.latency());
    // The per-session list allocates: refresh it at most every
    // 100 ms rather than per event, and whenever a session or a
    // connection came or went (else the last change before a
    // quiet spell would stay unseen).
    let counts = (s.sessions, s.connections);
    if listed.0.elapsed() >= std::time::Duration::from_millis(100) || counts != listed.1 {
        s.session_list = engine.sessions();
        *listed = (tokio::time::Instant::now(), counts);
    }
}

/// The listener's next connection; never, for an engine without one.
async fn accept_on(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Starts the reader and writer of a connection this engine now serves
/// (the engine has been told it opened).
fn start_conn(
    conn: ConnId,
    handoff: Handoff,
    conn_tx: &mpsc::UnboundedSender<ConnEvent<ConnId>>,
    writers: &mut HashMap<ConnId, conn::Writer>,
    file_conns: &mut HashSet<ConnId>,
) {
    let Handoff { stream, frames } = handoff;
    let writer = match stream {
        #[cfg(not(madsim))]
        Accepted::Plain(stream) => {
            file_conns.insert(conn);
            conn::spawn_tcp(stream, conn, frames, SEND_QUEUE_MAX, conn_tx.clone())
        }
        #[cfg(madsim)]
        Accepted::Plain(stream) => {
            let _ = &file_conns;
            conn::spawn(stream, conn, frames, SEND_QUEUE_MAX, conn_tx.clone())
        }
        #[cfg(feature = "tls")]
        Accepted::Tls(tls) => conn::spawn(*tls, conn, frames, SEND_QUEUE_MAX, conn_tx.clone()),
    };
    writers.insert(conn, writer);
}

/// A large READ whose data is all in the page cache, to be answered on a
/// connection that can `sendfile`: the backend gives its checksum
/// (combined from checksums it kept of the data's blocks, or read once to
/// hash it), and the socket then takes the data straight from the page
/// cache. That saves the copy into the socket (a quarter of the server's
/// CPU on 1 MiB reads) and the reply buffer. A write landing in between
/// changes the bytes sent but not the checksum, so the client sees a
/// damaged reply and asks again, as for any other.
fn file_reply(
    engine: &ServerEngine,
    req: &BackendRequest,
    backend: &dyn Backend,
    file_conns: &HashSet<ConnId>,
) -> Option<(FileSlice, u32)> {
    let BackendOp::Read { offset, len } = req.op else {
        return None;
    };
    if len < FILE_REPLY_MIN || !file_conns.contains(&engine.file_reply_conn(req.token)?) {
        return None;
    }
    let source = backend.splice_source(req.export, offset, len)?;
    // Unreadable now: the ordinary path reports it properly.
    let crc = backend.payload_crc(req.export, offset, len)?;
    Some((
        FileSlice {
            file: source.file,
            offset: source.offset,
            len,
        },
        crc,
    ))
}

/// Sends each connection's replies gathered since the loop last had
/// nothing else to do, in one go per connection. A connection refusing
/// them (its peer stopped reading: they would pile up here) is closed,
/// and its client resends elsewhere.
fn send_replies(
    replies: &mut conn::Gathered<ConnId>,
    engine: &mut ServerEngine,
    writers: &mut HashMap<ConnId, conn::Writer>,
    file_conns: &mut HashSet<ConnId>,
    clock: &Clock,
) {
    for (conn, frames) in replies.each() {
        let Some(w) = writers.get(&conn) else {
            continue;
        };
        if !w.send_all(frames) {
            tracing::warn!(
                conn,
                "closing a connection that stopped reading its replies"
            );
            w.close();
            writers.remove(&conn);
            file_conns.remove(&conn);
            engine.connection_closed(conn, clock.now());
        }
    }
    replies.clear();
}

fn handle_conn(
    engine: &mut ServerEngine,
    writers: &mut HashMap<ConnId, conn::Writer>,
    file_conns: &mut HashSet<ConnId>,
    ev: ConnEvent<ConnId>,
    clock: &Clock,
) {
    match ev {
        ConnEvent::Frame(conn, frame) => engine.handle_frame(conn, frame, clock.now()),
        ConnEvent::Closed(_, why)
            if why.starts_with("bad frame")
                && engine.config().defect == Some(braid_core::server::Defect::KeepBadFrames) => {}
        ConnEvent::Closed(conn, why) => {
            tracing::debug!(conn, why, "connection closed");
            writers.remove(&conn);
            file_conns.remove(&conn);
            engine.connection_closed(conn, clock.now());
        }
    }
}

/// What starting a connection handed to the engine needs from its loop.
struct Starting<'a> {
    next_conn: &'a mut ConnId,
    conn_step: ConnId,
    conn_tx: &'a mpsc::UnboundedSender<ConnEvent<ConnId>>,
    file_conns: &'a mut HashSet<ConnId>,
    draining: bool,
}

impl Starting<'_> {
    fn next(&mut self) -> ConnId {
        let conn = *self.next_conn;
        *self.next_conn += self.conn_step;
        conn
    }
}

fn handle(
    engine: &mut ServerEngine,
    writers: &mut HashMap<ConnId, conn::Writer>,
    ev: Event,
    clock: &Clock,
    status: &Mutex<ServerStatus>,
    mut starting: Starting<'_>,
) {
    match ev {
        Event::BackendDone(token, result) => engine.backend_complete(token, result, clock.now()),
        Event::Secured(conn, writer) => {
            writers.insert(conn, writer);
        }
        // Stopping: the connection is dropped unstarted.
        Event::Adopt(_) | Event::Handoff(_) if starting.draining => {}
        Event::Adopted(_, writer, _) if starting.draining => writer.close(),
        Event::Adopt(start) => {
            let conn = starting.next();
            tracing::debug!(conn, "connection adopted from another fabric");
            engine.connection_opened(conn, clock.now());
            writers.insert(conn, start(conn, starting.conn_tx.clone()));
        }
        Event::Handoff(handoff) => {
            let handoff = match handoff.rehomed() {
                Ok(h) => h,
                Err(e) => return tracing::warn!(error = %e, "cannot take over a connection"),
            };
            let conn = starting.next();
            tracing::debug!(conn, "connection handed over by the acceptor");
            engine.connection_opened(conn, clock.now());
            start_conn(
                conn,
                handoff,
                starting.conn_tx,
                writers,
                starting.file_conns,
            );
        }
        Event::Adopted(conn, writer, first) => {
            tracing::debug!(conn, "adopted connection handed over");
            engine.connection_opened(conn, clock.now());
            writers.insert(conn, writer);
            engine.handle_frame(conn, first, clock.now());
        }
        Event::SetKeys(keys, reply) => {
            let result = engine
                .set_keys(keys, clock.now())
                .map_err(|e| e.to_string());
            status.lock().unwrap().key_ids = key_ids(engine.config());
            let _ = reply.send(result);
        }
        Event::Tune(tuning, reply) => {
            let result = engine.tune(&tuning).map_err(|e| e.to_string());
            if result.is_ok() {
                tracing::info!(?tuning, "server retuned");
                status.lock().unwrap().tuning = ServerTuning::of(engine.config());
            }
            let _ = reply.send(result);
        }
    }
}
