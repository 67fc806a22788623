//! The server engine: handshakes and authentication, sessions over many
//! channels, exactly-once execution, and validation. Backend IO leaves as
//! [`BackendRequest`] actions and comes back through
//! [`ServerEngine::backend_complete`].

mod backend;
mod config;
mod defect;
mod keys;
mod overlap;
mod session;
mod shard;
mod tuning;

pub use backend::{Backend, Extent, IoQueue, MappedRange, MappedSink, MappedWindow, SpliceSource};
pub use config::{ExportConfig, ServerConfig};
pub use defect::Defect;
pub use keys::KeyChange;
pub use session::ConnId;
pub use shard::{engine_for, engine_for_frame};
pub use tuning::ServerTuning;

use crate::auth::{self, NONCE_LEN};
use crate::latency::OpLatency;
use crate::limits::ConfigError;
use crate::rng::SecretRng;
use crate::wire::{self, *};
use crate::Instant;
use bytes::Bytes;
use overlap::OverlapGate;
use session::{Admission, Session};
use shard::Shard;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Identifies one backend operation until it completes.
pub type OpToken = u64;

/// A backend operation to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendOp {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Bytes,
        /// Durable before completion.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Deallocate; the range must read back as zeroes.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
        /// Durable before completion.
        fua: bool,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
        /// Durable before completion.
        fua: bool,
        /// The range may be deallocated.
        may_unmap: bool,
        /// Fail with [`Status::Unsupported`] rather than fall back to
        /// writing zero blocks (NBD's FAST_ZERO: the caller would rather
        /// copy the data itself than wait for a slow zeroing).
        fast_only: bool,
    },
}

/// A backend operation and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRequest {
    /// Pass back to [`ServerEngine::backend_complete`].
    pub token: OpToken,
    /// Index into [`ServerConfig::exports`].
    pub export: usize,
    /// What to do.
    pub op: BackendOp,
    /// The session that asked.
    pub session_id: u64,
    /// The request id within that session.
    pub request_id: u64,
}

/// Why the engine closes a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// A frame failed to decode.
    BadFrame(DecodeError),
    /// A message not allowed in the connection's state.
    ProtocolViolation(&'static str),
    /// The handshake was refused (the Reject frame precedes the close).
    Rejected(RejectCode),
    /// No handshake within the timeout.
    HandshakeTimeout,
    /// Silent past the idle timeout.
    Idle,
    /// The session ended (Goodbye or expiry).
    SessionEnded,
    /// A newer run of the session's client opened a session on the export.
    Fenced,
    /// The key the channel authenticated with is no longer one the server
    /// holds (see [`ServerEngine::set_keys`]).
    KeyRevoked,
}

/// What the driver must do next.
#[derive(Debug, Clone)]
pub enum ServerAction {
    /// Send this frame on the connection.
    Send {
        /// Where.
        conn: ConnId,
        /// What.
        frame: OutFrame,
    },
    /// Send whatever is queued for the connection, then close it.
    Close {
        /// Which.
        conn: ConnId,
        /// Why (for logs).
        reason: CloseReason,
    },
    /// Perform a backend operation.
    Backend(BackendRequest),
}

/// A session as status output shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    /// Session id.
    pub id: u64,
    /// Export name.
    pub export: String,
    /// Channels bound to it now.
    pub channels: usize,
    /// Request results remembered for exactly-once answers.
    pub cached_results: usize,
    /// Backend operations running for it.
    pub backend_inflight: usize,
    /// No channel left; kept for its client to come back.
    pub orphaned: bool,
}

/// Counters for `braid status` and the simulator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Handshakes refused for a bad key or proof.
    pub auth_failures: u64,
    /// Sessions created.
    pub sessions_created: u64,
    /// Sessions whose state was freed.
    pub sessions_freed: u64,
    /// Requests received (every copy).
    pub requests: u64,
    /// Backend operations issued.
    pub backend_ops: u64,
    /// Requests admitted with FUA (durable before their answer).
    pub fua_requests: u64,
    /// Resent requests answered from the result cache.
    pub recorded_replies: u64,
    /// Resent requests joined to one still executing.
    pub joined: u64,
    /// Stale copies dropped (id below the client's floor).
    pub stale_dropped: u64,
    /// Requests whose payload failed its checksum (answered Corrupt).
    pub corrupt_payloads: u64,
    /// Connections closed for bad frames or protocol violations.
    pub protocol_errors: u64,
    /// Requests answered with an error status.
    pub error_replies: u64,
    /// Sessions ended because a newer run of their client (a higher
    /// epoch of the same owner) opened a session on the export.
    pub sessions_fenced: u64,
    /// Requests dropped because their session already had twice
    /// `max_inflight` executing (the client resends them).
    pub overload_dropped: u64,
    /// Read replies whose data went from the page cache to the socket
    /// without a copy through the server (`sendfile`).
    pub file_replies: u64,
    /// Channels closed because the key they authenticated with was
    /// withdrawn or replaced.
    pub channels_revoked: u64,
}

impl ServerStats {
    /// Adds `other`'s counts (another engine's, for one view of a server
    /// that runs several).
    pub fn add(&mut self, other: &ServerStats) {
        // Destructured, so a counter added later cannot be left out.
        let ServerStats {
            connections,
            handshakes,
            auth_failures,
            sessions_created,
            sessions_freed,
            requests,
            backend_ops,
            fua_requests,
            recorded_replies,
            joined,
            stale_dropped,
            corrupt_payloads,
            protocol_errors,
            error_replies,
            sessions_fenced,
            overload_dropped,
            file_replies,
            channels_revoked,
        } = other;
        self.connections += connections;
        self.handshakes += handshakes;
        self.auth_failures += auth_failures;
        self.sessions_created += sessions_created;
        self.sessions_freed += sessions_freed;
        self.requests += requests;
        self.backend_ops += backend_ops;
        self.fua_requests += fua_requests;
        self.recorded_replies += recorded_replies;
        self.joined += joined;
        self.stale_dropped += stale_dropped;
        self.corrupt_payloads += corrupt_payloads;
        self.protocol_errors += protocol_errors;
        self.error_replies += error_replies;
        self.sessions_fenced += sessions_fenced;
        self.overload_dropped += overload_dropped;
        self.file_replies += file_replies;
        self.channels_revoked += channels_revoked;
    }
}

#[derive(Debug)]
enum ConnState {
    AwaitHello,
    AwaitAuth {
        hello: Hello,
        export: usize,
        server_nonce: [u8; NONCE_LEN],
    },
    /// Authenticated, creating a session whose owner's older sessions
    /// were fenced and still have operations in the backend: welcomed
    /// once they finish, so nothing of the old run lands after the new
    /// run's first request.
    AwaitFence {
        hello: Hello,
        export: usize,
    },
    Bound {
        session_id: u64,
    },
    Closed,
}

#[derive(Debug)]
struct Conn {
    state: ConnState,
    last_rx: Instant,
    /// The key its HELLO named, once the server held that key: a channel
    /// is closed when the key is withdrawn (see [`ServerEngine::set_keys`]).
    key_id: Option<String>,
}

/// A server timer. Each is armed where its state begins and checked
/// again when it fires (a connection that spoke since, a session that was
/// joined again), so the table never needs updating on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The connection must have finished its handshake.
    Handshake(ConnId),
    /// The bound connection must have spoken since.
    Idle(ConnId),
    /// The orphaned session's linger is over.
    Linger(u64),
}

/// A finished read's data: in memory, or in a file with its checksum.
enum ReadData {
    Memory(Bytes),
    File(wire::FileSlice, u32),
}

#[derive(Debug, Clone)]
struct OpInfo {
    session_id: u64,
    request_id: u64,
    op: Op,
    export: usize,
    mutation_range: Option<(u64, u64)>,
    /// When the request was admitted (its wait at the overlap gate counts).
    issued_at: Instant,
    /// The request was answered before (a read resent): see `on_request`.
    asked_again: bool,
}

/// The sans-IO server.
#[derive(Debug)]
pub struct ServerEngine {
    config: ServerConfig,
    rng: SecretRng,
    conns: BTreeMap<ConnId, Conn>,
    sessions: BTreeMap<u64, Session>,
    ops: BTreeMap<OpToken, OpInfo>,
    gates: Vec<OverlapGate<BackendRequest>>,
    next_token: OpToken,
    actions: VecDeque<ServerAction>,
    stats: ServerStats,
    /// Per export, per operation: from admission to the backend's answer.
    latency: Vec<OpLatency>,
    /// The highest `max_sessions` and `max_channels_per_session` ever in
    /// force: what `check()` may see after tuning lowered them.
    admitted_limits: (usize, usize),
    timers: BTreeSet<(Instant, Timer)>,
    /// Where this engine sits among its server's (see [`engine_for`]).
    shard: Shard,
    /// Sessions the server's other engines hold, as their driver last
    /// said: `max_sessions` bounds the server, not each engine.
    sessions_elsewhere: usize,
}

impl ServerEngine {
    /// A server with no connections yet, if `config` is sound.
    pub fn new(config: ServerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let gates = config
            .exports
            .iter()
            .map(|_| OverlapGate::default())
            .collect();
        let latency = vec![OpLatency::default(); config.exports.len()];
        let admitted_limits = (config.max_sessions, config.max_channels_per_session);
        Ok(ServerEngine {
            rng: SecretRng::new(config.rng_seed),
            config,
            conns: BTreeMap::new(),
            sessions: BTreeMap::new(),
            ops: BTreeMap::new(),
            gates,
            next_token: 1,
            actions: VecDeque::new(),
            stats: ServerStats::default(),
            latency,
            admitted_limits,
            timers: BTreeSet::new(),
            shard: Shard::ALONE,
            sessions_elsewhere: 0,
        })
    }

    /// `count` engines of one configuration, for a server that runs
    /// several (its driver tells each its place with
    /// [`ServerEngine::set_shard`]).
    pub fn several(config: &ServerConfig, count: usize) -> Result<Vec<Self>, ConfigError> {
        (0..count).map(|_| Self::new(config.clone())).collect()
    }

    /// Makes this engine number `index` of `count` serving one server:
    /// it then creates only sessions whose ids [`engine_for`] routes back
    /// to it. Call before the first connection.
    pub fn set_shard(&mut self, index: usize, count: usize) {
        assert!(index < count, "engine {index} of {count}");
        assert!(self.sessions.is_empty(), "set_shard after sessions exist");
        self.shard = Shard {
            index: index as u64,
            count: count as u64,
        };
        // Engines built from one configuration must not hand out the same
        // nonces: a handshake recorded on one would replay on another.
        let stream = u16::try_from(index).expect("fewer than 65536 engines");
        self.rng = SecretRng::stream(self.config.rng_seed, stream);
    }

    /// Tells the engine how many sessions the server's other engines hold
    /// now, so that a new session past `max_sessions` for the whole server
    /// is refused. Engines running at once can each admit one before
    /// hearing of the other's: the bound may be passed by one session per
    /// engine for as long as that takes.
    pub fn set_sessions_elsewhere(&mut self, sessions: usize) {
        self.sessions_elsewhere = sessions;
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Applies `tuning` if the configuration it makes is sound (else
    /// nothing changes and the error names the field). Shorter idle and
    /// linger timers take effect at once.
    pub fn tune(&mut self, tuning: &ServerTuning) -> Result<(), ConfigError> {
        let next = tuning.applied_to(&self.config);
        next.validate()?;
        self.config = next;
        self.admitted_limits.0 = self.admitted_limits.0.max(self.config.max_sessions);
        self.admitted_limits.1 = self
            .admitted_limits
            .1
            .max(self.config.max_channels_per_session);
        for (&conn, c) in &self.conns {
            if matches!(c.state, ConnState::Bound { .. }) {
                let at = c.last_rx + self.config.idle_timeout;
                self.timers.insert((at, Timer::Idle(conn)));
            }
        }
        for (&id, s) in &self.sessions {
            if let (Some(since), 0) = (s.orphaned_since, s.ops_in_backend) {
                let at = since + self.config.session_linger;
                self.timers.insert((at, Timer::Linger(id)));
            }
        }
        Ok(())
    }

    /// Counters so far.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Per export (in configuration order), per operation: from admitting
    /// a request to the backend's answer (a wait at the overlap gate
    /// included).
    pub fn latency(&self) -> &[OpLatency] {
        &self.latency
    }

    /// Live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// One line per session for status output.
    pub fn sessions(&self) -> Vec<SessionSummary> {
        self.sessions
            .values()
            .map(|s| SessionSummary {
                id: s.id,
                export: self.config.exports[s.export].name.clone(),
                channels: s.conns.len(),
                cached_results: s.cached(),
                backend_inflight: s.ops_in_backend,
                orphaned: s.orphaned_since.is_some(),
            })
            .collect()
    }

    /// Total cached request results across sessions (bounded by
    /// sessions × id window).
    pub fn cached_results(&self) -> usize {
        self.sessions.values().map(Session::cached).sum()
    }

    /// Backend operations not yet completed.
    pub fn backend_inflight(&self) -> usize {
        self.ops.len()
    }

    /// Verifies the engine's internal invariants: each session's backend
    /// count is exactly its operations in the backend, every executing
    /// request has its operation, connections and sessions point at each
    /// other, the overlap gates hold exactly the mutations in the backend,
    /// and every bound holds. O(state); simulators call it after every step.
    pub fn check(&self) -> Result<(), String> {
        // Lowering a limit at run time leaves what it already admitted.
        let (max_sessions, max_channels) = self.admitted_limits;
        if self.sessions.len() > max_sessions {
            return Err(format!(
                "{} sessions, max_sessions has been at most {max_sessions}",
                self.sessions.len(),
            ));
        }
        if let Some(id) = self.sessions.keys().find(|&&id| !self.shard.owns(id)) {
            return Err(format!(
                "session {id:#x} is on engine {} of {}, which its id does not name",
                self.shard.index, self.shard.count
            ));
        }
        let in_backend: BTreeSet<(u64, u64)> = self
            .ops
            .values()
            .map(|o| (o.session_id, o.request_id))
            .collect();
        for s in self.sessions.values() {
            s.check(self.config.id_window)?;
            let ops = self.ops.values().filter(|o| o.session_id == s.id).count();
            if ops != s.ops_in_backend {
                return Err(format!(
                    "session {:#x}: ops_in_backend is {}, the backend has {ops}",
                    s.id, s.ops_in_backend
                ));
            }
            if let Some(id) = s
                .in_progress()
                .find(|id| !in_backend.contains(&(s.id, *id)))
            {
                return Err(format!(
                    "session {:#x}: request {id} in progress with nothing in the backend",
                    s.id
                ));
            }
            if s.conns.len() > max_channels {
                return Err(format!("session {:#x}: {} channels", s.id, s.conns.len()));
            }
            for c in &s.conns {
                match self.conns.get(c).map(|c| &c.state) {
                    Some(ConnState::Bound { session_id }) if *session_id == s.id => {}
                    other => {
                        return Err(format!(
                            "session {:#x} lists conn {c}, which is {other:?}",
                            s.id
                        ))
                    }
                }
            }
        }
        for (id, c) in &self.conns {
            if let ConnState::Bound { session_id } = c.state {
                if !self
                    .sessions
                    .get(&session_id)
                    .is_some_and(|s| s.conns.contains(id))
                {
                    return Err(format!(
                        "conn {id} bound to session {session_id:#x}, which does not list it"
                    ));
                }
            }
        }
        // A channel past its challenge speaks with a key the server holds:
        // withdrawing a key closes the channels that used it.
        for (id, c) in &self.conns {
            if matches!(
                c.state,
                ConnState::AwaitFence { .. } | ConnState::Bound { .. }
            ) && !c
                .key_id
                .as_ref()
                .is_some_and(|k| self.config.keys.iter().any(|(held, _)| held == k))
            {
                return Err(format!(
                    "conn {id} in {:?} authenticated with key {:?}, which the server does not hold",
                    c.state, c.key_id
                ));
            }
        }
        // Every state a timer guards has its timer (else a silent
        // connection or an abandoned session would stay forever).
        let armed: BTreeSet<Timer> = self.timers.iter().map(|(_, t)| *t).collect();
        for (id, c) in &self.conns {
            let needs = match c.state {
                ConnState::AwaitHello
                | ConnState::AwaitAuth { .. }
                | ConnState::AwaitFence { .. } => Some(Timer::Handshake(*id)),
                ConnState::Bound { .. } => Some(Timer::Idle(*id)),
                ConnState::Closed => None,
            };
            if let Some(t) = needs.filter(|t| !armed.contains(t)) {
                return Err(format!("conn {id} in {:?} has no {t:?} timer", c.state));
            }
        }
        for s in self.sessions.values() {
            if s.orphaned_since.is_some()
                && s.ops_in_backend == 0
                && !armed.contains(&Timer::Linger(s.id))
            {
                return Err(format!("orphaned session {:#x} has no linger timer", s.id));
            }
        }
        for (id, c) in &self.conns {
            if let ConnState::AwaitFence { hello, export } = &c.state {
                if !self.fence_draining(hello.owner, *export) {
                    return Err(format!("conn {id} waits for a fence with nothing draining"));
                }
            }
        }
        for s in self.sessions.values() {
            if s.fenced && !s.leaving {
                return Err(format!("fenced session {:#x} is not leaving", s.id));
            }
        }
        if let Some(o) = self
            .ops
            .values()
            .find(|o| !self.sessions.contains_key(&o.session_id))
        {
            return Err(format!("backend op of freed session {:#x}", o.session_id));
        }
        let gated = !self.config.sabotage_no_overlap_gate;
        for (export, gate) in self.gates.iter().enumerate().filter(|_| gated) {
            let (running, waiting) = gate.census();
            let mut admitted = 0;
            for token in running {
                admitted += 1;
                if self
                    .ops
                    .get(&token)
                    .is_none_or(|o| o.mutation_range.is_none())
                {
                    return Err(format!("export {export}: gate runs token {token}, which is no mutation in the backend"));
                }
            }
            let mutations = self
                .ops
                .values()
                .filter(|o| o.export == export && o.mutation_range.is_some())
                .count();
            if admitted + waiting != mutations {
                return Err(format!(
                    "export {export}: gate holds {admitted} running and {waiting} waiting, the backend has {mutations} mutations"
                ));
            }
        }
        Ok(())
    }

    /// Breaks one session's backend counter, so tests can see
    /// [`ServerEngine::check`] fire.
    #[cfg(feature = "testkit")]
    #[doc(hidden)]
    pub fn corrupt_for_test(&mut self) {
        if let Some(s) = self.sessions.values_mut().next() {
            s.ops_in_backend += 1;
        }
    }

    /// Makes one session also list a channel bound to another, so tests
    /// can see [`ServerEngine::check`] hold a session's channels to it.
    #[cfg(feature = "testkit")]
    #[doc(hidden)]
    pub fn corrupt_bindings_for_test(&mut self) {
        let mut ids: Vec<u64> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        if let [a, b, ..] = ids[..] {
            let theirs = self.sessions[&b].conns.first().copied();
            if let (Some(c), Some(s)) = (theirs, self.sessions.get_mut(&a)) {
                s.conns.push(c);
            }
        }
    }

    /// The next action for the driver, in order.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<ServerAction> {
        self.actions.pop_front()
    }

    /// When to call [`ServerEngine::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// A transport connection was accepted.
    pub fn connection_opened(&mut self, conn: ConnId, now: Instant) {
        self.stats.connections += 1;
        self.conns.insert(
            conn,
            Conn {
                state: ConnState::AwaitHello,
                last_rx: now,
                key_id: None,
            },
        );
        self.timers
            .insert((now + self.config.handshake_timeout, Timer::Handshake(conn)));
    }

    /// The transport connection is gone (reset, EOF, or after our Close).
    pub fn connection_closed(&mut self, conn: ConnId, now: Instant) {
        if let Some(c) = self.conns.remove(&conn) {
            if let ConnState::Bound { session_id } = c.state {
                self.unbind(conn, session_id, now);
            }
        }
    }

    /// One whole frame arrived on `conn`.
    pub fn handle_frame(&mut self, conn: ConnId, frame: impl Into<InFrame>, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if matches!(c.state, ConnState::Closed) {
            return;
        }
        c.last_rx = now;
        match wire::decode_in(frame.into()) {
            Ok(msg) => self.handle_message(conn, msg, now),
            Err(DecodeError::PayloadChecksum { kind, id })
                if matches!(c.state, ConnState::Bound { .. })
                    && matches!(
                        kind,
                        Kind::Read | Kind::Write | Kind::Trim | Kind::WriteZeroes | Kind::Flush
                    ) =>
            {
                // The header (and so the id) is sound: ask for the request
                // again rather than execute damaged data.
                if self.broken(Defect::CloseOnCorruptPayload) {
                    let e = DecodeError::PayloadChecksum { kind, id };
                    return self.close(conn, CloseReason::BadFrame(e), now);
                }
                self.stats.corrupt_payloads += 1;
                self.send(conn, &reply(id, Status::Corrupt, 0, Bytes::new()));
            }
            Err(DecodeError::UnknownKind(_) | DecodeError::Malformed(_))
                if self.broken(Defect::IgnoreMalformed) => {}
            Err(e) => self.close(conn, CloseReason::BadFrame(e), now),
        }
    }

    /// The backend finished the operation `token`. `data` is the read data
    /// (empty for everything else). Like every input, it takes the time, so
    /// drivers need not change when the engine starts using it.
    pub fn backend_complete(
        &mut self,
        token: OpToken,
        result: Result<Bytes, Status>,
        now: Instant,
    ) {
        self.complete_op(token, result.map(ReadData::Memory), now);
    }

    /// Where the reply to backend operation `token` would go now, if that
    /// reply may carry its data straight from a file (see
    /// [`ServerEngine::backend_complete_from_file`]): a driver that can
    /// send from a file on that connection may then do so. `None` when the
    /// engine must see the data (a configured defect changes it), the read
    /// is one asked for again, or the reply has nowhere to go.
    pub fn file_reply_conn(&self, token: OpToken) -> Option<ConnId> {
        if self.config.defect.is_some() {
            return None;
        }
        let info = self.ops.get(&token).filter(|info| !info.asked_again)?;
        let session = self.sessions.get(&info.session_id)?;
        session.route(session.reply_to(info.request_id))
    }

    /// The backend finished the read `token`, whose data the reply takes
    /// from `data` when it is sent, with `crc` the payload checksum of those
    /// bytes as the driver read them. The reply may go to a connection the
    /// driver cannot send files on (the one [`ServerEngine::file_reply_conn`]
    /// named closed meanwhile): such a driver reads the bytes into the
    /// frame first ([`wire::OutFrame::fill_file_payload`]).
    pub fn backend_complete_from_file(
        &mut self,
        token: OpToken,
        data: wire::FileSlice,
        crc: u32,
        now: Instant,
    ) {
        self.complete_op(token, Ok(ReadData::File(data, crc)), now);
    }

    fn complete_op(&mut self, token: OpToken, result: Result<ReadData, Status>, now: Instant) {
        let Some(info) = self.ops.remove(&token) else {
            return;
        };
        if let Some(l) = self.latency.get_mut(info.export) {
            l.record(info.op, now.saturating_since(info.issued_at));
        }
        if info.mutation_range.is_some() && !self.config.sabotage_no_overlap_gate {
            let released = self.gates[info.export].finish(token, |r| r.token);
            for req in released {
                self.stats.backend_ops += 1;
                self.actions.push_back(ServerAction::Backend(req));
            }
        }
        let Some(session) = self.sessions.get_mut(&info.session_id) else {
            return;
        };
        session.ops_in_backend -= 1;
        if let (0, Some(since)) = (session.ops_in_backend, session.orphaned_since) {
            // Its linger timer skipped it while it was busy.
            let at = since + self.config.session_linger;
            self.timers.insert((at, Timer::Linger(info.session_id)));
        }
        let (status, data) = match result {
            Ok(data) => (Status::Ok, data),
            Err(status) => (status, ReadData::Memory(Bytes::new())),
        };
        if status != Status::Ok {
            self.stats.error_replies += 1;
        }
        let (exec_seq, preferred) = session.complete(info.request_id, info.op, status);
        let (exec_seq, data) = match (self.config.defect, data) {
            (Some(Defect::NoExecSeq), data) => (0, data),
            (Some(Defect::ShortReads), ReadData::Memory(data)) if data.len() > 512 => {
                (exec_seq, ReadData::Memory(data.slice(512..)))
            }
            (_, data) => (exec_seq, data),
        };
        let target = preferred.and_then(|p| session.route(Some(p)));
        let leaving = session.leaving && session.ops_in_backend == 0;
        if let Some(conn) = target {
            let frame = match data {
                ReadData::Memory(data) => {
                    wire::encode(&reply(info.request_id, status, exec_seq, data))
                }
                ReadData::File(data, crc) => {
                    self.stats.file_replies += 1;
                    wire::encode_reply_from_file(info.request_id, status, exec_seq, data, crc)
                }
            };
            self.actions.push_back(ServerAction::Send { conn, frame });
        }
        if leaving {
            self.free_session(info.session_id, now);
        }
    }

    /// Runs the timers that are due: handshake and idle timeouts,
    /// lingering sessions. Each is checked against the state it guards,
    /// and re-armed if that state moved its deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Handshake(conn) => {
                    let pending = self.conns.get(&conn).is_some_and(|c| {
                        matches!(
                            c.state,
                            ConnState::AwaitHello
                                | ConnState::AwaitAuth { .. }
                                | ConnState::AwaitFence { .. }
                        )
                    });
                    if pending {
                        self.close(conn, CloseReason::HandshakeTimeout, now);
                    }
                }
                Timer::Idle(conn) => {
                    let Some(c) = self.conns.get(&conn) else {
                        continue;
                    };
                    if !matches!(c.state, ConnState::Bound { .. }) {
                        continue;
                    }
                    let deadline = c.last_rx + self.config.idle_timeout;
                    if deadline <= now {
                        self.close(conn, CloseReason::Idle, now);
                    } else {
                        self.timers.insert((deadline, Timer::Idle(conn)));
                    }
                }
                Timer::Linger(id) => {
                    let Some(s) = self.sessions.get(&id) else {
                        continue;
                    };
                    // Joined again: no timer until it is orphaned again.
                    // Still busy: backend_complete re-arms it when idle.
                    if s.ops_in_backend > 0 {
                        continue;
                    }
                    match s.orphaned_since {
                        Some(t) if now - t >= self.config.session_linger => {
                            self.free_session(id, now)
                        }
                        Some(t) => {
                            let again = t + self.config.session_linger;
                            self.timers.insert((again, Timer::Linger(id)));
                        }
                        None => {}
                    }
                }
            }
        }
    }

    fn broken(&self, defect: Defect) -> bool {
        self.config.defect == Some(defect)
    }

    fn send(&mut self, conn: ConnId, msg: &Message) {
        self.actions.push_back(ServerAction::Send {
            conn,
            frame: wire::encode(msg),
        });
    }

    fn close(&mut self, conn: ConnId, reason: CloseReason, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if matches!(
            reason,
            CloseReason::BadFrame(_) | CloseReason::ProtocolViolation(_)
        ) {
            self.stats.protocol_errors += 1;
        }
        let old = std::mem::replace(&mut c.state, ConnState::Closed);
        if let ConnState::Bound { session_id } = old {
            self.unbind(conn, session_id, now);
        }
        self.actions.push_back(ServerAction::Close { conn, reason });
    }

    fn reject(&mut self, conn: ConnId, code: RejectCode, message: &str, now: Instant) {
        let code = if self.broken(Defect::GenericRejects) {
            RejectCode::Malformed
        } else {
            code
        };
        if code == RejectCode::AuthFailed {
            self.stats.auth_failures += 1;
        }
        self.send(
            conn,
            &Message::Reject(Reject {
                code,
                message: message.to_string(),
            }),
        );
        self.close(conn, CloseReason::Rejected(code), now);
    }

    fn unbind(&mut self, conn: ConnId, session_id: u64, now: Instant) {
        if let Some(s) = self.sessions.get_mut(&session_id) {
            s.conns.retain(|c| *c != conn);
            if s.conns.is_empty() {
                s.orphaned_since = Some(now);
                self.timers
                    .insert((now + self.config.session_linger, Timer::Linger(session_id)));
            }
        }
    }

    fn free_session(&mut self, id: u64, now: Instant) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        self.stats.sessions_freed += 1;
        self.close_conns(s.conns, CloseReason::SessionEnded);
        if s.fenced && !self.fence_draining(s.owner_epoch.0, s.export) {
            self.welcome_fence_waiters(s.owner_epoch.0, s.export, now);
        }
    }

    /// Closes a session's channels for `reason` (the session lets them go).
    fn close_conns(&mut self, conns: Vec<ConnId>, reason: CloseReason) {
        for conn in conns {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.state = ConnState::Closed;
                let reason = reason.clone();
                self.actions.push_back(ServerAction::Close { conn, reason });
            }
        }
    }

    /// Whether a session of `owner` on `export` runs with a higher epoch
    /// than `epoch` (the asking client is an older run, e.g. a process
    /// presumed dead).
    fn newer_run(&self, owner: u64, epoch: u64, export: usize) -> bool {
        owner != 0
            && !self.broken(Defect::AcceptOlderRuns)
            && self
                .sessions
                .values()
                .any(|s| s.export == export && s.owner_epoch.0 == owner && s.owner_epoch.1 > epoch)
    }

    /// Ends every session of `owner` on `export` older than `epoch`: their
    /// channels close at once, so frames of a dead run still in the
    /// network land nowhere; their backend operations finish first.
    fn fence_older(&mut self, owner: u64, epoch: u64, export: usize, now: Instant) {
        let older: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| {
                s.export == export
                    && s.owner_epoch.0 == owner
                    && s.owner_epoch.1 < epoch
                    && !s.fenced
            })
            .map(|s| s.id)
            .collect();
        for id in older {
            self.stats.sessions_fenced += 1;
            let s = self.sessions.get_mut(&id).unwrap();
            s.fenced = true;
            s.leaving = true;
            let conns = std::mem::take(&mut s.conns);
            let idle = s.ops_in_backend == 0;
            self.close_conns(conns, CloseReason::Fenced);
            if idle {
                self.free_session(id, now);
            }
        }
    }

    /// Whether a fenced session of `owner` on `export` still has
    /// operations in the backend.
    fn fence_draining(&self, owner: u64, export: usize) -> bool {
        self.sessions
            .values()
            .any(|s| s.fenced && s.export == export && s.owner_epoch.0 == owner)
    }

    fn welcome_fence_waiters(&mut self, owner: u64, export: usize, now: Instant) {
        let waiting: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(&c.state, ConnState::AwaitFence { hello, export: e }
                    if hello.owner == owner && *e == export)
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in waiting {
            let c = self.conns.get_mut(&conn).unwrap();
            let ConnState::AwaitFence { hello, export } =
                std::mem::replace(&mut c.state, ConnState::AwaitHello)
            else {
                unreachable!("filtered on AwaitFence")
            };
            self.open_session(conn, hello, export, now);
        }
    }

    fn handle_message(&mut self, conn: ConnId, msg: Message, now: Instant) {
        let state = &self.conns[&conn].state;
        match (state, msg) {
            (ConnState::AwaitHello, Message::Hello(hello)) => self.on_hello(conn, hello, now),
            (ConnState::AwaitAuth { .. }, Message::Auth(auth)) => self.on_auth(conn, auth, now),
            (ConnState::Bound { session_id }, Message::Request(req)) => {
                let sid = *session_id;
                self.on_request(conn, sid, req, now)
            }
            (ConnState::Bound { .. }, Message::Ping { token }) => {
                let token = token.wrapping_add(u64::from(self.broken(Defect::WrongPongToken)));
                self.send(conn, &Message::Pong { token })
            }
            (ConnState::Bound { session_id }, Message::Goodbye) => {
                let sid = *session_id;
                if !self.broken(Defect::IgnoreGoodbye) {
                    self.on_goodbye(sid, now)
                }
            }
            (ConnState::AwaitAuth { .. }, Message::Request(req))
                if self.broken(Defect::ServeBeforeWelcome) =>
            {
                self.send(conn, &reply(req.id, Status::Ok, 0, Bytes::new()))
            }
            (_, other) => {
                let what = match other.kind() {
                    Kind::Hello => "Hello after the handshake began",
                    Kind::Auth => "Auth without a Challenge",
                    Kind::Challenge | Kind::Welcome | Kind::Reject | Kind::Reply | Kind::Pong => {
                        "server-to-client message sent by the client"
                    }
                    _ => "request before the handshake finished",
                };
                self.close(conn, CloseReason::ProtocolViolation(what), now)
            }
        }
    }

    fn on_hello(&mut self, conn: ConnId, hello: Hello, now: Instant) {
        if hello.version_min > u16::from(VERSION) || hello.version_max < u16::from(VERSION) {
            return self.reject(
                conn,
                RejectCode::VersionMismatch,
                "this server speaks version 1",
                now,
            );
        }
        let Some(export) = self
            .config
            .exports
            .iter()
            .position(|e| e.name == hello.export)
        else {
            return self.reject(conn, RejectCode::NoSuchExport, "no such export", now);
        };
        let Some(key) = self
            .config
            .keys
            .iter()
            .position(|(id, _)| *id == hello.key_id)
        else {
            return self.reject(conn, RejectCode::AuthFailed, "authentication failed", now);
        };
        if let Some(code) = self.check_join(&hello, export) {
            return self.reject(conn, code, "cannot join that session", now);
        }
        if self.newer_run(hello.owner, hello.epoch, export) {
            return self.reject(conn, RejectCode::Fenced, FENCED, now);
        }
        let mut server_nonce = [0u8; NONCE_LEN];
        if !self.broken(Defect::FixedServerNonce) {
            self.rng.fill(&mut server_nonce);
        }
        let transcript = auth::Transcript {
            key_id: &hello.key_id,
            export: &hello.export,
            session_id: hello.session_id,
            owner_epoch: (hello.owner, hello.epoch),
            client_nonce: &hello.client_nonce,
            server_nonce: &server_nonce,
            boot_id: self.config.boot_id,
        };
        let mut server_proof = auth::server_proof(&self.config.keys[key].1, &transcript);
        self.conns.get_mut(&conn).unwrap().key_id = Some(hello.key_id.clone());
        if self.broken(Defect::WrongServerProof) {
            // Always a different byte: the defect is never by chance a
            // no-op (mutation testing turned `^= 1` into `|= 1`, which was,
            // whenever bit 0 was set).
            server_proof[0] = server_proof[0].wrapping_add(1);
        }
        self.send(
            conn,
            &Message::Challenge(Challenge {
                version: u16::from(VERSION),
                // No optional feature (RDMA) is offered by this engine yet.
                features: 0,
                boot_id: self.config.boot_id,
                server_nonce,
                server_proof,
            }),
        );
        self.conns.get_mut(&conn).unwrap().state = ConnState::AwaitAuth {
            hello,
            export,
            server_nonce,
        };
    }

    /// Whether the channel `hello` opens may join its session (0: create
    /// one) on `export`. A session is joined only by the run of the client
    /// that created it.
    fn check_join(&self, hello: &Hello, export: usize) -> Option<RejectCode> {
        if hello.session_id == 0 {
            let server_wide = self.sessions.len() + self.sessions_elsewhere;
            return (server_wide >= self.config.max_sessions).then_some(RejectCode::Busy);
        }
        match self.sessions.get(&hello.session_id) {
            Some(s)
                if s.export == export
                    && !s.leaving
                    && s.owner_epoch == (hello.owner, hello.epoch) =>
            {
                (s.conns.len() >= self.config.max_channels_per_session).then_some(RejectCode::Busy)
            }
            None if self.broken(Defect::AdoptUnknownSessions) => None,
            _ => Some(RejectCode::SessionUnknown),
        }
    }

    fn on_auth(&mut self, conn: ConnId, auth_msg: Auth, now: Instant) {
        let c = self.conns.get_mut(&conn).unwrap();
        let ConnState::AwaitAuth {
            hello,
            export,
            server_nonce,
        } = std::mem::replace(&mut c.state, ConnState::AwaitHello)
        else {
            unreachable!("on_auth is only called in AwaitAuth")
        };
        // Looked up again: the key table may have changed since the
        // challenge (a key withdrawn, or given new bytes the client's
        // proof then fails against).
        let Some((_, key)) = self.config.keys.iter().find(|(id, _)| *id == hello.key_id) else {
            return self.reject(conn, RejectCode::AuthFailed, "authentication failed", now);
        };
        let transcript = auth::Transcript {
            key_id: &hello.key_id,
            export: &hello.export,
            session_id: hello.session_id,
            owner_epoch: (hello.owner, hello.epoch),
            client_nonce: &hello.client_nonce,
            server_nonce: &server_nonce,
            boot_id: self.config.boot_id,
        };
        let expected = auth::client_proof(key, &transcript);
        if !auth::proofs_equal(&expected, &auth_msg.client_proof)
            && !self.broken(Defect::AcceptAnyProof)
        {
            return self.reject(conn, RejectCode::AuthFailed, "authentication failed", now);
        }
        // The session may have gone while the proof was in flight.
        if let Some(code) = self.check_join(&hello, export) {
            return self.reject(conn, code, "cannot join that session", now);
        }
        if hello.session_id == 0 && hello.owner != 0 {
            if self.newer_run(hello.owner, hello.epoch, export) {
                return self.reject(conn, RejectCode::Fenced, FENCED, now);
            }
            if !self.config.sabotage_no_fencing && !self.broken(Defect::KeepOlderRuns) {
                self.fence_older(hello.owner, hello.epoch, export, now);
            }
            if self.fence_draining(hello.owner, export) {
                self.conns.get_mut(&conn).unwrap().state = ConnState::AwaitFence { hello, export };
                return;
            }
        }
        self.open_session(conn, hello, export, now);
    }

    /// Creates or joins the session `hello` asked for and welcomes the
    /// channel into it.
    fn open_session(&mut self, conn: ConnId, hello: Hello, export: usize, now: Instant) {
        // A fence that drained while other waiters were welcomed may have
        // let the limits or the session change.
        if let Some(code) = self.check_join(&hello, export) {
            return self.reject(conn, code, "cannot join that session", now);
        }
        let adopt = self.broken(Defect::AdoptUnknownSessions)
            && !self.sessions.contains_key(&hello.session_id);
        let (session_id, resumed) = if hello.session_id == 0 || adopt {
            let mut id = 0;
            // Alone, every id is this engine's: the draws are as before.
            while id == 0 || self.sessions.contains_key(&id) || !self.shard.owns(id) {
                id = self.rng.next_u64();
            }
            let owner_epoch = (hello.owner, hello.epoch);
            self.sessions.insert(
                id,
                Session::new(id, export, owner_epoch, self.config.max_inflight),
            );
            self.stats.sessions_created += 1;
            (id, false)
        } else {
            (hello.session_id, true)
        };
        let session = self.sessions.get_mut(&session_id).unwrap();
        session.conns.push(conn);
        session.orphaned_since = None;
        self.conns.get_mut(&conn).unwrap().state = ConnState::Bound { session_id };
        self.timers
            .insert((now + self.config.idle_timeout, Timer::Idle(conn)));
        self.stats.handshakes += 1;
        let e = &self.config.exports[export];
        let mut export_flags = EXPORT_SEND_FLUSH | EXPORT_SEND_FUA;
        if e.read_only {
            export_flags |= EXPORT_READ_ONLY;
        }
        if e.trim {
            export_flags |= EXPORT_TRIM;
        }
        if e.write_zeroes {
            export_flags |= EXPORT_WRITE_ZEROES;
        }
        let welcome = Welcome {
            session_id,
            boot_id: self.config.boot_id,
            export_size: e.size,
            block_size: e.block_size,
            max_payload: self.config.max_payload,
            max_inflight: self
                .sessions
                .get(&session_id)
                .map_or(self.config.max_inflight, |s| s.max_inflight),
            id_window: self.config.id_window,
            export_flags,
            flags: if resumed { WELCOME_RESUMED } else { 0 },
        };
        self.send(conn, &Message::Welcome(welcome));
    }

    fn on_goodbye(&mut self, session_id: u64, now: Instant) {
        let Some(s) = self.sessions.get_mut(&session_id) else {
            return;
        };
        s.leaving = true;
        if s.ops_in_backend == 0 {
            self.free_session(session_id, now);
        }
    }

    fn on_request(&mut self, conn: ConnId, session_id: u64, req: Request, now: Instant) {
        self.stats.requests += 1;
        let window = self.config.id_window;
        let session = self
            .sessions
            .get_mut(&session_id)
            .expect("bound connections have a session");
        // A read asked for again: perhaps its last reply, sent from a file,
        // met a write and failed its checksum. This time it goes through
        // memory, so a region rewritten without pause cannot starve it.
        let asked_again = session.answered(req.id);
        let mut admission = session.admit(req.id, req.floor, req.op, conn, window);
        if (self.config.sabotage_no_dedup || self.config.defect == Some(Defect::ExecuteDuplicates))
            && matches!(admission, Admission::Joined | Admission::Recorded { .. })
        {
            admission = Admission::Execute;
        }
        if self.config.defect == Some(Defect::NoWindowCheck) && admission == Admission::OutOfWindow
        {
            admission = Admission::Execute;
        }
        match admission {
            Admission::Stale if self.config.defect == Some(Defect::AnswerStale) => {
                self.send(conn, &reply(req.id, Status::Invalid, 0, Bytes::new()))
            }
            Admission::Stale => self.stats.stale_dropped += 1,
            Admission::Joined => self.stats.joined += 1,
            Admission::OutOfWindow => {
                self.stats.error_replies += 1;
                self.send(conn, &reply(req.id, Status::Invalid, 0, Bytes::new()));
            }
            Admission::Recorded { status, exec_seq } => {
                self.stats.recorded_replies += 1;
                let to = match self.config.defect {
                    Some(Defect::ReplyOnFirstChannel) => session.conns[0],
                    _ => conn,
                };
                self.send(to, &reply(req.id, status, exec_seq, Bytes::new()));
            }
            Admission::Execute => {
                let export = session.export;
                // A client that ignores max_inflight could otherwise pin
                // the server's memory. Twice the limit leaves room for
                // requests a client's IO timeout abandoned while they ran.
                // Dropped and forgotten, not refused: an honest client
                // resends after aging, so overload never becomes an error.
                if session.ops_in_backend >= 2 * session.max_inflight as usize {
                    session.forget(req.id);
                    self.stats.overload_dropped += 1;
                    return;
                }
                if let Err(status) = validate(&self.config, export, &req) {
                    session.record(req.id, status, 0);
                    self.stats.error_replies += 1;
                    self.send(conn, &reply(req.id, status, 0, Bytes::new()));
                    return;
                }
                session.ops_in_backend += 1;
                self.issue(session_id, export, req, asked_again, now);
            }
        }
    }

    fn issue(
        &mut self,
        session_id: u64,
        export: usize,
        req: Request,
        asked_again: bool,
        now: Instant,
    ) {
        let token = self.next_token;
        self.next_token += 1;
        let fua = req.flags & FLAG_FUA != 0;
        self.stats.fua_requests += u64::from(fua);
        let len = req.length;
        let op = match req.op {
            Op::Read => BackendOp::Read {
                offset: req.offset,
                len,
            },
            Op::Write => BackendOp::Write {
                offset: req.offset,
                data: req.payload,
                fua,
            },
            Op::Flush => BackendOp::Flush,
            Op::Trim => BackendOp::Trim {
                offset: req.offset,
                len,
                fua,
            },
            Op::WriteZeroes => BackendOp::WriteZeroes {
                offset: req.offset,
                len,
                fua,
                may_unmap: req.flags & FLAG_NO_UNMAP == 0,
                fast_only: false,
            },
        };
        let mutation_range = req
            .op
            .mutates()
            .then(|| (req.offset, req.offset + u64::from(len)));
        self.ops.insert(
            token,
            OpInfo {
                session_id,
                request_id: req.id,
                op: req.op,
                export,
                mutation_range,
                issued_at: now,
                asked_again,
            },
        );
        let backend = BackendRequest {
            token,
            export,
            op,
            session_id,
            request_id: req.id,
        };
        let ready = match mutation_range {
            Some(_) if self.config.sabotage_no_overlap_gate => Some(backend),
            Some((start, end)) => self.gates[export].admit(token, start, end, backend),
            None => Some(backend),
        };
        if let Some(backend) = ready {
            self.stats.backend_ops += 1;
            self.actions.push_back(ServerAction::Backend(backend));
        }
    }
}

const FENCED: &str = "a newer run of this client holds the export";

fn reply(id: u64, status: Status, exec_seq: u64, payload: Bytes) -> Message {
    Message::Reply(Reply {
        id,
        status,
        exec_seq,
        payload,
    })
}

/// Range, alignment, size and permission checks, in the order a client
/// would want them reported.
fn validate(config: &ServerConfig, export: usize, req: &Request) -> Result<(), Status> {
    let e = &config.exports[export];
    if req.remote.is_some() {
        // RDMA data movement was not negotiated on this transport.
        return Err(Status::Invalid);
    }
    if req.op == Op::Flush {
        return if req.offset == 0 && req.length == 0 {
            Ok(())
        } else {
            Err(Status::Invalid)
        };
    }
    let block = u64::from(e.block_size);
    if (req.length == 0 || req.offset % block != 0 || u64::from(req.length) % block != 0)
        && config.defect != Some(Defect::NoAlignmentCheck)
    {
        return Err(Status::Invalid);
    }
    if req.length > config.max_payload {
        return Err(Status::Invalid);
    }
    if req
        .offset
        .checked_add(u64::from(req.length))
        .is_none_or(|end| end > e.size)
    {
        return Err(match config.defect {
            Some(Defect::WrongRangeStatus) => Status::Invalid,
            _ => Status::OutOfRange,
        });
    }
    if req.op == Op::Write && req.payload.len() != req.length as usize {
        return Err(Status::Invalid);
    }
    if req.op.mutates() && e.read_only && config.defect != Some(Defect::IgnoreReadOnly) {
        return Err(Status::ReadOnly);
    }
    match req.op {
        Op::Trim if !e.trim => Err(Status::Unsupported),
        Op::WriteZeroes if !e.write_zeroes => Err(Status::Unsupported),
        _ => Ok(()),
    }
}
