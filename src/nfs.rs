//! The NFS server: NFSv3 and MOUNT v3 over live mounts, and the portmapper.
//!
//! Owns: the datastore as NFSv3 sees it ([`DatastoreFs`], a thin adapter over the protocol-free
//! [`crate::datastore`]: handles, `fattr3`, ACCESS3 bits), file handles and the write verifier
//! (`handle.rs`), ONC RPC headers (`rpc.rs`), the NFS and MOUNT procedures (`dispatch.rs`), the
//! mapping of the datastore's errors to `nfsstat3` (in `errors.rs`, one place), the RPC front
//! that NFS and the portmapper share (`front.rs`: accept loop, allow-list, framing, the call
//! header, limits, shutdown; a UDP responder), NFS's limits on it ([`NfsServer`], `server.rs`)
//! and the portmapper's protocol (`portmap.rs`).
//! Must not: decide what an operation means for the datastore (`datastore` does), know about
//! chunks or mounts; everything below goes through `datastore`.

mod budget;
mod dispatch;
mod errors;
mod front;
mod fs;
mod fsstat;
#[doc(hidden)]
pub mod fuzzing;
mod handle;
pub mod portmap;
mod rpc;
mod server;

pub use crate::allow::AllowList;
pub use budget::DEFAULT_BYTES as CALL_MEMORY;
pub use errors::to_nfsstat;
pub use fs::{DatastoreFs, MAX_IO};
pub use handle::Identity;
pub use server::{NfsServer, IN_FLIGHT, MAX_CONNECTIONS, MAX_FRAGMENT};
