//! Test-only defects, each breaking one numbered clause of docs/PROTOCOL.md,
//! so that `braid conformance` can be shown to notice every clause it
//! checks (a checker that passes a broken server proves nothing). Never set
//! in production; `braid serve` has no flag for them.

/// A deliberately broken behaviour of the server.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Defect {
    /// [2.1]: a bad prefix or header checksum leaves the connection open
    /// (the driver stops reading but does not close).
    KeepBadFrames,
    /// [2.2]: an unknown kind or a malformed body is ignored, not fatal.
    IgnoreMalformed,
    /// [2.3]: a request whose payload fails its checksum closes the
    /// connection instead of being answered CORRUPT.
    CloseOnCorruptPayload,
    /// [5.1]: the CHALLENGE carries a wrong server proof.
    WrongServerProof,
    /// [5.2]: any client proof is accepted.
    AcceptAnyProof,
    /// [5.3]: every CHALLENGE reuses one server nonce, so a recorded
    /// handshake replays.
    FixedServerNonce,
    /// [3.1]: refusals carry MALFORMED instead of their own code.
    GenericRejects,
    /// [7.1]: a HELLO naming an unknown session gets a new session.
    AdoptUnknownSessions,
    /// [4.1]: requests before WELCOME are served rather than fatal.
    ServeBeforeWelcome,
    /// [3.4]: PONG echoes a different token.
    WrongPongToken,
    /// [3.3]: a READ's reply is one block short.
    ShortReads,
    /// [3.2]: past the end is answered INVALID, not OUT_OF_RANGE.
    WrongRangeStatus,
    /// [3.2]: misaligned and zero-length requests are executed.
    NoAlignmentCheck,
    /// [3.2]: mutations on a read-only export are executed.
    IgnoreReadOnly,
    /// [6.1]: a finished id sent again executes again.
    ExecuteDuplicates,
    /// [6.3]: ids below the floor are answered instead of dropped.
    AnswerStale,
    /// [6.4]: ids past the window are executed.
    NoWindowCheck,
    /// [3.3]: successful mutations carry exec_seq 0.
    NoExecSeq,
    /// [6.2]: an answer to a resent id goes to the channel of the first copy.
    ReplyOnFirstChannel,
    /// [3.5]: GOODBYE is ignored: the session lives on.
    IgnoreGoodbye,
    /// [7.2]: a newer run of a client leaves its older sessions open.
    KeepOlderRuns,
    /// [7.3]: an older run of a client may open a session beside a newer.
    AcceptOlderRuns,
}
