//! The front of a server that runs several engines: which engine each
//! connection belongs to is in its first frame (see
//! [`braid_core::server::engine_for`]), so the acceptor reads that frame
//! before handing the connection over, and an adopted connection's frames
//! pass through a small task that does the same.

use crate::conn::ConnEvent;
#[cfg(feature = "tls")]
use crate::movable::MovableTcp;
use crate::server::{Adoption, EngineSlot, Event};
use crate::ServerSecurity;
use braid_core::server::{engine_for_frame, ConnId};
use braid_core::wire::{FrameReader, MAX_BODY_LEN, PREFIX_LEN};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// An accepted connection's stream, past TLS if the server uses it.
pub(crate) enum Accepted {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::server::TlsStream<MovableTcp>>),
}

/// A connection for an engine to serve, with what was read of it so far.
pub(crate) struct Handoff {
    pub(crate) stream: Accepted,
    /// Holds the bytes read to find the first frame: the engine's reader
    /// decodes them again, as if it had read them itself.
    pub(crate) frames: FrameReader,
}

impl Handoff {
    /// The same connection, registered with the runtime this runs on: the
    /// acceptor's runtime registered it, and an engine on a runtime of its
    /// own must be woken by its own, not across threads.
    pub(crate) fn rehomed(self) -> std::io::Result<Handoff> {
        let Handoff { stream, frames } = self;
        let stream = match stream {
            #[cfg(not(madsim))]
            Accepted::Plain(s) => Accepted::Plain(TcpStream::from_std(s.into_std()?)?),
            #[cfg(all(feature = "tls", not(madsim)))]
            Accepted::Tls(mut tls) => {
                tls.get_mut().0.rehome()?;
                Accepted::Tls(tls)
            }
            // Under madsim there is one runtime: nothing to move.
            #[allow(unreachable_patterns)]
            other => other,
        };
        Ok(Handoff { stream, frames })
    }
}

/// What the acceptor must hold connections to.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    /// From accept to a whole first frame, TLS included.
    pub(crate) handshake: Duration,
    /// The largest frame payload a reader takes.
    pub(crate) max_payload: usize,
}

/// A first frame bigger than any HELLO is not one: the connection goes to
/// an engine without waiting for the rest, and that engine's reader sees
/// whatever is wrong with it.
const HELLO_MAX: usize = PREFIX_LEN + MAX_BODY_LEN;

/// Accepts connections until `shutdown`, each on a task of its own until
/// its first frame names its engine. Stops too if an engine's task ends
/// (it panicked): its clients would be routed to it forever, so the
/// server stops, as a server of one engine does when that one ends.
pub(crate) async fn accept(
    listener: &TcpListener,
    security: &ServerSecurity,
    engines: &Arc<[EngineSlot]>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut gone: Vec<_> = engines
        .iter()
        .map(|e| Box::pin(e.events.closed()))
        .collect();
    let any_gone = std::future::poll_fn(|cx| {
        match gone.iter_mut().position(|g| g.as_mut().poll(cx).is_ready()) {
            Some(index) => std::task::Poll::Ready(index),
            None => std::task::Poll::Pending,
        }
    });
    tokio::pin!(any_gone);
    // New anonymous sessions take the engines in turn.
    let turn = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => return,
            index = &mut any_gone => {
                return tracing::error!(engine = index, "a protocol engine stopped: stopping the server");
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (security, engines, turn) = (security.clone(), engines.clone(), turn.clone());
                tokio::spawn(hand_over(stream, peer, security, engines, turn, limits));
            }
            Err(e) => {
                // Out of descriptors and the like: the engines keep serving
                // the sessions they have; try again shortly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads `stream`'s first frame and hands the connection to the engine
/// it names (an anonymous new session: the engine whose `turn` it is).
async fn hand_over(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    security: ServerSecurity,
    engines: Arc<[EngineSlot]>,
    turn: Arc<AtomicUsize>,
    limits: Limits,
) {
    let read = tokio::time::timeout(
        limits.handshake,
        first_frame_of(stream, &security, limits.max_payload, engines.len()),
    )
    .await;
    match read {
        Ok(Ok((handoff, engine))) => {
            let engine =
                engine.unwrap_or_else(|| turn.fetch_add(1, Ordering::Relaxed) % engines.len());
            tracing::debug!(%peer, engine, "connection accepted");
            // A stopping engine drops it, closing it.
            let _ = engines[engine]
                .events
                .send(Event::Handoff(Box::new(handoff)));
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended before its first frame"),
        Err(_) => tracing::debug!(%peer, "no first frame within the handshake timeout"),
    }
}

/// Completes TLS if the server uses it and reads up to the end of the
/// first frame: the connection, and the engine the frame names (`None`:
/// any).
async fn first_frame_of(
    stream: TcpStream,
    security: &ServerSecurity,
    max_payload: usize,
    engines: usize,
) -> std::io::Result<(Handoff, Option<usize>)> {
    match security {
        ServerSecurity::Plain => {
            let mut stream = stream;
            let (frames, engine) = read_first_frame(&mut stream, max_payload, engines).await?;
            Ok((
                Handoff {
                    stream: Accepted::Plain(stream),
                    frames,
                },
                engine,
            ))
        }
        #[cfg(feature = "tls")]
        ServerSecurity::Tls(acceptor) => {
            let mut tls = acceptor.accept(MovableTcp::new(stream)).await?;
            let (frames, engine) = read_first_frame(&mut tls, max_payload, engines).await?;
            Ok((
                Handoff {
                    stream: Accepted::Tls(Box::new(tls)),
                    frames,
                },
                engine,
            ))
        }
    }
}

async fn read_first_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_payload: usize,
    engines: usize,
) -> std::io::Result<(FrameReader, Option<usize>)> {
    let mut frames = FrameReader::new(max_payload);
    loop {
        if stream.read_buf(frames.buffer()).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // Decoded from a copy, so the engine's reader still gets every byte.
        let mut probe = FrameReader::new(max_payload);
        probe.buffer().extend_from_slice(frames.buffer());
        match probe.next_checked_frame() {
            Ok(Some(frame)) => return Ok((frames, engine_for_frame(frame, engines))),
            Ok(None) if frames.buffer().len() < HELLO_MAX => {}
            Ok(None) | Err(_) => return Ok((frames, None)),
        }
    }
}

/// Starts a connection another fabric accepted on a server with several
/// engines: its frames come to a task that waits for the first, hands the
/// connection to the engine it names, then passes the rest on.
pub(crate) fn adopt(conn: ConnId, start: Adoption, engines: Arc<[EngineSlot]>, limit: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<ConnEvent<ConnId>>();
    let writer = start(conn, tx);
    tokio::spawn(async move {
        let first = match tokio::time::timeout(limit, rx.recv()).await {
            Ok(Some(ConnEvent::Frame(_, frame))) => frame,
            Ok(Some(ConnEvent::Closed(_, why))) => {
                tracing::debug!(conn, why, "adopted connection ended before its first frame");
                return writer.close();
            }
            Ok(None) => return writer.close(),
            Err(_) => {
                tracing::debug!(conn, "adopted connection sent no first frame in time");
                return writer.close();
            }
        };
        // An anonymous new session: any engine will do.
        let engine =
            engine_for_frame(first.clone(), engines.len()).unwrap_or(conn as usize % engines.len());
        let slot = &engines[engine];
        let conns = slot.conns.clone();
        if slot
            .events
            .send(Event::Adopted(conn, writer, first))
            .is_err()
        {
            return;
        }
        while let Some(ev) = rx.recv().await {
            if conns.send(ev).is_err() {
                return;
            }
        }
    });
}
