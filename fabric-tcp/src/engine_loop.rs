//! One engine's task: it waits for whatever comes next (a timer, a new
//! connection, a frame, a finished backend operation), hands it to its
//! [`ServerEngine`], and carries out what the engine asks.

use crate::clock::{Alarm, Clock};
use crate::conn::{self, ConnEvent};
use crate::engines::{Accepted, Handoff};
use crate::server::{key_ids, EngineLoad, Event, ServerStatus};
use crate::ServerSecurity;
use braid_core::server::{
    Backend, BackendOp, BackendRequest, ConnId, ServerAction, ServerEngine, ServerTuning,
};
use braid_core::wire::{FileSlice, FrameReader};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Unsent reply bytes one connection may hold before the server decides
/// its peer stopped reading (a few max-size replies in flight, with room).
const SEND_QUEUE_MAX: usize = 64 << 20;
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

/// One engine's task: what it needs to start.
pub(crate) struct EngineLoop {
    pub(crate) index: usize,
    pub(crate) count: usize,
    pub(crate) engine: ServerEngine,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) security: ServerSecurity,
    pub(crate) max_payload: usize,
    pub(crate) events: (mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>),
    pub(crate) conns: (
        mpsc::UnboundedSender<ConnEvent<ConnId>>,
        mpsc::UnboundedReceiver<ConnEvent<ConnId>>,
    ),
    pub(crate) status: Arc<Mutex<ServerStatus>>,
    /// Each engine's session count, when there are several.
    pub(crate) session_counts: Option<Arc<[AtomicUsize]>>,
}

/// Runs one engine until `shutdown`, then until its backend operations
/// have finished and their replies gone out. Accepts from `listener` when
/// given one (the server's only engine).
pub(crate) async fn run_engine(
    setup: EngineLoop,
    listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut run = EngineRun::new(setup);
    tokio::pin!(shutdown);
    loop {
        let woken = run.wait(listener.as_ref(), shutdown.as_mut()).await;
        if let Woken::Accepted(Err(e)) = &woken {
            // Out of descriptors and the like: keep serving the sessions
            // we have, try again shortly.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        run.turn(woken);
        if run.drained() {
            // Let the writers flush their last replies.
            tokio::task::yield_now().await;
            return Ok(());
        }
    }
}

/// One engine's task while it runs: the engine, its connections' writers,
/// and the replies gathered for them.
struct EngineRun {
    index: usize,
    engine: ServerEngine,
    backend: Arc<dyn Backend>,
    security: ServerSecurity,
    max_payload: usize,
    events: mpsc::UnboundedSender<Event>,
    events_in: mpsc::UnboundedReceiver<Event>,
    conns: mpsc::UnboundedSender<ConnEvent<ConnId>>,
    conns_in: mpsc::UnboundedReceiver<ConnEvent<ConnId>>,
    status: Arc<Mutex<ServerStatus>>,
    session_counts: Option<Arc<[AtomicUsize]>>,
    clock: Clock,
    alarm: Alarm,
    writers: HashMap<ConnId, conn::Writer>,
    /// Connections whose writer sends file payloads with `sendfile`.
    file_conns: HashSet<ConnId>,
    /// Each engine numbers its connections apart from the others': from
    /// its index up, in steps of the engine count.
    next_conn: ConnId,
    conn_step: ConnId,
    draining: bool,
    /// When the session list was last published, and the counts it had.
    listed: (tokio::time::Instant, (usize, usize)),
    completions: Option<crate::completions::Completions>,
    readiness: Option<crate::completions::Readiness>,
    replies: conn::Gathered<ConnId>,
    busy: std::time::Duration,
    turns: u64,
}

impl EngineRun {
    fn new(setup: EngineLoop) -> EngineRun {
        let EngineLoop {
            index,
            count,
            engine,
            backend,
            security,
            max_payload,
            events: (events, events_in),
            conns: (conns, conns_in),
            status,
            session_counts,
        } = setup;
        let clock = Clock::new();
        let (completions, readiness) = crate::completions::Completions::open(&*backend).unzip();
        EngineRun {
            index,
            engine,
            backend,
            security,
            max_payload,
            events,
            events_in,
            conns,
            conns_in,
            status,
            session_counts,
            alarm: Alarm::new(&clock),
            clock,
            writers: HashMap::new(),
            file_conns: HashSet::new(),
            next_conn: index as ConnId + 1,
            conn_step: count as ConnId,
            draining: false,
            listed: (tokio::time::Instant::now(), (0, 0)),
            completions,
            readiness,
            replies: conn::Gathered::new(),
            busy: std::time::Duration::ZERO,
            turns: 0,
        }
    }

    /// Waits for the next thing to do.
    async fn wait(
        &mut self,
        listener: Option<&TcpListener>,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Woken {
        crate::check_engine("server", || self.engine.check());
        self.alarm
            .set(self.clock.deadline(self.engine.poll_timeout()));
        // Biased, in a fixed order, so a seed replays exactly under the
        // simulator: timers (only when due), new connections (rare, and
        // never kept waiting behind a busy client), shutdown, finished
        // backend operations, then frames. Frames cannot starve:
        // everything ahead of them is bounded by them.
        tokio::select! {
            biased;
            _ = self.alarm.rung() => Woken::Alarm,
            accepted = accept_on(listener), if !self.draining && listener.is_some() => {
                Woken::Accepted(accepted)
            }
            _ = &mut shutdown, if !self.draining => Woken::Shutdown,
            Some(ev) = self.events_in.recv() => Woken::Event(ev),
            _ = crate::completions::ready(self.readiness.as_ref()) => Woken::Completions,
            Some(ev) = self.conns_in.recv() => Woken::Conn(ev),
            // Last: replies wait while anything else is ready, so those
            // of requests read together leave together.
            _ = std::future::ready(()), if !self.replies.is_empty() => Woken::Replies,
        }
    }

    /// One turn: what woke the task, whatever else has come in since, the
    /// engine's actions, and the replies out.
    fn turn(&mut self, woken: Woken) {
        let started = tokio::time::Instant::now();
        self.turns += 1;
        if let Some(counts) = &self.session_counts {
            let elsewhere = counts
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != self.index)
                .map(|(_, n)| n.load(Ordering::Relaxed))
                .sum();
            self.engine.set_sessions_elsewhere(elsewhere);
        }
        match woken {
            Woken::Alarm => self.engine.handle_timeout(self.clock.now()),
            Woken::Accepted(Ok((stream, peer))) => self.accepted(stream, peer),
            Woken::Accepted(Err(_)) | Woken::Completions => {}
            Woken::Shutdown => {
                tracing::info!(
                    inflight = self.engine.backend_inflight(),
                    "shutting down: draining backend operations"
                );
                self.draining = true;
            }
            Woken::Event(ev) => self.handle_event(ev),
            Woken::Conn(ev) => self.handle_conn(ev),
            Woken::Replies => self.send_replies(),
        }
        if let Some(c) = self.completions.as_mut() {
            let (engine, clock) = (&mut self.engine, &self.clock);
            c.collect(&mut |token, result| engine.backend_complete(token, result, clock.now()));
        }
        while let Ok(ev) = self.conns_in.try_recv() {
            self.handle_conn(ev);
        }
        while let Ok(ev) = self.events_in.try_recv() {
            self.handle_event(ev);
        }
        while let Some(action) = self.engine.poll_action() {
            self.carry_out(action);
        }
        // Nothing else has come in meanwhile (at low depth, nearly
        // always): the replies leave now rather than after another round
        // of the loop.
        if self.conns_in.is_empty() && self.events_in.is_empty() {
            self.send_replies();
        }
        if let Some(c) = self.completions.as_mut() {
            c.submit();
        }
        self.busy += started.elapsed();
        publish_status(
            &self.status,
            &self.engine,
            (self.busy, self.turns),
            &mut self.listed,
        );
        if let Some(counts) = &self.session_counts {
            counts[self.index].store(self.engine.session_count(), Ordering::Relaxed);
        }
    }

    /// Once shutting down and every backend operation has finished: sends
    /// the last replies, closes every connection and says so.
    fn drained(&mut self) -> bool {
        if !self.draining || self.engine.backend_inflight() != 0 {
            return false;
        }
        self.send_replies();
        for (_, w) in self.writers.drain() {
            w.close();
        }
        true
    }

    fn accepted(&mut self, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let conn = self.next_conn();
        tracing::debug!(conn, %peer, "connection accepted");
        self.engine.connection_opened(conn, self.clock.now());
        match &self.security {
            ServerSecurity::Plain => {
                let handoff = Handoff {
                    stream: Accepted::Plain(stream),
                    frames: FrameReader::new(self.max_payload),
                };
                self.start_conn(conn, handoff);
            }
            #[cfg(feature = "tls")]
            ServerSecurity::Tls(acceptor) => {
                // Off the engine loop: a slow or hostile TLS handshake
                // holds up nobody else.
                tokio::spawn(secure(
                    acceptor.clone(),
                    stream,
                    conn,
                    self.engine.config().handshake_timeout,
                    FrameReader::new(self.max_payload),
                    (self.events.clone(), self.conns.clone()),
                ));
            }
        }
    }

    fn next_conn(&mut self) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += self.conn_step;
        conn
    }

    /// Starts the reader and writer of a connection this engine now
    /// serves (the engine has been told it opened).
    fn start_conn(&mut self, conn: ConnId, handoff: Handoff) {
        let Handoff { stream, frames } = handoff;
        let conns = self.conns.clone();
        let writer = match stream {
            #[cfg(not(madsim))]
            Accepted::Plain(stream) => {
                self.file_conns.insert(conn);
                conn::spawn_tcp(stream, conn, frames, SEND_QUEUE_MAX, conns)
            }
            #[cfg(madsim)]
            Accepted::Plain(stream) => conn::spawn(stream, conn, frames, SEND_QUEUE_MAX, conns),
            #[cfg(feature = "tls")]
            Accepted::Tls(tls) => conn::spawn(*tls, conn, frames, SEND_QUEUE_MAX, conns),
        };
        self.writers.insert(conn, writer);
    }

    fn handle_event(&mut self, ev: Event) {
        let now = self.clock.now();
        match ev {
            Event::BackendDone(token, result) => self.engine.backend_complete(token, result, now),
            Event::Secured(conn, writer) => {
                self.writers.insert(conn, writer);
            }
            // Stopping: the connection is dropped unstarted.
            Event::Adopt(_) | Event::Handoff(_) if self.draining => {}
            Event::Adopted(_, writer, _) if self.draining => writer.close(),
            Event::Adopt(start) => {
                let conn = self.next_conn();
                tracing::debug!(conn, "connection adopted from another fabric");
                self.engine.connection_opened(conn, now);
                self.writers.insert(conn, start(conn, self.conns.clone()));
            }
            Event::Handoff(handoff) => {
                let handoff = match handoff.rehomed() {
                    Ok(h) => h,
                    Err(e) => return tracing::warn!(error = %e, "cannot take over a connection"),
                };
                let conn = self.next_conn();
                tracing::debug!(conn, "connection handed over by the acceptor");
                self.engine.connection_opened(conn, now);
                self.start_conn(conn, handoff);
            }
            Event::Adopted(conn, writer, first) => {
                tracing::debug!(conn, "adopted connection handed over");
                self.engine.connection_opened(conn, now);
                self.writers.insert(conn, writer);
                self.engine.handle_frame(conn, first, now);
            }
            Event::SetKeys(keys, reply) => {
                let result = self.engine.set_keys(keys, now).map_err(|e| e.to_string());
                self.status.lock().unwrap().key_ids = key_ids(self.engine.config());
                let _ = reply.send(result);
            }
            Event::Tune(tuning, reply) => {
                let result = self.engine.tune(&tuning).map_err(|e| e.to_string());
                if result.is_ok() {
                    tracing::info!(?tuning, "server retuned");
                    self.status.lock().unwrap().tuning = ServerTuning::of(self.engine.config());
                }
                let _ = reply.send(result);
            }
        }
    }

    fn handle_conn(&mut self, ev: ConnEvent<ConnId>) {
        let now = self.clock.now();
        match ev {
            ConnEvent::Frame(conn, frame) => self.engine.handle_frame(conn, frame, now),
            ConnEvent::Closed(_, why)
                if why.starts_with("bad frame")
                    && self.engine.config().defect
                        == Some(braid_core::server::Defect::KeepBadFrames) => {}
            ConnEvent::Closed(conn, why) => {
                tracing::debug!(conn, why, "connection closed");
                self.forget(conn);
            }
        }
    }

    /// A connection that is gone: the engine hears of it.
    fn forget(&mut self, conn: ConnId) {
        self.writers.remove(&conn);
        self.file_conns.remove(&conn);
        self.engine.connection_closed(conn, self.clock.now());
    }

    fn carry_out(&mut self, action: ServerAction) {
        match action {
            ServerAction::Send { conn, mut frame } => {
                if frame.file_payload().is_some() && !self.file_conns.contains(&conn) {
                    // The engine routes a reply where `file_reply_conn`
                    // said it would; should that ever be another kind of
                    // link, the bytes go through memory.
                    if let Err(e) = conn::fill_file_payload(&mut frame) {
                        tracing::warn!(conn, error = %e, "cannot send a reply");
                        return;
                    }
                }
                if self.writers.contains_key(&conn) {
                    self.replies.push(conn, frame);
                }
            }
            ServerAction::Close { conn, reason } => {
                tracing::debug!(conn, ?reason, "closing connection");
                if let Some(w) = self.writers.remove(&conn) {
                    if let Some(frames) = self.replies.of(conn) {
                        let _ = w.send_all(frames);
                    }
                    w.close();
                }
                self.file_conns.remove(&conn);
            }
            ServerAction::Backend(req) => self.start_backend_op(req),
        }
    }

    /// Starts request `req`'s backend operation the cheapest way it can
    /// run: with the simulator's latency, straight from the file into the
    /// reply, at once where nothing blocks, on io_uring, or on the pool.
    fn start_backend_op(&mut self, req: BackendRequest) {
        let backend = &self.backend;
        if let Some(delay) = backend.latency(req.export, &req.op) {
            let (backend, events) = (backend.clone(), self.events.clone());
            let reported = backend.completion_delay(req.export, &req.op);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let result = backend.execute(req.export, &req.op);
                if !reported.is_zero() {
                    tokio::time::sleep(reported).await;
                }
                let _ = events.send(Event::BackendDone(req.token, result));
            });
            return;
        }
        if let Some((data, crc)) = file_reply(&self.engine, &req, &**backend, &self.file_conns) {
            self.engine
                .backend_complete_from_file(req.token, data, crc, self.clock.now());
            return;
        }
        // Cached reads and unthrottled writes finish here and now;
        // anything that might block goes to the pool.
        if let Some(result) = backend.try_execute_now(req.export, &req.op) {
            self.engine
                .backend_complete(req.token, result, self.clock.now());
            return;
        }
        let op = match self.completions.as_mut() {
            Some(c) => match c.start(req.export, req.op, req.token) {
                Ok(()) => return,
                Err(op) => op,
            },
            None => req.op,
        };
        let (backend, events) = (backend.clone(), self.events.clone());
        let (export, token) = (req.export, req.token);
        tokio::task::spawn_blocking(move || {
            let result = backend.execute(export, &op);
            let _ = events.send(Event::BackendDone(token, result));
        });
    }

    /// Sends each connection's replies gathered since the loop last had
    /// nothing else to do, in one go per connection. A connection refusing
    /// them (its peer stopped reading: they would pile up here) is closed,
    /// and its client resends elsewhere.
    fn send_replies(&mut self) {
        for (conn, frames) in self.replies.each() {
            let Some(w) = self.writers.get(&conn) else {
                continue;
            };
            if !w.send_all(frames) {
                tracing::warn!(
                    conn,
                    "closing a connection that stopped reading its replies"
                );
                w.close();
                self.writers.remove(&conn);
                self.file_conns.remove(&conn);
                self.engine.connection_closed(conn, self.clock.now());
            }
        }
        self.replies.clear();
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
