//! The client engine: one session over several channels to one export.
//!
//! It journals every request until answered, ages and resends unanswered
//! ones on other channels, discards duplicate answers, keeps channels alive
//! and reconnects them with seeded backoff, detects server restarts by boot
//! id and replays both unacknowledged requests and acknowledged-but-unflushed
//! data, holds each FLUSH until the writes it covers are acknowledged, and
//! bounds its memory by back-pressure at [`ClientEngine::submit`].

mod channel;
mod config;
mod dirty;
mod journal;
mod reason;
mod tuning;

pub use channel::ChannelId;
pub use config::{ClientConfig, Identity, Policy, Sabotage};
pub use reason::DownReason;
pub use tuning::ClientTuning;

use crate::auth::{self, Key, NONCE_LEN};
use crate::latency::OpLatency;
use crate::limits::ConfigError;
use crate::rng::{SecretRng, SplitMix64};
use crate::wire::{self, *};
use crate::Instant;
use bytes::Bytes;
use channel::{ChanState, Channel};
use dirty::{Content, DirtyWindow, Extent};
use journal::{Entry, EntryState, Journal, Origin};
use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// Requests up to this size stay on the channel the last one went to
/// (under [`Policy::LeastInflight`], see [`ClientConfig::sticky_slack`]),
/// so a burst leaves in one send and the server reads it in one receive;
/// larger ones spread for bandwidth.
const STICKY_MAX_LEN: u32 = 64 * 1024;

/// A block IO from the frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoRequest {
    /// What to do.
    pub op: Op,
    /// Byte offset (0 for FLUSH).
    pub offset: u64,
    /// Byte length (0 for FLUSH).
    pub len: u32,
    /// Durable before completion.
    pub fua: bool,
    /// For WRITE_ZEROES: keep the range allocated.
    pub no_unmap: bool,
    /// For WRITE: exactly `len` bytes.
    pub data: Bytes,
}

impl IoRequest {
    /// A read.
    pub fn read(offset: u64, len: u32) -> Self {
        IoRequest {
            op: Op::Read,
            offset,
            len,
            fua: false,
            no_unmap: false,
            data: Bytes::new(),
        }
    }
    /// A write.
    pub fn write(offset: u64, data: Bytes, fua: bool) -> Self {
        IoRequest {
            op: Op::Write,
            offset,
            len: data.len() as u32,
            fua,
            no_unmap: false,
            data,
        }
    }
    /// A flush.
    pub fn flush() -> Self {
        IoRequest {
            op: Op::Flush,
            offset: 0,
            len: 0,
            fua: false,
            no_unmap: false,
            data: Bytes::new(),
        }
    }
    /// A trim.
    pub fn trim(offset: u64, len: u32) -> Self {
        IoRequest {
            op: Op::Trim,
            offset,
            len,
            fua: false,
            no_unmap: false,
            data: Bytes::new(),
        }
    }
    /// Write zeroes.
    pub fn write_zeroes(offset: u64, len: u32, fua: bool) -> Self {
        IoRequest {
            op: Op::WriteZeroes,
            offset,
            len,
            fua,
            no_unmap: false,
            data: Bytes::new(),
        }
    }
}

/// Why submit refused an IO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The journal or dirty window is full: retry after the engine
    /// emits [`ClientAction::Room`] (a completion alone does not make
    /// room: a finished write grows the dirty window).
    Busy,
    /// The request is inconsistent (the message says how).
    Invalid(&'static str),
    /// A newer run of this client took the export over: this one has
    /// closed for good ([`IoErrorKind::Fenced`]).
    Fenced,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Busy => f.write_str("client queue full, retry when there is room"),
            SubmitError::Invalid(why) => write!(f, "invalid request: {why}"),
            SubmitError::Fenced => f.write_str("a newer run of this client took the export over"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// What went wrong with one IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoErrorKind {
    /// The server's backend reported a media error.
    Media,
    /// The backend is full.
    NoSpace,
    /// Past the end of the export.
    OutOfRange,
    /// The export is read-only.
    ReadOnly,
    /// Misaligned, too long, or otherwise refused by the server.
    Invalid,
    /// Not supported by this export.
    Unsupported,
    /// Not completed within the configured IO timeout.
    TimedOut,
    /// The client was closed (its driver is gone) before the IO finished.
    Closed,
    /// A newer run of this client (same identity, higher epoch) took the
    /// export over: this run may write no more.
    Fenced,
    /// The server answered with a status this version does not know.
    Unknown(u32),
}

/// A failed IO, with enough context to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    /// What went wrong.
    pub kind: IoErrorKind,
    /// The export.
    pub export: String,
    /// The operation.
    pub op: Op,
    /// Its byte offset.
    pub offset: u64,
    /// Its byte length.
    pub len: u32,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} of {} bytes at offset {} on export {:?} failed: {:?}",
            self.op, self.len, self.offset, self.export, self.kind
        )
    }
}

impl std::error::Error for IoError {}

/// The final answer to one submitted IO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The frontend's tag from [`ClientEngine::submit`].
    pub user: u64,
    /// Read data (empty for other ops), or the error.
    pub result: Result<Bytes, IoError>,
}

/// Things worth logging; none needs an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A channel finished its handshake.
    ChannelUp {
        /// Which.
        ch: ChannelId,
        /// The session it joined.
        session_id: u64,
    },
    /// A channel failed; its requests moved to others.
    ChannelDown {
        /// Which.
        ch: ChannelId,
        /// Why.
        reason: DownReason,
        /// Requests moved off it.
        moved: usize,
    },
    /// A new server session began.
    SessionStarted {
        /// The session.
        session_id: u64,
        /// The server's boot id.
        boot_id: u64,
        /// True if an earlier session was lost (server restarted or expired).
        replaced: bool,
        /// Unflushed extents rewritten because the server restarted.
        replay_extents: usize,
    },
    /// The server refused us or failed to prove it knows the key.
    AuthFailed {
        /// On which channel.
        ch: ChannelId,
        /// Detail.
        detail: String,
    },
    /// The server refused the handshake for another reason.
    Rejected {
        /// On which channel.
        ch: ChannelId,
        /// Code.
        code: RejectCode,
        /// Server's message.
        message: String,
    },
}

/// What the driver must do next.
#[derive(Debug, Clone)]
pub enum ClientAction {
    /// Open a transport connection for this channel, then call
    /// [`ClientEngine::channel_connected`] or [`ClientEngine::channel_closed`].
    Connect(ChannelId),
    /// Close this connection (send what is queued first).
    Close(ChannelId),
    /// Send a frame.
    Send(ChannelId, OutFrame),
    /// An IO finished.
    Complete(Completion),
    /// Something to log.
    Notice(Notice),
    /// The request [`ClientEngine::submit`] last refused with Busy would
    /// now be accepted: submit what was held back. Emitted once per
    /// refusal, and only after every other pending action.
    Room,
}

/// The export as the server described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Alignment of offsets and lengths.
    pub block_size: u32,
    /// Largest single request.
    pub max_payload: u32,
    /// EXPORT_* flags.
    pub flags: u32,
}

/// Counters for status output and the simulator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// IOs accepted.
    pub submitted: u64,
    /// IOs completed successfully.
    pub completed: u64,
    /// IOs completed with an error.
    pub failed: u64,
    /// Requests resent because they aged past their deadline.
    pub resends: u64,
    /// Requests moved off a failed channel.
    pub failovers: u64,
    /// Answers for requests already answered, dropped.
    pub duplicates_dropped: u64,
    /// Frames from the server that failed checksums. Besides damage on
    /// the way, a large read that raced a write to its range can land
    /// here once, when the server sent its reply from the page cache
    /// (the read is asked for again and answered from memory).
    pub corrupt_frames: u64,
    /// Channels declared failed.
    pub channel_failures: u64,
    /// Channel handshakes completed.
    pub handshakes: u64,
    /// Server sessions lost and replaced.
    pub session_resets: u64,
    /// Unflushed extents rewritten after server restarts.
    pub replayed_extents: u64,
    /// Replays the server refused, held and sent again later.
    pub replay_retries: u64,
    /// Keep-alive probes sent.
    pub pings: u64,
    /// FLUSHes issued to bound the dirty window.
    pub dirty_flushes: u64,
    /// Submissions refused with Busy.
    pub busy: u64,
}

#[derive(Debug, Clone, Copy)]
struct Session {
    id: u64,
    boot_id: u64,
    info: ExportInfo,
    max_inflight: u32,
}

/// A channel timer, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ChannelTimer {
    /// Silent too long with something outstanding: the channel is dead.
    Dead,
    /// The handshake took too long.
    Handshake,
    /// Quiet: probe it.
    Keepalive,
    /// Idle and allowed to connect again.
    Reconnect,
}

/// The sans-IO client.
#[derive(Debug)]
pub struct ClientEngine {
    config: ClientConfig,
    secret: SecretRng,
    jitter: SplitMix64,
    channels: Vec<Channel>,
    journal: Journal,
    dirty: DirtyWindow,
    session: Option<Session>,
    /// Boot id of the last server session we had, to tell a restart from
    /// an expired session.
    last_boot: Option<u64>,
    /// Counts server sessions; orders dirty data across them.
    epoch: u64,
    /// The channel creating a new session (only one may).
    leader: Option<u16>,
    rr_cursor: usize,
    /// The channel the last small request went to: small requests stay on
    /// it while it is within `sticky_slack` of the least loaded.
    sticky: Option<usize>,
    next_ping: u64,
    actions: VecDeque<ClientAction>,
    stats: ClientStats,
    latency: OpLatency,
    leaving: Leaving,
    /// A server said a newer run of this client holds the export.
    fenced: bool,
    /// When replays the server refused go again, and the wait before the
    /// next try (doubling from resend_min to resend_max; zero after a
    /// replay succeeds).
    replay_retry_at: Option<Instant>,
    replay_backoff: Duration,
    /// What the request last refused with Busy needed, until there is
    /// room for it and [`ClientAction::Room`] says so. A driver may have
    /// nothing else in flight to wake it (the dirty window drains by an
    /// internal FLUSH, which completes no user IO).
    refused: Option<Need>,
}

/// Where the client is in leaving its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaving {
    /// Not leaving.
    No,
    /// [`ClientEngine::close`] was called: no new IO; what is in flight
    /// finishes and the dirty window is flushed before GOODBYE.
    Draining,
    /// GOODBYE sent (or the client gave up): every channel closed for good.
    Closed,
}

/// What one submission needs from the client's bounds.
#[derive(Debug, Clone, Copy)]
struct Need {
    bytes: u64,
    mutates: bool,
}

impl ClientEngine {
    /// A client that will connect all its channels on the first
    /// [`ClientEngine::handle_timeout`] or submit, if `config` is sound.
    pub fn new(config: ClientConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut seed = [0u8; 8];
        let mut secret = SecretRng::new(config.rng_seed);
        secret.fill(&mut seed);
        Ok(ClientEngine {
            jitter: SplitMix64::new(u64::from_le_bytes(seed)),
            secret,
            channels: (0..config.channels).map(|_| Channel::new()).collect(),
            journal: Journal::new(),
            dirty: DirtyWindow::default(),
            session: None,
            last_boot: None,
            epoch: 0,
            leader: None,
            rr_cursor: 0,
            sticky: None,
            next_ping: 1,
            actions: VecDeque::new(),
            stats: ClientStats::default(),
            latency: OpLatency::default(),
            leaving: Leaving::No,
            fenced: false,
            replay_retry_at: None,
            replay_backoff: Duration::ZERO,
            refused: None,
            config,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Applies `tuning` if the configuration it makes is sound (else
    /// nothing changes and the error names the field). Added channels
    /// connect now; removed ones (the highest slots) hand their requests
    /// in flight to the rest, which the server's exactly-once makes safe.
    pub fn tune(&mut self, tuning: &ClientTuning, now: Instant) -> Result<(), ConfigError> {
        let next = tuning.applied_to(&self.config);
        next.validate()?;
        let (before, after) = (self.channels.len(), next.channels);
        self.config = next;
        if after > before {
            self.channels.resize_with(after, Channel::new);
        }
        for slot in (after..before).rev() {
            self.retire_channel(slot);
        }
        if after < before {
            self.channels.truncate(after);
            if self.leader.is_some_and(|l| l as usize >= after) {
                self.leader = None;
            }
            // rr_cursor needs no wrap: pick_channel takes it modulo the
            // channel count (mutation testing showed the wrap changed nothing).
        }
        self.pump(now);
        Ok(())
    }

    /// Authenticates with `key` under `key_id` from the next handshake on
    /// (a key rotated in the client's key file). Channels already up stay
    /// up; a handshake under way finishes with the key it named. Refused
    /// (nothing changes) if the id is not one a server could hold.
    pub fn set_key(&mut self, key_id: String, key: Key) -> Result<(), ConfigError> {
        let mut next = self.config.clone();
        next.key_id = key_id;
        next.key = key;
        next.validate()?;
        self.config = next;
        Ok(())
    }

    /// Closes the channel in `slot` for good and requeues its requests.
    fn retire_channel(&mut self, slot: usize) {
        let ch = self.id_of(slot);
        let moved = self.journal.sent_on(slot as u16);
        for id in &moved {
            self.journal.requeue(*id);
        }
        self.stats.failovers += moved.len() as u64;
        self.channels[slot].inflight = 0;
        if !matches!(self.channels[slot].state, ChanState::Idle { .. }) {
            self.actions.push_back(ClientAction::Close(ch));
        }
        self.actions
            .push_back(ClientAction::Notice(Notice::ChannelDown {
                ch,
                reason: DownReason::Retired,
                moved: moved.len(),
            }));
    }

    /// Counters so far.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// From the frontend's submission to its completion, per operation
    /// (failover, resends and replay included).
    pub fn latency(&self) -> &OpLatency {
        &self.latency
    }

    /// The export, once a session exists.
    pub fn export_info(&self) -> Option<ExportInfo> {
        self.session.map(|s| s.info)
    }

    /// The current server session id and boot id.
    pub fn session(&self) -> Option<(u64, u64)> {
        self.session.map(|s| (s.id, s.boot_id))
    }

    /// Channels currently able to carry requests.
    pub fn ready_channels(&self) -> usize {
        self.channels.iter().filter(|c| c.is_ready()).count()
    }

    /// Requests journaled (frontend and internal).
    pub fn journal_len(&self) -> usize {
        self.journal.len()
    }

    /// Payload bytes journaled for frontend requests.
    pub fn journal_bytes(&self) -> u64 {
        self.journal.user_bytes()
    }

    /// Requests on the wire.
    pub fn inflight(&self) -> usize {
        self.journal.sent()
    }

    /// Rewrites of unflushed data still outstanding after a server restart
    /// (all other requests wait for them).
    pub fn replays_pending(&self) -> usize {
        self.journal.replays_pending()
    }

    /// Acknowledged, unflushed data held for replay.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.bytes()
    }

    /// Per channel: (id, ready, requests in flight, smoothed RTT).
    pub fn channel_summary(&self) -> Vec<(ChannelId, bool, u32, Option<Duration>)> {
        self.channels
            .iter()
            .enumerate()
            .map(|(slot, c)| {
                (
                    ChannelId {
                        slot: slot as u16,
                        gen: c.gen,
                    },
                    c.is_ready(),
                    c.inflight,
                    c.rtt.srtt(),
                )
            })
            .collect()
    }

    /// Verifies the engine's internal invariants: the journal's counters
    /// and indexes, the dirty window's byte total, and that each channel's
    /// in-flight count is exactly the requests on the wire through its
    /// current connection, which must be ready. O(journal); simulators call
    /// it after every step, production code never.
    pub fn check(&self) -> Result<(), String> {
        self.journal.check()?;
        self.dirty.check()?;
        let mut on_wire = vec![0u32; self.channels.len()];
        for (id, e) in &self.journal.entries {
            if let EntryState::Sent { ch, .. } = e.state {
                let c = self
                    .channels
                    .get(ch.slot as usize)
                    .ok_or_else(|| format!("request {id} sent on {ch}, which does not exist"))?;
                if c.gen != ch.gen || !c.is_ready() {
                    return Err(format!(
                        "request {id} sent on {ch}, but that slot is at gen {} in {:?}",
                        c.gen, c.state
                    ));
                }
                on_wire[ch.slot as usize] += 1;
            }
        }
        for (slot, c) in self.channels.iter().enumerate() {
            if c.inflight != on_wire[slot] {
                return Err(format!(
                    "channel {slot}: inflight is {}, the journal has {} on it",
                    c.inflight, on_wire[slot]
                ));
            }
        }
        if let Some(s) = &self.session {
            if self.journal.sent() > s.max_inflight as usize {
                return Err(format!(
                    "{} requests on the wire, the session allows {}",
                    self.journal.sent(),
                    s.max_inflight
                ));
            }
        }
        Ok(())
    }

    /// Breaks one journal counter, so tests can see [`ClientEngine::check`] fire.
    #[cfg(feature = "testkit")]
    #[doc(hidden)]
    pub fn corrupt_for_test(&mut self) {
        self.journal.corrupt_for_test();
    }

    /// The next action for the driver, in order.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<ClientAction> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        let need = self.refused?;
        if self.fits(need) && !self.config.sabotage.no_room {
            self.refused = None;
            return Some(ClientAction::Room);
        }
        None
    }

    /// Whether the journal and the dirty window have room for `need`.
    fn fits(&self, need: Need) -> bool {
        self.journal.user_count() < self.config.max_queued
            && self.journal.user_bytes() + need.bytes <= self.config.max_journal_bytes
            && !(need.mutates && self.dirty.bytes() >= self.config.max_dirty_bytes)
    }

    /// Submits an IO; its [`Completion`] carries `user`.
    pub fn submit(&mut self, user: u64, io: IoRequest, now: Instant) -> Result<(), SubmitError> {
        if self.fenced {
            return Err(SubmitError::Fenced);
        }
        if self.leaving != Leaving::No {
            return Err(SubmitError::Invalid("client is closing"));
        }
        match io.op {
            Op::Flush if io.len != 0 || io.offset != 0 => {
                return Err(SubmitError::Invalid("flush has no range"))
            }
            Op::Flush => {}
            _ if io.len == 0 => return Err(SubmitError::Invalid("zero-length request")),
            Op::Write if io.data.len() != io.len as usize => {
                return Err(SubmitError::Invalid("write data length differs from len"))
            }
            Op::Read | Op::Trim | Op::WriteZeroes if !io.data.is_empty() => {
                return Err(SubmitError::Invalid("only writes carry data"))
            }
            _ => {}
        }
        if let Some(s) = self.session {
            if io.len > s.info.max_payload {
                return Err(SubmitError::Invalid("longer than the server's max payload"));
            }
        }
        let need = Need {
            bytes: io.data.len() as u64,
            mutates: io.op.mutates(),
        };
        if need.bytes > self.config.max_journal_bytes {
            // No amount of waiting makes room for it.
            return Err(SubmitError::Invalid(
                "longer than the client's max_journal_bytes",
            ));
        }
        if !self.fits(need) {
            self.stats.busy += 1;
            self.refused = Some(need);
            self.maybe_flush_dirty();
            return Err(SubmitError::Busy);
        }
        let mut flags = 0;
        if io.fua {
            flags |= FLAG_FUA;
        }
        if io.no_unmap {
            flags |= FLAG_NO_UNMAP;
        }
        let mut entry = Entry::new(
            Origin::User(user, now),
            io.op,
            io.offset,
            io.len,
            flags,
            io.data,
        );
        entry.io_deadline = self.config.io_timeout.map(|t| now + t);
        self.journal.insert(entry);
        self.stats.submitted += 1;
        self.pump(now);
        Ok(())
    }

    /// Starts leaving the session for good. New IO is refused; IO in
    /// flight finishes; then writes acknowledged but not yet flushed are
    /// flushed (after GOODBYE the server frees the session, and a power
    /// loss could no longer be repaired by replay), and GOODBYE goes out.
    /// [`ClientEngine::is_closed`] says when; a driver that cannot wait
    /// calls [`ClientEngine::abandon`].
    pub fn close(&mut self, now: Instant) {
        if self.leaving == Leaving::No {
            self.leaving = Leaving::Draining;
            self.pump(now);
        }
    }

    /// Whether a server fenced this run: a newer run of the same client
    /// identity holds the export, and this one has closed for good.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether the client has left: GOODBYE sent after everything in
    /// flight finished and was flushed, or given up by
    /// [`ClientEngine::abandon`].
    pub fn is_closed(&self) -> bool {
        self.leaving == Leaving::Closed
    }

    /// Leaves at once, without waiting for the server (it is unreachable,
    /// or the caller's patience ran out): every unfinished IO fails with
    /// [`IoErrorKind::Closed`], and writes acknowledged but not yet
    /// flushed are no longer the client's to replay. Returns their bytes,
    /// for the caller to report.
    pub fn abandon(&mut self, now: Instant) -> u64 {
        let unflushed = self.dirty.bytes();
        self.fail_all_and_leave(IoErrorKind::Closed, now);
        unflushed
    }

    /// Fails every unfinished IO with `kind`, gives up the replays it
    /// holds, and leaves.
    fn fail_all_and_leave(&mut self, kind: IoErrorKind, now: Instant) {
        let unfinished: Vec<u64> = self.journal.entries.keys().copied().collect();
        for id in unfinished {
            self.fail_entry(id, kind, now);
        }
        self.journal.drop_held_replays();
        self.replay_retry_at = None;
        self.leave();
    }

    /// Superseded by a newer run: every unfinished IO fails with
    /// [`IoErrorKind::Fenced`] and the client closes for good.
    fn fence(&mut self, now: Instant) {
        self.fenced = true;
        self.fail_all_and_leave(IoErrorKind::Fenced, now);
    }

    /// Once draining has nothing left in flight: flushes what is still
    /// dirty, then says GOODBYE.
    fn drain_for_close(&mut self) {
        if self.leaving != Leaving::Draining || !self.journal.is_idle() {
            return;
        }
        if self.dirty.bytes() > 0 {
            self.issue_dirty_flush();
        } else {
            self.leave();
        }
    }

    fn leave(&mut self) {
        self.leaving = Leaving::Closed;
        if let Some(slot) = self.channels.iter().position(Channel::is_ready) {
            let ch = self.id_of(slot);
            self.send_msg(ch, &Message::Goodbye);
        }
        for slot in 0..self.channels.len() {
            if !matches!(self.channels[slot].state, ChanState::Idle { .. }) {
                let ch = self.id_of(slot);
                self.actions.push_back(ClientAction::Close(ch));
                self.channels[slot].state = ChanState::Idle {
                    retry_at: Instant::FAR_FUTURE,
                };
            }
        }
    }

    /// The driver connected the transport for `ch`.
    pub fn channel_connected(&mut self, ch: ChannelId, now: Instant) {
        let wanted = self
            .current(ch)
            .filter(|&slot| matches!(self.channels[slot].state, ChanState::Connecting { .. }));
        let Some(slot) = wanted else {
            // Given up on (timed out, retired) while it connected: the
            // driver must not keep it open.
            self.actions.push_back(ClientAction::Close(ch));
            return;
        };
        let mut nonce = [0u8; NONCE_LEN];
        self.secret.fill(&mut nonce);
        let session_id = self.session.map_or(0, |s| s.id);
        let key = Box::new((self.config.key_id.clone(), self.config.key.clone()));
        self.channels[slot].state = ChanState::AwaitChallenge {
            since: now,
            nonce,
            session_id,
            key,
        };
        self.channels[slot].last_rx = now;
        let (owner, epoch) = self.config.identity.map_or((0, 0), |i| (i.owner, i.epoch));
        let hello = Hello {
            version_min: u16::from(VERSION),
            version_max: u16::from(VERSION),
            features: 0,
            session_id,
            client_nonce: nonce,
            owner,
            epoch,
            key_id: self.config.key_id.clone(),
            export: self.config.export.clone(),
        };
        self.send_msg(ch, &Message::Hello(hello));
    }

    /// The transport for `ch` closed or could not connect.
    pub fn channel_closed(&mut self, ch: ChannelId, now: Instant) {
        self.channel_failed(ch, "connection closed", now);
    }

    /// The transport for `ch` closed or could not connect, for `reason`
    /// (reported in the channel-down notice).
    pub fn channel_failed(&mut self, ch: ChannelId, reason: impl Into<String>, now: Instant) {
        let reason = DownReason::Transport(reason.into());
        if let Some(slot) = self.current(ch) {
            if !matches!(self.channels[slot].state, ChanState::Idle { .. }) {
                // Refused or reset: back off, or a down server gets hammered.
                self.fail_channel(slot, reason, now, true);
            }
        }
        self.pump(now);
    }

    /// One whole frame arrived on `ch`.
    pub fn handle_frame(&mut self, ch: ChannelId, frame: impl Into<wire::InFrame>, now: Instant) {
        let Some(slot) = self.current(ch) else { return };
        if matches!(
            self.channels[slot].state,
            ChanState::Idle { .. } | ChanState::Connecting { .. }
        ) {
            return;
        }
        self.channels[slot].last_rx = now;
        self.channels[slot].suspect = false;
        match wire::decode_in(frame.into()) {
            Ok(msg) => self.handle_message(slot, msg, now),
            Err(DecodeError::PayloadChecksum {
                kind: Kind::Reply,
                id,
            }) => {
                // The id is trustworthy, the data is not: ask again.
                self.stats.corrupt_frames += 1;
                if let Some(old) = self.journal.requeue(id) {
                    self.release_inflight(old);
                }
            }
            Err(e) => {
                self.stats.corrupt_frames += 1;
                self.fail_channel(slot, DownReason::BadFrame(e), now, true);
            }
        }
        self.pump(now);
    }

    /// When to call [`ClientEngine::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let channels = (0..self.channels.len())
            .flat_map(|slot| self.channel_timers(slot))
            .flatten()
            .map(|(at, _)| at);
        [
            self.journal.next_resend(),
            self.journal.next_io_deadline(),
            self.replay_retry_at,
        ]
        .into_iter()
        .flatten()
        .chain(channels)
        .min()
    }

    /// Time passed: run whatever timers are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        for slot in 0..self.channels.len() {
            self.run_channel_timer(slot, now);
        }
        while let Some(id) = self.journal.pop_due_deadline(now) {
            self.fail_entry(id, IoErrorKind::TimedOut, now);
        }
        while let Some(id) = self.journal.pop_due_resend(now) {
            self.age(id, now);
        }
        if self.replay_retry_at.is_some_and(|t| t <= now) {
            self.replay_retry_at = None;
            self.journal.release_held_replays();
        }
        self.pump(now);
    }

    /// The channel's timers, from its state: the one table both
    /// [`ClientEngine::poll_timeout`] and [`ClientEngine::handle_timeout`]
    /// read, so a deadline is computed in one place.
    fn channel_timers(&self, slot: usize) -> [Option<(Instant, ChannelTimer)>; 2] {
        let c = &self.channels[slot];
        match &c.state {
            ChanState::Idle { retry_at } => [
                (*retry_at != Instant::FAR_FUTURE && self.may_connect(slot))
                    .then_some((*retry_at, ChannelTimer::Reconnect)),
                None,
            ],
            ChanState::Connecting { since }
            | ChanState::AwaitChallenge { since, .. }
            | ChanState::AwaitWelcome { since, .. } => [
                Some((
                    *since + self.config.handshake_timeout,
                    ChannelTimer::Handshake,
                )),
                None,
            ],
            ChanState::Ready => [
                (c.ping.is_some() || c.inflight > 0)
                    .then(|| (c.last_rx + self.config.channel_timeout, ChannelTimer::Dead)),
                c.ping.is_none().then(|| {
                    (
                        c.last_rx + self.config.keepalive_interval,
                        ChannelTimer::Keepalive,
                    )
                }),
            ],
        }
    }

    /// Fires the channel's most urgent due timer (a dead channel is not
    /// also probed).
    fn run_channel_timer(&mut self, slot: usize, now: Instant) {
        let due = self
            .channel_timers(slot)
            .into_iter()
            .flatten()
            .filter(|(at, _)| *at <= now)
            .map(|(_, timer)| timer)
            .min();
        match due {
            None => {}
            Some(ChannelTimer::Reconnect) => self.connect(slot, now),
            Some(ChannelTimer::Handshake) => {
                self.fail_channel(slot, DownReason::HandshakeTimeout, now, true)
            }
            Some(ChannelTimer::Dead) => {
                let silent = now - self.channels[slot].last_rx;
                self.fail_channel(slot, DownReason::Silent(silent), now, true);
            }
            Some(ChannelTimer::Keepalive) => {
                let token = self.next_ping;
                self.next_ping += 1;
                self.channels[slot].ping = Some((token, now));
                self.stats.pings += 1;
                let ch = self.id_of(slot);
                self.send_msg(ch, &Message::Ping { token });
            }
        }
    }

    fn age(&mut self, id: u64, now: Instant) {
        if self.config.sabotage.no_resend {
            self.journal.park_resend(id);
            return;
        }
        let entry = &self.journal.entries[&id];
        let tried = entry.tried;
        if let EntryState::Sent { ch, at, .. } = entry.state {
            if let Some(old) = self.current(ch) {
                if self.channels[old].last_rx < at {
                    self.channels[old].suspect = true;
                }
            }
        }
        // A resend goes where it is least likely to wait: no stickiness.
        let Some(slot) = self.pick_channel(tried, false, now) else {
            // Nowhere to send it: wait for a channel, keep it journaled.
            if let Some(old) = self.journal.requeue(id) {
                self.release_inflight(old);
            }
            return;
        };
        self.stats.resends += 1;
        let ch = self.id_of(slot);
        // Back off only when trying a channel again; a fresh channel gets
        // its ordinary timeout.
        let sends = if tried & (1 << slot) != 0 {
            self.journal.entries[&id].sends + 1
        } else {
            1
        };
        let resend_at = now + self.rto(slot, sends);
        if let Some(old) = self.journal.resent(id, ch, now, resend_at) {
            self.release_inflight(old);
        }
        self.channels[slot].carry(now);
        self.transmit(id, ch);
    }

    fn rto(&self, slot: usize, sends: u32) -> Duration {
        let base = self.channels[slot]
            .rtt
            .rto(self.config.resend_min, self.config.resend_max);
        let factor = 1u32 << sends.saturating_sub(1).min(16);
        (base * factor).min(self.config.resend_max)
    }

    fn handle_message(&mut self, slot: usize, msg: Message, now: Instant) {
        let state = self.channels[slot].state.clone();
        match (state, msg) {
            (ChanState::Ready, Message::Reply(reply)) => self.on_reply(slot, reply, now),
            (ChanState::Ready, Message::Pong { token }) => {
                let c = &mut self.channels[slot];
                if let Some((t, sent)) = c.ping {
                    if t == token {
                        c.rtt.sample(now - sent);
                        c.ping = None;
                    }
                }
            }
            (
                ChanState::AwaitChallenge {
                    nonce,
                    session_id,
                    key,
                    ..
                },
                Message::Challenge(ch),
            ) => self.on_challenge(slot, (nonce, session_id, *key), ch, now),
            (ChanState::AwaitWelcome { session_id, .. }, Message::Welcome(w)) => {
                self.on_welcome(slot, session_id, w, now)
            }
            (
                ChanState::AwaitChallenge { session_id, .. }
                | ChanState::AwaitWelcome { session_id, .. },
                Message::Reject(r),
            ) => self.on_reject(slot, session_id, r, now),
            (_, other) => self.fail_channel(slot, DownReason::Unexpected(other.kind()), now, true),
        }
    }

    /// `hello` is what the channel's HELLO carried: its nonce, the session
    /// it asked for, and the key it named.
    fn on_challenge(
        &mut self,
        slot: usize,
        hello: ([u8; NONCE_LEN], u64, (String, Key)),
        c: Challenge,
        now: Instant,
    ) {
        let (nonce, session_id, (key_id, key)) = hello;
        let transcript = auth::Transcript {
            key_id: &key_id,
            export: &self.config.export,
            session_id,
            owner_epoch: self.config.identity.map_or((0, 0), |i| (i.owner, i.epoch)),
            client_nonce: &nonce,
            server_nonce: &c.server_nonce,
            boot_id: c.boot_id,
        };
        let expected = auth::server_proof(&key, &transcript);
        let ch = self.id_of(slot);
        if c.version != u16::from(VERSION) || !auth::proofs_equal(&expected, &c.server_proof) {
            let detail = "server could not prove it holds our key".to_string();
            self.actions
                .push_back(ClientAction::Notice(Notice::AuthFailed { ch, detail }));
            return self.fail_channel(slot, DownReason::ServerNotAuthenticated, now, true);
        }
        let client_proof = auth::client_proof(&key, &transcript);
        self.channels[slot].state = ChanState::AwaitWelcome {
            since: now,
            session_id,
        };
        self.send_msg(ch, &Message::Auth(Auth { client_proof }));
    }

    fn on_reject(&mut self, slot: usize, asked: u64, r: Reject, now: Instant) {
        let ch = self.id_of(slot);
        match r.code {
            RejectCode::SessionUnknown => {
                // The server restarted or expired our session: start a new
                // one from this channel, at once.
                if self.session.is_some_and(|s| s.id == asked) {
                    self.lose_session(now);
                }
                self.fail_channel(slot, DownReason::SessionUnknown, now, false);
                self.channels[slot].failures = 0;
                self.channels[slot].state = ChanState::Idle { retry_at: now };
                return;
            }
            RejectCode::AuthFailed => {
                let detail = format!("server refused our key: {}", r.message);
                self.actions
                    .push_back(ClientAction::Notice(Notice::AuthFailed { ch, detail }));
            }
            RejectCode::Fenced => {
                // A newer run of this client holds the export: anything this
                // run still sends could overwrite what the newer one wrote.
                let message = r.message.clone();
                self.actions
                    .push_back(ClientAction::Notice(Notice::Rejected {
                        ch,
                        code: r.code,
                        message,
                    }));
                self.fence(now);
                return;
            }
            code => {
                let message = r.message.clone();
                self.actions
                    .push_back(ClientAction::Notice(Notice::Rejected { ch, code, message }));
            }
        }
        let reason = DownReason::Rejected {
            code: r.code,
            message: r.message,
        };
        self.fail_channel(slot, reason, now, true);
    }

    fn on_welcome(&mut self, slot: usize, asked: u64, w: Welcome, now: Instant) {
        let current = self.session.map(|s| s.id);
        if asked != 0 && (w.session_id != asked || current != Some(asked)) {
            // Joined a session we no longer use: leave it.
            return self.fail_channel(slot, DownReason::StaleSession, now, false);
        }
        if asked == 0 {
            if current.is_some() {
                let ch = self.id_of(slot);
                self.send_msg(ch, &Message::Goodbye);
                return self.fail_channel(slot, DownReason::SecondSession, now, false);
            }
            self.start_session(w.clone(), now);
        }
        let c = &mut self.channels[slot];
        c.state = ChanState::Ready;
        c.suspect = false;
        c.failures = 0;
        c.last_rx = now;
        c.ping = None;
        c.inflight = 0;
        self.stats.handshakes += 1;
        let ch = self.id_of(slot);
        self.actions
            .push_back(ClientAction::Notice(Notice::ChannelUp {
                ch,
                session_id: w.session_id,
            }));
    }

    fn start_session(&mut self, w: Welcome, now: Instant) {
        let replaced = self.last_boot.is_some();
        let restarted = self.last_boot.is_some_and(|b| b != w.boot_id);
        self.leader = None;
        self.epoch += 1;
        self.session = Some(Session {
            id: w.session_id,
            boot_id: w.boot_id,
            info: ExportInfo {
                size: w.export_size,
                block_size: w.block_size,
                max_payload: w.max_payload,
                flags: w.export_flags,
            },
            max_inflight: w.max_inflight.min(self.config.max_inflight).max(1),
        });
        self.last_boot = Some(w.boot_id);
        let mut replay_extents = 0;
        if replaced {
            self.stats.session_resets += 1;
            self.journal.new_server_session();
            if restarted {
                replay_extents = self.schedule_replay(w.max_payload);
                if !self.config.sabotage.no_restart_gate {
                    self.journal.gate_unresolved_mutations();
                }
            }
        }
        self.actions
            .push_back(ClientAction::Notice(Notice::SessionStarted {
                session_id: w.session_id,
                boot_id: w.boot_id,
                replaced,
                replay_extents,
            }));
        // Channels that waited for a session may now connect.
        for c in &mut self.channels {
            if let ChanState::Idle { retry_at } = &mut c.state {
                *retry_at = (*retry_at).min(now);
            }
        }
    }

    /// The server lost power or restarted: rewrite what it acknowledged but
    /// had not made durable, before anything else.
    fn schedule_replay(&mut self, max_payload: u32) -> usize {
        let unacked: Vec<Extent> = self
            .journal
            .take_replays()
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                len: u64::from(e.len),
                data: (e.op == Op::Write).then_some(e.payload),
            })
            .collect();
        if self.config.sabotage.no_replay {
            self.dirty.take_replay(Vec::new());
            return 0;
        }
        let extents = self.dirty.take_replay(unacked);
        let mut count = 0;
        for ext in extents {
            let mut at = 0u64;
            while at < ext.len {
                let len = (ext.len - at).min(u64::from(max_payload)) as u32;
                let (op, payload) = match &ext.data {
                    Some(d) => (Op::Write, d.slice(at as usize..at as usize + len as usize)),
                    None => (Op::WriteZeroes, Bytes::new()),
                };
                self.journal.insert(Entry::new(
                    Origin::Replay,
                    op,
                    ext.offset + at,
                    len,
                    0,
                    payload,
                ));
                at += u64::from(len);
                count += 1;
            }
        }
        self.stats.replayed_extents += count as u64;
        count
    }

    /// Our session is gone: every channel in it is useless.
    fn lose_session(&mut self, now: Instant) {
        self.session = None;
        for id in self.journal.all_sent() {
            self.journal.requeue(id);
        }
        for slot in 0..self.channels.len() {
            self.channels[slot].inflight = 0;
            if !matches!(self.channels[slot].state, ChanState::Idle { .. }) {
                let ch = self.id_of(slot);
                self.actions.push_back(ClientAction::Close(ch));
                self.channels[slot].state = ChanState::Idle { retry_at: now };
            }
        }
    }

    fn on_reply(&mut self, slot: usize, reply: Reply, now: Instant) {
        let Some(entry) = self.journal.entries.get(&reply.id) else {
            self.stats.duplicates_dropped += 1;
            return;
        };
        if reply.status == Status::Corrupt {
            // Our copy was damaged in transit and not executed.
            if let Some(old) = self.journal.requeue(reply.id) {
                self.release_inflight(old);
            }
            return;
        }
        if entry.op == Op::Read
            && reply.status == Status::Ok
            && reply.payload.len() != entry.len as usize
        {
            self.fail_channel(slot, DownReason::BadReadLength, now, true);
            return;
        }
        if let EntryState::Sent { ch, at, .. } = entry.state {
            if entry.sends == 1 && ch.slot as usize == slot {
                self.channels[slot].rtt.sample(now - at);
            }
        }
        let entry = self.journal.remove(reply.id).expect("looked up above");
        if let EntryState::Sent { ch, .. } = entry.state {
            self.release_inflight(ch);
        }
        if entry.op.mutates() {
            self.journal.release_held();
        }
        if entry.origin == Origin::Replay {
            if reply.status != Status::Ok {
                // Acknowledged data the server could not take (its disk
                // full after the restart, say): it must still land, and
                // nothing may read past it, so it waits and goes again.
                self.replay_backoff =
                    (self.replay_backoff * 2).clamp(self.config.resend_min, self.config.resend_max);
                let at = now + self.replay_backoff;
                self.replay_retry_at = Some(self.replay_retry_at.map_or(at, |t| t.min(at)));
                self.stats.replay_retries += 1;
                self.journal.hold_replay(entry);
                return;
            }
            self.replay_backoff = Duration::ZERO;
        }
        if reply.status == Status::Ok {
            self.record_success(&entry, reply.exec_seq);
        }
        let result = match reply.status {
            Status::Ok => Ok(reply.payload),
            other => Err(status_kind(other)),
        };
        self.finish(entry, result, now);
    }

    fn record_success(&mut self, entry: &Entry, exec_seq: u64) {
        if entry.op.mutates() && !self.config.sabotage.no_replay {
            let content = if entry.flags & FLAG_FUA != 0 {
                Content::Durable
            } else if entry.op == Op::Write {
                Content::Data(entry.payload.clone())
            } else {
                Content::Zero
            };
            self.dirty.acknowledged(
                self.epoch,
                exec_seq,
                entry.offset,
                u64::from(entry.len),
                content,
            );
        } else if entry.op == Op::Flush {
            if let Some(gen) = entry.cover_gen {
                self.dirty
                    .flushed(gen, !self.config.sabotage.no_flush_frontier);
            }
        }
    }

    fn finish(&mut self, entry: Entry, result: Result<Bytes, IoErrorKind>, now: Instant) {
        let Origin::User(user, submitted) = entry.origin else {
            return;
        };
        self.latency
            .record(entry.op, now.saturating_since(submitted));
        let result = result.map_err(|kind| IoError {
            kind,
            export: self.config.export.clone(),
            op: entry.op,
            offset: entry.offset,
            len: entry.len,
        });
        if result.is_ok() {
            self.stats.completed += 1;
        } else {
            self.stats.failed += 1;
        }
        self.actions
            .push_back(ClientAction::Complete(Completion { user, result }));
    }

    fn fail_entry(&mut self, id: u64, kind: IoErrorKind, now: Instant) {
        if let Some(entry) = self.journal.remove(id) {
            if let EntryState::Sent { ch, .. } = entry.state {
                self.release_inflight(ch);
            }
            if entry.op.mutates() {
                self.journal.release_held();
            }
            self.finish(entry, Err(kind), now);
        }
    }

    fn release_inflight(&mut self, ch: ChannelId) {
        if let Some(c) = self.channels.get_mut(ch.slot as usize) {
            if c.gen == ch.gen {
                debug_assert!(c.inflight > 0, "{ch}: a release without a send");
                c.inflight -= 1;
            }
        }
    }

    /// Closes a channel, moves its requests to the others, and schedules a
    /// reconnect (with backoff when `backoff`).
    fn fail_channel(&mut self, slot: usize, reason: DownReason, now: Instant, backoff: bool) {
        let ch = self.id_of(slot);
        self.stats.channel_failures += 1;
        let moved = self.journal.sent_on(slot as u16);
        for id in &moved {
            self.journal.requeue(*id);
        }
        self.stats.failovers += moved.len() as u64;
        let c = &mut self.channels[slot];
        c.inflight = 0;
        c.ping = None;
        c.failures = c.failures.saturating_add(1);
        let delay = if backoff {
            self.backoff(slot)
        } else {
            Duration::ZERO
        };
        let retry_at = now + delay;
        self.channels[slot].state = ChanState::Idle { retry_at };
        if self.leader == Some(slot as u16) {
            self.leader = None;
            // A failed session attempt holds every channel back, or each
            // would try at once in turn against a server that refused us.
            for c in &mut self.channels {
                if let ChanState::Idle { retry_at: r } = &mut c.state {
                    *r = (*r).max(retry_at);
                }
            }
        }
        self.actions.push_back(ClientAction::Close(ch));
        let notice = Notice::ChannelDown {
            ch,
            reason,
            moved: moved.len(),
        };
        self.actions.push_back(ClientAction::Notice(notice));
    }

    /// Exponential backoff with jitter drawn from the seeded generator.
    fn backoff(&mut self, slot: usize) -> Duration {
        let exp = self.channels[slot].failures.saturating_sub(1).min(20);
        let ceiling = self
            .config
            .reconnect_min
            .saturating_mul(1 << exp)
            .min(self.config.reconnect_max);
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(nanos / 2 + self.jitter.below(nanos / 2 + 1))
    }

    fn may_connect(&self, slot: usize) -> bool {
        self.leaving != Leaving::Closed
            && (self.session.is_some() || self.leader.is_none_or(|l| l as usize == slot))
    }

    fn connect(&mut self, slot: usize, now: Instant) {
        if self.session.is_none() {
            self.leader = Some(slot as u16);
        }
        let c = &mut self.channels[slot];
        c.gen = c.gen.wrapping_add(1);
        c.state = ChanState::Connecting { since: now };
        let ch = self.id_of(slot);
        self.actions.push_back(ClientAction::Connect(ch));
    }

    fn id_of(&self, slot: usize) -> ChannelId {
        ChannelId {
            slot: slot as u16,
            gen: self.channels[slot].gen,
        }
    }

    /// The slot of `ch` if it names the channel's current connection.
    fn current(&self, ch: ChannelId) -> Option<usize> {
        let slot = ch.slot as usize;
        (self.channels.get(slot)?.gen == ch.gen).then_some(slot)
    }

    /// Chooses a ready channel, avoiding the `tried` slots if possible.
    fn pick_channel(&mut self, tried: u64, small: bool, now: Instant) -> Option<usize> {
        let n = self.channels.len();
        let start = self.rr_cursor;
        // Suspect channels only when nothing else is ready.
        let any_trusted = self.channels.iter().any(|c| c.is_ready() && !c.suspect);
        let ready = move |c: &Channel| c.is_ready() && !(any_trusted && c.suspect);
        let candidates = |avoid: u64| {
            (0..n)
                .map(move |i| (start + i) % n)
                .filter(move |s| avoid & (1 << s) == 0)
        };
        let choose = |this: &Self, avoid: u64| -> Option<usize> {
            let mut it = candidates(avoid).filter(|s| ready(&this.channels[*s]));
            match this.config.policy {
                Policy::RoundRobin => it.next(),
                Policy::LeastInflight => it.min_by_key(|s| this.channels[*s].inflight),
                Policy::LowestLatency => it.min_by_key(|s| {
                    let c = &this.channels[*s];
                    (c.rtt.srtt().unwrap_or(Duration::ZERO), c.inflight)
                }),
            }
        };
        let mut slot = choose(self, tried).or_else(|| choose(self, 0))?;
        // A burst of small requests stays on one channel: one send for
        // all of them, one receive at the server, one reply send back.
        // The slot may be gone since: channels shrink when retuned.
        let sticky = self.sticky.filter(|s| *s < n && *s != slot);
        if let (Policy::LeastInflight, true, Some(last)) = (self.config.policy, small, sticky) {
            let c = &self.channels[last];
            // A stalling channel must not collect a burst before aging
            // notices it.
            if tried & (1 << last) == 0
                && ready(c)
                && c.inflight < self.channels[slot].inflight + self.config.sticky_slack
                && c.is_answering(now)
            {
                slot = last;
            }
        }
        if small {
            self.sticky = Some(slot);
        }
        self.rr_cursor = (slot + 1) % n;
        Some(slot)
    }

    /// Sends whatever may go now.
    fn pump(&mut self, now: Instant) {
        self.drain_for_close();
        if self.leaving != Leaving::Closed {
            for slot in 0..self.channels.len() {
                if let ChanState::Idle { retry_at } = self.channels[slot].state {
                    if retry_at <= now && self.may_connect(slot) {
                        self.connect(slot, now);
                    }
                }
            }
        }
        let Some(session) = self.session else { return };
        let barrier = !self.config.sabotage.no_flush_barrier;
        let overlap_order = !self.config.sabotage.no_overlap_order;
        while self.journal.sent() < session.max_inflight as usize {
            let Some(id) = self.journal.next_to_send(barrier, overlap_order) else {
                break;
            };
            let tried = self.journal.entries[&id].tried;
            let small = self.journal.entries[&id].len <= STICKY_MAX_LEN;
            let Some(slot) = self.pick_channel(tried, small, now) else {
                self.journal.unpop(id);
                break;
            };
            let ch = self.id_of(slot);
            let sends = self.journal.entries[&id].sends;
            let resend_at = now + self.rto(slot, sends + 1);
            let e = self.journal.entries.get_mut(&id).unwrap();
            if e.op == Op::Flush && e.cover_gen.is_none() {
                e.cover_gen = Some(self.dirty.gen());
            }
            self.journal.mark_sent(id, ch, now, resend_at);
            self.channels[slot].carry(now);
            self.transmit(id, ch);
        }
        self.maybe_flush_dirty();
    }

    /// Keeps the dirty window from filling: past half of it, flush.
    fn maybe_flush_dirty(&mut self) {
        if self.dirty.bytes() * 2 >= self.config.max_dirty_bytes {
            self.issue_dirty_flush();
        }
    }

    /// A FLUSH of the engine's own for the dirty window, unless one is
    /// already on its way.
    fn issue_dirty_flush(&mut self) {
        if self.journal.has_dirty_flush() {
            return;
        }
        self.stats.dirty_flushes += 1;
        self.journal.insert(Entry::new(
            Origin::DirtyFlush,
            Op::Flush,
            0,
            0,
            0,
            Bytes::new(),
        ));
    }

    fn transmit(&mut self, id: u64, ch: ChannelId) {
        let e = &self.journal.entries[&id];
        let req = Request {
            op: e.op,
            id,
            floor: self.journal.floor(),
            offset: e.offset,
            length: e.len,
            flags: e.flags,
            remote: None,
            payload: e.payload.clone(),
        };
        self.send_msg(ch, &Message::Request(req));
    }

    fn send_msg(&mut self, ch: ChannelId, msg: &Message) {
        self.actions
            .push_back(ClientAction::Send(ch, wire::encode(msg)));
    }
}

fn status_kind(status: Status) -> IoErrorKind {
    match status {
        Status::Io => IoErrorKind::Media,
        Status::NoSpace => IoErrorKind::NoSpace,
        Status::OutOfRange => IoErrorKind::OutOfRange,
        Status::ReadOnly => IoErrorKind::ReadOnly,
        Status::Invalid => IoErrorKind::Invalid,
        Status::Unsupported => IoErrorKind::Unsupported,
        Status::Ok | Status::Corrupt => IoErrorKind::Unknown(status.code()),
        Status::Other(c) => IoErrorKind::Unknown(c),
    }
}
