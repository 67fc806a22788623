//! A TCP stream that can move between runtimes under TLS: a server of
//! several engines completes TLS on the listener's runtime, then hands
//! the connection to an engine that runs on a runtime of its own.

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that can move to another runtime's reactor while
/// something that owns it, TLS, keeps its state: TLS has no way to be
/// taken apart and put together again around a new stream.
pub(crate) struct MovableTcp(Option<TcpStream>);

impl MovableTcp {
    pub(crate) fn new(stream: TcpStream) -> Self {
        MovableTcp(Some(stream))
    }

    /// Registers the stream with the runtime this runs on. If that fails
    /// half-way the stream is gone and every later read or write says so.
    #[cfg(not(madsim))]
    pub(crate) fn rehome(&mut self) -> std::io::Result<()> {
        let Some(stream) = self.0.take() else {
            return Err(Self::gone());
        };
        self.0 = Some(TcpStream::from_std(stream.into_std()?)?);
        Ok(())
    }

    fn gone() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "the connection was lost moving it to its engine",
        )
    }

    fn stream(&mut self) -> std::io::Result<Pin<&mut TcpStream>> {
        self.0.as_mut().map(Pin::new).ok_or_else(Self::gone)
    }
}

impl AsyncRead for MovableTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for MovableTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A stream accepted on one runtime, with that runtime gone: whether
    /// it still carries bytes on another tells whether it moved.
    fn echo_after_its_runtime_stops(move_it: bool) -> std::io::Result<Vec<u8>> {
        let accepting = runtime();
        let (ours, mut theirs) = accepting.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let theirs = TcpStream::connect(addr).await.unwrap();
            let (ours, _) = listener.accept().await.unwrap();
            (MovableTcp::new(ours), theirs.into_std().unwrap())
        });
        let serving = runtime();
        let mut ours = ours;
        if move_it {
            serving.block_on(async { ours.rehome() })?;
        }
        drop(accepting);
        std::io::Write::write_all(&mut theirs, b"ping")?;
        serving.block_on(async {
            let mut got = vec![0; 4];
            ours.read_exact(&mut got).await?;
            ours.write_all(&got).await?;
            Ok(got)
        })
    }

    #[test]
    fn a_moved_stream_outlives_the_runtime_it_came_from() {
        assert_eq!(echo_after_its_runtime_stops(true).unwrap(), b"ping");
        assert!(
            echo_after_its_runtime_stops(false).is_err(),
            "an unmoved stream still worked: this test cannot tell the two apart"
        );
    }
}
