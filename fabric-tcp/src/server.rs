//! The server driver: accepts TCP connections and runs a
//! [`ServerEngine`] and a [`Backend`] behind them.

use crate::conn::{self, ConnEvent};
use crate::engine_loop::{run_engine, EngineLoop};
use crate::engines::{self, Handoff};
use crate::ServerSecurity;
use braid_core::auth::Key;
use braid_core::latency::OpLatency;
use braid_core::server::{
    Backend, ConnId, KeyChange, ServerEngine, ServerStats, ServerTuning, SessionSummary,
};
use braid_core::wire::{InFrame, Status};
use bytes::Bytes;
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

pub(crate) fn key_ids(config: &braid_core::server::ServerConfig) -> Vec<String> {
    config.keys.iter().map(|(id, _)| id.clone()).collect()
}

/// How far past `max_payload` a request may be and still get an answer.
const OVERSIZE_ANSWERED: usize = 4096;

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
