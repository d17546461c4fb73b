//! The API's listener: at most [`MAX_CONNECTIONS`] connections at once, each closed after
//! [`IDLE`] without a byte read or written (a client that opens connections and says nothing,
//! or stops reading its replies, cannot hold them for ever).
//!
//! Owns: accepting API connections under the limit, and the idle clock of each.
//! Must not: know about HTTP or the routes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// API connections at once; the next waits in the kernel's backlog until one closes.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection with no byte read or written for this long is closed. Longer than any
/// request takes (handlers that change state run to the end even if their client goes away).
pub const IDLE: Duration = Duration::from_secs(120);

/// A TCP listener with a connection limit and an idle timeout per connection.
pub struct GuardedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, max: usize, idle: Duration) -> Self {
        GuardedListener {
            inner,
            permits: Arc::new(Semaphore::new(max.max(1))),
            idle,
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedIo, SocketAddr) {
        // A permit first: while every one is taken, connections wait in the backlog.
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => unreachable!("the semaphore is never closed"),
        };
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let _ = io.set_nodelay(true);
                    return (GuardedIo::new(io, permit, self.idle), addr);
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The client's address, for handlers (`ConnectInfo<Peer>`).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GuardedListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, GuardedListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// One API connection: its slot under the limit, and its idle clock.
pub struct GuardedIo {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl GuardedIo {
    fn new(io: TcpStream, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        GuardedIo {
            io,
            _permit: permit,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn progressed(&mut self) {
        let next = Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    /// After the inner stream said Pending: an error once the idle time is up.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "API connection idle for too long",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.progressed();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, data) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.progressed();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Pending => self.check_idle(cx).map(Err),
            r => r,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_and_idle_ones_are_closed() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let mut l = GuardedListener::new(inner, 2, Duration::from_millis(300));
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let t = std::time::Instant::now();
        let (mut ia, _) = l.accept().await;
        let (_ib, _) = l.accept().await;
        // The third is not accepted while two are open.
        let third = tokio::time::timeout(Duration::from_millis(100), l.accept()).await;
        assert!(third.is_err(), "a third connection was accepted");
        // The first says nothing: its read fails once it has been idle for 300 ms.
        let mut buf = [0u8; 8];
        let e = ia.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        drop(ia);
        // Its slot is free again: the third is accepted and talks.
        let (mut ic, _) = l.accept().await;
        c.write_all(b"ping").await.unwrap();
        let n = ic.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
    }
}
