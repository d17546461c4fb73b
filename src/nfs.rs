//! The NFS adapter: nfs3_server's traits over live mounts, and the transport front.
//!
//! Owns: the datastore namespace as NFSv3 sees it ([`DatastoreFs`]), the mapping of errors to
//! `nfsstat3` (in `errors.rs`, one place), the TCP front ([`NfsServer`]: accept loop, allow-list,
//! framing, limits, shutdown).
//! Must not: know about chunks; everything below goes through `mount`.

mod errors;
mod front;
mod fs;
mod fsstat;
pub mod portmap;

pub use errors::{overlay_to_nfsstat, to_nfsstat};
pub use front::{AllowList, NfsServer, MAX_CONNECTIONS, MAX_FRAGMENT};
pub use fs::{DatastoreFs, MAX_IO};
