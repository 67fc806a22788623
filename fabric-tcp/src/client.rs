//! The client driver: runs a [`ClientEngine`] over TCP channels to one
//! server and offers an async `io()` to frontends.

use crate::clock::{Alarm, Clock};
use crate::conn::{self, ConnEvent};
use crate::fabric::{self, Endpoint};
use crate::ClientSecurity;
use braid_core::auth::Key;
use braid_core::client::{
    ChannelId, ClientAction, ClientConfig, ClientEngine, ClientStats, ClientTuning, ExportInfo,
    IoError, IoRequest, Notice, SubmitError,
};
use braid_core::latency::OpLatency;
use braid_core::wire::{self, RejectCode};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

/// A snapshot of the client for status output.
#[derive(Debug, Clone, Default)]
pub struct ClientStatus {
    /// Counters.
    pub stats: ClientStats,
    /// Per channel: id, ready, requests in flight, smoothed RTT.
    pub channels: Vec<(ChannelId, bool, u32, Option<Duration>)>,
    /// Requests journaled.
    pub journaled: usize,
    /// Unflushed data held for replay.
    pub dirty_bytes: u64,
    /// Current session and server boot id.
    pub session: Option<(u64, u64)>,
    /// Per operation, from submission to completion.
    pub latency: OpLatency,
    /// The tunable settings in force.
    pub tuning: ClientTuning,
    /// The key id new channels authenticate with.
    pub key_id: String,
    /// Per channel slot: the path (fabric and address) its latest
    /// connection took.
    pub paths: Vec<(u16, String)>,
    /// Wall time the driver's task has spent working, from each wake-up
    /// to its next wait (the completions it hands callers included):
    /// all of it, against the time passed, says that one task is what
    /// limits the client.
    pub driver_busy: Duration,
}

impl ClientStatus {
    /// The path (fabric and address) a channel uses.
    pub fn path_of(&self, ch: ChannelId) -> &str {
        self.paths
            .iter()
            .find(|(slot, _)| *slot == ch.slot)
            .map_or("", |(_, p)| p.as_str())
    }
}

/// Why [`Client::connect`] gave up.
#[derive(Debug, Clone)]
pub struct ConnectError {
    /// Where we tried.
    pub addr: String,
    /// What the last attempt said.
    pub detail: String,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no session with braid server {}: {}",
            self.addr, self.detail
        )
    }
}

impl std::error::Error for ConnectError {}

/// What hears an IO's answer when the caller does not await it: called once,
/// on the client's driver task, so it must not block.
pub type IoCallback = Box<dyn FnOnce(Result<Bytes, IoError>) + Send>;

/// Who hears an IO's answer: a waiting task, or a callback (no task per IO).
/// Dropped unanswered (the client closed), a callback hears `gone`.
struct Reply(Option<ReplyTo>);

enum ReplyTo {
    Once(oneshot::Sender<Result<Bytes, IoError>>),
    Call(IoCallback, IoError),
}

impl Reply {
    fn send(mut self, result: Result<Bytes, IoError>) {
        match self.0.take() {
            Some(ReplyTo::Once(tx)) => {
                let _ = tx.send(result);
            }
            Some(ReplyTo::Call(done, _)) => done(result),
            None => {}
        }
    }
}

/// What an IO hears when the client is gone before answering it.
fn closed_error(io: &IoRequest) -> IoError {
    IoError {
        kind: braid_core::client::IoErrorKind::Closed,
        export: String::new(),
        op: io.op,
        offset: io.offset,
        len: io.len,
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(ReplyTo::Call(done, gone)) = self.0.take() {
            done(Err(gone));
        }
    }
}

enum Cmd {
    Io(IoRequest, Reply),
    Tune(ClientTuning, oneshot::Sender<Result<(), String>>),
    SetKey(String, Key, oneshot::Sender<Result<(), String>>),
    SetSecurity(ClientSecurity, oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
    LetGo(oneshot::Sender<()>),
}

enum Event {
    Up(ChannelId, conn::Writer),
    Failed(ChannelId, String),
    /// Failed in a way retrying will not cure (a TLS certificate problem).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Refused(ChannelId, String),
}

/// A braid volume: cheap to clone, usable from many tasks at once.
#[derive(Clone)]
pub struct Client {
    cmds: mpsc::Sender<Cmd>,
    info: ExportInfo,
    status: Arc<Mutex<ClientStatus>>,
    /// Turns true when a server fences this run (see [`Client::when_fenced`]).
    fenced: watch::Receiver<bool>,
    /// Why a channel last went down or was refused.
    last_error: Arc<Mutex<String>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("info", &self.info).finish()
    }
}

impl Client {
    /// Connects to the server at `addr` (host:port) and waits until the
    /// session is up or `wait` has passed. Once connected, the client
    /// reconnects and fails over by itself for as long as it lives.
    #[allow(clippy::type_complexity)]
    fn spawn(
        addr: String,
        security: ClientSecurity,
        config: ClientConfig,
    ) -> Result<
        (
            mpsc::Sender<Cmd>,
            Arc<Mutex<ClientStatus>>,
            oneshot::Receiver<Result<ExportInfo, String>>,
            Arc<Mutex<String>>,
            watch::Receiver<bool>,
        ),
        ConnectError,
    > {
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let status = Arc::new(Mutex::new(ClientStatus {
            tuning: ClientTuning::of(&config),
            key_id: config.key_id.clone(),
            ..ClientStatus::default()
        }));
        let (ready_tx, ready_rx) = oneshot::channel();
        let last_error = Arc::new(Mutex::new(String::from("no answer yet")));
        let (fenced_tx, fenced) = watch::channel(false);
        let engine = ClientEngine::new(config).map_err(|e| ConnectError {
            addr: addr.clone(),
            detail: e.to_string(),
        })?;
        let endpoints = fabric::parse_endpoints(&addr).map_err(|detail| ConnectError {
            addr: addr.clone(),
            detail,
        })?;
        let driver = Driver {
            engine,
            endpoints,
            security,
            clock: Clock::new(),
            writers: HashMap::new(),
            waiters: HashMap::new(),
            outgoing: conn::Gathered::new(),
            held: VecDeque::new(),
            next_user: 1,
            status: status.clone(),
            // Long ago: the first snapshot includes the channels.
            channels_refreshed: tokio::time::Instant::now()
                .checked_sub(Duration::from_secs(1))
                .unwrap_or_else(tokio::time::Instant::now),
            busy: Duration::ZERO,
            ready: Some(ready_tx),
            last_error: last_error.clone(),
            fenced: fenced_tx,
        };
        tokio::spawn(driver.run(cmd_rx));
        Ok((cmd_tx, status, ready_rx, last_error, fenced))
    }

    /// Connects and waits up to `wait` for the first session.
    pub async fn connect(
        addr: impl Into<String>,
        security: ClientSecurity,
        config: ClientConfig,
        wait: Duration,
    ) -> Result<Client, ConnectError> {
        let addr = addr.into();
        let (cmd_tx, status, ready_rx, last_error, fenced) =
            Self::spawn(addr.clone(), security, config)?;
        match tokio::time::timeout(wait, ready_rx).await {
            Ok(Ok(Ok(info))) => Ok(Client {
                cmds: cmd_tx,
                info,
                status,
                fenced,
                last_error,
            }),
            // Refused for good (wrong key, no such export): say so now
            // rather than retry until the wait runs out.
            Ok(Ok(Err(detail))) => {
                let _ = cmd_tx.send(Cmd::Close(oneshot::channel().0)).await;
                Err(ConnectError { addr, detail })
            }
            _ => {
                let detail = last_error.lock().unwrap().clone();
                let _ = cmd_tx.send(Cmd::Close(oneshot::channel().0)).await;
                Err(ConnectError { addr, detail })
            }
        }
    }

    /// A client that does not wait for its server: it returns at once,
    /// taking `expected` as the export's description, and keeps
    /// connecting in the background while its IO waits. For a mirror leg
    /// whose server is down when the volume attaches. If the server, once
    /// reached, describes a different export (or refuses the client for
    /// good), the client closes and its IO fails, so the volume leaves
    /// that leg out.
    pub fn connect_later(
        addr: impl Into<String>,
        security: ClientSecurity,
        config: ClientConfig,
        expected: ExportInfo,
    ) -> Result<Client, ConnectError> {
        let addr = addr.into();
        let export = config.export.clone();
        let (cmd_tx, status, ready_rx, last_error, fenced) =
            Self::spawn(addr.clone(), security, config)?;
        let closer = cmd_tx.clone();
        tokio::spawn(async move {
            let why = match ready_rx.await {
                Ok(Ok(info))
                    if (info.size, info.block_size) == (expected.size, expected.block_size) =>
                {
                    tracing::info!(%addr, export, "reached the server at last");
                    return;
                }
                Ok(Ok(info)) => format!(
                    "its export is {} bytes in {}-byte blocks, the volume expects {} in {}",
                    info.size, info.block_size, expected.size, expected.block_size
                ),
                Ok(Err(detail)) => detail,
                Err(_) => return,
            };
            tracing::error!(%addr, export, why, "leaving this server out");
            let _ = closer.send(Cmd::Close(oneshot::channel().0)).await;
        });
        Ok(Client {
            cmds: cmd_tx,
            info: expected,
            status,
            fenced,
            last_error,
        })
    }

    /// Resolves to true once a server fences this client (a newer run of
    /// its identity took the export over; it has closed for good), or to
    /// false if the client ends otherwise. Holds no part of the client, so
    /// waiting on it keeps nothing open.
    pub fn when_fenced(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let mut fenced = self.fenced.clone();
        async move { fenced.wait_for(|f| *f).await.is_ok() }
    }

    /// Why a channel last went down or the server last refused one
    /// ("no answer yet" before any did): what an operator needs when the
    /// channels are down, e.g. "server refused our key: ...".
    pub fn last_error(&self) -> String {
        self.last_error.lock().unwrap().clone()
    }

    /// The export as the server described it.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// One IO. Waits (rather than fails) through transient faults.
    pub async fn io(&self, io: IoRequest) -> Result<Bytes, IoError> {
        self.enqueue(io).await.await
    }

    /// Hands `io` to the client now and returns what waits for its answer:
    /// IOs enqueued one after another reach the engine in that order (so
    /// overlapping writes apply in it), however their answers are awaited.
    pub async fn enqueue(
        &self,
        io: IoRequest,
    ) -> impl std::future::Future<Output = Result<Bytes, IoError>> + Send + 'static {
        // Only reachable if the driver task is gone (the client was closed).
        let gone = closed_error(&io);
        let (tx, rx) = oneshot::channel();
        let sent = self
            .cmds
            .send(Cmd::Io(io, Reply(Some(ReplyTo::Once(tx)))))
            .await
            .is_ok();
        async move {
            if !sent {
                return Err(gone);
            }
            rx.await.unwrap_or(Err(gone))
        }
    }

    /// Hands `io` to the client with `done` to hear its answer, without a
    /// task waiting for it (a frontend saves a task and a channel per IO).
    /// Order is kept as with [`Client::enqueue`]. If the driver's queue is
    /// full, or the client is gone, both come back: the caller awaits
    /// [`Client::io`] instead.
    pub fn try_io_with(
        &self,
        io: IoRequest,
        done: IoCallback,
    ) -> Result<(), (IoRequest, IoCallback)> {
        let gone = closed_error(&io);
        match self
            .cmds
            .try_send(Cmd::Io(io, Reply(Some(ReplyTo::Call(done, gone)))))
        {
            Ok(()) => Ok(()),
            Err(
                mpsc::error::TrySendError::Full(Cmd::Io(io, mut reply))
                | mpsc::error::TrySendError::Closed(Cmd::Io(io, mut reply)),
            ) => match reply.0.take() {
                Some(ReplyTo::Call(done, _)) => Err((io, done)),
                _ => unreachable!("the callback just put there"),
            },
            Err(_) => unreachable!("only an IO was sent"),
        }
    }

    /// Whether the client has left for good ([`Client::close`] or
    /// [`Client::let_go`] done): its channels are closed and it takes no
    /// more IO.
    pub fn has_left(&self) -> bool {
        self.cmds.is_closed()
    }

    /// A fresh snapshot.
    pub fn status(&self) -> ClientStatus {
        self.status.lock().unwrap().clone()
    }

    /// Applies runtime tuning between two events of the engine: IO in
    /// flight goes on (requests on removed channels move to the others).
    /// Refused values change nothing; the error names the field.
    pub async fn tune(&self, tuning: ClientTuning) -> Result<(), String> {
        self.ask_driver(|reply| Cmd::Tune(tuning, reply)).await?
    }

    /// Authenticates with `key` under `key_id` from the next handshake on
    /// (see [`ClientEngine::set_key`]): channels up stay up.
    pub async fn set_key(&self, key_id: String, key: Key) -> Result<(), String> {
        self.ask_driver(|reply| Cmd::SetKey(key_id, key, reply))
            .await?
    }

    /// Protects connections made from now on with `security` (a CA or
    /// client certificate renewed); connections already secured keep
    /// theirs.
    pub async fn set_security(&self, security: ClientSecurity) -> Result<(), String> {
        self.ask_driver(|reply| Cmd::SetSecurity(security, reply))
            .await
    }

    /// Sends the driver the command `ask` makes around a reply channel,
    /// and waits for the answer.
    async fn ask_driver<T>(
        &self,
        ask: impl FnOnce(oneshot::Sender<T>) -> Cmd,
    ) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        let gone = || "the volume is detaching".to_string();
        self.cmds.send(ask(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Leaves the session for good (the server frees it) once IO in flight
    /// has finished and acknowledged writes are flushed; gives up on the
    /// server after `CLOSE_PATIENCE`.
    pub async fn close(self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Leaves at once, for a session whose data is kept elsewhere (a
    /// volume's retired leg: every byte it held reached its successor):
    /// unfinished IO fails and nothing is flushed. The server hears
    /// GOODBYE if a channel is up, so it frees the session now; if its
    /// server is gone, nothing waits `CLOSE_PATIENCE` on it, and no
    /// warning says writes may be lost.
    pub async fn let_go(self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::LetGo(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Driver {
    engine: ClientEngine,
    /// The paths to the server; channel slot `k` keeps to path `k mod n`
    /// once a session exists.
    endpoints: Vec<Endpoint>,
    security: ClientSecurity,
    clock: Clock,
    writers: HashMap<ChannelId, conn::Writer>,
    waiters: HashMap<u64, Reply>,
    /// Frames the engine emitted, per channel, not yet sent.
    outgoing: conn::Gathered<ChannelId>,
    /// Submissions the engine refused with Busy, retried when it says Room.
    held: VecDeque<(u64, IoRequest)>,
    next_user: u64,
    status: Arc<Mutex<ClientStatus>>,
    channels_refreshed: tokio::time::Instant,
    busy: Duration,
    /// Answers `connect`: the export once a session exists, or why the
    /// server refused us for good.
    ready: Option<oneshot::Sender<Result<ExportInfo, String>>>,
    last_error: Arc<Mutex<String>>,
    /// Told once the engine is fenced.
    fenced: watch::Sender<bool>,
}

/// What woke the driver's task.
enum Woken {
    Alarm,
    Event(Event),
    Conn(ConnEvent<ChannelId>),
    Cmd(Option<Cmd>),
    Send,
}

/// Submissions held beyond the engine's own bound before callers wait.
const HELD_MAX: usize = 64;

/// How long a close waits for IO in flight and the final flush. Long
/// enough to ride out a server restart; an operator detaching from a dead
/// server is told what was given up.
const CLOSE_PATIENCE: Duration = Duration::from_secs(30);

impl Driver {
    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel::<ConnEvent<ChannelId>>();
        self.engine.handle_timeout(self.clock.now());
        // Who waits for the close, and when to stop waiting for the server.
        let mut closing: Option<(oneshot::Sender<()>, tokio::time::Instant)> = None;
        let mut alarm = Alarm::new(&self.clock);
        let mut turn_started: Option<tokio::time::Instant> = None;
        loop {
            self.process(&ev_tx, &conn_tx);
            // Nothing else has come in meanwhile (at low depth, nearly
            // always): the frames leave now rather than after another
            // round of the loop.
            if conn_rx.is_empty() && cmds.is_empty() {
                self.send_gathered();
            }
            crate::check_engine("client", || self.engine.check());
            if let Some((done, give_up_at)) = closing.take() {
                if !self.engine.is_closed() && tokio::time::Instant::now() >= give_up_at {
                    let unflushed = self.engine.abandon(self.clock.now());
                    tracing::warn!(
                        export = %self.engine.config().export,
                        unflushed_bytes = unflushed,
                        "closed without the server: in-flight IO failed, and acknowledged writes \
                         not yet flushed may be lost if the server loses power"
                    );
                    self.process(&ev_tx, &conn_tx);
                }
                if self.engine.is_closed() {
                    self.send_gathered();
                    // Refuse IO before saying closed: whoever hears it may
                    // submit at once and must be told, not queued.
                    cmds.close();
                    let _ = done.send(());
                    return;
                }
                closing = Some((done, give_up_at));
            }
            let mut deadline = self.clock.deadline(self.engine.poll_timeout());
            if let Some((_, give_up_at)) = &closing {
                deadline = deadline.min(*give_up_at);
            }
            alarm.set(deadline);
            let accepting = self.held.len() < HELD_MAX && closing.is_none();
            if let Some(started) = turn_started.take() {
                self.busy += started.elapsed();
            }
            // Biased, in a fixed order, so a seed replays exactly under the
            // simulator (an unbiased select draws from tokio's own RNG):
            // timers first, then what the network and connection tasks
            // said, then new IO. Nothing starves: timers fire only when
            // due, and completions only arrive for IO already submitted.
            let woken = tokio::select! {
                biased;
                _ = alarm.rung() => Woken::Alarm,
                Some(ev) = ev_rx.recv() => Woken::Event(ev),
                Some(ev) = conn_rx.recv() => Woken::Conn(ev),
                cmd = cmds.recv(), if accepting => Woken::Cmd(cmd),
                // Last: frames wait while anything else is ready, so those
                // of IOs submitted together leave together.
                _ = std::future::ready(()), if !self.outgoing.is_empty() => Woken::Send,
            };
            turn_started = Some(tokio::time::Instant::now());
            match woken {
                Woken::Alarm => self.engine.handle_timeout(self.clock.now()),
                Woken::Event(ev) => self.event(ev),
                Woken::Conn(ev) => self.conn_event(ev),
                Woken::Cmd(cmd) => {
                    if let Some(close) = self.command(cmd) {
                        closing = Some(close);
                    }
                }
                Woken::Send => self.send_gathered(),
            }
            while let Ok(ev) = conn_rx.try_recv() {
                self.conn_event(ev);
            }
        }
    }

    /// Carries out a command from the handle (`None`: every handle is
    /// gone, so the client closes); a close it starts: who waits for it,
    /// and when to stop waiting for the server.
    fn command(&mut self, cmd: Option<Cmd>) -> Option<(oneshot::Sender<()>, tokio::time::Instant)> {
        match cmd {
            Some(Cmd::Io(io, reply)) => self.submit(io, reply),
            Some(Cmd::Tune(tuning, reply)) => {
                let result = self
                    .engine
                    .tune(&tuning, self.clock.now())
                    .map_err(|e| e.to_string());
                if result.is_ok() {
                    tracing::info!(?tuning, "volume retuned");
                    self.status.lock().unwrap().tuning = ClientTuning::of(self.engine.config());
                }
                let _ = reply.send(result);
            }
            Some(Cmd::SetKey(key_id, key, reply)) => {
                let result = self
                    .engine
                    .set_key(key_id.clone(), key)
                    .map_err(|e| e.to_string());
                if result.is_ok() {
                    self.status.lock().unwrap().key_id = key_id;
                }
                let _ = reply.send(result);
            }
            Some(Cmd::SetSecurity(security, reply)) => {
                self.security = security;
                let _ = reply.send(());
            }
            Some(Cmd::Close(done)) => return Some(self.start_close(done)),
            Some(Cmd::LetGo(done)) => return Some(self.let_go(done)),
            None => return Some(self.start_close(oneshot::channel().0)),
        }
        None
    }

    /// Starts leaving: IO not yet in the engine fails (its callers see
    /// Closed), the rest finishes and is flushed, for at most
    /// `CLOSE_PATIENCE`.
    fn start_close(
        &mut self,
        done: oneshot::Sender<()>,
    ) -> (oneshot::Sender<()>, tokio::time::Instant) {
        self.drop_held();
        self.engine.close(self.clock.now());
        (done, tokio::time::Instant::now() + CLOSE_PATIENCE)
    }

    /// Leaves now (see [`Client::let_go`]): the close that follows finds
    /// the engine closed and ends at once.
    fn let_go(&mut self, done: oneshot::Sender<()>) -> (oneshot::Sender<()>, tokio::time::Instant) {
        self.drop_held();
        let unflushed = self.engine.abandon(self.clock.now());
        tracing::debug!(
            export = %self.engine.config().export,
            unflushed_bytes = unflushed,
            "let go: its data is kept elsewhere"
        );
        (done, tokio::time::Instant::now())
    }

    /// IO not yet in the engine fails: its callers see Closed.
    fn drop_held(&mut self) {
        for (user, _) in self.held.drain(..) {
            self.waiters.remove(&user);
        }
    }

    fn submit(&mut self, io: IoRequest, reply: Reply) {
        let user = self.next_user;
        self.next_user += 1;
        self.waiters.insert(user, reply);
        // Behind anything already held back, in submission order.
        self.held.push_back((user, io));
        self.retry_held();
    }

    /// Submits held IOs in order until the engine says Busy.
    fn retry_held(&mut self) {
        while let Some((user, io)) = self.held.pop_front() {
            match self.engine.submit(user, io.clone(), self.clock.now()) {
                Ok(()) => {}
                Err(SubmitError::Busy) => {
                    self.held.push_front((user, io));
                    return;
                }
                Err(refused @ (SubmitError::Invalid(_) | SubmitError::Fenced)) => {
                    // A fenced client said so once, when it was fenced.
                    let kind = match refused {
                        SubmitError::Fenced => braid_core::client::IoErrorKind::Fenced,
                        _ => {
                            tracing::warn!(%refused, "IO refused");
                            braid_core::client::IoErrorKind::Invalid
                        }
                    };
                    let err = IoError {
                        kind,
                        export: self.engine.config().export.clone(),
                        op: io.op,
                        offset: io.offset,
                        len: io.len,
                    };
                    if let Some(w) = self.waiters.remove(&user) {
                        w.send(Err(err));
                    }
                }
            }
        }
    }

    fn conn_event(&mut self, ev: ConnEvent<ChannelId>) {
        match ev {
            ConnEvent::Frame(ch, frame) => self.engine.handle_frame(ch, frame, self.clock.now()),
            ConnEvent::Closed(ch, why) => {
                tracing::debug!(%ch, why, "channel connection closed");
                if self.writers.remove(&ch).is_some() {
                    self.engine.channel_failed(ch, why, self.clock.now());
                }
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Up(ch, writer) => {
                self.writers.insert(ch, writer);
                self.engine.channel_connected(ch, self.clock.now());
            }
            Event::Refused(ch, why) => {
                if let Some(tx) = self.ready.take() {
                    let _ = tx.send(Err(why.clone()));
                }
                *self.last_error.lock().unwrap() = why.clone();
                self.engine.channel_failed(ch, why, self.clock.now());
            }
            Event::Failed(ch, why) => {
                *self.last_error.lock().unwrap() = why.clone();
                tracing::debug!(%ch, why, "connect failed");
                self.engine.channel_failed(ch, why, self.clock.now());
            }
        }
    }

    fn process(
        &mut self,
        ev_tx: &mpsc::UnboundedSender<Event>,
        conn_tx: &mpsc::UnboundedSender<ConnEvent<ChannelId>>,
    ) {
        let mut completions = Vec::new();
        let mut room = false;
        loop {
            while let Some(action) = self.engine.poll_action() {
                match action {
                    ClientAction::Connect(ch) => self.connect(ch, ev_tx.clone(), conn_tx.clone()),
                    ClientAction::Close(ch) => {
                        if let Some(w) = self.writers.remove(&ch) {
                            if let Some(frames) = self.outgoing.of(ch) {
                                let _ = w.send_all(frames);
                            }
                            w.close();
                        }
                    }
                    ClientAction::Send(ch, frame) => {
                        if self.writers.contains_key(&ch) {
                            self.outgoing.push(ch, frame);
                        }
                    }
                    ClientAction::Complete(c) => completions.push(c),
                    ClientAction::Notice(n) => self.notice(n),
                    ClientAction::Room => room = true,
                }
            }
            let before = self.held.len();
            if std::mem::take(&mut room) && before > 0 {
                self.retry_held();
            }
            if self.held.len() == before {
                break;
            }
        }
        {
            // The snapshot is fresh before any caller hears of its IO.
            let mut s = self.status.lock().unwrap();
            s.stats.clone_from(self.engine.stats());
            // The channel list allocates: refresh it at most every 100 ms,
            // as the server does its session list, not on every event.
            // A channel going up or down shows at once.
            let ready = self.engine.ready_channels();
            if self.channels_refreshed.elapsed() >= Duration::from_millis(100)
                || s.channels.iter().filter(|c| c.1).count() != ready
            {
                s.channels = self.engine.channel_summary();
                self.channels_refreshed = tokio::time::Instant::now();
            }
            // A fixed-size copy (under a kilobyte): fresh for every scrape.
            s.latency = *self.engine.latency();
            s.journaled = self.engine.journal_len();
            s.dirty_bytes = self.engine.dirty_bytes();
            s.session = self.engine.session();
            s.driver_busy = self.busy;
        }
        if self.engine.is_fenced() {
            self.fenced
                .send_if_modified(|f| !std::mem::replace(f, true));
        }
        for c in completions {
            if let Some(w) = self.waiters.remove(&c.user) {
                w.send(c.result);
            }
        }
    }

    /// Sends each channel's frames gathered since the loop last had
    /// nothing else to do, in one go per channel.
    fn send_gathered(&mut self) {
        for (ch, frames) in self.outgoing.each() {
            if self.writers.get(&ch).is_some_and(|w| !w.send_all(frames)) {
                // Twice the journal's bytes unsent: the connection is
                // stuck (or gone). Fail over.
                let why = "send queue full: the connection is not draining";
                self.engine.channel_failed(ch, why, self.clock.now());
            }
        }
        self.outgoing.clear();
    }

    fn notice(&mut self, n: Notice) {
        match &n {
            Notice::SessionStarted {
                session_id,
                boot_id,
                replaced,
                replay_extents,
            } => {
                tracing::info!(
                    session = format_args!("{session_id:#x}"),
                    boot = format_args!("{boot_id:#x}"),
                    replaced,
                    replay_extents,
                    "session started"
                );
                if let (Some(tx), Some(info)) = (self.ready.take(), self.engine.export_info()) {
                    let _ = tx.send(Ok(info));
                }
            }
            Notice::ChannelUp { ch, .. } => {
                // Paired with "channel down": an operator (and the VM's
                // fault rows) can tell when, and on which path, IO has
                // somewhere to go again.
                let path = self
                    .status
                    .lock()
                    .unwrap()
                    .paths
                    .iter()
                    .find(|(slot, _)| *slot == ch.slot)
                    .map(|(_, path)| path.clone())
                    .unwrap_or_default();
                tracing::info!(%ch, path, "channel up");
            }
            Notice::ChannelDown { ch, reason, moved } => {
                *self.last_error.lock().unwrap() = reason.to_string();
                tracing::info!(%ch, %reason, moved, "channel down");
            }
            Notice::AuthFailed { ch, detail } => {
                *self.last_error.lock().unwrap() = detail.clone();
                tracing::error!(%ch, detail, "authentication failed");
                if let Some(tx) = self.ready.take() {
                    let _ = tx.send(Err(detail.clone()));
                }
            }
            Notice::Rejected { ch, code, message } => {
                let detail = format!("server refused: {code:?}: {message}");
                *self.last_error.lock().unwrap() = detail.clone();
                tracing::error!(%ch, ?code, message, "server refused the channel");
                let for_good =
                    matches!(code, RejectCode::NoSuchExport | RejectCode::VersionMismatch);
                if for_good {
                    if let Some(tx) = self.ready.take() {
                        let _ = tx.send(Err(detail));
                    }
                }
            }
        }
    }

    fn connect(
        &self,
        ch: ChannelId,
        ev_tx: mpsc::UnboundedSender<Event>,
        conn_tx: mpsc::UnboundedSender<ConnEvent<ChannelId>>,
    ) {
        // A channel keeps to its own path once a session exists, so it
        // returns there when a dead path comes back. Before that, each new
        // attempt tries the next path: a session must not wait for the
        // one path that is down.
        let n = self.endpoints.len();
        let path = match self.engine.session() {
            Some(_) => ch.slot as usize % n,
            None => (ch.slot as usize + ch.gen.saturating_sub(1) as usize) % n,
        };
        let endpoint = &self.endpoints[path];
        {
            let mut st = self.status.lock().unwrap();
            st.paths.retain(|(slot, _)| *slot != ch.slot);
            st.paths.push((ch.slot, endpoint.to_string()));
        }
        let addr = endpoint.addr.clone();
        let timeout = self.engine.config().handshake_timeout;
        // Replies carry at most the negotiated payload, never more than the
        // wire format's cap.
        let max_payload = wire::MAX_PAYLOAD_LEN as usize;
        // The engine never has more than its journal's bytes to send; a
        // channel queueing twice that is stuck, and closing it fails over.
        let cfg = self.engine.config();
        let queue_limit = 2
            * (cfg.max_journal_bytes as usize
                + cfg.max_queued * (wire::PREFIX_LEN + wire::MAX_BODY_LEN));
        if let Some(scheme) = &endpoint.scheme {
            let dialer = fabric::dialer(scheme).expect("checked when the address was read");
            let dialing = dialer.dial(&addr, ch, queue_limit, conn_tx);
            let shown = endpoint.to_string();
            tokio::spawn(async move {
                let ev = match tokio::time::timeout(timeout, dialing).await {
                    Ok(Ok(writer)) => Event::Up(ch, writer),
                    Ok(Err(e)) => Event::Failed(ch, format!("connect {shown}: {e}")),
                    Err(_) => Event::Failed(ch, format!("connect {shown}: timed out")),
                };
                let _ = ev_tx.send(ev);
            });
            return;
        }
        let security = self.security.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let frames = wire::FrameReader::new(max_payload);
                    let writer = match security {
                        #[cfg(not(madsim))]
                        ClientSecurity::Plain => {
                            conn::spawn_tcp(stream, ch, frames, queue_limit, conn_tx)
                        }
                        #[cfg(madsim)]
                        ClientSecurity::Plain => {
                            conn::spawn(stream, ch, frames, queue_limit, conn_tx)
                        }
                        #[cfg(feature = "tls")]
                        ClientSecurity::Tls(connector, name) => {
                            match tokio::time::timeout(timeout, connector.connect(name, stream))
                                .await
                            {
                                Ok(Ok(tls)) => conn::spawn(tls, ch, frames, queue_limit, conn_tx),
                                Ok(Err(e)) => {
                                    // A certificate problem does not fix itself.
                                    let why = format!("TLS with {addr}: {e}");
                                    let _ = ev_tx.send(Event::Refused(ch, why));
                                    return;
                                }
                                Err(_) => {
                                    let _ = ev_tx.send(Event::Failed(
                                        ch,
                                        format!("TLS with {addr}: timed out"),
                                    ));
                                    return;
                                }
                            }
                        }
                    };
                    let _ = ev_tx.send(Event::Up(ch, writer));
                }
                Ok(Err(e)) => {
                    let _ = ev_tx.send(Event::Failed(ch, format!("connect {addr}: {e}")));
                }
                Err(_) => {
                    let _ = ev_tx.send(Event::Failed(ch, format!("connect {addr}: timed out")));
                }
            }
        });
    }
}
