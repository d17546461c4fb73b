//! The accept loop the block protocol servers (NBD, iSCSI) share: the allow-list, a
//! connection limit, TCP_NODELAY (QEMU's clients stall without it) and keepalive, each
//! connection a task of the server's tracker holding its permit until it ends.
//!
//! Owns: [`Acceptor`].
//! Must not: know a protocol; the server hands in what serves one connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allow::AllowList;

/// A listening socket with the rules every block server applies at accept.
pub struct Acceptor {
    listener: TcpListener,
    allow: AllowList,
    permits: Arc<Semaphore>,
    limit: usize,
    /// The protocol's name in log lines.
    name: &'static str,
}

impl Acceptor {
    pub async fn bind(
        addr: SocketAddr,
        allow: AllowList,
        limit: usize,
        name: &'static str,
    ) -> std::io::Result<Acceptor> {
        Ok(Acceptor {
            listener: TcpListener::bind(addr).await?,
            allow,
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            name,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `cancel`. A connection from a host the allow-list refuses, or beyond the
    /// limit, is closed at once; every other one runs `serve(stream, peer)` as a task of
    /// `tasks`, and its error (if any) is logged when it ends.
    pub async fn run<F, Fut, E>(self, cancel: CancellationToken, tasks: TaskTracker, serve: F)
    where
        F: Fn(TcpStream, SocketAddr) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let name = self.name;
        loop {
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "{name}: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if !self.allow.allows(peer.ip()) {
                tracing::warn!(%peer, "{name}: connection refused: not in the allow-list");
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = self.limit, "{name}: connection refused: too many connections");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(60))
                    .with_interval(Duration::from_secs(10)),
            );
            let conn = serve(stream, peer);
            tasks.spawn(async move {
                if let Err(e) = conn.await {
                    tracing::info!(%peer, error = %e, "{name}: connection closed");
                }
                drop(permit);
            });
        }
    }
}
