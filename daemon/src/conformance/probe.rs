//! A raw braid connection for the conformance checker: it sends whatever
//! frames a check needs, well-formed or not, and reports exactly what came
//! back (a message, a close, or silence), which the client engine, built
//! never to misbehave, cannot do.

use braid_core::auth::{self, Key, NONCE_LEN};
use braid_core::wire::{
    self, Auth, Challenge, FrameReader, Hello, Message, Op, Reply, Request, Welcome,
};
use braid_fabric_tcp::ClientSecurity;
use bytes::Bytes;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long a check waits for an answer the server owes at once.
pub(crate) const PROMPT: Duration = Duration::from_secs(5);
/// How long silence must last to count as "no answer" (or "not closed").
pub(crate) const QUIET: Duration = Duration::from_millis(700);

/// What the checker needs to reach a server.
pub(crate) struct Target {
    pub(crate) addr: String,
    pub(crate) security: ClientSecurity,
    pub(crate) key_id: String,
    pub(crate) key: Key,
    pub(crate) export: String,
    pub(crate) read_only_export: Option<String>,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What arrived.
#[derive(Debug)]
pub(crate) enum Recv {
    Msg(Message),
    /// The server closed the connection (or reset it).
    Closed,
    /// Nothing within the wait.
    Silent,
    /// Bytes that are not a valid frame.
    Garbage(String),
}

pub(crate) struct Probe {
    stream: Box<dyn Stream>,
    frames: FrameReader,
    /// Frames received while waiting for something else.
    pending: std::collections::VecDeque<Message>,
}

impl Probe {
    /// A transport connection, nothing sent yet.
    pub(crate) async fn open(t: &Target) -> Result<Probe, String> {
        let tcp = tokio::time::timeout(PROMPT, tokio::net::TcpStream::connect(&t.addr))
            .await
            .map_err(|_| format!("connect {}: timed out", t.addr))?
            .map_err(|e| format!("connect {}: {e}", t.addr))?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Stream> = match &t.security {
            ClientSecurity::Plain => Box::new(tcp),
            ClientSecurity::Tls(connector, name) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", t.addr))?,
            ),
        };
        Ok(Probe {
            stream,
            frames: FrameReader::new(wire::MAX_PAYLOAD_LEN as usize),
            pending: Default::default(),
        })
    }

    pub(crate) async fn send(&mut self, msg: &Message) -> Result<(), String> {
        self.send_raw(&wire::encode(msg).to_bytes()).await
    }

    pub(crate) async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("send: {e}"))?;
        self.stream.flush().await.map_err(|e| format!("send: {e}"))
    }

    /// The next message, a close, or silence after `within`.
    pub(crate) async fn recv(&mut self, within: Duration) -> Recv {
        if let Some(m) = self.pending.pop_front() {
            return Recv::Msg(m);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.frames.next_frame() {
                Ok(Some(frame)) => {
                    return match wire::decode(frame) {
                        Ok(m) => Recv::Msg(m),
                        Err(e) => Recv::Garbage(e.to_string()),
                    }
                }
                Ok(None) => {}
                Err(e) => return Recv::Garbage(e.to_string()),
            }
            let read = self.stream.read_buf(self.frames.buffer());
            match tokio::time::timeout_at(deadline, read).await {
                Err(_) => return Recv::Silent,
                Ok(Ok(0)) | Ok(Err(_)) => return Recv::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Whether the server closes the connection within `within` (frames
    /// it sends first, such as a REJECT, are skipped).
    pub(crate) async fn closes_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Recv::Closed => return true,
                Recv::Silent => return false,
                Recv::Msg(_) | Recv::Garbage(_) => {}
            }
        }
    }

    /// Sends HELLO and returns the CHALLENGE (or what came instead).
    pub(crate) async fn hello(
        &mut self,
        t: &Target,
        export: &str,
        session_id: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Challenge, String> {
        match self.hello_as(t, export, session_id, nonce, (0, 0)).await? {
            Recv::Msg(Message::Challenge(c)) => Ok(c),
            other => Err(format!(
                "HELLO: expected CHALLENGE, got {}",
                describe(&other)
            )),
        }
    }

    /// Sends HELLO as run `epoch` of client `owner`; returns the answer.
    pub(crate) async fn hello_as(
        &mut self,
        t: &Target,
        export: &str,
        session_id: u64,
        nonce: [u8; NONCE_LEN],
        (owner, epoch): (u64, u64),
    ) -> Result<Recv, String> {
        self.send(&Message::Hello(Hello {
            version_min: 1,
            version_max: 1,
            features: 0,
            session_id,
            client_nonce: nonce,
            owner,
            epoch,
            key_id: t.key_id.clone(),
            export: export.to_string(),
        }))
        .await?;
        Ok(self.recv(PROMPT).await)
    }

    /// The client proof for a CHALLENGE.
    pub(crate) fn proof(
        t: &Target,
        export: &str,
        session_id: u64,
        nonce: &[u8; NONCE_LEN],
        c: &Challenge,
    ) -> [u8; auth::PROOF_LEN] {
        Probe::proof_as(t, export, session_id, nonce, c, (0, 0))
    }

    /// [`Probe::proof`] for run `owner_epoch` of a client.
    pub(crate) fn proof_as(
        t: &Target,
        export: &str,
        session_id: u64,
        nonce: &[u8; NONCE_LEN],
        c: &Challenge,
        owner_epoch: (u64, u64),
    ) -> [u8; auth::PROOF_LEN] {
        auth::client_proof(
            &t.key,
            &auth::Transcript {
                key_id: &t.key_id,
                export,
                session_id,
                owner_epoch,
                client_nonce: nonce,
                server_nonce: &c.server_nonce,
                boot_id: c.boot_id,
            },
        )
    }

    /// A channel with a full handshake into `session_id` (0: a new
    /// session) on `export`.
    pub(crate) async fn join(
        t: &Target,
        export: &str,
        session_id: u64,
    ) -> Result<(Probe, Welcome), String> {
        let mut p = Probe::open(t).await?;
        let nonce = fresh_nonce();
        let c = p.hello(t, export, session_id, nonce).await?;
        let client_proof = Probe::proof(t, export, session_id, &nonce, &c);
        p.send(&Message::Auth(Auth { client_proof })).await?;
        match p.recv(PROMPT).await {
            Recv::Msg(Message::Welcome(w)) => Ok((p, w)),
            other => Err(format!("AUTH: expected WELCOME, got {}", describe(&other))),
        }
    }

    /// A full handshake as run `owner_epoch` of a client, into
    /// `session_id` (0: a new session) on the target's export: the
    /// channel and the server's last answer (WELCOME, or REJECT at HELLO
    /// or AUTH).
    pub(crate) async fn handshake_as(
        t: &Target,
        session_id: u64,
        owner_epoch: (u64, u64),
    ) -> Result<(Probe, Recv), String> {
        let mut p = Probe::open(t).await?;
        let nonce = fresh_nonce();
        let c = match p
            .hello_as(t, &t.export, session_id, nonce, owner_epoch)
            .await?
        {
            Recv::Msg(Message::Challenge(c)) => c,
            other => return Ok((p, other)),
        };
        let client_proof = Probe::proof_as(t, &t.export, session_id, &nonce, &c, owner_epoch);
        p.send(&Message::Auth(Auth { client_proof })).await?;
        let answer = p.recv(PROMPT).await;
        Ok((p, answer))
    }

    /// A new session on the target's export.
    pub(crate) async fn session(t: &Target) -> Result<(Probe, Welcome), String> {
        Probe::join(t, &t.export, 0).await
    }

    /// Sends `req` and waits for the REPLY to its id (other frames are kept).
    pub(crate) async fn call(&mut self, req: Request) -> Result<Reply, String> {
        let id = req.id;
        self.send(&Message::Request(req)).await?;
        self.reply_to(id, PROMPT).await
    }

    /// Waits for the REPLY to `id`.
    pub(crate) async fn reply_to(&mut self, id: u64, within: Duration) -> Result<Reply, String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut kept = Vec::new();
        let result = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Recv::Msg(Message::Reply(r)) if r.id == id => break Ok(r),
                Recv::Msg(m) => kept.push(m),
                other => break Err(format!("request {id}: no REPLY ({})", describe(&other))),
            }
        };
        self.pending.extend(kept);
        result
    }
}

pub(crate) fn fresh_nonce() -> [u8; NONCE_LEN] {
    crate::config::random_bytes::<NONCE_LEN>().expect("OS randomness")
}

/// A request with no remote buffer.
pub(crate) fn request(
    op: Op,
    id: u64,
    floor: u64,
    offset: u64,
    length: u32,
    payload: Bytes,
) -> Request {
    Request {
        op,
        id,
        floor,
        offset,
        length,
        flags: 0,
        remote: None,
        payload,
    }
}

/// Recomputes a frame's header checksum after a check edited its bytes.
pub(crate) fn fix_header_crc(frame: &mut [u8]) {
    let body_len = u16::from_le_bytes([frame[6], frame[7]]) as usize;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..16]), &frame[20..20 + body_len]);
    frame[16..20].copy_from_slice(&crc.to_le_bytes());
}

pub(crate) fn describe(r: &Recv) -> String {
    match r {
        Recv::Msg(Message::Reject(j)) => format!("REJECT {:?} ({})", j.code, j.message),
        Recv::Msg(Message::Reply(r)) => format!("REPLY {:?} for id {}", r.status, r.id),
        Recv::Msg(m) => format!("{:?}", m.kind()),
        Recv::Closed => "the connection closed".into(),
        Recv::Silent => "nothing".into(),
        Recv::Garbage(e) => format!("an invalid frame ({e})"),
    }
}
